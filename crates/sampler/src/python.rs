//! PyO3 bindings: the Python module `loftey._sampler` (typed in `loftey/_sampler.pyi`).

use numpy::ndarray::Array2;
use numpy::{
    dtype, Element, IntoPyArray, PyArray1, PyArray2, PyArrayDescrMethods, PyArrayMethods,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::{sample_batch, InputError, SamplingParams};

/// Tokens sampled for a batch, one entry per row.
#[pyclass(frozen, module = "loftey._sampler", name = "SampleResult")]
pub struct SampleResult {
    tokens: Py<PyArray1<i64>>,
    logprobs: Py<PyArray1<f32>>,
    top_ids: Option<Py<PyArray2<i64>>>,
    top_logprobs: Option<Py<PyArray2<f32>>>,
    errors: Vec<Option<String>>,
}

#[pymethods]
impl SampleResult {
    /// int64 [B]: the sampled token ids; -1 for a row in error.
    #[getter]
    fn tokens<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        self.tokens.bind(py).clone()
    }

    /// float32 [B]: log_softmax(logits) at the sampled token; NaN for a row in error.
    #[getter]
    fn logprobs<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        self.logprobs.bind(py).clone()
    }

    /// int64 [B, num_logprobs]: the most likely tokens, or None when num_logprobs is 0.
    #[getter]
    fn top_ids<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyArray2<i64>>> {
        self.top_ids.as_ref().map(|array| array.bind(py).clone())
    }

    /// float32 [B, num_logprobs]: their logprobs, or None when num_logprobs is 0.
    #[getter]
    fn top_logprobs<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyArray2<f32>>> {
        self.top_logprobs
            .as_ref()
            .map(|array| array.bind(py).clone())
    }

    /// Per row: None, or the reason the row could not be sampled.
    #[getter]
    fn errors(&self) -> Vec<Option<String>> {
        self.errors.clone()
    }

    fn __len__(&self) -> usize {
        self.errors.len()
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let failed = self.errors.iter().filter(|error| error.is_some()).count();
        format!(
            "SampleResult(tokens={}, failed_rows={failed})",
            self.tokens.bind(py)
        )
    }
}

/// Formats a shape as Python prints a tuple: `(4,)`, `(4, 8)`.
fn shape_text(shape: &[usize]) -> String {
    match shape {
        [single] => format!("({single},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Casts `object` to a numpy array of element type `T`, or raises TypeError naming `name`.
fn typed_array<'py, T: Element>(
    object: &Bound<'py, PyAny>,
    name: &str,
    dtype_name: &str,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let Ok(array) = object.cast::<PyUntypedArray>() else {
        let type_name = object
            .get_type()
            .name()
            .map_or_else(|_| "?".to_owned(), |n| n.to_string());
        return Err(PyTypeError::new_err(format!(
            "{name} must be a numpy array of {dtype_name}, got {type_name}"
        )));
    };
    if !array.dtype().is_equiv_to(&dtype::<T>(object.py())) {
        return Err(PyTypeError::new_err(format!(
            "{name} must have dtype {dtype_name}, got {}",
            array.dtype()
        )));
    }
    Ok(array.clone())
}

/// Copies one per-row parameter array after checking its dtype and that its shape is (B,).
fn row_parameter<T: Element + Copy>(
    object: &Bound<'_, PyAny>,
    name: &str,
    dtype_name: &str,
    logits_shape: &[usize],
) -> PyResult<Vec<T>> {
    let array = typed_array::<T>(object, name, dtype_name)?;
    let rows = logits_shape.first().copied().unwrap_or(0);
    if array.shape() != [rows] {
        return Err(PyValueError::new_err(format!(
            "{name} has shape {} but logits has shape {}; expected ({rows},)",
            shape_text(array.shape()),
            shape_text(logits_shape)
        )));
    }
    let array = array.cast::<PyArray1<T>>()?;
    let values = array
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
    Ok(values.as_array().iter().copied().collect())
}

/// Shapes `values` (filled row by row) as a [rows, columns] array.
fn matrix<T>(rows: usize, columns: usize, values: Vec<T>) -> PyResult<Array2<T>> {
    Array2::from_shape_vec((rows, columns), values)
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Sample one token per row of `logits`.
///
/// See `loftey/_sampler.pyi` for the parameters, the order of the filters and the errors.
#[pyfunction]
#[pyo3(signature = (logits, temperature, top_k, top_p, min_p, seed, step, num_logprobs = 0))]
#[allow(clippy::too_many_arguments)]
fn sample(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    temperature: &Bound<'_, PyAny>,
    top_k: &Bound<'_, PyAny>,
    top_p: &Bound<'_, PyAny>,
    min_p: &Bound<'_, PyAny>,
    seed: &Bound<'_, PyAny>,
    step: &Bound<'_, PyAny>,
    num_logprobs: i64,
) -> PyResult<SampleResult> {
    // 1. Logits: float32 [B, V], read in place when C-contiguous, copied once otherwise.
    let logits = typed_array::<f32>(logits, "logits", "float32")?;
    let logits_shape = logits.shape().to_vec();
    let &[rows, vocab_size] = logits_shape.as_slice() else {
        return Err(PyValueError::new_err(format!(
            "logits must have shape (B, V), got shape {}",
            shape_text(&logits_shape)
        )));
    };
    let c_contiguous = logits.is_c_contiguous();
    let logits = logits.cast::<PyArray2<f32>>()?;
    let logits = logits
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("logits: {e}")))?;
    let copied: Vec<f32>;
    let logits_values: &[f32] = match logits.as_slice() {
        Ok(values) if c_contiguous => values,
        _ => {
            copied = logits.as_array().iter().copied().collect();
            &copied
        }
    };

    // 2. Per-row parameters, each of shape (B,).
    let temperature = row_parameter::<f32>(temperature, "temperature", "float32", &logits_shape)?;
    let top_k = row_parameter::<i64>(top_k, "top_k", "int64", &logits_shape)?;
    let top_p = row_parameter::<f32>(top_p, "top_p", "float32", &logits_shape)?;
    let min_p = row_parameter::<f32>(min_p, "min_p", "float32", &logits_shape)?;
    let seed = row_parameter::<u64>(seed, "seed", "uint64", &logits_shape)?;
    let step = row_parameter::<u64>(step, "step", "uint64", &logits_shape)?;
    let params: Vec<SamplingParams> = (0..rows)
        .map(|row| SamplingParams {
            temperature: temperature[row],
            top_k: top_k[row],
            top_p: top_p[row],
            min_p: min_p[row],
            seed: seed[row],
            step: step[row],
        })
        .collect();
    let num_logprobs = usize::try_from(num_logprobs)
        .map_err(|_| InputError::NumLogprobs {
            value: num_logprobs,
            vocab_size,
        })
        .map_err(|e| PyValueError::new_err(e.to_string()))?;

    // 3. Sample with the GIL released.
    let results = py
        .detach(|| sample_batch(logits_values, vocab_size, &params, num_logprobs))
        .map_err(|e| PyValueError::new_err(e.to_string()))?;

    // 4. Per-row outputs; rows in error get -1 and NaN.
    let mut tokens = Vec::with_capacity(rows);
    let mut logprobs = Vec::with_capacity(rows);
    let mut top_ids = Vec::with_capacity(rows * num_logprobs);
    let mut top_logprobs = Vec::with_capacity(rows * num_logprobs);
    let mut errors = Vec::with_capacity(rows);
    for result in results {
        match result {
            Ok(sample) => {
                tokens.push(i64::from(sample.token));
                logprobs.push(sample.logprob);
                top_ids.extend(sample.top.iter().map(|&(id, _)| i64::from(id)));
                top_logprobs.extend(sample.top.iter().map(|&(_, logprob)| logprob));
                errors.push(None);
            }
            Err(error) => {
                tokens.push(-1);
                logprobs.push(f32::NAN);
                top_ids.extend(std::iter::repeat_n(-1, num_logprobs));
                top_logprobs.extend(std::iter::repeat_n(f32::NAN, num_logprobs));
                errors.push(Some(error.to_string()));
            }
        }
    }
    let (top_ids, top_logprobs) = if num_logprobs > 0 {
        let ids = matrix(rows, num_logprobs, top_ids)?
            .into_pyarray(py)
            .unbind();
        let values = matrix(rows, num_logprobs, top_logprobs)?
            .into_pyarray(py)
            .unbind();
        (Some(ids), Some(values))
    } else {
        (None, None)
    };
    Ok(SampleResult {
        tokens: PyArray1::from_vec(py, tokens).unbind(),
        logprobs: PyArray1::from_vec(py, logprobs).unbind(),
        top_ids,
        top_logprobs,
        errors,
    })
}

/// Batched token sampling: temperature, top-k, top-p and min-p with per-request seeds.
#[pymodule]
#[pyo3(name = "_sampler")]
fn sampler_module(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(sample, module)?)?;
    module.add_class::<SampleResult>()?;
    Ok(())
}
