//! Free space in the data directory. sled can wait forever for a write that failed for
//! lack of space (and opening it on a full disk can leave a snapshot it then refuses), so
//! Lookout stops writing before the disk is full instead of finding out from sled.

use std::path::Path;

/// Free space the data directory needs for rows to be stored (and for the database to be
/// reopened after a failure).
pub const MIN_FREE: u64 = 16 << 20;

/// Bytes available to this user on the file system of `dir` (`None` if it cannot tell).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Whether the data directory is below [`MIN_FREE`].
pub fn low(dir: &Path) -> bool {
    #[cfg(test)]
    if LOW_FOR_TESTS.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|d| d == dir) {
        return true;
    }
    free_bytes(dir).is_some_and(|f| f < MIN_FREE)
}

/// Tests: data directories taken to be nearly full (each test its own, so tests running
/// side by side do not see each other's).
#[cfg(test)]
pub static LOW_FOR_TESTS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Ingestion stopped because the data directory's disk is nearly full; the batch in hand
/// was not committed and is read again later.
#[derive(Debug, thiserror::Error)]
#[error(
    "the disk of {0} has less than {min} MiB free: stopped before writing (nothing is lost; \
     free some space and run again, files resume at their committed offsets)",
    min = MIN_FREE >> 20
)]
pub struct DiskSpaceLow(pub String);
