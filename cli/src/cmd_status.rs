//! `lookout status`.

use crate::output::human_bytes;
use anyhow::{anyhow, Result};
use clap::Args;
use lookout_core::daemon::http::{ask, Answer};
use lookout_core::status::{status, Status};
use lookout_core::store::RejectRecord;
use lookout_core::Store;
use std::path::Path;
use std::process::ExitCode;

#[derive(Args)]
pub struct StatusArgs {
    /// Print one JSON object
    #[arg(long, conflicts_with_all = ["rejects", "space"])]
    json: bool,
    /// Also list up to this many rejected records with file, line and reason
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "20")]
    rejects: Option<usize>,
    /// Also show the live bytes of each part of the store (reads every key; slow on a
    /// large store)
    #[arg(long)]
    space: bool,
}

pub fn run(data: &Path, args: StatusArgs) -> Result<ExitCode> {
    // A running daemon holds the database; ask it instead.
    let body = match ask(data, "/status") {
        Answer::Ok(body) => Some(body),
        // It runs and holds the database, which cannot be opened here meanwhile.
        Answer::Failed(code, text) => {
            return Err(anyhow!("the daemon running on {} answered {code}: {}", data.display(), text.trim_end()))
        }
        Answer::NoDaemon => None,
    };
    if let Some(body) = body {
        if args.json {
            println!("{}", body.trim_end());
            return Ok(ExitCode::SUCCESS);
        }
        let s: Status = serde_json::from_str(&body)?;
        print_human(&s);
        if let Some(n) = args.rejects {
            match ask(data, &format!("/rejects?n={n}")) {
                Answer::Ok(body) => {
                    let rejects: Vec<RejectRecord> = serde_json::from_str(&body)?;
                    for r in rejects {
                        println!("reject {}:{} (offset {}): {}: {}", r.file, r.line, r.offset, r.kind, r.reason);
                    }
                }
                Answer::Failed(_, text) => println!("(rejected records: {})", text.trim_end()),
                Answer::NoDaemon => println!("(rejected records: the daemon stopped meanwhile; run this again)"),
            }
        }
        if args.space {
            println!("(--space is shown when the daemon is stopped: it reads every key)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // A stopped Kafka node: one store per partition it owned, no store of its own.
    let partitions = lookout_core::status::partition_stores(data);
    if !partitions.is_empty() && !data.join("db").exists() {
        let mut total = Status::empty(data);
        let mut each = Vec::new();
        let mut rejects = Vec::new();
        for (name, dir) in &partitions {
            let store = Store::open(dir)?;
            let s = status(&store)?;
            each.push((name.clone(), s.tables.values().map(|t| t.rows).sum::<u64>(), s.findings));
            total.add(s);
            if let Some(n) = args.rejects {
                rejects.extend(store.rejects(n)?.into_iter().map(|r| (name.clone(), r)));
            }
        }
        if args.json {
            println!("{}", serde_json::to_string(&total)?);
            return Ok(ExitCode::SUCCESS);
        }
        print_human(&total);
        println!("a stopped Kafka node's partitions (each its own store; `lookout --data {}/partitions/<name> status` for one):", data.display());
        for (name, rows, findings) in each {
            println!("  {name}: {rows} rows, {findings} findings");
        }
        for (name, r) in rejects {
            println!("reject in {name}: {}:{} (offset {}): {}: {}", r.file, r.line, r.offset, r.kind, r.reason);
        }
        if args.space {
            println!(
                "(--space: one partition at a time, `lookout --data {}/partitions/<name> status --space`)",
                data.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let store = crate::output::open_existing(data)?;
    let s = status(&store)?;
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_human(&s);
    if args.space {
        for (part, items, bytes) in store.space_by_part()? {
            println!("  {part}: {} in {items} items", human_bytes(bytes));
        }
    }
    if let Some(n) = args.rejects {
        for r in store.rejects(n)? {
            println!("reject {}:{} (offset {}): {}: {}", r.file, r.line, r.offset, r.kind, r.reason);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_human(s: &Status) {
    println!("data: {}", s.data_dir);
    if s.tables.is_empty() {
        println!("tables: none yet");
    } else {
        println!("tables:");
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
    println!("  {} generation(s), {} key-index run(s)", s.generations, s.key_index_runs);
    if !s.indexes.is_empty() {
        println!("  column indexes: {}", s.indexes.join("; "));
    }
    if let Some(b) = s.bytes_per_row {
        println!("  {b:.0} bytes per row kept");
    }
    match &s.retention_horizon {
        Some(h) => println!("retention: rows kept while Timestamp >= {h}"),
        None => println!("retention: none (rows are kept forever)"),
    }
    if let Some(o) = &s.oldest_kept {
        println!("  oldest Timestamp kept: {o}");
    }
    if s.removed > 0 {
        println!("  rows removed by retention: {}", s.removed);
    }
    if s.expired > 0 {
        println!(
            "  expired on arrival (not stored): {} (a longer --retention, or --retention none, keeps them)",
            s.expired
        );
    }
    if let Some(k) = &s.kafka {
        println!("kafka: topic {}, group {}, {} partition(s) owned", k.topic, k.group, k.partitions.len());
        for p in &k.partitions {
            let next = p.next_offset.map_or_else(|| "-".to_string(), |o| o.to_string());
            println!(
                "  partition {}: next offset {next} of {}, lag {}{}{}, {} rows stored since assigned",
                p.partition,
                p.high_watermark,
                p.lag,
                if p.replaying { ", replaying" } else { "" },
                if p.detection_pending { ", detection pending" } else { "" },
                p.rows_stored
            );
        }
    }
}
