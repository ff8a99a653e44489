//! Key layout of the main sled tree and of the generation databases (which hold only the
//! event tables' `I` and `i` items; their blocks' frames are in the generation's block
//! file, see [`super::generations`]). Every key starts
//! with a one-byte key space; all
//! integers are big-endian so that byte order is numeric order, and variable-length
//! strings carry a u16 length prefix so that a (table, SHA1, DeviceId) prefix is exact.
//!
//! | space | key                                                          | value |
//! |-------|--------------------------------------------------------------|-------|
//! | `I`   | run id u64, chunk u32                                         | key index run: ~64 sorted (row key, locator + content hash), zstd |
//! | `M`   | run id u64, part u32                                          | key index run metadata: fences, Timestamp range, Bloom filter |
//!
//! A row key (in the key index runs, in findings' inputs) is `e` table u16, sha1, device,
//! Timestamp (i64, sign-flipped), id [, content hash u64 for a second row with the same
//! key], or `p` sha1 for a FileProfile row.
//! | `K`   | table u16, batch seq u64, block u16, part u16                 | a main-database block's row keys (zstd, in pieces) |
//! | `B`   | table u16, batch seq u64, block u16, part u16                 | a main-database block's row values (zstd, in pieces) |
//! | `D`   | table u16, batch seq u64, block u16, 0 u16                    | a block's directory entry: rows, Timestamp range, place in its generation's block file |
//! | `y`   | table u16, dictionary u32, part u16                           | the table's zstd dictionary for rows' pages (in pieces) |
//! | `p`   | sha1                                                          | FileProfile row (newest wins) |
//! | `P`   | sha1 (u16-prefixed), content hash u64                         | a FileProfile version stored (empty): the same one again is a duplicate |
//! | `s`   | schema id u32                                                 | column names |
//! | `t`   | table name                                                    | table id u16 |
//! | `S`   | source id                                                     | source offset state |
//! | `r`   | reject seq u64                                                | kept-aside bad record |
//! | `c`   | (empty)                                                       | counters |
//! | `f`   | finding id (16 bytes)                                         | finding JSON |
//! | `q`   | outbox seq u64 of its first id                                | the ids of a commit's findings, in outbox order (up to 128) |
//! | `d`   | detector name@version                                         | detector cursor |
//! | `x`   | detector name@version (u16-prefixed), state key               | detector state value |
//! | `m`   | name                                                          | misc counters (next seqs, outbox cursors) |
//! | `i`   | table u16, column, lowercase value, batch seq u64, part u32     | column index: the batch's rows with that value |

pub const EVENT: u8 = b'e';
pub const PROFILE: u8 = b'p';
pub const PROFILE_VERSION: u8 = b'P';
pub const BLOCK_KEYS: u8 = b'K';
pub const BLOCK_ROWS: u8 = b'B';
pub const BLOCK_META: u8 = b'D';
pub const RUN_CHUNK: u8 = b'I';
pub const RUN_META: u8 = b'M';
pub const SCHEMA: u8 = b's';
pub const TABLE: u8 = b't';
pub const SOURCE: u8 = b'S';
pub const REJECT: u8 = b'r';
pub const COUNTERS: u8 = b'c';
pub const FINDING: u8 = b'f';
pub const OUTBOX: u8 = b'q';
pub const CURSOR: u8 = b'd';
pub const STATE: u8 = b'x';
pub const META: u8 = b'm';
pub const INDEX: u8 = b'i';
pub const DICTIONARY: u8 = b'y';

/// What a key space holds, for people (`lookout status --space`).
pub fn space_name(space: u8) -> &'static str {
    match space {
        BLOCK_ROWS => "row blocks",
        BLOCK_KEYS => "row keys of blocks",
        BLOCK_META => "block directory",
        DICTIONARY => "row dictionaries",
        RUN_CHUNK => "key index runs",
        RUN_META => "key index run metadata",
        INDEX => "column index",
        PROFILE | EVENT => "row keys (format 1)",
        SCHEMA | TABLE => "schemas and tables",
        SOURCE => "source offsets",
        REJECT => "rejected records",
        COUNTERS | META => "counters and settings",
        FINDING | OUTBOX => "findings",
        CURSOR | STATE => "detector cursors and state",
        _ => "other",
    }
}

/// Indexed values are cut to this many bytes; a look-up of a value this long or longer
/// re-checks the rows it finds (a cut value can only widen the match, never narrow it).
pub const INDEX_VALUE_MAX: usize = 256;

fn push_str(k: &mut Vec<u8>, s: &[u8]) {
    // Columns longer than 64 KiB cannot be a SHA1 or a device id; they are cut, which can
    // only widen a prefix scan, never narrow it (the detector re-checks equality).
    let s = &s[..s.len().min(u16::MAX as usize)];
    k.extend_from_slice(&(s.len() as u16).to_be_bytes());
    k.extend_from_slice(s);
}

/// Prefix of every event of `table` with this SHA1 (and device, if given).
pub fn event_prefix(table: u16, sha1: &str, device: Option<&str>) -> Vec<u8> {
    event_prefix_with_room(table, sha1, device, 0)
}

/// [`event_prefix`] in a buffer with `room` bytes to spare after it (for the rest of a key:
/// growing it would copy it again, once for every row stored).
fn event_prefix_with_room(table: u16, sha1: &str, device: Option<&str>, room: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + 2 + sha1.len() + 2 + device.map_or(0, str::len) + room);
    k.push(EVENT);
    k.extend_from_slice(&table.to_be_bytes());
    push_str(&mut k, sha1.as_bytes());
    if let Some(d) = device {
        push_str(&mut k, d.as_bytes());
    }
    k
}

/// Prefix of every event of `table`.
pub fn table_prefix(table: u16) -> Vec<u8> {
    let mut k = vec![EVENT];
    k.extend_from_slice(&table.to_be_bytes());
    k
}

pub fn event_key(table: u16, sha1: &str, device: &str, timestamp: i64, id: &str) -> Vec<u8> {
    let mut k = event_prefix_with_room(table, sha1, Some(device), 8 + 2 + id.len());
    k.extend_from_slice(&((timestamp as u64) ^ (1 << 63)).to_be_bytes());
    push_str(&mut k, id.as_bytes());
    k
}

/// Prefix of the index entries of (`table`, `columns`) whose values are `values` (each
/// ASCII lowercased and cut to [`INDEX_VALUE_MAX`] bytes, with its length first).
pub fn index_values_prefix(table: u16, columns: &str, values: &[&str]) -> Vec<u8> {
    let mut k = index_column_prefix(table, columns);
    k.reserve(values.iter().map(|v| 2 + v.len().min(INDEX_VALUE_MAX)).sum());
    for value in values {
        let cut = &value.as_bytes()[..value.len().min(INDEX_VALUE_MAX)];
        // Lowercased in place, not copied first: this runs for every indexed value of
        // every row stored.
        let at = k.len() + 2;
        push_str(&mut k, cut);
        k[at..].make_ascii_lowercase();
    }
    k
}

/// Prefix of every index entry of (`table`, `column`).
pub fn index_column_prefix(table: u16, column: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + column.len() + 2 + 32);
    k.push(INDEX);
    k.extend_from_slice(&table.to_be_bytes());
    push_str(&mut k, column.as_bytes());
    k
}

/// An index entry: the value prefix, the sequence of the batch that stored its rows (so a
/// range of batches is a range of keys), and a part number (one value's rows of a batch,
/// or of a rebuild, are split into parts of a few KiB).
pub fn index_key(value_prefix: &[u8], seq: u64, part: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(value_prefix.len() + 12);
    k.extend_from_slice(value_prefix);
    k.extend_from_slice(&seq.to_be_bytes());
    k.extend_from_slice(&part.to_be_bytes());
    k
}

/// The batch sequence of an [`index_key`] (`None` for a key too short to be one).
pub fn index_key_seq(key: &[u8]) -> Option<u64> {
    let at = key.len().checked_sub(12)?;
    Some(u64::from_be_bytes(key.get(at..at + 8)?.try_into().ok()?))
}

/// A block's piece (or directory entry): keys only grow with the batch sequence, so
/// blocks are appended, and a table's blocks of a range of batches are a key range.
pub fn block_key(space: u8, table: u16, seq: u64, block: u16, part: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(15);
    k.push(space);
    k.extend_from_slice(&table.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k.extend_from_slice(&block.to_be_bytes());
    k.extend_from_slice(&part.to_be_bytes());
    k
}

/// The (table, seq, block) of a block key.
pub fn block_of(key: &[u8]) -> Option<(u16, u64, u16)> {
    let b = key.get(1..13)?;
    Some((
        u16::from_be_bytes([b[0], b[1]]),
        u64::from_be_bytes(b[2..10].try_into().ok()?),
        u16::from_be_bytes([b[10], b[11]]),
    ))
}

/// A piece of `table`'s dictionary `id`.
pub fn dictionary_key(table: u16, id: u32, part: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(DICTIONARY);
    k.extend_from_slice(&table.to_be_bytes());
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(&part.to_be_bytes());
    k
}

/// The (table, dictionary, part) of a dictionary key.
pub fn dictionary_of(key: &[u8]) -> Option<(u16, u32, u16)> {
    let b = key.get(1..9).filter(|_| key.len() == 9)?;
    Some((
        u16::from_be_bytes([b[0], b[1]]),
        u32::from_be_bytes([b[2], b[3], b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]),
    ))
}

/// Prefix of every block key of `space` for `table`.
pub fn block_table_prefix(space: u8, table: u16) -> Vec<u8> {
    let mut k = vec![space];
    k.extend_from_slice(&table.to_be_bytes());
    k
}

/// An event key's variant for a row that shares (table, SHA1, DeviceId, Timestamp,
/// ReportId) with a different stored row: the key with the content hash appended.
pub fn variant_key(key: &[u8], content: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 8);
    k.extend_from_slice(key);
    k.extend_from_slice(&content.to_be_bytes());
    k
}

/// The Timestamp of an event key.
pub fn event_timestamp(key: &[u8]) -> Option<i64> {
    if *key.first()? != EVENT {
        return None;
    }
    let (_, rest) = take_bytes(key.get(3..)?)?;
    let (_, rest) = take_bytes(rest)?;
    Some((u64::from_be_bytes(rest.get(..8)?.try_into().ok()?) ^ (1 << 63)) as i64)
}

pub fn profile_key(sha1: &str) -> Vec<u8> {
    let mut k = vec![PROFILE];
    k.extend_from_slice(sha1.as_bytes());
    k
}

/// A FileProfile version stored: its SHA1 and content hash.
pub fn profile_version_key(sha1: &str, content: u64) -> Vec<u8> {
    let mut k = vec![PROFILE_VERSION];
    push_str(&mut k, sha1.as_bytes());
    k.extend_from_slice(&content.to_be_bytes());
    k
}

pub fn seq_key(space: u8, seq: u64) -> Vec<u8> {
    let mut k = vec![space];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn seq_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(1..9)?.try_into().ok()?))
}

pub fn named_key(space: u8, name: &str) -> Vec<u8> {
    let mut k = vec![space];
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn state_prefix(detector: &str) -> Vec<u8> {
    let mut k = vec![STATE];
    push_str(&mut k, detector.as_bytes());
    k
}

/// The parts of a stored row's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyParts {
    Event { table: u16, sha1: String, device: String, timestamp: i64 },
    Profile { sha1: String },
}

pub fn parse_key(key: &[u8]) -> Option<KeyParts> {
    match *key.first()? {
        EVENT => {
            let table = u16::from_be_bytes(key.get(1..3)?.try_into().ok()?);
            let (sha1, rest) = take_str(&key[3..])?;
            let (device, rest) = take_str(rest)?;
            let ts = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?) ^ (1 << 63);
            Some(KeyParts::Event { table, sha1, device, timestamp: ts as i64 })
        }
        PROFILE => Some(KeyParts::Profile { sha1: lossy_string(&key[1..]) }),
        _ => None,
    }
}

/// The SHA1 and DeviceId bytes of an event key, borrowed.
pub fn event_sha1_device(key: &[u8]) -> Option<(&[u8], &[u8])> {
    if *key.first()? != EVENT {
        return None;
    }
    let (sha1, rest) = take_bytes(key.get(3..)?)?;
    let (device, _) = take_bytes(rest)?;
    Some((sha1, device))
}

fn take_bytes(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u16::from_be_bytes(b.get(..2)?.try_into().ok()?) as usize;
    Some((b.get(2..2 + len)?, &b[2 + len..]))
}

fn take_str(b: &[u8]) -> Option<(String, &[u8])> {
    let len = u16::from_be_bytes(b.get(..2)?.try_into().ok()?) as usize;
    let s = b.get(2..2 + len)?;
    Some((lossy_string(s), &b[2 + len..]))
}

/// A key's text as a `String`, any invalid UTF-8 replaced. Checked with `from_utf8`
/// first: `from_utf8_lossy` walks its bytes one by one even when they are all valid,
/// which they are (keys are made from strings), and a pass parses every key it hands over.
fn lossy_string(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(b).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_entries_order_by_batch_within_a_value() {
        let p = index_values_prefix(2, "InitiatingProcessFileName", &["WsmProvHost.exe"]);
        assert_eq!(p, index_values_prefix(2, "InitiatingProcessFileName", &["wsmprovhost.exe"]), "ASCII case folded");
        let other = index_values_prefix(2, "InitiatingProcessFileName", &["wsmprovhost.exe2"]);
        let a = index_key(&p, 7, 9);
        let b = index_key(&p, 8, 0);
        assert!(a < b, "batch order first, whatever the part");
        assert!(a < [p.as_slice(), &8u64.to_be_bytes()].concat(), "a batch's parts sort before the next batch");
        assert!(!index_key(&other, 1, 0).starts_with(&p), "a longer value is not under a shorter one's prefix");
        let long = "x".repeat(INDEX_VALUE_MAX + 10);
        assert_eq!(index_values_prefix(2, "C", &[&long]), index_values_prefix(2, "C", &[&long[..INDEX_VALUE_MAX]]));
        let two = index_values_prefix(3, "A\u{1f}B", &["Ab", "ÉC"]);
        let mut want = index_column_prefix(3, "A\u{1f}B");
        for v in ["ab", "Éc"] {
            want.extend_from_slice(&(v.len() as u16).to_be_bytes());
            want.extend_from_slice(v.as_bytes());
        }
        assert_eq!(two, want, "each value after its length, ASCII letters lowercased, other bytes kept");
    }

    #[test]
    fn prefix_is_exact_and_order_preserving() {
        let a = event_key(1, "abc", "dev1", -5, "7");
        let b = event_key(1, "abc", "dev1", 3, "7");
        let c = event_key(1, "abcd", "dev1", 0, "7");
        assert!(a < b, "timestamps order numerically, negatives first");
        assert!(a.starts_with(&event_prefix(1, "abc", Some("dev1"))));
        assert!(!c.starts_with(&event_prefix(1, "abc", None)), "a longer SHA1 is not under a shorter one's prefix");
        assert_eq!(event_sha1_device(&a), Some((&b"abc"[..], &b"dev1"[..])));
        assert_eq!(event_sha1_device(&profile_key("abc")), None);
        assert_eq!(
            parse_key(&a),
            Some(KeyParts::Event { table: 1, sha1: "abc".into(), device: "dev1".into(), timestamp: -5 })
        );
    }
}
