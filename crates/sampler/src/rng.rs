//! Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel random numbers: as
//! easy as 1, 2, 3", SC 2011; the reference implementation is Random123).
//!
//! A counter-based generator is a keyed bijection: output = f(key, counter). No state is
//! carried between draws, so the uniform for a request depends only on its (seed, step) and
//! never on which other requests share the batch or in what order rows are processed.

const MULTIPLIER_0: u32 = 0xD251_1F53;
const MULTIPLIER_1: u32 = 0xCD9E_8D57;
// Weyl sequence increments for the key schedule: the golden ratio and sqrt(3) - 1 in 0.32
// fixed point.
const KEY_BUMP_0: u32 = 0x9E37_79B9;
const KEY_BUMP_1: u32 = 0xBB67_AE85;
const ROUNDS: usize = 10;

/// Scale of a 53-bit integer into [0, 1): 2^-53.
const TWO_POW_MINUS_53: f64 = 1.0 / (1u64 << 53) as f64;

fn mul_hi_lo(a: u32, b: u32) -> (u32, u32) {
    let product = u64::from(a) * u64::from(b);
    ((product >> 32) as u32, product as u32)
}

/// Applies the Philox4x32 bijection with 10 rounds to `counter` under `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut ctr = counter;
    let mut key = key;
    for round in 0..ROUNDS {
        if round > 0 {
            key[0] = key[0].wrapping_add(KEY_BUMP_0);
            key[1] = key[1].wrapping_add(KEY_BUMP_1);
        }
        let (hi0, lo0) = mul_hi_lo(MULTIPLIER_0, ctr[0]);
        let (hi1, lo1) = mul_hi_lo(MULTIPLIER_1, ctr[2]);
        ctr = [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0];
    }
    ctr
}

/// Returns the uniform draw number `draw` in [0, 1) of the request keyed by (`seed`, `step`).
///
/// The seed is the Philox key and (step, draw) is the counter, so distinct (seed, step, draw)
/// triples give independent uniforms. The result has 53 random bits.
pub fn uniform(seed: u64, step: u64, draw: u32) -> f64 {
    let key = [seed as u32, (seed >> 32) as u32];
    let counter = [step as u32, (step >> 32) as u32, draw, 0];
    let out = philox4x32_10(counter, key);
    let bits = (u64::from(out[0]) << 32 | u64::from(out[1])) >> 11;
    bits as f64 * TWO_POW_MINUS_53
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors of the Random123 distribution (file kat_vectors, lines
    // "philox4x32 10 ..."): counter, key, expected output.
    const KNOWN_ANSWERS: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        (
            [0; 4],
            [0; 2],
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8],
        ),
        (
            [u32::MAX; 4],
            [u32::MAX; 2],
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd],
        ),
        (
            [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
            [0xa409_3822, 0x299f_31d0],
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
        ),
    ];

    #[test]
    fn philox_matches_known_answers() {
        for (counter, key, expected) in KNOWN_ANSWERS {
            assert_eq!(
                philox4x32_10(counter, key),
                expected,
                "counter {counter:x?}"
            );
        }
    }

    #[test]
    fn uniform_is_in_unit_interval_and_repeatable() {
        for step in 0..1000 {
            let u = uniform(42, step, 0);
            assert!((0.0..1.0).contains(&u), "uniform(42, {step}) = {u}");
            assert_eq!(u, uniform(42, step, 0));
        }
    }

    #[test]
    fn uniform_depends_on_seed_step_and_draw() {
        let base = uniform(7, 3, 0);
        assert_ne!(base, uniform(8, 3, 0));
        assert_ne!(base, uniform(7, 4, 0));
        assert_ne!(base, uniform(7, 3, 1));
        // The high halves of seed and step are part of the key and counter too.
        assert_ne!(base, uniform(7 | 1 << 40, 3, 0));
        assert_ne!(base, uniform(7, 3 | 1 << 40, 0));
    }

    #[test]
    fn uniform_mean_and_variance_are_those_of_u01() {
        let n = 200_000u64;
        let draws: Vec<f64> = (0..n).map(|step| uniform(1234, step, 0)).collect();
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|u| (u - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors: sqrt(1/12/n) = 6.5e-4 for the mean, about 2.0e-4 for the variance.
        assert!((mean - 0.5).abs() < 0.004, "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 0.0015, "variance {var}");
    }

    #[test]
    fn uniform_deciles_are_balanced() {
        let n = 100_000u64;
        let mut counts = [0u64; 10];
        for step in 0..n {
            counts[(uniform(99, step, 0) * 10.0) as usize] += 1;
        }
        let expected = n as f64 / 10.0;
        let chi_square: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        // 9 degrees of freedom: P(chi-square > 33.7) = 1e-4.
        assert!(
            chi_square < 33.7,
            "chi-square {chi_square}, counts {counts:?}"
        );
    }
}
