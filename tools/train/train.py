#!/usr/bin/env python3
"""Trains a small real model pair for tilefuse: a MiMo-V2 target and its
DFlash drafter, on the Python standard library's own source code.

    python tools/train/train.py --out DIR [--device cuda|cpu] [--target-minutes M]
                                [--draft-minutes M] [--seed S] [--tiny]

Stages (every line of progress also goes to DIR/train_log.txt):

1. Corpus: the interpreter's stdlib `.py` files, ~3% of them held out
   (listed in DIR/heldout.txt) and ~2% kept for validation; see corpus.py.
2. Tokenizer: byte-level BPE (4096 ids; 512 with --tiny), ids 0
   `<|endoftext|>` and 1 `<|mask|>`.
3. Target: MiMo-V2 trained for --target-minutes (the weights of the best
   validation loss are kept), saved to DIR/target
   (config.json, model.safetensors in bf16, generation_config.json,
   tokenizer.json, README.md), reloaded from disk and evaluated on the
   held-out files (perplexity, bits per byte) in f32.
4. Drafter: DFlash, block 8, trained for --draft-minutes against the saved
   target, saved to DIR/drafter (config.json, model.safetensors in bf16),
   and measured by greedy acceptance on held-out text.

DIR/eval.json collects the sizes, timings and results; it is written after
the target is evaluated and again at the end. A failure in stage 4 leaves the
target and eval.json in place and exits with status 1.

A whole run stays inside --deadline-minutes (default 8.75): when the stages
before the drafter took longer than planned, its budget shrinks.
"""

import time

PROCESS_START = time.monotonic()  # the deadline counts the imports too

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus as corpus_mod  # noqa: E402
import drafter as drafter_mod  # noqa: E402
import target as target_mod  # noqa: E402
from common import Budget, RunLog, count_params, folder_mb, replace_dir, seed_everything, versions, write_json  # noqa: E402

# Seconds kept free at the end of the run for saving and measuring the drafter.
DRAFT_EVAL_RESERVE_S = 25.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--target-minutes", type=float, default=5.0, help="target training budget")
    p.add_argument("--draft-minutes", type=float, default=3.0,
                   help="drafter training budget (0: no drafter)")
    p.add_argument("--deadline-minutes", type=float, default=8.75,
                   help="the whole run's budget; the drafter's budget shrinks to fit it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true",
                   help="toy sizes and a corpus subset, for end-to-end tests on a CPU")
    p.add_argument("--dropout", type=float, default=None,
                   help="target training dropout (default 0.2; 0 with --tiny)")
    p.add_argument("--experts", default=None, choices=["eager", "grouped_mm", "batched_mm"],
                   help="transformers experts implementation for training "
                        "(default: grouped_mm on cuda, eager on cpu)")
    return p.parse_args(argv)


def checkpoint_mb(model) -> tuple:
    """Expected checkpoint sizes in MB: all bf16, and with MXFP4 experts
    (4.25 bits per expert weight: E2M1 codes plus one E8M0 scale per 32);
    the routers' correction biases stay f32 in both."""
    bf16 = mx = 0.0
    for name, t in model.state_dict().items():
        size = 4 if name.endswith("e_score_correction_bias") else 2
        bf16 += t.numel() * size
        mx += t.numel() * (4.25 / 8 if ".mlp.experts." in name else size)
    return round(bf16 / 1e6, 2), round(mx / 1e6, 2)


def target_card(info: dict) -> str:
    c, t, e = info["corpus"], info["target"], info.get("target_eval", {})
    return f"""# tilefuse MiMo-V2 small (Python stdlib)

A small MiMo-V2 model (transformers `MiMoV2FlashForCausalLM`, `model_type`
`mimo_v2_flash`) trained from scratch on Python source code, for testing and
benchmarking tilefuse with real weights. It writes Python-looking code; it is
not a useful assistant.

- Parameters: {t['params']:,} ({t['expert_params']:,} in routed experts); bf16 weights.
- Architecture: {t['spec']['num_hidden_layers']} layers (full attention at layer 0 and every
  sixth, sliding window {t['spec']['sliding_window']} with attention sinks elsewhere), hidden
  {t['spec']['hidden_size']}, {t['spec']['num_attention_heads']} heads, q/k head dim {t['spec']['head_dim']},
  v head dim {t['spec']['v_head_dim']}, dense first layer, {t['spec']['n_routed_experts']} routed experts,
  top-{t['spec']['num_experts_per_tok']}.
- Tokenizer: byte-level BPE, {info['tokenizer']['vocab_size']} ids; `<|endoftext|>` = 0 ends a file,
  `<|mask|>` = 1 is reserved for the DFlash drafter.
- Training data: {c['source']}, {c['train_files']} files ({c['train_bytes']:,} bytes); licence: {c['license']}.
- Training: {t['train']['steps']} steps, {t['train']['tokens']:,} tokens, context {t['spec']['seq_len']};
  weights of step {t['train']['kept_step']} (best loss on {c['valid_files']} validation files).
- Held-out ({c['heldout_files']} files, listed in `heldout.txt` beside this folder): perplexity
  {e.get('heldout_perplexity', 'n/a')}, {e.get('heldout_bits_per_byte', 'n/a')} bits per byte.
"""


def drafter_card(info: dict) -> str:
    d = info["drafter"]
    acc = d.get("acceptance", {})
    return f"""# DFlash drafter for tilefuse MiMo-V2 small

A DFlash block-diffusion drafter (z-lab layout) for the target in `../target`:
{d['spec']['num_hidden_layers']} non-causal layers over the outputs of target layers
{d['config']['dflash_config']['target_layer_ids']}, block size {d['spec']['block_size']}, mask token id
{d['config']['dflash_config']['mask_token_id']} (`<|mask|>`); the target's embedding and LM head are
shared and not stored here. Parameters: {d['params']:,}.

Trained on the target's greedy predictions over the same corpus. Greedy
acceptance on held-out text (tokens per step, bonus included): tau
{acc.get('tau', 'n/a')} at block {d['spec']['block_size']}.
"""


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    run = Budget(args.deadline_minutes * 60, start=PROCESS_START)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "train_log.txt")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        log("error: --device cuda but no CUDA device is available")
        return 2
    experts = args.experts or ("grouped_mm" if device == "cuda" else "eager")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    seed_everything(args.seed)
    tspec = target_mod.TINY if args.tiny else target_mod.FULL
    if args.dropout is not None:
        tspec = dataclasses.replace(tspec, dropout=args.dropout)
    dspec = drafter_mod.TINY if args.tiny else drafter_mod.FULL
    info = {"versions": versions(), "device": device if device == "cpu" else torch.cuda.get_device_name(),
            "seed": args.seed, "tiny": args.tiny, "timings_s": {}}
    log(f"run: device {info['device']}, seed {args.seed}, tiny {args.tiny}, versions {info['versions']}")

    # 1-2. Corpus and tokenizer.
    t0 = time.monotonic()
    corpus = corpus_mod.load_corpus(tiny=args.tiny)
    (out / "heldout.txt").write_text("".join(n + "\n" for n in corpus.heldout_names), encoding="utf-8")
    info["corpus"] = corpus.describe()
    info["corpus"]["valid_names"] = corpus.valid_names
    tok = corpus_mod.train_tokenizer(corpus.train_texts, tspec.vocab_size)
    eot, mask = tok.token_to_id(corpus_mod.EOT), tok.token_to_id(corpus_mod.MASK)
    train_ids = torch.from_numpy(corpus_mod.encode_stream(tok, corpus.train_texts)).long().to(device)
    held_ids = torch.from_numpy(corpus_mod.encode_stream(tok, corpus.heldout_texts)).long()
    valid_ids = torch.from_numpy(corpus_mod.encode_stream(tok, corpus.valid_texts)).long()
    byte_len = torch.from_numpy(corpus_mod.token_byte_lengths(tok))
    info["tokenizer"] = {"type": "byte-level BPE", "vocab_size": tok.get_vocab_size(),
                         "special_tokens": {corpus_mod.EOT: eot, corpus_mod.MASK: mask},
                         "train_tokens": int(train_ids.numel()), "heldout_tokens": int(held_ids.numel())}
    info["timings_s"]["data"] = round(time.monotonic() - t0, 1)
    log(f"data: {info['corpus']['train_files']} train files ({info['corpus']['train_bytes']:,} bytes, "
        f"{train_ids.numel():,} tokens), {info['corpus']['heldout_files']} held out "
        f"({held_ids.numel():,} tokens), vocab {tok.get_vocab_size()}, in {info['timings_s']['data']} s")

    # 3. Target.
    t0 = time.monotonic()
    config = target_mod.make_config(tspec, tok.get_vocab_size(), eot)
    model = target_mod.build_model(config, device, experts)
    n_params = count_params(model)
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    info["target"] = {"params": n_params, "expert_params": n_expert, "spec": target_mod.spec_dict(tspec),
                      "experts_implementation": experts}
    mb_bf16, mb_mx = checkpoint_mb(model)
    info["target"]["checkpoint_mb_mxfp4_estimate"] = mb_mx
    log(f"target: {n_params:,} parameters ({n_expert:,} in experts), expected checkpoint "
        f"{mb_bf16} MB bf16, {mb_mx} MB with MXFP4 experts")
    info["target"]["train"] = target_mod.train_target(
        model, train_ids, tspec, args.target_minutes, device, args.seed, log, valid_ids)
    tmp = out / "target.tmp"
    info["target_eval"] = {}
    target_mod.save_target(model, tok, corpus_mod.EOT, tmp, target_card(info))
    replace_dir(tmp, out / "target")
    info["target"]["checkpoint_mb_bf16"] = round(folder_mb(out / "target"), 2)
    del model
    # Evaluate what was saved: reloaded from disk, in f32.
    target = target_mod.MiMoV2FlashForCausalLM.from_pretrained(
        out / "target", dtype=torch.float32, attn_implementation="eager",
        experts_implementation=experts).to(device).eval()
    info["target_eval"] = target_mod.evaluate(target, held_ids, tspec.seq_len, tspec.batch_size,
                                              byte_len, device)
    (out / "target" / "README.md").write_text(target_card(info), encoding="utf-8")
    info["timings_s"]["target"] = round(time.monotonic() - t0, 1)
    log(f"target: saved {info['target']['checkpoint_mb_bf16']} MB to {out / 'target'}; held-out "
        f"perplexity {info['target_eval']['heldout_perplexity']}, "
        f"{info['target_eval']['heldout_bits_per_byte']} bits/byte")
    write_json(out / "eval.json", info)

    # 4. Drafter.
    t0 = time.monotonic()
    if args.draft_minutes <= 0:
        log("drafter: skipped (--draft-minutes 0)")
        info["timings_s"]["total"] = round(run.elapsed(), 1)
        write_json(out / "eval.json", info)
        log.close()
        return 0
    try:
        layer_ids = drafter_mod.build_target_layer_ids(tspec.num_hidden_layers, dspec.num_hidden_layers)
        dcfg = drafter_mod.config_json(dspec, tspec.hidden_size, tok.get_vocab_size(),
                                       tspec.num_hidden_layers, layer_ids, mask,
                                       tspec.max_position_embeddings)
        left = (run.seconds - run.elapsed() - DRAFT_EVAL_RESERVE_S) / 60
        minutes = max(min(args.draft_minutes, left), min(args.draft_minutes, 0.25))
        if minutes < args.draft_minutes:
            log(f"drafter: budget cut from {args.draft_minutes:.2f} to {minutes:.2f} min "
                f"to end within --deadline-minutes {args.deadline_minutes}")
        # The frozen target as inference runs it: bf16 on the GPU, f32 on the CPU.
        frozen = target if device == "cpu" else target_mod.MiMoV2FlashForCausalLM.from_pretrained(
            out / "target", dtype=torch.bfloat16, attn_implementation="eager",
            experts_implementation=experts).to(device).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        drafter = drafter_mod.DFlashDrafter(tspec.hidden_size, len(layer_ids), dspec).to(device)
        info["drafter"] = {"params": count_params(drafter), "spec": drafter_mod.spec_dict(dspec),
                           "config": dcfg, "labels": "target greedy predictions"}
        log(f"drafter: {info['drafter']['params']:,} parameters, target layers {layer_ids}, "
            f"mask id {mask}, block {dspec.block_size}")
        info["drafter"]["train"] = drafter_mod.train_drafter(
            drafter, frozen, train_ids, dspec, layer_ids, mask, minutes, device, args.seed, log,
            lambda: target_mod.autocast(device))
        del frozen
        tmp = out / "drafter.tmp"
        drafter_mod.save_drafter(drafter, dcfg, tmp, drafter_card(info))
        replace_dir(tmp, out / "drafter")
        info["drafter"]["checkpoint_mb_bf16"] = round(folder_mb(out / "drafter"), 2)
        # Measure what was saved, in f32.
        saved, _ = drafter_mod.load_drafter(out / "drafter", device)
        acc = drafter_mod.acceptance(saved, target, held_ids, layer_ids, mask, dspec.block_size, device,
                                     **({"prompts": 4, "prompt_len": 16, "new_tokens": 24} if args.tiny else {}))
        info["drafter"]["acceptance"] = acc
        (out / "drafter" / "README.md").write_text(drafter_card(info), encoding="utf-8")
        info["timings_s"]["drafter"] = round(time.monotonic() - t0, 1)
        log(f"drafter: saved {info['drafter']['checkpoint_mb_bf16']} MB to {out / 'drafter'}; greedy "
            f"acceptance at block {dspec.block_size}: tau {acc['tau']}, mean over all anchors "
            f"{acc['mean_accepted_all_anchors']}, by position {acc['accept_rate_by_position']}")
        status = 0
    except Exception:  # the target stays; the failure is logged and reported
        info["drafter_error"] = traceback.format_exc()
        log("drafter: FAILED (the target is saved and evaluated)\n" + info["drafter_error"])
        status = 1
    info["timings_s"]["total"] = round(run.elapsed(), 1)
    write_json(out / "eval.json", info)
    log(f"done in {info['timings_s']['total']} s; results in {out / 'eval.json'}")
    log.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
