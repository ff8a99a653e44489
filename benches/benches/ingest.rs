//! Ingestion throughput: end to end (JSONL files → committed in sled) against two
//! ceilings, "parse only" (the same reading, parsing and normalisation, nothing stored)
//! and "sled only" (as many Lookout-shaped keys with values of the same size, inserted in
//! batches of 4096). Also the size of the database against the raw JSONL and the peak RSS
//! of a fresh process ingesting the corpus.
//!
//! `cargo bench -p lookout-benches --bench ingest` (`LOOKOUT_BENCH_ROWS`, default 1M).

use anyhow::{anyhow, Context, Result};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use lookout_benches::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The `lookout` binary's allocator (cli/src/main.rs): measure what ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Set in the child process that ingests the corpus once (data dir; files as arguments).
const CHILD_ENV: &str = "LOOKOUT_BENCH_INGEST_CHILD";

/// What the one-shot ingest in a fresh process measured.
struct OneShot {
    elapsed: Duration,
    new_rows: u64,
    rejected: u64,
    duplicates: u64,
    peak_rss: u64,
    size_on_disk: u64,
    dir_apparent: u64,
    dir_allocated: u64,
}

/// The child: a fresh process, so its peak RSS is the ingest's alone.
fn child(data: &Path) -> Result<()> {
    let files: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (ingested, elapsed) = timed(|| ingest_fresh(data, &files));
    let (store, report) = ingested?;
    let peak = peak_rss().ok_or_else(|| anyhow!("no VmHWM in /proc/self/status"))?;
    let size_on_disk = store.size_on_disk();
    drop(store);
    let (apparent, allocated) = dir_size(data)?;
    println!(
        "{}",
        serde_json::json!({
            "elapsed_s": elapsed.as_secs_f64(),
            "new_rows": report.total_new(),
            "rejected": report.total_rejected(),
            "duplicates": report.duplicates,
            "peak_rss": peak,
            "size_on_disk": size_on_disk,
            "dir_apparent": apparent,
            "dir_allocated": allocated,
        })
    );
    Ok(())
}

fn run_child(files: &[PathBuf], data: &Path) -> Result<OneShot> {
    let out = Command::new(std::env::current_exe()?)
        .env(CHILD_ENV, data)
        .args(files)
        .output()
        .context("cannot run the one-shot ingest child")?;
    if !out.status.success() {
        return Err(anyhow!("one-shot ingest failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("one-shot ingest output")?;
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(OneShot {
        elapsed: Duration::from_secs_f64(v["elapsed_s"].as_f64().unwrap_or(0.0)),
        new_rows: u("new_rows"),
        rejected: u("rejected"),
        duplicates: u("duplicates"),
        peak_rss: u("peak_rss"),
        size_on_disk: u("size_on_disk"),
        dir_apparent: u("dir_apparent"),
        dir_allocated: u("dir_allocated"),
    })
}

/// The figures of the one-shot ingest (printed as soon as it is done, and in the summary).
fn print_one_shot(one: &OneShot, corpus: &Corpus) {
    let rows = corpus.rows;
    println!(
        "one-shot ingest in a fresh process: {:.2} s, {:.0} rows/s, {:.1} MB/s",
        one.elapsed.as_secs_f64(),
        per_s(rows, one.elapsed),
        mb_per_s(corpus.bytes, one.elapsed)
    );
    println!(
        "peak RSS (VmHWM) of that process after ingest: {:.1} MiB  target <= 256 MiB: {}",
        mib(one.peak_rss),
        verdict(one.peak_rss <= 256 << 20)
    );
    let ratio = one.dir_allocated.max(one.dir_apparent) as f64 / corpus.bytes as f64;
    println!(
        "database on disk: {:.1} MiB apparent, {:.1} MiB allocated (sled size_on_disk {:.1} MiB) \
         vs {:.1} MiB raw JSONL = {ratio:.2}x  target <= 1.0x: {}",
        mib(one.dir_apparent),
        mib(one.dir_allocated),
        mib(one.size_on_disk),
        mib(corpus.bytes),
        verdict(ratio <= 1.0)
    );
}

/// Median of the measured iterations (the first one is criterion's warm-up).
fn measured(times: &[Duration]) -> Option<Duration> {
    match times.len() {
        0 => None,
        1 => Some(times[0]),
        _ => Some(median(&times[1..])),
    }
}

fn main() -> Result<()> {
    if let Some(data) = std::env::var_os(CHILD_ENV) {
        return child(Path::new(&data));
    }
    let n = bench_rows();
    let root = tempfile::Builder::new().prefix("lookout-bench-ingest").tempdir()?;

    let (corpus, t) = timed(|| write_corpus(&root.path().join("fleet"), n, 1));
    let corpus = corpus?;
    println!(
        "corpus: {} events requested, {} rows, {:.1} MiB of JSONL (generated and written in {:.1?})",
        n,
        corpus.rows,
        mib(corpus.bytes),
        t
    );
    let stats = parse_files(&corpus.files, true)?;
    if stats.rows != corpus.rows || stats.rejected != 0 {
        return Err(anyhow!("parse check: {} rows, {} rejected; expected {}", stats.rows, stats.rejected, corpus.rows));
    }
    let value_len = (stats.value_bytes / stats.rows) as usize;
    println!(
        "stored shape: {} B per value, {} B per key on average (JSONL: {} B per row)",
        value_len,
        stats.key_bytes / stats.rows,
        corpus.bytes / corpus.rows
    );

    let one = run_child(&corpus.files, &root.path().join("one-shot"))?;
    if one.new_rows != corpus.rows || one.rejected != 0 || one.duplicates != 0 {
        return Err(anyhow!(
            "one-shot ingest stored {} rows ({} rejected, {} duplicates); expected {}",
            one.new_rows,
            one.rejected,
            one.duplicates,
            corpus.rows
        ));
    }
    std::fs::remove_dir_all(root.path().join("one-shot"))?;
    print_one_shot(&one, &corpus);
    let keys = random_event_keys(corpus.rows as usize, 42);

    let mut c = Criterion::default().configure_from_args();
    let (mut t_ingest, mut t_parse, mut t_sled) = (Vec::new(), Vec::new(), Vec::new());
    let mut sled_size = (0, 0);
    {
        let mut g = c.benchmark_group("ingest");
        g.sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(5))
            .throughput(Throughput::Elements(corpus.rows));
        g.bench_function(BenchmarkId::new("end_to_end", corpus.rows), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dir = tempfile::tempdir_in(root.path()).expect("temp dir");
                    let (done, t) = timed(|| ingest_fresh(dir.path(), &corpus.files).expect("ingest"));
                    assert_eq!(done.1.total_new(), corpus.rows);
                    drop(done);
                    total += t;
                    t_ingest.push(t);
                }
                total
            })
        });
        g.bench_function(BenchmarkId::new("parse_only", corpus.rows), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (stats, t) = timed(|| parse_files(&corpus.files, false).expect("parse"));
                    assert_eq!(stats.rows, corpus.rows);
                    total += t;
                    t_parse.push(t);
                }
                total
            })
        });
        g.bench_function(BenchmarkId::new("sled_only", corpus.rows), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dir = tempfile::tempdir_in(root.path()).expect("temp dir");
                    let (db, t) = timed(|| sled_insert(dir.path(), &keys, value_len).expect("sled"));
                    drop(db);
                    sled_size = dir_size(dir.path()).expect("sled size");
                    total += t;
                    t_sled.push(t);
                }
                total
            })
        });
        g.finish();
    }
    c.final_summary();

    let rows = corpus.rows;
    println!();
    println!("== ingest summary: {rows} rows, {:.1} MiB JSONL (medians of the measured iterations)", mib(corpus.bytes));
    let line = |name: &str, t: Duration| {
        println!(
            "{name:<11} {:>8.2} s  {:>9.0} rows/s  {:>6.1} MB/s of JSONL",
            t.as_secs_f64(),
            per_s(rows, t),
            mb_per_s(corpus.bytes, t)
        )
    };
    let (ingest, parse, sled) = (measured(&t_ingest), measured(&t_parse), measured(&t_sled));
    if let Some(t) = ingest {
        line("end_to_end", t);
        println!("  target >= 50,000 rows/s end to end: {}", verdict(per_s(rows, t) >= 50_000.0));
    }
    if let Some(t) = parse {
        line("parse_only", t);
    }
    if let Some(t) = sled {
        line("sled_only", t);
        let written = rows * (value_len as u64 + stats.key_bytes / rows);
        println!(
            "  (sled_only writes {:.1} MB of keys + values, {:.1} MB/s; its database is {:.1} MiB on disk)",
            written as f64 / 1e6,
            mb_per_s(written, t),
            mib(sled_size.0.max(sled_size.1))
        );
    }
    if let (Some(i), Some(s)) = (ingest, sled) {
        let ratio = s.as_secs_f64() / i.as_secs_f64();
        println!("ratio end_to_end / sled_only (rows/s): {ratio:.2}  target >= 0.8: {}", verdict(ratio >= 0.8));
    }
    if let (Some(i), Some(p)) = (ingest, parse) {
        println!("ratio end_to_end / parse_only (rows/s): {:.2}", p.as_secs_f64() / i.as_secs_f64());
    }
    print_one_shot(&one, &corpus);
    Ok(())
}
