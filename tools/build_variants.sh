#!/usr/bin/env bash
# Builds the binaries of one A/B round on a machine with Rust, for
# tools/gpu_ab.sh on a GPU machine: the CLI of the checked-out tree as
# gpu-bin/tilefuse-main, and, for each VARIANT, the CLI of the tree with the
# variant's patches applied as gpu-bin/tilefuse-NAME. With TESTS set, the
# named test binaries are built too, as gpu-bin/TEST (the tree's) and
# gpu-bin/TEST_NAME (each variant's). Every binary is stripped. The tree is
# left as found: the script refuses a tree with uncommitted changes to
# tracked files, and reverts each variant's patches after its build.
#
# Usage: [TESTS="kernels_attention gpu_exec"] bash tools/build_variants.sh VARIANT ...
#   VARIANT: PATCH[+PATCH...]:NAME, e.g.
#   notes/variants/round29/kv-stage.patch:kv
#   notes/variants/round29/kv-stage.patch+notes/variants/round29/down-hint-in-up.patch:kvdh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
if ! git diff --quiet HEAD --; then
    echo "build_variants: the tree has uncommitted changes; commit or stash them first" >&2
    exit 2
fi
mkdir -p gpu-bin
tests=(${TESTS:-})

# build SUFFIX: the CLI as gpu-bin/tilefuse-SUFFIX, each test as
# gpu-bin/TEST (SUFFIX main) or gpu-bin/TEST_SUFFIX.
build() {
    # Called where errexit does not hold (`build ... || status=$?`): every
    # step is checked, so that a failed build never leaves a stale binary.
    local suffix=$1 t f list
    cargo build --release --quiet || return 1
    strip -o "gpu-bin/tilefuse-$suffix" target/release/tilefuse || return 1
    [ ${#tests[@]} -eq 0 ] && return 0
    list=$(cargo test --release --workspace --no-run 2>&1) || {
        echo "$list" | tail -20 >&2
        return 1
    }
    for t in "${tests[@]}"; do
        f=$(sed -n "s/.*(\(target\/release\/deps\/$t-[0-9a-f]*\)).*/\1/p" <<<"$list" | head -1)
        if [ -z "$f" ]; then
            echo "build_variants: no test binary $t" >&2
            return 2
        fi
        if [ "$suffix" = main ]; then
            strip -o "gpu-bin/$t" "$f" || return 1
        else
            strip -o "gpu-bin/${t}_$suffix" "$f" || return 1
        fi
    done
}

build main || exit $?
echo "gpu-bin/tilefuse-main: $(git rev-parse --short HEAD)"
for v in "$@"; do
    name=${v##*:}
    IFS=+ read -r -a patches <<<"${v%:*}"
    applied=()
    for p in "${patches[@]}"; do
        if ! git apply "$p"; then
            echo "build_variants: $p does not apply (variant $name)" >&2
            for q in "${applied[@]}"; do git apply -R "$q"; done
            exit 2
        fi
        applied=("$p" "${applied[@]}")
    done
    status=0
    build "$name" || status=$?
    for q in "${applied[@]}"; do git apply -R "$q"; done
    [ $status -ne 0 ] && exit $status
    echo "gpu-bin/tilefuse-$name: ${patches[*]}"
done
