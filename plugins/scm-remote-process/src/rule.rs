//! The rule itself, with exactly the semantics of the KQL (see the crate docs).

use lookout_plugin_sdk::tables::{FILE_CERTIFICATES, NETWORK_EVENTS, PROCESS_EVENTS};
use lookout_plugin_sdk::time::{datetime_diff_seconds, parse_timestamp};
use lookout_plugin_sdk::{identity_key, Cell, Condition, Context, EvalRequest, FindingOut, InputSpec, Records, Row};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

const SERVICES: &str = "services.exe";
const INBOUND: &str = "InboundConnectionAccepted";
const CREATED: &str = "ProcessCreated";
const MSIEXEC: &str = "msiexec.exe /V";

/// The child columns `project`ed into the result, after `TimestampChild=Timestamp`:
/// (output name, source column, whether the column is a string).
const CHILD_PROJECTION: &[(&str, &str, bool)] = &[
    ("TimestampChild", "Timestamp", false),
    ("DeviceId", "DeviceId", true),
    ("DeviceName", "DeviceName", true),
    ("FileName", "FileName", true),
    ("ProcessCommandLine", "ProcessCommandLine", true),
    ("SHA1", "SHA1", true),
    ("InitiatingProcessFileName", "InitiatingProcessFileName", true),
    ("InitiatingProcessCommandLine", "InitiatingProcessCommandLine", true),
    ("InitiatingProcessSHA1", "InitiatingProcessSHA1", true),
    ("InitiatingProcessId", "InitiatingProcessId", false),
    ("TimestampServicesExe", "InitiatingProcessCreationTime", false),
];

/// State key prefixes of the three record sets.
const NETWORK_PREFIX: &[u8] = b"n";
const CHILD_PREFIX: &[u8] = b"c";
const EMITTED_PREFIX: &[u8] = b"e";

#[derive(Debug, Clone)]
pub struct RuleConfig {
    /// Ticks.
    pub timeframe: i64,
    pub prevalence_threshold: i64,
    pub lolbins: Vec<String>,
}

/// What the rule needs of an inbound `services.exe` connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Connection {
    ingested_at: i64,
    device: String,
    process_id: i64,
    process: String,
    at: i64,
    report: String,
}

/// What the rule needs of a `services.exe` child.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Child {
    ingested_at: i64,
    device: String,
    process_id: i64,
    process: String,
    at: i64,
    /// `Timestamp` as stored (`TimestampChild` of the identity).
    at_text: String,
    /// `InitiatingProcessCreationTime`.
    services_started: i64,
    sha1: String,
    file_name: String,
    /// `ProcessCommandLine =~ "msiexec.exe /V"`.
    msiexec: bool,
}

/// A finding to emit: the keys of its pair's rows and when the pair leaves the window.
struct Pending {
    network: Vec<u8>,
    child: Vec<u8>,
    expires: i64,
}

/// Children by join key (DeviceId, InitiatingProcessId, InitiatingProcessFileName).
type ChildrenByKey<'a> = HashMap<(&'a str, i64, &'a str), Vec<(&'a [u8], &'a Child)>>;

pub struct ScmRule {
    config: RuleConfig,
    connections: Records<Connection>,
    children: Records<Child>,
    /// Identities emitted while both rows of their pair are in the window.
    emitted: Records<u8>,
    /// Whether a SHA1 has a stored certificate row, as far as this process has asked.
    /// Certificate rows are an input, so every one stored after an answer was cached
    /// arrives in a pass and marks its SHA1 certified: a cached "no" stays true until
    /// then, and a "yes" only grows (see the crate docs on retention).
    certified: HashMap<String, bool>,
}

/// The time conditions on one (connection, child) pair: `datetime_diff("Second",
/// TimestampChild, TimestampNetworkAct) between (0 .. 10)` and `datetime_diff("Second",
/// TimestampNetworkAct, TimestampServicesExe) > 60`.
pub fn times_pass(network_at: i64, child_at: i64, services_started: i64) -> bool {
    let after = datetime_diff_seconds(child_at, network_at);
    (0..=10).contains(&after) && datetime_diff_seconds(network_at, services_started) > 60
}

/// `FileName in~ (lolbins)`.
pub fn is_lolbin(lolbins: &[String], file_name: &str) -> bool {
    lolbins.iter().any(|l| l.eq_ignore_ascii_case(file_name))
}

/// A long column: an integer, or nothing (null, missing or any other type).
fn long(row: &Row, column: &str) -> Option<i64> {
    row.get(column).and_then(Cell::as_i64)
}

/// A datetime column: parsed ISO text, or nothing.
fn datetime(row: &Row, column: &str) -> Option<i64> {
    match row.get(column) {
        Some(Cell::Str(s)) => parse_timestamp(s),
        _ => None,
    }
}

/// A column's value as identity text: a string as is, anything else as JSON text (a
/// missing column as `""`).
fn text(row: &Row, column: &str) -> String {
    match row.get(column) {
        Some(Cell::Str(s)) => s.clone(),
        Some(c) => c.to_json().to_string(),
        None => String::new(),
    }
}

impl ScmRule {
    pub fn new(config: RuleConfig, state: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, String> {
        Ok(ScmRule {
            config,
            connections: Records::load(NETWORK_PREFIX, state)?,
            children: Records::load(CHILD_PREFIX, state)?,
            emitted: Records::load(EMITTED_PREFIX, state)?,
            certified: HashMap::new(),
        })
    }

    /// The `networkEvents` and `allServices` row filters, applied by the host.
    pub fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec { table: NETWORK_EVENTS.into(), only_where: network_filter(), on_backfill: true },
            InputSpec { table: PROCESS_EVENTS.into(), only_where: child_filter(), on_backfill: true },
            // New certificate rows only update what is known of their SHA1s; stored ones are
            // looked up when a pair needs them, so a backfill does not read them.
            InputSpec { table: FILE_CERTIFICATES.into(), only_where: Vec::new(), on_backfill: false },
        ]
    }

    pub fn evaluate(&mut self, batch: &EvalRequest, ctx: &mut Context<'_>) -> Result<(), String> {
        let now = ctx.now();
        let cutoff = now.saturating_sub(self.config.timeframe);
        let mut network_keys = Vec::new();
        let mut child_keys = Vec::new();
        for r in &batch.rows {
            match r.table.as_str() {
                NETWORK_EVENTS => network_keys.push(r.key.clone()),
                PROCESS_EVENTS => child_keys.push(r.key.clone()),
                FILE_CERTIFICATES => {
                    self.certified.insert(r.sha1.clone(), true);
                }
                _ => {}
            }
        }
        if !network_keys.is_empty() {
            for row in ctx.rows_where(network_keys, &network_filter())? {
                self.take_connection(ctx, &row, cutoff)?;
            }
        }
        if !child_keys.is_empty() {
            for row in ctx.rows_where(child_keys, &child_filter())? {
                self.take_child(ctx, &row, cutoff)?;
            }
        }
        if !batch.last {
            return Ok(());
        }

        self.connections.expire(ctx, now);
        self.children.expire(ctx, now);
        self.emitted.expire(ctx, now);
        if let Some(at) = self.emit_new(ctx, cutoff)? {
            ctx.wake_at(at);
        }
        Ok(())
    }

    /// Keeps an inbound `services.exe` connection that can still join (in the window, with
    /// a process id).
    fn take_connection(&mut self, ctx: &mut Context<'_>, row: &Row, cutoff: i64) -> Result<(), String> {
        if row.ingested_at < cutoff
            || !row.str("InitiatingProcessFileName").eq_ignore_ascii_case(SERVICES)
            || !row.str("ActionType").eq_ignore_ascii_case(INBOUND)
        {
            return Ok(());
        }
        let (Some(process_id), Some(at)) = (long(row, "InitiatingProcessId"), datetime(row, "Timestamp")) else {
            return Ok(());
        };
        let record = Connection {
            ingested_at: row.ingested_at,
            device: row.str("DeviceId").to_string(),
            process_id,
            process: row.str("InitiatingProcessFileName").to_string(),
            at,
            report: text(row, "ReportId"),
        };
        self.connections.insert(ctx, row.key.clone(), row.ingested_at.saturating_add(self.config.timeframe), record)?;
        Ok(())
    }

    /// Keeps a `services.exe` child that can still join (in the window, with a process id
    /// and a services.exe creation time).
    fn take_child(&mut self, ctx: &mut Context<'_>, row: &Row, cutoff: i64) -> Result<(), String> {
        if row.ingested_at < cutoff
            || !row.str("InitiatingProcessFileName").eq_ignore_ascii_case(SERVICES)
            || !row.str("ActionType").eq_ignore_ascii_case(CREATED)
        {
            return Ok(());
        }
        let (Some(process_id), Some(at), Some(services_started)) = (
            long(row, "InitiatingProcessId"),
            datetime(row, "Timestamp"),
            datetime(row, "InitiatingProcessCreationTime"),
        ) else {
            return Ok(());
        };
        let record = Child {
            ingested_at: row.ingested_at,
            device: row.str("DeviceId").to_string(),
            process_id,
            process: row.str("InitiatingProcessFileName").to_string(),
            at,
            at_text: row.str("Timestamp").to_string(),
            services_started,
            sha1: row.str("SHA1").to_string(),
            file_name: row.str("FileName").to_string(),
            msiexec: row.str("ProcessCommandLine").eq_ignore_ascii_case(MSIEXEC),
        };
        self.children.insert(ctx, row.key.clone(), row.ingested_at.saturating_add(self.config.timeframe), record)?;
        Ok(())
    }

    /// The whole query over the records in the window; emits the identities not emitted
    /// yet. Returns when the clock alone can next change the result.
    ///
    /// With no new rows, a later pass sees a subset of these pairs, smaller counts and at
    /// least these certificates. A pair that does not qualify now is then new only if its
    /// SHA1's count is at or above the threshold now and falls below it, so the time that
    /// matters is the first time a pair of such a SHA1 leaves the window, for SHA1s with no
    /// certificate and with a pair that is not msiexec, not a LOLBIN and not yet emitted.
    fn emit_new(&mut self, ctx: &mut Context<'_>, cutoff: i64) -> Result<Option<i64>, String> {
        // `join kind=inner on DeviceId, InitiatingProcessId, InitiatingProcessFileName`,
        // exact on all three, then the two time conditions.
        let mut by_join_key: ChildrenByKey<'_> = HashMap::new();
        for (id, c) in self.children.iter() {
            if c.ingested_at >= cutoff {
                by_join_key.entry((c.device.as_str(), c.process_id, c.process.as_str())).or_default().push((id, c));
            }
        }
        let mut pairs: Vec<(&[u8], &Connection, &[u8], &Child)> = Vec::new();
        for (nid, n) in self.connections.iter() {
            if n.ingested_at < cutoff {
                continue;
            }
            let Some(children) = by_join_key.get(&(n.device.as_str(), n.process_id, n.process.as_str())) else {
                continue;
            };
            for (cid, c) in children {
                if times_pass(n.at, c.at, c.services_started) {
                    pairs.push((nid, n, cid, c));
                }
            }
        }
        if pairs.is_empty() {
            return Ok(None);
        }
        pairs.sort_by(|a, b| (a.0, a.2).cmp(&(b.0, b.2)));

        // `summarize count() by SHA1`: pairs per child SHA1, and when the first of them
        // leaves the window.
        let timeframe = self.config.timeframe;
        let expiry = |n: &Connection, c: &Child| n.ingested_at.min(c.ingested_at).saturating_add(timeframe);
        let mut counts: HashMap<&str, (i64, i64)> = HashMap::new();
        for (_, n, _, c) in &pairs {
            let e = counts.entry(c.sha1.as_str()).or_insert((0, i64::MAX));
            e.0 += 1;
            e.1 = e.1.min(expiry(n, c));
        }

        let mut wanted: BTreeMap<Vec<u8>, Pending> = BTreeMap::new();
        let mut wake: Option<i64> = None;
        for (nid, n, cid, c) in &pairs {
            if c.msiexec {
                continue;
            }
            let identity = identity_key(&[&n.device, &n.report, &c.at_text, &c.sha1]);
            if self.emitted.contains(&identity) || wanted.contains_key(&identity) {
                continue;
            }
            let (count, first_leaves) = counts.get(c.sha1.as_str()).copied().unwrap_or((0, i64::MAX));
            let pending = Pending { network: nid.to_vec(), child: cid.to_vec(), expires: expiry(n, c) };
            if is_lolbin(&self.config.lolbins, &c.file_name) {
                wanted.insert(identity, pending);
                continue;
            }
            if has_certificate(ctx, &mut self.certified, &c.sha1, &c.device)? {
                continue;
            }
            if count < self.config.prevalence_threshold {
                wanted.insert(identity, pending);
            } else {
                let at = first_leaves.saturating_add(1);
                wake = Some(wake.map_or(at, |w: i64| w.min(at)));
            }
        }
        if wanted.is_empty() {
            return Ok(wake);
        }

        // Fetch both rows of every pair to emit, in one call.
        let mut keys: Vec<Vec<u8>> = wanted.values().flat_map(|p| [p.network.clone(), p.child.clone()]).collect();
        keys.sort();
        keys.dedup();
        let rows: HashMap<Vec<u8>, Row> = ctx.rows(keys)?.into_iter().map(|r| (r.key.clone(), r)).collect();
        // Emit in the order of the pairs (network key, child key).
        let mut order: Vec<(Vec<u8>, Pending)> = wanted.into_iter().collect();
        order.sort_by(|a, b| (&a.1.network, &a.1.child).cmp(&(&b.1.network, &b.1.child)));
        for (identity, pending) in order {
            // A row pruned from the store since it was recorded cannot be reported.
            let (Some(network), Some(child)) = (rows.get(&pending.network), rows.get(&pending.child)) else {
                continue;
            };
            ctx.emit(FindingOut {
                inputs: vec![identity.clone()],
                device_id: network.str("DeviceId").to_string(),
                device_name: network.str("DeviceName").to_string(),
                row: output_row(network, child),
            });
            self.emitted.insert(ctx, identity, pending.expires, 0)?;
        }
        Ok(wake)
    }
}

/// `join kind=leftanti DeviceFileCertificateInfo on SHA1`: whether any certificate row
/// has exactly this SHA1 (asked once per SHA1 per process; new certificate rows update
/// the answer as they arrive). The device that ran the file
/// usually has one, so it is asked first: a file signed everywhere does not bring back
/// the certificate rows of the whole fleet.
fn has_certificate(
    ctx: &mut Context<'_>,
    cache: &mut HashMap<String, bool>,
    sha1: &str,
    device: &str,
) -> Result<bool, String> {
    if let Some(&known) = cache.get(sha1) {
        return Ok(known);
    }
    let mut found = ctx.lookup(FILE_CERTIFICATES, sha1, Some(device))?.iter().any(|r| r.str("SHA1") == sha1);
    if !found {
        found = ctx.lookup(FILE_CERTIFICATES, sha1, None)?.iter().any(|r| r.str("SHA1") == sha1);
    }
    cache.insert(sha1.to_string(), found);
    Ok(found)
}

/// `networkEvents`' row filters.
fn network_filter() -> Vec<Condition> {
    vec![
        Condition::In { column: "InitiatingProcessFileName".into(), any_of: vec![SERVICES.into()] },
        Condition::EqCi { column: "ActionType".into(), value: INBOUND.into() },
    ]
}

/// `allServices`' row filters (the DeviceId one is implied by the join).
fn child_filter() -> Vec<Condition> {
    vec![
        Condition::EqCi { column: "ActionType".into(), value: CREATED.into() },
        Condition::EqCi { column: "InitiatingProcessFileName".into(), value: SERVICES.into() },
    ]
}

/// A name not yet in `taken`: `name`, else `name1`, `name2`, …
fn unique_name(name: &str, taken: &HashSet<String>) -> String {
    if !taken.contains(name) {
        return name.to_string();
    }
    (1..).map(|i| format!("{name}{i}")).find(|n| !taken.contains(n)).unwrap_or_else(|| name.to_string())
}

/// The result row of one pair: the network row's columns (`Timestamp` renamed
/// `TimestampNetworkAct`), the child's projected columns (clashes suffixed), then
/// `Timestamp = TimestampNetworkAct`.
pub fn output_row(network: &Row, child: &Row) -> Vec<(String, Cell)> {
    let mut row: Vec<(String, Cell)> = network
        .columns
        .iter()
        .map(|(n, c)| (if n == "Timestamp" { "TimestampNetworkAct".to_string() } else { n.clone() }, c.clone()))
        .collect();
    let mut taken: HashSet<String> = row.iter().map(|(n, _)| n.clone()).collect();
    for (out, source, is_string) in CHILD_PROJECTION {
        let value =
            child.get(source).cloned().unwrap_or(if *is_string { Cell::Str(String::new()) } else { Cell::Null });
        let name = unique_name(out, &taken);
        taken.insert(name.clone());
        row.push((name, value));
    }
    let at = network.get("Timestamp").cloned().unwrap_or(Cell::Null);
    match row.iter_mut().find(|(n, _)| n == "Timestamp") {
        Some(slot) => slot.1 = at,
        None => row.push(("Timestamp".to_string(), at)),
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use lookout_plugin_sdk::time::TICKS_PER_SEC;

    fn t(s: &str) -> i64 {
        parse_timestamp(s).unwrap()
    }

    #[test]
    fn time_conditions_count_second_boundaries() {
        let started = t("2025-05-07T11:00:00Z");
        let net = t("2025-05-07T12:00:00.9Z");
        // 0.8 s before the connection, same second: diff 0, passes.
        assert!(times_pass(net, t("2025-05-07T12:00:00.1Z"), started));
        // 0.2 s before, across a second boundary: diff -1, fails.
        assert!(!times_pass(t("2025-05-07T12:00:00.1Z"), t("2025-05-07T11:59:59.9Z"), started));
        // 10 and 11 whole seconds.
        assert!(times_pass(net, t("2025-05-07T12:00:10.0Z"), started));
        assert!(times_pass(net, t("2025-05-07T12:00:10.9999999Z"), started));
        assert!(!times_pass(net, t("2025-05-07T12:00:11Z"), started));
        // services.exe started exactly 60 s (fails) and 61 s (passes) before, by seconds.
        assert!(!times_pass(net, net, t("2025-05-07T11:59:00.99Z")));
        assert!(!times_pass(net, net, t("2025-05-07T11:59:00Z")));
        assert!(times_pass(net, net, t("2025-05-07T11:58:59.9999999Z")));
        assert!(times_pass(net + 10 * TICKS_PER_SEC, net + 10 * TICKS_PER_SEC, started));
    }

    #[test]
    fn lolbins_ignore_ascii_case_only() {
        let l = vec!["Cmd.exe".to_string(), "vbc.exe".to_string()];
        assert!(is_lolbin(&l, "CMD.EXE"));
        assert!(is_lolbin(&l, "cmd.exe"));
        assert!(is_lolbin(&l, "VBC.exe"));
        assert!(!is_lolbin(&l, "cmd.exe "));
        assert!(!is_lolbin(&l, "cmd"));
        assert!(!is_lolbin(&l, ""));
    }

    fn row(columns: &[(&str, Cell)]) -> Row {
        Row {
            table: String::new(),
            key: vec![1],
            ingested_at: 0,
            columns: columns.iter().map(|(n, c)| (n.to_string(), c.clone())).collect(),
        }
    }

    #[test]
    fn output_row_renames_suffixes_and_appends_timestamp() {
        let s = |v: &str| Cell::Str(v.into());
        let network = row(&[
            ("Timestamp", s("2025-05-07T12:00:00Z")),
            ("DeviceId", s("d1")),
            ("DeviceName", s("host")),
            ("ActionType", s("InboundConnectionAccepted")),
            ("InitiatingProcessFileName", s("services.exe")),
            ("InitiatingProcessId", Cell::Int(700)),
            ("DeviceId1", s("odd")),
            ("ReportId", Cell::Int(5)),
        ]);
        let child = row(&[
            ("Timestamp", s("2025-05-07T12:00:03Z")),
            ("DeviceId", s("d1")),
            ("FileName", s("evil.exe")),
            ("SHA1", s("abc")),
            ("InitiatingProcessFileName", s("services.exe")),
            ("InitiatingProcessId", Cell::Int(700)),
            ("InitiatingProcessCreationTime", s("2025-05-07T08:00:00Z")),
            ("ReportId", Cell::Int(9)),
        ]);
        let out = output_row(&network, &child);
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "TimestampNetworkAct",
                "DeviceId",
                "DeviceName",
                "ActionType",
                "InitiatingProcessFileName",
                "InitiatingProcessId",
                "DeviceId1",
                "ReportId",
                "TimestampChild",
                "DeviceId2",
                "DeviceName1",
                "FileName",
                "ProcessCommandLine",
                "SHA1",
                "InitiatingProcessFileName1",
                "InitiatingProcessCommandLine",
                "InitiatingProcessSHA1",
                "InitiatingProcessId1",
                "TimestampServicesExe",
                "Timestamp",
            ]
        );
        let get = |n: &str| out.iter().find(|(x, _)| x == n).map(|(_, c)| c.clone()).unwrap();
        assert_eq!(get("Timestamp"), s("2025-05-07T12:00:00Z"));
        assert_eq!(get("TimestampChild"), s("2025-05-07T12:00:03Z"));
        assert_eq!(get("TimestampServicesExe"), s("2025-05-07T08:00:00Z"));
        assert_eq!(get("ProcessCommandLine"), s(""), "a missing string column is empty");
        assert_eq!(get("ReportId"), Cell::Int(5), "the network row's ReportId");
        let no_time = row(&[("Timestamp", s("2025-05-07T12:00:03Z"))]);
        let out = output_row(&network, &no_time);
        let get = |n: &str| out.iter().find(|(x, _)| x == n).map(|(_, c)| c.clone()).unwrap();
        assert_eq!(get("TimestampServicesExe"), Cell::Null, "a missing datetime is null");
        assert_eq!(get("InitiatingProcessId1"), Cell::Null);
    }

    #[test]
    fn identity_text_of_cells() {
        let r = row(&[("ReportId", Cell::Int(42)), ("S", Cell::Str("x".into())), ("N", Cell::Null)]);
        assert_eq!(text(&r, "ReportId"), "42");
        assert_eq!(text(&r, "S"), "x");
        assert_eq!(text(&r, "N"), "null");
        assert_eq!(text(&r, "Missing"), "");
    }
}
