#!/usr/bin/env python3
"""Reference fixtures for tilefuse: tiny random MiMo-V2 and Qwen3-MoE models run
by Hugging Face transformers on the CPU in float32.

For each fixture this writes `tests/fixtures/<name>/`:

- `config.json`, `model.safetensors` (and `generation_config.json`): the model
  as `save_pretrained` writes it (per-expert tensors
  `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, MiMo sinks as
  `self_attn.attention_sink_bias`);
- `reference.safetensors`: `logits` f32 `[N, vocab]`, the logits of every
  position of `prompt + greedy[:-1]` from one full forward (no KV cache), and
  for bf16 fixtures `experts.layer{i}` i32 `[N, top_k]`, the experts router
  `i` chose at each position (ascending);
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

bf16 fixtures (`*_bf16`): the weights are rounded to bf16 before anything is
computed and saved as bf16, so an implementation that loads them in bf16 runs
exactly the numbers transformers ran; the reference is still computed in
float32. They are meant for implementations that compute in bf16, whose
results move away from float32 by the rounding of every activation, so their
margins must exceed those moves, not just 1e-5:

- `survey` measures the moves: for many seeds it runs the model in float32 and
  in bfloat16 (transformers on the CPU, the LM head applied in float32 to the
  bf16 final hidden state, as tilefuse does) on the same tokens and reports,
  over the seeds where bf16 makes every choice float32 makes, the RMS and the
  largest change of each margin (top-2 logit gap of a greedy step; gap of a
  router decision). `BF16_FIXTURES` requires router margins of at least three
  times the largest change seen over thousands of decisions (12 to 21 times
  the RMS) and greedy margins of 0.5 (about twenty times).
- A bf16 fixture is drawn seed after seed (each generation stops at the first
  margin below the minimum) until one has every margin above the minimum; the
  bf16 run of the chosen model must then make the same choices, and its
  largest moves are recorded in `reference.json`.
- Seeds alone cannot reach such margins with the f32 fixtures' init. A bf16
  run moves logits and router scores by a fixed fraction (about 0.5%) of their
  spread, so larger router or LM-head scales do not help: margins and moves
  grow together. Two changes do, each documented where it is made:
  1. the embedding is drawn at `N(0, 4^2)`, so each block adds an update of
     about a tenth of the residual stream (as in trained models) instead of
     compounding its own roundings into it: the moves drop to near the floor
     of one rounding of the residual stream and of the final norm;
  2. the LM head is a successor map (`successor_head`): row `next[v]` is the
     unit-norm embedding of `v` for a random cyclic permutation `next`, so the
     model predicts the successor of the current token by several logits.
     With a random head the top-2 gap of 512 near-Gaussian logits is below
     0.1 of their spread at a fifth of the steps, and the only draws whose 32
     steps all clear the bf16 moves are those whose continuation falls into a
     short cycle of 2 or 3 tokens; with the successor map every step has a
     gap of about 3 and the continuation follows the permutation, while
     attention and experts still move every logit.
  Routers keep their random weights, so each fixture has one routed layer:
  with two, no draw below 30000 (MiMo) or 40000 (Qwen) has all router margins
  above the minimum. A larger MiMo correction bias gets there by routing
  nearly every token to the same experts; the search rejects such draws, and
  repetitive continuations.

Run from the repository root (needs torch and transformers >= 5.17):

    python tools/make_fixtures.py            # all fixtures
    python tools/make_fixtures.py mimo_v2_tiny
    python tools/make_fixtures.py survey mimo_v2_tiny_bf16 [SEEDS]

The Rust build never runs this script; the committed fixtures are what the
tests read.
"""

import collections
import copy
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
# Smallest margins of the bf16 fixtures. `survey` over 200 seeds each, the
# largest change of a margin under bf16 (RMS in parentheses): greedy 2.8e-2
# (5.6e-3) for MiMo, 2.5e-2 (5.7e-3) for Qwen; router 7.1e-3 (1.4e-3) for MiMo
# in score units, 2.4e-2 (5.8e-3) for Qwen in logits. The router minimums are
# at least three times the largest change (4.3 and 3.0 times; 21 and 12 times
# the RMS); the greedy one is about twenty times, which costs nothing: the
# successor head gives every step a gap of about 3.
MIN_GREEDY_BF16 = 0.5
MIN_ROUTER_MIMO_BF16 = 0.03
MIN_ROUTER_QWEN_BF16 = 0.072
# Distinct tokens a bf16 fixture's continuation must have: the search favours
# draws whose continuation repeats a token (its router decisions repeat too, so
# fewer of them can be close), which would test less.
MIN_DISTINCT_BF16 = 24
# Likewise for routing (draws whose routers send nearly every token to the
# same experts have few close decisions): every routed layer must choose at
# least this many of its experts somewhere along the sequence, and no one set
# of experts at more than half of the positions.
MIN_EXPERTS_USED_BF16 = 6


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
    # bf16 (see BF16_FIXTURES): mimo_v2_tiny's features in 3 layers,
    # sliding/full/sliding, dense but for the middle (full) layer. One routed
    # layer, as for Qwen: with two, no draw below 30000 has all 172 router
    # margins above the minimum (with a correction bias of N(0, 0.3^2), some
    # do, by routing nearly every token to the same experts; see
    # MIN_EXPERTS_USED_BF16).
    "mimo_v2_tiny_bf16": lambda: mimo(
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "dense"],
    ),
    # bf16: qwen3_moe_tiny with norm_topk_prob true and only the middle layer
    # routed (`mlp_only_layers` [0, 2]): with two routed layers (qwen3_moe_tiny's
    # layout) no draw below 40000 has all 86 router margins above the minimum.
    "qwen3_moe_tiny_bf16": lambda: qwen(norm_topk_prob=True, mlp_only_layers=[0, 2]),
}

# The bf16 fixtures: init scales (factors on the draws of `reinit`) and the
# smallest margins required, in logits (greedy) and in the units each router
# decides in (MiMo: sigmoid score + correction bias; Qwen: router logit, which
# is what a bf16 implementation rounds).
BF16_FIXTURES = {
    "mimo_v2_tiny_bf16": {
        "scales": {"embed_tokens.weight": 4.0},
        "successor_head": True,
        "min_greedy_margin": MIN_GREEDY_BF16,
        "min_router_margin": MIN_ROUTER_MIMO_BF16,
        "router_margin_units": "sigmoid(router logit) + e_score_correction_bias",
    },
    "qwen3_moe_tiny_bf16": {
        "scales": {"embed_tokens.weight": 4.0},
        "successor_head": True,
        "min_greedy_margin": MIN_GREEDY_BF16,
        "min_router_margin": MIN_ROUTER_QWEN_BF16,
        "router_margin_units": "router logit",
    },
}
# Seeds tried for a bf16 fixture before giving up.
BF16_SEEDS = 200_000


def reinit(model, gen, scales=None):
    """Draws every parameter (and the correction-bias buffers) at order-one
    scales; `scales` multiplies the draws of the tensors whose names end with
    its keys."""
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
        for suffix, factor in (scales or {}).items():
            if name.endswith(suffix):
                v = v * factor
        new[name] = v.to(torch.float32)
    missing, unexpected = model.load_state_dict(new, strict=True)
    assert not missing and not unexpected


def round_to_bf16(model):
    """Rounds the weights and the correction biases (not the RoPE frequencies,
    which implementations compute) to bf16, keeping them in float32."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if isinstance(t, torch.nn.Parameter) or name.endswith("e_score_correction_bias"):
            t.data = t.data.to(torch.bfloat16).to(torch.float32)


def router_decisions(mod, out, qwen_logits):
    """The decisions of one router call, as `(values [T, n], k)`: the k largest
    values are chosen. MiMo: the group choice (with `n_group > 1`), then the
    experts by sigmoid score + correction bias among the kept groups (others
    -inf). Qwen: the experts by softmax probability, or by router logit when
    `qwen_logits` (the same order)."""
    logits = out[0].float()
    if type(mod).__name__ == "MiMoV2FlashTopkRouter":
        s = logits.sigmoid() + mod.e_score_correction_bias.float()
        e, g = mod.num_experts, mod.num_group
        found = []
        if g > 1:
            grp = s.view(-1, g, e // g).topk(2, dim=-1).values.sum(-1)
            if mod.topk_group < g:
                found.append((grp, mod.topk_group))
            keep = torch.topk(grp, mod.topk_group, dim=-1).indices
            mask = torch.zeros_like(grp).scatter_(1, keep, 1).bool()
            s = s.masked_fill(~mask.repeat_interleave(e // g, dim=1), float("-inf"))
        return found + [(s, mod.top_k)]
    return [(logits if qwen_logits else torch.softmax(logits, dim=-1), mod.top_k)]


ROUTERS = ("MiMoV2FlashTopkRouter", "Qwen3MoeTopKRouter")


class RouterMargins:
    """Forward hooks on the routers: the smallest gap between a chosen and the
    best rejected candidate, over top-k experts and (grouped routing) groups;
    with `keep`, every decision's values too."""

    def __init__(self, model, qwen_logits=False, keep=False):
        self.min = float("inf")
        self.qwen_logits = qwen_logits
        self.calls = [] if keep else None
        self.handles = [
            mod.register_forward_hook(self.hook) for mod in model.modules() if type(mod).__name__ in ROUTERS
        ]

    def remove(self):
        for h in self.handles:
            h.remove()

    def hook(self, mod, args, out):
        found = router_decisions(mod, out, self.qwen_logits)
        for values, k in found:
            top = torch.topk(values, k + 1, dim=-1).values
            self.min = min(self.min, float((top[:, k - 1] - top[:, k]).min()))
        if self.calls is not None:
            self.calls.append([(v.detach().clone(), k) for v, k in found])


@torch.no_grad()
def full_logits(model, ids):
    return model(torch.tensor([ids]), use_cache=False).logits[0].float()


def successor_head(model, gen):
    """Makes the LM head predict a successor of the current token: `next` is a
    random cyclic permutation of the vocabulary (one cycle through all tokens,
    so following it never repeats a token within 32 steps), and row `next[v]`
    of the head is the embedding row of `v` scaled to unit norm (the norm of an
    `N(0, 1/hidden)` row). While the embedding dominates the residual stream,
    the logit of `next[current]` stands several units above the others (which
    stay about `N(0, 1)`), and attention and experts move all of them."""
    emb = model.get_input_embeddings().weight.data
    order = torch.randperm(emb.shape[0], generator=gen)
    nxt = torch.empty_like(order)
    nxt[order] = order.roll(-1)
    head = torch.empty_like(emb)
    head[nxt] = emb / emb.norm(dim=1, keepdim=True)
    model.get_output_embeddings().weight.data = head


def draw(model, config, name, seed):
    """Draws the weights and the prompt of `seed` (for bf16 fixtures, the
    scaled draws, the successor head, then everything rounded to bf16)."""
    spec = BF16_FIXTURES.get(name)
    gen = torch.Generator().manual_seed(seed)
    reinit(model, gen, spec["scales"] if spec else None)
    prompt = torch.randint(0, config.vocab_size, (PROMPT_LEN,), generator=gen).tolist()
    if spec:
        if spec["successor_head"]:
            successor_head(model, gen)
        round_to_bf16(model)
    return prompt


def new_model(name, seed=0):
    config, cls = FIXTURES[name]()
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="eager", experts_implementation="eager")
    model.eval()
    return model, config


@torch.no_grad()
def build(name, seed):
    model, config = new_model(name, seed)
    prompt = draw(model, config, name, seed)
    margins = RouterMargins(model, qwen_logits=name in BF16_FIXTURES)
    ids = list(prompt)
    greedy_margin = float("inf")
    for _ in range(NEW_TOKENS):
        last = full_logits(model, ids)[-1]
        top2 = torch.topk(last, 2).values
        greedy_margin = min(greedy_margin, float(top2[0] - top2[1]))
        ids.append(int(torch.argmax(last)))
    logits = full_logits(model, ids[:-1])
    return model, config, prompt, ids[PROMPT_LEN:], logits, greedy_margin, margins.min


@torch.no_grad()
def router_choices(model, ids):
    """The experts each router chose at every position of one full forward of
    `ids`: `experts.layer{i}` i32 `[len(ids), top_k]`, ascending."""
    found, handles = {}, []
    for name, mod in model.named_modules():
        if type(mod).__name__ in ROUTERS:
            layer = int(name.split(".")[2])  # model.layers.{i}.mlp.gate
            hook = lambda m, a, out, layer=layer: found.__setitem__(
                f"experts.layer{layer}", out[2].sort(dim=-1).values.to(torch.int32).contiguous()
            )
            handles.append(mod.register_forward_hook(hook))
    full_logits(model, ids)
    for h in handles:
        h.remove()
    return found


@torch.no_grad()
def quick_greedy(model, margins, prompt, min_greedy=-1.0, min_router=-1.0):
    """Greedy continuation with the KV cache, stopping (None) at the first
    greedy or router margin below the minimum; for the search and `survey`."""
    margins.min = float("inf")
    out = model(torch.tensor([prompt]), use_cache=True)
    ids = list(prompt)
    for i in range(NEW_TOKENS):
        if margins.min < min_router:
            return None
        last = out.logits[0, -1].float()
        top2 = torch.topk(last, 2).values
        if float(top2[0] - top2[1]) < min_greedy:
            return None
        ids.append(int(torch.argmax(last)))
        if i + 1 < NEW_TOKENS:
            out = model(torch.tensor([ids[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return ids


def bf16_candidates(name):
    """Seeds whose weights and prompt give every margin above the bf16
    fixture's minimum (by the cached generation; `make` checks again)."""
    spec = BF16_FIXTURES[name]
    model, config = new_model(name)
    margins = RouterMargins(model, qwen_logits=True)
    for seed in range(BF16_SEEDS):
        prompt = draw(model, config, name, seed)
        ids = quick_greedy(model, margins, prompt, spec["min_greedy_margin"], spec["min_router_margin"])
        if ids and varied(ids[PROMPT_LEN:], router_choices(model, ids[:-1])):
            yield seed


def varied(greedy, choices):
    """Whether a bf16 fixture's continuation and routing are varied enough
    (MIN_DISTINCT_BF16, MIN_EXPERTS_USED_BF16)."""
    if len(set(greedy)) < MIN_DISTINCT_BF16:
        return False
    for experts in choices.values():
        sets = collections.Counter(tuple(row) for row in experts.tolist())
        if len(set(experts.flatten().tolist())) < MIN_EXPERTS_USED_BF16:
            return False
        if max(sets.values()) > len(experts) // 2:
            return False
    return True


@torch.no_grad()
def bf16_moves(model, ids):
    """Runs `ids` (prompt + greedy[:-1]) through `model` in float32 and through
    a bfloat16 copy (the RoPE frequencies kept in float32, the LM head applied
    in float32 to the bf16 final hidden state, as tilefuse computes it), and
    compares: whether bf16 makes every choice float32 makes (greedy tokens,
    router groups and experts), the relative L2 error of the logits, and the
    RMS and largest change of each margin."""
    model16 = copy.deepcopy(model)
    for mod in model16.modules():
        mod._forward_hooks.clear()
    freqs = {n: b.clone() for n, b in model16.named_buffers() if "inv_freq" in n}
    model16.to(torch.bfloat16)
    for n, b in model16.named_buffers():
        if n in freqs:
            b.data = freqs[n]
    rec16 = RouterMargins(model16, qwen_logits=True, keep=True)
    hidden = {}
    model16.model.norm.register_forward_hook(lambda m, a, o: hidden.__setitem__("h", o))
    model16(torch.tensor([ids]), use_cache=False)
    l16 = hidden["h"][0].float() @ model16.lm_head.weight.float().T
    rec32 = RouterMargins(model, qwen_logits=True, keep=True)
    l32 = full_logits(model, ids)
    rec32.remove()
    same = True
    greedy_moves, router_moves = [], []
    for r in range(PROMPT_LEN - 1, len(ids)):
        a, b = torch.topk(l32[r], 2).indices
        same &= int(torch.argmax(l16[r])) == int(a)
        greedy_moves.append(float(abs((l32[r, a] - l32[r, b]) - (l16[r, a] - l16[r, b]))))
    for c32, c16 in zip(rec32.calls, rec16.calls):
        for (v32, k), (v16, _) in zip(c32, c16):
            order = torch.argsort(v32, dim=-1, descending=True, stable=True)
            chosen, rejected = order[:, :k], order[:, k:]
            same &= torch.equal(
                torch.topk(v16, k, dim=-1).indices.sort(dim=-1).values, chosen.sort(dim=-1).values
            )
            g32 = v32.gather(1, chosen).min(-1).values - v32.gather(1, rejected).max(-1).values
            g16 = v16.gather(1, chosen).min(-1).values - v16.gather(1, rejected).max(-1).values
            finite = torch.isfinite(g32)
            router_moves += (g16 - g32)[finite].abs().tolist()
    rms = lambda xs: math.sqrt(sum(x * x for x in xs) / len(xs))
    return {
        "same_choices": bool(same),
        "logits_rel_l2": float((l16 - l32).norm() / l32.norm()),
        "greedy_move_rms": rms(greedy_moves),
        "greedy_move_max": max(greedy_moves),
        "router_move_rms": rms(router_moves),
        "router_move_max": max(router_moves),
        "router_decisions": len(router_moves),
    }


def survey(name, seeds):
    """Prints how far bf16 moves the margins on `seeds` random draws of
    fixture `name`'s model (the evidence for the bf16 minimum margins)."""
    model, config = new_model(name)
    margins = RouterMargins(model, qwen_logits=True)
    clean, flips = [], 0
    for seed in range(seeds):
        prompt = draw(model, config, name, seed)
        ids = quick_greedy(model, margins, prompt)
        m = bf16_moves(model, ids[:-1])
        if m["same_choices"]:
            clean.append(m)
        else:
            flips += 1
    print(f"{name}: {seeds} seeds, {flips} with a choice that bf16 changes; over the other {len(clean)}:")
    for what, n in (("greedy", NEW_TOKENS), ("router", None)):
        rms = math.sqrt(sum(m[f"{what}_move_rms"] ** 2 for m in clean) / len(clean))
        big = max(m[f"{what}_move_max"] for m in clean)
        count = sum(n or m["router_decisions"] for m in clean)
        print(f"  {what} margins: {count} decisions, change RMS {rms:.2e}, largest {big:.2e} ({big / rms:.1f} RMS)")
    rel = sorted(m["logits_rel_l2"] for m in clean)
    print(f"  logits relative L2 error: median {rel[len(rel) // 2]:.2e}, largest {rel[-1]:.2e}")


def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def make(name):
    spec = BF16_FIXTURES.get(name)
    if spec:
        seeds, need_greedy, need_router = bf16_candidates(name), spec["min_greedy_margin"], spec["min_router_margin"]
        limit = f"no seed below {BF16_SEEDS}"
    else:
        seeds, need_greedy, need_router = range(100), MIN_MARGIN, MIN_MARGIN
        limit = "no seed below 100"
    for seed in seeds:
        model, config, prompt, greedy, logits, gm, rm = build(name, seed)
        if gm >= need_greedy and rm >= need_router:
            if not spec:
                break
            if not varied(greedy, router_choices(model, prompt + greedy[:-1])):
                print(f"{name}: seed {seed}: the continuation or the routing repeats itself; trying the next")
                continue
            moves = bf16_moves(model, prompt + greedy[:-1])
            if moves["same_choices"]:
                break
            print(f"{name}: seed {seed}: bf16 changes a choice; trying the next")
            continue
        print(f"{name}: seed {seed} has margins greedy {gm:.2e}, router {rm:.2e}; trying the next")
    else:
        raise SystemExit(f"{name}: {limit} gives margins above greedy {need_greedy}, router {need_router}")
    out = ROOT / name
    tmp = ROOT / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if spec:
        model.to(torch.bfloat16)
    model.save_pretrained(tmp)
    # The saved checkpoint must load back to the same logits (bf16 weights in
    # float32, exactly).
    back = type(model).from_pretrained(
        tmp, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    back.eval()
    again = full_logits(back, prompt + greedy[:-1])
    assert torch.equal(again, logits), f"{name}: reloading the checkpoint changes the logits"
    tensors = {"logits": logits.contiguous()}
    if spec:
        tensors.update(router_choices(back, prompt + greedy[:-1]))
    safetensors.torch.save_file(tensors, tmp / "reference.safetensors")
    ref = {
        "name": name,
        "model_type": config.model_type,
        "seed": seed,
        "prompt_ids": prompt,
        "greedy_ids": greedy,
        "logits": "reference.safetensors: `logits` f32 [len(prompt) + len(greedy) - 1, vocab], "
        "one full forward of prompt + greedy[:-1]"
        + (
            "; `experts.layer{i}` i32 [same rows, top_k], the experts router i chose, ascending"
            if spec
            else ""
        ),
        "min_greedy_margin": gm,
        "min_router_margin": rm,
        "dtype": "float32",
        "attn_implementation": "eager",
        "experts_implementation": "eager",
        "versions": versions(),
    }
    if spec:
        ref["weights_dtype"] = "bfloat16"
        ref["init_scales"] = spec["scales"]
        if spec["successor_head"]:
            ref["lm_head"] = (
                "successor map: row next[v] = embedding[v] / |embedding[v]|, next a random cyclic permutation"
            )
        ref["router_margin_units"] = spec["router_margin_units"]
        ref["required_margins"] = {"greedy": need_greedy, "router": need_router}
        ref["bf16_run"] = moves
    (tmp / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name}: seed {seed}, margins greedy {gm:.3e} router {rm:.3e}, {size / 1024:.0f} KiB")


def main():
    # The models are tiny: one thread is the fastest, and the results do not
    # depend on the machine's core count.
    torch.set_num_threads(1)
    args = sys.argv[1:]
    if args[:1] == ["survey"]:
        if len(args) not in (2, 3) or args[1] not in BF16_FIXTURES:
            raise SystemExit(f"usage: survey NAME [SEEDS], NAME one of {', '.join(BF16_FIXTURES)}")
        survey(args[1], int(args[2]) if len(args) == 3 else 200)
        return
    names = args or list(FIXTURES)
    for n in names:
        if n not in FIXTURES:
            raise SystemExit(f"unknown fixture {n}; known: {', '.join(FIXTURES)}")
    ROOT.mkdir(parents=True, exist_ok=True)
    for n in names:
        make(n)
    (ROOT / "VERSIONS.json").write_text(json.dumps(versions(), indent=1) + "\n")


if __name__ == "__main__":
    main()
