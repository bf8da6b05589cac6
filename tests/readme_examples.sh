#!/bin/sh
# Runs the README's examples as written: the CLI block and the daemon's curl session, each
# command verbatim, in a scratch folder where `build/` is the build under test and `models/` the
# repository's models. What an example takes as the reader's own (a checkpoint folder, x.npy,
# a mask, labels) is put there first; the only rewrites are those placeholders, the port, and the
# single-file checkpoint's 512-pixel size (64 here: the stand-in's attention at 64x64 latents is slow).
# Every PNG an example writes must be a PNG (a `curl > E.png` that saved an error body fails).
# The set-up block (scripts/run.sh, scripts/test.sh) is what CI itself runs, so it is not rerun.
# Blocks: 2 the CLI, 3 the daemon's session, 4 the daemon's prompts (a second daemon serving the
# SD pipeline fixture as `sd`), 5 training, 6 gradients through sampling.
# Usage: tests/readme_examples.sh BUILD_DIR
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:?usage: tests/readme_examples.sh BUILD_DIR}" && pwd)
. "$src/tests/scratch.sh"
cd "$work"
ln -s "$build" build
ln -s "$src/models" models
mkdir out

# The N-th ```sh block of the README (1-based).
block() {
  awk -v want="$1" '/^```sh$/ { n++; inside = (n == want); next }
                    /^```/ { inside = 0 } inside' "$src/README.md"
}

# Each PNG below the scratch folder must start with the PNG signature.
check_pngs() {
  for f in $(find . -name '*.png' -not -path './models/*' -not -path './build/*'); do
    if [ "$(head -c 8 "$f" | od -An -tx1 | tr -d ' \n')" != "89504e470d0a1a0a" ]; then
      echo "readme_examples: $1 wrote $f, which is not a PNG:" >&2
      head -c 300 "$f" >&2
      echo >&2
      exit 1
    fi
  done
}

# --- the reader's own files: a checkpoint folder, network inputs, a mask, labelled images ---
fixture="$src/tests/fixtures/unet/cifar_small"
cp "$fixture/input.npy" x.npy
cp "$fixture/timesteps.npy" t.npy
# a Stable-Diffusion UNet's inputs (the toy SD-1.x fixture stands for the checkpoint)
sd="$src/tests/fixtures/cunet/sd1_small"
cp "$sd/input.npy" latents.npy
cp "$sd/encoder_hidden_states.npy" text.npy
# a single-file checkpoint (original key layout) with a tokenizer/ beside it: the tiny SD 1.x
# names and shapes, synthetic weights (tools/sd_single_synth.py)
mkdir single
python3 "$src/tools/sd_single_synth.py" --family 1 --tokenizer "$src/tests/fixtures/clip/sd1/tokenizer" \
  --out single/v1-5-pruned-emaonly.safetensors >/dev/null
# 32x32 grey PNG, right half white: inpaint the right half
echo 'iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAAAAABWESUoAAAAGElEQVR42mNgQAP/0QDDqIJRBaMKRqoCADDU/hBjxPbDAAAAAElFTkSuQmCC' |
  base64 -d >m.png

cli=$(block 2)
[ -n "$cli" ] || { echo "readme_examples: the README has no CLI block" >&2; exit 1; }
# boundary fit reads labelled glyphs: x.npy is then 16 generated images, half light-on-dark
build/denoised sample --class R --seed 11 --batch 16 --out glyphs.npy --quiet
i=0
while [ $i -lt 16 ]; do echo "$((i % 2)) R"; i=$((i + 1)); done >polarity.txt
cli=$(printf '%s\n' "$cli" |
  sed -e "s|~/models/ddpm-cifar10-32|$fixture|g" -e "s|--model DIR|--model $fixture|g" \
    -e "s|~/models/stable-diffusion-v1-5|$sd|g" \
    -e "s|~/models/sd-pipeline|$src/tests/fixtures/sd_pipeline/tiny|g" \
    -e "s|~/models/v1-5-pruned-emaonly.safetensors|single/v1-5-pruned-emaonly.safetensors|g" \
    -e "s|--size 512 --steps 20|--size 64 --steps 20|" \
    -e "s|boundary fit --images x.npy|boundary fit --images glyphs.npy|")
echo "readme_examples: the CLI block ($(printf '%s\n' "$cli" | grep -c 'build/denoised') commands)"
printf 'set -eux\n%s\n' "$cli" >cli.sh
sh cli.sh >cli.log 2>&1 || { tail -30 cli.log >&2; echo "readme_examples: the CLI block failed" >&2; exit 1; }
check_pngs "the CLI block"
[ -f out/A-3.png ] && [ -f again.png ] && cmp -s out/A-3.png again.png ||
  { echo "readme_examples: --replay did not give the same image" >&2; exit 1; }

# --- the training block: it makes its own data set with the default model ---
training=$(block 5)
[ -n "$training" ] || { echo "readme_examples: the README has no training block" >&2; exit 1; }
printf 'set -eux\n%s\n' "$training" >train.sh
sh train.sh >train.log 2>&1 || { tail -30 train.log >&2; echo "readme_examples: the training block failed" >&2; exit 1; }
check_pngs "the training block"
for f in out/glyphs-ft/diffusion_pytorch_model.safetensors out/glyphs-ft/README.md out/ft-A.png \
  out/glyphs-new/loss.png; do
  [ -s "$f" ] || { echo "readme_examples: the training block wrote no $f" >&2; exit 1; }
done

# --- the gradients block: denoised adjoint on the default model ---
grads=$(block 6)
[ -n "$grads" ] || { echo "readme_examples: the README has no gradients block" >&2; exit 1; }
printf 'set -eux\n%s\n' "$grads" >grads.sh
sh grads.sh >grads.log 2>&1 || { tail -30 grads.log >&2; echo "readme_examples: the gradients block failed" >&2; exit 1; }
for f in gn.npy gc.npy gp.safetensors my-glyphs/embeddings/myK.safetensors myk.png \
    my-glyphs-italic/diffusion_pytorch_model.safetensors; do
  [ -s "$f" ] || { echo "readme_examples: the gradients block wrote no $f" >&2; exit 1; }
done

# --- the daemon session: `build/denoised serve` with no flags but a free port ---
build/denoised serve --listen 127.0.0.1:0 >serve.log 2>&1 &
daemon=$!
port=$(daemon_port serve.log)
[ -n "$port" ] || { cat serve.log >&2; echo "readme_examples: the daemon did not start" >&2; exit 1; }
session=$(block 3 | sed "s|localhost:8080|localhost:$port|g")
[ -n "$session" ] || { echo "readme_examples: the README has no daemon block" >&2; exit 1; }
printf 'set -eux\n%s\n' "$session" >session.sh
sh session.sh >session.log 2>&1 || { tail -30 session.log >&2; echo "readme_examples: the daemon block failed" >&2; exit 1; }
check_pngs "the daemon block"
for f in A-0.png B.png guided.png edited.png E.png K-shots.png; do
  [ -s "$f" ] || { echo "readme_examples: the daemon block wrote no $f" >&2; exit 1; }
done
kill "$daemon" && wait "$daemon" || true
daemon=""

# --- the daemon's prompts: the serve command the README gives, the fixture for the pipeline ---
pipe="$src/tests/fixtures/sd_pipeline/tiny"
build/denoised serve --model default=models/glyphs32 --model "sd=$pipe" --listen 127.0.0.1:0 \
  --state-dir sd-state >serve-sd.log 2>&1 &
daemon=$!
port=$(daemon_port serve-sd.log)
[ -n "$port" ] || { cat serve-sd.log >&2; echo "readme_examples: the prompt daemon did not start" >&2; exit 1; }
prompts=$(block 4 | sed -e "s|localhost:8080|localhost:$port|g" -e "s|~/models/sd-pipeline|$pipe|g")
[ -n "$prompts" ] || { echo "readme_examples: the README has no prompt block" >&2; exit 1; }
printf 'set -eux\n%s\n' "$prompts" >prompts.sh
sh prompts.sh >prompts.log 2>&1 || { tail -30 prompts.log >&2; echo "readme_examples: the prompt block failed" >&2; exit 1; }
check_pngs "the prompt block"
grep -q '"text_conditional":true' prompts.log ||
  { echo "readme_examples: /v1/models does not say the pipeline takes prompts" >&2; exit 1; }
grep -q 'Negative prompt: blurry' cat-a1111.json ||
  { echo "readme_examples: the A1111 answer has no prompt lines" >&2; exit 1; }
for f in cat-daemon.png cat-again.png; do
  [ -s "$f" ] || { echo "readme_examples: the prompt block wrote no $f" >&2; exit 1; }
done
echo "readme_examples: every example ran"
