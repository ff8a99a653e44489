//! The daemon, end to end: from a line appended to a watched file to its finding in the
//! JSONL (p50/p99 over every injected attack), and the daemon's CPU and memory while the
//! collector writes a steady 5,000 rows/s.
//!
//! Needs the release binary: `cargo build --release -p lookout-cli` first. Prints its
//! figures; `LOOKOUT_BENCH_ATTACKS` (default 240) and `LOOKOUT_BENCH_STEADY_SECS`
//! (default 30) change the run.

use lookout_core::gen::{self, FleetSpec};
use lookout_tests::{plugins_dir, table_counts, target_dir, DaemonSpec, WINRM};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn append(path: &Path, rows: &[&Map<String, Value>]) {
    let mut buf = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut buf, r).expect("row JSON");
        buf.push(b'\n');
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open log");
    f.write_all(&buf).expect("append");
}

fn lines_in(path: &Path) -> usize {
    std::fs::read(path).map(|b| b.iter().filter(|&&c| c == b'\n').count()).unwrap_or(0)
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// (utime + stime) in clock ticks, and VmHWM/VmRSS in KiB, of a process.
fn proc_usage(pid: u32) -> (u64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let cpu = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (cpu, kib("VmHWM:"), kib("VmRSS:"))
}

fn main() {
    let lookout = target_dir().join("lookout");
    assert!(lookout.is_file(), "{} is missing: run `cargo build --release -p lookout-cli` first", lookout.display());
    let attacks = env_usize("LOOKOUT_BENCH_ATTACKS", 240);
    let steady_secs = env_usize("LOOKOUT_BENCH_STEADY_SECS", 30);

    let tmp = tempfile::tempdir().expect("tempdir");
    let (logs, data) = (tmp.path().join("logs"), tmp.path().join("data"));
    for d in [&logs, &data] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let plugins = plugins_dir(tmp.path(), &[WINRM]);

    // A fleet with many attacks; background rows go in first, attacks are appended one by one.
    let spec = FleetSpec { events: 20_000, attacks, ..FleetSpec::default() };
    let fleet = gen::generate(&spec);
    let report = |r: &Map<String, Value>| r.get("ReportId").and_then(Value::as_i64).unwrap_or(0);
    let attack_loads: HashSet<i64> = fleet.truth.iter().map(|t| t.load_report_id).collect();
    let attack_writes: HashSet<i64> = fleet.truth.iter().map(|t| t.write_report_id).collect();
    let (loads_log, writes_log) = (logs.join("DeviceImageLoadEvents.jsonl"), logs.join("DeviceFileEvents.jsonl"));
    append(&logs.join("FileProfile.jsonl"), &fleet.profiles.iter().collect::<Vec<_>>());
    append(&loads_log, &fleet.loads.iter().filter(|r| !attack_loads.contains(&report(r))).collect::<Vec<_>>());
    append(&writes_log, &fleet.writes.iter().filter(|r| !attack_writes.contains(&report(r))).collect::<Vec<_>>());

    let now = gen::DEFAULT_BASE_TIME;
    // Its log goes beside the data directory, in the temporary folder.
    let mut daemon = DaemonSpec::new(&data).binary(&lookout).logs(&logs).plugins(&plugins).now(now).spawn();
    let pid = daemon.pid();
    let findings = data.join("findings.jsonl");
    let background = fleet.rows() - fleet.truth.len();
    println!(
        "daemon_latency: {} background rows, {} attacks ({} expected findings)",
        background,
        attacks,
        fleet.truth.len()
    );
    let start = Instant::now();
    let want = (fleet.loads.len() + fleet.writes.len() - attack_loads.len() - attack_writes.len()) as u64;
    daemon.wait_for("the background to be ingested", Duration::from_secs(600), |d| {
        let s = d.try_status().ok_or("no /status answer")?;
        let t = table_counts(&s);
        let events =
            t.get("DeviceImageLoadEvents").copied().unwrap_or(0) + t.get("DeviceFileEvents").copied().unwrap_or(0);
        if events >= want {
            Ok(())
        } else {
            Err(format!("{events} of {want} event rows"))
        }
    });
    println!("daemon_latency: background ingested in {:.1}s", start.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_millis(500));

    // One attack at a time: its write(s), then the load; time until its findings are in the JSONL.
    let mut latencies = Vec::new();
    let mut expected = lines_in(&findings);
    let by_report = |rows: &[Map<String, Value>], id: i64| rows.iter().find(|r| report(r) == id).cloned();
    let mut seen_loads = HashSet::new();
    for t in &fleet.truth {
        if !seen_loads.insert(t.load_report_id) {
            continue;
        }
        let pairs = fleet.truth.iter().filter(|p| p.load_report_id == t.load_report_id).count();
        let writes: Vec<Map<String, Value>> = fleet
            .truth
            .iter()
            .filter(|p| p.load_report_id == t.load_report_id)
            .filter_map(|p| by_report(&fleet.writes, p.write_report_id))
            .collect();
        let load = by_report(&fleet.loads, t.load_report_id).expect("attack load");
        append(&writes_log, &writes.iter().collect::<Vec<_>>());
        append(&loads_log, &[&load]);
        let t0 = Instant::now();
        expected += pairs;
        wait_until("an attack's finding", Duration::from_secs(30), || lines_in(&findings) >= expected);
        latencies.push(t0.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(20));
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    println!(
        "daemon_latency: append -> JSONL over {} attacks: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0.0)
    );

    // Steady state: 5,000 rows/s of fresh background rows for `steady_secs`.
    let extra = gen::generate(&FleetSpec { events: 5_000 * steady_secs, attacks: 0, seed: 99, ..FleetSpec::default() });
    let mut rows: Vec<(&Path, &Map<String, Value>)> = extra.loads.iter().map(|r| (loads_log.as_path(), r)).collect();
    rows.extend(extra.writes.iter().map(|r| (writes_log.as_path(), r)));
    let ticks = sysconf_clk_tck();
    let (cpu0, _, _) = proc_usage(pid);
    let t0 = Instant::now();
    let mut peak_rss = 0;
    for (i, chunk) in rows.chunks(500).enumerate() {
        let (l, w): (Vec<_>, Vec<_>) = chunk.iter().partition(|(p, _)| *p == loads_log.as_path());
        append(&loads_log, &l.iter().map(|(_, r)| *r).collect::<Vec<_>>());
        append(&writes_log, &w.iter().map(|(_, r)| *r).collect::<Vec<_>>());
        let due = t0 + Duration::from_millis(100 * (i as u64 + 1));
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        peak_rss = peak_rss.max(proc_usage(pid).2);
    }
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, hwm, _) = proc_usage(pid);
    let cpu_pct = (cpu1 - cpu0) as f64 / ticks as f64 / wall * 100.0;
    println!(
        "daemon_latency: steady {} rows/s for {:.0}s: CPU {:.1}% of one core, RSS peak {:.0} MiB (VmHWM {:.0} MiB)",
        rows.len() as f64 / wall,
        wall,
        cpu_pct,
        peak_rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
}

/// Clock ticks per second of /proc CPU times (100 on Linux unless configured otherwise).
fn sysconf_clk_tck() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}
