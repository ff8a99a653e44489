//! The rule itself, with exactly the semantics of the KQL (see the crate docs).
//!
//! Every scheduled-task execution that passes the rule's row filters (handed over by the
//! host through `only_where`) is kept as a compact [`Execution`] record until it leaves
//! the `lookback` window. An [`Index`] keeps the query's aggregates over them: which
//! `(DeviceId, SHA1)` groups are in `NewScheduledBinaryExecution`, the devices of each
//! SHA1 and the SHA1s ranked for `top`. A pass re-decides only the groups whose
//! executions changed or whose window edge passed, then walks the `top` for devices not
//! emitted yet, asks FileProfile (one host call) only for their SHA1s, and emits one
//! finding per new (SHA1, DeviceId); the host keeps each identity once. The clock alone
//! changes the result only when a group's FirstSeen or latest ingestion leaves the
//! timeframe, or an execution leaves the lookback, so the pass asks to be woken at the
//! earliest of those.

use lookout_plugin_sdk::collections::{HashMap, HashSet};
use lookout_plugin_sdk::tables::{FILE_PROFILE, PROCESS_EVENTS};
use lookout_plugin_sdk::time::parse_timestamp;
use lookout_plugin_sdk::{
    identity_key, Cell, CellRef, Cells, Condition, Context, EvalRequest, FindingOut, InputSpec, Records, Row,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

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

/// The columns an [`Execution`] is made of: all a pass fetches of a new row. The host
/// answers the fetch with the rows that pass [`static_filter`] only (it reads the
/// filter's columns itself), so they are not fetched to be checked again.
const EXECUTION_COLUMNS: &[&str] = &["Timestamp", "DeviceId", "SHA1", "DeviceName", "ReportId"];

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

/// The static row filters of `ScheduledBinaries`, as host conditions: the rows-only part
/// of the rule (`ActionType =~`, `startswith`, `contains`; all ASCII case-insensitive),
/// which the host applies to the rows it hands over and fetches.
pub fn static_filter() -> Vec<Condition> {
    vec![
        // `=~` as a one-value `in~` (the same test), so the host answers it from the index.
        Condition::In { column: "ActionType".into(), any_of: vec![ACTION_TYPE.into()] },
        Condition::StartsWith { column: "InitiatingProcessCommandLine".into(), prefix: PARENT_PREFIX.into() },
        Condition::Contains { column: "InitiatingProcessCommandLine".into(), needle: PARENT_NEEDLE.into() },
    ]
}

/// The record of a stored row, `None` when its Timestamp is not a datetime (it fails
/// `Timestamp >= ago(lookback)` whatever the time).
pub fn execution_of<R: Cells + ?Sized>(row: &R) -> Option<Execution> {
    let timestamp = parse_timestamp(row.str("Timestamp"))?;
    Some(Execution {
        device_id: row.str("DeviceId").to_string(),
        sha1: row.str("SHA1").to_string(),
        timestamp,
        ingested: row.ingested_at(),
        device_name: row.str("DeviceName").to_string(),
        report_id: match row.cell("ReportId") {
            Some(CellRef::Int(i)) => Some(i),
            _ => None,
        },
    })
}

/// A `(DeviceId, SHA1)` group of `NewScheduledBinaries`.
pub type GroupKey = (String, String);

/// The executions of one `(DeviceId, SHA1)` within the lookback, by record id. (Hashed,
/// not ordered: what is read of them — the span, the latest by a total order, the set of
/// names — does not depend on their order, and a group's row keys share their first ~80
/// bytes, which every comparison of an ordered map went through.)
#[derive(Debug, Default)]
struct Group {
    executions: HashMap<Vec<u8>, Execution>,
    /// Whether the group is in `NewScheduledBinaryExecution` at the last refresh: new
    /// (FirstSeen and LastSeen within the timeframe) with an execution ingested within it.
    active: bool,
}

impl Group {
    /// (FirstSeen, LastSeen, the latest ingestion), if it has executions.
    fn span(&self) -> Option<(i64, i64, i64)> {
        let mut it = self.executions.values();
        let first = it.next()?;
        Some(it.fold((first.timestamp, first.timestamp, first.ingested), |(lo, hi, ing), e| {
            (lo.min(e.timestamp), hi.max(e.timestamp), ing.max(e.ingested))
        }))
    }
}

/// The query's aggregates, kept as executions come and go and as the clock passes their
/// window edges, so a pass only re-decides the groups it touched or whose edge passed.
///
/// Only the clock can turn a group inactive without a row arriving: when its FirstSeen
/// or its latest ingestion leaves the timeframe (`edges`). A group can only turn active
/// when an execution arrives, or leaves the lookback and takes an older FirstSeen with it
/// (both through [`Index::add`] / [`Index::remove`]).
#[derive(Debug)]
pub struct Index {
    c: RuleConfig,
    groups: HashMap<GroupKey, Group>,
    /// `summarize MachineCount=dcount(DeviceId) by SHA1` over the active groups: the
    /// devices of each SHA1.
    devices: HashMap<String, BTreeSet<String>>,
    /// (MachineCount, SHA1) of every SHA1 with an active group: `top N by MachineCount
    /// asc` is its first N entries (ties: SHA1 in ordinal order).
    ranking: BTreeSet<(i64, String)>,
    /// When each active group next turns inactive by the clock alone.
    edges: BTreeSet<(i64, GroupKey)>,
    edge_of: HashMap<GroupKey, i64>,
    /// Groups changed since the last refresh.
    touched: HashSet<GroupKey>,
}

impl Index {
    pub fn new(c: RuleConfig) -> Index {
        Index {
            c,
            groups: HashMap::default(),
            devices: HashMap::default(),
            ranking: BTreeSet::new(),
            edges: BTreeSet::new(),
            edge_of: HashMap::default(),
            touched: HashSet::default(),
        }
    }

    pub fn add(&mut self, id: &[u8], e: &Execution) {
        let key = (e.device_id.clone(), e.sha1.clone());
        self.groups.entry(key.clone()).or_default().executions.insert(id.to_vec(), e.clone());
        self.touched.insert(key);
    }

    pub fn remove(&mut self, id: &[u8], e: &Execution) {
        let key = (e.device_id.clone(), e.sha1.clone());
        if let Some(g) = self.groups.get_mut(&key) {
            g.executions.remove(id);
        }
        self.touched.insert(key);
    }

    /// Whether the group of (DeviceId, SHA1) is in `NewScheduledBinaryExecution` at the
    /// last refresh.
    pub fn is_active(&self, device: &str, sha1: &str) -> bool {
        self.groups.get(&(device.to_string(), sha1.to_string())).is_some_and(|g| g.active)
    }

    /// Marks every group to be decided again on the next refresh (the clock went back: a
    /// group's status at an earlier time cannot be told from its status at a later one).
    pub fn touch_all(&mut self) {
        self.touched.extend(self.groups.keys().cloned());
    }

    /// Brings every group to `now`: those touched since the last refresh and those whose
    /// edge has passed. Returns the groups that turned inactive.
    pub fn refresh(&mut self, now: i64) -> Vec<GroupKey> {
        while let Some((at, _)) = self.edges.first() {
            if *at > now {
                break;
            }
            if let Some((_, key)) = self.edges.pop_first() {
                self.edge_of.remove(&key);
                self.touched.insert(key);
            }
        }
        let cutoff = now.saturating_sub(self.c.timeframe);
        let mut gone = Vec::new();
        for key in std::mem::take(&mut self.touched) {
            if let Some(at) = self.edge_of.remove(&key) {
                self.edges.remove(&(at, key.clone()));
            }
            let Some(group) = self.groups.get_mut(&key) else { continue };
            let span = group.span();
            // `FirstSeen >= ago(timeframe)` (LastSeen is later), and an execution with
            // `ingestion_time() >= ago(timeframe)`.
            let active = span.is_some_and(|(first, _, ingested)| first >= cutoff && ingested >= cutoff);
            let was = std::mem::replace(&mut group.active, active);
            if span.is_none() {
                self.groups.remove(&key);
            }
            if let (true, Some((first, _, ingested))) = (active, span) {
                let at = first.min(ingested).saturating_add(self.c.timeframe).saturating_add(1);
                self.edges.insert((at, key.clone()));
                self.edge_of.insert(key.clone(), at);
            }
            if active == was {
                continue;
            }
            let (device, sha1) = &key;
            let before = self.devices.get(sha1).map_or(0, BTreeSet::len) as i64;
            let set = self.devices.entry(sha1.clone()).or_default();
            if active {
                set.insert(device.clone());
            } else {
                set.remove(device);
            }
            let after = set.len() as i64;
            if after == 0 {
                self.devices.remove(sha1);
            }
            self.ranking.remove(&(before, sha1.clone()));
            if after > 0 {
                self.ranking.insert((after, sha1.clone()));
            }
            if !active {
                gone.push(key);
            }
        }
        gone
    }

    /// The earliest time after the last refresh at which a group turns inactive by the
    /// clock alone (an execution leaving the lookback is the records' own expiry).
    pub fn next_edge(&self) -> Option<i64> {
        self.edges.first().map(|(at, _)| *at)
    }

    /// The left side of the final join: `top N` by MachineCount ascending, `extend
    /// SHA1=tolower(SHA1)`, de-duplicated on the lowercased SHA1 (`innerunique` keeps the
    /// first row in `top` order): (lowercased SHA1, its `MachineCount`).
    pub fn left(&self) -> Vec<(String, i64)> {
        let mut left: Vec<(String, i64)> = Vec::new();
        let mut seen: HashSet<String> = HashSet::default();
        for (count, sha1) in self.ranking.iter().take(self.c.top) {
            let lower = sha1.to_lowercase();
            if seen.insert(lower.clone()) {
                left.push((lower, *count));
            }
        }
        left
    }

    /// The devices whose executions of exactly this SHA1 are in
    /// `NewScheduledBinaryExecution` (the join on SHA1 is exact).
    pub fn devices_of(&self, sha1: &str) -> impl Iterator<Item = &str> {
        self.devices.get(sha1).into_iter().flatten().map(String::as_str)
    }

    /// The findings of these devices for a left row (lowercased SHA1, MachineCount) at
    /// `now`: each device's latest joined execution and its FirstSeen/LastSeen, with the
    /// SHA1's `Devices` and `MachineCount` over every joined execution (worked out once).
    pub fn hits(&self, sha1: &str, left_machine_count: i64, devices: &[String], now: i64) -> Vec<Hit> {
        let cutoff = now.saturating_sub(self.c.timeframe);
        let group = |d: &str| self.groups.get(&(d.to_string(), sha1.to_string())).filter(|g| g.active);
        let mut names: BTreeSet<&str> = BTreeSet::new();
        for d in self.devices_of(sha1) {
            if let Some(g) = group(d) {
                names.extend(g.executions.values().filter(|e| e.ingested >= cutoff).map(|e| e.device_name.as_str()));
            }
        }
        let names: Vec<String> = names.into_iter().map(str::to_string).collect();
        let mut out = Vec::new();
        for device in devices {
            let Some(g) = group(device) else { continue };
            let Some((first_seen, last_seen, _)) = g.span() else { continue };
            let latest = g.executions.iter().filter(|(_, e)| e.ingested >= cutoff).fold(
                None,
                |best: Option<(&Vec<u8>, &Execution)>, (id, e)| match best {
                    Some((bid, be)) if !later((id, e), (bid, be)) => Some((bid, be)),
                    _ => Some((id, e)),
                },
            );
            let Some((id, e)) = latest else { continue };
            out.push(Hit {
                sha1: sha1.to_string(),
                left_machine_count,
                latest: (id.clone(), e.clone()),
                first_seen,
                last_seen,
                machine_count: names.len() as i64,
                devices: names.clone(),
            });
        }
        out
    }
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
pub struct Hit {
    /// The lowercased SHA1 (the `by` column).
    pub sha1: String,
    /// The left side's `MachineCount` (dcount of DeviceId before `top`).
    pub left_machine_count: i64,
    /// This device's latest joined execution (ties: the larger ReportId, then the larger
    /// record id): (record id, execution).
    pub latest: (Vec<u8>, Execution),
    /// `FirstSeen`, `LastSeen` of (DeviceId, SHA1) from the `lookup`.
    pub first_seen: i64,
    pub last_seen: i64,
    /// `make_set(DeviceName)` over every device of the SHA1, sorted.
    pub devices: Vec<String>,
    /// `dcount(DeviceName)` over every device of the SHA1.
    pub machine_count: i64,
}

/// `arg_max(Timestamp, …)` order: a later Timestamp, then a larger ReportId (null is
/// smallest), then a larger record id (any fixed choice; row keys are unique).
fn later(a: (&[u8], &Execution), b: (&[u8], &Execution)) -> bool {
    (a.1.timestamp, a.1.report_id, a.0) > (b.1.timestamp, b.1.report_id, b.0)
}

/// The result row of a hit: the `by` column, `Timestamp`, the rest of the joined row
/// (left: the pre-`top` MachineCount, renamed `MachineCount1` since the explicit
/// aggregate keeps the name; FileProfile's columns; right: the execution's stored
/// columns, clashes suffixed `1`, then the lookup's FirstSeen, LastSeen), then `Devices`
/// and `MachineCount`.
pub fn output_row(hit: &Hit, profile: Option<&Row>, execution: &Row) -> Vec<(String, Cell)> {
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

/// State key prefix of the identities emitted while they can still be in a result.
const EMITTED_PREFIX: &[u8] = b"e";
/// State key of the evaluation time of the last pass.
const LAST_PASS_KEY: &[u8] = b"t";
/// State key of the parameters the records and the emitted identities were kept under.
const CONFIG_KEY: &[u8] = b"p";
/// State key prefix of the lowercased SHA1s whose FileProfile fails the rule (until a
/// FileProfile row of theirs arrives): a restarted process does not ask for them again.
const FAILS_PROFILE_PREFIX: &[u8] = b"f";

impl RuleConfig {
    fn fingerprint(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}",
            self.timeframe, self.lookback, self.prevalence_threshold, self.default_prevalence, self.top
        )
    }
}

/// State key of the `lookback` the records' expiries were set with (stored with the
/// records when they are kept again, so a pass cut short cannot leave them under
/// another one unnoticed).
const KEPT_UNDER_KEY: &[u8] = b"k";

/// Work `init` leaves for the first pass (it needs a context).
#[derive(Default)]
struct Pending {
    /// The records were kept under another `lookback`: every one is kept again with the
    /// expiry the current one gives it (once, on the first call) and every group decided
    /// again.
    rekeep: bool,
    /// The `lookback` the records are kept under is to be stored (on the first call, with
    /// the records it applies to).
    write_kept_under: bool,
    /// The parameters changed (or were never stored): emitted identities whose group is
    /// not in the result are dropped, and the fingerprint is stored with the pass.
    new_config: bool,
    /// FileProfile verdicts stored under other parameters, to be deleted.
    stale_verdicts: Vec<Vec<u8>>,
}

pub struct ScheduledTaskRule {
    config: RuleConfig,
    records: Records<Execution>,
    index: Index,
    /// (lowercased SHA1, DeviceId) emitted while their group stays active: a pass only
    /// builds the rows of identities new to the result. Kept in the state, so a restart
    /// does not rebuild them either (the host would drop them).
    emitted: HashSet<(String, String)>,
    /// Whether a lowercased SHA1 passes FileProfile, as far as it has been asked;
    /// forgotten when a FileProfile row of it arrives. Those that fail are kept in the
    /// state too (`FAILS_PROFILE_PREFIX`): a SHA1 that fails is in every pass's `top` as
    /// long as its groups are new, and asking for it again after each restart (every
    /// `lookout detect`) took a fifth of a tick's pass.
    profile_ok: HashMap<String, bool>,
    /// The evaluation time the index was last brought to.
    last_pass: Option<i64>,
    pending: Pending,
}

impl ScheduledTaskRule {
    pub fn new(config: RuleConfig, state: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, String> {
        let records: Records<Execution> = Records::load(RECORDS_PREFIX, state)?;
        let mut index = Index::new(config.clone());
        for (id, e) in records.iter() {
            index.add(id, e);
        }
        // The groups as the last pass left them; the first pass here brings them to its
        // own time. Without a stored time they are all decided on that pass.
        let value = |key: &[u8]| state.iter().find(|(k, _)| k.as_slice() == key).map(|(_, v)| v.as_slice());
        let lookback = config.lookback.to_be_bytes();
        let pending = Pending {
            rekeep: value(KEPT_UNDER_KEY).is_some_and(|k| k != lookback.as_slice()),
            write_kept_under: value(KEPT_UNDER_KEY) != Some(lookback.as_slice()),
            new_config: value(CONFIG_KEY) != Some(config.fingerprint().as_bytes()),
            stale_verdicts: Vec::new(),
        };
        let mut emitted = HashSet::default();
        for (k, _) in state.iter().filter(|(k, _)| k.starts_with(EMITTED_PREFIX)) {
            emitted.insert(parse_emitted_key(&k[EMITTED_PREFIX.len()..]).ok_or("corrupt emitted identity in state")?);
        }
        let mut profile_ok = HashMap::default();
        if !pending.new_config {
            // Verdicts under other parameters are dropped on the first pass.
            for (k, _) in state.iter().filter(|(k, _)| k.starts_with(FAILS_PROFILE_PREFIX)) {
                let sha1 = std::str::from_utf8(&k[FAILS_PROFILE_PREFIX.len()..])
                    .map_err(|_| "corrupt FileProfile verdict in state")?;
                profile_ok.insert(sha1.to_string(), false);
            }
        }
        let mut last_pass = None;
        if let Some((_, t)) = state.iter().find(|(k, _)| k.as_slice() == LAST_PASS_KEY) {
            let at = t.as_slice().try_into().map(i64::from_be_bytes).map_err(|_| "corrupt last-pass time in state")?;
            if !pending.new_config {
                index.refresh(at);
                last_pass = Some(at);
            }
        }
        let stale_verdicts = if pending.new_config {
            state.iter().filter(|(k, _)| k.starts_with(FAILS_PROFILE_PREFIX)).map(|(k, _)| k.clone()).collect()
        } else {
            Vec::new()
        };
        let pending = Pending { stale_verdicts, ..pending };
        Ok(ScheduledTaskRule { config, records, index, emitted, profile_ok, last_pass, pending })
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
        if std::mem::take(&mut self.pending.rekeep) {
            // Records expire with the `lookback` they were kept under: keep them again.
            let kept: Vec<(Vec<u8>, Execution)> = self.records.iter().map(|(id, e)| (id.to_vec(), e.clone())).collect();
            for (id, e) in kept {
                self.records.put(ctx, id, e.timestamp.saturating_add(c.lookback), e)?;
            }
            self.index.touch_all();
        }
        if std::mem::take(&mut self.pending.write_kept_under) {
            ctx.state_put(KEPT_UNDER_KEY.to_vec(), c.lookback.to_be_bytes().to_vec());
        }
        for key in std::mem::take(&mut self.pending.stale_verdicts) {
            ctx.state_delete(key);
        }
        if batch.backfill {
            // A backfill is handed no FileProfile row: one that arrived since a verdict was
            // kept would never drop it. Every SHA1 is asked again.
            for (sha1, ok) in std::mem::take(&mut self.profile_ok) {
                if !ok {
                    ctx.state_delete(fails_profile_key(&sha1));
                }
            }
        }
        for r in batch.rows.iter().filter(|r| r.table == FILE_PROFILE) {
            let sha1 = r.sha1.to_lowercase();
            if self.profile_ok.remove(&sha1) == Some(false) {
                ctx.state_delete(fails_profile_key(&sha1));
            }
        }
        let keys: Vec<Vec<u8>> = batch
            .rows
            .iter()
            .filter(|r| r.table == PROCESS_EVENTS && !self.records.contains(&r.key))
            .map(|r| r.key.clone())
            .collect();
        if !keys.is_empty() {
            let answer = ctx.columns_where_borrowed(keys, &static_filter(), EXECUTION_COLUMNS)?;
            // Only rows that pass the static filters (the host applied them).
            for row in answer.rows()? {
                let Some(e) = execution_of(&row) else { continue };
                let expires = e.timestamp.saturating_add(c.lookback);
                // Already out of every window: nothing to keep.
                if expires < now {
                    continue;
                }
                self.index.add(row.key, &e);
                self.records.insert(ctx, row.key.to_vec(), expires, e)?;
            }
        }
        if !batch.last {
            return Ok(());
        }
        for (id, e) in self.records.expire(ctx, now) {
            self.index.remove(&id, &e);
        }
        if self.last_pass.is_some_and(|t| now < t) {
            self.index.touch_all();
        }
        self.last_pass = Some(now);
        for (device, sha1) in self.index.refresh(now) {
            let id = (sha1, device);
            if self.emitted.remove(&id) {
                ctx.state_delete(emitted_key(&id.0, &id.1));
            }
        }
        ctx.state_put(LAST_PASS_KEY.to_vec(), now.to_be_bytes().to_vec());
        if std::mem::take(&mut self.pending.new_config) {
            // Identities emitted under the old parameters whose group is not in this
            // result: nothing keeps them current any more.
            let stale: Vec<(String, String)> =
                self.emitted.iter().filter(|(sha1, device)| !self.index.is_active(device, sha1)).cloned().collect();
            for (sha1, device) in stale {
                ctx.state_delete(emitted_key(&sha1, &device));
                self.emitted.remove(&(sha1, device));
            }
            ctx.state_put(CONFIG_KEY.to_vec(), c.fingerprint().into_bytes());
        }
        self.emit_new(ctx, now)?;
        let wake = match (self.index.next_edge(), self.records.next_expiry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(at) = wake {
            ctx.wake_at(at);
        }
        Ok(())
    }

    /// Emits the identities of the result at `now` not emitted yet: the devices of every
    /// left row that passes FileProfile. FileProfile is asked (in one host call) only for
    /// the SHA1s that have such a device.
    fn emit_new(&mut self, ctx: &mut Context<'_>, now: i64) -> Result<(), String> {
        let left = self.index.left();
        if self.profile_ok.len() > 2 * left.len() {
            // Verdicts of SHA1s out of `top` are forgotten now and then (asked for again if
            // they come back), so there are never many more than `top` holds.
            let keep: HashSet<&str> = left.iter().map(|(s, _)| s.as_str()).collect();
            let gone: Vec<String> = self.profile_ok.keys().filter(|s| !keep.contains(s.as_str())).cloned().collect();
            for sha1 in gone {
                if self.profile_ok.remove(&sha1) == Some(false) {
                    ctx.state_delete(fails_profile_key(&sha1));
                }
            }
        }
        let fresh: Vec<(String, i64, Vec<String>)> = left
            .into_iter()
            .filter_map(|(sha1, count)| {
                let devices: Vec<String> = self
                    .index
                    .devices_of(&sha1)
                    .filter(|d| !self.emitted.contains(&(sha1.clone(), d.to_string())))
                    .map(str::to_string)
                    .collect();
                (!devices.is_empty()).then_some((sha1, count, devices))
            })
            .collect();
        // FileProfile of the SHA1s not known to fail it, in one host call.
        let ask: Vec<String> =
            fresh.iter().map(|(s, _, _)| s.clone()).filter(|s| self.profile_ok.get(s) != Some(&false)).collect();
        let mut profiles: HashMap<String, Option<Row>> = HashMap::default();
        if !ask.is_empty() {
            for (sha1, profile) in ask.iter().cloned().zip(ctx.profiles(ask.clone())?) {
                let passes = profile_passes(profile.as_ref(), &self.config);
                if !passes {
                    ctx.state_put(fails_profile_key(&sha1), Vec::new());
                }
                self.profile_ok.insert(sha1.clone(), passes);
                profiles.insert(sha1, profile);
            }
        }
        let mut hits: Vec<Hit> = Vec::new();
        for (sha1, count, devices) in fresh {
            if self.profile_ok.get(&sha1) == Some(&true) {
                hits.extend(self.index.hits(&sha1, count, &devices, now));
            }
        }
        if hits.is_empty() {
            return Ok(());
        }
        let rows: HashMap<Vec<u8>, Row> = ctx
            .rows(hits.iter().map(|h| h.latest.0.clone()).collect())?
            .into_iter()
            .map(|r| (r.key.clone(), r))
            .collect();
        for hit in &hits {
            // A row pruned by retention since it was recorded: no output row to show.
            let Some(execution) = rows.get(&hit.latest.0) else { continue };
            let profile = profiles.get(&hit.sha1).and_then(Option::as_ref);
            let device = hit.latest.1.device_id.clone();
            ctx.emit(FindingOut {
                inputs: vec![identity_key(&[&hit.sha1, &device])],
                device_id: device.clone(),
                device_name: hit.latest.1.device_name.clone(),
                row: output_row(hit, profile, execution),
            });
            ctx.state_put(emitted_key(&hit.sha1, &device), Vec::new());
            self.emitted.insert((hit.sha1.clone(), device));
        }
        Ok(())
    }
}

/// The state key of an emitted identity: the prefix, the SHA1's length (4 bytes, big
/// endian), the SHA1, the DeviceId.
fn emitted_key(sha1: &str, device: &str) -> Vec<u8> {
    [EMITTED_PREFIX, &(sha1.len() as u32).to_be_bytes(), sha1.as_bytes(), device.as_bytes()].concat()
}

/// The state key of a lowercased SHA1 whose FileProfile fails the rule.
fn fails_profile_key(sha1: &str) -> Vec<u8> {
    [FAILS_PROFILE_PREFIX, sha1.as_bytes()].concat()
}

/// (SHA1, DeviceId) of an emitted key, after its prefix.
fn parse_emitted_key(b: &[u8]) -> Option<(String, String)> {
    let len = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let sha1 = b.get(4..4usize.checked_add(len)?)?;
    let device = &b[4 + len..];
    Some((String::from_utf8(sha1.to_vec()).ok()?, String::from_utf8(device.to_vec()).ok()?))
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

    /// The index of the records still in the lookback at `now`, brought to `now`.
    fn index(records: &[(Vec<u8>, Execution)], now: i64, c: &RuleConfig) -> Index {
        let mut ix = Index::new(c.clone());
        for (k, e) in records.iter().filter(|(_, e)| e.timestamp.saturating_add(c.lookback) >= now) {
            ix.add(k, e);
        }
        ix.refresh(now);
        ix
    }

    /// Every hit at `now` with every profile passing: (SHA1, DeviceId, MachineCount).
    fn hits_of(ix: &Index, now: i64) -> Vec<Hit> {
        let mut out = Vec::new();
        for (sha1, count) in ix.left() {
            let devices: Vec<String> = ix.devices_of(&sha1).map(str::to_string).collect();
            out.extend(ix.hits(&sha1, count, &devices, now));
        }
        out
    }

    fn run(records: &[(Vec<u8>, Execution)], now: i64, c: &RuleConfig) -> Vec<(String, String, i64)> {
        let ix = index(records, now, c);
        let mut out: Vec<(String, String, i64)> =
            hits_of(&ix, now).into_iter().map(|h| (h.sha1, h.latest.1.device_id.clone(), h.machine_count)).collect();
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
        let mut ix = index(&records, now, &c);
        assert_eq!(ix.next_edge(), Some(now + 1));
        assert_eq!(ix.refresh(now), vec![], "nothing changes before the edge");
        assert_eq!(ix.refresh(now + 1), vec![("d1".to_string(), "aa".to_string())], "the edge turns it inactive");
        assert_eq!(ix.next_edge(), None, "only the record's own expiry is left");
    }

    #[test]
    fn an_index_taken_back_in_time_decides_every_group_again() {
        let c = cfg(5);
        let now = 100 * DAY;
        let records = vec![(b"1".to_vec(), ex("d1", "aa", now - DAY, now - DAY, 1))];
        let mut ix = index(&records, now + 2 * DAY, &c);
        assert!(hits_of(&ix, now + 2 * DAY).is_empty(), "out of the timeframe by then");
        ix.touch_all();
        ix.refresh(now);
        assert_eq!(hits_of(&ix, now), hits_of(&index(&records, now, &c), now));
        assert_eq!(hits_of(&ix, now).len(), 1);
    }

    #[test]
    fn an_index_kept_across_passes_equals_one_built_at_the_end() {
        let c = cfg(2);
        let t0 = 100 * DAY;
        let all: Vec<(Vec<u8>, Execution)> = (0..40)
            .map(|i| {
                let at = t0 + i * DAY / 4;
                (vec![i as u8], ex(&format!("d{}", i % 3), ["aa", "bb", "AA", "cc"][(i % 4) as usize], at, at, i))
            })
            .collect();
        let mut ix = Index::new(c.clone());
        let mut kept: Vec<(Vec<u8>, Execution)> = Vec::new();
        for (step, chunk) in all.chunks(3).enumerate() {
            let now = t0 + (step as i64 + 1) * DAY;
            for (k, e) in chunk {
                ix.add(k, e);
                kept.push((k.clone(), e.clone()));
            }
            for (k, e) in kept.iter().filter(|(_, e)| e.timestamp.saturating_add(c.lookback) < now) {
                ix.remove(k, e);
            }
            kept.retain(|(_, e)| e.timestamp.saturating_add(c.lookback) >= now);
            ix.refresh(now);
            let fresh = index(&kept, now, &c);
            assert_eq!(hits_of(&ix, now), hits_of(&fresh, now), "at step {step}");
            assert_eq!(ix.next_edge(), fresh.next_edge(), "at step {step}");
        }
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
        let records = vec![(b"1".to_vec(), ex("d1", "aa", t, t, 9)), (b"2".to_vec(), ex("d1", "aa", t, t, 10))];
        let h = hits_of(&index(&records, now, &cfg(5)), now);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].latest.1.report_id, Some(10));
    }

    #[test]
    fn emitted_keys_read_back() {
        let k = emitted_key("ab\0c", "dev\0ice");
        assert_eq!(parse_emitted_key(&k[EMITTED_PREFIX.len()..]), Some(("ab\0c".to_string(), "dev\0ice".to_string())));
        assert_eq!(parse_emitted_key(&[0, 0, 0, 9, b'a']), None);
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
        let is_scheduled_execution = |row: &Row| lookout_plugin_sdk::all_match(&static_filter(), row);
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
