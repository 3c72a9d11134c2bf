//! The fast path of the built-in metering handlers: one crossing per LLM call end.
//!
//! A manager groups the built-in handlers of an event (seed handlers, `UsageRecorder`,
//! `TokenCounter`/`CostTracker`, `PerformanceTracker`) into one `Recorder`, which reads the
//! normalized response once and updates every accumulator they need: ledgers, histograms,
//! request-rate windows. Only the common case is handled here; anything unusual (a usage
//! error, an unpriced call, a caller-given request id that needs a handler's dedupe window,
//! a non-string user id) is declined before anything is written, and the manager calls each
//! handler's own Python recorder instead, so behaviour is the same on both paths.
//!
//! `PerfModel` holds one model's performance accumulators (latency, time to first token,
//! tokens/s histograms, errors, requests per minute); `PerformanceTracker` uses it on both
//! paths.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use crate::cost::Prices;
use crate::histogram::Histogram;
use crate::ledger::{response_counts, Counters, Ledger, ResponseCounts, NFIELDS};
use crate::response::{
    extract_text, looks_like_sdk_response, response_meta, response_model, BAD_USAGE,
    NOT_A_RESPONSE, NO_USAGE, OK as READ_OK,
};
use crate::usage::extract_any;
use crate::usage::{usd_to_pusd, Usage};

// ---------------------------------------------------------------------------------------------
// Requests per minute: per-second buckets, fixed memory whatever the rate.

const SLOTS: usize = 64;

struct Window {
    slots: [(i64, u64); SLOTS],
}

impl Window {
    fn new() -> Self {
        Self {
            slots: [(i64::MIN, 0); SLOTS],
        }
    }

    fn record(&mut self, sec: i64) {
        let slot = &mut self.slots[sec.rem_euclid(SLOTS as i64) as usize];
        if slot.0 != sec {
            *slot = (sec, 0);
        }
        slot.1 += 1;
    }

    /// Events in the 60 seconds up to `now` (at one-second resolution).
    fn last_minute(&self, now: f64) -> u64 {
        let now_sec = now.floor() as i64;
        let from = (now - 60.0).floor() as i64;
        self.slots
            .iter()
            .filter(|(sec, _)| *sec >= from && *sec <= now_sec)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Seconds on the process's own monotonic clock (used when no clock is given).
fn mono_now() -> f64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    // Offset so the first reading is well above zero (a window slot starts at i64::MIN).
    BASE.get_or_init(Instant::now).elapsed().as_secs_f64() + 1_000_000.0
}

/// One model's performance accumulators.
#[pyclass(frozen, module = "llmtally._core", name = "PerfModel")]
pub struct PerfModel {
    #[pyo3(get)]
    latency: Py<Histogram>,
    #[pyo3(get)]
    ttft: Py<Histogram>,
    #[pyo3(get)]
    tps: Py<Histogram>,
    errors: AtomicU64,
    window: Mutex<Window>,
}

impl PerfModel {
    fn create(py: Python<'_>) -> PyResult<Self> {
        Ok(Self {
            latency: Py::new(py, Histogram::with_scale(1000.0))?, // ms, microsecond resolution
            ttft: Py::new(py, Histogram::with_scale(1000.0))?,
            tps: Py::new(py, Histogram::with_scale(100.0))?, // tokens/s, 0.01 resolution
            errors: AtomicU64::new(0),
            window: Mutex::new(Window::new()),
        })
    }

    /// The same rules as the Python tracker: latency always; time to first token when
    /// streamed; tokens/s over the time after the first token.
    fn add(&self, duration_ms: f64, ttft_ms: Option<f64>, completion: Option<i64>, now: f64) {
        self.latency.get().record_value(duration_ms);
        self.window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(now.floor() as i64);
        let mut since = 0.0;
        if let Some(t) = ttft_ms.filter(|t| *t >= 0.0 && t.is_finite()) {
            self.ttft.get().record_value(t);
            since = t;
        }
        if let Some(c) = completion.filter(|c| *c > 0) {
            if duration_ms > since {
                self.tps
                    .get()
                    .record_value(c as f64 * 1000.0 / (duration_ms - since));
            }
        }
    }
}

fn valid_duration(duration_ms: f64) -> bool {
    duration_ms >= 0.0 && duration_ms.is_finite()
}

#[pymethods]
impl PerfModel {
    #[new]
    fn py_new(py: Python<'_>) -> PyResult<Self> {
        Self::create(py)
    }

    /// Record one ended call. `now` is the tracker's clock in seconds (`None`: the process's
    /// monotonic clock, the one :meth:`requests_per_min` reads without a `now`).
    #[pyo3(signature = (duration_ms, ttft_ms=None, completion_tokens=None, now=None))]
    fn record(
        &self,
        duration_ms: f64,
        ttft_ms: Option<f64>,
        completion_tokens: Option<i64>,
        now: Option<f64>,
    ) -> PyResult<()> {
        if !valid_duration(duration_ms) {
            return Err(PyValueError::new_err(format!(
                "duration_ms must be finite and >= 0, not {duration_ms}"
            )));
        }
        self.add(
            duration_ms,
            ttft_ms,
            completion_tokens,
            now.unwrap_or_else(mono_now),
        );
        Ok(())
    }

    fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    #[getter]
    fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Calls recorded in the last 60 seconds up to `now` (default: the monotonic clock).
    #[pyo3(signature = (now=None))]
    fn requests_per_min(&self, now: Option<f64>) -> u64 {
        let now = now.unwrap_or_else(mono_now);
        self.window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_minute(now)
    }

    /// Add another model's accumulators (for the all-models view).
    fn merge(&self, py: Python<'_>, other: &PerfModel) -> PyResult<()> {
        self.latency.get().merge_from(other.latency.get())?;
        self.ttft.get().merge_from(other.ttft.get())?;
        self.tps.get().merge_from(other.tps.get())?;
        let _ = py;
        self.errors
            .fetch_add(other.errors.load(Ordering::Relaxed), Ordering::Relaxed);
        let theirs = other.window.lock().unwrap_or_else(|p| p.into_inner()).slots;
        let mut mine = self.window.lock().unwrap_or_else(|p| p.into_inner());
        for (sec, n) in theirs {
            if sec == i64::MIN || n == 0 {
                continue;
            }
            let slot = &mut mine.slots[sec.rem_euclid(SLOTS as i64) as usize];
            if slot.0 == sec {
                slot.1 += n;
            } else if slot.0 < sec {
                *slot = (sec, n);
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The billing cycle: the first day of the current UTC month, recomputed when the month ends.

/// Civil date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-01` of the month holding `unix_s`, and the unix second the next month starts.
fn month_of(unix_s: i64) -> (String, i64) {
    let (y, m, _) = civil_from_days(unix_s.div_euclid(86_400));
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (
        format!("{y:04}-{m:02}-01"),
        days_from_civil(ny, nm, 1) * 86_400,
    )
}

/// The process's billing-cycle clock: the one owner of "which cycle is it now" (Python reads it
/// through `current_cycle`).
pub struct CycleClock {
    until: AtomicI64,
    cycle: Mutex<String>,
}

pub static CLOCK: CycleClock = CycleClock {
    until: AtomicI64::new(i64::MIN),
    cycle: Mutex::new(String::new()),
};

/// `YYYY-MM-01` of the current UTC month.
#[pyfunction]
#[pyo3(name = "current_cycle")]
pub fn py_current_cycle() -> String {
    CLOCK.with_current(str::to_owned)
}

impl CycleClock {
    pub fn with_current<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let mut cycle = self.cycle.lock().unwrap_or_else(|p| p.into_inner());
        if now >= self.until.load(Ordering::Relaxed) {
            let (c, until) = month_of(now);
            *cycle = c;
            self.until.store(until, Ordering::Relaxed);
        }
        f(&cycle)
    }
}

// ---------------------------------------------------------------------------------------------
// The recorder.

/// What a seed handler (`RedisTokenCallbackHandler`) records in the one-crossing recorder: one
/// user's key, `prefix` + the cycle (`cycle`, else the current month), in `store`.
#[pyclass(frozen, module = "llmtally._core", name = "UserKeySink")]
pub struct UserKeySink {
    /// The store written (its ledger is looked up at each call: a forked child starts anew).
    #[pyo3(get)]
    store: Py<PyAny>,
    prefix: String,
    cycle: Option<String>,
}

#[pymethods]
impl UserKeySink {
    #[new]
    #[pyo3(signature = (store, prefix, cycle = None))]
    fn new(store: Py<PyAny>, prefix: String, cycle: Option<String>) -> Self {
        UserKeySink {
            store,
            prefix,
            cycle,
        }
    }
}

/// What a `UsageRecorder` records: the call's user, under the key `key_for(user_id, cycle)`.
#[pyclass(frozen, module = "llmtally._core", name = "CallUserSink")]
pub struct CallUserSink {
    /// The store written.
    #[pyo3(get)]
    store: Py<PyAny>,
    key_for: Py<PyAny>,
}

#[pymethods]
impl CallUserSink {
    #[new]
    fn new(store: Py<PyAny>, key_for: Py<PyAny>) -> Self {
        CallUserSink { store, key_for }
    }
}

/// What a `TokenCounter` / `CostTracker` records: the ledger slot of `(provider, model,
/// user)`, found in `slots`, else given by `admit(key)` (where the tracker applies its caps).
#[pyclass(frozen, module = "llmtally._core", name = "TrackerSink")]
pub struct TrackerSink {
    ledger: Py<Ledger>,
    slots: Py<PyDict>,
    admit: Py<PyAny>,
}

#[pymethods]
impl TrackerSink {
    #[new]
    fn new(ledger: Py<Ledger>, slots: Py<PyDict>, admit: Py<PyAny>) -> Self {
        TrackerSink {
            ledger,
            slots,
            admit,
        }
    }
}

/// What a `PerformanceTracker` records: per-model accumulators in `models`, else from
/// `admit(model)`.
#[pyclass(frozen, module = "llmtally._core", name = "PerfSink")]
pub struct PerfSink {
    models: Py<PyDict>,
    admit: Py<PyAny>,
}

#[pymethods]
impl PerfSink {
    #[new]
    fn new(models: Py<PyDict>, admit: Py<PyAny>) -> Self {
        PerfSink { models, admit }
    }
}

enum Sink {
    /// A seed handler: one user's key, `prefix` + the cycle (fixed, or the current month).
    /// Stores are held, not their ledgers: a store may start a new ledger (in a forked child).
    UserKey {
        store: Py<PyAny>,
        prefix: String,
        cycle: Option<String>,
    },
    /// `UsageRecorder`: the call's user; keys made by `key_for(user_id, cycle)`, cached.
    CallUser {
        store: Py<PyAny>,
        key_for: Py<PyAny>,
        keys: Mutex<HashMap<String, (String, Py<PyString>)>>,
    },
    /// `TokenCounter` / `CostTracker`: the ledger slot of the tuple `(provider, model, user)`,
    /// found in the tracker's table (`slots`), else given by `admit(key)`, where the tracker
    /// applies its caps (a key past them shares an `"<other>"` slot).
    PerCall {
        ledger: Py<Ledger>,
        slots: Py<PyDict>,
        admit: Py<PyAny>,
    },
    /// `PerformanceTracker`: per-model accumulators in the tracker's dict, else from
    /// `admit(model)` (past its cap, the shared `"<other>"` entry).
    Perf {
        models: Py<PyDict>,
        admit: Py<PyAny>,
    },
}

const MAX_CACHED_USERS: usize = 100_000;
/// Longer user ids are not cached (the cache stays small in bytes whatever the ids).
const MAX_CACHED_USER_LEN: usize = 256;
/// A longer user id (in characters) is left to Python, which applies the identity rule's size
/// limit in UTF-8 bytes (`llmtally.identity.MAX_USER_ID_BYTES` / 4: within it whatever it holds).
const MAX_FAST_USER_CHARS: usize = 16 * 1024;
/// Outcomes of `Recorder.end`.
pub const DECLINED: i64 = -2;
pub const RECORDED: i64 = -1;

/// Every built-in accumulator of one manager's end event, updated in one crossing.
#[pyclass(frozen, module = "llmtally._core", name = "Recorder")]
pub struct Recorder {
    sinks: Vec<Sink>,
    flush_at: u64,
}

struct Call<'py> {
    counts: Counters,
    provider: Bound<'py, PyString>,
    /// The model the response reports (the trackers' key), and the call's (per-model latency).
    model: Bound<'py, PyString>,
    call_model: Bound<'py, PyString>,
    user: Option<Bound<'py, PyString>>,
    duration_ms: f64,
    ttft_ms: Option<f64>,
    /// Completion tokens when the response states them (tokens/s).
    completion: Option<i64>,
}

fn opt_str<'py>(v: Option<Bound<'py, PyAny>>) -> Option<Option<Bound<'py, PyString>>> {
    match v {
        None => Some(None),
        Some(v) if v.is_none() => Some(None),
        Some(v) => v.cast_into::<PyString>().ok().map(Some),
    }
}

/// A user id kwarg: `Some(None)` for none (or empty), `None` when it is not a string or is
/// long enough for the identity rule's size limit to matter (the handlers' own path decides).
fn user_of<'py>(v: Option<Bound<'py, PyAny>>) -> PyResult<Option<Option<Bound<'py, PyString>>>> {
    Ok(match opt_str(v) {
        None => None,
        Some(Some(u)) if u.len()? == 0 => Some(None),
        Some(Some(u)) if u.len()? > MAX_FAST_USER_CHARS => None,
        Some(u) => Some(u),
    })
}

impl Recorder {
    /// Read the call; `None` when it must take the handlers' own path.
    fn read<'py>(
        response: &Bound<'py, PyDict>,
        kwargs: &Bound<'py, PyDict>,
        id_prefix: &str,
    ) -> PyResult<Option<Call<'py>>> {
        let py = response.py();
        // A caller-given request id: the handlers' dedupe windows decide.
        let Some(rid) = kwargs.get_item(intern!(py, "request_id"))? else {
            return Ok(None);
        };
        let Ok(rid) = rid.cast_into::<PyString>() else {
            return Ok(None);
        };
        if !rid.to_str()?.starts_with(id_prefix) {
            return Ok(None);
        }
        let ResponseCounts::Counted {
            counts,
            priced: true, // (unpriced: CostTracker counts it)
            completion,
        } = response_counts(response)?
        else {
            return Ok(None);
        };
        let Some(Some(provider)) = opt_str(kwargs.get_item(intern!(py, "provider"))?) else {
            return Ok(None);
        };
        let Some(Some(call_model)) = opt_str(kwargs.get_item(intern!(py, "model"))?) else {
            return Ok(None);
        };
        // The model the response reports, else the call's.
        let model = match opt_str(response.get_item(intern!(py, "model"))?) {
            Some(Some(m)) if m.len()? > 0 => m,
            Some(_) => call_model.clone(),
            None => return Ok(None),
        };
        let Some(user) = user_of(kwargs.get_item(intern!(py, "user_id"))?)? else {
            return Ok(None);
        };
        if !matches!(
            opt_str(kwargs.get_item(intern!(py, "cycle_start_date"))?),
            Some(None)
        ) {
            return Ok(None); // a per-call cycle: UsageRecorder validates it
        }
        let duration_ms = match kwargs.get_item(intern!(py, "duration_ms"))? {
            Some(v) => match v.extract::<f64>() {
                Ok(d) if valid_duration(d) => d,
                _ => return Ok(None),
            },
            None => return Ok(None),
        };
        let ttft_ms = match kwargs.get_item(intern!(py, "ttft_ms"))? {
            Some(v) if !v.is_none() => match v.extract::<f64>() {
                Ok(t) => Some(t),
                Err(_) => return Ok(None),
            },
            _ => None,
        };
        let completion = completion.then_some(counts[2]);
        Ok(Some(Call {
            counts,
            provider,
            model,
            call_model,
            user,
            duration_ms,
            ttft_ms,
            completion,
        }))
    }
}

#[pymethods]
impl Recorder {
    /// `sinks`: what each built-in handler records ([`UserKeySink`], [`CallUserSink`],
    /// [`TrackerSink`], [`PerfSink`]).
    /// `flush_at`: pending keys at which `end` asks for an early flush.
    #[new]
    fn py_new(sinks: Vec<Bound<'_, PyAny>>, flush_at: u64) -> PyResult<Self> {
        let mut out = Vec::with_capacity(sinks.len());
        for spec in sinks {
            let py = spec.py();
            out.push(if let Ok(s) = spec.cast::<UserKeySink>() {
                let s = s.get();
                Sink::UserKey {
                    store: s.store.clone_ref(py),
                    prefix: s.prefix.clone(),
                    cycle: s.cycle.clone(),
                }
            } else if let Ok(s) = spec.cast::<CallUserSink>() {
                let s = s.get();
                Sink::CallUser {
                    store: s.store.clone_ref(py),
                    key_for: s.key_for.clone_ref(py),
                    keys: Mutex::new(HashMap::new()),
                }
            } else if let Ok(s) = spec.cast::<TrackerSink>() {
                let s = s.get();
                Sink::PerCall {
                    ledger: s.ledger.clone_ref(py),
                    slots: s.slots.clone_ref(py),
                    admit: s.admit.clone_ref(py),
                }
            } else if let Ok(s) = spec.cast::<PerfSink>() {
                let s = s.get();
                Sink::Perf {
                    models: s.models.clone_ref(py),
                    admit: s.admit.clone_ref(py),
                }
            } else {
                return Err(PyTypeError::new_err(format!(
                    "a sink must be a UserKeySink, CallUserSink, TrackerSink or PerfSink, not {}",
                    spec.get_type().name()?
                )));
            });
        }
        Ok(Self {
            sinks: out,
            flush_at,
        })
    }

    /// Record one ended call into every sink. Returns `RECORDED` (-1), `DECLINED` (-2: nothing
    /// was written; the caller runs each handler's own recorder), or the index of the first
    /// sink that refused the delta because a counter would overflow (the others recorded it).
    /// `flush_wanted` is set to whether a ledger holds `flush_at` pending keys or more.
    fn end(
        &self,
        response: &Bound<'_, PyAny>,
        kwargs: &Bound<'_, PyDict>,
        id_prefix: &str,
    ) -> PyResult<(i64, bool)> {
        let Ok(response) = response.cast::<PyDict>() else {
            return Ok((DECLINED, false));
        };
        let Some(call) = Self::read(response, kwargs, id_prefix)? else {
            return Ok((DECLINED, false));
        };
        self.apply(response.py(), &call)
    }

    /// Read a call's response and record it in one crossing, for a call whose end goes only to
    /// this recorder. Returns `(code, usage, found_model, content, table_cost_pusd, warning,
    /// outcome, flush_wanted, response_id, finish_reason)`: the parts `make_response` builds the
    /// response dict from, when it is wanted. A recorded call's `request_id` is marked counted
    /// in `ids`. `outcome` is `record`'s; anything but `READ_OK` with a recorded outcome
    /// means nothing was written and the caller takes its general path.
    ///
    /// With `lookup` (a callable `(model, provider) -> Prices | None`), `prices` is the call
    /// model's, looked up by the caller (`None`: the model has no price, or is `"unknown"`):
    /// an unpriced call is recorded at cost 0 (the caller counts it unpriced: `table_cost` and
    /// the usage's `cost_usd` are both `None`), and a response naming another model is priced
    /// by that model's prices, from `lookup`. Without it, both are declined.
    #[pyo3(signature = (
        obj, provider, model, duration_s, prices, user_id, cycle_start_date, ids, request_id,
        lookup=None
    ))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn finish<'py>(
        &self,
        obj: &Bound<'py, PyAny>,
        provider: Bound<'py, PyString>,
        model: Bound<'py, PyString>,
        duration_s: f64,
        prices: Option<&Bound<'py, Prices>>,
        user_id: Option<Bound<'py, PyAny>>,
        cycle_start_date: Option<Bound<'py, PyAny>>,
        ids: &IdMaker,
        request_id: &str,
        lookup: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(
        u8,
        Option<Bound<'py, Usage>>,
        Option<Bound<'py, PyAny>>,
        Option<Bound<'py, PyAny>>,
        Option<i64>,
        Option<String>,
        i64,
        bool,
        Option<Bound<'py, PyAny>>,
        Option<Bound<'py, PyAny>>,
    )> {
        let py = obj.py();
        let nothing = |code| {
            Ok((
                code, None, None, None, None, None, DECLINED, false, None, None,
            ))
        };
        if !obj.is_instance_of::<PyDict>() && !looks_like_sdk_response(obj)? {
            return nothing(NOT_A_RESPONSE);
        }
        let u = match extract_any(obj) {
            Ok(Some(u)) => u,
            Ok(None) => return nothing(NO_USAGE),
            Err(Ok(_)) => return nothing(BAD_USAGE),
            Err(Err(e)) => return Err(e),
        };
        let found_model = response_model(obj)?;
        let same_model = match &found_model {
            None => true,
            Some(m) => m.eq(&model)?,
        };
        let content = extract_text(obj)?;
        // The prices the table cost comes from, and whether `None` means "no price".
        let (prices, authoritative) = match (lookup, &found_model) {
            (Some(_), _) if same_model => (prices.cloned(), true),
            (Some(lookup), Some(found)) if u.cost_usd.is_none() => {
                let got = lookup.call1((found, &provider))?;
                if got.is_none() {
                    (None, true)
                } else {
                    (Some(got.cast_into::<Prices>()?), true)
                }
            }
            _ if same_model => (prices.cloned(), false),
            _ => (None, false),
        };
        let table_cost = match &prices {
            Some(p) if u.cost_usd.is_none() => p.get().call_cost(&u, obj),
            _ => None,
        };
        let cost_pusd = match u.cost_usd {
            Some(usd) => usd_to_pusd(usd),
            None => table_cost,
        };
        let tracker_model = match &found_model {
            Some(m) => m.cast::<PyString>()?.clone(),
            None => model.clone(),
        };
        let (outcome, flush) = match cost_pusd {
            Some(cost) => self.record_usage(
                py,
                &u,
                cost,
                provider,
                tracker_model,
                model,
                user_id,
                cycle_start_date,
                duration_s * 1000.0,
            )?,
            // No price for the model: recorded at cost 0 when the caller said so (it counts
            // the call unpriced), else declined.
            None if authoritative && prices.is_none() && u.cost_usd.is_none() => self
                .record_usage(
                    py,
                    &u,
                    0,
                    provider,
                    tracker_model,
                    model,
                    user_id,
                    cycle_start_date,
                    duration_s * 1000.0,
                )?,
            None => (DECLINED, false),
        };
        if outcome != DECLINED {
            ids.mark(request_id); // counted: the id handed back later is a duplicate
        }
        let warning = u.warning.clone();
        let usage = Bound::new(py, u)?;
        let (response_id, finish_reason) = response_meta(obj);
        Ok((
            READ_OK,
            Some(usage),
            found_model,
            content,
            table_cost,
            warning,
            outcome,
            flush,
            response_id,
            finish_reason,
        ))
    }

    fn __len__(&self) -> usize {
        self.sinks.len()
    }
}

impl Recorder {
    #[allow(clippy::too_many_arguments)]
    fn record_usage<'py>(
        &self,
        py: Python<'py>,
        u: &Usage,
        cost_pusd: i64,
        provider: Bound<'py, PyString>,
        model: Bound<'py, PyString>,
        call_model: Bound<'py, PyString>,
        user_id: Option<Bound<'py, PyAny>>,
        cycle_start_date: Option<Bound<'py, PyAny>>,
        duration_ms: f64,
    ) -> PyResult<(i64, bool)> {
        // `finish` reads whole responses, not streams: no time to first token.
        let Some(user) = user_of(user_id)? else {
            return Ok((DECLINED, false));
        };
        if cycle_start_date.is_some_and(|c| !c.is_none()) || !valid_duration(duration_ms) {
            return Ok((DECLINED, false));
        }
        let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let mut counts = [0i64; NFIELDS];
        counts[0] = as_i64(u.total_tokens);
        counts[1] = as_i64(u.prompt_tokens.unwrap_or(0));
        counts[2] = as_i64(u.completion_tokens.unwrap_or(0));
        counts[3] = as_i64(u.cached_tokens);
        counts[4] = as_i64(u.cache_write_tokens);
        counts[5] = as_i64(u.reasoning_tokens);
        counts[6] = cost_pusd;
        counts[7] = 1;
        let call = Call {
            counts,
            provider,
            model,
            call_model,
            user,
            duration_ms,
            ttft_ms: None,
            completion: u.completion_tokens.map(as_i64),
        };
        self.apply(py, &call)
    }

    fn apply(&self, py: Python<'_>, call: &Call<'_>) -> PyResult<(i64, bool)> {
        let anonymous = intern!(py, "anonymous");
        let user_obj = call.user.as_ref().unwrap_or(anonymous);
        let needs_cycle = self
            .sinks
            .iter()
            .any(|s| matches!(s, Sink::CallUser { .. } | Sink::UserKey { cycle: None, .. }));
        let cycle = if needs_cycle {
            CLOCK.with_current(str::to_owned)
        } else {
            String::new()
        };
        // Keys that need Python are made before anything is written.
        let mut made: Vec<Option<String>> = Vec::with_capacity(self.sinks.len());
        let mut tracker_key: Option<Bound<'_, PyTuple>> = None;
        for sink in &self.sinks {
            match sink {
                Sink::CallUser { key_for, keys, .. } => {
                    // A name with no UTF-8 form (a lone surrogate): the handlers' own path.
                    let Ok(user) = user_obj.to_str() else {
                        return Ok((DECLINED, false));
                    };
                    let Some(key) = call_user_key(py, key_for, keys, user, &cycle)? else {
                        return Ok((DECLINED, false)); // the handler's own path reports it
                    };
                    made.push(Some(key));
                }
                Sink::PerCall { slots, admit, .. } => {
                    let key = match &tracker_key {
                        Some(k) => k.clone(),
                        None => {
                            let k = PyTuple::new(
                                py,
                                [
                                    call.provider.as_any(),
                                    call.model.as_any(),
                                    user_obj.as_any(),
                                ],
                            )?;
                            tracker_key = Some(k.clone());
                            k
                        }
                    };
                    let slot = match slots.bind(py).get_item(&key)? {
                        Some(slot) => slot,
                        None => admit.bind(py).call1((key,))?,
                    };
                    made.push(Some(slot.cast_into::<PyString>()?.to_str()?.to_owned()));
                }
                _ => made.push(None),
            }
        }
        // Per-model accumulators, found or made.
        let mut perfs: Vec<Option<Bound<'_, PerfModel>>> = Vec::with_capacity(self.sinks.len());
        for sink in &self.sinks {
            let Sink::Perf { models, admit } = sink else {
                perfs.push(None);
                continue;
            };
            let found = match models.bind(py).get_item(&call.call_model)? {
                Some(p) => p,
                None => admit.bind(py).call1((&call.call_model,))?,
            };
            perfs.push(Some(found.cast_into::<PerfModel>()?));
        }
        // The stores' current ledgers.
        let mut ledgers: Vec<Option<Bound<'_, Ledger>>> = Vec::with_capacity(self.sinks.len());
        for sink in &self.sinks {
            ledgers.push(match sink {
                Sink::UserKey { store, .. } | Sink::CallUser { store, .. } => Some(
                    store
                        .bind(py)
                        .getattr(intern!(py, "ledger"))?
                        .cast_into::<Ledger>()?,
                ),
                _ => None,
            });
        }
        // Everything that can fail is done: from here on, every sink is written.
        let mut failed = RECORDED;
        let mut flush = false;
        let mut key = String::new();
        for (i, sink) in self.sinks.iter().enumerate() {
            let (core, store) = match (sink, &ledgers[i]) {
                (
                    Sink::UserKey {
                        prefix,
                        cycle: fixed,
                        ..
                    },
                    Some(ledger),
                ) => {
                    key.clear();
                    key.push_str(prefix);
                    key.push_str(fixed.as_deref().unwrap_or(&cycle));
                    (ledger.get().core(), true)
                }
                (Sink::CallUser { .. }, Some(ledger)) => {
                    key.clear();
                    key.push_str(made[i].as_deref().unwrap_or_default());
                    (ledger.get().core(), true)
                }
                (Sink::PerCall { ledger, .. }, _) => {
                    key.clear();
                    key.push_str(made[i].as_deref().unwrap_or_default());
                    (ledger.get().core(), false)
                }
                (Sink::Perf { .. }, _) => {
                    if let Some(perf) = &perfs[i] {
                        perf.get()
                            .add(call.duration_ms, call.ttft_ms, call.completion, mono_now());
                    }
                    continue;
                }
                _ => continue, // a store sink always has its ledger (resolved above)
            };
            if core.add(&key, &call.counts).is_err() && failed == RECORDED {
                failed = i as i64;
            }
            if store && core.pending() >= self.flush_at {
                flush = true;
            }
        }
        Ok((failed, flush))
    }
}

/// A `UsageRecorder`'s store key of `user` in `cycle`, from its cache or its `key_for`; `None`
/// when `key_for` refused (nothing is written then). Short ids only are cached, so the cache
/// stays small in bytes whatever the ids.
fn call_user_key(
    py: Python<'_>,
    key_for: &Py<PyAny>,
    keys: &Mutex<HashMap<String, (String, Py<PyString>)>>,
    user: &str,
    cycle: &str,
) -> PyResult<Option<String>> {
    let cached = {
        let keys = keys.lock().unwrap_or_else(|p| p.into_inner());
        match keys.get(user) {
            Some((c, k)) if c == cycle => Some(k.bind(py).to_str()?.to_owned()),
            _ => None,
        }
    };
    if cached.is_some() {
        return Ok(cached);
    }
    let Ok(k) = key_for.bind(py).call1((user, cycle)) else {
        return Ok(None);
    };
    let k = k.cast_into::<PyString>()?;
    let out = k.to_str()?.to_owned();
    if user.len() <= MAX_CACHED_USER_LEN {
        let mut keys = keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.len() >= MAX_CACHED_USERS {
            keys.clear();
        }
        keys.insert(user.to_owned(), (cycle.to_owned(), k.unbind()));
    }
    Ok(Some(out))
}

/// Ids remembered as counted: the last 2^20 (about a million) ids made, one bit each.
const ENDED_BITS: u64 = 1 << 20;

/// Request and run ids: a per-process prefix and a counter, `"<prefix>-<hex counter>"`; and
/// which of the last 2^20 ids made here were counted, so a caller who hands one back as its
/// own `request_id` (a retry) is not counted twice.
#[pyclass(frozen, module = "llmtally._core", name = "IdMaker")]
pub struct IdMaker {
    prefix: String,
    next: AtomicU64,
    ended: Box<[AtomicU64]>,
}

impl IdMaker {
    /// The counter of one of this maker's ids, when it is one of the last 2^20 made.
    fn counter(&self, id: &str) -> Option<u64> {
        let hex = id.strip_prefix(self.prefix.as_str())?.strip_prefix('-')?;
        if hex.is_empty() || hex.len() > 16 {
            return None;
        }
        let n = u64::from_str_radix(hex, 16).ok()?;
        let made = self.next.load(Ordering::Relaxed);
        (n >= 1 && n < made && made - n <= ENDED_BITS).then_some(n)
    }

    fn bit(&self, n: u64) -> (&AtomicU64, u64) {
        let i = n % ENDED_BITS;
        (&self.ended[(i / 64) as usize], 1u64 << (i % 64))
    }
}

#[pymethods]
impl IdMaker {
    #[new]
    fn py_new(prefix: String) -> Self {
        Self {
            prefix,
            next: AtomicU64::new(1),
            ended: (0..ENDED_BITS / 64).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The next id.
    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let (word, mask) = self.bit(n);
        word.fetch_and(!mask, Ordering::Relaxed); // a slot reused after 2^20 ids starts clear
        let mut out = String::with_capacity(self.prefix.len() + 17);
        out.push_str(&self.prefix);
        let _ = write!(out, "-{n:x}");
        out
    }

    /// Remember that the call with this id was counted (ids of other makers are ignored).
    pub fn mark(&self, id: &str) {
        if let Some(n) = self.counter(id) {
            let (word, mask) = self.bit(n);
            word.fetch_or(mask, Ordering::Relaxed);
        }
    }

    /// Whether this id was made here, recently, and its call counted.
    pub fn counted(&self, id: &str) -> bool {
        self.counter(id).is_some_and(|n| {
            let (word, mask) = self.bit(n);
            word.load(Ordering::Relaxed) & mask != 0
        })
    }

    #[getter]
    fn prefix(&self) -> &str {
        &self.prefix
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<IdMaker>()?;
    m.add_class::<PerfModel>()?;
    m.add_class::<Recorder>()?;
    m.add_class::<UserKeySink>()?;
    m.add_class::<CallUserSink>()?;
    m.add_class::<TrackerSink>()?;
    m.add_class::<PerfSink>()?;
    m.add("RECORDED", RECORDED)?;
    m.add("DECLINED", DECLINED)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_start_on_the_first_utc_day() {
        assert_eq!(month_of(0), ("1970-01-01".to_owned(), 31 * 86_400));
        // 2026-11-23T13:00:00Z
        let (cycle, until) = month_of(1_795_438_800);
        assert_eq!(cycle, "2026-11-01");
        assert_eq!(until, days_from_civil(2026, 12, 1) * 86_400);
        // Leap February and the year boundary.
        assert_eq!(
            month_of(days_from_civil(2028, 2, 29) * 86_400).0,
            "2028-02-01"
        );
        assert_eq!(
            month_of(days_from_civil(2026, 12, 31) * 86_400 + 86_399),
            (
                "2026-12-01".to_owned(),
                days_from_civil(2027, 1, 1) * 86_400
            )
        );
        for days in -800_000..800_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn ids_handed_back_are_known_once_counted() {
        let ids = IdMaker::py_new("abc".to_owned());
        let a = ids.next();
        let b = ids.next();
        assert_eq!(a, "abc-1");
        assert!(!ids.counted(&a));
        ids.mark(&a);
        assert!(ids.counted(&a) && !ids.counted(&b));
        assert!(!ids.counted("abd-1") && !ids.counted("abc-") && !ids.counted("abc-zz"));
        // Not made yet.
        assert!(!ids.counted("abc-99"));
        // After 2^20 more ids, the slot is reused and starts clear.
        for _ in 0..ENDED_BITS {
            ids.next();
        }
        assert!(!ids.counted(&a));
    }

    #[test]
    fn the_window_keeps_the_last_minute() {
        let mut w = Window::new();
        for _ in 0..100 {
            w.record(1000);
        }
        w.record(1030);
        assert_eq!(w.last_minute(1000.0), 100);
        assert_eq!(w.last_minute(1060.0), 101);
        assert_eq!(w.last_minute(1061.0), 1);
        assert_eq!(w.last_minute(1091.0), 0);
        // A slot reused 64 seconds later starts again.
        w.record(1064);
        assert_eq!(w.last_minute(1064.0), 2);
    }
}
