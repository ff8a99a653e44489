#!/usr/bin/env python3
"""Side-by-side comparison of Lookout against DuckDB on the same generated fleet.

Run through benches/compare/run.sh, which creates the virtualenv and builds the CLI.

Measured in one run, on the same files:
  1. ingest: `lookout ingest` wall time vs DuckDB CREATE TABLE AS read_json_auto(...),
     (once, then --ingest-pairs more of each, alternated into fresh stores: this VM's
     speed changes from minute to minute), and Lookout's parse-only and sled-only
     ceilings on the same files (`ceilings`)
  2. backfill: `lookout detect` first pass vs the rule as one DuckDB SQL query; the
     (load ReportId, write ReportId) pair sets of both must equal the ground truth
  3. incremental ticks of ~10k new rows: `lookout ingest` + `lookout detect` vs DuckDB
     INSERT + the full query again
  4. Lookout's per-tick pass time by rows stored (100k, 1M, 5M with --large)
  5. the daemon's append -> JSONL latency, p50/p99 (`cargo bench -p lookout-benches
     --bench daemon_latency`, run from here; --no-daemon skips it)
  6. peak RSS of `lookout ingest`, database size per stored row
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NOW = "2025-05-08T00:00:00Z"
NOW_SQL = "TIMESTAMPTZ '2025-05-08 00:00:00+00'"
TABLES = ("FileProfile", "DeviceImageLoadEvents", "DeviceFileEvents")
EVENT_TABLES = ("DeviceImageLoadEvents", "DeviceFileEvents")
REPORT_OFFSET = 1_000_000_000  # tick k's ReportIds are shifted by (k + 1) * this
PASS_RE = re.compile(r"(\w+) pass over (\d+) row\(s\), (\d+) new finding\(s\) in ([\d.]+) ms")

# The WinRM rule (plugins/winrm/src/lib.rs) written from DESIGN.md's semantics.
RULE_SQL = rf"""
WITH profile AS (
    SELECT SHA1, GlobalPrevalence, ProfileAvailability FROM FileProfile
    QUALIFY row_number() OVER (PARTITION BY SHA1 ORDER BY ingested_at DESC) = 1
),
plugins AS (
    SELECT l.ReportId, l.SHA1, l.DeviceId, lower(l.FolderPath) AS folder
    FROM DeviceImageLoadEvents l LEFT JOIN profile p ON p.SHA1 = l.SHA1
    WHERE l.ingested_at >= {NOW_SQL} - INTERVAL 2 DAY
      AND lower(l.InitiatingProcessFileName) = 'wsmprovhost.exe'
      AND NOT starts_with(lower(l.FolderPath), lower('C:\windows\assembly\nativeimages_'))
      AND lower(coalesce(p.ProfileAvailability, '')) <> 'error'
      AND coalesce(p.GlobalPrevalence, 0) < 100
),
writes AS (
    SELECT w.ReportId, w.SHA1, w.DeviceId, lower(w.FolderPath) AS folder
    FROM DeviceFileEvents w
    WHERE w.Timestamp >= {NOW_SQL} - INTERVAL 30 DAY
      AND lower(w.ActionType) IN ('filecreated', 'filerenamed', 'filemodified')
      AND lower(w.SHA1) IN (SELECT lower(SHA1) FROM plugins)
)
SELECT p.ReportId AS load_id, w.ReportId AS write_id
FROM plugins p JOIN writes w ON p.SHA1 = w.SHA1 AND p.DeviceId = w.DeviceId AND p.folder = w.folder
"""


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Runner:
    def __init__(self, exe, data):
        self.exe, self.data = str(exe), str(data)
        self.gnu_time = shutil.which("time") if Path("/usr/bin/time").exists() else None
        self.gnu_time = "/usr/bin/time" if Path("/usr/bin/time").exists() else None

    def run(self, *args, data=True, rss=False):
        """Runs lookout; returns (wall seconds, stdout, peak RSS KiB or None)."""
        cmd = [self.exe] + (["--data", self.data] if data else []) + [str(a) for a in args]
        if rss and self.gnu_time:
            cmd = [self.gnu_time, "-v"] + cmd
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            log(p.stdout, p.stderr)
            raise SystemExit(f"FAILED: {' '.join(cmd)} (exit {p.returncode})")
        peak = None
        if rss:
            m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
            if m:
                peak = int(m.group(1))
        return wall, p.stdout, peak

    def ingest(self, *paths, rss=False):
        return self.run("ingest", "--now", NOW, *paths, rss=rss)

    def detect(self, plugins, backfill=False):
        wall, out, _ = self.run("detect", "--plugins", plugins, "--now", NOW, *(["--backfill"] if backfill else []))
        m = PASS_RE.search(out)
        if not m:
            raise SystemExit(f"cannot find the pass line in `lookout detect` output:\n{out}")
        return {"wall": wall, "mode": m.group(1), "rows": int(m.group(2)), "new": int(m.group(3)),
                "pass_ms": float(m.group(4))}

    def pairs(self):
        _, out, _ = self.run("findings", "--json")
        pairs = set()
        for line in out.splitlines():
            if line.startswith("{"):
                row = json.loads(line)["row"]
                pairs.add((int(row["ReportId"]), int(row["ReportId1"])))
        return pairs


def count_lines(paths):
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            n += sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 24), b""))
    return n


def du(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def truth_pairs(path, offset=0):
    return {(t["load_report_id"] + offset, t["write_report_id"] + offset) for t in json.loads(Path(path).read_text())}


def device_map(logs):
    """DeviceName -> DeviceId of the base fleet (names are ws-0001… by index for any seed)."""
    m = {}
    for t in EVENT_TABLES:
        with open(logs / f"{t}.jsonl") as f:
            for i, line in enumerate(f):
                r = json.loads(line)
                m.setdefault(r["DeviceName"], r["DeviceId"])
                if i > 200_000:
                    break
    return m


def make_tick(exe, work, k, seed, events, devices):
    """Generates tick k, maps it onto the base fleet's devices and shifts its ReportIds so
    every row is distinct from the base and from other ticks. Returns (logs dir, truth, rows)."""
    raw = work / "ticks-raw" / f"{k:03d}"
    subprocess.run([str(exe), "gen", "--out", str(raw), "--events", str(events), "--attacks", "1",
                    "--seed", str(seed)], check=True, capture_output=True)
    out = work / "ticks" / f"{k:03d}"
    out.mkdir(parents=True, exist_ok=True)
    off = (k + 1) * REPORT_OFFSET
    ids = {}
    rows = 0
    for t in TABLES:
        with open(raw / "logs" / f"{t}.jsonl") as src, open(out / f"{t}-tick{k:03d}.jsonl", "w") as dst:
            for line in src:
                r = json.loads(line)
                if "ReportId" in r:
                    r["ReportId"] += off
                if "DeviceName" in r and r["DeviceName"] in devices:
                    ids[r["DeviceId"]] = devices[r["DeviceName"]]
                    r["DeviceId"] = devices[r["DeviceName"]]
                dst.write(json.dumps(r, separators=(",", ":")) + "\n")
                rows += 1
    truth = truth_pairs(raw / "ground-truth.json", off)
    shutil.rmtree(raw)
    return out, truth, rows


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))
    return xs[i]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def check(name, got, want):
    if got == want:
        log(f"CHECK {name}: OK ({len(got)} pairs)")
        return True
    log(f"CHECK {name}: MISMATCH: {len(got)} vs {len(want)} pairs; "
        f"missing {sorted(want - got)[:10]}, extra {sorted(got - want)[:10]}")
    return False


class Duck:
    def __init__(self, path, threads=None):
        import duckdb
        self.duckdb = duckdb
        self.path = path
        self.con = duckdb.connect(str(path))
        self.con.execute("SET TimeZone = 'UTC'")
        if threads:
            self.con.execute(f"SET threads = {threads}")
        self.schema = {}

    def load(self, logs):
        t0 = time.perf_counter()
        for t in TABLES:
            f = logs / f"{t}.jsonl"
            self.con.execute(
                f"CREATE TABLE {t} AS SELECT *, {NOW_SQL} AS ingested_at "
                f"FROM read_json_auto('{f}', format = 'newline_delimited', maximum_object_size = 16777216)")
            cols = self.con.execute(f"DESCRIBE {t}").fetchall()
            self.schema[t] = {c[0]: c[1] for c in cols if c[0] != "ingested_at"}
        self.con.execute("CHECKPOINT")
        return time.perf_counter() - t0

    def insert(self, logs):
        t0 = time.perf_counter()
        for t in TABLES:
            (f,) = logs.glob(f"{t}-*.jsonl")
            cols = "{" + ", ".join(f"'{c}': '{ty}'" for c, ty in self.schema[t].items()) + "}"
            self.con.execute(
                f"INSERT INTO {t} BY NAME SELECT *, {NOW_SQL} AS ingested_at "
                f"FROM read_json('{f}', format = 'newline_delimited', columns = {cols})")
        return time.perf_counter() - t0

    def rule(self):
        t0 = time.perf_counter()
        rows = self.con.execute(RULE_SQL).fetchall()
        return time.perf_counter() - t0, {(int(a), int(b)) for a, b in rows}

    def rows(self):
        return sum(self.con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES)


def grow_store(exe, work, plugins, size, ticks, n):
    """A store of `size` background events, backfilled, then `n` ticks: pass times (ms)."""
    log(f"== cost growth: store of {size:,} events")
    d = work / f"growth-{size}"
    subprocess.run([str(exe), "gen", "--out", str(d), "--events", str(size), "--attacks", "12", "--seed", "1"],
                   check=True, capture_output=True)
    lk = Runner(exe, d / "data")
    lk.detect(plugins)  # declares the detector's index before the data arrives
    # The WinRM rule's tables only (the fleet also has the detector pack's: pack.py).
    files = [d / "logs" / f"{t}.jsonl" for t in TABLES]
    lk.ingest(*files)
    stored = count_lines(files)
    lk.detect(plugins, backfill=True)
    shutil.rmtree(d / "logs")
    passes = []
    for logs, _, _ in ticks[:n]:
        lk.ingest(logs)
        passes.append(lk.detect(plugins)["pass_ms"])
    shutil.rmtree(d)
    return stored, passes


def target_dir(root):
    """Where cargo put the builds: CARGO_TARGET_DIR if set (relative to the root), else root/target."""
    t = os.environ.get("CARGO_TARGET_DIR")
    return (root / t) if t else root / "target"


def ceilings(root, files, work):
    """Parse-only and sled-only ingest ceilings on the same files (benches/src/bin/ceilings.rs)."""
    exe = target_dir(root) / "release" / "ceilings"
    d = work / "ceiling-sled"
    d.mkdir(exist_ok=True)
    p = subprocess.run([str(exe), "--sled-dir", str(d)] + [str(f) for f in files], capture_output=True, text=True)
    shutil.rmtree(d, ignore_errors=True)
    if p.returncode != 0:
        raise SystemExit(f"ceilings failed: {p.stderr}")
    return json.loads(p.stdout)


def daemon_latency(root):
    """The daemon bench's append -> JSONL percentiles (ms) and its steady-state line."""
    env = dict(os.environ, LOOKOUT_BENCH_STEADY_SECS=os.environ.get("LOOKOUT_BENCH_STEADY_SECS", "10"))
    p = subprocess.run(["cargo", "bench", "-q", "-p", "lookout-benches", "--bench", "daemon_latency"], cwd=root,
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"daemon_latency failed: {p.stdout}{p.stderr}")
    m = re.search(r"over (\d+) attacks: p50 ([\d.]+) ms, p90 ([\d.]+) ms, p99 ([\d.]+) ms", p.stdout)
    if not m:
        raise SystemExit(f"cannot read daemon_latency output:\n{p.stdout}")
    steady = next((l.split(": ", 1)[1] for l in p.stdout.splitlines() if l.startswith("daemon_latency: steady")), "")
    return {"attacks": int(m.group(1)), "p50": float(m.group(2)), "p99": float(m.group(4)), "steady": steady}


def machine():
    cpu = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    load = os.getloadavg()
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem": mem, "os": platform.platform(),
            "load": f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"}


def write_section(md_path, text, heading="## Comparison with DuckDB"):
    """Replaces the section under `heading` in BENCHMARKS.md (or appends it)."""
    old = md_path.read_text() if md_path.exists() else "# Benchmarks\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip() == heading), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        rest = "".join(lines[end:])
        new = "".join(lines[:start]) + text.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    md_path.write_text(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="background events of the base fleet")
    ap.add_argument("--large", action="store_true", help="also measure the per-tick pass with 5M stored")
    ap.add_argument("--ticks", type=int, default=50, help="incremental ticks (default 50)")
    ap.add_argument("--quick", action="store_true", help="10 ticks, 5 per growth store")
    ap.add_argument("--tick-rows", type=int, default=10_000)
    ap.add_argument("--growth-ticks", type=int, default=10, help="ticks per cost-growth store")
    ap.add_argument("--growth-sizes", default=None,
                    help="comma-separated store sizes for the cost growth (default 100000,1000000[,5000000])")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--no-md", action="store_true", help="do not write BENCHMARKS.md")
    ap.add_argument("--no-daemon", action="store_true", help="skip the daemon latency bench")
    ap.add_argument("--ingest-pairs", type=int, default=4,
                    help="further alternated Lookout ingest / DuckDB load pairs into fresh stores (default 4)")
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[2]))
    ap.add_argument("--command", default=None)
    a = ap.parse_args()
    if a.quick:
        a.ticks = min(a.ticks, 10)
        a.growth_ticks = min(a.growth_ticks, 5)
    root = Path(a.root)
    release = target_dir(root) / "release"
    exe = release / "lookout"
    lib = next((p for p in [release / "liblookout_winrm.so", release / "deps/liblookout_winrm.so"] if p.is_file()), None)
    if not exe.is_file() or lib is None:
        raise SystemExit("build first: cargo build --release -p lookout-cli")
    sizes = [int(s) for s in a.growth_sizes.split(",")] if a.growth_sizes else \
        [100_000, 1_000_000] + ([5_000_000] if a.large else [])
    started = datetime.datetime.now(datetime.timezone.utc)
    mach = machine()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="lookout-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"== scratch {work}; machine {mach}")
    try:
        # Pin the binaries: a concurrent `cargo build` must not swap them mid-run.
        (work / "bin").mkdir(exist_ok=True)
        shutil.copy2(exe, work / "bin" / "lookout")
        exe = work / "bin" / "lookout"
        plugins = work / "plugins"
        plugins.mkdir(exist_ok=True)
        os.chmod(plugins, 0o755)
        shutil.copyfile(lib, plugins / "liblookout_winrm.so")
        os.chmod(plugins / "liblookout_winrm.so", 0o644)

        # -- the base fleet
        log(f"== lookout gen --events {a.rows}")
        base = work / "base"
        subprocess.run([str(exe), "gen", "--out", str(base), "--events", str(a.rows), "--attacks", "12", "--seed", "1"],
                       check=True)
        logs = base / "logs"
        files = [logs / f"{t}.jsonl" for t in TABLES]
        rows = count_lines(files)
        jsonl_bytes = sum(f.stat().st_size for f in files)
        truth = truth_pairs(base / "ground-truth.json")

        log(f"== ticks: generating {a.ticks} x {a.tick_rows} events")
        devices = device_map(logs)
        need = max([a.ticks] + [a.growth_ticks if s != a.rows else 0 for s in sizes])
        ticks = [make_tick(exe, work, k, 1000 + k, a.tick_rows, devices) for k in range(need)]
        # The generated files' dirty pages (~1.7 GB) written back now, not during the first
        # ingest (which took ~1.5x as long as the next ones while they were).
        os.sync()

        # -- 1. ingest
        log("== Lookout ingest")
        lk = Runner(exe, work / "lookout-data")
        # The detector is in place before the data arrives (as on a collector): its first
        # pass, over an empty store, declares its index, which ingestion then maintains.
        lk.detect(plugins)
        lk_ingest, out, peak_kib = lk.ingest(*files, rss=True)
        log(out.strip())
        # The store's files (sled's main and generation databases, the key filter), not the
        # private copy of the detector library that `detect` keeps beside them.
        lk_size = du(work / "lookout-data") - du(work / "lookout-data" / "plugin-cache")
        log("== ingest ceilings (parse only, sled only) on the same files")
        ceil = ceilings(root, files, work)
        log(json.dumps(ceil))
        log("== DuckDB load")
        duck = Duck(work / "duck.db")
        dk_load = duck.load(logs)
        dk_size = (work / "duck.db").stat().st_size + (Path(str(work / "duck.db") + ".wal").stat().st_size
                                                       if Path(str(work / "duck.db") + ".wal").exists() else 0)
        dk_rows = duck.rows()
        if dk_rows != rows:
            raise SystemExit(f"DuckDB loaded {dk_rows} rows, the files have {rows}")
        # This VM runs a whole process at one of two speeds (~1.35x apart), switching within
        # minutes: one Lookout ingest and one DuckDB load can fall in different spells. More
        # loads of each, alternated into fresh stores, give the ratio of each adjacent pair.
        pairs = [(lk_ingest, dk_load)]
        for i in range(a.ingest_pairs):
            log(f"== ingest pair {i + 1} of {a.ingest_pairs} (fresh stores, alternated)")
            pair_lk = Runner(exe, work / f"pair-lookout-{i}")
            pair_lk.detect(plugins)
            lk_wall, _, _ = pair_lk.ingest(*files)
            shutil.rmtree(work / f"pair-lookout-{i}")
            pair_duck = Duck(work / f"pair-duck-{i}.db")
            dk_wall = pair_duck.load(logs)
            pair_duck.con.close()
            for leftover in work.glob(f"pair-duck-{i}.db*"):
                leftover.unlink()
            pairs.append((lk_wall, dk_wall))
            log(f"   lookout {lk_wall:.2f} s, duckdb {dk_wall:.2f} s: {dk_wall / lk_wall:.2f}x")

        # -- 2. backfill
        log("== backfill")
        # One pass is one sample on a shared VM (the same backfill took 48–165 ms by hand):
        # two more, each the first backfill of its own copy of the store, and the median.
        samples = []
        for i in range(2):
            copy = work / f"backfill-copy-{i}"
            shutil.copytree(lk.data, copy)
            samples.append(Runner(lk.exe, copy).detect(plugins, backfill=True))
            shutil.rmtree(copy)
        bf = lk.detect(plugins, backfill=True)
        samples.append(bf)
        bf_samples = sorted(x["pass_ms"] for x in samples)
        log("backfill passes: " + ", ".join(f"{x:.1f} ms" for x in bf_samples))
        bf = dict(bf, pass_ms=statistics.median(bf_samples))
        lk_pairs = lk.pairs()
        dk_backfill, dk_pairs = duck.rule()
        ok = check("backfill Lookout == truth", lk_pairs, truth)
        ok &= check("backfill DuckDB == truth", dk_pairs, truth)
        ok &= check("backfill Lookout == DuckDB", lk_pairs, dk_pairs)

        # -- 3. incremental
        log(f"== {a.ticks} ticks")
        per = []
        all_truth = set(truth)
        for k, (tlogs, ttruth, trows) in enumerate(ticks[:a.ticks]):
            i_wall, _, _ = lk.ingest(tlogs)
            d = lk.detect(plugins)
            dk_ins = duck.insert(tlogs)
            dk_q, dk_pairs = duck.rule()
            all_truth |= ttruth
            per.append({"rows": trows, "lk_ingest": i_wall, "lk_pass_ms": d["pass_ms"], "lk_detect_wall": d["wall"],
                        "lk_pass_rows": d["rows"], "lk_new": d["new"], "dk_insert": dk_ins, "dk_query": dk_q})
            log(f"tick {k:3d}: lookout ingest {i_wall * 1e3:.0f} ms, pass {d['pass_ms']:.1f} ms over {d['rows']} rows "
                f"(+{d['new']}), detect wall {d['wall'] * 1e3:.0f} ms | duckdb insert {dk_ins * 1e3:.0f} ms, "
                f"query {dk_q * 1e3:.0f} ms ({len(dk_pairs)} pairs)")
        lk_pairs = lk.pairs()
        if a.ticks:
            ok &= check(f"after {a.ticks} ticks Lookout == truth", lk_pairs, all_truth)
            ok &= check(f"after {a.ticks} ticks DuckDB == truth", dk_pairs, all_truth)
            ok &= check(f"after {a.ticks} ticks Lookout == DuckDB", lk_pairs, dk_pairs)

        # -- 4. cost growth
        growth = {}
        for s in sizes:
            if s == a.rows:
                growth[s] = (rows, [p["lk_pass_ms"] for p in per][: max(a.growth_ticks, a.ticks)])
            else:
                growth[s] = grow_store(exe, work, plugins, s, ticks, a.growth_ticks)
            log(f"   {growth[s][0]:,} stored: median pass {median(growth[s][1]):.2f} ms")
        daemon = None
        if not a.no_daemon:
            log("== daemon latency (cargo bench -p lookout-benches --bench daemon_latency)")
            daemon = daemon_latency(root)
            log(json.dumps(daemon))
    finally:
        if not a.keep and not a.work:
            shutil.rmtree(work, ignore_errors=True)

    # -- report
    tick_rows = median([p["rows"] for p in per]) if per else 0
    f = lambda xs: (median(xs), pct(xs, 99))
    lk_tick = [p["lk_ingest"] * 1e3 + p["lk_pass_ms"] for p in per]
    lk_tick_wall = [(p["lk_ingest"] + p["lk_detect_wall"]) * 1e3 for p in per]
    dk_tick = [(p["dk_insert"] + p["dk_query"]) * 1e3 for p in per]
    pass_ms = [p["lk_pass_ms"] for p in per]
    dk_q = [p["dk_query"] * 1e3 for p in per]

    def ms(x):
        return f"{x:,.1f} ms" if x < 10_000 else f"{x / 1e3:,.1f} s"

    def ratio(x, y):
        return f"{x / y:.2f}×" if y else "n/a"

    L = []
    L.append("## Comparison with DuckDB\n")
    L.append("```sh")
    L.append((a.command or f"benches/compare/run.sh --rows {a.rows}").strip())
    L.append("```\n")
    L.append(f"Measured {started:%Y-%m-%d %H:%M} UTC on {mach['nproc']} CPUs (`{mach['cpu']}`), {mach['mem']} memory, "
             f"{mach['os']}; DuckDB {duck.duckdb.__version__} (Python, on-disk database, default threads). "
             f"1/5/15-min load average at the start: {mach['load']} (the machine is shared: expect noise). "
             f"Base fleet: `lookout gen --events {a.rows} --attacks 12 --seed 1`, {rows:,} rows, "
             f"{jsonl_bytes / 2**20:,.1f} MiB of JSONL; each tick is `lookout gen --events {a.tick_rows} --attacks 1 "
             f"--seed 1000+k` ({tick_rows:,.0f} rows), mapped onto the base fleet's devices with ReportIds shifted by "
             f"(k+1)×10⁹ so every row is distinct. Everything is ingested with `--now {NOW}`, and detection runs with the "
             f"same `--now`. DuckDB runs the rule as one SQL query written from DESIGN.md's semantics "
             f"(`benches/compare/compare.py`, `RULE_SQL`), re-running it in full each tick.\n")
    L.append("| measure | Lookout | DuckDB | DuckDB / Lookout |")
    L.append("|---|---|---|---|")
    L.append(f"| ingest {rows:,} rows (wall) | {lk_ingest:,.2f} s = {rows / lk_ingest:,.0f} rows/s | "
             f"{dk_load:,.2f} s = {rows / dk_load:,.0f} rows/s | {ratio(dk_load, lk_ingest)} |")
    if len(pairs) > 1:
        ratios = sorted(d / l for l, d in pairs)
        L.append(f"| ingest, {len(pairs)} alternated pairs (the first is the row above): Lookout median / DuckDB median, "
                 f"DuckDB / Lookout of each pair | {median([l for l, _ in pairs]):,.2f} s = "
                 f"{rows / median([l for l, _ in pairs]):,.0f} rows/s | {median([d for _, d in pairs]):,.2f} s = "
                 f"{rows / median([d for _, d in pairs]):,.0f} rows/s | median {median(ratios):.2f}× "
                 f"({', '.join(f'{r:.2f}' for r in ratios)}) |")
    L.append(f"| ingest ceiling: parse only (same files, nothing stored) | {ceil['parse_rows_per_s']:,.0f} rows/s | | "
             f"Lookout / ceiling {rows / lk_ingest / ceil['parse_rows_per_s']:.2f}× |")
    L.append(f"| ingest ceiling: sled only ({ceil['sled_rows']:,} keys, {ceil['value_len']:,}-byte values, batches of 4096) | "
             f"{ceil['sled_rows_per_s']:,.0f} rows/s | | Lookout / ceiling {rows / lk_ingest / ceil['sled_rows_per_s']:.2f}× |")
    L.append(f"| backfill detection (Lookout: pass time; wall incl. process start in brackets) | "
             f"{ms(bf['pass_ms'])}, median of {', '.join(ms(x) for x in bf_samples)} ({ms(bf['wall'] * 1e3)}) | "
             f"{ms(dk_backfill * 1e3)} | "
             f"{ratio(dk_backfill * 1e3, bf['pass_ms'])} |")
    if per:
        m, p = f(lk_tick)
        mw, pw = f(lk_tick_wall)
        dm, dp = f(dk_tick)
        L.append(f"| tick ({len(per)} ticks of ~{tick_rows:,.0f} rows): ingest wall + detect pass, median / p99 | "
                 f"{ms(m)} / {ms(p)} | {ms(dm)} / {ms(dp)} (INSERT + full query) | {ratio(dm, m)} / {ratio(dp, p)} |")
        L.append(f"| tick, all wall (Lookout: two process runs), median / p99 | {ms(mw)} / {ms(pw)} | {ms(dm)} / {ms(dp)} | "
                 f"{ratio(dm, mw)} / {ratio(dp, pw)} |")
        pm, pp = f(pass_ms)
        qm, qp = f(dk_q)
        L.append(f"| tick detection only: Lookout pass vs DuckDB query, median / p99 | {ms(pm)} / {ms(pp)} | "
                 f"{ms(qm)} / {ms(qp)} | {ratio(qm, pm)} / {ratio(qp, pp)} |")
        im, ip = f([p_["lk_ingest"] * 1e3 for p_ in per])
        dim, dip = f([p_["dk_insert"] * 1e3 for p_ in per])
        L.append(f"| tick ingest only (wall), median / p99 | {ms(im)} / {ms(ip)} | {ms(dim)} / {ms(dip)} | "
                 f"{ratio(dim, im)} / {ratio(dip, ip)} |")
    if daemon:
        L.append(f"| daemon append → JSONL latency ({daemon['attacks']} attacks, `lookout run`) | p50 {daemon['p50']:,.1f} ms, "
                 f"p99 {daemon['p99']:,.1f} ms | | |")
    L.append(f"| peak RSS of `lookout ingest` ({rows:,} rows) | "
             f"{peak_kib / 1024:,.1f} MiB |  |  |" if peak_kib else "| peak RSS of `lookout ingest` | n/a | | |")
    L.append(f"| database size after the base ingest (Lookout: the data directory less `plugin-cache`) | {lk_size / 2**20:,.1f} MiB = {lk_size / rows:,.0f} B/row "
             f"({lk_size / jsonl_bytes:.2f}× the JSONL) | {dk_size / 2**20:,.1f} MiB = {dk_size / rows:,.0f} B/row | "
             f"{ratio(dk_size, lk_size)} |")
    L.append("")
    L.append("Lookout's per-tick detection pass by rows stored (cost growth):\n")
    L.append("| rows stored | ticks | pass median | pass p99 | vs the smallest store |")
    L.append("|---|---|---|---|---|")
    base_m = None
    for s in sizes:
        stored, ps = growth[s]
        gm = median(ps)
        base_m = base_m or gm
        # To the hundredth `lookout detect` prints: a ratio of passes of about a millisecond.
        L.append(f"| {stored:,} | {len(ps)} | {gm:,.2f} ms | {pct(ps, 99):,.2f} ms | {ratio(gm, base_m)} |")
    L.append("")
    L.append(f"Pair check (load ReportId, write ReportId) — Lookout `findings --json` (`row.ReportId`, `row.ReportId1`) vs "
             f"the DuckDB query vs the generator's ground truth, after the backfill and after the last tick: "
             f"**{'identical' if ok else 'MISMATCH'}** ({len(all_truth)} pairs at the end).\n")
    if daemon and daemon["steady"]:
        L.append(f"Daemon steady state (same bench): {daemon['steady']}.\n")
    L.append("A Lookout tick is two process starts (`ingest`, then `detect`, which also loads and verifies the "
             "plugin); the pass time excludes both, the wall rows include them. The DuckDB side keeps one connection "
             "open for the whole run. The ceilings come from `target/release/ceilings` (benches/src/bin) on the base "
             "fleet's files.")
    text = "\n".join(L) + "\n"
    print(text)
    if not a.no_md:
        write_section(root / "BENCHMARKS.md", text)
        log(f"== wrote the section into {root / 'BENCHMARKS.md'}")
    if not ok:
        log("FAILED: the pair sets differ (see CHECK lines above)")
        sys.exit(1)


if __name__ == "__main__":
    main()
