//! `lookout ingest`.

use crate::output::{human_bytes, parse_now, RetentionArg};
use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lookout_core::error::Chain;
use lookout_core::ingest::{expand_paths, ingest_file, IngestOptions, IngestReport};
use lookout_core::Store;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Args)]
pub struct IngestArgs {
    /// Ingestion time to record for every row (RFC 3339); default: the clock
    #[arg(long)]
    now: Option<String>,
    /// Table of rows that name none (after envelope category, Type column and file name)
    #[arg(long)]
    table: Option<String>,
    #[command(flatten)]
    retention: RetentionArg,
    /// Lines (and JSON array elements) longer than this many bytes are rejected (at most 128 MiB);
    /// an array element over four times this (at least 1 MiB more) ends the array there
    #[arg(long, default_value_t = 8 << 20, value_parser = clap::value_parser!(u64).range(1..=lookout_core::ingest::MAX_LINE_LIMIT as u64))]
    max_line: u64,
    /// Rows per committed batch: a crash re-reads at most one batch, a batch is held in
    /// memory whole
    #[arg(long, default_value_t = IngestOptions::default().batch_rows as u64, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    batch_rows: u64,
    /// Files or directories (read recursively, in name order)
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

pub fn run(data: &Path, args: IngestArgs) -> Result<ExitCode> {
    let opts = IngestOptions {
        now: args.now.as_deref().map(parse_now).transpose()?,
        table: args.table,
        max_line: args.max_line as usize,
        batch_rows: args.batch_rows as usize,
        ..IngestOptions::default()
    };
    let lookout_core::ingest::Expanded { files, skipped } = expand_paths(&args.paths)?;
    let total_bytes: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    let mut store = Store::open(data)?;
    args.retention.apply_to(&mut store)?;
    store.advance_clock(lookout_core::clock::Clock::new(opts.now).now())?;
    let on_terminal = std::io::stderr().is_terminal();
    let bar = if on_terminal {
        let b = ProgressBar::new(total_bytes);
        b.set_style(
            ProgressStyle::with_template("{spinner} {bytes}/{total_bytes} {wide_bar} {bytes_per_sec} eta {eta} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let mut report = IngestReport { skipped, ..Default::default() };
    let mut done = 0u64;
    let mut failed = Vec::new();
    // Off a terminal (cron, systemd, a pipe), a line every PROGRESS_EVERY instead of the bar.
    let mut last_line = Instant::now();
    for f in &files {
        bar.set_message(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let before = done;
        let mut progress = |b: u64| {
            bar.set_position(before + b);
            if !on_terminal && last_line.elapsed() >= PROGRESS_EVERY {
                last_line = Instant::now();
                let at = before + b;
                eprintln!(
                    "lookout: ingest: {} of {} read ({:.0}%, {}/s), now {}",
                    human_bytes(at),
                    human_bytes(total_bytes),
                    at as f64 * 100.0 / total_bytes.max(1) as f64,
                    human_bytes((at as f64 / started.elapsed().as_secs_f64().max(1e-9)) as u64),
                    f.display()
                );
            }
        };
        match ingest_file(&mut store, f, &opts, &mut progress) {
            Ok(r) => report.merge(r),
            // A file that cannot be read does not stop the others; the store failing does.
            Err(e) if e.is_input_failure() => {
                bar.suspend(|| eprintln!("lookout: error: {}", Chain(&e)));
                failed.push(f.clone());
            }
            Err(e) => return Err(e.into()),
        }
        done = before + std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        bar.set_position(done);
    }
    bar.finish_and_clear();
    store.expire_all()?;
    store.flush_and_save_key_filter()?;
    print_summary(&report, started.elapsed().as_secs_f64());
    // A folder that could not be listed holds files that were never read, as much as a
    // file that failed.
    let unlisted = report.skipped.iter().filter(|(_, why)| why.starts_with("cannot list")).count();
    if !failed.is_empty() || unlisted > 0 {
        eprintln!(
            "lookout: {} file(s) could not be read completely and {unlisted} folder(s) could not be listed \
             (above); what was read is committed, re-run to resume",
            failed.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// How often `ingest` says how far it got when stderr is not a terminal.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

fn print_summary(r: &IngestReport, secs: f64) {
    let rows = r.total_new() + r.duplicates + r.total_rejected();
    println!(
        "ingested {} file(s), {} in {:.2}s ({:.0} records/s)",
        r.files,
        human_bytes(r.bytes),
        secs,
        rows as f64 / secs.max(1e-9)
    );
    if r.new_rows.is_empty() {
        println!("  new rows: 0");
    }
    for (t, n) in &r.new_rows {
        println!("  new rows {t}: {n}");
    }
    println!("  duplicates skipped: {}", r.duplicates);
    if r.expired > 0 {
        println!(
            "  expired: {} (older than the retention horizon when they arrived, not stored; \
             a longer --retention, or --retention none, keeps them)",
            r.expired
        );
    }
    if r.unexpected_types > 0 {
        println!(
            "  values of an unexpected type: {} (kept as sent; the column's type in Microsoft's schema \
             differs — conditions on such a value read it as that other type)",
            r.unexpected_types
        );
    }
    if r.replaced > 0 {
        println!("  FileProfile rows replaced by newer ones: {}", r.replaced);
    }
    println!("  rejected: {}", r.total_rejected());
    for (k, n) in &r.rejected {
        println!("    {k}: {n}");
    }
    for (p, reason) in &r.skipped {
        println!("  skipped {}: {reason}", p.display());
    }
    for p in &r.partial_tails {
        println!("  {}: last line has no newline yet and is incomplete; left for the next run", p.display());
    }
    if r.total_rejected() > 0 {
        println!("  (rejected records are kept aside with file, line and reason: `lookout status --rejects`)");
    }
}
