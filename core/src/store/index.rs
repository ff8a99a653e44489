//! The column index (`i` key space): for each [`IndexSpec`], one entry per stored row,
//! keyed by (table, column, lowercase value, batch sequence, row key), whose value holds
//! the row's full value of the column and of the covered columns.
//!
//! Why the batch sequence in the key: "rows whose column is one of these values, stored
//! since batch N" — a detector's incremental pass — is then a key range, and a backfill is
//! a prefix scan; neither reads a row that cannot match. Why covered columns: a detector's
//! other conditions on them (`FolderPath !startswith ...`) are checked from the entry,
//! so rows that fail them are never read either.

use super::{codec, enc, keys, Store};
use crate::schema::{IndexSpec, INDEXES};
use anyhow::{anyhow, Context as _, Result};
use lookout_plugin_sdk::Condition;

/// The index entries of one new row of `table` (id `tid`): (value prefix, entry value).
/// `value_of` gives the row's string value of a column (`""` when missing).
pub fn entries<'r>(tid: u16, table: &str, value_of: impl Fn(&str) -> &'r str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    INDEXES
        .iter()
        .filter(|s| s.table == table)
        .map(|s| {
            let covered: Vec<&str> = std::iter::once(s.column).chain(s.covers.iter().copied()).map(&value_of).collect();
            Ok((keys::index_value_prefix(tid, s.column, value_of(s.column)), enc(&covered)?))
        })
        .collect()
}

fn spec(table: &str, column: &str) -> Option<&'static IndexSpec> {
    INDEXES.iter().find(|s| s.table == table && s.column == column)
}

impl Store {
    /// Whether the store keeps an index of `table`.`column` (see [`INDEXES`]).
    pub fn is_indexed(table: &str, column: &str) -> bool {
        spec(table, column).is_some()
    }

    /// The condition of `filter` the index can answer for `table`: the first `In` on an
    /// indexed column.
    pub fn indexed_condition<'f>(table: &str, filter: &'f [Condition]) -> Option<&'f Condition> {
        filter.iter().find(|c| matches!(c, Condition::In { .. }) && Self::is_indexed(table, c.column()))
    }

    /// Keys of the stored rows of `table` that meet every condition of `filter`, stored by
    /// the batches `first..=last` (every batch if `None`), found through the index. Other
    /// conditions are checked from the entry when they are on covered columns, from the
    /// row otherwise. `None` when no condition is on an indexed column. Keys come in batch
    /// order per value.
    pub fn index_lookup(
        &self,
        table: &str,
        filter: &[Condition],
        seqs: Option<(u64, u64)>,
    ) -> Result<Option<Vec<Vec<u8>>>> {
        let Some(indexed @ Condition::In { column, any_of }) = Self::indexed_condition(table, filter) else {
            return Ok(None);
        };
        let Some(spec) = spec(table, column) else { return Ok(None) };
        let Some(tid) = self.table_id(table) else { return Ok(Some(Vec::new())) };
        let covered: Vec<&str> = std::iter::once(spec.column).chain(spec.covers.iter().copied()).collect();
        let from_entry = filter.iter().all(|c| covered.contains(&c.column()));
        // Values longer than the indexed cut share a prefix with others: the full value in
        // the entry decides (the indexed condition is checked too, which costs nothing).
        let mut checks: Vec<&Condition> = filter.iter().filter(|c| !std::ptr::eq(*c, indexed)).collect();
        if any_of.iter().any(|v| v.len() > keys::INDEX_VALUE_MAX) {
            checks.push(indexed);
        }
        let mut prefixes: Vec<Vec<u8>> = any_of.iter().map(|v| keys::index_value_prefix(tid, column, v)).collect();
        prefixes.sort();
        prefixes.dedup();
        let mut out = Vec::new();
        for prefix in prefixes {
            let (from, to) = match seqs {
                Some((first, last)) => (
                    [prefix.as_slice(), &first.to_be_bytes()].concat(),
                    [prefix.as_slice(), &last.saturating_add(1).to_be_bytes()].concat(),
                ),
                None => (prefix.clone(), [prefix.as_slice(), &[0xff; 9]].concat()),
            };
            for kv in self.db.range(from..to) {
                let (k, v) = kv?;
                let row_key = &k[prefix.len() + 8..];
                let keep = if checks.is_empty() {
                    true
                } else if from_entry {
                    let values: Vec<&str> = bincode::serde::borrow_decode_from_slice(&v, bincode::config::standard())
                        .map_err(|e| anyhow!("corrupt index entry: {e}"))?
                        .0;
                    checks.iter().all(|c| {
                        let at = covered.iter().position(|n| *n == c.column());
                        c.matches(at.and_then(|i| values.get(i)).copied().unwrap_or(""))
                    })
                } else {
                    match self.db.get(row_key)? {
                        Some(row) => self.row_passes(&row, filter)?,
                        None => false,
                    }
                };
                if keep {
                    out.push(row_key.to_vec());
                }
            }
        }
        Ok(Some(out))
    }

    /// Builds the index when the list of indexes differs from the one the index on disk
    /// was built for (a store from before the index, or a changed list). Rows indexed here
    /// get batch sequence 0, so a detector's incremental range would not see them: every
    /// detector is made to backfill once instead (the journal is cut).
    pub(super) fn ensure_index(&mut self) -> Result<()> {
        let meta = keys::named_key(keys::META, "index");
        let wanted: Vec<(String, String, Vec<String>)> = INDEXES
            .iter()
            .map(|s| (s.table.to_string(), s.column.to_string(), s.covers.iter().map(|c| c.to_string()).collect()))
            .collect();
        // An entry in an older layout does not decode: that, too, means "rebuild".
        let built: Option<Vec<(String, String, Vec<String>)>> = self.get_decoded(&meta).unwrap_or(None);
        if built.as_ref() == Some(&wanted) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut batch = sled::Batch::default();
        let mut pending = 0usize;
        let flush = |db: &sled::Db, batch: &mut sled::Batch, pending: &mut usize, force: bool| -> Result<()> {
            if *pending >= 10_000 || (force && *pending > 0) {
                db.apply_batch(std::mem::take(batch)).context("cannot write the column index")?;
                *pending = 0;
            }
            Ok(())
        };
        for k in self.db.scan_prefix([keys::INDEX]).keys() {
            batch.remove(k?);
            pending += 1;
            flush(&self.db, &mut batch, &mut pending, false)?;
        }
        let mut indexed = 0u64;
        let tables: Vec<&str> = INDEXES.iter().map(|s| s.table).collect();
        for (i, table) in tables.iter().enumerate() {
            if tables[..i].contains(table) {
                continue;
            }
            let Some(tid) = self.table_id(table) else { continue };
            for kv in self.db.scan_prefix(keys::table_prefix(tid)) {
                let (k, v) = kv?;
                let row = codec::decode_view(&v).with_context(|| format!("rebuilding the index of {table}"))?;
                let names = self
                    .schema_names
                    .get(&row.schema)
                    .ok_or_else(|| anyhow!("row refers to unknown schema {}", row.schema))?;
                let value_of = |c: &str| {
                    names.iter().position(|n| n == c).and_then(|i| row.cells.get(i)).map_or("", codec::CellView::as_str)
                };
                for (prefix, covered) in entries(tid, table, value_of)? {
                    batch.insert(keys::index_key(&prefix, 0, &k), covered);
                    pending += 1;
                    indexed += 1;
                }
                flush(&self.db, &mut batch, &mut pending, false)?;
            }
        }
        flush(&self.db, &mut batch, &mut pending, true)?;
        self.db.insert(&meta, enc(&wanted)?)?;
        let head = self.next_journal - 1;
        self.prune_journal(head)?;
        if indexed > 0 {
            tracing::info!(
                entries = indexed,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "built the column index; detectors backfill once"
            );
        }
        Ok(())
    }
}
