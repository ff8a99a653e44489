//! The results tree and the outbox: each finding's JSON line under its id (`f`: a
//! finding is stored once), and the order the lines go out in (`q`): the ids of the
//! findings a commit adds, with consecutive outbox sequences, in entries of up to
//! [`IDS_PER_ENTRY`] under the sequence of their first.
//!
//! Why entries of many ids: one item per finding was a third of what sled's apply of an
//! attack-dense pass cost (125 findings: 3.8 ms with, 2.9 ms without; BENCHMARKS.md).

use super::{blocks, keys, Result, Store};
use crate::error::StoreContext as _;

/// Ids per outbox entry: ~36 bytes each, so an entry stays far below the size at which
/// sled writes a node as a blob.
const IDS_PER_ENTRY: usize = 128;

/// Writes the ids of a commit's new findings, in outbox order, as outbox entries of
/// consecutive sequences from `first`.
pub(super) fn write_new(first: u64, ids: &[String], batch: &mut sled::Batch) {
    for (n, entry) in ids.chunks(IDS_PER_ENTRY).enumerate() {
        let ids: Vec<&[u8]> = entry.iter().map(|id| id.as_bytes()).collect();
        let seq = first + (n * IDS_PER_ENTRY) as u64;
        batch.insert(keys::seq_key(keys::OUTBOX, seq), blocks::pack_items(&ids));
    }
}

/// A finding as the outbox hands it out: its sequence and its JSON line.
type Line = (u64, Vec<u8>);

/// One outbox entry: the sequence of its first id, and its ids.
struct Entry {
    first: u64,
    ids: sled::IVec,
}

impl Entry {
    fn read(kv: sled::Result<(sled::IVec, sled::IVec)>) -> Result<Entry> {
        let (k, ids) = kv?;
        let first = keys::seq_of(&k).ok_or_else(|| corrupt!("corrupt outbox key"))?;
        Ok(Entry { first, ids })
    }

    fn ids(&self) -> Result<Vec<&[u8]>> {
        blocks::unpack_items(&self.ids).with_context(|| format!("outbox entry {}", self.first))
    }

    /// The sequence after its last id.
    fn end(&self) -> Result<u64> {
        Ok(self.first + self.ids()?.len() as u64)
    }
}

impl Store {
    /// The sequence the next finding takes in the outbox.
    pub fn next_outbox_seq(&self) -> Result<u64> {
        match self.db.scan_prefix([keys::OUTBOX]).next_back() {
            Some(kv) => Entry::read(kv)?.end(),
            None => Ok(1),
        }
    }

    /// Whether a finding with this id is in the results tree.
    pub fn has_finding(&self, finding_id: &str) -> Result<bool> {
        Ok(self.db.get(keys::named_key(keys::FINDING, finding_id))?.is_some())
    }

    /// Whether any finding is in the outbox at sequence `from` or later.
    pub fn outbox_has_from(&self, from: u64) -> Result<bool> {
        Ok(self.next_outbox_seq()? > from)
    }

    /// The findings of the outbox from sequence `from` on, in order: (sequence, JSON line).
    pub fn outbox_from(&self, from: u64) -> impl Iterator<Item = Result<Line>> + '_ {
        // The entry holding `from` starts at or before it. A failed read of where is the
        // iterator's only item, not a silent start further on.
        let (start, failed) = match self.entry_holding(from) {
            Ok(start) => (start, None),
            Err(e) => (u64::MAX, Some(Err(e))),
        };
        let entries = self.db.range(keys::seq_key(keys::OUTBOX, start)..keys::seq_key(keys::OUTBOX, u64::MAX));
        failed.into_iter().chain(entries.flat_map(move |kv| {
            let lines = || -> Result<Vec<Result<Line>>> {
                let entry = Entry::read(kv)?;
                let mut out = Vec::new();
                for (n, id) in entry.ids()?.into_iter().enumerate() {
                    let seq = entry.first + n as u64;
                    if seq < from {
                        continue;
                    }
                    let id = String::from_utf8_lossy(id);
                    match self.db.get(keys::named_key(keys::FINDING, &id)) {
                        Ok(Some(json)) => out.push(Ok((seq, json.to_vec()))),
                        Ok(None) => {
                            out.push(Err(corrupt!("finding {id} (outbox sequence {seq}) is not in the results tree")))
                        }
                        Err(e) => out.push(Err(e.into())),
                    }
                }
                Ok(out)
            };
            lines().unwrap_or_else(|e| vec![Err(e)])
        }))
    }

    /// The first sequence of the outbox entry that holds `seq` (`seq` itself if none does).
    fn entry_holding(&self, seq: u64) -> Result<u64> {
        match self.db.range(keys::seq_key(keys::OUTBOX, 0)..=keys::seq_key(keys::OUTBOX, seq)).next_back() {
            Some(kv) => keys::seq_of(&kv?.0).ok_or_else(|| corrupt!("corrupt outbox key")),
            None => Ok(seq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64) -> Vec<u8> {
        format!("{{\"finding\":{seq}}}").into_bytes()
    }

    #[test]
    fn findings_come_out_in_outbox_order_from_any_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.next_outbox_seq().unwrap(), 1);
        assert!(!store.outbox_has_from(1).unwrap());
        let mut seq = 1;
        // Commits of one finding, of more than an entry holds, of none, of a few.
        for (commit, count) in [1usize, 300, 0, 3].into_iter().enumerate() {
            let mut b = store.pass_batch();
            for n in 0..count {
                b.put_finding(&format!("{commit}-{n:04}"), line(seq));
                seq += 1;
            }
            b.commit().unwrap();
        }
        assert_eq!(store.next_outbox_seq().unwrap(), seq);
        let all: Vec<(u64, Vec<u8>)> = (1..seq).map(|s| (s, line(s))).collect();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        for from in [1, 2, 129, 130, 200, 301, 302, seq - 1, seq] {
            let read: Vec<(u64, Vec<u8>)> = store.outbox_from(from).map(|r| r.unwrap()).collect();
            assert_eq!(read, all[(from - 1) as usize..], "from {from}");
            assert_eq!(store.outbox_has_from(from).unwrap(), from < seq, "from {from}");
        }
        assert!(store.has_finding("1-0299").unwrap());
        assert!(!store.has_finding("1-0300").unwrap());
        // One item per commit's run of ids, not one per finding.
        assert_eq!(store.db.scan_prefix([keys::OUTBOX]).count(), 1 + 3 + 1);
    }
}
