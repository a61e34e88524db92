//! Collectives and expert-local indices: shape rules, text round trip, and
//! their semantics in the interpreter, alone (one rank) and across
//! simulated ranks run in lockstep.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use tilefuse_ir::interp::{run, run_ranks, Caches, Tensor};
use tilefuse_ir::{shape, Bindings, Builder, Comm, DType, Graph, Moe, Op};

fn all_reduce(ranks: usize) -> Op {
    Op::Comm(Comm::AllReduce { ranks })
}

fn all_gather(axis: usize, ranks: usize) -> Op {
    Op::Comm(Comm::AllGather { axis, ranks })
}

/// `y = comm(x)` on `x: dtype[T, 3]`.
fn one(op: Op, dtype: DType) -> Graph {
    let mut b = Builder::new("comm", &["T"]);
    let x = b.input("x", dtype, shape![T, 3]).unwrap();
    let y = b.op(op, &[x]).unwrap();
    b.output("y", y).unwrap();
    b.finish().unwrap()
}

fn input(dtype: DType, t: usize, v: Vec<f32>) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    m.insert("x".to_string(), Tensor::f32(dtype, &[t, 3], v).unwrap());
    m
}

fn bind(t: usize) -> Bindings {
    Bindings::new().with("T", t)
}

#[test]
fn shape_rules() {
    let g = one(all_gather(1, 4), DType::F32);
    let text = g.to_string();
    assert!(
        text.contains("comm.all_gather{axis=1, ranks=4}(%0) : f32[T,12]"),
        "{text}"
    );
    assert!(one(all_reduce(2), DType::BF16)
        .to_string()
        .contains("comm.all_reduce{ranks=2}(%0) : bf16[T,3]"));

    let mut b = Builder::new("bad", &["T"]);
    let ids = b.input("ids", DType::I32, shape![T, 2]).unwrap();
    let x = b.input("x", DType::F32, shape![T, 3]).unwrap();
    let e = b.op(all_reduce(2), &[ids]).unwrap_err().to_string();
    assert!(
        e.contains("must be f32, f16 or bf16, found i32[T,2]"),
        "{e}"
    );
    let e = b.op(all_gather(2, 2), &[x]).unwrap_err().to_string();
    assert!(e.contains("axis 2 is out of range"), "{e}");
    let e = b.op(all_reduce(0), &[x]).unwrap_err().to_string();
    assert!(e.contains("ranks must be >= 1"), "{e}");
    // i32 gathers (token ids), exactly.
    b.op(all_gather(0, 2), &[ids]).unwrap();
    let e = b
        .op(Op::Moe(Moe::LocalIndex { first: 0, count: 0 }), &[ids])
        .unwrap_err()
        .to_string();
    assert!(e.contains("non-empty range"), "{e}");
}

#[test]
fn text_round_trips() {
    let mut b = Builder::new("sharded", &["T"]);
    let x = b.input("x", DType::BF16, shape![T, 8]).unwrap();
    let idx = b.input("idx", DType::I32, shape![T, 2]).unwrap();
    let y = b.op(all_reduce(4), &[x]).unwrap();
    let z = b.op(all_gather(1, 4), &[y]).unwrap();
    let l = b
        .op(Op::Moe(Moe::LocalIndex { first: 4, count: 2 }), &[idx])
        .unwrap();
    b.output("z", z).unwrap();
    b.output("l", l).unwrap();
    let g = b.finish().unwrap();
    let text = g.to_string();
    assert!(
        text.contains("moe.local_index{first=4, count=2}(%1) : i32[T,2]"),
        "{text}"
    );
    assert_eq!(text.parse::<Graph>().unwrap().to_string(), text);
}

#[test]
fn one_rank_is_the_identity_and_more_need_run_ranks() {
    let v = input(DType::F32, 1, vec![1.0, -2.0, 3.5]);
    let g = one(all_reduce(1), DType::F32);
    let out = run(&g, &bind(1), &v, &mut Caches::default()).unwrap();
    assert_eq!(out["y"].to_f32(), vec![1.0, -2.0, 3.5]);
    let g = one(all_gather(1, 2), DType::F32);
    let e = run(&g, &bind(1), &v, &mut Caches::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("comm.all_gather") && e.contains("run_ranks"),
        "{e}"
    );
}

#[test]
fn all_reduce_sums_in_f32_in_rank_order_then_rounds() {
    // bf16 has 8 significant bits: 1 + 2^-8 is a tie that rounds to 1, but
    // the f32 sum of all three ranks (1 + 2^-8 + 2^-8) rounds to 1 + 2^-7.
    let g = one(all_reduce(3), DType::BF16);
    let tiny = 1.0 / 256.0;
    let values = vec![
        input(DType::BF16, 1, vec![1.0, 1.0, 0.5]),
        input(DType::BF16, 1, vec![tiny, 2.0, 0.25]),
        input(DType::BF16, 1, vec![tiny, -3.0, 0.125]),
    ];
    let graphs = vec![g.clone(), g.clone(), g];
    let mut caches = vec![Caches::default(); 3];
    let outs = run_ranks(&graphs, &bind(1), &values, &mut caches).unwrap();
    for o in &outs {
        assert_eq!(o["y"].dtype, DType::BF16);
        assert_eq!(o["y"].to_f32(), vec![1.0 + 2.0 * tiny, 0.0, 0.875]);
    }
}

#[test]
fn all_gather_joins_in_rank_order() {
    let g = one(all_gather(1, 2), DType::F32);
    let values = vec![
        input(DType::F32, 2, vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0]),
        input(DType::F32, 2, vec![3.0, 4.0, 5.0, 13.0, 14.0, 15.0]),
    ];
    let mut caches = vec![Caches::default(); 2];
    let outs = run_ranks(&[g.clone(), g], &bind(2), &values, &mut caches).unwrap();
    let want: Vec<f32> = [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15]
        .iter()
        .map(|&x| x as f32)
        .collect();
    assert_eq!(outs[1]["y"].shape, vec![2, 6]);
    assert_eq!(outs[0]["y"].to_f32(), want);
    assert_eq!(outs[1]["y"].to_f32(), want);
}

#[test]
fn mismatched_ranks_are_errors() {
    let v = input(DType::F32, 1, vec![1.0, 2.0, 3.0]);
    let mut caches = vec![Caches::default(); 2];
    // Different collectives at the same step.
    let e = run_ranks(
        &[
            one(all_reduce(2), DType::F32),
            one(all_gather(1, 2), DType::F32),
        ],
        &bind(1),
        &[v.clone(), v.clone()],
        &mut caches,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("rank 1 of 2") && e.contains("does not match rank 0"),
        "{e}"
    );
    // A collective for 3 ranks run on 2.
    let g = one(all_reduce(3), DType::F32);
    let e = run_ranks(
        &[g.clone(), g],
        &bind(1),
        &[v.clone(), v.clone()],
        &mut caches,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("over 3 ranks but 2 ranks run"), "{e}");
    // One rank without the collective.
    let mut b = Builder::new("comm", &["T"]);
    let x = b.input("x", DType::F32, shape![T, 3]).unwrap();
    b.output("y", x).unwrap();
    let plain = b.finish().unwrap();
    let e = run_ranks(
        &[one(all_reduce(2), DType::F32), plain],
        &bind(1),
        &[v.clone(), v],
        &mut caches,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("rank 1 finished its graph without it"), "{e}");
}

#[test]
fn local_index_and_experts_skip_other_ranks_slots() {
    // Two experts of width 1 on hidden 2; this rank holds global expert 3 only.
    let mut b = Builder::new("ep", &["T"]);
    let x = b.input("x", DType::F32, shape![T, 2]).unwrap();
    let idx = b.input("idx", DType::I32, shape![T, 2]).unwrap();
    let w = b.input("w", DType::F32, shape![T, 2]).unwrap();
    let gu = b.weight("gate_up", DType::F32, shape![1, 2, 2]).unwrap();
    let down = b.weight("down", DType::F32, shape![1, 2, 1]).unwrap();
    let local = b
        .op(Op::Moe(Moe::LocalIndex { first: 3, count: 1 }), &[idx])
        .unwrap();
    let y = b.experts(x, local, w, gu, down).unwrap();
    b.output("local", local).unwrap();
    b.output("y", y).unwrap();
    let g = b.finish().unwrap();
    let mut v = BTreeMap::new();
    v.insert(
        "x".to_string(),
        Tensor::f32(DType::F32, &[2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap(),
    );
    v.insert(
        "idx".to_string(),
        Tensor::i32(&[2, 2], vec![3, 0, 1, 2]).unwrap(),
    );
    v.insert(
        "w".to_string(),
        Tensor::f32(DType::F32, &[2, 2], vec![0.5, 0.5, 1.0, 1.0]).unwrap(),
    );
    v.insert(
        "gate_up".to_string(),
        Tensor::f32(DType::F32, &[1, 2, 2], vec![1.0, 0.0, 0.0, 1.0]).unwrap(),
    );
    v.insert(
        "down".to_string(),
        Tensor::f32(DType::F32, &[1, 2, 1], vec![1.0, -1.0]).unwrap(),
    );
    let out = run(&g, &bind(2), &v, &mut Caches::default()).unwrap();
    assert_eq!(out["local"].as_i32().unwrap(), &[0, -1, -1, -1]);
    // Token 0, slot 0: g = 1, u = 2, h = silu(1)·2, y = (h, −h) · 0.5; token 1: nothing.
    let h = 2.0 / (1.0 + (-1.0f32).exp());
    assert_eq!(out["y"].to_f32(), vec![0.5 * h, -0.5 * h, 0.0, 0.0]);
}
