//! Draws by inversion over chunk sums, and the ranking checks the top-p draw needs.

use crate::kernels::{chunk_weights, mask_weights, tree_sum, CHUNK};
use crate::simd::{dispatch, exp_non_positive};

/// Finds the element of `values` (non-negative, with a positive sum) whose interval contains
/// `target` when the intervals are laid out in the order of [`tree_sum`]'s tree. From the
/// root down, it goes to the left child when `target` is below its sum, else subtracts that
/// sum and goes right. Children of sum 0 are never entered, so the element found has a
/// positive value.
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
pub fn draw_from_sums(
    row: &[f32],
    max: f32,
    scale: f32,
    above_bits: u32,
    sums: &[f32],
    target: f64,
) -> Scan {
    let mut mass = 0.0f64;
    let mut last_positive_chunk = None;
    for (chunk_index, &sum) in sums.iter().enumerate() {
        let chunk_mass = f64::from(sum);
        if mass + chunk_mass > target {
            let start = chunk_index * CHUNK;
            let chunk = row
                .get(start..(start + CHUNK).min(row.len()))
                .unwrap_or(&[]);
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
        chunk_weights::<FUSED>(
            &row[start..(start + CHUNK).min(row.len())],
            max,
            scale,
            &mut w,
        );
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
        let chunk_max = chunk_maxima
            .get(chunk_index)
            .copied()
            .unwrap_or(f32::INFINITY);
        if weight_of(chunk_max).to_bits().saturating_add(1) < bits {
            continue;
        }
        chunk_weights::<FUSED>(chunk, max, scale, &mut w);
        heavier += f64::from(tree_sum(&mask_weights(&w, bits)));
        let start = chunk_index * CHUNK;
        if start < token {
            let end = (token - start).min(chunk.len());
            ties += w[..end]
                .iter()
                .filter(|value| value.to_bits() == bits)
                .count();
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
    /// the result. `chunk_maxima` contains each chunk's largest logit (`&[]` if unknown), to
    /// skip the chunks whose weights are all lighter than the token's.
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
    use crate::kernels::{chunk_sums, weight_sum, weights};

    fn test_row() -> Vec<f32> {
        (0..3001)
            .map(|i| ((i * 7919) % 1000) as f32 * -0.01)
            .collect()
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
            let expected = if w[id].to_bits() > above {
                f64::from(w[id]) / total * targets as f64
            } else {
                0.0
            };
            assert!(
                (count as f64 - expected).abs() <= 2.0,
                "token {id}: {count} hits, expected {expected}"
            );
        }
        assert!(matches!(
            draw_scan(row, max, 1.0, above, total),
            Scan::Short(Some(_))
        ));

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
        assert_eq!(
            draw_from_sums(row, max, 1.0, above, &sums, total),
            draw_scan(row, max, 1.0, above, total)
        );
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
        let chunk_maxima: Vec<f32> = row
            .chunks(CHUNK)
            .map(|c| c.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)))
            .collect();
        for token in [0, 10, 500, 2000, 2999] {
            let heavier: f64 = w
                .iter()
                .filter(|&&x| x > w[token])
                .map(|&x| f64::from(x))
                .sum();
            let ties = w[..token]
                .iter()
                .filter(|&&x| x.to_bits() == w[token].to_bits())
                .count();
            let before = heavier + ties as f64 * f64::from(w[token]);
            for fraction in [0.01, 0.3, 0.6, 0.9, 0.999] {
                let target = fraction * total;
                // Away from the boundary, where rounding cannot decide.
                if (before - target).abs() > 1e-6 * total {
                    for maxima in [&chunk_maxima[..], &[]] {
                        let within = ranked_within(&row, max, 1.0, token, target, &sums, maxima);
                        assert_eq!(
                            within,
                            before < target,
                            "token {token}, target {target}, before {before}"
                        );
                    }
                }
            }
        }
    }
}
