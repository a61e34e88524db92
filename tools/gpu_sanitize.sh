#!/usr/bin/env bash
# On a GPU machine: test binaries of gpu-bin/ under compute-sanitizer.
# Usage: bash tools/gpu_sanitize.sh TOOL "binary [libtest filter]" ...
#   TOOL: memcheck, racecheck, initcheck or synccheck (comma-separated for
#   several). Each binary runs with TILEFUSE_REQUIRE_GPU=1 and
#   --test-threads=1, at most SAN_TIMEOUT seconds (default 300); its log goes
#   to $OUT/san-TOOL-BINARY.log. Prints one line per run (the tests' result
#   and the sanitizer's summary) and exits non-zero when a run fails, times
#   out or reports an error or hazard. --launch-timeout 0: a binary whose
#   first CUDA call comes after long CPU-only tests is still attached (with
#   the default 10 s the sanitizer gives up and the GPU tests run unchecked).
#   TILEFUSE_SANITIZE_QUICK=1 (set here unless given): tests with a long
#   matrix of cases (the speculative steps) run a smaller one (one block
#   size, every acceptance rule).
set -u
out=${OUT:-/tmp}
export TILEFUSE_REQUIRE_GPU=1
export TILEFUSE_SANITIZE_QUICK=${TILEFUSE_SANITIZE_QUICK:-1}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export TILEFUSE_CACHE_DIR=${TILEFUSE_CACHE_DIR:-/tmp/tilefuse-cache}
san=/usr/local/cuda/bin/compute-sanitizer
tools=$1
shift
fail=0
for tool in ${tools//,/ }; do
    for t in "$@"; do
        read -r b rest <<<"$t"
        log="$out/san-$tool-$b${rest:+-${rest// /_}}.log"
        start=$(date +%s)
        # shellcheck disable=SC2086
        timeout "${SAN_TIMEOUT:-300}" "$san" --tool "$tool" --error-exitcode 3 --launch-timeout 0 \
            gpu-bin/"$b" --test-threads=1 $rest >"$log" 2>&1
        rc=$?
        secs=$(($(date +%s) - start))
        result=$(grep -E '^test result' "$log" | tail -1)
        summary=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|HAZARD' "$log" | tail -1)
        [ $rc -ne 0 ] && fail=1
        printf '%-10s %-32s rc=%-3s %4ss  %s | %s\n' "$tool" "$b ${rest}" "$rc" "$secs" "${result:-no result}" \
            "${summary:-no summary}"
    done
done
exit $fail
