#!/bin/sh
# Installs the Debian packages denoised needs to build and test; skips what is present.
# Usage: scripts/install-deps.sh [--reference] [--openapi] [--browser] [--bench] [--fuzz] [--redis] [--training] [--peers]
#   --reference  python3-torch + the modules tools/ needs to import a diffusers source tree
#                for fixtures/bench
#   --openapi    node + npm (Debian's, if no npm is on PATH) and the OpenAPI validator that
#                tests/test_openapi.c runs (tools/openapi, pinned by its package-lock.json)
#   --browser    Debian's chromium, node + npm, and puppeteer-core + axe-core (tools/browser, pinned
#                by its package-lock.json) for the web UI's browser test (test_browser)
#   --fuzz       clang with libFuzzer and its sanitizer runtimes (libclang-rt-14-dev) and
#                llvm-symbolizer, for scripts/fuzz.sh
#   --bench      wrk, for bench/load.sh
#   --redis      redis-server, which the tests start on a scratch socket to check the Redis backend
#   --peers      --reference plus node + npm and ONNX Runtime (onnxruntime-node, CPU build, pinned by
#                tools/onnxruntime/package-lock.json) for bench/peers
#   --training   --reference plus the Debian font packages tools/glyphs/fonts.txt renders the glyph
#                data set from (retraining models/glyphs32 and bench/glyph_classifier.pt)
set -eu
cd "$(dirname "$0")/.."
PKGS="build-essential cmake pkg-config libopenblas-dev libjansson-dev libpng-dev libuv1-dev libmicrohttpd-dev check libcurl4-openssl-dev universal-ctags libhiredis-dev"
openapi=0
browser=0
peers=0
for arg in "$@"; do
  case "$arg" in
  --reference)
    PKGS="$PKGS python3-torch python3-numpy python3-packaging python3-filelock python3-regex python3-requests python3-yaml python3-importlib-metadata python3-tqdm python3-pil" ;;
  --openapi)
    openapi=1
    if ! command -v npm >/dev/null 2>&1; then PKGS="$PKGS nodejs npm"; fi ;;
  --browser)
    browser=1
    PKGS="$PKGS chromium"
    if ! command -v npm >/dev/null 2>&1; then PKGS="$PKGS nodejs npm"; fi ;;
  --bench) PKGS="$PKGS wrk" ;;
  --peers)
    peers=1
    PKGS="$PKGS python3-torch python3-numpy"
    if ! command -v npm >/dev/null 2>&1; then PKGS="$PKGS nodejs npm"; fi ;;
  --redis) PKGS="$PKGS redis-server" ;;
  --fuzz) PKGS="$PKGS clang libclang-rt-14-dev llvm" ;;
  --training)
    PKGS="$PKGS python3-torch python3-numpy python3-pil"
    PKGS="$PKGS fonts-adf-accanthis fonts-anonymous-pro fonts-cantarell fonts-cmu fonts-courier-prime"
    PKGS="$PKGS fonts-croscore fonts-crosextra-caladea fonts-crosextra-carlito fonts-dejavu-core"
    PKGS="$PKGS fonts-dejavu-extra fonts-ebgaramond fonts-firacode fonts-freefont-ttf fonts-gfs-didot"
    PKGS="$PKGS fonts-go fonts-hack fonts-inconsolata fonts-inter fonts-jetbrains-mono fonts-lato"
    PKGS="$PKGS fonts-liberation2 fonts-linuxlibertine fonts-lmodern fonts-noto-core fonts-noto-mono"
    PKGS="$PKGS fonts-open-sans fonts-oxygen fonts-roboto-unhinted fonts-sil-andika fonts-sil-charis"
    PKGS="$PKGS fonts-sil-gentium fonts-stix fonts-texgyre fonts-urw-base35" ;;
  *) echo "install-deps: unknown option $arg" >&2; exit 2 ;;
  esac
done
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
if [ "$openapi" = 1 ] && [ ! -d tools/openapi/node_modules/@apidevtools/swagger-parser ]; then
  echo "install-deps: installing the OpenAPI validator (npm ci in tools/openapi)" >&2
  (cd tools/openapi && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
if [ "$browser" = 1 ] && [ ! -d tools/browser/node_modules/puppeteer-core ]; then
  echo "install-deps: installing the browser test's modules (npm ci in tools/browser)" >&2
  (cd tools/browser && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
if [ "$peers" = 1 ] && [ ! -d tools/onnxruntime/node_modules/onnxruntime-node ]; then
  # --ignore-scripts: the package's postinstall only fetches GPU providers we do not use
  echo "install-deps: installing ONNX Runtime for bench/peers (npm ci in tools/onnxruntime)" >&2
  (cd tools/onnxruntime && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
fi
