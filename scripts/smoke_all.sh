#!/usr/bin/env bash
# Run every script in scripts/ once with --smoke (tiny sizes, seconds each), one after another, and say
# which failed. Not part of CI: the benchmarks stay out of it, but each must still run.
#
#   scripts/smoke_all.sh                          # all of them
#   scripts/smoke_all.sh bench_index bench_train  # only these (names with or without .py)
#
# Environment: PYTHON (default python), SMOKE_TIMEOUT (seconds per script, default 300),
# SMOKE_LOGS (folder for each script's output, default a new temp folder, kept).
# Exit status: 0 when every script passed, 1 otherwise.
set -u

cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python}
LIMIT=${SMOKE_TIMEOUT:-300}
LOGS=${SMOKE_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/atlas-smoke.XXXXXX")}
mkdir -p "$LOGS"

if [ $# -gt 0 ]; then
    scripts=()
    for name in "$@"; do scripts+=("scripts/${name%.py}.py"); done
else
    scripts=(scripts/*.py)
fi

passed=() failed=()
for script in "${scripts[@]}"; do
    name=$(basename "$script" .py)
    log="$LOGS/$name.log"
    printf '%-22s ' "$name"
    start=$(date +%s.%N)
    timeout "$LIMIT" "$PYTHON" "$script" --smoke >"$log" 2>&1
    rc=$?
    wall=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" -eq 0 ]; then
        passed+=("$name")
        echo "ok      ${wall} s"
    else
        why="exit $rc"
        [ "$rc" -eq 124 ] && why="timed out after ${LIMIT} s"
        failed+=("$name")
        echo "FAILED  ${wall} s ($why; last lines of $log:)"
        tail -n 5 "$log" | sed 's/^/    /'
    fi
done

echo
echo "passed (${#passed[@]}): ${passed[*]:-none}"
echo "failed (${#failed[@]}): ${failed[*]:-none}"
echo "logs: $LOGS"
[ ${#failed[@]} -eq 0 ]
