//! Cost arithmetic in exact integers.
//!
//! Prices are USD per 1M tokens given with at most six decimals, so a price is an integer
//! number of pico-USD (1e-12 USD) per token: `price_usd_per_m * 1e6`. A call's cost is a sum of
//! token counts times those integers, exact whatever the number of calls; an `i64` holds about
//! 9.2M USD and anything past it is refused, never wrapped.
//!
//! The subset rules: cache reads and writes are part of the prompt, reasoning is part of the
//! completion. Cost = uncached prompt x input + cache reads x cache-read price + cache writes x
//! cache-write price (1 h writes at their own price) + completion x output (reasoning at its own
//! price where the model has one).
//!
//! Every kind has a price in every long-context tier. `Prices::new` resolves them once: a kind
//! the tier lists keeps the tier's price; a kind priced on its own below the tier keeps that
//! price; a kind without a price of its own derives from the tier's (cache reads and writes
//! from the tier's input, 1 h writes from the tier's 5-minute writes, reasoning from the tier's
//! output). A tier applies when the prompt is above its threshold, or at it for providers that
//! bill inclusively (xAI).
//!
//! Modifiers a call states: a service tier (`flex`, `priority`, `batch`: a whole table of its
//! own where the model lists one, else the standard one), an inference geography multiplier
//! (Anthropic's `inference_geo: "us"`: 1.1x), a speed multiplier (Anthropic's `speed: "fast"`
//! where listed), and off-peak windows by the call's UTC time (DeepSeek). A model without
//! modifiers never reads them.

use std::time::{SystemTime, UNIX_EPOCH};

use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::usage::{get, Usage};

/// Pico-USD per token of a price in USD per 1M tokens, exact for up to six decimals.
pub fn pusd_per_token(usd_per_million: f64) -> Result<i64, String> {
    if !usd_per_million.is_finite() || usd_per_million < 0.0 {
        return Err(format!(
            "price {usd_per_million} must be a finite number >= 0"
        ));
    }
    let scaled = (usd_per_million * 1e6).round();
    let tolerance = 1e-6_f64.max(scaled * 1e-12); // float noise, not a seventh decimal
    if (scaled - usd_per_million * 1e6).abs() > tolerance {
        return Err(format!(
            "price {usd_per_million} has more than six decimals (USD per 1M tokens)"
        ));
    }
    if scaled >= i64::MAX as f64 {
        return Err(format!("price {usd_per_million} is too large"));
    }
    Ok(scaled as i64)
}

/// Every kind's price at one prompt size, in pico-USD per token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rates {
    pub input: i64,
    pub output: i64,
    pub cache_read: i64,
    pub cache_write: i64,
    pub cache_write_1h: i64,
    pub reasoning: i64,
}

/// Prices as listed, before defaults: what `Prices::new` resolves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Listed {
    pub input: Option<i64>,
    pub output: Option<i64>,
    pub cache_read: Option<i64>,
    pub cache_write: Option<i64>,
    pub cache_write_1h: Option<i64>,
    pub reasoning: Option<i64>,
}

/// One model's prices, every kind resolved for the base and for each tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceTable {
    pub base: Rates,
    /// Long-context tiers, ascending by threshold: `(threshold, rates above it)`.
    pub tiers: Vec<(u64, Rates)>,
    /// A prompt of exactly a threshold is in the tier (xAI); otherwise it must be above it.
    pub inclusive: bool,
}

/// The token counts a cost is computed from (subsets inside their whole).
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub prompt: u64,
    pub completion: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub cache_write_1h: u64,
    pub reasoning: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum CostError {
    Inconsistent(&'static str),
    Overflow,
}

impl PriceTable {
    /// Resolve the listed base and tier prices into full rates (see the module docs).
    /// `base.input` and `base.output` are required; `tiers` are ascending by threshold.
    pub fn resolve(base: Listed, tiers: &[(u64, Listed)], inclusive: bool) -> Self {
        let input = base.input.unwrap_or(0);
        let output = base.output.unwrap_or(0);
        let cache_write = base.cache_write.unwrap_or(input);
        let base_rates = Rates {
            input,
            output,
            cache_read: base.cache_read.unwrap_or(input),
            cache_write,
            cache_write_1h: base.cache_write_1h.unwrap_or(cache_write),
            reasoning: base.reasoning.unwrap_or(output),
        };
        // Whether a kind has been priced on its own so far (then a tier without it keeps the
        // price below; else it derives from the tier's own prices).
        let mut own = [
            base.cache_read.is_some(),
            base.cache_write.is_some(),
            base.cache_write_1h.is_some(),
            base.reasoning.is_some(),
        ];
        let mut prev = base_rates;
        let mut resolved = Vec::with_capacity(tiers.len());
        for (above, t) in tiers {
            let input = t.input.unwrap_or(prev.input);
            let output = t.output.unwrap_or(prev.output);
            let mut pick = |i: usize, listed: Option<i64>, below: i64, derived: i64| match listed {
                Some(v) => {
                    own[i] = true;
                    v
                }
                None if own[i] => below,
                None => derived,
            };
            let cache_read = pick(0, t.cache_read, prev.cache_read, input);
            let cache_write = pick(1, t.cache_write, prev.cache_write, input);
            let cache_write_1h = pick(2, t.cache_write_1h, prev.cache_write_1h, cache_write);
            let reasoning = pick(3, t.reasoning, prev.reasoning, output);
            prev = Rates {
                input,
                output,
                cache_read,
                cache_write,
                cache_write_1h,
                reasoning,
            };
            resolved.push((*above, prev));
        }
        Self {
            base: base_rates,
            tiers: resolved,
            inclusive,
        }
    }

    /// The rates a prompt of `prompt` tokens is billed at.
    pub fn rates(&self, prompt: u64) -> &Rates {
        let mut rates = &self.base;
        for (above, r) in &self.tiers {
            if prompt > *above || (self.inclusive && prompt == *above) {
                rates = r;
            }
        }
        rates
    }

    pub fn cost_pusd(&self, c: &Counts) -> Result<i64, CostError> {
        if c.cache_read + c.cache_write > c.prompt {
            return Err(CostError::Inconsistent("cache tokens exceed prompt tokens"));
        }
        if c.reasoning > c.completion {
            return Err(CostError::Inconsistent(
                "reasoning tokens exceed completion tokens",
            ));
        }
        if c.cache_write_1h > c.cache_write {
            return Err(CostError::Inconsistent(
                "1h cache writes exceed cache writes",
            ));
        }
        let r = self.rates(c.prompt);
        let terms: [(u64, i64); 6] = [
            (c.prompt - c.cache_read - c.cache_write, r.input),
            (c.cache_read, r.cache_read),
            (c.cache_write - c.cache_write_1h, r.cache_write),
            (c.cache_write_1h, r.cache_write_1h),
            (c.completion - c.reasoning, r.output),
            (c.reasoning, r.reasoning),
        ];
        let mut total: i64 = 0;
        for (tokens, price) in terms {
            let t = i64::try_from(tokens).map_err(|_| CostError::Overflow)?;
            let part = t.checked_mul(price).ok_or(CostError::Overflow)?;
            total = total.checked_add(part).ok_or(CostError::Overflow)?;
        }
        Ok(total)
    }
}

/// An off-peak window: the weekdays it applies on (bit 0 Monday .. bit 6 Sunday, UTC) and
/// `[start, end)` in minutes of the UTC day; `start >= end` wraps past midnight (equal: all day).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub weekdays: u8,
    pub start: u16,
    pub end: u16,
}

impl Window {
    fn contains(&self, unix_s: i64) -> bool {
        let days = unix_s.div_euclid(86_400);
        let minute = (unix_s.rem_euclid(86_400) / 60) as u16;
        let weekday = (days + 3).rem_euclid(7); // 1970-01-01 was a Thursday; 0 = Monday
        if self.weekdays & (1 << weekday) == 0 {
            return false;
        }
        if self.start < self.end {
            self.start <= minute && minute < self.end
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

/// Multiply a cost by parts per million, rounding half up (exact in i128).
fn scale(pusd: i64, ppm: i64) -> Result<i64, CostError> {
    let scaled = (pusd as i128 * ppm as i128 + 500_000).div_euclid(1_000_000);
    i64::try_from(scaled).map_err(|_| CostError::Overflow)
}

/// Multiply a cost by two factors in parts per million, rounding half up once.
fn scale2(pusd: i64, a: i64, b: i64) -> Result<i64, CostError> {
    const E12: i128 = 1_000_000_000_000;
    let product = (pusd as i128)
        .checked_mul(a as i128)
        .and_then(|v| v.checked_mul(b as i128))
        .ok_or(CostError::Overflow)?;
    i64::try_from((product + E12 / 2).div_euclid(E12)).map_err(|_| CostError::Overflow)
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A service tier as a provider reports it -> the name its prices are listed under.
fn tier_name(reported: &str) -> Option<String> {
    let name = reported.trim().to_ascii_lowercase();
    match name.as_str() {
        "" | "default" | "standard" | "auto" | "on_demand" => None,
        "fast" => Some("priority".to_string()),
        "batches" => Some("batch".to_string()),
        _ => Some(name),
    }
}

/// What a call states that can change its price: `(service_tier, inference_geo, speed)`, each
/// when the response carries a string for it (OpenAI: top-level `service_tier`; Anthropic:
/// `usage.service_tier`, `usage.inference_geo`, `usage.speed`). Reading it never fails the
/// call.
pub fn call_modifiers(obj: &Bound<'_, PyAny>) -> (Option<String>, Option<String>, Option<String>) {
    let py = obj.py();
    let text = |v: Option<Bound<'_, PyAny>>| -> Option<String> {
        v.and_then(|v| {
            v.cast::<PyString>()
                .ok()
                .and_then(|s| s.to_str().ok().map(str::to_owned))
        })
    };
    let mut tier = text(get(obj, intern!(py, "service_tier")).ok().flatten());
    let mut geo = None;
    let mut speed = None;
    if let Ok(Some(usage)) = get(obj, intern!(py, "usage")) {
        if tier.is_none() {
            tier = text(get(&usage, intern!(py, "service_tier")).ok().flatten());
        }
        geo = text(get(&usage, intern!(py, "inference_geo")).ok().flatten());
        speed = text(get(&usage, intern!(py, "speed")).ok().flatten());
    }
    if geo.is_none() {
        geo = text(get(obj, intern!(py, "inference_geo")).ok().flatten());
    }
    if speed.is_none() {
        speed = text(get(obj, intern!(py, "speed")).ok().flatten());
    }
    (tier, geo, speed)
}

/// A model's prices (USD per 1M tokens), turned once into exact integers.
#[pyclass(frozen, module = "llmtally._core", name = "Prices")]
pub struct Prices {
    table: PriceTable,
    usd: [f64; 6],
    version: Option<Py<PyString>>,
    /// Whole tables by service tier name (`flex`, `priority`, `batch`), where listed.
    service_tiers: Vec<(String, PriceTable)>,
    /// Cost multipliers by inference geography, in parts per million (`us`: 1_100_000).
    geo: Vec<(String, i64)>,
    /// Cost multipliers by the speed a call was served at, in parts per million (`fast`).
    speed: Vec<(String, i64)>,
    /// The off-peak table and the windows it applies in.
    off_peak: Option<(PriceTable, Vec<Window>)>,
}

fn price(name: &str, v: f64) -> PyResult<i64> {
    pusd_per_token(v).map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

fn opt_price(name: &str, v: Option<f64>) -> PyResult<Option<i64>> {
    v.map(|v| price(name, v)).transpose()
}

fn cost_error(e: CostError) -> PyErr {
    match e {
        CostError::Inconsistent(m) => PyValueError::new_err(m),
        CostError::Overflow => PyOverflowError::new_err(
            "cost exceeds the 64-bit pico-USD range (about 9.2M USD); refused",
        ),
    }
}

fn parse_multipliers(
    what: &str,
    given: Option<Vec<(String, f64)>>,
) -> PyResult<Vec<(String, i64)>> {
    let mut out = Vec::new();
    for (name, m) in given.unwrap_or_default() {
        if !m.is_finite() || m <= 0.0 || m > 1000.0 {
            return Err(PyValueError::new_err(format!(
                "{what}: multiplier {m} for {name:?} must be > 0 and at most 1000"
            )));
        }
        out.push((name.to_ascii_lowercase(), (m * 1e6).round() as i64));
    }
    Ok(out)
}

const TIER_SHAPE: &str = "a tier is (above_prompt_tokens, input_price, output_price[, \
     cache_read_price[, cache_write_price[, cache_write_1h_price[, reasoning_price]]]])";

fn parse_tiers(tiers: Vec<Vec<Option<f64>>>) -> PyResult<Vec<(u64, Listed)>> {
    let mut out = Vec::with_capacity(tiers.len());
    for t in tiers {
        if !(3..=7).contains(&t.len()) {
            return Err(PyValueError::new_err(TIER_SHAPE));
        }
        let Some(above) = t[0] else {
            return Err(PyValueError::new_err("a tier's threshold is required"));
        };
        if above < 0.0 || above.fract() != 0.0 || !above.is_finite() {
            return Err(PyValueError::new_err(
                "a tier's threshold must be an int >= 0",
            ));
        }
        let at = |k: usize, name: &str| opt_price(name, t.get(k).copied().flatten());
        out.push((
            above as u64,
            Listed {
                input: at(1, "tier input_price")?,
                output: at(2, "tier output_price")?,
                cache_read: at(3, "tier cache_read_price")?,
                cache_write: at(4, "tier cache_write_price")?,
                cache_write_1h: at(5, "tier cache_write_1h_price")?,
                reasoning: at(6, "tier reasoning_price")?,
            },
        ));
    }
    out.sort_by_key(|t| t.0);
    Ok(out)
}

#[pymethods]
impl Prices {
    /// `cache_read_price` and `cache_write_price` default to the input price,
    /// `cache_write_1h_price` to the cache-write price, `reasoning_price` to the output price;
    /// in a tier, a kind not listed keeps its own price from below, or derives from the tier's.
    #[new]
    #[pyo3(signature = (
        input_price, output_price, cache_read_price=None, cache_write_price=None,
        cache_write_1h_price=None, reasoning_price=None, tiers=None, *, inclusive=false,
        version=None, service_tiers=None, geo=None, speed=None, off_peak=None,
        off_peak_windows=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn py_new(
        input_price: f64,
        output_price: f64,
        cache_read_price: Option<f64>,
        cache_write_price: Option<f64>,
        cache_write_1h_price: Option<f64>,
        reasoning_price: Option<f64>,
        tiers: Option<Vec<Vec<Option<f64>>>>,
        inclusive: bool,
        version: Option<Bound<'_, PyString>>,
        service_tiers: Option<Bound<'_, PyDict>>,
        geo: Option<Vec<(String, f64)>>,
        speed: Option<Vec<(String, f64)>>,
        off_peak: Option<PyRef<'_, Prices>>,
        off_peak_windows: Option<Vec<(u8, u16, u16)>>,
    ) -> PyResult<Self> {
        let listed = Listed {
            input: Some(price("input_price", input_price)?),
            output: Some(price("output_price", output_price)?),
            cache_read: opt_price("cache_read_price", cache_read_price)?,
            cache_write: opt_price("cache_write_price", cache_write_price)?,
            cache_write_1h: opt_price("cache_write_1h_price", cache_write_1h_price)?,
            reasoning: opt_price("reasoning_price", reasoning_price)?,
        };
        let tiers = parse_tiers(tiers.unwrap_or_default())?;
        let table = PriceTable::resolve(listed, &tiers, inclusive);
        let cache_write_usd = cache_write_price.unwrap_or(input_price);
        let mut variants = Vec::new();
        if let Some(d) = service_tiers {
            for (k, v) in d.iter() {
                let name: String = k.extract()?;
                let p = v.cast::<Prices>()?;
                let Some(name) = tier_name(&name) else {
                    return Err(PyValueError::new_err(format!(
                        "service_tiers: {name:?} is the standard tier"
                    )));
                };
                variants.push((name, p.get().table.clone()));
            }
        }
        let multipliers = parse_multipliers("geo", geo)?;
        let speeds = parse_multipliers("speed", speed)?;
        let off_peak = match (off_peak, off_peak_windows) {
            (None, None) => None,
            (Some(p), Some(w)) if !w.is_empty() => {
                let mut windows = Vec::with_capacity(w.len());
                for (weekdays, start, end) in w {
                    if weekdays == 0 || weekdays > 0x7f || start >= 1440 || end > 1440 {
                        return Err(PyValueError::new_err(
                            "off_peak_windows: (weekday bits 1..127, start minute < 1440, \
                             end minute <= 1440)",
                        ));
                    }
                    windows.push(Window {
                        weekdays,
                        start,
                        end: end % 1440,
                    });
                }
                Some((p.table.clone(), windows))
            }
            _ => {
                return Err(PyValueError::new_err(
                    "off_peak and off_peak_windows go together",
                ))
            }
        };
        Ok(Self {
            table,
            usd: [
                input_price,
                output_price,
                cache_read_price.unwrap_or(input_price),
                cache_write_usd,
                cache_write_1h_price.unwrap_or(cache_write_usd),
                reasoning_price.unwrap_or(output_price),
            ],
            version: version.map(Bound::unbind),
            service_tiers: variants,
            geo: multipliers,
            speed: speeds,
            off_peak,
        })
    }

    /// Cost in pico-USD of explicit counts (subsets inside their whole), for a call served at
    /// `service_tier`, in `inference_geo`, at `speed`, at `at` (UNIX seconds; default now).
    #[pyo3(signature = (
        prompt_tokens=0, completion_tokens=0, cached_tokens=0, cache_write_tokens=0,
        cache_write_1h_tokens=0, reasoning_tokens=0, *, service_tier=None, inference_geo=None,
        at=None, speed=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn cost_pusd(
        &self,
        prompt_tokens: u64,
        completion_tokens: u64,
        cached_tokens: u64,
        cache_write_tokens: u64,
        cache_write_1h_tokens: u64,
        reasoning_tokens: u64,
        service_tier: Option<&str>,
        inference_geo: Option<&str>,
        at: Option<f64>,
        speed: Option<&str>,
    ) -> PyResult<i64> {
        let c = Counts {
            prompt: prompt_tokens,
            completion: completion_tokens,
            cache_read: cached_tokens,
            cache_write: cache_write_tokens,
            cache_write_1h: cache_write_1h_tokens,
            reasoning: reasoning_tokens,
        };
        let mods = Mods {
            service_tier,
            inference_geo,
            speed,
            at: at.map(|s| s.floor() as i64),
        };
        self.cost_with(&c, &mods).map_err(cost_error)
    }

    /// Cost in pico-USD of a normalized `Usage` (`None` when its split is unknown).
    #[pyo3(signature = (usage, *, service_tier=None, inference_geo=None, at=None, speed=None))]
    fn usage_cost_pusd(
        &self,
        usage: &Usage,
        service_tier: Option<&str>,
        inference_geo: Option<&str>,
        at: Option<f64>,
        speed: Option<&str>,
    ) -> PyResult<Option<i64>> {
        let Some(c) = counts(usage) else {
            return Ok(None);
        };
        let mods = Mods {
            service_tier,
            inference_geo,
            speed,
            at: at.map(|s| s.floor() as i64),
        };
        self.cost_with(&c, &mods).map(Some).map_err(cost_error)
    }

    /// The prices (USD per 1M tokens) a prompt of `prompt_tokens` is billed at: `(input,
    /// output, cache_read, cache_write, cache_write_1h, reasoning)`, before a geo or speed
    /// multiplier.
    #[pyo3(signature = (prompt_tokens=0, *, service_tier=None, at=None))]
    fn rates(
        &self,
        prompt_tokens: u64,
        service_tier: Option<&str>,
        at: Option<f64>,
    ) -> (f64, f64, f64, f64, f64, f64) {
        let r = self
            .table_for(service_tier, at.map(|s| s.floor() as i64))
            .rates(prompt_tokens);
        let usd = |p: i64| p as f64 / 1e6;
        (
            usd(r.input),
            usd(r.output),
            usd(r.cache_read),
            usd(r.cache_write),
            usd(r.cache_write_1h),
            usd(r.reasoning),
        )
    }

    #[getter]
    fn input_price(&self) -> f64 {
        self.usd[0]
    }
    #[getter]
    fn output_price(&self) -> f64 {
        self.usd[1]
    }
    #[getter]
    fn cache_read_price(&self) -> f64 {
        self.usd[2]
    }
    #[getter]
    fn cache_write_price(&self) -> f64 {
        self.usd[3]
    }
    #[getter]
    fn cache_write_1h_price(&self) -> f64 {
        self.usd[4]
    }
    #[getter]
    fn reasoning_price(&self) -> f64 {
        self.usd[5]
    }
    /// The effective date of this price version (`YYYY-MM-DD`), when known.
    #[getter]
    fn version<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyString>> {
        self.version.as_ref().map(|v| v.bind(py).clone())
    }
    #[getter]
    fn inclusive(&self) -> bool {
        self.table.inclusive
    }
    /// Whether a call's service tier, geography, speed or time can change its price.
    #[getter]
    fn has_modifiers(&self) -> bool {
        self.has_mods()
    }
    /// The service tiers with prices of their own.
    #[getter]
    fn service_tiers(&self) -> Vec<String> {
        self.service_tiers.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// What a call states beside its counts: service tier, geography, speed and time (UNIX s).
struct Mods<'a> {
    service_tier: Option<&'a str>,
    inference_geo: Option<&'a str>,
    speed: Option<&'a str>,
    at: Option<i64>,
}

fn counts(u: &Usage) -> Option<Counts> {
    let (Some(prompt), Some(completion)) = (u.prompt_tokens, u.completion_tokens) else {
        return None;
    };
    Some(Counts {
        prompt,
        completion,
        cache_read: u.cached_tokens,
        cache_write: u.cache_write_tokens,
        cache_write_1h: u.cache_write_1h_tokens,
        reasoning: u.reasoning_tokens,
    })
}

impl Prices {
    fn has_mods(&self) -> bool {
        !self.service_tiers.is_empty()
            || !self.geo.is_empty()
            || !self.speed.is_empty()
            || self.off_peak.is_some()
    }

    /// The table a call is billed from: its service tier's where listed, else the off-peak one
    /// inside a window, else the standard one.
    fn table_for(&self, service_tier: Option<&str>, at: Option<i64>) -> &PriceTable {
        if let Some(name) = service_tier.and_then(tier_name) {
            if let Some((_, t)) = self.service_tiers.iter().find(|(n, _)| *n == name) {
                return t;
            }
        }
        if let Some((table, windows)) = &self.off_peak {
            let t = at.unwrap_or_else(now_s);
            if windows.iter().any(|w| w.contains(t)) {
                return table;
            }
        }
        &self.table
    }

    fn cost_with(&self, c: &Counts, m: &Mods<'_>) -> Result<i64, CostError> {
        let cost = self.table_for(m.service_tier, m.at).cost_pusd(c)?;
        let factor = |list: &[(String, i64)], stated: Option<&str>| {
            stated.and_then(|s| {
                list.iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(s.trim()))
                    .map(|(_, ppm)| *ppm)
            })
        };
        match (
            factor(&self.geo, m.inference_geo),
            factor(&self.speed, m.speed),
        ) {
            (None, None) => Ok(cost),
            (Some(g), None) => scale(cost, g),
            (None, Some(s)) => scale(cost, s),
            (Some(g), Some(s)) => scale2(cost, g, s),
        }
    }

    /// Cost of a usage with a known split, with no modifier; `None` when the split is unknown
    /// or the counts are inconsistent (the Python side reports that).
    pub(crate) fn usage_cost(&self, u: &Usage) -> Option<i64> {
        self.table.cost_pusd(&counts(u)?).ok()
    }

    /// Cost of a call's usage, with the modifiers its response `obj` states (read only when
    /// the model has any) at the current time.
    pub(crate) fn call_cost(&self, u: &Usage, obj: &Bound<'_, PyAny>) -> Option<i64> {
        if !self.has_mods() {
            return self.usage_cost(u);
        }
        let (tier, geo, speed) = call_modifiers(obj);
        let mods = Mods {
            service_tier: tier.as_deref(),
            inference_geo: geo.as_deref(),
            speed: speed.as_deref(),
            at: None,
        };
        self.cost_with(&counts(u)?, &mods).ok()
    }

    /// The price version to report beside a table cost.
    pub(crate) fn version_of<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyString>> {
        self.version.as_ref().map(|v| v.bind(py).clone())
    }
}

/// `(service_tier, inference_geo, speed)` a response states, each `None` when absent.
#[pyfunction]
#[pyo3(name = "call_modifiers")]
#[allow(clippy::type_complexity)]
fn py_call_modifiers(obj: &Bound<'_, PyAny>) -> (Option<String>, Option<String>, Option<String>) {
    call_modifiers(obj)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Prices>()?;
    m.add_function(wrap_pyfunction!(py_call_modifiers, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(usd: f64) -> i64 {
        pusd_per_token(usd).unwrap()
    }

    fn listed(input: f64, output: f64) -> Listed {
        Listed {
            input: Some(p(input)),
            output: Some(p(output)),
            ..Listed::default()
        }
    }

    #[test]
    fn six_decimal_prices_are_exact() {
        assert_eq!(pusd_per_token(2.5).unwrap(), 2_500_000);
        assert_eq!(pusd_per_token(0.000001).unwrap(), 1);
        assert_eq!(pusd_per_token(0.15).unwrap(), 150_000);
        assert!(pusd_per_token(0.0000001).is_err());
        assert!(pusd_per_token(1234.5678901).is_err());
        assert_eq!(pusd_per_token(0.075).unwrap(), 75_000);
        assert!(pusd_per_token(-1.0).is_err());
    }

    #[test]
    fn openai_style_cached_and_reasoning() {
        // gpt-4o: 2.50 in, 10.00 out, cached reads 1.25.
        let mut l = listed(2.5, 10.0);
        l.cache_read = Some(p(1.25));
        let t = PriceTable::resolve(l, &[], false);
        let c = Counts {
            prompt: 1200,
            completion: 300,
            cache_read: 1024,
            reasoning: 256,
            ..Counts::default()
        };
        // 176 x 2.5 + 1024 x 1.25 + 300 x 10 (reasoning at the output price), per 1M tokens.
        let expected = (176 * 2_500_000) + (1024 * 1_250_000) + (300 * 10_000_000);
        assert_eq!(t.cost_pusd(&c).unwrap(), expected);
    }

    #[test]
    fn every_kind_switches_at_the_tier() {
        // Base 1.25/10 with no cache, 1 h or reasoning price; tier above 200k: 2.5/15.
        let tier = Listed {
            input: Some(p(2.5)),
            output: Some(p(15.0)),
            ..Listed::default()
        };
        let t = PriceTable::resolve(listed(1.25, 10.0), &[(200_000, tier)], false);
        let r = t.rates(200_001);
        assert_eq!(
            (r.cache_read, r.cache_write, r.cache_write_1h, r.reasoning),
            (p(2.5), p(2.5), p(2.5), p(15.0))
        );
        assert_eq!(t.rates(200_000), &t.base);
        // A kind priced on its own below keeps that price when the tier does not list it.
        let mut base = listed(3.0, 15.0);
        base.cache_read = Some(p(0.3));
        base.cache_write_1h = Some(p(6.0));
        let t = PriceTable::resolve(base, &[(200_000, tier)], false);
        let r = t.rates(300_000);
        assert_eq!(
            (r.cache_read, r.cache_write, r.cache_write_1h),
            (p(0.3), p(2.5), p(6.0))
        );
    }

    #[test]
    fn inclusive_thresholds_switch_at_the_threshold() {
        let tier = listed(6.0, 30.0);
        let t = PriceTable::resolve(listed(3.0, 15.0), &[(128_000, tier)], true);
        assert_eq!(t.rates(127_999).input, p(3.0));
        assert_eq!(t.rates(128_000).input, p(6.0));
    }

    #[test]
    fn windows_wrap_and_follow_weekdays() {
        // 2025-01-06 was a Monday; 16:30-00:30 UTC on weekdays.
        let monday = 1_736_121_600; // 2025-01-06T00:00:00Z
        let w = Window {
            weekdays: 0b001_1111,
            start: 16 * 60 + 30,
            end: 30,
        };
        assert!(w.contains(monday + 17 * 3600));
        assert!(w.contains(monday + 10 * 60)); // 00:10 Monday
        assert!(!w.contains(monday + 12 * 3600));
        assert!(!w.contains(monday + 5 * 86_400 + 17 * 3600)); // Saturday
        let all_day = Window {
            weekdays: 0b110_0000,
            start: 0,
            end: 0,
        };
        assert!(all_day.contains(monday + 5 * 86_400 + 12 * 3600));
        assert!(!all_day.contains(monday + 12 * 3600));
    }

    #[test]
    fn geo_multiplier_rounds_half_up() {
        assert_eq!(scale(3_000_000, 1_100_000).unwrap(), 3_300_000);
        assert_eq!(scale(5, 1_100_000).unwrap(), 6); // 5.5 -> 6

        // Geography and speed together round once: 5 x 1.1 x 2 = 11; 3 x 1.1 x 1.5 = 4.95 -> 5.
        assert_eq!(scale2(5, 1_100_000, 2_000_000).unwrap(), 11);
        assert_eq!(scale2(3, 1_100_000, 1_500_000).unwrap(), 5);
        assert_eq!(
            scale2(i64::MAX, 2_000_000, 1_000_000),
            Err(CostError::Overflow)
        );
    }

    #[test]
    fn overflow_is_an_error() {
        let t = PriceTable::resolve(listed(1_000_000.0, 1.0), &[], false);
        let c = Counts {
            prompt: 999_999_999_999,
            ..Counts::default()
        };
        assert_eq!(t.cost_pusd(&c), Err(CostError::Overflow));
    }
}
