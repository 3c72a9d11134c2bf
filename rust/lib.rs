//! `llmtally._core`: the measured hot path of llmtally.
//!
//! Module glue only: each concept lives in its own file and is exposed here under its Python
//! name. Policy (argument normalization, fallbacks) stays in Python.

use pyo3::prelude::*;

pub mod cost;
pub mod estimate;
pub mod histogram;
pub mod journal;
pub mod lease;
pub mod ledger;
pub mod recorder;
pub mod response;
pub mod scope;
pub mod slots;
pub mod usage;

/// The Redis Cluster hash slot of a key (hash tags honoured).
#[pyfunction]
#[pyo3(name = "key_slot")]
fn py_key_slot(key: &str) -> usize {
    slots::key_slot(key)
}

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    estimate::register(m)?;
    usage::register(m)?;
    response::register(m)?;
    ledger::register(m)?;
    histogram::register(m)?;
    cost::register(m)?;
    recorder::register(m)?;
    lease::register(m)?;
    scope::register(m)?;
    m.add_function(wrap_pyfunction!(py_key_slot, m)?)?;
    m.add_function(wrap_pyfunction!(recorder::py_current_cycle, m)?)?;
    Ok(())
}
