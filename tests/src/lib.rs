//! Shared helpers for Lookout's end-to-end tests: where the built binary and plugin
//! libraries are, running the binary, generated fleets and small fixtures. The daemon
//! harness (`lookout run` as a child process) is in [`daemon`], the test collector that
//! writes and rotates log files in [`collector`], the in-process harness of the detectors'
//! property and golden tests (ticks of rows through a store) in [`ticks`].

pub mod collector;
pub mod daemon;
pub mod ticks;

pub use collector::{Collector, Rotation, Stream, Tally};
pub use daemon::{http_get, metric, poll_until, wait_for, Daemon, DaemonSpec};

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>`, found from the running test executable (`target/<profile>/deps/…`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// The `lookout` binary built by `cargo test --workspace`.
pub fn lookout_bin() -> PathBuf {
    let p = target_dir().join("lookout");
    assert!(
        p.is_file(),
        "{} is missing: run the tests with `cargo test --workspace` (or `-p lookout-cli`), which builds it",
        p.display()
    );
    p
}

/// A plugin library (`liblookout_winrm.so`, `liblookout_fixture_panics.so`, …) built as a
/// dependency of this crate.
pub fn plugin_lib(file: &str) -> PathBuf {
    let t = target_dir();
    for p in [t.join("deps").join(file), t.join(file)] {
        if p.is_file() {
            return p;
        }
    }
    panic!("{file} not found under {}; it is built by `cargo test --workspace`", t.display())
}

pub const WINRM: &str = "liblookout_winrm.so";
pub const SCHEDULED_TASK: &str = "liblookout_scheduled_task_persistence.so";
pub const SCM_REMOTE: &str = "liblookout_scm_remote_process.so";
pub const PASSWORD_SPRAYING: &str = "liblookout_password_spraying.so";
pub const FIXTURE_PANICS: &str = "liblookout_fixture_panics.so";
pub const FIXTURE_ERRORS: &str = "liblookout_fixture_errors.so";
pub const FIXTURE_WRONG_ABI: &str = "liblookout_fixture_wrong_abi.so";
pub const FIXTURE_NOT_A_PLUGIN: &str = "liblookout_fixture_not_a_plugin.so";

/// A plugins folder with the given libraries copied in, with safe permissions.
pub fn plugins_dir(root: &Path, libs: &[&str]) -> PathBuf {
    let dir = root.join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for lib in libs {
        let dst = dir.join(lib);
        std::fs::copy(plugin_lib(lib), &dst).unwrap();
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    dir
}

/// Runs `lookout --data <data> <args…>` and returns its output.
pub fn lookout(data: &Path, args: &[&str]) -> Output {
    Command::new(lookout_bin()).arg("--data").arg(data).args(args).output().expect("run lookout")
}

/// The last `n` bytes (about: never mid-character) of `text`, for failure messages.
pub fn text_tail(text: &str, n: usize) -> &str {
    let start = text.len().saturating_sub(n);
    let start = (start..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
    &text[start..]
}

/// What a command run by [`run_bounded`] did.
pub struct Bounded {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

/// Runs `cmd` (stdin closed) and waits at most `timeout` for it to exit by itself; kills it
/// and fails the test after that, showing what it printed. Output goes to anonymous
/// files, so a chatty command never blocks on a full pipe.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Bounded {
    let mut out = tempfile::tempfile().expect("stdout file");
    let mut err = tempfile::tempfile().expect("stderr file");
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().expect("stdout file")))
        .stderr(Stdio::from(err.try_clone().expect("stderr file")))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let read = |f: &mut std::fs::File| {
        let mut bytes = Vec::new();
        f.rewind().and_then(|()| f.read_to_end(&mut bytes)).expect("read the command's output");
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}", read(&mut out), read(&mut err));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Bounded { status, took: started.elapsed(), stdout: read(&mut out), stderr: read(&mut err) }
}

/// Like [`lookout`], but fails the test unless the command succeeds; returns stdout.
pub fn lookout_ok(data: &Path, args: &[&str]) -> String {
    let out = lookout(data, args);
    assert!(
        out.status.success(),
        "lookout {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `lookout status --json`, parsed.
pub fn status_json(data: &Path) -> serde_json::Value {
    serde_json::from_str(&lookout_ok(data, &["status", "--json"])).expect("status --json is JSON")
}

/// Rows stored for `table` according to `status --json`.
pub fn table_rows(data: &Path, table: &str) -> u64 {
    status_json(data)["tables"][table]["rows"].as_u64().unwrap_or(0)
}

/// The kqlbench exports vendored in the repository (`tests/data/kqlbench`, MIT).
pub fn kqlbench_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/kqlbench");
    assert!(dir.join("DeviceFileEvents.json").is_file(), "kqlbench data missing from {}", dir.display());
    dir
}

/// The findings JSONL lines of a file.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).expect("findings line is JSON")).collect()
}

/// The complete lines of a findings JSONL a daemon may be appending to (a torn last line
/// is still being written).
pub fn complete_findings(path: &Path) -> Vec<Value> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    String::from_utf8(bytes[..end].to_vec())
        .expect("findings are UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a findings line is not JSON ({e}): {l}")))
        .collect()
}

/// Rows per table in a `status --json` (or `/status`) answer.
pub fn table_counts(status: &Value) -> BTreeMap<String, u64> {
    status["tables"]
        .as_object()
        .map(|t| t.iter().map(|(k, v)| (k.clone(), v["rows"].as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Generated fleets and their ground truth
// ---------------------------------------------------------------------------------------

/// The WinRM rule's tables among those `lookout gen` writes, in the order the clean runs
/// ingest them (the fleet also has the detector pack's tables).
pub const FLEET_TABLES: [&str; 3] = ["FileProfile", "DeviceImageLoadEvents", "DeviceFileEvents"];

/// An attack of the ground truth, or a finding: (DeviceId, load ReportId, write ReportId).
pub type Pair = (String, i64, i64);

/// A fleet written by `lookout gen`.
pub struct Fleet {
    /// `<root>/fleet`, holding `ground-truth.json` and `logs/`.
    pub dir: PathBuf,
    pub logs: PathBuf,
    /// Lines per table.
    pub counts: BTreeMap<String, u64>,
    pub truth: BTreeSet<Pair>,
}

impl Fleet {
    /// The generated file of `table`.
    pub fn read(&self, table: &str) -> Vec<u8> {
        let path = self.logs.join(format!("{table}.jsonl"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Rows in all tables.
    pub fn rows(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// `lookout gen --out <root>/fleet --events <events> --attacks <attacks> --seed <seed>`.
pub fn gen_fleet(root: &Path, events: u64, attacks: u64, seed: u64) -> Fleet {
    let dir = root.join("fleet");
    lookout_ok(
        &root.join("gen-data"),
        &[
            "gen",
            "--out",
            dir.to_str().expect("UTF-8 path"),
            "--events",
            &events.to_string(),
            "--attacks",
            &attacks.to_string(),
            "--seed",
            &seed.to_string(),
        ],
    );
    let logs = dir.join("logs");
    // Every table the generator wrote (the WinRM rule's and the detector pack's).
    let counts = std::fs::read_dir(&logs)
        .expect("generated logs folder")
        .map(|e| {
            let path = e.expect("generated log file").path();
            let table = path.file_stem().and_then(|s| s.to_str()).expect("table file name").to_string();
            let bytes = std::fs::read(&path).expect("generated table");
            (table, bytes.iter().filter(|b| **b == b'\n').count() as u64)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    let truth = truth_pairs(&dir.join("ground-truth.json"));
    assert!(attacks == 0 || !truth.is_empty(), "the generated fleet has no attacks in its ground truth");
    Fleet { dir, logs, counts, truth }
}

/// The attacks listed in a generator's `ground-truth.json`.
pub fn truth_pairs(path: &Path) -> BTreeSet<Pair> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let truth: Vec<Value> = serde_json::from_slice(&bytes).expect("ground truth is JSON");
    truth
        .iter()
        .map(|t| {
            (
                t["device_id"].as_str().expect("device_id").to_string(),
                t["load_report_id"].as_i64().expect("load_report_id"),
                t["write_report_id"].as_i64().expect("write_report_id"),
            )
        })
        .collect()
}

/// The attack a finding line reports: its join row's device, load and write.
pub fn finding_pair(f: &Value) -> Pair {
    let row = &f["row"];
    (
        row["DeviceId"].as_str().unwrap_or_else(|| panic!("finding without row.DeviceId: {f}")).to_string(),
        row["ReportId"].as_i64().unwrap_or_else(|| panic!("finding without row.ReportId: {f}")),
        row["ReportId1"].as_i64().unwrap_or_else(|| panic!("finding without row.ReportId1: {f}")),
    )
}

// ---------------------------------------------------------------------------------------
// Running as another user
// ---------------------------------------------------------------------------------------

/// The unprivileged user (and group) tests run Lookout as when they are root: `nobody`
/// on Debian and most distributions; it needs no passwd entry to be used.
pub const NOBODY: u32 = 65534;

/// Whether the tests run as root (CI does), which reads every file whatever its mode.
pub fn is_root() -> bool {
    // std has no geteuid; `/proc/self` belongs to the process's effective user.
    let me = std::fs::metadata("/proc/self").expect("/proc/self (the tests need Linux)");
    std::os::unix::fs::MetadataExt::uid(&me) == 0
}

/// A copy of the `lookout` binary that any user can run, in `dir` (made searchable by
/// everyone; its parents must be too): the build's own folder may sit under a home
/// directory other users cannot enter.
pub fn lookout_bin_for_everyone(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create the binary's folder");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod the binary's folder");
    let copy = dir.join("lookout");
    std::fs::copy(lookout_bin(), &copy).expect("copy the lookout binary");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod the binary");
    copy
}

/// xorshift64*: cheap, reproducible randomness for the test collectors and kill
/// schedules (the same seed gives the same run).
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Never the all-zero state, and seeds close to each other still differ.
        Rng((seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}
