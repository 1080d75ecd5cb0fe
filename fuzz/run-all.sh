#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60), JOBS at a time (default 1; this is a
# 2-core machine, so use at most 2). Seeds come from corpus/<target>/ (read only); what the
# fuzzer finds goes to work/<target>/, logs to logs/<target>.log, crashes to
# artifacts/<target>/. Exits non-zero if any target crashed.
#
#   fuzz/run-all.sh 600            # ten minutes each, one after the other
#   JOBS=2 fuzz/run-all.sh 600     # two at a time
#   fuzz/run-all.sh 20 v1_decoder  # only the targets named
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-60}
shift || true
jobs=${JOBS:-1}
# cargo-fuzz passes -Z flags (sanitizer, coverage passes); this lets stable rustc take them.
export RUSTC_BOOTSTRAP=1

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# Optimised, with debug assertions, overflow checks and AddressSanitizer (cargo-fuzz defaults).
cargo fuzz build
mkdir -p logs

run_one() {
    local target=$1
    mkdir -p "work/$target" "corpus/$target"
    # -malloc_limit_mb: no single allocation may exceed 64 MiB (the largest frame the proxy
    # accepts is 4 MB); the RSS limit stays at libFuzzer's default of 2 GiB.
    if cargo fuzz run "$target" "work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -malloc_limit_mb=64 -print_final_stats=1 \
        >"logs/$target.log" 2>&1; then
        echo "ok     $target: $(summary "$target")"
    else
        echo "FAILED $target: see fuzz/logs/$target.log and fuzz/artifacts/$target/"
        return 1
    fi
}

# The last libFuzzer status line (cov, ft, corp, exec/s) and the execution count.
summary() {
    local log="logs/$1.log"
    local status runs
    status=$(grep -E '^#[0-9]+' "$log" | tail -n 1 | sed -E 's/^#([0-9]+)[[:space:]]+[A-Z]+[[:space:]]+/runs \1 /')
    runs=$(grep -E '^Done [0-9]+ runs' "$log" | tail -n 1)
    echo "$status ($runs)"
}

failed=0
running=0
for target in "${targets[@]}"; do
    if [ "$running" -ge "$jobs" ]; then
        wait -n || failed=1
        running=$((running - 1))
    fi
    run_one "$target" &
    running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
    wait -n || failed=1
    running=$((running - 1))
done
exit "$failed"
