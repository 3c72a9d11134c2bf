//! Usage normalization: one record per call, whatever shape the provider reported.
//!
//! Subsets are subsets (OpenTelemetry GenAI conventions): cache reads and writes are part of
//! `prompt_tokens`, reasoning is part of `completion_tokens`. Providers that report them as
//! siblings (Anthropic, Gemini) are folded in. Reads dicts natively and SDK objects through
//! attributes; one call per response, no Python-level helper calls.

use pyo3::exceptions::{PyAttributeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};

/// Token counts must be integers in `[0, MAX_TOKENS)`.
pub const MAX_TOKENS: u64 = 1_000_000_000_000;

pyo3::create_exception!(
    _core,
    BadUsage,
    PyValueError,
    "Usage that cannot be trusted (wrong type, out of range, inconsistent); it is skipped whole."
);

/// A normalized usage record; `None` means the provider did not say.
#[pyclass(frozen, module = "llmtally._core", name = "Usage", get_all)]
#[derive(Clone, Debug, PartialEq)]
pub struct Usage {
    pub total_tokens: u64,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
    pub cache_write_1h_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_usd: Option<f64>,
    pub warning: Option<String>,
}

/// What went wrong with a usage block, before it becomes a Python exception.
#[derive(Debug)]
pub enum UsageError {
    Type(&'static str, String),
    Range(&'static str, String),
    Inconsistent(String),
    Empty,
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Type(k, t) => write!(f, "{k} must be an int, not {t}"),
            Self::Range(k, v) => write!(f, "{k}={v} is outside [0, 10**12)"),
            Self::Inconsistent(m) => f.write_str(m),
            Self::Empty => f.write_str("usage has no token counts"),
        }
    }
}

/// The raw counts of one usage block, before the subset rules are applied.
#[derive(Default, Debug, Clone, Copy)]
pub struct Parts {
    pub total: Option<u64>,
    pub prompt: Option<u64>,
    pub completion: Option<u64>,
    pub cached: u64,
    pub cache_write: u64,
    pub cache_write_1h: u64,
    pub reasoning: u64,
    pub cost: Option<f64>,
}

/// Apply the subset rules: total from the split when missing, a warning when they disagree,
/// subsets never larger than their whole.
pub fn build(mut p: Parts) -> Result<Usage, UsageError> {
    let mut warning = None;
    if let (Some(prompt), None, Some(total)) = (p.prompt, p.completion, p.total) {
        // A whole and one part given (embeddings: prompt and total): the other part is known.
        if total >= prompt {
            p.completion = Some(total - prompt);
        }
    }
    let total = match (p.prompt, p.completion, p.total) {
        (Some(a), Some(b), None) => a + b,
        (Some(a), Some(b), Some(t)) => {
            if t != a + b {
                warning = Some(format!(
                    "tokens_used={t} disagrees with prompt+completion={}",
                    a + b
                ));
            }
            t
        }
        (_, _, Some(t)) => t,
        (None, None, None) => return Err(UsageError::Empty),
        (a, b, None) => a.unwrap_or(0) + b.unwrap_or(0),
    };
    for (name, value) in [
        ("total", Some(total)),
        ("prompt", p.prompt),
        ("completion", p.completion),
    ] {
        if let Some(v) = value {
            if v >= MAX_TOKENS {
                return Err(UsageError::Inconsistent(format!(
                    "{name} of {v} tokens is outside [0, 10**12)"
                )));
            }
        }
    }
    if let Some(prompt) = p.prompt {
        if p.cached + p.cache_write > prompt {
            return Err(UsageError::Inconsistent(format!(
                "cache reads {} + cache writes {} exceed prompt_tokens {prompt}",
                p.cached, p.cache_write
            )));
        }
    }
    if let Some(completion) = p.completion {
        if p.reasoning > completion {
            return Err(UsageError::Inconsistent(format!(
                "reasoning_tokens {} exceed completion_tokens {completion}",
                p.reasoning
            )));
        }
    }
    if p.cache_write_1h > p.cache_write {
        return Err(UsageError::Inconsistent(format!(
            "1h cache writes {} exceed cache writes {}",
            p.cache_write_1h, p.cache_write
        )));
    }
    Ok(Usage {
        total_tokens: total,
        prompt_tokens: p.prompt,
        completion_tokens: p.completion,
        cached_tokens: p.cached,
        cache_write_tokens: p.cache_write,
        cache_write_1h_tokens: p.cache_write_1h,
        reasoning_tokens: p.reasoning,
        cost_usd: p.cost,
        warning,
    })
}

enum Err2 {
    Usage(UsageError),
    Py(PyErr),
}

impl From<PyErr> for Err2 {
    fn from(e: PyErr) -> Self {
        Self::Py(e)
    }
}

impl From<UsageError> for Err2 {
    fn from(e: UsageError) -> Self {
        Self::Usage(e)
    }
}

type R<T> = Result<T, Err2>;

/// Look `key` up in a dict, or as an attribute of any other object; `None` values are absent.
pub fn get<'py>(
    obj: &Bound<'py, PyAny>,
    key: &Bound<'py, PyString>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let found = if let Ok(d) = obj.cast::<PyDict>() {
        d.get_item(key)?
    } else {
        match obj.getattr(key) {
            Ok(v) => Some(v),
            Err(e) if e.is_instance_of::<PyAttributeError>(obj.py()) => None,
            Err(e) => return Err(e),
        }
    };
    Ok(found.filter(|v| !v.is_none()))
}

fn count(value: &Bound<'_, PyAny>, key: &'static str) -> R<u64> {
    if value.is_exact_instance_of::<PyInt>() {
        // i64 is a direct C call; i128 would take a slow path under the stable ABI.
        return match value.extract::<i64>() {
            Ok(v) if (0..MAX_TOKENS as i64).contains(&v) => Ok(v as u64),
            Ok(v) => Err(UsageError::Range(key, v.to_string()).into()),
            Err(_) => Err(UsageError::Range(key, value.to_string()).into()),
        };
    }
    let type_name = value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_string());
    Err(UsageError::Type(key, type_name).into())
}

fn opt(obj: &Bound<'_, PyAny>, key: &Bound<'_, PyString>, name: &'static str) -> R<Option<u64>> {
    match get(obj, key)? {
        None => Ok(None),
        Some(v) => count(&v, name).map(Some),
    }
}

fn cost(value: Option<Bound<'_, PyAny>>) -> R<Option<f64>> {
    let Some(v) = value else { return Ok(None) };
    if v.is_instance_of::<PyBool>()
        || !(v.is_instance_of::<PyInt>() || v.is_instance_of::<PyFloat>())
    {
        let t = v
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        return Err(UsageError::Inconsistent(format!("cost must be a number, not {t}")).into());
    }
    let c: f64 = v.extract()?;
    if !(0.0..1e9).contains(&c) {
        return Err(UsageError::Inconsistent(format!("cost={c} is out of range")).into());
    }
    Ok(Some(c))
}

macro_rules! k {
    ($py:expr, $s:literal) => {
        intern!($py, $s)
    };
}

fn usage_block(usage: &Bound<'_, PyAny>, anthropic: bool) -> R<Usage> {
    let py = usage.py();
    let mut p = Parts {
        cost: cost(get(usage, k!(py, "cost"))?)?,
        ..Parts::default()
    };
    let prompt = opt(usage, k!(py, "prompt_tokens"), "prompt_tokens")?;
    let completion = opt(usage, k!(py, "completion_tokens"), "completion_tokens")?;
    if prompt.is_some() || completion.is_some() {
        // OpenAI chat completions and compatibles (DeepSeek, Groq, Mistral, vLLM, LiteLLM).
        p.prompt = prompt;
        p.completion = completion;
        p.total = opt(usage, k!(py, "total_tokens"), "total_tokens")?;
        let mut cached = None;
        if let Some(d) = get(usage, k!(py, "prompt_tokens_details"))? {
            cached = opt(&d, k!(py, "cached_tokens"), "cached_tokens")?;
        }
        if cached.is_none() {
            cached = opt(
                usage,
                k!(py, "prompt_cache_hit_tokens"),
                "prompt_cache_hit_tokens",
            )?;
        }
        p.cached = cached.unwrap_or(0);
        if let Some(d) = get(usage, k!(py, "completion_tokens_details"))? {
            p.reasoning = opt(&d, k!(py, "reasoning_tokens"), "reasoning_tokens")?.unwrap_or(0);
        }
        return Ok(build(p)?);
    }
    let input = opt(usage, k!(py, "input_tokens"), "input_tokens")?;
    let output = opt(usage, k!(py, "output_tokens"), "output_tokens")?;
    let cache_read = opt(
        usage,
        k!(py, "cache_read_input_tokens"),
        "cache_read_input_tokens",
    )?;
    let cache_creation = opt(
        usage,
        k!(py, "cache_creation_input_tokens"),
        "cache_creation_input_tokens",
    )?;
    if anthropic || cache_read.is_some() || cache_creation.is_some() {
        // Anthropic: input_tokens excludes cache reads and writes; fold them in.
        if input.is_none() && output.is_none() {
            return Err(UsageError::Empty.into());
        }
        p.cached = cache_read.unwrap_or(0);
        p.cache_write = cache_creation.unwrap_or(0);
        if let Some(c) = get(usage, k!(py, "cache_creation"))? {
            p.cache_write_1h = opt(
                &c,
                k!(py, "ephemeral_1h_input_tokens"),
                "ephemeral_1h_input_tokens",
            )?
            .unwrap_or(0);
        }
        p.prompt = Some(input.unwrap_or(0) + p.cached + p.cache_write);
        p.completion = output;
        if let Some(d) = get(usage, k!(py, "output_tokens_details"))? {
            // Thinking is part of the output tokens: reasoning.
            p.reasoning = opt(&d, k!(py, "thinking_tokens"), "thinking_tokens")?.unwrap_or(0);
        }
        return Ok(build(p)?);
    }
    // OpenAI Responses API and LangChain usage_metadata: input includes cache reads.
    p.prompt = input;
    p.completion = output;
    p.total = opt(usage, k!(py, "total_tokens"), "total_tokens")?;
    if let Some(d) = get(usage, k!(py, "input_tokens_details"))? {
        p.cached = opt(&d, k!(py, "cached_tokens"), "cached_tokens")?.unwrap_or(0);
        p.cache_write = opt(&d, k!(py, "cache_write_tokens"), "cache_write_tokens")?.unwrap_or(0);
    }
    if let Some(d) = get(usage, k!(py, "output_tokens_details"))? {
        p.reasoning = opt(&d, k!(py, "reasoning_tokens"), "reasoning_tokens")?.unwrap_or(0);
    }
    if let Some(d) = get(usage, k!(py, "input_token_details"))? {
        p.cached = opt(&d, k!(py, "cache_read"), "cache_read")?.unwrap_or(0);
        p.cache_write = opt(&d, k!(py, "cache_creation"), "cache_creation")?.unwrap_or(0);
    }
    if let Some(d) = get(usage, k!(py, "output_token_details"))? {
        p.reasoning = opt(&d, k!(py, "reasoning"), "reasoning")?.unwrap_or(0);
    }
    Ok(build(p)?)
}

fn first_of(
    obj: &Bound<'_, PyAny>,
    keys: [&Bound<'_, PyString>; 2],
    name: &'static str,
) -> R<Option<u64>> {
    for key in keys {
        if let Some(v) = opt(obj, key, name)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

fn gemini(meta: &Bound<'_, PyAny>) -> R<Usage> {
    let py = meta.py();
    let prompt = first_of(
        meta,
        [k!(py, "promptTokenCount"), k!(py, "prompt_token_count")],
        "promptTokenCount",
    )?;
    let candidates = first_of(
        meta,
        [
            k!(py, "candidatesTokenCount"),
            k!(py, "candidates_token_count"),
        ],
        "candidatesTokenCount",
    )?;
    let thoughts = first_of(
        meta,
        [k!(py, "thoughtsTokenCount"), k!(py, "thoughts_token_count")],
        "thoughtsTokenCount",
    )?;
    let cached = first_of(
        meta,
        [
            k!(py, "cachedContentTokenCount"),
            k!(py, "cached_content_token_count"),
        ],
        "cachedContentTokenCount",
    )?;
    let total = first_of(
        meta,
        [k!(py, "totalTokenCount"), k!(py, "total_token_count")],
        "totalTokenCount",
    )?;
    let completion = match (candidates, thoughts) {
        (None, None) => None,
        (c, t) => Some(c.unwrap_or(0) + t.unwrap_or(0)),
    };
    Ok(build(Parts {
        total,
        prompt,
        completion,
        cached: cached.unwrap_or(0),
        reasoning: thoughts.unwrap_or(0),
        ..Parts::default()
    })?)
}

fn provider_cost(obj: &Bound<'_, PyAny>) -> R<Option<f64>> {
    let py = obj.py();
    if let Some(c) = get(obj, k!(py, "response_cost"))? {
        return cost(Some(c));
    }
    if let Some(hidden) = get(obj, k!(py, "_hidden_params"))? {
        return cost(get(&hidden, k!(py, "response_cost"))?);
    }
    Ok(None)
}

fn extract(obj: &Bound<'_, PyAny>) -> R<Option<Usage>> {
    let py = obj.py();
    if obj.is_none() {
        return Ok(None);
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let own = d.contains(k!(py, "tokens_used"))?
            || (!d.contains(k!(py, "usage"))?
                && (d.contains(k!(py, "prompt_tokens"))?
                    || d.contains(k!(py, "completion_tokens"))?));
        if own {
            // llmtally's own response dict.
            let p = Parts {
                total: opt(obj, k!(py, "tokens_used"), "tokens_used")?,
                prompt: opt(obj, k!(py, "prompt_tokens"), "prompt_tokens")?,
                completion: opt(obj, k!(py, "completion_tokens"), "completion_tokens")?,
                cached: opt(obj, k!(py, "cached_tokens"), "cached_tokens")?.unwrap_or(0),
                cache_write: opt(obj, k!(py, "cache_write_tokens"), "cache_write_tokens")?
                    .unwrap_or(0),
                cache_write_1h: opt(
                    obj,
                    k!(py, "cache_write_1h_tokens"),
                    "cache_write_1h_tokens",
                )?
                .unwrap_or(0),
                reasoning: opt(obj, k!(py, "reasoning_tokens"), "reasoning_tokens")?.unwrap_or(0),
                cost: cost(get(obj, k!(py, "cost_estimate"))?)?,
            };
            return Ok(Some(build(p)?));
        }
    }
    let mut target = obj.clone();
    let mut anthropic = false;
    if let Some(kind) = get(obj, k!(py, "type"))? {
        if let Ok(kind) = kind.cast::<PyString>() {
            match &*kind.to_cow()? {
                "message" | "message_delta" => anthropic = true,
                "message_start" => {
                    anthropic = true;
                    if let Some(m) = get(obj, k!(py, "message"))? {
                        target = m;
                    }
                }
                "response.completed" | "response.incomplete" | "response.failed" => {
                    if let Some(r) = get(obj, k!(py, "response"))? {
                        target = r;
                    }
                }
                _ => {}
            }
        }
    }
    if let Some(usage) = get(&target, k!(py, "usage"))? {
        let mut found = usage_block(&usage, anthropic)?;
        if found.cost_usd.is_none() {
            found.cost_usd = provider_cost(&target)?;
        }
        return Ok(Some(found));
    }
    let meta = match get(&target, k!(py, "usage_metadata"))? {
        Some(m) => Some(m),
        None => get(&target, k!(py, "usageMetadata"))?,
    };
    if let Some(meta) = meta {
        if get(&meta, k!(py, "input_tokens"))?.is_some()
            || get(&meta, k!(py, "output_tokens"))?.is_some()
        {
            return Ok(Some(usage_block(&meta, false)?)); // LangChain
        }
        return Ok(Some(gemini(&meta)?));
    }
    Ok(None)
}

/// `extract` with the two failure kinds apart: `Err(Ok(message))` for untrustworthy usage,
/// `Err(Err(e))` for a Python error raised while reading.
pub fn extract_any(obj: &Bound<'_, PyAny>) -> Result<Option<Usage>, Result<String, PyErr>> {
    extract(obj).map_err(|e| match e {
        Err2::Usage(u) => Ok(u.to_string()),
        Err2::Py(e) => Err(e),
    })
}

fn to_py(e: Err2) -> PyErr {
    match e {
        Err2::Py(e) => e,
        Err2::Usage(u) => BadUsage::new_err(u.to_string()),
    }
}

/// The usage reported in `obj` (a response, a stream chunk or event, or a usage dict), or
/// `None` when it carries none. Raises `BadUsage` when a count is of the wrong type, outside
/// `[0, 10**12)`, or the subsets are inconsistent.
#[pyfunction]
#[pyo3(name = "extract_usage")]
fn py_extract_usage(obj: &Bound<'_, PyAny>) -> PyResult<Option<Usage>> {
    extract(obj).map_err(to_py)
}

/// Normalize one usage block with the given convention (`anthropic=True`: input excludes cache).
#[pyfunction]
#[pyo3(name = "normalize_usage_block", signature = (usage, anthropic = false))]
fn py_normalize_usage_block(usage: &Bound<'_, PyAny>, anthropic: bool) -> PyResult<Usage> {
    usage_block(usage, anthropic).map_err(to_py)
}

#[pymethods]
impl Usage {
    #[new]
    #[pyo3(signature = (
        total_tokens=None, prompt_tokens=None, completion_tokens=None, cached_tokens=0,
        cache_write_tokens=0, cache_write_1h_tokens=0, reasoning_tokens=0, cost_usd=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn py_new(
        total_tokens: Option<u64>,
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        cached_tokens: u64,
        cache_write_tokens: u64,
        cache_write_1h_tokens: u64,
        reasoning_tokens: u64,
        cost_usd: Option<f64>,
    ) -> PyResult<Self> {
        for v in [total_tokens, prompt_tokens, completion_tokens]
            .into_iter()
            .flatten()
        {
            if v >= MAX_TOKENS {
                return Err(BadUsage::new_err(format!(
                    "count {v} is outside [0, 10**12)"
                )));
            }
        }
        for v in [cached_tokens, cache_write_tokens, reasoning_tokens] {
            if v >= MAX_TOKENS {
                return Err(BadUsage::new_err(format!(
                    "count {v} is outside [0, 10**12)"
                )));
            }
        }
        build(Parts {
            total: total_tokens,
            prompt: prompt_tokens,
            completion: completion_tokens,
            cached: cached_tokens,
            cache_write: cache_write_tokens,
            cache_write_1h: cache_write_1h_tokens,
            reasoning: reasoning_tokens,
            cost: cost_usd,
        })
        .map_err(|e| BadUsage::new_err(e.to_string()))
    }

    fn __repr__(&self) -> String {
        fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
            v.map_or_else(|| "None".to_string(), |v| v.to_string())
        }
        format!(
            "Usage(total_tokens={}, prompt_tokens={}, completion_tokens={}, cached_tokens={}, \
             cache_write_tokens={}, reasoning_tokens={}, cost_usd={})",
            self.total_tokens,
            opt(self.prompt_tokens),
            opt(self.completion_tokens),
            self.cached_tokens,
            self.cache_write_tokens,
            self.reasoning_tokens,
            opt(self.cost_usd)
        )
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<Usage>()
            .map(|o| *o.get() == *self)
            .unwrap_or(false)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Usage>()?;
    m.add("BadUsage", m.py().get_type::<BadUsage>())?;
    m.add_function(wrap_pyfunction!(py_extract_usage, m)?)?;
    m.add_function(wrap_pyfunction!(py_normalize_usage_block, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_gives_total() {
        let u = build(Parts {
            prompt: Some(10),
            completion: Some(5),
            ..Parts::default()
        })
        .unwrap();
        assert_eq!(u.total_tokens, 15);
        assert!(u.warning.is_none());
    }

    #[test]
    fn disagreeing_total_wins_with_warning() {
        let u = build(Parts {
            total: Some(20),
            prompt: Some(10),
            completion: Some(5),
            ..Parts::default()
        })
        .unwrap();
        assert_eq!(u.total_tokens, 20);
        assert!(u.warning.is_some());
    }

    #[test]
    fn subsets_larger_than_whole_are_rejected() {
        assert!(build(Parts {
            prompt: Some(10),
            completion: Some(5),
            cached: 11,
            ..Parts::default()
        })
        .is_err());
        assert!(build(Parts {
            prompt: Some(10),
            completion: Some(5),
            reasoning: 6,
            ..Parts::default()
        })
        .is_err());
    }

    #[test]
    fn nothing_is_an_error() {
        assert!(matches!(build(Parts::default()), Err(UsageError::Empty)));
    }
}
