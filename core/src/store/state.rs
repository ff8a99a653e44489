//! A detector's state, kept as a **base** and a **journal**: the base is every (key,
//! value) pair as of some pass, sorted and cut into pieces; each pass that changes the
//! state after it appends one journal entry, the pass's puts and deletes in order. Reading
//! the state (once per process, when the detector is initialised) applies the journal to
//! the base. When the journal outgrows the base, a pass writes the merged state as the
//! new base and drops the journal, in the same atomic batch as everything else of it.
//!
//! Why: a pass changes hundreds of a detector's keys (a record per row it keeps), and
//! sled's cost is per item — ~150–250 items took 1.5–2.5 ms of a pass's commit — while
//! a journal entry is a few pieces of ≤ 6 KiB whatever the number of keys.
//!
//! Keys, under the detector's state prefix ([`keys::state_prefix`]):
//! `b` + part u32 (the base's pieces) and `j` + entry u64 + part u32 (the journal's).
//! An entry (and the base) is a list of changes: tag (1 put, 0 delete), key length u32,
//! key, and for a put the value length u32 and the value, lengths little-endian.

use super::detectors::DetectorState;
use super::{keys, Result, Store};
use std::collections::BTreeMap;

/// Pieces are at most this long: sled writes a larger node to a file of its own.
const PIECE_BYTES: usize = 6 << 10;

/// The journal is merged into the base once it holds more bytes than the base and at
/// least this many, … (small in tests, so that they merge often)
const FOLD_MIN_BYTES: u64 = if cfg!(test) { 64 << 10 } else { 1 << 20 };
/// … or this many entries, whatever their size (each is read on a detector's start).
const FOLD_MAX_ENTRIES: u64 = if cfg!(test) { 16 } else { 1024 };

const BASE: u8 = b'b';
const JOURNAL: u8 = b'j';
const PUT: u8 = 1;
const DELETE: u8 = 0;

/// How much of a detector's state is where: what decides when the journal is merged, and
/// the number the next entry takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct StateSizes {
    base_bytes: u64,
    base_parts: u32,
    journal_bytes: u64,
    journal_entries: u64,
    next_entry: u64,
}

/// A detector's state as read: every pair, by key.
type StateMap = BTreeMap<Vec<u8>, Vec<u8>>;

/// One change of a pass: a key set to a value, or removed.
pub type StateChange<'a> = (&'a [u8], Option<&'a [u8]>);

fn base_part_key(prefix: &[u8], part: u32) -> Vec<u8> {
    [prefix, &[BASE], &part.to_be_bytes()].concat()
}

fn journal_part_key(prefix: &[u8], entry: u64, part: u32) -> Vec<u8> {
    [prefix, &[JOURNAL], &entry.to_be_bytes(), &part.to_be_bytes()].concat()
}

/// Appends `changes` to `out` in the entry layout. A key or value of 4 GiB or more has no
/// length in it: an error, not a truncated length.
pub(super) fn encode<'a>(changes: impl IntoIterator<Item = StateChange<'a>>, out: &mut Vec<u8>) -> Result<()> {
    let len = |b: &[u8]| {
        u32::try_from(b.len()).map(u32::to_le_bytes).map_err(|_| {
            super::StoreError::Invalid(format!("a detector state key or value of {} bytes (at most 4 GiB)", b.len()))
        })
    };
    for (k, v) in changes {
        out.push(if v.is_some() { PUT } else { DELETE });
        out.extend_from_slice(&len(k)?);
        out.extend_from_slice(k);
        if let Some(v) = v {
            out.extend_from_slice(&len(v)?);
            out.extend_from_slice(v);
        }
    }
    Ok(())
}

/// Applies an encoded list of changes to `state`.
fn apply(bytes: &[u8], state: &mut StateMap, what: &dyn Fn() -> String) -> Result<()> {
    fn take<'b>(b: &mut &'b [u8], n: usize) -> Option<&'b [u8]> {
        let (head, rest) = (b.get(..n)?, b.get(n..)?);
        *b = rest;
        Some(head)
    }
    fn len(b: &mut &[u8]) -> Option<usize> {
        Some(u32::from_le_bytes(take(b, 4)?.try_into().ok()?) as usize)
    }
    let mut b = bytes;
    while let Some(&tag) = b.first() {
        b = &b[1..];
        let parsed = (|| {
            let n = len(&mut b)?;
            let k = take(&mut b, n)?;
            match tag {
                PUT => {
                    let n = len(&mut b)?;
                    let v = take(&mut b, n)?;
                    state.insert(k.to_vec(), v.to_vec());
                }
                DELETE => {
                    state.remove(k);
                }
                _ => return None,
            }
            Some(())
        })();
        if parsed.is_none() {
            return Err(corrupt!("{}: a change cut short or of an unknown kind (tag {tag})", what()));
        }
    }
    Ok(())
}

impl Store {
    /// The state a detector committed with its passes, sorted by key.
    pub fn detector_state(&self, detector_id: &str) -> Result<DetectorState> {
        let (state, sizes) = self.read_state(detector_id)?;
        self.state_sizes.lock().unwrap_or_else(|p| p.into_inner()).insert(detector_id.to_string(), sizes);
        Ok(state.into_iter().collect())
    }

    /// The base with the journal applied, and how big each is.
    fn read_state(&self, detector_id: &str) -> Result<(StateMap, StateSizes)> {
        let prefix = keys::state_prefix(detector_id);
        let what = || format!("the state of detector {detector_id}");
        let mut sizes = StateSizes::default();
        let mut base = Vec::new();
        for kv in self.db.scan_prefix([prefix.as_slice(), &[BASE]].concat()) {
            let (_, v) = kv?;
            base.extend_from_slice(&v);
            sizes.base_parts += 1;
        }
        sizes.base_bytes = base.len() as u64;
        let mut state = BTreeMap::new();
        apply(&base, &mut state, &|| format!("{} (base)", what()))?;
        // Entries in order, each the concatenation of its parts.
        let mut entry: Option<u64> = None;
        let mut bytes = Vec::new();
        for kv in self.db.scan_prefix([prefix.as_slice(), &[JOURNAL]].concat()) {
            let (k, v) = kv?;
            let at = prefix.len() + 1;
            let n = k
                .get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| corrupt!("{}: a journal key of {} bytes", what(), k.len()))?;
            if entry.is_some_and(|e| e != n) {
                apply(&bytes, &mut state, &|| format!("{} (journal entry {})", what(), entry.unwrap_or(n)))?;
                bytes.clear();
            }
            if entry != Some(n) {
                sizes.journal_entries += 1;
            }
            entry = Some(n);
            sizes.journal_bytes += v.len() as u64;
            bytes.extend_from_slice(&v);
        }
        if let Some(e) = entry {
            apply(&bytes, &mut state, &|| format!("{} (journal entry {e})", what()))?;
        }
        sizes.next_entry = entry.map_or(0, |e| e + 1);
        Ok((state, sizes))
    }

    /// How big a detector's state is: as last read or written by this process, or read now.
    fn state_sizes_of(&self, detector_id: &str) -> Result<StateSizes> {
        if let Some(s) = self.state_sizes.lock().unwrap_or_else(|p| p.into_inner()).get(detector_id) {
            return Ok(*s);
        }
        let (_, sizes) = self.read_state(detector_id)?;
        self.state_sizes.lock().unwrap_or_else(|p| p.into_inner()).insert(detector_id.to_string(), sizes);
        Ok(sizes)
    }
}

/// Puts a pass's changes to a detector's state (`entry`, as [`encode`] wrote them) into
/// `batch`: one journal entry, or, when the journal has outgrown the base, the merged state
/// as the new base. Returns the sizes the state will have once `batch` commits. The
/// caller holds the store's pass-commit lock until then (the entry's number and the merge
/// are decided from the committed state).
pub(super) fn change(store: &Store, batch: &mut sled::Batch, detector_id: &str, entry: &[u8]) -> Result<StateSizes> {
    let prefix = keys::state_prefix(detector_id);
    let mut sizes = store.state_sizes_of(detector_id)?;
    let journal_bytes = sizes.journal_bytes + entry.len() as u64;
    let fold = sizes.journal_entries + 1 >= FOLD_MAX_ENTRIES || journal_bytes > sizes.base_bytes.max(FOLD_MIN_BYTES);
    if fold {
        let (mut state, read) = store.read_state(detector_id)?;
        apply(entry, &mut state, &|| "a pass's state changes".into())?;
        let mut base = Vec::new();
        encode(state.iter().map(|(k, v)| (k.as_slice(), Some(v.as_slice()))), &mut base)?;
        let parts = base.len().div_ceil(PIECE_BYTES) as u32;
        for (part, piece) in base.chunks(PIECE_BYTES).enumerate() {
            batch.insert(base_part_key(&prefix, part as u32), piece);
        }
        for part in parts..read.base_parts {
            batch.remove(base_part_key(&prefix, part));
        }
        for kv in store.db.scan_prefix([prefix.as_slice(), &[JOURNAL]].concat()).keys() {
            batch.remove(kv?);
        }
        sizes = StateSizes {
            base_bytes: base.len() as u64,
            base_parts: parts,
            journal_bytes: 0,
            journal_entries: 0,
            next_entry: read.next_entry,
        };
    } else {
        for (part, piece) in entry.chunks(PIECE_BYTES).enumerate() {
            batch.insert(journal_part_key(&prefix, sizes.next_entry, part as u32), piece);
        }
        sizes.journal_bytes = journal_bytes;
        sizes.journal_entries += 1;
        sizes.next_entry += 1;
    }
    Ok(sizes)
}

/// What a committed (or failed) batch leaves of its state changes in the store's figures.
pub(super) fn settle(store: &Store, changed: Vec<(String, StateSizes)>, committed: bool) {
    let mut known = store.state_sizes.lock().unwrap_or_else(|p| p.into_inner());
    for (id, sizes) in changed {
        if committed {
            known.insert(id, sizes);
        } else {
            // Read again when next needed: a failed commit may have left part of itself.
            known.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn open(dir: &std::path::Path) -> Store {
        Store::open(dir).unwrap()
    }

    /// Each pass: (key number, Some(value) | None) changes.
    fn passes() -> impl Strategy<Value = Vec<Vec<(u8, Option<Vec<u8>>)>>> {
        let change = (0u8..40, proptest::option::weighted(0.8, proptest::collection::vec(any::<u8>(), 0..3000)));
        proptest::collection::vec(proptest::collection::vec(change, 0..30), 1..40)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Whatever the passes, the state read back (in this process, after a reopen,
        /// across merges of the journal) is the model's.
        #[test]
        fn the_state_read_back_is_every_change_applied(passes in passes(), reopen_every in 1usize..8) {
            let dir = tempfile::tempdir().unwrap();
            let mut store = open(dir.path());
            let mut model = StateMap::new();
            for (i, pass) in passes.iter().enumerate() {
                let changes: Vec<(Vec<u8>, Option<Vec<u8>>)> =
                    pass.iter().map(|(k, v)| (vec![b'k', *k], v.clone())).collect();
                let mut batch = store.pass_batch();
                batch.change_state("d@1", changes.iter().map(|(k, v)| (k.as_slice(), v.as_deref()))).unwrap();
                batch.commit().unwrap();
                for (k, v) in changes {
                    match v {
                        Some(v) => { model.insert(k, v); }
                        None => { model.remove(&k); }
                    }
                }
                if i % reopen_every == 0 {
                    drop(store);
                    store = open(dir.path());
                }
                let want: DetectorState = model.clone().into_iter().collect();
                prop_assert_eq!(store.detector_state("d@1").unwrap(), want);
                prop_assert!(store.detector_state("d@2").unwrap().is_empty(), "another detector's state is apart");
            }
        }
    }

    #[test]
    fn a_journal_is_merged_once_it_outgrows_the_base_and_a_dropped_batch_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let value = vec![7u8; 100_000];
        let mut merges = 0;
        for pass in 0u32..40 {
            let key = pass.to_be_bytes();
            let mut batch = store.pass_batch();
            batch.change_state("d@1", [(&key[..], Some(value.as_slice()))]).unwrap();
            batch.commit().unwrap();
            let s = store.state_sizes_of("d@1").unwrap();
            assert!(s.journal_entries < FOLD_MAX_ENTRIES, "{s:?}");
            assert!(s.journal_bytes <= s.base_bytes.max(FOLD_MIN_BYTES), "{s:?}");
            merges += usize::from(s.journal_entries == 0);
        }
        // 100 KB a pass, each under its own key: the base doubles or so between merges.
        assert!((4..=8).contains(&merges), "{merges} merges");
        let sizes = store.state_sizes_of("d@1").unwrap();
        {
            let mut batch = store.pass_batch();
            batch.change_state("d@1", [(&b"gone"[..], Some(&b"x"[..]))]).unwrap();
            let err = batch.change_state("d@1", [(&b"twice"[..], None)]).unwrap_err();
            assert!(err.to_string().contains("twice"), "{err}");
        }
        assert_eq!(store.state_sizes_of("d@1").unwrap(), sizes, "a dropped batch wrote nothing");
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.state_sizes_of("d@1").unwrap(), sizes, "read back: a merged journal is gone");
        let state = store.detector_state("d@1").unwrap();
        assert_eq!(state.len(), 40);
        assert!(state.iter().all(|(k, v)| k.len() == 4 && v == &value));
        // Every stored piece is small.
        for kv in store.db.scan_prefix(keys::state_prefix("d@1")) {
            assert!(kv.unwrap().1.len() <= PIECE_BYTES);
        }
    }

    #[test]
    fn batches_built_at_the_same_time_take_an_entry_each() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut first = store.pass_batch();
        first.change_state("d@1", [(&b"a"[..], Some(&b"1"[..]))]).unwrap();
        let mut second = store.pass_batch();
        second.change_state("d@1", [(&b"b"[..], Some(&b"22"[..])), (&b"c"[..], Some(&b"3"[..]))]).unwrap();
        second.commit().unwrap();
        first.commit().unwrap();
        let want =
            vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"22".to_vec()), (b"c".to_vec(), b"3".to_vec())];
        assert_eq!(store.detector_state("d@1").unwrap(), want);
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.detector_state("d@1").unwrap(), want);
        assert_eq!(store.state_sizes_of("d@1").unwrap().journal_entries, 2);
    }

    #[test]
    fn a_damaged_entry_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let prefix = keys::state_prefix("d@1");
        store.db.insert(journal_part_key(&prefix, 3, 0), &[PUT, 9, 0, 0, 0, b'k'][..]).unwrap();
        let err = store.detector_state("d@1").unwrap_err().to_string();
        assert!(err.contains("detector d@1") && err.contains("journal entry 3"), "{err}");
    }
}
