//! Usage normalization: one record per call, whatever shape the provider reported.
//!
//! Subsets are subsets (OpenTelemetry GenAI conventions): cache reads and writes are part of
//! `prompt_tokens`, reasoning is part of `completion_tokens`. Providers that report them as
//! siblings (Anthropic, Gemini) are folded in. Reads dicts natively and SDK objects through
//! attributes; one call per response, no Python-level helper calls.

use pyo3::exceptions::PyAttributeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};

/// Token counts must be integers in `[0, MAX_TOKENS)`.
pub const MAX_TOKENS: u64 = 1_000_000_000_000;

/// Pico-USD (1e-12 USD) per USD: costs are counted in whole pico-USD.
pub const PUSD_PER_USD: f64 = 1e12;

/// A cost in USD as whole pico-USD, rounded half away from zero: the one conversion every
/// counter, ledger and limiter uses. `None` for what is not a finite amount in `[0, i64::MAX]`
/// pico-USD.
pub fn usd_to_pusd(usd: f64) -> Option<i64> {
    if !usd.is_finite() || usd < 0.0 || usd * PUSD_PER_USD >= i64::MAX as f64 {
        return None;
    }
    Some((usd * PUSD_PER_USD).round() as i64)
}

/// [`usd_to_pusd`] for Python: `None` for a cost that is not a finite amount in range.
#[pyfunction]
#[pyo3(name = "usd_to_pusd")]
fn py_usd_to_pusd(usd: f64) -> Option<i64> {
    usd_to_pusd(usd)
}

// Usage that cannot be trusted: `llmtally.errors.BadUsage` (a `BadInput`, so an
// `LlmtallyError` and a `ValueError`), defined in Python with the other errors.
pyo3::import_exception!(llmtally.errors, BadUsage);

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

/// How a shape counts, and so how its parts are folded into a normalized record.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    /// The prompt includes cache reads and writes, the completion includes reasoning (OpenAI
    /// chat and Responses, LangChain, llmtally's own dict).
    Inclusive,
    /// Anthropic: `input_tokens` excludes cache reads and writes (siblings).
    Anthropic,
    /// Gemini: `thoughtsTokenCount` is a sibling of `candidatesTokenCount`.
    Gemini,
}

/// One usage report as the provider gave it: `None` is a field it left out (or sent as null).
#[derive(Clone, Copy, Debug, Default)]
struct Report {
    total: Option<u64>,
    /// The whole prompt; for `Shape::Anthropic` the uncached input alone.
    prompt: Option<u64>,
    /// The whole completion; for `Shape::Gemini` the candidates alone (without thoughts).
    completion: Option<u64>,
    cached: Option<u64>,
    cache_write: Option<u64>,
    cache_write_1h: Option<u64>,
    reasoning: Option<u64>,
    cost: Option<f64>,
}

/// A report found in a response, chunk or event.
#[derive(Clone, Copy, Debug)]
struct Found {
    shape: Shape,
    /// A delta to add to what came before (LangChain message chunks), not a cumulative count.
    additive: bool,
    report: Report,
}

impl Found {
    fn usage(&self) -> Result<Usage, UsageError> {
        normalize(self.shape, &self.report)
    }
}

/// Apply a shape's folding rules, then the subset rules.
fn normalize(shape: Shape, r: &Report) -> Result<Usage, UsageError> {
    let mut p = Parts {
        total: r.total,
        prompt: r.prompt,
        completion: r.completion,
        cached: r.cached.unwrap_or(0),
        cache_write: r.cache_write.unwrap_or(0),
        cache_write_1h: r.cache_write_1h.unwrap_or(0),
        reasoning: r.reasoning.unwrap_or(0),
        cost: r.cost,
    };
    match shape {
        Shape::Inclusive => {
            // Reasoning reported beside the completion (OpenAI-compatible gateways in front of
            // Gemini): the total says so, and the completion takes it in.
            if let (Some(t), Some(a), Some(b)) = (p.total, p.prompt, p.completion) {
                if p.reasoning > 0 && t != a + b && t == a + b + p.reasoning {
                    p.completion = Some(b + p.reasoning);
                }
            }
        }
        Shape::Anthropic => {
            if r.prompt.is_none() && r.completion.is_none() {
                return Err(UsageError::Empty);
            }
            p.prompt = Some(r.prompt.unwrap_or(0) + p.cached + p.cache_write);
        }
        Shape::Gemini => {
            if r.completion.is_some() || r.reasoning.is_some() {
                p.completion = Some(r.completion.unwrap_or(0) + p.reasoning);
            }
        }
    }
    build(p)
}

/// `previous` as a report of `shape`, every field present.
fn report_of(previous: &Usage, shape: Shape) -> Report {
    // A total beside one side alone was computed from it, not reported: left out, so that it
    // does not read as a reported whole that gives the other side.
    let one_side = previous.prompt_tokens.is_some() != previous.completion_tokens.is_some();
    let mut r = Report {
        total: (!one_side).then_some(previous.total_tokens),
        prompt: previous.prompt_tokens,
        completion: previous.completion_tokens,
        cached: Some(previous.cached_tokens),
        cache_write: Some(previous.cache_write_tokens),
        cache_write_1h: Some(previous.cache_write_1h_tokens),
        // Reasoning is part of the completion: with no completion yet, none was reported.
        reasoning: (previous.completion_tokens.is_some() || previous.reasoning_tokens > 0)
            .then_some(previous.reasoning_tokens),
        cost: previous.cost_usd,
    };
    match shape {
        Shape::Inclusive => {}
        Shape::Anthropic => {
            let parts = previous.cached_tokens + previous.cache_write_tokens;
            r.prompt = previous.prompt_tokens.map(|p| p.saturating_sub(parts));
            r.total = None;
        }
        Shape::Gemini => {
            let thoughts = previous.reasoning_tokens;
            r.completion = previous
                .completion_tokens
                .map(|c| c.saturating_sub(thoughts));
        }
    }
    r
}

fn add(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
    }
}

/// Fold a later report into the usage seen so far (the rules are `merge_stream_usage`'s).
fn merge(previous: &Usage, found: &Found) -> Result<Usage, UsageError> {
    if found.additive {
        let later = found.usage()?;
        return build(Parts {
            total: Some(previous.total_tokens.saturating_add(later.total_tokens)),
            prompt: add(previous.prompt_tokens, later.prompt_tokens),
            completion: add(previous.completion_tokens, later.completion_tokens),
            cached: previous.cached_tokens.saturating_add(later.cached_tokens),
            cache_write: previous
                .cache_write_tokens
                .saturating_add(later.cache_write_tokens),
            cache_write_1h: previous
                .cache_write_1h_tokens
                .saturating_add(later.cache_write_1h_tokens),
            reasoning: previous
                .reasoning_tokens
                .saturating_add(later.reasoning_tokens),
            cost: match (previous.cost_usd, later.cost_usd) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
            },
        });
    }
    let r = &found.report;
    let mut m = report_of(previous, found.shape);
    let counts = [r.prompt, r.completion, r.cached, r.cache_write, r.reasoning];
    if r.total.is_some() || counts.iter().any(Option::is_some) {
        // A total left out is the sum of the merged parts, not the earlier total.
        m.total = r.total;
    }
    m.prompt = r.prompt.or(m.prompt);
    m.completion = r.completion.or(m.completion);
    m.cached = r.cached.or(m.cached);
    m.cache_write = r.cache_write.or(m.cache_write);
    m.cache_write_1h = r.cache_write_1h.or(m.cache_write_1h);
    m.reasoning = r.reasoning.or(m.reasoning);
    m.cost = r.cost.or(m.cost);
    // Merged parts that contradict each other (a later prompt smaller than the earlier cache
    // reads): the later report, consistent on its own, wins whole.
    normalize(found.shape, &m).or_else(|_| found.usage())
}

fn usage_block(usage: &Bound<'_, PyAny>, anthropic: bool) -> R<Found> {
    let py = usage.py();
    let mut r = Report {
        cost: cost(get(usage, k!(py, "cost"))?)?,
        ..Report::default()
    };
    let prompt = opt(usage, k!(py, "prompt_tokens"), "prompt_tokens")?;
    let completion = opt(usage, k!(py, "completion_tokens"), "completion_tokens")?;
    if prompt.is_some() || completion.is_some() {
        // OpenAI chat completions and compatibles (DeepSeek, Groq, Mistral, vLLM, LiteLLM).
        r.prompt = prompt;
        r.completion = completion;
        r.total = opt(usage, k!(py, "total_tokens"), "total_tokens")?;
        if let Some(d) = get(usage, k!(py, "prompt_tokens_details"))? {
            r.cached = opt(&d, k!(py, "cached_tokens"), "cached_tokens")?;
        }
        if r.cached.is_none() {
            r.cached = opt(
                usage,
                k!(py, "prompt_cache_hit_tokens"),
                "prompt_cache_hit_tokens",
            )?;
        }
        if let Some(d) = get(usage, k!(py, "completion_tokens_details"))? {
            r.reasoning = opt(&d, k!(py, "reasoning_tokens"), "reasoning_tokens")?;
        }
        return Ok(Found {
            shape: Shape::Inclusive,
            additive: false,
            report: r,
        });
    }
    let bedrock_input = opt(usage, k!(py, "inputTokens"), "inputTokens")?;
    let bedrock_output = opt(usage, k!(py, "outputTokens"), "outputTokens")?;
    if bedrock_input.is_some() || bedrock_output.is_some() {
        // Amazon Bedrock Converse: like Anthropic, `inputTokens` excludes the cache reads and
        // writes (siblings); `totalTokens` includes them.
        r.prompt = bedrock_input;
        r.completion = bedrock_output;
        r.total = opt(usage, k!(py, "totalTokens"), "totalTokens")?;
        r.cached = first_of(
            usage,
            [
                k!(py, "cacheReadInputTokens"),
                k!(py, "cacheReadInputTokenCount"),
            ],
            "cacheReadInputTokens",
        )?;
        r.cache_write = first_of(
            usage,
            [
                k!(py, "cacheWriteInputTokens"),
                k!(py, "cacheWriteInputTokenCount"),
            ],
            "cacheWriteInputTokens",
        )?;
        return Ok(Found {
            shape: Shape::Anthropic,
            additive: false,
            report: r,
        });
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
        r.prompt = input;
        r.completion = output;
        r.cached = cache_read;
        r.cache_write = cache_creation;
        if let Some(c) = get(usage, k!(py, "cache_creation"))? {
            r.cache_write_1h = opt(
                &c,
                k!(py, "ephemeral_1h_input_tokens"),
                "ephemeral_1h_input_tokens",
            )?;
        }
        if let Some(d) = get(usage, k!(py, "output_tokens_details"))? {
            // Thinking is part of the output tokens: reasoning.
            r.reasoning = opt(&d, k!(py, "thinking_tokens"), "thinking_tokens")?;
        }
        return Ok(Found {
            shape: Shape::Anthropic,
            additive: false,
            report: r,
        });
    }
    // OpenAI Responses API and LangChain usage_metadata: input includes cache reads.
    r.prompt = input;
    r.completion = output;
    r.total = opt(usage, k!(py, "total_tokens"), "total_tokens")?;
    if let Some(d) = get(usage, k!(py, "input_tokens_details"))? {
        r.cached = opt(&d, k!(py, "cached_tokens"), "cached_tokens")?;
        r.cache_write = opt(&d, k!(py, "cache_write_tokens"), "cache_write_tokens")?;
    }
    if let Some(d) = get(usage, k!(py, "output_tokens_details"))? {
        r.reasoning = opt(&d, k!(py, "reasoning_tokens"), "reasoning_tokens")?;
    }
    if let Some(d) = get(usage, k!(py, "input_token_details"))? {
        r.cached = opt(&d, k!(py, "cache_read"), "cache_read")?;
        r.cache_write = opt(&d, k!(py, "cache_creation"), "cache_creation")?;
    }
    if let Some(d) = get(usage, k!(py, "output_token_details"))? {
        r.reasoning = opt(&d, k!(py, "reasoning"), "reasoning")?;
    }
    Ok(Found {
        shape: Shape::Inclusive,
        additive: false,
        report: r,
    })
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

fn gemini(meta: &Bound<'_, PyAny>) -> R<Found> {
    let py = meta.py();
    let prompt = first_of(
        meta,
        [k!(py, "promptTokenCount"), k!(py, "prompt_token_count")],
        "promptTokenCount",
    )?;
    let mut candidates = first_of(
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
    if let (Some(p), Some(c), Some(th), Some(total)) = (prompt, candidates, thoughts, total) {
        if th > 0 && c >= th {
            // Some Vertex versions count thoughts inside the candidates: the total says so
            // (prompt + candidates + tool-use prompt == total, thoughts not added).
            let tool = first_of(
                meta,
                [
                    k!(py, "toolUsePromptTokenCount"),
                    k!(py, "tool_use_prompt_token_count"),
                ],
                "toolUsePromptTokenCount",
            )?
            .unwrap_or(0);
            if p + c + tool == total {
                candidates = Some(c - th);
            }
        }
    }
    Ok(Found {
        shape: Shape::Gemini,
        additive: false,
        report: Report {
            total,
            prompt,
            completion: candidates,
            cached,
            reasoning: thoughts,
            ..Report::default()
        },
    })
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

fn find(obj: &Bound<'_, PyAny>) -> R<Option<Found>> {
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
            let report = Report {
                total: opt(obj, k!(py, "tokens_used"), "tokens_used")?,
                prompt: opt(obj, k!(py, "prompt_tokens"), "prompt_tokens")?,
                completion: opt(obj, k!(py, "completion_tokens"), "completion_tokens")?,
                cached: opt(obj, k!(py, "cached_tokens"), "cached_tokens")?,
                cache_write: opt(obj, k!(py, "cache_write_tokens"), "cache_write_tokens")?,
                cache_write_1h: opt(
                    obj,
                    k!(py, "cache_write_1h_tokens"),
                    "cache_write_1h_tokens",
                )?,
                reasoning: opt(obj, k!(py, "reasoning_tokens"), "reasoning_tokens")?,
                cost: cost(get(obj, k!(py, "cost_estimate"))?)?,
            };
            return Ok(Some(Found {
                shape: Shape::Inclusive,
                additive: false,
                report,
            }));
        }
    }
    let mut target = obj.clone();
    let mut anthropic = false;
    let mut whole_message = false;
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
                "ai" => whole_message = true, // a LangChain AIMessage, not a chunk of one
                _ => {}
            }
        }
    }
    if let Some(usage) = get(&target, k!(py, "usage"))? {
        let mut found = usage_block(&usage, anthropic)?;
        if found.report.cost.is_none() {
            found.report.cost = provider_cost(&target)?;
        }
        return Ok(Some(found));
    }
    if let Some(event) = get(&target, k!(py, "metadata"))? {
        // A Bedrock ConverseStream `metadata` event: `{"metadata": {"usage": {...}}}`.
        if let Some(usage) = get(&event, k!(py, "usage"))? {
            if get(&usage, k!(py, "inputTokens"))?.is_some()
                || get(&usage, k!(py, "outputTokens"))?.is_some()
            {
                return Ok(Some(usage_block(&usage, false)?));
            }
        }
    }
    let meta = match get(&target, k!(py, "usage_metadata"))? {
        Some(m) => Some(m),
        None => get(&target, k!(py, "usageMetadata"))?,
    };
    if let Some(meta) = meta {
        if get(&meta, k!(py, "input_tokens"))?.is_some()
            || get(&meta, k!(py, "output_tokens"))?.is_some()
        {
            // LangChain: a message chunk's usage is a delta (AIMessageChunk addition sums
            // them); a whole AIMessage carries the run's usage.
            let mut found = usage_block(&meta, false)?;
            found.additive = !whole_message;
            return Ok(Some(found));
        }
        return Ok(Some(gemini(&meta)?));
    }
    Ok(None)
}

fn extract(obj: &Bound<'_, PyAny>) -> R<Option<Usage>> {
    match find(obj)? {
        None => Ok(None),
        Some(found) => Ok(Some(found.usage()?)),
    }
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

/// Fold the usage a stream chunk carries into the usage the stream reported so far, and return
/// the result (`previous` itself, unchanged, when the chunk carries no usage; `None` while
/// nothing was reported). A field a later report leaves out, or sends as null, never erases a
/// value seen earlier.
///
/// Per shape:
///
/// - cumulative, replaced field by field: OpenAI chat chunks (the final usage chunk, or
///   running usage in every chunk), OpenAI Responses events (`response.completed`), Anthropic
///   `message_start` then `message_delta` (as Anthropic's own accumulator: `input_tokens`,
///   `output_tokens`, cache reads, cache writes and their 1-hour split, thinking tokens each
///   replaced only when present), Gemini `usageMetadata` (every chunk repeats the running
///   counts), llmtally's own response dict;
/// - deltas, added: LangChain message chunks' `usage_metadata` (as `AIMessageChunk` addition
///   sums them); a whole LangChain `AIMessage` (`type == "ai"`) replaces.
///
/// A total left out of a later report is the sum of the merged parts. When merged parts
/// contradict each other (a later prompt smaller than earlier cache reads), the later report,
/// consistent on its own, wins whole.
///
/// Raises `BadUsage` when the chunk's usage cannot be trusted (the caller keeps `previous`).
#[pyfunction]
#[pyo3(name = "merge_stream_usage")]
pub fn py_merge_stream_usage<'py>(
    previous: &Bound<'py, PyAny>,
    chunk: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let Some(found) = find(chunk).map_err(to_py)? else {
        return Ok(previous.clone());
    };
    let merged = if previous.is_none() {
        match found.usage() {
            // A usage block without a single count (`usage: {}`) says nothing yet.
            Err(UsageError::Empty) => return Ok(previous.clone()),
            other => other,
        }
    } else {
        merge(previous.cast::<Usage>()?.get(), &found)
    };
    let merged = merged.map_err(|e| BadUsage::new_err(e.to_string()))?;
    Ok(Bound::new(chunk.py(), merged)?.into_any())
}

/// Normalize one usage block with the given convention (`anthropic=True`: input excludes cache).
#[pyfunction]
#[pyo3(name = "normalize_usage_block", signature = (usage, anthropic = false))]
fn py_normalize_usage_block(usage: &Bound<'_, PyAny>, anthropic: bool) -> PyResult<Usage> {
    usage_block(usage, anthropic)
        .and_then(|found| Ok(found.usage()?))
        .map_err(to_py)
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
    m.add_function(wrap_pyfunction!(py_merge_stream_usage, m)?)?;
    m.add_function(wrap_pyfunction!(py_normalize_usage_block, m)?)?;
    m.add_function(wrap_pyfunction!(py_usd_to_pusd, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pusd_rounds_half_away_from_zero_and_refuses_what_is_out_of_range() {
        assert_eq!(usd_to_pusd(0.0), Some(0));
        assert_eq!(usd_to_pusd(2.5e-12), Some(3));
        assert_eq!(usd_to_pusd(0.000_001), Some(1_000_000));
        assert_eq!(usd_to_pusd(-1e-12), None);
        assert_eq!(usd_to_pusd(f64::NAN), None);
        assert_eq!(usd_to_pusd(f64::INFINITY), None);
        assert_eq!(usd_to_pusd(9.3e6), None);
    }

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
