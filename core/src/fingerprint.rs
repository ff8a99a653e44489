//! File identity: (device, inode) plus a hash of the first bytes of the file's content
//! (decompressed for gzip), so a renamed file keeps its identity, a reused inode is not
//! mistaken for the old file, and a rotated copy or its gzip is recognised as the file it
//! was copied from.

use crate::parse::open::{content_reader, is_gzip};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;

/// Bytes of content hashed for identity.
pub const HEAD_LEN: u64 = 1024;
/// A head shorter than this is too weak to say two files are the same.
pub const MIN_MATCH_LEN: u64 = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub dev: u64,
    pub ino: u64,
    /// Raw size on disk.
    pub size: u64,
    pub compressed: bool,
    pub head_len: u64,
    pub head: Vec<u8>,
}

impl Fingerprint {
    /// The store key of the file's offset state.
    pub fn source_id(&self) -> Vec<u8> {
        let mut id = self.dev.to_be_bytes().to_vec();
        id.extend_from_slice(&self.ino.to_be_bytes());
        id
    }
}

/// SHA-256 of the first `len` bytes of content, or `None` if the content is shorter
/// (or, for gzip still being written, cannot be decompressed that far yet).
pub fn head_hash(file: &File, len: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(len as usize);
    let mut r = content_reader(file)?.take(len);
    match r.read_to_end(&mut buf) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e),
    }
    Ok((buf.len() as u64 == len).then(|| Sha256::digest(&buf).to_vec()))
}

pub fn fingerprint(file: &File) -> std::io::Result<Fingerprint> {
    let meta = file.metadata()?;
    let compressed = is_gzip(file)?;
    let mut buf = Vec::with_capacity(HEAD_LEN as usize);
    match content_reader(file)?.take(HEAD_LEN).read_to_end(&mut buf) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e),
    }
    Ok(Fingerprint {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.len(),
        compressed,
        head_len: buf.len() as u64,
        head: Sha256::digest(&buf).to_vec(),
    })
}

/// SHA-256 of `len` bytes of content starting at `start`, or `None` if the content is
/// shorter.
pub fn range_hash(file: &File, start: u64, len: u64) -> std::io::Result<Option<Vec<u8>>> {
    if !is_gzip(file)? {
        // Plain files: read just those bytes (this runs on every look at every file).
        let mut buf = vec![0u8; len as usize];
        let mut got = 0;
        while got < buf.len() {
            let n = std::os::unix::fs::FileExt::read_at(file, &mut buf[got..], start + got as u64)?;
            if n == 0 {
                return Ok(None);
            }
            got += n;
        }
        return Ok(Some(Sha256::digest(&buf).to_vec()));
    }
    let mut r = content_reader(file)?;
    let skipped = match std::io::copy(&mut (&mut r).take(start), &mut std::io::sink()) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    if skipped < start {
        return Ok(None);
    }
    let mut buf = Vec::with_capacity(len as usize);
    match r.take(len).read_to_end(&mut buf) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e),
    }
    Ok((buf.len() as u64 == len).then(|| Sha256::digest(&buf).to_vec()))
}

/// Whether the file's content holds, just before `state.offset`, the bytes the state
/// remembers (always true when it remembers none).
pub fn tail_matches(file: &File, state: &crate::store::SourceState) -> std::io::Result<bool> {
    if state.tail_len == 0 || state.offset < state.tail_len {
        return Ok(state.tail_len == 0);
    }
    Ok(range_hash(file, state.offset - state.tail_len, state.tail_len)?.as_deref() == Some(state.tail.as_slice()))
}
