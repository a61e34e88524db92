#!/usr/bin/env bash
# One GPU round for speculative decoding: the acceptance kernel, the GPU
# loop against the host loop and the DFlash graphs against the interpreter
# (gpu_exec), greedy speculative decoding against plain decoding through the
# CLI (tools/gpu_spec.sh), and the shipped pair's eval at blocks 8, 4 and 16.
# Logs to $OUT; one line per check. Exits non-zero when any check fails.
set -u
# TILEFUSE_REQUIRE_GPU=1: a GPU test that finds no GPU fails instead of skipping.
export TILEFUSE_REQUIRE_GPU=1
failed=0
out=${OUT:-/tmp}
bin=${TILEFUSE_BIN_DIR:-gpu-bin}
export TILEFUSE_CACHE_DIR=${TILEFUSE_CACHE_DIR:-/tmp/tilefuse-cache}
for t in acceptance_kernel speculative_steps_on_the_gpu dflash; do
    "$bin/gpu_exec" $t --test-threads=1 --nocapture > "$out/gpu_exec_$t.log" 2>&1
    rc=$?; [ $rc -ne 0 ] && failed=$((failed + 1))
    echo "gpu_exec $t rc=$rc $(grep 'test result' "$out/gpu_exec_$t.log")"
    grep -E "panicked|GPU loop equals|acceptance kernel:" "$out/gpu_exec_$t.log" | head -8
done
bash tools/gpu_spec.sh > "$out/spec.txt" 2>&1 || failed=$((failed + 1)); cat "$out/spec.txt"
for b in 8 4 16; do
    "$bin/tilefuse" eval --block $b --backend cuda --mode graph --json > "$out/eval_b$b.json" 2> "$out/eval_b$b.err"
    rc=$?; [ $rc -ne 0 ] && failed=$((failed + 1))
    echo "eval B=$b rc=$rc $(cut -c1-600 "$out/eval_b$b.json") $(tail -2 "$out/eval_b$b.err")"
done
if [ "$failed" -ne 0 ]; then echo "FAILED: $failed check(s) failed"; exit 1; fi
echo "all checks passed"
