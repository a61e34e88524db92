//! Verbatim copy of the builder-API MiMo-V2 layer from before the graph DSL
//! (`model/src/mimo_v2.rs`), kept as the reference the DSL versions must
//! reproduce node for node (tests/dsl_equals_builder.rs). Only the type
//! definitions were dropped: they come from the crate.

use tilefuse_ir::{shape, Builder, DType, Graph, Mask, NodeId, Result};
use tilefuse_model::mimo_v2::{Config, LayerType};
use tilefuse_model::GraphOptions;

use super::common::{dense_mlp, moe_experts};

/// The attention block of layer `i` on the normed input `h`.
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
    let (nh, kvh, dk, dv, hid) = (
        cfg.num_attention_heads,
        cfg.kv_heads(i),
        cfg.head_dim,
        cfg.v_head_dim,
        cfg.hidden_size,
    );
    let sliding = cfg.layer_types[i] == LayerType::Sliding;
    let wq = b.weight(&format!("{p}.q_proj.weight"), dt, shape![(nh * dk), (hid)])?;
    let wk = b.weight(&format!("{p}.k_proj.weight"), dt, shape![(kvh * dk), (hid)])?;
    let wv = b.weight(&format!("{p}.v_proj.weight"), dt, shape![(kvh * dv), (hid)])?;
    let wo = b.weight(&format!("{p}.o_proj.weight"), dt, shape![(hid), (nh * dv)])?;
    let cap = if sliding {
        opt.ring_capacity(cfg.sliding_window)
    } else {
        opt.context
    };
    let kc = b.cache(
        &format!("model.layers.{i}.k_cache"),
        dt,
        shape![(cap), (kvh), (dk)],
    )?;
    let vc = b.cache(
        &format!("model.layers.{i}.v_cache"),
        dt,
        shape![(cap), (kvh), (dv)],
    )?;

    let q = b.matmul(h, wq)?;
    let q = b.reshape(q, shape![T, (nh), (dk)])?;
    b.name(q, "q");
    let k = b.matmul(h, wk)?;
    let k = b.reshape(k, shape![T, (kvh), (dk)])?;
    b.name(k, "k");
    let v = b.matmul(h, wv)?;
    let v = b.reshape(v, shape![T, (kvh), (dv)])?;
    let v = b.scale(v, cfg.attention_value_scale)?;
    b.name(v, "v");
    let theta = if sliding {
        cfg.swa_rope_theta
    } else {
        cfg.rope_theta
    };
    let rot = cfg.rotary_dims();
    let q = b.rope(q, pos, theta, rot)?;
    b.name(q, "q_rope");
    let k = b.rope(k, pos, theta, rot)?;
    b.name(k, "k_rope");
    let keys = b.kv_append(kc, k, "S", sliding)?;
    b.name(keys, "keys");
    let values = b.kv_append(vc, v, "S", sliding)?;
    b.name(values, "values");
    let (sinks, mask) = if sliding {
        let s = b.weight(&format!("{p}.sinks"), dt, shape![(nh)])?;
        let window = u32::try_from(cfg.sliding_window).unwrap_or(u32::MAX);
        (
            Some(s),
            Mask::Causal {
                window: Some(window),
            },
        )
    } else {
        (None, Mask::Causal { window: None })
    };
    let a = b.attention(q, keys, values, sinks, mask, (dk as f32).powf(-0.5))?;
    b.name(a, "attn");
    let a = b.reshape(a, shape![T, (nh * dv)])?;
    let o = b.matmul(a, wo)?;
    Ok(b.name(o, "out"))
}

/// Decoder layer `i`: pre-norm attention and MLP (dense or routed) with residuals.
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
        let m = if cfg.dense_layers[i] {
            b.scoped("mlp", |b| {
                dense_mlp(b, h, &format!("{p}.mlp"), hid, cfg.intermediate_size, dt)
            })?
        } else {
            b.scoped("moe", |b| {
                let wr = b.weight(
                    &format!("{p}.mlp.gate.weight"),
                    dt,
                    shape![(cfg.n_routed_experts), (hid)],
                )?;
                let bias = b.weight(
                    &format!("{p}.mlp.gate.e_score_correction_bias"),
                    DType::F32,
                    shape![(cfg.n_routed_experts)],
                )?;
                // `F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))`
                let logits = b.matmul_to(h, wr, DType::F32)?;
                b.name(logits, "router_logits");
                moe_experts(
                    b,
                    h,
                    logits,
                    Some(bias),
                    &cfg.router(),
                    &format!("{p}.mlp"),
                    cfg.n_routed_experts,
                    hid,
                    cfg.moe_intermediate_size,
                    opt.expert_dtype,
                )
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
    let mut b = Builder::new(&format!("mimo_v2_layer{i}"), &["S", "T"]);
    let x = b.input("x", opt.dtype, shape![T, (cfg.hidden_size)])?;
    let pos = b.input("pos", DType::I32, shape![T])?;
    let y = decoder_layer(&mut b, cfg, opt, i, x, pos)?;
    b.output("hidden", y)?;
    b.finish()
}

/// The whole forward: token ids `[T]` and positions `[T]` in, f32 logits
/// `[T, vocab]` out, plus the last layer's hidden states.
pub fn forward_graph(cfg: &Config, opt: &GraphOptions) -> Result<Graph> {
    let mut b = Builder::new("mimo_v2", &["S", "T"]);
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
