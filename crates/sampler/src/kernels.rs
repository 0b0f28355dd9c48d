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
pub(crate) fn chunk_weights<const FUSED: bool>(chunk: &[f32], max: f32, scale: f32, w: &mut [f32; CHUNK]) {
    if let Ok(full) = <&[f32; CHUNK]>::try_from(chunk) {
        for i in 0..CHUNK {
            w[i] = exp_non_positive::<FUSED>((full[i] - max) * scale);
        }
    } else {
        for (i, out) in w.iter_mut().enumerate() {
            *out = chunk.get(i).map_or(0.0, |&x| exp_non_positive::<FUSED>((x - max) * scale));
        }
    }
}

/// Keeps the weights whose bit pattern is above `above_bits` (for non-negative floats, bit
/// order is numeric order) and zeroes the others.
#[inline(always)]
fn mask_weights(w: &[f32; CHUNK], above_bits: u32) -> [f32; CHUNK] {
    let mut masked = [0.0f32; CHUNK];
    for i in 0..CHUNK {
        masked[i] = if w[i].to_bits() > above_bits { w[i] } else { 0.0 };
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
/// chains short and lets [`descend`] invert the sum exactly as it was computed.
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

/// Finds the element of `values` (non-negative, with a positive sum) whose interval contains
/// `target` when the intervals are laid out in the order of [`tree_sum`]'s tree: descending
/// from the root, go to the left child when `target` is below its sum, else subtract it and
/// go right. Children of sum 0 are never entered, so the element found has a positive value.
fn descend(values: &[f32; CHUNK], target: f64) -> usize {
    // The levels one after another: the values, then each level of sums up to the root.
    let mut tree = [0.0f32; 2 * CHUNK];
    tree[..CHUNK].copy_from_slice(values);
    let (mut start, mut width) = (0, CHUNK / 2);
    while width > 0 {
        let next = start + 2 * width;
        for i in 0..width {
            tree[next + i] = tree[start + i] + tree[start + i + width];
        }
        start = next;
        width /= 2;
    }

    // Back down: `start` is the root's level; its children are `2 * width` entries before.
    let mut target = target;
    let mut node = 0;
    let mut width = 1;
    while start > 0 {
        let children = start - 2 * width;
        let (left, right) = (tree[children + node], tree[children + node + width]);
        let go_left = right <= 0.0 || (left > 0.0 && target < f64::from(left));
        if !go_left {
            target -= f64::from(left);
            node += width;
        }
        start = children;
        width *= 2;
    }
    node
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
    /// that [`draw_from_sums`] can find the chunk of a draw without recomputing weights.
    pub fn chunk_sums(row: &[f32], max: f32, scale: f32, above_bits: u32, sums: &mut Vec<f32>) -> f64
        => chunk_sums_body
}

#[inline(always)]
fn masked_chunk_weights_body<const FUSED: bool>(
    chunk: &[f32],
    max: f32,
    scale: f32,
    above_bits: u32,
) -> [f32; CHUNK] {
    let mut w = [0.0f32; CHUNK];
    chunk_weights::<FUSED>(chunk, max, scale, &mut w);
    mask_weights(&w, above_bits)
}

dispatch! {
    /// Returns the weights of one chunk above `above_bits`, zero elsewhere and past its end.
    fn masked_chunk_weights(chunk: &[f32], max: f32, scale: f32, above_bits: u32) -> [f32; CHUNK]
        => masked_chunk_weights_body
}

/// Finds the token whose interval contains `target` like `draw_scan` (kept as the tests'
/// reference), from the chunk sums
/// that [`chunk_sums`] wrote for the same `row`, `max`, `scale` and `above_bits`: only the
/// chunk that contains the target has its weights computed.
pub fn draw_from_sums(row: &[f32], max: f32, scale: f32, above_bits: u32, sums: &[f32], target: f64) -> Scan {
    let mut mass = 0.0f64;
    let mut last_positive_chunk = None;
    for (chunk_index, &sum) in sums.iter().enumerate() {
        let chunk_mass = f64::from(sum);
        if mass + chunk_mass > target {
            let start = chunk_index * CHUNK;
            let chunk = row.get(start..(start + CHUNK).min(row.len())).unwrap_or(&[]);
            let masked = masked_chunk_weights(chunk, max, scale, above_bits);
            return Scan::Token((start + descend(&masked, target - mass)) as u32);
        }
        mass += chunk_mass;
        if chunk_mass > 0.0 {
            last_positive_chunk = Some(chunk_index);
        }
    }
    let last = last_positive_chunk.and_then(|chunk_index| {
        let start = chunk_index * CHUNK;
        let chunk = row.get(start..(start + CHUNK).min(row.len()))?;
        let masked = masked_chunk_weights(chunk, max, scale, above_bits);
        let offset = masked.iter().rposition(|&value| value > 0.0)?;
        Some((start + offset) as u32)
    });
    Scan::Short(last)
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
        Self { significand_sums: vec![0; HISTOGRAM_SIZE] }
    }

    /// Writes the sum of the weights in each bucket to `out`. Buckets of biased exponent 0
    /// hold only zero weights (subnormal ones are flushed), so their mass is 0.
    pub fn masses(&self, out: &mut Vec<f64>) {
        out.clear();
        out.extend(self.significand_sums.iter().enumerate().map(|(bucket, &sum)| {
            let biased_exponent = (bucket as u64) >> (23 - COARSE_SHIFT);
            if biased_exponent == 0 {
                return 0.0;
            }
            // A significand s of a float with biased exponent e is worth s * 2^(e - 150).
            let scale = f64::from_bits((biased_exponent + 1023 - 150) << 52);
            sum as f64 * scale
        }));
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

/// Result of a draw over chunk sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// The token whose interval contains the target.
    Token(u32),
    /// The members' weights added up to no more than the target (a target of at least
    /// their total). Holds the last member of positive weight, if any.
    Short(Option<u32>),
}

#[cfg(test)]
#[inline(always)]
fn draw_scan_body<const FUSED: bool>(
    row: &[f32],
    max: f32,
    scale: f32,
    above_bits: u32,
    target: f64,
) -> Scan {
    let mut w = [0.0f32; CHUNK];
    let mut mass = 0.0f64;
    let mut last_positive_chunk = None;
    for (chunk_index, chunk) in row.chunks(CHUNK).enumerate() {
        chunk_weights::<FUSED>(chunk, max, scale, &mut w);
        let masked = mask_weights(&w, above_bits);
        let chunk_mass = f64::from(tree_sum(&masked));
        if mass + chunk_mass > target {
            return Scan::Token((chunk_index * CHUNK + descend(&masked, target - mass)) as u32);
        }
        mass += chunk_mass;
        if chunk_mass > 0.0 {
            last_positive_chunk = Some(chunk_index);
        }
    }
    let last = last_positive_chunk.and_then(|chunk_index| {
        let start = chunk_index * CHUNK;
        chunk_weights::<FUSED>(&row[start..(start + CHUNK).min(row.len())], max, scale, &mut w);
        let offset = w.iter().rposition(|value| value.to_bits() > above_bits)?;
        Some((start + offset) as u32)
    });
    Scan::Short(last)
}

dispatch! {
    #[cfg(test)]
    /// Lays the weights of the tokens of `row` whose weight's bit pattern is above
    /// `above_bits` end to end, chunk by chunk in id order, and finds the token whose interval
    /// contains `target`. Sums match [`weight_sum`] bit for bit, so a target below its total
    /// always finds one.
    pub fn draw_scan(row: &[f32], max: f32, scale: f32, above_bits: u32, target: f64) -> Scan
        => draw_scan_body
}

#[inline(always)]
fn ranked_within_body<const FUSED: bool>(
    row: &[f32],
    max: f32,
    scale: f32,
    token: usize,
    target: f64,
    sums: &[f32],
    chunk_maxima: &[f32],
) -> bool {
    let weight_of = |x: f32| exp_non_positive::<FUSED>((x - max) * scale);
    let weight = row.get(token).map_or(0.0, |&x| weight_of(x));
    let bits = weight.to_bits();
    let total: f64 = sums.iter().map(|&sum| f64::from(sum)).sum();
    let mut w = [0.0f32; CHUNK];
    let (mut heavier, mut scanned, mut ties) = (0.0f64, 0.0f64, 0usize);
    for ((chunk_index, chunk), &chunk_sum) in row.chunks(CHUNK).enumerate().zip(sums) {
        scanned += f64::from(chunk_sum);
        // A chunk whose largest weight is below the token's, by more than the one ulp the
        // polynomial exponential may lose to rounding, adds nothing heavier and no tie.
        let chunk_max = chunk_maxima.get(chunk_index).copied().unwrap_or(f32::INFINITY);
        if weight_of(chunk_max).to_bits().saturating_add(1) < bits {
            continue;
        }
        chunk_weights::<FUSED>(chunk, max, scale, &mut w);
        heavier += f64::from(tree_sum(&mask_weights(&w, bits)));
        let start = chunk_index * CHUNK;
        if start < token {
            let end = (token - start).min(chunk.len());
            ties += w[..end].iter().filter(|value| value.to_bits() == bits).count();
        }

        // Stop as soon as the rest of the row cannot change the result.
        let before = heavier + ties as f64 * f64::from(weight);
        if before >= target {
            return false;
        }
        if before + (total - scanned) < target {
            return true;
        }
    }
    true
}

dispatch! {
    /// Returns whether the tokens ranked before token `token` of `row` (by weight
    /// exp((x - max) * scale) descending, ties to the lower id) weigh less than `target`.
    /// `sums` must be the chunk sums of every positive weight (from [`chunk_sums`] with
    /// `above_bits` 0), so that the pass can stop once the weight not yet seen cannot change
    /// the result. `chunk_maxima` holds each chunk's largest logit (`&[]` if unknown), to skip
    /// the chunks whose weights are all lighter than the token's.
    pub fn ranked_within(
        row: &[f32],
        max: f32,
        scale: f32,
        token: usize,
        target: f64,
        sums: &[f32],
        chunk_maxima: &[f32]
    ) -> bool => ranked_within_body
}

#[inline(always)]
fn nth_with_bits_body<const FUSED: bool>(
    row: &[f32],
    max: f32,
    scale: f32,
    bits: u32,
    rank: usize,
) -> Option<u32> {
    let mut w = [0.0f32; CHUNK];
    let mut seen = 0;
    for (chunk_index, chunk) in row.chunks(CHUNK).enumerate() {
        chunk_weights::<FUSED>(chunk, max, scale, &mut w);
        for (offset, value) in w.iter().enumerate().take(chunk.len()) {
            if value.to_bits() == bits {
                if seen == rank {
                    return Some((chunk_index * CHUNK + offset) as u32);
                }
                seen += 1;
            }
        }
    }
    None
}

dispatch! {
    /// Returns the id of the `rank`-th token (from 0, in id order) whose weight has `bits`.
    pub fn nth_with_bits(row: &[f32], max: f32, scale: f32, bits: u32, rank: usize) -> Option<u32>
        => nth_with_bits_body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_row() -> Vec<f32> {
        (0..3001).map(|i| ((i * 7919) % 1000) as f32 * -0.01).collect()
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
        assert!((histogram_total - naive).abs() < 1e-12 * naive, "{histogram_total} vs {naive}");
        let total = weight_sum(&row, max, 0.5, 0);
        assert!((total - naive).abs() < 1e-6 * naive, "{total} vs {naive}");
        let above_half = weight_sum(&row, max, 0.5, 0.5f32.to_bits());
        let naive_above: f64 = w.iter().filter(|&&x| x > 0.5).map(|&x| f64::from(x)).sum();
        assert!((above_half - naive_above).abs() < 1e-6 * naive_above);
    }

    #[test]
    fn draw_scan_intervals_match_weights() {
        // Two full chunks and a partial one.
        let row = &test_row()[..2 * CHUNK + 100];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut w = Vec::new();
        weights(row, max, 1.0, &mut w);
        let above = 0.9f32.to_bits();
        let total = weight_sum(row, max, 1.0, above);

        // Evenly spaced targets hit each member a number of times proportional to its weight.
        let targets = 20_000;
        let mut hits = vec![0usize; row.len()];
        for i in 0..targets {
            let target = (i as f64 + 0.5) / targets as f64 * total;
            match draw_scan(row, max, 1.0, above, target) {
                Scan::Token(token) => hits[token as usize] += 1,
                Scan::Short(_) => panic!("target {target} below the total {total} not found"),
            }
        }
        for (id, &count) in hits.iter().enumerate() {
            let expected = if w[id].to_bits() > above { f64::from(w[id]) / total * targets as f64 } else { 0.0 };
            assert!((count as f64 - expected).abs() <= 2.0, "token {id}: {count} hits, expected {expected}");
        }
        assert!(matches!(draw_scan(row, max, 1.0, above, total), Scan::Short(Some(_))));

        // Drawing from stored chunk sums gives the same tokens.
        let mut sums = Vec::new();
        assert_eq!(chunk_sums(row, max, 1.0, above, &mut sums), total);
        for i in 0..500 {
            let target = (i as f64 + 0.5) / 500.0 * total;
            assert_eq!(
                draw_from_sums(row, max, 1.0, above, &sums, target),
                draw_scan(row, max, 1.0, above, target)
            );
        }
        assert_eq!(draw_from_sums(row, max, 1.0, above, &sums, total), draw_scan(row, max, 1.0, above, total));
    }

    #[test]
    fn ranked_within_agrees_with_brute_force() {
        let mut row = test_row();
        row[10] = row[500];
        row[2000] = row[500];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut w = Vec::new();
        weights(&row, max, 1.0, &mut w);
        let mut sums = Vec::new();
        let total = chunk_sums(&row, max, 1.0, 0, &mut sums);
        let chunk_maxima: Vec<f32> =
            row.chunks(CHUNK).map(|c| c.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))).collect();
        for token in [0, 10, 500, 2000, 2999] {
            let heavier: f64 = w.iter().filter(|&&x| x > w[token]).map(|&x| f64::from(x)).sum();
            let ties = w[..token].iter().filter(|&&x| x.to_bits() == w[token].to_bits()).count();
            let before = heavier + ties as f64 * f64::from(w[token]);
            for fraction in [0.01, 0.3, 0.6, 0.9, 0.999] {
                let target = fraction * total;
                // Away from the boundary, where rounding cannot decide.
                if (before - target).abs() > 1e-6 * total {
                    for maxima in [&chunk_maxima[..], &[]] {
                        let within = ranked_within(&row, max, 1.0, token, target, &sums, maxima);
                        assert_eq!(within, before < target, "token {token}, target {target}, before {before}");
                    }
                }
            }
        }
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
        let same: Vec<u32> = (0..row.len() as u32).filter(|&i| w[i as usize].to_bits() == bits).collect();
        for (rank, &id) in same.iter().enumerate() {
            assert_eq!(nth_with_bits(&row, max, 1.0, bits, rank), Some(id));
        }
        assert_eq!(nth_with_bits(&row, max, 1.0, bits, same.len()), None);
    }
}
