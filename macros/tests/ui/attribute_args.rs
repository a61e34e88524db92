use tilefuse_ir::NodeId;
use tilefuse_macros::graph;

#[graph(name = "mlp")]
fn unknown(x: NodeId) -> NodeId {
    x
}

#[graph(scope = mlp)]
fn not_a_string(x: NodeId) -> NodeId {
    x
}

#[graph(scope = "a", scope = "b")]
fn twice(x: NodeId) -> NodeId {
    x
}

#[graph(calls(crate::attn))]
fn path_in_calls(x: NodeId) -> NodeId {
    x
}

fn main() {}
