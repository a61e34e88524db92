//! Qwen3-MoE: full causal attention with per-head q/k RMSNorm and full RoPE,
//! softmax-routed experts.
//!
//! Reference: transformers `models/qwen3_moe/modeling_qwen3_moe.py`
//! (`Qwen3MoeForCausalLM`). Facts used here, with the reference lines:
//! - per-head norms before RoPE: `self.q_norm(self.q_proj(hidden_states).view(hidden_shape))`;
//! - router logits in the model dtype, softmax in f32:
//!   `softmax(router_logits, dtype=torch.float, dim=-1)`, then `topk`, and
//!   `router_top_value /= router_top_value.sum(dim=-1, keepdim=True)` when `norm_topk_prob`;
//! - a layer is sparse iff `layer_idx not in mlp_only_layers` and
//!   `(layer_idx + 1) % decoder_sparse_step == 0`.

use tilefuse_ir::{Builder, Graph, Mask, NodeId, Result, RouterConfig, ScoreFn};
use tilefuse_macros::graph;

use crate::common::{dense_mlp, embed_tokens, lm_head, moe_experts, GraphOptions};

/// The architecture parameters (transformers field names).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `num_key_value_heads`.
    pub num_key_value_heads: usize,
    /// `head_dim`.
    pub head_dim: usize,
    /// `rope_theta`.
    pub rope_theta: f32,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f32,
    /// `intermediate_size` (dense layers).
    pub intermediate_size: usize,
    /// `moe_intermediate_size`.
    pub moe_intermediate_size: usize,
    /// `num_experts`.
    pub num_experts: usize,
    /// `num_experts_per_tok`.
    pub num_experts_per_tok: usize,
    /// `norm_topk_prob`.
    pub norm_topk_prob: bool,
    /// `decoder_sparse_step`.
    pub decoder_sparse_step: usize,
    /// `mlp_only_layers`.
    pub mlp_only_layers: Vec<usize>,
}

impl Config {
    /// The Qwen3-30B-A3B shape.
    pub fn a3b() -> Config {
        Config {
            hidden_size: 2048,
            num_hidden_layers: 48,
            vocab_size: 151936,
            num_attention_heads: 32,
            num_key_value_heads: 4,
            head_dim: 128,
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-6,
            intermediate_size: 6144,
            moe_intermediate_size: 768,
            num_experts: 128,
            num_experts_per_tok: 8,
            norm_topk_prob: true,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![],
        }
    }

    /// A tiny configuration with a dense layer and more experts than top-k.
    pub fn tiny() -> Config {
        Config {
            hidden_size: 64,
            num_hidden_layers: 2,
            vocab_size: 256,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-6,
            intermediate_size: 96,
            moe_intermediate_size: 32,
            num_experts: 8,
            num_experts_per_tok: 2,
            norm_topk_prob: false,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![0],
        }
    }

    /// True when layer `i` uses routed experts.
    pub fn is_sparse(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i)
            && self.num_experts > 0
            && self.decoder_sparse_step > 0
            && (i + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// The router settings.
    pub fn router(&self) -> RouterConfig {
        RouterConfig {
            score: ScoreFn::Softmax,
            top_k: self.num_experts_per_tok,
            n_group: 1,
            topk_group: 1,
            norm_topk: self.norm_topk_prob,
            norm_eps: 0.0,
            scale: 1.0,
        }
    }
}

/// The attention block of layer `i` on the normed input `h`.
#[graph(scope = "attn")]
fn attention(cfg: &Config, opt: &GraphOptions, i: usize, h: NodeId, pos: NodeId) -> NodeId {
    let p = format!("model.layers.{i}.self_attn");
    let dt = opt.dtype;
    let (nh, kvh, d, hid, eps) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.hidden_size,
        cfg.rms_norm_eps,
    );
    let wq = weight!("{p}.q_proj.weight", dt, [nh * d, hid]);
    let wk = weight!("{p}.k_proj.weight", dt, [kvh * d, hid]);
    let wv = weight!("{p}.v_proj.weight", dt, [kvh * d, hid]);
    let wo = weight!("{p}.o_proj.weight", dt, [hid, nh * d]);
    let qn = weight!("{p}.q_norm.weight", dt, [d]);
    let kn = weight!("{p}.k_norm.weight", dt, [d]);
    let kc = cache!("model.layers.{i}.k_cache", dt, [opt.context, kvh, d]);
    let vc = cache!("model.layers.{i}.v_cache", dt, [opt.context, kvh, d]);

    // `self.q_norm(self.q_proj(hidden_states).view(hidden_shape))`
    let q = h.matmul(wq).reshape([T, nh, d]).rms_norm(qn, eps);
    let k = h.matmul(wk).reshape([T, kvh, d]).rms_norm(kn, eps);
    let v = h.matmul(wv).reshape([T, kvh, d]);
    let q_rope = q.rope(pos, cfg.rope_theta, d);
    let k_rope = k.rope(pos, cfg.rope_theta, d);
    let keys = kc.kv_append(k_rope, S, false);
    let values = vc.kv_append(v, S, false);
    let attn = q_rope.attention(
        keys,
        values,
        None,
        Mask::Causal { window: None },
        (d as f32).powf(-0.5),
    );
    attn.reshape([T, nh * d]).matmul(wo)
}

/// The routed-expert block of layer `i` on the normed input `h`.
#[graph(scope = "moe", calls(moe_experts))]
fn moe(cfg: &Config, opt: &GraphOptions, i: usize, h: NodeId) -> NodeId {
    let p = format!("model.layers.{i}.mlp");
    let hid = cfg.hidden_size;
    let wr = weight!("{p}.gate.weight", opt.dtype, [cfg.num_experts, hid]);
    // Logits in the model dtype, softmax in f32.
    let router_logits = h.matmul(wr).cast(f32);
    moe_experts(
        h,
        router_logits,
        None,
        &cfg.router(),
        &p,
        cfg.num_experts,
        hid,
        cfg.moe_intermediate_size,
        opt.expert_dtype,
    )
}

/// Decoder layer `i`: pre-norm attention and MLP (routed or dense) with residuals.
#[graph(scope = "layer{i}", calls(attention, dense_mlp, moe))]
pub fn decoder_layer(
    cfg: &Config,
    opt: &GraphOptions,
    i: usize,
    x: Tensor![T, cfg.hidden_size],
    pos: Tensor![T],
) -> NodeId {
    let p = format!("model.layers.{i}");
    let (dt, hid, eps) = (opt.dtype, cfg.hidden_size, cfg.rms_norm_eps);
    let ln1 = weight!("{p}.input_layernorm.weight", dt, [hid]);
    let ln2 = weight!("{p}.post_attention_layernorm.weight", dt, [hid]);
    let attn_norm = x.rms_norm(ln1, eps);
    let attn_residual = x + attention(cfg, opt, i, attn_norm, pos);
    let mlp_norm = attn_residual.rms_norm(ln2, eps);
    let mlp = if cfg.is_sparse(i) {
        moe(cfg, opt, i, mlp_norm)
    } else {
        dense_mlp(
            mlp_norm,
            &format!("{p}.mlp"),
            hid,
            cfg.intermediate_size,
            dt,
        )
    };
    attn_residual + mlp
}

/// A graph of one decoder layer: inputs `x [T, H]` and `pos i32 [T]`, output `hidden`.
pub fn layer_graph(cfg: &Config, opt: &GraphOptions, i: usize) -> Result<Graph> {
    let mut b = Builder::new(&format!("qwen3_moe_layer{i}"), &["S", "T"]);
    one_layer(&mut b, cfg, opt, i)?;
    b.finish()
}

/// The inputs, layer `i` and the output of [`layer_graph`].
#[graph(scope = "", calls(decoder_layer))]
fn one_layer(cfg: &Config, opt: &GraphOptions, i: usize) {
    let x = input!("x", opt.dtype, [T, cfg.hidden_size]);
    let pos = input!("pos", i32, [T]);
    output!("hidden", decoder_layer(cfg, opt, i, x, pos));
}

/// The whole forward: token ids and positions in, f32 logits and the last hidden states out.
pub fn forward_graph(cfg: &Config, opt: &GraphOptions) -> Result<Graph> {
    let mut b = Builder::new("qwen3_moe", &["S", "T"]);
    forward(&mut b, cfg, opt)?;
    b.finish()
}

/// The body of [`forward_graph`].
#[graph(scope = "", calls(decoder_layer, embed_tokens, lm_head))]
fn forward(cfg: &Config, opt: &GraphOptions) {
    let (dt, hid, v) = (opt.dtype, cfg.hidden_size, cfg.vocab_size);
    let ids = input!("ids", i32, [T]);
    let pos = input!("pos", i32, [T]);
    let mut x = embed_tokens(dt, v, hid, ids);
    for i in 0..cfg.num_hidden_layers {
        x = decoder_layer(cfg, opt, i, x, pos);
    }
    lm_head(dt, v, hid, cfg.rms_norm_eps, x);
}
