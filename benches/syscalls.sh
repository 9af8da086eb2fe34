#!/usr/bin/env bash
# Per-request costs that do not depend on the machine: system calls and
# context switches per request, for kvgate, `limit` (the harness's bare
# hyper server) and nginx, on a fixed number of hits and misses.
#
#   benches/syscalls.sh [KVGATE_BINARY ...] [-n REQUESTS]
#
# Defaults: $CARGO_TARGET_DIR/release/kvgate (else target/release/kvgate),
# 5000 requests. Several binaries may be given (before / after builds).
# Needs strace, nginx, curl and ../shared/bench's origin
# (`cargo build --release` in ../shared/bench/origin).
#
# Method: every server runs pinned to CPU 0 with one worker (kvgate and
# `limit` are tokio servers sized from their CPU set, nginx gets
# `worker_processes 1`). One curl process sends the requests one after the
# other on one keep-alive connection (a URL list in a curl config file), so
# every target sees the same sequence. Hits: 16 URLs of 1 KiB, warmed
# first. Misses: a unique URL per request (the origin answers). System calls
# are counted by `strace -c -f` attached to every process and thread of the
# target after warm-up (the origin's own calls are not counted); context
# switches are the voluntary + involuntary switches of all the target's
# threads (/proc/PID/task/*/status) over a second, unstraced run. The
# counts include what a target does by the clock rather than per request
# (kvgate's store sweeper: ~70 calls/s when idle), spread over the run;
# more requests (-n) make that share smaller.
# Everything listens on 127.0.0.1 and is stopped by process id at the end.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
bench="$(cd "$root/../shared/bench" && pwd)"
origin_bin="$bench/origin/target/release/origin"

n=5000
bins=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    -h|--help) sed -n 2,23p "$0"; exit 0 ;;
    *) bins+=("$1"); shift ;;
  esac
done
if [[ ${#bins[@]} -eq 0 ]]; then
  bins=("${CARGO_TARGET_DIR:-$root/target}/release/kvgate")
fi
for b in "$origin_bin" "${bins[@]}"; do
  [[ -x "$b" ]] || { echo "missing $b" >&2; exit 1; }
done
command -v strace >/dev/null || { echo "strace missing" >&2; exit 1; }

. "$here/lib.sh"
bench_scratch syscalls

# Every thread of a process tree: the pid, its threads, its children's.
tree_pids() { # PID
  local p="$1"
  echo "$p"
  for c in $(pgrep -P "$p" || true); do tree_pids "$c"; done
}

ctx_switches() { # PID...
  local total=0 f v
  for p in "$@"; do
    for f in /proc/"$p"/task/*/status; do
      v=$(awk '/ctxt_switches/ {s += $2} END {print s + 0}' "$f" 2>/dev/null || echo 0)
      total=$((total + v))
    done
  done
  echo "$total"
}

# A curl config asking for N URLs built by a function of the index.
curl_config() { # FILE BASE KIND TAG
  local file="$1" base="$2" kind="$3" tag="$4"
  : >"$file"
  for i in $(seq 0 $((n - 1))); do
    if [[ "$kind" == hit ]]; then
      printf 'url = "%s/static/hot-%d"\noutput = "/dev/null"\n' "$base" $((i % 16))
    else
      printf 'url = "%s/static/miss-%s-%d"\noutput = "/dev/null"\n' "$base" "$tag" "$i"
    fi
  done >>"$file"
}

origin_port=$(free_port)
taskset -c 0 "$origin_bin" --port "$origin_port" >"$scratch/origin.log" 2>&1 &
pids+=($!)
origin_pid=$!
wait_ready "http://127.0.0.1:$origin_port/health"

start_target() { # NAME -> sets target_pid, target_base
  local name="$1" port
  port=$(free_port)
  target_base="http://127.0.0.1:$port"
  case "$name" in
    limit)
      taskset -c 0 "$origin_bin" --mode limit --port "$port" >"$scratch/limit.log" 2>&1 &
      ;;
    nginx)
      mkdir -p "$scratch/nginx/cache"
      # nginx's workers run as an unprivileged user.
      chmod 755 "$scratch"
      chmod -R 777 "$scratch/nginx"
      sed -e "s|{{PORT}}|$port|g" -e "s|{{ORIGIN}}|127.0.0.1:$origin_port|g" \
        -e "s|{{WORKERS}}|1|g" -e "s|{{RUN_DIR}}|$scratch/nginx|g" \
        -e "s|{{CACHE_DIR}}|$scratch/nginx/cache|g" \
        "$bench/configs/nginx.conf.tmpl" >"$scratch/nginx/nginx.conf"
      taskset -c 0 nginx -p "$scratch/nginx" -c "$scratch/nginx/nginx.conf" \
        -e "$scratch/nginx/error.log" >"$scratch/nginx.log" 2>&1 &
      ;;
    *)
      taskset -c 0 "$name" --listen "127.0.0.1:$port" \
        --origin "http://127.0.0.1:$origin_port" --log-level warn >"$scratch/kvgate.log" 2>&1 &
      ;;
  esac
  target_pid=$!
  pids+=("$target_pid")
  wait_ready "$target_base/static/ready"
}

stop_target() {
  kill "$target_pid" 2>/dev/null || true
  wait "$target_pid" 2>/dev/null || true
}

run_one() { # NAME LABEL KIND -> prints a table row
  local name="$1" label="$2" kind="$3" cfg tree calls before after tag
  start_target "$name"
  tag="$RANDOM$RANDOM"
  # Warm-up: the hot set twice (hits) or a few misses (connections to the origin).
  cfg="$scratch/warm.cfg"
  n_saved=$n; n=32
  curl_config "$cfg" "$target_base" "$kind" "warm$tag"
  n=$n_saved
  curl -s -K "$cfg"
  # Syscalls, straced.
  cfg="$scratch/run.cfg"
  curl_config "$cfg" "$target_base" "$kind" "s$tag"
  mapfile -t tree < <(tree_pids "$target_pid")
  local attach=()
  for p in "${tree[@]}"; do attach+=(-p "$p"); done
  strace -f -c -o "$scratch/strace.out" "${attach[@]}" 2>/dev/null &
  local strace_pid=$!
  sleep 0.5
  curl -s -K "$cfg"
  sleep 0.2
  kill -INT "$strace_pid"
  wait "$strace_pid" 2>/dev/null || true
  # Rows: % time, seconds, usecs/call, calls, [errors], syscall.
  calls=$(awk 'NR > 2 && $1 ~ /^[0-9]/ && $NF != "total" {s += $4} END {print s + 0}' \
    "$scratch/strace.out")
  # Context switches, unstraced (strace itself switches).
  curl_config "$cfg" "$target_base" "$kind" "c$tag"
  mapfile -t tree < <(tree_pids "$target_pid")
  before=$(ctx_switches "${tree[@]}")
  curl -s -K "$cfg"
  after=$(ctx_switches "${tree[@]}")
  stop_target
  local top
  top=$(awk 'NR > 2 && $1 ~ /^[0-9]/ && $NF != "total" {printf "%s %s, ", $NF, $4}' \
    "$scratch/strace.out" | head -c 200)
  printf '| %s | %s | %.2f | %.2f | %s |\n' "$label" "$kind" \
    "$(echo "$calls / $n" | bc -l)" "$(echo "($after - $before) / $n" | bc -l)" "${top%, }"
}

echo "requests per row: $n (one keep-alive connection, sequential)"
echo
echo "| target | scenario | syscalls / req | context switches / req | calls (count) |"
echo "| --- | --- | --- | --- | --- |"
for kind in hit miss; do
  if [[ "$kind" == hit ]]; then run_one limit limit hit; fi
  run_one nginx nginx "$kind"
  for b in "${bins[@]}"; do
    run_one "$b" "kvgate ($(basename "$b"))" "$kind"
  done
done
