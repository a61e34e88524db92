"""The DFlash block-diffusion drafter: model, training, acceptance and the
z-lab checkpoint layout.

The model is exactly the draft graph of tilefuse (`model/src/dflash.rs`) and
of z-lab's `DFlashDraftModel`:

- context `ctx = hidden_norm(fc(features))`, where `features` concatenates
  the outputs of target decoder layers `target_layer_ids` (the residual
  stream after those layers, Hugging Face `hidden_states[id + 1]`);
- the block `[last committed token, <|mask|> x (B - 1)]` is embedded with the
  target's `model.embed_tokens.weight` (shared, frozen);
- each Qwen3-style layer takes q from the block only
  (`q_norm`, RoPE at the block positions) and k/v from `[ctx ; block]`
  (context rows are not passed through the layer's input norm; `k_norm` and
  RoPE at their absolute positions apply to both); the attention is
  non-causal: a block query sees the whole context before the block and
  the whole block; full-width rotate-half RoPE with the drafter's own theta;
  a dense SwiGLU MLP; pre-norm residuals;
- a final `norm` and the target's `lm_head` (shared, frozen); output row
  `j >= 1` predicts the token at block position `j`.

Training (DFlash paper, REFERENCE.md section 3): every step runs the frozen
target over a batch of windows to get its context features and its greedy
predictions, then trains the drafter on many random anchors per window at
once. Queries are all anchors' blocks, keys are `[the window's context rows ;
all blocks]`, and a block-sparse mask lets the block of anchor `a` see
context positions `< a` and its own block only. Block position `j` is weighted
by `exp(-(j - 1) / gamma)`.

Labels: the target's greedy predictions (argmax of its logits) at the
positions before each block token, computed in the same step. The first
drafted token's label is then exactly the token greedy verification accepts;
later ones are the target's choices given the text (teacher forcing), which
equal the accepted chain wherever the target agrees with the text. Training
on target predictions rather than corpus tokens teaches the drafter the
target's own habits, which is what verification rewards.
"""

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import Budget, cosine_lr, param_groups


@dataclass
class DraftSpec:
    """Sizes of the drafter and of its training."""

    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    block_size: int
    seq_len: int
    batch_size: int
    anchors_per_seq: int
    lr: float
    gamma: float = 4.0  # loss decay over block positions (4 for B = 8)
    rms_norm_eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 50


FULL = DraftSpec(
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    intermediate_size=768, rope_theta=10_000.0, block_size=8, seq_len=512, batch_size=32,
    anchors_per_seq=64, lr=1e-3,
)

TINY = DraftSpec(
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=128, rope_theta=10_000.0, block_size=8, seq_len=64, batch_size=8,
    anchors_per_seq=8, lr=2e-3, warmup_steps=10,
)


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list:
    """tilefuse's `dflash::build_target_layer_ids` (the reference's default):
    one layer gives `[N / 2]`, else ids evenly spaced over `[1, N - 3]`
    (rounded half away from zero, as Rust's `f64::round`)."""
    n, big_n = num_draft_layers, num_target_layers
    if n <= 1:
        return [big_n // 2]
    return [max(int(math.floor(1 + i * (big_n - 4) / (n - 1) + 0.5)), 0) for i in range(n)]


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm: normalise in f32, back to the input dtype, times the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE over the full head width. `x [B, L, heads, d]`,
    `pos [B, L]` absolute positions."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angle = pos.to(torch.float32)[..., None] * inv_freq  # [B, L, d/2]
    cos = angle.cos()[:, :, None, :].to(x.dtype)
    sin = angle.sin()[:, :, None, :].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, hidden: int, spec: DraftSpec):
        super().__init__()
        nh, kvh, d = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        self.nh, self.kvh, self.d, self.theta = nh, kvh, d, spec.rope_theta
        self.q_proj = nn.Linear(hidden, nh * d, bias=False)
        self.k_proj = nn.Linear(hidden, kvh * d, bias=False)
        self.v_proj = nn.Linear(hidden, kvh * d, bias=False)
        self.o_proj = nn.Linear(nh * d, hidden, bias=False)
        self.q_norm = RMSNorm(d, spec.rms_norm_eps)
        self.k_norm = RMSNorm(d, spec.rms_norm_eps)

    def forward(self, h, ctx, pos, ctx_pos, mask):
        """`h [B, Q, H]` normed block rows, `ctx [B, C, H]` projected context,
        `mask [B, 1, Q, C + Q]` (True = visible)."""
        B, Q, _ = h.shape
        C = ctx.shape[1]
        d = self.d
        q = rope(self.q_norm(self.q_proj(h).view(B, Q, self.nh, d)), pos, self.theta)
        kb = rope(self.k_norm(self.k_proj(h).view(B, Q, self.kvh, d)), pos, self.theta)
        vb = self.v_proj(h).view(B, Q, self.kvh, d)
        kc = rope(self.k_norm(self.k_proj(ctx).view(B, C, self.kvh, d)), ctx_pos, self.theta)
        vc = self.v_proj(ctx).view(B, C, self.kvh, d)
        k = torch.cat([kc, kb], dim=1).transpose(1, 2)
        v = torch.cat([vc, vb], dim=1).transpose(1, 2)
        groups = self.nh // self.kvh  # query head h reads kv head h // groups
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=d ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, Q, self.nh * d))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, hidden: int, spec: DraftSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, spec.rms_norm_eps)
        self.self_attn = Attention(hidden, spec)
        self.mlp = MLP(hidden, spec.intermediate_size)

    def forward(self, x, ctx, pos, ctx_pos, mask):
        x = x + self.self_attn(self.input_layernorm(x), ctx, pos, ctx_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(nn.Module):
    """The drafter's own weights (parameter names are the checkpoint's).
    The target's embedding and LM head are passed to `forward`, never owned."""

    def __init__(self, hidden: int, num_features: int, spec: DraftSpec):
        super().__init__()
        self.fc = nn.Linear(num_features * hidden, hidden, bias=False)
        self.hidden_norm = RMSNorm(hidden, spec.rms_norm_eps)
        self.layers = nn.ModuleList([Layer(hidden, spec) for _ in range(spec.num_hidden_layers)])
        self.norm = RMSNorm(hidden, spec.rms_norm_eps)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, block_ids, block_pos, features, ctx_pos, mask, embed_weight):
        """Final-normed hidden states `[B, Q, H]` of the block rows.
        `block_ids`, `block_pos [B, Q]`; `features [B, C, k*H]`;
        `ctx_pos [B, C]`; `mask [B, 1, Q, C + Q]`."""
        ctx = self.hidden_norm(self.fc(features))
        x = F.embedding(block_ids, embed_weight)
        for layer in self.layers:
            x = layer(x, ctx, block_pos, ctx_pos, mask)
        return self.norm(x)


class FeatureTap:
    """Forward hooks that keep the outputs of the chosen target layers."""

    def __init__(self, target, layer_ids):
        self.layer_ids = list(layer_ids)
        self.out = {}
        layers = target.model.layers
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in set(self.layer_ids)]

    def _hook(self, i):
        def hook(module, args, output):
            self.out[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def features(self):
        feats = torch.cat([self.out[i] for i in self.layer_ids], dim=-1)
        self.out = {}
        return feats

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def target_pass(target, tap: FeatureTap, tokens: torch.Tensor):
    """The target's context features `[B, T, k*H]` and greedy predictions
    `[B, T]` (entry `p` is its choice for position `p + 1`)."""
    logits = target(input_ids=tokens).logits
    return tap.features(), logits.argmax(dim=-1)


def block_inputs(tokens, anchors, block_size: int, mask_id: int):
    """Ids and positions of the blocks of `anchors [B, m]` in `tokens [B, T]`:
    `[tokens[a], mask, ..., mask]` at positions `a .. a + B - 1`, flattened to
    `[B, m * B]`."""
    Bsz, m = anchors.shape
    j = torch.arange(block_size, device=tokens.device)
    pos = anchors[:, :, None] + j  # [B, m, Bk]
    ids = torch.full_like(pos, mask_id)
    ids[:, :, 0] = torch.gather(tokens, 1, anchors)
    return ids.reshape(Bsz, -1), pos.reshape(Bsz, -1)


def block_mask(anchors, ctx_len: int, block_size: int):
    """`[B, 1, m * Bk, ctx_len + m * Bk]`: a query of the block of anchor `a`
    sees context positions `< a` and every position of its own block."""
    Bsz, m = anchors.shape
    dev = anchors.device
    q_anchor = anchors.repeat_interleave(block_size, dim=1)  # [B, m*Bk]
    ctx_vis = torch.arange(ctx_len, device=dev)[None, None, :] < q_anchor[:, :, None]
    blk = torch.arange(m, device=dev).repeat_interleave(block_size)
    own = (blk[:, None] == blk[None, :]).expand(Bsz, -1, -1)
    return torch.cat([ctx_vis, own], dim=-1)[:, None]


def draft_logits_for_anchors(drafter, features, tokens, anchors, block_size, mask_id, embed_w, head_w):
    """Draft logits `[B, m, Bk - 1, V]` of the blocks at `anchors [B, m]`
    (rows `j = 1 .. Bk - 1`), with the whole `features [B, T, k*H]` as
    context under the block-sparse mask."""
    Bsz, T = tokens.shape
    ids, pos = block_inputs(tokens, anchors, block_size, mask_id)
    ctx_pos = torch.arange(T, device=tokens.device)[None].expand(Bsz, -1)
    mask = block_mask(anchors, T, block_size)
    h = drafter(ids, pos, features, ctx_pos, mask, embed_w)
    h = h.view(Bsz, anchors.shape[1], block_size, -1)[:, :, 1:]
    return F.linear(h, head_w)


def sample_anchors(gen, batch: int, seq_len: int, block_size: int, count: int, device):
    """`count` distinct random anchors per row in `[1, seq_len - block_size + 1]`
    (every block then has a label at each position), sorted."""
    hi = seq_len - block_size + 1  # largest anchor
    count = min(count, hi)
    keys = torch.rand(batch, hi, generator=gen)
    anchors = keys.argsort(dim=1)[:, :count] + 1
    return anchors.sort(dim=1).values.to(device)


def train_drafter(drafter, target, stream, spec: DraftSpec, layer_ids, mask_id, minutes, device,
                  seed, log, autocast) -> dict:
    """Trains the drafter for `minutes` of wall clock (see the module docs)."""
    embed_w = target.model.embed_tokens.weight.detach()
    head_w = target.lm_head.weight.detach()
    tap = FeatureTap(target, layer_ids)
    opt = torch.optim.AdamW(param_groups(drafter, spec.weight_decay), lr=spec.lr, betas=(0.9, 0.95),
                            fused=device.startswith("cuda"))
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    T, B, Bk = spec.seq_len, spec.batch_size, spec.block_size
    weights = torch.exp(-torch.arange(Bk - 1, device=device, dtype=torch.float32) / spec.gamma)
    n = stream.numel() - T
    offsets = torch.arange(T, device=device)
    budget = Budget(minutes * 60)
    drafter.train()
    step, ema, acc1 = 0, None, float("nan")
    t_log = time.monotonic()
    log(f"drafter: training for {minutes:.2f} min, batch {B} x {T} tokens, "
        f"{spec.anchors_per_seq} anchors per window, block {Bk}, gamma {spec.gamma}")
    while not budget.done():
        lr = cosine_lr(spec.lr, step, spec.warmup_steps, budget.fraction())
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n, (B,), generator=gen).to(device)
        tokens = stream[starts[:, None] + offsets]
        with autocast():
            feats, greedy = target_pass(target, tap, tokens)
        anchors = sample_anchors(gen, B, T, Bk, spec.anchors_per_seq, device)
        # Label of block position j (anchor a): the target's choice for a + j,
        # which it makes at position a + j - 1.
        lab_pos = anchors[:, :, None] + torch.arange(1, Bk, device=device) - 1
        labels = torch.gather(greedy, 1, lab_pos.reshape(B, -1)).view(B, -1, Bk - 1)
        with autocast():
            logits = draft_logits_for_anchors(drafter, feats.detach(), tokens, anchors, Bk, mask_id,
                                              embed_w, head_w)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             reduction="none").view(labels.shape)
        loss = (ce * weights).sum(-1).mean() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        step += 1
        if step == 1 or step % 50 == 0:
            with torch.no_grad():
                hit = (logits.argmax(-1) == labels).float()
                acc1 = float(hit[..., 0].mean())
                run = float(hit.cumprod(-1).sum(-1).mean()) + 1
            value = loss.item()
            ema = value if ema is None else 0.8 * ema + 0.2 * value
            now = time.monotonic()
            log(f"drafter step {step:5d}  loss {value:.4f} (ema {ema:.4f})  lr {lr:.2e}  "
                f"grad {float(gnorm):.2f}  top1@1 {acc1:.3f}  accepted run {run:.2f}  "
                f"{(now - t_log):.1f}s")
            t_log = now
    tap.remove()
    drafter.eval()
    final = loss.item() if step else float("nan")
    log(f"drafter: {step} steps in {budget.elapsed():.0f} s, last loss {final:.4f}")
    return {"steps": step, "seconds": round(budget.elapsed(), 1), "last_loss": final,
            "last_top1_first_position": acc1}


@torch.no_grad()
def greedy_generate(target, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation with the KV cache: `[n, P]` -> `[n, P + new_tokens]`."""
    out = target(input_ids=prompts, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    seq = [prompts, nxt]
    for _ in range(new_tokens - 1):
        out = target(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        seq.append(nxt)
    return torch.cat(seq, dim=1)


@torch.no_grad()
def acceptance(drafter, target, stream, layer_ids, mask_id, block_size, device, prompts=32,
               prompt_len=64, new_tokens=96) -> dict:
    """Greedy acceptance of the drafter on held-out text, in f32.

    `prompts` windows of `prompt_len` held-out tokens are continued greedily
    by the target for `new_tokens` tokens. Along that continuation the greedy
    chain is the text itself, so at every anchor `a` (the last committed
    token, its context all positions before it) the drafts that greedy
    verification accepts are the leading block positions whose argmax equals
    the text. `tau` follows the decode as the engine would (start at the first
    generated token, advance by accepted + 1, the bonus included);
    `mean_accepted_all_anchors` averages `1 + accepted` over every anchor."""
    n = stream.numel()
    starts = [i * (n - prompt_len - 1) // prompts for i in range(prompts)]
    prompt = torch.stack([stream[s: s + prompt_len] for s in starts]).to(device)
    seq = greedy_generate(target, prompt, new_tokens)
    tap = FeatureTap(target, layer_ids)
    feats, greedy = target_pass(target, tap, seq)
    tap.remove()
    total = seq.shape[1]
    # The full forward must agree with the cached decode that made the text.
    agree = float((greedy[:, prompt_len - 1: total - 1] == seq[:, prompt_len:]).float().mean())
    anchors = torch.arange(prompt_len, total - block_size + 1, device=device)[None].expand(len(starts), -1)
    logits = draft_logits_for_anchors(drafter, feats, seq, anchors, block_size, mask_id,
                                      target.model.embed_tokens.weight, target.lm_head.weight)
    j = torch.arange(1, block_size, device=device)
    truth = torch.gather(seq, 1, (anchors[:, :, None] + j).reshape(len(starts), -1)).view(logits.shape[:-1])
    match = (logits.argmax(-1) == truth).long().cumprod(-1)  # [n, m, Bk-1]
    accepted = match.sum(-1)  # [n, m]
    steps = tokens = 0
    for row in accepted.tolist():
        a = 0
        while a < len(row):
            tau = row[a] + 1
            steps += 1
            tokens += tau
            a += tau
    return {
        "block_size": block_size,
        "prompts": len(starts),
        "prompt_tokens": prompt_len,
        "generated_tokens": new_tokens,
        "tau": round(tokens / max(steps, 1), 3),
        "mean_accepted_all_anchors": round(float(accepted.float().mean()) + 1, 3),
        "accept_rate_by_position": [round(float(x), 3) for x in match.float().mean((0, 1))],
        "cached_vs_full_forward_agreement": round(agree, 4),
    }


def config_json(spec: DraftSpec, hidden: int, vocab: int, num_target_layers: int, layer_ids,
                mask_id: int, max_position_embeddings: int) -> dict:
    """The z-lab style `config.json` that tilefuse's `DraftConfig::from_hf_json` reads."""
    return {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "max_position_embeddings": max_position_embeddings,
        "attention_bias": False,
        "layer_types": ["full_attention"] * spec.num_hidden_layers,
        "sliding_window": None,
        "use_sliding_window": False,
        "is_causal": False,
        "tie_word_embeddings": False,
        "vocab_size": vocab,
        "num_target_layers": num_target_layers,
        "block_size": spec.block_size,
        "dtype": "bfloat16",
        "dflash_config": {"mask_token_id": mask_id, "target_layer_ids": list(layer_ids)},
    }


def save_drafter(drafter, config: dict, out: Path, card: str) -> None:
    """`config.json` and `model.safetensors` (bf16, no embedding or LM head)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in drafter.state_dict().items()}
    safetensors.torch.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(card, encoding="utf-8")


def load_drafter(folder: Path, device: str = "cpu", dtype=torch.float32):
    """A saved drafter and its config (for checks and evaluation)."""
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    spec = DraftSpec(
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"],
        intermediate_size=cfg["intermediate_size"], rope_theta=cfg["rope_theta"],
        block_size=cfg["block_size"], seq_len=0, batch_size=0, anchors_per_seq=0, lr=0.0,
        rms_norm_eps=cfg["rms_norm_eps"])
    layer_ids = cfg["dflash_config"]["target_layer_ids"]
    model = DFlashDrafter(cfg["hidden_size"], len(layer_ids), spec)
    state = safetensors.torch.load_file(str(folder / "model.safetensors"))
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval(), cfg


def spec_dict(spec: DraftSpec) -> dict:
    return asdict(spec)
