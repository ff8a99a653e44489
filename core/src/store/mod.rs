//! The sled store: one main tree, partitioned into key spaces (see [`keys`]), and the
//! bulk of the event data in a sled database per generation ([`generations`]). Rows are
//! kept in ingest order in compressed blocks ([`blocks`]); the key index maps each row's
//! key to its place; retention drops whole blocks once every row in them is past the
//! horizon, and whole generations once they hold no block ([`retention`]). Nothing
//! outside this module knows a key or sled.
//!
//! Why one main tree: sled's `apply_batch` is atomic, crash-safe and much cheaper than a
//! multi-tree transaction, but only within one tree. Keeping every row's directory entry
//! and key-index run metadata, source offsets, counters, findings and cursors in one tree
//! lets every unit of work commit as one atomic batch, which is what makes "no row lost,
//! none stored twice" hold across `kill -9`; the generation data a batch refers to is
//! on disk before that batch is applied. Lookout is the only writer (sled locks the
//! directory), so reading before writing a batch cannot race.

pub mod block_filter;
pub mod blocks;
pub mod codec;
pub mod detectors;
mod dictionaries;
pub mod generations;
pub mod index;
pub mod key_filter;
pub(crate) mod keys;
#[cfg(test)]
mod model_tests;
mod outbox;
mod pages;
pub mod retention;
mod row_reads;
pub use row_reads::RowForm;
mod pass_batch;
pub use pass_batch::PassBatch;
mod pass_gate;
pub use pass_gate::Detecting;
mod state;
pub use state::StateChange;
pub mod runs;

use crate::error::{StoreContext as _, StoreError};
type Result<T, E = StoreError> = std::result::Result<T, E>;
use lookout_plugin_sdk::{Condition, RowRef};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::parse::normalise::NormalRow;
use crate::schema::TableKind;
use blocks::{BatchBlocks, BlockCache, KeyEntry};
use keys::KeyParts;

/// A [`StoreError::Unusable`], written like `format!`.
macro_rules! unusable {
    ($($t:tt)*) => {
        StoreError::Unusable(format!($($t)*))
    };
}

/// The layout of everything stored. A store of another format is refused on open.
pub const FORMAT_VERSION: u64 = 12;

/// The pseudo table number of FileProfile rows in blocks (event tables start at 1).
const PROFILE_TABLE: u16 = 0;

/// Decompressed blocks kept for reads (each ~100 KiB at most): the blocks a batch of
/// 10,000 rows just wrote (~90 for Defender rows), which the pass after it reads.
const BLOCK_CACHE_BLOCKS: usize = 128;

/// Batches committed after a failed key-index merge before the next one starts.
const MERGE_PAUSE_AFTER_FAILURE: u32 = 64;
/// At most this many row locations are remembered for a pass (see `Store::hints`): 48
/// bytes or so each, and a tick hands a detector thousands.
const MAX_ROW_HINTS: usize = 200_000;

/// Where a row [`Store::new_row_keys_where`] is handing over is stored: read it there.
#[derive(Debug, Clone, Copy)]
pub struct RowAt {
    table: u16,
    seq: u64,
    block: u16,
    row: u16,
}

/// Totals kept with the data (one key, rewritten with every batch).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub rows: BTreeMap<String, u64>,
    pub duplicates: u64,
    pub rejected: BTreeMap<String, u64>,
    /// Rows that arrived already older than the retention horizon (not stored).
    #[serde(default)]
    pub expired: u64,
    /// Rows dropped by retention after being stored.
    #[serde(default)]
    pub removed: u64,
}

/// How far a source file has been read, committed with the rows read from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceState {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    /// SHA-256 of the first `head_len` bytes: tells a reused inode from the old file.
    pub head: Vec<u8>,
    pub head_len: u64,
    /// Bytes of (decompressed) input consumed, or array elements for JSON array exports.
    pub offset: u64,
    pub unit: OffsetUnit,
    pub compressed: bool,
    /// Lines (or array elements) consumed, so reject line numbers count from the start.
    pub lines: u64,
    /// Raw size when the file was last read to its end (compressed or array files).
    pub raw_size: u64,
    /// Read completely; only a change of size or content makes it worth reading again.
    pub done: bool,
    /// SHA-256 of the `tail_len` bytes of content just before `offset` (line files): with
    /// the head, proves that another file (a rotated copy) or this file after a rewrite
    /// holds the same bytes up to the offset before reading on from it.
    pub tail: Vec<u8>,
    pub tail_len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OffsetUnit {
    Bytes,
    ArrayElements,
}

/// A bad record kept aside.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectRecord {
    pub file: String,
    /// 1-based line (or array element) number.
    pub line: u64,
    /// Byte offset of the record's start in the (decompressed) file.
    pub offset: u64,
    pub kind: String,
    pub reason: String,
    /// The first bytes of the record, lossily decoded.
    pub excerpt: String,
}

/// The meta value of the retention a data directory was last used with.
const RETENTION_NAME: &str = "retention";

pub(crate) fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(|e| corrupt!("encode: {e}"))
}

pub(crate) fn dec<T: DeserializeOwned>(b: &[u8]) -> Result<T> {
    Ok(bincode::serde::decode_from_slice(b, bincode::config::standard()).map_err(|e| corrupt!("decode: {e}"))?.0)
}

pub struct Store {
    path: PathBuf,
    db: sled::Db,
    tables: HashMap<String, u16>,
    table_names: HashMap<u16, String>,
    schemas: HashMap<Vec<String>, u32, FastHash>,
    /// The schema of the last row stored: rows of a file nearly always share it. Kept as
    /// the names' allocation the row came with (rows of one file share it, so a pointer
    /// comparison finds it) and the id.
    last_schema: Option<LastSchema>,
    schema_names: HashMap<u32, std::sync::Arc<Vec<String>>>,
    counters: Counters,
    /// The sequence the next batch that stores rows commits under. Above `head` + 1 once
    /// a batch failed after writing to its generation: its sequence is not used again in
    /// this process (see [`WriteBatch::forget_uncommitted`]).
    next_journal: u64,
    /// The newest batch sequence on disk (or the backfill floor, if higher): what the key
    /// filter is saved against and what detectors' cursors move to. Never a sequence that
    /// failed: after a reopen that one is used again, by another batch.
    head: u64,
    /// Rows with a Timestamp below this are invisible, and removed by [`retention`]. It
    /// only moves forward, and is kept with the data (so `status` and a later run without
    /// a clock setting see what the last one saw).
    horizon: Option<i64>,
    /// How long rows are kept (ticks), if they are not kept forever.
    retention: Option<i64>,
    /// Set when the process is asked to stop: long work on the store (building a declared
    /// index over every stored row) ends early instead of holding the stop up.
    interrupt: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Tests: the next commit fails after writing to its generation, as a full disk would.
    #[cfg(test)]
    fail_next_main_commit: bool,
    /// Tests: the next key-index upkeep drops no run (as when the process ends between a
    /// step that removed a generation's last blocks and the drop of its runs).
    #[cfg(test)]
    skip_next_run_drop: bool,
    /// The store clock as last advanced (when generations start; see [`generations`]).
    now: Option<i64>,
    /// The generation databases (and the main one as generation 0).
    gens: generations::Generations,
    /// The earliest newest-row Timestamp of a stored event block (`None`: not known yet;
    /// see [`Store::expire_step`]).
    earliest_block_end: Option<i64>,
    /// Key-index runs were dropped or merged since the empty generations were last looked
    /// for: one of them may hold nothing now.
    generations_to_check: bool,
    /// For the index's items in sled (key-index chunks, column-index entries).
    zstd: zstd::bulk::Compressor<'static>,
    /// For row blocks' key frames (with zstd's frame checksum: they are read from plain
    /// files).
    block_zstd: zstd::bulk::Compressor<'static>,
    /// For row blocks' rows: pages, with each table's dictionary (see [`pages`]).
    rows_zstd: dictionaries::RowCompression,
    unzstd: Mutex<zstd::bulk::Decompressor<'static>>,
    /// For rows' pages.
    rows_unzstd: Mutex<dictionaries::Decoders>,
    cache: Mutex<BlockCache>,
    /// The buffer [`Store::read_places`] decompresses blocks it does not find cached into.
    scratch: Mutex<Vec<u8>>,
    /// The buffer a batch's block frames are gathered in before they are appended to the
    /// block file, kept from batch to batch: grown afresh for each (a few MiB), its
    /// doublings' copies and first-touch page faults were ~3% of the storing thread.
    spare_frames: Vec<u8>,
    /// Where the rows a detector's pass was just handed are, by key (from the blocks
    /// [`Store::new_row_keys_where`] read them in, or the index entries that chose them):
    /// the detector fetches them next, and need not look each up in the key index again.
    /// Cleared by [`Store::forget_row_hints`] before each pass; event rows only (they
    /// never move).
    hints: Mutex<lookout_plugin_sdk::collections::HashMap<Vec<u8>, (u64, u16, u16)>>,
    /// The key index (see [`runs`]).
    runs: runs::Runs,
    /// The merge of key-index runs under way on its own thread, if any.
    merge: Option<runs::MergeJob>,
    /// Batches to commit before the next merge starts (after one failed).
    merge_pause: u32,
    /// Detection passes running: a merge waits while one does (see [`pass_gate`]).
    pass_gate: Arc<pass_gate::PassGate>,
    next_reject: u64,
    /// The stored event keys, approximately; loaded or built when the first row is added.
    key_filter: Option<key_filter::KeyFilter>,
    /// The indexes detectors declared (kept with the data; see [`index`]).
    index_specs: Vec<lookout_plugin_sdk::IndexDecl>,
    /// Which cells the indexes read, by row layout (see [`index::PostingLayouts`]).
    posting_layouts: index::PostingLayouts,
    /// How many keys the last batch stored: the next one's map of keys starts that big
    /// (growing it from empty rehashed every key about once more).
    last_batch_keys: usize,
    /// How big each detector's state base and journal are (see [`state`]), by detector
    /// id: as this process last read or committed them.
    state_sizes: Mutex<HashMap<String, state::StateSizes>>,
    /// Held while a detector's pass commits (see [`pass_batch`]).
    pass_commits: Mutex<()>,
}

/// Where a frame was read from: its offset in a generation's block file, and the file.
type FilePlace<'a> = (u64, &'a Path);

/// xxh3 for in-memory maps keyed by row keys and column lists: these are hashed once per
/// row, and SipHash's DoS resistance buys nothing for keys Lookout made itself.
type FastHash = std::hash::BuildHasherDefault<OneShotXxh3>;

/// Hashes each byte string a key is made of in one xxh3 call, seeded with what came
/// before it (a length, an earlier string). The streaming `Xxh3` hasher this replaces set
/// up a state of several hundred bytes for every hash and copied every key into its
/// buffer: 6.5% of the storing thread's samples in `lookout ingest`, most of it while the
/// batch's map of new keys grew.
#[derive(Default, Clone, Copy)]
struct OneShotXxh3(u64);

impl std::hash::Hasher for OneShotXxh3 {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        // A number is mixed in (the golden-ratio multiply spreads it over every bit); the
        // byte strings after it are hashed with the result as their seed.
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// First table id handed to a table Lookout has not seen before.
const FIRST_TABLE_ID: u16 = 1;

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create data directory {}", dir.display()))?;
        // The main database holds the directory, run metadata and detectors' results; the
        // bulk (blocks, key-index chunks, column-index entries) is in the generations.
        let config = sled::Config::new().path(dir.join("db")).cache_capacity(32 << 20).flush_every_ms(Some(500));
        // sled reports a held lock as an I/O error of kind Other, "could not acquire lock".
        let locked = |e: &sled::Error| {
            matches!(e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock"))
        };
        // A handle dropped a moment ago (this process reopening after an error) releases
        // its lock when sled's background threads let go of it: wait a little for that.
        let mut attempts = 0;
        let db = loop {
            match generations::open_sled(&config, &dir.join("db")) {
                Ok(db) => break db,
                Err(e) if locked(&e) && attempts < 40 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) if locked(&e) => {
                    return Err(unusable!(
                        "the database in {} is in use by another Lookout process (a running `lookout run`?); \
                         stop it or point --data elsewhere",
                        dir.display()
                    ))
                }
                Err(e) => {
                    return Err(StoreError::Context {
                        what: format!("cannot open the database in {}", dir.display()),
                        source: Box::new(e.into()),
                    })
                }
            }
        };
        let gens = generations::Generations::none(&db);
        let (rows_zstd, rows_unzstd) = dictionaries::RowCompression::load(&db)?;
        let mut store = Store {
            path: dir.to_path_buf(),
            db,
            tables: HashMap::new(),
            table_names: HashMap::new(),
            schemas: HashMap::default(),
            last_schema: None,
            schema_names: HashMap::new(),
            counters: Counters::default(),
            next_journal: 1,
            head: 0,
            horizon: None,
            retention: None,
            interrupt: None,
            #[cfg(test)]
            fail_next_main_commit: false,
            #[cfg(test)]
            skip_next_run_drop: false,
            now: None,
            gens,
            earliest_block_end: None,
            generations_to_check: false,
            zstd: blocks::index_compressor()?,
            block_zstd: blocks::compressor()?,
            rows_zstd,
            unzstd: Mutex::new(blocks::decompressor()?),
            rows_unzstd: Mutex::new(rows_unzstd),
            cache: Mutex::new(BlockCache::new(BLOCK_CACHE_BLOCKS)),
            scratch: Mutex::new(Vec::new()),
            spare_frames: Vec::new(),
            hints: Mutex::default(),
            runs: runs::Runs::empty(),
            merge: None,
            merge_pause: 0,
            pass_gate: Arc::default(),
            next_reject: 1,
            key_filter: None,
            index_specs: Vec::new(),
            posting_layouts: index::PostingLayouts::default(),
            last_batch_keys: 0,
            state_sizes: Mutex::new(HashMap::new()),
            pass_commits: Mutex::new(()),
        };
        store.check_format()?;
        store.gens = generations::Generations::open(dir, &store.db)?;
        store.runs = {
            let mut z = store.unzstd.lock().unwrap_or_else(|p| p.into_inner());
            runs::Runs::open(&store.gens, &mut z)?
        };
        store.load_registries()?;
        store.hold_runs_again()?;
        store.gens.sweep_uncommitted(store.next_journal)?;
        store.load_indexes()?;
        Ok(store)
    }

    /// Makes the held key-index runs (a batch's own event run, not written: see `runs`)
    /// again from their batches' key frames: every event block of the batch but those
    /// from ahead of the clock (which have a run of their own).
    fn hold_runs_again(&mut self) -> Result<()> {
        let started = std::time::Instant::now();
        let todo = self.runs.to_hold_again();
        let tables: Vec<u16> = self.table_names.keys().copied().filter(|t| *t != PROFILE_TABLE).collect();
        for (id, seq) in &todo {
            let mut entries = Vec::new();
            for tid in &tables {
                let start = keys::block_key(keys::BLOCK_META, *tid, *seq, 0, 0);
                let end = keys::block_key(keys::BLOCK_META, *tid, *seq, blocks::AHEAD_BLOCK, 0);
                for kv in self.db.range(start..end) {
                    let (k, v) = kv?;
                    let Some((_, _, block)) = keys::block_of(&k) else { continue };
                    let raw = self.block_frame(keys::BLOCK_KEYS, *tid, *seq, block, Some(&v))?;
                    for (row, (key, content)) in blocks::frame_keys(&raw)?.into_iter().enumerate() {
                        let row = u16::try_from(row)
                            .map_err(|_| corrupt!("block {tid}/{seq}/{block} has over 65,535 rows"))?;
                        entries.push((key.to_vec(), KeyEntry { seq: *seq, block, row, content }));
                    }
                }
            }
            runs::sort_entries(&mut entries);
            self.runs.hold_again(*id, entries)?;
        }
        if !todo.is_empty() {
            tracing::debug!(runs = todo.len(), ms = started.elapsed().as_millis() as u64, "key index runs held again");
        }
        Ok(())
    }

    /// Refuses a store written in another layout; records the layout in a new one (with
    /// its first batch, so opening a new store writes nothing).
    fn check_format(&mut self) -> Result<()> {
        let key = keys::named_key(keys::META, "format");
        match self.db.get(&key)? {
            Some(v) => {
                let found = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| corrupt!("corrupt format record"))?);
                if found != FORMAT_VERSION {
                    return Err(unusable!(
                        "the database in {} has store format {found}, this Lookout reads format {FORMAT_VERSION}; \
                         ingest the logs again into a new --data directory (the findings file can stay: \
                         finding ids do not change)",
                        self.path.display()
                    ));
                }
            }
            // Format 1 had rows under `e` and a journal under `j`; a store without either
            // holds nothing this format reads differently.
            None if self.db.scan_prefix([keys::EVENT]).next().is_some()
                || self.db.scan_prefix([b'j']).next().is_some() =>
            {
                return Err(unusable!(
                    "the database in {} was written by an older Lookout (store format 1; this one reads format \
                     {FORMAT_VERSION}); ingest the logs again into a new --data directory (the findings file can \
                     stay: finding ids do not change)",
                    self.path.display()
                ))
            }
            None => {}
        }
        Ok(())
    }

    fn load_registries(&mut self) -> Result<()> {
        for kv in self.db.scan_prefix([keys::TABLE]) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[1..]).into_owned();
            let id = u16::from_be_bytes(v.as_ref().try_into().map_err(|_| corrupt!("corrupt table id for {name}"))?);
            self.table_names.insert(id, name.clone());
            self.tables.insert(name, id);
        }
        for kv in self.db.scan_prefix([keys::SCHEMA]) {
            let (k, v) = kv?;
            let id = u32::from_be_bytes(
                k.get(1..5).and_then(|b| b.try_into().ok()).ok_or_else(|| corrupt!("corrupt schema key"))?,
            );
            let names: Vec<String> = dec(&v)?;
            self.schemas.insert(names.clone(), id);
            self.schema_names.insert(id, std::sync::Arc::new(names));
        }
        if let Some(v) = self.db.get([keys::COUNTERS])? {
            self.counters = dec(&v)?;
        }
        self.head = self.meta_u64("seq")?.max(self.meta_u64("jfloor")?);
        self.next_journal = self.head + 1;
        if let Some(v) = self.db.get(keys::named_key(keys::META, "horizon"))? {
            let b: [u8; 8] = v.as_ref().try_into().map_err(|_| corrupt!("corrupt retention horizon"))?;
            self.horizon = Some(i64::from_be_bytes(b));
        }
        self.next_reject = self.last_seq(keys::REJECT)?.map_or(1, |s| s + 1);
        Ok(())
    }

    fn last_seq(&self, space: u8) -> Result<Option<u64>> {
        Ok(match self.db.scan_prefix([space]).next_back() {
            Some(kv) => keys::seq_of(&kv?.0),
            None => None,
        })
    }

    /// Long work on this store (building a declared index over every stored row) ends
    /// early, with [`StoreError::Interrupted`], once `stop` is set.
    pub fn interrupt_on(&mut self, stop: Arc<std::sync::atomic::AtomicBool>) {
        self.interrupt = Some(stop);
    }

    pub fn data_dir(&self) -> &Path {
        &self.path
    }

    /// A read handle for another thread (the daemon's `/metrics` and `/status`).
    pub fn reader(&self) -> StoreReader {
        StoreReader { db: self.db.clone(), dir: self.path.clone() }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// How long rows are kept (ticks; `None`: forever). Takes effect with the next
    /// [`Store::advance_clock`].
    pub fn set_retention(&mut self, retention: Option<i64>) {
        self.retention = retention;
    }

    pub fn retention(&self) -> Option<i64> {
        self.retention
    }

    /// The retention this data directory was last used with (`Some(None)`: keep
    /// everything), if one was recorded: what a one-shot command given none applies, so
    /// that a `lookout ingest` with the default does not cut the rows a daemon run with a
    /// longer retention keeps (the horizon never moves back).
    pub fn recorded_retention(&self) -> Result<Option<Option<i64>>> {
        self.meta_value(RETENTION_NAME)
    }

    /// Records the retention this data directory is used with (see
    /// [`Store::recorded_retention`]); durable with the next flush or batch.
    pub fn record_retention(&self, retention: Option<i64>) -> Result<()> {
        if self.recorded_retention()? != Some(retention) {
            self.put_meta_value(RETENTION_NAME, &retention)?;
        }
        Ok(())
    }

    /// Moves the retention horizon to `now − retention` if that is later than it is:
    /// rows with a Timestamp below it are invisible from now on, a row that arrives below
    /// it is counted as expired and not stored, and [`Store::expire_step`] removes them.
    /// The horizon is recorded with the data (durable with the next flush or batch).
    pub fn advance_clock(&mut self, now: i64) -> Result<()> {
        self.now = Some(self.now.map_or(now, |n| n.max(now)));
        let Some(r) = self.retention else { return Ok(()) };
        let h = now.saturating_sub(r);
        if self.horizon.is_none_or(|old| h > old) {
            self.db.insert(keys::named_key(keys::META, "horizon"), &h.to_be_bytes()[..])?;
            self.horizon = Some(h);
        }
        Ok(())
    }

    pub fn horizon(&self) -> Option<i64> {
        self.horizon
    }

    /// Whether the row at this key is within retention (FileProfile rows always are).
    fn visible(&self, key: &[u8]) -> bool {
        match (self.horizon, keys::event_timestamp(key)) {
            (Some(h), Some(ts)) => ts >= h,
            _ => true,
        }
    }

    /// Blocks until everything committed so far is on disk.
    pub fn flush(&self) -> Result<()> {
        self.gens.flush_all()?;
        self.db.flush().context("cannot flush the database to disk")?;
        Ok(())
    }

    /// Flushes, then saves the key filter (see [`key_filter`]) with the state it covers, so
    /// the next process to store rows need not rebuild it. Called when a run of ingestion
    /// ends (not after every batch: the file grows with the store). Failing to save is
    /// only logged: a filter that is not saved is rebuilt when next needed.
    pub fn flush_and_save_key_filter(&self) -> Result<()> {
        self.flush()?;
        if let Some(f) = &self.key_filter {
            if let Err(e) = f.save(&self.key_filter_path(), self.head, self.event_rows()) {
                tracing::warn!(error = %crate::error::Chain(&e), "cannot save the key filter; it is rebuilt next time");
            }
        }
        Ok(())
    }

    fn key_filter_path(&self) -> PathBuf {
        self.path.join("keys.filter")
    }

    /// Event rows stored (every table but FileProfile), from the counters.
    fn event_rows(&self) -> u64 {
        let profile = lookout_plugin_sdk::tables::FILE_PROFILE;
        self.counters.rows.iter().filter(|(t, _)| t.as_str() != profile).map(|(_, n)| n).sum()
    }

    /// Loads the saved key filter if it covers this store exactly, else builds it from
    /// the stored keys.
    fn ensure_key_filter(&mut self) -> Result<()> {
        if self.key_filter.is_some() {
            return Ok(());
        }
        let (seq, rows) = (self.head, self.event_rows());
        if let Some(f) = key_filter::KeyFilter::load(&self.key_filter_path(), seq, rows) {
            self.key_filter = Some(f);
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut f = key_filter::KeyFilter::with_capacity(rows + rows / 4);
        let mut n = 0u64;
        self.runs.all_keys(&self.gens, &self.unzstd, |k| {
            f.insert(k);
            n += 1;
        })?;
        if n > 0 {
            tracing::info!(keys = n, elapsed_ms = started.elapsed().as_millis() as u64, "rebuilt the key filter");
        }
        self.key_filter = Some(f);
        Ok(())
    }

    /// Page `page` of a rows frame of `table`, decompressed into `out`.
    fn decode_page(
        &self,
        table: u16,
        frame: &[u8],
        dir: &pages::Directory,
        page: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let mut z = self.rows_unzstd.lock().unwrap_or_else(|p| p.into_inner());
        pages::page_into(frame, dir, page, out, |p, into| z.page(table, dir.dictionary, p, into))
    }

    /// A block's frame (`BLOCK_KEYS` or `BLOCK_ROWS`) decompressed, its items still packed:
    /// see [`Store::stored_frame`].
    fn block_frame(&self, space: u8, table: u16, seq: u64, block: u16, meta: Option<&[u8]>) -> Result<Vec<u8>> {
        let (frame, place) = self.stored_frame(space, table, seq, block, meta)?;
        let id = || {
            let at =
                place.map(|(offset, path)| format!(" at offset {offset} of {}", path.display())).unwrap_or_default();
            format!("block {table}/{seq}/{block}{at} (the store is damaged: ingest the logs again into a new --data directory)")
        };
        if space == keys::BLOCK_ROWS {
            let dir = pages::Directory::parse(&frame).with_context(id)?;
            let mut out = Vec::new();
            let mut z = self.rows_unzstd.lock().unwrap_or_else(|p| p.into_inner());
            pages::all_into(&frame, &dir, &mut out, |p, into| z.page(table, dir.dictionary, p, into))
                .with_context(id)?;
            Ok(out)
        } else {
            let mut z = self.unzstd.lock().unwrap_or_else(|p| p.into_inner());
            blocks::decompress(&mut z, &frame).with_context(id)
        }
    }

    /// A block's frame (`BLOCK_KEYS` or `BLOCK_ROWS`) as stored, still compressed: from its
    /// generation's block file, where its directory entry (`meta`, read here if not given)
    /// says (with that offset and file), or from its pieces in the main database
    /// ([`blocks::in_main`]).
    fn stored_frame(
        &self,
        space: u8,
        table: u16,
        seq: u64,
        block: u16,
        meta: Option<&[u8]>,
    ) -> Result<(Vec<u8>, Option<FilePlace<'_>>)> {
        let id = || format!("block {table}/{seq}/{block}");
        if blocks::in_main(table, block) {
            return Ok((blocks::read_pieces(&self.db, space, table, seq, block)?, None));
        }
        let read;
        let value = match meta {
            Some(v) => v,
            None => {
                read = self.db.get(keys::block_key(keys::BLOCK_META, table, seq, block, 0))?;
                read.as_deref().ok_or_else(|| corrupt!("{} is referred to but not in the block directory", id()))?
            }
        };
        let (meta, _) = blocks::decode_meta(value).with_context(id)?;
        let span = meta.file.ok_or_else(|| {
            corrupt!(
                "{}'s directory entry has no place in its generation's block file; the store is damaged: ingest \
                 the logs again into a new --data directory",
                id()
            )
        })?;
        let (offset, len) = span.frame(space);
        let (frame, path) = self.gens.read_blocks(seq, offset, len).with_context(id)?;
        if frame.len() != len as usize {
            return Err(corrupt!("{} at offset {offset} of {} is cut short", id(), path.display()));
        }
        Ok((frame, Some((offset, path))))
    }

    /// The number `table`'s rows are stored under in blocks (`None`: never seen).
    fn block_table(&self, table: &str) -> Option<u16> {
        if table == lookout_plugin_sdk::tables::FILE_PROFILE {
            Some(PROFILE_TABLE)
        } else {
            self.table_id(table)
        }
    }

    /// The block table number of a row key (`e` keys carry it, `p` keys are FileProfile).
    fn key_block_table(key: &[u8]) -> Option<u16> {
        match *key.first()? {
            keys::EVENT => Some(u16::from_be_bytes(key.get(1..3)?.try_into().ok()?)),
            keys::PROFILE => Some(PROFILE_TABLE),
            _ => None,
        }
    }

    /// `f` of the stored value of the row at `key`, if stored and within retention.
    fn with_value_at<T>(&self, key: &[u8], f: impl FnOnce(&[u8]) -> Result<T>) -> Result<Option<T>> {
        match self.place_of(key)? {
            Some(place) => self.with_value(place, f).map(Some),
            None => Ok(None),
        }
    }

    /// Where the row at `key` is (its block table and key-index entry), if stored and
    /// within retention: where the pass that handed it over found it, or the key index.
    fn place_of(&self, key: &[u8]) -> Result<Option<row_reads::Place>> {
        if !self.visible(key) {
            return Ok(None);
        }
        let Some(table) = Self::key_block_table(key) else { return Ok(None) };
        let hint = self.hints.lock().unwrap_or_else(|p| p.into_inner()).get(key).copied();
        if let Some((seq, block, row)) = hint {
            return Ok(Some((table, KeyEntry { seq, block, row, content: 0 })));
        }
        Ok(self.key_entry(key)?.map(|e| (table, e)))
    }

    /// Upkeep of the key index after a commit: drops runs wholly past the horizon, makes
    /// a finished merge visible and starts the next one. A merge reads and writes on a
    /// thread of its own (the storing thread goes on with the next batch: merging is about
    /// a sixth of a bulk ingest's storing work); only making its result visible, one small
    /// batch, is done here. Each step is one atomic batch, so a failure leaves the runs as
    /// they were and is only logged: the next commit tries again.
    fn maintain_runs(&mut self) {
        if self.merge.as_ref().is_some_and(runs::MergeJob::is_finished) {
            self.finish_merge();
            // Its inputs' generations may hold nothing now: the next expiry step looks.
            self.generations_to_check = true;
        }
        let busy = self.merge.as_ref().map(runs::MergeJob::inputs).unwrap_or_default();
        #[cfg(test)]
        let rounds = if std::mem::take(&mut self.skip_next_run_drop) { 0 } else { 4 };
        #[cfg(not(test))]
        let rounds = 4;
        for _ in 0..rounds {
            match self.runs.drop_expired(&self.gens, self.horizon, &busy) {
                Ok(true) => {
                    // A generation may hold nothing now: the next expiry step looks.
                    self.generations_to_check = true;
                    continue;
                }
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %crate::error::Chain(&e), "key index upkeep failed; retried after the next batch");
                    break;
                }
            }
        }
        if self.merge_pause > 0 {
            self.merge_pause -= 1;
        } else if self.merge.is_none() {
            if let Some(plan) = self.runs.plan_merge(&busy) {
                match runs::Runs::start_merge(&self.gens, plan, self.horizon, Arc::clone(&self.pass_gate)) {
                    Ok(job) => self.merge = Some(job),
                    Err(e) => {
                        tracing::warn!(error = %crate::error::Chain(&e), "cannot start a key index merge; retried after the next batch")
                    }
                }
            }
        }
    }

    /// Waits for the merge under way, if any, and makes its result visible.
    fn finish_merge(&mut self) {
        let Some(job) = self.merge.take() else { return };
        let (plan, merged) = job.join();
        let failed = match merged {
            Ok(merged) => self.runs.finish_merge(&self.gens, plan, merged).err(),
            Err(e) => {
                // What it wrote is named by no run's metadata: removed now (or at the next
                // open, if that fails too).
                if let Err(sweep) = self.runs.abandon_merge(&self.gens, &plan) {
                    tracing::warn!(error = %crate::error::Chain(&sweep), "cannot remove a failed merge's chunks now");
                }
                Some(e)
            }
        };
        if let Some(e) = failed {
            // The next merge waits a while: a merge that fails for good (a damaged run, a
            // full disk) is not tried again after every batch.
            self.merge_pause = MERGE_PAUSE_AFTER_FAILURE;
            tracing::warn!(
                error = %crate::error::Chain(&e),
                "a key index merge failed; the runs stay as they were, and it is tried again {} batches on",
                MERGE_PAUSE_AFTER_FAILURE
            );
        }
    }

    /// Marks a detection pass as running until the guard is dropped: background work on
    /// the store (a key-index merge) waits meanwhile, so the pass has the cores.
    pub fn detecting(&self) -> Detecting {
        pass_gate::PassGate::enter(&self.pass_gate)
    }

    /// The key-index entry of exactly this row key.
    fn key_entry(&self, key: &[u8]) -> Result<Option<KeyEntry>> {
        self.runs.get(&self.gens, &self.unzstd, key)
    }

    pub fn meta_u64(&self, name: &str) -> Result<u64> {
        Ok(match self.db.get(keys::named_key(keys::META, name))? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| corrupt!("corrupt meta {name}"))?),
            None => 0,
        })
    }

    /// A small named value kept with the data (an outbox cursor, say), if set.
    pub fn meta_value<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        self.get_decoded(&keys::named_key(keys::META, name))
    }

    /// Sets a named value (see [`Store::meta_value`]); durable after the next flush.
    pub fn put_meta_value<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        self.db.insert(keys::named_key(keys::META, name), enc(value)?)?;
        Ok(())
    }

    pub fn get_decoded<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>> {
        self.db.get(key)?.map(|v| dec(&v)).transpose()
    }

    pub fn table_id(&self, name: &str) -> Option<u16> {
        self.tables.get(name).copied()
    }

    pub fn table_name(&self, id: u16) -> Option<&str> {
        self.table_names.get(&id).map(String::as_str)
    }

    /// The sequence the next batch that stores rows commits under.
    pub fn next_journal_seq(&self) -> u64 {
        self.next_journal
    }

    /// The newest batch sequence on disk: rows new since a cursor are those of the batches
    /// after it, up to this.
    pub fn head_seq(&self) -> u64 {
        self.head
    }

    pub fn source(&self, id: &[u8]) -> Result<Option<SourceState>> {
        self.get_decoded(&source_key(id))
    }

    pub fn sources(&self) -> Result<Vec<SourceState>> {
        self.db.scan_prefix([keys::SOURCE]).map(|kv| dec(&kv?.1)).collect()
    }

    pub fn rejects(&self, limit: usize) -> Result<Vec<RejectRecord>> {
        self.db.scan_prefix([keys::REJECT]).take(limit).map(|kv| dec(&kv?.1)).collect()
    }

    /// Starts a batch of writes that commits atomically.
    pub fn batch(&mut self) -> WriteBatch<'_> {
        let saved_counters = self.counters.clone();
        let saved_next_reject = self.next_reject;
        // Bounded: one big batch (a Kafka round, say) does not make every later one
        // allocate as much.
        let keys = self.last_batch_keys.min(1 << 16);
        WriteBatch {
            store: self,
            batch: sled::Batch::default(),
            blocks: BatchBlocks::default(),
            entries: Vec::with_capacity(keys),
            ahead_entries: Vec::new(),
            profile_entries: BTreeMap::new(),
            postings: index::Postings::default(),
            ahead_postings: index::Postings::default(),
            pending: HashMap::with_capacity_and_hasher(keys, FastHash::default()),
            profile_versions: Default::default(),
            counters_dirty: false,
            new_rows: 0,
            saved_counters,
            saved_next_reject,
            new_tables: Vec::new(),
            new_schemas: Vec::new(),
            committed: false,
        }
    }

    /// The row stored at `key` with this value, in form `R`, if it meets every condition
    /// of `filter`: the value decoded once, its strings borrowed until `R` is built.
    pub(super) fn row_if_passes<R: RowForm>(
        &self,
        key: &[u8],
        value: &[u8],
        filter: &[Condition],
    ) -> Result<Option<R>> {
        let view = codec::decode_view(value)?;
        let names = self.view_names(&view)?;
        if !self.view_passes(&view, names, filter) {
            return Ok(None);
        }
        let columns = names.iter().map(String::as_str).zip(view.cells.iter().map(codec::CellView::as_ref));
        Ok(Some(R::build(self.row_table(key)?, key, view.ingested_at, columns)))
    }

    /// The table of a row key.
    fn row_table(&self, key: &[u8]) -> Result<&str> {
        match keys::parse_key(key) {
            Some(KeyParts::Event { table, .. }) => Ok(self.table_name(table).unwrap_or("?")),
            Some(KeyParts::Profile { .. }) => Ok(lookout_plugin_sdk::tables::FILE_PROFILE),
            None => Err(corrupt!("not a row key")),
        }
    }

    /// Stored rows of `table` with exactly this SHA1 (and DeviceId) that meet every
    /// condition of `filter`.
    pub fn lookup_where<R: RowForm>(
        &self,
        table: &str,
        sha1: &str,
        device: Option<&str>,
        filter: &[Condition],
    ) -> Result<Vec<R>> {
        let lookup = [(sha1.to_string(), device.map(str::to_string))];
        Ok(self.lookup_many(table, &lookup, filter)?.pop().unwrap_or_default())
    }

    /// The rows at `keys` that meet every condition of `filter` (as
    /// [`Store::get_rows_where`]), each with only the named columns, in stored order: the
    /// others are neither decoded nor copied. Which cells those are is worked out once per
    /// schema, not per row.
    pub fn get_columns_where<R: RowForm>(
        &self,
        keys: &[Vec<u8>],
        filter: &[Condition],
        columns: &[String],
    ) -> Result<Vec<R>> {
        let (places, wanted) = self.places_of(keys)?;
        let mut picks: HashMap<u32, ColumnPick> = HashMap::new();
        let mut out: Vec<Option<R>> = places.iter().map(|_| None).collect();
        self.read_places(&places, |n, value| {
            let schema = codec::peek_schema(value)?;
            let pick = match picks.entry(schema) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let names = self
                        .schema_names
                        .get(&schema)
                        .ok_or_else(|| corrupt!("row refers to unknown schema {schema}"))?;
                    e.insert(ColumnPick::new(names.clone(), filter, columns))
                }
            };
            // The returned cells are copied as stored, not decoded and written again.
            let mut copied = Vec::with_capacity(pick.out.len());
            let (ingested_at, cells) = codec::decode_fetch(value, &pick.test, &pick.copy, &mut copied)?;
            if pick.passes(filter, &cells, ingested_at) {
                let columns = pick.out.iter().zip(&copied).map(|(&i, cell)| (pick.names[i].as_str(), *cell));
                out[n] = Some(R::build_encoded(self.row_table(wanted[n])?, wanted[n], ingested_at, columns)?);
            }
            Ok(())
        })?;
        Ok(out.into_iter().flatten().collect())
    }

    /// The column names of a decoded row's schema.
    fn view_names(&self, view: &codec::StoredRowView<'_>) -> Result<&Arc<Vec<String>>> {
        self.schema_names.get(&view.schema).ok_or_else(|| corrupt!("row refers to unknown schema {}", view.schema))
    }

    fn view_passes(&self, view: &codec::StoredRowView<'_>, names: &[String], filter: &[Condition]) -> bool {
        filter.iter().all(|c| {
            let cell = names.iter().position(|n| n == c.column()).and_then(|i| view.cells.get(i));
            c.matches_cell(cell.map(codec::CellView::as_ref), view.ingested_at)
        })
    }

    pub fn get_row<R: RowForm>(&self, key: &[u8]) -> Result<Option<R>> {
        Ok(self.with_value_at(key, |v| self.row_if_passes(key, v, &[]))?.flatten())
    }

    /// Stored rows of `table` with exactly this SHA1 (and DeviceId).
    pub fn lookup<R: RowForm>(&self, table: &str, sha1: &str, device: Option<&str>) -> Result<Vec<R>> {
        self.lookup_where(table, sha1, device, &[])
    }

    pub fn profile<R: RowForm>(&self, sha1: &str) -> Result<Option<R>> {
        self.get_row(&keys::profile_key(sha1))
    }

    /// The table name of a stored row's key, without decoding anything else.
    pub fn key_table(&self, key: &[u8]) -> Option<&str> {
        match *key.first()? {
            keys::EVENT => self.table_name(u16::from_be_bytes(key.get(1..3)?.try_into().ok()?)),
            keys::PROFILE => Some(lookout_plugin_sdk::tables::FILE_PROFILE),
            _ => None,
        }
    }

    /// A reference to a stored row for a detector (table, SHA1, device and key).
    pub fn row_ref(&self, key: &[u8]) -> Option<RowRef> {
        match keys::parse_key(key)? {
            KeyParts::Event { table, sha1, device, .. } => {
                Some(RowRef { table: self.table_name(table)?.to_string(), sha1, device_id: device, key: key.to_vec() })
            }
            KeyParts::Profile { sha1 } => Some(RowRef {
                table: lookout_plugin_sdk::tables::FILE_PROFILE.to_string(),
                sha1,
                device_id: String::new(),
                key: key.to_vec(),
            }),
        }
    }

    /// The keys of the rows of `table` stored by batches `from..=to`, in batch order,
    /// within retention; for FileProfile, the rows that are still the newest for their SHA1.
    /// Read from the blocks' key frames alone: the rows themselves are not decompressed.
    pub fn new_row_keys(&self, table: &str, from: u64, to: u64) -> Result<Vec<Vec<u8>>> {
        self.new_row_keys_where(table, from, to, None, |_, _| Ok(true))
    }

    /// Forgets where the rows handed to the last pass are (see `hints`).
    pub fn forget_row_hints(&self) {
        self.hints.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Remembers where an event row is, unless that many are remembered already (a pass
    /// over millions of rows does without).
    fn hint(&self, key: &[u8], seq: u64, block: u16, row: u16) {
        let mut hints = self.hints.lock().unwrap_or_else(|p| p.into_inner());
        if hints.len() < MAX_ROW_HINTS {
            hints.insert(key.to_vec(), (seq, block, row));
        }
    }

    /// Whether the row at a position [`Store::new_row_keys_where`] showed meets every
    /// condition (read there, not through the key index).
    pub fn row_at_position_passes(&self, at: RowAt, filter: &mut RowFilter<'_>) -> Result<bool> {
        let entry = KeyEntry { seq: at.seq, block: at.block, row: at.row, content: 0 };
        self.with_value((at.table, entry), |v| filter.passes(self, v))
    }

    /// [`Store::new_row_keys`], of the rows whose key `keep` accepts (checked on the key
    /// borrowed from the frame, with where the row lies: only kept keys are copied, and
    /// remembered for the detector's fetch).
    ///
    /// With `sha1_in`, a block whose SHA1 filter holds no value of one of its sets is
    /// skipped unread: `keep` must then accept only rows whose SHA1 is in every set.
    pub fn new_row_keys_where(
        &self,
        table: &str,
        from: u64,
        to: u64,
        sha1_in: Option<&block_filter::Sha1Probe>,
        mut keep: impl FnMut(&[u8], RowAt) -> Result<bool>,
    ) -> Result<Vec<Vec<u8>>> {
        let Some(tid) = self.block_table(table) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        let start = keys::block_key(keys::BLOCK_META, tid, from, 0, 0);
        let end = keys::block_key(keys::BLOCK_META, tid, to.saturating_add(1), 0, 0);
        for kv in self.db.range(start..end) {
            let (k, v) = kv?;
            let Some((_, seq, block)) = keys::block_of(&k) else { continue };
            if let Some(probe) = sha1_in {
                if let (_, Some(filter)) = blocks::decode_meta(&v)? {
                    if !probe.may_match(&filter) {
                        continue;
                    }
                }
            }
            let raw = self.block_frame(keys::BLOCK_KEYS, tid, seq, block, Some(&v))?;
            for (row, (key, _)) in blocks::frame_keys(&raw)?.into_iter().enumerate() {
                if !self.visible(key) {
                    continue;
                }
                // The row is in this block: `keep` (and then the detector) reads it from
                // here, not through the key index.
                let Ok(row_no) = u16::try_from(row) else { continue };
                if !keep(key, RowAt { table: tid, seq, block, row: row_no })? {
                    continue;
                }
                if tid != PROFILE_TABLE {
                    self.hint(key, seq, block, row_no);
                }
                if tid == PROFILE_TABLE {
                    // A profile replaced by a later batch comes with that batch.
                    let current = self.key_entry(key)?;
                    if current.is_none_or(|e| (e.seq, e.block, e.row as usize) != (seq, block, row)) {
                        continue;
                    }
                }
                out.push(key.to_vec());
            }
        }
        Ok(out)
    }

    /// Keys of every stored row of the given tables (a backfill).
    pub fn all_row_keys(&self, tables: &[String]) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for prefix in tables.iter().filter_map(|t| self.rows_prefix(t)) {
            for (k, _) in self.runs.scan_prefix(&self.gens, &self.unzstd, &prefix, false)? {
                if self.visible(&k) {
                    out.push(k);
                }
            }
        }
        Ok(out)
    }

    /// The key prefix of every stored row of `table` (`None` for a table never seen).
    fn rows_prefix(&self, table: &str) -> Option<Vec<u8>> {
        if table == lookout_plugin_sdk::tables::FILE_PROFILE {
            Some(vec![keys::PROFILE])
        } else {
            self.table_id(table).map(keys::table_prefix)
        }
    }

    /// Makes every detector whose cursor is below `upto` backfill on its next pass (the
    /// rows of batches up to `upto` can no longer be told apart as new: a rebuilt index).
    pub fn force_backfill_below(&mut self, upto: u64) -> Result<()> {
        if upto <= self.meta_u64("jfloor")? {
            return Ok(());
        }
        self.db.insert(keys::named_key(keys::META, "jfloor"), &upto.to_be_bytes()[..])?;
        Ok(())
    }

    /// Every stored row of block table `tid` (key and value) within retention, in batch
    /// order, handed to `f` block by block.
    pub(crate) fn for_each_row(
        &self,
        tid: u16,
        mut f: impl FnMut((u64, u16, u16), &[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        for kv in self.db.scan_prefix(keys::block_table_prefix(keys::BLOCK_META, tid)) {
            let (k, v) = kv?;
            let Some((_, seq, block)) = keys::block_of(&k) else { continue };
            let keys_raw = self.block_frame(keys::BLOCK_KEYS, tid, seq, block, Some(&v))?;
            let rows_raw = self.block_frame(keys::BLOCK_ROWS, tid, seq, block, Some(&v))?;
            let keys_frame = blocks::frame_keys(&keys_raw)?;
            let rows = blocks::unpack_items(&rows_raw)?;
            if keys_frame.len() != rows.len() {
                return Err(corrupt!(
                    "block {tid}/{seq}/{block} has {} keys for {} rows",
                    keys_frame.len(),
                    rows.len()
                ));
            }
            for (row, ((key, _), value)) in keys_frame.into_iter().zip(rows).enumerate() {
                if !self.visible(key) {
                    continue;
                }
                // A FileProfile key may have moved on (replaced since); event keys never do.
                let current = if tid == PROFILE_TABLE { self.key_entry(key)? } else { None };
                if tid != PROFILE_TABLE
                    || current.is_some_and(|e| (e.seq, e.block, e.row as usize) == (seq, block, row))
                {
                    let row =
                        u16::try_from(row).map_err(|_| corrupt!("block {tid}/{seq}/{block} has over 65,535 rows"))?;
                    f((seq, block, row), key, value)?;
                }
            }
        }
        Ok(())
    }

    /// Keys of every stored row of `table` that meets every condition of `filter`, by
    /// reading each row (the path when no condition is on an indexed column).
    pub fn scan_where(&self, table: &str, filter: &[Condition]) -> Result<Vec<Vec<u8>>> {
        let Some(tid) = self.block_table(table) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        let mut filter = RowFilter::new(filter);
        self.for_each_row(tid, |_, k, v| {
            if filter.passes(self, v)? {
                out.push(k.to_vec());
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Live bytes (keys + values) per part of the store, largest first: what the database
    /// files hold besides sled's own overhead and not yet reclaimed space, and the
    /// generations' block files. Reads every key.
    pub fn space_by_part(&self) -> Result<Vec<(&'static str, u64, u64)>> {
        let mut by: BTreeMap<u8, (u64, u64)> = BTreeMap::new();
        for db in self.gens.all_dbs() {
            for kv in db.iter() {
                let (k, v) = kv?;
                let e = by.entry(k.first().copied().unwrap_or(0)).or_default();
                e.0 += 1;
                e.1 += (k.len() + v.len()) as u64;
            }
        }
        let mut out: Vec<(&'static str, u64, u64)> =
            by.into_iter().map(|(space, (items, bytes))| (keys::space_name(space), items, bytes)).collect();
        // The event blocks' frames are not sled items but in the generations' block files;
        // their blocks and bytes are counted from the directory: a file also holds the
        // frames of blocks already expired (until its generation goes) and of batches that
        // failed, which are not live.
        let (mut in_files, mut file_bytes) = (0u64, 0u64);
        for found in self.event_blocks() {
            let (_, _, _, meta) = found?;
            if let Some(span) = meta.file {
                in_files += 1;
                file_bytes += u64::from(span.keys_len) + u64::from(span.rows_len);
            }
        }
        out.push(("row blocks (generation block files)", in_files, file_bytes));
        out.sort_by_key(|p| std::cmp::Reverse(p.2));
        Ok(out)
    }

    /// Bytes of the main database's and every generation's files.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0) + self.gens.size_on_disk()
    }

    /// How many generation databases the store has (see [`generations`]).
    pub fn generation_count(&self) -> usize {
        self.gens.count()
    }

    /// The table's id, registering it (in `batch`) if new; the bool says it was new.
    fn ensure_table(&mut self, name: &str, batch: &mut sled::Batch) -> Result<(u16, bool)> {
        if let Some(id) = self.tables.get(name) {
            return Ok((*id, false));
        }
        let next = self.table_names.keys().max().map_or(FIRST_TABLE_ID, |m| m + 1);
        if next == u16::MAX {
            return Err(StoreError::Invalid("too many distinct tables (65,534)".into()));
        }
        batch.insert(keys::named_key(keys::TABLE, name), &next.to_be_bytes()[..]);
        self.tables.insert(name.to_string(), next);
        self.table_names.insert(next, name.to_string());
        Ok((next, true))
    }

    /// The schema's id, registering it (in `batch`) if new; then its names come back too.
    fn ensure_schema(
        &mut self,
        names: &Arc<Vec<String>>,
        batch: &mut sled::Batch,
    ) -> Result<(u32, Option<Vec<String>>)> {
        if let Some((last, id)) = &self.last_schema {
            // Rows of one file share their names' allocation (`normalise`): no comparison.
            if Arc::ptr_eq(last, names) || **last == **names {
                let id = *id;
                self.last_schema = Some((names.clone(), id));
                return Ok((id, None));
            }
        }
        if let Some(id) = self.schemas.get(names.as_slice()) {
            self.last_schema = Some((names.clone(), *id));
            return Ok((*id, None));
        }
        let id = self.schema_names.keys().max().map_or(1, |m| m + 1);
        let names: Vec<String> = names.to_vec();
        batch.insert(seq_key32(keys::SCHEMA, id), enc(&names)?);
        let shared = Arc::new(names.clone());
        self.schema_names.insert(id, shared.clone());
        self.schemas.insert(names.clone(), id);
        self.last_schema = Some((shared, id));
        Ok((id, Some(names)))
    }
}

/// The schema of the last row stored: the names' allocation the row came with, and the id.
type LastSchema = (Arc<Vec<String>>, u32);

fn seq_key32(space: u8, id: u32) -> Vec<u8> {
    let mut k = vec![space];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn source_key(id: &[u8]) -> Vec<u8> {
    let mut k = vec![keys::SOURCE];
    k.extend_from_slice(id);
    k
}

/// Totals read through a [`StoreReader`].
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub counters: Counters,
    pub sources: Vec<SourceState>,
    pub findings: u64,
    pub bytes_on_disk: u64,
    pub horizon: Option<i64>,
    /// Key-index runs (a merge turns eight of a size into one).
    pub key_index_runs: u64,
    /// Generations (folders under `gens/`) listed.
    pub generations: u64,
    /// The column indexes kept (those the detectors loaded so far declared).
    pub indexes: Vec<lookout_plugin_sdk::IndexDecl>,
}

/// Reads the store's totals from another thread while the `Store` (which only the writer
/// holds) is busy: counters, sources, findings, size, horizon — what was last committed.
#[derive(Clone)]
pub struct StoreReader {
    db: sled::Db,
    /// The data directory (the generations' files are counted from it).
    dir: PathBuf,
}

impl StoreReader {
    /// The first `limit` rejected records kept (as [`Store::rejects`]).
    pub fn rejects(&self, limit: usize) -> Result<Vec<RejectRecord>> {
        self.db.scan_prefix([keys::REJECT]).take(limit).map(|kv| dec(&kv?.1)).collect()
    }

    pub fn counters(&self) -> Result<Counters> {
        Ok(match self.db.get([keys::COUNTERS])? {
            Some(v) => dec(&v)?,
            None => Counters::default(),
        })
    }

    pub fn summary(&self) -> Result<Summary> {
        Ok(Summary {
            counters: self.counters()?,
            sources: self.db.scan_prefix([keys::SOURCE]).map(|kv| dec(&kv?.1)).collect::<Result<_>>()?,
            findings: self.db.scan_prefix([keys::FINDING]).count() as u64,
            bytes_on_disk: self.db.size_on_disk().unwrap_or(0) + generations::bytes_under(&self.dir),
            horizon: self
                .db
                .get(keys::named_key(keys::META, "horizon"))?
                .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes)),
            key_index_runs: runs::stored_runs(&self.db)?,
            generations: generations::listed(&self.db)?,
            indexes: Store::stored_indexes(&self.db)?,
        })
    }
}

/// What adding a row did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    New,
    /// A FileProfile row that replaced the stored one for its SHA1 (newest wins).
    Replaced,
    Duplicate,
    /// An event row older than the retention horizon: counted, not stored.
    Expired,
}

/// Writes that commit together: rows (blocks), their key-index run and column-index
/// entries, source offsets, rejects,
/// counters, findings, cursors. A batch dropped without a successful commit undoes what
/// it changed in the store's memory (counters, new tables and schemas), so memory never
/// runs ahead of the disk.
pub struct WriteBatch<'s> {
    store: &'s mut Store,
    batch: sled::Batch,
    /// The rows themselves, in blocks per table.
    blocks: BatchBlocks,
    /// The key-index entries of the new event rows (written as one sorted run).
    entries: Vec<runs::Entry>,
    /// Those of new event rows from ahead of the clock (their own run, in the main
    /// database; see [`blocks::AHEAD_BLOCK`]).
    ahead_entries: Vec<runs::Entry>,
    /// Those of new or replacing FileProfile rows (their own run).
    profile_entries: BTreeMap<Vec<u8>, KeyEntry>,
    /// Index postings of the new rows, written as one entry per value on commit into the
    /// batch's generation (they go with it when its rows expire)…
    postings: index::Postings,
    /// …and those of rows from ahead of the clock, into the main database (with their
    /// blocks; retention removes them entry by entry).
    ahead_postings: index::Postings,
    /// Content hash of every key this batch stores.
    pending: HashMap<Vec<u8>, u64, FastHash>,
    /// The FileProfile versions this batch stores (see [`keys::profile_version_key`]).
    profile_versions: std::collections::HashSet<Vec<u8>, FastHash>,
    counters_dirty: bool,
    new_rows: usize,
    saved_counters: Counters,
    saved_next_reject: u64,
    new_tables: Vec<String>,
    new_schemas: Vec<Vec<String>>,
    committed: bool,
}

impl Drop for Store {
    /// A merge under way is finished, not abandoned: its thread holds the database open.
    fn drop(&mut self) {
        self.finish_merge();
    }
}

impl Drop for WriteBatch<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        self.store.counters = std::mem::take(&mut self.saved_counters);
        self.store.next_reject = self.saved_next_reject;
        for t in &self.new_tables {
            if let Some(id) = self.store.tables.remove(t) {
                self.store.table_names.remove(&id);
                // The id goes to the next new table: its rows are not this one's sample.
                self.store.rows_zstd.forget(id);
                self.store.rows_unzstd.lock().unwrap_or_else(|p| p.into_inner()).forget(id);
            }
        }
        for names in &self.new_schemas {
            if let Some(id) = self.store.schemas.remove(names) {
                self.store.schema_names.remove(&id);
            }
        }
        if !self.new_schemas.is_empty() {
            self.store.last_schema = None;
        }
    }
}

impl WriteBatch<'_> {
    pub fn store(&self) -> &Store {
        self.store
    }

    /// A batch that failed to commit after writing to its generation: what it wrote there
    /// goes (best effort), and its sequence is never used again, so no later batch can
    /// find pieces of its own blocks left over.
    fn forget_uncommitted(&mut self) {
        if let Err(e) = self.store.gens.sweep_uncommitted(self.store.next_journal) {
            tracing::warn!(error = %crate::error::Chain(&e), "cannot remove what a failed batch wrote");
        }
        self.store.next_journal += 1;
    }

    /// Adds a row unless the same row is already stored or pending in this batch. A row
    /// is the same when its key and its content (every column but the ingestion time)
    /// are; a different row under the same key is stored under the key's variant.
    pub fn add_row(&mut self, row: &NormalRow, ingested_at: i64) -> Result<Added> {
        let (block_table, key) = match row.kind {
            TableKind::Event => {
                if self.store.horizon.is_some_and(|h| row.timestamp < h) {
                    // Older than retention keeps: it would be invisible and removed at once.
                    self.store.counters.expired += 1;
                    self.counters_dirty = true;
                    return Ok(Added::Expired);
                }
                let (tid, new) = self.store.ensure_table(&row.table, &mut self.batch)?;
                if new {
                    self.new_tables.push(row.table.clone());
                }
                (tid, keys::event_key(tid, &row.sha1, &row.device_id, row.timestamp, &row.identity))
            }
            TableKind::Profile => (PROFILE_TABLE, keys::profile_key(&row.sha1)),
        };
        let content = row.cells.content;
        let (key, previous) = match row.kind {
            TableKind::Profile => {
                let previous = match self.pending.get(&key) {
                    Some(c) => Some(*c),
                    None => {
                        let stored = self.store.key_entry(&key)?.map(|e| e.content);
                        // The current version of a store written before versions were
                        // recorded is known from its entry: recorded now.
                        if let Some(current) = stored {
                            self.record_profile_version(&row.sha1, current)?;
                        }
                        stored
                    }
                };
                if previous == Some(content) {
                    return Ok(self.duplicate());
                }
                // A version stored before (an older one, read again from another file or
                // a replay of the feed) is not news: put back as current, it would undo
                // the newer one detectors read.
                if !self.record_profile_version(&row.sha1, content)? {
                    return Ok(self.duplicate());
                }
                (key, previous)
            }
            TableKind::Event => match self.stored_content(&key)? {
                None => (key, None),
                Some(c) if c == content => return Ok(self.duplicate()),
                Some(_) => {
                    // Same (table, SHA1, DeviceId, Timestamp, ReportId), other content.
                    let variant = keys::variant_key(&key, content);
                    if self.stored_content(&variant)?.is_some() {
                        return Ok(self.duplicate());
                    }
                    (variant, None)
                }
            },
        };
        let postings = if row.kind == TableKind::Event && self.store.index_specs.iter().any(|s| s.table == row.table) {
            let store = &mut *self.store;
            store.posting_layouts.postings(&store.index_specs, block_table, &row.table, &row.names, &row.cells)?
        } else {
            Vec::new()
        };
        let (schema, new) = self.store.ensure_schema(&row.names, &mut self.batch)?;
        if let Some(names) = new {
            self.new_schemas.push(names);
        }
        let (header, header_len) = codec::value_header(schema, ingested_at);
        let added = if previous.is_some() { Added::Replaced } else { Added::New };
        // The row goes into this batch's blocks, under the sequence the batch commits with.
        let ahead = row.kind == TableKind::Event
            && generations::Generations::ahead_limit(self.store.now, self.store.retention)
                .is_some_and(|limit| row.timestamp > limit);
        let value = [&header[..header_len], row.cells.body()];
        let (block, row_no) = self.blocks.add(block_table, &key, content, row.timestamp, &value, ahead)?;
        let entry = KeyEntry { seq: self.store.next_journal, block, row: row_no, content };
        if added == Added::New {
            match self.store.counters.rows.get_mut(&row.table) {
                Some(n) => *n += 1,
                None => {
                    self.store.counters.rows.insert(row.table.clone(), 1);
                }
            }
            self.counters_dirty = true;
            // With the row's block: in its generation, or in the main database for a row
            // from ahead of the clock.
            let postings_of = if ahead { &mut self.ahead_postings } else { &mut self.postings };
            for (prefix, covered) in postings {
                postings_of.add(prefix, key.clone(), (entry.seq, block, row_no), covered);
            }
        }
        if row.kind == TableKind::Profile {
            // Newest wins, within the batch too.
            self.profile_entries.insert(key.clone(), entry);
        } else if ahead {
            self.ahead_entries.push((key.clone(), entry));
        } else {
            self.entries.push((key.clone(), entry));
        }
        self.pending.insert(key, content);
        self.new_rows += 1;
        Ok(added)
    }

    /// Records that this FileProfile version of `sha1` is stored; false if it was already.
    fn record_profile_version(&mut self, sha1: &str, content: u64) -> Result<bool> {
        let version = keys::profile_version_key(sha1, content);
        if self.profile_versions.contains(&version) || self.store.db.contains_key(&version)? {
            return Ok(false);
        }
        self.batch.insert(version.clone(), &[][..]);
        self.profile_versions.insert(version);
        Ok(true)
    }

    fn duplicate(&mut self) -> Added {
        self.store.counters.duplicates += 1;
        self.counters_dirty = true;
        Added::Duplicate
    }

    /// The content hash of the event row stored (or pending in this batch) at `key`. A key
    /// the filter has never seen is certainly not stored: no read.
    fn stored_content(&mut self, key: &[u8]) -> Result<Option<u64>> {
        if let Some(c) = self.pending.get(key) {
            return Ok(Some(*c));
        }
        self.store.ensure_key_filter()?;
        if self.store.key_filter.as_ref().is_some_and(|f| !f.may_contain(key)) {
            return Ok(None);
        }
        Ok(self.store.key_entry(key)?.map(|e| e.content))
    }

    pub fn add_reject(&mut self, mut reject: RejectRecord) -> Result<()> {
        reject.excerpt.truncate(reject.excerpt.floor_char_boundary_compat(256));
        *self.store.counters.rejected.entry(reject.kind.clone()).or_insert(0) += 1;
        self.counters_dirty = true;
        let seq = self.store.next_reject;
        self.store.next_reject += 1;
        self.batch.insert(keys::seq_key(keys::REJECT, seq), enc(&reject)?);
        Ok(())
    }

    /// Forgets a source (a deleted file read to its end).
    pub fn remove_source(&mut self, id: &[u8]) {
        self.batch.remove(source_key(id));
    }

    pub fn set_source(&mut self, id: &[u8], state: &SourceState) -> Result<()> {
        self.batch.insert(source_key(id), enc(state)?);
        Ok(())
    }

    /// Sets a named value (see [`Store::meta_value`]) with the rest of the batch: a
    /// stream's next offset committed with the rows read up to it.
    pub fn set_meta_value<T: Serialize>(&mut self, name: &str, value: &T) -> Result<()> {
        self.batch.insert(keys::named_key(keys::META, name), enc(value)?);
        Ok(())
    }

    pub fn new_rows(&self) -> usize {
        self.new_rows
    }

    /// Applies everything atomically. Returns the batch sequence used, if any row was new.
    pub fn commit(mut self) -> Result<Option<u64>> {
        self.store.last_batch_keys = self.pending.len();
        let mut seq = None;
        let mut pending_runs = Vec::new();
        let mut new_block_end = None;
        let mut fresh_blocks = Vec::new();
        // What goes to a generation (the event rows' block frames to its file, their run
        // chunks and column-index entries to its database), and the run chunks of FileProfile
        // and of rows from ahead of the clock (main database): all written, and the
        // generation made durable, before the batch that makes them visible.
        let mut generation = None;
        let mut wrote_list = false;
        let mut pieces = sled::Batch::default();
        let mut main_chunks = sled::Batch::default();
        // The batch's event blocks' frames, for its generation's block file.
        let mut block_frames: Option<(u32, blocks::FileAppend)> = None;
        if !self.pending.is_empty() {
            let s = self.store.next_journal;
            let mut entries = std::mem::take(&mut self.entries);
            let g = if entries.is_empty() {
                0
            } else {
                let store = &mut *self.store;
                let (g, listed) = store.gens.for_batch(s, store.now, store.retention, &mut self.batch)?;
                generation = Some(g);
                wrote_list = listed;
                g
            };
            let base = if g == 0 { 0 } else { self.store.gens.blocks_len(g)? };
            let mut file = blocks::FileAppend { base, frames: std::mem::take(&mut self.store.spare_frames) };
            file.frames.clear();
            let store = &mut *self.store;
            let written = std::mem::take(&mut self.blocks).write(
                s,
                &mut store.block_zstd,
                &mut store.rows_zstd,
                &mut file,
                &mut self.batch,
            )?;
            (new_block_end, fresh_blocks) = (written.earliest_end, written.raw_rows);
            // Readers may meet a page compressed with it only once the batch commits;
            // until then nothing refers to it.
            for d in written.dictionaries {
                store.rows_unzstd.lock().unwrap_or_else(|p| p.into_inner()).add(d.table, d.id, &d.bytes)?;
            }
            if !file.frames.is_empty() {
                self.batch.insert(generations::blocks_end_key(g), &file.end().to_be_bytes()[..]);
                block_frames = Some((g, file));
            }
            runs::sort_entries(&mut entries);
            let mut ahead = std::mem::take(&mut self.ahead_entries);
            runs::sort_entries(&mut ahead);
            let profiles: Vec<runs::Entry> = std::mem::take(&mut self.profile_entries).into_iter().collect();
            // One run each: the batch's event rows (chunks in its generation), its rows from
            // ahead of the clock and its FileProfile rows (chunks in the main database).
            for (kind, run_generation, list) in [
                (runs::RunKind::Events, g, entries),
                (runs::RunKind::Events, 0, ahead),
                (runs::RunKind::Profiles, 0, profiles),
            ] {
                if list.is_empty() {
                    continue;
                }
                let chunks = if run_generation == 0 { &mut main_chunks } else { &mut pieces };
                let store = &mut *self.store;
                // The batch's own event run (in its generation) is held in memory, made
                // again from its blocks' key frames on open (see `runs`).
                let hold = (kind == runs::RunKind::Events && run_generation != 0).then_some(s);
                let (_, run) =
                    store.runs.write(kind, run_generation, list, hold, &mut store.zstd, chunks, &mut self.batch)?;
                pending_runs.push(run);
            }
            // Postings are only made for event rows, so a batch with any has a generation
            // unless all its rows came from ahead of the clock.
            let postings_to = if generation.is_some() { &mut pieces } else { &mut self.batch };
            std::mem::take(&mut self.postings).write(s, &mut self.store.zstd, postings_to)?;
            std::mem::take(&mut self.ahead_postings).write(s, &mut self.store.zstd, &mut self.batch)?;
            self.batch.insert(keys::named_key(keys::META, "seq"), &s.to_be_bytes()[..]);
            self.batch.insert(keys::named_key(keys::META, "format"), &FORMAT_VERSION.to_be_bytes()[..]);
            seq = Some(s);
        }
        if self.counters_dirty {
            self.batch.insert(vec![keys::COUNTERS], enc(&self.store.counters)?);
        }
        let batch = std::mem::take(&mut self.batch);
        if let Some((g, file)) = &block_frames {
            if let Err(e) = self.store.gens.append_blocks(*g, file.base, &file.frames) {
                self.forget_uncommitted();
                return Err(e);
            }
            crate::failpoint::hit("blocks-appended-before-commit");
        }
        if let Some(g) = generation {
            let applied = self.store.gens.db(g)?.apply_batch(pieces).context("cannot write rows to their generation");
            let flushed = applied.and_then(|()| self.store.gens.flush(g));
            if let Err(e) = flushed {
                self.forget_uncommitted();
                return Err(e);
            }
        }
        if let Err(e) = self.store.db.apply_batch(main_chunks) {
            self.forget_uncommitted();
            return Err(e).context("cannot write the key index of FileProfile and of rows from ahead of the clock");
        }
        if generation.is_some() {
            crate::failpoint::hit("generation-written-before-commit");
        }
        #[cfg(test)]
        if std::mem::take(&mut self.store.fail_next_main_commit) {
            self.forget_uncommitted();
            return Err(StoreError::Invalid("a commit made to fail (test)".into()));
        }
        if let Err(e) = self.store.db.apply_batch(batch) {
            self.forget_uncommitted();
            return Err(e).context("cannot commit a batch to the database");
        }
        self.committed = true;
        if seq.is_some() {
            self.store.rows_zstd.committed();
        }
        if let Some((g, file)) = block_frames {
            self.store.gens.blocks_committed(g, file.end());
            self.store.spare_frames = file.frames;
        }
        if !fresh_blocks.is_empty() {
            let mut cache = self.store.cache.lock().unwrap_or_else(|p| p.into_inner());
            for (id, rows) in fresh_blocks {
                cache.put(id, 0, Arc::new(rows));
            }
        }
        if wrote_list {
            self.store.gens.committed();
        }
        for run in pending_runs {
            self.store.runs.committed(run);
        }
        if let (Some(known), Some(new)) = (&mut self.store.earliest_block_end, new_block_end) {
            *known = (*known).min(new);
        }
        if let Some(f) = &mut self.store.key_filter {
            for k in self.pending.keys().filter(|k| k.first() == Some(&keys::EVENT)) {
                f.insert(k);
            }
        }
        if let Some(s) = seq {
            self.store.head = s;
            self.store.next_journal += 1;
            self.store.maintain_runs();
        }
        Ok(seq)
    }
}

trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorCharBoundary for String {
    fn floor_char_boundary_compat(&self, i: usize) -> usize {
        if i >= self.len() {
            return self.len();
        }
        (0..=i).rev().find(|&j| self.is_char_boundary(j)).unwrap_or(0)
    }
}

/// Tests: the column index the WinRM detector declares (InitiatingProcessFileName,
/// covering FolderPath), on `table`.
#[cfg(test)]
pub(crate) fn process_index(table: &str) -> lookout_plugin_sdk::IndexDecl {
    lookout_plugin_sdk::IndexDecl {
        table: table.into(),
        columns: vec!["InitiatingProcessFileName".into()],
        covers: vec!["FolderPath".into()],
    }
}

/// Conditions checked on stored rows, reading only the cells they test: which those are
/// is worked out once per schema (the others are stepped over, their strings not checked
/// as UTF-8). Choosing a pass's rows by a condition on two columns of rows of 80-odd
/// decoded every cell before, a quarter of the choosing.
pub struct RowFilter<'f> {
    filter: &'f [Condition],
    schemas: HashMap<u32, ColumnPick>,
}

impl<'f> RowFilter<'f> {
    pub fn new(filter: &'f [Condition]) -> RowFilter<'f> {
        RowFilter { filter, schemas: HashMap::new() }
    }

    /// Whether the stored row value meets every condition.
    fn passes(&mut self, store: &Store, value: &[u8]) -> Result<bool> {
        if self.filter.is_empty() {
            return Ok(true);
        }
        let schema = codec::peek_schema(value)?;
        let pick = match self.schemas.entry(schema) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let names =
                    store.schema_names.get(&schema).ok_or_else(|| corrupt!("row refers to unknown schema {schema}"))?;
                e.insert(ColumnPick::new(names.clone(), self.filter, &[]))
            }
        };
        let view = codec::decode_picked(value, &pick.test)?;
        Ok(pick.passes(self.filter, &view.cells, view.ingested_at))
    }
}

/// Which cells of one schema's rows a [`Store::get_columns_where`] call reads: the
/// columns it returns (`out`, in stored order) and those its conditions test.
struct ColumnPick {
    names: Arc<Vec<String>>,
    /// Cells to decode (a condition reads them), by position.
    test: Vec<bool>,
    /// Cells to copy as stored (the columns returned), by position.
    copy: Vec<bool>,
    /// The positions of the columns returned, in stored order.
    out: Vec<usize>,
    /// Each condition's column position (`None`: the schema has no such column).
    conditions: Vec<Option<usize>>,
}

impl ColumnPick {
    fn new(names: Arc<Vec<String>>, filter: &[Condition], columns: &[String]) -> Self {
        let out: Vec<usize> = (0..names.len()).filter(|&i| columns.iter().any(|c| *c == names[i])).collect();
        let conditions: Vec<Option<usize>> =
            filter.iter().map(|c| names.iter().position(|n| n == c.column())).collect();
        let mut test = vec![false; names.len()];
        for &i in conditions.iter().flatten() {
            test[i] = true;
        }
        let mut copy = vec![false; names.len()];
        for &i in &out {
            copy[i] = true;
        }
        ColumnPick { names, test, copy, out, conditions }
    }

    /// Whether a row's `cells` decoded with [`ColumnPick::test`] meet every condition of
    /// `filter` (the one this pick was made for).
    fn passes(&self, filter: &[Condition], cells: &[codec::CellView<'_>], ingested_at: i64) -> bool {
        filter
            .iter()
            .zip(&self.conditions)
            .all(|(c, at)| c.matches_cell(at.and_then(|i| cells.get(i)).map(codec::CellView::as_ref), ingested_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::normalise::{normalise, TableHints};
    use lookout_plugin_sdk::tables::IMAGE_LOADS;
    use lookout_plugin_sdk::wire::RowBytes;
    use lookout_plugin_sdk::Cell;
    use lookout_plugin_sdk::Row;
    use std::collections::HashSet;

    fn row(report: i64, extra: &str) -> NormalRow {
        let text =
            format!(r#"{{"Timestamp":"2025-05-07T16:55:49Z","DeviceId":"d","SHA1":"s","ReportId":{report}{extra}}}"#);
        let serde_json::Value::Object(obj) = serde_json::from_str(&text).unwrap() else { unreachable!() };
        normalise(obj, Some("DeviceFileEvents"), &TableHints::default()).unwrap()
    }

    fn load(report: i64, process: &str) -> NormalRow {
        let text = format!(
            r#"{{"Timestamp":"2025-05-07T16:55:49Z","DeviceId":"d","SHA1":"s{report}","ReportId":{report},"InitiatingProcessFileName":"{process}","FolderPath":"C:\\dir{}\\x.dll","AccountName":"a{}"}}"#,
            report % 3,
            report % 2
        );
        let serde_json::Value::Object(obj) = serde_json::from_str(&text).unwrap() else { unreachable!() };
        normalise(obj, Some("DeviceImageLoadEvents"), &TableHints::default()).unwrap()
    }

    fn winrm_index() -> lookout_plugin_sdk::IndexDecl {
        process_index(IMAGE_LOADS)
    }

    fn in_process(p: &str) -> Vec<Condition> {
        vec![Condition::In { column: "InitiatingProcessFileName".into(), any_of: vec![p.to_string()] }]
    }

    /// A store with the WinRM detector's index declared.
    fn indexed_store(dir: &Path) -> Store {
        let mut store = Store::open(dir).unwrap();
        store.declare_indexes(&[winrm_index()]).unwrap();
        store
    }

    fn commit(store: &mut Store, rows: Vec<NormalRow>) -> u64 {
        let mut b = store.batch();
        for r in rows {
            b.add_row(&r, 0).unwrap();
        }
        b.commit().unwrap().expect("a new row")
    }

    fn lookup(store: &Store, value: &str, seqs: Option<(u64, u64)>) -> Vec<String> {
        let filter = [Condition::In { column: "InitiatingProcessFileName".into(), any_of: vec![value.to_string()] }];
        lookup_filtered(store, &filter, seqs)
    }

    fn lookup_filtered(store: &Store, filter: &[Condition], seqs: Option<(u64, u64)>) -> Vec<String> {
        let keys = store.index_lookup(IMAGE_LOADS, filter, seqs).unwrap();
        let mut sha1s: Vec<String> = keys
            .expect("indexed")
            .iter()
            .map(|k| match keys::parse_key(k) {
                Some(KeyParts::Event { sha1, .. }) => sha1,
                other => panic!("not an event key: {other:?}"),
            })
            .collect();
        sha1s.sort();
        sha1s
    }

    /// A batch that fails after writing to its generation gives up its sequence in this
    /// process, but the store's head stays the newest sequence on disk: detectors' cursors
    /// and the saved key filter must not name a sequence that a later process, reopening
    /// at that head, uses again for other rows.
    #[test]
    fn a_failed_batch_moves_neither_the_head_nor_the_key_filter_s_tag() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let s1 = commit(&mut store, vec![row(1, "")]);
        store.fail_next_main_commit = true;
        let mut b = store.batch();
        b.add_row(&row(2, ""), 0).unwrap();
        assert!(b.commit().is_err());
        assert_eq!(store.head_seq(), s1, "the failed batch's sequence is not the head");
        assert_eq!(store.next_journal_seq(), s1 + 2, "nor used again in this process");
        store.flush_and_save_key_filter().unwrap();
        assert!(
            key_filter::KeyFilter::load(&store.key_filter_path(), s1, 1).is_some(),
            "the key filter is saved against what is on disk"
        );
        drop(store);
        // Reopened, the next batch takes the failed one's sequence, with other rows: a
        // cursor at the head sees them.
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.head_seq(), s1);
        let s2 = commit(&mut store, vec![row(3, "")]);
        assert_eq!(s2, s1 + 1);
        assert_eq!(store.head_seq(), s2);
    }

    /// A table's dictionary first used by a batch that failed is carried by the batches
    /// after it that use it, not by one of another table, so every row reads back after a
    /// reopen.
    #[test]
    fn a_dictionary_trained_in_a_failed_batch_is_stored_by_the_next_batch_that_uses_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let loads = |from: i64, n: i64| (from..from + n).map(|i| load(i, "wsmprovhost.exe")).collect::<Vec<_>>();
        let dictionaries = |store: &Store| store.db.scan_prefix([keys::DICTIONARY]).count();
        // The table is known before the failed batch (a table first seen in a failed
        // batch is forgotten with it, dictionary and all).
        commit(&mut store, loads(10_000, 10));
        store.fail_next_main_commit = true;
        let mut b = store.batch();
        for r in loads(0, 4000) {
            b.add_row(&r, 0).unwrap();
        }
        assert!(b.commit().is_err());
        store.rows_zstd.wait_for_training();
        // The next batch of the table takes the dictionary; it fails too.
        store.fail_next_main_commit = true;
        let mut b = store.batch();
        b.add_row(&load(20_000, "wsmprovhost.exe"), 0).unwrap();
        assert!(b.commit().is_err());
        commit(&mut store, vec![row(1, "")]);
        assert_eq!(dictionaries(&store), 0, "not carried by a batch of another table");
        let s = commit(&mut store, loads(5000, 600));
        assert!(dictionaries(&store) > 0, "carried by the next batch of its table");
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let tid = store.table_id(IMAGE_LOADS).unwrap();
        let (frame, _) = store.stored_frame(keys::BLOCK_ROWS, tid, s, 0, None).unwrap();
        assert_eq!(pages::Directory::parse(&frame).unwrap().dictionary, 1, "its pages use the dictionary");
        let keys = store.all_row_keys(&[IMAGE_LOADS.to_string()]).unwrap();
        let rows = store.get_rows_where::<Row>(&keys, &[]).unwrap();
        assert_eq!(rows.len(), 610);
        let mut reports: Vec<String> = rows.iter().map(|r| r.str("SHA1").to_string()).collect();
        reports.sort();
        reports.dedup();
        assert_eq!(reports.len(), 610, "every row, each once");
    }

    /// A batch's column-index entries are in its generation, written before the batch
    /// commits: those of a batch that never committed are removed (at once when it fails,
    /// when the store next opens after a crash), and the batch that takes its sequence
    /// next finds none of them.
    #[test]
    fn index_entries_of_a_batch_that_never_committed_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = indexed_store(dir.path());
        let s1 = commit(&mut store, vec![load(1, "wsmprovhost.exe")]);
        assert_eq!(store.db.scan_prefix([keys::INDEX]).count(), 0, "not in the main database");
        store.fail_next_main_commit = true;
        let mut b = store.batch();
        b.add_row(&load(2, "wsmprovhost.exe"), 0).unwrap();
        assert!(b.commit().is_err());
        assert_eq!(lookup(&store, "wsmprovhost.exe", None), ["s1"]);
        // As a crash would leave them: the entries of batch s1, again under the next
        // sequence, which the reopened store numbers its next batch with.
        let g = store.gens.of_seq(s1);
        let gen_db = store.gens.db(g).unwrap().clone();
        let leftovers: Vec<(sled::IVec, sled::IVec)> =
            gen_db.scan_prefix([keys::INDEX]).map(|kv| kv.unwrap()).collect();
        assert!(!leftovers.is_empty(), "batch s1's entries are in its generation");
        for (k, v) in leftovers {
            let at = k.len() - 12;
            let moved = [&k[..at], &(s1 + 1).to_be_bytes()[..], &k[at + 8..]].concat();
            gen_db.insert(moved, v).unwrap();
        }
        gen_db.flush().unwrap();
        drop(gen_db);
        drop(store);
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(commit(&mut store, vec![load(3, "wsmprovhost.exe")]), s1 + 1, "the failed batch's sequence");
        assert_eq!(lookup(&store, "wsmprovhost.exe", Some((s1 + 1, s1 + 1))), ["s3"]);
        assert_eq!(lookup(&store, "wsmprovhost.exe", None), ["s1", "s3"]);
    }

    /// A generation's block file: a failed batch's frames are never written over (the next
    /// batch goes after them), a crash's are cut off on open, and a file cut short (frames
    /// the store refers to gone) is refused with what to do.
    #[test]
    fn a_block_file_keeps_only_committed_frames_and_a_cut_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = indexed_store(dir.path());
        let s1 = commit(&mut store, vec![load(1, "wsmprovhost.exe")]);
        let g = store.gens.of_seq(s1);
        assert!(g > 0, "event rows go into a generation");
        let file = dir.path().join("gens").join(g.to_string()).join("blocks");
        let len = |f: &Path| std::fs::metadata(f).unwrap().len();
        let committed = len(&file);
        assert!(committed > 0);
        store.fail_next_main_commit = true;
        let mut b = store.batch();
        b.add_row(&load(2, "wsmprovhost.exe"), 0).unwrap();
        assert!(b.commit().is_err());
        let failed = len(&file);
        assert!(failed > committed, "the failed batch's frames were written");
        commit(&mut store, vec![load(3, "wsmprovhost.exe")]);
        let committed = len(&file);
        assert!(committed > failed, "the next batch went after them");
        drop(store);
        // What a crash after writing a batch's frames leaves: bytes past the recorded end.
        {
            use std::io::Write as _;
            let mut f = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
            f.write_all(&[0xAB; 5000]).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(len(&file), committed, "cut back to what was committed");
        let sha1s = |store: &Store| -> Vec<String> {
            ["s1", "s2", "s3"]
                .into_iter()
                .filter(|s| !store.lookup::<Row>(IMAGE_LOADS, s, Some("d")).unwrap().is_empty())
                .map(String::from)
                .collect()
        };
        assert_eq!(sha1s(&store), ["s1", "s3"], "read back from the file, not the cache");
        drop(store);
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(committed - 1).unwrap();
        match Store::open(dir.path()) {
            Err(StoreError::Unusable(m)) => {
                assert!(m.contains(&file.display().to_string()) && m.contains("ingest the logs again"), "{m}")
            }
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a block file cut short was opened"),
        }
    }

    #[test]
    fn index_answers_by_batch_range_ignoring_ascii_case() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = indexed_store(dir.path());
        let s1 = commit(&mut store, vec![load(1, "wsmprovhost.exe"), load(2, "svchost.exe")]);
        let s2 = commit(&mut store, vec![load(3, "WsmProvHost.exe"), load(4, "wsmprovhost.exe2")]);
        // Re-sent rows are duplicates: no second index entry.
        let s3 = commit(&mut store, vec![load(1, "wsmprovhost.exe"), load(5, "wsmprovhost.exe")]);
        assert_eq!(lookup(&store, "WSMPROVHOST.EXE", None), ["s1", "s3", "s5"]);
        assert_eq!(lookup(&store, "wsmprovhost.exe", Some((s1, s1))), ["s1"]);
        assert_eq!(lookup(&store, "wsmprovhost.exe", Some((s2, s3))), ["s3", "s5"]);
        assert_eq!(lookup(&store, "wsmprovhost.exe", Some((s3 + 1, s3 + 5))), Vec::<String>::new());
        assert_eq!(lookup(&store, "svchost.exe", Some((s2, s3))), Vec::<String>::new());
        let folder = [Condition::In { column: "FolderPath".into(), any_of: vec!["x".into()] }];
        let not_indexed = store.index_lookup(IMAGE_LOADS, &folder, None).unwrap();
        assert!(not_indexed.is_none(), "a column without an index says so");
    }

    /// Conditions besides the indexed one: on a covered column (FolderPath) checked from
    /// the entry, on any other column from the row; both give what the rows say.
    #[test]
    fn a_projected_fetch_copies_only_the_named_columns_of_rows_that_pass() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        commit(
            &mut store,
            vec![row(1, r#","FileName":"a.exe","FolderPath":"c:\\x""#), row(2, r#","FileName":"b.exe""#)],
        );
        let keys: Vec<Vec<u8>> = store.all_row_keys(&["DeviceFileEvents".to_string()]).unwrap();
        assert_eq!(keys.len(), 2);
        let columns = ["FolderPath".to_string(), "ReportId".to_string(), "Absent".to_string()];
        let a_exe = [Condition::Eq { column: "FileName".into(), value: "a.exe".into() }];
        let got: Vec<Row> = store.get_columns_where::<Row>(&keys, &a_exe, &columns).unwrap();
        assert_eq!(got.len(), 1, "only the row that meets the filter");
        let full = store.get_row::<Row>(&got[0].key).unwrap().unwrap();
        let names: Vec<&str> = got[0].columns.iter().map(|(n, _)| n.as_str()).collect();
        let stored_order: Vec<&str> =
            full.columns.iter().map(|(n, _)| n.as_str()).filter(|n| ["FolderPath", "ReportId"].contains(n)).collect();
        assert_eq!(names, stored_order, "the named columns it has, in stored order");
        assert_eq!(got[0].get("ReportId"), Some(&Cell::Int(1)));
        assert_eq!(got[0].str("FolderPath"), "c:\\x");
        assert_eq!((got[0].table.as_str(), got[0].ingested_at), (full.table.as_str(), full.ingested_at));
        let none: Vec<Row> = store.get_columns_where::<Row>(&keys, &[], &[]).unwrap();
        assert!(none.iter().all(|r| r.columns.is_empty()) && none.len() == 2, "no columns named: rows without cells");
        // A plugin's answer carries the cells as stored: the same bytes as the rows
        // written from their cells, a tested column among those returned, strings long
        // enough for a two-byte length.
        let long = format!(r#","FileName":"a.exe","FolderPath":"{}","InitiatingProcessId":70000"#, "é".repeat(200));
        commit(&mut store, vec![row(3, &long), row(4, r#","FileName":"c.exe","InitiatingProcessId":-5"#)]);
        let keys: Vec<Vec<u8>> = store.all_row_keys(&["DeviceFileEvents".to_string()]).unwrap();
        let columns = ["FileName", "FolderPath", "InitiatingProcessId", "ReportId", "Timestamp"].map(String::from);
        for filter in [&a_exe[..], &[]] {
            let rows: Vec<Row> = store.get_columns_where::<Row>(&keys, filter, &columns).unwrap();
            let bytes: Vec<RowBytes> = store.get_columns_where::<RowBytes>(&keys, filter, &columns).unwrap();
            assert_eq!(rows.len(), if filter.is_empty() { 4 } else { 2 });
            let written: Vec<RowBytes> = rows
                .iter()
                .map(|r| {
                    RowBytes::new(
                        &r.table,
                        &r.key,
                        r.ingested_at,
                        r.columns.iter().map(|(n, c)| (n.as_str(), c.into())),
                    )
                })
                .collect();
            assert_eq!(bytes, written);
        }
    }

    /// Rows read a block at a time (several blocks, none cached: a reopened store) are the
    /// rows read one by one, in the order asked, missing keys left out; look-ups likewise.
    #[test]
    fn many_rows_read_block_by_block_are_the_rows_read_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let padding = format!(r#","FileName":"{}""#, "x".repeat(300));
        let mut keys = Vec::new();
        {
            let mut store = Store::open(dir.path()).unwrap();
            // ~700 rows of ~400 bytes: several blocks in each of two batches.
            for batch in 0..2 {
                commit(&mut store, (0..350).map(|i| row(batch * 1000 + i, &padding)).collect());
            }
            let tid = store.table_id("DeviceFileEvents").unwrap();
            for (k, _) in store.runs.scan_prefix(&store.gens, &store.unzstd, &keys::table_prefix(tid), false).unwrap() {
                keys.push(k);
            }
            store.flush().unwrap();
        }
        assert_eq!(keys.len(), 700);
        let store = Store::open(dir.path()).unwrap();
        // Interleaved across blocks and batches, one asked twice, one that is not stored.
        let mut asked: Vec<Vec<u8>> = keys.iter().step_by(7).rev().cloned().collect();
        asked.extend(keys.iter().skip(3).step_by(11).cloned());
        asked.push(keys[5].clone());
        let mut missing = keys[0].clone();
        missing.push(0);
        asked.insert(3, missing);
        let filter = vec![Condition::Num { column: "ReportId".into(), op: lookout_plugin_sdk::Cmp::Ge, value: 1100 }];
        // Read first, while nothing is cached; then one by one, through the cache.
        let many = store.get_rows_where::<Row>(&asked, &[]).unwrap();
        let picked = store.get_rows_where::<Row>(&asked, &filter).unwrap();
        // Every row here has SHA1 "s" and DeviceId "d": one look-up finds all 700.
        let lookups = [("s".to_string(), Some("d".to_string())), ("t".to_string(), None), ("s".to_string(), None)];
        let sets = store.lookup_many::<Row>("DeviceFileEvents", &lookups, &[]).unwrap();
        let one_by_one: Vec<Row> = asked.iter().filter_map(|k| store.get_row::<Row>(k).unwrap()).collect();
        // A key at a time: a request of one block, read through the cache.
        let filtered: Vec<Row> =
            asked.iter().flat_map(|k| store.get_rows_where::<Row>(std::slice::from_ref(k), &filter).unwrap()).collect();
        assert_eq!(many.len(), asked.len() - 1);
        assert_eq!(many, one_by_one);
        assert!(!filtered.is_empty() && filtered.len() < one_by_one.len(), "{}", filtered.len());
        assert_eq!(picked, filtered);
        let all: Vec<Row> = keys.iter().filter_map(|k| store.get_row::<Row>(k).unwrap()).collect();
        assert_eq!(all.len(), 700);
        assert_eq!(sets, vec![all.clone(), Vec::new(), all]);
    }

    #[test]
    fn rows_read_where_a_pass_found_them_are_the_rows_the_key_index_finds() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        commit(&mut store, (1..=5).map(|i| row(i, r#","FileName":"old.exe""#)).collect());
        let seq = commit(&mut store, (6..=9).map(|i| row(i, r#","FileName":"new.exe""#)).collect());
        let mut seen = Vec::new();
        let keys = store
            .new_row_keys_where("DeviceFileEvents", seq, seq, None, |k, _| {
                seen.push(k.to_vec());
                Ok(seen.len() % 2 == 1)
            })
            .unwrap();
        assert_eq!((seen.len(), keys.len()), (4, 2), "only the new batch's rows, as `keep` chose");
        let hinted: Vec<Option<Row>> = seen.iter().map(|k| store.get_row::<Row>(k).unwrap()).collect();
        store.forget_row_hints();
        let looked_up: Vec<Option<Row>> = seen.iter().map(|k| store.get_row::<Row>(k).unwrap()).collect();
        assert_eq!(hinted, looked_up);
        assert!(looked_up.iter().all(|r| r.as_ref().is_some_and(|r| r.str("FileName") == "new.exe")));
    }

    #[test]
    fn other_conditions_are_checked_from_the_entry_or_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = indexed_store(dir.path());
        commit(
            &mut store,
            (1..=12).map(|i| load(i, if i % 4 == 0 { "svchost.exe" } else { "wsmprovhost.exe" })).collect(),
        );
        let process =
            Condition::In { column: "InitiatingProcessFileName".into(), any_of: vec!["WSMPROVHOST.exe".into()] };
        let not_dir1 = Condition::NotStartsWith { column: "FolderPath".into(), prefix: r"c:\DIR1".into() };
        let account = Condition::In { column: "AccountName".into(), any_of: vec!["A1".into()] };
        let expect = |f: &dyn Fn(i64) -> bool| -> Vec<String> {
            let mut v: Vec<String> = (1..=12).filter(|i| i % 4 != 0 && f(*i)).map(|i| format!("s{i}")).collect();
            v.sort();
            v
        };
        assert_eq!(lookup_filtered(&store, &[process.clone(), not_dir1.clone()], None), expect(&|i| i % 3 != 1));
        assert_eq!(lookup_filtered(&store, &[process.clone(), account.clone()], None), expect(&|i| i % 2 == 1));
        assert_eq!(lookup_filtered(&store, &[not_dir1, process, account], None), expect(&|i| i % 3 != 1 && i % 2 == 1));
    }

    #[test]
    fn values_longer_than_the_indexed_cut_are_rechecked() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = indexed_store(dir.path());
        let long_a = format!("{}a", "x".repeat(keys::INDEX_VALUE_MAX));
        let long_b = format!("{}b", "x".repeat(keys::INDEX_VALUE_MAX));
        commit(&mut store, vec![load(1, &long_a), load(2, &long_b)]);
        assert_eq!(lookup(&store, &long_a.to_uppercase(), None), ["s1"]);
    }

    /// An index declared when rows are already stored is built from the blocks, each row
    /// under its own batch sequence: look-ups by batch range work at once, no detector has
    /// to backfill, it is kept across reopening, and rows stored later are indexed as they
    /// arrive — by ingestion alone, with no detector loaded.
    #[test]
    fn index_declared_over_stored_rows_is_built_with_their_batches() {
        let dir = tempfile::tempdir().unwrap();
        let (s1, s2);
        {
            let mut store = Store::open(dir.path()).unwrap();
            s1 = commit(&mut store, vec![load(1, "wsmprovhost.exe"), load(2, "svchost.exe")]);
            s2 = commit(&mut store, vec![load(3, "wsmprovhost.exe")]);
            assert!(store.index_lookup(IMAGE_LOADS, &in_process("wsmprovhost.exe"), None).unwrap().is_none());
            store.declare_indexes(&[winrm_index()]).unwrap();
            assert_eq!(lookup(&store, "wsmprovhost.exe", None), ["s1", "s3"]);
            assert_eq!(lookup(&store, "wsmprovhost.exe", Some((s2, s2))), ["s3"]);
            assert_eq!(store.meta_u64("jfloor").unwrap(), 0, "no backfill forced");
            store.flush().unwrap();
        }
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.indexes(), [winrm_index()]);
        let s3 = commit(&mut store, vec![load(4, "WSMPROVHOST.EXE")]);
        assert_eq!(lookup(&store, "wsmprovhost.exe", Some((s1, s1))), ["s1"]);
        assert_eq!(lookup(&store, "wsmprovhost.exe", Some((s3, s3))), ["s4"]);
    }

    /// A store of 70 batches of one image load each, half of them by wsmprovhost.exe:
    /// more than an index build writes in one step.
    fn seventy_batches_of_loads() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        for i in 0..70 {
            commit(&mut store, vec![load(i, if i % 2 == 0 { "wsmprovhost.exe" } else { "svchost.exe" })]);
        }
        (dir, store)
    }

    /// Building an index over a large store stops once the disk is nearly full, and is
    /// not recorded as built; declared again with room, it is built whole.
    #[test]
    fn an_index_build_stops_on_a_nearly_full_disk_and_is_built_whole_later() {
        let (dir, mut store) = seventy_batches_of_loads();
        crate::disk::LOW_FOR_TESTS.lock().unwrap().push(dir.path().to_path_buf());
        let e = store.declare_indexes(&[winrm_index()]).unwrap_err();
        crate::disk::LOW_FOR_TESTS.lock().unwrap().retain(|d| d != dir.path());
        let text = crate::error::Chain(&e).to_string();
        assert!(text.contains("MiB free"), "{text}");
        assert!(store.indexes().is_empty(), "not recorded as built");
        store.declare_indexes(&[winrm_index()]).unwrap();
        assert_eq!(lookup(&store, "wsmprovhost.exe", None).len(), 35);
    }

    /// Building an index over a large store ends early once the process is asked to stop,
    /// and is not recorded as built; declared again, it is built whole.
    #[test]
    fn an_index_build_ends_early_on_a_stop_and_is_built_whole_later() {
        let (_dir, mut store) = seventy_batches_of_loads();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(true));
        store.interrupt_on(stop.clone());
        let e = store.declare_indexes(&[winrm_index()]).unwrap_err();
        assert!(matches!(e, StoreError::Interrupted(_)), "{e}");
        assert!(store.indexes().is_empty(), "not recorded as built");
        stop.store(false, std::sync::atomic::Ordering::SeqCst);
        store.declare_indexes(&[winrm_index()]).unwrap();
        assert_eq!(lookup(&store, "wsmprovhost.exe", None).len(), 35);
    }

    /// The rows an index chooses are read from where its entries say (the key index is
    /// not asked), and those places are the key index's.
    #[test]
    fn rows_an_index_chose_are_where_its_entries_say() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = indexed_store(dir.path());
        commit(
            &mut store,
            (1..=6).map(|i| load(i, if i % 2 == 0 { "svchost.exe" } else { "wsmprovhost.exe" })).collect(),
        );
        commit(&mut store, (7..=9).map(|i| load(i, "wsmprovhost.exe")).collect());
        store.forget_row_hints();
        let keys = store.index_lookup(IMAGE_LOADS, &in_process("wsmprovhost.exe"), None).unwrap().unwrap();
        assert_eq!(keys.len(), 6);
        let hints = store.hints.lock().unwrap().clone();
        assert_eq!(hints.len(), keys.len(), "only the rows chosen");
        for k in &keys {
            let e = store.key_entry(k).unwrap().expect("in the key index");
            assert_eq!(hints.get(k), Some(&(e.seq, e.block, e.row)));
        }
        let hinted: Vec<Option<Row>> = keys.iter().map(|k| store.get_row::<Row>(k).unwrap()).collect();
        store.forget_row_hints();
        let looked_up: Vec<Option<Row>> = keys.iter().map(|k| store.get_row::<Row>(k).unwrap()).collect();
        assert_eq!(hinted, looked_up);
    }

    /// A store whose index entries are of an earlier layout has its indexes built again
    /// when opened, in this one.
    #[test]
    fn indexes_of_an_earlier_layout_are_built_again_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = indexed_store(dir.path());
            commit(&mut store, (1..=4).map(|i| load(i, "wsmprovhost.exe")).collect());
            let earlier: (u32, Vec<lookout_plugin_sdk::IndexDecl>) = (index::LAYOUT - 1, store.indexes().to_vec());
            store.db.insert(keys::named_key(keys::META, "index"), enc(&earlier).unwrap()).unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.indexes(), [winrm_index()]);
        let meta: (u32, Vec<lookout_plugin_sdk::IndexDecl>) =
            store.get_decoded(&keys::named_key(keys::META, "index")).unwrap().unwrap();
        assert_eq!(meta, (index::LAYOUT, vec![winrm_index()]));
        assert_eq!(lookup(&store, "wsmprovhost.exe", None), ["s1", "s2", "s3", "s4"]);
    }

    /// A multi-column index answers `lookup_by` on exactly its columns, ignoring ASCII
    /// case; any other column list is an error that says what to declare.
    #[test]
    fn lookup_by_a_declared_multi_column_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        commit(&mut store, (1..=6).map(|i| load(i, if i % 2 == 0 { "a.exe" } else { "b.exe" })).collect());
        let decl = lookout_plugin_sdk::IndexDecl {
            table: IMAGE_LOADS.into(),
            columns: vec!["DeviceId".into(), "InitiatingProcessFileName".into()],
            covers: vec![],
        };
        store.declare_indexes(std::slice::from_ref(&decl)).unwrap();
        commit(&mut store, vec![load(7, "A.EXE")]);
        let key = |p: &str| {
            vec![("DeviceId".to_string(), "D".to_string()), ("InitiatingProcessFileName".to_string(), p.to_string())]
        };
        let mut got: Vec<String> = store
            .lookup_by::<Row>(IMAGE_LOADS, &key("a.exe"), &[])
            .unwrap()
            .iter()
            .map(|r| r.str("SHA1").to_string())
            .collect();
        got.sort();
        assert_eq!(got, ["s2", "s4", "s6", "s7"]);
        let account = [Condition::In { column: "AccountName".into(), any_of: vec!["a1".into()] }];
        let got = store.lookup_by::<Row>(IMAGE_LOADS, &key("b.exe"), &account).unwrap();
        assert_eq!(got.len(), 3, "s1, s3, s5 all have AccountName a1");
        let wrong = store.lookup_by::<Row>(IMAGE_LOADS, &[("DeviceId".to_string(), "d".to_string())], &[]).unwrap_err();
        assert!(format!("{wrong}").contains("declare it"), "{wrong}");
    }

    /// The maps' hasher tells apart keys that differ only in where their strings split or
    /// in their lengths, and gives equal keys equal hashes.
    #[test]
    fn the_one_shot_hasher_separates_keys_that_concatenate_alike() {
        use std::hash::BuildHasher;
        let h = FastHash::default();
        let lists: [Vec<String>; 5] = [
            vec!["ab".into(), "c".into()],
            vec!["a".into(), "bc".into()],
            vec!["abc".into()],
            vec!["abc".into(), String::new()],
            vec![String::new(), "abc".into()],
        ];
        let hashes: HashSet<u64> = lists.iter().map(|l| h.hash_one(l)).collect();
        assert_eq!(hashes.len(), lists.len(), "{hashes:?}");
        let keys: [Vec<u8>; 4] = [vec![], vec![0], vec![0, 0], vec![1]];
        let hashes: HashSet<u64> = keys.iter().map(|k| h.hash_one(k)).collect();
        assert_eq!(hashes.len(), keys.len());
        assert_eq!(h.hash_one(b"row key".to_vec()), h.hash_one(b"row key".to_vec()));
        assert_eq!(h.hash_one(&lists[0]), FastHash::default().hash_one(lists[0].clone()));
    }

    /// A FileProfile version stored before and read again (another file, a replay of the
    /// feed) is a duplicate: it does not become current again over the newer one.
    #[test]
    fn an_older_file_profile_read_again_does_not_replace_the_newer() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let profile = |prevalence: i64| {
            let text = format!(r#"{{"SHA1":"abc","GlobalPrevalence":{prevalence},"ProfileAvailability":"Available"}}"#);
            let serde_json::Value::Object(obj) = serde_json::from_str(&text).unwrap() else { unreachable!() };
            normalise(obj, Some("FileProfile"), &TableHints::default()).unwrap()
        };
        let add = |store: &mut Store, rows: &[NormalRow]| -> Vec<Added> {
            let mut b = store.batch();
            let added = rows.iter().map(|r| b.add_row(r, 0).unwrap()).collect();
            b.commit().unwrap();
            added
        };
        let prevalence = |store: &Store| store.profile::<Row>("abc").unwrap().unwrap().get("GlobalPrevalence").cloned();
        assert_eq!(add(&mut store, &[profile(5)]), [Added::New]);
        assert_eq!(add(&mut store, &[profile(500)]), [Added::Replaced]);
        assert_eq!(add(&mut store, &[profile(5)]), [Added::Duplicate]);
        assert_eq!(prevalence(&store), Some(Cell::Int(500)));
        // Within one batch too; a version never seen still replaces.
        assert_eq!(
            add(&mut store, &[profile(7), profile(500), profile(7)]),
            [Added::Replaced, Added::Duplicate, Added::Duplicate]
        );
        assert_eq!(prevalence(&store), Some(Cell::Int(7)));
        // A store written before versions were recorded: its current version is known
        // from its entry, and recorded when another arrives.
        let recorded: Vec<sled::IVec> =
            store.db.scan_prefix([keys::PROFILE_VERSION]).keys().collect::<std::result::Result<_, _>>().unwrap();
        for k in recorded {
            store.db.remove(k).unwrap();
        }
        assert_eq!(add(&mut store, &[profile(9)]), [Added::Replaced]);
        assert_eq!(add(&mut store, &[profile(7)]), [Added::Duplicate]);
        assert_eq!(prevalence(&store), Some(Cell::Int(9)));
    }

    /// Two declarations of one column list covering different columns (two detectors, or
    /// two versions of one) share one index covering both: each one's conditions on its
    /// covered column are decided right, for rows stored before and after the second, and
    /// a new row is handed over once. Reopened, the store keeps the merged index.
    #[test]
    fn declarations_of_one_column_covering_others_share_one_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = indexed_store(dir.path());
        commit(&mut store, (1..=6).map(|r| load(r, "wsmprovhost.exe")).collect());
        let by_account = lookout_plugin_sdk::IndexDecl {
            table: IMAGE_LOADS.into(),
            columns: vec!["InitiatingProcessFileName".into()],
            covers: vec!["AccountName".into()],
        };
        store.declare_indexes(std::slice::from_ref(&by_account)).unwrap();
        let mut folder = in_process("wsmprovhost.exe");
        folder.push(Condition::StartsWith { column: "FolderPath".into(), prefix: r"C:\dir1".into() });
        let mut account = in_process("wsmprovhost.exe");
        account.push(Condition::In { column: "AccountName".into(), any_of: vec!["a0".into()] });
        assert_eq!(lookup_filtered(&store, &folder, None), ["s1", "s4"]);
        assert_eq!(lookup_filtered(&store, &account, None), ["s2", "s4", "s6"]);
        let seq = commit(&mut store, vec![load(7, "wsmprovhost.exe")]);
        assert_eq!(lookup_filtered(&store, &folder, Some((seq, seq))), ["s7"], "once");
        assert_eq!(lookup(&store, "wsmprovhost.exe", None).len(), 7);
        assert_eq!(store.indexes().len(), 1, "{:?}", store.indexes());
        assert_eq!(store.indexes()[0].covers, ["FolderPath", "AccountName"]);
        // Either declaration again: already kept.
        store.declare_indexes(&[winrm_index(), by_account]).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.indexes().len(), 1);
        assert_eq!(lookup_filtered(&store, &account, None), ["s2", "s4", "s6"]);
    }

    /// Rows of one layout keep being indexed by every index after a new one is declared:
    /// the cells an index reads are remembered per row layout, and forgotten when the
    /// declared indexes change (a detector dropped in while ingestion runs).
    #[test]
    fn an_index_declared_later_indexes_rows_of_a_layout_seen_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let by_process = lookout_plugin_sdk::IndexDecl {
            table: IMAGE_LOADS.into(),
            columns: vec!["InitiatingProcessFileName".into()],
            covers: vec![],
        };
        store.declare_indexes(std::slice::from_ref(&by_process)).unwrap();
        commit(&mut store, vec![load(1, "a.exe"), load(2, "a.exe")]);
        let by_folder = lookout_plugin_sdk::IndexDecl {
            table: IMAGE_LOADS.into(),
            columns: vec!["FolderPath".into()],
            covers: vec![],
        };
        store.declare_indexes(&[by_process, by_folder]).unwrap();
        // The same layout as the rows before (the same column names, in the same order).
        commit(&mut store, vec![load(3, "a.exe"), load(6, "a.exe")]);
        let folder = |f: &str| vec![("FolderPath".to_string(), f.to_string())];
        let mut got: Vec<String> = store
            .lookup_by::<Row>(IMAGE_LOADS, &folder(r"C:\dir0\x.dll"), &[])
            .unwrap()
            .iter()
            .map(|r| r.str("SHA1").to_string())
            .collect();
        got.sort();
        assert_eq!(got, ["s3", "s6"], "rows stored after the index was declared are in it");
        let process = vec![("InitiatingProcessFileName".to_string(), "a.exe".to_string())];
        assert_eq!(store.lookup_by::<Row>(IMAGE_LOADS, &process, &[]).unwrap().len(), 4);
    }

    /// An index on a long column (a process id) keys it by its digits: `LookupBy` finds the
    /// rows, and an `in~` on it gives the same rows from the index, with a condition on a
    /// covered column, and from the rows themselves.
    #[test]
    fn an_index_on_a_long_column_answers_by_its_digits() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let with_pid = |report: i64, pid: i64| {
            let text = format!(
                r#"{{"Timestamp":"2025-05-07T16:55:49Z","DeviceId":"d","SHA1":"s{report}","ReportId":{report},"InitiatingProcessId":{pid},"FolderPath":"p{report}"}}"#
            );
            let serde_json::Value::Object(obj) = serde_json::from_str(&text).unwrap() else { unreachable!() };
            normalise(obj, Some("DeviceImageLoadEvents"), &TableHints::default()).unwrap()
        };
        commit(&mut store, vec![with_pid(1, 4242), with_pid(2, 7), with_pid(3, 4242)]);
        let decl = lookout_plugin_sdk::IndexDecl {
            table: IMAGE_LOADS.into(),
            columns: vec!["InitiatingProcessId".into()],
            covers: vec!["FolderPath".into()],
        };
        store.declare_indexes(std::slice::from_ref(&decl)).unwrap();
        commit(&mut store, vec![with_pid(4, 4242)]);
        let found = store.lookup_by::<Row>(IMAGE_LOADS, &[("InitiatingProcessId".into(), "4242".into())], &[]).unwrap();
        let mut sha1s: Vec<&str> = found.iter().map(|r| r.str("SHA1")).collect();
        sha1s.sort();
        assert_eq!(sha1s, ["s1", "s3", "s4"]);
        let pid = Condition::In { column: "InitiatingProcessId".into(), any_of: vec!["4242".into()] };
        let folder = Condition::NotStartsWith { column: "FolderPath".into(), prefix: "p3".into() };
        assert_eq!(lookup_filtered(&store, &[pid.clone(), folder.clone()], None), ["s1", "s4"]);
        let from_rows = store.scan_where(IMAGE_LOADS, &[pid, folder]).unwrap();
        assert_eq!(from_rows.len(), 2, "the same condition on the rows");
    }

    /// An index built over many stored rows splits a frequent value into parts; none is
    /// lost or overwritten.
    #[test]
    fn built_index_keeps_every_row_of_a_frequent_value() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        for chunk in (1..=9000).collect::<Vec<i64>>().chunks(3000) {
            commit(&mut store, chunk.iter().map(|&i| load(i, "wsmprovhost.exe")).collect());
        }
        store.declare_indexes(&[winrm_index()]).unwrap();
        assert!(store.db.scan_prefix([keys::INDEX]).count() >= 3, "split into parts");
        let found = lookup(&store, "wsmprovhost.exe", None);
        assert_eq!(found.len(), 9000);
        assert_eq!(found.iter().collect::<HashSet<_>>().len(), 9000);
    }

    /// Re-sent rows are duplicates whether the key filter was saved, rebuilt, or saved
    /// for an older state of the store (which must not be trusted).
    #[test]
    fn key_filter_never_lets_a_stored_row_in_twice() {
        let dir = tempfile::tempdir().unwrap();
        let add = |store: &mut Store, range: std::ops::RangeInclusive<i64>| -> (usize, u64) {
            let before = store.counters().duplicates;
            let mut b = store.batch();
            let mut new = 0;
            for i in range {
                if b.add_row(&load(i, "x.exe"), 0).unwrap() == Added::New {
                    new += 1;
                }
            }
            b.commit().unwrap();
            (new, store.counters().duplicates - before)
        };
        let filter = dir.path().join("keys.filter");
        let stale = dir.path().join("stale.filter");
        {
            let mut store = Store::open(dir.path()).unwrap();
            assert_eq!(add(&mut store, 1..=10), (10, 0));
            store.flush_and_save_key_filter().unwrap();
            std::fs::copy(&filter, &stale).unwrap();
            assert_eq!(add(&mut store, 11..=20), (10, 0));
            assert_eq!(add(&mut store, 5..=15), (0, 11), "in memory");
            store.flush_and_save_key_filter().unwrap();
        }
        {
            let mut store = Store::open(dir.path()).unwrap();
            assert_eq!(add(&mut store, 1..=20), (0, 20), "saved filter");
            store.flush_and_save_key_filter().unwrap();
        }
        std::fs::copy(&stale, &filter).unwrap();
        {
            let mut store = Store::open(dir.path()).unwrap();
            assert_eq!(add(&mut store, 1..=21), (1, 20), "stale filter: rebuilt, not trusted");
        }
        std::fs::remove_file(&filter).unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(add(&mut store, 1..=22), (1, 21), "no filter: rebuilt");
    }

    /// A batch dropped without commit (a read error, a file truncated mid-read) must not
    /// leave a new schema or table registered only in memory: rows committed later with
    /// that schema would refer to a schema that is not on disk.
    #[test]
    fn dropped_batch_rolls_back_memory() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path()).unwrap();
            {
                let mut b = store.batch();
                b.add_row(&row(1, r#","New":1"#), 0).unwrap();
                // dropped
            }
            assert_eq!(store.counters().rows.get("DeviceFileEvents"), None, "counters rolled back");
            let mut b = store.batch();
            b.add_row(&row(2, r#","New":1"#), 0).unwrap();
            b.commit().unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let rows = store.lookup::<Row>("DeviceFileEvents", "s", Some("d")).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get("New"), Some(&Cell::Int(1)));
        assert_eq!(store.counters().rows.get("DeviceFileEvents"), Some(&1));
    }
}
