#!/usr/bin/env bash
# Runs the GPU test binaries copied into gpu-bin (or TILEFUSE_BIN_DIR) (built with
# `cargo test --release --no-run`) and prints one line per binary last.
# Usage: bash tools/gpu_round.sh [binary ...]   (default: every binary there)
# Logs go to TILEFUSE_LOG_DIR (default /tmp), one file per binary. Exits
# non-zero when any binary fails (a missing GPU fails every GPU test).
set -u
# TILEFUSE_REQUIRE_GPU=1: a GPU test that finds no GPU fails instead of skipping.
export TILEFUSE_REQUIRE_GPU=1
failed=0
dir=${TILEFUSE_BIN_DIR:-gpu-bin}
export TILEFUSE_CACHE_DIR=${TILEFUSE_CACHE_DIR:-/tmp/tilefuse-cache}
out=${TILEFUSE_LOG_DIR:-/tmp}
bins=("$@")
[ ${#bins[@]} -eq 0 ] && bins=($(ls "$dir"))
summary=""
for b in "${bins[@]}"; do
    start=$(date +%s.%N)
    "$dir/$b" --test-threads=1 --nocapture >"$out/$b.log" 2>&1
    rc=$?
    secs=$(python3 -c "import time; print(time.time() - $start)")
    result=$(grep -E "^test result" "$out/$b.log" | tail -1)
    summary+=$(printf "%-22s rc=%-3s %6.1fs  %s" "$b" "$rc" "$secs" "$result")$'\n'
    if [ $rc -ne 0 ]; then failed=$((failed + 1)); grep -E "panicked|FAILED|error" -A6 "$out/$b.log" | head -40; fi
done
echo "==== summary"
printf "%s" "$summary"
if [ "$failed" -ne 0 ]; then echo "FAILED: $failed check(s) failed"; exit 1; fi
echo "all checks passed"
