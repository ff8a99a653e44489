//! The crash-loop harness: `lookout run` tails a generated fleet that a collector keeps
//! writing (random chunks, split anywhere) and rotating (rename, copytruncate, gzip,
//! deletion of old rotations once they have been read), and is killed again and again —
//! SIGKILL at random moments, SIGKILL right after start (store open, plugin load) and
//! injected aborts at named points (`LOOKOUT_FAILPOINT`: right after an ingest batch is
//! durable, before/after a detection commit, in the middle of/after the JSONL write) —
//! and restarted. At the end a last daemon catches up and is stopped with SIGTERM, and
//! everything is compared with a clean, uninterrupted run over the same data (`lookout
//! ingest` + `lookout detect`): the stored row identities and rows, the rows per table,
//! the findings in the results tree and in the JSONL (no line twice) must be the same.
//! Temporary plugin copies left by kills must be removed by the last daemon's plugin
//! load once they are stale (and a fresh one kept).
//!
//! The CI variant (12 kills) runs with the other tests. The long variant:
//!
//! ```sh
//! cargo build --release -p lookout-cli   # the release binary the long run drives
//! LOOKOUT_CRASH_KILLS=200 cargo test --release -p lookout-cli --test crash_loop -- --nocapture
//! ```
//!
//! Knobs (environment): `LOOKOUT_CRASH_KILLS` (12), `LOOKOUT_CRASH_SEED` (decimal or
//! 0x-hex; it fixes the fleet, the collector and the kill schedule — not the exact
//! interleaving with the daemon, which depends on timing), `LOOKOUT_CRASH_EVENTS`
//! (max(8000, 300 per kill)), `LOOKOUT_CRASH_ATTACKS` (max(12, 1 per 4 kills)),
//! `LOOKOUT_CRASH_KEEP=1` keeps the work folder (it is always kept on failure),
//! `LOOKOUT_CRASH_VERBOSE=1` prints every cycle (opening the store between runs to show
//! rows stored, duplicates skipped and how far the detector is behind).
//!
//! Finding ids must not depend on the order a store first meets the tables (they once
//! hashed store-local table numbers); with [`PIN_TABLE_ORDER`] false the crash run meets
//! the tables in whatever order its writer produces, so the harness checks that too.

use lookout_core::Store;
use lookout_plugin_sdk::Row;
use lookout_tests::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

const NOW: &str = "2025-05-08T00:00:00Z";
const FAILPOINTS: [&str; 10] = [
    "ingest-after-commit",
    // A batch's block frames appended to its generation's file, nothing else written; its
    // rows written to their generation, the batch not committed.
    "blocks-appended-before-commit",
    "generation-written-before-commit",
    "detect-before-commit",
    "detect-after-commit",
    "outbox-mid-write",
    "outbox-after-write",
    // A merge of key-index runs (after enough batches; retention's steps need a moving
    // clock and are crashed in crash_recovery.rs): its chunks written on the merge thread,
    // its run not named yet; named, its inputs' chunks not removed yet.
    "runs-merge-chunks-written",
    "runs-merge-before-commit",
    "runs-merge-before-sweep",
];
const DEFAULT_SEED: u64 = 0x10c0_0c7a_5eed;
const DETECTOR: &str = "winrm-plugin-lateral-movement@1.0.0";
/// Make the crash run number the tables as the clean run does (see the module comment).
const PIN_TABLE_ORDER: bool = false;

// ---------------------------------------------------------------------------------------
// Small things
// ---------------------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v}: not a number ({e})")))
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

// ---------------------------------------------------------------------------------------
// Kinds of kill and what came of them
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// SIGKILL a random moment after start (store open, endpoint, plugin load).
    Startup,
    /// SIGKILL a random moment after `daemon.addr` appears: the plugin load.
    PluginLoad,
    /// SIGKILL 0–400 ms after `/status` answers, while data flows.
    Running,
    /// `LOOKOUT_FAILPOINT=<name>`.
    Failpoint(&'static str),
}

impl Kind {
    fn name(&self) -> String {
        match self {
            Kind::Startup => "sigkill-startup".into(),
            Kind::PluginLoad => "sigkill-plugin-load".into(),
            Kind::Running => "sigkill-running".into(),
            Kind::Failpoint(f) => format!("failpoint {f}"),
        }
    }
}

struct CycleRecord {
    n: usize,
    kind: Kind,
    outcome: String,
    /// Milliseconds from spawn to exit.
    lived_ms: u64,
    written: usize,
}

/// Where a SIGKILL landed, from what the daemon had logged by then.
fn sigkill_phase(log: &str) -> &'static str {
    if !log.contains("lookout running") {
        "startup"
    } else if !log.contains("plugin loaded") {
        "plugin-load"
    } else {
        "running"
    }
}

/// Finding ids of the complete lines of a JSONL; duplicated ids and lines.
fn jsonl_ids(path: &Path) -> Result<(Vec<String>, Vec<String>), String> {
    let bytes = fs::read(path).unwrap_or_default();
    let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&bytes[..end]).map_err(|e| format!("{}: not UTF-8: {e}", path.display()))?;
    let mut ids = Vec::new();
    let mut lines = BTreeSet::new();
    let mut dup_lines = Vec::new();
    for l in text.lines() {
        let v: Value =
            serde_json::from_str(l).map_err(|e| format!("{}: a line is not JSON ({e}): {l}", path.display()))?;
        let id = v["finding_id"].as_str().ok_or_else(|| format!("a line without finding_id: {l}"))?;
        ids.push(id.to_string());
        if !lines.insert(l) {
            dup_lines.push(id.to_string());
        }
    }
    Ok((ids, dup_lines))
}

fn duplicates(ids: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    ids.iter().filter(|i| !seen.insert(i.as_str())).cloned().collect()
}

/// A row's identity independent of the store: its table's name and its key without the
/// store-local table number (event keys are `e`, table u16, …).
type Identity = (String, Vec<u8>);

/// Every stored row of the three tables by identity (the row's `key` field cleared).
fn stored_rows(data: &Path) -> BTreeMap<Identity, Row> {
    let store = Store::open(data).unwrap_or_else(|e| panic!("open {}: {e:#}", data.display()));
    let tables: Vec<String> = FLEET_TABLES.iter().map(|t| t.to_string()).collect();
    let keys = store.all_row_keys(&tables).expect("all_row_keys");
    let mut out = BTreeMap::new();
    for k in keys {
        let mut row = store.get_row::<lookout_plugin_sdk::Row>(&k).expect("get_row").expect("a listed key has a row");
        let rest = if k.first() == Some(&b'e') { k[3..].to_vec() } else { k.clone() };
        row.key.clear();
        assert!(out.insert((row.table.clone(), rest), row).is_none(), "a row identity is stored twice");
    }
    out
}

/// The temporary plugin copies (`.<stem>-<pid>.tmp`) in a plugin-cache folder.
fn plugin_temps(cache: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> =
        fs::read_dir(cache).map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
    out.retain(|p| {
        p.file_name().map(|n| n.to_string_lossy()).is_some_and(|n| n.starts_with('.') && n.ends_with(".tmp"))
    });
    out.sort();
    out
}

fn describe_row(r: &Row) -> String {
    format!(
        "{} ReportId={} DeviceId={} SHA1={} Timestamp={}",
        r.table,
        r.get("ReportId").map(|c| c.to_json().to_string()).unwrap_or_default(),
        r.str("DeviceId"),
        r.str("SHA1"),
        r.str("Timestamp")
    )
}

// ---------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------

#[test]
fn crash_loop() {
    let started = Instant::now();
    let kills = env_u64("LOOKOUT_CRASH_KILLS").unwrap_or(12).max(1) as usize;
    let seed = env_u64("LOOKOUT_CRASH_SEED").unwrap_or(DEFAULT_SEED);
    let events = env_u64("LOOKOUT_CRASH_EVENTS").unwrap_or((kills as u64 * 300).max(8000));
    let attacks = env_u64("LOOKOUT_CRASH_ATTACKS").unwrap_or((kills as u64 / 4).max(12));
    let verbose = env_flag("LOOKOUT_CRASH_VERBOSE");
    let debug = cfg!(debug_assertions);
    println!(
        "crash_loop: seed={seed:#x} kills={kills} events={events} attacks={attacks} ({} build)",
        if debug { "debug" } else { "release" }
    );
    let mut rng = Rng::new(seed);
    let tmp = tempfile::Builder::new().prefix("lookout-crash-loop-").tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let mut failures: Vec<String> = Vec::new();

    // The fleet.
    let fleet = gen_fleet(&root, events, attacks, seed);
    let fleet_logs = &fleet.logs;
    let plugins = plugins_dir(&root, &[WINRM]);

    // The clean, uninterrupted run over the same data.
    let clean = root.join("clean");
    let t = Instant::now();
    // The daemons under test keep every row (the harness passes `--retention none`): so
    // does the clean run.
    // The WinRM rule's tables only (the ones the collector below streams), in the order
    // ingesting the folder reads them (file names sorted).
    let mut files: Vec<String> =
        FLEET_TABLES.iter().map(|t| fleet_logs.join(format!("{t}.jsonl")).to_str().unwrap().to_string()).collect();
    files.sort();
    let mut args = vec!["ingest", "--retention", "none", "--now", NOW];
    args.extend(files.iter().map(String::as_str));
    lookout_ok(&clean, &args);
    let clean_ingest = t.elapsed();
    lookout_ok(&clean, &["detect", "--retention", "none", "--plugins", plugins.to_str().unwrap(), "--now", NOW]);
    let clean_status = status_json(&clean);
    let clean_tables = table_counts(&clean_status);
    let clean_rows_total: u64 = clean_tables.values().sum();
    assert_eq!(clean_status["rejected"], 0, "the clean run rejected records: {clean_status}");
    let (clean_jsonl_ids, clean_dups) = jsonl_ids(&clean.join("findings.jsonl")).unwrap();
    assert!(clean_dups.is_empty() && duplicates(&clean_jsonl_ids).is_empty(), "the clean run wrote a line twice");
    let clean_ids: BTreeSet<String> = clean_jsonl_ids.iter().cloned().collect();
    assert!(!clean_ids.is_empty(), "the clean run found nothing");
    // Reading one row costs about this much (calibrates the SIGTERM of ingest-after-commit).
    let per_row = clean_ingest / clean_rows_total.max(1) as u32;
    println!(
        "crash_loop: clean run: {clean_rows_total} rows ({clean_tables:?}), {} findings, ingest {:.1}s, after {:.1}s",
        clean_ids.len(),
        clean_ingest.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // The crash run.
    let logs = root.join("logs");
    fs::create_dir(&logs).unwrap();
    let daemon_logs = root.join("daemon-logs");
    fs::create_dir(&daemon_logs).unwrap();
    let data = root.join("data");
    let findings = root.join("out/findings.jsonl");
    fs::create_dir_all(findings.parent().unwrap()).unwrap();
    let spec = DaemonSpec::new(&data).logs(&logs).plugins(&plugins).findings(&findings).now(NOW).rescan_secs(0.2);
    let streams = vec![
        Stream::from_fleet(fleet_logs, "DeviceImageLoadEvents"),
        Stream::from_fleet(fleet_logs, "DeviceFileEvents"),
    ];
    // About 1 step in 7 rotates, 1 in 20 gzips, 1 in 33 deletes.
    let mut c = Collector::new(&logs, streams, seed.wrapping_add(1), [7, 7, 5, 3]);
    let total = c.total();
    let avg_line = total / (c.streams.iter().map(|s| s.data.iter().filter(|b| **b == b'\n').count()).sum::<usize>());
    // What the kill loop writes; the last daemon gets the rest.
    let loop_bytes = total * 85 / 100;
    let loop_started = Instant::now();

    let mut records: Vec<CycleRecord> = Vec::new();
    let mut phases: BTreeMap<String, u32> = BTreeMap::new();
    let mut kills_done = 0usize;
    let mut clean_stops = 0u32;
    let mut first_dup_cycle: Option<usize> = None;
    let mut max_rows_seen: BTreeMap<String, u64> = BTreeMap::new();
    let check_counts = |s: &Value, failures: &mut Vec<String>, max_seen: &mut BTreeMap<String, u64>, cycle: usize| {
        for (t, n) in table_counts(s) {
            let want = clean_tables.get(&t).copied().unwrap_or(0);
            let seen = max_seen.entry(t.clone()).or_insert(0);
            if n > want && *seen <= want {
                failures.push(format!("cycle {cycle}: table {t} holds {n} rows, the clean run {want} (stored twice)"));
            }
            *seen = (*seen).max(n);
        }
        if s["rejected"].as_u64().unwrap_or(0) > 0 {
            failures.push(format!("cycle {cycle}: rejected records: {s}"));
        }
    };

    // FileProfile must be stored before the events it vets: the first daemon stores it
    // before any event is written.
    fs::write(logs.join("FileProfile.jsonl"), fleet.read("FileProfile")).unwrap();
    // Table ids are numbered in the order a store first sees the tables, and finding ids
    // hash row keys that hold them: the first event table must be the clean run's first
    // (`lookout ingest` of the folder reads DeviceFileEvents.jsonl first), or every
    // finding id differs from the clean run's (see the report at the end).
    if PIN_TABLE_ORDER {
        let first_line = c.streams[1].data.iter().position(|b| *b == b'\n').unwrap() + 1;
        c.append(1, first_line);
    }
    // Spawn to plugin loaded, and daemon.addr to plugin loaded: measured on the first start.
    let mut startup_est = Duration::from_millis(100);
    let mut plugin_est = Duration::from_millis(50);
    let mut queue: Vec<Kind> = Vec::new();
    queue.extend([Kind::Startup, Kind::PluginLoad, Kind::Running]);
    queue.extend(FAILPOINTS.iter().copied().map(Kind::Failpoint));
    for i in (1..queue.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        queue.swap(i, j);
    }
    // The first cycle is always a running daemon (it stores the FileProfile feed first).
    queue.push(Kind::Running);

    let max_cycles = kills * 3 + 20;
    let mut cycle = 0usize;
    while kills_done < kills && cycle < max_cycles {
        cycle += 1;
        let mut kind = queue.pop().unwrap_or_else(|| match rng.below(100) {
            0..=34 => Kind::Running,
            35..=42 => Kind::Startup,
            43..=49 => Kind::PluginLoad,
            n => Kind::Failpoint(FAILPOINTS[((n - 50) as usize * FAILPOINTS.len()) / 50]),
        });
        let remaining_kills = (kills - kills_done).max(1);
        // Bytes this cycle writes; never nothing, so that a failpoint has data to meet.
        let budget = (loop_bytes.saturating_sub(c.written()) / remaining_kills).max(32 * 1024);
        let max_chunk = (budget / 3).clamp(2048, 96 * 1024);
        // ingest-after-commit needs one read of ≥ 256 lines to be stopped in (see below).
        let backlog_lines = 300usize;
        let big_stream = (0..c.streams.len()).max_by_key(|i| c.streams[*i].data.len() - c.streams[*i].pos).unwrap();
        if kind == Kind::Failpoint("ingest-after-commit")
            && c.streams[big_stream].data.len() - c.streams[big_stream].pos < backlog_lines * avg_line * 2
        {
            kind = Kind::Running;
        }
        let written_before = c.written();
        let log = daemon_logs.join(format!("{cycle:04}.log"));
        let fp = match kind {
            Kind::Failpoint(f) => Some(f),
            _ => None,
        };

        // Some writing while Lookout is down (the collector does not wait for it).
        if kind == Kind::Failpoint("ingest-after-commit") {
            let want = budget.max(backlog_lines * avg_line);
            let mut n = 0;
            while n < want && c.streams[big_stream].pos < c.streams[big_stream].data.len() {
                n += c.append(big_stream, max_chunk);
            }
            c.finish_line(big_stream);
        } else if cycle > 1 {
            let down = budget * rng.below(50) as usize / 100;
            while c.written() - written_before < down && !c.done() {
                c.step(max_chunk, None);
            }
        }

        let mut d = spec.clone().log(&log).failpoint(fp).spawn();
        let mut note = String::new();
        match kind {
            Kind::Startup => {
                std::thread::sleep(Duration::from_millis(rng.below(ms(startup_est) + 1)));
                d.kill9();
            }
            Kind::PluginLoad => {
                d.wait_addr(Duration::from_secs(60));
                std::thread::sleep(Duration::from_millis(rng.below(ms(plugin_est) + 1)));
                d.kill9();
            }
            Kind::Running => {
                d.wait_addr(Duration::from_secs(60));
                let addr_at = d.started().elapsed();
                if let Err(e) = d.wait_up(Duration::from_secs(60)) {
                    failures.push(format!("cycle {cycle}: a plain daemon did not come up: {e}"));
                }
                // Data flows once the detector is loaded.
                if !d.wait_log("plugin loaded", Duration::from_secs(60)) {
                    failures.push(format!("cycle {cycle}: the plugin was not loaded:\n{}", d.log_tail(3000)));
                }
                if cycle == 1 {
                    // The first start: measure the startup, then store the FileProfile feed.
                    startup_est = d.started().elapsed();
                    plugin_est = startup_est.saturating_sub(addr_at) + Duration::from_millis(5);
                    let want = clean_tables.get("FileProfile").copied().unwrap_or(0);
                    let r = d.try_wait_for(Duration::from_secs(60), |d| {
                        let s = d.try_status().ok_or("no /status answer")?;
                        let have = table_counts(&s);
                        let n = |t: &str| have.get(t).copied().unwrap_or(0);
                        let pinned = !PIN_TABLE_ORDER || n("DeviceFileEvents") == 1;
                        (n("FileProfile") == want && pinned).then_some(()).ok_or_else(|| format!("{have:?}"))
                    });
                    if let Err(e) = r {
                        failures.push(format!("the FileProfile feed was not stored: {e}"));
                    }
                }
                let deadline = Instant::now() + Duration::from_millis(rng.below(401));
                while Instant::now() < deadline {
                    if c.written() - written_before < budget && !c.done() {
                        c.step(max_chunk, Some(&mut d));
                    }
                    std::thread::sleep(Duration::from_millis(rng.below(20)));
                }
                if let Some(s) = d.try_status() {
                    check_counts(&s, &mut failures, &mut max_rows_seen, cycle);
                }
                d.kill9();
            }
            Kind::Failpoint("ingest-after-commit") => {
                // The failpoint sits after intermediate batch commits (8,192 rows, or every
                // 256 lines once a stop is asked): SIGTERM it while it reads the backlog.
                if d.wait_log("plugin loaded", Duration::from_secs(60)) {
                    let est = per_row * backlog_lines as u32;
                    std::thread::sleep(Duration::from_micros(rng.below(est.as_micros() as u64 + 1)));
                    d.sigterm();
                }
                if d.wait_exit(Duration::from_secs(60)).is_none() {
                    failures.push(format!("cycle {cycle}: the daemon did not exit within 60 s of SIGTERM"));
                    d.kill9();
                }
            }
            Kind::Failpoint(name) => {
                // Runs with data flowing until the failpoint fires, or is killed after a while.
                let window = Duration::from_millis(if name == "outbox-mid-write" { 5000 } else { 3000 });
                let window = if debug { window * 2 } else { window };
                let until = Instant::now() + window;
                while d.exit_status().is_none() && Instant::now() < until {
                    if c.written() - written_before < budget && !c.done() {
                        c.step(max_chunk, None);
                    } else if name == "outbox-mid-write" && c.written() - written_before < budget * 3 && !c.done() {
                        // A finding needs its load and its write: a little more data.
                        c.step(max_chunk, None);
                    }
                    std::thread::sleep(Duration::from_millis(rng.below(15)));
                }
                if d.exit_status().is_none() {
                    note = format!(" ({name} not reached)");
                }
                d.kill9();
            }
        }
        let status = d.exit_status().expect("the daemon has exited");
        let lived_ms = ms(d.started().elapsed());
        let text = d.log_text();
        let _ = fs::remove_file(data.join("daemon.addr"));
        let outcome = match (status.signal(), fp) {
            (Some(6), Some(f)) if text.contains(&format!("failpoint {f} hit")) => {
                kills_done += 1;
                *phases.entry(format!("failpoint {f}")).or_insert(0) += 1;
                format!("failpoint {f} fired")
            }
            (Some(9), _) => {
                kills_done += 1;
                let phase = sigkill_phase(&text);
                *phases.entry(format!("sigkill {phase}{note}")).or_insert(0) += 1;
                format!("SIGKILL in {phase}{note}")
            }
            (None, _) if status.success() && kind == Kind::Failpoint("ingest-after-commit") => {
                clean_stops += 1;
                "SIGTERM missed the reading: clean stop".to_string()
            }
            _ => {
                failures.push(format!(
                    "cycle {cycle} ({}): the daemon exited unexpectedly ({status}); log:\n{}",
                    kind.name(),
                    text_tail(&text, 3000)
                ));
                format!("unexpected exit {status}")
            }
        };
        if text.contains("lookout: error") || text.contains("work loop failed") {
            failures.push(format!(
                "cycle {cycle} ({}): the daemon reported an error; log:\n{}",
                kind.name(),
                text_tail(&text, 3000)
            ));
        }
        // A line written twice stays twice: find the cycle that did it.
        match jsonl_ids(&findings) {
            Ok((ids, dup_lines)) => {
                let strangers: Vec<&String> = ids.iter().filter(|i| !clean_ids.contains(*i)).collect();
                if !strangers.is_empty() && !failures.iter().any(|f| f.contains("not found by the clean run")) {
                    failures.push(format!(
                        "cycle {cycle} ({}, {outcome}): the JSONL holds finding(s) not found by the clean run: \
                         {strangers:?}",
                        kind.name()
                    ));
                }
                let dups = duplicates(&ids);
                if first_dup_cycle.is_none() && (!dups.is_empty() || !dup_lines.is_empty()) {
                    first_dup_cycle = Some(cycle);
                    failures.push(format!(
                        "cycle {cycle} ({}, {outcome}): the JSONL holds finding(s) twice: {dups:?}",
                        kind.name()
                    ));
                }
            }
            Err(e) => failures.push(format!("cycle {cycle}: {e}")),
        }
        let rec = CycleRecord { n: cycle, kind, outcome, lived_ms, written: c.written() };
        if verbose {
            // What is stored after the crash, and how far the detector's committed cursor
            // is behind (rows it has not finished a pass over).
            let store = Store::open(&data).expect("open the store between runs");
            let st = lookout_core::status::status(&store).expect("status");
            let rows: u64 = st.tables.values().map(|t| t.rows).sum();
            let lag = match store.meta_cursor(DETECTOR).expect("cursor") {
                Some(c) => store.head_seq().saturating_sub(c),
                None => store.head_seq(),
            };
            drop(store);
            println!(
                "  cycle {:4} {:32} lived {:5} ms  {:48} written {:5.1}%  stored {rows} rows ({} duplicates), \
                 detector {lag} batches behind",
                rec.n,
                rec.kind.name(),
                rec.lived_ms,
                rec.outcome,
                100.0 * rec.written as f64 / total as f64,
                st.duplicates_skipped
            );
        }
        records.push(rec);
    }
    if kills_done < kills {
        failures.push(format!("only {kills_done} of {kills} kills in {cycle} cycles"));
    }
    let loop_elapsed = loop_started.elapsed();

    // Temporary plugin copies. A private copy is written to `.<stem>-<pid>.tmp` in
    // plugin-cache and renamed into place; a kill in between leaves the temporary file
    // behind. Every plugin load (`guard::cache_dir`) removes those not modified for two
    // minutes and keeps younger ones, which a live copy (another lookout on the same data
    // directory) may still be writing. So once the last daemon has loaded its plugin,
    // every older temporary file must be gone and a fresh one still there. The kill loop
    // takes less than two minutes, so what it left is aged here (as if the box had been
    // down a while); one aged and one fresh file are planted so that the check never
    // runs on nothing.
    let cache = data.join("plugin-cache");
    fs::create_dir_all(&cache).unwrap();
    let left_by_kills = plugin_temps(&cache);
    let planted_stale = cache.join(".liblookout_winrm-planted-stale.tmp");
    let planted_fresh = cache.join(".liblookout_winrm-planted-fresh.tmp");
    fs::write(&planted_stale, b"half a copy").unwrap();
    fs::write(&planted_fresh, b"a copy being written").unwrap();
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let aged: Vec<PathBuf> = left_by_kills.iter().cloned().chain([planted_stale]).collect();
    for p in &aged {
        fs::File::open(p).and_then(|f| f.set_modified(an_hour_ago)).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }

    // The last daemon: the rest of the data, everything stored and written, SIGTERM.
    let mut d = spec.clone().log(&daemon_logs.join("final.log")).spawn();
    if let Err(e) = d.wait_up(Duration::from_secs(60)) {
        failures.push(format!("the last daemon did not come up: {e}"));
    }
    if d.wait_log("plugin loaded", Duration::from_secs(60)) {
        let remaining = plugin_temps(&cache);
        let kept: Vec<&PathBuf> = aged.iter().filter(|p| remaining.contains(p)).collect();
        if !kept.is_empty() {
            failures.push(format!("temporary plugin copies older than two minutes were not removed: {kept:?}"));
        }
        if !remaining.contains(&planted_fresh) {
            failures.push("a temporary plugin copy modified just now (a live copy's) was removed".into());
        }
    } else {
        failures.push(format!("the last daemon did not load its plugin:\n{}", d.log_tail(3000)));
    }
    while !c.done() {
        c.step(96 * 1024, Some(&mut d));
        std::thread::sleep(Duration::from_millis(rng.below(5)));
    }
    c.finish_lines();
    let want_findings = clean_ids.len();
    // Until it matches the clean run's figures, or holds too many rows (they never go
    // away), or stops making progress for a while.
    let mut progress = (String::new(), Instant::now());
    let settle = d.try_wait_for(Duration::from_secs(600), |d| {
        let Some(s) = d.try_status() else { return Err("no /status answer".into()) };
        let have = table_counts(&s);
        let lines = jsonl_ids(&findings).map(|(ids, _)| ids.len()).unwrap_or(0);
        let seen = format!(
            "rows {have:?} (clean {clean_tables:?}); findings {} in the tree, {lines} lines (clean {want_findings})",
            s["findings"]
        );
        let over = have.iter().any(|(t, n)| *n > clean_tables.get(t).copied().unwrap_or(0));
        if over
            || (have == clean_tables && s["findings"].as_u64() == Some(want_findings as u64) && lines >= want_findings)
        {
            return Ok(s);
        }
        if seen != progress.0 {
            progress = (seen.clone(), Instant::now());
        } else if progress.1.elapsed() > Duration::from_secs(30) {
            return Ok(s); // stuck: the comparison below says how
        }
        Err(seen)
    });
    match settle {
        Ok(s) => check_counts(&s, &mut failures, &mut max_rows_seen, cycle + 1),
        Err(e) => failures.push(format!("the last daemon never matched the clean run: {e}")),
    }
    if let Err(e) = d.wait_caught_up(&logs, Duration::from_secs(60)) {
        failures.push(format!("the last daemon did not catch up: {e}"));
    }
    d.sigterm();
    match d.wait_exit(Duration::from_secs(30)) {
        Some(st) if st.success() => {}
        Some(st) => failures.push(format!("the last daemon exited with {st} on SIGTERM:\n{}", d.log_tail(3000))),
        None => {
            d.kill9();
            failures.push("the last daemon did not exit within 30 s of SIGTERM".into());
        }
    }
    if data.join("daemon.addr").exists() {
        failures.push("a stopped daemon left daemon.addr behind".into());
    }
    drop(d);
    failures.append(&mut c.stalls);

    // Comparison with the clean run.
    let crash_status = status_json(&data);
    let crash_tables = table_counts(&crash_status);
    if crash_tables != clean_tables {
        failures.push(format!("rows per table: crash run {crash_tables:?}, clean run {clean_tables:?}"));
    }
    for (name, s) in [("crash", &crash_status), ("clean", &clean_status)] {
        if s["rejected"] != 0 {
            failures.push(format!("the {name} run rejected records: {s}"));
        }
    }
    // The results tree.
    let tree_ids = |data: &Path| -> Vec<String> {
        lookout_ok(data, &["findings", "--json"])
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["finding_id"].as_str().unwrap().to_string())
            .collect()
    };
    let (crash_tree, clean_tree) = (tree_ids(&data), tree_ids(&clean));
    for (name, ids) in [("crash", &crash_tree), ("clean", &clean_tree)] {
        let d = duplicates(ids);
        if !d.is_empty() {
            failures.push(format!("the {name} run's results tree holds finding(s) twice: {d:?}"));
        }
    }
    let crash_tree_set: BTreeSet<String> = crash_tree.iter().cloned().collect();
    let clean_tree_set: BTreeSet<String> = clean_tree.iter().cloned().collect();
    if crash_tree_set != clean_tree_set {
        failures.push(format!(
            "results tree: missing {:?}, extra {:?}",
            clean_tree_set.difference(&crash_tree_set).collect::<Vec<_>>(),
            crash_tree_set.difference(&clean_tree_set).collect::<Vec<_>>()
        ));
    }
    if clean_tree_set != clean_ids {
        failures.push("the clean run's results tree and JSONL differ".into());
    }
    // The JSONL: whole, no line twice, the same lines as the clean run.
    let crash_bytes = fs::read(&findings).unwrap_or_default();
    if !crash_bytes.is_empty() && !crash_bytes.ends_with(b"\n") {
        failures.push("the crash run's JSONL ends with a torn line".into());
    }
    let mut crash_jsonl_count = 0;
    match jsonl_ids(&findings) {
        Ok((ids, dup_lines)) => {
            crash_jsonl_count = ids.len();
            let d = duplicates(&ids);
            if !d.is_empty() || !dup_lines.is_empty() {
                failures.push(format!("the crash run's JSONL holds finding(s) twice: {d:?}"));
            }
            let set: BTreeSet<String> = ids.into_iter().collect();
            if set != clean_ids {
                failures.push(format!(
                    "JSONL finding ids: missing {:?}, extra {:?}",
                    clean_ids.difference(&set).collect::<Vec<_>>(),
                    set.difference(&clean_ids).collect::<Vec<_>>()
                ));
            }
            let lines = |p: &Path| -> BTreeSet<String> {
                fs::read_to_string(p).unwrap_or_default().lines().map(str::to_string).collect()
            };
            let (a, b) = (lines(&findings), lines(&clean.join("findings.jsonl")));
            if a != b && set == clean_ids {
                let diff: Vec<&String> = a.symmetric_difference(&b).take(2).collect();
                failures.push(format!("JSONL lines differ from the clean run's (same ids): {diff:?}"));
            }
        }
        Err(e) => failures.push(e),
    }
    // The stored rows, by identity and content.
    // By table name, not the store's own table number: the two stores may number the
    // tables differently (the crash run meets them in the order its writer produces), and
    // nothing that leaves a store (rows, finding ids) depends on the numbers.
    let crash_rows = stored_rows(&data);
    let clean_rows = stored_rows(&clean);
    let crash_keys: BTreeSet<&Identity> = crash_rows.keys().collect();
    let clean_keys: BTreeSet<&Identity> = clean_rows.keys().collect();
    if crash_keys != clean_keys {
        let missing: Vec<String> =
            clean_keys.difference(&crash_keys).take(10).map(|k| describe_row(&clean_rows[*k])).collect();
        let extra: Vec<String> =
            crash_keys.difference(&clean_keys).take(10).map(|k| describe_row(&crash_rows[*k])).collect();
        failures.push(format!(
            "stored row identities differ: {} missing, {} extra; missing e.g. {missing:#?}; extra e.g. {extra:#?}",
            clean_keys.difference(&crash_keys).count(),
            crash_keys.difference(&clean_keys).count()
        ));
    } else if let Some((k, r)) = crash_rows.iter().find(|(k, r)| clean_rows.get(*k) != Some(r)) {
        failures.push(format!("a stored row differs from the clean run's: {r:?}\nclean: {:?}", clean_rows.get(k)));
    }
    for (name, rows, tables) in [("crash", &crash_rows, &crash_tables), ("clean", &clean_rows, &clean_tables)] {
        let mut by_table: BTreeMap<String, u64> = BTreeMap::new();
        for r in rows.values() {
            *by_table.entry(r.table.clone()).or_insert(0) += 1;
        }
        if &by_table != tables {
            failures
                .push(format!("the {name} run's row counters {tables:?} disagree with its stored rows {by_table:?}"));
        }
    }
    let leftovers = left_by_kills.len();

    // The loop's cycles did what they are for: failpoints fired (a failpoint the daemon
    // ignored would end every such cycle in a counted SIGKILL, "not reached"; some, the
    // key-index merges', need more batches than a short cycle brings), and the collector
    // rotated its files under the daemon.
    let fired: u32 = phases.iter().filter(|(k, _)| k.starts_with("failpoint ")).map(|(_, n)| n).sum();
    let missed: u32 = phases.iter().filter(|(k, _)| k.contains(" not reached)")).map(|(_, n)| n).sum();
    if fired == 0 || fired < missed {
        failures.push(format!("failpoints fired in {fired} cycles and were not reached in {missed}: {phases:?}"));
    }
    if c.tally.renames + c.tally.copytruncates + c.tally.deletions == 0 {
        failures.push("the collector rotated no file under the daemon".to_string());
    }

    let phase_text: Vec<String> = phases.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    println!(
        "crash_loop: seed={seed:#x} kills={kills_done} [{}] clean-stops={clean_stops} cycles={cycle} | rows={} \
         findings={} (jsonl lines {crash_jsonl_count}) duplicates_skipped={} | collector: {} chunks ({} mid-line), \
         {} renames, {} copytruncates, {} gzips, {} deletions, {} rotations skipped | plugin-cache .tmp left by kills \
         (removed once stale): {leftovers} \
         | kill loop {:.1}s, elapsed {:.1}s",
        phase_text.join(", "),
        crash_tables.values().sum::<u64>(),
        crash_tree_set.len(),
        crash_status["duplicates_skipped"],
        c.tally.chunks,
        c.tally.partial_line_chunks,
        c.tally.renames,
        c.tally.copytruncates,
        c.tally.gzips,
        c.tally.deletions,
        c.tally.skipped_rotations,
        loop_elapsed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    if !failures.is_empty() {
        let kept = tmp.keep();
        let history: Vec<String> = records
            .iter()
            .map(|r| {
                format!(
                    "  cycle {:4} {:32} lived {:5} ms  {} (written {:.1}%)",
                    r.n,
                    r.kind.name(),
                    r.lived_ms,
                    r.outcome,
                    100.0 * r.written as f64 / total as f64
                )
            })
            .collect();
        panic!(
            "crash loop failed (seed {seed:#x}; rerun with LOOKOUT_CRASH_SEED={seed:#x} LOOKOUT_CRASH_KILLS={kills}); \
             work folder kept in {}\ncycles:\n{}\nfailures:\n- {}",
            kept.display(),
            history.join("\n"),
            failures.join("\n- ")
        );
    }
    if env_flag("LOOKOUT_CRASH_KEEP") {
        println!("crash_loop: work folder kept in {}", tmp.keep().display());
    }
}
