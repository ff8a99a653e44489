//! `(table, SHA1, DeviceId)` look-up latency on an existing data directory: the look-up a
//! detector's write probe makes (`Store::lookup`, rows decoded), for (SHA1, DeviceId)
//! pairs taken from a JSON Lines file of that table that was ingested into it. Prints one
//! JSON object: look-ups, hits, p50/p99/max in microseconds, cold (first look-up of each
//! pair after opening) and warm (the same pairs again).
//!
//! `lookups DATA_DIR TABLE FILE [N]`

use anyhow::{anyhow, Context, Result};
use lookout_core::Store;
use lookout_plugin_sdk::Row;
use std::io::BufRead;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<()> {
    // The `lookout` binary's memory settings, so the figures are the binary's.
    lookout_core::memory::no_transparent_huge_pages();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [data, table, file, rest @ ..] = args.as_slice() else {
        return Err(anyhow!("usage: lookups DATA_DIR TABLE FILE [N]"));
    };
    let n: usize = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(2000);
    // Every k-th line, so the pairs come from the whole file (all of the store's age).
    let lines =
        std::io::BufReader::new(std::fs::File::open(file).with_context(|| format!("open {file}"))?).lines().count();
    let step = (lines / n).max(1);
    let mut pairs = Vec::new();
    for (i, line) in std::io::BufReader::new(std::fs::File::open(file)?).lines().enumerate() {
        if i % step != 0 || pairs.len() >= n {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        let get = |c: &str| v.get(c).and_then(|x| x.as_str()).unwrap_or("").to_string();
        pairs.push((get("SHA1"), get("DeviceId")));
    }
    let store = Store::open(std::path::Path::new(data))?;
    let mut report = serde_json::Map::new();
    for pass in ["cold", "warm"] {
        // All look-ups, and those with at most 10 hits (the detectors' usual probe).
        let (mut all, mut few) = (Vec::with_capacity(pairs.len()), Vec::new());
        let mut hits = 0usize;
        for (sha1, device) in &pairs {
            let t = Instant::now();
            let rows = store.lookup::<Row>(table, sha1, Some(device))?;
            let us = t.elapsed().as_secs_f64() * 1e6;
            all.push(us);
            if rows.len() <= 10 {
                few.push(us);
            }
            hits += rows.len();
        }
        let summary = |times: &mut Vec<f64>| {
            times.sort_by(f64::total_cmp);
            if times.is_empty() {
                return serde_json::json!({ "lookups": 0 });
            }
            serde_json::json!({
                "lookups": times.len(),
                "p50_us": percentile(times, 0.5),
                "p99_us": percentile(times, 0.99),
                "max_us": percentile(times, 1.0),
            })
        };
        report.insert(
            pass.into(),
            serde_json::json!({ "hits": hits, "all": summary(&mut all), "at_most_10_hits": summary(&mut few) }),
        );
    }
    println!("{}", serde_json::Value::Object(report));
    Ok(())
}
