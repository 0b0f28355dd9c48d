//! Selection without sorting the vocabulary: the k best logits by a streaming threshold, and
//! the top-p cut by a radix select over the weights' bit patterns.

use std::cmp::Ordering;

use crate::kernels::{collect_bucket, Histogram, COARSE_SHIFT, LANES};
use crate::simd::dispatch;

/// A token and its logit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub logit: f32,
    pub id: u32,
}

/// Orders candidates best first: higher logit, then lower id. Logits are never NaN here.
pub fn by_rank(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit.partial_cmp(&a.logit).unwrap_or(Ordering::Equal).then(a.id.cmp(&b.id))
}

/// Smallest candidate buffer, so that a small k does not cut the buffer down at every
/// admission.
const MIN_BUFFER: usize = 64;

/// Keeps the `k` best of `buffer` (by [`by_rank`]) and returns the worst kept logit.
fn keep_best(buffer: &mut Vec<Candidate>, k: usize) -> f32 {
    if buffer.len() > k {
        buffer.select_nth_unstable_by(k - 1, by_rank);
        buffer.truncate(k);
    }
    buffer.iter().fold(f32::INFINITY, |m, c| m.min(c.logit))
}

/// Candidates of a streaming top-k: once cut down to the `k` best, it admits only logits
/// above the worst of them. An equal logit met later has a higher id, so it can never
/// displace a kept one.
struct TopKBuffer<'a> {
    items: &'a mut Vec<Candidate>,
    k: usize,
    capacity: usize,
    /// Worst kept logit after the first cut; `None` before it, when everything is admitted.
    threshold: Option<f32>,
}

impl TopKBuffer<'_> {
    #[inline(always)]
    fn admits(&self, x: f32) -> bool {
        self.threshold.is_none_or(|threshold| x > threshold)
    }

    /// Bit i is set when the buffer admits `block[i]`.
    #[inline(always)]
    fn admitted(&self, block: &[f32; BLOCK]) -> u64 {
        let Some(threshold) = self.threshold else {
            return u64::MAX;
        };
        let mut mask = 0u64;
        for (i, &x) in block.iter().enumerate() {
            mask |= u64::from(x > threshold) << i;
        }
        mask
    }

    #[inline(always)]
    fn push(&mut self, x: f32, id: usize) {
        self.items.push(Candidate { logit: x, id: id as u32 });
        if self.items.len() >= self.capacity {
            self.threshold = Some(keep_best(self.items, self.k));
        }
    }

    #[inline(always)]
    fn consider(&mut self, x: f32, id: usize) {
        if self.admits(x) {
            self.push(x, id);
        }
    }

    /// Considers a whole block, visiting only the logits above the threshold.
    #[inline(always)]
    fn consider_block(&mut self, block: &[f32; BLOCK], start: usize) {
        let mut pending = self.admitted(block);
        while pending != 0 {
            let offset = pending.trailing_zeros() as usize;
            pending &= pending - 1;
            let before = self.threshold;
            self.push(block[offset], start + offset);
            if self.threshold != before {
                // The cut raised the threshold: drop the logits it no longer admits.
                pending &= self.admitted(block);
            }
        }
    }
}

/// Logits whose maximum is checked at once before looking at them one by one.
const BLOCK: usize = 64;

/// Maximum of a block, as a tree of lane-wise maxima so that it vectorizes.
#[inline(always)]
fn block_max(block: &[f32; BLOCK]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for group in 0..BLOCK / LANES {
        for lane in 0..LANES {
            let x = block[group * LANES + lane];
            lanes[lane] = if x > lanes[lane] { x } else { lanes[lane] };
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for lane in 0..width {
            let x = lanes[lane + width];
            lanes[lane] = if x > lanes[lane] { x } else { lanes[lane] };
        }
        width /= 2;
    }
    lanes[0]
}

#[inline(always)]
fn top_k_body<const FUSED: bool>(row: &[f32], k: usize, out: &mut Vec<Candidate>) {
    out.clear();
    if k == 0 {
        return;
    }
    let mut buffer = TopKBuffer { items: out, k, capacity: (2 * k).max(MIN_BUFFER), threshold: None };

    let mut blocks = row.chunks_exact(BLOCK);
    for (block_index, block) in blocks.by_ref().enumerate() {
        let Ok(block) = <&[f32; BLOCK]>::try_from(block) else { continue };
        if buffer.admits(block_max(block)) {
            buffer.consider_block(block, block_index * BLOCK);
        }
    }
    let tail_start = row.len() - blocks.remainder().len();
    for (offset, &x) in blocks.remainder().iter().enumerate() {
        buffer.consider(x, tail_start + offset);
    }

    keep_best(out, k);
    out.sort_unstable_by(by_rank);
}

dispatch! {
    /// Writes to `out` the `k` best tokens of `row` (higher logit first, ties to the lower
    /// id), sorted best first. `row` must not contain NaN and `k` must be at most `row.len()`.
    ///
    /// One pass over the row; a block of logits whose maximum the buffer would not admit is
    /// skipped after one comparison.
    pub fn top_k_by_logit(row: &[f32], k: usize, out: &mut Vec<Candidate>) -> () => top_k_body
}

/// The members of a row after top-p (and min-p): every token whose weight's bit pattern is
/// above `threshold_bits`, plus the first `tie_quota` tokens (in id order) whose weight's bit
/// pattern equals it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    pub threshold_bits: u32,
    pub tie_quota: usize,
}

impl Cut {
    /// Every token with a positive weight.
    pub const ALL_POSITIVE: Cut = Cut { threshold_bits: 0, tie_quota: 0 };

    /// Every token whose weight is at least `min_weight` (a positive float).
    pub fn at_least(min_weight: f32) -> Cut {
        Cut { threshold_bits: min_weight.to_bits().saturating_sub(1), tie_quota: 0 }
    }
}

/// Bit fields refined after the coarse histogram: (shift, width in bits). Together with
/// [`COARSE_SHIFT`] they cover all 32 bits of a weight.
const FINE_LEVELS: [(u32, u32); 2] = [(8, COARSE_SHIFT - 8), (0, 8)];

/// Below this many items the last step sorts them instead of building another histogram.
const SORT_LIMIT: usize = 64;

/// A top-p cut and the weight it keeps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopP {
    pub cut: Cut,
    /// Sum of the weights strictly above the cut's threshold (the ties not included).
    pub strict_mass: f64,
    /// Sum of all the row's weights.
    pub total: f64,
}

/// Finds the smallest set of top-ranked tokens (weight descending, ties to the lower id)
/// whose weights sum to at least `top_p` times the total weight, keeping at least one token.
///
/// The weights are exp((x - max) * scale) over `row`, in [0, 1], and `histogram` is their
/// coarse histogram from `kernels::weights_histogram`; `masses` and `items` are scratch
/// buffers. Weights are non-negative, so their bit patterns sort like their values: the cut
/// is found bucket by bucket on those bits (a radix select), never sorting more than a few
/// items.
pub fn top_p_cut(
    row: &[f32],
    max: f32,
    scale: f32,
    histogram: &Histogram,
    top_p: f64,
    masses: &mut Vec<f64>,
    items: &mut Vec<(u32, u32)>,
) -> TopP {
    // 1. Coarse bucket where the running mass, from the heaviest bucket down, reaches target.
    histogram.masses(masses);
    let total: f64 = masses.iter().rev().sum();
    let target = top_p * total;
    let (crossing, mut above) = find_crossing(masses, 0.0, target);

    // 2. That bucket's tokens, in id order.
    collect_bucket(row, max, scale, crossing as u32, items);

    // 3. Narrow down by finer bit fields while there are many items.
    for (shift, width) in FINE_LEVELS {
        if items.len() <= SORT_LIMIT {
            break;
        }
        above = narrow(items, shift, width, above, target);
    }

    // 4. Sort the rest (heavier first; the stable sort keeps id order among equal weights)
    //    and take tokens until the mass reaches target.
    items.sort_by(|a, b| b.0.cmp(&a.0));
    let mut threshold_bits = items.first().map_or(0, |item| item.0);
    let mut strict_mass = above;
    let mut tie_quota = 0;
    for &(bits, _) in items.iter() {
        if bits != threshold_bits {
            threshold_bits = bits;
            strict_mass = above;
            tie_quota = 0;
        }
        above += f64::from(f32::from_bits(bits));
        tie_quota += 1;
        if above >= target {
            break;
        }
    }
    TopP { cut: Cut { threshold_bits, tie_quota }, strict_mass, total }
}

/// Returns the first bucket of positive mass, from the highest down, at which `above` plus
/// the running mass reaches `target`, and the mass above it plus `above`. If rounding leaves
/// the target out of reach, returns the lowest bucket of positive mass, so that the caller
/// keeps everything.
fn find_crossing(mass: &[f64], above: f64, target: f64) -> (usize, f64) {
    let mut above = above;
    let mut found = (0, above);
    for bucket in (0..mass.len()).rev() {
        if mass[bucket] <= 0.0 {
            continue;
        }
        found = (bucket, above);
        if above + mass[bucket] >= target {
            break;
        }
        above += mass[bucket];
    }
    found
}

/// Keeps the items of the sub-bucket (bits `shift..shift + width`) where the running mass
/// reaches `target`, and returns the mass of the heavier sub-buckets plus `above`.
fn narrow(items: &mut Vec<(u32, u32)>, shift: u32, width: u32, above: f64, target: f64) -> f64 {
    let mask = (1u32 << width) - 1;
    let mut mass = vec![0.0f64; 1 << width];
    for &(bits, _) in items.iter() {
        mass[((bits >> shift) & mask) as usize] += f64::from(f32::from_bits(bits));
    }
    let (crossing, above) = find_crossing(&mass, above, target);
    items.retain(|&(bits, _)| ((bits >> shift) & mask) as usize == crossing);
    above
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::weights_histogram;

    fn reference_top_k(row: &[f32], k: usize) -> Vec<Candidate> {
        let mut all: Vec<Candidate> =
            row.iter().enumerate().map(|(id, &logit)| Candidate { logit, id: id as u32 }).collect();
        all.sort_by(by_rank);
        all.truncate(k);
        all
    }

    #[test]
    fn top_k_matches_sort_with_ties() {
        // Few distinct values, so ties straddle the k-th place.
        let row: Vec<f32> = (0..5000).map(|i| ((i * 7_919) % 13) as f32).collect();
        let mut out = Vec::new();
        for k in [1, 2, 50, 384, 385, 1500, 4999, 5000] {
            top_k_by_logit(&row, k, &mut out);
            assert_eq!(out, reference_top_k(&row, k), "k = {k}");
        }
    }

    #[test]
    fn top_k_handles_ascending_rows_and_neg_inf() {
        let ascending: Vec<f32> = (0..3000).map(|i| i as f32).collect();
        let mut out = Vec::new();
        top_k_by_logit(&ascending, 10, &mut out);
        assert_eq!(out, reference_top_k(&ascending, 10));

        let mut sparse = vec![f32::NEG_INFINITY; 40];
        sparse[30] = 1.0;
        top_k_by_logit(&sparse, 3, &mut out);
        let ids: Vec<u32> = out.iter().map(|c| c.id).collect();
        assert_eq!(ids, [30, 0, 1]);
    }

    fn cut_of(row: &[f32], p: f64) -> (Cut, f64) {
        let mut histogram = Histogram::new();
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        weights_histogram(row, max, 1.0, &mut histogram);
        let top_p = top_p_cut(row, max, 1.0, &histogram, p, &mut Vec::new(), &mut Vec::new());
        (top_p.cut, top_p.total)
    }

    #[test]
    fn top_p_cut_of_equal_weights_counts_ties_by_id() {
        let row = vec![0.0f32; 1000];
        let (cut, _) = cut_of(&row, 0.25);
        assert_eq!(cut, Cut { threshold_bits: 1.0f32.to_bits(), tie_quota: 250 });
        let (cut, _) = cut_of(&row, 0.0);
        assert_eq!(cut.tie_quota, 1);
        let (cut, _) = cut_of(&row, 1.0);
        assert_eq!(cut.tie_quota, 1000);
    }

    #[test]
    fn top_p_cut_keeps_the_single_best_for_tiny_p() {
        let row: Vec<f32> = (0..10_000).map(|i| -((i * 31 % 10_000) as f32) * 1e-3).collect();
        let (cut, _) = cut_of(&row, 1e-9);
        assert_eq!(cut, Cut { threshold_bits: 1.0f32.to_bits(), tie_quota: 1 });
    }

    #[test]
    fn cut_at_least_admits_the_bound() {
        let cut = Cut::at_least(0.25);
        assert!(0.25f32.to_bits() > cut.threshold_bits);
        assert!(0.249_999_98f32.to_bits() <= cut.threshold_bits);
    }
}
