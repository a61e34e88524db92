use tilefuse_macros::graph;

#[graph]
fn repeat(x: Tensor![T; 4]) {}

#[graph]
fn pattern((a, b): Tensor![T, 4]) {}

fn main() {}
