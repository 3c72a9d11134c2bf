//! The end of an LLM call in one crossing: read the provider's response (usage, text, model)
//! and build the normalized response dict handed to `on_llm_end`.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::cost::Prices;
use crate::usage::{extract_any, get, Usage, PUSD_PER_USD};

/// Text of a list of content parts (strings or `{"text": ...}` blocks), or `None`.
fn join_parts(parts: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
    let Ok(list) = parts.cast::<PyList>() else {
        return Ok(None);
    };
    let py = parts.py();
    let mut out = String::new();
    let mut any = false;
    for part in list.iter() {
        if let Ok(s) = part.cast::<PyString>() {
            out.push_str(&s.to_cow()?);
            any = true;
        } else if let Some(t) = get(&part, intern!(py, "text"))? {
            if let Ok(s) = t.cast::<PyString>() {
                out.push_str(&s.to_cow()?);
                any = true;
            }
        }
    }
    Ok(any.then_some(out))
}

fn as_text(value: Option<Bound<'_, PyAny>>) -> PyResult<Option<Bound<'_, PyAny>>> {
    Ok(value.filter(|v| v.is_instance_of::<PyString>()))
}

/// The generated text in a response or a stream chunk (OpenAI chat and chunks, Responses,
/// Anthropic messages and deltas, LangChain messages, plain strings), or `None`.
pub fn extract_text<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = obj.py();
    if obj.is_instance_of::<PyString>() {
        return Ok(Some(obj.clone()));
    }
    if obj.is_none() {
        return Ok(None);
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        // Cheap rejection of dicts that carry only usage.
        if !(d.contains(intern!(py, "choices"))?
            || d.contains(intern!(py, "content"))?
            || d.contains(intern!(py, "type"))?
            || d.contains(intern!(py, "output"))?
            || d.contains(intern!(py, "output_text"))?)
        {
            return Ok(None);
        }
    }
    if let Some(choices) = get(obj, intern!(py, "choices"))? {
        let first = match choices.cast::<PyList>() {
            Ok(l) if !l.is_empty() => l.get_item(0)?,
            _ => return Ok(None),
        };
        let part = match get(&first, intern!(py, "delta"))? {
            Some(p) => Some(p),
            None => get(&first, intern!(py, "message"))?,
        };
        if let Some(part) = part {
            let Some(content) = get(&part, intern!(py, "content"))? else {
                return Ok(None);
            };
            if content.is_instance_of::<PyString>() {
                return Ok(Some(content));
            }
            return Ok(join_parts(&content)?.map(|s| PyString::new(py, &s).into_any()));
        }
        return as_text(get(&first, intern!(py, "text"))?);
    }
    if let Some(kind) = get(obj, intern!(py, "type"))? {
        if let Ok(kind) = kind.cast::<PyString>() {
            let kind = kind.to_cow()?;
            if kind == "content_block_delta" {
                let Some(delta) = get(obj, intern!(py, "delta"))? else {
                    return Ok(None);
                };
                if let Some(t) = as_text(get(&delta, intern!(py, "text"))?)? {
                    return Ok(Some(t));
                }
                return as_text(get(&delta, intern!(py, "thinking"))?);
            }
            if kind.starts_with("response.") && kind.ends_with(".delta") {
                return as_text(get(obj, intern!(py, "delta"))?);
            }
        }
    }
    if let Some(content) = get(obj, intern!(py, "content"))? {
        if content.is_instance_of::<PyString>() {
            return Ok(Some(content));
        }
        if let Some(s) = join_parts(&content)? {
            return Ok(Some(PyString::new(py, &s).into_any()));
        }
    }
    if let Some(t) = as_text(get(obj, intern!(py, "output_text"))?)? {
        return Ok(Some(t));
    }
    if let Some(output) = get(obj, intern!(py, "output"))? {
        if let Ok(items) = output.cast::<PyList>() {
            let mut out = String::new();
            let mut any = false;
            for item in items.iter() {
                if let Some(content) = get(&item, intern!(py, "content"))? {
                    if let Some(s) = join_parts(&content)? {
                        any |= !s.is_empty();
                        out.push_str(&s);
                    }
                }
            }
            if any {
                return Ok(Some(PyString::new(py, &out).into_any()));
            }
        }
    }
    Ok(None)
}

/// An optional field: a value, else `None`, whatever the object raises on the way.
fn lenient<'py>(obj: &Bound<'py, PyAny>, key: &Bound<'py, PyString>) -> Option<Bound<'py, PyAny>> {
    get(obj, key).ok().flatten()
}

fn first_of(list: Option<Bound<'_, PyAny>>) -> Option<Bound<'_, PyAny>> {
    let list = list?;
    let list = list.cast::<PyList>().ok()?;
    if list.is_empty() {
        return None;
    }
    list.get_item(0).ok()
}

fn text_of(value: Option<Bound<'_, PyAny>>) -> Option<Bound<'_, PyAny>> {
    value.filter(|v| v.is_instance_of::<PyString>())
}

/// A response id and a finish reason, each when known.
type Meta<'py> = (Option<Bound<'py, PyAny>>, Option<Bound<'py, PyAny>>);

/// The provider's response id and finish reason (OpenAI chat: `id`,
/// `choices[0].finish_reason`; Anthropic: `id`, `stop_reason`; Gemini: `responseId`,
/// `candidates[0].finishReason`), each `None` when absent, not a string, or when reading it
/// raises: they are optional, and never cost the call its usage.
pub fn response_meta<'py>(obj: &Bound<'py, PyAny>) -> Meta<'py> {
    let py = obj.py();
    let is_dict = obj.is_instance_of::<PyDict>();
    if !is_dict && !looks_like_sdk_response(obj).unwrap_or(false) {
        return (None, None);
    }
    let mut id = text_of(lenient(obj, intern!(py, "id")));
    if let Some(choice) = first_of(lenient(obj, intern!(py, "choices"))) {
        return (id, text_of(lenient(&choice, intern!(py, "finish_reason"))));
    }
    if let Some(reason) = text_of(lenient(obj, intern!(py, "stop_reason"))) {
        return (id, Some(reason));
    }
    if is_dict {
        if let Some(candidate) = first_of(lenient(obj, intern!(py, "candidates"))) {
            if id.is_none() {
                id = text_of(lenient(obj, intern!(py, "responseId")));
            }
            return (
                id,
                text_of(lenient(&candidate, intern!(py, "finishReason"))),
            );
        }
    }
    (id, None)
}

#[pyfunction]
#[pyo3(name = "response_meta")]
fn py_response_meta<'py>(obj: &Bound<'py, PyAny>) -> Meta<'py> {
    response_meta(obj)
}

#[pyfunction]
#[pyo3(name = "extract_text")]
fn py_extract_text<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    extract_text(obj)
}

/// Fill `d` with the normalized response fields.
#[allow(clippy::too_many_arguments)]
fn fill<'py>(
    d: &Bound<'py, PyDict>,
    usage: Option<&Usage>,
    usage_error: Option<&Bound<'py, PyAny>>,
    estimated: bool,
    content: Option<&Bound<'py, PyAny>>,
    provider: &Bound<'py, PyAny>,
    model: &Bound<'py, PyAny>,
    duration_s: f64,
    request_id: &Bound<'py, PyAny>,
    table_cost: Option<i64>,
    meta: (Option<&Bound<'py, PyAny>>, Option<&Bound<'py, PyAny>>),
) -> PyResult<()> {
    let py = d.py();
    match usage {
        Some(u) => {
            d.set_item(intern!(py, "tokens_used"), u.total_tokens)?;
            // An unknown side of the split is left out, never reported as 0.
            if let Some(p) = u.prompt_tokens {
                d.set_item(intern!(py, "prompt_tokens"), p)?;
            }
            if let Some(c) = u.completion_tokens {
                d.set_item(intern!(py, "completion_tokens"), c)?;
            }
            d.set_item(intern!(py, "cached_tokens"), u.cached_tokens)?;
            d.set_item(intern!(py, "cache_write_tokens"), u.cache_write_tokens)?;
            d.set_item(intern!(py, "reasoning_tokens"), u.reasoning_tokens)?;
            if u.cache_write_1h_tokens > 0 {
                d.set_item(
                    intern!(py, "cache_write_1h_tokens"),
                    u.cache_write_1h_tokens,
                )?;
            }
            match (u.cost_usd, table_cost) {
                (None, Some(pusd)) => {
                    // `cost_pusd` goes last (see `add_table_cost`), where pricing after the
                    // read puts it too: the same dict either way, key order included.
                    d.set_item(intern!(py, "cost_estimate"), pusd as f64 / PUSD_PER_USD)?;
                    d.set_item(intern!(py, "cost_source"), intern!(py, "table"))?;
                }
                (cost, _) => {
                    d.set_item(intern!(py, "cost_estimate"), cost)?;
                    d.set_item(
                        intern!(py, "cost_source"),
                        cost.map(|_| intern!(py, "provider")),
                    )?;
                }
            }
        }
        None => {
            d.set_item(intern!(py, "usage_error"), usage_error)?;
            d.set_item(intern!(py, "cost_estimate"), py.None())?;
            d.set_item(intern!(py, "cost_source"), py.None())?;
        }
    }
    d.set_item(intern!(py, "estimated"), estimated)?;
    d.set_item(intern!(py, "provider"), provider)?;
    d.set_item(intern!(py, "model"), model)?;
    d.set_item(intern!(py, "response_time"), duration_s)?;
    d.set_item(intern!(py, "request_id"), request_id)?;
    if let Some(c) = content {
        d.set_item(intern!(py, "content"), c)?;
    }
    if let Some(id) = meta.0 {
        d.set_item(intern!(py, "response_id"), id)?;
    }
    if let Some(reason) = meta.1 {
        d.set_item(intern!(py, "finish_reason"), reason)?;
    }
    Ok(())
}

fn add_table_cost(
    d: &Bound<'_, PyDict>,
    usage: Option<&Usage>,
    table_cost: Option<i64>,
    price_version: Option<&Bound<'_, PyString>>,
) -> PyResult<()> {
    if let (Some(u), Some(pusd)) = (usage, table_cost) {
        if u.cost_usd.is_none() {
            d.set_item(intern!(d.py(), "cost_pusd"), pusd)?;
            if let Some(v) = price_version {
                d.set_item(intern!(d.py(), "price_version"), v)?;
            }
        }
    }
    Ok(())
}

/// Build the normalized response dict from a `Usage` (or a usage error).
#[pyfunction]
#[pyo3(name = "make_response", signature = (
    usage, usage_error, estimated, content, provider, model, duration_s, request_id,
    ttft_s=None, chunks=0, table_cost_pusd=None, response_id=None, finish_reason=None,
    price_version=None
))]
#[allow(clippy::too_many_arguments)]
pub fn py_make_response<'py>(
    py: Python<'py>,
    usage: Option<&Bound<'py, Usage>>,
    usage_error: Option<&Bound<'py, PyAny>>,
    estimated: bool,
    content: Option<&Bound<'py, PyAny>>,
    provider: &Bound<'py, PyAny>,
    model: &Bound<'py, PyAny>,
    duration_s: f64,
    request_id: &Bound<'py, PyAny>,
    ttft_s: Option<f64>,
    chunks: u64,
    table_cost_pusd: Option<i64>,
    response_id: Option<&Bound<'py, PyAny>>,
    finish_reason: Option<&Bound<'py, PyAny>>,
    price_version: Option<&Bound<'py, PyString>>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    fill(
        &d,
        usage.map(|u| u.get()),
        usage_error,
        estimated,
        content,
        provider,
        model,
        duration_s,
        request_id,
        table_cost_pusd,
        (response_id, finish_reason),
    )?;
    if let Some(t) = ttft_s {
        d.set_item(intern!(py, "time_to_first_token"), t)?;
        d.set_item(intern!(py, "chunks"), chunks)?;
    }
    add_table_cost(&d, usage.map(|u| u.get()), table_cost_pusd, price_version)?;
    Ok(d)
}

/// Read the response set on a call and build the response dict in one crossing:
/// `(code, response, message, usage)`.
///
/// `READ_OK`: `response` is complete; `message` is a usage warning or `None`; `usage` is the
/// normalized `Usage`. When `prices` (the call model's) are given, the provider reported no
/// cost and the response names no other model, the cost is priced here (`cost_source`
/// `"table"`, exact `cost_pusd`, `price_version`), with the service tier and geography the
/// response states when the model's prices depend on them.
/// `READ_BAD_USAGE`: usage skipped whole (`message` says why); `response` has `usage_error`.
/// `READ_NO_USAGE`: the response carries no usage; `response` is `None` (the caller estimates).
/// `READ_NOT_A_RESPONSE`: neither a dict nor an SDK object; `response` is `None`.
#[pyfunction]
#[pyo3(name = "finish_response", signature = (obj, provider, model, duration_s, request_id, prices=None))]
#[allow(clippy::type_complexity)]
pub fn py_finish_response<'py>(
    obj: &Bound<'py, PyAny>,
    provider: &Bound<'py, PyAny>,
    model: &Bound<'py, PyAny>,
    duration_s: f64,
    request_id: &Bound<'py, PyAny>,
    prices: Option<&Bound<'py, Prices>>,
) -> PyResult<(
    u8,
    Option<Bound<'py, PyDict>>,
    Option<String>,
    Option<Bound<'py, Usage>>,
)> {
    let py = obj.py();
    if !obj.is_instance_of::<PyDict>() && !looks_like_sdk_response(obj)? {
        return Ok((NOT_A_RESPONSE, None, None, None));
    }
    let usage = match extract_any(obj) {
        Ok(Some(u)) => Ok(u),
        Ok(None) => return Ok((NO_USAGE, None, None, None)),
        Err(Ok(message)) => Err(message),
        Err(Err(e)) => return Err(e),
    };
    let found_model = response_model(obj)?;
    let same_model = match &found_model {
        None => true,
        Some(m) => m.eq(model)?,
    };
    let model = found_model.as_ref().unwrap_or(model);
    let content = extract_text(obj)?;
    let (response_id, finish_reason) = response_meta(obj);
    let meta = (response_id.as_ref(), finish_reason.as_ref());
    let d = PyDict::new(py);
    match usage {
        Ok(u) => {
            let table_cost = match prices {
                Some(p) if same_model && u.cost_usd.is_none() => p.get().call_cost(&u, obj),
                _ => None,
            };
            let version = match (prices, table_cost) {
                (Some(p), Some(_)) => p.get().version_of(py),
                _ => None,
            };
            fill(
                &d,
                Some(&u),
                None,
                false,
                content.as_ref(),
                provider,
                model,
                duration_s,
                request_id,
                table_cost,
                meta,
            )?;
            add_table_cost(&d, Some(&u), table_cost, version.as_ref())?;
            let warning = u.warning.clone();
            let usage = Bound::new(py, u)?;
            Ok((OK, Some(d), warning, Some(usage)))
        }
        Err(message) => {
            let err = PyString::new(py, &message).into_any();
            fill(
                &d,
                None,
                Some(&err),
                false,
                content.as_ref(),
                provider,
                model,
                duration_s,
                request_id,
                None,
                meta,
            )?;
            Ok((BAD_USAGE, Some(d), Some(message), None))
        }
    }
}

pub(crate) fn response_model<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    Ok(get(obj, intern!(obj.py(), "model"))?.filter(|m| {
        m.cast::<PyString>()
            .map(|s| s.to_cow().map(|c| !c.is_empty()).unwrap_or(false))
            .unwrap_or(false)
    }))
}

/// Outcome codes of `read_response`.
pub const OK: u8 = 0;
pub const BAD_USAGE: u8 = 1;
pub const NOT_A_RESPONSE: u8 = 2;
pub const NO_USAGE: u8 = 3;

/// Read a response set on a call: `(code, usage, content, model, message)`.
///
/// `code` is `OK` (usage may be `None` when the response carries none), `BAD_USAGE` (usage
/// skipped whole; `message` says why) or `NOT_A_RESPONSE` (neither a dict nor an SDK object).
#[pyfunction]
#[pyo3(name = "read_response")]
#[allow(clippy::type_complexity)]
pub fn py_read_response<'py>(
    obj: &Bound<'py, PyAny>,
) -> PyResult<(
    u8,
    Option<Usage>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<String>,
)> {
    let is_dict = obj.is_instance_of::<PyDict>();
    if !is_dict && !looks_like_sdk_response(obj)? {
        return Ok((NOT_A_RESPONSE, None, None, None, None));
    }
    let model = response_model(obj)?;
    let content = extract_text(obj)?;
    match extract_any(obj) {
        Ok(usage) => Ok((OK, usage, content, model, None)),
        Err(Ok(message)) => Ok((BAD_USAGE, None, content, model, Some(message))),
        Err(Err(e)) => Err(e),
    }
}

pub(crate) fn looks_like_sdk_response(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    use pyo3::types::{PyBytes, PyFloat, PyInt, PyTuple};
    if obj.is_none()
        || obj.is_instance_of::<PyString>()
        || obj.is_instance_of::<PyBytes>()
        || obj.is_instance_of::<PyInt>()
        || obj.is_instance_of::<PyFloat>()
        || obj.is_instance_of::<PyList>()
        || obj.is_instance_of::<PyTuple>()
    {
        return Ok(false);
    }
    let py = obj.py();
    for name in [
        intern!(py, "usage"),
        intern!(py, "choices"),
        intern!(py, "content"),
        intern!(py, "output"),
        intern!(py, "usage_metadata"),
    ] {
        if obj.hasattr(name)? {
            return Ok(true);
        }
    }
    Ok(false)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(py_extract_text, m)?)?;
    m.add_function(wrap_pyfunction!(py_response_meta, m)?)?;
    m.add_function(wrap_pyfunction!(py_make_response, m)?)?;
    m.add_function(wrap_pyfunction!(py_read_response, m)?)?;
    m.add_function(wrap_pyfunction!(py_finish_response, m)?)?;
    m.add("READ_NO_USAGE", NO_USAGE)?;
    m.add("READ_OK", OK)?;
    m.add("READ_BAD_USAGE", BAD_USAGE)?;
    m.add("READ_NOT_A_RESPONSE", NOT_A_RESPONSE)?;
    Ok(())
}
