//! Pieces shared by the architectures: graph options and the MLP blocks.
//!
//! The blocks here and the layers of [`crate::mimo_v2`] and
//! [`crate::qwen3_moe`] are written with the graph DSL ([`macro@graph`]): each
//! `#[graph]` function takes the builder as an implicit first parameter and
//! names its nodes after its `let` bindings (`layer3.attn.q`).

use tilefuse_ir::{DType, NodeId, RouterConfig};
use tilefuse_macros::graph;

/// Choices that shape a compiled forward but are not part of the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GraphOptions {
    /// Positions a full-attention KV cache holds (the context limit).
    pub context: usize,
    /// The most query tokens one forward may carry (prefill chunk or verify block).
    /// Sliding-window caches are rings of `window + max_tokens - 1` slots: enough
    /// that the queries of one forward see their whole window, and that rows
    /// written by a rejected draft block never evict a row still needed after
    /// rollback (a write at position `L + T - 1` reuses the slot of position
    /// `L + T - 1 - cap < L - window + 1`, which no query at `>= L` can see).
    pub max_tokens: usize,
    /// Activation and dense-weight dtype.
    pub dtype: DType,
    /// Routed-expert weight dtype (`bf16`, `mxfp4`, `nvfp4`).
    pub expert_dtype: DType,
}

impl Default for GraphOptions {
    fn default() -> GraphOptions {
        GraphOptions {
            context: 4096,
            max_tokens: 64,
            dtype: DType::BF16,
            expert_dtype: DType::BF16,
        }
    }
}

impl GraphOptions {
    /// Ring capacity for a sliding-window cache of `window`.
    pub fn ring_capacity(&self, window: usize) -> usize {
        (window + self.max_tokens - 1).min(self.context)
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`, weights `{prefix}.{gate,up,down}_proj.weight`,
/// nodes named in the scope `mlp`.
#[graph(scope = "mlp")]
pub fn dense_mlp(x: NodeId, prefix: &str, hidden: usize, inter: usize, dtype: DType) -> NodeId {
    let wg = weight!("{prefix}.gate_proj.weight", dtype, [inter, hidden]);
    let wu = weight!("{prefix}.up_proj.weight", dtype, [inter, hidden]);
    let wd = weight!("{prefix}.down_proj.weight", dtype, [hidden, inter]);
    let gate = x.matmul(wg);
    let up = x.matmul(wu);
    let act = gate.silu();
    let h = act * up;
    h.matmul(wd)
}

/// Routed experts after a router: logits → choice → weights → grouped SwiGLU.
/// `logits` must be f32 `[T, E]`; weights `{prefix}.experts.{gate_up,down}_proj`.
/// Nodes are named in the caller's scope.
#[graph(scope = "")]
#[allow(clippy::too_many_arguments)]
pub fn moe_experts(
    x: NodeId,
    logits: NodeId,
    bias: Option<NodeId>,
    router: &RouterConfig,
    prefix: &str,
    n_experts: usize,
    hidden: usize,
    inter: usize,
    expert_dtype: DType,
) -> NodeId {
    let w13 = weight!(
        "{prefix}.experts.gate_up_proj",
        expert_dtype,
        [n_experts, 2 * inter, hidden]
    );
    let w2 = weight!(
        "{prefix}.experts.down_proj",
        expert_dtype,
        [n_experts, hidden, inter]
    );
    let experts_idx = logits.router_select(bias, router);
    let experts_w = logits.router_weights(experts_idx, router);
    x.experts(experts_idx, experts_w, w13, w2)
}

/// The token embedding of a forward: rows of `model.embed_tokens.weight`.
#[graph(scope = "")]
pub fn embed_tokens(dtype: DType, vocab: usize, hidden: usize, ids: NodeId) -> NodeId {
    let emb = weight!("model.embed_tokens.weight", dtype, [vocab, hidden]);
    let embed = emb.embedding(ids);
    embed
}

/// The end of a forward: final RMSNorm and the untied LM head (f32 logits);
/// outputs `logits` and `hidden` (the last layer's output, for draft features).
#[graph(scope = "")]
pub fn lm_head(dtype: DType, vocab: usize, hidden: usize, eps: f32, x: NodeId) {
    let norm = weight!("model.norm.weight", dtype, [hidden]);
    let head = weight!("lm_head.weight", dtype, [vocab, hidden]);
    let final_norm = x.rms_norm(norm, eps);
    let logits = final_norm.matmul_to(head, f32);
    output!("logits", logits);
    output!("hidden", x);
}
