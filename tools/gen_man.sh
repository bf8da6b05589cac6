#!/bin/sh
# Man pages from the binary's own --help (so they never drift from it): denoised.1 from
# `denoised --help`, denoised-CMD.1 from `denoised CMD --help` for every command it lists.
# usage: tools/gen_man.sh BINARY OUTDIR
set -eu
bin=$1
out=$2
mkdir -p "$out"
version=$("$bin" --version)
# roff: a backslash is \e, a line starting with . or ' would be a request
escape() { sed -e 's/\\/\\e/g' -e "s/^\([.']\)/\\\\\&\1/"; }
page() { # NAME TITLE SUMMARY HELPTEXT-COMMAND...
    name=$1; title=$2; summary=$3; shift 3
    {
        printf '.TH %s 1 "" "%s" "User Commands"\n' "$title" "$version"
        printf '.SH NAME\n%s \\- %s\n' "$name" "$summary"
        printf '.SH DESCRIPTION\n.nf\n'
        "$@" | escape
        printf '.fi\n'
        [ "$name" = denoised ] || printf '.SH SEE ALSO\ndenoised(1)\n'
    } > "$out/$name.1"
}
page denoised DENOISED "diffusion-model image generation on the CPU" "$bin" --help
# the commands: the indented words under "commands:" in the usage text
"$bin" --help | sed -n '/^commands:/,/^$/p' | awk 'NF > 1 && /^  [a-z]/ {print $1}' |
while read -r cmd; do
    summary=$("$bin" --help | awk -v c="$cmd" '$1 == c {$1 = ""; sub(/^ +/, ""); print; exit}')
    upper=$(printf 'DENOISED-%s' "$cmd" | tr '[:lower:]' '[:upper:]')
    page "denoised-$cmd" "$upper" "$summary" "$bin" "$cmd" --help
done
