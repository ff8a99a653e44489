//! A full disk under the data directory stops ingestion cleanly — no corruption, the
//! daemon stays up and observable — and ingestion resumes, losing nothing, when space
//! returns.
//!
//! Each test needs a small filesystem of its own, a tmpfs it mounts, which takes root
//! with CAP_SYS_ADMIN (a container may not have it). So the tests are `#[ignore]`d and
//! `.ci/run` runs them (`cargo test -p lookout-cli --test disk_full -- --ignored`) where
//! a tmpfs can be mounted; run that way, a failed mount fails the test.

use lookout_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const NOW: &str = "2025-05-08T00:00:00Z";

/// A tmpfs mounted for the test, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    /// A tmpfs of `size` at `at`.
    fn tmpfs(at: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} (this test needs root with CAP_SYS_ADMIN): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount(at.to_path_buf())
    }

    /// Fills the file system with one file until `leave` bytes are free; returns the file.
    fn fill_leaving(&self, leave: u64) -> PathBuf {
        let filler = self.0.join("filler");
        let fill = free_bytes(&self.0).saturating_sub(leave);
        std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();
        filler
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df").arg("--output=avail").arg("-B1").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap()
}

#[test]
#[ignore = "mounts a tmpfs: needs root with CAP_SYS_ADMIN; .ci/run runs it where it can"]
fn disk_full_stops_ingestion_cleanly_and_it_resumes_when_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let mount = Mount::tmpfs(&tmp.path().join("datafs"), "96m");
    let fleet = gen_fleet(tmp.path(), 12000, 12, 1);
    let plugins = plugins_dir(tmp.path(), &[WINRM]);

    // Leave a few MiB: enough to start, not enough for the fleet.
    let filler = mount.fill_leaving(4 << 20);
    let data = mount.0.join("data");
    let mut d = DaemonSpec::new(&data)
        .logs(&fleet.logs)
        .plugins(&plugins)
        .now(NOW)
        .rescan_secs(0.2)
        .log(&tmp.path().join("daemon.log"))
        .start();
    // Either the daemon sees the disk nearly full and pauses, or a write fails and the work
    // loop restarts; both stop ingestion cleanly.
    d.wait_for("the disk to fill up and ingestion to stop", Duration::from_secs(120), |d| {
        let m = d.metrics();
        let (low, restarts) = (metric(&m, "lookout_disk_space_low"), metric(&m, "lookout_work_restarts_total"));
        if low == Some(1.0) || restarts.is_some_and(|n| n >= 1.0) {
            Ok(())
        } else {
            Err(format!("lookout_disk_space_low {low:?}, lookout_work_restarts_total {restarts:?}"))
        }
    });
    // Still up and answering while the disk is full.
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.exit_status().is_none(), "the daemon exited on a full disk:\n{}", d.log_text());
    assert!(d.get("/metrics").is_some(), "the endpoint went away");
    let log = d.log_text();
    // Paused before writing (the usual way), or a write that found the disk full.
    assert!(
        log.contains("disk space low: ingestion and detection paused") || log.contains("No space left on device"),
        "{log}"
    );

    std::fs::remove_file(&filler).unwrap();
    d.wait_for("everything once space is back", Duration::from_secs(300), |d| {
        let s = d.try_status().ok_or("no /status answer")?;
        let (rows, findings) = (table_counts(&s), s["findings"].as_u64());
        if rows == fleet.counts && findings == Some(fleet.truth.len() as u64) {
            Ok(())
        } else {
            Err(format!("rows {rows:?}, findings {findings:?}"))
        }
    });
    let s = d.status();
    assert_eq!(s["rejected"].as_u64(), Some(0), "{s}");
    let m = d.metrics();
    assert_eq!(metric(&m, "lookout_disk_space_low"), Some(0.0), "not paused any more:\n{m}");
    d.terminate(Duration::from_secs(10));
    let lines = read_jsonl(&data.join("findings.jsonl"));
    let ids: std::collections::BTreeSet<&str> = lines.iter().map(|l| l["finding_id"].as_str().unwrap()).collect();
    assert_eq!(lines.len(), fleet.truth.len(), "findings in the JSONL");
    assert_eq!(ids.len(), lines.len(), "a finding line is duplicated");
    drop(mount);
}

/// Makes the store of `data` (an ingest of nothing).
fn make_store(data: &Path) {
    let empty = data.with_extension("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    lookout_ok(data, &["ingest", "--now", NOW, empty.to_str().unwrap()]);
}

/// `lookout ingest` on a nearly full disk stops before writing, says why, and loses
/// nothing: run again with room, it stores every row once.
#[test]
#[ignore = "mounts a tmpfs: needs root with CAP_SYS_ADMIN; .ci/run runs it where it can"]
fn one_shot_ingest_stops_before_the_disk_is_full_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let mount = Mount::tmpfs(&tmp.path().join("datafs"), "64m");
    let fleet = gen_fleet(tmp.path(), 3000, 12, 1);
    let rows = fleet.rows();
    let data = mount.0.join("data");
    let logs = fleet.logs.clone();
    // Make the store first (so it exists), then leave less than the 16 MiB Lookout needs.
    make_store(&data);
    let filler = mount.fill_leaving(8 << 20);
    let out = lookout(&data, &["ingest", "--now", NOW, logs.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ingest on a nearly full disk must fail:\n{stderr}");
    assert!(stderr.contains("MiB free") && stderr.contains("nothing is lost"), "{stderr}");
    std::fs::remove_file(&filler).unwrap();
    let out = lookout_ok(&data, &["ingest", "--now", NOW, logs.to_str().unwrap()]);
    let status = status_json(&data);
    let stored: u64 = status["tables"].as_object().unwrap().values().map(|t| t["rows"].as_u64().unwrap()).sum();
    // The fleet's near misses include a write older than the default retention (31 days).
    let expired = status["expired"].as_u64().unwrap_or(0);
    assert_eq!(stored + expired, rows, "{out}");
    assert!(out.contains(&format!("expired: {expired}")) || expired == 0, "{out}");
    assert_eq!(status["duplicates_skipped"].as_u64(), Some(0), "{status}");
    drop(mount);
}

/// The same for a JSON array export (read element by element, not as lines): nothing is
/// committed on a nearly full disk, and with room every element is stored once.
#[test]
#[ignore = "mounts a tmpfs: needs root with CAP_SYS_ADMIN; .ci/run runs it where it can"]
fn an_array_export_is_not_committed_on_a_nearly_full_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let mount = Mount::tmpfs(&tmp.path().join("datafs"), "64m");
    let export = tmp.path().join("DeviceProcessEvents-export.json");
    let elements: Vec<String> = (0..20_000)
        .map(|i| {
            format!(r#"{{"Timestamp":"2025-05-07T10:00:00Z","DeviceId":"d{}","ReportId":{i},"ActionType":"x"}}"#, i % 7)
        })
        .collect();
    std::fs::write(&export, format!("[{}]", elements.join(","))).unwrap();
    let data = mount.0.join("data");
    make_store(&data);
    let filler = mount.fill_leaving(8 << 20);
    let out = lookout(&data, &["ingest", "--now", NOW, export.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ingest on a nearly full disk must fail:\n{stderr}");
    assert!(stderr.contains("MiB free") && stderr.contains("nothing is lost"), "{stderr}");
    std::fs::remove_file(&filler).unwrap();
    lookout_ok(&data, &["ingest", "--now", NOW, export.to_str().unwrap()]);
    let status = status_json(&data);
    let stored: u64 = status["tables"].as_object().unwrap().values().map(|t| t["rows"].as_u64().unwrap()).sum();
    assert_eq!(stored, 20_000, "{status}");
    assert_eq!(status["duplicates_skipped"].as_u64(), Some(0), "{status}");
    drop(mount);
}
