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
use std::sync::{Arc, Mutex, OnceLock};

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

/// `<data>/plugin-cache`, private to the service user. The copies loaded are written and
/// loaded there by path, so neither it nor the data directory may be a place another
/// user can change: a data directory writable by others (or not its owner's) could have
/// the folder swapped for a link to theirs between the copy and the load, which would
/// load their library instead of the checked one.
pub fn cache_dir(data_dir: &Path) -> Result<PathBuf, FolderError> {
    let dir = data_dir.join("plugin-cache");
    std::fs::create_dir_all(&dir).map_err(FolderError::io("create", &dir))?;
    let data_meta = std::fs::metadata(data_dir).map_err(FolderError::io("read data directory", data_dir))?;
    if let Some(reason) = unsafe_ownership(&data_meta) {
        return Err(FolderError::Unsafe { what: "data directory", path: data_dir.to_path_buf(), reason });
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(FolderError::io("read", &dir))?;
    if !meta.is_dir() {
        // A symbolic link (or anything else) where the private folder should be.
        return Err(FolderError::NotPrivate(dir));
    }
    if meta.uid() != service_uid() {
        let reason = UnsafeOwnership::Owner { uid: meta.uid(), service: service_uid() };
        return Err(FolderError::Unsafe { what: "plugin copies folder", path: dir, reason });
    }
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

/// What a file's metadata says of its contents: equal stamps, equal bytes. Any write
/// moves the change time, which no unprivileged process can set back.
#[derive(Clone, Copy, PartialEq, Eq)]
struct ContentStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl ContentStamp {
    fn of(meta: &std::fs::Metadata) -> ContentStamp {
        ContentStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The bytes last read from each library file, with their SHA-256, by the stamp they were
/// read under. A Kafka node loads every library once per partition it takes over, and
/// reading and hashing the same files again for each was a third of a take-over. The
/// bytes handed out are always the bytes that were hashed (the copy is written from
/// them); a file changed since reads afresh. One entry per file in the plugins folder.
type ReadMemo = std::collections::HashMap<PathBuf, (ContentStamp, Arc<[u8]>, String)>;

fn read_memo() -> &'static Mutex<ReadMemo> {
    static MEMO: OnceLock<Mutex<ReadMemo>> = OnceLock::new();
    MEMO.get_or_init(Default::default)
}

/// `file`'s bytes and their SHA-256 (lowercase hex), read once per stamp.
fn read_and_hash(file: &Path, meta: &std::fs::Metadata) -> Result<(Arc<[u8]>, String), LoadError> {
    let stamp = ContentStamp::of(meta);
    if let Some((seen, bytes, sha256)) = read_memo().lock().unwrap_or_else(|p| p.into_inner()).get(file) {
        if *seen == stamp {
            return Ok((bytes.clone(), sha256.clone()));
        }
    }
    // Read through a descriptor of the very file that was checked: opened without
    // following a link, and still the same file (a swap between the check and the read
    // would hand over bytes that were never checked).
    let flags = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(file).map_err(Refused::Unreadable)?;
    let opened = f.metadata().map_err(Refused::Unreadable)?;
    if ContentStamp::of(&opened) != stamp || opened.uid() != meta.uid() || opened.mode() != meta.mode() {
        return Err(Refused::ChangedWhileChecked.into());
    }
    let mut read = Vec::with_capacity(opened.len() as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(&mut f, MAX_PLUGIN_BYTES + 1), &mut read)
        .map_err(Refused::Unreadable)?;
    // Written to while it was read (a copy into the folder under way): not these bytes.
    if ContentStamp::of(&f.metadata().map_err(Refused::Unreadable)?) != stamp {
        return Err(Refused::ChangedWhileChecked.into());
    }
    let bytes: Arc<[u8]> = read.into();
    let sha256 = sha256_hex(&bytes);
    // Read after `meta` was taken: a write in between moved the stamp, so this entry is
    // never matched by the file's new stamp and the next load reads it again.
    read_memo()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(file.to_path_buf(), (stamp, bytes.clone(), sha256.clone()));
    Ok((bytes, sha256))
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
    let (bytes, sha256) = read_and_hash(file, &meta)?;
    // A library cut short (caught while `install` or `cp` writes it in place): mapping it
    // would fault in the loader, past its end, and take the whole process down.
    if let Some(needed) = elf_length(&bytes).filter(|n| *n > bytes.len() as u64) {
        return Err(Refused::Incomplete { size: bytes.len() as u64, needed }.into());
    }
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
        // A new file of this process's, never one found there (a link, say).
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let flags = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o500).custom_flags(flags).open(&tmp)?;
        f.write_all(&bytes)?;
        std::fs::rename(&tmp, &copy)
    };
    write().map_err(|source| LoadError::Failed { copy: copy.clone(), source })?;
    Ok(Verified { copy, sha256 })
}

/// How long a 64-bit little-endian ELF file must be for everything its headers point at
/// (its program headers, the segments it loads, its section headers) to be in it; `None`
/// for anything else, which the loader refuses on its own. A length that overflows is
/// `u64::MAX`.
fn elf_length(b: &[u8]) -> Option<u64> {
    const PT_LOAD: u32 = 1;
    if b.get(..4)? != b"\x7fELF" || b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return None;
    }
    let u16_at = |at: u64| -> Option<u64> {
        let at = usize::try_from(at).ok()?;
        Some(u64::from(u16::from_le_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?)))
    };
    let u32_at = |at: u64| -> Option<u32> {
        let at = usize::try_from(at).ok()?;
        Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
    };
    let u64_at = |at: u64| -> Option<u64> {
        let at = usize::try_from(at).ok()?;
        Some(u64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
    };
    // The 64-byte file header itself.
    let (Some(ph_off), Some(sh_off), Some(ph_size), Some(ph_num), Some(sh_size), Some(sh_num)) =
        (u64_at(32), u64_at(40), u16_at(54), u16_at(56), u16_at(58), u16_at(60))
    else {
        return Some(64);
    };
    let table_end = |off: u64, size: u64, num: u64| off.checked_add(size.checked_mul(num)?);
    let mut needed = table_end(ph_off, ph_size, ph_num).unwrap_or(u64::MAX).max(64);
    if sh_off != 0 {
        needed = needed.max(table_end(sh_off, sh_size, sh_num).unwrap_or(u64::MAX));
    }
    for i in 0..ph_num {
        let Some(at) = table_end(ph_off, ph_size, i) else { return Some(u64::MAX) };
        // A program header past the end: the table's own length above says so.
        let (Some(kind), Some(offset), Some(size)) = (u32_at(at), u64_at(at + 8), u64_at(at + 32)) else { break };
        if kind == PT_LOAD {
            needed = needed.max(offset.saturating_add(size));
        }
    }
    Some(needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit little-endian ELF header with one program header, a segment loaded from
    /// `[seg_off, seg_off + seg_len)`, and `sh_num` section headers at `sh_off`.
    fn elf(seg_off: u64, seg_len: u64, sh_off: u64, sh_num: u16) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[40..48].copy_from_slice(&sh_off.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        b[58..60].copy_from_slice(&64u16.to_le_bytes());
        b[60..62].copy_from_slice(&sh_num.to_le_bytes());
        b[64..68].copy_from_slice(&1u32.to_le_bytes());
        b[72..80].copy_from_slice(&seg_off.to_le_bytes());
        b[96..104].copy_from_slice(&seg_len.to_le_bytes());
        b
    }

    #[test]
    fn an_elf_file_s_length_is_where_its_headers_point() {
        assert_eq!(elf_length(&elf(0, 300, 0, 0)), Some(300), "the loaded segment");
        assert_eq!(elf_length(&elf(0, 100, 400, 3)), Some(400 + 3 * 64), "the section headers, at the end");
        assert_eq!(elf_length(&elf(0, 50, 0, 0)), Some(120), "the program headers");
        assert_eq!(elf_length(&elf(u64::MAX, 2, 0, 0)), Some(u64::MAX), "an overflow");
        assert_eq!(elf_length(&elf(0, 300, 0, 0)[..40]), Some(64), "cut inside the file header");
        assert_eq!(elf_length(b"not an ELF file at all"), None);
    }

    /// A real library cut short, as one caught while it is copied in, is refused rather
    /// than mapped (a mapping past the file's end faults in the loader).
    #[test]
    fn a_library_cut_short_is_refused_as_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let whole = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(elf_length(&whole).is_some_and(|n| n <= whole.len() as u64), "this test binary is complete");
        let lib = dir.path().join("liblookout_cut.so");
        write(&lib, &whole[..whole.len() / 2]);
        let cache = dir.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        match verify_and_copy(&lib, &cache, None) {
            Err(LoadError::Refused(Refused::Incomplete { size, needed })) => {
                assert!(size == (whole.len() / 2) as u64 && needed > size, "{size} {needed}")
            }
            other => panic!("not refused as incomplete: {:?}", other.map(|v| v.copy)),
        }
    }

    fn write(path: &Path, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    /// A library's bytes are read once for every load of the same file, and afresh once
    /// it changes: in place (same length) or replaced by a rename.
    #[test]
    fn a_changed_library_is_read_again_and_its_copy_is_its_new_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = dir.path().join("libx.so");
        write(&file, b"first version");
        let first = verify_and_copy(&file, cache.path(), None).unwrap();
        assert_eq!(first.sha256, sha256_hex(b"first version"));
        let again = verify_and_copy(&file, cache.path(), None).unwrap();
        assert_eq!(again.sha256, first.sha256);
        assert_eq!(std::fs::read(&again.copy).unwrap(), b"first version");

        // File times tick with the kernel's coarse clock (a few ms): a write within the
        // same tick and of the same length is seen by no stamp, here or in the daemon's
        // folder scan.
        std::thread::sleep(std::time::Duration::from_millis(50));
        write(&file, b"other version");
        let changed = verify_and_copy(&file, cache.path(), None).unwrap();
        assert_eq!(changed.sha256, sha256_hex(b"other version"));
        assert_eq!(std::fs::read(&changed.copy).unwrap(), b"other version");

        let replacement = dir.path().join(".libx.so.new");
        write(&replacement, b"third version");
        std::fs::rename(&replacement, &file).unwrap();
        let replaced = verify_and_copy(&file, cache.path(), None).unwrap();
        assert_eq!(replaced.sha256, sha256_hex(b"third version"));
        assert_eq!(std::fs::read(&replaced.copy).unwrap(), b"third version");

        // The pin is checked against the bytes loaded, read from the memo or not.
        let pins = Pins([("libx.so".to_string(), sha256_hex(b"first version"))].into_iter().collect());
        assert!(matches!(
            verify_and_copy(&file, cache.path(), Some(&pins)),
            Err(LoadError::Refused(Refused::PinMismatch { .. }))
        ));
    }

    /// The private copies' folder is refused if it is a link (another user's folder in
    /// its place), and so is a data directory others can write to (where that swap could
    /// be made between the copy and the load).
    #[test]
    fn the_private_copies_folder_is_refused_unless_private() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        assert_eq!(cache_dir(&data).unwrap(), data.join("plugin-cache"));
        let meta = std::fs::symlink_metadata(data.join("plugin-cache")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);

        std::fs::remove_dir(data.join("plugin-cache")).unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, data.join("plugin-cache")).unwrap();
        let err = cache_dir(&data).unwrap_err();
        assert!(matches!(err, FolderError::NotPrivate(_)), "{err}");

        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = cache_dir(&open).unwrap_err();
        assert!(err.to_string().contains("data directory") && err.to_string().contains("writable"), "{err}");
    }
}
