use tilefuse_ir::NodeId;
use tilefuse_macros::graph;

#[graph]
fn missing_shape() -> NodeId {
    weight!("w", bf16)
}

#[graph]
fn not_arguments() -> NodeId {
    input!("x" bf16 [T])
}

#[graph]
fn tuple_shape() -> NodeId {
    cache!("kv", bf16, (16, 2, 64))
}

#[graph]
fn output_value(x: NodeId) {
    output!("y");
}

fn main() {}
