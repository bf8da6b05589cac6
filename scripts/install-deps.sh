#!/bin/sh
# Installs the Debian packages denoised needs to build and test; skips what is present.
# Usage: scripts/install-deps.sh [--reference]   (--reference adds python3-torch + the modules tools/ needs to
# import a diffusers source tree for fixtures/bench)
set -eu
PKGS="build-essential cmake pkg-config libopenblas-dev libjansson-dev libpng-dev libuv1-dev libmicrohttpd-dev check"
if [ "${1:-}" = "--reference" ]; then
  PKGS="$PKGS python3-torch python3-numpy python3-packaging python3-filelock python3-regex python3-requests python3-yaml python3-importlib-metadata python3-tqdm python3-pil"
fi
missing=""
for p in $PKGS; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $p"
  fi
done
if [ -n "$missing" ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "install-deps: installing:$missing" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
