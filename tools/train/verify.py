#!/usr/bin/env python3
"""Checks a trained pair (the output folder of train.py) against tilefuse, on
the CPU in f32.

    python tools/train/verify.py --out DIR [--tilefuse BIN] [--prompt TEXT] [--max-tokens N]

1. Greedy tokens: transformers' greedy continuation of the prompt (f32, KV
   cache) must equal `tilefuse generate --model DIR/target --backend cpu
   --dtype f32 --prompt-ids ...` token for token. The smallest gap between
   the two best logits along the way is printed: a gap near zero would make a
   disagreement a rounding question, not a bug.
2. Drafter: the PyTorch drafter's logits for one block (context = the prompt
   and its continuation, block = the next committed token and 7 masks) are
   written to DIR/draft_check/reference.safetensors with the target's context
   features and logits; the Rust program in `draft_check/` then runs
   tilefuse's own target graph (with context features) and draft graph on the
   reference interpreter and compares (features, target logits, draft logits
   with the PyTorch features and with tilefuse's, and every row's argmax).
   Before that, the drafter's training forward (many anchors under one
   block-sparse mask) is checked against one block at a time.

BIN defaults to `cargo run --release --` in the repository. The Rust check is
built with `cargo run --release --manifest-path tools/train/draft_check/Cargo.toml`
(its own target folder); `--no-rust` skips it.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
import transformers
from transformers import MiMoV2FlashForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

import drafter as drafter_mod  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHECK = Path(__file__).resolve().parent / "draft_check"


def tilefuse_cmd(binary):
    if binary:
        return [binary]
    return ["cargo", "run", "--release", "--quiet", "--manifest-path", str(REPO / "Cargo.toml"), "--"]


@torch.no_grad()
def hf_greedy(model, ids: list, n: int):
    """Greedy ids and the smallest top-1/top-2 logit gap."""
    seq = drafter_mod.greedy_generate(model, torch.tensor([ids]), n)[0, len(ids):].tolist()
    logits = model(input_ids=torch.tensor([ids + seq[:-1]])).logits[0, len(ids) - 1:]
    top = logits.topk(2, dim=-1).values
    return seq, float((top[:, 0] - top[:, 1]).min())


def check_greedy(args, model, tok, eos: set) -> bool:
    ids = tok.encode(args.prompt).ids
    hf, gap = hf_greedy(model, ids, args.max_tokens)
    cmd = tilefuse_cmd(args.tilefuse) + [
        "generate", "--model", str(args.out / "target"), "--backend", "cpu", "--dtype", "f32",
        "--prompt-ids", ",".join(map(str, ids)), "--max-tokens", str(args.max_tokens), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"greedy: tilefuse failed ({res.returncode}):\n{res.stderr.strip()}")
        return False
    tf = json.loads(res.stdout.strip().splitlines()[-1])["generated_ids"]
    # tilefuse stops after an end-of-sequence token; transformers was run to the end.
    same = tf == hf[: len(tf)] and (len(tf) == len(hf) or tf[-1] in eos)
    print(f"greedy: prompt {args.prompt!r} = {ids}")
    print(f"  transformers {hf}")
    print(f"  tilefuse     {tf}")
    print(f"  text {tok.decode(tf)!r}; smallest top-2 logit gap {gap:.4f}")
    print(f"greedy: {'PASS' if same else 'FAIL'} ({len(tf)} tokens)")
    return same


@torch.no_grad()
def write_draft_reference(args, model, tok) -> Path:
    """One block's draft logits, with the inputs that produce them."""
    drafter, cfg = drafter_mod.load_drafter(args.out / "drafter")
    block = cfg["block_size"]
    mask_id = cfg["dflash_config"]["mask_token_id"]
    layer_ids = cfg["dflash_config"]["target_layer_ids"]
    ids = tok.encode(args.prompt).ids
    seq = drafter_mod.greedy_generate(model, torch.tensor([ids]), args.context - len(ids) + 1)[0]
    ctx, last = seq[: args.context], seq[args.context]
    tap = drafter_mod.FeatureTap(model, layer_ids)
    target_logits = model(input_ids=ctx[None]).logits[0]
    feats = tap.features()
    tap.remove()
    c = ctx.numel()
    block_ids = torch.full((1, block), mask_id)
    block_ids[0, 0] = last
    block_pos = torch.arange(c, c + block)[None]
    mask = torch.ones(1, 1, block, c + block, dtype=torch.bool)
    h = drafter(block_ids, block_pos, feats, torch.arange(c)[None], mask, model.model.embed_tokens.weight)
    logits = F.linear(h, model.lm_head.weight)[0]
    check_multi_anchor(drafter, feats, ctx, block, mask_id, model)
    folder = args.out / "draft_check"
    folder.mkdir(exist_ok=True)
    path = folder / "reference.safetensors"
    safetensors.torch.save_file({
        "context_ids": ctx.to(torch.int32).contiguous(),
        "block_ids": block_ids[0].to(torch.int32).contiguous(),
        "block_pos": block_pos[0].to(torch.int32).contiguous(),
        "features": feats[0].float().contiguous(),
        "target_logits": target_logits.float().contiguous(),
        "logits": logits.float().contiguous(),
    }, str(path))
    print(f"drafter: reference block at position {c} (context {c} tokens) written to {path}; "
          f"PyTorch drafts {logits[1:].argmax(-1).tolist()}")
    return path


@torch.no_grad()
def check_multi_anchor(drafter, feats, ctx, block, mask_id, model) -> None:
    """The training forward (many anchors under one block-sparse mask) must
    equal one block at a time with only the context before its anchor."""
    c = ctx.numel()
    anchors = torch.tensor([[max(1, c // 4), c // 2, c - 1]])
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    many = drafter_mod.draft_logits_for_anchors(drafter, feats, ctx[None], anchors, block, mask_id, emb, head)
    worst = 0.0
    for i, a in enumerate(anchors[0].tolist()):
        ids = torch.full((1, block), mask_id)
        ids[0, 0] = ctx[a]
        pos = torch.arange(a, a + block)[None]
        mask = torch.ones(1, 1, block, a + block, dtype=torch.bool)
        h = drafter(ids, pos, feats[:, :a], torch.arange(a)[None], mask, emb)
        one = F.linear(h, head)[0, 1:]
        worst = max(worst, float((one - many[0, i]).abs().max()))
    print(f"drafter: training forward (anchors {anchors[0].tolist()} under one mask) vs one block at a "
          f"time: max |diff| {worst:.2e}")
    if worst > 1e-4:
        raise SystemExit("drafter: the block-sparse training forward disagrees with the single-block forward")


def run_rust_check(args, reference: Path) -> bool:
    if shutil.which("cargo") is None:
        print("drafter: cargo not found; run the Rust check by hand (see README.md)")
        return False
    lock = CHECK / "Cargo.lock"
    if not lock.exists():  # the workspace's versions, so nothing new is resolved
        shutil.copy(REPO / "Cargo.lock", lock)
    cmd = ["cargo", "run", "--release", "--quiet", "--manifest-path", str(CHECK / "Cargo.toml"), "--",
           str(args.out / "target"), str(args.out / "drafter"), str(reference)]
    res = subprocess.run(cmd)
    return res.returncode == 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="the folder train.py wrote")
    p.add_argument("--tilefuse", default=None, help="tilefuse binary (default: cargo run --release --)")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--context", type=int, default=24, help="context tokens before the checked block")
    p.add_argument("--no-rust", action="store_true", help="only write the drafter reference")
    args = p.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    model = MiMoV2FlashForCausalLM.from_pretrained(
        args.out / "target", dtype=torch.float32, attn_implementation="eager",
        experts_implementation="eager").eval()
    tok = Tokenizer.from_file(str(args.out / "target" / "tokenizer.json"))
    eos = model.config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ok = check_greedy(args, model, tok, eos)
    if (args.out / "drafter" / "config.json").exists():
        ref = write_draft_reference(args, model, tok)
        if not args.no_rust:
            ok = run_rust_check(args, ref) and ok
    else:
        print("drafter: DIR/drafter is missing; skipped")
        ok = False
    print("verify: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
