#!/bin/sh
# `cmake --install` into a scratch prefix, then the installed binary used from a directory that
# is neither the source nor the build tree: it finds the default model beside itself
# (PREFIX/share/denoised/models/glyphs32), samples with it, replays the image, serves it over
# HTTP, and its man pages and bash completion are installed and work.
# Usage: tests/install_test.sh BUILD_DIR
set -eu
build=$(cd "${1:?usage: tests/install_test.sh BUILD_DIR}" && pwd)
. "$(cd "$(dirname "$0")" && pwd)/scratch.sh"
fail() { echo "install_test: $*" >&2; exit 1; }
prefix=$work/prefix
cmake --install "$build" --prefix "$prefix" >/dev/null
bin=$prefix/bin/denoised
mkdir "$work/elsewhere"
cd "$work/elsewhere"

# the default model is the installed copy, found relative to the binary
"$bin" config defaults | grep -q "\"$prefix/share/denoised/models/glyphs32\"" ||
  fail "the installed binary does not serve the installed default model: $("$bin" config defaults | grep -A2 models)"

# sample with the model's recommended settings; the PNG names the model, not a path
"$bin" sample --seed 3 -o a.png --quiet
[ "$(head -c 8 a.png | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ] || fail "a.png is not a PNG"
grep -a -q '"model":"glyphs32"' a.png || fail "a.png does not record the model by name"
grep -a -q "$prefix" a.png && fail "a.png records a path of the install"
"$bin" sample --replay a.png -o b.png --quiet
cmp -s a.png b.png || fail "the replay differs"

# serve the default model
"$bin" serve --listen 127.0.0.1:0 --state-dir state >serve.log 2>&1 &
daemon=$!
port=$(daemon_port serve.log)
[ -n "$port" ] || fail "serve did not start: $(cat serve.log)"
url=http://127.0.0.1:$port
curl -sf -d '{"class_label": "K", "seed": 4}' "$url/v1/generate" -o g.png || fail "generate failed"
[ "$(head -c 8 g.png | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ] || fail "g.png is not a PNG"
for _ in $(seq 1 100); do # logged once its final state is on disk, just after the answer
  grep -q 'msg="job succeeded' serve.log && break
  sleep 0.1
done
grep -q 'msg="job succeeded' serve.log || fail "no log line for the finished job: $(cat serve.log)"

# man pages from --help and the completion
for page in denoised denoised-sample denoised-serve denoised-config; do
  [ -s "$prefix/share/man/man1/$page.1" ] || fail "no man page $page.1"
done
grep -q -e '--guidance-scale' "$prefix/share/man/man1/denoised-sample.1" || fail "denoised-sample.1 lacks the options"
if command -v man >/dev/null 2>&1; then
  man -l "$prefix/share/man/man1/denoised-sample.1" 2>/dev/null | grep -q 'DENOISED-SAMPLE' ||
    fail "denoised-sample.1 does not render"
fi
completion=$prefix/share/bash-completion/completions/denoised
[ -s "$completion" ] || fail "no bash completion"
words=$(bash -c ". '$completion'; COMP_WORDS=('$bin' sample --guid); COMP_CWORD=2; _denoised; echo \"\${COMPREPLY[*]}\"")
[ "$words" = "--guidance-scale" ] || fail "completion of 'sample --guid' gave '$words'"
echo "install_test: ok ($prefix)"
