//! End-to-end ingestion of the real Defender exports in `tests/data/kqlbench/`
//! (pretty-printed JSON array exports): every row is stored exactly once, re-runs and
//! renamed copies add nothing.

use lookout_tests::{kqlbench_dir, lookout_ok, status_json};
use serde_json::{json, Value};
use std::path::Path;

const NOW: &str = "2025-05-08T00:00:00Z";
const FE: &str = "DeviceFileEvents";
const IL: &str = "DeviceImageLoadEvents";
const FE_ROWS: u64 = 1003;
const IL_ROWS: u64 = 90;

fn ingest(data: &Path, paths: &[&Path]) -> String {
    let mut args = vec!["ingest", "--now", NOW];
    args.extend(paths.iter().map(|p| p.to_str().expect("utf-8 path")));
    lookout_ok(data, &args)
}

/// (rows per table, rejected, rejects by reason, duplicates skipped) from `status --json`.
fn counts(data: &Path) -> (Value, Value, Value, Value) {
    let s = status_json(data);
    (s["tables"].clone(), s["rejected"].clone(), s["rejected_by_reason"].clone(), s["duplicates_skipped"].clone())
}

fn assert_exact(data: &Path, duplicates: u64) {
    let s = status_json(data);
    assert_eq!(s["tables"], json!({ FE: {"rows": FE_ROWS}, IL: {"rows": IL_ROWS} }), "{s:#}");
    assert_eq!(s["rejected"], json!(0), "{s:#}");
    let by_reason = s["rejected_by_reason"].as_object().expect("rejected_by_reason object");
    assert!(by_reason.values().all(|v| v == &json!(0)), "{s:#}");
    assert_eq!(s["duplicates_skipped"], json!(duplicates), "{s:#}");
}

#[test]
fn kqlbench_exports_are_stored_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let kql = kqlbench_dir();
    let il = kql.join("DeviceImageLoadEvents.json");
    let fe = kql.join("DeviceFileEvents.json");

    let out = ingest(&data, &[&il, &fe]);
    assert!(out.contains(&format!("new rows {FE}: {FE_ROWS}")), "{out}");
    assert!(out.contains(&format!("new rows {IL}: {IL_ROWS}")), "{out}");
    assert_exact(&data, 0);
    let first = counts(&data);

    // Ingesting the same files again adds nothing and changes no count.
    let out = ingest(&data, &[&il, &fe]);
    assert!(out.contains("new rows: 0"), "{out}");
    assert_exact(&data, 0);
    assert_eq!(counts(&data), first);

    // One at a time, too.
    ingest(&data, &[&fe]);
    ingest(&data, &[&il]);
    assert_eq!(counts(&data), first);
}

#[test]
fn kqlbench_copy_under_another_name_adds_only_duplicates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let kql = kqlbench_dir();
    let il = kql.join("DeviceImageLoadEvents.json");
    let fe = kql.join("DeviceFileEvents.json");
    ingest(&data, &[&il, &fe]);
    assert_exact(&data, 0);

    // A copy is another file (another inode, another name): its rows are read, and every
    // one of them is already stored. The name says no table; the Type column does.
    let copy = dir.path().join("export-copy.json");
    std::fs::copy(&fe, &copy).expect("copy export");
    let out = ingest(&data, &[&copy]);
    assert!(out.contains(&format!("duplicates skipped: {FE_ROWS}")), "{out}");
    assert_exact(&data, FE_ROWS);

    // And a copy of the other one named after its table.
    let copy2 = dir.path().join("DeviceImageLoadEvents-2025-05-07.json");
    std::fs::copy(&il, &copy2).expect("copy export");
    ingest(&data, &[&copy2]);
    assert_exact(&data, FE_ROWS + IL_ROWS);
}

/// DeviceFileCertificateInfo has 70 rows, 26 of which share (DeviceId, Timestamp,
/// ReportId) and SHA1 with another row and differ only in CertificateCountersignatureTime
/// (counted by hand with jq: 70 objects, 44 distinct triples). Different rows are never
/// merged; the same rows sent again are stored once.
#[test]
fn rows_sharing_a_key_but_not_their_content_are_all_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let certs = kqlbench_dir().join("DeviceFileCertificateInfo.json");
    let out = ingest(&data, &[&certs]);
    assert!(out.contains("new rows DeviceFileCertificateInfo: 70"), "{out}");
    let copy = dir.path().join("DeviceFileCertificateInfo-again.json");
    std::fs::copy(&certs, &copy).expect("copy");
    let out = ingest(&data, &[&copy]);
    assert!(out.contains("new rows: 0"), "{out}");
    let s = status_json(&data);
    assert_eq!(s["tables"], json!({"DeviceFileCertificateInfo": {"rows": 70}}), "{s:#}");
    assert_eq!(s["duplicates_skipped"], json!(70), "{s:#}");
    assert_eq!(s["rejected"], json!(0), "{s:#}");
}

/// Rows older than the retention horizon when they arrive are counted as expired — in
/// the ingest summary, with how to keep them, and in `status` — and not stored; the rest
/// are stored, and nothing is counted twice when the files are read again.
#[test]
fn rows_past_the_retention_horizon_are_counted_as_expired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let kql = kqlbench_dir();
    let (il, fe) = (kql.join("DeviceImageLoadEvents.json"), kql.join("DeviceFileEvents.json"));
    let (il, fe) = (il.to_str().expect("utf-8 path"), fe.to_str().expect("utf-8 path"));
    // 7 hours before NOW: 17:00 on the day the exports were taken, in the middle of them.
    let args = ["ingest", "--now", NOW, "--retention", "7h", il, fe];
    let out = lookout_ok(&data, &args);
    let s = status_json(&data);
    let expired = s["expired"].as_u64().expect("expired in status");
    let stored: u64 = s["tables"].as_object().expect("tables").values().map(|t| t["rows"].as_u64().unwrap_or(0)).sum();
    // Counted independently (a Python script over both exports): 357 rows are older.
    assert_eq!(expired, 357, "{s}");
    assert_eq!(stored + expired, FE_ROWS + IL_ROWS, "{s}");
    assert!(out.contains(&format!("expired: {expired}")) && out.contains("--retention none"), "{out}");
    assert_eq!(s["retention_horizon"], json!("2025-05-07T17:00:00.0000000Z"), "{s}");
    // Read again: nothing new, nothing counted twice.
    let out = lookout_ok(&data, &args);
    assert!(out.contains("new rows: 0"), "{out}");
    assert_eq!(status_json(&data)["expired"].as_u64(), Some(expired));
}

/// A one-shot command given no `--retention` applies the one the data directory was last
/// used with (recorded by `run`, `ingest` and `detect`), not the 31-day default: the
/// horizon never moves back, so the default would remove for good the rows a longer
/// retention keeps. The exports are a day older than this `--now`.
#[test]
fn a_command_without_retention_keeps_what_the_last_one_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let kql = kqlbench_dir();
    let fe = kql.join("DeviceFileEvents.json");
    let fe = fe.to_str().expect("utf-8 path");
    let later = "2025-06-30T00:00:00Z";
    lookout_ok(&data, &["ingest", "--now", later, "--retention", "none", fe]);
    let stored = |data: &Path| status_json(data)["tables"]["DeviceFileEvents"]["rows"].as_u64();
    assert_eq!(stored(&data), Some(FE_ROWS));
    lookout_ok(&data, &["detect", "--now", later]);
    lookout_ok(&data, &["ingest", "--now", later, fe]);
    assert_eq!(stored(&data), Some(FE_ROWS), "kept under the recorded `none`");
    // Given explicitly, a retention applies (and is the one recorded from then on).
    lookout_ok(&data, &["detect", "--now", later, "--retention", "31d"]);
    assert_eq!(stored(&data), None);
}

/// The repository carries everything its build and tests use: no source, script or
/// manifest refers to a folder beside the checkout (CI runs the suite from a copy with
/// nothing beside it, which proves the same from the other side).
#[test]
fn nothing_in_the_repository_reads_beside_it() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let needle = ["..", "/shared"].concat();
    let mut offenders = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                if !matches!(name, "target" | ".git" | ".venv" | "corpus" | "artifacts" | "data") {
                    stack.push(path);
                }
                continue;
            }
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !matches!(ext, "rs" | "toml" | "sh" | "py" | "") || name == "Cargo.lock" {
                continue;
            }
            if std::fs::read_to_string(&path).is_ok_and(|text| text.contains(&needle)) {
                offenders.push(path.display().to_string());
            }
        }
    }
    assert!(offenders.is_empty(), "these files refer to a folder beside the checkout: {offenders:?}");
}
