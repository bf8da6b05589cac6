#!/bin/sh
# The daemon on Redis against the local store (issue 19): submission latency (POST /v1/jobs to
# its 202, the job's record durable before the answer: fsync of a file in state_dir, or Redis's
# append-only file with appendfsync always) and failover time (SIGKILL of the daemon running a
# job, an immediate restart, until that job runs again: the claim's lease plus start-up).
# Throughput: jobs per second of small jobs (DDIM 10 steps, one image) with 1, 2 and 3 daemons
# on one Redis prefix (each 1 worker x 1 thread), against one daemon on the local store; and
# failover to a live node: SIGKILL of the daemon running a job until another daemon already
# running runs it (the lease plus a tick).
# Runs interleaved (local, redis, local, redis, ...) and prints medians and p99; nothing else
# may use the CPU meanwhile.
# Usage: bench/redis.sh [--jobs N] [--rounds R] [--lease S] [--small M]
#        (defaults 200, 3, 2, 60; M small jobs per throughput run)
# Needs redis-server (scripts/install-deps.sh --redis) and a release build in build/.
set -eu
cd "$(dirname "$0")/.."
jobs=200 rounds=3 lease=2 small=60
while [ $# -gt 0 ]; do
  case "$1" in
  --jobs) jobs=$2; shift 2 ;;
  --rounds) rounds=$2; shift 2 ;;
  --lease) lease=$2; shift 2 ;;
  --small) small=$2; shift 2 ;;
  -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
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
  # its worker busy: the job's record may say running before it runs (on Redis, where the
  # restarted daemon reads the dead one's record)
  until curl -s localhost:$port/metrics | grep -q '^denoised_workers_busy 1'; do sleep 0.02; done
  t1=$(date +%s.%N)
  awk "BEGIN { printf \"%.3f\\n\", $t1 - $t0 }" >>"$tmp/$1.failover"
  kill -9 "$daemon_pid"
  wait "$daemon_pid" 2>/dev/null || true
  daemon_pid=""
  n=$((n + 1))
}

# group_start KIND K: K daemons (ports port+1..port+K; KIND redis: one fresh prefix for all,
# local: K=1 on a fresh state_dir), each 1 worker x 1 thread; their pids in $group
group_start() {
  n=$((n + 1))
  group=""
  k=1
  while [ $k -le "$2" ]; do
    if [ "$1" = redis ]; then where="--redis-url $sock --redis-prefix group$n"; else where="--state-dir $tmp/gstate$n"; fi
    # shellcheck disable=SC2086
    $bin serve --listen 127.0.0.1:$((port + k)) $where --lease-seconds "$lease" --workers 1 \
      --threads-per-job 1 --queue-max 100000 --max-key-cost 0 >"$tmp/group$n-$k.log" 2>&1 &
    group="$group $!"
    for _ in $(seq 100); do curl -sf localhost:$((port + k))/healthz >/dev/null && break; sleep 0.05; done
    k=$((k + 1))
  done
}
group_stop() {
  for p in $group; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  group=""
}
# succeeded K: jobs succeeded on the K daemons together
succeeded() {
  k=1 sum=0
  while [ $k -le "$1" ]; do
    c=$(curl -s localhost:$((port + k))/metrics | sed -n 's/^denoised_jobs_total{state="succeeded"} //p')
    sum=$((sum + ${c:-0}))
    k=$((k + 1))
  done
  echo $sum
}

# throughput KIND K: jobs/s of $small small jobs submitted round-robin, first POST to last success
throughput() {
  group_start "$1" "$2"
  t0=$(date +%s.%N)
  i=0
  while [ $i -lt "$small" ]; do
    curl -s -o /dev/null -d '{"class_label": "A", "seed": '$i', "scheduler": {"name": "ddim", "steps": 10}}' \
      localhost:$((port + 1 + i % $2))/v1/jobs
    i=$((i + 1))
  done
  until [ "$(succeeded "$2")" -ge "$small" ]; do sleep 0.02; done
  t1=$(date +%s.%N)
  awk "BEGIN { printf \"%.2f\\n\", $small / ($t1 - $t0) }" >>"$tmp/tput-$1-$2"
  group_stop
}

# failover_live: two daemons on Redis; the one running a long job is killed; seconds until the
# other one runs it (its busy worker)
failover_live() {
  group_start redis 1
  id=$(curl -s -d '{"class_label": "A", "seed": 1, "batch_size": 16, "scheduler": {"name": "ddpm", "steps": 1000}}' \
    localhost:$((port + 1))/v1/jobs | sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p')
  until curl -s localhost:$((port + 1))/v1/jobs/"$id" | grep -q '"state":"running"'; do sleep 0.02; done
  first=$group # a second daemon on the same prefix, port+2
  $bin serve --listen 127.0.0.1:$((port + 2)) --redis-url "$sock" --redis-prefix group$n \
    --lease-seconds "$lease" --workers 1 --threads-per-job 1 >"$tmp/live.log" 2>&1 &
  second=$!
  for _ in $(seq 100); do curl -sf localhost:$((port + 2))/healthz >/dev/null && break; sleep 0.05; done
  t0=$(date +%s.%N)
  kill -9 $first
  until curl -s localhost:$((port + 2))/metrics | grep -q '^denoised_workers_busy 1'; do sleep 0.02; done
  t1=$(date +%s.%N)
  awk "BEGIN { printf \"%.3f\\n\", $t1 - $t0 }" >>"$tmp/live.failover"
  kill -9 "$second" 2>/dev/null || true
  wait "$second" 2>/dev/null || true
  group=$first
  group_stop
}

r=0
while [ $r -lt "$rounds" ]; do
  submissions local
  submissions redis
  failover local
  failover redis
  failover_live
  throughput local 1
  throughput redis 1
  throughput redis 2
  throughput redis 3
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
echo "failover to a live node (two daemons on Redis, the runner SIGKILLed, lease ${lease} s):"
printf '  redis  %s s\n' "$(sort -g "$tmp/live.failover" | tr '\n' ' ')"
med() { sort -g "$1" | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
base=$(med "$tmp/tput-local-1")
echo "throughput, $small small jobs (DDIM 10 steps), jobs/s median of $rounds (ratio to local):"
printf '  local, 1 daemon   %s\n' "$base"
for k in 1 2 3; do
  v=$(med "$tmp/tput-redis-$k")
  printf '  redis, %d daemons  %s (%s)\n' "$k" "$v" "$(awk "BEGIN { printf \"%.2f\", $v / $base }")"
done
