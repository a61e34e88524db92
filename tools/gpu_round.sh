#!/usr/bin/env bash
# Runs the GPU test binaries copied into gpu-bin (or TILEFUSE_BIN_DIR) (built with
# `cargo test --release --no-run`) and prints one line per binary last.
# Usage: bash tools/gpu_round.sh [binary ...]   (default: every binary there)
# Logs go to TILEFUSE_LOG_DIR (default /tmp), one file per binary.
set -u
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
    if [ $rc -ne 0 ]; then grep -E "panicked|FAILED|error" -A6 "$out/$b.log" | head -40; fi
done
echo "==== summary"
printf "%s" "$summary"
