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

use lookout_plugin_sdk::time::format_timestamp;
use lookout_tests::ticks::{
    obj, profile_row, proptest_config, split_ticks, t0, Restart, Rule, Tick, DAY, EVAL_DELAY, HOUR, MINUTE,
};
use lookout_tests::WINRM;
use naive::{Identity, Pair, Params, StoredRow, FILE_EVENTS, FILE_PROFILE, IMAGE_LOADS};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;

// ---------------------------------------------------------------------------------------
// The harness: ticks of rows through the engine (`lookout_tests::ticks`: each tick's rows
// ingested at its `now`, one pass at `now + EVAL_DELAY`), and through the naive evaluator.
// ---------------------------------------------------------------------------------------

const RULE: Rule =
    Rule { lib: WINRM, detector: lookout_winrm::NAME, tables: &[IMAGE_LOADS, FILE_EVENTS, FILE_PROFILE], show_row };

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

/// Runs `ticks` through the engine (files → ingest → one pass → outbox, restarting where
/// asked) and checks after every tick that the findings JSONL and the results tree hold
/// exactly the union of the naive results so far, each once. Returns that union.
fn check_ticks(ticks: &[Tick]) -> Result<BTreeSet<Pair>, String> {
    let params = Params::default();
    let mut stored: Vec<StoredRow> = Vec::new();
    let mut expected: BTreeSet<Pair> = BTreeSet::new();
    RULE.check_ticks(ticks, &[], |pass| {
        stored.extend(pass.tick.stored(|table, ingested_at, row| StoredRow { table, ingested_at, row }));
        expected.extend(naive::evaluate(&stored, pass.t_eval, &params));
        pass.check_union("pairs", &expected, pair_of_finding, show_pair)?;
        Ok(())
    })?;
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
        split_ticks(&rows, &self.cuts, 0, &self.restarts, &self.chunks, |k, _| match self.steps[k] {
            Step::Small { minutes } => minutes * MINUTE,
            Step::Big { minutes } => 2 * DAY + HOUR + minutes * MINUTE,
            Step::Boundary => 2 * DAY - EVAL_DELAY,
        })
    }
}

proptest! {
    // ~1 s a case in a debug build; PROPTEST_CASES=500 for a soak run.
    #![proptest_config(proptest_config(24))]

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

/// A SHA1 with a non-ASCII capital (not hex, but a string as sent): `in~` folds ASCII
/// case only, so the candidate kept from the load must be folded the same way as the
/// host folds the writes' SHA1s. Folded by Unicode (`É` → `é`), the write that arrives
/// later was never handed over, and the pair never found.
#[test]
fn a_sha1_with_a_non_ascii_capital_still_pairs_with_a_later_write() {
    let sha1 = "ÉA1b";
    let load = load_row(1, t0(), "d-alpha", sha1, PLUGIN_DLL, "wsmprovhost.exe");
    let write = write_row(2, t0() + HOUR, "d-alpha", sha1, PLUGIN_DLL, "FileCreated");
    let ticks = vec![
        Tick::new(t0() + MINUTE, Restart::No, vec![(IMAGE_LOADS, load.clone())]),
        Tick::new(t0() + 2 * HOUR, Restart::No, vec![(FILE_EVENTS, write.clone())]),
    ];
    assert_eq!(run(&ticks), BTreeSet::from([pair(&load, &write)]));
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
