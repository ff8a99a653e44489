//! The `password-spraying` detector (FalconFriday 0xFF-0044) must emit exactly what the
//! scheduled KQL rule would: the union, over the evaluation times of its passes, of the
//! batch query's result over everything stored so far — each finding identity
//! (IPAddress, DeviceName, DeviceId, FirstFailed) once, with the row of the first pass
//! that produced it — for any split of the input into ticks, any arrival order, chunked
//! passes, restarts, and passes that only the clock moves (docs/rules/SEMANTICS.md).
//!
//! The oracle is `naive_spraying::evaluate`, a batch evaluator written from SEMANTICS.md
//! and the KQL, independently of the plugin.
//!
//! `PROPTEST_CASES=500 cargo test -p lookout-cli --test rule_password_spraying` soaks it.

mod naive_spraying;

use lookout_plugin_sdk::time::{format_timestamp, parse_timestamp};
use lookout_tests::ticks::{obj, proptest_config, split_ticks, t0, Restart, Rule, Tick, DAY, EVAL_DELAY, HOUR, MINUTE};
use lookout_tests::{kqlbench_dir, PASSWORD_SPRAYING};
use naive_spraying::{Identity, Params, StoredRow, IDENTITY, LOGONS, NETWORK};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

const DETECTOR: &str = "password-spraying";

// ---------------------------------------------------------------------------------------
// The harness: ticks of rows through the engine (`lookout_tests::ticks`: each tick's rows
// ingested at its `now`, one pass at `now + EVAL_DELAY`), and through the naive evaluator.
// ---------------------------------------------------------------------------------------

const RULE: Rule = Rule { lib: PASSWORD_SPRAYING, detector: DETECTOR, tables: &[LOGONS, NETWORK, IDENTITY], show_row };

/// The detector's parameters, as `--set` values and as the oracle's.
#[derive(Debug, Clone)]
struct Setting {
    timeframe: &'static str,
    unique: i64,
    per_account: i64,
    ratio: i64,
}

impl Setting {
    fn defaults() -> Setting {
        Setting { timeframe: "2d", unique: 20, per_account: 3, ratio: 2 }
    }

    fn timeframe_ticks(&self) -> i64 {
        lookout_plugin_sdk::time::parse_duration(self.timeframe).unwrap()
    }

    fn params(&self) -> Params {
        Params {
            timeframe: self.timeframe_ticks(),
            unique_failed_accounts: self.unique,
            failed_per_account: self.per_account,
            success_ratio: self.ratio,
        }
    }

    fn sets(&self) -> Vec<(&'static str, String)> {
        vec![
            ("timeframe", self.timeframe.to_string()),
            ("unique_failed_accounts", self.unique.to_string()),
            ("failed_per_account", self.per_account.to_string()),
            ("success_ratio", self.ratio.to_string()),
        ]
    }
}

fn identity_of(f: &Value) -> Result<Identity, String> {
    let row = f.get("row").and_then(Value::as_object).ok_or_else(|| format!("finding without a row: {f}"))?;
    let text = |c: &str| -> Result<String, String> {
        match row.get(c) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Null) => Ok(String::new()),
            _ => Err(format!("finding row lacks {c}: {f}")),
        }
    };
    Ok((text("IPAddress")?, text("DeviceName")?, text("DeviceId")?, text("FirstFailed")?))
}

/// A finding's row (an object: [`identity_of`] checked it).
fn row_of(f: &Value) -> Map<String, Value> {
    f["row"].as_object().cloned().unwrap_or_default()
}

fn show_row(table: &str, r: &Map<String, Value>) -> String {
    let g = |c: &str| r.get(c).map_or("-".to_string(), |v| v.to_string());
    match table {
        LOGONS => format!(
            "logon    #{} {} ip={} rdev={} dev={}/{} acct={} type={} iptype={} ts={}",
            g("ReportId"),
            g("ActionType"),
            g("RemoteIP"),
            g("RemoteDeviceName"),
            g("DeviceId"),
            g("DeviceName"),
            g("AccountName"),
            g("LogonType"),
            g("RemoteIPType"),
            g("Timestamp")
        ),
        NETWORK => format!(
            "network  #{} {} dev={} proc={} port={}",
            g("ReportId"),
            g("ActionType"),
            g("DeviceName"),
            g("InitiatingProcessFileName"),
            g("LocalPort")
        ),
        _ => format!(
            "identity #{} {} ip={} dev={} upn={} ts={}",
            g("ReportId"),
            g("ActionType"),
            g("IPAddress"),
            g("DeviceName"),
            g("AccountUpn"),
            g("Timestamp")
        ),
    }
}

type Found = BTreeMap<Identity, Map<String, Value>>;

fn diff(what: &str, expected: &Found, actual: &Found) -> Option<String> {
    if expected == actual {
        return None;
    }
    let mut s = format!("{what}: expected {} findings, got {}\n", expected.len(), actual.len());
    for (id, row) in expected {
        match actual.get(id) {
            None => {
                let _ = writeln!(s, "  missing: {id:?} {}", Value::Object(row.clone()));
            }
            Some(other) if other != row => {
                let _ = writeln!(
                    s,
                    "  differs: {id:?}\n    expected {}\n    got      {}",
                    Value::Object(row.clone()),
                    Value::Object(other.clone())
                );
            }
            _ => {}
        }
    }
    for (id, row) in actual {
        if !expected.contains_key(id) {
            let _ = writeln!(s, "  extra:   {id:?} {}", Value::Object(row.clone()));
        }
    }
    Some(s)
}

/// Runs the ticks through the engine (files → ingest → one pass → outbox) and checks after
/// every pass that the findings JSONL and the results tree hold exactly the union of the
/// naive results so far (each identity once, with its first pass's row).
fn check_ticks(ticks: &[Tick], setting: &Setting) -> Result<Found, String> {
    let params = setting.params();
    let mut stored: Vec<StoredRow> = Vec::new();
    let mut expected: Found = BTreeMap::new();
    RULE.check_ticks(ticks, &setting.sets(), |pass| {
        stored.extend(pass.tick.stored(|table, ingested_at, row| StoredRow { table, ingested_at, row }));
        for (id, row) in naive_spraying::evaluate(&stored, pass.t_eval, &params) {
            expected.entry(id).or_insert(row);
        }
        let (file, tree) = pass.by_identity(identity_of, |id| format!("{id:?}"))?;
        for (what, found) in [("findings.jsonl", file), ("results tree", tree)] {
            let found: Found = found.into_iter().map(|(id, f)| (id, row_of(f))).collect();
            if let Some(d) = diff(&format!("after tick {}: {what} vs naive union", pass.k), &expected, &found) {
                return Err(d);
            }
        }
        Ok(())
    })?;
    Ok(expected)
}

// ---------------------------------------------------------------------------------------
// Rows.
// ---------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn logon_row(
    report_id: i64,
    ts: i64,
    device: (&str, &str),
    action: &str,
    account: &str,
    remote_ip: &str,
    remote_device: &str,
    logon_type: &str,
    ip_type: &str,
) -> Map<String, Value> {
    obj(json!({
        "Timestamp": format_timestamp(ts),
        "DeviceId": device.0,
        "DeviceName": device.1,
        "ActionType": action,
        "LogonType": logon_type,
        "AccountDomain": "corp",
        "AccountName": account,
        "AccountSid": "",
        "Protocol": "NTLM",
        "FailureReason": if action.eq_ignore_ascii_case("LogonFailed") { "InvalidUserNameOrPassword" } else { "" },
        "IsLocalAdmin": false,
        "LogonId": 0,
        "RemoteDeviceName": remote_device,
        "RemoteIP": remote_ip,
        "RemoteIPType": ip_type,
        "RemotePort": 50123,
        "InitiatingProcessFileName": "lsass.exe",
        "ReportId": report_id,
    }))
}

/// A spray-shaped failure: network logon from `ip`, Public.
fn failed(report_id: i64, ts: i64, device: (&str, &str), account: &str, ip: &str) -> Map<String, Value> {
    logon_row(report_id, ts, device, "LogonFailed", account, ip, "", "Network", "Public")
}

fn success(report_id: i64, ts: i64, device: (&str, &str), account: &str, ip: &str) -> Map<String, Value> {
    logon_row(report_id, ts, device, "LogonSuccess", account, ip, "", "Network", "Public")
}

fn network_row(
    report_id: i64,
    ts: i64,
    device: (&str, &str),
    action: &str,
    process: &str,
    port: Option<i64>,
) -> Map<String, Value> {
    let mut m = obj(json!({
        "Timestamp": format_timestamp(ts),
        "DeviceId": device.0,
        "DeviceName": device.1,
        "ActionType": action,
        "RemoteIP": "10.1.1.50",
        "RemotePort": 50000,
        "LocalIP": "10.1.1.10",
        "Protocol": "Tcp",
        "InitiatingProcessFileName": process,
        "ReportId": report_id,
    }));
    if let Some(p) = port {
        m.insert("LocalPort".into(), p.into());
    }
    m
}

fn identity_row(report_id: i64, ts: i64, ip: &str, device_name: &str, action: &str, upn: &str) -> Map<String, Value> {
    obj(json!({
        "Timestamp": format_timestamp(ts),
        "ActionType": action,
        "Application": "Active Directory",
        "LogonType": "Resource access",
        "Protocol": "Kerberos",
        "AccountUpn": upn,
        "AccountName": upn.split('@').next().unwrap_or(""),
        "DeviceName": device_name,
        "IPAddress": ip,
        "Port": 49152,
        "ReportId": format!("idr-{report_id}"),
    }))
}

// ---------------------------------------------------------------------------------------
// The property.
// ---------------------------------------------------------------------------------------

/// (DeviceId, DeviceName): the second shares the first's name in another case.
const DEVICES: [(&str, &str); 3] =
    [("d-alpha", "srv-01.corp.local"), ("d-beta", "SRV-01.corp.local"), ("d-gamma", "ws-02.corp.local")];
/// Source IPs: the empty one with an empty RemoteDeviceName is dropped by the rule.
const IPS: [&str; 4] = ["10.0.0.5", "10.0.0.6", "", "-"];
const REMOTE_DEVICES: [&str; 2] = ["", "attacker-pc"];
/// `Admin` and `admin` are two accounts.
const ACCOUNTS: [&str; 7] = ["Admin", "admin", "bob", "carol", "dave", "erin", "frank"];
const ACTIONS: [&str; 6] = ["LogonFailed", "logonfailed", "LogonSuccess", "LOGONSUCCESS", "LogonAttempted", ""];
const LOGON_TYPES: [&str; 5] = ["Network", "Unlock", "unlock", "RemoteInteractive", ""];
const IP_TYPES: [&str; 5] = ["Public", "Private", "Loopback", "loopback", ""];
/// DC candidates by name: exact, another case, and a name no logon uses.
const DC_NAMES: [&str; 4] = ["srv-01.corp.local", "SRV-01.CORP.LOCAL", "ws-02.corp.local", "dc-01.corp.local"];
const NET_ACTIONS: [&str; 3] = ["InboundConnectionAccepted", "inboundconnectionaccepted", "ConnectionSuccess"];
const NET_PROCESSES: [&str; 3] = ["lsass.exe", "LSASS.EXE", "svchost.exe"];
const NET_PORTS: [Option<i64>; 3] = [Some(88), Some(89), None];
const UPNS: [&str; 5] = ["a@corp.com", "A@corp.com", "b@corp.com", "c@corp.com", "d@corp.com"];
const ID_ACTIONS: [&str; 4] = ["LogonFailed", "LOGONFAILED", "LogonSuccess", "OtherAction"];

#[derive(Debug, Clone)]
enum Spec {
    Logon {
        dev: usize,
        ip: usize,
        rdev: usize,
        account: usize,
        action: usize,
        logon_type: usize,
        ip_type: usize,
        minutes_ago: i64,
    },
    Network {
        name: usize,
        action: usize,
        process: usize,
        port: usize,
    },
    Identity {
        ip: usize,
        name: usize,
        action: usize,
        upn: usize,
        minutes_ago: i64,
    },
}

#[derive(Debug, Clone)]
enum Step {
    Small { minutes: i64 },
    Big { minutes: i64 },
    Boundary,
}

/// At most 6 cuts, then 3 empty ticks.
const TICKS_MAX: usize = 10;

#[derive(Debug, Clone)]
struct Scenario {
    setting: (usize, i64, i64, i64),
    rows: Vec<Spec>,
    cuts: Vec<u8>,
    /// One step per tick (the first is ignored), then empty ticks: passes the clock alone moves.
    steps: Vec<Step>,
    empty_ticks: usize,
    restarts: Vec<Restart>,
    chunks: Vec<Option<usize>>,
}

fn weighted(weights: &'static [u32]) -> impl Strategy<Value = usize> {
    let total: u32 = weights.iter().sum();
    (0..total).prop_map(move |mut x| {
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    })
}

fn spec_logon() -> impl Strategy<Value = Spec> {
    (
        weighted(&[6, 2, 2]),
        weighted(&[8, 2, 2, 1]),
        weighted(&[4, 1]),
        0..ACCOUNTS.len(),
        weighted(&[8, 3, 4, 1, 1, 1]),
        weighted(&[10, 1, 1, 1, 1]),
        weighted(&[10, 2, 1, 1, 2]),
        0..240i64,
    )
        .prop_map(|(dev, ip, rdev, account, action, logon_type, ip_type, minutes_ago)| Spec::Logon {
            dev,
            ip,
            rdev,
            account,
            action,
            logon_type,
            ip_type,
            minutes_ago,
        })
}

fn spec_network() -> impl Strategy<Value = Spec> {
    (0..DC_NAMES.len(), weighted(&[4, 1, 1]), weighted(&[4, 1, 1]), weighted(&[4, 1, 1]))
        .prop_map(|(name, action, process, port)| Spec::Network { name, action, process, port })
}

fn spec_identity() -> impl Strategy<Value = Spec> {
    (0..2usize, weighted(&[3, 1]), weighted(&[4, 1, 2, 1]), 0..UPNS.len(), 0..240i64)
        .prop_map(|(ip, name, action, upn, minutes_ago)| Spec::Identity { ip, name, action, upn, minutes_ago })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let rows = (
        prop::collection::vec(spec_logon(), 10..=40),
        prop::collection::vec(spec_network(), 0..=3),
        prop::collection::vec(spec_identity(), 0..=8),
    )
        .prop_flat_map(|(logons, network, identity)| {
            let mut all = logons;
            all.extend(network);
            all.extend(identity);
            Just(all).prop_shuffle()
        });
    let step = prop_oneof![
        6 => (1..=90i64).prop_map(|minutes| Step::Small { minutes }),
        2 => (1..=90i64).prop_map(|minutes| Step::Big { minutes }),
        2 => Just(Step::Boundary),
    ];
    let restart = prop_oneof![5 => Just(Restart::No), 3 => Just(Restart::Before), 2 => Just(Restart::BeforePass)];
    let chunk = prop_oneof![4 => Just(None), 1 => (1..=5usize).prop_map(Some)];
    // Small thresholds, so that groups qualify often; two windows: 2 days and 3 hours
    // (with which small steps already age rows out).
    let setting = (0..2usize, 0..=2i64, 1..=3i64, 0..=2i64);
    (
        setting,
        rows,
        // Cuts from a small set as often as not: equal cuts are empty ticks in the middle,
        // passes only the clock moves.
        prop::collection::vec(prop_oneof![any::<u8>(), prop::sample::select(vec![64u8, 128, 192])], 0..=6),
        prop::collection::vec(step, TICKS_MAX),
        0..=3usize,
        prop::collection::vec(restart, TICKS_MAX),
        prop::collection::vec(chunk, TICKS_MAX),
    )
        .prop_map(|(setting, rows, cuts, steps, empty_ticks, restarts, chunks)| Scenario {
            setting,
            rows,
            cuts,
            steps,
            empty_ticks,
            restarts,
            chunks,
        })
}

impl Scenario {
    fn setting(&self) -> Setting {
        let (tf, unique, per_account, ratio) = self.setting;
        Setting { timeframe: ["2d", "3h"][tf], unique, per_account, ratio }
    }

    fn ticks(&self) -> Vec<Tick> {
        let tf = self.setting().timeframe_ticks();
        let rows: Vec<(&'static str, Map<String, Value>)> = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let report_id = 1000 + i as i64;
                match *spec {
                    Spec::Logon { dev, ip, rdev, account, action, logon_type, ip_type, minutes_ago } => (
                        LOGONS,
                        logon_row(
                            report_id,
                            // Minutes apart: Timestamps collide, so arg_max ties happen.
                            t0() - (minutes_ago / 4) * 4 * MINUTE,
                            DEVICES[dev],
                            ACTIONS[action],
                            ACCOUNTS[account],
                            IPS[ip],
                            REMOTE_DEVICES[rdev],
                            LOGON_TYPES[logon_type],
                            IP_TYPES[ip_type],
                        ),
                    ),
                    Spec::Network { name, action, process, port } => (
                        NETWORK,
                        network_row(
                            report_id,
                            t0() - HOUR,
                            ("d-dc", DC_NAMES[name]),
                            NET_ACTIONS[action],
                            NET_PROCESSES[process],
                            NET_PORTS[port],
                        ),
                    ),
                    Spec::Identity { ip, name, action, upn, minutes_ago } => (
                        IDENTITY,
                        identity_row(
                            report_id,
                            t0() - (minutes_ago / 4) * 4 * MINUTE,
                            IPS[ip],
                            DC_NAMES[name * 2],
                            ID_ACTIONS[action],
                            UPNS[upn],
                        ),
                    ),
                }
            })
            .collect();
        split_ticks(&rows, &self.cuts, self.empty_ticks, &self.restarts, &self.chunks, |k, _| match self.steps[k] {
            Step::Small { minutes } => minutes * MINUTE,
            Step::Big { minutes } => tf + HOUR + minutes * MINUTE,
            // The previous tick's rows sit exactly on the window's edge.
            Step::Boundary => tf - EVAL_DELAY,
        })
    }
}

proptest! {
    // ~3 s a case in a debug build (up to 10 passes each); PROPTEST_CASES=500 soaks it.
    #![proptest_config(proptest_config(8))]

    /// For any fleet, split into ticks, arrival order, chunking and restarts, and passes
    /// the clock alone moves, the findings are exactly R(t1) ∪ R(t2) ∪ … by identity.
    #[test]
    fn incremental_equals_union_of_batch_results(s in scenario()) {
        check_ticks(&s.ticks(), &s.setting()).map_err(TestCaseError::fail)?;
    }
}

// ---------------------------------------------------------------------------------------
// By hand: each also pins the naive evaluator to the expected findings.
// ---------------------------------------------------------------------------------------

const SRV: (&str, &str) = ("d-alpha", "srv-01.corp.local");
const ATTACKER: &str = "10.0.0.5";

fn run(ticks: &[Tick], setting: &Setting) -> Found {
    check_ticks(ticks, setting).unwrap_or_else(|e| panic!("{e}"))
}

fn small() -> Setting {
    Setting { timeframe: "2d", unique: 2, per_account: 3, ratio: 1 }
}

fn ids(found: &Found) -> BTreeSet<(String, String, String, String)> {
    found.keys().cloned().collect()
}

fn id(ip: &str, device: (&str, &str), first_failed: i64) -> Identity {
    (ip.to_string(), device.1.to_string(), device.0.to_string(), format_timestamp(first_failed))
}

/// The clock alone: three successes keep the group below `Success*1 < Failed` until
/// they leave the window; a pass with no new rows, after the wake-up the detector asked
/// for, emits the finding.
#[test]
fn successes_ageing_out_fire_on_a_pass_with_no_rows() {
    let ts = t0() - HOUR;
    let ticks = vec![
        Tick::at(t0(), (0..3).map(|i| (LOGONS, success(i, ts, SRV, "bob", ATTACKER))).collect()),
        Tick::at(
            t0() + HOUR,
            ["u1", "u2", "u3"]
                .iter()
                .enumerate()
                .map(|(i, a)| (LOGONS, failed(10 + i as i64, ts, SRV, a, ATTACKER)))
                .collect(),
        ),
        // Still inside the window of the successes (exactly on its edge at this pass).
        Tick::at(t0() + 2 * DAY - EVAL_DELAY, vec![]),
        // A minute later they are out: nothing new arrives, the clock fires it.
        Tick::at(t0() + 2 * DAY + MINUTE, vec![]),
    ];
    assert_eq!(run(&ticks[..3], &small()), BTreeMap::new());
    let found = run(&ticks, &small());
    assert_eq!(ids(&found), BTreeSet::from([id(ATTACKER, SRV, ts)]));
    let row = &found[&id(ATTACKER, SRV, ts)];
    assert_eq!(row["SuccessLogonCount"], json!(0));
    assert_eq!(row["FailedLogonCount"], json!(3));
    assert_eq!(row["ReportId"], json!("12"), "arg_max tie on Timestamp: the larger ReportId");
}

/// FirstFailed moves when the first failures leave the window: a new finding.
#[test]
fn first_failed_moving_is_a_new_finding() {
    let (early, late) = (t0() - 3 * HOUR, t0() + 2 * HOUR);
    let ticks = vec![
        Tick::at(
            t0(),
            vec![(LOGONS, failed(1, early, SRV, "a", ATTACKER)), (LOGONS, failed(2, early, SRV, "b", ATTACKER))],
        ),
        Tick::at(
            t0() + 3 * HOUR,
            vec![
                (LOGONS, failed(3, late, SRV, "c", ATTACKER)),
                (LOGONS, failed(4, late, SRV, "d", ATTACKER)),
                (LOGONS, failed(5, late, SRV, "e", ATTACKER)),
            ],
        ),
        Tick::at(t0() + 2 * DAY + HOUR, vec![]),
    ];
    let found = run(&ticks, &small());
    assert_eq!(ids(&found), BTreeSet::from([id(ATTACKER, SRV, early), id(ATTACKER, SRV, late)]));
}

/// Rows of one group and ingestion time handed over in several calls are kept as several
/// parts of their pane, and all of them leave the window together: a spray after the
/// window counts only its own failures, so its first failure is a new finding.
#[test]
fn a_pane_written_in_parts_leaves_the_window_whole() {
    let (early, late) = (t0() - HOUR, t0() + 2 * DAY + HOUR);
    let spray = |first: i64, ts: i64, accounts: [&str; 3]| -> Vec<(&'static str, Map<String, Value>)> {
        accounts.iter().enumerate().map(|(i, a)| (LOGONS, failed(first + i as i64, ts, SRV, a, ATTACKER))).collect()
    };
    let mut first = Tick::at(t0(), spray(1, early, ["a", "b", "c"]));
    first.chunk_rows = Some(1);
    let ticks = vec![first, Tick::at(t0() + 2 * DAY + 2 * HOUR, spray(10, late, ["d", "e", "f"]))];
    let found = run(&ticks, &small());
    assert_eq!(ids(&found), BTreeSet::from([id(ATTACKER, SRV, early), id(ATTACKER, SRV, late)]));
}

/// A DC by its network rows, whatever their arrival: before the spray (suppressed, and
/// the DeviceName matches in another case), after it (the finding stays, later passes
/// add nothing).
#[test]
fn domain_controllers_are_left_out() {
    let dc_upper = ("d-beta", "SRV-01.CORP.LOCAL");
    let spray = |first: i64, device: (&'static str, &'static str)| -> Vec<(&'static str, Map<String, Value>)> {
        ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, a)| (LOGONS, failed(first + i as i64, t0(), device, a, ATTACKER)))
            .collect()
    };
    let mut first = vec![(
        NETWORK,
        network_row(1, t0(), ("d-dc", "srv-01.corp.local"), "InboundConnectionAccepted", "LSASS.exe", Some(88)),
    )];
    first.extend(spray(10, dc_upper));
    // A near miss of a DC: wrong ActionType case, port, process.
    first.push((
        NETWORK,
        network_row(2, t0(), ("d-dc", "ws-02.corp.local"), "inboundconnectionaccepted", "lsass.exe", Some(88)),
    ));
    first.push((
        NETWORK,
        network_row(3, t0(), ("d-dc", "ws-02.corp.local"), "InboundConnectionAccepted", "lsass.exe", Some(89)),
    ));
    first.push((
        NETWORK,
        network_row(4, t0(), ("d-dc", "ws-02.corp.local"), "InboundConnectionAccepted", "svchost.exe", Some(88)),
    ));
    let ws = ("d-gamma", "ws-02.corp.local");
    first.extend(spray(20, ws));
    let mut ticks = vec![Tick::at(t0(), first)];
    // ws-02 becomes a DC after its finding; a later failure changes nothing more.
    ticks.push(Tick::at(
        t0() + HOUR,
        vec![
            (
                NETWORK,
                network_row(5, t0(), ("d-dc", "WS-02.corp.local"), "InboundConnectionAccepted", "lsass.exe", Some(88)),
            ),
            (LOGONS, failed(30, t0() + HOUR, ws, "d", ATTACKER)),
        ],
    ));
    let found = run(&ticks, &small());
    assert_eq!(ids(&found), BTreeSet::from([id(ATTACKER, ws, t0())]));
    assert_eq!(found[&id(ATTACKER, ws, t0())]["FailedLogonCount"], json!(3));
}

/// Every filter's near miss, and the thresholds exactly at their edges.
#[test]
fn filters_and_threshold_edges() {
    let mut rows = Vec::new();
    let mut n = 100;
    let mut next = || {
        n += 1;
        n
    };
    // Group A (10.0.0.5): 3 accounts, Admin and admin distinct; "unlock" (not "Unlock"),
    // "loopback" (not "Loopback") and "" pass; Unlock, Loopback, LogonAttempted, and a row
    // with empty RemoteIP and RemoteDeviceName do not count.
    rows.push(logon_row(next(), t0(), SRV, "LogonFailed", "Admin", ATTACKER, "", "unlock", "Public"));
    rows.push(logon_row(next(), t0(), SRV, "logonFAILED", "admin", ATTACKER, "", "Network", "loopback"));
    rows.push(logon_row(next(), t0(), SRV, "LogonFailed", "carol", ATTACKER, "", "", ""));
    rows.push(logon_row(next(), t0(), SRV, "LogonSuccess", "x1", ATTACKER, "", "Unlock", "Public"));
    rows.push(logon_row(next(), t0(), SRV, "LogonSuccess", "x2", ATTACKER, "", "Network", "Loopback"));
    rows.push(logon_row(next(), t0(), SRV, "LogonAttempted", "x3", ATTACKER, "", "Network", "Public"));
    rows.push(logon_row(next(), t0(), SRV, "LogonFailed", "x4", "", "", "Network", "Public"));
    // Group B (empty RemoteIP, a RemoteDeviceName): passes the isempty check; 3
    // accounts, 9 failures: Unique*3 > Failed fails exactly.
    for a in ["p", "q", "r"] {
        for _ in 0..3 {
            rows.push(logon_row(next(), t0(), SRV, "LogonFailed", a, "", "attacker-pc", "Network", "Public"));
        }
    }
    // Group C (10.0.0.6): 3 accounts, 3 failures, 3 successes: Success*1 < Failed fails.
    for a in ["p", "q", "r"] {
        rows.push(failed(next(), t0(), SRV, a, "10.0.0.6"));
        rows.push(success(next(), t0(), SRV, a, "10.0.0.6"));
    }
    // Group D (10.0.0.7): 2 accounts: Unique > 2 fails.
    for a in ["p", "q", "q"] {
        rows.push(failed(next(), t0(), SRV, a, "10.0.0.7"));
    }
    let ticks = vec![Tick::at(t0(), rows.into_iter().map(|r| (LOGONS, r)).collect())];
    let found = run(&ticks, &small());
    assert_eq!(ids(&found), BTreeSet::from([id(ATTACKER, SRV, t0())]));
    assert_eq!(found[&id(ATTACKER, SRV, t0())]["SuccessLogonCount"], json!(0));
    assert_eq!(found[&id(ATTACKER, SRV, t0())]["UniqueAccountFailedLogons"], json!(3));
}

/// The IdentityLogonEvents branch: grouped by IPAddress and DeviceName, AccountUpn as
/// stored, DeviceId "" in the row and the identity.
#[test]
fn identity_logons_branch() {
    let dc = "dc-01.corp.local";
    let rows = vec![
        (IDENTITY, identity_row(1, t0(), ATTACKER, dc, "LogonFailed", "a@corp.com")),
        (IDENTITY, identity_row(2, t0(), ATTACKER, dc, "logonfailed", "A@corp.com")),
        (IDENTITY, identity_row(3, t0() + MINUTE, ATTACKER, dc, "LogonFailed", "b@corp.com")),
        (IDENTITY, identity_row(4, t0() + 2 * MINUTE, ATTACKER, dc, "Other", "z@corp.com")),
    ];
    let found = run(&[Tick::at(t0(), rows)], &small());
    let key = (ATTACKER.to_string(), dc.to_string(), String::new(), format_timestamp(t0()));
    assert_eq!(ids(&found), BTreeSet::from([key.clone()]));
    assert_eq!(found[&key]["ReportId"], json!("idr-4"));
    assert_eq!(found[&key]["FailedAccounts"], json!(["A@corp.com", "a@corp.com", "b@corp.com"]));
}

// ---------------------------------------------------------------------------------------
// Golden: the real kqlbench DeviceLogonEvents (1151 rows) and DeviceNetworkEvents.
// ---------------------------------------------------------------------------------------

/// Ingests `files` (name → JSON array text) at `at`, runs one pass at `at` with `setting`,
/// and returns the findings' rows.
fn run_files(files: &[(&str, String)], at: i64, setting: &Setting) -> Vec<Map<String, Value>> {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, text) in files {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    let once = RULE.detect_once(&[(at, paths)], at, &setting.sets());
    once.tree.iter().map(|f| f["row"].as_object().unwrap().clone()).collect()
}

fn kqlbench(table: &str) -> String {
    std::fs::read_to_string(kqlbench_dir().join(format!("{table}.json"))).unwrap()
}

/// The kqlbench rows with every `LogonAttempted` relabelled `LogonFailed`: the 256
/// attempts on windows-vm (227 accounts, RemoteIP "-") become a real-shaped spray.
fn relabelled() -> String {
    let mut rows: Vec<Value> = serde_json::from_str(&kqlbench(LOGONS)).unwrap();
    for r in &mut rows {
        if r["ActionType"] == "LogonAttempted" {
            r["ActionType"] = json!("LogonFailed");
        }
    }
    serde_json::to_string(&rows).unwrap()
}

fn golden_at() -> i64 {
    parse_timestamp("2025-05-08T00:00:00Z").unwrap()
}

/// Computed independently with python3 (json + collections) over
/// tests/data/kqlbench/DeviceLogonEvents.json, applying the rule's filters as written
/// (LogonType != "Unlock", ActionType in~ (LogonSuccess, LogonFailed), not both
/// RemoteIP and RemoteDeviceName empty, RemoteIPType != "Loopback") and grouping by
/// (RemoteIP, DeviceName, DeviceId):
///
/// ```text
/// as exported — no LogonFailed row at all (256 rows are LogonAttempted, not counted):
///   ('213.55.242.244', 'wirpo-test', 'fb6b63…')                 S 8  F 0 U 0
///   ('213.55.242.244', 'wirpo-test.kwmm….cloudapp.net', 'fb6b63…') S 2  F 0 U 0
///   ('fe80::a273:51c2:2b63:436f', 'windows-vm', '51a5c6…')        S 13 F 0 U 0
/// LogonAttempted relabelled LogonFailed — one more group:
///   ('-', 'windows-vm', '51a5c6755c43d60b18a177bfa334701b37f9171e') S 0 F 256 U 227
///     FirstFailed 2025-05-07T16:17:00.4539769Z, LastFailed 2025-05-07T17:59:08.5635701Z,
///     arg_max → 2025-05-07T17:59:08.5635701Z ReportId 1004120 (no tie)
/// DeviceNetworkEvents: no row with InboundConnectionAccepted + lsass.exe + LocalPort 88.
/// ```
///
/// With F = 0 in every group, `Unique*f > Failed` is `0 > 0` for any f: no thresholds
/// (however low, negative included) make a group qualify on the export as it is.
#[test]
fn golden_kqlbench_as_exported() {
    let files = [("DeviceLogonEvents.json", kqlbench(LOGONS)), ("DeviceNetworkEvents.json", kqlbench(NETWORK))];
    let at = golden_at();
    for setting in [
        Setting::defaults(),
        Setting { timeframe: "2d", unique: 0, per_account: 3, ratio: 0 },
        Setting { timeframe: "2d", unique: -1, per_account: 1_000_000, ratio: -1 },
    ] {
        assert_eq!(run_files(&files, at, &setting), Vec::<Map<String, Value>>::new(), "{setting:?}");
    }
    // The oracle agrees on the group counts python gave.
    let rows: Vec<Map<String, Value>> = serde_json::from_str(&kqlbench(LOGONS)).unwrap();
    assert_eq!(rows.len(), 1151);
    let stored: Vec<StoredRow> =
        rows.into_iter().map(|row| StoredRow { table: LOGONS.into(), ingested_at: at, row }).collect();
    let p = Setting { timeframe: "2d", unique: -1, per_account: 1_000_000, ratio: -1 }.params();
    assert!(naive_spraying::evaluate(&stored, at, &p).is_empty());
}

#[test]
fn golden_kqlbench_relabelled() {
    let at = golden_at();
    let files = [("DeviceLogonEvents.json", relabelled()), ("DeviceNetworkEvents.json", kqlbench(NETWORK))];
    let expected = json!({
        "Timestamp": "2025-05-07T17:59:08.5635701Z",
        "IPAddress": "-",
        "DeviceName": "windows-vm",
        "DeviceId": "51a5c6755c43d60b18a177bfa334701b37f9171e",
        "SuccessLogonCount": 0,
        "FailedLogonCount": 256,
        "UniqueAccountFailedLogons": 227,
        "FirstFailed": "2025-05-07T16:17:00.4539769Z",
        "LastFailed": "2025-05-07T17:59:08.5635701Z",
        "LastTimestamp": "2025-05-07T17:59:08.5635701Z",
        "ReportId": "1004120",
        "IsDC": false,
    });
    let expected = vec![expected.as_object().unwrap().clone()];
    // Defaults; and each threshold exactly at its edge (227 > 226 but not > 227;
    // 227*2 > 256 but 227*1 is not; success_ratio cannot matter with no success).
    let fires = [
        Setting::defaults(),
        Setting { timeframe: "2d", unique: 226, per_account: 3, ratio: 2 },
        Setting { timeframe: "2d", unique: 20, per_account: 2, ratio: 1000 },
    ];
    for setting in fires {
        assert_eq!(run_files(&files, at, &setting), expected, "{setting:?}");
    }
    for setting in [
        Setting { timeframe: "2d", unique: 227, per_account: 3, ratio: 2 },
        Setting { timeframe: "2d", unique: 20, per_account: 1, ratio: 2 },
    ] {
        assert!(run_files(&files, at, &setting).is_empty(), "{setting:?}");
    }
    // windows-vm as a domain controller (a real inbound connection turned into Kerberos
    // accepted by lsass, DeviceName in another case): suppressed.
    let mut net: Vec<Value> = serde_json::from_str(&kqlbench(NETWORK)).unwrap();
    let dc = net.iter_mut().find(|r| r["ActionType"] == "InboundConnectionAccepted").unwrap();
    dc["DeviceName"] = json!("WINDOWS-VM");
    dc["InitiatingProcessFileName"] = json!("lsass.exe");
    dc["LocalPort"] = json!(88);
    let files =
        [("DeviceLogonEvents.json", relabelled()), ("DeviceNetworkEvents.json", serde_json::to_string(&net).unwrap())];
    assert!(run_files(&files, at, &Setting::defaults()).is_empty());

    // The oracle agrees with python too.
    let rows: Vec<Map<String, Value>> = serde_json::from_str(&relabelled()).unwrap();
    let stored: Vec<StoredRow> =
        rows.into_iter().map(|row| StoredRow { table: LOGONS.into(), ingested_at: at, row }).collect();
    let naive: Vec<Map<String, Value>> =
        naive_spraying::evaluate(&stored, at, &Setting::defaults().params()).into_values().collect();
    assert_eq!(naive, expected);
}

// ---------------------------------------------------------------------------------------
// The fleet generator's password sprays and near misses.
// ---------------------------------------------------------------------------------------

#[test]
fn generated_fleet_findings_are_exactly_the_expected_ones() {
    use lookout_core::gen;
    let spec = gen::FleetSpec { devices: 12, events: 2_000, attacks: 4, seed: 7, ..Default::default() };
    let (planted, once) = RULE.detect_generated_fleet(&spec);
    let columns = ["IPAddress", "DeviceName", "DeviceId", "FirstFailed"];
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let found: BTreeSet<Vec<(String, String)>> =
        once.tree.iter().map(|f| columns.iter().map(|c| (c.to_string(), text(&f["row"][*c]))).collect()).collect();
    let expected: BTreeSet<Vec<(String, String)>> = planted.iter().map(|e| e.identity.clone()).collect();
    assert!(expected.len() >= spec.attacks, "the fleet has a spray per attack: {expected:?}");
    assert_eq!(found, expected);
}
