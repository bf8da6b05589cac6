#!/bin/sh
# Issue 17 item 5's measurements of AdjointDPM's tasks on the default model:
#   - concept from a metric: a class row learned from the mean row so that the classifier reads
#     the target character, measured on 200 held-out noises against the true class row on the
#     same noises, with the optimisation's wall time;
#   - security audit: adversarial initial noise at two box sizes against random corners of the
#     same boxes.
# Everything runs on a scratch copy of the model (the embedding is written there, not beside the
# repository's model). CPU: about 5 min (concept) + 1.5 min (audit) of 2 threads on an idle Zen 5.
# Usage: bench/adjoint_tasks.sh [BUILD_DIR] [--target K] [--steps 120] [--lr 0.15] [--eval 200]
#        [--audit-class A] [--audit-batch 8] [--audit-iters 5] [--skip-audit] [--skip-concept]
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
build=$src/build
case ${1:-} in -*|'') ;; *) build=$1; shift ;; esac
build=$(cd "$build" && pwd)
target=K steps=120 lr=0.15 eval=200 aclass=A abatch=8 aiters=5 concept=1 audit=1
while [ $# -gt 0 ]; do
  case $1 in
    --target) target=$2; shift ;;
    --steps) steps=$2; shift ;;
    --lr) lr=$2; shift ;;
    --eval) eval=$2; shift ;;
    --audit-class) aclass=$2; shift ;;
    --audit-batch) abatch=$2; shift ;;
    --audit-iters) aiters=$2; shift ;;
    --skip-audit) audit=0 ;;
    --skip-concept) concept=0 ;;
    *) echo "adjoint_tasks: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
bin=$build/denoised
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -rL "$src/models/glyphs32" "$work/model"
rm -rf "$work/model/embeddings"
echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$concept" = 1 ]; then
  echo "== concept: --target $target from the mean row, $steps steps of 8, lr $lr," \
    "dpm++2m 10 steps, guidance 2; $eval held-out noises (seed 1000003)"
  /usr/bin/time -f 'concept wall %e s, cpu %U+%S s' "$bin" concept --model "$work/model" \
    --target "$target" --name bench --steps "$steps" --lr "$lr" --eval "$eval" \
    --compare "$target" --quiet 2>&1
fi
if [ "$audit" = 1 ]; then
  echo "== audit: --class $aclass, $abatch images, $aiters iterations, eps 0.05 and 0.1," \
    "4 random corners per image"
  /usr/bin/time -f 'audit wall %e s, cpu %U+%S s' "$bin" audit --model "$work/model" \
    --class "$aclass" --batch "$abatch" --iters "$aiters" --eps 0.05,0.1 --random 4 --quiet 2>&1
fi
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
