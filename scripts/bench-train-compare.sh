#!/usr/bin/env bash
# Step time and peak memory of `deepspec bench train`, for two builds in one run,
# alternating (old, new, old, new, ...), so machine drift hits both alike. Peak memory is
# the max RSS that GNU time reports for the whole process, the same measure for both
# binaries (a new build also prints its own).
#
#   scripts/bench-train-compare.sh OLD_BIN NEW_BIN [ROUNDS] -- BENCH_ARGS...
#   scripts/bench-train-compare.sh old/deepspec target/release/deepspec 2 -- \
#       --preset smollm2 --algo dspark --seq-len 2048 --anchors 128 --layers 5
set -euo pipefail
old=$1 new=$2 rounds=${3:-2}
shift 3
[ "${1:-}" = "--" ] && shift
command -v /usr/bin/time >/dev/null || { echo "needs GNU time (/usr/bin/time)" >&2; exit 1; }
run() {
  local bin=$1 label=$2 log
  shift 2
  log=$(mktemp)
  if /usr/bin/time -v "$bin" bench train "$@" >"$log" 2>&1; then status=ok; else status="failed ($?)"; fi
  local ms rss
  ms=$(grep -o '"step_ms_median":[0-9.]*' "$log" | cut -d: -f2 || true)
  rss=$(grep 'Maximum resident set size' "$log" | awk '{print $NF}')
  printf '%-4s step_ms=%s max_rss_mib=%s %s\n' "$label" "${ms:-n/a}" "$(( ${rss:-0} / 1024 ))" "$status"
  rm -f "$log"
}
for _ in $(seq "$rounds"); do
  run "$old" old "$@"
  run "$new" new "$@"
done
