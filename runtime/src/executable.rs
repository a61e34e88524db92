//! One forward graph with its weights and KV caches, ready to run.

use std::collections::BTreeMap;

use tilefuse_ir::interp::{self, Caches, Tensor};
use tilefuse_ir::{Bindings, ErrorKind, Graph, InputKind, IrError, Result};

/// Where an executable runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The reference interpreter on the CPU.
    Cpu,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Cpu => "cpu",
        })
    }
}

/// A forward graph with its weights (uploaded once) and KV caches (kept
/// between calls). The caches hold whatever earlier calls wrote; a call with
/// `S = n` treats positions `0..n` as valid, so rolling back is binding a
/// smaller `S` next time.
#[derive(Debug)]
pub struct Executable {
    graph: Graph,
    backend: Backend,
    /// Weights and, during a call, the activation inputs, by name.
    values: BTreeMap<String, Tensor>,
    caches: Caches,
}

impl Executable {
    /// Prepares `graph` with `weights` on `backend`. Every weight input of the
    /// graph must be present with its declared dtype and shape.
    pub fn new(graph: Graph, weights: BTreeMap<String, Tensor>, backend: Backend) -> Result<Executable> {
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
        let caches = Caches::for_graph(&graph, &none)?;
        Ok(Executable {
            graph,
            backend,
            values: weights,
            caches,
        })
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
    pub fn run(&mut self, bindings: &Bindings, inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
        let names: Vec<String> = inputs.keys().cloned().collect();
        for (k, v) in inputs {
            if self.graph.find_input(&k).is_none() {
                return Err(IrError::new(
                    ErrorKind::Interp,
                    format!("the graph \"{}\" has no input named \"{k}\"", self.graph.name),
                ));
            }
            self.values.insert(k, v);
        }
        let r = match self.backend {
            Backend::Cpu => interp::run(&self.graph, bindings, &self.values, &mut self.caches),
        };
        for k in names {
            self.values.remove(&k);
        }
        r
    }
}
