#!/bin/sh
# Main job: install what is missing, build, write sample images with the model that ships in
# the repo (out/sample-*.png), then run the daemon with that model as `default` in the
# foreground on 127.0.0.1:8080 (Ctrl-C or SIGTERM stops it). DENOISED_LISTEN=HOST:PORT moves
# it; README.md "Daemon" shows a curl session against it.
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
mkdir -p out
# the letter A in DPM-Solver++ 20 steps with classifier-free guidance 2 (the default model)
./build/denoised sample --class A --scheduler dpm++2m --steps 20 --guidance-scale 2 --seed 1 \
  --batch 4 -o out/sample.png
ls -l out/sample-*.png
listen="${DENOISED_LISTEN:-127.0.0.1:8080}"
echo "run.sh: starting the daemon on http://$listen with models/glyphs32 as 'default';" \
  "jobs persist in ./denoised-state (Ctrl-C stops it)"
# no flags: the built-in defaults (DENOISED_LISTEN, if set, is read by the daemon itself)
exec ./build/denoised serve
