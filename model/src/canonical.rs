//! The canonical graphs: small, complete blocks that every layer of
//! tilefuse is tested and inspected on — an RMSNorm + linear, a MiMo-V2
//! sliding-window attention block with sinks, and a MoE block with FP4
//! experts. Codegen snapshots its passes and kernels on them; the GPU tests
//! check every kernel against the interpreter on them.

use tilefuse_ir::{shape, Builder, DType, Graph, Mask, Result, RouterConfig, ScoreFn};

/// Hidden width of the canonical blocks.
pub const HIDDEN: usize = 256;

/// `y = rms_norm(x) @ w^T` with `w` in `weight_dtype`; `x [T, 256]`, `y [T, 512]`.
pub fn norm_linear(weight_dtype: DType) -> Result<Graph> {
    norm_linear_of(weight_dtype, 512, HIDDEN)
}

/// `y = rms_norm(x) @ w^T` with `w [rows, k]` in `weight_dtype`: the other
/// tilings of the same block (a matrix long enough for the tensor cores'
/// 16-row tiles; a short one of long rows, as a router's logits).
pub fn norm_linear_of(weight_dtype: DType, rows: usize, k: usize) -> Result<Graph> {
    let mut b = Builder::new("norm_linear", &["T"]);
    b.set_loc(file!(), line!());
    let x = b.input("x", DType::BF16, shape![T, (k)])?;
    let g = b.weight("norm.weight", DType::BF16, shape![(k)])?;
    let w = b.weight("proj.weight", weight_dtype, shape![(rows), (k)])?;
    let h = b.rms_norm(x, g, 1e-5)?;
    b.name(h, "norm");
    let y = b.matmul(h, w)?;
    b.name(y, "proj");
    b.output("y", y)?;
    b.finish()
}

/// A MiMo-V2 sliding-window attention block with sinks and partial RoPE,
/// residual included: 8 query heads, 2 KV heads, head dims 64 (q, k) and 32
/// (v), window 16, ring cache of 16 + 16 - 1 slots.
pub fn attention_block() -> Result<Graph> {
    attention(true)
}

/// The same block with full causal attention over a 512-position cache and
/// no sinks (a MiMo-V2 full layer): the split-key path of the GPU kernels.
pub fn full_attention_block() -> Result<Graph> {
    attention(false)
}

fn attention(sliding: bool) -> Result<Graph> {
    let (h, nh, kvh, dk, dv, window, max_t) =
        (HIDDEN, 8usize, 2usize, 64usize, 32usize, 16usize, 16usize);
    let name = if sliding {
        "attention_block"
    } else {
        "full_attention_block"
    };
    let mut b = Builder::new(name, &["S", "T"]);
    b.set_loc(file!(), line!());
    let x = b.input("x", DType::BF16, shape![T, (h)])?;
    let pos = b.input("pos", DType::I32, shape![T])?;
    let ln = b.weight("input_layernorm.weight", DType::BF16, shape![(h)])?;
    let wq = b.weight("q_proj.weight", DType::BF16, shape![(nh * dk), (h)])?;
    let wk = b.weight("k_proj.weight", DType::BF16, shape![(kvh * dk), (h)])?;
    let wv = b.weight("v_proj.weight", DType::BF16, shape![(kvh * dv), (h)])?;
    let wo = b.weight("o_proj.weight", DType::BF16, shape![(h), (nh * dv)])?;
    let sinks = if sliding {
        Some(b.weight("sinks", DType::BF16, shape![(nh)])?)
    } else {
        None
    };
    let cap = if sliding { window + max_t - 1 } else { 512 };
    let kc = b.cache("k_cache", DType::BF16, shape![(cap), (kvh), (dk)])?;
    let vc = b.cache("v_cache", DType::BF16, shape![(cap), (kvh), (dv)])?;
    b.set_loc(file!(), line!());
    let n = b.rms_norm(x, ln, 1e-5)?;
    b.name(n, "norm");
    let q = b.matmul(n, wq)?;
    let q = b.reshape(q, shape![T, (nh), (dk)])?;
    b.name(q, "q");
    let k = b.matmul(n, wk)?;
    let k = b.reshape(k, shape![T, (kvh), (dk)])?;
    b.name(k, "k");
    let v = b.matmul(n, wv)?;
    let v = b.reshape(v, shape![T, (kvh), (dv)])?;
    let v = b.scale(v, 0.707)?;
    b.name(v, "v");
    let q = b.rope(q, pos, 10_000.0, 16)?;
    b.name(q, "q_rope");
    let k = b.rope(k, pos, 10_000.0, 16)?;
    b.name(k, "k_rope");
    let keys = b.kv_append(kc, k, "S", sliding)?;
    b.name(keys, "keys");
    let values = b.kv_append(vc, v, "S", sliding)?;
    b.name(values, "values");
    let mask = Mask::Causal {
        window: sliding.then_some(window as u32),
    };
    let a = b.attention(q, keys, values, sinks, mask, (dk as f32).powf(-0.5))?;
    b.name(a, "attn");
    let a = b.reshape(a, shape![T, (nh * dv)])?;
    let o = b.matmul(a, wo)?;
    b.name(o, "o_proj");
    let y = b.add(x, o)?;
    b.name(y, "residual");
    b.output("y", y)?;
    b.finish()
}

/// A MoE block: norm, sigmoid router with correction bias and grouped
/// top-k (16 experts in 4 groups, 2 groups kept, top-4), experts of width
/// 128 in `expert_dtype`, residual add.
pub fn moe_block(expert_dtype: DType) -> Result<Graph> {
    let (h, e, inter) = (HIDDEN, 16usize, 128usize);
    let mut b = Builder::new("moe_block", &["T"]);
    b.set_loc(file!(), line!());
    let x = b.input("x", DType::BF16, shape![T, (h)])?;
    let ln = b.weight("post_attention_layernorm.weight", DType::BF16, shape![(h)])?;
    let wr = b.weight("mlp.gate.weight", DType::BF16, shape![(e), (h)])?;
    let bias = b.weight("mlp.gate.e_score_correction_bias", DType::F32, shape![(e)])?;
    let w13 = b.weight(
        "mlp.experts.gate_up_proj",
        expert_dtype,
        shape![(e), (2 * inter), (h)],
    )?;
    let w2 = b.weight(
        "mlp.experts.down_proj",
        expert_dtype,
        shape![(e), (h), (inter)],
    )?;
    let cfg = RouterConfig {
        score: ScoreFn::Sigmoid,
        top_k: 4,
        n_group: 4,
        topk_group: 2,
        norm_topk: true,
        norm_eps: 1e-20,
        scale: 2.5,
    };
    b.set_loc(file!(), line!());
    let n = b.rms_norm(x, ln, 1e-5)?;
    b.name(n, "norm");
    let logits = b.matmul_to(n, wr, DType::F32)?;
    b.name(logits, "router_logits");
    let idx = b.router_select(logits, Some(bias), &cfg)?;
    b.name(idx, "experts_idx");
    let w = b.router_weights(logits, idx, &cfg)?;
    b.name(w, "experts_w");
    let y = b.experts(n, idx, w, w13, w2)?;
    b.name(y, "experts");
    let y = b.add(x, y)?;
    b.name(y, "residual");
    b.output("y", y)?;
    b.finish()
}
