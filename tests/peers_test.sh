#!/bin/sh
# bench/peers end to end on the default model, kept to seconds: our engine alone (one round, one
# forward per case, no waiting for a quiet machine) must produce a JSON record with a positive
# time, load time and RSS per case and the noise fields; when ONNX Runtime is installed
# (scripts/install-deps.sh --peers) its export must agree with our output. Bad options are
# refused with exit status 2.
# Usage: tests/peers_test.sh BUILD_DIR
set -eu
build=$(cd "${1:?usage: tests/peers_test.sh BUILD_DIR}" && pwd)
src=$(cd "$(dirname "$0")/.." && pwd)
. "$src/tests/scratch.sh"
fail() { echo "peers_test: $*" >&2; exit 1; }
peers="$src/bench/peers --denoised $build/denoised --cache $work/cache --model glyphs32 --quick"
fast="--rounds 1 --reps 1 --retries 0 --quiet-wait 0"

# shellcheck disable=SC2086
$peers $fast --engines ours --json - >"$work/ours.json" 2>"$work/ours.log" ||
  fail "bench/peers --engines ours failed: $(tail -n 5 "$work/ours.log")"
/usr/bin/python3 - "$work/ours.json" <<'PY' || fail "bad JSON record"
import json, sys
r = json.load(open(sys.argv[1]))
rows = r["results"]
assert [(x["size"], x["batch"]) for x in rows] == [(32, 1), (32, 8)], rows
for x in rows:
    o = x["engines"]["ours"]
    assert o["ms"] > 0 and o["load_ms"] > 0 and o["peak_rss_mb"] > 1, o
    assert o["gflops"] > 0 and isinstance(o["noisy"], bool) and o["foreign_cores"] >= 0, o
PY

# shellcheck disable=SC2086
if $peers --engines ours,bogus >/dev/null 2>"$work/bad.log"; then fail "--engines bogus accepted"; else
  [ $? -eq 2 ] && grep -q "unknown bogus" "$work/bad.log" || fail "--engines bogus: $(cat "$work/bad.log")"
fi
# shellcheck disable=SC2086
if $peers --rounds 0 >/dev/null 2>"$work/bad.log"; then fail "--rounds 0 accepted"; fi

if [ -d "$src/tools/onnxruntime/node_modules/onnxruntime-node" ]; then
  # shellcheck disable=SC2086
  $peers $fast --engines ours,ort --json "$work/ort.json" >/dev/null 2>"$work/ort.log" ||
    fail "bench/peers --engines ours,ort failed: $(tail -n 5 "$work/ort.log")"
  /usr/bin/python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))["cross_check"]["glyphs32"]["ort"]
assert c < 1e-5, "ONNX Runtime vs ours: relative L2 %g" % c
' "$work/ort.json" || fail "the ONNX export disagrees with our engine"
else
  echo "peers_test: ONNX Runtime not installed (scripts/install-deps.sh --peers): its cross-check not run"
fi
