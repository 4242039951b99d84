#!/usr/bin/env bash
# `make mutation`: mutation testing of the EPAS core with mutmut (docs/TESTING.md, "Mutation testing").
#   bash tools/mutation/run.sh [PATTERN...]   patterns of mutant names; default: those of tools/mutation/scope.txt
# mutmut rewrites source files, so everything happens in a fresh copy of the working tree (or of the commit
# $MUTATION_FROM) outside the repository ($MUTATION_DIR): nothing it or a test under a mutant does can reach the
# tracked files. The copy is kept for `mutmut show NAME` / `mutmut browse` there; the report goes to
# runs/mutation/report.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
venv=$root/${VENV:-.venv}
work=${MUTATION_DIR:-${TMPDIR:-/tmp}/epas-mutation-$(printf %s "$root" | md5sum | cut -c1-8)}
jobs=${MUTATION_JOBS:-$(nproc)}

if [ $# -gt 0 ]; then patterns=("$@"); else mapfile -t patterns < <(grep -v -e '^#' -e '^$' tools/mutation/scope.txt); fi

rm -rf "$work" && mkdir -p "$work"
if [ -n "${MUTATION_FROM:-}" ]; then
    git archive "$MUTATION_FROM" | tar -xf - -C "$work"
else  # tracked and untracked files as they are now, with their times (mutmut compares them)
    git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$work"
fi
echo "mutmut $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("mutmut"))'): ${#patterns[@]} patterns, $jobs processes, in $work"

start=$(date +%s)
# one thread per test process: the processes already use every core
(cd "$work" && OMP_NUM_THREADS=1 "$venv/bin/mutmut" run --max-children "$jobs" "${patterns[@]}")
"$venv/bin/python" tools/mutation/report.py "$work" runs/mutation/report.md --seconds $(( $(date +%s) - start )) \
    "${patterns[@]}"
