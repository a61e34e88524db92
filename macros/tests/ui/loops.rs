use tilefuse_ir::NodeId;
use tilefuse_macros::graph;

#[graph]
fn over_tensor(x: NodeId) {
    for row in x {
        let _ = row;
    }
}

#[graph]
fn while_tensor(x: NodeId) {
    while x {}
}

#[graph]
fn nodes_in_condition(x: NodeId, n: usize) {
    while Some(x.silu()).is_some() && n > 0 {}
}

fn main() {}
