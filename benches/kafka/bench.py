#!/usr/bin/env python3
"""Lookout over Kafka against its targets, on librdkafka's mock cluster (3 brokers).

    cargo build --release -p lookout-cli --features kafka
    python3 benches/kafka/bench.py [--events 20000] [--target target/release] [--property KEY=VALUE]

Prints, for one generated fleet:
  * file ingest and one node, in alternated pairs (`--pairs`, default 3): `lookout ingest`
    of the event tables into a fresh store, then one node (no detectors, a fresh data
    directory) consuming the split topic from the start to lag 0; each pair's ratio of
    the node's rate to the file ingest's (the target is >= 0.8x) and the medians. This
    host runs a process at one of two speeds, switching within minutes: a pair's two
    runs are minutes apart at most, so its ratio is what the speed changes least; each
    pair also times a file ingest into a store where the four detectors were loaded first
    (their declared look-up keys and column indexes kept as rows arrive);
  * replay: a second node with all four detectors taking over half the partitions of a
    killed node; from the SIGKILL to the survivor owning every partition, replayed, with
    the findings decided (target <= 15 s with a 6 s session timeout), and the replay
    rate of the taken-over rows (target >= the file-ingest rate): the rows over the
    longest time from a take-over to that partition replayed and detected, as the
    survivor logs it, against the file ingest that keeps the same detectors' indexes
    (the survivor stores for them), and against the plain one; then against a file
    ingest of exactly the replayed partitions' messages (one per line, the same rows in
    the same batches, with the detectors' indexes; median of three, right after): stored
    against that ingest, and detected against that ingest followed by the detectors' pass
    over its rows (`lookout detect --timings`: the pass, not the process around it). This
    runs `--failovers` times (default 3), each in a group of its own, and ends with the
    medians: one failover's replay is a single half-second measurement on a host whose
    speed moves by a fifth from minute to minute.
Producers compress with lz4: the mock keeps only the newest ~5 MB of a partition.

With --pin, the mock cluster runs on CPU 0 and everything of Lookout's (the file ingest,
the split, the nodes) on CPU 1: the node and the file ingest it is compared with then
have the same one core, and the brokers do not take a share of it. --fetch-cpu 0 then
moves the survivor's librdkafka threads (fetching, decompressing) onto the mock's core
just before the kill, as on a node whose brokers are elsewhere and whose fetch threads
have a core of their own: the replay's storing keeps CPU 1 to itself, as the file
ingest does.
"""
import argparse, datetime, json, os, re, resource, shutil, signal, subprocess, sys, tempfile, time, urllib.request

NOW = "2025-05-08T00:00:00Z"
PARTITIONS = 6
# `lookout detect --timings`: the whole pass of every detector, its state's loading apart.
WHOLE_RE = re.compile(r"^the pass of all \d+ detector\(s\): ([\d.]+) ms, not counting", re.M)


def status(data):
    """A node's partitions (`/status/kafka`): read from its memory, where `/status` sums up
    every partition's store. Polled every 10 ms during a replay, `/status` took a share of
    the one core the replay was measured on."""
    try:
        addr = open(os.path.join(data, "daemon.addr")).read().strip()
        with urllib.request.urlopen(f"http://{addr}/status/kafka", timeout=5) as r:
            return json.load(r)
    except Exception:
        return None


def settled(nodes, want=PARTITIONS, statuses=None):
    """Rows stored once every partition is owned once, at its end and detected; else None.
    `statuses` (one per node) when the caller has just asked for them."""
    owners = {}
    rows = 0
    for i, d in enumerate(nodes):
        s = statuses[i] if statuses is not None else status(d)
        if s is None:
            return None
        for p in (s.get("kafka") or {}).get("partitions", []):
            if p["lag"] or p["replaying"] or p["detection_pending"] or p["next_offset"] != p["high_watermark"]:
                return None
            owners[p["partition"]] = owners.get(p["partition"], 0) + 1
            rows += p["rows_stored"]
    if len(owners) != want or any(n != 1 for n in owners.values()):
        return None
    return rows


def cpu_children():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_of(pid):
    """User + system CPU seconds of a running process (all its threads)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def replay_seconds(log_path, message="partition replayed", since=None):
    """partition -> seconds of its latest `message` line in the log (logged at or after
    `since`, a UTC datetime, if given)."""
    out = {}
    for line in open(log_path, errors="replace"):
        # tracing's format: `<time>  INFO <target>: <message> key=value ...`.
        fields = line.split()
        words = line.split(": ", 1)[1].split() if ": " in line else []
        if " ".join(w for w in words if "=" not in w) != message:
            continue
        if since is not None:
            try:
                at = datetime.datetime.fromisoformat(fields[0].replace("Z", "+00:00"))
            except ValueError:
                continue
            if at < since:
                continue
        kv = dict(f.split("=", 1) for f in fields if "=" in f)
        if "partition" in kv and "seconds" in kv:
            out[int(kv["partition"])] = float(kv["seconds"])
    return out


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def move_threads(pid, prefix, cpu):
    """Pins the threads of `pid` whose name starts with `prefix` to `cpu`; their names."""
    moved = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            if name.startswith(prefix):
                os.sched_setaffinity(int(tid), {cpu})
                moved.append(name)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return sorted(moved)


def wait(pred, timeout, what):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        v = pred()
        if v is not None:
            return v, time.monotonic() - start
        time.sleep(0.1)
    sys.exit(f"timed out waiting for {what}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--target", default="target/release")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (nodes.log)")
    ap.add_argument("--perf", action="store_true", help="record the one-node run with perf (kept in the work folder)")
    ap.add_argument("--perf-replay", action="store_true",
                    help="record the survivor from the kill to the end of its replay with perf (perf-replay.data)")
    ap.add_argument("--property", action="append", default=[], metavar="KEY=VALUE",
                    help="a librdkafka property for every client (split, nodes), in [kafka.properties]")
    ap.add_argument("--pairs", type=int, default=3, help="alternated file ingests and one-node runs")
    ap.add_argument("--failovers", type=int, default=3,
                    help="failovers, each followed by a file ingest of the rows it replayed (medians printed)")
    ap.add_argument("--pin", action="store_true",
                    help="the mock cluster on CPU 0, Lookout (file ingest, split, nodes) on CPU 1 (taskset)")
    ap.add_argument("--fetch-cpu", type=int, default=None, metavar="CPU",
                    help="with --pin: before the kill, move the survivor's librdkafka threads (rdk:*) onto this CPU "
                         "(the mock's), so the replay's fetching and decompressing do not share its storing core")
    a = ap.parse_args()
    if a.fetch_cpu is not None and not a.pin:
        ap.error("--fetch-cpu needs --pin")
    t = os.path.abspath(a.target)
    lookout, mock = os.path.join(t, "lookout"), os.path.join(t, "lookout-kafka-mock")
    work = tempfile.mkdtemp(prefix="lookout-kafka-bench.")
    a.keep = a.keep or a.perf or a.perf_replay
    try:
        run(a, t, lookout, mock, work)
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


PIN = {"mock": [], "lookout": []}


def node(lookout, data, brokers, plugins, profiles, log, cfg, perf=None, group="nodes"):
    wrap = ["perf", "record", "-F", "999", "-g", "-o", perf] if perf else []
    return subprocess.Popen(
        [*PIN["lookout"], *wrap, lookout, "--data", data, "run", "--config", cfg, "--kafka", "--brokers", brokers, "--topic", "rows", "--group", group,
         "--findings-topic", "findings", "--plugins", plugins, "--logs", profiles, "--now", NOW, "--ingest-now", NOW,
         "--retention", "none", "--listen", "127.0.0.1:0", "--rescan-secs", "1"],
        stdout=log, stderr=log)


def run(a, t, lookout, mock, work):
    if a.pin:
        PIN["mock"], PIN["lookout"] = ["taskset", "-c", "0"], ["taskset", "-c", "1"]
        print("pinned: the mock cluster on CPU 0, Lookout on CPU 1")
    fleet = os.path.join(work, "fleet")
    subprocess.run([lookout, "--data", os.path.join(work, "g"), "gen", "--out", fleet, "--events", str(a.events),
                    "--attacks", "12", "--seed", "1"], check=True, capture_output=True)
    logs = os.path.join(fleet, "logs")
    profiles = os.path.join(work, "profiles")
    os.makedirs(profiles)
    shutil.move(os.path.join(logs, "FileProfile.jsonl"), profiles)
    files = sorted(os.path.join(logs, f) for f in os.listdir(logs))
    rows = sum(sum(1 for _ in open(f)) for f in files)
    print(f"rows (event tables): {rows}")

    srv = subprocess.Popen([*PIN["mock"], mock, "serve", "--brokers", "3", "--topic", f"in:{PARTITIONS}", "--topic", f"rows:{PARTITIONS}",
                            "--topic", f"findings:{PARTITIONS}", "--topic", "rows.unkeyed:1",
                            "--topic", "rows.rejected:1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    brokers = srv.stdout.readline().strip()
    cfg = os.path.join(work, "lookout.toml")
    props = {"compression.type": "lz4", **dict(p.split("=", 1) for p in a.property)}
    open(cfg, "w").write("[kafka.properties]\n" + "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in props.items()))
    # gzip: the mock keeps only the newest ~5 MB of a partition, and lz4 let it drop the
    # oldest messages of the input topic in some runs. (The rows topic the nodes read is
    # lz4, as lookout.toml says.)
    subprocess.run([mock, "produce", "--brokers", brokers, "--topic", "in", "--compression", "gzip", *files], check=True,
                   capture_output=True)
    t0 = time.monotonic()
    split_cmd = [*PIN["lookout"], lookout, "split", "--brokers", brokers, "--from", "in", "--to", "rows", "--idle-exit", "2",
                 "--config", cfg]
    out = subprocess.run(split_cmd, check=True, capture_output=True, text=True)
    stats = json.loads(out.stdout)
    if stats["records"] != rows:
        sys.exit(f"the split read {stats['records']} of {rows} records: the mock dropped some (fewer --events)")
    print(f"split: {stats} in {time.monotonic() - t0:.1f} s (incl. ~3 s group join, 2 s idle exit)")

    # The ceiling: reading the rows topic from this mock, decompressing, nothing else.
    t0 = time.monotonic()
    consumed = subprocess.run([*PIN["lookout"], mock, "consume", "--brokers", brokers, "--topic", "rows"], check=True,
                              capture_output=True).stdout
    secs = time.monotonic() - t0
    got = consumed.count(b"\n")
    # Each partition's messages as the nodes read them: the replay is also compared with
    # a file ingest of exactly the partitions it replayed.
    by_partition = {}
    for line in consumed.splitlines():
        n, payload = line.split(b"\t", 1)
        by_partition.setdefault(int(n), []).append(payload)
    print(f"consume only (lookout-kafka-mock consume, one partition after another): {got} messages in {secs:.2f} s "
          f"= {got / secs:,.0f} messages/s")

    empty = os.path.join(work, "no-plugins")
    os.makedirs(empty, mode=0o755)
    plugins = os.path.join(work, "plugins")
    os.makedirs(plugins, mode=0o755)
    for lib in ["winrm", "scheduled_task_persistence", "scm_remote_process", "password_spraying"]:
        dst = os.path.join(plugins, f"liblookout_{lib}.so")
        src = os.path.join(t, f"liblookout_{lib}.so")
        shutil.copy(src if os.path.exists(src) else os.path.join(t, "deps", f"liblookout_{lib}.so"), dst)
        os.chmod(dst, 0o644)
    log = open(os.path.join(work, "nodes.log"), "ab")

    # File ingest and one node (no detectors, consuming everything from its first
    # assignment to lag 0), alternated in pairs.
    file_rates, node_rates, ratios, indexed_rates = [], [], [], []
    for i in range(a.pairs):
        # The same file ingest into a store where the four detectors were loaded first
        # (so their declared look-up keys and column indexes are kept as rows arrive, as
        # on a node running them): what the replay below, which stores for the detectors,
        # is compared with.
        di = os.path.join(work, f"indexed{i}")
        subprocess.run([*PIN["lookout"], lookout, "--data", di, "detect", "--plugins", plugins, "--now", NOW],
                       check=True, capture_output=True)
        t0 = time.monotonic()
        subprocess.run([*PIN["lookout"], lookout, "--data", di, "ingest", "--now", NOW, "--retention", "none", *files],
                       check=True, capture_output=True)
        indexed_rates.append(rows / (time.monotonic() - t0))
        shutil.rmtree(di)
        t0 = time.monotonic()
        cpu0 = cpu_children()
        subprocess.run([*PIN["lookout"], lookout, "--data", os.path.join(work, f"file{i}"), "ingest", "--now", NOW,
                        "--retention", "none", *files], check=True, capture_output=True)
        file_secs = time.monotonic() - t0
        file_cpu = cpu_children() - cpu0
        shutil.rmtree(os.path.join(work, f"file{i}"))
        file_rates.append(rows / file_secs)
        print(f"pair {i + 1}: file ingest {file_secs:.2f} s, {rows / file_secs:,.0f} rows/s, CPU {file_cpu:.2f} s "
              f"({file_cpu / rows * 1e6:.1f} us/row); with the detectors' indexes {indexed_rates[-1]:,.0f} rows/s")
        d1 = os.path.join(work, f"n1-{i}")
        since = datetime.datetime.now(datetime.timezone.utc)
        perf = os.path.join(work, "perf.data") if a.perf and i == 0 else None
        p1 = node(lookout, d1, brokers, empty, profiles, log, cfg, perf)
        wait(lambda: (status(d1) or {}).get("kafka", {}).get("partitions") or None, 60, "the first assignment")
        stored, _ = wait(lambda: settled([d1]), 300, "one node to consume everything")
        # The node logs when each partition has reached the end it had at assignment, and
        # how long that took since the take-over; they are consumed side by side in one loop.
        log.flush()
        secs = max(replay_seconds(os.path.join(work, "nodes.log"), since=since).values())
        cpu = cpu_of(p1.pid) if not perf else float("nan")
        node_rates.append(stored / secs)
        ratios.append(stored / secs / file_rates[-1])
        print(f"pair {i + 1}: one node, no detectors: {stored} rows in {secs:.2f} s from its assignment to the last "
              f"partition's end: {stored / secs:,.0f} rows/s = {ratios[-1]:.2f}x the file ingest before it; node CPU "
              f"{cpu:.2f} s from its start ({cpu / stored * 1e6:.1f} us/row, librdkafka's threads included)")
        p1.send_signal(signal.SIGTERM)
        p1.wait()
        shutil.rmtree(d1, ignore_errors=True)
    file_rate = median(file_rates)
    print(f"one node against file ingest: pairs {', '.join(f'{r:.2f}x' for r in ratios)}; median of the pairs "
          f"{median(ratios):.2f}x (target >= 0.8x); median rates {median(node_rates):,.0f} rows/s (node) and "
          f"{file_rate:,.0f} rows/s (file ingest)")
    indexed_rate = median(indexed_rates)
    print(f"file ingest with the detectors' indexes: median {indexed_rate:,.0f} rows/s (what the replay's ratios "
          f"below are to; {indexed_rate / file_rate:.2f}x the plain file ingest)")

    # Failover with detectors: two nodes in a new group, one killed; --failovers times,
    # each against a file ingest of the same rows right after it.
    runs = [failover(a, k, lookout, brokers, plugins, profiles, log, cfg, work, by_partition, indexed_rate, file_rate)
            for k in range(a.failovers)]
    if len(runs) > 1:
        col = lambda i: ", ".join(f"{r[i]:.2f}" for r in runs)
        print(f"over {len(runs)} failovers: SIGKILL -> replayed and detected {col(0)} s (median "
              f"{median([r[0] for r in runs]):.2f} s); the replay against the same rows from a file, detected "
              f"{col(1)}x (median {median([r[1] for r in runs]):.2f}x), stored {col(2)}x (median "
              f"{median([r[2] for r in runs]):.2f}x)")
    srv.stdin.close()
    srv.wait()


def failover(a, k, lookout, brokers, plugins, profiles, log, cfg, work, by_partition, indexed_rate, file_rate):
    """One failover: two nodes of a new group settle, one is killed, the survivor replays
    its partitions; then the same partitions' messages from a file. Returns (seconds from
    the kill to replayed and detected, the replay's rate detected and stored over the
    file's)."""
    da, db = os.path.join(work, f"a{k}"), os.path.join(work, f"b{k}")
    group = f"nodes{k}"
    pa = node(lookout, da, brokers, plugins, profiles, log, cfg, group=group)
    pb = node(lookout, db, brokers, plugins, profiles, log, cfg, group=group)
    wait(lambda: settled([da, db]), 300, "two nodes to settle")
    before = sum(p["rows_stored"] for p in status(da)["kafka"]["partitions"])
    rec = None
    if a.perf_replay:
        rec = subprocess.Popen(["perf", "record", "-F", "999", "-g", "--call-graph", "dwarf,16384", "-p", str(pa.pid), "-o",
                                os.path.join(work, f"perf-replay{k}.data")], stdout=log, stderr=log)
        time.sleep(0.5)
    if a.fetch_cpu is not None:
        moved = move_threads(pa.pid, "rdk:", a.fetch_cpu)
        print(f"the survivor's librdkafka threads moved to CPU {a.fetch_cpu}: {', '.join(moved)}")
    killed_at = datetime.datetime.now(datetime.timezone.utc)
    pb.send_signal(signal.SIGKILL)
    pb.wait()
    killed = time.monotonic()
    taken = None
    # The failover is timed by looking at /status every 50 ms (to within that, of ~12 s);
    # the replay by the survivor itself, which logs when each partition it took over is
    # replayed and detected: looking every 10 ms took a tenth of the one core the replay
    # ran on (the /status thread's TCP sends and wake-ups).
    while time.monotonic() - killed < 120:
        s = status(da)
        if s and len(s["kafka"]["partitions"]) == PARTITIONS and taken is None:
            taken = time.monotonic() - killed
        if s and settled([da], statuses=[s]) is not None:
            break
        time.sleep(0.05)
    done = time.monotonic() - killed
    if rec:
        rec.send_signal(signal.SIGINT)
        rec.wait()
    replayed = sum(p["rows_stored"] for p in status(da)["kafka"]["partitions"]) - before
    log.flush()
    detected = replay_seconds(os.path.join(work, "nodes.log"), "partition replayed and detected", killed_at)
    if not detected:
        sys.exit("the survivor logged no `partition replayed and detected` line after the kill")
    replay_secs = max(detected.values())
    print(f"failover: SIGKILL -> survivor assigned every partition {taken:.2f} s, replayed and detected {done:.2f} s "
          f"(target <= 15 s, session timeout 6 s)")
    print(f"replay: {replayed} rows in {replay_secs:.2f} s = {replayed / replay_secs:,.0f} rows/s "
          f"= {replayed / replay_secs / indexed_rate:.2f}x file ingest with the detectors' indexes (target >= 1x), "
          f"detectors included; {replayed / replay_secs / file_rate:.2f}x the plain file ingest")
    stored = replay_seconds(os.path.join(work, "nodes.log"), "partition replayed", killed_at)
    stored_secs = max(stored.values()) if stored else None
    if stored:
        print(f"replay stored (before the detectors' pass): {stored_secs:.2f} s = {replayed / stored_secs:,.0f} rows/s "
              f"= {replayed / stored_secs / indexed_rate:.2f}x file ingest with the detectors' indexes, "
              f"{replayed / stored_secs / file_rate:.2f}x the plain file ingest")
    # The same rows from a file, right after: the messages of the partitions replayed, one
    # per line (a Streaming-API batch, read as file ingest reads any), into a fresh store
    # with the detectors' indexes, three times; its rate is of the records read, as the
    # replay's is of the rows each partition stored.
    same = os.path.join(work, f"replayed{k}.jsonl")
    records = 0
    with open(same, "wb") as f:
        for n in sorted(detected):
            for payload in by_partition.get(n, []):
                v = json.loads(payload)
                records += len(v["records"]) if isinstance(v, dict) and "records" in v else 1
                f.write(payload + b"\n")
    same_secs, pass_secs = [], []
    for i in range(3):
        ds = os.path.join(work, f"same{k}-{i}")
        subprocess.run([*PIN["lookout"], lookout, "--data", ds, "detect", "--plugins", plugins, "--now", NOW],
                       check=True, capture_output=True)
        # The FileProfile feed, as the survivor has it (not timed).
        subprocess.run([*PIN["lookout"], lookout, "--data", ds, "ingest", "--now", NOW, "--retention", "none",
                        profiles], check=True, capture_output=True)
        t0 = time.monotonic()
        subprocess.run([*PIN["lookout"], lookout, "--data", ds, "ingest", "--now", NOW, "--retention", "none", same],
                       check=True, capture_output=True)
        same_secs.append(time.monotonic() - t0)
        # Then the detectors' pass over them, as the replay's "detected" includes its first
        # passes: the pass alone (not the process's start or its loading the libraries).
        out = subprocess.run([*PIN["lookout"], lookout, "--data", ds, "detect", "--plugins", plugins, "--now", NOW,
                              "--timings"], check=True, capture_output=True, text=True).stdout
        whole = WHOLE_RE.search(out)
        if not whole:
            sys.exit(f"`lookout detect --timings` did not print the whole pass's time:\n{out}")
        pass_secs.append(float(whole.group(1)) / 1e3)
        shutil.rmtree(ds)
    same_rate = records / median(same_secs)
    detected_rate = records / median([s + p for s, p in zip(same_secs, pass_secs)])
    print(f"the same partitions' {records} records from a file, right after (with the detectors' indexes, median of "
          f"3): {median(same_secs):.2f} s = {same_rate:,.0f} rows/s, and the detectors' pass over them "
          f"{median(pass_secs) * 1e3:.1f} ms: {detected_rate:,.0f} rows/s detected; the replay is "
          f"{replayed / replay_secs / detected_rate:.2f}x that detected (both passes included), "
          + (f"{replayed / stored_secs / same_rate:.2f}x stored" if stored else "(no stored time)"))
    pa.send_signal(signal.SIGTERM)
    pa.wait()
    if not a.keep:
        shutil.rmtree(da, ignore_errors=True)
        shutil.rmtree(db, ignore_errors=True)
        os.remove(same)
    return done, replayed / replay_secs / detected_rate, (replayed / stored_secs / same_rate if stored else float("nan"))


if __name__ == "__main__":
    main()
