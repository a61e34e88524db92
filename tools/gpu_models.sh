#!/usr/bin/env bash
# On a GPU machine: whole generations on the GPU against the references.
#  1. each transformers fixture (tests/fixtures), loaded in bf16, greedy, on the
#     CPU and in every launch mode: tokens matching the fixture's greedy
#     continuation. The *_bf16 fixtures (bf16 weights, margins that bf16
#     rounding cannot flip) must match token for token ("ok", else "MISMATCH");
#     the f32 ones may part at a near tie (reported, not judged);
#  2. an MXFP4-quantized fixture: GPU against the CPU interpreter on the same
#     quantized checkpoint (its own dequantized reference);
#  3. built-in presets: greedy tokens of every launch mode against the CPU.
# Prints one line per check; the binary is gpu-bin/tilefuse. Exits non-zero on
# any MISMATCH or ERROR.
set -u
# TILEFUSE_REQUIRE_GPU=1: a GPU test that finds no GPU fails instead of skipping.
export TILEFUSE_REQUIRE_GPU=1
failed=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bin=${TILEFUSE_BIN_DIR:-gpu-bin}/tilefuse
export TILEFUSE_CACHE_DIR=${TILEFUSE_CACHE_DIR:-/tmp/tilefuse-cache}
ids() { python3 -c "import json,sys; print(','.join(map(str, json.load(open(sys.argv[1]))[sys.argv[2]])))" "$1" "$2"; }
gen() { "$bin" generate "$@" --json 2>/dev/null | python3 -c "import json,sys; print(','.join(map(str, json.load(sys.stdin)['generated_ids'])))" 2>/dev/null || echo "ERROR"; }
same() { python3 -c "import sys; a=sys.argv[1].split(','); b=sys.argv[2].split(','); n=sum(1 for x,y in zip(a,b) if x==y); p=next((i for i,(x,y) in enumerate(zip(a,b)) if x!=y), len(a)); print(f'{n}/{len(b)} equal, first {p} identical')" "$1" "$2"; }
# "ok"/"MISMATCH" for a bf16 fixture ($1), nothing for the others.
verdict() { case "$1" in *_bf16) [ "$2" = "$3" ] && echo " ok" || echo " MISMATCH";; esac; }
# Prints a result line and counts it as failed when it says MISMATCH or ERROR.
report() { echo "$1"; case "$1" in *MISMATCH*|*ERROR*) failed=$((failed + 1));; esac; }
echo "== fixtures, bf16 on the CPU and the GPU vs transformers (f32) greedy"
for fx in tests/fixtures/*/; do
    fx=${fx%/}; name=$(basename "$fx")
    p=$(ids "$fx/reference.json" prompt_ids); want=$(ids "$fx/reference.json" greedy_ids)
    n=$(echo "$want" | tr ',' '\n' | wc -l)
    cpu=$(gen --model "$fx" --prompt-ids "$p" --max-tokens "$n" --backend cpu --dtype bf16)
    report "$name cpu-bf16: $(same "$cpu" "$want")$(verdict "$name" "$cpu" "$want")$([ "$cpu" = ERROR ] && echo " ERROR")"
    for mode in stream graph persistent; do
        got=$(gen --model "$fx" --prompt-ids "$p" --max-tokens "$n" --backend cuda --mode $mode --dtype bf16)
        report "$name $mode: $(same "$got" "$want") ; vs cpu-bf16 $(same "$got" "$cpu")$(verdict "$name" "$got" "$want")$([ "$got" = ERROR ] && echo " ERROR")"
    done
done
echo "== MXFP4-quantized fixture: GPU vs the interpreter on the same checkpoint"
q="$work/q"
"$bin" quantize --model tests/fixtures/mimo_v2_tiny --out "$q" --format mxfp4 >/dev/null 2>&1 \
    || report "mimo_v2_tiny-mxfp4 quantize ERROR"
p=$(ids tests/fixtures/mimo_v2_tiny/reference.json prompt_ids)
cpu=$(gen --model "$q" --prompt-ids "$p" --max-tokens 32 --backend cpu --dtype bf16)
for mode in stream graph persistent; do
    got=$(gen --model "$q" --prompt-ids "$p" --max-tokens 32 --backend cuda --mode $mode --dtype bf16)
    report "mimo_v2_tiny-mxfp4 $mode vs cpu: $(same "$got" "$cpu")$([ "$got" = ERROR ] || [ "$cpu" = ERROR ] && echo " ERROR")"
done
echo "== presets: every launch mode vs the CPU, 48 greedy tokens"
for preset in mimo-v2-tiny mimo-v2-tiny-mxfp4 qwen3-moe-tiny; do
    cpu=$(gen --preset $preset --max-tokens 48 --backend cpu)
    for mode in stream graph persistent; do
        got=$(gen --preset $preset --max-tokens 48 --backend cuda --mode $mode)
        report "$preset $mode vs cpu: $(same "$got" "$cpu")$([ "$got" = ERROR ] || [ "$cpu" = ERROR ] && echo " ERROR")"
    done
done
if [ "$failed" -ne 0 ]; then echo "FAILED: $failed check(s) failed"; exit 1; fi
echo "all checks passed"
