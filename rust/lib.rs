//! `llmtally._core`: the measured hot path of llmtally.
//!
//! Module glue only: each concept lives in its own file and is exposed here under its Python
//! name. Policy (argument normalization, fallbacks) stays in Python.

use pyo3::prelude::*;

pub mod cost;
pub mod estimate;
pub mod histogram;
pub mod ledger;
pub mod response;
pub mod usage;

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    estimate::register(m)?;
    usage::register(m)?;
    response::register(m)?;
    ledger::register(m)?;
    histogram::register(m)?;
    cost::register(m)?;
    Ok(())
}
