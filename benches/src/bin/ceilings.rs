//! The two physical ceilings of ingestion, measured on given files (used by
//! `benches/compare`): "parse only" (Lookout's reading, parsing and normalisation of the
//! files, nothing stored) and "sled only" (as many Lookout-shaped keys with values of the
//! files' average stored size, inserted into a fresh sled configured as Lookout's, in
//! batches of 4096). Prints one JSON object.
//!
//! `ceilings [--sled-dir DIR] FILE...`

use anyhow::{anyhow, Result};
use lookout_benches::*;
use std::path::PathBuf;

/// The `lookout` binary's allocator (cli/src/main.rs): measure what ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    // The `lookout` binary's memory settings, so the figures are the binary's.
    lookout_core::memory::no_transparent_huge_pages();
    let mut args = std::env::args_os().skip(1).peekable();
    let mut sled_dir = None;
    let mut files = Vec::new();
    while let Some(a) = args.next() {
        if a == "--sled-dir" {
            sled_dir = Some(PathBuf::from(args.next().ok_or_else(|| anyhow!("--sled-dir needs a folder"))?));
        } else {
            files.push(PathBuf::from(a));
        }
    }
    if files.is_empty() {
        return Err(anyhow!("usage: ceilings [--sled-dir DIR] FILE..."));
    }
    let (parsed, parse_time) = timed(|| parse_files(&files, false));
    let parsed = parsed?;
    // Sizes come from a second pass that also encodes (not timed: encoding is not parsing).
    let sized = parse_files(&files, true)?;
    let rows = sized.rows.max(1);
    let value_len = (sized.value_bytes / rows) as usize;
    let keys = random_event_keys(rows as usize, 42);
    let tmp = tempfile::tempdir()?;
    let dir = sled_dir.unwrap_or_else(|| tmp.path().to_path_buf());
    let (db, sled_time) = timed(|| sled_insert(&dir, &keys, value_len));
    drop(db?);
    println!(
        "{}",
        serde_json::json!({
            "rows": parsed.rows,
            "parse_s": parse_time.as_secs_f64(),
            "parse_rows_per_s": per_s(parsed.rows, parse_time),
            "sled_rows": keys.len(),
            "sled_s": sled_time.as_secs_f64(),
            "sled_rows_per_s": per_s(keys.len() as u64, sled_time),
            "value_len": value_len,
            "key_len": sized.key_bytes / rows,
        })
    );
    Ok(())
}
