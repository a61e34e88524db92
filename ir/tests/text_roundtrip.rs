//! Printer → parser → printer is the identity, on random graphs and on every op.

use proptest::prelude::*;
use tilefuse_ir::{
    shape, BinaryOp, Builder, DType, Graph, Mask, NodeId, ReduceKind, RouterConfig, ScoreFn,
    UnaryOp,
};

/// One random construction step; steps that do not type-check are skipped.
#[derive(Clone, Debug)]
enum Step {
    Unary(usize, UnaryOp),
    Scalar(usize, BinaryOp, f32),
    Binary(usize, usize, BinaryOp),
    Reduce(usize, ReduceKind, usize),
    Split(usize),
    Permute(usize),
    Slice(usize, usize),
    Concat(usize, usize),
    Norm(usize, f32),
    MatMul(usize, usize, DType),
    Cast(usize, DType),
    Name(usize, String),
}

fn arb_step() -> impl Strategy<Value = Step> {
    let n = 0usize..64;
    prop_oneof![
        (n.clone(), proptest::sample::select(UnaryOp::ALL.to_vec())).prop_map(|(a, u)| Step::Unary(a, u)),
        (n.clone(), proptest::sample::select(BinaryOp::ALL.to_vec()), -1e6f32..1e6)
            .prop_map(|(a, o, c)| Step::Scalar(a, o, c)),
        (n.clone(), n.clone(), proptest::sample::select(BinaryOp::ALL.to_vec()))
            .prop_map(|(a, b, o)| Step::Binary(a, b, o)),
        (n.clone(), proptest::sample::select(vec![ReduceKind::Sum, ReduceKind::Max, ReduceKind::Mean]), 0usize..3)
            .prop_map(|(a, k, x)| Step::Reduce(a, k, x)),
        n.clone().prop_map(Step::Split),
        n.clone().prop_map(Step::Permute),
        (n.clone(), 0usize..8).prop_map(|(a, s)| Step::Slice(a, s)),
        (n.clone(), n.clone()).prop_map(|(a, b)| Step::Concat(a, b)),
        (n.clone(), 1e-7f32..1e-2).prop_map(|(a, e)| Step::Norm(a, e)),
        (n.clone(), 0usize..4, proptest::sample::select(vec![DType::BF16, DType::F8E4M3, DType::MXFP4, DType::NVFP4, DType::F32]))
            .prop_map(|(a, w, d)| Step::MatMul(a, w, d)),
        (n.clone(), proptest::sample::select(vec![DType::F32, DType::BF16, DType::F16])).prop_map(|(a, d)| Step::Cast(a, d)),
        (n, "[a-z][a-z0-9_.\" \\\\]{0,12}").prop_map(|(a, s)| Step::Name(a, s)),
    ]
}

fn build(steps: &[Step]) -> Graph {
    let mut b = Builder::new("random", &["S", "T"]);
    let mut vals: Vec<NodeId> = vec![
        b.input("x", DType::BF16, shape![T, 64]).unwrap(),
        b.input("y", DType::BF16, shape![T, 64]).unwrap(),
        b.input("z", DType::F32, shape!["S+T", 32]).unwrap(),
    ];
    let mut weights = 0usize;
    for (i, s) in steps.iter().enumerate() {
        b.set_loc("model/src/random.rs", i as u32 + 1);
        let pick = |k: usize| vals[k % vals.len()];
        let r = match s {
            Step::Unary(a, u) => b.unary(*u, pick(*a)),
            Step::Scalar(a, o, c) => b.scalar(*o, pick(*a), *c),
            Step::Binary(a, c, o) => b.binary(*o, pick(*a), pick(*c)),
            Step::Reduce(a, k, x) => b.reduce(*k, pick(*a), *x),
            Step::Split(a) => {
                let x = pick(*a);
                let dims = b.shape(x).dims().to_vec();
                match dims.last().and_then(|d| d.as_const()) {
                    Some(n) if n % 4 == 0 && dims.len() < 4 => {
                        let mut d = dims[..dims.len() - 1].to_vec();
                        d.push(4usize.into());
                        d.push((n / 4).into());
                        b.reshape(x, tilefuse_ir::Shape(d))
                    }
                    _ => continue,
                }
            }
            Step::Permute(a) => {
                let x = pick(*a);
                let r = b.shape(x).rank();
                let perm: Vec<usize> = (0..r).rev().collect();
                b.permute(x, &perm)
            }
            Step::Slice(a, s) => {
                let x = pick(*a);
                let r = b.shape(x).rank();
                b.slice(x, r - 1, *s, 2usize)
            }
            Step::Concat(a, c) => {
                let (x, y) = (pick(*a), pick(*c));
                b.concat(&[x, y], 0)
            }
            Step::Norm(a, e) => {
                let x = pick(*a);
                let last = b.shape(x).last().cloned().unwrap();
                let dt = b.ty(x).dtype;
                weights += 1;
                let w = b.weight(&format!("norm{weights}"), dt, tilefuse_ir::Shape(vec![last]));
                w.and_then(|w| b.rms_norm(x, w, *e))
            }
            Step::MatMul(a, n, d) => {
                let x = pick(*a);
                let last = b.shape(x).last().cloned().unwrap();
                weights += 1;
                let w = b.weight(
                    &format!("w{weights}"),
                    *d,
                    tilefuse_ir::Shape(vec![(16 * (n + 1)).into(), last]),
                );
                w.and_then(|w| b.matmul(x, w))
            }
            Step::Cast(a, d) => b.cast(pick(*a), *d),
            Step::Name(a, s) => {
                let x = pick(*a);
                b.name(x, s);
                continue;
            }
        };
        if let Ok(id) = r {
            vals.push(id);
        }
    }
    let last = *vals.last().unwrap();
    b.output("out", last).unwrap();
    b.output("first", vals[0]).unwrap();
    b.finish().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn print_parse_print_is_identity(steps in proptest::collection::vec(arb_step(), 0..40)) {
        let g = build(&steps);
        let text = g.to_string();
        let back: Graph = text.parse().map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        back.verify().map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back.to_string(), text.clone());
        // Deterministic: building the same steps again prints the same bytes.
        prop_assert_eq!(build(&steps).to_string(), text);
    }
}

#[test]
fn every_structured_op_round_trips() {
    let mut b = Builder::new("all_ops", &["S", "T"]);
    let ids = b.input("ids", DType::I32, shape![T]).unwrap();
    let pos = b.input("pos", DType::I32, shape![T]).unwrap();
    let seed = b.input("seed", DType::I32, shape![2]).unwrap();
    let emb = b.weight("emb", DType::BF16, shape![100, 32]).unwrap();
    let x = b.embedding(emb, ids).unwrap();
    let wq = b.weight("wq", DType::MXFP4, shape![64, 32]).unwrap();
    let q = b.matmul(x, wq).unwrap();
    let q = b.reshape(q, shape![T, 4, 16]).unwrap();
    let q = b.rope(q, pos, 1e4, 8).unwrap();
    let wk = b.weight("wk", DType::NVFP4, shape![32, 32]).unwrap();
    let k = b.matmul(x, wk).unwrap();
    let k = b.reshape(k, shape![T, 2, 16]).unwrap();
    let kc = b.cache("k_cache", DType::BF16, shape![23, 2, 16]).unwrap();
    let keys = b.kv_append(kc, k, "S", true).unwrap();
    let sinks = b.weight("sinks", DType::BF16, shape![4]).unwrap();
    let a = b
        .attention(q, keys, keys, Some(sinks), Mask::Causal { window: Some(8) }, 0.25)
        .unwrap();
    let a2 = b
        .attention(q, keys, keys, None, Mask::Block { window: None }, 0.25)
        .unwrap();
    let a = b.add(a, a2).unwrap();
    let h = b.reshape(a, shape![T, 64]).unwrap();
    let wr = b.weight("router", DType::BF16, shape![8, 64]).unwrap();
    let logits = b.matmul_to(h, wr, DType::F32).unwrap();
    let bias = b.weight("bias", DType::F32, shape![8]).unwrap();
    let cfg = RouterConfig {
        score: ScoreFn::Sigmoid,
        top_k: 2,
        n_group: 4,
        topk_group: 2,
        norm_topk: true,
        norm_eps: 1e-20,
        scale: 2.5,
    };
    let idx = b.router_select(logits, Some(bias), &cfg).unwrap();
    let w = b.router_weights(logits, idx, &cfg).unwrap();
    let w13 = b.weight("w13", DType::MXFP4, shape![8, 64, 64]).unwrap();
    let w2 = b.weight("w2", DType::MXFP4, shape![8, 64, 32]).unwrap();
    let y = b.experts(h, idx, w, w13, w2).unwrap();
    let t = b.argmax(y).unwrap();
    let s = b.sample(logits, seed, 0.7).unwrap();
    b.output("tok", t).unwrap();
    b.output("sampled", s).unwrap();
    let g = b.finish().unwrap();
    let text = g.to_string();
    assert!(text.contains("attn.attention{mask=causal, window=8, scale=0.25, sinks=true}"), "{text}");
    assert!(text.contains("moe.router_weights{score=sigmoid, norm=true, norm_eps=1e-20, scale=2.5}"), "{text}");
    assert!(text.contains("attn.kv_append{len=S, ring=true}"), "{text}");
    assert!(text.contains(": bf16[S+T,2,16]"), "{text}");
    let back: Graph = text.parse().unwrap();
    assert_eq!(back.to_string(), text);
}
