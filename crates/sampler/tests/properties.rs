//! Property tests of the sampling contract against slow, obvious references.

use loftey_sampler::{filtered_distribution, sample_batch, SamplingParams};
use proptest::prelude::*;

/// Logits from a small grid (multiples of 1/4 in [-6, 0]): ties are common and distinct
/// values are far apart, so float rounding never reorders tokens between the sampler and
/// the f64 reference.
fn grid_logits(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        (0..=24u8).prop_map(|step| -f32::from(step) / 4.0),
        1..max_len,
    )
}

/// Ids ranked by logit descending, ties to the lower id.
fn ranking(logits: &[f32]) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..logits.len()).collect();
    ids.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap().then(a.cmp(&b)));
    ids
}

fn weights_f64(logits: &[f32], temperature: f32) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    logits
        .iter()
        .map(|&x| (f64::from(x - max) / f64::from(temperature)).exp())
        .collect()
}

fn params(temperature: f32, top_k: i64, top_p: f32, min_p: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        seed,
        step: 0,
    }
}

fn sample_one(logits: &[f32], params: SamplingParams) -> u32 {
    let results = sample_batch(logits, logits.len(), &[params], 0).expect("valid input");
    results[0].as_ref().expect("row without NaN").token
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn top_k_stays_within_k_best(
        logits in grid_logits(300),
        k in 1i64..40,
        temperature in 0.2f32..3.0,
        top_p in 0.0f32..=1.0,
        seed in any::<u64>(),
    ) {
        let best: Vec<usize> = ranking(&logits).into_iter().take(k as usize).collect();
        for step in 0..8 {
            let token = sample_one(&logits, SamplingParams { step, ..params(temperature, k, top_p, 0.0, seed) });
            prop_assert!(best.contains(&(token as usize)), "token {token} not in the {k} best {best:?}");
        }
    }

    #[test]
    fn top_p_is_smallest_prefix(
        logits in grid_logits(400),
        temperature in 0.3f32..2.0,
        top_k in prop_oneof![Just(0i64), 1i64..60],
        top_p in 0.0f32..1.0,
    ) {
        let distribution = filtered_distribution(&logits, &params(temperature, top_k, top_p, 0.0, 0))
            .unwrap()
            .unwrap();
        let kept: Vec<usize> = distribution.iter().map(|&(id, _)| id as usize).collect();
        let k = if top_k == 0 { logits.len() } else { (top_k as usize).min(logits.len()) };
        let order = &ranking(&logits)[..k];
        let weights = weights_f64(&logits, temperature);
        let total: f64 = order.iter().map(|&id| weights[id]).sum();

        // The kept tokens are the first `kept.len()` of the ranking (after top-k).
        let mut prefix: Vec<usize> = order[..kept.len()].to_vec();
        prefix.sort_unstable();
        prop_assert_eq!(&prefix, &kept);

        // Its mass reaches p of the top-k mass, and without its last token it does not (up to
        // rounding).
        let tolerance = 1e-6 * total;
        let mass: f64 = order[..kept.len()].iter().map(|&id| weights[id]).sum();
        let mass_without_last = mass - weights[order[kept.len() - 1]];
        let target = f64::from(top_p) * total;
        prop_assert!(mass >= target - tolerance, "mass {mass} below target {target}");
        prop_assert!(mass_without_last < target + tolerance, "{mass_without_last} already reaches {target}");

        // Probabilities are the renormalized weights.
        for &(id, probability) in &distribution {
            let expected = weights[id as usize] / mass;
            prop_assert!((probability - expected).abs() < 1e-5 * expected.max(1e-3));
        }
    }

    #[test]
    fn min_p_keeps_relative_weights(
        logits in grid_logits(300),
        temperature in 0.3f32..2.0,
        min_p in 0.0f32..=1.0,
        top_k in 0i64..50,
    ) {
        let distribution = filtered_distribution(&logits, &params(temperature, top_k, 1.0, min_p, 0))
            .unwrap()
            .unwrap();
        let weights = weights_f64(&logits, temperature);
        let order = ranking(&logits);
        let k = if top_k == 0 { logits.len() } else { (top_k as usize).min(logits.len()) };
        let mut expected: Vec<usize> = order[..k]
            .iter()
            .copied()
            .filter(|&id| weights[id] >= f64::from(min_p))
            .collect();
        expected.sort_unstable();
        let kept: Vec<usize> = distribution.iter().map(|&(id, _)| id as usize).collect();
        prop_assert_eq!(kept, expected);
    }

    #[test]
    fn greedy_is_lowest_argmax(
        logits in grid_logits(500),
        top_k in 0i64..10,
        top_p in 0.0f32..=1.0,
        seed in any::<u64>(),
    ) {
        let token = sample_one(&logits, params(0.0, top_k, top_p, 0.5, seed));
        prop_assert_eq!(token as usize, ranking(&logits)[0]);
    }

    #[test]
    fn samples_stay_in_support(
        logits in grid_logits(700),
        temperature in 0.3f32..2.0,
        top_k in prop_oneof![Just(0i64), 1i64..100],
        top_p in prop_oneof![Just(1.0f32), 0.0f32..1.0, 0.5f32..1.0],
        min_p in prop_oneof![Just(0.0f32), 0.0f32..0.5],
        seed in any::<u64>(),
    ) {
        let row_params = params(temperature, top_k, top_p, min_p, seed);
        let distribution = filtered_distribution(&logits, &row_params).unwrap().unwrap();
        let support: Vec<u32> = distribution.iter().map(|&(id, _)| id).collect();
        for step in 0..6 {
            let token = sample_one(&logits, SamplingParams { step, ..row_params });
            prop_assert!(support.contains(&token), "token {token} outside support {support:?}");
        }
    }

    #[test]
    fn batch_position_is_irrelevant(
        logits in prop::collection::vec(-10.0f32..10.0, 64..200),
        position in 0usize..8,
        seed in any::<u64>(),
        step in any::<u64>(),
    ) {
        let vocab = logits.len();
        let row_params = params(1.0, 0, 0.9, 0.0, seed);
        let alone = sample_one(&logits, SamplingParams { step, ..row_params });

        // The same row among others with different logits and parameters.
        let mut batch = Vec::new();
        let mut batch_params = Vec::new();
        for row in 0..8 {
            if row == position {
                batch.extend_from_slice(&logits);
                batch_params.push(SamplingParams { step, ..row_params });
            } else {
                batch.extend(logits.iter().rev().map(|x| x * 0.5 + row as f32));
                batch_params.push(params(0.7, 5, 0.5, 0.1, row as u64));
            }
        }
        let results = sample_batch(&batch, vocab, &batch_params, 0).unwrap();
        prop_assert_eq!(results[position].as_ref().unwrap().token, alone);
    }
}
