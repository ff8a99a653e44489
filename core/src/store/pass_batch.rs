//! What one detector's pass commits — its new findings, its state changes, its cursor and
//! when to wake it — as one atomic batch, made through a shared reference to the store:
//! the scheduler commits one detector's pass while others still read the store for
//! theirs. Nothing of it touches rows, so it needs none of [`super::WriteBatch`]'s
//! bookkeeping; passes' commits are serialised among themselves, and what depends on
//! what is committed — the outbox sequences the findings take, where the state changes
//! go — is decided under that lock, so batches built at the same time cannot collide.

use super::detectors::{cursor_key, params_key, wake_key};
use super::outbox;
use super::state::{self, StateChange, StateSizes};
use super::{keys, Result, Store};
use crate::error::StoreContext as _;

/// One detector pass's changes, until they commit (or are dropped: nothing is written).
pub struct PassBatch<'s> {
    store: &'s Store,
    batch: sled::Batch,
    /// New findings' ids, in the order they go out.
    findings: Vec<String>,
    /// Each detector's state changes, encoded: where they go (a journal entry's number, or
    /// a merge) is decided under the commit lock, from the committed state.
    state_changes: Vec<(String, Vec<u8>)>,
}

impl Store {
    /// An empty pass batch.
    pub fn pass_batch(&self) -> PassBatch<'_> {
        PassBatch { store: self, batch: sled::Batch::default(), findings: Vec::new(), state_changes: Vec::new() }
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
        let mut entry = Vec::new();
        state::encode(changes, &mut entry)?;
        if !entry.is_empty() {
            self.state_changes.push((detector_id.to_string(), entry));
        }
        Ok(())
    }

    /// Moves a detector's cursor.
    pub fn set_cursor(&mut self, detector_id: &str, seq: u64) {
        self.batch.insert(cursor_key(detector_id), &seq.to_be_bytes()[..]);
    }

    /// Records the parameters a detector's pass ran with (see [`Store::detector_params`]).
    pub fn set_params(&mut self, detector_id: &str, params: &str) {
        self.batch.insert(params_key(detector_id), params.as_bytes());
    }

    /// Records (`Some`) or clears (`None`) when a detector is to be run again.
    pub fn set_wake_at(&mut self, detector_id: &str, at: Option<i64>) {
        match at {
            Some(t) => self.batch.insert(wake_key(detector_id), &t.to_be_bytes()[..]),
            None => self.batch.remove(wake_key(detector_id)),
        }
    }

    /// Commits everything at once; the findings take the next outbox sequences, and each
    /// state change its place in the journal (or a merge), decided under the lock from
    /// what is committed.
    pub fn commit(self) -> Result<()> {
        let PassBatch { store, mut batch, findings, state_changes } = self;
        let _one_at_a_time = store.pass_commits.lock().unwrap_or_else(|p| p.into_inner());
        if !findings.is_empty() {
            let first = store.next_outbox_seq()?;
            outbox::write_new(first, &findings, &mut batch);
        }
        let mut sizes: Vec<(String, StateSizes)> = Vec::with_capacity(state_changes.len());
        for (id, entry) in state_changes {
            let s = state::change(store, &mut batch, &id, &entry)?;
            sizes.push((id, s));
        }
        let applied = store.db.apply_batch(batch).context("cannot commit a detector's pass to the database");
        state::settle(store, sizes, applied.is_ok());
        applied
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
