#!/usr/bin/env bash
# System calls per miss when every miss opens a new origin connection to a
# host name: the origin (python3 -m http.server, HTTP/1.0) closes each
# connection, and kvgate's origin is http://localhost:PORT. Shows what name
# resolution costs per new connection (before the resolver cache: getaddrinfo
# on the blocking pool, reading /etc/hosts, waking a thread).
#
#   benches/origin_connections.sh KVGATE_BINARY [MISSES]
#
# Needs strace, curl and python3. kvgate runs pinned to CPU 0; one curl
# process sends MISSES requests for distinct URLs; `strace -c -f` counts
# every call of every kvgate thread during them. Everything listens on
# 127.0.0.1 and is stopped by process id at the end.
set -euo pipefail
bin="$1"
n="${2:-300}"
[[ -x "$bin" ]] || { echo "missing $bin" >&2; exit 1; }
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
bench_scratch origin-conn
oport="$(free_port)"
gport="$(free_port)"
mkdir -p "$scratch/www"
echo hello > "$scratch/www/f"
(cd "$scratch/www" && exec python3 -m http.server "$oport" --bind 127.0.0.1 >/dev/null 2>&1) &
pids+=($!)
taskset -c 0 "$bin" --listen "127.0.0.1:$gport" --origin "http://localhost:$oport" \
  --log-level warn >/dev/null 2>&1 &
gpid=$!
pids+=("$gpid")
for i in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$gport/f?up=$i" && break; sleep 0.1; done
for i in $(seq 20); do curl -s -o /dev/null "http://127.0.0.1:$gport/f?warm=$i"; done
urls="$scratch/urls"
for i in $(seq "$n"); do
  printf 'url = "http://127.0.0.1:%s/f?u=%s"\noutput = /dev/null\n' "$gport" "$i"
done > "$urls"
strace -c -f -p "$gpid" -o "$scratch/strace" 2>/dev/null &
spid=$!
sleep 0.5
curl -s -K "$urls"
sleep 0.3
kill -INT "$spid"
wait "$spid" 2>/dev/null || true
total="$(awk '/ total$/ {print $4}' "$scratch/strace")"
echo "$bin: $n misses, $total system calls, $(awk -v t="$total" -v n="$n" 'BEGIN {printf "%.1f", t / n}') per miss"
cat "$scratch/strace"
