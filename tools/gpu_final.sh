#!/usr/bin/env bash
# One GPU round: the DFlash graphs against the interpreter, speculative
# decoding on the GPU (tools/gpu_spec.sh), the bf16 fixtures on the GPU, the
# shipped pair's eval at blocks 4, 8 and 16, and the transformers peer at
# 1k context. Logs to $OUT; a summary last.
set -u
out=${OUT:-/tmp}
bin=${TILEFUSE_BIN_DIR:-gpu-bin}
export TILEFUSE_CACHE_DIR=${TILEFUSE_CACHE_DIR:-/tmp/tilefuse-cache}
"$bin/gpu_exec" dflash --test-threads=1 --nocapture > "$out/gpu_exec_dflash.log" 2>&1
echo "gpu_exec dflash rc=$? worst $(grep -oE 'rel L2 [0-9.e-]+' "$out/gpu_exec_dflash.log" | awk '{print $3}' | sort -g | tail -1)"
"$bin/fixtures" --test-threads=1 --nocapture > "$out/fixtures.log" 2>&1
echo "fixtures rc=$? $(grep 'test result' "$out/fixtures.log")"; grep -iE "gpu|cuda" "$out/fixtures.log" | tail -8
bash tools/gpu_spec.sh > "$out/spec.txt" 2>&1; cat "$out/spec.txt"
for b in 8 4 16; do
    "$bin/tilefuse" eval --block $b --backend cuda --mode graph --json > "$out/eval_b$b.json" 2> "$out/eval_b$b.err"
    echo "eval B=$b rc=$? $(cat "$out/eval_b$b.json")"
done
for a in "mimo_v2 4" "qwen3_moe 24"; do
    set -- $a
    timeout 200 python3 tools/bench_peer.py --arch $1 --layers $2 --context 1024 --json "$out/peer_$1.json" > "$out/peer_$1.txt" 2>&1
    echo "peer $1 rc=$? $(tail -1 "$out/peer_$1.txt" | cut -c1-400)"
done
