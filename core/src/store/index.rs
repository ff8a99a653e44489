//! The column index (`i` key space): for each [`IndexSpec`], one entry per (value, batch),
//! keyed by (table, column, lowercase value, batch sequence, part), listing the rows of
//! that batch with that value: each row's key and its full values of the column and of
//! the covered columns (a posting list).
//!
//! Why the batch sequence in the key: "rows whose column is one of these values, stored
//! since batch N" — a detector's incremental pass — is then a key range, and a backfill is
//! a prefix scan; neither reads a row that cannot match. Why covered columns: a detector's
//! other conditions on them (`FolderPath !startswith ...`) are checked from the entry,
//! so rows that fail them are never read either. Why one entry per (value, batch) and not
//! per row: a batch of 4,096 rows adds a dozen sled items instead of thousands, which
//! keeps the index nearly free at ingest (per-row entries cost a fifth of the ingest rate
//! and a third more disk, from sled rewriting the few hot leaves they all land on).

use super::{codec, enc, keys, Store};
use crate::schema::{IndexSpec, INDEXES};
use anyhow::{anyhow, Context as _, Result};
use lookout_plugin_sdk::Condition;
use std::collections::BTreeMap;

/// The size an index entry is kept under. sled writes a leaf whole when it changes; a
/// leaf holding one large value is rewritten (as a separate blob file) with every
/// neighbouring insert, which made large per-batch lists cost a tenth of ingestion.
const PART_BYTES: usize = 8 << 10;

/// The layout of index entries; a store whose index has another is re-indexed on open.
const LAYOUT: u32 = 3;

/// What the index on disk was built for: the layout and the (table, column, covers) list.
type IndexMeta = (u32, Vec<(String, String, Vec<String>)>);

/// One row in a posting list: its key and its values of the indexed and covered columns.
type Posting = (Vec<u8>, Vec<String>);

/// The index postings of one row of `table` (id `tid`): (value prefix, covered values).
/// `value_of` gives the row's string value of a column (`""` when missing).
pub fn row_postings<'r>(tid: u16, table: &str, value_of: impl Fn(&str) -> &'r str) -> Vec<(Vec<u8>, Vec<String>)> {
    INDEXES
        .iter()
        .filter(|s| s.table == table)
        .map(|s| {
            let covered = covered_columns(s).map(|c| value_of(c).to_string());
            (keys::index_value_prefix(tid, s.column, value_of(s.column)), covered.collect())
        })
        .collect()
}

/// The postings a batch collects, written as one entry per value when it commits.
#[derive(Default)]
pub struct Postings {
    by_prefix: BTreeMap<Vec<u8>, Vec<Posting>>,
}

impl Postings {
    pub fn add(&mut self, prefix: Vec<u8>, row_key: Vec<u8>, covered: Vec<String>) {
        self.by_prefix.entry(prefix).or_default().push((row_key, covered));
    }

    /// Writes the entries of batch `seq` into `batch`, in parts of about [`PART_BYTES`].
    pub fn write(self, seq: u64, zstd: &mut zstd::bulk::Compressor<'static>, batch: &mut sled::Batch) -> Result<()> {
        for (prefix, list) in self.by_prefix {
            let mut part = 0u32;
            let mut start = 0;
            let mut bytes = 0;
            for (i, (key, values)) in list.iter().enumerate() {
                bytes += posting_bytes(key, values);
                if bytes >= PART_BYTES || i + 1 == list.len() {
                    batch.insert(keys::index_key(&prefix, seq, part), pack(zstd, &enc(&&list[start..=i])?)?);
                    part += 1;
                    start = i + 1;
                    bytes = 0;
                }
            }
        }
        Ok(())
    }
}

/// An entry as stored: zstd-compressed, with its raw length first (FolderPaths and row
/// keys compress several-fold, and the index was the second largest part of the store).
fn pack(zstd: &mut zstd::bulk::Compressor<'static>, raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len() / 3 + 8);
    out.extend_from_slice(&(raw.len() as u32).to_be_bytes());
    out.extend_from_slice(&zstd.compress(raw).context("cannot compress an index entry")?);
    Ok(out)
}

fn unpack(zstd: &std::sync::Mutex<zstd::bulk::Decompressor<'static>>, stored: &[u8]) -> Result<Vec<u8>> {
    let len = stored.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
    match len {
        Some(len) if len <= PART_BYTES * 64 => {
            let mut z = zstd.lock().unwrap_or_else(|p| p.into_inner());
            z.decompress(&stored[4..], len).context("corrupt column index entry")
        }
        _ => Err(anyhow!("corrupt column index entry")),
    }
}

/// The columns whose values an entry keeps: the indexed one, then the covered ones.
fn covered_columns(spec: &IndexSpec) -> impl Iterator<Item = &'static str> {
    std::iter::once(spec.column).chain(spec.covers.iter().copied())
}

/// About how many bytes a posting takes in an entry (to cut entries into parts).
fn posting_bytes(key: &[u8], values: &[String]) -> usize {
    8 + key.len() + values.iter().map(|v| v.len() + 1).sum::<usize>()
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
        let covered: Vec<&str> = covered_columns(spec).collect();
        let from_entry = filter.iter().all(|c| covered.contains(&c.column()));
        // Values as long as the indexed cut share a prefix with longer ones: the full value in
        // the entry decides (the indexed condition is checked too, which costs nothing).
        let mut checks: Vec<&Condition> = filter.iter().filter(|c| !std::ptr::eq(*c, indexed)).collect();
        if any_of.iter().any(|v| v.len() >= keys::INDEX_VALUE_MAX) {
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
                None => (prefix.clone(), [prefix.as_slice(), &[0xff; 13]].concat()),
            };
            for kv in self.db.range(from..to) {
                let (_, entry) = kv?;
                let raw = unpack(&self.unzstd, &entry)?;
                let list: Vec<(Vec<u8>, Vec<&str>)> =
                    bincode::serde::borrow_decode_from_slice(&raw, bincode::config::standard())
                        .map_err(|e| anyhow!("corrupt index entry: {e}"))?
                        .0;
                for (row_key, values) in list {
                    if !self.visible(&row_key) {
                        continue;
                    }
                    let keep = if checks.is_empty() {
                        true
                    } else if from_entry {
                        checks.iter().all(|c| {
                            let at = covered.iter().position(|n| *n == c.column());
                            c.matches(at.and_then(|i| values.get(i)).copied().unwrap_or(""))
                        })
                    } else {
                        self.row_at_passes(&row_key, filter)?
                    };
                    if keep {
                        out.push(row_key);
                    }
                }
            }
        }
        Ok(Some(out))
    }

    /// Builds the index when the list of indexes differs from the one the index on disk
    /// was built for (a store from before the index, or a changed list). Rows indexed here
    /// get batch sequence 0, so a detector's incremental range would not see them: every
    /// detector is made to backfill once instead.
    pub(super) fn ensure_index(&mut self) -> Result<()> {
        let meta = keys::named_key(keys::META, "index");
        let wanted: IndexMeta = (
            LAYOUT,
            INDEXES
                .iter()
                .map(|s| (s.table.to_string(), s.column.to_string(), s.covers.iter().map(|c| c.to_string()).collect()))
                .collect(),
        );
        // A record in an older format does not decode: that, too, means "rebuild".
        let built: Option<IndexMeta> = self.get_decoded(&meta).unwrap_or(None);
        if built.as_ref() == Some(&wanted) {
            return Ok(());
        }
        if self.db.scan_prefix([keys::BLOCK_META]).next().is_none()
            && self.db.scan_prefix([keys::INDEX]).next().is_none()
        {
            // Nothing to index: the record goes with the first batch that commits, so
            // opening a new store writes nothing (it may be opened on a full disk).
            self.index_meta_pending = Some((meta, enc(&wanted)?));
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut batch = sled::Batch::default();
        let mut pending = 0usize;
        let flush = |db: &sled::Db, batch: &mut sled::Batch, pending: &mut usize, force: bool| -> Result<()> {
            if *pending >= 64 || (force && *pending > 0) {
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
        flush(&self.db, &mut batch, &mut pending, true)?;
        // Rebuilt rows go under batch 0, in parts of about PART_BYTES.
        let mut open: BTreeMap<Vec<u8>, (u32, Vec<Posting>, usize)> = BTreeMap::new();
        let mut indexed = 0u64;
        let tables: Vec<&str> = INDEXES.iter().map(|s| s.table).collect();
        for (i, table) in tables.iter().enumerate() {
            if tables[..i].contains(table) {
                continue;
            }
            let Some(tid) = self.table_id(table) else { continue };
            let mut rows = Vec::new();
            self.for_each_row(tid, |k, v| {
                rows.push((k.to_vec(), v.to_vec()));
                Ok(())
            })?;
            for (k, v) in rows {
                let row = codec::decode_view(&v).with_context(|| format!("rebuilding the index of {table}"))?;
                let names = self
                    .schema_names
                    .get(&row.schema)
                    .ok_or_else(|| anyhow!("row refers to unknown schema {}", row.schema))?;
                let value_of = |c: &str| {
                    names.iter().position(|n| n == c).and_then(|i| row.cells.get(i)).map_or("", codec::CellView::as_str)
                };
                for (prefix, covered) in row_postings(tid, table, value_of) {
                    indexed += 1;
                    let (part, list, bytes) = open.entry(prefix.clone()).or_default();
                    *bytes += posting_bytes(&k, &covered);
                    list.push((k.clone(), covered));
                    if *bytes >= PART_BYTES {
                        batch.insert(
                            keys::index_key(&prefix, 0, *part),
                            pack(&mut self.zstd, &enc(&std::mem::take(list))?)?,
                        );
                        *part += 1;
                        *bytes = 0;
                        pending += 1;
                        flush(&self.db, &mut batch, &mut pending, false)?;
                    }
                }
            }
        }
        for (prefix, (part, list, _)) in open {
            if !list.is_empty() {
                batch.insert(keys::index_key(&prefix, 0, part), pack(&mut self.zstd, &enc(&list)?)?);
                pending += 1;
            }
        }
        flush(&self.db, &mut batch, &mut pending, true)?;
        // Detectors are made to backfill before the index is recorded as built: a crash in
        // between rebuilds again, never leaves detectors reading batch ranges the rebuilt
        // entries (batch 0) are not in.
        let head = self.next_journal - 1;
        self.force_backfill_below(head)?;
        self.db.insert(&meta, enc(&wanted)?)?;
        if indexed > 0 {
            tracing::info!(
                rows = indexed,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "built the column index; detectors backfill once"
            );
        }
        Ok(())
    }
}
