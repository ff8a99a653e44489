//! Why a plugin library, or the plugins folder, was not used.

use lookout_plugin_sdk::abi::{abi_version_parts, abi_version_string};
use std::path::PathBuf;

/// Why a file or folder is not safe to trust (see `guard`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsafeOwnership {
    #[error("writable by group or others (mode {mode:o}); run chmod go-w on it")]
    Writable { mode: u32 },
    #[error("owned by uid {uid}, not root or the user Lookout runs as (uid {service}); chown it")]
    Owner { uid: u32, service: u32 },
}

/// The plugins folder or its pin file cannot be used: no plugin from it is loaded.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done: `read plugins folder`, `write`, …
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("plugins folder {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("{} is not a directory (a link?): the private copies of plugins go there; remove it", .0.display())]
    NotPrivate(PathBuf),
    #[error("refusing {what} {}: the {what} is {reason}", path.display())]
    Unsafe { what: &'static str, path: PathBuf, reason: UnsafeOwnership },
    #[error("{}:{line}: expected '<sha256>  <file name>', got '{text}'", path.display())]
    PinLine { path: PathBuf, line: usize, text: String },
    #[error("{}:{line}: '{hash}' is not a SHA-256 in hex", path.display())]
    PinHash { path: PathBuf, line: usize, hash: String },
}

impl FolderError {
    pub(crate) fn io(action: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> FolderError {
        let path = path.to_path_buf();
        move |source| FolderError::Io { action, path, source }
    }
}

/// Why one library was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The library is not trusted, or is not a working Lookout plugin of an ABI this host
    /// speaks. It stays refused until the file (or the pin file) changes.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// Lookout could not do its part: the checked bytes could not be written to the
    /// private copy (a full disk, say). Not the library's fault: it is tried again on the
    /// next look at the folder.
    #[error("cannot write private copy {}", copy.display())]
    Failed {
        copy: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LoadError {
    /// Whether the same file may load on a later try without changing (see [`LoadError::Failed`]).
    pub fn is_retryable(&self) -> bool {
        matches!(self, LoadError::Failed { .. })
    }
}

/// What is wrong with a library that is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("cannot read it")]
    Unreadable(#[source] std::io::Error),
    #[error("is a symbolic link; copy the library itself into the plugins folder")]
    Symlink,
    #[error("changed while it was being checked; it is looked at again once it stops changing")]
    ChangedWhileChecked,
    #[error("is not a regular file")]
    NotAFile,
    #[error("the file is {0}")]
    Ownership(UnsafeOwnership),
    #[error("is {size} bytes, over the {limit} byte limit")]
    TooLarge { size: u64, limit: u64 },
    #[error(
        "is {size} bytes, shorter than the {needed} its own ELF headers say: still being written? It is looked at \
         again when it changes (copy a library beside the plugins folder, then move it in)"
    )]
    Incomplete { size: u64, needed: u64 },
    #[error("is not in the pin file {pin_file}; run `lookout plugins pin` to trust it")]
    NotPinned { pin_file: &'static str },
    #[error("SHA-256 {actual} does not match the pinned {pinned}: the file changed since it was pinned")]
    PinMismatch { actual: String, pinned: String },
    #[error("cannot load it")]
    Load(#[source] libloading::Error),
    #[error(
        "not a Lookout plugin: it exports no lookout_abi_version (build it with lookout_plugin_sdk::export_detector!)"
    )]
    NotAPlugin,
    #[error(
        "speaks plugin ABI version {}, this Lookout speaks {} and loads plugins of ABI {}.0 to {}; \
         rebuild it against a matching lookout-plugin-sdk",
        abi_version_string(*plugin),
        abi_version_string(*host),
        abi_version_parts(*host).0,
        abi_version_string(*host)
    )]
    AbiVersion { plugin: u32, host: u32 },
    #[error("missing symbol {0}: not a complete Lookout plugin")]
    MissingSymbol(String),
    #[error("manifest failed")]
    Manifest(#[source] super::loader::CallError),
    #[error("manifest is garbage: {0}")]
    ManifestGarbage(String),
    #[error("detector name {name} is already provided by {}; remove one of them", other.display())]
    DuplicateName { name: String, other: PathBuf },
}
