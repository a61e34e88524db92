use tilefuse_ir::NodeId;
use tilefuse_macros::graph;

#[graph]
async fn a(x: NodeId) -> NodeId {
    x.silu()
}

#[graph]
const fn b(x: NodeId) -> NodeId {
    x
}

#[graph]
unsafe fn c(x: NodeId) -> NodeId {
    x.silu()
}

#[graph]
extern "C" fn d(x: NodeId) -> NodeId {
    x.silu()
}

fn main() {}
