#!/usr/bin/env bash
# Fills fuzz/corpus/<target>/ with seeds: lines of a generated fleet in every format,
# the kqlbench exports, and encoded plugin payloads. Run from anywhere.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/.."
kql="${KQLBENCH:-$root/tests/data/kqlbench}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$root" && cargo build -q -p lookout-cli)
lookout="$root/target/debug/lookout"
mkdir -p "$here/corpus/parse_record" "$here/corpus/table_detection" "$here/corpus/payload_decode"
for fmt in jsonl envelope array; do
  "$lookout" gen --out "$tmp/$fmt" --events 200 --attacks 4 --format "$fmt" >/dev/null
  n=0
  for f in "$tmp/$fmt"/logs/*; do
    head -c 20000 "$f" > "$here/corpus/parse_record/gen-$fmt-$n"; n=$((n + 1))
  done
done
if [ -d "$kql" ]; then
  head -c 30000 "$kql/DeviceImageLoadEvents.json" > "$here/corpus/parse_record/kqlbench-loads"
  head -c 30000 "$kql/DeviceFileEvents.json" > "$here/corpus/parse_record/kqlbench-files"
fi
printf 'AdvancedHunting-DeviceFileEvents\0\0x.json\0' > "$here/corpus/table_detection/envelope"
printf '\0DeviceImageLoadEvents\0x.json\0' > "$here/corpus/table_detection/type"
printf '\0\0DeviceProcessEvents-2025.jsonl\0' > "$here/corpus/table_detection/file"
printf '\0\0export.json\0FileProfile' > "$here/corpus/table_detection/explicit"
(cd "$root" && cargo run -q -p lookout-plugin-sdk --example payload_seeds -- "$here/corpus/payload_decode")
echo "seeded $(find "$here/corpus" -type f | wc -l) files under $here/corpus"
