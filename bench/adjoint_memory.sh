#!/bin/sh
# Peak memory (max RSS, GNU time) of a 50-step discrete adjoint on the default model against one
# network evaluation and against the 50-step sampling run it differentiates (issue 17: the
# adjoint keeps one image per step and one evaluation's tape, so it should stay within 1.5x of
# a single forward whatever the step count). Usage: bench/adjoint_memory.sh [BUILD_DIR] [STEPS]
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$src/build}" && pwd)
steps=${2:-50}
bin=$build/denoised
model=$src/models/glyphs32
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
/usr/bin/python3 - <<'EOF'
import numpy as np
r = np.random.default_rng(0)
np.save("xt.npy", r.standard_normal((1, 3, 32, 32)).astype(np.float32))
np.save("g.npy", r.standard_normal((1, 3, 32, 32)).astype(np.float32))
np.save("t.npy", np.array([500.0], np.float32))
np.save("l.npy", np.array([10], np.int64))
EOF
rss() { # label, command...: prints the label and max RSS in KB, returns it in $kb
  label=$1
  shift
  /usr/bin/time -f '%M' -o rss.txt "$@" >/dev/null 2>&1
  kb=$(cat rss.txt)
  printf '%-58s %8d KB\n' "$label" "$kb"
}
rss "forward (one evaluation, class A)" \
  "$bin" forward --model "$model" --input xt.npy --timesteps t.npy --class-labels l.npy \
  --out o.npy --threads 2
fwd=$kb
rss "sample ($steps steps dpm++2m, guidance 2)" \
  "$bin" sample --model "$model" --class A --scheduler dpm++2m --steps "$steps" \
  --guidance-scale 2 --seed 1 -o s.png --quiet --threads 2
for sched in dpm++2m ddim; do
  rss "adjoint ($steps steps $sched, guidance 2, noise+class+weights)" \
    "$bin" adjoint --model "$model" --noise xt.npy --scheduler $sched --steps "$steps" \
    --class A --guidance-scale 2 --grad-output g.npy --grad-noise gn.npy \
    --grad-class-embedding gc.npy --grad-params gp.safetensors --threads 2 --quiet
  echo "  ratio to the forward: $(echo "scale=2; $kb / $fwd" | bc)x"
done
rss "adjoint ($steps steps dpm++2m, guidance 2, noise only)" \
  "$bin" adjoint --model "$model" --noise xt.npy --scheduler dpm++2m --steps "$steps" \
  --class A --guidance-scale 2 --grad-output g.npy --grad-noise gn.npy --threads 2 --quiet
echo "  ratio to the forward: $(echo "scale=2; $kb / $fwd" | bc)x"
