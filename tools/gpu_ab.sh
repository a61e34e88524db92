#!/usr/bin/env bash
# Compares CLI binaries of gpu-bin/ on one GPU machine in the same call: the
# given test binaries first (as tools/gpu_roofline.sh runs them), then
# `tilefuse bench` of each binary in turn, graph mode with timelines, the
# whole list AB_ROUNDS times (interleaved, so drift of the card hits every
# binary alike). The tests' verdict is printed and their logs saved
# ($OUT/tests.tgz, default OUT /tmp/out) before the benches; everything lands
# in $OUT as ab.tgz; a short table is printed last: each row of each bench, then layer
# AB_LAYER's timeline (default 24) of the first preset (per kernel: work,
# CTAs, the longest and the mean CTA's own work), then the bench's per-step
# table of that preset's whole forward (median work, longest CTA, the gap
# before each step's wait).
# Usage: AB_BINS="tilefuse-base tilefuse" bash tools/gpu_ab.sh ["test-binary [args]" ...]
#   AB_PRESETS (default qwen3-30b-a3b,mimo-v2-flash-4l), AB_TOKENS (1,8),
#   AB_CONTEXT (1024), AB_MODES (graph), AB_REPS (20), AB_ROUNDS (1),
#   ROUND_TIMEOUT: seconds per test binary (default 300); ROUND_JOBS: test
#   runs at once (default 1), "binary --each" a run per test
#   (tools/gpu_common.sh), e.g. ROUND_JOBS=6 ... gpu_ab.sh "gpu_exec --each".
set -u
out=${OUT:-/tmp/out}
work=$(mktemp -d)
# shellcheck source=tools/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"
run_test_binaries "$work" "$@"
# The tests' verdict and logs first: they come back even if a bench below
# runs past the call's limit.
echo "==== tests"
printf "%s" "$summary"
(cd "$work" && ls ./*.log >/dev/null 2>&1 && tar czf "$out/tests.tgz" ./*.log)
bins=(${AB_BINS:-tilefuse-base tilefuse})
presets=${AB_PRESETS:-qwen3-30b-a3b,mimo-v2-flash-4l}
modes=${AB_MODES:-graph}
bench=(--preset "$presets" --context "${AB_CONTEXT:-1024}"
    --tokens "${AB_TOKENS:-1,8}" --reps "${AB_REPS:-20}" --no-draft --mode "$modes" --timeline)
for r in $(seq 1 "${AB_ROUNDS:-1}"); do
    for b in "${bins[@]}"; do
        timeout 300 gpu-bin/"$b" bench "${bench[@]}" --out "$work/$b-$r" \
            >"$work/$b-$r.log" 2>&1 || {
            fail=1
            tail -5 "$work/$b-$r.log"
        }
    done
done
tar czf "$out/ab.tgz" -C "$work" .
for b in "${bins[@]}"; do
    for r in $(seq 1 "${AB_ROUNDS:-1}"); do
        echo "==== $b, round $r"
        grep -E "%$|^measured" "$work/$b-$r/bench.txt" 2>/dev/null
    done
done
for b in "${bins[@]}"; do
    echo "==== $b, layer ${AB_LAYER:-24}"
    grep -A12 "layer ${AB_LAYER:-24}:" "$work/$b-1/bench.txt" 2>/dev/null | grep -E "^Graph|^Stream|^Persistent|^  k" | head -14 |
        awk '{ if ($1 ~ /^k/) printf "  %-40s %8s %6s %8s %8s\n", $1, $5, $6, (NF >= 11 ? $10 : "-"), (NF >= 11 ? $11 : "-"); else print }'
done
for b in "${bins[@]}"; do
    echo "==== $b, ${presets%%,*} ${modes%%,*}: per step over the forward (the bench's own table)"
    sed -n '/^per step/,$p' "$work/$b-1/timeline-${presets%%,*}-${modes%%,*}.txt" 2>/dev/null | tail -n +2
done
exit $fail
