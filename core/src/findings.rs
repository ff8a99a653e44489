//! The findings JSONL: written from the results tree through its own cursor, so that a
//! crash at any point leaves every finding in the file exactly once.
//!
//! The cursor (per file path) records the next outbox sequence and the file length at
//! the moment it was committed. On the next flush, bytes past that length are lines that
//! were written but not committed, so they are cut and written again.

use crate::store::{dec, enc, keys, Store};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct OutboxCursor {
    next_seq: u64,
    file_len: u64,
}

fn cursor_key(path: &Path) -> Vec<u8> {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    keys::named_key(keys::META, &format!("outbox:{}", abs.display()))
}

/// Appends every finding not yet in `path` to it; returns how many lines were written.
pub fn flush_outbox(store: &mut Store, path: &Path) -> Result<u64> {
    let key = cursor_key(path);
    let mut cursor: OutboxCursor = match store.db().get(&key)? {
        Some(v) => dec(&v)?,
        None => OutboxCursor { next_seq: 1, file_len: 0 },
    };
    let pending = store
        .db()
        .range(keys::seq_key(keys::OUTBOX, cursor.next_seq)..)
        .next()
        .is_some_and(|kv| kv.is_ok_and(|(k, _)| k.first() == Some(&keys::OUTBOX)));
    let file_len = std::fs::metadata(path).map(|m| m.len()).ok();
    if !pending && file_len == Some(cursor.file_len) {
        // Nothing new, and the file is as we left it: no disk work at all.
        return Ok(0);
    }
    // Findings must be durable before they leave the process.
    store.flush()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open findings file {}", path.display()))?;
    let len = file.metadata()?.len();
    if len > cursor.file_len {
        tracing::info!(file = %path.display(), from = len, to = cursor.file_len, "cutting uncommitted findings tail");
        file.set_len(cursor.file_len).with_context(|| format!("cannot truncate {}", path.display()))?;
    } else if len < cursor.file_len {
        tracing::warn!(file = %path.display(), "findings file is shorter than written; it was replaced, appending");
        cursor.file_len = len;
    }
    file.seek(SeekFrom::Start(cursor.file_len))?;
    let mut out = std::io::BufWriter::new(&mut file);
    let mut written = 0u64;
    let mut next = cursor.next_seq;
    let mut bytes = cursor.file_len;
    let start = keys::seq_key(keys::OUTBOX, cursor.next_seq);
    for kv in store.db().range(start..keys::seq_key(keys::OUTBOX, u64::MAX)) {
        let (k, fid) = kv?;
        let Some(json) = store.db().get(keys::named_key(keys::FINDING, &String::from_utf8_lossy(&fid)))? else {
            continue;
        };
        out.write_all(&json)?;
        out.write_all(b"\n")?;
        bytes += json.len() as u64 + 1;
        written += 1;
        next = keys::seq_of(&k).unwrap_or(next) + 1;
        if written == 1 && crate::failpoint::armed("outbox-mid-write") {
            // Make the torn tail real before dying, as a crash mid-write would leave it.
            out.flush()?;
            crate::failpoint::hit("outbox-mid-write");
        }
    }
    out.flush().with_context(|| format!("cannot write {}", path.display()))?;
    drop(out);
    file.sync_data().with_context(|| format!("cannot sync {}", path.display()))?;
    crate::failpoint::hit("outbox-after-write");
    if written > 0 || cursor.file_len != bytes {
        store.db().insert(&key, enc(&OutboxCursor { next_seq: next, file_len: bytes })?)?;
        store.flush()?;
    }
    Ok(written)
}

/// Every finding in the results tree, in the order they were found.
pub fn all_findings(store: &Store) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for kv in store.db().scan_prefix([keys::OUTBOX]) {
        let (_, fid) = kv?;
        if let Some(json) = store.db().get(keys::named_key(keys::FINDING, &String::from_utf8_lossy(&fid)))? {
            out.push(serde_json::from_slice(&json)?);
        }
    }
    Ok(out)
}
