//! `lookout gen` and `lookout demo`.

use crate::cmd_detect::{print_findings, print_reports};
use crate::output::{human_bytes, parse_time};
use anyhow::{anyhow, Context, Result};
use clap::{Args, ValueEnum};
use lookout_core::detect::{run_pass, DetectOptions};
use lookout_core::error::Chain;
use lookout_core::findings::{all_findings, flush_outbox};
use lookout_core::gen::{self, Expected, FleetSpec, TruthPair};
use lookout_core::ingest::{ingest_paths, IngestOptions};
use lookout_core::{plugin, Store};
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// Advanced-hunting rows, one JSON object per line
    Jsonl,
    /// Streaming-API storage envelopes, CRLF line ends
    Envelope,
    /// Log Analytics style JSON array export
    Array,
}

impl From<FormatArg> for gen::Format {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Jsonl => gen::Format::Jsonl,
            FormatArg::Envelope => gen::Format::Envelope,
            FormatArg::Array => gen::Format::Array,
        }
    }
}

#[derive(Args, Clone)]
pub struct FleetArgs {
    /// Number of devices
    #[arg(long, default_value_t = 50)]
    devices: usize,
    /// Background events (image loads and file events)
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Injected attacks per rule (WinRM plugins, and each detector pack rule's), each with near misses
    #[arg(long, default_value_t = 12)]
    attacks: usize,
    /// Random seed; the same seed gives the same fleet
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The fleet's "now" (events lie in the days before it)
    #[arg(long, default_value = gen::DEFAULT_BASE_TIME)]
    base_time: String,
}

impl FleetArgs {
    fn spec(&self) -> Result<FleetSpec> {
        Ok(FleetSpec {
            devices: self.devices,
            events: self.events,
            attacks: self.attacks,
            seed: self.seed,
            base_time: parse_time("--base-time", &self.base_time)?,
        })
    }
}

#[derive(Args)]
pub struct GenArgs {
    /// Output directory
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    fleet: FleetArgs,
    /// File format
    #[arg(long, value_enum, default_value_t = FormatArg::Jsonl)]
    format: FormatArg,
}

pub fn gen(args: GenArgs) -> Result<ExitCode> {
    let spec = args.fleet.spec()?;
    let fleet = gen::generate(&spec);
    let files = gen::write_fleet(&fleet, &args.out, args.format.into())?;
    let pack_rows: usize = fleet.tables.values().map(Vec::len).sum();
    println!(
        "wrote {} rows ({} loads, {} writes, {} profiles, {pack_rows} of the detector pack's tables), {} to {}; \
         {} expected WinRM finding(s) in {}, {} for the detector pack in {}",
        fleet.rows(),
        fleet.loads.len(),
        fleet.writes.len(),
        fleet.profiles.len(),
        human_bytes(files.bytes),
        args.out.display(),
        fleet.truth.len(),
        files.truth.display(),
        fleet.expected.len(),
        args.out.join(gen::EXPECTED_FILE).display()
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct DemoArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Keep the fleet, database and findings in this directory instead of a temporary one
    #[arg(long)]
    keep: Option<PathBuf>,
}

/// The detector libraries built with this executable: the WinRM rule and the detector
/// pack.
const DETECTOR_LIBRARIES: &[&str] = &[
    "liblookout_winrm.so",
    "liblookout_scheduled_task_persistence.so",
    "liblookout_scm_remote_process.so",
    "liblookout_password_spraying.so",
];

/// Where a detector library built with this executable is.
fn find_library(file: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the lookout executable")?;
    let dir = exe.parent().ok_or_else(|| anyhow!("the lookout executable has no folder"))?;
    // Cargo writes a dependency's library into deps/, and the top-level copy only when the
    // plugin crate itself was built: the newer of the two is the one built with this binary.
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let candidates = [dir.join("deps").join(file), dir.join(file)];
    candidates.into_iter().filter(|p| p.is_file()).max_by_key(modified).ok_or_else(|| {
        anyhow!(
            "the detector library {file} is not next to {}; build it with \
             `cargo build --release -p lookout-cli` (it is built with the CLI)",
            exe.display()
        )
    })
}

pub fn demo(args: DemoArgs) -> Result<ExitCode> {
    let temp;
    let root = match &args.keep {
        Some(p) => p.clone(),
        None => {
            temp = tempfile::tempdir().context("cannot create a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let spec = args.fleet.spec()?;
    let (fleet_dir, data_dir, plugins_dir) = (root.join("fleet"), root.join("data"), root.join("plugins"));

    let t = Instant::now();
    let fleet = gen::generate(&spec);
    let files = gen::write_fleet(&fleet, &fleet_dir, gen::Format::Jsonl)?;
    println!(
        "1. generated a fleet of {} devices: {} rows ({} loads, {} writes, {} FileProfile, {} of the detector pack's tables), {}, {} attacks with near misses [{:.2}s]",
        spec.devices,
        fleet.rows(),
        fleet.loads.len(),
        fleet.writes.len(),
        fleet.profiles.len(),
        fleet.tables.values().map(Vec::len).sum::<usize>(),
        human_bytes(files.bytes),
        spec.attacks,
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let mut store = Store::open(&data_dir)?;
    let opts = IngestOptions { now: Some(spec.base_time), ..IngestOptions::default() };
    let report = ingest_paths(&mut store, &[gen::logs_dir(&fleet_dir)], &opts, &mut |_, _| {})?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "2. ingested {} rows ({} duplicates, {} rejected) into {} [{:.2}s, {:.0} rows/s]",
        report.total_new(),
        report.duplicates,
        report.total_rejected(),
        data_dir.display(),
        secs,
        report.total_new() as f64 / secs.max(1e-9)
    );

    std::fs::create_dir_all(&plugins_dir)?;
    std::fs::set_permissions(&plugins_dir, std::fs::Permissions::from_mode(0o755))?;
    for file in DETECTOR_LIBRARIES {
        let lib = find_library(file)?;
        let dropped = plugins_dir.join(file);
        std::fs::copy(&lib, &dropped).with_context(|| format!("cannot copy {}", lib.display()))?;
        std::fs::set_permissions(&dropped, std::fs::Permissions::from_mode(0o644))?;
    }
    let mut loaded = plugin::load_dir(&plugins_dir, &data_dir)?;
    for r in &loaded.refused {
        eprintln!("lookout: plugin refused: {}: {}", r.path.display(), Chain(&r.reason));
    }
    let names: Vec<String> = loaded.plugins.iter().map(|p| p.id()).collect();
    println!("3. loaded plugin(s) {} from {}", names.join(", "), plugins_dir.display());

    let detect = DetectOptions { now: Some(spec.base_time), ..DetectOptions::default() };
    let reports = run_pass(&mut store, &mut loaded.plugins, &detect)?;
    let findings_file = data_dir.join("findings.jsonl");
    let written = flush_outbox(&mut store, &findings_file)?;
    print!("4. ");
    print_reports(&reports);
    println!("   {written} finding(s) written to {}", findings_file.display());
    println!();
    let all = all_findings(&store)?;
    print_findings(&all);
    println!();

    // Each detector's findings against what the generator planted for it.
    let winrm = "winrm-plugin-lateral-movement";
    let mut checks: Vec<(String, usize, usize, usize, usize)> = Vec::new();
    fn of<'a>(all: &'a [Value], d: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        all.iter().filter(move |f| f["detector"] == d)
    }
    let found: BTreeSet<TruthPair> = of(&all, winrm).filter_map(truth_of).collect();
    let expected: BTreeSet<TruthPair> = fleet.truth.iter().cloned().collect();
    checks.push(check(winrm, &found, &expected, of(&all, winrm).count()));
    let mut pack: Vec<&str> = fleet.expected.iter().map(|e| e.detector.as_str()).collect();
    pack.dedup();
    for name in loaded.plugins.iter().map(|p| p.manifest.name.as_str()).filter(|n| *n != winrm) {
        if !pack.contains(&name) {
            pack.push(name);
        }
    }
    for detector in pack {
        let expected: BTreeSet<Expected> = fleet.expected.iter().filter(|e| e.detector == detector).cloned().collect();
        let columns: Vec<String> =
            expected.iter().next().map(|e| e.identity.iter().map(|(c, _)| c.clone()).collect()).unwrap_or_default();
        let found: BTreeSet<Expected> = of(&all, detector).filter_map(|f| gen::expected_of(f, &columns)).collect();
        checks.push(check(detector, &found, &expected, of(&all, detector).count()));
    }
    let good =
        checks.iter().all(|(_, found, expected, missing, extra)| found == expected && *missing == 0 && *extra == 0);
    println!("5. findings against the ground truth, per detector:");
    for (detector, found, expected, missing, extra) in &checks {
        println!("   {detector}: {found}/{expected} planted findings, {missing} missing, {extra} unexpected");
    }
    if good {
        println!("   every planted attack found, no near miss fired, no finding written twice");
        if args.keep.is_none() {
            println!("   (run with --keep DIR to look at the fleet, database and findings afterwards)");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        println!("   findings DO NOT match the ground truth");
        Ok(ExitCode::FAILURE)
    }
}

/// (detector, found and expected, expected, missing, unexpected — extra findings and
/// findings written twice count as unexpected).
fn check<T: Ord>(
    detector: &str,
    found: &BTreeSet<T>,
    expected: &BTreeSet<T>,
    lines: usize,
) -> (String, usize, usize, usize, usize) {
    let hit = found.intersection(expected).count();
    let missing = expected.len() - hit;
    let extra = lines - hit;
    (detector.to_string(), hit, expected.len(), missing, extra)
}

fn truth_of(f: &Value) -> Option<TruthPair> {
    let row = f.get("row")?;
    Some(TruthPair {
        device_id: row.get("DeviceId")?.as_str()?.to_string(),
        load_report_id: row.get("ReportId")?.as_i64()?,
        write_report_id: row.get("ReportId1")?.as_i64()?,
    })
}
