//! Batched token sampling for Loftey: temperature, top-k, top-p and min-p per row, with a
//! counter-based random generator per request.
//!
//! The core ([`sample_batch`], [`filtered_distribution`]) is plain Rust; the `python` feature
//! (on by default) adds the PyO3 module `loftey._sampler`.
//!
//! # Contract
//!
//! For each row of logits `x` (V values) and its [`SamplingParams`]:
//!
//! 1. **Temperature.** Weights are `w = exp((x - max(x)) / temperature)`. Subtracting the
//!    maximum keeps every weight in [0, 1] with the best token at exactly 1, so no
//!    temperature, however small, overflows or gives NaN. Weights below `f32::MIN_POSITIVE`
//!    (about 1e-38) are flushed to 0. Temperature 0 is greedy: the token with the largest
//!    logit, ties to the lowest id, whatever the other parameters are.
//! 2. **Top-k** keeps the `top_k` tokens with the largest logits (ties to the lowest id). 0
//!    disables it; values above V act as V.
//! 3. **Top-p** ranks the tokens left by weight (ties to the lowest id) and keeps the
//!    shortest prefix whose weight reaches `top_p` times the total of the tokens left, and
//!    always at least the first token: 1 disables it and 0 keeps only the most likely token.
//! 4. **Min-p** drops the tokens whose weight is below `min_p` times the best token's.
//!    0 disables it.
//! 5. **Draw.** The token is drawn from the weights left, renormalized, with the uniform
//!    number keyed by (`seed`, `step`) (Philox4x32-10, see [`rng`]). The same row with the
//!    same parameters gives the same token at any position in any batch, on any number of
//!    threads.
//!
//! The reported logprobs are those of the model's own distribution, `log_softmax(x)`, before
//! temperature and filters (as vLLM reports them).
//!
//! Rows whose maximum is `+inf` are sampled as if those tokens had logit 0 and every other
//! token `-inf`: the `+inf` tokens share the probability equally. A row containing NaN, or
//! whose logits are all `-inf`, gets a [`RowError`] and leaves the other rows unaffected.
//!
//! # Performance
//!
//! No step sorts the vocabulary. The first pass over a row finds its maximum, keeps the
//! top-k candidates (admitting a block of logits only if its maximum beats the worst kept
//! one) and, where needed, sums exp(x - max) for the logprobs. Without top-k, top-p with
//! `top_p >= 0.5` draws by rejection: a token drawn from the whole row is kept if the
//! tokens ranked before it weigh less than `top_p` of the total. Smaller `top_p`, or three
//! rejections in a row, compute the top-p set exactly by a radix select over the weights'
//! bit patterns, which sorts only the few tokens of the histogram bucket where the running
//! mass reaches `top_p`. When the batch has more than one row, the calling thread and
//! `RAYON_NUM_THREADS - 1` threads of rayon's pool (all cores by default) share the rows.

mod draw;
mod first_pass;
mod kernels;
mod parallel;
mod params;
pub mod rng;
mod row;
mod simd;
mod support;
mod top_k;
mod top_p;

#[cfg(feature = "python")]
mod python;

use std::cell::RefCell;
use std::fmt;

use params::RowPlan;
pub use params::{InputError, SamplingParams};
use row::Scratch;
pub use row::{RowErrorKind, RowSample};

/// A row that could not be sampled; the other rows of its batch are unaffected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowError {
    /// Index of the row in its batch.
    pub row: usize,
    pub kind: RowErrorKind,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RowErrorKind::Nan => write!(f, "row {}: logits contain NaN", self.row),
            RowErrorKind::AllNegativeInfinity => {
                write!(
                    f,
                    "row {}: every logit is -inf, so no token can be sampled",
                    self.row
                )
            }
            RowErrorKind::Internal => {
                write!(
                    f,
                    "row {}: the sampler failed on this row (a bug: please report it)",
                    self.row
                )
            }
        }
    }
}

impl std::error::Error for RowError {}

thread_local! {
    // One set of buffers per thread (rayon workers and the caller's thread), kept between
    // calls so that a warm sampler does not allocate or page-fault per row.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn with_scratch<T>(f: impl FnOnce(&mut Scratch) -> T) -> T {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        // Only reachable if `f` re-entered the sampler on this thread.
        Err(_) => f(&mut Scratch::default()),
    })
}

/// Checks the shape and every row's parameters.
fn plan_batch(
    logits: &[f32],
    vocab_size: usize,
    params: &[SamplingParams],
) -> Result<Vec<RowPlan>, InputError> {
    let rows = params.len();
    if rows > 0 && vocab_size == 0 {
        return Err(InputError::EmptyVocabulary { rows });
    }
    if u32::try_from(vocab_size).is_err() {
        return Err(InputError::VocabularyTooLarge { vocab_size });
    }
    if rows.checked_mul(vocab_size) != Some(logits.len()) {
        return Err(InputError::LogitsLength {
            len: logits.len(),
            rows,
            vocab_size,
        });
    }
    params
        .iter()
        .enumerate()
        .map(|(row, p)| RowPlan::new(p, row, vocab_size))
        .collect()
}

/// Samples one token for each row of `logits`, a row-major `[params.len(), vocab_size]`
/// array, following the contract in the crate documentation.
///
/// Returns one result per row, in order. `num_logprobs` most likely tokens of each row are
/// returned with their logprobs (0 for none).
///
/// # Errors
///
/// Returns [`InputError`] if `logits` is not `params.len()` rows of `vocab_size` values, if
/// a parameter is outside its range (the message names the parameter, the row and the
/// value), or if `num_logprobs` exceeds `vocab_size`. A row containing NaN or only `-inf`
/// logits is not an error of the call: its entry is `Err(RowError)`.
pub fn sample_batch(
    logits: &[f32],
    vocab_size: usize,
    params: &[SamplingParams],
    num_logprobs: usize,
) -> Result<Vec<Result<RowSample, RowError>>, InputError> {
    let plans = plan_batch(logits, vocab_size, params)?;
    if num_logprobs > vocab_size {
        let value = i64::try_from(num_logprobs).unwrap_or(i64::MAX);
        return Err(InputError::NumLogprobs { value, vocab_size });
    }
    if plans.is_empty() {
        return Ok(Vec::new());
    }

    // The calling thread and RAYON_NUM_THREADS - 1 helpers share the rows.
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if plans.len() > 1 && helpers > 0 {
        return Ok(parallel::sample_rows(
            logits,
            vocab_size,
            plans,
            num_logprobs,
            helpers,
        ));
    }
    let results = logits
        .chunks_exact(vocab_size)
        .zip(&plans)
        .enumerate()
        .map(|(row, (logits_row, plan))| sample_one_row(row, logits_row, plan, num_logprobs))
        .collect();
    Ok(results)
}

/// Samples one row, `row` of its batch, with this thread's buffers.
fn sample_one_row(
    row: usize,
    logits_row: &[f32],
    plan: &RowPlan,
    num_logprobs: usize,
) -> Result<RowSample, RowError> {
    with_scratch(|scratch| row::sample_row(logits_row, plan, num_logprobs, scratch))
        .map_err(|kind| RowError { row, kind })
}

/// Returns the distribution that [`sample_batch`] draws row 0 of `logits` from, as (token
/// id, probability) pairs in id order, omitting tokens of probability 0. Meant for tests
/// and debugging: it runs the same filters as sampling.
///
/// # Errors
///
/// Returns [`InputError`] for a parameter outside its range or an empty row, and
/// `Ok(Err(RowError))` for a row containing NaN or only `-inf`.
pub fn filtered_distribution(
    logits: &[f32],
    params: &SamplingParams,
) -> Result<Result<Vec<(u32, f64)>, RowError>, InputError> {
    let plans = plan_batch(logits, logits.len(), std::slice::from_ref(params))?;
    let plan = plans
        .first()
        .ok_or(InputError::EmptyVocabulary { rows: 1 })?;
    let distribution = with_scratch(|scratch| row::filtered_distribution(logits, plan, scratch));
    Ok(distribution.map_err(|kind| RowError { row: 0, kind }))
}
