//! The ledger: per-key usage counters that handlers add to in O(1), drained in batches.
//!
//! Keys are opaque strings chosen by the Python side (for the store: one key per user and
//! cycle). The map is split into shards, each behind its own mutex, so adders on different
//! threads rarely meet; a drain swaps every shard's map out and hands the deltas over as one
//! `Batch`. A batch that could not be written is merged back, so no delta is lost or applied
//! twice. Memory follows the number of active keys, not the number of events.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use crate::journal::{self, Journal};
use crate::usage::usd_to_pusd;

use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

/// The counters kept per key, in this order.
pub const FIELDS: [&str; 10] = [
    "total_tokens",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_pusd",
    "calls",
    "errors",
    "timeouts",
];
pub const NFIELDS: usize = FIELDS.len();

pub type Counters = [i64; NFIELDS];

/// Token counts are in `[0, MAX_COUNT)`.
const MAX_COUNT: i64 = 1_000_000_000_000;

/// What a normalized response dict (`make_response`'s) says of one call.
pub enum ResponseCounts {
    /// The call's counters (`calls` = 1); `priced`: the response states a cost
    /// (`cost_estimate`); `completion`: it states `completion_tokens`.
    Counted {
        counts: Counters,
        priced: bool,
        completion: bool,
    },
    /// `usage_error`: the usage was skipped as bad input; only the call counts.
    UsageError,
    /// No `tokens_used`: nothing to count (the caller estimates).
    NoUsage,
    /// A count or a cost of the wrong type or out of range.
    Invalid,
}

/// The one reader from a response dict to a call's counters: `tokens_used` and the token
/// kinds (missing or `None`: 0; `tokens_used` itself must be a count), the cost from
/// `cost_pusd`, else `cost_estimate` in USD (neither: 0).
pub fn response_counts(response: &Bound<'_, PyDict>) -> PyResult<ResponseCounts> {
    let py = response.py();
    if response.contains(intern!(py, "usage_error"))? {
        return Ok(ResponseCounts::UsageError);
    }
    let Some(total) = response.get_item(intern!(py, "tokens_used"))? else {
        return Ok(ResponseCounts::NoUsage);
    };
    let count = |v: Option<Bound<'_, PyAny>>| -> Option<i64> {
        match v {
            None => Some(0),
            Some(v) if v.is_none() => Some(0),
            Some(v) => v
                .extract::<i64>()
                .ok()
                .filter(|n| (0..MAX_COUNT).contains(n)),
        }
    };
    let mut counts = [0i64; NFIELDS];
    match (!total.is_none()).then(|| count(Some(total))).flatten() {
        Some(n) => counts[0] = n,
        None => return Ok(ResponseCounts::Invalid),
    }
    for (i, name) in [
        intern!(py, "prompt_tokens"),
        intern!(py, "completion_tokens"),
        intern!(py, "cached_tokens"),
        intern!(py, "cache_write_tokens"),
        intern!(py, "reasoning_tokens"),
    ]
    .into_iter()
    .enumerate()
    {
        match count(response.get_item(name)?) {
            Some(n) => counts[i + 1] = n,
            None => return Ok(ResponseCounts::Invalid),
        }
    }
    let estimate = response.get_item(intern!(py, "cost_estimate"))?;
    let priced = estimate.as_ref().is_some_and(|v| !v.is_none());
    let cost = match response.get_item(intern!(py, "cost_pusd"))? {
        Some(v) if !v.is_none() => v.extract::<i64>().ok().filter(|n| *n >= 0),
        _ if priced => estimate
            .and_then(|v| v.extract::<f64>().ok())
            .and_then(usd_to_pusd),
        _ => Some(0),
    };
    let Some(cost) = cost else {
        return Ok(ResponseCounts::Invalid);
    };
    counts[6] = cost;
    counts[7] = 1;
    Ok(ResponseCounts::Counted {
        counts,
        priced,
        completion: response.contains(intern!(py, "completion_tokens"))?,
    })
}

const SHARDS: usize = 16;

/// Entries above which a drain or a serialization releases the GIL while it works.
const DETACH_ABOVE: usize = 4096;

/// Monotonic nanoseconds since the first use in this process, plus one (0 means "none").
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// Seconds from `since` (a `now_ns()` reading, 0 for none) to now.
fn age_s(since: u64) -> Option<f64> {
    (since != 0).then(|| now_ns().saturating_sub(since) as f64 / 1e9)
}

/// One drained batch: its entries sorted by key (so any split of it is the same on a retry),
/// the sequence number the ledger gave it, and when its oldest delta arrived.
pub struct Drained {
    pub entries: Vec<(Box<str>, Counters)>,
    pub seq: u64,
    pub oldest_ns: u64,
    /// The spool file of these deltas, when the ledger journals, and whether it holds all of
    /// them (a write to it may have failed).
    pub journal: Option<(std::path::PathBuf, bool)>,
}

/// Adding `delta` to `into` without wrapping; on overflow nothing is changed.
fn checked_add(into: &mut Counters, delta: &Counters) -> Result<(), usize> {
    let mut out = *into;
    for i in 0..NFIELDS {
        out[i] = into[i].checked_add(delta[i]).ok_or(i)?;
    }
    *into = out;
    Ok(())
}

/// Keys are user ids, so the hash is seeded per process (no precomputed collisions), and fast:
/// foldhash, the quality-checked hasher behind hashbrown's default.
type KeyHasher = foldhash::fast::RandomState;
type Shard = HashMap<Box<str>, Counters, KeyHasher>;

/// The pure-Rust ledger (tested without Python).
pub struct Core {
    shards: Vec<Mutex<Shard>>,
    hasher: KeyHasher,
    pending: AtomicU64,
    overflows: AtomicU64,
    /// `now_ns()` when a key first went pending since the last drain (0: none pending).
    oldest: AtomicU64,
    /// Sequence numbers of the non-empty drains so far.
    drains: AtomicU64,
    /// When set, every accepted delta is appended to it first (adds and drains then hold its
    /// lock, so a batch and its journal file hold exactly the same deltas).
    journal: OnceLock<Mutex<Journal>>,
}

impl Default for Core {
    fn default() -> Self {
        Self::new()
    }
}

impl Core {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(KeyHasher::default())))
                .collect(),
            hasher: KeyHasher::default(),
            pending: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
            oldest: AtomicU64::new(0),
            drains: AtomicU64::new(0),
            journal: OnceLock::new(),
        }
    }

    fn journal_lock(&self) -> Option<MutexGuard<'_, Journal>> {
        self.journal
            .get()
            .map(|j| j.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Journal every delta from now on into `dir` (only on a ledger that never held one).
    pub fn start_journal(
        &self,
        dir: &std::path::Path,
        flusher_id: &str,
        tag: u64,
    ) -> Result<(), String> {
        if self.pending() != 0 || self.drains.load(Ordering::Relaxed) != 0 {
            return Err("a ledger journals from its first delta".into());
        }
        let journal = Journal::new(dir, flusher_id, tag, 1).map_err(|e| e.to_string())?;
        self.journal
            .set(Mutex::new(journal))
            .map_err(|_| "this ledger journals already".to_string())
    }

    /// Whether a journal write of the current generation failed.
    pub fn journal_incomplete(&self) -> bool {
        self.journal_lock().is_some_and(|j| j.incomplete())
    }

    /// Close the journal's open file (see `Journal::close_file`).
    pub fn close_journal(&self) {
        if let Some(mut j) = self.journal_lock() {
            j.close_file();
        }
    }

    /// Journal writes that failed, and the last error.
    pub fn journal_errors(&self) -> (u64, Option<String>) {
        self.journal_lock()
            .map(|j| (j.errors, j.last_error.clone()))
            .unwrap_or((0, None))
    }

    fn mark_pending(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        if self.oldest.load(Ordering::Relaxed) == 0 {
            let _ = self
                .oldest
                .compare_exchange(0, now_ns(), Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        // A panic while holding the lock cannot leave counters half-written (checked_add
        // writes all or nothing), so a poisoned lock is safe to keep using.
        self.shards[i]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Add `delta` to `key`. Refused (and counted) when a counter would overflow. With a
    /// journal, the delta is on file before it is in the map.
    pub fn add(&self, key: &str, delta: &Counters) -> Result<(), usize> {
        let mut journal = self.journal_lock();
        let mut shard = self.shard(key);
        if let Some(c) = shard.get_mut(key) {
            let mut sum = *c;
            checked_add(&mut sum, delta).inspect_err(|_| {
                self.overflows.fetch_add(1, Ordering::Relaxed);
            })?;
            if let Some(j) = journal.as_mut() {
                j.append(key, delta);
            }
            *c = sum;
            return Ok(());
        }
        if let Some(j) = journal.as_mut() {
            j.append(key, delta);
        }
        shard.insert(key.into(), *delta);
        self.mark_pending();
        Ok(())
    }

    /// True when `key` has counters.
    pub fn contains(&self, key: &str) -> bool {
        self.shard(key).contains_key(key)
    }

    /// The unflushed counters of `key` (zeros when none).
    pub fn get(&self, key: &str) -> Counters {
        self.shard(key).get(key).copied().unwrap_or([0; NFIELDS])
    }

    /// Swap everything out as one batch, sorted by key, numbered when it is not empty.
    pub fn drain(&self) -> Drained {
        let mut journal = self.journal_lock();
        let oldest_ns = self.oldest.swap(0, Ordering::Relaxed);
        let mut entries = Vec::with_capacity(self.pending.load(Ordering::Relaxed) as usize);
        for shard in &self.shards {
            let taken = {
                let mut guard = shard.lock().unwrap_or_else(|p| p.into_inner());
                let cap = guard.len();
                std::mem::replace(
                    &mut *guard,
                    HashMap::with_capacity_and_hasher(cap / 2, KeyHasher::default()),
                )
            };
            self.pending
                .fetch_sub(taken.len() as u64, Ordering::Relaxed);
            entries.extend(taken);
        }
        if self.pending.load(Ordering::Relaxed) != 0 {
            // Keys added to shards already swapped while this drain ran.
            let _ = self
                .oldest
                .compare_exchange(0, now_ns(), Ordering::Relaxed, Ordering::Relaxed);
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let seq = if entries.is_empty() {
            0
        } else {
            self.drains.fetch_add(1, Ordering::Relaxed) + 1
        };
        let journal = match journal.as_mut() {
            Some(j) if seq != 0 => Some(j.rotate()),
            _ => None,
        };
        Drained {
            entries,
            seq,
            oldest_ns: if seq == 0 { 0 } else { oldest_ns.max(1) },
            journal,
        }
    }

    /// Seconds since the oldest pending delta arrived (None when nothing is pending).
    pub fn oldest_pending_s(&self) -> Option<f64> {
        age_s(self.oldest.load(Ordering::Relaxed))
    }

    /// Keys with unflushed deltas.
    pub fn keys(&self) -> Vec<Box<str>> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let guard = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(guard.keys().cloned());
        }
        out
    }

    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }
}

/// Usage counters per key, added in O(1) from any thread and drained in batches.
#[pyclass(frozen, module = "llmtally._core", name = "Ledger")]
pub struct Ledger {
    core: Core,
}

impl Ledger {
    pub(crate) fn core(&self) -> &Core {
        &self.core
    }
}

fn counters_from(values: &[i64]) -> PyResult<Counters> {
    if values.len() != NFIELDS {
        return Err(PyValueError::new_err(format!(
            "expected {NFIELDS} counters ({}), got {}",
            FIELDS.join(", "),
            values.len()
        )));
    }
    let mut c = [0i64; NFIELDS];
    c.copy_from_slice(values);
    Ok(c)
}

impl Ledger {
    fn add_checked(&self, key: &str, delta: &Counters) -> PyResult<()> {
        self.core.add(key, delta).map_err(|i| {
            PyOverflowError::new_err(format!(
                "{} of {key:?} would overflow a 64-bit counter; the delta was refused",
                FIELDS[i]
            ))
        })
    }
}

#[pymethods]
impl Ledger {
    #[new]
    fn py_new() -> Self {
        Self { core: Core::new() }
    }

    /// Add one call's usage to `key`. All counts are non-negative except on undo paths.
    #[pyo3(signature = (
        key, total_tokens=0, prompt_tokens=0, completion_tokens=0, cached_tokens=0,
        cache_write_tokens=0, reasoning_tokens=0, cost_pusd=0, calls=0, errors=0, timeouts=0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn add(
        &self,
        key: &str,
        total_tokens: i64,
        prompt_tokens: i64,
        completion_tokens: i64,
        cached_tokens: i64,
        cache_write_tokens: i64,
        reasoning_tokens: i64,
        cost_pusd: i64,
        calls: i64,
        errors: i64,
        timeouts: i64,
    ) -> PyResult<()> {
        let delta = [
            total_tokens,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            cache_write_tokens,
            reasoning_tokens,
            cost_pusd,
            calls,
            errors,
            timeouts,
        ];
        self.core.add(key, &delta).map_err(|i| {
            PyOverflowError::new_err(format!(
                "{} of {key:?} would overflow a 64-bit counter; the delta was refused",
                FIELDS[i]
            ))
        })
    }

    /// Add one call's normalized response dict (`tokens_used`, `prompt_tokens`, ...,
    /// `cost_pusd`, else `cost_estimate` in USD) to `key` as one call, in one crossing. Returns 0 when recorded,
    /// 1 when the response carries `usage_error` (only the call is counted), 2 when it holds no
    /// usage at all (nothing is recorded; the caller estimates).
    fn add_response(&self, key: &str, response: &Bound<'_, PyDict>) -> PyResult<u8> {
        match response_counts(response)? {
            ResponseCounts::Counted { counts, .. } => {
                self.add_checked(key, &counts)?;
                Ok(0)
            }
            ResponseCounts::UsageError => {
                let mut delta = [0i64; NFIELDS];
                delta[7] = 1;
                self.add_checked(key, &delta)?;
                Ok(1)
            }
            ResponseCounts::NoUsage => Ok(2),
            ResponseCounts::Invalid => Err(PyValueError::new_err(
                "a token count or cost of the response is not a count in range",
            )),
        }
    }

    /// Add a sequence of counters (in `LEDGER_FIELDS` order) to `key`.
    fn add_counters(&self, key: &str, counters: Vec<i64>) -> PyResult<()> {
        let delta = counters_from(&counters)?;
        self.core.add(key, &delta).map_err(|i| {
            PyOverflowError::new_err(format!(
                "{} of {key:?} would overflow a 64-bit counter; the delta was refused",
                FIELDS[i]
            ))
        })
    }

    /// The unflushed counters of `key`, as a tuple in `LEDGER_FIELDS` order.
    fn get<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.core.get(key))
    }

    /// Keys with unflushed deltas (a copy; nothing is drained).
    fn keys(&self) -> Vec<String> {
        self.core.keys().into_iter().map(String::from).collect()
    }

    /// Swap out everything accumulated as one `Batch`, sorted by key and numbered (`seq`
    /// 1, 2, ... for the non-empty ones).
    fn drain(&self, py: Python<'_>) -> Batch {
        // Handing the GIL back costs a busy process's flusher a switch interval (5 ms) to get
        // it again: worth it only for large batches.
        if self.core.pending() as usize > DETACH_ABOVE {
            Batch::from(py.detach(|| self.core.drain()))
        } else {
            Batch::from(self.core.drain())
        }
    }

    /// Seconds since the oldest pending delta arrived (`None` when nothing is pending).
    #[getter]
    fn oldest_pending_s(&self) -> Option<f64> {
        self.core.oldest_pending_s()
    }

    /// Journal every delta into `directory` from now on (the spool), each drained batch's in
    /// a file of its own named after `flusher_id` and its sequence; `tag` names the store.
    fn journal(&self, directory: std::path::PathBuf, flusher_id: &str, tag: u64) -> PyResult<()> {
        self.core
            .start_journal(&directory, flusher_id, tag)
            .map_err(PyValueError::new_err)
    }

    /// Close the journal's open file; the next delta opens it again (creating it when the
    /// store removed it, empty, at close).
    fn close_journal(&self) {
        self.core.close_journal()
    }

    /// Whether a journal write of the deltas now pending failed (their spool file lacks some).
    #[getter]
    fn journal_incomplete(&self) -> bool {
        self.core.journal_incomplete()
    }

    /// Journal writes that failed (those deltas are in memory only) and the last error.
    #[getter]
    fn journal_errors(&self) -> (u64, Option<String>) {
        self.core.journal_errors()
    }

    /// Number of keys with unflushed deltas.
    #[getter]
    fn pending(&self) -> u64 {
        self.core.pending()
    }

    /// Deltas refused because a counter would have overflowed.
    #[getter]
    fn overflows(&self) -> u64 {
        self.core.overflows.load(Ordering::Relaxed)
    }

    fn __contains__(&self, key: &str) -> bool {
        self.core.contains(key)
    }

    fn __len__(&self) -> usize {
        self.core.pending() as usize
    }
}

/// Deltas drained from a ledger, sorted by key: written to a store as one batch.
#[pyclass(frozen, module = "llmtally._core", name = "Batch")]
pub struct Batch {
    entries: Vec<(Box<str>, Counters)>,
    seq: u64,
    oldest_ns: u64,
    journal: Option<(std::path::PathBuf, bool)>,
}

impl From<Drained> for Batch {
    fn from(d: Drained) -> Self {
        Self {
            entries: d.entries,
            seq: d.seq,
            oldest_ns: d.oldest_ns,
            journal: d.journal,
        }
    }
}

/// A batch split into the units a Redis backend writes: `(slot, indices)` per chunk, in order.
/// Without `cluster` every key is in slot 0; each slot's keys are cut into chunks of at most
/// `max_keys`. Entries are sorted, so the split of a batch is the same every time.
fn split(
    entries: &[(Box<str>, Counters)],
    max_keys: usize,
    cluster: bool,
) -> Vec<(usize, Vec<usize>)> {
    let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, (key, _)) in entries.iter().enumerate() {
        let slot = if cluster {
            crate::slots::key_slot(key)
        } else {
            0
        };
        groups.entry(slot).or_default().push(i);
    }
    let mut out = Vec::new();
    for (slot, indices) in groups {
        for chunk in indices.chunks(max_keys) {
            out.push((slot, chunk.to_vec()));
        }
    }
    out
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[pymethods]
impl Batch {
    /// The ledger's number for this batch (1, 2, ...; 0 for an empty batch).
    #[getter]
    fn seq(&self) -> u64 {
        self.seq
    }

    /// Seconds since the oldest delta of this batch arrived (`None` when empty).
    #[getter]
    fn oldest_s_ago(&self) -> Option<f64> {
        age_s(self.oldest_ns)
    }

    /// The spool file of this batch's deltas (`None` without a spool).
    #[getter]
    fn journal_path(&self) -> Option<std::path::PathBuf> {
        self.journal.as_ref().map(|(p, _)| p.clone())
    }

    /// Whether the spool file holds every delta of this batch (no write to it failed).
    #[getter]
    fn journal_complete(&self) -> bool {
        self.journal.as_ref().is_some_and(|(_, complete)| *complete)
    }

    /// The batch is in the store: remove its spool file (a no-op without one).
    fn discard_journal(&self) -> PyResult<()> {
        match &self.journal {
            Some((path, _)) => match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// A batch read back from a spool file: `(batch, tag, records, torn)`, where `tag` is the
    /// store's tag the file was written for, `records` the deltas read and `torn` whether a
    /// cut-short tail was left out. The batch keeps the file's sequence number.
    #[staticmethod]
    fn from_journal(py: Python<'_>, path: std::path::PathBuf) -> PyResult<(Batch, u64, u64, bool)> {
        let r = py.detach(|| journal::read(&path))?;
        let oldest_ns = if r.entries.is_empty() { 0 } else { now_ns() };
        Ok((
            Batch {
                entries: r.entries,
                seq: r.seq,
                oldest_ns,
                journal: Some((path, true)),
            },
            r.tag,
            r.records,
            r.torn,
        ))
    }

    /// The entries as a list of `(key, counters_tuple)`, sorted by key.
    fn items<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let mut out = Vec::with_capacity(self.entries.len());
        for (key, counters) in self.entries.iter() {
            out.push(PyTuple::new(
                py,
                [
                    PyString::new(py, key).into_any(),
                    PyTuple::new(py, counters)?.into_any(),
                ],
            )?);
        }
        PyList::new(py, out)
    }

    /// The batch as Lua calls, one per unit that can fail alone: `(slot_tag, unit, keys,
    /// args)` per chunk of at most `max_keys` keys, where `unit` numbers the chunks from 0,
    /// `slot_tag` is a short string hashing to the chunk's cluster slot (`None` without
    /// `cluster`), and `args` holds, per key, the number of non-zero fields then `field, value`
    /// pairs. The split is the same on every call for the same batch.
    #[pyo3(signature = (max_keys = 512, cluster = false))]
    fn lua_chunks<'py>(
        &self,
        py: Python<'py>,
        max_keys: usize,
        cluster: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        if max_keys == 0 {
            return Err(PyValueError::new_err("max_keys must be at least 1"));
        }
        let names: Vec<Bound<'py, PyString>> =
            FIELDS.iter().map(|f| PyString::intern(py, f)).collect();
        let out = PyList::empty(py);
        for (unit, (slot, chunk)) in split(&self.entries, max_keys, cluster)
            .into_iter()
            .enumerate()
        {
            let tag = cluster.then(|| crate::slots::slot_tags()[slot].as_str());
            let mut keys: Vec<Bound<'py, PyAny>> = Vec::with_capacity(chunk.len());
            let mut args: Vec<Bound<'py, PyAny>> = Vec::with_capacity(chunk.len() * 8);
            for i in chunk {
                let (key, counters) = &self.entries[i];
                keys.push(PyString::new(py, key).into_any());
                let nonzero = counters.iter().filter(|v| **v != 0).count();
                args.push(nonzero.into_pyobject(py)?.into_any());
                for (name, value) in names.iter().zip(counters.iter()) {
                    if *value != 0 {
                        args.push(name.clone().into_any());
                        args.push(value.into_pyobject(py)?.into_any());
                    }
                }
            }
            out.append((tag, unit, PyList::new(py, keys)?, PyList::new(py, args)?))?;
        }
        Ok(out)
    }

    /// The unit (`lua_chunks` chunk number) holding `key`, or `None` when it is not in the
    /// batch.
    #[pyo3(signature = (key, max_keys = 512, cluster = false))]
    fn unit_of(&self, key: &str, max_keys: usize, cluster: bool) -> PyResult<Option<usize>> {
        if max_keys == 0 {
            return Err(PyValueError::new_err("max_keys must be at least 1"));
        }
        let Ok(index) = self.entries.binary_search_by(|(k, _)| (**k).cmp(key)) else {
            return Ok(None);
        };
        Ok(split(&self.entries, max_keys, cluster)
            .iter()
            .position(|(_, chunk)| chunk.contains(&index)))
    }

    /// The batch as a JSON array of `[key, field, delta]` rows (non-zero fields only), for a
    /// SQL backend to apply in one statement.
    fn sql_rows(&self, py: Python<'_>) -> String {
        let build = || {
            let mut out = String::with_capacity(self.entries.len() * 96 + 2);
            out.push('[');
            let mut first = true;
            for (key, counters) in &self.entries {
                for (name, value) in FIELDS.iter().zip(counters.iter()) {
                    if *value == 0 {
                        continue;
                    }
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    out.push('[');
                    json_string(&mut out, key);
                    out.push_str(",\"");
                    out.push_str(name);
                    out.push_str("\",");
                    out.push_str(&value.to_string());
                    out.push(']');
                }
            }
            out.push(']');
            out
        };
        if self.entries.len() > DETACH_ABOVE {
            py.detach(build)
        } else {
            build()
        }
    }

    /// The counters of `key` in this batch (zeros when absent).
    fn get<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyTuple>> {
        let found = self
            .entries
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .map(|i| self.entries[i].1)
            .unwrap_or([0; NFIELDS]);
        PyTuple::new(py, found)
    }

    /// Sum of every entry's counters (for checks and metrics).
    fn totals<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let mut sum = [0i128; NFIELDS];
        for (_, c) in self.entries.iter() {
            for i in 0..NFIELDS {
                sum[i] += c[i] as i128;
            }
        }
        PyTuple::new(py, sum)
    }

    fn __len__(&self) -> usize {
        self.entries.len()
    }

    fn __repr__(&self) -> String {
        format!("Batch(seq={}, entries={})", self.seq, self.entries.len())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Ledger>()?;
    m.add_class::<Batch>()?;
    m.add("LEDGER_FIELDS", PyTuple::new(m.py(), FIELDS)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(v: i64) -> Counters {
        [v; NFIELDS]
    }

    #[test]
    fn drain_takes_everything_once() {
        let l = Core::new();
        l.add("a", &delta(1)).unwrap();
        l.add("a", &delta(2)).unwrap();
        l.add("b", &delta(5)).unwrap();
        assert_eq!(l.pending(), 2);
        let batch = l.drain();
        assert_eq!(
            batch.entries,
            vec![("a".into(), delta(3)), ("b".into(), delta(5))]
        );
        assert_eq!((batch.seq, l.pending()), (1, 0));
        assert!(batch.oldest_ns > 0);
        let empty = l.drain();
        assert!(empty.entries.is_empty() && empty.seq == 0 && empty.oldest_ns == 0);
        l.add("c", &delta(1)).unwrap();
        assert_eq!(l.drain().seq, 2);
    }

    #[test]
    fn overflow_is_refused_without_a_partial_write() {
        let l = Core::new();
        let mut big = [0; NFIELDS];
        big[6] = i64::MAX;
        l.add("a", &big).unwrap();
        let mut one = [1; NFIELDS];
        one[6] = 1;
        assert_eq!(l.add("a", &one), Err(6));
        assert_eq!(l.get("a"), big);
        assert_eq!(l.overflows.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn threads_never_lose_a_delta() {
        let l = std::sync::Arc::new(Core::new());
        let drained = std::sync::Arc::new(Mutex::new(Vec::new()));
        std::thread::scope(|s| {
            for t in 0..4 {
                let l = l.clone();
                s.spawn(move || {
                    for i in 0..10_000 {
                        l.add(&format!("k{}", (i + t) % 97), &delta(1)).unwrap();
                    }
                });
            }
            let l2 = l.clone();
            let d2 = drained.clone();
            s.spawn(move || {
                for _ in 0..100 {
                    let b = l2.drain();
                    d2.lock().unwrap().extend(b.entries);
                }
            });
        });
        let mut total = 0i64;
        for (_, c) in drained.lock().unwrap().iter() {
            total += c[0];
        }
        for (_, c) in l.drain().entries {
            total += c[0];
        }
        assert_eq!(total, 40_000);
    }
}
