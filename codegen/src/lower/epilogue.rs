//! The epilogue of an anchor kernel: the anchor's f32 result rounded to its
//! dtype, then each fused elementwise node in order (rounded to its dtype,
//! as the interpreter rounds every node), then one store of the last value.

use tilefuse_ir::NodeId;

use crate::emit::{Expr, Stmt, Temps, Ty};
use crate::error::CodegenError;
use crate::fusion::Group;
use crate::lower::values::{ew_expr, pointer, round};
use crate::plan::Plan;

fn describe(plan: &Plan, n: NodeId) -> String {
    let node = plan.fused.graph.node(n);
    let mut s = format!("\"{}\" {}", node.name, node.op.mnemonic());
    if let Some(l) = &node.loc {
        s.push_str(&format!(" @ {l}"));
    }
    s
}

/// Statements computing and storing the epilogue of `group` for the element
/// at flat index `index` of the anchor's output, whose f32 value is `acc`.
pub fn epilogue(
    plan: &Plan,
    group: &Group,
    anchor: NodeId,
    acc: Expr,
    index: Expr,
    temps: &mut Temps,
) -> Result<Vec<Stmt>, CodegenError> {
    let g = &plan.fused.graph;
    let unsupported = |n: NodeId, reason: String| CodegenError::Unsupported {
        node: g.describe(n),
        reason,
    };
    let mut out = Vec::new();
    let v = temps.fresh();
    out.push(Stmt::NodeComment(describe(plan, anchor)));
    let anchor_ty = g.node(anchor).ty.dtype;
    out.push(Stmt::Let(
        Ty::F32,
        v.clone(),
        round(anchor_ty, acc).map_err(|m| unsupported(anchor, m))?,
    ));
    let mut cur_node = anchor;
    let mut cur = Expr::var(&v);
    for &e in &group.epilogue {
        let node = g.node(e);
        let mut args = Vec::new();
        for i in g.inputs(e) {
            if plan.fused.storage(i) == plan.fused.storage(cur_node) {
                args.push(cur.clone());
            } else {
                let numel_one = g.node(i).ty.dims().iter().all(|d| d.as_const() == Some(1));
                let idx = if numel_one {
                    Expr::I32(0)
                } else {
                    index.clone()
                };
                args.push(Expr::call(
                    "tf::to_float",
                    vec![pointer(plan, i, false)?.index(idx)],
                ));
            }
        }
        let x = ew_expr(&node.op, &args).map_err(|m| unsupported(e, m))?;
        let name = temps.fresh();
        out.push(Stmt::NodeComment(describe(plan, e)));
        out.push(Stmt::Let(
            Ty::F32,
            name.clone(),
            round(node.ty.dtype, x).map_err(|m| unsupported(e, m))?,
        ));
        cur = Expr::var(&name);
        cur_node = e;
    }
    let dt = g.node(cur_node).ty.dtype;
    let store_ty = crate::lower::values::ctype(dt).map_err(|m| unsupported(cur_node, m))?;
    out.push(Stmt::Assign(
        pointer(plan, cur_node, true)?.index(index),
        Expr::call(format!("tf::from_float<{store_ty}>"), vec![cur]),
    ));
    Ok(out)
}
