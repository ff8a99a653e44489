//! The key index: row key → [`KeyEntry`] (where the row is, a hash of its content), kept
//! as sorted runs instead of one sled item per row.
//!
//! Why: a sled insert at a random key rewrites a leaf page somewhere in a tree many times
//! the cache; a million rows cost a million random page writes, and sled's log keeps the
//! old page versions until a segment is less than half live, so the index took more disk
//! than the compressed rows it points at. Each batch instead writes its entries sorted, as
//! one run: chunks of ~[`CHUNK_ENTRIES`] entries, zstd-compressed, under keys that only grow
//! (`I` run id, chunk), plus the run's metadata (`M` run id, part): its first key per chunk
//! (fences), its Timestamp range and a Bloom filter of its keys and of their (table, SHA1)
//! and (table, SHA1, DeviceId) prefixes. The metadata of every run is held in memory, so a
//! look-up reads only the chunks of the runs whose filter says "maybe".
//!
//! A batch's own run of event rows is not written: it is held in memory (its metadata,
//! without fences or filter, goes into the batch so the run is known) and made again from
//! the batch's blocks' key frames, which carry each row's key and content hash, when the
//! store next opens. Why: it would be written and compressed only for a merge to read it
//! back and write its entries again, soon after; compressing it was an eighth of what
//! the storing thread did, which is what limits ingestion. At most [`MAX_HELD`] are held:
//! past that the oldest are merged (or written, alone) even if fewer than the fan-in.
//!
//! Small runs are merged into bigger ones ([`MERGE_FAN_IN`] at a time, up to
//! [`MAX_MERGED_ENTRIES`]) on a thread of their own, which writes the new run's chunks;
//! one atomic batch of the main database then makes the new run visible and the old ones
//! invisible. A key is in at most one event run (duplicates are never stored twice); a
//! FileProfile key may be in several, and the entry of the latest batch (its `seq`) wins.
//! Runs whose rows are all past the retention horizon are dropped whole; a merge leaves
//! out entries past it.

use super::blocks::{unpack_items, KeyEntry};
use super::generations::Generations;
use super::keys;
use crate::error::{StoreContext as _, StoreError};
type Result<T, E = StoreError> = std::result::Result<T, E>;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Entries per chunk: ~64 keys of ~100 bytes compress to a few KiB, far below sled's
/// blob threshold, and a look-up with a handful of hits reads one chunk per run.
pub const CHUNK_ENTRIES: usize = 64;
/// Runs merged at once. (Sixteen rewrote each entry once instead of twice on its way to
/// a run that is not merged further, but the data directory then crept up to 1.16× its
/// day-8 size in the 40-day test at 100,000 rows a day, against ≤ 1.12× with eight.)
pub const MERGE_FAN_IN: usize = 8;
/// Runs bigger than this are not merged further. A merge streams its inputs a chunk at a
/// time; what it holds whole is the new run's filter and fences.
pub const MAX_MERGED_ENTRIES: u64 = 256 * 1024;
/// Bytes per stored piece of run metadata.
const PIECE_BYTES: usize = 6 << 10;
/// Chunks written (or removed) per atomic batch when a merge or a drop moves a big run:
/// sled holds a whole batch, and its copies of it, in memory while applying it.
const STEP_CHUNKS: u32 = 256;
/// Decompressed chunks kept for reads.
const CHUNK_CACHE: usize = 512;
/// Runs held in memory at most (see the module's comment): ~1 MiB each for a batch of
/// 8,192 rows, and each made again from its key frames on open (~1–2 ms).
pub const MAX_HELD: usize = 16;
const BITS_PER_ITEM: u64 = 10;
const PROBES: u64 = 7;

/// One entry of a run.
pub type Entry = (Vec<u8>, KeyEntry);
type Chunk = Arc<ChunkEntries>;
/// A held run's chunks (see [`RunMeta::held`]).
type HeldChunks = Arc<Vec<Chunk>>;

/// A decompressed chunk kept for look-ups: its entries in key order, each key a span of
/// the one decompressed buffer (a look-up decoding a chunk used to copy each of its keys
/// into an allocation of its own, and most of them are never read).
pub(super) struct ChunkEntries {
    raw: Vec<u8>,
    keys: Vec<(u32, u32)>,
    entries: Vec<KeyEntry>,
}

impl ChunkEntries {
    fn decode(raw: Vec<u8>) -> Result<ChunkEntries> {
        let spans = super::blocks::item_spans(&raw)?;
        let mut keys = Vec::with_capacity(spans.len());
        let mut entries = Vec::with_capacity(spans.len());
        for (start, end) in spans {
            let key_start = start as usize + KeyEntry::LEN;
            if key_start > end as usize {
                return Err(corrupt!("corrupt key index chunk"));
            }
            entries.push(KeyEntry::decode(&raw[start as usize..key_start])?);
            keys.push((key_start as u32, end));
        }
        Ok(ChunkEntries { raw, keys, entries })
    }

    /// A chunk of entries given in key order, as it would read back once written.
    fn of(list: &[Entry]) -> ChunkEntries {
        let mut raw = Vec::with_capacity(list.iter().map(|(k, _)| k.len()).sum());
        let mut keys = Vec::with_capacity(list.len());
        for (k, _) in list {
            let start = raw.len() as u32;
            raw.extend_from_slice(k);
            keys.push((start, raw.len() as u32));
        }
        ChunkEntries { raw, keys, entries: list.iter().map(|(_, e)| *e).collect() }
    }

    fn key(&self, i: usize) -> &[u8] {
        let (start, end) = self.keys[i];
        &self.raw[start as usize..end as usize]
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    /// The entry of exactly `key`.
    fn find(&self, key: &[u8]) -> Option<KeyEntry> {
        let at = self.partition_point(key);
        (at < self.len() && self.key(at) == key).then(|| self.entries[at])
    }

    /// The first position whose key is not below `key`.
    fn partition_point(&self, key: &[u8]) -> usize {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.key(mid) < key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// The entries from position `from` on.
    fn iter_from(&self, from: usize) -> impl Iterator<Item = (&[u8], KeyEntry)> {
        (from..self.len()).map(|i| (self.key(i), self.entries[i]))
    }
}
/// Decompressed chunks by (run, chunk), with their order of arrival (oldest goes first).
type ChunkCache = (HashMap<(u64, u32), Chunk>, VecDeque<(u64, u32)>);

/// Whether a run holds FileProfile entries (they never expire, and newest wins) or
/// event entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunKind {
    Events,
    Profiles,
}

/// A run's metadata, as stored and as held in memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunMeta {
    kind: RunKind,
    /// The generation whose database holds the chunks (0: the main one; FileProfile's).
    generation: u32,
    entries: u64,
    fences: Vec<Vec<u8>>,
    min_ts: i64,
    max_ts: i64,
    bloom: Vec<u64>,
    /// `Some(seq)`: the run of batch `seq`'s event rows, held in memory, not written; as
    /// stored, without fences or filter (made again with the entries on open).
    held: Option<u64>,
}

impl RunMeta {
    /// Whether the run may hold the item of hash `(h1, h2)` ([`hash2`], taken once for
    /// all the runs a look-up asks).
    fn may_contain(&self, (h1, h2): (u64, u64)) -> bool {
        let n = self.bloom.len() as u64 * 64;
        if n == 0 {
            return false;
        }
        (0..PROBES).all(|i| {
            let p = bit_of(h1.wrapping_add(i.wrapping_mul(h2)), n);
            self.bloom[(p / 64) as usize] & (1 << (p % 64)) != 0
        })
    }

    /// The chunks whose keys may start with `prefix` (or equal it).
    fn chunks_for(&self, prefix: &[u8]) -> std::ops::Range<usize> {
        if self.fences.is_empty() {
            // No chunk at all: a held run made again on open from a batch whose blocks all
            // expired meanwhile (its drop did not happen before the process ended).
            return 0..0;
        }
        // The first chunk that may hold the prefix is the last whose fence is ≤ it.
        let first = self.fences.partition_point(|f| f.as_slice() <= prefix).saturating_sub(1);
        let mut last = first;
        while last + 1 < self.fences.len() && self.fences[last + 1].starts_with(prefix) {
            last += 1;
        }
        first..last + 1
    }
}

/// Sorts a batch's entries by key. Sorting the entries themselves compared each pair's
/// keys where they lie on the heap, from their first byte (a table's keys share their
/// first five): ~4% of the storing thread's time, in cache misses more than instructions.
/// Here each entry's first 48 bytes (a SHA1's whole text) are compared as three
/// integers, inline, and only keys equal that far are compared from there on.
pub fn sort_entries(entries: &mut Vec<Entry>) {
    fn part(key: &[u8], at: usize) -> u128 {
        let mut b = [0u8; 16];
        if let Some(rest) = key.get(at..) {
            let n = rest.len().min(16);
            b[..n].copy_from_slice(&rest[..n]);
        }
        u128::from_be_bytes(b)
    }
    let mut order: Vec<(u128, u128, u128, u32)> =
        entries.iter().enumerate().map(|(i, (k, _))| (part(k, 0), part(k, 16), part(k, 32), i as u32)).collect();
    order.sort_unstable_by(|a, b| {
        (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)).then_with(|| {
            let (ka, kb) = (&entries[a.3 as usize].0, &entries[b.3 as usize].0);
            // Equal in their first 48 bytes (zero-padded): the rest decides, or, for keys
            // that short, the keys themselves ("ab" against "ab\0").
            match (ka.get(48..), kb.get(48..)) {
                (Some(ra), Some(rb)) => ra.cmp(rb),
                _ => ka.cmp(kb),
            }
        })
    });
    let mut old = std::mem::take(entries);
    entries.extend(order.into_iter().map(|(_, _, _, i)| std::mem::take(&mut old[i as usize])));
}

/// The bit of a filter of `n` bits that probe hash `h` sets: `h`'s place in `n`, by a
/// multiply and shift instead of `h % n` (a division per probe, seven probes for each of
/// three items per entry, on every run written and merged).
fn bit_of(h: u64, n: u64) -> u64 {
    ((u128::from(h) * u128::from(n)) >> 64) as u64
}

fn hash2(item: &[u8]) -> (u64, u64) {
    let h = xxhash_rust::xxh3::xxh3_128(item);
    (h as u64, ((h >> 64) as u64) | 1)
}

/// What is put into a run's filter for a key: the key, and for an event key its
/// (table, SHA1) and (table, SHA1, DeviceId) prefixes.
fn filter_items(key: &[u8]) -> Vec<&[u8]> {
    let mut out = vec![key];
    if key.first() == Some(&keys::EVENT) {
        if let Some((sha1, device)) = keys::event_sha1_device(key) {
            let sha1_end = 3 + 2 + sha1.len();
            let device_end = sha1_end + 2 + device.len();
            out.push(&key[..sha1_end]);
            out.push(&key[..device_end]);
        }
    }
    out
}

/// Writes one run from entries given in key order, a chunk at a time (a merge of runs of
/// hundreds of thousands of entries holds one chunk per input run, not the runs).
struct RunWriter {
    id: u64,
    meta: RunMeta,
    chunk: Vec<Entry>,
    chunks: u32,
    /// A held run's chunks (see [`RunMeta::held`]), kept instead of written.
    held: Option<Vec<Chunk>>,
}

impl RunWriter {
    /// `expected` sizes the Bloom filter (at most this many entries will be pushed).
    fn new(id: u64, kind: RunKind, generation: u32, expected: u64) -> RunWriter {
        let items = expected.max(1) * if kind == RunKind::Events { 3 } else { 1 };
        let words = (items * BITS_PER_ITEM).div_ceil(64).max(1) as usize;
        RunWriter {
            id,
            meta: RunMeta {
                kind,
                generation,
                entries: 0,
                fences: Vec::new(),
                min_ts: i64::MAX,
                max_ts: i64::MIN,
                bloom: vec![0u64; words],
                held: None,
            },
            chunk: Vec::with_capacity(CHUNK_ENTRIES),
            chunks: 0,
            held: None,
        }
    }

    /// A writer of the held run of batch `seq`.
    fn held(id: u64, generation: u32, seq: u64, expected: u64) -> RunWriter {
        let mut w = RunWriter::new(id, RunKind::Events, generation, expected);
        w.meta.held = Some(seq);
        w.held = Some(Vec::with_capacity((expected as usize).div_ceil(CHUNK_ENTRIES)));
        w
    }

    fn push(
        &mut self,
        key: Vec<u8>,
        entry: KeyEntry,
        zstd: &mut zstd::bulk::Compressor<'static>,
        batch: &mut sled::Batch,
    ) -> Result<()> {
        if self.add(key, entry) {
            self.flush_chunk(zstd, batch)?;
        }
        Ok(())
    }

    /// Adds an entry to the metadata and the open chunk; says whether the chunk is full.
    fn add(&mut self, key: Vec<u8>, entry: KeyEntry) -> bool {
        let n = self.meta.bloom.len() as u64 * 64;
        for item in filter_items(&key) {
            let (h1, h2) = hash2(item);
            for i in 0..PROBES {
                let p = bit_of(h1.wrapping_add(i.wrapping_mul(h2)), n);
                self.meta.bloom[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        let ts = keys::event_timestamp(&key).unwrap_or(0);
        self.meta.min_ts = self.meta.min_ts.min(ts);
        self.meta.max_ts = self.meta.max_ts.max(ts);
        self.meta.entries += 1;
        if self.chunk.is_empty() {
            self.meta.fences.push(key.clone());
        }
        self.chunk.push((key, entry));
        self.chunk.len() == CHUNK_ENTRIES
    }

    /// Closes the open chunk of a held run: kept, not written.
    fn keep_chunk(&mut self) {
        if !self.chunk.is_empty() {
            let chunk = Arc::new(ChunkEntries::of(&self.chunk));
            self.held.get_or_insert_with(Vec::new).push(chunk);
            self.chunks += 1;
            self.chunk.clear();
        }
    }

    fn flush_chunk(&mut self, zstd: &mut zstd::bulk::Compressor<'static>, batch: &mut sled::Batch) -> Result<()> {
        if self.held.is_some() {
            self.keep_chunk();
        } else if !self.chunk.is_empty() {
            batch.insert(chunk_key(self.id, self.chunks), compress(zstd, &encode_entries(&self.chunk)?)?);
            self.chunks += 1;
            self.chunk.clear();
        }
        Ok(())
    }

    /// Writes the last chunk (into `chunks`, for the run's generation) and the metadata
    /// (into `meta`, for the main database); `None` if no entry was pushed.
    fn finish(
        mut self,
        zstd: &mut zstd::bulk::Compressor<'static>,
        chunks: &mut sled::Batch,
        batch: &mut sled::Batch,
    ) -> Result<Option<PendingRun>> {
        self.flush_chunk(zstd, chunks)?;
        if self.meta.entries == 0 {
            return Ok(None);
        }
        // A held run's fences and filter are made again with its entries on open.
        let stored = match self.meta.held {
            Some(_) => RunMeta { fences: Vec::new(), bloom: Vec::new(), ..self.meta.clone() },
            None => self.meta.clone(),
        };
        let raw = bincode::serde::encode_to_vec(&stored, bincode::config::standard())
            .map_err(|e| corrupt!("cannot encode run metadata: {e}"))?;
        for (part, piece) in compress(zstd, &raw)?.chunks(PIECE_BYTES).enumerate() {
            batch.insert(meta_key(self.id, part as u32), piece);
        }
        Ok(Some(PendingRun { id: self.id, meta: self.meta, held: self.held }))
    }
}

fn chunk_key(run: u64, chunk: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(13);
    k.push(keys::RUN_CHUNK);
    k.extend_from_slice(&run.to_be_bytes());
    k.extend_from_slice(&chunk.to_be_bytes());
    k
}

/// How many key-index runs the main database holds (for a reader without the store): each
/// run's metadata starts with its part 0.
pub(super) fn stored_runs(db: &sled::Db) -> Result<u64> {
    let mut n = 0;
    for k in db.scan_prefix([keys::RUN_META]).keys() {
        n += u64::from(k?.ends_with(&0u32.to_be_bytes()));
    }
    Ok(n)
}

fn meta_key(run: u64, part: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(13);
    k.push(keys::RUN_META);
    k.extend_from_slice(&run.to_be_bytes());
    k.extend_from_slice(&part.to_be_bytes());
    k
}

/// A chunk as stored: each entry as one item (the entry's 20 bytes, then the key), as
/// [`super::blocks::pack_items`] lays items out, written straight into one buffer (no `Vec` per entry:
/// every run written and every merge goes through here).
fn encode_entries(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(entries.iter().map(|(k, _)| 4 + KeyEntry::LEN + k.len()).sum());
    for (k, e) in entries {
        let len = u32::try_from(KeyEntry::LEN + k.len()).map_err(|_| corrupt!("a row key too long to index"))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&e.encode());
        out.extend_from_slice(k);
    }
    Ok(out)
}

fn decode_entries(raw: &[u8]) -> Result<Vec<Entry>> {
    unpack_items(raw)?
        .into_iter()
        .map(|item| {
            let (e, k) = item.split_at_checked(KeyEntry::LEN).ok_or_else(|| corrupt!("corrupt key index chunk"))?;
            Ok((k.to_vec(), KeyEntry::decode(e)?))
        })
        .collect()
}

fn compress(zstd: &mut zstd::bulk::Compressor<'static>, raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len() / 2 + 8);
    out.extend_from_slice(&(raw.len() as u32).to_be_bytes());
    out.extend_from_slice(&zstd.compress(raw).context("cannot compress the key index")?);
    Ok(out)
}

fn decompress(zstd: &mut zstd::bulk::Decompressor<'static>, frame: &[u8]) -> Result<Vec<u8>> {
    if frame.len() < 4 {
        return Err(corrupt!("corrupt key index frame"));
    }
    let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    if len > 64 << 20 {
        return Err(corrupt!("corrupt key index frame ({len} bytes claimed)"));
    }
    zstd.decompress(&frame[4..], len).context("corrupt key index frame")
}

/// Removes a run's metadata (into `batch`): from then on the run does not exist; its
/// chunks are swept after.
fn remove_meta(db: &sled::Db, id: u64, batch: &mut sled::Batch) -> Result<()> {
    for k in db.range(meta_key(id, 0)..meta_key(id + 1, 0)).keys() {
        batch.remove(k?);
    }
    Ok(())
}

/// Removes the chunks of runs that no longer exist, [`STEP_CHUNKS`] per batch.
fn sweep_chunks(db: &sled::Db, ids: &[u64]) -> Result<()> {
    for id in ids {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in db.range(chunk_key(*id, 0)..chunk_key(id + 1, 0)).keys() {
            batch.remove(k?);
            n += 1;
            if n % STEP_CHUNKS == 0 {
                db.apply_batch(std::mem::take(&mut batch)).context("cannot remove key index chunks")?;
            }
        }
        db.apply_batch(batch).context("cannot remove key index chunks")?;
    }
    Ok(())
}

/// The runs of the key index: their metadata in memory, their chunks read on demand.
pub struct Runs {
    /// By run id; ids only grow, so iteration order is oldest first.
    runs: BTreeMap<u64, RunMeta>,
    next_id: u64,
    cache: Mutex<ChunkCache>,
    /// The chunks of the held runs (see [`RunMeta::held`]), by run id.
    held: HashMap<u64, HeldChunks>,
}

impl Runs {
    /// Loads the metadata of every run (from the main database).
    pub fn open(gens: &Generations, zstd: &mut zstd::bulk::Decompressor<'static>) -> Result<Runs> {
        let db = gens.db(0)?;
        let mut pieces: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for kv in db.scan_prefix([keys::RUN_META]) {
            let (k, v) = kv?;
            let id = u64::from_be_bytes(
                k.get(1..9).and_then(|b| b.try_into().ok()).ok_or_else(|| corrupt!("corrupt run key"))?,
            );
            pieces.entry(id).or_default().extend_from_slice(&v);
        }
        let mut runs = BTreeMap::new();
        for (id, frame) in pieces {
            let raw = decompress(zstd, &frame)?;
            let meta: RunMeta = bincode::serde::decode_from_slice(&raw, bincode::config::standard())
                .map_err(|e| corrupt!("corrupt metadata of key index run {id}: {e}"))?
                .0;
            runs.insert(id, meta);
        }
        // Chunks of runs without metadata: a batch, merge or drop a crash interrupted.
        for db in gens.all_dbs() {
            let mut orphans = std::collections::BTreeSet::new();
            for k in db.scan_prefix([keys::RUN_CHUNK]).keys() {
                let k = k?;
                if let Some(id) = k.get(1..9).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes) {
                    if !runs.contains_key(&id) {
                        orphans.insert(id);
                    }
                }
            }
            if !orphans.is_empty() {
                let ids: Vec<u64> = orphans.into_iter().collect();
                tracing::info!(runs = ids.len(), "removing key index chunks an interrupted merge left");
                sweep_chunks(db, &ids)?;
            }
        }
        let next_id = runs.keys().next_back().map_or(1, |id| id + 1);
        Ok(Runs { runs, next_id, cache: Mutex::new((HashMap::new(), VecDeque::new())), held: HashMap::new() })
    }

    /// No runs (before [`Runs::open`]).
    pub fn empty() -> Runs {
        Runs {
            runs: BTreeMap::new(),
            next_id: 1,
            cache: Mutex::new((HashMap::new(), VecDeque::new())),
            held: HashMap::new(),
        }
    }

    /// The held runs (run id, batch sequence) [`Runs::open`] found, whose entries are to be
    /// made again ([`Runs::hold_again`]) before the store reads the key index.
    pub fn to_hold_again(&self) -> Vec<(u64, u64)> {
        self.runs
            .iter()
            .filter_map(|(id, m)| m.held.filter(|_| !self.held.contains_key(id)).map(|seq| (*id, seq)))
            .collect()
    }

    /// Holds run `id` again with `entries` (its batch's key frames, sorted by key).
    pub fn hold_again(&mut self, id: u64, entries: Vec<Entry>) -> Result<()> {
        let meta = self.runs.get(&id).ok_or_else(|| corrupt!("no key index run {id} to hold"))?;
        let seq = meta.held.ok_or_else(|| corrupt!("key index run {id} is not a held one"))?;
        let mut w = RunWriter::held(id, meta.generation, seq, entries.len() as u64);
        for (k, e) in entries {
            if w.add(k, e) {
                w.keep_chunk();
            }
        }
        w.keep_chunk();
        self.held.insert(id, Arc::new(w.held.take().unwrap_or_default()));
        self.runs.insert(id, w.meta);
        Ok(())
    }

    /// How many runs are held in memory.
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Whether a run's chunks are in generation `id`.
    pub fn in_generation(&self, id: u32) -> bool {
        self.runs.values().any(|m| m.generation == id)
    }

    /// How many runs the key index has.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Writes sorted `entries` as a new run of `generation`: its chunks into `chunks` (for
    /// that generation's database), its metadata into `batch` (the main one); returns its
    /// id. The run becomes visible with [`Runs::committed`] once both are applied.
    ///
    /// With `hold: Some(seq)` (the event rows of batch `seq`, which its blocks' key frames
    /// list), the run is held in memory instead: only its metadata is written.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &mut self,
        kind: RunKind,
        generation: u32,
        entries: Vec<Entry>,
        hold: Option<u64>,
        zstd: &mut zstd::bulk::Compressor<'static>,
        chunks: &mut sled::Batch,
        batch: &mut sled::Batch,
    ) -> Result<(u64, PendingRun)> {
        let id = self.next_id;
        self.next_id += 1;
        let mut w = match hold {
            Some(seq) if kind == RunKind::Events => RunWriter::held(id, generation, seq, entries.len() as u64),
            _ => RunWriter::new(id, kind, generation, entries.len() as u64),
        };
        for (k, e) in entries {
            w.push(k, e, zstd, chunks)?;
        }
        let run = w.finish(zstd, chunks, batch)?.ok_or_else(|| corrupt!("an empty key index run"))?;
        Ok((id, run))
    }

    /// Makes a written run visible (after its batch was applied).
    pub fn committed(&mut self, run: PendingRun) {
        if let Some(chunks) = run.held {
            self.held.insert(run.id, Arc::new(chunks));
        }
        self.runs.insert(run.id, run.meta);
    }

    fn chunk(
        &self,
        gens: &Generations,
        zstd: &Mutex<zstd::bulk::Decompressor<'static>>,
        run: u64,
        chunk: u32,
    ) -> Result<Chunk> {
        if let Some(held) = self.held.get(&run) {
            return held
                .get(chunk as usize)
                .cloned()
                .ok_or_else(|| corrupt!("held key index run {run} lacks chunk {chunk}"));
        }
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.0.get(&(run, chunk)) {
                return Ok(c.clone());
            }
        }
        let generation = self.runs.get(&run).map_or(0, |m| m.generation);
        let frame = gens
            .db(generation)?
            .get(chunk_key(run, chunk))?
            .ok_or_else(|| corrupt!("key index run {run} lacks chunk {chunk}"))?;
        let raw = {
            let mut z = zstd.lock().unwrap_or_else(|p| p.into_inner());
            decompress(&mut z, &frame)?
        };
        let entries = Arc::new(ChunkEntries::decode(raw)?);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0.insert((run, chunk), entries.clone()).is_none() {
            cache.1.push_back((run, chunk));
        }
        while cache.1.len() > CHUNK_CACHE {
            if let Some(old) = cache.1.pop_front() {
                cache.0.remove(&old);
            }
        }
        Ok(entries)
    }

    /// The entry of exactly `key`. An event key is in one run only; a FileProfile key may
    /// be in several, and the entry stored by the latest batch (the largest `seq`) is the
    /// current one — not that of the run with the largest id, since a merge gives its run a
    /// new id while newer runs it did not take keep older ones.
    pub fn get(
        &self,
        gens: &Generations,
        zstd: &Mutex<zstd::bulk::Decompressor<'static>>,
        key: &[u8],
    ) -> Result<Option<KeyEntry>> {
        let mut found: Option<KeyEntry> = None;
        let hash = hash2(key);
        for (id, meta) in self.runs.iter().rev() {
            if !meta.may_contain(hash) {
                continue;
            }
            let at = meta.fences.partition_point(|f| f.as_slice() <= key);
            if at == 0 {
                continue;
            }
            let chunk = self.chunk(gens, zstd, *id, (at - 1) as u32)?;
            if let Some(e) = chunk.find(key) {
                if meta.kind == RunKind::Events {
                    return Ok(Some(e));
                }
                if found.is_none_or(|f| e.seq > f.seq) {
                    found = Some(e);
                }
            }
        }
        Ok(found)
    }

    /// Every entry whose key starts with `prefix`, in key order; for a key in several runs
    /// (FileProfile), the latest batch's. `filtered` says whether `prefix` is an item the
    /// filters hold (a (table, SHA1[, DeviceId]) prefix or a whole key): then runs whose
    /// filter says no are skipped; otherwise every run is read.
    pub fn scan_prefix(
        &self,
        gens: &Generations,
        zstd: &Mutex<zstd::bulk::Decompressor<'static>>,
        prefix: &[u8],
        filtered: bool,
    ) -> Result<Vec<Entry>> {
        let mut found: BTreeMap<Vec<u8>, KeyEntry> = BTreeMap::new();
        let hash = hash2(prefix);
        for (id, meta) in &self.runs {
            if filtered && !meta.may_contain(hash) {
                continue;
            }
            for c in meta.chunks_for(prefix) {
                let chunk = self.chunk(gens, zstd, *id, c as u32)?;
                let start = chunk.partition_point(prefix);
                for (k, e) in chunk.iter_from(start).take_while(|(k, _)| k.starts_with(prefix)) {
                    // For a key in several runs (FileProfile), the latest batch's entry.
                    match found.get_mut(k) {
                        Some(f) if f.seq > e.seq => {}
                        Some(f) => *f = e,
                        None => {
                            found.insert(k.to_vec(), e);
                        }
                    }
                }
            }
        }
        Ok(found.into_iter().collect())
    }

    /// Every key of every run (to rebuild the key filter).
    pub fn all_keys(
        &self,
        gens: &Generations,
        zstd: &Mutex<zstd::bulk::Decompressor<'static>>,
        mut f: impl FnMut(&[u8]),
    ) -> Result<()> {
        for (id, meta) in &self.runs {
            if meta.kind != RunKind::Events {
                continue;
            }
            for c in 0..meta.fences.len() {
                for (k, _) in self.chunk(gens, zstd, *id, c as u32)?.iter_from(0) {
                    f(k);
                }
            }
        }
        Ok(())
    }

    /// One step of upkeep, as one atomic batch: drops event runs wholly past `horizon`, or
    /// merges the [`MERGE_FAN_IN`] oldest runs of one kind and size class into one
    /// (leaving out event entries past `horizon`), here and now. Returns whether it did
    /// anything. (The store merges on a thread of its own: [`Runs::start_merge`].)
    #[cfg(test)]
    pub fn maintain(
        &mut self,
        gens: &Generations,
        zstd_c: &mut zstd::bulk::Compressor<'static>,
        zstd_d: &Mutex<zstd::bulk::Decompressor<'static>>,
        horizon: Option<i64>,
    ) -> Result<bool> {
        if self.drop_expired(gens, horizon, &[])? {
            return Ok(true);
        }
        let Some(plan) = self.plan_merge(&[]) else { return Ok(false) };
        let db = gens.db(plan.generation)?;
        let mut z = zstd_d.lock().unwrap_or_else(|p| p.into_inner());
        let merged = plan.run(db, zstd_c, &mut z, horizon, &super::pass_gate::PassGate::default(), None)?;
        drop(z);
        self.finish_merge(gens, plan, merged)?;
        Ok(true)
    }

    /// Drops the event runs wholly past `horizon` (but those in `busy`: a merge is
    /// reading them), as one batch. Returns whether it dropped any.
    pub fn drop_expired(&mut self, gens: &Generations, horizon: Option<i64>, busy: &[u64]) -> Result<bool> {
        let main = gens.db(0)?;
        let expired: Vec<(u64, u32)> = self
            .runs
            .iter()
            .filter(|(id, m)| m.kind == RunKind::Events && horizon.is_some_and(|h| m.max_ts < h) && !busy.contains(id))
            .map(|(id, m)| (*id, m.generation))
            .collect();
        if expired.is_empty() {
            return Ok(false);
        }
        let mut batch = sled::Batch::default();
        for (id, _) in &expired {
            remove_meta(main, *id, &mut batch)?;
        }
        crate::failpoint::hit("runs-drop-before-commit");
        main.apply_batch(batch).context("cannot drop expired key index runs")?;
        let ids: Vec<u64> = expired.iter().map(|(id, _)| *id).collect();
        for id in &ids {
            self.runs.remove(id);
            self.held.remove(id);
        }
        self.forget_cached(&ids);
        // A run in a generation of its own goes with the generation's file; one in the
        // main database is swept now.
        let in_main: Vec<u64> = expired.iter().filter(|(_, g)| *g == 0).map(|(id, _)| *id).collect();
        sweep_chunks(main, &in_main)?;
        Ok(true)
    }

    /// The next merge to do, if any, with the id of the run it will write.
    pub fn plan_merge(&mut self, busy: &[u64]) -> Option<MergePlan> {
        let (kind, generation, ids) = self.merge_candidates(busy)?;
        let inputs = ids
            .iter()
            .map(|id| (*id, self.runs.get(id).map_or(0, |m| m.fences.len() as u32), self.held.get(id).cloned()))
            .collect();
        let expected = ids.iter().filter_map(|id| self.runs.get(id)).map(|m| m.entries).sum();
        let new_id = self.next_id;
        self.next_id += 1;
        Some(MergePlan { kind, generation, new_id, inputs, expected })
    }

    /// Starts `plan` on a thread of its own, which writes the merged run's chunks (nothing
    /// a reader sees) and returns them for [`Runs::finish_merge`] to make visible.
    pub fn start_merge(
        gens: &Generations,
        plan: MergePlan,
        horizon: Option<i64>,
        passes: Arc<super::pass_gate::PassGate>,
    ) -> Result<MergeJob> {
        let db = gens.db(plan.generation)?.clone();
        let data_dir = gens.data_dir().map(Path::to_path_buf);
        let thread_plan = plan.clone();
        let handle = std::thread::Builder::new()
            .name("lookout-merge".into())
            .spawn(move || {
                let mut zstd_c = super::blocks::index_compressor()?;
                let mut zstd_d = super::blocks::decompressor()?;
                thread_plan.run(&db, &mut zstd_c, &mut zstd_d, horizon, &passes, data_dir.as_deref())
            })
            .map_err(|e| StoreError::Invalid(format!("cannot start a thread to merge key index runs: {e}")))?;
        Ok(MergeJob { plan, handle })
    }

    /// Makes a merged run visible and its inputs invisible, in one batch of the main
    /// database, then removes the inputs' chunks.
    pub fn finish_merge(&mut self, gens: &Generations, plan: MergePlan, merged: Merged) -> Result<()> {
        let Merged { pending, mut meta_batch } = merged;
        let ids = plan.ids();
        let prepared = (|| {
            let main = gens.db(0)?;
            for id in &ids {
                remove_meta(main, *id, &mut meta_batch)?;
            }
            crate::failpoint::hit("runs-merge-before-commit");
            #[cfg(test)]
            if tests::FAIL_MERGE_COMMIT.with(|f| f.replace(false)) {
                return Err(StoreError::Invalid("a merge's commit made to fail (test)".into()));
            }
            Ok(main)
        })();
        let main = match prepared {
            Ok(main) => main,
            Err(e) => {
                // Nothing names the merged run's chunks: removed now, not left behind at
                // every try of a merge that keeps failing (or at the next open, if this
                // fails too).
                if let Err(sweep) = self.abandon_merge(gens, &plan) {
                    tracing::warn!(error = %crate::error::Chain(&sweep), "cannot remove a failed merge's chunks now");
                }
                return Err(e);
            }
        };
        // A failure of the commit itself leaves the chunks to the sweep of the next open:
        // what sled holds in memory of a batch it failed to write is not known here.
        main.apply_batch(meta_batch).context("cannot merge key index runs")?;
        for id in &ids {
            self.runs.remove(id);
            self.held.remove(id);
        }
        self.forget_cached(&ids);
        if let Some(p) = pending {
            self.committed(p);
        }
        // The merge is in place. What is left is removing the inputs' chunks, which nothing
        // names any more: if that fails, the next open sweeps them.
        let swept = (|| {
            let db = gens.db(plan.generation)?;
            if plan.generation != 0 {
                // The old chunks are in another database than the metadata that stopped
                // naming them: that metadata must be on disk before they go, or a crash
                // could leave the main database naming runs whose chunks are gone.
                main.flush().context("cannot flush the database to disk")?;
            }
            crate::failpoint::hit("runs-merge-before-sweep");
            sweep_chunks(db, &ids)
        })();
        if let Err(e) = swept {
            tracing::warn!(
                error = %crate::error::Chain(&e),
                "key index runs merged, but their old chunks were not removed; they are when the store next opens"
            );
        }
        Ok(())
    }

    /// Removes what a merge that failed on its thread wrote (chunks of a run that no
    /// metadata names), now rather than at the next open: a merge that keeps failing would
    /// otherwise leave a run's worth of chunks behind at every try.
    pub fn abandon_merge(&self, gens: &Generations, plan: &MergePlan) -> Result<()> {
        sweep_chunks(gens.db(plan.generation)?, &[plan.new_id])
    }

    /// The oldest [`MERGE_FAN_IN`] runs of one kind and generation in the smallest size
    /// class that has that many (size classes grow by the fan-in), if any.
    ///
    /// Runs merge only within their generation: the merged run's chunks stay in the
    /// generation's database, which goes whole once its rows are past the horizon (a run
    /// spanning the whole retention would also hold every expired entry for up to
    /// another retention).
    fn merge_candidates(&self, busy: &[u64]) -> Option<(RunKind, u32, Vec<u64>)> {
        let class = |entries: u64| -> u32 {
            let mut c = 0;
            let mut cap = 4096u64;
            while entries > cap {
                cap *= MERGE_FAN_IN as u64;
                c += 1;
            }
            c
        };
        let mut groups: BTreeMap<(u32, bool, u32), Vec<u64>> = BTreeMap::new();
        for (id, m) in &self.runs {
            // Merging these could make a run over the cap.
            if m.entries > MAX_MERGED_ENTRIES / MERGE_FAN_IN as u64 || busy.contains(id) {
                continue;
            }
            groups.entry((class(m.entries), m.kind == RunKind::Profiles, m.generation)).or_default().push(*id);
        }
        let due =
            groups.into_iter().find(|(_, ids)| ids.len() >= MERGE_FAN_IN).map(|((_, profiles, generation), ids)| {
                (
                    if profiles { RunKind::Profiles } else { RunKind::Events },
                    generation,
                    ids.into_iter().take(MERGE_FAN_IN).collect(),
                )
            });
        due.or_else(|| {
            // Too many held: the oldest ones of one generation are merged (or one written
            // alone), however few, so memory stays bounded where runs come slowly.
            if self.held.len() <= MAX_HELD {
                return None;
            }
            let (_, oldest) = self.runs.iter().find(|(id, m)| m.held.is_some() && !busy.contains(id))?;
            let generation = oldest.generation;
            let ids: Vec<u64> = self
                .runs
                .iter()
                .filter(|(id, m)| m.held.is_some() && m.generation == generation && !busy.contains(id))
                .map(|(id, _)| *id)
                .take(MERGE_FAN_IN)
                .collect();
            Some((RunKind::Events, generation, ids))
        })
    }

    fn forget_cached(&self, ids: &[u64]) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.0.retain(|(run, _), _| !ids.contains(run));
        let keep: VecDeque<(u64, u32)> = cache.1.iter().filter(|(run, _)| !ids.contains(run)).copied().collect();
        cache.1 = keep;
    }
}

/// A merge to do: its inputs (run id, chunk count) and the id of the run it writes.
#[derive(Clone)]
pub struct MergePlan {
    kind: RunKind,
    generation: u32,
    new_id: u64,
    /// Each input run's id, chunk count and, for a held run, its chunks.
    inputs: Vec<(u64, u32, Option<HeldChunks>)>,
    expected: u64,
}

/// A merged run whose chunks are written (and their generation flushed): what
/// [`Runs::finish_merge`] needs to make it visible.
pub struct Merged {
    pending: Option<PendingRun>,
    meta_batch: sled::Batch,
}

/// A merge running on its thread.
pub struct MergeJob {
    plan: MergePlan,
    handle: std::thread::JoinHandle<Result<Merged>>,
}

impl MergeJob {
    /// The runs it reads: not to be dropped or merged elsewhere meanwhile.
    pub fn inputs(&self) -> Vec<u64> {
        self.plan.ids()
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the merge; its plan and result.
    pub fn join(self) -> (MergePlan, Result<Merged>) {
        let result = self
            .handle
            .join()
            .unwrap_or_else(|_| Err(StoreError::Invalid("the thread merging key index runs panicked".into())));
        (self.plan, result)
    }
}

impl MergePlan {
    fn ids(&self) -> Vec<u64> {
        self.inputs.iter().map(|(id, _, _)| *id).collect()
    }

    /// A k-way merge of the sorted input runs, one chunk of each in memory at a time; for
    /// a key in several runs (FileProfile), the latest batch's entry. The new run's
    /// chunks go in bounded batches into the inputs' generation `db`, which is flushed;
    /// the run becomes visible (and the old runs invisible) only with the batch of the main
    /// database that writes its metadata, applied once the chunks are on disk. A crash
    /// before that leaves chunks without metadata, which the next open sweeps away.
    fn run(
        &self,
        db: &sled::Db,
        zstd_c: &mut zstd::bulk::Compressor<'static>,
        zstd_d: &mut zstd::bulk::Decompressor<'static>,
        horizon: Option<i64>,
        passes: &super::pass_gate::PassGate,
        data_dir: Option<&Path>,
    ) -> Result<Merged> {
        let mut cursors: Vec<RunCursor> = self
            .inputs
            .iter()
            .map(|(id, chunks, held)| RunCursor {
                run: *id,
                chunks: *chunks,
                held: held.clone(),
                next_chunk: 0,
                entries: Vec::new(),
                at: 0,
            })
            .collect();
        let mut batch = sled::Batch::default();
        let mut w = RunWriter::new(self.new_id, self.kind, self.generation, self.expected);
        let mut written_chunks = 0;
        let mut chunks_seen = u32::MAX;
        loop {
            // A chunk at a time, the merge steps aside while a detection pass runs.
            if w.chunks != chunks_seen {
                chunks_seen = w.chunks;
                passes.wait_idle(super::pass_gate::MAX_WAIT);
                // sled can wait forever for a write that failed for lack of space, and the
                // store, closing, waits for this thread: the merge is given up instead (its
                // chunks removed, tried again later).
                if let Some(dir) = data_dir.filter(|d| crate::disk::low(d)) {
                    return Err(StoreError::Invalid(format!(
                        "the disk of {} is nearly full: a key index merge is given up for now",
                        dir.display()
                    )));
                }
            }
            for c in cursors.iter_mut() {
                c.peek(db, zstd_d)?;
            }
            // The smallest key (on a tie `<=` picks the newest run; the latest batch's entry
            // of a key in several runs is chosen below).
            let mut newest: Option<usize> = None;
            for (i, c) in cursors.iter().enumerate() {
                if let Some((k, _)) = c.current() {
                    if newest.and_then(|n| cursors[n].current()).is_none_or(|(s, _)| k.as_slice() <= s.as_slice()) {
                        newest = Some(i);
                    }
                }
            }
            let Some(newest) = newest else { break };
            let (key, mut e) = cursors[newest].take();
            // The same key in other runs (FileProfile): the latest batch's entry is kept.
            for (i, c) in cursors.iter_mut().enumerate() {
                if i != newest && c.current().is_some_and(|(k, _)| *k == key) {
                    let (_, other) = c.take();
                    if other.seq > e.seq {
                        e = other;
                    }
                }
            }
            let past = self.kind == RunKind::Events
                && horizon.is_some_and(|h| keys::event_timestamp(&key).is_some_and(|ts| ts < h));
            if !past {
                w.push(key, e, zstd_c, &mut batch)?;
                if w.chunks >= written_chunks + STEP_CHUNKS {
                    written_chunks = w.chunks;
                    db.apply_batch(std::mem::take(&mut batch)).context("cannot write a merged key index run")?;
                }
            }
        }
        let mut meta_batch = sled::Batch::default();
        let pending = w.finish(zstd_c, &mut batch, &mut meta_batch)?;
        db.apply_batch(batch).context("cannot write a merged key index run")?;
        if self.generation != 0 {
            db.flush().with_context(|| format!("cannot flush generation {} to disk", self.generation))?;
        }
        crate::failpoint::hit("runs-merge-chunks-written");
        Ok(Merged { pending, meta_batch })
    }
}

/// Reading one run in key order during a merge, a chunk at a time, past the cache.
struct RunCursor {
    run: u64,
    chunks: u32,
    /// A held run's chunks, read from memory.
    held: Option<HeldChunks>,
    next_chunk: u32,
    entries: Vec<Entry>,
    at: usize,
}

impl RunCursor {
    fn peek(&mut self, db: &sled::Db, zstd: &mut zstd::bulk::Decompressor<'static>) -> Result<Option<&Entry>> {
        while self.at >= self.entries.len() {
            if self.next_chunk >= self.chunks {
                return Ok(None);
            }
            self.entries = match &self.held {
                Some(held) => held
                    .get(self.next_chunk as usize)
                    .ok_or_else(|| corrupt!("held key index run {} lacks chunk {}", self.run, self.next_chunk))?
                    .iter_from(0)
                    .map(|(k, e)| (k.to_vec(), e))
                    .collect(),
                None => {
                    let frame = db
                        .get(chunk_key(self.run, self.next_chunk))?
                        .ok_or_else(|| corrupt!("key index run {} lacks chunk {}", self.run, self.next_chunk))?;
                    decode_entries(&decompress(zstd, &frame)?)?
                }
            };
            self.at = 0;
            self.next_chunk += 1;
        }
        Ok(self.entries.get(self.at))
    }

    /// The entry [`RunCursor::peek`] last showed, without reading further.
    fn current(&self) -> Option<&Entry> {
        self.entries.get(self.at)
    }

    /// Takes the entry [`RunCursor::peek`] showed.
    fn take(&mut self) -> Entry {
        let e = std::mem::take(&mut self.entries[self.at]);
        self.at += 1;
        e
    }
}

/// A run written into a batch that is not applied yet.
pub struct PendingRun {
    id: u64,
    meta: RunMeta,
    held: Option<Vec<Chunk>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pass_gate::PassGate;
    use proptest::prelude::*;

    proptest! {
        /// [`sort_entries`] orders entries as sorting by their whole keys does, whatever
        /// the keys' lengths and shared beginnings (zero bytes and keys of under 48 bytes
        /// included), and keeps every entry once.
        #[test]
        fn entries_sorted_by_their_first_bytes_are_in_whole_key_order(
            keys in proptest::collection::vec(
                proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..70),
                0..80,
            )
        ) {
            let mut entries: Vec<Entry> = keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), KeyEntry { seq: i as u64, ..KeyEntry::default() }))
                .collect();
            let mut want = keys.clone();
            want.sort();
            sort_entries(&mut entries);
            let got: Vec<Vec<u8>> = entries.iter().map(|(k, _)| k.clone()).collect();
            prop_assert_eq!(got, want);
            for (k, e) in &entries {
                prop_assert_eq!(k, &keys[e.seq as usize], "each key with its own entry");
            }
        }
    }

    /// Writes a run into the main database (generation 0), chunks then metadata.
    fn write_run(
        runs: &mut Runs,
        db: &sled::Db,
        z: &mut zstd::bulk::Compressor<'static>,
        kind: RunKind,
        entries: &[Entry],
    ) {
        let (mut chunks, mut batch) = (sled::Batch::default(), sled::Batch::default());
        let (_, pending) = runs.write(kind, 0, entries.to_vec(), None, z, &mut chunks, &mut batch).unwrap();
        db.apply_batch(chunks).unwrap();
        db.apply_batch(batch).unwrap();
        runs.committed(pending);
    }

    /// A held run made again on open with no entries (its batch's blocks all expired,
    /// and the process ended before the run was dropped) has no chunk: a scan of every
    /// run reads it as empty. It read a chunk 0 it does not have, and failed every scan of
    /// a whole table (a detector's backfill) as a damaged store until the run was dropped.
    #[test]
    fn a_held_run_made_again_with_no_entries_scans_as_empty() {
        let (_dir, db, gens, mut z, unz) = store_parts();
        let mut runs = Runs::open(&gens, &mut unz.lock().unwrap()).unwrap();
        let written: Vec<Entry> = (0..50).map(entry).collect();
        write_run(&mut runs, &db, &mut z, RunKind::Events, &written);
        let (mut chunks, mut batch) = (sled::Batch::default(), sled::Batch::default());
        let held: Vec<Entry> = (100..120).map(entry).collect();
        let (_, pending) = runs.write(RunKind::Events, 0, held, Some(7), &mut z, &mut chunks, &mut batch).unwrap();
        db.apply_batch(chunks).unwrap();
        db.apply_batch(batch).unwrap();
        runs.committed(pending);
        let mut reopened = Runs::open(&gens, &mut unz.lock().unwrap()).unwrap();
        let todo = reopened.to_hold_again();
        assert_eq!(todo.len(), 1);
        reopened.hold_again(todo[0].0, Vec::new()).unwrap();
        let prefix = &entry(0).0[..5];
        let found = reopened.scan_prefix(&gens, &unz, prefix, false).unwrap();
        assert_eq!(found.len(), written.len());
    }

    /// A chunk is laid out as `pack_items` lays out (entry, key) items.
    #[test]
    fn chunks_are_packed_items() {
        let entries: Vec<Entry> = (0..5).map(entry).collect();
        let items: Vec<Vec<u8>> = entries.iter().map(|(k, e)| [&e.encode()[..], k].concat()).collect();
        assert_eq!(encode_entries(&entries).unwrap(), super::super::blocks::pack_items(&items));
        let back = decode_entries(&encode_entries(&entries).unwrap()).unwrap();
        assert_eq!(back, entries);
    }

    /// A chunk read for look-ups finds what a search of its decoded entries finds: each
    /// key, the place of keys between and around them, and every entry in order.
    #[test]
    fn chunk_entries_answer_as_the_decoded_entries_do() {
        let entries: Vec<Entry> = (0..40).map(|i| entry(i * 2)).collect();
        let chunk = ChunkEntries::decode(encode_entries(&entries).unwrap()).unwrap();
        let listed: Vec<Entry> = chunk.iter_from(0).map(|(k, e)| (k.to_vec(), e)).collect();
        assert_eq!(listed, entries);
        for i in 0..82 {
            let (key, _) = entry(i);
            let want = entries.binary_search_by(|(k, _)| k.cmp(&key));
            assert_eq!(chunk.find(&key), want.ok().map(|at| entries[at].1), "key {i}");
            assert_eq!(chunk.partition_point(&key), want.unwrap_or_else(|at| at), "key {i}");
        }
        assert_eq!(chunk.partition_point(b""), 0);
        let empty = ChunkEntries::decode(Vec::new()).unwrap();
        assert_eq!((empty.find(b"k"), empty.partition_point(b"k")), (None, 0));
        // An item shorter than an entry is refused, not read past.
        let short = super::super::blocks::pack_items(&[vec![0u8; KeyEntry::LEN - 1]]);
        assert!(ChunkEntries::decode(short).is_err());
    }

    /// A fresh main database in a temporary directory, its generations and zstd contexts.
    #[allow(clippy::type_complexity)]
    fn store_parts() -> (
        tempfile::TempDir,
        sled::Db,
        Generations,
        zstd::bulk::Compressor<'static>,
        Mutex<zstd::bulk::Decompressor<'static>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let gens = Generations::open(dir.path(), &db).unwrap();
        let z = super::super::blocks::index_compressor().unwrap();
        let unz = Mutex::new(super::super::blocks::decompressor().unwrap());
        (dir, db, gens, z, unz)
    }

    /// [`MERGE_FAN_IN`] event runs of `per_run` consecutive entries each (enough for a
    /// merge): run r holds entries r × per_run ..
    fn write_fan_in(runs: &mut Runs, db: &sled::Db, z: &mut zstd::bulk::Compressor<'static>, per_run: u64) {
        for r in 0..MERGE_FAN_IN as u64 {
            let entries: Vec<Entry> = (r * per_run..(r + 1) * per_run).map(entry).collect();
            write_run(runs, db, z, RunKind::Events, &entries);
        }
    }

    /// A store with [`write_fan_in`]'s runs of `per_run` entries, opened, and how many
    /// chunks they have.
    #[allow(clippy::type_complexity)]
    fn fan_in_store(
        per_run: u64,
    ) -> (
        tempfile::TempDir,
        sled::Db,
        Generations,
        zstd::bulk::Compressor<'static>,
        Mutex<zstd::bulk::Decompressor<'static>>,
        Runs,
        usize,
    ) {
        let (dir, db, gens, mut z, unz) = store_parts();
        let mut runs = Runs::open(&gens, &mut unz.lock().unwrap()).unwrap();
        write_fan_in(&mut runs, &db, &mut z, per_run);
        let chunks = db.scan_prefix([keys::RUN_CHUNK]).count();
        (dir, db, gens, z, unz, runs, chunks)
    }

    fn entry(i: u64) -> Entry {
        (keys::event_key(1, &format!("{i:040x}"), "dev", 0, "1"), KeyEntry { seq: i, block: 0, row: 0, content: i })
    }

    /// A merge waits while a detection pass runs, and goes on once it is done.
    #[test]
    fn a_merge_steps_aside_while_a_pass_runs() {
        let (_dir, db, gens, mut z, unz) = store_parts();
        let mut runs = Runs::open(&gens, &mut unz.lock().unwrap()).unwrap();
        write_fan_in(&mut runs, &db, &mut z, 150);
        let plan = runs.plan_merge(&[]).expect("a merge is due");
        let gate = Arc::new(PassGate::default());
        let pass = PassGate::enter(&gate);
        let job = Runs::start_merge(&gens, plan, None, Arc::clone(&gate)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!job.is_finished(), "the merge waits for the pass");
        drop(pass);
        let (plan, merged) = job.join();
        runs.finish_merge(&gens, plan, merged.unwrap()).unwrap();
        assert_eq!(runs.run_count(), 1);
    }

    /// A merge on its own thread: the runs it reads stay visible, and are neither dropped
    /// nor planned into another merge, until it is finished; then only the merged run is
    /// left, with every entry, and the inputs' chunks are gone.
    #[test]
    fn a_merge_on_its_thread_leaves_every_entry_visible_throughout() {
        let (_dir, db, gens, mut z, unz) = store_parts();
        let mut runs = Runs::open(&gens, &mut unz.lock().unwrap()).unwrap();
        let per_run = 150u64;
        write_fan_in(&mut runs, &db, &mut z, per_run);
        let plan = runs.plan_merge(&[]).expect("a merge is due");
        let job = Runs::start_merge(&gens, plan, None, Arc::default()).unwrap();
        let busy = job.inputs();
        assert_eq!(busy.len(), MERGE_FAN_IN);
        // Meanwhile: a batch's run is written, and retention drops every run past it but
        // those being merged.
        let later: Vec<Entry> = (1_000_000..1_000_000 + per_run).map(entry).collect();
        write_run(&mut runs, &db, &mut z, RunKind::Events, &later);
        assert!(runs.plan_merge(&busy).is_none(), "the runs being merged are not planned again");
        assert!(runs.drop_expired(&gens, Some(1), &busy).unwrap(), "the run written meanwhile is dropped");
        assert_eq!(runs.run_count(), MERGE_FAN_IN, "the runs being merged are kept");
        let all = MERGE_FAN_IN as u64 * per_run;
        for i in (0..all).step_by(7) {
            assert_eq!(runs.get(&gens, &unz, &entry(i).0).unwrap(), Some(entry(i).1), "entry {i} during the merge");
        }
        let (plan, merged) = job.join();
        runs.finish_merge(&gens, plan, merged.unwrap()).unwrap();
        assert_eq!(runs.run_count(), 1);
        for i in 0..all {
            assert_eq!(runs.get(&gens, &unz, &entry(i).0).unwrap(), Some(entry(i).1), "entry {i} after the merge");
        }
        assert_eq!(runs.get(&gens, &unz, &later[0].0).unwrap(), None);
        assert_eq!(
            db.scan_prefix([keys::RUN_CHUNK]).count(),
            runs.runs.values().map(|m| m.fences.len()).sum::<usize>(),
            "the inputs' chunks are swept"
        );
        let reopened = Runs::open(&gens, &mut unz.lock().unwrap()).unwrap();
        assert_eq!(reopened.run_count(), 1);
    }

    thread_local! {
        /// The next merge's commit of its metadata fails.
        pub static FAIL_MERGE_COMMIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A merge whose metadata cannot be committed leaves the runs as they were, and the
    /// chunks it wrote are removed at once: a merge that kept failing left a run's worth
    /// of chunks behind at every try, until the next open.
    #[test]
    fn a_merge_whose_commit_fails_leaves_no_chunk_of_its_own() {
        let per_run = 100u64;
        let (_dir, db, gens, _z, unz, mut runs, chunks_before) = fan_in_store(per_run);
        let plan = runs.plan_merge(&[]).unwrap();
        let job = Runs::start_merge(&gens, plan, None, Arc::default()).unwrap();
        let (plan, merged) = job.join();
        assert!(db.scan_prefix([keys::RUN_CHUNK]).count() > chunks_before);
        FAIL_MERGE_COMMIT.with(|f| f.set(true));
        assert!(runs.finish_merge(&gens, plan, merged.unwrap()).is_err());
        assert_eq!(db.scan_prefix([keys::RUN_CHUNK]).count(), chunks_before, "only its own chunks went");
        assert_eq!(runs.run_count(), MERGE_FAN_IN);
        for i in 0..MERGE_FAN_IN as u64 * per_run {
            assert_eq!(runs.get(&gens, &unz, &entry(i).0).unwrap(), Some(entry(i).1), "entry {i}");
        }
    }

    /// A merge on a nearly full disk is given up at its next chunk instead of writing on
    /// (sled can wait forever for a write that failed, and a store closing waits for the
    /// merge): the runs stay as they were.
    #[test]
    fn a_merge_on_a_nearly_full_disk_is_given_up() {
        let (dir, _db, gens, _z, _unz, mut runs, chunks_before) = fan_in_store(150);
        let db = gens.db(0).unwrap();
        crate::disk::LOW_FOR_TESTS.lock().unwrap().push(dir.path().to_path_buf());
        let plan = runs.plan_merge(&[]).unwrap();
        let job = Runs::start_merge(&gens, plan, None, Arc::default()).unwrap();
        let (plan, merged) = job.join();
        crate::disk::LOW_FOR_TESTS.lock().unwrap().retain(|d| d != dir.path());
        let e = merged.err().expect("given up");
        assert!(e.to_string().contains("nearly full"), "{e}");
        runs.abandon_merge(&gens, &plan).unwrap();
        assert_eq!(db.scan_prefix([keys::RUN_CHUNK]).count(), chunks_before);
        assert_eq!(runs.run_count(), MERGE_FAN_IN);
    }

    /// A merge that fails leaves the runs as they were; what one wrote before it was given
    /// up is removed at once, and nothing else is.
    #[test]
    fn a_merge_given_up_leaves_the_runs_as_they_were_and_no_chunk_of_its_own() {
        let per_run = 100u64;
        let (_dir, db, gens, mut z, unz, mut runs, chunks_before) = fan_in_store(per_run);
        // Written in full, then given up (as after a failure on the merge thread).
        let plan = runs.plan_merge(&[]).unwrap();
        plan.run(&db, &mut z, &mut unz.lock().unwrap(), None, &PassGate::default(), None).unwrap();
        assert!(db.scan_prefix([keys::RUN_CHUNK]).count() > chunks_before);
        runs.abandon_merge(&gens, &plan).unwrap();
        assert_eq!(db.scan_prefix([keys::RUN_CHUNK]).count(), chunks_before, "only its own chunks went");
        assert_eq!(runs.run_count(), MERGE_FAN_IN);
        // An input missing a chunk: the merge fails, and every other entry is still found.
        let victim = plan.inputs[3].0;
        db.remove(chunk_key(victim, 0)).unwrap();
        let plan = runs.plan_merge(&[]).unwrap();
        assert!(plan.run(&db, &mut z, &mut unz.lock().unwrap(), None, &PassGate::default(), None).is_err());
        runs.abandon_merge(&gens, &plan).unwrap();
        assert_eq!(db.scan_prefix([keys::RUN_CHUNK]).count(), chunks_before - 1);
        assert_eq!(runs.run_count(), MERGE_FAN_IN);
        for i in (0..MERGE_FAN_IN as u64 * per_run).filter(|i| i / per_run != 3) {
            assert_eq!(runs.get(&gens, &unz, &entry(i).0).unwrap(), Some(entry(i).1), "entry {i}");
        }
    }

    /// A merge writes its run's chunks in several batches and its metadata last; the
    /// chunks of a run whose metadata never came (a crash) are removed on open, and the
    /// runs that were there stay whole.
    #[test]
    fn chunks_without_metadata_are_swept_on_open() {
        let (_dir, db, gens, mut z, unz) = store_parts();
        let mut runs = Runs::open(&gens, &mut unz.lock().unwrap()).unwrap();
        let entries: Vec<Entry> = (0..200).map(entry).collect();
        write_run(&mut runs, &db, &mut z, RunKind::Events, &entries);
        // An interrupted merge's chunks: run 99, no metadata.
        db.insert(chunk_key(99, 0), compress(&mut z, &encode_entries(&entries[..3]).unwrap()).unwrap()).unwrap();
        db.insert(chunk_key(99, 1), compress(&mut z, &encode_entries(&entries[3..6]).unwrap()).unwrap()).unwrap();
        let runs = Runs::open(&gens, &mut unz.lock().unwrap()).unwrap();
        assert_eq!(db.range(chunk_key(99, 0)..chunk_key(100, 0)).count(), 0, "orphan chunks removed");
        assert_eq!(runs.run_count(), 1);
        for (k, e) in &entries {
            assert_eq!(runs.get(&gens, &unz, k).unwrap(), Some(*e));
        }
    }

    /// Merging keeps every entry once, the newest run's for a key in several (profiles).
    #[test]
    fn merges_keep_every_entry_once_and_the_newest_of_a_key() {
        let (_dir, db, gens, mut z, unz) = store_parts();
        let mut runs = Runs::open(&gens, &mut unz.lock().unwrap()).unwrap();
        for r in 0..MERGE_FAN_IN as u64 {
            // Overlapping profile keys: key i is in runs i/100 .. ; newer runs carry seq r.
            let entries: Vec<Entry> = (r * 100..r * 100 + 300)
                .map(|i| (keys::profile_key(&format!("{i:06}")), KeyEntry { seq: r, block: 0, row: 0, content: i }))
                .collect();
            write_run(&mut runs, &db, &mut z, RunKind::Profiles, &entries);
        }
        assert!(runs.maintain(&gens, &mut z, &unz, None).unwrap(), "{MERGE_FAN_IN} small runs are merged");
        assert_eq!(runs.run_count(), 1);
        let all = runs.scan_prefix(&gens, &unz, &[keys::PROFILE], false).unwrap();
        assert_eq!(all.len(), (MERGE_FAN_IN - 1) * 100 + 300);
        for (k, e) in all {
            let i: u64 = String::from_utf8_lossy(&k[1..]).parse().unwrap();
            assert_eq!(e.seq, (i / 100).min(MERGE_FAN_IN as u64 - 1), "key {i}: the newest run's entry");
        }
        let reopened = Runs::open(&gens, &mut unz.lock().unwrap()).unwrap();
        assert_eq!(reopened.run_count(), 1);
        assert_eq!(
            db.scan_prefix([keys::RUN_CHUNK]).count(),
            reopened.runs.values().map(|m| m.fences.len()).sum::<usize>()
        );
    }

    /// A merge of the oldest profile runs gets the newest id, but runs it did not take can
    /// hold later versions of its keys: the latest batch's entry still wins.
    #[test]
    fn a_merged_run_does_not_hide_a_later_profile_in_a_run_it_left_out() {
        let (_dir, db, gens, mut z, unz) = store_parts();
        let mut runs = Runs::open(&gens, &mut unz.lock().unwrap()).unwrap();
        let key = keys::profile_key("aa");
        let write = |runs: &mut Runs, z: &mut zstd::bulk::Compressor<'static>, seqs: std::ops::Range<u64>| {
            for seq in seqs {
                let entries: Vec<Entry> = vec![(key.clone(), KeyEntry { seq, block: 0, row: 0, content: seq })];
                write_run(runs, &db, z, RunKind::Profiles, &entries);
            }
        };
        write(&mut runs, &mut z, 0..MERGE_FAN_IN as u64 + 2);
        assert!(runs.maintain(&gens, &mut z, &unz, None).unwrap());
        assert_eq!(runs.run_count(), 3, "the oldest MERGE_FAN_IN merged, two left out");
        let latest = MERGE_FAN_IN as u64 + 1;
        assert_eq!(runs.get(&gens, &unz, &key).unwrap().map(|e| e.seq), Some(latest));
        let scanned = runs.scan_prefix(&gens, &unz, &key, true).unwrap();
        assert_eq!(scanned.iter().map(|(_, e)| e.seq).collect::<Vec<_>>(), vec![latest]);
        // MERGE_FAN_IN of the smallest class again, the merged one and the two left out
        // among them.
        let end = latest + 1 + MERGE_FAN_IN as u64 - 3;
        write(&mut runs, &mut z, latest + 1..end);
        while runs.maintain(&gens, &mut z, &unz, None).unwrap() {}
        assert_eq!(runs.run_count(), 1);
        assert_eq!(runs.get(&gens, &unz, &key).unwrap().map(|e| e.seq), Some(end - 1));
    }
}
