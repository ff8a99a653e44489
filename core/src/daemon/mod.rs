//! `lookout run`: the service. One thread does the work in a loop — look at the logs
//! folder (on a notification, or every rescan interval), store what is new, run the
//! detectors over it, write the findings — so there is never more than one writer. A
//! second thread serves `/metrics` and `/status`.

pub mod backoff;
pub mod findings_out;
pub mod http;
pub mod metrics;
pub mod plugin_set;
pub mod watch;

use crate::detect::{run_pass, DetectOptions, PassError};
use crate::error::{Chain, StoreError};
use crate::findings::flush_outbox;
use crate::ingest::{IngestError, IngestOptions};
use crate::plugin::FolderError;
use crate::store::Store;
use crate::tail::Tailer;
use findings_out::FindingsOut;
use metrics::Metrics;
use plugin_set::PluginSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Why the service could not start, or why its work loop failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("logs folder {} does not exist or is not a folder", .0.display())]
    NoLogsFolder(PathBuf),
    #[error("cannot listen on {addr} (use --listen to pick another address)")]
    Listen {
        addr: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot start the endpoint thread")]
    EndpointThread(#[source] std::io::Error),
    #[error("cannot write {}", path.display())]
    AddrFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The plugins folder could not be read (a refused folder or library is not an error).
    #[error(transparent)]
    Plugins(#[from] FolderError),
    /// The tailer failed (a file it could not read is skipped, not an error).
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Detect(#[from] PassError),
    #[error("cannot write the findings")]
    Findings(#[source] StoreError),
    /// Stopped (SIGINT/SIGTERM) with findings the findings file could not be given.
    #[error("stopped with {count} findings not written to {} (they are kept in the database and written at the next start)", file.display())]
    StoppedWithUnwritten {
        count: u64,
        file: PathBuf,
        #[source]
        source: Box<DaemonError>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub data: PathBuf,
    pub logs: PathBuf,
    pub plugins: PathBuf,
    pub findings: PathBuf,
    /// Address of the metrics/status endpoint (`127.0.0.1:9464`; port 0 picks one).
    pub listen: String,
    /// Look at the folders at least this often, notifications or not.
    pub rescan: Duration,
    /// `DETECTOR.PARAM=VALUE` overrides.
    pub params: Vec<(String, String, String)>,
    pub ingest: IngestOptions,
    /// Fixes the evaluation time of every pass (tests); the clock otherwise.
    pub now: Option<i64>,
    /// How long rows are kept (ticks; `None`: forever).
    pub retention: Option<i64>,
    /// Whether `retention` was given (a flag or the config file). If not, the retention
    /// the data directory recorded wins over it (the default): the horizon never moves
    /// back, so a shorter default would remove for good rows a longer retention kept.
    pub retention_given: bool,
    /// A file holding the current time (RFC 3339), read at every look and used as both
    /// the evaluation and the ingestion time: a clock someone else moves (replays at a
    /// chosen pace; tests of what the clock alone changes). Wins over `now`.
    pub clock_file: Option<PathBuf>,
    /// How many detectors' passes run at once (0: one per core).
    pub detect_threads: usize,
}

/// The store's new findings to the findings file, unless it failed and the time to try
/// it again has not come.
fn write_findings(
    out: &mut FindingsOut,
    store: &mut Store,
    path: &Path,
    metrics: &Mutex<Metrics>,
) -> Result<u64, DaemonError> {
    out.write(path, metrics, store, |s| flush_outbox(s, path), |s| crate::findings::unwritten(s, path).unwrap_or(0))
        .map_err(DaemonError::Findings)
}

/// The time in the clock file, or why it cannot be read; said once per change of reason.
fn read_clock_file(path: &std::path::Path, warned: &mut Option<String>) -> Option<i64> {
    let reading = std::fs::read_to_string(path).map_err(|e| e.to_string()).and_then(|t| {
        lookout_plugin_sdk::time::parse_timestamp(t.trim())
            .ok_or_else(|| format!("'{}' is not an RFC 3339 UTC time", t.trim()))
    });
    match reading {
        Ok(t) => {
            *warned = None;
            Some(t)
        }
        Err(e) => {
            if warned.as_deref() != Some(e.as_str()) {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the clock file");
                *warned = Some(e);
            }
            None
        }
    }
}

/// A retention as the log says it: `31d`, or `none`.
pub(crate) fn retention_text(retention: Option<i64>) -> String {
    retention.map_or_else(|| "none".to_string(), crate::detect::duration_text)
}

/// Runs until `stop` is set (SIGINT/SIGTERM): then finishes the batch in hand, writes
/// the findings, flushes and returns.
///
/// A failure of the work loop after a good start (a full disk, an I/O error) does not end
/// the service: the store is closed and reopened after a back-off, so ingestion resumes
/// when the cause is gone. Problems at the start (a locked database, a bad address) are
/// returned: they are the operator's to fix.
pub fn run(mut cfg: DaemonConfig, stop: Arc<AtomicBool>) -> Result<(), DaemonError> {
    if !cfg.logs.is_dir() {
        return Err(DaemonError::NoLogsFolder(cfg.logs.clone()));
    }
    let metrics = Arc::new(Mutex::new(Metrics::default()));
    let db: http::SharedDb = Arc::new(RwLock::new(None));
    let mut store = Store::open(&cfg.data)?;
    store.interrupt_on(stop.clone());
    if !cfg.retention_given {
        if let Some(recorded) = store.recorded_retention()? {
            if recorded != cfg.retention {
                tracing::info!(retention = %retention_text(recorded), "no retention given: keeping the one this data directory recorded");
            }
            cfg.retention = recorded;
        }
    }
    // For `lookout ingest` or `detect` run by hand on this data directory later.
    store.record_retention(cfg.retention)?;
    *db.write().unwrap_or_else(|p| p.into_inner()) = Some(store.reader());
    // The endpoint stays up across work-loop restarts, so a stuck daemon can be seen.
    let endpoint = http::Endpoint::start(&cfg.listen, db.clone(), &cfg.data, metrics.clone())?;
    // Names a detector whose call runs long: one stuck in its own code holds up the work
    // loop with nothing else to say which.
    let _call_watch = crate::plugin::running::watch(crate::plugin::running::WatchTimes::default())
        .map_err(|e| tracing::warn!(error = %e, "cannot start the watch over detector calls; carrying on without it"))
        .ok();
    let addr_file = http::addr_file(&cfg.data);
    std::fs::write(&addr_file, endpoint.addr.to_string())
        .map_err(|source| DaemonError::AddrFile { path: addr_file.clone(), source })?;
    tracing::info!(
        data = %cfg.data.display(),
        logs = %cfg.logs.display(),
        plugins = %cfg.plugins.display(),
        findings = %cfg.findings.display(),
        retention = %retention_text(cfg.retention),
        listen = %endpoint.addr,
        "lookout running"
    );

    // Kept across work-loop restarts: its descriptors are how rotated files deleted since
    // are still read to their end.
    let mut tailer = Tailer::new(&cfg.logs, cfg.ingest.clone());
    let mut backoff = backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let result: Result<(), DaemonError> = loop {
        let started = Instant::now();
        let worked = work(&cfg, &mut store, &mut tailer, &metrics, &stop)
            .and_then(|()| flush_outbox(&mut store, &cfg.findings).map(|_| ()).map_err(DaemonError::Findings))
            .and_then(|()| Ok(store.flush_and_save_key_filter()?));
        let e = match worked {
            Ok(()) => break Ok(()),
            Err(e) => e,
        };
        // Findings committed and not written: a stop now says so, and does not exit 0.
        let unwritten = crate::findings::unwritten(&store, &cfg.findings).unwrap_or_else(|e| {
            tracing::warn!(error = %Chain(&e), "cannot count the findings not written yet");
            0
        });
        let stopped_with = |e: DaemonError| match unwritten {
            0 => {
                tracing::warn!(error = %Chain(&e), "stopping after a failure of the work loop");
                Ok(())
            }
            count => Err(DaemonError::StoppedWithUnwritten { count, file: cfg.findings.clone(), source: Box::new(e) }),
        };
        if stop.load(Ordering::Relaxed) {
            // The stop's own flush failed (or the loop failed as it stopped).
            break stopped_with(e);
        }
        let mut wait = backoff.after_failure(started.elapsed());
        tracing::error!(error = %Chain(&e), retry_in = ?wait, "work loop failed; reopening the database and retrying");
        metrics.lock().unwrap_or_else(|p| p.into_inner()).restarts += 1;
        // Everything committed is intact and everything else is read again, so the way
        // back from (say) a full disk is to drop every handle, wait, and reopen.
        *db.write().unwrap_or_else(|p| p.into_inner()) = None;
        drop(store);
        let reopened = loop {
            let until = Instant::now() + wait;
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if stop.load(Ordering::Relaxed) {
                break None;
            }
            // Opening the database writes to it (sled's recovery snapshot); doing that on
            // a full disk can leave a snapshot sled refuses on every later open. Wait for
            // room first.
            match crate::disk::free_bytes(&cfg.data) {
                Some(free) if free < crate::disk::MIN_FREE => {
                    wait = backoff.after_failure(Duration::ZERO);
                    tracing::warn!(
                        data = %cfg.data.display(),
                        free_mib = free >> 20,
                        need_mib = crate::disk::MIN_FREE >> 20,
                        retry_in = ?wait,
                        "waiting for free space before reopening the database"
                    );
                    continue;
                }
                _ => {}
            }
            match Store::open(&cfg.data) {
                // What was read and not committed is read again. The tailer is kept: its
                // descriptors are how files rotated and deleted meanwhile are read to
                // their end; a store that cannot say what is committed is opened again.
                Ok(s) => match tailer.back_to_committed_all(&s) {
                    Ok(()) => break Some(s),
                    Err(e) => {
                        wait = backoff.after_failure(Duration::ZERO);
                        tracing::error!(error = %Chain(&e), retry_in = ?wait, "cannot read what is committed of the open log files; reopening the database again");
                    }
                },
                Err(e) => {
                    wait = backoff.after_failure(Duration::ZERO);
                    tracing::error!(error = %crate::error::Chain(&e), retry_in = ?wait, "cannot reopen the database yet")
                }
            }
        };
        match reopened {
            Some(s) => {
                store = s;
                store.interrupt_on(stop.clone());
                *db.write().unwrap_or_else(|p| p.into_inner()) = Some(store.reader());
            }
            // Stopped while waiting to reopen: the failure was logged; a stop asked for
            // is a clean exit (what was committed is intact), unless findings are left
            // unwritten.
            None => break stopped_with(e),
        }
    };
    let _ = std::fs::remove_file(&addr_file);
    endpoint.stop();
    result?;
    tracing::info!("lookout stopped");
    Ok(())
}

fn work(
    cfg: &DaemonConfig,
    store: &mut Store,
    tailer: &mut Tailer,
    metrics: &Mutex<Metrics>,
    stop: &Arc<AtomicBool>,
) -> Result<(), DaemonError> {
    let watch = watch::Watch::new(&cfg.logs, &cfg.plugins);
    let mut plugins = PluginSet::new(&cfg.plugins, &cfg.data);
    // The set's refusals already added to the metric.
    let mut failures_counted = 0;
    let mut said_none_loaded = false;
    let mut last_rescan = Instant::now() - cfg.rescan;
    let mut changes = watch::Changes { logs: true, plugins: true };
    let mut detect_opts = DetectOptions {
        now: cfg.now,
        params: cfg.params.clone(),
        stop: Some(stop.clone()),
        threads: cfg.detect_threads,
        ..DetectOptions::default()
    };
    let mut first = true;
    let mut clock_warned = None;
    let mut findings_out = FindingsOut::default();
    while !stop.load(Ordering::Relaxed) {
        if let Some(path) = &cfg.clock_file {
            match read_clock_file(path, &mut clock_warned) {
                Some(t) => {
                    detect_opts.now = Some(t);
                    tailer.set_now(Some(t));
                }
                // Keep the last good time. Before the first one there is no time to store
                // rows at or to move the retention horizon to (the wall clock could make a
                // replay's rows expired for good): wait for one.
                None if detect_opts.now.is_some() => {}
                None => {
                    changes = watch.wait(cfg.rescan, stop);
                    continue;
                }
            }
        }
        let now = crate::clock::Clock::new(detect_opts.now.or(cfg.ingest.now)).now();
        // The time passes evaluate at (`--ingest-now` alone fixes only ingestion).
        let eval_now = crate::clock::Clock::new(detect_opts.now).now();
        let rescan = last_rescan.elapsed() >= cfg.rescan;
        if rescan {
            last_rescan = Instant::now();
        }
        // Writing on a full disk can wedge the database (sled waits forever for a write
        // that failed): stop writing while the disk is nearly full, resume when it is not.
        let free = crate::disk::free_bytes(&cfg.data);
        let low = free.is_some_and(|f| f < crate::disk::MIN_FREE);
        {
            let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
            if low && !m.disk_space_low {
                m.disk_space_pauses += 1;
                tracing::warn!(
                    data = %cfg.data.display(),
                    free_mib = free.unwrap_or(0) >> 20,
                    need_mib = crate::disk::MIN_FREE >> 20,
                    "disk space low: ingestion and detection paused until there is room (nothing is lost)"
                );
            } else if !low && m.disk_space_low {
                tracing::info!(data = %cfg.data.display(), "disk space is back: resuming");
            }
            m.disk_space_low = low;
        }
        if low {
            // Keep what was seen meanwhile (a plugin dropped in) for when writing resumes.
            let seen = watch.wait(cfg.rescan.max(Duration::from_millis(200)), stop);
            changes = watch::Changes { logs: changes.logs || seen.logs, plugins: changes.plugins || seen.plugins };
            continue;
        }
        let plugins_changed = if changes.plugins || rescan { plugins.refresh()? } else { false };
        // Said once each time the set becomes empty (a daemon started with no plugins
        // folder, one emptied while it runs), not at every look.
        if plugins.plugins.is_empty() && !said_none_loaded {
            tracing::warn!(plugins = %cfg.plugins.display(), "no detector is loaded: rows are stored, nothing is detected (drop a detector library into the plugins folder)");
        }
        said_none_loaded = plugins.plugins.is_empty();
        if plugins_changed {
            if let Err(e) = crate::detect::check_params(&plugins.plugins, &detect_opts.params) {
                tracing::warn!(error = %e, "settings for a detector that is not loaded are not used");
            }
        }
        // The horizon follows the clock (or the fixed time); expired blocks go a bounded
        // step at a time, so a large backlog never holds up ingestion for long.
        store.set_retention(cfg.retention);
        store.advance_clock(now)?;
        store.expire_step(crate::store::retention::BLOCKS_PER_STEP)?;
        // The start of the read that the finding latency is measured from.
        let poll_started = Instant::now();
        let report = tailer.poll(store, stop)?;
        metrics.lock().unwrap_or_else(|p| p.into_inner()).observe_stored(&report.new_rows);
        if report.total_rejected() > 0 {
            tracing::warn!(rejected = report.total_rejected(), "bad records kept aside (lookout status --rejects)");
        }
        // A detector that asked to be woken (a window edge passing) runs with no new row.
        let wake = crate::detect::next_wake(store, &plugins.plugins)?;
        let due = wake.is_some_and(|at| at <= eval_now);
        if report.changed() || plugins_changed || first || due {
            first = false;
            let pass_started = Instant::now();
            let reports = match run_pass(store, &mut plugins.plugins, &detect_opts) {
                Ok(reports) => reports,
                Err(e) => {
                    // A store failure in one detector's pass ends the pass, and the loop
                    // starts again; what the others committed goes out first, or a failure
                    // that persists (one detector's damaged state) would hold it back.
                    if crate::disk::free_bytes(&cfg.data).is_none_or(|f| f >= crate::disk::MIN_FREE) {
                        if let Err(fe) = flush_outbox(store, &cfg.findings) {
                            tracing::warn!(file = %cfg.findings.display(), error = %Chain(&fe), "cannot write the findings of the detectors that finished");
                        }
                    }
                    return Err(e.into());
                }
            };
            let pass_time = pass_started.elapsed();
            if reports.iter().any(|r| r.rows > 0 || r.new_findings > 0) {
                tracing::debug!(
                    detectors = reports.len(),
                    rows = reports.iter().map(|r| r.rows).sum::<u64>(),
                    pass_ms = pass_time.as_secs_f64() * 1e3,
                    init_ms = reports.iter().map(|r| r.init.as_secs_f64() * 1e3).sum::<f64>(),
                    "detection pass"
                );
            }
            let written = write_findings(&mut findings_out, store, &cfg.findings, metrics)?;
            let latency = poll_started.elapsed();
            if written > 0 {
                tracing::info!(findings = written, file = %cfg.findings.display(), "new findings");
            }
            let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
            for r in reports {
                if r.rows > 0 || r.new_findings > 0 {
                    tracing::debug!(
                        detector = %r.detector,
                        rows = r.rows,
                        findings = r.new_findings,
                        choosing_ms = r.select.as_secs_f64() * 1e3,
                        detector_ms = r.evaluate.as_secs_f64() * 1e3,
                        committing_ms = r.commit.as_secs_f64() * 1e3,
                        init_ms = r.init.as_secs_f64() * 1e3,
                        "detector pass"
                    );
                }
                let labels = metrics::DetectorLabels { detector: r.detector.clone(), version: r.version.clone() };
                m.observe_pass(&labels, r.elapsed, r.rows, r.new_findings, r.error.is_some());
                // Only findings that follow a look that stored rows: a pass run because a
                // plugin was dropped in finds what was read long before.
                if report.changed() {
                    m.observe_findings(&labels, r.new_findings, latency);
                }
            }
        }
        if findings_out.retry_due() {
            // The findings file failed at the last pass: tried again, with no new pass.
            write_findings(&mut findings_out, store, &cfg.findings, metrics)?;
        }
        {
            let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
            m.polls += 1;
            m.behind = tailer.behind();
            // A counter across work-loop restarts, each of which starts a new plugin set.
            m.detectors_loaded = plugins.plugins.len() as u64;
            m.plugin_load_failures += plugins.failures.saturating_sub(failures_counted);
            failures_counted = plugins.failures;
            m.skipped_files.clear();
            for reason in tailer.skipped().values() {
                *m.skipped_files.entry(reason.to_string()).or_insert(0) += 1;
            }
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut wait = cfg.rescan.saturating_sub(last_rescan.elapsed()).max(Duration::from_millis(1));
        // On the wall clock, wake up for the next detector wake-up too.
        if let (Some(at), None) = (crate::detect::next_wake(store, &plugins.plugins)?, detect_opts.now) {
            let ticks = at.saturating_sub(crate::clock::now_ticks()).max(0) as u64;
            wait = wait.min(Duration::from_micros(ticks / 10).max(Duration::from_millis(1)));
        }
        if let Some(at) = findings_out.retry_at() {
            wait = wait.min(at.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
        }
        // And for a detector's retry after a failure (its wake-up does not count meanwhile).
        if let Some(retry) = plugins.plugins.iter().filter_map(|p| p.retry_at).min() {
            wait = wait.min(retry.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
        }
        changes = watch.wait(wait, stop);
    }
    Ok(())
}
