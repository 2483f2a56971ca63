#!/usr/bin/env bash
# Before and after a change: `pagedserve bench throughput` on two or more commits, alternated
# round by round, each commit's code from its own worktree, with this checkout's environment.
# Prints each run's line and, per commit, the mean of the numbers it printed.
#
# Usage: benchmarks/ab_commits.sh ROUNDS COMMIT COMMIT... -- BENCH_ARGS...
#   e.g. benchmarks/ab_commits.sh 3 HEAD~1 HEAD -- --input-len 128 --output-len 128 --num-prompts 64
#
# Each run starts in the worktree's parent folder, never in a checkout: `python -m` puts the
# working directory first on sys.path, so a run started in this checkout imports this
# checkout's pagedserve whatever PYTHONPATH says. Each run checks where pagedserve came from.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
rounds=$1
shift
commits=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
  commits+=("$1")
  shift
done
[ $# -gt 0 ] && shift
[ ${#commits[@]} -ge 2 ] || { echo "usage: $0 ROUNDS COMMIT COMMIT... -- BENCH_ARGS..." >&2; exit 2; }

work=$(mktemp -d)
trees=()
cleanup() {
  for tree in "${trees[@]}"; do git -C "$ROOT" worktree remove --force "$tree" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
for i in "${!commits[@]}"; do
  tree=$work/$i
  git -C "$ROOT" worktree add --detach -q "$tree" "${commits[$i]}"
  trees+=("$tree")
done

cd "$work"
for ((r = 1; r <= rounds; r++)); do
  for i in "${!commits[@]}"; do
    tree=${trees[$i]}
    PYTHONPATH=$tree "$PY" -c "import pagedserve, sys; sys.exit(not pagedserve.__file__.startswith('$tree/'))" \
      || { echo "pagedserve did not come from $tree" >&2; exit 1; }
    line=$(PYTHONPATH=$tree "$PY" -m pagedserve bench throughput --disable-tqdm "$@" 2>&1 | grep '^Throughput')
    echo "${commits[$i]} ($(git -C "$tree" rev-parse --short HEAD)) round $r: $line"
    echo "${line#Throughput: }" >>"$work/runs.$i"
  done
done

echo "means over $rounds rounds:"
for i in "${!commits[@]}"; do
  awk -v c="${commits[$i]}" -F'[ ,]+' '
    { r += $1; t += $3; o += $6; n++ }
    END { printf "  %s: %.2f requests/s, %.1f total tokens/s, %.1f output tokens/s\n", c, r / n, t / n, o / n }' \
    "$work/runs.$i"
done
