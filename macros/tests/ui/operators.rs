use tilefuse_ir::NodeId;
use tilefuse_macros::graph;

#[graph]
fn modulo(x: NodeId, y: NodeId) -> NodeId {
    x % y
}

#[graph]
fn scalar_minus(x: NodeId) -> NodeId {
    1.0 - x
}

#[graph]
fn scalar_over(x: NodeId) -> NodeId {
    1.0 / x
}

#[graph]
fn assign_to_op(x: NodeId, y: NodeId) {
    x.silu() += y;
}

fn main() {}
