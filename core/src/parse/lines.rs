//! Splitting input into lines with a length limit: an over-long line is skipped (and
//! reported) without ever being held in memory whole.

use std::io::{self, BufRead};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineEnd {
    /// Ended by `\n` (a trailing `\r` is stripped).
    Newline,
    /// The input ended without a newline.
    Eof,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineInfo {
    /// Offset of the line's first byte.
    pub start: u64,
    /// Offset just past the line (and its newline).
    pub end: u64,
    pub ending: LineEnd,
    /// The line was longer than the limit; the buffer is empty and `len` says how long.
    pub too_long: Option<u64>,
}

/// Bytes remembered from just before the current offset.
pub const TAIL_LEN: usize = 256;

pub struct LineReader<R> {
    inner: R,
    max: usize,
    offset: u64,
    /// The last (up to) [`TAIL_LEN`] bytes consumed: with the offset they identify where
    /// in which content the reader stands.
    tail: Vec<u8>,
}

impl<R: BufRead> LineReader<R> {
    pub fn new(inner: R, max: usize, offset: u64) -> Self {
        LineReader { inner, max, offset, tail: Vec::with_capacity(TAIL_LEN) }
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The bytes consumed just before [`Self::offset`] (fewer than [`TAIL_LEN`] only if
    /// fewer were consumed since the reader started).
    pub fn tail(&self) -> &[u8] {
        &self.tail
    }

    /// Reads the next line into `buf`; `None` at end of input.
    pub fn next_line(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<LineInfo>> {
        buf.clear();
        let start = self.offset;
        let mut too_long: Option<u64> = None;
        loop {
            let avail = match self.inner.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                if self.offset == start {
                    return Ok(None);
                }
                strip_cr(buf);
                return Ok(Some(LineInfo { start, end: self.offset, ending: LineEnd::Eof, too_long }));
            }
            let (chunk_len, found) = match memchr::memchr(b'\n', avail) {
                Some(i) => (i, true),
                None => (avail.len(), false),
            };
            match too_long.as_mut() {
                Some(n) => *n += chunk_len as u64,
                None if buf.len() + chunk_len > self.max => {
                    too_long = Some((buf.len() + chunk_len) as u64);
                    buf.clear();
                }
                None => buf.extend_from_slice(&avail[..chunk_len]),
            }
            let consumed = chunk_len + usize::from(found);
            remember(&mut self.tail, &avail[..consumed]);
            self.inner.consume(consumed);
            self.offset += consumed as u64;
            if found {
                strip_cr(buf);
                return Ok(Some(LineInfo { start, end: self.offset, ending: LineEnd::Newline, too_long }));
            }
        }
    }
}

/// Keeps the last [`TAIL_LEN`] bytes of everything consumed.
fn remember(tail: &mut Vec<u8>, consumed: &[u8]) {
    if consumed.len() >= TAIL_LEN {
        tail.clear();
        tail.extend_from_slice(&consumed[consumed.len() - TAIL_LEN..]);
    } else {
        let keep = TAIL_LEN - consumed.len();
        if tail.len() > keep {
            tail.drain(..tail.len() - keep);
        }
        tail.extend_from_slice(consumed);
    }
}

fn strip_cr(buf: &mut Vec<u8>) {
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_strips_cr_and_limits() {
        let data = b"a\r\nbb\n0123456789\nlast";
        let mut r = LineReader::new(&data[..], 5, 0);
        let mut buf = Vec::new();
        let l = r.next_line(&mut buf).unwrap().unwrap();
        assert_eq!((buf.as_slice(), l.start, l.end), (&b"a"[..], 0, 3));
        r.next_line(&mut buf).unwrap().unwrap();
        assert_eq!(buf, b"bb");
        let l = r.next_line(&mut buf).unwrap().unwrap();
        assert_eq!((buf.is_empty(), l.too_long), (true, Some(10)));
        let l = r.next_line(&mut buf).unwrap().unwrap();
        assert_eq!((buf.as_slice(), l.ending), (&b"last"[..], LineEnd::Eof));
        assert!(r.next_line(&mut buf).unwrap().is_none());
        assert_eq!(r.offset(), data.len() as u64);
        assert_eq!(r.tail(), &data[..], "short input: the tail is all of it");
    }

    #[test]
    fn tail_is_the_bytes_before_the_offset() {
        let data: Vec<u8> = (0..2000u32).map(|i| if i % 97 == 96 { b'\n' } else { b'a' + (i % 26) as u8 }).collect();
        let mut r = LineReader::new(std::io::BufReader::with_capacity(64, &data[..]), 1 << 20, 0);
        let mut buf = Vec::new();
        while let Some(info) = r.next_line(&mut buf).unwrap() {
            let end = info.end as usize;
            assert_eq!(r.tail(), &data[end.saturating_sub(TAIL_LEN)..end]);
        }
    }
}
