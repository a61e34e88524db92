use tilefuse_ir::NodeId;
use tilefuse_macros::graph;

struct Mlp;

impl Mlp {
    #[graph]
    fn forward(&self, x: NodeId) -> NodeId {
        x.silu()
    }
}

fn main() {}
