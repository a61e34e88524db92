use tilefuse_ir::NodeId;
use tilefuse_macros::graph;

#[graph]
fn act(x: NodeId) -> NodeId {
    let y = x.silu()?;
    y
}

fn main() {}
