//! What may be loaded. Loading a library runs its code — the very attack the first
//! detector hunts — so a library is loaded only if its folder and file are not writable
//! by group or others, are owned by root or the user Lookout runs as, and (when a pin
//! file exists) its SHA-256 is pinned. The bytes that were checked are written to a
//! private copy, and that copy is what gets loaded, so the file cannot change between
//! the check and the load.

use super::error::{FolderError, LoadError, Refused, UnsafeOwnership};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The pin file in the plugins folder, in `sha256sum` format (`<hex>  <file name>`), so
/// `sha256sum -c lookout-pins.sha256` checks it too.
pub const PIN_FILE: &str = "lookout-pins.sha256";

/// Libraries larger than this are refused without being read.
const MAX_PLUGIN_BYTES: u64 = 512 << 20;

/// A library that was not loaded, and why.
#[derive(Debug)]
pub struct Refusal {
    pub path: PathBuf,
    pub reason: LoadError,
}

pub struct Verified {
    pub copy: PathBuf,
    pub sha256: String,
}

/// File name → pinned SHA-256 (lowercase hex).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pins(pub BTreeMap<String, String>);

fn service_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Why `meta` is not safe to trust, if it is not.
fn unsafe_ownership(meta: &std::fs::Metadata) -> Option<UnsafeOwnership> {
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Some(UnsafeOwnership::Writable { mode: mode & 0o7777 });
    }
    let uid = meta.uid();
    if uid != 0 && uid != service_uid() {
        return Some(UnsafeOwnership::Owner { uid, service: service_uid() });
    }
    None
}

pub fn check_dir(dir: &Path) -> Result<(), FolderError> {
    let meta = std::fs::metadata(dir).map_err(FolderError::io("read plugins folder", dir))?;
    if !meta.is_dir() {
        return Err(FolderError::NotADirectory(dir.to_path_buf()));
    }
    if let Some(reason) = unsafe_ownership(&meta) {
        return Err(FolderError::Unsafe { what: "plugins folder", path: dir.to_path_buf(), reason });
    }
    Ok(())
}

/// The `*.so` files in `dir`, in name order.
pub fn discover(dir: &Path) -> Result<Vec<PathBuf>, FolderError> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(FolderError::io("list plugins folder", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "so"))
        .collect();
    out.sort();
    Ok(out)
}

pub fn read_pins(dir: &Path) -> Result<Option<Pins>, FolderError> {
    let path = dir.join(PIN_FILE);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FolderError::io("read pin file", &path)(e)),
    };
    if let Some(reason) = unsafe_ownership(&meta) {
        return Err(FolderError::Unsafe { what: "pin file", path, reason });
    }
    let text = std::fs::read_to_string(&path).map_err(FolderError::io("read pin file", &path))?;
    let mut pins = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (hash, name) = line.split_once(char::is_whitespace).ok_or_else(|| FolderError::PinLine {
            path: path.clone(),
            line: i + 1,
            text: line.to_string(),
        })?;
        let name = name.trim().trim_start_matches('*');
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FolderError::PinHash { path, line: i + 1, hash: hash.to_string() });
        }
        pins.insert(name.to_string(), hash.to_ascii_lowercase());
    }
    Ok(Some(Pins(pins)))
}

pub fn write_pins(dir: &Path, pins: &Pins) -> Result<PathBuf, FolderError> {
    let path = dir.join(PIN_FILE);
    let mut text =
        String::from("# Lookout plugin pins: only these libraries, with exactly these SHA-256s, are loaded.\n");
    for (name, hash) in &pins.0 {
        text.push_str(&format!("{hash}  {name}\n"));
    }
    let tmp = dir.join(format!(".{PIN_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
    };
    write().map_err(FolderError::io("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(FolderError::io("write", &path))?;
    Ok(path)
}

/// `<data>/plugin-cache`, private to the service user.
pub fn cache_dir(data_dir: &Path) -> Result<PathBuf, FolderError> {
    let dir = data_dir.join("plugin-cache");
    std::fs::create_dir_all(&dir).map_err(FolderError::io("create", &dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(FolderError::io("restrict", &dir))?;
    // A copy interrupted by a crash leaves its temporary file behind; nothing else uses
    // them (finished copies are renamed into place).
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // Old enough that no live copy (of this or another lookout) can own it.
            let stale = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > std::time::Duration::from_secs(120)));
            if name.starts_with('.') && name.ends_with(".tmp") && stale {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(dir)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks `file`, reads it once, checks the pin, and writes the checked bytes to a
/// private copy named after their hash.
pub fn verify_and_copy(file: &Path, cache: &Path, pins: Option<&Pins>) -> Result<Verified, LoadError> {
    let meta = std::fs::symlink_metadata(file).map_err(Refused::Unreadable)?;
    if meta.file_type().is_symlink() {
        return Err(Refused::Symlink.into());
    }
    if !meta.is_file() {
        return Err(Refused::NotAFile.into());
    }
    if let Some(reason) = unsafe_ownership(&meta) {
        return Err(Refused::Ownership(reason).into());
    }
    if meta.len() > MAX_PLUGIN_BYTES {
        return Err(Refused::TooLarge { size: meta.len(), limit: MAX_PLUGIN_BYTES }.into());
    }
    let bytes = std::fs::read(file).map_err(Refused::Unreadable)?;
    let sha256 = sha256_hex(&bytes);
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(pins) = pins {
        match pins.0.get(&name) {
            None => return Err(Refused::NotPinned { pin_file: PIN_FILE }.into()),
            Some(p) if *p != sha256 => {
                return Err(Refused::PinMismatch { actual: sha256, pinned: p.clone() }.into());
            }
            Some(_) => {}
        }
    }
    let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let copy = cache.join(format!("{stem}-{}.so", &sha256[..16]));
    let tmp = cache.join(format!(".{stem}-{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        // No fsync: the copy is written afresh on every load and only this process
        // maps it; after a crash the next load writes it again.
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o500).open(&tmp)?;
        f.write_all(&bytes)?;
        std::fs::rename(&tmp, &copy)
    };
    write().map_err(|source| LoadError::Failed { copy: copy.clone(), source })?;
    Ok(Verified { copy, sha256 })
}
