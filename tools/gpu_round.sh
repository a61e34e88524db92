#!/usr/bin/env bash
# Runs the GPU test binaries copied into .device-bin (built with
# `cargo test --release --no-run`) and prints one line per binary last.
# Usage: bash tools/gpu_round.sh [binary ...]   (default: every binary there)
set -u
export TILEFUSE_CACHE_DIR=${TILEFUSE_CACHE_DIR:-/tmp/tilefuse-cache}
out=${OUT:-/tmp}
bins=("$@")
[ ${#bins[@]} -eq 0 ] && bins=($(ls .device-bin))
summary=""
for b in "${bins[@]}"; do
    start=$(date +%s.%N)
    ./.device-bin/$b --test-threads=1 --nocapture >"$out/$b.log" 2>&1
    rc=$?
    secs=$(python3 -c "import time; print(time.time() - $start)")
    result=$(grep -E "^test result" "$out/$b.log" | tail -1)
    summary+=$(printf "%-22s rc=%-3s %6.1fs  %s" "$b" "$rc" "$secs" "$result")$'\n'
    if [ $rc -ne 0 ]; then grep -E "panicked|FAILED|error" -A6 "$out/$b.log" | head -40; fi
done
echo "==== summary"
printf "%s" "$summary"
