//! Detection with the real WinRM plugin: the first pass over a store of N rows (a
//! backfill), and an incremental pass over 10k new rows with N/10 and N rows already
//! stored and backfilled. Only `detect::run_pass` is timed; each iteration starts from a
//! copy of a prepared store.
//!
//! `cargo bench -p lookout-benches --bench detect` (`LOOKOUT_BENCH_ROWS`, default 1M).

use anyhow::{anyhow, Result};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use lookout_benches::*;
use lookout_core::detect::{run_pass, DetectOptions, DetectorReport};
use lookout_core::ingest::ingest_paths;
use lookout_core::plugin::{load_dir, Plugin};
use lookout_core::Store;
use std::path::Path;
use std::time::Duration;

/// The `lookout` binary's allocator (cli/src/main.rs): measure what ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Background events of the batch that arrives after the backfill.
const DELTA_EVENTS: usize = 10_000;

fn detect_options() -> DetectOptions {
    DetectOptions { now: Some(base_time()), ..DetectOptions::default() }
}

/// One pass; fails unless exactly the WinRM detector ran without error.
fn pass(store: &mut Store, plugins: &mut [Plugin]) -> Result<DetectorReport> {
    let mut reports = run_pass(store, plugins, &detect_options())?;
    match reports.pop() {
        Some(r) if reports.is_empty() && r.error.is_none() => Ok(r),
        Some(r) => Err(anyhow!("detector {} failed: {:?}", r.detector, r.error)),
        None => Err(anyhow!("no detector ran")),
    }
}

/// A copy of the closed store in `master`, opened, with the plugin initialised from its
/// committed state as a running daemon's would be (a pass with nothing new does that).
fn open_copy(master: &Path, dir: &Path, plugins: &mut [Plugin], init: bool) -> Result<Store> {
    copy_dir(master, dir)?;
    let mut store = Store::open(dir)?;
    for p in plugins.iter_mut() {
        p.initialised = false;
    }
    if init {
        pass(&mut store, plugins)?;
    }
    Ok(store)
}

/// A store holding `corpus`, backfilled, in `dir` (closed on return).
fn backfilled(dir: &Path, corpus: &Corpus, plugins: &mut [Plugin]) -> Result<()> {
    let (mut store, _) = ingest_fresh(dir, &corpus.files)?;
    for p in plugins.iter_mut() {
        p.initialised = false;
    }
    let r = pass(&mut store, plugins)?;
    if !r.backfill {
        return Err(anyhow!("expected a backfill"));
    }
    store.flush()?;
    Ok(())
}

fn main() -> Result<()> {
    let n = bench_rows();
    let small_n = (n / 10).max(1);
    let root = tempfile::Builder::new().prefix("lookout-bench-detect").tempdir()?;
    let root = root.path();

    let plugins_dir = winrm_plugins_dir(root)?;
    let loaded = load_dir(&plugins_dir, &root.join("host"))?;
    if let Some(r) = loaded.refused.first() {
        return Err(anyhow!("plugin {} refused: {}", r.path.display(), r.reason));
    }
    let mut plugins = loaded.plugins;
    println!("plugin: {} {} from {}", plugins[0].manifest.name, plugins[0].manifest.version, winrm_lib()?.display());

    // The stores: N rows (not yet seen by any detector), and N/10 and N rows backfilled.
    let (prep, t) = timed(|| -> Result<_> {
        let delta = write_corpus_on_devices(&root.join("fleet-delta"), DELTA_EVENTS, 2, 1)?;
        let big = write_corpus(&root.join("fleet-big"), n, 1)?;
        let master = root.join("store-big");
        drop(ingest_fresh(&master, &big.files)?);
        std::fs::remove_dir_all(root.join("fleet-big"))?;
        let inc_big = root.join("inc-big");
        drop(open_copy(&master, &inc_big, &mut plugins, false)?);
        {
            let mut store = Store::open(&inc_big)?;
            if !pass(&mut store, &mut plugins)?.backfill {
                return Err(anyhow!("expected a backfill"));
            }
            store.flush()?;
        }
        let small = write_corpus(&root.join("fleet-small"), small_n, 1)?;
        let inc_small = root.join("inc-small");
        backfilled(&inc_small, &small, &mut plugins)?;
        Ok((delta, big.rows, small.rows, master, inc_big, inc_small))
    });
    let (delta, big_rows, small_rows, master, inc_big, inc_small) = prep?;
    println!(
        "stores prepared in {t:.1?}: {big_rows} rows (not yet passed), {small_rows} and {big_rows} rows backfilled; \
         the new batch has {} rows",
        delta.rows
    );

    let mut c = Criterion::default().configure_from_args();
    let mut t_backfill = Vec::new();
    let mut backfill_rows = 0;
    let mut backfill_findings = 0;
    {
        let mut g = c.benchmark_group("detect/backfill");
        g.sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(100))
            .throughput(Throughput::Elements(big_rows));
        g.bench_function(BenchmarkId::new("first_pass", big_rows), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dir = tempfile::tempdir_in(root).expect("temp dir");
                    let mut store = open_copy(&master, dir.path(), &mut plugins, false).expect("store copy");
                    let (r, t) = timed(|| pass(&mut store, &mut plugins).expect("pass"));
                    assert!(r.backfill);
                    backfill_rows = r.rows;
                    backfill_findings = r.new_findings;
                    total += t;
                    t_backfill.push(t);
                }
                total
            })
        });
        g.finish();
    }

    let mut t_inc: Vec<(u64, Vec<Duration>)> = vec![(small_rows, Vec::new()), (big_rows, Vec::new())];
    let mut inc_rows = 0;
    {
        let mut g = c.benchmark_group("detect/incremental_10k");
        g.sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(100))
            .throughput(Throughput::Elements(delta.rows));
        for ((stored, times), base) in t_inc.iter_mut().zip([&inc_small, &inc_big]) {
            g.bench_function(BenchmarkId::new("stored", *stored), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let dir = tempfile::tempdir_in(root).expect("temp dir");
                        let mut store = open_copy(base, dir.path(), &mut plugins, true).expect("store copy");
                        let ingested = ingest_paths(&mut store, &delta.files, &ingest_options(), &mut |_, _| {})
                            .expect("ingest the new rows");
                        let (r, t) = timed(|| pass(&mut store, &mut plugins).expect("pass"));
                        assert!(!r.backfill);
                        assert_eq!(r.rows, ingested.total_new());
                        inc_rows = r.rows;
                        total += t;
                        times.push(t);
                    }
                    total
                })
            });
        }
        g.finish();
    }
    c.final_summary();

    let measured = |times: &[Duration]| match times.len() {
        0 => None,
        1 => Some(times[0]),
        _ => Some(median(&times[1..])),
    };
    println!();
    println!(
        "== detection summary (medians of the measured iterations; WinRM plugin, --now {})",
        lookout_core::gen::DEFAULT_BASE_TIME
    );
    if let Some(t) = measured(&t_backfill) {
        println!(
            "backfill: first pass over {backfill_rows} stored rows: {:.2} s, {:.0} rows/s, {backfill_findings} findings  \
             target >= 200,000 rows/s: {}",
            t.as_secs_f64(),
            per_s(backfill_rows, t),
            verdict(per_s(backfill_rows, t) >= 200_000.0)
        );
    }
    let inc: Vec<(u64, Duration)> = t_inc.iter().filter_map(|(s, t)| Some((*s, measured(t)?))).collect();
    for (stored, t) in &inc {
        println!(
            "incremental: pass over {inc_rows} new rows with {stored} stored: {:.1} ms, {:.0} rows/s",
            t.as_secs_f64() * 1e3,
            per_s(inc_rows, *t)
        );
    }
    if let [(s1, t1), (s2, t2)] = inc[..] {
        let ratio = t2.as_secs_f64() / t1.as_secs_f64();
        println!("ratio {s2} stored / {s1} stored: {ratio:.2}  target <= 1.3: {}", verdict(ratio <= 1.3));
    }
    Ok(())
}
