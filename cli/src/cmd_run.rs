//! `lookout run`: the service, configured by flags and/or `lookout.toml`.

use crate::cmd_plugins::resolve_dir;
use crate::output::{parse_now, parse_time, RetentionArg};
use crate::{LogFormat, DEFAULT_DATA};
use anyhow::{anyhow, Context, Result};
use clap::Args;
use lookout_core::daemon::{self, DaemonConfig};
use lookout_core::ingest::IngestOptions;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct RunArgs {
    /// Folder the collector writes (and rotates) log files in
    #[arg(long)]
    logs: Option<PathBuf>,
    /// Plugins folder, watched for libraries dropped in, changed or removed
    #[arg(long)]
    plugins: Option<PathBuf>,
    /// Findings JSONL file [default: <data>/findings.jsonl]
    #[arg(long)]
    findings: Option<PathBuf>,
    /// Configuration file (TOML); flags override it
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address of the /metrics and /status endpoint [default: 127.0.0.1:9464]
    #[arg(long)]
    listen: Option<String>,
    /// Look at the folders at least this often, in seconds, even without notifications
    #[arg(long)]
    rescan_secs: Option<f64>,
    /// Override a detector parameter (DETECTOR.PARAM=VALUE)
    #[arg(long = "set", value_name = "DETECTOR.PARAM=VALUE")]
    set: Vec<String>,
    /// How many detectors' passes run at once [default: one per core, or `detect_threads`
    /// in the config file]
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    detect_threads: Option<u16>,
    /// Fix the evaluation time of every pass (RFC 3339), for replaying old data
    #[arg(long)]
    now: Option<String>,
    /// Fix the ingestion time recorded for every row (RFC 3339), for replaying old data
    #[arg(long)]
    ingest_now: Option<String>,
    /// Read the current time (RFC 3339) from this file at every look, as both the
    /// evaluation and the ingestion time: a clock you move yourself, for replaying data at
    /// a chosen pace or testing what the clock alone changes (a window edge passing)
    #[arg(long, value_name = "FILE")]
    clock_file: Option<PathBuf>,
    #[command(flatten)]
    retention: RetentionArg,
    #[cfg(feature = "kafka")]
    #[command(flatten)]
    pub kafka: crate::cmd_kafka::NodeArgs,
}

/// `lookout.toml`. Every key is optional; flags win over the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    data: Option<PathBuf>,
    logs: Option<PathBuf>,
    plugins: Option<PathBuf>,
    findings: Option<PathBuf>,
    listen: Option<String>,
    log_format: Option<LogFormat>,
    rescan_secs: Option<f64>,
    /// How many detectors' passes run at once (0 or absent: one per core).
    detect_threads: Option<u16>,
    max_line_bytes: Option<usize>,
    /// How long rows are kept (`31d`; `none` keeps everything).
    retention: Option<String>,
    /// `[detectors.<name>]` tables of parameter = "value".
    #[serde(default)]
    detectors: BTreeMap<String, BTreeMap<String, toml::Value>>,
    /// `[kafka]`: a node of a consumer group (`run --kafka`; builds with the `kafka`
    /// feature). Read by `cmd_kafka`.
    pub kafka: Option<toml::Value>,
}

pub fn read_config(path: &Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// The log format from the config file, if the file names one (read before logging starts).
pub fn log_format_of(args: &RunArgs) -> Option<LogFormat> {
    args.config.as_deref().and_then(|p| read_config(p).ok()).and_then(|c| c.log_format)
}

pub fn run(data_flag: Option<&Path>, args: RunArgs) -> Result<ExitCode> {
    let cfg = match &args.config {
        Some(p) => read_config(p)?,
        None => ConfigFile::default(),
    };
    let data = data_flag.map(Path::to_path_buf).or(cfg.data.clone()).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA));
    #[cfg(feature = "kafka")]
    let kafka = args.kafka.kafka;
    #[cfg(not(feature = "kafka"))]
    let kafka = false;
    if cfg.kafka.is_some() && !kafka {
        tracing::warn!(
            "the config file's [kafka] table is used only by `lookout run --kafka` (a build with the `kafka` feature)"
        );
    }
    let logs = match args.logs.clone().or(cfg.logs.clone()) {
        Some(l) => Some(l),
        None if kafka => None,
        None => return Err(anyhow!("no logs folder: pass --logs DIR or set logs = \"...\" in the config file")),
    };
    let plugins = match args.plugins.clone().or(cfg.plugins.clone()) {
        Some(p) => p,
        None => resolve_dir(&None)?,
    };
    let findings = args.findings.clone().or(cfg.findings.clone()).unwrap_or_else(|| data.join("findings.jsonl"));
    let listen = args.listen.clone().or(cfg.listen.clone()).unwrap_or_else(|| "127.0.0.1:9464".to_string());
    let rescan = args.rescan_secs.or(cfg.rescan_secs).unwrap_or(2.0);
    if !(rescan > 0.0 && rescan < 3600.0) {
        return Err(anyhow!(
            "rescan interval {rescan}s (--rescan-secs or rescan_secs): expected more than 0 and less than 3600 seconds"
        ));
    }
    let mut params = Vec::new();
    for (det, kv) in &cfg.detectors {
        for (k, v) in kv {
            let v = match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            params.push((det.clone(), k.clone(), v));
        }
    }
    for s in &args.set {
        let (d, p, v) = lookout_core::detect::parse_set(s)?;
        params.retain(|(d2, p2, _)| !(d2 == &d && p2 == &p));
        params.push((d, p, v));
    }
    let mut ingest = IngestOptions {
        now: args.ingest_now.as_deref().map(|s| parse_time("--ingest-now", s)).transpose()?,
        ..Default::default()
    };
    if let Some(m) = cfg.max_line_bytes {
        let limit = lookout_core::ingest::MAX_LINE_LIMIT;
        if m == 0 || m > limit {
            return Err(anyhow!("max_line_bytes = {m} in the config file: it must be 1 to {limit} (a stored row can take no more); fix the config file"));
        }
        ingest.max_line = m;
    }
    let now = args.now.as_deref().map(parse_now).transpose()?;
    let retention = args.retention.resolve(cfg.retention.as_deref())?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // A second signal while the first is being honoured ends the process at once (a
        // detector stuck in its pass would otherwise hold the stop up): as a crash, which
        // loses nothing committed.
        signal_hook::flag::register_conditional_shutdown(sig, 1, stop.clone())
            .context("cannot install the signal handler")?;
        signal_hook::flag::register(sig, stop.clone()).context("cannot install the signal handler")?;
    }
    let config = DaemonConfig {
        data,
        // A Kafka node's file feed is optional (the check below is for the daemon).
        logs: logs.clone().unwrap_or_default(),
        plugins,
        findings,
        listen,
        rescan: Duration::from_secs_f64(rescan),
        params,
        ingest,
        now,
        retention,
        retention_given: args.retention.retention.is_some() || cfg.retention.is_some(),
        clock_file: args.clock_file.clone(),
        detect_threads: usize::from(args.detect_threads.or(cfg.detect_threads).unwrap_or(0)),
    };
    #[cfg(feature = "kafka")]
    if kafka {
        return crate::cmd_kafka::run_node(&args.kafka, cfg.kafka.as_ref(), config, logs, stop);
    }
    if logs.is_none() {
        return Err(anyhow!("no logs folder: pass --logs DIR or set logs = \"...\" in the config file"));
    }
    daemon::run(config, stop)?;
    Ok(ExitCode::SUCCESS)
}
