//! Sampling of one row: checks of the logits, the draw, and the logprobs.

use crate::kernels::{scan_row, weight_sum};
use crate::params::RowPlan;
use crate::select::top_k_by_logit;
use crate::support::{self, Prepared, Workspace};

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
    let (token, total) = support::sample(prepared, plan, work);

    // Logprobs under the model's distribution: log_softmax(x) = x - max - ln(sum(exp(x - max))).
    let Prepared { row, max } = prepared;
    let total_at_unit_scale = total.filter(|_| plan.inv_temperature == 1.0);
    let log_normalizer = total_at_unit_scale.unwrap_or_else(|| weight_sum(row, max, 1.0, 0)).ln();
    let logprob_of = |x: f32| (f64::from(x - max) - log_normalizer) as f32;
    let logprob = logprob_of(row.get(token as usize).copied().unwrap_or(f32::NAN));
    let mut top = Vec::new();
    if num_logprobs > 0 {
        let candidates = &mut work.candidates;
        top_k_by_logit(row, num_logprobs.min(row.len()), candidates);
        top.extend(candidates.iter().map(|c| (c.id, logprob_of(c.logit))));
    }
    Ok(RowSample { token, logprob, top })
}

/// Returns the filtered distribution of one row as (token id, probability) pairs in id
/// order, omitting tokens of probability 0: every token [`sample_row`] can draw, with the
/// probability of drawing it. Where [`sample_row`] samples top-p by rejection, the two may
/// disagree on a token whose rank puts the mass before it within rounding of top_p.
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
    let (support, _) = support::build(prepared, plan, work);
    let mut distribution = support::enumerate(&support);
    distribution.retain(|&(_, probability)| probability > 0.0);
    distribution.sort_by_key(|&(id, _)| id);
    Ok(distribution)
}

#[cfg(test)]
mod tests {
    use crate::select::{by_rank, Candidate};

    #[test]
    fn by_rank_puts_lower_id_first_on_ties() {
        let a = Candidate { logit: 1.0, id: 3 };
        let b = Candidate { logit: 1.0, id: 7 };
        assert_eq!(by_rank(&a, &b), std::cmp::Ordering::Less);
    }
}
