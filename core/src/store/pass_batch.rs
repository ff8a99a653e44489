//! What one detector's pass commits — its new findings, its state changes, its cursor and
//! when to wake it — as one atomic batch, made through a shared reference to the store:
//! the scheduler commits one detector's pass while others still read the store for
//! theirs. Nothing of it touches rows, so it needs none of [`super::WriteBatch`]'s
//! bookkeeping; passes' commits are serialised among themselves (the outbox sequences
//! their findings take are decided under that lock).

use super::detectors::{cursor_key, wake_key};
use super::outbox::NewFindings;
use super::state::{self, StateChange, StateSizes};
use super::{keys, Result, Store};
use crate::error::StoreContext as _;

/// One detector pass's changes, until they commit (or are dropped: nothing is written).
pub struct PassBatch<'s> {
    store: &'s Store,
    batch: sled::Batch,
    /// New findings' ids, in the order they go out.
    findings: Vec<String>,
    /// The detectors whose state this batch changes, with the sizes it leaves.
    state_changes: Vec<(String, StateSizes)>,
    committed: bool,
}

impl Store {
    /// An empty pass batch.
    pub fn pass_batch(&self) -> PassBatch<'_> {
        PassBatch {
            store: self,
            batch: sled::Batch::default(),
            findings: Vec::new(),
            state_changes: Vec::new(),
            committed: false,
        }
    }
}

impl<'s> PassBatch<'s> {
    pub fn store(&self) -> &'s Store {
        self.store
    }

    /// A new finding: its line into the results tree, its id next in the outbox.
    pub fn put_finding(&mut self, finding_id: &str, json: Vec<u8>) {
        self.batch.insert(keys::named_key(keys::FINDING, finding_id), json);
        self.findings.push(finding_id.to_string());
    }

    /// A pass's changes to a detector's state, in order (see [`state`]). At most once per
    /// detector and batch.
    pub fn change_state<'a>(
        &mut self,
        detector_id: &str,
        changes: impl IntoIterator<Item = StateChange<'a>>,
    ) -> Result<()> {
        if self.state_changes.iter().any(|(id, _)| id == detector_id) {
            return Err(super::StoreError::Invalid(format!(
                "the state of detector {detector_id} was changed twice in one batch"
            )));
        }
        if let Some(sizes) = state::change(self.store, &mut self.batch, detector_id, changes)? {
            self.state_changes.push((detector_id.to_string(), sizes));
        }
        Ok(())
    }

    /// Moves a detector's cursor.
    pub fn set_cursor(&mut self, detector_id: &str, seq: u64) {
        self.batch.insert(cursor_key(detector_id), &seq.to_be_bytes()[..]);
    }

    /// Records (`Some`) or clears (`None`) when a detector is to be run again.
    pub fn set_wake_at(&mut self, detector_id: &str, at: Option<i64>) {
        match at {
            Some(t) => self.batch.insert(wake_key(detector_id), &t.to_be_bytes()[..]),
            None => self.batch.remove(wake_key(detector_id)),
        }
    }

    /// Commits everything at once; the findings take the next outbox sequences.
    pub fn commit(mut self) -> Result<()> {
        let _one_at_a_time = self.store.pass_commits.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch = std::mem::take(&mut self.batch);
        if !self.findings.is_empty() {
            let first = self.store.next_outbox_seq()?;
            let ids = std::mem::take(&mut self.findings);
            NewFindings(ids.into_iter().zip(first..).map(|(id, seq)| (seq, id)).collect()).write(&mut batch);
        }
        self.store.db.apply_batch(batch).context("cannot commit a detector's pass to the database")?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PassBatch<'_> {
    fn drop(&mut self) {
        state::settle(self.store, std::mem::take(&mut self.state_changes), self.committed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_take_consecutive_outbox_sequences_and_a_dropped_batch_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        {
            let mut dropped = store.pass_batch();
            dropped.put_finding("x", b"{}".to_vec());
            dropped.set_cursor("d@1", 9);
        }
        assert_eq!((store.next_outbox_seq().unwrap(), store.meta_cursor("d@1").unwrap()), (1, None));
        for (ids, cursor) in [(vec!["a", "b"], 3), (vec![], 4), (vec!["c"], 5)] {
            let mut b = store.pass_batch();
            for id in ids {
                b.put_finding(id, format!("{{\"id\":\"{id}\"}}").into_bytes());
            }
            b.set_cursor("d@1", cursor);
            b.set_wake_at("d@1", Some(cursor as i64 * 10));
            b.commit().unwrap();
        }
        let lines: Vec<(u64, Vec<u8>)> = store.outbox_from(1).map(Result::unwrap).collect();
        let want: Vec<(u64, Vec<u8>)> = [(1, "a"), (2, "b"), (3, "c")]
            .into_iter()
            .map(|(s, id)| (s, format!("{{\"id\":\"{id}\"}}").into_bytes()))
            .collect();
        assert_eq!(lines, want);
        assert_eq!(store.meta_cursor("d@1").unwrap(), Some(5));
        assert_eq!(store.wake_at("d@1").unwrap(), Some(50));
        let mut clear = store.pass_batch();
        clear.set_wake_at("d@1", None);
        clear.commit().unwrap();
        assert_eq!(store.wake_at("d@1").unwrap(), None);
    }
}
