//! GPU executables against the interpreter, in every launch mode, on graphs
//! of every kernel kind that has a lowering. Skips without a GPU.

use std::collections::BTreeMap;

use tilefuse_ir::interp::{self, Caches, Tensor};
use tilefuse_ir::testing::random_inputs;
use tilefuse_ir::{shape, BinaryOp, Bindings, Builder, DType, Graph, UnaryOp};
use tilefuse_runtime::cuda_exec::{GpuExecutable, LaunchMode};
use tilefuse_runtime::gpu::Gpu;

/// Relative L2 error of `got` against `want`; NaN anywhere is infinite.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    if got.iter().chain(want).any(|x| x.is_nan()) || got.len() != want.len() {
        return f64::INFINITY;
    }
    let num: f64 = got.iter().zip(want).map(|(a, b)| f64::from(a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| f64::from(*b).powi(2)).sum::<f64>().max(1e-30);
    (num / den).sqrt()
}

/// Tolerance by output dtype.
fn tolerance(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// Runs `g` on the GPU in `mode` at each `(S, T)` step with fresh inputs and
/// compares every output with the interpreter. The arena starts poisoned
/// (NaN bytes), so an unwritten output fails the comparison.
fn check(gpu: Gpu, g: &Graph, steps: &[(usize, usize)], mode: LaunchMode, buckets: &[usize]) -> Gpu {
    let b0 = Bindings::new().with("S", 0).with("T", 1);
    let weights: BTreeMap<String, Tensor> = random_inputs(g, &b0, 99)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| g.find_input(n).is_some_and(|id| g.node(id).op == tilefuse_ir::Op::Input(tilefuse_ir::InputKind::Weight)))
        .collect();
    let mut exe = GpuExecutable::new(gpu, g, &weights, buckets, mode).unwrap_or_else(|e| panic!("{e}"));
    let mut caches = Caches::for_graph(g, &Bindings::new()).unwrap();
    for (i, &(s, t)) in steps.iter().enumerate() {
        let b = Bindings::new().with("S", s).with("T", t);
        let mut inputs = random_inputs(g, &b, 1000 + i as u64).unwrap();
        inputs.retain(|n, _| !weights.contains_key(n));
        let got = exe.run(&b, &inputs).unwrap_or_else(|e| panic!("{e}"));
        let mut all = weights.clone();
        all.extend(inputs);
        let want = interp::run(g, &b, &all, &mut caches).unwrap();
        for (name, w) in &want {
            let err = rel_l2(&got[name].to_f32(), &w.to_f32());
            println!("{} {mode:?} S={s} T={t} {name}: rel L2 {err:.2e}", g.name);
            assert!(err <= tolerance(w.dtype), "{} {mode:?} S={s} T={t} output {name}: rel L2 {err}", g.name);
        }
    }
    exe.into_gpu()
}

fn elementwise_graph() -> Graph {
    let mut b = Builder::new("elementwise", &["T"]);
    let x = b.input("x", DType::BF16, shape![T, 300]).unwrap();
    let y = b.input("y", DType::BF16, shape![T, 300]).unwrap();
    let z = b.input("z", DType::F32, shape![T, 300]).unwrap();
    let s = b.unary(UnaryOp::Silu, x).unwrap();
    let m = b.mul(s, y).unwrap();
    let c = b.scalar(BinaryOp::Add, m, 0.5).unwrap();
    let f = b.cast(c, DType::F32).unwrap();
    let e = b.binary(BinaryOp::Max, f, z).unwrap();
    let r = b.unary(UnaryOp::Exp, e).unwrap();
    b.output("out", r).unwrap();
    b.output("mid", c).unwrap();
    b.finish().unwrap()
}

#[test]
fn elementwise_kernels_match_the_interpreter_in_every_mode() {
    let Some(mut gpu) = Gpu::open().unwrap() else {
        println!("{}", Gpu::SKIP);
        return;
    };
    let g = elementwise_graph();
    for mode in [LaunchMode::Stream, LaunchMode::Graph, LaunchMode::Persistent] {
        gpu = check(gpu, &g, &[(0, 1), (0, 7), (0, 3), (0, 16)], mode, &[1, 16]);
    }
}

#[test]
fn norm_linear_matches_the_interpreter() {
    let Some(mut gpu) = Gpu::open().unwrap() else {
        println!("{}", Gpu::SKIP);
        return;
    };
    for dt in [DType::BF16, DType::MXFP4, DType::NVFP4, DType::F8E4M3] {
        let g = tilefuse_model::canonical::norm_linear(dt).unwrap();
        for mode in [LaunchMode::Stream, LaunchMode::Graph, LaunchMode::Persistent] {
            gpu = check(gpu, &g, &[(0, 1), (0, 5), (0, 16), (0, 40)], mode, &[1, 16, 64]);
        }
    }
}

#[test]
fn attention_block_matches_the_interpreter_across_the_ring() {
    let Some(mut gpu) = Gpu::open().unwrap() else {
        println!("{}", Gpu::SKIP);
        return;
    };
    let g = tilefuse_model::canonical::attention_block().unwrap();
    // Prefill 5, decode, a block of 16, decodes past the ring's 31 slots, a block of 8.
    let steps = [(0, 5), (5, 1), (6, 16), (22, 1), (23, 1), (24, 8), (32, 1), (33, 16), (49, 1)];
    for mode in [LaunchMode::Stream, LaunchMode::Graph, LaunchMode::Persistent] {
        gpu = check(gpu, &g, &steps, mode, &[1, 8, 16]);
    }
}
