#!/usr/bin/env bash
# Everything that needs a GPU, in one command, in under 8 minutes:
#   1. the CUDA tests (`pytest -m cuda`: marked `cuda`, or CUDA in the name or skip reason);
#   2. the README's check of the example, on CUDA:
#      torchrepro check --vary num_workers=0,2 --resume-at 37 -- python examples/train_digits.py
#   3. benchmarks/gpu_determinism.py (step-time cost of determinism, bitwise equality, audit).
# Each part has a time cap (tests 120 s, example 150 s, gpu_determinism what is left of 470 s),
# so the whole ends within 8 minutes; its output goes to a log, and one summary line per part is
# printed (PASS, FAIL, TIMEOUT or SKIP), then the log tail of any part that failed.
#
#   bash benchmarks/gpu_check.sh          # on a GPU machine
#   bash benchmarks/gpu_check.sh --cpu    # CI: hide the GPUs; parts 2 and 3 skip, part 1's
#                                         # CUDA tests skip (those that also run on CPU run)
#
# Exit status 0 when no part failed. Environment: PYTHON (default: python), GPU_CHECK_LOGS
# (where logs go; default: a new temporary directory).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d -t torchrepro-gpu-check-XXXXXX)}
mkdir -p "$LOGS"

case "${1:-}" in
    --cpu) export CUDA_VISIBLE_DEVICES="" ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--cpu]" >&2; exit 2 ;;
esac

device=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>/dev/null) || {
    echo "gpu_check: cannot import torch with $PYTHON" >&2
    exit 2
}
echo "gpu_check: device: $device; logs: $LOGS"

start_all=$SECONDS
TOTAL_S=470  # 8 minutes, less time to start Python and print
left() { echo $((TOTAL_S - (SECONDS - start_all))); }
failed=0
summaries=()
failed_logs=()

# run_part NAME CAP_SECONDS LOG COMMAND...: run with a time cap; sets $status and $took.
run_part() {
    local log=$3 cap=$2
    shift 3
    local t0=$SECONDS
    timeout --kill-after=10 "$cap" "$@" >"$log" 2>&1
    status=$?
    took=$((SECONDS - t0))
}

# summarise NAME RESULT DETAIL [LOG]
summarise() {
    local line
    line=$(printf 'gpu_check: %-18s %-7s %s' "$1" "$2" "$3")
    summaries+=("$line")
    echo "$line"
    if [ "$2" = FAIL ] || [ "$2" = TIMEOUT ]; then
        failed=$((failed + 1))
        failed_logs+=("${4:-}")
    fi
}

verdict() {  # the status of a capped command as a word
    if [ "$status" -eq 0 ]; then echo PASS; elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then echo TIMEOUT; else echo FAIL; fi
}

# 1. CUDA tests (collected from the test files that mention CUDA, to keep collection short).
mapfile -t files < <(grep -lis cuda tests/test_*.py | grep -v test_gpu_check.py)  # not itself
log="$LOGS/cuda_tests.log"
if [ "${#files[@]}" -eq 0 ]; then
    summarise "cuda tests" FAIL "no test file mentions CUDA"
else
    run_part "cuda tests" 120 "$log" "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda "${files[@]}"
    counts=$(grep -E '(passed|failed|skipped|error|deselected)' "$log" | tail -n 1 | sed -E 's/=+//g; s/^ +| +$//g')
    result=$(verdict)
    [ "$status" -eq 5 ] && counts="no CUDA test collected"
    summarise "cuda tests" "$result" "${counts:-see $log} (${took} s)" "$log"
fi

# 2. The example's check, on CUDA.
log="$LOGS/example_check.log"
if [ "$device" = cpu ]; then
    summarise "example check" SKIP "needs CUDA (on CPU the test suite checks the example)"
else
    run_part "example check" 150 "$log" "$PYTHON" -m torchrepro check --vary num_workers=0,2 \
        --resume-at 37 -- "$PYTHON" examples/train_digits.py
    line=$(grep -m1 -E '^(REPRODUCIBLE|DIVERGED|ERROR)' "$log")
    summarise "example check" "$(verdict)" "${line:-see $log} (${took} s)" "$log"
fi

# 3. gpu_determinism.py
log="$LOGS/gpu_determinism.log"
if [ "$device" = cpu ]; then
    summarise "gpu_determinism" SKIP "needs CUDA (its CPU smoke mode runs in tests/test_benchmarks.py)"
elif [ "$(left)" -lt 30 ]; then  # (`timeout 0` would mean no limit at all)
    summarise "gpu_determinism" TIMEOUT "not started: $(left) s left of ${TOTAL_S} s"
else
    run_part "gpu_determinism" "$(left)" "$log" "$PYTHON" benchmarks/gpu_determinism.py
    models=$(grep -cE '^\| two ' "$log")
    equal=$(grep -cE '^\| two .*\| yes \| yes \|$' "$log")
    summarise "gpu_determinism" "$(verdict)" "strict runs bitwise equal for $equal/$models models; table in $log (${took} s)" "$log"
fi

for log in "${failed_logs[@]}"; do
    if [ -n "$log" ] && [ -f "$log" ]; then
        echo "--- last lines of $log:"
        tail -n 30 "$log"
    fi
done
echo "gpu_check: ${#summaries[@]} parts, $failed failed, $((SECONDS - start_all)) s"
[ "$failed" -eq 0 ]
