//! The filtered distribution of a row (temperature, top-k, top-p, min-p) and the draw from
//! it.

use crate::draw::{draw_from_sums, nth_with_bits, ranked_within, Scan};
use crate::kernels::{chunk_sums, weights, weights_histogram, Histogram};
use crate::params::RowPlan;
use crate::rng;
use crate::simd::exp_non_positive;
use crate::top_k::Candidate;
use crate::top_p::{top_p_cut, Cut};

/// Smallest top_p sampled by rejection: draws from the tokens min-p keeps are accepted when
/// they fall in the top-p set, which happens with probability at least top_p.
pub const REJECTION_MIN_TOP_P: f64 = 0.5;
/// Rejected draws before falling back to computing the top-p set exactly. With top_p >= 0.5
/// all of them are rejected with probability at most 1/8.
const REJECTION_ATTEMPTS: u32 = 3;

/// A row with NaN-free logits and a finite maximum, ready for the filters.
#[derive(Clone, Copy)]
pub struct Prepared<'a> {
    pub row: &'a [f32],
    pub max: f32,
    /// The best tokens of the row, best first (higher logit, ties to the lower id): at
    /// least one for greedy decoding and at least top_k when top-k is on.
    pub candidates: &'a [Candidate],
    /// The largest logit of each chunk of `kernels::CHUNK` logits, or empty.
    pub chunk_maxima: &'a [f32],
}

/// Buffers the filters write to, reused from row to row.
#[derive(Default)]
pub struct Workspace {
    weighted: Vec<(f32, u32)>,
    items: Vec<(u32, u32)>,
    histogram: Histogram,
    masses: Vec<f64>,
    /// Chunk sums of every positive weight, then of the tokens a cut keeps.
    all_sums: Vec<f32>,
    kept_sums: Vec<f32>,
}

/// The tokens left after filtering, with their weights (unnormalized probabilities).
pub enum Support<'a> {
    /// A single token: greedy decoding.
    Single(u32),
    /// The kept top-k candidates as (weight, id), heaviest first, and their total weight.
    Candidates { items: &'a [(f32, u32)], total: f64 },
    /// The tokens of the whole row that a cut keeps, with weights exp((x - max) * scale).
    /// `strict_mass` is the weight of those strictly above the cut's threshold, and
    /// `strict_sums` its chunk sums.
    Row {
        row: &'a [f32],
        max: f32,
        scale: f32,
        cut: Cut,
        strict_mass: f64,
        strict_sums: &'a [f32],
    },
}

/// Keeps the top-k candidates of `row`, then applies top-p and min-p to them. Returns them
/// as (weight, id), heaviest first (ties to the lower id).
fn top_k_support<'a>(
    prepared: Prepared<'_>,
    plan: &RowPlan,
    work: &'a mut Workspace,
) -> Support<'a> {
    let weighted = &mut work.weighted;
    let scale = plan.inv_temperature;

    // 1. Top-k: the first pass kept the candidates; only their weights are computed.
    weighted.clear();
    weighted.extend(
        prepared.candidates[..plan.top_k.min(prepared.candidates.len())]
            .iter()
            .map(|c| {
                (
                    exp_non_positive::<false>((c.logit - prepared.max) * scale),
                    c.id,
                )
            }),
    );
    weighted.sort_by(|a, b| b.0.to_bits().cmp(&a.0.to_bits()).then(a.1.cmp(&b.1)));

    // 2. Top-p: the shortest heaviest-first prefix whose mass reaches p.
    if plan.top_p < 1.0 {
        let total: f64 = weighted.iter().map(|&(w, _)| f64::from(w)).sum();
        let target = plan.top_p * total;
        let mut mass = 0.0;
        let mut kept = weighted.len();
        for (index, &(w, _)) in weighted.iter().enumerate() {
            mass += f64::from(w);
            if mass >= target {
                kept = index + 1;
                break;
            }
        }
        weighted.truncate(kept);
    }

    // 3. Min-p: weights are relative to the best token's, which is 1.
    let kept = weighted
        .iter()
        .take_while(|&&(w, _)| w >= plan.min_p)
        .count()
        .max(1);
    weighted.truncate(kept);
    let total = weighted.iter().map(|&(w, _)| f64::from(w)).sum();
    Support::Candidates {
        items: weighted,
        total,
    }
}

/// Returns the cut that keeps the tokens min-p keeps, or every token of positive weight when
/// min-p is off.
fn min_p_cut(plan: &RowPlan) -> Cut {
    if plan.min_p > 0.0 {
        Cut::at_least(plan.min_p)
    } else {
        Cut::ALL_POSITIVE
    }
}

/// Builds the filtered distribution of a row in the order temperature, top-k, top-p, min-p,
/// computing the top-p set exactly. Also returns the row's sum of weights when it computed it.
pub fn build<'a>(
    prepared: Prepared<'a>,
    plan: &RowPlan,
    work: &'a mut Workspace,
) -> (Support<'a>, Option<f64>) {
    let Prepared {
        row,
        max,
        candidates,
        ..
    } = prepared;
    let scale = plan.inv_temperature;
    if plan.greedy {
        return (
            Support::Single(candidates.first().map_or(0, |best| best.id)),
            None,
        );
    }
    if plan.top_k < row.len() {
        return (top_k_support(prepared, plan, work), None);
    }

    // Whole-row path: top-p by a radix select over the weights, then min-p when it cuts
    // deeper.
    let mut cut = min_p_cut(plan);
    let mut total = None;
    if plan.top_p < 1.0 {
        let Workspace {
            items,
            histogram,
            masses,
            ..
        } = work;
        weights_histogram(row, max, scale, histogram);
        let top_p = top_p_cut(row, max, scale, histogram, plan.top_p, masses, items);
        total = Some(top_p.total);
        if top_p.cut.threshold_bits > cut.threshold_bits {
            cut = top_p.cut;
        }
    }
    let strict_sums = &mut work.kept_sums;
    let strict_mass = chunk_sums(row, max, scale, cut.threshold_bits, strict_sums);
    if cut == Cut::ALL_POSITIVE {
        total = Some(strict_mass);
    }
    (
        Support::Row {
            row,
            max,
            scale,
            cut,
            strict_mass,
            strict_sums,
        },
        total,
    )
}

/// Returns the weight of the cut's tied tokens and how many of them are kept.
fn ties(cut: Cut, vocab_size: usize) -> (f32, usize) {
    (
        f32::from_bits(cut.threshold_bits),
        cut.tie_quota.min(vocab_size),
    )
}

/// Draws a token from `support` with the uniform `u` in [0, 1) by inversion. The tokens'
/// weights are laid end to end in a fixed order, and the token whose interval contains
/// `u * total` is chosen.
pub fn draw(support: &Support<'_>, u: f64) -> u32 {
    match *support {
        Support::Single(token) => token,
        Support::Candidates { items, total } => {
            let target = u * total;
            let mut mass = 0.0;
            let mut last_positive = items.first().map_or(0, |item| item.1);
            for &(w, id) in items {
                if w > 0.0 {
                    last_positive = id;
                }
                mass += f64::from(w);
                if mass > target {
                    return id;
                }
            }
            // Rounding left the target at the very end.
            last_positive
        }
        Support::Row {
            row,
            max,
            scale,
            cut,
            strict_mass,
            strict_sums,
        } => {
            let (tie_weight, tie_count) = ties(cut, row.len());
            let target = u * (strict_mass + tie_count as f64 * f64::from(tie_weight));

            // The strict members come first, chunk by chunk in id order, then the tied ones.
            let last_strict = if target < strict_mass {
                match draw_from_sums(row, max, scale, cut.threshold_bits, strict_sums, target) {
                    Scan::Token(token) => return token,
                    Scan::Short(last) => last,
                }
            } else {
                None
            };
            if tie_count == 0 {
                return last_strict.unwrap_or(0);
            }
            let rank = ((target - strict_mass).max(0.0) / f64::from(tie_weight)) as usize;
            nth_with_bits(row, max, scale, cut.threshold_bits, rank.min(tie_count - 1)).unwrap_or(0)
        }
    }
}

/// Lists the tokens of `support` with their probabilities, in any order.
pub fn enumerate(support: &Support<'_>) -> Vec<(u32, f64)> {
    match *support {
        Support::Single(token) => vec![(token, 1.0)],
        Support::Candidates { items, total } => items
            .iter()
            .map(|&(w, id)| (id, f64::from(w) / total))
            .collect(),
        Support::Row {
            row,
            max,
            scale,
            cut,
            strict_mass,
            ..
        } => {
            let (tie_weight, tie_count) = ties(cut, row.len());
            let total = strict_mass + tie_count as f64 * f64::from(tie_weight);
            let mut row_weights = Vec::new();
            weights(row, max, scale, &mut row_weights);
            let mut ties_left = tie_count;
            let mut members = Vec::new();
            for (id, &w) in row_weights.iter().enumerate() {
                let bits = w.to_bits();
                let member = if bits == cut.threshold_bits && ties_left > 0 {
                    ties_left -= 1;
                    true
                } else {
                    bits > cut.threshold_bits
                };
                if member {
                    members.push((id as u32, f64::from(w) / total));
                }
            }
            members
        }
    }
}

/// Draws from the whole row by rejection when top-p is on, top-k off and top_p is large.
/// A token drawn from the tokens min-p keeps is accepted if the tokens ranked before it
/// weigh less than top_p times the total, which is exactly membership of the top-p set.
/// This takes two and a half passes over the row on average, against four for the exact cut
/// (one of them a scatter that does not vectorize).
///
/// Returns the token (or `None` after [`REJECTION_ATTEMPTS`] rejections) and the row's sum
/// of weights; `None` for both when the row does not qualify.
pub fn draw_by_rejection(
    prepared: Prepared<'_>,
    plan: &RowPlan,
    work: &mut Workspace,
) -> Option<(Option<u32>, f64)> {
    let Prepared {
        row,
        max,
        chunk_maxima,
        ..
    } = prepared;
    let qualifies = !plan.greedy
        && plan.top_k >= row.len()
        && plan.top_p < 1.0
        && plan.top_p >= REJECTION_MIN_TOP_P;
    if !qualifies {
        return None;
    }
    let scale = plan.inv_temperature;

    // 1. The proposal: the tokens min-p keeps. The top-p target is relative to all tokens.
    let proposal = min_p_cut(plan);
    let Workspace {
        all_sums,
        kept_sums,
        ..
    } = work;
    let total = chunk_sums(row, max, scale, Cut::ALL_POSITIVE.threshold_bits, all_sums);
    let (proposal_mass, proposal_sums) = if proposal == Cut::ALL_POSITIVE {
        (total, &*all_sums)
    } else {
        (
            chunk_sums(row, max, scale, proposal.threshold_bits, kept_sums),
            &*kept_sums,
        )
    };
    let target = plan.top_p * total;

    // 2. Draw, rank the token drawn, accept it if it is in the top-p set.
    for attempt in 0..REJECTION_ATTEMPTS {
        let u = rng::uniform(plan.seed, plan.step, attempt);
        let target_mass = u * proposal_mass;
        let token = match draw_from_sums(
            row,
            max,
            scale,
            proposal.threshold_bits,
            proposal_sums,
            target_mass,
        ) {
            Scan::Token(token) => token,
            Scan::Short(last) => last.unwrap_or(0),
        };
        if ranked_within(
            row,
            max,
            scale,
            token as usize,
            target,
            all_sums,
            chunk_maxima,
        ) {
            return Some((Some(token), total));
        }
    }
    Some((None, total))
}

/// Index of the uniform used by the exact draw: after those of the rejection attempts, so
/// that a draw after rejections is independent of them.
pub const EXACT_DRAW: u32 = REJECTION_ATTEMPTS;

/// Draws the token of a row: by rejection where that is cheaper, from the exact support
/// otherwise. Returns it with the row's sum of weights when that was computed.
pub fn sample<'a>(
    prepared: Prepared<'a>,
    plan: &RowPlan,
    work: &'a mut Workspace,
) -> (u32, Option<f64>) {
    let mut known_total = None;
    if let Some((token, total)) = draw_by_rejection(prepared, plan, work) {
        if let Some(token) = token {
            return (token, Some(total));
        }
        known_total = Some(total);
    }
    let (support, total) = build(prepared, plan, work);
    let draw_index = if known_total.is_some() { EXACT_DRAW } else { 0 };
    let token = draw(&support, rng::uniform(plan.seed, plan.step, draw_index));
    (token, total.or(known_total))
}
