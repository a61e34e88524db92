//! Random graphs and random inputs for property tests across the workspace
//! (enabled by the `testing` feature).

use std::collections::BTreeMap;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::fp4::{quantize, Fp4Format};
use crate::interp::Tensor;
use crate::{
    shape, BinaryOp, Bindings, Builder, DType, Graph, InputKind, NodeId, ReduceKind, Result,
    UnaryOp,
};

/// A step of [`build`].
#[derive(Clone, Debug)]
pub enum Step {
    /// A unary op on value `a`.
    Unary(usize, UnaryOp),
    /// `a op c`.
    Scalar(usize, BinaryOp, f32),
    /// `a op b`.
    Binary(usize, usize, BinaryOp),
    /// A reduction of `a` over an axis.
    Reduce(usize, ReduceKind, usize),
    /// Splits the last axis of `a` in 4.
    Split(usize),
    /// Reverses the axes of `a`.
    Permute(usize),
    /// Two elements of the last axis of `a` from an offset.
    Slice(usize, usize),
    /// `a` and `b` joined on axis 0.
    Concat(usize, usize),
    /// RMSNorm of `a` with an epsilon.
    Norm(usize, f32),
    /// `a` times a new weight of a size class and dtype.
    MatMul(usize, usize, DType),
    /// `a` cast to a dtype.
    Cast(usize, DType),
    /// Renames `a`.
    Name(usize, String),
}

/// A random construction step.
pub fn arb_step() -> impl Strategy<Value = Step> {
    let n = 0usize..64;
    prop_oneof![
        (n.clone(), proptest::sample::select(UnaryOp::ALL.to_vec()))
            .prop_map(|(a, u)| Step::Unary(a, u)),
        (
            n.clone(),
            proptest::sample::select(BinaryOp::ALL.to_vec()),
            -1e6f32..1e6
        )
            .prop_map(|(a, o, c)| Step::Scalar(a, o, c)),
        (
            n.clone(),
            n.clone(),
            proptest::sample::select(BinaryOp::ALL.to_vec())
        )
            .prop_map(|(a, b, o)| Step::Binary(a, b, o)),
        (
            n.clone(),
            proptest::sample::select(vec![ReduceKind::Sum, ReduceKind::Max, ReduceKind::Mean]),
            0usize..3
        )
            .prop_map(|(a, k, x)| Step::Reduce(a, k, x)),
        n.clone().prop_map(Step::Split),
        n.clone().prop_map(Step::Permute),
        (n.clone(), 0usize..8).prop_map(|(a, s)| Step::Slice(a, s)),
        (n.clone(), n.clone()).prop_map(|(a, b)| Step::Concat(a, b)),
        (n.clone(), 1e-7f32..1e-2).prop_map(|(a, e)| Step::Norm(a, e)),
        (
            n.clone(),
            0usize..4,
            proptest::sample::select(vec![
                DType::BF16,
                DType::F8E4M3,
                DType::MXFP4,
                DType::NVFP4,
                DType::F32
            ])
        )
            .prop_map(|(a, w, d)| Step::MatMul(a, w, d)),
        (
            n.clone(),
            proptest::sample::select(vec![DType::F32, DType::BF16, DType::F16])
        )
            .prop_map(|(a, d)| Step::Cast(a, d)),
        (n, "[a-z][a-z0-9_.\" \\\\]{0,12}").prop_map(|(a, s)| Step::Name(a, s)),
    ]
}

/// Builds a graph from steps; steps that do not type-check are skipped.
/// Inputs: `x`, `y` bf16 `[T,64]`, `z` f32 `[S+T,32]`; outputs `out` (the last value) and `first`.
pub fn build(steps: &[Step]) -> Graph {
    build_with_z(steps, shape!["S+T", 32])
}

/// Like [`build`], with `z` of `[T,32]`: every input is sized by `T` alone,
/// as a GPU plan needs (a stored activation may not depend on `S`, the
/// cached length), so these graphs can be planned and lowered.
pub fn build_t_only(steps: &[Step]) -> Graph {
    build_with_z(steps, shape![T, 32])
}

fn build_with_z(steps: &[Step], z: crate::Shape) -> Graph {
    let mut b = Builder::new("random", &["S", "T"]);
    let mut vals: Vec<NodeId> = vec![
        b.input("x", DType::BF16, shape![T, 64])
            .expect("random graph construction"),
        b.input("y", DType::BF16, shape![T, 64])
            .expect("random graph construction"),
        b.input("z", DType::F32, z)
            .expect("random graph construction"),
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
                        b.reshape(x, crate::Shape(d))
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
                let last = b
                    .shape(x)
                    .last()
                    .cloned()
                    .expect("random graph construction");
                let dt = b.ty(x).dtype;
                weights += 1;
                let w = b.weight(&format!("norm{weights}"), dt, crate::Shape(vec![last]));
                w.and_then(|w| b.rms_norm(x, w, *e))
            }
            Step::MatMul(a, n, d) => {
                let x = pick(*a);
                let last = b
                    .shape(x)
                    .last()
                    .cloned()
                    .expect("random graph construction");
                // Only weights a matmul can read: FP4 needs K a multiple of the block.
                if let Some(block) = d.block_size() {
                    if last.as_const().is_none_or(|k| k % block != 0) {
                        continue;
                    }
                }
                weights += 1;
                let w = b.weight(
                    &format!("w{weights}"),
                    *d,
                    crate::Shape(vec![(16 * (n + 1)).into(), last]),
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
    let last = *vals.last().expect("random graph construction");
    b.output("out", last).expect("random graph construction");
    b.output("first", vals[0])
        .expect("random graph construction");
    b.finish().expect("random graph construction")
}

/// Random graphs of up to `max_steps` steps.
pub fn arb_graph(max_steps: usize) -> impl Strategy<Value = Graph> {
    proptest::collection::vec(arb_step(), 0..max_steps).prop_map(|s| build(&s))
}

/// Random graphs of up to `max_steps` steps built by [`build_t_only`].
pub fn arb_graph_t_only(max_steps: usize) -> impl Strategy<Value = Graph> {
    proptest::collection::vec(arb_step(), 0..max_steps).prop_map(|s| build_t_only(&s))
}

/// Random graphs of up to `max_steps` steps drawn only from the steps
/// `keep` accepts, built by [`build_t_only`].
pub fn arb_graph_t_only_of(
    max_steps: usize,
    keep: fn(&Step) -> bool,
) -> impl Strategy<Value = Graph> {
    proptest::collection::vec(
        arb_step().prop_filter("step kind not wanted", keep),
        0..max_steps,
    )
    .prop_map(|s| build_t_only(&s))
}

/// Fresh random values (never zeros: uniform in ±[0.1, 1]) for every
/// activation and weight input of `g` with its symbols bound; FP4 weights are
/// quantized from such values.
pub fn random_inputs(
    g: &Graph,
    bindings: &Bindings,
    seed: u64,
) -> Result<BTreeMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = BTreeMap::new();
    for kind in [InputKind::Activation, InputKind::Weight] {
        for n in g.inputs_of_kind(kind) {
            let node = g.node(n);
            let shape = node
                .ty
                .shape
                .eval(bindings)
                .map_err(|m| crate::IrError::new(crate::ErrorKind::Interp, m))?;
            let numel: usize = shape.iter().product();
            let t = match node.ty.dtype {
                DType::I32 => {
                    Tensor::i32(&shape, (0..numel).map(|_| rng.gen_range(0..16)).collect())?
                }
                d => {
                    let v: Vec<f32> = (0..numel)
                        .map(|_| {
                            let m: f32 = rng.gen_range(0.1..1.0);
                            if rng.gen::<bool>() {
                                m
                            } else {
                                -m
                            }
                        })
                        .collect();
                    match d {
                        DType::MXFP4 | DType::NVFP4 => {
                            let f = if d == DType::MXFP4 {
                                Fp4Format::Mx
                            } else {
                                Fp4Format::Nv
                            };
                            let q = quantize(&v, *shape.last().unwrap_or(&1), f)
                                .map_err(|m| crate::IrError::new(crate::ErrorKind::Interp, m))?;
                            Tensor::fp4(&shape, q)?
                        }
                        d => Tensor::f32(d, &shape, v)?,
                    }
                }
            };
            out.insert(node.name.clone(), t);
        }
    }
    Ok(out)
}
