//! The LLM call scope's hot path: `async with manager.llm_call(...)` entered and exited
//! without a coroutine in the common case.
//!
//! `CallScope` is the base of Python's `LLMCall`: it holds the call's state, and its
//! `__aenter__`/`__aexit__` do the common call in the core and return a ready awaitable
//! (`Ready`); anything else (a start handler that waits or refuses, an error, the end of a
//! stream, a caller's request id already counted, metrics on) goes to the Python methods of
//! `LLMCall` (`_start_fire`, `_exit`, `_end_fired`, `_recorded`), which are the reference
//! behaviour. The rules for unusual input (a `user_id`, provider, model or request id that
//! needs normalizing) stay in Python (`CallContext.prepare_call`); the core only checks that
//! the common input needs none.

use std::sync::OnceLock;
use std::time::Instant;

use pyo3::exceptions::{PyException, PyStopIteration};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyFloat, PyList, PyString, PyTuple};
use pyo3::{intern, PyTraverseError, PyVisit};

use crate::cost::Prices;
use crate::recorder::{IdMaker, Recorder, DECLINED, RECORDED};
use crate::response::{extract_text, py_finish_response, OK as READ_OK};
use crate::usage::py_merge_stream_usage;

/// What the scope needs of the Python side, given once by `CallScope.configure`.
struct Hooks {
    /// `_tables.globals_state`: its `version` moves when the global handlers change.
    globals: Py<PyAny>,
    /// `_ids.state`: its `maker` is this process's `IdMaker`.
    ids: Py<PyAny>,
    /// `_observe.state`: `on` when metrics time every handler (the Python path does that).
    observed: Py<PyAny>,
    /// `_context._current`'s `get`, `set` and `reset` (the innermost open scope's kwargs).
    current_get: Py<PyAny>,
    current_set: Py<PyAny>,
    current_reset: Py<PyAny>,
    /// `_context._NOT_INHERITED`: keys a child scope does not inherit.
    not_inherited: Py<PyAny>,
    /// `pricing._cache`: `(model, provider or None) -> Prices | None`.
    price_cache: Py<PyDict>,
    /// `pricing.lookup(model, provider)`.
    price_lookup: Py<PyAny>,
    /// `_calls._lookup_found`.
    lookup_found: Py<PyAny>,
    /// `_calls._SAFE_USER_CHARS` and `_names.MAX_ID_CHARS`.
    safe_user_chars: usize,
    max_id_chars: usize,
}

static HOOKS: PyOnceLock<Hooks> = PyOnceLock::new();

fn hooks(py: Python<'_>) -> PyResult<&Hooks> {
    HOOKS.get(py).ok_or_else(|| {
        pyo3::exceptions::PyRuntimeError::new_err("CallScope.configure was not called")
    })
}

/// `time.perf_counter()` as the core reads it: the same monotonic clock, from one anchor taken
/// at `configure` (so a start read here and an end read in Python subtract correctly).
static CLOCK: OnceLock<(Instant, f64)> = OnceLock::new();

fn perf_counter() -> f64 {
    match CLOCK.get() {
        Some((anchor, at)) => at + anchor.elapsed().as_secs_f64(),
        None => 0.0,
    }
}

/// An awaitable that is already done: `await` gives `value` without suspending.
#[pyclass(frozen, module = "llmtally._core", name = "Ready")]
pub struct Ready {
    value: Option<Py<PyAny>>,
}

#[pymethods]
impl Ready {
    fn __await__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match &self.value {
            // StopIteration(value): the await's result (never a tuple here).
            Some(value) => Err(PyStopIteration::new_err(value.clone_ref(py))),
            None => Ok(None),
        }
    }

    fn send(&self, py: Python<'_>, _value: &Bound<'_, PyAny>) -> PyResult<Option<Py<PyAny>>> {
        self.__next__(py)
    }

    #[pyo3(signature = (kind, value=None, _traceback=None))]
    fn throw(
        &self,
        kind: &Bound<'_, PyAny>,
        value: Option<&Bound<'_, PyAny>>,
        _traceback: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let exc = match value {
            Some(v) if !v.is_none() => v.clone(),
            _ => kind.clone(),
        };
        Err(PyErr::from_value(exc))
    }

    fn close(&self) {}
}

static DONE: PyOnceLock<Py<Ready>> = PyOnceLock::new();

fn done(py: Python<'_>) -> PyResult<Py<PyAny>> {
    let ready = DONE.get_or_try_init(py, || Py::new(py, Ready { value: None }))?;
    Ok(ready.clone_ref(py).into_any())
}

/// A manager's call counters (`health()`), counted by the core and by Python alike.
#[pyclass(module = "llmtally._core", name = "CallStats", get_all, set_all)]
#[derive(Default)]
pub struct CallStats {
    abandoned: u64,
    bad_input: u64,
    duplicates: u64,
    llm_calls: u64,
    llm_errors: u64,
    llm_timeouts: u64,
    usage_warnings: u64,
}

#[pymethods]
impl CallStats {
    #[new]
    fn py_new() -> Self {
        Self::default()
    }
}

/// One LLM call's state, and the common call's enter and exit (see the module).
#[pyclass(subclass, weakref, module = "llmtally._core", name = "CallScope")]
pub struct CallScope {
    #[pyo3(get, set, name = "_ctx")]
    ctx: Py<PyAny>,
    #[pyo3(get, set)]
    messages: Py<PyAny>,
    #[pyo3(get, set)]
    provider: Py<PyAny>,
    #[pyo3(get, set)]
    model: Py<PyAny>,
    #[pyo3(get, set, name = "_kwargs")]
    kwargs: Py<PyAny>,
    #[pyo3(get, set)]
    request_id: Py<PyAny>,
    #[pyo3(get, set)]
    run_id: Py<PyAny>,
    #[pyo3(get, set, name = "_id_given")]
    id_given: bool,
    #[pyo3(get, set)]
    started_at: f64,
    #[pyo3(get, set, name = "_response")]
    raw_response: Py<PyAny>,
    #[pyo3(get, set, name = "_response_set")]
    response_set: bool,
    #[pyo3(get, set, name = "_done")]
    done: bool,
    #[pyo3(get, set, name = "_token")]
    token: Py<PyAny>,
    #[pyo3(get, set, name = "_table")]
    table: Py<PyAny>,
    #[pyo3(get, set, name = "_first_chunk_at")]
    first_chunk_at: Option<f64>,
    #[pyo3(get, set, name = "_chunks")]
    chunks: u64,
    #[pyo3(get, set, name = "_texts")]
    texts: Py<PyAny>,
    #[pyo3(get, set, name = "_stream_usage")]
    stream_usage: Py<PyAny>,
    #[pyo3(get, set, name = "_usage")]
    usage: Py<PyAny>,
    #[pyo3(get, set, name = "_response_dict")]
    response_dict: Py<PyAny>,
    #[pyo3(get, set, name = "_parts")]
    parts: Py<PyAny>,
    #[pyo3(get, set)]
    duplicate: bool,
    #[pyo3(get, set, name = "_stoppable")]
    stoppable: bool,
    #[pyo3(get, set, name = "_abandoned")]
    abandoned: bool,
    #[pyo3(get, set, name = "_open")]
    open: bool,
}

/// Whether `value` is an exact `str` of `1..=max` characters (`ascii`: ASCII only).
fn plain_str(value: &Bound<'_, PyAny>, max: usize, ascii: bool) -> PyResult<bool> {
    let Ok(s) = value.cast_exact::<PyString>() else {
        return Ok(false);
    };
    let Ok(text) = s.to_str() else {
        return Ok(false); // surrogates: Python's rules take it
    };
    let n = if ascii {
        if !text.is_ascii() {
            return Ok(false);
        }
        text.len()
    } else if text.len() <= max {
        text.len() // bytes >= chars: within the bound either way
    } else {
        text.chars().count()
    };
    Ok(n > 0 && n <= max)
}

impl CallScope {
    /// The scope's kwargs opened as the current run: `_context._open_context`'s rule.
    fn open_context<'py>(
        py: Python<'py>,
        hooks: &Hooks,
        context: Bound<'py, PyDict>,
        run_id: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyAny>)> {
        let parent = hooks.current_get.bind(py).call0()?;
        let given_parent = context.get_item(intern!(py, "parent_run_id"))?;
        let kwargs = if parent.is_none() {
            context.set_item(intern!(py, "parent_run_id"), given_parent)?;
            context
        } else {
            let parent = parent.cast::<PyDict>()?;
            let skip = hooks.not_inherited.bind(py);
            let kwargs = PyDict::new(py);
            for (k, v) in parent.iter() {
                if !skip.contains(&k)? {
                    kwargs.set_item(k, v)?;
                }
            }
            kwargs.update(context.as_mapping())?;
            let parent_id = match given_parent {
                Some(g) if !g.is_none() => g,
                _ => parent
                    .get_item(intern!(py, "run_id"))?
                    .unwrap_or_else(|| py.None().into_bound(py)),
            };
            kwargs.set_item(intern!(py, "parent_run_id"), parent_id)?;
            kwargs
        };
        let trace = kwargs.get_item(intern!(py, "trace_id"))?;
        if trace.map_or(true, |t| t.is_none()) {
            kwargs.set_item(intern!(py, "trace_id"), run_id)?;
        }
        kwargs.set_item(intern!(py, "run_id"), run_id)?;
        if let Some(user) = kwargs.get_item(intern!(py, "user_id"))? {
            if user.is_none() {
                kwargs.del_item(intern!(py, "user_id"))?;
            }
        }
        let token = hooks.current_set.bind(py).call1((&kwargs,))?;
        Ok((kwargs, token))
    }

    /// The common end, recorded in one crossing: `_calls.LLMCall._end_recorded`'s rule. `None`
    /// when the core declined (the Python path then takes the call from the start of its end).
    fn end_recorded<'py>(
        slf: &Bound<'py, Self>,
        hooks: &Hooks,
        group: &Bound<'py, PyAny>,
        duration_s: f64,
    ) -> PyResult<Option<()>> {
        let py = slf.py();
        let (response, provider, model, kwargs, request_id, ctx) = {
            let me = slf.borrow();
            (
                me.raw_response.clone_ref(py).into_bound(py),
                me.provider.clone_ref(py).into_bound(py),
                me.model.clone_ref(py).into_bound(py),
                me.kwargs.clone_ref(py).into_bound(py),
                me.request_id.clone_ref(py).into_bound(py),
                me.ctx.clone_ref(py).into_bound(py),
            )
        };
        let (Ok(provider_s), Ok(model_s)) = (provider.cast::<PyString>(), model.cast::<PyString>())
        else {
            return Ok(None);
        };
        let Ok(kwargs) = kwargs.cast::<PyDict>() else {
            return Ok(None);
        };
        let Ok(rid) = request_id.cast::<PyString>() else {
            return Ok(None);
        };
        let Ok(recorder) = group
            .getattr(intern!(py, "recorder"))?
            .cast_into::<Recorder>()
        else {
            return Ok(None);
        };
        let prices = call_prices(py, hooks, &model, &provider, true)?;
        let maker = id_maker(py, hooks)?;
        let finished = recorder.get().finish(
            &response,
            provider_s.clone(),
            model_s.clone(),
            duration_s,
            prices.as_ref(),
            kwargs
                .get_item(intern!(py, "user_id"))?
                .filter(|v| !v.is_none()),
            kwargs
                .get_item(intern!(py, "cycle_start_date"))?
                .filter(|v| !v.is_none()),
            maker.get(),
            rid.to_str()?,
            Some(hooks.lookup_found.bind(py)),
        );
        let Ok((
            code,
            usage,
            found_model,
            content,
            table_cost,
            message,
            outcome,
            flush,
            rid,
            reason,
        )) = finished
        else {
            return Ok(None);
        };
        if code != READ_OK || outcome == DECLINED {
            return Ok(None);
        }
        // Recorded: from here on nothing may fail the caller's call.
        let after = || -> PyResult<()> {
            let same_model = match &found_model {
                None => true,
                Some(found) => found.eq(&model)?,
            };
            let unpriced =
                table_cost.is_none() && usage.as_ref().is_some_and(|u| u.get().cost_usd.is_none());
            let usual =
                message.is_none() && outcome == RECORDED && !flush && same_model && !unpriced;
            let stats = ctx.getattr(intern!(py, "stats"))?;
            if !usual {
                // Warnings, another model's prices, unpriced, refused or an early flush: Python
                // does the bookkeeping (the call is recorded either way).
                slf.call_method1(
                    intern!(py, "_recorded"),
                    (
                        group,
                        (
                            usage,
                            found_model,
                            content,
                            table_cost,
                            message,
                            outcome,
                            flush,
                            rid,
                            reason,
                            prices,
                            duration_s,
                        ),
                    ),
                )?;
                return Ok(());
            }
            match stats.cast::<CallStats>() {
                Ok(counters) => counters.borrow_mut().llm_calls += 1,
                Err(_) => {
                    let calls = stats.getattr(intern!(py, "llm_calls"))?.extract::<u64>()?;
                    stats.setattr(intern!(py, "llm_calls"), calls + 1)?;
                }
            }
            let parts = (
                found_model,
                content,
                table_cost,
                PyFloat::new(py, duration_s),
                rid,
                reason,
                prices,
            )
                .into_pyobject(py)?;
            let replaced = {
                let mut me = slf.borrow_mut();
                let usage = match usage {
                    Some(u) => u.into_any().unbind(),
                    None => py.None(),
                };
                [
                    std::mem::replace(&mut me.usage, usage),
                    std::mem::replace(&mut me.parts, parts.into_any().unbind()),
                ]
            };
            drop(replaced); // (after the borrow: a `__del__` may read the call)
                            // The stores' flushers run (the usual case) or are started: `_FastGroup.kick`.
            for store in group.getattr(intern!(py, "stores"))?.try_iter()? {
                let flusher = store?.getattr(intern!(py, "_flusher"))?;
                if !flusher.getattr(intern!(py, "running"))?.is_truthy()? {
                    group.call_method1(intern!(py, "kick"), (false,))?;
                    break;
                }
            }
            Ok(())
        };
        if let Err(err) = after() {
            err.write_unraisable(py, Some(slf.as_any()));
        }
        Ok(Some(()))
    }
}

impl CallScope {
    /// The common end when the end's handlers are not one group of built-in recorders (a
    /// handler written in Python, or none): the response dict built in one crossing
    /// (`_calls.LLMCall._end`'s rule for a response with usage and a cost), counted, and the
    /// end fired by `_end_fired` when anyone listens. `None` when the general path must read
    /// the response (no usage, a warning, no cost): nothing was counted.
    fn end_built<'py>(
        slf: &Bound<'py, Self>,
        hooks: &Hooks,
        table: &Bound<'py, PyAny>,
        duration_s: f64,
        id_given: bool,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let py = slf.py();
        let (response, provider, model, request_id, ctx) = {
            let me = slf.borrow();
            (
                me.raw_response.clone_ref(py).into_bound(py),
                me.provider.clone_ref(py).into_bound(py),
                me.model.clone_ref(py).into_bound(py),
                me.request_id.clone_ref(py).into_bound(py),
                me.ctx.clone_ref(py).into_bound(py),
            )
        };
        let prices = call_prices(py, hooks, &model, &provider, false)?;
        let (code, built, message, usage) = py_finish_response(
            &response,
            &provider,
            &model,
            duration_s,
            &request_id,
            prices.as_ref(),
        )?;
        let Some(built) = built else {
            return Ok(None);
        };
        if code != READ_OK
            || message.is_some()
            || built
                .get_item(intern!(py, "cost_estimate"))?
                .is_none_or_py_none()
        {
            return Ok(None);
        }
        let maker = id_maker(py, hooks)?;
        let stats = ctx.getattr(intern!(py, "stats"))?;
        stats.cast::<CallStats>()?.borrow_mut().llm_calls += 1;
        if !id_given {
            maker.get().mark(request_id.cast::<PyString>()?.to_str()?); // handed back: a duplicate
        }
        let replaced = {
            let mut me = slf.borrow_mut();
            let usage = match usage {
                Some(u) => u.into_any().unbind(),
                None => py.None(),
            };
            [
                std::mem::replace(&mut me.response_dict, built.into_any().unbind()),
                std::mem::replace(&mut me.parts, py.None()),
                std::mem::replace(&mut me.usage, usage),
            ]
        };
        drop(replaced); // (after the borrow: a `__del__` may read the call)
        let targets = table
            .getattr(intern!(py, "by_event"))?
            .get_item(intern!(py, "on_llm_end"))?;
        if !targets.is_truthy()? && !table.getattr(intern!(py, "settlers"))?.is_truthy()? {
            return Ok(Some(done(py)?.into_bound(py)));
        }
        Ok(Some(
            slf.call_method1(intern!(py, "_end_fired"), (duration_s,))?,
        ))
    }
}

/// `None`, or Python's `None`.
trait NoneOrPyNone {
    fn is_none_or_py_none(&self) -> bool;
}

impl NoneOrPyNone for Option<Bound<'_, PyAny>> {
    fn is_none_or_py_none(&self) -> bool {
        self.as_ref().map_or(true, |v| v.is_none())
    }
}

#[pymethods]
impl CallScope {
    /// Give the core the Python side's state and rules (once, at import of `llmtally._calls`).
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    fn configure(
        py: Python<'_>,
        globals: Py<PyAny>,
        ids: Py<PyAny>,
        observed: Py<PyAny>,
        current: Py<PyAny>,
        not_inherited: Py<PyAny>,
        price_cache: Py<PyDict>,
        price_lookup: Py<PyAny>,
        lookup_found: Py<PyAny>,
        safe_user_chars: usize,
        max_id_chars: usize,
        now: f64,
    ) -> PyResult<()> {
        let _ = CLOCK.set((Instant::now(), now));
        let current = current.bind(py);
        let _ = HOOKS.set(
            py,
            Hooks {
                globals,
                ids,
                observed,
                current_get: current.getattr(intern!(py, "get"))?.unbind(),
                current_set: current.getattr(intern!(py, "set"))?.unbind(),
                current_reset: current.getattr(intern!(py, "reset"))?.unbind(),
                not_inherited,
                price_cache,
                price_lookup,
                lookup_found,
                safe_user_chars,
                max_id_chars,
            },
        );
        Ok(())
    }

    /// The core's clock, `time.perf_counter()`'s.
    #[staticmethod]
    fn now() -> f64 {
        perf_counter()
    }

    #[new]
    #[pyo3(signature = (ctx, messages, provider, model, context))]
    fn py_new(
        py: Python<'_>,
        ctx: Bound<'_, PyAny>,
        messages: Py<PyAny>,
        provider: Bound<'_, PyAny>,
        model: Bound<'_, PyAny>,
        context: Bound<'_, PyDict>,
    ) -> PyResult<Self> {
        let hooks = hooks(py)?;
        // (`None` is no value, as in Python's rules.)
        let user = context
            .get_item(intern!(py, "user_id"))?
            .filter(|v| !v.is_none());
        let given = context
            .get_item(intern!(py, "request_id"))?
            .filter(|v| !v.is_none());
        let plain = user
            .as_ref()
            .map_or(Ok(true), |u| plain_str(u, hooks.safe_user_chars, false))?
            && given
                .as_ref()
                .map_or(Ok(true), |g| plain_str(g, hooks.max_id_chars, true))?
            && (provider.is_none() || provider.cast_exact::<PyString>().is_ok())
            && (model.is_none() || model.cast_exact::<PyString>().is_ok());
        let (provider, model, given) = if plain {
            let unknown = || intern!(py, "unknown").clone().into_any();
            let provider = if provider.is_none() || provider.len()? == 0 {
                unknown()
            } else {
                provider
            };
            let model = if model.is_none() || model.len()? == 0 {
                unknown()
            } else {
                model
            };
            (provider, model, given)
        } else {
            // The rules for unusual input, counted and logged in Python.
            let out = ctx
                .getattr(intern!(py, "prepare_call"))?
                .call1((&provider, &model, &context))?;
            let (provider, model, given) =
                out.extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>, Option<Bound<'_, PyAny>>)>()?;
            (provider, model, given)
        };
        context.set_item(intern!(py, "provider"), &provider)?;
        context.set_item(intern!(py, "model"), &model)?;
        let none = py.None();
        Ok(Self {
            ctx: ctx.unbind(),
            messages,
            provider: provider.unbind(),
            model: model.unbind(),
            kwargs: context.into_any().unbind(),
            id_given: given.is_some(),
            request_id: match given {
                Some(g) => g.unbind(),
                None => PyString::new(py, "").into_any().unbind(),
            },
            run_id: PyString::new(py, "").into_any().unbind(),
            started_at: 0.0,
            raw_response: none.clone_ref(py),
            response_set: false,
            done: false,
            token: none.clone_ref(py),
            table: none.clone_ref(py),
            first_chunk_at: None,
            chunks: 0,
            texts: none.clone_ref(py),
            stream_usage: none.clone_ref(py),
            usage: none.clone_ref(py),
            response_dict: none.clone_ref(py),
            parts: none.clone_ref(py),
            duplicate: false,
            stoppable: true,
            abandoned: false,
            open: false,
        })
    }

    /// Record one streamed chunk (its text and usage, see `LLMCall.chunk`) without firing any
    /// event. A chunk that cannot be read is bad input (`_chunk_failed` counts and logs it),
    /// never an error.
    #[pyo3(signature = (chunk, *, usage=None))]
    fn record_chunk(
        slf: &Bound<'_, Self>,
        chunk: &Bound<'_, PyAny>,
        usage: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let py = slf.py();
        {
            let mut me = slf.borrow_mut();
            if me.first_chunk_at.is_none() {
                me.first_chunk_at = Some(perf_counter());
            }
            me.chunks += 1;
        }
        let read = || -> PyResult<()> {
            if let Some(text) = extract_text(chunk)? {
                if text.len()? > 0 {
                    let texts = slf.borrow().texts.clone_ref(py).into_bound(py);
                    if let Ok(list) = texts.cast::<PyList>() {
                        list.append(text)?;
                    } else {
                        slf.borrow_mut().texts = PyList::new(py, [text])?.into_any().unbind();
                    }
                }
            }
            let mut merged = slf.borrow().stream_usage.clone_ref(py).into_bound(py);
            if !chunk.is_exact_instance_of::<PyString>() {
                merged = py_merge_stream_usage(&merged, chunk)?;
            }
            if let Some(usage) = usage.filter(|u| !u.is_none()) {
                merged = py_merge_stream_usage(&merged, usage)?;
            }
            slf.borrow_mut().stream_usage = merged.unbind();
            Ok(())
        };
        match read() {
            Err(err) if err.is_instance_of::<PyException>(py) => {
                slf.call_method1(intern!(py, "_chunk_failed"), (err.into_value(py),))?;
            }
            Err(err) => return Err(err), // KeyboardInterrupt, SystemExit: the caller's
            Ok(()) => {}
        }
        Ok(())
    }

    /// Hand over the provider's response: a dict (llmtally's response dict or the provider's
    /// JSON body) or an SDK object (OpenAI, Anthropic). Usage is normalized when the call ends.
    fn set_response(slf: &Bound<'_, Self>, response: Py<PyAny>) {
        let old = {
            let mut me = slf.borrow_mut();
            me.response_set = true;
            std::mem::replace(&mut me.raw_response, response)
        };
        drop(old); // (its `__del__` may read the call: not under the borrow)
    }

    fn __aenter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let hooks = hooks(py)?;
        let (ctx, kwargs, id_given, request_id, messages) = {
            let me = slf.borrow();
            if me.done || me.run_id.bind(py).len()? > 0 {
                return Err(pyo3::exceptions::PyRuntimeError::new_err(
                    "this LLM call was already entered: each llm_call(...) is entered once",
                ));
            }
            (
                me.ctx.clone_ref(py).into_bound(py),
                me.kwargs.clone_ref(py).into_bound(py),
                me.id_given,
                me.request_id.clone_ref(py).into_bound(py),
                me.messages.clone_ref(py).into_bound(py),
            )
        };
        let kwargs = kwargs.cast_into::<PyDict>()?;
        let version = ctx.getattr(intern!(py, "version"))?;
        let mut table = if version.eq(hooks.globals.bind(py).getattr(intern!(py, "version"))?)? {
            ctx.getattr(intern!(py, "table"))?
        } else {
            ctx.call_method0(intern!(py, "current"))?
        };
        let given_run = kwargs.get_item(intern!(py, "run_id"))?.filter(|r| {
            r.cast::<PyString>()
                .is_ok_and(|s| s.len().is_ok_and(|n| n > 0))
        });
        let maker = id_maker(py, hooks)?;
        let (request_id, run_id) = if id_given {
            let counted = ctx.getattr(intern!(py, "window"))?.contains(&request_id)?
                || maker
                    .get()
                    .counted(request_id.cast::<PyString>()?.to_str()?);
            if counted {
                // Already counted (a request id handed back): no handler counts it again, but
                // the call still runs, so the limiters still see it.
                table = table.getattr(intern!(py, "limits_only"))?;
            }
            let run = match given_run {
                Some(r) => r,
                None => PyString::new(py, &maker.get().next()).into_any(),
            };
            (request_id, run)
        } else {
            // A generated request id is unique, so it doubles as the run id.
            let rid = PyString::new(py, &maker.get().next()).into_any();
            kwargs.set_item(intern!(py, "request_id"), &rid)?;
            let run = given_run.unwrap_or_else(|| rid.clone());
            (rid, run)
        };
        let (kwargs, token) = Self::open_context(py, hooks, kwargs, &run_id)?;
        let targets = table
            .getattr(intern!(py, "by_event"))?
            .get_item(intern!(py, "on_llm_start"))?;
        let started_at = perf_counter();
        let replaced = {
            let mut me = slf.borrow_mut();
            me.started_at = started_at;
            [
                std::mem::replace(&mut me.table, table.clone().unbind()),
                std::mem::replace(&mut me.request_id, request_id.unbind()),
                std::mem::replace(&mut me.run_id, run_id.unbind()),
                std::mem::replace(&mut me.kwargs, kwargs.clone().into_any().unbind()),
                std::mem::replace(&mut me.token, token.unbind()),
            ]
        };
        drop(replaced); // (after the borrow: a `__del__` may read the call)
        if !targets.is_truthy()? {
            return Ok(Bound::new(
                py,
                Ready {
                    value: Some(slf.clone().into_any().unbind()),
                },
            )?
            .into_any());
        }
        // The start's handlers: the built-in ones without a coroutine unless one waits;
        // whatever waits or raises is finished by `_start_fire`.
        let dispatcher = ctx.getattr(intern!(py, "dispatcher"))?;
        let fast = table.getattr(intern!(py, "fast_start"))?.is_truthy()?
            && (targets.len()? == 1
                || !dispatcher.getattr(intern!(py, "parallel"))?.is_truthy()?);
        let stop = PyDict::new(py);
        stop.set_item(intern!(py, "stop_on_abort"), true)?;
        let args = PyTuple::new(py, [messages])?;
        let method = if fast {
            intern!(py, "fire_fast")
        } else {
            intern!(py, "fire")
        };
        let fired = dispatcher.call_method(
            method,
            (&targets, intern!(py, "on_llm_start"), args, &kwargs),
            Some(&stop),
        );
        match fired {
            Ok(waiting) if waiting.is_none() => Ok(Bound::new(
                py,
                Ready {
                    value: Some(slf.clone().into_any().unbind()),
                },
            )?
            .into_any()),
            Ok(waiting) => slf.call_method1(intern!(py, "_start_fire"), (waiting, py.None())),
            Err(err) => {
                slf.call_method1(intern!(py, "_start_fire"), (py.None(), err.into_value(py)))
            }
        }
    }

    fn __aexit__<'py>(
        slf: &Bound<'py, Self>,
        exc_type: &Bound<'py, PyAny>,
        exc: &Bound<'py, PyAny>,
        tb: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let hooks = hooks(py)?;
        let (usual, table, token, started_at, id_given, request_id, ctx) = {
            let me = slf.borrow();
            if me.done {
                return Ok(done(py)?.into_bound(py));
            }
            (
                exc.is_none() && me.response_set && me.first_chunk_at.is_none() && !me.open,
                me.table.clone_ref(py).into_bound(py),
                me.token.clone_ref(py).into_bound(py),
                me.started_at,
                me.id_given,
                me.request_id.clone_ref(py).into_bound(py),
                me.ctx.clone_ref(py).into_bound(py),
            )
        };
        let mut declined = false;
        // A request id the caller gave, checked here (`_end`'s rule): a new one is counted by
        // the core; one already counted or seen is a duplicate, ended by the general path.
        let mut id_fresh = false;
        if usual
            && !hooks
                .observed
                .bind(py)
                .getattr(intern!(py, "on"))?
                .is_truthy()?
            && (!id_given || {
                // (A check that fails leaves the decision to the general path.)
                let fresh = || -> PyResult<bool> {
                    let maker = id_maker(py, hooks)?;
                    let counted = match request_id.cast::<PyString>()?.to_str() {
                        Ok(rid) => maker.get().counted(rid),
                        Err(_) => return Ok(false), // unreadable: the general path decides
                    };
                    Ok(!counted
                        && !ctx
                            .getattr(intern!(py, "window"))?
                            .call_method1(intern!(py, "seen"), (&request_id,))?
                            .is_truthy()?)
                };
                id_fresh = fresh().unwrap_or(false);
                id_fresh
            })
        {
            let group = table.getattr(intern!(py, "end_group"))?;
            slf.borrow_mut().done = true;
            if !token.is_none() {
                close_context(py, hooks, &token)?;
            }
            let duration_s = perf_counter() - started_at;
            // An error before anything was counted declines too.
            if !group.is_none() {
                if let Ok(Some(())) = Self::end_recorded(slf, hooks, &group, duration_s) {
                    if table.getattr(intern!(py, "settlers"))?.is_truthy()? {
                        slf.call_method0(intern!(py, "_settle_limiters"))?;
                    }
                    return Ok(done(py)?.into_bound(py));
                }
            } else if let Ok(Some(next)) = Self::end_built(slf, hooks, &table, duration_s, id_given)
            {
                return Ok(next);
            }
            // Declined: the general path ends the call (the context is closed already).
            let mut me = slf.borrow_mut();
            me.done = false;
            me.token = py.None();
            declined = true;
        }
        slf.call_method1(
            intern!(py, "_exit"),
            (exc_type, exc, tb, declined, id_fresh),
        )
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for field in [
            &self.ctx,
            &self.messages,
            &self.provider,
            &self.model,
            &self.kwargs,
            &self.request_id,
            &self.run_id,
            &self.raw_response,
            &self.token,
            &self.table,
            &self.texts,
            &self.stream_usage,
            &self.usage,
            &self.response_dict,
            &self.parts,
        ] {
            visit.call(field)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        Python::attach(|py| {
            for field in [
                &mut self.messages,
                &mut self.kwargs,
                &mut self.raw_response,
                &mut self.token,
                &mut self.table,
                &mut self.texts,
                &mut self.stream_usage,
                &mut self.usage,
                &mut self.response_dict,
                &mut self.parts,
            ] {
                *field = py.None();
            }
        });
    }
}

/// This process's id maker (`_ids.state.maker`; a forked child has its own).
fn id_maker<'py>(py: Python<'py>, hooks: &Hooks) -> PyResult<Bound<'py, IdMaker>> {
    Ok(hooks
        .ids
        .bind(py)
        .getattr(intern!(py, "maker"))?
        .cast_into::<IdMaker>()?)
}

/// The prices of `model` already looked up (`pricing.cached`'s rule: provider `"unknown"` is
/// none), or, with `lookup`, looked up now (`pricing.lookup`, which counts a miss).
fn call_prices<'py>(
    py: Python<'py>,
    hooks: &Hooks,
    model: &Bound<'py, PyAny>,
    provider: &Bound<'py, PyAny>,
    lookup: bool,
) -> PyResult<Option<Bound<'py, Prices>>> {
    let key_provider = if provider.eq(intern!(py, "unknown"))? {
        py.None().into_bound(py)
    } else {
        provider.clone()
    };
    let key = PyTuple::new(py, [model.clone(), key_provider.clone()])?;
    let mut prices = hooks.price_cache.bind(py).get_item(&key)?;
    if lookup
        && prices.as_ref().map_or(true, |p| p.is_none())
        && !model.eq(intern!(py, "unknown"))?
    {
        prices = Some(hooks.price_lookup.bind(py).call1((model, &key_provider))?);
    }
    match prices.filter(|p| !p.is_none()) {
        Some(p) => Ok(Some(p.cast_into::<Prices>()?)),
        None => Ok(None),
    }
}

/// `_context._close_context`: reset the current run, or restore the parent by value when the
/// scope exits in another context than it entered in.
fn close_context(py: Python<'_>, hooks: &Hooks, token: &Bound<'_, PyAny>) -> PyResult<()> {
    match hooks.current_reset.bind(py).call1((token,)) {
        Ok(_) => Ok(()),
        Err(err) if err.is_instance_of::<pyo3::exceptions::PyValueError>(py) => {
            let old = token.getattr(intern!(py, "old_value"))?;
            let missing = py
                .import(intern!(py, "contextvars"))?
                .getattr(intern!(py, "Token"))?
                .getattr(intern!(py, "MISSING"))?;
            let value = if old.is(&missing) {
                py.None().into_bound(py)
            } else {
                old
            };
            hooks.current_set.bind(py).call1((value,))?;
            Ok(())
        }
        Err(err) => Err(err),
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Ready>()?;
    m.add_class::<CallScope>()?;
    m.add_class::<CallStats>()?;
    Ok(())
}
