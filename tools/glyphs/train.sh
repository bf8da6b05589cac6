#!/bin/sh
# Rebuilds the default model from the repo in one command: installs the training packages,
# renders the glyph set (deterministic) and trains models/glyphs32 (checkpointed: run it again
# to continue after a stop). With --classifier it also retrains bench/glyph_classifier.pt.
#   tools/glyphs/train.sh [--data DIR] [--threads N] [--classifier]
set -eu
cd "$(dirname "$0")/../.."
data=/work/glyphs-data
threads=2
classifier=0
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --classifier) classifier=1; shift ;;
    -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "train.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
scripts/install-deps.sh --training
export OPENBLAS_NUM_THREADS=1 # torch threads come from --threads; OpenBLAS would oversubscribe
[ -f "$data/train.npz" ] && [ -f "$data/heldout.npz" ] ||
  /usr/bin/python3 tools/glyphs/render.py --out "$data"
if [ "$classifier" = 1 ]; then
  /usr/bin/python3 tools/glyphs/train_classifier.py --data "$data" --threads "$threads"
fi
exec /usr/bin/python3 tools/glyphs/train_unet.py --data "$data" --threads "$threads" --resume
