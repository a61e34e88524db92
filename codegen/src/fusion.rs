//! The fused graph: the IR graph plus its partition into kernels.
//!
//! Every computing node ends up in exactly one [`Group`]; a group is one
//! kernel (two for the routed experts). Reshapes of contiguous tensors are
//! not computed: they are aliases of their input's buffer
//! ([`Fused::storage`]). A KV-cache append's output is a view of the cache.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use tilefuse_ir::{Attn, Graph, NodeId, Op, View};

use crate::error::CodegenError;

/// What a kernel does; the anchor op decides the template it lowers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// Rows of a table gathered by token ids.
    Embedding {
        /// The `nn.embedding` node.
        node: NodeId,
    },
    /// `x @ w^T`, with an optional RMSNorm prologue on `x`.
    MatVec {
        /// The `nn.matmul` node.
        matmul: NodeId,
        /// The `nn.rms_norm` whose output is `x`, recomputed in the prologue.
        norm: Option<NodeId>,
        /// Further matmuls of the same `x` computed by the same kernel, as
        /// if their weights' rows followed `matmul`'s (the plan lays those
        /// weights out one after the other): the q, k and v projections in
        /// one step. Empty for a single matmul.
        siblings: Vec<Sibling>,
    },
    /// RoPE (and an optional per-head norm) on new keys, and the K and V cache appends.
    RopeAppend {
        /// The `attn.kv_append` of the keys.
        k_append: NodeId,
        /// The `attn.kv_append` of the values.
        v_append: NodeId,
        /// The `nn.rope` on the keys.
        k_rope: NodeId,
        /// A per-head `nn.rms_norm` before the key RoPE.
        k_norm: Option<NodeId>,
    },
    /// Attention over the caches, with RoPE (and an optional per-head norm) on the queries.
    Attention {
        /// The `attn.attention` node.
        attn: NodeId,
        /// The `nn.rope` on the queries.
        q_rope: NodeId,
        /// A per-head `nn.rms_norm` before the query RoPE.
        q_norm: Option<NodeId>,
        /// The group that appends this attention's keys and values.
        append: NodeId,
        /// This kernel appends them itself (RoPE, an optional per-head norm
        /// on the keys): the new rows are the queries' own tokens, at the
        /// queries' positions. Otherwise a [`KernelKind::RopeAppend`] kernel
        /// runs before it.
        fused_append: bool,
        /// Keys split across tiles (flash-decoding): partials go to a
        /// workspace that an [`KernelKind::AttentionCombine`] kernel merges.
        split: bool,
    },
    /// Merges the split-key partials of an attention into its output.
    AttentionCombine {
        /// The `attn.attention` node.
        attn: NodeId,
    },
    /// Expert choice and weights, and the routing table of the expert kernels.
    Router {
        /// The `moe.router_select` node.
        select: NodeId,
        /// The `moe.router_weights` node.
        weights: NodeId,
    },
    /// Gate/up projections and SiLU·mul of the chosen experts (writes a workspace).
    ExpertsUp {
        /// The `moe.experts` node.
        experts: NodeId,
        /// The `moe.router_select` and `moe.router_weights` that choose the
        /// experts, when this kernel computes them itself: every tile runs
        /// the router on the logits before its expert rows, and tile 0 also
        /// writes the choice, the weights and the routing table for the down
        /// kernel (`routed_up_tile` in `moe.cuh`; see
        /// [`crate::passes::route_in_up`]). None: a router kernel did.
        router: Option<(NodeId, NodeId)>,
    },
    /// Down projections of the chosen experts, weighted and summed.
    ExpertsDown {
        /// The `moe.experts` node.
        experts: NodeId,
    },
    /// A standalone RMSNorm over rows.
    RmsNorm {
        /// The node.
        node: NodeId,
    },
    /// Elementwise nodes of one element count, computed per element.
    Elementwise,
    /// Inputs joined along one axis, copied element by element.
    Concat {
        /// The `view.concat` node.
        node: NodeId,
    },
    /// Index of the largest logit.
    Argmax {
        /// The node.
        node: NodeId,
    },
    /// Sampling from logits.
    Sample {
        /// The node.
        node: NodeId,
    },
}

impl KernelKind {
    /// A short name for printing and kernel names.
    pub fn short(&self) -> &'static str {
        match self {
            KernelKind::Embedding { .. } => "embedding",
            KernelKind::MatVec {
                norm: Some(_),
                siblings,
                ..
            } if !siblings.is_empty() => "norm_matvecs",
            KernelKind::MatVec { norm: Some(_), .. } => "norm_matvec",
            KernelKind::MatVec { siblings, .. } if !siblings.is_empty() => "matvecs",
            KernelKind::MatVec { .. } => "matvec",
            KernelKind::RopeAppend { .. } => "rope_append",
            KernelKind::Attention { .. } => "attention",
            KernelKind::AttentionCombine { .. } => "attention_combine",
            KernelKind::Router { .. } => "router",
            KernelKind::ExpertsUp {
                router: Some(_), ..
            } => "moe_routed_up",
            KernelKind::ExpertsUp { .. } => "moe_up",
            KernelKind::ExpertsDown { .. } => "moe_down",
            KernelKind::RmsNorm { .. } => "rms_norm",
            KernelKind::Elementwise => "elementwise",
            KernelKind::Concat { .. } => "concat",
            KernelKind::Argmax { .. } => "argmax",
            KernelKind::Sample { .. } => "sample",
        }
    }
}

/// One kernel: its kind, the nodes it computes and the elementwise epilogue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// What the kernel does.
    pub kind: KernelKind,
    /// Every node it computes (the anchor, prologue and epilogue nodes).
    pub nodes: BTreeSet<NodeId>,
    /// Elementwise nodes applied to the anchor's result, in order; the last
    /// one's value is what the kernel stores.
    pub epilogue: Vec<NodeId>,
}

/// A further matmul of a matvec kernel ([`KernelKind::MatVec`]'s
/// `siblings`) with its own epilogue: what [`Group::epilogue`] is to the
/// kernel's first matmul, applied to this matmul's rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sibling {
    /// The `nn.matmul` node.
    pub matmul: NodeId,
    /// Elementwise nodes applied to its result, in order.
    pub epilogue: Vec<NodeId>,
}

impl Group {
    /// A group of `kind` computing `nodes`.
    pub fn new(kind: KernelKind, nodes: impl IntoIterator<Item = NodeId>) -> Group {
        Group {
            kind,
            nodes: nodes.into_iter().collect(),
            epilogue: vec![],
        }
    }
}

/// The graph with its kernel partition, as the passes build it.
#[derive(Clone, Debug)]
pub struct Fused {
    /// The IR graph (rewritten by canonicalisation only).
    pub graph: Graph,
    /// Kernels, in creation order (scheduling orders them later).
    pub groups: Vec<Group>,
}

impl Fused {
    /// A graph with no kernels yet.
    pub fn new(graph: Graph) -> Fused {
        Fused {
            graph,
            groups: vec![],
        }
    }

    /// Which group computes `n`, if any.
    pub fn group_of(&self, n: NodeId) -> Option<usize> {
        self.groups.iter().position(|g| g.nodes.contains(&n))
    }

    /// All grouped nodes.
    pub fn grouped(&self) -> BTreeSet<NodeId> {
        self.groups
            .iter()
            .flat_map(|g| g.nodes.iter().copied())
            .collect()
    }

    /// True for nodes that own no storage: reshapes (aliases of their input).
    pub fn is_alias(&self, n: NodeId) -> bool {
        matches!(self.graph.node(n).op, Op::View(View::Reshape(_)))
    }

    /// The node whose buffer holds `n`'s value: through reshapes to the first
    /// node that owns storage (a KV append's view resolves to itself).
    pub fn storage(&self, mut n: NodeId) -> NodeId {
        while self.is_alias(n) {
            match self.graph.inputs(n).first() {
                Some(&i) => n = i,
                None => break,
            }
        }
        n
    }

    /// The users of `n`, looking through reshapes: the first non-alias consumers.
    pub fn real_users(&self, n: NodeId) -> Vec<NodeId> {
        let mut out = BTreeSet::new();
        let mut stack = vec![n];
        while let Some(x) = stack.pop() {
            for u in self.graph.users(x) {
                if self.is_alias(u) {
                    stack.push(u);
                } else {
                    out.insert(u);
                }
            }
        }
        out.into_iter().collect()
    }

    /// True when `n` (or a reshape of it) is a graph output.
    pub fn is_output(&self, n: NodeId) -> bool {
        self.graph
            .outputs()
            .iter()
            .any(|(_, o)| self.storage(*o) == n || *o == n)
    }

    /// Checks the partition: every computing node in exactly one group; the
    /// error names the node.
    pub fn verify(&self) -> Result<(), CodegenError> {
        self.graph.verify().map_err(CodegenError::Ir)?;
        let mut seen: BTreeMap<NodeId, usize> = BTreeMap::new();
        for (gi, g) in self.groups.iter().enumerate() {
            for &n in &g.nodes {
                if !self.graph.contains(n) {
                    return Err(CodegenError::Internal(format!(
                        "kernel k{gi} refers to a removed node"
                    )));
                }
                if let Some(other) = seen.insert(n, gi) {
                    return Err(CodegenError::Internal(format!(
                        "{} is computed by two kernels (k{other} and k{gi})",
                        self.graph.describe(n)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks that every computing node is in a group (after the last fusion pass).
    pub fn verify_complete(&self) -> Result<(), CodegenError> {
        self.verify()?;
        let grouped = self.grouped();
        for n in self.graph.topo_order().map_err(CodegenError::Ir)? {
            let op = &self.graph.node(n).op;
            if matches!(op, Op::Input(_)) || self.is_alias(n) {
                continue;
            }
            if !grouped.contains(&n) {
                return Err(CodegenError::Unsupported {
                    node: self.graph.describe(n),
                    reason: format!("no GPU kernel computes `{}` here yet", op.mnemonic()),
                });
            }
        }
        Ok(())
    }

    /// The KV-append node at the root of a cache view, if `n` is one.
    pub fn cache_view(&self, n: NodeId) -> Option<NodeId> {
        let s = self.storage(n);
        matches!(self.graph.node(s).op, Op::Attn(Attn::KvAppend { .. })).then_some(s)
    }
}

impl fmt::Display for Fused {
    /// The kernels (with their nodes by printed number), then the graph.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let num = self.graph.numbering();
        let p = |n: &NodeId| format!("%{}", num.get(n).copied().unwrap_or(usize::MAX));
        for (i, g) in self.groups.iter().enumerate() {
            let nodes: Vec<String> = g.nodes.iter().map(p).collect();
            write!(f, "kernel k{i} {} [{}]", g.kind.short(), nodes.join(", "))?;
            if !g.epilogue.is_empty() {
                let e: Vec<String> = g.epilogue.iter().map(p).collect();
                write!(f, " epilogue [{}]", e.join(", "))?;
            }
            if let KernelKind::MatVec { siblings, .. } = &g.kind {
                for sib in siblings.iter().filter(|s| !s.epilogue.is_empty()) {
                    let e: Vec<String> = sib.epilogue.iter().map(p).collect();
                    write!(f, " epilogue of {} [{}]", p(&sib.matmul), e.join(", "))?;
                }
            }
            writeln!(f)?;
        }
        write!(f, "{}", self.graph)
    }
}
