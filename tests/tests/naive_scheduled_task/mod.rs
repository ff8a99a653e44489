//! A naive batch evaluator of FalconFriday 0xFF-0082 "Persistence Via Scheduled Tasks",
//! written from docs/rules/SEMANTICS.md and the KQL, independently of the plugin.
//!
//! It evaluates the whole query once, at one evaluation time, over every row stored so
//! far — no state, no records, no indexes: filters and nested loops over plain JSON rows,
//! one `let` of the KQL after the other. The incremental detector must emit exactly the
//! union of this evaluator's results over the evaluation times of its passes.
//!
//! The KQL (Copyright (c) FalconForce, BSD 3-Clause, docs/rules/LICENSE-FalconFriday):
//!
//! ```kusto
//! let ScheduledBinaries = (
//!     DeviceProcessEvents
//!     | where Timestamp >= ago(lookback)
//!     | where ActionType =~ "ProcessCreated"
//!     | where InitiatingProcessCommandLine startswith "svchost.exe -k netsvcs -p" and InitiatingProcessCommandLine contains "Schedule"
//! );
//! let NewScheduledBinaries=(
//!     ScheduledBinaries
//!     | where Timestamp >= ago(lookback)
//!     | summarize FirstSeen=min(Timestamp),LastSeen=max(Timestamp) by DeviceId, SHA1
//!     | where LastSeen >= ago(timeframe)
//!     | where FirstSeen >= ago(timeframe)
//! );
//! let NewScheduledBinaryExecution=(
//!     ScheduledBinaries
//!     | where ingestion_time() >= ago(timeframe)
//!     | lookup kind=inner NewScheduledBinaries on DeviceId, SHA1
//! );
//! NewScheduledBinaryExecution
//! | summarize MachineCount=dcount(DeviceId) by SHA1
//! | top 1000 by MachineCount asc
//! | extend SHA1=tolower(SHA1)
//! | invoke FileProfile(SHA1,1000)
//! | where not(ProfileAvailability =~ "Error")
//! | where coalesce(GlobalPrevalence,default_global_prevalence) < 100
//! | join NewScheduledBinaryExecution on SHA1
//! | summarize arg_max(Timestamp, *), Devices=make_set(DeviceName), MachineCount=dcount(DeviceName) by SHA1
//! ```

use lookout_plugin_sdk::time::{parse_duration, parse_timestamp};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

pub const PROCESS_EVENTS: &str = "DeviceProcessEvents";
pub const FILE_PROFILE: &str = "FileProfile";

/// The rule's parameters.
#[derive(Debug, Clone)]
pub struct Params {
    pub timeframe: i64,
    pub lookback: i64,
    pub prevalence_threshold: i64,
    pub default_prevalence: i64,
    pub top: usize,
}

impl Default for Params {
    /// The rule's own values.
    fn default() -> Self {
        Params {
            timeframe: parse_duration("2d").expect("2d"),
            lookback: parse_duration("7d").expect("7d"),
            prevalence_threshold: 100,
            default_prevalence: 0,
            top: 1000,
        }
    }
}

/// One stored row as written, with its table and `ingestion_time()`.
#[derive(Debug, Clone)]
pub struct StoredRow {
    pub table: String,
    pub ingested_at: i64,
    pub row: Map<String, Value>,
}

/// A finding identity: (SHA1 as output, i.e. lowercased; DeviceId).
pub type Identity = (String, String);

/// What the result row says for one identity: (Devices, MachineCount, the ReportId of
/// the device's latest joined execution).
pub type Shown = (Vec<String>, i64, i64);

fn s<'a>(row: &'a Map<String, Value>, col: &str) -> &'a str {
    row.get(col).and_then(Value::as_str).unwrap_or("")
}

fn ts(row: &Map<String, Value>) -> Option<i64> {
    parse_timestamp(s(row, "Timestamp"))
}

fn report_id(row: &Map<String, Value>) -> i64 {
    row.get("ReportId").and_then(Value::as_i64).expect("every test row has an integer ReportId")
}

/// `=~`
fn eq_ci(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// `startswith`
fn starts_with_ci(a: &str, b: &str) -> bool {
    a.to_ascii_lowercase().starts_with(&b.to_ascii_lowercase())
}

/// `contains`
fn contains_ci(a: &str, b: &str) -> bool {
    a.to_ascii_lowercase().contains(&b.to_ascii_lowercase())
}

/// `invoke FileProfile(SHA1)`: the newest stored feed row with exactly this SHA1.
fn file_profile<'a>(rows: &'a [StoredRow], sha1: &str) -> Option<&'a Map<String, Value>> {
    rows.iter().rev().find(|r| r.table == FILE_PROFILE && s(&r.row, "SHA1") == sha1).map(|r| &r.row)
}

/// Evaluates the query over `rows` (every row stored so far, in arrival order) at `now`:
/// for each finding identity, what its result row shows.
pub fn evaluate(rows: &[StoredRow], now: i64, p: &Params) -> BTreeMap<Identity, Shown> {
    let ago = |w: i64| now - w;
    // ScheduledBinaries.
    let scheduled: Vec<&StoredRow> = rows
        .iter()
        .filter(|r| r.table == PROCESS_EVENTS)
        .filter(|r| ts(&r.row).is_some_and(|t| t >= ago(p.lookback)))
        .filter(|r| eq_ci(s(&r.row, "ActionType"), "ProcessCreated"))
        .filter(|r| {
            let cmd = s(&r.row, "InitiatingProcessCommandLine");
            starts_with_ci(cmd, "svchost.exe -k netsvcs -p") && contains_ci(cmd, "Schedule")
        })
        .collect();
    // NewScheduledBinaries: (DeviceId, SHA1) → (FirstSeen, LastSeen), filtered.
    let mut groups: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    for r in &scheduled {
        let t = ts(&r.row).expect("filtered on Timestamp");
        let key = (s(&r.row, "DeviceId").to_string(), s(&r.row, "SHA1").to_string());
        let e = groups.entry(key).or_insert((t, t));
        e.0 = e.0.min(t);
        e.1 = e.1.max(t);
    }
    let new_binaries: BTreeSet<(String, String)> = groups
        .into_iter()
        .filter(|(_, (first, last))| *last >= ago(p.timeframe) && *first >= ago(p.timeframe))
        .map(|(k, _)| k)
        .collect();
    // NewScheduledBinaryExecution.
    let executions: Vec<&StoredRow> = scheduled
        .iter()
        .copied()
        .filter(|r| r.ingested_at >= ago(p.timeframe))
        .filter(|r| new_binaries.contains(&(s(&r.row, "DeviceId").to_string(), s(&r.row, "SHA1").to_string())))
        .collect();
    // summarize MachineCount=dcount(DeviceId) by SHA1 | top N by MachineCount asc.
    let mut machines: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &executions {
        machines.entry(s(&r.row, "SHA1").to_string()).or_default().insert(s(&r.row, "DeviceId").to_string());
    }
    let mut ranked: Vec<(usize, String)> = machines.into_iter().map(|(sha1, d)| (d.len(), sha1)).collect();
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.as_bytes().cmp(b.1.as_bytes())));
    ranked.truncate(p.top);
    // extend SHA1=tolower(SHA1) | invoke FileProfile | where … (a set: the join is
    // innerunique, so the left side is one row per SHA1).
    let left: BTreeSet<String> = ranked
        .into_iter()
        .map(|(_, sha1)| sha1.to_lowercase())
        .filter(|sha1| {
            let profile = file_profile(rows, sha1);
            let availability = profile.map_or("", |pr| s(pr, "ProfileAvailability"));
            // coalesce(GlobalPrevalence, default) < threshold: a real prevalence compared as
            // it is (150.5 is not below 100); anything not a number is null.
            let prevalence = profile.and_then(|pr| pr.get("GlobalPrevalence"));
            let below = match prevalence {
                Some(v) if v.is_i64() => v.as_i64().is_some_and(|v| v < p.prevalence_threshold),
                Some(v) if v.is_number() => v.as_f64().is_some_and(|v| v < p.prevalence_threshold as f64),
                _ => p.default_prevalence < p.prevalence_threshold,
            };
            !eq_ci(availability, "Error") && below
        })
        .collect();
    // join NewScheduledBinaryExecution on SHA1 (exact) | summarize … by SHA1.
    let mut out = BTreeMap::new();
    for sha1 in &left {
        let joined: Vec<&StoredRow> = executions.iter().copied().filter(|r| s(&r.row, "SHA1") == sha1).collect();
        let devices: BTreeSet<String> = joined.iter().map(|r| s(&r.row, "DeviceName").to_string()).collect();
        for r in &joined {
            let device = s(&r.row, "DeviceId").to_string();
            // This device's latest joined execution: arg_max(Timestamp), ties → larger ReportId.
            let latest = joined
                .iter()
                .filter(|x| s(&x.row, "DeviceId") == device)
                .max_by_key(|x| (ts(&x.row), report_id(&x.row)))
                .expect("r itself");
            out.insert(
                (sha1.clone(), device),
                (devices.iter().cloned().collect(), devices.len() as i64, report_id(&latest.row)),
            );
        }
    }
    out
}
