#!/bin/sh
# Regenerates every committed UNet fixture under tests/fixtures/unet/ (deterministic).
# Needs: scripts/install-deps.sh --reference, and a diffusers v0.21 source tree at
# $DIFFUSERS_SRC (default /tmp/diffusers-0.21/src).  Afterwards it cross-checks our own
# PyTorch UNet (tools/torch_unet.py) against diffusers on the new fixtures.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-/usr/bin/python3}
"$PY" tools/gen_unet_fixtures.py --all-presets tests/fixtures/unet
"$PY" tools/check_torch_unet.py tests/fixtures/unet/*/
