//! The bad-input corpus: a logs folder full of hostile and broken input, tailed by the
//! real daemon. Every bad record is rejected with a named reason, every bad file is
//! skipped with one, every good row around them is stored (and a row whose only fault is
//! a value of an unexpected type outside its key is stored as sent), and the daemon stays
//! up.

use lookout_tests::*;
use std::collections::BTreeMap;
use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static REPORT: AtomicU64 = AtomicU64::new(1000);

fn row(extra: &str) -> String {
    let id = REPORT.fetch_add(1, Ordering::Relaxed);
    let sep = if extra.is_empty() { "" } else { "," };
    format!(
        r#"{{"Timestamp":"2025-05-07T16:55:49.7268426Z","DeviceId":"dev1","DeviceName":"ws1","ActionType":"FileCreated","SHA1":"s{id}","FolderPath":"C:\\x\\{id}.dll","ReportId":{id}{sep}{extra}}}"#
    )
}

fn good() -> Vec<u8> {
    format!("{}\n", row("")).into_bytes()
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    good: u64,
    rejects: &'static [(&'static str, u64)],
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn cases() -> Vec<Case> {
    let g = good;
    let line = |s: String| format!("{s}\n").into_bytes();
    let mut c = vec![
        Case {
            name: "truncated_json",
            bytes: cat(&[&g(), b"{\"Timestamp\":\"2025-05-07T1\n", &g()]),
            good: 2,
            rejects: &[("malformed_json", 1)],
        },
        Case {
            name: "wrong_type_string_column_is_kept",
            bytes: cat(&[&g(), &line(row(r#""InitiatingProcessFileName":5"#)), &g()]),
            good: 3,
            rejects: &[],
        },
        Case {
            name: "wrong_type_long_column_is_kept",
            bytes: cat(&[&g(), &line(row(r#""FileSize":"big""#)), &g()]),
            good: 3,
            rejects: &[],
        },
        Case {
            name: "wrong_type_bool_column_is_kept",
            bytes: cat(&[&g(), &line(row(r#""IsAzureInfoProtectionApplied":"yes""#)), &g()]),
            good: 3,
            rejects: &[],
        },
        Case {
            name: "wrong_type_datetime_column_is_kept",
            bytes: cat(&[&g(), &line(row(r#""InitiatingProcessCreationTime":12345"#)), &g()]),
            good: 3,
            rejects: &[],
        },
        Case {
            name: "integer_overflow_is_kept",
            bytes: cat(&[&g(), &line(row(r#""FileSize":18446744073709551616"#)), &g()]),
            good: 3,
            rejects: &[],
        },
        // A value of an unexpected type outside the key is kept as sent (the cases
        // above); in a key column the row cannot be keyed, so it is rejected.
        Case {
            name: "wrong_type_device_id",
            bytes: cat(&[&g(), &line(row("").replace(r#""DeviceId":"dev1""#, r#""DeviceId":7"#)), &g()]),
            good: 2,
            rejects: &[("wrong_type", 1)],
        },
        Case {
            name: "wrong_type_sha1",
            bytes: cat(&[&g(), &line(row("").replace(r#""SHA1":"s"#, r#""SHA1":true,"Was":"s"#)), &g()]),
            good: 2,
            rejects: &[("wrong_type", 1)],
        },
        Case {
            name: "nul_bytes",
            bytes: cat(&[&g(), b"{\"DeviceName\":\"a\0b\"}\n", &g()]),
            good: 2,
            rejects: &[("malformed_json", 1)],
        },
        Case {
            name: "invalid_utf8",
            bytes: cat(&[&g(), b"{\"DeviceName\":\"\xff\xfe\"}\n", &g()]),
            good: 2,
            rejects: &[("invalid_utf8", 1)],
        },
        Case {
            name: "deeply_nested_json",
            bytes: cat(&[&g(), format!("{{\"x\":{}{}}}\n", "[".repeat(100_000), "]".repeat(100_000)).as_bytes(), &g()]),
            good: 2,
            rejects: &[("malformed_json", 1)],
        },
        Case {
            name: "timestamp_month_13",
            bytes: cat(&[&g(), &line(row("").replace("2025-05-07T16", "2025-13-07T16")), &g()]),
            good: 2,
            rejects: &[("bad_timestamp", 1)],
        },
        Case {
            name: "timestamp_year_10000",
            bytes: cat(&[&g(), &line(row("").replace("2025-05-07T16", "10000-05-07T16")), &g()]),
            good: 2,
            rejects: &[("bad_timestamp", 1)],
        },
        Case {
            name: "timestamp_8_fraction_digits",
            bytes: cat(&[&g(), &line(row("").replace("7268426Z", "72684261Z")), &g()]),
            good: 2,
            rejects: &[("bad_timestamp", 1)],
        },
        Case { name: "bom_at_start", bytes: cat(&[b"\xEF\xBB\xBF", &g(), &g()]), good: 2, rejects: &[] },
        Case {
            name: "bom_mid_file",
            bytes: cat(&[&g(), b"\xEF\xBB\xBF", &g(), &g()]),
            good: 2,
            rejects: &[("malformed_json", 1)],
        },
        Case {
            name: "mixed_line_ends",
            bytes: cat(&[
                row("").as_bytes(),
                b"\r\n",
                row("").as_bytes(),
                b"\n",
                row("").as_bytes(),
                b"\r",
                row("").as_bytes(),
                b"\n",
                &g(),
            ]),
            good: 3,
            rejects: &[("malformed_json", 1)],
        },
        Case { name: "empty_file", bytes: Vec::new(), good: 0, rejects: &[] },
        Case { name: "blank_lines_only", bytes: b"\n\n   \r\n\t\n".to_vec(), good: 0, rejects: &[] },
        Case {
            name: "binary_junk",
            bytes: cat(&[&g(), &(0x80u8..=0xff).cycle().take(4096).collect::<Vec<u8>>(), b"\n@@##$$%%\n", &g()]),
            good: 2,
            rejects: &[("invalid_utf8", 1), ("malformed_json", 1)],
        },
        Case {
            name: "not_an_object",
            bytes: cat(&[&g(), b"[1,2,3]\n\"just a string\"\n42\nnull\n", &g()]),
            good: 2,
            rejects: &[("not_an_object", 4)],
        },
        Case {
            name: "unknown_table_type_column",
            bytes: cat(&[&g(), &line(row(r#""Type":"SigninLogs""#)), &g()]),
            good: 2,
            rejects: &[("unknown_table", 1)],
        },
        Case {
            name: "unknown_table_envelope",
            bytes: cat(&[
                &g(),
                &line(format!(
                    r#"{{"time":"2025-05-07T16:55:49Z","category":"AdvancedHunting-EmailEvents","properties":{}}}"#,
                    row("")
                )),
                &g(),
            ]),
            good: 2,
            rejects: &[("unknown_table", 1)],
        },
        Case {
            name: "missing_device_id",
            bytes: cat(&[&g(), &line(row("").replace(r#""DeviceId":"dev1","#, "")), &g()]),
            good: 2,
            rejects: &[("missing_column", 1)],
        },
        Case {
            name: "null_timestamp",
            bytes: cat(&[
                &g(),
                &line(row("").replace(r#""Timestamp":"2025-05-07T16:55:49.7268426Z""#, r#""Timestamp":null"#)),
                &g(),
            ]),
            good: 2,
            rejects: &[("missing_column", 1)],
        },
        Case {
            name: "records_with_bad_element",
            bytes: cat(&[
                &g(),
                &line(format!(
                    r#"{{"records":[{{"category":"AdvancedHunting-DeviceFileEvents","properties":{}}},5]}}"#,
                    row("")
                )),
                &g(),
            ]),
            good: 3,
            rejects: &[("not_an_object", 1)],
        },
        Case {
            name: "array_with_trailing_garbage",
            bytes: format!("[\n{},\n{}\n] trailing junk\n", row(""), row("")).into_bytes(),
            good: 2,
            rejects: &[("malformed_json", 1)],
        },
        Case {
            name: "array_still_being_written",
            bytes: format!("[\n{},\n{{\"Timestamp\":\"2025-", row("")).into_bytes(),
            good: 1,
            rejects: &[],
        },
        Case {
            name: "huge_array_value",
            bytes: cat(&[&g(), format!("{{\"x\":[{}0]}}\n", "0,".repeat(5 << 20)).as_bytes(), &g()]),
            good: 2,
            rejects: &[("line_too_long", 1)],
        },
    ];
    // 100 MB on one line: rejected as too long without being held in memory.
    let mut huge = g();
    huge.extend_from_slice(b"{\"x\":\"");
    huge.resize(huge.len() + (100 << 20), b'a');
    huge.extend_from_slice(b"\"}\n");
    huge.extend_from_slice(&g());
    c.push(Case { name: "line_of_100_mb", bytes: huge, good: 2, rejects: &[("line_too_long", 1)] });
    c
}

#[test]
fn hostile_logs_folder_is_survived_with_every_reason_named() {
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let data = tmp.path().join("data");
    let plugins = plugins_dir(tmp.path(), &[WINRM]);

    let mut want_rows = 0u64;
    let mut want_rejects: BTreeMap<String, u64> = BTreeMap::new();
    let cases = cases();
    assert!(cases.len() >= 25, "the corpus has {} kinds", cases.len());
    for c in &cases {
        std::fs::write(logs.join(format!("DeviceFileEvents-{}.jsonl", c.name)), &c.bytes).unwrap();
        want_rows += c.good;
        for (reason, n) in c.rejects {
            *want_rejects.entry(reason.to_string()).or_insert(0) += n;
        }
    }
    // Files that are not log files at all.
    std::os::unix::fs::symlink("DeviceFileEvents-loop.jsonl", logs.join("DeviceFileEvents-loop.jsonl")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", logs.join("DeviceFileEvents-dangling.jsonl")).unwrap();
    std::fs::create_dir(logs.join("DeviceFileEvents-a-folder.jsonl")).unwrap();
    let fifo = std::process::Command::new("mkfifo").arg(logs.join("DeviceFileEvents-fifo.jsonl")).status().unwrap();
    assert!(fifo.success(), "mkfifo failed");
    // gzip magic, then a compression method that does not exist: not decodable, ever.
    // (A gzip that merely ends early is one still being written, and is waited for.)
    let mut corrupt = vec![0x1f, 0x8b, 0x07, 0x00, 0, 0, 0, 0, 0, 0xff];
    corrupt.extend_from_slice(&good());
    std::fs::write(logs.join("DeviceFileEvents-corrupt.jsonl.gz"), &corrupt).unwrap();

    let mut d = DaemonSpec::new(&data).logs(&logs).plugins(&plugins).rescan_secs(0.2).start();
    let total_rejects: u64 = want_rejects.values().sum();
    d.wait_for("every good row and every reject", Duration::from_secs(120), |d| {
        let s = d.status();
        let (rows, rejected) = (s["tables"]["DeviceFileEvents"]["rows"].as_u64(), s["rejected"].as_u64());
        if rows == Some(want_rows) && rejected == Some(total_rejects) {
            Ok(())
        } else {
            Err(format!("{rows:?} rows (want {want_rows}), {rejected:?} rejected (want {total_rejects})"))
        }
    });
    // Give it another look or two: nothing more may arrive.
    std::thread::sleep(Duration::from_millis(600));
    let s = d.status();
    assert_eq!(s["tables"]["DeviceFileEvents"]["rows"].as_u64(), Some(want_rows));
    let got: BTreeMap<String, u64> =
        s["rejected_by_reason"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect();
    assert_eq!(got, want_rejects, "rejects by reason");
    assert_eq!(s["duplicates_skipped"].as_u64(), Some(0));

    let metrics = d.metrics();
    assert_eq!(metric(&metrics, "lookout_files_skipped{reason=\"symlink\"}"), Some(2.0), "{metrics}");
    assert_eq!(metric(&metrics, "lookout_files_skipped{reason=\"not_a_regular_file\"}"), Some(2.0), "{metrics}");
    assert_eq!(metric(&metrics, "lookout_files_skipped{reason=\"unreadable_input\"}"), Some(1.0), "{metrics}");
    assert_eq!(metric(&metrics, "lookout_work_restarts_total"), Some(0.0), "{metrics}");
    let log = d.log_text();
    assert!(log.contains("DeviceFileEvents-corrupt.jsonl.gz") && log.contains("skipped until it changes"), "{log}");

    // Still up, and stops cleanly.
    let took = d.terminate(Duration::from_secs(10));
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");

    // The kept-aside records name file, line and reason.
    let out = lookout_ok(&data, &["status", "--rejects", "100"]);
    assert!(out.contains("DeviceFileEvents-truncated_json.jsonl:2 (offset"), "{out}");
    assert!(out.contains("line_too_long"), "{out}");
    // Each table's rows under their heading.
    assert!(out.contains("\ntables:\n  DeviceFileEvents: "), "{out}");
}

/// A file Lookout may not read is skipped with its reason, and the rest goes on. Root
/// reads every file whatever its mode, so when the tests run as root (CI does) the
/// daemon runs as an unprivileged user, as it would in production (the README's systemd
/// unit runs it as `lookout`).
/// As root, what an unprivileged user (`NOBODY`) needs to run Lookout here: a copy of
/// the binary it can reach, `root` and `logs` it can enter and read, `logs`' readable
/// file `DeviceFileEvents-ok.jsonl`, and `data`, a directory of its own. Returns the
/// binary.
fn open_to_nobody(root: &Path, logs: &Path, data: &Path) -> PathBuf {
    let bin = lookout_bin_for_everyone(&root.join("bin"));
    for dir in [root, logs] {
        std::fs::set_permissions(dir, Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(logs.join("DeviceFileEvents-ok.jsonl"), Permissions::from_mode(0o644)).unwrap();
    std::fs::create_dir(data).unwrap();
    std::os::unix::fs::chown(data, Some(NOBODY), Some(NOBODY)).unwrap();
    bin
}

#[test]
fn unreadable_file_is_skipped_and_the_rest_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let logs = root.join("logs");
    std::fs::create_dir(&logs).unwrap();
    std::fs::write(logs.join("DeviceFileEvents-ok.jsonl"), good()).unwrap();
    let secret = logs.join("DeviceFileEvents-secret.jsonl");
    std::fs::write(&secret, good()).unwrap();
    std::fs::set_permissions(&secret, Permissions::from_mode(0o000)).unwrap();
    let data = root.join("data");
    let plugins = plugins_dir(root, &[]);
    let mut spec = DaemonSpec::new(&data).logs(&logs).plugins(&plugins).log(&root.join("daemon.log"));
    if is_root() {
        // Everything the daemon needs is open to it, except the secret file (root's, mode
        // 0). The plugins folder stays root's, which the guard accepts.
        let bin = open_to_nobody(root, &logs, &data);
        spec = spec.binary(&bin).user(NOBODY, NOBODY);
    }
    let mut d = spec.start();
    // The rows are committed during a look at the folder, the skipped files counted in
    // /metrics at its end: wait for both.
    d.wait_for("the readable row, and the unreadable file counted", Duration::from_secs(30), |d| {
        let rows = d.status()["tables"]["DeviceFileEvents"]["rows"].as_u64();
        assert!(rows <= Some(1), "the unreadable file was read: {rows:?} rows");
        let skipped = metric(&d.metrics(), "lookout_files_skipped{reason=\"unreadable\"}");
        if rows == Some(1) && skipped == Some(1.0) {
            Ok(())
        } else {
            Err(format!("{rows:?} rows, {skipped:?} files skipped as unreadable"))
        }
    });
    // The secret file was listed, and refused by the system, not by a rule of Lookout's.
    let log = d.log_text();
    assert!(log.contains("DeviceFileEvents-secret.jsonl") && log.contains("Permission denied"), "{log}");
    d.terminate(Duration::from_secs(10));
    assert_eq!(table_rows(&data, "DeviceFileEvents"), 1);
}

/// A plugins folder that passes the guard (its owner's, not writable by others) but
/// cannot be listed by the daemon's user: the detectors do not run, and the logs are
/// still read. Before, every look failed and the daemon restarted its work loop forever
/// without storing a row. As root the daemon runs as an unprivileged user (see above)
/// and the folder is root's, mode 0711; otherwise the folder is the user's, mode 0311.
#[test]
fn a_plugins_folder_that_cannot_be_listed_stops_detectors_not_ingestion() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let logs = root.join("logs");
    std::fs::create_dir(&logs).unwrap();
    std::fs::write(logs.join("DeviceFileEvents-ok.jsonl"), good()).unwrap();
    let data = root.join("data");
    let plugins = plugins_dir(root, &[WINRM]);
    let mut spec = DaemonSpec::new(&data).logs(&logs).plugins(&plugins).log(&root.join("daemon.log"));
    if is_root() {
        let bin = open_to_nobody(root, &logs, &data);
        std::fs::set_permissions(&plugins, Permissions::from_mode(0o711)).unwrap();
        spec = spec.binary(&bin).user(NOBODY, NOBODY);
    } else {
        std::fs::set_permissions(&plugins, Permissions::from_mode(0o311)).unwrap();
    }
    let mut d = spec.rescan_secs(0.2).start();
    d.wait_for("the row stored", Duration::from_secs(30), |d| {
        match d.status()["tables"]["DeviceFileEvents"]["rows"].as_u64() {
            Some(1) => Ok(()),
            rows => Err(format!("{rows:?} rows")),
        }
    });
    std::thread::sleep(Duration::from_millis(600));
    let log = d.log_text();
    assert!(log.contains("plugins folder cannot be listed"), "{log}");
    assert!(!log.contains("work loop failed"), "{log}");
    d.terminate(Duration::from_secs(10));
    std::fs::set_permissions(&plugins, Permissions::from_mode(0o755)).unwrap();
}

/// A folder given to `lookout ingest` that holds a folder it cannot list: the rest is
/// read and committed, the unlisted folder is named, and the exit status is 1 (its
/// files were never read). As root, `ingest` runs as an unprivileged user (see above).
#[test]
fn a_folder_that_cannot_be_listed_makes_ingest_fail_after_reading_the_rest() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let logs = root.join("logs");
    std::fs::create_dir_all(logs.join("closed")).unwrap();
    std::fs::write(logs.join("DeviceFileEvents-ok.jsonl"), good()).unwrap();
    std::fs::write(logs.join("closed").join("DeviceFileEvents-hidden.jsonl"), good()).unwrap();
    let data = root.join("data");
    let mut cmd = std::process::Command::new(lookout_bin());
    if is_root() {
        cmd = std::process::Command::new(open_to_nobody(root, &logs, &data));
        cmd.uid(NOBODY).gid(NOBODY);
    }
    std::fs::set_permissions(logs.join("closed"), Permissions::from_mode(0o000)).unwrap();
    let out = cmd.arg("--data").arg(&data).args(["ingest", "--retention", "none"]).arg(&logs).output().unwrap();
    std::fs::set_permissions(logs.join("closed"), Permissions::from_mode(0o755)).unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("closed: cannot list"), "{stdout}");
    assert!(stderr.contains("1 folder(s) could not be listed"), "{stderr}");
    assert_eq!(table_rows(&data, "DeviceFileEvents"), 1);
}
