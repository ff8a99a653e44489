//! A naive batch evaluator of FalconFriday 0xFF-0582 "WinRM Plugin Lateral Movement",
//! written straight from DESIGN.md's semantics table and independently of the plugin.
//!
//! It evaluates the whole KQL query once, at one evaluation time, over every row stored
//! so far — no indexes, no candidate sets, no state: nested loops over plain JSON rows.
//! The incremental engine must emit exactly the union of this evaluator's results over
//! the evaluation times of its passes ("R(t1) ∪ R(t2) ∪ …").
//!
//! ```kusto
//! let PotentialPlugins = DeviceImageLoadEvents
//!   | where ingestion_time() >= ago(timeframe)
//!   | where InitiatingProcessFileName =~ "wsmprovhost.exe"
//!   | where FolderPath !startswith @"C:\windows\assembly\nativeimages_"
//!   | invoke FileProfile(SHA1, 1000)
//!   | where ProfileAvailability !~ "Error"
//!   | where coalesce(GlobalPrevalence, default_global_prevalence) < 100
//!   | extend FolderPath=tolower(FolderPath);
//! let PotentialWrites = DeviceFileEvents
//!   | where Timestamp >= ago(lookback)
//!   | where ActionType in~ ("FileCreated", "FileRenamed", "FileModified")
//!   | where SHA1 in~ ((PotentialPlugins | project SHA1))
//!   | extend FolderPath=tolower(FolderPath);
//! PotentialPlugins | join kind=inner PotentialWrites on SHA1, DeviceId, FolderPath
//! ```

use lookout_plugin_sdk::time::{parse_duration, parse_timestamp};
use serde_json::{Map, Value};
use std::collections::BTreeSet;

pub const IMAGE_LOADS: &str = "DeviceImageLoadEvents";
pub const FILE_EVENTS: &str = "DeviceFileEvents";
pub const FILE_PROFILE: &str = "FileProfile";

/// The rule's parameters.
#[derive(Debug, Clone)]
pub struct Params {
    /// Ticks; loads ingested at or after `now - timeframe` are considered.
    pub timeframe: i64,
    /// Ticks; writes with `Timestamp` at or after `now - lookback` are considered.
    pub lookback: i64,
    pub prevalence_threshold: i64,
    pub default_prevalence: i64,
    pub initiating_process: String,
    pub excluded_prefix: String,
}

impl Default for Params {
    /// The rule's own values: `timeframe = 2*1d`, `lookback = 30d`, `< 100`,
    /// `default_global_prevalence = 0`.
    fn default() -> Self {
        Params {
            timeframe: parse_duration("2d").expect("2d"),
            lookback: parse_duration("30d").expect("30d"),
            prevalence_threshold: 100,
            default_prevalence: 0,
            initiating_process: "wsmprovhost.exe".to_string(),
            excluded_prefix: r"C:\windows\assembly\nativeimages_".to_string(),
        }
    }
}

/// One stored row as the user wrote it, with its table and the time Lookout ingested it
/// (`ingestion_time()`).
#[derive(Debug, Clone)]
pub struct StoredRow {
    pub table: String,
    pub ingested_at: i64,
    pub row: Map<String, Value>,
}

/// A row's identity: (DeviceId, ReportId, Timestamp as written).
pub type Identity = (String, i64, String);

/// One output row of the join: (load identity, write identity).
pub type Pair = (Identity, Identity);

/// A string column: missing and `null` read as `""` (KQL strings are never null).
fn s<'a>(row: &'a Map<String, Value>, col: &str) -> &'a str {
    row.get(col).and_then(Value::as_str).unwrap_or("")
}

pub fn identity(row: &Map<String, Value>) -> Identity {
    (
        s(row, "DeviceId").to_string(),
        row.get("ReportId").and_then(Value::as_i64).expect("every test row has an integer ReportId"),
        s(row, "Timestamp").to_string(),
    )
}

/// `invoke FileProfile(SHA1, 1000)`: the feed row with exactly this SHA1; when several
/// were stored, the one stored last (rows are in arrival order).
fn file_profile<'a>(rows: &'a [StoredRow], sha1: &str) -> Option<&'a Map<String, Value>> {
    rows.iter().rev().find(|r| r.table == FILE_PROFILE && s(&r.row, "SHA1") == sha1).map(|r| &r.row)
}

/// `a =~ b`, `a !~ b`, `in~`: ASCII case-insensitive equality.
fn eq_ci(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// `a startswith b`: ASCII case-insensitive prefix.
fn starts_with_ci(a: &str, b: &str) -> bool {
    a.to_ascii_lowercase().as_bytes().starts_with(b.to_ascii_lowercase().as_bytes())
}

/// The `PotentialPlugins` pipeline for one load at evaluation time `now`.
fn potential_plugin(rows: &[StoredRow], load: &StoredRow, now: i64, p: &Params) -> bool {
    if load.ingested_at < now - p.timeframe {
        return false;
    }
    if !eq_ci(s(&load.row, "InitiatingProcessFileName"), &p.initiating_process) {
        return false;
    }
    if starts_with_ci(s(&load.row, "FolderPath"), &p.excluded_prefix) {
        return false;
    }
    // No profile row: ProfileAvailability "" and GlobalPrevalence null.
    let profile = file_profile(rows, s(&load.row, "SHA1"));
    let availability = profile.map_or("", |pr| s(pr, "ProfileAvailability"));
    if eq_ci(availability, "Error") {
        return false;
    }
    let prevalence = profile.and_then(|pr| pr.get("GlobalPrevalence")).and_then(Value::as_i64);
    prevalence.unwrap_or(p.default_prevalence) < p.prevalence_threshold
}

/// The `PotentialWrites` pipeline for one write, given the SHA1s of `PotentialPlugins`.
fn potential_write(write: &StoredRow, plugin_sha1s: &[&str], now: i64, p: &Params) -> bool {
    let ts = parse_timestamp(s(&write.row, "Timestamp")).expect("every test write has a valid Timestamp");
    if ts < now - p.lookback {
        return false;
    }
    let action = s(&write.row, "ActionType");
    if !["FileCreated", "FileRenamed", "FileModified"].iter().any(|a| eq_ci(action, a)) {
        return false;
    }
    let sha1 = s(&write.row, "SHA1");
    plugin_sha1s.iter().any(|x| eq_ci(sha1, x))
}

/// Evaluates the rule over `rows` (every row stored so far, in arrival order) at `now`.
pub fn evaluate(rows: &[StoredRow], now: i64, p: &Params) -> BTreeSet<Pair> {
    let plugins: Vec<&StoredRow> =
        rows.iter().filter(|r| r.table == IMAGE_LOADS && potential_plugin(rows, r, now, p)).collect();
    let plugin_sha1s: Vec<&str> = plugins.iter().map(|l| s(&l.row, "SHA1")).collect();
    let writes: Vec<&StoredRow> =
        rows.iter().filter(|r| r.table == FILE_EVENTS && potential_write(r, &plugin_sha1s, now, p)).collect();

    let mut out = BTreeSet::new();
    for load in &plugins {
        for write in &writes {
            // `join kind=inner on SHA1, DeviceId, FolderPath`, FolderPath lowercased on
            // both sides by the `extend`s; otherwise case-sensitive, "" == "".
            if s(&load.row, "SHA1") == s(&write.row, "SHA1")
                && s(&load.row, "DeviceId") == s(&write.row, "DeviceId")
                && s(&load.row, "FolderPath").to_lowercase() == s(&write.row, "FolderPath").to_lowercase()
            {
                out.insert((identity(&load.row), identity(&write.row)));
            }
        }
    }
    out
}
