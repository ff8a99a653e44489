//! The incremental WinRM detector must emit exactly what a scheduled KQL rule would:
//! the union, over the evaluation times of its passes, of the batch query's result over
//! everything stored so far — each pair once — for any split of the input into ticks,
//! any arrival order, and restarts between ticks (DESIGN.md, "Incremental meaning").
//!
//! The oracle is `naive::evaluate`, a nested-loop batch evaluator written from the
//! semantics table of DESIGN.md, independently of the plugin.
//!
//! Each tick writes its rows to JSONL files named after their tables, ingests them with a
//! fixed ingestion time, runs one detection pass at a fixed evaluation time and flushes
//! the outbox. After every tick, the findings JSONL and the results tree must hold
//! exactly the union of the naive results at the evaluation times so far, each pair once.
//! Time moves by minutes, by more than the 2-day timeframe (loads fall out of it), or by
//! exactly the timeframe (loads sit on its boundary); the store and plugins are sometimes
//! reopened before a tick or between its ingest and its pass; some passes hand the
//! detector its new rows a few at a time.
//!
//! `PROPTEST_CASES=500 cargo test -p lookout-cli --test incremental_property` soaks it.

mod naive;

use lookout_core::detect::{run_pass, DetectOptions};
use lookout_core::findings::{all_findings, flush_outbox};
use lookout_core::ingest::{ingest_paths, IngestOptions};
use lookout_core::plugin::{load_dir, Loaded};
use lookout_core::Store;
use lookout_plugin_sdk::time::{format_timestamp, parse_timestamp, TICKS_PER_SEC};
use lookout_tests::{plugins_dir, read_jsonl, WINRM};
use naive::{Identity, Pair, Params, StoredRow, FILE_EVENTS, FILE_PROFILE, IMAGE_LOADS};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const MINUTE: i64 = 60 * TICKS_PER_SEC;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// A pass evaluates this long after its tick's rows were ingested.
const EVAL_DELAY: i64 = 30 * TICKS_PER_SEC;

/// The first tick's ingestion time.
fn t0() -> i64 {
    parse_timestamp("2025-05-07T12:00:00Z").unwrap()
}

// ---------------------------------------------------------------------------------------
// The harness: ticks of rows through the engine, and through the naive evaluator.
// ---------------------------------------------------------------------------------------

/// One tick: rows arriving together, ingested at `now`, then one detection pass at
/// `now + EVAL_DELAY`.
#[derive(Debug, Clone)]
struct Tick {
    now: i64,
    restart: Restart,
    /// New rows handed to the detector per call in this tick's pass (`None`: the default).
    chunk_rows: Option<usize>,
    /// (table, row) in arrival order.
    rows: Vec<(&'static str, Map<String, Value>)>,
}

impl Tick {
    fn new(now: i64, restart: Restart, rows: Vec<(&'static str, Map<String, Value>)>) -> Tick {
        Tick { now, restart, chunk_rows: None, rows }
    }
}

/// Where in a tick the store and the loaded plugins are dropped and opened/loaded again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    No,
    /// Before the tick's rows are ingested.
    Before,
    /// After its rows are ingested, before its detection pass.
    BeforePass,
}

struct Engine {
    store: Store,
    loaded: Loaded,
}

fn open_engine(plugins: &Path, data: &Path) -> Result<Engine, String> {
    // sled releases its directory lock from background threads shortly after the last
    // handle is dropped, so an in-process reopen may briefly find it still held (a real
    // restart is a new process). Wait for it, for a few seconds at most.
    let mut attempts = 0;
    let store = loop {
        match Store::open(data) {
            Ok(s) => break s,
            Err(e) if attempts < 100 && is_lock_error(&format!("{e:#}")) => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(format!("Store::open: {e:#}")),
        }
    };
    let loaded = load_dir(plugins, data).map_err(|e| format!("load_dir: {e:#}"))?;
    if !loaded.refused.is_empty() || loaded.plugins.len() != 1 {
        let refused: Vec<String> =
            loaded.refused.iter().map(|r| format!("{}: {}", r.path.display(), r.reason)).collect();
        return Err(format!(
            "expected the WinRM plugin alone to load; loaded {}, refused {refused:?}",
            loaded.plugins.len()
        ));
    }
    Ok(Engine { store, loaded })
}

fn is_lock_error(msg: &str) -> bool {
    msg.contains("could not acquire lock") || msg.contains("in use by another Lookout process")
}

/// The (load, write) identity pair of a finding's `row`.
fn pair_of_finding(f: &Value) -> Result<Pair, String> {
    let row = f.get("row").and_then(Value::as_object).ok_or_else(|| format!("finding without a row object: {f}"))?;
    let ident = |suffix: &str| -> Result<Identity, String> {
        let dev = row.get(&format!("DeviceId{suffix}")).and_then(Value::as_str);
        let rid = row.get(&format!("ReportId{suffix}")).and_then(Value::as_i64);
        let ts = row.get(&format!("Timestamp{suffix}")).and_then(Value::as_str);
        match (dev, rid, ts) {
            (Some(d), Some(r), Some(t)) => Ok((d.to_string(), r, t.to_string())),
            _ => Err(format!("finding row lacks DeviceId{suffix}/ReportId{suffix}/Timestamp{suffix}: {f}")),
        }
    };
    Ok((ident("")?, ident("1")?))
}

fn show_pair(p: &Pair) -> String {
    let ((ld, lr, lt), (wd, wr, wt)) = p;
    format!("load #{lr} ({ld}, {lt}) × write #{wr} ({wd}, {wt})")
}

/// One line per row, for failure messages.
fn show_row(table: &str, r: &Map<String, Value>) -> String {
    let g = |c: &str| r.get(c).map_or("-".to_string(), |v| v.to_string());
    match table {
        IMAGE_LOADS => format!(
            "load    #{} dev={} sha1={} folder={} proc={}",
            g("ReportId"),
            g("DeviceId"),
            g("SHA1"),
            g("FolderPath"),
            g("InitiatingProcessFileName")
        ),
        FILE_EVENTS => format!(
            "write   #{} dev={} sha1={} folder={} action={} ts={}",
            g("ReportId"),
            g("DeviceId"),
            g("SHA1"),
            g("FolderPath"),
            g("ActionType"),
            g("Timestamp")
        ),
        _ => format!(
            "profile #{} sha1={} prevalence={} availability={}",
            g("ReportId"),
            g("SHA1"),
            g("GlobalPrevalence"),
            g("ProfileAvailability")
        ),
    }
}

fn show_ticks(ticks: &[Tick]) -> String {
    let mut s = String::new();
    for (k, t) in ticks.iter().enumerate() {
        let _ = writeln!(
            s,
            "  tick {k}: ingest at {} (T0{:+.3}d), evaluate 30 s later{}{}",
            format_timestamp(t.now),
            (t.now - t0()) as f64 / DAY as f64,
            match t.restart {
                Restart::No => "",
                Restart::Before => ", restart before ingesting",
                Restart::BeforePass => ", restart between ingest and pass",
            },
            t.chunk_rows.map(|n| format!(", {n} rows per evaluate call")).unwrap_or_default()
        );
        for (table, r) in &t.rows {
            let _ = writeln!(s, "    {}", show_row(table, r));
        }
    }
    s
}

fn diff(what: &str, expected: &BTreeSet<Pair>, actual: &BTreeSet<Pair>) -> Option<String> {
    if expected == actual {
        return None;
    }
    let mut s = format!("{what}: expected {} pairs, got {}\n", expected.len(), actual.len());
    for p in expected.difference(actual) {
        let _ = writeln!(s, "  missing: {}", show_pair(p));
    }
    for p in actual.difference(expected) {
        let _ = writeln!(s, "  extra:   {}", show_pair(p));
    }
    Some(s)
}

/// Runs `ticks` through the engine (files → ingest → one pass → outbox, restarting where
/// asked) and checks after every tick that the findings JSONL and the results tree hold
/// exactly the union of the naive results so far, each once. Returns that union.
fn check_ticks(ticks: &[Tick]) -> Result<BTreeSet<Pair>, String> {
    check_ticks_inner(ticks).map_err(|e| format!("{e}\nscenario:\n{}", show_ticks(ticks)))
}

fn check_ticks_inner(ticks: &[Tick]) -> Result<BTreeSet<Pair>, String> {
    let root = tempfile::tempdir().map_err(|e| e.to_string())?;
    let plugins = plugins_dir(root.path(), &[WINRM]);
    let data = root.path().join("data");
    let findings_path = root.path().join("findings.jsonl");
    let params = Params::default();

    let mut engine = Some(open_engine(&plugins, &data)?);
    let mut stored: Vec<StoredRow> = Vec::new();
    let mut expected: BTreeSet<Pair> = BTreeSet::new();

    // Libraries are never unloaded; loading again re-initialises the detector from its
    // persisted state.
    let restart = |engine: &mut Option<Engine>| -> Result<(), String> {
        drop(engine.take());
        *engine = Some(open_engine(&plugins, &data)?);
        Ok(())
    };

    for (k, tick) in ticks.iter().enumerate() {
        if tick.restart == Restart::Before {
            restart(&mut engine)?;
        }
        let Engine { store, .. } = engine.as_mut().expect("engine is open");

        // The tick's rows, one JSONL file per table; the file name gives the table.
        let dir = root.path().join("in").join(format!("tick-{k}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut paths: Vec<PathBuf> = Vec::new();
        for table in [IMAGE_LOADS, FILE_EVENTS, FILE_PROFILE] {
            let lines: Vec<String> = tick
                .rows
                .iter()
                .filter(|(t, _)| *t == table)
                .map(|(_, r)| Value::Object(r.clone()).to_string())
                .collect();
            if lines.is_empty() {
                continue;
            }
            let path = dir.join(format!("{table}-{k}.jsonl"));
            std::fs::write(&path, lines.join("\n") + "\n").map_err(|e| e.to_string())?;
            paths.push(path);
        }
        if !paths.is_empty() {
            let opts = IngestOptions { now: Some(tick.now), ..Default::default() };
            let report =
                ingest_paths(store, &paths, &opts, &mut |_, _| {}).map_err(|e| format!("tick {k}: ingest: {e:#}"))?;
            let events = tick.rows.iter().filter(|(t, _)| *t != FILE_PROFILE).count() as u64;
            let new_events: u64 =
                report.new_rows.iter().filter(|(t, _)| t.as_str() != FILE_PROFILE).map(|(_, n)| n).sum();
            if report.total_rejected() != 0 || new_events != events {
                return Err(format!("tick {k}: ingest stored {new_events} of {events} event rows: {report:?}"));
            }
        }
        stored.extend(tick.rows.iter().map(|(table, row)| StoredRow {
            table: table.to_string(),
            ingested_at: tick.now,
            row: row.clone(),
        }));

        if tick.restart == Restart::BeforePass {
            restart(&mut engine)?;
        }
        let Engine { store, loaded } = engine.as_mut().expect("engine is open");
        let t_eval = tick.now + EVAL_DELAY;
        let mut opts = DetectOptions { now: Some(t_eval), ..Default::default() };
        if let Some(n) = tick.chunk_rows {
            opts.chunk_rows = n;
        }
        let reports = run_pass(store, &mut loaded.plugins, &opts).map_err(|e| format!("tick {k}: run_pass: {e:#}"))?;
        for r in &reports {
            if let Some(e) = &r.error {
                return Err(format!("tick {k}: detector {} failed: {e}", r.detector));
            }
        }
        flush_outbox(store, &findings_path).map_err(|e| format!("tick {k}: flush_outbox: {e:#}"))?;

        expected.extend(naive::evaluate(&stored, t_eval, &params));

        // The JSONL: each pair once, exactly the expected union.
        let lines = read_jsonl(&findings_path);
        let ids: BTreeSet<&str> = lines.iter().filter_map(|l| l.get("finding_id").and_then(Value::as_str)).collect();
        let mut file_pairs: BTreeMap<Pair, usize> = BTreeMap::new();
        for l in &lines {
            *file_pairs.entry(pair_of_finding(l)?).or_insert(0) += 1;
        }
        let twice: Vec<String> =
            file_pairs.iter().filter(|(_, n)| **n > 1).map(|(p, n)| format!("  {n}×: {}", show_pair(p))).collect();
        if ids.len() != lines.len() || !twice.is_empty() {
            return Err(format!(
                "after tick {k}: findings.jsonl has {} lines but {} distinct finding ids; pairs written more than \
                 once:\n{}",
                lines.len(),
                ids.len(),
                twice.join("\n")
            ));
        }
        let file_set: BTreeSet<Pair> = file_pairs.into_keys().collect();
        if let Some(d) = diff(&format!("after tick {k}: findings.jsonl vs naive union"), &expected, &file_set) {
            return Err(d);
        }

        // The results tree: the same set.
        let tree = all_findings(store).map_err(|e| format!("tick {k}: all_findings: {e:#}"))?;
        let tree_set: BTreeSet<Pair> = tree.iter().map(pair_of_finding).collect::<Result<_, _>>()?;
        if tree.len() != tree_set.len() {
            return Err(format!(
                "after tick {k}: results tree has {} findings for {} pairs",
                tree.len(),
                tree_set.len()
            ));
        }
        if let Some(d) = diff(&format!("after tick {k}: results tree vs naive union"), &expected, &tree_set) {
            return Err(d);
        }
    }
    Ok(expected)
}

// ---------------------------------------------------------------------------------------
// Rows.
// ---------------------------------------------------------------------------------------

fn load_row(report_id: i64, ts: i64, device: &str, sha1: &str, folder: &str, process: &str) -> Map<String, Value> {
    let file_name = folder.rsplit('\\').next().unwrap_or("");
    obj(json!({
        "Timestamp": format_timestamp(ts),
        "DeviceId": device,
        "DeviceName": format!("{}.contoso.local", device.to_ascii_lowercase()),
        "ActionType": "ImageLoaded",
        "FileName": file_name,
        "FolderPath": folder,
        "SHA1": sha1,
        "InitiatingProcessFileName": process,
        "InitiatingProcessId": 4242,
        "ReportId": report_id,
    }))
}

fn write_row(report_id: i64, ts: i64, device: &str, sha1: &str, folder: &str, action: &str) -> Map<String, Value> {
    let file_name = folder.rsplit('\\').next().unwrap_or("");
    obj(json!({
        "Timestamp": format_timestamp(ts),
        "DeviceId": device,
        "DeviceName": format!("{}.contoso.local", device.to_ascii_lowercase()),
        "ActionType": action,
        "FileName": file_name,
        "FolderPath": folder,
        "SHA1": sha1,
        "InitiatingProcessFileName": "powershell.exe",
        "ReportId": report_id,
    }))
}

fn profile_row(report_id: i64, sha1: &str, prevalence: Option<i64>, availability: Option<&str>) -> Map<String, Value> {
    obj(json!({
        "SHA1": sha1,
        "GlobalPrevalence": prevalence,
        "GlobalFirstSeen": "2025-04-01T00:00:00Z",
        "Signer": "",
        "ProfileAvailability": availability,
        "ReportId": report_id,
    }))
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(o) => o,
        _ => unreachable!("rows are objects"),
    }
}

// ---------------------------------------------------------------------------------------
// The property.
// ---------------------------------------------------------------------------------------

/// Device ids; the third differs from the first only in case.
const DEVICES: [&str; 3] = ["d-alpha", "d-beta", "D-ALPHA"];
/// A handful of SHA1s so that collisions happen; the last is the empty string.
const SHA1S: [&str; 4] = [
    "3395856ce81f2b7382dee72602f798b642f14140",
    "a94a8fe5ccb19ba61c4c0873d391e987982fbbd3",
    "da39a3ee5e6b4b0d3255bfef95601890afd80709",
    "",
];
/// Folder paths: one in the excluded .NET native-images folder, two that are equal only
/// under Unicode lowercasing (KELVIN SIGN lowercases to ASCII `k`), one non-ASCII, and
/// the empty path.
const FOLDERS: [&str; 6] = [
    r"C:\Windows\System32\WsmPlugin.dll",
    r"C:\ProgramData\Ölçer\Plugin.dll",
    r"C:\Windows\assembly\NativeImages_v4.0.30319_64\System\System.ni.dll",
    r"C:\Temp\Kelvin.dll",
    "C:\\Temp\\\u{212A}elvin.dll",
    "",
];
const PROCESSES: [&str; 3] = ["wsmprovhost.exe", "WsmProvHost.EXE", "svchost.exe"];
const ACTIONS: [&str; 4] = ["FileCreated", "fileModified", "FileRenamed", "FileDeleted"];
/// How long before T0 a write happened: well inside the 30-day lookback, inside it until
/// `now` moves on by a few days, already outside it. The last is exactly on the lookback
/// boundary of the first pass (`Timestamp >= ago(30d)` holds with equality).
const WRITE_AGES: [i64; 6] = [HOUR, 3 * DAY, 27 * DAY, 29 * DAY + 12 * HOUR, 31 * DAY, 30 * DAY - EVAL_DELAY];
const PREVALENCES: [Option<i64>; 5] = [None, Some(5), Some(99), Some(100), Some(5000)];
const AVAILABILITIES: [Option<&str>; 5] = [Some(""), Some("Available"), Some("Error"), Some("ERROR"), None];

#[derive(Debug, Clone)]
enum Spec {
    Load { dev: usize, sha: usize, upper: bool, folder: usize, case: usize, process: usize, minutes_ago: i64 },
    Write { dev: usize, sha: usize, upper: bool, folder: usize, case: usize, action: usize, age: usize, minutes: i64 },
    Profile { sha: usize, upper: bool, prevalence: usize, availability: usize },
}

/// How `now` moves from one tick to the next.
#[derive(Debug, Clone)]
enum Step {
    /// A few minutes.
    Small { minutes: i64 },
    /// More than the 2-day timeframe, so that earlier loads fall out of it.
    Big { minutes: i64 },
    /// Exactly so far that the previous tick's loads sit on the timeframe boundary
    /// (`ingestion_time() >= ago(2d)` still holds, with equality).
    Boundary,
}

#[derive(Debug, Clone)]
struct Scenario {
    devices: usize,
    /// Every row, in arrival order.
    rows: Vec<Spec>,
    /// Where the arrival order is cut into ticks (fractions of 256).
    cuts: Vec<u8>,
    steps: Vec<Step>,
    restarts: Vec<Restart>,
    /// Rows per evaluate call, per tick.
    chunks: Vec<Option<usize>>,
}

fn sha_index() -> impl Strategy<Value = usize> {
    prop_oneof![6 => Just(0usize), 2 => Just(1usize), 1 => Just(2usize), 1 => Just(3usize)]
}

fn folder_index() -> impl Strategy<Value = usize> {
    prop_oneof![8 => Just(0usize), 2 => Just(1usize), 2 => Just(2usize), 1 => Just(3usize), 1 => Just(4usize), 1 => Just(5usize)]
}

fn process_index() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(0usize), 3 => Just(1usize), 1 => Just(2usize)]
}

fn spec_load() -> impl Strategy<Value = Spec> {
    (0..3usize, sha_index(), prop::bool::weighted(0.15), folder_index(), 0..4usize, process_index(), 0..2000i64)
        .prop_map(|(dev, sha, upper, folder, case, process, minutes_ago)| Spec::Load {
            dev,
            sha,
            upper,
            folder,
            case,
            process,
            minutes_ago,
        })
}

fn spec_write() -> impl Strategy<Value = Spec> {
    (0..3usize, sha_index(), prop::bool::weighted(0.15), folder_index(), 0..4usize, 0..4usize, 0..6usize, 0..240i64)
        .prop_map(|(dev, sha, upper, folder, case, action, age, minutes)| Spec::Write {
            dev,
            sha,
            upper,
            folder,
            case,
            action,
            age,
            minutes,
        })
}

fn spec_profile() -> impl Strategy<Value = Spec> {
    // FileProfile rows need a SHA1: never the empty one.
    let sha = prop_oneof![6 => Just(0usize), 2 => Just(1usize), 1 => Just(2usize)];
    (sha, prop::bool::weighted(0.15), 0..5usize, 0..5usize)
        .prop_map(|(sha, upper, prevalence, availability)| Spec::Profile { sha, upper, prevalence, availability })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let rows = (
        prop::collection::vec(spec_load(), 5..=30),
        prop::collection::vec(spec_write(), 5..=30),
        prop::collection::vec(spec_profile(), 0..=4),
    )
        .prop_flat_map(|(loads, writes, profiles)| {
            let mut all = loads;
            all.extend(writes);
            all.extend(profiles);
            Just(all).prop_shuffle()
        });
    let step = prop_oneof![
        6 => (1..=90i64).prop_map(|minutes| Step::Small { minutes }),
        3 => (1..=90i64).prop_map(|minutes| Step::Big { minutes }),
        1 => Just(Step::Boundary),
    ];
    let restart = prop_oneof![
        5 => Just(Restart::No),
        4 => Just(Restart::Before),
        1 => Just(Restart::BeforePass),
    ];
    // Mostly the default; sometimes a pass split into many evaluate calls.
    let chunk = prop_oneof![4 => Just(None), 1 => (1..=7usize).prop_map(Some)];
    (
        2..=3usize,
        rows,
        prop::collection::vec(any::<u8>(), 0..=4),
        prop::collection::vec(step, 5),
        prop::collection::vec(restart, 5),
        prop::collection::vec(chunk, 5),
    )
        .prop_map(|(devices, rows, cuts, steps, restarts, chunks)| Scenario {
            devices,
            rows,
            cuts,
            steps,
            restarts,
            chunks,
        })
}

fn case_variant(s: &str, case: usize) -> String {
    match case {
        0 => s.to_string(),
        1 => s.to_lowercase(),
        2 => s.to_uppercase(),
        _ => s.to_ascii_uppercase(),
    }
}

fn sha1_of(sha: usize, upper: bool) -> String {
    if upper {
        SHA1S[sha].to_ascii_uppercase()
    } else {
        SHA1S[sha].to_string()
    }
}

impl Scenario {
    fn ticks(&self) -> Vec<Tick> {
        let rows: Vec<(&'static str, Map<String, Value>)> = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let report_id = 1000 + i as i64;
                let device = |dev: usize| DEVICES[dev % self.devices];
                match *spec {
                    Spec::Load { dev, sha, upper, folder, case, process, minutes_ago } => (
                        IMAGE_LOADS,
                        load_row(
                            report_id,
                            t0() - minutes_ago * MINUTE,
                            device(dev),
                            &sha1_of(sha, upper),
                            &case_variant(FOLDERS[folder], case),
                            PROCESSES[process],
                        ),
                    ),
                    Spec::Write { dev, sha, upper, folder, case, action, age, minutes } => (
                        FILE_EVENTS,
                        write_row(
                            report_id,
                            t0() - WRITE_AGES[age] - if age == WRITE_AGES.len() - 1 { 0 } else { minutes * MINUTE },
                            device(dev),
                            &sha1_of(sha, upper),
                            &case_variant(FOLDERS[folder], case),
                            ACTIONS[action],
                        ),
                    ),
                    Spec::Profile { sha, upper, prevalence, availability } => (
                        FILE_PROFILE,
                        profile_row(
                            report_id,
                            &sha1_of(sha, upper),
                            PREVALENCES[prevalence],
                            AVAILABILITIES[availability],
                        ),
                    ),
                }
            })
            .collect();
        let mut cuts: Vec<usize> = self.cuts.iter().map(|&c| usize::from(c) * rows.len() / 256).collect();
        cuts.sort_unstable();
        cuts.push(rows.len());
        let mut ticks = Vec::new();
        let mut start = 0;
        let mut now = t0();
        for (k, &end) in cuts.iter().enumerate() {
            if k > 0 {
                now += match self.steps[k] {
                    Step::Small { minutes } => minutes * MINUTE,
                    Step::Big { minutes } => 2 * DAY + HOUR + minutes * MINUTE,
                    Step::Boundary => 2 * DAY - EVAL_DELAY,
                };
            }
            ticks.push(Tick {
                now,
                restart: if k > 0 { self.restarts[k] } else { Restart::No },
                chunk_rows: self.chunks[k],
                rows: rows[start..end].to_vec(),
            });
            start = end;
        }
        ticks
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        // ~1 s a case in a debug build; PROPTEST_CASES=500 for a soak run.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(24),
        // Keep the workspace clean: no proptest-regressions files.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// For any fleet, any split into ticks, any arrival order and any restarts, the
    /// findings are exactly R(t1) ∪ R(t2) ∪ … of the batch rule, each once.
    #[test]
    fn incremental_equals_union_of_batch_results(s in scenario()) {
        check_ticks(&s.ticks()).map_err(TestCaseError::fail)?;
    }
}

// ---------------------------------------------------------------------------------------
// Sharp edges, by hand: each also pins the naive evaluator to the expected pairs.
// ---------------------------------------------------------------------------------------

const SHA_A: &str = "3395856ce81f2b7382dee72602f798b642f14140";
const PLUGIN_DLL: &str = r"C:\ProgramData\WinRM\Plugin.dll";
const NATIVE_DLL: &str = r"C:\Windows\assembly\NativeImages_v4.0.30319_64\Plugin.dll";

fn pair(load: &Map<String, Value>, write: &Map<String, Value>) -> Pair {
    (naive::identity(load), naive::identity(write))
}

fn run(ticks: &[Tick]) -> BTreeSet<Pair> {
    check_ticks(ticks).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn load_arriving_in_a_later_tick_than_its_write() {
    let write = write_row(1, t0() - 3 * DAY, "d-alpha", SHA_A, PLUGIN_DLL, "FileCreated");
    let native_write = write_row(2, t0() - 3 * DAY, "d-alpha", SHA_A, NATIVE_DLL, "FileCreated");
    // Pairs with `write`: same SHA1 and device, FolderPath equal once lowercased.
    let load = load_row(3, t0() + HOUR, "d-alpha", SHA_A, &PLUGIN_DLL.to_uppercase(), "WsmProvHost.exe");
    // Must not pair: another device, another process, the excluded folder.
    let other_device = load_row(4, t0() + HOUR, "d-beta", SHA_A, PLUGIN_DLL, "wsmprovhost.exe");
    let other_process = load_row(5, t0() + HOUR, "d-alpha", SHA_A, PLUGIN_DLL, "svchost.exe");
    let native = load_row(6, t0() + HOUR, "d-alpha", SHA_A, &NATIVE_DLL.to_lowercase(), "wsmprovhost.exe");
    let ticks = vec![
        Tick::new(t0(), Restart::No, vec![(FILE_EVENTS, write.clone()), (FILE_EVENTS, native_write)]),
        Tick::new(t0() + 10 * MINUTE, Restart::No, vec![]),
        Tick::new(
            t0() + 2 * HOUR,
            Restart::Before,
            vec![
                (IMAGE_LOADS, load.clone()),
                (IMAGE_LOADS, other_device),
                (IMAGE_LOADS, other_process),
                (IMAGE_LOADS, native),
            ],
        ),
    ];
    assert_eq!(run(&ticks), BTreeSet::from([pair(&load, &write)]));
}

/// A write arriving after its load, in the same process: the detector must be handed the
/// new write although it narrows writes to its candidate SHA1s (the set it had when the
/// load arrived, kept up to date without a restart). A write of another file is not a
/// candidate; the upper-case copy of the SHA1 still is (`in~`).
#[test]
fn write_arriving_in_a_later_tick_than_its_load_without_restart() {
    let load = load_row(1, t0(), "d-alpha", SHA_A, PLUGIN_DLL, "wsmprovhost.exe");
    let write = write_row(2, t0() + HOUR, "d-alpha", &SHA_A.to_uppercase(), PLUGIN_DLL, "FileModified");
    let exact = write_row(3, t0() + HOUR, "d-alpha", SHA_A, PLUGIN_DLL, "FileCreated");
    let ticks = vec![
        Tick::new(t0() + MINUTE, Restart::No, vec![(IMAGE_LOADS, load.clone())]),
        Tick::new(t0() + 2 * HOUR, Restart::No, vec![(FILE_EVENTS, write), (FILE_EVENTS, exact.clone())]),
    ];
    // The SHA1 join itself is exact (`on SHA1`): only the exact write pairs.
    assert_eq!(run(&ticks), BTreeSet::from([pair(&load, &exact)]));
}

#[test]
fn a_later_file_profile_turns_a_load_into_a_candidate() {
    let load = load_row(1, t0(), "d-alpha", SHA_A, PLUGIN_DLL, "wsmprovhost.exe");
    let write = write_row(2, t0() - DAY, "d-alpha", SHA_A, &PLUGIN_DLL.to_lowercase(), "FileRenamed");
    let common = profile_row(3, SHA_A, Some(5000), Some("Available"));
    let rare = profile_row(4, SHA_A, Some(5), Some("Available"));
    let ticks = vec![
        Tick::new(
            t0(),
            Restart::No,
            vec![(FILE_PROFILE, common), (IMAGE_LOADS, load.clone()), (FILE_EVENTS, write.clone())],
        ),
        Tick::new(t0() + 30 * MINUTE, Restart::Before, vec![(FILE_PROFILE, rare)]),
    ];
    // Nothing after the first tick: the file is too common.
    assert_eq!(run(&ticks[..1]), BTreeSet::new());
    // The newer profile replaces the old one; the load, ingested 30 minutes ago, is now a
    // PotentialPlugin and pairs with the write stored before it.
    assert_eq!(run(&ticks), BTreeSet::from([pair(&load, &write)]));
}

#[test]
fn a_write_whose_sha1_differs_only_in_case_does_not_pair() {
    let load = load_row(1, t0(), "d-alpha", SHA_A, PLUGIN_DLL, "wsmprovhost.exe");
    // `SHA1 in~ (…)` lets the upper-case write through PotentialWrites, but the join on
    // SHA1 is case-sensitive.
    let upper = write_row(2, t0() - HOUR, "d-alpha", &SHA_A.to_ascii_uppercase(), PLUGIN_DLL, "FileCreated");
    let exact = write_row(3, t0() - HOUR, "d-alpha", SHA_A, PLUGIN_DLL, "FileModified");
    let ticks = vec![
        Tick::new(t0(), Restart::No, vec![(IMAGE_LOADS, load.clone())]),
        Tick::new(t0() + 5 * MINUTE, Restart::No, vec![(FILE_EVENTS, upper)]),
        Tick::new(t0() + 10 * MINUTE, Restart::BeforePass, vec![(FILE_EVENTS, exact.clone())]),
    ];
    assert_eq!(run(&ticks), BTreeSet::from([pair(&load, &exact)]));
}

/// Regression: at bc01a48 the store kept the *first* of two FileProfile rows for one SHA1
/// arriving in the same ingest batch (the second was counted as a duplicate), so the
/// newest profile did not win and this pair was missing.
#[test]
fn the_newest_of_two_profiles_in_one_tick_wins() {
    let load = load_row(1, t0(), "d-alpha", SHA_A, PLUGIN_DLL, "wsmprovhost.exe");
    let write = write_row(2, t0() - DAY, "d-alpha", SHA_A, PLUGIN_DLL, "FileCreated");
    let common = profile_row(3, SHA_A, Some(5000), Some("Available"));
    let rare = profile_row(4, SHA_A, Some(5), Some("Available"));
    let ticks = vec![Tick::new(
        t0(),
        Restart::No,
        vec![(IMAGE_LOADS, load.clone()), (FILE_EVENTS, write.clone()), (FILE_PROFILE, common), (FILE_PROFILE, rare)],
    )];
    assert_eq!(run(&ticks), BTreeSet::from([pair(&load, &write)]));
}
