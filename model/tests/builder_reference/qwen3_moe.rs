//! Verbatim copy of the builder-API Qwen3-MoE layer from before the graph DSL
//! (`model/src/qwen3_moe.rs`), kept as the reference the DSL versions must
//! reproduce node for node (tests/dsl_equals_builder.rs). Only the type
//! definitions were dropped: they come from the crate.

use tilefuse_ir::{shape, Builder, DType, Graph, Mask, NodeId, Result};
use tilefuse_model::qwen3_moe::Config;
use tilefuse_model::GraphOptions;

use super::common::{dense_mlp, moe_experts};

fn attention(
    b: &mut Builder,
    cfg: &Config,
    opt: &GraphOptions,
    i: usize,
    h: NodeId,
    pos: NodeId,
) -> Result<NodeId> {
    let p = format!("model.layers.{i}.self_attn");
    let dt = opt.dtype;
    let (nh, kvh, d, hid) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.hidden_size,
    );
    let wq = b.weight(&format!("{p}.q_proj.weight"), dt, shape![(nh * d), (hid)])?;
    let wk = b.weight(&format!("{p}.k_proj.weight"), dt, shape![(kvh * d), (hid)])?;
    let wv = b.weight(&format!("{p}.v_proj.weight"), dt, shape![(kvh * d), (hid)])?;
    let wo = b.weight(&format!("{p}.o_proj.weight"), dt, shape![(hid), (nh * d)])?;
    let qn = b.weight(&format!("{p}.q_norm.weight"), dt, shape![(d)])?;
    let kn = b.weight(&format!("{p}.k_norm.weight"), dt, shape![(d)])?;
    let kc = b.cache(
        &format!("model.layers.{i}.k_cache"),
        dt,
        shape![(opt.context), (kvh), (d)],
    )?;
    let vc = b.cache(
        &format!("model.layers.{i}.v_cache"),
        dt,
        shape![(opt.context), (kvh), (d)],
    )?;

    let q = b.matmul(h, wq)?;
    let q = b.reshape(q, shape![T, (nh), (d)])?;
    let q = b.rms_norm(q, qn, cfg.rms_norm_eps)?;
    b.name(q, "q");
    let k = b.matmul(h, wk)?;
    let k = b.reshape(k, shape![T, (kvh), (d)])?;
    let k = b.rms_norm(k, kn, cfg.rms_norm_eps)?;
    b.name(k, "k");
    let v = b.matmul(h, wv)?;
    let v = b.reshape(v, shape![T, (kvh), (d)])?;
    b.name(v, "v");
    let q = b.rope(q, pos, cfg.rope_theta, d)?;
    b.name(q, "q_rope");
    let k = b.rope(k, pos, cfg.rope_theta, d)?;
    b.name(k, "k_rope");
    let keys = b.kv_append(kc, k, "S", false)?;
    b.name(keys, "keys");
    let values = b.kv_append(vc, v, "S", false)?;
    b.name(values, "values");
    let a = b.attention(
        q,
        keys,
        values,
        None,
        Mask::Causal { window: None },
        (d as f32).powf(-0.5),
    )?;
    b.name(a, "attn");
    let a = b.reshape(a, shape![T, (nh * d)])?;
    let o = b.matmul(a, wo)?;
    Ok(b.name(o, "out"))
}

/// Decoder layer `i`.
pub fn decoder_layer(
    b: &mut Builder,
    cfg: &Config,
    opt: &GraphOptions,
    i: usize,
    x: NodeId,
    pos: NodeId,
) -> Result<NodeId> {
    let p = format!("model.layers.{i}");
    let (dt, hid) = (opt.dtype, cfg.hidden_size);
    b.push_scope(&format!("layer{i}"));
    let r = (|| {
        let ln1 = b.weight(&format!("{p}.input_layernorm.weight"), dt, shape![(hid)])?;
        let ln2 = b.weight(
            &format!("{p}.post_attention_layernorm.weight"),
            dt,
            shape![(hid)],
        )?;
        let h = b.rms_norm(x, ln1, cfg.rms_norm_eps)?;
        b.name(h, "attn_norm");
        let a = b.scoped("attn", |b| attention(b, cfg, opt, i, h, pos))?;
        let x = b.add(x, a)?;
        b.name(x, "attn_residual");
        let h = b.rms_norm(x, ln2, cfg.rms_norm_eps)?;
        b.name(h, "mlp_norm");
        let m = if cfg.is_sparse(i) {
            b.scoped("moe", |b| {
                let wr = b.weight(
                    &format!("{p}.mlp.gate.weight"),
                    dt,
                    shape![(cfg.num_experts), (hid)],
                )?;
                // Logits in the model dtype, softmax in f32.
                let logits = b.matmul(h, wr)?;
                let logits = b.cast(logits, DType::F32)?;
                b.name(logits, "router_logits");
                moe_experts(
                    b,
                    h,
                    logits,
                    None,
                    &cfg.router(),
                    &format!("{p}.mlp"),
                    cfg.num_experts,
                    hid,
                    cfg.moe_intermediate_size,
                    opt.expert_dtype,
                )
            })?
        } else {
            b.scoped("mlp", |b| {
                dense_mlp(b, h, &format!("{p}.mlp"), hid, cfg.intermediate_size, dt)
            })?
        };
        let y = b.add(x, m)?;
        Ok(b.name(y, "out"))
    })();
    b.pop_scope();
    r
}

/// A graph of one decoder layer: inputs `x [T, H]` and `pos i32 [T]`, output `hidden`.
pub fn layer_graph(cfg: &Config, opt: &GraphOptions, i: usize) -> Result<Graph> {
    let mut b = Builder::new(&format!("qwen3_moe_layer{i}"), &["S", "T"]);
    let x = b.input("x", opt.dtype, shape![T, (cfg.hidden_size)])?;
    let pos = b.input("pos", DType::I32, shape![T])?;
    let y = decoder_layer(&mut b, cfg, opt, i, x, pos)?;
    b.output("hidden", y)?;
    b.finish()
}

/// The whole forward: token ids and positions in, f32 logits and the last hidden states out.
pub fn forward_graph(cfg: &Config, opt: &GraphOptions) -> Result<Graph> {
    let mut b = Builder::new("qwen3_moe", &["S", "T"]);
    let ids = b.input("ids", DType::I32, shape![T])?;
    let pos = b.input("pos", DType::I32, shape![T])?;
    let (hid, v) = (cfg.hidden_size, cfg.vocab_size);
    let emb = b.weight("model.embed_tokens.weight", opt.dtype, shape![(v), (hid)])?;
    let mut x = b.embedding(emb, ids)?;
    b.name(x, "embed");
    for i in 0..cfg.num_hidden_layers {
        x = decoder_layer(&mut b, cfg, opt, i, x, pos)?;
    }
    let norm = b.weight("model.norm.weight", opt.dtype, shape![(hid)])?;
    let head = b.weight("lm_head.weight", opt.dtype, shape![(v), (hid)])?;
    let h = b.rms_norm(x, norm, cfg.rms_norm_eps)?;
    b.name(h, "final_norm");
    let logits = b.matmul_to(h, head, DType::F32)?;
    b.name(logits, "logits");
    b.output("logits", logits)?;
    b.output("hidden", x)?;
    b.finish()
}
