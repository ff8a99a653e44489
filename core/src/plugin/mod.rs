//! The plugin host: finding, verifying, loading and calling detector libraries.
//!
//! - [`guard`]: what may be loaded (ownership, permissions, pins) and the private copy.
//! - [`loader`]: the C ABI calls into a loaded library (unsafe lives here and in
//!   [`host_api`] only).
//! - [`host_api`]: the callbacks a plugin makes into the store during a pass.
//! - [`error`]: why a library (refused, or failed to load) or the folder was not used.
//! - [`running`]: the detector calls running now, and a watch that names one running long.

pub mod error;
pub mod guard;
pub mod host_api;
pub mod loader;
pub mod running;

use lookout_plugin_sdk::{InputSpec, Manifest};
use std::path::{Path, PathBuf};

pub use error::{FolderError, LoadError, Refused};
pub use guard::{Refusal, PIN_FILE};
pub use loader::PluginLib;

/// A verified, loaded detector library.
pub struct Plugin {
    /// The file in the plugins folder it came from.
    pub file: PathBuf,
    /// SHA-256 of the loaded copy.
    pub sha256: String,
    pub manifest: Manifest,
    pub lib: PluginLib,
    /// Whether `init` succeeded since the last load, panic or failed pass.
    pub initialised: bool,
    /// How the detector wants its inputs handed over, as its last `init` answered.
    pub inputs: Vec<InputSpec>,
    /// The parameters its last `init` was given (`--set` and `[detectors.NAME]`), as the
    /// scheduler records them with its passes: a change re-reads every stored row.
    pub params: String,
    /// Passes failed in a row (the detector's own failure), and when the next may run: a
    /// detector that fails on what it is handed is not run again at every look.
    pub failed_passes: u32,
    pub retry_at: Option<std::time::Instant>,
}

/// A detector keeps its state inside its library, which is never unloaded: a plugin
/// dropped for good (removed or replaced in the folder, a Kafka partition given up) would
/// hold its aggregates in memory for the life of the process. An `init` without state
/// replaces them with an empty detector. (No other live plugin shares that state: each
/// folder of plugins loads its own copies, and a file reloaded in place — same copy, same
/// library — is dropped before it is loaded again.)
impl Drop for Plugin {
    fn drop(&mut self) {
        // A call into the detector's code like any other: named if it never returns.
        let _call = running::enter(&self.manifest.name, &self.manifest.version, "init");
        if let Err(e) = self.lib.init(&lookout_plugin_sdk::InitRequest { params: Vec::new(), state: Vec::new() }) {
            tracing::debug!(detector = %self.id(), error = %e, "a dropped detector did not release its state");
        }
    }
}

impl Plugin {
    /// `name@version`: the key of the detector's cursor, state and finding ids.
    pub fn id(&self) -> String {
        format!("{}@{}", self.manifest.name, self.manifest.version)
    }
}

/// What loading a plugins folder gave.
pub struct Loaded {
    pub plugins: Vec<Plugin>,
    pub refused: Vec<Refusal>,
}

/// Loads every `*.so` in `dir` that passes the checks of [`guard`], from private copies
/// under `<data>/plugin-cache`. A refused file is reported and skipped; a folder that
/// fails the checks itself is an error.
pub fn load_dir(dir: &Path, data_dir: &Path) -> Result<Loaded, FolderError> {
    guard::check_dir(dir)?;
    let pins = guard::read_pins(dir)?;
    let cache = guard::cache_dir(data_dir)?;
    let mut plugins: Vec<Plugin> = Vec::new();
    let mut refused = Vec::new();
    for file in guard::discover(dir)? {
        match load_one(&file, &cache, pins.as_ref()) {
            Ok(p) => {
                if let Some(other) = plugins.iter().find(|o| o.manifest.name == p.manifest.name) {
                    let reason = Refused::DuplicateName { name: p.manifest.name.clone(), other: other.file.clone() };
                    refused.push(Refusal { path: file, reason: reason.into() });
                } else {
                    plugins.push(p);
                }
            }
            Err(reason) => refused.push(Refusal { path: file, reason }),
        }
    }
    for r in &refused {
        tracing::warn!(plugin = %r.path.display(), reason = %crate::error::Chain(&r.reason), "plugin refused");
    }
    Ok(Loaded { plugins, refused })
}

/// Verifies, copies and loads one library.
pub fn load_one(file: &Path, cache: &Path, pins: Option<&guard::Pins>) -> Result<Plugin, LoadError> {
    let verified = guard::verify_and_copy(file, cache, pins)?;
    let lib = loader::load(&verified.copy)?;
    let manifest = lib.manifest()?;
    Ok(Plugin {
        file: file.to_path_buf(),
        sha256: verified.sha256,
        manifest,
        lib,
        initialised: false,
        inputs: Vec::new(),
        params: String::new(),
        failed_passes: 0,
        retry_at: None,
    })
}
