//! Generations: the bulk of the event data — row blocks' frames, and the event key-index
//! runs' chunks (`I`) and column-index entries (`i`) — lives in a folder of its own per span
//! of ingestion, `<data>/gens/<id>`, and a generation whose rows are all past the retention
//! horizon is deleted whole, files and all.
//!
//! The blocks' frames go into an append-only file, `<id>/blocks`; the index items into a
//! sled database in the same folder. Why a plain file for the blocks: they are written
//! once, in order, and read by offset; in sled each would be written about three times
//! (a leaf's deltas, then the leaf rewritten when it splits) and its segments reused only
//! once less than half live, so the generation's sled file was 1.68× its live bytes
//! (BENCHMARKS.md). A block's directory entry (`D`, main database) holds its frames'
//! offset; the file's committed length is recorded with every batch that appends to it
//! (`m` `blocks-end/<id>`), so the next open cuts off whatever a crash left beyond it.
//!
//! Why: sled reclaims the space of removed items only from segments less than half live,
//! and its cleaner moves the live pages of old segments to the tip, among new ones, so a
//! day's expiry seldom frees whole segments. In one database the file settled at 1.35–1.4×
//! its size when retention first bit (BENCHMARKS.md). Deleting a generation's file gives
//! its space back at once, so the data directory stays flat under a constant load.
//!
//! What stays in the main database (generation 0): everything that commits a unit of work
//! (block directory entries `D`, run metadata `M`, counters, source offsets, findings,
//! cursors), FileProfile's blocks and runs (exempt from retention), and the generation list
//! itself. A generation's data is written to its block file and its database and made
//! durable *before* the main batch that makes it visible is applied, so a crash leaves at
//! worst data nothing refers to: the next open cuts the newest block files back to their
//! committed length, removes the newest generation's column-index entries beyond the last
//! committed batch, orphan run chunks ([`super::runs`]), and generation folders the list
//! does not hold.
//!
//! A new generation starts with the first batch after the current one has been written
//! to for an eighth of the retention (store clock), so seven to nine generations hold a
//! retention's rows: the directory moves by about an eighth of the retention's data as one
//! goes, instead of growing.

use super::{dec, enc, keys};
use crate::error::{StoreContext as _, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Rows stamped up to this far ahead of the store clock go into a generation (a day).
const AHEAD_AT_LEAST: i64 = 86_400 * lookout_plugin_sdk::time::TICKS_PER_SEC;
/// A generation is written to for this fraction of the retention before the next starts.
pub const GENERATIONS_PER_RETENTION: i64 = 8;
/// sled's page cache per generation database (a bound: it fills only with pages read or
/// written, and only the newest generation is written to). The newest takes each batch's
/// column-index entries, inserted all over its tree: with 16 MiB, a 1M-row ingest read
/// evicted leaves back and took ~10% longer.
const GENERATION_CACHE_BYTES: u64 = 32 << 20;

/// A generation as the main database records it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Record {
    id: u32,
    /// The first batch sequence whose event rows went into it.
    first_seq: u64,
    /// The store clock when it started (0: no clock was set).
    started: i64,
}

struct Generation {
    record: Record,
    db: sled::Db,
    blocks: BlockFile,
}

/// A generation's block file: frames appended at its end, read by offset.
struct BlockFile {
    path: PathBuf,
    file: std::fs::File,
    /// The length the main database records: every committed batch's frames lie before it.
    end: u64,
    /// The file's length now: beyond `end` after a batch that failed to commit. Its frames
    /// stay, unreferenced (until a crash's open cuts them off): the next batch appends after
    /// them, since a main batch that failed part way may have left directory entries in
    /// sled's memory that point at them (`apply_batch` inserts key by key), and those must
    /// never come to point at another batch's frames.
    len: u64,
}

impl BlockFile {
    /// Opens (or creates) the file and cuts it to `end`, the length committed batches
    /// wrote; a file shorter than that lost frames the store refers to.
    fn open(path: PathBuf, end: u64) -> Result<BlockFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the block file {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("cannot read the size of {}", path.display()))?.len();
        if len < end {
            return Err(StoreError::Unusable(format!(
                "the block file {} is {len} bytes, but the store committed {end} bytes of row blocks to it \
                 (it was cut short or replaced); the store cannot be read without them: ingest the logs again \
                 into a new --data directory",
                path.display()
            )));
        }
        if len > end {
            tracing::info!(file = %path.display(), bytes = len - end, "cutting off block frames a crash left uncommitted");
            file.set_len(end).with_context(|| format!("cannot cut {} to {end} bytes", path.display()))?;
            file.sync_all().with_context(|| format!("cannot sync {}", path.display()))?;
        }
        Ok(BlockFile { path, file, end, len: end })
    }

    /// Writes `frames` at the file's end and makes them durable (before the batch that
    /// refers to them).
    fn append(&mut self, frames: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt as _;
        let at = self.len;
        // Counted as written from here on: a write that fails part way leaves bytes there.
        self.len = at + frames.len() as u64;
        self.file.write_all_at(frames, at).with_context(|| {
            format!(
                "cannot write row blocks to {} at offset {at} (check the disk and its free space)",
                self.path.display()
            )
        })?;
        self.file.sync_data().with_context(|| format!("cannot sync {} to disk", self.path.display()))
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt as _;
        if offset.saturating_add(u64::from(len)) > self.end {
            return Err(corrupt!(
                "a block's frame at offset {offset} ({len} bytes) lies past the end of {} ({} bytes); \
                 the store is damaged: ingest the logs again into a new --data directory",
                self.path.display(),
                self.end
            ));
        }
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .with_context(|| format!("cannot read {len} bytes of {} at offset {offset}", self.path.display()))?;
        Ok(buf)
    }
}

/// Where a generation's block file's committed length is recorded (main database).
pub fn blocks_end_key(id: u32) -> Vec<u8> {
    keys::named_key(keys::META, &format!("blocks-end/{id}"))
}

/// The name of a generation's block file in its folder.
const BLOCK_FILE: &str = "blocks";

/// The generation databases of a store, and the main one (generation 0).
pub struct Generations {
    root: PathBuf,
    main: sled::Db,
    /// By id; ids (and first sequences) only grow.
    gens: BTreeMap<u32, Generation>,
    /// The list on disk lacks a generation started since (written with the next batch).
    unrecorded: bool,
}

fn list_key() -> Vec<u8> {
    keys::named_key(keys::META, "generations")
}

/// Opens a sled database, getting past one way sled 0.34.7 fails to open after a kill:
/// its newest snapshot file (`snap.<lsn>`) left empty, which it reports as corruption
/// (spacejam/sled#1527) although an empty snapshot holds nothing. The open failed, so no
/// process holds the database; the empty file is removed and the open tried once more,
/// from the snapshot before it and the log.
pub(super) fn open_sled(config: &sled::Config, dir: &Path) -> sled::Result<sled::Db> {
    match config.open() {
        Err(sled::Error::Corruption { .. }) if remove_empty_snapshots(dir) > 0 => config.open(),
        other => other,
    }
}

/// Removes `snap.*` files of `dir` too short to be a snapshot (sled's own limit: 12
/// bytes of length and checksum); returns how many.
fn remove_empty_snapshots(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let empty = entry.metadata().is_ok_and(|m| m.is_file() && m.len() <= 12);
        if name.starts_with("snap.") && !name.ends_with(".in___motion") && empty {
            tracing::warn!(file = %entry.path().display(), "removing an empty sled snapshot left by a crash");
            if std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

fn open_db(path: &Path) -> Result<sled::Db> {
    // No flusher thread: a generation is flushed when a batch referring to it commits.
    let config = sled::Config::new().path(path).cache_capacity(GENERATION_CACHE_BYTES).flush_every_ms(None);
    open_sled(&config, path).with_context(|| {
        format!(
            "cannot open the generation database {} (check the disk and the folder's permissions; \
                 `lookout status` says which store it belongs to)",
            path.display()
        )
    })
}

impl Generations {
    /// No generation yet (before [`Generations::open`]).
    pub fn none(main: &sled::Db) -> Generations {
        Generations { root: PathBuf::new(), main: main.clone(), gens: BTreeMap::new(), unrecorded: false }
    }

    /// The data directory the generations are in (`None` before [`Generations::open`]).
    pub fn data_dir(&self) -> Option<&Path> {
        self.root.parent().filter(|p| !p.as_os_str().is_empty())
    }

    /// Opens the generations the main database lists, and deletes the folders of any it
    /// does not (one started by a batch a crash cut short, or one dropped just before).
    pub fn open(data_dir: &Path, main: &sled::Db) -> Result<Generations> {
        let root = data_dir.join("gens");
        let records: Vec<Record> = match main.get(list_key())? {
            Some(v) => dec(&v)?,
            None => Vec::new(),
        };
        let mut gens = BTreeMap::new();
        for record in records {
            let path = root.join(record.id.to_string());
            if !path.join("conf").exists() {
                return Err(StoreError::Unusable(format!(
                    "generation {} of the store in {} is missing ({} does not exist); the store cannot be read \
                     without it: ingest the logs again into a new --data directory",
                    record.id,
                    data_dir.display(),
                    path.display()
                )));
            }
            let end = match main.get(blocks_end_key(record.id))? {
                Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                    corrupt!(
                        "the recorded length of generation {}'s block file is corrupt; the store is damaged: \
                         ingest the logs again into a new --data directory",
                        record.id
                    )
                })?),
                None => 0,
            };
            let blocks = BlockFile::open(path.join(BLOCK_FILE), end)?;
            gens.insert(record.id, Generation { record, db: open_db(&path)?, blocks });
        }
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.parse::<u32>().is_ok_and(|id| !gens.contains_key(&id)) {
                    tracing::info!(folder = %e.path().display(), "removing a generation the store does not list");
                    std::fs::remove_dir_all(e.path())
                        .with_context(|| format!("cannot remove {}", e.path().display()))?;
                }
            }
        }
        Ok(Generations { root, main: main.clone(), gens, unrecorded: false })
    }

    /// The database holding generation `id` (0: the main one).
    pub fn db(&self, id: u32) -> Result<&sled::Db> {
        if id == 0 {
            return Ok(&self.main);
        }
        self.generation(id).map(|g| &g.db)
    }

    /// The generation event rows of batch `seq` went into (0 before any generation).
    pub fn of_seq(&self, seq: u64) -> u32 {
        self.gens.values().rev().find(|g| g.record.first_seq <= seq).map_or(0, |g| g.record.id)
    }

    /// The length of generation `id`'s block file: where a batch's frames will go.
    pub fn blocks_len(&self, id: u32) -> Result<u64> {
        Ok(self.generation(id)?.blocks.len)
    }

    /// Appends a batch's block frames to generation `id`'s file and makes them durable. They
    /// go where [`Generations::blocks_len`] said (nothing else writes in between); the
    /// batch records the file's new length (see [`blocks_end_key`]) and, once it is
    /// applied, [`Generations::blocks_committed`] takes it.
    pub fn append_blocks(&mut self, id: u32, at: u64, frames: &[u8]) -> Result<()> {
        let g = self.gens.get_mut(&id).ok_or_else(|| corrupt!("generation {id} is not open"))?;
        if g.blocks.len != at {
            return Err(corrupt!(
                "generation {id}'s block file moved to {} bytes while a batch was laid out for {at}",
                g.blocks.len
            ));
        }
        g.blocks.append(frames)
    }

    /// The batch that recorded `end` for generation `id`'s block file was applied.
    pub fn blocks_committed(&mut self, id: u32, end: u64) {
        if let Some(g) = self.gens.get_mut(&id) {
            g.blocks.end = end;
        }
    }

    /// `len` bytes at `offset` of the block file of the generation batch `seq` wrote to,
    /// and that file's path (for errors about what was read).
    pub fn read_blocks(&self, seq: u64, offset: u64, len: u32) -> Result<(Vec<u8>, &Path)> {
        let blocks = &self.generation(self.of_seq(seq))?.blocks;
        Ok((blocks.read(offset, len)?, &blocks.path))
    }

    fn generation(&self, id: u32) -> Result<&Generation> {
        self.gens.get(&id).ok_or_else(|| {
            corrupt!(
                "generation {id} is referred to but not in the store's list; the store is damaged: ingest the logs \
                 again into a new --data directory"
            )
        })
    }

    /// How far ahead of `now` a row's Timestamp may be for its block to go into a
    /// generation: one generation's span, and at least a day (a clock set at the start of
    /// a day's ingestion, devices a few hours ahead) or half the retention if that is
    /// less; `None`: no clock or no retention. A fixed clock (`--now`) with rows more than
    /// that after it puts them all here: correct, only without a generation's benefit.
    /// Rows further ahead are rare, and kept in the main database a block at a time.
    pub fn ahead_limit(now: Option<i64>, retention: Option<i64>) -> Option<i64> {
        let retention = retention?;
        // A day, unless the retention is so short that a day is most of it.
        let span = (retention / GENERATIONS_PER_RETENTION).max(AHEAD_AT_LEAST.min(retention / 2));
        Some(now?.saturating_add(span))
    }

    /// The generation the event rows of batch `seq` go into: the newest, or a new one if
    /// there is none or the newest has been written to for an eighth of `retention` at
    /// `now`. A new one is recorded with `batch`; the bool says the list was written there
    /// (see [`Generations::committed`]).
    pub fn for_batch(
        &mut self,
        seq: u64,
        now: Option<i64>,
        retention: Option<i64>,
        batch: &mut sled::Batch,
    ) -> Result<(u32, bool)> {
        let newest = self.gens.values().next_back().map(|g| g.record);
        let span_over = |r: &Record| match (now, retention) {
            (Some(now), Some(ret)) => now.saturating_sub(r.started) >= (ret / GENERATIONS_PER_RETENTION).max(1),
            _ => false,
        };
        let id = match newest {
            Some(r) if !span_over(&r) && r.first_seq <= seq => r.id,
            _ => {
                let id = newest.map_or(1, |r| r.id + 1);
                let path = self.root.join(id.to_string());
                // Left by a batch that failed before it committed: nothing refers to it.
                if path.exists() {
                    std::fs::remove_dir_all(&path).with_context(|| format!("cannot remove {}", path.display()))?;
                }
                std::fs::create_dir_all(&self.root)
                    .with_context(|| format!("cannot create {}", self.root.display()))?;
                let record = Record { id, first_seq: seq, started: now.unwrap_or(0) };
                let db = open_db(&path)?;
                let blocks = BlockFile::open(path.join(BLOCK_FILE), 0)?;
                // The new folder's entries (sled's `conf`), its own entry and that of `gens`
                // on disk too: a power cut must not lose a generation the list will name.
                // Only then is it taken: one that failed here is not used by the next batch
                // without being listed (the next attempt removes the folder and starts over).
                for dir in [Some(path.as_path()), Some(self.root.as_path()), self.root.parent()].into_iter().flatten() {
                    std::fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .with_context(|| format!("cannot sync {}", dir.display()))?;
                }
                self.gens.insert(id, Generation { record, db, blocks });
                self.unrecorded = true;
                id
            }
        };
        if self.unrecorded {
            batch.insert(list_key(), self.list()?);
        }
        Ok((id, self.unrecorded))
    }

    fn list(&self) -> Result<Vec<u8>> {
        enc(&self.gens.values().map(|g| g.record).collect::<Vec<_>>())
    }

    /// A batch that wrote the list (from [`Generations::for_batch`] or
    /// [`Generations::unlist`]) was applied: every generation held is recorded.
    pub fn committed(&mut self) {
        self.unrecorded = false;
    }

    /// Makes what was written to generation `id` durable (before a main batch refers to it).
    pub fn flush(&self, id: u32) -> Result<()> {
        if id != 0 {
            self.db(id)?.flush().with_context(|| format!("cannot flush generation {id} to disk"))?;
        }
        Ok(())
    }

    pub fn flush_all(&self) -> Result<()> {
        for id in self.gens.keys() {
            self.flush(*id)?;
        }
        Ok(())
    }

    /// Every generation: (id, first sequence, first sequence of the next or `None`).
    pub fn spans(&self) -> Vec<(u32, u64, Option<u64>)> {
        let firsts: Vec<(u32, u64)> = self.gens.values().map(|g| (g.record.id, g.record.first_seq)).collect();
        firsts.iter().enumerate().map(|(i, (id, first))| (*id, *first, firsts.get(i + 1).map(|n| n.1))).collect()
    }

    /// Removes generation `id` from the list (in `batch`); once the batch is applied,
    /// [`Generations::delete`] removes its folder.
    pub fn unlist(&mut self, id: u32, batch: &mut sled::Batch) -> Result<()> {
        let kept: Vec<Record> = self.gens.values().map(|g| g.record).filter(|r| r.id != id).collect();
        batch.insert(list_key(), enc(&kept)?);
        batch.remove(blocks_end_key(id));
        Ok(())
    }

    /// Closes generation `id` and deletes its folder (after the batch of
    /// [`Generations::unlist`] was applied; a crash before this leaves a folder the next
    /// open deletes).
    pub fn delete(&mut self, id: u32) -> Result<()> {
        if let Some(g) = self.gens.remove(&id) {
            drop(g.db);
            let path = self.root.join(id.to_string());
            std::fs::remove_dir_all(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        Ok(())
    }

    /// Removes what a batch a crash cut short wrote to the newest generation's database:
    /// column-index entries of sequences from `next_seq` on (nothing refers to them, and a
    /// later batch under the same sequence must not find its own left over). Its block
    /// frames beyond the committed end are cut off when the file is opened, or overwritten
    /// by the next batch; its run chunks are orphans [`super::runs`] removes.
    pub fn sweep_uncommitted(&self, next_seq: u64) -> Result<()> {
        let Some(g) = self.gens.values().next_back() else { return Ok(()) };
        let db = &g.db;
        let mut batch = sled::Batch::default();
        let mut n = 0u64;
        for k in db.scan_prefix([keys::INDEX]).keys() {
            let k = k?;
            if keys::index_key_seq(&k).is_some_and(|seq| seq >= next_seq) {
                batch.remove(k);
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(items = n, generation = g.record.id, "removing what a crash left uncommitted");
            db.apply_batch(batch).context("cannot remove what a batch cut short left in its generation")?;
            db.flush().context("cannot flush a generation to disk")?;
        }
        Ok(())
    }

    /// Bytes of every generation's files.
    pub fn size_on_disk(&self) -> u64 {
        self.gens.values().map(|g| g.db.size_on_disk().unwrap_or(0) + g.blocks.len).sum()
    }

    /// The main database, then every generation's (for a walk over every item).
    pub fn all_dbs(&self) -> impl Iterator<Item = &sled::Db> {
        std::iter::once(&self.main).chain(self.gens.values().map(|g| &g.db))
    }

    pub fn count(&self) -> usize {
        self.gens.len()
    }
}

/// How many generations the main database lists (for a reader without the store).
pub(super) fn listed(main: &sled::Db) -> Result<u64> {
    Ok(match main.get(list_key())? {
        Some(v) => dec::<Vec<Record>>(&v)?.len() as u64,
        None => 0,
    })
}

/// Bytes of the generation folders under `data_dir` (for a reader without the store).
pub fn bytes_under(data_dir: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(p) else { return 0 };
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path()),
                Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => 0,
            })
            .sum()
    }
    walk(&data_dir.join("gens"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sled refuses a database whose newest snapshot file is empty (as a kill can leave
    /// it); the store's open removes that file and opens it with everything in it.
    #[test]
    fn an_empty_newest_snapshot_left_by_a_crash_does_not_stop_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let config = sled::Config::new().path(&path);
        {
            let db = config.open().unwrap();
            db.insert(b"k", b"v".to_vec()).unwrap();
            db.flush().unwrap();
        }
        std::fs::write(path.join("snap.FFFFFFFFFFFFFFFF"), b"").unwrap();
        // The handle just dropped keeps its file lock until sled's own threads let go of it.
        let unlocked = |open: &dyn Fn() -> sled::Result<sled::Db>| {
            for _ in 0..200 {
                match open() {
                    Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                        std::thread::sleep(std::time::Duration::from_millis(10))
                    }
                    other => return other,
                }
            }
            open()
        };
        let refused = unlocked(&|| config.open());
        assert!(matches!(refused, Err(sled::Error::Corruption { .. })), "sled alone refuses it: {refused:?}");
        let db = unlocked(&|| open_sled(&config, &path)).unwrap();
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        assert!(!path.join("snap.FFFFFFFFFFFFFFFF").exists());
    }
}
