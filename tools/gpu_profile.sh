#!/usr/bin/env bash
# Nsight Compute profile of one layer's kernels inside `tilefuse bench` (stream
# mode, caches left warm as in a real forward): per kernel the duration, the
# warp stall reasons and, per SASS instruction, the stall samples. Writes
# $OUT/profile.txt (details page), $OUT/raw.csv (durations and samples),
# $OUT/sources.tgz (per kernel, its SASS with its samples as CSV) and prints,
# last, per kernel its duration, active against elapsed cycles, shared memory
# split, cycles per issued instruction, occupancy and memory throughput.
# Exits 1 when the profiled run or an export fails.
# Usage: bash tools/gpu_profile.sh [preset] [tokens] [kernels regex] [launches to skip]
#   defaults: qwen3-30b-a3b, 1, the layer kernels, 200 (a layer in the middle of
#   the first forward); PROFILE_BIN (default gpu-bin/tilefuse).
set -u
out=${OUT:-/tmp/out}
preset=${1:-qwen3-30b-a3b}
tokens=${2:-1}
regex=${3:-'^(attention|moe_|router|norm_matvec|matvec)'}
skip=${4:-200}
# shellcheck source=tools/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
work=$(mktemp -d)
status=0
"$ncu" --kernel-name "regex:$regex" --launch-skip "$skip" --launch-count 8 --cache-control none \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section SourceCounters --section MemoryWorkloadAnalysis \
    -o "$work/prof" "${PROFILE_BIN:-gpu-bin/tilefuse}" bench --preset "$preset" --context 1024 \
    --tokens "$tokens" --reps 1 --no-draft --mode stream --out "$work/bench" >"$work/ncu.log" 2>&1 || {
    status=1
    tail -20 "$work/ncu.log"
}
"$ncu" --import "$work/prof.ncu-rep" --page details >"$out/profile.txt" 2>&1 || status=1
"$ncu" --import "$work/prof.ncu-rep" --page raw --csv \
    --metrics gpu__time_duration.sum,smsp__pcsamp_sample_count >"$out/raw.csv" 2>&1 || status=1
kernels=$(grep -oE '^  [a-z_0-9]+ \(' "$out/profile.txt" | tr -d ' (' | sort -u)
[ -n "$kernels" ] || { status=1; echo "no kernel matched $regex"; }
for k in $kernels; do
    "$ncu" --import "$work/prof.ncu-rep" --kernel-name "$k" --page source --print-source sass --csv \
        >"$work/source-$k.csv" 2>&1 || status=1
done
[ -z "$kernels" ] || tar czf "$out/sources.tgz" -C "$work" $(cd "$work" && ls source-*.csv)
grep -E '^  [a-z_0-9]+ \(|Duration|Elapsed Cycles|SM Active Cycles|Shared Memory Configuration Size|Warp Cycles Per Issued|Achieved Occupancy|Memory Throughput' "$out/profile.txt"
exit $status
