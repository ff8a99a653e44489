//! The rule itself, with exactly the semantics of the KQL (see the crate docs).

use lookout_plugin_sdk::tables::{FILE_EVENTS, FILE_PROFILE, IMAGE_LOADS};
use lookout_plugin_sdk::time::parse_timestamp;
use lookout_plugin_sdk::{Cell, CellRef, Condition, Context, EvalRequest, InputSpec, Row};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

/// The columns `invoke FileProfile()` adds, in Defender's order. Missing ones read as
/// `""` for strings and null otherwise.
const PROFILE_COLUMNS: &[(&str, bool)] = &[
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

const WRITE_ACTIONS: &[&str] = &["FileCreated", "FileRenamed", "FileModified"];

#[derive(Debug, Clone)]
pub struct RuleConfig {
    pub timeframe: i64,
    pub lookback: i64,
    pub prevalence_threshold: i64,
    pub default_prevalence: i64,
    pub initiating_process: String,
    pub excluded_prefix: String,
}

/// State key prefix for the candidate-SHA1 set: `c` + lowercase SHA1 → newest ingestion
/// time (i64 BE) of a load of that SHA1 that passed the plugin filters.
const CANDIDATE_PREFIX: u8 = b'c';

pub struct WinrmRule {
    config: RuleConfig,
    candidates: HashMap<String, i64>,
}

/// A load that passed every PotentialPlugins filter, with its FileProfile columns.
struct Plugin {
    load: Row,
    profile: Option<Row>,
}

impl WinrmRule {
    pub fn new(config: RuleConfig, state: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, String> {
        let mut candidates = HashMap::new();
        for (k, v) in state {
            if k.first() != Some(&CANDIDATE_PREFIX) {
                continue;
            }
            let sha1 = String::from_utf8(k[1..].to_vec()).map_err(|_| "corrupt candidate key in state".to_string())?;
            let at = <[u8; 8]>::try_from(v.as_slice()).map_err(|_| "corrupt candidate value in state".to_string())?;
            candidates.insert(sha1, i64::from_be_bytes(at));
        }
        Ok(WinrmRule { config, candidates })
    }

    /// Loads by the initiating process only (the host filters, from its index); writes
    /// and profiles only as they arrive, since a backfill reaches the stored ones by
    /// look-ups from the loads.
    pub fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec { table: IMAGE_LOADS.into(), only_where: self.load_filter(), on_backfill: true },
            InputSpec { table: FILE_EVENTS.into(), only_where: vec![self.candidate_filter()], on_backfill: false },
            InputSpec { table: FILE_PROFILE.into(), only_where: Vec::new(), on_backfill: false },
        ]
    }

    /// `where SHA1 in~ (PotentialPlugins | project SHA1)` for new writes, with the
    /// candidate set as it stands: the host checks it from the row keys, so writes of
    /// other files are never handed over. A write of a file that becomes a candidate in
    /// a later pass is still found, by that pass's look-up from the load.
    fn candidate_filter(&self) -> Condition {
        let mut any_of: Vec<String> = self.candidates.keys().cloned().collect();
        any_of.sort();
        Condition::In { column: "SHA1".into(), any_of }
    }

    /// `where InitiatingProcessFileName =~ process` (nothing for `*`).
    fn process_filter(&self) -> Vec<Condition> {
        let process = &self.config.initiating_process;
        if process == "*" {
            return Vec::new();
        }
        vec![Condition::In { column: "InitiatingProcessFileName".into(), any_of: vec![process.clone()] }]
    }

    /// Both load conditions that need nothing but the row: with the host's index of
    /// InitiatingProcessFileName (which keeps FolderPath), no load that fails them is read.
    fn load_filter(&self) -> Vec<Condition> {
        let mut filter = self.process_filter();
        filter.push(self.folder_filter());
        filter
    }

    /// `where FolderPath !startswith excluded_prefix`.
    fn folder_filter(&self) -> Condition {
        Condition::NotStartsWith { column: "FolderPath".into(), prefix: self.config.excluded_prefix.clone() }
    }

    pub fn evaluate(&mut self, batch: &EvalRequest, ctx: &mut Context<'_>) -> Result<(), String> {
        let now = ctx.now();
        let load_cutoff = now.saturating_sub(self.config.timeframe);
        let write_cutoff = now.saturating_sub(self.config.lookback);

        // Loads grouped by SHA1: FileProfile (availability, prevalence) depends on the SHA1
        // alone, so the loads of a prevalent file are never fetched.
        let mut load_keys: HashMap<&str, Vec<Vec<u8>>> = HashMap::new();
        let mut profile_sha1s = HashSet::new();
        let mut probing_writes = Vec::new();
        for r in &batch.rows {
            match r.table.as_str() {
                IMAGE_LOADS => load_keys.entry(r.sha1.as_str()).or_default().push(r.key.clone()),
                FILE_PROFILE => {
                    profile_sha1s.insert(r.sha1.as_str());
                }
                // `SHA1 in~ (PotentialPlugins | project SHA1)`: a hash probe, before any
                // row is decoded.
                FILE_EVENTS if self.is_candidate(&r.sha1, load_cutoff) => probing_writes.push(r.key.clone()),
                _ => {}
            }
        }

        // Loads to (re-)evaluate: the new ones, and the stored ones whose profile changed.
        // The host handed over only loads by the initiating process outside the excluded
        // folder; `potential_plugin` checks every filter again on the fetched row.
        // Every FileProfile the pass needs first, in one call.
        let mut profiles = ProfileCache::default();
        profiles.prefetch(load_keys.keys().chain(profile_sha1s.iter()).copied(), ctx)?;
        // The stored loads of every SHA1 whose profile changed and now qualifies, in one
        // host call: the host reads each block they lie in once.
        let mut changed = Vec::new();
        for sha1 in profile_sha1s {
            if self.profile_qualifies(sha1, ctx, &mut profiles)? {
                changed.push(sha1);
            }
        }
        changed.sort_unstable();
        // A new load of such a SHA1 is among that look-up's answers, so it is not fetched
        // by key as well. That holds because the look-up's filter (`load_filter`, also the
        // loads' input filter) turns away no load that `potential_plugin` would keep: a
        // condition added there must be one `potential_plugin` checks too. (The WinRM
        // property test's `the_newest_of_two_profiles_in_one_tick_wins` has a load and its
        // profile in one pass.)
        let mut wanted = Vec::new();
        for (sha1, keys) in load_keys {
            if changed.binary_search(&sha1).is_err() && self.profile_qualifies(sha1, ctx, &mut profiles)? {
                wanted.extend(keys);
            }
        }
        let mut loads = if wanted.is_empty() { Vec::new() } else { ctx.rows(wanted)? };
        if !changed.is_empty() {
            let changed = changed.iter().map(|s| (s.to_string(), None)).collect();
            loads.extend(ctx.lookup_many(IMAGE_LOADS, changed, &self.load_filter())?.into_iter().flatten());
        }
        let mut seen_loads = HashSet::new();
        loads.retain(|l| seen_loads.insert(l.key.clone()));

        let candidates_before = self.candidates.len();
        let mut candidates_changed = false;
        let mut emitted = HashSet::new();
        let mut plugins = Vec::new();
        for load in loads {
            let Some(plugin) = self.potential_plugin(load, load_cutoff, ctx, &mut profiles)? else { continue };
            let lower = plugin.load.str("SHA1").to_ascii_lowercase();
            let entry = self.candidates.entry(lower.clone()).or_insert(i64::MIN);
            if plugin.load.ingested_at > *entry {
                *entry = plugin.load.ingested_at;
                ctx.state_put(candidate_key(&lower), entry.to_be_bytes().to_vec());
            }
            plugins.push(plugin);
        }
        // The writes of every plugin's (SHA1, DeviceId), in one host call, each pair asked
        // once however many of its loads there are.
        if !plugins.is_empty() {
            let mut pair_of = HashMap::new();
            let mut pairs = Vec::new();
            let at: Vec<usize> = plugins
                .iter()
                .map(|p| {
                    *pair_of.entry((p.load.str("SHA1"), p.load.str("DeviceId"))).or_insert_with(|| {
                        pairs.push((p.load.str("SHA1").to_string(), Some(p.load.str("DeviceId").to_string())));
                        pairs.len() - 1
                    })
                })
                .collect();
            let writes = ctx.lookup_many(FILE_EVENTS, pairs, &self.write_filter())?;
            for (plugin, pair) in plugins.iter().zip(at) {
                for write in &writes[pair] {
                    self.join(plugin, write, write_cutoff, ctx, &mut emitted);
                }
            }
        }

        if !probing_writes.is_empty() {
            let writes: Vec<Row> =
                ctx.rows(probing_writes)?.into_iter().filter(|w| self.potential_write(w, write_cutoff)).collect();
            // The loads of every such write's (SHA1, DeviceId), in one host call.
            let keys = writes.iter().map(|w| (w.str("SHA1").to_string(), Some(w.str("DeviceId").to_string())));
            let loads = ctx.lookup_many(IMAGE_LOADS, keys.collect(), &self.load_filter())?;
            for (write, loads) in writes.iter().zip(loads) {
                for load in loads {
                    if let Some(plugin) = self.potential_plugin(load, load_cutoff, ctx, &mut profiles)? {
                        self.join(&plugin, write, write_cutoff, ctx, &mut emitted);
                    }
                }
            }
        }

        // Candidates no load can qualify for any more (ingested before the window).
        let expired: Vec<String> =
            self.candidates.iter().filter(|(_, &at)| at < load_cutoff).map(|(k, _)| k.clone()).collect();
        for sha1 in expired {
            self.candidates.remove(&sha1);
            ctx.state_delete(candidate_key(&sha1));
            candidates_changed = true;
        }
        if candidates_changed || self.candidates.len() != candidates_before {
            ctx.set_inputs(self.inputs());
        }
        Ok(())
    }

    /// `where ActionType in~ ("FileCreated", "FileRenamed", "FileModified")`, checked by the
    /// host on the writes it looks up (the rest of PotentialWrites in `potential_write`).
    fn write_filter(&self) -> Vec<Condition> {
        vec![Condition::In {
            column: "ActionType".into(),
            any_of: WRITE_ACTIONS.iter().map(|a| a.to_string()).collect(),
        }]
    }

    /// Whether a load of this SHA1 (any case) passed the plugin filters recently enough.
    fn is_candidate(&self, sha1: &str, load_cutoff: i64) -> bool {
        if self.candidates.is_empty() {
            return false;
        }
        let hit = |k: &str| self.candidates.get(k).is_some_and(|&at| at >= load_cutoff);
        // SHA1s are almost always lowercase hex already: probe without allocating.
        if sha1.bytes().any(|b| b.is_ascii_uppercase()) || !sha1.is_ascii() {
            hit(&sha1.to_ascii_lowercase())
        } else {
            hit(sha1)
        }
    }

    /// The PotentialPlugins pipeline for one load row.
    fn potential_plugin(
        &self,
        load: Row,
        load_cutoff: i64,
        ctx: &mut Context<'_>,
        profiles: &mut ProfileCache,
    ) -> Result<Option<Plugin>, String> {
        let c = &self.config;
        if load.ingested_at < load_cutoff {
            return Ok(None);
        }
        if c.initiating_process != "*"
            && !load.str("InitiatingProcessFileName").eq_ignore_ascii_case(&c.initiating_process)
        {
            return Ok(None);
        }
        if starts_with_ignore_ascii_case(load.str("FolderPath"), &c.excluded_prefix) {
            return Ok(None);
        }
        if !self.profile_qualifies(load.str("SHA1"), ctx, profiles)? {
            return Ok(None);
        }
        let profile = profiles.get(load.str("SHA1"), ctx)?.cloned();
        Ok(Some(Plugin { load, profile }))
    }

    /// `invoke FileProfile(SHA1) | where ProfileAvailability !~ "Error" | where
    /// coalesce(GlobalPrevalence, default) < threshold`: a property of the SHA1 alone.
    fn profile_qualifies(
        &self,
        sha1: &str,
        ctx: &mut Context<'_>,
        profiles: &mut ProfileCache,
    ) -> Result<bool, String> {
        let c = &self.config;
        let profile = profiles.get(sha1, ctx)?;
        let availability = profile.map(|p| p.str("ProfileAvailability")).unwrap_or("");
        if availability.eq_ignore_ascii_case("Error") {
            return Ok(false);
        }
        let prevalence = profile
            .and_then(|p| match p.get("GlobalPrevalence") {
                Some(Cell::Int(v)) => Some(*v as f64),
                Some(Cell::Float(v)) => Some(*v),
                _ => None,
            })
            .unwrap_or(c.default_prevalence as f64);
        Ok(prevalence < c.prevalence_threshold as f64)
    }

    /// The PotentialWrites filters (other than the SHA1 set, which the join implies).
    fn potential_write(&self, write: &Row, write_cutoff: i64) -> bool {
        let recent = parse_timestamp(write.str("Timestamp")).is_some_and(|t| t >= write_cutoff);
        let action = write.str("ActionType");
        recent && WRITE_ACTIONS.iter().any(|a| a.eq_ignore_ascii_case(action))
    }

    /// `join kind=inner on SHA1, DeviceId, FolderPath` for one pair.
    fn join(
        &self,
        plugin: &Plugin,
        write: &Row,
        write_cutoff: i64,
        ctx: &mut Context<'_>,
        emitted: &mut HashSet<(Vec<u8>, Vec<u8>)>,
    ) {
        let load = &plugin.load;
        if !self.potential_write(write, write_cutoff)
            || write.str("SHA1") != load.str("SHA1")
            || write.str("DeviceId") != load.str("DeviceId")
            || write.str("FolderPath").to_lowercase() != load.str("FolderPath").to_lowercase()
        {
            return;
        }
        if !emitted.insert((load.key.clone(), write.key.clone())) {
            return;
        }
        let folders = lowered_folders(load, write);
        let row = output_row(load, plugin.profile.as_ref(), write, &folders);
        let inputs: [&[u8]; 2] = [&load.key, &write.key];
        let columns = row.iter().map(|(name, cell)| (name.as_ref(), *cell));
        ctx.emit_borrowed(&inputs, load.str("DeviceId"), load.str("DeviceName"), columns);
    }
}

/// The join's output row: the load's columns (FolderPath lowercased), the FileProfile
/// columns, then the write's columns (FolderPath lowercased) with a `1` suffix on names
/// the left side already has. Borrowed from the rows it joins, and from `folders` (their
/// FolderPath strings lowercased, [`lowered_folders`]): a pass of a hundred findings of
/// ~100 columns copies none of them on the way to the answer.
pub fn output_row<'r>(
    load: &'r Row,
    profile: Option<&'r Row>,
    write: &'r Row,
    folders: &'r [String],
) -> Vec<(Cow<'r, str>, CellRef<'r>)> {
    let mut row: Vec<(Cow<'r, str>, CellRef<'r>)> =
        Vec::with_capacity(load.columns.len() + 2 * PROFILE_COLUMNS.len() + write.columns.len());
    let mut folders = folders.iter();
    let mut lower_folder = move |name: &str, cell: &'r Cell| -> CellRef<'r> {
        match (cell, name == "FolderPath") {
            (Cell::Str(s), true) => CellRef::Str(folders.next().map_or(s.as_str(), String::as_str)),
            (other, _) => other.into(),
        }
    };
    row.extend(load.columns.iter().map(|(n, c)| (Cow::Borrowed(n.as_str()), lower_folder(n, c))));
    let mut left: HashSet<&str> = load.columns.iter().map(|(n, _)| n.as_str()).collect();
    for &(name, is_string) in PROFILE_COLUMNS {
        if !left.insert(name) {
            continue;
        }
        let value = profile.and_then(|p| p.get(name)).map(CellRef::from).unwrap_or(if is_string {
            CellRef::Str("")
        } else {
            CellRef::Null
        });
        row.push((Cow::Borrowed(name), value));
    }
    if let Some(p) = profile {
        for (name, value) in &p.columns {
            if name != "SHA1" && left.insert(name) {
                row.push((Cow::Borrowed(name.as_str()), value.into()));
            }
        }
    }
    for (name, value) in &write.columns {
        let value = lower_folder(name, value);
        if left.contains(name.as_str()) {
            row.push((Cow::Owned(format!("{name}1")), value));
        } else {
            row.push((Cow::Borrowed(name.as_str()), value));
        }
    }
    row
}

/// Every FolderPath string of `load`, then of `write`, lowercased, in column order: what
/// [`output_row`] shows in their place.
pub fn lowered_folders(load: &Row, write: &Row) -> Vec<String> {
    [load, write]
        .into_iter()
        .flat_map(|r| r.columns.iter())
        .filter_map(|(name, cell)| match cell {
            Cell::Str(s) if name == "FolderPath" => Some(s.to_lowercase()),
            _ => None,
        })
        .collect()
}

fn starts_with_ignore_ascii_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

fn candidate_key(lower_sha1: &str) -> Vec<u8> {
    let mut k = vec![CANDIDATE_PREFIX];
    k.extend_from_slice(lower_sha1.as_bytes());
    k
}

/// FileProfile look-ups are repeated for every load of a SHA1; ask the host once a pass.
#[derive(Default)]
struct ProfileCache {
    map: HashMap<String, Option<Row>>,
}

impl ProfileCache {
    fn prefetch<'s>(&mut self, sha1s: impl Iterator<Item = &'s str>, ctx: &mut Context<'_>) -> Result<(), String> {
        let mut missing: Vec<String> = sha1s.filter(|s| !self.map.contains_key(*s)).map(str::to_string).collect();
        missing.sort();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let rows = ctx.profiles(missing.clone())?;
        self.map.extend(missing.into_iter().zip(rows));
        Ok(())
    }

    fn get(&mut self, sha1: &str, ctx: &mut Context<'_>) -> Result<Option<&Row>, String> {
        if !self.map.contains_key(sha1) {
            let p = ctx.profile(sha1)?;
            self.map.insert(sha1.to_string(), p);
        }
        Ok(self.map.get(sha1).and_then(Option::as_ref))
    }
}
