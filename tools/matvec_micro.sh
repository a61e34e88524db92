#!/usr/bin/env bash
# Builds tools/matvec_micro.cu against the kernel headers with nvcc and runs
# it (an sm_90 GPU; CUDA at /usr/local/cuda or $CUDA_HOME).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cuda=${CUDA_HOME:-/usr/local/cuda}
bin=$(mktemp -d)/matvec_micro
"$cuda/bin/nvcc" -O3 -std=c++17 -arch=sm_90a -I"$root/codegen/cuda" -o "$bin" "$root/tools/matvec_micro.cu"
"$bin"
