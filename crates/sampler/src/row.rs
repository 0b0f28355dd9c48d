//! Sampling of one row: checks of the logits, the draw, and the logprobs.

use crate::first_pass::first_pass;
use crate::kernels::weight_sum;
use crate::params::RowPlan;
use crate::support::{self, Prepared, Workspace, REJECTION_MIN_TOP_P};
use crate::top_k::Candidate;

/// Reason a row could not be sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowErrorKind {
    /// The row contains at least one NaN.
    Nan,
    /// Every logit of the row is `-inf`, so no token has any probability.
    AllNegativeInfinity,
    /// The sampler panicked on this row: a bug, caught so that it cannot reach Python.
    Internal,
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
    candidates: Vec<Candidate>,
    chunk_maxima: Vec<f32>,
    work: Workspace,
}

/// A checked row and, when the first pass computed it, ln(sum(exp(x - max))).
struct Checked<'a> {
    prepared: Prepared<'a>,
    log_exp_sum: Option<f64>,
}

/// Reads the row once (see [`first_pass`]) and checks it for NaN and all `-inf`. A row
/// with `+inf` logits is replaced by one where those tokens have logit 0 and all others
/// `-inf`, because in the limit the `+inf` tokens share all the probability equally.
///
/// The first pass also keeps the candidates that greedy decoding, top-k and the top
/// `num_logprobs` need, and computes the logprobs' normalizer where no later pass would.
fn prepare<'a>(
    row: &'a [f32],
    plan: &RowPlan,
    num_logprobs: usize,
    substitute: &'a mut Vec<f32>,
    candidates: &'a mut Vec<Candidate>,
    chunk_maxima: &'a mut Vec<f32>,
) -> Result<Checked<'a>, RowErrorKind> {
    let top_k_path = !plan.greedy && plan.top_k < row.len();
    let for_sampling = if plan.greedy {
        1
    } else if top_k_path {
        plan.top_k
    } else {
        0
    };
    let top_count = for_sampling.max(num_logprobs).min(row.len());
    // Whole-row paths at temperature 1 get the normalizer from their own sum of weights.
    let with_exp_sum = plan.greedy || top_k_path || plan.inv_temperature != 1.0;

    // Ranking a drawn token against the row skips the chunks whose maximum is too light.
    let by_rejection =
        !plan.greedy && !top_k_path && plan.top_p < 1.0 && plan.top_p >= REJECTION_MIN_TOP_P;

    let mut pass = first_pass(
        row,
        with_exp_sum,
        top_count,
        candidates,
        by_rejection.then_some(&mut *chunk_maxima),
    );
    if pass.has_nan {
        return Err(RowErrorKind::Nan);
    }
    if pass.max == f32::NEG_INFINITY {
        return Err(RowErrorKind::AllNegativeInfinity);
    }
    let mut row = row;
    if pass.max == f32::INFINITY {
        substitute.clear();
        substitute.extend(row.iter().map(|&x| {
            if x == f32::INFINITY {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        }));
        pass = first_pass(
            substitute,
            with_exp_sum,
            top_count,
            candidates,
            by_rejection.then_some(&mut *chunk_maxima),
        );
        row = substitute;
    }
    Ok(Checked {
        prepared: Prepared {
            row,
            max: pass.max,
            candidates,
            chunk_maxima: if by_rejection { chunk_maxima } else { &[] },
        },
        log_exp_sum: pass.exp_sum.map(f64::ln),
    })
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
    let Scratch {
        substitute,
        candidates,
        chunk_maxima,
        work,
    } = scratch;
    let Checked {
        prepared,
        log_exp_sum,
    } = prepare(
        row,
        plan,
        num_logprobs,
        substitute,
        candidates,
        chunk_maxima,
    )?;
    let (token, total) = support::sample(prepared, plan, work);

    // Logprobs under the model's distribution: log_softmax(x) = x - max - ln(sum(exp(x - max))).
    let Prepared {
        row,
        max,
        candidates,
        ..
    } = prepared;
    let log_normalizer = log_exp_sum
        .or_else(|| total.filter(|_| plan.inv_temperature == 1.0).map(f64::ln))
        .unwrap_or_else(|| weight_sum(row, max, 1.0, 0).ln());
    let logprob_of = |x: f32| (f64::from(x - max) - log_normalizer) as f32;
    let logprob = logprob_of(row.get(token as usize).copied().unwrap_or(f32::NAN));
    let top = candidates
        .iter()
        .take(num_logprobs)
        .map(|c| (c.id, logprob_of(c.logit)))
        .collect();
    Ok(RowSample {
        token,
        logprob,
        top,
    })
}

/// Returns the filtered distribution of one row as (token id, probability) pairs in id
/// order, omitting tokens of probability 0. It lists every token [`sample_row`] can draw,
/// with the probability of drawing it. Where [`sample_row`] samples top-p by rejection, the
/// two may disagree on a token whose preceding mass is within rounding of top_p.
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
    let Scratch {
        substitute,
        candidates,
        chunk_maxima,
        work,
    } = scratch;
    let Checked { prepared, .. } = prepare(row, plan, 0, substitute, candidates, chunk_maxima)?;
    let (support, _) = support::build(prepared, plan, work);
    let mut distribution = support::enumerate(&support);
    distribution.retain(|&(_, probability)| probability > 0.0);
    distribution.sort_by_key(|&(id, _)| id);
    Ok(distribution)
}

#[cfg(test)]
mod tests {
    use crate::top_k::{by_rank, Candidate};

    #[test]
    fn by_rank_puts_lower_id_first_on_ties() {
        let a = Candidate { logit: 1.0, id: 3 };
        let b = Candidate { logit: 1.0, id: 7 };
        assert_eq!(by_rank(&a, &b), std::cmp::Ordering::Less);
    }
}
