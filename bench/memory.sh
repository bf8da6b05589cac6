#!/bin/sh
# Memory and restart time of `denoised serve` holding many finished jobs with large inputs
# (issue 22.1; not run in CI). Starts its own daemon on a loopback port with a scratch state
# directory, submits N img2img jobs whose input_image is a 32x32 PNG padded to SIZE bytes with
# an ancillary chunk (what a client can send within the limits), waits for them, and reports:
#   1. VmRSS of the idle daemon, and after the N jobs finished
#   2. the RSS four concurrent GET /v1/jobs?limit=100 add (VmHWM before and after)
#   3. the time from a restart to the first 200 of /healthz (RESTARTS restarts, each time and
#      the median), and VmRSS then; and the same for a daemon over an empty state directory
# Usage: bench/memory.sh [--jobs N] [--size BYTES] [--model DIR] [--restarts K]
#   env DENOISED_BIN (default build/denoised). Needs curl and python3.
set -eu
cd "$(dirname "$0")/.."
BIN="${DENOISED_BIN:-build/denoised}"
NJOBS=200
SIZE=3900000
MODEL=models/glyphs32
RESTARTS=5
while [ $# -gt 0 ]; do
  case "$1" in
  --jobs) NJOBS="$2"; shift 2 ;;
  --size) SIZE="$2"; shift 2 ;;
  --model) MODEL="$2"; shift 2 ;;
  --restarts) RESTARTS="$2"; shift 2 ;;
  *) echo "usage: bench/memory.sh [--jobs N] [--size BYTES] [--model DIR] [--restarts K]" >&2
     exit 2 ;;
  esac
done
[ -x "$BIN" ] || { echo "memory.sh: $BIN not built" >&2; exit 1; }
TMP="$(mktemp -d /tmp/denoised-memory-XXXXXX)"
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT INT TERM

# the body: a black 32x32 PNG with SIZE bytes in all (random bytes in a private chunk), base64
python3 - "$SIZE" "$TMP/body.json" <<'PY'
import base64, json, os, struct, sys, zlib
size, out = int(sys.argv[1]), sys.argv[2]
def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0))
tail = chunk(b"IDAT", zlib.compress(b"\0" * (32 * 97))) + chunk(b"IEND", b"")
pad = max(0, size - len(head) - len(tail) - 12)
png = head + chunk(b"juNk", os.urandom(pad)) + tail
json.dump({"class_label": 3, "seed": 1, "scheduler": {"name": "ddim", "steps": 4},
           "input_image": base64.b64encode(png).decode(),
           "edit": {"type": "img2img", "strength": 0.5}}, open(out, "w"))
PY
BODY=$(wc -c <"$TMP/body.json")
# bodies and records large enough for the inputs; results kept for the default day
printf '{"max_body_bytes": %d}\n' $((BODY + 65536)) >"$TMP/config.json"

STATE="$TMP/state"
start() {
  : >"$TMP/log" # a fresh log: the port is the one this start logs
  "$BIN" serve --config "$TMP/config.json" --listen 127.0.0.1:0 --state-dir "$STATE" \
    --model "default=$MODEL" 2>>"$TMP/log" &
  PID=$!
  T0=$(date +%s.%N)
  PORT=""
  for _ in $(seq 6000); do # the log's "listening" line has the port it got
    PORT=$(sed -n 's/.*msg=listening url=http:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$TMP/log" | tail -1)
    [ -n "$PORT" ] && curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
    PORT=""
    sleep 0.01
  done
  [ -n "$PORT" ] || { echo "memory.sh: daemon did not start" >&2; cat "$TMP/log" >&2; exit 1; }
  T1=$(date +%s.%N)
  URL="http://127.0.0.1:$PORT"
}
kb() { sed -n "s/^$1:[^0-9]*\([0-9]*\) kB/\1/p" "/proc/$PID/status"; }
mb() { echo "$1" | awk '{printf "%.1f", $1 / 1024}'; }

start
sleep 0.5
IDLE=$(kb VmRSS)
echo "body: $BODY bytes (PNG of $SIZE bytes in base64), $NJOBS jobs, daemon $BIN"
echo "idle daemon:               VmRSS $(mb "$IDLE") MB"
i=0
while [ $i -lt "$NJOBS" ]; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
    --data-binary "@$TMP/body.json" "$URL/v1/jobs")
  [ "$code" = 202 ] || { echo "memory.sh: submission $i got $code" >&2; exit 1; }
  i=$((i + 1))
  [ $((i % (NJOBS / 4 > 0 ? NJOBS / 4 : 1))) = 0 ] && echo "  $i submitted:           VmRSS $(mb "$(kb VmRSS)") MB"
done
# every job finished (none queued or running)
for _ in $(seq 6000); do
  busy=$(curl -s "$URL/v1/jobs?limit=100&state=queued" | grep -c '"id"' || true)
  run=$(curl -s "$URL/v1/jobs?limit=100&state=running" | grep -c '"id"' || true)
  [ "$busy" = 0 ] && [ "$run" = 0 ] && break
  sleep 0.2
done
sleep 0.5
AFTER=$(kb VmRSS)
echo "after $NJOBS finished jobs: VmRSS $(mb "$AFTER") MB (+$(mb $((AFTER - IDLE))) MB)"
HWM0=$(kb VmHWM)
R0=$(kb VmRSS)
LIST=""
for k in 1 2 3 4; do
  curl -s -o /dev/null "$URL/v1/jobs?limit=100" &
  LIST="$LIST $!"
done
wait $LIST
for _ in 1 2 3 4; do curl -s -o /dev/null "$URL/healthz"; done
HWM1=$(kb VmHWM)
R1=$(kb VmRSS)
echo "4 concurrent listings:     VmHWM +$(mb $((HWM1 - HWM0))) MB, VmRSS after +$(mb $((R1 - R0))) MB"
stop() { kill -TERM "$PID"; wait "$PID" || true; PID=""; }
# RESTARTS starts over STATE, each timed to the first 200 of /healthz: the times and the median
restarts() {
  TIMES=""
  for _ in $(seq "$RESTARTS"); do
    stop
    start
    TIMES="$TIMES $(echo "$T1 $T0" | awk '{printf "%.2f", $1 - $2}')"
  done
  MEDIAN=$(echo "$TIMES" | tr ' ' '\n' | sed '/^$/d' | sort -n | awk '{a[NR] = $1}
    END {printf "%.2f", NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}')
}
restarts
echo "restart to /healthz 200:   median $MEDIAN s of$TIMES; VmRSS $(mb "$(kb VmRSS)") MB"
STATE="$TMP/empty" # the same over no jobs: what start-up costs anyway
restarts
echo "  (empty state directory:  median $MEDIAN s of$TIMES)"
