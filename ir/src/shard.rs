//! Sharding: one graph split into the graphs of `n` ranks that together
//! compute what it computes (tensor parallelism, and expert parallelism as an
//! option), with the collectives ([`Comm`]) that join their parts.
//!
//! # What is split, and how
//!
//! - **Attention by heads.** The q, k and v projections are split by rows
//!   (output features), a whole number of heads per rank; the per-head ops
//!   between a projection and the attention (reshape, per-head RMSNorm, RoPE,
//!   value scale, KV-cache append) run on the rank's heads only, and the KV
//!   caches hold the rank's KV heads only. The attention output projection
//!   (`o_proj`) is split by columns, so each rank's product is a partial sum:
//!   a `comm.all_reduce` follows it. The query heads must divide among the
//!   ranks. KV heads divide among the ranks when there are at least as many
//!   as ranks; when there are fewer (`n` a multiple of the KV heads), each KV
//!   head is *replicated* on the `n / kv_heads` ranks whose query heads read
//!   it (standard practice for grouped-query attention). Sinks (one logit per
//!   query head) are split with the query heads.
//! - **Routed experts.** [`ExpertSplit::Tensor`]: every rank holds a slice of
//!   every expert's intermediate dimension (rows of gate and of up, columns of
//!   down); its `moe.experts` gives a partial sum, all-reduced.
//!   [`ExpertSplit::Expert`] (expert parallelism): each rank holds `E / n`
//!   whole experts, a `moe.local_index` maps the router's choice to its own
//!   experts (others' slots become −1 and contribute nothing), and the
//!   partial sums are all-reduced. The router (its matmul, choice and
//!   weights) is replicated, so every rank makes the same choice.
//! - **Dense MLPs** (`down(act(gate(x)) ⊙ up(x))`, any elementwise
//!   combination of matmuls of one input feeding one matmul) like the
//!   experts' tensor split: gate and up by rows, down by columns, then an
//!   all-reduce.
//! - **LM head**: a matmul that is a graph output (the logits) is split by
//!   rows (the vocabulary) and its result all-gathered. Replicating it would
//!   be as exact, but the head is the largest dense matrix of a model
//!   (vocab × hidden) and decoding is bound by reading weights: every rank
//!   would read all of it for each token, where the gather moves only `T ×
//!   vocab` logits. Each logit is still one whole dot product, so the
//!   gathered logits are bit-identical to the unsplit ones.
//! - Everything else (embedding, norms, router, residual stream) is
//!   replicated: every rank computes it in full, on identical inputs.
//!
//! Anything else that would have to be split, or a dimension that does not
//! divide, is refused with an error naming the node.
//!
//! # Why a graph pass in the IR
//!
//! The split is a rewrite of what the author wrote, before any fusion: the
//! per-rank graphs are ordinary graphs that the interpreter runs (all ranks
//! in lockstep with [`crate::interp::run_ranks`], which is how the split is
//! tested without GPUs) and that codegen compiles per rank once collectives
//! are lowered. It knows nothing of devices or of model names: it finds its
//! patterns from the structured ops (`attn.attention`, `moe.experts`,
//! `nn.matmul`) and propagates a layout (replicated, or split on one axis)
//! through every node, checking each op's rule.
//!
//! # Weights
//!
//! [`Sharded::slices`] says, for every weight and cache input, which part
//! rank `r` holds ([`Slice`]); [`Sharded::slice_values`] cuts a map of full
//! tensors for one rank, so a loader keeps one set of checkpoint names.
//! Under tensor parallelism every rank's graph is the same; under expert
//! parallelism they differ only in the `first` of their `moe.local_index`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

use crate::error::{ErrorKind, IrError, Result};
use crate::graph::{Graph, NodeId};
use crate::interp::{Data, Tensor};
use crate::op::{Attn, Comm, Elementwise, InputKind, Moe, Nn, Op, TensorType, View};
use crate::shape::{Dim, Shape};

/// How routed experts are split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExpertSplit {
    /// Every rank holds `1/n` of every expert's intermediate dimension.
    #[default]
    Tensor,
    /// Every rank holds `E/n` whole experts (expert parallelism).
    Expert,
}

/// The choices of a split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parallelism {
    /// How routed experts are split.
    pub experts: ExpertSplit,
}

/// Which part of a weight or cache a rank holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slice {
    /// The whole tensor, on every rank.
    Replicated,
    /// `axis` is `blocks` equal blocks (gate then up for a fused `gate_up`),
    /// each cut into `parts` equal chunks; rank `r` of `n` holds chunk
    /// `r · parts / n` of every block. `parts` divides `n`: with `parts < n`
    /// each chunk is replicated on `n / parts` neighbouring ranks (KV heads
    /// fewer than the ranks).
    Split {
        /// The axis cut.
        axis: usize,
        /// Chunks per block.
        parts: usize,
        /// Equal blocks of the axis, each cut alike.
        blocks: usize,
    },
}

impl Slice {
    /// The index ranges along the split axis (of full size `dim`) that rank
    /// `rank` of `n` holds, one per block in order; the whole axis when
    /// replicated.
    pub fn ranges(&self, rank: usize, n: usize, dim: usize) -> Vec<Range<usize>> {
        match *self {
            Slice::Replicated => std::iter::once(0..dim).collect(),
            Slice::Split { parts, blocks, .. } => {
                let block = dim / blocks;
                let piece = block / parts;
                let chunk = rank * parts / n;
                (0..blocks)
                    .map(|b| b * block + chunk * piece..b * block + (chunk + 1) * piece)
                    .collect()
            }
        }
    }
}

impl fmt::Display for Slice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Slice::Replicated => f.write_str("replicated"),
            Slice::Split {
                axis,
                parts,
                blocks: 1,
            } => write!(f, "axis {axis} in {parts} parts"),
            Slice::Split {
                axis,
                parts,
                blocks,
            } => write!(f, "axis {axis} as {blocks} blocks, each in {parts} parts"),
        }
    }
}

/// A graph split for `n` ranks.
#[derive(Clone, Debug)]
pub struct Sharded {
    /// Number of ranks.
    pub n: usize,
    /// The graph of each rank, in rank order.
    pub ranks: Vec<Graph>,
    /// For every weight and cache input, by name, the part each rank holds.
    pub slices: BTreeMap<String, Slice>,
}

impl Sharded {
    /// The values rank `rank` needs, cut from `values` (full tensors by
    /// name): every tensor named in [`Sharded::slices`] is sliced, the rest
    /// (activations) pass through as they are.
    pub fn slice_values(
        &self,
        rank: usize,
        values: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>> {
        if rank >= self.n {
            return Err(shard_err(format!(
                "rank {rank} does not exist: the graph is split for {} ranks",
                self.n
            )));
        }
        values
            .iter()
            .map(|(name, t)| {
                let t = match self.slices.get(name) {
                    Some(s) => slice_tensor(t, s, rank, self.n)
                        .map_err(|e| shard_err(format!("\"{name}\": {}", e.message)))?,
                    None => t.clone(),
                };
                Ok((name.clone(), t))
            })
            .collect()
    }
}

/// The part of the full tensor `t` that rank `rank` of `n` holds under
/// `slice`. FP4 tensors are cut along any axis but the last, or along the
/// last in whole blocks.
pub fn slice_tensor(t: &Tensor, slice: &Slice, rank: usize, n: usize) -> Result<Tensor> {
    let Slice::Split {
        axis,
        parts,
        blocks,
    } = *slice
    else {
        return Ok(t.clone());
    };
    let dim = *t.shape.get(axis).ok_or_else(|| {
        shard_err(format!(
            "axis {axis} is out of range for a tensor of shape {:?}",
            t.shape
        ))
    })?;
    if parts == 0 || blocks == 0 || !n.is_multiple_of(parts) || !dim.is_multiple_of(parts * blocks)
    {
        return Err(shard_err(format!(
            "axis {axis} of shape {:?} does not divide into {blocks} block(s) of {parts} parts \
             for {n} ranks",
            t.shape
        )));
    }
    let ranges = slice.ranges(rank, n, dim);
    let outer: usize = t.shape[..axis].iter().product();
    let inner: usize = t.shape[axis + 1..].iter().product();
    let mut shape = t.shape.clone();
    shape[axis] = ranges.iter().map(|r| r.len()).sum();
    let data = match &t.data {
        Data::F32(v) => Data::F32(take(v, outer, dim, inner, &ranges)),
        Data::I32(v) => Data::I32(take(v, outer, dim, inner, &ranges)),
        Data::Fp4(q) => {
            let block = q.format.block_size();
            let mut q = q.clone();
            if axis + 1 < t.shape.len() {
                // Whole rows of the last axis: `inner` is a multiple of it.
                q.codes = take(&q.codes, outer, dim, inner / 2, &ranges);
                q.scales = take(&q.scales, outer, dim, inner / block, &ranges);
            } else {
                if ranges
                    .iter()
                    .any(|r| r.start % block != 0 || r.len() % block != 0)
                {
                    return Err(shard_err(format!(
                        "{} tensor of shape {:?}: the last axis cut as {ranges:?} does not fall \
                         on its {block}-element blocks",
                        t.dtype, t.shape
                    )));
                }
                let half: Vec<Range<usize>> =
                    ranges.iter().map(|r| r.start / 2..r.end / 2).collect();
                let scaled: Vec<Range<usize>> = ranges
                    .iter()
                    .map(|r| r.start / block..r.end / block)
                    .collect();
                q.codes = take(&q.codes, outer, dim / 2, 1, &half);
                q.scales = take(&q.scales, outer, dim / block, 1, &scaled);
            }
            return Tensor::fp4(&shape, q);
        }
    };
    Ok(Tensor {
        dtype: t.dtype,
        shape,
        data,
    })
}

/// Elements `ranges` of the middle axis of a `[outer, dim, inner]` array.
fn take<T: Copy>(
    data: &[T],
    outer: usize,
    dim: usize,
    inner: usize,
    ranges: &[Range<usize>],
) -> Vec<T> {
    let mut out = Vec::with_capacity(data.len());
    for o in 0..outer {
        for r in ranges {
            out.extend_from_slice(&data[(o * dim + r.start) * inner..(o * dim + r.end) * inner]);
        }
    }
    out
}

fn shard_err(msg: String) -> IrError {
    IrError::new(ErrorKind::Shard, msg)
}

fn node_err(g: &Graph, id: NodeId, msg: String) -> IrError {
    shard_err(msg).at(g.describe(id))
}

/// Splits `graph` for `n` ranks; see the module documentation for what is
/// split and how. The error names the node the pass cannot split and says
/// why (a dimension that does not divide, a pattern it does not know).
pub fn shard(graph: &Graph, n: usize, par: Parallelism) -> Result<Sharded> {
    if n == 0 {
        return Err(shard_err("a graph is split for at least 1 rank".into()));
    }
    graph.verify()?;
    let plan = Plan::new(graph, n, par)?;
    let mut slices = BTreeMap::new();
    for id in graph.topo_order()? {
        let node = graph.node(id);
        if matches!(node.op, Op::Input(InputKind::Weight | InputKind::Cache)) {
            let s = match plan.inputs.get(&id) {
                // One part (a single KV head on every rank) is the whole tensor.
                Some(Slice::Split { parts: 1, .. }) | None => Slice::Replicated,
                Some(s) => *s,
            };
            slices.insert(node.name.clone(), s);
        }
    }
    let ranks = (0..n)
        .map(|r| build_rank(graph, &plan, r))
        .collect::<Result<Vec<_>>>()?;
    Ok(Sharded { n, ranks, slices })
}

// ---------------------------------------------------------------------------
// The plan: which inputs are split, found from the structured ops.

struct Plan {
    n: usize,
    par: Parallelism,
    /// Split weights and caches (the others are replicated).
    inputs: BTreeMap<NodeId, Slice>,
    /// Who decided each input's slice (for conflict errors).
    by: BTreeMap<NodeId, NodeId>,
    /// Matmuls whose vocabulary-split result is all-gathered.
    gather: BTreeSet<NodeId>,
}

/// A split along the rows (axis 0) of a matrix or the heads (axis 1) of a cache.
fn split(axis: usize, parts: usize) -> Slice {
    Slice::Split {
        axis,
        parts,
        blocks: 1,
    }
}

impl Plan {
    fn new(g: &Graph, n: usize, par: Parallelism) -> Result<Plan> {
        let mut p = Plan {
            n,
            par,
            inputs: BTreeMap::new(),
            by: BTreeMap::new(),
            gather: BTreeSet::new(),
        };
        let order = g.topo_order()?;
        for &id in &order {
            match g.node(id).op {
                Op::Attn(Attn::Attention { sinks, .. }) => p.attention(g, id, sinks)?,
                Op::Moe(Moe::Experts) => p.experts(g, id)?,
                _ => {}
            }
        }
        for &id in &order {
            if matches!(g.node(id).op, Op::Nn(Nn::MatMul { .. })) {
                p.mlp(g, id)?;
            }
        }
        let outputs: BTreeSet<NodeId> = g.outputs().iter().map(|(_, o)| *o).collect();
        for &id in &order {
            if matches!(g.node(id).op, Op::Nn(Nn::MatMul { .. })) && outputs.contains(&id) {
                p.lm_head(g, id)?;
            }
        }
        Ok(p)
    }

    /// Records that input `input` (a weight or cache) is cut as `slice`,
    /// decided while splitting `by`.
    fn assign(&mut self, g: &Graph, input: NodeId, slice: Slice, by: NodeId) -> Result<()> {
        if !matches!(
            g.node(input).op,
            Op::Input(InputKind::Weight | InputKind::Cache)
        ) {
            return Err(node_err(
                g,
                by,
                format!(
                    "cannot split {}: it is computed, not a weight or cache the ranks can each \
                     load a part of",
                    g.describe(input)
                ),
            ));
        }
        if let Some(old) = self.inputs.get(&input) {
            if *old != slice {
                let first = self.by.get(&input).copied().unwrap_or(by);
                return Err(node_err(
                    g,
                    by,
                    format!(
                        "{} would be cut as {slice} here but as {old} for {}; a weight shared \
                         by differently split ops cannot be split",
                        g.describe(input),
                        g.describe(first)
                    ),
                ));
            }
        }
        self.inputs.insert(input, slice);
        self.by.insert(input, by);
        Ok(())
    }

    fn is_free_weight(&self, g: &Graph, id: NodeId) -> bool {
        g.node(id).op == Op::Input(InputKind::Weight) && !self.inputs.contains_key(&id)
    }

    /// Attention by heads: q/k/v projections by rows, caches by KV head,
    /// sinks with the query heads, the output projection by columns.
    fn attention(&mut self, g: &Graph, a: NodeId, has_sinks: bool) -> Result<()> {
        let n = self.n;
        let ins = g.inputs(a);
        let hq = const_dim(g, ins[0], 1)?;
        let hkv = const_dim(g, ins[1], 1)?;
        if hq % n != 0 {
            return Err(node_err(
                g,
                a,
                format!(
                    "{hq} query heads cannot be split over {n} ranks: the heads must be a \
                     multiple of the ranks (use at most {hq} ranks, or a divisor of {hq})"
                ),
            ));
        }
        let pk = if hkv % n == 0 {
            n
        } else if n.is_multiple_of(hkv) {
            hkv
        } else {
            return Err(node_err(
                g,
                a,
                format!(
                    "{hkv} KV heads fit {n} ranks neither split (a multiple of {n}) nor \
                     replicated (a divisor of {n})"
                ),
            ));
        };
        for (slot, parts, what) in [(0, n, "queries"), (1, pk, "keys"), (2, pk, "values")] {
            let (proj, caches) = trace_projection(g, a, ins[slot], what)?;
            let w = g.inputs(proj)[1];
            self.assign(g, w, split(0, parts), a)?;
            for c in caches {
                self.assign(g, c, split(1, parts), a)?;
            }
        }
        if has_sinks {
            self.assign(g, ins[3], split(0, n), a)?;
        }
        let o = trace_output_projection(g, a)?;
        let wo = g.inputs(o)[1];
        self.assign(
            g,
            wo,
            Slice::Split {
                axis: 1,
                parts: n,
                blocks: 1,
            },
            a,
        )
    }

    /// Routed experts: by intermediate dimension or by expert.
    fn experts(&mut self, g: &Graph, e: NodeId) -> Result<()> {
        let n = self.n;
        let ins = g.inputs(e);
        let (w13, w2) = (ins[3], ins[4]);
        match self.par.experts {
            ExpertSplit::Tensor => {
                let inter = const_dim(g, w2, 2)?;
                if inter % n != 0 {
                    return Err(node_err(
                        g,
                        e,
                        format!(
                            "the experts' intermediate size {inter} does not divide over {n} \
                             ranks; use expert parallelism or fewer ranks"
                        ),
                    ));
                }
                let dt = g.node(w2).ty.dtype;
                if let Some(b) = dt.block_size() {
                    if !(inter / n).is_multiple_of(b) {
                        return Err(node_err(
                            g,
                            e,
                            format!(
                                "the down projection is {dt}: its slice of {} intermediate \
                                 columns per rank is not a multiple of its {b}-element blocks; \
                                 use expert parallelism (ExpertSplit::Expert) or fewer ranks",
                                inter / n
                            ),
                        ));
                    }
                }
                self.assign(
                    g,
                    w13,
                    Slice::Split {
                        axis: 1,
                        parts: n,
                        blocks: 2,
                    },
                    e,
                )?;
                self.assign(
                    g,
                    w2,
                    Slice::Split {
                        axis: 2,
                        parts: n,
                        blocks: 1,
                    },
                    e,
                )
            }
            ExpertSplit::Expert => {
                let experts = const_dim(g, w13, 0)?;
                if experts % n != 0 {
                    return Err(node_err(
                        g,
                        e,
                        format!(
                            "{experts} experts do not divide over {n} ranks for expert \
                             parallelism; use the tensor split or a divisor of {experts}"
                        ),
                    ));
                }
                self.assign(g, w13, split(0, n), e)?;
                self.assign(g, w2, split(0, n), e)
            }
        }
    }

    /// A dense MLP ending at matmul `down`: its input is an elementwise
    /// combination of matmuls of one input by weights not yet split.
    fn mlp(&mut self, g: &Graph, down: NodeId) -> Result<()> {
        let ins = g.inputs(down);
        let (x, wd) = (ins[0], ins[1]);
        if !self.is_free_weight(g, wd) || !is_ew(g, x) {
            return Ok(());
        }
        let mut leaves = BTreeSet::new();
        let mut stack = vec![x];
        let mut seen = BTreeSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            if is_ew(g, v) {
                stack.extend(g.inputs(v));
            } else if matches!(g.node(v).op, Op::Nn(Nn::MatMul { .. })) {
                leaves.insert(v);
            } else {
                return Ok(()); // not an MLP: something else feeds it
            }
        }
        let sources: BTreeSet<NodeId> = leaves.iter().map(|&l| g.inputs(l)[0]).collect();
        if sources.len() != 1
            || leaves
                .iter()
                .any(|&l| !self.is_free_weight(g, g.inputs(l)[1]))
        {
            return Ok(());
        }
        let inter = const_dim(g, x, g.node(x).ty.rank() - 1)?;
        if inter % self.n != 0 {
            return Err(node_err(
                g,
                down,
                format!(
                    "the MLP's intermediate size {inter} does not divide over {} ranks",
                    self.n
                ),
            ));
        }
        for l in leaves {
            self.assign(g, g.inputs(l)[1], split(0, self.n), down)?;
        }
        self.assign(
            g,
            wd,
            Slice::Split {
                axis: 1,
                parts: self.n,
                blocks: 1,
            },
            down,
        )
    }

    /// The LM head: a matmul that is a graph output, split by vocabulary and
    /// all-gathered.
    fn lm_head(&mut self, g: &Graph, m: NodeId) -> Result<()> {
        let w = g.inputs(m)[1];
        if !self.is_free_weight(g, w) {
            return Ok(());
        }
        let vocab = const_dim(g, w, 0)?;
        if vocab % self.n != 0 {
            return Err(node_err(
                g,
                m,
                format!(
                    "the output projection's {vocab} rows (the vocabulary) do not divide over {} \
                     ranks",
                    self.n
                ),
            ));
        }
        self.assign(g, w, split(0, self.n), m)?;
        self.gather.insert(m);
        Ok(())
    }
}

fn is_ew(g: &Graph, id: NodeId) -> bool {
    matches!(g.node(id).op, Op::Ew(_))
}

fn const_dim(g: &Graph, id: NodeId, axis: usize) -> Result<usize> {
    let ty = &g.node(id).ty;
    ty.dims().get(axis).and_then(Dim::as_const).ok_or_else(|| {
        node_err(
            g,
            id,
            format!("axis {axis} of {ty} must be a constant to split"),
        )
    })
}

/// Walks back from an attention input to the matmul that projects it,
/// through the per-head ops; returns the matmul and the caches appended to
/// on the way.
fn trace_projection(
    g: &Graph,
    a: NodeId,
    start: NodeId,
    what: &str,
) -> Result<(NodeId, Vec<NodeId>)> {
    let mut caches = Vec::new();
    let mut v = start;
    loop {
        let ins = g.inputs(v);
        match &g.node(v).op {
            Op::Nn(Nn::MatMul { .. }) => return Ok((v, caches)),
            Op::Attn(Attn::KvAppend { .. }) => {
                caches.push(ins[0]);
                v = ins[1];
            }
            Op::Nn(Nn::Rope { .. } | Nn::RmsNorm { .. })
            | Op::Ew(Elementwise::Unary(_) | Elementwise::Scalar(..) | Elementwise::Cast(_))
            | Op::View(View::Reshape(_)) => v = ins[0],
            _ => {
                return Err(node_err(
                    g,
                    a,
                    format!(
                        "cannot split the attention by heads: its {what} do not come from a \
                         projection (nn.matmul) through per-head ops only; met {}",
                        g.describe(v)
                    ),
                ))
            }
        }
    }
}

/// Walks forward from an attention to the matmul that projects its output.
fn trace_output_projection(g: &Graph, a: NodeId) -> Result<NodeId> {
    let mut v = a;
    loop {
        let users = g.users(v);
        let [u] = users.as_slice() else {
            return Err(node_err(
                g,
                a,
                format!(
                    "cannot split the attention by heads: {} has {} users where one output \
                     projection (nn.matmul) was expected",
                    g.describe(v),
                    users.len()
                ),
            ));
        };
        let u = *u;
        match &g.node(u).op {
            Op::Nn(Nn::MatMul { .. }) if g.inputs(u)[0] == v => return Ok(u),
            Op::View(View::Reshape(_))
            | Op::Ew(Elementwise::Unary(_) | Elementwise::Scalar(..) | Elementwise::Cast(_)) => {
                v = u
            }
            _ => {
                return Err(node_err(
                    g,
                    a,
                    format!(
                        "cannot split the attention by heads: its output reaches {} before an \
                         output projection (nn.matmul)",
                        g.describe(u)
                    ),
                ))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Building one rank's graph: layouts propagated node by node.

/// How a value is laid out over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// Every rank holds all of it.
    Rep,
    /// `axis` is cut in `parts` chunks; rank `r` holds chunk `r · parts / n`.
    Split { axis: usize, parts: usize },
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layout::Rep => f.write_str("replicated"),
            Layout::Split { axis, parts } => write!(f, "split on axis {axis} in {parts} parts"),
        }
    }
}

/// The per-rank type of a value of full type `ty` laid out as `l`.
fn local_type(ty: &TensorType, l: Layout) -> Result<TensorType, String> {
    match l {
        Layout::Rep => Ok(ty.clone()),
        Layout::Split { axis, parts } => {
            let mut dims = ty.dims().to_vec();
            let d = dims
                .get(axis)
                .and_then(Dim::as_const)
                .ok_or_else(|| format!("axis {axis} of {ty} must be a constant to split"))?;
            if d % parts != 0 {
                return Err(format!(
                    "axis {axis} of {ty} ({d}) does not divide into {parts} parts"
                ));
            }
            dims[axis] = Dim::c(d / parts);
            Ok(TensorType::new(ty.dtype, Shape(dims)))
        }
    }
}

/// A product of dims as its constant factor and its sorted symbolic factors.
fn product(dims: &[Dim]) -> (usize, Vec<Dim>) {
    let mut c = 1usize;
    let mut syms = Vec::new();
    for d in dims {
        match d.as_const() {
            Some(k) => c *= k,
            None => syms.push(d.clone()),
        }
    }
    syms.sort();
    (c, syms)
}

/// The output axis of a reshape that carries input axis `a` cut in `parts`:
/// one whose outer product and block (the axis times what follows) equal
/// the input's, so every rank's chunk is the same elements before and after.
fn reshape_axis(from: &Shape, to: &Shape, a: usize, parts: usize) -> Option<usize> {
    let outer = product(&from.dims()[..a]);
    let block = product(&from.dims()[a..]);
    (0..to.rank()).find(|&b| {
        to.dims()[b].as_const().is_some_and(|d| d % parts == 0)
            && product(&to.dims()[..b]) == outer
            && product(&to.dims()[b..]) == block
    })
}

struct RankBuilder<'a> {
    g: &'a Graph,
    plan: &'a Plan,
    rank: usize,
    out: Graph,
    map: BTreeMap<NodeId, (NodeId, Layout)>,
}

fn build_rank(g: &Graph, plan: &Plan, rank: usize) -> Result<Graph> {
    let mut b = RankBuilder {
        g,
        plan,
        rank,
        out: Graph::new(&g.name, &g.symbols().collect::<Vec<_>>()),
        map: BTreeMap::new(),
    };
    for id in g.topo_order()? {
        let (new, layout) = b.node(id)?;
        let want = local_type(&g.node(id).ty, layout).map_err(|m| node_err(g, id, m))?;
        if b.out.node(new).ty != want {
            return Err(node_err(
                g,
                id,
                format!(
                    "internal: rank {rank}'s node is {} but {} laid out {layout} is {want}",
                    b.out.node(new).ty,
                    g.node(id).ty
                ),
            ));
        }
        b.map.insert(id, (new, layout));
    }
    for (name, id) in g.outputs() {
        let (new, layout) = b.map[id];
        if layout != Layout::Rep {
            return Err(node_err(
                g,
                *id,
                format!(
                    "output \"{name}\" would be {layout} over the ranks; an output must be whole \
                     on every rank (the pass knows no collective for this node)"
                ),
            ));
        }
        b.out.set_output(name, new)?;
    }
    b.out.verify()?;
    Ok(b.out)
}

impl RankBuilder<'_> {
    fn err(&self, id: NodeId, msg: String) -> IrError {
        node_err(self.g, id, msg)
    }

    /// Adds `op` on the mapped inputs under the original node's name and place.
    fn add(&mut self, id: NodeId, op: Op, ins: &[NodeId], suffix: &str) -> Result<NodeId> {
        let node = self.g.node(id);
        let name = format!("{}{suffix}", node.name);
        self.out.add(op, ins, &name, node.loc.clone())
    }

    /// `x` all-reduced (after a split contraction).
    fn all_reduce(&mut self, id: NodeId, x: NodeId) -> Result<NodeId> {
        let ranks = self.plan.n;
        self.add(id, Op::Comm(Comm::AllReduce { ranks }), &[x], "")
    }

    fn refuse(&self, id: NodeId, ls: &[Layout]) -> IrError {
        let ins: Vec<String> = self
            .g
            .inputs(id)
            .iter()
            .zip(ls)
            .map(|(&i, l)| format!("{} is {l}", self.g.describe(i)))
            .collect();
        self.err(
            id,
            format!(
                "the sharding pass cannot split this op with its inputs laid out as they are: {}",
                ins.join("; ")
            ),
        )
    }

    fn node(&mut self, id: NodeId) -> Result<(NodeId, Layout)> {
        let g = self.g;
        let node = g.node(id);
        let orig_ins = g.inputs(id);
        let ins: Vec<NodeId> = orig_ins.iter().map(|i| self.map[i].0).collect();
        let ls: Vec<Layout> = orig_ins.iter().map(|i| self.map[i].1).collect();
        let all_rep = ls.iter().all(|l| *l == Layout::Rep);
        let n = self.plan.n;
        let layout = match &node.op {
            Op::Input(kind) => {
                let slice = self
                    .plan
                    .inputs
                    .get(&id)
                    .copied()
                    .unwrap_or(Slice::Replicated);
                let l = match slice {
                    Slice::Replicated => Layout::Rep,
                    Slice::Split { axis, parts, .. } => Layout::Split { axis, parts },
                };
                let ty = local_type(&node.ty, l).map_err(|m| self.err(id, m))?;
                let new = self
                    .out
                    .add_input(*kind, &node.name, ty, node.loc.clone())?;
                return Ok((new, l));
            }
            Op::Comm(_) => {
                return Err(self.err(
                    id,
                    "the graph already holds collectives: it is split already".into(),
                ))
            }
            // Replicated inputs: the op runs whole on every rank.
            _ if all_rep => Layout::Rep,
            Op::Ew(Elementwise::Unary(_) | Elementwise::Scalar(..) | Elementwise::Cast(_)) => ls[0],
            Op::Ew(Elementwise::Binary(_)) => {
                let out_rank = node.ty.rank();
                let mut split = None;
                for (&i, l) in orig_ins.iter().zip(&ls) {
                    if let Layout::Split { axis, parts } = *l {
                        let b = axis + out_rank - g.node(i).ty.rank();
                        if split.is_some_and(|s| s != (b, parts)) {
                            return Err(self.refuse(id, &ls));
                        }
                        split = Some((b, parts));
                    }
                }
                let (b, parts) = split.ok_or_else(|| self.refuse(id, &ls))?;
                for (&i, l) in orig_ins.iter().zip(&ls) {
                    let r = g.node(i).ty.rank();
                    // A replicated operand must broadcast along the split axis.
                    if *l == Layout::Rep && b + r >= out_rank {
                        let d = &g.node(i).ty.dims()[b + r - out_rank];
                        if d.as_const() != Some(1) {
                            return Err(self.refuse(id, &ls));
                        }
                    }
                }
                Layout::Split { axis: b, parts }
            }
            Op::Reduce { axis, .. } => match ls[0] {
                Layout::Split { axis: a, .. } if a == *axis => return Err(self.refuse(id, &ls)),
                l => l,
            },
            Op::View(View::Reshape(to)) => {
                let Layout::Split { axis, parts } = ls[0] else {
                    return Err(self.refuse(id, &ls));
                };
                let from = &g.node(orig_ins[0]).ty.shape;
                let b = reshape_axis(from, to, axis, parts).ok_or_else(|| {
                    self.err(
                        id,
                        format!(
                            "a reshape from {from} to {to} does not keep axis {axis} cut in \
                             {parts} parts whole on each rank"
                        ),
                    )
                })?;
                let l = Layout::Split { axis: b, parts };
                let shape = local_type(&node.ty, l).map_err(|m| self.err(id, m))?.shape;
                let new = self.add(id, Op::View(View::Reshape(shape)), &ins, "")?;
                return Ok((new, l));
            }
            Op::View(View::Permute(perm)) => match ls[0] {
                Layout::Split { axis, parts } => Layout::Split {
                    axis: perm.iter().position(|&p| p == axis).unwrap_or(axis),
                    parts,
                },
                Layout::Rep => Layout::Rep,
            },
            Op::View(View::Slice { axis, .. }) => match ls[0] {
                Layout::Split { axis: a, .. } if a == *axis => return Err(self.refuse(id, &ls)),
                l => l,
            },
            Op::View(View::Concat { axis }) => {
                if ls.iter().any(|l| *l != ls[0])
                    || matches!(ls[0], Layout::Split { axis: a, .. } if a == *axis)
                {
                    return Err(self.refuse(id, &ls));
                }
                ls[0]
            }
            Op::Nn(Nn::RmsNorm { .. }) => match (ls[0], ls[1]) {
                (Layout::Split { axis, parts }, Layout::Rep) if axis + 1 < node.ty.rank() => {
                    Layout::Split { axis, parts }
                }
                _ => return Err(self.refuse(id, &ls)),
            },
            Op::Nn(Nn::Rope { .. }) => match (ls[0], ls[1]) {
                (Layout::Split { axis: 1, parts }, Layout::Rep) => Layout::Split { axis: 1, parts },
                _ => return Err(self.refuse(id, &ls)),
            },
            Op::Nn(Nn::MatMul { .. }) => {
                let last = node.ty.rank() - 1;
                let x_last = g.node(orig_ins[0]).ty.rank() - 1;
                match (ls[0], ls[1]) {
                    // Column-parallel: each rank computes its output features.
                    (Layout::Rep, Layout::Split { axis: 0, parts }) => {
                        let l = Layout::Split { axis: last, parts };
                        if !self.plan.gather.contains(&id) {
                            l
                        } else {
                            let part = self.add(id, node.op.clone(), &ins, ".local")?;
                            let op = Op::Comm(Comm::AllGather {
                                axis: last,
                                ranks: n,
                            });
                            let new = self.add(id, op, &[part], "")?;
                            return Ok((new, Layout::Rep));
                        }
                    }
                    // Row-parallel: a partial sum over the rank's features.
                    (Layout::Split { axis, parts }, Layout::Split { axis: 1, parts: wp })
                        if axis == x_last && parts == n && wp == n =>
                    {
                        let part = self.add(id, node.op.clone(), &ins, ".partial")?;
                        let new = self.all_reduce(id, part)?;
                        return Ok((new, Layout::Rep));
                    }
                    _ => return Err(self.refuse(id, &ls)),
                }
            }
            Op::Attn(Attn::KvAppend { .. }) => match (ls[0], ls[1]) {
                (Layout::Split { axis: 1, parts }, Layout::Split { axis: 1, parts: p2 })
                    if parts == p2 =>
                {
                    Layout::Split { axis: 1, parts }
                }
                _ => return Err(self.refuse(id, &ls)),
            },
            Op::Attn(Attn::Attention { .. }) => self.attention(id, &ls)?,
            Op::Moe(Moe::Experts) => {
                let slice = |i: usize| self.plan.inputs.get(&orig_ins[i]).copied();
                let routing_rep = ls[..3].iter().all(|l| *l == Layout::Rep);
                if !routing_rep {
                    return Err(self.refuse(id, &ls));
                }
                let ins = match (self.plan.par.experts, slice(3), slice(4)) {
                    (
                        ExpertSplit::Tensor,
                        Some(Slice::Split {
                            axis: 1,
                            parts: p1,
                            blocks: 2,
                        }),
                        Some(Slice::Split {
                            axis: 2,
                            parts: p2,
                            blocks: 1,
                        }),
                    ) if p1 == n && p2 == n => ins,
                    (
                        ExpertSplit::Expert,
                        Some(Slice::Split {
                            axis: 0,
                            parts: p1,
                            blocks: 1,
                        }),
                        Some(Slice::Split {
                            axis: 0,
                            parts: p2,
                            blocks: 1,
                        }),
                    ) if p1 == n && p2 == n => {
                        let count = const_dim(g, orig_ins[3], 0)? / n;
                        let op = Op::Moe(Moe::LocalIndex {
                            first: self.rank * count,
                            count,
                        });
                        let local = self.add(id, op, &[ins[1]], ".local_index")?;
                        vec![ins[0], local, ins[2], ins[3], ins[4]]
                    }
                    _ => return Err(self.refuse(id, &ls)),
                };
                let part = self.add(id, node.op.clone(), &ins, ".partial")?;
                let new = self.all_reduce(id, part)?;
                return Ok((new, Layout::Rep));
            }
            Op::Nn(Nn::Embedding) | Op::Moe(_) | Op::Sample(_) => return Err(self.refuse(id, &ls)),
        };
        let new = self.add(id, node.op.clone(), &ins, "")?;
        Ok((new, layout))
    }

    /// Attention on the rank's heads: checks that every query head the rank
    /// holds reads a KV head the rank holds, in the grouped-query order.
    fn attention(&self, id: NodeId, ls: &[Layout]) -> Result<Layout> {
        let g = self.g;
        let n = self.plan.n;
        let ins = g.inputs(id);
        let (Layout::Split { axis: 1, parts: pq }, Layout::Split { axis: 1, parts: pk }) =
            (ls[0], ls[1])
        else {
            return Err(self.refuse(id, ls));
        };
        if ls[2] != ls[1]
            || ls
                .get(3)
                .is_some_and(|s| *s != Layout::Split { axis: 0, parts: pq })
        {
            return Err(self.refuse(id, ls));
        }
        let hq = const_dim(g, ins[0], 1)?;
        let hkv = const_dim(g, ins[1], 1)?;
        let (hq_r, hkv_r) = (hq / pq, hkv / pk);
        if hkv_r == 0 || hq_r % hkv_r != 0 {
            return Err(self.refuse(id, ls));
        }
        let (group, group_r) = (hq / hkv, hq_r / hkv_r);
        for r in 0..n {
            let (cq, ck) = (r * pq / n, r * pk / n);
            for i in 0..hq_r {
                let global_kv = (cq * hq_r + i) / group;
                if global_kv != ck * hkv_r + i / group_r {
                    return Err(self.err(
                        id,
                        format!(
                            "rank {r}'s query head {} reads KV head {global_kv}, which the rank \
                             does not hold in that place ({hq} query heads over {pq} parts, \
                             {hkv} KV heads over {pk})",
                            cq * hq_r + i
                        ),
                    ));
                }
            }
        }
        Ok(Layout::Split { axis: 1, parts: pq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    #[test]
    fn slice_ranges() {
        let s = Slice::Split {
            axis: 1,
            parts: 2,
            blocks: 2,
        };
        assert_eq!(s.ranges(1, 2, 8), vec![2..4, 6..8]);
        // Two parts over four ranks: neighbours share a chunk.
        assert_eq!(split(0, 2).ranges(1, 4, 6), vec![0..3]);
        assert_eq!(split(0, 2).ranges(2, 4, 6), vec![3..6]);
    }

    #[test]
    fn slices_tensors() {
        let t = Tensor::f32(DType::F32, &[2, 4], (0..8).map(|x| x as f32).collect()).unwrap();
        let cols = slice_tensor(
            &t,
            &Slice::Split {
                axis: 1,
                parts: 2,
                blocks: 1,
            },
            1,
            2,
        )
        .unwrap();
        assert_eq!(cols.shape, vec![2, 2]);
        assert_eq!(cols.to_f32(), vec![2.0, 3.0, 6.0, 7.0]);
        let rows = slice_tensor(&t, &split(0, 2), 0, 2).unwrap();
        assert_eq!(rows.to_f32(), vec![0.0, 1.0, 2.0, 3.0]);
        assert!(slice_tensor(&t, &split(0, 4), 0, 4).is_err());
    }

    #[test]
    fn slices_fp4_in_blocks() {
        use crate::fp4::{quantize, Fp4Format};
        let v: Vec<f32> = (0..2 * 64).map(|x| (x as f32 * 0.37).sin()).collect();
        let q = quantize(&v, 64, Fp4Format::Mx).unwrap();
        let t = Tensor::fp4(&[2, 64], q).unwrap();
        let full = t.to_f32();
        let last = Slice::Split {
            axis: 1,
            parts: 2,
            blocks: 1,
        };
        let s = slice_tensor(&t, &last, 1, 2).unwrap();
        assert_eq!(s.shape, vec![2, 32]);
        let want: Vec<f32> = [&full[32..64], &full[96..128]].concat();
        assert_eq!(s.to_f32(), want);
        let r = slice_tensor(&t, &split(0, 2), 1, 2).unwrap();
        assert_eq!(r.to_f32(), full[64..].to_vec());
        // 16 columns are half an MXFP4 block.
        assert!(slice_tensor(
            &t,
            &Slice::Split {
                axis: 1,
                parts: 4,
                blocks: 1
            },
            0,
            4
        )
        .is_err());
    }

    #[test]
    fn reshape_keeps_heads() {
        let t = Dim::sym("T");
        let flat = Shape(vec![t.clone(), Dim::c(64)]);
        let heads = Shape(vec![t.clone(), Dim::c(4), Dim::c(16)]);
        assert_eq!(reshape_axis(&flat, &heads, 1, 2), Some(1));
        assert_eq!(reshape_axis(&heads, &flat, 1, 4), Some(1));
        // 4 heads do not cut into 8 whole parts.
        assert_eq!(reshape_axis(&flat, &heads, 1, 8), None);
    }
}
