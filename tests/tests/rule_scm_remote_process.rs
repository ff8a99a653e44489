//! The `scm-remote-process` detector (FalconFriday 0xFF-0083, Remote Process Invocation
//! Via SCM) against docs/rules/SEMANTICS.md:
//!
//! - a property test: for random small fleets full of near misses, any split into ticks,
//!   any arrival order, restarts and small chunks, the findings after every pass are
//!   exactly the union over the passes so far of `naive_scm_remote::evaluate` (a nested-
//!   loop evaluator written from the KQL) at each pass's time, each identity once;
//! - sharp edges by hand (a pair leaving the window lets the rest of its SHA1 fire with
//!   no new row; a certificate arriving later);
//! - golden tests: the kqlbench exports (no DeviceProcessEvents, so nothing) and a small
//!   hand-written fixture whose result is worked out below;
//! - the fleet generator's expected findings for this detector.
//!
//! `PROPTEST_CASES=500 cargo test -p lookout-cli --test rule_scm_remote_process` soaks it.

mod naive_scm_remote;

use lookout_core::gen::{self, FleetSpec};
use lookout_plugin_sdk::time::{format_timestamp, parse_timestamp};
use lookout_tests::ticks::{
    obj, proptest_config, split_ticks, t0, Engine, Restart, Rule, Tick, EVAL_DELAY, HOUR, MINUTE, SECOND,
};
use lookout_tests::{kqlbench_dir, SCM_REMOTE};
use naive_scm_remote::{instant_text, value_text, Identity, Params, StoredRow, CERTIFICATES, NETWORK, PROCESS};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;

const DETECTOR: &str = "scm-remote-process";

/// The rule's timeframe (the default, 2h).
const TIMEFRAME: i64 = 2 * HOUR;

/// The event times of the property test's rows are around this (a whole second).
fn t_event() -> i64 {
    parse_timestamp("2025-05-07T11:50:00Z").unwrap()
}

/// The rule's `let lolbins = dynamic([...])`, read from the published rule itself: the
/// oracle's list is not the detector's.
fn published_lolbins() -> Vec<String> {
    let rule = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/rules/0xFF-0083-Remote_Process_Invocation_Via_SCM-Win.md"),
    )
    .expect("the published rule");
    let line = rule.lines().find(|l| l.starts_with("let lolbins = dynamic([")).expect("its lolbins line");
    let list = line.trim_start_matches("let lolbins = dynamic([").trim_end_matches("]);");
    list.split(',').map(|s| s.trim().trim_matches('"').to_string()).collect()
}

/// The detector's LOLBIN list is the rule's, entry for entry.
#[test]
fn the_lolbins_are_the_published_rules() {
    let published = published_lolbins();
    assert_eq!(published.len(), 104, "{published:?}");
    assert_eq!(lookout_scm_remote_process::LOLBINS.to_vec(), published);
}

fn default_params(threshold: i64) -> Params {
    Params { timeframe: TIMEFRAME, prevalence_threshold: threshold, lolbins: published_lolbins() }
}

// ---------------------------------------------------------------------------------------
// The harness: ticks of rows through the engine, and through the naive evaluator.
// ---------------------------------------------------------------------------------------

// Each tick's rows are ingested at its `now`, its pass evaluates at `now + EVAL_DELAY`
// (`lookout_tests::ticks`).
const RULE: Rule = Rule { lib: SCM_REMOTE, detector: DETECTOR, tables: &[NETWORK, PROCESS, CERTIFICATES], show_row };

/// A finding's identity: the text of its row's DeviceId, ReportId, TimestampChild, SHA1.
fn identity_of(f: &Value) -> Result<Identity, String> {
    let row = f.get("row").and_then(Value::as_object).ok_or_else(|| format!("finding without a row: {f}"))?;
    let get = |c: &str| row.get(c).map(|v| value_text(Some(v))).ok_or_else(|| format!("finding row lacks {c}: {f}"));
    let child_at = row.get("TimestampChild").ok_or_else(|| format!("finding row lacks TimestampChild: {f}"))?;
    Ok((get("DeviceId")?, get("ReportId")?, instant_text(Some(child_at)), get("SHA1")?))
}

fn show_row(table: &str, r: &Map<String, Value>) -> String {
    let g = |c: &str| r.get(c).map_or("-".to_string(), |v| v.to_string());
    match table {
        NETWORK => format!(
            "net   #{} dev={} ts={} proc={} pid={} action={}",
            g("ReportId"),
            g("DeviceId"),
            g("Timestamp"),
            g("InitiatingProcessFileName"),
            g("InitiatingProcessId"),
            g("ActionType")
        ),
        PROCESS => format!(
            "child #{} dev={} ts={} proc={} pid={} action={} started={} sha1={} file={} cmd={}",
            g("ReportId"),
            g("DeviceId"),
            g("Timestamp"),
            g("InitiatingProcessFileName"),
            g("InitiatingProcessId"),
            g("ActionType"),
            g("InitiatingProcessCreationTime"),
            g("SHA1"),
            g("FileName"),
            g("ProcessCommandLine")
        ),
        _ => format!("cert  #{} sha1={}", g("ReportId"), g("SHA1")),
    }
}

/// Runs `ticks` through the engine and checks after every pass that the findings equal
/// the union of the naive results so far, each once. Returns that union.
fn check_ticks(ticks: &[Tick], threshold: i64) -> Result<BTreeSet<Identity>, String> {
    let params = default_params(threshold);
    let mut stored: Vec<StoredRow> = Vec::new();
    let mut expected: BTreeSet<Identity> = BTreeSet::new();
    RULE.check_ticks(ticks, &[("prevalence_threshold", threshold.to_string())], |pass| {
        stored.extend(pass.tick.stored(|table, ingested_at, row| StoredRow { table, ingested_at, row }));
        expected.extend(naive_scm_remote::evaluate(&stored, pass.t_eval, &params));
        pass.check_union("findings", &expected, identity_of, |id| format!("{id:?}"))?;
        Ok(())
    })?;
    Ok(expected)
}

// ---------------------------------------------------------------------------------------
// Rows.
// ---------------------------------------------------------------------------------------

fn host_of(device: &str) -> String {
    format!("{}.corp.example.com", device.to_ascii_lowercase())
}

/// An inbound connection (or another network event) of a process.
fn net_row(report: i64, ts: i64, device: &str, pid: Option<i64>, process: &str, action: &str) -> Map<String, Value> {
    obj(json!({
        "Timestamp": format_timestamp(ts),
        "DeviceId": device,
        "DeviceName": host_of(device),
        "ActionType": action,
        "RemoteIP": "10.20.30.40",
        "RemotePort": 50123,
        "RemoteUrl": "",
        "LocalIP": "10.20.0.5",
        "LocalPort": 135,
        "Protocol": "Tcp",
        "LocalIPType": "Private",
        "RemoteIPType": "Private",
        "InitiatingProcessFileName": process,
        "InitiatingProcessId": pid,
        "InitiatingProcessCommandLine": "services.exe",
        "InitiatingProcessSHA1": "d7a213f3cfee2a8a191769eb33847953be51de54",
        "ReportId": report,
    }))
}

/// A process created by a process (`process` with `pid`, started at `started`).
#[allow(clippy::too_many_arguments)]
fn child_row(
    report: i64,
    ts: i64,
    device: &str,
    pid: Option<i64>,
    process: &str,
    action: &str,
    started: Option<i64>,
    sha1: &str,
    file: &str,
    cmd: &str,
) -> Map<String, Value> {
    obj(json!({
        "Timestamp": format_timestamp(ts),
        "DeviceId": device,
        "DeviceName": host_of(device),
        "ActionType": action,
        "FileName": file,
        "FolderPath": format!("C:\\Windows\\{file}"),
        "SHA1": sha1,
        "ProcessId": 4000 + report,
        "ProcessCommandLine": cmd,
        "AccountName": "system",
        "InitiatingProcessFileName": process,
        "InitiatingProcessId": pid,
        "InitiatingProcessCommandLine": "C:\\Windows\\system32\\services.exe",
        "InitiatingProcessSHA1": "d7a213f3cfee2a8a191769eb33847953be51de54",
        "InitiatingProcessCreationTime": started.map(format_timestamp),
        "ReportId": report,
    }))
}

fn cert_row(report: i64, ts: i64, device: &str, sha1: &str) -> Map<String, Value> {
    obj(json!({
        "Timestamp": format_timestamp(ts),
        "DeviceId": device,
        "DeviceName": host_of(device),
        "SHA1": sha1,
        "IsSigned": true,
        "SignatureType": "Embedded",
        "Signer": "Contoso Ltd",
        "Issuer": "Contoso Code Signing CA",
        "IsTrusted": true,
        "ReportId": report,
    }))
}

// ---------------------------------------------------------------------------------------
// The property.
// ---------------------------------------------------------------------------------------

/// Device ids; the third differs from the first only in case (`in~` passes it, the join
/// does not).
const DEVICES: [&str; 3] = ["d-alpha", "d-beta", "D-ALPHA"];
const PIDS: [Option<i64>; 3] = [Some(700), Some(701), None];
/// Both pass the `=~`/`in~` filters, but do not join each other.
const PROCESSES: [&str; 3] = ["services.exe", "Services.exe", "svchost.exe"];
const NET_ACTIONS: [&str; 3] = ["InboundConnectionAccepted", "inboundconnectionaccepted", "ConnectionSuccess"];
const CHILD_ACTIONS: [&str; 3] = ["ProcessCreated", "PROCESSCREATED", "OpenProcess"];
/// Sub-second parts of event times: the `datetime_diff` near misses.
const FRACTIONS: [i64; 3] = [0, SECOND / 10, 9 * SECOND / 10];
/// services.exe start relative to `t_event()`: with connections at `t_event() + 0..8 s`,
/// these give `datetime_diff(connection, start)` of exactly 60 and 61 (-55 s, -59.5 s),
/// always ≤ 60 (-52 s), always > 60 (-1 h), and null.
const STARTS: [Option<i64>; 5] =
    [Some(-55 * SECOND), Some(-59 * SECOND - SECOND / 2), Some(-52 * SECOND), Some(-HOUR), None];
/// Child SHA1s: the third is the first in upper case (another group; `in` is exact), the
/// last is empty.
const SHA1S: [&str; 4] = [
    "4a5c4a3a0a9e1f4f5e8b3c4d2e1f0a9b8c7d6e5f",
    "b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1",
    "4A5C4A3A0A9E1F4F5E8B3C4D2E1F0A9B8C7D6E5F",
    "",
];
/// Child file names: `Cmd.exe` and `Msiexec.exe` are LOLBINs in any case.
const FILES: [&str; 5] = ["evil.exe", "cmd.exe", "CMD.EXE", "psexesvc.exe", "Msiexec.exe"];
/// Command lines: the second and third are `=~ "msiexec.exe /V"`, the fourth is not.
const COMMANDS: [&str; 5] = ["evil.exe -c", "msiexec.exe /V", "MSIEXEC.EXE /v", "msiexec.exe /V /q", ""];
const THRESHOLDS: [i64; 4] = [1, 2, 3, 100];

#[derive(Debug, Clone)]
enum Spec {
    Net {
        dev: usize,
        pid: usize,
        process: usize,
        action: usize,
        sec: i64,
        frac: usize,
    },
    Child {
        dev: usize,
        pid: usize,
        process: usize,
        action: usize,
        sec: i64,
        frac: usize,
        start: usize,
        sha: usize,
        file: usize,
        cmd: usize,
    },
    Cert {
        sha: usize,
        dev: usize,
    },
}

#[derive(Debug, Clone)]
enum Step {
    /// A few minutes.
    Small { minutes: i64 },
    /// The previous tick's rows sit exactly on the window's edge at this tick's pass.
    Boundary,
    /// The previous tick's rows are 100 ns past the window's edge at this tick's pass.
    JustPast,
    /// More than the timeframe.
    Big { minutes: i64 },
    /// The rows of an earlier tick (one whose rows are still in) are 100 ns past the
    /// window's edge: some pairs leave, later ones stay.
    PastEarlier { pick: u8 },
}

#[derive(Debug, Clone)]
struct Scenario {
    threshold: usize,
    rows: Vec<Spec>,
    cuts: Vec<u8>,
    /// Ticks with no rows after the last one (passes the clock alone can change).
    trailing: usize,
    steps: Vec<Step>,
    restarts: Vec<Restart>,
    chunks: Vec<Option<usize>>,
}

fn weighted3(a: u32, b: u32, c: u32) -> impl Strategy<Value = usize> {
    prop_oneof![a => Just(0usize), b => Just(1usize), c => Just(2usize)]
}

fn spec_net() -> impl Strategy<Value = Spec> {
    (weighted3(8, 1, 1), weighted3(8, 1, 1), weighted3(8, 2, 1), weighted3(8, 1, 1), 0..8i64, 0..3usize)
        .prop_map(|(dev, pid, process, action, sec, frac)| Spec::Net { dev, pid, process, action, sec, frac })
}

fn spec_child() -> impl Strategy<Value = Spec> {
    (
        (weighted3(8, 1, 1), weighted3(8, 1, 1), weighted3(8, 2, 1), weighted3(8, 1, 1)),
        (
            0..14i64,
            0..3usize,
            prop_oneof![2 => Just(0usize), 3 => Just(1usize), 1 => Just(2usize), 5 => Just(3usize), 1 => Just(4usize)],
        ),
        (
            prop_oneof![5 => Just(0usize), 2 => Just(1usize), 1 => Just(2usize), 1 => Just(3usize)],
            prop_oneof![4 => Just(0usize), 1 => Just(1usize), 1 => Just(2usize), 2 => Just(3usize), 1 => Just(4usize)],
            prop_oneof![6 => Just(0usize), 2 => Just(1usize), 1 => Just(2usize), 1 => Just(3usize), 1 => Just(4usize)],
        ),
    )
        .prop_map(|((dev, pid, process, action), (sec, frac, start), (sha, file, cmd))| Spec::Child {
            dev,
            pid,
            process,
            action,
            sec,
            frac,
            start,
            sha,
            file,
            cmd,
        })
}

fn spec_cert() -> impl Strategy<Value = Spec> {
    let sha = prop_oneof![1 => Just(0usize), 2 => Just(1usize), 2 => Just(2usize), 2 => Just(3usize)];
    (sha, 0..2usize).prop_map(|(sha, dev)| Spec::Cert { sha, dev })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let rows = (
        prop::collection::vec(spec_net(), 2..=10),
        prop::collection::vec(spec_child(), 4..=18),
        prop::collection::vec(spec_cert(), 0..=3),
    )
        .prop_flat_map(|(nets, children, certs)| {
            let mut all = nets;
            all.extend(children);
            all.extend(certs);
            Just(all).prop_shuffle()
        });
    let step = prop_oneof![
        5 => (1..=40i64).prop_map(|minutes| Step::Small { minutes }),
        2 => Just(Step::Boundary),
        2 => Just(Step::JustPast),
        1 => (1..=60i64).prop_map(|minutes| Step::Big { minutes }),
        4 => any::<u8>().prop_map(|pick| Step::PastEarlier { pick }),
    ];
    let restart = prop_oneof![5 => Just(Restart::No), 4 => Just(Restart::Before), 1 => Just(Restart::BeforePass)];
    let chunk = prop_oneof![3 => Just(None), 2 => (1..=5usize).prop_map(Some)];
    (
        prop_oneof![1 => Just(0usize), 4 => Just(1usize), 2 => Just(2usize), 1 => Just(3usize)],
        rows,
        prop::collection::vec(any::<u8>(), 1..=4),
        1..=3usize,
        prop::collection::vec(step, 9),
        prop::collection::vec(restart, 9),
        prop::collection::vec(chunk, 9),
    )
        .prop_map(|(threshold, rows, cuts, trailing, steps, restarts, chunks)| Scenario {
            threshold,
            rows,
            cuts,
            trailing,
            steps,
            restarts,
            chunks,
        })
}

impl Scenario {
    fn threshold(&self) -> i64 {
        THRESHOLDS[self.threshold]
    }

    fn ticks(&self) -> Vec<Tick> {
        let at = |sec: i64, frac: usize| t_event() + sec * SECOND + FRACTIONS[frac];
        let rows: Vec<(&'static str, Map<String, Value>)> = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let report = 1000 + i as i64;
                match *spec {
                    Spec::Net { dev, pid, process, action, sec, frac } => (
                        NETWORK,
                        net_row(
                            report,
                            at(sec, frac),
                            DEVICES[dev],
                            PIDS[pid],
                            PROCESSES[process],
                            NET_ACTIONS[action],
                        ),
                    ),
                    Spec::Child { dev, pid, process, action, sec, frac, start, sha, file, cmd } => (
                        PROCESS,
                        child_row(
                            report,
                            at(sec, frac),
                            DEVICES[dev],
                            PIDS[pid],
                            PROCESSES[process],
                            CHILD_ACTIONS[action],
                            STARTS[start].map(|s| t_event() + s),
                            SHA1S[sha],
                            FILES[file],
                            COMMANDS[cmd],
                        ),
                    ),
                    Spec::Cert { sha, dev } => {
                        (CERTIFICATES, cert_row(report, t_event() - HOUR, DEVICES[dev], SHA1S[sha]))
                    }
                }
            })
            .collect();
        // The ingestion times of the ticks so far.
        let mut earlier: Vec<i64> = Vec::new();
        split_ticks(&rows, &self.cuts, self.trailing, &self.restarts, &self.chunks, |k, now| {
            earlier.push(now);
            match self.steps[k] {
                Step::Small { minutes } => minutes * MINUTE,
                Step::Boundary => TIMEFRAME - EVAL_DELAY,
                Step::JustPast => TIMEFRAME - EVAL_DELAY + 1,
                Step::Big { minutes } => TIMEFRAME + minutes * MINUTE,
                Step::PastEarlier { pick } => {
                    let edges: Vec<i64> =
                        earlier.iter().map(|t| t + TIMEFRAME - EVAL_DELAY + 1).filter(|e| *e > now).collect();
                    match edges.get(usize::from(pick) % edges.len().max(1)) {
                        Some(e) => e - now,
                        None => MINUTE,
                    }
                }
            }
        })
    }
}

// `PROPTEST_CASES`, or the default here (each case takes about 1.5 s in a debug build; the
// two properties run side by side, well under a minute together).
proptest! {
    #![proptest_config(proptest_config(14))]

    /// For any fleet, any split into ticks, any arrival order, restarts and chunking, the
    /// findings are exactly R(t1) ∪ R(t2) ∪ … of the batch rule, each identity once.
    #[test]
    fn incremental_equals_union_of_batch_results(s in scenario()) {
        check_ticks(&s.ticks(), s.threshold()).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(proptest_config(10))]

    /// The same property where the clock alone matters: pairs on one services.exe spread
    /// over a few ticks minutes apart, counts around a small threshold, then passes with
    /// no new rows exactly on and just past each tick's window edge. A wake-up asked for
    /// too late (or not at all) misses the pairs whose SHA1 count falls under the
    /// threshold as earlier pairs leave.
    #[test]
    fn passes_with_no_new_rows_follow_the_clock(s in clock_scenario()) {
        check_ticks(&s.ticks(), s.threshold).map_err(TestCaseError::fail)?;
    }
}

/// One (connection, child) pair of [`ClockScenario`]: the tick of each row, the child's
/// SHA1 (of two), whether it is a LOLBIN, whether its command line is `msiexec.exe /V`,
/// the connection's second and the child's delay in seconds.
type ClockPair = (usize, usize, usize, bool, bool, i64, i64);

#[derive(Debug, Clone)]
struct ClockScenario {
    threshold: i64,
    pairs: Vec<ClockPair>,
    /// Minutes between the (up to four) ticks with rows.
    gaps: Vec<i64>,
    /// Passes with no rows: (which earlier tick's window edge, exactly on it or 100 ns past).
    edges: Vec<(u8, bool)>,
    restarts: Vec<Restart>,
    chunks: Vec<Option<usize>>,
}

fn clock_scenario() -> impl Strategy<Value = ClockScenario> {
    let pair =
        (0..4usize, 0..4usize, 0..2usize, prop::bool::weighted(0.15), prop::bool::weighted(0.15), 0..4i64, 0..=10i64)
            .prop_map(|(tn, tc, sha, lolbin, msiexec, sec, delay)| (tn, tc, sha, lolbin, msiexec, sec, delay));
    let restart = prop_oneof![5 => Just(Restart::No), 3 => Just(Restart::Before), 2 => Just(Restart::BeforePass)];
    let chunk = prop_oneof![3 => Just(None), 2 => (1..=3usize).prop_map(Some)];
    (
        2..=4i64,
        prop::collection::vec(pair, 2..=9),
        prop::collection::vec(1..=50i64, 3),
        prop::collection::vec((any::<u8>(), prop::bool::weighted(0.3)), 1..=4),
        prop::collection::vec(restart, 8),
        prop::collection::vec(chunk, 8),
    )
        .prop_map(|(threshold, pairs, gaps, edges, restarts, chunks)| ClockScenario {
            threshold,
            pairs,
            gaps,
            edges,
            restarts,
            chunks,
        })
}

impl ClockScenario {
    fn ticks(&self) -> Vec<Tick> {
        let started = Some(t_event() - HOUR);
        let mut by_tick: Vec<Vec<(&'static str, Map<String, Value>)>> = vec![Vec::new(); 4];
        for (i, &(tn, tc, sha, lolbin, msiexec, sec, delay)) in self.pairs.iter().enumerate() {
            let report = 1000 + 2 * i as i64;
            let net_at = t_event() + sec * SECOND + FRACTIONS[i % 3];
            let child_at = t_event() + (sec + delay) * SECOND + FRACTIONS[(i / 3) % 3];
            let (file, cmd) = match (lolbin, msiexec) {
                (true, true) => ("msiexec.exe", "msiexec.exe /V"),
                (true, false) => ("cmd.exe", "cmd.exe /c x"),
                (false, true) => ("evil.exe", "MSIEXEC.EXE /v"),
                (false, false) => ("evil.exe", "evil.exe"),
            };
            let svc = "services.exe";
            by_tick[tn]
                .push((NETWORK, net_row(report, net_at, "d-alpha", Some(700), svc, "InboundConnectionAccepted")));
            by_tick[tc].push((
                PROCESS,
                child_row(
                    report + 1,
                    child_at,
                    "d-alpha",
                    Some(700),
                    svc,
                    "ProcessCreated",
                    started,
                    SHA1S[sha],
                    file,
                    cmd,
                ),
            ));
        }
        let mut ticks = Vec::new();
        let mut now = t0();
        for (k, rows) in by_tick.into_iter().enumerate() {
            if k > 0 {
                now += self.gaps[k - 1] * MINUTE;
            }
            ticks.push(Tick { now, restart: self.restarts[k], chunk_rows: self.chunks[k], rows });
        }
        let with_rows: Vec<i64> = ticks.iter().map(|t| t.now).collect();
        for (j, &(pick, exact)) in self.edges.iter().enumerate() {
            let step = if exact { 0 } else { 1 };
            let edges: Vec<i64> =
                with_rows.iter().map(|t| t + TIMEFRAME - EVAL_DELAY + step).filter(|e| *e > now).collect();
            now = edges.get(usize::from(pick) % edges.len().max(1)).copied().unwrap_or(now + MINUTE);
            ticks.push(Tick { now, restart: self.restarts[4 + j], chunk_rows: self.chunks[4 + j], rows: Vec::new() });
        }
        ticks
    }
}

// ---------------------------------------------------------------------------------------
// Sharp edges, by hand: each also pins the naive evaluator to the expected identities.
// ---------------------------------------------------------------------------------------

fn ident(net: &Map<String, Value>, child: &Map<String, Value>) -> Identity {
    (
        value_text(net.get("DeviceId")),
        value_text(net.get("ReportId")),
        instant_text(child.get("Timestamp")),
        value_text(child.get("SHA1")),
    )
}

const RARE: &str = "1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e";

/// Two pairs of one SHA1 reach a threshold of 2, so neither fires; a third, ingested ten
/// minutes later, neither. Once the first two leave the window (no new row arrives), the
/// SHA1's count is 1 and the third pair fires, in a pass the detector itself asked for.
#[test]
fn a_pair_leaving_the_window_lets_the_other_fire_with_no_new_row() {
    let started = Some(t_event() - HOUR);
    let net1 = net_row(1, t_event(), "d-alpha", Some(700), "services.exe", "InboundConnectionAccepted");
    let child1 = child_row(
        2,
        t_event() + 2 * SECOND,
        "d-alpha",
        Some(700),
        "services.exe",
        "ProcessCreated",
        started,
        RARE,
        "x.exe",
        "x",
    );
    let child1b = child_row(
        5,
        t_event() + 3 * SECOND,
        "d-alpha",
        Some(700),
        "services.exe",
        "ProcessCreated",
        started,
        RARE,
        "x.exe",
        "y",
    );
    let net2 = net_row(3, t_event() + MINUTE, "d-alpha", Some(700), "services.exe", "InboundConnectionAccepted");
    let child2 = child_row(
        4,
        t_event() + MINUTE + 3 * SECOND,
        "d-alpha",
        Some(700),
        "services.exe",
        "ProcessCreated",
        started,
        RARE,
        "x.exe",
        "x",
    );
    let ticks = vec![
        Tick::new(t0(), Restart::No, vec![(NETWORK, net1), (PROCESS, child1), (PROCESS, child1b)]),
        Tick::new(t0() + 10 * MINUTE, Restart::No, vec![(NETWORK, net2.clone()), (PROCESS, child2.clone())]),
        // The first tick's rows are on the window's edge: still three pairs.
        Tick::new(t0() + TIMEFRAME - EVAL_DELAY, Restart::Before, vec![]),
        // 100 ns later they are out; nothing new is ingested.
        Tick::new(t0() + TIMEFRAME - EVAL_DELAY + 1, Restart::No, vec![]),
    ];
    assert_eq!(check_ticks(&ticks[..3], 2).unwrap_or_else(|e| panic!("{e}")), BTreeSet::new());
    assert_eq!(check_ticks(&ticks, 2).unwrap_or_else(|e| panic!("{e}")), BTreeSet::from([ident(&net2, &child2)]));
}

/// Two children at one instant, their Timestamps spelled two ways, with the same SHA1
/// under one connection: one KQL datetime, so one identity and one finding (also when
/// they arrive in separate ticks).
#[test]
fn one_child_time_spelled_two_ways_is_one_finding() {
    let started = Some(t_event() - HOUR);
    let net = net_row(1, t_event(), "d-alpha", Some(700), "services.exe", "InboundConnectionAccepted");
    let child = |report: i64, spelled: &str| {
        let mut row = child_row(
            report,
            t_event() + 3 * SECOND,
            "d-alpha",
            Some(700),
            "services.exe",
            "ProcessCreated",
            started,
            RARE,
            "x.exe",
            "x",
        );
        row.insert("Timestamp".into(), json!(spelled));
        row
    };
    let short = child(2, "2025-05-07T11:50:03.5Z");
    let long = child(3, "2025-05-07T11:50:03.5000000Z");
    let want = BTreeSet::from([ident(&net, &short)]);
    assert_eq!(ident(&net, &short), ident(&net, &long));
    let together = vec![Tick::new(
        t0(),
        Restart::No,
        vec![(NETWORK, net.clone()), (PROCESS, short.clone()), (PROCESS, long.clone())],
    )];
    assert_eq!(check_ticks(&together, 3).unwrap_or_else(|e| panic!("{e}")), want);
    let apart = vec![
        Tick::new(t0(), Restart::No, vec![(NETWORK, net.clone()), (PROCESS, long)]),
        Tick::new(t0() + MINUTE, Restart::Before, vec![(PROCESS, short)]),
    ];
    assert_eq!(check_ticks(&apart, 3).unwrap_or_else(|e| panic!("{e}")), want);
}

/// Shortening `timeframe` takes effect on the next pass (a restart with the new value): a
/// connection ingested before the new window no longer joins, though it was kept until
/// the old window's end.
#[test]
fn a_shorter_timeframe_takes_effect_on_the_next_pass() {
    let started = Some(t_event() - HOUR);
    let net = net_row(1, t_event(), "d-alpha", Some(700), "services.exe", "InboundConnectionAccepted");
    let child = child_row(
        2,
        t_event() + 2 * SECOND,
        "d-alpha",
        Some(700),
        "services.exe",
        "ProcessCreated",
        started,
        RARE,
        "x.exe",
        "x",
    );
    // The connection at t0, the child 90 minutes later, each with a pass; the detector
    // restarted before the second with these parameters.
    let later = t0() + 90 * MINUTE;
    let findings = |params: &[(&str, String)]| -> Result<BTreeSet<Identity>, String> {
        let mut engine = Engine::open(&RULE)?;
        engine.ingest_rows(0, &[(NETWORK, net.clone())], t0())?;
        engine.pass(t0(), None, &[])?;
        engine.ingest_rows(1, &[(PROCESS, child.clone())], later)?;
        engine.restart()?;
        engine.pass(later, None, params)?;
        engine.flush()?.iter().map(identity_of).collect()
    };
    assert_eq!(findings(&[("timeframe", "1h".to_string())]), Ok(BTreeSet::new()), "the connection is 90 min old");
    assert_eq!(findings(&[]), Ok(BTreeSet::from([ident(&net, &child)])), "under the default 2 hours, a finding");
}

/// A certificate for the SHA1 stops later findings of it, never retracts earlier ones; a
/// LOLBIN fires whatever its certificate.
#[test]
fn a_later_certificate_stops_later_findings_only() {
    let started = Some(t_event() - HOUR);
    let child = |report: i64, at: i64, file: &str| {
        child_row(report, at, "d-alpha", Some(700), "services.exe", "ProcessCreated", started, RARE, file, "")
    };
    let net1 = net_row(1, t_event(), "d-alpha", Some(700), "services.exe", "InboundConnectionAccepted");
    let c1 = child(2, t_event() + SECOND, "x.exe");
    let net2 = net_row(3, t_event() + MINUTE, "d-alpha", Some(700), "services.exe", "InboundConnectionAccepted");
    let c2 = child(4, t_event() + MINUTE + SECOND, "x.exe");
    let c3 = child(5, t_event() + MINUTE + 2 * SECOND, "CMD.exe");
    let ticks = vec![
        Tick::new(t0(), Restart::No, vec![(NETWORK, net1.clone()), (PROCESS, c1.clone())]),
        Tick::new(
            t0() + MINUTE,
            Restart::No,
            vec![(CERTIFICATES, cert_row(9, t_event(), "d-beta", RARE)), (NETWORK, net2.clone()), (PROCESS, c2)],
        ),
        Tick::new(t0() + 2 * MINUTE, Restart::BeforePass, vec![(PROCESS, c3.clone())]),
    ];
    assert_eq!(
        check_ticks(&ticks, 100).unwrap_or_else(|e| panic!("{e}")),
        BTreeSet::from([ident(&net1, &c1), ident(&net2, &c3)])
    );
}

// ---------------------------------------------------------------------------------------
// Golden tests.
// ---------------------------------------------------------------------------------------

/// Ingests `paths` at `now`, runs one pass at `now` with `set` overrides, returns the
/// findings.
fn detect_once(paths: &[PathBuf], now: i64, set: &[(&str, String)]) -> Vec<Value> {
    RULE.detect_once(&[(now, paths.to_vec())], now, set).lines
}

/// kqlbench has DeviceNetworkEvents and DeviceFileCertificateInfo but no
/// DeviceProcessEvents, so the join is empty and nothing fires. Checked by hand (and
/// below, from the export): of its 749 network rows, 21 are InboundConnectionAccepted
/// (sshd.exe 13, ntoskrnl.exe 4, sshd 2, svchost.exe 1, python3.12 1) and none is by
/// services.exe, so 0 rows pass the `networkEvents` filters.
#[test]
fn kqlbench_finds_nothing() {
    let k = kqlbench_dir();
    let network: Vec<Value> =
        serde_json::from_slice(&std::fs::read(k.join("DeviceNetworkEvents.json")).unwrap()).unwrap();
    let s = |r: &Value, c: &str| r.get(c).and_then(Value::as_str).unwrap_or("").to_string();
    let inbound =
        network.iter().filter(|r| s(r, "ActionType").eq_ignore_ascii_case("InboundConnectionAccepted")).count();
    let passing = network
        .iter()
        .filter(|r| s(r, "ActionType").eq_ignore_ascii_case("InboundConnectionAccepted"))
        .filter(|r| s(r, "InitiatingProcessFileName").eq_ignore_ascii_case("services.exe"))
        .count();
    assert_eq!((network.len(), inbound, passing), (749, 21, 0));
    let now = parse_timestamp("2025-05-08T00:00:00Z").unwrap();
    let findings =
        detect_once(&[k.join("DeviceNetworkEvents.json"), k.join("DeviceFileCertificateInfo.json")], now, &[]);
    assert_eq!(findings.len(), 0, "{findings:?}");
}

/// The hand-written fixture (ingested and evaluated at 11:00; every row in the window).
/// services.exe (pid 668) started at 08:00 on dev-1.
///
/// | row | what | pairs with | result |
/// |---|---|---|---|
/// | N1 #101 10:00:00.5 | inbound, services.exe 668 | | |
/// | N2 #102 10:30:00 | inbound, services.exe 668 | | |
/// | N3 #103 dev-2 10:00:00 | inbound, `Services.exe` 700 | C7 has `services.exe`: no join | |
/// | N4 #104 11:00:00 | ConnectionSuccess | filtered | |
/// | N5 #105 10:30:01 | inbound, pid 669 | C12 (started 10:29:01.5: diff 60, not > 60) | |
/// | N6 #106 10:30:01 | inbound, pid 670 | C13 (started 10:29:00.9: diff 61) | **fires**: s-late count 1 |
/// | C1 #201 10:00:00.1 | PSEXESVC.exe, s-psexec | N1 (0.4 s before, same second: diff 0) | **fires**: count 1, no certificate |
/// | C2 #202 10:00:10.9 | cmd.exe, s-cmd (certificate) | N1 (diff 10) | **fires**: LOLBIN |
/// | C3 #203 10:00:11 | evil.exe | N1 diff 11: no pair | |
/// | C4 #204 10:30:05 | svc.exe, s-signed (certificate on dev-2) | N2 | certified, not a LOLBIN |
/// | C5 #205 10:30:06 | msiexec.exe `msiexec.exe /V`, s-msi | N2 | whole-string msiexec filter |
/// | C6 #206 10:30:07 | msiexec.exe `C:\…\msiexec.exe /V`, s-msi | N2 | **fires**: s-msi count 2 (C5, C6), and a LOLBIN |
/// | C7 #207 dev-2 10:00:02 | `services.exe` 700 | none (see N3) | |
/// | C8 #208 10:00:03 | null InitiatingProcessCreationTime | N1 joins, `> 60` fails | |
/// | C9 #209 10:00:04 | parent svchost.exe | filtered | |
/// | C10 #210, C11 #211 10:00:05 | dup.exe, s-dup, same Timestamp | N1, both | **fires once**: one identity, s-dup count 2 |
///
/// So 5 findings at the default threshold 100; at threshold 2, s-dup (2 pairs) and s-msi
/// (2) are no longer rare: C10/C11 drop, C6 still fires as a LOLBIN: 4 findings.
#[test]
fn hand_written_fixture() {
    let t = |s: &str| parse_timestamp(&format!("2025-05-07T{s}Z")).unwrap();
    let s668 = Some(t("08:00:00"));
    let inbound = "InboundConnectionAccepted";
    let created = "ProcessCreated";
    let svc = "services.exe";
    let network = vec![
        net_row(101, t("10:00:00.5"), "dev-1", Some(668), svc, inbound),
        net_row(102, t("10:30:00"), "dev-1", Some(668), svc, inbound),
        net_row(103, t("10:00:00"), "dev-2", Some(700), "Services.exe", inbound),
        net_row(104, t("11:00:00"), "dev-1", Some(668), svc, "ConnectionSuccess"),
        net_row(105, t("10:30:01"), "dev-1", Some(669), svc, inbound),
        net_row(106, t("10:30:01"), "dev-1", Some(670), svc, inbound),
    ];
    let c = |report, at: &str, pid, started, sha1, file, cmd| {
        child_row(report, t(at), "dev-1", Some(pid), svc, created, started, sha1, file, cmd)
    };
    let mut children = vec![
        c(201, "10:00:00.1", 668, s668, "s-psexec", "PSEXESVC.exe", r"C:\Windows\PSEXESVC.exe"),
        c(202, "10:00:10.9", 668, s668, "s-cmd", "cmd.exe", "cmd.exe /c whoami > C:\\Windows\\Temp\\o.txt"),
        c(203, "10:00:11", 668, s668, "s-evil", "evil.exe", "evil.exe"),
        c(204, "10:30:05", 668, s668, "s-signed", "svc.exe", "svc.exe"),
        c(205, "10:30:06", 668, s668, "s-msi", "msiexec.exe", "msiexec.exe /V"),
        c(206, "10:30:07", 668, s668, "s-msi", "msiexec.exe", r"C:\Windows\system32\msiexec.exe /V"),
        child_row(207, t("10:00:02"), "dev-2", Some(700), svc, created, Some(t("08:00:00")), "s-x", "x.exe", "x"),
        c(208, "10:00:03", 668, None, "s-null", "evil2.exe", "evil2.exe"),
        child_row(209, t("10:00:04"), "dev-1", Some(668), "svchost.exe", created, s668, "s-svch", "y.exe", "y"),
        c(210, "10:00:05", 668, s668, "s-dup", "dup.exe", "dup.exe 1"),
        c(211, "10:00:05", 668, s668, "s-dup", "dup.exe", "dup.exe 2"),
        c(212, "10:30:02", 669, Some(t("10:29:01.5")), "s-early", "early.exe", "early.exe"),
        c(213, "10:30:02", 670, Some(t("10:29:00.9")), "s-late", "late.exe", "late.exe"),
    ];
    children.push(child_row(214, t("10:00:06"), "dev-1", Some(668), svc, "OpenProcess", s668, "s-open", "o.exe", "o"));
    let certs = vec![cert_row(301, t("09:00:00"), "dev-1", "s-cmd"), cert_row(302, t("09:00:00"), "dev-2", "s-signed")];

    let dir = tempfile::tempdir().unwrap();
    let write = |table: &str, rows: &[Map<String, Value>]| {
        let path = dir.path().join(format!("{table}.jsonl"));
        let text: String = rows.iter().map(|r| Value::Object(r.clone()).to_string() + "\n").collect();
        std::fs::write(&path, text).unwrap();
        path
    };
    let paths = vec![write(NETWORK, &network), write(PROCESS, &children), write(CERTIFICATES, &certs)];
    let now = t("11:00:00");

    let id = |report: &str, ts: &str, sha1: &str| {
        ("dev-1".to_string(), report.to_string(), format_timestamp(t(ts)), sha1.to_string())
    };
    let all = BTreeSet::from([
        id("101", "10:00:00.1", "s-psexec"),
        id("101", "10:00:10.9", "s-cmd"),
        id("102", "10:30:07", "s-msi"),
        id("101", "10:00:05", "s-dup"),
        id("106", "10:30:02", "s-late"),
    ]);
    let findings = detect_once(&paths, now, &[]);
    let got: BTreeSet<Identity> = findings.iter().map(|f| identity_of(f).unwrap()).collect();
    assert_eq!(findings.len(), 5);
    assert_eq!(got, all);

    // The naive evaluator agrees.
    let stored: Vec<StoredRow> = [(NETWORK, &network), (PROCESS, &children), (CERTIFICATES, &certs)]
        .iter()
        .flat_map(|(table, rows)| {
            rows.iter().map(|r| StoredRow { table: table.to_string(), ingested_at: now, row: r.clone() })
        })
        .collect();
    assert_eq!(naive_scm_remote::evaluate(&stored, now, &default_params(100)), all);

    // The result row of C1's finding, column by column.
    let f = findings
        .iter()
        .find(|f| f["row"]["SHA1"] == "s-psexec")
        .unwrap_or_else(|| panic!("no s-psexec finding: {findings:?}"));
    assert_eq!(f["detector"], DETECTOR);
    assert_eq!(f["device_id"], "dev-1");
    assert_eq!(f["device_name"], "dev-1.corp.example.com");
    let row = f["row"].as_object().unwrap();
    let names: Vec<&str> = row.keys().map(String::as_str).collect();
    let mut want: Vec<&str> =
        network[0].keys().map(|k| if k == "Timestamp" { "TimestampNetworkAct" } else { k }).collect();
    // Then the columns of DeviceNetworkEvents the stored row lacks, as KQL's table has them.
    let schema = lookout_plugin_sdk::schema::columns(NETWORK).unwrap_or_default();
    want.extend(schema.iter().map(|(n, _)| *n).filter(|n| *n != "Timestamp" && !network[0].contains_key(*n)));
    want.extend([
        "TimestampChild",
        "DeviceId1",
        "DeviceName1",
        "FileName",
        "ProcessCommandLine",
        "SHA1",
        "InitiatingProcessFileName1",
        "InitiatingProcessCommandLine1",
        "InitiatingProcessSHA11",
        "InitiatingProcessId1",
        "TimestampServicesExe",
        "Timestamp",
    ]);
    assert_eq!(names, want);
    assert_eq!(row["TimestampNetworkAct"], format_timestamp(t("10:00:00.5")));
    assert_eq!(row["Timestamp"], row["TimestampNetworkAct"]);
    assert_eq!(row["ReportId"], 101);
    assert_eq!(row["TimestampChild"], format_timestamp(t("10:00:00.1")));
    assert_eq!(row["TimestampServicesExe"], format_timestamp(t("08:00:00")));
    assert_eq!(row["InitiatingProcessId"], 668);
    assert_eq!(row["InitiatingProcessId1"], 668);
    assert_eq!(row["FileName"], "PSEXESVC.exe");
    assert_eq!(row["LocalPort"], 135);

    // A lower threshold: s-dup and s-msi have 2 pairs each.
    let findings = detect_once(&paths, now, &[("prevalence_threshold", "2".into())]);
    let got: BTreeSet<Identity> = findings.iter().map(|f| identity_of(f).unwrap()).collect();
    let mut fewer = all.clone();
    fewer.remove(&id("101", "10:00:05", "s-dup"));
    assert_eq!(got, fewer);
    assert_eq!(naive_scm_remote::evaluate(&stored, now, &default_params(2)), fewer);
}

// ---------------------------------------------------------------------------------------
// The fleet generator.
// ---------------------------------------------------------------------------------------

/// A generated fleet's findings for this detector are exactly its expected entries.
#[test]
fn generated_fleet_findings_are_exactly_the_expected_ones() {
    // Eight attacks: each of the four kinds twice.
    let spec = FleetSpec { devices: 12, events: 4000, attacks: 8, seed: 7, ..FleetSpec::default() };
    let (expected, once) = RULE.detect_generated_fleet(&spec);
    assert_eq!(expected.len(), spec.attacks, "one finding per attack: {expected:?}");

    let columns: Vec<String> =
        ["DeviceId", "ReportId", "TimestampChild", "SHA1"].iter().map(|s| s.to_string()).collect();
    let found: Vec<gen::Expected> = once
        .lines
        .iter()
        .map(|f| gen::expected_of(f, &columns).unwrap_or_else(|| panic!("finding lacks identity columns: {f}")))
        .collect();
    let found_set: BTreeSet<gen::Expected> = found.iter().cloned().collect();
    assert_eq!(found.len(), found_set.len());
    let missing: Vec<_> = expected.difference(&found_set).collect();
    let extra: Vec<_> = found_set.difference(&expected).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}\nextra {extra:?}");
}
