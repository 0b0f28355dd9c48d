//! The exponential the kernels vectorize, and the dispatch to the best instruction set.
//!
//! Kernel bodies are written once, generic over `FUSED` (whether `a * b + c` is one fused
//! multiply-add), and compiled up to three times on x86-64: for AVX-512 and for AVX2, both
//! with FMA, and for the baseline without it. A machine always runs the same build, so a
//! row's results never depend on its position in the batch or on the thread. Builds differ
//! in the last bits of the weights, so results may differ between machines.

/// Below ln(f32::MIN_POSITIVE) the exponential would be subnormal, and it is flushed to 0:
/// such a token has less than 1e-38 of the probability of the most likely one.
const EXP_MIN_INPUT: f32 = -87.336_55;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
// ln 2 split into a part with few mantissa bits and a correction (Cephes expf), so that
// n * LN2_HI is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding 1.5 * 2^23 rounds an f32 of magnitude below 2^22 to the nearest integer.
const ROUND_MAGIC: f32 = 12_582_912.0;
// Minimax polynomial for (e^r - 1 - r) / r^2 on |r| <= ln(2) / 2 (Cephes expf).
const EXP_POLY: [f32; 6] = [
    1.987_569_2e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `a * b + c`, rounded once when `FUSED` (used only in builds with FMA enabled).
#[inline(always)]
fn mul_add<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Computes e^x for x <= 0 within 2 ulp, flushing results below `f32::MIN_POSITIVE` to 0.
///
/// Branch-free so that loops calling it vectorize. `x = -inf` gives 0; positive `x` and NaN
/// are outside its contract.
#[inline(always)]
pub fn exp_non_positive<const FUSED: bool>(x: f32) -> f32 {
    let clamped = if x < EXP_MIN_INPUT { EXP_MIN_INPUT } else { x };

    // 1. Split x = n ln 2 + r with integer n and |r| <= ln(2) / 2.
    let shifted = mul_add::<FUSED>(clamped, LOG2_E, ROUND_MAGIC);
    let n = shifted - ROUND_MAGIC;
    let r = mul_add::<FUSED>(-n, LN2_LO, mul_add::<FUSED>(-n, LN2_HI, clamped));

    // 2. e^r by the polynomial.
    let mut poly = EXP_POLY[0];
    for coefficient in &EXP_POLY[1..] {
        poly = mul_add::<FUSED>(poly, r, *coefficient);
    }
    let exp_r = mul_add::<FUSED>(poly, r * r, r) + 1.0;

    // 3. Scale by 2^n, built from n's bits: n is in [-126, 0], so 2^n is a normal float.
    let n_int = shifted.to_bits() as i32 - ROUND_MAGIC.to_bits() as i32;
    let two_pow_n = f32::from_bits(((n_int + 127) << 23) as u32);
    let result = exp_r * two_pow_n;
    if x < EXP_MIN_INPUT {
        0.0
    } else {
        result
    }
}

/// Defines `$name` to call the best build of `$body::<FUSED>` for this CPU.
macro_rules! dispatch {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty => $body:ident) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn with_avx512($($arg: $ty),*) -> $ret {
                    $body::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn with_avx2($($arg: $ty),*) -> $ret {
                    $body::<true>($($arg),*)
                }
                match $crate::simd::simd_level() {
                    // SAFETY: `simd_level` found AVX-512F, AVX2 and FMA on this CPU.
                    $crate::simd::SimdLevel::Avx512 => return unsafe { with_avx512($($arg),*) },
                    // SAFETY: `simd_level` found AVX2 and FMA on this CPU.
                    $crate::simd::SimdLevel::Avx2 => return unsafe { with_avx2($($arg),*) },
                    $crate::simd::SimdLevel::Baseline => {}
                }
            }
            $body::<false>($($arg),*)
        }
    };
}
pub(crate) use dispatch;

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SimdLevel {
    Avx512,
    Avx2,
    Baseline,
}

/// Returns the widest instruction set of this CPU that the kernels have a build for.
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd_level() -> SimdLevel {
    // `is_x86_feature_detected!` caches what it finds, so this costs a few loads.
    let fma = std::arch::is_x86_feature_detected!("fma");
    if fma && std::arch::is_x86_feature_detected!("avx512f") {
        SimdLevel::Avx512
    } else if fma && std::arch::is_x86_feature_detected!("avx2") {
        SimdLevel::Avx2
    } else {
        SimdLevel::Baseline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulp_distance(a: f32, b: f32) -> u32 {
        a.to_bits().abs_diff(b.to_bits())
    }

    #[test]
    fn exp_matches_std_within_two_ulp() {
        let mut x = 0.0f32;
        while x > EXP_MIN_INPUT {
            for fast in [exp_non_positive::<false>(x), exp_non_positive::<true>(x)] {
                let exact = x.exp();
                assert!(
                    ulp_distance(fast, exact) <= 2,
                    "exp({x}) = {fast}, std gives {exact}"
                );
            }
            x -= 0.000_37;
        }
    }

    #[test]
    fn exp_flushes_underflow_and_handles_edges() {
        let exp = exp_non_positive::<false>;
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-87.4), 0.0);
        assert_eq!(exp(-1e30), 0.0);
        assert!(exp(EXP_MIN_INPUT) >= f32::MIN_POSITIVE * 0.99);
    }
}
