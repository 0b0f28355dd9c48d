//! Sampling of one row: the filtered distribution (temperature, top-k, top-p, min-p), the
//! draw, and the logprobs.

use crate::kernels::{
    first_index_of, masked_chunk_sums, scan_row, sum_exp, weights, weights_histogram,
    exp_non_positive, Histogram, CHUNK,
};
use crate::params::RowPlan;
use crate::rng;
use crate::select::{top_k_by_logit, top_p_cut, Candidate, Cut};

/// Why a row could not be sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowErrorKind {
    /// The row contains at least one NaN.
    Nan,
    /// Every logit of the row is `-inf`, so no token has any probability.
    AllNegativeInfinity,
}

/// The token drawn for one row.
#[derive(Clone, Debug, PartialEq)]
pub struct RowSample {
    pub token: u32,
    /// log_softmax(logits)[token]: the model's own distribution, before temperature and
    /// filtering.
    pub logprob: f32,
    /// The `num_logprobs` most likely tokens under the same distribution, most likely first
    /// (ties to the lower id), with their logprobs.
    pub top: Vec<(u32, f32)>,
}

/// Buffers reused from row to row, so that sampling a row allocates nothing once warm.
#[derive(Default)]
pub struct Scratch {
    /// The row with `+inf` logits replaced (see [`prepare`]).
    substitute: Vec<f32>,
    work: Workspace,
}

/// Buffers the filters write to.
#[derive(Default)]
struct Workspace {
    weights: Vec<f32>,
    chunk_sums: Vec<f32>,
    candidates: Vec<Candidate>,
    weighted: Vec<(f32, u32)>,
    items: Vec<(u32, u32)>,
    histogram: Histogram,
}

/// The tokens left after filtering, with their weights (unnormalized probabilities).
enum Support<'a> {
    /// A single token: greedy decoding.
    Single(u32),
    /// The kept top-k candidates as (weight, id), heaviest first, and their total weight.
    Candidates { items: &'a [(f32, u32)], total: f64 },
    /// Whole-row weights filtered by a cut; `chunk_sums` are the per-[`CHUNK`] sums of the
    /// members strictly above the cut's threshold, which total `strict_total`.
    Row { weights: &'a [f32], cut: Cut, chunk_sums: &'a [f32], strict_total: f64 },
}

/// A row with NaN-free logits and a finite maximum, ready for the filters.
struct Prepared<'a> {
    row: &'a [f32],
    max: f32,
}

/// Checks a row for NaN and all `-inf`, and replaces a row with `+inf` logits by one where
/// those tokens have logit 0 and all others `-inf`: in the limit the `+inf` tokens share all
/// the probability equally.
fn prepare<'a>(row: &'a [f32], substitute: &'a mut Vec<f32>) -> Result<Prepared<'a>, RowErrorKind> {
    let scan = scan_row(row);
    if scan.has_nan {
        return Err(RowErrorKind::Nan);
    }
    if scan.max == f32::NEG_INFINITY {
        return Err(RowErrorKind::AllNegativeInfinity);
    }
    if scan.max == f32::INFINITY {
        substitute.clear();
        substitute.extend(row.iter().map(|&x| if x == f32::INFINITY { 0.0 } else { f32::NEG_INFINITY }));
        return Ok(Prepared { row: substitute, max: 0.0 });
    }
    Ok(Prepared { row, max: scan.max })
}

/// Builds the filtered distribution of `row` in the order temperature, top-k, top-p, min-p.
/// Also returns ln of sum(exp(x - max)) over the row when computing the support gave it.
fn support<'a>(
    prepared: &Prepared<'_>,
    plan: &RowPlan,
    work: &'a mut Workspace,
) -> (Support<'a>, Option<f64>) {
    let Workspace { weights: weights_buffer, chunk_sums, candidates, weighted, items, histogram } =
        work;
    let (row, max) = (prepared.row, prepared.max);
    if plan.greedy {
        let token = first_index_of(row, max).unwrap_or(0) as u32;
        return (Support::Single(token), None);
    }

    if plan.top_k < row.len() {
        // 1. Top-k by partial selection, then the weights of the k candidates only.
        top_k_by_logit(row, plan.top_k, candidates);
        weighted.clear();
        weighted.extend(candidates.iter().map(|c| {
            (exp_non_positive((c.logit - max) * plan.inv_temperature), c.id)
        }));
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
        let kept = weighted.iter().take_while(|&&(w, _)| w >= plan.min_p).count().max(1);
        weighted.truncate(kept);
        let total = weighted.iter().map(|&(w, _)| f64::from(w)).sum();
        return (Support::Candidates { items: weighted, total }, None);
    }

    // Whole-row path: weights of every token.
    weights_buffer.resize(row.len(), 0.0);
    let (mut cut, total) = if plan.top_p < 1.0 {
        histogram.clear();
        let total = weights_histogram(row, max, plan.inv_temperature, weights_buffer, histogram);
        (top_p_cut(weights_buffer, histogram, plan.top_p * total, items), total)
    } else {
        (Cut::ALL_POSITIVE, weights(row, max, plan.inv_temperature, weights_buffer))
    };
    if plan.min_p > 0.0 && Cut::at_least(plan.min_p).threshold_bits >= cut.threshold_bits {
        cut = Cut::at_least(plan.min_p);
    }
    let strict_total = masked_chunk_sums(weights_buffer, cut.threshold_bits, chunk_sums);
    let log_normalizer = (plan.inv_temperature == 1.0).then(|| total.ln());
    let support = Support::Row { weights: weights_buffer, cut, chunk_sums, strict_total };
    (support, log_normalizer)
}

/// Returns the weight of the cut's tied tokens and their number.
fn ties(weights: &[f32], cut: Cut) -> (f32, usize) {
    (f32::from_bits(cut.threshold_bits), cut.tie_quota.min(weights.len()))
}

/// Returns the id of the `rank`-th token (from 0, in id order) whose weight has `bits`.
fn nth_with_bits(weights: &[f32], bits: u32, rank: usize) -> Option<u32> {
    weights.iter().enumerate().filter(|(_, w)| w.to_bits() == bits).nth(rank).map(|(i, _)| i as u32)
}

/// Draws a token from `support` with the uniform `u` in [0, 1), by inversion: the tokens'
/// weights are laid end to end in a fixed order and the token whose interval holds
/// `u * total` is chosen.
fn draw(support: &Support<'_>, u: f64) -> u32 {
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
        Support::Row { weights, cut, chunk_sums, strict_total } => {
            let (tie_weight, tie_count) = ties(weights, cut);
            let total = strict_total + tie_count as f64 * f64::from(tie_weight);
            let target = u * total;

            // The strict members come first, in id order, chunk by chunk; the sums were
            // accumulated in this same order, so some chunk crosses the target.
            if target < strict_total {
                let mut mass = 0.0f64;
                for (chunk_index, &chunk_sum) in chunk_sums.iter().enumerate() {
                    if mass + f64::from(chunk_sum) <= target {
                        mass += f64::from(chunk_sum);
                        continue;
                    }
                    let start = chunk_index * CHUNK;
                    let chunk = &weights[start..(start + CHUNK).min(weights.len())];
                    let mut last_positive = None;
                    for (offset, &w) in chunk.iter().enumerate() {
                        if w.to_bits() > cut.threshold_bits {
                            last_positive = Some(start + offset);
                            mass += f64::from(w);
                            if mass > target {
                                return (start + offset) as u32;
                            }
                        }
                    }
                    // Summed in another order, the chunk fell short of the target by rounding.
                    if let Some(index) = last_positive {
                        return index as u32;
                    }
                }
            }

            // Then the tied members, each with the same weight.
            let rank = if tie_weight > 0.0 {
                ((target - strict_total) / f64::from(tie_weight)) as usize
            } else {
                0
            };
            let rank = rank.min(tie_count.saturating_sub(1));
            nth_with_bits(weights, cut.threshold_bits, rank).unwrap_or(0)
        }
    }
}

/// Samples one row of logits.
///
/// # Errors
///
/// Returns [`RowErrorKind::Nan`] if the row contains NaN and
/// [`RowErrorKind::AllNegativeInfinity`] if every logit is `-inf`.
pub(crate) fn sample_row(
    row: &[f32],
    plan: &RowPlan,
    num_logprobs: usize,
    scratch: &mut Scratch,
) -> Result<RowSample, RowErrorKind> {
    let Scratch { substitute, work } = scratch;
    let prepared = prepare(row, substitute)?;

    let (support, log_normalizer) = support(&prepared, plan, work);
    let u = rng::uniform(plan.seed, plan.step, 0);
    let token = draw(&support, u);

    // Logprobs under the model's distribution: log_softmax(x) = x - max - ln(sum(exp(x - max))).
    let log_normalizer =
        log_normalizer.unwrap_or_else(|| sum_exp(prepared.row, prepared.max, 1.0).ln());
    let logprob_of = |x: f32| (f64::from(x - prepared.max) - log_normalizer) as f32;
    let logprob = logprob_of(prepared.row.get(token as usize).copied().unwrap_or(f32::NAN));
    let mut top = Vec::new();
    if num_logprobs > 0 {
        let candidates = &mut work.candidates;
        top_k_by_logit(prepared.row, num_logprobs.min(prepared.row.len()), candidates);
        top.extend(candidates.iter().map(|c| (c.id, logprob_of(c.logit))));
    }
    Ok(RowSample { token, logprob, top })
}

/// Returns the filtered distribution of one row as (token id, probability) pairs in id
/// order, computed by the same code as [`sample_row`]: every token it can draw, and only
/// those, with the probability of drawing it.
///
/// # Errors
///
/// Returns [`RowErrorKind::Nan`] if the row contains NaN and
/// [`RowErrorKind::AllNegativeInfinity`] if every logit is `-inf`.
pub(crate) fn filtered_distribution(
    row: &[f32],
    plan: &RowPlan,
    scratch: &mut Scratch,
) -> Result<Vec<(u32, f64)>, RowErrorKind> {
    let Scratch { substitute, work } = scratch;
    let prepared = prepare(row, substitute)?;
    let (support, _) = support(&prepared, plan, work);

    let mut distribution: Vec<(u32, f64)> = match support {
        Support::Single(token) => vec![(token, 1.0)],
        Support::Candidates { items, total } => {
            items.iter().map(|&(w, id)| (id, f64::from(w) / total)).collect()
        }
        Support::Row { weights, cut, strict_total, .. } => {
            let (tie_weight, tie_count) = ties(weights, cut);
            let total = strict_total + tie_count as f64 * f64::from(tie_weight);
            let mut ties_left = tie_count;
            let mut members = Vec::new();
            for (id, &w) in weights.iter().enumerate() {
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
    };
    distribution.retain(|&(_, probability)| probability > 0.0);
    distribution.sort_by_key(|&(id, _)| id);
    Ok(distribution)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::by_rank;

    #[test]
    fn by_rank_puts_lower_id_first_on_ties() {
        let a = Candidate { logit: 1.0, id: 3 };
        let b = Candidate { logit: 1.0, id: 7 };
        assert_eq!(by_rank(&a, &b), std::cmp::Ordering::Less);
    }
}
