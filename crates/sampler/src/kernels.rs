//! Passes over one row of logits, written so that LLVM vectorizes them.
//!
//! The weights w = exp((x - max) * scale) are recomputed by every pass that needs them
//! rather than stored: a row of 151,646 logits (600 KB) stays in L2 cache between passes, a
//! stored copy beside it would not. Sums run over chunks of [`CHUNK`] values counted from the
//! start of the row and add up in a fixed order, so a row's sums are the same wherever the
//! row sits in its batch.

use crate::simd::{dispatch, exp_non_positive};

/// Width of the blocks whose maximum the top-k pass checks at once.
pub const LANES: usize = 16;

/// Number of weights computed and summed together. `tree_sum` is written for this value.
pub const CHUNK: usize = 256;

/// Writes the weights of `chunk` (at most [`CHUNK`] logits) to `w`, and 0 past its end.
#[inline(always)]
pub(crate) fn chunk_weights<const FUSED: bool>(
    chunk: &[f32],
    max: f32,
    scale: f32,
    w: &mut [f32; CHUNK],
) {
    if let Ok(full) = <&[f32; CHUNK]>::try_from(chunk) {
        for i in 0..CHUNK {
            w[i] = exp_non_positive::<FUSED>((full[i] - max) * scale);
        }
    } else {
        for (i, out) in w.iter_mut().enumerate() {
            *out = chunk
                .get(i)
                .map_or(0.0, |&x| exp_non_positive::<FUSED>((x - max) * scale));
        }
    }
}

/// Keeps the weights whose bit pattern is above `above_bits` (for non-negative floats, bit
/// order is numeric order) and zeroes the others.
#[inline(always)]
pub(crate) fn mask_weights(w: &[f32; CHUNK], above_bits: u32) -> [f32; CHUNK] {
    let mut masked = [0.0f32; CHUNK];
    for i in 0..CHUNK {
        masked[i] = if w[i].to_bits() > above_bits {
            w[i]
        } else {
            0.0
        };
    }
    masked
}

/// Adds the upper `width` entries of `values` to the lower ones.
#[inline(always)]
fn fold(values: &mut [f32; CHUNK], width: usize) {
    for i in 0..width {
        values[i] += values[i + width];
    }
}

/// Sums a chunk as a pairwise tree: level k has `CHUNK >> k` nodes and node i of it is the
/// sum of nodes i and i + (CHUNK >> k) of level k - 1. The fixed order keeps dependency
/// chains short and lets `draw::descend` invert the sum exactly as it was computed.
#[inline(always)]
pub(crate) fn tree_sum(values: &[f32; CHUNK]) -> f32 {
    let mut level = *values;
    // One call per level, each with a constant width, so that each vectorizes.
    fold(&mut level, CHUNK / 2);
    fold(&mut level, CHUNK / 4);
    fold(&mut level, CHUNK / 8);
    fold(&mut level, CHUNK / 16);
    fold(&mut level, CHUNK / 32);
    fold(&mut level, CHUNK / 64);
    fold(&mut level, CHUNK / 128);
    fold(&mut level, CHUNK / 256);
    level[0]
}

#[inline(always)]
fn weight_sum_body<const FUSED: bool>(row: &[f32], max: f32, scale: f32, above_bits: u32) -> f64 {
    let mut w = [0.0f32; CHUNK];
    let mut total = 0.0f64;
    for chunk in row.chunks(CHUNK) {
        chunk_weights::<FUSED>(chunk, max, scale, &mut w);
        total += f64::from(tree_sum(&mask_weights(&w, above_bits)));
    }
    total
}

dispatch! {
    /// Sums the weights exp((x - max) * scale) of `row` whose bit pattern is above
    /// `above_bits` (0: every positive weight). `max` must be the row's finite maximum.
    pub fn weight_sum(row: &[f32], max: f32, scale: f32, above_bits: u32) -> f64 => weight_sum_body
}

#[inline(always)]
fn chunk_sums_body<const FUSED: bool>(
    row: &[f32],
    max: f32,
    scale: f32,
    above_bits: u32,
    sums: &mut Vec<f32>,
) -> f64 {
    let mut w = [0.0f32; CHUNK];
    let mut total = 0.0f64;
    sums.clear();
    for chunk in row.chunks(CHUNK) {
        chunk_weights::<FUSED>(chunk, max, scale, &mut w);
        let sum = tree_sum(&mask_weights(&w, above_bits));
        sums.push(sum);
        total += f64::from(sum);
    }
    total
}

dispatch! {
    /// Sums the weights like [`weight_sum`] and also writes each chunk's sum to `sums`, so
    /// that `draw::draw_from_sums` can find the chunk of a draw without recomputing weights.
    pub fn chunk_sums(row: &[f32], max: f32, scale: f32, above_bits: u32, sums: &mut Vec<f32>) -> f64
        => chunk_sums_body
}

#[inline(always)]
fn weights_body<const FUSED: bool>(row: &[f32], max: f32, scale: f32, out: &mut Vec<f32>) {
    let mut w = [0.0f32; CHUNK];
    out.clear();
    for chunk in row.chunks(CHUNK) {
        chunk_weights::<FUSED>(chunk, max, scale, &mut w);
        out.extend_from_slice(&w[..chunk.len()]);
    }
}

dispatch! {
    /// Writes the weights of `row` to `out`, bit for bit as the other passes compute them.
    pub fn weights(row: &[f32], max: f32, scale: f32, out: &mut Vec<f32>) -> () => weights_body
}

/// Bit shift that turns a weight's bit pattern into its coarse histogram bucket: sign,
/// exponent and the top 4 mantissa bits, so one bucket spans a factor 2^(1/16) of weight.
pub const COARSE_SHIFT: u32 = 19;
/// Number of coarse buckets: weights are in [0, 1], whose largest bucket is 1.0's.
const COARSE_BUCKETS: usize = (1.0f32.to_bits() >> COARSE_SHIFT) as usize + 1;
/// Length of the histogram's array: a power of two, so that masking a bucket elides the
/// bounds check.
const HISTOGRAM_SIZE: usize = COARSE_BUCKETS.next_power_of_two();

/// Weight mass per coarse bucket of one row.
///
/// All weights of a bucket share their exponent, so the bucket keeps the exact integer sum
/// of their 24-bit significands, and adding a weight is one integer addition.
pub struct Histogram {
    significand_sums: Vec<u64>,
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            significand_sums: vec![0; HISTOGRAM_SIZE],
        }
    }

    /// Writes the sum of the weights in each bucket to `out`. Buckets of biased exponent 0
    /// hold only zero weights (subnormal ones are flushed), so their mass is 0.
    pub fn masses(&self, out: &mut Vec<f64>) {
        out.clear();
        out.extend(
            self.significand_sums
                .iter()
                .enumerate()
                .map(|(bucket, &sum)| {
                    let biased_exponent = (bucket as u64) >> (23 - COARSE_SHIFT);
                    if biased_exponent == 0 {
                        return 0.0;
                    }
                    // A significand s of a float with biased exponent e is worth s * 2^(e - 150).
                    let scale = f64::from_bits((biased_exponent + 1023 - 150) << 52);
                    sum as f64 * scale
                }),
        );
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

#[inline(always)]
fn weights_histogram_body<const FUSED: bool>(
    row: &[f32],
    max: f32,
    scale: f32,
    histogram: &mut Histogram,
) {
    histogram.significand_sums.fill(0);
    let sums = &mut histogram.significand_sums[..];
    let mut w = [0.0f32; CHUNK];
    for chunk in row.chunks(CHUNK) {
        // The weights vectorize; the scatter below cannot, so it runs as a second loop.
        chunk_weights::<FUSED>(chunk, max, scale, &mut w);
        let mut keys = [0u32; CHUNK];
        let mut significands = [0u32; CHUNK];
        for i in 0..CHUNK {
            let bits = w[i].to_bits();
            keys[i] = (bits >> COARSE_SHIFT) & (HISTOGRAM_SIZE as u32 - 1);
            significands[i] = (bits & 0x007F_FFFF) | 0x0080_0000;
        }
        for i in 0..CHUNK {
            // Zero weights past the row's end land in bucket 0, whose mass counts as 0.
            sums[keys[i] as usize] += u64::from(significands[i]);
        }
    }
}

dispatch! {
    /// Builds the coarse histogram of the weights of `row`, overwriting `histogram`.
    pub fn weights_histogram(row: &[f32], max: f32, scale: f32, histogram: &mut Histogram) -> ()
        => weights_histogram_body
}

#[inline(always)]
fn collect_bucket_body<const FUSED: bool>(
    row: &[f32],
    max: f32,
    scale: f32,
    bucket: u32,
    items: &mut Vec<(u32, u32)>,
) {
    items.clear();
    let mut w = [0.0f32; CHUNK];
    for (chunk_index, chunk) in row.chunks(CHUNK).enumerate() {
        chunk_weights::<FUSED>(chunk, max, scale, &mut w);
        let in_bucket = |value: &f32| value.to_bits() >> COARSE_SHIFT == bucket;
        if w.iter().fold(false, |hit, value| hit | in_bucket(value)) {
            for (offset, value) in w.iter().enumerate().take(chunk.len()) {
                if in_bucket(value) {
                    items.push((value.to_bits(), (chunk_index * CHUNK + offset) as u32));
                }
            }
        }
    }
}

dispatch! {
    /// Writes to `items` the (weight bits, id) of the tokens of `row` in coarse histogram
    /// bucket `bucket`, in id order.
    pub fn collect_bucket(
        row: &[f32],
        max: f32,
        scale: f32,
        bucket: u32,
        items: &mut Vec<(u32, u32)>
    ) -> () => collect_bucket_body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::draw::nth_with_bits;

    fn test_row() -> Vec<f32> {
        (0..3001)
            .map(|i| ((i * 7919) % 1000) as f32 * -0.01)
            .collect()
    }

    #[test]
    fn sums_agree_with_naive_reference() {
        let row = test_row();
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut w = Vec::new();
        weights(&row, max, 0.5, &mut w);
        assert_eq!(w.len(), row.len());
        let naive: f64 = w.iter().map(|&x| f64::from(x)).sum();
        let exact: f64 = row.iter().map(|&x| (f64::from(x - max) * 0.5).exp()).sum();
        assert!((naive - exact).abs() < 1e-6 * exact, "{naive} vs {exact}");

        let mut histogram = Histogram::new();
        weights_histogram(&row, max, 0.5, &mut histogram);
        let mut masses = Vec::new();
        histogram.masses(&mut masses);
        // The histogram's integer sums are exact; the chunk sums are f32 trees of 64 values.
        let histogram_total: f64 = masses.iter().sum();
        assert!(
            (histogram_total - naive).abs() < 1e-12 * naive,
            "{histogram_total} vs {naive}"
        );
        let total = weight_sum(&row, max, 0.5, 0);
        assert!((total - naive).abs() < 1e-6 * naive, "{total} vs {naive}");
        let above_half = weight_sum(&row, max, 0.5, 0.5f32.to_bits());
        let naive_above: f64 = w.iter().filter(|&&x| x > 0.5).map(|&x| f64::from(x)).sum();
        assert!((above_half - naive_above).abs() < 1e-6 * naive_above);
    }

    #[test]
    fn bucket_and_ties_match_weights() {
        let row = test_row();
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut w = Vec::new();
        weights(&row, max, 1.0, &mut w);
        let bucket = w[100].to_bits() >> COARSE_SHIFT;
        let mut items = Vec::new();
        collect_bucket(&row, max, 1.0, bucket, &mut items);
        let expected: Vec<(u32, u32)> = (0..row.len())
            .filter(|&i| w[i].to_bits() >> COARSE_SHIFT == bucket)
            .map(|i| (w[i].to_bits(), i as u32))
            .collect();
        assert_eq!(items, expected);

        let bits = w[100].to_bits();
        let same: Vec<u32> = (0..row.len() as u32)
            .filter(|&i| w[i as usize].to_bits() == bits)
            .collect();
        for (rank, &id) in same.iter().enumerate() {
            assert_eq!(nth_with_bits(&row, max, 1.0, bits, rank), Some(id));
        }
        assert_eq!(nth_with_bits(&row, max, 1.0, bits, same.len()), None);
    }
}
