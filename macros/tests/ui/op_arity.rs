use tilefuse_ir::NodeId;
use tilefuse_macros::graph;

#[graph]
fn rope(q: NodeId, pos: NodeId) -> NodeId {
    q.rope(pos, 10_000.0)
}

fn main() {}
