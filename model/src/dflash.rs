//! DFlash block-diffusion drafting: the draft model, the target forward with
//! context features, the draft config and its checkpoint layout, and seeded
//! random draft presets for the tiny targets.
//!
//! Reference: z-lab/dflash `model/dflash.py` (`DFlashDraftModel`,
//! `Qwen3DFlashAttention`, `spec_generate`); see REFERENCE.md §3 and
//! `notes/reference-semantics.md` ("DFlash drafter").
//!
//! # The two graphs
//!
//! **Target with context features** ([`target_graph`]): the architecture's
//! ordinary forward (symbols `S`, `T`; inputs `ids`, `pos`; outputs `logits`,
//! `hidden`) plus one output, [`CONTEXT_OUTPUT`] `[T, k·H]`: the outputs of the
//! chosen target layers (`layer{id}.out`, the residual stream after decoder
//! layer `id`, i.e. Hugging Face `hidden_states[id + 1]`), concatenated in
//! `target_layer_ids` order. The graph is the one [`Arch::forward_graph`]
//! builds, with a concat and an output added, so its logits are the plain
//! forward's bit for bit.
//!
//! **Draft** ([`draft_graph`]), symbols `S` (context positions already in the
//! draft's caches), `C` (newly committed context positions in this call) and
//! `T` (the block size B):
//!
//! | input | type | meaning |
//! |---|---|---|
//! | `ids` | `i32[T]` | the block: the last committed token, then `T − 1` mask ids ([`DraftConfig::mask_id`]) |
//! | `pos` | `i32[T]` | the block's absolute positions `S+C .. S+C+T` |
//! | [`CONTEXT_OUTPUT`] | `[C, k·H]` | the target's context features of positions `S .. S+C` |
//! | [`CONTEXT_POS_INPUT`] | `i32[C]` | their absolute positions `S .. S+C` |
//!
//! Output `logits f32[T, V]` through the target's LM head; row `j ≥ 1`
//! predicts the token at block position `j` (no shift), row 0 is unused;
//! and [`GREEDY_OUTPUT`] `i32[T]`, the argmax of each row (the target graph
//! has one too), so greedy decoding on the GPU copies back a few ids
//! instead of the logits.
//!
//! Per call: `ctx = hidden_norm(fc(context_features))`; the block is embedded
//! with the target's `model.embed_tokens.weight` (with [`MaskToken::Embedding`],
//! a table with one extra row, `mask_embedding`, at id `V`). Each draft layer
//! (Qwen3 style) computes `q` from the block only (q_norm, RoPE at the block
//! positions) and `k`/`v` from `concat([ctx ; input_layernorm(block)], axis 0)`, the `C + T`
//! rows at positions `S .. S+C+T` (k_norm, RoPE at `concat(context_pos,
//! pos)`), appends them to the layer's caches at `S`
//! (`attn.kv_append{len=S}`) and attends over the `L = S+C+T` cached rows
//! with [`Mask::Block`]: every block query sees the whole block and the
//! context (all of it, or with a sliding window `w` the context positions
//! `j > p − w` for the query at `p`); or, for layers the config makes causal
//! ([`DraftConfig::layer_causal`]), [`Mask::Causal`] with the same window. The
//! newer reference's non-causal window is symmetric (`|p − j| < w`), which
//! equals [`Mask::Block`] whenever `B ≤ w`. The queries are the last `T`
//! keys, the interpreter's convention "query `i` sits at `L − T + i`", so the
//! mask positions equal the RoPE positions. The RoPE is the draft's own (its
//! `rope_theta`), full head width. A dense SwiGLU MLP, pre-norm residuals, a
//! final `norm`.
//!
//! The block's rows land in the caches at `S+C ..` and the next call, whose
//! `S` is this call's `S + C`, overwrites them with its own context before
//! any query reads them: in effect only context stays cached, which is
//! exactly the reference's `past_key_values_draft.crop(start)`, and one
//! append of `C + T` rows is the same attention pattern as the target's (one
//! kernel family serves both on the GPU). Since the engine feeds the draft
//! only committed positions, the draft cache never needs rolling back: its
//! `S` is the committed length before this call's context.
//!
//! Draft caches are `draft.layers.{i}.{k,v}_cache`: full layers hold
//! `GraphOptions::context` positions; sliding layers a ring of
//! `GraphOptions::ring_capacity(window)` = `w + max_tokens − 1` slots. One
//! call appends `C + T ≤ max_tokens` rows (the engine feeds long context in
//! chunks), so no two rows of a call share a slot, and the oldest row a block
//! query needs (`S+C−w+1`) is never overwritten by the same call.
//!
//! # Config and checkpoint layout
//!
//! A draft checkpoint is a Qwen3-style `config.json` plus safetensors without
//! embedding or LM head (z-lab layout, read by [`DraftConfig::from_hf_json`]):
//!
//! | config field | [`DraftConfig`] field |
//! |---|---|
//! | `hidden_size` (equals the target's) | `hidden_size` |
//! | `num_hidden_layers` (draft layers, typically 5) | `num_hidden_layers` |
//! | `num_attention_heads`, `num_key_value_heads`, `head_dim` | same |
//! | `intermediate_size`, `rms_norm_eps` | same |
//! | `rope_theta` or `rope_parameters.rope_theta` | `rope_theta` |
//! | `layer_types` (`full_attention` / `sliding_attention`), `sliding_window` | `layer_types`, `sliding_window` |
//! | `vocab_size` (the target's), `num_target_layers` | same |
//! | `block_size` or `dflash_config.block_size` | `block_size` |
//! | `dflash_config.target_layer_ids` (default [`build_target_layer_ids`]) | `target_layer_ids` |
//! | `dflash_config.mask_token_id` | `mask` = [`MaskToken::Id`] |
//! | `is_causal` (absent: sliding layers causal, as the newer reference) | `is_causal` |
//!
//! Tensors (bf16): `fc.weight [H, k·H]`, `hidden_norm.weight [H]`,
//! `layers.{i}.input_layernorm.weight [H]`,
//! `layers.{i}.post_attention_layernorm.weight [H]`,
//! `layers.{i}.self_attn.{q,k,v,o}_proj.weight`,
//! `layers.{i}.self_attn.{q,k}_norm.weight [head_dim]`,
//! `layers.{i}.mlp.{gate,up,down}_proj.weight`, `norm.weight [H]`, and, for a
//! drafter with its own mask embedding (the MiMo-V2.5 drafter's
//! `mask_embedding.pt`), `mask_embedding [H]` ([`MaskToken::Embedding`]). The
//! graph also reads the target's `model.embed_tokens.weight` and
//! `lm_head.weight` ([`SHARED_WEIGHTS`]).
//!
//! With [`MaskToken::Embedding`] the mask positions use id `V` (one past the
//! target vocabulary) in a table `concat(embed_tokens, mask_embedding)`. The
//! MiMo reference instead overwrites the embedding row of its
//! `mask_token_id`; the two differ only if the target itself emits the mask
//! token as the block's first token, which it is trained never to do.
//!
//! Not supported (rejected by the parser with the field named): the DFlash2
//! extras (`final_logit_softcapping`, `output_multiplier`,
//! `input_embedding_scale`, convolutions, candidate selectors) and attention
//! biases.

use std::collections::BTreeMap;

use serde_json::Value;
use tilefuse_ir::interp::Tensor;
use tilefuse_ir::{
    shape, Builder, DType, ErrorKind, Graph, InputKind, IrError, Mask, NodeId, Result,
};

use crate::common::GraphOptions;
use crate::presets::{self, Arch};

/// Name of the target output holding the context features `[T, k·H]`, and of
/// the draft input `[C, k·H]` that takes them.
pub const CONTEXT_OUTPUT: &str = "context_features";

/// Name of the output holding each row's greedy choice `i32[T]` (the argmax
/// of `logits`, ties to the lower id), in the target with context features
/// and in the draft: greedy decoding reads these few bytes instead of the
/// logits.
pub const GREEDY_OUTPUT: &str = "greedy";

/// Name of the draft input holding the context rows' positions `i32[C]`.
pub const CONTEXT_POS_INPUT: &str = "context_pos";

/// Target weights the draft graph reads (shared, never part of a draft checkpoint).
pub const SHARED_WEIGHTS: [&str; 2] = ["model.embed_tokens.weight", "lm_head.weight"];

/// Attention kind of a draft layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DraftLayerType {
    /// Non-causal attention over the whole context and the block.
    Full,
    /// Non-causal inside the block, a sliding window over the context.
    Sliding,
}

/// How the draft embeds the block's mask positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskToken {
    /// A token id of the target vocabulary (`dflash_config.mask_token_id`),
    /// embedded with the target's table.
    Id(u32),
    /// A dedicated learned embedding `mask_embedding [H]`, addressed by id `V`.
    Embedding,
}

/// The draft model's parameters (Hugging Face field names, see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct DraftConfig {
    /// `hidden_size`; equals the target's (the embedding is shared).
    pub hidden_size: usize,
    /// `num_hidden_layers`: draft decoder layers.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `num_key_value_heads`.
    pub num_key_value_heads: usize,
    /// `head_dim` (q, k and v).
    pub head_dim: usize,
    /// `intermediate_size` of the dense SwiGLU MLP.
    pub intermediate_size: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f32,
    /// The draft's own RoPE theta.
    pub rope_theta: f32,
    /// One per draft layer.
    pub layer_types: Vec<DraftLayerType>,
    /// Window of the sliding layers: a query at `p` sees context positions `> p − window`.
    pub sliding_window: usize,
    /// `vocab_size`: the target's vocabulary.
    pub vocab_size: usize,
    /// `num_target_layers`: decoder layers of the target.
    pub num_target_layers: usize,
    /// `dflash_config.target_layer_ids`: target layers whose outputs are the context features.
    pub target_layer_ids: Vec<usize>,
    /// Default block size B (the engine may use another).
    pub block_size: usize,
    /// How mask positions are embedded.
    pub mask: MaskToken,
    /// `is_causal`: `Some(false)` makes every layer bidirectional inside the
    /// block ([`Mask::Block`]), `Some(true)` every layer causal
    /// ([`Mask::Causal`], block position `i` sees block positions `<= i`);
    /// `None` is the newer reference's default: sliding layers causal, full
    /// layers bidirectional.
    pub is_causal: Option<bool>,
}

/// The reference's default target layers: one layer gives `[N / 2]`, else
/// `n` ids evenly spaced over `[1, N − 3]`:
/// `int(round(1 + i·(N − 4)/(n − 1)))`.
pub fn build_target_layer_ids(num_target_layers: usize, num_draft_layers: usize) -> Vec<usize> {
    let n = num_draft_layers;
    let big_n = num_target_layers as f64;
    if n <= 1 {
        return vec![num_target_layers / 2];
    }
    (0..n)
        .map(|i| {
            (1.0 + i as f64 * (big_n - 4.0) / (n as f64 - 1.0))
                .round()
                .max(0.0) as usize
        })
        .collect()
}

fn type_err(msg: String) -> IrError {
    IrError::new(ErrorKind::Type, msg)
}

impl DraftConfig {
    /// Width of the context features: `k · H` for `k` target layers.
    pub fn feature_width(&self) -> usize {
        self.target_layer_ids.len() * self.hidden_size
    }

    /// The id the block's mask positions carry: the configured id, or `V`
    /// (the extra row of the table) with a dedicated mask embedding.
    pub fn mask_id(&self) -> i32 {
        match self.mask {
            MaskToken::Id(id) => id as i32,
            MaskToken::Embedding => self.vocab_size as i32,
        }
    }

    /// True when draft layer `i` attends causally inside the block.
    pub fn layer_causal(&self, i: usize) -> bool {
        self.is_causal
            .unwrap_or(self.layer_types.get(i) == Some(&DraftLayerType::Sliding))
    }

    /// Checks the config on its own: layer types per layer, head counts,
    /// non-empty and in-range target layers, a mask id inside the vocabulary.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(type_err(format!("draft config: {m}")));
        if self.num_hidden_layers == 0 {
            return bad("num_hidden_layers is 0; a draft needs at least one layer".into());
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return bad(format!(
                "layer_types has {} entries but num_hidden_layers is {}; give one per layer",
                self.layer_types.len(),
                self.num_hidden_layers
            ));
        }
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim must be even and > 0 (RoPE rotates pairs), found {}",
                self.head_dim
            ));
        }
        if self.target_layer_ids.is_empty() {
            return bad(
                "target_layer_ids is empty; name the target layers whose outputs feed the draft"
                    .into(),
            );
        }
        if let Some(&id) = self
            .target_layer_ids
            .iter()
            .find(|&&i| i >= self.num_target_layers)
        {
            return bad(format!(
                "target layer {id} does not exist: the target has {} layers (0..{})",
                self.num_target_layers, self.num_target_layers
            ));
        }
        if self.layer_types.contains(&DraftLayerType::Sliding) && self.sliding_window == 0 {
            return bad("sliding layers need sliding_window >= 1".into());
        }
        if let MaskToken::Id(id) = self.mask {
            if id as usize >= self.vocab_size {
                return bad(format!(
                    "mask_token_id {id} is outside the vocabulary of {}; use a dedicated mask embedding",
                    self.vocab_size
                ));
            }
        }
        if self.block_size < 2 {
            return bad(format!(
                "block_size must be >= 2 (one committed token plus drafts), found {}",
                self.block_size
            ));
        }
        Ok(())
    }

    /// Checks that this draft fits `target`: the same hidden size, vocabulary
    /// and layer count as the target it was made for.
    pub fn check_target(&self, target: &Arch) -> Result<()> {
        let (h, v, n) = match target {
            Arch::MimoV2(c) => (c.hidden_size, c.vocab_size, c.num_hidden_layers),
            Arch::Qwen3Moe(c) => (c.hidden_size, c.vocab_size, c.num_hidden_layers),
        };
        if (h, v, n) != (self.hidden_size, self.vocab_size, self.num_target_layers) {
            return Err(type_err(format!(
                "the draft was made for a target with hidden size {}, vocabulary {} and {} layers, \
                 but this target has {h}, {v} and {n}; pick the draft preset of this target",
                self.hidden_size, self.vocab_size, self.num_target_layers
            )));
        }
        Ok(())
    }

    /// A draft for the tiny MiMo-V2 target: 2 layers (sliding window 6, then
    /// full), context from target layers 0 and 2, B = 8, a mask embedding
    /// (as the MiMo-V2.5 drafter).
    pub fn tiny_mimo() -> DraftConfig {
        DraftConfig {
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            intermediate_size: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            layer_types: vec![DraftLayerType::Sliding, DraftLayerType::Full],
            sliding_window: 6,
            vocab_size: 256,
            num_target_layers: 3,
            target_layer_ids: vec![0, 2],
            block_size: 8,
            mask: MaskToken::Embedding,
            is_causal: Some(false),
        }
    }

    /// A draft for the tiny Qwen3-MoE target: 2 full layers, context from
    /// target layers 0 and 1, B = 16, mask token id 0 (as the z-lab drafters).
    pub fn tiny_qwen() -> DraftConfig {
        DraftConfig {
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            intermediate_size: 96,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            layer_types: vec![DraftLayerType::Full; 2],
            sliding_window: 0,
            vocab_size: 256,
            num_target_layers: 2,
            target_layer_ids: vec![0, 1],
            block_size: 16,
            mask: MaskToken::Id(0),
            is_causal: Some(false),
        }
    }

    /// A draft at the MiMo-V2-Flash width for the `layers`-layer target
    /// preset: 5 full-attention Qwen3-style layers (32 query heads, 8 KV
    /// heads of 128, SwiGLU 12288), context from the reference's default
    /// target layers, B = 16, mask token id 0. Shaped like the published
    /// DFlash drafters for benchmarks (random weights); not a trained model.
    pub fn flash_width(layers: usize) -> DraftConfig {
        DraftConfig {
            hidden_size: 4096,
            num_hidden_layers: 5,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            intermediate_size: 12288,
            rms_norm_eps: 1e-5,
            rope_theta: 1_000_000.0,
            layer_types: vec![DraftLayerType::Full; 5],
            sliding_window: 0,
            vocab_size: 152_576,
            num_target_layers: layers,
            target_layer_ids: build_target_layer_ids(layers, 5),
            block_size: 16,
            mask: MaskToken::Id(0),
            is_causal: Some(false),
        }
    }

    /// A draft at the Qwen3-30B-A3B width: 5 full-attention layers (32
    /// query heads, 4 KV heads of 128, SwiGLU 6144) over the reference's
    /// default target layers of 48, B = 16, mask token id 0. For benchmarks.
    pub fn a3b_width() -> DraftConfig {
        DraftConfig {
            hidden_size: 2048,
            num_hidden_layers: 5,
            num_attention_heads: 32,
            num_key_value_heads: 4,
            head_dim: 128,
            intermediate_size: 6144,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            layer_types: vec![DraftLayerType::Full; 5],
            sliding_window: 0,
            vocab_size: 151_936,
            num_target_layers: 48,
            target_layer_ids: build_target_layer_ids(48, 5),
            block_size: 16,
            mask: MaskToken::Id(0),
            is_causal: Some(false),
        }
    }

    /// Reads a z-lab style draft `config.json` (see the module docs for the
    /// fields). The mask is [`MaskToken::Id`]; a loader that finds a
    /// `mask_embedding` tensor switches it to [`MaskToken::Embedding`].
    /// Errors name the field and say what was expected.
    pub fn from_hf_json(text: &str) -> std::result::Result<DraftConfig, String> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| format!("draft config.json is not valid JSON: {e}"))?;
        let dc = v.get("dflash_config").cloned().unwrap_or(Value::Null);
        for (obj, name) in [(&v, ""), (&dc, "dflash_config.")] {
            for f in [
                "final_logit_softcapping",
                "output_multiplier",
                "input_embedding_scale",
                "conv_kernel_size",
                "selector_rank",
            ] {
                if obj.get(f).is_some_and(|x| !x.is_null()) {
                    return Err(format!(
                        "draft config field `{name}{f}` (a DFlash2 feature) is not supported; \
                         use a DFlash (v1) drafter"
                    ));
                }
            }
        }
        let mut is_causal = None;
        for f in ["is_causal", "causal"] {
            match v.get(f) {
                None | Some(Value::Null) => {}
                Some(Value::Bool(c)) => is_causal = Some(*c),
                Some(x) => {
                    return Err(format!(
                        "draft config field `{f}` must be a boolean, found {x}"
                    ))
                }
            }
        }
        if v.get("attention_bias").and_then(Value::as_bool) == Some(true) {
            return Err(
                "draft config `attention_bias: true` is not supported (no q/k/v biases)".into(),
            );
        }
        let num = |obj: &Value, f: &str| -> std::result::Result<Option<f64>, String> {
            match obj.get(f) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| format!("draft config field `{f}` must be a number, found {x}")),
            }
        };
        let usize_of = |obj: &Value, f: &str| -> std::result::Result<Option<usize>, String> {
            match num(obj, f)? {
                None => Ok(None),
                Some(x) if x >= 0.0 && x.fract() == 0.0 => Ok(Some(x as usize)),
                Some(x) => Err(format!(
                    "draft config field `{f}` must be a non-negative integer, found {x}"
                )),
            }
        };
        let need = |f: &str| -> std::result::Result<usize, String> {
            usize_of(&v, f)?
                .ok_or_else(|| format!("draft config.json has no `{f}`; it is required"))
        };
        let hidden_size = need("hidden_size")?;
        let num_hidden_layers = need("num_hidden_layers")?;
        let num_attention_heads = need("num_attention_heads")?;
        let num_key_value_heads =
            usize_of(&v, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = match usize_of(&v, "head_dim")? {
            Some(d) => d,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => return Err("draft config: num_attention_heads is 0".into()),
        };
        let rope_theta = match num(&v, "rope_theta")? {
            Some(t) => t,
            None => match v.get("rope_parameters") {
                Some(rp) => num(rp, "rope_theta")?
                    .ok_or("draft config `rope_parameters` has no `rope_theta`".to_string())?,
                None => 10_000.0, // transformers' Qwen3Config default
            },
        } as f32;
        let sliding_window = usize_of(&v, "sliding_window")?;
        let layer_types = match v.get("layer_types") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(DraftLayerType::Full),
                    Some("sliding_attention") => Ok(DraftLayerType::Sliding),
                    _ => Err(format!(
                        "draft config `layer_types` entry {t} is not \"full_attention\" or \"sliding_attention\""
                    )),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
            _ => vec![DraftLayerType::Full; num_hidden_layers],
        };
        if layer_types.contains(&DraftLayerType::Sliding) && sliding_window.is_none() {
            return Err("draft config has sliding layers but no `sliding_window`".into());
        }
        let num_target_layers = need("num_target_layers")?;
        let target_layer_ids = match dc.get("target_layer_ids") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64().map(|u| u as usize).ok_or_else(|| {
                        format!("`dflash_config.target_layer_ids` entry {x} is not a layer index")
                    })
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
            _ => build_target_layer_ids(num_target_layers, num_hidden_layers),
        };
        let block_size = match usize_of(&v, "block_size")? {
            Some(b) => b,
            None => usize_of(&dc, "block_size")?
                .ok_or("draft config has no `block_size` (top level or in `dflash_config`)")?,
        };
        let mask_token_id = usize_of(&dc, "mask_token_id")?
            .ok_or("draft config has no `dflash_config.mask_token_id`")?;
        let cfg = DraftConfig {
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            intermediate_size: need("intermediate_size")?,
            rms_norm_eps: num(&v, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            layer_types,
            sliding_window: sliding_window.unwrap_or(0),
            vocab_size: need("vocab_size")?,
            num_target_layers,
            target_layer_ids,
            block_size,
            mask: MaskToken::Id(u32::try_from(mask_token_id).map_err(|_| {
                format!("`dflash_config.mask_token_id` {mask_token_id} does not fit 32 bits")
            })?),
            is_causal,
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }
}

/// Records the author's place on the next nodes.
macro_rules! here {
    ($b:expr) => {
        $b.set_loc(file!(), line!())
    };
}

/// The target's forward ([`Arch::forward_graph`]) with one more output,
/// [`CONTEXT_OUTPUT`] `[T, k·H]`: the outputs of decoder layers
/// `target_layer_ids` (nodes `layer{id}.out`) concatenated on the last axis.
pub fn target_graph(arch: &Arch, opt: &GraphOptions, target_layer_ids: &[usize]) -> Result<Graph> {
    let n = arch.num_layers();
    if target_layer_ids.is_empty() {
        return Err(type_err(
            "target_layer_ids is empty; name at least one target layer".into(),
        ));
    }
    let g = arch.forward_graph(opt)?;
    let order = g.topo_order()?;
    let mut layers = Vec::with_capacity(target_layer_ids.len());
    for &id in target_layer_ids {
        if id >= n {
            return Err(type_err(format!(
                "target layer {id} does not exist: the model has {n} layers (0..{n})"
            )));
        }
        let name = format!("layer{id}.out");
        let found: Vec<NodeId> = order
            .iter()
            .copied()
            .filter(|&x| g.node(x).name == name)
            .collect();
        match found[..] {
            [x] => layers.push(x),
            _ => {
                return Err(type_err(format!(
                    "the forward graph \"{}\" has {} nodes named \"{name}\" (the output of decoder \
                     layer {id}), expected exactly one; if the layer naming changed, update \
                     dflash::target_graph",
                    g.name,
                    found.len()
                )))
            }
        }
    }
    let mut b = Builder::from_graph(g);
    here!(b);
    let features = match layers[..] {
        // One layer: its output is the features (a concat needs two inputs).
        [one] => one,
        _ => b.scoped("dflash", |b| {
            let c = b.concat(&layers, 1)?;
            Ok::<_, IrError>(b.name(c, "context"))
        })?,
    };
    b.output(CONTEXT_OUTPUT, features)?;
    let logits = b
        .graph()
        .outputs()
        .iter()
        .find(|(n, _)| n == "logits")
        .map(|(_, id)| *id)
        .ok_or_else(|| type_err("the forward graph has no \"logits\" output".into()))?;
    let greedy = b.argmax(logits)?;
    b.output(GREEDY_OUTPUT, greedy)?;
    b.finish()
}

/// The graph options of a draft for a target built with `target`: the same
/// dtypes and context, and forwards of up to twice the target's
/// `max_tokens` rows (a verify block of up to `max_tokens` tokens plus the
/// context rows one step commits, at most as many again).
pub fn draft_options(target: &GraphOptions) -> GraphOptions {
    GraphOptions {
        max_tokens: 2 * target.max_tokens,
        ..*target
    }
}

/// The draft forward (see the module docs for its inputs, caches and output).
pub fn draft_graph(cfg: &DraftConfig, opt: &GraphOptions) -> Result<Graph> {
    cfg.validate()?;
    let (dt, h, v, f) = (
        opt.dtype,
        cfg.hidden_size,
        cfg.vocab_size,
        cfg.feature_width(),
    );
    let mut b = Builder::new("dflash_draft", &["S", "C", "T"]);
    here!(b);
    let ids = b.input("ids", DType::I32, shape![T])?;
    let pos = b.input("pos", DType::I32, shape![T])?;
    let ctx_in = b.input(CONTEXT_OUTPUT, dt, shape![C, (f)])?;
    let ctx_pos = b.input(CONTEXT_POS_INPUT, DType::I32, shape![C])?;
    let embed = b.weight(SHARED_WEIGHTS[0], dt, shape![(v), (h)])?;
    let table = match cfg.mask {
        MaskToken::Id(_) => embed,
        MaskToken::Embedding => {
            // One extra row at id V: `concat(embed_tokens, mask_embedding)`.
            let m = b.weight("mask_embedding", dt, shape![(h)])?;
            let m = b.reshape(m, shape![1, (h)])?;
            let t = b.concat(&[embed, m], 0)?;
            b.name(t, "table")
        }
    };
    let x = b.embedding(table, ids)?;
    let mut x = b.name(x, "embed");
    // `target_hidden = self.hidden_norm(self.fc(target_hidden))`, shared by every layer.
    let fc = b.weight("fc.weight", dt, shape![(h), (f)])?;
    let hn = b.weight("hidden_norm.weight", dt, shape![(h)])?;
    let ctx = b.matmul(ctx_in, fc)?;
    let ctx = b.rms_norm(ctx, hn, cfg.rms_norm_eps)?;
    let ctx = b.name(ctx, "context");
    for i in 0..cfg.num_hidden_layers {
        x = b.scoped(&format!("draft{i}"), |b| {
            draft_layer(b, cfg, opt, i, x, ctx, pos, ctx_pos)
        })?;
    }
    here!(b);
    let norm = b.weight("norm.weight", dt, shape![(h)])?;
    let head = b.weight(SHARED_WEIGHTS[1], dt, shape![(v), (h)])?;
    let y = b.rms_norm(x, norm, cfg.rms_norm_eps)?;
    let y = b.name(y, "final_norm");
    let logits = b.matmul_to(y, head, DType::F32)?;
    let logits = b.name(logits, "logits");
    b.output("logits", logits)?;
    let greedy = b.argmax(logits)?;
    b.output(GREEDY_OUTPUT, greedy)?;
    b.finish()
}

/// Draft layer `i` on the block hidden states `x [T, H]` with the projected
/// context `ctx [C, H]`.
#[allow(clippy::too_many_arguments)]
fn draft_layer(
    b: &mut Builder,
    cfg: &DraftConfig,
    opt: &GraphOptions,
    i: usize,
    x: NodeId,
    ctx: NodeId,
    pos: NodeId,
    ctx_pos: NodeId,
) -> Result<NodeId> {
    here!(b);
    let p = format!("layers.{i}");
    let (dt, h, eps) = (opt.dtype, cfg.hidden_size, cfg.rms_norm_eps);
    let (nh, kvh, d, inter) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    );
    let w = |b: &mut Builder, name: &str, s| b.weight(&format!("{p}.{name}"), dt, s);
    let ln1 = w(b, "input_layernorm.weight", shape![(h)])?;
    let ln2 = w(b, "post_attention_layernorm.weight", shape![(h)])?;
    let wq = w(b, "self_attn.q_proj.weight", shape![(nh * d), (h)])?;
    let wk = w(b, "self_attn.k_proj.weight", shape![(kvh * d), (h)])?;
    let wv = w(b, "self_attn.v_proj.weight", shape![(kvh * d), (h)])?;
    let wo = w(b, "self_attn.o_proj.weight", shape![(h), (nh * d)])?;
    let qn = w(b, "self_attn.q_norm.weight", shape![(d)])?;
    let kn = w(b, "self_attn.k_norm.weight", shape![(d)])?;
    let sliding = cfg.layer_types[i] == DraftLayerType::Sliding;
    let cap = if sliding {
        opt.ring_capacity(cfg.sliding_window)
    } else {
        opt.context
    };
    let kc = b.cache(&format!("draft.{p}.k_cache"), dt, shape![(cap), (kvh), (d)])?;
    let vc = b.cache(&format!("draft.{p}.v_cache"), dt, shape![(cap), (kvh), (d)])?;

    let hn = b.rms_norm(x, ln1, eps)?;
    let hn = b.name(hn, "attn_norm");
    // Queries from the block only: q_norm per head, then RoPE at the block positions.
    let q = b.matmul(hn, wq)?;
    let q = b.reshape(q, shape![T, (nh), (d)])?;
    let q = b.rms_norm(q, qn, eps)?;
    let q = b.rope(q, pos, cfg.rope_theta, d)?;
    let q = b.name(q, "q");
    // Keys and values of [new context rows ; block] (C+T rows at positions
    // S .. S+C+T), appended to the caches at S. The block's rows land at
    // S+C.., where the next call's context rows overwrite them: only
    // context stays in the caches, as in the reference's crop.
    let kv_in = b.concat(&[ctx, hn], 0)?;
    let kv_in = b.name(kv_in, "kv_in");
    let kv_pos = b.concat(&[ctx_pos, pos], 0)?;
    let kv_pos = b.name(kv_pos, "kv_pos");
    let k = b.matmul(kv_in, wk)?;
    let k = b.reshape(k, shape![("C+T"), (kvh), (d)])?;
    let k = b.rms_norm(k, kn, eps)?;
    let k = b.rope(k, kv_pos, cfg.rope_theta, d)?;
    let k = b.name(k, "k");
    let v = b.matmul(kv_in, wv)?;
    let v = b.reshape(v, shape![("C+T"), (kvh), (d)])?;
    let v = b.name(v, "v");
    // L = S+C+T keys; the queries are the last T.
    let keys = b.kv_append(kc, k, "S", sliding)?;
    let keys = b.name(keys, "keys");
    let values = b.kv_append(vc, v, "S", sliding)?;
    let values = b.name(values, "values");
    let window = if sliding {
        Some(u32::try_from(cfg.sliding_window).unwrap_or(u32::MAX))
    } else {
        None
    };
    let mask = if cfg.layer_causal(i) {
        Mask::Causal { window }
    } else {
        Mask::Block { window }
    };
    let att = b.attention(q, keys, values, None, mask, (d as f32).powf(-0.5))?;
    let att = b.reshape(att, shape![T, (nh * d)])?;
    let o = b.matmul(att, wo)?;
    let o = b.name(o, "attn_out");
    let r = b.add(x, o)?;
    let r = b.name(r, "attn_residual");
    // Dense SwiGLU MLP (Qwen3MLP).
    here!(b);
    let wg = w(b, "mlp.gate_proj.weight", shape![(inter), (h)])?;
    let wu = w(b, "mlp.up_proj.weight", shape![(inter), (h)])?;
    let wd = w(b, "mlp.down_proj.weight", shape![(h), (inter)])?;
    let m = b.rms_norm(r, ln2, eps)?;
    let m = b.name(m, "mlp_norm");
    let g = b.matmul(m, wg)?;
    let u = b.matmul(m, wu)?;
    let g = b.silu(g)?;
    let a = b.mul(g, u)?;
    let mo = b.matmul(a, wd)?;
    let mo = b.name(mo, "mlp_out");
    let out = b.add(r, mo)?;
    Ok(b.name(out, "out"))
}

/// A named draft with seeded random weights for a built-in target.
#[derive(Clone, Debug, PartialEq)]
pub struct DraftPreset {
    /// Name, as given on the command line (`--draft`).
    pub name: &'static str,
    /// What it is.
    pub about: &'static str,
    /// The target presets it fits.
    pub targets: &'static [&'static str],
    /// The draft's parameters.
    pub config: DraftConfig,
}

/// All built-in draft presets.
pub fn draft_presets() -> Vec<DraftPreset> {
    vec![
        DraftPreset {
            name: "mimo-v2-tiny-dflash",
            about: "2 draft layers (sliding window 6, full) over target layers 0 and 2, B = 8, mask embedding",
            targets: &["mimo-v2-tiny", "mimo-v2-tiny-mxfp4"],
            config: DraftConfig::tiny_mimo(),
        },
        DraftPreset {
            name: "qwen3-moe-tiny-dflash",
            about: "2 full draft layers over target layers 0 and 1, B = 16, mask token id 0",
            targets: &["qwen3-moe-tiny"],
            config: DraftConfig::tiny_qwen(),
        },
        DraftPreset {
            name: "mimo-v2-flash-dflash",
            about: "5 full draft layers at the MiMo-V2-Flash width, B = 16 (benchmarks)",
            targets: &["mimo-v2-flash-4l"],
            config: DraftConfig::flash_width(4),
        },
        DraftPreset {
            name: "qwen3-30b-a3b-dflash",
            about: "5 full draft layers at the Qwen3-30B-A3B width, B = 16 (benchmarks)",
            targets: &["qwen3-30b-a3b"],
            config: DraftConfig::a3b_width(),
        },
    ]
}

/// The draft preset called `name`; the error lists the names that exist.
pub fn draft_preset(name: &str) -> std::result::Result<DraftPreset, String> {
    let all = draft_presets();
    let names: Vec<&str> = all.iter().map(|p| p.name).collect();
    all.into_iter().find(|p| p.name == name).ok_or_else(|| {
        format!(
            "unknown draft preset `{name}`; the built-in drafts are: {}",
            names.join(", ")
        )
    })
}

/// Weights of a draft graph: the target's tensors for [`SHARED_WEIGHTS`]
/// (cloned from `target_weights`), seeded random values
/// ([`presets::random_weights`], by parameter name) for the draft's own.
pub fn random_draft_weights(
    draft: &Graph,
    target_weights: &BTreeMap<String, Tensor>,
    seed: u64,
) -> Result<BTreeMap<String, Tensor>> {
    // A graph of the draft's own weight inputs only, so that no random
    // tensors are drawn for the (large) shared ones.
    let mut own = Graph::new("dflash_draft_weights", &[]);
    let mut out = BTreeMap::new();
    for id in draft.inputs_of_kind(InputKind::Weight) {
        let n = draft.node(id);
        if SHARED_WEIGHTS.contains(&n.name.as_str()) {
            let t = target_weights.get(&n.name).ok_or_else(|| {
                type_err(format!(
                    "the draft shares the target weight \"{}\", which the target weights lack",
                    n.name
                ))
            })?;
            out.insert(n.name.clone(), t.clone());
        } else {
            own.add_input(InputKind::Weight, &n.name, n.ty.clone(), None)?;
        }
    }
    out.extend(presets::random_weights(&own, seed)?);
    Ok(out)
}

/// A draft read from a checkpoint directory (the layout in the module docs).
#[derive(Debug)]
pub struct LoadedDraft {
    /// Its config.
    pub config: DraftConfig,
    /// The draft graph.
    pub graph: Graph,
    /// Its weights, the shared ones taken from the target.
    pub weights: BTreeMap<String, Tensor>,
}

/// Reads the draft checkpoint in `dir` (`config.json` and safetensors) for
/// `target` built with graph options `opt` (the draft's follow from them,
/// [`draft_options`]), taking the shared
/// embedding and LM head from `target_weights`. Errors name the file, the
/// field or the tensor.
pub fn load_draft(
    dir: &std::path::Path,
    target: &Arch,
    opt: &GraphOptions,
    target_weights: &BTreeMap<String, Tensor>,
) -> std::result::Result<LoadedDraft, String> {
    use crate::checkpoint::{read_text, to_tensor, Checkpoint};
    let cfg_path = dir.join("config.json");
    let text = read_text(&cfg_path).map_err(|e| e.to_string())?;
    let config =
        DraftConfig::from_hf_json(&text).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    config.check_target(target).map_err(|e| {
        format!(
            "the draft in {} does not fit the target: {e}",
            dir.display()
        )
    })?;
    let graph = draft_graph(&config, &draft_options(opt)).map_err(|e| e.to_string())?;
    let ck = Checkpoint::open(dir).map_err(|e| e.to_string())?;
    let none = tilefuse_ir::Bindings::new();
    let mut weights = BTreeMap::new();
    for id in graph.inputs_of_kind(InputKind::Weight) {
        let n = graph.node(id);
        let name = n.name.as_str();
        let t = if SHARED_WEIGHTS.contains(&name) {
            target_weights.get(name).cloned().ok_or_else(|| {
                format!("the draft shares the target weight `{name}`, which the target lacks")
            })?
        } else {
            let shape = n.ty.shape.eval(&none)?;
            let values = ck
                .floats(name, &shape, [128, 128])
                .map_err(|e| e.to_string())?;
            to_tensor(name, n.ty.dtype, &shape, values).map_err(|e| e.to_string())?
        };
        weights.insert(name.to_string(), t);
    }
    if let Some(extra) = ck.unread().first() {
        return Err(format!(
            "{}: tensor `{extra}` is not part of a DFlash draft with this config \
             (is config.json the draft's, and are these the draft's weights?)",
            dir.display()
        ));
    }
    Ok(LoadedDraft {
        config,
        graph,
        weights,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn default_target_layers_follow_the_reference() {
        assert_eq!(build_target_layer_ids(36, 5), vec![1, 9, 17, 25, 33]);
        assert_eq!(build_target_layer_ids(48, 5), vec![1, 12, 23, 34, 45]);
        assert_eq!(build_target_layer_ids(52, 5), vec![1, 13, 25, 37, 49]);
        assert_eq!(build_target_layer_ids(48, 1), vec![24]);
    }

    #[test]
    fn parses_a_zlab_config() {
        let text = r#"{
          "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
          "hidden_size": 4096, "num_hidden_layers": 5, "num_attention_heads": 32,
          "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288,
          "rms_norm_eps": 1e-06, "rope_theta": 1000000, "vocab_size": 151936,
          "num_target_layers": 36, "block_size": 16, "attention_bias": false,
          "sliding_window": null, "use_sliding_window": false,
          "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]}
        }"#;
        let c = DraftConfig::from_hf_json(text).unwrap();
        assert_eq!(c.target_layer_ids, vec![1, 9, 17, 25, 33]);
        assert_eq!(c.mask, MaskToken::Id(151669));
        assert_eq!(
            (c.block_size, c.head_dim, c.feature_width()),
            (16, 128, 5 * 4096)
        );
        assert_eq!(c.layer_types, vec![DraftLayerType::Full; 5]);
        assert_eq!(c.rope_theta, 1e6);

        let sliding = text
            .replace("\"sliding_window\": null", "\"sliding_window\": 2048")
            .replace(
                "\"num_target_layers\"",
                "\"layer_types\": [\"sliding_attention\",\"sliding_attention\",\"sliding_attention\",\"sliding_attention\",\"full_attention\"], \"num_target_layers\"",
            );
        let c = DraftConfig::from_hf_json(&sliding).unwrap();
        assert_eq!(c.layer_types[0], DraftLayerType::Sliding);
        assert_eq!(c.sliding_window, 2048);
        // No `is_causal`: sliding layers causal, full layers not (newer reference).
        assert!(c.layer_causal(0) && !c.layer_causal(4));
        let g = draft_graph(&c, &GraphOptions::default())
            .unwrap()
            .to_string();
        assert!(g.contains("mask=causal") && g.contains("mask=block"), "{g}");
        let nc = sliding.replace("\"block_size\"", "\"is_causal\": false, \"block_size\"");
        assert!(!DraftConfig::from_hf_json(&nc).unwrap().layer_causal(0));

        let v2 = text.replace(
            "\"block_size\": 16,",
            "\"final_logit_softcapping\": 20.0, \"block_size\": 16,",
        );
        let e = DraftConfig::from_hf_json(&v2).unwrap_err();
        assert!(e.contains("final_logit_softcapping"), "{e}");
        let e =
            DraftConfig::from_hf_json(&text.replace("\"num_target_layers\": 36,", "")).unwrap_err();
        assert!(e.contains("num_target_layers"), "{e}");
    }

    #[test]
    fn graphs_build_and_shapes_fit() {
        for dp in draft_presets() {
            let target = presets::by_name(dp.targets[0]).unwrap();
            dp.config.check_target(&target.arch).unwrap();
            let t =
                target_graph(&target.arch, &target.options, &dp.config.target_layer_ids).unwrap();
            let (_, out) = t
                .outputs()
                .iter()
                .find(|(n, _)| n == CONTEXT_OUTPUT)
                .unwrap();
            assert_eq!(
                t.node(*out).ty.to_string(),
                format!("bf16[T,{}]", dp.config.feature_width())
            );
            let d = draft_graph(&dp.config, &target.options).unwrap();
            assert_eq!(d.symbols().collect::<Vec<_>>(), ["C", "S", "T"]);
            let text = d.to_string();
            assert!(text.contains("mask=block"), "{text}");
            // Host weights only for the tiny pairs (the full-width ones are
            // gigabytes; the bench makes theirs on the GPU).
            if dp.targets[0].contains("tiny") {
                let tw = presets::random_weights(&t, 1).unwrap();
                let dw = random_draft_weights(&d, &tw, 1).unwrap();
                assert_eq!(dw[SHARED_WEIGHTS[1]], tw[SHARED_WEIGHTS[1]]);
                assert_eq!(dw.len(), d.inputs_of_kind(InputKind::Weight).len());
            }
        }
        let p = presets::by_name("qwen3-moe-tiny").unwrap();
        let e = target_graph(&p.arch, &p.options, &[2]).unwrap_err();
        assert!(
            e.to_string().contains("target layer 2 does not exist"),
            "{e}"
        );
        let e = DraftConfig::tiny_mimo().check_target(&p.arch).unwrap_err();
        assert!(e.to_string().contains("pick the draft preset"), "{e}");
    }
}
