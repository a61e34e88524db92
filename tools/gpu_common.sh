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
# 300), its log in DIR/BINARY[-ARGS].log; adds a line per run to $summary (in
# the order given), sets fail=1 on a failure and prints the failing tests
# (with the per-row errors a comparison prints before it fails).
# "binary --each": one run per test of the binary (`--exact NAME`), so that
# its long tests can run side by side. ROUND_JOBS (default 1): how many runs
# at once; the GPU tests share the card, and a timing is never taken among
# them (the benches run after, alone).
run_test_binaries() {
    local dir=$1 t b rest rc log name jobs=${ROUND_JOBS:-1}
    shift
    local entries=() pids=()
    for t in "$@"; do
        read -r b rest <<<"$t"
        if [ "$rest" = "--each" ]; then
            local names
            names=$(gpu-bin/"$b" --list 2>/dev/null | sed -n 's/: test$//p')
            # No list (a missing or broken binary): one run of the whole
            # binary, whose failure is then reported.
            [ -z "$names" ] && entries+=("$b") && continue
            while read -r name; do
                entries+=("$b --exact $name")
            done <<<"$names"
        else
            entries+=("$t")
        fi
    done
    for t in "${entries[@]}"; do
        if [ "$jobs" -gt 1 ]; then
            while [ "$(_running "${pids[@]}")" -ge "$jobs" ]; do sleep 0.5; done
            _run_test_entry "$dir" "$t" &
            pids+=($!)
        else
            _run_test_entry "$dir" "$t"
        fi
    done
    [ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
    for t in "${entries[@]}"; do
        read -r b rest <<<"$t"
        log="$dir/$b${rest:+-${rest// /_}}.log"
        rc=$(cat "$log.rc" 2>/dev/null || echo 1)
        rm -f "$log.rc"
        [ "$rc" -ne 0 ] && fail=1 && grep -E "panicked|FAILED|MISMATCH|^  row [0-9]+:" -A5 "$log" | head -40
        summary+="$b ${rest:+($rest) }rc=$rc $(grep -E '^test result' "$log" | tail -1)"$'\n'
    done
}

# One run of run_test_binaries: its log, and its exit status in LOG.rc.
_run_test_entry() {
    local b rest log
    read -r b rest <<<"$2"
    log="$1/$b${rest:+-${rest// /_}}.log"
    # shellcheck disable=SC2086
    timeout "${ROUND_TIMEOUT:-300}" gpu-bin/"$b" --test-threads=1 $rest >"$log" 2>&1
    echo $? >"$log.rc"
}

# How many of the given processes still run.
_running() {
    local n=0 p
    for p in "$@"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done
    echo "$n"
}
