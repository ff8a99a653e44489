//! The `scheduled-task-persistence` detector (FalconFriday 0xFF-0082) end to end.
//!
//! - The property test: for random small fleets (near misses of every row of the rule's
//!   SEMANTICS table), any split into ticks, any arrival order across tables, restarts,
//!   small chunks and a clock that moves by minutes, by exactly a window and by more than a
//!   window (passes with no new rows run only when the detector asked to be woken), the
//!   findings after every pass are exactly the union over the passes so far of the naive
//!   evaluator (`naive_scheduled_task`, written from SEMANTICS.md and the KQL,
//!   independently of the plugin), each identity (SHA1, DeviceId) once, and each
//!   finding's row shows what the naive result showed at the pass that first found it.
//! - Golden tests: the vendored kqlbench exports (no DeviceProcessEvents export: 0
//!   findings) and a hand-written fixture whose result is computed by hand below.
//! - The generator: a generated fleet's planted findings, exactly.
//!
//! `PROPTEST_CASES=500 cargo test -p lookout-cli --test rule_scheduled_task` soaks it.

mod naive_scheduled_task;

use lookout_core::detect::DetectorReport;
use lookout_core::gen;
use lookout_plugin_sdk::time::{format_timestamp, parse_timestamp};
use lookout_tests::ticks::{
    obj, profile_row, proptest_config, t0, tick_ends, Engine, Restart, Rule, Tick, DAY, EVAL_DELAY, HOUR, MINUTE,
};
use lookout_tests::{kqlbench_dir, SCHEDULED_TASK};
use naive_scheduled_task::{Identity, Params, Shown, StoredRow, FILE_PROFILE, PROCESS_EVENTS};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const DETECTOR: &str = "scheduled-task-persistence";

// ---------------------------------------------------------------------------------------
// The engine: store + the detector's library (`lookout_tests::ticks`).
// ---------------------------------------------------------------------------------------

const RULE: Rule = Rule { lib: SCHEDULED_TASK, detector: DETECTOR, tables: &[PROCESS_EVENTS, FILE_PROFILE], show_row };

/// The identity of a finding line: (row.SHA1, row.DeviceId).
fn identity_of(f: &Value) -> Result<Identity, String> {
    let row = f.get("row").and_then(Value::as_object).ok_or_else(|| format!("finding without a row: {f}"))?;
    match (row.get("SHA1").and_then(Value::as_str), row.get("DeviceId").and_then(Value::as_str)) {
        (Some(s), Some(d)) => Ok((s.to_string(), d.to_string())),
        _ => Err(format!("finding row lacks SHA1/DeviceId: {f}")),
    }
}

/// What a finding's row shows: (Devices, MachineCount, ReportId).
fn shown_of(f: &Value) -> Option<Shown> {
    let row = &f["row"];
    let devices = row["Devices"].as_array()?.iter().map(|d| d.as_str().map(str::to_string)).collect::<Option<_>>()?;
    Some((devices, row["MachineCount"].as_i64()?, row["ReportId"].as_i64()?))
}

// ---------------------------------------------------------------------------------------
// The property test.
// ---------------------------------------------------------------------------------------

fn show_row(table: &str, r: &Map<String, Value>) -> String {
    let g = |c: &str| r.get(c).map_or("-".to_string(), |v| v.to_string());
    if table == PROCESS_EVENTS {
        format!(
            "exec    #{} dev={} name={} sha1={} ts={} action={} parent={}",
            g("ReportId"),
            g("DeviceId"),
            g("DeviceName"),
            g("SHA1"),
            g("Timestamp"),
            g("ActionType"),
            g("InitiatingProcessCommandLine")
        )
    } else {
        format!(
            "profile #{} sha1={} prevalence={} availability={}",
            g("ReportId"),
            g("SHA1"),
            g("GlobalPrevalence"),
            g("ProfileAvailability")
        )
    }
}

/// Runs `ticks` through the engine and checks after every tick that the findings (JSONL
/// and results tree) are exactly the union of the naive results so far, each once, and
/// that each new finding's row shows the naive result of the pass that found it.
fn check_ticks(ticks: &[Tick], top: usize) -> Result<BTreeSet<Identity>, String> {
    let params = Params { top, ..Params::default() };
    let mut stored: Vec<StoredRow> = Vec::new();
    let mut expected: BTreeSet<Identity> = BTreeSet::new();
    RULE.check_ticks(ticks, &[("top", top.to_string())], |pass| {
        let k = pass.k;
        stored.extend(pass.tick.stored(|table, ingested_at, row| StoredRow { table, ingested_at, row }));
        let result = naive_scheduled_task::evaluate(&stored, pass.t_eval, &params);
        let before = expected.clone();
        expected.extend(result.keys().cloned());
        let by_identity = pass.check_union("findings", &expected, identity_of, |id| format!("{id:?}"))?;
        // The findings new in this pass show this pass's result row.
        for id in expected.difference(&before) {
            let f = by_identity[id];
            let shown = shown_of(f).ok_or_else(|| format!("after tick {k}: bad row: {f}"))?;
            if shown != result[id] {
                return Err(format!(
                    "after tick {k}: finding {id:?} shows (Devices, MachineCount, ReportId) {shown:?}, the naive \
                     result {:?}\n{f}",
                    result[id]
                ));
            }
            if f["device_id"] != f["row"]["DeviceId"] || f["detector"] != DETECTOR {
                return Err(format!("after tick {k}: finding envelope disagrees with its row: {f}"));
            }
        }
        Ok(())
    })?;
    Ok(expected)
}

/// Two lower-case SHA1s, one that sorts first, and the empty SHA1.
const SHA1S: [&str; 4] =
    ["3395856ce81f2b7382dee72602f798b642f14140", "a94a8fe5ccb19ba61c4c0873d391e987982fbbd3", "0a0a", ""];
/// (DeviceId, DeviceName): the last device reuses the name of the second (a reinstalled
/// machine), so dcount(DeviceName) and dcount(DeviceId) differ.
const DEVICES: [(&str, &str); 4] = [
    ("d-alpha", "alpha.contoso.local"),
    ("d-beta", "beta.contoso.local"),
    ("d-gamma", "gamma.contoso.local"),
    ("d-delta", "beta.contoso.local"),
];
const ACTIONS: [&str; 4] = ["ProcessCreated", "PROCESSCREATED", "processCreated", "ProcessCreatedUsingWmiQuery"];
const PARENTS: [&str; 6] = [
    "svchost.exe -k netsvcs -p -s Schedule",
    "SVCHOST.EXE -K NETSVCS -P -S SCHEDULE",
    "svchost.exe -k netsvcs -p -s schedule",
    "svchost.exe -k netsvcs -p -s BITS",
    "svchost.exe -k netsvcs -s Schedule",
    r"C:\Windows\system32\svchost.exe -k netsvcs -p -s Schedule",
];
/// How long before its tick's ingestion an execution happened, and whether a random few
/// minutes are added: the exact ones sit on the timeframe / lookback edge of the tick's
/// own pass (`>= ago(x)` holds with equality); the last is a device clock ahead.
const AGES: [(i64, bool); 9] = [
    (MINUTE, true),
    (6 * HOUR, true),
    (DAY, true),
    (2 * DAY - EVAL_DELAY, false),
    (2 * DAY + HOUR, true),
    (4 * DAY, true),
    (7 * DAY - EVAL_DELAY, false),
    (8 * DAY, true),
    (-10 * MINUTE, false),
];
const PREVALENCES: [Option<i64>; 5] = [None, Some(5), Some(99), Some(100), Some(5000)];
const AVAILABILITIES: [Option<&str>; 5] = [Some(""), Some("Available"), Some("Error"), Some("ERROR"), None];

#[derive(Debug, Clone)]
enum Spec {
    Exec { dev: usize, sha: usize, upper: bool, action: usize, parent: usize, age: usize, minutes: i64 },
    Profile { sha: usize, upper: bool, prevalence: usize, availability: usize },
}

#[derive(Debug, Clone)]
enum Step {
    Small {
        minutes: i64,
    },
    /// Exactly so far that the previous tick's rows sit on the timeframe edge.
    Timeframe,
    /// More than the timeframe.
    Big {
        minutes: i64,
    },
    /// Exactly the lookback (previous tick's `age 0` rows on its edge).
    Lookback,
    /// More than the lookback.
    Huge {
        minutes: i64,
    },
    /// To a window edge of an execution stored earlier (`pick` chooses it; `window`: its
    /// Timestamp + timeframe, Timestamp + lookback, or ingestion + timeframe), or one
    /// tick past it: the clock alone may change the result there. A minute when that
    /// edge is not ahead.
    Edge {
        pick: u8,
        window: u8,
        past: bool,
    },
}

#[derive(Debug, Clone)]
struct Scenario {
    devices: usize,
    top: usize,
    rows: Vec<Spec>,
    cuts: Vec<u8>,
    /// Empty ticks after the last rows: passes only the clock can cause.
    idle: usize,
    steps: Vec<Step>,
    restarts: Vec<Restart>,
    chunks: Vec<Option<usize>>,
}

fn exec_spec() -> impl Strategy<Value = Spec> {
    let sha = prop_oneof![4 => Just(0usize), 3 => Just(1usize), 2 => Just(2usize), 1 => Just(3usize)];
    let action = prop_oneof![6 => Just(0usize), 1 => Just(1usize), 1 => Just(2usize), 1 => Just(3usize)];
    let parent = prop_oneof![
        6 => Just(0usize), 1 => Just(1usize), 1 => Just(2usize), 1 => Just(3usize), 1 => Just(4usize), 1 => Just(5usize)
    ];
    let age = prop_oneof![
        4 => Just(0usize), 3 => Just(1usize), 2 => Just(2usize), 2 => Just(3usize), 1 => Just(4usize),
        2 => Just(5usize), 2 => Just(6usize), 1 => Just(7usize), 1 => Just(8usize)
    ];
    (0..4usize, sha, prop::bool::weighted(0.12), action, parent, age, 0..300i64).prop_map(
        |(dev, sha, upper, action, parent, age, minutes)| Spec::Exec { dev, sha, upper, action, parent, age, minutes },
    )
}

fn profile_spec() -> impl Strategy<Value = Spec> {
    // FileProfile rows need a SHA1: never the empty one.
    (0..3usize, prop::bool::weighted(0.15), 0..5usize, 0..5usize)
        .prop_map(|(sha, upper, prevalence, availability)| Spec::Profile { sha, upper, prevalence, availability })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let rows = (prop::collection::vec(exec_spec(), 4..=24), prop::collection::vec(profile_spec(), 0..=4))
        .prop_flat_map(|(execs, profiles)| {
            let mut all = execs;
            all.extend(profiles);
            Just(all).prop_shuffle()
        });
    let step = prop_oneof![
        6 => (1..=90i64).prop_map(|minutes| Step::Small { minutes }),
        2 => Just(Step::Timeframe),
        3 => (1..=600i64).prop_map(|minutes| Step::Big { minutes }),
        1 => Just(Step::Lookback),
        1 => (1..=90i64).prop_map(|minutes| Step::Huge { minutes }),
        6 => (any::<u8>(), 0..3u8, any::<bool>()).prop_map(|(pick, window, past)| Step::Edge { pick, window, past }),
    ];
    let restart = prop_oneof![5 => Just(Restart::No), 3 => Just(Restart::Before), 1 => Just(Restart::BeforePass)];
    let chunk = prop_oneof![4 => Just(None), 1 => (1..=5usize).prop_map(Some)];
    let top = prop_oneof![3 => Just(1usize), 2 => Just(2usize), 2 => Just(1000usize)];
    (
        2..=4usize,
        top,
        rows,
        prop::collection::vec(any::<u8>(), 0..=4),
        prop_oneof![1 => Just(0usize), 3 => 1..=3usize],
        prop::collection::vec(step, 8),
        prop::collection::vec(restart, 8),
        prop::collection::vec(chunk, 8),
    )
        .prop_map(|(devices, top, rows, cuts, idle, steps, restarts, chunks)| Scenario {
            devices,
            top,
            rows,
            cuts,
            idle,
            steps,
            restarts,
            chunks,
        })
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
        let cuts = tick_ends(self.rows.len(), &self.cuts, self.idle);
        let mut ticks = Vec::new();
        let mut start = 0;
        let mut now = t0();
        // (Timestamp, ingestion time) of the executions of the ticks so far.
        let mut placed: Vec<(i64, i64)> = Vec::new();
        for (k, &end) in cuts.iter().enumerate() {
            if k > 0 {
                now += match self.steps[k] {
                    Step::Small { minutes } => minutes * MINUTE,
                    Step::Timeframe => 2 * DAY - EVAL_DELAY,
                    Step::Big { minutes } => 2 * DAY + minutes * MINUTE,
                    Step::Lookback => 7 * DAY - EVAL_DELAY,
                    Step::Huge { minutes } => 7 * DAY + minutes * MINUTE,
                    Step::Edge { pick, window, past } => {
                        let edge = placed.get(usize::from(pick) % placed.len().max(1)).map(|&(ts, ingested)| {
                            let edge = match window {
                                0 => ts + 2 * DAY,
                                1 => ts + 7 * DAY,
                                _ => ingested + 2 * DAY,
                            };
                            edge + i64::from(past) - EVAL_DELAY
                        });
                        match edge {
                            Some(at) if at > now => at - now,
                            _ => MINUTE,
                        }
                    }
                };
            }
            let rows = self.rows[start..end]
                .iter()
                .enumerate()
                .map(|(i, spec)| {
                    let report_id = 1000 + (start + i) as i64;
                    match *spec {
                        Spec::Exec { dev, sha, upper, action, parent, age, minutes } => {
                            let (age, jitter) = AGES[age];
                            let at = now - age - if jitter { minutes * MINUTE } else { 0 };
                            placed.push((at, now));
                            let (device_id, device_name) = DEVICES[dev % self.devices];
                            (
                                PROCESS_EVENTS,
                                exec_row(
                                    report_id,
                                    at,
                                    device_id,
                                    device_name,
                                    &sha1_of(sha, upper),
                                    ACTIONS[action],
                                    PARENTS[parent],
                                ),
                            )
                        }
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
            ticks.push(Tick {
                now,
                restart: if k > 0 { self.restarts[k] } else { Restart::No },
                chunk_rows: self.chunks[k],
                rows,
            });
            start = end;
        }
        ticks
    }
}

proptest! {
    // ~1.5 s a case in a debug build; PROPTEST_CASES=500 for a soak run.
    #![proptest_config(proptest_config(16))]

    #[test]
    fn incremental_equals_union_of_batch_results(s in scenario()) {
        check_ticks(&s.ticks(), s.top).map_err(TestCaseError::fail)?;
    }
}

fn exec_row(
    report_id: i64,
    ts: i64,
    device_id: &str,
    device_name: &str,
    sha1: &str,
    action: &str,
    parent: &str,
) -> Map<String, Value> {
    let file = format!("task{}.exe", sha1.len() % 7);
    obj(json!({
        "Timestamp": format_timestamp(ts),
        "DeviceId": device_id,
        "DeviceName": device_name,
        "ActionType": action,
        "FileName": file,
        "FolderPath": format!(r"C:\ProgramData\Tasks\{file}"),
        "SHA1": sha1,
        "ProcessCommandLine": format!(r#""{file}" /run"#),
        "ProcessId": 4000 + report_id,
        "AccountName": "system",
        "InitiatingProcessFileName": "svchost.exe",
        "InitiatingProcessCommandLine": parent,
        "InitiatingProcessId": 1234,
        "ReportId": report_id,
    }))
}

// ---------------------------------------------------------------------------------------
// Sharp edges by hand: each also pins the naive evaluator to the expected identities.
// ---------------------------------------------------------------------------------------

const SHA_A: &str = "3395856ce81f2b7382dee72602f798b642f14140";
const SHA_B: &str = "a94a8fe5ccb19ba61c4c0873d391e987982fbbd3";
const SCHEDULE: &str = "svchost.exe -k netsvcs -p -s Schedule";

fn id(sha1: &str, device: &str) -> Identity {
    (sha1.to_string(), device.to_string())
}

fn run(ticks: &[Tick], top: usize) -> BTreeSet<Identity> {
    check_ticks(ticks, top).unwrap_or_else(|e| panic!("{e}"))
}

/// A binary a device already ran as a task before the timeframe is not new; once that
/// execution leaves the lookback, a later execution makes it new — with no row arriving
/// at that moment, only the clock (the detector's wake-up).
#[test]
fn an_old_execution_leaving_the_lookback_makes_the_binary_new() {
    let old = exec_row(1, t0() - 3 * DAY, "d-alpha", "alpha", SHA_A, "ProcessCreated", SCHEDULE);
    let recent = exec_row(2, t0() + 3 * DAY + HOUR, "d-alpha", "alpha", SHA_A, "ProcessCreated", SCHEDULE);
    let ticks = vec![
        Tick::at(t0(), vec![(PROCESS_EVENTS, old)]),
        Tick::at(t0() + 3 * DAY + 2 * HOUR, vec![(PROCESS_EVENTS, recent)]),
        // Still inside the lookback: not new.
        Tick::at(t0() + 4 * DAY - EVAL_DELAY, vec![]),
        // The old execution is exactly at the lookback edge: still in, still not new.
        // One tick later it is out: the pass must run (no row arrives) and find it.
        Tick::at(t0() + 4 * DAY - EVAL_DELAY + 1, vec![]),
    ];
    assert_eq!(run(&ticks[..3], 1000), BTreeSet::new());
    assert_eq!(run(&ticks, 1000), BTreeSet::from([id(SHA_A, "d-alpha")]));
}

/// Shortening `lookback` takes effect on the next pass (a restart with the new value): an
/// execution the new lookback leaves out no longer makes the binary old, though it was
/// kept until the old lookback's end.
#[test]
fn a_shorter_lookback_takes_effect_on_the_next_pass() {
    let now = t0();
    let old = exec_row(1, now - 5 * DAY, "d-alpha", "alpha", SHA_A, "ProcessCreated", SCHEDULE);
    let recent = exec_row(2, now - DAY, "d-alpha", "alpha", SHA_A, "ProcessCreated", SCHEDULE);
    let mut engine = Engine::open(&RULE).unwrap_or_else(|e| panic!("{e}"));
    engine.ingest_rows(0, &[(PROCESS_EVENTS, old), (PROCESS_EVENTS, recent)], now).unwrap_or_else(|e| panic!("{e}"));
    engine.pass(now, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(engine.flush().unwrap_or_else(|e| panic!("{e}")), Vec::<Value>::new(), "seen 5 days ago: not new");
    engine.restart().unwrap_or_else(|e| panic!("{e}"));
    // Any new batch runs the detector (a pass with nothing new and no wake-up due is not
    // run at all); this row is not a scheduled execution.
    let other = exec_row(3, now, "d-beta", "beta", SHA_B, "ProcessCreated", "explorer.exe");
    engine.ingest_rows(1, &[(PROCESS_EVENTS, other)], now + MINUTE).unwrap_or_else(|e| panic!("{e}"));
    engine.pass(now + MINUTE, None, &[("lookback", "3d".to_string())]).unwrap_or_else(|e| panic!("{e}"));
    let found: Result<BTreeSet<Identity>, String> =
        engine.flush().unwrap_or_else(|e| panic!("{e}")).iter().map(identity_of).collect();
    assert_eq!(found, Ok(BTreeSet::from([id(SHA_A, "d-alpha")])), "FirstSeen is a day ago under a 3-day lookback");
}

/// Lengthening `lookback` re-reads every stored row: an execution the old lookback left
/// out when it arrived (never kept) makes the binary old under the new one, as the KQL
/// over every stored row says. The same later execution fires under the old lookback.
#[test]
fn a_longer_lookback_reads_again_the_rows_the_old_one_left_out() {
    let now = t0();
    let old = exec_row(1, now - 10 * DAY, "d-alpha", "alpha", SHA_A, "ProcessCreated", SCHEDULE);
    let recent = exec_row(2, now + MINUTE, "d-alpha", "alpha", SHA_A, "ProcessCreated", SCHEDULE);
    let findings_with = |lookback: Option<&str>| -> Result<BTreeSet<Identity>, String> {
        let mut engine = Engine::open(&RULE)?;
        engine.ingest_rows(0, &[(PROCESS_EVENTS, old.clone())], now)?;
        engine.pass(now, None, &[])?;
        if !engine.flush()?.is_empty() {
            return Err("an execution outside the lookback fired".into());
        }
        engine.restart()?;
        engine.ingest_rows(1, &[(PROCESS_EVENTS, recent.clone())], now + MINUTE)?;
        let params: Vec<(&str, String)> = lookback.map(|l| ("lookback", l.to_string())).into_iter().collect();
        let report = engine.pass(now + 2 * MINUTE, None, &params)?;
        if report.backfill != lookback.is_some() {
            return Err(format!("a backfill only when the parameters changed: {report:?}"));
        }
        let found = engine.flush()?.iter().map(identity_of).collect();
        // The same parameters again, after a restart: only what is new.
        engine.restart()?;
        let other = exec_row(3, now + 3 * MINUTE, "d-beta", "beta", SHA_B, "ProcessCreated", SCHEDULE);
        engine.ingest_rows(2, &[(PROCESS_EVENTS, other)], now + 3 * MINUTE)?;
        let again = engine.pass(now + 4 * MINUTE, None, &params)?;
        if again.backfill || again.rows != 1 {
            return Err(format!("the same parameters read everything again: {again:?}"));
        }
        found
    };
    assert_eq!(findings_with(None), Ok(BTreeSet::from([id(SHA_A, "d-alpha")])), "first seen now under 7 days");
    assert_eq!(findings_with(Some("14d")), Ok(BTreeSet::new()), "first seen 10 days ago under 14 days: not new");
}

/// A backfill that chooses no row (nothing stored is a scheduled execution) still moves
/// the cursor and records the parameters: the next pass reads only what is new.
#[test]
fn a_backfill_choosing_no_row_is_not_a_backfill_again() {
    let now = t0();
    let other = |report: i64| exec_row(report, now, "d-beta", "beta", SHA_B, "ProcessCreated", "explorer.exe");
    let run = || -> Result<(), String> {
        let mut engine = Engine::open(&RULE)?;
        engine.ingest_rows(0, &[(PROCESS_EVENTS, other(1))], now)?;
        let first = engine.pass(now, None, &[("lookback", "14d".to_string())])?;
        if !first.backfill || first.rows != 0 {
            return Err(format!("the first pass is a backfill choosing nothing: {first:?}"));
        }
        engine.restart()?;
        engine.ingest_rows(1, &[(PROCESS_EVENTS, other(2))], now + MINUTE)?;
        let next = engine.pass(now + MINUTE, None, &[("lookback", "14d".to_string())])?;
        if next.backfill {
            return Err(format!("a backfill again: {next:?}"));
        }
        Ok(())
    };
    assert_eq!(run(), Ok(()));
}

/// With `top 1`, the binary on fewer machines takes the slot; when its execution leaves
/// the timeframe, the other binary gets in by the clock alone.
#[test]
fn a_binary_leaving_the_top_lets_the_next_in() {
    let rare = exec_row(1, t0() - HOUR, "d-alpha", "alpha", SHA_B, "ProcessCreated", SCHEDULE);
    let common_1 = exec_row(2, t0() - 30 * MINUTE, "d-alpha", "alpha", SHA_A, "ProcessCreated", SCHEDULE);
    let common_2 = exec_row(3, t0() - 20 * MINUTE, "d-beta", "beta", SHA_A, "ProcessCreated", SCHEDULE);
    let ticks = vec![
        Tick::at(t0(), vec![(PROCESS_EVENTS, rare), (PROCESS_EVENTS, common_1), (PROCESS_EVENTS, common_2)]),
        // `rare` happened at t0 - 1h: its (device, SHA1) is new until t0 + 47h inclusive.
        Tick::at(t0() + 2 * DAY - HOUR - EVAL_DELAY, vec![]),
        Tick::at(t0() + 2 * DAY - HOUR - EVAL_DELAY + 1, vec![]),
    ];
    assert_eq!(run(&ticks[..2], 1), BTreeSet::from([id(SHA_B, "d-alpha")]));
    // SHA_A's executions (first seen t0 - 30 min, ingested at t0) are still new: it is
    // the only binary left, on 2 machines.
    assert_eq!(run(&ticks, 1), BTreeSet::from([id(SHA_B, "d-alpha"), id(SHA_A, "d-alpha"), id(SHA_A, "d-beta")]));
}

/// A real-valued GlobalPrevalence is compared as it is: 150.5 is not below 100 (no
/// finding), 99.5 is; both the detector and the naive evaluator (`check_ticks`).
#[test]
fn a_real_prevalence_is_compared_as_it_is() {
    let exec = exec_row(1, t0() - HOUR, "d-alpha", "alpha", SHA_A, "ProcessCreated", SCHEDULE);
    let profile = |report: i64, prevalence: f64| {
        let mut row = profile_row(report, SHA_A, None, Some("Available"));
        row.insert("GlobalPrevalence".into(), serde_json::json!(prevalence));
        row
    };
    let common = vec![Tick::at(t0(), vec![(FILE_PROFILE, profile(2, 150.5)), (PROCESS_EVENTS, exec.clone())])];
    assert_eq!(run(&common, 1000), BTreeSet::new());
    let rare = vec![Tick::at(t0(), vec![(FILE_PROFILE, profile(2, 99.5)), (PROCESS_EVENTS, exec)])];
    assert_eq!(run(&rare, 1000), BTreeSet::from([id(SHA_A, "d-alpha")]));
}

/// A FileProfile row arriving later lets a binary through (and an upper-case profile
/// does not: FileProfile is asked for the lowercased SHA1, exactly).
#[test]
fn a_later_profile_lets_a_binary_fire() {
    let exec = exec_row(1, t0() - HOUR, "d-alpha", "alpha", SHA_A, "ProcessCreated", SCHEDULE);
    let ticks = vec![
        Tick::at(t0(), vec![(FILE_PROFILE, profile_row(2, SHA_A, Some(5000), None)), (PROCESS_EVENTS, exec)]),
        Tick::at(t0() + HOUR, vec![(FILE_PROFILE, profile_row(3, &SHA_A.to_uppercase(), Some(1), None))]),
        Tick::at(t0() + 2 * HOUR, vec![(FILE_PROFILE, profile_row(4, SHA_A, Some(99), Some("Available")))]),
    ];
    assert_eq!(run(&ticks[..2], 1000), BTreeSet::new());
    assert_eq!(run(&ticks, 1000), BTreeSet::from([id(SHA_A, "d-alpha")]));
}

/// A binary whose profile failed is remembered as failing across restarts, and a later
/// FileProfile row still lets it through: the verdict kept in the state is dropped when
/// the row arrives in another process.
#[test]
fn a_later_profile_lets_a_binary_fire_across_restarts() {
    let exec = exec_row(1, t0() - HOUR, "d-alpha", "alpha", SHA_A, "ProcessCreated", SCHEDULE);
    let other = exec_row(5, t0() + 90 * MINUTE, "d-beta", "beta", SHA_A, "ProcessCreated", SCHEDULE);
    let third = exec_row(6, t0() + 210 * MINUTE, "d-gamma", "gamma", SHA_A, "ProcessCreated", SCHEDULE);
    let ticks = vec![
        Tick::at(t0(), vec![(FILE_PROFILE, profile_row(2, SHA_A, Some(5000), None)), (PROCESS_EVENTS, exec)]),
        // The failing verdict is what the restarted process starts from: a second device
        // of the binary does not fire either.
        Tick::new(t0() + 2 * HOUR, Restart::Before, vec![(PROCESS_EVENTS, other)]),
        Tick::new(t0() + 3 * HOUR, Restart::Before, vec![(FILE_PROFILE, profile_row(4, SHA_A, Some(99), None))]),
        // The verdict left the state with that row: the next process lets a third through.
        Tick::new(t0() + 4 * HOUR, Restart::Before, vec![(PROCESS_EVENTS, third)]),
    ];
    assert_eq!(run(&ticks[..2], 1000), BTreeSet::new());
    let both = BTreeSet::from([id(SHA_A, "d-alpha"), id(SHA_A, "d-beta")]);
    assert_eq!(run(&ticks[..3], 1000), both);
    assert_eq!(run(&ticks, 1000), &both | &BTreeSet::from([id(SHA_A, "d-gamma")]));
}

/// A backfill is handed no FileProfile row: a binary whose profile failed, then got a
/// profile that passes, is asked again on a backfill (`lookout detect --backfill`) and
/// fires, the failing verdict kept in the state notwithstanding.
#[test]
fn a_backfill_asks_fileprofile_again() {
    let exec = exec_row(1, t0() - HOUR, "d-alpha", "alpha", SHA_A, "ProcessCreated", SCHEDULE);
    let mut engine = Engine::open(&RULE).unwrap();
    let failing = profile_row(2, SHA_A, Some(5000), None);
    engine.ingest_rows(0, &[(FILE_PROFILE, failing), (PROCESS_EVENTS, exec)], t0()).unwrap();
    engine.pass(t0(), None, &[]).unwrap();
    assert!(engine.flush().unwrap().is_empty());
    engine.restart().unwrap();
    engine.ingest_rows(1, &[(FILE_PROFILE, profile_row(3, SHA_A, Some(99), None))], t0() + HOUR).unwrap();
    engine.backfill(t0() + HOUR).unwrap();
    let found: Vec<(String, String)> = engine
        .flush()
        .unwrap()
        .iter()
        .map(|f| (f["row"]["SHA1"].as_str().unwrap().to_string(), f["device_id"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(found, vec![(SHA_A.to_string(), "d-alpha".to_string())]);
}

/// Upper-case SHA1s never join; the empty SHA1 fires; a second device running the same
/// binary later is a second finding.
#[test]
fn upper_case_never_joins_empty_fires_second_device_is_new() {
    let upper = exec_row(1, t0() - HOUR, "d-alpha", "alpha", &SHA_A.to_uppercase(), "ProcessCreated", SCHEDULE);
    let empty = exec_row(2, t0() - HOUR, "d-alpha", "alpha", "", "processcreated", SCHEDULE);
    let b1 = exec_row(3, t0() - HOUR, "d-alpha", "alpha", SHA_B, "ProcessCreated", SCHEDULE);
    let b2 = exec_row(4, t0() + DAY, "d-beta", "beta", SHA_B, "ProcessCreated", &SCHEDULE.to_uppercase());
    let ticks = vec![
        Tick::at(t0(), vec![(PROCESS_EVENTS, upper), (PROCESS_EVENTS, empty), (PROCESS_EVENTS, b1)]),
        Tick {
            restart: Restart::Before,
            chunk_rows: Some(1),
            ..Tick::at(t0() + DAY + HOUR, vec![(PROCESS_EVENTS, b2)])
        },
    ];
    assert_eq!(run(&ticks[..1], 1000), BTreeSet::from([id("", "d-alpha"), id(SHA_B, "d-alpha")]));
    assert_eq!(run(&ticks, 1000), BTreeSet::from([id("", "d-alpha"), id(SHA_B, "d-alpha"), id(SHA_B, "d-beta")]));
}

// ---------------------------------------------------------------------------------------
// Golden tests.
// ---------------------------------------------------------------------------------------

/// Ingests `files` at `ingest_at` (in one call), runs one pass at `eval_at` with these
/// overrides in a fresh store, and returns (the pass report, the findings).
fn golden(batches: &[(i64, Vec<PathBuf>)], eval_at: i64, params: &[(&str, String)]) -> (DetectorReport, Vec<Value>) {
    let once = RULE.detect_once(batches, eval_at, params);
    (once.report, once.lines)
}

/// kqlbench has no DeviceProcessEvents export, so the rule (DeviceProcessEvents and
/// FileProfile) has nothing to read there: every export ingested, the detector's
/// backfill is handed 0 rows and finds 0.
#[test]
fn golden_kqlbench_has_no_process_events_so_no_findings() {
    let dir = kqlbench_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    assert!(
        files.iter().all(|p| !p.file_name().unwrap().to_string_lossy().starts_with(PROCESS_EVENTS)),
        "kqlbench now has DeviceProcessEvents: this golden test must count its findings"
    );
    let now = parse_timestamp("2025-05-08T00:00:00Z").unwrap();
    let (report, findings) = golden(&[(now, files)], now, &[]);
    assert!(report.backfill);
    assert_eq!(report.rows, 0, "no row of the detector's tables");
    assert_eq!(findings.len(), 0, "{findings:?}");
}

/// Evaluation time of the hand-written fixture; executions are ingested an hour before,
/// the old ones three days before.
const FIXTURE_NOW: &str = "2025-05-08T00:00:00Z";

/// The hand-written fixture (SHA1s are readable stand-ins; `NOW` = 2025-05-08T00:00:00Z):
///
/// | # | ingested | device | SHA1 | Timestamp | what | effect |
/// |---|---|---|---|---|---|---|
/// | 101 | NOW−3d | dev1 | bbb… | NOW−4d | scheduled | (dev1, bbb) seen before the timeframe |
/// | 102 | NOW−1h | dev1 | aaa… | NOW−5h | scheduled | (dev1, aaa) new |
/// | 103 | NOW−1h | dev2 | aaa… | NOW−4h | scheduled, command line upper-case | (dev2, aaa) new |
/// | 104 | NOW−1h | dev2 | aaa… | NOW−2h | scheduled | dev2's latest |
/// | 105 | NOW−1h | dev1 | bbb… | NOW−1d | scheduled | FirstSeen NOW−4d: not new |
/// | 106 | NOW−1h | dev3 | ccc… | NOW−1d | scheduled | profile prevalence 5000: filtered |
/// | 107 | NOW−1h | dev3 | ddd… | NOW−1d | scheduled | profile availability "Error": filtered |
/// | 108 | NOW−1h | dev3 | EEE… | NOW−1d | scheduled, upper-case SHA1 | lowercased by the query, never joins |
/// | 109 | NOW−1h | dev1 | fff… | NOW−1d | ActionType ProcessCreatedUsingWmiQuery | not scheduled |
/// | 110 | NOW−1h | dev1 | 999… | NOW−1d | parent `-s BITS` | not scheduled |
/// | 111 | NOW−1h | dev2 | "" | NOW−1d | scheduled, empty SHA1 | no profile: fires |
/// | 112 | NOW−1h | dev3 | aaa… | NOW−8d | scheduled | outside the lookback: ignored |
///
/// Profiles: aaa… prevalence 3 (Available), ccc… 5000, ddd… availability Error, eee…
/// (lower-case) prevalence 1, and EEE… is not asked for.
///
/// By hand: NewScheduledBinaries = (dev1,aaa) [NOW−5h], (dev2,aaa) [NOW−4h, NOW−2h],
/// (dev3,ccc), (dev3,ddd), (dev3,EEE…), (dev2,""); (dev1,bbb) has FirstSeen NOW−4d.
/// MachineCount by SHA1: "" 1, EEE… 1, ccc… 1, ddd… 1, aaa… 2 (that is the `top` order:
/// count, then ordinal, and upper-case letters sort before lower-case). After tolower
/// and FileProfile: "" passes (no profile), eee… passes (prevalence 1) but no execution
/// has SHA1 eee…, ccc… and ddd… are filtered, aaa… passes. The join and summarize give
/// SHA1 aaa… with Devices [dev1.corp, dev2.corp], MachineCount 2, and SHA1 "" with
/// Devices [dev2.corp], MachineCount 1. Findings: (aaa…, dev1) showing #102,
/// (aaa…, dev2) showing #104 (FirstSeen NOW−4h, LastSeen NOW−2h), ("", dev2) showing
/// #111. With `top` 1 only "" is in the top: one finding, ("", dev2).
fn fixture(dir: &Path) -> Vec<(i64, Vec<PathBuf>)> {
    let now = parse_timestamp(FIXTURE_NOW).unwrap();
    let sha = |c: char| c.to_string().repeat(40);
    let (a, b, c, d, e, f, n) = (sha('a'), sha('b'), sha('c'), sha('d'), sha('E'), sha('f'), sha('9'));
    let dev = |i: usize| (["dev-0001", "dev-0002", "dev-0003"][i - 1], ["dev1.corp", "dev2.corp", "dev3.corp"][i - 1]);
    let row = |rid: i64, d: usize, sha1: &str, ago: i64, action: &str, parent: &str| {
        let (id, name) = dev(d);
        Value::Object(exec_row(rid, now - ago, id, name, sha1, action, parent)).to_string()
    };
    let p = "ProcessCreated";
    let old = [row(101, 1, &b, 4 * DAY, p, SCHEDULE)];
    let recent = [
        row(102, 1, &a, 5 * HOUR, p, SCHEDULE),
        row(103, 2, &a, 4 * HOUR, p, "SVCHOST.EXE -K NETSVCS -P -S SCHEDULE"),
        row(104, 2, &a, 2 * HOUR, p, SCHEDULE),
        row(105, 1, &b, DAY, p, SCHEDULE),
        row(106, 3, &c, DAY, p, SCHEDULE),
        row(107, 3, &d, DAY, p, SCHEDULE),
        row(108, 3, &e, DAY, p, SCHEDULE),
        row(109, 1, &f, DAY, "ProcessCreatedUsingWmiQuery", SCHEDULE),
        row(110, 1, &n, DAY, p, "svchost.exe -k netsvcs -p -s BITS"),
        row(111, 2, "", DAY, p, SCHEDULE),
        row(112, 3, &a, 8 * DAY, p, SCHEDULE),
    ];
    let profiles = [
        profile_row(1, &a, Some(3), Some("Available")),
        profile_row(2, &c, Some(5000), Some("Available")),
        profile_row(3, &d, None, Some("Error")),
        profile_row(4, &e.to_lowercase(), Some(1), Some("Available")),
    ]
    .map(|m| Value::Object(m).to_string());
    let write = |name: &str, lines: &[String]| {
        let path = dir.join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path
    };
    let old_dir = dir.join("old");
    std::fs::create_dir_all(&old_dir).unwrap();
    vec![
        (now - 3 * DAY, vec![write("old/DeviceProcessEvents-old.jsonl", &old)]),
        (
            now - HOUR,
            vec![write("DeviceProcessEvents-recent.jsonl", &recent), write("FileProfile-feed.jsonl", &profiles)],
        ),
    ]
}

#[test]
fn golden_hand_written_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let now = parse_timestamp(FIXTURE_NOW).unwrap();
    let a = "a".repeat(40);
    let (report, findings) = golden(&fixture(dir.path()), now, &[]);
    assert_eq!(report.rows, 10, "the backfill hands the 10 scheduled-looking executions (not #109, #110 nor profiles)");
    let mut got: Vec<(String, String, i64, i64, Value)> = findings
        .iter()
        .map(|f| {
            let r = &f["row"];
            (
                r["SHA1"].as_str().unwrap().to_string(),
                r["DeviceId"].as_str().unwrap().to_string(),
                r["ReportId"].as_i64().unwrap(),
                r["MachineCount"].as_i64().unwrap(),
                r["Devices"].clone(),
            )
        })
        .collect();
    got.sort_by(|x, y| (&x.0, &x.1).cmp(&(&y.0, &y.1)));
    assert_eq!(
        got,
        vec![
            (String::new(), "dev-0002".into(), 111, 1, json!(["dev2.corp"])),
            (a.clone(), "dev-0001".into(), 102, 2, json!(["dev1.corp", "dev2.corp"])),
            (a.clone(), "dev-0002".into(), 104, 2, json!(["dev1.corp", "dev2.corp"])),
        ]
    );
    // The whole row of one finding, as the KQL result row.
    let f = findings.iter().find(|f| f["row"]["SHA1"] == a.as_str() && f["row"]["DeviceId"] == "dev-0002").unwrap();
    let r = &f["row"];
    assert_eq!(f["device_id"], "dev-0002");
    assert_eq!(f["device_name"], "dev2.corp");
    assert_eq!(r["Timestamp"], format_timestamp(now - 2 * HOUR));
    assert_eq!(r["FirstSeen"], format_timestamp(now - 4 * HOUR));
    assert_eq!(r["LastSeen"], format_timestamp(now - 2 * HOUR));
    assert_eq!(r["MachineCount1"], 2, "the left side's dcount(DeviceId)");
    assert_eq!(r["GlobalPrevalence"], 3);
    assert_eq!(r["ProfileAvailability"], "Available");
    assert_eq!(r["SHA11"], a.as_str(), "the execution's own SHA1, suffixed");
    assert_eq!(r["ActionType"], "ProcessCreated");
    let columns: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(&columns[..3], ["SHA1", "Timestamp", "MachineCount1"]);
    assert_eq!(&columns[columns.len() - 2..], ["Devices", "MachineCount"]);

    // The naive evaluator agrees on the same rows.
    let stored = stored_rows(&fixture(dir.path()));
    let naive = naive_scheduled_task::evaluate(&stored, now, &Params::default());
    let ids: BTreeSet<Identity> = got.iter().map(|g| (g.0.clone(), g.1.clone())).collect();
    assert_eq!(naive.keys().cloned().collect::<BTreeSet<_>>(), ids);

    // `top 1`: only the empty SHA1 is in the top.
    let (_, findings) = golden(&fixture(dir.path()), now, &[("top", "1".into())]);
    let ids: BTreeSet<Identity> = findings.iter().map(|f| identity_of(f).unwrap()).collect();
    assert_eq!(ids, BTreeSet::from([id("", "dev-0002")]));
}

/// The fixture's files as the naive evaluator's stored rows.
fn stored_rows(batches: &[(i64, Vec<PathBuf>)]) -> Vec<StoredRow> {
    let mut out = Vec::new();
    for (at, files) in batches {
        for f in files {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            let table = if name.starts_with(FILE_PROFILE) { FILE_PROFILE } else { PROCESS_EVENTS };
            for line in std::fs::read_to_string(f).unwrap().lines() {
                let row = obj(serde_json::from_str(line).unwrap());
                out.push(StoredRow { table: table.to_string(), ingested_at: *at, row });
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The generator.
// ---------------------------------------------------------------------------------------

/// A generated fleet, ingested at its base time and evaluated then: the detector's
/// findings are exactly the fleet's planted ones (by SHA1, DeviceId).
#[test]
fn generated_fleet_findings_are_exactly_the_planted_ones() {
    let spec = gen::FleetSpec { devices: 20, events: 4000, attacks: 6, seed: 11, ..Default::default() };
    let (planted, once) = RULE.detect_generated_fleet(&spec);
    assert!(planted.len() >= spec.attacks, "each attack plants a finding: {planted:?}");
    let findings = once.lines;
    let columns = ["SHA1".to_string(), "DeviceId".to_string()];
    let found: BTreeSet<gen::Expected> = findings.iter().filter_map(|f| gen::expected_of(f, &columns)).collect();
    assert_eq!(findings.len(), found.len(), "a finding without its identity columns, or twice");
    let missing: Vec<_> = planted.difference(&found).collect();
    let unexpected: Vec<_> = found.difference(&planted).collect();
    assert!(missing.is_empty() && unexpected.is_empty(), "missing {missing:?}\nunexpected {unexpected:?}");
}
