//! The retention a node's data directory was last run with, kept in a small file beside
//! its partitions (`node-retention.json`).
//!
//! A node's partitions each have a store, opened only when the partition is assigned, so
//! the data directory has no store of its own to record the retention in (as the daemon's
//! does). Without the record, a node restarted with no `--retention` would apply the
//! 31-day default to partitions kept with a longer one, and the rows between the two
//! horizons would be removed for good (the horizon never moves back).

use super::KafkaError;
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "node-retention.json";

fn path(data: &Path) -> PathBuf {
    data.join(FILE_NAME)
}

/// The file's content: the retention in ticks, or none (keep everything).
#[derive(serde::Serialize, serde::Deserialize)]
struct Recorded {
    retention_ticks: Option<i64>,
}

/// The retention recorded in `data` (`Some(None)`: keep everything), if any.
pub fn recorded(data: &Path) -> Result<Option<Option<i64>>, KafkaError> {
    let path = path(data);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(KafkaError::Io { what: "read", path, source }),
    };
    let r: Recorded = serde_json::from_slice(&bytes).map_err(|e| {
        KafkaError::Topics(format!(
            "{} is not a recorded retention ({e}): pass --retention to say which to use, or remove the file",
            path.display()
        ))
    })?;
    if r.retention_ticks.is_some_and(|t| t <= 0) {
        return Err(KafkaError::Topics(format!(
            "{} records a retention that is not positive: pass --retention to say which to use, or remove the file",
            path.display()
        )));
    }
    Ok(Some(r.retention_ticks))
}

/// Records `retention` in `data`, durably (written aside, synced, renamed over, the
/// folder synced): a crash leaves the old record or the new one, never a torn one.
pub fn record(data: &Path, retention: Option<i64>) -> Result<(), KafkaError> {
    if recorded(data).ok().flatten() == Some(retention) {
        return Ok(());
    }
    let path = path(data);
    let tmp = data.join(format!("{FILE_NAME}.tmp"));
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| KafkaError::Io { what, path, source }
    };
    let body = serde_json::to_vec(&Recorded { retention_ticks: retention }).map_err(|e| KafkaError::Io {
        what: "encode",
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&body).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io("rename into place", &path))?;
    std::fs::File::open(data).and_then(|d| d.sync_all()).map_err(io("sync", data))?;
    Ok(())
}

/// The retention a node runs with: the one given (`--retention` or the config file's), or
/// else the one its data directory recorded, or else `default` — unless the directory
/// already holds partitions and no record (kept by a Lookout that did not record one):
/// their retention is not known, and the default could remove rows for good, so the
/// operator is asked to say. [`record`] it once the node's start-up checks pass.
pub fn resolve(data: &Path, given: bool, default: Option<i64>) -> Result<Option<i64>, KafkaError> {
    if given {
        // A retention given does not read the record: it replaces it, damaged or not.
        return Ok(default);
    }
    match recorded(data)? {
        Some(recorded) => {
            if recorded != default {
                tracing::info!(
                    retention = %crate::daemon::retention_text(recorded),
                    "no retention given: keeping the one this node's data directory recorded"
                );
            }
            Ok(recorded)
        }
        None if holds_partitions(data) => Err(KafkaError::Topics(format!(
            "{} holds partitions but no record of the retention they were kept with: pass --retention (or \
             set retention in the config file) once, to the one this node ran with; it is recorded from then on",
            data.display()
        ))),
        None => Ok(default),
    }
}

fn holds_partitions(data: &Path) -> bool {
    std::fs::read_dir(data.join("partitions")).is_ok_and(|mut entries| entries.next().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400 * lookout_plugin_sdk::time::TICKS_PER_SEC;

    /// What a start does: resolves, then records.
    fn start(data: &Path, given: bool, default: Option<i64>) -> Result<Option<i64>, KafkaError> {
        let r = resolve(data, given, default)?;
        record(data, r)?;
        Ok(r)
    }

    #[test]
    fn a_node_given_no_retention_keeps_the_recorded_one_and_one_given_replaces_it() {
        let data = tempfile::tempdir().unwrap();
        // Nothing recorded: the default, then recorded.
        assert_eq!(start(data.path(), false, Some(31 * DAY)).unwrap(), Some(31 * DAY));
        assert_eq!(recorded(data.path()).unwrap(), Some(Some(31 * DAY)));
        // Given: it wins and is recorded.
        assert_eq!(start(data.path(), true, Some(90 * DAY)).unwrap(), Some(90 * DAY));
        // Not given: the recorded 90 days, not the 31-day default.
        assert_eq!(start(data.path(), false, Some(31 * DAY)).unwrap(), Some(90 * DAY));
        // Keep everything is a retention too.
        assert_eq!(start(data.path(), true, None).unwrap(), None);
        assert_eq!(start(data.path(), false, Some(31 * DAY)).unwrap(), None);
        assert!(!data.path().join(format!("{FILE_NAME}.tmp")).exists());
    }

    /// Partitions kept with no record (by a Lookout that kept none): the default is not
    /// applied to them; the operator is asked to say.
    #[test]
    fn partitions_with_no_record_need_a_retention_given() {
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(data.path().join("partitions").join("rows-0")).unwrap();
        let e = resolve(data.path(), false, Some(31 * DAY)).unwrap_err().to_string();
        assert!(e.contains("--retention") && e.contains("holds partitions"), "{e}");
        assert_eq!(start(data.path(), true, Some(90 * DAY)).unwrap(), Some(90 * DAY));
        assert_eq!(start(data.path(), false, Some(31 * DAY)).unwrap(), Some(90 * DAY));
    }

    #[test]
    fn a_damaged_record_is_an_error_that_says_what_to_do() {
        let data = tempfile::tempdir().unwrap();
        std::fs::write(data.path().join(FILE_NAME), b"{\"retention_ticks\": \"x\"").unwrap();
        let e = resolve(data.path(), false, Some(DAY)).unwrap_err().to_string();
        assert!(e.contains(FILE_NAME) && e.contains("--retention"), "{e}");
        // A retention given does not need the record.
        assert_eq!(start(data.path(), true, Some(DAY)).unwrap(), Some(DAY));
        std::fs::write(data.path().join(FILE_NAME), b"{\"retention_ticks\": -5}").unwrap();
        assert!(resolve(data.path(), false, Some(DAY)).is_err());
    }
}
