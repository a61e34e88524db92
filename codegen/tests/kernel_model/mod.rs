//! A CPU model of the fused kernels of a plan: what the generated CUDA
//! computes and stores, at the level of IR nodes.
//!
//! The kernels run one after the other in the plan's schedule order. A
//! kernel sees only the graph's inputs (activations, weights, KV caches) and
//! the values earlier kernels stored; it computes its nodes with the
//! reference interpreter (one node at a time, so the numbers are the
//! interpreter's) and stores only what its template stores. The template
//! contracts modelled here are those of `fusion::KernelKind` and the lowering:
//!
//! - **chains** (`matvec`, `moe_down`, `elementwise`): the anchor (none for an
//!   element-wise kernel), then the epilogue nodes in order, each one
//!   consuming the previous value. The generated loop runs over the chain's
//!   element count and indexes every other operand by the same flat index
//!   (or element 0 when it has one element), so each operand must have that
//!   element count in the same row-major layout, or one element. One store:
//!   the last value. A matvec with siblings (matmuls of the same `x` over
//!   stacked weights) is one chain per matmul (its own epilogue, if any,
//!   on its own rows), each storing its last value; its norm prologue is
//!   recomputed from memory by every kernel that reads it.
//! - `moe_up` computes the experts' result into a workspace only (and, with
//!   its router inside, stores the router's choice and weights as `router`
//!   does); `moe_down` starts from that workspace.
//! - `attention` applies the query's norm and RoPE and attends over the cache
//!   views; when split it stores a workspace that `attention_combine` turns
//!   into the attention's output. With its append fused (new keys at the
//!   queries' own positions) it first applies the key norm and RoPE and
//!   appends keys and values as `rope_append` does, storing both cache views.
//! - `rope_append` applies the key norm and RoPE and appends keys and values
//!   to the caches (the shared [`Caches`]); it stores both cache views.
//! - `router` stores the expert choice and weights; `embedding`, `rms_norm`,
//!   `concat`, `argmax` and `sample` store their one node.
//!
//! A kernel that reads a value no earlier kernel stored, stores a value twice,
//! or breaks a chain contract is an error naming the kernel and the node, and
//! so is a graph output nobody stored. Otherwise the graph's outputs are read
//! back from memory, to be compared with the interpreter on the original graph.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use tilefuse_codegen::fusion::{Fused, Group, KernelKind};
use tilefuse_codegen::plan::Plan;
use tilefuse_ir::interp::{self, Caches, Tensor};
use tilefuse_ir::{Bindings, Graph, InputKind, Nn, NodeId, Op, View};

/// Where a stored value lives: a node's storage, or a kernel's workspace
/// holding the value of a node that a later kernel finishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    Node(NodeId),
    Work(NodeId),
}

/// What one kernel computes and stores.
struct Spec {
    /// Nodes it evaluates (the group's nodes plus any recomputed prologue).
    computed: BTreeSet<NodeId>,
    /// A node whose value the kernel takes from an earlier kernel's workspace.
    from_work: Option<NodeId>,
    /// `(slot, node)`: the node's value is stored in the slot.
    stores: Vec<(Slot, NodeId)>,
    /// For chain kinds: the anchor (if any) and the epilogue in order, one
    /// chain a matmul of a matvec with siblings.
    chains: Vec<(Option<NodeId>, Vec<NodeId>)>,
}

fn describe(g: &Graph, n: NodeId) -> String {
    g.describe(n)
}

fn kernel_name(ki: usize, group: &Group) -> String {
    format!("k{ki:02} {}", group.kind.short())
}

fn spec(f: &Fused, group: &Group) -> Result<Spec, String> {
    let g = &f.graph;
    let nodes = group.nodes.clone();
    let chain_store = |anchor: NodeId| *group.epilogue.last().unwrap_or(&anchor);
    Ok(match &group.kind {
        KernelKind::MatVec {
            matmul,
            norm,
            siblings,
        } => {
            let matmuls: Vec<NodeId> = nodes
                .iter()
                .copied()
                .filter(|&n| matches!(g.node(n).op, Op::Nn(Nn::MatMul { .. })))
                .collect();
            let x = f.storage(g.inputs(*matmul)[0]);
            for &m in &matmuls {
                if f.storage(g.inputs(m)[0]) != x {
                    return Err(format!(
                        "{} is in the matvec kernel of {} but reads another x",
                        describe(g, m),
                        describe(g, *matmul)
                    ));
                }
            }
            if let Some(nm) = norm {
                if x != *nm {
                    return Err(format!(
                        "the matvec kernel of {} recomputes {} in its prologue, but its x is {}",
                        describe(g, *matmul),
                        describe(g, *nm),
                        describe(g, x)
                    ));
                }
            }
            let mut computed = nodes.clone();
            computed.extend(*norm);
            if matmuls.len() != 1 + siblings.len() {
                return Err(format!(
                    "the matvec kernel of {} computes {} matmuls for {} siblings",
                    describe(g, *matmul),
                    matmuls.len(),
                    siblings.len()
                ));
            }
            let chains: Vec<(Option<NodeId>, Vec<NodeId>)> =
                std::iter::once((Some(*matmul), group.epilogue.clone()))
                    .chain(
                        siblings
                            .iter()
                            .map(|s| (Some(s.matmul), s.epilogue.clone())),
                    )
                    .collect();
            let stores: Vec<(Slot, NodeId)> = chains
                .iter()
                .map(|(a, e)| {
                    let s = *e.last().or(a.as_ref()).unwrap_or(matmul);
                    (Slot::Node(s), s)
                })
                .collect();
            // The kernel that owns its norm node also stores it, from its
            // prologue, when a kernel outside reads it.
            let mut stores = stores;
            if let Some(nm) = norm {
                if nodes.contains(nm)
                    && (f.real_users(*nm).iter().any(|u| !nodes.contains(u)) || f.is_output(*nm))
                {
                    stores.push((Slot::Node(*nm), *nm));
                }
            }
            Spec {
                computed,
                from_work: None,
                stores,
                chains,
            }
        }
        KernelKind::ExpertsUp { experts, router } => {
            let router_nodes: BTreeSet<NodeId> = router.iter().flat_map(|&(s, w)| [s, w]).collect();
            if nodes != router_nodes {
                return Err(format!(
                    "the moe_up kernel of {} owns nodes other than its router's; the moe_down kernel owns the experts",
                    describe(g, *experts)
                ));
            }
            let mut stores = vec![(Slot::Work(*experts), *experts)];
            stores.extend(router_nodes.iter().map(|&n| (Slot::Node(n), n)));
            let mut computed = router_nodes;
            computed.insert(*experts);
            Spec {
                computed,
                from_work: None,
                stores,
                chains: vec![],
            }
        }
        KernelKind::ExpertsDown { experts } => {
            let mut computed = nodes.clone();
            computed.remove(experts);
            let s = chain_store(*experts);
            Spec {
                computed,
                from_work: Some(*experts),
                stores: vec![(Slot::Node(s), s)],
                chains: vec![(Some(*experts), group.epilogue.clone())],
            }
        }
        KernelKind::Elementwise => {
            let listed: BTreeSet<NodeId> = group.epilogue.iter().copied().collect();
            if listed != nodes || listed.len() != group.epilogue.len() {
                return Err(
                    "an element-wise kernel whose chain is not exactly its nodes".to_string(),
                );
            }
            let s = *group
                .epilogue
                .last()
                .ok_or("an empty element-wise kernel")?;
            Spec {
                computed: nodes,
                from_work: None,
                stores: vec![(Slot::Node(s), s)],
                chains: vec![(None, group.epilogue.clone())],
            }
        }
        KernelKind::Router { select, weights } => Spec {
            computed: nodes,
            from_work: None,
            stores: vec![
                (Slot::Node(*select), *select),
                (Slot::Node(*weights), *weights),
            ],
            chains: vec![],
        },
        KernelKind::RopeAppend {
            k_append, v_append, ..
        } => Spec {
            computed: nodes,
            from_work: None,
            stores: vec![
                (Slot::Node(*k_append), *k_append),
                (Slot::Node(*v_append), *v_append),
            ],
            chains: vec![],
        },
        KernelKind::Attention { attn, split, .. } => {
            let mut computed = nodes.clone();
            computed.insert(*attn);
            let slot = if *split {
                Slot::Work(*attn)
            } else {
                Slot::Node(*attn)
            };
            // With its append fused, the kernel also stores both cache views.
            let mut stores: Vec<(Slot, NodeId)> = nodes
                .iter()
                .filter(|&&n| matches!(g.node(n).op, Op::Attn(tilefuse_ir::Attn::KvAppend { .. })))
                .map(|&n| (Slot::Node(n), n))
                .collect();
            stores.push((slot, *attn));
            Spec {
                computed,
                from_work: None,
                stores,
                chains: vec![],
            }
        }
        KernelKind::AttentionCombine { attn } => Spec {
            computed: BTreeSet::new(),
            from_work: Some(*attn),
            stores: vec![(Slot::Node(*attn), *attn)],
            chains: vec![],
        },
        KernelKind::Embedding { node }
        | KernelKind::RmsNorm { node }
        | KernelKind::Concat { node }
        | KernelKind::Argmax { node }
        | KernelKind::Sample { node } => {
            if nodes != [*node].into() {
                return Err(format!(
                    "the {} kernel of {} computes other nodes too",
                    group.kind.short(),
                    describe(g, *node)
                ));
            }
            Spec {
                computed: nodes,
                from_work: None,
                stores: vec![(Slot::Node(*node), *node)],
                chains: vec![],
            }
        }
    })
}

fn bound_shape(g: &Graph, n: NodeId, b: &Bindings) -> Result<Vec<usize>, String> {
    g.node(n)
        .ty
        .shape
        .eval(b)
        .map_err(|m| format!("{}: {m}", describe(g, n)))
}

fn numel(g: &Graph, n: NodeId, b: &Bindings) -> Result<usize, String> {
    Ok(bound_shape(g, n, b)?.iter().product())
}

/// The chain contract: each epilogue node consumes the previous value, and
/// every operand has the chain's element count, or one element. (Equal
/// counts suffice: reshapes keep the row-major order, and an element-wise
/// op's operand with its output's count cannot have been broadcast.)
fn check_chain(
    f: &Fused,
    b: &Bindings,
    anchor: Option<NodeId>,
    epilogue: &[NodeId],
) -> Result<(), String> {
    let g = &f.graph;
    let Some(&last) = epilogue.last().or(anchor.as_ref()) else {
        return Ok(());
    };
    let count = numel(g, last, b)?;
    if let Some(a) = anchor {
        if numel(g, a, b)? != count {
            return Err(format!(
                "the epilogue of {} ends in {}, of another element count",
                describe(g, a),
                describe(g, last)
            ));
        }
    }
    let mut prev = anchor;
    let mut done: BTreeSet<NodeId> = anchor.into_iter().collect();
    for &e in epilogue {
        if !matches!(g.node(e).op, Op::Ew(_)) {
            return Err(format!(
                "{} is in an epilogue but is not element-wise",
                describe(g, e)
            ));
        }
        let ins = g.inputs(e);
        if let Some(p) = prev {
            if !ins.iter().any(|&i| f.storage(i) == f.storage(p)) {
                return Err(format!(
                    "{} follows {} in an epilogue but does not consume it",
                    describe(g, e),
                    describe(g, p)
                ));
            }
        }
        if numel(g, e, b)? != count {
            return Err(format!(
                "{} is in a chain of {count} elements but has another element count",
                describe(g, e)
            ));
        }
        for &i in &ins {
            if done.contains(&f.storage(i)) {
                continue;
            }
            let n = numel(g, i, b)?;
            if n != 1 && n != count {
                return Err(format!(
                    "{} reads {} ({n} elements) by the flat index of its chain of {count} (a broadcast the kernel does not do)",
                    describe(g, e),
                    describe(g, i)
                ));
            }
        }
        done.insert(e);
        prev = Some(e);
    }
    Ok(())
}

/// Runs the kernels of `plan` as described in the module docs and returns
/// the graph's outputs by name.
pub fn run(
    plan: &Plan,
    b: &Bindings,
    inputs: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>, String> {
    let f = &plan.fused;
    let g = &f.graph;
    let mut caches = Caches::for_graph(g, b).map_err(|e| e.to_string())?;
    let mut memory: BTreeMap<Slot, Tensor> = BTreeMap::new();
    let order = g.topo_order().map_err(|e| e.to_string())?;
    for (ki, k) in plan.kernels.iter().enumerate() {
        let group = plan.group(k);
        let kname = kernel_name(ki, group);
        let sp = spec(f, group).map_err(|m| format!("{kname}: {m}"))?;
        for (anchor, epilogue) in &sp.chains {
            check_chain(f, b, *anchor, epilogue).map_err(|m| format!("{kname}: {m}"))?;
        }
        let mut sub = Graph::new(&format!("k{ki}"), &g.symbols().collect::<Vec<_>>());
        let mut map: BTreeMap<NodeId, NodeId> = BTreeMap::new();
        let mut values: BTreeMap<String, Tensor> = BTreeMap::new();
        if let Some(w) = sp.from_work {
            let t = memory.get(&Slot::Work(w)).ok_or_else(|| {
                format!(
                    "{kname} starts from the workspace of {}, which no earlier kernel wrote",
                    describe(g, w)
                )
            })?;
            let id = sub
                .add_input(InputKind::Activation, "work", g.node(w).ty.clone(), None)
                .map_err(|e| e.to_string())?;
            values.insert("work".into(), t.clone());
            map.insert(w, id);
        }
        for &n in order.iter().filter(|n| sp.computed.contains(n)) {
            let mut ins = Vec::new();
            for i in g.inputs(n) {
                ins.push(resolve(
                    f,
                    i,
                    &sp,
                    &mut sub,
                    &mut map,
                    &mut values,
                    &memory,
                    inputs,
                    &kname,
                )?);
            }
            let node = g.node(n);
            let id = sub
                .add(node.op.clone(), &ins, &node.name, node.loc.clone())
                .map_err(|e| format!("{kname}: {e}"))?;
            map.insert(n, id);
        }
        for (j, (_, n)) in sp.stores.iter().enumerate() {
            let id = *map.get(n).ok_or_else(|| {
                format!(
                    "{kname} stores {}, which it does not compute",
                    describe(g, *n)
                )
            })?;
            sub.set_output(&format!("s{j}"), id)
                .map_err(|e| e.to_string())?;
        }
        let mut out = interp::run(&sub, b, &values, &mut caches)
            .map_err(|e| format!("{kname}: the interpreter refused the kernel's nodes: {e}"))?;
        for (j, (slot, n)) in sp.stores.iter().enumerate() {
            let t = out
                .remove(&format!("s{j}"))
                .ok_or_else(|| format!("{kname}: no value for {}", describe(g, *n)))?;
            if memory.insert(*slot, t).is_some() {
                return Err(format!(
                    "{kname} stores {}, which an earlier kernel stored already",
                    describe(g, *n)
                ));
            }
        }
    }
    let mut outputs = BTreeMap::new();
    for (name, o) in g.outputs() {
        let s = f.storage(*o);
        let node = g.node(s);
        let mut t = match node.op {
            Op::Input(InputKind::Activation | InputKind::Weight) => inputs
                .get(&node.name)
                .cloned()
                .ok_or_else(|| format!("input \"{}\" missing", node.name))?,
            _ => memory.get(&Slot::Node(s)).cloned().ok_or_else(|| {
                format!(
                    "output \"{name}\" is {}, which no kernel stored",
                    describe(g, s)
                )
            })?,
        };
        // A reshape is a view of its input's buffer: same elements, its shape.
        t.shape = bound_shape(g, *o, b)?;
        outputs.insert(name.clone(), t);
    }
    Ok(outputs)
}

/// The sub-graph node standing for the value of `i` as the kernel reads it:
/// a node it computes, a reshape (a view, rebuilt over its input), a graph
/// input, or a value an earlier kernel stored.
#[allow(clippy::too_many_arguments)]
fn resolve(
    f: &Fused,
    i: NodeId,
    sp: &Spec,
    sub: &mut Graph,
    map: &mut BTreeMap<NodeId, NodeId>,
    values: &mut BTreeMap<String, Tensor>,
    memory: &BTreeMap<Slot, Tensor>,
    inputs: &BTreeMap<String, Tensor>,
    kname: &str,
) -> Result<NodeId, String> {
    let g = &f.graph;
    if let Some(&id) = map.get(&i) {
        return Ok(id);
    }
    let node = g.node(i);
    let id = match &node.op {
        Op::View(View::Reshape(_)) if !sp.computed.contains(&i) => {
            let src = resolve(
                f,
                g.inputs(i)[0],
                sp,
                sub,
                map,
                values,
                memory,
                inputs,
                kname,
            )?;
            sub.add(node.op.clone(), &[src], &node.name, node.loc.clone())
                .map_err(|e| format!("{kname}: {e}"))?
        }
        Op::Input(kind) => {
            if *kind != InputKind::Cache {
                let t = inputs
                    .get(&node.name)
                    .ok_or_else(|| format!("input \"{}\" missing", node.name))?;
                values.insert(node.name.clone(), t.clone());
            }
            sub.add_input(*kind, &node.name, node.ty.clone(), None)
                .map_err(|e| e.to_string())?
        }
        _ => {
            let t = memory.get(&Slot::Node(i)).ok_or_else(|| {
                format!(
                    "{kname} reads {}, which no earlier kernel stored",
                    describe(g, i)
                )
            })?;
            let name = format!("stored.{}", i.index());
            values.insert(name.clone(), t.clone());
            sub.add_input(InputKind::Activation, &name, node.ty.clone(), None)
                .map_err(|e| e.to_string())?
        }
    };
    map.insert(i, id);
    Ok(id)
}
