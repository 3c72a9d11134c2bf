//! Fixed-memory log-linear histograms (HDR-style) for latency, time to first token, tokens/s.
//!
//! Values are recorded as non-negative integers in a fixed unit (the Python side scales, e.g.
//! microseconds). Each power of two is split into `SUB` linear buckets, so a bucket's width is
//! at most 1/SUB of its value: percentiles are within 1/(2*SUB) (0.8%) of the true sample.
//! Recording is lock-free (atomic counters), so one histogram serves every thread.

use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS; // 64 linear buckets per power of two
const MAX_EXP: u32 = 48; // values up to 2^48 (e.g. 8.9 years in microseconds)
const BUCKETS: usize = (SUB as usize) * (MAX_EXP as usize - SUB_BITS as usize + 1);

/// Bucket index of `v`: values below SUB map to themselves; above, (exponent, top bits).
#[inline]
fn index(v: u64) -> usize {
    let v = v.min((1u64 << MAX_EXP) - 1);
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let mantissa = (v >> shift) - SUB; // 0..SUB
    ((shift as u64 + 1) * SUB + mantissa) as usize
}

/// Lowest value of bucket `i`, and its width.
#[inline]
fn bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, 1);
    }
    let shift = i / SUB - 1;
    let mantissa = i % SUB;
    ((SUB + mantissa) << shift, 1u64 << shift)
}

pub struct Core {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    min: AtomicU64,
    max: AtomicU64,
}

impl Default for Core {
    fn default() -> Self {
        Self::new()
    }
}

impl Core {
    pub fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
        }
    }

    pub fn record(&self, v: u64) {
        self.record_n(v, 1);
    }

    pub fn record_n(&self, v: u64, n: u64) {
        self.buckets[index(v)].fetch_add(n, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
        self.sum.fetch_add(v.saturating_mul(n), Ordering::Relaxed);
        self.min.fetch_min(v, Ordering::Relaxed);
        self.max.fetch_max(v, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The value at quantile `q` (0..=1): the midpoint of the bucket holding it, clamped to
    /// the recorded min and max.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        // The extremes are known exactly.
        if rank == total {
            return Some(self.max.load(Ordering::Relaxed) as f64);
        }
        if rank == 1 {
            return Some(self.min.load(Ordering::Relaxed) as f64);
        }
        let mut seen = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                let (low, width) = bounds(i);
                let mid = low as f64 + (width as f64 - 1.0) / 2.0;
                let lo = self.min.load(Ordering::Relaxed) as f64;
                let hi = self.max.load(Ordering::Relaxed) as f64;
                return Some(mid.clamp(lo, hi));
            }
        }
        None
    }

    pub fn merge_from(&self, other: &Core) {
        for (a, b) in self.buckets.iter().zip(other.buckets.iter()) {
            let n = b.load(Ordering::Relaxed);
            if n > 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.count
            .fetch_add(other.count.load(Ordering::Relaxed), Ordering::Relaxed);
        self.sum
            .fetch_add(other.sum.load(Ordering::Relaxed), Ordering::Relaxed);
        self.min
            .fetch_min(other.min.load(Ordering::Relaxed), Ordering::Relaxed);
        self.max
            .fetch_max(other.max.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    pub fn reset(&self) {
        for b in self.buckets.iter() {
            b.store(0, Ordering::Relaxed);
        }
        self.count.store(0, Ordering::Relaxed);
        self.sum.store(0, Ordering::Relaxed);
        self.min.store(u64::MAX, Ordering::Relaxed);
        self.max.store(0, Ordering::Relaxed);
    }
}

/// A fixed-memory histogram of non-negative values, with percentiles within 0.8%.
///
/// `scale` converts recorded floats to integer units (default 1000: record milliseconds, keep
/// microsecond resolution); results come back in the recorded unit.
#[pyclass(frozen, module = "llmtally._core", name = "Histogram")]
pub struct Histogram {
    core: Core,
    scale: f64,
}

impl Histogram {
    pub(crate) fn with_scale(scale: f64) -> Self {
        Self {
            core: Core::new(),
            scale,
        }
    }

    /// Record a value already known to be valid (finite, >= 0); others are ignored.
    pub(crate) fn record_value(&self, value: f64) {
        if let Ok(v) = self.to_units(value) {
            self.core.record(v);
        }
    }

    pub(crate) fn merge_from(&self, other: &Histogram) -> PyResult<()> {
        if (self.scale - other.scale).abs() > f64::EPSILON * self.scale {
            return Err(PyValueError::new_err(
                "cannot merge histograms of different scales",
            ));
        }
        self.core.merge_from(&other.core);
        Ok(())
    }

    fn to_units(&self, value: f64) -> PyResult<u64> {
        if value.is_nan() || value < 0.0 || value.is_infinite() {
            return Err(PyValueError::new_err(format!(
                "histogram values must be finite and >= 0, not {value}"
            )));
        }
        Ok((value * self.scale).round() as u64)
    }
}

#[pymethods]
impl Histogram {
    #[new]
    #[pyo3(signature = (scale = 1000.0))]
    fn py_new(scale: f64) -> PyResult<Self> {
        if scale.is_nan() || scale <= 0.0 || scale.is_infinite() {
            return Err(PyValueError::new_err(
                "scale must be a positive, finite number",
            ));
        }
        Ok(Self {
            core: Core::new(),
            scale,
        })
    }

    /// Record one value (`n` times).
    #[pyo3(signature = (value, n = 1))]
    fn record(&self, value: f64, n: u64) -> PyResult<()> {
        let v = self.to_units(value)?;
        self.core.record_n(v, n);
        Ok(())
    }

    /// The value at percentile `p` (0..=100), or `None` when empty.
    fn percentile(&self, p: f64) -> PyResult<Option<f64>> {
        if !(0.0..=100.0).contains(&p) {
            return Err(PyValueError::new_err(format!(
                "percentile must be in [0, 100], not {p}"
            )));
        }
        Ok(self.core.quantile(p / 100.0).map(|v| v / self.scale))
    }

    /// Several percentiles at once.
    fn percentiles(&self, ps: Vec<f64>) -> PyResult<Vec<Option<f64>>> {
        ps.into_iter().map(|p| self.percentile(p)).collect()
    }

    #[getter]
    fn count(&self) -> u64 {
        self.core.count()
    }

    #[getter]
    fn min(&self) -> Option<f64> {
        (self.core.count() > 0).then(|| self.core.min.load(Ordering::Relaxed) as f64 / self.scale)
    }

    #[getter]
    fn max(&self) -> Option<f64> {
        (self.core.count() > 0).then(|| self.core.max.load(Ordering::Relaxed) as f64 / self.scale)
    }

    #[getter]
    fn mean(&self) -> Option<f64> {
        let n = self.core.count();
        (n > 0).then(|| self.core.sum.load(Ordering::Relaxed) as f64 / n as f64 / self.scale)
    }

    /// Add another histogram's samples (same scale required).
    fn merge(&self, other: &Histogram) -> PyResult<()> {
        self.merge_from(other)
    }

    fn reset(&self) {
        self.core.reset();
    }

    /// Cumulative counts of values at or below each bound (in the recorded unit), for
    /// fixed-bucket exports such as Prometheus histograms; `(counts, total, sum)`. A sample is
    /// placed by its bucket's low edge, so a count is exact to within one bucket's width (1.6%).
    fn cumulative(&self, bounds: Vec<f64>) -> (Vec<u64>, u64, f64) {
        let mut out = Vec::with_capacity(bounds.len());
        let mut seen = 0u64;
        let mut i = 0usize;
        for bound in bounds {
            let limit = if bound.is_finite() && bound >= 0.0 {
                (bound * self.scale).floor() as u64
            } else if bound < 0.0 {
                out.push(0);
                continue;
            } else {
                u64::MAX
            };
            while i < BUCKETS {
                let (low, _) = crate::histogram::bounds(i);
                if low > limit {
                    break;
                }
                seen += self.core.buckets[i].load(Ordering::Relaxed);
                i += 1;
            }
            out.push(seen);
        }
        let total = self.core.count();
        let sum = self.core.sum.load(Ordering::Relaxed) as f64 / self.scale;
        (out, total, sum)
    }

    fn __len__(&self) -> usize {
        self.core.count() as usize
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Histogram>()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_bounds_agree() {
        for v in (0..5000u64).chain([1 << 20, (1 << 20) + 12345, 1 << 40]) {
            let (low, width) = bounds(index(v));
            assert!(low <= v && v < low + width, "{v} -> {low}+{width}");
            assert!(width == 1 || width * SUB <= low * 2, "{v}");
        }
        assert!(index((1 << MAX_EXP) - 1) < BUCKETS);
    }

    #[test]
    fn percentiles_are_within_one_percent() {
        let h = Core::new();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        for (q, exact) in [(0.5, 50_000.0), (0.95, 95_000.0), (0.99, 99_000.0)] {
            let got = h.quantile(q).unwrap();
            assert!((got - exact).abs() / exact < 0.01, "{q}: {got}");
        }
        assert_eq!(h.quantile(1.0).unwrap(), 100_000.0);
        assert_eq!(h.quantile(0.0).unwrap(), 1.0);
    }

    #[test]
    fn merge_adds_counts() {
        let a = Core::new();
        let b = Core::new();
        a.record(10);
        b.record(1000);
        b.record(1000);
        a.merge_from(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.quantile(1.0).unwrap(), 1000.0);
    }
}
