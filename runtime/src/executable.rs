//! One forward graph with its weights and KV caches, ready to run.

use std::collections::BTreeMap;

use tilefuse_ir::interp::{self, Caches, Tensor};

use crate::cuda_exec::{DeviceRange, Feed, GpuExecutable, LaunchMode};
use crate::gpu::Gpu;
use tilefuse_ir::{Bindings, ErrorKind, Graph, InputKind, IrError, Result};

/// Where an executable runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The reference interpreter on the CPU.
    Cpu,
    /// Generated kernels on the GPU.
    Cuda(LaunchMode),
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Cpu => "cpu",
            Backend::Cuda(LaunchMode::Stream) => "cuda (stream)",
            Backend::Cuda(LaunchMode::Graph) => "cuda (graph)",
            Backend::Cuda(LaunchMode::Persistent) => "cuda (persistent)",
        })
    }
}

/// Buckets of `T` compiled by default: decoding, draft blocks of 4, 8 and 16,
/// and prefill chunks up to the graph's limit.
pub const DEFAULT_BUCKETS: [usize; 5] = [1, 4, 8, 16, 64];

/// A forward graph with its weights (uploaded once) and KV caches (kept
/// between calls). The caches hold whatever earlier calls wrote; a call with
/// `S = n` treats positions `0..n` as valid, so rolling back is binding a
/// smaller `S` next time.
#[derive(Debug)]
pub struct Executable {
    graph: Graph,
    backend: Backend,
    /// Weights and, during a call, the activation inputs, by name (CPU).
    values: BTreeMap<String, Tensor>,
    caches: Caches,
    gpu: Option<GpuExecutable>,
}

impl Executable {
    /// Prepares `graph` with `weights` on `backend`. Every weight input of the
    /// graph must be present with its declared dtype and shape.
    pub fn new(
        graph: Graph,
        weights: BTreeMap<String, Tensor>,
        backend: Backend,
    ) -> Result<Executable> {
        Executable::build(graph, weights, backend, None)
    }

    /// Like [`Executable::new`] on the backend of `other`, and on the GPU on
    /// its device and stream, so that work of the two is ordered without
    /// host synchronisation and one may read the other's outputs in place
    /// (as speculative decoding's draft and target do).
    pub fn new_beside(
        graph: Graph,
        weights: BTreeMap<String, Tensor>,
        other: &Executable,
    ) -> Result<Executable> {
        let gpu = other.gpu.as_ref().map(|g| g.gpu().clone());
        Executable::build(graph, weights, other.backend, gpu)
    }

    fn build(
        graph: Graph,
        weights: BTreeMap<String, Tensor>,
        backend: Backend,
        gpu: Option<Gpu>,
    ) -> Result<Executable> {
        graph.verify()?;
        let none = Bindings::new();
        for id in graph.inputs_of_kind(InputKind::Weight) {
            let n = graph.node(id);
            let w = weights.get(&n.name).ok_or_else(|| {
                IrError::new(
                    ErrorKind::Interp,
                    format!("weight \"{}\" ({}) is missing", n.name, n.ty),
                )
            })?;
            let want = n.ty.shape.eval(&none).map_err(|m| {
                IrError::new(ErrorKind::Type, format!("weight \"{}\": {m}", n.name))
            })?;
            if w.dtype != n.ty.dtype || w.shape != want {
                return Err(IrError::new(
                    ErrorKind::Interp,
                    format!(
                        "weight \"{}\": expected {} {:?}, found {} {:?}",
                        n.name, n.ty.dtype, want, w.dtype, w.shape
                    ),
                ));
            }
        }
        match backend {
            Backend::Cpu => {
                let caches = Caches::for_graph(&graph, &none)?;
                Ok(Executable {
                    graph,
                    backend,
                    values: weights,
                    caches,
                    gpu: None,
                })
            }
            Backend::Cuda(mode) => {
                let gpu = match gpu {
                    Some(g) => g,
                    None => Gpu::open()
                        .map_err(|e| IrError::new(ErrorKind::Interp, e.to_string()))?
                        .ok_or_else(|| {
                            IrError::new(
                                ErrorKind::Interp,
                                "no CUDA GPU found (no driver library or no device); use --backend cpu",
                            )
                        })?,
                };
                let max = max_tokens(&graph);
                let buckets: Vec<usize> = DEFAULT_BUCKETS.iter().map(|&b| b.min(max)).collect();
                let exe = GpuExecutable::new(gpu, &graph, &weights, &buckets, mode)?;
                Ok(Executable {
                    graph,
                    backend,
                    values: BTreeMap::new(),
                    caches: Caches::default(),
                    gpu: Some(exe),
                })
            }
        }
    }

    /// An executable over a GPU executable already built for `graph` (e.g.
    /// with random weights made on the GPU, for benchmarks at real widths).
    pub fn from_gpu(graph: Graph, exe: GpuExecutable) -> Executable {
        let backend = Backend::Cuda(exe.mode);
        Executable {
            graph,
            backend,
            values: BTreeMap::new(),
            caches: Caches::default(),
            gpu: Some(exe),
        }
    }

    /// The largest value symbol `sym` may take, where the backend sized
    /// buffers for one (the GPU); `None` when any value runs.
    pub fn symbol_bound(&self, sym: &str) -> Option<usize> {
        self.gpu.as_ref().and_then(|g| g.symbol_bound(sym))
    }

    /// The graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs one forward with the symbols bound and the activation inputs given
    /// by name; returns the named outputs.
    pub fn run(
        &mut self,
        bindings: &Bindings,
        inputs: BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>> {
        self.run_outputs(bindings, inputs, None)
    }

    /// [`Executable::run`] returning only the outputs named in `wanted` (all
    /// when `None`); on the GPU the others are not copied back.
    pub fn run_outputs(
        &mut self,
        bindings: &Bindings,
        inputs: BTreeMap<String, Tensor>,
        wanted: Option<&[&str]>,
    ) -> Result<BTreeMap<String, Tensor>> {
        check_ring_rows(&self.graph, bindings)?;
        if let Some(g) = &mut self.gpu {
            return g.run_outputs(bindings, &inputs, wanted);
        }
        let names: Vec<String> = inputs.keys().cloned().collect();
        for (k, v) in inputs {
            if self.graph.find_input(&k).is_none() {
                return Err(IrError::new(
                    ErrorKind::Interp,
                    format!(
                        "the graph \"{}\" has no input named \"{k}\"",
                        self.graph.name
                    ),
                ));
            }
            self.values.insert(k, v);
        }
        let r = interp::run(&self.graph, bindings, &self.values, &mut self.caches);
        for k in names {
            self.values.remove(&k);
        }
        let mut r = r?;
        if let Some(w) = wanted {
            r.retain(|k, _| w.contains(&k.as_str()));
        }
        Ok(r)
    }
}

/// The most rows one forward of `graph` may append to a cache: the largest
/// bucket, or less where a sliding-window ring of `cap` slots and window `w`
/// allows only `cap + 1 − w`.
pub fn max_tokens(graph: &Graph) -> usize {
    use tilefuse_ir::{Attn, Mask, Op};
    let mut max = *DEFAULT_BUCKETS.last().unwrap_or(&1);
    for n in graph.topo_order().unwrap_or_default() {
        let Op::Attn(Attn::Attention { mask, .. }) = graph.node(n).op else {
            continue;
        };
        let (Mask::Causal { window: Some(w) } | Mask::Block { window: Some(w) }) = mask else {
            continue;
        };
        let keys = graph.inputs(n)[1];
        if let Op::Attn(Attn::KvAppend { ring: true, .. }) = graph.node(keys).op {
            let cache = graph.inputs(keys)[0];
            if let Some(cap) = graph
                .node(cache)
                .ty
                .dims()
                .first()
                .and_then(|d| d.as_const())
            {
                max = max.min((cap + 1).saturating_sub(w as usize).max(1));
            }
        }
    }
    max
}

impl Executable {
    /// The GPU executable, when running on the GPU.
    pub fn gpu(&mut self) -> Option<&mut GpuExecutable> {
        self.gpu.as_mut()
    }

    /// The GPU executable, when running on the GPU (shared).
    pub fn gpu_ref(&self) -> Option<&GpuExecutable> {
        self.gpu.as_ref()
    }

    /// On the GPU: issues one forward without waiting for it, with inputs
    /// from the host and from device ranges ([`GpuExecutable::enqueue`]);
    /// its outputs stay on the device ([`Executable::value_range`]). An
    /// error on the CPU.
    pub fn enqueue(
        &mut self,
        bindings: &Bindings,
        inputs: &BTreeMap<String, Tensor>,
        feeds: &[Feed<'_>],
    ) -> Result<()> {
        check_ring_rows(&self.graph, bindings)?;
        match &mut self.gpu {
            Some(g) => g.enqueue(bindings, inputs, feeds),
            None => Err(IrError::new(
                ErrorKind::Interp,
                format!(
                    "graph \"{}\" runs on the CPU: only GPU forwards can be enqueued",
                    self.graph.name
                ),
            )),
        }
    }

    /// On the GPU: where input or output `name` of the forward with
    /// `bindings` lives on the device. An error on the CPU.
    pub fn value_range(&self, bindings: &Bindings, name: &str) -> Result<DeviceRange> {
        match &self.gpu {
            Some(g) => g.value_range(bindings, name),
            None => Err(IrError::new(
                ErrorKind::Interp,
                format!(
                    "graph \"{}\" runs on the CPU: its values are not on a GPU",
                    self.graph.name
                ),
            )),
        }
    }
}

/// Refuses a forward that appends more rows to a sliding-window ring of `cap`
/// slots and window `w` than `cap + 1 − w`: its own rows would overwrite
/// keys its queries still need (and, past `cap`, each other).
fn check_ring_rows(graph: &Graph, bindings: &Bindings) -> Result<()> {
    use tilefuse_ir::{Attn, Mask, Op};
    for n in graph.topo_order()? {
        let Op::Attn(Attn::Attention { mask, .. }) = graph.node(n).op else {
            continue;
        };
        let (Mask::Causal { window: Some(w) } | Mask::Block { window: Some(w) }) = mask else {
            continue;
        };
        let keys = graph.inputs(n)[1];
        let Op::Attn(Attn::KvAppend { ring: true, .. }) = graph.node(keys).op else {
            continue;
        };
        let cache = graph.node(graph.inputs(keys)[0]);
        let new = graph.node(graph.inputs(keys)[1]);
        let (Some(cap), Some(rows)) = (
            cache.ty.dims().first().and_then(|d| d.as_const()),
            new.ty.dims().first().and_then(|d| d.eval(bindings).ok()),
        ) else {
            continue;
        };
        let most = (cap + 1).saturating_sub(w as usize);
        if rows > most {
            return Err(IrError::new(
                ErrorKind::Interp,
                format!(
                    "a forward of graph \"{}\" appends {rows} rows to the sliding-window cache \"{}\" \
                     ({cap} slots, window {w}), which holds at most {most} new rows per forward; \
                     split the forward",
                    graph.name, cache.name
                ),
            ));
        }
    }
    Ok(())
}
