//! The builder: typed constructors for every op, name scopes and source places.
//!
//! Model code (by hand or expanded from the graph DSL) calls these methods; each
//! checks its inputs at once, so a shape mismatch is reported where the author
//! wrote it: the error names the node (`layer0.attn.q`), the op, the author's
//! `file:line` and the expected and found shapes.

use crate::dtype::DType;
use crate::error::Result;
use crate::graph::{Graph, Loc, NodeId};
use crate::op::{
    Attn, BinaryOp, Elementwise, InputKind, Mask, Moe, Nn, Op, ReduceKind, Sample, ScoreFn,
    TensorType, UnaryOp, View,
};
use crate::shape::{Dim, Shape};

/// Builds a [`Graph`] with dotted names from a scope stack and the author's
/// current source place.
#[derive(Debug)]
pub struct Builder {
    graph: Graph,
    scope: Vec<String>,
    loc: Option<Loc>,
    counter: std::collections::BTreeMap<String, usize>,
}

/// Router settings shared by [`Builder::router_select`] and [`Builder::router_weights`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterConfig {
    /// Score function.
    pub score: ScoreFn,
    /// Experts per token.
    pub top_k: usize,
    /// Expert groups (1 = no grouping).
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
    /// Renormalise the chosen weights.
    pub norm_topk: bool,
    /// Added to the renormalisation denominator.
    pub norm_eps: f32,
    /// Routed scaling factor.
    pub scale: f32,
}

impl Builder {
    /// A builder for a graph named `name` declaring `symbols`.
    pub fn new(name: &str, symbols: &[&str]) -> Builder {
        Builder {
            graph: Graph::new(name, symbols),
            scope: Vec::new(),
            loc: None,
            counter: Default::default(),
        }
    }

    /// Continues building on an existing graph.
    pub fn from_graph(graph: Graph) -> Builder {
        Builder {
            graph,
            scope: Vec::new(),
            loc: None,
            counter: Default::default(),
        }
    }

    /// The graph so far.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Finishes: verifies and returns the graph.
    pub fn finish(self) -> Result<Graph> {
        self.graph.verify()?;
        Ok(self.graph)
    }

    /// Enters a name scope (`layer3`, then `attn`): names become `layer3.attn.x`.
    pub fn push_scope(&mut self, s: &str) {
        self.scope.push(s.to_string());
    }

    /// Leaves the innermost name scope.
    pub fn pop_scope(&mut self) {
        self.scope.pop();
    }

    /// Runs `f` inside the scope `s`.
    pub fn scoped<R>(&mut self, s: &str, f: impl FnOnce(&mut Builder) -> R) -> R {
        self.push_scope(s);
        let r = f(self);
        self.pop_scope();
        r
    }

    /// Sets the source place recorded on the next nodes.
    pub fn set_loc(&mut self, file: &str, line: u32) {
        self.loc = Some(Loc {
            file: file.to_string(),
            line,
        });
    }

    /// The full dotted name for a local name in the current scope.
    pub fn scoped_name(&self, local: &str) -> String {
        if self.scope.is_empty() {
            local.to_string()
        } else if local.is_empty() {
            self.scope.join(".")
        } else {
            format!("{}.{local}", self.scope.join("."))
        }
    }

    /// Renames a node to `local` in the current scope (used when a value is bound to a name).
    pub fn name(&mut self, id: NodeId, local: &str) -> NodeId {
        if !matches!(self.graph.node(id).op, Op::Input(_)) {
            self.graph.node_mut(id).name = self.scoped_name(local);
        }
        id
    }

    /// The type of a node.
    pub fn ty(&self, id: NodeId) -> &TensorType {
        &self.graph.node(id).ty
    }

    /// The shape of a node.
    pub fn shape(&self, id: NodeId) -> &Shape {
        &self.graph.node(id).ty.shape
    }

    /// Marks an output.
    pub fn output(&mut self, name: &str, id: NodeId) -> Result<()> {
        self.graph.set_output(name, id)
    }

    /// Inputs, weights and caches are named verbatim (not scoped): their names
    /// are the parameter names a loader and a runtime look them up by.
    fn input_of(
        &mut self,
        kind: InputKind,
        name: &str,
        dtype: DType,
        shape: Shape,
    ) -> Result<NodeId> {
        self.graph
            .add_input(kind, name, TensorType::new(dtype, shape), self.loc.clone())
    }

    /// A per-call activation input.
    pub fn input(&mut self, name: &str, dtype: DType, shape: Shape) -> Result<NodeId> {
        self.input_of(InputKind::Activation, name, dtype, shape)
    }

    /// A weight, named by its parameter name (`model.layers.0.self_attn.q_proj.weight`).
    pub fn weight(&mut self, name: &str, dtype: DType, shape: Shape) -> Result<NodeId> {
        self.input_of(InputKind::Weight, name, dtype, shape)
    }

    /// A KV cache `[capacity, kv_heads, head_dim]`.
    pub fn cache(&mut self, name: &str, dtype: DType, shape: Shape) -> Result<NodeId> {
        self.input_of(InputKind::Cache, name, dtype, shape)
    }

    /// Adds any op with a default name `op_n` in the current scope.
    pub fn op(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        let base = op.mnemonic().rsplit('.').next().unwrap_or("v").to_string();
        let key = self.scoped_name(&base);
        let n = self.counter.entry(key.clone()).or_insert(0);
        let name = if *n == 0 { key } else { format!("{key}_{n}") };
        *n += 1;
        let loc = self.loc.clone();
        self.graph.add(op, inputs, &name, loc)
    }

    /// Unary math.
    pub fn unary(&mut self, u: UnaryOp, x: NodeId) -> Result<NodeId> {
        self.op(Op::Ew(Elementwise::Unary(u)), &[x])
    }

    /// Binary math with broadcasting.
    pub fn binary(&mut self, b: BinaryOp, x: NodeId, y: NodeId) -> Result<NodeId> {
        self.op(Op::Ew(Elementwise::Binary(b)), &[x, y])
    }

    /// `x + y`.
    pub fn add(&mut self, x: NodeId, y: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Add, x, y)
    }

    /// `x * y`.
    pub fn mul(&mut self, x: NodeId, y: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Mul, x, y)
    }

    /// `x op c`.
    pub fn scalar(&mut self, b: BinaryOp, x: NodeId, c: f32) -> Result<NodeId> {
        self.op(Op::Ew(Elementwise::Scalar(b, c)), &[x])
    }

    /// `x * c`.
    pub fn scale(&mut self, x: NodeId, c: f32) -> Result<NodeId> {
        self.scalar(BinaryOp::Mul, x, c)
    }

    /// `silu(x)`.
    pub fn silu(&mut self, x: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Silu, x)
    }

    /// Cast to `to`.
    pub fn cast(&mut self, x: NodeId, to: DType) -> Result<NodeId> {
        self.op(Op::Ew(Elementwise::Cast(to)), &[x])
    }

    /// Reduction over `axis` (kept with size 1).
    pub fn reduce(&mut self, kind: ReduceKind, x: NodeId, axis: usize) -> Result<NodeId> {
        self.op(Op::Reduce { kind, axis }, &[x])
    }

    /// Reshape.
    pub fn reshape(&mut self, x: NodeId, shape: Shape) -> Result<NodeId> {
        self.op(Op::View(View::Reshape(shape)), &[x])
    }

    /// Axis permutation.
    pub fn permute(&mut self, x: NodeId, perm: &[usize]) -> Result<NodeId> {
        self.op(Op::View(View::Permute(perm.to_vec())), &[x])
    }

    /// `len` elements from `start` along `axis`.
    pub fn slice(
        &mut self,
        x: NodeId,
        axis: usize,
        start: impl Into<Dim>,
        len: impl Into<Dim>,
    ) -> Result<NodeId> {
        self.op(
            Op::View(View::Slice {
                axis,
                start: start.into(),
                len: len.into(),
            }),
            &[x],
        )
    }

    /// Concatenation along `axis`.
    pub fn concat(&mut self, xs: &[NodeId], axis: usize) -> Result<NodeId> {
        self.op(Op::View(View::Concat { axis }), xs)
    }

    /// `table[ids]`.
    pub fn embedding(&mut self, table: NodeId, ids: NodeId) -> Result<NodeId> {
        self.op(Op::Nn(Nn::Embedding), &[table, ids])
    }

    /// RMSNorm over the last axis.
    pub fn rms_norm(&mut self, x: NodeId, w: NodeId, eps: f32) -> Result<NodeId> {
        self.op(Op::Nn(Nn::RmsNorm { eps }), &[x, w])
    }

    /// `x @ w^T` with the output in x's dtype.
    pub fn matmul(&mut self, x: NodeId, w: NodeId) -> Result<NodeId> {
        let out = self.ty(x).dtype;
        self.matmul_to(x, w, out)
    }

    /// `x @ w^T` with the output in `out`.
    pub fn matmul_to(&mut self, x: NodeId, w: NodeId, out: DType) -> Result<NodeId> {
        self.op(Op::Nn(Nn::MatMul { out }), &[x, w])
    }

    /// Rotate-half RoPE on the first `rot_dims` of each head.
    pub fn rope(&mut self, x: NodeId, pos: NodeId, theta: f32, rot_dims: usize) -> Result<NodeId> {
        self.op(Op::Nn(Nn::Rope { theta, rot_dims }), &[x, pos])
    }

    /// Appends rows to a KV cache holding `len` entries; returns the logical view.
    pub fn kv_append(
        &mut self,
        cache: NodeId,
        new: NodeId,
        len: impl Into<Dim>,
        ring: bool,
    ) -> Result<NodeId> {
        self.op(
            Op::Attn(Attn::KvAppend {
                len: len.into(),
                ring,
            }),
            &[cache, new],
        )
    }

    /// Attention; `sinks` adds one logit per query head as an extra softmax column.
    pub fn attention(
        &mut self,
        q: NodeId,
        k: NodeId,
        v: NodeId,
        sinks: Option<NodeId>,
        mask: Mask,
        scale: f32,
    ) -> Result<NodeId> {
        let mut ins = vec![q, k, v];
        ins.extend(sinks);
        self.op(
            Op::Attn(Attn::Attention {
                mask,
                scale,
                sinks: sinks.is_some(),
            }),
            &ins,
        )
    }

    /// Expert choice from f32 router logits.
    pub fn router_select(
        &mut self,
        logits: NodeId,
        bias: Option<NodeId>,
        cfg: &RouterConfig,
    ) -> Result<NodeId> {
        let mut ins = vec![logits];
        ins.extend(bias);
        self.op(
            Op::Moe(Moe::RouterSelect {
                score: cfg.score,
                top_k: cfg.top_k,
                n_group: cfg.n_group,
                topk_group: cfg.topk_group,
                bias: bias.is_some(),
            }),
            &ins,
        )
    }

    /// Weights of the chosen experts.
    pub fn router_weights(
        &mut self,
        logits: NodeId,
        idx: NodeId,
        cfg: &RouterConfig,
    ) -> Result<NodeId> {
        self.op(
            Op::Moe(Moe::RouterWeights {
                score: cfg.score,
                norm: cfg.norm_topk,
                norm_eps: cfg.norm_eps,
                scale: cfg.scale,
            }),
            &[logits, idx],
        )
    }

    /// The routed SwiGLU experts, weighted and summed.
    pub fn experts(
        &mut self,
        x: NodeId,
        idx: NodeId,
        w: NodeId,
        gate_up: NodeId,
        down: NodeId,
    ) -> Result<NodeId> {
        self.op(Op::Moe(Moe::Experts), &[x, idx, w, gate_up, down])
    }

    /// Argmax over the last axis.
    pub fn argmax(&mut self, x: NodeId) -> Result<NodeId> {
        self.op(Op::Sample(Sample::Argmax), &[x])
    }

    /// Sampling at `temperature` with a `(seed, counter)` input.
    pub fn sample(&mut self, logits: NodeId, seed: NodeId, temperature: f32) -> Result<NodeId> {
        self.op(Op::Sample(Sample::Sample { temperature }), &[logits, seed])
    }
}
