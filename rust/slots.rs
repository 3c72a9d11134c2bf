//! Redis Cluster hash slots: CRC16 (XMODEM) of the key's hash tag, modulo 16384, and one short
//! tag per slot so a marker key can be placed in any slot.

use std::sync::OnceLock;

pub const SLOTS: usize = 16384;

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The cluster slot of `key`, honouring `{hash tags}` like Redis does.
pub fn key_slot(key: &str) -> usize {
    let bytes = key.as_bytes();
    if let Some(open) = bytes.iter().position(|&b| b == b'{') {
        if let Some(len) = bytes[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return crc16(&bytes[open + 1..open + 1 + len]) as usize % SLOTS;
            }
        }
    }
    crc16(bytes) as usize % SLOTS
}

/// For every slot, a short string whose CRC16 lands in it (computed once).
pub fn slot_tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags: Vec<Option<String>> = vec![None; SLOTS];
        let mut missing = SLOTS;
        let mut n: u64 = 0;
        while missing > 0 {
            let s = n.to_string();
            let slot = crc16(s.as_bytes()) as usize % SLOTS;
            if tags[slot].is_none() {
                tags[slot] = Some(s);
                missing -= 1;
            }
            n += 1;
        }
        tags.into_iter().map(|t| t.unwrap_or_default()).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_slots() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(
            key_slot("{user1000}.following"),
            key_slot("{user1000}.followers")
        );
        assert_eq!(key_slot("foo{}{bar}"), key_slot("foo{}{bar}"));
        assert_eq!(key_slot("{}x"), crc16(b"{}x") as usize % SLOTS);
    }

    #[test]
    fn every_slot_has_a_tag() {
        let tags = slot_tags();
        for (slot, tag) in tags.iter().enumerate() {
            assert_eq!(key_slot(&format!("llmtally:{{{tag}}}:flushed")), slot);
        }
    }
}
