//! MiMo-V2 (Xiaomi MiMo-V2-Flash): hybrid sliding-window / full attention with
//! attention sinks, partial RoPE, value scaling, and sigmoid-routed experts.
//!
//! Reference: transformers `models/mimo_v2_flash/modeling_mimo_v2_flash.py`
//! (`MiMoV2FlashForCausalLM`). Facts used here, with the reference lines:
//! - sliding layers use twice the KV heads: `num_kv_heads = config.num_key_value_heads * 2 if is_swa`;
//! - value scale right after `v_proj`: `value_states = value_states * self.v_scale`;
//! - partial rotate-half RoPE on the first `int(head_dim * partial_rotary_factor)` dims;
//! - sinks on sliding layers only: `self.sinks = ... if is_swa else None`, an extra softmax column;
//! - router: fp32 logits, `sigmoid`, choice on `scores + e_score_correction_bias`,
//!   weights from the unbiased scores, `/ (sum + 1e-20)`, `* routed_scaling_factor`.

use tilefuse_ir::{Builder, Graph, Mask, NodeId, Result, RouterConfig, ScoreFn};
use tilefuse_macros::graph;

use crate::common::{dense_mlp, embed_tokens, lm_head, moe_experts, GraphOptions};

/// Attention kind of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerType {
    /// Full causal attention, `rope_theta`, `num_key_value_heads`, no sinks.
    Full,
    /// Sliding-window attention, `swa_rope_theta`, twice the KV heads, sinks.
    Sliding,
}

/// The architecture parameters (transformers field names).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `layer_types`, one per layer.
    pub layer_types: Vec<LayerType>,
    /// `sliding_window`.
    pub sliding_window: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (full layers; sliding layers use twice this).
    pub num_key_value_heads: usize,
    /// `head_dim` (q and k).
    pub head_dim: usize,
    /// `v_head_dim` (v and the o_proj input).
    pub v_head_dim: usize,
    /// `attention_value_scale`.
    pub attention_value_scale: f32,
    /// `partial_rotary_factor`.
    pub partial_rotary_factor: f32,
    /// RoPE theta of full layers.
    pub rope_theta: f32,
    /// RoPE theta of sliding layers.
    pub swa_rope_theta: f32,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f32,
    /// `mlp_layer_types`: true where the layer is dense.
    pub dense_layers: Vec<bool>,
    /// `intermediate_size` (dense MLP).
    pub intermediate_size: usize,
    /// `moe_intermediate_size`.
    pub moe_intermediate_size: usize,
    /// `n_routed_experts`.
    pub n_routed_experts: usize,
    /// `num_experts_per_tok`.
    pub num_experts_per_tok: usize,
    /// `n_group`.
    pub n_group: usize,
    /// `topk_group`.
    pub topk_group: usize,
    /// `norm_topk_prob`.
    pub norm_topk_prob: bool,
    /// `routed_scaling_factor` (null in the hub config means 1.0).
    pub routed_scaling_factor: f32,
}

impl Config {
    /// The transformers default layer pattern: full at `i == 0` or `(i + 1) % 6 == 0`.
    pub fn default_layer_types(n: usize) -> Vec<LayerType> {
        (0..n)
            .map(|i| {
                if i == 0 || (i + 1) % 6 == 0 {
                    LayerType::Full
                } else {
                    LayerType::Sliding
                }
            })
            .collect()
    }

    /// The released MiMo-V2-Flash widths with `layers` layers.
    pub fn flash(layers: usize) -> Config {
        Config {
            hidden_size: 4096,
            num_hidden_layers: layers,
            vocab_size: 152576,
            layer_types: Config::default_layer_types(layers),
            sliding_window: 128,
            num_attention_heads: 64,
            num_key_value_heads: 4,
            head_dim: 192,
            v_head_dim: 128,
            attention_value_scale: 0.707,
            partial_rotary_factor: 0.334,
            rope_theta: 5_000_000.0,
            swa_rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            dense_layers: (0..layers).map(|i| i == 0).collect(),
            intermediate_size: 16384,
            moe_intermediate_size: 2048,
            n_routed_experts: 256,
            num_experts_per_tok: 8,
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        }
    }

    /// A tiny configuration that exercises everything: full and sliding
    /// layers, sinks, partial RoPE, a dense first layer, grouped routing.
    pub fn tiny() -> Config {
        Config {
            hidden_size: 64,
            num_hidden_layers: 3,
            vocab_size: 256,
            layer_types: vec![LayerType::Full, LayerType::Sliding, LayerType::Sliding],
            sliding_window: 8,
            num_attention_heads: 4,
            num_key_value_heads: 1,
            head_dim: 24,
            v_head_dim: 16,
            attention_value_scale: 0.707,
            partial_rotary_factor: 0.334,
            rope_theta: 5_000_000.0,
            swa_rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            dense_layers: vec![true, false, false],
            intermediate_size: 128,
            moe_intermediate_size: 32,
            n_routed_experts: 8,
            num_experts_per_tok: 2,
            n_group: 2,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 1.5,
        }
    }

    /// KV heads of a layer.
    pub fn kv_heads(&self, layer: usize) -> usize {
        match self.layer_types[layer] {
            LayerType::Full => self.num_key_value_heads,
            LayerType::Sliding => 2 * self.num_key_value_heads,
        }
    }

    /// Rotated dims per head: `int(head_dim * partial_rotary_factor)`, as the reference truncates.
    pub fn rotary_dims(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor as f64) as usize
    }

    /// The router settings.
    pub fn router(&self) -> RouterConfig {
        RouterConfig {
            score: ScoreFn::Sigmoid,
            top_k: self.num_experts_per_tok,
            n_group: self.n_group,
            topk_group: self.topk_group,
            norm_topk: self.norm_topk_prob,
            norm_eps: 1e-20,
            scale: self.routed_scaling_factor,
        }
    }
}

/// The attention block of layer `i` on the normed input `h`.
#[graph(scope = "attn")]
fn attention(cfg: &Config, opt: &GraphOptions, i: usize, h: NodeId, pos: NodeId) -> NodeId {
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
    let wq = weight!("{p}.q_proj.weight", dt, [nh * dk, hid]);
    let wk = weight!("{p}.k_proj.weight", dt, [kvh * dk, hid]);
    let wv = weight!("{p}.v_proj.weight", dt, [kvh * dv, hid]);
    let wo = weight!("{p}.o_proj.weight", dt, [hid, nh * dv]);
    let cap = if sliding {
        opt.ring_capacity(cfg.sliding_window)
    } else {
        opt.context
    };
    let kc = cache!("model.layers.{i}.k_cache", dt, [cap, kvh, dk]);
    let vc = cache!("model.layers.{i}.v_cache", dt, [cap, kvh, dv]);

    let q = h.matmul(wq).reshape([T, nh, dk]);
    let k = h.matmul(wk).reshape([T, kvh, dk]);
    // `value_states = value_states * self.v_scale`
    let v = h.matmul(wv).reshape([T, kvh, dv]) * cfg.attention_value_scale;
    let theta = if sliding {
        cfg.swa_rope_theta
    } else {
        cfg.rope_theta
    };
    let rot = cfg.rotary_dims();
    let q_rope = q.rope(pos, theta, rot);
    let k_rope = k.rope(pos, theta, rot);
    let keys = kc.kv_append(k_rope, S, sliding);
    let values = vc.kv_append(v, S, sliding);
    let (sinks, mask) = if sliding {
        let window = u32::try_from(cfg.sliding_window).unwrap_or(u32::MAX);
        (
            Some(weight!("{p}.sinks", dt, [nh])),
            Mask::Causal {
                window: Some(window),
            },
        )
    } else {
        (None, Mask::Causal { window: None })
    };
    let attn = q_rope.attention(keys, values, sinks, mask, (dk as f32).powf(-0.5));
    attn.reshape([T, nh * dv]).matmul(wo)
}

/// The routed-expert block of layer `i` on the normed input `h`.
#[graph(scope = "moe", calls(moe_experts))]
fn moe(cfg: &Config, opt: &GraphOptions, i: usize, h: NodeId) -> NodeId {
    let p = format!("model.layers.{i}.mlp");
    let (e, hid) = (cfg.n_routed_experts, cfg.hidden_size);
    let wr = weight!("{p}.gate.weight", opt.dtype, [e, hid]);
    let bias = weight!("{p}.gate.e_score_correction_bias", f32, [e]);
    // `F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))`
    let router_logits = h.matmul_to(wr, f32);
    moe_experts(
        h,
        router_logits,
        Some(bias),
        &cfg.router(),
        &p,
        e,
        hid,
        cfg.moe_intermediate_size,
        opt.expert_dtype,
    )
}

/// Decoder layer `i`: pre-norm attention and MLP (dense or routed) with residuals.
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
    let mlp = if cfg.dense_layers[i] {
        dense_mlp(
            mlp_norm,
            &format!("{p}.mlp"),
            hid,
            cfg.intermediate_size,
            dt,
        )
    } else {
        moe(cfg, opt, i, mlp_norm)
    };
    attn_residual + mlp
}

/// A graph of one decoder layer: inputs `x [T, H]` and `pos i32 [T]`, output `hidden`.
pub fn layer_graph(cfg: &Config, opt: &GraphOptions, i: usize) -> Result<Graph> {
    let mut b = Builder::new(&format!("mimo_v2_layer{i}"), &["S", "T"]);
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

/// The whole forward: token ids `[T]` and positions `[T]` in, f32 logits
/// `[T, vocab]` out, plus the last layer's hidden states.
pub fn forward_graph(cfg: &Config, opt: &GraphOptions) -> Result<Graph> {
    let mut b = Builder::new("mimo_v2", &["S", "T"]);
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
