//! `lookout`: ingest Microsoft Defender XDR telemetry into an embedded database, run
//! detector plugins over what is new, and write each finding once.

mod cmd_demo;
mod cmd_detect;
mod cmd_ingest;
#[cfg(feature = "kafka")]
mod cmd_kafka;
mod cmd_plugins;
mod cmd_run;
mod cmd_status;
mod output;

use clap::{Parser, Subcommand, ValueEnum};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "lookout",
    version,
    about = "Detection engine for Microsoft Defender XDR telemetry on one box",
    long_about = "Lookout stores Defender advanced-hunting rows (JSONL, JSON array exports, Streaming-API \
                  envelopes, gzip) in an embedded database, runs detector plugins (shared libraries in a \
                  folder) over only what is new, and writes every finding exactly once to a JSONL file.\n\n\
                  Start with `lookout demo`."
)]
struct Cli {
    /// Data directory (database, findings, plugin copies) [default: ./lookout-data]
    #[arg(long, global = true, env = "LOOKOUT_DATA")]
    data: Option<PathBuf>,

    /// Log format on stderr [default: human, or `log_format` in run's config file]
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Ingest files or directories (JSONL, JSON arrays, Streaming-API envelopes, gzip)
    Ingest(cmd_ingest::IngestArgs),
    /// Show rows per table, rejects, sources and database size
    Status(cmd_status::StatusArgs),
    /// Generate a deterministic synthetic fleet with injected attacks and ground truth
    Gen(cmd_demo::GenArgs),
    /// Generate a fleet, ingest it, run the four built-in detectors and check their findings against the ground truth
    Demo(cmd_demo::DemoArgs),
    /// Run one detection pass of every plugin over the rows new since its last pass
    Detect(cmd_detect::DetectArgs),
    /// Run as a service: tail a logs folder, hot-load plugins, detect continuously
    Run(cmd_run::RunArgs),
    /// List the findings in the results tree
    Findings(cmd_detect::FindingsArgs),
    /// List, verify or pin the plugins in a folder
    #[command(subcommand)]
    Plugins(cmd_plugins::PluginsCommand),
    /// Repartition Streaming-API messages by DeviceId for `run --kafka` nodes
    #[cfg(feature = "kafka")]
    Split(cmd_kafka::SplitArgs),
}

pub const DEFAULT_DATA: &str = "./lookout-data";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match (&cli.command, cli.log_format) {
        // The flag wins; `lookout run` may take it from its config file.
        (_, Some(flag)) => flag,
        (Command::Run(a), None) => cmd_run::log_format_of(a).unwrap_or(LogFormat::Human),
        (_, None) => LogFormat::Human,
    };
    #[cfg(feature = "kafka")]
    let service = matches!(cli.command, Command::Run(_) | Command::Split(_));
    #[cfg(not(feature = "kafka"))]
    let service = matches!(cli.command, Command::Run(_));
    let default_level = if service { "info" } else { "warn" };
    init_logging(format, default_level);
    lookout_core::memory::no_transparent_huge_pages();
    let data = cli.data.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA));
    let result = match cli.command {
        Command::Ingest(a) => cmd_ingest::run(&data, a),
        Command::Status(a) => cmd_status::run(&data, a),
        Command::Gen(a) => cmd_demo::gen(a),
        Command::Demo(a) => cmd_demo::demo(a),
        Command::Detect(a) => cmd_detect::detect(&data, a),
        Command::Run(a) => cmd_run::run(cli.data.as_deref(), a),
        Command::Findings(a) => cmd_detect::findings(&data, a),
        Command::Plugins(c) => cmd_plugins::run(&data, c),
        #[cfg(feature = "kafka")]
        Command::Split(a) => cmd_kafka::split(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lookout: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOOKOUT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
