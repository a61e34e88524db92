//! The MoE family over `moe.cuh` (router with its routing table, expert
//! gate/up and down kernels) and the token choice kernels of `sample.cuh`.

use tilefuse_ir::{DType, Moe, NodeId, Op, Sample, ScoreFn};

use crate::emit::{Expr, Stmt, Temps, Ty};
use crate::error::CodegenError;
use crate::fusion::{Fused, Group, KernelKind};
use crate::lower::epilogue::epilogue;
use crate::lower::matvec::weight_view;
use crate::lower::values::{guard, pointer, unsupported, work_ptr, work_ptr_slot};
use crate::lower::SMS;
use crate::plan::{Plan, PlanOptions, Tiling};

/// Threads per CTA.
pub const THREADS: u32 = 256;

fn c(d: &tilefuse_ir::Dim) -> usize {
    d.as_const().unwrap_or(0)
}

struct Experts {
    x: NodeId,
    idx: NodeId,
    w: NodeId,
    w13: NodeId,
    w2: NodeId,
    e: usize,
    h: usize,
    i: usize,
    topk: usize,
    wdt: DType,
}

fn experts(f: &Fused, n: NodeId) -> Result<Experts, CodegenError> {
    let g = &f.graph;
    let ins = g.inputs(n);
    let (w13t, w2t) = (&g.node(ins[3]).ty, &g.node(ins[4]).ty);
    if w13t.dtype != w2t.dtype {
        return Err(unsupported(f, n, "gate_up and down in different dtypes"));
    }
    if g.node(ins[0]).ty.dtype != DType::BF16 {
        return Err(unsupported(
            f,
            n,
            "the expert kernels take bf16 activations",
        ));
    }
    Ok(Experts {
        x: ins[0],
        idx: ins[1],
        w: ins[2],
        w13: ins[3],
        w2: ins[4],
        e: c(&w13t.dims()[0]),
        h: c(&w13t.dims()[2]),
        i: c(&w2t.dims()[2]),
        topk: c(&g.node(ins[1]).ty.dims()[1]),
        wdt: w13t.dtype,
    })
}

fn epv(d: DType) -> (usize, bool, &'static str) {
    match d {
        DType::BF16 => (8, true, "tf::WBf16"),
        DType::F32 => (4, false, "tf::WF32"),
        DType::F8E4M3 => (16, true, "tf::WE4M3"),
        DType::MXFP4 => (32, true, "tf::WMx"),
        _ => (32, true, "tf::WNv"),
    }
}

/// Shared memory of a weight pass over `nrows` rows and `maxcol` columns (the
/// `mv_detail::Plan` reduction buffer of `matvec.cuh`).
fn pass_floats(nrows: usize, maxcol: usize, mma: bool) -> (usize, usize) {
    let warps = THREADS as usize / 32;
    let (g, ncolp) = if mma {
        (16, 8 * maxcol.div_ceil(8))
    } else {
        ((nrows / warps).max(2), maxcol.min(8))
    };
    let kw = warps / (nrows / g).max(1);
    (kw, ncolp)
}

/// How the gate/up kernel of experts `x` is cut in a bucket of `max_t` tokens.
#[derive(Clone, Copy)]
struct UpShape {
    /// Rows of gate and of up a tile (a tile reads twice as many).
    rows: usize,
    /// CTAs an SM it asks for ([`up_min_blocks`]).
    min_blocks: u32,
    /// `MoeCfg`'s `XA`: -1 for `X_AHEAD`, 0 for no x vector loaded ahead.
    x_ahead: i32,
}

/// The gate/up tiles' shape in a plan of options `opt`. At one token on the
/// tensor-core path, where 16 rows of gate and of up a tile fill the card in
/// one wave at three CTAs an SM (never in the persistent kernel, whose one
/// CTA an SM would run three times as many tiles, each choosing the
/// experts again): that shape, each warp then owning a quarter of K in one batch of
/// loads, 24 warps an SM, and no x vector loaded ahead (which would take it
/// past 85 registers). Otherwise the widest tile that still gives every SM
/// a tile, asking for two CTAs an SM where the x vectors are loaded ahead.
fn up_shape(x: &Experts, opt: &PlanOptions) -> UpShape {
    let max_t = opt.max_t;
    let tiles = |r: usize| x.e.min(max_t * x.topk) * x.i.div_ceil(r);
    if max_t == 1 && !opt.persistent && mma(x, x.h) && tiles(16) <= 3 * SMS {
        return UpShape {
            rows: 16,
            min_blocks: 3,
            x_ahead: 0,
        };
    }
    let rows = [64usize, 32, 16]
        .into_iter()
        .find(|r| x.e.min(x.topk) * x.i.div_ceil(*r) >= SMS)
        .unwrap_or(16);
    let min_blocks = if mma(x, x.h) {
        let (epv, ..) = epv(x.wdt);
        let vectors = max_t.div_ceil(8) * (epv / 8);
        if 2 * vectors <= X_AHEAD {
            2
        } else {
            1
        }
    } else {
        1
    };
    UpShape {
        rows,
        min_blocks,
        x_ahead: -1,
    }
}

/// Rows of the down tile: the widest that gives nearly every SM a tile (an
/// eighth may idle). Its tile holds one CTA an SM, so twice as many tiles
/// would run in two waves (MiMo-V2-Flash: 128 tiles of 32 rows, not 256 of
/// 16).
fn down_rows(x: &Experts) -> usize {
    [128usize, 64, 32, 16]
        .into_iter()
        .find(|r| x.h.div_ceil(*r) >= SMS - SMS / 8)
        .unwrap_or(16)
}

/// Tensor cores when the reduction length is a multiple of their k-block.
fn mma(x: &Experts, k: usize) -> bool {
    let (epv, w_mma, _) = epv(x.wdt);
    w_mma && k.is_multiple_of(4 * epv)
}

/// `moe.cuh`'s `X_AHEAD`: the most x vectors a warp of an expert tile loads
/// ahead of a batch's products (a test checks that the two agree).
pub const X_AHEAD: usize = 8;

/// The CTAs an SM the gate/up kernel of experts `n` asks for: 3 for the
/// one-wave shape of 16-row tiles at one token ([`up_shape`]); 2 where its
/// warps load x vectors ahead of the products (the MMA path, with two
/// k-blocks' x of every column tile within [`X_AHEAD`] vectors: MXFP4 up to 8
/// tokens, bf16 up to 32). Loaded ahead they would take it past 128
/// registers (Qwen3-30B-A3B's 32-row tiles at one token: 167, so one CTA an
/// SM and its 192 tiles in two waves); held at 128 they need no spill.
/// Elsewhere 1: with 64 tokens the same bound costs spills.
pub fn up_min_blocks(plan: &Plan, n: NodeId) -> Result<u32, CodegenError> {
    let x = experts(&plan.fused, n)?;
    Ok(up_shape(&x, &plan.options).min_blocks)
}

/// `tf::MoeCfg` of experts `x`; `xa`: its `XA` (-1, the template's default,
/// is left out).
fn moe_cfg(x: &Experts, max_t: usize, rows: usize, mma: bool, xa: i32) -> String {
    let path = if mma {
        "tf::MvPath::Mma"
    } else {
        "tf::MvPath::Simt"
    };
    let tail = if xa < 0 {
        String::new()
    } else {
        format!(", 0, {xa}")
    };
    format!(
        "tf::MoeCfg<{max_t}, {}, {rows}, {THREADS}, {}, {}, {path}{tail}>",
        x.topk, x.h, x.i
    )
}

/// The router's settings: experts, top-k, groups, kept groups, softmax,
/// renormalise, its epsilon, the scale, a correction bias.
type RouterParts = (usize, usize, usize, usize, bool, bool, f32, f32, bool);

fn router_parts(f: &Fused, select: NodeId, weights: NodeId) -> Result<RouterParts, CodegenError> {
    let g = &f.graph;
    let Op::Moe(Moe::RouterSelect {
        score,
        top_k,
        n_group,
        topk_group,
        bias,
    }) = g.node(select).op
    else {
        return Err(CodegenError::Internal("not a router".into()));
    };
    let Op::Moe(Moe::RouterWeights {
        score: s2,
        norm,
        norm_eps,
        scale,
    }) = g.node(weights).op
    else {
        return Err(CodegenError::Internal("not router weights".into()));
    };
    if score != s2 {
        return Err(unsupported(
            f,
            weights,
            "choice and weights use different score functions",
        ));
    }
    let e = c(&g.node(g.inputs(select)[0]).ty.dims()[1]);
    if e > 512 {
        return Err(unsupported(
            f,
            select,
            format!("the router kernel takes at most 512 experts, found {e}"),
        ));
    }
    Ok((
        e,
        top_k,
        n_group,
        topk_group,
        score == ScoreFn::Softmax,
        norm,
        norm_eps,
        scale,
        bias,
    ))
}

/// Launch shape.
pub fn tiling(f: &Fused, group: &Group, opt: &PlanOptions) -> Result<Tiling, CodegenError> {
    let max_t = opt.max_t;
    if max_t > 64 {
        return Err(CodegenError::Unsupported {
            node: group
                .nodes
                .iter()
                .next()
                .map(|&n| f.graph.describe(n))
                .unwrap_or_default(),
            reason: format!(
                "MoE kernels serve at most 64 tokens per forward, the bucket has {max_t}"
            ),
        });
    }
    match group.kind {
        KernelKind::Router { select, weights } => {
            let (e, topk, ..) = router_parts(f, select, weights)?;
            Ok(Tiling {
                tiles: 1,
                threads: THREADS,
                smem: router_smem(f, select, weights, max_t)? as u32,
                workspaces: vec![(0, "routing table".into(), table_bytes(max_t, topk))],
                shape: format!("{e}e_top{topk}"),
            })
        }
        KernelKind::ExpertsUp { experts: n, router } => {
            let x = experts(f, n)?;
            let rows = up_shape(&x, opt).rows;
            let (kw, ncolp) = pass_floats(2 * rows, max_t, mma(&x, x.h));
            let up_smem = 4 * kw * 2 * rows * ncolp;
            let mut workspaces = vec![(0, "expert activations".into(), 2 * max_t * x.topk * x.i)];
            // With the router inside: the tile's own table, choice and
            // weights, then the router's scratch or the up pass's buffer
            // (`routed_up_smem_bytes` in moe.cuh).
            let smem = match router {
                Some((select, weights)) => {
                    workspaces.push((1, "routing table".into(), table_bytes(max_t, x.topk)));
                    own_table_bytes(max_t, x.topk)
                        + router_smem(f, select, weights, max_t)?.max(up_smem)
                }
                None => up_smem,
            };
            Ok(Tiling {
                tiles: (x.e.min(max_t * x.topk) * x.i.div_ceil(rows)) as u32,
                threads: THREADS,
                smem: smem as u32,
                workspaces,
                shape: format!("{rows}x{}", x.h),
            })
        }
        KernelKind::ExpertsDown { experts: n } => {
            let x = experts(f, n)?;
            let rows = down_rows(&x);
            let (kw, _) = pass_floats(rows, max_t, mma(&x, x.i));
            Ok(Tiling {
                tiles: x.h.div_ceil(rows) as u32,
                threads: THREADS,
                smem: (4 * kw * max_t * rows) as u32,
                workspaces: vec![],
                shape: format!("{rows}x{}", x.i),
            })
        }
        KernelKind::Argmax { node } | KernelKind::Sample { node } => {
            let rows: usize = f
                .graph
                .node(node)
                .ty
                .dims()
                .iter()
                .map(|d| d.as_const().unwrap_or(max_t))
                .product();
            let w = THREADS / 32;
            let smem = if matches!(group.kind, KernelKind::Argmax { .. }) {
                8 * w
            } else {
                4 * (3 * w + 4)
            };
            Ok(Tiling {
                tiles: rows.max(1) as u32,
                threads: THREADS,
                smem,
                workspaces: vec![],
                shape: "1".into(),
            })
        }
        _ => Err(CodegenError::Internal("not an MoE-family kernel".into())),
    }
}

fn kernel_of(plan: &Plan, pred: impl Fn(&KernelKind) -> bool) -> Result<usize, CodegenError> {
    plan.kernels
        .iter()
        .position(|k| pred(&plan.group(k).kind))
        .ok_or_else(|| CodegenError::Internal("a producer kernel is missing".into()))
}

/// The routing table of experts `x` (`const int*`): the router kernel's
/// workspace, or the gate/up kernel's second one where the router runs in it.
fn table_of(plan: &Plan, x: &Experts) -> Result<Expr, CodegenError> {
    let ki = kernel_of(plan, |k| match k {
        KernelKind::Router { select, .. }
        | KernelKind::ExpertsUp {
            router: Some((select, _)),
            ..
        } => *select == x.idx,
        _ => false,
    })?;
    let slot = match plan.group(&plan.kernels[ki]).kind {
        KernelKind::Router { .. } => 0,
        _ => 1,
    };
    work_ptr_slot(plan, ki, slot, "const int")
}

/// Bytes of a routing table (`route_table_ints` in moe.cuh).
fn table_bytes(max_t: usize, topk: usize) -> usize {
    4 * (2 + 3 * max_t * topk)
}

/// Bytes of a routed gate/up tile's own table and choice, in 16-byte units
/// (`routed_up_table_bytes` in moe.cuh).
fn own_table_bytes(max_t: usize, topk: usize) -> usize {
    (table_bytes(max_t, topk) + 4 * max_t * topk).div_ceil(16) * 16
}

/// Shared memory of the router's program (`router_smem_bytes` in moe.cuh).
fn router_smem(
    f: &Fused,
    select: NodeId,
    weights: NodeId,
    max_t: usize,
) -> Result<usize, CodegenError> {
    let (e, topk, ng, ..) = router_parts(f, select, weights)?;
    let w = THREADS as usize / 32;
    Ok(4 * (2 * w * e + 2 * w * ng + max_t * topk + 3 * e))
}

/// The `using RC = tf::RouterCfg<...>` of a router, and the arguments that
/// `router_tile` and `routed_up_tile` take first: the logits, the correction
/// bias (or `nullptr`), `T`, the weights' epsilon and scale, and where the
/// choice and the weights go.
fn router_args(
    plan: &Plan,
    select: NodeId,
    weights: NodeId,
) -> Result<(Stmt, Vec<Expr>), CodegenError> {
    let f = &plan.fused;
    let max_t = plan.options.max_t;
    let (e, topk, ng, tg, softmax, norm, eps, scale, bias) = router_parts(f, select, weights)?;
    let bias_ptr = if bias {
        pointer(plan, f.graph.inputs(select)[1], false)?
    } else {
        Expr::var("nullptr")
    };
    Ok((
        Stmt::Expr(Expr::var(format!(
            "using RC = tf::RouterCfg<{max_t}, {e}, {topk}, {ng}, {tg}, {softmax}, {norm}, {THREADS}>"
        ))),
        vec![
            pointer(plan, f.graph.inputs(select)[0], false)?,
            bias_ptr,
            Expr::var("T"),
            Expr::F32(eps),
            Expr::F32(scale),
            pointer(plan, select, true)?,
            pointer(plan, weights, true)?,
        ],
    ))
}

/// A compile-time check that the launch's shared memory covers the template's need.
fn smem_assert(need: &str, plan: &Plan, ki: usize) -> Stmt {
    let have = plan.kernels[ki].tiling.smem;
    Stmt::Expr(Expr::var(format!(
        "static_assert({need} <= {have}, \"launch shared memory below the template's need\")"
    )))
}

/// The tile body of kernel `ki`.
pub fn body(
    plan: &Plan,
    group: &Group,
    ki: usize,
    temps: &mut Temps,
) -> Result<Vec<Stmt>, CodegenError> {
    let f = &plan.fused;
    let g = &f.graph;
    let max_t = plan.options.max_t;
    match group.kind {
        KernelKind::Router { select, weights } => {
            let (cfg, args) = router_args(plan, select, weights)?;
            let mut call = vec![Expr::var("tile")];
            call.extend(args);
            call.extend([work_ptr(plan, ki, "int")?, Expr::var("smem")]);
            Ok(vec![
                cfg,
                smem_assert("tf::router_smem_bytes<RC>()", plan, ki),
                Stmt::Expr(Expr::call("tf::router_tile<RC>", call)),
            ])
        }
        KernelKind::ExpertsUp { experts: n, router } => {
            let x = experts(f, n)?;
            let shape = up_shape(&x, &plan.options);
            let (_, _, wty) = epv(x.wdt);
            let mut out = vec![
                Stmt::Expr(Expr::var(format!(
                    "using C = {}",
                    moe_cfg(&x, max_t, shape.rows, mma(&x, x.h), shape.x_ahead)
                ))),
                Stmt::Let(
                    Ty::Named(wty.into()),
                    "gate_up".into(),
                    weight_view(plan, x.w13)?,
                ),
            ];
            match router {
                Some((select, weights)) => {
                    let (cfg, args) = router_args(plan, select, weights)?;
                    let mut call = vec![Expr::var("tile")];
                    call.extend(args);
                    call.extend([
                        work_ptr_slot(plan, ki, 1, "int")?,
                        pointer(plan, x.x, false)?,
                        Expr::var("gate_up"),
                        work_ptr(plan, ki, "tf::bf16")?,
                        Expr::var("smem"),
                    ]);
                    out.extend([
                        cfg,
                        smem_assert(
                            &format!("tf::routed_up_smem_bytes<RC, C, {wty}>()"),
                            plan,
                            ki,
                        ),
                        Stmt::Expr(Expr::call(
                            format!("tf::routed_up_tile<RC, C, {wty}>"),
                            call,
                        )),
                    ]);
                }
                None => out.extend([
                    smem_assert(&format!("tf::experts_up_smem_bytes<C, {wty}>()"), plan, ki),
                    Stmt::Expr(Expr::call(
                        format!("tf::experts_up_tile<C, {wty}>"),
                        vec![
                            Expr::var("tile"),
                            pointer(plan, x.x, false)?,
                            Expr::var("T"),
                            table_of(plan, &x)?,
                            Expr::var("gate_up"),
                            work_ptr(plan, ki, "tf::bf16")?,
                            Expr::var("smem"),
                        ],
                    )),
                ]),
            }
            Ok(out)
        }
        KernelKind::ExpertsDown { experts: n } => {
            let x = experts(f, n)?;
            let rows = down_rows(&x);
            let (_, _, wty) = epv(x.wdt);
            let up = kernel_of(
                plan,
                |k| matches!(k, KernelKind::ExpertsUp { experts, .. } if *experts == n),
            )?;
            let mut epi = epilogue(
                plan,
                group,
                n,
                Expr::var("acc"),
                Expr::var(format!("(size_t)t * {} + n", x.h)),
                temps,
            )?;
            epi.insert(
                0,
                Stmt::NodeComment(format!("epilogue of \"{}\"", g.node(n).name)),
            );
            Ok(vec![
                Stmt::Expr(Expr::var(format!(
                    "using C = {}",
                    moe_cfg(&x, max_t, rows, mma(&x, x.i), -1)
                ))),
                smem_assert(
                    &format!("tf::experts_down_smem_bytes<C, {wty}>()"),
                    plan,
                    ki,
                ),
                Stmt::Let(
                    Ty::Named(wty.into()),
                    "down".into(),
                    weight_view(plan, x.w2)?,
                ),
                Stmt::Lambda(
                    "epi".into(),
                    vec![
                        (Ty::I32, "t".into()),
                        (Ty::I32, "n".into()),
                        (Ty::F32, "acc".into()),
                    ],
                    epi,
                ),
                Stmt::Expr(Expr::call(
                    format!("tf::experts_down_tile<C, {wty}>"),
                    vec![
                        Expr::var("tile"),
                        work_ptr(plan, up, "const tf::bf16")?,
                        pointer(plan, x.w, false)?,
                        Expr::var("T"),
                        table_of(plan, &x)?,
                        Expr::var("down"),
                        Expr::var("epi"),
                        Expr::var("smem"),
                    ],
                )),
            ])
        }
        KernelKind::Argmax { node } | KernelKind::Sample { node } => {
            let ins = g.inputs(node);
            let lt = &g.node(ins[0]).ty;
            let v = lt.dims().last().map(c).unwrap_or(0);
            let rows: usize = g
                .node(node)
                .ty
                .dims()
                .iter()
                .map(|d| d.as_const().unwrap_or(1))
                .product();
            let has_t = g
                .node(node)
                .ty
                .dims()
                .iter()
                .any(|d| d.as_const().is_none());
            let rows_e = if has_t {
                Expr::var("T").bin("*", Expr::I32(rows as i64))
            } else {
                Expr::I32(rows as i64)
            };
            let l = match lt.dtype {
                DType::F32 => "float",
                DType::BF16 => "tf::bf16",
                d => return Err(unsupported(f, node, format!("logits of {d}"))),
            };
            // The tile functions pick row `tile` themselves.
            let row = pointer(plan, ins[0], false)?;
            let call = match g.node(node).op {
                Op::Sample(Sample::Sample { temperature }) => Expr::call(
                    format!("tf::sample_tile<{THREADS}, {l}>"),
                    vec![
                        Expr::var("tile"),
                        row,
                        Expr::I32(v as i64),
                        Expr::F32(temperature),
                        pointer(plan, ins[1], false)?,
                        pointer(plan, node, true)?,
                        Expr::var("smem"),
                    ],
                ),
                _ => Expr::call(
                    format!("tf::argmax_tile<{THREADS}, {l}>"),
                    vec![
                        Expr::var("tile"),
                        row,
                        Expr::I32(v as i64),
                        pointer(plan, node, true)?,
                        Expr::var("smem"),
                    ],
                ),
            };
            Ok(vec![
                guard(Expr::var("tile").bin(">=", rows_e)),
                Stmt::Expr(call),
            ])
        }
        _ => Err(CodegenError::Internal("not an MoE-family kernel".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::X_AHEAD;

    #[test]
    fn the_x_ahead_bound_agrees_with_its_template() {
        let src = include_str!("../../cuda/moe.cuh");
        assert!(
            src.contains(&format!("constexpr int X_AHEAD = {X_AHEAD};")),
            "moe.cuh's X_AHEAD differs from lower::moe::X_AHEAD"
        );
    }
}
