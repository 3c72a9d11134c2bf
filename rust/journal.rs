//! The spool's journal: every delta a ledger accepts, written to a local file before `add`
//! returns, so a process killed with SIGKILL loses nothing (the page cache outlives the
//! process; `fsync` is not needed for that, only for power loss).
//!
//! One file per generation: the deltas of one drained batch. Its name carries the flusher id
//! and the batch's sequence number, `<flusher_id>.<seq>.journal`, so a batch replayed after a
//! crash is written with the same identity and the store's markers apply it once. A file is:
//! a header (magic, the store's tag, the sequence) and records `[key_len u32][key][10 x i64]
//! [crc32 u32]`, little-endian. Records are appended under one lock, in order, so only the last
//! one can be torn; a reader stops at the first record whose checksum does not match.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::ledger::{Counters, NFIELDS};

const MAGIC: &[u8; 8] = b"LLMTJNL1";
const HEADER: usize = 8 + 8 + 8;

/// A journal being written: the current generation's file.
pub struct Journal {
    dir: PathBuf,
    flusher_id: String,
    tag: u64,
    seq: u64,
    file: Option<File>,
    buf: Vec<u8>,
    /// Writes that failed (the deltas stayed in memory only) and the last error.
    pub errors: u64,
    pub last_error: Option<String>,
    /// Whether a write of the current generation's file failed (the file lacks deltas).
    incomplete: bool,
}

impl Journal {
    /// Start journaling into `dir`; the first file is for batch `seq`.
    pub fn new(dir: &Path, flusher_id: &str, tag: u64, seq: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut j = Self {
            dir: dir.to_path_buf(),
            flusher_id: flusher_id.to_owned(),
            tag,
            seq,
            file: None,
            buf: Vec::with_capacity(256),
            errors: 0,
            last_error: None,
            incomplete: false,
        };
        j.open()?;
        Ok(j)
    }

    pub fn path_of(&self, seq: u64) -> PathBuf {
        self.dir
            .join(format!("{}.{}.journal", self.flusher_id, seq))
    }

    fn open(&mut self) -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path_of(self.seq))?;
        if file.metadata()?.len() == 0 {
            let mut header = Vec::with_capacity(HEADER);
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(&self.tag.to_le_bytes());
            header.extend_from_slice(&self.seq.to_le_bytes());
            file.write_all(&header)?;
        }
        self.file = Some(file);
        Ok(())
    }

    fn failed(&mut self, err: std::io::Error) {
        self.errors += 1;
        self.incomplete = true;
        self.last_error = Some(err.to_string());
    }

    /// Append one delta (a failure is counted; the delta is still accepted in memory).
    pub fn append(&mut self, key: &str, delta: &Counters) {
        self.buf.clear();
        self.buf
            .extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(key.as_bytes());
        for v in delta {
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32fast::hash(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        if self.file.is_none() {
            if let Err(e) = self.open() {
                return self.failed(e);
            }
        }
        if let Some(file) = self.file.as_mut() {
            if let Err(e) = file.write_all(&self.buf) {
                self.file = None; // reopened (appending) on the next record
                self.failed(e);
            }
        }
    }

    /// Whether a write of the current generation failed.
    pub fn incomplete(&self) -> bool {
        self.incomplete
    }

    /// Close the current file (the next record opens it again, creating it if it was
    /// removed).
    pub fn close_file(&mut self) {
        self.file = None;
    }

    /// The current generation is drained as batch `seq`: start the next file. Returns the
    /// drained generation's path and whether the file holds every delta of it.
    pub fn rotate(&mut self) -> (PathBuf, bool) {
        let done = self.path_of(self.seq);
        let complete = !self.incomplete;
        self.seq += 1;
        self.file = None;
        self.incomplete = false;
        if let Err(e) = self.open() {
            self.failed(e);
        }
        (done, complete)
    }
}

/// What a journal file holds: its tag and sequence, the deltas summed per key (sorted), and
/// whether a torn or corrupt tail was left out.
pub struct Replayed {
    pub tag: u64,
    pub seq: u64,
    pub entries: Vec<(Box<str>, Counters)>,
    pub records: u64,
    pub torn: bool,
}

/// Read a journal file back.
pub fn read(path: &Path) -> std::io::Result<Replayed> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    if data.len() < HEADER || &data[..8] != MAGIC {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not an llmtally journal",
        ));
    }
    let tag = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
    let seq = u64::from_le_bytes(data[16..24].try_into().unwrap_or_default());
    let mut sums: BTreeMap<Box<str>, Counters> = BTreeMap::new();
    let mut at = HEADER;
    let mut records = 0;
    let mut torn = false;
    while at < data.len() {
        let Some(len) = data
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
        else {
            torn = true;
            break;
        };
        let end = at + 4 + len + NFIELDS * 8;
        let Some(body) = data.get(at..end) else {
            torn = true;
            break;
        };
        let Some(crc) = data
            .get(end..end + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
        else {
            torn = true;
            break;
        };
        let key = std::str::from_utf8(&body[4..4 + len]);
        if crc32fast::hash(body) != crc || key.is_err() {
            torn = true;
            break;
        }
        let mut delta = [0i64; NFIELDS];
        for (i, v) in delta.iter_mut().enumerate() {
            let o = 4 + len + i * 8;
            *v = i64::from_le_bytes(body[o..o + 8].try_into().unwrap_or_default());
        }
        let sum = sums
            .entry(key.unwrap_or_default().into())
            .or_insert([0; NFIELDS]);
        for i in 0..NFIELDS {
            sum[i] = sum[i].saturating_add(delta[i]);
        }
        records += 1;
        at = end + 4;
    }
    Ok(Replayed {
        tag,
        seq,
        entries: sums.into_iter().collect(),
        records,
        torn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_summed_and_a_torn_tail_is_left_out() {
        let dir = std::env::temp_dir().join(format!("llmtally-journal-{}", std::process::id()));
        let mut j = Journal::new(&dir, "f", 7, 1).unwrap();
        j.append("b", &[1; NFIELDS]);
        j.append("a", &[2; NFIELDS]);
        j.append("b", &[3; NFIELDS]);
        let (path, complete) = j.rotate();
        assert!(complete);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[5, 0, 0, 0, b'x']); // a record cut short by a kill
        std::fs::write(&path, &bytes).unwrap();
        let r = read(&path).unwrap();
        assert_eq!((r.tag, r.seq, r.records, r.torn), (7, 1, 3, true));
        assert_eq!(
            r.entries,
            vec![("a".into(), [2; NFIELDS]), ("b".into(), [4; NFIELDS])]
        );
        let next = read(&j.path_of(2)).unwrap();
        assert_eq!((next.seq, next.records, next.torn), (2, 0, false));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
