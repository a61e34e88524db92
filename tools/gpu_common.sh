# Shared by the GPU round scripts (sourced, not run): the environment of a
# test or bench run and the loop over test binaries.
export TILEFUSE_CACHE_DIR=${TILEFUSE_CACHE_DIR:-/tmp/tilefuse-cache}
# TILEFUSE_REQUIRE_GPU=1: a GPU test that finds no GPU fails instead of skipping.
export TILEFUSE_REQUIRE_GPU=1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
summary=""
fail=0

# run_test_binaries DIR "binary [libtest args]" ...: runs each test binary of
# gpu-bin/ with --test-threads=1 for at most ROUND_TIMEOUT seconds (default
# 300), its log in DIR/BINARY[-ARGS].log; adds a line per binary to $summary, sets
# fail=1 on a failure and prints the failing tests (with the per-row errors
# a comparison prints before it fails).
run_test_binaries() {
    local dir=$1 t b rest rc log
    shift
    for t in "$@"; do
        read -r b rest <<<"$t"
        log="$dir/$b${rest:+-${rest// /_}}.log"
        # shellcheck disable=SC2086
        timeout "${ROUND_TIMEOUT:-300}" gpu-bin/"$b" --test-threads=1 $rest >"$log" 2>&1
        rc=$?
        [ $rc -ne 0 ] && fail=1 && grep -E "panicked|FAILED|MISMATCH|^  row [0-9]+:" -A5 "$log" | head -40
        summary+="$b ${rest:+($rest) }rc=$rc $(grep -E '^test result' "$log" | tail -1)"$'\n'
    done
}
