//! Token estimation without a tokenizer.
//!
//! A single pass over the text classifies characters into runs (ASCII words, digits, whitespace,
//! punctuation, CJK ideographs, kana, hangul, other scripts, emoji) and charges each run by a
//! per-encoding rate. The rates are calibrated against tiktoken's `cl100k_base` and
//! `o200k_base`.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

/// Which tokenizer family the estimate imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Cl100k,
    O200k,
}

impl Encoding {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "cl100k" | "cl100k_base" => Some(Self::Cl100k),
            "o200k" | "o200k_base" => Some(Self::O200k),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Digit,
    Space,
    Punct,
    Cjk,
    Kana,
    Hangul,
    OtherLetter,
    Emoji,
}

#[inline]
fn classify(c: char) -> Class {
    if c.is_ascii() {
        if c.is_ascii_alphabetic() {
            Class::Letter
        } else if c.is_ascii_digit() {
            Class::Digit
        } else if c.is_ascii_whitespace() {
            Class::Space
        } else {
            Class::Punct
        }
    } else {
        let u = c as u32;
        match u {
            0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2FFFF | 0xF900..=0xFAFF => Class::Cjk,
            0x3040..=0x30FF | 0x31F0..=0x31FF => Class::Kana,
            0xAC00..=0xD7AF | 0x1100..=0x11FF | 0x3130..=0x318F => Class::Hangul,
            0x3000..=0x303F | 0xFF00..=0xFFEF | 0x2000..=0x206F => Class::Punct,
            0x1F000..=0x1FAFF | 0x2600..=0x27BF => Class::Emoji,
            _ if c.is_whitespace() => Class::Space,
            _ if c.is_alphabetic() => Class::OtherLetter,
            _ => Class::Punct,
        }
    }
}

/// Estimated token count of `text` for `enc`.
pub fn estimate_text(text: &str, enc: Encoding) -> u64 {
    // Rates are tokens per character, in thousandths, per class.
    let (cjk, kana, hangul, other, emoji) = match enc {
        Encoding::Cl100k => (1150u64, 1000u64, 1400u64, 450u64, 2500u64),
        Encoding::O200k => (800, 800, 900, 320, 2000),
    };
    let mut milli: u64 = 0;
    let mut word_len: u64 = 0;
    let mut digit_len: u64 = 0;
    let mut prev = Class::Space;
    let flush_word = |len: u64| -> u64 {
        // Short words are one token; long words split every ~6 characters.
        if len == 0 {
            0
        } else {
            1000 + (len.saturating_sub(5) * 1000) / 6
        }
    };
    for c in text.chars() {
        let class = classify(c);
        if class != Class::Letter && word_len > 0 {
            milli += flush_word(word_len);
            word_len = 0;
        }
        if class != Class::Digit && digit_len > 0 {
            milli += digit_len.div_ceil(3) * 1000;
            digit_len = 0;
        }
        match class {
            Class::Letter => word_len += 1,
            Class::Digit => digit_len += 1,
            Class::Space => {
                // A single space attaches to the next word; runs of whitespace cost a token.
                if prev == Class::Space {
                    milli += 250;
                }
            }
            Class::Punct => milli += 700,
            Class::Cjk => milli += cjk,
            Class::Kana => milli += kana,
            Class::Hangul => milli += hangul,
            Class::OtherLetter => milli += other,
            Class::Emoji => milli += emoji,
        }
        prev = class;
    }
    milli += flush_word(word_len);
    milli += digit_len.div_ceil(3) * 1000;
    milli.div_ceil(1000)
}

/// Tokens added per chat message and once per request (OpenAI chat format).
pub const TOKENS_PER_MESSAGE: u64 = 3;
pub const TOKENS_PER_NAME: u64 = 1;
pub const TOKENS_REPLY_PRIMING: u64 = 3;

fn content_tokens(content: &Bound<'_, PyAny>, enc: Encoding) -> PyResult<u64> {
    if let Ok(s) = content.cast::<PyString>() {
        return Ok(estimate_text(&s.to_cow()?, enc));
    }
    if content.is_none() {
        return Ok(0);
    }
    if let Ok(parts) = content.cast::<PyList>() {
        let mut total = 0u64;
        for part in parts.iter() {
            if let Ok(s) = part.cast::<PyString>() {
                total += estimate_text(&s.to_cow()?, enc);
            } else if let Ok(d) = part.cast::<PyDict>() {
                if let Some(text) = d.get_item("text")? {
                    if let Ok(s) = text.cast::<PyString>() {
                        total += estimate_text(&s.to_cow()?, enc);
                    }
                }
            }
        }
        return Ok(total);
    }
    Err(PyTypeError::new_err(format!(
        "message content must be str, list or None, not {}",
        content.get_type().name()?
    )))
}

fn parse_encoding(encoding: &str) -> PyResult<Encoding> {
    Encoding::parse(encoding).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown encoding {encoding:?}; expected 'cl100k' or 'o200k'"
        ))
    })
}

/// Estimate the tokens of one string.
#[pyfunction]
#[pyo3(name = "estimate_text", signature = (text, encoding = "cl100k"))]
fn py_estimate_text(py: Python<'_>, text: &Bound<'_, PyString>, encoding: &str) -> PyResult<u64> {
    let enc = parse_encoding(encoding)?;
    let s = text.to_cow()?;
    if s.len() > 4096 {
        let owned: &str = &s;
        Ok(py.detach(|| estimate_text(owned, enc)))
    } else {
        Ok(estimate_text(&s, enc))
    }
}

/// Estimate the prompt tokens of a chat message list, with the per-message overhead.
#[pyfunction]
#[pyo3(name = "estimate_messages", signature = (messages, encoding = "cl100k"))]
fn py_estimate_messages(messages: &Bound<'_, PyList>, encoding: &str) -> PyResult<u64> {
    let enc = parse_encoding(encoding)?;
    let mut total = 0u64;
    for msg in messages.iter() {
        let d = msg.cast::<PyDict>().map_err(|_| {
            PyTypeError::new_err(format!(
                "each message must be a dict, not {}",
                msg.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        total += TOKENS_PER_MESSAGE;
        if let Some(content) = d.get_item("content")? {
            total += content_tokens(&content, enc)?;
        }
        if let Some(role) = d.get_item("role")? {
            if let Ok(s) = role.cast::<PyString>() {
                total += estimate_text(&s.to_cow()?, enc);
            }
        }
        if let Some(name) = d.get_item("name")? {
            if let Ok(s) = name.cast::<PyString>() {
                total += TOKENS_PER_NAME + estimate_text(&s.to_cow()?, enc);
            }
        }
    }
    Ok(total + TOKENS_REPLY_PRIMING)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(py_estimate_text, m)?)?;
    m.add_function(wrap_pyfunction!(py_estimate_messages, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_zero() {
        assert_eq!(estimate_text("", Encoding::Cl100k), 0);
    }

    #[test]
    fn monotone_in_appended_text() {
        let base = "Hello world, this is a test.";
        let longer = format!("{base} And some more words here.");
        assert!(estimate_text(&longer, Encoding::Cl100k) >= estimate_text(base, Encoding::Cl100k));
    }

    #[test]
    fn english_is_close_to_word_count() {
        // "The quick brown fox jumps over the lazy dog." is 10 tokens in cl100k_base.
        let n = estimate_text(
            "The quick brown fox jumps over the lazy dog.",
            Encoding::Cl100k,
        );
        assert!((9..=11).contains(&n), "{n}");
    }
}
