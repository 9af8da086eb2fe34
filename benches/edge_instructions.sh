#!/usr/bin/env bash
# Instructions per cache hit with the edge layer, by kind of visitor, which do
# not depend on the machine (callgrind; same method as instructions.sh):
#   plain     - kvgate without [edge];
#   new       - benches/edge-on.toml, no cookie: every request is a new visitor
#               (an id minted and signed, a Set-Cookie sent);
#   returning - benches/edge-on.toml, every request sends the signed
#               kvgate_uid cookie the first response set (a cookie check,
#               and the user's state read from the memory state store).
#
#   benches/edge_instructions.sh [KVGATE_BINARY]
#
# Per row: I(2500) - I(500), over 2000: start-up, warm-up and shutdown
# cancel out. Needs valgrind, curl and ../shared/bench's origin.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
origin_bin="$root/../shared/bench/origin/target/release/origin"
bin="${1:-${CARGO_TARGET_DIR:-$root/target}/release/kvgate}"
for b in "$origin_bin" "$bin"; do
  [[ -x "$b" ]] || { echo "missing $b" >&2; exit 1; }
done
command -v valgrind >/dev/null || { echo "valgrind missing" >&2; exit 1; }

. "$here/lib.sh"
bench_scratch edge-instructions
start_origin "$origin_bin"

total_for() { # KIND N -> instructions
  local kind="$1" n="$2" port pid out url args=() cookie=""
  [[ $kind != plain ]] && args=(--config "$here/edge-on.toml")
  port=$(free_port)
  url="http://127.0.0.1:$port/static/hot-1"
  out="$scratch/callgrind.$kind.$n.out"
  valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$bin" "${args[@]}" --listen "127.0.0.1:$port" --origin "http://127.0.0.1:$origin_port" \
    --log-level warn >"$scratch/kvgate.$kind.$n.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  wait_ready "$url" 600
  if [[ $kind == returning ]]; then
    cookie=$(curl -s -o /dev/null -D - "$url" | tr -d '\r' |
      sed -n 's/^[Ss]et-[Cc]ookie: \(kvgate_uid=[^;]*\).*/\1/p')
    [[ -n $cookie ]] || { echo "no kvgate_uid cookie from $url" >&2; exit 1; }
    # The first return stores the sticky assignments; later ones only read.
    curl -sf -o /dev/null -H "Cookie: $cookie" "$url"
  fi
  for _ in $(seq 1 "$n"); do
    printf 'url = "%s"\noutput = "/dev/null"\n' "$url"
  done >"$scratch/run.cfg"
  # A header in the config file would accumulate: give it once, for every URL.
  if [[ -n $cookie ]]; then
    curl -s -H "Cookie: $cookie" -K "$scratch/run.cfg"
  else
    curl -s -K "$scratch/run.cfg"
  fi
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  [[ -n ${KEEP_CALLGRIND:-} ]] && cp "$out" "$KEEP_CALLGRIND.$kind.$n"
  awk '/^(summary|totals):/ {print $2; exit}' "$out"
}

echo "| visitor | I(500) | I(2500) | instructions per hit |"
echo "| --- | --- | --- | --- |"
for kind in ${KINDS:-plain new returning}; do
  small=$(total_for "$kind" 500)
  large=$(total_for "$kind" 2500)
  printf '| %s | %d | %d | %d |\n' "$kind" "$small" "$large" $(((large - small) / 2000))
done
