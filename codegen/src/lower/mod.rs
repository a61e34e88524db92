//! Lowering: each kernel of a plan becomes a `__device__` tile function over
//! the header library plus a thin `__global__` wrapper; all kernels of a plan
//! share one translation unit (so the persistent dispatcher can call every
//! tile function) with one signature: `(char* act, const char* wts, char* kv)`
//! — the arena, the weights and the KV caches. Offsets into the three
//! buffers are constants of the plan; the symbols `T` and `S` of a forward
//! are read from the head of the arena ([`crate::plan::SYMBOLS_BYTES`]).

pub mod attention;
mod elementwise;
mod epilogue;
pub mod matvec;
pub mod moe;
pub mod values;

use tilefuse_ir::{DType, NodeId, Op};

use crate::emit::{Function, Stmt, Temps, Ty};
use crate::error::CodegenError;
use crate::fusion::{Fused, Group, KernelKind};
use crate::plan::{Kernel, Plan, PlanOptions, Tiling};

/// One lowered kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct LoweredKernel {
    /// Kernel name (the `__global__` symbol).
    pub name: String,
    /// The header comment: source nodes with the author's places, tile shape.
    pub header: String,
    /// The `__device__` tile function.
    pub device: Function,
    /// The `__device__` weight prefetch of a tile, run before the tile waits
    /// for its inputs (`None`: the kernel streams no dense weights).
    pub prefetch: Option<Function>,
    /// The early hints of a tile, run by the `__global__` wrapper before it
    /// waits: L2 prefetches of what the tile will read that does not come
    /// from the kernel just before (an attention tile's cache rows). Hints
    /// only: they never change a result. The persistent dispatcher does
    /// not run them.
    pub early: Option<Function>,
    /// The prologue of a tile: work that reads only the forward's inputs
    /// (written before its first kernel), into the tile's shared memory,
    /// run by the `__global__` wrapper before it waits for the kernel
    /// before. With a prologue the tile function is a template,
    /// `<tile><PROLOGUE_RAN>`: the wrapper calls `<true>`, the persistent
    /// dispatcher `<false>`, which does the prologue's work in the tile.
    pub prologue: Option<Function>,
    /// The `__global__` wrapper.
    pub wrapper: Function,
}

impl LoweredKernel {
    /// The kernel's own text: header, tile function and wrapper.
    pub fn source(&self) -> String {
        // The helpers the wrapper calls, those that exist, in this order.
        let helpers: String = [&self.prefetch, &self.early, &self.prologue]
            .into_iter()
            .flatten()
            .map(|f| format!("{f}\n"))
            .collect();
        format!("{}{}\n{helpers}{}", self.header, self.device, self.wrapper)
    }
}

/// A plan's CUDA translation unit.
#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    /// The whole source.
    pub source: String,
    /// Its distinct kernel functions.
    pub kernels: Vec<LoweredKernel>,
    /// Per plan kernel (schedule order): its function and offsets.
    pub instances: Vec<Instance>,
    /// The persistent dispatcher ([`PERSISTENT`]), when every kernel uses the
    /// same number of threads (the dispatcher's CTA runs each tile).
    pub persistent: Option<Function>,
    /// Threads per CTA of the dispatcher.
    pub persistent_threads: u32,
    /// Dynamic shared memory of the dispatcher: the largest of any kernel.
    pub persistent_smem: u32,
}

/// The name of the persistent dispatcher kernel.
pub const PERSISTENT: &str = "persistent_dispatch";

/// Streaming multiprocessors of the card the tilings are chosen for (an
/// H100 or H200: 132). Only the tiling depends on it, never a result.
pub const SMS: usize = 132;

/// Bits of a task word that hold the tile; the kernel index is above them.
pub const TASK_TILE_BITS: u32 = 20;

/// Words of one kernel's record in the trace of a stream or graph forward
/// (`tf::trace_cta` in `prelude.cuh` says what each holds).
pub const TRACE_KERNEL_WORDS: usize = 8;

/// Words of one task's record in the trace of a persistent forward
/// (`tf::trace_task` in `persistent.cuh`).
pub const TRACE_TASK_WORDS: usize = 4;

/// The persistent dispatcher: one CTA per SM walks its static task list
/// (`tasks[sm_offsets[b]..sm_offsets[b+1]]`, each `kernel << 20 | tile`),
/// reading each kernel's buffer offsets from row `kernel` of `offsets`
/// ([`MAX_OFFSETS`] per row) and its function from `function_of[kernel]`,
/// waiting for each task's dependencies (`deps[dep_offsets[k]..dep_offsets[k+1]]`)
/// on the tile counters, calling the kernel's tile function and counting the
/// tile done. Before it waits, a task asks L2 for its share of the kernel's
/// dense weights (weights never depend on activations, so the weight stream
/// need not stop while the SM waits). A tile with a prologue
/// ([`LoweredKernel::prologue`]) runs as `<tile><false>`, doing the
/// prologue's work itself: inlined beside every other tile, the prologue
/// would push the dispatcher past its registers. The forward's number
/// `epoch` is read from the arena head (`act[8..12]`). With a trace buffer
/// in the offset tables, each task `i` records `[start, past its wait, end,
/// smid << 32 | task]` in words `4i..4i+4`.
fn persistent(kernels: &[LoweredKernel], threads: u32) -> Function {
    use crate::emit::Expr;
    // One case per distinct function (not per kernel instance), so each
    // template body is inlined once however many layers share it.
    let mut cases = String::new();
    for (fi, f) in kernels.iter().enumerate() {
        // A tile with a prologue does the prologue's work itself here.
        let ran = if f.prologue.is_some() { "<false>" } else { "" };
        cases.push_str(&format!(
            "case {fi}: {}_tile{ran}(tile, act, wts, kv, T, S, smem, row); break; ",
            f.name
        ));
    }
    let mut prefetches = String::new();
    for (fi, f) in kernels.iter().enumerate() {
        if f.prefetch.is_some() {
            prefetches.push_str(&format!(
                "case {fi}: {}_prefetch(tile, wts, row); break; ",
                f.name
            ));
        }
    }
    // One task: decode it, ask L2 for its weights, wait for its inputs, run
    // its tile, count it done.
    let mut task = vec![
        Stmt::Let(Ty::I32, "task".into(), Expr::var("tasks[i]")),
        Stmt::Let(
            Ty::I32,
            "k".into(),
            Expr::var(format!("task >> {TASK_TILE_BITS}")),
        ),
        Stmt::Let(
            Ty::I32,
            "tile".into(),
            Expr::var(format!("task & {}", (1u32 << TASK_TILE_BITS) - 1)),
        ),
        Stmt::Let(
            Ty::Named("long long*".into()),
            "row".into(),
            Expr::var(format!("offsets + (size_t)k * {MAX_OFFSETS}")),
        ),
    ];
    task.extend([
        Stmt::Expr(Expr::var(
            "unsigned long long* const trace = reinterpret_cast<unsigned long long*>(row[tf::OFFSET_TRACE])",
        )),
        timer("t_start"),
        Stmt::Expr(Expr::var(format!(
            "switch (function_of[k]) {{ {prefetches}default: break; }}"
        ))),
    ]);
    task.extend([
        Stmt::Expr(Expr::call(
            "tf::wait_deps",
            vec![
                Expr::var("counters"),
                Expr::var("deps + dep_offsets[k]"),
                Expr::var("dep_offsets[k + 1] - dep_offsets[k]"),
                Expr::var("tiles"),
                Expr::var("epoch"),
            ],
        )),
        timer("t_waited"),
        Stmt::Expr(Expr::var(format!(
            "switch (function_of[k]) {{ {cases}default: break; }}"
        ))),
        Stmt::Expr(Expr::call(
            "tf::signal_done",
            vec![Expr::var("counters"), Expr::var("k")],
        )),
        Stmt::If(
            Expr::var("trace && threadIdx.x == 0"),
            vec![Stmt::Expr(Expr::call(
                "tf::trace_task",
                vec![
                    Expr::var(format!("trace + {TRACE_TASK_WORDS} * (size_t)i")),
                    Expr::var("t_start"),
                    Expr::var("t_waited"),
                    Expr::var("task"),
                ],
            ))],
            vec![],
        ),
    ]);
    let mut body = vec![Stmt::Expr(Expr::var(
        "extern __shared__ __align__(16) char smem[]",
    ))];
    body.extend(symbols());
    body.extend([
        Stmt::Let(
            Ty::Named("uint32_t".into()),
            "epoch".into(),
            Expr::var("reinterpret_cast<const uint32_t*>(act)[2]"),
        ),
        Stmt::For(
            "i".into(),
            Expr::var("sm_offsets[blockIdx.x]"),
            Expr::var("sm_offsets[blockIdx.x + 1]"),
            Expr::I32(1),
            task,
        ),
    ]);
    let int_ptr = |n: &str| (Ty::ConstPtr(Box::new(Ty::I32)), n.to_string());
    let mut params = params();
    params.push(int_ptr("tasks"));
    params.push(int_ptr("sm_offsets"));
    params.push(int_ptr("deps"));
    params.push(int_ptr("dep_offsets"));
    params.push((
        Ty::Named("const uint32_t* __restrict__".into()),
        "tiles".into(),
    ));
    params.push((
        Ty::Named("uint32_t* __restrict__".into()),
        "counters".into(),
    ));
    params.push((
        Ty::Named("const long long* __restrict__".into()),
        "offsets".into(),
    ));
    params.push(int_ptr("function_of"));
    Function {
        qualifiers: "extern \"C\" __global__".into(),
        launch_bounds: Some((threads, 1)),
        ret: "void".into(),
        name: PERSISTENT.into(),
        params,
        body,
    }
}

/// The launch shape of a group's kernel for a bucket.
pub fn tiling(f: &Fused, group: &Group, opt: &PlanOptions) -> Result<Tiling, CodegenError> {
    match group.kind {
        KernelKind::Elementwise => elementwise::tiling(&f.graph, group, opt),
        KernelKind::Concat { node } => elementwise::concat_tiling(&f.graph, node, opt),
        KernelKind::MatVec { .. } => matvec::tiling(f, group, opt),
        KernelKind::RopeAppend { .. }
        | KernelKind::Attention { .. }
        | KernelKind::AttentionCombine { .. }
        | KernelKind::RmsNorm { .. }
        | KernelKind::Embedding { .. } => attention::tiling(f, group, opt),
        KernelKind::Router { .. }
        | KernelKind::ExpertsUp { .. }
        | KernelKind::ExpertsDown { .. }
        | KernelKind::Argmax { .. }
        | KernelKind::Sample { .. } => moe::tiling(f, group, opt),
    }
}

/// The dtype that names a kernel: its weight's, else its output's.
pub fn weight_dtype_name(f: &Fused, group: &Group) -> DType {
    let g = &f.graph;
    let weight = match group.kind {
        KernelKind::MatVec { matmul, .. } => Some(g.inputs(matmul)[1]),
        KernelKind::ExpertsUp { experts, .. } | KernelKind::ExpertsDown { experts } => {
            Some(g.inputs(experts)[3])
        }
        _ => None,
    };
    match weight {
        Some(w) => g.node(w).ty.dtype,
        None => group
            .nodes
            .iter()
            .find(|&&n| !matches!(g.node(n).op, Op::Input(_)))
            .map(|&n| g.node(n).ty.dtype)
            .unwrap_or(DType::F32),
    }
}

fn header(plan: &Plan, k: &Kernel) -> String {
    let g = &plan.fused.graph;
    let num = g.numbering();
    let group = plan.group(k);
    let mut s = format!(
        "// {}: {} — {} tiles of {} threads, {} bytes of shared memory, tile {}\n",
        k.name,
        group.kind.short(),
        k.tiling.tiles,
        k.tiling.threads,
        k.tiling.smem,
        k.tiling.shape
    );
    for n in &group.nodes {
        let node = g.node(*n);
        s.push_str(&format!(
            "//   %{} \"{}\" {} : {}",
            num[n],
            node.name,
            node.op.mnemonic(),
            node.ty
        ));
        if let Some(l) = &node.loc {
            s.push_str(&format!(" @ {l}"));
        }
        s.push('\n');
    }
    s
}

/// `name` = the global timer when a trace is taken, else 0.
fn timer(name: &str) -> Stmt {
    Stmt::Let(
        Ty::Named("unsigned long long".into()),
        name.into(),
        crate::emit::Expr::var("trace ? tf::global_timer() : 0ull"),
    )
}

/// `T` and `S` of this forward, read from the arena head.
fn symbols() -> [Stmt; 2] {
    use crate::emit::Expr;
    [
        Stmt::Let(
            Ty::I32,
            "T".into(),
            Expr::var("reinterpret_cast<const int*>(act)[0]"),
        ),
        Stmt::Let(
            Ty::I32,
            "S".into(),
            Expr::var("reinterpret_cast<const int*>(act)[1]"),
        ),
    ]
}

/// [`params`] as the early hints see them: nothing written.
fn params_const() -> Vec<(Ty, String)> {
    params()
        .into_iter()
        .map(|(t, n)| match t {
            Ty::Ptr(t) => (Ty::ConstPtr(t), n),
            t => (t, n),
        })
        .collect()
}

fn params() -> Vec<(Ty, String)> {
    vec![
        (Ty::Ptr(Box::new(Ty::Char)), "act".into()),
        (Ty::ConstPtr(Box::new(Ty::Char)), "wts".into()),
        (Ty::Ptr(Box::new(Ty::Char)), "kv".into()),
    ]
}

/// Words of an offset table (`tf::Offsets` in the prelude).
pub const MAX_OFFSETS: usize = 32;
/// The word of an offset table that holds the trace buffer's address, 0 when
/// no trace is taken (`tf::OFFSET_TRACE`).
pub const OFFSET_TRACE: usize = 30;
/// The word of an offset table that holds the kernel's index in its plan
/// (`tf::OFFSET_KERNEL`).
pub const OFFSET_KERNEL: usize = 31;
/// The most buffer offsets one kernel body reads: the words below the trace's.
pub const MAX_BUFFER_OFFSETS: usize = OFFSET_TRACE;

/// One plan kernel as lowered: which shared function runs it, with which offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Index into [`Module::kernels`].
    pub function: usize,
    /// Byte offsets into the arena, weights and caches, in the order the
    /// function's body reads `off[i]`.
    pub offsets: Vec<i64>,
}

fn kernel_body(plan: &Plan, ki: usize, k: &Kernel) -> Result<Vec<Stmt>, CodegenError> {
    let group = plan.group(k);
    let mut temps = Temps::default();
    Ok(match group.kind {
        KernelKind::Elementwise => elementwise::body(plan, group, &mut temps)?,
        KernelKind::Concat { node } => elementwise::concat_body(plan, node)?,
        KernelKind::MatVec { .. } => matvec::body(plan, k, group, &mut temps)?,
        KernelKind::RopeAppend { .. }
        | KernelKind::Attention { .. }
        | KernelKind::AttentionCombine { .. }
        | KernelKind::RmsNorm { .. }
        | KernelKind::Embedding { .. } => attention::body(plan, group, ki)?,
        KernelKind::Router { .. }
        | KernelKind::ExpertsUp { .. }
        | KernelKind::ExpertsDown { .. }
        | KernelKind::Argmax { .. }
        | KernelKind::Sample { .. } => moe::body(plan, group, ki, &mut temps)?,
    })
}

/// The weight prefetch of one tile of `k`: its share of every dense weight
/// the kernel streams (weights that do not depend on activations; routed
/// experts do and are not prefetched here).
fn prefetch_body(plan: &Plan, k: &Kernel) -> Result<Vec<Stmt>, CodegenError> {
    use crate::emit::Expr;
    let g = &plan.fused.graph;
    let group = plan.group(k);
    let weights: Vec<NodeId> = match group.kind {
        KernelKind::MatVec {
            matmul,
            ref siblings,
            ..
        } => std::iter::once(matmul)
            .chain(siblings.iter().map(|s| s.matmul))
            .map(|m| g.inputs(m)[1])
            .collect(),
        _ => vec![],
    };
    let mut slots = Vec::new();
    for w in weights {
        let Some(slot) = plan.weight(w) else {
            return Err(CodegenError::Internal(format!(
                "no weight slot for {}",
                g.describe(w)
            )));
        };
        slots.push(slot);
    }
    Ok(slots
        .into_iter()
        .map(|slot| {
            Stmt::Expr(Expr::call(
                "tf::prefetch_l2_share",
                vec![
                    Expr::var("wts").bin("+", Expr::Offset(slot.offset as i64)),
                    Expr::var(format!("{}ull", slot.bytes)),
                    Expr::var("tile"),
                    Expr::I32(i64::from(k.tiling.tiles)),
                ],
            ))
        })
        .collect())
}

/// The prologue of one tile of kernel `k` ([`LoweredKernel::prologue`]).
fn prologue_body(plan: &Plan, k: &Kernel) -> Result<Vec<Stmt>, CodegenError> {
    let group = plan.group(k);
    match group.kind {
        KernelKind::Attention { .. } => attention::prologue(plan, group),
        _ => Ok(vec![]),
    }
}

/// The early hints of one tile of kernel `k` ([`LoweredKernel::early`]).
fn early_body(plan: &Plan, k: &Kernel) -> Result<Vec<Stmt>, CodegenError> {
    let group = plan.group(k);
    match group.kind {
        KernelKind::Attention { .. } => attention::early(plan, group),
        _ => Ok(vec![]),
    }
}

/// The CTAs an SM must hold of a kernel (`__launch_bounds__`' second
/// argument; the compiler keeps the registers a thread to fit them): the
/// expert gate/up tile's own choice ([`moe::up_min_blocks`]), 1 for every
/// other kernel (the compiler's own choice of registers).
fn min_blocks(plan: &Plan, kind: &KernelKind) -> Result<u32, CodegenError> {
    match *kind {
        KernelKind::ExpertsUp { experts, .. } => moe::up_min_blocks(plan, experts),
        _ => Ok(1),
    }
}

/// The tile function, the prefetch function (when there is a prefetch), the
/// early hints (when there are any) and the `__global__` wrapper of one
/// kernel function.
fn functions(
    name: &str,
    (threads, min_blocks): (u32, u32),
    body: Vec<Stmt>,
    prefetch: Vec<Stmt>,
    early: Vec<Stmt>,
    prologue: Vec<Stmt>,
) -> Functions {
    use crate::emit::Expr;
    let offsets_param = (
        Ty::Named("const long long* __restrict__".into()),
        "off".to_string(),
    );
    let mut tile_params = vec![(Ty::I32, "tile".to_string())];
    tile_params.extend(params());
    tile_params.push((Ty::I32, "T".into()));
    tile_params.push((Ty::I32, "S".into()));
    tile_params.push((Ty::Ptr(Box::new(Ty::Char)), "smem".into()));
    tile_params.push(offsets_param.clone());
    let prologue = (!prologue.is_empty()).then(|| Function {
        qualifiers: "static __device__ __forceinline__".into(),
        launch_bounds: None,
        ret: "void".into(),
        name: format!("{name}_prologue"),
        params: tile_params.clone(),
        body: prologue,
    });
    let device = Function {
        qualifiers: if prologue.is_some() {
            "template <bool PROLOGUE_RAN> static __device__ __forceinline__".into()
        } else {
            "static __device__ __forceinline__".into()
        },
        launch_bounds: None,
        ret: "void".into(),
        name: format!("{name}_tile"),
        params: tile_params,
        body,
    };
    let prefetch = (!prefetch.is_empty()).then(|| Function {
        qualifiers: "static __device__ __forceinline__".into(),
        launch_bounds: None,
        ret: "void".into(),
        name: format!("{name}_prefetch"),
        params: vec![
            (Ty::I32, "tile".to_string()),
            (Ty::ConstPtr(Box::new(Ty::Char)), "wts".into()),
            offsets_param.clone(),
        ],
        body: prefetch,
    });
    let early = (!early.is_empty()).then(|| {
        let mut params = vec![(Ty::I32, "tile".to_string())];
        params.extend(params_const());
        params.push((Ty::I32, "T".into()));
        params.push((Ty::I32, "S".into()));
        params.push(offsets_param);
        Function {
            qualifiers: "static __device__ __forceinline__".into(),
            launch_bounds: None,
            ret: "void".into(),
            name: format!("{name}_early"),
            params,
            body: early,
        }
    });
    let mut wparams = params();
    wparams.push((
        Ty::Named("const __grid_constant__ tf::Offsets".into()),
        "off".into(),
    ));
    let mut wbody = vec![
        Stmt::Expr(Expr::var("extern __shared__ __align__(16) char smem[]")),
        Stmt::Expr(Expr::var(
            "unsigned long long* const trace = reinterpret_cast<unsigned long long*>(off.v[tf::OFFSET_TRACE])",
        )),
        timer("t_start"),
    ];
    // T and S are written before the forward's first kernel, which every
    // later kernel follows: they may be read before the wait.
    wbody.extend(symbols());
    if prefetch.is_some() {
        wbody.push(Stmt::Expr(Expr::call(
            format!("{name}_prefetch"),
            ["(int)blockIdx.x", "wts", "off.v"]
                .into_iter()
                .map(Expr::var)
                .collect(),
        )));
    }
    if early.is_some() {
        wbody.push(Stmt::Expr(Expr::call(
            format!("{name}_early"),
            ["(int)blockIdx.x", "act", "wts", "kv", "T", "S", "off.v"]
                .into_iter()
                .map(Expr::var)
                .collect(),
        )));
    }
    if prologue.is_some() {
        wbody.push(Stmt::Expr(Expr::call(
            format!("{name}_prologue"),
            TILE_ARGS.into_iter().map(Expr::var).collect(),
        )));
    }
    wbody.extend([
        Stmt::Expr(Expr::call("tf::grid_dependency_wait", vec![])),
        Stmt::Expr(Expr::call("tf::launch_dependents", vec![])),
        timer("t_waited"),
    ]);
    wbody.extend([
        Stmt::Expr(Expr::call(
            format!(
                "{name}_tile{}",
                if prologue.is_some() { "<true>" } else { "" }
            ),
            TILE_ARGS.into_iter().map(Expr::var).collect(),
        )),
        Stmt::If(
            Expr::var("trace"),
            vec![
                Stmt::Expr(Expr::var("__syncthreads()")),
                Stmt::If(
                    Expr::var("threadIdx.x == 0"),
                    vec![Stmt::Expr(Expr::var(format!(
                        "tf::trace_cta(trace + {TRACE_KERNEL_WORDS} * off.v[tf::OFFSET_KERNEL], t_start, t_waited, tf::global_timer())"
                    )))],
                    vec![],
                ),
            ],
            vec![],
        ),
    ]);
    let wrapper = Function {
        qualifiers: "extern \"C\" __global__".into(),
        launch_bounds: Some((threads, min_blocks)),
        ret: "void".into(),
        name: name.to_string(),
        params: wparams,
        body: wbody,
    };
    Functions {
        device,
        prefetch,
        early,
        prologue,
        wrapper,
    }
}

/// The arguments of a tile function (and a prologue) in the wrapper.
const TILE_ARGS: [&str; 8] = [
    "(int)blockIdx.x",
    "act",
    "wts",
    "kv",
    "T",
    "S",
    "smem",
    "off.v",
];

/// The functions of one lowered kernel ([`LoweredKernel`]).
struct Functions {
    device: Function,
    prefetch: Option<Function>,
    early: Option<Function>,
    prologue: Option<Function>,
    wrapper: Function,
}

/// Lowers every kernel of the plan into one translation unit. Kernels whose
/// bodies differ only in buffer offsets (the same block in every layer) share
/// one function, named by its shape; each plan kernel is an [`Instance`] of
/// one function with its own offsets.
pub fn lower(plan: &Plan) -> Result<Module, CodegenError> {
    let mut kernels: Vec<LoweredKernel> = Vec::new();
    let mut keys: Vec<(u32, u32, String)> = Vec::new();
    let mut instances = Vec::new();
    for (ki, k) in plan.kernels.iter().enumerate() {
        // The prefetch, the early hints and the body share one offset table:
        // parameterized together, then split where each ends.
        let prefetch = prefetch_body(plan, k)?;
        let early = early_body(plan, k)?;
        let prologue = prologue_body(plan, k)?;
        let (np, ne, npr) = (prefetch.len(), early.len(), prologue.len());
        let mut all = prefetch;
        all.extend(early);
        all.extend(prologue);
        all.extend(kernel_body(plan, ki, k)?);
        let offsets = crate::emit::parameterize(&mut all, "off");
        let body = all.split_off(np + ne + npr);
        let prologue = all.split_off(np + ne);
        let early = all.split_off(np);
        let prefetch = all;
        if offsets.len() > MAX_BUFFER_OFFSETS {
            return Err(CodegenError::Internal(format!(
                "kernel {} reads {} buffers, more than the {MAX_BUFFER_OFFSETS} an offset table holds",
                k.name,
                offsets.len()
            )));
        }
        let text = format!(
            "{}{}{}{}",
            crate::emit::Block(&prefetch, 0),
            crate::emit::Block(&early, 0),
            crate::emit::Block(&prologue, 0),
            crate::emit::Block(&body, 0)
        );
        let key = (k.tiling.threads, k.tiling.smem, text);
        let function = match keys.iter().position(|x| *x == key) {
            Some(i) => {
                kernels[i].header.push_str(&header(plan, k));
                i
            }
            None => {
                // The kernel's name without its schedule index, plus a variant number.
                let base = k
                    .name
                    .split_once('_')
                    .map(|(_, r)| r)
                    .unwrap_or(&k.name)
                    .to_string();
                let same = kernels.iter().filter(|f| f.name.starts_with(&base)).count();
                let name = if same == 0 {
                    base
                } else {
                    format!("{base}_v{same}")
                };
                let bounds = (k.tiling.threads, min_blocks(plan, &plan.group(k).kind)?);
                let f = functions(&name, bounds, body, prefetch, early, prologue);
                keys.push(key);
                kernels.push(LoweredKernel {
                    name,
                    header: header(plan, k),
                    device: f.device,
                    prefetch: f.prefetch,
                    early: f.early,
                    prologue: f.prologue,
                    wrapper: f.wrapper,
                });
                kernels.len() - 1
            }
        };
        instances.push(Instance { function, offsets });
    }
    let mut source = format!(
        "// Generated by tilefuse from graph \"{}\" for T <= {}. Do not edit.\n",
        plan.fused.graph.name, plan.options.max_t
    );
    for (name, _) in crate::cuda::HEADERS {
        source.push_str(&format!("#include \"{name}\"\n"));
    }
    source.push_str("using tf::bf16;\n");
    for k in &kernels {
        source.push('\n');
        source.push_str(&k.source());
    }
    let threads: Vec<u32> = plan.kernels.iter().map(|k| k.tiling.threads).collect();
    let uniform = threads.windows(2).all(|w| w[0] == w[1]);
    let persistent_threads = threads.first().copied().unwrap_or(1);
    let persistent_smem = plan
        .kernels
        .iter()
        .map(|k| k.tiling.smem)
        .max()
        .unwrap_or(0);
    let persistent =
        (uniform && !plan.kernels.is_empty()).then(|| persistent(&kernels, persistent_threads));
    if let Some(p) = &persistent {
        source.push_str(
            "\n// The persistent dispatcher: every tile of every kernel above, one CTA per SM.\n",
        );
        source.push_str(&p.to_string());
    }
    Ok(Module {
        source,
        kernels,
        instances,
        persistent,
        persistent_threads,
        persistent_smem,
    })
}
