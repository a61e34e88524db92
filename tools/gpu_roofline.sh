#!/usr/bin/env bash
# One round of the roofline work on a GPU machine: the kernel and executable
# tests (all launch modes), then the bench of both presets with programmatic
# dependent launch off (TILEFUSE_PDL=0) and on, with timelines. Binaries come
# from gpu-bin/ (tests from `cargo test --workspace --release --no-run`, and
# the tilefuse CLI), stripped. Everything lands in $OUT (default /tmp/out) as
# one archive; a short table is printed last.
# Usage: bash tools/gpu_roofline.sh ["test-binary [libtest args]" ...]
set -u
out=${OUT:-/tmp/out}
work=$(mktemp -d)
export TILEFUSE_CACHE_DIR=${TILEFUSE_CACHE_DIR:-/tmp/tilefuse-cache}
# TILEFUSE_REQUIRE_GPU=1: a GPU test that finds no GPU fails instead of skipping.
export TILEFUSE_REQUIRE_GPU=1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
tests=("$@")
[ ${#tests[@]} -eq 0 ] && tests=(kernels_weights kernels_attention gpu_exec fixtures)
summary=""
fail=0
for t in "${tests[@]}"; do
    read -r b rest <<<"$t"
    # shellcheck disable=SC2086
    timeout 300 gpu-bin/"$b" --test-threads=1 $rest >"$work/$b.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && fail=1 && grep -E "panicked|FAILED|MISMATCH" -A5 "$work/$b.log" | head -30
    summary+="$b rc=$rc $(grep -E '^test result' "$work/$b.log" | tail -1)"$'\n'
done
bench=(--preset qwen3-30b-a3b,mimo-v2-flash-4l --context 1024 --tokens 1,8 --reps 20 --no-draft)
TILEFUSE_PDL=0 timeout 200 gpu-bin/tilefuse bench "${bench[@]}" --mode graph \
    --out "$work/bench-nopdl" >"$work/bench-nopdl.log" 2>&1 || fail=1
timeout 300 gpu-bin/tilefuse bench "${bench[@]}" --mode stream,graph,persistent --timeline \
    --out "$work/bench-pdl" >"$work/bench-pdl.log" 2>&1 || fail=1
tar czf "$out/round.tgz" -C "$work" .
echo "==== bench, PDL off"
grep -E "%$|^measured" "$work/bench-nopdl/bench.txt" 2>/dev/null || tail -5 "$work/bench-nopdl.log"
echo "==== bench, PDL on"
grep -E "%$|^measured|^timeline|span" "$work/bench-pdl/bench.txt" 2>/dev/null || tail -5 "$work/bench-pdl.log"
echo "==== tests"
printf "%s" "$summary"
exit $fail
