#!/usr/bin/env bash
# Side-by-side comparison of Lookout against DuckDB on the same generated fleet.
#
#   benches/compare/run.sh [--rows N] [--large] [--ticks N] [--quick] [--no-md]
#
# Creates benches/.venv with duckdb, builds the release CLI (and the WinRM plugin built
# with it), then runs compare.py, which prints a markdown table and writes it into
# BENCHMARKS.md under "## Comparison with DuckDB". See compare.py --help for options.
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

exec "$venv/bin/python" "$here/compare.py" --root "$root" --command "benches/compare/run.sh $*" "$@"
