use tilefuse_ir::NodeId;
use tilefuse_macros::graph;

#[graph]
fn split(x: NodeId) -> NodeId {
    let (a, b) = x.silu();
    a
}

fn main() {}
