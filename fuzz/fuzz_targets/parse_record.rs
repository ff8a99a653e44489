//! The record parser on arbitrary file content: line splitting with a length limit,
//! UTF-8 and JSON checks, envelope / Event Hub unwrapping, table detection and column
//! normalisation. Nothing may panic; every record is either a row or a reject; and a row
//! the parser thread makes straight from a line (a line with the columns of the line
//! before it) is the row the general path makes of it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lookout_core::parse::lines::LineReader;
use lookout_core::parse::normalise::{normalise, TableHints};
use lookout_core::parse::pipeline::{parse_line, LineOutcome};
use lookout_core::parse::record::{parse_document, unwrap_document};

fuzz_target!(|data: &[u8]| {
    let hints = TableHints { file_table: Some("DeviceFileEvents".into()), explicit: None };
    let mut reader = LineReader::new(data, 4096, 0);
    let mut buf = Vec::new();
    while let Ok(Some(info)) = reader.next_line(&mut buf) {
        assert!(info.end > info.start && info.end <= data.len() as u64);
        if info.too_long.is_some() {
            assert!(buf.is_empty());
            continue;
        }
        if std::str::from_utf8(&buf).is_err() {
            continue;
        }
        // The parser thread's way first: it reads the line against the last line's layout.
        let outcome = parse_line(&buf, &info, 4096, &hints);
        let Ok(doc) = parse_document(&buf) else { continue };
        let mut general = Vec::new();
        for unwrapped in unwrap_document(doc) {
            let row = unwrapped.and_then(|u| normalise(u.row, u.category_table.as_deref(), &hints));
            if let Ok(row) = &row {
                // A stored row's key parts must be what the row says.
                assert_eq!(row.sha1, row.columns().iter().find(|(n, _)| n == "SHA1").map(|(_, c)| c.as_str().to_string()).unwrap_or_default());
            }
            general.push(row);
        }
        if let LineOutcome::Records(rows, _) = outcome {
            assert_eq!(rows, general);
        }
    }
    // The whole input as one JSON array export: each element is read as a line is.
    if let Ok(serde_json::Value::Array(items)) = serde_json::from_slice::<serde_json::Value>(data) {
        for item in items {
            let Ok(text) = serde_json::to_vec(&item) else { continue };
            let Ok(doc) = parse_document(&text) else { continue };
            for u in unwrap_document(doc).into_iter().flatten() {
                let _ = normalise(u.row, u.category_table.as_deref(), &hints);
            }
        }
    }
});
