//! Opening an input file: gzip is recognised by its magic bytes, not its name, and the
//! first non-blank byte tells a JSON array export from line-delimited JSON.

use anyhow::{Context, Result};
use flate2::read::MultiGzDecoder;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
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

/// Counts raw bytes read from the file (for progress on compressed input too).
pub struct CountingFile {
    file: File,
    count: Arc<AtomicU64>,
}

impl Read for CountingFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

const READ_BUF: usize = 256 << 10;

pub fn is_gzip(file: &mut File) -> std::io::Result<bool> {
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(n == 2 && magic == [0x1f, 0x8b])
}

/// Opens `path` and positions the reader at `skip` bytes of (decompressed) input;
/// `count` accumulates the raw bytes read.
pub fn open(path: &Path, skip: u64, count: Arc<AtomicU64>) -> Result<Opened> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let compressed = is_gzip(&mut file).with_context(|| format!("cannot read {}", path.display()))?;
    let file = CountingFile { file, count: count.clone() };
    let mut reader: Box<dyn BufRead + Send> = if compressed {
        Box::new(BufReader::with_capacity(READ_BUF, MultiGzDecoder::new(file)))
    } else {
        Box::new(BufReader::with_capacity(READ_BUF, file))
    };
    let layout = sniff_layout(&mut reader).with_context(|| format!("cannot read {}", path.display()))?;
    let mut bom = 0;
    if skip == 0 && reader.fill_buf()?.starts_with(b"\xEF\xBB\xBF") {
        reader.consume(3);
        bom = 3;
    }
    if skip > 0 {
        if compressed {
            let skipped = std::io::copy(&mut (&mut reader).take(skip), &mut std::io::sink())
                .with_context(|| format!("cannot decompress {}", path.display()))?;
            if skipped < skip {
                anyhow::bail!(
                    "{}: decompressed input is {skipped} bytes, shorter than the committed offset {skip}",
                    path.display()
                );
            }
        } else {
            // Re-open to seek: the sniffing read consumed buffered bytes.
            let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            file.seek(SeekFrom::Start(skip)).with_context(|| format!("cannot seek {}", path.display()))?;
            count.store(skip, Ordering::Relaxed);
            reader = Box::new(BufReader::with_capacity(READ_BUF, CountingFile { file, count }));
        }
    }
    Ok(Opened { reader, compressed, layout, bom })
}

fn sniff_layout(reader: &mut Box<dyn BufRead + Send>) -> std::io::Result<Layout> {
    let buf = reader.fill_buf()?;
    let buf = buf.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(buf);
    Ok(match buf.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => Layout::Array,
        _ => Layout::Lines,
    })
}
