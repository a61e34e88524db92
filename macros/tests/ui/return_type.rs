use tilefuse_ir::{NodeId, Result};
use tilefuse_macros::graph;

#[graph]
fn wrapped(x: NodeId) -> Result<NodeId> {
    Ok(x)
}

#[graph]
fn count(x: NodeId) -> usize {
    1
}

fn main() {}
