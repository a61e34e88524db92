//! Lowering: each kernel of a plan becomes a `__device__` tile function over
//! the header library plus a thin `__global__` wrapper; all kernels of a plan
//! share one translation unit (so the persistent dispatcher can call every
//! tile function) with one signature: `(char* act, const char* wts, char* kv)`
//! — the arena, the weights and the KV caches. Offsets into the three
//! buffers are constants of the plan; the symbols `T` and `S` of a forward
//! are read from the head of the arena ([`crate::plan::SYMBOLS_BYTES`]).

mod elementwise;
mod epilogue;
pub mod values;

use tilefuse_ir::{DType, Op};

use crate::emit::{Function, Stmt, Temps, Ty};
use crate::error::CodegenError;
use crate::fusion::{Fused, Group, KernelKind};
use crate::plan::{Kernel, Plan, PlanOptions, Tiling};

/// One lowered kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct LoweredKernel {
    /// Kernel name (the `__global__` symbol).
    pub name: String,
    /// The header comment: source nodes with the author's places, tile shape.
    pub header: String,
    /// The `__device__` tile function.
    pub device: Function,
    /// The `__global__` wrapper.
    pub wrapper: Function,
}

impl LoweredKernel {
    /// The kernel's own text: header, tile function and wrapper.
    pub fn source(&self) -> String {
        format!("{}{}\n{}", self.header, self.device, self.wrapper)
    }
}

/// A plan's CUDA translation unit.
#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    /// The whole source.
    pub source: String,
    /// Its kernels, in schedule order.
    pub kernels: Vec<LoweredKernel>,
}

/// The launch shape of a group's kernel for a bucket.
pub fn tiling(f: &Fused, group: &Group, opt: &PlanOptions) -> Result<Tiling, CodegenError> {
    match group.kind {
        KernelKind::Elementwise => elementwise::tiling(&f.graph, group, opt),
        _ => Ok(Tiling {
            tiles: 1,
            threads: 128,
            smem: 0,
            workspaces: match group.kind {
                KernelKind::Router { .. } => vec![(0, "routing".into(), 4096)],
                KernelKind::ExpertsUp { .. } => vec![(0, "h".into(), 4096)],
                _ => vec![],
            },
            shape: "1".into(),
        }),
    }
}

/// The dtype that names a kernel: its weight's, else its output's.
pub fn weight_dtype_name(f: &Fused, group: &Group) -> DType {
    let g = &f.graph;
    let weight = match group.kind {
        KernelKind::MatVec { matmul, .. } => Some(g.inputs(matmul)[1]),
        KernelKind::ExpertsUp { experts } | KernelKind::ExpertsDown { experts } => Some(g.inputs(experts)[3]),
        _ => None,
    };
    match weight {
        Some(w) => g.node(w).ty.dtype,
        None => group
            .nodes
            .iter()
            .find(|&&n| !matches!(g.node(n).op, Op::Input(_)))
            .map(|&n| g.node(n).ty.dtype)
            .unwrap_or(DType::F32),
    }
}

fn header(plan: &Plan, k: &Kernel) -> String {
    let g = &plan.fused.graph;
    let num = g.numbering();
    let group = plan.group(k);
    let mut s = format!(
        "// {}: {} — {} tiles of {} threads, {} bytes of shared memory, tile {}\n",
        k.name,
        group.kind.short(),
        k.tiling.tiles,
        k.tiling.threads,
        k.tiling.smem,
        k.tiling.shape
    );
    for n in &group.nodes {
        let node = g.node(*n);
        s.push_str(&format!("//   %{} \"{}\" {} : {}", num[n], node.name, node.op.mnemonic(), node.ty));
        if let Some(l) = &node.loc {
            s.push_str(&format!(" @ {l}"));
        }
        s.push('\n');
    }
    s
}

fn params() -> Vec<(Ty, String)> {
    vec![
        (Ty::Ptr(Box::new(Ty::Char)), "act".into()),
        (Ty::ConstPtr(Box::new(Ty::Char)), "wts".into()),
        (Ty::Ptr(Box::new(Ty::Char)), "kv".into()),
    ]
}

fn lower_kernel(plan: &Plan, k: &Kernel) -> Result<LoweredKernel, CodegenError> {
    let group = plan.group(k);
    let mut temps = Temps::default();
    let body = match group.kind {
        KernelKind::Elementwise => elementwise::body(plan, group, &mut temps)?,
        ref kind => {
            let node = group
                .nodes
                .iter()
                .next()
                .map(|&n| plan.fused.graph.describe(n))
                .unwrap_or_else(|| k.name.clone());
            return Err(CodegenError::Unsupported {
                node,
                reason: format!("no lowering for {} kernels yet", kind.short()),
            });
        }
    };
    let mut tile_params = vec![(Ty::I32, "tile".to_string())];
    tile_params.extend(params());
    tile_params.push((Ty::I32, "T".into()));
    tile_params.push((Ty::I32, "S".into()));
    tile_params.push((Ty::Ptr(Box::new(Ty::Char)), "smem".into()));
    let device = Function {
        qualifiers: "static __device__ __forceinline__".into(),
        launch_bounds: None,
        ret: "void".into(),
        name: format!("{}_tile", k.name),
        params: tile_params,
        body,
    };
    let wrapper = Function {
        qualifiers: "extern \"C\" __global__".into(),
        launch_bounds: Some(k.tiling.threads),
        ret: "void".into(),
        name: k.name.clone(),
        params: params(),
        body: vec![
            Stmt::Expr(crate::emit::Expr::var("extern __shared__ __align__(16) char smem[]")),
            Stmt::Let(Ty::I32, "T".into(), crate::emit::Expr::var("reinterpret_cast<const int*>(act)[0]")),
            Stmt::Let(Ty::I32, "S".into(), crate::emit::Expr::var("reinterpret_cast<const int*>(act)[1]")),
            Stmt::Expr(crate::emit::Expr::call(
                format!("{}_tile", k.name),
                ["(int)blockIdx.x", "act", "wts", "kv", "T", "S", "smem"]
                    .into_iter()
                    .map(crate::emit::Expr::var)
                    .collect(),
            )),
        ],
    };
    Ok(LoweredKernel {
        name: k.name.clone(),
        header: header(plan, k),
        device,
        wrapper,
    })
}

/// Lowers every kernel of the plan into one translation unit.
pub fn lower(plan: &Plan) -> Result<Module, CodegenError> {
    let mut kernels = Vec::new();
    for k in &plan.kernels {
        kernels.push(lower_kernel(plan, k)?);
    }
    let mut source = format!(
        "// Generated by tilefuse from graph \"{}\" for T <= {}. Do not edit.\n",
        plan.fused.graph.name, plan.options.max_t
    );
    for (name, _) in crate::cuda::HEADERS {
        source.push_str(&format!("#include \"{name}\"\n"));
    }
    for k in &kernels {
        source.push('\n');
        source.push_str(&k.source());
    }
    Ok(Module { source, kernels })
}
