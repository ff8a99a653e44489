//! The plugins folder, watched: a library dropped in is verified, loaded and backfilled
//! without a restart; a changed one is loaded from a fresh private copy; a removed one
//! stops running (its code stays mapped: libraries are never unloaded).

use crate::error::Chain;
use crate::plugin::{self, guard, FolderError, Plugin};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What identifies a version of a file on disk without reading it: its content (inode,
/// length, mtime) and what the guard checks of it besides (the ctime moves with a chmod or
/// chown, so a library refused for its permissions or owner is tried again once fixed).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::symlink_metadata(path).ok()?;
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: ns(m.mtime(), m.mtime_nsec()),
        ctime_ns: ns(m.ctime(), m.ctime_nsec()),
    })
}

pub struct PluginSet {
    dir: PathBuf,
    data_dir: PathBuf,
    pub plugins: Vec<Plugin>,
    seen: BTreeMap<PathBuf, Option<Stamp>>,
    pins: Option<Stamp>,
    /// Libraries refused because another one provides their detector: looked at again
    /// whenever the folder changes (the other one may have gone).
    duplicates: BTreeSet<PathBuf>,
    /// Refusals since start.
    pub failures: u64,
    /// Whether the folder has been looked at (`refresh`) at least once.
    looked: bool,
    /// Why the folder could not be used, as last reported (each cause said once).
    folder_error: Option<String>,
}

impl PluginSet {
    /// Detectors from `dir`; their private copies go to `data_dir/plugin-cache`.
    pub fn new(dir: &Path, data_dir: &Path) -> PluginSet {
        PluginSet {
            dir: dir.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            plugins: Vec::new(),
            seen: BTreeMap::new(),
            pins: None,
            duplicates: BTreeSet::new(),
            failures: 0,
            looked: false,
            folder_error: None,
        }
    }

    /// Whether the folder has been looked at yet: a set that has not loads everything at
    /// its first [`Self::refresh`].
    pub fn looked(&self) -> bool {
        self.looked
    }

    /// The folder cannot be used: no detector runs (the logs are still read), reported
    /// once, and the folder is looked at afresh on the next look. Whether any ran.
    fn stop_all(&mut self, e: &FolderError, what: &str) -> bool {
        // Said (and counted) once per cause, not at every look while it lasts.
        let cause = format!("{what}: {}", Chain(e));
        if !self.plugins.is_empty() || self.folder_error.as_ref() != Some(&cause) {
            tracing::error!(error = %Chain(e), "{what}");
            self.failures += 1;
            self.folder_error = Some(cause);
        }
        let changed = !self.plugins.is_empty();
        self.plugins.clear();
        self.seen.clear();
        self.pins = None;
        changed
    }

    /// Re-reads the folder; returns whether the set of running detectors changed.
    pub fn refresh(&mut self) -> Result<bool, FolderError> {
        self.looked = true;
        if let Err(e) = guard::check_dir(&self.dir) {
            return Ok(self.stop_all(&e, "plugins folder refused; no detector runs until it is fixed"));
        }
        let files = match guard::discover(&self.dir) {
            Ok(files) => files,
            Err(e) => return Ok(self.stop_all(&e, "plugins folder cannot be listed; no detector runs until it can")),
        };
        if self.folder_error.take().is_some() {
            tracing::info!(folder = %self.dir.display(), "plugins folder usable again");
        }
        let now: BTreeMap<PathBuf, Option<Stamp>> = files.iter().map(|f| (f.clone(), stamp(f))).collect();
        let pins = stamp(&self.dir.join(guard::PIN_FILE));
        let pins_changed = pins != self.pins;
        if now == self.seen && !pins_changed {
            return Ok(false);
        }
        let pin_list = match guard::read_pins(&self.dir) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %Chain(&e), "pin file refused; no detector runs until it is fixed");
                self.failures += 1;
                self.plugins.clear();
                self.seen = now;
                self.pins = pins;
                return Ok(true);
            }
        };
        let cache = match guard::cache_dir(&self.data_dir) {
            Ok(cache) => cache,
            Err(e) => {
                // Nothing can be loaded without it; what runs keeps running, and the
                // folder is looked at again on the next look.
                tracing::warn!(error = %Chain(&e), "cannot prepare the private copies' folder; plugins not looked at for now");
                self.failures += 1;
                return Ok(false);
            }
        };
        // Something changed: a library refused as a duplicate may be the only one now.
        for file in std::mem::take(&mut self.duplicates) {
            self.seen.remove(&file);
        }
        let mut changed = false;
        let mut retry = Vec::new();
        // Removed files stop running.
        let before = self.plugins.len();
        self.plugins.retain(|p| now.contains_key(&p.file));
        changed |= self.plugins.len() != before;
        for (file, st) in &now {
            let unchanged = self.seen.get(file) == Some(st) && !pins_changed;
            if unchanged {
                continue;
            }
            self.plugins.retain(|p| &p.file != file);
            changed = true;
            match plugin::load_one(file, &cache, pin_list.as_ref()) {
                Ok(p) => {
                    if let Some(other) = self.plugins.iter().find(|o| o.manifest.name == p.manifest.name) {
                        tracing::warn!(plugin = %file.display(), other = %other.file.display(), name = %p.manifest.name, "plugin refused: detector name already loaded");
                        self.failures += 1;
                        self.duplicates.insert(file.clone());
                        continue;
                    }
                    tracing::info!(plugin = %file.display(), detector = %p.id(), sha256 = %p.sha256, "plugin loaded");
                    self.plugins.push(p);
                }
                Err(e) => {
                    self.failures += 1;
                    if e.is_retryable() {
                        tracing::warn!(plugin = %file.display(), error = %Chain(&e), "plugin not loaded; tried again on the next look");
                        retry.push(file.clone());
                    } else {
                        tracing::warn!(plugin = %file.display(), reason = %Chain(&e), "plugin refused");
                    }
                }
            }
        }
        self.seen = now;
        // Not the library's fault (say, a full disk): try it again on the next refresh.
        for file in retry {
            self.seen.remove(&file);
        }
        self.pins = pins;
        Ok(changed)
    }
}
