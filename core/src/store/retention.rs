//! Retention: a row is kept while its Timestamp ≥ now − retention (the boundary `ago()`
//! has). Rows past the horizon are invisible at once (every read checks the Timestamp in
//! the key). A block goes from the directory once every row of it is past the horizon
//! (its directory entry and the counters in one atomic batch, so a crash leaves either
//! the whole block or none of it), a key-index run once every entry of it is; and a
//! generation ([`super::generations`]) left with neither goes whole, its file deleted,
//! which is when the space comes back. FileProfile rows are exempt (newest wins).
//!
//! Blocks hold rows in ingest order, which on a collector is close to Timestamp order, so
//! a block is past the horizon soon after its newest row is.

use super::blocks::{self, BlockMeta};
use super::{dec, enc, keys, Store, PROFILE_TABLE};
use crate::error::{StoreContext as _, StoreError};
type Result<T, E = StoreError> = std::result::Result<T, E>;
use std::collections::BTreeMap;

/// Blocks removed per atomic step (each step is one `apply_batch`).
pub const BLOCKS_PER_STEP: usize = 64;

/// What the rows within retention look like (for `status`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retained {
    /// Rows within retention per table (FileProfile included).
    pub rows: BTreeMap<String, u64>,
    /// Stored rows past the horizon whose blocks are not removed yet.
    pub invisible: u64,
    /// The oldest Timestamp within retention, if any event row is kept.
    pub oldest: Option<i64>,
}

impl Store {
    /// Removes up to `max_blocks` blocks whose rows are all past the horizon, and the
    /// index entries no stored row needs any more; returns the rows removed. One atomic
    /// batch; call again until it returns 0.
    pub fn expire_step(&mut self, max_blocks: usize) -> Result<u64> {
        let Some(horizon) = self.horizon else { return Ok(0) };
        // Nothing can be past the horizon before it passes the newest row of the block
        // that ends first: a daemon polling every few seconds reads no directory at all.
        if self.earliest_block_end.is_some_and(|end| horizon <= end) {
            if std::mem::take(&mut self.generations_to_check) {
                // Runs went since (dropped, or merged away): a generation they kept may
                // hold nothing now. Looking costs a look-up per generation and table, not
                // a read of every block's entry.
                self.drop_empty_generations()?;
            }
            return Ok(0);
        }
        // Known again once this step has done all its work: a step that fails part way
        // (its commit, dropping index entries or generations) is taken up by the next call,
        // not put off until the horizon passes a block this one meant to leave.
        self.earliest_block_end = None;
        let mut expired: Vec<(u16, u64, u16, BlockMeta)> = Vec::new();
        let mut earliest_left = i64::MAX;
        for found in self.event_blocks() {
            let (table, seq, block, meta) = found?;
            if meta.max_ts < horizon && expired.len() < max_blocks {
                expired.push((table, seq, block, meta));
            } else {
                earliest_left = earliest_left.min(meta.max_ts);
            }
        }
        if expired.is_empty() {
            // Generations a crash left empty (between removing their last blocks and
            // dropping them, or their key-index runs) go now, their expired runs first.
            self.maintain_runs();
            self.generations_to_check = false;
            self.drop_empty_generations()?;
            self.earliest_block_end = Some(earliest_left);
            return Ok(0);
        }
        let mut batch = sled::Batch::default();
        let mut removed = 0u64;
        let mut counters = self.counters.clone();
        for (table, seq, block, meta) in &expired {
            // The rows' key-index entries stay until their run is dropped or merged (both
            // leave out what is past the horizon), the block's pieces until its generation
            // goes (those in the main database go now); nothing reads them meanwhile, since
            // every read checks the horizon first.
            removed += u64::from(meta.rows);
            if blocks::in_main(*table, *block) {
                for part in 0..meta.key_parts {
                    batch.remove(keys::block_key(keys::BLOCK_KEYS, *table, *seq, *block, part));
                }
                for part in 0..meta.row_parts {
                    batch.remove(keys::block_key(keys::BLOCK_ROWS, *table, *seq, *block, part));
                }
            }
            batch.remove(keys::block_key(keys::BLOCK_META, *table, *seq, *block, 0));
            if let Some(name) = self.table_name(*table) {
                if let Some(n) = counters.rows.get_mut(name) {
                    *n = n.saturating_sub(u64::from(meta.rows));
                }
            }
        }
        counters.removed += removed;
        batch.insert(vec![keys::COUNTERS], enc(&counters)?);
        crate::failpoint::hit("retention-before-commit");
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_main_commit) {
            return Err(StoreError::Invalid("a commit made to fail (test)".into()));
        }
        self.db.apply_batch(batch).context("cannot remove expired rows")?;
        self.counters = counters;
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for (table, seq, block, _) in &expired {
                cache.forget(&(*table, *seq, *block));
            }
        }
        self.drop_unneeded_index_entries()?;
        self.maintain_runs();
        self.generations_to_check = false;
        self.drop_empty_generations()?;
        self.earliest_block_end = Some(earliest_left);
        Ok(removed)
    }

    /// Deletes every generation that holds no block in the directory and no key-index
    /// run: its rows were all past the horizon. One atomic batch takes it off the list;
    /// its folder goes after (a crash in between leaves a folder the next open deletes).
    fn drop_empty_generations(&mut self) -> Result<()> {
        let tables: Vec<u16> = self.table_names.keys().copied().filter(|t| *t != PROFILE_TABLE).collect();
        for (id, first, next) in self.gens.spans() {
            if self.runs.in_generation(id) {
                continue;
            }
            let end = next.unwrap_or(u64::MAX);
            let mut holds_blocks = false;
            for t in &tables {
                let from = keys::block_key(keys::BLOCK_META, *t, first, 0, 0);
                let to = keys::block_key(keys::BLOCK_META, *t, end, 0, 0);
                // Blocks from ahead of the clock are in the main database, not this one.
                let in_this =
                    self.db.range(from..to).keys().any(|k| {
                        k.map_or(true, |k| keys::block_of(&k).is_some_and(|(_, _, b)| !blocks::in_main(*t, b)))
                    });
                if in_this {
                    holds_blocks = true;
                    break;
                }
            }
            if holds_blocks {
                continue;
            }
            let mut batch = sled::Batch::default();
            self.gens.unlist(id, &mut batch)?;
            crate::failpoint::hit("generation-drop-before-commit");
            self.db.apply_batch(batch).context("cannot drop an expired generation")?;
            self.gens.committed();
            // Flushed first: a generation deleted while the list on disk still named it
            // would make the store unreadable after a crash.
            self.db.flush().context("cannot flush the database to disk")?;
            crate::failpoint::hit("generation-drop-before-delete");
            self.gens.delete(id)?;
            tracing::debug!(generation = id, "dropped an expired generation");
        }
        Ok(())
    }

    /// The directory entries of the event tables' blocks (FileProfile's are exempt).
    pub(super) fn event_blocks(&self) -> impl Iterator<Item = Result<(u16, u64, u16, BlockMeta)>> + '_ {
        self.db.scan_prefix([keys::BLOCK_META]).filter_map(|kv| {
            let step = || -> Result<Option<(u16, u64, u16, BlockMeta)>> {
                let (k, v) = kv?;
                match keys::block_of(&k) {
                    Some((table, seq, block)) if table != PROFILE_TABLE => Ok(Some((table, seq, block, dec(&v)?))),
                    _ => Ok(None),
                }
            };
            step().transpose()
        })
    }

    /// Removes every block past the horizon, step by step.
    pub fn expire_all(&mut self) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = self.expire_step(BLOCKS_PER_STEP)?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    /// Column-index entries of batches older than every stored event block list only
    /// removed rows: they go. A block of rows from ahead of the clock keeps its own batch's
    /// entries (its rows are among them), not every later batch's.
    fn drop_unneeded_index_entries(&mut self) -> Result<()> {
        let mut oldest_live = u64::MAX;
        let mut ahead_batches = std::collections::BTreeSet::new();
        for k in self.db.scan_prefix([keys::BLOCK_META]).keys() {
            if let Some((table, seq, block)) = keys::block_of(&k?) {
                if table == PROFILE_TABLE {
                    continue;
                }
                if blocks::in_main(table, block) {
                    ahead_batches.insert(seq);
                } else {
                    oldest_live = oldest_live.min(seq);
                }
            }
        }
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in self.db.scan_prefix([keys::INDEX]).keys() {
            let k = k?;
            // Index keys end in (batch seq u64, part u32); batch 0 is a rebuild's.
            let Some(seq) = keys::index_key_seq(&k) else { continue };
            if seq != 0 && seq < oldest_live && !ahead_batches.contains(&seq) {
                batch.remove(k);
                n += 1;
            }
        }
        if n > 0 {
            self.db.apply_batch(batch).context("cannot remove index entries of expired rows")?;
        }
        Ok(())
    }

    /// Rows within retention per table, how many stored rows are past it, and the oldest
    /// Timestamp kept. Reads block directory entries, and the keys of the few blocks that
    /// straddle the horizon.
    pub fn retained(&self) -> Result<Retained> {
        let mut out = Retained::default();
        for (table, n) in &self.counters.rows {
            out.rows.insert(table.clone(), *n);
        }
        for found in self.event_blocks() {
            let (table, seq, block, meta) = found?;
            let (past, oldest) = match self.horizon {
                Some(h) if meta.max_ts < h => (u64::from(meta.rows), None),
                Some(h) if meta.min_ts < h => {
                    let keys_raw = self.block_frame(keys::BLOCK_KEYS, table, seq, block, None)?;
                    let ts: Vec<i64> = blocks::frame_keys(&keys_raw)?
                        .into_iter()
                        .filter_map(|(k, _)| keys::event_timestamp(k))
                        .collect();
                    (ts.iter().filter(|t| **t < h).count() as u64, ts.into_iter().filter(|t| *t >= h).min())
                }
                _ => (0, Some(meta.min_ts)),
            };
            out.invisible += past;
            if let Some(name) = self.table_name(table) {
                if let Some(n) = out.rows.get_mut(name) {
                    *n = n.saturating_sub(past);
                }
            }
            out.oldest = match (out.oldest, oldest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        out.rows.retain(|_, n| *n > 0);
        Ok(out)
    }
}
