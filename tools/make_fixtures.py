#!/usr/bin/env python3
"""Reference fixtures for tilefuse: tiny random MiMo-V2 and Qwen3-MoE models run
by Hugging Face transformers on the CPU in float32.

For each fixture this writes `tests/fixtures/<name>/`:

- `config.json`, `model.safetensors` (and `generation_config.json`): the model
  as `save_pretrained` writes it (per-expert tensors
  `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, MiMo sinks as
  `self_attn.attention_sink_bias`);
- `reference.safetensors`: `logits` f32 `[N, vocab]`, the logits of every
  position of `prompt + greedy[:-1]` from one full forward (no KV cache);
- `reference.json`: the prompt token ids, the greedy continuation, the seed,
  the smallest greedy and router margins (see below) and the package versions.

Token ids are given directly (no tokenizer). Weights are drawn at scales that
keep activations of order one (`N(0, 1/fan_in)` matrices, `1 + N(0, 0.1)` norms,
`N(0, 0.5)` sinks, `N(0, 0.1)` correction bias) so that every path of the model
changes the logits; transformers' own init (std 0.02) would make attention and
routing nearly uniform.

Margins: a fixture is only useful if an implementation that agrees to 1e-5 must
also agree on every discrete choice. The script checks, along the whole
sequence, the gap between the chosen and the best rejected expert score of
every router (top-k and, with `n_group > 1`, the group choice) and the gap
between the top two logits of every greedy step, and draws a new seed until
all are above `MIN_MARGIN`.

Run from the repository root (needs torch and transformers >= 5.17):

    python tools/make_fixtures.py            # all fixtures
    python tools/make_fixtures.py mimo_v2_tiny

The Rust build never runs this script; the committed fixtures are what the
tests read.
"""

import json
import math
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import transformers
from transformers import (
    MiMoV2FlashConfig,
    MiMoV2FlashForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
PROMPT_LEN = 12
NEW_TOKENS = 32
MIN_MARGIN = 1e-3


def mimo(**over):
    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=24,
        v_head_dim=16,
        sliding_window=6,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 50_000.0, "partial_rotary_factor": 0.334},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.334},
        },
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.5,
        attention_value_scale=0.707,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    base.update(over)
    return MiMoV2FlashConfig(**base), MiMoV2FlashForCausalLM


def qwen(**over):
    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    base.update(over)
    return Qwen3MoeConfig(**base), Qwen3MoeForCausalLM


FIXTURES = {
    # Full and sliding layers, sinks, partial RoPE (8 of 24 dims), value scale,
    # a dense first layer, n_group = 2 routing with a correction bias,
    # norm_topk_prob true, routed_scaling_factor 1.5.
    "mimo_v2_tiny": lambda: mimo(),
    # norm_topk_prob false, 4 groups with 2 kept, top-3 of 8, a dense middle layer.
    "mimo_v2_tiny_nonorm": lambda: mimo(
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        mlp_layer_types=["sparse", "dense", "sparse"],
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        sliding_window=5,
    ),
    # q/k norms, full RoPE, softmax routing without renormalisation, dense layer 0.
    "qwen3_moe_tiny": lambda: qwen(),
    # norm_topk_prob true, decoder_sparse_step 2, head_dim * heads != hidden.
    "qwen3_moe_tiny_norm": lambda: qwen(
        num_hidden_layers=4,
        head_dim=24,
        num_key_value_heads=1,
        norm_topk_prob=True,
        decoder_sparse_step=2,
        mlp_only_layers=[],
        num_experts_per_tok=3,
    ),
}


def reinit(model, gen):
    """Draws every parameter (and the correction-bias buffers) at order-one scales."""
    sd = model.state_dict()
    new = {}
    for name, t in sd.items():
        shape = tuple(t.shape)
        if name.endswith("norm.weight"):
            v = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".sinks"):
            v = 0.5 * torch.randn(shape, generator=gen)
        elif name.endswith("e_score_correction_bias"):
            v = 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            v = torch.randn(shape, generator=gen)
        else:
            # [.., out, in]: N(0, 1/in)
            v = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        new[name] = v.to(torch.float32)
    missing, unexpected = model.load_state_dict(new, strict=True)
    assert not missing and not unexpected


class RouterMargins:
    """Forward hooks on the routers: the smallest gap between a chosen and the
    best rejected candidate, over top-k experts and (grouped routing) groups."""

    def __init__(self, model):
        self.min = float("inf")
        for mod in model.modules():
            name = type(mod).__name__
            if name == "MiMoV2FlashTopkRouter":
                mod.register_forward_hook(self.mimo)
            elif name == "Qwen3MoeTopKRouter":
                mod.register_forward_hook(self.qwen)

    def gap(self, scores, k):
        top = torch.topk(scores, k + 1, dim=-1).values
        self.min = min(self.min, float((top[:, k - 1] - top[:, k]).min()))

    def mimo(self, mod, args, out):
        logits = out[0]
        s = logits.sigmoid() + mod.e_score_correction_bias
        e, g = mod.num_experts, mod.num_group
        if g > 1:
            grp = s.view(-1, g, e // g).topk(2, dim=-1).values.sum(-1)
            if mod.topk_group < g:
                self.gap(grp, mod.topk_group)
            keep = torch.topk(grp, mod.topk_group, dim=-1).indices
            mask = torch.zeros_like(grp).scatter_(1, keep, 1).bool()
            s = s.masked_fill(~mask.repeat_interleave(e // g, dim=1), float("-inf"))
        self.gap(s, mod.top_k)

    def qwen(self, mod, args, out):
        self.gap(torch.softmax(out[0].float(), dim=-1), mod.top_k)


@torch.no_grad()
def full_logits(model, ids):
    return model(torch.tensor([ids]), use_cache=False).logits[0].float()


@torch.no_grad()
def build(name, seed):
    config, cls = FIXTURES[name]()
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="eager", experts_implementation="eager")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    reinit(model, gen)
    prompt = torch.randint(0, config.vocab_size, (PROMPT_LEN,), generator=gen).tolist()
    margins = RouterMargins(model)
    ids = list(prompt)
    greedy_margin = float("inf")
    for _ in range(NEW_TOKENS):
        last = full_logits(model, ids)[-1]
        top2 = torch.topk(last, 2).values
        greedy_margin = min(greedy_margin, float(top2[0] - top2[1]))
        ids.append(int(torch.argmax(last)))
    logits = full_logits(model, ids[:-1])
    return model, config, prompt, ids[PROMPT_LEN:], logits, greedy_margin, margins.min


def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def make(name):
    for seed in range(100):
        model, config, prompt, greedy, logits, gm, rm = build(name, seed)
        if gm >= MIN_MARGIN and rm >= MIN_MARGIN:
            break
        print(f"{name}: seed {seed} has margins greedy {gm:.2e}, router {rm:.2e}; trying the next")
    else:
        raise SystemExit(f"{name}: no seed below 100 gives margins above {MIN_MARGIN}")
    out = ROOT / name
    tmp = ROOT / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    # The saved checkpoint must load back to the same logits.
    back = type(model).from_pretrained(tmp, attn_implementation="eager", experts_implementation="eager")
    back.eval()
    again = full_logits(back, prompt + greedy[:-1])
    assert torch.equal(again, logits), f"{name}: reloading the checkpoint changes the logits"
    safetensors.torch.save_file({"logits": logits.contiguous()}, tmp / "reference.safetensors")
    ref = {
        "name": name,
        "model_type": config.model_type,
        "seed": seed,
        "prompt_ids": prompt,
        "greedy_ids": greedy,
        "logits": "reference.safetensors: `logits` f32 [len(prompt) + len(greedy) - 1, vocab], "
        "one full forward of prompt + greedy[:-1]",
        "min_greedy_margin": gm,
        "min_router_margin": rm,
        "dtype": "float32",
        "attn_implementation": "eager",
        "experts_implementation": "eager",
        "versions": versions(),
    }
    (tmp / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name}: seed {seed}, margins greedy {gm:.3e} router {rm:.3e}, {size / 1024:.0f} KiB")


def main():
    names = sys.argv[1:] or list(FIXTURES)
    for n in names:
        if n not in FIXTURES:
            raise SystemExit(f"unknown fixture {n}; known: {', '.join(FIXTURES)}")
    ROOT.mkdir(parents=True, exist_ok=True)
    for n in names:
        make(n)
    (ROOT / "VERSIONS.json").write_text(json.dumps(versions(), indent=1) + "\n")


if __name__ == "__main__":
    main()
