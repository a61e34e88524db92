//! The plan: what will run. Kernels in schedule order, each a grid of tiles
//! with the kernels it depends on, and the memory plan: every activation at
//! an offset of one arena (reused once dead), every weight at an offset of
//! one weight buffer, every KV cache at an offset of one cache buffer.
//!
//! A plan is made for one bucket of `T` (the most tokens a forward in the
//! bucket carries): buffer sizes and tile counts use that maximum, and tiles
//! beyond the actual `T` return at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use tilefuse_ir::{Bindings, DType, Graph, InputKind, NodeId, Op};

use crate::error::CodegenError;
use crate::fusion::{Fused, Group, KernelKind};
use crate::lower;

/// Alignment of every buffer, in bytes.
pub const ALIGN: usize = 256;

/// The arena starts with the symbols of the forward, `int T, S` at byte 0
/// and 4; buffers follow from this offset. Kernels read the symbols from
/// there, so a captured CUDA graph or a persistent kernel serves any `T` of
/// its bucket and any `S` without new launch parameters.
pub const SYMBOLS_BYTES: usize = ALIGN;

/// A value that lives in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    /// The storage of a node's output (after resolving reshapes).
    Node(NodeId),
    /// A workspace a kernel writes for a later kernel (routing table, expert
    /// activations, attention partials): `(kernel index, slot)`.
    Work(usize, u8),
}

/// One activation buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// What it holds.
    pub value: Value,
    /// Readable name (the node's name or the workspace's).
    pub name: String,
    /// Bytes for the bucket's largest `T`.
    pub bytes: usize,
    /// Offset in the arena.
    pub offset: usize,
    /// First and last kernel (schedule index) that touch it; inputs and
    /// outputs of the graph live for the whole forward.
    pub live: (usize, usize),
}

/// Where a weight lives in the weight buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightSlot {
    /// The weight input node.
    pub node: NodeId,
    /// Parameter name.
    pub name: String,
    /// Dtype.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Offset of the values (the E2M1 codes for FP4).
    pub offset: usize,
    /// Offset of the block scales (FP4 only).
    pub scales_offset: Option<usize>,
    /// Offset of NVFP4's f32 tensor scale.
    pub tensor_scale_offset: Option<usize>,
    /// Total bytes.
    pub bytes: usize,
}

/// Where a KV cache lives in the cache buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheSlot {
    /// The cache input node.
    pub node: NodeId,
    /// Name.
    pub name: String,
    /// `[capacity, heads, head_dim]`.
    pub shape: [usize; 3],
    /// Dtype.
    pub dtype: DType,
    /// Offset.
    pub offset: usize,
    /// Bytes.
    pub bytes: usize,
}

/// Launch shape of a kernel, decided by its lowering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tiling {
    /// Tiles (CTAs in stream mode) for the bucket.
    pub tiles: u32,
    /// Threads per CTA.
    pub threads: u32,
    /// Dynamic shared memory bytes.
    pub smem: u32,
    /// Workspaces the kernel writes, `(slot, name, bytes)`; read by later kernels.
    pub workspaces: Vec<(u8, String, usize)>,
    /// A readable tile shape for the kernel name and summary (`32x2048`).
    pub shape: String,
}

/// One kernel of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// Unique readable name: `k07_norm_matvec_bf16_t16_32x4096`.
    pub name: String,
    /// Index of its group in [`Plan::fused`].
    pub group: usize,
    /// Launch shape.
    pub tiling: Tiling,
    /// Values it reads.
    pub reads: BTreeSet<Value>,
    /// Values it writes.
    pub writes: BTreeSet<Value>,
    /// Caches it writes.
    pub cache_writes: BTreeSet<NodeId>,
    /// Caches it reads.
    pub cache_reads: BTreeSet<NodeId>,
    /// Earlier kernels whose tiles must all finish before any tile of this
    /// one starts: producers of what it reads (true dependencies), and
    /// kernels that read or wrote memory it overwrites (anti-dependencies
    /// from arena reuse).
    pub deps: BTreeSet<usize>,
}

/// Choices that shape a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// The most tokens one forward of this bucket carries.
    pub max_t: usize,
    /// The largest value of every other row-count symbol of the graph (a
    /// draft's context rows `C`); `S` (positions already cached) never sizes
    /// an activation and needs none.
    pub bounds: BTreeMap<String, usize>,
    /// The forward runs as one persistent kernel, one CTA an SM, whose CTAs
    /// take each kernel's tiles in turn: a tile shape that pays only with
    /// several CTAs of a kernel resident on an SM is not chosen.
    pub persistent: bool,
}

impl PlanOptions {
    /// A bucket of at most `max_t` tokens and no other row symbols, for
    /// kernels launched one by one (a stream or a CUDA graph).
    pub fn new(max_t: usize) -> PlanOptions {
        PlanOptions {
            max_t,
            bounds: BTreeMap::new(),
            persistent: false,
        }
    }

    /// For the persistent kernel when `persistent`.
    pub fn with_persistent(mut self, persistent: bool) -> PlanOptions {
        self.persistent = persistent;
        self
    }

    /// With symbol `sym` at most `max`.
    pub fn with_bound(mut self, sym: &str, max: usize) -> PlanOptions {
        self.bounds.insert(sym.to_string(), max);
        self
    }

    /// Every row symbol bound to its largest value (`T` to `max_t`), `S` to 0.
    pub fn max_bindings(&self) -> Bindings {
        let mut b = Bindings::new().with("T", self.max_t).with("S", 0);
        for (s, &v) in &self.bounds {
            b.set(s, v);
        }
        b
    }
}

/// Words of the arena head: `T`, `S`, the forward's epoch, then the other
/// symbols of the graph in name order ([`Plan::symbol_slot`]).
pub const FIXED_SYMBOL_WORDS: usize = 3;

/// The whole executable plan of one graph for one bucket of `T`.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The fused graph.
    pub fused: Fused,
    /// Options it was made with.
    pub options: PlanOptions,
    /// Kernels in schedule order.
    pub kernels: Vec<Kernel>,
    /// Arena buffers.
    pub buffers: Vec<Buffer>,
    /// Arena size in bytes.
    pub arena_bytes: usize,
    /// Weight slots.
    pub weights: Vec<WeightSlot>,
    /// Weight buffer size.
    pub weight_bytes: usize,
    /// KV caches.
    pub caches: Vec<CacheSlot>,
    /// Cache buffer size.
    pub cache_bytes: usize,
}

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Bytes of a node's value with every row symbol bound to its maximum.
fn value_bytes(g: &Graph, n: NodeId, opt: &PlanOptions) -> Result<usize, CodegenError> {
    let node = g.node(n);
    if node.ty.shape.symbols().any(|s| s == "S") {
        return Err(CodegenError::Unsupported {
            node: g.describe(n),
            reason: format!(
                "a stored activation {} may not depend on S (the cached length)",
                node.ty
            ),
        });
    }
    let dims = node
        .ty
        .shape
        .eval(&opt.max_bindings())
        .map_err(|m| CodegenError::Unsupported {
            node: g.describe(n),
            reason: format!("its size needs a bound on a symbol (PlanOptions::with_bound): {m}"),
        })?;
    let numel: usize = dims.iter().product();
    let last = dims.last().copied().unwrap_or(1);
    node.ty
        .dtype
        .storage_bytes(numel, last)
        .ok_or_else(|| CodegenError::Unsupported {
            node: g.describe(n),
            reason: format!("{} storage for shape {dims:?}", node.ty.dtype),
        })
}

impl Plan {
    /// The word of the arena head that holds symbol `sym` during a forward
    /// (`T` 0, `S` 1, the others from [`FIXED_SYMBOL_WORDS`] on, by name).
    pub fn symbol_slot(&self, sym: &str) -> Option<usize> {
        match sym {
            "T" => Some(0),
            "S" => Some(1),
            _ => self
                .fused
                .graph
                .symbols()
                .filter(|s| *s != "T" && *s != "S")
                .collect::<BTreeSet<_>>()
                .into_iter()
                .position(|s| s == sym)
                .map(|i| FIXED_SYMBOL_WORDS + i),
        }
    }

    /// The largest value of a row dim in this bucket.
    pub fn dim_max(&self, d: &tilefuse_ir::Dim) -> Result<usize, CodegenError> {
        d.eval(&self.options.max_bindings())
            .map_err(|m| CodegenError::Internal(format!("bounding {d}: {m}")))
    }

    /// Plans `fused` for a bucket: the bucket's own passes
    /// ([`crate::passes::route_in_up`]), schedule, tiling (by the lowering of
    /// each kernel kind), dependencies, memory.
    pub fn new(mut fused: Fused, options: PlanOptions) -> Result<Plan, CodegenError> {
        // The bucket pass: fusions that pay only at some bucket sizes.
        crate::passes::route_in_up::run(&mut fused, options.max_t);
        fused.verify_complete()?;
        let g = &fused.graph;
        let order = schedule(&fused)?;
        // Weights and caches: fixed slots, in topological (printed) order.
        let mut weights = Vec::new();
        let mut off = 0usize;
        let none = Bindings::new();
        for n in weight_order(&fused) {
            let node = g.node(n);
            let shape = node
                .ty
                .shape
                .eval(&none)
                .map_err(|m| CodegenError::Unsupported {
                    node: g.describe(n),
                    reason: format!("weights need constant shapes: {m}"),
                })?;
            let numel: usize = shape.iter().product();
            let last = shape.last().copied().unwrap_or(1);
            // FP4: codes, then one scale byte per block, then (NVFP4) the f32 tensor scale.
            let (bytes, scales_offset, tensor_scale_offset) = match node.ty.dtype.block_size() {
                Some(block) => {
                    let codes = align(numel / 2);
                    let scales = align(numel / block);
                    let nv = node.ty.dtype == DType::NVFP4;
                    (
                        codes + scales + if nv { 4 } else { 0 },
                        Some(off + codes),
                        nv.then_some(off + codes + scales),
                    )
                }
                None => (
                    node.ty
                        .dtype
                        .storage_bytes(numel, last)
                        .unwrap_or(numel * 4),
                    None,
                    None,
                ),
            };
            weights.push(WeightSlot {
                node: n,
                name: node.name.clone(),
                dtype: node.ty.dtype,
                shape,
                offset: off,
                scales_offset,
                tensor_scale_offset,
                bytes,
            });
            off += align(bytes);
        }
        let weight_bytes = off;
        let mut caches = Vec::new();
        let mut off = 0usize;
        for n in g.inputs_of_kind(InputKind::Cache) {
            let node = g.node(n);
            let s = node
                .ty
                .shape
                .eval(&none)
                .map_err(|m| CodegenError::Unsupported {
                    node: g.describe(n),
                    reason: format!("caches need constant shapes: {m}"),
                })?;
            let bytes = node
                .ty
                .dtype
                .storage_bytes(s.iter().product(), s[2])
                .unwrap_or(0);
            caches.push(CacheSlot {
                node: n,
                name: node.name.clone(),
                shape: [s[0], s[1], s[2]],
                dtype: node.ty.dtype,
                offset: off,
                bytes,
            });
            off += align(bytes);
        }
        let cache_bytes = off;

        // Kernels with their reads, writes and tiling.
        let mut kernels: Vec<Kernel> = Vec::new();
        for (ki, &gi) in order.iter().enumerate() {
            let group = &fused.groups[gi];
            let tiling = lower::tiling(&fused, group, &options)?;
            let (reads, writes, cache_reads, cache_writes) =
                accesses(&fused, gi, ki, &tiling, &order)?;
            let name = format!(
                "k{ki:02}_{}_{}_t{}_{}",
                group.kind.short(),
                lower::weight_dtype_name(&fused, group),
                options.max_t,
                tiling.shape
            );
            kernels.push(Kernel {
                name,
                group: gi,
                tiling,
                reads,
                writes,
                cache_writes,
                cache_reads,
                deps: BTreeSet::new(),
            });
        }
        // True dependencies (indexing: each kernel reads the others' writes).
        let mut writer: BTreeMap<Value, usize> = BTreeMap::new();
        let mut cache_writer: BTreeMap<NodeId, usize> = BTreeMap::new();
        #[allow(clippy::needless_range_loop)]
        for ki in 0..kernels.len() {
            let mut deps = BTreeSet::new();
            for v in &kernels[ki].reads {
                if let Some(&w) = writer.get(v) {
                    deps.insert(w);
                }
            }
            for c in kernels[ki]
                .cache_reads
                .iter()
                .chain(&kernels[ki].cache_writes)
            {
                if let Some(&w) = cache_writer.get(c) {
                    deps.insert(w);
                }
            }
            for v in kernels[ki].writes.clone() {
                writer.insert(v, ki);
            }
            for c in kernels[ki].cache_writes.clone() {
                cache_writer.insert(c, ki);
            }
            kernels[ki].deps = deps;
        }
        // Memory: liveness over the schedule, first fit.
        let mut buffers = buffers_with_liveness(&fused, &kernels, &options)?;
        let arena_bytes = assign_offsets(&mut buffers);
        add_anti_dependencies(&mut kernels, &buffers);
        reduce_dependencies(&mut kernels);
        Ok(Plan {
            fused,
            options,
            kernels,
            buffers,
            arena_bytes,
            weights,
            weight_bytes,
            caches,
            cache_bytes,
        })
    }

    /// The buffer holding `v`.
    pub fn buffer(&self, v: Value) -> Option<&Buffer> {
        self.buffers.iter().find(|b| b.value == v)
    }

    /// The arena offset of the storage of node `n`.
    pub fn offset_of(&self, n: NodeId) -> Option<usize> {
        self.buffer(Value::Node(self.fused.storage(n)))
            .map(|b| b.offset)
    }

    /// The weight slot of a weight node.
    pub fn weight(&self, n: NodeId) -> Option<&WeightSlot> {
        self.weights.iter().find(|w| w.node == n)
    }

    /// The cache slot of a cache node.
    pub fn cache(&self, n: NodeId) -> Option<&CacheSlot> {
        self.caches.iter().find(|c| c.node == n)
    }

    /// The group of a kernel.
    pub fn group(&self, k: &Kernel) -> &Group {
        &self.fused.groups[k.group]
    }

    /// Bytes of weights and caches a forward must read at `T = max_t`
    /// (every weight once; for routed experts, `min(E, T·k)` experts).
    pub fn weight_bytes_touched(&self) -> usize {
        self.weights.iter().map(|w| w.bytes).sum()
    }
}

/// Orders the groups so that each comes after the producers of what it reads
/// (Kahn's algorithm, smallest group index first among the ready ones).
fn schedule(f: &Fused) -> Result<Vec<usize>, CodegenError> {
    let g = &f.graph;
    let n = f.groups.len();
    let mut preds: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
    for (gi, group) in f.groups.iter().enumerate() {
        let mut nodes: BTreeSet<NodeId> = group.nodes.clone();
        match group.kind {
            KernelKind::ExpertsUp { experts, .. } | KernelKind::ExpertsDown { experts } => {
                nodes.insert(experts);
            }
            // The norm is recomputed in this kernel's prologue, not read.
            KernelKind::MatVec { norm: Some(nm), .. } => {
                nodes.insert(nm);
            }
            // A split attention kernel reads the caches of the attention node it
            // does not own (its combine kernel does).
            KernelKind::Attention { attn, .. } => {
                nodes.insert(attn);
            }
            _ => {}
        }
        for &node in &nodes {
            for i in g.inputs(node) {
                let s = f.storage(i);
                if nodes.contains(&s) {
                    continue;
                }
                if let Some(p) = f.group_of(s) {
                    if p != gi {
                        preds[gi].insert(p);
                    }
                }
            }
        }
        if let KernelKind::ExpertsDown { experts } = group.kind {
            // The down kernel reads the up kernel's workspace.
            if let Some(up) = f.groups.iter().position(
                |x| matches!(x.kind, KernelKind::ExpertsUp { experts: e, .. } if e == experts),
            ) {
                preds[gi].insert(up);
            }
        }
    }
    let mut done = vec![false; n];
    let mut order = Vec::with_capacity(n);
    while order.len() < n {
        let next = (0..n).find(|&i| !done[i] && preds[i].iter().all(|&p| done[p]));
        match next {
            Some(i) => {
                done[i] = true;
                order.push(i);
            }
            None => {
                let stuck: Vec<String> = (0..n)
                    .filter(|&i| !done[i])
                    .map(|i| {
                        let waits: Vec<String> = preds[i]
                            .iter()
                            .filter(|&&p| !done[p])
                            .map(|p| format!("k{p}"))
                            .collect();
                        format!(
                            "k{i} {} waits for [{}]",
                            f.groups[i].kind.short(),
                            waits.join(",")
                        )
                    })
                    .collect();
                return Err(CodegenError::Internal(format!(
                    "the kernel graph has a cycle: {}",
                    stuck.join("; ")
                )));
            }
        }
    }
    Ok(order)
}

/// What kernel `ki` (group `gi`) reads and writes.
/// The weights in slot order: topological, except that the weights of a
/// matvec kernel with siblings follow one another in the kernel's order (its
/// tiles read them as one stacked matrix), placed where the first of them
/// would be.
fn weight_order(f: &Fused) -> Vec<NodeId> {
    let g = &f.graph;
    let mut stacks: Vec<Vec<NodeId>> = Vec::new();
    for group in &f.groups {
        if let KernelKind::MatVec {
            matmul,
            ref siblings,
            ..
        } = group.kind
        {
            if !siblings.is_empty() {
                stacks.push(
                    std::iter::once(matmul)
                        .chain(siblings.iter().map(|s| s.matmul))
                        .map(|m| g.inputs(m)[1])
                        .collect(),
                );
            }
        }
    }
    let mut out = Vec::new();
    let mut placed = BTreeSet::new();
    for n in g.inputs_of_kind(InputKind::Weight) {
        if placed.contains(&n) {
            continue;
        }
        match stacks.iter().find(|s| s.contains(&n)) {
            Some(stack) => {
                for &w in stack {
                    if placed.insert(w) {
                        out.push(w);
                    }
                }
            }
            None => {
                placed.insert(n);
                out.push(n);
            }
        }
    }
    out
}

#[allow(clippy::type_complexity)]
fn accesses(
    f: &Fused,
    gi: usize,
    ki: usize,
    tiling: &Tiling,
    order: &[usize],
) -> Result<
    (
        BTreeSet<Value>,
        BTreeSet<Value>,
        BTreeSet<NodeId>,
        BTreeSet<NodeId>,
    ),
    CodegenError,
> {
    let g = &f.graph;
    let group = &f.groups[gi];
    let mut reads = BTreeSet::new();
    let mut writes = BTreeSet::new();
    let mut cache_reads = BTreeSet::new();
    let mut cache_writes = BTreeSet::new();
    let mut computed: BTreeSet<NodeId> = group.nodes.clone();
    match group.kind {
        KernelKind::MatVec { norm: Some(nm), .. } => {
            computed.insert(nm);
        }
        KernelKind::ExpertsUp { experts, .. } => {
            computed.insert(experts);
        }
        KernelKind::Attention { attn, .. } => {
            computed.insert(attn);
        }
        // The combine kernel reads only the attention kernel's partials
        // (found below) and the sinks, a weight.
        KernelKind::AttentionCombine { .. } => {
            computed.clear();
        }
        _ => {}
    }
    for &node in &computed {
        for i in g.inputs(node) {
            let s = f.storage(i);
            if computed.contains(&s) {
                continue;
            }
            match g.node(s).op {
                Op::Input(InputKind::Weight) => {}
                Op::Input(InputKind::Cache) => {
                    cache_writes.insert(s);
                }
                Op::Attn(tilefuse_ir::Attn::KvAppend { .. }) => {
                    // A cache view: read the cache under it.
                    let cache = g.inputs(s)[0];
                    cache_reads.insert(cache);
                }
                _ => {
                    reads.insert(Value::Node(s));
                }
            }
        }
    }
    // The up kernel of the experts writes only its workspaces (and, with
    // the router inside, the router's choice and weights, which the group's
    // nodes cover below); the down kernel reads them and writes the node.
    match group.kind {
        KernelKind::ExpertsUp { router: None, .. } | KernelKind::Attention { split: true, .. } => {
            for (slot, _, _) in &tiling.workspaces {
                writes.insert(Value::Work(ki, *slot));
            }
        }
        KernelKind::AttentionCombine { attn } => {
            writes.insert(Value::Node(attn));
        }
        _ => {
            for &node in &group.nodes {
                if matches!(
                    g.node(node).op,
                    Op::Attn(tilefuse_ir::Attn::KvAppend { .. })
                ) {
                    continue;
                }
                let used_outside = f.real_users(node).iter().any(|u| !group.nodes.contains(u))
                    || f.is_output(node);
                if used_outside {
                    writes.insert(Value::Node(node));
                }
            }
            for (slot, _, _) in &tiling.workspaces {
                writes.insert(Value::Work(ki, *slot));
            }
        }
    }
    // Workspaces of earlier kernels this kernel reads.
    for (kj, &gj) in order[..ki].iter().enumerate() {
        let other = &f.groups[gj];
        let reads_it = match (&other.kind, &group.kind) {
            (
                KernelKind::Router { select, .. },
                KernelKind::ExpertsUp { experts, .. } | KernelKind::ExpertsDown { experts },
            ) => g.inputs(*experts)[1] == *select,
            (KernelKind::ExpertsUp { experts: a, .. }, KernelKind::ExpertsDown { experts: b }) => {
                a == b
            }
            (
                KernelKind::Attention {
                    attn: a,
                    split: true,
                    ..
                },
                KernelKind::AttentionCombine { attn: b },
            ) => a == b,
            _ => false,
        };
        if reads_it {
            // Every workspace slot of that kernel: slots are few and small.
            for slot in 0..4u8 {
                reads.insert(Value::Work(kj, slot));
            }
        }
    }
    Ok((reads, writes, cache_reads, cache_writes))
}

fn buffers_with_liveness(
    f: &Fused,
    kernels: &[Kernel],
    opt: &PlanOptions,
) -> Result<Vec<Buffer>, CodegenError> {
    let g = &f.graph;
    let last = kernels.len().saturating_sub(1);
    let mut live: BTreeMap<Value, (usize, usize)> = BTreeMap::new();
    let mut touch = |v: Value, k: usize| {
        let e = live.entry(v).or_insert((k, k));
        e.0 = e.0.min(k);
        e.1 = e.1.max(k);
    };
    for (ki, k) in kernels.iter().enumerate() {
        for v in k.writes.iter().chain(&k.reads) {
            touch(*v, ki);
        }
    }
    // Graph inputs (activations) and outputs live for the whole forward.
    for n in g.inputs_of_kind(InputKind::Activation) {
        live.insert(Value::Node(n), (0, last));
    }
    for (_, o) in g.outputs() {
        live.insert(Value::Node(f.storage(*o)), (0, last));
    }
    let mut out = Vec::new();
    for (v, l) in live {
        let (name, bytes) = match v {
            Value::Node(n) => (g.node(n).name.clone(), value_bytes(g, n, opt)?),
            Value::Work(k, slot) => {
                let Some((_, name, bytes)) =
                    kernels[k].tiling.workspaces.iter().find(|w| w.0 == slot)
                else {
                    continue;
                };
                (format!("{}.{name}", kernels[k].name), *bytes)
            }
        };
        out.push(Buffer {
            value: v,
            name,
            bytes,
            offset: 0,
            live: l,
        });
    }
    Ok(out)
}

/// First fit by decreasing size; two buffers share bytes only if their
/// lifetimes do not overlap. Returns the arena size.
fn assign_offsets(buffers: &mut [Buffer]) -> usize {
    let mut idx: Vec<usize> = (0..buffers.len()).collect();
    idx.sort_by_key(|&i| (std::cmp::Reverse(buffers[i].bytes), buffers[i].value));
    let mut placed: Vec<usize> = Vec::new();
    let mut end = SYMBOLS_BYTES;
    for i in idx {
        let (a0, a1) = buffers[i].live;
        let mut conflicts: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&j| {
                let (b0, b1) = buffers[j].live;
                a0 <= b1 && b0 <= a1
            })
            .map(|&j| {
                (
                    buffers[j].offset,
                    buffers[j].offset + align(buffers[j].bytes),
                )
            })
            .collect();
        conflicts.sort_unstable();
        let need = align(buffers[i].bytes);
        let mut off = SYMBOLS_BYTES;
        for (s, e) in conflicts {
            if off + need <= s {
                break;
            }
            off = off.max(e);
        }
        buffers[i].offset = off;
        end = end.max(off + need);
        placed.push(i);
    }
    end
}

/// A kernel that writes bytes an earlier kernel read or wrote for another
/// value must wait for that kernel (the persistent mode overlaps kernels).
fn add_anti_dependencies(kernels: &mut [Kernel], buffers: &[Buffer]) {
    let range = |v: &Value| {
        buffers
            .iter()
            .find(|b| b.value == *v)
            .map(|b| (b.offset, b.offset + align(b.bytes)))
    };
    for ki in 0..kernels.len() {
        let mine: Vec<(usize, usize)> = kernels[ki].writes.iter().filter_map(range).collect();
        let mut extra = BTreeSet::new();
        for (kj, other) in kernels[..ki].iter().enumerate() {
            let theirs = other
                .reads
                .iter()
                .chain(&other.writes)
                .filter(|v| !kernels[ki].writes.contains(v));
            let overlap = theirs
                .filter_map(range)
                .any(|(s, e)| mine.iter().any(|&(a, b)| a < e && s < b));
            if overlap {
                extra.insert(kj);
            }
        }
        kernels[ki].deps.extend(extra);
    }
}

/// Keeps only the dependencies not implied by others (transitive reduction):
/// when `k` waits for `d2`, whose tiles each waited for `d1`, then `d2` done
/// implies `d1` done, and `k` need not wait for `d1` itself. The persistent
/// mode's waiting thread then polls a handful of counters per task instead of
/// every kernel that ever shared arena bytes with this one.
#[allow(clippy::needless_range_loop)]
fn reduce_dependencies(kernels: &mut [Kernel]) {
    let n = kernels.len();
    let words = n.div_ceil(64);
    // reach[k]: every kernel k waits for, directly or not.
    let mut reach: Vec<Vec<u64>> = vec![vec![0; words]; n];
    for k in 0..n {
        let deps: Vec<usize> = kernels[k].deps.iter().copied().collect();
        let mut implied = vec![0u64; words];
        for &d in &deps {
            for w in 0..words {
                implied[w] |= reach[d][w];
            }
        }
        let mut r = implied.clone();
        for &d in &deps {
            r[d / 64] |= 1 << (d % 64);
        }
        reach[k] = r;
        kernels[k].deps = deps
            .into_iter()
            .filter(|&d| implied[d / 64] & (1 << (d % 64)) == 0)
            .collect();
    }
}

impl fmt::Display for Plan {
    /// The kernel table, then the memory plan.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.fused.graph;
        let num = g.numbering();
        writeln!(f, "plan {} (T <= {})", g.name, self.options.max_t)?;
        for (i, k) in self.kernels.iter().enumerate() {
            let deps: Vec<String> = k.deps.iter().map(|d| format!("k{d:02}")).collect();
            let nodes: Vec<String> = self
                .group(k)
                .nodes
                .iter()
                .map(|n| format!("%{}", num[n]))
                .collect();
            writeln!(
                f,
                "  {i:>3} {:<44} tiles {:>5} x {:>3} thr  smem {:>6}  nodes [{}]  after [{}]",
                k.name,
                k.tiling.tiles,
                k.tiling.threads,
                k.tiling.smem,
                nodes.join(","),
                deps.join(",")
            )?;
        }
        writeln!(f, "arena {} bytes:", self.arena_bytes)?;
        let mut bs: Vec<&Buffer> = self.buffers.iter().collect();
        bs.sort_by_key(|b| (b.offset, b.live));
        for b in bs {
            writeln!(
                f,
                "  @{:>9} {:>9} B  live k{:02}..k{:02}  {}",
                b.offset, b.bytes, b.live.0, b.live.1, b.name
            )?;
        }
        writeln!(
            f,
            "weights {} bytes in {} tensors, caches {} bytes in {}",
            self.weight_bytes,
            self.weights.len(),
            self.cache_bytes,
            self.caches.len()
        )
    }
}
