//! The CPU reference interpreter: the oracle every GPU kernel, fusion and
//! rewrite of tilefuse is tested against.
//!
//! # The rounding rule
//!
//! Every node is computed in f32 from its inputs' values, with dot products
//! and sums accumulated in f64 (so they are near-exact), and its output is
//! then **rounded once to the node's dtype** with [`round_to`]. Activation
//! inputs are rounded to their declared dtype on entry; float weights are
//! rounded to theirs; FP4 weights are dequantized (once per run) as they are
//! read. Ops whose reference implementation rounds in the middle say so
//! (RMSNorm, RoPE's cos/sin, attention probabilities, the expert FFN).
//!
//! # Poison
//!
//! KV caches start filled with NaN ([`Caches::for_graph`]) and rows evicted
//! from a ring read as NaN, so a kernel that reads a slot it must not read
//! shows a NaN in its result; the interpreter itself never reads a key an
//! attention mask hides.
//!
//! # Semantics per op
//!
//! The contract is the doc comment of each [`Op`] variant; the details a
//! bit-exact kernel needs (where rounding happens, tie-breaking, accumulation
//! order) are these:
//!
//! - `ew`: unary math in f32 (`sigmoid = 1/(1+exp(-x))`, `silu = x·sigmoid(x)`,
//!   `rsqrt = 1/sqrt(x)`, `recip = 1/x`); binary math with numpy broadcasting
//!   over trailing axes via [`crate::op::BinaryOp::apply`] (so `max`/`min`
//!   follow `f32::max`/`f32::min`, which ignore a NaN operand); `x op c`
//!   likewise. Casts round to nearest even; float→i32 truncates toward zero
//!   (saturating, NaN→0); i32→float rounds the exact integer once.
//! - `reduce`: sum and mean accumulate in f64; max propagates NaN (as
//!   `torch.amax`). The axis is kept with size 1.
//! - `view`: row-major reshape, permute (output axis `i` is input axis
//!   `perm[i]`), slice (an error if out of range once bound), concat in input
//!   order; pure data movement.
//! - `nn.embedding`: rows of the table, rounded to the output dtype (bf16 for
//!   f8 tables); an id outside `0..V` is an error.
//! - `nn.rms_norm` (Hugging Face): per row of the last axis, `ms = mean(x²)`
//!   (f64 sum, then f32), `n = x · (1/sqrt(ms + eps))` in f32, **`n` rounded to
//!   x's dtype**, then `w · n` rounded to the output dtype.
//! - `nn.matmul`: `y[.., n] = Σₖ x[.., k] · w[n, k]` in f64, FP4 weights
//!   dequantized, rounded once to `out`.
//! - `nn.rope` (Hugging Face rotate-half): with `r = rot_dims`,
//!   `inv_freq[i] = 1 / theta.powf(2i / r)` and `angle = pos · inv_freq[i]`,
//!   both in f32; `cos`/`sin` of the f32 angle computed in f64, rounded to f32,
//!   **then to x's dtype**; for `j < r/2`:
//!   `out[j] = x[j]·cos_j − x[j+r/2]·sin_j`, `out[j+r/2] = x[j+r/2]·cos_j + x[j]·sin_j`
//!   in f32, rounded; dims `r..head_dim` pass through.
//! - `attn.kv_append`: position `len + t` goes to slot `(len + t) % cap`; a
//!   non-ring cache refuses `len + T > cap` (and is left untouched). The
//!   output row `j` of `0..len+T` is slot `j % cap` when `j + cap >= len + T`,
//!   else NaN (evicted). Writing at a smaller `len` overwrites (rollback).
//! - `attn.attention`: query `i` at `p = L − T + i`, query head `h` reads kv
//!   head `h / (hq/hkv)`; visible keys per [`Mask`]. Score
//!   `s_j = (Σ q·k in f64, as f32) · scale` in f32. Softmax in f32 over the
//!   visible scores plus the head's sink logit if any: `m = max`,
//!   `e_j = exp(s_j − m)`, `Σe` in f64 (sink included) then f32,
//!   `p_j = e_j / Σe` **rounded to q's dtype**, the sink's probability dropped;
//!   `out = Σ p_j v_j` in f64, rounded. A query with no visible key and no
//!   sink outputs 0. Hidden keys are never read.
//! - `moe.router_select`: scores `sigmoid(l)` or `softmax(l)` (f32, `exp(l −
//!   max)`, sum in f64) plus the bias; with `n_group > 1` a group's score is the
//!   f32 sum of its two largest choice values, the `topk_group` best groups
//!   are kept (ties to the lower group) and the other experts' choice values
//!   become **`-inf`** (the reference `masked_fill`); then the `top_k` largest,
//!   in descending order, ties to the lower expert index. NaN sorts first.
//! - `moe.router_weights`: `w_j = score[idx_j]` (no bias); with `norm`,
//!   `w_j / (Σw (f64, then f32) + norm_eps)`; then `· scale`; all f32.
//! - `moe.experts`: per token and slot (expert `e`): `g = gate_e·x`,
//!   `u = up_e·x` (f64, each rounded to x's dtype), `h = silu(g)·u` in f32
//!   rounded to x's dtype, `y = down_e·h` (f64, then f32, not rounded);
//!   `out = Σⱼ w[t,j]·y` accumulated in f32 in slot order from 0, rounded once.
//!   A slot with index `-1` (another rank's expert) is skipped.
//! - `moe.local_index`: `e − first` for `first ≤ e < first + count`, else −1.
//! - `sample.argmax`: the first index of the maximum (NaN counts as the
//!   maximum, as `torch.argmax`).
//! - `sample.sample`: row `t` draws `u = uniform(seed, counter + t)` (see
//!   [`uniform`]); `e_i = exp((l_i − max) / temperature)` in f32, `total = Σ e_i`
//!   in f32 in index order; the token is the first `i` whose f32 running sum
//!   exceeds `u · total`, else (rounding) the last `i` with `e_i > 0`.
//! - `comm.all_reduce`, `comm.all_gather`: the identity over one rank in
//!   [`run`]; across simulated ranks, [`run_ranks`] sums in f32 in rank order
//!   and rounds once to the dtype (all-reduce) or joins the parts in rank
//!   order (all-gather, exact).

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::dtype::DType;
use crate::error::{ErrorKind, IrError, Result};
use crate::fp4::{self, Fp4Tensor};
use crate::graph::{Graph, NodeId};
use crate::op::{
    Attn, Comm, Elementwise, InputKind, Mask, Moe, Nn, Op, ReduceKind, Sample, ScoreFn, UnaryOp,
    View,
};
use crate::shape::{Bindings, Shape};

/// A concrete tensor value.
///
/// Invariants (checked by the constructors, and again by [`run`] for tensors
/// built field by field): `data` holds `shape.iter().product()` elements;
/// float dtypes (f32, f16, bf16, f8e4m3) hold [`Data::F32`] values that are
/// representable in the dtype, `i32` holds [`Data::I32`], MXFP4/NVFP4 hold
/// [`Data::Fp4`] of the matching format.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Concrete shape.
    pub shape: Vec<usize>,
    /// The elements, row-major.
    pub data: Data,
}

/// The storage of a [`Tensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// Float values (any float dtype), each representable in the tensor's dtype.
    F32(Vec<f32>),
    /// Integers.
    I32(Vec<i32>),
    /// Block-quantized FP4 codes and scales.
    Fp4(Fp4Tensor),
}

impl Tensor {
    /// A float tensor of `dtype` (f32, f16, bf16 or f8e4m3); the values are
    /// rounded to the dtype (nearest even). Errors if `data` does not hold
    /// `shape`'s element count or the dtype is not a float dtype.
    pub fn f32(dtype: DType, shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        if !dtype.is_float() {
            return Err(interp_err(format!(
                "Tensor::f32 needs a float dtype (f32, f16, bf16, f8e4m3), found {dtype}; \
                 use Tensor::i32 or Tensor::fp4"
            )));
        }
        check_len(shape, data.len())?;
        let data = if dtype == DType::F32 {
            data
        } else {
            data.into_iter().map(|v| round_to(dtype, v)).collect()
        };
        Ok(Tensor {
            dtype,
            shape: shape.to_vec(),
            data: Data::F32(data),
        })
    }

    /// An i32 tensor. Errors if `data` does not hold `shape`'s element count.
    pub fn i32(shape: &[usize], data: Vec<i32>) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Ok(Tensor {
            dtype: DType::I32,
            shape: shape.to_vec(),
            data: Data::I32(data),
        })
    }

    /// A block-quantized tensor; its dtype (MXFP4 or NVFP4) is `q.format`'s.
    /// Errors if the codes and scales do not fit `shape` (two codes per byte,
    /// one scale per block along a last axis that is a multiple of the block).
    pub fn fp4(shape: &[usize], q: Fp4Tensor) -> Result<Tensor> {
        let dtype = q.format.dtype();
        check_fp4(dtype, shape, &q).map_err(interp_err)?;
        Ok(Tensor {
            dtype,
            shape: shape.to_vec(),
            data: Data::Fp4(q),
        })
    }

    /// Number of elements (the product of the shape).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as f32: floats as stored, integers converted, FP4 dequantized.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(v) => v.clone(),
            Data::I32(v) => v.iter().map(|&i| i as f32).collect(),
            Data::Fp4(q) => q.dequantize(),
        }
    }

    /// The integers of an i32 tensor; `None` for other storage.
    pub fn as_i32(&self) -> Option<&[i32]> {
        match &self.data {
            Data::I32(v) => Some(v),
            _ => None,
        }
    }
}

/// Mutable state kept between calls of [`run`]: the KV caches, by the name
/// of the graph's cache input.
///
/// Each cache is a float [`Tensor`] `[capacity, kv_heads, head_dim]` whose
/// rows are written by `attn.kv_append`; slots never written hold NaN.
#[derive(Clone, Debug, Default)]
pub struct Caches {
    map: BTreeMap<String, Tensor>,
}

impl Caches {
    /// Allocates every cache input of `graph` with its shape under
    /// `bindings`, filled with NaN (poison: a read of an unwritten slot shows
    /// up as NaN in the result).
    pub fn for_graph(graph: &Graph, bindings: &Bindings) -> Result<Caches> {
        let mut map = BTreeMap::new();
        for id in graph.topo_order()? {
            let node = graph.node(id);
            if node.op != Op::Input(InputKind::Cache) {
                continue;
            }
            if !node.ty.dtype.is_float() {
                return Err(node_err(
                    graph,
                    id,
                    format!(
                        "KV cache \"{}\" is {}; caches must have a float dtype",
                        node.name, node.ty
                    ),
                ));
            }
            let shape = node.ty.shape.eval(bindings).map_err(|m| {
                node_err(
                    graph,
                    id,
                    format!("cannot size KV cache \"{}\": {m}; bind it", node.name),
                )
            })?;
            let n = shape.iter().product();
            map.insert(
                node.name.clone(),
                Tensor {
                    dtype: node.ty.dtype,
                    shape,
                    data: Data::F32(vec![f32::NAN; n]),
                },
            );
        }
        Ok(Caches { map })
    }

    /// The cache named `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }
}

/// The counter-based uniform number used by `sample.sample`, in `[0, 1)`.
///
/// Bit-exact definition (GPU kernels reproduce it): SplitMix64's finaliser
/// applied once to the 64-bit word `seed:counter`, then its top 24 bits
/// (all arithmetic on u64, wrapping):
///
/// ```text
/// x = ((seed as u64) << 32) | (counter as u64)
/// z = x + 0x9E3779B97F4A7C15
/// z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
/// z = (z ^ (z >> 27)) * 0x94D049BB133111EB
/// z =  z ^ (z >> 31)
/// u = (z >> 40) as f32 * 2^-24       (exact in f32, so u is in [0, 1))
/// ```
///
/// Row `t` of a sampling op uses `counter + t` (wrapping u32).
pub fn uniform(seed: u32, counter: u32) -> f32 {
    let x = (u64::from(seed) << 32) | u64::from(counter);
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// Rounds an f32 to the nearest value of `dtype`, ties to even: identity for
/// f32; bf16 and f16 through `half`; f8e4m3 through [`fp4::e4m3_encode`] /
/// [`fp4::e4m3_decode`]. Non-float dtypes (i32, FP4) return `x` unchanged.
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::F8E4M3 => fp4::e4m3_decode(fp4::e4m3_encode(x)),
        DType::I32 | DType::MXFP4 | DType::NVFP4 => x,
    }
}

/// Runs `graph` once.
///
/// `values` holds every activation and weight input by name (extra entries
/// are ignored); `caches` holds the KV caches (see [`Caches::for_graph`]) and
/// is updated by every `attn.kv_append`. Returns the graph's named outputs.
///
/// Checks first: the graph verifies, every symbol is bound, every input is
/// present with its declared dtype and bound shape. Errors name the node
/// (`%7 "layer0.attn.q" (nn.matmul)`) or the input, and say what was
/// expected and what was found.
///
/// A collective (`comm.*`) over one rank is the identity; one over more
/// ranks is an error: run the ranks' graphs together with [`run_ranks`].
pub fn run(
    graph: &Graph,
    bindings: &Bindings,
    values: &BTreeMap<String, Tensor>,
    caches: &mut Caches,
) -> Result<BTreeMap<String, Tensor>> {
    let mut exec = Exec::new(graph, bindings, values)?;
    while let Some(id) = exec.advance(caches)? {
        let Op::Comm(c) = &graph.node(id).op else {
            return Err(node_err(
                graph,
                id,
                "internal: stopped at a non-collective".into(),
            ));
        };
        if c.ranks() != 1 {
            return Err(node_err(
                graph,
                id,
                format!(
                    "a collective over {} ranks cannot run in a single graph; run every rank's \
                     graph together with interp::run_ranks",
                    c.ranks()
                ),
            ));
        }
        let x = exec.arg(id)?;
        let val = Val {
            dtype: x.dtype,
            shape: x.shape.clone(),
            buf: match &x.buf {
                Buf::F(v) => Buf::F(Cow::Owned(v.to_vec())),
                Buf::I(v) => Buf::I(Cow::Owned(v.to_vec())),
            },
        };
        exec.complete(id, val)?;
    }
    exec.outputs()
}

/// Runs the graphs of `n = graphs.len()` simulated ranks in lockstep, as one
/// sharded forward (see the sharding pass in [`crate::shard`]).
///
/// Rank `r` runs `graphs[r]` on `values[r]` and `caches[r]` exactly as
/// [`run`] would, until it reaches a collective. When every rank waits at
/// a collective, the `k`-th collective of each rank's run is matched with
/// the `k`-th of every other (the NCCL rule: every rank issues the same
/// collectives in the same order); they must agree on op, rank count, dtype
/// and bound shape, and `ranks` must equal `n`. Then:
///
/// - `comm.all_reduce`: every rank receives `Σ_r x_r`, added in f32 in rank
///   order (`((x_0 + x_1) + x_2) + …`) and rounded once to the node's dtype.
///   Each `x_r` is already a value of the dtype; a GPU ring reduction in
///   bf16 may round after each step and so differ by the dtype's rounding
///   per rank.
/// - `comm.all_gather`: every rank receives the ranks' parts joined along
///   `axis` in rank order (exact).
///
/// Returns every rank's outputs. Errors name the rank and the node.
pub fn run_ranks(
    graphs: &[Graph],
    bindings: &Bindings,
    values: &[BTreeMap<String, Tensor>],
    caches: &mut [Caches],
) -> Result<Vec<BTreeMap<String, Tensor>>> {
    let n = graphs.len();
    if n == 0 || values.len() != n || caches.len() != n {
        return Err(interp_err(format!(
            "run_ranks needs one graph, one values map and one Caches per rank; found {n} \
             graphs, {} values maps and {} caches",
            values.len(),
            caches.len()
        )));
    }
    let rank_err = |r: usize, e: IrError| IrError {
        message: format!("rank {r} of {n}: {}", e.message),
        ..e
    };
    let mut execs = Vec::with_capacity(n);
    for (r, (g, v)) in graphs.iter().zip(values).enumerate() {
        execs.push(Exec::new(g, bindings, v).map_err(|e| rank_err(r, e))?);
    }
    for step in 0.. {
        let mut stops = Vec::with_capacity(n);
        for (r, (e, c)) in execs.iter_mut().zip(caches.iter_mut()).enumerate() {
            stops.push(e.advance(c).map_err(|e| rank_err(r, e))?);
        }
        let ids: Vec<NodeId> = match stops.iter().copied().collect::<Option<Vec<_>>>() {
            Some(ids) => ids,
            None if stops.iter().all(Option::is_none) => break,
            None => {
                let (r, id) = stops
                    .iter()
                    .enumerate()
                    .find_map(|(r, s)| s.map(|id| (r, id)))
                    .ok_or_else(|| interp_err("internal: no rank stopped".into()))?;
                let done = stops.iter().position(Option::is_none).unwrap_or(0);
                return Err(rank_err(
                    r,
                    node_err(
                        &graphs[r],
                        id,
                        format!(
                            "waits at collective #{step} but rank {done} finished its graph \
                             without it; every rank must issue the same collectives in the same order"
                        ),
                    ),
                ));
            }
        };
        let node0 = graphs[0].node(ids[0]);
        let x0 = execs[0].arg(ids[0])?;
        for r in 0..n {
            let node = graphs[r].node(ids[r]);
            let x = execs[r].arg(ids[r])?;
            let mismatch = if node.op != node0.op {
                Some(format!(
                    "{} here, {} on rank 0",
                    node.op.mnemonic(),
                    node0.op.mnemonic()
                ))
            } else if x.dtype != x0.dtype || x.shape != x0.shape {
                Some(format!(
                    "input {}{} here, {}{} on rank 0",
                    x.dtype,
                    fmt_shape(&x.shape),
                    x0.dtype,
                    fmt_shape(&x0.shape)
                ))
            } else {
                None
            };
            if let Some(m) = mismatch {
                return Err(rank_err(
                    r,
                    node_err(
                        &graphs[r],
                        ids[r],
                        format!(
                            "collective #{step} does not match rank 0's ({}): {m}",
                            graphs[0].describe(ids[0])
                        ),
                    ),
                ));
            }
        }
        let Op::Comm(comm) = &node0.op else {
            return Err(interp_err("internal: stopped at a non-collective".into()));
        };
        if comm.ranks() != n {
            return Err(node_err(
                &graphs[0],
                ids[0],
                format!(
                    "the collective is over {} ranks but {n} ranks run",
                    comm.ranks()
                ),
            ));
        }
        let (dtype, shape) = (node0.ty.dtype, x0.shape.clone());
        let parts: Vec<&Val<'_>> = execs
            .iter()
            .zip(&ids)
            .map(|(e, &id)| e.arg(id))
            .collect::<Result<_>>()?;
        let (out_shape, buf) = match comm {
            Comm::AllReduce { .. } => {
                let mut acc = parts[0].f("all-reduce input").map_err(interp_err)?.to_vec();
                for p in &parts[1..] {
                    for (a, &v) in acc
                        .iter_mut()
                        .zip(p.f("all-reduce input").map_err(interp_err)?)
                    {
                        *a += v;
                    }
                }
                acc.iter_mut().for_each(|a| *a = round_to(dtype, *a));
                (shape, Buf::F(Cow::Owned(acc)))
            }
            Comm::AllGather { axis, .. } => {
                let (outer, d, inner) = split_axis(&shape, *axis);
                let mut out_shape = shape.clone();
                out_shape[*axis] = d * n;
                let chunk = d * inner;
                let buf = match &parts[0].buf {
                    Buf::F(_) => {
                        let srcs: Vec<&[f32]> = parts
                            .iter()
                            .map(|p| p.f("all-gather input"))
                            .collect::<Result<_, _>>()
                            .map_err(interp_err)?;
                        Buf::F(Cow::Owned(gather_chunks(&srcs, outer, chunk)))
                    }
                    Buf::I(_) => {
                        let srcs: Vec<&[i32]> = parts
                            .iter()
                            .map(|p| p.i("all-gather input"))
                            .collect::<Result<_, _>>()
                            .map_err(interp_err)?;
                        Buf::I(Cow::Owned(gather_chunks(&srcs, outer, chunk)))
                    }
                };
                (out_shape, buf)
            }
        };
        for (r, e) in execs.iter_mut().enumerate() {
            let buf = match &buf {
                Buf::F(v) => Buf::F(Cow::Owned(v.to_vec())),
                Buf::I(v) => Buf::I(Cow::Owned(v.to_vec())),
            };
            let val = Val {
                dtype,
                shape: out_shape.clone(),
                buf,
            };
            e.complete(ids[r], val).map_err(|e| rank_err(r, e))?;
        }
    }
    execs
        .into_iter()
        .enumerate()
        .map(|(r, e)| e.outputs().map_err(|e| rank_err(r, e)))
        .collect()
}

/// One run of a graph in progress: nodes are evaluated in topological order
/// until the next collective, which the caller (one rank or all ranks)
/// completes with [`Exec::complete`].
struct Exec<'a> {
    graph: &'a Graph,
    bindings: &'a Bindings,
    values: &'a BTreeMap<String, Tensor>,
    order: Vec<NodeId>,
    next: usize,
    /// Remaining reads of each value (one per input slot); a value is
    /// dropped after its last read unless it is an output, so dequantized
    /// weights and activations of finished layers do not pile up.
    reads: BTreeMap<NodeId, usize>,
    vals: BTreeMap<NodeId, Val<'a>>,
}

impl<'a> Exec<'a> {
    fn new(
        graph: &'a Graph,
        bindings: &'a Bindings,
        values: &'a BTreeMap<String, Tensor>,
    ) -> Result<Exec<'a>> {
        graph.verify()?;
        let order = graph.topo_order()?;
        let mut reads: BTreeMap<NodeId, usize> = BTreeMap::new();
        for &id in &order {
            for i in graph.inputs(id) {
                *reads.entry(i).or_insert(0) += 1;
            }
        }
        Ok(Exec {
            graph,
            bindings,
            values,
            order,
            next: 0,
            reads,
            vals: BTreeMap::new(),
        })
    }

    /// The bound shape of a node.
    fn shape(&self, id: NodeId) -> Result<Vec<usize>> {
        let node = self.graph.node(id);
        node.ty.shape.eval(self.bindings).map_err(|m| {
            node_err(
                self.graph,
                id,
                format!(
                    "its type {} cannot be sized: {m}; bind every symbol in the Bindings passed to run",
                    node.ty
                ),
            )
        })
    }

    /// Evaluates nodes up to the next collective and returns it (not yet
    /// evaluated), or `None` at the end of the graph.
    fn advance(&mut self, caches: &mut Caches) -> Result<Option<NodeId>> {
        let graph = self.graph;
        while let Some(&id) = self.order.get(self.next) {
            let node = graph.node(id);
            if let Op::Comm(_) = node.op {
                return Ok(Some(id));
            }
            let shape = self.shape(id)?;
            let val = match &node.op {
                Op::Input(kind) => {
                    load_input(graph, id, *kind, &shape, self.bindings, self.values, caches)?
                }
                op => {
                    let ins = graph.inputs(id);
                    let mut args = Vec::with_capacity(ins.len());
                    for i in &ins {
                        args.push(self.vals.get(i).ok_or_else(|| {
                            node_err(
                                graph,
                                id,
                                "internal: an input was not evaluated first".into(),
                            )
                        })?);
                    }
                    let buf = eval(graph, id, op, &args, &shape, self.bindings, caches)
                        .map_err(|m| node_err(graph, id, m))?;
                    Val {
                        dtype: node.ty.dtype,
                        shape,
                        buf,
                    }
                }
            };
            self.complete(id, val)?;
        }
        Ok(None)
    }

    /// The value of the single input of `id` (a collective).
    fn arg(&self, id: NodeId) -> Result<&Val<'a>> {
        self.graph
            .inputs(id)
            .first()
            .and_then(|i| self.vals.get(i))
            .ok_or_else(|| {
                node_err(
                    self.graph,
                    id,
                    "internal: the input was not evaluated first".into(),
                )
            })
    }

    /// Records the value of the next node `id` and moves past it.
    fn complete(&mut self, id: NodeId, val: Val<'a>) -> Result<()> {
        let graph = self.graph;
        if self.order.get(self.next) != Some(&id) {
            return Err(node_err(
                graph,
                id,
                "internal: nodes completed out of order".into(),
            ));
        }
        let shape = self.shape(id)?;
        // Invariant: every value holds its bound shape's element count, so the
        // indexing in the ops below (shapes checked by the verifier) is in range.
        if val.shape != shape || (!val.placeholder() && val.buf.len() != shape.iter().product()) {
            return Err(node_err(
                graph,
                id,
                format!(
                    "internal: computed {} values of shape {} for {} = {}",
                    val.buf.len(),
                    fmt_shape(&val.shape),
                    graph.node(id).ty,
                    fmt_shape(&shape)
                ),
            ));
        }
        self.vals.insert(id, val);
        self.next += 1;
        let is_output = |id: NodeId| graph.outputs().iter().any(|(_, o)| *o == id);
        for i in graph.inputs(id) {
            if let Some(n) = self.reads.get_mut(&i) {
                *n -= 1;
                if *n == 0 && !is_output(i) {
                    self.vals.remove(&i);
                }
            }
        }
        Ok(())
    }

    /// The graph's named outputs, once every node is evaluated.
    fn outputs(self) -> Result<BTreeMap<String, Tensor>> {
        let (graph, values, vals) = (self.graph, self.values, self.vals);
        let mut out = BTreeMap::new();
        for (name, id) in graph.outputs() {
            let node = graph.node(*id);
            let v = vals
                .get(id)
                .ok_or_else(|| node_err(graph, *id, "internal: output not evaluated".into()))?;
            let t = match (&node.op, &v.buf) {
                // FP4 weights are returned as given, not as their dequantized values.
                (Op::Input(InputKind::Weight), _) if node.ty.dtype.is_block_quantized() => values
                    .get(&node.name)
                    .cloned()
                    .ok_or_else(|| node_err(graph, *id, "internal: weight vanished".into()))?,
                _ if node.ty.dtype.is_block_quantized() => {
                    return Err(node_err(
                        graph,
                        *id,
                        format!(
                            "output \"{name}\" is a view of {} weights; the interpreter returns \
                             computed values only as float or i32 (read them with nn.matmul or moe.experts)",
                            node.ty.dtype
                        ),
                    ))
                }
                (_, Buf::F(d)) => Tensor {
                    dtype: node.ty.dtype,
                    shape: v.shape.clone(),
                    data: Data::F32(d.to_vec()),
                },
                (_, Buf::I(d)) => Tensor {
                    dtype: node.ty.dtype,
                    shape: v.shape.clone(),
                    data: Data::I32(d.to_vec()),
                },
            };
            out.insert(name.clone(), t);
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// Values and errors.

/// Element storage of an intermediate value; weights and inputs borrow from
/// the caller's map when they need no rounding.
#[derive(Debug)]
enum Buf<'a> {
    F(Cow<'a, [f32]>),
    I(Cow<'a, [i32]>),
}

impl Buf<'_> {
    fn len(&self) -> usize {
        match self {
            Buf::F(v) => v.len(),
            Buf::I(v) => v.len(),
        }
    }
}

/// An evaluated node. A cache input that only feeds `attn.kv_append` (which
/// reads the cache from [`Caches`]) has an empty placeholder buffer.
#[derive(Debug)]
struct Val<'a> {
    dtype: DType,
    shape: Vec<usize>,
    buf: Buf<'a>,
}

impl Val<'_> {
    fn placeholder(&self) -> bool {
        matches!(&self.buf, Buf::F(Cow::Borrowed(s)) if s.is_empty())
            && self.shape.iter().product::<usize>() != 0
    }

    fn f(&self, what: &str) -> Result<&[f32], String> {
        match &self.buf {
            Buf::F(v) => Ok(v),
            Buf::I(_) => Err(format!("internal: {what} should hold float values")),
        }
    }

    fn i(&self, what: &str) -> Result<&[i32], String> {
        match &self.buf {
            Buf::I(v) => Ok(v),
            Buf::F(_) => Err(format!("internal: {what} should hold i32 values")),
        }
    }
}

fn interp_err(msg: String) -> IrError {
    IrError::new(ErrorKind::Interp, msg)
}

fn node_err(graph: &Graph, id: NodeId, msg: String) -> IrError {
    IrError::new(ErrorKind::Interp, msg).at(graph.describe(id))
}

fn fmt_shape(s: &[usize]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(","))
}

/// `with T=2, S=5` for the symbols of `shape`, or nothing.
fn fmt_bindings(shape: &Shape, bindings: &Bindings) -> String {
    let mut syms: Vec<&str> = shape.symbols().collect();
    syms.sort_unstable();
    syms.dedup();
    let parts: Vec<String> = syms
        .iter()
        .map(|s| match bindings.get(s) {
            Some(v) => format!("{s}={v}"),
            None => format!("{s} unbound"),
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" with {}", parts.join(", "))
    }
}

fn check_len(shape: &[usize], len: usize) -> Result<()> {
    let n: usize = shape.iter().product();
    if n == len {
        Ok(())
    } else {
        Err(interp_err(format!(
            "shape {} holds {n} elements but {len} values were given",
            fmt_shape(shape)
        )))
    }
}

/// Checks that FP4 codes and scales fit a tensor of `shape`.
fn check_fp4(dtype: DType, shape: &[usize], q: &Fp4Tensor) -> Result<(), String> {
    let block = dtype
        .block_size()
        .ok_or_else(|| format!("{dtype} is not block-quantized"))?;
    let numel: usize = shape.iter().product();
    let last = shape.last().copied().unwrap_or(1);
    if last % block != 0 {
        return Err(format!(
            "{dtype} needs the last axis to be a multiple of {block}, found shape {}",
            fmt_shape(shape)
        ));
    }
    if q.codes.len() * 2 != numel {
        return Err(format!(
            "{dtype} shape {} needs {} code bytes (two codes per byte), found {}",
            fmt_shape(shape),
            numel / 2,
            q.codes.len()
        ));
    }
    if q.scales.len() != numel / block {
        return Err(format!(
            "{dtype} shape {} needs {} scales (one per {block} elements), found {}",
            fmt_shape(shape),
            numel / block,
            q.scales.len()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Inputs.

/// Whether a cache input's value is read other than as `kv_append`'s cache
/// (then it is snapshotted at the start of the run).
fn cache_value_needed(graph: &Graph, id: NodeId) -> bool {
    if graph.outputs().iter().any(|(_, o)| *o == id) {
        return true;
    }
    graph.users(id).into_iter().any(|u| {
        let ins = graph.inputs(u);
        !(matches!(graph.node(u).op, Op::Attn(Attn::KvAppend { .. }))
            && ins.first() == Some(&id)
            && ins.get(1) != Some(&id))
    })
}

fn load_input<'a>(
    graph: &Graph,
    id: NodeId,
    kind: InputKind,
    shape: &[usize],
    bindings: &Bindings,
    values: &'a BTreeMap<String, Tensor>,
    caches: &Caches,
) -> Result<Val<'a>> {
    let node = graph.node(id);
    let name = &node.name;
    let declared = || {
        format!(
            "{} = {}{}",
            node.ty,
            fmt_shape(shape),
            fmt_bindings(&node.ty.shape, bindings)
        )
    };
    let err = |m: String| node_err(graph, id, m);
    if kind == InputKind::Cache {
        let t = caches.get(name).ok_or_else(|| {
            err(format!(
                "KV cache \"{name}\" is missing from the caches; create them with \
                 Caches::for_graph (the graph declares {})",
                declared()
            ))
        })?;
        if t.dtype != node.ty.dtype || t.shape != shape {
            return Err(err(format!(
                "KV cache \"{name}\" is {}{} but the graph declares {}; \
                 recreate the caches with Caches::for_graph for these bindings",
                t.dtype,
                fmt_shape(&t.shape),
                declared()
            )));
        }
        let buf = if cache_value_needed(graph, id) {
            match &t.data {
                Data::F32(v) => Buf::F(Cow::Owned(v.clone())),
                _ => return Err(err(format!("KV cache \"{name}\" must hold f32 storage"))),
            }
        } else {
            Buf::F(Cow::Borrowed(&[]))
        };
        return Ok(Val {
            dtype: node.ty.dtype,
            shape: shape.to_vec(),
            buf,
        });
    }
    let what = if kind == InputKind::Weight {
        "weight"
    } else {
        "input"
    };
    let t = values.get(name).ok_or_else(|| {
        err(format!(
            "missing {what} \"{name}\": the graph declares {}; add it to the values map",
            declared()
        ))
    })?;
    if t.dtype != node.ty.dtype {
        return Err(err(format!(
            "{what} \"{name}\" has dtype {} but the graph declares {}",
            t.dtype,
            declared()
        )));
    }
    if t.shape != shape {
        return Err(err(format!(
            "{what} \"{name}\" has shape {} but the graph declares {}",
            fmt_shape(&t.shape),
            declared()
        )));
    }
    let n: usize = shape.iter().product();
    let dt = node.ty.dtype;
    let buf = match &t.data {
        Data::F32(v) if dt.is_float() => {
            if v.len() != n {
                return Err(err(format!(
                    "{what} \"{name}\" has shape {} ({n} elements) but holds {} values",
                    fmt_shape(shape),
                    v.len()
                )));
            }
            let exact = v
                .iter()
                .all(|&x| x.is_nan() || round_to(dt, x).to_bits() == x.to_bits());
            if exact {
                Buf::F(Cow::Borrowed(v.as_slice()))
            } else {
                Buf::F(Cow::Owned(v.iter().map(|&x| round_to(dt, x)).collect()))
            }
        }
        Data::I32(v) if dt == DType::I32 => {
            if v.len() != n {
                return Err(err(format!(
                    "{what} \"{name}\" has shape {} ({n} elements) but holds {} values",
                    fmt_shape(shape),
                    v.len()
                )));
            }
            Buf::I(Cow::Borrowed(v.as_slice()))
        }
        Data::Fp4(q) if dt.is_block_quantized() => {
            if q.format.dtype() != dt {
                return Err(err(format!(
                    "{what} \"{name}\" holds {} data but the graph declares {}",
                    q.format.dtype(),
                    declared()
                )));
            }
            check_fp4(dt, shape, q).map_err(|m| err(format!("{what} \"{name}\": {m}")))?;
            let d = q.dequantize();
            if d.len() != n {
                return Err(err(format!(
                    "{what} \"{name}\" dequantizes to {} values, expected {n}",
                    d.len()
                )));
            }
            Buf::F(Cow::Owned(d))
        }
        other => {
            let found = match other {
                Data::F32(_) => "Data::F32",
                Data::I32(_) => "Data::I32",
                Data::Fp4(_) => "Data::Fp4",
            };
            let want = if dt.is_float() {
                "Data::F32"
            } else if dt == DType::I32 {
                "Data::I32"
            } else {
                "Data::Fp4"
            };
            return Err(err(format!(
                "{what} \"{name}\" is {dt} but stores {found}; {dt} values are {want}"
            )));
        }
    };
    Ok(Val {
        dtype: dt,
        shape: shape.to_vec(),
        buf,
    })
}

// ---------------------------------------------------------------------------
// Ops.

type OpResult<'a> = Result<Buf<'a>, String>;

fn owned_f<'a>(v: Vec<f32>) -> OpResult<'a> {
    Ok(Buf::F(Cow::Owned(v)))
}

fn owned_i<'a>(v: Vec<i32>) -> OpResult<'a> {
    Ok(Buf::I(Cow::Owned(v)))
}

/// `Σ a[i]·b[i]` accumulated in f64.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Row-major strides.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Evaluates one non-input node. `out` is its bound shape.
fn eval<'a>(
    graph: &Graph,
    id: NodeId,
    op: &Op,
    args: &[&Val<'a>],
    out: &[usize],
    bindings: &Bindings,
    caches: &mut Caches,
) -> OpResult<'a> {
    let dt = graph.node(id).ty.dtype;
    match op {
        Op::Input(_) => Err("internal: inputs are loaded, not evaluated".into()),
        Op::Ew(e) => eval_ew(e, args, out, dt),
        Op::Reduce { kind, axis } => eval_reduce(*kind, *axis, args[0], dt),
        Op::View(v) => eval_view(v, args, out, bindings),
        Op::Nn(n) => eval_nn(n, args, out, dt),
        Op::Attn(Attn::KvAppend { len, ring }) => {
            let len = len
                .eval(bindings)
                .map_err(|m| format!("cannot evaluate len: {m}; bind it"))?;
            let cache_node = graph.inputs(id)[0];
            let cn = graph.node(cache_node);
            if cn.op != Op::Input(InputKind::Cache) {
                return Err(format!(
                    "input 0 must be a cache input (the cache is state kept between calls), \
                     found {}",
                    graph.describe(cache_node)
                ));
            }
            kv_append(&cn.name, caches, args[1], len, *ring, out)
        }
        Op::Attn(Attn::Attention { mask, scale, sinks }) => {
            attention(*mask, *scale, *sinks, args, out, dt)
        }
        Op::Moe(m) => eval_moe(m, args, out, dt),
        Op::Sample(s) => eval_sample(s, args),
        Op::Comm(_) => Err("internal: collectives are completed by run or run_ranks".into()),
    }
}

fn unary(u: UnaryOp, x: f32) -> f32 {
    match u {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Square => x * x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Sigmoid => sigmoid(x),
        UnaryOp::Silu => x * sigmoid(x),
    }
}

/// Maps each flat index of `out` to the flat index of a numpy-broadcast
/// operand of shape `inp` (aligned on trailing axes, size-1 axes repeat).
fn broadcast_index(inp: &[usize], out: &[usize]) -> Result<Vec<usize>, String> {
    if inp.len() > out.len() {
        return Err(format!(
            "internal: operand {} has more axes than the result {}",
            fmt_shape(inp),
            fmt_shape(out)
        ));
    }
    let off = out.len() - inp.len();
    let in_strides = strides(inp);
    // Stride of each output axis in the operand; 0 where it broadcasts.
    let mut bs = vec![0usize; out.len()];
    for (k, &d) in inp.iter().enumerate() {
        if d == out[off + k] {
            bs[off + k] = in_strides[k];
        } else if d != 1 {
            return Err(format!(
                "operand {} does not broadcast to {} (axis {k})",
                fmt_shape(inp),
                fmt_shape(out)
            ));
        }
    }
    let n: usize = out.iter().product();
    let os = strides(out);
    Ok((0..n)
        .map(|flat| {
            out.iter()
                .enumerate()
                .map(|(a, _)| (flat / os[a]) % out[a] * bs[a])
                .sum()
        })
        .collect())
}

fn eval_ew<'a>(e: &Elementwise, args: &[&Val<'a>], out: &[usize], dt: DType) -> OpResult<'a> {
    match e {
        Elementwise::Unary(u) => {
            let x = args[0].f("x")?;
            owned_f(x.iter().map(|&v| round_to(dt, unary(*u, v))).collect())
        }
        Elementwise::Scalar(b, c) => {
            let x = args[0].f("x")?;
            owned_f(x.iter().map(|&v| round_to(dt, b.apply(v, *c))).collect())
        }
        Elementwise::Binary(b) => {
            let (x, y) = (args[0].f("lhs")?, args[1].f("rhs")?);
            let ix = broadcast_index(&args[0].shape, out)?;
            let iy = broadcast_index(&args[1].shape, out)?;
            owned_f(
                ix.iter()
                    .zip(&iy)
                    .map(|(&i, &j)| round_to(dt, b.apply(x[i], y[j])))
                    .collect(),
            )
        }
        Elementwise::Cast(to) => match (&args[0].buf, *to) {
            (Buf::I(v), DType::I32) => owned_i(v.to_vec()),
            // i32 -> float: the exact integer rounded once (f64 holds every i32;
            // `half` rounds f64 directly; f8 only sees small, f32-exact values
            // before saturating).
            (Buf::I(v), to) => owned_f(v.iter().map(|&i| round_i32(to, i)).collect()),
            // float -> i32: truncation toward zero, saturating, NaN -> 0.
            (Buf::F(v), DType::I32) => owned_i(v.iter().map(|&x| x as i32).collect()),
            (Buf::F(v), to) => owned_f(v.iter().map(|&x| round_to(to, x)).collect()),
        },
    }
}

fn round_i32(to: DType, i: i32) -> f32 {
    let x = f64::from(i);
    match to {
        DType::BF16 => half::bf16::from_f64(x).to_f32(),
        DType::F16 => half::f16::from_f64(x).to_f32(),
        _ => round_to(to, x as f32),
    }
}

/// `(outer, n, inner)` around `axis`.
fn split_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

/// Sum and mean accumulate in f64; max propagates NaN (as `torch.amax`).
fn eval_reduce<'a>(kind: ReduceKind, axis: usize, x: &Val<'a>, dt: DType) -> OpResult<'a> {
    let d = x.f("x")?;
    let (outer, n, inner) = split_axis(&x.shape, axis);
    let mut y = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let it = (0..n).map(|k| d[(o * n + k) * inner + i]);
            let v = match kind {
                ReduceKind::Sum => it.map(f64::from).sum::<f64>() as f32,
                ReduceKind::Mean => (it.map(f64::from).sum::<f64>() / n as f64) as f32,
                ReduceKind::Max => it.fold(f32::NEG_INFINITY, |m, v| {
                    if m.is_nan() || v.is_nan() {
                        f32::NAN
                    } else {
                        m.max(v)
                    }
                }),
            };
            y.push(round_to(dt, v));
        }
    }
    owned_f(y)
}

/// Gathers `x` (float or i32) at the given flat indices.
fn gather<'a>(x: &Val<'a>, idx: impl Iterator<Item = usize>) -> OpResult<'a> {
    match &x.buf {
        Buf::F(v) => owned_f(idx.map(|i| v[i]).collect()),
        Buf::I(v) => owned_i(idx.map(|i| v[i]).collect()),
    }
}

fn eval_view<'a>(v: &View, args: &[&Val<'a>], out: &[usize], bindings: &Bindings) -> OpResult<'a> {
    let x = args[0];
    match v {
        View::Reshape(_) => {
            let (n, m) = (
                x.shape.iter().product::<usize>(),
                out.iter().product::<usize>(),
            );
            if n != m {
                return Err(format!(
                    "cannot reshape {} ({n} elements) to {} ({m} elements)",
                    fmt_shape(&x.shape),
                    fmt_shape(out)
                ));
            }
            gather(x, 0..n)
        }
        View::Permute(p) => {
            let is = strides(&x.shape);
            let os = strides(out);
            let n: usize = out.iter().product();
            gather(
                x,
                (0..n).map(|flat| {
                    (0..out.len())
                        .map(|a| (flat / os[a]) % out[a] * is[p[a]])
                        .sum()
                }),
            )
        }
        View::Slice { axis, start, len } => {
            let s = start
                .eval(bindings)
                .map_err(|m| format!("slice start: {m}"))?;
            let l = len
                .eval(bindings)
                .map_err(|m| format!("slice length: {m}"))?;
            let (outer, n, inner) = split_axis(&x.shape, *axis);
            if s + l > n {
                return Err(format!(
                    "slice {s}..{} (start {start}, len {len}) is out of range for axis {axis} \
                     of size {n} (input shape {})",
                    s + l,
                    fmt_shape(&x.shape)
                ));
            }
            gather(
                x,
                (0..outer).flat_map(move |o| {
                    (0..l).flat_map(move |k| (0..inner).map(move |i| (o * n + s + k) * inner + i))
                }),
            )
        }
        View::Concat { axis } => {
            let (outer, _, inner) = split_axis(&x.shape, *axis);
            let mut f = Vec::new();
            let mut iv = Vec::new();
            for o in 0..outer {
                for a in args {
                    let n = a.shape[*axis];
                    let r = o * n * inner..(o + 1) * n * inner;
                    match &a.buf {
                        Buf::F(v) => f.extend_from_slice(&v[r]),
                        Buf::I(v) => iv.extend_from_slice(&v[r]),
                    }
                }
            }
            match x.buf {
                Buf::F(_) => owned_f(f),
                Buf::I(_) => owned_i(iv),
            }
        }
    }
}

fn eval_nn<'a>(n: &Nn, args: &[&Val<'a>], out: &[usize], dt: DType) -> OpResult<'a> {
    match n {
        Nn::Embedding => {
            let (table, ids) = (args[0].f("table")?, args[1].i("ids")?);
            let (v, h) = (args[0].shape[0], args[0].shape[1]);
            let mut y = Vec::with_capacity(ids.len() * h);
            for (pos, &id) in ids.iter().enumerate() {
                let row = usize::try_from(id).ok().filter(|&r| r < v).ok_or_else(|| {
                    format!(
                        "token id {id} (at flat position {pos} of the ids) is out of range \
                         for a vocabulary of {v}"
                    )
                })?;
                y.extend(
                    table[row * h..(row + 1) * h]
                        .iter()
                        .map(|&x| round_to(dt, x)),
                );
            }
            owned_f(y)
        }
        Nn::RmsNorm { eps } => {
            // Hugging Face: in f32, x * rsqrt(mean(x^2) + eps), cast to x's
            // dtype, then weight * that (rounded to the output dtype).
            let (x, w) = (args[0].f("x")?, args[1].f("weight")?);
            let xdt = args[0].dtype;
            let d = w.len();
            let mut y = Vec::with_capacity(x.len());
            if d == 0 {
                return owned_f(y);
            }
            for row in x.chunks(d) {
                let ms = (row
                    .iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
                    / d as f64) as f32;
                let r = 1.0 / (ms + eps).sqrt();
                y.extend(
                    row.iter()
                        .zip(w)
                        .map(|(&v, &g)| round_to(dt, g * round_to(xdt, v * r))),
                );
            }
            owned_f(y)
        }
        Nn::MatMul { .. } => {
            let (x, w) = (args[0].f("x")?, args[1].f("weight")?);
            let (nn, k) = (args[1].shape[0], args[1].shape[1]);
            // Every axis of x but the last (K) is a row.
            let rows: usize = out[..out.len() - 1].iter().product();
            let mut y = Vec::with_capacity(rows * nn);
            for r in 0..rows {
                let xr = &x[r * k..(r + 1) * k];
                for n in 0..nn {
                    y.push(round_to(dt, dot(xr, &w[n * k..(n + 1) * k]) as f32));
                }
            }
            owned_f(y)
        }
        Nn::Rope { theta, rot_dims } => {
            let (x, pos) = (args[0].f("x")?, args[1].i("positions")?);
            let (heads, d) = (out[1], out[2]);
            let r = *rot_dims;
            let half = r / 2;
            // inv_freq[i] = 1 / theta^(2i/r), all in f32 as Hugging Face.
            let inv: Vec<f32> = (0..half)
                .map(|i| 1.0 / theta.powf((2 * i) as f32 / r as f32))
                .collect();
            let mut y = x.to_vec();
            for (ti, &pi) in pos.iter().enumerate() {
                let p = pi as f32;
                // cos/sin of the f32 angle, rounded to f32, then to x's dtype.
                let cs: Vec<(f32, f32)> = inv
                    .iter()
                    .map(|&f| {
                        let a = f64::from(p * f);
                        (round_to(dt, a.cos() as f32), round_to(dt, a.sin() as f32))
                    })
                    .collect();
                for h in 0..heads {
                    let base = (ti * heads + h) * d;
                    for (j, &(c, s)) in cs.iter().enumerate() {
                        let (x1, x2) = (x[base + j], x[base + j + half]);
                        y[base + j] = round_to(dt, x1 * c - x2 * s);
                        y[base + j + half] = round_to(dt, x2 * c + x1 * s);
                    }
                }
            }
            owned_f(y)
        }
    }
}

/// Writes `new` into the cache `name` at positions `len..len+T` (slot
/// `pos % cap`) and returns the logical view of positions `0..len+T`: row `j`
/// is slot `j % cap` if the cache still holds it (`j + cap >= len + T`),
/// else NaN (evicted by the ring).
fn kv_append<'a>(
    name: &str,
    caches: &mut Caches,
    new: &Val<'_>,
    len: usize,
    ring: bool,
    out: &[usize],
) -> OpResult<'a> {
    let rows = new.f("new rows")?;
    let t = new.shape[0];
    let cache = caches.map.get_mut(name).ok_or_else(|| {
        format!("KV cache \"{name}\" is missing; create caches with Caches::for_graph")
    })?;
    let cdt = cache.dtype;
    let cap = cache.shape[0];
    let row = cache.shape[1] * cache.shape[2];
    let data = match &mut cache.data {
        Data::F32(v) => v,
        _ => return Err(format!("KV cache \"{name}\" must hold f32 storage")),
    };
    if !ring && len + t > cap {
        return Err(format!(
            "KV cache \"{name}\" holds {cap} positions, position {} is past the context \
             limit (non-ring cache; len = {len}, appending {t} rows)",
            len.max(cap)
        ));
    }
    if cap == 0 && t > 0 {
        return Err(format!(
            "KV cache \"{name}\" has capacity 0; cannot append {t} rows"
        ));
    }
    for ti in 0..t {
        let slot = (len + ti) % cap;
        for (dst, &v) in data[slot * row..(slot + 1) * row]
            .iter_mut()
            .zip(&rows[ti * row..(ti + 1) * row])
        {
            *dst = round_to(cdt, v);
        }
    }
    let total = len + t;
    let mut y = Vec::with_capacity(out[0] * row);
    for j in 0..total {
        if j + cap >= total {
            let slot = j % cap;
            y.extend_from_slice(&data[slot * row..(slot + 1) * row]);
        } else {
            y.extend(std::iter::repeat_n(f32::NAN, row));
        }
    }
    owned_f(y)
}

/// Softmax attention with grouped KV heads.
///
/// Query `i` of `T` sits at position `p = L − T + i`; the mask decides which
/// keys it sees (see [`Mask`]). Scores `s_j = (Σ q·k in f64, as f32) · scale`
/// in f32. The softmax runs in f32 over the visible scores plus the head's
/// sink logit when present: `m` = max, `e_j = exp(s_j − m)`, `Σe` accumulated
/// in f64 (sink included), `p_j = e_j / Σe` rounded to q's dtype, the sink's
/// probability dropped. `out = Σ p_j v_j` in f64, rounded. A query that sees
/// no key and has no sink outputs 0. Hidden keys are never read.
fn attention<'a>(
    mask: Mask,
    scale: f32,
    has_sinks: bool,
    args: &[&Val<'a>],
    out: &[usize],
    dt: DType,
) -> OpResult<'a> {
    let (q, k, v) = (args[0].f("q")?, args[1].f("k")?, args[2].f("v")?);
    let sinks = if has_sinks {
        Some(args[3].f("sinks")?)
    } else {
        None
    };
    let (t, hq, dk) = (args[0].shape[0], args[0].shape[1], args[0].shape[2]);
    let (l, hkv) = (args[1].shape[0], args[1].shape[1]);
    let dv = out[2];
    if hkv == 0 || hq % hkv != 0 {
        return Err(format!(
            "query heads ({hq}) must be a multiple of kv heads ({hkv})"
        ));
    }
    let group = hq / hkv;
    let (l64, t64) = (l as i64, t as i64);
    let visible = |p: i64, j: i64| -> bool {
        match mask {
            Mask::Causal { window } => j <= p && window.is_none_or(|w| j > p - i64::from(w)),
            Mask::Block { window } => j >= l64 - t64 || window.is_none_or(|w| j > p - i64::from(w)),
        }
    };
    let mut y = vec![0f32; t * hq * dv];
    for i in 0..t {
        let p = l64 - t64 + i as i64;
        for h in 0..hq {
            let kh = h / group;
            let qv = &q[(i * hq + h) * dk..(i * hq + h + 1) * dk];
            let scores: Vec<(usize, f32)> = (0..l)
                .filter(|&j| visible(p, j as i64))
                .map(|j| {
                    let kr = &k[(j * hkv + kh) * dk..(j * hkv + kh + 1) * dk];
                    (j, dot(qv, kr) as f32 * scale)
                })
                .collect();
            let sink = sinks.map(|s| s[h]);
            if scores.is_empty() && sink.is_none() {
                continue; // no visible key: output 0
            }
            let m = scores
                .iter()
                .map(|&(_, s)| s)
                .chain(sink)
                .fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|&(_, s)| (s - m).exp()).collect();
            let total = (e.iter().map(|&x| f64::from(x)).sum::<f64>()
                + sink.map_or(0.0, |s| f64::from((s - m).exp()))) as f32;
            let mut acc = vec![0f64; dv];
            for (&(j, _), &ej) in scores.iter().zip(&e) {
                let pj = f64::from(round_to(dt, ej / total));
                let vr = &v[(j * hkv + kh) * dv..(j * hkv + kh + 1) * dv];
                for (a, &x) in acc.iter_mut().zip(vr) {
                    *a += pj * f64::from(x);
                }
            }
            for (o, a) in y[(i * hq + h) * dv..(i * hq + h + 1) * dv]
                .iter_mut()
                .zip(acc)
            {
                *o = round_to(dt, a as f32);
            }
        }
    }
    owned_f(y)
}

/// Descending order with NaN first (as the largest), for stable sorts whose
/// ties keep the lower index.
fn cmp_desc(a: f32, b: f32) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        _ => b.partial_cmp(&a).unwrap_or(Ordering::Equal),
    }
}

/// Indices of `v` sorted by descending value, ties to the lower index.
fn argsort_desc(v: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| cmp_desc(v[a], v[b])); // stable
    idx
}

/// Router scores of one row of logits, in f32: sigmoid, or softmax
/// (`exp(x − max)`, the sum accumulated in f64).
fn router_scores(score: ScoreFn, row: &[f32]) -> Vec<f32> {
    match score {
        ScoreFn::Sigmoid => row.iter().map(|&x| sigmoid(x)).collect(),
        ScoreFn::Softmax => {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = row.iter().map(|&x| (x - m).exp()).collect();
            let total = e.iter().map(|&x| f64::from(x)).sum::<f64>() as f32;
            e.iter().map(|&x| x / total).collect()
        }
    }
}

fn expert_index(e: i32, n: usize, t: usize, j: usize) -> Result<usize, String> {
    usize::try_from(e).ok().filter(|&x| x < n).ok_or_else(|| {
        format!("expert index {e} (token {t}, slot {j}) is out of range for {n} experts")
    })
}

fn eval_moe<'a>(m: &Moe, args: &[&Val<'a>], out: &[usize], dt: DType) -> OpResult<'a> {
    match m {
        Moe::RouterSelect {
            score,
            top_k,
            n_group,
            topk_group,
            bias,
        } => {
            let logits = args[0].f("router logits")?;
            let b = if *bias {
                Some(args[1].f("correction bias")?)
            } else {
                None
            };
            let e = args[0].shape[1];
            let mut y = Vec::with_capacity(out[0] * top_k);
            if e == 0 {
                return owned_i(y);
            }
            for row in logits.chunks(e) {
                let s = router_scores(*score, row);
                let mut choice: Vec<f32> = match b {
                    Some(b) => s.iter().zip(b).map(|(&x, &c)| x + c).collect(),
                    None => s,
                };
                if *n_group > 1 {
                    let g = e / n_group;
                    // Group score: the sum of the group's two largest choice values.
                    let gs: Vec<f32> = choice
                        .chunks(g)
                        .map(|grp| {
                            let o = argsort_desc(grp);
                            grp[o[0]] + grp[o[1]]
                        })
                        .collect();
                    let kept = &argsort_desc(&gs)[..*topk_group];
                    for (gi, grp) in choice.chunks_mut(g).enumerate() {
                        if !kept.contains(&gi) {
                            // masked_fill(~mask, -inf) as the reference router.
                            grp.fill(f32::NEG_INFINITY);
                        }
                    }
                }
                y.extend(argsort_desc(&choice)[..*top_k].iter().map(|&i| i as i32));
            }
            owned_i(y)
        }
        Moe::RouterWeights {
            score,
            norm,
            norm_eps,
            scale,
        } => {
            let (logits, idx) = (args[0].f("router logits")?, args[1].i("expert indices")?);
            let e = args[0].shape[1];
            let k = args[1].shape[1];
            let mut y = Vec::with_capacity(idx.len());
            for t in 0..args[1].shape[0] {
                let s = router_scores(*score, &logits[t * e..(t + 1) * e]);
                let mut w = Vec::with_capacity(k);
                for j in 0..k {
                    w.push(s[expert_index(idx[t * k + j], e, t, j)?]);
                }
                if *norm {
                    let denom = w.iter().map(|&x| f64::from(x)).sum::<f64>() as f32 + norm_eps;
                    w.iter_mut().for_each(|x| *x /= denom);
                }
                y.extend(w.iter().map(|&x| x * scale));
            }
            owned_f(y)
        }
        Moe::Experts => experts(args, dt),
        Moe::LocalIndex { first, count } => {
            let idx = args[0].i("expert indices")?;
            let (lo, hi) = (*first as i64, (*first + *count) as i64);
            owned_i(
                idx.iter()
                    .map(|&e| {
                        let e = i64::from(e);
                        if (lo..hi).contains(&e) {
                            (e - lo) as i32
                        } else {
                            -1
                        }
                    })
                    .collect(),
            )
        }
    }
}

/// The routed SwiGLU experts. Per token `t` and slot `j` (expert `e`):
/// `g = gate_e·x`, `u = up_e·x` (f64, each rounded to x's dtype),
/// `h = silu(g)·u` in f32 rounded to x's dtype, `y = down_e·h` (f64, kept in
/// f32); `out[t] = Σⱼ w[t,j]·y` accumulated in f32 in slot order, rounded once.
/// A slot with index `-1` (another rank's expert) is skipped.
fn experts<'a>(args: &[&Val<'a>], dt: DType) -> OpResult<'a> {
    let x = args[0].f("x")?;
    let idx = args[1].i("expert indices")?;
    let w = args[2].f("expert weights")?;
    let (gu, down) = (args[3].f("gate_up")?, args[4].f("down")?);
    let (t, hd) = (args[0].shape[0], args[0].shape[1]);
    let k = args[1].shape[1];
    let (ne, i2) = (args[3].shape[0], args[3].shape[1]);
    let inter = i2 / 2;
    let mut y = vec![0f32; t * hd];
    let mut hv = vec![0f32; inter];
    for ti in 0..t {
        let xt = &x[ti * hd..(ti + 1) * hd];
        let mut acc = vec![0f32; hd];
        for j in 0..k {
            if idx[ti * k + j] == -1 {
                continue; // another rank's expert
            }
            let e = expert_index(idx[ti * k + j], ne, ti, j)?;
            let gue = &gu[e * i2 * hd..(e + 1) * i2 * hd];
            for (i, h) in hv.iter_mut().enumerate() {
                let g = round_to(dt, dot(&gue[i * hd..(i + 1) * hd], xt) as f32);
                let u = round_to(
                    dt,
                    dot(&gue[(inter + i) * hd..(inter + i + 1) * hd], xt) as f32,
                );
                *h = round_to(dt, g * sigmoid(g) * u);
            }
            let de = &down[e * hd * inter..(e + 1) * hd * inter];
            let wt = w[ti * k + j];
            for (n, a) in acc.iter_mut().enumerate() {
                *a += wt * dot(&de[n * inter..(n + 1) * inter], &hv) as f32;
            }
        }
        for (o, a) in y[ti * hd..(ti + 1) * hd].iter_mut().zip(acc) {
            *o = round_to(dt, a);
        }
    }
    owned_f(y)
}

fn eval_sample<'a>(s: &Sample, args: &[&Val<'a>]) -> OpResult<'a> {
    let x = args[0].f("logits")?;
    let v = args[0].shape.last().copied().unwrap_or(0);
    if v == 0 {
        return Err(format!(
            "logits {} have an empty last axis: there is no token to choose",
            fmt_shape(&args[0].shape)
        ));
    }
    match s {
        Sample::Argmax => owned_i(
            x.chunks(v)
                .map(|row| argmax_row(row).unwrap_or(0) as i32)
                .collect(),
        ),
        Sample::Sample { temperature } => {
            let seed = args[1].i("seed")?;
            let (s0, c0) = (seed[0] as u32, seed[1] as u32);
            let mut y = Vec::with_capacity(args[0].shape[0]);
            for (t, row) in x.chunks(v).enumerate() {
                let u = uniform(s0, c0.wrapping_add(t as u32));
                y.push(sample_row(row, *temperature, u).ok_or_else(|| {
                    format!("row {t} of the logits gives no token a positive probability (all -inf or NaN)")
                })? as i32);
            }
            owned_i(y)
        }
    }
}

/// The first index of the maximum of a row (the `sample.argmax` rule); NaN
/// counts as the maximum (as `torch.argmax`). `None` for an empty row.
pub fn argmax_row(row: &[f32]) -> Option<usize> {
    if row.is_empty() {
        return None;
    }
    let mut best = 0;
    for (i, &x) in row.iter().enumerate().skip(1) {
        if cmp_desc(x, row[best]) == Ordering::Less {
            best = i;
        }
    }
    Some(best)
}

/// Inverse-CDF sampling of one row (the `sample.sample` rule), all in f32 in index order:
/// `e_i = exp((l_i − max) / temperature)`, `total = Σ e_i`; the first `i` whose
/// running sum exceeds `u·total`, else (rounding) the last `i` with `e_i > 0`.
pub fn sample_row(row: &[f32], temperature: f32, u: f32) -> Option<usize> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = row.iter().map(|&l| ((l - m) / temperature).exp()).collect();
    let total: f32 = e.iter().fold(0.0, |a, &x| a + x);
    let target = u * total;
    let mut cum = 0f32;
    for (i, &x) in e.iter().enumerate() {
        cum += x;
        if cum > target {
            return Some(i);
        }
    }
    e.iter().rposition(|&x| x > 0.0)
}

/// All-gather order: for each of `outer` rows, every rank's `chunk` elements
/// in rank order.
fn gather_chunks<T: Copy>(srcs: &[&[T]], outer: usize, chunk: usize) -> Vec<T> {
    let mut y = Vec::with_capacity(outer * chunk * srcs.len());
    for o in 0..outer {
        for s in srcs {
            y.extend_from_slice(&s[o * chunk..(o + 1) * chunk]);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_range_and_spread() {
        let mut sum = 0.0f64;
        for c in 0..10_000u32 {
            let u = uniform(7, c);
            assert!((0.0..1.0).contains(&u));
            sum += f64::from(u);
        }
        assert!((sum / 10_000.0 - 0.5).abs() < 0.01);
        assert_ne!(uniform(1, 0), uniform(0, 1));
    }

    #[test]
    fn uniform_matches_splitmix64() {
        // SplitMix64's first output from state 0 is 0xE220A8397B1DCDAF.
        let z: u64 = 0xE220_A839_7B1D_CDAF;
        assert_eq!(uniform(0, 0), (z >> 40) as f32 / 16_777_216.0);
    }

    #[test]
    fn rounding() {
        assert_eq!(round_to(DType::BF16, 1.0 + 1.0 / 256.0), 1.0); // tie to even
        assert_eq!(round_to(DType::BF16, 1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_to(DType::F16, 1.0 + 1.0 / 4096.0), 1.0);
        assert_eq!(round_to(DType::F32, 0.1), 0.1);
        assert_eq!(round_i32(DType::BF16, 16_777_217), 16_777_216.0);
        assert_eq!(round_i32(DType::BF16, 257), 256.0);
        assert_eq!(round_i32(DType::BF16, 259), 260.0);
    }

    #[test]
    fn sample_row_edges() {
        let row = [0.0f32, f32::NEG_INFINITY, 0.0];
        assert_eq!(sample_row(&row, 1.0, 0.0), Some(0));
        assert_eq!(sample_row(&row, 1.0, 0.5), Some(2));
        assert_eq!(sample_row(&[f32::NAN; 3], 1.0, 0.5), None);
        assert_eq!(argmax_row(&[1.0, 3.0, 3.0]), Some(1));
        assert_eq!(argmax_row(&[1.0, f32::NAN, 3.0]), Some(1));
        assert_eq!(argmax_row(&[]), None);
    }

    #[test]
    fn broadcasting_indices() {
        assert_eq!(broadcast_index(&[3], &[2, 3]), Ok(vec![0, 1, 2, 0, 1, 2]));
        assert_eq!(
            broadcast_index(&[2, 1], &[2, 3]),
            Ok(vec![0, 0, 0, 1, 1, 1])
        );
        assert!(broadcast_index(&[2], &[2, 3]).is_err());
    }
}
