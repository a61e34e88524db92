use tilefuse_ir::NodeId;
use tilefuse_macros::graph;

#[graph]
fn heads(x: NodeId, n: usize) {
    let all: Vec<NodeId> = (0..n).map(|i| x.slice(1, i, 1)).collect();
}

#[graph]
fn head(x: NodeId) {
    let one = |i: usize| x.slice(1, i, 1);
}

fn main() {}
