//! Reading files into the store: open, split into records, normalise, and commit in
//! batches — each batch atomically with the file's new offset, so a crash at any point
//! neither loses nor duplicates a row and a re-run resumes where the last one stopped.
//! Used both by one-shot `lookout ingest` and by the daemon's tailer.

use crate::clock::Clock;
use crate::disk::DiskSpaceLow;
use crate::error::StoreError;
use crate::fingerprint::{fingerprint, head_hash, tail_matches, Fingerprint};
use crate::parse::lines::LineReader;
use crate::parse::lines::{LineEnd, LineInfo};
use crate::parse::normalise::TableHints;
use crate::parse::open::{open_file, Layout, OpenError};
use crate::parse::pipeline;
use crate::parse::{Reject, RejectKind};
use crate::schema::table_from_file_name;
use crate::store::{Added, OffsetUnit, RejectRecord, SourceState, Store, WriteBatch};
use serde::de::{SeqAccess, Visitor};
use serde_json::value::RawValue;
use sha2::Digest;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The most `max_line` may be: a stored row can take no more (a longer one would be
/// stored and never read back).
pub const MAX_LINE_LIMIT: usize = crate::store::codec::MAX_ROW_BYTES / 2;

#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Fixes the ingestion time of every row (`--now`); the clock otherwise.
    pub now: Option<i64>,
    /// The table of rows that name none (`--table`).
    pub table: Option<String>,
    /// Lines longer than this are rejected without being held in memory.
    /// Longest line (or JSON array element) stored, in bytes; at most [`MAX_LINE_LIMIT`].
    pub max_line: usize,
    /// Rows per committed batch (`--batch-rows`). Each batch writes one key-index run, so
    /// bigger batches leave fewer runs to merge. With the row blocks in plain files, 8,192
    /// ingested the 1M fleet 7% faster than 4,096 and left the store 10% smaller (six
    /// alternated runs each); 12,288 and 16,384 were slower again, the parser waiting on
    /// the bigger commits.
    pub batch_rows: usize,
    /// Input bytes per committed batch: bounds batch memory however long the lines are.
    pub batch_bytes: usize,
    /// Tailing a file that may still be written: a last line without its newline (or a
    /// JSON array or gzip stream that ends early) is left for later, never guessed at.
    /// When false (one-shot ingest of finished files) a last line without a newline is
    /// taken if it is a complete JSON document.
    pub tail: bool,
    /// Store only rows of these tables; the others are counted in `other_tables` (a
    /// Kafka node's file feed is FileProfile only: every partition's store holds it).
    pub only_tables: Option<Vec<String>>,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            now: None,
            table: None,
            max_line: 8 << 20,
            batch_rows: 8192,
            batch_bytes: 32 << 20,
            tail: false,
            only_tables: None,
        }
    }
}

/// Why reading a file into the store stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The file could not be read (opened, read, listed).
    #[error("cannot {action} {}", path.display())]
    Unreadable {
        /// `read`, `open`, `list`.
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file could not be opened for reading (decompressed, positioned).
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("{}: read error at byte {at}", path.display())]
    ReadAt {
        path: PathBuf,
        at: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the parser thread")]
    ParserStart(#[source] std::io::Error),
    #[error("{}: the parser thread {how}", path.display())]
    ParserStopped { path: PathBuf, how: &'static str },
    /// The file was truncated (and rewritten) while a batch was being read from it: the
    /// batch was dropped uncommitted.
    #[error("{} was truncated while being read; the batch is dropped and the file read afresh", .0.display())]
    ChangedWhileReading(PathBuf),
    /// Nothing more is committed on a nearly full disk; the batch in hand is read again
    /// later.
    #[error(transparent)]
    DiskSpaceLow(#[from] DiskSpaceLow),
    /// The database failed: not the file's fault.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IngestError {
    /// Whether the failure is the input file's (it cannot be read or decoded), as opposed
    /// to the store's or the disk's, or a file that changed under the reader: the file is
    /// skipped and the others go on.
    pub fn is_input_failure(&self) -> bool {
        match self {
            IngestError::Unreadable { .. }
            | IngestError::Open(_)
            | IngestError::ReadAt { .. }
            | IngestError::ParserStart(_)
            | IngestError::ParserStopped { .. } => true,
            IngestError::ChangedWhileReading(_) | IngestError::DiskSpaceLow(_) | IngestError::Store(_) => false,
        }
    }

    pub(crate) fn unreadable(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IngestError {
        let path = path.to_path_buf();
        move |source| IngestError::Unreadable { action, path, source }
    }
}

/// What ingesting one or more files did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngestReport {
    pub files: u64,
    pub new_rows: BTreeMap<String, u64>,
    pub duplicates: u64,
    /// FileProfile rows that replaced an older profile of the same SHA1.
    pub replaced: u64,
    /// Event rows older than the retention horizon when they arrived: counted, not stored.
    pub expired: u64,
    /// Values of a type their column does not have (outside the key), kept as sent.
    pub unexpected_types: u64,
    /// Rows of tables the options did not take (`IngestOptions::only_tables`).
    pub other_tables: u64,
    pub rejected: BTreeMap<String, u64>,
    /// Raw bytes read.
    pub bytes: u64,
    /// Files whose last line has no newline yet and does not parse; left for a later run.
    pub partial_tails: Vec<PathBuf>,
    /// Directory entries not read, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// Of one read of an uncompressed file of lines that left its last line for later:
    /// where that line starts and where the file ended, with no newline between them. The
    /// tailer looks only past the end for the newline next time (not merged: per file).
    pub unfinished_rest: Option<(u64, u64)>,
}

impl IngestReport {
    pub fn total_new(&self) -> u64 {
        self.new_rows.values().sum()
    }

    /// Whether anything detectors should look at was stored.
    pub fn changed(&self) -> bool {
        self.total_new() > 0 || self.replaced > 0
    }

    pub fn total_rejected(&self) -> u64 {
        self.rejected.values().sum()
    }

    pub fn merge(&mut self, other: IngestReport) {
        self.files += other.files;
        for (k, v) in other.new_rows {
            *self.new_rows.entry(k).or_insert(0) += v;
        }
        self.duplicates += other.duplicates;
        self.replaced += other.replaced;
        self.expired += other.expired;
        self.unexpected_types += other.unexpected_types;
        self.other_tables += other.other_tables;
        for (k, v) in other.rejected {
            *self.rejected.entry(k).or_insert(0) += v;
        }
        self.bytes += other.bytes;
        self.partial_tails.extend(other.partial_tails);
        self.skipped.extend(other.skipped);
    }
}

/// Expands files and directories (recursively, in name order) into the files to read.
/// Entries inside a directory that are not regular files (FIFOs, sockets, dangling or
/// looping symlinks, unreadable entries) are skipped and listed with the reason.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Expanded, IngestError> {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(IngestError::unreadable("read", p))?;
        if meta.is_dir() {
            expand_dir(p, &mut files, &mut skipped, 0);
        } else if meta.is_file() {
            files.push(p.clone());
        } else {
            skipped.push((p.clone(), "not a regular file".to_string()));
        }
    }
    Ok(Expanded { files, skipped })
}

/// Files to read, and directory entries skipped (with the reason).
pub struct Expanded {
    pub files: Vec<PathBuf>,
    pub skipped: Vec<(PathBuf, String)>,
}

/// Deeper than this is a symlink cycle or a mistake.
const MAX_DEPTH: usize = 32;

fn expand_dir(dir: &Path, files: &mut Vec<PathBuf>, skipped: &mut Vec<(PathBuf, String)>, depth: usize) {
    if depth > MAX_DEPTH {
        skipped.push((dir.to_path_buf(), format!("nested deeper than {MAX_DEPTH} folders")));
        return;
    }
    let mut entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => {
            skipped.push((dir.to_path_buf(), format!("cannot list: {e}")));
            return;
        }
    };
    entries.sort();
    for e in entries {
        if e.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        match std::fs::metadata(&e) {
            Ok(m) if m.is_dir() => expand_dir(&e, files, skipped, depth + 1),
            Ok(m) if m.is_file() => files.push(e),
            Ok(_) => skipped.push((e, "not a regular file".to_string())),
            Err(err) => skipped.push((e, format!("cannot read: {err}"))),
        }
    }
}

/// The committed state of `fp`'s file, if it is the same file (its first bytes still hash
/// the same), else a fresh state reading it from the start.
pub fn state_for(store: &Store, file: &File, fp: &Fingerprint, path: &Path) -> Result<SourceState, IngestError> {
    let fresh = || fresh_state(path, fp);
    let Some(mut old) = store.source(&fp.source_id())? else { return Ok(fresh()) };
    let read_err = || IngestError::unreadable("read", path);
    // A plain file shorter than its offset was truncated (copytruncate): read it anew.
    let shrunk = !fp.compressed && old.unit == OffsetUnit::Bytes && old.offset > fp.size;
    let same = !shrunk
        && old.head_len <= fp.head_len
        && head_hash(file, old.head_len).map_err(read_err())?.as_deref() == Some(old.head.as_slice())
        && (old.unit != OffsetUnit::Bytes || tail_matches(file, &old).map_err(read_err())?);
    // Nothing read yet (e.g. first seen empty): treat it as new, so that it may still be
    // recognised as a copy of another file.
    if !same || (old.offset == 0 && old.lines == 0) {
        return Ok(fresh());
    }
    old.path = path.display().to_string();
    // A file first seen short gets its full-length fingerprint (the old, shorter prefix
    // matched above).
    if old.head_len < fp.head_len {
        old.head = fp.head.clone();
        old.head_len = fp.head_len;
    }
    Ok(old)
}

/// The state of a file nothing has been read from yet.
pub fn fresh_state(path: &Path, fp: &Fingerprint) -> SourceState {
    SourceState {
        path: path.display().to_string(),
        dev: fp.dev,
        ino: fp.ino,
        head: fp.head.clone(),
        head_len: fp.head_len,
        offset: 0,
        unit: OffsetUnit::Bytes,
        compressed: fp.compressed,
        lines: 0,
        raw_size: 0,
        done: false,
        tail: Vec::new(),
        tail_len: 0,
    }
}

/// Whether there can be anything new to read in a file in `state`.
pub fn has_news(state: &SourceState, fp: &Fingerprint) -> bool {
    if state.done || fp.compressed || state.unit == OffsetUnit::ArrayElements {
        // Finished or compressed files only change by growing or being rewritten.
        !(state.done && state.raw_size == fp.size)
    } else {
        fp.size > state.offset
    }
}

/// Ingests one file from its committed offset. `progress` is called with raw bytes read.
pub fn ingest_file(
    store: &mut Store,
    path: &Path,
    opts: &IngestOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<IngestReport, IngestError> {
    let file = File::open(path).map_err(IngestError::unreadable("open", path))?;
    let fp = fingerprint(&file).map_err(IngestError::unreadable("read", path))?;
    let mut state = state_for(store, &file, &fp, path)?;
    if !has_news(&state, &fp) {
        return Ok(IngestReport { files: 1, ..Default::default() });
    }
    read_source(store, &file, path, &fp, &mut state, opts, None, progress)
}

/// Reads an open file from `state` to its end (or, when tailing, to its last complete
/// record), committing batches with the advancing state. Stops early, after a commit,
/// when `stop` is set.
#[allow(clippy::too_many_arguments)]
pub fn read_source(
    store: &mut Store,
    file: &File,
    path: &Path,
    fp: &Fingerprint,
    state: &mut SourceState,
    opts: &IngestOptions,
    stop: Option<&AtomicBool>,
    progress: &mut dyn FnMut(u64),
) -> Result<IngestReport, IngestError> {
    let id = fp.source_id();
    let counter = Arc::new(AtomicU64::new(0));
    let skip = if state.unit == OffsetUnit::Bytes { state.offset } else { 0 };
    let opened = open_file(file, path, skip, counter.clone())?;
    state.compressed = opened.compressed;
    let hints = TableHints {
        file_table: path.file_name().and_then(|n| table_from_file_name(&n.to_string_lossy())),
        explicit: opts.table.clone(),
    };
    let mut run = FileRun {
        path,
        file,
        id: &id,
        opts,
        clock: Clock::new(opts.now),
        hints,
        report: IngestReport { files: 1, ..Default::default() },
        pending: 0,
        counter: counter.clone(),
        stop,
        raw_size: fp.size,
    };
    match opened.layout {
        Layout::Lines => {
            state.unit = OffsetUnit::Bytes;
            let start = if state.offset == 0 { opened.bom } else { state.offset };
            run.lines(store, LineReader::new(opened.reader, opts.max_line, start), state, progress)?;
        }
        Layout::Array => {
            if state.unit == OffsetUnit::Bytes && state.offset > 0 {
                // A file first read as lines is now an array: nothing sensible to resume.
                state.offset = 0;
            }
            state.unit = OffsetUnit::ArrayElements;
            run.array(store, opened.reader, state, progress)?;
        }
    }
    run.report.bytes = counter.load(Ordering::Relaxed).saturating_sub(skip);
    Ok(run.report)
}

/// Records the bytes before the offset (if the reader consumed any this run; otherwise
/// the remembered ones still stand).
fn remember_tail(state: &mut SourceState, tail: &[u8]) {
    if !tail.is_empty() {
        state.tail = sha2::Sha256::digest(tail).to_vec();
        state.tail_len = tail.len() as u64;
    }
}

struct FileRun<'a> {
    path: &'a Path,
    file: &'a File,
    id: &'a [u8],
    opts: &'a IngestOptions,
    clock: Clock,
    hints: TableHints,
    report: IngestReport,
    pending: usize,
    counter: Arc<AtomicU64>,
    stop: Option<&'a AtomicBool>,
    raw_size: u64,
}

impl FileRun<'_> {
    fn lines(
        &mut self,
        store: &mut Store,
        reader: LineReader<Box<dyn std::io::BufRead + Send>>,
        state: &mut SourceState,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), IngestError> {
        // Lines are read and parsed on their own thread (parse/pipeline.rs); everything
        // that decides what is committed stays here, in file order.
        let (tx, rx) = pipeline::channel();
        let (tail_mode, max_line, hints) = (self.opts.tail, self.opts.max_line, self.hints.clone());
        std::thread::scope(|scope| {
            let parser = std::thread::Builder::new()
                .name("lookout-parse".into())
                .spawn_scoped(scope, move || pipeline::run(reader, tail_mode, max_line, &hints, &tx))
                .map_err(IngestError::ParserStart)?;
            let result = self.store_lines(store, &rx, state, progress);
            // Unblocks the parser if this side stopped early.
            drop(rx);
            if parser.join().is_err() {
                return Err(IngestError::ParserStopped { path: self.path.to_path_buf(), how: "panicked" });
            }
            result
        })
    }

    fn store_lines(
        &mut self,
        store: &mut Store,
        rx: &pipeline::StoringEnd,
        state: &mut SourceState,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), IngestError> {
        let data_dir = store.data_dir().to_path_buf();
        let mut batch = store.batch();
        let mut now = self.clock.now();
        let mut pending_bytes = 0usize;
        let mut tail_at_offset: Vec<u8> = Vec::new();
        let end = loop {
            let lines = match rx.recv() {
                Ok(pipeline::Message::Lines(lines)) => lines,
                Ok(pipeline::Message::End(end)) => break end,
                Err(_) => return Err(IngestError::ParserStopped { path: self.path.to_path_buf(), how: "stopped" }),
            };
            // Nothing is committed on a nearly full disk (see crate::disk).
            if crate::disk::low(&data_dir) {
                return Err(DiskSpaceLow(data_dir.display().to_string()).into());
            }
            for line in &lines {
                let line_no = state.lines + 1;
                self.parsed_line(&mut batch, line, line_no, now, state, &mut tail_at_offset, &mut pending_bytes)?;
                let stopping = line_no.is_multiple_of(256) && self.stop.is_some_and(|s| s.load(Ordering::Relaxed));
                if self.pending >= self.opts.batch_rows || pending_bytes >= self.opts.batch_bytes || stopping {
                    pending_bytes = 0;
                    self.check_unchanged(state)?;
                    remember_tail(state, &tail_at_offset);
                    batch.set_source(self.id, state)?;
                    batch.commit()?;
                    crash_after_durable_commit(store)?;
                    progress(self.counter.load(Ordering::Relaxed));
                    self.pending = 0;
                    if self.stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                        return Ok(());
                    }
                    batch = store.batch();
                    now = self.clock.now();
                }
            }
            rx.hand_back(lines);
        };
        let reached_end = match end {
            pipeline::End::Eof => true,
            pipeline::End::Unfinished { partial, too_long, .. } if partial && state.compressed => {
                // Read as finished, with its stream whole: a compressed file never grows,
                // so its last record never finishes. Kept aside once and the file done,
                // instead of it being decompressed again at every look.
                let (kind, reason) = if too_long {
                    (
                        RejectKind::LineTooLong,
                        format!(
                            "the compressed file ends with a line over the {} byte limit (max_line_bytes) and no newline",
                            self.opts.max_line
                        ),
                    )
                } else {
                    (
                        RejectKind::MalformedJson,
                        "the compressed file ends with a record that never finished (no newline and not a whole \
                         document)"
                            .to_string(),
                    )
                };
                *self.report.rejected.entry(kind.as_str().to_string()).or_insert(0) += 1;
                batch.add_reject(RejectRecord {
                    file: self.path.display().to_string(),
                    line: state.lines + 1,
                    offset: state.offset,
                    kind: kind.as_str().to_string(),
                    reason,
                    excerpt: String::new(),
                })?;
                true
            }
            pipeline::End::Unfinished { partial, rest, .. } => {
                if partial {
                    self.report.partial_tails.push(self.path.to_path_buf());
                }
                if !state.compressed {
                    self.report.unfinished_rest = rest;
                }
                false
            }
            pipeline::End::Error(source, at) => {
                // The lines read before it are kept (the state is at the last whole one),
                // then the error goes back: the file is skipped until it changes. A damaged
                // compressed stream never mends: the rest is kept aside and the file done.
                // (Not for an error of the file underneath, an EIO say: read on later.)
                self.check_unchanged(state)?;
                remember_tail(state, &tail_at_offset);
                let damaged =
                    matches!(source.kind(), std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData);
                if state.compressed && damaged {
                    batch.add_reject(RejectRecord {
                        file: self.path.display().to_string(),
                        line: state.lines + 1,
                        offset: state.offset,
                        kind: RejectKind::MalformedJson.as_str().to_string(),
                        reason: format!(
                            "the compressed stream cannot be read on from here ({source}); the rest is lost"
                        ),
                        excerpt: String::new(),
                    })?;
                    state.done = true;
                    state.raw_size = self.raw_size;
                }
                batch.set_source(self.id, state)?;
                batch.commit()?;
                progress(self.counter.load(Ordering::Relaxed));
                return Err(IngestError::ReadAt { path: self.path.to_path_buf(), at, source });
            }
        };
        if reached_end && state.compressed {
            state.done = true;
            state.raw_size = self.raw_size;
        }
        self.check_unchanged(state)?;
        remember_tail(state, &tail_at_offset);
        batch.set_source(self.id, state)?;
        batch.commit()?;
        progress(self.counter.load(Ordering::Relaxed));
        Ok(())
    }

    /// Stores one parsed line and advances the file's state past it.
    #[allow(clippy::too_many_arguments)]
    fn parsed_line(
        &mut self,
        batch: &mut WriteBatch<'_>,
        line: &pipeline::ParsedLine,
        line_no: u64,
        now: i64,
        state: &mut SourceState,
        tail_at_offset: &mut Vec<u8>,
        pending_bytes: &mut usize,
    ) -> Result<(), IngestError> {
        let offset = line.info.start;
        match &line.outcome {
            pipeline::LineOutcome::Blank => {}
            pipeline::LineOutcome::Rejected(reject, raw) => self.reject(batch, line_no, offset, reject.clone(), raw)?,
            pipeline::LineOutcome::Records(records, raw) => {
                self.store_records(batch, records, line_no, offset, raw, now)?
            }
        }
        state.offset = line.info.end;
        state.lines = line_no;
        // The bytes before the committed offset (the reader may later run past it into a
        // partial line).
        tail_at_offset.clear();
        tail_at_offset.extend_from_slice(&line.tail);
        *pending_bytes += line.len;
        Ok(())
    }

    /// When tailing a plain file, a copytruncate may cut it and the writer refill it while
    /// it is being read, so the end of a line read before the cut could be followed by
    /// bytes written after it. Every byte of the batch was read before this check, so if
    /// the file still starts as it did, the batch is all old content; otherwise it is
    /// dropped (uncommitted) and the file is looked at afresh.
    fn check_unchanged(&self, state: &SourceState) -> Result<(), IngestError> {
        if !self.opts.tail || state.compressed {
            return Ok(());
        }
        let file = self.file;
        let now = head_hash(file, state.head_len).map_err(IngestError::unreadable("read", self.path))?;
        if now.as_deref() != Some(state.head.as_slice()) {
            return Err(IngestError::ChangedWhileReading(self.path.to_path_buf()));
        }
        Ok(())
    }

    /// Stores the rows of one record (a line, or an array element) and keeps its
    /// rejects aside with `raw`, the record's first bytes.
    fn store_records(
        &mut self,
        batch: &mut WriteBatch<'_>,
        records: &[Result<crate::parse::normalise::NormalRow, Reject>],
        line_no: u64,
        offset: u64,
        raw: &[u8],
        now: i64,
    ) -> Result<(), StoreError> {
        for record in records {
            match record {
                Ok(row) => self.add(batch, row, now)?,
                Err(reject) => self.reject(batch, line_no, offset, reject.clone(), raw)?,
            }
        }
        Ok(())
    }

    fn add(
        &mut self,
        batch: &mut WriteBatch<'_>,
        row: &crate::parse::normalise::NormalRow,
        now: i64,
    ) -> Result<(), StoreError> {
        self.pending += 1;
        if self.opts.only_tables.as_ref().is_some_and(|only| !only.contains(&row.table)) {
            self.report.other_tables += 1;
            return Ok(());
        }
        self.report.unexpected_types += u64::from(row.unexpected_types);
        match batch.add_row(row, now)? {
            Added::New => match self.report.new_rows.get_mut(&row.table) {
                Some(n) => *n += 1,
                None => {
                    self.report.new_rows.insert(row.table.clone(), 1);
                }
            },
            Added::Replaced => self.report.replaced += 1,
            Added::Duplicate => self.report.duplicates += 1,
            Added::Expired => self.report.expired += 1,
        }
        Ok(())
    }

    fn reject(
        &mut self,
        batch: &mut WriteBatch<'_>,
        line: u64,
        offset: u64,
        reject: Reject,
        raw: &[u8],
    ) -> Result<(), StoreError> {
        *self.report.rejected.entry(reject.kind.as_str().to_string()).or_insert(0) += 1;
        self.pending += 1;
        tracing::debug!(file = %self.path.display(), line, offset, reason = %reject.reason, "rejected");
        batch.add_reject(RejectRecord {
            file: self.path.display().to_string(),
            line,
            offset,
            kind: reject.kind.as_str().to_string(),
            reason: reject.reason,
            excerpt: String::from_utf8_lossy(&raw[..raw.len().min(256)]).into_owned(),
        })
    }

    fn array(
        &mut self,
        store: &mut Store,
        reader: Box<dyn std::io::BufRead + Send>,
        state: &mut SourceState,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), IngestError> {
        let skip = state.offset;
        let mut fatal: Option<IngestError> = None;
        let mut pending: Vec<(u64, Element)> = Vec::new();
        let mut pending_bytes = 0usize;
        let max_line = self.opts.max_line;
        // serde_json holds an element's whole text while it reads it: bytes read since the
        // last element ended, bounded (`ElementBound`).
        let since_element = std::rc::Rc::new(std::cell::Cell::new(0usize));
        let parsed = {
            let mut index = 0u64;
            // Each element is taken as its text and read as a line is: held to the line
            // limit, and a value that cannot be read (a number out of range, a lone
            // surrogate, nesting too deep) rejects that element alone, as it would a line,
            // instead of ending the array there.
            let mut on_element = |raw: Box<RawValue>| -> std::result::Result<(), String> {
                since_element.set(0);
                index += 1;
                if index <= skip {
                    return Ok(());
                }
                let text = raw.get().as_bytes();
                pending_bytes += text.len();
                let element = if text.len() > max_line {
                    Element::TooLong(text.len() as u64)
                } else {
                    let info = LineInfo { start: 0, end: 0, ending: LineEnd::Newline, too_long: None };
                    Element::Line(pipeline::parse_line(text, &info, max_line, &self.hints))
                };
                pending.push((index, element));
                if pending.len() < self.opts.batch_rows && pending_bytes < self.opts.batch_bytes {
                    return Ok(());
                }
                pending_bytes = 0;
                let r = self
                    .commit_elements(store, &mut pending, state, None)
                    .and_then(|()| crash_after_durable_commit(store).map_err(IngestError::from));
                progress(self.counter.load(Ordering::Relaxed));
                r.map_err(|e| {
                    let msg = e.to_string();
                    fatal = Some(e);
                    msg
                })
            };
            // (Taking an element's text checks neither its depth nor its numbers' range nor
            // its escapes' pairing: reading it does, as for a line.)
            let bounded = ElementBound { inner: reader, since: since_element.clone(), max_line };
            let mut de = serde_json::Deserializer::from_reader(bounded);
            serde::Deserializer::deserialize_seq(&mut de, ElementVisitor { f: &mut on_element }).and_then(|()| de.end())
        };
        if let Some(e) = fatal {
            return Err(e);
        }
        let syntax = match parsed {
            Ok(()) => None,
            // The export ends early: when tailing it is still being written, so wait; on a
            // finished file it is truncated and reported (once: the file is then done).
            // (A gzip still being written ends early the same way, as an I/O error.)
            Err(e)
                if self.opts.tail && (e.is_eof() || e.io_error_kind() == Some(std::io::ErrorKind::UnexpectedEof)) =>
            {
                self.commit_elements(store, &mut pending, state, None)?;
                return Ok(());
            }
            Err(e) => {
                let at = pending.last().map_or(state.offset, |p| p.0) + 1;
                Some((
                    at,
                    format!("malformed JSON array at element {at} (line {}, column {}): {e}", e.line(), e.column()),
                ))
            }
        };
        // Rows before a syntax error are kept; the rest of the array cannot be recovered.
        state.done = true;
        state.raw_size = self.raw_size;
        self.commit_elements(store, &mut pending, state, syntax)?;
        progress(self.counter.load(Ordering::Relaxed));
        Ok(())
    }

    /// Commits buffered array elements (and a trailing syntax error) with the new offset.
    fn commit_elements(
        &mut self,
        store: &mut Store,
        pending: &mut Vec<(u64, Element)>,
        state: &mut SourceState,
        syntax: Option<(u64, String)>,
    ) -> Result<(), IngestError> {
        // Nothing is committed on a nearly full disk (see crate::disk), as for lines.
        if crate::disk::low(store.data_dir()) {
            return Err(DiskSpaceLow(store.data_dir().display().to_string()).into());
        }
        let now = self.clock.now();
        let mut batch = store.batch();
        for (index, element) in pending.drain(..) {
            match element {
                Element::Line(pipeline::LineOutcome::Blank) => {}
                Element::Line(pipeline::LineOutcome::Rejected(reject, raw)) => {
                    self.reject(&mut batch, index, 0, reject, &raw)?;
                }
                Element::Line(pipeline::LineOutcome::Records(records, raw)) => {
                    self.store_records(&mut batch, &records, index, 0, &raw, now)?;
                }
                Element::TooLong(size) => {
                    let reason = format!(
                        "array element {index} is about {size} bytes, over the {} byte limit (max_line_bytes)",
                        self.opts.max_line
                    );
                    self.reject(&mut batch, index, 0, Reject::new(RejectKind::LineTooLong, reason), b"")?;
                }
            }
            state.offset = index;
            state.lines = index;
        }
        if let Some((line, reason)) = syntax {
            self.reject(&mut batch, line, 0, Reject::new(RejectKind::MalformedJson, reason), b"")?;
        }
        batch.set_source(self.id, state)?;
        batch.commit()?;
        self.pending = 0;
        Ok(())
    }
}

/// Failpoint `ingest-after-commit`: dies right after a batch reached the disk (a crash
/// before that just loses the batch and its offset together, which the next run re-reads).
fn crash_after_durable_commit(store: &Store) -> Result<(), StoreError> {
    if crate::failpoint::armed("ingest-after-commit") {
        store.flush()?;
        crate::failpoint::hit("ingest-after-commit");
    }
    Ok(())
}

/// One element of a JSON array export, as read.
enum Element {
    /// Read as a line is (an envelope or a `{"records":[…]}` batch unwrapped).
    Line(pipeline::LineOutcome),
    /// Over the line limit: its size in bytes.
    TooLong(u64),
}

struct ElementVisitor<'f, F> {
    f: &'f mut F,
}

/// Each element as its text, to be read as a line is (`pipeline::parse_line`): envelopes
/// and batches unwrapped, a key given twice given twice, as in a JSON Lines file.
impl<F: FnMut(Box<RawValue>) -> std::result::Result<(), String>> Visitor<'static> for ElementVisitor<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of rows")
    }

    fn visit_seq<A: SeqAccess<'static>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while let Some(v) = seq.next_element::<Box<RawValue>>()? {
            (self.f)(v).map_err(serde::de::Error::custom)?;
        }
        Ok(())
    }
}

/// Ingests files and directories in order, adding up the reports.
pub fn ingest_paths(
    store: &mut Store,
    paths: &[PathBuf],
    opts: &IngestOptions,
    progress: &mut dyn FnMut(&Path, u64),
) -> Result<IngestReport, IngestError> {
    let Expanded { files, skipped } = expand_paths(paths)?;
    let mut total = IngestReport { skipped, ..Default::default() };
    for f in &files {
        let r = ingest_file(store, f, opts, &mut |b| progress(f, b))?;
        total.merge(r);
    }
    Ok(total)
}

/// How many bytes one JSON array element (with the space before it) may take before the
/// array is read no further: well over the line limit, so an element just over it is
/// kept aside alone as `line_too_long` and the array read on.
fn element_limit(max_line: usize) -> usize {
    max_line.saturating_mul(4).max(max_line.saturating_add(1 << 20))
}

/// A reader that fails once more than `limit` bytes have been read since `since` was last
/// set to 0 (at each array element's end): an element of gigabytes, or an export whose
/// element never ends, fails the array there (kept aside as malformed from that element
/// on) instead of being held whole in memory.
struct ElementBound<R> {
    inner: R,
    since: std::rc::Rc<std::cell::Cell<usize>>,
    max_line: usize,
}

impl<R: std::io::Read> std::io::Read for ElementBound<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let since = self.since.get().saturating_add(n);
        self.since.set(since);
        let limit = element_limit(self.max_line);
        if since > limit {
            return Err(std::io::Error::other(format!(
                "an array element is over {limit} bytes (the line limit is {}); the rest of the array is not read",
                self.max_line
            )));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process event whose FolderPath is `pad` bytes long.
    fn row(report: u64, pad: usize) -> String {
        format!(
            r#"{{"Timestamp":"2025-05-07T10:00:00Z","DeviceId":"d1","ReportId":{report},"ActionType":"x","FolderPath":"{}"}}"#,
            "p".repeat(pad)
        )
    }

    /// An array element far over the line limit (gigabytes, or one never ending) is not
    /// held whole: the array is read no further from it, the rows before it stored and
    /// the rest kept aside as malformed from that element.
    #[test]
    fn an_array_element_far_over_the_line_limit_ends_the_array_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("data")).unwrap();
        let opts = IngestOptions { max_line: 1024, ..Default::default() };
        let huge = element_limit(opts.max_line) + 10;
        let path = dir.path().join("DeviceProcessEvents.json");
        std::fs::write(&path, format!("[{},\n{},\n{}]", row(1, 10), row(2, huge), row(3, 10))).unwrap();
        let report = ingest_file(&mut store, &path, &opts, &mut |_| {}).unwrap();
        assert_eq!(report.total_new(), 1, "{report:?}");
        let rejects = store.rejects(10).unwrap();
        assert_eq!(rejects.len(), 1, "{rejects:?}");
        assert_eq!(rejects[0].line, 2, "{rejects:?}");
        assert!(rejects[0].reason.contains("over"), "{}", rejects[0].reason);
    }

    /// A JSON array export's element is held to the line limit as a line is: one over it
    /// is kept aside as `line_too_long` with its element number, the others stored.
    #[test]
    fn an_array_element_over_the_line_limit_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("data")).unwrap();
        let path = dir.path().join("DeviceProcessEvents.json");
        std::fs::write(&path, format!("[{},\n{},\n{}]", row(1, 10), row(2, 2048), row(3, 10))).unwrap();
        let opts = IngestOptions { max_line: 1024, ..Default::default() };
        let report = ingest_file(&mut store, &path, &opts, &mut |_| {}).unwrap();
        assert_eq!(report.total_new(), 2, "{report:?}");
        let rejects = store.rejects(10).unwrap();
        assert_eq!(rejects.len(), 1, "{rejects:?}");
        assert_eq!((rejects[0].line, rejects[0].kind.as_str()), (2, "line_too_long"));
        assert!(rejects[0].reason.contains("array element 2"), "{}", rejects[0].reason);
    }

    /// A value a JSON array's element cannot be read with (a number out of range, a lone
    /// surrogate, nesting deeper than a line may have) rejects that element alone, as it
    /// would a line: the elements after it are stored (they used to be lost, the array
    /// taken for malformed from there on).
    #[test]
    fn an_unreadable_value_in_an_array_rejects_its_element_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("data")).unwrap();
        let row = |report: u64, extra: &str| {
            format!(
                r#"{{"Timestamp":"2025-05-07T10:00:00Z","DeviceId":"d1","ReportId":{report},"ActionType":"x"{extra}}}"#
            )
        };
        let deep = format!(r#","AdditionalFields":{}1{}"#, "[".repeat(200), "]".repeat(200));
        let elements =
            [row(1, ""), row(2, r#","FileSize":1e400"#), row(3, r#","FileName":"\ud800""#), row(4, &deep), row(5, "")];
        let path = dir.path().join("DeviceProcessEvents.json");
        std::fs::write(&path, format!("[{}]", elements.join(",\n"))).unwrap();
        let report = ingest_file(&mut store, &path, &IngestOptions::default(), &mut |_| {}).unwrap();
        assert_eq!(report.total_new(), 2, "{report:?}");
        let rejects = store.rejects(10).unwrap();
        let got: Vec<(u64, &str)> = rejects.iter().map(|r| (r.line, r.kind.as_str())).collect();
        assert_eq!(got, vec![(2, "malformed_json"), (3, "malformed_json"), (4, "malformed_json")], "{rejects:?}");
        assert!(rejects[0].excerpt.contains("1e400"), "{:?}", rejects[0]);
    }

    /// A file whose last line is over the line limit and has no newline, read as
    /// finished: a plain file may still be written, so the line is left for a later run
    /// and said (as a partial last line is); a gzip never grows, so the line is kept
    /// aside once and the file done. Both used to leave it with nothing said, and a gzip
    /// never done, decompressed again at every look.
    #[test]
    fn an_over_long_last_line_without_its_newline_is_said_or_kept_aside() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("data")).unwrap();
        let opts = IngestOptions { max_line: 1024, ..Default::default() };
        let plain = dir.path().join("DeviceProcessEvents.jsonl");
        std::fs::write(&plain, format!("{}\n{}", row(1, 10), row(2, 4096))).unwrap();
        let report = ingest_file(&mut store, &plain, &opts, &mut |_| {}).unwrap();
        assert_eq!((report.total_new(), report.total_rejected()), (1, 0), "{report:?}");
        assert_eq!(report.partial_tails, vec![plain.clone()], "said: {report:?}");
        let mut gz = gzip_of_rows(1, flate2::Compression::default());
        gz.write_all(row(9, 4096).as_bytes()).unwrap();
        let zipped = dir.path().join("DeviceProcessEvents-2.jsonl.gz");
        std::fs::write(&zipped, gz.finish().unwrap()).unwrap();
        let report = ingest_file(&mut store, &zipped, &opts, &mut |_| {}).unwrap();
        assert_eq!((report.total_new(), report.total_rejected()), (1, 1), "{report:?}");
        let kept = store.rejects(10).unwrap();
        assert_eq!(kept.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(), ["line_too_long"], "{kept:?}");
        assert!(done(&store, &zipped));
        let again = ingest_file(&mut store, &zipped, &opts, &mut |_| {}).unwrap();
        assert_eq!((again.total_new(), again.bytes, store.rejects(10).unwrap().len()), (0, 0, 1), "{again:?}");
    }

    /// A gzip encoder with process events `1..=n` written into it, a line each.
    fn gzip_of_rows(n: u64, level: flate2::Compression) -> flate2::write::GzEncoder<Vec<u8>> {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), level);
        for report in 1..=n {
            writeln!(
                gz,
                r#"{{"Timestamp":"2025-05-07T10:00:00Z","DeviceId":"d1","ReportId":{report},"ActionType":"x"}}"#
            )
            .unwrap();
        }
        gz
    }

    /// Whether the stored state of `path` says it is read to its end and done.
    fn done(store: &Store, path: &Path) -> bool {
        let fp = fingerprint(&File::open(path).unwrap()).unwrap();
        let state = store.source(&fp.source_id()).unwrap().unwrap();
        state.done && !has_news(&state, &fp)
    }

    /// A gzip whose content ends with a record that never finished, read as finished: the
    /// rest is kept aside once and the file is done (it was decompressed again at every
    /// look, never done).
    #[test]
    fn a_gzip_ending_with_a_torn_record_is_done_with_one_reject() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("data")).unwrap();
        let path = dir.path().join("DeviceProcessEvents.jsonl.gz");
        let mut gz = gzip_of_rows(2, flate2::Compression::default());
        gz.write_all(br#"{"Timestamp":"2025-05"#).unwrap();
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        let report = ingest_file(&mut store, &path, &IngestOptions::default(), &mut |_| {}).unwrap();
        assert_eq!(report.total_new(), 2, "{report:?}");
        let rejects = store.rejects(10).unwrap();
        assert_eq!(rejects.iter().map(|r| r.line).collect::<Vec<_>>(), vec![3], "{rejects:?}");
        assert!(done(&store, &path));
        let again = ingest_file(&mut store, &path, &IngestOptions::default(), &mut |_| {}).unwrap();
        assert_eq!((again.total_new(), store.rejects(10).unwrap().len()), (0, 1));
    }

    /// A gzip damaged partway: the lines before the damage are stored (they were dropped
    /// with the batch in hand), the rest kept aside once, and the file done.
    #[test]
    fn a_damaged_gzip_keeps_the_lines_before_the_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("data")).unwrap();
        let path = dir.path().join("DeviceProcessEvents.jsonl.gz");
        let mut bytes = gzip_of_rows(200, flate2::Compression::none()).finish().unwrap();
        // Stored blocks (no compression): their second half overwritten, the stream's
        // check at its end fails.
        let cut = bytes.len() / 2;
        bytes[cut..].iter_mut().for_each(|b| *b = 0xff);
        std::fs::write(&path, &bytes).unwrap();
        let err = ingest_file(&mut store, &path, &IngestOptions::default(), &mut |_| {}).unwrap_err();
        assert!(err.is_input_failure(), "{err}");
        let stored = store.retained().unwrap().rows.get("DeviceProcessEvents").copied().unwrap_or(0);
        assert!(stored > 50, "the lines before the damage: {stored}");
        let rejects = store.rejects(10).unwrap();
        assert_eq!(rejects.len(), 1, "{rejects:?}");
        assert!(done(&store, &path));
    }

    /// A gzip JSON array export still being written (its stream ends early) is waited
    /// for when tailing, as an uncompressed one is: no reject, nothing marked done, the
    /// rest read once it is there.
    #[test]
    fn a_gzip_array_still_being_written_is_waited_for() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("data")).unwrap();
        let row = |report: u64| {
            format!(r#"{{"Timestamp":"2025-05-07T10:00:00Z","DeviceId":"d1","ReportId":{report},"ActionType":"x"}}"#)
        };
        let text = format!("[{},\n{},\n{}]", row(1), row(2), row(3));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text.as_bytes()).unwrap();
        let whole = gz.finish().unwrap();
        let path = dir.path().join("DeviceProcessEvents.json.gz");
        std::fs::write(&path, &whole[..whole.len() * 2 / 3]).unwrap();
        let tail = IngestOptions { tail: true, ..Default::default() };
        let report = ingest_file(&mut store, &path, &tail, &mut |_| {}).unwrap();
        assert_eq!(report.total_rejected(), 0, "{report:?}");
        std::fs::write(&path, &whole).unwrap();
        let report = ingest_file(&mut store, &path, &tail, &mut |_| {}).unwrap();
        assert_eq!(report.total_rejected(), 0, "{report:?}");
        assert_eq!(store.rejects(10).unwrap().len(), 0);
        assert_eq!(store.counters().rows.values().sum::<u64>(), 3);
    }
}
