//! Detector sets loaded ahead of a take-over.
//!
//! A partition a node takes over needs its own copy of every detector library (a library
//! holds one detector instance, the SDK's export, so partitions cannot share one), and
//! checking, copying and loading four libraries took about 5 ms a partition, inside the
//! rebalance callback, before anything of the partition is stored: a failover's replay
//! waited for it. A node therefore keeps sets loaded while it is not replaying, as many as
//! it owns partitions (enough to take over at once from one peer with an equal share), and
//! a partition taken over with nothing loaded takes one. The set looks at the plugins
//! folder again as it is handed over, so a library changed, added or removed since it was
//! loaded is loaded or dropped then, as it would have been from scratch.

use super::KafkaError;
use crate::daemon::plugin_set::PluginSet;
use crate::error::Chain;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most this many sets are kept, whatever the node owns.
pub const MAX_SPARES: usize = 8;

/// `<data>/spare-detectors/<n>`: each set's private copies, in a folder of its own.
const FOLDER: &str = "spare-detectors";

/// Numbers the sets' folders for the life of the process: a library is loaded by its
/// path, and the dynamic loader hands back the library already loaded from a path it has
/// seen, with its detector instance; a folder's path is therefore never used twice.
static NEXT_FOLDER: AtomicU64 = AtomicU64::new(0);

/// A loaded set and the folder holding its copies (removed with the partition that takes
/// it, [`super::partition::Partition::drop_files`]).
pub struct Spare {
    pub set: PluginSet,
    pub home: PathBuf,
}

#[derive(Default)]
pub struct SpareDetectors {
    /// `<data>/spare-detectors`; empty: none are kept (a node's context before it starts).
    root: PathBuf,
    plugins: PathBuf,
    sets: Vec<Spare>,
    /// After a set that loaded nothing (an empty or refused folder) or failed: not tried
    /// again before then.
    quiet_until: Option<Instant>,
}

impl SpareDetectors {
    /// Sets loaded from `plugins`, their copies under `data`. What an earlier run (or an
    /// earlier work loop of this one, whose partitions are closed) left there is removed:
    /// nothing maps it any more, or only libraries already loaded, which do not need it.
    pub fn new(data: &Path, plugins: &Path) -> Result<SpareDetectors, KafkaError> {
        let root = data.join(FOLDER);
        match std::fs::remove_dir_all(&root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(KafkaError::Io { what: "remove the spare detector sets in", path: root, source: e });
            }
            _ => {}
        }
        Ok(SpareDetectors { root, plugins: plugins.to_path_buf(), sets: Vec::new(), quiet_until: None })
    }

    /// A loaded set, if one is ready.
    pub fn take(&mut self) -> Option<Spare> {
        self.sets.pop()
    }

    /// Loads one more set if fewer than `want` (at most [`MAX_SPARES`]) are ready; returns
    /// whether it did. One that loads no detector, or fails, is not kept, and none is tried
    /// again for `retry_after` (the folder is then as a partition's own set would find it,
    /// and a failure here is only a slower take-over, never a reason to stop).
    pub fn top_up(&mut self, want: usize) -> bool {
        const RETRY_AFTER: Duration = Duration::from_secs(10);
        if self.root.as_os_str().is_empty()
            || self.sets.len() >= want.min(MAX_SPARES)
            || self.quiet_until.is_some_and(|t| Instant::now() < t)
        {
            return false;
        }
        let home = self.root.join(NEXT_FOLDER.fetch_add(1, Ordering::Relaxed).to_string());
        match self.load(&home) {
            Ok(Some(set)) => {
                tracing::debug!(folder = %home.display(), detectors = set.plugins.len(), ready = self.sets.len() + 1, "detector set loaded ahead of a take-over");
                self.sets.push(Spare { set, home });
                true
            }
            outcome => {
                if let Err(e) = outcome {
                    tracing::warn!(folder = %home.display(), error = %Chain(&e), "cannot load a detector set ahead of a take-over; partitions taken over load their own");
                }
                let _ = std::fs::remove_dir_all(&home);
                self.quiet_until = Some(Instant::now() + RETRY_AFTER);
                false
            }
        }
    }

    fn load(&self, home: &Path) -> Result<Option<PluginSet>, KafkaError> {
        std::fs::create_dir_all(home).map_err(|source| KafkaError::Io {
            what: "create",
            path: home.to_path_buf(),
            source,
        })?;
        let mut set = PluginSet::new(&self.plugins, home);
        set.refresh()?;
        Ok((!set.plugins.is_empty()).then_some(set))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets are loaded up to what is wanted, each in a folder never used before, and what
    /// an earlier run left is removed at the start.
    #[test]
    fn sets_are_loaded_up_to_the_want_each_in_a_new_folder() {
        let data = tempfile::tempdir().unwrap();
        let plugins = tempfile::tempdir().unwrap();
        let left = data.path().join(FOLDER).join("0");
        std::fs::create_dir_all(&left).unwrap();
        std::fs::write(left.join("stale"), b"x").unwrap();
        let mut spares = SpareDetectors::new(data.path(), plugins.path()).unwrap();
        assert!(!data.path().join(FOLDER).exists(), "an earlier run's sets are removed");
        // An empty plugins folder: nothing worth keeping, and no retry at once.
        assert!(!spares.top_up(2));
        assert!(spares.sets.is_empty());
        assert!(!spares.top_up(2), "not tried again at once");
        assert!(spares.take().is_none());
        // A context that was never set up keeps none.
        assert!(!SpareDetectors::default().top_up(4));
    }
}
