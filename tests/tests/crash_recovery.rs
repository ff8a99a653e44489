//! Killing the process at the worst moments (an injected abort, as abrupt as kill -9)
//! and running it again: every row stored once, every finding in the results tree and
//! the JSONL exactly once.

use lookout_tests::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const NOW: &str = "2025-05-08T00:00:00Z";

fn gen_fleet(dir: &Path, events: usize) -> usize {
    let data = dir.join("unused");
    let events = events.to_string();
    lookout_ok(&data, &["gen", "--out", dir.join("fleet").to_str().unwrap(), "--events", &events, "--attacks", "12"]);
    let truth: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("fleet/ground-truth.json")).unwrap()).unwrap();
    truth.len()
}

fn run_with_failpoint(data: &Path, failpoint: &str, args: &[&str]) -> std::process::Output {
    Command::new(lookout_bin()).arg("--data").arg(data).args(args).env("LOOKOUT_FAILPOINT", failpoint).output().unwrap()
}

fn finding_ids(lines: &[serde_json::Value]) -> Vec<String> {
    lines.iter().map(|f| f["finding_id"].as_str().unwrap().to_string()).collect()
}

fn assert_exactly_once(data: &Path, expected: usize) {
    let lines = read_jsonl(&data.join("findings.jsonl"));
    let ids = finding_ids(&lines);
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), distinct.len(), "a finding appears twice in the JSONL");
    assert_eq!(ids.len(), expected, "findings in the JSONL");
    let tree: Vec<serde_json::Value> =
        lookout_ok(data, &["findings", "--json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let tree_ids: BTreeSet<String> = finding_ids(&tree).into_iter().collect();
    assert_eq!(tree.len(), tree_ids.len(), "a finding is twice in the results tree");
    assert_eq!(tree_ids, distinct.into_iter().cloned().collect::<BTreeSet<_>>(), "results tree and JSONL differ");
}

/// A generated fleet with findings to write, ingested into `<dir>/data`, and a plugins
/// folder with the WinRM detector: (the findings expected, the data directory, the
/// plugins folder).
fn fleet_ingested(dir: &Path) -> (usize, std::path::PathBuf, std::path::PathBuf) {
    let expected = gen_fleet(dir, 3000);
    assert!(expected >= 2, "the fleet needs findings to write: {expected}");
    let data = dir.join("data");
    let plugins = plugins_dir(dir, &[WINRM]);
    lookout_ok(&data, &["ingest", "--now", NOW, dir.join("fleet/logs").to_str().unwrap()]);
    (expected, data, plugins)
}

/// Each finding once among the findings in `files`, and all `expected` of them.
fn assert_once_in(files: &[&Path], expected: usize, what: &str) {
    let mut ids = Vec::new();
    for f in files {
        let lines: Vec<serde_json::Value> =
            read_jsonl(f).into_iter().filter(|v| v.get("finding_id").is_some()).collect();
        ids.extend(finding_ids(&lines));
    }
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), distinct.len()), (expected, expected), "{what}: each finding once");
}

#[test]
fn killed_during_detect_then_rerun_leaves_each_finding_once() {
    for failpoint in ["detect-before-commit", "detect-after-commit", "outbox-mid-write", "outbox-after-write"] {
        let tmp = tempfile::tempdir().unwrap();
        let (expected, data, plugins) = fleet_ingested(tmp.path());
        let detect = ["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW];
        let crashed = run_with_failpoint(&data, failpoint, &detect);
        assert!(!crashed.status.success(), "{failpoint}: the failpoint did not fire");
        assert!(String::from_utf8_lossy(&crashed.stderr).contains(failpoint));
        if failpoint == "outbox-mid-write" {
            let torn = read_jsonl(&data.join("findings.jsonl"));
            assert_eq!(torn.len(), 1, "the crash left a partial JSONL behind");
        }
        lookout_ok(&data, &detect);
        assert_exactly_once(&data, expected);
        // And once more, for good measure: nothing changes.
        lookout_ok(&data, &detect);
        assert_exactly_once(&data, expected);
    }
}

/// The findings file copytruncated (copied away, then cut to nothing, as logrotate's
/// `copytruncate` does) while Lookout is writing into it: the lines after the cut start
/// the file again — no hole of NUL bytes where the cut-off lines were —, and each
/// finding is once in the copy or the file. Also when a line was appended between the
/// copy and the cut (in neither file): it is written again.
#[test]
fn findings_file_truncated_mid_write_gets_no_hole_and_loses_nothing() {
    for line_after_the_copy in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let (expected, data, plugins) = fleet_ingested(tmp.path());
        let findings = data.join("findings.jsonl");
        let mut child = Command::new(lookout_bin())
            .arg("--data")
            .arg(&data)
            .args(["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW])
            .env("LOOKOUT_FAILPOINT", "outbox-pause-mid-write")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stopped = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('T')))
                .unwrap_or(false)
        };
        let started = std::time::Instant::now();
        while !stopped(child.id()) {
            assert!(child.try_wait().unwrap().is_none(), "detect ended without reaching the failpoint");
            assert!(started.elapsed() < std::time::Duration::from_secs(60), "the failpoint was not hit");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Paused with its first line written.
        let mut copied = std::fs::read(&findings).unwrap();
        assert!(copied.ends_with(b"\n"), "the pause comes after a whole line");
        if line_after_the_copy {
            let last_start = copied[..copied.len() - 1].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            copied.truncate(last_start);
        }
        // Where logrotate puts it: beside the file.
        let copy = data.join("findings.jsonl.1");
        std::fs::write(&copy, &copied).unwrap();
        std::fs::OpenOptions::new().write(true).open(&findings).unwrap().set_len(0).unwrap();
        assert!(Command::new("kill").args(["-CONT", &child.id().to_string()]).status().unwrap().success());
        assert!(child.wait().unwrap().success());
        let bytes = std::fs::read(&findings).unwrap();
        assert!(!bytes.contains(&0), "a hole of NUL bytes in the findings file: {} bytes", bytes.len());
        assert_once_in(
            &[&copy, &findings],
            expected,
            &format!("line after the copy: {line_after_the_copy}: in the copy or the file"),
        );
    }
}

/// Killed after writing its findings and before recording that it did, then the file is
/// copytruncated (copied away, cut to nothing) before the rerun: the lines written then
/// are in the copy, and the rerun does not write them again. Both with the file empty
/// before the run and with a line of another tool's in it.
#[test]
fn killed_after_writing_then_copytruncated_writes_each_finding_once() {
    for foreign in [None, Some("{\"note\":\"another tool's line\"}\n")] {
        let tmp = tempfile::tempdir().unwrap();
        let (expected, data, plugins) = fleet_ingested(tmp.path());
        let findings = data.join("findings.jsonl");
        if let Some(line) = foreign {
            std::fs::write(&findings, line).unwrap();
        }
        let detect = ["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW];
        let crashed = run_with_failpoint(&data, "outbox-after-write", &detect);
        assert!(!crashed.status.success(), "the failpoint did not fire");
        let copy = data.join("findings.jsonl.1");
        std::fs::copy(&findings, &copy).unwrap();
        std::fs::OpenOptions::new().write(true).open(&findings).unwrap().set_len(0).unwrap();
        lookout_ok(&data, &detect);
        assert_once_in(&[&copy, &findings], expected, &format!("{foreign:?}: in the copy or the file"));
    }
}

/// A second data directory over the same logs writing into the findings file the first
/// one wrote (what to do when a store's format is refused): the findings already in the
/// file are not written again, and nothing else in it is touched.
#[test]
fn a_new_data_directory_writing_an_existing_findings_file_adds_nothing_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let (expected, first, plugins) = fleet_ingested(tmp.path());
    let second = tmp.path().join("second");
    lookout_ok(&second, &["ingest", "--now", NOW, tmp.path().join("fleet/logs").to_str().unwrap()]);
    let findings = tmp.path().join("out/findings.jsonl");
    for data in [first, second] {
        let detect =
            ["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW, "--findings", findings.to_str().unwrap()];
        lookout_ok(&data, &detect);
        assert_once_in(&[&findings], expected, &data.display().to_string());
    }
}

#[test]
fn killed_during_ingest_then_rerun_stores_each_row_once() {
    let tmp = tempfile::tempdir().unwrap();
    // Large enough for several 4096-row batches per file.
    gen_fleet(tmp.path(), 20_000);
    let fleet = tmp.path().join("fleet/logs");
    let clean = tmp.path().join("clean");
    lookout_ok(&clean, &["ingest", "--now", NOW, fleet.to_str().unwrap()]);
    let want = status_json(&clean)["tables"].clone();

    let data = tmp.path().join("data");
    // Each run dies after its first committed batch; re-running resumes from the offset.
    let mut crashes = 0;
    loop {
        let out = run_with_failpoint(
            &data,
            "ingest-after-commit",
            &["ingest", "--batch-rows", "4096", "--now", NOW, fleet.to_str().unwrap()],
        );
        if out.status.success() {
            break;
        }
        crashes += 1;
        assert!(crashes < 100, "ingest never finished");
    }
    assert!(crashes >= 2, "expected several crashes, got {crashes}");
    let s = status_json(&data);
    assert_eq!(s["tables"], want);
    assert_eq!(s["duplicates_skipped"], 0, "a resumed ingest re-read committed rows");
    assert_eq!(s["rejected"], 0);
}

/// A batch's rows on disk in their generation but the batch not committed, and the
/// store's upkeep steps — merging key-index runs, removing blocks past the retention
/// horizon, dropping key-index runs past it, dropping a generation — each one atomic
/// batch: killed in any of them, the next run finds the store as before the step and
/// finishes the work, with every row once and every count right.
#[test]
fn killed_during_store_upkeep_then_rerun_leaves_the_store_exact() {
    let tmp = tempfile::tempdir().unwrap();
    // Enough batches for key-index runs to be merged.
    gen_fleet(tmp.path(), 40_000);
    let fleet = tmp.path().join("fleet/logs");
    let fleet = fleet.to_str().unwrap();
    let clean = tmp.path().join("clean");
    lookout_ok(&clean, &["ingest", "--retention", "none", "--now", NOW, fleet]);
    let want = status_json(&clean);

    let data = tmp.path().join("data");
    // 1,024-row batches: about forty key-index runs, enough for a bulk ingest of this size
    // to merge them (eight at a time, on the merge thread).
    let ingest = ["ingest", "--batch-rows", "1024", "--retention", "none", "--now", NOW, fleet];
    // The first crash cuts the store's first batch short: its generation is not listed yet.
    // A merge is killed with its run's chunks written but not named, with the run named but
    // its inputs' chunks still there, and between. Then, with batches committed, a batch's
    // block frames are left past its (listed) generation's committed end.
    for failpoint in [
        "generation-written-before-commit",
        "runs-merge-chunks-written",
        "runs-merge-before-commit",
        "runs-merge-before-sweep",
        "blocks-appended-before-commit",
        "generation-written-before-commit",
    ] {
        let crashed = run_with_failpoint(&data, failpoint, &ingest);
        assert!(!crashed.status.success(), "{failpoint} did not fire");
        assert!(String::from_utf8_lossy(&crashed.stderr).contains(failpoint));
    }
    lookout_ok(&data, &ingest);
    let got = status_json(&data);
    assert_eq!(got["tables"], want["tables"], "rows after a crash in a merge");
    assert_eq!(got["duplicates_skipped"], 0, "a committed batch was read again");

    // Five days on, with an hour kept: every event row is past the horizon.
    let later = "2025-05-13T00:00:00Z";
    let expire = ["detect", "--retention", "1h", "--now", later, "--plugins", tmp.path().to_str().unwrap()];
    for failpoint in [
        "retention-before-commit",
        "runs-drop-before-commit",
        "generation-drop-before-commit",
        "generation-drop-before-delete",
    ] {
        let crashed = run_with_failpoint(&data, failpoint, &expire);
        assert!(!crashed.status.success(), "{failpoint} did not fire");
        assert!(String::from_utf8_lossy(&crashed.stderr).contains(failpoint));
    }
    lookout_ok(&data, &expire);
    lookout_ok(&clean, &expire);
    let (got, want) = (status_json(&data), status_json(&clean));
    let stored: u64 = ["DeviceFileEvents", "DeviceImageLoadEvents"]
        .iter()
        .map(|t| status_json(&tmp.path().join("clean"))["tables"][t]["rows"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(stored, 0, "every event row is past the horizon: {want}");
    assert_eq!(got["tables"], want["tables"], "rows kept after crashes in retention");
    assert_eq!(got["tables"]["FileProfile"]["rows"].as_u64().map(|n| n > 0), Some(true), "profiles are exempt");
    assert_eq!(got["removed"], want["removed"], "rows removed by retention");
    assert!(got["removed"].as_u64().unwrap_or(0) > 40_000, "{got}");
    // Every event row went, so did every generation: nothing is left on disk for them.
    let gens: Vec<_> =
        std::fs::read_dir(data.join("gens")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(gens.is_empty(), "generation folders left after every row expired: {gens:?}");
}
