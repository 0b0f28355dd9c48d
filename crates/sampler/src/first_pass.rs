//! The first pass over a row, the one that reads it from memory. It finds the maximum and
//! any NaN, and on request the sum of exp(x - max) and the best candidates, so that the
//! greedy and top-k paths need no other pass over the whole row.

use crate::kernels::{chunk_weights, tree_sum, CHUNK, LANES};
use crate::simd::{dispatch, exp_non_positive};
use crate::top_k::{block_max, Candidate, TopKBuffer, BLOCK};

/// Results of the first pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FirstPass {
    /// Maximum over the non-NaN values; `-inf` when every value is `-inf` or NaN.
    pub max: f32,
    pub has_nan: bool,
    /// Sum of exp(x - max) over the row, when requested. Meaningless when the row has NaN
    /// or a `+inf`.
    pub exp_sum: Option<f64>,
}

/// Maximum of `values`, ignoring NaN, and whether any is NaN, as lane-wise loops.
#[inline(always)]
fn max_and_nan(values: &[f32; BLOCK]) -> (f32, bool) {
    let mut nan = [false; LANES];
    for group in 0..BLOCK / LANES {
        for lane in 0..LANES {
            nan[lane] |= values[group * LANES + lane].is_nan();
        }
    }
    (block_max(values), nan.iter().any(|&is_nan| is_nan))
}

/// Sums exp(x - max) over a full chunk in lanes, without storing the exponentials: only the
/// logprobs use this sum, so it need not match the draw's sums bit for bit.
#[inline(always)]
fn chunk_exp_sum<const FUSED: bool>(chunk: &[f32; CHUNK], max: f32) -> f64 {
    let mut lanes = [0.0f32; LANES];
    for group in 0..CHUNK / LANES {
        for lane in 0..LANES {
            lanes[lane] += exp_non_positive::<FUSED>(chunk[group * LANES + lane] - max);
        }
    }
    lanes.iter().map(|&lane| f64::from(lane)).sum()
}

#[inline(always)]
fn first_pass_body<const FUSED: bool>(
    row: &[f32],
    with_exp_sum: bool,
    top_count: usize,
    candidates: &mut Vec<Candidate>,
    chunk_maxima: Option<&mut Vec<f32>>,
) -> FirstPass {
    let mut chunk_maxima = chunk_maxima;
    if let Some(maxima) = chunk_maxima.as_mut() {
        maxima.clear();
    }
    let mut max = f32::NEG_INFINITY;
    let mut has_nan = false;
    let mut exp_sum = 0.0f64;
    let mut buffer = (top_count > 0).then(|| TopKBuffer::new(candidates, top_count));
    let mut weights = [0.0f32; CHUNK];

    for (chunk_index, chunk) in row.chunks(CHUNK).enumerate() {
        let start = chunk_index * CHUNK;

        // 1. The chunk's maximum and NaN, block by block; a partial chunk goes element-wise.
        let mut block_maxima = [f32::NEG_INFINITY; CHUNK / BLOCK];
        let full = <&[f32; CHUNK]>::try_from(chunk).ok();
        match full {
            Some(full) => {
                for (block, block_maximum) in block_maxima.iter_mut().enumerate() {
                    let values: &[f32; BLOCK] = full[block * BLOCK..][..BLOCK]
                        .try_into()
                        .unwrap_or(&[f32::NAN; BLOCK]);
                    let (block_max_value, block_nan) = max_and_nan(values);
                    *block_maximum = block_max_value;
                    has_nan |= block_nan;
                }
            }
            None => {
                for &x in chunk {
                    block_maxima[0] = if x > block_maxima[0] {
                        x
                    } else {
                        block_maxima[0]
                    };
                    has_nan |= x.is_nan();
                }
            }
        }
        let chunk_max = block_maxima
            .iter()
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
        if let Some(maxima) = chunk_maxima.as_mut() {
            maxima.push(chunk_max);
        }

        // 2. Online sum of exponentials: rescale the sum so far when the maximum rises.
        if chunk_max > max {
            if with_exp_sum {
                exp_sum *= (f64::from(max) - f64::from(chunk_max)).exp();
            }
            max = chunk_max;
        }
        if with_exp_sum && max > f32::NEG_INFINITY {
            exp_sum += match full {
                Some(full) => chunk_exp_sum::<FUSED>(full, max),
                None => {
                    chunk_weights::<FUSED>(chunk, max, 1.0, &mut weights);
                    f64::from(tree_sum(&weights))
                }
            };
        }

        // 3. Candidates, skipping the blocks whose maximum the buffer does not admit.
        if let Some(buffer) = buffer.as_mut() {
            match full {
                Some(full) => {
                    for (block, &block_maximum) in block_maxima.iter().enumerate() {
                        if buffer.admits(block_maximum) {
                            let values: &[f32; BLOCK] = full[block * BLOCK..][..BLOCK]
                                .try_into()
                                .unwrap_or(&[f32::NAN; BLOCK]);
                            buffer.consider_block(values, start + block * BLOCK);
                        }
                    }
                }
                None => {
                    for (offset, &x) in chunk.iter().enumerate() {
                        buffer.consider(x, start + offset);
                    }
                }
            }
        }
    }

    if let Some(buffer) = buffer {
        buffer.finish();
    }
    FirstPass {
        max,
        has_nan,
        exp_sum: with_exp_sum.then_some(exp_sum),
    }
}

dispatch! {
    /// Reads `row` once for its maximum and NaN, and on request for the sum of exp(x - max)
    /// (`with_exp_sum`), the `top_count` best tokens (0 for none) and each chunk's maximum.
    /// The tokens go to `candidates`, sorted best first (higher logit, ties to the lower id).
    pub fn first_pass(
        row: &[f32],
        with_exp_sum: bool,
        top_count: usize,
        candidates: &mut Vec<Candidate>,
        chunk_maxima: Option<&mut Vec<f32>>
    ) -> FirstPass => first_pass_body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top_k::by_rank;

    fn test_row(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919) % 1000) as f32 * -0.01 + (i % 7) as f32 * 0.3)
            .collect()
    }

    #[test]
    fn first_pass_matches_separate_references() {
        for len in [1, 63, 256, 700, 5000] {
            let row = test_row(len);
            let mut candidates = Vec::new();
            let mut maxima = Vec::new();
            let pass = first_pass(&row, true, 10.min(len), &mut candidates, Some(&mut maxima));
            let expected_maxima: Vec<f32> = row
                .chunks(CHUNK)
                .map(|c| c.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)))
                .collect();
            assert_eq!(maxima, expected_maxima);

            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(pass.max, max);
            assert!(!pass.has_nan);
            let exp_sum: f64 = row
                .iter()
                .map(|&x| (f64::from(x) - f64::from(max)).exp())
                .sum();
            let found = pass.exp_sum.unwrap();
            assert!(
                (found - exp_sum).abs() < 1e-6 * exp_sum,
                "{found} vs {exp_sum}"
            );

            let mut expected: Vec<Candidate> = row
                .iter()
                .enumerate()
                .map(|(id, &logit)| Candidate {
                    logit,
                    id: id as u32,
                })
                .collect();
            expected.sort_by(by_rank);
            expected.truncate(10.min(len));
            assert_eq!(candidates, expected, "len {len}");
        }
    }

    #[test]
    fn first_pass_flags_nan_and_skips_optional_work() {
        let mut row = test_row(600);
        row[333] = f32::NAN;
        let mut candidates = vec![Candidate { logit: 0.0, id: 9 }];
        let pass = first_pass(&row, false, 0, &mut candidates, None);
        assert!(pass.has_nan);
        assert_eq!(pass.exp_sum, None);
        assert_eq!(
            candidates.len(),
            1,
            "candidates untouched without top_count"
        );

        let all_neg_inf = vec![f32::NEG_INFINITY; 300];
        let pass = first_pass(&all_neg_inf, true, 0, &mut candidates, None);
        assert_eq!(pass.max, f32::NEG_INFINITY);
        assert_eq!(pass.exp_sum, Some(0.0));
    }
}
