#!/bin/sh
# Lists C functions longer than a limit (issue 12's "no function over ~100 lines" rule), longest
# first, so the rule can be checked rather than remembered. Uses Universal Ctags' end: field.
# usage: scripts/long-functions.sh [-n LINES] [PATH ...]   (default: 100 lines; cli api server queue)
# Exit status 1 when any function is over the limit, so CI or a pre-commit hook can use it.
set -eu
limit=100
if [ "${1:-}" = "-n" ]; then
    limit=$2
    shift 2
fi
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- cli api server queue
command -v ctags >/dev/null || { echo "long-functions.sh: needs universal-ctags" >&2; exit 2; }
files=$(find "$@" -name '*.c' | sort)
[ -n "$files" ] || exit 0
# shellcheck disable=SC2086
out=$(ctags --fields=+ne --c-kinds=f -o - $files |
    awk -F'\t' -v limit="$limit" '
        {
            start = 0; end = 0
            for (i = 4; i <= NF; i++) {
                if ($i ~ /^line:/) start = substr($i, 6) + 0
                if ($i ~ /^end:/) end = substr($i, 5) + 0
            }
            n = end - start + 1
            if (start > 0 && end > 0 && n > limit) printf "%5d %s:%d %s\n", n, $2, start, $1
        }' | sort -rn)
[ -z "$out" ] || { echo "$out"; exit 1; }
