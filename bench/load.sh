#!/bin/sh
# Load test of `denoised serve` with wrk (not run in CI; scripts/install-deps.sh --bench
# installs wrk). Starts its own daemon on a free loopback port with a scratch state directory
# and reports:
#   1. GET /healthz            requests/s and latency percentiles
#   2. POST /v1/jobs           submissions/s and latency (each one fsync'ed before its 202)
#   3. batching                wall time of N queued jobs with batching off vs on
#   4. peak RSS of the daemon (VmHWM) with the configured workers
# Usage: bench/load.sh [--duration S] [--connections C] [--jobs N] [--repeat R] [--model DIR]
#   env DENOISED_BIN (default build/denoised). Every run is bounded: wrk -d S, N jobs.
set -eu
cd "$(dirname "$0")/.."
BIN="${DENOISED_BIN:-build/denoised}"
DURATION=10
CONNS=32
NJOBS=64
REPEAT=3
MODEL=models/shapes-gmm
while [ $# -gt 0 ]; do
  case "$1" in
  --duration) DURATION="$2"; shift 2 ;;
  --connections) CONNS="$2"; shift 2 ;;
  --jobs) NJOBS="$2"; shift 2 ;;
  --model) MODEL="$2"; shift 2 ;;
  --repeat) REPEAT="$2"; shift 2 ;;
  *) echo "usage: bench/load.sh [--duration S] [--connections C] [--jobs N] [--repeat R] [--model DIR]" >&2; exit 2 ;;
  esac
done
command -v wrk >/dev/null || { echo "load.sh: wrk not installed (scripts/install-deps.sh --bench)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "load.sh: $BIN not built" >&2; exit 1; }
TMP="$(mktemp -d /tmp/denoised-load-XXXXXX)"
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT INT TERM

# a class-conditional model needs a class
if grep -q '"num_class_embeds": *[1-9]' "$MODEL/config.json" 2>/dev/null; then
  LABEL='"class_label": 0, '
else
  LABEL=''
fi

start() { # $1 name, then serve flags
  name="$1"; shift
  "$BIN" serve --listen 127.0.0.1:0 --state-dir "$TMP/$name" --model "default=$MODEL" \
    "$@" 2>"$TMP/$name.log" &
  PID=$!
  PORT=""
  for _ in $(seq 200); do # the log's "listening" line has the port it got
    PORT=$(sed -n 's/.*msg=listening url=http:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$TMP/$name.log")
    [ -n "$PORT" ] && break
    sleep 0.05
  done
  [ -n "$PORT" ] || { echo "load.sh: daemon did not start" >&2; cat "$TMP/$name.log" >&2; exit 1; }
  URL="http://127.0.0.1:$PORT"
}

stop() {
  kill -TERM "$PID"; wait "$PID" || true; PID=""
}

rss() { awk '/VmHWM/ {print $2 " kB"}' "/proc/$PID/status"; }

echo "== machine: $(nproc) CPUs, $(uname -r); model $MODEL"

start health --workers 2 --max-connections 1024 --max-connections-per-ip 1024
echo "== GET /healthz: wrk -t2 -c$CONNS -d${DURATION}s"
wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "$URL/healthz" | sed -n '/Latency Distribution/,/Transfer/p;/Non-2xx/p'

cat >"$TMP/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{${LABEL}"seed": 1, "scheduler": {"name": "ddim", "steps": 1}}'
LUA
stop
start submit --workers 2 --queue-max 1000000 --max-jobs-per-key 1000000 --max-connections 1024 \
  --max-connections-per-ip 1024 --progress-interval-ms 1000
echo "== POST /v1/jobs (1-step jobs, each fsync'ed before its 202): wrk -t2 -c$CONNS -d${DURATION}s"
wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -s "$TMP/post.lua" "$URL/v1/jobs" | sed -n '/Latency Distribution/,/Transfer/p;/Non-2xx/p'
echo "   peak RSS: $(rss)"
stop

batch_run() { # $1 batch_max_images -> "B seconds batched_jobs" for NJOBS 50-step jobs
  start "batch$1" --workers 1 --batch-max-images "$1" --queue-max 100000
  # a long job holds the worker while the others are submitted, so that submission time is
  # not measured; cancelling it releases them all at once
  blocker=$(curl -fsS -X POST "$URL/v1/jobs" \
    -d "{${LABEL}\"seed\": 0, \"batch_size\": 16, \"scheduler\": {\"name\": \"ddpm\", \"steps\": 1000}}" |
    sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p')
  seq 0 $((NJOBS - 1)) | xargs -P 8 -I{} curl -fsS -o /dev/null -X POST "$URL/v1/jobs" \
    -d "{${LABEL}\"seed\": {}, \"scheduler\": {\"name\": \"ddim\", \"steps\": 50}}"
  curl -fsS -o /dev/null -X DELETE "$URL/v1/jobs/$blocker" ||
    echo "   (the blocking job ended before all submissions: the timing includes some of them)" >&2
  t0=$(date +%s.%N)
  while :; do
    done_n=$(curl -fsS "$URL/metrics" | awk '/^denoised_jobs_total\{state="succeeded"\}/ {print $2}')
    [ "$done_n" -ge "$NJOBS" ] && break
    sleep 0.02
  done
  t1=$(date +%s.%N)
  batched=$(curl -fsS "$URL/metrics" | awk '/^denoised_batched_jobs_total/ {print $2}')
  echo "$1 $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}') $batched"
  stop
}
echo "== batching: $NJOBS queued jobs of 50 DDIM steps, 1 worker, time from release to all done"
echo "   (off and on alternate $REPEAT times; medians, since the machine may be shared)"
offs=""; ons=""; nb=0
r=0
while [ $r -lt "$REPEAT" ]; do
  set -- $(batch_run 1); offs="$offs $2"
  set -- $(batch_run 16); ons="$ons $2"; nb=$3
  r=$((r + 1))
done
median() { echo "$@" | tr ' ' '\n' | grep . | sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
off=$(median $offs); on=$(median $ons)
echo "   batch_max_images=1:  ${off}s  (runs:$offs)"
echo "   batch_max_images=16: ${on}s  (runs:$ons; $nb jobs shared a forward)"
echo "   throughput gain: $(awk -v a="$off" -v b="$on" 'BEGIN {printf "%.2f", a / b}')x"

start rss --workers 2
echo "== peak RSS, 2 workers, 32 jobs of batch 4"
i=0
while [ $i -lt 32 ]; do
  curl -fsS -o /dev/null -X POST "$URL/v1/jobs" \
    -d "{${LABEL}\"seed\": $i, \"batch_size\": 4, \"scheduler\": {\"name\": \"ddim\", \"steps\": 50}}"
  i=$((i + 1))
done
while :; do
  done_n=$(curl -fsS "$URL/metrics" | awk '/^denoised_jobs_total\{state="succeeded"\}/ {print $2}')
  [ "$done_n" -ge 32 ] && break
  sleep 0.1
done
echo "   peak RSS: $(rss)"
stop
