//! Helpers shared by Lookout's criterion benches (`benches/ingest.rs`, `benches/detect.rs`):
//! the generated corpus, the "parse only" and "sled only" ceilings, sizes on disk, peak RSS,
//! and finding the built WinRM plugin. See BENCHMARKS.md at the repository root.

use anyhow::{anyhow, Context, Result};
use lookout_core::gen::{self, FleetSpec, Format};
use lookout_core::ingest::{ingest_paths, IngestOptions, IngestReport};
use lookout_core::parse::lines::LineReader;
use lookout_core::parse::normalise::{normalise, TableHints};
use lookout_core::parse::open::open;
use lookout_core::parse::record::{parse_document, unwrap_document};
use lookout_core::schema::table_from_file_name;
use lookout_core::Store;
use lookout_plugin_sdk::time::{parse_timestamp, TICKS_PER_SEC};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rows (background events) of the generated fleet: `LOOKOUT_BENCH_ROWS`, default 1M.
pub fn bench_rows() -> usize {
    std::env::var("LOOKOUT_BENCH_ROWS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(1_000_000)
}

/// The fixed ingestion and evaluation time (`--now`): `gen::DEFAULT_BASE_TIME`.
pub fn base_time() -> i64 {
    parse_timestamp(gen::DEFAULT_BASE_TIME).expect("DEFAULT_BASE_TIME parses")
}

pub fn ingest_options() -> IngestOptions {
    IngestOptions { now: Some(base_time()), ..IngestOptions::default() }
}

/// A generated fleet written as JSON Lines.
pub struct Corpus {
    /// The three table files, in name order (DeviceFileEvents, DeviceImageLoadEvents, FileProfile).
    pub files: Vec<PathBuf>,
    /// Raw JSONL bytes of the three files.
    pub bytes: u64,
    /// Lines (= rows) in the files.
    pub rows: u64,
}

/// Generates a fleet of `events` background events with `seed` and writes it as JSONL
/// under `dir`.
pub fn write_corpus(dir: &Path, events: usize, seed: u64) -> Result<Corpus> {
    let fleet = gen::generate(&FleetSpec { events, seed, ..FleetSpec::default() });
    corpus_of(&fleet, dir)
}

/// Like [`write_corpus`], but the devices are those of a fleet generated with `devices_seed`
/// (the same device names map to the same `DeviceId`s), as a later batch from the same
/// machines would be.
pub fn write_corpus_on_devices(dir: &Path, events: usize, seed: u64, devices_seed: u64) -> Result<Corpus> {
    let mut fleet = gen::generate(&FleetSpec { events, seed, ..FleetSpec::default() });
    // A tiny fleet of the other seed has the same device list (devices come first).
    let other = gen::generate(&FleetSpec { events: 2_000, seed: devices_seed, attacks: 0, ..FleetSpec::default() });
    let mut ids = std::collections::HashMap::new();
    for row in other.loads.iter().chain(&other.writes) {
        if let (Some(Value::String(name)), Some(id)) = (row.get("DeviceName"), row.get("DeviceId")) {
            ids.insert(name.clone(), id.clone());
        }
    }
    for row in fleet.loads.iter_mut().chain(fleet.writes.iter_mut()) {
        let id = match row.get("DeviceName") {
            Some(Value::String(name)) => ids.get(name).cloned(),
            _ => None,
        };
        if let Some(id) = id {
            row.insert("DeviceId".into(), id);
        }
    }
    corpus_of(&fleet, dir)
}

fn corpus_of(fleet: &gen::Fleet, dir: &Path) -> Result<Corpus> {
    let written = gen::write_fleet(fleet, dir, Format::Jsonl)?;
    // In name order, as `lookout ingest <dir>` reads them (the order changes sled's work).
    let mut files = vec![written.profiles, written.loads, written.writes];
    files.sort();
    Ok(Corpus { files, bytes: written.bytes, rows: fleet.rows() as u64 })
}

/// Opens a fresh store in `data` and ingests `files` into it, then flushes: file →
/// committed and on disk.
pub fn ingest_fresh(data: &Path, files: &[PathBuf]) -> Result<(Store, IngestReport)> {
    let mut store = Store::open(data)?;
    let report = ingest_paths(&mut store, files, &ingest_options(), &mut |_, _| {})?;
    store.flush()?;
    Ok((store, report))
}

/// What the "parse only" pass saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct ParseStats {
    pub rows: u64,
    pub rejected: u64,
    /// Sum of stored value sizes (only when encoding was asked for).
    pub value_bytes: u64,
    /// Sum of event key sizes (only when encoding was asked for).
    pub key_bytes: u64,
}

/// Reads `files` line by line with Lookout's own reader and runs the same parsing and
/// normalisation as ingestion (UTF-8 check, `parse_document`,
/// `unwrap_document`, `normalise`), storing nothing. With `encode`, also builds each
/// row's key and stored value (to learn their sizes).
pub fn parse_files(files: &[PathBuf], encode: bool) -> Result<ParseStats> {
    let mut stats = ParseStats::default();
    let mut buf = Vec::new();
    for path in files {
        let opened = open(path, 0, Arc::new(AtomicU64::new(0)))?;
        let hints = TableHints {
            file_table: path.file_name().and_then(|n| table_from_file_name(&n.to_string_lossy())),
            explicit: None,
        };
        let mut reader = LineReader::new(opened.reader, IngestOptions::default().max_line, opened.bom);
        while reader.next_line(&mut buf)?.is_some() {
            if buf.iter().all(u8::is_ascii_whitespace) || std::str::from_utf8(&buf).is_err() {
                stats.rejected += 1;
                continue;
            }
            let Ok(doc) = parse_document(&buf) else {
                stats.rejected += 1;
                continue;
            };
            for unwrapped in unwrap_document(doc) {
                match unwrapped.and_then(|u| normalise(u.row, u.category_table.as_deref(), &hints)) {
                    Ok(row) => {
                        stats.rows += 1;
                        if encode {
                            let key = event_key_like(1, &row.sha1, &row.device_id, row.timestamp, &row.identity);
                            stats.key_bytes += key.len() as u64;
                            stats.value_bytes += row.cells.value(1, base_time()).len() as u64;
                        } else {
                            std::hint::black_box(&row);
                        }
                    }
                    Err(_) => stats.rejected += 1,
                }
            }
        }
    }
    Ok(stats)
}

/// A key of the shape of Lookout's row keys (table id, u16-length-prefixed SHA1 and
/// DeviceId, sign-flipped big-endian Timestamp, ReportId): the store keeps its key layout
/// to itself, and these ceilings only need keys of the same size and order.
fn event_key_like(table: u16, sha1: &str, device: &str, timestamp: i64, id: &str) -> Vec<u8> {
    let mut k = vec![b'e'];
    k.extend_from_slice(&table.to_be_bytes());
    for s in [sha1, device] {
        k.extend_from_slice(&(s.len() as u16).to_be_bytes());
        k.extend_from_slice(s.as_bytes());
    }
    k.extend_from_slice(&((timestamp as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(&(id.len() as u16).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Keys shaped like Lookout's row keys ([`event_key_like`]): a table id, a random
/// 40-hex SHA1, one of 50 random 40-hex device ids, a timestamp in the last 5 days and an
/// increasing ReportId. Their order is random, as Lookout's is.
pub fn random_event_keys(n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let hex = |rng: &mut ChaCha8Rng| hex::encode(rng.gen::<[u8; 20]>());
    let devices: Vec<String> = (0..50).map(|_| hex(&mut rng)).collect();
    let now = base_time();
    let mut report = 1000i64;
    (0..n)
        .map(|_| {
            let table = if rng.gen_bool(0.45) { 1 } else { 2 };
            let sha1 = hex(&mut rng);
            let device = &devices[rng.gen_range(0..devices.len())];
            let at = now - rng.gen_range(60 * TICKS_PER_SEC..5 * 86_400 * TICKS_PER_SEC);
            report += rng.gen_range(1..40);
            event_key_like(table, &sha1, device, at, &report.to_string())
        })
        .collect()
}

/// A sled database configured as `Store::open` configures its own (64 MiB cache, flush
/// every 500 ms).
pub fn open_sled(dir: &Path) -> Result<sled::Db> {
    sled::Config::new()
        .path(dir.join("db"))
        .cache_capacity(64 << 20)
        .flush_every_ms(Some(500))
        .open()
        .map_err(|e| anyhow!("cannot open sled in {}: {e}", dir.display()))
}

/// The "sled only" ceiling: inserts `keys` with `value_len`-byte values into a fresh
/// sled database in `dir` with `apply_batch` in batches of 4096, then flushes.
pub fn sled_insert(dir: &Path, keys: &[Vec<u8>], value_len: usize) -> Result<sled::Db> {
    let db = open_sled(dir)?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let value: Vec<u8> = (0..value_len).map(|_| rng.gen()).collect();
    for chunk in keys.chunks(4096) {
        let mut batch = sled::Batch::default();
        for k in chunk {
            batch.insert(k.as_slice(), value.as_slice());
        }
        db.apply_batch(batch)?;
    }
    db.flush()?;
    Ok(db)
}

/// Apparent size (sum of file lengths) and allocated size (blocks) of everything under `dir`.
pub fn dir_size(dir: &Path) -> Result<(u64, u64)> {
    let mut apparent = 0;
    let mut allocated = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (a, b) = dir_size(&entry.path())?;
            apparent += a;
            allocated += b;
        } else {
            apparent += meta.len();
            allocated += meta.blocks() * 512;
        }
    }
    Ok((apparent, allocated))
}

/// Copies a directory tree (a closed store) to `dst`.
pub fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let to = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to)?;
        } else {
            std::fs::copy(entry.path(), &to)?;
        }
    }
    Ok(())
}

/// Peak resident set size of this process so far (`VmHWM`), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub const WINRM_LIB: &str = "liblookout_winrm.so";

/// The WinRM plugin built with the benches: `target/<profile>/deps/liblookout_winrm.so`
/// or `target/<profile>/liblookout_winrm.so`, found from the running bench executable
/// (`target/<profile>/deps/<bench>-<hash>`).
pub fn winrm_lib() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile =
        exe.parent().and_then(Path::parent).ok_or_else(|| anyhow!("odd executable path {}", exe.display()))?;
    [profile.join("deps").join(WINRM_LIB), profile.join(WINRM_LIB)].into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow!("{WINRM_LIB} not found under {}; build with `cargo bench -p lookout-benches`", profile.display())
    })
}

/// A plugins folder (mode 0755) under `root` holding a copy (mode 0644) of the WinRM plugin.
pub fn winrm_plugins_dir(root: &Path) -> Result<PathBuf> {
    let dir = root.join("plugins");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let dst = dir.join(WINRM_LIB);
    std::fs::copy(winrm_lib()?, &dst)?;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644))?;
    Ok(dir)
}

/// Times `f`.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

/// The median of some durations (the mean of the middle two for an even count).
pub fn median(times: &[Duration]) -> Duration {
    let mut t = times.to_vec();
    t.sort();
    match t.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => t[n / 2],
        n => (t[n / 2 - 1] + t[n / 2]) / 2,
    }
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Decimal megabytes per second.
pub fn mb_per_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64()
}

pub fn per_s(n: u64, t: Duration) -> f64 {
    n as f64 / t.as_secs_f64()
}

/// "met" / "NOT met".
pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}
