"""The target: a small MiMo-V2 (transformers' `MiMoV2FlashForCausalLM`,
`model_type` `mimo_v2_flash`) trained from scratch on the corpus.

The architecture keeps every MiMo-V2 feature at a small width: full and
sliding-window layers (full at layer 0 and every sixth layer, as MiMo-V2),
twice the KV heads and a learned attention sink per head on the sliding
layers, q/k head dim larger than the v head dim, partial RoPE (0.334 of the
q/k head dim) with theta 5e6 (full) and 1e4 (sliding), the value scale, a
dense first layer and sigmoid-routed experts (top-k of the scores plus a
correction bias, weights renormalised) in the others.

Training: AdamW, bf16 autocast on CUDA (parameters in f32), a cosine learning
rate over the wall-clock budget, random windows of the token stream. The
corpus is small (about 2 M tokens) and the budget sees it many times over, so
training adds dropout to every attention and MLP output (forward hooks; the
model and its config are unchanged) and keeps the weights of the best
validation loss (validation files are neither trained on nor held out). The
experts are balanced without an auxiliary loss, as DeepSeek-V3 and MiMo-V2:
after each step every router's `e_score_correction_bias` moves by
`BIAS_RATE` towards equal load (up for under-used experts, down for
over-used ones); the bias is saved with the checkpoint and used at inference.
"""

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM, PreTrainedTokenizerFast

from common import Budget, cosine_lr, param_groups

BIAS_RATE = 1e-3


@dataclass
class TargetSpec:
    """Sizes of the target and of its training."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # full layers; sliding layers get twice this
    head_dim: int  # q and k; int(head_dim * 0.334) rotated dims must be even
    v_head_dim: int
    intermediate_size: int  # the dense first layer
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    sliding_window: int
    max_position_embeddings: int
    vocab_size: int  # of the tokenizer to train
    seq_len: int
    batch_size: int
    lr: float
    weight_decay: float = 0.1
    warmup_steps: int = 100
    dropout: float = 0.0  # on every attention and MLP output, training only
    valid_every_s: float = 20.0  # seconds between validation passes


# The model the project ships: about 6.8 M parameters (13.7 MB in bf16).
FULL = TargetSpec(
    hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=1,
    head_dim=48, v_head_dim=32, intermediate_size=768, n_routed_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=96, sliding_window=128,
    max_position_embeddings=2048, vocab_size=4096, seq_len=512, batch_size=32, lr=2e-3,
    dropout=0.2,
)

# --tiny: the same structure at toy width, for end-to-end tests on a CPU.
TINY = TargetSpec(
    hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
    head_dim=24, v_head_dim=16, intermediate_size=128, n_routed_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=32, sliding_window=16,
    max_position_embeddings=256, vocab_size=512, seq_len=64, batch_size=8, lr=3e-3,
    warmup_steps=10, valid_every_s=10.0,
)


def layer_types(n: int) -> list:
    """MiMo-V2's pattern: full attention at layer 0 and every sixth layer."""
    return ["full_attention" if i == 0 or (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]


def make_config(spec: TargetSpec, vocab_size: int, eos_id: int) -> MiMoV2FlashConfig:
    """The transformers config. Only fields that tilefuse's loader accepts:
    no attention biases, sinks on sliding layers only, no RoPE scaling."""
    rotary = int(spec.head_dim * 0.334)
    if rotary % 2:
        raise ValueError(f"head_dim {spec.head_dim} rotates {rotary} dims; pick one that rotates an even number")
    n = spec.num_hidden_layers
    return MiMoV2FlashConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        v_head_dim=spec.v_head_dim,
        hidden_act="silu",
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        attention_value_scale=0.707,
        layer_types=layer_types(n),
        mlp_layer_types=["dense"] + ["sparse"] * (n - 1),
        sliding_window=spec.sliding_window,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.334},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.334},
        },
        n_routed_experts=spec.n_routed_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        moe_intermediate_size=spec.moe_intermediate_size,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def build_model(config: MiMoV2FlashConfig, device: str, experts: str) -> MiMoV2FlashForCausalLM:
    """A freshly initialised model (transformers' init: N(0, 0.02) matrices),
    f32 parameters, eager attention (the only one with sinks)."""
    model = MiMoV2FlashForCausalLM._from_config(
        config, attn_implementation="eager", experts_implementation=experts)
    return model.to(device=device, dtype=torch.float32)


def routers(model):
    return [m for m in model.modules() if type(m).__name__ == "MiMoV2FlashTopkRouter"]


class ExpertLoad:
    """Counts the tokens routed to each expert of every router (forward hooks)
    and applies the auxiliary-loss-free bias update."""

    def __init__(self, model):
        self.routers = routers(model)
        self.counts = [None] * len(self.routers)
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i):
        def hook(module, args, out):
            if module.training:
                idx = out[2].reshape(-1)
                self.counts[i] = torch.bincount(idx, minlength=module.num_experts).float()
        return hook

    @torch.no_grad()
    def update_bias(self, rate: float) -> float:
        """Moves each bias towards equal load; returns the worst max/mean load."""
        worst = 0.0
        for r, c in zip(self.routers, self.counts):
            if c is None:
                continue
            mean = c.mean()
            r.e_score_correction_bias += rate * torch.sign(mean - c)
            worst = max(worst, float((c.max() / mean.clamp(min=1)).item()))
        self.counts = [None] * len(self.routers)
        return worst

    def remove(self):
        for h in self.handles:
            h.remove()


class ResidualDropout:
    """Dropout on the output of every attention and MLP block while training
    (forward hooks, so transformers' model is used unchanged)."""

    def __init__(self, model, p: float):
        self.handles = []
        if p <= 0:
            return
        for layer in model.model.layers:
            self.handles.append(layer.self_attn.register_forward_hook(self._attn(p)))
            self.handles.append(layer.mlp.register_forward_hook(self._mlp(p)))

    @staticmethod
    def _attn(p):
        def hook(module, args, out):
            return (F.dropout(out[0], p, module.training),) + tuple(out[1:])
        return hook

    @staticmethod
    def _mlp(p):
        def hook(module, args, out):
            return F.dropout(out, p, module.training)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def autocast(device: str):
    """bf16 autocast on CUDA; plain f32 on the CPU."""
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch `[B, T + 1]`."""
    logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train_target(model, stream: torch.Tensor, spec: TargetSpec, minutes: float, device: str,
                 seed: int, log, valid: torch.Tensor) -> dict:
    """Trains for `minutes` of wall clock on random windows of `stream`
    (int64 on `device`), validating on `valid` (int64, CPU) every
    `spec.valid_every_s` seconds and at the end; leaves the model with the
    weights of the best validation loss. Returns training statistics."""
    opt = torch.optim.AdamW(
        param_groups(model, spec.weight_decay, no_decay_names=("embed_tokens",)),
        lr=spec.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.startswith("cuda"))
    load = ExpertLoad(model)
    drop = ResidualDropout(model, spec.dropout)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    T, B = spec.seq_len, spec.batch_size
    n = stream.numel() - T - 1
    offsets = torch.arange(T + 1, device=device)
    budget = Budget(minutes * 60)
    step, tokens_seen, ema, imbalance, loss = 0, 0, None, 0.0, None
    t_log, tok_log = time.monotonic(), 0
    best = {"loss": math.inf, "step": 0, "state": None}
    curve = []

    def validate():
        v = evaluate(model, valid, T, B, None, device, autocast_bf16=True)["heldout_loss"]
        curve.append([step, round(budget.elapsed(), 1), v])
        mark = ""
        if v < best["loss"]:
            best.update(loss=v, step=step,
                        state={k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()})
            mark = " (best)"
        log(f"target step {step:5d}  validation loss {v:.4f}{mark}")
        model.train()

    model.train()
    t_valid = time.monotonic()
    log(f"target: training for {minutes:.2f} min, batch {B} x {T} tokens, peak lr {spec.lr}, "
        f"dropout {spec.dropout}")
    while not budget.done():
        lr = cosine_lr(spec.lr, step, spec.warmup_steps, budget.fraction())
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n, (B,), generator=gen).to(device)
        batch = stream[starts[:, None] + offsets]
        with autocast(device):
            loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        imbalance = load.update_bias(BIAS_RATE)
        step += 1
        tokens_seen += B * T
        if step == 1 or step % 50 == 0:
            value = loss.item()
            ema = value if ema is None else 0.8 * ema + 0.2 * value
            now = time.monotonic()
            rate = (tokens_seen - tok_log) / max(now - t_log, 1e-9)
            t_log, tok_log = now, tokens_seen
            log(f"target step {step:5d}  loss {value:.4f} (ema {ema:.4f})  lr {lr:.2e}  "
                f"grad {float(gnorm):.2f}  expert load max/mean {imbalance:.2f}  {rate / 1e3:.0f}k tok/s")
        if time.monotonic() - t_valid >= spec.valid_every_s:
            validate()
            t_valid = time.monotonic()
    load.remove()
    drop.remove()
    final = loss.item() if loss is not None else float("nan")
    if not curve or curve[-1][0] != step:
        validate()
    model.eval()
    if best["step"] != step:
        model.load_state_dict(best["state"])
        log(f"target: keeping the weights of step {best['step']} (validation loss {best['loss']:.4f})")
    log(f"target: {step} steps, {tokens_seen / 1e6:.1f} M tokens "
        f"({tokens_seen / max(stream.numel(), 1):.1f} epochs) in {budget.elapsed():.0f} s, last loss {final:.4f}")
    return {"steps": step, "tokens": tokens_seen, "epochs": round(tokens_seen / max(stream.numel(), 1), 2),
            "seconds": round(budget.elapsed(), 1), "last_train_loss": round(final, 4),
            "kept_step": best["step"], "best_validation_loss": best["loss"],
            "validation_curve": curve, "expert_load_max_over_mean": round(imbalance, 3)}


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, batch_size: int, byte_lengths: torch.Tensor,
             device: str, autocast_bf16: bool = False) -> dict:
    """Held-out perplexity: the stream cut into consecutive windows of
    `seq_len + 1` tokens, each scoring its last `seq_len` tokens (so every
    token but the first of a window is predicted once). Also bits per byte
    of the predicted tokens' text (special tokens count zero bytes)."""
    model.eval()
    n = (stream.numel() - 1) // seq_len
    if n == 0:
        raise ValueError("the held-out stream is shorter than one window")
    windows = torch.stack([stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    for i in range(0, n, batch_size):
        batch = windows[i: i + batch_size].to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                            enabled=autocast_bf16 and device.startswith("cuda")):
            logits = model(input_ids=batch[:, :-1]).logits
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
        if byte_lengths is not None:
            total_bytes += int(byte_lengths[batch[:, 1:].cpu()].sum())
    mean = total_nll / total_tokens
    return {
        "heldout_tokens": total_tokens,
        "heldout_loss": round(mean, 4),
        "heldout_perplexity": round(math.exp(mean), 3),
        "heldout_bits_per_byte": round(total_nll / math.log(2) / max(total_bytes, 1), 4),
    }


def hf_tokenizer(tok, eos: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)


def save_target(model, tok, eos: str, out: Path, card: str) -> None:
    """Writes the checkpoint folder: config.json, model.safetensors (bf16),
    generation_config.json, tokenizer.json (+ tokenizer_config.json) and a
    model card. `model` is converted to bf16 in place."""
    model.to(torch.bfloat16)
    for r in routers(model):  # the correction bias stays f32, as transformers keeps it
        r.e_score_correction_bias.data = r.e_score_correction_bias.data.float()
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    hf_tokenizer(tok, eos).save_pretrained(out)
    # The plain tokenizers file, as the `tokenizers` library itself writes it.
    tok.save(str(out / "tokenizer.json"))
    (out / "README.md").write_text(card, encoding="utf-8")


def spec_dict(spec: TargetSpec) -> dict:
    return asdict(spec)
