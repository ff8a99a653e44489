//! End-to-end tests of `lookout ingest` over every input format the design names: JSON
//! Lines, JSON array exports (with and without a BOM), Streaming-API envelopes (CRLF) and
//! Event Hub `{"records":[...]}` batches, gzip of each (told by magic bytes), plus
//! deduplication, bad input kept aside by reason, partial last lines, resuming and
//! directories. Every test runs the real binary and checks exact counts from
//! `status --json`.

use flate2::write::GzEncoder;
use flate2::Compression;
use lookout_plugin_sdk::{Cell, Row};
use lookout_tests::{lookout_ok, status_json};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

const NOW: &str = "2025-05-08T00:00:00Z";
const TS: &str = "2025-05-07T16:55:49.7268426Z";
const DEV: &str = "51a5c6755c43d60b18a177bfa334701b37f9171e";
const FE: &str = "DeviceFileEvents";
const IL: &str = "DeviceImageLoadEvents";

// ---------------------------------------------------------------------------------------
// Fixtures

/// A valid DeviceFileEvents-style row; rows with different `id`s are different rows.
fn row(id: i64) -> Value {
    json!({
        "Timestamp": TS,
        "DeviceId": DEV,
        "DeviceName": "windows-vm",
        "ActionType": "FileCreated",
        "FileName": format!("file{id}.dll"),
        "FolderPath": "C:\\Windows\\Temp",
        "SHA1": format!("{id:040x}"),
        "FileSize": 1000 + id,
        "InitiatingProcessFileName": "powershell.exe",
        "ReportId": id,
    })
}

/// `v` with column `k` set to `val` (added at the end if new).
fn with(mut v: Value, k: &str, val: Value) -> Value {
    v.as_object_mut().expect("row is an object").insert(k.to_string(), val);
    v
}

/// `v` without column `k`.
fn without(mut v: Value, k: &str) -> Value {
    v.as_object_mut().expect("row is an object").shift_remove(k);
    v
}

/// A row that names its table in a `Type` column.
fn typed(id: i64, table: &str) -> Value {
    with(row(id), "Type", json!(table))
}

/// A Defender Streaming-API envelope around `row`.
fn envelope(table: &str, row: Value) -> Value {
    json!({
        "time": "2025-05-07T16:56:01.1234567Z",
        "tenantId": "54d61014-52aa-4bfc-9424-13aa153c5b27",
        "operationName": "Publish",
        "category": format!("AdvancedHunting-{table}"),
        "properties": row,
    })
}

/// One JSON document per line, each ended by `eol`.
fn lines(docs: &[Value], eol: &str) -> String {
    docs.iter().map(|d| format!("{d}{eol}")).collect()
}

fn jsonl(docs: &[Value]) -> String {
    lines(docs, "\n")
}

/// A pretty-printed JSON array export.
fn array(docs: &[Value]) -> String {
    serde_json::to_string_pretty(&Value::Array(docs.to_vec())).expect("serialise array")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes).expect("gzip write");
    enc.finish().expect("gzip finish")
}

fn rows(ids: std::ops::RangeInclusive<i64>) -> Vec<Value> {
    ids.map(row).collect()
}

/// A scratch area: `data` is the database directory, `input` holds the files to ingest.
struct Scratch {
    _dir: tempfile::TempDir,
    data: PathBuf,
    input: PathBuf,
}

fn scratch() -> Scratch {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).expect("create input dir");
    Scratch { data, input, _dir: dir }
}

impl Scratch {
    /// Writes `bytes` to `input/<name>` (creating parent folders) and returns the path.
    fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.input.join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("create parent");
        std::fs::write(&p, bytes).expect("write input");
        p
    }

    fn append(&self, path: &Path, bytes: impl AsRef<[u8]>) {
        let mut f = std::fs::OpenOptions::new().append(true).open(path).expect("open for append");
        f.write_all(bytes.as_ref()).expect("append");
    }

    /// `lookout ingest --now NOW <extra…> <path>`; fails the test unless it exits 0.
    fn ingest(&self, path: &Path, extra: &[&str]) -> String {
        let mut args = vec!["ingest", "--now", NOW];
        args.extend_from_slice(extra);
        args.push(path.to_str().expect("utf-8 path"));
        lookout_ok(&self.data, &args)
    }

    /// Asserts the exact rows per table, rejects per reason and duplicates in the store.
    fn expect(&self, tables: &[(&str, u64)], rejects: &[(&str, u64)], duplicates: u64) -> Value {
        let s = status_json(&self.data);
        let nonzero = |v: &Value, pick: &dyn Fn(&Value) -> Option<u64>| -> BTreeMap<String, u64> {
            v.as_object()
                .map(|o| o.iter().filter_map(|(k, v)| pick(v).filter(|n| *n > 0).map(|n| (k.clone(), n))).collect())
                .unwrap_or_default()
        };
        let got_tables = nonzero(&s["tables"], &|v| v["rows"].as_u64());
        let want_tables: BTreeMap<String, u64> = tables.iter().map(|(t, n)| (t.to_string(), *n)).collect();
        assert_eq!(got_tables, want_tables, "rows per table; status: {s:#}");
        let got_rejects = nonzero(&s["rejected_by_reason"], &|v| v.as_u64());
        let want_rejects: BTreeMap<String, u64> = rejects.iter().map(|(t, n)| (t.to_string(), *n)).collect();
        assert_eq!(got_rejects, want_rejects, "rejects per reason; status: {s:#}");
        let total: u64 = rejects.iter().map(|(_, n)| n).sum();
        assert_eq!(s["rejected"].as_u64(), Some(total), "rejected total; status: {s:#}");
        assert_eq!(s["duplicates_skipped"].as_u64(), Some(duplicates), "duplicates_skipped; status: {s:#}");
        s
    }
}

// ---------------------------------------------------------------------------------------
// JSON Lines and how the table is told

#[test]
fn jsonl_table_from_file_name_prefix() {
    let t = scratch();
    let f = t.write("DeviceFileEvents-1.jsonl", jsonl(&rows(1..=3)));
    t.ingest(&f, &[]);
    t.expect(&[(FE, 3)], &[], 0);

    // The file name beats --table.
    let g = t.write("DeviceImageLoadEvents-1.jsonl", jsonl(&rows(10..=11)));
    t.ingest(&g, &["--table", FE]);
    t.expect(&[(FE, 3), (IL, 2)], &[], 0);
}

#[test]
fn jsonl_table_from_type_column() {
    let t = scratch();
    let f = t.write("export.jsonl", jsonl(&[typed(1, FE), typed(2, IL), typed(3, IL), typed(4, IL)]));
    t.ingest(&f, &[]);
    t.expect(&[(FE, 1), (IL, 3)], &[], 0);

    // The Type column beats the file name prefix and --table.
    let g = t.write("DeviceFileEvents-typed.jsonl", jsonl(&[typed(5, IL), row(6)]));
    t.ingest(&g, &["--table", "DeviceNetworkEvents"]);
    t.expect(&[(FE, 2), (IL, 4)], &[], 0);
}

#[test]
fn jsonl_table_from_explicit_flag() {
    let t = scratch();
    let f = t.write("export.jsonl", jsonl(&rows(1..=4)));
    t.ingest(&f, &["--table", IL]);
    t.expect(&[(IL, 4)], &[], 0);
}

#[test]
fn jsonl_row_without_any_table_is_rejected_as_no_table() {
    let t = scratch();
    // Two rows cannot be told; the one with a Type column can.
    let f = t.write("export.jsonl", jsonl(&[row(1), typed(2, FE), row(3)]));
    t.ingest(&f, &[]);
    t.expect(&[(FE, 1)], &[("no_table", 2)], 0);
    let listed = lookout_ok(&t.data, &["status", "--rejects", "50"]);
    assert!(listed.contains(&format!("{}:1 ", f.display())), "{listed}");
    assert!(listed.contains(&format!("{}:3 ", f.display())), "{listed}");
    assert!(listed.contains("no_table"), "{listed}");
}

// ---------------------------------------------------------------------------------------
// JSON array exports

#[test]
fn json_array_export_pretty_printed() {
    let t = scratch();
    let text = array(&rows(1..=5));
    assert!(text.starts_with("[\n  {\n"), "the fixture is pretty-printed");
    let f = t.write("DeviceFileEvents-export.json", &text);
    t.ingest(&f, &[]);
    t.expect(&[(FE, 5)], &[], 0);

    // An export whose rows carry a Type column needs no table in its name.
    let g = t.write("query-result.json", array(&[typed(10, IL), typed(11, IL), typed(12, FE)]));
    t.ingest(&g, &[]);
    t.expect(&[(FE, 6), (IL, 2)], &[], 0);
}

#[test]
fn json_array_export_with_utf8_bom() {
    let t = scratch();
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(array(&rows(1..=4)).as_bytes());
    let f = t.write("DeviceFileEvents-bom.json", bytes);
    t.ingest(&f, &[]);
    t.expect(&[(FE, 4)], &[], 0);

    // JSON Lines with a BOM too.
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(jsonl(&rows(10..=12)).as_bytes());
    let g = t.write("DeviceImageLoadEvents-bom.jsonl", bytes);
    t.ingest(&g, &[]);
    t.expect(&[(FE, 4), (IL, 3)], &[], 0);
}

// ---------------------------------------------------------------------------------------
// Streaming API envelopes and Event Hub batches

#[test]
fn streaming_api_envelopes_with_crlf() {
    let t = scratch();
    let docs = [
        envelope(FE, row(1)),
        // The envelope category wins over a contradicting Type column.
        envelope(FE, typed(2, IL)),
        envelope(FE, row(3)),
        envelope(IL, row(4)),
    ];
    let text = lines(&docs, "\r\n");
    assert_eq!(text.matches("\r\n").count(), 4);
    // The file name names neither table: only the envelope tells.
    let f = t.write("streaming-api.log", text);
    t.ingest(&f, &[]);
    t.expect(&[(FE, 3), (IL, 1)], &[], 0);
}

#[test]
fn envelope_category_wins_over_type_column_and_file_name() {
    let t = scratch();
    let docs = [envelope(IL, typed(1, FE)), envelope(IL, typed(2, FE))];
    let f = t.write("DeviceFileEvents-stream.log", lines(&docs, "\r\n"));
    t.ingest(&f, &["--table", FE]);
    t.expect(&[(IL, 2)], &[], 0);
}

#[test]
fn event_hub_records_lines() {
    let t = scratch();
    let batch1 = json!({"records": [envelope(FE, row(1)), envelope(IL, row(2))]});
    let batch2 = json!({"records": [envelope(FE, row(3)), envelope(FE, typed(4, IL)), envelope(IL, row(5))]});
    let f = t.write("eventhub-capture.json", lines(&[batch1, batch2], "\r\n"));
    t.ingest(&f, &[]);
    t.expect(&[(FE, 3), (IL, 2)], &[], 0);
}

/// A JSON array export whose elements are Streaming-API envelopes or Event Hub batches
/// is read as the same documents as lines: each unwrapped into its rows (before, every
/// element was one object of the envelope's own columns, so every row was rejected).
#[test]
fn arrays_of_envelopes_and_of_record_batches() {
    let t = scratch();
    let docs =
        [envelope(FE, row(1)), json!({"records": [envelope(IL, row(2)), envelope(FE, row(3))]}), envelope(IL, row(4))];
    let f = t.write("streaming-export.json", array(&docs));
    t.ingest(&f, &[]);
    t.expect(&[(FE, 2), (IL, 2)], &[], 0);
    // The same documents as lines: the same rows, each a duplicate now.
    let g = t.write("streaming-export.jsonl", jsonl(&docs));
    t.ingest(&g, &[]);
    t.expect(&[(FE, 2), (IL, 2)], &[], 4);
}

/// A key given twice means the same row whether the object is a line or an array
/// element (before, the array's reader kept only the last, in the first's place, and
/// the line's every one: the same event stored twice, keyed by different SHA1s).
#[test]
fn a_key_given_twice_reads_the_same_in_a_line_and_in_an_array() {
    let t = scratch();
    let text = r#"{"Timestamp":"2025-05-07T16:55:49Z","DeviceId":"d","SHA1":"a","ReportId":1,"SHA1":"b"}"#;
    let f = t.write("DeviceFileEvents-lines.jsonl", format!("{text}\n"));
    t.ingest(&f, &[]);
    let g = t.write("DeviceFileEvents-array.json", format!("[{text}]"));
    t.ingest(&g, &[]);
    t.expect(&[(FE, 1)], &[], 1);
}

// ---------------------------------------------------------------------------------------
// gzip

#[test]
fn gzip_of_every_format_detected_by_magic_bytes() {
    let t = scratch();
    let a = t.write("DeviceFileEvents-1.jsonl.gz", gzip(jsonl(&rows(1..=3)).as_bytes()));
    let b = t.write("DeviceImageLoadEvents-2.json.gz", gzip(array(&rows(10..=13)).as_bytes()));
    // Neither of these names says gzip.
    let envs = [envelope(FE, row(20)), envelope(FE, row(21)), envelope(IL, row(22))];
    let c = t.write("stream-3.log", gzip(lines(&envs, "\r\n").as_bytes()));
    let d = t.write("DeviceFileEvents-4.jsonl", gzip(jsonl(&rows(30..=31)).as_bytes()));
    let e = t.write("export-5.json", gzip(array(&[typed(40, IL)]).as_bytes()));
    let hub = json!({"records": [envelope(FE, row(50)), envelope(IL, row(51))]});
    let h = t.write("eventhub-6", gzip(jsonl(&[hub]).as_bytes()));

    t.ingest(&a, &[]);
    t.expect(&[(FE, 3)], &[], 0);
    t.ingest(&b, &[]);
    t.expect(&[(FE, 3), (IL, 4)], &[], 0);
    t.ingest(&c, &[]);
    t.expect(&[(FE, 5), (IL, 5)], &[], 0);
    t.ingest(&d, &[]);
    t.expect(&[(FE, 7), (IL, 5)], &[], 0);
    t.ingest(&e, &[]);
    t.expect(&[(FE, 7), (IL, 6)], &[], 0);
    t.ingest(&h, &[]);
    let s = t.expect(&[(FE, 8), (IL, 7)], &[], 0);

    let sources = s["sources"].as_array().expect("sources");
    assert_eq!(sources.len(), 6, "{s:#}");
    assert!(sources.iter().all(|src| src["compressed"] == json!(true)), "every source is gzip: {s:#}");

    // Re-reading the compressed files adds nothing and counts nothing twice.
    for p in [&a, &b, &c, &d, &e, &h] {
        t.ingest(p, &[]);
    }
    t.expect(&[(FE, 8), (IL, 7)], &[], 0);
}

// ---------------------------------------------------------------------------------------
// Duplicates

#[test]
fn duplicates_across_files_are_stored_once() {
    let t = scratch();
    let a = t.write("DeviceFileEvents-a.jsonl", jsonl(&rows(1..=4)));
    t.ingest(&a, &[]);
    t.expect(&[(FE, 4)], &[], 0);

    // 3 and 4 are already stored, 6 appears twice in this file.
    let b = t.write("DeviceFileEvents-b.jsonl", jsonl(&[row(3), row(4), row(5), row(6), row(6)]));
    t.ingest(&b, &[]);
    t.expect(&[(FE, 6)], &[], 3);

    // The same rows in other formats are the same rows.
    let c = t.write("copy.json", array(&[typed(1, FE), typed(2, FE)]));
    t.ingest(&c, &[]);
    t.expect(&[(FE, 6)], &[], 5);
    let d = t.write("stream.log", lines(&[envelope(FE, row(5)), envelope(FE, row(7))], "\r\n"));
    t.ingest(&d, &[]);
    t.expect(&[(FE, 7)], &[], 6);

    // The same ReportId on another table, device or timestamp is another row.
    let other = [
        with(row(1), "DeviceId", json!("another-device")),
        with(row(1), "Timestamp", json!("2025-05-07T16:55:50Z")),
        typed(1, IL),
    ];
    let e = t.write("DeviceFileEvents-c.jsonl", jsonl(&other));
    t.ingest(&e, &[]);
    t.expect(&[(FE, 9), (IL, 1)], &[], 6);
}

// ---------------------------------------------------------------------------------------
// Bad input

#[test]
fn malformed_records_are_counted_by_reason_and_good_rows_stored() {
    let t = scratch();
    let mut invalid_utf8 = format!(r#"{{"Timestamp":"{TS}","DeviceId":"dev"#).into_bytes();
    invalid_utf8.extend_from_slice(b"\xff\xfe");
    invalid_utf8.extend_from_slice(br#"","ReportId":103}"#);
    let long_good = with(row(5), "Padding", json!("p".repeat(2000)));
    let too_long = with(row(102), "Padding", json!("x".repeat(10 * 1024)));

    let records: Vec<Vec<u8>> = vec![
        /* 1 */ row(1).to_string().into_bytes(),
        /* 2 */ format!(r#"{{"Timestamp":"{TS}","DeviceId":"#).into_bytes(),
        /* 3 */ row(2).to_string().into_bytes(),
        /* 4 */ with(row(100), "DeviceId", json!(7)).to_string().into_bytes(),
        /* 5 */ with(row(101), "Timestamp", json!("yesterday")).to_string().into_bytes(),
        /* 6 */ too_long.to_string().into_bytes(),
        /* 7 */ invalid_utf8,
        /* 8 */ envelope("SigninLogs", row(104)).to_string().into_bytes(),
        /* 9 */ typed(105, "SigninLogs").to_string().into_bytes(),
        /* 10 */ without(row(106), "DeviceId").to_string().into_bytes(),
        /* 11 */ b"[1,2,3]".to_vec(),
        /* 12 */ br#""just a string""#.to_vec(),
        /* 13 */ row(3).to_string().into_bytes(),
        /* 14 */ Vec::new(),
        /* 15 */ json!({"records": [envelope(FE, row(4)), 7]}).to_string().into_bytes(),
        /* 16 */ long_good.to_string().into_bytes(),
        /* 17 */ with(row(107), "DeviceId", json!("")).to_string().into_bytes(),
        /* 18 */ b"null".to_vec(),
        /* 19 */ format!("{} trailing", row(108)).into_bytes(),
        /* 20 */ with(row(109), "SHA1", json!(true)).to_string().into_bytes(),
        /* 21 */ row(6).to_string().into_bytes(),
        // Unexpected types outside the key: kept as sent, and counted.
        /* 22 */
        with(row(7), "FileSize", json!("big")).to_string().into_bytes(),
        /* 23 */ with(row(8), "ReportId", json!("not a number")).to_string().into_bytes(),
    ];
    let mut bytes = Vec::new();
    let mut offsets = Vec::new();
    for r in &records {
        offsets.push(bytes.len());
        bytes.extend_from_slice(r);
        bytes.push(b'\n');
    }
    assert!(records[5].len() >= 10 * 1024 && records[15].len() < 4096);
    let f = t.write("DeviceFileEvents-mixed.jsonl", &bytes);

    let out = t.ingest(&f, &["--max-line", "4096"]);
    let want_rejects = [
        ("malformed_json", 2),
        ("wrong_type", 2),
        ("bad_timestamp", 1),
        ("line_too_long", 1),
        ("invalid_utf8", 1),
        ("unknown_table", 2),
        ("missing_column", 2),
        ("not_an_object", 4),
    ];
    t.expect(&[(FE, 8)], &want_rejects, 0);
    assert!(out.contains("rejected: 15"), "{out}");
    assert!(out.contains("values of an unexpected type: 2 (kept as sent"), "{out}");

    // Each reject is listed with its file, line and offset.
    let listed = lookout_ok(&t.data, &["status", "--rejects", "100"]);
    let file = f.display();
    for (line, kind) in [
        (2, "malformed_json"),
        (4, "wrong_type"),
        (5, "bad_timestamp"),
        (6, "line_too_long"),
        (7, "invalid_utf8"),
        (8, "unknown_table"),
        (9, "unknown_table"),
        (10, "missing_column"),
        (11, "not_an_object"),
        (12, "not_an_object"),
        (15, "not_an_object"),
        (17, "missing_column"),
        (18, "not_an_object"),
        (19, "malformed_json"),
        (20, "wrong_type"),
    ] {
        let want = format!("reject {file}:{line} (offset {}): {kind}:", offsets[line - 1]);
        assert!(listed.contains(&want), "missing `{want}` in:\n{listed}");
    }
    assert_eq!(listed.lines().filter(|l| l.starts_with("reject ")).count(), 15, "{listed}");

    // Re-running counts nothing twice.
    t.ingest(&f, &["--max-line", "4096"]);
    t.expect(&[(FE, 8)], &want_rejects, 0);
}

#[test]
fn malformed_array_element_types_are_rejected_per_element() {
    let t = scratch();
    let docs = [
        row(1),
        with(row(2), "DeviceId", json!(2)),
        json!(42),
        with(row(3), "Timestamp", json!("yesterday")),
        typed(4, "SigninLogs"),
        row(5),
    ];
    let f = t.write("DeviceFileEvents-array.json", array(&docs));
    t.ingest(&f, &[]);
    t.expect(&[(FE, 2)], &[("wrong_type", 1), ("not_an_object", 1), ("bad_timestamp", 1), ("unknown_table", 1)], 0);
}

#[test]
fn reject_line_numbers_count_from_the_start_of_the_file_after_a_resume() {
    let t = scratch();
    let f = t.write("DeviceFileEvents-live.jsonl", jsonl(&rows(1..=3)));
    t.ingest(&f, &[]);
    t.expect(&[(FE, 3)], &[], 0);

    // Line 4 is appended after the first run; the second run resumes at its offset.
    let offset = std::fs::metadata(&f).expect("metadata").len();
    t.append(&f, format!("{{not json\n{}\n", row(4)));
    t.ingest(&f, &[]);
    t.expect(&[(FE, 4)], &[("malformed_json", 1)], 0);
    let listed = lookout_ok(&t.data, &["status", "--rejects", "10"]);
    let want = format!("reject {}:4 (offset {offset}): malformed_json:", f.display());
    assert!(listed.contains(&want), "missing `{want}` in:\n{listed}");
}

#[test]
fn over_long_last_line_still_being_written_is_rejected_once() {
    let t = scratch();
    let long = with(row(2), "Padding", json!("x".repeat(10 * 1024))).to_string();
    let (written, rest) = long.split_at(5000);
    // The writer has written more than the limit of line 2, but not its end yet.
    let f = t.write("DeviceFileEvents-long.jsonl", format!("{}{written}", jsonl(&[row(1)])));
    t.ingest(&f, &["--max-line", "4096"]);
    // Then it finishes the line and writes another.
    t.append(&f, format!("{rest}\n{}\n", row(3)));
    t.ingest(&f, &["--max-line", "4096"]);
    // One over-long line is one reject; its second half is not another record.
    t.expect(&[(FE, 2)], &[("line_too_long", 1)], 0);
}

#[test]
fn rerun_of_unchanged_truncated_array_export_counts_its_reject_once() {
    let t = scratch();
    let text = array(&rows(1..=3));
    // Cut inside the third element.
    let cut = text.rfind("\"FileName\"").expect("third element");
    let f = t.write("DeviceFileEvents-truncated.json", &text[..cut]);
    t.ingest(&f, &[]);
    // The elements before the syntax error are kept; the error is one reject.
    let first = t.expect(&[(FE, 2)], &[("malformed_json", 1)], 0);
    t.ingest(&f, &[]);
    let second = t.expect(&[(FE, 2)], &[("malformed_json", 1)], 0);
    assert_eq!(first["rejected_by_reason"], second["rejected_by_reason"]);
}

// ---------------------------------------------------------------------------------------
// Normalisation

#[test]
fn null_strings_become_empty_and_timestamps_take_0_to_7_fraction_digits() {
    let t = scratch();
    let stamps = [
        "2025-05-07T16:55:49Z",
        "2025-05-07T16:55:49.1Z",
        "2025-05-07T16:55:49.12Z",
        "2025-05-07T16:55:49.123Z",
        "2025-05-07T16:55:49.1234Z",
        "2025-05-07T16:55:49.12345Z",
        "2025-05-07T16:55:49.123456Z",
        "2025-05-07T16:55:49.1234567Z",
    ];
    let mut docs: Vec<Value> = stamps.iter().zip(1..).map(|(ts, id)| with(row(id), "Timestamp", json!(ts))).collect();
    docs.push(with(row(9), "Timestamp", json!("2025-05-07T16:55:49.12345678Z")));
    let nulls = with(
        with(with(with(row(20), "FileName", Value::Null), "SHA1", Value::Null), "FolderPath", Value::Null),
        "InitiatingProcessFileName",
        Value::Null,
    );
    docs.push(nulls);
    let f = t.write("DeviceFileEvents-ts.jsonl", jsonl(&docs));
    t.ingest(&f, &[]);
    t.expect(&[(FE, 9)], &[("bad_timestamp", 1)], 0);

    // Without a ReportId a row is identified by its content: a null string column and an
    // empty one are the same content once normalised.
    let anon = |file: Value| json!({"Timestamp": TS, "DeviceId": "anon-device", "FileName": file, "ActionType": "FileCreated"});
    let g = t.write("DeviceFileEvents-anon.jsonl", jsonl(&[anon(Value::Null), anon(json!("")), anon(json!("x"))]));
    t.ingest(&g, &[]);
    t.expect(&[(FE, 11)], &[("bad_timestamp", 1)], 1);

    // The stored row reads "" where the input had null.
    let store = lookout_core::Store::open(&t.data).expect("open store");
    let found: Vec<Row> = store.lookup(FE, "", Some(DEV)).expect("lookup");
    let stored = found.iter().find(|r| r.get("ReportId") == Some(&Cell::Int(20))).expect("row 20 is stored");
    for col in ["FileName", "SHA1", "FolderPath", "InitiatingProcessFileName"] {
        assert_eq!(stored.get(col), Some(&Cell::Str(String::new())), "column {col} of {stored:?}");
    }
    assert_eq!(stored.get("DeviceName"), Some(&Cell::Str("windows-vm".into())));
}

// ---------------------------------------------------------------------------------------
// Partial last lines, resuming, directories

#[test]
fn complete_last_line_without_newline_is_ingested_once() {
    let t = scratch();
    let mut text = jsonl(&rows(1..=2));
    text.push_str(&row(3).to_string());
    let f = t.write("DeviceFileEvents-tail.jsonl", &text);
    t.ingest(&f, &[]);
    t.expect(&[(FE, 3)], &[], 0);

    // The writer then ends the line and adds another: only the new row is stored.
    t.append(&f, format!("\n{}\n", row(4)));
    t.ingest(&f, &[]);
    t.expect(&[(FE, 4)], &[], 0);
}

#[test]
fn incomplete_last_line_waits_for_the_rest() {
    let t = scratch();
    let full = format!(r#"{{"Timestamp":"{TS}","DeviceId":"{DEV}","ReportId":3,"FileName":"late.dll"}}"#);
    let (head, rest) = full.split_at(r#"{"Timestamp":"2025-"#.len());
    assert_eq!(head, r#"{"Timestamp":"2025-"#);
    let mut text = jsonl(&rows(1..=2));
    text.push_str(head);
    let f = t.write("DeviceFileEvents-partial.jsonl", &text);

    let out = t.ingest(&f, &[]);
    t.expect(&[(FE, 2)], &[], 0);
    assert!(out.contains("incomplete"), "the partial tail is reported: {out}");
    // Still incomplete on a second run: still neither stored nor rejected.
    t.ingest(&f, &[]);
    t.expect(&[(FE, 2)], &[], 0);

    t.append(&f, format!("{rest}\n"));
    t.ingest(&f, &[]);
    t.expect(&[(FE, 3)], &[], 0);
    t.ingest(&f, &[]);
    t.expect(&[(FE, 3)], &[], 0);
}

#[test]
fn rerun_adds_nothing_and_appended_lines_are_stored_once() {
    let t = scratch();
    let f = t.write("DeviceFileEvents-live.jsonl", jsonl(&rows(1..=3)));
    t.ingest(&f, &[]);
    t.expect(&[(FE, 3)], &[], 0);

    // Unchanged: nothing is read again (not even counted as duplicates).
    t.ingest(&f, &[]);
    let s = t.expect(&[(FE, 3)], &[], 0);
    let len = std::fs::metadata(&f).expect("metadata").len();
    assert_eq!(s["sources"][0]["offset"].as_u64(), Some(len), "{s:#}");
    assert_eq!(s["sources"][0]["unit"], json!("bytes"), "{s:#}");

    t.append(&f, jsonl(&rows(4..=5)));
    t.ingest(&f, &[]);
    t.expect(&[(FE, 5)], &[], 0);
    t.append(&f, lines(&[envelope(IL, row(6))], "\r\n"));
    t.ingest(&f, &[]);
    t.expect(&[(FE, 5), (IL, 1)], &[], 0);
    t.ingest(&f, &[]);
    t.expect(&[(FE, 5), (IL, 1)], &[], 0);
}

#[test]
fn rerun_of_unchanged_array_export_adds_nothing() {
    let t = scratch();
    let f = t.write("DeviceFileEvents-export.json", array(&rows(1..=4)));
    t.ingest(&f, &[]);
    t.ingest(&f, &[]);
    let s = t.expect(&[(FE, 4)], &[], 0);
    assert_eq!(s["sources"][0]["unit"], json!("array_elements"), "{s:#}");
    assert_eq!(s["sources"][0]["offset"].as_u64(), Some(4), "{s:#}");
}

#[test]
fn directory_argument_ingests_every_file_in_it() {
    let t = scratch();
    t.write("DeviceFileEvents-1.jsonl", jsonl(&rows(1..=2)));
    t.write("export.json", array(&[typed(10, IL), typed(11, IL)]));
    t.write("sub/stream.log.gz", gzip(lines(&[envelope(FE, row(20))], "\r\n").as_bytes()));
    t.write("sub/deeper/DeviceImageLoadEvents-x.jsonl", jsonl(&[row(30)]));
    t.write("sub/eventhub.json", jsonl(&[json!({"records": [envelope(FE, row(40)), envelope(IL, row(41))]})]));

    t.ingest(&t.input, &[]);
    let s = t.expect(&[(FE, 4), (IL, 4)], &[], 0);
    assert_eq!(s["sources"].as_array().map(Vec::len), Some(5), "{s:#}");

    // Again: nothing new, nothing counted twice.
    t.ingest(&t.input, &[]);
    t.expect(&[(FE, 4), (IL, 4)], &[], 0);
}
