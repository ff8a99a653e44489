//! Shared helpers for Lookout's end-to-end tests: where the built binary and plugin
//! libraries are, running the binary, and small fixtures.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
    let out = Command::new(lookout_bin()).arg("--data").arg(data).args(args).output().expect("run lookout");
    out
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

/// A running `lookout run`, killed when dropped.
pub struct Daemon {
    pub child: std::process::Child,
    pub data: PathBuf,
    /// Where its stderr goes (a file, so a chatty daemon never blocks on a full pipe).
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `lookout --data <data> run --listen 127.0.0.1:0 <args…>` and waits until it
    /// serves its endpoint.
    pub fn start(data: &Path, args: &[&str]) -> Daemon {
        let _ = std::fs::remove_file(data.join("daemon.addr"));
        let log = data.with_extension("daemon.log");
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("daemon log file");
        let child = Command::new(lookout_bin())
            .arg("--data")
            .arg(data)
            .arg("run")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(log_file))
            .spawn()
            .expect("start lookout run");
        let mut d = Daemon { child, data: data.to_path_buf(), log };
        d.wait_for("the endpoint to come up", std::time::Duration::from_secs(30), |d| d.get("/status").is_some());
        d
    }

    /// GET `path` from the daemon's endpoint (body of a 200 answer).
    pub fn get(&self, path: &str) -> Option<String> {
        lookout_core::daemon::http::ask_daemon(&self.data, path)
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/status").expect("daemon answers /status")).expect("status is JSON")
    }

    /// Polls `ok` until it holds; panics (with the daemon's stderr) after `timeout`.
    pub fn wait_for(&mut self, what: &str, timeout: std::time::Duration, ok: impl Fn(&Daemon) -> bool) {
        let until = std::time::Instant::now() + timeout;
        loop {
            if ok(self) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("lookout run exited ({status}) while waiting for {what}:\n{}", self.stderr());
            }
            if std::time::Instant::now() > until {
                let _ = self.child.kill();
                panic!("timed out waiting for {what}; daemon stderr:\n{}", self.stderr());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Everything the daemon logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status (at most `timeout`).
    pub fn terminate(mut self, timeout: std::time::Duration) -> (std::process::ExitStatus, std::time::Duration) {
        let started = std::time::Instant::now();
        Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().expect("kill -TERM");
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return (s, started.elapsed());
            }
            if started.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("lookout run did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
