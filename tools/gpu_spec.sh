#!/usr/bin/env bash
# On a GPU machine: DFlash speculative decoding on the GPU, greedy, for both
# tiny presets and their random drafts, block sizes 4, 8 and 16, every launch
# mode: the speculative tokens must equal plain greedy decoding (the command
# checks and reports `same_as_plain`), and the GPU's plain tokens those of
# the CPU. MODES="graph" limits the launch modes. Prints one line per case; the binary is gpu-bin/tilefuse.
# Exits non-zero on any ERROR, speculative tokens unlike plain, or GPU plain
# tokens DIFFERENT from the CPU's.
set -u
# TILEFUSE_REQUIRE_GPU=1: a GPU test that finds no GPU fails instead of skipping.
export TILEFUSE_REQUIRE_GPU=1
failed=0
err=$(mktemp)
trap 'rm -f "$err"' EXIT
bin=${TILEFUSE_BIN_DIR:-gpu-bin}/tilefuse
export TILEFUSE_CACHE_DIR=${TILEFUSE_CACHE_DIR:-/tmp/tilefuse-cache}
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(*(d.get(k) if not isinstance(d.get(k), list) else ','.join(map(str, d[k])) for k in sys.argv[1:]), sep=' | ')" "$@"; }
printf "%-16s %-10s %-5s %-11s %-6s %-7s %-9s %-9s %-12s %s\n" target mode block same_plain tau tok/s draft_ms verify_ms plain_vs_cpu steps_on_gpu
for pair in mimo-v2-tiny:mimo-v2-tiny-dflash qwen3-moe-tiny:qwen3-moe-tiny-dflash; do
    target=${pair%%:*}; draft=${pair##*:}
    cpu=$("$bin" generate --preset "$target" --max-tokens 48 --backend cpu --json 2>/dev/null | field generated_ids)
    if [ -z "$cpu" ]; then echo "$target cpu ERROR: no tokens from the CPU"; failed=$((failed + 1)); fi
    for mode in ${MODES:-stream graph persistent}; do
        for b in 4 8 16; do
            j=$("$bin" generate --preset "$target" --draft "$draft" --block $b --max-tokens 48 --backend cuda --mode $mode --json 2>"$err")
            if [ -z "$j" ]; then echo "$target $mode B=$b ERROR: $(tail -3 "$err")"; failed=$((failed + 1)); continue; fi
            read -r same tau tps dms vms plain ongpu <<<"$(echo "$j" | field same_as_plain tau tokens_per_s draft_ms_per_step verify_ms_per_step plain_generated_ids steps_on_gpu | tr -d ' ' | tr '|' ' ')"
            pc=$([ "$plain" = "$cpu" ] && echo same || echo DIFFERENT)
            if [ "$pc" != same ] || [ "$same" != True ]; then failed=$((failed + 1)); fi
            printf "%-16s %-10s %-5s %-11s %-6s %-7s %-9s %-9s %-12s %s\n" "$target" "$mode" "$b" "$same" "$tau" "$tps" "$dms" "$vms" "$pc" "$ongpu"
        done
    done
done
if [ "$failed" -ne 0 ]; then echo "FAILED: $failed check(s) failed"; exit 1; fi
echo "all checks passed"
