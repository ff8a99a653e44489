//! End-to-end tests of `lookout run`, the daemon: a collector that writes in random
//! chunks and rotates (rename, copytruncate, gzip) while the daemon is restarted, a plugin
//! dropped into a running daemon, the /metrics exposition format, SIGTERM in the middle of
//! a heavy ingest, and the errors of a bad command line.
//!
//! Every daemon is a real child process behind a guard that kills it when the test fails
//! (`lookout_tests::Daemon`); every wait is a polling loop with a deadline.

use lookout_tests::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const NOW: &str = "2025-05-08T00:00:00Z";
/// The WinRM detector's `detector` and `version` labels in /metrics.
const DETECTOR: (&str, &str) = ("winrm-plugin-lateral-movement", "1.0.0");

/// The daemon every test here runs: `--logs`, `--plugins`, `--findings`, fixed times,
/// a quick rescan, its log in `<root>/daemon.log`.
fn daemon_spec(root: &Path, data: &Path, logs: &Path, plugins: &Path, findings: &Path) -> DaemonSpec {
    DaemonSpec::new(data)
        .logs(logs)
        .plugins(plugins)
        .findings(findings)
        .now(NOW)
        .rescan_secs(0.25)
        .log(&root.join("daemon.log"))
}

/// Waits until the daemon has stored exactly `want` rows per table; more than that in
/// any table (a row stored twice) fails at once.
fn wait_all_rows(d: &mut Daemon, want: &BTreeMap<String, u64>, timeout: Duration) -> Value {
    d.wait_for("every generated row to be stored", timeout, |d| {
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

/// Checks findings lines against the truth: no duplicate id, no duplicate pair, nothing
/// outside the truth (a finding, once written, is never taken back, so these fail at
/// once). Returns whether every pair of the truth is there.
fn check_findings(lines: &[Value], truth: &BTreeSet<Pair>) -> bool {
    let mut ids = BTreeSet::new();
    let mut pairs = BTreeSet::new();
    for f in lines {
        let id = f["finding_id"].as_str().unwrap_or_else(|| panic!("finding without finding_id: {f}"));
        assert!(ids.insert(id.to_string()), "finding {id} is written twice");
        let p = finding_pair(f);
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

/// `/metrics`, checked strictly by [`check_exposition`].
fn metric_samples(d: &mut Daemon) -> Vec<Sample> {
    let text = d.metrics();
    check_exposition(&text).unwrap_or_else(|e| panic!("/metrics is not valid exposition text: {e}\n{text}"))
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

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

#[test]
fn collector_with_rotations_and_restarts() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fleet = gen_fleet(root, 6000, 12, 11);
    let logs = root.join("logs");
    fs::create_dir(&logs).unwrap();
    let plugins = plugins_dir(root, &[WINRM]);
    let (data, findings) = (root.join("data"), root.join("out/findings.jsonl"));
    fs::create_dir_all(findings.parent().unwrap()).unwrap();
    let spec = daemon_spec(root, &data, &logs, &plugins, &findings);

    let streams = vec![
        Stream::from_fleet(&fleet.logs, "DeviceImageLoadEvents"),
        Stream::from_fleet(&fleet.logs, "DeviceFileEvents"),
    ];
    // Chunks of up to 96 KiB; about 1 step in 20 rotates, 1 in 30 gzips, 1 in 50 deletes.
    const MAX_CHUNK: usize = 96 * 1024;
    let mut c = Collector::new(&logs, streams, 0x9e37_79b9_7f4a_7c15, [5, 5, 3, 2]);

    let mut daemon = Some(spec.start());
    // FileProfile first (prevalence must be known before the events it vets), in pieces.
    let profiles = fleet.read("FileProfile");
    let cut = profiles.len() / 3 + 17;
    for part in [&profiles[..cut], &profiles[cut..]] {
        let mut f = OpenOptions::new().create(true).append(true).open(logs.join("FileProfile.jsonl")).unwrap();
        f.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    let want_profiles = fleet.counts["FileProfile"];
    daemon.as_mut().unwrap().wait_for("the FileProfile feed to be stored", Duration::from_secs(30), |d| {
        let s = d.status();
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
    let mut restarts = 0;
    while !c.done() {
        c.step(MAX_CHUNK, daemon.as_mut());
        // Give the daemon a chance to look in between, sometimes.
        if c.rng.below(4) == 0 {
            std::thread::sleep(Duration::from_millis(c.rng.below(15)));
        }
        if restart_at.last().is_some_and(|at| c.written() >= *at) {
            restart_at.pop();
            let mut d = daemon.take().unwrap();
            let took = d.terminate(Duration::from_secs(20));
            drop(d);
            eprintln!("restart at {} of {total} bytes (stopped in {took:?})", c.written());
            for _ in 0..3 {
                c.step(MAX_CHUNK, None);
            }
            daemon = Some(spec.start());
            restarts += 1;
        }
    }
    eprintln!("collector done after {:?}: {:?}", started.elapsed(), c.tally);
    assert!(c.stalls.is_empty(), "{:?}", c.stalls);
    assert!(restarts == 2 && c.tally.renames > 0 && c.tally.copytruncates > 0 && c.tally.gzips > 0);
    assert!(c.tally.deletions > 0 && c.tally.partial_line_chunks > 0, "{:?}", c.tally);

    let d = daemon.as_mut().unwrap();
    // The collector writes the WinRM rule's tables (the fleet also has the pack's).
    let want: BTreeMap<String, u64> =
        fleet.counts.iter().filter(|(t, _)| FLEET_TABLES.contains(&t.as_str())).map(|(t, n)| (t.clone(), *n)).collect();
    let s = wait_all_rows(d, &want, Duration::from_secs(90));
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

/// Settings for a detector that is not in the plugins folder (removed, or refused until
/// fixed) do not hold up the others: the daemon warns and the WinRM findings go out.
#[test]
fn settings_for_a_detector_not_loaded_do_not_stop_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fleet = gen_fleet(root, 3000, 12, 5);
    let plugins = plugins_dir(root, &[WINRM]);
    let (data, findings) = (root.join("data"), root.join("findings.jsonl"));
    let mut d = daemon_spec(root, &data, &fleet.logs, &plugins, &findings)
        .args(["--set", "scheduled-task-persistence.lookback=3d"])
        .start();
    wait_findings(&findings, &fleet.truth, Duration::from_secs(60));
    assert!(d.log_text().contains("settings for a detector that is not loaded are not used"), "{}", d.log_tail(3000));
    d.terminate(Duration::from_secs(20));
    // `lookout detect` refuses them: there, a name not loaded is a mistake to fix.
    let out = lookout(&data, &["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW, "--set", "nosuch.x=1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("'nosuch', which is not loaded"), "{out:?}");
}

#[test]
fn plugin_dropped_into_running_daemon_fires_without_restart() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fleet = gen_fleet(root, 3000, 12, 5);
    let plugins = plugins_dir(root, &[]);
    assert_eq!(fs::metadata(&plugins).unwrap().permissions().mode() & 0o777, 0o755);
    let (data, findings) = (root.join("data"), root.join("findings.jsonl"));
    let mut d = daemon_spec(root, &data, &fleet.logs, &plugins, &findings).start();
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
    // The daemon writes the JSONL first and then counts the pass in /metrics.
    let m = d.wait_for("the findings to be counted in /metrics", Duration::from_secs(30), |d| {
        let m = metric_samples(d);
        let found = samples_of(&m, "lookout_findings_total");
        if found.iter().any(|s| s.is_detector(DETECTOR) && s.value == fleet.truth.len() as f64) {
            Ok(m)
        } else {
            Err(format!("{found:?}"))
        }
    });
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
    let fleet = gen_fleet(root, 2000, 12, 3);
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
    let (data, findings) = (root.join("data"), root.join("findings.jsonl"));
    let mut d = daemon_spec(root, &data, &fleet.logs, &plugins, &findings).start();
    wait_all_rows(&mut d, &fleet.counts, Duration::from_secs(60));
    wait_findings(&findings, &fleet.truth, Duration::from_secs(60));
    // The weird file's rows are all duplicates: make sure it has been read too.
    d.wait_caught_up(&fleet.logs, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    let status = d.status();

    let m = metric_samples(&mut d);
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
    // How the rows are kept: the generation and the key-index runs they went into, and the
    // index the detector declared.
    assert!(s["generations"].as_u64().is_some_and(|n| n >= 1), "{s}");
    assert!(s["key_index_runs"].as_u64().is_some_and(|n| n >= 1), "{s}");
    let winrm_index = "DeviceImageLoadEvents(InitiatingProcessFileName) covers (FolderPath)";
    assert_eq!(s["indexes"], serde_json::json!([winrm_index]), "{s}");
    assert_eq!(cli["indexes"], s["indexes"]);
    // A daemon that is not a Kafka node has no partitions to show; anything else is a 404.
    assert_eq!(http_get(d.addr().expect("daemon.addr"), "/status/kafka").unwrap().0, 404);
    assert_eq!(http_get(d.addr().expect("daemon.addr"), "/nope").unwrap().0, 404);
    d.terminate(Duration::from_secs(20));
    eprintln!("metrics_pass_prometheus_exposition_check: {:?}", started.elapsed());
}

#[test]
fn sigterm_during_heavy_ingest_exits_zero_quickly_and_loses_nothing() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fleet = gen_fleet(root, 20_000, 12, 9);
    let all = fleet.rows();
    let plugins = plugins_dir(root, &[]);
    let (data, findings) = (root.join("data"), root.join("findings.jsonl"));
    let spec = daemon_spec(root, &data, &fleet.logs, &plugins, &findings);
    eprintln!("fleet generated after {:?}", started.elapsed());

    let mut d = spec.start();
    let partial = d.wait_for("some, not all, rows stored", Duration::from_secs(60), |d| {
        let s = d.status();
        let n: u64 = table_counts(&s).values().sum();
        assert!(n < all, "every row was stored before the test could stop the daemon mid-ingest");
        if n > 0 {
            Ok(n)
        } else {
            Err("no rows yet".into())
        }
    });
    let took = d.terminate(Duration::from_secs(5));
    drop(d);
    let stopped = status_json(&data);
    let at_stop: u64 = table_counts(&stopped).values().sum();
    eprintln!("stopped in {took:?} with {at_stop} rows stored ({partial} seen before SIGTERM; {all} in all)");
    assert!(at_stop >= partial && at_stop < all, "stopped mid-ingest: {at_stop} of {all}");

    let mut d = spec.start();
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

    let run = |args: &[&str]| {
        let mut cmd = Command::new(lookout_bin());
        cmd.args(args);
        let out = run_bounded(cmd, Duration::from_secs(20));
        (out.status, out.stdout + &out.stderr)
    };
    let (st, out) = run(&base);
    assert!(!st.success(), "run without --logs succeeded: {out}");
    assert!(out.contains("no logs folder") && out.contains("--logs"), "unclear message: {out}");

    let missing = root.join("no-such-logs");
    let (st, out) = run(&[&base[..], &["--logs", missing.to_str().unwrap()]].concat());
    assert!(!st.success(), "run with a missing logs folder succeeded: {out}");
    assert!(out.contains(missing.to_str().unwrap()), "the message does not name {}: {out}", missing.display());
    assert!(!data.join("daemon.addr").exists(), "a daemon that failed to start left daemon.addr behind");

    let file = root.join("a-file.jsonl");
    fs::write(&file, b"").unwrap();
    let (st, out) = run(&[&base[..], &["--logs", file.to_str().unwrap()]].concat());
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
    let fleet = gen_fleet(root, 2000, 12, 4);
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
    let mut d = daemon_spec(root, &data, &logs, &plugins, &findings).start();
    d.wait_caught_up(&logs, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    let s = d.status();
    d.terminate(Duration::from_secs(20));
    let want = fleet.counts["DeviceFileEvents"];
    assert_eq!(s["rejected"], 0, "a torn line was read: {s}\n{}", fs::read_to_string(&log).unwrap());
    assert_eq!(table_counts(&s).get("DeviceFileEvents"), Some(&want), "rows lost: {s}");
}

/// One DeviceLogonEvents row of the spray below, as JSON text.
fn logon(report: i64, at: &str, action: &str, account: &str) -> String {
    serde_json::json!({
        "Timestamp": at, "DeviceId": "dev-srv-01", "DeviceName": "srv-01.corp.example.com",
        "ActionType": action, "LogonType": "Network", "AccountDomain": "corp", "AccountName": account,
        "RemoteIP": "10.9.9.9", "RemoteIPType": "Private", "RemoteDeviceName": "", "RemotePort": 49152,
        "Protocol": "NTLM", "ReportId": report,
    })
    .to_string()
        + "\n"
}

/// `password-spraying` under a clock the test moves (`run --clock-file`): a spray that
/// does not qualify while its successes are inside the 2-day window fires once they leave
/// it, with no row arriving: the detector's wake-up alone runs the pass.
#[test]
fn password_spraying_fires_when_the_clock_alone_moves() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (logs, data, findings) = (root.join("logs"), root.join("data"), root.join("findings.jsonl"));
    fs::create_dir_all(&logs).unwrap();
    let plugins = plugins_dir(root, &[PASSWORD_SPRAYING]);
    let clock = root.join("clock");
    let set_clock = |t: &str| {
        // Written beside and renamed in: the daemon never reads half a time.
        fs::write(root.join("clock.new"), t).unwrap();
        fs::rename(root.join("clock.new"), &clock).unwrap();
    };
    set_clock("2025-05-06T00:00:00Z");
    let mut d = DaemonSpec::new(&data)
        .logs(&logs)
        .plugins(&plugins)
        .findings(&findings)
        .arg("--clock-file")
        .arg(&clock)
        .rescan_secs(0.2)
        .log(&root.join("daemon.log"))
        .start();

    // Day 0: 13 successful logons from the source (ingested at day 0).
    let successes: String =
        (0..13).map(|i| logon(100 + i, "2025-05-05T23:50:00Z", "LogonSuccess", &format!("user{i:02}"))).collect();
    fs::write(logs.join("DeviceLogonEvents-1.jsonl"), successes).unwrap();
    d.wait_for("the successes to be stored", Duration::from_secs(30), |d| {
        let n = table_counts(&d.status()).get("DeviceLogonEvents").copied().unwrap_or(0);
        if n == 13 {
            Ok(())
        } else {
            Err(format!("{n} rows"))
        }
    });

    // Day 1: 25 accounts fail once each. 13 * 2 < 25 is false: no spray yet.
    set_clock("2025-05-07T00:00:00Z");
    std::thread::sleep(Duration::from_millis(600));
    let failures: String =
        (0..25).map(|i| logon(200 + i, "2025-05-06T23:55:00Z", "LogonFailed", &format!("user{i:02}"))).collect();
    fs::write(logs.join("DeviceLogonEvents-2.jsonl"), failures).unwrap();
    d.wait_for("the failures to be stored", Duration::from_secs(30), |d| {
        let n = table_counts(&d.status()).get("DeviceLogonEvents").copied().unwrap_or(0);
        if n == 38 {
            Ok(())
        } else {
            Err(format!("{n} rows"))
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(complete_findings(&findings).is_empty(), "the successes are still in the window");

    // Day 2 and a minute: the successes have left the 2-day window; no row arrives.
    set_clock("2025-05-08T00:01:00Z");
    let lines = wait_for("the spray to be found from the clock alone", Duration::from_secs(30), || {
        let lines = complete_findings(&findings);
        if lines.is_empty() {
            Err("no finding yet".to_string())
        } else {
            Ok(lines)
        }
    });
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let row = &lines[0]["row"];
    assert_eq!(lines[0]["detector"], "password-spraying");
    assert_eq!(row["IPAddress"], "10.9.9.9");
    assert_eq!(row["DeviceName"], "srv-01.corp.example.com");
    assert_eq!(row["SuccessLogonCount"], 0);
    assert_eq!(row["FailedLogonCount"], 25);
    assert_eq!(row["UniqueAccountFailedLogons"], 25);
    assert_eq!(table_counts(&d.status()).get("DeviceLogonEvents"), Some(&38), "no row arrived");
    d.terminate(Duration::from_secs(20));
    assert_eq!(complete_findings(&findings).len(), 1);
}

/// The four detectors dropped into a running daemon, one after another while it works:
/// each is loaded and backfilled without a restart, and together they write exactly what
/// the generator planted — WinRM's pairs and the pack's findings — each once.
#[test]
fn all_four_detectors_hot_loaded_find_what_was_planted() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fleet = gen_fleet(root, 3000, 12, 9);
    let plugins = plugins_dir(root, &[]);
    let (data, findings) = (root.join("data"), root.join("findings.jsonl"));
    let mut d = daemon_spec(root, &data, &fleet.logs, &plugins, &findings).start();
    wait_all_rows(&mut d, &fleet.counts, Duration::from_secs(90));
    for lib in [WINRM, SCHEDULED_TASK, SCM_REMOTE, PASSWORD_SPRAYING] {
        let staged = root.join(format!("{lib}.staged"));
        fs::copy(plugin_lib(lib), &staged).unwrap();
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o644)).unwrap();
        fs::rename(&staged, plugins.join(lib)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let expected = lookout_core::gen::read_expected(&fleet.dir.join(lookout_core::gen::EXPECTED_FILE)).unwrap();
    let pack: BTreeSet<lookout_core::gen::Expected> = expected.into_iter().collect();
    let detectors: BTreeSet<&str> = pack.iter().map(|e| e.detector.as_str()).collect();
    assert_eq!(detectors.len(), 3, "the generator plants findings for the three pack detectors");
    let identity_of = |f: &Value| {
        let planted = pack.iter().find(|e| f["detector"] == e.detector.as_str())?;
        let columns: Vec<String> = planted.identity.iter().map(|(c, _)| c.clone()).collect();
        lookout_core::gen::expected_of(f, &columns)
    };
    wait_for("every planted finding", Duration::from_secs(90), || {
        let lines = complete_findings(&findings);
        let (winrm, others): (Vec<Value>, Vec<Value>) =
            lines.into_iter().partition(|f| f["detector"] == "winrm-plugin-lateral-movement");
        let winrm_done = check_findings(&winrm, &fleet.truth);
        let mut found = BTreeSet::new();
        for f in &others {
            let id = identity_of(f).unwrap_or_else(|| panic!("a finding of no planted kind: {f}"));
            assert!(pack.contains(&id), "a finding that was not planted: {f}");
            assert!(found.insert(id), "a finding written twice: {f}");
        }
        if winrm_done && found == pack {
            Ok(())
        } else {
            Err(format!(
                "{} of {} WinRM pairs, {} of {} pack findings",
                winrm.len(),
                fleet.truth.len(),
                found.len(),
                pack.len()
            ))
        }
    });
    d.terminate(Duration::from_secs(20));
}

/// `--clock-file` that cannot be read yet: the daemon waits for a time instead of using the
/// wall clock, which would move the retention horizon past a replay's rows for good.
#[test]
fn a_clock_file_not_there_yet_is_waited_for() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (logs, data) = (root.join("logs"), root.join("data"));
    fs::create_dir_all(&logs).unwrap();
    let rows: String = (0..3).map(|i| logon(300 + i, "2025-05-06T12:00:00Z", "LogonFailed", "u")).collect();
    fs::write(logs.join("DeviceLogonEvents.jsonl"), rows).unwrap();
    let clock = root.join("clock");
    let mut d = DaemonSpec::new(&data)
        .logs(&logs)
        .plugins(&plugins_dir(root, &[]))
        .arg("--clock-file")
        .arg(&clock)
        .args(["--retention", "7d"])
        .rescan_secs(0.2)
        .log(&root.join("daemon.log"))
        .start();
    std::thread::sleep(Duration::from_millis(1500));
    let s = d.status();
    assert_eq!(table_counts(&s).values().sum::<u64>(), 0, "nothing is stored before there is a time: {s}");
    assert_eq!(s["expired"], 0, "{s}");
    fs::write(&clock, "2025-05-07T00:00:00Z").unwrap();
    let s = d.wait_for("the rows to be stored at the file's time", Duration::from_secs(30), |d| {
        let s = d.status();
        if table_counts(&s).get("DeviceLogonEvents") == Some(&3) {
            Ok(s)
        } else {
            Err(format!("{s}"))
        }
    });
    assert_eq!(s["expired"], 0, "{s}");
    d.terminate(Duration::from_secs(20));
    let log = fs::read_to_string(root.join("daemon.log")).unwrap();
    assert!(log.contains("cannot read the clock file"), "{log}");
}

/// With nothing new and a long rescan interval, the daemon waits (it does not look at its
/// folders again and again), and SIGTERM during that wait stops it at once, not at the
/// end of the interval (a signal only sets a flag).
#[test]
fn an_idle_daemon_waits_and_sigterm_stops_it_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let logs = root.join("logs");
    fs::create_dir_all(&logs).unwrap();
    fs::write(logs.join("DeviceLogonEvents.jsonl"), logon(1, "2025-05-06T12:00:00Z", "LogonFailed", "u")).unwrap();
    let data = root.join("data");
    let mut d = DaemonSpec::new(&data)
        .logs(&logs)
        .plugins(&plugins_dir(root, &[]))
        .rescan_secs(120.0)
        .log(&root.join("daemon.log"))
        .start();
    d.wait_for("the row stored", Duration::from_secs(30), |d| {
        match table_counts(&d.status()).get("DeviceLogonEvents") {
            Some(1) => Ok(()),
            n => Err(format!("{n:?} rows")),
        }
    });
    // Idle: its own reads of the log file are no reason to look again (they woke it about
    // 60 times a second).
    let polls = |d: &mut Daemon| metric(&d.metrics(), "lookout_polls_total").unwrap_or(f64::NAN);
    let before = polls(&mut d);
    std::thread::sleep(Duration::from_secs(2));
    let after = polls(&mut d);
    assert!(after - before <= 1.0, "{before} looks, then {after} two seconds later with nothing new");
    let took = d.terminate(Duration::from_secs(10));
    assert!(took < Duration::from_secs(2), "took {took:?} to stop");
}

/// SIGTERM while the daemon waits to retry after a failure (here every findings write
/// fails: the findings file's folder is a file) is a clean stop: exit status 0, as
/// README promises for SIGTERM, not the failure it was waiting out.
#[test]
fn sigterm_while_waiting_to_retry_after_a_failure_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let logs = root.join("logs");
    fs::create_dir_all(&logs).unwrap();
    fs::write(logs.join("DeviceLogonEvents.jsonl"), logon(1, "2025-05-06T12:00:00Z", "LogonFailed", "u")).unwrap();
    // A store failure (a detector's state reads as damaged) fails the work loop at its
    // first pass, again after each reopening.
    let mut d = DaemonSpec::new(&root.join("data"))
        .logs(&logs)
        .plugins(&plugins_dir(root, &[WINRM]))
        .failpoint(Some("state-unreadable-winrm-plugin-lateral-movement"))
        .log(&root.join("daemon.log"))
        .spawn();
    let log = root.join("daemon.log");
    wait_for("the work loop to fail", Duration::from_secs(30), || {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if text.contains("work loop failed") {
            Ok(())
        } else {
            Err(text)
        }
    });
    // While it waits to reopen its database, `lookout status` gives its answer and does
    // not open the database itself (the daemon's reopening would then fail on the lock).
    let data = root.join("data");
    let answered = (0..40).any(|_| {
        let out = lookout(&data, &["status"]);
        std::thread::sleep(Duration::from_millis(100));
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("answered 503")
    });
    assert!(answered, "{}", fs::read_to_string(&log).unwrap_or_default());
    d.sigterm();
    let status = d.wait_exit(Duration::from_secs(10)).expect("stopped within 10 s");
    assert!(status.success(), "{status}: {}", fs::read_to_string(&log).unwrap_or_default());
}

/// A detector whose pass meets a store failure (here its state reads as damaged, every
/// time) ends the pass and the work loop starts again; the findings the other detectors
/// committed in that pass are written all the same. Before, the flush after the pass was
/// skipped, every time: WinRM's findings stayed in the database for good.
#[test]
fn a_detector_whose_state_cannot_be_read_does_not_hold_back_the_others_findings() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fleet = gen_fleet(root, 2000, 6, 21);
    let plugins = plugins_dir(root, &[WINRM, SCHEDULED_TASK]);
    let (data, findings) = (root.join("data"), root.join("findings.jsonl"));
    let mut d = daemon_spec(root, &data, &fleet.logs, &plugins, &findings)
        .failpoint(Some("state-unreadable-scheduled-task-persistence"))
        .spawn();
    wait_findings(&findings, &fleet.truth, Duration::from_secs(90));
    let log = fs::read_to_string(root.join("daemon.log")).unwrap_or_default();
    assert!(
        log.contains("work loop failed") && log.contains("the pass of detector scheduled-task-persistence"),
        "the failure is the loop's, and names its detector: {log}"
    );
    d.terminate(Duration::from_secs(20));
}

/// Stopped while the findings it committed cannot be written (the findings file's folder
/// is a file), the daemon says how many are left and where, and does not exit 0.
#[test]
fn sigterm_with_findings_that_cannot_be_written_does_not_exit_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fleet = gen_fleet(root, 2000, 6, 22);
    fs::write(root.join("not-a-folder"), "").unwrap();
    let log = root.join("daemon.log");
    let mut d = daemon_spec(
        root,
        &root.join("data"),
        &fleet.logs,
        &plugins_dir(root, &[WINRM]),
        &root.join("not-a-folder").join("findings.jsonl"),
    )
    .spawn();
    // Its first pass commits the findings, then writing them fails.
    wait_for("writing the findings to fail", Duration::from_secs(60), || {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if text.contains("cannot write the findings file") {
            Ok(())
        } else {
            Err(text)
        }
    });
    d.sigterm();
    let status = d.wait_exit(Duration::from_secs(10)).expect("stopped within 10 s");
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{status}: {text}");
    assert!(text.contains("findings not written to") && text.contains("not-a-folder"), "{text}");
}

/// A findings file that cannot be written (its folder is a file) does not stop the
/// daemon: every row is stored, the findings are kept and counted as unwritten, and once
/// the folder is there they are written, each once, without a restart of its work loop.
#[test]
fn findings_that_cannot_be_written_wait_while_ingestion_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fleet = gen_fleet(root, 2000, 6, 23);
    let folder = root.join("out");
    fs::write(&folder, "").unwrap();
    let findings = folder.join("findings.jsonl");
    let mut d = daemon_spec(root, &root.join("data"), &fleet.logs, &plugins_dir(root, &[WINRM]), &findings).start();
    wait_all_rows(&mut d, &fleet.counts, Duration::from_secs(60));
    // Every finding found (passes may take several looks) and kept, none written.
    d.wait_for("every finding to be counted as unwritten", Duration::from_secs(30), |d| {
        let m = d.metrics();
        match metric(&m, "lookout_findings_unwritten") {
            Some(n) if n as usize == fleet.truth.len() => Ok(()),
            other => Err(format!("{other:?} of {}", fleet.truth.len())),
        }
    });
    let m = d.metrics();
    assert_eq!(metric(&m, "lookout_work_restarts_total"), Some(0.0), "{m}");
    assert!(metric(&m, "lookout_findings_write_failures_total").is_some_and(|n| n >= 1.0), "{m}");
    fs::remove_file(&folder).unwrap();
    fs::create_dir(&folder).unwrap();
    wait_findings(&findings, &fleet.truth, Duration::from_secs(30));
    let m = d.metrics();
    assert_eq!(metric(&m, "lookout_findings_unwritten"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "lookout_work_restarts_total"), Some(0.0), "{m}");
    d.terminate(Duration::from_secs(20));
    assert_eq!(complete_findings(&findings).len(), fleet.truth.len());
}

/// A detector that fails every pass is retried after a wait that grows (1 s, 2 s, 4 s,
/// …), not at every look that stores rows: with rows arriving every 100 ms for 4 s, it
/// runs a handful of times. It used to run at every look, re-reading its whole backlog.
#[test]
fn a_failing_detector_is_retried_after_a_growing_wait() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let logs = root.join("logs");
    fs::create_dir_all(&logs).unwrap();
    let file = logs.join("DeviceFileEvents.jsonl");
    let row = |n: u64| {
        format!(
            r#"{{"Timestamp":"2025-05-07T10:00:00Z","DeviceId":"d1","ReportId":{n},"ActionType":"FileCreated","FileName":"a.exe"}}"#
        ) + "\n"
    };
    fs::write(&file, row(0)).unwrap();
    let log = root.join("daemon.log");
    let mut d = daemon_spec(
        root,
        &root.join("data"),
        &logs,
        &plugins_dir(root, &[FIXTURE_ERRORS]),
        &root.join("findings.jsonl"),
    )
    .spawn();
    let failures = || fs::read_to_string(&log).unwrap_or_default().matches("detector failed").count();
    wait_for("the first failure", Duration::from_secs(30), || if failures() > 0 { Ok(()) } else { Err(String::new()) });
    let first = failures();
    let until = Instant::now() + Duration::from_secs(4);
    let mut n = 1;
    while Instant::now() < until {
        OpenOptions::new().append(true).open(&file).unwrap().write_all(row(n).as_bytes()).unwrap();
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let during = failures() - first;
    let text = fs::read_to_string(&log).unwrap_or_default();
    // Retried at about 1, 3 and 7 s after the first failure: two or three in 4 s.
    assert!((1..=4).contains(&during), "{during} failures while rows arrived for 4 s: {text}");
    assert!(text.contains("retry_in"), "{text}");
    d.terminate(Duration::from_secs(20));
}

/// `run` given no retention keeps the one the data directory recorded (a backfill's
/// `ingest --retention 90d`), not the 31-day default: the horizon never moves back, so
/// the default removed for good the rows 31 to 90 days old.
#[test]
fn run_without_a_retention_keeps_the_one_the_data_directory_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let logs = root.join("logs");
    fs::create_dir_all(&logs).unwrap();
    let backfill = root.join("backfill");
    fs::create_dir_all(&backfill).unwrap();
    // NOW is 2025-05-08: one row 60 days old, one a day old.
    let rows =
        logon(1, "2025-03-09T12:00:00Z", "LogonFailed", "u") + &logon(2, "2025-05-07T12:00:00Z", "LogonFailed", "u");
    fs::write(backfill.join("DeviceLogonEvents.jsonl"), rows).unwrap();
    let data = root.join("data");
    lookout_ok(&data, &["ingest", "--retention", "90d", "--now", NOW, backfill.to_str().unwrap()]);
    let mut d = daemon_spec(root, &data, &logs, &plugins_dir(root, &[]), &root.join("findings.jsonl"))
        .no_retention_flag()
        .start();
    // A look with the clock at NOW has passed once the log file written now is stored.
    fs::write(logs.join("DeviceLogonEvents.jsonl"), logon(3, "2025-05-07T13:00:00Z", "LogonFailed", "u")).unwrap();
    d.wait_for("the new row", Duration::from_secs(30), |d| {
        let s = d.status();
        if table_counts(&s).get("DeviceLogonEvents").copied().unwrap_or(0) >= 3 {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    assert!(d.log_text().contains("keeping the one this data directory recorded"), "{}", d.log_text());
    d.terminate(Duration::from_secs(20));
    // Counted exactly (the rows within retention, not the blocks kept) once it stopped.
    let s: Value = serde_json::from_str(&lookout_ok(&data, &["status", "--json"])).unwrap();
    assert_eq!(table_counts(&s).get("DeviceLogonEvents"), Some(&3), "the 60-day-old row is kept: {s}");
}

/// `lookout status --rejects` lists the rejected records while the daemon runs (it asks
/// the daemon's `/rejects`): an operator need not stop the service to see why records
/// are kept aside.
#[test]
fn status_lists_rejects_while_the_daemon_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let logs = root.join("logs");
    fs::create_dir_all(&logs).unwrap();
    let good = logon(2, "2025-05-07T12:00:00Z", "LogonFailed", "u");
    fs::write(logs.join("DeviceLogonEvents.jsonl"), format!("{{\"Timestamp\": nope\n{good}")).unwrap();
    let data = root.join("data");
    let mut d = daemon_spec(root, &data, &logs, &plugins_dir(root, &[]), &root.join("findings.jsonl")).start();
    d.wait_for("the good row and the reject", Duration::from_secs(30), |d| {
        let s = d.status();
        if s["rejected"] == 1 && table_counts(&s).get("DeviceLogonEvents") == Some(&1) {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let out = lookout_ok(&data, &["status", "--rejects", "5"]);
    assert!(out.contains("reject ") && out.contains("DeviceLogonEvents.jsonl:1 (offset 0): malformed_json"), "{out}");
    let both = lookout(&data, &["status", "--json", "--rejects"]);
    assert!(!both.status.success(), "--json with --rejects is refused, not half-answered");
    // `findings` cannot read the database the daemon holds: it says where the findings
    // are, at once.
    let started = Instant::now();
    let findings = lookout(&data, &["findings"]);
    let text = String::from_utf8_lossy(&findings.stderr).into_owned();
    assert!(!findings.status.success() && text.contains("a daemon runs on"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    d.terminate(Duration::from_secs(20));
}

/// A plugins folder that cannot be used (here: missing) is said once, not at every look
/// (every 0.25 s here), and counted once as a load failure.
#[test]
fn a_plugins_folder_that_cannot_be_used_is_said_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let logs = root.join("logs");
    fs::create_dir_all(&logs).unwrap();
    let mut d =
        daemon_spec(root, &root.join("data"), &logs, &root.join("no-plugins-here"), &root.join("findings.jsonl"))
            .start();
    std::thread::sleep(Duration::from_secs(2));
    let said = d.log_text().matches("plugins folder refused").count();
    assert_eq!(said, 1, "{}", d.log_text());
    assert_eq!(metric(&d.metrics(), "lookout_plugin_load_failures_total"), Some(1.0));
    d.terminate(Duration::from_secs(20));
}

/// `lookout status` asks only the daemon of its own data directory: a copy of a data
/// directory (or one whose daemon's address another daemon took since) carries the
/// running daemon's address file, and `status` there reports the copy, not that daemon.
#[test]
fn status_asks_only_the_daemon_of_its_own_data_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (logs, data, findings) = (root.join("logs"), root.join("data"), root.join("findings.jsonl"));
    fs::create_dir_all(&logs).unwrap();
    let plugins = plugins_dir(root, &[WINRM]);
    let mut d = daemon_spec(root, &data, &logs, &plugins, &findings).start();
    assert!(table_counts(&d.status()).is_empty(), "the daemon's store is empty");

    let other = root.join("other");
    let file = root.join("DeviceFileEvents.jsonl");
    fs::write(&file, "{\"Timestamp\":\"2025-05-07T10:00:00Z\",\"DeviceId\":\"d1\",\"ReportId\":1}\n").unwrap();
    lookout_ok(&other, &["ingest", "--now", NOW, "--retention", "none", file.to_str().unwrap()]);
    fs::copy(data.join("daemon.addr"), other.join("daemon.addr")).unwrap();
    let s: Value = serde_json::from_str(&lookout_ok(&other, &["status", "--json"])).unwrap();
    assert_eq!(table_counts(&s).get("DeviceFileEvents"), Some(&1), "{s}");
    let want = fs::canonicalize(&other).unwrap();
    assert_eq!(fs::canonicalize(s["data_dir"].as_str().unwrap()).unwrap(), want, "{s}");
    // The daemon's own directory still asks it.
    let s: Value = serde_json::from_str(&lookout_ok(&data, &["status", "--json"])).unwrap();
    assert!(table_counts(&s).is_empty(), "{s}");
    d.terminate(Duration::from_secs(30));
}
