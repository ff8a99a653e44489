//! Opening an input file: gzip is recognised by its magic bytes, not its name, and the
//! first non-blank byte tells a JSON array export from line-delimited JSON.

use flate2::read::MultiGzDecoder;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One JSON document per line (rows, envelopes or `{"records":[...]}`).
    Lines,
    /// A pretty-printed `[ {...}, ... ]` export.
    Array,
}

pub struct Opened {
    pub reader: Box<dyn BufRead + Send>,
    pub compressed: bool,
    pub layout: Layout,
    /// Bytes of a UTF-8 byte-order mark skipped at the start (0 or 3).
    pub bom: u64,
}

/// Reads a file from its own position with `pread`, never moving the descriptor's
/// shared offset: the tailer reads one open file through several readers (identity
/// checks while a batch is being read), and duplicated descriptors share one offset.
/// Counts the raw bytes read (for progress on compressed input too).
pub struct FileAt {
    file: File,
    pos: u64,
    count: Option<Arc<AtomicU64>>,
}

impl FileAt {
    pub fn new(file: &File, pos: u64) -> std::io::Result<FileAt> {
        Ok(FileAt { file: file.try_clone()?, pos, count: None })
    }

    fn counting(mut self, count: Arc<AtomicU64>) -> FileAt {
        self.count = Some(count);
        self
    }
}

impl Read for FileAt {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        if let Some(c) = &self.count {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

const READ_BUF: usize = 256 << 10;
const BOM: &[u8] = b"\xEF\xBB\xBF";

pub fn is_gzip(file: &File) -> std::io::Result<bool> {
    let mut magic = [0u8; 2];
    let n = file.read_at(&mut magic, 0)?;
    Ok(n == 2 && magic == [0x1f, 0x8b])
}

/// A reader of the file's (decompressed) content from its first byte, independent of the
/// file's current position.
pub fn content_reader(file: &File) -> std::io::Result<Box<dyn Read + Send>> {
    let f = FileAt::new(file, 0)?;
    Ok(if is_gzip(file)? { Box::new(MultiGzDecoder::new(f)) } else { Box::new(f) })
}

/// Why a file could not be opened for reading.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot {action} {}", path.display())]
    Io {
        /// `open`, `read` or `decompress`.
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: decompressed input is {len} bytes, shorter than the committed offset {offset}", path.display())]
    ShorterThanOffset { path: std::path::PathBuf, len: u64, offset: u64 },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OpenError {
    let path = path.to_path_buf();
    move |source| OpenError::Io { action, path, source }
}

/// Opens `path` and positions the reader at `skip` bytes of (decompressed) input;
/// `count` accumulates the raw bytes read.
pub fn open(path: &Path, skip: u64, count: Arc<AtomicU64>) -> Result<Opened, OpenError> {
    let file = File::open(path).map_err(io("open", path))?;
    open_file(&file, path, skip, count)
}

/// Like [`open`], for a file already open (the tailer keeps rotated files open).
pub fn open_file(file: &File, path: &Path, skip: u64, count: Arc<AtomicU64>) -> Result<Opened, OpenError> {
    let compressed = is_gzip(file).map_err(io("read", path))?;
    if compressed {
        let f = FileAt::new(file, 0).map_err(io("read", path))?.counting(count);
        let mut reader: Box<dyn BufRead + Send> = Box::new(BufReader::with_capacity(READ_BUF, MultiGzDecoder::new(f)));
        let head = reader.fill_buf().map_err(io("decompress", path))?;
        let layout = sniff_layout(head);
        let bom = if head.starts_with(BOM) { 3 } else { 0 };
        let skip = if skip == 0 { bom } else { skip };
        let skipped =
            std::io::copy(&mut (&mut reader).take(skip), &mut std::io::sink()).map_err(io("decompress", path))?;
        if skipped < skip {
            return Err(OpenError::ShorterThanOffset { path: path.to_path_buf(), len: skipped, offset: skip });
        }
        Ok(Opened { reader, compressed, layout, bom })
    } else {
        let mut head = vec![0u8; 4096];
        let n = file.read_at(&mut head, 0).map_err(io("read", path))?;
        head.truncate(n);
        let layout = sniff_layout(&head);
        let bom = if head.starts_with(BOM) { 3 } else { 0 };
        let skip = if skip == 0 { bom } else { skip };
        count.store(skip, Ordering::Relaxed);
        let f = FileAt::new(file, skip).map_err(io("read", path))?.counting(count);
        let reader = Box::new(BufReader::with_capacity(READ_BUF, f));
        Ok(Opened { reader, compressed, layout, bom })
    }
}

fn sniff_layout(head: &[u8]) -> Layout {
    let head = head.strip_prefix(BOM).unwrap_or(head);
    match head.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
        Some(b'[') => Layout::Array,
        _ => Layout::Lines,
    }
}
