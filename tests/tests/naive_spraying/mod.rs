//! A naive batch evaluator of FalconFriday 0xFF-0044 (password spraying), written from
//! docs/rules/SEMANTICS.md and the rule's KQL, independently of the plugin: every pass
//! filters and groups every stored row from scratch.

use lookout_plugin_sdk::time::{format_timestamp, parse_timestamp};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

pub const LOGONS: &str = "DeviceLogonEvents";
pub const NETWORK: &str = "DeviceNetworkEvents";
pub const IDENTITY: &str = "IdentityLogonEvents";

/// A row as stored: its table, when Lookout ingested it, and its columns.
#[derive(Debug, Clone)]
pub struct StoredRow {
    pub table: String,
    pub ingested_at: i64,
    pub row: Map<String, Value>,
}

#[derive(Debug, Clone)]
pub struct Params {
    pub timeframe: i64,
    pub unique_failed_accounts: i64,
    pub failed_per_account: i64,
    pub success_ratio: i64,
}

/// (IPAddress, DeviceName, DeviceId, FirstFailed as text)
pub type Identity = (String, String, String, String);

/// A string column: `""` when missing or not a string (KQL strings are never null).
fn s<'a>(r: &'a Map<String, Value>, c: &str) -> &'a str {
    r.get(c).and_then(Value::as_str).unwrap_or("")
}

fn eq_ci(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// `tostring(ReportId)`.
fn tostring(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(x)) => x.clone(),
        Some(other) => other.to_string(),
    }
}

/// `domaincontrollers`, as the names stored (compared `in~` later).
fn domain_controllers(rows: &[StoredRow]) -> Vec<String> {
    rows.iter()
        .filter(|r| r.table == NETWORK)
        .filter(|r| s(&r.row, "ActionType") == "InboundConnectionAccepted")
        .filter(|r| eq_ci(s(&r.row, "InitiatingProcessFileName"), "lsass.exe"))
        .filter(|r| match r.row.get("LocalPort") {
            Some(Value::Number(n)) => n.as_f64() == Some(88.0),
            _ => false,
        })
        .map(|r| s(&r.row, "DeviceName").to_string())
        .collect()
}

/// One group's summarize, row by row.
#[derive(Default)]
struct Agg {
    success: i64,
    failed: i64,
    failed_accounts: BTreeSet<String>,
    success_accounts: BTreeSet<String>,
    first_failed: Option<i64>,
    last_failed: Option<i64>,
    /// (Timestamp, ReportId) of arg_max.
    last: Option<(i64, String)>,
}

/// The tie order of arg_max among rows of one Timestamp (the plugin's documented
/// choice): a larger integer ReportId wins; integers beat non-integers; else ordinal.
fn tie_rank(report: &str) -> (Option<i64>, String) {
    (report.parse::<i64>().ok(), report.to_string())
}

impl Agg {
    fn add(&mut self, action: &str, account: &str, ts: Option<i64>, report: String) {
        if eq_ci(action, "LogonSuccess") {
            self.success += 1;
            self.success_accounts.insert(account.to_string());
        }
        if eq_ci(action, "LogonFailed") {
            self.failed += 1;
            self.failed_accounts.insert(account.to_string());
            if let Some(t) = ts {
                if self.first_failed.is_none_or(|f| t < f) {
                    self.first_failed = Some(t);
                }
                if self.last_failed.is_none_or(|f| t > f) {
                    self.last_failed = Some(t);
                }
            }
        }
        if let Some(t) = ts {
            let replace = match &self.last {
                None => true,
                Some((lt, lr)) => t > *lt || (t == *lt && tie_rank(&report) > tie_rank(lr)),
            };
            if replace {
                self.last = Some((t, report));
            }
        }
    }

    fn passes(&self, p: &Params) -> bool {
        let unique = self.failed_accounts.len() as i128;
        unique > p.unique_failed_accounts as i128
            && (self.success as i128) * (p.success_ratio as i128) < self.failed as i128
            && unique * (p.failed_per_account as i128) > self.failed as i128
    }
}

fn time_value(t: Option<i64>) -> Value {
    t.map_or(Value::Null, |t| Value::String(format_timestamp(t)))
}

/// Evaluates the rule over every stored row at `now`: the result rows by finding identity.
pub fn evaluate(rows: &[StoredRow], now: i64, p: &Params) -> BTreeMap<Identity, Map<String, Value>> {
    let dcs = domain_controllers(rows);
    let in_window = |r: &&StoredRow| r.ingested_at >= now - p.timeframe;
    // (is identity branch, ip, name, id) → aggregate
    let mut groups: BTreeMap<(bool, String, String, String), Agg> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.table == IDENTITY).filter(in_window) {
        let key = (true, s(&r.row, "IPAddress").to_string(), s(&r.row, "DeviceName").to_string(), String::new());
        let ts = parse_timestamp(s(&r.row, "Timestamp"));
        groups.entry(key).or_default().add(
            s(&r.row, "ActionType"),
            s(&r.row, "AccountUpn"),
            ts,
            tostring(r.row.get("ReportId")),
        );
    }
    for r in rows.iter().filter(|r| r.table == LOGONS).filter(in_window) {
        let x = &r.row;
        if s(x, "LogonType") == "Unlock" {
            continue;
        }
        let action = s(x, "ActionType");
        if !(eq_ci(action, "LogonSuccess") || eq_ci(action, "LogonFailed")) {
            continue;
        }
        if s(x, "RemoteIP").is_empty() && s(x, "RemoteDeviceName").is_empty() {
            continue;
        }
        if s(x, "RemoteIPType") == "Loopback" {
            continue;
        }
        let key = (false, s(x, "RemoteIP").to_string(), s(x, "DeviceName").to_string(), s(x, "DeviceId").to_string());
        let ts = parse_timestamp(s(x, "Timestamp"));
        groups.entry(key).or_default().add(action, s(x, "AccountName"), ts, tostring(x.get("ReportId")));
    }
    let mut out = BTreeMap::new();
    for ((identity_branch, ip, name, id), agg) in groups {
        if !agg.passes(p) {
            continue;
        }
        if dcs.iter().any(|dc| eq_ci(dc, &name)) {
            continue;
        }
        let first = agg.first_failed.map(format_timestamp).unwrap_or_default();
        let mut row = Map::new();
        row.insert("Timestamp".into(), time_value(agg.last_failed));
        row.insert("IPAddress".into(), ip.clone().into());
        row.insert("DeviceName".into(), name.clone().into());
        row.insert("DeviceId".into(), id.clone().into());
        row.insert("SuccessLogonCount".into(), agg.success.into());
        row.insert("FailedLogonCount".into(), agg.failed.into());
        row.insert("UniqueAccountFailedLogons".into(), (agg.failed_accounts.len() as i64).into());
        row.insert("FirstFailed".into(), time_value(agg.first_failed));
        row.insert("LastFailed".into(), time_value(agg.last_failed));
        row.insert("LastTimestamp".into(), time_value(agg.last.as_ref().map(|l| l.0)));
        row.insert("ReportId".into(), agg.last.as_ref().map_or(Value::Null, |l| Value::String(l.1.clone())));
        row.insert("IsDC".into(), false.into());
        if identity_branch {
            let list = |set: &BTreeSet<String>| Value::Array(set.iter().cloned().map(Value::String).collect());
            row.insert("FailedAccounts".into(), list(&agg.failed_accounts));
            row.insert("SuccessAccounts".into(), list(&agg.success_accounts));
        }
        // An identity-branch group and a DeviceLogonEvents group with DeviceId "" could
        // share an identity; the tests never store an empty DeviceId.
        out.entry((ip, name, id, first)).or_insert(row);
    }
    out
}
