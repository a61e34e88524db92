//! The attention family over `attention.cuh`: RoPE + cache append, attention
//! (split over keys with a combine kernel for full caches), and the row-wise
//! kernels of the same header (standalone RMSNorm, embedding gather).

use tilefuse_ir::{Attn, DType, Dim, InputKind, Mask, Nn, NodeId, Op};

use crate::emit::{Expr, Stmt, Ty};
use crate::error::CodegenError;
use crate::fusion::{Fused, Group, KernelKind};
use crate::lower::values::{dim_expr, guard, pointer, unsupported, work_ptr};
use crate::lower::SMS;
use crate::plan::{Plan, PlanOptions, Tiling};

/// Threads per CTA (the same for every kernel, for the persistent mode).
pub const THREADS: u32 = 256;
fn align16(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// Everything the attention kernels of one layer are instantiated with.
struct Layer {
    k_append: NodeId,
    v_append: NodeId,
    q_src: NodeId,
    k_src: NodeId,
    v_src: NodeId,
    q_norm: Option<NodeId>,
    k_norm: Option<NodeId>,
    hq: usize,
    hkv: usize,
    dk: usize,
    dv: usize,
    rot: usize,
    theta: f32,
    k_theta: f32,
    scale: f32,
    mask: Mask,
    sinks: bool,
    cap: usize,
    ring: bool,
    /// Query rows (`T`).
    q_rows: Dim,
    /// Rows appended to the caches in this forward (`T`, or `C+T` for a
    /// draft whose new context rows precede its block).
    new_rows: Dim,
    /// Cache rows before the append (`S`).
    len: Dim,
    /// Positions of the queries and of the appended keys (RoPE).
    q_pos: NodeId,
    k_pos: NodeId,
}

impl Layer {
    /// Keys before the first query: `len + new_rows - q_rows` (the queries are
    /// the last `q_rows` keys, the interpreter's convention).
    fn keys_before(&self) -> Dim {
        (self.len.clone() + self.new_rows.clone()).sub(&self.q_rows)
    }
}

fn layer(f: &Fused, attn: NodeId) -> Result<Layer, CodegenError> {
    let g = &f.graph;
    let ins = g.inputs(attn);
    let Op::Attn(Attn::Attention { mask, scale, sinks }) = g.node(attn).op else {
        return Err(CodegenError::Internal("not an attention node".into()));
    };
    let (q_rope, k_append, v_append) = (ins[0], ins[1], ins[2]);
    let Op::Attn(Attn::KvAppend { ring, ref len }) = g.node(k_append).op else {
        return Err(unsupported(f, attn, "keys are not a cache append"));
    };
    let k_rope = g.inputs(k_append)[1];
    let v_src = g.inputs(v_append)[1];
    let rope = |n: NodeId| match g.node(n).op {
        Op::Nn(Nn::Rope { theta, rot_dims }) => Ok((theta, rot_dims)),
        _ => Err(unsupported(f, n, "expected RoPE")),
    };
    let (theta, rot) = rope(q_rope)?;
    let (k_theta, k_rot) = rope(k_rope)?;
    if rot != k_rot {
        return Err(unsupported(
            f,
            attn,
            "queries and keys rotate different numbers of dims",
        ));
    }
    let norm_of = |n: NodeId| -> (Option<NodeId>, NodeId) {
        let i = g.inputs(n)[0];
        match g.node(i).op {
            Op::Nn(Nn::RmsNorm { .. }) if f.group_of(i) == f.group_of(n) => {
                (Some(i), g.inputs(i)[0])
            }
            _ => (None, i),
        }
    };
    let (q_norm, q_src) = norm_of(q_rope);
    let (k_norm, k_src) = norm_of(k_rope);
    let qt = &g.node(q_rope).ty;
    let kt = &g.node(k_rope).ty;
    let vt = &g.node(v_src).ty;
    let c = |d: &Dim| d.as_const().unwrap_or(0);
    let cache = g.inputs(k_append)[0];
    let cap = c(&g.node(cache).ty.dims()[0]);
    let act = qt.dtype;
    if act != DType::BF16 {
        return Err(unsupported(
            f,
            attn,
            format!("the attention kernels take bf16 activations, found {act}"),
        ));
    }
    Ok(Layer {
        k_append,
        v_append,
        q_src,
        k_src,
        v_src,
        q_norm,
        k_norm,
        hq: c(&qt.dims()[1]),
        hkv: c(&kt.dims()[1]),
        dk: c(&qt.dims()[2]),
        dv: c(&vt.dims()[2]),
        rot,
        theta,
        k_theta,
        scale,
        mask,
        sinks,
        cap,
        ring,
        q_rows: qt.dims()[0].clone(),
        new_rows: kt.dims()[0].clone(),
        len: len.clone(),
        q_pos: g.inputs(q_rope)[1],
        k_pos: g.inputs(k_rope)[1],
    })
}

/// Query tokens per attention tile: as many as fit 128 query rows, with a
/// power-of-two number of 16-row m-tiles (the header's warps split them).
fn tq(max_t: usize, g: usize) -> usize {
    let mut t = max_t.min((128 / g).max(1)).max(1);
    while t > 1 {
        let mt = (t * g).div_ceil(16);
        if mt.is_power_of_two() && mt <= 8 {
            break;
        }
        t -= 1;
    }
    t
}

struct Sched {
    tq: usize,
    nsplit: usize,
    ch: usize,
}

/// The most dynamic shared memory a CTA may use on Hopper (227 KiB).
const SMEM_LIMIT: usize = 227 * 1024;

fn sched(l: &Layer, max_t: usize) -> Sched {
    let g = l.hq / l.hkv;
    let mut s = sched_unbounded(l, tq(max_t, g), max_t);
    // Fit the shared memory: shorter sub-chunks first (a split then takes
    // several passes, merged online), then fewer query tokens per tile.
    while smem_attention(l, &s) > SMEM_LIMIT {
        if s.ch > 64 {
            s.ch = (s.ch / 2).div_ceil(32) * 32;
        } else if s.tq > 1 {
            let t = tq(s.tq - 1, g);
            s = Sched {
                ch: s.ch,
                ..sched_unbounded(l, t, max_t)
            };
        } else {
            break;
        }
    }
    s
}

fn sched_unbounded(l: &Layer, tq: usize, max_t: usize) -> Sched {
    let qblocks = max_t.div_ceil(tq);
    if l.ring {
        let window = match l.mask {
            Mask::Causal { window } | Mask::Block { window } => {
                window.map_or(l.cap, |w| w as usize)
            }
        };
        let range = (window + tq - 1).min(l.cap);
        return Sched {
            tq,
            nsplit: 1,
            ch: range.div_ceil(32) * 32,
        };
    }
    // Enough splits for one wave over the SMs, at least 2 (the combine
    // kernel expects partials). An attention tile holds a whole SM (its
    // registers and shared memory leave room for one CTA), so a second wave
    // would run after the first: at short contexts a tile's time is mostly
    // its fixed part (query prep, stats, the partial's store), and two waves
    // of half the keys cost nearly twice one wave.
    let fit = (SMS / (qblocks * l.hkv)).clamp(2, 64);
    // The largest power of two that still fits one wave.
    let nsplit = 1usize << (usize::BITS - 1 - fit.leading_zeros());
    let per_split = l.cap.div_ceil(nsplit).div_ceil(16) * 16;
    Sched {
        tq,
        nsplit,
        ch: per_split.div_ceil(32).max(1) * 32,
    }
}

fn smem_attention(l: &Layer, s: &Sched) -> usize {
    let g = l.hq / l.hkv;
    let rows = s.tq * g;
    let mt = rows.div_ceil(16);
    let mr = mt * 16;
    let nw = THREADS as usize / 32;
    let kb32 = l.dk.div_ceil(32);
    let vg = l.dv.div_ceil(64);
    let nreg = vg * 32;
    let half = l.rot / 2;
    let q_bytes = mr * (kb32 * 32 + 8) * 2;
    let cs_bytes = align16(s.tq * half * 8);
    let st_bytes = mr * 16;
    let o_bytes = mr * l.dv * 4;
    let sp = mr * (s.ch + 8) * 4 + mr * (s.ch + 8) * 2;
    let red = nw * nreg * 32 * 4;
    q_bytes + cs_bytes + st_bytes + o_bytes + sp.max(red)
}

fn config(l: &Layer, s: &Sched) -> String {
    let (mask, window) = match l.mask {
        Mask::Causal { window } => ("tf::MASK_CAUSAL", window.unwrap_or(0)),
        Mask::Block { window } => ("tf::MASK_BLOCK", window.unwrap_or(0)),
    };
    format!(
        "tf::AttnConfig<tf::bf16, {}, {}, {}, {}, {}, {mask}, {window}, {}, {}, {}, {}, {}, {THREADS}>",
        l.hq,
        l.hkv,
        l.dk,
        l.dv,
        l.rot,
        l.sinks,
        l.q_norm.is_some(),
        s.tq,
        s.nsplit,
        s.ch
    )
}

fn eps_of(f: &Fused, n: Option<NodeId>) -> f32 {
    n.and_then(|n| match f.graph.node(n).op {
        Op::Nn(Nn::RmsNorm { eps }) => Some(eps),
        _ => None,
    })
    .unwrap_or(0.0)
}

/// Elements of one row (all heads) of a `[T, heads, d]` value's storage.
fn row_elems(f: &Fused, n: NodeId) -> usize {
    f.graph.node(n).ty.dims()[1..]
        .iter()
        .filter_map(|d| d.as_const())
        .product()
}

/// Rows of a value whose shape is one row dim (`T`, `C+T`, …) times
/// constants: the rows as a C++ expression and their largest value.
fn rows_expr(plan_opt: RowsOf<'_>, n: NodeId, last: usize) -> Result<(Expr, usize), CodegenError> {
    let (f, opt) = (plan_opt.f, plan_opt.opt);
    let ty = &f.graph.node(n).ty;
    let mut c = 1usize;
    let mut row: Option<&Dim> = None;
    for d in ty.dims() {
        match d.as_const() {
            Some(k) => c *= k,
            None if row.is_none() => row = Some(d),
            None => {
                return Err(unsupported(
                    f,
                    n,
                    format!("rows of {ty} are not one row dim times constants"),
                ))
            }
        }
    }
    let per = c / last.max(1);
    let Some(d) = row else {
        return Ok((Expr::I32(per as i64), per));
    };
    let max = d
        .eval(&opt.max_bindings())
        .map_err(|m| unsupported(f, n, m))?;
    let e = match plan_opt.plan {
        Some(plan) => dim_expr(plan, d)?,
        None => Expr::I32(0),
    };
    Ok((
        if per == 1 {
            e
        } else {
            e.bin("*", Expr::I32(per as i64))
        },
        per * max,
    ))
}

/// What [`rows_expr`] needs: the fused graph and the bucket, and the plan
/// once it exists (for the C++ expression).
#[derive(Clone, Copy)]
struct RowsOf<'a> {
    f: &'a Fused,
    opt: &'a PlanOptions,
    plan: Option<&'a Plan>,
}

/// The largest value of a row dim in a bucket.
fn dim_max(f: &Fused, n: NodeId, d: &Dim, opt: &PlanOptions) -> Result<usize, CodegenError> {
    d.eval(&opt.max_bindings())
        .map_err(|m| unsupported(f, n, m))
}

/// Launch shape of the kernels of this family.
pub fn tiling(f: &Fused, group: &Group, opt: &PlanOptions) -> Result<Tiling, CodegenError> {
    match group.kind {
        KernelKind::RopeAppend { k_append, .. } => {
            let attn = f.real_users(k_append)[0];
            let l = layer(f, attn)?;
            let act_bytes = 2;
            Ok(Tiling {
                tiles: dim_max(f, k_append, &l.new_rows, opt)? as u32,
                threads: THREADS,
                smem: (align16(l.rot / 2 * 8) + l.hkv * l.dk * act_bytes) as u32,
                workspaces: vec![],
                shape: format!("1x{}", l.hkv * l.dk),
            })
        }
        KernelKind::Attention { attn, split, .. } => {
            let l = layer(f, attn)?;
            let max_t = dim_max(f, attn, &l.q_rows, opt)?;
            let s = sched(&l, max_t);
            let tiles = max_t.div_ceil(s.tq) * l.hkv * s.nsplit;
            let ws = if split {
                vec![(
                    0,
                    "partials".to_string(),
                    4 * max_t * l.hq * s.nsplit * (l.dv + 2),
                )]
            } else {
                vec![]
            };
            Ok(Tiling {
                tiles: tiles as u32,
                threads: THREADS,
                smem: smem_attention(&l, &s) as u32,
                workspaces: ws,
                shape: format!("q{}xs{}xc{}", s.tq, s.nsplit, s.ch),
            })
        }
        KernelKind::AttentionCombine { attn } => {
            let l = layer(f, attn)?;
            let max_t = dim_max(f, attn, &l.q_rows, opt)?;
            let s = sched(&l, max_t);
            Ok(Tiling {
                tiles: (max_t * l.hq) as u32,
                threads: THREADS,
                smem: (s.nsplit * 4) as u32,
                workspaces: vec![],
                shape: format!("s{}", s.nsplit),
            })
        }
        KernelKind::RmsNorm { node } => {
            let d = f
                .graph
                .node(node)
                .ty
                .dims()
                .last()
                .and_then(|d| d.as_const())
                .unwrap_or(1);
            let (_, rows) = rows_expr(RowsOf { f, opt, plan: None }, node, d)?;
            Ok(Tiling {
                tiles: rows as u32,
                threads: THREADS,
                smem: THREADS / 32 * 8,
                workspaces: vec![],
                shape: format!("1x{d}"),
            })
        }
        KernelKind::Embedding { node } => {
            let h = f
                .graph
                .node(node)
                .ty
                .dims()
                .last()
                .and_then(|d| d.as_const())
                .unwrap_or(1);
            let ids = f.graph.inputs(node)[1];
            let rows = f
                .graph
                .node(ids)
                .ty
                .dims()
                .first()
                .cloned()
                .unwrap_or(Dim::c(1));
            Ok(Tiling {
                tiles: dim_max(f, node, &rows, opt)? as u32,
                threads: THREADS,
                smem: 0,
                workspaces: vec![(0, "error flag".into(), 4)],
                shape: format!("1x{h}"),
            })
        }
        _ => Err(CodegenError::Internal(
            "not an attention-family kernel".into(),
        )),
    }
}

/// Whether an attention tile's RoPE table is made by its prologue
/// ([`prologue`]): when the query positions are an input of the forward
/// (written before its first kernel), so they may be read before the tile
/// waits, and the layer rotates.
fn rope_table_early(f: &Fused, l: &Layer) -> bool {
    l.rot > 0
        && matches!(
            f.graph.node(f.storage(l.q_pos)).op,
            Op::Input(InputKind::Activation)
        )
}

/// The return of an attention tile (and its prologue) whose query block
/// lies past this forward's `rows` tokens: it has no work.
fn past_the_tokens(l: &Layer, s: &Sched, rows: Expr) -> Stmt {
    let per_block = (l.hkv * s.nsplit) as i64;
    guard(
        Expr::var("tile")
            .bin("/", Expr::I32(per_block))
            .bin("*", Expr::I32(s.tq as i64))
            .bin(">=", rows),
    )
}

/// The prologue of an attention kernel (`attention_prologue` in
/// `attention.cuh`): the RoPE table of the tile's query tokens, before the
/// tile waits for q ([`rope_table_early`]); nothing otherwise.
pub fn prologue(plan: &Plan, group: &Group) -> Result<Vec<Stmt>, CodegenError> {
    let KernelKind::Attention { attn, .. } = group.kind else {
        return Ok(vec![]);
    };
    let f = &plan.fused;
    let l = layer(f, attn)?;
    if !rope_table_early(f, &l) {
        return Ok(vec![]);
    }
    let s = sched(&l, dim_max(f, attn, &l.q_rows, &plan.options)?);
    let rows = dim_expr(plan, &l.q_rows)?;
    Ok(vec![
        Stmt::Expr(Expr::var(format!("using C = {}", config(&l, &s)))),
        past_the_tokens(&l, &s, rows.clone()),
        Stmt::Expr(Expr::call(
            "tf::attention_prologue<C>",
            vec![
                Expr::var("tile"),
                rows,
                pointer(plan, l.q_pos, false)?,
                Expr::F32(l.theta),
                Expr::var("smem"),
            ],
        )),
    ])
}

/// The early hints of an attention kernel (`attention_early` in
/// `attention.cuh`): each tile asks L2 for its share of its split's cache rows
/// before it waits.
pub fn early(plan: &Plan, group: &Group) -> Result<Vec<Stmt>, CodegenError> {
    let KernelKind::Attention { attn, .. } = group.kind else {
        return Ok(vec![]);
    };
    let f = &plan.fused;
    let g = &f.graph;
    let l = layer(f, attn)?;
    let s = sched(&l, dim_max(f, attn, &l.q_rows, &plan.options)?);
    let kc = g.inputs(l.k_append)[0];
    let vc = g.inputs(l.v_append)[0];
    Ok(vec![
        Stmt::Expr(Expr::var(format!("using C = {}", config(&l, &s)))),
        Stmt::Expr(Expr::call(
            "tf::attention_early<C>",
            vec![
                Expr::var("tile"),
                dim_expr(plan, &l.q_rows)?,
                dim_expr(plan, &l.keys_before())?,
                Expr::I32(l.cap as i64),
                pointer(plan, kc, false)?,
                pointer(plan, vc, false)?,
            ],
        )),
    ])
}

/// The new rows of a cache append as the append templates take them: raw
/// keys and their row stride, values and theirs, the key norm's weight (or
/// `nullptr`) and epsilon.
fn new_rows_args(plan: &Plan, l: &Layer) -> Result<Vec<Expr>, CodegenError> {
    let f = &plan.fused;
    let knorm_w = match l.k_norm {
        Some(n) => pointer(plan, f.graph.inputs(n)[1], false)?,
        None => Expr::var("nullptr"),
    };
    Ok(vec![
        pointer(plan, l.k_src, false)?,
        Expr::I32(row_elems(f, f.storage(l.k_src)) as i64),
        pointer(plan, l.v_src, false)?,
        Expr::I32(row_elems(f, f.storage(l.v_src)) as i64),
        knorm_w,
        Expr::F32(eps_of(f, l.k_norm)),
    ])
}

/// The tile body of kernel `ki`.
pub fn body(plan: &Plan, group: &Group, ki: usize) -> Result<Vec<Stmt>, CodegenError> {
    let f = &plan.fused;
    let g = &f.graph;
    let opt = &plan.options;
    match group.kind {
        KernelKind::RopeAppend { k_append, .. } => {
            let attn = f.real_users(k_append)[0];
            let l = layer(f, attn)?;
            let kc = g.inputs(l.k_append)[0];
            let vc = g.inputs(l.v_append)[0];
            let rows = dim_expr(plan, &l.new_rows)?;
            Ok(vec![
                Stmt::Comment(
                    "tiles past this forward's tokens would write future cache slots".into(),
                ),
                guard(Expr::var("tile").bin(">=", rows.clone())),
                Stmt::Expr(Expr::call(
                    format!(
                        "tf::rope_append_tile<tf::bf16, {}, {}, {}, {}, {}, {THREADS}>",
                        l.hkv,
                        l.dk,
                        l.dv,
                        l.rot,
                        l.k_norm.is_some()
                    ),
                    [
                        Expr::var("tile"),
                        rows,
                        dim_expr(plan, &l.len)?,
                        Expr::I32(l.cap as i64),
                        pointer(plan, l.k_pos, false)?,
                    ]
                    .into_iter()
                    .chain(new_rows_args(plan, &l)?)
                    .chain([
                        Expr::F32(l.k_theta),
                        pointer(plan, kc, true)?,
                        pointer(plan, vc, true)?,
                        Expr::var("smem"),
                    ])
                    .collect(),
                )),
            ])
        }
        KernelKind::Attention {
            attn,
            split,
            fused_append,
            ..
        } => {
            let l = layer(f, attn)?;
            let s = sched(&l, dim_max(f, attn, &l.q_rows, opt)?);
            let rows = dim_expr(plan, &l.q_rows)?;
            let kc = g.inputs(l.k_append)[0];
            let vc = g.inputs(l.v_append)[0];
            let qnorm_w = match l.q_norm {
                Some(n) => pointer(plan, g.inputs(n)[1], false)?,
                None => Expr::var("nullptr"),
            };
            let sinks = if l.sinks {
                pointer(plan, g.inputs(attn)[3], false)?
            } else {
                Expr::var("nullptr")
            };
            let (out, ws) = if split {
                (Expr::var("nullptr"), work_ptr(plan, ki, "float")?)
            } else {
                (pointer(plan, attn, true)?, Expr::var("nullptr"))
            };
            // With a prologue the table is ready when the wrapper ran it
            // (the tile function's template argument).
            let early = rope_table_early(f, &l);
            let cs_ready = if early { "PROLOGUE_RAN" } else { "false" };
            let (tile_fn, mut args) = if fused_append || early {
                (
                    format!(
                        "tf::attention_tile<C, {fused_append}, {}, {cs_ready}>",
                        l.k_norm.is_some()
                    ),
                    vec![if fused_append {
                        Expr::call("tf::AttnAppend", {
                            let mut a = new_rows_args(plan, &l)?;
                            a.extend([pointer(plan, kc, true)?, pointer(plan, vc, true)?]);
                            a
                        })
                        .brace()
                    } else {
                        Expr::var("tf::AttnAppend{}")
                    }],
                )
            } else {
                ("tf::attention_tile<C>".to_string(), vec![])
            };
            let mut call_args = vec![
                Expr::var("tile"),
                rows.clone(),
                dim_expr(plan, &l.keys_before())?,
                Expr::I32(l.cap as i64),
                pointer(plan, l.q_pos, false)?,
                pointer(plan, l.q_src, false)?,
                Expr::I32(row_elems(f, f.storage(l.q_src)) as i64),
                qnorm_w,
                Expr::F32(eps_of(f, l.q_norm)),
                Expr::F32(l.theta),
                Expr::F32(l.scale),
                pointer(plan, kc, false)?,
                pointer(plan, vc, false)?,
                sinks,
                out,
                Expr::I32((l.hq * l.dv) as i64),
                ws,
                Expr::var("smem"),
            ];
            call_args.append(&mut args);
            Ok(vec![
                Stmt::Expr(Expr::var(format!("using C = {}", config(&l, &s)))),
                Stmt::Expr(Expr::var(format!(
                    "static_assert(C::SMEM_BYTES <= {}, \"launch shared memory below the template's need\")",
                    smem_attention(&l, &s)
                ))),
                Stmt::Comment("query blocks past this forward's tokens have no work".into()),
                past_the_tokens(&l, &s, rows),
                Stmt::Expr(Expr::call(tile_fn, call_args)),
            ])
        }
        KernelKind::AttentionCombine { attn } => {
            let l = layer(f, attn)?;
            let s = sched(&l, dim_max(f, attn, &l.q_rows, opt)?);
            let rows = dim_expr(plan, &l.q_rows)?;
            // The partials were written by the attention kernel just before.
            let producer = plan
                .kernels
                .iter()
                .position(|k| matches!(plan.group(k).kind, KernelKind::Attention { attn: a, .. } if a == attn))
                .ok_or_else(|| CodegenError::Internal("combine without its attention kernel".into()))?;
            let sinks = if l.sinks {
                pointer(plan, g.inputs(attn)[3], false)?
            } else {
                Expr::var("nullptr")
            };
            Ok(vec![
                Stmt::Expr(Expr::var(format!("using C = {}", config(&l, &s)))),
                guard(Expr::var("tile").bin(">=", rows.clone().bin("*", Expr::I32(l.hq as i64)))),
                Stmt::Expr(Expr::call(
                    "tf::attention_combine_tile<C>",
                    vec![
                        Expr::var("tile"),
                        rows,
                        work_ptr(plan, producer, "float")?,
                        sinks,
                        pointer(plan, attn, true)?,
                        Expr::I32((l.hq * l.dv) as i64),
                        Expr::var("smem"),
                    ],
                )),
            ])
        }
        KernelKind::RmsNorm { node } => {
            let ins = g.inputs(node);
            let ty = &g.node(node).ty;
            let d = ty.dims().last().and_then(|d| d.as_const()).unwrap_or(1);
            let (rows, _) = rows_expr(
                RowsOf {
                    f,
                    opt,
                    plan: Some(plan),
                },
                node,
                d,
            )?;
            let act = match ty.dtype {
                DType::BF16 => "tf::bf16",
                DType::F32 => "float",
                other => return Err(unsupported(f, node, format!("row RMSNorm of {other}"))),
            };
            let wt = match g.node(ins[1]).ty.dtype {
                DType::BF16 => "tf::bf16",
                DType::F32 => "float",
                other => return Err(unsupported(f, node, format!("RMSNorm weight of {other}"))),
            };
            let Op::Nn(Nn::RmsNorm { eps }) = g.node(node).op else {
                return Err(CodegenError::Internal("not an rms_norm".into()));
            };
            Ok(vec![
                Stmt::Let(Ty::I32, "rows".into(), rows),
                guard(Expr::var("tile").bin(">=", Expr::var("rows"))),
                Stmt::Expr(Expr::call(
                    format!("tf::rms_norm_rows_tile<{act}, {wt}, {d}, {THREADS}>"),
                    vec![
                        Expr::var("tile"),
                        Expr::var("rows"),
                        pointer(plan, ins[0], false)?,
                        Expr::I32(d as i64),
                        pointer(plan, ins[1], false)?,
                        Expr::F32(eps),
                        pointer(plan, node, true)?,
                        Expr::I32(d as i64),
                        Expr::var("smem"),
                    ],
                )),
            ])
        }
        KernelKind::Embedding { node } => {
            let ins = g.inputs(node);
            let table = &g.node(ins[0]).ty;
            let (vocab, h) = (
                table.dims()[0].as_const().unwrap_or(0),
                table.dims()[1].as_const().unwrap_or(0),
            );
            let t = match table.dtype {
                DType::BF16 => "tf::bf16",
                DType::F32 => "float",
                other => {
                    return Err(unsupported(
                        f,
                        node,
                        format!("embedding tables of {other} (convert at load)"),
                    ))
                }
            };
            if g.node(ins[1]).ty.rank() != 1 {
                return Err(unsupported(f, node, "token ids must be one row dim [T]"));
            }
            let rows = dim_expr(plan, &g.node(ins[1]).ty.dims()[0])?;
            Ok(vec![
                guard(Expr::var("tile").bin(">=", rows.clone())),
                Stmt::Expr(Expr::call(
                    format!("tf::embedding_tile<{t}, {h}, {THREADS}>"),
                    vec![
                        Expr::var("tile"),
                        rows,
                        pointer(plan, ins[1], false)?,
                        pointer(plan, ins[0], false)?,
                        Expr::I32(vocab as i64),
                        pointer(plan, node, true)?,
                        Expr::I32(h as i64),
                        work_ptr(plan, ki, "int")?,
                        Expr::var("smem"),
                    ],
                )),
            ])
        }
        _ => Err(CodegenError::Internal(
            "not an attention-family kernel".into(),
        )),
    }
}
