//! Reading and parsing a line file on its own thread, ahead of the thread that stores.
//!
//! Why: parsing and normalising JSON costs a fifth of ingestion and storing the rest, and
//! both used to run one after the other on one core. Here a parser thread reads lines,
//! parses and normalises them and hands over chunks through a small bounded channel; the
//! storing side keeps every decision that touches the store or the file's state (batches,
//! offsets, rejects, the truncation check), so what is committed, and when, is exactly
//! what reading and parsing in line would commit.

use super::direct::normalise_line;
use super::lines::{LineEnd, LineInfo, LineReader};
use super::normalise::{normalise_columns, NormalRow, TableHints};
use super::record::{batch_record_texts, parse_document, unwrap_batch_record, unwrap_document, Document};
use super::{Reject, RejectKind};
use std::io::BufRead;
use std::sync::mpsc::{Receiver, SyncSender};

/// Lines per message: large enough that the channel costs nothing per line.
const CHUNK_LINES: usize = 256;
/// Line bytes per message: a chunk of long lines is sent before it has [`CHUNK_LINES`].
const CHUNK_BYTES: usize = 512 << 10;
/// Chunks in flight: bounds the memory held ahead of the storing side. 10,240 lines, so
/// the parser keeps working while a batch commits (its pages compressed, its files made
/// durable: ~30 ms, ~5,500 lines' parsing) instead of waiting with a full channel. With
/// [`CHUNK_BYTES`] that is at most ~20 MiB of lines (a parsed line is about its own size),
/// or 41 lines of any length however long they are. Against 20 chunks, on the 1M fleet's
/// WinRM tables (2 cores, 7 alternated runs each): the two cores 1.79 busy against 1.70
/// (median CPU / wall), peak RSS ~10 MiB more.
const CHANNEL_CHUNKS: usize = 40;
/// Chunks handed back and not yet taken by the parser, at most (see [`channel`]).
const HANDED_BACK: usize = 4;

/// What one line turned into.
pub enum LineOutcome {
    /// Only whitespace: nothing to store, nothing to reject.
    Blank,
    /// Rows, or rejects of single records of the line (with the line's first bytes).
    Records(Vec<Result<NormalRow, Reject>>, Vec<u8>),
    /// The whole line is rejected (with its first bytes).
    Rejected(Reject, Vec<u8>),
}

/// One line, parsed, with what the storing side needs to advance the file's state.
pub struct ParsedLine {
    pub info: LineInfo,
    pub len: usize,
    pub outcome: LineOutcome,
    /// The bytes just before the end of this line (see `LineReader::tail`).
    pub tail: Vec<u8>,
}

/// Why the parser stopped.
pub enum End {
    /// The file's end: every line was handed over.
    Eof,
    /// A last line without its newline was left for later; `partial` when it holds
    /// something (a one-shot ingest reports it). `rest`: where that line starts and where
    /// the input ended (no newline between them), when the reader got that far.
    Unfinished { partial: bool, rest: Option<(u64, u64)>, too_long: bool },
    /// A read error, with the offset reached.
    Error(std::io::Error, u64),
}

pub enum Message {
    Lines(Vec<ParsedLine>),
    End(End),
}

/// The excerpt kept with a rejected record.
const EXCERPT: usize = 256;

/// JSON's whitespace (RFC 8259: space, tab, line feed, carriage return). Not
/// `u8::is_ascii_whitespace`, which takes a form feed too: a line of form feeds is not
/// blank but malformed, as serde_json reads it.
fn is_json_whitespace(b: &u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Parses one line: everything about a line that does not touch the store.
pub fn parse_line(buf: &[u8], info: &LineInfo, max_line: usize, hints: &TableHints) -> LineOutcome {
    let excerpt = || buf[..buf.len().min(EXCERPT)].to_vec();
    if let Some(len) = info.too_long {
        let reason = format!("line is {len} bytes, over the {max_line} byte limit");
        return LineOutcome::Rejected(Reject::new(RejectKind::LineTooLong, reason), Vec::new());
    }
    if buf.iter().all(is_json_whitespace) {
        return LineOutcome::Blank;
    }
    // The common line first: a flat row with the columns of the row before it, or
    // envelopes whose rows have the columns of recent rows of their tables.
    if let Some(rows) = std::str::from_utf8(buf).ok().and_then(|text| normalise_line(text, hints)) {
        return LineOutcome::Records(rows.into_iter().map(Ok).collect(), Vec::new());
    }
    let doc = match parse_document(buf) {
        Ok(v) => v,
        Err(e) => {
            // A batch one record of which cannot be read: the others are still rows.
            if let Some(records) = std::str::from_utf8(buf).ok().and_then(|t| batch_records_one_by_one(t, hints)) {
                return LineOutcome::Records(records, excerpt());
            }
            // Every string the parser keeps is checked as UTF-8 (and a byte outside one is a
            // syntax error), so a line that is not UTF-8 fails here: only then is the whole
            // line checked, to say so apart (checking every line first was 4% of ingest).
            if let Err(e) = std::str::from_utf8(buf) {
                let reason = format!("invalid UTF-8 at byte {} of the line", e.valid_up_to());
                return LineOutcome::Rejected(Reject::new(RejectKind::InvalidUtf8, reason), excerpt());
            }
            let reason = format!("malformed JSON: {e}");
            return LineOutcome::Rejected(Reject::new(RejectKind::MalformedJson, reason), excerpt());
        }
    };
    let records = records(doc, hints);
    let raw = if records.iter().any(Result::is_err) { excerpt() } else { Vec::new() };
    LineOutcome::Records(records, raw)
}

/// The rows of a `{"records":[…]}` batch read record by record (see
/// [`batch_record_texts`]): a record that cannot be read is rejected alone, as
/// `malformed_json` naming its place. `None` when `text` is not such a batch.
fn batch_records_one_by_one(text: &str, hints: &TableHints) -> Option<Vec<Result<NormalRow, Reject>>> {
    let texts = batch_record_texts(text)?;
    let rows = texts.into_iter().enumerate().map(|(i, record)| match parse_document(record.as_bytes()) {
        Ok(doc) => {
            unwrap_batch_record(i, doc).and_then(|u| normalise_columns(u.row, u.category_table.as_deref(), hints))
        }
        Err(e) => Err(Reject::new(RejectKind::MalformedJson, format!("records[{i}]: malformed JSON: {e}"))),
    });
    Some(rows.collect())
}

/// The rows of one JSON document (an envelope, `{"records": [...]}` or a flat row), each
/// normalised or rejected. Shared by line files and JSON array elements.
pub fn records(doc: Document, hints: &TableHints) -> Vec<Result<NormalRow, Reject>> {
    unwrap_document(doc)
        .into_iter()
        .map(|u| u.and_then(|u| normalise_columns(u.row, u.category_table.as_deref(), hints)))
        .collect()
}

/// The parser's end of the two channels: chunks out, chunks the storing side is done
/// with back.
pub struct ParserEnd {
    out: SyncSender<Message>,
    done: Receiver<Vec<ParsedLine>>,
}

/// The storing side's end.
pub struct StoringEnd {
    rx: Receiver<Message>,
    done: SyncSender<Vec<ParsedLine>>,
}

impl StoringEnd {
    pub fn recv(&self) -> Result<Message, std::sync::mpsc::RecvError> {
        self.rx.recv()
    }

    /// Hands a chunk whose lines are stored back to the parser thread, which frees what it
    /// allocated for them (and reuses the chunk's list). Why: a block mimalloc frees on
    /// another thread than the one that allocated it takes the cross-thread path (an
    /// atomic push, collected later by the owner), and the rows' strings and cells freed
    /// here were a twentieth of the storing thread, which limits ingestion; the parser
    /// thread has time to spare. If the parser is gone or behind, the chunk is freed here.
    pub fn hand_back(&self, lines: Vec<ParsedLine>) {
        let _ = self.done.try_send(lines);
    }
}

pub fn channel() -> (ParserEnd, StoringEnd) {
    let (out, rx) = std::sync::mpsc::sync_channel(CHANNEL_CHUNKS);
    // The parser takes chunks back each time it sends one, so a few wait here at most;
    // while it is held up on a full channel, more are freed on the storing side instead
    // of piling up here: the lines in memory stay bounded by the chunks in flight, not
    // twice that. (Three alternated 1M ingests: peak RSS 226–229 MiB against 217–241.)
    let (done, done_rx) = std::sync::mpsc::sync_channel(HANDED_BACK);
    (ParserEnd { out, done: done_rx }, StoringEnd { rx, done })
}

/// The parser thread's loop: reads `reader` to its end (or to a last line left for
/// later) and sends chunks; returns as soon as the receiving side is gone.
pub fn run<R: BufRead>(
    mut reader: LineReader<R>,
    tail_mode: bool,
    max_line: usize,
    hints: &TableHints,
    ends: &ParserEnd,
) {
    let out = &ends.out;
    let mut buf = Vec::new();
    let mut chunk = Vec::with_capacity(CHUNK_LINES);
    // Chunks handed back, their lines freed, their lists used again.
    let mut spare: Vec<Vec<ParsedLine>> = Vec::new();
    let mut chunk_bytes = 0;
    let end = loop {
        let info = match reader.next_line(&mut buf) {
            Ok(Some(info)) => info,
            Ok(None) => break End::Eof,
            // A gzip stream still being written ends early: wait for the rest.
            Err(e) if tail_mode && e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break End::Unfinished { partial: false, rest: None, too_long: false }
            }
            Err(e) => break End::Error(e, reader.offset()),
        };
        if info.ending == LineEnd::Eof {
            // No newline yet. When tailing, the writer is mid-line; on a finished file
            // take the line only if it is a complete document.
            let complete =
                !tail_mode && info.too_long.is_none() && serde_json::from_slice::<serde::de::IgnoredAny>(&buf).is_ok();
            if !complete {
                // An over-long one holds something too, though none of it is kept: said
                // (and a compressed file, which never grows, done with it kept aside).
                let partial = !tail_mode && (info.too_long.is_some() || !buf.iter().all(is_json_whitespace));
                break End::Unfinished {
                    partial,
                    rest: Some((info.start, info.end)),
                    too_long: info.too_long.is_some(),
                };
            }
        }
        let outcome = parse_line(&buf, &info, max_line, hints);
        chunk_bytes += buf.len();
        chunk.push(ParsedLine { info, len: buf.len(), outcome, tail: reader.tail().to_vec() });
        if chunk.len() >= CHUNK_LINES || chunk_bytes >= CHUNK_BYTES {
            chunk_bytes = 0;
            while let Ok(mut done) = ends.done.try_recv() {
                done.clear();
                spare.push(done);
            }
            let next = spare.pop().unwrap_or_else(|| Vec::with_capacity(CHUNK_LINES));
            if out.send(Message::Lines(std::mem::replace(&mut chunk, next))).is_err() {
                return;
            }
        }
    };
    if !chunk.is_empty() && out.send(Message::Lines(chunk)).is_err() {
        return;
    }
    let _ = out.send(Message::End(end));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks_of(text: &[u8]) -> Vec<usize> {
        let (tx, rx) = channel();
        let reader = LineReader::new(text, 8 << 20, 0);
        let hints = TableHints { file_table: Some("DeviceFileEvents".into()), explicit: None };
        // The parser on a thread of its own, as in ingestion; this one takes its chunks.
        std::thread::scope(|s| {
            s.spawn(move || run(reader, false, 8 << 20, &hints, &tx));
            let mut sizes = Vec::new();
            while let Ok(Message::Lines(lines)) = rx.recv() {
                sizes.push(lines.len());
                rx.hand_back(lines);
            }
            sizes
        })
    }

    /// A chunk is sent at CHUNK_LINES lines, or sooner once it holds CHUNK_BYTES of lines:
    /// long lines do not pile up hundreds at a time ahead of the storing side.
    #[test]
    fn chunks_are_bounded_by_lines_and_by_bytes() {
        let short = br#"{"Timestamp":"2025-05-07T16:16:24Z","DeviceId":"d","ReportId":1}"#;
        let mut text = Vec::new();
        for _ in 0..(CHUNK_LINES + 10) {
            text.extend_from_slice(short);
            text.push(b'\n');
        }
        assert_eq!(chunks_of(&text), [CHUNK_LINES, 10]);

        let long =
            format!(r#"{{"Timestamp":"2025-05-07T16:16:24Z","DeviceId":"d","Pad":"{}"}}"#, "x".repeat(200 << 10));
        let mut text = Vec::new();
        for _ in 0..7 {
            text.extend_from_slice(long.as_bytes());
            text.push(b'\n');
        }
        // Three lines of ~200 KiB pass 512 KiB.
        assert_eq!(chunks_of(&text), [3, 3, 1]);
    }

    /// Blank is JSON's whitespace only: a line of spaces, tabs and a CR is nothing, one
    /// holding a form feed (or a vertical tab) is malformed JSON, kept aside.
    #[test]
    fn only_json_whitespace_is_blank() {
        let info = LineInfo { start: 0, end: 0, ending: crate::parse::lines::LineEnd::Newline, too_long: None };
        let hints = TableHints::default();
        assert!(matches!(parse_line(b" \t\r ", &info, 1024, &hints), LineOutcome::Blank));
        for line in [&b"\x0c"[..], b" \x0b "] {
            match parse_line(line, &info, 1024, &hints) {
                LineOutcome::Rejected(r, _) => assert_eq!(r.kind.as_str(), "malformed_json", "{line:?}"),
                _ => panic!("{line:?} taken for blank"),
            }
        }
    }

    /// A `{"records":[…]}` batch one record of which cannot be read (a number out of
    /// range, a lone surrogate) keeps its other records: only that one is rejected (the
    /// whole line was, every record of the batch lost with it).
    #[test]
    fn a_record_that_cannot_be_read_is_rejected_alone() {
        let info = LineInfo { start: 0, end: 0, ending: crate::parse::lines::LineEnd::Newline, too_long: None };
        let hints = TableHints::default();
        let envelope = |report: u32, extra: &str| {
            format!(
                r#"{{"time":"t","category":"AdvancedHunting-DeviceFileEvents","properties":{{"Timestamp":"2025-05-07T10:00:00Z","DeviceId":"d1","ReportId":{report}{extra}}}}}"#
            )
        };
        let line = format!(
            r#"{{"records":[{},{},{},5]}}"#,
            envelope(1, ""),
            envelope(2, r#","FileSize":1e400"#),
            envelope(3, r#","FileName":"\ud800""#)
        );
        let line = line.replacen("]}", &format!(",{}]}}", envelope(4, "")), 1);
        let LineOutcome::Records(records, excerpt) = parse_line(line.as_bytes(), &info, 1 << 20, &hints) else {
            panic!("the batch was not read record by record");
        };
        let got: Vec<Result<&str, String>> = records
            .iter()
            .map(|r| match r {
                Ok(row) => Ok(row.identity.as_str()),
                Err(e) => Err(format!("{}: {}", e.kind.as_str(), e.reason)),
            })
            .collect();
        assert!(matches!(got[..], [Ok("1"), Err(_), Err(_), Err(_), Ok("4")]), "{got:?}");
        assert!(matches!(&got[1], Err(e) if e.starts_with("malformed_json: records[1]")), "{got:?}");
        assert!(matches!(&got[2], Err(e) if e.starts_with("malformed_json: records[2]")), "{got:?}");
        assert!(matches!(&got[3], Err(e) if e.starts_with("not_an_object: records[3]")), "{got:?}");
        assert!(!excerpt.is_empty(), "the line's first bytes are kept with its rejects");

        // Not a batch: the line is rejected as a whole, as before.
        let flat = r#"{"Timestamp":"2025-05-07T10:00:00Z","DeviceId":"d1","ReportId":1,"FileSize":1e400}"#;
        assert!(matches!(parse_line(flat.as_bytes(), &info, 1 << 20, &hints), LineOutcome::Rejected(..)));
    }
}
