//! Verbatim copy of the builder-API MLP blocks from before the graph DSL
//! (`model/src/common.rs`), kept as the reference the DSL versions must
//! reproduce node for node (tests/dsl_equals_builder.rs). Only the type
//! definitions were dropped: they come from the crate.

use tilefuse_ir::{shape, Builder, DType, NodeId, Result, RouterConfig};

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`, weights `{prefix}.{gate,up,down}_proj.weight`.
pub fn dense_mlp(
    b: &mut Builder,
    x: NodeId,
    prefix: &str,
    hidden: usize,
    inter: usize,
    dtype: DType,
) -> Result<NodeId> {
    let wg = b.weight(
        &format!("{prefix}.gate_proj.weight"),
        dtype,
        shape![(inter), (hidden)],
    )?;
    let wu = b.weight(
        &format!("{prefix}.up_proj.weight"),
        dtype,
        shape![(inter), (hidden)],
    )?;
    let wd = b.weight(
        &format!("{prefix}.down_proj.weight"),
        dtype,
        shape![(hidden), (inter)],
    )?;
    let gate = b.matmul(x, wg)?;
    b.name(gate, "gate");
    let up = b.matmul(x, wu)?;
    b.name(up, "up");
    let act = b.silu(gate)?;
    b.name(act, "act");
    let h = b.mul(act, up)?;
    b.name(h, "h");
    let y = b.matmul(h, wd)?;
    Ok(b.name(y, "out"))
}

/// Routed experts after a router: logits → choice → weights → grouped SwiGLU.
/// `logits` must be f32 `[T, E]`; weights `{prefix}.experts.{gate_up,down}_proj`.
#[allow(clippy::too_many_arguments)]
pub fn moe_experts(
    b: &mut Builder,
    x: NodeId,
    logits: NodeId,
    bias: Option<NodeId>,
    router: &RouterConfig,
    prefix: &str,
    n_experts: usize,
    hidden: usize,
    inter: usize,
    expert_dtype: DType,
) -> Result<NodeId> {
    let w13 = b.weight(
        &format!("{prefix}.experts.gate_up_proj"),
        expert_dtype,
        shape![(n_experts), (2 * inter), (hidden)],
    )?;
    let w2 = b.weight(
        &format!("{prefix}.experts.down_proj"),
        expert_dtype,
        shape![(n_experts), (hidden), (inter)],
    )?;
    let idx = b.router_select(logits, bias, router)?;
    b.name(idx, "experts_idx");
    let w = b.router_weights(logits, idx, router)?;
    b.name(w, "experts_w");
    let y = b.experts(x, idx, w, w13, w2)?;
    Ok(b.name(y, "out"))
}
