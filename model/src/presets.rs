//! Built-in models with seeded random weights, made in memory.
//!
//! Tiny presets exercise every feature of their architecture in a size the
//! CPU interpreter runs in milliseconds; full-width presets have the real
//! layer widths with a chosen number of layers, for benchmarks.
//!
//! Weights are drawn per parameter from a stream seeded by the preset seed
//! and the parameter's name, so adding a parameter never changes the others.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tilefuse_ir::fp4::{quantize, Fp4Format};
use tilefuse_ir::interp::Tensor;
use tilefuse_ir::{Bindings, DType, ErrorKind, Graph, InputKind, IrError, Result};

use crate::common::GraphOptions;
use crate::{mimo_v2, qwen3_moe};

/// An architecture with its parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Arch {
    /// MiMo-V2.
    MimoV2(mimo_v2::Config),
    /// Qwen3-MoE.
    Qwen3Moe(qwen3_moe::Config),
}

impl Arch {
    /// The whole forward graph.
    pub fn forward_graph(&self, opt: &GraphOptions) -> Result<Graph> {
        match self {
            Arch::MimoV2(c) => mimo_v2::forward_graph(c, opt),
            Arch::Qwen3Moe(c) => qwen3_moe::forward_graph(c, opt),
        }
    }

    /// One decoder layer as a graph.
    pub fn layer_graph(&self, opt: &GraphOptions, layer: usize) -> Result<Graph> {
        let n = self.num_layers();
        if layer >= n {
            return Err(IrError::new(
                ErrorKind::Type,
                format!("layer {layer} does not exist: the model has {n} layers (0..{n})"),
            ));
        }
        match self {
            Arch::MimoV2(c) => mimo_v2::layer_graph(c, opt, layer),
            Arch::Qwen3Moe(c) => qwen3_moe::layer_graph(c, opt, layer),
        }
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        match self {
            Arch::MimoV2(c) => c.num_hidden_layers,
            Arch::Qwen3Moe(c) => c.num_hidden_layers,
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match self {
            Arch::MimoV2(c) => c.vocab_size,
            Arch::Qwen3Moe(c) => c.vocab_size,
        }
    }
}

/// A named built-in model.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    /// Name, as given on the command line.
    pub name: &'static str,
    /// What it is for.
    pub about: &'static str,
    /// Architecture and sizes.
    pub arch: Arch,
    /// Graph options (context, dtypes).
    pub options: GraphOptions,
}

/// The default preset of the command line.
pub const DEFAULT: &str = "mimo-v2-tiny";

/// All built-in presets.
pub fn all() -> Vec<Preset> {
    let tiny = GraphOptions {
        context: 512,
        max_tokens: 16,
        dtype: DType::BF16,
        expert_dtype: DType::BF16,
    };
    let full = GraphOptions {
        context: 16384 + 64,
        max_tokens: 64,
        dtype: DType::BF16,
        expert_dtype: DType::MXFP4,
    };
    vec![
        Preset {
            name: "mimo-v2-tiny",
            about: "MiMo-V2, 3 layers of width 64 (full + sliding with sinks, dense first layer, grouped routing)",
            arch: Arch::MimoV2(mimo_v2::Config::tiny()),
            options: tiny,
        },
        Preset {
            name: "mimo-v2-tiny-mxfp4",
            about: "mimo-v2-tiny with MXFP4 experts",
            arch: Arch::MimoV2(mimo_v2::Config::tiny()),
            options: GraphOptions {
                expert_dtype: DType::MXFP4,
                ..tiny
            },
        },
        Preset {
            name: "qwen3-moe-tiny",
            about: "Qwen3-MoE, 2 layers of width 64 (q/k norms, dense first layer, softmax routing)",
            arch: Arch::Qwen3Moe(qwen3_moe::Config::tiny()),
            options: tiny,
        },
        Preset {
            name: "mimo-v2-flash-4l",
            about: "MiMo-V2-Flash widths, 4 layers, MXFP4 experts",
            arch: Arch::MimoV2(mimo_v2::Config::flash(4)),
            options: full,
        },
        Preset {
            name: "qwen3-30b-a3b",
            about: "Qwen3-30B-A3B shape, 48 layers, MXFP4 experts",
            arch: Arch::Qwen3Moe(qwen3_moe::Config::a3b()),
            options: full,
        },
    ]
}

/// The preset called `name`; the error lists the names that exist.
pub fn by_name(name: &str) -> std::result::Result<Preset, String> {
    let all = all();
    let names: Vec<&str> = all.iter().map(|p| p.name).collect();
    all.into_iter().find(|p| p.name == name).ok_or_else(|| {
        format!(
            "unknown preset `{name}`; the built-in presets are: {}",
            names.join(", ")
        )
    })
}

/// FNV-1a, for a stable per-name seed.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Standard normal samples (Box–Muller).
fn normals(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
            let u2: f64 = rng.gen();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
        })
        .collect()
}

/// Seeded random values for every weight of `graph`, by parameter name.
///
/// Norm weights are `1 + N(0, 0.1)`, sinks and the correction bias `N(0, 0.5)`
/// and `N(0, 0.1)`, embeddings `N(0, 1)`, every matrix `N(0, 1/in_features)`
/// so activations stay of order one through the layers. Block-quantized
/// weights are drawn the same way, then quantized.
pub fn random_weights(graph: &Graph, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let none = Bindings::new();
    let mut out = BTreeMap::new();
    for id in graph.inputs_of_kind(InputKind::Weight) {
        let node = graph.node(id);
        let shape =
            node.ty.shape.eval(&none).map_err(|m| {
                IrError::new(ErrorKind::Type, format!("weight \"{}\": {m}", node.name))
            })?;
        let n: usize = shape.iter().product();
        let last = shape.last().copied().unwrap_or(1);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(&node.name));
        let name = node.name.as_str();
        let values = if name.ends_with("norm.weight") {
            normals(&mut rng, n, 0.1)
                .into_iter()
                .map(|v| 1.0 + v)
                .collect()
        } else if name.ends_with(".sinks") {
            normals(&mut rng, n, 0.5)
        } else if name.ends_with("e_score_correction_bias") {
            normals(&mut rng, n, 0.1)
        } else if name.ends_with("embed_tokens.weight") {
            normals(&mut rng, n, 1.0)
        } else {
            normals(&mut rng, n, (last as f32).powf(-0.5))
        };
        let t = match node.ty.dtype {
            DType::MXFP4 | DType::NVFP4 => {
                let format = if node.ty.dtype == DType::MXFP4 {
                    Fp4Format::Mx
                } else {
                    Fp4Format::Nv
                };
                let q = quantize(&values, last, format).map_err(|m| {
                    IrError::new(ErrorKind::Type, format!("weight \"{name}\": {m}"))
                })?;
                Tensor::fp4(&shape, q)?
            }
            d => Tensor::f32(d, &shape, values)?,
        };
        out.insert(node.name.clone(), t);
    }
    Ok(out)
}
