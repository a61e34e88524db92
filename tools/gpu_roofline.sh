#!/usr/bin/env bash
# One round of the roofline work on a GPU machine: the kernel and executable
# tests (all launch modes), then the bench of both presets: the baseline
# binary gpu-bin/tilefuse-base (when present, graph mode, same card, same
# call) or else this binary with programmatic dependent launch off
# (TILEFUSE_PDL=0), then this binary in stream, graph and persistent modes
# with timelines. Binaries come from gpu-bin/ (tests from `cargo test
# --workspace --release --no-run`, and the tilefuse CLI), stripped.
# Everything lands in $OUT (default /tmp/out) as one archive; a short table
# is printed last.
# Usage: bash tools/gpu_roofline.sh ["test-binary [libtest args]" ...]
#   ROUND_TESTS=0 skips the tests; ROUND_MODES (default stream,graph,persistent);
#   ROUND_TIMEOUT: seconds per test binary (default 300).
set -u
out=${OUT:-/tmp/out}
work=$(mktemp -d)
# shellcheck source=tools/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"
tests=("$@")
[ ${#tests[@]} -eq 0 ] && tests=(kernels_weights kernels_attention gpu_exec fixtures)
[ "${ROUND_TESTS:-1}" = 0 ] && tests=()
run_test_binaries "$work" "${tests[@]}"
bench=(--preset qwen3-30b-a3b,mimo-v2-flash-4l --context 1024 --tokens 1,8 --reps 20 --no-draft)
if [ -x gpu-bin/tilefuse-base ]; then
    base=(gpu-bin/tilefuse-base)
    base_name="baseline binary"
else
    base=(env TILEFUSE_PDL=0 gpu-bin/tilefuse)
    base_name="PDL off"
fi
timeout 200 "${base[@]}" bench "${bench[@]}" --mode graph \
    --out "$work/bench-base" >"$work/bench-base.log" 2>&1 || fail=1
timeout 300 gpu-bin/tilefuse bench "${bench[@]}" --mode "${ROUND_MODES:-stream,graph,persistent}" --timeline \
    --out "$work/bench-new" >"$work/bench-new.log" 2>&1 || fail=1
tar czf "$out/round.tgz" -C "$work" .
echo "==== bench, $base_name"
grep -E "%$|^measured" "$work/bench-base/bench.txt" 2>/dev/null || tail -5 "$work/bench-base.log"
echo "==== bench, this binary"
grep -E "%$|^measured|^timeline|span" "$work/bench-new/bench.txt" 2>/dev/null || tail -5 "$work/bench-new.log"
echo "==== tests"
printf "%s" "$summary"
exit $fail
