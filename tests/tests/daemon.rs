//! End-to-end tests of `lookout run`, the daemon: a collector that writes in random
//! chunks and rotates (rename, copytruncate, gzip) while the daemon is restarted, a plugin
//! dropped into a running daemon, the /metrics exposition format, SIGTERM in the middle of
//! a heavy ingest, and the errors of a bad command line.
//!
//! Every daemon is a real child process behind a guard that kills it when the test fails;
//! every wait is a polling loop with a deadline.

use flate2::write::GzEncoder;
use flate2::Compression;
use lookout_tests::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const NOW: &str = "2025-05-08T00:00:00Z";
const TABLES: [&str; 3] = ["FileProfile", "DeviceImageLoadEvents", "DeviceFileEvents"];
/// The WinRM detector's `detector` and `version` labels in /metrics.
const DETECTOR: (&str, &str) = ("winrm-plugin-lateral-movement", "1.0.0");

// ---------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------

/// Polls `f` until it returns `Ok`; panics after `timeout` with the last `Err` (a
/// description of the state it saw).
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) => {
                if start.elapsed() > timeout {
                    panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

// ---------------------------------------------------------------------------------------
// The daemon as a child process
// ---------------------------------------------------------------------------------------

/// A running `lookout run`. Dropping it kills the process (a failing test leaves nothing
/// behind); [`Daemon::terminate`] stops it the polite way.
struct Daemon {
    child: Option<Child>,
    data: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
}

struct DaemonArgs<'a> {
    data: &'a Path,
    logs: &'a Path,
    plugins: &'a Path,
    findings: &'a Path,
    /// stdout and stderr of every start, appended.
    log: &'a Path,
}

impl Daemon {
    fn start(a: &DaemonArgs) -> Daemon {
        // A daemon killed earlier leaves its address behind; the new one writes its own.
        let _ = fs::remove_file(a.data.join("daemon.addr"));
        let out = OpenOptions::new().create(true).append(true).open(a.log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(lookout_bin())
            .arg("--data")
            .arg(a.data)
            .arg("run")
            .arg("--logs")
            .arg(a.logs)
            .arg("--plugins")
            .arg(a.plugins)
            .arg("--findings")
            .arg(a.findings)
            .args(["--listen", "127.0.0.1:0", "--now", NOW, "--ingest-now", NOW, "--rescan-secs", "0.25"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn lookout run");
        let mut d = Daemon {
            child: Some(child),
            data: a.data.to_path_buf(),
            log: a.log.to_path_buf(),
            addr: "127.0.0.1:0".parse().unwrap(),
        };
        let addr_file = a.data.join("daemon.addr");
        let addr = wait_for("the daemon to write daemon.addr and answer /status", Duration::from_secs(30), || {
            d.assert_alive();
            let text = fs::read_to_string(&addr_file).map_err(|e| format!("{}: {e}", addr_file.display()))?;
            let addr: SocketAddr = text.trim().parse().map_err(|e| format!("daemon.addr holds {text:?}: {e}"))?;
            match http_get(addr, "/status") {
                Ok((200, _)) => Ok(addr),
                Ok((code, body)) => Err(format!("/status answered {code}: {body}")),
                Err(e) => Err(e),
            }
        });
        d.addr = addr;
        d
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        let start = (start..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        text[start..].to_string()
    }

    /// Panics (with the daemon's log) if the process has exited.
    fn assert_alive(&mut self) {
        if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("the daemon exited unexpectedly ({st}); its log ends with:\n{}", self.log_tail());
        }
    }

    /// GET `path`; the body of a 200 answer.
    fn get(&mut self, path: &str) -> String {
        match http_get(self.addr, path) {
            Ok((200, body)) => body,
            Ok((code, body)) => panic!("GET {path} answered {code}: {body}\ndaemon log:\n{}", self.log_tail()),
            Err(e) => {
                self.assert_alive();
                panic!("GET {path} failed: {e}\ndaemon log:\n{}", self.log_tail())
            }
        }
    }

    fn status(&mut self) -> Value {
        let body = self.get("/status");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
    }

    fn metrics(&mut self) -> Vec<Sample> {
        let text = self.get("/metrics");
        check_exposition(&text).unwrap_or_else(|e| panic!("/metrics is not valid exposition text: {e}\n{text}"))
    }

    /// SIGTERM, then waits (at most `timeout`) for the exit; returns the status and how
    /// long the exit took.
    fn terminate(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        let pid = self.pid().to_string();
        let sent = Command::new("kill").arg("-TERM").arg(&pid).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let child = self.child.as_mut().unwrap();
        let status = wait_for("the daemon to exit after SIGTERM", timeout, || {
            child.try_wait().unwrap().ok_or_else(|| format!("pid {pid} still running"))
        });
        let took = start.elapsed();
        self.child = None;
        assert!(
            status.success(),
            "the daemon exited with {status} after SIGTERM; its log ends with:\n{}",
            self.log_tail()
        );
        assert!(!self.data.join("daemon.addr").exists(), "a stopped daemon must remove daemon.addr");
        (status, took)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// A bare HTTP/1.0 GET: (status code, body).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
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

/// Runs `lookout <args>` expecting it to exit by itself within `timeout`: (status,
/// stdout + stderr).
fn run_bounded(dir: &Path, args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    let log = dir.join("bounded.log");
    let out = File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let child = Command::new(lookout_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap();
    let mut guard =
        Daemon { child: Some(child), data: dir.to_path_buf(), log: log.clone(), addr: "127.0.0.1:0".parse().unwrap() };
    let child = guard.child.as_mut().unwrap();
    let status = wait_for(&format!("lookout {args:?} to exit"), timeout, || {
        child.try_wait().unwrap().ok_or_else(|| "still running".to_string())
    });
    guard.child = None;
    (status, fs::read_to_string(&log).unwrap())
}

// ---------------------------------------------------------------------------------------
// Fleets, status and findings
// ---------------------------------------------------------------------------------------

type Pair = (String, i64, i64);

struct Fleet {
    logs: PathBuf,
    /// Lines per table.
    counts: BTreeMap<String, u64>,
    truth: BTreeSet<Pair>,
}

/// `lookout gen --out <root>/fleet`.
fn gen_fleet(root: &Path, events: usize, seed: u64) -> Fleet {
    let out = root.join("fleet");
    lookout_ok(
        &root.join("gen-data"),
        &[
            "gen",
            "--out",
            out.to_str().unwrap(),
            "--events",
            &events.to_string(),
            "--attacks",
            "12",
            "--seed",
            &seed.to_string(),
        ],
    );
    let logs = out.join("logs");
    let counts = TABLES
        .iter()
        .map(|t| {
            let bytes = fs::read(logs.join(format!("{t}.jsonl"))).unwrap();
            (t.to_string(), bytes.iter().filter(|b| **b == b'\n').count() as u64)
        })
        .collect();
    let truth: Vec<Value> = serde_json::from_slice(&fs::read(out.join("ground-truth.json")).unwrap()).unwrap();
    let truth: BTreeSet<Pair> = truth
        .iter()
        .map(|t| {
            (
                t["device_id"].as_str().unwrap().to_string(),
                t["load_report_id"].as_i64().unwrap(),
                t["write_report_id"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(!truth.is_empty(), "the generated fleet has no attacks");
    Fleet { logs, counts, truth }
}

fn table_counts(status: &Value) -> BTreeMap<String, u64> {
    status["tables"]
        .as_object()
        .map(|t| t.iter().map(|(k, v)| (k.clone(), v["rows"].as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

/// Waits until the daemon has stored exactly `want` rows per table; more than that in
/// any table (a row stored twice) fails at once.
fn wait_all_rows(d: &mut Daemon, want: &BTreeMap<String, u64>, timeout: Duration) -> Value {
    wait_for("every generated row to be stored", timeout, || {
        let s = d.status();
        let have = table_counts(&s);
        for (t, n) in &have {
            let w = want.get(t).copied().unwrap_or(0);
            assert!(*n <= w, "table {t} holds {n} rows but only {w} were written: {s}");
        }
        if &have == want {
            Ok(s)
        } else {
            Err(format!("{have:?} (want {want:?})"))
        }
    })
}

fn pair_of(f: &Value) -> Pair {
    let row = &f["row"];
    (
        row["DeviceId"].as_str().unwrap_or_else(|| panic!("finding without row.DeviceId: {f}")).to_string(),
        row["ReportId"].as_i64().unwrap_or_else(|| panic!("finding without row.ReportId: {f}")),
        row["ReportId1"].as_i64().unwrap_or_else(|| panic!("finding without row.ReportId1: {f}")),
    )
}

/// The complete lines of a findings JSONL the daemon may be appending to.
fn complete_findings(path: &Path) -> Vec<Value> {
    let bytes = fs::read(path).unwrap_or_default();
    let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    String::from_utf8(bytes[..end].to_vec())
        .expect("findings are UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("findings line is not JSON ({e}): {l}")))
        .collect()
}

/// Checks findings lines against the truth: no duplicate id, no duplicate pair, nothing
/// outside the truth (a finding, once written, is never taken back, so these fail at
/// once). Returns whether every pair of the truth is there.
fn check_findings(lines: &[Value], truth: &BTreeSet<Pair>) -> bool {
    let mut ids = BTreeSet::new();
    let mut pairs = BTreeSet::new();
    for f in lines {
        let id = f["finding_id"].as_str().unwrap_or_else(|| panic!("finding without finding_id: {f}"));
        assert!(ids.insert(id.to_string()), "finding {id} is written twice");
        let p = pair_of(f);
        assert!(truth.contains(&p), "finding {p:?} is not in the ground truth: {f}");
        assert!(pairs.insert(p.clone()), "pair {p:?} is found twice");
    }
    &pairs == truth
}

fn wait_findings(path: &Path, truth: &BTreeSet<Pair>, timeout: Duration) {
    wait_for("the findings JSONL to hold exactly the ground truth", timeout, || {
        let lines = complete_findings(path);
        if check_findings(&lines, truth) {
            Ok(())
        } else {
            Err(format!("{} of {} findings", lines.len(), truth.len()))
        }
    });
}

// ---------------------------------------------------------------------------------------
// The Prometheus text exposition format, checked strictly
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, k: &str) -> Option<&str> {
        self.labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    fn is_detector(&self, (name, version): (&str, &str)) -> bool {
        self.label("detector") == Some(name) && self.label("version") == Some(version)
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        && !s.starts_with("__")
}

/// A quoted label value at the start of `s` (after the opening quote): the unescaped
/// value and the rest after the closing quote. Only `\\`, `\"` and `\n` are escapes.
fn label_value(s: &str) -> Result<(String, &str), String> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, '\\')) => out.push('\\'),
                Some((_, '"')) => out.push('"'),
                Some((_, 'n')) => out.push('\n'),
                other => return Err(format!("bad escape \\{:?} in label value", other.map(|o| o.1))),
            },
            '"' => return Ok((out, &s[i + 1..])),
            '\n' => return Err("raw newline in label value".into()),
            c => out.push(c),
        }
    }
    Err("unterminated label value".into())
}

fn sample_value(s: &str) -> Result<f64, String> {
    match s {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        // Rust also takes "inf", "nan", "infinity": Prometheus does not.
        _ if s.chars().any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E') => Err(format!("bad value {s:?}")),
        _ => s.parse::<f64>().map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

/// Validates a whole /metrics page (text format 0.0.4) and returns its samples.
fn check_exposition(text: &str) -> Result<Vec<Sample>, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the page does not end with a newline".into());
    }
    const KINDS: [&str; 5] = ["counter", "gauge", "histogram", "summary", "untyped"];
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps: BTreeSet<String> = BTreeSet::new();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut seen: BTreeSet<(String, Vec<(String, String)>)> = BTreeSet::new();
    let mut samples = Vec::new();
    // All lines of a family are together.
    let mut enter = |family: &str, current: &mut Option<String>| -> Result<(), String> {
        if current.as_deref() != Some(family) {
            if done.contains(family) {
                return Err(format!("lines of family {family} are not together"));
            }
            if let Some(c) = current.take() {
                done.insert(c);
            }
            *current = Some(family.to_string());
        }
        Ok(())
    };
    for (n, line) in text.split_terminator('\n').enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').ok_or_else(|| at("HELP without text".into()))?;
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            if help.trim().is_empty() {
                return Err(at("empty HELP text".into()));
            }
            let mut chars = help.chars();
            while let Some(c) = chars.next() {
                if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
                    return Err(at("bad escape in HELP text".into()));
                }
            }
            if !helps.insert(name.to_string()) {
                return Err(at(format!("second HELP for {name}")));
            }
            enter(name, &mut current).map_err(at)?;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| at("TYPE without kind".into()))?;
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            if !KINDS.contains(&kind) {
                return Err(at(format!("unknown type {kind:?}")));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(at(format!("counter {name} does not end in _total")));
            }
            if types.insert(name.to_string(), kind.to_string()).is_some() {
                return Err(at(format!("second TYPE for {name}")));
            }
            if samples.iter().any(|s: &Sample| s.name == name) {
                return Err(at(format!("TYPE of {name} after its samples")));
            }
            enter(name, &mut current).map_err(at)?;
        } else if line.starts_with('#') {
            return Err(at("a comment that is neither HELP nor TYPE".into()));
        } else {
            let end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
            let name = &line[..end];
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            let mut rest = &line[end..];
            let mut labels: Vec<(String, String)> = Vec::new();
            if let Some(r) = rest.strip_prefix('{') {
                rest = r;
                loop {
                    if let Some(r) = rest.strip_prefix('}') {
                        rest = r;
                        break;
                    }
                    let eq = rest.find('=').ok_or_else(|| at("label without =".into()))?;
                    let key = &rest[..eq];
                    if !is_label_name(key) {
                        return Err(at(format!("bad label name {key:?}")));
                    }
                    if labels.iter().any(|(k, _)| k == key) {
                        return Err(at(format!("label {key} twice")));
                    }
                    let r = rest[eq + 1..].strip_prefix('"').ok_or_else(|| at("label value not quoted".into()))?;
                    let (value, r) = label_value(r).map_err(at)?;
                    labels.push((key.to_string(), value));
                    rest = match r.strip_prefix(',') {
                        Some(r) => r,
                        None if r.starts_with('}') => r,
                        None => return Err(at("expected , or } after a label".into())),
                    };
                }
            }
            let value = rest.strip_prefix(' ').ok_or_else(|| at("no space before the value".into()))?;
            if value.contains(' ') {
                return Err(at("more than a value after the name".into()));
            }
            let value = sample_value(value).map_err(at)?;
            let family = if types.contains_key(name) {
                name.to_string()
            } else {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|s| name.strip_suffix(s))
                    .find(|base| matches!(types.get(*base).map(String::as_str), Some("histogram" | "summary")))
                    .map(str::to_string)
                    .ok_or_else(|| at(format!("sample of {name} before (or without) its TYPE")))?
            };
            enter(&family, &mut current).map_err(at)?;
            let mut key_labels = labels.clone();
            key_labels.sort();
            if !seen.insert((name.to_string(), key_labels)) {
                return Err(at("the same series twice".into()));
            }
            samples.push(Sample { name: name.to_string(), labels, value });
        }
    }
    // Each histogram series has its buckets up to +Inf, a _sum and a _count equal to the
    // +Inf bucket.
    for (family, _) in types.iter().filter(|(_, k)| *k == "histogram") {
        let series = |s: &Sample| -> Option<Vec<(String, String)>> {
            let suffix = s.name.strip_prefix(family.as_str())?;
            ["_bucket", "_sum", "_count"]
                .contains(&suffix)
                .then(|| s.labels.iter().filter(|(k, _)| k != "le").cloned().collect())
        };
        let all: BTreeSet<Vec<(String, String)>> = samples.iter().filter_map(series).collect();
        for labels in all {
            let find = |suffix: &str, le: Option<&str>| {
                samples.iter().find(|s| {
                    s.name == format!("{family}{suffix}") && series(s).as_ref() == Some(&labels) && s.label("le") == le
                })
            };
            let (inf, sum, count) = (find("_bucket", Some("+Inf")), find("_sum", None), find("_count", None));
            if sum.is_none() || count.is_none() || inf.map(|s| s.value) != count.map(|s| s.value) {
                return Err(format!("histogram {family} {labels:?}: needs a +Inf bucket, _sum and an equal _count"));
            }
        }
    }
    Ok(samples)
}

fn samples_of<'a>(samples: &'a [Sample], name: &str) -> Vec<&'a Sample> {
    samples.iter().filter(|s| s.name == name).collect()
}

#[test]
fn exposition_checker_rejects_what_it_should() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"q\\\"\\\\\\n\"} 1\n";
    let s = check_exposition(ok).unwrap();
    assert_eq!(s[0].label("x"), Some("q\"\\\n"));
    for bad in [
        "a_total 1\n",                                            // no TYPE
        "# TYPE a counter\na 1\n",                                // counter without _total
        "# TYPE a gauge\n# TYPE a gauge\na 1\n",                  // TYPE twice
        "# TYPE a gauge\na{x=\"\\q\"} 1\n",                       // bad escape
        "# TYPE a gauge\na{x=\"1\"} one\n",                       // bad value
        "# TYPE a gauge\na{x=\"1\"} inf\n",                       // Rust-only infinity
        "# TYPE a gauge\n# TYPE b gauge\na 1\n",                  // family not together
        "# TYPE a gauge\na 1\n\n",                                // empty line
        "# TYPE a gauge\na{x=\"1\"} 1\na{x=\"1\"} 2\n",           // series twice
        "# TYPE a gauge\na{x=1} 1\n",                             // unquoted
        "# TYPE a gauge\n# a comment\na 1\n",                     // stray comment
        "# TYPE a gauge\na 1",                                    // no final newline
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\n", // histogram without _count
        "# TYPE a gauge\na 1 2 3\n",                              // junk after the value
        "# TYPE 1a gauge\n1a 1\n",                                // bad name
        "# TYPE a gauge\na{x=\"a\nb\"} 1\n",                      // raw newline
    ] {
        assert!(check_exposition(bad).is_err(), "accepted {bad:?}");
    }
}

/// Waits until a whole poll of the daemon has run since the call, and every file in
/// `logs` is tracked and read to its end (`lookout_source_bytes_behind` all 0).
fn wait_caught_up(d: &mut Daemon, logs: &Path) {
    let polls = |m: &[Sample]| samples_of(m, "lookout_polls_total").first().map_or(0.0, |s| s.value);
    let polls0 = polls(&d.metrics());
    let files: BTreeSet<String> = fs::read_dir(logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    wait_for("the daemon to catch up with the logs folder", Duration::from_secs(60), || {
        let m = d.metrics();
        let behind: BTreeMap<String, f64> = samples_of(&m, "lookout_source_bytes_behind")
            .iter()
            .map(|s| {
                let p = s.label("path").unwrap_or_default();
                (Path::new(p).file_name().unwrap().to_string_lossy().into_owned(), s.value)
            })
            .collect();
        let polled = polls(&m) >= polls0 + 2.0;
        let untracked: Vec<&String> = files.iter().filter(|f| !behind.contains_key(*f)).collect();
        let lagging: Vec<(&String, &f64)> = behind.iter().filter(|(_, b)| **b != 0.0).collect();
        if polled && untracked.is_empty() && lagging.is_empty() {
            Ok(())
        } else {
            Err(format!("polls {} (from {polls0}); untracked {untracked:?}; behind {lagging:?}", polls(&m)))
        }
    });
}

// ---------------------------------------------------------------------------------------
// A collector: random chunks, rotations, gzip
// ---------------------------------------------------------------------------------------

struct Stream {
    table: &'static str,
    data: Vec<u8>,
    pos: usize,
}

#[derive(Default, Debug)]
struct Tally {
    chunks: u32,
    partial_line_chunks: u32,
    renames: u32,
    copytruncates: u32,
    gzips: u32,
    deletions: u32,
    catch_up_waits: u32,
    restarts: u32,
    skipped: u32,
}

struct Collector {
    logs: PathBuf,
    streams: Vec<Stream>,
    rng: Rng,
    tally: Tally,
}

enum Rotation {
    Rename,
    CopyTruncate,
}

impl Collector {
    fn path(&self, i: usize, suffix: &str) -> PathBuf {
        self.logs.join(format!("{}.jsonl{suffix}", self.streams[i].table))
    }

    fn written(&self) -> usize {
        self.streams.iter().map(|s| s.pos).sum()
    }

    fn total(&self) -> usize {
        self.streams.iter().map(|s| s.data.len()).sum()
    }

    /// Appends the next `n` bytes of stream `i` (wherever they end) to its live file.
    fn append(&mut self, i: usize, n: usize) {
        let path = self.path(i, "");
        let s = &mut self.streams[i];
        let end = (s.pos + n).min(s.data.len());
        let mut f = OpenOptions::new().create(true).append(true).open(&path).unwrap();
        f.write_all(&s.data[s.pos..end]).unwrap();
        s.pos = end;
    }

    fn mid_line(&self, i: usize) -> bool {
        let s = &self.streams[i];
        s.pos > 0 && s.data[s.pos - 1] != b'\n'
    }

    /// Completes the line in hand: a collector rotates only between lines.
    fn finish_line(&mut self, i: usize) {
        if self.mid_line(i) {
            let s = &self.streams[i];
            let nl = s.data[s.pos..].iter().position(|b| *b == b'\n').expect("the data ends with a newline");
            self.append(i, nl + 1);
        }
    }

    /// Writes a random chunk (1 byte to 96 KiB, split anywhere) of stream `i`.
    fn chunk(&mut self, i: usize) {
        let n = 1 + self.rng.below(96 * 1024) as usize;
        self.append(i, n);
        self.tally.chunks += 1;
        if self.mid_line(i) {
            self.tally.partial_line_chunks += 1;
        }
    }

    /// Rotates stream `i`'s live file; an existing `.1` is gzipped first (which may need
    /// the old `.1.gz` deleted, which needs a running daemon that has read it).
    fn rotate(&mut self, i: usize, how: Rotation, daemon: Option<&mut Daemon>) -> bool {
        let live = self.path(i, "");
        if fs::metadata(&live).map(|m| m.len()).unwrap_or(0) == 0 {
            return false; // notifempty
        }
        self.finish_line(i);
        let one = self.path(i, ".1");
        if one.exists() && !self.gzip_rotated(i, daemon) {
            self.tally.skipped += 1;
            return false;
        }
        match how {
            Rotation::Rename => {
                fs::rename(&live, &one).unwrap();
                File::create(&live).unwrap();
                self.tally.renames += 1;
            }
            Rotation::CopyTruncate => {
                fs::copy(&live, &one).unwrap();
                OpenOptions::new().write(true).open(&live).unwrap().set_len(0).unwrap();
                self.tally.copytruncates += 1;
            }
        }
        true
    }

    /// `.1` → `.1.gz` (written under a temporary name, then renamed), then `.1` deleted.
    fn gzip_rotated(&mut self, i: usize, daemon: Option<&mut Daemon>) -> bool {
        let one = self.path(i, ".1");
        if !one.exists() {
            return false;
        }
        let gz = self.path(i, ".1.gz");
        if gz.exists() && !self.delete_old(i, daemon) {
            return false;
        }
        let tmp = self.path(i, ".1.gz.tmp");
        let mut enc = GzEncoder::new(File::create(&tmp).unwrap(), Compression::fast());
        std::io::copy(&mut File::open(&one).unwrap(), &mut enc).unwrap();
        enc.finish().unwrap().sync_all().unwrap();
        fs::rename(&tmp, &gz).unwrap();
        fs::remove_file(&one).unwrap();
        self.tally.gzips += 1;
        true
    }

    /// Deletes the old `.1.gz` once the daemon has caught up with everything.
    fn delete_old(&mut self, i: usize, daemon: Option<&mut Daemon>) -> bool {
        let gz = self.path(i, ".1.gz");
        if !gz.exists() {
            return false;
        }
        let Some(d) = daemon else { return false };
        self.wait_caught_up(d);
        fs::remove_file(&gz).unwrap();
        self.tally.deletions += 1;
        true
    }

    /// Completes the lines in hand, then waits until a whole poll of the daemon has run
    /// since and every file in the folder is tracked and read to its end.
    fn wait_caught_up(&mut self, d: &mut Daemon) {
        for i in 0..self.streams.len() {
            self.finish_line(i);
        }
        self.tally.catch_up_waits += 1;
        wait_caught_up(d, &self.logs);
    }

    /// One step of the collector on a random stream with data left: a chunk, and now
    /// and then a rotation, a gzip or a deletion.
    fn step(&mut self, daemon: Option<&mut Daemon>) {
        let open: Vec<usize> =
            (0..self.streams.len()).filter(|i| self.streams[*i].pos < self.streams[*i].data.len()).collect();
        let i = open[self.rng.below(open.len() as u64) as usize];
        self.chunk(i);
        match self.rng.below(100) {
            0..=4 => {
                self.rotate(i, Rotation::Rename, daemon);
            }
            5..=9 => {
                self.rotate(i, Rotation::CopyTruncate, daemon);
            }
            10..=12 if !self.path(i, ".1.gz").exists() => {
                self.gzip_rotated(i, daemon);
            }
            13..=14 => {
                self.delete_old(i, daemon);
            }
            _ => {}
        }
        // Give the daemon a chance to look in between, sometimes.
        if self.rng.below(4) == 0 {
            std::thread::sleep(Duration::from_millis(self.rng.below(15)));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

#[test]
fn collector_with_rotations_and_restarts() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fleet = gen_fleet(root, 6000, 11);
    let logs = root.join("logs");
    fs::create_dir(&logs).unwrap();
    let plugins = plugins_dir(root, &[WINRM]);
    let (data, findings, log) = (root.join("data"), root.join("out/findings.jsonl"), root.join("daemon.log"));
    fs::create_dir_all(findings.parent().unwrap()).unwrap();
    let args = DaemonArgs { data: &data, logs: &logs, plugins: &plugins, findings: &findings, log: &log };

    let read = |t: &str| fs::read(fleet.logs.join(format!("{t}.jsonl"))).unwrap();
    let mut c = Collector {
        logs: logs.clone(),
        streams: vec![
            Stream { table: "DeviceImageLoadEvents", data: read("DeviceImageLoadEvents"), pos: 0 },
            Stream { table: "DeviceFileEvents", data: read("DeviceFileEvents"), pos: 0 },
        ],
        rng: Rng(0x9e37_79b9_7f4a_7c15),
        tally: Tally::default(),
    };

    let mut daemon = Some(Daemon::start(&args));
    // FileProfile first (prevalence must be known before the events it vets), in pieces.
    let profiles = read("FileProfile");
    let cut = profiles.len() / 3 + 17;
    for part in [&profiles[..cut], &profiles[cut..]] {
        let mut f = OpenOptions::new().create(true).append(true).open(logs.join("FileProfile.jsonl")).unwrap();
        f.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    let want_profiles = fleet.counts["FileProfile"];
    wait_for("the FileProfile feed to be stored", Duration::from_secs(30), || {
        let s = daemon.as_mut().unwrap().status();
        let n = table_counts(&s).get("FileProfile").copied().unwrap_or(0);
        if n == want_profiles {
            Ok(())
        } else {
            Err(format!("{n} of {want_profiles}"))
        }
    });

    // The events, with two restarts (and some writing and rotating while it is down).
    let total = c.total();
    let mut restart_at = vec![total * 2 / 3, total / 3];
    while c.written() < total {
        c.step(daemon.as_mut());
        if restart_at.last().is_some_and(|at| c.written() >= *at) {
            restart_at.pop();
            let mut d = daemon.take().unwrap();
            let (_, took) = d.terminate(Duration::from_secs(20));
            drop(d);
            eprintln!("restart at {} of {total} bytes (stopped in {took:?})", c.written());
            for _ in 0..3 {
                if c.written() < total {
                    c.step(None);
                }
            }
            daemon = Some(Daemon::start(&args));
            c.tally.restarts += 1;
        }
    }
    eprintln!("collector done after {:?}: {:?}", started.elapsed(), c.tally);
    assert!(c.tally.restarts == 2 && c.tally.renames > 0 && c.tally.copytruncates > 0 && c.tally.gzips > 0);
    assert!(c.tally.deletions > 0 && c.tally.partial_line_chunks > 0, "{:?}", c.tally);

    let d = daemon.as_mut().unwrap();
    let s = wait_all_rows(d, &fleet.counts, Duration::from_secs(90));
    assert_eq!(s["rejected"], 0, "bad records from a well-formed stream: {s}");
    eprintln!("all rows stored after {:?} ({} duplicates skipped)", started.elapsed(), s["duplicates_skipped"]);
    wait_findings(&findings, &fleet.truth, Duration::from_secs(60));

    // A last clean stop writes nothing more; the file holds the truth exactly once.
    d.terminate(Duration::from_secs(20));
    let lines = read_jsonl(&findings);
    assert!(check_findings(&lines, &fleet.truth));
    assert_eq!(lines.len(), fleet.truth.len());
    eprintln!("collector_with_rotations_and_restarts: {:?}", started.elapsed());
}

#[test]
fn plugin_dropped_into_running_daemon_fires_without_restart() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fleet = gen_fleet(root, 3000, 5);
    let plugins = plugins_dir(root, &[]);
    assert_eq!(fs::metadata(&plugins).unwrap().permissions().mode() & 0o777, 0o755);
    let (data, findings, log) = (root.join("data"), root.join("findings.jsonl"), root.join("daemon.log"));
    let args = DaemonArgs { data: &data, logs: &fleet.logs, plugins: &plugins, findings: &findings, log: &log };
    let mut d = Daemon::start(&args);
    let s = wait_all_rows(&mut d, &fleet.counts, Duration::from_secs(60));
    assert_eq!(s["rejected"], 0);
    assert!(complete_findings(&findings).is_empty(), "findings without any plugin");

    // A careful deploy: copy beside the folder, fix the mode, rename in (atomic).
    let staged = root.join("liblookout_winrm.so.staged");
    fs::copy(plugin_lib(WINRM), &staged).unwrap();
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o644)).unwrap();
    fs::rename(&staged, plugins.join(WINRM)).unwrap();
    let dropped = Instant::now();

    wait_findings(&findings, &fleet.truth, Duration::from_secs(60));
    eprintln!("the dropped plugin's findings arrived {:?} after the drop", dropped.elapsed());
    let m = d.metrics();
    let failures = samples_of(&m, "lookout_plugin_load_failures_total");
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].value, 0.0, "a careful deploy must not count as a load failure");
    let found = samples_of(&m, "lookout_findings_total");
    assert!(found.iter().any(|s| s.is_detector(DETECTOR) && s.value == fleet.truth.len() as f64), "{found:?}");
    // Backfilling the new detector re-read nothing.
    let s = d.status();
    assert_eq!(table_counts(&s), fleet.counts);
    assert_eq!(s["duplicates_skipped"], 0, "{s}");
    d.terminate(Duration::from_secs(20));
    assert!(check_findings(&read_jsonl(&findings), &fleet.truth));
    eprintln!("plugin_dropped_into_running_daemon_fires_without_restart: {:?}", started.elapsed());
}

#[test]
fn metrics_pass_prometheus_exposition_check() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fleet = gen_fleet(root, 2000, 3);
    // A file whose name needs escaping in a label (quote, backslash, newline), holding a
    // few rows again (duplicates) and one bad record (a reject, with its reason label).
    // The rows come from the middle of the table: a file starting like another is taken
    // for its rotated copy (see `distinct_files_sharing_their_first_kib_are_both_read`).
    let weird = "DeviceFileEvents \"odd\\name\nhere\".jsonl";
    let some: Vec<u8> = fs::read(fleet.logs.join("DeviceFileEvents.jsonl"))
        .unwrap()
        .split_inclusive(|b| *b == b'\n')
        .skip(100)
        .take(5)
        .flatten()
        .copied()
        .chain(b"this is not json\n".iter().copied())
        .collect();
    fs::write(fleet.logs.join(weird), some).unwrap();
    let plugins = plugins_dir(root, &[WINRM]);
    let (data, findings, log) = (root.join("data"), root.join("findings.jsonl"), root.join("daemon.log"));
    let args = DaemonArgs { data: &data, logs: &fleet.logs, plugins: &plugins, findings: &findings, log: &log };
    let mut d = Daemon::start(&args);
    wait_all_rows(&mut d, &fleet.counts, Duration::from_secs(60));
    wait_findings(&findings, &fleet.truth, Duration::from_secs(60));
    // The weird file's rows are all duplicates: make sure it has been read too.
    wait_caught_up(&mut d, &fleet.logs);
    let status = d.status();

    let m = d.metrics(); // checked strictly by check_exposition
    for family in [
        "lookout_rows_ingested_total",
        "lookout_rows_rejected_total",
        "lookout_source_bytes_behind",
        "lookout_detector_pass_duration_seconds_count",
        "lookout_finding_latency_seconds_count",
        "lookout_findings_total",
        "lookout_plugin_load_failures_total",
    ] {
        assert!(!samples_of(&m, family).is_empty(), "no sample of {family}");
    }
    assert!(m.iter().all(|s| s.value.is_finite() && s.value >= 0.0), "{m:?}");
    let ingested: BTreeMap<String, u64> = samples_of(&m, "lookout_rows_ingested_total")
        .iter()
        .map(|s| (s.label("table").expect("table label").to_string(), s.value as u64))
        .collect();
    assert_eq!(ingested, fleet.counts, "rows per table in /metrics");
    let rejected: Vec<&Sample> = samples_of(&m, "lookout_rows_rejected_total");
    assert!(rejected.iter().all(|s| s.label("reason").is_some_and(|r| !r.is_empty())), "{rejected:?}");
    let rejected_sum: f64 = rejected.iter().map(|s| s.value).sum();
    assert_eq!(rejected_sum, 1.0, "the one bad record");
    assert_eq!(status["rejected"], 1, "{status}");
    let behind = samples_of(&m, "lookout_source_bytes_behind");
    let names: BTreeSet<String> = behind
        .iter()
        .map(|s| Path::new(s.label("path").unwrap()).file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> =
        fs::read_dir(&fleet.logs).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, want, "a path label per log file, unescaped back to the file name");
    assert!(behind.iter().all(|s| s.value == 0.0), "{behind:?}");
    let pass = samples_of(&m, "lookout_detector_pass_duration_seconds_count");
    assert!(pass.iter().any(|s| s.is_detector(DETECTOR) && s.value >= 1.0), "{pass:?}");
    // Every finding followed a look that stored rows: each has a latency.
    let latency = samples_of(&m, "lookout_finding_latency_seconds_count");
    assert!(latency.iter().any(|s| s.is_detector(DETECTOR) && s.value == fleet.truth.len() as f64), "{latency:?}");
    let found = samples_of(&m, "lookout_findings_total");
    assert!(found.iter().any(|s| s.is_detector(DETECTOR) && s.value == fleet.truth.len() as f64), "{found:?}");
    assert_eq!(samples_of(&m, "lookout_plugin_load_failures_total")[0].value, 0.0);

    // /status, and `lookout status --json` asking the running daemon.
    let s = d.status();
    assert!(s["tables"].is_object() && s["rejected"].is_u64(), "{s}");
    assert_eq!(table_counts(&s), fleet.counts);
    let cli = status_json(&data);
    assert_eq!(cli["tables"], s["tables"], "status --json while the daemon runs");
    assert_eq!(cli["rejected"], s["rejected"]);
    // Anything else is a 404.
    assert_eq!(http_get(d.addr, "/nope").unwrap().0, 404);
    d.terminate(Duration::from_secs(20));
    eprintln!("metrics_pass_prometheus_exposition_check: {:?}", started.elapsed());
}

#[test]
fn sigterm_during_heavy_ingest_exits_zero_quickly_and_loses_nothing() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fleet = gen_fleet(root, 20_000, 9);
    let all: u64 = fleet.counts.values().sum();
    let plugins = plugins_dir(root, &[]);
    let (data, findings, log) = (root.join("data"), root.join("findings.jsonl"), root.join("daemon.log"));
    let args = DaemonArgs { data: &data, logs: &fleet.logs, plugins: &plugins, findings: &findings, log: &log };
    eprintln!("fleet generated after {:?}", started.elapsed());

    let mut d = Daemon::start(&args);
    let partial = wait_for("some, not all, rows stored", Duration::from_secs(60), || {
        let s = d.status();
        let n: u64 = table_counts(&s).values().sum();
        assert!(n < all, "every row was stored before the test could stop the daemon mid-ingest");
        if n > 0 {
            Ok(n)
        } else {
            Err("no rows yet".into())
        }
    });
    let (_, took) = d.terminate(Duration::from_secs(5));
    drop(d);
    let stopped = status_json(&data);
    let at_stop: u64 = table_counts(&stopped).values().sum();
    eprintln!("stopped in {took:?} with {at_stop} rows stored ({partial} seen before SIGTERM; {all} in all)");
    assert!(at_stop >= partial && at_stop < all, "stopped mid-ingest: {at_stop} of {all}");

    let mut d = Daemon::start(&args);
    let s = wait_all_rows(&mut d, &fleet.counts, Duration::from_secs(90));
    assert_eq!(s["rejected"], 0, "{s}");
    assert_eq!(s["duplicates_skipped"], 0, "the resumed daemon re-read committed rows: {s}");
    d.terminate(Duration::from_secs(20));
    eprintln!("sigterm_during_heavy_ingest_exits_zero_quickly_and_loses_nothing: {:?}", started.elapsed());
}

#[test]
fn run_without_or_with_a_missing_logs_folder_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let plugins = plugins_dir(root, &[]);
    let data = root.join("data");
    let base =
        ["--data", data.to_str().unwrap(), "run", "--plugins", plugins.to_str().unwrap(), "--listen", "127.0.0.1:0"];

    let (st, out) = run_bounded(root, &base, Duration::from_secs(20));
    assert!(!st.success(), "run without --logs succeeded: {out}");
    assert!(out.contains("no logs folder") && out.contains("--logs"), "unclear message: {out}");

    let missing = root.join("no-such-logs");
    let (st, out) =
        run_bounded(root, &[&base[..], &["--logs", missing.to_str().unwrap()]].concat(), Duration::from_secs(20));
    assert!(!st.success(), "run with a missing logs folder succeeded: {out}");
    assert!(out.contains(missing.to_str().unwrap()), "the message does not name {}: {out}", missing.display());
    assert!(!data.join("daemon.addr").exists(), "a daemon that failed to start left daemon.addr behind");

    let file = root.join("a-file.jsonl");
    fs::write(&file, b"").unwrap();
    let (st, out) =
        run_bounded(root, &[&base[..], &["--logs", file.to_str().unwrap()]].concat(), Duration::from_secs(20));
    assert!(!st.success(), "run with a file as logs folder succeeded: {out}");
    assert!(out.contains(file.to_str().unwrap()), "the message does not name {}: {out}", file.display());
}

/// Two different files whose first KiB is the same (an extract of a feed, an earlier
/// export, a collector that re-sent its first events) are two files: each is read in
/// full. The tailer's copy recognition (`Tailer::copied_from` in core/src/tail.rs) only
/// compares the first 1 KiB, so today the second is taken for a rotated copy of the first
/// and read from the first's offset: rows lost, and a torn line rejected.
#[test]
fn distinct_files_sharing_their_first_kib_are_both_read() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fleet = gen_fleet(root, 2000, 4);
    let logs = root.join("logs");
    fs::create_dir(&logs).unwrap();
    let full = fs::read(fleet.logs.join("DeviceFileEvents.jsonl")).unwrap();
    let lines: Vec<&[u8]> = full.split_inclusive(|b| *b == b'\n').collect();
    // The first five rows (well over 1 KiB), then a row from further on.
    let extract: Vec<u8> = lines[..5].iter().chain(&lines[200..201]).flat_map(|l| l.iter().copied()).collect();
    assert!(extract.len() > 1024 && full.starts_with(&extract[..1024]) && !full.starts_with(&extract));
    // Sorted before the full file, so the daemon meets it first.
    fs::write(logs.join("DeviceFileEvents-extract.jsonl"), &extract).unwrap();
    fs::write(logs.join("DeviceFileEvents.jsonl"), &full).unwrap();
    let plugins = plugins_dir(root, &[]);
    let (data, findings, log) = (root.join("data"), root.join("findings.jsonl"), root.join("daemon.log"));
    let args = DaemonArgs { data: &data, logs: &logs, plugins: &plugins, findings: &findings, log: &log };
    let mut d = Daemon::start(&args);
    wait_caught_up(&mut d, &logs);
    let s = d.status();
    d.terminate(Duration::from_secs(20));
    let want = fleet.counts["DeviceFileEvents"];
    assert_eq!(s["rejected"], 0, "a torn line was read: {s}\n{}", fs::read_to_string(&log).unwrap());
    assert_eq!(table_counts(&s).get("DeviceFileEvents"), Some(&want), "rows lost: {s}");
}
