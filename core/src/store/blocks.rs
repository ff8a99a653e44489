//! Rows in ingest order, compressed. The new rows of one table in one batch go into
//! blocks of at most [`BLOCK_ROWS`] rows or about [`BLOCK_RAW`] bytes; each block is two
//! zstd frames — the rows' keys, and the rows' stored values. An event block's frames are
//! appended to its generation's block file ([`super::generations`]), where its directory
//! entry says; FileProfile's and those of rows from ahead of the clock ([`in_main`]) go
//! into the main database, each cut into pieces of at most [`PIECE_BYTES`] under keys that
//! only grow (table, batch sequence, block, part).
//!
//! Why: a row stored as its own ~860-byte value at a random key costs a random descent
//! and page rewrites per row in a tree many times the cache, and takes more disk than the
//! JSON it came from; rows appended in blocks cost a few sequential inserts per hundred
//! rows, and zstd shrinks a block of Defender rows to a few percent. Why pieces: sled
//! writes a node holding a value over ~128 KiB as a separate blob file, rewritten whole
//! and not fsynced; pieces of a few KiB stay in its pages. Why keys apart from values:
//! "which rows are new since batch N" (a detector's pass) reads only the keys.
//!
//! A row is found from its key through the key index (`e` entries: key → [`Locator`]).

use super::block_filter::Sha1Filter;
use super::dictionaries::{NewDictionary, RowCompression};
use super::keys;
use crate::error::{StoreContext as _, StoreError};
type Result<T, E = StoreError> = std::result::Result<T, E>;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// Rows per block at most.
pub const BLOCK_ROWS: usize = 512;
/// Raw bytes (encoded rows) per block, about.
pub const BLOCK_RAW: usize = 96 << 10;
/// Room past [`BLOCK_RAW`] for the row that fills a block (most rows are a few KiB).
const BLOCK_SLACK: usize = 8 << 10;
/// A stored piece is never bigger than this, far below sled's blob threshold.
pub const PIECE_BYTES: usize = 6 << 10;
/// zstd level: level 1 already shrinks Defender rows to a few percent at the highest speed.
const ZSTD_LEVEL: i32 = 1;
/// zstd level of the index's items in sled.
const INDEX_ZSTD_LEVEL: i32 = 1;
/// A frame never claims more than this when decompressed (a corrupt length must not
/// make the reader allocate gigabytes).
const MAX_RAW: usize = 64 << 20;

/// Where a row is: its batch, its block in the batch (per table), its place in the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Locator {
    pub table: u16,
    pub seq: u64,
    pub block: u16,
    pub row: u16,
}

/// The value of a key-index entry: where the row is and a hash of its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyEntry {
    pub seq: u64,
    pub block: u16,
    pub row: u16,
    pub content: u64,
}

impl KeyEntry {
    pub const LEN: usize = 20;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.seq.to_be_bytes());
        b[8..10].copy_from_slice(&self.block.to_be_bytes());
        b[10..12].copy_from_slice(&self.row.to_be_bytes());
        b[12..].copy_from_slice(&self.content.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<KeyEntry> {
        if b.len() != Self::LEN {
            return Err(corrupt!("corrupt key index entry ({} bytes, expected {})", b.len(), Self::LEN));
        }
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[..8]);
        let mut content = [0u8; 8];
        content.copy_from_slice(&b[12..]);
        Ok(KeyEntry {
            seq: u64::from_be_bytes(seq),
            block: u16_at(8),
            row: u16_at(10),
            content: u64::from_be_bytes(content),
        })
    }

    pub fn locator(&self, table: u16) -> Locator {
        Locator { table, seq: self.seq, block: self.block, row: self.row }
    }
}

/// What the store keeps about a block (`D` entries), enough to drop it when every row
/// in it is past the retention horizon, and to count its rows without reading it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockMeta {
    pub rows: u32,
    pub min_ts: i64,
    pub max_ts: i64,
    pub key_parts: u16,
    pub row_parts: u16,
    /// Compressed bytes of both frames.
    pub bytes: u64,
    /// Where the frames are in the generation's block file (`None`: in pieces in the
    /// main database).
    pub file: Option<FileSpan>,
}

/// A block's two frames in its generation's block file: the keys' frame at `offset`,
/// the rows' right after it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FileSpan {
    pub offset: u64,
    pub keys_len: u32,
    pub rows_len: u32,
}

impl FileSpan {
    /// (offset, length) of the keys' or the rows' frame.
    pub fn frame(&self, space: u8) -> (u64, u32) {
        if space == keys::BLOCK_KEYS {
            (self.offset, self.keys_len)
        } else {
            // Saturating: a damaged entry's sum lands past the file's end, where the read
            // refuses it as damaged (a wrapped one could land inside the file).
            (self.offset.saturating_add(u64::from(self.keys_len)), self.rows_len)
        }
    }
}

/// The frames of a batch's event blocks, for its generation's block file: appended to
/// `frames`, which goes into the file at `base`.
pub struct FileAppend {
    pub base: u64,
    pub frames: Vec<u8>,
}

impl FileAppend {
    /// The file's length once the frames are in.
    pub fn end(&self) -> u64 {
        self.base + self.frames.len() as u64
    }
}

/// A block's directory entry: its meta, and the filter of its rows' SHA1 values when it
/// has one (see [`super::block_filter`]).
pub fn decode_meta(value: &[u8]) -> Result<(BlockMeta, Option<Sha1Filter>)> {
    let (meta, len): (BlockMeta, usize) = bincode::serde::decode_from_slice(value, bincode::config::standard())
        .map_err(|e| corrupt!("corrupt block directory entry: {e}"))?;
    Ok((meta, Sha1Filter::after_meta(value, len)))
}

/// Block numbers from here on hold event rows stamped further ahead of the store clock
/// than a generation spans: their pieces are in the main database, not their batch's
/// generation, so that such a row (a device with a wrong clock) does not keep a whole
/// generation until its time is past the horizon (see [`super::generations`]).
pub const AHEAD_BLOCK: u16 = 0x8000;

/// Whether a block's pieces are in the main database: FileProfile's (table 0), and
/// blocks of rows from ahead of the clock.
pub fn in_main(table: u16, block: u16) -> bool {
    table == 0 || block >= AHEAD_BLOCK
}

/// A block being filled: its keys and rows already laid out as [`pack_items`] lays them
/// out, so a row is copied once on its way in and not again before compression.
#[derive(Default)]
struct OpenBlock {
    keys: Vec<u8>,
    rows: Vec<u8>,
    /// Where each row lies in `rows`, as [`item_spans`] would find it: kept as rows are
    /// added, so writing the block (its pages, the block cache) does not scan it again.
    row_spans: Vec<(u32, u32)>,
    count: usize,
    raw: usize,
    min_ts: i64,
    max_ts: i64,
}

impl OpenBlock {
    /// Appends an item made of `parts` and says where its bytes lie (after its length).
    fn push_item(into: &mut Vec<u8>, parts: &[&[u8]]) -> (u32, u32) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        into.extend_from_slice(&(len as u32).to_be_bytes());
        let start = into.len() as u32;
        for part in parts {
            into.extend_from_slice(part);
        }
        (start, into.len() as u32)
    }
}

/// A block's rows before compression ([`pack_items`]'s layout), by (table, seq, block).
pub type RawBlock = ((u16, u64, u16), PackedItems);

/// The new rows of one batch, per table (and whether they are from ahead of the clock),
/// in blocks.
#[derive(Default)]
pub struct BatchBlocks {
    tables: BTreeMap<(u16, bool), Vec<OpenBlock>>,
}

impl BatchBlocks {
    /// Adds a row (its key and content hash go into the block's key frame: see
    /// [`frame_keys`]) and says where it will be once the batch commits under `seq`;
    /// `ahead` puts it among the blocks numbered from [`AHEAD_BLOCK`].
    pub fn add(
        &mut self,
        table: u16,
        key: &[u8],
        content: u64,
        timestamp: i64,
        value: &[&[u8]],
        ahead: bool,
    ) -> Result<(u16, u16)> {
        let blocks = self.tables.entry((table, ahead)).or_default();
        let full = blocks.last().is_none_or(|b| b.count >= BLOCK_ROWS || b.raw >= BLOCK_RAW);
        if full {
            if blocks.len() >= AHEAD_BLOCK as usize {
                return Err(StoreError::Invalid("too many rows in one batch".into()));
            }
            // Sized for a full block at once: grown by doubling, a block's rows were copied
            // about as many times again as they are long (a sixth of adding a row).
            blocks.push(OpenBlock {
                rows: Vec::with_capacity(BLOCK_RAW + BLOCK_SLACK),
                min_ts: timestamp,
                max_ts: timestamp,
                ..OpenBlock::default()
            });
        }
        let block_no = (blocks.len() - 1) as u16 + if ahead { AHEAD_BLOCK } else { 0 };
        let b = blocks.last_mut().ok_or_else(|| corrupt!("no open block"))?;
        let row_no = b.count as u16;
        b.raw += key.len() + value.iter().map(|p| p.len()).sum::<usize>();
        b.min_ts = b.min_ts.min(timestamp);
        b.max_ts = b.max_ts.max(timestamp);
        OpenBlock::push_item(&mut b.keys, &[key, &content.to_be_bytes()]);
        let span = OpenBlock::push_item(&mut b.rows, value);
        b.row_spans.push(span);
        b.count += 1;
        Ok((block_no, row_no))
    }

    /// Writes every block of the batch under sequence `seq`: the event blocks' frames into
    /// `file` (for the batch's generation's block file), the pieces of those [`in_main`]
    /// and every directory entry into `batch` (the main database). Returns the earliest newest Timestamp of its event
    /// blocks (table 0, FileProfile, is exempt from retention), and each block's rows as
    /// they were before compression, by (table, seq, block): once the batch is committed
    /// they go into the block cache, so a pass right after (the daemon's) reads the rows
    /// it was just handed without reading and decompressing their blocks again.
    ///
    /// The rows' frames are pages ([`super::pages`]) compressed by `rows`, which may train
    /// a table's dictionary on them first: those trained are returned too.
    pub fn write(
        self,
        seq: u64,
        zstd: &mut zstd::bulk::Compressor<'static>,
        rows: &mut RowCompression,
        file: &mut FileAppend,
        batch: &mut sled::Batch,
    ) -> Result<Written> {
        let mut earliest_end: Option<i64> = None;
        let mut raw_rows = Vec::new();
        let mut dictionaries = Vec::new();
        rows.start_batch();
        for ((table, ahead), blocks) in self.tables {
            let raws: Vec<&[u8]> = blocks.iter().map(|b| &b.rows[..]).collect();
            dictionaries.extend(rows.prepare(table, &raws, batch)?);
            for (no, b) in blocks.into_iter().enumerate() {
                let block = no as u16 + if ahead { AHEAD_BLOCK } else { 0 };
                let keys_frame = compress(zstd, &b.keys)?;
                let items = PackedItems { raw: b.rows, spans: b.row_spans };
                let rows_frame = rows.compress(table, &items)?;
                let keys: Vec<&[u8]> = frame_keys(&b.keys)?.into_iter().map(|(k, _)| k).collect();
                let (key_parts, row_parts, at) = if in_main(table, block) {
                    let key_parts = write_pieces(batch, keys::BLOCK_KEYS, table, seq, block, &keys_frame)?;
                    let row_parts = write_pieces(batch, keys::BLOCK_ROWS, table, seq, block, &rows_frame)?;
                    (key_parts, row_parts, None)
                } else {
                    let too_big = || StoreError::Invalid("a block too large to store".into());
                    let span = FileSpan {
                        offset: file.base + file.frames.len() as u64,
                        keys_len: u32::try_from(keys_frame.len()).map_err(|_| too_big())?,
                        rows_len: u32::try_from(rows_frame.len()).map_err(|_| too_big())?,
                    };
                    file.frames.extend_from_slice(&keys_frame);
                    file.frames.extend_from_slice(&rows_frame);
                    (0, 0, Some(span))
                };
                let meta = BlockMeta {
                    rows: b.count as u32,
                    min_ts: b.min_ts,
                    max_ts: b.max_ts,
                    key_parts,
                    row_parts,
                    bytes: (keys_frame.len() + rows_frame.len()) as u64,
                    file: at,
                };
                let mut value = super::enc(&meta)?;
                if table != 0 {
                    if let Some(filter) = Sha1Filter::of_keys(&keys) {
                        filter.append_to(&mut value);
                    }
                }
                batch.insert(keys::block_key(keys::BLOCK_META, table, seq, block, 0), value);
                if table != 0 {
                    earliest_end = Some(earliest_end.map_or(meta.max_ts, |e| e.min(meta.max_ts)));
                }
                raw_rows.push(((table, seq, block), items));
            }
        }
        Ok(Written { earliest_end, raw_rows, dictionaries })
    }
}

/// What [`BatchBlocks::write`] hands back for after the commit.
pub struct Written {
    /// The earliest newest Timestamp of the batch's event blocks (table 0, FileProfile,
    /// is exempt from retention).
    pub earliest_end: Option<i64>,
    /// Each block's rows as they were before compression.
    pub raw_rows: Vec<RawBlock>,
    /// The dictionaries trained on the batch's rows.
    pub dictionaries: Vec<NewDictionary>,
}

/// Byte strings as one: for each, its length (u32, big-endian) and its bytes. (bincode's
/// serde path reads a `Vec<u8>` a byte at a time; this is a copy per item.)
pub fn pack_items<T: AsRef<[u8]>>(items: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.iter().map(|i| i.as_ref().len() + 4).sum());
    for item in items {
        let item = item.as_ref();
        out.extend_from_slice(&(item.len() as u32).to_be_bytes());
        out.extend_from_slice(item);
    }
    out
}

/// The byte strings of [`pack_items`], borrowed.
pub fn unpack_items(raw: &[u8]) -> Result<Vec<&[u8]>> {
    Ok(item_spans(raw)?.into_iter().map(|(start, end)| &raw[start as usize..end as usize]).collect())
}

/// The rows of a key frame (decompressed), in block order: each row's key and its content
/// hash, which the frame keeps after the key so that a batch's key-index run can be made
/// again from its blocks' key frames alone (see `runs`: a batch's own run is held in
/// memory, not written).
pub fn frame_keys(raw: &[u8]) -> Result<Vec<(&[u8], u64)>> {
    item_spans(raw)?
        .into_iter()
        .map(|(start, end)| {
            let item = &raw[start as usize..end as usize];
            let (key, content) = item
                .split_last_chunk::<8>()
                .ok_or_else(|| corrupt!("corrupt block: a key frame's item is shorter than its content hash"))?;
            Ok((key, u64::from_be_bytes(*content)))
        })
        .collect()
}

/// Where each item of [`pack_items`] lies in `raw`: (start, end).
pub(super) fn item_spans(raw: &[u8]) -> Result<Vec<(u32, u32)>> {
    let mut spans = Vec::new();
    let mut at = 0usize;
    while at < raw.len() {
        let len = raw.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let end = len.and_then(|len| at.checked_add(4)?.checked_add(len)).filter(|end| *end <= raw.len());
        let Some(end) = end else { return Err(corrupt!("corrupt block: an item runs past its end")) };
        spans.push(((at + 4) as u32, end as u32));
        at = end;
    }
    Ok(spans)
}

/// A frame: the raw length (u32, big-endian), then `raw` ([`pack_items`]'s layout)
/// compressed.
fn compress(zstd: &mut zstd::bulk::Compressor<'static>, raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len() / 8 + 16);
    out.extend_from_slice(&(raw.len() as u32).to_be_bytes());
    out.extend_from_slice(&zstd.compress(raw).context("cannot compress a block")?);
    Ok(out)
}

fn write_pieces(batch: &mut sled::Batch, space: u8, table: u16, seq: u64, block: u16, frame: &[u8]) -> Result<u16> {
    let mut parts = 0u16;
    for piece in frame.chunks(PIECE_BYTES) {
        batch.insert(keys::block_key(space, table, seq, block, parts), piece);
        parts = parts.checked_add(1).ok_or_else(|| StoreError::Invalid("a block too large to store".into()))?;
    }
    Ok(parts)
}

/// A block's frame as stored in its pieces in the main database (still compressed).
pub fn read_pieces(db: &sled::Db, space: u8, table: u16, seq: u64, block: u16) -> Result<Vec<u8>> {
    let prefix = keys::block_key(space, table, seq, block, 0);
    let prefix = &prefix[..prefix.len() - 2];
    let mut frame = Vec::new();
    for kv in db.scan_prefix(prefix) {
        frame.extend_from_slice(&kv?.1);
    }
    if frame.is_empty() {
        return Err(corrupt!("block {table}/{seq}/{block} is referred to but has no pieces"));
    }
    Ok(frame)
}

/// A frame ([`compress`]'s layout) decompressed.
pub fn decompress(zstd: &mut zstd::bulk::Decompressor<'static>, frame: &[u8]) -> Result<Vec<u8>> {
    if frame.len() < 4 {
        return Err(corrupt!("the block is missing or corrupt"));
    }
    let raw_len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    if raw_len > MAX_RAW {
        return Err(corrupt!("the block claims {raw_len} bytes: corrupt"));
    }
    let mut out = Vec::with_capacity(raw_len);
    let n = zstd.decompress_to_buffer(&frame[4..], &mut out).context("the block is corrupt")?;
    if n != raw_len {
        return Err(corrupt!("the block holds {n} bytes, not the {raw_len} it claims: corrupt"));
    }
    Ok(out)
}

/// A zstd context for what the index keeps in sled (key-index chunks, column-index
/// entries): no frame checksum, since sled's pages carry their own.
pub fn index_compressor() -> Result<zstd::bulk::Compressor<'static>> {
    zstd::bulk::Compressor::new(INDEX_ZSTD_LEVEL).context("cannot set up zstd")
}

/// The zstd contexts, reused across blocks (a context costs an allocation of its
/// window on every use otherwise).
pub fn compressor() -> Result<zstd::bulk::Compressor<'static>> {
    let mut z = zstd::bulk::Compressor::new(ZSTD_LEVEL).context("cannot set up zstd")?;
    // A frame read back from a plain file has no checksum of sled's around it: zstd's own
    // says a damaged one is corrupt instead of handing back wrong rows.
    z.include_checksum(true).context("cannot set up zstd")?;
    Ok(z)
}

pub fn decompressor() -> Result<zstd::bulk::Decompressor<'static>> {
    zstd::bulk::Decompressor::new().context("cannot set up zstd")
}

/// A block's rows (stored values), decompressed and shared.
pub type BlockRows = Arc<PackedItems>;

/// A decompressed frame kept as it came out of zstd, with where each item lies: one
/// allocation per block, and no copy of each row, instead of a `Vec` per row.
pub struct PackedItems {
    raw: Vec<u8>,
    /// (start, end) of each item in `raw`.
    spans: Vec<(u32, u32)>,
}

impl PackedItems {
    /// Items of a frame packed by [`pack_items`].
    pub fn new(raw: Vec<u8>) -> Result<PackedItems> {
        let spans = item_spans(&raw)?;
        Ok(PackedItems { raw, spans })
    }

    /// The frame as it came out of zstd (or as a batch packed it).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// (start, end) of each item in [`Self::raw`].
    pub fn spans(&self) -> &[(u32, u32)] {
        &self.spans
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let &(start, end) = self.spans.get(i)?;
        Some(&self.raw[start as usize..end as usize])
    }
}

impl std::ops::Index<usize> for PackedItems {
    type Output = [u8];

    fn index(&self, i: usize) -> &[u8] {
        let (start, end) = self.spans[i];
        &self.raw[start as usize..end as usize]
    }
}

/// Decoded rows kept for reads, by block: each block's pages decoded so far (a block a
/// commit wrote is one page of all its rows). Bounded by blocks, oldest put out first.
pub struct BlockCache {
    capacity: usize,
    blocks: HashMap<(u16, u64, u16), Vec<(u16, BlockRows)>>,
    order: VecDeque<(u16, u64, u16)>,
}

impl BlockCache {
    pub fn new(capacity: usize) -> BlockCache {
        BlockCache { capacity, blocks: HashMap::new(), order: VecDeque::new() }
    }

    /// The decoded page holding block row `row`, and the row's index in it.
    pub fn row(&self, id: &(u16, u64, u16), row: u16) -> Option<(BlockRows, usize)> {
        let pages = self.blocks.get(id)?;
        let after = pages.partition_point(|(first, _)| *first <= row);
        let (first, rows) = pages.get(after.checked_sub(1)?)?;
        let i = (row - first) as usize;
        (i < rows.len()).then(|| (rows.clone(), i))
    }

    /// A block's rows from block row `first` on (all of them: `first` 0 and every row).
    pub fn put(&mut self, id: (u16, u64, u16), first: u16, rows: BlockRows) {
        let pages = self.blocks.entry(id).or_insert_with(|| {
            self.order.push_back(id);
            Vec::new()
        });
        match pages.binary_search_by_key(&first, |(f, _)| *f) {
            Ok(i) => pages[i].1 = rows,
            Err(i) => pages.insert(i, (first, rows)),
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.blocks.remove(&old);
            }
        }
    }

    pub fn forget(&mut self, id: &(u16, u64, u16)) {
        if self.blocks.remove(id).is_some() {
            self.order.retain(|x| x != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_entry_round_trips() {
        let e = KeyEntry { seq: 7, block: 3, row: 511, content: u64::MAX - 5 };
        assert_eq!(KeyEntry::decode(&e.encode()).unwrap(), e);
        assert!(KeyEntry::decode(&[1, 2, 3]).is_err());
    }

    #[test]
    fn packed_items_are_the_items_packed_and_a_cut_frame_is_refused() {
        let items: Vec<Vec<u8>> = vec![b"first".to_vec(), Vec::new(), vec![7; 300]];
        let packed = PackedItems::new(pack_items(&items)).unwrap();
        assert_eq!(packed.len(), 3);
        for (i, item) in items.iter().enumerate() {
            assert_eq!(&packed[i], item.as_slice());
        }
        let raw = pack_items(&items);
        assert!(PackedItems::new(raw[..raw.len() - 1].to_vec()).is_err(), "last item cut");
        assert!(PackedItems::new(vec![0, 0]).is_err(), "a length cut");
        assert!(PackedItems::new(Vec::new()).unwrap().is_empty());
    }

    #[test]
    fn blocks_fill_by_rows_and_bytes_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let mut bb = BatchBlocks::default();
        let mut places = Vec::new();
        for i in 0..(BLOCK_ROWS + 10) {
            // A value in two parts (a header and a body) is stored as one.
            let value = [(i % 251) as u8; 100];
            places.push(
                bb.add(1, format!("k{i}").as_bytes(), 7000 + i as u64, i as i64, &[&value[..30], &value[30..]], false)
                    .unwrap(),
            );
        }
        // Incompressible big rows in another table cut blocks by bytes.
        let mut seed = 1u64;
        for _ in 0..5 {
            let big: Vec<u8> = (0..40_000)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            bb.add(2, b"big", 1, 0, &[&big], false).unwrap();
        }
        assert_eq!(places[BLOCK_ROWS - 1], (0, (BLOCK_ROWS - 1) as u16));
        assert_eq!(places[BLOCK_ROWS], (1, 0));
        // FileProfile's rows (table 0) go into the main database in pieces.
        bb.add(0, b"profile", 2, 0, &[&[5u8; 20_000][..]], false).unwrap();
        let mut batch = sled::Batch::default();
        let mut file = FileAppend { base: 1000, frames: Vec::new() };
        let (mut rows_zstd, mut decoders) = RowCompression::load(&db).unwrap();
        let written = bb.write(9, &mut compressor().unwrap(), &mut rows_zstd, &mut file, &mut batch).unwrap();
        let raw_rows = written.raw_rows;
        assert!(written.dictionaries.is_empty(), "one is trained on a thread of its own, for a later batch");
        let ids: Vec<(u16, u64, u16)> = raw_rows.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [(0, 9, 0), (1, 9, 0), (1, 9, 1), (2, 9, 0), (2, 9, 1)]);
        let cached = &raw_rows[2].1;
        assert_eq!(cached.spans(), PackedItems::new(cached.raw().to_vec()).unwrap().spans(), "spans kept as added");
        assert_eq!(&cached[3], &[((BLOCK_ROWS + 3) % 251) as u8; 100][..], "the rows as they will read back");
        db.apply_batch(batch).unwrap();
        for kv in db.iter() {
            assert!(kv.unwrap().1.len() <= PIECE_BYTES, "every stored piece is small");
        }
        // The event blocks' frames, one after the other from the file's base.
        let meta = |table: u16, block: u16| {
            decode_meta(&db.get(keys::block_key(keys::BLOCK_META, table, 9, block, 0)).unwrap().unwrap()).unwrap().0
        };
        let mut z = decompressor().unwrap();
        let mut read = |z: &mut zstd::bulk::Decompressor<'static>, table: u16, block: u16, space: u8| {
            let (offset, len) = meta(table, block).file.expect("an event block is in the file").frame(space);
            let at = (offset - file.base) as usize;
            let frame = &file.frames[at..at + len as usize];
            if space == keys::BLOCK_KEYS {
                return decompress(z, frame).unwrap();
            }
            let dir = super::super::pages::Directory::parse(frame).unwrap();
            let mut out = Vec::new();
            super::super::pages::all_into(frame, &dir, &mut out, |p, into| {
                decoders.page(table, dir.dictionary, p, into)
            })
            .unwrap();
            out
        };
        assert_eq!(meta(1, 0).file.unwrap().offset, 1000);
        let rows = read(&mut z, 1, 1, keys::BLOCK_ROWS);
        let rows = unpack_items(&rows).unwrap();
        assert_eq!(rows.len(), 10);
        assert_eq!(rows[3], vec![((BLOCK_ROWS + 3) % 251) as u8; 100]);
        let keys_back = read(&mut z, 1, 0, keys::BLOCK_KEYS);
        assert_eq!(frame_keys(&keys_back).unwrap()[5], (&b"k5"[..], 7005), "each key with its content hash");
        let big = read(&mut z, 2, 1, keys::BLOCK_ROWS);
        let big = unpack_items(&big).unwrap();
        assert_eq!((big.len(), big[0].len()), (2, 40_000), "three 40 KB rows fill a block, two are left");
        let last = meta(2, 1).file.unwrap();
        assert_eq!(last.offset + u64::from(last.keys_len + last.rows_len), 1000 + file.frames.len() as u64);
        // FileProfile's block: pieces, no place in the file.
        assert_eq!(meta(0, 0).file, None);
        let profile = read_pieces(&db, keys::BLOCK_ROWS, 0, 9, 0).unwrap();
        let dir = super::super::pages::Directory::parse(&profile).unwrap();
        let mut decoders = RowCompression::load(&db).unwrap().1;
        let mut raw = Vec::new();
        super::super::pages::all_into(&profile, &dir, &mut raw, |p, into| decoders.page(0, 0, p, into)).unwrap();
        assert_eq!(unpack_items(&raw).unwrap()[0], &[5u8; 20_000][..]);
        assert!(read_pieces(&db, keys::BLOCK_ROWS, 0, 10, 0).is_err(), "a missing block is an error");
        // A damaged frame is refused, not read as other rows.
        let (offset, len) = meta(1, 0).file.unwrap().frame(keys::BLOCK_KEYS);
        let mut damaged = file.frames[(offset - 1000) as usize..][..len as usize].to_vec();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0x40;
        assert!(decompress(&mut z, &damaged).is_err(), "zstd's checksum catches a flipped bit");
        // So does each page's, in a rows frame.
        let (offset, len) = meta(1, 0).file.unwrap().frame(keys::BLOCK_ROWS);
        let mut damaged = file.frames[(offset - 1000) as usize..][..len as usize].to_vec();
        let dir = super::super::pages::Directory::parse(&damaged).unwrap();
        let page = dir.pages[0];
        damaged[page.at + page.len / 2] ^= 0x40;
        let mut out = Vec::new();
        let read_damaged = super::super::pages::all_into(&damaged, &dir, &mut out, |p, into| {
            decoders.page(1, dir.dictionary, p, into)
        });
        assert!(read_damaged.is_err(), "a flipped bit in a page is caught");
    }
}
