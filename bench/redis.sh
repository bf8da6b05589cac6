#!/bin/sh
# The daemon on Redis against the local store (issue 19): submission latency (POST /v1/jobs to
# its 202, the job's record durable before the answer: fsync of a file in state_dir, or Redis's
# append-only file with appendfsync always) and failover time (SIGKILL of the daemon running a
# job, an immediate restart, until that job runs again: the claim's lease plus start-up).
# Runs interleaved (local, redis, local, redis, ...) and prints medians and p99; nothing else
# may use the CPU meanwhile.
# Usage: bench/redis.sh [--jobs N] [--rounds R] [--lease S]   (defaults 200, 3, 2)
# Needs redis-server (scripts/install-deps.sh --redis) and a release build in build/.
set -eu
cd "$(dirname "$0")/.."
jobs=200 rounds=3 lease=2
while [ $# -gt 0 ]; do
  case "$1" in
  --jobs) jobs=$2; shift 2 ;;
  --rounds) rounds=$2; shift 2 ;;
  --lease) lease=$2; shift 2 ;;
  -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
  *) echo "bench/redis.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
bin=build/denoised
[ -x "$bin" ] || { echo "bench/redis.sh: build first (cmake --build build)" >&2; exit 2; }
command -v redis-server >/dev/null || { echo "bench/redis.sh: redis-server missing (scripts/install-deps.sh --redis)" >&2; exit 2; }
tmp=$(mktemp -d /tmp/denoised-bench-redis-XXXXXX)
sock=$tmp/redis.sock
port=18181
redis_pid=""
daemon_pid=""
cleanup() {
  [ -n "$daemon_pid" ] && kill -9 "$daemon_pid" 2>/dev/null || true
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
  sleep 0.2
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
redis-server --port 0 --unixsocket "$sock" --dir "$tmp" --save '' --appendonly yes \
  --appendfsync always --logfile "$tmp/redis.log" &
redis_pid=$!
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done

# start_daemon KIND: the daemon on the local store (a fresh state_dir) or on Redis (a fresh prefix)
n=0
start_daemon() {
  n=$((n + 1))
  if [ "$1" = redis ]; then
    where="--redis-url $sock --redis-prefix bench$n"
  else
    where="--state-dir $tmp/state$n"
  fi
  # shellcheck disable=SC2086
  $bin serve --listen 127.0.0.1:$port $where --lease-seconds "$lease" --workers 1 \
    --queue-max 100000 --max-key-cost 0 >"$tmp/daemon$n.log" 2>&1 &
  daemon_pid=$!
  for _ in $(seq 100); do curl -sf localhost:$port/healthz >/dev/null && return 0; sleep 0.05; done
  echo "bench/redis.sh: the daemon did not start; see $tmp/daemon$n.log" >&2
  exit 1
}
stop_daemon() {
  kill "$daemon_pid" && wait "$daemon_pid" 2>/dev/null || true
  daemon_pid=""
}

# submissions KIND: N sequential POSTs, their times (seconds) appended to $tmp/KIND.lat
submissions() {
  start_daemon "$1"
  i=0
  while [ $i -lt "$jobs" ]; do
    curl -s -o /dev/null -w '%{time_total}\n' \
      -d '{"class_label": "A", "seed": '$i', "scheduler": {"name": "ddim", "steps": 1}}' \
      localhost:$port/v1/jobs >>"$tmp/$1.lat"
    i=$((i + 1))
  done
  stop_daemon
}

# failover KIND: seconds from SIGKILL of the daemon running a long job until it runs again
failover() {
  start_daemon "$1"
  id=$(curl -s -d '{"class_label": "A", "seed": 1, "batch_size": 16, "scheduler": {"name": "ddpm", "steps": 1000}}' \
    localhost:$port/v1/jobs | sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p')
  until curl -s localhost:$port/v1/jobs/"$id" | grep -q '"state":"running"'; do sleep 0.02; done
  t0=$(date +%s.%N)
  kill -9 "$daemon_pid"
  wait "$daemon_pid" 2>/dev/null || true
  n=$((n - 1)) # the same store or prefix again
  start_daemon "$1"
  until curl -s localhost:$port/v1/jobs/"$id" | grep -q '"state":"running"'; do sleep 0.02; done
  t1=$(date +%s.%N)
  awk "BEGIN { printf \"%.3f\\n\", $t1 - $t0 }" >>"$tmp/$1.failover"
  kill -9 "$daemon_pid"
  wait "$daemon_pid" 2>/dev/null || true
  daemon_pid=""
  n=$((n + 1))
}

r=0
while [ $r -lt "$rounds" ]; do
  submissions local
  submissions redis
  failover local
  failover redis
  r=$((r + 1))
done

stats() { # median and p99 in ms of a file of seconds
  sort -g "$1" | awk '{v[NR] = $1} END {m = v[int((NR + 1) / 2)]; p = v[int(NR * 0.99 + 0.999)];
    printf "%.2f %.2f %d\n", m * 1000, p * 1000, NR}'
}
echo "submission latency, POST /v1/jobs to its 202 ($rounds rounds of $jobs, interleaved):"
printf '  %-6s median %s ms, p99 %s ms (n=%s)\n' local $(stats "$tmp/local.lat")
printf '  %-6s median %s ms, p99 %s ms (n=%s)\n' redis $(stats "$tmp/redis.lat")
echo "failover, SIGKILL to the job running again after an immediate restart (lease ${lease} s):"
printf '  local  %s s\n' "$(sort -g "$tmp/local.failover" | tr '\n' ' ')"
printf '  redis  %s s\n' "$(sort -g "$tmp/redis.failover" | tr '\n' ' ')"
