//! A naive batch evaluator of FalconFriday 0xFF-0083 "Remote Process Invocation Via SCM",
//! written straight from the KQL and docs/rules/SEMANTICS.md, independently of the plugin.
//!
//! It evaluates the whole query once, at one evaluation time, over every row stored so
//! far: plain JSON rows, nested loops, no state. The incremental detector must emit
//! exactly the union of this evaluator's results over the evaluation times of its passes.
//!
//! The KQL (FalconForce, BSD 3-Clause; see docs/rules/LICENSE-FalconFriday; the LOLBIN
//! list elided):
//!
//! ```kusto
//! let networkEvents = materialize(DeviceNetworkEvents
//! | where ingestion_time() >= ago(timeframe)
//! | where InitiatingProcessFileName in~ ("services.exe")
//! | where ActionType =~ "InboundConnectionAccepted"
//! | project-rename TimestampNetworkAct=Timestamp);
//! let allServices = materialize ((
//! DeviceProcessEvents
//! | where ingestion_time() >= ago(timeframe)
//! | where ActionType =~ "ProcessCreated"
//! | where DeviceId in~ ((networkEvents | project DeviceId))
//! | where InitiatingProcessFileName =~ "services.exe"
//! | project TimestampChild=Timestamp, DeviceId, DeviceName, FileName, ProcessCommandLine, SHA1,
//! InitiatingProcessFileName, InitiatingProcessCommandLine, InitiatingProcessSHA1, InitiatingProcessId, TimestampServicesExe=InitiatingProcessCreationTime));
//! let serviceNetworkEvents = materialize(
//! (networkEvents
//!     | join kind=inner hint.strategy=shuffle allServices on DeviceId, InitiatingProcessId, InitiatingProcessFileName
//! )
//! | where datetime_diff("Second", TimestampChild, TimestampNetworkAct) between (0 .. 10)
//! | where datetime_diff("Second", TimestampNetworkAct, TimestampServicesExe) > 60);
//! let serviceNetworkEventsWithSHA1 = materialize(serviceNetworkEvents
//! | summarize count() by SHA1
//! | join kind=leftanti hint.strategy=broadcast DeviceFileCertificateInfo on SHA1
//! | where count_ < 100);
//! serviceNetworkEvents
//! | where SHA1 in ((serviceNetworkEventsWithSHA1 | project SHA1)) or FileName in~ (lolbins)
//! | where ProcessCommandLine !~ "msiexec.exe /V"
//! | extend Timestamp=TimestampNetworkAct
//! ```

use lookout_plugin_sdk::time::{format_timestamp, parse_timestamp};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

pub const NETWORK: &str = "DeviceNetworkEvents";
pub const PROCESS: &str = "DeviceProcessEvents";
pub const CERTIFICATES: &str = "DeviceFileCertificateInfo";

/// One stored row, with its table and ingestion time.
#[derive(Debug, Clone)]
pub struct StoredRow {
    pub table: String,
    pub ingested_at: i64,
    pub row: Map<String, Value>,
}

/// The rule's parameters.
#[derive(Debug, Clone)]
pub struct Params {
    pub timeframe: i64,
    pub prevalence_threshold: i64,
    pub lolbins: Vec<String>,
}

type Row = Map<String, Value>;

/// A finding identity: (DeviceId, network ReportId, TimestampChild, SHA1), as text.
pub type Identity = (String, String, String, String);

fn s<'a>(row: &'a Map<String, Value>, col: &str) -> &'a str {
    row.get(col).and_then(Value::as_str).unwrap_or("")
}

fn long(row: &Map<String, Value>, col: &str) -> Option<i64> {
    row.get(col).and_then(Value::as_i64)
}

fn time(row: &Map<String, Value>, col: &str) -> Option<i64> {
    row.get(col).and_then(Value::as_str).and_then(parse_timestamp)
}

/// A value as the text of a finding's column: a string as is, anything else as JSON.
/// A datetime cell as the identity takes it: the instant, written one way (two spellings
/// of one time are one KQL datetime); the text itself if it is not a time.
pub fn instant_text(v: Option<&Value>) -> String {
    let text = value_text(v);
    parse_timestamp(&text).map_or(text, format_timestamp)
}

pub fn value_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// Whole seconds since the epoch, rounded down (KQL's datetime_diff counts boundaries).
fn second_of(ticks: i64) -> i64 {
    let per_second = 10_000_000i64;
    let q = ticks / per_second;
    if ticks % per_second < 0 {
        q - 1
    } else {
        q
    }
}

fn diff_seconds(a: i64, b: i64) -> i64 {
    second_of(a) - second_of(b)
}

/// The query's result identities at `now` over `stored`.
pub fn evaluate(stored: &[StoredRow], now: i64, p: &Params) -> BTreeSet<Identity> {
    let cutoff = now - p.timeframe;
    let network: Vec<&Map<String, Value>> = stored
        .iter()
        .filter(|r| r.table == NETWORK && r.ingested_at >= cutoff)
        .map(|r| &r.row)
        .filter(|r| s(r, "InitiatingProcessFileName").eq_ignore_ascii_case("services.exe"))
        .filter(|r| s(r, "ActionType").eq_ignore_ascii_case("InboundConnectionAccepted"))
        .collect();
    let devices: Vec<&str> = network.iter().map(|r| s(r, "DeviceId")).collect();
    let services: Vec<&Map<String, Value>> = stored
        .iter()
        .filter(|r| r.table == PROCESS && r.ingested_at >= cutoff)
        .map(|r| &r.row)
        .filter(|r| s(r, "ActionType").eq_ignore_ascii_case("ProcessCreated"))
        .filter(|r| devices.iter().any(|d| d.eq_ignore_ascii_case(s(r, "DeviceId"))))
        .filter(|r| s(r, "InitiatingProcessFileName").eq_ignore_ascii_case("services.exe"))
        .collect();

    // The join and the two time conditions.
    let mut joined: Vec<(&Row, &Row)> = Vec::new();
    for n in &network {
        for c in &services {
            if s(n, "DeviceId") != s(c, "DeviceId") {
                continue;
            }
            match (long(n, "InitiatingProcessId"), long(c, "InitiatingProcessId")) {
                (Some(a), Some(b)) if a == b => {}
                _ => continue,
            }
            if s(n, "InitiatingProcessFileName") != s(c, "InitiatingProcessFileName") {
                continue;
            }
            let (Some(t_net), Some(t_child)) = (time(n, "Timestamp"), time(c, "Timestamp")) else { continue };
            let d = diff_seconds(t_child, t_net);
            if !(0..=10).contains(&d) {
                continue;
            }
            let Some(t_services) = time(c, "InitiatingProcessCreationTime") else { continue };
            if diff_seconds(t_net, t_services) <= 60 {
                continue;
            }
            joined.push((n, c));
        }
    }

    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for (_, c) in &joined {
        *counts.entry(s(c, "SHA1")).or_insert(0) += 1;
    }
    let certified: BTreeSet<&str> =
        stored.iter().filter(|r| r.table == CERTIFICATES).map(|r| s(&r.row, "SHA1")).collect();
    let rare: BTreeSet<&str> = counts
        .iter()
        .filter(|(sha1, _)| !certified.contains(*sha1))
        .filter(|(_, n)| **n < p.prevalence_threshold)
        .map(|(sha1, _)| *sha1)
        .collect();

    joined
        .iter()
        .filter(|(_, c)| {
            rare.contains(s(c, "SHA1")) || p.lolbins.iter().any(|l| l.eq_ignore_ascii_case(s(c, "FileName")))
        })
        .filter(|(_, c)| !s(c, "ProcessCommandLine").eq_ignore_ascii_case("msiexec.exe /V"))
        .map(|(n, c)| {
            (
                s(n, "DeviceId").to_string(),
                value_text(n.get("ReportId")),
                instant_text(c.get("Timestamp")),
                s(c, "SHA1").to_string(),
            )
        })
        .collect()
}
