//! Per-element kernels: a chain of elementwise nodes over one element count,
//! each thread computing a few elements from global memory and storing the
//! last node's value.

use tilefuse_ir::{Dim, NodeId};

use crate::emit::{Expr, Stmt, Temps, Ty};
use crate::error::CodegenError;
use crate::fusion::Group;
use crate::lower::values::{ctype, ew_expr, pointer, round};
use crate::plan::{Plan, PlanOptions, Tiling};

/// Threads per CTA.
pub const THREADS: u32 = 256;
/// Elements per thread.
pub const PER_THREAD: u32 = 4;

/// The element count as a C++ expression of `T`, and its value at `max_t`.
fn numel(
    plan_g: &tilefuse_ir::Graph,
    n: NodeId,
    max_t: usize,
) -> Result<(Expr, usize), CodegenError> {
    let mut c = 1usize;
    let mut t_pow = 0;
    for d in plan_g.node(n).ty.dims() {
        match d.as_const() {
            Some(k) => c *= k,
            None if *d == Dim::sym("T") => t_pow += 1,
            None => {
                return Err(CodegenError::Unsupported {
                    node: plan_g.describe(n),
                    reason: format!(
                        "element-wise kernels need dims that are constants or T, found {d}"
                    ),
                })
            }
        }
    }
    let e = match t_pow {
        0 => Expr::I32(c as i64),
        1 => Expr::var("T").bin("*", Expr::I32(c as i64)),
        _ => {
            return Err(CodegenError::Unsupported {
                node: plan_g.describe(n),
                reason: "element-wise kernels need T at most once in the shape".into(),
            })
        }
    };
    Ok((e, c * max_t.pow(t_pow)))
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
    let (_, n) = numel(g, last, opt.max_t)?;
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
    let (numel_e, _) = numel(g, last, plan.options.max_t)?;
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
    Ok(vec![
        Stmt::Let(Ty::I32, "numel".into(), numel_e),
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
                Stmt::If(Expr::var("i").bin("<", Expr::var("numel")), inner, vec![]),
            ],
        ),
    ])
}
