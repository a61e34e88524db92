#!/usr/bin/env bash
# On a GPU machine: the shipped pair (models/mimo-v2-code). Writes the
# held-out files named in its training/heldout.txt (from this Python's
# standard library, the corpus it was trained on) to $OUT/heldout.txt, runs
# `tilefuse eval` on the GPU at blocks 4, 8 and 16, and compares greedy
# tokens with transformers (tools/compare_pair.py; the bf16 checkpoint in
# $BF16, default gpu-bin/target-bf16). Tables last. Exits non-zero when an
# eval or the comparison fails.
set -u
# TILEFUSE_REQUIRE_GPU=1: a GPU test that finds no GPU fails instead of skipping.
export TILEFUSE_REQUIRE_GPU=1
failed=0
bin=${TILEFUSE_BIN_DIR:-gpu-bin}/tilefuse
out=${OUT:-/tmp}
export TILEFUSE_CACHE_DIR=${TILEFUSE_CACHE_DIR:-/tmp/tilefuse-cache}
pair=models/mimo-v2-code
python3 - "$pair/training/heldout.txt" "$out/heldout.txt" <<'PY'
import sys, sysconfig, pathlib
root = pathlib.Path(sysconfig.get_paths()["stdlib"])
names = [l.strip() for l in open(sys.argv[1]) if l.strip()]
parts = [(root / n).read_text(encoding="utf-8") for n in names]
open(sys.argv[2], "w", encoding="utf-8").write("\n\n".join(parts))
print(f"held-out text: {len(names)} files, {sum(map(len, parts))} characters")
PY
for b in 8 4 16; do
    "$bin" eval --text "$out/heldout.txt" --block $b --backend cuda --mode graph --json > "$out/eval_b$b.json" 2> "$out/eval_b$b.err"
    rc=$?; [ $rc -ne 0 ] && failed=$((failed + 1))
    echo "eval B=$b rc=$rc $(cat "$out/eval_b$b.json")"
done
python3 tools/compare_pair.py --bf16 "${BF16:-gpu-bin/target-bf16}" --mxfp4 "$pair/target" \
    --text "$out/heldout.txt" --tilefuse "$bin" --prompts 8 --max-tokens 64 > "$out/compare_pair.txt" 2>&1 \
    || failed=$((failed + 1))
tail -26 "$out/compare_pair.txt"
if [ "$failed" -ne 0 ]; then echo "FAILED: $failed check(s) failed"; exit 1; fi
echo "all checks passed"
