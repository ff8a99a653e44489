//! `lookout run` as a child process, for the daemon, collector, crash-loop, bad-input
//! and disk-full tests: starting it (and waiting until it serves `/status`), asking its
//! endpoint, waiting on it with deadlines, and stopping it with SIGTERM or SIGKILL.
//!
//! A [`Daemon`] is killed when dropped, so a failing test leaves no process behind. Every
//! wait polls with a deadline and, when it fails, shows the end of the daemon's log.

use crate::lookout_bin;
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------

/// Calls `f` until it returns `Ok`; after `timeout`, the last `Err` (a description of
/// the state it saw).
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(last) if start.elapsed() > timeout => {
                return Err(format!("timed out after {timeout:?}; last seen: {last}"));
            }
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`poll_until`], failing the test on a timeout.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Result<T, String>) -> T {
    poll_until(timeout, f).unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
}

// ---------------------------------------------------------------------------------------
// The endpoint
// ---------------------------------------------------------------------------------------

/// A bare HTTP/1.0 GET: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| format!("send: {e}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| format!("read: {e}"))?;
    let resp = String::from_utf8(resp).map_err(|e| format!("answer is not UTF-8: {e}"))?;
    let (head, body) = resp.split_once("\r\n\r\n").ok_or_else(|| format!("no header end in {resp:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status code in {head:?}"))?;
    Ok((code, body.to_string()))
}

/// The value of one series (`name` or `name{labels}`, exactly as exposed) in a
/// `/metrics` page.
pub fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `lookout_source_bytes_behind` per file name (the `path` label unescaped), and
/// `lookout_polls_total`, from a `/metrics` page.
pub fn behind_and_polls(metrics: &str) -> (BTreeMap<String, f64>, f64) {
    let mut behind = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("lookout_source_bytes_behind{path=\"") else { continue };
        // Label values escape `\`, `"` and newline (exposition format 0.0.4).
        let mut path = String::new();
        let mut chars = rest.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => path.push('\n'),
                    Some((_, other)) => path.push(other),
                    None => break,
                },
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                c => path.push(c),
            }
        }
        let Some(value) = end.and_then(|e| rest[e..].strip_prefix("} ")) else { continue };
        let name = Path::new(&path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        behind.insert(name, value.trim().parse().unwrap_or(f64::NAN));
    }
    (behind, metric(metrics, "lookout_polls_total").unwrap_or(0.0))
}

// ---------------------------------------------------------------------------------------
// Starting a daemon
// ---------------------------------------------------------------------------------------

/// How to start `lookout --data <data> run --listen 127.0.0.1:0 <args…>`. Cloned and
/// started again for a restart.
#[derive(Clone)]
pub struct DaemonSpec {
    data: PathBuf,
    args: Vec<OsString>,
    /// stdout and stderr of every start, appended.
    log: PathBuf,
    failpoint: Option<String>,
    bin: Option<PathBuf>,
    user: Option<(u32, u32)>,
    /// No `--retention` at all (the daemon's own choice is under test).
    no_retention: bool,
}

impl DaemonSpec {
    /// A daemon on the data directory `data`, logging to `<data>.daemon.log`.
    pub fn new(data: &Path) -> DaemonSpec {
        DaemonSpec {
            data: data.to_path_buf(),
            args: Vec::new(),
            log: data.with_extension("daemon.log"),
            failpoint: None,
            bin: None,
            user: None,
            no_retention: false,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> DaemonSpec {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    pub fn args<S: AsRef<OsStr>>(self, args: impl IntoIterator<Item = S>) -> DaemonSpec {
        args.into_iter().fold(self, |s, a| s.arg(a))
    }

    /// `--logs DIR`
    pub fn logs(self, dir: &Path) -> DaemonSpec {
        self.arg("--logs").arg(dir)
    }

    /// `--plugins DIR`
    pub fn plugins(self, dir: &Path) -> DaemonSpec {
        self.arg("--plugins").arg(dir)
    }

    /// `--findings FILE`
    pub fn findings(self, file: &Path) -> DaemonSpec {
        self.arg("--findings").arg(file)
    }

    /// `--now NOW --ingest-now NOW`: evaluation and ingestion time fixed, so findings
    /// compare with a one-shot run's.
    pub fn now(self, now: &str) -> DaemonSpec {
        self.args(["--now", now, "--ingest-now", now])
    }

    /// `--rescan-secs SECS`
    pub fn rescan_secs(self, secs: f64) -> DaemonSpec {
        self.arg("--rescan-secs").arg(secs.to_string())
    }

    /// Where stdout and stderr go (appended).
    pub fn log(mut self, file: &Path) -> DaemonSpec {
        self.log = file.to_path_buf();
        self
    }

    /// `LOOKOUT_FAILPOINT=<name>`: the daemon aborts at that point.
    pub fn failpoint(mut self, name: Option<&str>) -> DaemonSpec {
        self.failpoint = name.map(str::to_string);
        self
    }

    /// Runs the daemon with no `--retention` (not even the `none` the tests' fleets need).
    pub fn no_retention_flag(mut self) -> DaemonSpec {
        self.no_retention = true;
        self
    }

    /// Runs this binary instead of [`lookout_bin`].
    pub fn binary(mut self, bin: &Path) -> DaemonSpec {
        self.bin = Some(bin.to_path_buf());
        self
    }

    /// Runs the daemon as `uid`:`gid` (the test must be root), without supplementary
    /// groups.
    pub fn user(mut self, uid: u32, gid: u32) -> DaemonSpec {
        self.user = Some((uid, gid));
        self
    }

    /// Starts the daemon without waiting for anything (kills right after start need that).
    pub fn spawn(&self) -> Daemon {
        // A killed daemon leaves its address behind; never ask a stale one.
        let _ = std::fs::remove_file(self.data.join("daemon.addr"));
        let out = OpenOptions::new().create(true).append(true).open(&self.log).expect("daemon log file");
        let err = out.try_clone().expect("daemon log file");
        let mut cmd = Command::new(self.bin.clone().unwrap_or_else(lookout_bin));
        cmd.arg("--data").arg(&self.data).arg("run").args(["--listen", "127.0.0.1:0"]).args(&self.args);
        // Test fleets carry fixed timestamps that the clock has long passed: unless a test
        // is about retention (and says so), everything is kept.
        if !self.no_retention && !self.args.iter().any(|a| a == "--retention") {
            cmd.args(["--retention", "none"]);
        }
        cmd
            // The tests read the daemon's info lines and choose its failpoint: nothing
            // from the environment the tests run in may change either.
            .env_remove("LOOKOUT_FAILPOINT")
            .env_remove("LOOKOUT_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        if let Some(fp) = &self.failpoint {
            cmd.env("LOOKOUT_FAILPOINT", fp);
        }
        if let Some((uid, gid)) = self.user {
            // std drops the supplementary groups too when root sets a uid.
            cmd.uid(uid).gid(gid);
        }
        // A binary copied just before (`lookout_bin_for_everyone`) can be refused with
        // ETXTBSY for a moment: another test thread forking meanwhile holds the copy's
        // write descriptor until its child execs. Tried again, as cargo does.
        let mut tries = 0;
        let child = loop {
            match cmd.spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                spawned => break spawned.expect("start lookout run"),
            }
        };
        Daemon { child, exited: None, data: self.data.clone(), log: self.log.clone(), started: Instant::now() }
    }

    /// Starts the daemon and waits (at most 60 s) until it answers `/status`.
    pub fn start(&self) -> Daemon {
        let mut d = self.spawn();
        if let Err(e) = d.wait_up(Duration::from_secs(60)) {
            panic!("lookout run did not come up: {e}");
        }
        d
    }
}

// ---------------------------------------------------------------------------------------
// A running daemon
// ---------------------------------------------------------------------------------------

/// A `lookout run` child process; killed (SIGKILL) when dropped.
pub struct Daemon {
    child: Child,
    exited: Option<ExitStatus>,
    data: PathBuf,
    log: PathBuf,
    started: Instant,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When it was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The exit status, once it has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` bytes (about) of its log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        crate::text_tail(&self.log_text(), n).to_string()
    }

    /// The endpoint's address, from `daemon.addr`.
    pub fn addr(&self) -> Option<SocketAddr> {
        std::fs::read_to_string(self.data.join("daemon.addr")).ok()?.trim().parse().ok()
    }

    /// GET `path` from the endpoint: the body of a 200 answer.
    pub fn get(&self, path: &str) -> Option<String> {
        lookout_core::daemon::http::ask_daemon(&self.data, path)
    }

    /// `/status`, if it answers.
    pub fn try_status(&self) -> Option<Value> {
        self.get("/status").and_then(|b| serde_json::from_str(&b).ok())
    }

    /// GET `path`; fails the test (with the daemon's log) unless it answers 200.
    pub fn get_ok(&mut self, path: &str) -> String {
        if let Some(body) = self.get(path) {
            return body;
        }
        match self.exit_status() {
            Some(st) => {
                panic!("the daemon exited ({st}) before GET {path}; its log ends with:\n{}", self.log_tail(4000))
            }
            None => panic!("GET {path} got no 200 answer; the daemon's log ends with:\n{}", self.log_tail(4000)),
        }
    }

    /// `/status`; fails the test if the daemon does not answer.
    pub fn status(&mut self) -> Value {
        let body = self.get_ok("/status");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
    }

    /// The `/metrics` page; fails the test if the daemon does not answer.
    pub fn metrics(&mut self) -> String {
        self.get_ok("/metrics")
    }

    /// Calls `f` until it returns `Ok`; `Err` at once if the daemon exits, or with the
    /// last `Err` after `timeout` (both with the end of the daemon's log).
    pub fn try_wait_for<T>(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(&mut Daemon) -> Result<T, String>,
    ) -> Result<T, String> {
        let start = Instant::now();
        loop {
            let last = match f(self) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if let Some(st) = self.exit_status() {
                return Err(format!("the daemon exited ({st}); last seen: {last}; log:\n{}", self.log_tail(3000)));
            }
            if start.elapsed() > timeout {
                return Err(format!("timed out after {timeout:?}; last seen: {last}; log:\n{}", self.log_tail(3000)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Daemon::try_wait_for`], failing the test.
    pub fn wait_for<T>(&mut self, what: &str, timeout: Duration, f: impl FnMut(&mut Daemon) -> Result<T, String>) -> T {
        self.try_wait_for(timeout, f).unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
    }

    /// Waits until `/status` answers; returns it.
    pub fn wait_up(&mut self, timeout: Duration) -> Result<Value, String> {
        self.try_wait_for(timeout, |d| d.try_status().ok_or_else(|| "no /status answer".to_string()))
    }

    /// Waits (closely) until the daemon has written `daemon.addr`: its store is open and
    /// its plugins are about to load. Returns early if it exits.
    pub fn wait_addr(&mut self, timeout: Duration) {
        let addr = self.data.join("daemon.addr");
        let until = Instant::now() + timeout;
        while !addr.exists() && self.exit_status().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until the log says `what`; `false` if the daemon exits first or `timeout`.
    pub fn wait_log(&mut self, what: &str, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        loop {
            if self.log_text().contains(what) {
                return true;
            }
            if self.exit_status().is_some() || Instant::now() > until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until two whole polls of the daemon have run since the call and every file
    /// in `logs` is tracked and read to its end (`lookout_source_bytes_behind` all 0).
    pub fn wait_caught_up(&mut self, logs: &Path, timeout: Duration) -> Result<(), String> {
        let polls0 = self.get("/metrics").map(|m| behind_and_polls(&m).1).unwrap_or(0.0);
        self.try_wait_for(timeout, |d| {
            let m = d.get("/metrics").ok_or("no /metrics answer")?;
            let (behind, polls) = behind_and_polls(&m);
            let files: Vec<String> = std::fs::read_dir(logs)
                .map_err(|e| format!("{}: {e}", logs.display()))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect();
            let untracked: Vec<&String> = files.iter().filter(|f| !behind.contains_key(*f)).collect();
            let lagging: Vec<(&String, &f64)> = behind.iter().filter(|(_, b)| **b != 0.0).collect();
            if polls >= polls0 + 2.0 && untracked.is_empty() && lagging.is_empty() {
                Ok(())
            } else {
                Err(format!("polls {polls} (from {polls0}); untracked {untracked:?}; behind {lagging:?}"))
            }
        })
    }

    /// SIGKILL (if still running) and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(s) = self.exit_status() {
            return s;
        }
        let _ = self.child.kill();
        let s = self.child.wait().expect("wait");
        self.exited = Some(s);
        s
    }

    /// Sends SIGTERM (if still running).
    pub fn sigterm(&mut self) {
        if self.exit_status().is_some() {
            return;
        }
        let st = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status().expect("run kill");
        assert!(st.success() || self.exit_status().is_some(), "kill -TERM {} failed", self.pid());
    }

    /// Waits for the exit at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exit_status() {
                return Some(s);
            }
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops it the polite way: SIGTERM, then it must exit 0 within `timeout` and remove
    /// `daemon.addr`. Returns how long the exit took.
    pub fn terminate(&mut self, timeout: Duration) -> Duration {
        let start = Instant::now();
        self.sigterm();
        let Some(status) = self.wait_exit(timeout) else {
            self.kill9();
            panic!(
                "the daemon did not exit within {timeout:?} of SIGTERM; its log ends with:\n{}",
                self.log_tail(4000)
            );
        };
        let took = start.elapsed();
        assert!(
            status.success(),
            "the daemon exited with {status} after SIGTERM; its log ends with:\n{}",
            self.log_tail(4000)
        );
        assert!(!self.data.join("daemon.addr").exists(), "a stopped daemon must remove daemon.addr");
        took
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
