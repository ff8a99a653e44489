//! The column indexes (`i` key space) that detectors declare (`Manifest::indexes`): for
//! each [`IndexDecl`], one entry per (values, batch), keyed by (table, columns, lowercase
//! values, batch sequence, part), listing the rows of that batch with those values: each
//! row's key and its full values of the columns and of the covered columns (a posting
//! list). The list of indexes is kept with the data, so ingestion maintains every index
//! a detector ever declared, with or without the detector loaded; an index declared when
//! rows are already stored is built from the blocks, under each row's own batch sequence.
//!
//! Why the batch sequence in the key: "rows whose column is one of these values, stored
//! since batch N" — a detector's incremental pass — is then a key range, and a backfill is
//! a prefix scan; neither reads a row that cannot match. Why covered columns: a detector's
//! other conditions on them (`FolderPath !startswith ...`) are checked from the entry,
//! so rows that fail them are never read either. Why one entry per (value, batch) and not
//! per row: a batch of 4,096 rows adds a dozen sled items instead of thousands, which
//! keeps the index nearly free at ingest (per-row entries cost a fifth of the ingest rate
//! and a third more disk, from sled rewriting the few hot leaves they all land on).

use super::{codec, dec, enc, keys, RowForm, Store};
use crate::error::{StoreContext as _, StoreError};
type Result<T, E = StoreError> = std::result::Result<T, E>;
use lookout_plugin_sdk::{CellRef, Condition, IndexDecl};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The size an index entry is kept under (before compression).
const PART_BYTES: usize = 8 << 10;

/// The layout of index entries and of the list of indexes. (5: each posting says where
/// its row is. A store of an earlier layout has its indexes built again when opened.)
pub(super) const LAYOUT: u32 = 5;

/// What the indexes on disk are: the layout and the declared indexes.
type IndexMeta = (u32, Vec<IndexDecl>);

/// One row in a posting list: its key, where it is, and its values of the indexed and
/// covered columns.
type Posting = (Vec<u8>, codec::PostingPlace, Vec<String>);

/// The name an index goes under in its keys: its columns, joined by U+001F.
fn column_id(spec: &IndexDecl) -> String {
    spec.columns.join("\u{1f}")
}

/// The index postings of one row of `table` (id `tid`) for every index of `specs`:
/// (values prefix, covered values). `cell_of` gives the row's cell of a column (`None`
/// when missing). Values are kept as the text a string condition reads
/// ([`CellRef::text`]: a long as its digits, so a look-up by a process id works), so a
/// condition decided from the entry and one decided from the row agree.
pub fn row_postings<'r>(
    specs: &[IndexDecl],
    tid: u16,
    table: &str,
    cell_of: impl Fn(&str) -> Option<CellRef<'r>>,
) -> Vec<(Vec<u8>, Vec<String>)> {
    specs
        .iter()
        .filter(|s| s.table == table)
        .map(|s| {
            let covered = covered_columns(s).map(|c| cell_of(c).map_or(Cow::Borrowed(""), CellRef::text).into_owned());
            let values: Vec<Cow<'r, str>> =
                s.columns.iter().map(|c| cell_of(c).map_or(Cow::Borrowed(""), CellRef::text)).collect();
            let values: Vec<&str> = values.iter().map(|v| v.as_ref()).collect();
            // Most indexes are of one column: its name is the id, without a join.
            let id = match s.columns.as_slice() {
                [one] => Cow::Borrowed(one.as_str()),
                _ => Cow::Owned(column_id(s)),
            };
            (keys::index_values_prefix(tid, &id, &values), covered.collect())
        })
        .collect()
}

/// Which cells of a row the indexes read, worked out once per row layout (rows share
/// their column list, `NormalRow::names`, with the rows of the same shape) instead of
/// once per row: where each indexed or covered column is. Decoding only those cells (each
/// read where it starts) and finding them without comparing every column name was a
/// tenth of the storing thread's time at ingest.
#[derive(Default)]
pub(super) struct PostingLayouts {
    layouts: std::collections::VecDeque<PostingLayout>,
}

struct PostingLayout {
    table: String,
    /// Held, so no other list can take its address while it is compared by address.
    names: Arc<Vec<String>>,
    /// Each column the indexes of `table` read, with its first position in the row.
    columns: Vec<(String, usize)>,
}

/// Layouts remembered: a file brings a few, each parser thread its own lists.
const LAYOUTS_KEPT: usize = 64;

impl PostingLayouts {
    /// Forgets every layout (the indexes changed).
    pub fn clear(&mut self) {
        self.layouts.clear();
    }

    /// The postings of a row of `table` (id `tid`) with columns `names` and `cells`, as
    /// [`row_postings`] makes them.
    pub fn postings(
        &mut self,
        specs: &[IndexDecl],
        tid: u16,
        table: &str,
        names: &Arc<Vec<String>>,
        cells: &codec::EncodedCells,
    ) -> Result<Vec<(Vec<u8>, Vec<String>)>> {
        let found = self.layouts.iter().position(|l| Arc::ptr_eq(&l.names, names) && l.table == table);
        let layout = match found {
            Some(i) => &self.layouts[i],
            None => {
                if self.layouts.len() >= LAYOUTS_KEPT {
                    self.layouts.pop_front();
                }
                self.layouts.push_back(PostingLayout::new(specs, table, names));
                &self.layouts[self.layouts.len() - 1]
            }
        };
        // Only the cells the indexes read, each found where it starts.
        let mut picked = Vec::with_capacity(layout.columns.len());
        for &(_, at) in &layout.columns {
            picked.push(cells.cell(at)?);
        }
        let cell_of = |c: &str| {
            let i = layout.columns.iter().position(|(name, _)| name == c)?;
            picked.get(i).map(codec::CellView::as_ref)
        };
        Ok(row_postings(specs, tid, table, cell_of))
    }
}

impl PostingLayout {
    fn new(specs: &[IndexDecl], table: &str, names: &Arc<Vec<String>>) -> PostingLayout {
        let mut columns: Vec<(String, usize)> = Vec::new();
        for spec in specs.iter().filter(|s| s.table == table) {
            for c in covered_columns(spec) {
                if columns.iter().any(|(name, _)| name == c) {
                    continue;
                }
                if let Some(at) = names.iter().position(|n| n == c) {
                    columns.push((c.to_string(), at));
                }
            }
        }
        PostingLayout { table: table.to_string(), names: Arc::clone(names), columns }
    }
}

/// The postings a batch collects, written as one entry per value when it commits.
#[derive(Default)]
pub struct Postings {
    by_prefix: BTreeMap<Vec<u8>, Vec<Posting>>,
}

impl Postings {
    pub fn add(&mut self, prefix: Vec<u8>, row_key: Vec<u8>, place: codec::PostingPlace, covered: Vec<String>) {
        self.by_prefix.entry(prefix).or_default().push((row_key, place, covered));
    }

    /// Writes the entries of batch `seq` into `batch`, in parts of about [`PART_BYTES`].
    pub fn write(self, seq: u64, zstd: &mut zstd::bulk::Compressor<'static>, batch: &mut sled::Batch) -> Result<()> {
        for (prefix, mut list) in self.by_prefix {
            list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let mut part = 0u32;
            let mut start = 0;
            let mut bytes = 0;
            for (i, (key, _, values)) in list.iter().enumerate() {
                bytes += posting_bytes(key, values);
                if bytes >= PART_BYTES || i + 1 == list.len() {
                    batch.insert(
                        keys::index_key(&prefix, seq, part),
                        pack(zstd, &codec::encode_postings(&list[start..=i]))?,
                    );
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
        _ => Err(corrupt!("corrupt column index entry")),
    }
}

/// Whether two of `specs` are of one table and column list: their entries would share a
/// key prefix (a list kept before such declarations were merged).
fn shares_an_entry_prefix(specs: &[IndexDecl]) -> bool {
    specs.iter().enumerate().any(|(i, a)| specs[..i].iter().any(|b| a.table == b.table && a.columns == b.columns))
}

/// The columns whose values an entry keeps: the indexed ones, then the covered ones.
fn covered_columns(spec: &IndexDecl) -> impl Iterator<Item = &str> {
    spec.columns.iter().chain(&spec.covers).map(String::as_str)
}

/// About how many bytes a posting takes in an entry (to cut entries into parts).
fn posting_bytes(key: &[u8], values: &[String]) -> usize {
    8 + key.len() + values.iter().map(|v| v.len() + 1).sum::<usize>()
}

impl Store {
    /// The one-column index of `table`.`column`, if a detector declared one.
    fn single_column_index(&self, table: &str, column: &str) -> Option<&IndexDecl> {
        self.index_specs.iter().find(|s| s.table == table && s.columns.len() == 1 && s.columns[0] == column)
    }

    /// Whether the store keeps a one-column index of `table`.`column`.
    pub fn is_indexed(&self, table: &str, column: &str) -> bool {
        self.single_column_index(table, column).is_some()
    }

    /// The condition of `filter` the index can answer for `table`: the first `In` on a
    /// column with a one-column index.
    pub fn indexed_condition<'f>(&self, table: &str, filter: &'f [Condition]) -> Option<&'f Condition> {
        filter.iter().find(|c| matches!(c, Condition::In { .. }) && self.is_indexed(table, c.column()))
    }

    /// The indexes kept (those every detector loaded so far declared).
    pub fn indexes(&self) -> &[IndexDecl] {
        &self.index_specs
    }

    /// Reads the postings under `prefix` for batches `seqs` (all if `None`), handing each
    /// (row key, entry values) within retention to `f`.
    fn postings(
        &self,
        prefix: &[u8],
        seqs: Option<(u64, u64)>,
        mut f: impl FnMut(Vec<u8>, codec::PostingPlace, Vec<&str>) -> Result<()>,
    ) -> Result<()> {
        let (from, to) = match seqs {
            Some((first, last)) => {
                ([prefix, &first.to_be_bytes()].concat(), [prefix, &last.saturating_add(1).to_be_bytes()].concat())
            }
            None => (prefix.to_vec(), [prefix, &[0xff; 13]].concat()),
        };
        // A batch's entries are in its generation (those of rows from ahead of the clock,
        // of an index built over stored rows, and of stores written before generations
        // held them, in the main database): every database's, in key order — by value,
        // then batch.
        let mut dbs = vec![self.gens.db(0)?];
        for (id, first, next) in self.gens.spans() {
            let holds = seqs.is_none_or(|(lo, hi)| first <= hi && next.is_none_or(|n| n > lo));
            if holds {
                dbs.push(self.gens.db(id)?);
            }
        }
        let mut entries = Vec::new();
        for db in dbs {
            for kv in db.range(from.clone()..to.clone()) {
                entries.push(kv?);
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, entry) in entries {
            let raw = unpack(&self.unzstd, &entry)?;
            for (row_key, place, values) in codec::decode_postings(&raw)? {
                if self.visible(row_key) {
                    f(row_key.to_vec(), place, values)?;
                }
            }
        }
        Ok(())
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
        let Some(indexed @ Condition::In { column, any_of }) = self.indexed_condition(table, filter) else {
            return Ok(None);
        };
        let Some(spec) = self.single_column_index(table, column) else { return Ok(None) };
        let Some(tid) = self.table_id(table) else { return Ok(Some(Vec::new())) };
        let covered: Vec<&str> = covered_columns(spec).collect();
        // A covered value is kept as text: only string conditions are decided from it.
        let from_entry = filter.iter().all(|c| c.on_string() && covered.contains(&c.column()));
        // Values as long as the indexed cut share a prefix with longer ones: the full value in
        // the entry decides (the indexed condition is checked too, which costs nothing).
        let mut checks: Vec<&Condition> = filter.iter().filter(|c| !std::ptr::eq(*c, indexed)).collect();
        if any_of.iter().any(|v| v.len() >= keys::INDEX_VALUE_MAX) {
            checks.push(indexed);
        }
        let id = column_id(spec);
        let mut prefixes: Vec<Vec<u8>> = any_of.iter().map(|v| keys::index_values_prefix(tid, &id, &[v])).collect();
        prefixes.sort();
        prefixes.dedup();
        let mut out = Vec::new();
        let mut row_filter = super::RowFilter::new(filter);
        for prefix in prefixes {
            self.postings(&prefix, seqs, |row_key, (seq, block, row), values| {
                let keep = if checks.is_empty() {
                    true
                } else if from_entry {
                    checks.iter().all(|c| {
                        let at = covered.iter().position(|n| *n == c.column());
                        c.matches(at.and_then(|i| values.get(i)).copied().unwrap_or(""))
                    })
                } else {
                    // Read where the entry says the row is (the same place its hint gives the
                    // pass's fetch), not found again through the key index.
                    self.row_at_position_passes(super::RowAt { table: tid, seq, block, row }, &mut row_filter)?
                };
                if keep {
                    // The pass that asked reads these rows next: from where the entry says.
                    self.hint(&row_key, seq, block, row);
                    out.push(row_key);
                }
                Ok(())
            })?;
        }
        Ok(Some(out))
    }

    /// Rows of `table` whose `key` columns equal the values (ASCII case ignored) and that
    /// meet every condition of `filter`, from the index declared on exactly those columns.
    pub fn lookup_by<R: RowForm>(&self, table: &str, key: &[(String, String)], filter: &[Condition]) -> Result<Vec<R>> {
        let columns: Vec<&str> = key.iter().map(|(c, _)| c.as_str()).collect();
        let Some(spec) = self.index_specs.iter().find(|s| s.table == table && s.columns == columns) else {
            return Err(StoreError::Invalid(format!(
                "no index of {table} on ({}): declare it in the detector's manifest (indexes)",
                columns.join(", ")
            )));
        };
        let Some(tid) = self.table_id(table) else { return Ok(Vec::new()) };
        let values: Vec<&str> = key.iter().map(|(_, v)| v.as_str()).collect();
        let prefix = keys::index_values_prefix(tid, &column_id(spec), &values);
        let mut keys_found = Vec::new();
        self.postings(&prefix, None, |row_key, (seq, block, row), entry| {
            // The entry holds the full values: a value cut for length decides here.
            if values.iter().zip(&entry).all(|(want, got)| want.eq_ignore_ascii_case(got)) {
                self.hint(&row_key, seq, block, row);
                keys_found.push(row_key);
            }
            Ok(())
        })?;
        self.get_rows_where(&keys_found, filter)
    }

    /// The indexes kept with the data (for a reader without the store; those of an
    /// earlier layout too, which the next open of the store builds again).
    pub(super) fn stored_indexes(db: &sled::Db) -> Result<Vec<IndexDecl>> {
        match db.get(keys::named_key(keys::META, "index"))? {
            Some(v) => match dec::<IndexMeta>(&v)? {
                (layout, specs) if layout <= LAYOUT => Ok(specs),
                (other, _) => Err(corrupt!("column index layout {other}, expected {LAYOUT}: corrupt store")),
            },
            None => Ok(Vec::new()),
        }
    }

    /// Loads the list of indexes kept with the data.
    pub(super) fn load_indexes(&mut self) -> Result<()> {
        let meta = keys::named_key(keys::META, "index");
        let built: Option<IndexMeta> = self.get_decoded(&meta)?;
        match built {
            Some((LAYOUT, specs)) if !shares_an_entry_prefix(&specs) => {
                self.index_specs = specs;
                self.posting_layouts.clear();
            }
            Some((LAYOUT, specs)) => {
                // Kept by a build before indexes of one column list were merged: their
                // entries were written under one prefix in two layouts. Built again, merged.
                tracing::warn!("column indexes of one column list with different covered columns: building them again");
                self.index_specs = Vec::new();
                self.posting_layouts.clear();
                self.declare_indexes(&specs)?;
            }
            Some((old, specs)) if old < LAYOUT => {
                // Entries of an earlier layout: the same indexes, built again in this one.
                tracing::info!(
                    layout = old,
                    indexes = specs.len(),
                    "column indexes of an earlier layout: building them again"
                );
                self.index_specs = Vec::new();
                self.posting_layouts.clear();
                self.declare_indexes(&specs)?;
            }
            Some((other, _)) => return Err(corrupt!("column index layout {other}, expected {LAYOUT}: corrupt store")),
            None => {
                self.index_specs = Vec::new();
                self.posting_layouts.clear();
            }
        }
        Ok(())
    }

    /// Keeps the indexes a detector declares: each one not kept yet is built over the rows
    /// stored so far — entries under each row's own batch sequence, so incremental passes
    /// need no backfill — in bounded batches, and recorded last (a crash before that
    /// builds it again, from scratch, next time).
    ///
    /// One index is kept per (table, columns): entries are keyed by those alone, and what
    /// an entry holds depends on the covered columns. A declaration of the same columns
    /// covering others (another detector, a new version of one) makes the kept index
    /// cover those too: it is built again, covering both.
    pub fn declare_indexes(&mut self, decls: &[IndexDecl]) -> Result<()> {
        for decl in decls {
            if decl.columns.is_empty() || decl.table.is_empty() {
                return Err(StoreError::Invalid(format!("an index needs a table and at least one column: {decl:?}")));
            }
            let same_columns = |s: &IndexDecl| s.table == decl.table && s.columns == decl.columns;
            let spec = match self.index_specs.iter().find(|s| same_columns(s)) {
                Some(kept) if decl.covers.iter().all(|c| kept.covers.contains(c)) => continue,
                Some(kept) => {
                    let mut merged = kept.clone();
                    merged.covers.extend(decl.covers.iter().filter(|c| !kept.covers.contains(c)).cloned());
                    // Unrecorded before its entries change: a crash mid-build must not leave
                    // it recorded over entries of another layout (the next declaration
                    // builds it again).
                    self.index_specs.retain(|s| !same_columns(s));
                    self.record_indexes()?;
                    merged
                }
                None => decl.clone(),
            };
            self.build_index(&spec)?;
            self.index_specs.push(spec);
            self.record_indexes()?;
        }
        Ok(())
    }

    /// Records the list of indexes kept (sorted), and forgets the layouts read from it.
    fn record_indexes(&mut self) -> Result<()> {
        self.index_specs.sort();
        self.posting_layouts.clear();
        let meta: IndexMeta = (LAYOUT, self.index_specs.clone());
        self.db.insert(keys::named_key(keys::META, "index"), enc(&meta)?)?;
        Ok(())
    }

    fn build_index(&mut self, spec: &IndexDecl) -> Result<()> {
        let Some(tid) = self.table_id(&spec.table) else { return Ok(()) };
        let started = std::time::Instant::now();
        let column_prefix = keys::index_column_prefix(tid, &column_id(spec));
        let mut batch = sled::Batch::default();
        let mut pending = 0usize;
        // Entries of an earlier, interrupted build of this index go first, and those written
        // while it was declared before (in the generations).
        for db in self.gens.all_dbs() {
            let mut removals = sled::Batch::default();
            for k in db.scan_prefix(&column_prefix).keys() {
                removals.remove(k?);
                pending += 1;
                if pending >= 256 {
                    db.apply_batch(std::mem::take(&mut removals)).context("cannot write the column index")?;
                    pending = 0;
                }
            }
            db.apply_batch(removals).context("cannot write the column index")?;
            // On disk before the index is recorded as built: old entries must not come back.
            db.flush().context("cannot flush the database to disk")?;
        }
        pending = 0;
        let specs = std::slice::from_ref(spec);
        let mut rows = 0u64;
        // One batch sequence at a time: its rows' postings, written as that batch wrote
        // them, and applied in bounded batches as the blocks are read.
        let db = self.db.clone();
        let data_dir = self.data_dir().to_path_buf();
        let interrupt = self.interrupt.clone();
        let table = spec.table.clone();
        let mut zstd = super::blocks::index_compressor()?;
        let mut current: Option<(u64, Postings)> = None;
        let mut write = |done: (u64, Postings), batch: &mut sled::Batch, pending: &mut usize| -> Result<()> {
            done.1.write(done.0, &mut zstd, batch)?;
            *pending += 1;
            if *pending >= 64 {
                // A build over a large store writes a lot: it stops before the disk is full
                // (sled can wait forever for a write that failed), and is built again from
                // the start when its detector runs next (it is recorded only once built).
                if interrupt.as_ref().is_some_and(|i| i.load(std::sync::atomic::Ordering::Relaxed)) {
                    return Err(StoreError::Interrupted(format!(
                        "building an index of {table} stopped for the process to stop; it is built again from the start when its detector next runs"
                    )));
                }
                if crate::disk::low(&data_dir) {
                    return Err(StoreError::Io(std::io::Error::new(
                        std::io::ErrorKind::StorageFull,
                        crate::disk::DiskSpaceLow(data_dir.display().to_string()),
                    )));
                }
                db.apply_batch(std::mem::take(batch)).context("cannot write the column index")?;
                *pending = 0;
            }
            Ok(())
        };
        self.for_each_row(tid, |(seq, block, row_no), key, value| {
            let row = codec::decode_view(value).with_context(|| format!("building an index of {}", spec.table))?;
            let names = self
                .schema_names
                .get(&row.schema)
                .ok_or_else(|| corrupt!("row refers to unknown schema {}", row.schema))?;
            let cell_of =
                |c: &str| names.iter().position(|n| n == c).and_then(|i| row.cells.get(i)).map(|v| v.as_ref());
            if current.as_ref().is_some_and(|(s, _)| *s != seq) {
                if let Some(done) = current.take() {
                    write(done, &mut batch, &mut pending)?;
                }
            }
            let (_, postings) = current.get_or_insert_with(|| (seq, Postings::default()));
            for (prefix, covered) in row_postings(specs, tid, &spec.table, cell_of) {
                postings.add(prefix, key.to_vec(), (seq, block, row_no), covered);
            }
            rows += 1;
            Ok(())
        })?;
        if let Some(done) = current.take() {
            write(done, &mut batch, &mut pending)?;
        }
        self.db.apply_batch(batch).context("cannot write the column index")?;
        tracing::info!(
            table = %spec.table,
            columns = %spec.columns.join(", "),
            rows,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built an index a detector declared"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(table: &str, columns: &[&str], covers: &[&str]) -> IndexDecl {
        IndexDecl {
            table: table.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            covers: covers.iter().map(|c| c.to_string()).collect(),
        }
    }

    /// The postings from every cell decoded and every name compared: what the layouts
    /// must give.
    fn from_every_cell(
        specs: &[IndexDecl],
        names: &[String],
        cells: &codec::EncodedCells,
    ) -> Vec<(Vec<u8>, Vec<String>)> {
        let view = cells.view().expect("cells encoded here");
        let cell_of = |c: &str| names.iter().position(|n| n == c).map(|i| view[i].as_ref());
        row_postings(specs, 7, "T", cell_of)
    }

    #[test]
    fn postings_by_layout_are_those_of_every_cell() {
        let names: Arc<Vec<String>> =
            Arc::new(["Timestamp", "FileName", "Pid", "FolderPath", "Other", "FileName"].map(String::from).to_vec());
        let cells = [
            CellRef::Str("2025-05-07T16:55:49Z"),
            CellRef::Str("WsmSvc.DLL"),
            CellRef::Int(4242),
            CellRef::Str(r"C:\Windows\System32"),
            CellRef::Str("not read by any index"),
            CellRef::Str("a second FileName: the first one counts"),
        ];
        let encoded = codec::EncodedCells::new(&codec::ContentNames::new(&names), &cells);
        let mut specs = vec![
            decl("T", &["FileName"], &["FolderPath"]),
            decl("T", &["Pid", "Missing"], &[]),
            decl("Elsewhere", &["Other"], &[]),
        ];
        let mut layouts = PostingLayouts::default();
        for _ in 0..2 {
            let got = layouts.postings(&specs, 7, "T", &names, &encoded).expect("postings");
            assert_eq!(got, from_every_cell(&specs, &names, &encoded));
            assert_eq!(got.len(), 2, "the two indexes of T");
        }
        // A new index: the remembered layout reads too few cells until it is forgotten,
        // as the store does whenever its indexes change.
        specs.push(decl("T", &["Other"], &["Timestamp"]));
        layouts.clear();
        let got = layouts.postings(&specs, 7, "T", &names, &encoded).expect("postings");
        assert_eq!(got, from_every_cell(&specs, &names, &encoded));
        assert_eq!(got.len(), 3);
        assert!(got.iter().any(|(_, covered)| covered == &["not read by any index", "2025-05-07T16:55:49Z"]));
    }
}
