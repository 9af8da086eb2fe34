#!/usr/bin/env bash
# Instructions per cache hit, which do not depend on the machine:
# valgrind's callgrind counts what kvgate executes for a 1 KiB hit on one
# keep-alive connection.
#
#   benches/instructions.sh [KVGATE_BINARY ...]
#   KVGATE_ARGS="--config benches/edge-on.toml" benches/instructions.sh
#
# KVGATE_ARGS (optional) is added to every gateway's command line, e.g. to
# count the edge layer's share.
#
# Method: for N = 500 and N = 2500, start kvgate under callgrind in front of
# the harness origin, warm /static/hot-1, send N requests for it on one
# keep-alive connection (curl with a URL list), stop kvgate with SIGTERM
# and read its total instruction count. Instructions per hit =
# (I(2500) - I(500)) / 2000: start-up, warm-up and shutdown cancel out.
# (What kvgate does by the clock, e.g. the store sweeper, does not cancel
# and adds a little.) Needs valgrind, curl and ../shared/bench's origin.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
origin_bin="$root/../shared/bench/origin/target/release/origin"
bins=("$@")
if [[ ${#bins[@]} -eq 0 ]]; then
  bins=("${CARGO_TARGET_DIR:-$root/target}/release/kvgate")
fi
for b in "$origin_bin" "${bins[@]}"; do
  [[ -x "$b" ]] || { echo "missing $b" >&2; exit 1; }
done
command -v valgrind >/dev/null || { echo "valgrind missing" >&2; exit 1; }

. "$here/lib.sh"
bench_scratch instructions
start_origin "$origin_bin"

total_for() { # BINARY N -> instructions
  local bin="$1" n="$2" port pid out
  port=$(free_port)
  out="$scratch/callgrind.$n.out"
  valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$bin" ${KVGATE_ARGS:-} --listen "127.0.0.1:$port" --origin "http://127.0.0.1:$origin_port" \
    --log-level warn >"$scratch/kvgate.$n.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  wait_ready "http://127.0.0.1:$port/static/hot-1" 600
  for _ in $(seq 1 "$n"); do
    printf 'url = "http://127.0.0.1:%d/static/hot-1"\noutput = "/dev/null"\n' "$port"
  done >"$scratch/run.cfg"
  curl -s -K "$scratch/run.cfg"
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  awk '/^(summary|totals):/ {print $2; exit}' "$out"
}

echo "| build | I(500) | I(2500) | instructions per hit |"
echo "| --- | --- | --- | --- |"
for bin in "${bins[@]}"; do
  small=$(total_for "$bin" 500)
  large=$(total_for "$bin" 2500)
  printf '| %s | %d | %d | %d |\n' "$(basename "$bin")" "$small" "$large" $(((large - small) / 2000))
done
