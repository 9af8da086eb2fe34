#!/usr/bin/env bash
# Resident memory for 100,000 cached 1 KiB responses, against their payload.
#
#   benches/memory.sh [KVGATE_BINARY | varnish ...] [-n ENTRIES]
#
# Defaults: $CARGO_TARGET_DIR/release/kvgate (else target/release/kvgate),
# 100000 entries. Needs curl and ../shared/bench's origin. `varnish` is the
# anchor: varnishd with the harness's VCL and `-s malloc,256m` (the same
# budget as kvgate's default), measured on its cache (child) process.
#
# Method: the harness origin on a free loopback port, kvgate in front of it
# (no config: 256 MiB cache, 64 shards), 8 curl processes that each ask for
# their share of /static/mem-<i> once on a keep-alive connection (every
# answer is 1,024 bytes, `Cache-Control: public, max-age=3600`, an ETag).
# Reported: VmRSS of the kvgate process before and after the fill, RSS /
# payload, the growth per entry against what the store charges per entry
# (`kvgate_cache_bytes` / `kvgate_cache_entries` from the admin listener's
# /metrics: the budget holds only if the charge covers the growth), and how
# many of 1,000 URLs spread over the fill are HITs when asked again (all of
# them: nothing was evicted).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
origin_bin="$root/../shared/bench/origin/target/release/origin"
n=100000
bins=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    -h|--help) sed -n 2,17p "$0"; exit 0 ;;
    *) bins+=("$1"); shift ;;
  esac
done
if [[ ${#bins[@]} -eq 0 ]]; then
  bins=("${CARGO_TARGET_DIR:-$root/target}/release/kvgate")
fi
for b in "$origin_bin" "${bins[@]}"; do
  [[ $b == varnish ]] && { command -v varnishd >/dev/null || { echo "varnishd missing" >&2; exit 1; }; continue; }
  [[ -x "$b" ]] || { echo "missing $b" >&2; exit 1; }
done

. "$here/lib.sh"
bench_scratch memory
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

start_origin "$origin_bin"

parts=8
echo "| build | entries | RSS before fill | RSS after | after - before | RSS / payload | growth / charged per entry | HITs on a re-read of 1,000 |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for bin in "${bins[@]}"; do
  port=$(free_port)
  admin_port=$(free_port)
  if [[ $bin == varnish ]]; then
    sed -e "s/{{ORIGIN_HOST}}/127.0.0.1/" -e "s/{{ORIGIN_PORT}}/$origin_port/" \
      "$root/../shared/bench/configs/varnish.vcl.tmpl" >"$scratch/varnish.vcl"
    # varnishd's cache process runs as its own user: it must reach these.
    chmod 755 "$scratch"
    chmod 644 "$scratch/varnish.vcl"
    varnishd -F -n "$scratch/vd" -a "127.0.0.1:$port" -f "$scratch/varnish.vcl" -T none \
      -s malloc,256m >"$scratch/varnish.log" 2>&1 &
    manager=$!
    pids+=("$manager")
    wait_ready "http://127.0.0.1:$port/static/ready"
    # The objects live in the cache process, the manager's only child.
    pid=$(pgrep -P "$manager" | head -1)
  else
    KVGATE_ADMIN_TOKEN=memory-bench "$bin" --listen "127.0.0.1:$port" \
      --origin "http://127.0.0.1:$origin_port" --admin-listen "127.0.0.1:$admin_port" \
      >"$scratch/kvgate.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    wait_ready "http://127.0.0.1:$port/static/ready"
  fi
  tag="$RANDOM$RANDOM"
  for p in $(seq 0 $((parts - 1))); do
    for i in $(seq "$p" "$parts" $((n - 1))); do
      printf 'url = "http://127.0.0.1:%d/static/mem-%s-%d"\noutput = "/dev/null"\n' "$port" "$tag" "$i"
    done >"$scratch/fill-$p.cfg"
  done
  before=$(rss_kib "$pid")
  fill=()
  for p in $(seq 0 $((parts - 1))); do
    curl -s -K "$scratch/fill-$p.cfg" &
    fill+=($!)
  done
  wait "${fill[@]}"
  sleep 1
  after=$(rss_kib "$pid")
  hits=0
  for i in $(seq 0 $((n / 1000)) $((n - 1)) | head -1000); do
    if curl -s -o /dev/null -D - "http://127.0.0.1:$port/static/mem-$tag-$i" | grep -qi '^x-cache: HIT'; then
      hits=$((hits + 1))
    fi
  done
  charged="" stored=""
  if [[ $bin != varnish ]]; then
    metrics=$(curl -s -H "Authorization: Bearer memory-bench" "http://127.0.0.1:$admin_port/metrics")
    charged=$(awk '$1 == "kvgate_cache_bytes" {print $2}' <<<"$metrics")
    stored=$(awk '$1 == "kvgate_cache_entries" {print $2}' <<<"$metrics")
  fi
  payload_kib=$((n * 1024 / 1024))
  per_entry_charge="—"
  if [[ -n $stored ]]; then
    per_entry_charge=$(printf '%.0f' "$(echo "${charged:-0} / $stored" | bc -l)")
  fi
  printf '| %s | %d | %.1f MB | %.1f MB | %.1f MB | %.2fx (%.2fx above the empty process) | %.0f / %s B | %d / %d |\n' \
    "$(basename "$bin")" "$n" "$(echo "$before * 1.024 / 1000" | bc -l)" \
    "$(echo "$after * 1.024 / 1000" | bc -l)" "$(echo "($after - $before) * 1.024 / 1000" | bc -l)" \
    "$(echo "$after / $payload_kib" | bc -l)" "$(echo "($after - $before) / $payload_kib" | bc -l)" \
    "$(echo "($after - $before) * 1024 / $n" | bc -l)" "$per_entry_charge" \
    "$hits" "$(seq 0 $((n / 1000)) $((n - 1)) | head -1000 | wc -l)"
  if [[ $bin == varnish ]]; then
    kill "$manager"
    wait "$manager" 2>/dev/null || true
  else
    kill "$pid"
    wait "$pid" 2>/dev/null || true
  fi
done
