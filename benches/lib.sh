# Shared by the bench scripts: a scratch directory and the processes to stop
# on exit, free loopback ports, readiness polling, the harness origin.
# Source it after `set -euo pipefail`:  . "$here/lib.sh"; bench_scratch NAME

# A scratch directory in $scratch; every pid added to $pids is killed, and
# the directory removed, when the script exits.
bench_scratch() { # NAME
  scratch="$(mktemp -d "/tmp/kvgate-$1.XXXXXX")"
  pids=()
  trap bench_cleanup EXIT
}
bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$scratch"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Polls URL every 0.1 s until it answers 2xx, at most TRIES times (100).
wait_ready() { # URL [TRIES]
  for _ in $(seq 1 "${2:-100}"); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "not ready: $1" >&2
  return 1
}

# Starts ../shared/bench's origin (binary $1) on a free port, sets
# $origin_port and returns once it answers.
start_origin() { # ORIGIN_BINARY
  origin_port=$(free_port)
  "$1" --port "$origin_port" >"$scratch/origin.log" 2>&1 &
  pids+=($!)
  wait_ready "http://127.0.0.1:$origin_port/health"
}
