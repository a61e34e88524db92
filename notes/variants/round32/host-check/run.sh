#!/usr/bin/env bash
# Runs the decode attention tile of decode-attention.patch on the CPU (host
# emulation, shim.h) against the general tile on random inputs, and its own
# cache append against rope_append_tile. Needs python3 and g++ >= 11 (C++20).
# Usage, from the repository root with the patch applied:
#   bash notes/variants/round32/host-check/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/gen"
python3 "$here/rewrite.py" codegen/cuda "$work/gen"
cp "$here/shim.h" "$here/harness.cpp" "$work/"
g++ -std=c++20 -O2 -ffp-contract=off -pthread "$work/harness.cpp" -o "$work/harness"
"$work/harness"
