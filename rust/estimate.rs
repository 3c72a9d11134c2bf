//! Token estimation without a tokenizer.
//!
//! tiktoken first cuts text into pieces with a regex (the pre-tokenizer) and then runs BPE inside
//! each piece, so a token never spans two pieces. The estimator reproduces the pre-tokenizer of
//! `cl100k_base` / `o200k_base` exactly (contractions, letter runs with one leading character,
//! groups of up to three digits, punctuation runs with trailing newlines, whitespace runs), and
//! replaces BPE by a cost per piece: a word that is a token of the vocabulary (or a prefix of
//! one) costs one listed word; other letters, combining marks and repeated punctuation cost by
//! their context (the character, the one before it and the position, back-off to the class);
//! everything else is a sum of calibrated, non-negative features of the character's class and
//! position in the piece. The costs are fitted against tiktoken by
//! `scripts/calibrate_estimator.py` and live in `estimate_coef.rs` (features, fixed point) and
//! `estimate_vocab/` (word lists, context costs).
//!
//! Because every cost is non-negative, a piece never gets cheaper as it grows, and a character
//! that joins the next piece (a space or a bracket before a word) keeps the cost it had alone,
//! the estimate never decreases when text is appended.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};
use std::borrow::Cow;
use std::cell::Cell;
use std::sync::OnceLock;

#[path = "estimate_coef.rs"]
mod coef;

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

    fn costs(self) -> &'static [u32; N_FEATURES] {
        match self {
            Self::Cl100k => &coef::CL100K,
            Self::O200k => &coef::O200K,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Features. Each piece adds the costs of the features it emits; the layout is shared with the
// calibration script through `_estimate_feature_names()`.

/// Letter classes (scripts; ASCII split by case).
const L_ASCII_LOWER: usize = 0;
const L_ASCII_UPPER: usize = 1;
const L_LATIN_EXT: usize = 2;
const L_CYRILLIC: usize = 3;
const L_GREEK: usize = 4;
const L_ARABIC: usize = 5;
const L_HEBREW: usize = 6;
const L_HAN: usize = 7;
const L_HIRAGANA: usize = 8;
const L_KATAKANA: usize = 9;
const L_HANGUL: usize = 10;
const L_OTHER: usize = 11;
const L_DEVANAGARI: usize = 12;
const L_BENGALI: usize = 13;
const L_GURMUKHI: usize = 14;
const L_GUJARATI: usize = 15;
const L_ORIYA: usize = 16;
const L_TAMIL: usize = 17;
const L_TELUGU: usize = 18;
const L_KANNADA: usize = 19;
const L_MALAYALAM: usize = 20;
const L_SINHALA: usize = 21;
const L_THAI: usize = 22;
const L_LAO: usize = 23;
const L_TIBETAN: usize = 24;
const L_MYANMAR: usize = 25;
const L_GEORGIAN: usize = 26;
const L_ARMENIAN: usize = 27;
const L_ETHIOPIC: usize = 28;
const L_KHMER: usize = 29;
const N_LETTER: usize = 30;
const LETTER_NAMES: [&str; N_LETTER] = [
    "ascii_lower",
    "ascii_upper",
    "latin_ext",
    "cyrillic",
    "greek",
    "arabic",
    "hebrew",
    "han",
    "hiragana",
    "katakana",
    "hangul",
    "other_letter",
    "devanagari",
    "bengali",
    "gurmukhi",
    "gujarati",
    "oriya",
    "tamil",
    "telugu",
    "kannada",
    "malayalam",
    "sinhala",
    "thai",
    "lao",
    "tibetan",
    "myanmar",
    "georgian",
    "armenian",
    "ethiopic",
    "khmer",
];

/// What precedes the letters of a word piece.
const PREFIX_NONE: usize = 0;
const PREFIX_SPACE: usize = 1;
const PREFIX_OTHER: usize = 2;
const N_PREFIX: usize = 3;
const PREFIX_NAMES: [&str; N_PREFIX] = ["none", "space", "other"];

/// Punctuation and symbol classes (anything that is not a letter, number or whitespace).
const P_BRACKET: usize = 0; // ( ) [ ] { } < > " ' `
const P_SENTENCE: usize = 1; // . , ; : ! ?
const P_OPERATOR: usize = 2; // other ASCII
const P_SYM2: usize = 3; // two-byte UTF-8 symbols and marks
const P_GENERAL: usize = 4; // general punctuation, U+2000-206F
const P_CJK: usize = 5; // CJK and full-width punctuation
const P_EMOJI: usize = 6; // four-byte pictographs
const P_JOINER: usize = 7; // ZWJ, variation selectors, skin tones, keycap, tags
const P_SYM3: usize = 8; // other three-byte symbols
const P_SYM4: usize = 9; // other four-byte symbols
const P_NEWLINE: usize = 10; // newlines ending a punctuation run
const N_PUNCT: usize = 11;
const PUNCT_NAMES: [&str; N_PUNCT] = [
    "bracket", "sentence", "operator", "sym2", "general", "cjk", "emoji", "joiner", "sym3", "sym4",
    "newline",
];

/// Whitespace classes.
const W_SPACE: usize = 0;
const W_TAB: usize = 1;
const W_NEWLINE: usize = 2;
const W_OTHER: usize = 3;
const N_WS: usize = 4;
const WS_NAMES: [&str; N_WS] = ["space", "tab", "newline", "other"];

/// Positions kept apart inside punctuation and whitespace runs (0..PUNCT_POS).
const PUNCT_POS: usize = 9;
const WS_POS: usize = 9;

const F_WORD_FIRST: usize = 0; // [prefix][letter class]
const F_HUMP: usize = F_WORD_FIRST + N_PREFIX * N_LETTER; // a camelCase segment (cl100k)
const F_CONTRACTION: usize = F_HUMP + 1; // 's 't 're 've 'm 'll 'd, after the apostrophe
const F_DIGITS: usize = F_CONTRACTION + 1; // one group of up to three digits
const F_NUM_OTHER: usize = F_DIGITS + 1; // each non-ASCII numeric character of a group
const F_PUNCT: usize = F_NUM_OTHER + 1; // [punct class][pos]
const F_PUNCT_SP: usize = F_PUNCT + N_PUNCT * PUNCT_POS; // [punct class], first after a space
const F_WS: usize = F_PUNCT_SP + N_PUNCT; // [ws class][pos in segment]
const F_VOCAB: usize = F_WS + N_WS * WS_POS; // [prefix]: a listed word
pub const N_FEATURES: usize = F_VOCAB + N_PREFIX;

/// Buckets of the position in a run of a repeated punctuation character: 1, 2, 3, 4-7, 8-15,
/// 16-31, 32-63, 64-127, 128-255, 256 and later. A repeated character is costed by its context
/// (the character and its bucket, back-off to ASCII or not and the bucket).
const N_REPEAT: usize = 10;

#[inline(always)]
fn repeat_bucket(pos: usize) -> usize {
    if pos < 4 {
        pos - 1
    } else {
        ((usize::BITS - pos.leading_zeros()) as usize).min(N_REPEAT - 1)
    }
}

/// Fixed-point scale of the costs: 1 token = 2^SCALE_BITS.
const SCALE_BITS: u32 = coef::SCALE_BITS;

/// Human-readable feature names, indexed like the cost tables.
pub fn feature_names() -> Vec<String> {
    let mut names = Vec::with_capacity(N_FEATURES);
    for p in PREFIX_NAMES {
        for l in LETTER_NAMES {
            names.push(format!("word_first[{p}][{l}]"));
        }
    }
    names.push("hump".to_owned());
    names.push("contraction".to_owned());
    names.push("digits".to_owned());
    names.push("num_other".to_owned());
    for c in PUNCT_NAMES {
        for pos in 0..PUNCT_POS {
            names.push(format!("punct[{c}][{pos}]"));
        }
    }
    for c in PUNCT_NAMES {
        names.push(format!("punct_after_space[{c}]"));
    }
    for w in WS_NAMES {
        for pos in 0..WS_POS {
            names.push(format!("ws[{w}][{pos}]"));
        }
    }
    for p in PREFIX_NAMES {
        names.push(format!("vocab[{p}]"));
    }
    names
}

// ---------------------------------------------------------------------------------------------
// Word lists. A word that is one token of the vocabulary is one token whatever its length, which
// per-character costs cannot tell from a rare word of the same length. Each encoding ships every
// token of its vocabulary made of letters only (`\p{L}`, and `\p{M}` for o200k), with or without
// a leading space, in every script (estimate_vocab/*.words, written by
// scripts/calibrate_estimator.py). A word costs `vocab[prefix]` when it is one of them *or a
// prefix of one*: that set is closed under prefixes, so a growing word can leave it but never
// come back, and the estimate stays monotone.
//
// The file is the sorted list, front-coded: per word, the number of leading bytes it shares with
// the previous word, the number of bytes that follow, then those bytes. Only 16-bit fingerprints
// of the hashes of every prefix (in characters) are kept in memory. The hash runs over code
// points, one multiplication per character, so the scanner hashes a word as it decodes it.

const VOCAB_CL100K: &[u8] = include_bytes!("estimate_vocab/cl100k.words");
const VOCAB_O200K: &[u8] = include_bytes!("estimate_vocab/o200k.words");
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const FNV_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// The hash of a word (with what precedes it) after one more character.
#[inline(always)]
fn hash_char(h: u64, c: u32) -> u64 {
    (h ^ u64::from(c)).wrapping_mul(FNV_PRIME)
}

/// Set of 16-bit fingerprints of word (and word prefix) hashes, in buckets of half a cache line:
/// a lookup compares the 16 fingerprints of its bucket at once (vectorised, no branch per slot),
/// and reads the next bucket only when its own is full. The buckets are cut in regions by the
/// block of the word's first letter (`word_group`), so that the words of one script are looked
/// up in a part of the set about the size of that script's share of it: a few kilobytes for most
/// scripts, which stay in cache, instead of megabytes. The ASCII words are the largest region
/// (about 1 MB, half of what 32-bit fingerprints took: English and code words that miss the
/// cache are looked up in it often). A word that is not listed matches a fingerprint of its
/// bucket (about 8 of the 15-bit values) about once in 4,000 words: it then costs a listed
/// word, an error well below the estimator's.
struct Vocab {
    /// First bucket and number of buckets of each group.
    groups: [(u32, u32); N_WORD_GROUPS],
    buckets: Vec<Bucket>,
}

const BUCKET: usize = 16;
const N_WORD_GROUPS: usize = 0x62 + 0x40;

/// The region of the word list of words whose first letter is `c`: blocks of 128 code points
/// below U+3100 (the alphabets), of 4096 above.
#[inline(always)]
fn word_group(c: u32) -> usize {
    if c < 0x3100 {
        (c >> 7) as usize
    } else {
        0x62 + (c >> 12).min(0x3F) as usize
    }
}

#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Bucket([u16; BUCKET]);

impl Vocab {
    fn build(raw: &[u8], o200k: bool) -> Self {
        // Every prefix of a word is a key: as many keys as characters not shared with the word
        // before. `ends` holds the end (in bytes) and the hash of each character of the word.
        // A key goes to the group of the word's first letter (after a leading space or other
        // character that is not a letter); a prefix without a letter is never looked up.
        let is_letter = |ch: char| {
            let c = u32::from(ch);
            let cat = if c < 0x80 {
                ASCII_CATS[c as usize]
            } else {
                non_ascii_cat(c)
            };
            matches!(cat, Cat::Letter(..)) || (o200k && matches!(cat, Cat::Mark(..)))
        };
        let mut keys = Vec::new();
        let mut word: Vec<u8> = Vec::new();
        let mut ends: Vec<(usize, u64)> = Vec::new();
        let mut i = 0;
        while i + 1 < raw.len() {
            let shared = usize::from(raw[i]);
            let len = usize::from(raw[i + 1]);
            let Some(bytes) = raw.get(i + 2..i + 2 + len) else {
                break;
            };
            word.truncate(shared);
            word.extend_from_slice(bytes);
            i += 2 + len;
            while ends.last().is_some_and(|&(end, _)| end > shared) {
                ends.pop();
            }
            let (mut at, mut h) = ends.last().copied().unwrap_or((0, FNV_SEED));
            let Ok(text) = std::str::from_utf8(&word) else {
                ends.clear();
                continue;
            };
            let (Some(first), Some(rest)) = (text.chars().next(), text.get(at..)) else {
                ends.clear();
                continue;
            };
            let lead = if is_letter(first) {
                Some(first)
            } else {
                text.chars().nth(1)
            };
            let group = lead.map(|c| word_group(u32::from(c)));
            for ch in rest.chars() {
                h = hash_char(h, u32::from(ch));
                at += ch.len_utf8();
                ends.push((at, h));
                match group {
                    Some(g) if at > first.len_utf8() || is_letter(first) => keys.push((g, h)),
                    _ => {}
                }
            }
        }
        Self::new(&keys)
    }

    fn get(enc: Encoding) -> &'static Self {
        static CL100K: OnceLock<Vocab> = OnceLock::new();
        static O200K: OnceLock<Vocab> = OnceLock::new();
        match enc {
            Encoding::Cl100k => CL100K.get_or_init(|| Self::build(VOCAB_CL100K, false)),
            Encoding::O200k => O200K.get_or_init(|| Self::build(VOCAB_O200K, true)),
        }
    }

    /// A set of `(group, hash)` keys, about `BUCKET / 2` per bucket in each group.
    fn new(keys: &[(usize, u64)]) -> Self {
        let mut counts = [0usize; N_WORD_GROUPS];
        for &(g, _) in keys {
            counts[g] += 1;
        }
        let mut groups = [(0u32, 0u32); N_WORD_GROUPS];
        let mut total = 0usize;
        for (g, &n) in counts.iter().enumerate() {
            let size = (n * 2).div_ceil(BUCKET).max(1);
            groups[g] = (total as u32, size as u32);
            total += size;
        }
        let mut vocab = Self {
            groups,
            buckets: vec![Bucket([0; BUCKET]); total],
        };
        for &(g, h) in keys {
            vocab.insert(g, h);
        }
        vocab
    }

    /// The first bucket to look in, the end of the group's region and its size, and the
    /// fingerprint.
    #[inline(always)]
    fn slot(&self, group: usize, h: u64) -> (usize, usize, usize, u16) {
        let (start, size) = self.groups[group];
        let (start, size) = (start as usize, size as usize);
        let mixed = h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        let i = start + ((mixed * size as u64) >> 32) as usize;
        (i, start + size, size, (h as u16) | 1)
    }

    fn insert(&mut self, group: usize, h: u64) {
        let (mut i, end, size, fp) = self.slot(group, h);
        loop {
            let bucket = &mut self.buckets[i].0;
            if let Some(free) = bucket.iter().position(|&x| x == 0 || x == fp) {
                bucket[free] = fp;
                return;
            }
            i += 1;
            if i == end {
                i -= size;
            }
        }
    }

    /// Whether the word whose first letter is `first` and hash `h` is listed.
    #[inline(always)]
    fn contains(&self, first: u32, h: u64) -> bool {
        let (mut i, end, size, fp) = self.slot(word_group(first), h);
        loop {
            let bucket = &self.buckets[i].0;
            let hit = bucket.iter().fold(0u16, |hit, &x| hit | u16::from(x == fp)) != 0;
            // A bucket that is not full ends the search whether it holds the key or not: one
            // well-predicted branch, and the answer is data, not control flow.
            if hit | (bucket[BUCKET - 1] == 0) {
                return hit;
            }
            i += 1;
            if i == end {
                i -= size;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Context costs. A letter of a word (and a combining mark in a punctuation run) costs what
// tiktoken's tokens average for it in its context: the character, the two characters before it
// in the word and its position (0, 1, 2, 3 or later; 4 and 5 for a mark opening or continuing a
// punctuation run). The costs are the mean number of token boundaries at and inside such a
// character in the calibration corpus (inside only for the first letter of a word and the first
// mark of a run, whose piece-opening cost is a feature), looked up with back-off: the character
// and both before it, then the one before it, then the character alone, then its letter class.
// estimate_vocab/*.ctx hold them: little-endian records of a 32-bit key and a 16-bit cost in
// 1/2^SCALE_BITS tokens, written by scripts/calibrate_estimator.py.

const CTX_CL100K: &[u8] = include_bytes!("estimate_vocab/cl100k.ctx");
const CTX_O200K: &[u8] = include_bytes!("estimate_vocab/o200k.ctx");
/// Position bucket of a mark that opens a punctuation run, and of one that continues it.
const CTX_MARK_FIRST: u8 = 4;
const CTX_MARK_NEXT: u8 = 5;
/// What stands before the first letter of a cl100k camelCase segment after the first (the
/// prefix kinds are 0 to 2).
const CTX_AFTER_HUMP: u32 = 3;
/// Position bucket of a punctuation character repeating the one before it.
const CTX_REPEAT: u8 = 6;
/// The longest context of a character of the BMP other than ASCII: 2 (the character and the one
/// before it) or 1 (the character alone).
const BMP_LEVEL: u64 = 2;

/// What a context cost depends on.
pub struct Ctx {
    pos: u8,
    c: u32,
    p1: u32,
    p2: u32,
    class: u8,
}

/// A context row for calibration: byte range of the character, position bucket, and the keys
/// from the longest context to the letter class.
type CtxRow = (usize, usize, (u8, [u32; 4]));

/// A piece for calibration: byte range and the features it emits.
type PieceRow = (usize, usize, Vec<u16>);

#[inline(always)]
fn ctx_key(level: u64, pos: u8, v: u64) -> u32 {
    // One multiplication (the key is on the path of every lookup): the top half of the product
    // depends on every bit of the context.
    let h = (v ^ ((level << 3 | u64::from(pos)) << 59)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> 32) as u32 | 1
}

impl Ctx {
    /// A mark opening a punctuation run (or leading a word as its prefix).
    #[inline(always)]
    fn mark_first(c: u32, class: u8) -> Self {
        Self {
            pos: CTX_MARK_FIRST,
            c,
            p1: 0,
            p2: 0,
            class,
        }
    }

    #[inline(always)]
    fn key(&self, level: u64) -> u32 {
        let v = match level {
            3 => u64::from(self.c) | u64::from(self.p1) << 21 | u64::from(self.p2) << 42,
            2 => u64::from(self.c) | u64::from(self.p1) << 21,
            1 => u64::from(self.c),
            _ => u64::from(self.class),
        };
        ctx_key(level, self.pos, v)
    }

    /// Whether the cost is read from the dense ASCII table (`CtxTable::ascii`), which stops at the
    /// character and the one before it.
    #[inline(always)]
    fn is_ascii(&self) -> bool {
        self.c < 128 && self.p1 < 128 && self.pos < 4
    }

    /// Whether the cost is read from the dense table of repeated ASCII characters.
    #[inline(always)]
    fn is_ascii_repeat(&self) -> bool {
        self.pos == CTX_REPEAT && self.c & 0xFF_FFFF < 128
    }

    /// The keys from the longest context to the letter class; the contexts read from a dense
    /// table have no longer one than the character and the one before it.
    fn keys(&self) -> (u8, [u32; 4]) {
        let longest = if self.is_ascii() || self.is_ascii_repeat() {
            2
        } else if self.is_bmp() {
            BMP_LEVEL
        } else if self.pos < CTX_REPEAT {
            1
        } else {
            3
        };
        (
            self.pos,
            [
                self.key(longest),
                self.key(longest.min(2)),
                self.key(1),
                self.key(0),
            ],
        )
    }

    /// Whether the character is in the BMP (and not a repeat): its cost is read from a dense
    /// table of the character alone, after a probe for the context of `BMP_LEVEL`.
    #[inline(always)]
    fn is_bmp(&self) -> bool {
        self.c < 0x1_0000 && self.pos < CTX_REPEAT
    }
}

/// Map from context keys to costs, and two dense tables resolved down to the class:
/// ASCII letters after an ASCII character (or none), by position, previous character and
/// character, and repeated ASCII punctuation, by bucket and character; so that an ASCII letter or
/// a repeated ASCII character needs one array read (and no context longer than two characters).
///
/// The map keeps the keys and their costs in buckets of a cache line, about 4 keys to a bucket
/// of 8: a lookup reads one cache line, compares its keys at once and selects the cost, with no
/// branch on the answer (the next bucket is read only when the first is full). The Hangul and
/// ideographic blocks, whose characters are costed here by the character before them, look up
/// every character in it (about 1 MB for o200k). Keys are kept whole: a fingerprint of 16 bits
/// (half the size) mistook or dropped enough contexts to move the error of a script (Malayalam,
/// o200k) by half a point.
struct CtxTable {
    /// Number of buckets minus one (a power of two).
    mask: usize,
    buckets: Vec<CtxBucket>,
    ascii: Vec<u16>,
    repeat: Vec<u16>,
    bmp: Vec<u16>,
    /// Letters and marks of the alphabets (below U+3100, and U+10000 to U+11FFF) by row: a
    /// block of 256 code points and the character before (a prefix kind, an ASCII letter or a
    /// character of the same block); each row holds the costs of the block's 256 characters
    /// after that one at each position (0 to 5), resolved as `cost` would, built the first time
    /// it is needed. A letter then costs one read, from the few rows its script uses, instead of
    /// a hash and a probe in the whole table.
    rows: Box<[OnceLock<Box<[u16]>>]>,
}

const CTX_BUCKET: usize = 8;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CtxBucket {
    /// The keys (never 0: keys are odd), 0 for a free slot.
    keys: [u32; CTX_BUCKET],
    costs: [u16; CTX_BUCKET],
}

impl CtxBucket {
    /// The cost of `key` if it is here (else 0), and whether it is.
    #[inline(always)]
    fn find(&self, key: u32) -> (u16, bool) {
        let mut cost = 0u16;
        let mut hit = 0u16;
        for (&k, &c) in self.keys.iter().zip(&self.costs) {
            let m = u16::from(k == key).wrapping_neg();
            cost |= c & m;
            hit |= m;
        }
        (cost, hit != 0)
    }

    #[inline(always)]
    fn is_full(&self) -> bool {
        self.keys[CTX_BUCKET - 1] != 0
    }
}

/// Blocks of 256 code points with rows of costs (the alphabets, up to kana); the large
/// ideographic and Hangul syllable blocks are looked up in the hash table.
const ROW_BLOCKS: u32 = 0x31;
/// Blocks of the SMP with rows too (U+10000 to U+11FFF: historic and minority alphabets), after
/// those of the BMP.
const ROW_SMP_BLOCKS: u32 = 0x20;

/// The place of `block` among the blocks with rows, if it has some.
#[inline(always)]
fn row_block(block: u32) -> Option<usize> {
    if block < ROW_BLOCKS {
        Some(block as usize)
    } else if block.wrapping_sub(0x100) < ROW_SMP_BLOCKS {
        Some((ROW_BLOCKS + block - 0x100) as usize)
    } else {
        None
    }
}

/// Rows per block and position: the character before is a prefix kind (0 to 3), an ASCII letter
/// or in the block.
const ROW_PREV: usize = 4 + 52 + 256;
/// Positions with rows: letters (0 to 3) and marks in punctuation runs (4, 5).
const ROW_POS: usize = CTX_REPEAT as usize;

/// Row of the character before, when it is a prefix kind or ASCII: kinds 0 to 3, then letters.
const ASCII_ROW: [u8; 128] = {
    let mut t = [u8::MAX; 128];
    let mut i = 0;
    while i < 4 {
        t[i] = i as u8;
        i += 1;
    }
    let mut k = 0;
    while k < 26 {
        t[b'A' as usize + k] = (4 + k) as u8;
        t[b'a' as usize + k] = (30 + k) as u8;
        k += 1;
    }
    t
};

impl CtxTable {
    fn build(raw: &[u8]) -> Self {
        let n = raw.len() / 6;
        let size = (n * 2).div_ceil(CTX_BUCKET).next_power_of_two();
        let empty = CtxBucket {
            keys: [0; CTX_BUCKET],
            costs: [0; CTX_BUCKET],
        };
        let mut table = Self {
            mask: size - 1,
            buckets: vec![empty; size],
            ascii: Vec::new(),
            repeat: Vec::new(),
            bmp: Vec::new(),
            rows: (0..(ROW_BLOCKS + ROW_SMP_BLOCKS) as usize * ROW_PREV)
                .map(|_| OnceLock::new())
                .collect(),
        };
        for rec in raw.chunks_exact(6) {
            let key = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) | 1;
            let cost = u16::from_le_bytes([rec[4], rec[5]]);
            table.insert(key, cost);
        }
        let mut ascii = vec![0; 4 * 128 * 128];
        for pos in 0..4u8 {
            for p1 in 0..128u32 {
                for c in 0..128u32 {
                    let class = match c as u8 {
                        b'a'..=b'z' => L_ASCII_LOWER,
                        b'A'..=b'Z' => L_ASCII_UPPER,
                        _ => continue,
                    };
                    let ctx = Ctx {
                        pos,
                        c,
                        p1,
                        p2: 0,
                        class: class as u8,
                    };
                    ascii[Self::ascii_index(&ctx)] = table.resolve(&ctx, 2);
                }
            }
        }
        table.ascii = ascii;
        let mut repeat = vec![0; N_REPEAT << 7];
        for bucket in 0..N_REPEAT as u32 {
            for c in 0..128u32 {
                let ctx = Ctx {
                    pos: CTX_REPEAT,
                    c: c | bucket << 24,
                    p1: 0,
                    p2: 0,
                    class: bucket as u8,
                };
                repeat[Self::repeat_index(&ctx)] = table.resolve(&ctx, 2);
            }
        }
        table.repeat = repeat;
        // By character, then position: the costs of a character share a cache line.
        let mut bmp = vec![0; 8 << 16];
        for pos in 0..CTX_REPEAT {
            for c in 0..0x1_0000u32 {
                let ctx = Ctx {
                    pos,
                    c,
                    p1: 0,
                    p2: 0,
                    class: letter_class(c) as u8,
                };
                bmp[(c as usize) << 3 | usize::from(pos)] = table.resolve(&ctx, 1);
            }
        }
        table.bmp = bmp;
        table
    }

    #[inline(always)]
    fn repeat_index(ctx: &Ctx) -> usize {
        ((ctx.c >> 24) as usize) << 7 | (ctx.c & 0x7F) as usize
    }

    #[inline(always)]
    fn ascii_index(ctx: &Ctx) -> usize {
        (usize::from(ctx.pos) << 14) | ((ctx.p1 as usize) << 7) | ctx.c as usize
    }

    /// The first bucket of `key`.
    #[inline(always)]
    fn home(&self, key: u32) -> usize {
        key.rotate_right(16) as usize & self.mask
    }

    fn insert(&mut self, key: u32, cost: u16) {
        let mut i = self.home(key);
        loop {
            let bucket = &mut self.buckets[i];
            if let Some(free) = bucket.keys.iter().position(|&k| k == 0 || k == key) {
                bucket.keys[free] = key;
                bucket.costs[free] = cost;
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    #[inline(always)]
    fn get(&self, key: u32) -> Option<u16> {
        let (cost, hit) = self.find(key);
        hit.then_some(cost)
    }

    /// The cost of `key`, else `fallback`: whether the key is there is data, not a branch.
    #[inline(always)]
    fn get_or(&self, key: u32, fallback: u16) -> u16 {
        let (cost, hit) = self.find(key);
        let m = u16::from(hit).wrapping_neg();
        (cost & m) | (fallback & !m)
    }

    #[inline(always)]
    fn find(&self, key: u32) -> (u16, bool) {
        let mut i = self.home(key);
        loop {
            let bucket = &self.buckets[i];
            let (cost, hit) = bucket.find(key);
            if hit | !bucket.is_full() {
                return (cost, hit);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The cost of the longest context of `ctx` in the table, from `level` down.
    #[inline(always)]
    fn resolve(&self, ctx: &Ctx, level: u64) -> u16 {
        for level in (0..=level).rev() {
            if let Some(c) = self.get(ctx.key(level)) {
                return c;
            }
        }
        0
    }

    /// The cost of a letter of a word or a mark of a punctuation run (position 0 to 5).
    #[inline(always)]
    fn letter_cost(&self, ctx: &Ctx) -> u16 {
        if ctx.is_ascii() {
            return self.ascii[Self::ascii_index(ctx)];
        }
        let block = ctx.c >> 8;
        if let Some(place) = row_block(block) {
            // Selects rather than branches: ASCII and other letters mix in a word.
            let ascii = ASCII_ROW[(ctx.p1 & 0x7F) as usize] as usize;
            let in_block = if ctx.p1 >> 8 == block {
                4 + 52 + (ctx.p1 & 0xFF) as usize
            } else {
                usize::from(u8::MAX)
            };
            let prev = if ctx.p1 < 128 { ascii } else { in_block };
            if prev != usize::from(u8::MAX) {
                let row =
                    self.rows[place * ROW_PREV + prev].get_or_init(|| self.row(block, ctx.p1));
                return row[usize::from(ctx.pos) << 8 | (ctx.c & 0xFF) as usize];
            }
        }
        self.cost(ctx)
    }

    /// The costs of the characters of `block` after `p1`, by position.
    #[cold]
    fn row(&self, block: u32, p1: u32) -> Box<[u16]> {
        let mut row = vec![0; ROW_POS << 8].into_boxed_slice();
        for (i, cost) in row.iter_mut().enumerate() {
            let c = block << 8 | (i & 0xFF) as u32;
            let ctx = Ctx {
                pos: (i >> 8) as u8,
                c,
                p1,
                p2: 0,
                class: letter_class(c) as u8,
            };
            *cost = self.cost(&ctx);
        }
        row
    }

    #[inline(always)]
    fn cost(&self, ctx: &Ctx) -> u16 {
        if ctx.is_ascii() {
            return self.ascii[Self::ascii_index(ctx)];
        }
        if ctx.is_ascii_repeat() {
            return self.repeat[Self::repeat_index(ctx)];
        }
        if ctx.is_bmp() {
            let alone = self.bmp[(ctx.c as usize) << 3 | usize::from(ctx.pos & 7)];
            if BMP_LEVEL >= 2 {
                return self.get_or(ctx.key(2), alone);
            }
            return alone;
        }
        if ctx.pos < CTX_REPEAT {
            // A letter or mark beyond the BMP: the character alone.
            return self.resolve(ctx, 1);
        }
        self.resolve(ctx, 3)
    }

    fn get_for(enc: Encoding) -> &'static Self {
        static CL100K: OnceLock<CtxTable> = OnceLock::new();
        static O200K: OnceLock<CtxTable> = OnceLock::new();
        match enc {
            Encoding::Cl100k => CL100K.get_or_init(|| Self::build(CTX_CL100K)),
            Encoding::O200k => O200K.get_or_init(|| Self::build(CTX_O200K)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Character categories, as the tokenizer regexes see them.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Upper,
    Lower,
    Caseless,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cat {
    /// `\p{L}`: letter class and case.
    Letter(u8, Case),
    /// An ASCII digit.
    Digit,
    /// Another `\p{N}` character.
    NumOther,
    /// `\s` other than `\r` and `\n`, with its class.
    Ws(u8),
    /// `\r` or `\n`.
    Newline,
    /// A combining mark (`\p{M}`): a letter for o200k's word pattern, punctuation otherwise.
    Mark(u8, u8),
    /// Anything else, with its class.
    Punct(u8),
}

const fn ascii_cat(b: u8) -> Cat {
    match b {
        b'a'..=b'z' => Cat::Letter(L_ASCII_LOWER as u8, Case::Lower),
        b'A'..=b'Z' => Cat::Letter(L_ASCII_UPPER as u8, Case::Upper),
        b'0'..=b'9' => Cat::Digit,
        b' ' => Cat::Ws(W_SPACE as u8),
        b'\t' => Cat::Ws(W_TAB as u8),
        0x0b | 0x0c => Cat::Ws(W_OTHER as u8),
        b'\r' | b'\n' => Cat::Newline,
        b'(' | b')' | b'[' | b']' | b'{' | b'}' | b'<' | b'>' | b'"' | b'\'' | b'`' => {
            Cat::Punct(P_BRACKET as u8)
        }
        b'.' | b',' | b';' | b':' | b'!' | b'?' => Cat::Punct(P_SENTENCE as u8),
        _ => Cat::Punct(P_OPERATOR as u8),
    }
}

const ASCII_CATS: [Cat; 128] = {
    let mut t = [Cat::Digit; 128];
    let mut i = 0;
    while i < 128 {
        t[i] = ascii_cat(i as u8);
        i += 1;
    }
    t
};

fn letter_class(c: u32) -> usize {
    match c {
        0x00C0..=0x024F | 0x1E00..=0x1EFF | 0x00AA | 0x00B5 | 0x00BA => L_LATIN_EXT,
        0x0370..=0x03FF | 0x1F00..=0x1FFF => L_GREEK,
        0x0400..=0x052F | 0x1C80..=0x1C8F | 0x2DE0..=0x2DFF | 0xA640..=0xA69F => L_CYRILLIC,
        0x0590..=0x05FF | 0xFB1D..=0xFB4F => L_HEBREW,
        0x0600..=0x06FF | 0x0750..=0x077F | 0x08A0..=0x08FF | 0xFB50..=0xFDFF | 0xFE70..=0xFEFF => {
            L_ARABIC
        }
        0x3040..=0x309F => L_HIRAGANA,
        0x30A0..=0x30FF | 0x31F0..=0x31FF | 0xFF66..=0xFF9F => L_KATAKANA,
        0x3005..=0x3007 | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF => L_HAN,
        0x20000..=0x3FFFF => L_HAN,
        0xAC00..=0xD7AF | 0x1100..=0x11FF | 0x3130..=0x318F | 0xA960..=0xA97F => L_HANGUL,
        0x0900..=0x097F | 0xA8E0..=0xA8FF => L_DEVANAGARI,
        0x0980..=0x09FF => L_BENGALI,
        0x0A00..=0x0A7F => L_GURMUKHI,
        0x0A80..=0x0AFF => L_GUJARATI,
        0x0B00..=0x0B7F => L_ORIYA,
        0x0B80..=0x0BFF => L_TAMIL,
        0x0C00..=0x0C7F => L_TELUGU,
        0x0C80..=0x0CFF => L_KANNADA,
        0x0D00..=0x0D7F => L_MALAYALAM,
        0x0D80..=0x0DFF => L_SINHALA,
        0x0E00..=0x0E7F => L_THAI,
        0x0E80..=0x0EFF => L_LAO,
        0x0F00..=0x0FFF => L_TIBETAN,
        0x1000..=0x109F | 0xA9E0..=0xA9FF | 0xAA60..=0xAA7F => L_MYANMAR,
        0x10A0..=0x10FF | 0x1C90..=0x1CBF | 0x2D00..=0x2D2F => L_GEORGIAN,
        0x0530..=0x058F | 0xFB13..=0xFB17 => L_ARMENIAN,
        0x1200..=0x139F | 0x2D80..=0x2DDF | 0xAB00..=0xAB2F => L_ETHIOPIC,
        0x1780..=0x17FF | 0x19E0..=0x19FF => L_KHMER,
        _ => L_OTHER,
    }
}

fn punct_class(c: u32) -> usize {
    match c {
        0x200D | 0x20E3 | 0xFE00..=0xFE0F | 0x1F3FB..=0x1F3FF | 0xE0000..=0xE007F => P_JOINER,
        0x0080..=0x07FF => P_SYM2,
        0x2000..=0x206F => P_GENERAL,
        0x3000..=0x303F | 0xFF00..=0xFFEF => P_CJK,
        0x1F000..=0x1FAFF => P_EMOJI,
        0x0800..=0xFFFF => P_SYM3,
        _ => P_SYM4,
    }
}

#[inline(always)]
fn non_ascii_cat(c: u32) -> Cat {
    match cat_table().get(c as usize) {
        Some(&cat) => cat,
        None => unicode_cat(c),
    }
}

/// Category of a character from the Unicode tables (general category and White_Space).
fn unicode_cat(c: u32) -> Cat {
    use unicode_general_category::{get_general_category, GeneralCategory as G};
    let Some(ch) = char::from_u32(c) else {
        return Cat::Punct(P_SYM4 as u8);
    };
    if ch.is_whitespace() {
        return match c {
            0x0D | 0x0A => Cat::Newline,
            0x20 => Cat::Ws(W_SPACE as u8),
            0x09 => Cat::Ws(W_TAB as u8),
            _ => Cat::Ws(W_OTHER as u8),
        };
    }
    let class = letter_class(c) as u8;
    match get_general_category(ch) {
        G::UppercaseLetter | G::TitlecaseLetter => Cat::Letter(class, Case::Upper),
        G::LowercaseLetter => Cat::Letter(class, Case::Lower),
        G::ModifierLetter | G::OtherLetter => Cat::Letter(class, Case::Caseless),
        G::NonspacingMark | G::SpacingMark | G::EnclosingMark => {
            Cat::Mark(class, punct_class(c) as u8)
        }
        G::DecimalNumber | G::LetterNumber | G::OtherNumber => Cat::NumOther,
        _ => Cat::Punct(punct_class(c) as u8),
    }
}

/// Categories of the first two planes (the BMP, and the SMP's historic scripts and emoji),
/// computed once.
#[inline(always)]
fn cat_table() -> &'static [Cat] {
    static TABLE: OnceLock<Box<[Cat]>> = OnceLock::new();
    TABLE.get_or_init(|| (0..0x2_0000u32).map(unicode_cat).collect())
}

/// The character starting at byte `i` of valid UTF-8, and its length in bytes.
#[inline(always)]
fn decode(b: &[u8], i: usize) -> (u32, usize) {
    let b0 = b[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (b[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (
            ((b0 & 0x0F) << 12) | ((b[i + 1] as u32 & 0x3F) << 6) | (b[i + 2] as u32 & 0x3F),
            3,
        )
    } else {
        (
            ((b0 & 0x07) << 18)
                | ((b[i + 1] as u32 & 0x3F) << 12)
                | ((b[i + 2] as u32 & 0x3F) << 6)
                | (b[i + 3] as u32 & 0x3F),
            4,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The pre-tokenizer. It walks the text piece by piece exactly as tiktoken's regex does and tells
// a sink which features each piece emits.

trait Sink {
    /// A point to come back to (see `settle`).
    type Mark: Copy;
    fn add(&mut self, feature: usize);
    /// A character costed by its context (table lookup); at byte `start`, `len` bytes long.
    fn ctx(&mut self, ctx: &Ctx, start: usize, len: usize);
    fn piece(&mut self, _start: usize, _end: usize) {}
    fn mark(&self) -> Self::Mark;
    /// When `listed`, replaces what was emitted since `mark` by `feature`. A word's letters are
    /// costed as they are read, before the word list says whether they count.
    fn settle(&mut self, mark: Self::Mark, listed: bool, feature: usize);
    /// For a sink that only sums costs, the tables it sums from: the scanner then costs a word
    /// in one loop (`Scanner::fused_word`) and adds the total with `add_cost`.
    fn tables(&self) -> Option<(&'static CtxTable, &'static [u32; N_FEATURES])> {
        None
    }
    fn add_cost(&mut self, _cost: u64) {}
}

/// Sums the costs of the features: the estimator's hot loop.
/// `FUSED`: words are costed in one loop (`Scanner::fused_word`); the tests check that this
/// sums to the same as the general path.
struct Total<const FUSED: bool = true> {
    costs: &'static [u32; N_FEATURES],
    table: &'static CtxTable,
    sum: u64,
}

impl<const FUSED: bool> Sink for Total<FUSED> {
    type Mark = u64;
    #[inline(always)]
    fn tables(&self) -> Option<(&'static CtxTable, &'static [u32; N_FEATURES])> {
        FUSED.then_some((self.table, self.costs))
    }
    #[inline(always)]
    fn add_cost(&mut self, cost: u64) {
        self.sum += cost;
    }
    #[inline(always)]
    fn mark(&self) -> u64 {
        self.sum
    }
    #[inline(always)]
    fn settle(&mut self, mark: u64, listed: bool, feature: usize) {
        // A select, not a branch: whether a word is listed is hard to predict.
        let keep = u64::from(listed).wrapping_sub(1);
        let listed_sum = mark + u64::from(self.costs[feature]);
        self.sum = (self.sum & keep) | (listed_sum & !keep);
    }
    #[inline(always)]
    fn add(&mut self, feature: usize) {
        self.sum += u64::from(self.costs[feature]);
    }
    #[inline(always)]
    fn ctx(&mut self, ctx: &Ctx, _start: usize, _len: usize) {
        let cost = if ctx.pos < CTX_REPEAT {
            self.table.letter_cost(ctx)
        } else {
            self.table.cost(ctx)
        };
        self.sum += u64::from(cost);
    }
}

/// Records the pieces and their features, for calibration.
struct Pieces {
    out: Vec<(usize, usize, Vec<u16>)>,
    current: Vec<u16>,
    contexts: Vec<CtxRow>,
}

impl Sink for Pieces {
    type Mark = (usize, usize);
    fn mark(&self) -> (usize, usize) {
        (self.current.len(), self.contexts.len())
    }
    fn settle(&mut self, mark: (usize, usize), listed: bool, feature: usize) {
        if listed {
            self.current.truncate(mark.0);
            self.contexts.truncate(mark.1);
            self.current.push(feature as u16);
        }
    }
    fn add(&mut self, feature: usize) {
        self.current.push(feature as u16);
    }
    fn ctx(&mut self, ctx: &Ctx, start: usize, len: usize) {
        self.contexts.push((start, start + len, ctx.keys()));
    }
    fn piece(&mut self, start: usize, end: usize) {
        self.out
            .push((start, end, std::mem::take(&mut self.current)));
    }
}

/// Length of a contraction (`s t re ve m ll d`, any case) starting at byte `i`, after an
/// apostrophe.
#[inline]
fn contraction(b: &[u8], i: usize) -> Option<usize> {
    let lower = |k: usize| b.get(k).map(u8::to_ascii_lowercase);
    match lower(i)? {
        b's' | b't' | b'm' | b'd' => Some(1),
        b'r' | b'v' if lower(i + 1) == Some(b'e') => Some(2),
        b'l' if lower(i + 1) == Some(b'l') => Some(2),
        _ => None,
    }
}

/// Where a segment of a word ends and its hash; the same for the whole word.
struct Segment {
    /// The first letter.
    first: u32,
    end: usize,
    hash: u64,
    word_end: usize,
    word_hash: u64,
}

/// A letter: code point, length in bytes, letter class and case.
type Letter = (u32, usize, u8, Case);

/// `Scanner::ascii_listed`: a listed word adds one (up to `PROBE_MAX`), a word that is not
/// takes `PROBE_MISS` off, and the word list is probed first from `PROBE_AT` on: while more than
/// about three words in four are listed.
const PROBE_AT: u8 = 8;
const PROBE_MAX: u8 = 15;
const PROBE_MISS: u8 = 3;

/// Walks text piece by piece; `O200K` selects o200k's pattern, else cl100k's. `PROBE` (for a
/// text all of ASCII: English and code) lets `fused_word` probe the word list before costing
/// the letters (`probe_ascii`); elsewhere the check and the count it takes cost more than the
/// probe saves, so the other texts run without them.
struct Scanner<'t, const O200K: bool, const PROBE: bool> {
    b: &'t [u8],
    vocab: &'static Vocab,
    /// `cat_table()`, read once per text rather than once per character.
    cats: &'static [Cat],
    /// A saturating count of the last words starting with an ASCII letter that were listed
    /// (`note_ascii`): `listed_ascii` and `probe_ascii` are tried from `PROBE_AT` on.
    ascii_listed: Cell<u8>,
}

impl<const O200K: bool, const PROBE: bool> Scanner<'_, O200K, PROBE> {
    /// Category of the character at byte `i`, its code point and its length.
    #[inline(always)]
    fn cat_at(&self, i: usize) -> (Cat, u32, usize) {
        let b = self.b;
        let x = b[i];
        if x < 0x80 {
            (ASCII_CATS[x as usize], u32::from(x), 1)
        } else {
            let (c, len) = decode(b, i);
            (self.non_ascii_cat(c), c, len)
        }
    }

    #[inline(always)]
    fn non_ascii_cat(&self, c: u32) -> Cat {
        // The Hangul syllables without a table read (`cats_of_hangul` checks that the table
        // agrees): Korean reads a category per syllable. (The ideographs are better left to the
        // table: in Japanese they alternate with kana, and a second test would be mispredicted.)
        if (0xAC00..=0xD7A3).contains(&c) {
            return Cat::Letter(L_HANGUL as u8, Case::Caseless);
        }
        match self.cats.get(c as usize) {
            Some(&cat) => cat,
            None => unicode_cat(c),
        }
    }

    fn run<S: Sink>(&self, sink: &mut S) {
        let b = self.b;
        let n = b.len();
        let mut i = 0;
        while i < n {
            let start = i;
            // The most common piece first: a space and a word.
            if b[i] == b' ' {
                if let Some(letter) = self.letter_at(i + 1) {
                    sink.add(F_WS + W_SPACE * WS_POS);
                    i = self.word(i, i + 1, PREFIX_SPACE, letter, sink);
                    sink.piece(start, i);
                    continue;
                }
            }
            let (cat, c, len) = self.cat_at(i);
            i = match cat {
                Cat::Letter(class, case) => {
                    self.word(i, i, PREFIX_NONE, (c, len, class, case), sink)
                }
                Cat::Mark(class, _) if O200K => {
                    self.word(i, i, PREFIX_NONE, (c, len, class, Case::Caseless), sink)
                }
                Cat::Digit | Cat::NumOther => self.number(i, sink),
                Cat::Newline => self.whitespace(i, sink),
                Cat::Ws(w) => {
                    if let Some(letter) = self.letter_at(i + len) {
                        sink.add(F_WS + usize::from(w) * WS_POS);
                        self.word(i, i + len, PREFIX_SPACE, letter, sink)
                    } else if c == u32::from(b' ')
                        && i + 1 < n
                        && matches!(self.cat_at(i + 1).0, Cat::Punct(_) | Cat::Mark(..))
                    {
                        sink.add(F_WS + W_SPACE * WS_POS);
                        self.punct(i + 1, true, sink)
                    } else {
                        self.whitespace(i, sink)
                    }
                }
                Cat::Punct(p) | Cat::Mark(_, p) => {
                    let p = usize::from(p);
                    let contr = if !O200K && c == u32::from(b'\'') {
                        contraction(b, i + 1)
                    } else {
                        None
                    };
                    if let Some(k) = contr {
                        sink.add(F_PUNCT + p * PUNCT_POS);
                        sink.add(F_CONTRACTION);
                        i + 1 + k
                    } else if let Some(letter) = self.letter_at(i + len) {
                        sink.add(F_PUNCT + p * PUNCT_POS);
                        if let Cat::Mark(class, _) = cat {
                            sink.ctx(&Ctx::mark_first(c, class), i, len);
                        }
                        self.word(i, i + len, PREFIX_OTHER, letter, sink)
                    } else {
                        self.punct(i, false, sink)
                    }
                }
            };
            sink.piece(start, i);
        }
    }

    /// The letter at byte `i`: code point, length, letter class and case (a combining mark is a
    /// caseless letter for o200k).
    #[inline(always)]
    fn letter_at(&self, i: usize) -> Option<Letter> {
        let b = self.b;
        let x = *b.get(i)?;
        if x < 0x80 {
            return match x {
                b'a'..=b'z' => Some((u32::from(x), 1, L_ASCII_LOWER as u8, Case::Lower)),
                b'A'..=b'Z' => Some((u32::from(x), 1, L_ASCII_UPPER as u8, Case::Upper)),
                _ => None,
            };
        }
        let (c, len) = decode(b, i);
        match self.non_ascii_cat(c) {
            Cat::Letter(class, case) => Some((c, len, class, case)),
            Cat::Mark(class, _) if O200K => Some((c, len, class, Case::Caseless)),
            _ => None,
        }
    }

    /// The end of the run of ASCII letters at `start` (o200k: up to a hump, upper-case letters
    /// then lower-case ones) and the word hash `h` carried over it; no letter is costed.
    #[inline(always)]
    fn ascii_run_hash(&self, start: usize, mut h: u64) -> (usize, u64) {
        let b = self.b;
        let n = b.len();
        let mut i = start;
        if O200K {
            while i < n && b[i].is_ascii_uppercase() {
                h = hash_char(h, u32::from(b[i]));
                i += 1;
            }
            while i < n && b[i].is_ascii_lowercase() {
                h = hash_char(h, u32::from(b[i]));
                i += 1;
            }
        } else {
            while i < n && b[i].is_ascii_alphabetic() {
                h = hash_char(h, u32::from(b[i]));
                i += 1;
            }
        }
        (i, h)
    }

    /// The hash a word starts from: of the character at `pre` when `pre < start`.
    #[inline(always)]
    fn pre_hash(&self, pre: usize, start: usize) -> u64 {
        match start - pre {
            0 => FNV_SEED,
            1 => hash_char(FNV_SEED, u32::from(self.b[pre])),
            _ => hash_char(FNV_SEED, decode(self.b, pre).0),
        }
    }

    /// A run of letters starting at `start` (a letter), after the character at `pre` (when
    /// `pre < start`) of kind `prefix`. cl100k takes the whole run; o200k stops where an
    /// upper-case letter follows a lower-case one and takes a contraction as a suffix.
    #[inline(always)]
    fn word<S: Sink>(
        &self,
        pre: usize,
        start: usize,
        prefix: usize,
        letter: Letter,
        sink: &mut S,
    ) -> usize {
        let fused = if sink.tables().is_some() {
            self.fused_word(pre, start, prefix, letter, sink)
        } else {
            self.listed_ascii(pre, start, letter)
                .inspect(|_| sink.add(F_VOCAB + prefix))
        };
        let end = if let Some(end) = fused {
            end
        } else if O200K {
            let mark = sink.mark();
            let seg = self.segment::<S, false>(pre, start, prefix, false, letter, sink);
            let listed = self.vocab.contains(seg.first, seg.hash);
            self.note_ascii(letter, listed);
            sink.settle(mark, listed, F_VOCAB + prefix);
            seg.end
        } else {
            self.camel_word(pre, start, prefix, letter, sink)
        };
        self.contraction_suffix(end, sink)
    }

    /// A word at `start` for a sink that only sums costs: its letters are costed by their
    /// context (`CtxTable::letter_cost`, with the ASCII letters and the Hangul and ideographic
    /// blocks inlined) and hashed in one loop, and the word costs the listed word or the sum of
    /// its first letter and letters, chosen by a select. A run of ASCII letters has a loop of its
    /// own (English and code). `None`, with nothing emitted, at a cl100k hump: camelCase words
    /// take the general path, which costs each segment.
    #[inline(always)]
    fn fused_word<S: Sink>(
        &self,
        pre: usize,
        start: usize,
        prefix: usize,
        letter: Letter,
        sink: &mut S,
    ) -> Option<usize> {
        let (table, costs) = sink.tables()?;
        let b = self.b;
        let n = b.len();
        let mut h = self.pre_hash(pre, start);
        let mut i = start;
        let mut letters = 0u64;
        // The context of the next letter, in scalars (a struct kept in memory across iterations
        // costs a failed store forwarding per letter): its position and the character before.
        let mut pos = 0u8;
        let mut p1 = prefix as u32;
        let mut seen_lower = false;
        if letter.0 < 0x80 {
            let ascii = &table.ascii[..4 << 14];
            if PROBE && self.ascii_listed.get() >= PROBE_AT {
                if let Some(end) = self.probe_ascii(h, start, prefix, letter, sink) {
                    return end;
                }
            }
            // Index of the next letter's cost without it: position, then the character before.
            let mut at = prefix << 7;
            let mut step = |c: u8| {
                // (The index is below 4 << 14: the mask only spares a bounds check.)
                letters += u64::from(ascii[(at | usize::from(c)) & 0xFFFF]);
                h = hash_char(h, u32::from(c));
                at = ((at & 3 << 14) + (1 << 14)).min(3 << 14) | usize::from(c) << 7;
            };
            if O200K {
                while i < n && b[i].is_ascii_uppercase() {
                    step(b[i]);
                    i += 1;
                }
                let upper_end = i;
                while i < n && b[i].is_ascii_lowercase() {
                    step(b[i]);
                    i += 1;
                }
                seen_lower = i > upper_end;
            } else {
                while i < n && b[i].is_ascii_alphabetic() {
                    let upper = b[i].is_ascii_uppercase();
                    if upper & seen_lower {
                        return None;
                    }
                    seen_lower |= !upper;
                    step(b[i]);
                    i += 1;
                }
            }
            pos = (at >> 14) as u8;
            p1 = (at >> 7 & 0x7F) as u32;
        }
        // Letters beyond ASCII (and ASCII letters after them).
        while let Some(&x) = b.get(i) {
            if x < 0x80 && !x.is_ascii_alphabetic() {
                break;
            }
            let (c, len) = decode(b, i);
            let (class, case) = match if x < 0x80 {
                ASCII_CATS[usize::from(x)]
            } else {
                self.non_ascii_cat(c)
            } {
                Cat::Letter(class, case) => (class, case),
                Cat::Mark(class, _) if O200K => (class, Case::Caseless),
                _ => break,
            };
            if (case == Case::Upper) & seen_lower {
                if O200K {
                    break;
                }
                return None;
            }
            seen_lower |= case == Case::Lower;
            letters += u64::from(if (0x3100..0x1_0000).contains(&c) {
                // No rows: the character and the one before it, else alone (`cost`).
                let alone = table.bmp[(c as usize) << 3 | usize::from(pos)];
                table.get_or(ctx_key(2, pos, u64::from(c) | u64::from(p1) << 21), alone)
            } else {
                table.letter_cost(&Ctx {
                    pos,
                    c,
                    p1,
                    p2: 0,
                    class,
                })
            });
            h = hash_char(h, c);
            i += len;
            pos = (pos + 1).min(3);
            p1 = c;
        }
        let listed = self.vocab.contains(letter.0, h);
        if PROBE {
            self.note_ascii(letter, listed);
        }
        let first = u64::from(costs[F_WORD_FIRST + prefix * N_LETTER + usize::from(letter.2)]);
        let unlisted = first + letters;
        let keep = u64::from(listed).wrapping_sub(1);
        sink.add_cost((unlisted & keep) | (u64::from(costs[F_VOCAB + prefix]) & !keep));
        Some(i)
    }

    /// `fused_word` for a word of ASCII letters while most ASCII words of the text are listed
    /// (`ascii_listed`): the word is hashed by a short loop that costs no letter and looked up,
    /// and only when it is not listed are its letters costed, by a second loop that does not
    /// hash. `None` when a character beyond ASCII follows the letters (the word may go on):
    /// `fused_word` then costs it from the start. `Some(None)` at a cl100k hump of a word that
    /// is not listed (the general path costs each segment).
    #[inline(always)]
    fn probe_ascii<S: Sink>(
        &self,
        h: u64,
        start: usize,
        prefix: usize,
        letter: Letter,
        sink: &mut S,
    ) -> Option<Option<usize>> {
        let (table, costs) = sink.tables()?;
        let b = self.b;
        let n = b.len();
        let (i, h) = self.ascii_run_hash(start, h);
        if i < n && b[i] >= 0x80 {
            return None;
        }
        let listed = self.vocab.contains(letter.0, h);
        self.note_ascii(letter, listed);
        if listed {
            sink.add_cost(u64::from(costs[F_VOCAB + prefix]));
            return Some(Some(i));
        }
        let ascii = &table.ascii[..4 << 14];
        let mut letters = 0u64;
        let mut at = prefix << 7;
        let mut seen_lower = false;
        for &c in &b[start..i] {
            if !O200K {
                let upper = c.is_ascii_uppercase();
                if upper & seen_lower {
                    return Some(None);
                }
                seen_lower |= !upper;
            }
            // (The index is below 4 << 14: the mask only spares a bounds check.)
            letters += u64::from(ascii[(at | usize::from(c)) & 0xFFFF]);
            at = ((at & 3 << 14) + (1 << 14)).min(3 << 14) | usize::from(c) << 7;
        }
        let first = u64::from(costs[F_WORD_FIRST + prefix * N_LETTER + usize::from(letter.2)]);
        sink.add_cost(first + letters);
        Some(Some(i))
    }

    /// The end of a word of ASCII letters at `start` (up to a hump for o200k) when it is listed
    /// with the character at `pre`, found by a short loop that costs no letter: most words of
    /// English and of code. Tried while most ASCII words of the text are listed
    /// (`ascii_listed`); in other languages a word costed letter by letter from the start is
    /// cheaper than a miss here and then that.
    #[inline(always)]
    fn listed_ascii(&self, pre: usize, start: usize, letter: Letter) -> Option<usize> {
        if letter.0 >= 0x80 || self.ascii_listed.get() < PROBE_AT {
            return None;
        }
        let b = self.b;
        let n = b.len();
        let (i, h) = self.ascii_run_hash(start, self.pre_hash(pre, start));
        // A character beyond ASCII may be a letter that goes on with the word.
        let listed = !(i < n && b[i] >= 0x80) && self.vocab.contains(letter.0, h);
        self.note_ascii(letter, listed);
        listed.then_some(i)
    }

    /// Counts a word starting with an ASCII letter as listed or not, for `listed_ascii`.
    #[inline(always)]
    fn note_ascii(&self, letter: Letter, listed: bool) {
        if letter.0 < 0x80 {
            let n = self.ascii_listed.get();
            self.ascii_listed.set(if listed {
                (n + 1).min(PROBE_MAX)
            } else {
                n.saturating_sub(PROBE_MISS)
            });
        }
    }

    /// A cl100k word, which keeps camelCase in one piece although its tokens mostly break at the
    /// humps: unless the whole word is listed, each segment (cut where an upper-case letter
    /// follows a lower-case one) costs as a word of its own, the first with the word's prefix,
    /// the next ones a hump each. A segment only grows or is followed by a new one as text is
    /// appended, and a listed word costs no more than its first segment, so this stays monotone.
    #[inline(always)]
    fn camel_word<S: Sink>(
        &self,
        pre: usize,
        start: usize,
        prefix: usize,
        letter: Letter,
        sink: &mut S,
    ) -> usize {
        let mark = sink.mark();
        let first = self.segment::<S, true>(pre, start, prefix, false, letter, sink);
        if first.end == first.word_end {
            let listed = self.vocab.contains(first.first, first.word_hash);
            self.note_ascii(letter, listed);
            sink.settle(mark, listed, F_VOCAB + prefix);
            return first.end;
        }
        if self.vocab.contains(first.first, first.word_hash) {
            sink.settle(mark, true, F_VOCAB + prefix);
            return first.word_end;
        }
        sink.settle(
            mark,
            self.vocab.contains(first.first, first.hash),
            F_VOCAB + prefix,
        );
        // Each segment after the first starts with an upper-case letter after a lower-case one.
        let mut i = first.end;
        while i < first.word_end {
            let Some(letter) = self.letter_at(i) else {
                break;
            };
            let mark = sink.mark();
            let seg = self.segment::<S, false>(i, i, prefix, true, letter, sink);
            sink.settle(mark, self.vocab.contains(seg.first, seg.hash), F_HUMP);
            i = seg.end;
        }
        i
    }

    /// The letters of a word (or, for cl100k, of a camelCase segment after a `hump`) from
    /// `start` up to where an upper-case letter follows a lower-case one, costed character by
    /// character and hashed with the character at `pre` (when `pre < start`). With `WHOLE`,
    /// also the end and hash of the whole run of letters, humps included.
    #[inline(always)]
    fn segment<S: Sink, const WHOLE: bool>(
        &self,
        pre: usize,
        start: usize,
        prefix: usize,
        hump: bool,
        letter: Letter,
        sink: &mut S,
    ) -> Segment {
        let mut h = self.pre_hash(pre, start);
        let mut i = start;
        let mut seen_lower = false;
        // The context of each letter: its position (0, 1, 2, 3 or later) and the two characters
        // before it in the word (the kind of prefix before the first one).
        let mut ctx = Ctx {
            pos: 0,
            c: 0,
            p1: if hump { CTX_AFTER_HUMP } else { prefix as u32 },
            p2: 0,
            class: 0,
        };
        let mut humped = false;
        // The first letter (the caller has read it) opens the piece.
        let (first, len, class, case) = letter;
        sink.add(if hump {
            F_HUMP
        } else {
            F_WORD_FIRST + prefix * N_LETTER + usize::from(class)
        });
        seen_lower |= case == Case::Lower;
        ctx.c = first;
        ctx.class = class;
        sink.ctx(&ctx, i, len);
        ctx.pos = 1;
        ctx.p2 = ctx.p1;
        ctx.p1 = first;
        h = hash_char(h, first);
        i += len;
        while let Some((c, len, class, case)) = self.letter_at(i) {
            if (case == Case::Upper) & seen_lower {
                humped = true;
                break;
            }
            seen_lower |= case == Case::Lower;
            ctx.c = c;
            ctx.class = class;
            sink.ctx(&ctx, i, len);
            ctx.pos = (ctx.pos + 1).min(3);
            ctx.p2 = ctx.p1;
            ctx.p1 = c;
            h = hash_char(h, c);
            i += len;
        }
        let mut seg = Segment {
            first,
            end: i,
            hash: h,
            word_end: i,
            word_hash: h,
        };
        if WHOLE && humped {
            while let Some((c, len, _, _)) = self.letter_at(i) {
                h = hash_char(h, c);
                i += len;
            }
            seg.word_end = i;
            seg.word_hash = h;
        }
        seg
    }

    /// o200k keeps a contraction after a word in the word's piece.
    #[inline(always)]
    fn contraction_suffix<S: Sink>(&self, i: usize, sink: &mut S) -> usize {
        if O200K && self.b.get(i) == Some(&b'\'') {
            if let Some(k) = contraction(self.b, i + 1) {
                sink.add(F_PUNCT + P_BRACKET * PUNCT_POS);
                sink.add(F_CONTRACTION);
                return i + 1 + k;
            }
        }
        i
    }

    /// Up to three numeric characters.
    #[inline]
    fn number<S: Sink>(&self, mut i: usize, sink: &mut S) -> usize {
        let b = self.b;
        sink.add(F_DIGITS);
        for _ in 0..3 {
            if i >= b.len() {
                break;
            }
            let (cat, _, len) = self.cat_at(i);
            match cat {
                Cat::Digit => {}
                Cat::NumOther => sink.add(F_NUM_OTHER),
                _ => break,
            }
            i += len;
        }
        i
    }

    /// A run of punctuation, symbols and marks starting at `i`, then any newlines (and, for
    /// o200k, slashes). `after_space`: a space before it belongs to the same piece.
    #[inline]
    fn punct<S: Sink>(&self, mut i: usize, after_space: bool, sink: &mut S) -> usize {
        let b = self.b;
        let n = b.len();
        let mut pos = 0usize;
        let mut prev = u32::MAX;
        while i < n {
            let (cat, c, len) = self.cat_at(i);
            let (Cat::Punct(p) | Cat::Mark(_, p)) = cat else {
                break;
            };
            let p = usize::from(p);
            if pos == 0 {
                if after_space {
                    sink.add(F_PUNCT_SP + p);
                } else {
                    sink.add(F_PUNCT + p * PUNCT_POS);
                }
                if let Cat::Mark(class, _) = cat {
                    sink.ctx(&Ctx::mark_first(c, class), i, len);
                }
            } else if let Cat::Mark(class, _) = cat {
                let ctx = Ctx {
                    pos: CTX_MARK_NEXT,
                    c,
                    p1: prev,
                    p2: 0,
                    class,
                };
                sink.ctx(&ctx, i, len);
            } else if c == prev && c < 0x1_0000 {
                let bucket = repeat_bucket(pos) as u32;
                let ctx = Ctx {
                    pos: CTX_REPEAT,
                    c: c | bucket << 24,
                    p1: 0,
                    p2: 0,
                    class: (u32::from(c >= 0x80) * N_REPEAT as u32 + bucket) as u8,
                };
                sink.ctx(&ctx, i, len);
            } else {
                sink.add(F_PUNCT + p * PUNCT_POS + pos.min(PUNCT_POS - 1));
            }
            prev = c;
            pos += 1;
            i += len;
        }
        while i < n {
            let class = match b[i] {
                b'\r' | b'\n' => P_NEWLINE,
                b'/' if O200K => P_OPERATOR,
                _ => break,
            };
            sink.add(F_PUNCT + class * PUNCT_POS + pos.min(PUNCT_POS - 1));
            pos += 1;
            i += 1;
        }
        i
    }

    /// Whitespace at `i` that does not lead a word: up to the last newline of the run
    /// (`\s*[\r\n]+`), else all but the last character when more text follows (`\s+(?!\S)`), else
    /// the run (`\s+`). Costs restart at each character that follows a newline.
    #[inline]
    fn whitespace<S: Sink>(&self, i: usize, sink: &mut S) -> usize {
        let b = self.b;
        let n = b.len();
        let mut j = i;
        let mut last_len = 0;
        let mut newline_end = None;
        while j < n {
            let (cat, _, len) = self.cat_at(j);
            match cat {
                Cat::Newline => newline_end = Some(j + len),
                Cat::Ws(_) => {}
                _ => break,
            }
            last_len = len;
            j += len;
        }
        let end = match newline_end {
            Some(e) => e,
            None if j < n && j - i > last_len => j - last_len,
            None => j,
        };
        let mut k = i;
        let mut pos = 0usize;
        let mut after_newline = false;
        while k < end {
            let (cat, _, len) = self.cat_at(k);
            let (class, is_newline) = match cat {
                Cat::Newline => (W_NEWLINE, true),
                Cat::Ws(w) => (usize::from(w), false),
                _ => (W_OTHER, false),
            };
            if after_newline && !is_newline {
                pos = 0;
            }
            sink.add(F_WS + class * WS_POS + pos.min(WS_POS - 1));
            pos += 1;
            after_newline = is_newline;
            k += len;
        }
        end
    }
}

fn scan<S: Sink>(text: &str, enc: Encoding, sink: &mut S) {
    let b = text.as_bytes();
    let vocab = Vocab::get(enc);
    let cats = cat_table();
    let ascii_listed = Cell::new(PROBE_AT);
    match (enc, text.is_ascii()) {
        (Encoding::Cl100k, false) => Scanner::<false, false> {
            b,
            vocab,
            cats,
            ascii_listed,
        }
        .run(sink),
        (Encoding::Cl100k, true) => Scanner::<false, true> {
            b,
            vocab,
            cats,
            ascii_listed,
        }
        .run(sink),
        (Encoding::O200k, false) => Scanner::<true, false> {
            b,
            vocab,
            cats,
            ascii_listed,
        }
        .run(sink),
        (Encoding::O200k, true) => Scanner::<true, true> {
            b,
            vocab,
            cats,
            ascii_listed,
        }
        .run(sink),
    }
}

/// Estimated token count of `text` for `enc`.
pub fn estimate_text(text: &str, enc: Encoding) -> u64 {
    (estimate_sum::<true>(text, enc) + (1 << (SCALE_BITS - 1))) >> SCALE_BITS
}

/// The estimate of `text` in fixed point; `FUSED` as in `Total`.
#[inline(always)]
fn estimate_sum<const FUSED: bool>(text: &str, enc: Encoding) -> u64 {
    let mut total = Total::<FUSED> {
        costs: enc.costs(),
        table: CtxTable::get_for(enc),
        sum: 0,
    };
    scan(text, enc, &mut total);
    total.sum
}

/// The pieces of `text` (byte ranges) and the features each emits, for calibration.
pub fn pieces(text: &str, enc: Encoding) -> Vec<(usize, usize, Vec<u16>)> {
    pieces_and_contexts(text, enc).0
}

/// The pieces of `text` and the context rows of the characters costed by context.
pub fn pieces_and_contexts(text: &str, enc: Encoding) -> (Vec<PieceRow>, Vec<CtxRow>) {
    let mut sink = Pieces {
        out: Vec::new(),
        current: Vec::new(),
        contexts: Vec::new(),
    };
    scan(text, enc, &mut sink);
    (sink.out, sink.contexts)
}

// ---------------------------------------------------------------------------------------------
// Python boundary.

/// Tokens added per chat message and once per request (OpenAI chat format).
pub const TOKENS_PER_MESSAGE: u64 = 3;
pub const TOKENS_PER_NAME: u64 = 1;
pub const TOKENS_REPLY_PRIMING: u64 = 3;

/// Strings longer than this are estimated with the GIL released.
const DETACH_BYTES: usize = 8192;

/// The UTF-8 text of a Python string; lone surrogates become U+FFFD instead of failing.
fn utf8<'a>(s: &'a Bound<'_, PyString>) -> Cow<'a, str> {
    match s.to_cow() {
        Ok(text) => text,
        Err(_) => s.to_string_lossy(),
    }
}

fn estimate_py(py: Python<'_>, s: &Bound<'_, PyString>, enc: Encoding) -> u64 {
    let text = utf8(s);
    let text: &str = &text;
    if text.len() > DETACH_BYTES {
        py.detach(|| estimate_text(text, enc))
    } else {
        estimate_text(text, enc)
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_owned())
}

fn content_tokens(py: Python<'_>, content: &Bound<'_, PyAny>, enc: Encoding) -> PyResult<u64> {
    if let Ok(s) = content.cast::<PyString>() {
        return Ok(estimate_py(py, s, enc));
    }
    if content.is_none() {
        return Ok(0);
    }
    let parts = if let Ok(list) = content.cast::<PyList>() {
        list.iter().collect::<Vec<_>>()
    } else if let Ok(tuple) = content.cast::<PyTuple>() {
        tuple.iter().collect::<Vec<_>>()
    } else {
        return Err(PyTypeError::new_err(format!(
            "message content must be str, list or None, not {}",
            type_name(content)
        )));
    };
    let mut total = 0u64;
    for part in parts {
        if let Ok(s) = part.cast::<PyString>() {
            total += estimate_py(py, s, enc);
        } else if let Ok(d) = part.cast::<PyDict>() {
            // Text parts count; images, audio and other parts are not estimated here.
            if let Some(text) = d.get_item("text")? {
                if let Ok(s) = text.cast::<PyString>() {
                    total += estimate_py(py, s, enc);
                }
            }
        } else {
            return Err(PyTypeError::new_err(format!(
                "a content part must be a str or a dict, not {}",
                type_name(&part)
            )));
        }
    }
    Ok(total)
}

fn optional_str_tokens(
    py: Python<'_>,
    d: &Bound<'_, PyDict>,
    key: &str,
    enc: Encoding,
) -> PyResult<Option<u64>> {
    match d.get_item(key)? {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => match v.cast::<PyString>() {
            Ok(s) => Ok(Some(estimate_py(py, s, enc))),
            Err(_) => Err(PyTypeError::new_err(format!(
                "message '{key}' must be a str, not {}",
                type_name(&v)
            ))),
        },
    }
}

fn parse_encoding(encoding: &str) -> PyResult<Encoding> {
    Encoding::parse(encoding).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown encoding {encoding:?}; expected 'cl100k', 'o200k', 'cl100k_base' or \
             'o200k_base'"
        ))
    })
}

/// Estimate the tokens of one string.
#[pyfunction]
#[pyo3(name = "estimate_text", signature = (text, encoding = "cl100k"))]
fn py_estimate_text(py: Python<'_>, text: &Bound<'_, PyString>, encoding: &str) -> PyResult<u64> {
    let enc = parse_encoding(encoding)?;
    Ok(estimate_py(py, text, enc))
}

/// Estimate the prompt tokens of a chat message list, with the per-message overhead.
#[pyfunction]
#[pyo3(name = "estimate_messages", signature = (messages, encoding = "cl100k"))]
fn py_estimate_messages(
    py: Python<'_>,
    messages: &Bound<'_, PyList>,
    encoding: &str,
) -> PyResult<u64> {
    let enc = parse_encoding(encoding)?;
    let mut total = TOKENS_REPLY_PRIMING;
    for msg in messages.iter() {
        let d = msg.cast::<PyDict>().map_err(|_| {
            PyTypeError::new_err(format!(
                "each message must be a dict, not {}",
                type_name(&msg)
            ))
        })?;
        total += TOKENS_PER_MESSAGE;
        if let Some(content) = d.get_item("content")? {
            total += content_tokens(py, &content, enc)?;
        }
        total += optional_str_tokens(py, d, "role", enc)?.unwrap_or(0);
        if let Some(n) = optional_str_tokens(py, d, "name", enc)? {
            total += TOKENS_PER_NAME + n;
        }
    }
    Ok(total)
}

/// The pieces of `text` as `(byte_start, byte_end, feature_ids)`, for calibration.
#[pyfunction]
#[pyo3(name = "_estimate_pieces", signature = (text, encoding = "cl100k"))]
fn py_estimate_pieces(
    text: &Bound<'_, PyString>,
    encoding: &str,
) -> PyResult<Vec<(usize, usize, Vec<u16>)>> {
    let enc = parse_encoding(encoding)?;
    Ok(pieces(&utf8(text), enc))
}

/// The characters costed by context as `(byte_start, byte_end, (position, keys))`, for
/// calibration.
#[pyfunction]
#[pyo3(name = "_estimate_contexts", signature = (text, encoding = "cl100k"))]
fn py_estimate_contexts(text: &Bound<'_, PyString>, encoding: &str) -> PyResult<Vec<CtxRow>> {
    let enc = parse_encoding(encoding)?;
    Ok(pieces_and_contexts(&utf8(text), enc).1)
}

/// Names of the estimator's features, indexed like its cost tables.
#[pyfunction]
#[pyo3(name = "_estimate_feature_names")]
fn py_estimate_feature_names() -> Vec<String> {
    feature_names()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(py_estimate_text, m)?)?;
    m.add_function(wrap_pyfunction!(py_estimate_messages, m)?)?;
    m.add_function(wrap_pyfunction!(py_estimate_pieces, m)?)?;
    m.add_function(wrap_pyfunction!(py_estimate_contexts, m)?)?;
    m.add_function(wrap_pyfunction!(py_estimate_feature_names, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str, enc: Encoding) -> Vec<&str> {
        pieces(text, enc)
            .into_iter()
            .map(|(s, e, _)| &text[s..e])
            .collect()
    }

    #[test]
    fn names_match_layout() {
        assert_eq!(feature_names().len(), N_FEATURES);
        assert!(N_FEATURES <= usize::from(u16::MAX));
    }

    #[test]
    fn cats_of_hangul() {
        for c in 0xAC00..=0xD7A3 {
            assert!(
                cat_table()[c] == Cat::Letter(L_HANGUL as u8, Case::Caseless),
                "{c:X}"
            );
        }
    }

    #[test]
    fn empty_is_zero() {
        assert_eq!(estimate_text("", Encoding::Cl100k), 0);
        assert_eq!(estimate_text("", Encoding::O200k), 0);
    }

    #[test]
    fn pre_tokenizer_matches_cl100k_regex() {
        let enc = Encoding::Cl100k;
        assert_eq!(
            split("Hello, world! I'm here.", enc),
            ["Hello", ",", " world", "!", " I", "'m", " here", "."]
        );
        assert_eq!(
            split("x = 12345;\n", enc),
            ["x", " =", " ", "123", "45", ";\n"]
        );
        assert_eq!(
            split("def f():\n    return 1\n\n", enc),
            ["def", " f", "():\n", "   ", " return", " ", "1", "\n\n"]
        );
        assert_eq!(split("((a)) .b", enc), ["((", "a", "))", " .", "b"]);
        assert_eq!(split("(a  \n  b", enc), ["(a", "  \n", " ", " b"]);
        assert_eq!(split("getElementById", enc), ["getElementById"]);
        assert_eq!(split("x  ", enc), ["x", "  "]);
    }

    #[test]
    fn pre_tokenizer_matches_o200k_regex() {
        let enc = Encoding::O200k;
        assert_eq!(
            split("getElementById HTMLParser don't", enc),
            ["get", "Element", "By", "Id", " HTMLParser", " don't"]
        );
        assert_eq!(split("a.\n/b", enc), ["a", ".\n/", "b"]);
    }

    #[test]
    fn monotone_in_appended_text() {
        let samples = [
            "Hello world, this is a test. ",
            "don't stop (now)  \n\n  x = [1, 2, 3]; // ok",
            "日本語のテキスト、そして中文。",
            "'ll 'l x'l \t\t\n \n 🎉👩‍👩‍👧 ❤️ مرحبا Привет",
        ];
        for enc in [Encoding::Cl100k, Encoding::O200k] {
            for text in samples {
                let mut prev = 0;
                for (i, _) in text.char_indices().skip(1).chain([(text.len(), ' ')]) {
                    let n = estimate_text(&text[..i], enc);
                    assert!(n >= prev, "{enc:?} {:?}: {n} < {prev}", &text[..i]);
                    prev = n;
                }
            }
        }
    }

    #[test]
    fn fast_paths_sum_like_the_general_path() {
        let samples = [
            "Hello world, this is a test. The quick brown fox jumps over the lazy dog.",
            "getElementById HTMLParser XMLHttpRequest don't we'll I'M ABCdefGhi a b c",
            "def f(x):\n    return x.someValue + self.otherThing  # camelCase snake_case",
            "Größe café naïve déjà-vu Ærø Tiếng Việt có dấu żółć ğüşıöç Ñandú",
            "日本語のテキスト、そして中文。한국어 텍스트입니다. Привет мир! مرحبا",
            "'ll 'l x'l \t\t\n \n 🎉👩‍👩‍👧 ❤️ ((a)) .b x  \n  y —— !!! ....",
        ];
        for enc in [Encoding::Cl100k, Encoding::O200k] {
            for text in samples {
                for (i, _) in text.char_indices().chain([(text.len(), ' ')]) {
                    for part in [&text[..i], &text[i..]] {
                        assert_eq!(
                            estimate_sum::<true>(part, enc),
                            estimate_sum::<false>(part, enc),
                            "{enc:?} {part:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn english_is_close_to_tiktoken() {
        // "The quick brown fox jumps over the lazy dog." is 10 tokens in both encodings.
        for enc in [Encoding::Cl100k, Encoding::O200k] {
            let n = estimate_text("The quick brown fox jumps over the lazy dog.", enc);
            assert!((9..=11).contains(&n), "{enc:?}: {n}");
        }
    }
}
