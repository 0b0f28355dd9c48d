//! Times `sample_batch` on Zipf-shaped rows of V = 151,646 logits, best of 100 calls, for a
//! few parameter sets. For profiling the Rust core alone; benchmarks/sampler.py is the
//! benchmark of record.
//!
//! Run: cargo run --release --no-default-features --example profile_rows -- [ROWS] [same]
//! where `same` gives every row the same logits. `ONLY=<name>` times one parameter set, and
//! `RAYON_NUM_THREADS=1` keeps it on one thread.

use std::time::Instant;

use loftey_sampler::{sample_batch, SamplingParams};

const VOCAB: usize = 151_646;

/// Logits -ln(rank) at a pseudo-random permutation of the ids, so probabilities follow
/// Zipf's law with exponent 1.
fn zipf_row(seed: u64) -> Vec<f32> {
    let mut ids: Vec<usize> = (0..VOCAB).collect();
    let mut state = seed;
    for i in (1..VOCAB).rev() {
        // A linear congruential generator (Knuth's MMIX constants) is random enough here.
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ids.swap(i, (state >> 33) as usize % (i + 1));
    }
    let mut row = vec![0.0; VOCAB];
    for (rank, &id) in ids.iter().enumerate() {
        row[id] = -((rank + 1) as f32).ln();
    }
    row
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rows: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let same = args.next().is_some_and(|a| a == "same");
    let logits: Vec<f32> = (0..rows as u64)
        .flat_map(|r| zipf_row(if same { 1 } else { r + 1 }))
        .collect();
    let only = std::env::var("ONLY").ok();

    let greedy = SamplingParams::GREEDY;
    let settings = [
        ("greedy", greedy),
        (
            "T1",
            SamplingParams {
                temperature: 1.0,
                ..greedy
            },
        ),
        (
            "T0.7 k50 p0.95",
            SamplingParams {
                temperature: 0.7,
                top_k: 50,
                top_p: 0.95,
                ..greedy
            },
        ),
        (
            "T1 p0.9",
            SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                ..greedy
            },
        ),
        (
            "T0.7 p0.9",
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                ..greedy
            },
        ),
        (
            "T1 p0.3",
            SamplingParams {
                temperature: 1.0,
                top_p: 0.3,
                ..greedy
            },
        ),
        (
            "T1 min_p0.01",
            SamplingParams {
                temperature: 1.0,
                min_p: 0.01,
                ..greedy
            },
        ),
    ];
    for (name, params) in settings {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let params: Vec<SamplingParams> = (0..rows as u64)
            .map(|seed| SamplingParams { seed, ..params })
            .collect();
        let mut best = f64::INFINITY;
        for _ in 0..100 {
            let start = Instant::now();
            let out = sample_batch(&logits, VOCAB, &params, 0);
            best = best.min(start.elapsed().as_secs_f64());
            std::hint::black_box(out.ok());
        }
        println!("{name:>16}: {:8.1} us per call, {rows} rows", best * 1e6);
    }
}
