//! Tick passes as the daemon makes them: one process opens the store and loads the
//! detectors once, then for each tick folder ingests its files and runs one pass of every
//! detector, as `lookout run` does when new rows land. `lookout detect` (one process per
//! tick) pays loading each detector's state and a cold cache on every pass; a running
//! daemon pays them once. Prints one JSON object per tick: the rows ingested, the whole
//! pass, and each detector's pass (choosing rows, in the detector and of that in its calls into
//! the store, committing; ms).
//!
//! `warm_ticks DATA_DIR PLUGINS_DIR NOW TICK_DIR... [--threads N]`
//!
//! NOW (RFC 3339) is both the ingestion time and the evaluation time of every pass, as
//! `benches/compare/pack.py` gives `lookout ingest --now` and `lookout detect --now`.

use anyhow::{anyhow, bail, Context, Result};
use lookout_core::detect::{run_pass, DetectOptions};
use lookout_core::findings::flush_outbox;
use lookout_core::ingest::{expand_paths, ingest_file, IngestOptions};
use lookout_core::{plugin, Store};
use std::path::PathBuf;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    // The `lookout` binary's memory settings, so the figures are the binary's.
    lookout_core::memory::no_transparent_huge_pages();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut threads = 0usize;
    if let Some(i) = args.iter().position(|a| a == "--threads") {
        let n = args.get(i + 1).ok_or_else(|| anyhow!("--threads needs a number"))?;
        threads = n.parse().with_context(|| format!("--threads {n}"))?;
        args.drain(i..i + 2);
    }
    let [data, plugins, now, ticks @ ..] = args.as_slice() else {
        bail!("usage: warm_ticks DATA_DIR PLUGINS_DIR NOW TICK_DIR... [--threads N]");
    };
    let data = PathBuf::from(data);
    let now = lookout_plugin_sdk::time::parse_timestamp(now)
        .ok_or_else(|| anyhow!("NOW {now}: expected an RFC 3339 UTC time like 2025-05-08T00:00:00Z"))?;
    let mut store = Store::open(&data)?;
    store.advance_clock(now)?;
    let mut loaded = plugin::load_dir(&PathBuf::from(plugins), &data)?;
    if let Some(r) = loaded.refused.first() {
        bail!("plugin refused: {}: {}", r.path.display(), r.reason);
    }
    let opts = DetectOptions { now: Some(now), threads, ..DetectOptions::default() };
    let ingest = IngestOptions { now: Some(now), ..IngestOptions::default() };
    let findings = data.join("findings.jsonl");
    // The detectors' state is loaded by their first pass; a daemon has long paid it.
    let first = run_pass(&mut store, &mut loaded.plugins, &opts)?;
    flush_outbox(&mut store, &findings)?;
    if let Some(r) = first.iter().find(|r| r.error.is_some()) {
        bail!("detector {} failed: {:?}", r.detector, r.error);
    }
    for tick in ticks {
        let files = expand_paths(&[PathBuf::from(tick)])?.files;
        let mut rows = 0u64;
        for f in &files {
            rows += ingest_file(&mut store, f, &ingest, &mut |_| {})?.new_rows.values().sum::<u64>();
        }
        store.expire_all()?;
        let started = Instant::now();
        let reports = run_pass(&mut store, &mut loaded.plugins, &opts)?;
        let whole = started.elapsed();
        flush_outbox(&mut store, &findings)?;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let mut passes = serde_json::Map::new();
        for r in &reports {
            if let Some(e) = &r.error {
                bail!("detector {} failed: {e}", r.detector);
            }
            passes.insert(
                r.detector.clone(),
                serde_json::json!({
                    "rows": r.rows, "new": r.new_findings, "ms": ms(r.elapsed.saturating_sub(r.init)),
                    "select_ms": ms(r.select), "evaluate_ms": ms(r.evaluate), "host_ms": ms(r.host),
                    "commit_ms": ms(r.commit),
                }),
            );
        }
        let init: std::time::Duration = reports.iter().map(|r| r.init).sum();
        println!(
            "{}",
            serde_json::json!({"tick": tick, "rows": rows, "whole_ms": ms(whole.saturating_sub(init)), "passes": passes})
        );
    }
    Ok(())
}
