//! Passes over one row of logits, written so that LLVM vectorizes them.
//!
//! Each kernel works on fixed blocks of [`LANES`] floats counted from the start of the row,
//! never from an aligned address, so a row's floating-point sums are the same wherever the
//! row sits in the batch. On x86-64 each kernel is compiled twice, once for the baseline
//! (SSE2) and once with AVX2, and the AVX2 copy runs when the CPU has it. Neither copy
//! fuses multiply-adds (Rust never contracts `a * b + c`), so both give bit-identical results.

/// Width of the blocks the kernels process.
pub const LANES: usize = 16;

/// Number of floats summed per entry of the chunk sums that drive the sampling scan.
pub const CHUNK: usize = 64;

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

/// Computes e^x for x <= 0 within 2 ulp, flushing results below `f32::MIN_POSITIVE` to 0.
///
/// Branch-free so that loops calling it vectorize. `x = -inf` gives 0; positive `x` and NaN
/// are outside its contract.
#[inline(always)]
pub fn exp_non_positive(x: f32) -> f32 {
    let clamped = if x < EXP_MIN_INPUT { EXP_MIN_INPUT } else { x };

    // 1. Split x = n ln 2 + r with integer n and |r| <= ln(2) / 2.
    let shifted = clamped * LOG2_E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let r = clamped - n * LN2_HI - n * LN2_LO;

    // 2. e^r by the polynomial.
    let mut poly = EXP_POLY[0];
    for coefficient in &EXP_POLY[1..] {
        poly = poly * r + coefficient;
    }
    let exp_r = poly * (r * r) + r + 1.0;

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

/// Calls the AVX2 build of a kernel when the CPU supports it, the baseline build otherwise.
macro_rules! dispatch {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty => $body:ident) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn with_avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked on the line above.
                    return unsafe { with_avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// Maximum of one row and whether it contains NaN.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowScan {
    /// Maximum over the non-NaN values; `-inf` when every value is `-inf` or NaN.
    pub max: f32,
    pub has_nan: bool,
}

#[inline(always)]
fn scan_body(row: &[f32]) -> RowScan {
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut nan = [false; LANES];
    let blocks = row.chunks_exact(LANES);
    let tail = blocks.remainder();
    for block in blocks {
        for lane in 0..LANES {
            let x = block[lane];
            max[lane] = if x > max[lane] { x } else { max[lane] };
            nan[lane] |= x.is_nan();
        }
    }
    let mut scan = RowScan { max: f32::NEG_INFINITY, has_nan: false };
    for (&x, &is_nan) in max.iter().zip(&nan).chain(tail.iter().map(|x| (x, &false))) {
        scan.max = if x > scan.max { x } else { scan.max };
        scan.has_nan |= is_nan || x.is_nan();
    }
    scan
}

dispatch! {
    /// Finds the maximum of `row` and whether it contains NaN, in one pass.
    pub fn scan_row(row: &[f32]) -> RowScan => scan_body
}

/// Returns the lowest index whose value equals `value`, if any.
pub fn first_index_of(row: &[f32], value: f32) -> Option<usize> {
    let mut blocks = row.chunks_exact(LANES);
    let mut start = 0;
    for block in blocks.by_ref() {
        if block.iter().fold(false, |found, &x| found | (x == value)) {
            return block.iter().position(|&x| x == value).map(|i| start + i);
        }
        start += LANES;
    }
    blocks.remainder().iter().position(|&x| x == value).map(|i| start + i)
}

/// Maximum of one block, for skipping blocks that cannot hold a candidate.
#[inline(always)]
pub fn block_max(block: &[f32; LANES]) -> f32 {
    block.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Sums a block's lanes in a fixed order.
#[inline(always)]
fn sum_lanes(lanes: &[f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    let mut acc = *lanes;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

/// Floats summed in f32 lanes before their total is added to an f64.
const SUM_BLOCK: usize = 1024;

#[inline(always)]
fn sum_exp_body(row: &[f32], max: f32, scale: f32) -> f64 {
    let mut total = 0.0f64;
    for part in row.chunks(SUM_BLOCK) {
        let mut acc = [0.0f32; LANES];
        let blocks = part.chunks_exact(LANES);
        let tail = blocks.remainder();
        for block in blocks {
            for lane in 0..LANES {
                acc[lane] += exp_non_positive((block[lane] - max) * scale);
            }
        }
        let mut part_sum = sum_lanes(&acc);
        for &x in tail {
            part_sum += exp_non_positive((x - max) * scale);
        }
        total += f64::from(part_sum);
    }
    total
}

dispatch! {
    /// Sums exp((x - max) * scale) over `row`; `max` must be the row's finite maximum.
    pub fn sum_exp(row: &[f32], max: f32, scale: f32) -> f64 => sum_exp_body
}

#[inline(always)]
fn weights_body(row: &[f32], max: f32, scale: f32, out: &mut [f32]) -> f64 {
    let mut total = 0.0f64;
    for (part, out_part) in row.chunks(SUM_BLOCK).zip(out.chunks_mut(SUM_BLOCK)) {
        let mut acc = [0.0f32; LANES];
        let mut out_blocks = out_part.chunks_exact_mut(LANES);
        let blocks = part.chunks_exact(LANES);
        let tail = blocks.remainder();
        for (block, out_block) in blocks.zip(out_blocks.by_ref()) {
            for lane in 0..LANES {
                let w = exp_non_positive((block[lane] - max) * scale);
                out_block[lane] = w;
                acc[lane] += w;
            }
        }
        let mut part_sum = sum_lanes(&acc);
        for (&x, w_out) in tail.iter().zip(out_blocks.into_remainder()) {
            *w_out = exp_non_positive((x - max) * scale);
            part_sum += *w_out;
        }
        total += f64::from(part_sum);
    }
    total
}

dispatch! {
    /// Writes the unnormalized probabilities w = exp((x - max) * scale) of `row` to `out`
    /// and returns their sum. `out` must be as long as `row`.
    pub fn weights(row: &[f32], max: f32, scale: f32, out: &mut [f32]) -> f64 => weights_body
}

/// Bit shift that turns a weight's bit pattern into its coarse histogram bucket: sign,
/// exponent and the top 4 mantissa bits, so one bucket spans a factor 2^(1/16) of weight.
pub const COARSE_SHIFT: u32 = 19;
/// Number of coarse buckets: weights are in [0, 1], whose largest bucket is 1.0's.
pub const COARSE_BUCKETS: usize = (1.0f32.to_bits() >> COARSE_SHIFT) as usize + 1;

/// Mass (sum of weights, in f64) and element count per coarse bucket of one row.
pub struct Histogram {
    pub mass: Vec<f64>,
    pub count: Vec<u32>,
}

impl Histogram {
    pub fn new() -> Self {
        Self { mass: vec![0.0; COARSE_BUCKETS], count: vec![0; COARSE_BUCKETS] }
    }

    pub fn clear(&mut self) {
        self.mass.fill(0.0);
        self.count.fill(0);
    }

    #[inline(always)]
    fn add(&mut self, w: f32) {
        let bucket = (w.to_bits() >> COARSE_SHIFT) as usize;
        if let (Some(mass), Some(count)) = (self.mass.get_mut(bucket), self.count.get_mut(bucket)) {
            *mass += f64::from(w);
            *count += 1;
        }
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

#[inline(always)]
fn weights_histogram_body(
    row: &[f32],
    max: f32,
    scale: f32,
    out: &mut [f32],
    histogram: &mut Histogram,
) -> f64 {
    let mut out_blocks = out.chunks_exact_mut(LANES);
    let blocks = row.chunks_exact(LANES);
    let tail = blocks.remainder();
    for (block, out_block) in blocks.zip(out_blocks.by_ref()) {
        for lane in 0..LANES {
            out_block[lane] = exp_non_positive((block[lane] - max) * scale);
        }
        for &w in out_block.iter() {
            histogram.add(w);
        }
    }
    for (&x, w_out) in tail.iter().zip(out_blocks.into_remainder()) {
        *w_out = exp_non_positive((x - max) * scale);
        histogram.add(*w_out);
    }
    // Summed from the largest bucket down, the order in which the top-p cut accumulates.
    histogram.mass.iter().rev().sum()
}

dispatch! {
    /// Writes the weights of `row` to `out` like [`weights`], adds them to `histogram` (which
    /// the caller has cleared) and returns their sum accumulated bucket by bucket.
    pub fn weights_histogram(
        row: &[f32],
        max: f32,
        scale: f32,
        out: &mut [f32],
        histogram: &mut Histogram
    ) -> f64 => weights_histogram_body
}

#[inline(always)]
fn masked_chunk_sums_body(weights: &[f32], above_bits: u32, sums: &mut Vec<f32>) -> f64 {
    sums.clear();
    let mut total = 0.0f64;
    for chunk in weights.chunks(CHUNK) {
        let mut acc = [0.0f32; LANES];
        let blocks = chunk.chunks_exact(LANES);
        let tail = blocks.remainder();
        for block in blocks {
            for lane in 0..LANES {
                let w = block[lane];
                acc[lane] += if w.to_bits() > above_bits { w } else { 0.0 };
            }
        }
        let mut sum = sum_lanes(&acc);
        for &w in tail {
            sum += if w.to_bits() > above_bits { w } else { 0.0 };
        }
        sums.push(sum);
        total += f64::from(sum);
    }
    total
}

dispatch! {
    /// Sums, per chunk of [`CHUNK`] weights, those whose bit pattern is above `above_bits`
    /// (for non-negative floats, bit order is numeric order). Writes the chunk sums to `sums`
    /// and returns their total accumulated in chunk order.
    pub fn masked_chunk_sums(weights: &[f32], above_bits: u32, sums: &mut Vec<f32>) -> f64
        => masked_chunk_sums_body
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
            let (fast, exact) = (exp_non_positive(x), x.exp());
            assert!(ulp_distance(fast, exact) <= 2, "exp({x}) = {fast}, std gives {exact}");
            x -= 0.000_37;
        }
    }

    #[test]
    fn exp_flushes_underflow_and_handles_edges() {
        assert_eq!(exp_non_positive(0.0), 1.0);
        assert_eq!(exp_non_positive(-0.0), 1.0);
        assert_eq!(exp_non_positive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_non_positive(-87.4), 0.0);
        assert_eq!(exp_non_positive(-1e30), 0.0);
        assert!(exp_non_positive(EXP_MIN_INPUT) >= f32::MIN_POSITIVE * 0.99);
    }

    #[test]
    fn scan_finds_max_and_nan_in_blocks_and_tail() {
        let mut row: Vec<f32> = (0..37).map(|i| -(i as f32)).collect();
        row[20] = 5.0;
        assert_eq!(scan_row(&row), RowScan { max: 5.0, has_nan: false });
        row[36] = f32::NAN;
        assert!(scan_row(&row).has_nan);
        row[36] = 0.0;
        row[3] = f32::NAN;
        assert_eq!(scan_row(&row), RowScan { max: 5.0, has_nan: true });
        let all_neg_inf = vec![f32::NEG_INFINITY; 40];
        assert_eq!(scan_row(&all_neg_inf).max, f32::NEG_INFINITY);
    }

    #[test]
    fn first_index_of_returns_lowest() {
        let mut row = vec![0.0f32; 50];
        row[17] = 2.0;
        row[40] = 2.0;
        row[49] = 3.0;
        assert_eq!(first_index_of(&row, 2.0), Some(17));
        assert_eq!(first_index_of(&row, 3.0), Some(49));
        assert_eq!(first_index_of(&row, 4.0), None);
    }

    #[test]
    fn sums_agree_with_naive_reference() {
        let row: Vec<f32> = (0..3001).map(|i| ((i * 7919) % 1000) as f32 * -0.01).collect();
        let max = scan_row(&row).max;
        let naive: f64 = row.iter().map(|&x| f64::from(((x - max) * 0.5).exp())).sum();
        let mut out = vec![0.0; row.len()];
        let mut histogram = Histogram::new();
        for total in [
            sum_exp(&row, max, 0.5),
            weights(&row, max, 0.5, &mut out),
            weights_histogram(&row, max, 0.5, &mut out, &mut histogram),
        ] {
            assert!((total - naive).abs() < 1e-5 * naive, "{total} vs {naive}");
        }
        assert_eq!(histogram.count.iter().sum::<u32>() as usize, row.len());
        let mut sums = Vec::new();
        let all = masked_chunk_sums(&out, 0, &mut sums);
        assert_eq!(sums.len(), row.len().div_ceil(CHUNK));
        assert!((all - naive).abs() < 1e-5 * naive);
        let above_half = masked_chunk_sums(&out, 0.5f32.to_bits(), &mut sums);
        let naive_above: f64 = out.iter().filter(|&&w| w > 0.5).map(|&w| f64::from(w)).sum();
        assert!((above_half - naive_above).abs() < 1e-5 * naive_above);
    }
}
