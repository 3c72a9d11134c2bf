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
//! price where the model has one). Long-context tiers switch the input and output prices when
//! the prompt is above their threshold.

use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::prelude::*;

use crate::usage::Usage;

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

/// One model's prices, in pico-USD per token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceTable {
    pub input: i64,
    pub output: i64,
    pub cache_read: i64,
    pub cache_write: i64,
    pub cache_write_1h: i64,
    pub reasoning: i64,
    /// Long-context tiers, ascending by threshold.
    pub tiers: Vec<Tier>,
}

/// Prices above a prompt-size threshold; cache prices fall back to the base ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tier {
    pub above: u64,
    pub input: i64,
    pub output: i64,
    pub cache_read: Option<i64>,
    pub cache_write: Option<i64>,
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
        let (mut input, mut output) = (self.input, self.output);
        let (mut cache_read, mut cache_write) = (self.cache_read, self.cache_write);
        for t in &self.tiers {
            if c.prompt > t.above {
                input = t.input;
                output = t.output;
                cache_read = t.cache_read.unwrap_or(self.cache_read);
                cache_write = t.cache_write.unwrap_or(self.cache_write);
            }
        }
        let terms: [(u64, i64); 6] = [
            (c.prompt - c.cache_read - c.cache_write, input),
            (c.cache_read, cache_read),
            (c.cache_write - c.cache_write_1h, cache_write),
            (c.cache_write_1h, self.cache_write_1h),
            (c.completion - c.reasoning, output),
            (c.reasoning, self.reasoning),
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

/// A model's prices (USD per 1M tokens), turned once into exact integers.
#[pyclass(frozen, module = "llmtally._core", name = "Prices")]
pub struct Prices {
    table: PriceTable,
    usd: [f64; 6],
}

fn price(name: &str, v: f64) -> PyResult<i64> {
    pusd_per_token(v).map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

#[pymethods]
impl Prices {
    /// `cache_read_price` defaults to the input price, `cache_write_price` to the input price,
    /// `cache_write_1h_price` to the cache-write price, `reasoning_price` to the output price.
    #[new]
    #[pyo3(signature = (
        input_price, output_price, cache_read_price=None, cache_write_price=None,
        cache_write_1h_price=None, reasoning_price=None, tiers=None
    ))]
    fn py_new(
        input_price: f64,
        output_price: f64,
        cache_read_price: Option<f64>,
        cache_write_price: Option<f64>,
        cache_write_1h_price: Option<f64>,
        reasoning_price: Option<f64>,
        tiers: Option<Vec<Vec<Option<f64>>>>,
    ) -> PyResult<Self> {
        let cache_read_price = cache_read_price.unwrap_or(input_price);
        let cache_write_price = cache_write_price.unwrap_or(input_price);
        let cache_write_1h_price = cache_write_1h_price.unwrap_or(cache_write_price);
        let reasoning_price = reasoning_price.unwrap_or(output_price);
        let mut tier_table = Vec::new();
        for t in tiers.unwrap_or_default() {
            if !(3..=5).contains(&t.len()) {
                return Err(PyValueError::new_err(
                    "a tier is (above_prompt_tokens, input_price, output_price[, cache_read_price[, \
                     cache_write_price]])",
                ));
            }
            let (Some(above), Some(i), Some(o)) = (t[0], t[1], t[2]) else {
                return Err(PyValueError::new_err(
                    "a tier's threshold and prices are required",
                ));
            };
            if above < 0.0 || above.fract() != 0.0 || !above.is_finite() {
                return Err(PyValueError::new_err(
                    "a tier's threshold must be an int >= 0",
                ));
            }
            let optional = |k: usize, name: &str| -> PyResult<Option<i64>> {
                t.get(k)
                    .copied()
                    .flatten()
                    .map(|v| price(name, v))
                    .transpose()
            };
            tier_table.push(Tier {
                above: above as u64,
                input: price("tier input_price", i)?,
                output: price("tier output_price", o)?,
                cache_read: optional(3, "tier cache_read_price")?,
                cache_write: optional(4, "tier cache_write_price")?,
            });
        }
        tier_table.sort_by_key(|t| t.above);
        Ok(Self {
            table: PriceTable {
                input: price("input_price", input_price)?,
                output: price("output_price", output_price)?,
                cache_read: price("cache_read_price", cache_read_price)?,
                cache_write: price("cache_write_price", cache_write_price)?,
                cache_write_1h: price("cache_write_1h_price", cache_write_1h_price)?,
                reasoning: price("reasoning_price", reasoning_price)?,
                tiers: tier_table,
            },
            usd: [
                input_price,
                output_price,
                cache_read_price,
                cache_write_price,
                cache_write_1h_price,
                reasoning_price,
            ],
        })
    }

    /// Cost in pico-USD of explicit counts (subsets inside their whole).
    #[pyo3(signature = (
        prompt_tokens=0, completion_tokens=0, cached_tokens=0, cache_write_tokens=0,
        cache_write_1h_tokens=0, reasoning_tokens=0
    ))]
    fn cost_pusd(
        &self,
        prompt_tokens: u64,
        completion_tokens: u64,
        cached_tokens: u64,
        cache_write_tokens: u64,
        cache_write_1h_tokens: u64,
        reasoning_tokens: u64,
    ) -> PyResult<i64> {
        self.compute(&Counts {
            prompt: prompt_tokens,
            completion: completion_tokens,
            cache_read: cached_tokens,
            cache_write: cache_write_tokens,
            cache_write_1h: cache_write_1h_tokens,
            reasoning: reasoning_tokens,
        })
    }

    /// Cost in pico-USD of a normalized `Usage` (`None` when its split is unknown).
    fn usage_cost_pusd(&self, usage: &Usage) -> PyResult<Option<i64>> {
        let (Some(prompt), Some(completion)) = (usage.prompt_tokens, usage.completion_tokens)
        else {
            return Ok(None);
        };
        self.compute(&Counts {
            prompt,
            completion,
            cache_read: usage.cached_tokens,
            cache_write: usage.cache_write_tokens,
            cache_write_1h: usage.cache_write_1h_tokens,
            reasoning: usage.reasoning_tokens,
        })
        .map(Some)
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
}

impl Prices {
    /// Cost of a usage with a known split; `None` when the split is unknown or the counts
    /// are inconsistent (the Python side reports that).
    pub(crate) fn usage_cost(&self, u: &Usage) -> Option<i64> {
        let (Some(prompt), Some(completion)) = (u.prompt_tokens, u.completion_tokens) else {
            return None;
        };
        self.table
            .cost_pusd(&Counts {
                prompt,
                completion,
                cache_read: u.cached_tokens,
                cache_write: u.cache_write_tokens,
                cache_write_1h: u.cache_write_1h_tokens,
                reasoning: u.reasoning_tokens,
            })
            .ok()
    }

    fn compute(&self, c: &Counts) -> PyResult<i64> {
        self.table.cost_pusd(c).map_err(|e| match e {
            CostError::Inconsistent(m) => PyValueError::new_err(m),
            CostError::Overflow => PyOverflowError::new_err(
                "cost exceeds the 64-bit pico-USD range (about 9.2M USD); refused",
            ),
        })
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Prices>()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(input: f64, output: f64) -> PriceTable {
        PriceTable {
            input: pusd_per_token(input).unwrap(),
            output: pusd_per_token(output).unwrap(),
            cache_read: pusd_per_token(input / 10.0).unwrap(),
            cache_write: pusd_per_token(input * 1.25).unwrap(),
            cache_write_1h: pusd_per_token(input * 2.0).unwrap(),
            reasoning: pusd_per_token(output).unwrap(),
            tiers: vec![],
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
        let mut t = table(2.5, 10.0);
        t.cache_read = pusd_per_token(1.25).unwrap();
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
    fn tiers_switch_prices_above_the_threshold() {
        let mut t = table(1.25, 10.0);
        t.tiers = vec![Tier {
            above: 200_000,
            input: pusd_per_token(2.5).unwrap(),
            output: pusd_per_token(15.0).unwrap(),
            cache_read: None,
            cache_write: None,
        }];
        let small = Counts {
            prompt: 200_000,
            completion: 1,
            ..Counts::default()
        };
        let large = Counts {
            prompt: 200_001,
            completion: 1,
            ..Counts::default()
        };
        assert_eq!(
            t.cost_pusd(&small).unwrap(),
            200_000 * 1_250_000 + 10_000_000
        );
        assert_eq!(
            t.cost_pusd(&large).unwrap(),
            200_001 * 2_500_000 + 15_000_000
        );
    }

    #[test]
    fn overflow_is_an_error() {
        let t = table(1_000_000.0, 1.0);
        let c = Counts {
            prompt: 999_999_999_999,
            ..Counts::default()
        };
        assert_eq!(t.cost_pusd(&c), Err(CostError::Overflow));
    }
}
