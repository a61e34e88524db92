//! Per-element kernels: a chain of elementwise nodes over one element count,
//! each thread computing a few elements from global memory and storing the
//! last node's value.

use tilefuse_ir::{Dim, NodeId, Op, View};

use crate::emit::{Expr, Stmt, Temps, Ty};
use crate::error::CodegenError;
use crate::fusion::Group;
use crate::lower::values::{ctype, dim_expr, ew_expr, pointer, round};
use crate::plan::{Plan, PlanOptions, Tiling};

/// Threads per CTA.
pub const THREADS: u32 = 256;
/// Elements per thread.
pub const PER_THREAD: u32 = 4;

/// The element count of node `n`: constants times at most one row dim
/// (`T`, `C+T`, …), as a C++ expression (once the plan exists) and its
/// largest value in the bucket.
fn numel(
    g: &tilefuse_ir::Graph,
    n: NodeId,
    opt: &PlanOptions,
    plan: Option<&Plan>,
) -> Result<(Expr, usize), CodegenError> {
    let unsupported = |reason: String| CodegenError::Unsupported {
        node: g.describe(n),
        reason,
    };
    let mut c = 1usize;
    let mut row: Option<&Dim> = None;
    for d in g.node(n).ty.dims() {
        match d.as_const() {
            Some(k) => c *= k,
            None if row.is_none() => row = Some(d),
            None => {
                return Err(unsupported(format!(
                    "element-wise kernels need constants and at most one row dim in the shape, found {d} twice"
                )))
            }
        }
    }
    let Some(d) = row else {
        return Ok((Expr::I32(c as i64), c));
    };
    let max = d.eval(&opt.max_bindings()).map_err(unsupported)?;
    let e = match plan {
        Some(p) => dim_expr(p, d)?,
        None => Expr::I32(0),
    };
    Ok((e.bin("*", Expr::I32(c as i64)), c * max))
}

/// The loop of a per-element tile: `PER_THREAD` elements `i` per thread,
/// `body` run for each `i < numel`.
fn per_element(numel: Expr, body: Vec<Stmt>) -> Vec<Stmt> {
    vec![
        Stmt::Let(Ty::I32, "numel".into(), numel),
        Stmt::For(
            "j".into(),
            Expr::I32(0),
            Expr::I32(PER_THREAD as i64),
            Expr::I32(1),
            vec![
                Stmt::Let(
                    Ty::I32,
                    "i".into(),
                    Expr::var("tile")
                        .bin("*", Expr::I32((THREADS * PER_THREAD) as i64))
                        .bin("+", Expr::var("j").bin("*", Expr::I32(THREADS as i64)))
                        .bin("+", Expr::var("(int)threadIdx.x")),
                ),
                Stmt::If(Expr::var("i").bin("<", Expr::var("numel")), body, vec![]),
            ],
        ),
    ]
}

/// Launch shape.
pub fn tiling(
    g: &tilefuse_ir::Graph,
    group: &Group,
    opt: &PlanOptions,
) -> Result<Tiling, CodegenError> {
    let last = *group
        .epilogue
        .last()
        .ok_or_else(|| CodegenError::Internal("empty element-wise kernel".into()))?;
    let (_, n) = numel(g, last, opt, None)?;
    Ok(Tiling {
        tiles: (n as u32).div_ceil(THREADS * PER_THREAD).max(1),
        threads: THREADS,
        smem: 0,
        workspaces: vec![],
        shape: format!("{}", THREADS * PER_THREAD),
    })
}

/// The tile body.
pub fn body(plan: &Plan, group: &Group, temps: &mut Temps) -> Result<Vec<Stmt>, CodegenError> {
    let g = &plan.fused.graph;
    let last = *group
        .epilogue
        .last()
        .ok_or_else(|| CodegenError::Internal("empty element-wise kernel".into()))?;
    let (numel_e, _) = numel(g, last, &plan.options, Some(plan))?;
    let mut inner = Vec::new();
    let mut vars: Vec<(NodeId, String)> = Vec::new();
    for &e in &group.epilogue {
        let node = g.node(e);
        let unsupported = |m: String| CodegenError::Unsupported {
            node: g.describe(e),
            reason: m,
        };
        let mut args = Vec::new();
        for i in g.inputs(e) {
            let s = plan.fused.storage(i);
            if let Some((_, v)) = vars.iter().find(|(n, _)| *n == s) {
                args.push(Expr::var(v));
            } else {
                let one = g.node(i).ty.dims().iter().all(|d| d.as_const() == Some(1));
                let idx = if one { Expr::I32(0) } else { Expr::var("i") };
                args.push(Expr::call(
                    "tf::to_float",
                    vec![pointer(plan, i, false)?.index(idx)],
                ));
            }
        }
        let x = ew_expr(&node.op, &args).map_err(unsupported)?;
        let v = temps.fresh();
        inner.push(Stmt::NodeComment(format!(
            "\"{}\" {}",
            node.name,
            node.op.mnemonic()
        )));
        inner.push(Stmt::Let(
            Ty::F32,
            v.clone(),
            round(node.ty.dtype, x).map_err(|m| CodegenError::Unsupported {
                node: g.describe(e),
                reason: m,
            })?,
        ));
        vars.push((e, v));
    }
    let (_, lv) = vars
        .last()
        .cloned()
        .ok_or_else(|| CodegenError::Internal("empty element-wise kernel".into()))?;
    let st = ctype(g.node(last).ty.dtype).map_err(|m| CodegenError::Unsupported {
        node: g.describe(last),
        reason: m,
    })?;
    inner.push(Stmt::Assign(
        pointer(plan, last, true)?.index(Expr::var("i")),
        Expr::call(format!("tf::from_float<{st}>"), vec![Expr::var(lv)]),
    ));
    Ok(per_element(numel_e, inner))
}

/// A concat's output viewed as `[outer, A, inner]` around its axis (`outer`
/// constants times at most one row dim), with the inputs' extents along the axis.
struct ConcatView {
    /// Elements after the axis (constant).
    inner: usize,
    /// Each input's extent along the axis.
    parts: Vec<Dim>,
}

fn concat_view(g: &tilefuse_ir::Graph, n: NodeId) -> Result<ConcatView, CodegenError> {
    let Op::View(View::Concat { axis }) = g.node(n).op else {
        return Err(CodegenError::Internal("not a concat".into()));
    };
    let unsupported = |reason: String| CodegenError::Unsupported {
        node: g.describe(n),
        reason,
    };
    let dims = g.node(n).ty.dims();
    if dims[..axis].iter().filter(|d| !d.is_const()).count() > 1 {
        return Err(unsupported(
            "a concat with two row dims before its axis".into(),
        ));
    }
    let mut inner = 1usize;
    for d in &dims[axis + 1..] {
        inner *= d
            .as_const()
            .ok_or_else(|| unsupported(format!("dim {d} after the concat axis is not constant")))?;
    }
    let parts = g
        .inputs(n)
        .iter()
        .map(|&i| g.node(i).ty.dims()[axis].clone())
        .collect();
    Ok(ConcatView { inner, parts })
}

/// Launch shape of a concat: one element per thread slot, as element-wise kernels.
pub fn concat_tiling(
    g: &tilefuse_ir::Graph,
    n: NodeId,
    opt: &PlanOptions,
) -> Result<Tiling, CodegenError> {
    concat_view(g, n)?;
    let (_, numel) = numel(g, n, opt, None)?;
    Ok(Tiling {
        tiles: (numel as u32).div_ceil(THREADS * PER_THREAD).max(1),
        threads: THREADS,
        smem: 0,
        workspaces: vec![],
        shape: format!("{}", THREADS * PER_THREAD),
    })
}

/// The tile body of a concat: each output element copied from its input.
pub fn concat_body(plan: &Plan, n: NodeId) -> Result<Vec<Stmt>, CodegenError> {
    let g = &plan.fused.graph;
    let v = concat_view(g, n)?;
    let (numel_e, _) = numel(g, n, &plan.options, Some(plan))?;
    let mut axis = Dim::c(0);
    for p in &v.parts {
        axis = axis + p.clone();
    }
    let inner = Expr::I32(v.inner as i64);
    let mut body = vec![
        Stmt::Let(
            Ty::I32,
            "per".into(),
            dim_expr(plan, &axis)?.bin("*", inner.clone()),
        ),
        Stmt::Let(
            Ty::I32,
            "o".into(),
            Expr::var("i").bin("/", Expr::var("per")),
        ),
        Stmt::Let(
            Ty::I32,
            "a".into(),
            Expr::var("i")
                .bin("-", Expr::var("o").bin("*", Expr::var("per")))
                .bin("/", inner.clone()),
        ),
        Stmt::Let(Ty::I32, "k".into(), Expr::var("i").bin("%", inner.clone())),
    ];
    let out = pointer(plan, n, true)?;
    // Inputs in order: the first whose range along the axis holds `a`.
    let mut chain: Vec<Stmt> = vec![];
    let mut start = Dim::c(0);
    let mut branches = Vec::new();
    for (j, (&input, part)) in g.inputs(n).iter().zip(&v.parts).enumerate() {
        let end = start.clone() + part.clone();
        let src = pointer(plan, input, false)?.index(
            Expr::var("o")
                .bin("*", dim_expr(plan, part)?)
                .bin("+", Expr::var("a").bin("-", dim_expr(plan, &start)?))
                .bin("*", inner.clone())
                .bin("+", Expr::var("k")),
        );
        let copy = vec![Stmt::Assign(out.clone().index(Expr::var("i")), src)];
        let last = j + 1 == v.parts.len();
        branches.push((
            (!last).then(|| -> Result<Expr, CodegenError> {
                Ok(Expr::var("a").bin("<", dim_expr(plan, &end)?))
            }),
            copy,
        ));
        start = end;
    }
    for (cond, copy) in branches.into_iter().rev() {
        chain = match cond {
            None => copy,
            Some(c) => vec![Stmt::If(c?, copy, chain)],
        };
    }
    body.extend(chain);
    Ok(per_element(numel_e, body))
}
