//! A full disk under the data directory stops ingestion cleanly — no corruption, the
//! daemon stays up and observable — and ingestion resumes, losing nothing, when space
//! returns. Needs a small filesystem of its own: a tmpfs mount (root only; skipped
//! otherwise, with a message).

use lookout_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const NOW: &str = "2025-05-08T00:00:00Z";

/// A tmpfs mounted for the test, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    /// A tmpfs of `size` at `at`; `None` (and a note on stderr) where mounting needs a
    /// privilege this run does not have, and the test is skipped.
    fn tmpfs(at: &Path, size: &str) -> Option<Mount> {
        let mounted = std::fs::create_dir_all(at).is_ok()
            && Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(at)
                .status()
                .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipping: cannot mount a tmpfs here (needs root)");
        }
        mounted.then(|| Mount(at.to_path_buf()))
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

fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

#[test]
fn disk_full_stops_ingestion_cleanly_and_it_resumes_when_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mount) = Mount::tmpfs(&tmp.path().join("datafs"), "96m") else { return };
    let fleet = tmp.path().join("fleet");
    lookout_ok(
        &tmp.path().join("gen"),
        &["gen", "--out", fleet.to_str().unwrap(), "--events", "12000", "--attacks", "12"],
    );
    let truth: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fleet.join("ground-truth.json")).unwrap()).unwrap();
    let count = |f: &str| std::fs::read_to_string(fleet.join("logs").join(f)).unwrap().lines().count() as u64;
    let (profiles, loads, writes) =
        (count("FileProfile.jsonl"), count("DeviceImageLoadEvents.jsonl"), count("DeviceFileEvents.jsonl"));
    let plugins = plugins_dir(tmp.path(), &[WINRM]);

    // Leave a few MiB: enough to start, not enough for the fleet.
    let filler = mount.fill_leaving(4 << 20);
    let data = mount.0.join("data");
    let mut d = Daemon::start(
        &data,
        &[
            "--logs",
            fleet.join("logs").to_str().unwrap(),
            "--plugins",
            plugins.to_str().unwrap(),
            "--now",
            NOW,
            "--ingest-now",
            NOW,
            "--rescan-secs",
            "0.2",
        ],
    );
    // Either the daemon sees the disk nearly full and pauses, or a write fails and the work
    // loop restarts; both stop ingestion cleanly.
    d.wait_for("the disk to fill up and ingestion to stop", Duration::from_secs(120), |d| {
        d.get("/metrics").is_some_and(|m| {
            metric(&m, "lookout_disk_space_low") == Some(1.0)
                || metric(&m, "lookout_work_restarts_total").is_some_and(|n| n >= 1.0)
        })
    });
    // Still up and answering while the disk is full.
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon exited on a full disk:\n{}", d.stderr());
    assert!(d.get("/metrics").is_some(), "the endpoint went away");
    assert!(d.stderr().contains("No space left on device") || d.stderr().contains("space"), "{}", d.stderr());

    std::fs::remove_file(&filler).unwrap();
    d.wait_for("everything once space is back", Duration::from_secs(300), |d| {
        let Some(body) = d.get("/status") else { return false };
        let s: serde_json::Value = serde_json::from_str(&body).unwrap();
        s["tables"]["FileProfile"]["rows"].as_u64() == Some(profiles)
            && s["tables"]["DeviceImageLoadEvents"]["rows"].as_u64() == Some(loads)
            && s["tables"]["DeviceFileEvents"]["rows"].as_u64() == Some(writes)
            && s["findings"].as_u64() == Some(truth.len() as u64)
    });
    let s = d.status();
    assert_eq!(s["rejected"].as_u64(), Some(0), "{s}");
    let m = d.get("/metrics").unwrap_or_default();
    assert_eq!(metric(&m, "lookout_disk_space_low"), Some(0.0), "not paused any more:\n{m}");
    let (status, _) = d.terminate(Duration::from_secs(10));
    assert!(status.success());
    let lines = read_jsonl(&data.join("findings.jsonl"));
    let ids: std::collections::BTreeSet<&str> = lines.iter().map(|l| l["finding_id"].as_str().unwrap()).collect();
    assert_eq!(lines.len(), truth.len(), "findings in the JSONL");
    assert_eq!(ids.len(), lines.len(), "a finding line is duplicated");
    drop(mount);
}

/// `lookout ingest` on a nearly full disk stops before writing, says why, and loses
/// nothing: run again with room, it stores every row once.
#[test]
fn one_shot_ingest_stops_before_the_disk_is_full_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mount) = Mount::tmpfs(&tmp.path().join("datafs"), "64m") else { return };
    let fleet = tmp.path().join("fleet");
    lookout_ok(&tmp.path().join("gen"), &["gen", "--out", fleet.to_str().unwrap(), "--events", "3000"]);
    let rows: u64 = ["FileProfile.jsonl", "DeviceImageLoadEvents.jsonl", "DeviceFileEvents.jsonl"]
        .iter()
        .map(|f| std::fs::read_to_string(fleet.join("logs").join(f)).unwrap().lines().count() as u64)
        .sum();
    let data = mount.0.join("data");
    let logs = fleet.join("logs");
    // Open the store first (so it exists), then leave less than the 16 MiB Lookout needs.
    lookout_ok(&data, &["status"]);
    let filler = mount.fill_leaving(8 << 20);
    let out = lookout(&data, &["ingest", "--now", NOW, logs.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ingest on a nearly full disk must fail:\n{stderr}");
    assert!(stderr.contains("MiB free") && stderr.contains("nothing is lost"), "{stderr}");
    std::fs::remove_file(&filler).unwrap();
    let out = lookout_ok(&data, &["ingest", "--now", NOW, logs.to_str().unwrap()]);
    let status = status_json(&data);
    let stored: u64 = status["tables"].as_object().unwrap().values().map(|t| t["rows"].as_u64().unwrap()).sum();
    assert_eq!(stored, rows, "{out}");
    assert_eq!(status["duplicates_skipped"].as_u64(), Some(0), "{status}");
    drop(mount);
}
