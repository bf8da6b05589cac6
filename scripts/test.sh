#!/bin/sh
# Test job: install what is missing, build twice (release, and ASan+UBSan) and
# run the whole Check suite under ctest in both builds, then every fuzz harness briefly
# (scripts/fuzz.sh 20: clang, libFuzzer, ASan+UBSan).
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh --openapi --browser --fuzz --redis
jobs="$(nproc)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
(cd build && ctest --output-on-failure -j"$jobs")
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DDENOISED_SANITIZE=ON >/dev/null
cmake --build build-asan -j"$jobs"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --output-on-failure -j"$jobs")
FUZZ_SEED=1 FUZZ_PARALLEL="$jobs" scripts/fuzz.sh 20
