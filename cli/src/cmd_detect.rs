//! `lookout detect` and `lookout findings`.

use crate::cmd_plugins::{resolve_dir, PluginDirArg};
use crate::output::{parse_now, print_table, RetentionArg};
use anyhow::Result;
use clap::Args;
use lookout_core::detect::{parse_set, run_pass, DetectOptions, DetectorReport};
use lookout_core::error::Chain;
use lookout_core::findings::{all_findings, flush_outbox};
use lookout_core::plugin;
use lookout_core::Store;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
pub struct DetectArgs {
    #[command(flatten)]
    plugins: PluginDirArg,
    /// Findings JSONL file [default: <data>/findings.jsonl]
    #[arg(long)]
    findings: Option<PathBuf>,
    /// Evaluation time of the pass (RFC 3339); default: the clock
    #[arg(long)]
    now: Option<String>,
    /// Override a detector parameter, e.g. winrm-plugin-lateral-movement.lookback=7d
    #[arg(long = "set", value_name = "DETECTOR.PARAM=VALUE")]
    set: Vec<String>,
    /// Evaluate everything stored again, not only what is new (e.g. after widening a
    /// parameter); findings already written are not written again
    #[arg(long)]
    backfill: bool,
    /// Also print where each detector's pass went: choosing its rows, the detector itself
    /// (with its calls into the store), committing
    #[arg(long)]
    timings: bool,
    /// How many detectors' passes run at once [default: one per core]
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    #[command(flatten)]
    retention: RetentionArg,
}

#[derive(Args)]
pub struct FindingsArgs {
    /// Print one JSON object per line (as in the findings file)
    #[arg(long)]
    json: bool,
}

pub fn findings_path(data: &Path, arg: &Option<PathBuf>) -> PathBuf {
    arg.clone().unwrap_or_else(|| data.join("findings.jsonl"))
}

pub fn detect(data: &Path, args: DetectArgs) -> Result<ExitCode> {
    let opts = DetectOptions {
        now: args.now.as_deref().map(parse_now).transpose()?,
        params: args.set.iter().map(|s| parse_set(s)).collect::<Result<_, _>>()?,
        backfill: args.backfill,
        threads: args.threads.map_or(0, usize::from),
        ..DetectOptions::default()
    };
    let dir = resolve_dir(&args.plugins.plugins)?;
    let mut store = Store::open(data)?;
    args.retention.apply_to(&mut store)?;
    store.advance_clock(lookout_core::clock::Clock::new(opts.now).now())?;
    store.expire_all()?;
    let mut loaded = plugin::load_dir(&dir, data)?;
    for r in &loaded.refused {
        eprintln!("lookout: plugin refused: {}: {}", r.path.display(), Chain(&r.reason));
    }
    lookout_core::detect::check_params(&loaded.plugins, &opts.params)?;
    let started = std::time::Instant::now();
    let reports = run_pass(&mut store, &mut loaded.plugins, &opts)?;
    let pass = started.elapsed();
    let path = findings_path(data, &args.findings);
    let written = flush_outbox(&mut store, &path)?;
    print_reports(&reports);
    if args.timings {
        print_timings(&reports, pass);
    }
    println!("{written} new finding line(s) written to {}", path.display());
    // Everything that ran is committed and written; a script or a timer still needs to
    // know that not every detector did.
    let failed = reports.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 || !loaded.refused.is_empty() {
        eprintln!(
            "lookout: {failed} detector(s) failed their pass and {} plugin(s) were refused (above); exit status 2",
            loaded.refused.len()
        );
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn print_reports(reports: &[DetectorReport]) {
    if reports.is_empty() {
        println!("no detectors loaded");
    }
    for r in reports {
        let mode = if r.backfill { "backfill" } else { "incremental" };
        // Loading the detector's state is paid once per process; said apart from the pass.
        let init = if r.init.as_secs_f64() >= 0.001 {
            format!(" (of which {:.1} ms loading its state)", r.init.as_secs_f64() * 1e3)
        } else {
            String::new()
        };
        match &r.error {
            None => println!(
                "{} {}: {mode} pass over {} row(s), {} new finding(s) in {:.2} ms{init}",
                r.detector,
                r.version,
                r.rows,
                r.new_findings,
                r.elapsed.as_secs_f64() * 1e3
            ),
            Some(e) => eprintln!("lookout: detector {} {} failed (retried next pass): {e}", r.detector, r.version),
        }
    }
}

/// One line per detector: the parts of its pass (`detect --timings`).
/// Where each detector's pass went, and the whole pass's time: detectors run side by
/// side, so it is less than the sum of theirs.
fn print_timings(reports: &[DetectorReport], pass: std::time::Duration) {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let init: std::time::Duration = reports.iter().map(|r| r.init).sum();
    println!(
        "the pass of all {} detector(s): {:.2} ms, not counting {:.1} ms loading their state",
        reports.len(),
        ms(pass.saturating_sub(init)),
        ms(init)
    );
    for r in reports.iter().filter(|r| r.error.is_none()) {
        println!(
            "  {}: choosing rows {:.2} ms, in the detector {:.2} ms (of which its calls into the store {:.2} ms), \
             committing {:.2} ms",
            r.detector,
            ms(r.select),
            ms(r.evaluate),
            ms(r.host),
            ms(r.commit)
        );
    }
}

pub fn findings(data: &Path, args: FindingsArgs) -> Result<ExitCode> {
    // A running daemon holds the database: say where its findings are at once, rather
    // than wait for the lock and report the database as in use.
    if !matches!(lookout_core::daemon::http::ask(data, "/status"), lookout_core::daemon::http::Answer::NoDaemon) {
        return Err(anyhow::anyhow!(
            "a daemon runs on {}: every finding it stores is a line of its findings file (`--findings` or \
             `findings` in its config; {} by default) — read that, or stop the daemon to list them from here",
            data.display(),
            data.join("findings.jsonl").display()
        ));
    }
    let store = crate::output::open_existing(data)?;
    let all = all_findings(&store)?;
    if args.json {
        for f in &all {
            println!("{}", serde_json::to_string(f)?);
        }
    } else {
        print_findings(&all);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn print_findings(all: &[Value]) {
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|f| {
            let row = f.get("row").cloned().unwrap_or(Value::Null);
            let detector = text(f, "detector");
            vec![
                text(f, "finding_id").chars().take(12).collect(),
                detector.clone(),
                text(f, "device_name"),
                text(&row, "Timestamp"),
                what(&detector, &row),
            ]
        })
        .collect();
    print_table(&["finding", "detector", "device", "time", "what"], &rows);
    println!("{} finding(s)", all.len());
}

/// A field as text: a string as it is, null or missing as nothing, anything else as JSON.
fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => String::new(),
        Some(other) => other.to_string(),
    }
}

/// What a finding is, in a line: for the built-in detectors, the columns of their rule's
/// result that say it; for another, the first columns of its row (`--json` has them all).
fn what(detector: &str, row: &Value) -> String {
    let t = |k: &str| text(row, k);
    match detector {
        "winrm-plugin-lateral-movement" => {
            format!("{} loaded {} (written {})", t("InitiatingProcessFileName"), t("FolderPath"), t("Timestamp1"))
        }
        "scheduled-task-persistence" => {
            let sha1 = t("SHA1");
            let sha1 = if sha1.is_empty() { String::new() } else { format!(", SHA1 {sha1}") };
            format!("{} run as a scheduled task on {} device(s){sha1}", t("FileName"), t("MachineCount"))
        }
        "scm-remote-process" => {
            format!("services.exe started {} after a connection from {}", t("FileName"), t("RemoteIP"))
        }
        "password-spraying" => format!(
            "{} failed logons on {} account(s) from {}",
            t("FailedLogonCount"),
            t("UniqueAccountFailedLogons"),
            t("IPAddress")
        ),
        _ => row
            .as_object()
            .map(|o| o.iter().take(4).map(|(k, _)| format!("{k}={}", t(k))).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
    }
}
