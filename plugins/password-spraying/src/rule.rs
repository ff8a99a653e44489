//! The rule itself, with exactly the semantics of the KQL (see the crate docs).
//!
//! Every logon row that passed the branch's filters is kept, as an [`Attempt`], in its
//! group's [`Pane`] for its ingestion time (the rows of a group and ingestion time leave
//! the `ingestion_time() >= ago(timeframe)` window together: one state record per group
//! and ingestion time, or a few when several passes took in rows of one ingestion time —
//! each pass writes only the rows it took in), and added to its group's aggregate ([`GroupAgg`], in memory). A pass takes in new rows on every
//! call and, on its last call, drops the panes that left the window (taking their rows
//! out of the aggregates), decides every group that gained or lost a row, and emits the
//! groups that pass the thresholds and are not domain controllers. It asks to be woken
//! when the next pane leaves the window.

use lookout_plugin_sdk::collections::{HashMap, HashSet};
use lookout_plugin_sdk::tables::{IDENTITY_LOGONS, LOGON_EVENTS, NETWORK_EVENTS};
use lookout_plugin_sdk::time::{format_timestamp, parse_timestamp};
use lookout_plugin_sdk::{
    identity_key, Cell, CellRef, Cmp, Condition, Context, EvalRequest, FindingOut, InputSpec, Records,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Parameters, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleConfig {
    /// `ingestion_time() >= ago(timeframe)`, ticks.
    pub timeframe: i64,
    /// `thresholdForUniqueFailedAccounts`.
    pub unique_failed_accounts: i64,
    /// `upperBoundOfFailedLogonsPerAccount`.
    pub failed_per_account: i64,
    /// `ratioSuccessFailedLogons`.
    pub success_ratio: i64,
}

impl RuleConfig {
    /// The state's record of the parameters the stored records were kept under.
    fn fingerprint(&self) -> String {
        format!("{}/{}/{}/{}", self.timeframe, self.unique_failed_accounts, self.failed_per_account, self.success_ratio)
    }
}

/// The columns a [`Logon`] is made of: all a pass fetches of a new row. The host answers
/// a fetch with the rows that pass its filter only (it reads the filter's columns
/// itself), so those are not fetched to be checked again.
const LOGON_COLUMNS: &[&str] =
    &["ActionType", "RemoteIP", "RemoteDeviceName", "DeviceName", "DeviceId", "AccountName", "Timestamp", "ReportId"];
const IDENTITY_COLUMNS: &[&str] = &["IPAddress", "DeviceName", "ActionType", "AccountUpn", "Timestamp", "ReportId"];

/// State key prefixes: panes, and the one-record-per-row layout before panes (moved into
/// panes on the first pass that finds it).
const PANE_PREFIX: &[u8] = b"p";
const RECORD_PREFIX: &[u8] = b"r";
const DC_PREFIX: u8 = b'd';
const CONFIG_KEY: &[u8] = b"c";
/// State key of the `timeframe` the panes' expiries were set with (stored with the panes
/// when they are kept again, so a pass cut short cannot leave them under another one
/// unnoticed).
const KEPT_UNDER_KEY: &[u8] = b"k";

/// How a row counts: `ActionType =~ "LogonSuccess"`, `=~ "LogonFailed"`, or neither (an
/// IdentityLogonEvents row of another action: it counts in no `countif`, but it is a row
/// of its group for `arg_max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Success,
    Failed,
    Other,
}

impl Outcome {
    pub fn of(action: &str) -> Outcome {
        if action.eq_ignore_ascii_case("LogonSuccess") {
            Outcome::Success
        } else if action.eq_ignore_ascii_case("LogonFailed") {
            Outcome::Failed
        } else {
            Outcome::Other
        }
    }
}

/// The group a record belongs to: the branch (IdentityLogonEvents or DeviceLogonEvents),
/// then `IPAddress`/`RemoteIP`, `DeviceName` and `DeviceId` (`""` on the identity
/// branch, which has no such column).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupKey {
    pub identity: bool,
    pub ip: String,
    pub device_name: String,
    pub device_id: String,
}

/// What one logon row contributes to its group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logon {
    pub group: GroupKey,
    pub outcome: Outcome,
    /// `AccountName` (DeviceLogonEvents) or `AccountUpn` (IdentityLogonEvents), as stored.
    pub account: String,
    /// `Timestamp`; `None` if it is not a datetime (null: ignored by minif/maxif/arg_max).
    pub timestamp: Option<i64>,
    /// `tostring(ReportId)`.
    pub report_id: String,
    /// `ingestion_time()`.
    pub ingested: i64,
}

/// What one row adds to its group, without the group and ingestion time its pane holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub outcome: Outcome,
    pub account: String,
    pub timestamp: Option<i64>,
    pub report_id: String,
}

impl Attempt {
    pub fn of(l: &Logon) -> Attempt {
        Attempt {
            outcome: l.outcome,
            account: l.account.clone(),
            timestamp: l.timestamp,
            report_id: l.report_id.clone(),
        }
    }
}

/// Rows of one group ingested at one time, by row key. They leave the `ingestion_time()`
/// window together, so they are one state record: a pass writes one record per group it
/// touched, not one per row, and a restart reads as many. Rows of one ingestion time that
/// later passes take in (a fixed `--now`, or the same batch handed over in chunks) go in
/// a record of their own (a part of the pane, [`part_id`]): a pass writes the rows it
/// took in, never again those kept before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pane {
    pub group: GroupKey,
    pub ingested: i64,
    pub rows: BTreeMap<Vec<u8>, Attempt>,
}

/// The id of a group in memory: [`identity_key`] of its branch and columns, which its
/// panes' ids start with.
fn group_id_into(out: &mut Vec<u8>, identity: bool, ip: &str, device_name: &str, device_id: &str) {
    out.clear();
    out.extend_from_slice(&identity_key(&[]));
    for part in [if identity { "i" } else { "d" }, ip, device_name, device_id] {
        push_part(out, part.as_bytes());
    }
}

/// One more part of an [`identity_key`].
fn push_part(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u32).to_be_bytes());
    out.extend_from_slice(part);
}

fn group_id(group: &GroupKey) -> Vec<u8> {
    let mut out = Vec::new();
    group_id_into(&mut out, group.identity, &group.ip, &group.device_name, &group.device_id);
    out
}

/// The record id of a group's pane at an ingestion time: the group's id, then the time.
fn pane_id(group: &GroupKey, ingested: i64) -> Vec<u8> {
    let mut id = group_id(group);
    push_part(&mut id, ingested.to_string().as_bytes());
    id
}

/// The record id of a part of pane `pane` written after its first: the pane's id, then the
/// smallest key of the part's rows. A row is in one part only (a row already kept is not
/// taken in again), so no two parts share it; and a pane's id has a fixed number of
/// length-prefixed parts, so no pane's part id is another pane's id.
fn part_id(pane: &[u8], rows: &BTreeMap<Vec<u8>, Attempt>) -> Vec<u8> {
    let mut id = pane.to_vec();
    push_part(&mut id, rows.keys().next().map_or(&[][..], Vec::as_slice));
    id
}

/// What one logon row contributes to its group, borrowed from the row it was read from
/// (a [`Logon`] owns its strings: copied only where a row is kept).
struct LogonRef<'a> {
    identity: bool,
    ip: &'a str,
    device_name: &'a str,
    device_id: &'a str,
    outcome: Outcome,
    account: &'a str,
    timestamp: Option<i64>,
    report_id: std::borrow::Cow<'a, str>,
    ingested: i64,
}

impl<'a> LogonRef<'a> {
    fn of(l: &'a Logon) -> LogonRef<'a> {
        LogonRef {
            identity: l.group.identity,
            ip: &l.group.ip,
            device_name: &l.group.device_name,
            device_id: &l.group.device_id,
            outcome: l.outcome,
            account: &l.account,
            timestamp: l.timestamp,
            report_id: std::borrow::Cow::Borrowed(&l.report_id),
            ingested: l.ingested,
        }
    }

    fn group(&self) -> GroupKey {
        GroupKey {
            identity: self.identity,
            ip: self.ip.to_string(),
            device_name: self.device_name.to_string(),
            device_id: self.device_id.to_string(),
        }
    }
}

/// A group in memory: its key (for its result row) and its aggregate.
struct Group {
    key: GroupKey,
    agg: GroupAgg,
}

/// The `summarize` of one group.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    pub success: i64,
    pub failed: i64,
    pub failed_accounts: BTreeSet<String>,
    pub success_accounts: BTreeSet<String>,
    pub first_failed: Option<i64>,
    pub last_failed: Option<i64>,
    /// `arg_max(Timestamp, tostring(ReportId))`: (LastTimestamp, ReportId).
    pub last: Option<(i64, String)>,
}

/// The order of `arg_max` among rows with the same Timestamp: the larger ReportId, as an
/// integer when it is one (every integer ranks above any ReportId that is not), else
/// by its text in ordinal order. Total, so the pick never depends on arrival order.
pub fn report_rank(report_id: &str) -> (Option<i64>, &str) {
    (report_id.parse::<i64>().ok(), report_id)
}

impl Summary {
    pub fn of<'a>(logons: impl IntoIterator<Item = &'a Logon>) -> Summary {
        let mut s = Summary::default();
        for l in logons {
            match l.outcome {
                Outcome::Success => {
                    s.success += 1;
                    s.success_accounts.insert(l.account.clone());
                }
                Outcome::Failed => {
                    s.failed += 1;
                    s.failed_accounts.insert(l.account.clone());
                    if let Some(t) = l.timestamp {
                        s.first_failed = Some(s.first_failed.map_or(t, |f| f.min(t)));
                        s.last_failed = Some(s.last_failed.map_or(t, |f| f.max(t)));
                    }
                }
                Outcome::Other => {}
            }
            if let Some(t) = l.timestamp {
                let better = match &s.last {
                    None => true,
                    Some((lt, lr)) => (t, report_rank(&l.report_id)) > (*lt, report_rank(lr)),
                };
                if better {
                    s.last = Some((t, l.report_id.clone()));
                }
            }
        }
        s
    }

    pub fn unique_failed(&self) -> i64 {
        self.failed_accounts.len() as i64
    }

    /// `UniqueAccountFailedLogons > u and SuccessLogonCount*r < FailedLogonCount and
    /// UniqueAccountFailedLogons*f > FailedLogonCount`, in integers that cannot overflow.
    pub fn qualifies(&self, c: &RuleConfig) -> bool {
        thresholds_pass(self.unique_failed(), self.success, self.failed, c)
    }
}

/// A group's `summarize`, kept as its records come and go: counts, each account with its
/// number of rows (a distinct set that can shrink), and the times `minif`/`maxif`/`arg_max`
/// pick from, each with its number of rows. Deciding a group is then O(1); only a group
/// that qualifies builds its [`Summary`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupAgg {
    records: usize,
    success: i64,
    failed: i64,
    failed_accounts: BTreeMap<String, u32>,
    success_accounts: BTreeMap<String, u32>,
    failed_times: BTreeMap<i64, u32>,
    /// (Timestamp, ReportId's rank, ReportId) of every row with a Timestamp.
    last: BTreeMap<(i64, Option<i64>, String), u32>,
}

/// [`count`] of an account: its name copied only the first time it is counted.
fn count_account(map: &mut BTreeMap<String, u32>, account: &str, up: bool) {
    match map.get_mut(account) {
        Some(n) if up => *n += 1,
        Some(n) => {
            *n -= 1;
            if *n == 0 {
                map.remove(account);
            }
        }
        None if up => {
            map.insert(account.to_string(), 1);
        }
        None => {}
    }
}

/// One more (`up`) or one fewer row with this value.
fn count<K: Ord>(map: &mut BTreeMap<K, u32>, key: K, up: bool) {
    if up {
        *map.entry(key).or_insert(0) += 1;
    } else if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

impl GroupAgg {
    /// Adds (`up`) or removes a row.
    pub fn apply(&mut self, l: &Logon, up: bool) {
        self.apply_attempt(&Attempt::of(l), up);
    }

    /// Adds (`up`) or removes a row of a pane.
    pub fn apply_attempt(&mut self, l: &Attempt, up: bool) {
        let step = if up { 1 } else { -1 };
        self.records = if up { self.records + 1 } else { self.records.saturating_sub(1) };
        match l.outcome {
            Outcome::Success => {
                self.success += step;
                count_account(&mut self.success_accounts, &l.account, up);
            }
            Outcome::Failed => {
                self.failed += step;
                count_account(&mut self.failed_accounts, &l.account, up);
                if let Some(t) = l.timestamp {
                    count(&mut self.failed_times, t, up);
                }
            }
            Outcome::Other => {}
        }
        if let Some(t) = l.timestamp {
            count(&mut self.last, (t, report_rank(&l.report_id).0, l.report_id.clone()), up);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// [`Summary::qualifies`] without building the summary.
    pub fn qualifies(&self, c: &RuleConfig) -> bool {
        thresholds_pass(self.failed_accounts.len() as i64, self.success, self.failed, c)
    }

    pub fn summary(&self) -> Summary {
        Summary {
            success: self.success,
            failed: self.failed,
            failed_accounts: self.failed_accounts.keys().cloned().collect(),
            success_accounts: self.success_accounts.keys().cloned().collect(),
            first_failed: self.failed_times.keys().next().copied(),
            last_failed: self.failed_times.keys().next_back().copied(),
            last: self.last.keys().next_back().map(|(t, _, r)| (*t, r.clone())),
        }
    }
}

/// `UniqueAccountFailedLogons > u and SuccessLogonCount*r < FailedLogonCount and
/// UniqueAccountFailedLogons*f > FailedLogonCount`, in integers that cannot overflow.
fn thresholds_pass(unique: i64, success: i64, failed: i64, c: &RuleConfig) -> bool {
    let (unique, success, failed) = (i128::from(unique), i128::from(success), i128::from(failed));
    unique > i128::from(c.unique_failed_accounts)
        && success * i128::from(c.success_ratio) < failed
        && unique * i128::from(c.failed_per_account) > failed
}

/// `tostring()` of a cell.
fn to_text(cell: Option<CellRef<'_>>) -> std::borrow::Cow<'_, str> {
    cell.map_or(std::borrow::Cow::Borrowed(""), CellRef::text)
}

fn time_cell(t: Option<i64>) -> Cell {
    t.map_or(Cell::Null, |t| Cell::Str(format_timestamp(t)))
}

/// Pending work after a change of parameters or of the state's layout, done on the next
/// pass (it needs a context).
#[derive(Default)]
struct Pending {
    /// Panes (their parts, by record id) stored under another timeframe, to keep again
    /// with the right expiry.
    rekeep: Vec<(Vec<u8>, Pane)>,
    /// State keys of rows stored one record each (the layout before panes): their rows
    /// were taken into panes at `init`, written with the first pass, which drops these.
    old_rows: Vec<Vec<u8>>,
    /// The parameters changed: every group is re-evaluated.
    all_dirty: bool,
    /// The fingerprint to store.
    write_config: bool,
    /// The timeframe the panes are kept under is to be stored (with them, on the first
    /// call).
    write_kept_under: bool,
}

pub struct SprayRule {
    config: RuleConfig,
    panes: Records<Pane>,
    /// The record ids of each pane's parts, by pane id ([`pane_id`]).
    parts: HashMap<Vec<u8>, Vec<Vec<u8>>>,
    /// Rows taken in by this call of a pass, by pane: written as a part of their pane (one
    /// state record each) when the call ends.
    fresh: HashMap<Vec<u8>, Pane>,
    /// Each group's aggregate over its records, by group id ([`group_id_into`]): a row
    /// finds its group without its key being copied.
    groups: HashMap<Vec<u8>, Group>,
    /// `domaincontrollers`, ASCII-lowercased (compared `in~`).
    dcs: HashSet<String>,
    /// Groups whose records changed since their last evaluation, by group id.
    dirty: HashSet<Vec<u8>>,
    /// The id of the group and pane of the row being kept, reused from row to row.
    scratch: Vec<u8>,
    pending: Pending,
}

impl SprayRule {
    pub fn new(config: RuleConfig, state: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, String> {
        let stored_config =
            state.iter().find(|(k, _)| k.as_slice() == CONFIG_KEY).map(|(_, v)| String::from_utf8_lossy(v).to_string());
        let mut pending = Pending::default();
        // The timeframe the panes were kept under (before it was stored apart: the one
        // of the stored parameters).
        let stored_kept_under = state
            .iter()
            .find(|(k, _)| k.as_slice() == KEPT_UNDER_KEY)
            .map(|(_, v)| String::from_utf8_lossy(v).to_string());
        let timeframe = config.timeframe.to_string();
        pending.write_kept_under = stored_kept_under.as_deref() != Some(timeframe.as_str());
        let kept_under = stored_kept_under
            .or_else(|| stored_config.as_deref().and_then(|fp| fp.split('/').next()).map(String::from));
        let panes: Records<Pane> = match &kept_under {
            // Panes kept under another timeframe expire at the wrong time: load none of
            // them now, keep them again (or drop them) on the next pass.
            Some(kept) if *kept != timeframe => {
                let old: Records<Pane> = Records::load(PANE_PREFIX, state)?;
                pending.rekeep = old.iter().map(|(id, p)| (id.to_vec(), p.clone())).collect();
                Records::load(PANE_PREFIX, &[])?
            }
            _ => Records::load(PANE_PREFIX, state)?,
        };
        if stored_config.as_deref() != Some(config.fingerprint().as_str()) {
            pending.write_config = true;
            pending.all_dirty = stored_config.is_some();
        }
        let mut groups: HashMap<Vec<u8>, Group> = HashMap::default();
        let mut parts: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::default();
        for (id, pane) in panes.iter() {
            parts.entry(pane_id(&pane.group, pane.ingested)).or_default().push(id.to_vec());
            let g = groups
                .entry(group_id(&pane.group))
                .or_insert_with(|| Group { key: pane.group.clone(), agg: GroupAgg::default() });
            for a in pane.rows.values() {
                g.agg.apply_attempt(a, true);
            }
        }
        let mut dcs = HashSet::default();
        for (k, _) in state {
            if k.first() == Some(&DC_PREFIX) {
                let name = String::from_utf8(k[1..].to_vec()).map_err(|_| "corrupt domain controller key in state")?;
                dcs.insert(name);
            }
        }
        let mut rule = SprayRule {
            config,
            panes,
            parts,
            fresh: HashMap::default(),
            groups,
            dcs,
            dirty: HashSet::default(),
            scratch: Vec::new(),
            pending,
        };
        // Rows in the layout before panes: into panes (written with the first pass, which
        // also drops the old records, and expires what has left the window).
        let old_rows: Records<Logon> = Records::load(RECORD_PREFIX, state)?;
        for (key, logon) in old_rows.iter() {
            rule.pending.old_rows.push([RECORD_PREFIX, key].concat());
            rule.keep(i64::MIN, key, LogonRef::of(logon));
        }
        Ok(rule)
    }

    /// DeviceLogonEvents: `LogonType != "Unlock" and ActionType in~ ("LogonSuccess",
    /// "LogonFailed")` and `RemoteIPType != "Loopback"` (the `not(isempty(RemoteIP) and
    /// isempty(RemoteDeviceName))` is checked on the row).
    pub fn logon_filter() -> Vec<Condition> {
        vec![
            Condition::In { column: "ActionType".into(), any_of: vec!["LogonSuccess".into(), "LogonFailed".into()] },
            Condition::NotEq { column: "LogonType".into(), value: "Unlock".into() },
            Condition::NotEq { column: "RemoteIPType".into(), value: "Loopback".into() },
        ]
    }

    /// DeviceNetworkEvents: the `domaincontrollers` filters.
    pub fn dc_filter() -> Vec<Condition> {
        vec![
            Condition::In { column: "InitiatingProcessFileName".into(), any_of: vec!["lsass.exe".into()] },
            Condition::Eq { column: "ActionType".into(), value: "InboundConnectionAccepted".into() },
            Condition::Num { column: "LocalPort".into(), op: Cmp::Eq, value: 88 },
        ]
    }

    pub fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec { table: LOGON_EVENTS.into(), only_where: Self::logon_filter(), on_backfill: true },
            InputSpec { table: NETWORK_EVENTS.into(), only_where: Self::dc_filter(), on_backfill: true },
            InputSpec { table: IDENTITY_LOGONS.into(), only_where: Vec::new(), on_backfill: true },
        ]
    }

    pub fn evaluate(&mut self, batch: &EvalRequest, ctx: &mut Context<'_>) -> Result<(), String> {
        let now = ctx.now();
        self.apply_pending(ctx, now)?;

        let (mut logons, mut network, mut identity) = (Vec::new(), Vec::new(), Vec::new());
        for r in &batch.rows {
            match r.table.as_str() {
                LOGON_EVENTS => logons.push(r.key.clone()),
                NETWORK_EVENTS => network.push(r.key.clone()),
                IDENTITY_LOGONS => identity.push(r.key.clone()),
                _ => {}
            }
        }
        if !network.is_empty() {
            // Only the rows that pass the filter (the host applied it).
            let answer = ctx.columns_where_borrowed(network, &Self::dc_filter(), &["DeviceName"])?;
            for row in answer.rows()? {
                let name = row.str("DeviceName").to_ascii_lowercase();
                if !self.dcs.contains(&name) {
                    let mut key = vec![DC_PREFIX];
                    key.extend_from_slice(name.as_bytes());
                    ctx.state_put(key, Vec::new());
                    self.dcs.insert(name);
                }
            }
        }
        if !logons.is_empty() {
            let answer = ctx.columns_where_borrowed(logons, &Self::logon_filter(), LOGON_COLUMNS)?;
            for row in answer.rows()? {
                if row.str("RemoteIP").is_empty() && row.str("RemoteDeviceName").is_empty() {
                    continue;
                }
                let logon = LogonRef {
                    identity: false,
                    ip: row.str("RemoteIP"),
                    device_name: row.str("DeviceName"),
                    device_id: row.str("DeviceId"),
                    outcome: Outcome::of(row.str("ActionType")),
                    account: row.str("AccountName"),
                    timestamp: parse_timestamp(row.str("Timestamp")),
                    report_id: to_text(row.get("ReportId")),
                    ingested: row.ingested_at,
                };
                self.keep(now, row.key, logon);
            }
        }
        if !identity.is_empty() {
            let answer = ctx.columns_where_borrowed(identity, &[], IDENTITY_COLUMNS)?;
            for row in answer.rows()? {
                let logon = LogonRef {
                    identity: true,
                    ip: row.str("IPAddress"),
                    device_name: row.str("DeviceName"),
                    device_id: "",
                    outcome: Outcome::of(row.str("ActionType")),
                    account: row.str("AccountUpn"),
                    timestamp: parse_timestamp(row.str("Timestamp")),
                    report_id: to_text(row.get("ReportId")),
                    ingested: row.ingested_at,
                };
                self.keep(now, row.key, logon);
            }
        }

        self.write_panes(ctx)?;
        if !batch.last {
            return Ok(());
        }
        // The window at this pass: panes ingested before `now - timeframe` leave.
        for (part, pane) in self.panes.expire(ctx, now) {
            let pid = pane_id(&pane.group, pane.ingested);
            if let Some(ids) = self.parts.get_mut(&pid) {
                ids.retain(|i| *i != part);
                if ids.is_empty() {
                    self.parts.remove(&pid);
                }
            }
            let id = group_id(&pane.group);
            if let Some(g) = self.groups.get_mut(&id) {
                for a in pane.rows.values() {
                    g.agg.apply_attempt(a, false);
                }
                if g.agg.is_empty() {
                    self.groups.remove(&id);
                }
            }
            self.dirty.insert(id);
        }
        // Decided in the order of their keys, so a pass's findings come in one order.
        let dirty = std::mem::take(&mut self.dirty);
        let mut decide: Vec<&Group> = dirty.iter().filter_map(|id| self.groups.get(id)).collect();
        decide.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        for group in decide {
            self.evaluate_group(ctx, group);
        }
        // Stored with the pass that decided every group under them: a pass cut short
        // leaves the old fingerprint, so the next one decides every group again.
        if std::mem::take(&mut self.pending.write_config) {
            ctx.state_put(CONFIG_KEY.to_vec(), self.config.fingerprint().into_bytes());
        }
        if let Some(at) = self.panes.next_expiry() {
            ctx.wake_at(at);
        }
        Ok(())
    }

    /// Takes a row into its group's aggregate and pane (unless it is already outside the
    /// window) and marks the group: also when the row was taken before (a pass retried
    /// after a crash hands its rows again, and that pass's evaluation never committed).
    fn keep(&mut self, now: i64, key: &[u8], l: LogonRef<'_>) {
        if l.ingested.saturating_add(self.config.timeframe) < now {
            return;
        }
        // The group's id, then the pane's (the group's id and the ingestion time), in one
        // buffer kept from row to row: a row whose group and pane are known copies neither.
        let mut id = std::mem::take(&mut self.scratch);
        group_id_into(&mut id, l.identity, l.ip, l.device_name, l.device_id);
        let group_len = id.len();
        push_part(&mut id, l.ingested.to_string().as_bytes());
        let (gid, pid) = (&id[..group_len], &id[..]);
        if !self.dirty.contains(gid) {
            self.dirty.insert(gid.to_vec());
        }
        let known = |p: Option<&Pane>| p.is_some_and(|p| p.rows.contains_key(key));
        let kept = || self.parts.get(pid).is_some_and(|ids| ids.iter().any(|i| known(self.panes.get(i))));
        if !known(self.fresh.get(pid)) && !kept() {
            let attempt = Attempt {
                outcome: l.outcome,
                account: l.account.to_string(),
                timestamp: l.timestamp,
                report_id: l.report_id.to_string(),
            };
            match self.groups.get_mut(gid) {
                Some(g) => g.agg.apply_attempt(&attempt, true),
                None => {
                    let mut agg = GroupAgg::default();
                    agg.apply_attempt(&attempt, true);
                    self.groups.insert(gid.to_vec(), Group { key: l.group(), agg });
                }
            }
            match self.fresh.get_mut(pid) {
                Some(pane) => {
                    pane.rows.insert(key.to_vec(), attempt);
                }
                None => {
                    let rows = BTreeMap::from([(key.to_vec(), attempt)]);
                    self.fresh.insert(pid.to_vec(), Pane { group: l.group(), ingested: l.ingested, rows });
                }
            }
        }
        self.scratch = id;
    }

    /// Writes the rows this call took in: one state record per pane, its first part under
    /// the pane's id, any later one under a part id of its own.
    fn write_panes(&mut self, ctx: &mut Context<'_>) -> Result<(), String> {
        for (pid, fresh) in std::mem::take(&mut self.fresh) {
            let ids = self.parts.entry(pid.clone()).or_default();
            let id = if ids.is_empty() { pid } else { part_id(&pid, &fresh.rows) };
            ids.push(id.clone());
            let expires = fresh.ingested.saturating_add(self.config.timeframe);
            self.panes.put(ctx, id, expires, fresh)?;
        }
        Ok(())
    }

    /// After a change of parameters: panes kept again under the new timeframe (stored
    /// with them), every group re-evaluated on this pass (whose last call stores the
    /// fingerprint). Rows stored one record each were taken into panes at `init`: their
    /// old records go.
    fn apply_pending(&mut self, ctx: &mut Context<'_>, now: i64) -> Result<(), String> {
        for (id, pane) in std::mem::take(&mut self.pending.rekeep) {
            let expires = pane.ingested.saturating_add(self.config.timeframe);
            if expires < now {
                ctx.state_delete([PANE_PREFIX, &id].concat());
                continue;
            }
            let g = self
                .groups
                .entry(group_id(&pane.group))
                .or_insert_with(|| Group { key: pane.group.clone(), agg: GroupAgg::default() });
            for a in pane.rows.values() {
                g.agg.apply_attempt(a, true);
            }
            self.parts.entry(pane_id(&pane.group, pane.ingested)).or_default().push(id.clone());
            self.panes.put(ctx, id, expires, pane)?;
        }
        for key in std::mem::take(&mut self.pending.old_rows) {
            ctx.state_delete(key);
        }
        if std::mem::take(&mut self.pending.write_kept_under) {
            ctx.state_put(KEPT_UNDER_KEY.to_vec(), self.config.timeframe.to_string().into_bytes());
        }
        if std::mem::take(&mut self.pending.all_dirty) {
            self.dirty.extend(self.groups.keys().cloned());
        }
        Ok(())
    }

    fn evaluate_group(&self, ctx: &mut Context<'_>, g: &Group) {
        let (group, agg) = (&g.key, &g.agg);
        if !agg.qualifies(&self.config) {
            return;
        }
        let summary = agg.summary();
        // `IsDC = DeviceName in~ (domaincontrollers)`, `where IsDC == false`.
        if self.dcs.contains(&group.device_name.to_ascii_lowercase()) {
            return;
        }
        let first_failed = summary.first_failed.map(format_timestamp).unwrap_or_default();
        let id = identity_key(&[&group.ip, &group.device_name, &group.device_id, &first_failed]);
        ctx.emit(FindingOut {
            inputs: vec![id],
            device_id: group.device_id.clone(),
            device_name: group.device_name.clone(),
            row: result_row(group, &summary),
        });
    }
}

/// The result row: `Timestamp` (= LastFailed) first, then the summarize's columns in
/// order, then `IsDC`. Identity-branch rows also carry the branch's `make_set_if`
/// columns (sorted), after the fixed ones.
pub fn result_row(group: &GroupKey, s: &Summary) -> Vec<(String, Cell)> {
    let mut row = vec![
        ("Timestamp".to_string(), time_cell(s.last_failed)),
        ("IPAddress".to_string(), Cell::Str(group.ip.clone())),
        ("DeviceName".to_string(), Cell::Str(group.device_name.clone())),
        ("DeviceId".to_string(), Cell::Str(group.device_id.clone())),
        ("SuccessLogonCount".to_string(), Cell::Int(s.success)),
        ("FailedLogonCount".to_string(), Cell::Int(s.failed)),
        ("UniqueAccountFailedLogons".to_string(), Cell::Int(s.unique_failed())),
        ("FirstFailed".to_string(), time_cell(s.first_failed)),
        ("LastFailed".to_string(), time_cell(s.last_failed)),
        ("LastTimestamp".to_string(), time_cell(s.last.as_ref().map(|(t, _)| *t))),
        ("ReportId".to_string(), s.last.as_ref().map_or(Cell::Null, |(_, r)| Cell::Str(r.clone()))),
        ("IsDC".to_string(), Cell::Bool(false)),
    ];
    if group.identity {
        let set = |v: &BTreeSet<String>| {
            let list: Vec<serde_json::Value> = v.iter().map(|a| serde_json::Value::String(a.clone())).collect();
            Cell::Json(serde_json::Value::Array(list).to_string())
        };
        row.push(("FailedAccounts".to_string(), set(&s.failed_accounts)));
        row.push(("SuccessAccounts".to_string(), set(&s.success_accounts)));
    }
    row
}

/// The groups' summaries over a set of records, for tests.
pub fn summarize<'a>(logons: impl IntoIterator<Item = &'a Logon>) -> BTreeMap<GroupKey, Summary> {
    let mut by: BTreeMap<GroupKey, Vec<&Logon>> = BTreeMap::new();
    for l in logons {
        by.entry(l.group.clone()).or_default().push(l);
    }
    by.into_iter().map(|(g, ls)| (g, Summary::of(ls))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(u: i64, f: i64, r: i64) -> RuleConfig {
        RuleConfig { timeframe: 1, unique_failed_accounts: u, failed_per_account: f, success_ratio: r }
    }

    fn logon(outcome: Outcome, account: &str, t: Option<i64>, report: &str) -> Logon {
        Logon {
            group: GroupKey { identity: false, ip: "10.0.0.9".into(), device_name: "h".into(), device_id: "d".into() },
            outcome,
            account: account.into(),
            timestamp: t,
            report_id: report.into(),
            ingested: 0,
        }
    }

    #[test]
    fn counts_are_exact_and_case_sensitive() {
        let ls = [
            logon(Outcome::Failed, "Admin", Some(5), "1"),
            logon(Outcome::Failed, "admin", Some(3), "2"),
            logon(Outcome::Failed, "admin", Some(9), "3"),
            logon(Outcome::Success, "bob", Some(1), "4"),
        ];
        let s = Summary::of(&ls);
        assert_eq!((s.success, s.failed, s.unique_failed()), (1, 3, 2));
        assert_eq!((s.first_failed, s.last_failed), (Some(3), Some(9)));
        assert_eq!(s.last, Some((9, "3".into())));
    }

    #[test]
    fn an_aggregate_kept_through_adds_and_removes_equals_the_summary_of_what_is_left() {
        let outcomes = [Outcome::Failed, Outcome::Success, Outcome::Other];
        let all: Vec<Logon> = (0..60)
            .map(|i| {
                let t = if i % 7 == 0 { None } else { Some((i * 37) % 11) };
                logon(outcomes[i as usize % 3], &format!("u{}", i % 5), t, &format!("{}", (i * 13) % 9))
            })
            .collect();
        let mut agg = GroupAgg::default();
        let mut kept: Vec<&Logon> = Vec::new();
        for (i, l) in all.iter().enumerate() {
            agg.apply(l, true);
            kept.push(l);
            if i % 3 == 2 {
                let gone = kept.remove(i % kept.len());
                agg.apply(gone, false);
            }
            assert_eq!(agg.summary(), Summary::of(kept.iter().copied()), "after {i}");
            let c = cfg(1, 3, 2);
            assert_eq!(agg.qualifies(&c), Summary::of(kept.iter().copied()).qualifies(&c));
        }
        for l in kept {
            agg.apply(l, false);
        }
        assert!(agg.is_empty());
        assert_eq!(agg, GroupAgg::default());
    }

    #[test]
    fn rows_kept_one_record_each_are_taken_into_panes_at_init() {
        let c = RuleConfig { timeframe: 100, ..cfg(1, 3, 2) };
        let mut logons: Vec<Logon> =
            (0..5).map(|i| logon(Outcome::Failed, &format!("u{i}"), Some(i), &i.to_string())).collect();
        logons[4].ingested = 7;
        let state: Vec<(Vec<u8>, Vec<u8>)> = logons
            .iter()
            .enumerate()
            .map(|(i, l)| ([RECORD_PREFIX, &[i as u8]].concat(), Records::<Logon>::stored_bytes(100, l).unwrap()))
            .collect();
        let rule = SprayRule::new(c, &state).unwrap();
        let group = logons[0].group.clone();
        assert_eq!(rule.groups.get(&group_id(&group)).map(|g| g.agg.summary()), Some(Summary::of(&logons)));
        assert_eq!(rule.pending.old_rows.len(), 5, "the old records are dropped with the first pass");
        let mut panes: Vec<(i64, usize)> = rule.fresh.values().map(|p| (p.ingested, p.rows.len())).collect();
        panes.sort();
        assert_eq!(panes, vec![(0, 4), (7, 1)], "one pane per group and ingestion time");
        assert!(rule.panes.is_empty(), "nothing written before a pass");
    }

    #[test]
    fn a_pane_id_is_the_identity_key_of_its_group_and_time() {
        for (identity, ip, name, id, at) in [
            (false, "10.0.0.9", "h", "d", 0),
            (true, "", "", "", -5),
            (false, "::1", "é", "x".repeat(300).as_str(), i64::MAX),
        ] {
            let group = GroupKey { identity, ip: ip.into(), device_name: name.into(), device_id: id.into() };
            let branch = if identity { "i" } else { "d" };
            assert_eq!(pane_id(&group, at), identity_key(&[branch, ip, name, id, &at.to_string()]));
            assert!(pane_id(&group, at).starts_with(&group_id(&group)));
        }
    }

    #[test]
    fn thresholds_are_strict() {
        // 21 accounts, 21 failures, no success: qualifies at the defaults.
        let mut ls: Vec<Logon> = (0..21).map(|i| logon(Outcome::Failed, &format!("u{i}"), Some(i), "1")).collect();
        let c = cfg(20, 3, 2);
        assert!(Summary::of(&ls).qualifies(&c));
        // 20 accounts is not more than 20.
        assert!(!Summary::of(&ls[..20]).qualifies(&c));
        // Success*2 < Failed: 10 successes (20 < 21) pass, 11 (22) do not.
        for _ in 0..10 {
            ls.push(logon(Outcome::Success, "s", Some(0), "1"));
        }
        assert!(Summary::of(&ls).qualifies(&c));
        ls.push(logon(Outcome::Success, "s", Some(0), "1"));
        assert!(!Summary::of(&ls).qualifies(&c));
        // Unique*3 > Failed: 2 accounts with 6 failures is exactly 3 each: no.
        let ls: Vec<Logon> = (0..6).map(|i| logon(Outcome::Failed, &format!("u{}", i % 2), Some(i), "1")).collect();
        assert!(!Summary::of(&ls).qualifies(&cfg(1, 3, 2)));
        assert!(Summary::of(&ls[..5]).qualifies(&cfg(1, 3, 2)));
        // Huge parameters do not overflow.
        assert!(Summary::of(&ls[..5]).qualifies(&cfg(i64::MIN, i64::MAX, i64::MAX)));
        assert!(!Summary::of(&ls[..5]).qualifies(&cfg(i64::MIN, i64::MIN, i64::MIN)));
    }

    #[test]
    fn arg_max_ties_prefer_the_larger_integer_report_id() {
        let ls = [
            logon(Outcome::Failed, "a", Some(7), "99"),
            logon(Outcome::Failed, "b", Some(7), "100"),
            logon(Outcome::Other, "c", Some(7), "zz"),
            logon(Outcome::Success, "c", None, "5000"),
        ];
        assert_eq!(Summary::of(&ls).last, Some((7, "100".into())));
        let rev: Vec<Logon> = ls.iter().rev().cloned().collect();
        assert_eq!(Summary::of(&rev).last, Some((7, "100".into())));
        assert!(report_rank("1") > report_rank("zz"));
    }

    #[test]
    fn identity_rows_carry_the_account_sets() {
        let mut l = logon(Outcome::Failed, "a@x", Some(1), "r1");
        l.group.identity = true;
        let s = Summary::of([&l]);
        let row = result_row(&l.group, &s);
        assert_eq!(row[0].0, "Timestamp");
        assert_eq!(row.last().map(|(n, _)| n.as_str()), Some("SuccessAccounts"));
        assert!(row.iter().any(|(n, c)| n == "FailedAccounts" && *c == Cell::Json("[\"a@x\"]".into())));
    }
}
