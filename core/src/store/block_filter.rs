//! A Bloom filter of the SHA1 values of one block's rows, kept after the block's directory
//! entry (`D`). A pass that hands a detector only the new rows whose SHA1 is in a set
//! (`SHA1 in~ (…)`, the WinRM rule's candidate files) probes it and skips every block that
//! cannot hold one, instead of reading and decompressing the keys of all new rows: on a
//! 10k-row tick, the 5.5k new file events' keys were most of the pass.
//!
//! The filter follows the encoded [`super::blocks::BlockMeta`] in the same value, so a
//! store written before it reads the same (bincode stops at the end of the meta), and a
//! block without one is read as before. Values are ASCII-lowercased, as the condition
//! compares them. A block holding a value cut for length, or no event keys, gets none.

use super::keys;
use xxhash_rust::xxh3::xxh3_128;

/// Marks the filter after the meta (anything else there is ignored).
const TAG: u8 = b'S';
/// Bits per distinct value, and probes: about 0.3% false positives.
const BITS_PER_VALUE: usize = 12;
const PROBES: u32 = 8;

/// The filter of one block, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Sha1Filter {
    words: Vec<u64>,
}

impl Sha1Filter {
    /// The filter of a block whose row keys are `keys`; `None` when a key is not an event
    /// key or holds a SHA1 cut for length (such a row is checked from the row itself, so
    /// its block must always be read).
    pub fn of_keys<K: AsRef<[u8]>>(keys: &[K]) -> Option<Sha1Filter> {
        let mut hashes = Vec::with_capacity(keys.len());
        let mut lower = Vec::with_capacity(40);
        for key in keys {
            let (sha1, _) = keys::event_sha1_device(key.as_ref())?;
            if sha1.len() >= u16::MAX as usize {
                return None;
            }
            lower.clear();
            lower.extend(sha1.iter().map(u8::to_ascii_lowercase));
            hashes.push(hash(&lower));
        }
        hashes.sort_unstable();
        hashes.dedup();
        let bits = (hashes.len() * BITS_PER_VALUE).next_power_of_two().max(64);
        let mut words = vec![0u64; bits / 64];
        for h in hashes {
            for bit in bits_of(h, bits) {
                words[bit / 64] |= 1 << (bit % 64);
            }
        }
        Some(Sha1Filter { words })
    }

    /// Appends the filter to an encoded block meta.
    pub fn append_to(&self, value: &mut Vec<u8>) {
        value.push(TAG);
        for w in &self.words {
            value.extend_from_slice(&w.to_le_bytes());
        }
    }

    /// The filter after the `meta_len` bytes of an encoded meta, if there is one.
    pub fn after_meta(value: &[u8], meta_len: usize) -> Option<Sha1Filter> {
        let rest = value.get(meta_len..)?;
        let (&tag, words) = rest.split_first()?;
        if tag != TAG || words.is_empty() || words.len() % 8 != 0 || !(words.len() / 8).is_power_of_two() {
            return None;
        }
        let words = words
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
            .collect();
        Some(Sha1Filter { words })
    }

    fn may_hold(&self, h: (u64, u64)) -> bool {
        let bits = self.words.len() * 64;
        bits_of(h, bits).all(|bit| self.words[bit / 64] & (1 << (bit % 64)) != 0)
    }
}

/// The SHA1 sets of a filter (`SHA1 in~ (…)`, each ANDed), hashed once for every block.
#[derive(Debug, Clone)]
pub struct Sha1Probe {
    sets: Vec<Vec<(u64, u64)>>,
}

impl Sha1Probe {
    /// From the ASCII-lowercased values of each set.
    pub fn new<'v>(sets: impl IntoIterator<Item = impl IntoIterator<Item = &'v [u8]>>) -> Sha1Probe {
        Sha1Probe { sets: sets.into_iter().map(|set| set.into_iter().map(hash).collect()).collect() }
    }

    /// Whether a block with this filter may hold a row that meets every set: false when
    /// one set has no value the filter may hold.
    pub fn may_match(&self, filter: &Sha1Filter) -> bool {
        self.sets.iter().all(|set| set.iter().any(|h| filter.may_hold(*h)))
    }
}

fn hash(value: &[u8]) -> (u64, u64) {
    let h = xxh3_128(value);
    (h as u64, (h >> 64) as u64 | 1)
}

/// Double hashing: probe `i` is `h1 + i·h2` (h2 odd), modulo the (power of two) size.
fn bits_of((h1, h2): (u64, u64), bits: usize) -> impl Iterator<Item = usize> {
    let mask = bits as u64 - 1;
    (0..u64::from(PROBES)).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) & mask) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sha1: &str) -> Vec<u8> {
        keys::event_key(1, sha1, "device", 0, "1")
    }

    #[test]
    fn every_value_of_the_block_may_match_in_any_case_and_others_rarely_do() {
        let sha1s: Vec<String> = (0..300).map(|i| format!("{:040X}", i * 7919)).collect();
        let f = Sha1Filter::of_keys(&sha1s.iter().map(|s| key(s)).collect::<Vec<_>>()).unwrap();
        let mut value = vec![1, 2, 3];
        f.append_to(&mut value);
        let back = Sha1Filter::after_meta(&value, 3).unwrap();
        assert_eq!(back, f);
        for s in &sha1s {
            let lower = s.to_ascii_lowercase();
            assert!(Sha1Probe::new([[lower.as_bytes()]]).may_match(&back), "{s}");
        }
        let others: Vec<String> = (0..2000).map(|i| format!("{:040x}", 1_000_003 + i * 31)).collect();
        let false_positives = others.iter().filter(|o| Sha1Probe::new([[o.as_bytes()]]).may_match(&back)).count();
        assert!(false_positives < 40, "{false_positives} of 2000");
        // Both sets must find a value; an empty set finds none.
        let one = sha1s[0].to_ascii_lowercase();
        assert!(!Sha1Probe::new([vec![one.as_bytes()], vec![]]).may_match(&back));
        assert!(!Sha1Probe::new([Vec::<&[u8]>::new()]).may_match(&back));
    }

    #[test]
    fn a_block_with_a_cut_value_or_a_profile_key_has_no_filter() {
        assert!(Sha1Filter::of_keys(&[key("a"), keys::profile_key("b")]).is_none());
        let long = "x".repeat(u16::MAX as usize + 10);
        assert!(Sha1Filter::of_keys(&[key(&long)]).is_none());
        // A meta without a filter (a store written before filters) reads as none.
        assert!(Sha1Filter::after_meta(&[1, 2, 3], 3).is_none());
        assert!(Sha1Filter::after_meta(&[1, 2, 3, TAG, 1, 2], 3).is_none());
        let mut other_tag = vec![1, 2, 3, b'X'];
        other_tag.extend_from_slice(&[0; 8]);
        assert!(Sha1Filter::after_meta(&other_tag, 3).is_none(), "another tag");
        let mut three_words = vec![1, 2, 3, TAG];
        three_words.extend_from_slice(&[0; 24]);
        assert!(Sha1Filter::after_meta(&three_words, 3).is_none(), "not a power of two");
    }
}
