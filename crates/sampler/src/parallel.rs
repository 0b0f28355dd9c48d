//! Rows in parallel, with the calling thread doing its share.
//!
//! A plain rayon `par_iter` from a Python thread hands every row to the pool and waits. On
//! cores shared with other processes the pool's threads may wait milliseconds to be
//! scheduled (seen here: 15 ms for 8 rows that take 0.4 ms on one thread). So the caller
//! claims rows itself from a shared counter, and helper jobs on rayon's pool claim rows
//! only once they actually run. The caller waits only for rows a helper has claimed, never
//! for a helper that has not started.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::params::RowPlan;
use crate::row::RowSample;
use crate::{sample_one_row, RowError};

type RowResult = Result<RowSample, RowError>;

/// State shared by the caller and the helpers of one call.
struct Shared {
    /// Address and length of the logits, which the caller borrows. See `run_helper` for why
    /// helpers may read them.
    logits: (usize, usize),
    vocab_size: usize,
    plans: Vec<RowPlan>,
    num_logprobs: usize,
    /// Next row to claim.
    next: AtomicUsize,
    /// Rows finished, by any thread.
    done: AtomicUsize,
    results: Mutex<Vec<Option<RowResult>>>,
}

impl Shared {
    /// Samples row `row`, which the calling thread has claimed, from `logits`.
    fn sample_claimed(&self, logits: &[f32], row: usize) {
        let start = row * self.vocab_size;
        let result = match (
            logits.get(start..start + self.vocab_size),
            self.plans.get(row),
        ) {
            (Some(logits_row), Some(plan)) => catch_unwind(AssertUnwindSafe(|| {
                sample_one_row(row, logits_row, plan, self.num_logprobs)
            }))
            .unwrap_or(Err(RowError {
                row,
                kind: crate::RowErrorKind::Internal,
            })),
            _ => Err(RowError {
                row,
                kind: crate::RowErrorKind::Internal,
            }),
        };
        if let Ok(mut results) = self.results.lock() {
            if let Some(slot) = results.get_mut(row) {
                *slot = Some(result);
            }
        }
        self.done.fetch_add(1, Ordering::Release);
    }

    /// Claims and samples rows until none is left.
    fn work(&self, logits: &[f32]) {
        loop {
            let row = self.next.fetch_add(1, Ordering::Relaxed);
            if row >= self.plans.len() {
                return;
            }
            self.sample_claimed(logits, row);
        }
    }
}

/// Claims and samples rows on a pool thread.
fn run_helper(shared: &Shared) {
    loop {
        let row = shared.next.fetch_add(1, Ordering::Relaxed);
        if row >= shared.plans.len() {
            return;
        }
        let (address, len) = shared.logits;
        // SAFETY: the logits outlive this read. The caller of `sample_rows` borrows them for
        // the whole call and returns only once `done` counts every row, and this helper
        // counts its row in `done` only after its last read of the logits for it. A helper
        // that starts after every row is claimed returns above without reading them.
        let logits = unsafe { std::slice::from_raw_parts(address as *const f32, len) };
        shared.sample_claimed(logits, row);
    }
}

/// Samples every row of `logits` with the calling thread and up to `helpers` pool threads.
pub fn sample_rows(
    logits: &[f32],
    vocab_size: usize,
    plans: Vec<RowPlan>,
    num_logprobs: usize,
    helpers: usize,
) -> Vec<RowResult> {
    let rows = plans.len();
    let shared = Arc::new(Shared {
        logits: (logits.as_ptr() as usize, logits.len()),
        vocab_size,
        plans,
        num_logprobs,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        results: Mutex::new(vec![None; rows]),
    });

    for _ in 0..helpers.min(rows.saturating_sub(1)) {
        let shared = Arc::clone(&shared);
        rayon::spawn(move || run_helper(&shared));
    }
    shared.work(logits);

    // Rows a helper claimed may still be running; yielding lets a helper preempted on this
    // core finish.
    while shared.done.load(Ordering::Acquire) < rows {
        std::thread::yield_now();
    }
    let mut results = match shared.results.lock() {
        Ok(mut results) => std::mem::take(&mut *results),
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    };
    results
        .drain(..)
        .enumerate()
        .map(|(row, result)| {
            result.unwrap_or(Err(RowError {
                row,
                kind: crate::RowErrorKind::Internal,
            }))
        })
        .collect()
}
