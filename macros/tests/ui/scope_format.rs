use tilefuse_ir::NodeId;
use tilefuse_macros::graph;

#[graph(scope = "layer{layer}")]
fn not_a_parameter(i: usize, x: NodeId) -> NodeId {
    x
}

#[graph(scope = "layer{}")]
fn positional(i: usize, x: NodeId) -> NodeId {
    x
}

fn main() {}
