//! The DSL end to end: graphs built by `#[graph]` functions, checked for
//! names, source places, shapes, and the errors a bad shape gives.

#![allow(clippy::unwrap_used)]

use tilefuse_ir::{shape, Builder, DType, Graph, Mask, NodeId, Result};
use tilefuse_macros::graph;

const SOURCE: &str = include_str!("dsl.rs");

/// The 1-based line of this file that contains `needle` (once), not
/// counting the tests' own mentions of it in quotes.
fn line_of(needle: &str) -> u32 {
    let quoted = format!("\"{needle}");
    let hits: Vec<usize> = (SOURCE.lines().enumerate())
        .filter(|(_, l)| l.contains(needle) && !l.contains(&quoted))
        .map(|(n, _)| n + 1)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "`{needle}` must occur once in dsl.rs, found {hits:?}"
    );
    hits[0] as u32
}

/// The printed line of the node named `name`.
fn node_line<'a>(text: &'a str, name: &str) -> &'a str {
    let key = format!("\"{name}\"");
    (text.lines())
        .find(|l| l.contains(&key))
        .unwrap_or_else(|| panic!("no node {name} in\n{text}"))
}

/// Asserts that node `name` exists and was made at the line containing `needle`.
fn assert_made_at(text: &str, name: &str, needle: &str) {
    let line = node_line(text, name);
    let want = format!(" @ macros/tests/dsl.rs:{}", line_of(needle));
    assert!(
        line.ends_with(&want),
        "{name} should be made at{want}: {line}"
    );
}

#[graph(scope = "attn")]
fn attention(i: usize, x: Tensor![T, heads * dk], pos: NodeId, heads: usize, dk: usize) -> NodeId {
    let wq = weight!("layers.{i}.attn.q.weight", bf16, [heads * dk, heads * dk]);
    let q = x.matmul(&wq).reshape([T, heads, dk]);
    let q_rope = q.rope(pos, 10_000.0, dk);
    let cache = cache!("layers.{i}.attn.cache", bf16, [16, heads, dk]);
    let keys = cache.kv_append(q_rope, S, false);
    let attn = q_rope.attention(keys, keys, None, Mask::Causal { window: None }, 0.125);
    attn.reshape([T, heads * dk])
}

#[graph(scope = "layer{i}", calls(attention))]
fn layer(i: usize, x: Tensor![T, 64], pos: Tensor![T]) -> NodeId {
    let norm = weight!("layers.{i}.norm.weight", bf16, [64]);
    let h = x.rms_norm(norm, 1e-6);
    let mut y = x + attention(i, h, pos, 4, 16) * 0.5;
    y += x;
    let neg = -y;
    let both = [y, neg].concat(1).slice(1, 0, 64);
    if i.is_multiple_of(2) {
        both.silu()
    } else {
        both
    }
}

/// `H` is a symbol the graph declares; the other dims are values.
fn builder() -> Builder {
    Builder::new("test", &["H", "S", "T"])
}

fn two_layers() -> Result<Graph> {
    let mut b = builder();
    let x = b.input("x", DType::BF16, shape![T, 64])?;
    let pos = b.input("pos", DType::I32, shape![T])?;
    let y = layer(&mut b, 0, x, pos)?;
    let y = layer(&mut b, 1, y, pos)?;
    b.output("y", y)?;
    b.finish()
}

#[test]
fn names_follow_bindings_and_scopes() {
    let text = two_layers().expect("the graph builds").to_string();
    for name in [
        "layer0.h",
        "layer0.attn.matmul",
        "layer0.attn.q",
        "layer0.attn.q_rope",
        "layer0.attn.keys",
        "layer0.attn.attn",
        "layer0.attn.out",
        "layer0.y",
        "layer0.neg",
        "layer0.both",
        "layer0.silu",
        "layer1.attn.out",
        "layer1.both",
    ] {
        node_line(&text, name);
    }
    // Inputs keep their names; a graph call's result is not renamed; the
    // layer returns `both` itself on one branch, so its result is no `out`.
    assert!(text.contains("\"layers.1.norm.weight\""), "{text}");
    assert!(
        !text.contains("\"layer0.out\"") && !text.contains("\"layer1.out\""),
        "{text}"
    );
    assert!(
        text.contains("\"layer0.mul_scalar\""),
        "the scaled attention keeps its default name:\n{text}"
    );
    assert!(text.contains("\"layer0.y\""), "{text}");
    assert!(text.contains("return \"y\" = "), "{text}");
}

#[test]
fn places_are_the_authors_lines() {
    let text = two_layers().expect("the graph builds").to_string();
    assert_made_at(&text, "layers.0.attn.q.weight", "let wq = weight!(");
    assert_made_at(&text, "layer0.attn.matmul", "let q = x.matmul(&wq)");
    assert_made_at(&text, "layer0.attn.q", "let q = x.matmul(&wq)");
    assert_made_at(&text, "layer0.attn.out", "attn.reshape([T, heads * dk])");
    assert_made_at(&text, "layer0.h", "let h = x.rms_norm(norm, 1e-6);");
    // After the call to `attention` returns, the scale and the sum are this line's again.
    assert_made_at(&text, "layer0.mul_scalar", "let mut y = x + attention(");
    assert_made_at(&text, "layer0.y", "let mut y = x + attention(");
    assert_made_at(&text, "layer0.add_1", "y += x;");
    assert_made_at(&text, "layer0.silu", "both.silu()");
}

#[test]
fn parameter_shape_mismatch_names_the_line_and_shapes() {
    let mut b = builder();
    let x = b.input("x", DType::BF16, shape![T, 32]).expect("input");
    let pos = b.input("pos", DType::I32, shape![T]).expect("input");
    let err = layer(&mut b, 3, x, pos)
        .expect_err("x is [T,32], not [T,64]")
        .to_string();
    let want = format!(
        "parameter `x` of `layer` at macros/tests/dsl.rs:{}: expected shape [T,64], found bf16[T,32]",
        line_of("fn layer(i: usize, x: Tensor![T, 64], pos")
    );
    assert_eq!(err, want);
}

#[graph]
fn symbolic(x: Tensor![T, H]) -> NodeId {
    x.silu()
}

#[test]
fn symbolic_parameter_shape() {
    let mut b = builder();
    let x = b.input("x", DType::BF16, shape![T, 64]).expect("input");
    // `symbolic` declares `x: Tensor![T, H]`: 64 is not the symbol H.
    let err = symbolic(&mut b, x).expect_err("H is a symbol").to_string();
    assert!(
        err.ends_with("expected shape [T,H], found bf16[T,64]"),
        "{err}"
    );
    let xh = b.input("xh", DType::BF16, shape![T, H]).expect("input");
    symbolic(&mut b, xh).expect("[T,H] matches");
}

#[graph(scope = "proj")]
fn projection(x: NodeId, n: usize, k: usize) -> NodeId {
    let w = weight!("proj.weight", bf16, [n, k]);
    x.matmul(w) // the projection
}

#[test]
fn op_shape_mismatch_is_reported_at_the_authors_line() {
    let mut b = builder();
    let x = b.input("x", DType::BF16, shape![T, 64]).expect("input");
    let err = projection(&mut b, x, 32, 48)
        .expect_err("K is 64, not 48")
        .to_string();
    let at = format!(
        "\"proj.matmul\" (nn.matmul) at macros/tests/dsl.rs:{}: ",
        line_of("x.matmul(w) // the projection")
    );
    assert!(err.starts_with(&at), "{err}\nshould start with {at}");
    assert!(
        err.contains("48") && err.contains("64"),
        "the message names both dims: {err}"
    );
    assert!(
        err.contains("bf16[T,64]") && err.contains("bf16[32,48]"),
        "the inputs are listed: {err}"
    );
}

/// A graph function may return several tensors and take plain Rust control flow.
#[graph(scope = "", calls(projection, pair))]
fn split(x: NodeId, parts: usize) -> (NodeId, NodeId) {
    let mut acc = x;
    for _ in 0..parts {
        acc = acc + x;
    }
    let scaled = match parts {
        0 => acc * 2.0,
        _ => acc / 2.0,
    };
    let (a, b) = pair(scaled);
    (a - b, projection(b, 8, 64).cast(f32))
}

#[graph(scope = "pair")]
fn pair(x: NodeId) -> (NodeId, NodeId) {
    let first = x.unary(tilefuse_ir::UnaryOp::Exp);
    let second = 1.0 + -x.scalar(tilefuse_ir::BinaryOp::Max, 0.0) * -1.0;
    (first, second)
}

#[test]
fn tuples_loops_and_matches() {
    let mut b = builder();
    let x = b.input("x", DType::F32, shape![T, 64]).expect("input");
    let (d, p) = split(&mut b, x, 2).expect("builds");
    b.output("d", d).expect("output");
    b.output("p", p).expect("output");
    let text = b.finish().expect("verifies").to_string();
    for name in [
        "add",
        "add_1",
        "scaled",
        "pair.first",
        "pair.second",
        "sub",
        "proj.out",
        "cast",
    ] {
        node_line(&text, name);
    }
    assert!(
        node_line(&text, "scaled").contains("ew.div_scalar{c=2.0}"),
        "{text}"
    );
}

const HIDDEN: usize = 64;

/// Plain Rust next to tensors: a closure whose parameter shadows a tensor,
/// a constant dim, an optional tensor unwrapped with `if let`.
#[graph(scope = "plain")]
fn plain_rust(x: NodeId, bias: Option<NodeId>) -> NodeId {
    let widths: Vec<usize> = (0..2).map(|x| x * HIDDEN).collect();
    let w = weight!("plain.w", bf16, [(HIDDEN), widths[1]]);
    let mut y = x.matmul(w);
    if let Some(b) = bias {
        let b: NodeId = b;
        y += b;
    }
    y
}

#[test]
fn plain_rust_beside_tensors() {
    let mut b = builder();
    let x = b.input("x", DType::BF16, shape![T, 64]).expect("input");
    let bias = b.input("bias", DType::BF16, shape![64]).expect("input");
    let y = plain_rust(&mut b, x, Some(bias)).expect("builds");
    b.output("y", y).expect("output");
    let text = b.finish().expect("verifies").to_string();
    assert!(
        node_line(&text, "plain.w").contains("bf16[64,64]"),
        "{text}"
    );
    assert!(
        node_line(&text, "plain.add").contains("ew.add(%3, %1)"),
        "{text}"
    );
}
