#!/bin/sh
# Main job: install what is missing, build, and generate sample images with the
# model that ships in the repo (the analytic shapes model until the trained
# default model and the daemon land). Output: out/sample-*.png
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
mkdir -p out
./build/denoised sample --model models/shapes-gmm --class 2 --seed 1 --batch 4 --steps 50 \
  -o out/sample.png
ls -l out/sample-*.png
