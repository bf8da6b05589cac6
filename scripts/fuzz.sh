#!/bin/sh
# Builds the libFuzzer harnesses of tests/fuzz (clang, ASan+UBSan, in build-fuzz/) and runs each
# for SECONDS (default 60), one after the other (or FUZZ_PARALLEL at once), then prints a table
# of executions and coverage (cov: edges, ft: features, from libFuzzer's last status line).
# Usage: scripts/fuzz.sh [SECONDS]
#   FUZZ_ONLY="job png"  run only these harnesses (names without fuzz_)
#   FUZZ_FINDINGS=DIR    where crash, leak and timeout inputs are kept (BUILD/findings)
#   FUZZ_BUILD=DIR       the build directory (build-fuzz)
#   FUZZ_NOBUILD=1       run the harnesses already built there
#   FUZZ_SEED=N          libFuzzer's -seed (default: random), for runs that repeat (CI)
#   FUZZ_PARALLEL=N      harnesses run at once, each a single process (default 1)
# Each harness starts from its committed seeds (tests/fuzz/corpus/NAME, never modified) plus what
# earlier runs in BUILD/corpus/NAME found, with the inputs of past findings
# (tests/fuzz/regressions/NAME), with tests/fuzz/dict/NAME.dict when there is one.
# Exits non-zero if any harness crashed, leaked, hung or failed one of its checks; the input is
# in the findings directory and the harness's log beside it.
set -eu
cd "$(dirname "$0")/.."
secs="${1:-60}"
case "$secs" in '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS]" >&2; exit 2 ;; esac
build="${FUZZ_BUILD:-build-fuzz}"
findings="${FUZZ_FINDINGS:-$build/findings}"
parallel="${FUZZ_PARALLEL:-1}"
case "$parallel" in '' | *[!0-9]* | 0) echo "fuzz: FUZZ_PARALLEL must be a count" >&2; exit 2 ;; esac
if [ -z "${FUZZ_NOBUILD:-}" ]; then
  CC=clang cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Debug -DDENOISED_FUZZ=ON \
    -DDENOISED_TESTS=OFF >/dev/null
  cmake --build "$build" -j"$(nproc)" --target fuzz >/dev/null
fi
names="${FUZZ_ONLY:-$(ls tests/fuzz/corpus)}"
mkdir -p "$findings" "$build/logs"
# harnesses of path-reading parsers rewrite a scratch file per input: in memory when possible
tmp=$(mktemp -d /dev/shm/denoised-fuzz.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$tmp"' EXIT
seed=""
[ -n "${FUZZ_SEED:-}" ] && seed="-seed=$FUZZ_SEED"
rows="$tmp/rows"
mkdir -p "$rows"

# One harness for $secs seconds; its table row goes to $rows/NAME.
run_one() {
  name=$1
  bin="$build/fuzz_$name"
  mkdir -p "$build/corpus/$name" "$findings/$name"
  dict=""
  [ -f "tests/fuzz/dict/$name.dict" ] && dict="-dict=tests/fuzz/dict/$name.dict"
  regressions=""
  [ -d "tests/fuzz/regressions/$name" ] && regressions="tests/fuzz/regressions/$name"
  log="$build/logs/$name.log"
  start=$(date +%s)
  rc=0
  # shellcheck disable=SC2086
  TMPDIR="$tmp" ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$bin" -max_total_time="$secs" -timeout=25 -rss_limit_mb=4096 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="$findings/$name/" $dict $seed \
    "$build/corpus/$name" "tests/fuzz/corpus/$name" $regressions >"$log" 2>&1 || rc=$?
  took=$(($(date +%s) - start))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  status=$(grep -E '^#[0-9]+.*cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1)
  cov=$(echo "$status" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
  ft=$(echo "$status" | sed -n 's/.*ft: \([0-9]*\).*/\1/p')
  result=ok
  if [ "$rc" != 0 ]; then
    # shellcheck disable=SC2012
    result="FAILED (exit $rc): $(ls -t "$findings/$name" | head -n 1), log $log"
    cp "$log" "$findings/$name/"
  fi
  printf '%-18s %7s %12s %7s %7s  %s\n' "$name" "$took" "${execs:-?}" "${cov:-?}" "${ft:-?}" \
    "$result" >"$rows/$name"
}

for name in $names; do
  [ -x "$build/fuzz_$name" ] || { echo "fuzz: no harness fuzz_$name" >&2; exit 2; }
done
running=0
for name in $names; do
  run_one "$name" &
  running=$((running + 1))
  if [ "$running" -ge "$parallel" ]; then
    wait
    running=0
  fi
done
wait
table="$build/fuzz-table.txt"
printf '%-18s %7s %12s %7s %7s  %s\n' harness seconds executions cov ft result >"$table"
passed=0
failed=0
for name in $names; do
  cat "$rows/$name" >>"$table"
  if grep -q ' ok$' "$rows/$name"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done
cat "$table"
echo "fuzz: $passed passed, $failed failed"
[ "$failed" = 0 ]
