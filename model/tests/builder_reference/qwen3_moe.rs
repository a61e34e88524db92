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

use tilefuse_ir::{shape, Builder, DType, Graph, Mask, NodeId, Result, RouterConfig, ScoreFn};

use crate::common::{dense_mlp, moe_experts, GraphOptions};

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
            && (i + 1) % self.decoder_sparse_step == 0
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

fn attention(b: &mut Builder, cfg: &Config, opt: &GraphOptions, i: usize, h: NodeId, pos: NodeId) -> Result<NodeId> {
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
    let kc = b.cache(&format!("model.layers.{i}.k_cache"), dt, shape![(opt.context), (kvh), (d)])?;
    let vc = b.cache(&format!("model.layers.{i}.v_cache"), dt, shape![(opt.context), (kvh), (d)])?;

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
    let a = b.attention(q, keys, values, None, Mask::Causal { window: None }, (d as f32).powf(-0.5))?;
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
        let ln2 = b.weight(&format!("{p}.post_attention_layernorm.weight"), dt, shape![(hid)])?;
        let h = b.rms_norm(x, ln1, cfg.rms_norm_eps)?;
        b.name(h, "attn_norm");
        let a = b.scoped("attn", |b| attention(b, cfg, opt, i, h, pos))?;
        let x = b.add(x, a)?;
        b.name(x, "attn_residual");
        let h = b.rms_norm(x, ln2, cfg.rms_norm_eps)?;
        b.name(h, "mlp_norm");
        let m = if cfg.is_sparse(i) {
            b.scoped("moe", |b| {
                let wr = b.weight(&format!("{p}.mlp.gate.weight"), dt, shape![(cfg.num_experts), (hid)])?;
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
            b.scoped("mlp", |b| dense_mlp(b, h, &format!("{p}.mlp"), hid, cfg.intermediate_size, dt))?
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
