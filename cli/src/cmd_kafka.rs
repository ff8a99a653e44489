//! `lookout split` and `lookout run --kafka` (builds with the `kafka` feature): the flags,
//! the `[kafka]` table of lookout.toml, and handing both to `lookout_core::kafka`.

use anyhow::{anyhow, Context, Result};
use clap::Args;
use lookout_core::daemon::DaemonConfig;
use lookout_core::kafka::node::{run_node as run_kafka_node, NodeConfig};
use lookout_core::kafka::split::{run_split, SplitConfig};
use lookout_core::kafka::KafkaSettings;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// `[kafka]` in lookout.toml. Flags win over it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KafkaFile {
    brokers: Option<String>,
    topic: Option<String>,
    group: Option<String>,
    findings_topic: Option<String>,
    /// An Event Hubs namespace's connection string: sets SASL_SSL with PLAIN.
    event_hubs_connection_string: Option<String>,
    /// Any librdkafka property (`"session.timeout.ms" = "6000"`), set last.
    #[serde(default)]
    properties: BTreeMap<String, toml::Value>,
}

/// A number of seconds from a flag: finite, 0 to one day.
fn seconds(flag: &str, s: f64) -> Result<Duration> {
    if !(s.is_finite() && (0.0..=86_400.0).contains(&s)) {
        return Err(anyhow!("{flag} {s}: expected a number of seconds between 0 and 86400"));
    }
    Ok(Duration::from_secs_f64(s))
}

fn kafka_file(value: Option<&toml::Value>) -> Result<KafkaFile> {
    match value {
        None => Ok(KafkaFile::default()),
        Some(v) => v.clone().try_into().map_err(|e| anyhow!("the config file's [kafka] table: {e}")),
    }
}

fn settings(brokers: Option<&str>, file: &KafkaFile) -> Result<KafkaSettings> {
    let brokers = brokers
        .map(str::to_string)
        .or(file.brokers.clone())
        .ok_or_else(|| anyhow!("no Kafka brokers: pass --brokers HOST:PORT[,…] or set brokers in [kafka]"))?;
    let mut properties = Vec::new();
    if let Some(cs) = &file.event_hubs_connection_string {
        properties.extend(KafkaSettings::event_hubs(cs));
    }
    for (k, v) in &file.properties {
        let v = match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        properties.push((k.clone(), v));
    }
    Ok(KafkaSettings { brokers, properties })
}

#[derive(Args)]
pub struct SplitArgs {
    /// Kafka bootstrap servers (HOST:PORT,…); Event Hubs: <namespace>.servicebus.windows.net:9093
    #[arg(long)]
    brokers: String,
    /// Topic of Streaming-API messages (`{"records":[…]}` or one record per message)
    #[arg(long)]
    from: String,
    /// Topic to produce the records to, keyed by DeviceId (`run --kafka` reads it)
    #[arg(long)]
    to: String,
    /// Consumer group whose committed offsets are the split's progress
    #[arg(long, default_value = "lookout-split")]
    group: String,
    /// Topic for records with no DeviceId [default: <to>.unkeyed]
    #[arg(long)]
    unkeyed_topic: Option<String>,
    /// Topic for messages and records that are not JSON objects, and for a small JSON
    /// object ({"lookout_set_aside":…, "topic", "partition", "offset", …}) in place of each
    /// record too big to produce [default: <to>.rejected]
    #[arg(long)]
    rejected_topic: Option<String>,
    /// Tables whose records go to every partition: rules join them by SHA1 across devices
    /// (scm-remote-process's certificate anti-join); `none` for no table
    #[arg(long, value_delimiter = ',', default_value = "DeviceFileCertificateInfo")]
    broadcast: Vec<String>,
    /// Input messages per produced-and-committed batch
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Most bytes of one produced message: a batch's records of one device go out
    /// together in Streaming-API messages ({"records":[…]}) up to this size (a record
    /// bigger than this goes alone). Keep it below the brokers' message.max.bytes
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 10)]
    message_bytes: usize,
    /// Stop after this many seconds with nothing to read (a one-shot backfill); runs
    /// until SIGTERM/SIGINT otherwise
    #[arg(long, value_name = "SECONDS")]
    idle_exit: Option<f64>,
    /// Configuration file (TOML) whose [kafka] table gives security properties
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn split(args: SplitArgs) -> Result<ExitCode> {
    let file = match &args.config {
        Some(p) => kafka_file(crate::cmd_run::read_config(p)?.kafka.as_ref())?,
        None => KafkaFile::default(),
    };
    if args.batch == 0 {
        return Err(anyhow!("--batch 0: a batch needs at least one message"));
    }
    if args.message_bytes < 1024 {
        return Err(anyhow!("--message-bytes {}: give at least 1024 (64 KiB by default)", args.message_bytes));
    }
    let cfg = SplitConfig {
        kafka: settings(Some(&args.brokers), &file)?,
        unkeyed_topic: args.unkeyed_topic.clone().unwrap_or_else(|| format!("{}.unkeyed", args.to)),
        rejected_topic: args.rejected_topic.clone().unwrap_or_else(|| format!("{}.rejected", args.to)),
        from: args.from,
        to: args.to,
        group: args.group,
        broadcast: args.broadcast.into_iter().filter(|t| t != "none").collect(),
        batch_messages: args.batch,
        message_bytes: args.message_bytes,
        idle_exit: args.idle_exit.map(|s| seconds("--idle-exit", s)).transpose()?,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // A second signal ends it at once: nothing is committed before it is acknowledged.
        signal_hook::flag::register_conditional_shutdown(sig, 1, stop.clone())
            .context("cannot install the signal handler")?;
        signal_hook::flag::register(sig, stop.clone()).context("cannot install the signal handler")?;
    }
    let mut last_report = std::time::Instant::now();
    let stats = run_split(&cfg, &stop, &mut |s| {
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = std::time::Instant::now();
            tracing::info!(
                messages = s.messages,
                produced = s.produced,
                unkeyed = s.unkeyed,
                rejected = s.rejected,
                set_aside = s.set_aside,
                "split progress"
            );
        }
    })?;
    println!("{}", serde_json::to_string(&stats)?);
    if stats.unkeyed > 0 || stats.rejected > 0 {
        eprintln!(
            "lookout: {} record(s) without a DeviceId are in {}, {} not JSON objects in {}",
            stats.unkeyed, cfg.unkeyed_topic, stats.rejected, cfg.rejected_topic
        );
    }
    if stats.set_aside > 0 {
        eprintln!(
            "lookout: {} record(s) over the producer's message.max.bytes were set aside: {} names where each is in {}",
            stats.set_aside, cfg.rejected_topic, cfg.from
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `run --kafka` flags (flattened into `lookout run`).
#[derive(Args, Default)]
pub struct NodeArgs {
    /// Run as a node of a Kafka consumer group instead of tailing a logs folder: rows
    /// come from --topic (as `lookout split` writes it), findings also go to
    /// --findings-topic. --logs, if given, is the FileProfile feed read into every
    /// partition's store
    #[arg(long)]
    pub kafka: bool,
    /// Kafka bootstrap servers (HOST:PORT,…) [or brokers in [kafka]]
    #[arg(long, requires = "kafka")]
    brokers: Option<String>,
    /// Topic of records keyed by DeviceId [or topic in [kafka]]
    #[arg(long, requires = "kafka")]
    topic: Option<String>,
    /// Consumer group the nodes share [default: lookout, or group in [kafka]]
    #[arg(long, requires = "kafka")]
    group: Option<String>,
    /// Topic for findings, with as many partitions as --topic [or findings_topic in [kafka]]
    #[arg(long, requires = "kafka")]
    findings_topic: Option<String>,
    /// Run a partition's detectors only once no message has arrived for this many
    /// seconds: one pass per burst for a topic filled in bursts (rules with thresholds
    /// decide on what a pass sees) [default: 0, every round]
    #[arg(long, requires = "kafka", value_name = "SECONDS")]
    quiet_before_pass: Option<f64>,
}

/// Runs `lookout run --kafka` with what `run` resolved (`c.logs` is not used: a node's
/// file feed, `logs`, is optional).
pub fn run_node(
    args: &NodeArgs,
    file: Option<&toml::Value>,
    c: DaemonConfig,
    logs: Option<PathBuf>,
    stop: Arc<AtomicBool>,
) -> Result<ExitCode> {
    if c.clock_file.is_some() {
        return Err(anyhow!("--clock-file is not supported with --kafka: use --now and --ingest-now"));
    }

    let file = kafka_file(file)?;
    let topic = args
        .topic
        .clone()
        .or(file.topic.clone())
        .ok_or_else(|| anyhow!("no input topic: pass --topic T or set topic in [kafka]"))?;
    let findings_topic = args
        .findings_topic
        .clone()
        .or(file.findings_topic.clone())
        .ok_or_else(|| anyhow!("no findings topic: pass --findings-topic F or set findings_topic in [kafka]"))?;
    let cfg = NodeConfig {
        kafka: settings(args.brokers.as_deref(), &file)?,
        group: args.group.clone().or(file.group.clone()).unwrap_or_else(|| "lookout".to_string()),
        topic,
        findings_topic,
        data: c.data,
        plugins: c.plugins,
        findings: c.findings,
        logs,
        listen: c.listen,
        params: c.params,
        ingest: c.ingest,
        now: c.now,
        retention: c.retention,
        retention_given: c.retention_given,
        detect_threads: c.detect_threads,
        rescan: c.rescan,
        batch_messages: 20_000,
        batch_bytes: 40 << 20,
        quiet_before_pass: seconds("--quiet-before-pass", args.quiet_before_pass.unwrap_or(0.0))?,
    };
    run_kafka_node(cfg, stop)?;
    Ok(ExitCode::SUCCESS)
}
