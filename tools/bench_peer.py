#!/usr/bin/env python3
"""The peer of `tilefuse bench`: the transformers implementations of the same
shapes (MiMoV2FlashForCausalLM, Qwen3MoeForCausalLM), bf16 weights (random
init), batch-1 T=1 decoding with a StaticCache at a given context.

What it does:
  1. builds the model and a `StaticCache(config=..., max_cache_len=...)`;
  2. fills the context with a chunked prefill (eager);
  3. times T=1 decode forwards at position = context: CUDA events, warm-up,
     median of --reps. By default it tries `torch.compile(mode="reduce-overhead")`
     (CUDA graphs) the way `generate` does (`model.get_compiled_call`) and falls
     back to eager, with the reason in the JSON, when that fails;
  4. profiles one eager pass per decoder layer (CUDA events around each layer).

Prints one JSON object as the last line of stdout (and appends it to --json).
On failure it prints the reason as the last line of stderr and exits 1.

Positions: transformers' static cache layers keep their own write counters
(`cache_position` is not an argument any more), so every forward appends one
token. With `--positions fixed` (the default) the counters are rewound to the
context before each timed forward, so every forward decodes at position =
context, writes the same slot, and one CUDA graph is replayed. With
`--positions advance` the forwards decode at context, context+1, ... as
`generate` does, in a cache sized for all of them (dynamo then treats the
sliding layers' length as dynamic, and CUDA graphs are recorded per length).

Usage:
  python3 tools/bench_peer.py --arch mimo_v2 --layers 4 --context 1024
  python3 tools/bench_peer.py --arch qwen3_moe --layers 24 --context 1024 --json peer.json
  python3 tools/bench_peer.py --arch mimo_v2 --layers 4 --context 48 --device cpu --tiny   # self-test
"""
import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback


class Fail(Exception):
    """A failure with a reason for the user."""


def log(msg):
    print(f"bench_peer: {msg}", file=sys.stderr, flush=True)


def short(e, n=400):
    s = f"{type(e).__name__}: {e}".strip().replace("\n", " | ")
    return s if len(s) <= n else s[: n - 3] + "..."


def mimo_config(layers, tiny):
    from transformers import MiMoV2FlashConfig

    # The transformers default pattern: full attention at layer 0 and every 6th layer, sliding otherwise;
    # a dense MLP at layer 0, MoE after.
    kinds = ["full_attention" if (i == 0 or (i + 1) % 6 == 0) else "sliding_attention" for i in range(layers)]
    mlp = ["dense"] + ["sparse"] * (layers - 1)
    if tiny:
        return MiMoV2FlashConfig(
            num_hidden_layers=layers,
            layer_types=kinds,
            mlp_layer_types=mlp,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=24,
            v_head_dim=16,
            sliding_window=16,
            vocab_size=256,
            max_position_embeddings=4096,
        )
    # MiMo-V2-Flash widths (the config defaults): hidden 4096, 64 heads, 4 kv heads (8 on sliding layers),
    # head_dim 192 / v 128, sliding window 128 with sinks, 256 experts of 2048, top-8, vocab 152576.
    return MiMoV2FlashConfig(num_hidden_layers=layers, layer_types=kinds, mlp_layer_types=mlp)


def qwen_config(layers, tiny):
    from transformers import Qwen3MoeConfig

    if tiny:
        return Qwen3MoeConfig(
            hidden_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            vocab_size=256,
            max_position_embeddings=4096,
        )
    # Qwen3-30B-A3B widths.
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
        rms_norm_eps=1e-6,
    )


class Clock:
    """CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, torch, device):
        self.torch = torch
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def ms(self, a, b):
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def summary(times):
    s = sorted(times)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]  # noqa: E731
    return {
        "median": statistics.median(s),
        "min": s[0],
        "mean": statistics.fmean(s),
        "p10": q(0.10),
        "p90": q(0.90),
    }


class CudagraphWatch:
    """Counts CUDA graph captures and collects inductor's cudagraph-skip messages."""

    def __init__(self, torch):
        self.captures = 0
        self.skips = []
        self.torch = torch
        self._orig_enter = None
        watch = self
        try:
            g = torch.cuda.graphs.graph
            orig = g.__enter__

            def enter(self_, *args, **kwargs):
                watch.captures += 1
                return orig(self_, *args, **kwargs)

            g.__enter__ = enter
            self._orig_enter = orig
        except Exception:  # noqa: BLE001
            pass

        class H(logging.Handler):
            def emit(self, record):
                watch.skips.append(record.getMessage())

        try:
            import torch._inductor.cudagraph_utils  # noqa: F401

            lg = logging.getLogger("torch._inductor.cudagraph_utils.__cudagraphs")
            if lg.level == logging.NOTSET or lg.level > logging.WARNING:
                lg.setLevel(logging.WARNING)
            lg.addHandler(H())
        except Exception:  # noqa: BLE001
            pass

    @staticmethod
    def skip_count():
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["mimo_v2", "qwen3_moe"], required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--context", type=int, default=1024, help="cached tokens before the timed decode forward")
    ap.add_argument("--reps", type=int, default=100, help="timed decode forwards (median reported)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed decode forwards first (compile, graph capture)")
    ap.add_argument("--profile-reps", type=int, default=20, help="eager forwards of the per-layer profile (0: skip)")
    ap.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto: try torch.compile(mode=reduce-overhead), fall back to eager with the reason; "
        "on: fail if it does not work; off: eager only",
    )
    ap.add_argument("--positions", choices=["fixed", "advance"], default="fixed")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens)")
    ap.add_argument("--attn", default=None, help="attn_implementation (default: the model's default)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: only for the --tiny self-test")
    ap.add_argument("--tiny", action="store_true", help="tiny widths, for a quick self-test")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads with --device cpu")
    ap.add_argument("--json", help="append the JSON line to this file")
    a = ap.parse_args()

    stage = ["arguments"]
    try:
        out = run(a, stage)
    except Fail as e:
        print(json.dumps({"peer": "transformers", "arch": a.arch, "error": f"{stage[0]}: {e}"}))
        log(f"error: {stage[0]}: {e}")
        sys.exit(1)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        print(json.dumps({"peer": "transformers", "arch": a.arch, "error": f"{stage[0]}: {short(e)}"}))
        log(f"error: {stage[0]}: {short(e)}")
        sys.exit(1)
    line = json.dumps(out)
    if a.json:
        with open(a.json, "a") as f:
            f.write(line + "\n")
    print(line, flush=True)


def run(a, stage):
    if a.layers < 1:
        raise Fail("--layers must be at least 1")
    if a.context < 1:
        raise Fail("--context must be at least 1")
    if a.reps < 1 or a.warmup < 0 or a.profile_reps < 0 or a.chunk < 1:
        raise Fail("--reps must be >= 1, --warmup and --profile-reps >= 0, --chunk >= 1")
    stage[0] = "environment"
    if os.environ.get("CUDA_LAUNCH_BLOCKING", "0") not in ("", "0"):
        raise Fail("CUDA_LAUNCH_BLOCKING is set: synchronous launches distort the timing; unset it")
    if a.device == "cpu":
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

    stage[0] = "import"
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, StaticCache

    stage[0] = "device"
    if a.device == "cpu":
        torch.set_num_threads(max(1, a.threads))
    elif not torch.cuda.is_available():
        raise Fail("no CUDA device visible to PyTorch (use --device cpu --tiny for the self-test)")
    device = torch.device(a.device)
    dtype = torch.bfloat16
    clock = Clock(torch, device)

    stage[0] = "config"
    cfg = mimo_config(a.layers, a.tiny) if a.arch == "mimo_v2" else qwen_config(a.layers, a.tiny)
    window = getattr(cfg, "sliding_window", None) if "sliding_attention" in (getattr(cfg, "layer_types", None) or []) else None
    kw = {"dtype": dtype}
    if a.attn:
        kw["attn_implementation"] = a.attn

    stage[0] = "memory check"
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg, **kw)
    weight_bytes = sum(p.numel() * p.element_size() for p in meta.parameters())
    del meta
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        need = weight_bytes + (2 << 30)
        if need > free:
            raise Fail(
                f"{a.layers} layers need {weight_bytes / 2**30:.1f} GiB of bf16 weights (+2 GiB working space), "
                f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free: use fewer --layers"
            )

    stage[0] = "model"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, **kw)
    model.eval()
    model.requires_grad_(False)
    decoder_layers = list(model.model.layers)
    attn_types = getattr(cfg, "layer_types", None) or ["full_attention"] * a.layers
    layer_kinds = [
        ("sliding" if t == "sliding_attention" else "full") + ("+moe" if hasattr(l.mlp, "experts") else "+dense")
        for t, l in zip(attn_types, decoder_layers)
    ]

    # Decode steps after the prefill: fixed positions rewind to the context, so one slot is enough.
    steps = a.warmup + a.reps + a.profile_reps + 1
    max_cache_len = a.context + (1 if a.positions == "fixed" else 2 * steps)

    stage[0] = "cache"
    cache = StaticCache(config=cfg, max_cache_len=max_cache_len)
    cache_layers = [f"{type(l).__name__}({l.max_cache_len})" for l in cache.layers]
    if len(cache.layers) != a.layers:
        raise Fail(f"StaticCache has {len(cache.layers)} layers for a {a.layers}-layer model")

    ids = torch.randint(0, cfg.vocab_size, (1, a.context + 1), device=device)
    tok = ids[:, a.context :].clone()
    pos = torch.tensor([[a.context]], device=device, dtype=torch.long)
    # Rewinding writes the layers' own counters: check they are the ones this script knows.
    if a.positions == "fixed":
        for i, l in enumerate(cache.layers):
            ok = isinstance(l, transformers.cache_utils.StaticLayer) and isinstance(
                getattr(l, "cumulative_length", None), torch.Tensor
            )
            if isinstance(l, transformers.cache_utils.StaticSlidingWindowLayer):
                ok = ok and isinstance(getattr(l, "cumulative_length_int", None), int)
            if not ok:
                raise Fail(
                    f"cache layer {i} ({type(l).__name__}) has no counters this script can rewind "
                    f"(transformers {transformers.__version__}); run with --positions advance"
                )

    def rewind():
        for l in cache.layers:
            l.cumulative_length.fill_(a.context)
            if hasattr(l, "cumulative_length_int"):
                l.cumulative_length_int = a.context

    state = {"next": a.context}  # the position of the next decode forward (--positions advance)

    def prepare():
        """Sets the cache and the position up for the next decode forward."""
        if a.positions == "fixed":
            rewind()
        else:
            if state["next"] >= max_cache_len:
                raise Fail(f"decode position {state['next']} past max_cache_len {max_cache_len}")
            pos.fill_(state["next"])
            state["next"] += 1

    def forward(fn):
        return fn(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True)

    def decode(fn):
        prepare()
        return forward(fn)

    def prefill():
        cache.reset()
        state["next"] = a.context
        for s in range(0, a.context, a.chunk):
            e = min(a.context, s + a.chunk)
            p = torch.arange(s, e, device=device).unsqueeze(0)
            model(input_ids=ids[:, s:e], position_ids=p, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for i in range(a.layers):
            n = int(cache.get_seq_length(i))
            if n != a.context:
                raise Fail(f"after the prefill, cache layer {i} holds {n} tokens, not {a.context}")
        clock.sync()

    def restart_eager(reason):
        """After a failed compiled forward: a fresh prefill (some layers may hold one token more), eager warm-up."""
        log(reason + "; falling back to eager")
        stage[0] = "eager fallback"
        try:
            torch._dynamo.reset()
            prefill()
            for _ in range(max(a.warmup, 2)):
                decode(model)
            clock.sync()
        except Exception as e:  # noqa: BLE001
            raise Fail(f"{reason}; then eager failed too: {short(e)}") from e

    with torch.no_grad():
        stage[0] = "prefill"
        t0 = time.perf_counter()
        prefill()
        prefill_s = time.perf_counter() - t0
        log(f"{a.arch} {a.layers} layers ({', '.join(layer_kinds)}), prefill of {a.context} in {prefill_s:.2f} s")

        check = None
        if a.tiny:
            # Self-test: the cached decode forward agrees with a cache-free forward over the context + 1 tokens.
            stage[0] = "self-test check"
            got = decode(model).logits[0, -1].float()
            ref = model(input_ids=ids, use_cache=False).logits[0, -1].float()
            diff = (got - ref).abs().max().item()
            check = {
                "max_abs_diff_logits": diff,
                "ref_max_abs": ref.abs().max().item(),
                "same_argmax": bool(got.argmax() == ref.argmax()),
            }
            if not (diff <= 0.05 * max(1.0, ref.abs().max().item()) and check["same_argmax"]):
                raise Fail(f"cached decode disagrees with a cache-free forward: {check}")
            if a.positions == "advance":
                prefill()

        # ---- warm-up, compiled when it works ----
        mode = "eager"
        fallback = None
        compile_info = None
        step = model
        if a.compile != "off":
            stage[0] = "compile"
            from torch._dynamo.utils import counters
            from transformers.generation.configuration_utils import CompileConfig

            watch = CudagraphWatch(torch)
            skips0 = watch.skip_count()
            t0 = time.perf_counter()
            try:
                # What generate does for a compileable (static) cache: torch.compile(model.__call__,
                # fullgraph=False, mode="reduce-overhead").
                compiled = model.get_compiled_call(CompileConfig())
                for _ in range(max(a.warmup, 3)):
                    torch.compiler.cudagraph_mark_step_begin()
                    decode(compiled)
                clock.sync()
                compile_s = time.perf_counter() - t0
                skips = watch.skip_count() - skips0
                breaks = sum(counters["graph_break"].values())
                graphs = int(counters["stats"]["unique_graphs"])
                cudagraphs = device.type == "cuda" and skips == 0 and watch.captures > 0
                reason = None
                if not cudagraphs:
                    reason = (
                        "CUDA graphs need a CUDA device"
                        if device.type != "cuda"
                        else "; ".join(dict.fromkeys(watch.skips))[:400]
                        or f"{skips} cudagraph skips, {watch.captures} captures (TORCH_LOGS=cudagraphs tells why)"
                    )
                compile_info = {
                    "compile_s": round(compile_s, 2),
                    "graphs": graphs,
                    "graph_breaks": breaks,
                    "cudagraph_skips": skips,
                    "cudagraph_captures": watch.captures,
                    "cudagraphs": cudagraphs,
                    "no_cudagraphs_reason": reason,
                }
                if breaks:
                    compile_info["graph_break_reasons"] = [str(k)[:200] for k in list(counters["graph_break"])[:5]]
                step = compiled
                mode = "torch.compile(reduce-overhead)+cudagraphs" if cudagraphs else "torch.compile(no cudagraphs)"
                watch.captures_before_timing = watch.captures
            except Exception as e:  # noqa: BLE001
                if a.compile == "on":
                    raise
                fallback = f"torch.compile failed: {short(e)}"
                restart_eager(fallback)
        else:
            stage[0] = "eager warm-up"
            for _ in range(max(a.warmup, 2)):
                decode(model)
            clock.sync()

        # ---- timed decode forwards ----
        def timed(fn):
            times = []
            first = None
            for _ in range(a.reps):
                if fn is not model:
                    torch.compiler.cudagraph_mark_step_begin()
                prepare()  # outside the timed region
                if first is None:
                    first = state["next"] - 1 if a.positions == "advance" else a.context
                b = clock.mark()
                forward(fn)
                e = clock.mark()
                clock.sync()
                times.append(clock.ms(b, e))
            last = state["next"] - 1 if a.positions == "advance" else a.context
            return times, [first, last]

        stage[0] = "timing"
        if step is not model:
            try:
                # A recompile here would time the compiler, not the forward.
                with torch.compiler.set_stance("fail_on_recompile"):
                    times, positions = timed(step)
                captured = watch.captures - watch.captures_before_timing
                compile_info["cudagraph_captures_while_timed"] = captured
                if captured:
                    log("warning: CUDA graphs were captured during the timed forwards; the time includes captures")
            except Exception as e:  # noqa: BLE001
                if a.compile == "on":
                    raise
                fallback = f"compiled forward failed while timed: {short(e)}"
                step, mode, compile_info["failed_while_timed"] = model, "eager", True
                restart_eager(fallback)
                stage[0] = "timing"
        if step is model:
            times, positions = timed(model)
        st = summary(times)

        # ---- eager per-layer profile ----
        prof = None
        if a.profile_reps:
            stage[0] = "per-layer profile"
            marks = {}
            handles = []
            for i, l in enumerate(decoder_layers):
                handles.append(l.register_forward_pre_hook(lambda m, args, i=i: marks.__setitem__(("b", i), clock.mark())))
                handles.append(l.register_forward_hook(lambda m, args, out, i=i: marks.__setitem__(("e", i), clock.mark())))
            try:
                decode(model)  # warm the hooks
                per_layer = [[] for _ in decoder_layers]
                totals = []
                for _ in range(a.profile_reps):
                    prepare()
                    marks.clear()
                    b = clock.mark()
                    forward(model)
                    e = clock.mark()
                    clock.sync()
                    totals.append(clock.ms(b, e))
                    for i in range(len(decoder_layers)):
                        per_layer[i].append(clock.ms(marks[("b", i)], marks[("e", i)]))
            finally:
                for h in handles:
                    h.remove()
            layer_ms = [statistics.median(x) for x in per_layer]
            total = statistics.median(totals)
            prof = {
                "ms": total,
                "layer_ms": [round(x, 6) for x in layer_ms],
                "outside_layers_ms": round(total - sum(layer_ms), 6),
                "ms_per_layer_excl_outside": sum(layer_ms) / len(layer_ms),
            }
            by_kind = {}
            for k, x in zip(layer_kinds, layer_ms):
                by_kind.setdefault(k, []).append(x)
            prof["layer_ms_by_kind"] = {k: statistics.fmean(v) for k, v in by_kind.items()}

    ms = st["median"]
    if not math.isfinite(ms) or ms <= 0:
        raise Fail(f"bad timing {times[:5]}")
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
        "ms_min": st["min"],
        "ms_mean": st["mean"],
        "ms_p10": st["p10"],
        "ms_p90": st["p90"],
        "reps": a.reps,
        "warmup": a.warmup,
        "positions": a.positions,
        "position": a.context if a.positions == "fixed" else positions,
        "fallback_reason": fallback,
        "compile": compile_info,
        "eager_profile": prof,
        "layer_kinds": layer_kinds,
        "sliding_window": window,
        "cache": {"class": type(cache).__name__, "max_cache_len": max_cache_len, "layers": cache_layers},
        "prefill_chunk": a.chunk,
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "dtype": "bf16",
        "tiny": a.tiny,
        "device": a.device,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if check is not None:
        out["self_test"] = check
    return out


if __name__ == "__main__":
    main()
