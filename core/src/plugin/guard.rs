//! What may be loaded. Loading a library runs its code — the very attack the first
//! detector hunts — so a library is loaded only if its folder and file are not writable
//! by group or others, are owned by root or the user Lookout runs as, and (when a pin
//! file exists) its SHA-256 is pinned. The bytes that were checked are written to a
//! private copy, and that copy is what gets loaded, so the file cannot change between
//! the check and the load.

use anyhow::{anyhow, Context, Result};
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

#[derive(Debug, Clone)]
pub struct Refusal {
    pub path: PathBuf,
    pub reason: String,
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
fn unsafe_ownership(meta: &std::fs::Metadata, what: &str) -> Option<String> {
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Some(format!("{what} is writable by group or others (mode {:o}); run chmod go-w on it", mode & 0o7777));
    }
    let uid = meta.uid();
    if uid != 0 && uid != service_uid() {
        return Some(format!(
            "{what} is owned by uid {uid}, not root or the user Lookout runs as (uid {}); chown it",
            service_uid()
        ));
    }
    None
}

pub fn check_dir(dir: &Path) -> Result<()> {
    let meta = std::fs::metadata(dir).with_context(|| format!("cannot read plugins folder {}", dir.display()))?;
    if !meta.is_dir() {
        return Err(anyhow!("plugins folder {} is not a directory", dir.display()));
    }
    if let Some(reason) = unsafe_ownership(&meta, "the plugins folder") {
        return Err(anyhow!("refusing plugins folder {}: {reason}", dir.display()));
    }
    Ok(())
}

/// The `*.so` files in `dir`, in name order.
pub fn discover(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list plugins folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "so"))
        .collect();
    out.sort();
    Ok(out)
}

pub fn read_pins(dir: &Path) -> Result<Option<Pins>> {
    let path = dir.join(PIN_FILE);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!("cannot read pin file {}: {e}", path.display())),
    };
    if let Some(reason) = unsafe_ownership(&meta, "the pin file") {
        return Err(anyhow!("refusing pin file {}: {reason}", path.display()));
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read pin file {}", path.display()))?;
    let mut pins = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (hash, name) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| anyhow!("{}:{}: expected '<sha256>  <file name>', got '{line}'", path.display(), i + 1))?;
        let name = name.trim().trim_start_matches('*');
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(anyhow!("{}:{}: '{hash}' is not a SHA-256 in hex", path.display(), i + 1));
        }
        pins.insert(name.to_string(), hash.to_ascii_lowercase());
    }
    Ok(Some(Pins(pins)))
}

pub fn write_pins(dir: &Path, pins: &Pins) -> Result<PathBuf> {
    let path = dir.join(PIN_FILE);
    let mut text =
        String::from("# Lookout plugin pins: only these libraries, with exactly these SHA-256s, are loaded.\n");
    for (name, hash) in &pins.0 {
        text.push_str(&format!("{hash}  {name}\n"));
    }
    let tmp = dir.join(format!(".{PIN_FILE}.tmp"));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// `<data>/plugin-cache`, private to the service user.
pub fn cache_dir(data_dir: &Path) -> Result<PathBuf> {
    let dir = data_dir.join("plugin-cache");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))?;
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

/// How a refusal for failing to write the private copy starts: a failure on Lookout's
/// side (a full disk), not of the library, so the file is tried again.
pub const COPY_FAILURE: &str = "cannot write private copy";

/// Whether a refusal reason is a failure to write the private copy (see [`COPY_FAILURE`]).
pub fn is_copy_failure(reason: &str) -> bool {
    reason.starts_with(COPY_FAILURE)
}

/// Checks `file`, reads it once, checks the pin, and writes the checked bytes to a
/// private copy named after their hash.
pub fn verify_and_copy(file: &Path, cache: &Path, pins: Option<&Pins>) -> Result<Verified, String> {
    let meta = std::fs::symlink_metadata(file).map_err(|e| format!("cannot read: {e}"))?;
    if meta.file_type().is_symlink() {
        return Err("is a symbolic link; copy the library itself into the plugins folder".into());
    }
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if let Some(reason) = unsafe_ownership(&meta, "the file") {
        return Err(reason);
    }
    if meta.len() > MAX_PLUGIN_BYTES {
        return Err(format!("is {} bytes, over the {MAX_PLUGIN_BYTES} byte limit", meta.len()));
    }
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read: {e}"))?;
    let sha256 = sha256_hex(&bytes);
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(pins) = pins {
        match pins.0.get(&name) {
            None => return Err(format!("is not in the pin file {PIN_FILE}; run `lookout plugins pin` to trust it")),
            Some(p) if *p != sha256 => {
                return Err(format!(
                    "SHA-256 {sha256} does not match the pinned {p}: the file changed since it was pinned"
                ))
            }
            Some(_) => {}
        }
    }
    let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let copy = cache.join(format!("{stem}-{}.so", &sha256[..16]));
    let tmp = cache.join(format!(".{stem}-{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o500).open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &copy)
    };
    write().map_err(|e| format!("{COPY_FAILURE} {}: {e}", copy.display()))?;
    Ok(Verified { copy, sha256 })
}
