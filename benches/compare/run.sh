#!/usr/bin/env bash
# Side-by-side comparison of Lookout against DuckDB on the same generated fleet.
#
#   benches/compare/run.sh [--rows N] [--large] [--ticks N] [--quick] [--no-md]
#   benches/compare/run.sh --pack [--sizes 100000,1000000] [--ticks N] [--no-md]
#
# Creates benches/.venv with duckdb, builds the release CLI (and the detector plugins
# built with it), then runs compare.py, which prints a markdown table and writes it into
# BENCHMARKS.md under "## Comparison with DuckDB" — or, with --pack, pack.py: every
# detector against its rule as DuckDB SQL, under "## The detector pack against DuckDB".
# See compare.py --help and pack.py --help for options.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/benches/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv" >&2
    "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import duckdb' 2>/dev/null; then
    echo "== pip install duckdb into $venv" >&2
    "$venv/bin/pip" install --quiet --upgrade pip >/dev/null 2>&1 || true
    "$venv/bin/pip" install --quiet duckdb
fi

echo "== cargo build --release -p lookout-cli -p lookout-benches --bin ceilings; the daemon_latency bench" >&2
(cd "$root" && cargo build --release -p lookout-cli && cargo build --release -p lookout-benches --bin ceilings \
    && cargo bench --no-run -q -p lookout-benches --bench daemon_latency)

if [ "${1:-}" = "--pack" ]; then
    # All four detectors against DuckDB running each rule as SQL (pack.py).
    shift
    exec "$venv/bin/python" "$here/pack.py" --root "$root" --command "benches/compare/run.sh --pack $*" "$@"
fi
exec "$venv/bin/python" "$here/compare.py" --root "$root" --command "benches/compare/run.sh $*" "$@"
