use tilefuse_ir::NodeId;
use tilefuse_macros::graph;

#[graph]
fn in_init(x: NodeId) -> NodeId {
    let Some(y) = Some(x.silu()) else { return x };
    y
}

#[graph]
fn in_else(x: NodeId, bias: Option<NodeId>) -> NodeId {
    let Some(b) = bias else { return x.silu() };
    b
}

fn main() {}
