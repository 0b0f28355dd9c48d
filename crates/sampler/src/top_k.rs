//! The k best logits of a row without sorting it: a candidate buffer with a rising admission
//! threshold, checked a block of logits at a time.

use std::cmp::Ordering;

use crate::kernels::LANES;
use crate::simd::dispatch;

/// A token and its logit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub logit: f32,
    pub id: u32,
}

/// Orders candidates best first: higher logit, then lower id. Logits are never NaN here.
pub fn by_rank(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit
        .partial_cmp(&a.logit)
        .unwrap_or(Ordering::Equal)
        .then(a.id.cmp(&b.id))
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
pub(crate) struct TopKBuffer<'a> {
    items: &'a mut Vec<Candidate>,
    k: usize,
    capacity: usize,
    /// Worst kept logit after the first cut; `None` before it, when everything is admitted.
    threshold: Option<f32>,
}

impl<'a> TopKBuffer<'a> {
    /// Starts a buffer for the `k` best (`k` >= 1) in `items`, which it clears.
    #[inline(always)]
    pub fn new(items: &'a mut Vec<Candidate>, k: usize) -> Self {
        items.clear();
        TopKBuffer {
            items,
            k,
            capacity: (2 * k).max(MIN_BUFFER),
            threshold: None,
        }
    }

    /// Keeps the `k` best of what was considered, sorted best first.
    #[inline(always)]
    pub fn finish(self) {
        keep_best(self.items, self.k);
        self.items.sort_unstable_by(by_rank);
    }

    #[inline(always)]
    pub fn admits(&self, x: f32) -> bool {
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
        self.items.push(Candidate {
            logit: x,
            id: id as u32,
        });
        if self.items.len() >= self.capacity {
            self.threshold = Some(keep_best(self.items, self.k));
        }
    }

    #[inline(always)]
    pub fn consider(&mut self, x: f32, id: usize) {
        if self.admits(x) {
            self.push(x, id);
        }
    }

    /// Considers a whole block, visiting only the logits above the threshold.
    #[inline(always)]
    pub fn consider_block(&mut self, block: &[f32; BLOCK], start: usize) {
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
pub const BLOCK: usize = 64;

/// Maximum of a block, as a tree of lane-wise maxima so that it vectorizes.
#[inline(always)]
pub fn block_max(block: &[f32; BLOCK]) -> f32 {
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

#[cfg(test)]
#[inline(always)]
fn top_k_body<const FUSED: bool>(row: &[f32], k: usize, out: &mut Vec<Candidate>) {
    if k == 0 {
        out.clear();
        return;
    }
    let mut buffer = TopKBuffer::new(out, k);

    let mut blocks = row.chunks_exact(BLOCK);
    for (block_index, block) in blocks.by_ref().enumerate() {
        let Ok(block) = <&[f32; BLOCK]>::try_from(block) else {
            continue;
        };
        if buffer.admits(block_max(block)) {
            buffer.consider_block(block, block_index * BLOCK);
        }
    }
    let tail_start = row.len() - blocks.remainder().len();
    for (offset, &x) in blocks.remainder().iter().enumerate() {
        buffer.consider(x, tail_start + offset);
    }

    buffer.finish();
}

dispatch! {
    #[cfg(test)]
    /// Writes to `out` the `k` best tokens of `row` (higher logit first, ties to the lower
    /// id), sorted best first. `row` must not contain NaN and `k` must be at most `row.len()`.
    ///
    /// One pass over the row; a block of logits whose maximum the buffer would not admit is
    /// skipped after one comparison.
    pub fn top_k_by_logit(row: &[f32], k: usize, out: &mut Vec<Candidate>) -> () => top_k_body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_top_k(row: &[f32], k: usize) -> Vec<Candidate> {
        let mut all: Vec<Candidate> = row
            .iter()
            .enumerate()
            .map(|(id, &logit)| Candidate {
                logit,
                id: id as u32,
            })
            .collect();
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
}
