//! The graph: nodes holding ops, typed edges, named outputs, declared symbols.
//!
//! Storage is a petgraph `StableDiGraph` whose edges run from producer to
//! consumer and carry the consumer's input slot; a node's inputs are its
//! incoming edges ordered by slot. Node ids stay valid when other nodes are
//! removed, so passes can rewrite in place; removing a producer leaves its
//! consumers with a missing slot, which [`Graph::verify`] reports as dangling.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::error::{ErrorKind, IrError, Result};
use crate::op::{Attn, InputKind, Op, TensorType, View};
use crate::shape::{is_symbol, Shape};

/// A node of a [`Graph`]. Stable across removals of other nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) NodeIndex<u32>);

impl NodeId {
    /// The raw index (stable, not the printed number).
    pub fn index(self) -> usize {
        self.0.index()
    }
}

/// The place in the author's source that created a node.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Loc {
    /// Source file as given by `file!()`.
    pub file: String,
    /// Line.
    pub line: u32,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// One operation with its output type, readable name and origin.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The op.
    pub op: Op,
    /// The output type.
    pub ty: TensorType,
    /// Dotted readable name (`layer3.attn.q`); unique among inputs.
    pub name: String,
    /// Where the author's code created it.
    pub loc: Option<Loc>,
}

/// A tensor program: ops over symbolic shapes, with named outputs.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// The graph's name (a kernel-name prefix and printer header).
    pub name: String,
    symbols: BTreeSet<String>,
    g: StableDiGraph<Node, u32>,
    outputs: Vec<(String, NodeId)>,
}

impl Graph {
    /// An empty graph declaring `symbols`.
    pub fn new(name: &str, symbols: &[&str]) -> Graph {
        Graph {
            name: name.to_string(),
            symbols: symbols.iter().map(|s| s.to_string()).collect(),
            ..Graph::default()
        }
    }

    /// Declares one more symbol.
    pub fn declare_symbol(&mut self, s: &str) -> Result<()> {
        if !is_symbol(s) {
            return Err(IrError::new(
                ErrorKind::Parse,
                format!("`{s}` is not a symbol name (a letter, then letters, digits or _)"),
            ));
        }
        self.symbols.insert(s.to_string());
        Ok(())
    }

    /// The declared symbols in order.
    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.symbols.iter().map(String::as_str)
    }

    /// Adds a graph input of the given kind and declared type.
    pub fn add_input(
        &mut self,
        kind: InputKind,
        name: &str,
        ty: TensorType,
        loc: Option<Loc>,
    ) -> Result<NodeId> {
        let label = format!("{} \"{name}\"", Op::Input(kind).mnemonic());
        self.check_symbols(&ty.shape, &label)?;
        if let Some(other) = self.find_input(name) {
            return Err(IrError::new(
                ErrorKind::Duplicate,
                format!(
                    "an input named \"{name}\" already exists (node {}); input names must be unique",
                    other.index()
                ),
            )
            .at(label));
        }
        if kind == InputKind::Cache && ty.rank() != 3 {
            return Err(IrError::new(
                ErrorKind::Type,
                format!("a KV cache must be [capacity, kv_heads, head_dim], found {ty}"),
            )
            .at(label));
        }
        if kind != InputKind::Weight && ty.dtype.is_block_quantized() {
            return Err(IrError::new(
                ErrorKind::Type,
                format!("only weights may be {}, found {ty}", ty.dtype),
            )
            .at(label));
        }
        Ok(self.insert(
            Node {
                op: Op::Input(kind),
                ty,
                name: name.to_string(),
                loc,
            },
            &[],
        ))
    }

    /// Adds an op node: checks the inputs, infers the output type. The error
    /// names the would-be node, its op and where the author created it.
    pub fn add(
        &mut self,
        op: Op,
        inputs: &[NodeId],
        name: &str,
        loc: Option<Loc>,
    ) -> Result<NodeId> {
        let at = || {
            let mut s = format!("\"{name}\" ({})", op.mnemonic());
            if let Some(l) = &loc {
                s.push_str(&format!(" at {l}"));
            }
            s
        };
        if let Op::Input(_) = op {
            return Err(IrError::new(ErrorKind::Type, "use add_input for inputs").at(at()));
        }
        for (slot, id) in inputs.iter().enumerate() {
            if !self.g.contains_node(id.0) {
                return Err(IrError::new(
                    ErrorKind::Dangling,
                    format!(
                        "input {slot} refers to node {} which is not in the graph",
                        id.index()
                    ),
                )
                .at(at()));
            }
        }
        self.check_attr_symbols(&op).map_err(|e| e.at(at()))?;
        let tys: Vec<&TensorType> = inputs.iter().map(|&i| &self.g[i.0].ty).collect();
        let ty = op
            .infer(&tys)
            .map_err(|m| {
                let found: Vec<String> = tys.iter().map(|t| t.to_string()).collect();
                IrError::new(ErrorKind::Type, m)
                    .at(at())
                    .with_context(format!("  inputs: ({})", found.join(", ")))
            })?
            .ok_or_else(|| IrError::new(ErrorKind::Type, "op has no type rule").at(at()))?;
        Ok(self.insert(
            Node {
                op,
                ty,
                name: name.to_string(),
                loc,
            },
            inputs,
        ))
    }

    fn insert(&mut self, node: Node, inputs: &[NodeId]) -> NodeId {
        let id = self.g.add_node(node);
        for (slot, src) in inputs.iter().enumerate() {
            self.g.add_edge(src.0, id, slot as u32);
        }
        NodeId(id)
    }

    /// Marks `node` as an output named `name`.
    pub fn set_output(&mut self, name: &str, node: NodeId) -> Result<()> {
        if !self.g.contains_node(node.0) {
            return Err(IrError::new(
                ErrorKind::Dangling,
                format!("output \"{name}\" refers to a node that is not in the graph"),
            ));
        }
        if self.outputs.iter().any(|(n, _)| n == name) {
            return Err(IrError::new(
                ErrorKind::Duplicate,
                format!("output \"{name}\" is already set"),
            ));
        }
        self.outputs.push((name.to_string(), node));
        Ok(())
    }

    /// Named outputs in the order they were set.
    pub fn outputs(&self) -> &[(String, NodeId)] {
        &self.outputs
    }

    /// The node.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id.0]
    }

    /// The node, mutably (passes rename or retype in place; run [`Graph::verify`] after).
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id.0]
    }

    /// True if `id` is in the graph.
    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id.0)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    /// True if the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    /// Inputs of a node in slot order (a missing slot is skipped; verify reports it).
    pub fn inputs(&self, id: NodeId) -> Vec<NodeId> {
        let mut e: Vec<(u32, NodeId)> = self
            .g
            .edges_directed(id.0, Direction::Incoming)
            .map(|e| (*e.weight(), NodeId(e.source())))
            .collect();
        e.sort();
        e.into_iter().map(|(_, n)| n).collect()
    }

    /// Consumers of a node, ordered by id, each once.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let set: BTreeSet<NodeId> = self
            .g
            .neighbors_directed(id.0, Direction::Outgoing)
            .map(NodeId)
            .collect();
        set.into_iter().collect()
    }

    /// Replaces input `slot` of `node` by `new`.
    pub fn set_input(&mut self, node: NodeId, slot: usize, new: NodeId) {
        let old: Vec<_> = self
            .g
            .edges_directed(node.0, Direction::Incoming)
            .filter(|e| *e.weight() as usize == slot)
            .map(|e| e.id())
            .collect();
        for e in old {
            self.g.remove_edge(e);
        }
        self.g.add_edge(new.0, node.0, slot as u32);
    }

    /// Makes every user of `old` (and every output naming it) use `new` instead.
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) {
        let uses: Vec<(NodeId, u32)> = self
            .g
            .edges_directed(old.0, Direction::Outgoing)
            .map(|e| (NodeId(e.target()), *e.weight()))
            .collect();
        for (user, slot) in uses {
            self.set_input(user, slot as usize, new);
        }
        for (_, o) in &mut self.outputs {
            if *o == old {
                *o = new;
            }
        }
    }

    /// Removes a node and its edges; its users are left with a missing slot.
    pub fn remove(&mut self, id: NodeId) -> Option<Node> {
        self.outputs.retain(|(_, o)| *o != id);
        self.g.remove_node(id.0)
    }

    /// Graph inputs of one kind, in topological (= printed) order.
    pub fn inputs_of_kind(&self, kind: InputKind) -> Vec<NodeId> {
        self.topo_order()
            .unwrap_or_default()
            .into_iter()
            .filter(|&n| self.node(n).op == Op::Input(kind))
            .collect()
    }

    /// The input node with this name.
    pub fn find_input(&self, name: &str) -> Option<NodeId> {
        self.g
            .node_indices()
            .find(|&i| matches!(self.g[i].op, Op::Input(_)) && self.g[i].name == name)
            .map(NodeId)
    }

    /// Nodes in a deterministic topological order: Kahn's algorithm taking the
    /// ready node with the smallest id first. Errors on a cycle.
    pub fn topo_order(&self) -> Result<Vec<NodeId>> {
        let mut indeg: BTreeMap<NodeIndex<u32>, usize> = self
            .g
            .node_indices()
            .map(|i| (i, self.g.edges_directed(i, Direction::Incoming).count()))
            .collect();
        let mut ready: BinaryHeap<Reverse<NodeIndex<u32>>> = indeg
            .iter()
            .filter(|(_, &d)| d == 0)
            .map(|(&i, _)| Reverse(i))
            .collect();
        let mut order = Vec::with_capacity(indeg.len());
        while let Some(Reverse(i)) = ready.pop() {
            order.push(NodeId(i));
            for e in self.g.edges_directed(i, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("edge target is a node");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse(e.target()));
                }
            }
        }
        if order.len() != self.g.node_count() {
            let stuck = indeg
                .iter()
                .find(|(i, _)| !order.contains(&NodeId(**i)))
                .map(|(i, _)| format!("\"{}\"", self.g[*i].name))
                .unwrap_or_default();
            return Err(IrError::new(
                ErrorKind::Cycle,
                format!("the graph has a cycle through node {stuck}"),
            ));
        }
        Ok(order)
    }

    /// The printed number of every node (`%n`), by topological order.
    pub fn numbering(&self) -> BTreeMap<NodeId, usize> {
        self.topo_order()
            .unwrap_or_else(|_| self.g.node_indices().map(NodeId).collect())
            .into_iter()
            .enumerate()
            .map(|(n, id)| (id, n))
            .collect()
    }

    /// How a node is named in errors: `%7 "layer0.attn.q" (nn.matmul) at file:line`.
    pub fn describe(&self, id: NodeId) -> String {
        let num = self.numbering().get(&id).copied().unwrap_or(id.index());
        let n = self.node(id);
        let mut s = format!("%{num} \"{}\" ({})", n.name, n.op.mnemonic());
        if let Some(l) = &n.loc {
            s.push_str(&format!(" at {l}"));
        }
        s
    }

    /// The node's printed line, those of its inputs and of its users.
    pub fn neighbourhood(&self, id: NodeId) -> String {
        let num = self.numbering();
        let mut ids: Vec<NodeId> = self.inputs(id);
        ids.push(id);
        ids.extend(self.users(id));
        ids.sort_by_key(|i| num.get(i).copied());
        ids.dedup();
        ids.iter()
            .map(|&i| {
                let mark = if i == id { ">" } else { " " };
                format!("{mark} {}", crate::text::node_line(self, i, &num))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn check_symbols(&self, shape: &Shape, what: &str) -> Result<()> {
        for s in shape.symbols() {
            if !self.symbols.contains(s) {
                return Err(IrError::new(
                    ErrorKind::UnknownSymbol,
                    format!(
                        "shape {shape} uses symbol `{s}`, which the graph does not declare (declared: {})",
                        self.symbols.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )
                .at(what.to_string()));
            }
        }
        Ok(())
    }

    fn check_attr_symbols(&self, op: &Op) -> Result<()> {
        let dims = match op {
            Op::View(View::Reshape(s)) => s.dims().to_vec(),
            Op::View(View::Slice { start, len, .. }) => vec![start.clone(), len.clone()],
            Op::Attn(Attn::KvAppend { len, .. }) => vec![len.clone()],
            _ => vec![],
        };
        self.check_symbols(&Shape(dims), &op.mnemonic())
            .map_err(|e| IrError { node: None, ..e })
    }

    /// Checks the whole graph: every input slot present and pointing at a node,
    /// arity, every type re-inferred equal to the recorded one, symbols
    /// declared, no cycle, outputs present. The error names the node and shows
    /// its neighbourhood.
    pub fn verify(&self) -> Result<()> {
        self.topo_order()?;
        let mut input_names = BTreeSet::new();
        for i in self.g.node_indices() {
            let id = NodeId(i);
            let node = &self.g[i];
            let fail = |kind, msg: String| {
                Err(IrError::new(kind, msg)
                    .at(self.describe(id))
                    .with_context(self.neighbourhood(id)))
            };
            if let Err(e) = self.check_symbols(&node.ty.shape, "") {
                return fail(ErrorKind::UnknownSymbol, e.message);
            }
            if let Err(e) = self.check_attr_symbols(&node.op) {
                return fail(ErrorKind::UnknownSymbol, e.message);
            }
            let mut slots: Vec<u32> = self
                .g
                .edges_directed(i, Direction::Incoming)
                .map(|e| *e.weight())
                .collect();
            slots.sort_unstable();
            let n = slots.len();
            if let Some(want) = node.op.arity() {
                let present: BTreeSet<u32> = slots.iter().copied().collect();
                if let Some(missing) = (0..want as u32).find(|s| !present.contains(s)) {
                    return fail(
                        ErrorKind::Dangling,
                        format!(
                            "input {missing} is missing (dangling: its producer was removed or never added); the op takes {want} inputs"
                        ),
                    );
                }
                if n != want {
                    return fail(ErrorKind::Type, format!("takes {want} inputs, found {n}"));
                }
            }
            if slots.iter().enumerate().any(|(k, &s)| s as usize != k) {
                return fail(
                    ErrorKind::Dangling,
                    format!("input slots are not 0..{n} (found {slots:?}): an input is dangling"),
                );
            }
            if let Op::Input(_) = node.op {
                if !input_names.insert(node.name.clone()) {
                    return fail(
                        ErrorKind::Duplicate,
                        format!("two inputs are named \"{}\"", node.name),
                    );
                }
                continue;
            }
            let ins = self.inputs(id);
            let tys: Vec<&TensorType> = ins.iter().map(|&s| &self.g[s.0].ty).collect();
            match node.op.infer(&tys) {
                Err(m) => return fail(ErrorKind::Type, m),
                Ok(Some(t)) if t != node.ty => {
                    return fail(
                        ErrorKind::Type,
                        format!("recorded type is {} but the inputs give {t}", node.ty),
                    )
                }
                Ok(_) => {}
            }
        }
        let mut seen = BTreeSet::new();
        for (name, id) in &self.outputs {
            if !self.g.contains_node(id.0) {
                return Err(IrError::new(
                    ErrorKind::Dangling,
                    format!("output \"{name}\" refers to a removed node"),
                ));
            }
            if !seen.insert(name) {
                return Err(IrError::new(
                    ErrorKind::Duplicate,
                    format!("output \"{name}\" is set twice"),
                ));
            }
        }
        Ok(())
    }

    /// Removes nodes no output depends on (inputs are kept). Returns how many.
    pub fn remove_dead(&mut self) -> usize {
        let mut live = BTreeSet::new();
        let mut stack: Vec<NodeId> = self.outputs.iter().map(|(_, n)| *n).collect();
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(self.inputs(n));
            }
        }
        let dead: Vec<NodeId> = self
            .g
            .node_indices()
            .map(NodeId)
            .filter(|n| !live.contains(n) && !matches!(self.node(*n).op, Op::Input(_)))
            .collect();
        for &d in &dead {
            self.g.remove_node(d.0);
        }
        dead.len()
    }
}

impl PartialEq for Graph {
    /// Two graphs are equal when they print the same.
    fn eq(&self, other: &Graph) -> bool {
        self.to_string() == other.to_string()
    }
}
