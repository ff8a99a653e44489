//! Lookout nodes as one Kafka consumer group (`--features kafka`), against librdkafka's
//! mock cluster (`lookout-kafka-mock`, three brokers in one process on 127.0.0.1).
//!
//! Every test feeds a generated fleet (the WinRM rule's and the detector pack's attacks)
//! as Streaming-API messages into an input topic, repartitions it with `lookout split`
//! into a 6-partition topic keyed by DeviceId, runs `lookout run --kafka` nodes over it,
//! and, once every partition is owned and stored to its end, compares the findings topic
//! with what one `lookout` computes over the same rows: every finding there, none twice.
//! The input goes in two halves, so that a node killed, a node added or a broker taken
//! down after the first half meets rows that arrive after it.

use lookout_tests::daemon::{metric, Daemon, DaemonSpec};
use lookout_tests::{
    gen_fleet, lookout, lookout_bin, lookout_ok, plugins_dir, read_jsonl, run_bounded, target_dir, PASSWORD_SPRAYING,
    SCHEDULED_TASK, SCM_REMOTE, WINRM,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const NOW: &str = "2025-05-08T00:00:00Z";
const PARTITIONS: i32 = 6;
/// The table `lookout split` sends to every partition by default.
const BROADCAST: &str = "DeviceFileCertificateInfo";

/// The mock cluster, stopped when dropped.
struct Mock {
    child: Child,
    /// Its stdin (commands) and stdout (answers).
    control: Mutex<(ChildStdin, BufReader<ChildStdout>)>,
    brokers: String,
}

fn mock_bin() -> PathBuf {
    target_dir().join("lookout-kafka-mock")
}

impl Mock {
    fn start() -> Mock {
        let mut child = Command::new(mock_bin())
            .arg("serve")
            .args(["--brokers", "3"])
            .args(["--topic", "in:1", "--topic", &format!("rows:{PARTITIONS}")])
            .args(["--topic", &format!("findings:{PARTITIONS}")])
            .args(["--topic", "rows.unkeyed:1", "--topic", "rows.rejected:1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start lookout-kafka-mock (built by `cargo test --features kafka`)");
        let stdin = child.stdin.take().expect("mock stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("mock stdout"));
        let mut brokers = String::new();
        stdout.read_line(&mut brokers).expect("mock bootstrap servers");
        let brokers = brokers.trim().to_string();
        assert!(brokers.contains("127.0.0.1:"), "mock cluster said {brokers:?}");
        Mock { child, control: Mutex::new((stdin, stdout)), brokers }
    }

    /// `down <id>` / `up <id>`.
    fn broker(&self, command: &str) {
        let mut control = self.control.lock().expect("mock control");
        writeln!(control.0, "{command}").expect("mock command");
        let mut answer = String::new();
        control.1.read_line(&mut answer).expect("mock answer");
        assert_eq!(answer.trim(), "ok", "mock cluster: {command}");
    }

    /// Sends the files' rows as Streaming-API records, 20 per message.
    fn produce(&self, topic: &str, files: &[PathBuf]) {
        let out = Command::new(mock_bin())
            .args(["produce", "--brokers", &self.brokers, "--topic", topic])
            .args(files)
            .output()
            .expect("run lookout-kafka-mock produce");
        assert!(out.status.success(), "produce failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Every message of every partition of `topic`: (partition, payload).
    fn consume(&self, topic: &str) -> Vec<(i32, Value)> {
        let out = Command::new(mock_bin())
            .args(["consume", "--brokers", &self.brokers, "--topic", topic])
            .output()
            .expect("run lookout-kafka-mock consume");
        assert!(out.status.success(), "consume failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let (p, payload) = l.split_once('\t').expect("partition<TAB>payload");
                (p.parse().expect("partition"), serde_json::from_str(payload).expect("JSON message"))
            })
            .collect()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A generated fleet cut in two halves of every event table, its FileProfile feed, the
/// plugins folder and what one `lookout` finds over all of it.
struct World {
    root: tempfile::TempDir,
    halves: [Vec<PathBuf>; 2],
    /// Event rows in all (each table's lines), broadcast tables' aside.
    event_rows: u64,
    /// Rows of the broadcast table (DeviceFileCertificateInfo): in every partition.
    broadcast_rows: u64,
    profiles: PathBuf,
    plugins: PathBuf,
    /// Finding ids (with their detector) of one lookout over the same rows.
    expected: BTreeMap<String, String>,
    mock: Mock,
}

impl World {
    fn new(seed: u64) -> World {
        let root = tempfile::tempdir().expect("tempdir");
        let fleet = gen_fleet(root.path(), 1500, 3, seed);
        let profiles = root.path().join("profiles");
        std::fs::create_dir_all(&profiles).expect("mkdir");
        std::fs::copy(fleet.logs.join("FileProfile.jsonl"), profiles.join("FileProfile.jsonl")).expect("copy");
        let mut halves = [Vec::new(), Vec::new()];
        let (mut event_rows, mut broadcast_rows) = (0, 0);
        // Tables whose rows stop later findings go first (certificates, then the
        // connections that make a device a domain controller), and the input topic has
        // one partition: rows reach every partition in this order, so a pass between two
        // tables cannot see a finding that one lookout over each half does not.
        let mut tables: Vec<&String> = fleet.counts.keys().filter(|t| t.as_str() != "FileProfile").collect();
        tables.sort_by_key(|t| (![BROADCAST, "DeviceNetworkEvents"].contains(&t.as_str()), t.as_str() != BROADCAST));
        for table in tables {
            let text = String::from_utf8(fleet.read(table)).expect("UTF-8");
            let lines: Vec<&str> = text.lines().collect();
            if table == BROADCAST {
                broadcast_rows += lines.len() as u64;
            } else {
                event_rows += lines.len() as u64;
            }
            let (a, b) = lines.split_at(lines.len() / 2);
            for (half, part) in [a, b].iter().enumerate() {
                let dir = root.path().join(format!("half{half}"));
                std::fs::create_dir_all(&dir).expect("mkdir");
                let file = dir.join(format!("{table}.jsonl"));
                std::fs::write(&file, part.iter().map(|l| format!("{l}\n")).collect::<String>()).expect("write");
                halves[half].push(file);
            }
        }
        let plugins = plugins_dir(root.path(), &[WINRM, SCHEDULED_TASK, SCM_REMOTE, PASSWORD_SPRAYING]);
        // One lookout over the same rows, in the same two increments: a rule that is not
        // monotone (a certificate arriving later stops later emissions only) finds what
        // its passes saw, so the nodes' passes are compared with passes over the same
        // halves.
        let reference = root.path().join("reference");
        let plugins_arg = plugins.display().to_string();
        let profile_file = profiles.join("FileProfile.jsonl").display().to_string();
        for half in &halves {
            let files: Vec<String> = half.iter().map(|p| p.display().to_string()).collect();
            let mut ingest = vec!["ingest", "--now", NOW, "--retention", "none", &profile_file];
            ingest.extend(files.iter().map(String::as_str));
            lookout_ok(&reference, &ingest);
            lookout_ok(&reference, &["detect", "--plugins", &plugins_arg, "--now", NOW]);
        }
        let expected: BTreeMap<String, String> = read_jsonl(&reference.join("findings.jsonl"))
            .iter()
            .map(|f| {
                let id = f["finding_id"].as_str().expect("finding_id").to_string();
                (id, f["detector"].as_str().unwrap_or_default().to_string())
            })
            .collect();
        assert!(expected.len() >= 4, "the reference found only {} findings", expected.len());
        let mock = Mock::start();
        World { root, halves, event_rows, broadcast_rows, profiles, plugins, expected, mock }
    }

    /// Produces half `n` into the input topic and splits it (the split's group goes on
    /// from where it committed).
    fn feed(&self, n: usize) {
        self.mock.produce("in", &self.halves[n]);
        let stats = self.split(None);
        assert!(stats["produced"].as_u64().is_some_and(|p| p > 0), "split produced nothing: {stats}");
        assert_eq!(stats["unkeyed"], 0, "{stats}");
        assert_eq!(stats["rejected"], 0, "{stats}");
    }

    /// `lookout split … --idle-exit 3`, with a failpoint armed if given; its stats when it
    /// exits normally.
    fn split(&self, failpoint: Option<&str>) -> Value {
        self.split_idle(failpoint, 3)
    }

    /// `split`, exiting after `idle` seconds with nothing to read.
    fn split_idle(&self, failpoint: Option<&str>, idle: u32) -> Value {
        let mut cmd = Command::new(lookout_tests::lookout_bin());
        cmd.args(["split", "--brokers", &self.mock.brokers, "--from", "in", "--to", "rows", "--idle-exit"])
            .arg(idle.to_string())
            .env_remove("LOOKOUT_FAILPOINT");
        if let Some(fp) = failpoint {
            cmd.env("LOOKOUT_FAILPOINT", fp);
        }
        let out = cmd.output().expect("run lookout split");
        if failpoint.is_some() {
            assert!(!out.status.success(), "the failpoint was not hit: {}", String::from_utf8_lossy(&out.stderr));
            return Value::Null;
        }
        assert!(out.status.success(), "lookout split failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("split prints its stats as JSON")
    }

    /// A node that runs its detectors once no message has come for 1.5 s.
    fn node(&self, name: &str) -> DaemonSpec {
        // A half arrives in one burst from the split: one pass over each burst, as one
        // lookout over each half.
        self.node_passing_after(name, "1.5")
    }

    /// A node whose passes wait `quiet` seconds without new messages.
    fn node_passing_after(&self, name: &str, quiet: &str) -> DaemonSpec {
        DaemonSpec::new(&self.root.path().join(name))
            .args(["--kafka", "--brokers", &self.mock.brokers, "--topic", "rows", "--group", "nodes"])
            .args(["--findings-topic", "findings"])
            .plugins(&self.plugins)
            .logs(&self.profiles)
            .now(NOW)
            .rescan_secs(0.5)
            .args(["--quiet-before-pass", quiet])
    }

    /// Waits until the running nodes own every partition exactly once, each stored to the
    /// partition's end and not replaying, twice in a row a second apart.
    fn wait_settled(&self, nodes: &mut [&mut Daemon], timeout: Duration) {
        let started = Instant::now();
        // Consecutive looks, a second apart, that found everything settled.
        let mut settled_looks = 0;
        while settled_looks < 2 {
            std::thread::sleep(Duration::from_secs(1));
            let problems = Self::unsettled(nodes);
            if problems.is_empty() {
                settled_looks += 1;
                continue;
            }
            settled_looks = 0;
            if started.elapsed() > timeout {
                let logs: Vec<String> = nodes.iter().map(|n| n.log_tail(3000)).collect();
                panic!("not settled after {timeout:?}: {problems:?}\nnode logs:\n{}", logs.join("\n-----\n"));
            }
        }
    }

    /// What keeps the nodes from being settled: a node that does not answer or owns
    /// nothing, a partition owned by none or by two, or one behind its end, replaying or
    /// with detection pending.
    fn unsettled(nodes: &mut [&mut Daemon]) -> Vec<String> {
        let mut owners: BTreeMap<i64, usize> = BTreeMap::new();
        let mut problems = Vec::new();
        for (i, node) in nodes.iter_mut().enumerate() {
            // The partitions alone, as a monitor polling a node's progress reads them.
            let Some(status) = node.get("/status/kafka").and_then(|b| serde_json::from_str::<Value>(&b).ok()) else {
                problems.push(format!("node {i} does not answer"));
                continue;
            };
            let partitions = status["kafka"]["partitions"].as_array().cloned().unwrap_or_default();
            // Six partitions, at most three nodes: a node with none has not joined yet.
            if partitions.is_empty() {
                problems.push(format!("node {i} owns no partition yet"));
            }
            for p in partitions {
                let n = p["partition"].as_i64().unwrap_or(-1);
                *owners.entry(n).or_insert(0) += 1;
                let done = p["lag"] == 0 && p["replaying"] == false && p["detection_pending"] == false;
                if !done || p["next_offset"] != p["high_watermark"] {
                    problems.push(format!("node {i}: {p}"));
                }
            }
        }
        if owners.len() != PARTITIONS as usize || owners.values().any(|&n| n != 1) {
            problems.push(format!("partition owners: {owners:?}"));
        }
        problems
    }

    /// The findings topic: every finding once, each in the partition of its device's rows,
    /// and exactly the reference's. `nodes` (killed ones too) give their ownership
    /// history to a failure message.
    fn check_findings(&self, nodes: &[&Daemon]) {
        let messages = self.mock.consume("findings");
        let rows = self.mock.consume("rows");
        // `split` writes `{"records":[…]}` messages, each record keyed by its DeviceId.
        let partition_of: BTreeMap<String, i32> = rows
            .iter()
            .flat_map(|(p, m)| m["records"].as_array().into_iter().flatten().map(move |r| (p, r)))
            .filter(|(_, r)| r["category"] != format!("AdvancedHunting-{BROADCAST}"))
            .filter_map(|(p, r)| Some((r["properties"]["DeviceId"].as_str()?.to_string(), *p)))
            .collect();
        assert!(!partition_of.is_empty(), "no record of the rows topic names its device");
        let mut ids: BTreeMap<String, usize> = BTreeMap::new();
        for (p, f) in &messages {
            let id = f["finding_id"].as_str().expect("finding_id").to_string();
            *ids.entry(id.clone()).or_insert(0) += 1;
            let device = f["device_id"].as_str().unwrap_or_default();
            let dp = partition_of.get(device).unwrap_or_else(|| panic!("finding {id}: no row of device {device:?}"));
            assert_eq!(*p, *dp, "finding {id} of device {device} is in partition {p}, its rows in {dp}");
        }
        let twice: Vec<&String> = ids.iter().filter(|(_, &n)| n > 1).map(|(id, _)| id).collect();
        assert!(
            twice.is_empty(),
            "findings produced more than once: {twice:?}\nwho owned what:\n{}",
            ownership_history(nodes)
        );
        let got: BTreeSet<String> = ids.into_keys().collect();
        let missing: Vec<String> = self
            .expected
            .iter()
            .filter(|(id, _)| !got.contains(*id))
            .map(|(id, detector)| format!("{id} ({detector})"))
            .collect();
        let detector_of: BTreeMap<&str, &str> =
            messages.iter().filter_map(|(_, f)| Some((f["finding_id"].as_str()?, f["detector"].as_str()?))).collect();
        let extra: Vec<String> = got
            .iter()
            .filter(|id| !self.expected.contains_key(*id))
            .map(|id| {
                let f = messages.iter().find(|(_, f)| f["finding_id"] == id.as_str()).map(|(p, f)| (p, &f["row"]));
                let (p, row) = f.map_or((&-1, &Value::Null), |(p, r)| (p, r));
                format!(
                    "{id} ({}, partition {p}, {} {} {} {})",
                    detector_of.get(id.as_str()).unwrap_or(&"?"),
                    row["DeviceId"],
                    row["FileName"],
                    row["SHA1"],
                    row["TimestampNetworkAct"]
                )
            })
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "findings topic ≠ one lookout over the same rows\n  missing: {missing:?}\n  extra: {extra:?}\nwho owned what:\n{}",
            ownership_history(nodes)
        );
    }

    /// Checks the rows stored over all nodes (each partition is owned once when settled):
    /// every event row once, and every broadcast row once in every partition.
    fn check_stored_rows(&self, nodes: &mut [&mut Daemon]) {
        let (mut events, mut broadcast) = (0, 0);
        for node in nodes.iter_mut() {
            let status = node.status();
            // The store would hide a row read twice; nothing here sends one twice.
            assert_eq!(status["duplicates_skipped"], 0, "a row was read twice: {status}");
            for (table, v) in status["tables"].as_object().into_iter().flatten() {
                let rows = v["rows"].as_u64().unwrap_or(0);
                match table.as_str() {
                    "FileProfile" => {}
                    BROADCAST => broadcast += rows,
                    _ => events += rows,
                }
            }
        }
        assert_eq!(events, self.event_rows, "event rows stored over the nodes");
        assert_eq!(broadcast, self.broadcast_rows * PARTITIONS as u64, "{BROADCAST} rows stored over the nodes");
    }
}

/// Each node's log lines about partitions changing hands and findings going out.
fn ownership_history(nodes: &[&Daemon]) -> String {
    const MARKS: [&str; 9] = [
        "partitions assigned",
        "given back",
        "partitions revoked",
        "taken over",
        "new findings",
        "moved to another node",
        "did not take this node's offset",
        "failed",
        "failpoint",
    ];
    let mut out = String::new();
    for (i, node) in nodes.iter().enumerate() {
        out.push_str(&format!("--- node {i}\n"));
        for line in node.log_text().lines().filter(|l| MARKS.iter().any(|m| l.contains(m))) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

const SETTLE: Duration = Duration::from_secs(120);

/// The issue's main case: three nodes, one SIGKILLed after the first half; the survivors
/// take its partitions over, replay them, and emit none of its findings again.
#[test]
fn a_killed_node_s_partitions_are_taken_over_with_every_finding_once() {
    let w = World::new(5);
    w.feed(0);
    let mut a = w.node("a").start();
    let mut b = w.node("b").start();
    let mut c = w.node("c").start();
    w.wait_settled(&mut [&mut a, &mut b, &mut c], SETTLE);
    let ahead = |d: &Daemon| d.log_text().matches("with its detectors loaded ahead").count();
    let ahead_before = ahead(&a) + ahead(&c);
    let killed = b.kill9();
    assert!(!killed.success());
    // The survivors take its partitions over and replay them (what it emitted is not
    // emitted again) before the second half arrives.
    w.wait_settled(&mut [&mut a, &mut c], SETTLE);
    // With detector sets the survivors loaded while idle, each with its own copies of the
    // libraries (detector instances shared between partitions would mix their windows).
    assert!(
        ahead(&a) + ahead(&c) > ahead_before,
        "no take-over after the kill used a set loaded ahead:\n{}",
        ownership_history(&[&a, &c])
    );
    w.feed(1);
    w.wait_settled(&mut [&mut a, &mut c], SETTLE);
    w.check_findings(&[&a, &b, &c]);
    w.check_stored_rows(&mut [&mut a, &mut c]);
}

/// A partition whose pass fails every time (one detector's state reads as damaged: a
/// store failure, which ends the pass) still emits what its other detectors found and
/// committed. Before, nothing of such a partition went out, for as long as it failed.
#[test]
fn a_partition_whose_pass_fails_still_emits_its_other_detectors_findings() {
    let w = World::new(13);
    w.feed(0);
    // Passes not waiting for a quiet moment (the default): a pass is due at every round.
    let a = w.node_passing_after("a", "0").failpoint(Some("state-unreadable-scheduled-task-persistence")).start();
    let started = Instant::now();
    loop {
        let found = w.mock.consume("findings");
        let detectors: BTreeSet<String> =
            found.iter().filter_map(|(_, f)| f["detector"].as_str().map(str::to_string)).collect();
        assert!(!detectors.contains("scheduled-task-persistence"), "{detectors:?}");
        if detectors.contains("winrm-plugin-lateral-movement") {
            break;
        }
        assert!(started.elapsed() < SETTLE, "no WinRM finding emitted:\n{}", a.log_tail(3000));
        std::thread::sleep(Duration::from_secs(1));
    }
    let log = a.log_text();
    assert!(log.contains("the pass of detector scheduled-task-persistence"), "{}", a.log_tail(3000));
}

/// A node stopped whole between finding and emitting (no thread runs, no heartbeat: the
/// group drops it, as it would a node starved of CPU) and continued once the survivor has
/// taken its partitions over and emitted what it found: it emits none of it again.
#[test]
fn a_node_stopped_before_emitting_emits_nothing_twice_once_continued() {
    let w = World::new(11);
    let mut a = w.node("a").start();
    let mut b = w.node("b").failpoint(Some("kafka-before-emit")).start();
    w.feed(0);
    let stopped = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('T')))
            .unwrap_or(false)
    };
    let started = Instant::now();
    while !stopped(b.pid()) {
        assert!(started.elapsed() < SETTLE, "the failpoint was not hit:\n{}", b.log_tail(3000));
        std::thread::sleep(Duration::from_millis(200));
    }
    w.wait_settled(&mut [&mut a], SETTLE);
    let cont = std::process::Command::new("kill").args(["-CONT", &b.pid().to_string()]).status().expect("kill -CONT");
    assert!(cont.success());
    w.wait_settled(&mut [&mut a, &mut b], SETTLE);
    w.feed(1);
    w.wait_settled(&mut [&mut a, &mut b], SETTLE);
    w.check_findings(&[&a, &b]);
    w.check_stored_rows(&mut [&mut a, &mut b]);
}

/// A node restarted with no `--retention` keeps the one its data directory was run with.
/// It runs on the real clock, which is long past this fleet's timestamps: the 31-day
/// default would remove every row for good.
#[test]
fn a_node_restarted_with_no_retention_keeps_the_recorded_one() {
    let w = World::new(12);
    w.feed(0);
    w.feed(1);
    let node = || {
        DaemonSpec::new(&w.root.path().join("a"))
            .args(["--kafka", "--brokers", &w.mock.brokers, "--topic", "rows", "--group", "nodes"])
            .args(["--findings-topic", "findings"])
            .plugins(&w.plugins)
            .logs(&w.profiles)
            .rescan_secs(0.5)
    };
    // `--retention none`, as every test node.
    let mut a = node().start();
    w.wait_settled(&mut [&mut a], SETTLE);
    w.check_stored_rows(&mut [&mut a]);
    a.terminate(Duration::from_secs(60));
    let mut a = node().no_retention_flag().start();
    assert!(
        a.wait_log("no retention given: keeping the one this node's data directory recorded", Duration::from_secs(30)),
        "{}",
        a.log_tail(3000)
    );
    w.wait_settled(&mut [&mut a], SETTLE);
    // Every round moves the horizon and expires what is behind it: a few of them.
    std::thread::sleep(Duration::from_secs(3));
    w.check_stored_rows(&mut [&mut a]);
}

/// A node whose JSONL cannot be written (a file where its folder should be) goes on: it
/// keeps its place in the group (its work loop is not restarted, which would make it
/// rejoin) and stores what comes; its findings wait, out of the topic too (a take-over
/// passes over in the JSONL what it finds in the topic), across a restart too (a stop
/// then exits 1); once the JSONL can be written, both get every finding, once.
#[test]
fn a_findings_file_that_cannot_be_written_keeps_the_node_in_its_group_and_its_findings_waiting() {
    let w = World::new(14);
    w.feed(0);
    let folder = w.root.path().join("out");
    std::fs::write(&folder, "").unwrap();
    let jsonl = folder.join("findings.jsonl");
    let mut a = w.node("a").findings(&jsonl).start();
    w.wait_settled(&mut [&mut a], SETTLE);
    w.feed(1);
    w.wait_settled(&mut [&mut a], SETTLE);
    w.check_stored_rows(&mut [&mut a]);
    let m = a.metrics();
    assert_eq!(metric(&m, "lookout_work_restarts_total"), Some(0.0), "{m}");
    assert!(metric(&m, "lookout_findings_write_failures_total").is_some_and(|n| n >= 1.0), "{m}");
    let all_waiting = |a: &mut Daemon| {
        a.wait_for("every finding to be counted as unwritten", SETTLE, |a| {
            match metric(&a.metrics(), "lookout_findings_unwritten") {
                Some(n) if n as usize == w.expected.len() => Ok(()),
                other => Err(format!("{other:?} of {}", w.expected.len())),
            }
        });
        let in_topic = w.mock.consume("findings");
        assert!(in_topic.is_empty(), "{} findings in the topic and not in the JSONL", in_topic.len());
    };
    all_waiting(&mut a);
    // Stopped meanwhile: not a clean stop. Started again, the node takes its partitions
    // over from its own stores, and its findings wait as before.
    a.sigterm();
    let stopped = a.wait_exit(Duration::from_secs(60)).expect("the node stops");
    assert!(!stopped.success(), "a stop with findings unwritten exits 0:\n{}", a.log_tail(2000));
    let said = format!("stopped with {} findings not written", w.expected.len());
    assert!(a.log_text().contains(&said), "{}", a.log_tail(2000));
    let mut a = w.node("a").findings(&jsonl).start();
    w.wait_settled(&mut [&mut a], SETTLE);
    all_waiting(&mut a);
    // The folder back: every finding goes out, to both, with no restart.
    std::fs::remove_file(&folder).unwrap();
    std::fs::create_dir(&folder).unwrap();
    let written = || -> Vec<String> {
        std::fs::read_to_string(&jsonl)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["finding_id"].as_str().map(str::to_string))
            .collect()
    };
    a.wait_for("the JSONL to hold every finding", SETTLE, |_| {
        let ids = written();
        if ids.len() >= w.expected.len() {
            Ok(())
        } else {
            Err(format!("{} of {}", ids.len(), w.expected.len()))
        }
    });
    let ids = written();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a finding written twice");
    assert_eq!(unique, w.expected.keys().collect::<BTreeSet<_>>());
    a.wait_for("the topic to hold every finding", SETTLE, |_| {
        let n = w.mock.consume("findings").len();
        if n >= w.expected.len() {
            Ok(())
        } else {
            Err(format!("{n} of {}", w.expected.len()))
        }
    });
    w.check_findings(&[&a]);
    let m = a.metrics();
    assert_eq!(metric(&m, "lookout_findings_unwritten"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "lookout_work_restarts_total"), Some(0.0), "{m}");
}

/// A node killed right after a batch of rows and their offset are committed to its
/// store, before the group's offset is: restarted, it goes on from its store's offset.
#[test]
fn a_kill_between_the_store_commit_and_the_kafka_commit_loses_and_repeats_nothing() {
    let w = World::new(6);
    w.feed(0);
    let mut a = w.node("a").start();
    let mut b = w.node("b").failpoint(Some("kafka-after-store-commit")).spawn();
    let status = b.wait_exit(Duration::from_secs(120));
    assert!(status.is_some_and(|s| !s.success()), "the failpoint was not hit:\n{}", b.log_tail(3000));
    let mut b = w.node("b").start();
    w.wait_settled(&mut [&mut a, &mut b], SETTLE);
    w.feed(1);
    w.wait_settled(&mut [&mut a, &mut b], SETTLE);
    w.check_findings(&[&a, &b]);
    w.check_stored_rows(&mut [&mut a, &mut b]);
}

/// A broker down and back while the second half arrives.
#[test]
fn a_broker_down_and_back_loses_and_repeats_nothing() {
    let w = World::new(7);
    w.feed(0);
    let mut a = w.node("a").start();
    let mut b = w.node("b").start();
    w.wait_settled(&mut [&mut a, &mut b], SETTLE);
    // Down while the second half is produced, split and consumed; back after 5 s (the
    // producers and consumers of its partitions wait and retry meanwhile).
    w.mock.produce("in", &w.halves[1]);
    w.mock.broker("down 2");
    let stats = std::thread::scope(|s| {
        let splitting = s.spawn(|| w.split_idle(None, 12));
        std::thread::sleep(Duration::from_secs(5));
        w.mock.broker("up 2");
        splitting.join().unwrap_or_else(|_| panic!("the split failed while a broker was down"))
    });
    assert!(stats["produced"].as_u64().is_some_and(|p| p > 0), "{stats}");
    w.wait_settled(&mut [&mut a, &mut b], SETTLE);
    w.check_findings(&[&a, &b]);
    w.check_stored_rows(&mut [&mut a, &mut b]);
}

/// A node added mid-run takes some partitions over; the nodes that gave them up drop
/// their rows.
#[test]
fn a_node_added_mid_run_takes_partitions_over() {
    let w = World::new(8);
    w.feed(0);
    let mut a = w.node("a").start();
    let mut b = w.node("b").start();
    w.wait_settled(&mut [&mut a, &mut b], SETTLE);
    let mut c = w.node("c").start();
    w.wait_settled(&mut [&mut a, &mut b, &mut c], SETTLE);
    w.feed(1);
    w.wait_settled(&mut [&mut a, &mut b, &mut c], SETTLE);
    w.check_findings(&[&a, &b, &c]);
    w.check_stored_rows(&mut [&mut a, &mut b, &mut c]);
    // Partitions that moved away were dropped from the nodes that had them.
    for (name, node) in [("a", &mut a), ("b", &mut b), ("c", &mut c)] {
        let owned: BTreeSet<String> = node.status()["kafka"]["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("rows-{}", p["partition"]))
            .collect();
        let on_disk: BTreeSet<String> = std::fs::read_dir(w.root.path().join(name).join("partitions"))
            .expect("partitions folder")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(on_disk, owned, "node {name}: partition folders on disk vs owned");
    }
    // Stopped, each node's `status` adds up its partitions' stores.
    let running: u64 = [&mut a, &mut b, &mut c]
        .iter_mut()
        .map(|n| n.status()["tables"]["DeviceFileEvents"]["rows"].as_u64().unwrap_or(0))
        .sum();
    let mut stopped = 0;
    for (name, node) in [("a", &mut a), ("b", &mut b), ("c", &mut c)] {
        node.terminate(Duration::from_secs(30));
        stopped += lookout_tests::table_rows(&w.root.path().join(name), "DeviceFileEvents");
    }
    assert!(running > 0);
    assert_eq!(stopped, running, "status of the stopped nodes");
}

/// `split` crashing after producing a batch and before committing its input offsets
/// produces the batch again when restarted; the stores keep each row once.
#[test]
fn split_run_twice_over_the_same_input_stores_no_row_twice() {
    let w = World::new(9);
    w.feed(0);
    let mut a = w.node("a").start();
    let mut b = w.node("b").start();
    w.wait_settled(&mut [&mut a, &mut b], SETTLE);
    // The crash cuts the second half where it happens. The nodes are stopped until the
    // split's second run is over, so that they pass over the whole half at once, as one
    // lookout over each half does: a pass over the cut half alone may find what the
    // reference does not (a SHA1 still rare), and how long the restarted split takes to
    // rejoin its group (the dead member's session timeout) is no test's to bound.
    a.terminate(Duration::from_secs(30));
    b.terminate(Duration::from_secs(30));
    let before = w.mock.consume("rows").len();
    w.mock.produce("in", &w.halves[1]);
    w.split(Some("split-after-produce"));
    let crashed = w.mock.consume("rows").len();
    assert!(crashed > before, "nothing was produced before the crash");
    let stats = w.split(None);
    let again = w.mock.consume("rows").len();
    assert!(again > crashed, "the restarted split produced nothing again ({crashed} then {again}): {stats}");
    let mut a = w.node("a").start();
    let mut b = w.node("b").start();
    w.wait_settled(&mut [&mut a, &mut b], SETTLE);
    // The records produced twice were read twice and stored once.
    let skipped: u64 =
        [&mut a, &mut b].iter_mut().map(|n| n.status()["duplicates_skipped"].as_u64().unwrap_or(0)).sum();
    assert!(skipped > 0, "the records produced again never reached the stores");
    let stored: u64 = [&mut a, &mut b]
        .iter_mut()
        .map(|n| {
            let status = n.status();
            status["tables"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(t, _)| t.as_str() != "FileProfile" && t.as_str() != BROADCAST)
                .map(|(_, v)| v["rows"].as_u64().unwrap_or(0))
                .sum::<u64>()
        })
        .sum();
    assert_eq!(stored, w.event_rows, "every event row stored once");
    w.check_findings(&[&a, &b]);
}

/// The split keeps aside what it cannot key: records with no DeviceId and messages that
/// are not JSON go to their topics, counted, and the rest goes on.
#[test]
fn split_counts_and_keeps_aside_what_it_cannot_key() {
    let w = World::new(10);
    let odd = w.root.path().join("odd");
    std::fs::create_dir_all(&odd).expect("mkdir");
    let file = odd.join("DeviceFileEvents.jsonl");
    std::fs::write(&file, "{\"Timestamp\":\"2025-05-07T10:00:00Z\",\"ReportId\":1}\n").expect("write");
    w.mock.produce("in", &[file]);
    // Not JSON; a batch with a record that is not an object; a keyed record.
    let raw = odd.join("raw");
    let keyed = r#"{"category":"AdvancedHunting-DeviceFileEvents","properties":{"DeviceId":"d1","ReportId":2}}"#;
    // And a batch one record of which cannot be read (a number out of range): the others
    // go on.
    let unreadable =
        r#"{"category":"AdvancedHunting-DeviceFileEvents","properties":{"DeviceId":"d3","FileSize":1e400}}"#;
    let other = r#"{"category":"AdvancedHunting-DeviceFileEvents","properties":{"DeviceId":"d2","ReportId":3}}"#;
    std::fs::write(&raw, format!("not json\n{{\"records\":[1,{keyed}]}}\n{{\"records\":[{unreadable},{other}]}}\n"))
        .expect("write");
    let out = Command::new(mock_bin())
        .args(["produce-raw", "--brokers", &w.mock.brokers, "--topic", "in"])
        .arg(&raw)
        .output()
        .expect("produce-raw");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = lookout(
        &w.root.path().join("unused"),
        &["split", "--brokers", &w.mock.brokers, "--from", "in", "--to", "rows", "--idle-exit", "3"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stats: Value = serde_json::from_slice(&out.stdout).expect("stats");
    assert_eq!(stats["unkeyed"], 1, "{stats}");
    assert_eq!(stats["rejected"], 3, "{stats}");
    assert_eq!(stats["produced"], 2, "{stats}");
    assert_eq!(stats["produced_messages"], 2, "{stats}");
    assert_eq!(w.mock.consume("rows.unkeyed").len(), 1);
    // Keyed records go out as Streaming-API messages, here of one record each.
    let rows = w.mock.consume("rows");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r.1["records"].as_array().map(Vec::len) == Some(1)), "{rows:?}");
    let devices: BTreeSet<&str> =
        rows.iter().filter_map(|r| r.1["records"][0]["properties"]["DeviceId"].as_str()).collect();
    assert_eq!(devices, BTreeSet::from(["d1", "d2"]));
}

/// A findings topic partitioned otherwise than the rows topic is named when the node
/// starts, with what to do (it used to fail take-over after take-over).
#[test]
fn a_findings_topic_with_another_partition_count_is_refused_at_the_start() {
    let w = World::new(10);
    let data = w.root.path().join("node");
    let mut cmd = Command::new(lookout_bin());
    cmd.arg("--data").arg(&data).args(["run", "--kafka", "--brokers", &w.mock.brokers, "--topic", "rows"]);
    cmd.args(["--group", "nodes", "--findings-topic", "in", "--listen", "127.0.0.1:0"])
        .arg("--plugins")
        .arg(&w.plugins);
    let out = run_bounded(cmd, Duration::from_secs(60));
    assert!(!out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("findings topic in has 1 partition(s) and rows has 6"), "{}", out.stderr);
    // Its endpoint was up while it checked: its address is not left behind.
    assert!(!data.join("daemon.addr").exists(), "a refused node left its address behind");
}
