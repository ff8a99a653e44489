//! The rule itself, with exactly the semantics of the KQL (see the crate docs).

use lookout_plugin_sdk::schema::{self, ColumnType};
use lookout_plugin_sdk::tables::{FILE_CERTIFICATES, NETWORK_EVENTS, PROCESS_EVENTS};
use lookout_plugin_sdk::time::{datetime_diff_seconds, format_timestamp, parse_timestamp, TICKS_PER_SEC};
use lookout_plugin_sdk::{
    identity_key, Cell, CellRef, Cells, Condition, Context, EvalRequest, FindingOut, InputSpec, Records, Row, RowView,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

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

/// The columns a [`Connection`] and a [`Child`] are made of (with those their filters
/// read): all a pass fetches of a new row.
const CONNECTION_COLUMNS: &[&str] =
    &["InitiatingProcessFileName", "ActionType", "InitiatingProcessId", "Timestamp", "DeviceId", "ReportId"];
const CHILD_COLUMNS: &[&str] = &[
    "InitiatingProcessFileName",
    "ActionType",
    "InitiatingProcessId",
    "Timestamp",
    "InitiatingProcessCreationTime",
    "DeviceId",
    "SHA1",
    "FileName",
    "ProcessCommandLine",
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
    /// `Timestamp` as stored. Not read: the identity takes the instant (`at`); kept so
    /// the records stored by earlier versions still decode.
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

/// The join key (DeviceId, InitiatingProcessId, InitiatingProcessFileName), exact.
type JoinKey = (String, i64, String);

/// A joined pair: (network record id, child record id).
type Pair = (Vec<u8>, Vec<u8>);

/// State key of the parameters the pairs were last decided under.
const CONFIG_KEY: &[u8] = b"p";
/// State key of the `timeframe` the records' expiries were set with (stored with the
/// records when they are kept again, so a pass cut short cannot leave them under
/// another one unnoticed).
const KEPT_UNDER_KEY: &[u8] = b"k";

/// The pairs of the `join` that pass the time conditions, kept as the records come and
/// go, so a pass only decides what it changed: the pairs it formed, and the pairs of a
/// SHA1 whose count fell below the threshold. Rebuilt from the records at `init`.
#[derive(Default)]
struct Pairs {
    /// Records by join key, then by the second of their Timestamp (the time condition
    /// is on whole seconds), so a new row meets only the rows within 10 s of it.
    connections_by_key: HashMap<JoinKey, BTreeSet<(i64, Vec<u8>)>>,
    children_by_key: HashMap<JoinKey, BTreeSet<(i64, Vec<u8>)>>,
    /// The partners of each record (a network id's child ids, a child id's network ids).
    of_connection: HashMap<Vec<u8>, BTreeSet<Vec<u8>>>,
    of_child: HashMap<Vec<u8>, BTreeSet<Vec<u8>>>,
    /// `summarize count() by SHA1`: the pairs of each child SHA1, with when each leaves
    /// the window (the earlier ingestion of its two rows + timeframe).
    by_sha1: HashMap<String, BTreeSet<(i64, Pair)>>,
    /// Each SHA1's pair count when this pass first changed it.
    count_at_start: HashMap<String, usize>,
    /// Pairs formed in this pass, to decide at its end.
    formed: BTreeSet<Pair>,
    /// Pairs not emitted only because their SHA1 had `threshold` pairs or more, by SHA1:
    /// they are decided again when the count falls below it.
    blocked: HashMap<String, BTreeSet<Pair>>,
}

impl Pairs {
    fn count(&self, sha1: &str) -> usize {
        self.by_sha1.get(sha1).map_or(0, BTreeSet::len)
    }

    fn note_count(&mut self, sha1: &str) {
        if !self.count_at_start.contains_key(sha1) {
            let n = self.count(sha1);
            self.count_at_start.insert(sha1.to_string(), n);
        }
    }

    fn add(&mut self, n: (&[u8], &Connection), c: (&[u8], &Child), timeframe: i64) {
        if !times_pass(n.1.at, c.1.at, c.1.services_started) {
            return;
        }
        self.note_count(&c.1.sha1);
        let expires = n.1.ingested_at.min(c.1.ingested_at).saturating_add(timeframe);
        let pair = (n.0.to_vec(), c.0.to_vec());
        self.of_connection.entry(pair.0.clone()).or_default().insert(pair.1.clone());
        self.of_child.entry(pair.1.clone()).or_default().insert(pair.0.clone());
        self.by_sha1.entry(c.1.sha1.clone()).or_default().insert((expires, pair.clone()));
        self.formed.insert(pair);
    }

    fn remove(&mut self, pair: Pair, n: &Connection, c: &Child, timeframe: i64) {
        self.note_count(&c.sha1);
        let expires = n.ingested_at.min(c.ingested_at).saturating_add(timeframe);
        if let Some(set) = self.by_sha1.get_mut(&c.sha1) {
            set.remove(&(expires, pair.clone()));
            if set.is_empty() {
                self.by_sha1.remove(&c.sha1);
            }
        }
        if let Some(set) = self.blocked.get_mut(&c.sha1) {
            set.remove(&pair);
            if set.is_empty() {
                self.blocked.remove(&c.sha1);
            }
        }
        self.formed.remove(&pair);
    }
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
fn long<R: Cells + ?Sized>(row: &R, column: &str) -> Option<i64> {
    match row.cell(column) {
        Some(CellRef::Int(i)) => Some(i),
        _ => None,
    }
}

/// A datetime column: parsed ISO text, or nothing.
fn datetime<R: Cells + ?Sized>(row: &R, column: &str) -> Option<i64> {
    match row.cell(column) {
        Some(CellRef::Str(s)) => parse_timestamp(s),
        _ => None,
    }
}

/// A column's value as identity text: a string as is, anything else as JSON text (a
/// missing column as `""`).
fn text<R: Cells + ?Sized>(row: &R, column: &str) -> String {
    match row.cell(column) {
        Some(CellRef::Str(s)) => s.to_string(),
        Some(c) => Cell::from(c).to_json().to_string(),
        None => String::new(),
    }
}

/// The whole second of a time (`datetime_diff("Second", …)` counts these).
fn second(at: i64) -> i64 {
    at.div_euclid(TICKS_PER_SEC)
}

/// The ids in `set` whose second is within `from..=to`.
fn ids_between(set: Option<&BTreeSet<(i64, Vec<u8>)>>, from: i64, to: i64) -> Vec<Vec<u8>> {
    let Some(set) = set else { return Vec::new() };
    set.range((from, Vec::new())..).take_while(|(s, _)| *s <= to).map(|(_, id)| id.clone()).collect()
}

/// Children a connection at `at` can pair with: 0 to 10 whole seconds after it.
fn children_near(by_key: &HashMap<JoinKey, BTreeSet<(i64, Vec<u8>)>>, key: &JoinKey, at: i64) -> Vec<Vec<u8>> {
    ids_between(by_key.get(key), second(at), second(at).saturating_add(10))
}

/// Connections a child at `at` can pair with: 0 to 10 whole seconds before it.
fn connections_near(by_key: &HashMap<JoinKey, BTreeSet<(i64, Vec<u8>)>>, key: &JoinKey, at: i64) -> Vec<Vec<u8>> {
    ids_between(by_key.get(key), second(at).saturating_sub(10), second(at))
}

fn join_key(device: &str, process_id: i64, process: &str) -> JoinKey {
    (device.to_string(), process_id, process.to_string())
}

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
    pairs: Pairs,
    /// Every pair is decided on the next pass: the parameters changed, or a backfill.
    decide_all: bool,
    /// The parameters' fingerprint is to be stored with the next pass.
    write_config: bool,
    /// The records are to be kept again under this `timeframe` (they expire with the one
    /// they were stored under).
    rekeep: bool,
    /// The `timeframe` the records are kept under is to be stored (on the first call).
    write_kept_under: bool,
}

impl RuleConfig {
    /// What the stored decisions depend on.
    fn fingerprint(&self) -> String {
        format!("{}/{}/{}", self.timeframe, self.prevalence_threshold, self.lolbins.join(","))
    }
}

impl ScmRule {
    pub fn new(config: RuleConfig, state: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, String> {
        let stored = state.iter().find(|(k, _)| k.as_slice() == CONFIG_KEY).map(|(_, v)| v.as_slice());
        let same_config = stored == Some(config.fingerprint().as_bytes());
        let kept_under = state.iter().find(|(k, _)| k.as_slice() == KEPT_UNDER_KEY).map(|(_, v)| v.as_slice());
        let timeframe = config.timeframe.to_be_bytes();
        let mut rule = ScmRule {
            connections: Records::load(NETWORK_PREFIX, state)?,
            children: Records::load(CHILD_PREFIX, state)?,
            emitted: Records::load(EMITTED_PREFIX, state)?,
            certified: HashMap::new(),
            pairs: Pairs::default(),
            decide_all: !same_config,
            write_config: !same_config,
            rekeep: kept_under.is_some_and(|k| k != timeframe.as_slice()),
            write_kept_under: kept_under != Some(timeframe.as_slice()),
            config,
        };
        rule.rebuild_pairs();
        Ok(rule)
    }

    /// The join over the loaded records, and which of its pairs an earlier pass left
    /// waiting for their SHA1's count to fall (certificates are not known here: a pair
    /// of a certified SHA1 counts as waiting, which at worst wakes a pass that finds
    /// nothing).
    fn rebuild_pairs(&mut self) {
        let timeframe = self.config.timeframe;
        let mut pairs = Pairs::default();
        for (id, n) in self.connections.iter() {
            let key = join_key(&n.device, n.process_id, &n.process);
            pairs.connections_by_key.entry(key).or_default().insert((second(n.at), id.to_vec()));
        }
        for (cid, c) in self.children.iter() {
            let key = join_key(&c.device, c.process_id, &c.process);
            for nid in connections_near(&pairs.connections_by_key, &key, c.at) {
                if let Some(n) = self.connections.get(&nid) {
                    pairs.add((&nid, n), (cid, c), timeframe);
                }
            }
            pairs.children_by_key.entry(key).or_default().insert((second(c.at), cid.to_vec()));
        }
        for (sha1, set) in &pairs.by_sha1 {
            if (set.len() as i64) < self.config.prevalence_threshold {
                continue;
            }
            for (_, pair) in set {
                let (Some(n), Some(c)) = (self.connections.get(&pair.0), self.children.get(&pair.1)) else { continue };
                if c.msiexec
                    || is_lolbin(&self.config.lolbins, &c.file_name)
                    || self.emitted.contains(&identity_of(n, c))
                {
                    continue;
                }
                pairs.blocked.entry(sha1.clone()).or_default().insert(pair.clone());
            }
        }
        pairs.formed.clear();
        pairs.count_at_start.clear();
        self.pairs = pairs;
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
        if batch.backfill {
            self.decide_all = true;
        }
        if std::mem::take(&mut self.rekeep) {
            self.keep_again(ctx)?;
        }
        if std::mem::take(&mut self.write_kept_under) {
            ctx.state_put(KEPT_UNDER_KEY.to_vec(), self.config.timeframe.to_be_bytes().to_vec());
        }
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
            let answer = ctx.columns_where_borrowed(network_keys, &network_filter(), CONNECTION_COLUMNS)?;
            for row in answer.rows()? {
                self.take_connection(ctx, &row, cutoff)?;
            }
        }
        if !child_keys.is_empty() {
            let answer = ctx.columns_where_borrowed(child_keys, &child_filter(), CHILD_COLUMNS)?;
            for row in answer.rows()? {
                self.take_child(ctx, &row, cutoff)?;
            }
        }
        if !batch.last {
            return Ok(());
        }

        self.expire(ctx, now);
        self.emitted.expire(ctx, now);
        if std::mem::take(&mut self.write_config) {
            ctx.state_put(CONFIG_KEY.to_vec(), self.config.fingerprint().into_bytes());
        }
        if let Some(at) = self.emit_new(ctx)? {
            ctx.wake_at(at);
        }
        Ok(())
    }

    /// After a change of parameters: every record kept again with the expiry the current
    /// `timeframe` gives it (those already out of the window leave on this pass).
    fn keep_again(&mut self, ctx: &mut Context<'_>) -> Result<(), String> {
        let timeframe = self.config.timeframe;
        let connections: Vec<(Vec<u8>, Connection)> =
            self.connections.iter().map(|(id, n)| (id.to_vec(), n.clone())).collect();
        for (id, n) in connections {
            self.connections.put(ctx, id, n.ingested_at.saturating_add(timeframe), n)?;
        }
        let children: Vec<(Vec<u8>, Child)> = self.children.iter().map(|(id, c)| (id.to_vec(), c.clone())).collect();
        for (id, c) in children {
            self.children.put(ctx, id, c.ingested_at.saturating_add(timeframe), c)?;
        }
        Ok(())
    }

    /// Drops the records that left the window, and their pairs.
    fn expire(&mut self, ctx: &mut Context<'_>, now: i64) {
        let timeframe = self.config.timeframe;
        let gone_connections: HashMap<Vec<u8>, Connection> = self.connections.expire(ctx, now).into_iter().collect();
        let gone_children: HashMap<Vec<u8>, Child> = self.children.expire(ctx, now).into_iter().collect();
        for (nid, n) in &gone_connections {
            let key = join_key(&n.device, n.process_id, &n.process);
            if let Some(ids) = self.pairs.connections_by_key.get_mut(&key) {
                ids.remove(&(second(n.at), nid.clone()));
                if ids.is_empty() {
                    self.pairs.connections_by_key.remove(&key);
                }
            }
            for cid in self.pairs.of_connection.remove(nid).unwrap_or_default() {
                if let Some(partners) = self.pairs.of_child.get_mut(&cid) {
                    partners.remove(nid);
                }
                let c = self.children.get(&cid).or_else(|| gone_children.get(&cid));
                if let Some(c) = c {
                    self.pairs.remove((nid.clone(), cid.clone()), n, c, timeframe);
                }
            }
        }
        for (cid, c) in &gone_children {
            let key = join_key(&c.device, c.process_id, &c.process);
            if let Some(ids) = self.pairs.children_by_key.get_mut(&key) {
                ids.remove(&(second(c.at), cid.clone()));
                if ids.is_empty() {
                    self.pairs.children_by_key.remove(&key);
                }
            }
            // Pairs with a connection that also left were removed above.
            for nid in self.pairs.of_child.remove(cid).unwrap_or_default() {
                if let Some(partners) = self.pairs.of_connection.get_mut(&nid) {
                    partners.remove(cid);
                }
                if let Some(n) = self.connections.get(&nid) {
                    self.pairs.remove((nid.clone(), cid.clone()), n, c, timeframe);
                }
            }
        }
    }

    /// Keeps an inbound `services.exe` connection that can still join (in the window, with
    /// a process id), and joins it with the children kept.
    fn take_connection(&mut self, ctx: &mut Context<'_>, row: &RowView<'_>, cutoff: i64) -> Result<(), String> {
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
        let key = join_key(&record.device, process_id, &record.process);
        let expires = row.ingested_at.saturating_add(self.config.timeframe);
        // Kept already when a pass cut short is run again and hands its rows again: the
        // record is joined again all the same, so its pairs are decided on this pass.
        let id = row.key.to_vec();
        self.connections.insert(ctx, id.clone(), expires, record.clone())?;
        for cid in children_near(&self.pairs.children_by_key, &key, at) {
            if let Some(c) = self.children.get(&cid) {
                self.pairs.add((&id, &record), (&cid, c), self.config.timeframe);
            }
        }
        self.pairs.connections_by_key.entry(key).or_default().insert((second(at), id));
        Ok(())
    }

    /// Keeps a `services.exe` child that can still join (in the window, with a process id
    /// and a services.exe creation time), and joins it with the connections kept.
    fn take_child(&mut self, ctx: &mut Context<'_>, row: &RowView<'_>, cutoff: i64) -> Result<(), String> {
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
        let key = join_key(&record.device, process_id, &record.process);
        let expires = row.ingested_at.saturating_add(self.config.timeframe);
        // As for connections: a row handed again is joined again.
        let id = row.key.to_vec();
        self.children.insert(ctx, id.clone(), expires, record.clone())?;
        for nid in connections_near(&self.pairs.connections_by_key, &key, at) {
            if let Some(n) = self.connections.get(&nid) {
                self.pairs.add((&nid, n), (&id, &record), self.config.timeframe);
            }
        }
        self.pairs.children_by_key.entry(key).or_default().insert((second(at), id));
        Ok(())
    }

    /// Decides the pairs this pass changed and emits the identities not emitted yet.
    /// Returns when the clock alone can next change the result.
    ///
    /// A pair is decided when it is formed. Its answer can change later only through its
    /// SHA1's count (certificates only ever appear, and the rest is fixed by the pair), and
    /// the count only falls as the clock moves: so the pairs left waiting for it are
    /// decided again when it falls below the threshold, and the pass asks to be woken
    /// when the first pair of a SHA1 with waiting pairs leaves the window.
    fn emit_new(&mut self, ctx: &mut Context<'_>) -> Result<Option<i64>, String> {
        let threshold = self.config.prevalence_threshold;
        let below = |n: usize| (n as i64) < threshold;
        let mut to_decide: BTreeSet<Pair> = std::mem::take(&mut self.pairs.formed);
        let count_at_start = std::mem::take(&mut self.pairs.count_at_start);
        if std::mem::take(&mut self.decide_all) {
            self.pairs.blocked.clear();
            to_decide.extend(self.pairs.by_sha1.values().flatten().map(|(_, p)| p.clone()));
        } else {
            for (sha1, was) in count_at_start {
                if !below(was) && below(self.pairs.count(&sha1)) {
                    if let Some(waiting) = self.pairs.blocked.remove(&sha1) {
                        to_decide.extend(waiting);
                    }
                }
            }
        }

        let mut wanted: BTreeMap<Vec<u8>, Pending> = BTreeMap::new();
        for pair in to_decide {
            let (Some(n), Some(c)) = (self.connections.get(&pair.0), self.children.get(&pair.1)) else { continue };
            if c.msiexec {
                continue;
            }
            let identity = identity_of(n, c);
            if self.emitted.contains(&identity) || wanted.contains_key(&identity) {
                continue;
            }
            let expires = n.ingested_at.min(c.ingested_at).saturating_add(self.config.timeframe);
            let pending = Pending { network: pair.0.clone(), child: pair.1.clone(), expires };
            if is_lolbin(&self.config.lolbins, &c.file_name) {
                wanted.insert(identity, pending);
                continue;
            }
            let (sha1, device) = (c.sha1.clone(), c.device.clone());
            if has_certificate(ctx, &mut self.certified, &sha1, &device)? {
                continue;
            }
            if below(self.pairs.count(&sha1)) {
                wanted.insert(identity, pending);
            } else {
                self.pairs.blocked.entry(sha1).or_default().insert(pair);
            }
        }
        let wake = self
            .pairs
            .blocked
            .keys()
            .filter_map(|sha1| self.pairs.by_sha1.get(sha1).and_then(|set| set.first()))
            .map(|(expires, _)| expires.saturating_add(1))
            .min();
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

/// A pair's finding identity (SEMANTICS.md): (DeviceId, the network row's ReportId,
/// TimestampChild, the child's SHA1). TimestampChild is a datetime in KQL: two spellings
/// of one instant (`…03.5Z`, `…03.5000000Z`) are one value, so it goes in as the instant,
/// written one way.
fn identity_of(n: &Connection, c: &Child) -> Vec<u8> {
    identity_key(&[&n.device, &n.report, &format_timestamp(c.at), &c.sha1])
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
        // `=~` as a one-value `in~` (the same test), so the host answers it from the index.
        Condition::In { column: "InitiatingProcessFileName".into(), any_of: vec![SERVICES.into()] },
        Condition::EqCi { column: "ActionType".into(), value: CREATED.into() },
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
/// `TimestampNetworkAct`) — those it was stored with, then any other of DeviceNetworkEvents'
/// schema, empty or null as KQL's table has them —, the child's projected columns (clashes
/// suffixed), then `Timestamp = TimestampNetworkAct`.
pub fn output_row(network: &Row, child: &Row) -> Vec<(String, Cell)> {
    let rename = |n: &str| if n == "Timestamp" { "TimestampNetworkAct".to_string() } else { n.to_string() };
    let mut row: Vec<(String, Cell)> = network.columns.iter().map(|(n, c)| (rename(n), c.clone())).collect();
    for (name, kind) in schema::columns(NETWORK_EVENTS).unwrap_or_default() {
        let name = rename(name);
        if !row.iter().any(|(n, _)| *n == name) {
            row.push((name, if kind == ColumnType::String { Cell::Str(String::new()) } else { Cell::Null }));
        }
    }
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
        let stored = [
            "TimestampNetworkAct",
            "DeviceId",
            "DeviceName",
            "ActionType",
            "InitiatingProcessFileName",
            "InitiatingProcessId",
            "DeviceId1",
            "ReportId",
        ];
        // Every other column of DeviceNetworkEvents, in the schema's order, as KQL's table
        // has it: a clash with the child's is a clash whether the row had it or not.
        let absent: Vec<&str> = schema::columns(NETWORK_EVENTS)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| *n != "Timestamp" && !stored.contains(n))
            .collect();
        assert!(absent.contains(&"InitiatingProcessCommandLine") && absent.contains(&"RemoteIP"), "{absent:?}");
        let child_part = [
            "TimestampChild",
            "DeviceId2",
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
        ];
        let want: Vec<&str> = stored.iter().chain(&absent).chain(&child_part).copied().collect();
        assert_eq!(names, want);
        let get = |n: &str| out.iter().find(|(x, _)| x == n).map(|(_, c)| c.clone()).unwrap();
        assert_eq!(get("Timestamp"), s("2025-05-07T12:00:00Z"));
        assert_eq!(get("TimestampChild"), s("2025-05-07T12:00:03Z"));
        assert_eq!(get("TimestampServicesExe"), s("2025-05-07T08:00:00Z"));
        assert_eq!(get("ProcessCommandLine"), s(""), "a missing string column is empty");
        assert_eq!(get("ReportId"), Cell::Int(5), "the network row's ReportId");
        assert_eq!(get("RemoteIP"), s(""), "a network column the row lacks is empty");
        assert_eq!(get("RemotePort"), Cell::Null, "and a long one null");
        assert_eq!(get("InitiatingProcessCommandLine"), s(""), "the network side's, absent");
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
