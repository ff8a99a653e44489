//! The scheduler: one pass hands each detector the rows new since its cursor, and commits
//! the findings, the detector's state changes and the advanced cursor in one atomic batch.
//! A detector seen for the first time (or whose cursor is below the backfill floor, after
//! an index rebuild) backfills over everything stored.

use crate::clock::Clock;
use crate::error::{Chain, StoreError};
use crate::finding_json::{finding_json, NameCheck};
use crate::plugin::host_api::with_host_api;
use crate::plugin::loader::{CallError, EvalAnswer};
use crate::plugin::Plugin;
use crate::store::block_filter::Sha1Probe;
use crate::store::detectors::row_key_sha1_device;
use crate::store::{RowFilter, Store};
use lookout_plugin_sdk::abi::StateOpRef;
use lookout_plugin_sdk::time::format_timestamp;
use lookout_plugin_sdk::{EvalRequest, InitRequest, InputSpec, RowRef};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct DetectOptions {
    /// The evaluation time of the pass (`--now`); the clock otherwise.
    pub now: Option<i64>,
    /// `--set DETECTOR.PARAM=VALUE` overrides: (detector, parameter, value).
    pub params: Vec<(String, String, String)>,
    /// New rows handed to a detector per call.
    pub chunk_rows: usize,
    /// Set by a signal: stop after the chunk in hand (the cursor stays where it was, so
    /// the rest is evaluated on the next run; findings already committed stay, once).
    pub stop: Option<Arc<AtomicBool>>,
    /// Evaluate everything stored, whatever the cursors say (`detect --backfill`).
    pub backfill: bool,
    /// How many detectors' passes run at once (0: one per core).
    pub threads: usize,
}

impl Default for DetectOptions {
    fn default() -> Self {
        DetectOptions { now: None, params: Vec::new(), chunk_rows: 20_000, stop: None, backfill: false, threads: 0 }
    }
}

/// What one detector did in a pass.
#[derive(Debug, Clone)]
pub struct DetectorReport {
    pub detector: String,
    pub version: String,
    pub backfill: bool,
    pub rows: u64,
    pub new_findings: u64,
    pub elapsed: Duration,
    /// Of `elapsed`, the time spent loading the detector's state into it (`init`): once
    /// per process, or after a failure; a long-running daemon pays it once.
    pub init: Duration,
    /// Of `elapsed`: choosing the rows handed over (reading the new blocks' keys, checking
    /// the input filters), the detector's own calls (with its host calls), and committing
    /// what it returned.
    pub select: Duration,
    pub evaluate: Duration,
    pub commit: Duration,
    /// Of `evaluate`: answering the detector's calls into the store (its fetches of the
    /// rows it was handed, look-ups, FileProfile); the rest is the detector's own work.
    pub host: Duration,
    /// Set when the detector failed; it is retried from its cursor on the next pass.
    pub error: Option<String>,
}

/// Why a pass stopped, or why one detector's pass failed.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The store failed: the whole pass stops (nothing of the failed batch is committed).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// One detector failed: reported in its [`DetectorReport`] (never returned by
    /// [`run_pass`]) and retried from its cursor on the next pass.
    #[error(transparent)]
    Detector(#[from] DetectorError),
    /// A setting (`--set`, or a `[detectors.NAME]` table of the config file) names a
    /// detector that is not loaded.
    #[error("a setting (--set, or [detectors.{name}] in the config file) names detector '{name}', which is not loaded (loaded: {loaded}); check its spelling")]
    UnknownDetector { name: String, loaded: String },
}

/// What went wrong with a detector during its pass.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error("init failed")]
    Init(#[source] CallError),
    #[error(transparent)]
    Evaluate(CallError),
    #[error("the detector describes input table '{table}', which is not among its manifest's inputs ({inputs})")]
    UnknownInput { table: String, inputs: String },
    #[error("cannot encode a finding")]
    Finding(#[source] serde_json::Error),
    /// The host panicked answering one of the detector's calls: its answer is not
    /// committed (it may have taken the failed call for no rows).
    #[error("{0}")]
    HostPanicked(String),
}

impl From<crate::plugin::host_api::HostFailure> for PassError {
    fn from(e: crate::plugin::host_api::HostFailure) -> Self {
        match e {
            crate::plugin::host_api::HostFailure::Store(e) => PassError::Store(e),
            p @ crate::plugin::host_api::HostFailure::Panicked(_) => {
                PassError::Detector(DetectorError::HostPanicked(p.to_string()))
            }
        }
    }
}

/// A `--set` argument that is not `DETECTOR.PARAM=VALUE`.
#[derive(Debug, thiserror::Error)]
#[error("--set '{0}': expected DETECTOR.PARAM=VALUE")]
pub struct BadSet(pub String);

/// Parses `DETECTOR.PARAM=VALUE`.
pub fn parse_set(s: &str) -> Result<(String, String, String), BadSet> {
    let bad = || BadSet(s.to_string());
    let (lhs, value) = s.split_once('=').ok_or_else(bad)?;
    let (det, param) = lhs.rsplit_once('.').ok_or_else(bad)?;
    if det.is_empty() || param.is_empty() {
        return Err(bad());
    }
    Ok((det.to_string(), param.to_string(), value.to_string()))
}

/// Refuses settings (`--set`, `[detectors.NAME]`) for a detector that is not loaded: a
/// misspelt name. `lookout detect` stops on it; a daemon, whose plugins come and go
/// (removed, or refused until fixed), warns and goes on, so the other detectors' findings
/// still go out.
pub fn check_params(plugins: &[Plugin], params: &[(String, String, String)]) -> Result<(), PassError> {
    for (det, _, _) in params {
        if !plugins.iter().any(|p| &p.manifest.name == det) {
            let loaded: Vec<&str> = plugins.iter().map(|p| p.manifest.name.as_str()).collect();
            return Err(PassError::UnknownDetector { name: det.clone(), loaded: loaded.join(", ") });
        }
    }
    Ok(())
}

/// The finding id: a hash of detector, version and the identities of the input rows
/// (see [`Store::stable_identity`]).
pub fn finding_id(name: &str, version: &str, inputs: &[Vec<u8>]) -> String {
    let mut h = Sha256::new();
    for part in [name.as_bytes(), version.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    for k in inputs {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k);
    }
    hex::encode(&h.finalize()[..16])
}

/// Runs one pass of every plugin. Errors of one detector are reported, not returned;
/// an `Err` means the store itself failed: passes already under way still commit, none
/// starts after it (but a detector whose state could not be read stops only itself).
///
/// Detectors are independent (each has its own cursor, state and library), so their
/// passes run at the same time, a thread per core, reading the store together; each
/// commits as soon as it is done, one commit at a time. So within a pass, a detector's
/// findings go out in the order it emitted them, and the detectors' in the order their
/// passes finished. A pass handed more rows than one call takes (a backfill, a long
/// outage) is evaluated and committed chunk by chunk, alone, after the others.
///
/// Settings for a detector that is not loaded are not used (see [`check_params`]).
pub fn run_pass(
    store: &mut Store,
    plugins: &mut [Plugin],
    opts: &DetectOptions,
) -> Result<Vec<DetectorReport>, PassError> {
    let now = Clock::new(opts.now).now();
    // Background work on the store (a key-index merge of the rows just stored) waits
    // until the pass is done: the pass has the cores.
    let _detecting = store.detecting();
    let mut reports: Vec<DetectorReport> = plugins.iter().map(DetectorReport::of).collect();
    // A store failure in initialising one detector (its state cannot be read, say): the
    // others still run, and the pass returns it.
    let mut prepare_failure = None;
    // Initialising reads the state and declaring an index may build it: one at a time.
    let mut due = Vec::with_capacity(plugins.len());
    for (plugin, report) in plugins.iter_mut().zip(&mut reports) {
        let started = Instant::now();
        let prepared = prepare(store, plugin, opts, now, report);
        report.elapsed += started.elapsed();
        due.push(match prepared {
            Ok(d) => d,
            Err(e) => {
                // A store failure here (a detector's state that cannot be read) is that
                // detector's: the others still run.
                if let Err(e) = failed(store, plugin, report, e, now) {
                    prepare_failure.get_or_insert(e);
                }
                None
            }
        });
    }
    // Where the rows handed over are: for this pass's fetches (rows never move, so one
    // detector's finds serve another's).
    store.forget_row_hints();
    let jobs: Vec<Job<'_>> = plugins
        .iter_mut()
        .zip(reports.iter_mut())
        .zip(due)
        .enumerate()
        .filter_map(|(index, ((plugin, report), due))| due.map(|due| Job { index, plugin, report, due }))
        .collect();
    let stopped = || opts.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed));
    // The first store failure of a pass; the passes not started by then are not run.
    let failure = Mutex::new(None);
    let chunked = Mutex::new(Vec::new());
    {
        let store: &Store = store;
        let threads = match opts.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let threads = threads.min(jobs.len());
        let queue = Mutex::new(jobs.into_iter());
        let work = || loop {
            // After a stop signal or a store failure no further pass starts.
            if stopped() || failure.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                break;
            }
            let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
            let Some(job) = next else { break };
            if let Some(rest) = pass(store, job, opts, now, &failure) {
                chunked.lock().unwrap_or_else(|p| p.into_inner()).push(rest);
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(work);
            }
            work();
        });
    }
    let mut failure = failure.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut chunked = chunked.into_inner().unwrap_or_else(|p| p.into_inner());
    chunked.sort_by_key(|job| job.index);
    for job in chunked {
        if stopped() || failure.is_some() {
            break;
        }
        // Its rows chosen again now, alone: one detector's rows held at a time, with all
        // the room for where they lie.
        store.forget_row_hints();
        let started = Instant::now();
        let refs = input_refs(store, &job.plugin.manifest.inputs, &job.plugin.inputs, job.due.since, job.due.head);
        job.report.select = started.elapsed();
        job.report.rows = refs.as_ref().map_or(0, |r| r.len() as u64);
        let done = refs
            .map_err(PassError::Store)
            .and_then(|refs| run_chunks(store, job.plugin, &job.due, &refs, opts, now, job.report));
        job.report.elapsed += started.elapsed();
        if let Err(e) = done {
            if let Err(e) = failed(store, job.plugin, job.report, e, now) {
                failure.get_or_insert(e);
            }
        }
    }
    match prepare_failure.or(failure) {
        Some(e) => Err(e),
        None => Ok(reports),
    }
}

/// One detector's pass: its rows chosen and, if they fit in one call, evaluated and
/// committed. Returns the job when they do not, or when it is a backfill (run chunk by
/// chunk afterwards, alone). A store failure goes into `failure` (the first is kept).
fn pass<'p>(
    store: &Store,
    job: Job<'p>,
    opts: &DetectOptions,
    now: i64,
    failure: &Mutex<Option<PassError>>,
) -> Option<Job<'p>> {
    job.report.backfill = job.due.since.is_none();
    if job.report.backfill {
        return Some(job);
    }
    let started = Instant::now();
    let refs = input_refs(store, &job.plugin.manifest.inputs, &job.plugin.inputs, job.due.since, job.due.head);
    job.report.select = started.elapsed();
    job.report.elapsed += job.report.select;
    let result = match refs {
        Err(e) => Err(PassError::Store(e)),
        Ok(refs) => {
            job.report.rows = refs.len() as u64;
            let stopped = opts.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed));
            if refs.len() > opts.chunk_rows.max(1) || stopped {
                return Some(job);
            }
            let req = EvalRequest { now, backfill: job.due.since.is_none(), rows: refs, last: true };
            let started = Instant::now();
            let call =
                crate::plugin::running::enter(&job.plugin.manifest.name, &job.plugin.manifest.version, "evaluate");
            let answer = with_host_api(store, &mut job.report.host, |api| job.plugin.lib.evaluate(api, &req));
            drop(call);
            job.report.evaluate = started.elapsed();
            let started = Instant::now();
            let committed = answer
                .map_err(PassError::from)
                .and_then(|a| a.map_err(|e| PassError::Detector(DetectorError::Evaluate(e))))
                .and_then(|a| commit_answer(store, job.plugin, &job.due, now, true, &a, job.report));
            job.report.elapsed += job.report.evaluate + started.elapsed();
            committed
        }
    };
    if let Err(e) = result {
        if let Err(e) = failed(store, job.plugin, job.report, e, now) {
            failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        }
    }
    None
}

impl DetectorReport {
    fn of(plugin: &Plugin) -> DetectorReport {
        DetectorReport {
            detector: plugin.manifest.name.clone(),
            version: plugin.manifest.version.clone(),
            backfill: false,
            rows: 0,
            new_findings: 0,
            elapsed: Duration::ZERO,
            init: Duration::ZERO,
            select: Duration::ZERO,
            evaluate: Duration::ZERO,
            commit: Duration::ZERO,
            host: Duration::ZERO,
            error: None,
        }
    }
}

/// A detector's failure is reported and retried on the next pass; a store failure is
/// returned (the plugin's memory may be ahead of what was committed: it starts again).
fn failed(
    store: &Store,
    plugin: &mut Plugin,
    report: &mut DetectorReport,
    e: PassError,
    now: i64,
) -> Result<(), PassError> {
    plugin.initialised = false;
    match e {
        PassError::Detector(e) => {
            let wait = retry_wait(plugin.failed_passes);
            plugin.failed_passes = plugin.failed_passes.saturating_add(1);
            plugin.retry_at = Some(Instant::now() + wait);
            tracing::warn!(detector = %plugin.id(), error = %Chain(&e), retry_in = ?wait, "detector failed; its rows are handed over again when it is retried");
            report.error = Some(Chain(&e).to_string());
            put_off_wake_up(store, &plugin.id(), now)?;
            Ok(())
        }
        // Which detector's pass met it, for the log of the work loop's failure.
        PassError::Store(e) => Err(PassError::Store(StoreError::Context {
            what: format!("the pass of detector {}", plugin.id()),
            source: Box::new(e),
        })),
        e => Err(e),
    }
}

/// How long a detector that failed `failed_before` passes in a row before this one waits
/// before its next: 1 s, doubling, at most a minute. Its cursor has not moved, so the
/// rows are all handed over then; retrying at every look instead re-ran the whole backlog
/// (and the detector's `init` over its whole state) each time, for as long as it failed.
fn retry_wait(failed_before: u32) -> Duration {
    Duration::from_secs(1u64 << failed_before.min(6)).min(Duration::from_secs(60))
}

/// Keeps the indexes `plugins` declare from now on (building each new one over the rows
/// stored), before their first pass: rows stored from here on are indexed as they
/// arrive, where a pass would read back every row stored in between to build them.
pub fn declare_indexes(store: &mut Store, plugins: &[Plugin]) -> Result<(), StoreError> {
    for plugin in plugins {
        store.declare_indexes(&plugin.manifest.indexes)?;
    }
    Ok(())
}

/// The batches a detector's pass is handed rows of: those after `since` (all when `None`,
/// a backfill) up to `head`; and whether its parameters are to be recorded with it.
struct Due {
    since: Option<u64>,
    head: u64,
    record_params: bool,
}

/// Initialises the detector if it is not, and says which batches its pass covers (`None`:
/// nothing new and nothing due, no pass).
fn prepare(
    store: &mut Store,
    plugin: &mut Plugin,
    opts: &DetectOptions,
    now: i64,
    report: &mut DetectorReport,
) -> Result<Option<Due>, PassError> {
    let id = plugin.id();
    if plugin.retry_at.is_some_and(|at| Instant::now() < at) {
        // Failed lately: not run until its wait is over.
        return Ok(None);
    }
    // The indexes it declares are kept from now on (built now if new: a store failure).
    store.declare_indexes(&plugin.manifest.indexes).map_err(PassError::Store)?;
    if !plugin.initialised {
        let params: Vec<(String, String)> = opts
            .params
            .iter()
            .filter(|(d, _, _)| *d == plugin.manifest.name)
            .map(|(_, p, v)| (p.clone(), v.clone()))
            .collect();
        warn_if_window_exceeds_retention(plugin, &params, store.retention());
        plugin.params = params_record(&params);
        let init_started = Instant::now();
        // A state that cannot be read, for the tests of what a pass does when one
        // detector's store failure ends it.
        if crate::failpoint::armed(&format!("state-unreadable-{}", plugin.manifest.name)) {
            return Err(PassError::Store(StoreError::Corrupt(format!("failpoint: {id}'s state reads as damaged"))));
        }
        let state = store.detector_state(&id)?;
        let call = crate::plugin::running::enter(&plugin.manifest.name, &plugin.manifest.version, "init");
        let response = plugin.lib.init(&InitRequest { params, state }).map_err(DetectorError::Init);
        drop(call);
        let response = response?;
        report.init = init_started.elapsed();
        check_inputs(&plugin.manifest.inputs, &response.inputs)?;
        plugin.inputs = response.inputs;
        plugin.initialised = true;
    }
    let head = store.head_seq();
    let floor = store.meta_u64("jfloor")?;
    let cursor = store.meta_cursor(&id)?;
    // A detector with nothing new still runs when the clock alone changes its results.
    let due = store.wake_at(&id)?.is_some_and(|at| at <= now);
    // Other parameters can widen a window over rows the detector dropped or never kept
    // (a longer lookback): its result is the rule's over every stored row, so they are all
    // handed over again (a detector keeps a row handed twice once, as after a crash).
    // Nothing recorded yet (a store from before they were): taken as they are.
    let recorded = store.detector_params(&id)?;
    let params_changed = recorded.as_ref().is_some_and(|p| *p != plugin.params);
    let record_params = recorded.as_ref() != Some(&plugin.params);
    if params_changed && cursor.is_some() {
        tracing::info!(detector = %id, was = ?recorded, now = %plugin.params, "parameters changed: the detector reads every stored row again");
    }
    let since = match cursor {
        Some(_) if opts.backfill || params_changed => None,
        Some(c) if c >= floor => {
            if c >= head && !due {
                return Ok(None);
            }
            Some(c)
        }
        _ => None,
    };
    Ok(Some(Due { since, head, record_params }))
}

/// The parameters a detector is given, as recorded with its passes: the value each one
/// takes (the last given, as the detector resolves them), by name, so the same settings
/// in another order are the same and different ones are not.
fn params_record(params: &[(String, String)]) -> String {
    let effective: std::collections::BTreeMap<&str, &str> =
        params.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
    let pairs: Vec<(&str, &str)> = effective.into_iter().collect();
    serde_json::to_string(&pairs).unwrap_or_default()
}

/// A detector whose pass runs, with its report.
struct Job<'p> {
    index: usize,
    plugin: &'p mut Plugin,
    report: &'p mut DetectorReport,
    due: Due,
}

/// A pass over more rows than one call takes: each chunk evaluated and committed in turn.
fn run_chunks(
    store: &mut Store,
    plugin: &mut Plugin,
    due: &Due,
    refs: &[RowRef],
    opts: &DetectOptions,
    now: i64,
    report: &mut DetectorReport,
) -> Result<(), PassError> {
    // No rows at all is still one call: it commits the cursor, the parameters and the
    // wake-up (a backfill that chose nothing would otherwise be a backfill again next time).
    let chunks: Vec<&[RowRef]> =
        if refs.is_empty() { vec![&[]] } else { refs.chunks(opts.chunk_rows.max(1)).collect() };
    let last = chunks.len().saturating_sub(1);
    for (i, chunk) in chunks.into_iter().enumerate() {
        if opts.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Ok(());
        }
        let req = EvalRequest { now, backfill: due.since.is_none(), rows: chunk.to_vec(), last: i == last };
        let started = Instant::now();
        let call = crate::plugin::running::enter(&plugin.manifest.name, &plugin.manifest.version, "evaluate");
        let answer = with_host_api(store, &mut report.host, |api| plugin.lib.evaluate(api, &req));
        drop(call);
        let answer = answer.map_err(PassError::from)?.map_err(DetectorError::Evaluate)?;
        report.evaluate += started.elapsed();
        commit_answer(store, plugin, due, now, i == last, &answer, report)?;
    }
    Ok(())
}

/// Commits what one call returned: its new findings, its state changes and, after the
/// last call of the pass, the cursor and the wake-up it asked for, in one batch.
fn commit_answer(
    store: &Store,
    plugin: &mut Plugin,
    due: &Due,
    now: i64,
    last: bool,
    answer: &EvalAnswer,
    report: &mut DetectorReport,
) -> Result<(), PassError> {
    let id = plugin.id();
    let resp = answer.response().map_err(DetectorError::Evaluate)?;
    let started = Instant::now();
    // Checked before anything of the pass is committed: a bad answer fails the pass.
    if let Some(inputs) = &resp.inputs {
        check_inputs(&plugin.manifest.inputs, inputs)?;
    }
    let new_inputs = resp.inputs;
    // This pass evaluated at `now`: a wake-up at or before it asks for nothing more
    // (and, kept, would make the daemon run the detector again and again).
    let wake_at = resp.wake_at.filter(|&at| at > now);
    let detected_at = format_timestamp(now);
    let mut batch = store.pass_batch();
    let mut fresh = HashSet::new();
    let mut names = NameCheck::default();
    for f in &resp.findings {
        let identities: Vec<Vec<u8>> = f.inputs.iter().map(|k| batch.store().stable_identity(k)).collect();
        let fid = finding_id(&plugin.manifest.name, &plugin.manifest.version, &identities);
        if !fresh.insert(fid.clone()) || batch.store().has_finding(&fid).map_err(PassError::Store)? {
            continue;
        }
        let json = finding_json(&fid, &plugin.manifest, &detected_at, f, &mut names).map_err(DetectorError::Finding)?;
        batch.put_finding(&fid, json);
        report.new_findings += 1;
    }
    let changes = resp.state.iter().map(|op| match op {
        StateOpRef::Put(k, v) => (*k, Some(*v)),
        StateOpRef::Delete(k) => (*k, None),
    });
    batch.change_state(&id, changes).map_err(PassError::Store)?;
    if last {
        batch.set_cursor(&id, due.head);
        batch.set_wake_at(&id, wake_at);
        // With the pass that read every row under them: one cut short reads them again.
        if due.record_params {
            batch.set_params(&id, &plugin.params);
        }
    }
    crate::failpoint::hit("detect-before-commit");
    batch.commit().map_err(PassError::Store)?;
    if let Some(inputs) = new_inputs {
        plugin.inputs = inputs;
    }
    if last {
        plugin.failed_passes = 0;
        plugin.retry_at = None;
    }
    crate::failpoint::hit("detect-after-commit");
    report.commit += started.elapsed();
    Ok(())
}

/// How long a detector that failed a pass it was woken for waits before it is woken again
/// (new rows still run it at once).
const RETRY_WAKE_UP_AFTER: i64 = 30 * lookout_plugin_sdk::time::TICKS_PER_SEC;

/// A failed pass commits nothing: its rows are still new to the detector, and are
/// handed over again at the next pass. That pass is due in [`RETRY_WAKE_UP_AFTER`] (or at
/// the detector's own wake-up, if sooner and not yet due), not only when more rows
/// arrive: a failure that passes (say, a host call that found the disk full) must not
/// hold a quiet fleet's findings back. A wake-up that was due is put off by as much, or
/// the daemon would run the failing detector in a tight loop.
fn put_off_wake_up(store: &Store, id: &str, now: i64) -> Result<(), StoreError> {
    let retry = now.saturating_add(RETRY_WAKE_UP_AFTER);
    if !store.wake_at(id)?.is_some_and(|at| at > now && at <= retry) {
        let mut batch = store.pass_batch();
        batch.set_wake_at(id, Some(retry));
        batch.commit()?;
    }
    Ok(())
}

/// The earliest time one of these detectors asked to be run again whatever arrives
/// (the daemon runs a pass then, rows or not).
pub fn next_wake(store: &Store, plugins: &[Plugin]) -> Result<Option<i64>, StoreError> {
    let mut next: Option<i64> = None;
    for p in plugins {
        if p.retry_at.is_some_and(|at| Instant::now() < at) {
            // Waiting after a failure: a pass now would not run it, and a wake-up that is
            // due would have the daemon pass again and again meanwhile. It is run at the
            // first look after its wait (its wake-up still stands).
            continue;
        }
        if let Some(at) = store.wake_at(&p.id())? {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
    }
    Ok(next)
}

/// How the new keys of one table are selected for a detector.
enum Select<'f> {
    All,
    Keys(KeyMatcher),
    Rows(&'f [lookout_plugin_sdk::Condition]),
}

/// A filter whose conditions are all `in~` on SHA1 or DeviceId, checked from row keys
/// with hash look-ups (a detector's candidate set can hold thousands of SHA1s).
struct KeyMatcher {
    /// (is SHA1 (else DeviceId), ASCII-lowercased values)
    sets: Vec<(bool, HashSet<Vec<u8>>)>,
    /// The filter itself, for keys that cannot be decided from the key.
    filter: Vec<lookout_plugin_sdk::Condition>,
}

impl KeyMatcher {
    fn new(filter: &[lookout_plugin_sdk::Condition]) -> Option<KeyMatcher> {
        let mut sets = Vec::new();
        for c in filter {
            match c {
                lookout_plugin_sdk::Condition::In { column, any_of } if column == "SHA1" || column == "DeviceId" => {
                    sets.push((column == "SHA1", any_of.iter().map(|v| v.as_bytes().to_ascii_lowercase()).collect()));
                }
                _ => return None,
            }
        }
        Some(KeyMatcher { sets, filter: filter.to_vec() })
    }

    /// The SHA1 sets, for skipping blocks that hold none of a set's values (`None` when
    /// the filter has no condition on SHA1).
    fn sha1_probe(&self) -> Option<Sha1Probe> {
        let sets: Vec<&HashSet<Vec<u8>>> = self.sets.iter().filter(|(is_sha1, _)| *is_sha1).map(|(_, s)| s).collect();
        if sets.is_empty() {
            return None;
        }
        Some(Sha1Probe::new(sets.into_iter().map(|set| set.iter().map(Vec::as_slice))))
    }

    /// `None` when the key is not an event key or holds a value cut for length.
    fn passes(&self, key: &[u8], lower: &mut Vec<u8>) -> Option<bool> {
        let (sha1, device) = row_key_sha1_device(key)?;
        for (is_sha1, set) in &self.sets {
            let value = if *is_sha1 { sha1 } else { device };
            if value.len() >= u16::MAX as usize {
                return None;
            }
            lower.clear();
            lower.extend(value.iter().map(u8::to_ascii_lowercase));
            if !set.contains(lower.as_slice()) {
                return Some(false);
            }
        }
        Some(true)
    }
}

/// A detector parameter that is a duration (a window: `lookback`, `timeframe`) longer
/// than the retention reaches rows that are no longer kept: its results would differ from
/// the rule's. Said once per load (the parameter's value as overridden, or its default).
pub fn windows_beyond_retention(
    manifest: &lookout_plugin_sdk::Manifest,
    overrides: &[(String, String)],
    retention: Option<i64>,
) -> Vec<(String, String)> {
    let Some(retention) = retention else { return Vec::new() };
    manifest
        .parameters
        .iter()
        .map(|p| {
            let value = overrides.iter().rev().find(|(n, _)| *n == p.name).map_or(&p.default, |(_, v)| v);
            (p.name.clone(), value.clone())
        })
        .filter(|(_, v)| lookout_plugin_sdk::time::parse_duration(v).is_some_and(|d| d > retention))
        .collect()
}

/// A duration in ticks as `31d`, `12h` or `90s`.
pub fn duration_text(ticks: i64) -> String {
    let secs = ticks / lookout_plugin_sdk::time::TICKS_PER_SEC;
    match secs {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s => format!("{s}s"),
    }
}

fn warn_if_window_exceeds_retention(plugin: &Plugin, overrides: &[(String, String)], retention: Option<i64>) {
    for (name, value) in windows_beyond_retention(&plugin.manifest, overrides, retention) {
        tracing::warn!(
            detector = %plugin.id(),
            parameter = %name,
            value = %value,
            retention = %duration_text(retention.unwrap_or(0)),
            "a detector window is longer than the retention: rows it would reach are no longer kept; \
             raise --retention or shorten the parameter"
        );
    }
}

/// Input specs may only describe the manifest's input tables.
fn check_inputs(tables: &[String], specs: &[InputSpec]) -> Result<(), DetectorError> {
    match specs.iter().find(|s| !tables.contains(&s.table)) {
        Some(bad) => Err(DetectorError::UnknownInput { table: bad.table.clone(), inputs: tables.join(", ") }),
        None => Ok(()),
    }
}

/// The rows a pass hands to a detector: those stored by batches after `since` (every
/// stored row when `None`, a backfill), of its input tables, narrowed as its `init`
/// asked. A filter on an indexed column is answered from the index by batch range; any
/// other filter reads and checks each row.
fn input_refs(
    store: &Store,
    tables: &[String],
    specs: &[InputSpec],
    since: Option<u64>,
    head: u64,
) -> Result<Vec<RowRef>, StoreError> {
    let spec = |t: &str| specs.iter().find(|s| s.table == t);
    let filter = |t: &str| spec(t).map_or(&[][..], |s| s.only_where.as_slice());
    let from_index = |t: &str| store.indexed_condition(t, filter(t)).is_some();
    let mut keys: Vec<Vec<u8>> = Vec::new();
    match since {
        Some(c) => {
            // New rows of unfiltered tables (and filtered ones without an index) come from
            // the key frames of the blocks stored since the cursor; indexed filters below
            // read only the matching index entries. A filter on the key's SHA1/DeviceId is
            // a hash probe per key; any other reads the row.
            let select = |t: &str| -> Option<Select<'_>> {
                if !tables.iter().any(|x| x == t) || from_index(t) {
                    return None;
                }
                Some(match filter(t) {
                    [] => Select::All,
                    f => KeyMatcher::new(f).map_or(Select::Rows(f), Select::Keys),
                })
            };
            let mut lower = Vec::with_capacity(64);
            for t in tables {
                let Some(how) = select(t) else { continue };
                let probe = match &how {
                    Select::Keys(m) => m.sha1_probe(),
                    _ => None,
                };
                let mut rows = RowFilter::new(match &how {
                    Select::All => &[],
                    Select::Keys(m) => &m.filter,
                    Select::Rows(f) => f,
                });
                keys.extend(store.new_row_keys_where(t, c + 1, head, probe.as_ref(), |k, at| {
                    Ok(match &how {
                        Select::All => true,
                        Select::Keys(m) => match m.passes(k, &mut lower) {
                            Some(pass) => pass,
                            None => store.row_at_position_passes(at, &mut rows)?,
                        },
                        Select::Rows(_) => store.row_at_position_passes(at, &mut rows)?,
                    })
                })?);
            }
            for t in tables.iter().filter(|t| from_index(t)) {
                keys.extend(store.index_lookup(t, filter(t), Some((c + 1, head)))?.unwrap_or_default());
            }
        }
        None => {
            for t in tables {
                if spec(t).is_some_and(|s| !s.on_backfill) {
                    continue;
                }
                if filter(t).is_empty() {
                    keys.extend(store.all_row_keys(std::slice::from_ref(t))?);
                } else {
                    match store.index_lookup(t, filter(t), None)? {
                        Some(found) => keys.extend(found),
                        None => keys.extend(store.scan_where(t, filter(t))?),
                    }
                }
            }
        }
    }
    Ok(keys.iter().filter_map(|k| store.row_ref(k)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::normalise::{normalise, TableHints};

    /// The recorded parameters are the values the detector takes: the last of a name
    /// given twice. Recorded sorted with the duplicates kept, `lookback=30d, lookback=2d`
    /// (2d) and `lookback=2d, lookback=30d` (30d) were the same record, so widening the
    /// window that way did not read again what the narrow one had left out.
    #[test]
    fn parameters_are_recorded_as_the_detector_takes_them() {
        let p = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
        };
        let narrow = params_record(&p(&[("lookback", "30d"), ("lookback", "2d")]));
        let wide = params_record(&p(&[("lookback", "2d"), ("lookback", "30d")]));
        assert_ne!(narrow, wide);
        assert_eq!(narrow, params_record(&p(&[("lookback", "2d")])));
        assert_eq!(
            params_record(&p(&[("top", "3"), ("lookback", "2d")])),
            params_record(&p(&[("lookback", "2d"), ("top", "3")]))
        );
        assert_eq!(params_record(&p(&[("lookback", "2d")])), r#"[["lookback","2d"]]"#, "as earlier builds wrote it");
    }
    use lookout_plugin_sdk::tables::{FILE_EVENTS, IMAGE_LOADS};
    use lookout_plugin_sdk::{Condition, Row};
    use serde_json::Value;

    fn row(table: &str, report: i64, process: &str) -> crate::parse::normalise::NormalRow {
        let text = format!(
            r#"{{"Timestamp":"2025-05-07T16:55:49Z","DeviceId":"d","SHA1":"s{report}","ReportId":{report},"InitiatingProcessFileName":"{process}","ProcessCopy":"{process}"}}"#
        );
        let Value::Object(obj) = serde_json::from_str(&text).unwrap() else { unreachable!() };
        normalise(obj, Some(table), &TableHints::default()).unwrap()
    }

    fn keys_of(refs: Vec<RowRef>) -> Vec<Vec<u8>> {
        let mut k: Vec<Vec<u8>> = refs.into_iter().map(|r| r.key).collect();
        k.sort();
        k
    }

    /// A window parameter (default or overridden) longer than the retention is named;
    /// shorter ones, and any without retention, are not.
    #[test]
    fn windows_longer_than_the_retention_are_named() {
        let p = |name: &str, default: &str| lookout_plugin_sdk::Parameter {
            name: name.into(),
            default: default.into(),
            description: String::new(),
        };
        let manifest = lookout_plugin_sdk::Manifest {
            name: "d".into(),
            version: "1".into(),
            title: String::new(),
            description: String::new(),
            severity: String::new(),
            mitre: vec![],
            inputs: vec![],
            parameters: vec![p("lookback", "30d"), p("timeframe", "2d"), p("threshold", "100")],
            indexes: vec![],
        };
        let day = 86_400 * lookout_plugin_sdk::time::TICKS_PER_SEC;
        assert_eq!(windows_beyond_retention(&manifest, &[], Some(31 * day)), vec![]);
        assert_eq!(windows_beyond_retention(&manifest, &[], None), vec![]);
        assert_eq!(
            windows_beyond_retention(&manifest, &[], Some(7 * day)),
            vec![("lookback".to_string(), "30d".to_string())]
        );
        let overridden = [("lookback".to_string(), "5d".to_string()), ("timeframe".to_string(), "8d".to_string())];
        assert_eq!(
            windows_beyond_retention(&manifest, &overridden, Some(7 * day)),
            vec![("timeframe".to_string(), "8d".to_string())]
        );
        assert_eq!(duration_text(7 * day), "7d");
    }

    /// New rows chosen by `SHA1 in~ (…)` skip the blocks whose SHA1 filter holds none of
    /// the values: across batches of several blocks, stored SHA1s in either case, the rows
    /// handed over are exactly those a check of each row finds.
    #[test]
    fn a_sha1_condition_skips_blocks_but_no_row_it_meets() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let sha1 = |i: i64| if i % 2 == 0 { format!("{:040x}", i * 7919) } else { format!("{:040X}", i * 7919) };
        let mut report = 0;
        for _ in 0..3 {
            let mut b = store.batch();
            for _ in 0..1200 {
                report += 1;
                let text = format!(
                    r#"{{"Timestamp":"2025-05-07T16:55:49Z","DeviceId":"d{}","SHA1":"{}","Sha1Copy":"{}","ReportId":{report}}}"#,
                    report % 7,
                    sha1(report),
                    sha1(report)
                );
                let Value::Object(obj) = serde_json::from_str(&text).unwrap() else { unreachable!() };
                b.add_row(&normalise(obj, Some(FILE_EVENTS), &TableHints::default()).unwrap(), 0).unwrap();
            }
            b.commit().unwrap();
        }
        let head = store.head_seq();
        // Values from the first, middle and last blocks, in the other case than stored, and
        // values stored nowhere.
        let wanted: Vec<String> = [1, 2, 700, 1799, 3600]
            .iter()
            .map(|i| {
                let s = sha1(*i);
                if i % 2 == 0 {
                    s.to_ascii_uppercase()
                } else {
                    s.to_ascii_lowercase()
                }
            })
            .chain(["0".repeat(40), "F".repeat(40)])
            .collect();
        let spec = |column: &str| {
            vec![InputSpec {
                table: FILE_EVENTS.into(),
                only_where: vec![Condition::In { column: column.into(), any_of: wanted.clone() }],
                on_backfill: true,
            }]
        };
        let tables = vec![FILE_EVENTS.to_string()];
        for since in [0, 1, 2] {
            let from_keys = keys_of(input_refs(&store, &tables, &spec("SHA1"), Some(since), head).unwrap());
            let from_rows = keys_of(input_refs(&store, &tables, &spec("Sha1Copy"), Some(since), head).unwrap());
            let expected = [1, 2, 700, 1799, 3600].iter().filter(|i| **i > since as i64 * 1200).count();
            assert_eq!(from_keys.len(), expected, "since {since}");
            assert_eq!(from_keys, from_rows, "since {since}");
        }
        // And blocks are skipped: of the nine blocks (512, 512 and 176 rows a batch), only
        // the four holding a wanted value are read (1,712 keys), a false positive aside.
        let lower: Vec<String> = wanted.iter().map(|w| w.to_ascii_lowercase()).collect();
        let probe = Sha1Probe::new([lower.iter().map(|w| w.as_bytes())]);
        let mut read = 0;
        store
            .new_row_keys_where(FILE_EVENTS, 1, head, Some(&probe), |_, _| {
                read += 1;
                Ok(true)
            })
            .unwrap();
        assert!((1712..=1712 + 512).contains(&read), "{read} keys read of 3,600");
        let nothing = vec![InputSpec {
            table: FILE_EVENTS.into(),
            only_where: vec![Condition::In { column: "SHA1".into(), any_of: Vec::new() }],
            on_backfill: true,
        }];
        assert!(input_refs(&store, &tables, &nothing, Some(0), head).unwrap().is_empty());
    }

    /// A filter answered from the column index and the same filter on a column without
    /// an index (read row by row) hand over the same rows, for every cursor position and
    /// on a backfill; a table a backfill skips still comes in incremental passes.
    #[test]
    fn indexed_and_unindexed_filters_select_the_same_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.declare_indexes(&[crate::store::process_index(IMAGE_LOADS)]).unwrap();
        let processes = ["wsmprovhost.exe", "WSMPROVHOST.EXE", "svchost.exe", "explorer.exe"];
        let mut report = 0;
        for batch in 0..6 {
            let mut b = store.batch();
            for i in 0..(3 + batch % 3) {
                report += 1;
                let table = if i % 3 == 2 { FILE_EVENTS } else { IMAGE_LOADS };
                b.add_row(&row(table, report, processes[(report as usize * 7 + batch) % 4]), 0).unwrap();
            }
            b.commit().unwrap();
        }
        let tables = vec![IMAGE_LOADS.to_string(), FILE_EVENTS.to_string()];
        let spec = |column: &str| {
            vec![
                InputSpec {
                    table: IMAGE_LOADS.into(),
                    only_where: vec![Condition::In { column: column.into(), any_of: vec!["WsmProvHost.exe".into()] }],
                    on_backfill: true,
                },
                InputSpec { table: FILE_EVENTS.into(), only_where: Vec::new(), on_backfill: false },
            ]
        };
        assert!(store.is_indexed(IMAGE_LOADS, "InitiatingProcessFileName"));
        assert!(!store.is_indexed(IMAGE_LOADS, "ProcessCopy"));
        let head = store.head_seq();
        for since in [None, Some(0), Some(1), Some(3), Some(head - 1)] {
            let by_index =
                keys_of(input_refs(&store, &tables, &spec("InitiatingProcessFileName"), since, head).unwrap());
            let by_rows = keys_of(input_refs(&store, &tables, &spec("ProcessCopy"), since, head).unwrap());
            assert_eq!(by_index, by_rows, "since {since:?}");
            let loads = by_index.iter().filter(|k| store.key_table(k) == Some(IMAGE_LOADS)).count();
            let writes = by_index.len() - loads;
            assert!(loads > 0, "since {since:?}: some loads match");
            assert_eq!(writes > 0, since.is_some(), "since {since:?}: writes only in incremental passes");
            for k in &by_index {
                if store.key_table(k) == Some(IMAGE_LOADS) {
                    let r = store.get_row::<Row>(k).unwrap().unwrap();
                    assert!(r.str("InitiatingProcessFileName").eq_ignore_ascii_case("wsmprovhost.exe"));
                }
            }
        }
        // A filter on SHA1 is decided from the keys (hash probes), ignoring ASCII case, and
        // agrees with the same condition checked on the rows.
        let by_sha1 = |column: &str| {
            vec![InputSpec {
                table: FILE_EVENTS.into(),
                only_where: vec![Condition::In { column: column.into(), any_of: vec!["S3".into(), "s6".into()] }],
                on_backfill: true,
            }]
        };
        let writes = vec![FILE_EVENTS.to_string()];
        let from_keys = input_refs(&store, &writes, &by_sha1("SHA1"), Some(0), head).unwrap();
        let mut sha1s: Vec<&str> = from_keys.iter().map(|r| r.sha1.as_str()).collect();
        sha1s.sort();
        assert_eq!(sha1s, ["s3", "s6"]);
        let from_rows = input_refs(&store, &writes, &by_sha1("SHA1"), None, head).unwrap();
        assert_eq!(keys_of(from_keys), keys_of(from_rows), "journal (keys) and backfill (rows) agree");

        // Unfiltered: every row of the range.
        let all = input_refs(&store, &tables, &[], Some(0), head).unwrap();
        assert_eq!(all.len() as i64, report);
    }
}
