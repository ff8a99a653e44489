//! Tailing a directory of log files that a collector keeps writing and logrotate keeps
//! rotating. Each poll:
//!
//! 1. reads every file already tracked — through the descriptor opened when it was first
//!    seen, so a file renamed away or deleted is still read to its end;
//! 2. opens files not seen before; a file whose first bytes match a known file's (a
//!    copytruncate copy, or the gzip of a rotated file) continues at that file's offset
//!    instead of being read again;
//! 3. forgets deleted files that have been read to their end.
//!
//! Only complete lines are taken; a file whose first bytes changed (truncated and
//! rewritten) is read again from the start. Everything is committed through
//! [`crate::ingest::read_source`], so offsets move atomically with the rows.

use crate::error::Chain;
use crate::fingerprint::{fingerprint, head_hash, tail_matches, Fingerprint, HEAD_LEN, MIN_MATCH_LEN};
use crate::ingest::{fresh_state, has_news, read_source, state_for, IngestError, IngestOptions, IngestReport};
use crate::parse::RejectKind;
use crate::store::{OffsetUnit, RejectRecord, SourceState, Store};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct Tracked {
    path: PathBuf,
    file: File,
    state: SourceState,
    /// Seen in the directory at the last listing.
    present: bool,
}

/// Regular files in the directory with their (device, inode).
type Listing = Vec<(PathBuf, (u64, u64), Stamp)>;

/// A listed file's length and modification time: whether a file closed while idle has
/// changed since.
type Stamp = (u64, i128);

fn stamp_of(meta: &std::fs::Metadata) -> Stamp {
    (meta.len(), i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()))
}

/// How far behind the end of a file Lookout is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behind {
    pub path: String,
    pub bytes: u64,
}

pub struct Tailer {
    dir: PathBuf,
    opts: IngestOptions,
    files: HashMap<(u64, u64), Tracked>,
    /// Read-to-end files beyond this many are closed (and reopened by inode when needed).
    max_open: usize,
    skipped: BTreeMap<PathBuf, &'static str>,
    /// Files that failed to read, with their size then: retried once the size changes.
    broken: HashMap<(u64, u64), u64>,
    /// Files not read yet that look like a copy still being made (see
    /// [`Tailer::copy_in_progress`]), with their size and since when they have had it.
    copying: HashMap<(u64, u64), (u64, Instant)>,
    /// Files with a rest not read (a last line without its newline, a gzip or JSON array
    /// not finished), with their size, since when they have had it, and whether they were
    /// read as finished at that size (see [`Tailer::finish_settled`]).
    unfinished: HashMap<(u64, u64), Unfinished>,
    /// Files read to their end and closed because too many were open, as they were then:
    /// not opened again until they change.
    closed: HashMap<(u64, u64), Stamp>,
    /// Files opened as new since start.
    opened: u64,
    /// Tracked files whose last line has no newline yet: where it starts, how far it has
    /// been read with no newline so far, and the file's modification time then (see
    /// [`rest_still_open`]).
    open_rests: HashMap<(u64, u64), OpenRest>,
}

/// A last line left for later: where it starts, how far it was read with no newline, and
/// the file's modification time when that was known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OpenRest {
    start: u64,
    read_to: u64,
    mtime: i128,
}

struct Unfinished {
    size: u64,
    /// The modification time with that size: a write in place starts the wait again.
    mtime: Option<i128>,
    since: Instant,
    finished: bool,
}

/// How long a file that looks like a copy still being made may keep one size before it
/// is read as a file of its own (a copy abandoned halfway is not waited for forever).
const COPY_SETTLE: Duration = Duration::from_secs(10);

/// How long a file's unread rest may stay as it is before the file is read as finished:
/// a last line without its newline taken if it is a whole document, a gzip that ends
/// early or a JSON array never closed reported. A writer mid-line does not pause this long.
const FINISH_AFTER: Duration = Duration::from_secs(30);

impl Tailer {
    pub fn new(dir: &Path, mut opts: IngestOptions) -> Tailer {
        opts.tail = true;
        Tailer {
            dir: dir.to_path_buf(),
            opts,
            files: HashMap::new(),
            max_open: 256,
            skipped: BTreeMap::new(),
            broken: HashMap::new(),
            copying: HashMap::new(),
            unfinished: HashMap::new(),
            closed: HashMap::new(),
            opened: 0,
            open_rests: HashMap::new(),
        }
    }

    /// Fixes the ingestion time recorded for rows read from now on (the daemon's
    /// `--clock-file`); `None`: the clock.
    pub fn set_now(&mut self, now: Option<i64>) {
        self.opts.now = now;
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Entries of the directory that are regular files (not hidden, not symlinks), with
    /// their (device, inode); anything else is recorded as skipped, with the reason.
    fn list(&mut self) -> Result<Listing, IngestError> {
        let mut out = Vec::new();
        let mut skipped = BTreeMap::new();
        let entries = std::fs::read_dir(&self.dir).map_err(IngestError::unreadable("list", &self.dir))?;
        for entry in entries {
            let Ok(entry) = entry else { continue };
            let path = entry.path();
            if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                continue;
            }
            // Not following symlinks: a link could point anywhere (or at itself).
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            let reason = if meta.file_type().is_symlink() {
                "symlink"
            } else if !meta.is_file() {
                "not_a_regular_file"
            } else {
                out.push((path, (meta.dev(), meta.ino()), stamp_of(&meta)));
                continue;
            };
            skipped.insert(path, reason);
        }
        for (path, reason) in &skipped {
            if self.skipped.get(path) != Some(reason) {
                tracing::warn!(file = %path.display(), reason = %reason, "not a log file; skipped");
            }
        }
        for (path, key, _) in &out {
            if self.broken.contains_key(key) {
                skipped.insert(path.clone(), "unreadable_input");
            }
        }
        self.skipped = skipped;
        out.sort();
        Ok(out)
    }

    /// Files in the logs folder that are not read, and why.
    pub fn skipped(&self) -> &BTreeMap<PathBuf, &'static str> {
        &self.skipped
    }

    /// A tracked file's state back to what is committed of it. With nothing committed, it
    /// keeps its descriptor and is read from its start (as a file never seen is, a copy
    /// still recognised by the next look): a rotated file deleted before it could be read
    /// is read through the descriptor, as nothing else can read it again.
    fn back_to_committed(&mut self, store: &Store, key: (u64, u64)) -> Result<(), IngestError> {
        self.open_rests.remove(&key);
        let Some(t) = self.files.get_mut(&key) else { return Ok(()) };
        match store.source(&id_of(key))? {
            Some(committed) => t.state = committed,
            None => match fingerprint(&t.file) {
                Ok(fp) => t.state = fresh_state(&t.path, &fp),
                Err(e) => {
                    tracing::warn!(file = %t.path.display(), error = %e, "a log file no longer reads; forgotten");
                    self.files.remove(&key);
                }
            },
        }
        Ok(())
    }

    /// Every tracked file back to what is committed of it, after the store was reopened
    /// (the daemon's way back from a failure): reading goes on from there, and files
    /// rotated and deleted meanwhile are still read to their end through the descriptors
    /// held here, which a new tailer would not have.
    pub fn back_to_committed_all(&mut self, store: &Store) -> Result<(), IngestError> {
        let keys: Vec<(u64, u64)> = self.files.keys().copied().collect();
        for key in keys {
            self.back_to_committed(store, key)?;
        }
        self.copying.clear();
        self.open_rests.clear();
        Ok(())
    }

    /// Reading a file of `size` bytes failed. If the file could not be read (corrupt gzip,
    /// an I/O error on the file) it is skipped until it changes, and the other files go
    /// on. A store failure is returned instead.
    ///
    /// A tracked file goes back to what is committed of it (reading moves its state line
    /// by line, ahead of the batch that failed), and stays tracked: its descriptor is how a
    /// rotated file deleted since is read to its end once reading can go on.
    fn input_failed(
        &mut self,
        store: &Store,
        key: (u64, u64),
        path: &Path,
        size: u64,
        e: IngestError,
    ) -> Result<(), IngestError> {
        self.back_to_committed(store, key)?;
        match e {
            IngestError::Store(_) => Err(e),
            IngestError::DiskSpaceLow(low) => {
                // The daemon pauses until there is room.
                tracing::warn!(file = %path.display(), error = %low, "not read further for now");
                Ok(())
            }
            IngestError::ChangedWhileReading(_) => {
                // The next look sees the truncation.
                tracing::info!(file = %path.display(), "truncated while being read; looking again");
                Ok(())
            }
            e => {
                debug_assert!(e.is_input_failure());
                tracing::warn!(file = %path.display(), error = %Chain(&e), "cannot read log file; skipped until it changes");
                self.broken.insert(key, size);
                self.skipped.insert(path.to_path_buf(), "unreadable_input");
                Ok(())
            }
        }
    }

    /// One look at the directory: reads whatever is new, committing as it goes.
    pub fn poll(&mut self, store: &mut Store, stop: &AtomicBool) -> Result<IngestReport, IngestError> {
        let mut report = IngestReport::default();
        // What every known file looked like before anything is read or reset this poll.
        let before: Vec<SourceState> = self.files.values().map(|t| t.state.clone()).chain(store.sources()?).collect();
        let listing = self.list()?;
        let mut new_files = Vec::new();
        for t in self.files.values_mut() {
            t.present = false;
        }
        // Files closed while idle and not listed any more are forgotten here too.
        if !self.closed.is_empty() {
            let listed: std::collections::HashSet<(u64, u64)> = listing.iter().map(|(_, k, _)| *k).collect();
            self.closed.retain(|key, _| listed.contains(key));
        }
        for (path, key, stamp) in listing {
            match self.files.get_mut(&key) {
                Some(t) => {
                    t.present = true;
                    t.path = path;
                }
                None if self.closed.get(&key) == Some(&stamp) => {
                    // Closed while idle and unchanged: opening it again (a gzip
                    // decompressed up to its offset to check it) would be for nothing.
                }
                None => {
                    if new_files.len() + self.files.len() >= self.max_open * 2 {
                        // Bounded open files: the rest are opened on a later look.
                        continue;
                    }
                    match open_regular(&path, key) {
                        Ok(Some(f)) => {
                            self.opened += 1;
                            new_files.push((path, f));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            if self.skipped.insert(path.clone(), "unreadable").is_none() {
                                tracing::warn!(file = %path.display(), error = %e, "cannot open log file; skipped");
                            }
                        }
                    }
                }
            }
        }

        // 1. Files already tracked (rotated ones included) to their end.
        let mut keys: Vec<(u64, u64)> = self.files.keys().copied().collect();
        keys.sort_by_key(|k| (self.files[k].present, self.files[k].path.clone()));
        for key in keys {
            if stop.load(Ordering::Relaxed) {
                return Ok(report);
            }
            // A file nothing was read of yet (a copytruncate's copy is empty when it is
            // made) may be a rotated copy by now: it goes on at its original's offset.
            let (copied, partial) = match self.files.get(&key) {
                Some(t) if t.state.offset == 0 && t.state.lines == 0 && !t.state.done => {
                    let looked = fingerprint(&t.file).and_then(|fp| {
                        let copied = self.copied_from(&before, &t.file, &fp)?;
                        let partial = copied.is_none() && self.copy_in_progress(&before, &t.file, &fp)?;
                        Ok((copied, partial.then_some(fp.size)))
                    });
                    looked.unwrap_or_else(|e| {
                        tracing::debug!(file = %t.path.display(), error = %e, "cannot compare with the known files");
                        (None, None)
                    })
                }
                _ => (None, None),
            };
            if self.hold_back(key, partial) {
                continue;
            }
            let Some(t) = self.files.get_mut(&key) else { continue };
            let adopted = copied.is_some();
            if let Some(from) = copied {
                tracing::info!(file = %t.path.display(), from = %from.path, offset = from.offset, "recognised as a rotated copy; continuing at its offset");
                continue_copy(&mut t.state, &from);
            }
            let path = t.path.clone();
            // The file's size when reading it failed (0 if even that is unknown).
            let mut size = 0;
            let result = (|| -> Result<Option<IngestReport>, IngestError> {
                let fp = fingerprint(&t.file).map_err(IngestError::unreadable("read", &t.path))?;
                size = fp.size;
                if self.broken.get(&key) == Some(&fp.size) {
                    return Ok(None);
                }
                if !same_content(&t.file, &t.state, &fp).map_err(IngestError::unreadable("read", &t.path))? {
                    tracing::info!(file = %t.path.display(), "file was truncated or rewritten; reading it from the start");
                    t.state = fresh_state(&t.path, &fp);
                    self.open_rests.remove(&key);
                }
                upgrade_head(&mut t.state, &fp);
                if !has_news(&t.state, &fp) {
                    if adopted {
                        // Kept across a restart, when the original's state may be gone.
                        let mut b = store.batch();
                        b.set_source(&fp.source_id(), &t.state)?;
                        b.commit()?;
                    }
                    return Ok(None);
                }
                if rest_still_open(&mut self.open_rests, key, t, &fp)? {
                    return Ok(None);
                }
                let mtime_before = mtime_of(&t.file);
                let r = read_source(store, &t.file, &t.path, &fp, &mut t.state, &self.opts, Some(stop), &mut |_| {})?;
                remember_open_rest(&mut self.open_rests, key, mtime_before, &t.state, &r);
                Ok(Some(r))
            })();
            match result {
                Ok(Some(r)) => report.merge(r),
                Ok(None) => {}
                Err(e) => self.input_failed(store, key, &path, size, e)?,
            }
            self.finish_settled(store, key, stop, &mut report)?;
        }

        // 2. Files not seen before.
        for (path, file) in new_files {
            if stop.load(Ordering::Relaxed) {
                return Ok(report);
            }
            let Ok(meta) = file.metadata() else { continue };
            let key = (meta.dev(), meta.ino());
            if self.broken.get(&key) == Some(&meta.len()) {
                continue;
            }
            // Everything that reads the file fails one way: a file that does not read (a
            // gzip still being written, a damaged one) is skipped until it changes, instead
            // of failing the whole look; a store failure is returned.
            let read = (|| -> Result<(Fingerprint, SourceState, Option<IngestReport>), IngestError> {
                let fp = fingerprint(&file).map_err(IngestError::unreadable("read", &path))?;
                let mut state = state_for(store, &file, &fp, &path)?;
                if state.offset == 0 && !state.done {
                    let copied =
                        self.copied_from(&before, &file, &fp).map_err(IngestError::unreadable("read", &path))?;
                    if let Some(from) = copied {
                        tracing::info!(file = %path.display(), from = %from.path, offset = from.offset, "recognised as a rotated copy; continuing at its offset");
                        continue_copy(&mut state, &from);
                    } else if self
                        .copy_in_progress(&before, &file, &fp)
                        .map_err(IngestError::unreadable("read", &path))?
                    {
                        // Tracked, not read: looked at again on every poll until it is
                        // recognised as a copy or settles (`hold_back`).
                        let key = (fp.dev, fp.ino);
                        self.copying.insert(key, (fp.size, Instant::now()));
                        tracing::debug!(file = %path.display(), size = fp.size, "looks like a copy still being made; read once it is complete");
                        return Ok((fp, state, None));
                    }
                }
                if has_news(&state, &fp) {
                    let mtime_before = mtime_of(&file);
                    let r = read_source(store, &file, &path, &fp, &mut state, &self.opts, Some(stop), &mut |_| {})?;
                    remember_open_rest(&mut self.open_rests, (fp.dev, fp.ino), mtime_before, &state, &r);
                    return Ok((fp, state, Some(r)));
                }
                if store.source(&fp.source_id())?.as_ref() != Some(&state) {
                    // Remember even files with nothing to read yet (an adopted copy), and
                    // replace what is stored for a reused inode: a dead file's state left
                    // there would be found after a restart, fail to match the new content,
                    // and send this file to be read again from 0.
                    let mut b = store.batch();
                    b.set_source(&fp.source_id(), &state)?;
                    b.commit()?;
                }
                Ok((fp, state, None))
            })();
            match read {
                Ok((fp, state, read)) => {
                    if let Some(r) = read {
                        report.merge(r);
                    }
                    self.files.insert((fp.dev, fp.ino), Tracked { path, file, state, present: true });
                }
                Err(e) => {
                    let for_now = !e.is_input_failure();
                    self.input_failed(store, key, &path, meta.len(), e)?;
                    if for_now {
                        // Not read for now (the disk nearly full, the file cut meanwhile):
                        // tracked all the same, so that a rotated file deleted before reading
                        // goes on is still read, through this descriptor.
                        let state = fingerprint(&file).map(|fp| fresh_state(&path, &fp));
                        if let Ok(state) = state {
                            self.files.insert(key, Tracked { path, file, state, present: true });
                        }
                    }
                }
            }
        }

        // 3. Deleted files read to their end are forgotten; too many open read-to-end
        //    files are closed.
        let mut forget = Vec::new();
        // Deleted files whose rest could not be read even as finished: forgotten, the rest
        // kept aside as a reject.
        let mut unread: Vec<RejectRecord> = Vec::new();
        for (key, t) in &self.files {
            if !t.present && !still_linked(&t.file) {
                // A deleted file that no longer reads (a damaged gzip) has nothing more to
                // give: forgotten, not a failed look.
                let done = caught_up(t).unwrap_or_else(|e| {
                    tracing::warn!(file = %t.path.display(), error = %e, "a deleted log file no longer reads; forgotten");
                    true
                });
                let given_up = !done && self.unfinished.get(key).is_some_and(|u| u.finished);
                if given_up {
                    let size = t.file.metadata().map_or(t.state.offset, |m| m.len());
                    tracing::warn!(file = %t.path.display(), offset = t.state.offset, size, "a deleted log file ends with a record that never finished; kept aside as a reject");
                    unread.push(unfinished_rest(t, size));
                }
                if done || given_up {
                    forget.push((*key, true));
                }
            }
        }
        if self.files.len() - forget.len() > self.max_open {
            let mut idle: Vec<(u64, u64)> = self
                .files
                .iter()
                .filter(|(k, t)| t.present && !forget.iter().any(|(f, _)| f == *k) && caught_up(t).unwrap_or(false))
                .map(|(k, _)| *k)
                .collect();
            idle.sort();
            let excess = self.files.len() - forget.len() - self.max_open;
            forget.extend(idle.into_iter().take(excess).map(|k| (k, false)));
        }
        if !forget.is_empty() {
            let mut b = store.batch();
            for reject in unread {
                b.add_reject(reject)?;
            }
            for (key, deleted) in forget {
                self.copying.remove(&key);
                self.unfinished.remove(&key);
                self.open_rests.remove(&key);
                if let Some(t) = self.files.remove(&key) {
                    if !deleted {
                        if let Ok(meta) = t.file.metadata() {
                            self.closed.insert(key, stamp_of(&meta));
                        }
                    }
                    if deleted {
                        b.remove_source(&id_of(key));
                    }
                    drop(t.file);
                }
            }
            b.commit()?;
        }
        Ok(report)
    }

    /// A known file this one is a copy of (same first bytes and the same bytes before the
    /// offset), with the largest offset. `before` holds the states as they were when this
    /// poll began: the original of a copytruncate may already have been reset this poll.
    fn copied_from(
        &self,
        before: &[SourceState],
        file: &File,
        fp: &Fingerprint,
    ) -> std::io::Result<Option<SourceState>> {
        let mut best: Option<SourceState> = None;
        let known = before.iter().chain(self.files.values().map(|t| &t.state)).cloned();
        for s in known {
            if (s.dev, s.ino) == (fp.dev, fp.ino) || s.head_len < MIN_MATCH_LEN || s.head_len > fp.head_len {
                continue;
            }
            // Only line files remember the bytes before their offset; an offset is adopted
            // only if this file holds the same first bytes and the same bytes before it.
            if s.offset == 0 || s.unit != OffsetUnit::Bytes || s.tail_len == 0 {
                continue;
            }
            if best.as_ref().is_some_and(|b| b.offset >= s.offset) {
                continue;
            }
            if head_hash(file, s.head_len)?.as_deref() == Some(s.head.as_slice()) && tail_matches(file, &s)? {
                best = Some(s);
            }
        }
        Ok(best)
    }

    /// Whether a file nothing was read of starts like a known file that was read past this
    /// one's end: a copy (copytruncate's, say) still being made, which `copied_from`
    /// recognises once it holds the bytes before that file's offset. Read now, it would
    /// be read again from the start: its rows skipped as duplicates, but its rejects kept
    /// twice and its older FileProfile rows put back over newer ones.
    fn copy_in_progress(&self, before: &[SourceState], file: &File, fp: &Fingerprint) -> std::io::Result<bool> {
        let known = before.iter().chain(self.files.values().map(|t| &t.state));
        for s in known {
            if (s.dev, s.ino) == (fp.dev, fp.ino) || s.head_len < MIN_MATCH_LEN || s.head_len > fp.head_len {
                continue;
            }
            if s.unit != OffsetUnit::Bytes || s.offset <= fp.size {
                continue;
            }
            if head_hash(file, s.head_len)?.as_deref() == Some(s.head.as_slice()) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether a tracked file that looks like a copy still being made (`partial`: its size)
    /// is left unread this poll: yes while it grows, and until it has kept one size for
    /// [`COPY_SETTLE`]; then it is read as a file of its own.
    fn hold_back(&mut self, key: (u64, u64), partial: Option<u64>) -> bool {
        let Some(size) = partial else {
            self.copying.remove(&key);
            return false;
        };
        match self.copying.get(&key) {
            Some((seen, since)) if *seen == size => {
                if since.elapsed() < COPY_SETTLE {
                    return true;
                }
                if let Some(t) = self.files.get(&key) {
                    tracing::info!(file = %t.path.display(), size, "a file that looked like a copy stopped growing short of its original; read as a file of its own");
                }
                self.copying.remove(&key);
                false
            }
            _ => {
                self.copying.insert(key, (size, Instant::now()));
                true
            }
        }
    }

    /// Follows a tracked file's unread rest. Once it has stayed as it is for
    /// [`FINISH_AFTER`], the file is read once as finished (as `lookout ingest` reads a
    /// file): a last line without its newline is taken if it is a whole document, a gzip
    /// that ends early or a JSON array never closed is reported. Before, such a rest was
    /// waited for forever: its row never stored, a gzip decompressed again at every look,
    /// and a deleted file's descriptor (and disk space) held for good.
    fn finish_settled(
        &mut self,
        store: &mut Store,
        key: (u64, u64),
        stop: &AtomicBool,
        report: &mut IngestReport,
    ) -> Result<(), IngestError> {
        let Some(t) = self.files.get(&key) else {
            self.unfinished.remove(&key);
            return Ok(());
        };
        let Ok(fp) = fingerprint(&t.file) else { return Ok(()) };
        if !has_news(&t.state, &fp) {
            self.unfinished.remove(&key);
            return Ok(());
        }
        if self.broken.get(&key) == Some(&fp.size) {
            // Skipped until it changes (a finishing read that failed comes here).
            return Ok(());
        }
        let mtime = mtime_of(&t.file);
        let fresh = || Unfinished { size: fp.size, mtime, since: Instant::now(), finished: false };
        let u = self.unfinished.entry(key).or_insert_with(fresh);
        if u.size != fp.size || u.mtime != mtime {
            *u = fresh();
        }
        if u.finished || u.since.elapsed() < FINISH_AFTER {
            return Ok(());
        }
        u.finished = true;
        let Some(t) = self.files.get_mut(&key) else { return Ok(()) };
        let path = t.path.clone();
        tracing::info!(file = %path.display(), offset = t.state.offset, size = fp.size, "unchanged with a rest not read; reading it as finished");
        let opts = IngestOptions { tail: false, ..self.opts.clone() };
        match read_source(store, &t.file, &t.path, &fp, &mut t.state, &opts, Some(stop), &mut |_| {}) {
            Ok(r) => report.merge(r),
            Err(e) => {
                if !e.is_input_failure() {
                    // Not read as finished after all (the disk nearly full, the file cut, the
                    // store failing): read so again later. Taken as finished, a deleted file
                    // would be given up with whole lines still unread.
                    if let Some(u) = self.unfinished.get_mut(&key) {
                        u.finished = false;
                    }
                }
                self.input_failed(store, key, &path, fp.size, e)?
            }
        }
        Ok(())
    }

    /// Bytes not yet read, per tracked file.
    pub fn behind(&self) -> Vec<Behind> {
        let mut out: Vec<Behind> = self
            .files
            .values()
            .map(|t| {
                let size = t.file.metadata().map(|m| m.len()).unwrap_or(0);
                let bytes = match (t.state.compressed || t.state.unit == OffsetUnit::ArrayElements, t.state.done) {
                    (true, true) => 0,
                    (true, false) => size,
                    (false, _) => size.saturating_sub(t.state.offset),
                };
                Behind { path: t.path.display().to_string(), bytes }
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }
}

/// Opens `path` without following a symlink swapped in since listing, and only if it is
/// still the regular file that was listed (`None` if it changed or vanished).
fn open_regular(path: &Path, key: (u64, u64)) -> std::io::Result<Option<File>> {
    let flags = (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32;
    let f = match std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let m = f.metadata()?;
    Ok((m.is_file() && (m.dev(), m.ino()) == key).then_some(f))
}

/// A rotated copy goes on where its original was read to.
fn continue_copy(state: &mut SourceState, from: &SourceState) {
    state.offset = from.offset;
    state.unit = from.unit;
    state.lines = from.lines;
    state.tail = from.tail.clone();
    state.tail_len = from.tail_len;
}

fn id_of(key: (u64, u64)) -> Vec<u8> {
    let mut id = key.0.to_be_bytes().to_vec();
    id.extend_from_slice(&key.1.to_be_bytes());
    id
}

/// The file still starts with the bytes it started with, did not shrink below the
/// offset, and (plain line files) still holds the bytes just before the offset.
fn same_content(file: &File, state: &SourceState, fp: &Fingerprint) -> std::io::Result<bool> {
    let plain_lines = !fp.compressed && state.unit == OffsetUnit::Bytes;
    if plain_lines && fp.size < state.offset {
        return Ok(false);
    }
    if head_hash(file, state.head_len)?.as_deref() != Some(state.head.as_slice()) {
        return Ok(false);
    }
    Ok(!plain_lines || tail_matches(file, state)?)
}

/// A file first seen short gets its full-length fingerprint once it has grown
/// (`same_content` already checked the old, shorter prefix).
fn upgrade_head(state: &mut SourceState, fp: &Fingerprint) {
    if state.head_len < HEAD_LEN && fp.head_len > state.head_len {
        state.head = fp.head.clone();
        state.head_len = fp.head_len;
    }
}

/// Whether the file still has a name somewhere (a deleted file has none).
fn still_linked(file: &File) -> bool {
    file.metadata().map(|m| m.nlink() > 0).unwrap_or(false)
}

/// How many bytes of a file are read at a time looking for a newline past a rest.
const NEWLINE_SCAN: usize = 64 << 10;

/// Whether `t`'s last line, left for later by an earlier read, is still without its
/// newline: only the bytes the file gained since are looked at. A writer that keeps one
/// line open (a line over `max_line_bytes` still being written, say) would otherwise have
/// the whole line read again at every look, however long it has grown. Once the newline
/// is there (or the file is not as it was: cut, or written in place without growing), the
/// file is read as usual.
fn rest_still_open(
    open_rests: &mut HashMap<(u64, u64), OpenRest>,
    key: (u64, u64),
    t: &Tracked,
    fp: &Fingerprint,
) -> Result<bool, IngestError> {
    let Some(&rest) = open_rests.get(&key) else { return Ok(false) };
    let mtime = mtime_of(&t.file);
    let usable = rest.start == t.state.offset
        && !t.state.compressed
        && t.state.unit == OffsetUnit::Bytes
        && fp.size >= rest.read_to
        // Not grown, yet written: changed in place (a writer that extends the file before
        // it fills it in) — read it all again.
        && (fp.size > rest.read_to || mtime == Some(rest.mtime));
    if !usable {
        open_rests.remove(&key);
        return Ok(false);
    }
    let mut buf = vec![0u8; NEWLINE_SCAN.min((fp.size - rest.read_to) as usize)];
    let mut at = rest.read_to;
    while at < fp.size {
        let want = NEWLINE_SCAN.min((fp.size - at) as usize);
        let n = t.file.read_at(&mut buf[..want], at).map_err(IngestError::unreadable("read", &t.path))?;
        if n == 0 {
            break;
        }
        if memchr::memchr(b'\n', &buf[..n]).is_some() {
            open_rests.remove(&key);
            return Ok(false);
        }
        at += n as u64;
    }
    open_rests.insert(key, OpenRest { read_to: at, mtime: settled_mtime(mtime), ..rest });
    Ok(true)
}

/// A file's modification time (ns), if it can be read.
fn mtime_of(file: &File) -> Option<i128> {
    file.metadata().ok().map(|m| stamp_of(&m).1)
}

/// A modification time that a later write is sure to change: one less than a second old
/// may be shared by a write still to come on a file system that keeps whole seconds, so
/// it is taken as no time at all (the next look that finds the file not grown reads it).
fn settled_mtime(mtime: Option<i128>) -> i128 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
    match mtime {
        Some(m) if now - m >= 1_000_000_000 => m,
        _ => i128::MIN,
    }
}

/// Remembers, after a read, where the file's last line starts and how far it was read
/// when the read left it for later (see [`rest_still_open`]), with the file's
/// modification time from before the read (`mtime_before`): a write during the read
/// changes it.
fn remember_open_rest(
    open_rests: &mut HashMap<(u64, u64), OpenRest>,
    key: (u64, u64),
    mtime_before: Option<i128>,
    state: &SourceState,
    report: &IngestReport,
) {
    match report.unfinished_rest {
        Some((start, read_to)) if start == state.offset && read_to > start => {
            open_rests.insert(key, OpenRest { start, read_to, mtime: settled_mtime(mtime_before) });
        }
        _ => {
            open_rests.remove(&key);
        }
    }
}

/// The reject of a deleted file's rest that never finished (`size`: the file's length).
fn unfinished_rest(t: &Tracked, size: u64) -> RejectRecord {
    let mut excerpt = vec![0u8; size.saturating_sub(t.state.offset).min(256) as usize];
    let read = if t.state.compressed || t.state.unit != OffsetUnit::Bytes {
        0
    } else {
        std::os::unix::fs::FileExt::read_at(&t.file, &mut excerpt, t.state.offset).unwrap_or(0)
    };
    RejectRecord {
        file: t.path.display().to_string(),
        line: t.state.lines + 1,
        offset: t.state.offset,
        kind: RejectKind::MalformedJson.as_str().to_string(),
        reason: format!(
            "the file was deleted with a record that never finished ({} bytes from here, {})",
            size.saturating_sub(t.state.offset),
            match (t.state.compressed, t.state.unit) {
                (true, _) => "a gzip stream that ends early",
                (false, OffsetUnit::ArrayElements) => "a JSON array never closed",
                _ => "no newline and not a whole document",
            }
        ),
        excerpt: String::from_utf8_lossy(&excerpt[..read]).into_owned(),
    }
}

fn caught_up(t: &Tracked) -> std::io::Result<bool> {
    let fp = fingerprint(&t.file)?;
    Ok(!has_news(&t.state, &fp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// Process events `first..first + n`, one a line.
    fn append(path: &Path, first: u64, n: u64) {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        for i in first..first + n {
            writeln!(f, r#"{{"Timestamp":"2025-05-07T10:00:00Z","DeviceId":"d1","ReportId":{i},"ActionType":"x"}}"#)
                .unwrap();
        }
    }

    fn rows(report: &IngestReport) -> u64 {
        report.new_rows.values().sum()
    }

    fn setup() -> (tempfile::TempDir, PathBuf, Store, Tailer) {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        let store = Store::open(&dir.path().join("data")).unwrap();
        let now = lookout_plugin_sdk::time::parse_timestamp("2025-05-07T12:00:00Z");
        let tailer = Tailer::new(&logs, IngestOptions { now, ..Default::default() });
        (dir, logs, store, tailer)
    }

    /// A file that could not be read further for now (the disk nearly full) stays open: a
    /// rotated file deleted meanwhile is read to its end once reading goes on.
    #[test]
    fn a_file_deleted_while_reading_paused_is_read_to_its_end() {
        let (_dir, logs, mut store, mut tailer) = setup();
        let path = logs.join("DeviceProcessEvents.jsonl");
        append(&path, 0, 500);
        let stop = AtomicBool::new(false);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 500);
        append(&path, 500, 500);
        let meta = std::fs::metadata(&path).unwrap();
        let key = (meta.dev(), meta.ino());
        std::fs::remove_file(&path).unwrap();
        let low = IngestError::DiskSpaceLow(crate::disk::DiskSpaceLow(logs.display().to_string()));
        tailer.input_failed(&store, key, &path, meta.len(), low).unwrap();
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 500, "the rest of the deleted file");
    }

    /// A deleted file's rest that could not be read as finished because the disk was
    /// nearly full is not given up: it is read once there is room (it used to be taken
    /// for read as finished, and its whole lines kept aside as one reject).
    #[test]
    fn a_deleted_file_not_read_as_finished_for_lack_of_room_is_not_given_up() {
        let (_dir, logs, mut store, mut tailer) = setup();
        let path = logs.join("DeviceProcessEvents.jsonl");
        append(&path, 0, 500);
        let stop = AtomicBool::new(false);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 500);
        append(&path, 500, 500);
        std::fs::remove_file(&path).unwrap();
        let data = store.data_dir().to_path_buf();
        crate::disk::LOW_FOR_TESTS.lock().unwrap().push(data.clone());
        assert!(tailer.poll(&mut store, &stop).is_ok());
        // Settled long ago: the next look reads it as finished, which fails as well.
        let key = *tailer.files.keys().next().unwrap();
        tailer.unfinished.get_mut(&key).unwrap().since = Instant::now().checked_sub(FINISH_AFTER * 2).unwrap();
        assert!(tailer.poll(&mut store, &stop).is_ok());
        assert_eq!(tailer.files.len(), 1, "still held: its rest is whole lines, not read yet");
        crate::disk::LOW_FOR_TESTS.lock().unwrap().retain(|d| *d != data);
        let report = tailer.poll(&mut store, &stop).unwrap();
        assert_eq!((rows(&report), store.rejects(10).unwrap().len()), (500, 0));
        tailer.poll(&mut store, &stop).unwrap();
        assert!(tailer.files.is_empty(), "forgotten once read to its end");
    }

    /// A file first seen while the disk is nearly full, then deleted (rotated away) before
    /// there is room: it is still read to its end, through the descriptor kept (it used to
    /// be dropped, and its rows lost).
    #[test]
    fn a_new_file_seen_without_room_and_deleted_is_still_read() {
        let (_dir, logs, mut store, mut tailer) = setup();
        let path = logs.join("DeviceProcessEvents.jsonl");
        append(&path, 0, 300);
        let data = store.data_dir().to_path_buf();
        crate::disk::LOW_FOR_TESTS.lock().unwrap().push(data.clone());
        let stop = AtomicBool::new(false);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 0);
        std::fs::remove_file(&path).unwrap();
        crate::disk::LOW_FOR_TESTS.lock().unwrap().retain(|d| *d != data);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 300);
        tailer.poll(&mut store, &stop).unwrap();
        assert!(tailer.files.is_empty(), "forgotten once read to its end");
    }

    /// A read that failed partway through a batch goes back to what is committed: the
    /// lines of the batch it dropped are read again once the file changes, and only they.
    #[test]
    fn a_failed_read_goes_back_to_what_is_committed() {
        let (_dir, logs, mut store, mut tailer) = setup();
        let path = logs.join("DeviceProcessEvents.jsonl");
        append(&path, 0, 300);
        let stop = AtomicBool::new(false);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 300);
        append(&path, 300, 300);
        let meta = std::fs::metadata(&path).unwrap();
        let key = (meta.dev(), meta.ino());
        // As reading leaves it when the batch fails: past lines never committed.
        let tracked = tailer.files.get_mut(&key).unwrap();
        tracked.state.offset = meta.len() - 100;
        let failed = IngestError::ReadAt {
            path: path.clone(),
            at: meta.len() - 100,
            source: std::io::Error::other("device error"),
        };
        tailer.input_failed(&store, key, &path, meta.len(), failed).unwrap();
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 0, "skipped until it changes");
        append(&path, 600, 1);
        let report = tailer.poll(&mut store, &stop).unwrap();
        // From where the last commit left it, not from the start (which would take the
        // rows again, kept once, but the rejects and profiles twice).
        assert_eq!((rows(&report), report.duplicates), (301, 0));
    }

    /// A copytruncate's copy seen while still empty (logrotate creates it, then copies
    /// into it) is recognised as a copy once it is filled: it goes on at the original's
    /// offset instead of being read again from the start.
    #[test]
    fn a_copy_first_seen_empty_continues_at_its_originals_offset() {
        let (_dir, logs, mut store, mut tailer) = setup();
        let path = logs.join("DeviceProcessEvents.log");
        append(&path, 0, 400);
        let stop = AtomicBool::new(false);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 400);
        let copy = logs.join("DeviceProcessEvents.log.1");
        std::fs::File::create(&copy).unwrap();
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 0);
        std::fs::copy(&path, &copy).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
        append(&path, 400, 10);
        let report = tailer.poll(&mut store, &stop).unwrap();
        assert_eq!((rows(&report), report.duplicates), (10, 0), "{report:?}");
    }

    /// A copytruncate's copy seen while the copy is being made (part of the original's
    /// bytes in it) is not read from the start: it waits, and goes on at the original's
    /// offset once complete. One that stops growing short of it is read after a while.
    #[test]
    fn a_copy_seen_half_made_continues_at_its_originals_offset() {
        let (_dir, logs, mut store, mut tailer) = setup();
        let path = logs.join("DeviceProcessEvents.log");
        append(&path, 0, 400);
        let stop = AtomicBool::new(false);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 400);
        let whole = std::fs::read(&path).unwrap();
        let copy = logs.join("DeviceProcessEvents.log.1");
        std::fs::write(&copy, &whole[..whole.len() / 3]).unwrap();
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 0, "new, and being copied");
        std::fs::write(&copy, &whole[..whole.len() / 2]).unwrap();
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 0, "tracked, still being copied");
        std::fs::write(&copy, &whole).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
        append(&path, 400, 10);
        let report = tailer.poll(&mut store, &stop).unwrap();
        assert_eq!((rows(&report), report.duplicates), (10, 0), "{report:?}");

        // A copy abandoned halfway is read as a file of its own once it has kept its size.
        let other = logs.join("DeviceProcessEvents.log.2");
        std::fs::write(&other, &whole[..whole.len() / 2]).unwrap();
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 0);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 0, "has not settled yet");
        let meta = std::fs::metadata(&other).unwrap();
        let since = Instant::now().checked_sub(COPY_SETTLE + Duration::from_secs(1)).unwrap();
        tailer.copying.insert((meta.dev(), meta.ino()), (meta.len(), since));
        let report = tailer.poll(&mut store, &stop).unwrap();
        assert_eq!(report.duplicates, 200, "read from its start: {report:?}");
    }

    /// The daemon's way back from a failure: the store reopened, the same tailer brought
    /// back to what is committed. A rotated file deleted meanwhile, with lines not read,
    /// is read to its end (and nothing read but not committed is lost).
    #[test]
    fn after_the_store_is_reopened_a_deleted_file_is_read_to_its_end() {
        let (dir, logs, mut store, mut tailer) = setup();
        let path = logs.join("DeviceProcessEvents.jsonl");
        append(&path, 0, 500);
        let stop = AtomicBool::new(false);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 500);
        append(&path, 500, 500);
        let meta = std::fs::metadata(&path).unwrap();
        // Read past what is committed when the failure came.
        tailer.files.get_mut(&(meta.dev(), meta.ino())).unwrap().state.offset = meta.len() - 100;
        std::fs::remove_file(&path).unwrap();
        drop(store);
        let mut store = Store::open(&dir.path().join("data")).unwrap();
        tailer.back_to_committed_all(&store).unwrap();
        let report = tailer.poll(&mut store, &stop).unwrap();
        assert_eq!((rows(&report), report.duplicates), (500, 0));
        assert!(tailer.files.is_empty(), "read to its end and forgotten");
    }

    /// Makes the rest of `key`'s file look unchanged for longer than [`FINISH_AFTER`].
    fn settle(tailer: &mut Tailer, path: &Path) {
        let meta = std::fs::metadata(path).unwrap();
        let u = tailer.unfinished.get_mut(&(meta.dev(), meta.ino())).expect("followed as unfinished");
        u.since = Instant::now().checked_sub(FINISH_AFTER + Duration::from_secs(1)).unwrap();
    }

    /// A last line without its newline that stays so is taken once it has been unchanged
    /// for a while, if it is a whole document (as `lookout ingest` takes it); a line
    /// appended after it is read on from there.
    #[test]
    fn a_last_line_without_its_newline_is_taken_once_the_file_settles() {
        let (_dir, logs, mut store, mut tailer) = setup();
        let path = logs.join("DeviceProcessEvents.jsonl");
        append(&path, 0, 3);
        let last = r#"{"Timestamp":"2025-05-07T10:00:00Z","DeviceId":"d1","ReportId":3,"ActionType":"x"}"#;
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(last.as_bytes()).unwrap();
        let stop = AtomicBool::new(false);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 3);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 0, "a writer may be mid-line");
        settle(&mut tailer, &path);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 1, "taken once settled");
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"\n").unwrap();
        append(&path, 4, 2);
        let report = tailer.poll(&mut store, &stop).unwrap();
        assert_eq!((rows(&report), report.total_rejected(), report.duplicates), (2, 0, 0), "{report:?}");
    }

    /// A deleted file whose last record never finished is given up once settled: the rest
    /// kept aside as a reject with its file and offset, the file forgotten (its
    /// descriptor, and the disk space, no longer held).
    #[test]
    fn a_deleted_file_with_a_record_that_never_finished_is_forgotten_with_a_reject() {
        let (_dir, logs, mut store, mut tailer) = setup();
        let path = logs.join("DeviceProcessEvents.jsonl");
        append(&path, 0, 3);
        let offset = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(br#"{"Timestamp":"2025-05"#).unwrap();
        let stop = AtomicBool::new(false);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 3);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 0);
        assert_eq!(tailer.files.len(), 1, "a writer may still finish it");
        let key = *tailer.files.keys().next().unwrap();
        tailer.unfinished.get_mut(&key).unwrap().since = Instant::now().checked_sub(FINISH_AFTER * 2).unwrap();
        tailer.poll(&mut store, &stop).unwrap();
        assert!(tailer.files.is_empty(), "forgotten");
        let rejects = store.rejects(10).unwrap();
        assert_eq!(rejects.len(), 1, "{rejects:?}");
        assert_eq!((rejects[0].offset, rejects[0].line, rejects[0].kind.as_str()), (offset, 4, "malformed_json"));
        assert!(rejects[0].excerpt.starts_with(r#"{"Timestamp":"#), "{rejects:?}");
    }

    /// More finished files than may stay open: those closed while idle are not opened
    /// again at every look (a gzip would be decompressed to its offset each time), only
    /// once they change.
    #[test]
    fn files_closed_while_idle_are_opened_again_only_once_they_change() {
        let (_dir, logs, mut store, mut tailer) = setup();
        tailer.max_open = 2;
        for i in 0..4u64 {
            append(&logs.join(format!("DeviceProcessEvents-{i}.jsonl")), i * 10, 10);
        }
        let stop = AtomicBool::new(false);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 40);
        assert_eq!((tailer.files.len(), tailer.opened), (2, 4));
        for _ in 0..3 {
            assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 0);
        }
        assert_eq!(tailer.opened, 4, "nothing opened again");
        // One of the closed ones grows: opened again, read on from its offset.
        let closed = tailer.closed.keys().copied().collect::<Vec<_>>();
        let grown = std::fs::read_dir(&logs)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let m = std::fs::metadata(p).unwrap();
                closed.contains(&(m.dev(), m.ino()))
            })
            .unwrap();
        append(&grown, 100, 1);
        let report = tailer.poll(&mut store, &stop).unwrap();
        assert_eq!((rows(&report), report.duplicates, tailer.opened), (1, 0, 5));
    }

    fn write_more(path: &Path, bytes: &[u8]) {
        std::fs::OpenOptions::new().append(true).open(path).unwrap().write_all(bytes).unwrap();
    }

    /// A last line that keeps growing without its newline is read once: later looks read
    /// only what it gained. When its newline comes it is stored whole, and the lines after
    /// it too. Reading the whole rest at every look made a line of gigabytes (a writer
    /// that never ends its line) cost a full read of it at every append.
    #[test]
    fn a_growing_last_line_is_not_read_again_at_every_look() {
        let (_dir, logs, mut store, mut tailer) = setup();
        let path = logs.join("DeviceProcessEvents.jsonl");
        append(&path, 0, 2);
        let head = r#"{"Timestamp":"2025-05-07T10:00:00Z","DeviceId":"d1","ReportId":2,"ActionType":""#;
        write_more(&path, head.as_bytes());
        write_more(&path, &vec![b'x'; 200_000]);
        let stop = AtomicBool::new(false);
        let first = tailer.poll(&mut store, &stop).unwrap();
        assert_eq!(rows(&first), 2);
        assert!(first.bytes > 200_000, "the rest was read once: {first:?}");
        for _ in 0..3 {
            write_more(&path, &vec![b'x'; 1000]);
            let report = tailer.poll(&mut store, &stop).unwrap();
            assert_eq!((rows(&report), report.bytes), (0, 0), "only the bytes gained looked at: {report:?}");
        }
        write_more(&path, b"\"}\n");
        append(&path, 3, 1);
        let report = tailer.poll(&mut store, &stop).unwrap();
        assert_eq!((rows(&report), report.total_rejected(), report.duplicates), (2, 0, 0), "{report:?}");
    }

    /// A file written in place over its open last line, without growing (a writer that
    /// extends a file before it fills it in), is read again: the lines written there are
    /// stored.
    #[test]
    fn a_rest_written_in_place_without_growing_is_read_again() {
        use std::os::unix::fs::FileExt as _;
        let (_dir, logs, mut store, mut tailer) = setup();
        let path = logs.join("DeviceProcessEvents.jsonl");
        // Past the first KiB, which tells a rewritten file from this one.
        append(&path, 0, 20);
        let start = std::fs::metadata(&path).unwrap().len();
        assert!(start > 1024);
        write_more(&path, &vec![b' '; 20_000]);
        let stop = AtomicBool::new(false);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 20);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 0);
        let line =
            r#"{"Timestamp":"2025-05-07T10:00:00Z","DeviceId":"d1","ReportId":99,"ActionType":"x"}"#.to_string() + "\n";
        std::thread::sleep(Duration::from_millis(20));
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(line.as_bytes(), start).unwrap();
        let report = tailer.poll(&mut store, &stop).unwrap();
        assert_eq!(
            (rows(&report), report.duplicates),
            (1, 0),
            "the line written in place, read from the rest: {report:?}"
        );
    }

    /// A file rewritten from its start while its last line was open is read again from
    /// the start, its new lines all of them, not only past where the old line was read to.
    #[test]
    fn a_rewritten_file_with_an_open_last_line_is_read_from_its_start() {
        let (_dir, logs, mut store, mut tailer) = setup();
        let path = logs.join("DeviceProcessEvents.jsonl");
        std::fs::write(&path, vec![b'x'; 20_000]).unwrap();
        let stop = AtomicBool::new(false);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 0);
        assert_eq!(rows(&tailer.poll(&mut store, &stop).unwrap()), 0);
        // Truncated and written again, longer, the newlines all before the old read end.
        std::fs::write(&path, b"").unwrap();
        append(&path, 10, 60);
        write_more(&path, &vec![b'y'; 20_000]);
        let report = tailer.poll(&mut store, &stop).unwrap();
        assert_eq!(rows(&report), 60, "{report:?}");
    }
}
