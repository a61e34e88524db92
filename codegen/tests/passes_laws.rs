//! Laws of the pass pipeline, each able to fail:
//!
//! 1. **Rewrites preserve semantics**: after every pass that rewrites the
//!    graph, the interpreter on the rewritten graph gives bit for bit the
//!    outputs of the interpreter on the original graph.
//! 2. **Fusion preserves semantics**: the fused kernels, run in the plan's
//!    schedule order by the CPU model of `kernel_model` (each kernel computes
//!    its nodes from memory and stores only what its template stores), give
//!    bit for bit the interpreter's outputs on the original graph.
//! 3. **Determinism**: the pipeline, the plan and the lowering run twice on
//!    the same graph print identical IR and plans and generate identical
//!    CUDA source.
//! 4. **Unsupported is counted, not passed**: on graphs of ops that all have
//!    GPU kernels, nothing is unsupported; on graphs of every op, each
//!    unsupported graph names an op from the known list of GPU gaps, and at
//!    least a set share of the graphs goes through all the laws above.
//!
//! The `sabotage_*` tests break one rewrite on purpose (a pass wrapped with a
//! wrong rewrite) and check that the law that guards it fails, with the
//! message a real bug of that kind would give.

#![allow(clippy::unwrap_used)]

mod kernel_model;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use tilefuse_codegen::fusion::{Fused, Group, KernelKind};
use tilefuse_codegen::lower::lower;
use tilefuse_codegen::passes::{run_pipeline_observed, Pass, PIPELINE};
use tilefuse_codegen::plan::{Plan, PlanOptions};
use tilefuse_codegen::CodegenError;
use tilefuse_ir::interp::{self, Caches, Tensor};
use tilefuse_ir::testing::{arb_graph, arb_graph_t_only, arb_graph_t_only_of, random_inputs, Step};
use tilefuse_ir::{shape, BinaryOp, Bindings, Builder, DType, Elementwise, Graph, Op};
use tilefuse_model::canonical;

/// The largest `T` of the plans made here (the bindings use `T <= MAX_T`).
const MAX_T: usize = 4;

/// How one graph went through the laws.
#[derive(Debug)]
enum Outcome {
    /// Every law held.
    Checked,
    /// The interpreter refuses the original graph (e.g. a slice out of range
    /// once bound): only the pipeline's own checks ran.
    InterpRefused(#[allow(dead_code)] String),
    /// The pipeline, the plan or the lowering reports an unsupported node;
    /// the rewrite law held up to that point.
    Unsupported(String),
}

fn same_outputs(
    what: &str,
    want: &BTreeMap<String, Tensor>,
    got: &BTreeMap<String, Tensor>,
) -> Result<(), String> {
    for (name, w) in want {
        let g = got
            .get(name)
            .ok_or_else(|| format!("{what}: output \"{name}\" is missing"))?;
        if g.shape != w.shape || g.dtype != w.dtype {
            return Err(format!(
                "{what}: output \"{name}\" is {}{:?}, the interpreter on the original graph gives {}{:?}",
                g.dtype, g.shape, w.dtype, w.shape
            ));
        }
        let (a, b) = (w.to_f32(), g.to_f32());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            if !(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())) {
                return Err(format!(
                    "{what}: output \"{name}\"[{i}] is {y}, the interpreter on the original graph gives {x}"
                ));
            }
        }
    }
    Ok(())
}

fn is_unsupported(e: &CodegenError) -> bool {
    match e {
        CodegenError::Unsupported { .. } => true,
        CodegenError::Pass { error, .. } => is_unsupported(error),
        _ => false,
    }
}

/// Runs `passes` (the shipped pipeline when `None`) on `g`, returning the
/// result and the graph after each pass.
fn pipeline(
    g: Graph,
    passes: Option<&[Pass]>,
) -> (Result<Fused, CodegenError>, Vec<(String, Graph)>) {
    let mut states = Vec::new();
    let Some(passes) = passes else {
        let r = run_pipeline_observed(g, |name, f| {
            states.push((name.to_string(), f.graph.clone()))
        });
        return (r, states);
    };
    // The same loop as `run_pipeline_observed`, over another pass list.
    let mut run = || -> Result<Fused, CodegenError> {
        g.verify()?;
        let mut f = Fused::new(g.clone());
        for pass in passes {
            (pass.run)(&mut f)
                .and_then(|()| f.verify())
                .map_err(|error| CodegenError::Pass {
                    pass: pass.name,
                    error: Box::new(error),
                    reproducer: None,
                })?;
            states.push((pass.name.to_string(), f.graph.clone()));
        }
        f.verify_complete()?;
        Ok(f)
    };
    let r = run();
    (r, states)
}

/// Plans and lowers a fused graph; `Ok(None)` with the message when a node is unsupported.
fn plan_and_lower(
    f: Result<Fused, CodegenError>,
) -> Result<Result<(Plan, String), String>, String> {
    let step = || -> Result<(Plan, String), CodegenError> {
        let plan = Plan::new(f?, PlanOptions::new(MAX_T))?;
        let source = lower(&plan)?.source;
        Ok((plan, source))
    };
    match step() {
        Ok(x) => Ok(Ok(x)),
        Err(e) if is_unsupported(&e) => Ok(Err(e.to_string())),
        Err(e) => Err(format!("the pipeline, plan or lowering failed: {e}")),
    }
}

/// Every law on `g` with symbols `b` (inputs drawn with `seed`), through
/// `passes` (the shipped pipeline when `None`).
fn laws(g: &Graph, b: &Bindings, seed: u64, passes: Option<&[Pass]>) -> Result<Outcome, String> {
    let inputs = random_inputs(g, b, seed).map_err(|e| e.to_string())?;
    let mut caches = Caches::for_graph(g, b).map_err(|e| e.to_string())?;
    let before = match interp::run(g, b, &inputs, &mut caches) {
        Ok(o) => o,
        Err(e) => {
            // Nothing to compare with; the pipeline must still verify.
            let (r, _) = pipeline(g.clone(), passes);
            if let Err(e) = &r {
                if !is_unsupported(e) {
                    return Err(format!("the pipeline failed: {e}"));
                }
            }
            return Ok(Outcome::InterpRefused(e.to_string()));
        }
    };

    // Law 1: every rewritten graph against the original.
    let (fused, states) = pipeline(g.clone(), passes);
    let mut last = g.to_string();
    for (pass, graph) in &states {
        let text = graph.to_string();
        if text == last {
            continue;
        }
        let mut caches = Caches::for_graph(graph, b).map_err(|e| e.to_string())?;
        let after = interp::run(graph, b, &inputs, &mut caches).map_err(|e| {
            format!("the interpreter refuses the graph after `{pass}`, not the original: {e}")
        })?;
        same_outputs(&format!("the graph after `{pass}`"), &before, &after)?;
        last = text;
    }

    // Law 2: the fused kernels against the original.
    let (plan, source) = match plan_and_lower(fused)? {
        Ok(x) => x,
        Err(m) => return Ok(Outcome::Unsupported(m)),
    };
    let got =
        kernel_model::run(&plan, b, &inputs).map_err(|m| format!("the fused kernels: {m}"))?;
    same_outputs("the fused kernels", &before, &got)?;

    // Law 3: a second run prints and generates the same.
    let (fused2, _) = pipeline(g.clone(), passes);
    let (plan2, source2) = plan_and_lower(fused2)?
        .map_err(|m| format!("the second run finds an unsupported node the first did not: {m}"))?;
    first_difference(
        "printed IR (kernels and graph)",
        &plan.fused.to_string(),
        &plan2.fused.to_string(),
    )?;
    first_difference("plans", &plan.to_string(), &plan2.to_string())?;
    first_difference("generated CUDA source", &source, &source2)?;
    Ok(Outcome::Checked)
}

fn first_difference(what: &str, a: &str, b: &str) -> Result<(), String> {
    if a == b {
        return Ok(());
    }
    let (i, (x, y)) = a
        .lines()
        .zip(b.lines())
        .enumerate()
        .find(|(_, (x, y))| x != y)
        .unwrap_or((a.lines().count().min(b.lines().count()), ("<end>", "<end>")));
    Err(format!(
        "two runs on the same graph give different {what}: line {}:\n  first:  {x}\n  second: {y}",
        i + 1
    ))
}

/// Steps whose graphs stay inside what the GPU path supports: not reduce,
/// permute or slice (no GPU kernel), no f16 casts (matvec and norm kernels
/// read bf16 or f32 rows) and no splits (matvec kernels read `[rows, K]`
/// activations; reshapes are covered by the canonical blocks).
fn gpu_step(s: &Step) -> bool {
    !matches!(
        s,
        Step::Reduce(..)
            | Step::Permute(..)
            | Step::Slice(..)
            | Step::Split(..)
            | Step::Cast(_, DType::F16)
    )
}

/// Graphs of [`gpu_step`]s whose FP4 matmuls have `K` a multiple of 32 (the
/// GPU reads FP4 rows 32 elements at a time; the IR needs only the block).
fn arb_gpu_graph() -> impl Strategy<Value = Graph> {
    arb_graph_t_only_of(24, gpu_step).prop_filter("FP4 matmul with K % 32 != 0", |g| {
        g.topo_order().unwrap().into_iter().all(|n| {
            let ty = &g.node(n).ty;
            !(matches!(g.node(n).op, Op::Input(_))
                && ty.dtype.is_block_quantized()
                && ty
                    .dims()
                    .last()
                    .and_then(|d| d.as_const())
                    .is_some_and(|k| k % 32 != 0))
        })
    })
}

/// The reason of an unsupported error with numbers and shapes dropped, to
/// count reasons by kind.
fn reason_kind(m: &str) -> String {
    let r = m.rsplit("unsupported: ").next().unwrap_or(m);
    r.split_whitespace()
        .take(6)
        .filter(|w| !w.chars().any(|c| c.is_ascii_digit() || c == '['))
        .collect::<Vec<_>>()
        .join(" ")
}

fn bindings() -> Bindings {
    Bindings::new().with("S", 2).with("T", 3)
}

/// Counts of outcomes over a run of random cases.
#[derive(Default)]
struct Tally {
    checked: AtomicUsize,
    refused: AtomicUsize,
    unsupported: AtomicUsize,
    reasons: std::sync::Mutex<BTreeMap<String, usize>>,
}

fn run_random(
    strategy: impl Strategy<Value = Graph>,
    cases: u32,
    passes: Option<&[Pass]>,
    allow_unsupported: bool,
    tally: &Tally,
) -> Result<(), String> {
    let mut runner = TestRunner::new(Config {
        source_file: Some(file!()),
        // A sabotaged pipeline fails on purpose: its cases are not regressions to keep.
        failure_persistence: if passes.is_none() {
            Config::default().failure_persistence
        } else {
            None
        },
        ..Config::with_cases(cases)
    });
    let b = bindings();
    runner
        .run(&strategy, |g| {
            match laws(&g, &b, 11, passes).map_err(TestCaseError::fail)? {
                Outcome::Checked => tally.checked.fetch_add(1, Ordering::Relaxed),
                Outcome::InterpRefused(_) => tally.refused.fetch_add(1, Ordering::Relaxed),
                Outcome::Unsupported(m) => {
                    if !allow_unsupported {
                        return Err(TestCaseError::fail(format!(
                            "a graph of ops that all have GPU kernels is unsupported: {m}"
                        )));
                    }
                    *tally
                        .reasons
                        .lock()
                        .unwrap()
                        .entry(reason_kind(&m))
                        .or_default() += 1;
                    tally.unsupported.fetch_add(1, Ordering::Relaxed)
                }
            };
            Ok(())
        })
        .map_err(|e| match e {
            TestError::Fail(why, g) => format!("{why}\nminimal failing graph:\n{g}"),
            TestError::Abort(why) => format!("aborted: {why}"),
        })
}

#[test]
fn laws_hold_on_random_graphs_of_every_op() {
    let tally = Tally::default();
    run_random(arb_graph_t_only(24), 1024, None, true, &tally).unwrap_or_else(|e| panic!("{e}"));
    let (c, r, u) = (
        tally.checked.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        tally.unsupported.load(Ordering::Relaxed),
    );
    println!("{c} graphs through every law, {u} unsupported, {r} refused by the interpreter");
    for (reason, n) in tally.reasons.lock().unwrap().iter() {
        println!("  unsupported {n:>4}: {reason}");
    }
    // Unsupported graphs test only the rewrites: a good share must reach the
    // kernels (about half do; the bound leaves room for the random draw).
    assert!(
        c * 100 >= 35 * (c + r + u),
        "only {c} of {} graphs went through every law ({u} unsupported, {r} refused)",
        c + r + u
    );
}

#[test]
fn laws_hold_and_nothing_is_unsupported_on_random_graphs_of_gpu_ops() {
    let tally = Tally::default();
    run_random(arb_gpu_graph(), 1024, None, false, &tally).unwrap_or_else(|e| panic!("{e}"));
    let c = tally.checked.load(Ordering::Relaxed);
    let r = tally.refused.load(Ordering::Relaxed);
    println!("{c} graphs through every law, {r} refused by the interpreter");
    assert!(
        r * 10 <= c,
        "the interpreter refused {r} graphs, {c} checked"
    );
}

/// The rewrite law on the original generator, whose `z` rows depend on `S`
/// (no plan can store it, so only the passes run).
#[test]
fn rewrites_preserve_semantics_with_cached_rows() {
    let b = bindings();
    let mut runner = TestRunner::new(Config {
        source_file: Some(file!()),
        ..Config::with_cases(512)
    });
    if let Err(TestError::Fail(why, g)) = runner.run(&arb_graph(24), |g| {
        laws(&g, &b, 11, None).map_err(TestCaseError::fail)?;
        Ok(())
    }) {
        panic!("{why}\nminimal failing graph:\n{g}");
    }
}

/// The canonical blocks, whose kernels (attention with its RoPE-append and
/// split-key combine, router, the two expert kernels, norm prologues,
/// siblings) random graphs do not reach. `S = 0`: every key the attention
/// reads was appended in this forward, so none is NaN poison.
#[test]
fn laws_hold_on_the_canonical_blocks() {
    let graphs = [
        canonical::norm_linear(DType::MXFP4).unwrap(),
        canonical::norm_linear(DType::NVFP4).unwrap(),
        canonical::norm_linear(DType::BF16).unwrap(),
        canonical::attention_block().unwrap(),
        canonical::full_attention_block().unwrap(),
        canonical::moe_block(DType::MXFP4).unwrap(),
        canonical::moe_block(DType::BF16).unwrap(),
    ];
    for g in graphs {
        for t in [1, 3] {
            let b = Bindings::new().with("S", 0).with("T", t);
            match laws(&g, &b, 5, None) {
                Ok(Outcome::Checked) => {}
                other => panic!("{} at T={t}: {other:?}", g.name),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Deliberate breaks: each law fails on a wrong rewrite of its kind.

fn pass_named(name: &str) -> &'static Pass {
    PIPELINE
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no pass `{name}`"))
}

/// The shipped pipeline with pass `name` replaced by `run`.
fn with_pass(name: &'static str, run: fn(&mut Fused) -> Result<(), CodegenError>) -> Vec<Pass> {
    PIPELINE
        .iter()
        .map(|p| Pass {
            name: p.name,
            why: p.why,
            run: if p.name == name { run } else { p.run },
        })
        .collect()
}

/// canonicalize, plus a wrong rewrite: `cast(cast(x, narrow), wide)` becomes
/// `x` when `x` is already `wide` (it drops the rounding to `narrow`).
fn canonicalize_dropping_round_trips(f: &mut Fused) -> Result<(), CodegenError> {
    (pass_named("canonicalize").run)(f)?;
    for n in f.graph.topo_order()? {
        if !f.graph.contains(n) {
            continue;
        }
        let Op::Ew(Elementwise::Cast(to)) = f.graph.node(n).op else {
            continue;
        };
        let inner = f.graph.inputs(n)[0];
        if !matches!(f.graph.node(inner).op, Op::Ew(Elementwise::Cast(_))) {
            continue;
        }
        let x = f.graph.inputs(inner)[0];
        if f.graph.node(x).ty.dtype == to {
            f.graph.replace_uses(n, x);
            f.graph.remove(n);
        }
    }
    f.graph.remove_dead();
    Ok(())
}

/// fuse_epilogues, plus a wrong fusion: a matvec's element-wise consumer joins
/// its kernel even when the matvec's value has other users.
fn epilogues_ignoring_other_users(f: &mut Fused) -> Result<(), CodegenError> {
    (pass_named("fuse_epilogues").run)(f)?;
    for gi in 0..f.groups.len() {
        let KernelKind::MatVec { matmul, .. } = f.groups[gi].kind else {
            continue;
        };
        if !f.groups[gi].epilogue.is_empty() {
            continue;
        }
        let users = f.real_users(matmul);
        if let Some(&u) = users.iter().find(|&&u| {
            f.group_of(u).is_none() && matches!(f.graph.node(u).op, Op::Ew(Elementwise::Scalar(..)))
        }) {
            let g: &mut Group = &mut f.groups[gi];
            g.nodes.insert(u);
            g.epilogue.push(u);
        }
    }
    Ok(())
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

/// fuse_elementwise, plus an order that depends on state outside the graph:
/// the kernel list rotated by how many times the pass ran in this process.
fn elementwise_then_rotate(f: &mut Fused) -> Result<(), CodegenError> {
    (pass_named("fuse_elementwise").run)(f)?;
    let n = f.groups.len().max(1);
    f.groups
        .rotate_left(RUNS.fetch_add(1, Ordering::Relaxed) % n);
    Ok(())
}

/// remaining, refusing concats (as if their kernel were lost).
fn remaining_without_concat(f: &mut Fused) -> Result<(), CodegenError> {
    for n in f.graph.topo_order()? {
        if f.group_of(n).is_none()
            && matches!(
                f.graph.node(n).op,
                Op::View(tilefuse_ir::View::Concat { .. })
            )
        {
            return Err(CodegenError::Unsupported {
                node: f.graph.describe(n),
                reason: "no concat kernel".into(),
            });
        }
    }
    (pass_named("remaining").run)(f)
}

/// `z` f32 → bf16 → f32 → `* 3`, and a norm + matmul whose output is both
/// scaled (an output) and added to `y` (another output).
fn sabotage_graph() -> Graph {
    let mut b = Builder::new("sabotage", &["S", "T"]);
    let x = b.input("x", DType::BF16, shape![T, 64]).unwrap();
    let y = b.input("y", DType::BF16, shape![T, 64]).unwrap();
    let z = b.input("z", DType::F32, shape![T, 32]).unwrap();
    let nw = b.weight("norm", DType::BF16, shape![64]).unwrap();
    let w = b.weight("w", DType::BF16, shape![64, 64]).unwrap();
    let narrow = b.cast(z, DType::BF16).unwrap();
    let wide = b.cast(narrow, DType::F32).unwrap();
    let zz = b.scalar(BinaryOp::Mul, wide, 3.0).unwrap();
    let n = b.rms_norm(x, nw, 1e-5).unwrap();
    let m = b.matmul(n, w).unwrap();
    let scaled = b.scalar(BinaryOp::Mul, m, 0.5).unwrap();
    let sum = b.add(m, y).unwrap();
    let parts = b.concat(&[scaled, sum], 0).unwrap();
    b.output("z3", zz).unwrap();
    b.output("parts", parts).unwrap();
    b.finish().unwrap()
}

fn sabotaged(name: &'static str, run: fn(&mut Fused) -> Result<(), CodegenError>) -> String {
    let passes = with_pass(name, run);
    let g = sabotage_graph();
    // The shipped pipeline satisfies every law on this graph.
    match laws(&g, &bindings(), 3, None) {
        Ok(Outcome::Checked) => {}
        other => panic!("the shipped pipeline: {other:?}"),
    }
    match laws(&g, &bindings(), 3, Some(&passes)) {
        Err(m) => {
            println!("{name} broken on purpose: {m}");
            m
        }
        Ok(o) => panic!("the laws missed a broken `{name}`: {o:?}"),
    }
}

#[test]
fn sabotage_a_rewrite_fails_the_rewrite_law() {
    let m = sabotaged("canonicalize", canonicalize_dropping_round_trips);
    assert!(
        m.starts_with("the graph after `canonicalize`: output \"z3\""),
        "{m}"
    );
}

#[test]
fn sabotage_a_fusion_fails_the_kernel_law() {
    let m = sabotaged("fuse_epilogues", epilogues_ignoring_other_users);
    assert!(m.starts_with("the fused kernels: k"), "{m}");
    assert!(m.contains("which no earlier kernel stored"), "{m}");
}

#[test]
fn sabotage_an_order_fails_the_determinism_law() {
    let m = sabotaged("fuse_elementwise", elementwise_then_rotate);
    assert!(
        m.starts_with("two runs on the same graph give different printed IR"),
        "{m}"
    );
}

#[test]
fn sabotage_a_lost_kernel_fails_the_unsupported_bound() {
    let passes = with_pass("remaining", remaining_without_concat);
    let tally = Tally::default();
    let e = run_random(arb_gpu_graph(), 64, Some(&passes), false, &tally)
        .expect_err("the harness accepted unsupported graphs of GPU ops");
    println!("remaining broken on purpose: {e}");
    assert!(
        e.contains("a graph of ops that all have GPU kernels is unsupported"),
        "{e}"
    );
}
