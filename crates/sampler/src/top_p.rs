//! The top-p set of a row without sorting it: a radix select over the bit patterns of the
//! weights.

use crate::kernels::{collect_bucket, Histogram, COARSE_SHIFT};

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
    pub const ALL_POSITIVE: Cut = Cut {
        threshold_bits: 0,
        tie_quota: 0,
    };

    /// Returns the cut that keeps every token whose weight is at least `min_weight` (a
    /// positive float).
    pub fn at_least(min_weight: f32) -> Cut {
        Cut {
            threshold_bits: min_weight.to_bits().saturating_sub(1),
            tie_quota: 0,
        }
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
/// coarse histogram from `kernels::weights_histogram`. `masses` and `items` are scratch
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
    items.sort_by_key(|&(bits, _)| std::cmp::Reverse(bits));
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
    TopP {
        cut: Cut {
            threshold_bits,
            tie_quota,
        },
        strict_mass,
        total,
    }
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

    fn cut_of(row: &[f32], p: f64) -> (Cut, f64) {
        let mut histogram = Histogram::new();
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        weights_histogram(row, max, 1.0, &mut histogram);
        let top_p = top_p_cut(
            row,
            max,
            1.0,
            &histogram,
            p,
            &mut Vec::new(),
            &mut Vec::new(),
        );
        (top_p.cut, top_p.total)
    }

    #[test]
    fn top_p_cut_counts_ties_by_id() {
        let row = vec![0.0f32; 1000];
        let (cut, _) = cut_of(&row, 0.25);
        assert_eq!(
            cut,
            Cut {
                threshold_bits: 1.0f32.to_bits(),
                tie_quota: 250
            }
        );
        let (cut, _) = cut_of(&row, 0.0);
        assert_eq!(cut.tie_quota, 1);
        let (cut, _) = cut_of(&row, 1.0);
        assert_eq!(cut.tie_quota, 1000);
    }

    #[test]
    fn top_p_cut_tiny_p_keeps_best() {
        let row: Vec<f32> = (0..10_000)
            .map(|i| -((i * 31 % 10_000) as f32) * 1e-3)
            .collect();
        let (cut, _) = cut_of(&row, 1e-9);
        assert_eq!(
            cut,
            Cut {
                threshold_bits: 1.0f32.to_bits(),
                tie_quota: 1
            }
        );
    }

    #[test]
    fn cut_at_least_admits_the_bound() {
        let cut = Cut::at_least(0.25);
        assert!(0.25f32.to_bits() > cut.threshold_bits);
        assert!(0.249_999_98f32.to_bits() <= cut.threshold_bits);
    }
}
