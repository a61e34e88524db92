//! # tilefuse-ir
//!
//! The tensor IR every other part of tilefuse stands on: element types
//! ([`DType`], FP4 formats included), shapes over named symbols ([`Shape`],
//! [`Dim`]), the closed set of ops ([`Op`]), graphs built with a checked
//! [`Builder`], a verifier, a deterministic text printer with a parser that
//! reads it back, the CPU reference interpreter ([`interp`]) that is the
//! oracle of every test, and the sharding pass ([`shard`]) that splits a
//! graph over several ranks joined by collectives.
//!
//! No CUDA, no I/O.
//!
//! ```
//! use tilefuse_ir::{shape, Builder, DType};
//! let mut b = Builder::new("norm_linear", &["T"]);
//! let x = b.input("x", DType::BF16, shape![T, 64]).unwrap();
//! let g = b.weight("norm.weight", DType::BF16, shape![64]).unwrap();
//! let w = b.weight("proj.weight", DType::MXFP4, shape![32, 64]).unwrap();
//! let h = b.rms_norm(x, g, 1e-6).unwrap();
//! let y = b.matmul(h, w).unwrap();
//! b.output("y", y).unwrap();
//! let graph = b.finish().unwrap();
//! let text = graph.to_string();
//! assert!(text.contains("nn.matmul{out=bf16}(%3, %2) : bf16[T,32]"));
//! assert_eq!(text.parse::<tilefuse_ir::Graph>().unwrap().to_string(), text);
//! ```

pub mod builder;
pub mod dtype;
pub mod error;
pub mod fp4;
pub mod graph;
pub mod interp;
pub mod op;
pub mod shape;
pub mod shard;
#[cfg(feature = "testing")]
pub mod testing;
pub mod text;

pub use builder::{Builder, RouterConfig};
pub use dtype::DType;
pub use error::{ErrorKind, IrError, Result};
pub use graph::{Graph, Loc, Node, NodeId};
pub use op::{
    Attn, Attr, BinaryOp, Comm, Elementwise, InputKind, Mask, Moe, Nn, Op, ReduceKind, Sample,
    ScoreFn, TensorType, UnaryOp, View,
};
pub use shape::{Bindings, Dim, IntoDim, Shape};
