//! The sampling contract on fixed inputs: bad rows, infinities, tiny temperatures, logprobs,
//! and input errors.

use loftey_sampler::{
    filtered_distribution, sample_batch, InputError, RowError, RowErrorKind, RowSample,
    SamplingParams,
};

const GREEDY: SamplingParams = SamplingParams::GREEDY;

fn sampling(temperature: f32, top_k: i64, top_p: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p: 0.0,
        seed,
        step: 0,
    }
}

fn sample_rows(
    logits: &[f32],
    vocab: usize,
    params: &[SamplingParams],
    num_logprobs: usize,
) -> Vec<Result<RowSample, RowError>> {
    sample_batch(logits, vocab, params, num_logprobs).expect("valid input")
}

/// log_softmax(logits)[id] in f64.
fn log_softmax(logits: &[f32], id: usize) -> f64 {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let sum: f64 = logits.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    f64::from(logits[id]) - max - sum.ln()
}

/// Pseudo-random logits, uniform in [-scale, scale].
fn uniform_logits(vocab: usize, scale: f32) -> Vec<f32> {
    let mut state = 12_345u64;
    (0..vocab)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// [`uniform_logits`] with a clear maximum of `scale + 5` at `peak`.
fn peaked_logits(vocab: usize, peak: usize, scale: f32) -> Vec<f32> {
    let mut logits = uniform_logits(vocab, scale);
    logits[peak] = scale + 5.0;
    logits
}

/// Rows of V = 8: all NaN, 0..7, one +inf among zeros, all -inf.
fn s4_rows() -> Vec<f32> {
    let mut rows = vec![f32::NAN; 8];
    rows.extend((0..8).map(|i| i as f32));
    rows.extend([0.0, 0.0, 0.0, f32::INFINITY, 0.0, 0.0, 0.0, 0.0]);
    rows.extend([f32::NEG_INFINITY; 8]);
    rows
}

#[test]
fn bad_rows_fail_alone() {
    for params in [sampling(1.0, 0, 0.9, 11), GREEDY] {
        let results = sample_rows(&s4_rows(), 8, &[params; 4], 3);

        assert_eq!(
            results[0],
            Err(RowError {
                row: 0,
                kind: RowErrorKind::Nan
            })
        );
        assert_eq!(
            results[3],
            Err(RowError {
                row: 3,
                kind: RowErrorKind::AllNegativeInfinity
            })
        );
        assert_eq!(
            results[0].as_ref().unwrap_err().to_string(),
            "row 0: logits contain NaN"
        );
        assert!(results[3]
            .as_ref()
            .unwrap_err()
            .to_string()
            .starts_with("row 3: every logit is -inf"));

        // The +inf row gives that token, with all the probability.
        let infinite = results[2].as_ref().unwrap();
        assert_eq!(infinite.token, 3);
        assert_eq!(infinite.logprob, 0.0);
        assert_eq!(infinite.top[0], (3, 0.0));
        assert_eq!(infinite.top[1].1, f32::NEG_INFINITY);

        // The normal row gets the token it gets alone.
        let alone = sample_rows(&s4_rows()[8..16], 8, &[params], 3);
        assert_eq!(results[1], alone[0]);
    }
}

#[test]
fn normal_row_samples_within_top_p() {
    // Probabilities of 0..7 are e^i / sum: the top three hold 0.909 of the mass, so top_p 0.9
    // keeps ids 7, 6 and 5.
    let row: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let distribution = filtered_distribution(&row, &sampling(1.0, 0, 0.9, 0))
        .unwrap()
        .unwrap();
    let ids: Vec<u32> = distribution.iter().map(|&(id, _)| id).collect();
    assert_eq!(ids, [5, 6, 7]);
    let mut seen = [0usize; 8];
    for seed in 0..300 {
        seen[sample_rows(&row, 8, &[sampling(1.0, 0, 0.9, seed)], 0)[0]
            .as_ref()
            .unwrap()
            .token as usize] += 1;
    }
    assert_eq!(
        seen[..5].iter().sum::<usize>(),
        0,
        "tokens outside top-p drawn: {seen:?}"
    );
    for id in 5..8 {
        assert!(seen[id] > 0, "token {id} never drawn: {seen:?}");
    }
}

#[test]
fn infinite_logits_share_probability() {
    let mut row = vec![1.0f32; 10];
    row[2] = f32::INFINITY;
    row[7] = f32::INFINITY;
    let distribution = filtered_distribution(&row, &sampling(1.0, 0, 1.0, 0))
        .unwrap()
        .unwrap();
    assert_eq!(distribution, [(2, 0.5), (7, 0.5)]);
    let greedy = sample_rows(&row, 10, &[GREEDY], 0);
    assert_eq!(greedy[0].as_ref().unwrap().token, 2);
    assert!((greedy[0].as_ref().unwrap().logprob - (-std::f32::consts::LN_2)).abs() < 1e-6);
}

#[test]
fn tiny_temperature_or_top_p_is_greedy() {
    let vocab = 151_646;
    let peak = 98_765;
    let logits = peaked_logits(vocab, peak, 10.0);
    let cases = [
        sampling(1e-4, 0, 1.0, 1),
        sampling(1.0, 0, 1e-4, 1),
        sampling(1e-30, 0, 1.0, 1),
        sampling(f32::MIN_POSITIVE / 4.0, 50, 0.9, 1),
    ];
    for step in 0..2 {
        let params: Vec<SamplingParams> = cases
            .iter()
            .map(|&p| SamplingParams { step, ..p })
            .collect();
        let batch: Vec<f32> = logits
            .iter()
            .copied()
            .cycle()
            .take(vocab * cases.len())
            .collect();
        for (case, result) in sample_rows(&batch, vocab, &params, 0)
            .into_iter()
            .enumerate()
        {
            let sample = result.unwrap();
            assert_eq!(sample.token as usize, peak, "case {case}, step {step}");
            assert!(
                sample.logprob.is_finite(),
                "case {case}: logprob {}",
                sample.logprob
            );
            assert!(
                sample.logprob <= 0.0,
                "case {case}: logprob {}",
                sample.logprob
            );
        }
    }
}

#[test]
fn low_first_logits_keep_sums_exact() {
    // The first chunk's logits are far below the row's maximum, then a little below it, so
    // the first pass's running maximum jumps: draws and logprobs must not depend on it.
    let base = uniform_logits(3000, 2.0);
    for first in [-200.0f32, -1.0] {
        let mut logits = base.clone();
        logits[..256]
            .iter_mut()
            .for_each(|x| *x = first + *x * 0.01);
        for (top_p, min_p) in [(1.0, 0.0), (0.9, 0.0), (0.9, 0.001)] {
            let row_params = SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p,
                min_p,
                seed: 3,
                step: 0,
            };
            let distribution = filtered_distribution(&logits, &row_params)
                .unwrap()
                .unwrap();
            for step in 0..20 {
                let sample =
                    &sample_rows(&logits, 3000, &[SamplingParams { step, ..row_params }], 0)[0];
                let sample = sample.as_ref().unwrap();
                assert!(
                    distribution.iter().any(|&(id, _)| id == sample.token),
                    "token {} outside",
                    sample.token
                );
                let expected = log_softmax(&logits, sample.token as usize);
                assert!(
                    (f64::from(sample.logprob) - expected).abs() < 1e-5,
                    "{} vs {expected}",
                    sample.logprob
                );
            }
        }
    }
}

#[test]
fn top_p_zero_keeps_best_token() {
    let logits = [0.5f32, 3.0, 3.0, -1.0];
    for top_k in [0, 3] {
        let distribution = filtered_distribution(&logits, &sampling(1.0, top_k, 0.0, 0))
            .unwrap()
            .unwrap();
        assert_eq!(distribution, [(1, 1.0)]);
    }
}

#[test]
fn top_k_above_vocab_is_disabled() {
    let logits = peaked_logits(5000, 17, 2.0);
    for seed in 0..20 {
        let tokens: Vec<u32> = [0, 5000, 10_000_000, i64::MAX]
            .iter()
            .map(|&k| {
                sample_rows(&logits, 5000, &[sampling(1.0, k, 1.0, seed)], 0)[0]
                    .as_ref()
                    .unwrap()
                    .token
            })
            .collect();
        assert!(
            tokens.iter().all(|&t| t == tokens[0]),
            "seed {seed}: {tokens:?}"
        );
    }
}

#[test]
fn logprobs_are_log_softmax() {
    let logits = peaked_logits(1000, 3, 4.0);
    let params = [sampling(0.5, 20, 0.8, 9), GREEDY, sampling(1.0, 0, 0.95, 2)];
    let batch: Vec<f32> = logits.iter().copied().cycle().take(3000).collect();
    for result in sample_rows(&batch, 1000, &params, 5) {
        let sample = result.unwrap();
        let expected = log_softmax(&logits, sample.token as usize);
        assert!(
            (f64::from(sample.logprob) - expected).abs() < 1e-5,
            "{} vs {expected}",
            sample.logprob
        );

        // The top 5 by logit, most likely first, with their logprobs.
        let mut order: Vec<usize> = (0..1000).collect();
        order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap().then(a.cmp(&b)));
        assert_eq!(sample.top.len(), 5);
        for (&(id, logprob), &expected_id) in sample.top.iter().zip(&order) {
            assert_eq!(id as usize, expected_id);
            assert!((f64::from(logprob) - log_softmax(&logits, expected_id)).abs() < 1e-5);
        }
    }
}

#[test]
fn out_of_range_parameters_rejected() {
    let logits = vec![0.0f32; 12];
    let mut params = [sampling(1.0, 0, 1.0, 0); 3];
    params[2].top_p = 1.5;
    let error = sample_batch(&logits, 4, &params, 0).unwrap_err();
    assert_eq!(error.to_string(), "top_p[2] = 1.5 is outside [0, 1]");

    params[2].top_p = 1.0;
    params[1].min_p = f32::NAN;
    assert_eq!(
        sample_batch(&logits, 4, &params, 0)
            .unwrap_err()
            .to_string(),
        "min_p[1] = NaN is outside [0, 1]"
    );
}

#[test]
fn shape_errors_name_sizes() {
    let logits = vec![0.0f32; 10];
    let params = [GREEDY; 3];
    assert_eq!(
        sample_batch(&logits, 4, &params, 0).unwrap_err(),
        InputError::LogitsLength {
            len: 10,
            rows: 3,
            vocab_size: 4
        }
    );
    assert_eq!(
        sample_batch(&logits, 4, &params, 0)
            .unwrap_err()
            .to_string(),
        "logits has 10 values but 3 rows of vocab_size 4 need 12"
    );
    assert_eq!(
        sample_batch(&[], 0, &params, 0).unwrap_err(),
        InputError::EmptyVocabulary { rows: 3 }
    );
    assert_eq!(
        sample_batch(&logits[..8], 4, &params[..2], 5)
            .unwrap_err()
            .to_string(),
        "num_logprobs = 5 is outside [0, 4]"
    );
    assert_eq!(sample_batch(&[], 4, &[], 0).unwrap(), Vec::new());
}

#[test]
fn draws_follow_filtered_distribution() {
    // 6,000 draws over a row of 200 tokens (the Python tests take 20,000 draws from release
    // builds), on the rejection path (top_p 0.9) and the exact
    // path (top_p 0.3): the chi-square statistic of the token counts against the filtered
    // distribution stays below its 1e-4 tail.
    let vocab = 200;
    let logits = uniform_logits(vocab, 3.0);
    for top_p in [0.9f32, 0.3] {
        let row_params = sampling(0.8, 0, top_p, 77);
        let distribution = filtered_distribution(&logits, &row_params)
            .unwrap()
            .unwrap();
        let draws = 6_000u64;
        let params: Vec<SamplingParams> = (0..draws)
            .map(|step| SamplingParams { step, ..row_params })
            .collect();
        let batch: Vec<f32> = logits
            .iter()
            .copied()
            .cycle()
            .take(vocab * draws as usize)
            .collect();
        let mut counts = vec![0u64; vocab];
        for result in sample_rows(&batch, vocab, &params, 0) {
            counts[result.unwrap().token as usize] += 1;
        }

        // Bins: tokens expected at least 20 times each, the rest pooled into one bin.
        let (mut chi_square, mut bins) = (0.0, 0);
        let (mut pooled_expected, mut pooled_count) = (0.0, 0u64);
        let mut drawn_in_support = 0;
        for &(id, probability) in &distribution {
            let expected = probability * draws as f64;
            let count = counts[id as usize];
            drawn_in_support += count;
            if expected >= 20.0 {
                chi_square += (count as f64 - expected).powi(2) / expected;
                bins += 1;
            } else {
                pooled_expected += expected;
                pooled_count += count;
            }
        }
        if pooled_expected > 0.0 {
            chi_square += (pooled_count as f64 - pooled_expected).powi(2) / pooled_expected;
            bins += 1;
        }
        assert_eq!(
            drawn_in_support, draws,
            "top_p {top_p}: draws outside the support"
        );
        // Wilson-Hilferty: the 1e-4 upper tail of chi-square with d degrees of freedom.
        let d = f64::from(bins - 1);
        let bound = d * (1.0 - 2.0 / (9.0 * d) + 3.719 * (2.0 / (9.0 * d)).sqrt()).powi(3);
        assert!(
            chi_square < bound,
            "top_p {top_p}: chi-square {chi_square:.1} over {bound:.1}, {bins} bins"
        );
    }
}
