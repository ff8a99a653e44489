//! Per-table zstd dictionaries for rows' pages ([`super::pages`]): sampled from a table's
//! rows once it has grown enough, trained on a thread of their own, kept in the main
//! database, and the compressor and decompressors made from them.
//!
//! Why: rows of one table repeat their column layout, device names, folder paths and
//! hashes from block to block. An 8 KiB page compressed alone loses most of that; with a
//! dictionary trained on the table's own rows it compresses better than a whole block did
//! without one (BENCHMARKS.md), so a read of a few rows decodes a twelfth of the bytes.
//!
//! Crash safety: a dictionary is written into the main batch of every batch that uses it
//! until one such batch has committed, so no committed block refers to a dictionary that
//! is not on disk. Dictionaries are never removed: one per table, at most 32 KiB.

use super::blocks::PackedItems;
use super::{keys, Result, StoreError};
use crate::error::StoreContext as _;
use std::collections::HashMap;

/// A table's rows are sampled for a dictionary once this many bytes of them have been
/// stored in this process (samples are not kept across restarts): training takes 15–40
/// ms of CPU, worth it for a table that grows, not for each of a Kafka node's partition
/// stores that only ever holds a few thousand rows of it.
#[cfg(not(test))]
const TRAIN_AFTER: usize = 16 << 20;
/// A table's dictionary is trained once this many bytes of its rows have been sampled,
/// on its own thread...
#[cfg(not(test))]
const SAMPLE_MIN: usize = 256 << 10;
/// ...from at most this many.
#[cfg(not(test))]
const SAMPLE_MAX: usize = 512 << 10;
/// The largest dictionary trained.
#[cfg(not(test))]
const DICTIONARY_MAX: usize = 32 << 10;
// Small enough in tests that the store's tests of a few dozen rows read and write pages
// with dictionaries too (across reopens, failed batches and retention).
#[cfg(test)]
const TRAIN_AFTER: usize = 1;
#[cfg(test)]
const SAMPLE_MIN: usize = 1 << 10;
#[cfg(test)]
const SAMPLE_MAX: usize = 2 << 10;
#[cfg(test)]
const DICTIONARY_MAX: usize = 1 << 10;
/// Stored dictionaries are cut into pieces this small (sled writes a bigger value as a
/// blob file of its own).
const PIECE_BYTES: usize = 6 << 10;
/// The zstd level of rows' pages.
const ZSTD_LEVEL: i32 = 1;

/// What is known of one table's dictionary on the writing side.
enum TableDictionary {
    /// Rows seen so far (bytes), and those sampled to train on (each row one sample).
    Sampling { seen: usize, data: Vec<u8>, sizes: Vec<usize> },
    /// Being trained on a thread of its own (tens of milliseconds a table: the storing
    /// thread, and a running daemon's latency, do not wait for it); the table's pages go
    /// without a dictionary until it is done.
    Training(std::thread::JoinHandle<std::io::Result<Vec<u8>>>),
    Trained {
        id: u32,
        compressor: zstd::bulk::Compressor<'static>,
        /// The dictionary's bytes, while not known to be on disk.
        unsaved: Option<Vec<u8>>,
    },
    /// Training failed: this table's pages go without one (in this process).
    None,
}

/// The compressors of rows' pages, by table (the storing thread's).
pub struct RowCompression {
    plain: zstd::bulk::Compressor<'static>,
    tables: HashMap<u16, TableDictionary>,
    /// The tables whose unsaved dictionary the batch being written carries.
    carried: Vec<u16>,
}

/// A dictionary trained for a batch: the readers need it as soon as the batch commits.
pub struct NewDictionary {
    pub table: u16,
    pub id: u32,
    pub bytes: Vec<u8>,
}

impl RowCompression {
    /// The compressors for the dictionaries stored in `db`.
    pub fn load(db: &sled::Db) -> Result<(RowCompression, Decoders)> {
        let mut plain = zstd::bulk::Compressor::new(ZSTD_LEVEL).context("cannot set up zstd")?;
        // A page read back from a plain file has no checksum of sled's around it: zstd's
        // own says a damaged one is corrupt instead of handing back wrong rows.
        plain.include_checksum(true).context("cannot set up zstd")?;
        let mut rc = RowCompression { plain, tables: HashMap::new(), carried: Vec::new() };
        let mut decoders = Decoders::new()?;
        for (table, id, bytes) in stored(db)? {
            decoders.add(table, id, &bytes)?;
            rc.tables
                .insert(table, TableDictionary::Trained { id, compressor: page_compressor(&bytes)?, unsaved: None });
        }
        Ok((rc, decoders))
    }

    /// A batch's blocks are about to be written (each table's then [`Self::prepare`]d).
    pub fn start_batch(&mut self) {
        self.carried.clear();
    }

    /// Before `table`'s blocks of a batch are compressed: samples their rows (`raws`, each
    /// [`super::blocks::pack_items`]'s layout) while the table has no dictionary, starts
    /// training one once enough are seen, and takes one whose training is done. A
    /// dictionary not yet known to be on disk is put into `batch`. Returns the one taken
    /// now, if any: the readers need it once the batch commits.
    pub fn prepare(&mut self, table: u16, raws: &[&[u8]], batch: &mut sled::Batch) -> Result<Option<NewDictionary>> {
        let entry = self.tables.entry(table).or_insert(TableDictionary::Sampling {
            seen: 0,
            data: Vec::new(),
            sizes: Vec::new(),
        });
        let mut taken = None;
        if matches!(entry, TableDictionary::Training(handle) if handle.is_finished()) {
            let TableDictionary::Training(handle) = std::mem::replace(entry, TableDictionary::None) else {
                unreachable!("matched just above")
            };
            match handle.join() {
                Ok(Ok(bytes)) => {
                    tracing::debug!(table, bytes = bytes.len(), "a dictionary for rows' pages is trained");
                    taken = Some(NewDictionary { table, id: 1, bytes: bytes.clone() });
                    *entry =
                        TableDictionary::Trained { id: 1, compressor: page_compressor(&bytes)?, unsaved: Some(bytes) };
                }
                // Rows too alike or too few to train on: pages go without one.
                Ok(Err(e)) => tracing::debug!(table, error = %e, "no dictionary for rows' pages"),
                Err(_) => tracing::warn!(table, "training a dictionary for rows' pages panicked; going without"),
            }
        }
        if let TableDictionary::Sampling { seen, data, sizes } = entry {
            *seen += raws.iter().map(|r| r.len()).sum::<usize>();
            // Sampled once the table has this many bytes: until then its pages go without
            // a dictionary, and a table that never gets there is not worth a training.
            let raws: &[&[u8]] = if *seen < TRAIN_AFTER { &[] } else { raws };
            'rows: for raw in raws {
                for (start, end) in super::blocks::item_spans(raw)? {
                    if data.len() >= SAMPLE_MAX {
                        break 'rows;
                    }
                    data.extend_from_slice(&raw[start as usize..end as usize]);
                    sizes.push((end - start) as usize);
                }
            }
            if data.len() >= SAMPLE_MIN {
                let (data, sizes) = (std::mem::take(data), std::mem::take(sizes));
                let training = std::thread::Builder::new()
                    .name("lookout-dictionary".into())
                    .spawn(move || zstd::dict::from_continuous(&data, &sizes, DICTIONARY_MAX));
                *entry = match training {
                    Ok(handle) => TableDictionary::Training(handle),
                    Err(e) => {
                        tracing::warn!(table, error = %e, "cannot start training a dictionary for rows' pages");
                        TableDictionary::None
                    }
                };
            }
        }
        if let TableDictionary::Trained { id, unsaved: Some(bytes), .. } = entry {
            for (part, piece) in bytes.chunks(PIECE_BYTES).enumerate() {
                let part = u16::try_from(part).map_err(|_| StoreError::Invalid("a dictionary too large".into()))?;
                batch.insert(keys::dictionary_key(table, *id, part), piece);
            }
            self.carried.push(table);
        }
        Ok(taken)
    }

    /// Waits until no dictionary is being trained (tests: the next batch then takes it).
    #[cfg(test)]
    pub fn wait_for_training(&self) {
        while self.tables.values().any(|t| matches!(t, TableDictionary::Training(h) if !h.is_finished())) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// `raw` (a block's rows of `table`) as a rows frame ([`super::pages`]): pages of
    /// [`super::pages::PAGE_RAW`] with the table's dictionary, one page without.
    pub fn compress(&mut self, table: u16, raw: &PackedItems) -> Result<Vec<u8>> {
        match self.tables.get_mut(&table) {
            Some(TableDictionary::Trained { id, compressor, .. }) => {
                super::pages::compress(raw, *id, super::pages::PAGE_RAW, |page| {
                    compressor.compress(page).context("cannot compress a page of rows")
                })
            }
            _ => {
                let plain = &mut self.plain;
                super::pages::compress(raw, 0, usize::MAX, |page| {
                    plain.compress(page).context("cannot compress a page of rows")
                })
            }
        }
    }

    /// A table id that a failed batch handed out, and will go to another table.
    pub fn forget(&mut self, table: u16) {
        self.tables.remove(&table);
    }

    /// The batch last written has committed: the dictionaries it carried are on disk.
    pub fn committed(&mut self) {
        for table in self.carried.drain(..) {
            if let Some(TableDictionary::Trained { unsaved, .. }) = self.tables.get_mut(&table) {
                *unsaved = None;
            }
        }
    }
}

/// A compressor of pages with this dictionary: zstd's checksum on, the dictionary's id
/// left out of each frame (the rows frame's directory names it).
fn page_compressor(dictionary: &[u8]) -> Result<zstd::bulk::Compressor<'static>> {
    let mut z = zstd::bulk::Compressor::with_dictionary(ZSTD_LEVEL, dictionary).context("cannot load a dictionary")?;
    z.include_checksum(true).context("cannot set up zstd")?;
    z.include_dictid(false).context("cannot set up zstd")?;
    Ok(z)
}

/// Every dictionary stored in `db`: (table, id, bytes).
fn stored(db: &sled::Db) -> Result<Vec<(u16, u32, Vec<u8>)>> {
    let mut out: Vec<(u16, u32, Vec<u8>)> = Vec::new();
    for kv in db.scan_prefix([keys::DICTIONARY]) {
        let (k, v) = kv?;
        let (table, id, _) = keys::dictionary_of(&k).ok_or_else(|| corrupt!("a dictionary key of the wrong length"))?;
        match out.last_mut() {
            Some((t, i, bytes)) if (*t, *i) == (table, id) => bytes.extend_from_slice(&v),
            _ => out.push((table, id, v.to_vec())),
        }
    }
    Ok(out)
}

/// The decompressors of rows' pages: one without a dictionary, one per dictionary.
pub struct Decoders {
    plain: zstd::bulk::Decompressor<'static>,
    dictionaries: HashMap<(u16, u32), zstd::bulk::Decompressor<'static>>,
}

impl Decoders {
    fn new() -> Result<Decoders> {
        Ok(Decoders {
            plain: zstd::bulk::Decompressor::new().context("cannot set up zstd")?,
            dictionaries: HashMap::new(),
        })
    }

    pub fn add(&mut self, table: u16, id: u32, dictionary: &[u8]) -> Result<()> {
        let z = zstd::bulk::Decompressor::with_dictionary(dictionary).context("cannot load a dictionary")?;
        self.dictionaries.insert((table, id), z);
        Ok(())
    }

    pub fn forget(&mut self, table: u16) {
        self.dictionaries.retain(|(t, _), _| *t != table);
    }

    /// Decompresses one page of `table` compressed with dictionary `id` (0: none) into
    /// `into`; the bytes written.
    pub fn page(&mut self, table: u16, id: u32, page: &[u8], into: &mut [u8]) -> Result<usize> {
        let z = if id == 0 {
            &mut self.plain
        } else {
            self.dictionaries.get_mut(&(table, id)).ok_or_else(|| {
                corrupt!(
                    "a block of table {table} refers to dictionary {id}, which is not stored: the store is damaged; \
                     ingest the logs again into a new --data directory"
                )
            })?
        };
        z.decompress_to_buffer(page, into).context("the page is corrupt")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, seed: usize) -> Vec<u8> {
        let items: Vec<Vec<u8>> = (seed..seed + n)
            .map(|i| {
                format!(
                    r#"{{"DeviceName":"ws-{:04}.corp.example.com","FolderPath":"c:\\program files\\vendor{}\\app{}.dll","SHA1":"{:040x}","ActionType":"ImageLoaded"}}"#,
                    i % 97,
                    i % 13,
                    i % 31,
                    i * 7919
                )
                .into_bytes()
            })
            .collect();
        super::super::blocks::pack_items(&items)
    }

    /// A table gets its dictionary once enough of its rows are seen; its pages read back
    /// through the dictionary after a reopen, and the dictionary goes into every batch
    /// until one has committed.
    #[test]
    fn a_dictionary_is_trained_stored_until_committed_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let (mut rc, _) = RowCompression::load(&db).unwrap();
        let small = rows(2, 0);
        assert!(small.len() < SAMPLE_MIN);
        let mut batch = sled::Batch::default();
        assert!(rc.prepare(3, &[&small], &mut batch).unwrap().is_none(), "too few rows to train on");
        let before = rc.compress(3, &PackedItems::new(small.clone()).unwrap()).unwrap();
        assert_eq!(super::super::pages::Directory::parse(&before).unwrap().dictionary, 0);
        let many: Vec<Vec<u8>> = (0..8).map(|k| rows(400, k * 400)).collect();
        let many: Vec<&[u8]> = many.iter().map(|r| &r[..]).collect();
        assert!(rc.prepare(3, &many, &mut batch).unwrap().is_none(), "training, not trained yet");
        rc.wait_for_training();
        let new = rc.prepare(3, &[], &mut batch).unwrap().expect("trained");
        assert_eq!((new.table, new.id), (3, 1));
        let frame = rc.compress(3, &PackedItems::new(many[7].to_vec()).unwrap()).unwrap();
        let dir_ = super::super::pages::Directory::parse(&frame).unwrap();
        assert_eq!(dir_.dictionary, 1);
        assert!(dir_.pages.len() > 1);
        assert!(frame.len() * 4 < many[7].len(), "{} of {}", frame.len(), many[7].len());
        // Not committed: the next batch carries it again.
        let mut again = sled::Batch::default();
        assert!(rc.prepare(3, &[many[0]], &mut again).unwrap().is_none());
        db.apply_batch(again).unwrap();
        rc.committed();
        let mut after = sled::Batch::default();
        rc.prepare(3, &[many[0]], &mut after).unwrap();
        let written_after = {
            let probe = sled::Config::new().temporary(true).open().unwrap();
            probe.apply_batch(after).unwrap();
            probe.len()
        };
        assert_eq!(written_after, 0, "a dictionary on disk is not written again");
        // Read back by a store opened afresh.
        let (_, mut decoders) = RowCompression::load(&db).unwrap();
        let mut all = Vec::new();
        super::super::pages::all_into(&frame, &dir_, &mut all, |p, into| decoders.page(3, 1, p, into)).unwrap();
        assert_eq!(all, many[7]);
        assert!(decoders.page(4, 1, &frame[dir_.pages[0].at..], &mut [0u8; 10]).is_err(), "no such dictionary");
    }
}
