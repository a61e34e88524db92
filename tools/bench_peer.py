#!/usr/bin/env python3
"""The peer of `tilefuse bench`: the transformers implementations of the same
shapes, bf16 weights, batch-1 decoding with a static cache, timed on the GPU.

Prints one JSON object per measurement (and writes them to --json): the time
per T=1 decode forward at a given context, per model and per layer, so that a
run with fewer layers than the tilefuse preset (when bf16 weights do not fit
the card) still compares per layer.

Usage: python3 tools/bench_peer.py --arch qwen3_moe --layers 4 --context 1024 --json peer.json
"""
import argparse
import json
import time

import torch


def mimo_config(layers):
    from transformers import MiMoV2FlashConfig

    kinds = ["full_attention" if (i == 0 or (i + 1) % 6 == 0) else "sliding_attention" for i in range(layers)]
    return MiMoV2FlashConfig(
        num_hidden_layers=layers,
        layer_types=kinds,
        mlp_layer_types=["dense"] + ["sparse"] * (layers - 1),
    )


def qwen_config(layers):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        hidden_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        vocab_size=151936,
        max_position_embeddings=32768,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=["mimo_v2", "qwen3_moe"], required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="try torch.compile (reduce-overhead)")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens)")
    ap.add_argument("--json")
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM, StaticCache

    cfg = mimo_config(a.layers) if a.arch == "mimo_v2" else qwen_config(a.layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    max_len = a.context + 8
    cache = StaticCache(config=cfg, max_batch_size=1, max_cache_len=max_len, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (1, a.context), device="cuda")
    with torch.no_grad():
        # Prefill in chunks to bound memory.
        for s in range(0, a.context, a.chunk):
            chunk = ids[:, s : s + a.chunk]
            pos = torch.arange(s, s + chunk.shape[1], device="cuda")
            model(input_ids=chunk, past_key_values=cache, cache_position=pos, use_cache=True)
        step = model.forward
        mode = "eager"
        if a.compile:
            try:
                step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
                mode = "torch.compile"
            except Exception as e:  # noqa: BLE001
                print(json.dumps({"warning": f"torch.compile failed: {e}"}))
        tok = torch.randint(0, 256, (1, 1), device="cuda")
        pos = torch.tensor([a.context], device="cuda")
        for _ in range(3):
            step(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(a.reps):
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            step(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
    times.sort()
    ms = times[len(times) // 2]
    out = {
        "peer": "transformers",
        "arch": a.arch,
        "layers": a.layers,
        "context": a.context,
        "mode": mode,
        "ms": ms,
        "ms_per_layer": ms / a.layers,
        "weight_bytes_bf16": weight_bytes,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(json.dumps(out))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
