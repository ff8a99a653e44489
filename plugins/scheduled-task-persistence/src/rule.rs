//! The rule itself, with exactly the semantics of the KQL (see the crate docs).
//!
//! Every scheduled-task execution that passes the rule's row filters (handed over by the
//! host through `only_where`) is kept as a compact [`Execution`] record until it leaves
//! the `lookback` window. At the end of every pass the whole query is evaluated again
//! from those records at the pass's time ([`window`], then [`hits`]), FileProfile is
//! asked for the lowercased SHA1s of the `top` (one host call), and one finding is
//! emitted per (SHA1, DeviceId) of the joined executions; the host keeps each identity
//! once. The clock alone changes the result only when a record crosses one of its three
//! window edges, so the pass asks to be woken at the earliest of them ([`next_edge`]).

use lookout_plugin_sdk::tables::{FILE_PROFILE, PROCESS_EVENTS};
use lookout_plugin_sdk::time::parse_timestamp;
use lookout_plugin_sdk::{identity_key, Cell, Condition, Context, EvalRequest, FindingOut, InputSpec, Records, Row};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// `where ActionType =~ "ProcessCreated"`.
pub const ACTION_TYPE: &str = "ProcessCreated";
/// `where InitiatingProcessCommandLine startswith "svchost.exe -k netsvcs -p"`.
pub const PARENT_PREFIX: &str = "svchost.exe -k netsvcs -p";
/// `and InitiatingProcessCommandLine contains "Schedule"`.
pub const PARENT_NEEDLE: &str = "Schedule";

/// The columns `invoke FileProfile()` adds (its documented output but the SHA1 it was
/// given), with whether each is a string: a missing profile or column reads `""` for
/// strings and null otherwise.
pub const PROFILE_COLUMNS: &[(&str, bool)] = &[
    ("SHA256", true),
    ("MD5", true),
    ("FileSize", false),
    ("GlobalPrevalence", false),
    ("GlobalFirstSeen", false),
    ("GlobalLastSeen", false),
    ("Signer", true),
    ("Issuer", true),
    ("SignerHash", true),
    ("IsCertificateValid", false),
    ("IsRootSignerMicrosoft", false),
    ("SignatureState", true),
    ("IsExecutable", false),
    ("ThreatName", true),
    ("Publisher", true),
    ("SoftwareName", true),
    ("ProfileAvailability", true),
];

/// State key prefix of the execution records.
const RECORDS_PREFIX: &[u8] = b"x";

#[derive(Debug, Clone, PartialEq)]
pub struct RuleConfig {
    /// Ticks: `timeframe` (new binaries, executions ingested within it).
    pub timeframe: i64,
    /// Ticks: `lookback` (scheduled executions considered at all).
    pub lookback: i64,
    pub prevalence_threshold: i64,
    pub default_prevalence: i64,
    /// `top N by MachineCount asc`.
    pub top: usize,
}

/// One scheduled-task execution (a DeviceProcessEvents row that passed the static
/// filters), as much of it as the query needs before the output row is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    pub device_id: String,
    /// As stored (case kept).
    pub sha1: String,
    /// `Timestamp` in ticks.
    pub timestamp: i64,
    /// `ingestion_time()` in ticks.
    pub ingested: i64,
    pub device_name: String,
    /// `ReportId` (null when missing or not a long).
    pub report_id: Option<i64>,
}

/// The rows-only part of the rule: whether a stored row is a scheduled-task execution
/// (`ActionType =~`, `startswith`, `contains`; all ASCII case-insensitive). The host
/// applies the same conditions ([`static_filter`]); this re-checks fetched rows.
pub fn is_scheduled_execution(row: &Row) -> bool {
    lookout_plugin_sdk::all_match(&static_filter(), row)
}

/// The static row filters of `ScheduledBinaries`, as host conditions.
pub fn static_filter() -> Vec<Condition> {
    vec![
        Condition::EqCi { column: "ActionType".into(), value: ACTION_TYPE.into() },
        Condition::StartsWith { column: "InitiatingProcessCommandLine".into(), prefix: PARENT_PREFIX.into() },
        Condition::Contains { column: "InitiatingProcessCommandLine".into(), needle: PARENT_NEEDLE.into() },
    ]
}

/// The record of a stored row, `None` when its Timestamp is not a datetime (it fails
/// `Timestamp >= ago(lookback)` whatever the time).
pub fn execution_of(row: &Row) -> Option<Execution> {
    let timestamp = parse_timestamp(row.str("Timestamp"))?;
    Some(Execution {
        device_id: row.str("DeviceId").to_string(),
        sha1: row.str("SHA1").to_string(),
        timestamp,
        ingested: row.ingested_at,
        device_name: row.str("DeviceName").to_string(),
        report_id: row.get("ReportId").and_then(Cell::as_i64),
    })
}

/// The first part of the query at `now`: `NewScheduledBinaryExecution` and the left side
/// of the final join (`summarize … | top … | extend SHA1=tolower(SHA1)`), before
/// FileProfile.
#[derive(Debug)]
pub struct Window<'a> {
    /// `NewScheduledBinaryExecution`: (record id, execution).
    pub executions: Vec<(&'a [u8], &'a Execution)>,
    /// `FirstSeen`, `LastSeen` of each new (DeviceId, SHA1) (the `lookup`'s columns).
    pub seen: HashMap<(&'a str, &'a str), (i64, i64)>,
    /// The left side, de-duplicated on the lowercased SHA1 (`join` is `innerunique`):
    /// (lowercased SHA1, the `MachineCount` of its first row in `top` order).
    pub left: Vec<(String, i64)>,
}

/// Evaluates everything up to the FileProfile call over the records at `now`.
pub fn window<'a>(records: impl Iterator<Item = (&'a [u8], &'a Execution)>, now: i64, c: &RuleConfig) -> Window<'a> {
    let lookback_from = now.saturating_sub(c.lookback);
    let timeframe_from = now.saturating_sub(c.timeframe);
    // ScheduledBinaries: `Timestamp >= ago(lookback)` (the static filters were applied
    // before a record was kept).
    let scheduled: Vec<(&[u8], &Execution)> = records.filter(|(_, e)| e.timestamp >= lookback_from).collect();
    // NewScheduledBinaries.
    let mut groups: HashMap<(&str, &str), (i64, i64)> = HashMap::new();
    for (_, e) in &scheduled {
        let g = groups.entry((e.device_id.as_str(), e.sha1.as_str())).or_insert((e.timestamp, e.timestamp));
        g.0 = g.0.min(e.timestamp);
        g.1 = g.1.max(e.timestamp);
    }
    groups.retain(|_, (first, last)| *last >= timeframe_from && *first >= timeframe_from);
    // NewScheduledBinaryExecution: `ingestion_time() >= ago(timeframe)`, `lookup
    // kind=inner` on (DeviceId, SHA1), exact.
    let executions: Vec<(&[u8], &Execution)> = scheduled
        .into_iter()
        .filter(|(_, e)| e.ingested >= timeframe_from && groups.contains_key(&(e.device_id.as_str(), e.sha1.as_str())))
        .collect();
    // `summarize MachineCount=dcount(DeviceId) by SHA1 | top N by MachineCount asc`
    // (ties: SHA1 in ordinal order; UTF-8 byte order is code-point order).
    let mut devices: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (_, e) in &executions {
        devices.entry(e.sha1.as_str()).or_default().insert(e.device_id.as_str());
    }
    let mut counts: Vec<(i64, &str)> = devices.iter().map(|(sha1, d)| (d.len() as i64, *sha1)).collect();
    counts.sort();
    counts.truncate(c.top);
    // `extend SHA1=tolower(SHA1)`; the join keeps the first left row per key.
    let mut left: Vec<(String, i64)> = Vec::new();
    for (count, sha1) in counts {
        let lower = sha1.to_lowercase();
        if !left.iter().any(|(l, _)| *l == lower) {
            left.push((lower, count));
        }
    }
    Window { executions, seen: groups, left }
}

/// `where not(ProfileAvailability =~ "Error") | where coalesce(GlobalPrevalence,
/// default) < threshold` on one SHA1's FileProfile row (none: availability `""`,
/// prevalence null).
pub fn profile_passes(profile: Option<&Row>, c: &RuleConfig) -> bool {
    let availability = profile.map_or("", |p| p.str("ProfileAvailability"));
    if availability.eq_ignore_ascii_case("Error") {
        return false;
    }
    match profile.and_then(|p| p.get("GlobalPrevalence")) {
        Some(Cell::Int(v)) => *v < c.prevalence_threshold,
        Some(Cell::Float(v)) => *v < c.prevalence_threshold as f64,
        _ => c.default_prevalence < c.prevalence_threshold,
    }
}

/// One finding: a device among the joined executions of a SHA1 that passed FileProfile.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit<'a> {
    /// The lowercased SHA1 (the `by` column).
    pub sha1: String,
    /// The left side's `MachineCount` (dcount of DeviceId before `top`).
    pub left_machine_count: i64,
    /// This device's latest joined execution (ties: the larger ReportId, then the larger
    /// record id).
    pub latest: (&'a [u8], &'a Execution),
    /// `FirstSeen`, `LastSeen` of (DeviceId, SHA1) from the `lookup`.
    pub first_seen: i64,
    pub last_seen: i64,
    /// The latest ingestion time of this device's joined executions: the identity can be
    /// in a result until `last_ingested + timeframe` at most.
    pub last_ingested: i64,
    /// `make_set(DeviceName)` over every device of the SHA1, sorted.
    pub devices: Vec<String>,
    /// `dcount(DeviceName)` over every device of the SHA1.
    pub machine_count: i64,
}

/// The join with `NewScheduledBinaryExecution` on SHA1 (exact: the left side is
/// lowercased, the right is not) and the final summarize, per (SHA1, DeviceId).
/// `passes` says whether a lowercased SHA1 passed FileProfile.
pub fn hits<'a>(w: &Window<'a>, passes: impl Fn(&str) -> bool) -> Vec<Hit<'a>> {
    let mut by_sha1: HashMap<&str, Vec<(&'a [u8], &'a Execution)>> = HashMap::new();
    for &(id, e) in &w.executions {
        by_sha1.entry(e.sha1.as_str()).or_default().push((id, e));
    }
    let mut out = Vec::new();
    for (sha1, left_count) in &w.left {
        let Some(joined) = by_sha1.get(sha1.as_str()) else { continue };
        if !passes(sha1) {
            continue;
        }
        let devices: BTreeSet<&str> = joined.iter().map(|(_, e)| e.device_name.as_str()).collect();
        let mut latest: BTreeMap<&str, ((&'a [u8], &'a Execution), i64)> = BTreeMap::new();
        for &(id, e) in joined {
            let slot = latest.entry(e.device_id.as_str()).or_insert(((id, e), e.ingested));
            slot.1 = slot.1.max(e.ingested);
            if later((id, e), slot.0) {
                slot.0 = (id, e);
            }
        }
        for (_, ((id, e), last_ingested)) in latest {
            let (first_seen, last_seen) =
                w.seen.get(&(e.device_id.as_str(), e.sha1.as_str())).copied().unwrap_or((e.timestamp, e.timestamp));
            out.push(Hit {
                sha1: sha1.clone(),
                left_machine_count: *left_count,
                latest: (id, e),
                first_seen,
                last_seen,
                last_ingested,
                devices: devices.iter().map(|d| d.to_string()).collect(),
                machine_count: devices.len() as i64,
            });
        }
    }
    out
}

/// `arg_max(Timestamp, …)` order: a later Timestamp, then a larger ReportId (null is
/// smallest), then a larger record id (any fixed choice; row keys are unique).
fn later(a: (&[u8], &Execution), b: (&[u8], &Execution)) -> bool {
    (a.1.timestamp, a.1.report_id, a.0) > (b.1.timestamp, b.1.report_id, b.0)
}

/// The earliest time after `now` at which the clock alone changes the result: a record
/// leaving `ago(lookback)` (Timestamp + lookback + 1), its (DeviceId, SHA1) group's
/// FirstSeen/LastSeen leaving `ago(timeframe)` (Timestamp + timeframe + 1), or it
/// leaving `ingestion_time() >= ago(timeframe)` (ingested + timeframe + 1). Every window
/// condition is `x >= now - w`, which only turns false as time passes, so nothing else
/// can change on its own.
pub fn next_edge<'a>(records: impl Iterator<Item = &'a Execution>, now: i64, c: &RuleConfig) -> Option<i64> {
    let mut next: Option<i64> = None;
    for e in records {
        for edge in [
            e.timestamp.saturating_add(c.lookback).saturating_add(1),
            e.timestamp.saturating_add(c.timeframe).saturating_add(1),
            e.ingested.saturating_add(c.timeframe).saturating_add(1),
        ] {
            if edge > now {
                next = Some(next.map_or(edge, |n: i64| n.min(edge)));
            }
        }
    }
    next
}

/// The result row of a hit: the `by` column, `Timestamp`, the rest of the joined row
/// (left: the pre-`top` MachineCount, renamed `MachineCount1` since the explicit
/// aggregate keeps the name; FileProfile's columns; right: the execution's stored
/// columns, clashes suffixed `1`, then the lookup's FirstSeen, LastSeen), then `Devices`
/// and `MachineCount`.
pub fn output_row(hit: &Hit<'_>, profile: Option<&Row>, execution: &Row) -> Vec<(String, Cell)> {
    let mut row: Vec<(String, Cell)> = Vec::new();
    row.push(("SHA1".into(), Cell::Str(hit.sha1.clone())));
    row.push(("Timestamp".into(), execution.get("Timestamp").cloned().unwrap_or(Cell::Null)));
    row.push(("MachineCount1".into(), Cell::Int(hit.left_machine_count)));
    let mut left: BTreeSet<&str> = ["SHA1", "MachineCount"].into_iter().collect();
    for (name, is_string) in PROFILE_COLUMNS {
        left.insert(name);
        let value = profile.and_then(|p| p.get(name)).cloned().unwrap_or(if *is_string {
            Cell::Str(String::new())
        } else {
            Cell::Null
        });
        row.push((name.to_string(), value));
    }
    for (name, value) in &execution.columns {
        if name == "Timestamp" {
            continue;
        }
        let name = if left.contains(name.as_str()) { format!("{name}1") } else { name.clone() };
        row.push((name, value.clone()));
    }
    let time = |t: i64| Cell::Str(lookout_plugin_sdk::time::format_timestamp(t));
    row.push(("FirstSeen".into(), time(hit.first_seen)));
    row.push(("LastSeen".into(), time(hit.last_seen)));
    let devices = serde_json::Value::from(hit.devices.clone()).to_string();
    row.push(("Devices".into(), Cell::Json(devices)));
    row.push(("MachineCount".into(), Cell::Int(hit.machine_count)));
    row
}

pub struct ScheduledTaskRule {
    config: RuleConfig,
    records: Records<Execution>,
    /// Whether rows arrived since the last evaluation (in this process).
    dirty: bool,
    /// (time, wake-up asked) of the last evaluation in this process: until the clock
    /// reaches that wake-up and while no row arrives, the result cannot change.
    evaluated: Option<(i64, Option<i64>)>,
    /// Identities emitted by this process, until they cannot be in a result any more
    /// (the latest ingestion of their executions + timeframe). Only saves re-building
    /// rows the host would drop; empty after a restart.
    emitted: HashMap<Vec<u8>, i64>,
}

impl ScheduledTaskRule {
    pub fn new(config: RuleConfig, state: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, String> {
        let records = Records::load(RECORDS_PREFIX, state)?;
        Ok(ScheduledTaskRule { config, records, dirty: true, evaluated: None, emitted: HashMap::new() })
    }

    /// Scheduled-task executions only (the host checks the static filters); FileProfile
    /// rows as they arrive (a new profile can let a SHA1 through), never on a backfill:
    /// the profiles the query needs are looked up.
    pub fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec { table: PROCESS_EVENTS.into(), only_where: static_filter(), on_backfill: true },
            InputSpec { table: FILE_PROFILE.into(), only_where: Vec::new(), on_backfill: false },
        ]
    }

    pub fn evaluate(&mut self, batch: &EvalRequest, ctx: &mut Context<'_>) -> Result<(), String> {
        let now = ctx.now();
        let c = self.config.clone();
        if !batch.rows.is_empty() {
            self.dirty = true;
        }
        let keys: Vec<Vec<u8>> = batch
            .rows
            .iter()
            .filter(|r| r.table == PROCESS_EVENTS && !self.records.contains(&r.key))
            .map(|r| r.key.clone())
            .collect();
        if !keys.is_empty() {
            for row in ctx.rows(keys)? {
                if !is_scheduled_execution(&row) {
                    continue;
                }
                let Some(e) = execution_of(&row) else { continue };
                let expires = e.timestamp.saturating_add(c.lookback);
                // Already out of every window: nothing to keep.
                if expires < now {
                    continue;
                }
                self.records.insert(ctx, row.key.clone(), expires, e)?;
            }
        }
        if !batch.last {
            return Ok(());
        }
        self.records.expire(ctx, now);
        self.emitted.retain(|_, until| *until >= now);

        // Nothing arrived and no edge passed since the last evaluation: same result.
        if let Some((at, wake)) = self.evaluated {
            if !self.dirty && now >= at && wake.is_none_or(|w| now < w) {
                if let Some(w) = wake {
                    ctx.wake_at(w);
                }
                return Ok(());
            }
        }

        let wake = next_edge(self.records.iter().map(|(_, e)| e), now, &c);
        let w = window(self.records.iter(), now, &c);
        // FileProfile of the left SHA1s that some execution can join (the others cannot
        // produce a row whatever their profile), in one host call.
        let joinable: BTreeSet<&str> = w.executions.iter().map(|(_, e)| e.sha1.as_str()).collect();
        let lowers: Vec<String> =
            w.left.iter().filter(|(l, _)| joinable.contains(l.as_str())).map(|(l, _)| l.clone()).collect();
        let profiles: HashMap<String, Option<Row>> = if lowers.is_empty() {
            HashMap::new()
        } else {
            let found = ctx.profiles(lowers.clone())?;
            lowers.into_iter().zip(found).collect()
        };
        let found = hits(&w, |sha1| profile_passes(profiles.get(sha1).and_then(Option::as_ref), &c));

        let fresh: Vec<(Vec<u8>, &Hit<'_>)> = found
            .iter()
            .map(|h| (identity_key(&[&h.sha1, &h.latest.1.device_id]), h))
            .filter(|(id, _)| !self.emitted.contains_key(id))
            .collect();
        if !fresh.is_empty() {
            let rows: HashMap<Vec<u8>, Row> = ctx
                .rows(fresh.iter().map(|(_, h)| h.latest.0.to_vec()).collect())?
                .into_iter()
                .map(|r| (r.key.clone(), r))
                .collect();
            for (id, hit) in fresh {
                // A row pruned by retention since it was recorded: no output row to show.
                let Some(execution) = rows.get(hit.latest.0) else { continue };
                let profile = profiles.get(&hit.sha1).and_then(Option::as_ref);
                let until = hit.last_ingested.saturating_add(c.timeframe);
                ctx.emit(FindingOut {
                    inputs: vec![id.clone()],
                    device_id: hit.latest.1.device_id.clone(),
                    device_name: hit.latest.1.device_name.clone(),
                    row: output_row(hit, profile, execution),
                });
                self.emitted.insert(id, until);
            }
        }
        if let Some(at) = wake {
            ctx.wake_at(at);
        }
        self.dirty = false;
        self.evaluated = Some((now, wake));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400 * lookout_plugin_sdk::time::TICKS_PER_SEC;

    fn cfg(top: usize) -> RuleConfig {
        RuleConfig { timeframe: 2 * DAY, lookback: 7 * DAY, prevalence_threshold: 100, default_prevalence: 0, top }
    }

    fn ex(dev: &str, sha1: &str, ts: i64, ingested: i64, report: i64) -> Execution {
        Execution {
            device_id: dev.into(),
            sha1: sha1.into(),
            timestamp: ts,
            ingested,
            device_name: format!("{dev}.corp"),
            report_id: Some(report),
        }
    }

    fn run(records: &[(Vec<u8>, Execution)], now: i64, c: &RuleConfig) -> Vec<(String, String, i64)> {
        let w = window(records.iter().map(|(k, e)| (k.as_slice(), e)), now, c);
        let mut out: Vec<(String, String, i64)> =
            hits(&w, |_| true).into_iter().map(|h| (h.sha1, h.latest.1.device_id.clone(), h.machine_count)).collect();
        out.sort();
        out
    }

    #[test]
    fn a_binary_seen_before_the_timeframe_is_not_new() {
        let now = 100 * DAY;
        let records = vec![
            (b"1".to_vec(), ex("d1", "aa", now - 3 * DAY, now - 3 * DAY, 1)),
            (b"2".to_vec(), ex("d1", "aa", now - DAY, now - DAY, 2)),
            (b"3".to_vec(), ex("d2", "aa", now - DAY, now - DAY, 3)),
        ];
        assert_eq!(run(&records, now, &cfg(10)), vec![("aa".into(), "d2".into(), 1)]);
        // Once the old execution has left the lookback, the others have left the
        // timeframe: nothing is new.
        let later = now - 3 * DAY + 7 * DAY + 1;
        let records: Vec<_> = records
            .into_iter()
            .map(|(k, mut e)| {
                e.ingested = later - DAY;
                (k, e)
            })
            .collect();
        assert_eq!(run(&records, later, &cfg(10)), vec![]);
    }

    #[test]
    fn windows_are_inclusive_and_edges_are_the_next_tick() {
        let now = 100 * DAY;
        let c = cfg(10);
        let records = vec![(b"1".to_vec(), ex("d1", "aa", now - 2 * DAY, now - 2 * DAY, 1))];
        assert_eq!(run(&records, now, &c).len(), 1, "exactly timeframe ago is in");
        assert_eq!(run(&records, now + 1, &c).len(), 0);
        assert_eq!(next_edge(records.iter().map(|(_, e)| e), now, &c), Some(now + 1));
        assert_eq!(next_edge(records.iter().map(|(_, e)| e), now + 1, &c), Some(now - 2 * DAY + 7 * DAY + 1));
    }

    #[test]
    fn top_keeps_the_least_common_and_upper_case_never_joins() {
        let now = 100 * DAY;
        let t = now - DAY;
        let records = vec![
            (b"1".to_vec(), ex("d1", "bb", t, t, 1)),
            (b"2".to_vec(), ex("d2", "bb", t, t, 2)),
            (b"3".to_vec(), ex("d1", "cc", t, t, 3)),
            (b"4".to_vec(), ex("d1", "AA", t, t, 4)),
        ];
        // top 1: "AA" (1 device; "AA" < "cc"), lowercased to "aa": no execution has it.
        assert_eq!(run(&records, now, &cfg(1)), vec![]);
        assert_eq!(run(&records, now, &cfg(2)), vec![("cc".into(), "d1".into(), 1)]);
        assert_eq!(run(&records, now, &cfg(3)).len(), 3);
        // An upper-case group's slot lets the lower-case executions of the same file join.
        let records = vec![
            (b"1".to_vec(), ex("d1", "AA", t, t, 1)),
            (b"2".to_vec(), ex("d2", "aa", t, t, 2)),
            (b"3".to_vec(), ex("d3", "aa", t, t, 3)),
        ];
        assert_eq!(run(&records, now, &cfg(1)), vec![("aa".into(), "d2".into(), 2), ("aa".into(), "d3".into(), 2)]);
    }

    #[test]
    fn latest_execution_ties_go_to_the_larger_report_id() {
        let now = 100 * DAY;
        let t = now - DAY;
        let records = [(b"1".to_vec(), ex("d1", "aa", t, t, 9)), (b"2".to_vec(), ex("d1", "aa", t, t, 10))];
        let w = window(records.iter().map(|(k, e)| (k.as_slice(), e)), now, &cfg(5));
        let h = hits(&w, |_| true);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].latest.1.report_id, Some(10));
    }

    #[test]
    fn profiles_follow_coalesce_and_availability() {
        let c = cfg(5);
        let profile = |cols: Vec<(&str, Cell)>| Row {
            table: FILE_PROFILE.into(),
            key: vec![],
            ingested_at: 0,
            columns: cols.into_iter().map(|(n, v)| (n.to_string(), v)).collect(),
        };
        assert!(profile_passes(None, &c));
        assert!(profile_passes(Some(&profile(vec![("GlobalPrevalence", Cell::Int(99))])), &c));
        assert!(!profile_passes(Some(&profile(vec![("GlobalPrevalence", Cell::Int(100))])), &c));
        assert!(profile_passes(Some(&profile(vec![("GlobalPrevalence", Cell::Null)])), &c));
        let error = profile(vec![("ProfileAvailability", Cell::Str("eRRor".into()))]);
        assert!(!profile_passes(Some(&error), &c));
        let c = RuleConfig { default_prevalence: 100, ..c };
        assert!(!profile_passes(Some(&profile(vec![("GlobalPrevalence", Cell::Null)])), &c));
    }

    #[test]
    fn static_filters_are_case_insensitive() {
        let row = |action: &str, cmd: &str| Row {
            table: PROCESS_EVENTS.into(),
            key: vec![],
            ingested_at: 0,
            columns: vec![
                ("ActionType".into(), Cell::Str(action.into())),
                ("InitiatingProcessCommandLine".into(), Cell::Str(cmd.into())),
            ],
        };
        assert!(is_scheduled_execution(&row("processcreated", "SVCHOST.EXE -k netsvcs -p -s schedule")));
        assert!(!is_scheduled_execution(&row("ProcessCreatedUsingWmiQuery", "svchost.exe -k netsvcs -p -s Schedule")));
        assert!(!is_scheduled_execution(&row("ProcessCreated", "svchost.exe -k netsvcs -s Schedule")));
        assert!(!is_scheduled_execution(&row("ProcessCreated", "svchost.exe -k netsvcs -p -s BITS")));
        assert!(!is_scheduled_execution(&row("ProcessCreated", "\"svchost.exe\" -k netsvcs -p -s Schedule")));
    }
}
