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

use crate::daemon::plugin_set::PluginSet;
use crate::error::Chain;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most this many sets are kept, whatever the node owns.
pub const MAX_SPARES: usize = 8;

/// `<data>/spare-detectors/<n>`: each set's private copies, in a folder of its own.
const FOLDER: &str = "spare-detectors";

/// A folder number, held by one set at a time for the life of the process.
///
/// The dynamic loader hands back the library it already has for a path it has seen,
/// with that library's detector instance, and libraries are never unloaded. So a number
/// is used again only once the set that held it is dropped — whose detectors are reset as
/// they are dropped (`Plugin`'s `Drop`), as a partition's folder is when the partition is
/// taken again — and two live sets never share one. Reusing them bounds the libraries a
/// node ever loads by the sets it holds at once, however often partitions move.
pub struct FolderNumber(u64);

/// Numbers given back, and the next never used.
static NUMBERS: Mutex<(Vec<u64>, u64)> = Mutex::new((Vec::new(), 0));

impl FolderNumber {
    fn take() -> FolderNumber {
        let mut numbers = NUMBERS.lock().unwrap_or_else(|p| p.into_inner());
        let (free, next) = &mut *numbers;
        FolderNumber(free.pop().unwrap_or_else(|| {
            *next += 1;
            *next - 1
        }))
    }
}

impl Drop for FolderNumber {
    fn drop(&mut self) {
        NUMBERS.lock().unwrap_or_else(|p| p.into_inner()).0.push(self.0);
    }
}

/// Where a set's copies are. Dropped after the set it belongs to (declared after it in
/// [`Spare`] and in the partition): its number goes back only once the set is gone.
pub struct SpareHome {
    pub path: PathBuf,
    _number: FolderNumber,
}

/// A loaded set and the folder holding its copies (removed with the partition that takes
/// it, [`super::partition::Partition::drop_files`]). `set` is declared first, so it is
/// dropped before `home` gives its number back.
pub struct Spare {
    pub set: PluginSet,
    pub home: SpareHome,
}

#[derive(Default)]
pub struct SpareDetectors {
    /// `<data>/spare-detectors`; empty: none are kept (a node's context before it
    /// starts, or one whose folder could not be cleared).
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
    /// A folder that cannot be cleared turns the sets off (said once): partitions taken
    /// over then load their own, as they would without them.
    pub fn new(data: &Path, plugins: &Path) -> SpareDetectors {
        let root = data.join(FOLDER);
        match std::fs::remove_dir_all(&root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(folder = %root.display(), error = %e, "cannot clear the detector sets loaded ahead; partitions taken over load their own");
                SpareDetectors::default()
            }
            _ => SpareDetectors { root, plugins: plugins.to_path_buf(), sets: Vec::new(), quiet_until: None },
        }
    }

    /// A loaded set, if one is ready.
    pub fn take(&mut self) -> Option<Spare> {
        self.sets.pop()
    }

    /// How many sets are ready.
    pub fn ready(&self) -> usize {
        self.sets.len()
    }

    /// Loads one more set if fewer than `want` (at most [`MAX_SPARES`]) are ready; returns
    /// whether it did. One that loads no detector, or fails, is not kept, and none is tried
    /// again for a while: a failure here is only a slower take-over, never a reason to
    /// stop. A set loads without logging: what it loads or refuses is what the sets of
    /// the partitions owned reported (it is loaded only while they run detectors), and a
    /// change since is reported by the set's look at the folder as it is handed over.
    pub fn top_up(&mut self, want: usize) -> bool {
        const RETRY_AFTER: Duration = Duration::from_secs(10);
        if self.root.as_os_str().is_empty()
            || self.sets.len() >= want.min(MAX_SPARES)
            || self.quiet_until.is_some_and(|t| Instant::now() < t)
        {
            return false;
        }
        let number = FolderNumber::take();
        let path = self.root.join(number.0.to_string());
        let home = SpareHome { path, _number: number };
        // One dispatcher that records nothing, made once (making one registers it with
        // every log call site).
        static QUIET: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
        let quiet = QUIET.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
        let loaded = tracing::dispatcher::with_default(quiet, || self.load(&home.path));
        match loaded {
            Ok(Some(set)) => {
                tracing::debug!(folder = %home.path.display(), detectors = set.plugins.len(), ready = self.sets.len() + 1, "detector set loaded ahead of a take-over");
                self.sets.push(Spare { set, home });
                true
            }
            outcome => {
                if let Err(e) = outcome {
                    tracing::debug!(folder = %home.path.display(), error = %Chain(&e), "cannot load a detector set ahead of a take-over; partitions taken over load their own");
                }
                let _ = std::fs::remove_dir_all(&home.path);
                self.quiet_until = Some(Instant::now() + RETRY_AFTER);
                false
            }
        }
    }

    fn load(&self, home: &Path) -> Result<Option<PluginSet>, crate::plugin::FolderError> {
        std::fs::create_dir_all(home).map_err(crate::plugin::FolderError::io("create", home))?;
        let mut set = PluginSet::new(&self.plugins, home);
        set.refresh()?;
        Ok((!set.plugins.is_empty()).then_some(set))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Folder numbers are the process's: the tests that take them run one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// A folder number is never held by two at once, and one given back is used again
    /// before a new one is made.
    #[test]
    fn folder_numbers_are_used_again_only_once_given_back() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let held: Vec<FolderNumber> = (0..5).map(|_| FolderNumber::take()).collect();
        let mut numbers: Vec<u64> = held.iter().map(|n| n.0).collect();
        numbers.dedup();
        assert_eq!(numbers.len(), 5, "five held at once are five numbers");
        let given_back = held[2].0;
        let mut held = held;
        drop(held.remove(2));
        let again: Vec<FolderNumber> = (0..3).map(|_| FolderNumber::take()).collect();
        assert!(again.iter().all(|n| !held.iter().any(|h| h.0 == n.0)), "never one still held");
        assert!(again.iter().any(|n| n.0 == given_back), "the number given back is used again");
    }

    /// What an earlier run left is removed at the start; an empty plugins folder gives no
    /// set worth keeping, and is not tried again at once; a node's context before its
    /// start keeps none.
    #[test]
    fn an_empty_folder_gives_no_set_and_an_earlier_run_s_are_removed() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let data = tempfile::tempdir().unwrap();
        let plugins = tempfile::tempdir().unwrap();
        let left = data.path().join(FOLDER).join("0");
        std::fs::create_dir_all(&left).unwrap();
        std::fs::write(left.join("stale"), b"x").unwrap();
        let mut spares = SpareDetectors::new(data.path(), plugins.path());
        assert!(!data.path().join(FOLDER).exists(), "an earlier run's sets are removed");
        assert!(!spares.top_up(2));
        assert!(spares.sets.is_empty());
        let left_over = std::fs::read_dir(data.path().join(FOLDER)).map_or(0, |d| d.count());
        assert_eq!(left_over, 0, "the folder of a set not kept is removed");
        assert!(!spares.top_up(2), "not tried again at once");
        assert!(spares.take().is_none());
        assert!(!SpareDetectors::default().top_up(4));
    }
}
