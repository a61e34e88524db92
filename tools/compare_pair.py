#!/usr/bin/env python3
"""Greedy tokens of tilefuse on the GPU against transformers, for a trained
MiMo-V2 checkpoint (the shipped pair's target), on held-out prompts.

For each prompt (cut at a `def` line of the held-out text, as `tilefuse eval`
does):

- transformers in float32 (the reference) and in bfloat16 on the GPU, greedy
  with the KV cache, and the smallest gap between the two best f32 logits
  along the reference continuation (a small gap makes a bf16 disagreement a
  rounding question);
- `tilefuse generate --backend cuda` on the bf16 checkpoint;
- `tilefuse generate` on the MXFP4 checkpoint on the GPU and on the CPU
  interpreter (its own dequantized reference).

Prints one line per prompt and a summary table last.

    python3 tools/compare_pair.py --bf16 DIR --mxfp4 DIR --text FILE --tilefuse BIN
"""

import argparse
import json
import subprocess
import sys

import torch
from tokenizers import Tokenizer
from transformers import MiMoV2FlashForCausalLM


def prompts(text, n, before=600):
    lines, at, starts = text.splitlines(keepends=True), 0, []
    for line in lines:
        if line.lstrip().startswith("def ") and line.endswith(":\n"):
            starts.append((at, at + len(line)))
        at += len(line)
    step = max(len(starts) / max(n, 1), 1.0)
    out = []
    for i in range(min(n, len(starts))):
        s, e = starts[int(i * step)]
        f = max(0, s - before)
        nl = text.find("\n", f, s)
        if f > 0 and nl >= 0:
            f = nl + 1
        out.append(text[f:e])
    return out


@torch.no_grad()
def hf_greedy(model, ids, n):
    x = torch.tensor([ids], device="cuda")
    out = model(input_ids=x, use_cache=True)
    past, toks, gaps = out.past_key_values, [], []
    logits = out.logits[0, -1].float()
    for _ in range(n):
        top = logits.topk(2).values
        gaps.append((top[0] - top[1]).item())
        t = int(logits.argmax())
        toks.append(t)
        out = model(input_ids=torch.tensor([[t]], device="cuda"), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1].float()
    return toks, min(gaps)


def tilefuse(binary, model, ids, n, backend):
    cmd = [binary, "generate", "--model", model, "--prompt-ids", ",".join(map(str, ids)),
           "--max-tokens", str(n), "--backend", backend, "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"tilefuse failed: {r.stderr.strip().splitlines()[-1:]}")
    j = json.loads(r.stdout)
    return j["generated_ids"], j["margins"]


def first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bf16", required=True)
    p.add_argument("--mxfp4", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--tilefuse", required=True)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args()
    tok = Tokenizer.from_file(f"{a.bf16}/tokenizer.json")
    text = open(a.text, encoding="utf-8").read()
    f32 = MiMoV2FlashForCausalLM.from_pretrained(a.bf16, dtype=torch.float32).cuda().eval()
    b16 = MiMoV2FlashForCausalLM.from_pretrained(a.bf16, dtype=torch.bfloat16).cuda().eval()
    n = a.max_tokens
    rows = []
    for i, pr in enumerate(prompts(text, a.prompts)):
        ids = tok.encode(pr).ids[-400:]
        ref, gap = hf_greedy(f32, ids, n)
        hb, _ = hf_greedy(b16, ids, n)
        tf, _ = tilefuse(a.tilefuse, a.bf16, ids, n, "cuda")
        qg, mg = tilefuse(a.tilefuse, a.mxfp4, ids, n, "cuda")
        qc, mc = tilefuse(a.tilefuse, a.mxfp4, ids, n, "cpu")
        d = first_diff(qg, qc)
        # Where GPU and CPU part, both chose from the same context: the CPU's
        # top-2 margin there says how near a tie it was; the largest margin
        # difference before it estimates how far the GPU's logits move.
        drift = max((abs(x - y) for x, y in zip(mg[:d + 1], mc[:d + 1])), default=0.0)
        row = {
            "prompt": i, "prompt_tokens": len(ids), "min_gap_f32": round(gap, 4),
            "tilefuse_bf16_vs_hf_f32": first_diff(tf, ref),
            "tilefuse_bf16_vs_hf_bf16": first_diff(tf, hb),
            "hf_bf16_vs_hf_f32": first_diff(hb, ref),
            "mxfp4_gpu_vs_cpu": d,
            "mxfp4_cpu_margin_at_split": round(mc[d], 4) if d < n else None,
            "mxfp4_gpu_margin_at_split": round(mg[d], 4) if d < n else None,
            "mxfp4_max_margin_drift": round(drift, 4),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{n} greedy tokens per prompt; each column: identical leading tokens (= {n}: all equal)")
    keys = ["tilefuse_bf16_vs_hf_f32", "tilefuse_bf16_vs_hf_bf16", "hf_bf16_vs_hf_f32", "mxfp4_gpu_vs_cpu"]
    print(f"{'prompt':>6} {'gap':>7} " + " ".join(f"{k:>24}" for k in keys))
    for r in rows:
        print(f"{r['prompt']:>6} {r['min_gap_f32']:>7} " + " ".join(f"{r[k]:>24}" for k in keys))
    for k in keys:
        print(f"{k}: {sum(r[k] == n for r in rows)}/{len(rows)} prompts fully equal")
    print("MXFP4 GPU vs CPU where they part: CPU margin, GPU margin, largest margin drift up to there")
    for r in rows:
        print(f"{r['prompt']:>6} {str(r['mxfp4_cpu_margin_at_split']):>10} "
              f"{str(r['mxfp4_gpu_margin_at_split']):>10} {r['mxfp4_max_margin_drift']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
