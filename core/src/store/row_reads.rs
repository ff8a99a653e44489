//! Reading many rows at once, a block at a time: the rows of one request (a detector's
//! fetch of rows it was handed, a look-up's hits, many look-ups' hits) sorted by where they
//! lie, so each block is read once for all of its rows and each page of it holding any
//! ([`super::pages`]) decompressed once — and, when the cache does not hold it, into one
//! reused buffer.
//!
//! Why a reused buffer: in a process just started, a block decompressed into new memory
//! had the kernel zero a fresh memory page for every 4 KiB of it, over half the time of reading a
//! hundred blocks for a row or two each (BENCHMARKS.md, the attack-dense tick). So a request
//! that reads more than a few blocks does not cache them, as a database's scan does not
//! fill its cache: a block read for a few rows of a sweep is seldom read again, and those
//! that are — the blocks a commit just wrote, those a pass's choosing of rows read — are
//! looked for in the cache first. A request of a few blocks (a look-up with a handful of
//! hits) caches them as a single read does: the same look-up soon again finds them.

use super::blocks::{self, KeyEntry};
use super::{keys, pages, Result, Store};
use crate::error::StoreContext as _;
use lookout_plugin_sdk::wire::RowBytes;
use lookout_plugin_sdk::{Cell, CellRef, Condition, Row};
use std::sync::Arc;

/// The form a read hands its rows back in: the SDK's [`Row`] (owned strings), or
/// [`RowBytes`], the row already encoded for a plugin's answer (its strings copied once,
/// from the stored bytes into the payload).
pub trait RowForm: Sized {
    fn build<'c>(
        table: &str,
        key: &[u8],
        ingested_at: i64,
        columns: impl Iterator<Item = (&'c str, CellRef<'c>)>,
    ) -> Self;

    /// The row from its cells as stored (each as `put_cell` writes it,
    /// `codec::decode_fetch`'s copies).
    fn build_encoded<'c>(
        table: &str,
        key: &[u8],
        ingested_at: i64,
        columns: impl Iterator<Item = (&'c str, &'c [u8])> + Clone,
    ) -> Result<Self>;
}

impl RowForm for Row {
    fn build<'c>(
        table: &str,
        key: &[u8],
        ingested_at: i64,
        columns: impl Iterator<Item = (&'c str, CellRef<'c>)>,
    ) -> Row {
        let columns = columns.map(|(name, cell)| (name.to_string(), Cell::from(cell))).collect();
        Row { table: table.to_string(), key: key.to_vec(), ingested_at, columns }
    }

    fn build_encoded<'c>(
        table: &str,
        key: &[u8],
        ingested_at: i64,
        columns: impl Iterator<Item = (&'c str, &'c [u8])> + Clone,
    ) -> Result<Row> {
        let columns = columns
            .map(|(name, cell)| Ok((name.to_string(), super::codec::decode_cell(cell)?.to_cell())))
            .collect::<Result<_>>()?;
        Ok(Row { table: table.to_string(), key: key.to_vec(), ingested_at, columns })
    }
}

impl RowForm for RowBytes {
    fn build<'c>(
        table: &str,
        key: &[u8],
        ingested_at: i64,
        columns: impl Iterator<Item = (&'c str, CellRef<'c>)>,
    ) -> RowBytes {
        RowBytes::new(table, key, ingested_at, columns)
    }

    fn build_encoded<'c>(
        table: &str,
        key: &[u8],
        ingested_at: i64,
        columns: impl Iterator<Item = (&'c str, &'c [u8])> + Clone,
    ) -> Result<RowBytes> {
        Ok(RowBytes::from_encoded(table, key, ingested_at, columns))
    }
}

/// Where a wanted row lies: its block table and its key-index entry.
pub(super) type Place = (u16, KeyEntry);

/// A request reading more blocks than this reads those the cache misses into the reused
/// buffer, without caching them.
const CACHED_REQUEST_BLOCKS: usize = 4;

impl Store {
    /// Calls `f(i, value)` with the stored value of the row at each `places[i]`, block by
    /// block and page by page (so not in the order of `places`): each block's frame is read
    /// once, and only the pages holding wanted rows are decompressed.
    pub(super) fn read_places(&self, places: &[Place], mut f: impl FnMut(usize, &[u8]) -> Result<()>) -> Result<()> {
        let block_of = |i: usize| (places[i].0, places[i].1.seq, places[i].1.block);
        let mut order: Vec<usize> = (0..places.len()).collect();
        order.sort_unstable_by_key(|&i| (block_of(i), places[i].1.row));
        let groups: Vec<&[usize]> = order.chunk_by(|&a, &b| block_of(a) == block_of(b)).collect();
        let sweep = groups.len() > CACHED_REQUEST_BLOCKS;
        for group in groups {
            let id @ (table, seq, block) = block_of(group[0]);
            let at = || format!("block {table}/{seq}/{block}");
            // Rows the cache holds (their page, or the whole block a commit wrote).
            let mut missing = Vec::new();
            let mut cached = Vec::new();
            {
                let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                for &i in group {
                    match cache.row(&id, places[i].1.row) {
                        Some((rows, r)) => cached.push((i, rows, r)),
                        None => missing.push(i),
                    }
                }
            }
            for (i, rows, r) in cached {
                f(i, &rows[r])?;
            }
            if missing.is_empty() {
                continue;
            }
            let (frame, _) = self.stored_frame(keys::BLOCK_ROWS, table, seq, block, None)?;
            let dir = pages::Directory::parse(&frame).with_context(at)?;
            let by_page =
                missing.chunk_by(|&a, &b| dir.page_of(places[a].1.row).ok() == dir.page_of(places[b].1.row).ok());
            for wanted in by_page {
                let page = dir.page_of(places[wanted[0]].1.row).with_context(at)?;
                let first = dir.pages[page].first;
                let past_end = || corrupt!("key index points past block {table}/{seq}/{block}");
                if sweep {
                    let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
                    self.decode_page(table, &frame, &dir, page, &mut scratch).with_context(at)?;
                    let spans = blocks::item_spans(&scratch).with_context(at)?;
                    for &i in wanted {
                        let &(start, end) = spans.get((places[i].1.row - first) as usize).ok_or_else(past_end)?;
                        f(i, &scratch[start as usize..end as usize])?;
                    }
                } else {
                    let mut raw = Vec::new();
                    self.decode_page(table, &frame, &dir, page, &mut raw).with_context(at)?;
                    let rows = Arc::new(blocks::PackedItems::new(raw).with_context(at)?);
                    for &i in wanted {
                        let r = (places[i].1.row - first) as usize;
                        f(i, rows.get(r).ok_or_else(past_end)?)?;
                    }
                    self.cache.lock().unwrap_or_else(|p| p.into_inner()).put(id, first, rows);
                }
            }
        }
        Ok(())
    }

    /// `f` of the stored value at one place: read as any request of one block is, through
    /// the cache.
    pub(super) fn with_value<T>(&self, place: Place, f: impl FnOnce(&[u8]) -> Result<T>) -> Result<T> {
        let (table, entry) = place;
        let mut f = Some(f);
        let mut out = None;
        self.read_places(&[place], |_, value| {
            if let Some(f) = f.take() {
                out = Some(f(value)?);
            }
            Ok(())
        })?;
        out.ok_or_else(|| corrupt!("row {} of block {table}/{}/{} was not read", entry.row, entry.seq, entry.block))
    }

    /// Where each of `keys` that is stored and within retention lies, with its key.
    pub(super) fn places_of<'k>(&self, keys: &'k [Vec<u8>]) -> Result<(Vec<Place>, Vec<&'k Vec<u8>>)> {
        let mut places = Vec::with_capacity(keys.len());
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(place) = self.place_of(key)? {
                places.push(place);
                found.push(key);
            }
        }
        Ok((places, found))
    }

    /// The rows at `keys` that are stored, within retention and meet every condition of
    /// `filter`, in the order of `keys`.
    pub fn get_rows_where<R: RowForm>(&self, keys: &[Vec<u8>], filter: &[Condition]) -> Result<Vec<R>> {
        let (places, wanted) = self.places_of(keys)?;
        let mut out: Vec<Option<R>> = places.iter().map(|_| None).collect();
        self.read_places(&places, |i, value| {
            out[i] = self.row_if_passes(wanted[i], value, filter)?;
            Ok(())
        })?;
        Ok(out.into_iter().flatten().collect())
    }

    /// For each (SHA1, DeviceId) of `lookups`, what [`Store::lookup_where`] answers, in the
    /// order asked; the blocks of all their hits read once.
    pub fn lookup_many<R: RowForm>(
        &self,
        table: &str,
        lookups: &[(String, Option<String>)],
        filter: &[Condition],
    ) -> Result<Vec<Vec<R>>> {
        let Some(tid) = self.table_id(table) else { return Ok(lookups.iter().map(|_| Vec::new()).collect()) };
        let mut places = Vec::new();
        // For each place: its key and which look-up found it.
        let mut hits = Vec::new();
        for (n, (sha1, device)) in lookups.iter().enumerate() {
            let prefix = keys::event_prefix(tid, sha1, device.as_deref());
            for (k, e) in self.runs.scan_prefix(&self.gens, &self.unzstd, &prefix, true)? {
                if self.visible(&k) {
                    places.push((tid, e));
                    hits.push((k, n));
                }
            }
        }
        let mut rows: Vec<Option<R>> = places.iter().map(|_| None).collect();
        self.read_places(&places, |i, value| {
            rows[i] = self.row_if_passes(&hits[i].0, value, filter)?;
            Ok(())
        })?;
        let mut out: Vec<Vec<R>> = lookups.iter().map(|_| Vec::new()).collect();
        for ((_, n), row) in hits.into_iter().zip(rows) {
            out[n].extend(row);
        }
        Ok(out)
    }
}
