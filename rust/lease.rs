//! Quota leases (`llmtally.limits.BudgetLimiter`): one budget's state in this process, and the
//! admission of a call against it with no I/O.
//!
//! The policy (renewals, slices, outages, alerts) is Python; this file holds the state those
//! steps share and the one step every call takes: admit a call whose estimate fits in what the
//! lease holds. Every change to a lease happens under the limiter's lock (a Python
//! `threading.Lock`, taken here too), so a call admitted here and a renewal or a flush on
//! another thread see each other whole.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyInt, PyList, PySet, PyString, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::recorder::CLOCK;
use crate::usage::Usage;

/// Estimates at or above this are not admitted here (the Python path reads them).
const MAX_ESTIMATE: i64 = 1_000_000_000_000;

/// This process's part of one budget (one key): what the store holds for it, what its calls in
/// flight reserved, and the last state of the store it saw. Token amounts in tokens, cost
/// amounts in pusd (1e-12 USD).
#[pyclass(module = "llmtally._core", name = "Lease")]
pub struct Lease {
    /// The budget's store key.
    #[pyo3(get)]
    key: Py<PyString>,
    /// The budget's id (the user, or the scope's value).
    #[pyo3(get)]
    scope_id: Py<PyString>,
    /// `YYYY-MM-01` of the budget's cycle.
    #[pyo3(get)]
    cycle: Py<PyString>,
    /// The store's record of this lease, as last set.
    #[pyo3(get, set)]
    recorded_t: i64,
    #[pyo3(get, set)]
    recorded_p: i64,
    /// What is left of it (less the usage flushed since)...
    #[pyo3(get, set)]
    held_t: i64,
    #[pyo3(get, set)]
    held_p: i64,
    /// ... covers these estimates (calls in flight) ...
    #[pyo3(get, set)]
    inflight_t: i64,
    #[pyo3(get, set)]
    inflight_p: i64,
    /// ... and the usage of the calls that ended, not written yet: since the last drain of the
    /// store's ledger, and in the batch drained last (until it is written).
    #[pyo3(get, set)]
    settled_t: i64,
    #[pyo3(get, set)]
    settled_p: i64,
    #[pyo3(get, set)]
    draining_t: i64,
    #[pyo3(get, set)]
    draining_p: i64,
    /// Stored usage at the last operation.
    #[pyo3(get, set)]
    used_t: i64,
    #[pyo3(get, set)]
    used_p: i64,
    /// Other processes' leases then.
    #[pyo3(get, set)]
    others_t: i64,
    #[pyo3(get, set)]
    others_p: i64,
    /// This process's usage written since.
    #[pyo3(get, set)]
    flushed_t: i64,
    #[pyo3(get, set)]
    flushed_p: i64,
    /// `time.monotonic()`: past it, the next call renews.
    #[pyo3(get, set)]
    renew_at: f64,
    /// Whether an operation ever succeeded.
    #[pyo3(get, set)]
    known: bool,
    /// `time.monotonic()` of the last call admitted.
    #[pyo3(get, set)]
    last_used: f64,
    /// The token limit applied (-1: none).
    #[pyo3(get, set)]
    limit_t: i64,
    /// An idle lease being given back: no call admitted against it.
    #[pyo3(get, set)]
    shrinking: bool,
    /// The renewal under way (a future), if any.
    #[pyo3(get, set)]
    renewing: Option<Py<PyAny>>,
    /// The last renewal, when the store refused it, and the call it was for.
    #[pyo3(get, set)]
    refused: Option<Py<PyAny>>,
}

#[pymethods]
impl Lease {
    #[new]
    fn new(key: Py<PyString>, scope_id: Py<PyString>, cycle: Py<PyString>) -> Self {
        Lease {
            key,
            scope_id,
            cycle,
            recorded_t: 0,
            recorded_p: 0,
            held_t: 0,
            held_p: 0,
            inflight_t: 0,
            inflight_p: 0,
            settled_t: 0,
            settled_p: 0,
            draining_t: 0,
            draining_p: 0,
            used_t: 0,
            used_p: 0,
            others_t: 0,
            others_p: 0,
            flushed_t: 0,
            flushed_p: 0,
            renew_at: 0.0,
            known: false,
            last_used: 0.0,
            limit_t: -1,
            shrinking: false,
            renewing: None,
            refused: None,
        }
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.renewing)?;
        visit.call(&self.refused)?;
        Ok(())
    }

    fn __clear__(&mut self) {
        self.renewing = None;
        self.refused = None;
    }

    /// A call ended (the limiter's lock held): its estimate goes, its usage (in the store's
    /// ledger already) stays covered until it is written. True when it had usage.
    fn settle(&mut self, estimate_t: i64, estimate_p: i64, tokens: i64, pusd: i64) -> bool {
        self.inflight_t = (self.inflight_t - estimate_t).max(0);
        self.inflight_p = (self.inflight_p - estimate_p).max(0);
        if tokens == 0 && pusd == 0 {
            return false;
        }
        self.settled_t = self.settled_t.saturating_add(tokens);
        self.settled_p = self.settled_p.saturating_add(pusd);
        true
    }
}

/// What a [`LeaseBook`] calls on its limiter.
struct Hooks {
    /// The limiter: a call is settled here only while its `on_alert` is `None`.
    owner: Py<PyAny>,
    /// `BudgetLimiter._fast_start`: a start not admitted here.
    start_fallback: Py<PyAny>,
    /// `BudgetLimiter._settle_call`: an end not settled here.
    settle_fallback: Py<PyAny>,
    /// `BudgetLimiter._catch_up_now`: too many calls ended and not settled.
    catch_up_now: Py<PyAny>,
}

/// A call ended and not settled yet: its lease, estimate (tokens, pusd) and usage (tokens, pusd).
type Ended = (Py<Lease>, i64, i64, i64, i64);

/// The budgets of one token-only user-scoped limiter, by user, and the two steps every call
/// takes: [`LeaseBook::start`] and [`LeaseBook::settle`].
#[pyclass(module = "llmtally._core", name = "LeaseBook")]
pub struct LeaseBook {
    /// (user id, `cycle_start_date` as given or `None`) -> the lease (the limiter keeps it).
    keys: Py<PyDict>,
    /// run id -> (lease, estimate tokens, estimate pusd): the calls admitted and not ended.
    opened: Py<PyDict>,
    /// run id -> more calls admitted under the same id (the Python path handles them).
    opened_more: Py<PyDict>,
    /// meters tuple -> whether they count every call of this limiter's store.
    counted: Py<PyDict>,
    /// The limiter's lock: its `acquire` and `release`.
    acquire: Py<PyAny>,
    release: Py<PyAny>,
    /// The limiter's side (cleared by the garbage collector: the limiter holds this book).
    hooks: Option<Hooks>,
    /// The limiter's leases with usage settled since the ledger was last drained.
    settled: Py<PySet>,
    /// `_core.estimate_messages`, and the model name prefixes counted with o200k
    /// (`llmtally.tokens`).
    estimate_messages: Py<PyAny>,
    o200k_prefixes: Vec<String>,
    max_open: usize,
    max_ended: usize,
    /// `time.monotonic()` at `origin`: the monotonic clock read here as Python reads it.
    base: f64,
    origin: Instant,
    admitted: AtomicU64,
    ended: Mutex<Vec<Ended>>,
}

#[pymethods]
impl LeaseBook {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        keys: Py<PyDict>,
        opened: Py<PyDict>,
        opened_more: Py<PyDict>,
        counted: Py<PyDict>,
        lock: &Bound<'_, PyAny>,
        owner: Py<PyAny>,
        settled: Py<PySet>,
        start_fallback: Py<PyAny>,
        settle_fallback: Py<PyAny>,
        catch_up_now: Py<PyAny>,
        estimate_messages: Py<PyAny>,
        o200k_prefixes: Vec<String>,
        max_open: usize,
        max_ended: usize,
        monotonic_now: f64,
    ) -> PyResult<Self> {
        let acquire = lock.getattr(intern!(lock.py(), "acquire"))?.unbind();
        let release = lock.getattr(intern!(lock.py(), "release"))?.unbind();
        Ok(LeaseBook {
            keys,
            estimate_messages,
            o200k_prefixes,
            opened,
            opened_more,
            counted,
            acquire,
            release,
            hooks: Some(Hooks {
                owner,
                start_fallback,
                settle_fallback,
                catch_up_now,
            }),
            settled,
            max_open,
            max_ended,
            base: monotonic_now,
            origin: Instant::now(),
            admitted: AtomicU64::new(0),
            ended: Mutex::new(Vec::new()),
        })
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.keys)?;
        visit.call(&self.opened)?;
        visit.call(&self.opened_more)?;
        visit.call(&self.counted)?;
        visit.call(&self.acquire)?;
        visit.call(&self.release)?;
        visit.call(&self.settled)?;
        visit.call(&self.estimate_messages)?;
        if let Some(hooks) = &self.hooks {
            visit.call(&hooks.owner)?;
            visit.call(&hooks.start_fallback)?;
            visit.call(&hooks.settle_fallback)?;
            visit.call(&hooks.catch_up_now)?;
        }
        if let Ok(ended) = self.ended.try_lock() {
            for entry in ended.iter() {
                visit.call(&entry.0)?;
            }
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.hooks = None;
        if let Ok(mut ended) = self.ended.try_lock() {
            ended.clear();
        }
    }

    /// Calls admitted here.
    #[getter]
    fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    /// Calls ended and not settled yet.
    fn __len__(&self) -> usize {
        self.ended_vec().len()
    }

    /// `on_llm_start` of a manager's call: admit it against its user's lease with no I/O and
    /// return `None`; else (no lease yet, no room, a renewal due, input the Python path reads)
    /// return what the start fallback returns for `(messages, kwargs)`.
    fn start(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        kwargs: &Bound<'_, PyDict>,
    ) -> PyResult<Py<PyAny>> {
        let Some(hooks) = &self.hooks else {
            return Ok(py.None()); // (a limiter being collected)
        };
        if self.try_admit(py, messages, kwargs)? {
            return Ok(py.None());
        }
        Ok(hooks
            .start_fallback
            .bind(py)
            .call1((messages, kwargs))?
            .unbind())
    }

    /// The call ended and every recorder counted it: its estimate goes and its usage stays
    /// covered, settled in a batch by `catch_up`. Calls the settle fallback for anything else
    /// (a duplicate, a call no recorder counted, several calls under one id).
    fn settle(
        &self,
        py: Python<'_>,
        call: &Bound<'_, PyAny>,
        meters: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let Some(hooks) = &self.hooks else {
            return Ok(());
        };
        if !self.try_settle(py, hooks, call, meters)? {
            hooks.settle_fallback.bind(py).call1((call, meters))?;
        }
        Ok(())
    }

    /// Settle the calls ended since the last time (the limiter's lock held); the leases that
    /// got usage are added to the limiter's set of leases with usage settled.
    fn catch_up(&self, py: Python<'_>) -> PyResult<()> {
        let settled = self.settled.bind(py);
        let mut ended = std::mem::take(&mut *self.ended_vec()).into_iter();
        while let Some(call) = ended.next() {
            let (lease, estimate_t, estimate_p, tokens, pusd) = &call;
            let had_usage = match lease.bind(py).try_borrow_mut() {
                Ok(mut l) => l.settle(*estimate_t, *estimate_p, *tokens, *pusd),
                Err(err) => {
                    // (a lease borrowed elsewhere): this call and the rest wait for the next
                    // catch-up, ahead of the calls that ended since.
                    let mut waiting = self.ended_vec();
                    let later = std::mem::take(&mut *waiting);
                    waiting.push(call);
                    waiting.extend(ended);
                    waiting.extend(later);
                    return Err(err.into());
                }
            };
            if had_usage {
                settled.add(lease)?;
            }
        }
        Ok(())
    }
}

impl LeaseBook {
    fn ended_vec(&self) -> std::sync::MutexGuard<'_, Vec<Ended>> {
        self.ended.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_settle(
        &self,
        py: Python<'_>,
        hooks: &Hooks,
        call: &Bound<'_, PyAny>,
        meters: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        if !self.opened_more.bind(py).is_empty()
            || !hooks
                .owner
                .bind(py)
                .getattr(intern!(py, "on_alert"))?
                .is_none()
        {
            return Ok(false);
        }
        let opened = self.opened.bind(py);
        let run = call.getattr(intern!(py, "run_id"))?;
        let Some(entry) = opened.get_item(&run)? else {
            return Ok(true); // not admitted here (not limited, or refused): nothing to settle
        };
        let Ok((lease, estimate_t, estimate_p)) = entry.extract::<(Py<Lease>, i64, i64)>() else {
            return Ok(false);
        };
        if call.getattr(intern!(py, "duplicate"))?.is_truthy()? {
            return Ok(false);
        }
        match self.counted.bind(py).get_item(meters)? {
            Some(known) if known.is_truthy()? => {}
            _ => return Ok(false),
        }
        // A token budget: the call's tokens (its cost is not held by this limiter).
        let usage = call.getattr(intern!(py, "_usage"))?;
        let tokens = if usage.is_none() {
            0
        } else {
            let Ok(usage) = usage.cast_into::<Usage>() else {
                return Ok(false);
            };
            i64::try_from(usage.get().total_tokens).unwrap_or(i64::MAX)
        };
        let pusd = 0;
        opened.del_item(&run)?;
        let full = {
            let mut ended = self.ended_vec();
            ended.push((lease, estimate_t, estimate_p, tokens, pusd));
            ended.len() >= self.max_ended
        };
        if full {
            hooks.catch_up_now.bind(py).call0()?;
        }
        Ok(true)
    }

    /// A count the caller gave (`estimated_tokens`, `max_tokens`), read as `limits._count`
    /// reads it: `Ok(Some(n))` for an int in [0, 10**12), `Ok(None)` for anything else (a
    /// bool, not an int, out of range), `Err(())` for an int subclass (the Python path reads
    /// it, whatever it overrides).
    fn count(value: Option<Bound<'_, PyAny>>) -> Result<Option<i64>, ()> {
        let Some(value) = value else {
            return Ok(None);
        };
        if value.is_exact_instance_of::<PyInt>() {
            return Ok(value
                .extract::<i64>()
                .ok()
                .filter(|n| (0..MAX_ESTIMATE).contains(n)));
        }
        if value.is_instance_of::<PyInt>() && !value.is_instance_of::<PyBool>() {
            return Err(());
        }
        Ok(None)
    }

    /// What `BudgetLimiter` reserves for a call: `estimated_tokens`, else the estimate of the
    /// messages (by the model's encoding) plus `max_tokens`. `None`: the Python path decides
    /// (messages that are not a list, or that the estimator refuses).
    fn estimate(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        kwargs: &Bound<'_, PyDict>,
    ) -> PyResult<Option<i64>> {
        let Ok(given) = Self::count(kwargs.get_item(intern!(py, "estimated_tokens"))?) else {
            return Ok(None);
        };
        if let Some(given) = given {
            return Ok(Some(given));
        }
        if !messages.is_exact_instance_of::<PyList>() {
            return Ok(None);
        }
        let mut o200k = false;
        if let Some(model) = kwargs.get_item(intern!(py, "model"))? {
            if let Ok(model) = model.cast::<PyString>() {
                let model = model.to_str()?;
                let name = model.rsplit('/').next().unwrap_or(model).to_lowercase();
                o200k = model != "unknown"
                    && self
                        .o200k_prefixes
                        .iter()
                        .any(|p| name.starts_with(p.as_str()));
            }
        }
        let encoding = if o200k { "o200k_base" } else { "cl100k_base" };
        let Ok(prompt) = self
            .estimate_messages
            .bind(py)
            .call1((messages, encoding))
            .and_then(|n| n.extract::<i64>())
        else {
            return Ok(None);
        };
        let Ok(completion) = Self::count(kwargs.get_item(intern!(py, "max_tokens"))?) else {
            return Ok(None);
        };
        let completion = completion.unwrap_or(0);
        Ok(Some(prompt.saturating_add(completion)))
    }

    fn try_admit(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        kwargs: &Bound<'_, PyDict>,
    ) -> PyResult<bool> {
        let Some(user) = kwargs.get_item(intern!(py, "user_id"))? else {
            return Ok(false);
        };
        if !user.is_exact_instance_of::<PyString>() {
            return Ok(false);
        }
        let cycle = kwargs
            .get_item(intern!(py, "cycle_start_date"))?
            .unwrap_or_else(|| py.None().into_bound(py));
        let cycle_given = !cycle.is_none();
        if cycle_given && !cycle.is_exact_instance_of::<PyString>() {
            return Ok(false);
        }
        let Some(lease) = self
            .keys
            .bind(py)
            .get_item(PyTuple::new(py, [&user, &cycle])?)?
        else {
            return Ok(false);
        };
        let Ok(lease) = lease.cast_into::<Lease>() else {
            return Ok(false);
        };
        let Some(tokens) = self.estimate(py, messages, kwargs)? else {
            return Ok(false);
        };
        if tokens <= 0 {
            return Ok(false);
        }
        let run = match kwargs.get_item(intern!(py, "run_id"))? {
            Some(r) if r.is_truthy()? => r,
            _ => match kwargs.get_item(intern!(py, "request_id"))? {
                Some(r) => r,
                None => py.None().into_bound(py),
            },
        };
        let opened = self.opened.bind(py);
        if opened.len() >= self.max_open || opened.contains(&run)? {
            return Ok(false);
        }
        let now = self.base + self.origin.elapsed().as_secs_f64();
        {
            let Ok(l) = lease.try_borrow() else {
                return Ok(false);
            };
            if l.renewing.is_some() || now >= l.renew_at {
                return Ok(false);
            }
            if !cycle_given
                && !CLOCK.with_current(|c| l.cycle.bind(py).to_str().is_ok_and(|s| s == c))
            {
                return Ok(false);
            }
        }
        if !self.acquire.bind(py).call1((false,))?.is_truthy()? {
            return Ok(false); // another thread changes a lease: the Python path waits for it
        }
        let admit = || -> Option<bool> {
            let Ok(mut l) = lease.try_borrow_mut() else {
                return None;
            };
            let fits = !l.shrinking
                && (l.limit_t < 0
                    || l.inflight_t
                        .saturating_add(l.settled_t)
                        .saturating_add(l.draining_t)
                        .saturating_add(tokens)
                        <= l.held_t);
            if fits {
                l.inflight_t += tokens;
                l.last_used = now;
            }
            Some(fits)
        };
        let mut fits = Ok(admit());
        if matches!(fits, Ok(Some(false))) && !self.ended_vec().is_empty() {
            // The calls that ended and are not settled yet may hold the room this one needs.
            fits = self.catch_up(py).map(|()| admit());
        }
        self.release.bind(py).call0()?;
        let fits = fits?.unwrap_or(false);
        if !fits {
            return Ok(false);
        }
        let entry = PyTuple::new(
            py,
            [
                lease.into_any(),
                tokens.into_pyobject(py)?.into_any(),
                0i64.into_pyobject(py)?.into_any(),
            ],
        )?;
        opened.set_item(run, entry)?;
        self.admitted.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Lease>()?;
    m.add_class::<LeaseBook>()?;
    Ok(())
}
