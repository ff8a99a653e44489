//! The findings JSONL: written from the results tree through its own cursor, so that a
//! crash at any point leaves every finding in the file exactly once — and no byte that
//! Lookout did not write is ever removed.
//!
//! The cursor (per file path) records the next outbox sequence, and the identity of the
//! file it was committed against: device, inode, length, and a hash of the bytes just
//! before that length. On the next flush:
//! - the same file, at least as long: the lines past the committed length are walked
//!   against the findings that come next; a line equal to the next of them was written
//!   but not committed (it counts as written), a torn last line that begins it is cut,
//!   and every other line is someone else's — another tool, or another store writing the
//!   same file, as a Kafka node's partitions do — and is kept, with Lookout's lines
//!   appended after it;
//! - any other file at that path (rotated by rename, copytruncated, replaced, deleted, or
//!   rewritten in place): it is new to the outbox, so its content is kept and the
//!   findings not yet written anywhere are appended after it (after a newline, if its last
//!   line lacks one). Before the first line goes to a file new to the outbox, the cursor
//!   is committed against it, so a crash mid-write is repaired as above — unless the
//!   file holds findings of this store's still to write (see the last case: it is read
//!   for them again after a crash, if not rotated again first). If the file the
//!   cursor was committed against is still in the folder under another name (rotated by
//!   rename), the lines it holds past the committed length that Lookout wrote and did not
//!   commit (a crash between the two) count as written, as in the first case; so do
//!   those of a copy of it beside it (logrotate's `copytruncate`), recognised by the
//!   bytes before the committed length.
//! - no cursor for the path, and a file already there (a new data directory writing
//!   where an earlier one did, or the same file reached by another path): the findings
//!   whose id a line of the file already has count as written (`lookout detect`, `run`
//!   and `ingest`; a Kafka node knows what is written from the findings topic instead).
//!   A line longer than a MiB is read by its beginning alone, and counts only if it is
//!   as long as the finding's line (a torn one, ended by another writer, begins with the
//!   id too).
//!   So do they in a file new to the outbox, and in one committed empty whose flush was
//!   cut short (a Kafka node's too): a flush that a copytruncate cut under its writes
//!   writes again what the cut lost, and if that fails, the lines it wrote after the cut
//!   have no cursor to say they are its own. (Rotated again before the next flush, they
//!   are in a file no cursor recognises, and are written again. And with no cursor
//!   committed before its writes, a line such a flush tears in a crash is recognised only
//!   by this store's next flush: on a Kafka node another partition's may end it first.)

use crate::error::{StoreContext as _, StoreError};
use crate::store::Store;
type Result<T, E = StoreError> = std::result::Result<T, E>;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// How many bytes before the committed length are hashed to recognise the file.
const TAIL_CHECK: u64 = 512;

/// The outbox cursor of one findings path, as committed (stored value, version 2).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
struct OutboxCursor {
    next_seq: u64,
    dev: u64,
    ino: u64,
    file_len: u64,
    /// SHA-256 of the `min(file_len, TAIL_CHECK)` bytes before `file_len`.
    tail_hash: Vec<u8>,
}

/// The names a findings path's cursor goes under: the name it is written under, and the
/// one an older Lookout wrote it under, if another. A file inside the data directory (the
/// default `<data>/findings.jsonl`) is named relative to it, so a data directory moved or
/// copied elsewhere (a backup restored at another path) still knows what its findings
/// file holds and does not write every finding into it again; any other file by its
/// absolute path, as before.
fn cursor_names(store: &Store, path: &Path) -> (String, Option<String>) {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let abs = absolute(path);
    let by_path = format!("outbox-file:{}", abs.display());
    match abs.strip_prefix(absolute(store.data_dir())) {
        Ok(inside) => (format!("outbox-data:{}", inside.display()), Some(by_path)),
        Err(_) => (by_path, None),
    }
}

/// The name `path`'s cursor is written under, and the cursor as committed (under that
/// name or the older one).
fn read_cursor(store: &Store, path: &Path) -> Result<(String, Option<OutboxCursor>)> {
    let (name, older_name) = cursor_names(store, path);
    let cursor: Option<OutboxCursor> = match store.meta_value(&name)? {
        Some(c) => Some(c),
        None => older_name.map(|n| store.meta_value(&n)).transpose()?.flatten(),
    };
    Ok((name, cursor))
}

/// Cuts a torn last line of this store's own from `path` (a crash mid-write), writing
/// nothing else. Several stores write one file on a Kafka node (a store per partition),
/// and each flush only recognises its own store's torn line: another store's flush first
/// would end it with a newline and leave it in the file for good. So a node runs this for
/// each partition it takes over, before the partitions taken over with it write.
pub fn cut_torn_tail(store: &Store, path: &Path) -> Result<()> {
    let (_, Some(cursor)) = read_cursor(store, path)? else { return Ok(()) };
    let Ok(meta) = std::fs::metadata(path) else { return Ok(()) };
    let len = meta.len();
    if (meta.dev(), meta.ino()) != (cursor.dev, cursor.ino) || len <= cursor.file_len {
        return Ok(());
    }
    let file = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) => {
            // Nor can it be written now: the writes wait for it, and a line torn then is
            // kept (this store's findings in it are written again whole).
            tracing::warn!(file = %path.display(), error = %e, "cannot open the findings file; a torn last line is not looked for");
            return Ok(());
        }
    };
    if tail_hash(&file, cursor.file_len).with_context(|| format!("cannot read {}", path.display()))? != cursor.tail_hash
    {
        return Ok(());
    }
    let (_, keep) = adopt_own_tail(store, &file, cursor.file_len, len, cursor.next_seq, &|_| false)
        .with_context(|| format!("cannot read the tail of {}", path.display()))?;
    if keep < len {
        cut_at(&file, path, len, keep)?;
    }
    Ok(())
}

/// Cuts the torn line found at `keep` in `file` (read at length `len`), unless the file
/// has changed length since (cut by a copytruncate meanwhile): `set_len` would then grow
/// it into a hole of NUL bytes. Returns the file's length after: `keep` when cut, else
/// its length now (what is written next goes after that, not after `keep`).
fn cut_at(file: &File, path: &Path, len: u64, keep: u64) -> Result<u64> {
    let now = file.metadata().with_context(|| format!("cannot stat findings file {}", path.display()))?.len();
    if now != len {
        tracing::info!(file = %path.display(), was = len, now, "findings file changed length while read; its torn line is not cut");
        return Ok(now);
    }
    tracing::info!(file = %path.display(), from = len, to = keep, "cutting a torn findings line");
    file.set_len(keep).with_context(|| format!("cannot truncate {}", path.display()))?;
    Ok(keep)
}

/// SHA-256 of the `min(len, TAIL_CHECK)` bytes before `len`.
fn tail_hash(file: &File, len: u64) -> std::io::Result<Vec<u8>> {
    let n = len.min(TAIL_CHECK);
    let mut buf = vec![0u8; n as usize];
    file.read_exact_at(&mut buf, len - n)?;
    Ok(Sha256::digest(&buf).to_vec())
}

/// How many findings of the outbox are not written to `path` yet (some of them may be
/// passed over when they are, as written elsewhere already).
pub fn unwritten(store: &Store, path: &Path) -> Result<u64> {
    let (_, cursor) = read_cursor(store, path)?;
    let next_seq = cursor.as_ref().map_or(1, |c| c.next_seq);
    Ok(store.next_outbox_seq()?.saturating_sub(next_seq))
}

/// Whether a failure of [`flush_outbox`] is the findings file's (it cannot be opened,
/// written or read: a folder in its place, its permissions, its own disk full), not the
/// store's: every error of the file's is an I/O error under its context, where the
/// store's own come from the database.
pub fn is_file_failure(e: &StoreError) -> bool {
    match e {
        StoreError::Io(_) => true,
        StoreError::Context { source, .. } => is_file_failure(source),
        _ => false,
    }
}

/// Appends every finding not yet in `path` to it; returns how many lines were written.
pub fn flush_outbox(store: &mut Store, path: &Path) -> Result<u64> {
    flush(store, path, &|_| false, true)
}

/// Like [`flush_outbox`], leaving out the findings `skip` says are written elsewhere
/// already (a Kafka node's partition taken over: what the previous owner found). A
/// skipped finding is passed over for good, as if written. A file this store has no
/// cursor for is not read for the ids it holds: `skip` says what is written.
pub fn flush_outbox_except(store: &mut Store, path: &Path, skip: &dyn Fn(&[u8]) -> bool) -> Result<u64> {
    flush(store, path, skip, false)
}

fn flush(store: &mut Store, path: &Path, skip: &dyn Fn(&[u8]) -> bool, ids_if_new: bool) -> Result<u64> {
    let (name, cursor) = read_cursor(store, path)?;
    let next_seq = cursor.as_ref().map_or(1, |c| c.next_seq);
    let pending = store.outbox_has_from(next_seq)?;
    let on_disk = std::fs::metadata(path).ok();
    if !pending {
        if let (Some(c), Some(m)) = (&cursor, &on_disk) {
            if (m.dev(), m.ino()) == (c.dev, c.ino) && m.len() >= c.file_len {
                // Nothing new, and the file is the one we left (others may have appended to
                // it: a Kafka node's other partitions): no disk work at all. Nothing of
                // this store's can be uncommitted in it, since nothing is pending.
                return Ok(0);
            }
        }
    }
    // Findings must be durable before they leave the process.
    store.flush()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Appending whatever the file's length when a write lands: a file copytruncated by
    // the operator while Lookout writes gets its lines at its new end, not after a hole.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("cannot open findings file {}", path.display()))?;
    let meta = file.metadata().with_context(|| format!("cannot stat findings file {}", path.display()))?;
    let len = meta.len();
    if on_disk.is_none() {
        // Created here: its name must outlive a power cut once the cursor names its inode.
        sync_dir(path).with_context(|| format!("cannot sync the folder of {}", path.display()))?;
    }
    let same_file = match &cursor {
        Some(c) => {
            (c.dev, c.ino) == (meta.dev(), meta.ino())
                && len >= c.file_len
                && tail_hash(&file, c.file_len).with_context(|| format!("cannot read {}", path.display()))?
                    == c.tail_hash
        }
        None => false,
    };
    let (mut next, mut end) = (next_seq, len);
    if same_file {
        let committed = cursor.as_ref().map_or(0, |c| c.file_len);
        let (seq, keep) = adopt_own_tail(store, &file, committed, len, next_seq, skip)
            .with_context(|| format!("cannot read the tail of {}", path.display()))?;
        next = seq;
        end = if keep < len { cut_at(&file, path, len, keep)? } else { keep };
    }
    // Set while a cursor committed before writing stands (a crash came before the one
    // after): only then can a file committed empty hold lines of this store's elsewhere.
    let writing_name = format!("{name}~writing");
    let flag_set = cursor.is_some() && store.meta_value::<bool>(&writing_name)?.unwrap_or(false);
    let was_writing = flag_set && same_file && cursor.as_ref().is_some_and(|c| c.file_len == 0) && len > 0;
    if let Some(c) = cursor.as_ref().filter(|c| !same_file || (c.file_len == 0 && (len == 0 || was_writing))) {
        if !same_file {
            tracing::info!(file = %path.display(), "findings file is new to Lookout (rotated or replaced); appending after its content");
        }
        // Rotated (renamed, or copied and truncated) after a crash between a write and its
        // cursor: the lines written then are in the file under its other name, and count
        // as written. (A file committed empty just before a write cut short may have been
        // copied and truncated since, too, and written to by another store after: its
        // tail is no proof.)
        for (moved, moved_len, moved_path) in rotated_originals(path, c) {
            let (seq, _) = adopt_own_tail(store, &moved, c.file_len, moved_len, next_seq, skip)
                .with_context(|| format!("cannot read the tail of {}", moved_path.display()))?;
            if seq > next {
                tracing::info!(file = %moved_path.display(), written = seq - next, "findings written before a crash are in the rotated file; not written again");
                next = seq;
            }
        }
    }
    // Read for the findings it holds (below): a file this store has no cursor for, if
    // asked (a Kafka node knows from the findings topic what an earlier owner wrote);
    // one its cursor is not of (rotated, or copytruncated under a flush's writes), or one
    // committed empty whose flush was cut short. Lines of this store's can be in those
    // with no cursor to say so: written after a copytruncate cut the file under the
    // writes, when writing again what the cut lost failed; or written into a file that
    // held findings already, for which no cursor is committed before writing (below).
    let read_for_ids = end > 0
        && match &cursor {
            None => ids_if_new,
            Some(_) => !same_file || was_writing,
        };
    if read_for_ids {
        // A line of this store's torn by a crash or a failure then is recognised here.
        let torn = torn_own_line(store, &file, end, next).with_context(|| format!("cannot read {}", path.display()))?;
        if let Some(keep) = torn {
            end = cut_at(&file, path, end, keep)?;
        }
    }
    end = end_with_newline(&mut file, end).with_context(|| format!("cannot write {}", path.display()))?;
    // Such a file may hold its findings already (a new data directory writing where an
    // earlier one did; lines a flush wrote after a copytruncate, when the writing again
    // of what the cut lost failed): those count as written.
    // Only this store's findings still to write are kept: other stores' (a Kafka node's
    // other partitions, writing the file after a rotation) must not keep the cursor from
    // being committed before the writes (below).
    let known: std::collections::HashSet<String> = if read_for_ids {
        let in_file = finding_ids_in(&file, end).with_context(|| format!("cannot read {}", path.display()))?;
        let mut own = std::collections::HashSet::new();
        if !in_file.is_empty() {
            for entry in store.outbox_from(next) {
                let (_, json) = entry?;
                // Those passed over anyway (written elsewhere) are not to write.
                if skip(&json) {
                    continue;
                }
                if let Some(id) = finding_id(&json).filter(|id| in_file.holds(id, json.len())) {
                    own.insert(id);
                }
            }
        }
        if !own.is_empty() {
            tracing::info!(file = %path.display(), findings = own.len(), "findings file already holds findings of this data directory's; those are not written again");
        }
        own
    } else {
        Default::default()
    };
    let mut set_now = false;
    if !same_file && known.is_empty() {
        // Commit against the file before writing into it, so a crash mid-write leaves a
        // tail that the next flush recognises as Lookout's own. (With findings of this
        // store's still to write already in it, not: the next flush's walk of the tail
        // would not pass over them. A crash mid-write leaves the file to be read for ids
        // again, and what was written by then is among them.)
        let at = OutboxCursor {
            next_seq: next,
            dev: meta.dev(),
            ino: meta.ino(),
            file_len: end,
            tail_hash: tail_hash(&file, end).with_context(|| format!("cannot read {}", path.display()))?,
        };
        store.put_meta_value(&name, &at)?;
        store.put_meta_value(&writing_name, &true)?;
        store.flush()?;
        set_now = true;
    } else if pending && !flag_set && same_file && cursor.as_ref().is_some_and(|c| c.file_len == 0) {
        // Writing into a file its standing cursor says is empty (committed by a flush
        // that had nothing to write): a crash before the last cursor, then the file
        // copytruncated and appended to by another store, must still find these lines in
        // the copy.
        store.put_meta_value(&writing_name, &true)?;
        store.flush()?;
        set_now = true;
    }
    // Cleared by this flush's last cursor whenever set, by it or by one cut short.
    let clear_writing = flag_set || set_now;
    let skip =
        |json: &[u8]| skip(json) || (!known.is_empty() && finding_id(json).is_some_and(|id| known.contains(&id)));
    let write_error =
        || format!("cannot write findings to {} (nothing is lost: they are written on the next flush)", path.display());
    // The file as it was before the writes: what a copy made of it meanwhile starts with.
    let before = OutboxCursor {
        next_seq: next,
        dev: meta.dev(),
        ino: meta.ino(),
        file_len: end,
        tail_hash: tail_hash(&file, end).with_context(|| format!("cannot read {}", path.display()))?,
    };
    let mut written = 0u64;
    let mut bytes_written = 0u64;
    let wrote = (|| -> Result<()> {
        let mut out = std::io::BufWriter::new(&mut file);
        for entry in store.outbox_from(next) {
            let (seq, json) = entry?;
            if skip(&json) {
                next = seq + 1;
                continue;
            }
            #[cfg(test)]
            if written == 0 && tests::COPYTRUNCATE_AROUND_FIRST_LINE.with(|c| c.get()) {
                // logrotate's copytruncate: the copy now, the cut after the first line.
                out.flush().with_context(write_error)?;
                let mut copy = path.as_os_str().to_owned();
                copy.push(".1");
                std::fs::copy(path, &copy).with_context(write_error)?;
            }
            #[cfg(test)]
            if written == 1 && tests::FAIL_MID_LINE.with(|c| c.get()) {
                // As a full disk leaves it: half a line written, then an error.
                out.write_all(&json[..json.len() / 2]).with_context(write_error)?;
                out.flush().with_context(write_error)?;
                return Err(std::io::Error::other("no space left (test)")).with_context(write_error);
            }
            out.write_all(&json).with_context(write_error)?;
            out.write_all(b"\n").with_context(write_error)?;
            written += 1;
            bytes_written += json.len() as u64 + 1;
            next = seq + 1;
            #[cfg(test)]
            if written == 1 && tests::COPYTRUNCATE_AROUND_FIRST_LINE.with(|c| c.get()) {
                out.flush().with_context(write_error)?;
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(0))
                    .with_context(write_error)?;
            }
            if written == 1 && crate::failpoint::armed("outbox-mid-write") {
                // Make the uncommitted tail real before dying, as a crash mid-write leaves it.
                out.flush().with_context(write_error)?;
                crate::failpoint::hit("outbox-mid-write");
            }
            if written == 1 && crate::failpoint::armed("outbox-pause-mid-write") {
                // Stopped with a line in the file, as the operator's copytruncate may find it.
                out.flush().with_context(write_error)?;
                crate::failpoint::pause("outbox-pause-mid-write");
            }
        }
        out.flush().with_context(write_error)?;
        drop(out);
        file.sync_data().with_context(write_error)
    })();
    if let Err(e) = wrote {
        // A write cut short (a full disk) can leave half a line of this store's at the
        // end, which a crash would have this store cut at its next flush. A process that
        // goes on may have another store (a Kafka node's other partitions) write after it
        // first, which would take it for someone else's line and keep it: cut it now.
        if is_file_failure(&e) {
            // A last line that begins one of the findings this flush was writing is the
            // write's own, whatever the cursor says (none, a stale one, one committed
            // empty).
            if let Err(cut) = cut_own_half_line(store, &file, path, before.next_seq) {
                tracing::warn!(file = %path.display(), error = %crate::error::Chain(&cut), "cannot cut the line a failed write left");
            }
        }
        return Err(e);
    }
    crate::failpoint::hit("outbox-after-write");
    #[cfg(test)]
    if tests::CRASH_AFTER_WRITE.with(|c| c.get()) {
        return Err(StoreError::Unusable("a crash between the writes and the last cursor (test)".into()));
    }
    // The file as it is now: longer than `end` only if someone else appended meanwhile,
    // shorter (or no longer what it was before `end`) if it was cut under the writes.
    let mut end = file.metadata().with_context(|| format!("cannot stat findings file {}", path.display()))?.len();
    let cut_under_writes = end < before.file_len + bytes_written
        || tail_hash(&file, before.file_len).with_context(|| format!("cannot read {}", path.display()))?
            != before.tail_hash;
    if written > 0 && cut_under_writes {
        rewrite_lost(store, &mut file, path, &before, next, &skip)?;
        end = file.metadata().with_context(|| format!("cannot stat findings file {}", path.display()))?.len();
    }
    let now = OutboxCursor {
        next_seq: next,
        dev: meta.dev(),
        ino: meta.ino(),
        file_len: end,
        tail_hash: tail_hash(&file, end).with_context(|| format!("cannot read {}", path.display()))?,
    };
    if cursor.as_ref() != Some(&now) || clear_writing {
        store.put_meta_value(&name, &now)?;
        if clear_writing {
            store.put_meta_value(&writing_name, &false)?;
        }
        store.flush()?;
    }
    Ok(written)
}

/// After writes into `file` that it was cut under (logrotate's `copytruncate` copies the
/// file, then cuts it to nothing: a line appended between the two is in neither), writes
/// again the findings of `before.next_seq..next` that are neither in a copy of the file as
/// it was `before` nor in the file now. Returns how many (already counted as written).
fn rewrite_lost(
    store: &Store,
    file: &mut File,
    path: &Path,
    before: &OutboxCursor,
    next: u64,
    skip: &dyn Fn(&[u8]) -> bool,
) -> Result<u64> {
    let read_error = || format!("cannot read {}", path.display());
    // In a copy: from the first of them on, in order, after the copied length. With no
    // copy beside the file (one moved to another folder, or compressed at once) what it
    // holds is not known: nothing is written again, rather than all of it twice.
    let copies = rotated_originals(path, before);
    if copies.is_empty() {
        tracing::warn!(file = %path.display(), "findings file was cut while written and its copy is not beside it: findings written between the copy and the cut may be in neither");
        return Ok(0);
    }
    let mut copied_to = before.next_seq;
    for (copy, copy_len, copy_path) in copies {
        let (seq, _) = adopt_own_tail(store, &copy, before.file_len, copy_len, before.next_seq, skip)
            .with_context(|| format!("cannot read the tail of {}", copy_path.display()))?;
        copied_to = copied_to.max(seq);
    }
    // In the file now: written after the cut.
    let len = file.metadata().with_context(read_error)?.len();
    let here = finding_ids_in(file, len).with_context(read_error)?;
    let mut lost = Vec::new();
    for entry in store.outbox_from(copied_to) {
        let (seq, json) = entry?;
        if seq >= next {
            break;
        }
        if !skip(&json) && !finding_id(&json).is_some_and(|id| here.holds(&id, json.len())) {
            lost.push(json);
        }
    }
    if lost.is_empty() {
        return Ok(0);
    }
    tracing::warn!(file = %path.display(), findings = lost.len(), "findings file was cut while written (copytruncate); writing again the findings it lost");
    let write_error = || format!("cannot write findings to {}", path.display());
    let wrote = (|| -> Result<()> {
        end_with_newline(file, len).with_context(write_error)?;
        let mut out = std::io::BufWriter::new(&mut *file);
        for json in &lost {
            #[cfg(test)]
            if tests::FAIL_MID_REWRITE.with(|c| c.replace(false)) {
                out.write_all(&json[..json.len() / 2]).with_context(write_error)?;
                out.flush().with_context(write_error)?;
                return Err(std::io::Error::other("no space left (test)")).with_context(write_error);
            }
            out.write_all(json).with_context(write_error)?;
            out.write_all(b"\n").with_context(write_error)?;
        }
        out.flush().with_context(write_error)?;
        drop(out);
        file.sync_data().with_context(write_error)
    })();
    if let Err(e) = wrote {
        // Half a line of this store's (a full disk) would stay for good if another store
        // (a Kafka node's other partition) wrote the file first, ending the line with a
        // newline. Cut it now, as a failed first write is cut.
        if is_file_failure(&e) {
            if let Err(cut) = cut_own_half_line(store, file, path, copied_to) {
                tracing::warn!(file = %path.display(), error = %crate::error::Chain(&cut), "cannot cut the line a failed write left");
            }
        }
        return Err(e);
    }
    Ok(lost.len() as u64)
}

/// The files in `path`'s folder under another name that hold what the cursor says, as the
/// file it was committed against did: that file renamed, or a copy of it whose name
/// begins with `path`'s (logrotate's `copytruncate` leaves the original cut to nothing
/// and the lines in `findings.jsonl.1`, say). Each file, its length and its path. A copy
/// is recognised by the bytes before the committed length (any is, when that is 0: its
/// lines are then walked for this store's next findings, which only a line Lookout wrote
/// can equal); a gzip is passed over. A folder that cannot be listed gives none, said in
/// the log.
fn rotated_originals(path: &Path, c: &OutboxCursor) -> Vec<(File, u64, std::path::PathBuf)> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let own_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut renamed = None;
    let mut copies = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(folder = %dir.display(), error = %e, "cannot list the findings file's folder for its rotated copies");
            return Vec::new();
        }
    };
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let Ok(m) = std::fs::symlink_metadata(entry.path()) else { continue };
        if !m.is_file() || m.len() < c.file_len || entry.file_name().to_string_lossy() == own_name {
            continue;
        }
        if (m.dev(), m.ino()) == (c.dev, c.ino) {
            renamed = Some(entry.path());
        } else if entry.file_name().to_string_lossy().starts_with(&own_name) {
            copies.push(entry.path());
        }
    }
    let mut found = Vec::new();
    for candidate in renamed.into_iter().chain(copies) {
        // One that cannot be read now is not it, nor is a compressed copy.
        let Ok(file) = File::open(&candidate) else { continue };
        let Ok(len) = file.metadata().map(|m| m.len()) else { continue };
        let mut magic = [0u8; 2];
        if file.read_exact_at(&mut magic, 0).is_ok() && magic == [0x1f, 0x8b] {
            continue;
        }
        if len >= c.file_len && tail_hash(&file, c.file_len).is_ok_and(|h| h == c.tail_hash) {
            found.push((file, len, candidate));
        }
    }
    found
}

/// Cuts a last line of `file` with no newline that begins one of this store's findings
/// from `next_seq` on.
fn cut_own_half_line(store: &Store, file: &File, path: &Path, next_seq: u64) -> Result<()> {
    let len = file.metadata().with_context(|| format!("cannot stat findings file {}", path.display()))?.len();
    if len == 0 {
        return Ok(());
    }
    if let Some(keep) =
        torn_own_line(store, file, len, next_seq).with_context(|| format!("cannot read {}", path.display()))?
    {
        cut_at(file, path, len, keep)?;
    }
    Ok(())
}

/// Where the last line of `file` (`len` bytes) starts, if it has no newline and begins one
/// of this store's findings from `next_seq` on: a line torn by a crash or a failure
/// mid-write. Its start is looked for back from the end a MiB at a time, no further than
/// the longest of those findings (a longer line cannot begin one): a torn finding
/// longer than a read of the file for ids holds would count as written by its id. A file
/// that shrinks meanwhile (a copytruncate) has no torn line of this flush's.
fn torn_own_line(store: &Store, file: &File, len: u64, next_seq: u64) -> Result<Option<u64>> {
    if len == 0 {
        return Ok(None);
    }
    let mut last = [0u8; 1];
    match file.read_exact_at(&mut last, len - 1) {
        Ok(()) if last[0] == b'\n' => return Ok(None),
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let mut longest = 0u64;
    for entry in store.outbox_from(next_seq) {
        let (_, json) = entry?;
        longest = longest.max(json.len() as u64);
    }
    if longest == 0 {
        return Ok(None);
    }
    let mut at = len;
    let start = loop {
        if at == 0 {
            break 0;
        }
        if len - at > longest {
            return Ok(None);
        }
        let n = at.min(1 << 20);
        let mut chunk = vec![0u8; n as usize];
        match file.read_exact_at(&mut chunk, at - n) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        if let Some(i) = memchr::memrchr(b'\n', &chunk) {
            break at - n + i as u64 + 1;
        }
        at -= n;
    };
    if len - start > longest {
        return Ok(None);
    }
    let mut partial = vec![0u8; (len - start) as usize];
    match file.read_exact_at(&mut partial, start) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    for entry in store.outbox_from(next_seq) {
        let (_, json) = entry?;
        if json.starts_with(&partial) {
            return Ok(Some(start));
        }
    }
    Ok(None)
}

/// The findings a file holds, by id: for each line with that id, `None` when it was read
/// whole, or its length when only its beginning was held (a line longer than
/// [`LINE_HELD`]).
#[derive(Debug, Default)]
struct IdsInFile(std::collections::HashMap<String, Vec<Option<u64>>>);

impl IdsInFile {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the file holds the line of finding `id` (its JSON `json_len` bytes) whole:
    /// a line read whole, or one as long as that line whose beginning has the id. A line
    /// torn past what is held and ended by another writer begins with the id too, and
    /// does not count.
    fn holds(&self, id: &str, json_len: usize) -> bool {
        let whole = json_len as u64;
        self.0.get(id).is_some_and(|lines| lines.iter().any(|l| l.is_none_or(|n| n == whole + 1 || n == whole)))
    }
}

/// The findings in the first `len` bytes of `file` (lines that are not a finding are
/// passed over).
fn finding_ids_in(file: &File, len: u64) -> std::io::Result<IdsInFile> {
    use std::io::{Read, Seek};
    let mut ids = IdsInFile::default();
    let mut from_start = file;
    from_start.seek(std::io::SeekFrom::Start(0))?;
    let mut reader = std::io::BufReader::new(from_start.take(len));
    let mut line = Vec::new();
    loop {
        let (n, _) = read_line_capped(&mut reader, &mut line, LINE_HELD)?;
        if n == 0 {
            break;
        }
        // A line longer than held: Lookout's own begin with their id.
        let (id, held) =
            if n > line.len() as u64 { (finding_id_prefix(&line), Some(n)) } else { (finding_id(&line), None) };
        if let Some(id) = id {
            ids.0.entry(id).or_default().push(held);
        }
    }
    Ok(ids)
}

/// How much of a line of the findings file is held to be looked at: other writers' lines
/// may be of any length, and are never held whole beyond this.
const LINE_HELD: usize = 1 << 20;

/// Reads a line (through its newline, or to the end) from `reader`, keeping at most `cap`
/// bytes of it in `line` (cleared first). Returns the bytes it took up, and whether it
/// ended with a newline.
fn read_line_capped(
    reader: &mut impl std::io::BufRead,
    line: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<(u64, bool)> {
    line.clear();
    let mut taken = 0u64;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok((taken, false));
        }
        let (chunk, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let room = cap.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = chunk.len();
        taken += used as u64;
        reader.consume(used);
        if done {
            return Ok((taken, true));
        }
    }
}

/// The id of a line that begins as Lookout writes its findings: `{"finding_id":"…"`.
fn finding_id_prefix(line: &[u8]) -> Option<String> {
    let rest = line.strip_prefix(br#"{"finding_id":""#)?;
    let end = memchr::memchr(b'"', rest)?;
    let id = std::str::from_utf8(&rest[..end]).ok()?;
    (!id.contains('\\')).then(|| id.to_string())
}

/// The `finding_id` of a finding's JSON line.
fn finding_id(json: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Id {
        finding_id: String,
    }
    serde_json::from_slice::<Id>(json).ok().map(|i| i.finding_id)
}

/// Makes the entry of a file just created in its folder durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Reads the bytes of `file` in `committed..len` line by line against the findings from
/// `next_seq` on (leaving out those `skip` says are written elsewhere): a whole line equal
/// to the next of them was written by Lookout and not committed, and counts as written;
/// any other line is someone else's — another tool, or another store writing the same
/// file (a Kafka node's partitions) — and stays; a last partial line that begins the next
/// finding was torn by a crash. Returns the next sequence to write and the length to keep
/// (`len` unless a torn line is cut).
fn adopt_own_tail(
    store: &Store,
    file: &File,
    committed: u64,
    len: u64,
    next_seq: u64,
    skip: &dyn Fn(&[u8]) -> bool,
) -> Result<(u64, u64)> {
    if len == committed {
        return Ok((next_seq, len));
    }
    // A line at a time: the tail may be long (other writers' lines since this store's
    // last flush), and is never held whole.
    let mut reader = std::io::BufReader::with_capacity(64 << 10, RangeReader { file, at: committed, end: len });
    let mut own = store.outbox_from(next_seq).filter(|e| e.as_ref().map_or(true, |(_, json)| !skip(json)));
    let mut expected = own.next().transpose()?;
    let mut next = next_seq;
    let mut pos = committed;
    let mut line = Vec::new();
    while let Some((seq, json)) = &expected {
        // Enough of the line to tell whether it is the next finding; another writer's
        // line is never held whole.
        let (n, ended) = read_line_capped(&mut reader, &mut line, (json.len() + 1).max(64 << 10))?;
        if n == 0 {
            break;
        }
        let held_whole = n == line.len() as u64;
        if ended {
            if held_whole && line.strip_suffix(b"\n") == Some(&json[..]) {
                next = seq + 1;
                expected = own.next().transpose()?;
            }
            pos += n;
        } else if held_whole && json.starts_with(&line) {
            // Torn: a prefix of the next finding and nothing after it.
            return Ok((next, pos));
        } else if held_whole {
            // Torn too if it begins a finding further on: those before it were written
            // elsewhere and passed over, which `skip` may not know (a Kafka node cuts a
            // partition's torn line before it has read the findings topic). (A line not
            // held whole is longer than any finding: someone else's.)
            for entry in own.by_ref() {
                let (_, later) = entry?;
                if later.len() as u64 >= n && later.starts_with(&line) {
                    return Ok((next, pos));
                }
            }
            break;
        } else {
            break;
        }
    }
    // Everything else is not Lookout's: it stays.
    Ok((next, len))
}

/// Reads `file` from `at` to `end` with positioned reads (its own position, which an
/// append ignores anyway, is left alone).
struct RangeReader<'a> {
    file: &'a File,
    at: u64,
    end: u64,
}

impl std::io::Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = usize::try_from(self.end.saturating_sub(self.at)).unwrap_or(usize::MAX);
        let n = buf.len().min(left);
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.at)?;
        self.at += got as u64;
        Ok(got)
    }
}

/// Makes sure the file's content, `len` bytes, ends with a newline (or is empty), so the
/// next line starts on a line of its own; returns the new length. (The file is opened to
/// append: a write lands at its end.)
fn end_with_newline(file: &mut File, len: u64) -> std::io::Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    if last[0] == b'\n' {
        return Ok(len);
    }
    file.write_all(b"\n")?;
    Ok(len + 1)
}

/// Every finding in the results tree, in the order they were found.
pub fn all_findings(store: &Store) -> Result<Vec<Value>> {
    store
        .outbox_from(1)
        .map(|entry| {
            let (seq, json) = entry?;
            serde_json::from_slice(&json).map_err(|e| corrupt!("finding {seq} in the results tree is not JSON: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    thread_local! {
        /// Makes a flush stop as a crash would between its writes and its last cursor.
        pub(super) static CRASH_AFTER_WRITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// Makes a flush write half its second line, then fail, as a full disk would.
        pub(super) static FAIL_MID_LINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// Makes a flush's file copied beside it (`<name>.1`) before its first line and
        /// cut to nothing after it, as logrotate's copytruncate can, under the writes.
        pub(super) static COPYTRUNCATE_AROUND_FIRST_LINE: std::cell::Cell<bool> =
            const { std::cell::Cell::new(false) };
        /// Makes the writing again of lines a copytruncate lost write half its first line,
        /// then fail, as a full disk would.
        pub(super) static FAIL_MID_REWRITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    #[test]
    fn a_line_is_read_through_its_end_holding_no_more_than_asked() {
        let text = format!("{}\nnext\n{}", "a".repeat(5000), "b".repeat(10));
        let mut reader = std::io::BufReader::with_capacity(64, text.as_bytes());
        let mut line = Vec::new();
        assert_eq!(read_line_capped(&mut reader, &mut line, 100).unwrap(), (5001, true));
        assert_eq!(line, "a".repeat(100).as_bytes());
        assert_eq!(read_line_capped(&mut reader, &mut line, 100).unwrap(), (5, true));
        assert_eq!(line, b"next\n");
        assert_eq!(read_line_capped(&mut reader, &mut line, 100).unwrap(), (10, false));
        assert_eq!(read_line_capped(&mut reader, &mut line, 100).unwrap(), (0, false));
        assert_eq!(finding_id_prefix(br#"{"finding_id":"00ab","detector":"x"#), Some("00ab".into()));
        assert_eq!(finding_id_prefix(br#"{"other":1}"#), None);
    }

    /// Other writers' lines far longer than any finding, with and without a newline,
    /// around Lookout's own uncommitted ones: recognised all the same, each kept.
    #[test]
    fn long_foreign_lines_are_passed_over_and_kept() {
        let mut f = Fixture::new();
        f.find(1);
        f.flush();
        f.find(2);
        let long = format!("{{\"other\":\"{}\"}}", "x".repeat(3 << 20));
        let mut file = std::fs::OpenOptions::new().append(true).open(&f.out).unwrap();
        write!(file, "{long}\n{}\n{long}", f.line(2)).unwrap();
        assert_eq!(f.flush(), 1, "2 was written before; 3 is not");
        assert_eq!(f.read(), format!("{}{long}\n{}{long}\n{}", f.lines(1..=1), f.lines(2..=2), f.lines(3..=3)));
        // A file new to a store, holding an own finding longer than a line is held.
        let mut g = Fixture::new();
        g.find(1);
        let big = format!(r#"{{"finding_id":"{:032x}","row":"{}"}}"#, 1, "y".repeat(2 << 20));
        std::fs::write(&g.out, format!("{big}\n")).unwrap();
        let file = File::open(&g.out).unwrap();
        let ids = finding_ids_in(&file, file.metadata().unwrap().len()).unwrap();
        assert!(ids.holds(&format!("{:032x}", 1), big.len()), "{ids:?}");
        assert!(!ids.holds(&format!("{:032x}", 1), big.len() * 2), "held in part: counted at its length only");
    }

    /// A torn line is cut only in the file as it was read: one that changed length since
    /// (a copytruncate, another writer) is left as it is, and what is written next goes
    /// after its end as it is now.
    #[test]
    fn a_torn_line_is_not_cut_in_a_file_that_changed_length_since_it_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("findings.jsonl");
        std::fs::write(&path, b"{\"a\":1}\n{\"b\"").unwrap();
        let file = std::fs::OpenOptions::new().read(true).append(true).open(&path).unwrap();
        // Read at 12 bytes; another writer has added 5 since.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b":2}\nx").unwrap();
        assert_eq!(cut_at(&file, &path, 12, 8).unwrap(), 17);
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\":1}\n{\"b\":2}\nx");
        // As read: cut.
        assert_eq!(cut_at(&file, &path, 17, 16).unwrap(), 16);
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\":1}\n{\"b\":2}\n");
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        out: PathBuf,
        next: u64,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("data")).unwrap();
            let out = dir.path().join("findings.jsonl");
            Fixture { _dir: dir, store, out, next: 1 }
        }

        /// The findings file where it is by default: `<data>/findings.jsonl`.
        fn in_data_dir() -> Fixture {
            let f = Fixture::new();
            let out = f.store.data_dir().join("findings.jsonl");
            Fixture { out, ..f }
        }

        /// Commits `n` new findings to the results tree and the outbox.
        fn find(&mut self, n: u64) {
            let mut b = self.store.pass_batch();
            for _ in 0..n {
                let fid = format!("{:032x}", self.next);
                b.put_finding(&fid, format!(r#"{{"finding_id":"{fid}"}}"#).into_bytes());
                self.next += 1;
            }
            b.commit().unwrap();
        }

        /// Commits a new finding of `row_bytes` bytes and more; returns its line.
        fn find_big(&mut self, row_bytes: usize) -> String {
            let fid = format!("{:032x}", self.next);
            let json = format!(r#"{{"finding_id":"{fid}","row":"{}"}}"#, "x".repeat(row_bytes));
            let mut b = self.store.pass_batch();
            b.put_finding(&fid, json.clone().into_bytes());
            b.commit().unwrap();
            self.next += 1;
            json
        }

        fn line(&self, seq: u64) -> String {
            format!(r#"{{"finding_id":"{seq:032x}"}}"#)
        }

        fn lines(&self, seqs: std::ops::RangeInclusive<u64>) -> String {
            seqs.map(|s| self.line(s) + "\n").collect()
        }

        fn flush(&mut self) -> u64 {
            flush_outbox(&mut self.store, &self.out).unwrap()
        }

        fn read(&self) -> String {
            std::fs::read_to_string(&self.out).unwrap()
        }
    }

    /// What a Kafka node does with a partition it took over: the findings the previous
    /// owner wrote elsewhere are passed over for good, in the file and in the cursor, and
    /// an uncommitted tail of its own is still recognised around them.
    #[test]
    fn skipped_findings_are_never_written_and_the_rest_are_once() {
        let mut f = Fixture::new();
        f.find(4);
        let skip_even = |json: &[u8]| {
            let text = String::from_utf8_lossy(json);
            ["2\"", "4\"", "6\"", "8\""].iter().any(|end| text.ends_with(&format!("{end}}}")))
        };
        assert_eq!(flush_outbox_except(&mut f.store, &f.out, &skip_even).unwrap(), 2);
        assert_eq!(f.read(), format!("{}{}", f.line(1) + "\n", f.line(3) + "\n"));
        // Written but not committed (a crash between the write and the cursor), 6 among
        // them (written before it was known to be written elsewhere): the next flush counts
        // 5 and 7 as written, keeps 6's line as it is, and writes 9 only.
        f.find(5);
        let mut file = std::fs::OpenOptions::new().append(true).open(&f.out).unwrap();
        file.write_all(format!("{}\n{}\n{}\n", f.line(5), f.line(6), f.line(7)).as_bytes()).unwrap();
        assert_eq!(flush_outbox_except(&mut f.store, &f.out, &skip_even).unwrap(), 1);
        assert_eq!(
            f.read(),
            [1, 3, 5, 6, 7, 9].iter().map(|&s| f.line(s) + "\n").collect::<String>(),
            "each finding not skipped, once"
        );
        assert_eq!(flush_outbox_except(&mut f.store, &f.out, &skip_even).unwrap(), 0);
    }

    /// Two writers of one file (a Kafka node's partitions, each its own store): a crash
    /// after another writer's lines and this store's uncommitted ones, mid-line.
    #[test]
    fn own_uncommitted_lines_after_another_writer_s_are_not_written_again() {
        let mut f = Fixture::new();
        f.find(1);
        f.flush();
        f.find(3);
        let mut file = std::fs::OpenOptions::new().append(true).open(&f.out).unwrap();
        let torn = &f.line(4)[..10];
        write!(file, "{{\"other\":1}}\n{}\n{{\"other\":2}}\n{}\n{torn}", f.line(2), f.line(3)).unwrap();
        assert_eq!(f.flush(), 1);
        assert_eq!(
            f.read(),
            format!(
                "{}{{\"other\":1}}\n{}{{\"other\":2}}\n{}{}",
                f.lines(1..=1),
                f.lines(2..=2),
                f.lines(3..=3),
                f.lines(4..=4)
            )
        );
    }

    /// A first write into an empty file (its cursor committed at length 0) cut short by a
    /// crash before its final cursor, then the file copytruncated and another store (a
    /// Kafka node's other partition) appending to it: the lines in the copy are written.
    #[test]
    fn lines_written_into_an_empty_file_before_a_crash_and_copytruncated_are_not_written_again() {
        let mut f = Fixture::new();
        assert_eq!(f.flush(), 0, "the cursor is committed against the empty file");
        f.find(2);
        CRASH_AFTER_WRITE.with(|c| c.set(true));
        let crashed = flush_outbox(&mut f.store, &f.out);
        CRASH_AFTER_WRITE.with(|c| c.set(false));
        assert!(crashed.is_err());
        assert_eq!(f.read(), f.lines(1..=2), "written, the last cursor not committed");
        let writing = format!("{}~writing", cursor_names(&f.store, &f.out).0);
        f.find(1);
        let copy = f.out.with_extension("jsonl.1");
        std::fs::copy(&f.out, &copy).unwrap();
        std::fs::OpenOptions::new().write(true).open(&f.out).unwrap().set_len(0).unwrap();
        std::fs::write(&f.out, "{\"other\":1}\n").unwrap();
        assert_eq!(f.flush(), 1);
        assert_eq!(f.read(), format!("{{\"other\":1}}\n{}", f.lines(3..=3)));
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), f.lines(1..=2));
        assert_eq!(f.store.meta_value::<bool>(&writing).unwrap(), Some(false), "cleared once written");
        // Committed empty with no write cut short (nothing to write then): a copy beside
        // the file is not read for this store's lines.
        let mut g = Fixture::new();
        assert_eq!(g.flush(), 0);
        g.find(1);
        std::fs::write(g.out.with_extension("jsonl.1"), g.lines(1..=1)).unwrap();
        std::fs::write(&g.out, "{\"other\":1}\n").unwrap();
        assert_eq!(g.flush(), 1);
        // Set by a write cut short into a file with lines before it (its cursor not at 0):
        // cleared by the next flush all the same.
        let mut h = Fixture::new();
        std::fs::write(&h.out, "{\"other\":1}\n").unwrap();
        h.find(1);
        CRASH_AFTER_WRITE.with(|c| c.set(true));
        let crashed = flush_outbox(&mut h.store, &h.out);
        CRASH_AFTER_WRITE.with(|c| c.set(false));
        assert!(crashed.is_err());
        let writing = format!("{}~writing", cursor_names(&h.store, &h.out).0);
        assert_eq!(h.store.meta_value::<bool>(&writing).unwrap(), Some(true));
        assert_eq!(h.flush(), 0, "the line written before the crash is recognised");
        assert_eq!(h.store.meta_value::<bool>(&writing).unwrap(), Some(false), "cleared");
    }

    /// A write cut short by a full disk leaves half a line of this store's; the process
    /// goes on, and another store (a Kafka node's other partition) writes to the file
    /// first: the half line is not kept, and the findings of both are whole, once.
    #[test]
    fn half_a_line_left_by_a_failed_write_is_cut_before_another_store_writes() {
        let mut f = Fixture::new();
        f.find(1);
        f.flush();
        f.find(3);
        FAIL_MID_LINE.with(|c| c.set(true));
        let failed = flush_outbox(&mut f.store, &f.out);
        FAIL_MID_LINE.with(|c| c.set(false));
        assert!(failed.as_ref().is_err_and(is_file_failure), "{:?}", failed.err());
        assert_eq!(f.read(), f.lines(1..=2), "the half line is cut");
        // Another store writing the same file.
        let other_dir = tempfile::tempdir().unwrap();
        let mut other = Store::open(other_dir.path()).unwrap();
        let mut b = other.pass_batch();
        b.put_finding("other", br#"{"finding_id":"other"}"#.to_vec());
        b.commit().unwrap();
        assert_eq!(flush_outbox(&mut other, &f.out).unwrap(), 1);
        assert_eq!(f.flush(), 2);
        assert_eq!(f.read(), format!("{}{{\"finding_id\":\"other\"}}\n{}", f.lines(1..=2), f.lines(3..=4)));
        // A file this store has no cursor for, already holding a finding of its own (a new
        // data directory writing where an earlier one did): no cursor is committed before
        // the writes, and the half line is cut all the same.
        let mut g = Fixture::new();
        g.find(3);
        std::fs::write(&g.out, g.lines(1..=1)).unwrap();
        FAIL_MID_LINE.with(|c| c.set(true));
        let failed = flush_outbox(&mut g.store, &g.out);
        FAIL_MID_LINE.with(|c| c.set(false));
        assert!(failed.is_err());
        assert_eq!(g.read(), g.lines(1..=2), "the half line is cut");
        assert_eq!(g.flush(), 1);
        assert_eq!(g.read(), g.lines(1..=3));
    }

    /// A write cut short 1.5 MiB into a 3 MiB finding: the half line is cut (its start
    /// is looked for further back than a MiB), and the next flush writes the finding whole.
    #[test]
    fn half_a_line_longer_than_a_mib_left_by_a_failed_write_is_cut() {
        let mut f = Fixture::new();
        f.find(2);
        f.flush();
        f.find(1);
        // The flush's second line is a 3 MiB finding: half of it, 1.5 MiB, is written.
        let big = f.find_big(3 << 20);
        FAIL_MID_LINE.with(|c| c.set(true));
        let failed = flush_outbox(&mut f.store, &f.out);
        FAIL_MID_LINE.with(|c| c.set(false));
        assert!(failed.as_ref().is_err_and(is_file_failure), "{:?}", failed.err());
        assert!(f.read() == f.lines(1..=3), "the 1.5 MiB half line is cut");
        assert_eq!(f.flush(), 1);
        assert!(f.read() == f.lines(1..=3) + &big + "\n", "written whole, once");
    }

    /// A finding torn past its first MiB at the end of a file this store has no cursor for
    /// (a crash before any cursor, say): the torn line is cut and the finding written
    /// whole, not taken for written by the id it begins with.
    #[test]
    fn a_torn_line_longer_than_a_mib_in_a_file_with_no_cursor_is_cut_and_written_whole() {
        // After a line of its own, or as the file's only line; and another writer's line
        // as long, unended, which is kept.
        for (before, after) in [(true, false), (false, false), (true, true)] {
            let case = format!("a line before: {before}, another writer's line after: {after}");
            let mut f = Fixture::new();
            f.find(1);
            let big = f.find_big(3 << 20);
            let head = if before { f.lines(1..=1) } else { String::new() };
            let foreign = format!(r#"{{"other":"{}""#, "y".repeat(2 << 20));
            let tail = if after { big.clone() + "\n" + &foreign } else { big[..big.len() / 2].to_string() };
            std::fs::write(&f.out, head.clone() + &tail).unwrap();
            let written = f.flush();
            match (before, after) {
                (true, false) => {
                    assert_eq!(written, 1, "{case}");
                    assert!(f.read() == f.lines(1..=1) + &big + "\n", "{case}: cut, then written whole");
                }
                (false, false) => {
                    assert_eq!(written, 2, "{case}");
                    assert!(f.read() == f.lines(1..=1) + &big + "\n", "{case}: cut, then both written");
                }
                (_, true) => {
                    assert_eq!(written, 0, "{case}");
                    assert!(f.read() == head + &big + "\n" + &foreign + "\n", "{case}: another writer's line is kept");
                }
            }
        }
    }

    /// A finding torn past its first MiB and then ended by another writer (a Kafka node's
    /// other partition writing first): no longer the last line, it stays, but its id at
    /// the start does not count it as written; the finding is written whole, once.
    #[test]
    fn a_torn_line_longer_than_a_mib_ended_by_another_writer_does_not_count_as_written() {
        let mut f = Fixture::new();
        f.find(1);
        let big = f.find_big(3 << 20);
        let torn = &big[..big.len() / 2];
        std::fs::write(&f.out, f.lines(1..=1) + torn + "\n").unwrap();
        assert_eq!(f.flush(), 1, "the first counts as written, the torn one does not");
        assert!(f.read() == f.lines(1..=1) + torn + "\n" + &big + "\n", "written whole, once");
    }

    /// A copytruncate under a flush's writes (a line written between the copy and the cut
    /// is in neither), then the writing again of that line cut short by a full disk: the
    /// half line is cut at once, and the next flush writes the lost line only, not again
    /// those written after the cut (the file is new to its cursor, or was committed empty,
    /// and is read for them) — a Kafka node's flush too.
    #[test]
    fn a_failed_rewrite_after_a_copytruncate_leaves_no_half_line_and_writes_nothing_twice() {
        for (held_one, node) in [(true, false), (false, false), (true, true), (false, true)] {
            let case = format!("a file that held a finding: {held_one}, a node's flush: {node}");
            let mut f = Fixture::new();
            let flush = |f: &mut Fixture| {
                if node {
                    flush_outbox_except(&mut f.store, &f.out, &|_| false)
                } else {
                    flush_outbox(&mut f.store, &f.out)
                }
            };
            // The cursor at the end of a first line, or at 0 (a flush with nothing to write).
            let first = u64::from(held_one);
            f.find(first);
            flush(&mut f).unwrap();
            f.find(3);
            COPYTRUNCATE_AROUND_FIRST_LINE.with(|c| c.set(true));
            FAIL_MID_REWRITE.with(|c| c.set(true));
            let failed = flush(&mut f);
            COPYTRUNCATE_AROUND_FIRST_LINE.with(|c| c.set(false));
            let rewrite_tried = !FAIL_MID_REWRITE.with(|c| c.replace(false));
            assert!(rewrite_tried, "{case}: the lost line was written again");
            assert!(failed.as_ref().is_err_and(is_file_failure), "{case}: {:?}", failed.err());
            let copy = f.out.with_extension("jsonl.1");
            let held = if held_one { f.lines(1..=1) } else { String::new() };
            assert_eq!(std::fs::read_to_string(&copy).unwrap(), held, "{case}: copied before the first write");
            let (lost, after) = (first + 1, (first + 2)..=(first + 3));
            assert_eq!(f.read(), f.lines(after.clone()), "{case}: written after the cut; the half line is cut");
            // The disk still full at the next flush: it writes the lost line, then half of
            // a new one, and fails. That half line is cut too (a stale cursor cannot say
            // where this store's lines begin; one committed empty can).
            f.find(1);
            let next = first + 4;
            FAIL_MID_LINE.with(|c| c.set(true));
            let failed = flush(&mut f);
            FAIL_MID_LINE.with(|c| c.set(false));
            assert!(failed.as_ref().is_err_and(is_file_failure), "{case}: {:?}", failed.err());
            assert_eq!(f.read(), f.lines(after.clone()) + &f.lines(lost..=lost), "{case}: the half line is cut");
            assert_eq!(flush(&mut f).unwrap(), 1, "{case}");
            assert_eq!(f.read(), f.lines(after.clone()) + &f.lines(lost..=lost) + &f.lines(next..=next), "{case}");
            assert_eq!(flush(&mut f).unwrap(), 0, "{case}");
            f.find(1);
            assert_eq!(flush(&mut f).unwrap(), 1, "{case}");
            let last = next + 1;
            assert_eq!(
                f.read(),
                f.lines(after) + &f.lines(lost..=lost) + &f.lines(next..=next) + &f.lines(last..=last),
                "{case}"
            );
        }
    }

    /// On a Kafka node, after a rotation, a partition's store writing into the new file
    /// after another partition's did commits its cursor against it before writing, as it
    /// does into an empty one (the other's findings are not its own, nor is one of its
    /// own that the other wrote, as a partition's earlier owner did, and it passes over):
    /// a line it tears in a crash is then cut at the take-over (`cut_torn_tail`), and the
    /// lines it wrote whole count as written.
    #[test]
    fn after_a_rotation_a_store_writing_after_another_commits_its_cursor_first() {
        for earlier_owner in [false, true] {
            let mut f = Fixture::new();
            f.find(1);
            flush_outbox_except(&mut f.store, &f.out, &|_| false).unwrap();
            std::fs::rename(&f.out, f.out.with_extension("jsonl.1")).unwrap();
            f.find(3);
            // The other store's line: its own finding, or this store's second one (which
            // this store's flushes pass over, as written elsewhere).
            let other_line = if earlier_owner { f.line(2) } else { r#"{"finding_id":"other"}"#.to_string() };
            let theirs = other_line.clone() + "\n";
            let passed_over = f.line(2);
            let skip = move |json: &[u8]| earlier_owner && json == passed_over.as_bytes();
            let other_dir = tempfile::tempdir().unwrap();
            let mut other = Store::open(other_dir.path()).unwrap();
            let mut b = other.pass_batch();
            b.put_finding("other", other_line.into_bytes());
            b.commit().unwrap();
            assert_eq!(flush_outbox_except(&mut other, &f.out, &|_| false).unwrap(), 1);
            CRASH_AFTER_WRITE.with(|c| c.set(true));
            let crashed = flush_outbox_except(&mut f.store, &f.out, &skip);
            CRASH_AFTER_WRITE.with(|c| c.set(false));
            assert!(crashed.is_err());
            // Its own: from 3 when 2 is passed over, else from 2.
            let first = if earlier_owner { 3 } else { 2 };
            assert_eq!(f.read(), theirs.clone() + &f.lines(first..=4), "earlier owner: {earlier_owner}");
            // As a crash in the middle of the second line leaves it.
            let torn = f.read().len() - f.line(4).len() / 2 - 1;
            std::fs::OpenOptions::new().write(true).open(&f.out).unwrap().set_len(torn as u64).unwrap();
            cut_torn_tail(&f.store, &f.out).unwrap();
            assert_eq!(
                f.read(),
                theirs.clone() + &f.lines(first..=3),
                "earlier owner: {earlier_owner}: the torn line is cut"
            );
            let written = flush_outbox_except(&mut f.store, &f.out, &skip).unwrap();
            assert_eq!(written, 1, "earlier owner: {earlier_owner}: the whole line counts as written");
            assert_eq!(f.read(), theirs + &f.lines(first..=4), "earlier owner: {earlier_owner}");
        }
    }

    /// A crash between a write and its cursor, then the file rotated by rename before the
    /// next flush: the lines written then are in the rotated file, and are not written
    /// again to the new one (a torn last line there is).
    #[test]
    fn lines_written_before_a_crash_and_rotated_away_are_not_written_again() {
        let mut f = Fixture::new();
        f.find(1);
        f.flush();
        f.find(3);
        let mut file = std::fs::OpenOptions::new().append(true).open(&f.out).unwrap();
        write!(
            file,
            "{}
{}
{}",
            f.line(2),
            f.line(3),
            &f.line(4)[..9]
        )
        .unwrap();
        let rotated = f.out.with_extension("jsonl.1");
        std::fs::rename(&f.out, &rotated).unwrap();
        assert_eq!(f.flush(), 1);
        assert_eq!(f.read(), f.lines(4..=4));
        f.find(1);
        assert_eq!(f.flush(), 1);
        assert_eq!(f.read(), f.lines(4..=5));
        assert!(std::fs::read_to_string(&rotated).unwrap().starts_with(&f.lines(1..=3)));
    }

    #[test]
    fn foreign_lines_are_kept_and_findings_appended_after_them() {
        let mut f = Fixture::new();
        std::fs::write(&f.out, "other tool 1\nother tool 2\n").unwrap();
        f.find(3);
        assert_eq!(f.flush(), 3);
        assert_eq!(f.read(), format!("other tool 1\nother tool 2\n{}", f.lines(1..=3)));
        assert_eq!(f.flush(), 0);
    }

    #[test]
    fn a_foreign_last_line_without_newline_gets_one() {
        let mut f = Fixture::new();
        std::fs::write(&f.out, "a\nno newline").unwrap();
        f.find(2);
        f.flush();
        assert_eq!(f.read(), format!("a\nno newline\n{}", f.lines(1..=2)));
    }

    /// Nothing to write: the file is left as it is, whatever others appended since (a
    /// Kafka node's other partitions; one torn mid-line is theirs to cut, not to be ended
    /// with a newline by a store that had nothing to write).
    #[test]
    fn a_flush_with_nothing_to_write_leaves_the_file_as_it_is() {
        let mut f = Fixture::new();
        f.find(1);
        f.flush();
        let mut file = std::fs::OpenOptions::new().append(true).open(&f.out).unwrap();
        file.write_all(b"theirs\ntheirs, torn mid-li").unwrap();
        assert_eq!(f.flush(), 0);
        assert_eq!(f.read(), f.lines(1..=1) + "theirs\ntheirs, torn mid-li");
        f.find(1);
        assert_eq!(f.flush(), 1);
        assert_eq!(f.read(), f.lines(1..=1) + "theirs\ntheirs, torn mid-li\n" + &f.line(2) + "\n");
    }

    #[test]
    fn foreign_lines_appended_between_flushes_are_kept() {
        let mut f = Fixture::new();
        f.find(2);
        f.flush();
        let mut file = std::fs::OpenOptions::new().append(true).open(&f.out).unwrap();
        file.write_all(b"appended by someone else").unwrap();
        f.find(1);
        assert_eq!(f.flush(), 1);
        assert_eq!(f.read(), format!("{}appended by someone else\n{}", f.lines(1..=2), f.line(3) + "\n"));
    }

    #[test]
    fn another_path_gets_every_finding_and_the_first_is_untouched() {
        let mut f = Fixture::new();
        f.find(2);
        f.flush();
        let first = f.read();
        let other = f.out.with_file_name("other.jsonl");
        std::fs::write(&other, "theirs\n").unwrap();
        assert_eq!(flush_outbox(&mut f.store, &other).unwrap(), 2);
        assert_eq!(std::fs::read_to_string(&other).unwrap(), format!("theirs\n{}", f.lines(1..=2)));
        assert_eq!(f.read(), first);
        // Back to the first path: it is as Lookout left it, so nothing is cut or repeated.
        f.find(1);
        f.flush();
        assert_eq!(f.read(), f.lines(1..=3));
    }

    /// The default findings file is in the data directory: a copy of the directory
    /// (a backup restored elsewhere) appends only the findings its file lacks.
    #[test]
    fn a_copied_data_directory_does_not_write_its_findings_again() {
        let mut f = Fixture::in_data_dir();
        f.find(2);
        f.flush();
        f.store.flush().unwrap();
        let copy = f._dir.path().join("restored");
        std::fs::create_dir(&copy).unwrap();
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", f.store.data_dir().display()))
            .arg(&copy)
            .status();
        assert!(copied.unwrap().success());
        let mut restored = Store::open(&copy).unwrap();
        let out = copy.join("findings.jsonl");
        assert_eq!(flush_outbox(&mut restored, &out).unwrap(), 0, "the copy holds them already");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), f.lines(1..=2));
    }

    /// A cursor an older Lookout saved under the file's absolute path is still honoured
    /// for a file in the data directory: upgrading does not write every finding again.
    #[test]
    fn a_cursor_saved_under_the_absolute_path_is_still_read() {
        let mut f = Fixture::in_data_dir();
        let (name, older) = cursor_names(&f.store, &f.out);
        let older = older.expect("a file in the data directory has an older name");
        assert!(name.starts_with("outbox-data:") && older.starts_with("outbox-file:"));
        // As an older Lookout leaves it: two findings written, the cursor under the
        // absolute path only.
        f.find(2);
        std::fs::write(&f.out, f.lines(1..=2)).unwrap();
        let file = File::open(&f.out).unwrap();
        let meta = file.metadata().unwrap();
        let cursor = OutboxCursor {
            next_seq: 3,
            dev: meta.dev(),
            ino: meta.ino(),
            file_len: meta.len(),
            tail_hash: tail_hash(&file, meta.len()).unwrap(),
        };
        f.store.put_meta_value(&older, &cursor).unwrap();
        f.find(1);
        assert_eq!(f.flush(), 1);
        assert_eq!(f.read(), f.lines(1..=3));
    }

    #[test]
    fn a_file_rotated_by_rename_never_gets_old_findings_again() {
        let mut f = Fixture::new();
        f.find(2);
        f.flush();
        let rotated = f.out.with_extension("jsonl.1");
        std::fs::rename(&f.out, &rotated).unwrap();
        f.find(1);
        assert_eq!(f.flush(), 1);
        assert_eq!(f.read(), f.lines(3..=3));
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), f.lines(1..=2));
        // A new file created at the path by someone else before the flush, longer than
        // the committed length: kept whole.
        std::fs::rename(&f.out, &rotated).unwrap();
        std::fs::write(&f.out, "x".repeat(400) + "\n" + &"y".repeat(400) + "\n").unwrap();
        f.find(1);
        f.flush();
        assert_eq!(f.read(), "x".repeat(400) + "\n" + &"y".repeat(400) + "\n" + &f.lines(4..=4));
    }

    #[test]
    fn a_copytruncated_file_gets_only_new_findings() {
        let mut f = Fixture::new();
        f.find(3);
        f.flush();
        std::fs::copy(&f.out, f.out.with_extension("jsonl.1")).unwrap();
        std::fs::OpenOptions::new().write(true).open(&f.out).unwrap().set_len(0).unwrap();
        f.find(1);
        f.flush();
        assert_eq!(f.read(), f.lines(4..=4));
        // Truncated and written again by someone else to more than the committed length:
        // the bytes before it changed, so it is a new file, kept whole.
        f.flush();
        let theirs = "z".repeat(f.read().len() + 10) + "\n";
        std::fs::write(&f.out, &theirs).unwrap();
        f.find(1);
        f.flush();
        assert_eq!(f.read(), theirs + &f.lines(5..=5));
    }

    /// A crash after writing lines but before committing the cursor: whole lines are
    /// Lookout's and kept (not written twice), a torn last line is cut and written again.
    #[test]
    fn an_uncommitted_tail_of_lookouts_own_lines_is_repaired() {
        let mut f = Fixture::new();
        f.find(1);
        f.flush();
        f.find(3);
        let torn = f.line(4);
        let mut file = std::fs::OpenOptions::new().append(true).open(&f.out).unwrap();
        file.write_all((f.lines(2..=3) + &torn[..torn.len() / 2]).as_bytes()).unwrap();
        assert_eq!(f.flush(), 1, "only the torn line is written again");
        assert_eq!(f.read(), f.lines(1..=4));
        assert_eq!(f.flush(), 0);
    }

    /// Lookout's uncommitted lines followed by someone else's: both kept, once each.
    #[test]
    fn an_uncommitted_tail_followed_by_foreign_bytes_keeps_both() {
        let mut f = Fixture::new();
        f.find(1);
        f.flush();
        f.find(2);
        let mut file = std::fs::OpenOptions::new().append(true).open(&f.out).unwrap();
        file.write_all((f.line(2) + "\n" + "theirs\n").as_bytes()).unwrap();
        assert_eq!(f.flush(), 1);
        assert_eq!(f.read(), f.lines(1..=2) + "theirs\n" + &f.lines(3..=3));
    }

    /// A partition taken over: its first flush passes over what the previous owner wrote
    /// and is killed mid-line in the finding after it. The cut at the next take-over,
    /// made before the findings topic says what was passed over, still knows the torn
    /// line for this store's own.
    #[test]
    fn a_torn_line_after_findings_passed_over_is_cut() {
        let mut f = Fixture::new();
        std::fs::write(&f.out, "theirs\n").unwrap();
        f.find(2);
        // The cursor as that flush commits it before writing: at the first finding.
        let file = File::open(&f.out).unwrap();
        let meta = file.metadata().unwrap();
        let len = meta.len();
        let at = OutboxCursor {
            next_seq: 1,
            dev: meta.dev(),
            ino: meta.ino(),
            file_len: len,
            tail_hash: tail_hash(&file, len).unwrap(),
        };
        f.store.put_meta_value(&cursor_names(&f.store, &f.out).0, &at).unwrap();
        // Torn past where it differs from the finding passed over.
        let torn = f.line(2);
        let mut append = std::fs::OpenOptions::new().append(true).open(&f.out).unwrap();
        append.write_all(&torn.as_bytes()[..torn.len() - 2]).unwrap();
        cut_torn_tail(&f.store, &f.out).unwrap();
        assert_eq!(f.read(), "theirs\n");
    }

    /// A file this store has no cursor for, holding its findings, written into by a
    /// flush killed mid-line (no cursor is committed before writing there): the torn line
    /// is cut and its finding written whole, once.
    #[test]
    fn a_torn_line_in_a_file_without_a_cursor_is_cut() {
        let mut f = Fixture::new();
        f.find(3);
        let torn = f.line(3);
        let torn = &torn[..torn.len() - 2];
        std::fs::write(&f.out, format!("theirs\n{}\n{}\n{torn}", f.line(2), f.line(1))).unwrap();
        assert_eq!(f.flush(), 1);
        assert_eq!(f.read(), format!("theirs\n{}\n{}\n{}\n", f.line(2), f.line(1), f.line(3)));
    }

    /// A findings file this store has no cursor for, holding some of its findings (a
    /// new data directory over the same logs): only the others are written.
    #[test]
    fn a_file_new_to_the_store_with_its_findings_gets_only_the_others() {
        let mut f = Fixture::new();
        f.find(3);
        std::fs::write(&f.out, format!("theirs\n{}\n", f.line(2))).unwrap();
        assert_eq!(f.flush(), 2);
        assert_eq!(f.read(), format!("theirs\n{}\n{}\n{}\n", f.line(2), f.line(1), f.line(3)));
        assert_eq!(f.flush(), 0);
        f.find(1);
        assert_eq!(f.flush(), 1);
        assert_eq!(f.read(), format!("theirs\n{}\n{}\n{}\n{}\n", f.line(2), f.line(1), f.line(3), f.line(4)));
    }

    /// Two stores writing one file (a Kafka node's partitions): one torn mid-line by a
    /// crash, the other flushing first. Cut before anyone writes, the torn line is gone
    /// and its finding is written whole, once; every line parses.
    #[test]
    fn a_torn_line_is_cut_before_another_store_writes_after_it() {
        let mut a = Fixture::new();
        let dir = tempfile::tempdir().unwrap();
        let mut b = Store::open(&dir.path().join("data")).unwrap();
        a.find(1);
        a.flush();
        a.find(1);
        let torn = a.line(2);
        let mut file = std::fs::OpenOptions::new().append(true).open(&a.out).unwrap();
        file.write_all(&torn.as_bytes()[..torn.len() / 2]).unwrap();
        let mut pass = b.pass_batch();
        pass.put_finding("b1", br#"{"finding_id":"b1"}"#.to_vec());
        pass.commit().unwrap();
        for store in [&a.store, &b] {
            cut_torn_tail(store, &a.out).unwrap();
        }
        assert_eq!(flush_outbox(&mut b, &a.out).unwrap(), 1);
        assert_eq!(a.flush(), 1);
        let text = a.read();
        assert_eq!(text, a.line(1) + "\n" + r#"{"finding_id":"b1"}"# + "\n" + &a.line(2) + "\n");
        assert!(text.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()), "{text}");
    }
}
