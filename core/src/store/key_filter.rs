//! A Bloom filter of the stored event keys, so that storing a new row does not first have
//! to look for it in sled.
//!
//! Why: every event row is insert-if-absent, and on a store many times larger than sled's
//! cache the "is it there?" read costs about as much as the insert itself (a random descent
//! that usually misses the cache). Nearly every row is new; a filter that says "certainly
//! not stored" lets those skip the read. A "maybe" (a stored key, or a false positive at
//! about 1%) still reads sled, so the filter can only save work, never change an answer.
//!
//! The filter grows by adding a larger filter when the current one is full (a scalable
//! Bloom filter). It is kept in memory while the store is open and saved next to the
//! database by [`Store::flush_and_save_key_filter`](super::Store::flush_and_save_key_filter)
//! with the batch sequence and event row count it covers and a checksum; a saved filter
//! that does not match the store exactly (a crash after more batches were committed) or
//! fails its checksum is discarded and rebuilt from the stored keys.

use crate::error::{StoreContext as _, StoreError};
type Result<T, E = StoreError> = std::result::Result<T, E>;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

/// Bits per key and probes: ~1% false positives.
const BITS_PER_KEY: u64 = 10;
const PROBES: u32 = 7;
/// Words per block: every probe of a key lands in one 512-bit block (one cache line), so
/// a look-up in a filter many times the CPU cache costs one miss, not one per probe.
const BLOCK_WORDS: usize = 8;
const FIRST_CAPACITY: u64 = 1 << 16;
/// The layout's version: a filter saved by another layout is not used (it is rebuilt).
const MAGIC: &[u8; 8] = b"LKTKEYF3";

struct Layer {
    bits: Vec<u64>,
    capacity: u64,
    len: u64,
}

impl Layer {
    fn new(capacity: u64) -> Layer {
        let blocks = (capacity * BITS_PER_KEY).div_ceil(64 * BLOCK_WORDS as u64).max(1);
        Layer { bits: vec![0; blocks as usize * BLOCK_WORDS], capacity, len: 0 }
    }

    /// The key's block (chosen by the first hash, by multiply-shift rather than a
    /// division) and its probes' bits in it (9 bits of the second hash each).
    fn block_and_bits(&self, (h1, h2): (u64, u64)) -> (usize, [u16; PROBES as usize]) {
        let blocks = (self.bits.len() / BLOCK_WORDS) as u128;
        let block = ((h1 as u128 * blocks) >> 64) as usize;
        let bits = std::array::from_fn(|i| ((h2 >> (9 * i)) & 511) as u16);
        (block * BLOCK_WORDS, bits)
    }

    fn insert(&mut self, h: (u64, u64)) {
        let (base, bits) = self.block_and_bits(h);
        for b in bits {
            self.bits[base + (b / 64) as usize] |= 1 << (b % 64);
        }
        self.len += 1;
    }

    fn may_contain(&self, h: (u64, u64)) -> bool {
        let (base, bits) = self.block_and_bits(h);
        bits.iter().all(|&b| self.bits[base + (b / 64) as usize] & (1 << (b % 64)) != 0)
    }
}

/// The stored event keys, approximately (no false negatives).
pub struct KeyFilter {
    layers: Vec<Layer>,
}

impl Default for KeyFilter {
    fn default() -> Self {
        KeyFilter { layers: vec![Layer::new(FIRST_CAPACITY)] }
    }
}

impl KeyFilter {
    /// A filter whose first layer holds `keys` (a rebuild sizes it to the store, so a
    /// large store does not end up with many small layers and their false positives).
    pub fn with_capacity(keys: u64) -> KeyFilter {
        KeyFilter { layers: vec![Layer::new(keys.max(FIRST_CAPACITY))] }
    }
}

/// Two independent 64-bit hashes of a key: the halves of its 128-bit XXH3.
fn hashes(key: &[u8]) -> (u64, u64) {
    let h = xxhash_rust::xxh3::xxh3_128(key);
    (h as u64, (h >> 64) as u64)
}

impl KeyFilter {
    pub fn insert(&mut self, key: &[u8]) {
        let full = self.layers.last().is_none_or(|l| l.len >= l.capacity);
        if full {
            let next = self.layers.last().map_or(FIRST_CAPACITY, |l| l.capacity * 2);
            self.layers.push(Layer::new(next));
        }
        if let Some(layer) = self.layers.last_mut() {
            layer.insert(hashes(key));
        }
    }

    /// `false` only if the key was never inserted.
    pub fn may_contain(&self, key: &[u8]) -> bool {
        let h = hashes(key);
        self.layers.iter().any(|l| l.may_contain(h))
    }

    /// Writes the filter with what it covers and a checksum (atomically: a temporary
    /// file, synced, then renamed).
    pub fn save(&self, path: &Path, seq: u64, rows: u64) -> Result<()> {
        let mut out = Vec::with_capacity(64 + self.layers.iter().map(|l| 24 + l.bits.len() * 8).sum::<usize>());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&rows.to_le_bytes());
        out.extend_from_slice(&(self.layers.len() as u64).to_le_bytes());
        for l in &self.layers {
            out.extend_from_slice(&l.capacity.to_le_bytes());
            out.extend_from_slice(&l.len.to_le_bytes());
            out.extend_from_slice(&(l.bits.len() as u64).to_le_bytes());
            for w in &l.bits {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        let tmp = path.with_extension("tmp");
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            f.write_all(&out)?;
            f.sync_all()
        });
        if let Err(e) = written {
            // A partial file (a full disk) must not keep the space it took.
            let _ = std::fs::remove_file(&tmp);
            return Err(corrupt!("cannot write {}: {e}", tmp.display()));
        }
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    }

    /// Reads a saved filter if it covers exactly `seq` and `rows`; `None` when it is
    /// missing, stale or unreadable (the caller rebuilds it).
    pub fn load(path: &Path, seq: u64, rows: u64) -> Option<KeyFilter> {
        let bytes = std::fs::read(path).ok()?;
        match parse(&bytes, seq, rows) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!(file = %path.display(), reason = %e, "saved key filter not used");
                None
            }
        }
    }
}

fn parse(bytes: &[u8], seq: u64, rows: u64) -> Result<KeyFilter> {
    // A torn or damaged file must not pass for a filter (it could say "not stored" of a
    // stored key): the checksum covers everything before it.
    let body_len = bytes.len().checked_sub(32).ok_or_else(|| corrupt!("too short"))?;
    let (bytes, digest) = bytes.split_at(body_len);
    if Sha256::digest(bytes).as_slice() != digest {
        return Err(corrupt!("checksum mismatch"));
    }
    let mut at = 0usize;
    let mut word = || -> Result<u64> {
        let w = bytes.get(at..at + 8).ok_or_else(|| corrupt!("truncated at byte {at}"))?;
        at += 8;
        Ok(u64::from_le_bytes(w.try_into().map_err(|_| corrupt!("truncated"))?))
    };
    if word()?.to_le_bytes() != *MAGIC {
        return Err(corrupt!("not a key filter"));
    }
    let (s, r) = (word()?, word()?);
    if (s, r) != (seq, rows) {
        return Err(corrupt!("covers batch {s} and {r} rows; the store is at batch {seq} with {rows} rows"));
    }
    let n = word()?;
    let mut layers = Vec::new();
    for _ in 0..n {
        let (capacity, len, words) = (word()?, word()?, word()?);
        // A corrupt length must not allocate more than the file holds.
        if words == 0 || words % BLOCK_WORDS as u64 != 0 || words > (bytes.len() / 8) as u64 {
            return Err(corrupt!("corrupt layer size {words}"));
        }
        let bits = (0..words).map(|_| word()).collect::<Result<Vec<u64>>>()?;
        layers.push(Layer { bits, capacity, len });
    }
    if layers.is_empty() {
        return Err(corrupt!("no layers"));
    }
    Ok(KeyFilter { layers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives_across_growth() {
        let mut f = KeyFilter::default();
        let n = 300_000u64; // several layers
        for i in 0..n {
            f.insert(format!("stored-{i}").as_bytes());
        }
        assert!(f.layers.len() > 2);
        assert!((0..n).all(|i| f.may_contain(format!("stored-{i}").as_bytes())));
        let fp = (0..100_000).filter(|i| f.may_contain(format!("absent-{i}").as_bytes())).count();
        // ~1% per layer that is full, a few layers: well under 5%.
        assert!(fp < 5_000, "{fp} false positives in 100k");
    }

    /// Every probe of a key in one block costs some accuracy: a filter at its capacity
    /// still says "maybe" of under 2% of absent keys.
    #[test]
    fn a_full_layer_has_about_one_percent_false_positives() {
        let n = 200_000u64;
        let mut f = KeyFilter::with_capacity(n);
        for i in 0..n {
            f.insert(format!("stored-{i}").as_bytes());
        }
        assert_eq!(f.layers.len(), 1);
        let fp = (0..100_000).filter(|i| f.may_contain(format!("absent-{i}").as_bytes())).count();
        assert!(fp < 2_000, "{fp} false positives in 100k");
    }

    /// A filter saved in the layout before blocks (its probes elsewhere) would say "not
    /// stored" of stored keys: it is rebuilt, not read.
    #[test]
    fn a_filter_saved_in_another_layout_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.filter");
        let mut f = KeyFilter::default();
        f.insert(b"k");
        f.save(&path, 1, 1).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let body = bytes.len() - 32;
        bytes[..8].copy_from_slice(b"LKTKEYF2");
        let digest = Sha256::digest(&bytes[..body]);
        bytes[body..].copy_from_slice(&digest);
        std::fs::write(&path, &bytes).unwrap();
        assert!(KeyFilter::load(&path, 1, 1).is_none());
    }

    #[test]
    fn saved_filter_is_used_only_for_the_state_it_covers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.filter");
        let mut f = KeyFilter::default();
        for i in 0..1000 {
            f.insert(format!("k{i}").as_bytes());
        }
        f.save(&path, 7, 1000).unwrap();
        let back = KeyFilter::load(&path, 7, 1000).expect("matches");
        assert!((0..1000).all(|i| back.may_contain(format!("k{i}").as_bytes())));
        assert!(KeyFilter::load(&path, 8, 1000).is_none(), "a later batch: stale");
        assert!(KeyFilter::load(&path, 7, 1001).is_none(), "another row count: stale");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(KeyFilter::load(&path, 7, 1000).is_none(), "truncated: rebuilt, not trusted");
        let mut zeroed = bytes.clone();
        zeroed[100..200].fill(0);
        std::fs::write(&path, &zeroed).unwrap();
        assert!(KeyFilter::load(&path, 7, 1000).is_none(), "damaged bits: rebuilt, not trusted");
        std::fs::write(&path, &bytes).unwrap();
        assert!(KeyFilter::load(&path, 7, 1000).is_some());
    }
}
