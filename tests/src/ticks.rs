//! The harness of the detectors' incremental property tests and golden tests, in
//! process: a fresh store with one detector's library loaded, ticks of rows written to
//! JSONL files named after their tables and ingested at a fixed ingestion time, one
//! detection pass per tick at a fixed evaluation time (with parameter overrides and, at
//! times, a few new rows per evaluate call), the store and the plugin reopened where a
//! tick asks for a restart, and after every pass the findings: the findings JSONL the
//! outbox was flushed to, and the results tree.
//!
//! What the findings must be (a rule's naive oracle, its identities, its rows) stays in
//! each rule's test file; [`Pass`] has the checks they share.

use crate::{plugins_dir, read_jsonl};
use lookout_core::detect::{run_pass, DetectOptions, DetectorReport};
use lookout_core::findings::{all_findings, flush_outbox};
use lookout_core::gen;
use lookout_core::ingest::{ingest_paths, IngestOptions, IngestReport};
use lookout_core::plugin::{load_dir, Loaded};
use lookout_core::Store;
use lookout_plugin_sdk::time::{format_timestamp, parse_timestamp, TICKS_PER_SEC};
use proptest::prelude::ProptestConfig;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{Debug, Write as _};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

pub const SECOND: i64 = TICKS_PER_SEC;
pub const MINUTE: i64 = 60 * SECOND;
pub const HOUR: i64 = 60 * MINUTE;
pub const DAY: i64 = 24 * HOUR;

/// A tick's pass evaluates this long after the tick's rows were ingested.
pub const EVAL_DELAY: i64 = 30 * SECOND;

/// The table whose newer row of a key replaces the older one at ingestion: its rows are
/// not all stored as new rows.
const PROFILE_TABLE: &str = "FileProfile";

/// The first tick's ingestion time.
pub fn t0() -> i64 {
    parse_timestamp("2025-05-07T12:00:00Z").unwrap()
}

/// The object of a `json!({…})` row literal.
pub fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(o) => o,
        _ => unreachable!("rows are objects"),
    }
}

/// A FileProfile row.
pub fn profile_row(
    report_id: i64,
    sha1: &str,
    prevalence: Option<i64>,
    availability: Option<&str>,
) -> Map<String, Value> {
    obj(serde_json::json!({
        "SHA1": sha1,
        "GlobalPrevalence": prevalence,
        "GlobalFirstSeen": "2025-04-01T00:00:00Z",
        "Signer": "",
        "ProfileAvailability": availability,
        "ReportId": report_id,
    }))
}

/// `PROPTEST_CASES` cases, or `default_cases`; no proptest-regressions files in the
/// workspace.
pub fn proptest_config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(default_cases);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

// ---------------------------------------------------------------------------------------
// Ticks.
// ---------------------------------------------------------------------------------------

/// A row of a tick: (table, row).
pub type Row = (&'static str, Map<String, Value>);

/// Where in a tick the store and the loaded plugins are dropped and opened/loaded again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    No,
    /// Before the tick's rows are ingested.
    Before,
    /// After its rows are ingested, before its detection pass.
    BeforePass,
}

/// One tick: rows arriving together, ingested at `now`, then one detection pass at
/// `now + EVAL_DELAY`.
#[derive(Debug, Clone)]
pub struct Tick {
    pub now: i64,
    pub restart: Restart,
    /// New rows handed to the detector per call in this tick's pass (`None`: the default).
    pub chunk_rows: Option<usize>,
    /// (table, row) in arrival order.
    pub rows: Vec<Row>,
}

impl Tick {
    pub fn new(now: i64, restart: Restart, rows: Vec<Row>) -> Tick {
        Tick { now, restart, chunk_rows: None, rows }
    }

    /// A tick with no restart and the default chunks.
    pub fn at(now: i64, rows: Vec<Row>) -> Tick {
        Tick::new(now, Restart::No, rows)
    }

    /// The tick's rows as an oracle's stored rows: `make(table, ingestion time, row)`.
    pub fn stored<'a, T>(
        &'a self,
        make: impl Fn(String, i64, Map<String, Value>) -> T + 'a,
    ) -> impl Iterator<Item = T> + 'a {
        self.rows.iter().map(move |(table, row)| make(table.to_string(), self.now, row.clone()))
    }
}

/// Where `n` rows in arrival order are cut into ticks: the end of each tick's rows, cut
/// at `cuts` (each a fraction of 256 of the rows, in any order), then `empty` ticks with
/// no rows.
pub fn tick_ends(n: usize, cuts: &[u8], empty: usize) -> Vec<usize> {
    let mut ends: Vec<usize> = cuts.iter().map(|&c| usize::from(c) * n / 256).collect();
    ends.sort_unstable();
    ends.push(n);
    ends.extend(std::iter::repeat_n(n, empty));
    ends
}

/// `rows`, in arrival order, cut into ticks by [`tick_ends`]. The first tick is at [`t0`]
/// with no restart; each later tick `k` comes `step(k, now)` after the previous one (at
/// `now`), with `restarts[k]`; each tick `k` has `chunks[k]` rows per evaluate call.
pub fn split_ticks(
    rows: &[Row],
    cuts: &[u8],
    empty: usize,
    restarts: &[Restart],
    chunks: &[Option<usize>],
    mut step: impl FnMut(usize, i64) -> i64,
) -> Vec<Tick> {
    let mut ticks = Vec::new();
    let mut start = 0;
    let mut now = t0();
    for (k, end) in tick_ends(rows.len(), cuts, empty).into_iter().enumerate() {
        if k > 0 {
            now += step(k, now);
        }
        let restart = if k > 0 { restarts[k] } else { Restart::No };
        ticks.push(Tick { now, restart, chunk_rows: chunks[k], rows: rows[start..end].to_vec() });
        start = end;
    }
    ticks
}

// ---------------------------------------------------------------------------------------
// A detector and its engine.
// ---------------------------------------------------------------------------------------

/// The detector a test file checks.
#[derive(Clone, Copy)]
pub struct Rule {
    /// Its library (`crate::SCM_REMOTE`, …).
    pub lib: &'static str,
    /// Its name, which parameter overrides are addressed to.
    pub detector: &'static str,
    /// The tables of its ticks' rows, in the order their files are ingested.
    pub tables: &'static [&'static str],
    /// One line per row of a table, for failure messages.
    pub show_row: fn(&str, &Map<String, Value>) -> String,
}

/// A store, in a temporary folder, with the rule's library loaded alone.
pub struct Engine {
    rule: Rule,
    root: TempDir,
    plugins: PathBuf,
    data: PathBuf,
    findings: PathBuf,
    open: Option<(Store, Loaded)>,
}

impl Engine {
    pub fn open(rule: &Rule) -> Result<Engine, String> {
        let root = tempfile::tempdir().map_err(|e| e.to_string())?;
        let plugins = plugins_dir(root.path(), &[rule.lib]);
        let data = root.path().join("data");
        let findings = root.path().join("findings.jsonl");
        let mut engine = Engine { rule: *rule, root, plugins, data, findings, open: None };
        engine.open = Some(engine.load()?);
        Ok(engine)
    }

    fn load(&self) -> Result<(Store, Loaded), String> {
        // sled releases its directory lock from background threads shortly after the last
        // handle is dropped, so an in-process reopen may briefly find it still held (a real
        // restart is a new process). Wait for it, for a few seconds at most.
        let mut attempts = 0;
        let store = loop {
            match Store::open(&self.data) {
                Ok(s) => break s,
                Err(e) if attempts < 100 && is_lock_error(&format!("{e:#}")) => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(format!("Store::open: {e:#}")),
            }
        };
        let loaded = load_dir(&self.plugins, &self.data).map_err(|e| format!("load_dir: {e:#}"))?;
        let names: Vec<&str> = loaded.plugins.iter().map(|p| p.manifest.name.as_str()).collect();
        if !loaded.refused.is_empty() || names != [self.rule.detector] {
            let refused: Vec<String> =
                loaded.refused.iter().map(|r| format!("{}: {}", r.path.display(), r.reason)).collect();
            return Err(format!(
                "expected {} alone to load; loaded {names:?}, refused {refused:?}",
                self.rule.detector
            ));
        }
        Ok((store, loaded))
    }

    /// The temporary folder holding the store, the plugins folder and the findings.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    fn parts(&mut self) -> (&mut Store, &mut Loaded) {
        let (store, loaded) = self.open.as_mut().expect("the engine is open");
        (store, loaded)
    }

    /// Drops the store and the plugins, then opens and loads them again. Libraries are
    /// never unloaded; loading again re-initialises the detector from its persisted state.
    pub fn restart(&mut self) -> Result<(), String> {
        drop(self.open.take());
        self.open = Some(self.load()?);
        Ok(())
    }

    /// Writes tick `k`'s `rows` as one JSONL file per table under `<root>/in/tick-<k>` (the
    /// file name gives the table) and ingests them with ingestion time `now`: every row
    /// stored, as new rows (FileProfile rows aside, which may replace each other).
    pub fn ingest_rows(&mut self, k: usize, rows: &[Row], now: i64) -> Result<(), String> {
        if let Some((table, _)) = rows.iter().find(|(t, _)| !self.rule.tables.contains(t)) {
            return Err(format!("a row of {table}, not a table of {}", self.rule.detector));
        }
        let dir = self.root().join("in").join(format!("tick-{k}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut paths: Vec<PathBuf> = Vec::new();
        for table in self.rule.tables {
            let lines: Vec<String> =
                rows.iter().filter(|(t, _)| t == table).map(|(_, r)| Value::Object(r.clone()).to_string()).collect();
            if lines.is_empty() {
                continue;
            }
            let path = dir.join(format!("{table}-{k}.jsonl"));
            std::fs::write(&path, lines.join("\n") + "\n").map_err(|e| e.to_string())?;
            paths.push(path);
        }
        if paths.is_empty() {
            return Ok(());
        }
        let report = self.ingest_files(&paths, now)?;
        let events = rows.iter().filter(|(t, _)| *t != PROFILE_TABLE).count() as u64;
        let new_events: u64 = report.new_rows.iter().filter(|(t, _)| t.as_str() != PROFILE_TABLE).map(|(_, n)| n).sum();
        if new_events != events {
            return Err(format!("ingest stored {new_events} of {events} event rows: {report:?}"));
        }
        Ok(())
    }

    /// Ingests files and folders with ingestion time `now`; an error if a row is rejected.
    pub fn ingest_files(&mut self, paths: &[PathBuf], now: i64) -> Result<IngestReport, String> {
        let opts = IngestOptions { now: Some(now), ..Default::default() };
        let (store, _) = self.parts();
        let report = ingest_paths(store, paths, &opts, &mut |_, _| {}).map_err(|e| format!("ingest: {e:#}"))?;
        if report.total_rejected() != 0 {
            return Err(format!("ingest rejected rows: {report:?}"));
        }
        Ok(report)
    }

    /// One detection pass at `now`, with `chunk_rows` new rows per evaluate call (the
    /// default if `None`) and these parameter overrides; an error if the detector fails.
    pub fn pass(
        &mut self,
        now: i64,
        chunk_rows: Option<usize>,
        params: &[(&str, String)],
    ) -> Result<DetectorReport, String> {
        self.pass_with(DetectOptions { now: Some(now), ..Default::default() }, chunk_rows, params)
    }

    /// A pass over every stored row, whatever the cursor says (`lookout detect --backfill`).
    pub fn backfill(&mut self, now: i64) -> Result<DetectorReport, String> {
        self.pass_with(DetectOptions { now: Some(now), backfill: true, ..Default::default() }, None, &[])
    }

    fn pass_with(
        &mut self,
        mut opts: DetectOptions,
        chunk_rows: Option<usize>,
        params: &[(&str, String)],
    ) -> Result<DetectorReport, String> {
        opts.params = params.iter().map(|(p, v)| (self.rule.detector.to_string(), p.to_string(), v.clone())).collect();
        if let Some(n) = chunk_rows {
            opts.chunk_rows = n;
        }
        let (store, loaded) = self.parts();
        let mut reports = run_pass(store, &mut loaded.plugins, &opts).map_err(|e| format!("run_pass: {e:#}"))?;
        let report = reports.pop().ok_or("run_pass: no report")?;
        if let Some(e) = &report.error {
            return Err(format!("detector {} failed: {e}", report.detector));
        }
        Ok(report)
    }

    /// Flushes the outbox to the findings JSONL; returns every line of it so far.
    pub fn flush(&mut self) -> Result<Vec<Value>, String> {
        let path = self.findings.clone();
        let (store, _) = self.parts();
        flush_outbox(store, &path).map_err(|e| format!("flush_outbox: {e:#}"))?;
        Ok(read_jsonl(&path))
    }

    /// Every finding of the results tree.
    pub fn tree(&mut self) -> Result<Vec<Value>, String> {
        let (store, _) = self.parts();
        all_findings(store).map_err(|e| format!("all_findings: {e:#}"))
    }
}

fn is_lock_error(msg: &str) -> bool {
    msg.contains("could not acquire lock") || msg.contains("in use by another Lookout process")
}

// ---------------------------------------------------------------------------------------
// Ticks through the engine.
// ---------------------------------------------------------------------------------------

/// What a tick's pass left.
pub struct Pass<'a> {
    /// The tick's index.
    pub k: usize,
    pub tick: &'a Tick,
    /// The pass's evaluation time.
    pub t_eval: i64,
    /// Every line of the findings JSONL so far.
    pub lines: Vec<Value>,
    /// The results tree.
    pub tree: Vec<Value>,
}

impl Rule {
    /// Runs `ticks` through a fresh engine (files → ingest → one pass with `params` →
    /// outbox, restarting where asked) and calls `check` after every pass. Errors are
    /// followed by the scenario.
    pub fn check_ticks(
        &self,
        ticks: &[Tick],
        params: &[(&str, String)],
        check: impl FnMut(&Pass) -> Result<(), String>,
    ) -> Result<(), String> {
        self.run_ticks(ticks, params, check).map_err(|e| format!("{e}\nscenario:\n{}", self.show_ticks(ticks, params)))
    }

    fn run_ticks(
        &self,
        ticks: &[Tick],
        params: &[(&str, String)],
        mut check: impl FnMut(&Pass) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut engine = Engine::open(self)?;
        for (k, tick) in ticks.iter().enumerate() {
            if tick.restart == Restart::Before {
                engine.restart()?;
            }
            engine.ingest_rows(k, &tick.rows, tick.now).map_err(|e| format!("tick {k}: {e}"))?;
            if tick.restart == Restart::BeforePass {
                engine.restart()?;
            }
            let t_eval = tick.now + EVAL_DELAY;
            engine.pass(t_eval, tick.chunk_rows, params).map_err(|e| format!("tick {k}: {e}"))?;
            let lines = engine.flush().map_err(|e| format!("tick {k}: {e}"))?;
            let tree = engine.tree().map_err(|e| format!("tick {k}: {e}"))?;
            check(&Pass { k, tick, t_eval, lines, tree })?;
        }
        Ok(())
    }

    /// The ticks, one line each and one per row, for failure messages.
    pub fn show_ticks(&self, ticks: &[Tick], params: &[(&str, String)]) -> String {
        let mut s = String::new();
        if !params.is_empty() {
            let set: Vec<String> = params.iter().map(|(p, v)| format!("{p}={v}")).collect();
            let _ = writeln!(s, "  parameters: {}", set.join(" "));
        }
        for (k, t) in ticks.iter().enumerate() {
            let since = t.now - t0();
            let _ = writeln!(
                s,
                "  tick {k}: ingest at {} (T0{}), evaluate 30 s later{}{}",
                format_timestamp(t.now),
                if since.abs() < 2 * DAY {
                    format!("{:+.4}h", since as f64 / HOUR as f64)
                } else {
                    format!("{:+.4}d", since as f64 / DAY as f64)
                },
                match t.restart {
                    Restart::No => "",
                    Restart::Before => ", restart before ingesting",
                    Restart::BeforePass => ", restart between ingest and pass",
                },
                t.chunk_rows.map(|n| format!(", {n} rows per evaluate call")).unwrap_or_default()
            );
            for (table, r) in &t.rows {
                let _ = writeln!(s, "    {}", (self.show_row)(table, r));
            }
        }
        s
    }
}

impl Pass<'_> {
    /// The findings of the JSONL and of the results tree by identity; an error if an
    /// identity, or a finding id, is in either more than once.
    #[allow(clippy::type_complexity)]
    pub fn by_identity<T: Ord + Debug>(
        &self,
        identity: impl Fn(&Value) -> Result<T, String>,
        show: impl Fn(&T) -> String,
    ) -> Result<(BTreeMap<T, &Value>, BTreeMap<T, &Value>), String> {
        let file = once_each(self.k, "findings.jsonl", &self.lines, &identity, &show)?;
        let tree = once_each(self.k, "results tree", &self.tree, &identity, &show)?;
        Ok((file, tree))
    }

    /// Checks that the findings JSONL and the results tree hold each exactly `expected`,
    /// each identity once; returns the JSONL's findings by identity.
    pub fn check_union<T: Ord + Debug>(
        &self,
        noun: &str,
        expected: &BTreeSet<T>,
        identity: impl Fn(&Value) -> Result<T, String>,
        show: impl Fn(&T) -> String,
    ) -> Result<BTreeMap<T, &Value>, String> {
        let (file, tree) = self.by_identity(identity, &show)?;
        for (what, found) in [("findings.jsonl", &file), ("results tree", &tree)] {
            let found: BTreeSet<&T> = found.keys().collect();
            if let Some(d) =
                diff(&format!("after tick {}: {what} vs naive union", self.k), noun, expected, &found, &show)
            {
                return Err(d);
            }
        }
        Ok(file)
    }
}

fn once_each<'a, T: Ord>(
    k: usize,
    what: &str,
    findings: &'a [Value],
    identity: impl Fn(&Value) -> Result<T, String>,
    show: impl Fn(&T) -> String,
) -> Result<BTreeMap<T, &'a Value>, String> {
    let ids: BTreeSet<&str> = findings.iter().filter_map(|f| f.get("finding_id").and_then(Value::as_str)).collect();
    let mut by: BTreeMap<T, Vec<&Value>> = BTreeMap::new();
    for f in findings {
        by.entry(identity(f)?).or_default().push(f);
    }
    let twice: Vec<String> =
        by.iter().filter(|(_, v)| v.len() > 1).map(|(p, v)| format!("  {}×: {}", v.len(), show(p))).collect();
    if ids.len() != findings.len() || !twice.is_empty() {
        return Err(format!(
            "after tick {k}: {what} has {} findings but {} distinct finding ids; identities in it more than once:\n{}",
            findings.len(),
            ids.len(),
            twice.join("\n")
        ));
    }
    Ok(by.into_iter().map(|(id, v)| (id, v[0])).collect())
}

/// `what: expected N <noun>, got M`, then the missing and the extra ones; `None` if equal.
fn diff<T: Ord>(
    what: &str,
    noun: &str,
    expected: &BTreeSet<T>,
    actual: &BTreeSet<&T>,
    show: impl Fn(&T) -> String,
) -> Option<String> {
    let expected: BTreeSet<&T> = expected.iter().collect();
    if &expected == actual {
        return None;
    }
    let mut s = format!("{what}: expected {} {noun}, got {}\n", expected.len(), actual.len());
    for p in expected.difference(actual) {
        let _ = writeln!(s, "  missing: {}", show(p));
    }
    for p in actual.difference(&expected) {
        let _ = writeln!(s, "  extra:   {}", show(p));
    }
    Some(s)
}

// ---------------------------------------------------------------------------------------
// One pass over files: golden tests and generated fleets.
// ---------------------------------------------------------------------------------------

/// What one pass over a fresh store found.
pub struct Once {
    pub report: DetectorReport,
    /// The findings JSONL the outbox was flushed to.
    pub lines: Vec<Value>,
    /// The results tree.
    pub tree: Vec<Value>,
}

impl Rule {
    /// A fresh store: each batch of files and folders ingested at its time (no row
    /// rejected), then one pass at `now` with these parameter overrides; fails the test
    /// on any error.
    pub fn detect_once(&self, batches: &[(i64, Vec<PathBuf>)], now: i64, params: &[(&str, String)]) -> Once {
        let run = || -> Result<Once, String> {
            let mut engine = Engine::open(self)?;
            for (at, paths) in batches {
                engine.ingest_files(paths, *at)?;
            }
            let report = engine.pass(now, None, params)?;
            Ok(Once { report, lines: engine.flush()?, tree: engine.tree()? })
        };
        run().unwrap_or_else(|e| panic!("{}: {e}", self.detector))
    }

    /// A fleet generated from `spec`, written as JSONL, ingested at its base time and
    /// evaluated then: what the fleet says this detector must find, and what it found.
    pub fn detect_generated_fleet(&self, spec: &gen::FleetSpec) -> (BTreeSet<gen::Expected>, Once) {
        let fleet = gen::generate(spec);
        let planted = fleet.expected.iter().filter(|e| e.detector == self.detector).cloned().collect();
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("fleet");
        gen::write_fleet(&fleet, &out, gen::Format::Jsonl).unwrap();
        (planted, self.detect_once(&[(spec.base_time, vec![gen::logs_dir(&out)])], spec.base_time, &[]))
    }
}
