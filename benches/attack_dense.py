#!/usr/bin/env python3
"""The attack-dense tick: one detection pass over a tick of new rows full of attacks.

    cargo build --release -p lookout-cli
    python3 benches/attack_dense.py [--runs 10] [--against OTHER_TARGET_RELEASE_DIR]

A store of `lookout gen --events 300000 --attacks 12 --seed 1` (the WinRM detector's index
declared before the data, the backfill done), then, from a fresh copy of that store for
every run: `lookout ingest` of a tick of `lookout gen --events 10000 --attacks 100 --seed
79` and one `lookout detect --timings`. Prints each run's pass (choosing rows + in the
detector + committing, as `detect` prints them) and the medians.

With --against, a second build (another checkout's target/release, with its own
`lookout` and `liblookout_winrm.so`) runs alternately with this one, each on a store it
ingested itself: this host's speed drifts between runs by up to a third, and alternated
runs see the same drift.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

NOW = "2025-05-08T00:00:00Z"
TIMING_RE = re.compile(r"^  (\S+): choosing rows ([\d.]+) ms, in the detector ([\d.]+) ms"
                       r" \(of which its calls into the store ([\d.]+) ms\), committing ([\d.]+) ms$", re.M)
PASS_RE = re.compile(r"^\S+ \S+: incremental pass over (\d+) row\(s\), (\d+) new finding\(s\)", re.M)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(*cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        log(p.stdout, p.stderr)
        raise SystemExit(f"FAILED: {' '.join(str(c) for c in cmd)} (exit {p.returncode})")
    return p.stdout


class Build:
    def __init__(self, name, release, work):
        self.name = name
        self.exe = release / "lookout"
        # `cargo build -p lookout-cli` builds the library as a dependency (into deps/); a
        # copy at the top may be left from an older build: the newer of the two.
        lib = max((p for p in (release / "liblookout_winrm.so", release / "deps" / "liblookout_winrm.so")
                   if p.is_file()), key=lambda p: p.stat().st_mtime, default=None)
        if not self.exe.is_file() or lib is None:
            raise SystemExit(f"{release}: no lookout or liblookout_winrm.so (cargo build --release -p lookout-cli)")
        self.dir = work / name
        self.plugins = self.dir / "plugins"
        self.plugins.mkdir(parents=True)
        shutil.copyfile(lib, self.plugins / lib.name)
        (self.plugins / lib.name).chmod(0o644)
        self.store = self.dir / "store"
        self.passes = []

    def lookout(self, data, *args):
        return run(self.exe, "--data", data, *args)

    def prepare(self, base_logs):
        self.lookout(self.store, "detect", "--plugins", self.plugins, "--now", NOW)
        self.lookout(self.store, "ingest", "--now", NOW, base_logs)
        self.lookout(self.store, "detect", "--plugins", self.plugins, "--now", NOW)

    def one_run(self, tick_logs):
        data = self.dir / "run"
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(self.store, data)
        self.lookout(data, "ingest", "--now", NOW, tick_logs)
        # The copy and the ingest leave ~100 MB of dirty pages: written back now, not by
        # the kernel's flusher on a core the pass is measured on.
        os.sync()
        out = self.lookout(data, "detect", "--plugins", self.plugins, "--now", NOW, "--timings")
        t, p = TIMING_RE.search(out), PASS_RE.search(out)
        if not t or not p:
            raise SystemExit(f"cannot read the pass from `lookout detect --timings`:\n{out}")
        choose, detector, commit = float(t.group(2)), float(t.group(3)), float(t.group(5))
        self.passes.append({"ms": choose + detector + commit, "choose": choose, "detector": detector,
                            "commit": commit, "rows": int(p.group(1)), "new": int(p.group(2))})
        return self.passes[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="runs of each build")
    ap.add_argument("--against", help="another build's target/release directory, run alternately")
    ap.add_argument("--base-events", type=int, default=300_000)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--work", help="working directory (default: a temporary one, removed)")
    a = ap.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="lookout-attack-dense-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        builds = [Build("this", Path(a.root) / "target" / "release", work)]
        if a.against:
            builds.append(Build("against", Path(a.against), work))
        gen = builds[0].exe
        log(f"== gen: base of {a.base_events} events, tick of 10000 events with 100 attacks")
        run(gen, "gen", "--out", work / "base", "--events", a.base_events, "--attacks", 12, "--seed", 1)
        run(gen, "gen", "--out", work / "tick", "--events", 10_000, "--attacks", 100, "--seed", 79)
        for b in builds:
            log(f"== {b.name}: ingest the base, backfill")
            b.prepare(work / "base" / "logs")
        for i in range(a.runs):
            for b in builds:
                p = b.one_run(work / "tick" / "logs")
                log(f"run {i + 1} {b.name}: {p['ms']:.2f} ms over {p['rows']} rows, {p['new']} findings "
                    f"(choosing {p['choose']:.2f}, detector {p['detector']:.2f}, committing {p['commit']:.2f})")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print("| build | runs | pass median | fastest / slowest | runs ≤ 20 ms | choosing / detector / committing, medians |")
    print("|---|---|---|---|---|---|")
    for b in builds:
        ms = sorted(p["ms"] for p in b.passes)
        med = {k: statistics.median(p[k] for p in b.passes) for k in ("choose", "detector", "commit")}
        print(f"| {b.name} | {len(ms)} | {statistics.median(ms):.2f} ms | {ms[0]:.2f} / {ms[-1]:.2f} ms | "
              f"{sum(m <= 20 for m in ms)} of {len(ms)} | {med['choose']:.2f} / {med['detector']:.2f} / "
              f"{med['commit']:.2f} ms |")
    print(f"findings per pass: {sorted({p['new'] for b in builds for p in b.passes})}; each pass in ms: "
          + "; ".join(f"{b.name} " + ", ".join(f"{p['ms']:.1f}" for p in b.passes) for b in builds))


if __name__ == "__main__":
    main()
