use tilefuse_ir::NodeId;
use tilefuse_macros::graph;

#[graph]
fn misspelled(x: NodeId, w: NodeId) -> NodeId {
    x.rmsnorm(w, 1e-6)
}

#[graph]
fn turbofish(x: NodeId) -> NodeId {
    x.silu::<f32>()
}

fn main() {}
