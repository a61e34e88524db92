use tilefuse_macros::graph;

#[graph]
struct Layer {
    heads: usize,
}

fn main() {}
