//! Matvec kernels (`matvec.cuh`): `x @ w^T` over the rows of one tile for all
//! tokens, an optional RMSNorm prologue, and the generated epilogue.

use tilefuse_ir::{DType, NodeId, Op};

use crate::emit::{Expr, Stmt, Temps, Ty};
use crate::error::CodegenError;
use crate::fusion::{Fused, Group, KernelKind};
use crate::lower::epilogue::epilogue;
use crate::lower::values::{dim_expr, pointer};
use crate::lower::SMS;
use crate::plan::{Kernel, Plan, PlanOptions, Tiling, Value};

/// Threads per CTA of every kernel that streams weights.
pub const THREADS: u32 = 256;
/// The most tokens one pass over the weights serves; larger `T` runs in chunks.
pub const MAX_T_PER_PASS: usize = 16;

/// Elements per 16-byte vector and whether the tensor-core path applies.
fn format(d: DType) -> Option<(usize, bool, &'static str)> {
    match d {
        DType::BF16 => Some((8, true, "tf::WBf16")),
        DType::F32 => Some((4, false, "tf::WF32")),
        DType::F8E4M3 => Some((16, true, "tf::WE4M3")),
        DType::MXFP4 => Some((32, true, "tf::WMx")),
        DType::NVFP4 => Some((32, true, "tf::WNv")),
        _ => None,
    }
}

/// Rows per tile: the largest of 16, 32, 64, 128 that still gives every SM two
/// tiles of an `n`-row matrix and divides every row in `starts` (the first
/// rows of stacked weights: a tile never straddles two), at least 16. Where
/// those tiles outnumber what the SMs hold at once ([`RESIDENT`] an SM),
/// twice as many rows if every SM still gets a tile: one wave, not a full
/// one and a short second one that starts as the first ends (MiMo-V2-Flash's
/// q/k/v, 464 tiles of 32 rows, become 232 of 64).
pub fn rows_for(n: usize, starts: &[usize]) -> usize {
    let fits = |r: usize| starts.iter().all(|s| s % r == 0);
    let r = [128usize, 64, 32, 16]
        .into_iter()
        .find(|r| n.div_ceil(*r) >= 2 * SMS && fits(*r))
        .unwrap_or(16);
    if n.div_ceil(r) > RESIDENT * SMS && r < 128 && n.div_ceil(2 * r) >= SMS && fits(2 * r) {
        2 * r
    } else {
        r
    }
}

/// The CTAs of a matvec kernel an SM holds at once: three at one token
/// (76 to 86 registers a thread), at least two with more.
const RESIDENT: usize = 3;

/// Rows per tile of a matrix so short that 16-row tiles would leave three
/// quarters of the SMs idle: a router's logits (128 or 256 rows), and every
/// matrix of a small model (512 rows or fewer). The fewest of 2, 4, 8 rows
/// whose tiles still fit one wave, on the CUDA cores (the tensor cores take
/// 16 rows at least): each tile reads a few kilobytes in one round of loads
/// instead of 16 rows one batch after another on a few SMs. None for a
/// longer matrix.
pub fn short_rows(n: usize, starts: &[usize]) -> Option<usize> {
    if n.div_ceil(16) >= SMS / 4 {
        return None;
    }
    [2usize, 4, 8]
        .into_iter()
        .find(|r| n.div_ceil(*r) <= SMS && starts.iter().all(|s| s % r == 0))
}

/// `matvec_smem_bytes` of `matvec.cuh`, for the launch; the generated source
/// `static_assert`s that the header agrees.
#[allow(clippy::too_many_arguments)]
pub fn smem_bytes(
    max_t: usize,
    rows: usize,
    threads: usize,
    k: usize,
    norm: bool,
    act_bytes: usize,
    epv: usize,
    mma: bool,
) -> usize {
    let warps = threads / 32;
    let (g, ncolp, kb) = if mma {
        (16, 8 * max_t.div_ceil(8), 4 * epv)
    } else {
        ((rows / warps).max(2), max_t, 32 * epv)
    };
    let kw = warps / (rows / g).max(1);
    // The header pads the reduction buffer to whole 16-byte vectors.
    let red = (kw * rows * ncolp).div_ceil(4) * 4;
    if !norm {
        return 4 * red;
    }
    let inv = max_t.div_ceil(4) * 4;
    let budget = (32768 / (max_t * act_bytes)) / kb * kb;
    let kc = (k.div_ceil(kb) * kb).min(kb.max(budget));
    4 * (red + inv) + max_t * kc * act_bytes
}

struct Shape {
    /// Every matmul of the kernel with its first weight row: `matmul` at 0,
    /// then its siblings, rows stacked.
    parts: Vec<(NodeId, usize)>,
    norm: Option<NodeId>,
    x: NodeId,
    n: usize,
    k: usize,
    act: DType,
    w: NodeId,
    wdt: DType,
    mma: bool,
    epv: usize,
    rows: usize,
    max_t: usize,
    /// The activation rows (`T`, `C+T`, …).
    rows_dim: tilefuse_ir::Dim,
}

fn shape(f: &Fused, group: &Group, opt: &PlanOptions) -> Result<Shape, CodegenError> {
    let g = &f.graph;
    let KernelKind::MatVec {
        matmul,
        norm,
        ref siblings,
    } = group.kind
    else {
        return Err(CodegenError::Internal("not a matvec kernel".into()));
    };
    let unsupported = |reason: String| CodegenError::Unsupported {
        node: g.describe(matmul),
        reason,
    };
    let ins = g.inputs(matmul);
    let (x_in, w) = (ins[0], ins[1]);
    let x = match norm {
        Some(nm) => g.inputs(nm)[0],
        None => x_in,
    };
    let xt = &g.node(x).ty;
    if xt.rank() != 2 || xt.dims()[0].is_const() {
        return Err(unsupported(format!(
            "matvec kernels take activations [rows, K] with symbolic rows (T, C+T, …), found {xt}"
        )));
    }
    let rows_dim = xt.dims()[0].clone();
    let max_rows = rows_dim.eval(&opt.max_bindings()).map_err(&unsupported)?;
    let wt = &g.node(w).ty;
    let rows_of = |m: NodeId| {
        let t = &g.node(g.inputs(m)[1]).ty;
        t.dims()[0]
            .as_const()
            .ok_or_else(|| unsupported(format!("weight rows must be constant, found {t}")))
    };
    let mut parts = Vec::new();
    let mut n = 0usize;
    for m in std::iter::once(matmul).chain(siblings.iter().map(|s| s.matmul)) {
        parts.push((m, n));
        n += rows_of(m)?;
    }
    let k = wt.dims()[1]
        .as_const()
        .ok_or_else(|| unsupported(format!("weight columns must be constant, found {wt}")))?;
    let act = xt.dtype;
    if !matches!(act, DType::BF16 | DType::F32) {
        return Err(unsupported(format!(
            "matvec activations must be bf16 or f32, found {act}"
        )));
    }
    let (epv, w_mma, _) = format(wt.dtype)
        .ok_or_else(|| unsupported(format!("no matvec for {} weights", wt.dtype)))?;
    // Tensor cores need K a multiple of their k-block (4 vectors); the CUDA-core
    // path takes any multiple of one vector.
    let mma = w_mma && act == DType::BF16 && k.is_multiple_of(4 * epv);
    if k % 8 != 0 || k % epv != 0 {
        return Err(unsupported(format!(
            "K = {k} is not a multiple of the {} vector ({epv} elements)",
            wt.dtype
        )));
    }
    let starts: Vec<usize> = parts.iter().map(|p| p.1).collect();
    let (rows, mma) = match short_rows(n, &starts) {
        Some(r) => (r, false),
        None => (rows_for(n, &starts), mma),
    };
    Ok(Shape {
        parts,
        norm,
        x,
        n,
        k,
        act,
        w,
        wdt: wt.dtype,
        mma,
        epv,
        rows,
        max_t: max_rows.min(MAX_T_PER_PASS),
        rows_dim,
    })
}

/// Launch shape.
pub fn tiling(f: &Fused, group: &Group, opt: &PlanOptions) -> Result<Tiling, CodegenError> {
    let s = shape(f, group, opt)?;
    let act_bytes = if s.act == DType::BF16 { 2 } else { 4 };
    Ok(Tiling {
        tiles: s.n.div_ceil(s.rows) as u32,
        threads: THREADS,
        smem: smem_bytes(
            s.max_t,
            s.rows,
            THREADS as usize,
            s.k,
            s.norm.is_some(),
            act_bytes,
            s.epv,
            s.mma,
        ) as u32,
        workspaces: vec![],
        shape: format!("{}x{}", s.rows, s.k),
    })
}

/// The C++ weight view of a weight node of a plan.
pub fn weight_view(plan: &Plan, w: NodeId) -> Result<Expr, CodegenError> {
    let g = &plan.fused.graph;
    let slot = plan
        .weight(w)
        .ok_or_else(|| CodegenError::Internal(format!("no weight slot for {}", g.describe(w))))?;
    let (_, _, ty) = format(slot.dtype).ok_or_else(|| CodegenError::Unsupported {
        node: g.describe(w),
        reason: format!("no weight view for {}", slot.dtype),
    })?;
    let at = |off: usize, t: &str| {
        Expr::Reinterpret(
            Ty::Named(format!("const {t}*")),
            Box::new(Expr::var("wts").bin("+", Expr::Offset(off as i64))),
        )
    };
    let args = match slot.dtype {
        DType::BF16 => vec![at(slot.offset, "tf::bf16")],
        DType::F32 => vec![at(slot.offset, "float")],
        DType::F8E4M3 => vec![at(slot.offset, "uint8_t")],
        DType::MXFP4 => vec![
            at(slot.offset, "uint8_t"),
            at(slot.scales_offset.unwrap_or(0), "uint8_t"),
        ],
        DType::NVFP4 => vec![
            at(slot.offset, "uint8_t"),
            at(slot.scales_offset.unwrap_or(0), "uint8_t"),
            at(slot.tensor_scale_offset.unwrap_or(0), "float").index(Expr::I32(0)),
        ],
        _ => vec![],
    };
    Ok(Expr::call(ty.to_string(), args).brace())
}

/// The tile body of kernel `k`.
pub fn body(
    plan: &Plan,
    k: &Kernel,
    group: &Group,
    temps: &mut Temps,
) -> Result<Vec<Stmt>, CodegenError> {
    let f = &plan.fused;
    let g = &f.graph;
    let s = shape(f, group, &plan.options)?;
    let act = if s.act == DType::BF16 {
        "tf::bf16"
    } else {
        "float"
    };
    let (_, _, wty) =
        format(s.wdt).ok_or_else(|| CodegenError::Internal("weight format".into()))?;
    let cfg = format!(
        "tf::MvCfg<{}, {}, {}, {}, {}, {}>",
        s.max_t,
        s.rows,
        THREADS,
        s.k,
        if s.norm.is_some() { "true" } else { "false" },
        if s.mma {
            "tf::MvPath::Mma"
        } else {
            "tf::MvPath::Simt"
        }
    );
    let act_bytes = if s.act == DType::BF16 { 2 } else { 4 };
    let smem = smem_bytes(
        s.max_t,
        s.rows,
        THREADS as usize,
        s.k,
        s.norm.is_some(),
        act_bytes,
        s.epv,
        s.mma,
    );
    let (gamma, eps) = match s.norm {
        Some(nm) => {
            let Op::Nn(tilefuse_ir::Nn::RmsNorm { eps }) = g.node(nm).op else {
                return Err(CodegenError::Internal(
                    "norm prologue is not an rms_norm".into(),
                ));
            };
            (pointer(plan, g.inputs(nm)[1], false)?, Expr::F32(eps))
        }
        None => (Expr::var("nullptr"), Expr::F32(0.0)),
    };
    // Stacked weights must be contiguous: each slot right after the last.
    for w in s.parts.windows(2) {
        let (a, b) = (g.inputs(w[0].0)[1], g.inputs(w[1].0)[1]);
        match (plan.weight(a), plan.weight(b)) {
            (Some(sa), Some(sb)) if sa.offset + sa.bytes == sb.offset => {}
            _ => {
                return Err(CodegenError::Internal(format!(
                    "the weights of {} and {} are not laid out one after the other",
                    g.describe(a),
                    g.describe(b)
                )))
            }
        }
    }
    // One epilogue per stacked matmul, chosen by the row (uniform over a
    // tile: tiles never straddle two weights), last part first.
    let mut epi_body: Vec<Stmt> = Vec::new();
    for (i, &(m, r0)) in s.parts.iter().enumerate().rev() {
        let rows_m = s.parts.get(i + 1).map_or(s.n, |p| p.1) - r0;
        let mut part = crate::fusion::Group::new(group.kind.clone(), [m]);
        if i > 0 {
            if let KernelKind::MatVec { siblings, .. } = &group.kind {
                part.epilogue = siblings[i - 1].epilogue.clone();
            }
        }
        let own = if i == 0 { group } else { &part };
        let mut b = epilogue(
            plan,
            own,
            m,
            Expr::var("acc"),
            Expr::var(if r0 == 0 {
                format!("(size_t)t * {rows_m} + n")
            } else {
                format!("(size_t)t * {rows_m} + (n - {r0})")
            }),
            temps,
        )?;
        b.insert(
            0,
            Stmt::NodeComment(format!("epilogue of \"{}\"", g.node(m).name)),
        );
        epi_body = if epi_body.is_empty() {
            b
        } else {
            vec![Stmt::If(
                Expr::var(format!("n >= {}", s.parts[i + 1].1)),
                epi_body,
                b,
            )]
        };
    }
    let _ = s.w;
    let rows = dim_expr(plan, &s.rows_dim)?;
    // The norm this kernel owns is written (by its first tile) when the plan
    // counts it among this kernel's writes (another kernel reads it).
    let norm_out = match s.norm {
        Some(nm) if k.writes.contains(&Value::Node(nm)) => Expr::Select(
            Box::new(Expr::var("tile").bin("==", Expr::I32(0))),
            Box::new(pointer(plan, nm, true)?),
            Box::new(Expr::var("nullptr")),
        ),
        _ => Expr::var("nullptr"),
    };
    Ok(vec![
        Stmt::Expr(Expr::var(format!("using C = {cfg}"))),
        Stmt::Expr(Expr::var(format!(
            "static_assert(tf::matvec_smem_bytes<C, {act}, {wty}>() <= {smem}, \"launch shared memory below the template's need\")"
        ))),
        Stmt::Let(Ty::Named(format!("{act}*")), "x".into(), pointer(plan, s.x, false)?),
        Stmt::Let(Ty::Named(wty.into()), "w".into(), weight_view(plan, s.w)?),
        Stmt::Lambda("epi".into(), vec![(Ty::I32, "t".into()), (Ty::I32, "n".into()), (Ty::F32, "acc".into())], epi_body),
        Stmt::For(
            "t0".into(),
            Expr::I32(0),
            rows.clone(),
            Expr::I32(s.max_t as i64),
            vec![Stmt::Expr(Expr::call(
                format!("tf::matvec_tile<C, {act}, {wty}>"),
                vec![
                    Expr::var("tile"),
                    Expr::var("x"),
                    Expr::var("t0"),
                    Expr::call("min", vec![Expr::I32(s.max_t as i64), rows.bin("-", Expr::var("t0"))]),
                    gamma,
                    eps,
                    Expr::var("w"),
                    Expr::I32(s.n as i64),
                    Expr::var("epi"),
                    Expr::var("smem"),
                    norm_out,
                ],
            ))],
        ),
    ])
}
