//! Bad graphs are refused with an error that names the node and what was expected.

#![allow(clippy::unwrap_used)]

use tilefuse_ir::{shape, Builder, DType, ErrorKind, Graph, InputKind, Mask, Op, TensorType};

fn two_inputs() -> (Builder, tilefuse_ir::NodeId, tilefuse_ir::NodeId) {
    let mut b = Builder::new("g", &["T"]);
    let x = b.input("x", DType::BF16, shape![T, 64]).unwrap();
    let w = b.weight("w", DType::BF16, shape![32, 48]).unwrap();
    (b, x, w)
}

#[test]
fn shape_mismatch_names_node_and_shapes() {
    let (mut b, x, w) = two_inputs();
    b.push_scope("layer0");
    b.set_loc("model/src/demo.rs", 12);
    let id = b.matmul(x, w).unwrap_err();
    assert_eq!(id.kind, ErrorKind::Type);
    let msg = id.to_string();
    assert!(
        msg.contains("\"layer0.matmul\" (nn.matmul) at model/src/demo.rs:12"),
        "{msg}"
    );
    assert!(msg.contains("expected 64, found 48"), "{msg}");
    assert!(msg.contains("bf16[T,64], bf16[32,48]"), "{msg}");
}

#[test]
fn dtype_not_accepted() {
    let mut b = Builder::new("g", &["T"]);
    let ids = b.input("ids", DType::I32, shape![T]).unwrap();
    let e = b.unary(tilefuse_ir::UnaryOp::Exp, ids).unwrap_err();
    assert!(
        e.to_string()
            .contains("input must be f32, f16 or bf16, found i32[T]"),
        "{e}"
    );
    let logits = b.input("logits", DType::BF16, shape![T, 8]).unwrap();
    let r = tilefuse_ir::RouterConfig {
        score: tilefuse_ir::ScoreFn::Softmax,
        top_k: 2,
        n_group: 1,
        topk_group: 1,
        norm_topk: true,
        norm_eps: 0.0,
        scale: 1.0,
    };
    let e = b.router_select(logits, None, &r).unwrap_err();
    assert!(
        e.to_string()
            .contains("router logits must be f32, found bf16[T,8]"),
        "{e}"
    );
}

#[test]
fn unknown_symbol() {
    let mut b = Builder::new("g", &["T"]);
    let e = b.input("x", DType::BF16, shape![T, S]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::UnknownSymbol);
    let msg = e.to_string();
    assert!(msg.contains("input \"x\""), "{msg}");
    assert!(msg.contains("symbol `S`"), "{msg}");
    assert!(msg.contains("declared: T"), "{msg}");
    // In an attribute, too.
    let x = b.input("y", DType::BF16, shape![T, 8]).unwrap();
    let e = b.slice(x, 0, 0usize, "C").unwrap_err();
    assert_eq!(e.kind, ErrorKind::UnknownSymbol);
    assert!(e.to_string().contains("view.slice"), "{e}");
}

#[test]
fn dangling_input_after_removal() {
    let mut b = Builder::new("g", &["T"]);
    let x = b.input("x", DType::F32, shape![T, 4]).unwrap();
    let y = b.input("y", DType::F32, shape![T, 4]).unwrap();
    let e = b.unary(tilefuse_ir::UnaryOp::Exp, y).unwrap();
    let s = b.add(x, e).unwrap();
    b.name(s, "sum");
    b.output("out", s).unwrap();
    let mut g = b.finish().unwrap();
    g.remove(e);
    let err = g.verify().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Dangling);
    let msg = err.to_string();
    assert!(msg.contains("\"sum\" (ew.add)"), "{msg}");
    assert!(msg.contains("input 1 is missing"), "{msg}");
    // The neighbourhood shows the node's line.
    assert!(
        msg.contains("> %2 = ew.add(%0) : f32[T,4] \"sum\""),
        "{msg}"
    );
}

#[test]
fn dangling_reference_refused_when_adding() {
    let mut other = Graph::new("other", &[]);
    let ghost = other
        .add_input(
            InputKind::Activation,
            "a",
            TensorType::new(DType::F32, shape![2]),
            None,
        )
        .unwrap();
    let ghost2 = other
        .add_input(
            InputKind::Activation,
            "b",
            TensorType::new(DType::F32, shape![2]),
            None,
        )
        .unwrap();
    let mut g = Graph::new("g", &[]);
    g.add_input(
        InputKind::Activation,
        "a",
        TensorType::new(DType::F32, shape![2]),
        None,
    )
    .unwrap();
    let e = g
        .add(
            Op::Ew(tilefuse_ir::Elementwise::Unary(tilefuse_ir::UnaryOp::Neg)),
            &[ghost2],
            "n",
            None,
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Dangling);
    assert!(e.to_string().contains("\"n\" (ew.neg)"), "{e}");
    let _ = ghost;
}

#[test]
fn retyped_node_is_caught_by_verify() {
    let (mut b, x, _) = two_inputs();
    let y = b.unary(tilefuse_ir::UnaryOp::Silu, x).unwrap();
    b.output("y", y).unwrap();
    let mut g = b.finish().unwrap();
    g.node_mut(y).ty = TensorType::new(DType::F32, shape![T, 64]);
    let e = g.verify().unwrap_err();
    assert!(
        e.to_string()
            .contains("recorded type is f32[T,64] but the inputs give bf16[T,64]"),
        "{e}"
    );
    assert!(e.to_string().contains("\"silu\" (ew.silu)"), "{e}");
}

#[test]
fn attention_checks() {
    let mut b = Builder::new("g", &["T", "S"]);
    let q = b.input("q", DType::BF16, shape![T, 6, 16]).unwrap();
    let k = b.input("k", DType::BF16, shape!["S+T", 4, 16]).unwrap();
    let v = b.input("v", DType::BF16, shape!["S+T", 4, 8]).unwrap();
    let e = b
        .attention(q, k, v, None, Mask::Causal { window: None }, 0.25)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("query heads (6) must be a multiple of kv heads (4)"),
        "{e}"
    );
    let q = b.input("q2", DType::BF16, shape![T, 8, 16]).unwrap();
    let sinks = b.input("sinks", DType::BF16, shape![4]).unwrap();
    let e = b
        .attention(q, k, v, Some(sinks), Mask::Causal { window: Some(4) }, 0.25)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("sinks length (query heads): expected 8, found 4"),
        "{e}"
    );
    let ok = b
        .attention(q, k, v, None, Mask::Block { window: None }, 0.25)
        .unwrap();
    assert_eq!(b.ty(ok).to_string(), "bf16[T,8,8]");
}

#[test]
fn fp4_weights_need_block_multiple() {
    let mut b = Builder::new("g", &["T"]);
    let x = b.input("x", DType::BF16, shape![T, 48]).unwrap();
    let w = b.weight("w", DType::MXFP4, shape![16, 48]).unwrap();
    let e = b.matmul(x, w).unwrap_err();
    assert!(
        e.to_string()
            .contains("mxfp4 weights need K a constant multiple of 32, found K = 48"),
        "{e}"
    );
    let e = b.input("a", DType::NVFP4, shape![T, 32]).unwrap_err();
    assert!(e.to_string().contains("only weights may be nvfp4"), "{e}");
}

#[test]
fn parse_errors_name_the_line() {
    let text =
        "graph g(T) {\n  %0 = input : bf16[T,4] \"x\"\n  %1 = ew.exp(%7) : bf16[T,4] \"e\"\n}\n";
    let e = text.parse::<Graph>().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Parse);
    assert!(
        e.to_string()
            .contains("line 3: %7 is used before it is defined"),
        "{e}"
    );
    let text =
        "graph g(T) {\n  %0 = input : bf16[T,4] \"x\"\n  %1 = ew.exp(%0) : f32[T,4] \"e\"\n}\n";
    let e = text.parse::<Graph>().unwrap_err();
    assert!(
        e.to_string()
            .contains("printed type f32[T,4] differs from the inferred type bf16[T,4]"),
        "{e}"
    );
    let text = "graph g(T) {\n  %0 = input : bf16[T,4] \"x\"\n  %1 = ew.frobnicate(%0) : bf16[T,4] \"e\"\n}\n";
    let e = text.parse::<Graph>().unwrap_err();
    assert!(e.to_string().contains("unknown op `ew.frobnicate`"), "{e}");
    let text = "graph g(T) {\n  %0 = input : bf16[T,4] \"x\"\n  %1 = nn.rms_norm{eps=1e-5, foo=1}(%0, %0) : bf16[T,4] \"e\"\n}\n";
    let e = text.parse::<Graph>().unwrap_err();
    assert!(e.to_string().contains("unexpected attribute `foo`"), "{e}");
}
