//! A block's rows frame: the rows cut into pages of about [`PAGE_RAW`] bytes, each page its
//! own zstd frame (compressed with the table's dictionary, see [`super::dictionaries`]),
//! behind a directory that says which rows each page holds and where it lies.
//!
//! Why pages: a detector's look-ups read one or two rows from each of many blocks, and
//! decompressing whole ~96 KiB blocks for them was most of an attack-dense pass
//! (BENCHMARKS.md). A page is a twelfth of a block; with a dictionary trained on the
//! table's rows, 8 KiB pages compress as well as 16 KiB ones did (the 1.1M-row store took
//! 279–290 MiB against 282–283), and a look-up decompresses half as much for its row. A
//! block written before its table has a dictionary is one page.
//!
//! Layout (integers big-endian):
//!
//! ```text
//! raw length u32 | dictionary u32 (0: none) | pages u16
//! per page: first row u16, raw length u32, compressed length u32
//! the pages' zstd frames, one after the other
//! ```
//!
//! Each page's raw bytes are its rows in [`super::blocks::pack_items`]'s layout, so the
//! pages' raw bytes one after the other are the block's rows as they were packed.

use super::blocks::PackedItems;
use super::Result;
use crate::error::StoreContext as _;

/// Rows go into a page until it holds this many bytes (when the table has a dictionary).
#[cfg(not(test))]
pub const PAGE_RAW: usize = 8 << 10;
/// Small in tests, so that a few dozen rows make blocks of several pages.
#[cfg(test)]
pub const PAGE_RAW: usize = 1 << 10;

const HEADER: usize = 4 + 4 + 2;
const ENTRY: usize = 2 + 4 + 4;

/// One page's place in its block and in the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// The block row the page starts with.
    pub first: u16,
    pub raw_len: u32,
    /// Where the page's zstd frame lies in the rows frame.
    pub at: usize,
    pub len: usize,
}

/// A rows frame's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directory {
    pub raw_len: usize,
    pub dictionary: u32,
    pub pages: Vec<Page>,
}

impl Directory {
    /// The directory at the start of `frame`, checked against the frame's length.
    pub fn parse(frame: &[u8]) -> Result<Directory> {
        let cut = || corrupt!("the rows frame is cut short or corrupt");
        let header = frame.get(..HEADER).ok_or_else(cut)?;
        let raw_len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let dictionary = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let count = u16::from_be_bytes([header[8], header[9]]) as usize;
        let entries = frame.get(HEADER..HEADER + count * ENTRY).ok_or_else(cut)?;
        let mut at = HEADER + count * ENTRY;
        let mut pages = Vec::with_capacity(count);
        let mut raw_total = 0usize;
        for e in entries.chunks_exact(ENTRY) {
            let first = u16::from_be_bytes([e[0], e[1]]);
            let raw = u32::from_be_bytes([e[2], e[3], e[4], e[5]]);
            let len = u32::from_be_bytes([e[6], e[7], e[8], e[9]]) as usize;
            if pages.last().is_some_and(|p: &Page| p.first >= first) {
                return Err(corrupt!("the rows frame's pages are out of order"));
            }
            pages.push(Page { first, raw_len: raw, at, len });
            at = at.checked_add(len).filter(|end| *end <= frame.len()).ok_or_else(cut)?;
            raw_total += raw as usize;
        }
        if raw_total != raw_len || pages.first().is_some_and(|p| p.first != 0) {
            return Err(corrupt!("the rows frame's directory does not add up"));
        }
        Ok(Directory { raw_len, dictionary, pages })
    }

    /// The index of the page holding block row `row`.
    pub fn page_of(&self, row: u16) -> Result<usize> {
        let after = self.pages.partition_point(|p| p.first <= row);
        after.checked_sub(1).ok_or_else(|| corrupt!("no page holds row {row}"))
    }
}

/// A block's rows ([`super::blocks::pack_items`]'s layout, with where each lies) as a
/// rows frame: cut into pages of about `page_raw` bytes at row boundaries, each
/// compressed by `compress` (with `dictionary`, which only goes into the directory here).
pub fn compress(
    rows: &PackedItems,
    dictionary: u32,
    page_raw: usize,
    mut compress: impl FnMut(&[u8]) -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    let (raw, spans) = (rows.raw(), rows.spans());
    // (first row, start, end) of each page in `raw`.
    let mut cuts: Vec<(u16, usize, usize)> = Vec::new();
    for (row, &(start, end)) in spans.iter().enumerate() {
        let item_start = start as usize - 4;
        match cuts.last_mut() {
            Some(last) if last.2 - last.1 < page_raw => last.2 = end as usize,
            _ => {
                let row =
                    u16::try_from(row).map_err(|_| super::StoreError::Invalid("a block of too many rows".into()))?;
                cuts.push((row, item_start, end as usize));
            }
        }
    }
    let count =
        u16::try_from(cuts.len()).map_err(|_| super::StoreError::Invalid("a block of too many pages".into()))?;
    let raw_len = u32::try_from(raw.len()).map_err(|_| super::StoreError::Invalid("a block too large".into()))?;
    let mut out = Vec::with_capacity(HEADER + cuts.len() * ENTRY + raw.len() / 6);
    out.extend_from_slice(&raw_len.to_be_bytes());
    out.extend_from_slice(&dictionary.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    let mut frames = Vec::with_capacity(cuts.len());
    for &(first, start, end) in &cuts {
        let frame = compress(&raw[start..end])?;
        out.extend_from_slice(&first.to_be_bytes());
        out.extend_from_slice(&((end - start) as u32).to_be_bytes());
        out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        frames.push(frame);
    }
    for frame in frames {
        out.extend_from_slice(&frame);
    }
    Ok(out)
}

/// Decompresses page `page` of `frame` into `out` (replacing what it held) with
/// `decompress(page frame, into)`, which must fill `into` exactly.
pub fn page_into(
    frame: &[u8],
    dir: &Directory,
    page: usize,
    out: &mut Vec<u8>,
    decompress: impl FnOnce(&[u8], &mut [u8]) -> Result<usize>,
) -> Result<()> {
    let p = dir.pages.get(page).ok_or_else(|| corrupt!("the rows frame has no page {page}"))?;
    out.clear();
    out.resize(p.raw_len as usize, 0);
    checked(frame, p, out, decompress)
}

/// Every page of `frame` into `out` (replacing what it held): the block's rows as packed.
pub fn all_into(
    frame: &[u8],
    dir: &Directory,
    out: &mut Vec<u8>,
    mut decompress: impl FnMut(&[u8], &mut [u8]) -> Result<usize>,
) -> Result<()> {
    out.clear();
    out.resize(dir.raw_len, 0);
    let mut at = 0;
    for p in &dir.pages {
        checked(frame, p, &mut out[at..at + p.raw_len as usize], &mut decompress)?;
        at += p.raw_len as usize;
    }
    Ok(())
}

/// Page `p` of `frame` decompressed into `into`, which it must fill exactly.
fn checked(
    frame: &[u8],
    p: &Page,
    into: &mut [u8],
    decompress: impl FnOnce(&[u8], &mut [u8]) -> Result<usize>,
) -> Result<()> {
    let n = decompress(&frame[p.at..p.at + p.len], into).context("a page of the block is corrupt")?;
    if n != p.raw_len as usize {
        return Err(corrupt!("a page holds {n} bytes, not the {} its directory says: corrupt", p.raw_len));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::blocks::{pack_items, unpack_items};
    use super::*;

    fn packed(raw: &[u8]) -> PackedItems {
        PackedItems::new(raw.to_vec()).unwrap()
    }

    fn stored(raw: &[u8]) -> Result<Vec<u8>> {
        Ok(raw.iter().rev().copied().collect())
    }

    fn unstored(frame: &[u8], into: &mut [u8]) -> Result<usize> {
        let n = frame.len().min(into.len());
        for (o, b) in into.iter_mut().zip(frame.iter().rev()) {
            *o = *b;
        }
        Ok(n)
    }

    /// Pages cut at row boundaries once they reach the page size; each page reads back as
    /// its rows, and all pages as the block.
    #[test]
    fn pages_hold_whole_rows_and_read_back_alone_or_together() {
        let items: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 100 + i as usize * 10]).collect();
        let raw = pack_items(&items);
        let frame = compress(&packed(&raw), 7, 1000, stored).unwrap();
        let dir = Directory::parse(&frame).unwrap();
        assert_eq!(dir.dictionary, 7);
        assert!(dir.pages.len() > 5, "{} pages", dir.pages.len());
        let mut all = Vec::new();
        all_into(&frame, &dir, &mut all, unstored).unwrap();
        assert_eq!(all, raw);
        for row in [0u16, 1, 17, 39] {
            let p = dir.page_of(row).unwrap();
            let mut page = Vec::new();
            page_into(&frame, &dir, p, &mut page, unstored).unwrap();
            let rows = unpack_items(&page).unwrap();
            assert_eq!(rows[(row - dir.pages[p].first) as usize], &items[row as usize][..]);
        }
        // A big page size: one page.
        let one = compress(&packed(&raw), 0, usize::MAX, stored).unwrap();
        assert_eq!(Directory::parse(&one).unwrap().pages.len(), 1);
    }

    #[test]
    fn a_cut_or_inconsistent_directory_is_refused() {
        let raw = pack_items(&[vec![1u8; 50], vec![2u8; 50]]);
        let frame = compress(&packed(&raw), 0, 10, stored).unwrap();
        assert!(Directory::parse(&frame[..frame.len() - 1]).is_err(), "last page cut");
        assert!(Directory::parse(&frame[..5]).is_err(), "header cut");
        let mut wrong = frame.clone();
        wrong[3] ^= 1;
        assert!(Directory::parse(&wrong).is_err(), "raw length does not add up");
        let empty = compress(&packed(&[]), 0, 10, stored).unwrap();
        let dir = Directory::parse(&empty).unwrap();
        assert!(dir.pages.is_empty() && dir.page_of(0).is_err());
    }
}
