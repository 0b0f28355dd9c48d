//! Per-row sampling parameters, their validation, and the errors for invalid input.

use std::fmt;

/// Sampling parameters of one row, as the caller gives them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits. 0 means greedy (argmax, ties to the lowest id). Finite, >= 0.
    pub temperature: f32,
    /// Keeps the k most likely tokens. 0 disables it, and values above V act as V. >= 0.
    pub top_k: i64,
    /// Keeps the smallest set of most likely tokens whose probability reaches top_p. 1
    /// disables it, and 0 keeps only the most likely token. In [0, 1].
    pub top_p: f32,
    /// Drops tokens whose probability is below min_p times the most likely one's. 0
    /// disables it. In [0, 1].
    pub min_p: f32,
    /// Key of the row's random generator.
    pub seed: u64,
    /// Index of the token being generated within its request: with `seed`, it selects the
    /// uniform that draws this token.
    pub step: u64,
}

impl SamplingParams {
    /// Greedy decoding: temperature 0, every filter disabled.
    pub const GREEDY: SamplingParams = SamplingParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed: 0,
        step: 0,
    };
}

/// Input that makes the whole call invalid.
#[derive(Clone, Debug, PartialEq)]
pub enum InputError {
    /// A sampling parameter is outside its range (NaN is outside every range).
    Parameter {
        name: &'static str,
        row: usize,
        value: String,
        range: &'static str,
    },
    /// The logits slice does not hold `rows` rows of `vocab_size` values.
    LogitsLength {
        len: usize,
        rows: usize,
        vocab_size: usize,
    },
    /// Rows were given with a vocabulary size of 0.
    EmptyVocabulary { rows: usize },
    /// Token ids are u32, so a larger vocabulary cannot be indexed.
    VocabularyTooLarge { vocab_size: usize },
    /// More top logprobs were requested than there are tokens.
    NumLogprobs { value: i64, vocab_size: usize },
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Parameter {
                name,
                row,
                value,
                range,
            } => {
                write!(f, "{name}[{row}] = {value} is outside {range}")
            }
            Self::LogitsLength {
                len,
                rows,
                vocab_size,
            } => write!(
                f,
                "logits has {len} values but {rows} rows of vocab_size {vocab_size} need {}",
                rows.saturating_mul(*vocab_size)
            ),
            Self::EmptyVocabulary { rows } => {
                write!(
                    f,
                    "logits has {rows} rows of 0 values; vocab_size must be at least 1"
                )
            }
            Self::VocabularyTooLarge { vocab_size } => {
                write!(f, "vocab_size = {vocab_size} is outside [1, {}]", u32::MAX)
            }
            Self::NumLogprobs { value, vocab_size } => {
                write!(f, "num_logprobs = {value} is outside [0, {vocab_size}]")
            }
        }
    }
}

impl std::error::Error for InputError {}

/// Checked parameters of one row, in the form the filters use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RowPlan {
    pub greedy: bool,
    /// 1 / temperature, capped at f32::MAX so that a subnormal temperature stays finite.
    pub inv_temperature: f32,
    /// Number of tokens top-k keeps, in [1, V], and V when disabled.
    pub top_k: usize,
    /// In [0, 1], and 1 when disabled.
    pub top_p: f64,
    /// Minimum weight relative to the best token's, in [0, 1], and 0 when disabled.
    pub min_p: f32,
    pub seed: u64,
    pub step: u64,
}

fn out_of_range(
    name: &'static str,
    row: usize,
    value: impl ToString,
    range: &'static str,
) -> InputError {
    InputError::Parameter {
        name,
        row,
        value: value.to_string(),
        range,
    }
}

impl RowPlan {
    /// Checks the parameters of row `row` of a batch with `vocab_size` tokens.
    ///
    /// # Errors
    ///
    /// Returns [`InputError::Parameter`] naming the first parameter outside its range.
    pub fn new(params: &SamplingParams, row: usize, vocab_size: usize) -> Result<Self, InputError> {
        let SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed,
            step,
        } = *params;
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(out_of_range("temperature", row, temperature, "[0, inf)"));
        }
        if top_k < 0 {
            return Err(out_of_range("top_k", row, top_k, "[0, inf)"));
        }
        if !(0.0..=1.0).contains(&top_p) {
            return Err(out_of_range("top_p", row, top_p, "[0, 1]"));
        }
        if !(0.0..=1.0).contains(&min_p) {
            return Err(out_of_range("min_p", row, min_p, "[0, 1]"));
        }

        let top_k = match usize::try_from(top_k) {
            Ok(0) | Err(_) => vocab_size,
            Ok(k) => k.min(vocab_size),
        };
        Ok(Self {
            greedy: temperature == 0.0,
            inv_temperature: (1.0 / temperature).min(f32::MAX),
            top_k,
            top_p: f64::from(top_p),
            // -0.0 passes the range check; as a weight bound it must be +0.0.
            min_p: min_p.max(0.0),
            seed,
            step,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(change: impl FnOnce(&mut SamplingParams)) -> Result<RowPlan, InputError> {
        let mut params = SamplingParams {
            temperature: 1.0,
            ..SamplingParams::GREEDY
        };
        change(&mut params);
        RowPlan::new(&params, 2, 100)
    }

    #[test]
    fn out_of_range_messages() {
        let message = |change: fn(&mut SamplingParams)| with(change).unwrap_err().to_string();
        assert_eq!(
            message(|p| p.top_p = 1.5),
            "top_p[2] = 1.5 is outside [0, 1]"
        );
        assert_eq!(
            message(|p| p.top_p = f32::NAN),
            "top_p[2] = NaN is outside [0, 1]"
        );
        assert_eq!(
            message(|p| p.min_p = -0.5),
            "min_p[2] = -0.5 is outside [0, 1]"
        );
        assert_eq!(
            message(|p| p.temperature = -1.0),
            "temperature[2] = -1 is outside [0, inf)"
        );
        assert_eq!(
            message(|p| p.temperature = f32::NAN),
            "temperature[2] = NaN is outside [0, inf)"
        );
        assert_eq!(
            message(|p| p.temperature = f32::INFINITY),
            "temperature[2] = inf is outside [0, inf)"
        );
        assert_eq!(
            message(|p| p.top_k = -3),
            "top_k[2] = -3 is outside [0, inf)"
        );
    }

    #[test]
    fn top_k_zero_and_above_vocab_mean_vocab() {
        assert_eq!(with(|p| p.top_k = 0).unwrap().top_k, 100);
        assert_eq!(with(|p| p.top_k = 10_000_000).unwrap().top_k, 100);
        assert_eq!(with(|p| p.top_k = i64::MAX).unwrap().top_k, 100);
        assert_eq!(with(|p| p.top_k = 7).unwrap().top_k, 7);
    }

    #[test]
    fn tiny_temperature_has_finite_inverse() {
        let plan = with(|p| p.temperature = 1e-45).unwrap();
        assert!(plan.inv_temperature.is_finite());
        assert!(!plan.greedy);
        assert!(with(|p| p.temperature = 0.0).unwrap().greedy);
    }
}
