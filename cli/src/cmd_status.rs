//! `lookout status`.

use crate::output::human_bytes;
use anyhow::Result;
use clap::Args;
use lookout_core::status::status;
use lookout_core::Store;
use std::path::Path;
use std::process::ExitCode;

#[derive(Args)]
pub struct StatusArgs {
    /// Print one JSON object
    #[arg(long)]
    json: bool,
    /// Also list up to this many rejected records with file, line and reason
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "20")]
    rejects: Option<usize>,
}

pub fn run(data: &Path, args: StatusArgs) -> Result<ExitCode> {
    let store = Store::open(data)?;
    let s = status(&store)?;
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("data: {}", s.data_dir);
    if s.tables.is_empty() {
        println!("tables: none yet");
    }
    for (t, ts) in &s.tables {
        println!("  {t}: {} rows", ts.rows);
    }
    println!("duplicates skipped: {}", s.duplicates_skipped);
    println!("rejected: {}", s.rejected);
    for (k, n) in &s.rejected_by_reason {
        println!("  {k}: {n}");
    }
    println!("findings: {}", s.findings);
    println!("sources: {}", s.sources.len());
    for src in &s.sources {
        println!("  {} at {} {}{}", src.path, src.offset, src.unit, if src.compressed { " (gzip)" } else { "" });
    }
    println!("database size: {}", human_bytes(s.database_bytes));
    if let Some(n) = args.rejects {
        for r in store.rejects(n)? {
            println!("reject {}:{} (offset {}): {}: {}", r.file, r.line, r.offset, r.kind, r.reason);
        }
    }
    Ok(ExitCode::SUCCESS)
}
