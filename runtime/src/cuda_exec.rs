//! The GPU backend: a graph compiled into one plan per bucket of `T`, run in
//! stream mode (one launch per kernel) or CUDA-graph mode (the same launches
//! captured once per bucket and replayed).
//!
//! Memory: one weight buffer (uploaded once, in the layout of the plan's
//! weight slots), one KV-cache buffer, one arena for activations shared by
//! all buckets (sized for the largest). The symbols `T` and `S` of a forward
//! are written to the head of the arena before the launches, so captured
//! graphs replay for any `T` of their bucket and any `S`.
//!
//! Launch order: in stream and graph modes every kernel but a forward's first
//! is launched with programmatic dependent launch. Its CTAs may then start
//! while the kernel before it drains; each asks L2 for its dense weights,
//! waits (`griddepcontrol.wait`) for the kernel before it to finish, and only
//! then lets the next kernel start (the wrapper contract in `prelude.cuh`).
//! A forward's first kernel, and anything else issued on the stream, keeps
//! full stream order.

use std::collections::BTreeMap;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaFunction, CudaGraph};
use tilefuse_codegen::lower::{self, Module as CudaModule};
use tilefuse_codegen::passes::run_pipeline;
use tilefuse_codegen::plan::{Plan, PlanOptions, FIXED_SYMBOL_WORDS};
use tilefuse_ir::fp4::e4m3_encode;
use tilefuse_ir::interp::{Data, Tensor};
use tilefuse_ir::{Bindings, DType, ErrorKind, Graph, InputKind, IrError, Result};

use crate::gpu::{Arg, Buffer, Gpu, GpuError};

/// How a forward's kernels are launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchMode {
    /// One launch per kernel (for debugging and per-kernel timing).
    Stream,
    /// One CUDA graph per bucket, captured on first use and replayed.
    Graph,
    /// One persistent kernel per forward: a CTA per SM walking a static task
    /// list ordered by dependency counters.
    Persistent,
}

/// The static schedule of the persistent mode for one plan on `sms` SMs.
///
/// Tasks `(kernel, tile)` are dealt round-robin to the SMs in schedule order,
/// so each SM's list is sorted by kernel. Deadlock freedom: every CTA is
/// resident (one per SM, `__launch_bounds__(threads, 1)`), and a task of
/// kernel `k` waits only on kernels scheduled before `k`. By induction on
/// `k`: every task of kernel 0 waits on nothing and finishes; if every task
/// of the kernels before `k` finishes, then a task of kernel `k` is preceded
/// on its SM only by tasks of kernels `<= k`, whose dependencies all finish,
/// so it runs and finishes too. A task's weight prefetch, issued before it
/// waits, is a hint that never blocks, so it leaves the argument unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskTables {
    /// `kernel << 20 | tile` per task, SM lists concatenated.
    pub tasks: Vec<i32>,
    /// Start of each SM's list, plus the end.
    pub sm_offsets: Vec<i32>,
    /// Dependencies of every kernel, concatenated.
    pub deps: Vec<i32>,
    /// Start of each kernel's dependencies, plus the end.
    pub dep_offsets: Vec<i32>,
    /// Tiles per kernel.
    pub tiles: Vec<u32>,
}

impl TaskTables {
    /// Builds the tables of `plan` for `sms` SMs.
    pub fn new(plan: &Plan, sms: usize) -> TaskTables {
        let sms = sms.max(1);
        let mut lists: Vec<Vec<i32>> = vec![Vec::new(); sms];
        let mut next = 0usize;
        for (k, kernel) in plan.kernels.iter().enumerate() {
            for tile in 0..kernel.tiling.tiles {
                lists[next % sms]
                    .push(((k as i32) << tilefuse_codegen::lower::TASK_TILE_BITS) | tile as i32);
                next += 1;
            }
        }
        let mut tasks = Vec::new();
        let mut sm_offsets = vec![0i32];
        for l in lists {
            tasks.extend(l);
            sm_offsets.push(tasks.len() as i32);
        }
        let mut deps = Vec::new();
        let mut dep_offsets = vec![0i32];
        for k in &plan.kernels {
            deps.extend(k.deps.iter().map(|&d| d as i32));
            dep_offsets.push(deps.len() as i32);
        }
        TaskTables {
            tasks,
            sm_offsets,
            deps,
            dep_offsets,
            tiles: plan.kernels.iter().map(|k| k.tiling.tiles).collect(),
        }
    }
}

/// The device side of the persistent mode of one bucket.
struct Persistent {
    function: CudaFunction,
    tables: Buffer,
    offsets: [usize; 7],
    counters: Buffer,
    epoch: u32,
    sms: u32,
}

fn gpu_err(e: GpuError) -> IrError {
    IrError::new(ErrorKind::Interp, e.to_string())
}

fn cg_err(e: tilefuse_codegen::CodegenError) -> IrError {
    IrError::new(ErrorKind::Type, e.to_string())
}

/// One bucket: its plan, module and functions.
struct Program {
    plan: Plan,
    module: CudaModule,
    /// Per plan kernel: the function that runs it and its offset table.
    functions: Vec<CudaFunction>,
    offsets: Vec<crate::gpu::Offsets>,
    graph: Option<CudaGraph>,
    loaded: crate::gpu::Module,
    persistent: Option<Persistent>,
}

impl Program {
    /// Launches plan kernel `i` (its shared function with its own offsets),
    /// with programmatic dependent launch when `programmatic`, recording into
    /// the trace buffer at `trace` when it is not 0.
    fn launch(
        &self,
        gpu: &Gpu,
        i: usize,
        buffers: &[Arg; 3],
        programmatic: bool,
        trace: u64,
    ) -> std::result::Result<(), GpuError> {
        let k = &self.plan.kernels[i];
        let mut offsets = self.offsets[i];
        offsets.0[lower::OFFSET_TRACE] = trace as i64;
        let args = [buffers[0], buffers[1], buffers[2], Arg::Offsets(offsets)];
        gpu.launch_ex(
            &k.name,
            &self.functions[i],
            k.tiling.tiles,
            k.tiling.threads,
            k.tiling.smem,
            &args,
            programmatic,
        )
    }
}

/// A value in device memory: an input or output of a forward, in the arena
/// of the executable that ran it ([`GpuExecutable::value_range`]). It is
/// valid while that executable lives and until its next forward; feeding a
/// stale range copies whatever the arena then holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRange {
    ptr: u64,
    bytes: usize,
    dtype: DType,
    rows: usize,
}

impl DeviceRange {
    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Rows (the first axis).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// All of `buf`, holding `rows` rows of `dtype`.
    pub fn whole(buf: &Buffer, dtype: DType, rows: usize) -> DeviceRange {
        DeviceRange {
            ptr: buf.ptr(),
            bytes: buf.len(),
            dtype,
            rows,
        }
    }

    /// Rows `r0..r1` of the value.
    pub fn rows_range(&self, r0: usize, r1: usize) -> Result<DeviceRange> {
        if r0 > r1 || r1 > self.rows || !self.bytes.is_multiple_of(self.rows.max(1)) {
            return Err(IrError::new(
                ErrorKind::Interp,
                format!(
                    "rows {r0}..{r1} are outside a device value of {} rows",
                    self.rows
                ),
            ));
        }
        let row = self.bytes / self.rows.max(1);
        Ok(DeviceRange {
            ptr: self.ptr + (r0 * row) as u64,
            bytes: (r1 - r0) * row,
            dtype: self.dtype,
            rows: r1 - r0,
        })
    }
}

/// A device range copied into (part of) an activation input before a forward.
#[derive(Clone, Copy, Debug)]
pub struct Feed<'a> {
    /// The input's name.
    pub input: &'a str,
    /// Byte offset inside the input.
    pub offset: usize,
    /// What is copied there.
    pub src: DeviceRange,
}

/// Bytes of a value of `dtype` and `shape` in the arena.
fn value_bytes(dtype: DType, shape: &[usize]) -> usize {
    let numel: usize = shape.iter().product();
    dtype
        .storage_bytes(numel, shape.last().copied().unwrap_or(1))
        .unwrap_or(0)
}

/// A graph compiled for the GPU, with its weights and caches resident.
pub struct GpuExecutable {
    gpu: Gpu,
    programs: Vec<Program>,
    arena: Buffer,
    weights: Buffer,
    kv: Buffer,
    /// Launch mode.
    pub mode: LaunchMode,
    /// The bucket of the last forward issued (whose values the arena holds).
    last_bucket: Option<usize>,
    /// Programmatic dependent launch between the kernels of a forward in
    /// stream and graph modes (on unless `TILEFUSE_PDL=0`, which exists to
    /// measure what it brings).
    pdl: bool,
    /// The device address of the trace buffer of a traced forward, else 0.
    trace: u64,
}

impl std::fmt::Debug for GpuExecutable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuExecutable")
            .field("buckets", &self.buckets())
            .field("mode", &self.mode)
            .finish()
    }
}

/// The weights in the byte layout of the plan's weight slots.
pub fn pack_weights(plan: &Plan, weights: &BTreeMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut out = vec![0u8; plan.weight_bytes];
    for slot in &plan.weights {
        let t = weights.get(&slot.name).ok_or_else(|| {
            IrError::new(
                ErrorKind::Interp,
                format!("weight \"{}\" is missing", slot.name),
            )
        })?;
        if t.dtype != slot.dtype || t.shape != slot.shape {
            return Err(IrError::new(
                ErrorKind::Interp,
                format!(
                    "weight \"{}\": expected {} {:?}, found {} {:?}",
                    slot.name, slot.dtype, slot.shape, t.dtype, t.shape
                ),
            ));
        }
        let dst = &mut out[slot.offset..];
        match (&t.data, slot.dtype) {
            (Data::F32(v), DType::F32) => {
                for (i, x) in v.iter().enumerate() {
                    dst[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes());
                }
            }
            (Data::F32(v), DType::BF16) => {
                for (i, x) in v.iter().enumerate() {
                    dst[2 * i..2 * i + 2].copy_from_slice(&half::bf16::from_f32(*x).to_le_bytes());
                }
            }
            (Data::F32(v), DType::F16) => {
                for (i, x) in v.iter().enumerate() {
                    dst[2 * i..2 * i + 2].copy_from_slice(&half::f16::from_f32(*x).to_le_bytes());
                }
            }
            (Data::F32(v), DType::F8E4M3) => {
                for (i, x) in v.iter().enumerate() {
                    dst[i] = e4m3_encode(*x);
                }
            }
            (Data::Fp4(q), DType::MXFP4 | DType::NVFP4) => {
                dst[..q.codes.len()].copy_from_slice(&q.codes);
                let so = slot.scales_offset.unwrap_or(slot.offset) - slot.offset;
                dst[so..so + q.scales.len()].copy_from_slice(&q.scales);
                if let Some(ts) = slot.tensor_scale_offset {
                    let o = ts - slot.offset;
                    dst[o..o + 4].copy_from_slice(&q.tensor_scale.to_le_bytes());
                }
            }
            (_, d) => {
                return Err(IrError::new(
                    ErrorKind::Interp,
                    format!(
                        "weight \"{}\": its data does not match dtype {d}",
                        slot.name
                    ),
                ))
            }
        }
    }
    Ok(out)
}

fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(match (&t.data, t.dtype) {
        (Data::I32(v), _) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        (Data::F32(v), DType::F32) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        (Data::F32(v), DType::BF16) => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        (Data::F32(v), DType::F16) => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        (_, d) => {
            return Err(IrError::new(
                ErrorKind::Interp,
                format!("cannot pass a {d} activation to the GPU"),
            ))
        }
    })
}

fn from_bytes(dtype: DType, shape: &[usize], b: &[u8]) -> Result<Tensor> {
    match dtype {
        DType::I32 => Tensor::i32(
            shape,
            b.chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::F32 => Tensor::f32(
            dtype,
            shape,
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::BF16 => Tensor::f32(
            dtype,
            shape,
            b.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        DType::F16 => Tensor::f32(
            dtype,
            shape,
            b.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        d => Err(IrError::new(
            ErrorKind::Interp,
            format!("cannot read a {d} output from the GPU"),
        )),
    }
}

/// The plan options of `graph` for a bucket of `max_t` tokens: every other
/// row symbol (a draft's context rows `C`) bounded by the graph's largest
/// forward ([`crate::executable::max_tokens`]).
pub fn plan_options(graph: &Graph, max_t: usize, mode: LaunchMode) -> PlanOptions {
    let bound = crate::executable::max_tokens(graph);
    graph.symbols().filter(|s| !matches!(*s, "T" | "S")).fold(
        PlanOptions::new(max_t).with_persistent(mode == LaunchMode::Persistent),
        |o, s| o.with_bound(s, bound),
    )
}

/// Plans and lowers `graph` for one bucket, launched in `mode` (no GPU
/// needed).
pub fn build(
    graph: &Graph,
    max_t: usize,
    mode: LaunchMode,
) -> std::result::Result<(Plan, CudaModule), tilefuse_codegen::CodegenError> {
    let fused = run_pipeline(graph.clone())?;
    let plan = Plan::new(fused, plan_options(graph, max_t, mode))?;
    let module = lower::lower(&plan)?;
    Ok((plan, module))
}

/// Where the weights of a new executable come from.
pub enum WeightSource<'a> {
    /// Host tensors by parameter name, packed and uploaded.
    Host(&'a BTreeMap<String, Tensor>),
    /// Seeded random values made on the GPU (for benchmarks at real widths:
    /// no multi-gigabyte host arrays). See [`crate::fill`].
    Random(u64),
}

impl GpuExecutable {
    /// Compiles `graph` for each bucket in `buckets` (the largest `T` of each),
    /// uploads `weights` and allocates the caches and the arena.
    pub fn new(
        gpu: Gpu,
        graph: &Graph,
        weights: &BTreeMap<String, Tensor>,
        buckets: &[usize],
        mode: LaunchMode,
    ) -> Result<GpuExecutable> {
        GpuExecutable::with_weights(gpu, graph, WeightSource::Host(weights), buckets, mode)
    }

    /// Like [`GpuExecutable::new`], with the weights from `source`.
    pub fn with_weights(
        gpu: Gpu,
        graph: &Graph,
        source: WeightSource<'_>,
        buckets: &[usize],
        mode: LaunchMode,
    ) -> Result<GpuExecutable> {
        let mut buckets = buckets.to_vec();
        buckets.sort_unstable();
        buckets.dedup();
        if buckets.is_empty() {
            return Err(IrError::new(ErrorKind::Interp, "no T buckets to compile"));
        }
        let mut programs = Vec::new();
        for &b in &buckets {
            let (plan, module) = build(graph, b, mode).map_err(cg_err)?;
            let loaded = gpu
                .load(
                    &format!("{}_t{b}", graph.name),
                    &module.source,
                    tilefuse_codegen::cuda::HEADERS,
                )
                .map_err(gpu_err)?;
            let functions = module
                .instances
                .iter()
                .map(|i| loaded.function(&module.kernels[i.function].name))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(gpu_err)?;
            let offsets = module
                .instances
                .iter()
                .enumerate()
                .map(|(k, i)| {
                    let mut o = crate::gpu::Offsets::new(&i.offsets);
                    o.0[lower::OFFSET_KERNEL] = k as i64;
                    o
                })
                .collect();
            programs.push(Program {
                plan,
                module,
                functions,
                offsets,
                graph: None,
                loaded,
                persistent: None,
            });
        }
        let first = &programs[0].plan;
        let weights_buf = match source {
            WeightSource::Host(weights) => {
                let packed = pack_weights(first, weights)?;
                gpu.upload(&packed, "the weights").map_err(gpu_err)?
            }
            WeightSource::Random(seed) => {
                let mut b = gpu
                    .alloc(first.weight_bytes, "the weights")
                    .map_err(gpu_err)?;
                crate::fill::random_weights(&gpu, first, &mut b, seed).map_err(gpu_err)?;
                b
            }
        };
        let kv_bytes = first.cache_bytes;
        let mut kv = gpu
            .alloc(kv_bytes.max(1), "the KV caches")
            .map_err(gpu_err)?;
        // Poison the caches: a read of a position never written shows as NaN.
        gpu.write(&mut kv, 0, &vec![0xffu8; kv_bytes.max(1)])
            .map_err(gpu_err)?;
        let arena_bytes = programs
            .iter()
            .map(|p| p.plan.arena_bytes)
            .max()
            .unwrap_or(0);
        let mut arena = gpu
            .alloc(arena_bytes, "the activation arena")
            .map_err(gpu_err)?;
        gpu.write(&mut arena, 0, &vec![0xffu8; arena_bytes])
            .map_err(gpu_err)?;
        Ok(GpuExecutable {
            gpu,
            programs,
            arena,
            weights: weights_buf,
            kv,
            mode,
            last_bucket: None,
            pdl: std::env::var("TILEFUSE_PDL").map_or(true, |v| v != "0"),
            trace: 0,
        })
    }

    /// The largest value symbol `sym` (other than `T` and `S`) may take: the
    /// bound the plans were sized for.
    pub fn symbol_bound(&self, sym: &str) -> Option<usize> {
        self.programs
            .iter()
            .filter_map(|p| p.plan.options.bounds.get(sym).copied())
            .min()
    }

    /// The largest `T` of each bucket.
    pub fn buckets(&self) -> Vec<usize> {
        self.programs.iter().map(|p| p.plan.options.max_t).collect()
    }

    /// The plan and module of the bucket serving `t` tokens.
    pub fn program_for(&self, t: usize) -> Option<(&Plan, &CudaModule)> {
        self.programs
            .iter()
            .find(|p| p.plan.options.max_t >= t)
            .map(|p| (&p.plan, &p.module))
    }

    /// The GPU.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Gives the GPU back (freeing this executable's buffers).
    pub fn into_gpu(self) -> Gpu {
        self.gpu
    }

    /// Runs one forward and reads back every output.
    pub fn run(
        &mut self,
        bindings: &Bindings,
        inputs: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>> {
        self.run_outputs(bindings, inputs, None)
    }

    /// Runs one forward and reads back the outputs named in `wanted` (all
    /// when `None`): the others stay on the GPU.
    pub fn run_outputs(
        &mut self,
        bindings: &Bindings,
        inputs: &BTreeMap<String, Tensor>,
        wanted: Option<&[&str]>,
    ) -> Result<BTreeMap<String, Tensor>> {
        let pi = self.bucket(bindings)?;
        self.prepare(pi, bindings, inputs)?;
        self.dispatch(pi)?;
        self.gpu.sync("running the forward").map_err(gpu_err)?;
        self.read_outputs(pi, bindings, wanted)
    }

    /// The program serving a forward with these bindings.
    fn bucket(&self, bindings: &Bindings) -> Result<usize> {
        let t = bindings
            .get("T")
            .ok_or_else(|| IrError::new(ErrorKind::Interp, "symbol T is not bound"))?;
        self.programs
            .iter()
            .position(|p| p.plan.options.max_t >= t)
            .ok_or_else(|| {
                IrError::new(
                    ErrorKind::Interp,
                    format!(
                        "T = {t} is larger than the largest compiled bucket ({:?})",
                        self.buckets()
                    ),
                )
            })
    }

    /// Writes the symbols of a forward to the arena head: `T`, `S`, then the
    /// graph's other symbols at their words ([`Plan::symbol_slot`]), each
    /// checked against the bound the plan was sized for.
    fn write_symbols(&mut self, pi: usize, bindings: &Bindings) -> Result<()> {
        let plan = &self.programs[pi].plan;
        let mut words = vec![0i32; FIXED_SYMBOL_WORDS];
        for sym in plan.fused.graph.symbols() {
            let v = bindings.get(sym).ok_or_else(|| {
                IrError::new(ErrorKind::Interp, format!("symbol {sym} is not bound"))
            })?;
            if let Some(&max) = plan.options.bounds.get(sym) {
                if v > max {
                    return Err(IrError::new(
                        ErrorKind::Interp,
                        format!("{sym} = {v} is larger than the {max} the plan was sized for"),
                    ));
                }
            }
            let slot = plan.symbol_slot(sym).ok_or_else(|| {
                IrError::new(
                    ErrorKind::Interp,
                    format!("symbol {sym} has no word in the arena head"),
                )
            })?;
            if slot == 2 {
                continue;
            }
            if words.len() <= slot {
                words.resize(slot + 1, 0);
            }
            words[slot] = i32::try_from(v).map_err(|_| {
                IrError::new(
                    ErrorKind::Interp,
                    format!("{sym} = {v} does not fit an int"),
                )
            })?;
        }
        // Word 2 is the persistent mode's epoch, which the launch keeps.
        let mut head = Vec::new();
        for w in &words[..2] {
            head.extend(w.to_le_bytes());
        }
        self.gpu.write(&mut self.arena, 0, &head).map_err(gpu_err)?;
        if words.len() > FIXED_SYMBOL_WORDS {
            let mut rest = Vec::new();
            for w in &words[FIXED_SYMBOL_WORDS..] {
                rest.extend(w.to_le_bytes());
            }
            self.gpu
                .write(&mut self.arena, 4 * FIXED_SYMBOL_WORDS, &rest)
                .map_err(gpu_err)?;
        }
        Ok(())
    }

    /// Writes the symbols and the activation inputs of a forward to the arena.
    fn prepare(
        &mut self,
        pi: usize,
        b: &Bindings,
        inputs: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        self.prepare_with(pi, b, inputs, &[])
    }

    /// [`GpuExecutable::prepare`] where some inputs come (wholly, or in part
    /// over host values) from device ranges, copied on the stream after the
    /// host writes. An input with no host value must be covered exactly by
    /// one feed.
    fn prepare_with(
        &mut self,
        pi: usize,
        b: &Bindings,
        inputs: &BTreeMap<String, Tensor>,
        feeds: &[Feed<'_>],
    ) -> Result<()> {
        self.write_symbols(pi, b)?;
        let p = &self.programs[pi];
        let g = &p.plan.fused.graph;
        let activations = g.inputs_of_kind(InputKind::Activation);
        for f in feeds {
            if !activations.iter().any(|&n| g.node(n).name == f.input) {
                return Err(IrError::new(
                    ErrorKind::Interp,
                    format!(
                        "the graph \"{}\" has no activation input named \"{}\" to feed",
                        g.name, f.input
                    ),
                ));
            }
        }
        let mut copies = Vec::new();
        for n in activations {
            let node = g.node(n);
            let want = node
                .ty
                .shape
                .eval(b)
                .map_err(|m| IrError::new(ErrorKind::Interp, m))?;
            let off = p.plan.offset_of(n).ok_or_else(|| {
                IrError::new(
                    ErrorKind::Interp,
                    format!("input \"{}\" has no buffer", node.name),
                )
            })?;
            let bytes = value_bytes(node.ty.dtype, &want);
            let mine: Vec<&Feed<'_>> = feeds.iter().filter(|f| f.input == node.name).collect();
            for f in &mine {
                if f.src.dtype != node.ty.dtype {
                    return Err(IrError::new(
                        ErrorKind::Interp,
                        format!(
                            "a device feed of {} into input \"{}\" of {}",
                            f.src.dtype, node.name, node.ty.dtype
                        ),
                    ));
                }
                if f.offset + f.src.bytes > bytes {
                    return Err(IrError::new(
                        ErrorKind::Interp,
                        format!(
                            "a device feed of {} bytes at byte {} overruns input \"{}\" ({} {want:?}, {bytes} bytes)",
                            f.src.bytes, f.offset, node.name, node.ty.dtype
                        ),
                    ));
                }
                copies.push((self.arena.ptr() + (off + f.offset) as u64, f.src));
            }
            let Some(v) = inputs.get(&node.name) else {
                if let [f] = mine[..] {
                    if f.offset == 0 && f.src.bytes == bytes {
                        continue;
                    }
                }
                return Err(IrError::new(
                    ErrorKind::Interp,
                    format!("missing input \"{}\" ({})", node.name, node.ty),
                ));
            };
            if v.shape != want || v.dtype != node.ty.dtype {
                return Err(IrError::new(
                    ErrorKind::Interp,
                    format!(
                        "input \"{}\": expected {} {want:?}, found {} {:?}",
                        node.name, node.ty.dtype, v.dtype, v.shape
                    ),
                ));
            }
            self.gpu
                .write(&mut self.arena, off, &to_bytes(v)?)
                .map_err(gpu_err)?;
        }
        for (dst, src) in copies {
            self.gpu
                .copy_range(dst, src.ptr, src.bytes)
                .map_err(gpu_err)?;
        }
        Ok(())
    }

    /// Issues one forward on the stream and returns without waiting: the
    /// outputs stay in the arena ([`GpuExecutable::value_range`]) until the
    /// next forward of this executable. `feeds` copy device ranges (outputs
    /// of another executable on the same stream) into inputs.
    pub fn enqueue(
        &mut self,
        bindings: &Bindings,
        inputs: &BTreeMap<String, Tensor>,
        feeds: &[Feed<'_>],
    ) -> Result<()> {
        let pi = self.bucket(bindings)?;
        self.prepare_with(pi, bindings, inputs, feeds)?;
        self.dispatch(pi)
    }

    /// Where the input or output `name` of a forward with `bindings` lives
    /// in the arena (valid until the next forward).
    pub fn value_range(&self, bindings: &Bindings, name: &str) -> Result<DeviceRange> {
        let p = &self.programs[self.bucket(bindings)?].plan;
        let g = &p.fused.graph;
        let id = g
            .find_input(name)
            .or_else(|| {
                g.outputs()
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, id)| *id)
            })
            .ok_or_else(|| {
                IrError::new(
                    ErrorKind::Interp,
                    format!(
                        "the graph \"{}\" has no input or output named \"{name}\"",
                        g.name
                    ),
                )
            })?;
        let node = g.node(id);
        let shape = node
            .ty
            .shape
            .eval(bindings)
            .map_err(|m| IrError::new(ErrorKind::Interp, m))?;
        let off = p.offset_of(id).ok_or_else(|| {
            IrError::new(ErrorKind::Interp, format!("\"{name}\" has no arena buffer"))
        })?;
        Ok(DeviceRange {
            ptr: self.arena.ptr() + off as u64,
            bytes: value_bytes(node.ty.dtype, &shape),
            dtype: node.ty.dtype,
            rows: shape.first().copied().unwrap_or(1),
        })
    }

    /// Issues one forward of bucket `pi` on the stream (no wait).
    fn dispatch(&mut self, pi: usize) -> Result<()> {
        self.last_bucket = Some(pi);
        let args = [
            Arg::Ptr(self.arena.ptr()),
            Arg::Ptr(self.weights.ptr()),
            Arg::Ptr(self.kv.ptr()),
        ];
        match self.mode {
            LaunchMode::Persistent => {
                self.ensure_persistent(pi)?;
                let Some(ps) = self.programs[pi].persistent.as_mut() else {
                    return Err(IrError::new(ErrorKind::Interp, "persistent tables missing"));
                };
                ps.epoch += 1;
                let epoch = ps.epoch;
                let base = ps.tables.ptr();
                let mut pargs = args.to_vec();
                for o in &ps.offsets[..5] {
                    pargs.push(Arg::Ptr(base + *o as u64));
                }
                pargs.push(Arg::Ptr(ps.counters.ptr()));
                pargs.push(Arg::Ptr(base + ps.offsets[5] as u64));
                pargs.push(Arg::Ptr(base + ps.offsets[6] as u64));
                let (sms, threads, smem) = (
                    ps.sms,
                    self.programs[pi].module.persistent_threads,
                    self.programs[pi].module.persistent_smem,
                );
                self.gpu
                    .write(&mut self.arena, 8, &epoch.to_le_bytes())
                    .map_err(gpu_err)?;
                let f = &self.programs[pi]
                    .persistent
                    .as_ref()
                    .map(|p| p.function.clone());
                if let Some(f) = f {
                    self.gpu
                        .launch(lower::PERSISTENT, f, sms, threads, smem, &pargs)
                        .map_err(gpu_err)?;
                }
            }
            LaunchMode::Stream => {
                let p = &self.programs[pi];
                for i in 0..p.plan.kernels.len() {
                    p.launch(&self.gpu, i, &args, self.pdl && i > 0, self.trace)
                        .map_err(gpu_err)?;
                }
            }
            LaunchMode::Graph => {
                if self.programs[pi].graph.is_none() {
                    let stream = self.gpu.stream().clone();
                    stream
                        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                        .map_err(|e| {
                            IrError::new(
                                ErrorKind::Interp,
                                format!("starting CUDA-graph capture: {e:?}"),
                            )
                        })?;
                    let p = &self.programs[pi];
                    let mut failed = None;
                    for i in 0..p.plan.kernels.len() {
                        if let Err(e) = p.launch(&self.gpu, i, &args, self.pdl && i > 0, self.trace)
                        {
                            failed = Some(e);
                            break;
                        }
                    }
                    let graph = stream
                        .end_capture(CUgraphInstantiate_flags(0))
                        .map_err(|e| {
                            IrError::new(
                                ErrorKind::Interp,
                                format!("ending CUDA-graph capture: {e:?}"),
                            )
                        })?;
                    if let Some(e) = failed {
                        return Err(gpu_err(e));
                    }
                    self.programs[pi].graph = graph;
                }
                if let Some(graph) = &self.programs[pi].graph {
                    graph.launch().map_err(|e| {
                        IrError::new(
                            ErrorKind::Interp,
                            format!("replaying the CUDA graph: {e:?}"),
                        )
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Builds and uploads the task tables of bucket `pi` on first use.
    fn ensure_persistent(&mut self, pi: usize) -> Result<()> {
        if self.programs[pi].persistent.is_some() {
            return Ok(());
        }
        let p = &self.programs[pi];
        if p.module.persistent.is_none() {
            let threads: Vec<String> = p
                .plan
                .kernels
                .iter()
                .map(|k| format!("{} ({})", k.name, k.tiling.threads))
                .collect();
            return Err(IrError::new(
                ErrorKind::Interp,
                format!(
                    "the persistent mode needs every kernel to use the same number of threads; found {}; use --mode graph",
                    threads.join(", ")
                ),
            ));
        }
        let function = p.loaded.function(lower::PERSISTENT).map_err(gpu_err)?;
        let sms = self.gpu.sms as usize;
        let t = TaskTables::new(&p.plan, sms);
        let mut bytes = Vec::new();
        let mut offsets = [0usize; 7];
        let trace = self.trace as i64;
        let offs: Vec<u8> = p
            .offsets
            .iter()
            .flat_map(|o| {
                let mut o = *o;
                o.0[lower::OFFSET_TRACE] = trace;
                o.0.into_iter().flat_map(|x| x.to_le_bytes())
            })
            .collect();
        let function_of: Vec<u8> = p
            .module
            .instances
            .iter()
            .flat_map(|i| (i.function as i32).to_le_bytes())
            .collect();
        let parts: [Vec<u8>; 7] = [
            t.tasks.iter().flat_map(|x| x.to_le_bytes()).collect(),
            t.sm_offsets.iter().flat_map(|x| x.to_le_bytes()).collect(),
            t.deps.iter().flat_map(|x| x.to_le_bytes()).collect(),
            t.dep_offsets.iter().flat_map(|x| x.to_le_bytes()).collect(),
            t.tiles.iter().flat_map(|x| x.to_le_bytes()).collect(),
            offs,
            function_of,
        ];
        for (i, part) in parts.iter().enumerate() {
            offsets[i] = bytes.len();
            bytes.extend(part);
            bytes.resize(bytes.len().div_ceil(256) * 256, 0);
        }
        let tables = self
            .gpu
            .upload(&bytes, "the persistent task tables")
            .map_err(gpu_err)?;
        let counters = self
            .gpu
            .upload(
                &vec![0u8; 4 * t.tiles.len().max(1)],
                "the persistent tile counters",
            )
            .map_err(gpu_err)?;
        self.programs[pi].persistent = Some(Persistent {
            function,
            tables,
            offsets,
            counters,
            epoch: 0,
            sms: sms as u32,
        });
        Ok(())
    }

    fn read_outputs(
        &self,
        pi: usize,
        bindings: &Bindings,
        wanted: Option<&[&str]>,
    ) -> Result<BTreeMap<String, Tensor>> {
        let p = &self.programs[pi].plan;
        let g = &p.fused.graph;
        let mut out = BTreeMap::new();
        for (name, id) in g.outputs() {
            if wanted.is_some_and(|w| !w.contains(&name.as_str())) {
                continue;
            }
            let node = g.node(*id);
            let shape = node
                .ty
                .shape
                .eval(bindings)
                .map_err(|m| IrError::new(ErrorKind::Interp, m))?;
            let bytes = value_bytes(node.ty.dtype, &shape);
            let off = p.offset_of(*id).ok_or_else(|| {
                IrError::new(
                    ErrorKind::Interp,
                    format!("output \"{name}\" has no buffer"),
                )
            })?;
            let b = self
                .gpu
                .download_range(&self.arena, off, bytes)
                .map_err(gpu_err)?;
            out.insert(name.clone(), from_bytes(node.ty.dtype, &shape, &b)?);
        }
        Ok(out)
    }

    /// Times `reps` forwards with `bindings` (`T` tokens after `S` cached
    /// positions, and any other symbol of the graph) in the executable's
    /// launch mode, each between two events, after `warmup` untimed ones;
    /// `inputs` are written once. Returns milliseconds per forward.
    pub fn time_forwards(
        &mut self,
        bindings: &Bindings,
        inputs: &BTreeMap<String, Tensor>,
        warmup: usize,
        reps: usize,
    ) -> Result<Vec<f32>> {
        let pi = self.bucket(bindings)?;
        self.prepare(pi, bindings, inputs)?;
        for _ in 0..warmup {
            self.dispatch(pi)?;
        }
        self.gpu.sync("warming up").map_err(gpu_err)?;
        let stream = self.gpu.stream().clone();
        let ev = |e: cudarc::driver::DriverError| {
            IrError::new(ErrorKind::Interp, format!("event: {e:?}"))
        };
        let mut events = Vec::with_capacity(reps);
        for _ in 0..reps {
            let e0 = stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(ev)?;
            self.dispatch(pi)?;
            let e1 = stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(ev)?;
            events.push((e0, e1));
        }
        self.gpu.sync("timing forwards").map_err(gpu_err)?;
        events
            .iter()
            .map(|(a, b)| a.elapsed_ms(b).map_err(ev))
            .collect()
    }

    /// Reads `bytes` of the arena at the storage of node `n` of the bucket
    /// serving `t`. Buckets share the arena, so this is an error unless the
    /// last forward ran that bucket.
    pub fn read_value(&self, t: usize, n: tilefuse_ir::NodeId, bytes: usize) -> Result<Vec<u8>> {
        let pi = self
            .programs
            .iter()
            .position(|p| p.plan.options.max_t >= t)
            .ok_or_else(|| IrError::new(ErrorKind::Interp, format!("no bucket for T = {t}")))?;
        if self.last_bucket != Some(pi) {
            return Err(IrError::new(
                ErrorKind::Interp,
                format!(
                    "the arena holds the values of a forward of another bucket ({:?}), not of \
                     T = {t}: run a forward of T = {t} first",
                    self.last_bucket
                        .map(|b| self.programs[b].plan.options.max_t)
                ),
            ));
        }
        let p = &self.programs[pi];
        let off = p
            .plan
            .offset_of(n)
            .ok_or_else(|| IrError::new(ErrorKind::Interp, "value has no arena buffer"))?;
        self.gpu
            .download_range(&self.arena, off, bytes)
            .map_err(gpu_err)
    }

    /// Fills the KV caches with seeded random bf16 values, so that timing at a
    /// long context reads real numbers.
    pub fn randomize_caches(&mut self, seed: u64) -> Result<()> {
        let p = &self.programs[0].plan;
        crate::fill::random_caches(&self.gpu, p, &mut self.kv, seed).map_err(gpu_err)
    }

    /// Runs one forward with `bindings` and `inputs` (after `warmup` untimed
    /// ones) with the kernels recording when they start, pass their wait and
    /// end, and returns what they recorded: per kernel in stream and graph
    /// modes, per task (with its SM) in persistent mode. The traced forward is
    /// captured and laid out anew, so the untraced ones after it run exactly
    /// as before.
    pub fn trace_forward(
        &mut self,
        bindings: &Bindings,
        inputs: &BTreeMap<String, Tensor>,
        warmup: usize,
    ) -> Result<crate::timeline::Trace> {
        let pi = self.bucket(bindings)?;
        self.prepare(pi, bindings, inputs)?;
        for _ in 0..warmup {
            self.dispatch(pi)?;
        }
        self.gpu
            .sync("warming up before a trace")
            .map_err(gpu_err)?;
        let plan = &self.programs[pi].plan;
        let (records, init) = match self.mode {
            LaunchMode::Persistent => {
                let tasks: usize = plan.kernels.iter().map(|k| k.tiling.tiles as usize).sum();
                (tasks, vec![0u64; lower::TRACE_TASK_WORDS * tasks])
            }
            _ => {
                let n = plan.kernels.len();
                let mut v = Vec::with_capacity(lower::TRACE_KERNEL_WORDS * n);
                for _ in 0..n {
                    v.extend([u64::MAX, u64::MAX]);
                    v.extend(std::iter::repeat_n(0, lower::TRACE_KERNEL_WORDS - 2));
                }
                (n, v)
            }
        };
        let init: Vec<u8> = init.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut buf = self
            .gpu
            .upload(&init, "the trace buffer")
            .map_err(gpu_err)?;
        // The traced launches carry the buffer's address: captured graphs and
        // task tables are made anew with it, and again without it after.
        self.trace = buf.ptr();
        self.programs[pi].graph = None;
        self.programs[pi].persistent = None;
        let result = self.traced_dispatch(pi, &mut buf, &init);
        self.trace = 0;
        self.programs[pi].graph = None;
        self.programs[pi].persistent = None;
        let ms = result?;
        let raw = self.gpu.download(&buf).map_err(gpu_err)?;
        let words: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let plan = &self.programs[pi].plan;
        crate::timeline::Trace::from_words(plan, self.mode, records, &words, ms)
    }

    /// Issues the traced forward of [`GpuExecutable::trace_forward`]: one
    /// forward to capture or lay out the launches, the trace reset, then the
    /// recorded one between two events. Returns its milliseconds.
    fn traced_dispatch(&mut self, pi: usize, buf: &mut Buffer, init: &[u8]) -> Result<f32> {
        if self.mode != LaunchMode::Stream {
            self.dispatch(pi)?;
            self.gpu
                .sync("laying out the traced forward")
                .map_err(gpu_err)?;
            self.gpu.write(buf, 0, init).map_err(gpu_err)?;
        }
        let stream = self.gpu.stream().clone();
        let ev = |e: cudarc::driver::DriverError| {
            IrError::new(ErrorKind::Interp, format!("event: {e:?}"))
        };
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let e0 = stream.record_event(flags).map_err(ev)?;
        self.dispatch(pi)?;
        let e1 = stream.record_event(flags).map_err(ev)?;
        self.gpu
            .sync("running the traced forward")
            .map_err(gpu_err)?;
        e0.elapsed_ms(&e1).map_err(ev)
    }

    /// Times each kernel of the bucket serving `t` tokens in stream mode
    /// (median of `reps` event-timed launches per kernel), after one warm-up
    /// forward. Inputs must have been set by a previous [`GpuExecutable::run`].
    pub fn kernel_times(&mut self, t: usize, s: usize, reps: usize) -> Result<Vec<(String, f32)>> {
        let pi = self
            .programs
            .iter()
            .position(|p| p.plan.options.max_t >= t)
            .ok_or_else(|| IrError::new(ErrorKind::Interp, format!("no bucket for T = {t}")))?;
        let mut head = Vec::new();
        head.extend((t as i32).to_le_bytes());
        head.extend((s as i32).to_le_bytes());
        self.gpu.write(&mut self.arena, 0, &head).map_err(gpu_err)?;
        self.last_bucket = Some(pi);
        let args = [
            Arg::Ptr(self.arena.ptr()),
            Arg::Ptr(self.weights.ptr()),
            Arg::Ptr(self.kv.ptr()),
        ];
        let p = &self.programs[pi];
        let stream = self.gpu.stream().clone();
        let mut out = Vec::new();
        for (i, k) in p.plan.kernels.iter().enumerate() {
            let mut times = Vec::with_capacity(reps);
            for _ in 0..reps.max(1) {
                let e0 = stream
                    .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| IrError::new(ErrorKind::Interp, format!("{e:?}")))?;
                p.launch(&self.gpu, i, &args, false, 0).map_err(gpu_err)?;
                let e1 = stream
                    .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| IrError::new(ErrorKind::Interp, format!("{e:?}")))?;
                e1.synchronize()
                    .map_err(|e| IrError::new(ErrorKind::Interp, format!("{e:?}")))?;
                times.push(
                    e0.elapsed_ms(&e1)
                        .map_err(|e| IrError::new(ErrorKind::Interp, format!("{e:?}")))?,
                );
            }
            times.sort_by(f32::total_cmp);
            out.push((k.name.clone(), times[times.len() / 2]));
        }
        Ok(out)
    }
}
