//! The closed set of operations, grouped by family.
//!
//! Each op has here: its attributes, its printed mnemonic, its arity and its
//! shape/dtype rule ([`Op::infer`]). Its reference semantics live in
//! [`crate::interp`]. The families:
//!
//! | family | ops |
//! |---|---|
//! | `input` | activations, weights and KV caches fed from outside |
//! | `ew` (elementwise) | unary math, binary math with broadcasting, ops with a scalar, casts |
//! | `reduce` | sum, max, mean over one axis (kept with size 1) |
//! | `view` | reshape, permute, slice, concat |
//! | `nn` | embedding gather, RMSNorm, matmul against weights of any dtype, RoPE |
//! | `attn` | KV-cache append, attention with masks and sinks |
//! | `moe` | router selection, router weights, the grouped expert FFN |
//! | `sample` | argmax, sampling with temperature and seed |
//! | `comm` | collectives between the ranks of a sharded graph (all-reduce, all-gather) |

use std::collections::BTreeMap;
use std::fmt;

use crate::dtype::DType;
use crate::shape::{Dim, Shape};

/// A typed tensor: dtype and shape.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct TensorType {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Shape,
}

impl TensorType {
    /// A tensor type.
    pub fn new(dtype: DType, shape: Shape) -> TensorType {
        TensorType { dtype, shape }
    }

    /// Dims of the shape.
    pub fn dims(&self) -> &[Dim] {
        self.shape.dims()
    }

    /// Rank of the shape.
    pub fn rank(&self) -> usize {
        self.shape.rank()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}

/// Where a graph input comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputKind {
    /// Fed per call (hidden states, token ids, positions, seeds).
    Activation,
    /// Loaded once (model parameters).
    Weight,
    /// Mutable state kept between calls: a KV cache `[capacity, kv_heads, head_dim]`.
    Cache,
}

/// Unary elementwise math.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    /// `-x`
    Neg,
    /// `exp(x)`
    Exp,
    /// `sqrt(x)`
    Sqrt,
    /// `1/sqrt(x)`
    Rsqrt,
    /// `1/x`
    Recip,
    /// `x * x`
    Square,
    /// `|x|`
    Abs,
    /// `1/(1+exp(-x))`
    Sigmoid,
    /// `x * sigmoid(x)`
    Silu,
}

/// Binary elementwise math, numpy broadcasting over trailing axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a * b`
    Mul,
    /// `a / b`
    Div,
    /// `max(a, b)`
    Max,
    /// `min(a, b)`
    Min,
}

/// Elementwise ops.
#[derive(Clone, Debug, PartialEq)]
pub enum Elementwise {
    /// One input, same type out.
    Unary(UnaryOp),
    /// Two inputs of one dtype, broadcast shapes.
    Binary(BinaryOp),
    /// `x op c` with a constant scalar.
    Scalar(BinaryOp, f32),
    /// Conversion to another float or integer dtype (round to nearest even).
    Cast(DType),
}

/// Reductions over one axis; the axis is kept with size 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceKind {
    /// Sum.
    Sum,
    /// Maximum.
    Max,
    /// Arithmetic mean.
    Mean,
}

/// Views and data movement.
#[derive(Clone, Debug, PartialEq)]
pub enum View {
    /// Same elements, new shape (row-major).
    Reshape(Shape),
    /// Axis permutation: output axis `i` is input axis `perm[i]`.
    Permute(Vec<usize>),
    /// `len` elements from `start` along `axis`.
    Slice {
        /// Axis.
        axis: usize,
        /// First index.
        start: Dim,
        /// Number of elements.
        len: Dim,
    },
    /// Inputs joined along `axis`, in input order.
    Concat {
        /// Axis.
        axis: usize,
    },
}

/// Dense neural-network ops.
#[derive(Clone, Debug, PartialEq)]
pub enum Nn {
    /// `table[ids]`: `(table [V, H], ids i32 [..]) -> [.., H]`.
    Embedding,
    /// RMSNorm over the last axis, in f32: `(x [.., D], w [D]) -> [.., D]`.
    /// Per-head norms apply it to a `[T, heads, head_dim]` view.
    RmsNorm {
        /// Added to the mean square.
        eps: f32,
    },
    /// `x @ w^T`: `(x [.., K], w [N, K]) -> out [.., N]`; `w` may be any float
    /// or block-quantized dtype, dequantized as it is read.
    MatMul {
        /// Output dtype (f32 for router logits, else the activation dtype).
        out: DType,
    },
    /// Rotate-half RoPE on the first `rot_dims` of each head:
    /// `(x [T, heads, head_dim], pos i32 [T]) -> same`.
    Rope {
        /// Base of the inverse frequencies.
        theta: f32,
        /// Rotated dims per head (even); the rest pass through.
        rot_dims: usize,
    },
}

/// Which keys a query sees. Keys are at absolute positions `0..L`; query `i` of
/// `T` sits at position `p = L - T + i` (the queries are the last `T` keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mask {
    /// Key `j` visible iff `j <= p` and, with a window `w`, `j > p - w`.
    Causal {
        /// Sliding-window size.
        window: Option<u32>,
    },
    /// Block-bidirectional (draft blocks): key `j` visible iff `j >= L - T`
    /// (the block itself) or there is no window or `j > p - w`.
    Block {
        /// Sliding window over the context.
        window: Option<u32>,
    },
}

/// Attention and its cache.
#[derive(Clone, Debug, PartialEq)]
pub enum Attn {
    /// Writes `T` new rows at positions `len..len+T` (slot `pos % capacity`) and
    /// returns the logical view of positions `0..len+T`:
    /// `(cache [cap, heads, d], new [T, heads, d]) -> [len+T, heads, d]`.
    /// Rows no longer held by a ring (`pos < len + T - cap`) read as NaN; a
    /// non-ring cache refuses to grow past its capacity.
    KvAppend {
        /// Entries already in the cache (a symbol such as `S`).
        len: Dim,
        /// Ring buffer (sliding-window layers) rather than a full cache.
        ring: bool,
    },
    /// Softmax attention with grouped KV heads:
    /// `(q [T, hq, dk], k [L, hkv, dk], v [L, hkv, dv][, sinks [hq]]) -> [T, hq, dv]`.
    /// Scores in f32; with sinks, each head's sink logit is an extra softmax
    /// column whose probability is dropped.
    Attention {
        /// Mask kind.
        mask: Mask,
        /// Score scale (usually `head_dim ** -0.5`).
        scale: f32,
        /// A fourth input holds one sink logit per query head.
        sinks: bool,
    },
}

/// How router scores are made from logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScoreFn {
    /// `sigmoid(logits)` (MiMo-V2, DeepSeek-V3 style).
    Sigmoid,
    /// `softmax(logits)` over experts (Qwen3-MoE).
    Softmax,
}

/// Mixture-of-experts ops.
#[derive(Clone, Debug, PartialEq)]
pub enum Moe {
    /// Chooses experts: `(logits f32 [T, E][, bias f32 [E]]) -> i32 [T, k]`,
    /// sorted by descending choice score, ties to the lower index. The choice
    /// score is `score(logits) + bias`; with `n_group > 1`, only experts in the
    /// `topk_group` groups with the largest sum of their top-2 choice scores
    /// compete (the others are set to -inf, as the reference `masked_fill` does).
    RouterSelect {
        /// Score function.
        score: ScoreFn,
        /// Experts per token.
        top_k: usize,
        /// Number of expert groups (1: no grouping).
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// A second input holds a correction bias used for choosing only.
        bias: bool,
    },
    /// Weights of the chosen experts: `(logits f32 [T, E], idx i32 [T, k]) -> f32 [T, k]`,
    /// `w = score(logits)[idx]`, divided by `sum(w) + norm_eps` when `norm`,
    /// then times `scale`.
    RouterWeights {
        /// Score function.
        score: ScoreFn,
        /// Renormalise the chosen weights to sum to one.
        norm: bool,
        /// Added to the denominator of the renormalisation.
        norm_eps: f32,
        /// Routed scaling factor.
        scale: f32,
    },
    /// The routed SwiGLU experts, summed with their weights:
    /// `(x [T, H], idx i32 [T, k], w f32 [T, k], gate_up [E, 2I, H], down [E, H, I]) -> [T, H]`,
    /// `out[t] = Σⱼ w[t,j] · down_e(silu(gate_e x) ⊙ up_e x)` with `e = idx[t,j]`,
    /// gate the first `I` rows of `gate_up[e]`, up the last `I`.
    /// An index of `-1` is a slot whose expert lives on another rank (see
    /// [`Moe::LocalIndex`]): it contributes nothing.
    Experts,
    /// Expert parallelism: maps global expert indices to this rank's
    /// experts `first..first+count`: `i32 [T, k] -> i32 [T, k]`,
    /// `e - first` when `first <= e < first + count`, else `-1` (the slot is
    /// another rank's, and [`Moe::Experts`] skips it).
    LocalIndex {
        /// This rank's first global expert.
        first: usize,
        /// Experts this rank holds.
        count: usize,
    },
}

/// Token choice.
#[derive(Clone, Debug, PartialEq)]
pub enum Sample {
    /// Index of the largest value on the last axis (first on ties): `[.., V] -> i32 [..]`.
    Argmax,
    /// One token per row from `softmax(logits / temperature)` by inverse CDF with a
    /// counter-based uniform: `(logits [T, V], seed i32 [2]) -> i32 [T]`
    /// (see [`crate::interp::uniform`]).
    Sample {
        /// Temperature (> 0).
        temperature: f32,
    },
}

/// Collectives: how the ranks of a sharded graph combine their parts.
///
/// A sharded graph runs once per rank; the `k`-th collective of every rank's
/// run meets the `k`-th collective of every other rank (as NCCL calls do), so
/// every rank must issue the same collectives in the same order. Run alone
/// ([`crate::interp::run`]), a collective over one rank is the identity; over
/// more it needs [`crate::interp::run_ranks`].
#[derive(Clone, Debug, PartialEq)]
pub enum Comm {
    /// Sum over the ranks: `x -> x` (same type, float activations only). The
    /// interpreter adds the ranks' values in f32 in rank order and rounds the
    /// sum once to the dtype.
    AllReduce {
        /// Ranks taking part.
        ranks: usize,
    },
    /// Every rank's part joined along `axis` in rank order:
    /// `[.., d, ..] -> [.., ranks·d, ..]` (float or i32; exact).
    AllGather {
        /// Axis joined.
        axis: usize,
        /// Ranks taking part.
        ranks: usize,
    },
}

impl Comm {
    /// Ranks taking part.
    pub fn ranks(&self) -> usize {
        match self {
            Comm::AllReduce { ranks } | Comm::AllGather { ranks, .. } => *ranks,
        }
    }
}

/// An operation. Closed: every consumer matches on it exhaustively.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input; its type is declared on the node.
    Input(InputKind),
    /// Elementwise family.
    Ew(Elementwise),
    /// Reduction over one axis.
    Reduce {
        /// What to reduce with.
        kind: ReduceKind,
        /// Axis reduced (kept, size 1).
        axis: usize,
    },
    /// View family.
    View(View),
    /// Dense NN family.
    Nn(Nn),
    /// Attention family.
    Attn(Attn),
    /// Mixture-of-experts family.
    Moe(Moe),
    /// Token choice family.
    Sample(Sample),
    /// Collectives between ranks.
    Comm(Comm),
}

/// An attribute value, as printed and parsed.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    /// Integer.
    Int(i64),
    /// Float (printed in its shortest round-trip form).
    Float(f32),
    /// Boolean.
    Bool(bool),
    /// Identifier-like word (enum variants).
    Word(String),
    /// A dtype.
    DType(DType),
    /// A dim expression.
    Dim(Dim),
    /// A shape.
    Shape(Shape),
    /// A list of integers.
    Ints(Vec<i64>),
}

impl UnaryOp {
    /// Every unary op.
    pub const ALL: [UnaryOp; 9] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Square,
        UnaryOp::Abs,
        UnaryOp::Sigmoid,
        UnaryOp::Silu,
    ];
    /// Printed name.
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Square => "square",
            UnaryOp::Abs => "abs",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Silu => "silu",
        }
    }
}

impl BinaryOp {
    /// Every binary op.
    pub const ALL: [BinaryOp; 6] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
    ];
    /// Printed name.
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
        }
    }
    /// Applies the op in f32.
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Max => a.max(b),
            BinaryOp::Min => a.min(b),
        }
    }
}

impl ReduceKind {
    const ALL: [ReduceKind; 3] = [ReduceKind::Sum, ReduceKind::Max, ReduceKind::Mean];
    fn name(self) -> &'static str {
        match self {
            ReduceKind::Sum => "sum",
            ReduceKind::Max => "max",
            ReduceKind::Mean => "mean",
        }
    }
}

impl ScoreFn {
    fn name(self) -> &'static str {
        match self {
            ScoreFn::Sigmoid => "sigmoid",
            ScoreFn::Softmax => "softmax",
        }
    }
    fn parse(s: &str) -> Result<ScoreFn, String> {
        match s {
            "sigmoid" => Ok(ScoreFn::Sigmoid),
            "softmax" => Ok(ScoreFn::Softmax),
            _ => Err(format!(
                "unknown score function `{s}`; expected sigmoid or softmax"
            )),
        }
    }
}

impl InputKind {
    fn name(self) -> &'static str {
        match self {
            InputKind::Activation => "input",
            InputKind::Weight => "weight",
            InputKind::Cache => "cache",
        }
    }
}

impl Op {
    /// The printed mnemonic, `family.op` (`nn.matmul`, `ew.add`, `moe.experts`).
    pub fn mnemonic(&self) -> String {
        match self {
            Op::Input(k) => k.name().to_string(),
            Op::Ew(Elementwise::Unary(u)) => format!("ew.{}", u.name()),
            Op::Ew(Elementwise::Binary(b)) => format!("ew.{}", b.name()),
            Op::Ew(Elementwise::Scalar(b, _)) => format!("ew.{}_scalar", b.name()),
            Op::Ew(Elementwise::Cast(_)) => "ew.cast".into(),
            Op::Reduce { kind, .. } => format!("reduce.{}", kind.name()),
            Op::View(v) => match v {
                View::Reshape(_) => "view.reshape",
                View::Permute(_) => "view.permute",
                View::Slice { .. } => "view.slice",
                View::Concat { .. } => "view.concat",
            }
            .into(),
            Op::Nn(n) => match n {
                Nn::Embedding => "nn.embedding",
                Nn::RmsNorm { .. } => "nn.rms_norm",
                Nn::MatMul { .. } => "nn.matmul",
                Nn::Rope { .. } => "nn.rope",
            }
            .into(),
            Op::Attn(a) => match a {
                Attn::KvAppend { .. } => "attn.kv_append",
                Attn::Attention { .. } => "attn.attention",
            }
            .into(),
            Op::Moe(m) => match m {
                Moe::RouterSelect { .. } => "moe.router_select",
                Moe::RouterWeights { .. } => "moe.router_weights",
                Moe::Experts => "moe.experts",
                Moe::LocalIndex { .. } => "moe.local_index",
            }
            .into(),
            Op::Sample(s) => match s {
                Sample::Argmax => "sample.argmax",
                Sample::Sample { .. } => "sample.sample",
            }
            .into(),
            Op::Comm(c) => match c {
                Comm::AllReduce { .. } => "comm.all_reduce",
                Comm::AllGather { .. } => "comm.all_gather",
            }
            .into(),
        }
    }

    /// The attributes in printing order.
    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        match self {
            Op::Input(_)
            | Op::Ew(Elementwise::Unary(_) | Elementwise::Binary(_))
            | Op::Nn(Nn::Embedding)
            | Op::Moe(Moe::Experts)
            | Op::Sample(Sample::Argmax) => vec![],
            Op::Ew(Elementwise::Scalar(_, c)) => vec![("c", Attr::Float(*c))],
            Op::Ew(Elementwise::Cast(d)) => vec![("to", Attr::DType(*d))],
            Op::Reduce { axis, .. } => vec![("axis", Attr::Int(*axis as i64))],
            Op::View(View::Reshape(s)) => vec![("shape", Attr::Shape(s.clone()))],
            Op::View(View::Permute(p)) => {
                vec![("perm", Attr::Ints(p.iter().map(|&x| x as i64).collect()))]
            }
            Op::View(View::Slice { axis, start, len }) => vec![
                ("axis", Attr::Int(*axis as i64)),
                ("start", Attr::Dim(start.clone())),
                ("len", Attr::Dim(len.clone())),
            ],
            Op::View(View::Concat { axis }) => vec![("axis", Attr::Int(*axis as i64))],
            Op::Nn(Nn::RmsNorm { eps }) => vec![("eps", Attr::Float(*eps))],
            Op::Nn(Nn::MatMul { out }) => vec![("out", Attr::DType(*out))],
            Op::Nn(Nn::Rope { theta, rot_dims }) => vec![
                ("theta", Attr::Float(*theta)),
                ("rot_dims", Attr::Int(*rot_dims as i64)),
            ],
            Op::Attn(Attn::KvAppend { len, ring }) => {
                vec![("len", Attr::Dim(len.clone())), ("ring", Attr::Bool(*ring))]
            }
            Op::Attn(Attn::Attention { mask, scale, sinks }) => {
                let (kind, window) = match mask {
                    Mask::Causal { window } => ("causal", window),
                    Mask::Block { window } => ("block", window),
                };
                let mut a = vec![("mask", Attr::Word(kind.into()))];
                if let Some(w) = window {
                    a.push(("window", Attr::Int(*w as i64)));
                }
                a.push(("scale", Attr::Float(*scale)));
                a.push(("sinks", Attr::Bool(*sinks)));
                a
            }
            Op::Moe(Moe::RouterSelect {
                score,
                top_k,
                n_group,
                topk_group,
                bias,
            }) => vec![
                ("score", Attr::Word(score.name().into())),
                ("top_k", Attr::Int(*top_k as i64)),
                ("n_group", Attr::Int(*n_group as i64)),
                ("topk_group", Attr::Int(*topk_group as i64)),
                ("bias", Attr::Bool(*bias)),
            ],
            Op::Moe(Moe::RouterWeights {
                score,
                norm,
                norm_eps,
                scale,
            }) => vec![
                ("score", Attr::Word(score.name().into())),
                ("norm", Attr::Bool(*norm)),
                ("norm_eps", Attr::Float(*norm_eps)),
                ("scale", Attr::Float(*scale)),
            ],
            Op::Sample(Sample::Sample { temperature }) => {
                vec![("temperature", Attr::Float(*temperature))]
            }
            Op::Moe(Moe::LocalIndex { first, count }) => vec![
                ("first", Attr::Int(*first as i64)),
                ("count", Attr::Int(*count as i64)),
            ],
            Op::Comm(Comm::AllReduce { ranks }) => vec![("ranks", Attr::Int(*ranks as i64))],
            Op::Comm(Comm::AllGather { axis, ranks }) => vec![
                ("axis", Attr::Int(*axis as i64)),
                ("ranks", Attr::Int(*ranks as i64)),
            ],
        }
    }

    /// Rebuilds an op from its mnemonic and attributes (the parser's inverse of
    /// [`Op::mnemonic`] and [`Op::attrs`]).
    pub fn from_parts(mnemonic: &str, attrs: &BTreeMap<String, Attr>) -> Result<Op, String> {
        let a = AttrReader { attrs, mnemonic };
        let known: &[&str];
        let op = match mnemonic {
            "input" => {
                known = &[];
                Op::Input(InputKind::Activation)
            }
            "weight" => {
                known = &[];
                Op::Input(InputKind::Weight)
            }
            "cache" => {
                known = &[];
                Op::Input(InputKind::Cache)
            }
            "ew.cast" => {
                known = &["to"];
                Op::Ew(Elementwise::Cast(a.dtype("to")?))
            }
            "nn.embedding" => {
                known = &[];
                Op::Nn(Nn::Embedding)
            }
            "nn.rms_norm" => {
                known = &["eps"];
                Op::Nn(Nn::RmsNorm {
                    eps: a.float("eps")?,
                })
            }
            "nn.matmul" => {
                known = &["out"];
                Op::Nn(Nn::MatMul {
                    out: a.dtype("out")?,
                })
            }
            "nn.rope" => {
                known = &["theta", "rot_dims"];
                Op::Nn(Nn::Rope {
                    theta: a.float("theta")?,
                    rot_dims: a.usize("rot_dims")?,
                })
            }
            "view.reshape" => {
                known = &["shape"];
                Op::View(View::Reshape(a.shape("shape")?))
            }
            "view.permute" => {
                known = &["perm"];
                let p = a.ints("perm")?;
                Op::View(View::Permute(
                    p.iter()
                        .map(|&x| usize::try_from(x).map_err(|_| a.bad("perm", "non-negative")))
                        .collect::<Result<_, _>>()?,
                ))
            }
            "view.slice" => {
                known = &["axis", "start", "len"];
                Op::View(View::Slice {
                    axis: a.usize("axis")?,
                    start: a.dim("start")?,
                    len: a.dim("len")?,
                })
            }
            "view.concat" => {
                known = &["axis"];
                Op::View(View::Concat {
                    axis: a.usize("axis")?,
                })
            }
            "attn.kv_append" => {
                known = &["len", "ring"];
                Op::Attn(Attn::KvAppend {
                    len: a.dim("len")?,
                    ring: a.bool("ring")?,
                })
            }
            "attn.attention" => {
                known = &["mask", "window", "scale", "sinks"];
                let window = match attrs.get("window") {
                    None => None,
                    Some(_) => Some(
                        u32::try_from(a.usize("window")?)
                            .map_err(|_| a.bad("window", "below 2^32"))?,
                    ),
                };
                let mask = match a.word("mask")?.as_str() {
                    "causal" => Mask::Causal { window },
                    "block" => Mask::Block { window },
                    w => {
                        return Err(format!(
                            "{mnemonic}: unknown mask `{w}`; expected causal or block"
                        ))
                    }
                };
                Op::Attn(Attn::Attention {
                    mask,
                    scale: a.float("scale")?,
                    sinks: a.bool("sinks")?,
                })
            }
            "moe.router_select" => {
                known = &["score", "top_k", "n_group", "topk_group", "bias"];
                Op::Moe(Moe::RouterSelect {
                    score: ScoreFn::parse(&a.word("score")?)?,
                    top_k: a.usize("top_k")?,
                    n_group: a.usize("n_group")?,
                    topk_group: a.usize("topk_group")?,
                    bias: a.bool("bias")?,
                })
            }
            "moe.router_weights" => {
                known = &["score", "norm", "norm_eps", "scale"];
                Op::Moe(Moe::RouterWeights {
                    score: ScoreFn::parse(&a.word("score")?)?,
                    norm: a.bool("norm")?,
                    norm_eps: a.float("norm_eps")?,
                    scale: a.float("scale")?,
                })
            }
            "moe.experts" => {
                known = &[];
                Op::Moe(Moe::Experts)
            }
            "moe.local_index" => {
                known = &["first", "count"];
                Op::Moe(Moe::LocalIndex {
                    first: a.usize("first")?,
                    count: a.usize("count")?,
                })
            }
            "comm.all_reduce" => {
                known = &["ranks"];
                Op::Comm(Comm::AllReduce {
                    ranks: a.usize("ranks")?,
                })
            }
            "comm.all_gather" => {
                known = &["axis", "ranks"];
                Op::Comm(Comm::AllGather {
                    axis: a.usize("axis")?,
                    ranks: a.usize("ranks")?,
                })
            }
            "sample.argmax" => {
                known = &[];
                Op::Sample(Sample::Argmax)
            }
            "sample.sample" => {
                known = &["temperature"];
                Op::Sample(Sample::Sample {
                    temperature: a.float("temperature")?,
                })
            }
            other => {
                if let Some(r) = other.strip_prefix("reduce.") {
                    known = &["axis"];
                    let kind = ReduceKind::ALL
                        .into_iter()
                        .find(|k| k.name() == r)
                        .ok_or_else(|| format!("unknown op `{other}`"))?;
                    Op::Reduce {
                        kind,
                        axis: a.usize("axis")?,
                    }
                } else if let Some(r) = other.strip_prefix("ew.") {
                    if let Some(u) = UnaryOp::ALL.into_iter().find(|u| u.name() == r) {
                        known = &[];
                        Op::Ew(Elementwise::Unary(u))
                    } else if let Some(b) = BinaryOp::ALL.into_iter().find(|b| b.name() == r) {
                        known = &[];
                        Op::Ew(Elementwise::Binary(b))
                    } else if let Some(b) = r
                        .strip_suffix("_scalar")
                        .and_then(|r| BinaryOp::ALL.into_iter().find(|b| b.name() == r))
                    {
                        known = &["c"];
                        Op::Ew(Elementwise::Scalar(b, a.float("c")?))
                    } else {
                        return Err(format!("unknown op `{other}`"));
                    }
                } else {
                    return Err(format!("unknown op `{other}`"));
                }
            }
        };
        if let Some(extra) = attrs.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!("{mnemonic}: unexpected attribute `{extra}`"));
        }
        Ok(op)
    }

    /// The number of inputs the op takes, or `None` for a variable count (concat).
    pub fn arity(&self) -> Option<usize> {
        Some(match self {
            Op::Input(_) => 0,
            Op::Ew(Elementwise::Unary(_) | Elementwise::Scalar(..) | Elementwise::Cast(_)) => 1,
            Op::Ew(Elementwise::Binary(_)) => 2,
            Op::Reduce { .. } => 1,
            Op::View(View::Concat { .. }) => return None,
            Op::View(_) => 1,
            Op::Nn(Nn::Embedding | Nn::RmsNorm { .. } | Nn::MatMul { .. } | Nn::Rope { .. }) => 2,
            Op::Attn(Attn::KvAppend { .. }) => 2,
            Op::Attn(Attn::Attention { sinks, .. }) => 3 + usize::from(*sinks),
            Op::Moe(Moe::RouterSelect { bias, .. }) => 1 + usize::from(*bias),
            Op::Moe(Moe::RouterWeights { .. }) => 2,
            Op::Moe(Moe::Experts) => 5,
            Op::Moe(Moe::LocalIndex { .. }) => 1,
            Op::Comm(_) => 1,
            Op::Sample(Sample::Argmax) => 1,
            Op::Sample(Sample::Sample { .. }) => 2,
        })
    }

    /// Checks the input types and computes the output type. Inputs have no rule
    /// (their type is declared) and return `None`. The error says what was
    /// expected and what was found; the caller adds which node.
    pub fn infer(&self, ins: &[&TensorType]) -> Result<Option<TensorType>, String> {
        if let Some(n) = self.arity() {
            if ins.len() != n {
                return Err(format!("takes {n} inputs, found {}", ins.len()));
            }
        } else if ins.len() < 2 {
            return Err(format!("takes at least 2 inputs, found {}", ins.len()));
        }
        let out = match self {
            Op::Input(_) => return Ok(None),
            Op::Ew(e) => infer_ew(e, ins)?,
            Op::Reduce { axis, .. } => {
                let x = ins[0];
                want_activation("input", x)?;
                want_axis(*axis, x)?;
                let mut dims = x.dims().to_vec();
                dims[*axis] = Dim::c(1);
                TensorType::new(x.dtype, Shape(dims))
            }
            Op::View(v) => infer_view(v, ins)?,
            Op::Nn(n) => infer_nn(n, ins)?,
            Op::Attn(a) => infer_attn(a, ins)?,
            Op::Moe(m) => infer_moe(m, ins)?,
            Op::Sample(s) => infer_sample(s, ins)?,
            Op::Comm(c) => infer_comm(c, ins)?,
        };
        Ok(Some(out))
    }
}

struct AttrReader<'a> {
    attrs: &'a BTreeMap<String, Attr>,
    mnemonic: &'a str,
}

impl AttrReader<'_> {
    fn get(&self, k: &str) -> Result<&Attr, String> {
        self.attrs
            .get(k)
            .ok_or_else(|| format!("{}: missing attribute `{k}`", self.mnemonic))
    }
    fn bad(&self, k: &str, what: &str) -> String {
        format!("{}: attribute `{k}` must be {what}", self.mnemonic)
    }
    fn float(&self, k: &str) -> Result<f32, String> {
        match self.get(k)? {
            Attr::Float(f) => Ok(*f),
            Attr::Int(i) => Ok(*i as f32),
            _ => Err(self.bad(k, "a number")),
        }
    }
    fn usize(&self, k: &str) -> Result<usize, String> {
        match self.get(k)? {
            Attr::Int(i) if *i >= 0 => Ok(*i as usize),
            _ => Err(self.bad(k, "a non-negative integer")),
        }
    }
    fn bool(&self, k: &str) -> Result<bool, String> {
        match self.get(k)? {
            Attr::Bool(b) => Ok(*b),
            _ => Err(self.bad(k, "true or false")),
        }
    }
    fn word(&self, k: &str) -> Result<String, String> {
        match self.get(k)? {
            Attr::Word(w) => Ok(w.clone()),
            _ => Err(self.bad(k, "a word")),
        }
    }
    fn dtype(&self, k: &str) -> Result<DType, String> {
        match self.get(k)? {
            Attr::DType(d) => Ok(*d),
            Attr::Word(w) => w.parse(),
            _ => Err(self.bad(k, "a dtype")),
        }
    }
    fn dim(&self, k: &str) -> Result<Dim, String> {
        match self.get(k)? {
            Attr::Dim(d) => Ok(d.clone()),
            Attr::Int(i) if *i >= 0 => Ok(Dim::c(*i as usize)),
            Attr::Word(w) => w.parse(),
            _ => Err(self.bad(k, "a dim")),
        }
    }
    fn shape(&self, k: &str) -> Result<Shape, String> {
        match self.get(k)? {
            Attr::Shape(s) => Ok(s.clone()),
            // A shape of constants prints like a list of integers.
            Attr::Ints(v) if v.iter().all(|&x| x >= 0) => {
                Ok(Shape(v.iter().map(|&x| Dim::c(x as usize)).collect()))
            }
            _ => Err(self.bad(k, "a shape")),
        }
    }
    fn ints(&self, k: &str) -> Result<Vec<i64>, String> {
        match self.get(k)? {
            Attr::Ints(v) => Ok(v.clone()),
            _ => Err(self.bad(k, "a list of integers")),
        }
    }
}

fn want_activation(what: &str, t: &TensorType) -> Result<(), String> {
    if t.dtype.is_activation() {
        Ok(())
    } else {
        Err(format!("{what} must be f32, f16 or bf16, found {t}"))
    }
}

fn want_dtype(what: &str, t: &TensorType, d: DType) -> Result<(), String> {
    if t.dtype == d {
        Ok(())
    } else {
        Err(format!("{what} must be {d}, found {t}"))
    }
}

fn want_rank(what: &str, t: &TensorType, r: usize) -> Result<(), String> {
    if t.rank() == r {
        Ok(())
    } else {
        Err(format!("{what} must have rank {r}, found {t}"))
    }
}

fn want_axis(axis: usize, t: &TensorType) -> Result<(), String> {
    if axis < t.rank() {
        Ok(())
    } else {
        Err(format!("axis {axis} is out of range for {t}"))
    }
}

fn want_dim(what: &str, found: &Dim, expected: &Dim) -> Result<(), String> {
    if found == expected {
        Ok(())
    } else {
        Err(format!("{what}: expected {expected}, found {found}"))
    }
}

/// Numpy broadcasting over trailing axes; a dim broadcasts only if it is 1.
pub fn broadcast(a: &Shape, b: &Shape) -> Result<Shape, String> {
    let r = a.rank().max(b.rank());
    let one = Dim::c(1);
    let mut out = Vec::with_capacity(r);
    for i in 0..r {
        let da = (i + a.rank())
            .checked_sub(r)
            .map(|j| &a.0[j])
            .unwrap_or(&one);
        let db = (i + b.rank())
            .checked_sub(r)
            .map(|j| &b.0[j])
            .unwrap_or(&one);
        out.push(if da == db || *db == one {
            da.clone()
        } else if *da == one {
            db.clone()
        } else {
            return Err(format!(
                "shapes {a} and {b} do not broadcast (axis {i}: {da} vs {db})"
            ));
        });
    }
    Ok(Shape(out))
}

fn infer_ew(e: &Elementwise, ins: &[&TensorType]) -> Result<TensorType, String> {
    let x = ins[0];
    match e {
        Elementwise::Unary(_) | Elementwise::Scalar(..) => {
            want_activation("input", x)?;
            Ok(x.clone())
        }
        Elementwise::Binary(_) => {
            let y = ins[1];
            want_activation("lhs", x)?;
            if x.dtype != y.dtype {
                return Err(format!("operands must have one dtype, found {x} and {y}"));
            }
            Ok(TensorType::new(x.dtype, broadcast(&x.shape, &y.shape)?))
        }
        Elementwise::Cast(to) => {
            if to.is_block_quantized() || x.dtype.is_block_quantized() {
                return Err(format!(
                    "cast between {} and {to} is not an elementwise op; quantize weights when loading",
                    x.dtype
                ));
            }
            Ok(TensorType::new(*to, x.shape.clone()))
        }
    }
}

/// Splits a shape into its constant product and its sorted symbolic dims.
fn numel_parts(s: &Shape) -> (usize, Vec<&Dim>) {
    let mut c = 1usize;
    let mut syms = Vec::new();
    for d in s.dims() {
        match d.as_const() {
            Some(n) => c *= n,
            None => syms.push(d),
        }
    }
    syms.sort();
    (c, syms)
}

fn infer_view(v: &View, ins: &[&TensorType]) -> Result<TensorType, String> {
    let x = ins[0];
    match v {
        View::Reshape(s) => {
            if numel_parts(&x.shape) != numel_parts(s) {
                return Err(format!("cannot reshape {x} to {s}: element counts differ"));
            }
            Ok(TensorType::new(x.dtype, s.clone()))
        }
        View::Permute(p) => {
            let mut seen = p.clone();
            seen.sort_unstable();
            if seen != (0..x.rank()).collect::<Vec<_>>() {
                return Err(format!("{p:?} is not a permutation of the axes of {x}"));
            }
            Ok(TensorType::new(
                x.dtype,
                Shape(p.iter().map(|&i| x.dims()[i].clone()).collect()),
            ))
        }
        View::Slice { axis, start, len } => {
            want_axis(*axis, x)?;
            let d = &x.dims()[*axis];
            if let (Some(s), Some(l), Some(n)) = (start.as_const(), len.as_const(), d.as_const()) {
                if s + l > n {
                    return Err(format!(
                        "slice {s}..{} is out of range for axis {axis} of {x}",
                        s + l
                    ));
                }
            }
            let mut dims = x.dims().to_vec();
            dims[*axis] = len.clone();
            Ok(TensorType::new(x.dtype, Shape(dims)))
        }
        View::Concat { axis } => {
            want_axis(*axis, x)?;
            let mut total = Dim::c(0);
            for (i, y) in ins.iter().enumerate() {
                if y.dtype != x.dtype || y.rank() != x.rank() {
                    return Err(format!(
                        "input {i} is {y}, expected {} of rank {}",
                        x.dtype,
                        x.rank()
                    ));
                }
                for (j, (a, b)) in x.dims().iter().zip(y.dims()).enumerate() {
                    if j != *axis && a != b {
                        return Err(format!(
                            "input {i} is {y}: axis {j} must be {a} as in input 0"
                        ));
                    }
                }
                total = total + y.dims()[*axis].clone();
            }
            let mut dims = x.dims().to_vec();
            dims[*axis] = total;
            Ok(TensorType::new(x.dtype, Shape(dims)))
        }
    }
}

fn infer_nn(n: &Nn, ins: &[&TensorType]) -> Result<TensorType, String> {
    match n {
        Nn::Embedding => {
            let (table, ids) = (ins[0], ins[1]);
            want_rank("table", table, 2)?;
            if !table.dtype.is_float() {
                return Err(format!("table must be a float dtype, found {table}"));
            }
            want_dtype("ids", ids, DType::I32)?;
            let mut dims = ids.dims().to_vec();
            dims.push(table.dims()[1].clone());
            let dtype = if table.dtype == DType::F8E4M3 {
                DType::BF16
            } else {
                table.dtype
            };
            Ok(TensorType::new(dtype, Shape(dims)))
        }
        Nn::RmsNorm { eps } => {
            let (x, w) = (ins[0], ins[1]);
            want_activation("x", x)?;
            want_activation("weight", w)?;
            want_rank("weight", w, 1)?;
            let last = x.shape.last().ok_or("x must have rank >= 1")?;
            want_dim("weight length (last axis of x)", &w.dims()[0], last)?;
            if eps.is_nan() || *eps < 0.0 {
                return Err(format!("eps must be >= 0, found {eps}"));
            }
            Ok(x.clone())
        }
        Nn::MatMul { out } => {
            let (x, w) = (ins[0], ins[1]);
            want_activation("x", x)?;
            if !out.is_activation() {
                return Err(format!(
                    "output dtype must be f32, f16 or bf16, found {out}"
                ));
            }
            want_rank("weight", w, 2)?;
            if w.dtype == DType::I32 {
                return Err(format!("weight must be a float or FP4 dtype, found {w}"));
            }
            let k = x.shape.last().ok_or("x must have rank >= 1")?;
            want_dim(
                "reduction dim (last axis of x vs axis 1 of weight [N, K])",
                &w.dims()[1],
                k,
            )?;
            if let Some(b) = w.dtype.block_size() {
                match k.as_const() {
                    Some(kk) if kk % b == 0 => {}
                    _ => {
                        return Err(format!(
                            "{} weights need K a constant multiple of {b}, found K = {k}",
                            w.dtype
                        ))
                    }
                }
            }
            let mut dims = x.dims().to_vec();
            let last = dims.len() - 1;
            dims[last] = w.dims()[0].clone();
            Ok(TensorType::new(*out, Shape(dims)))
        }
        Nn::Rope { theta, rot_dims } => {
            let (x, pos) = (ins[0], ins[1]);
            want_activation("x", x)?;
            want_rank("x", x, 3)?;
            want_dtype("positions", pos, DType::I32)?;
            want_rank("positions", pos, 1)?;
            want_dim("positions length", &pos.dims()[0], &x.dims()[0])?;
            let hd = x.dims()[2]
                .as_const()
                .ok_or_else(|| format!("head dim must be constant, found {x}"))?;
            if *rot_dims == 0 || rot_dims % 2 != 0 || *rot_dims > hd {
                return Err(format!(
                    "rot_dims must be even and in 2..={hd} (the head dim), found {rot_dims}"
                ));
            }
            if theta.is_nan() || *theta <= 0.0 {
                return Err(format!("theta must be > 0, found {theta}"));
            }
            Ok(x.clone())
        }
    }
}

fn infer_attn(a: &Attn, ins: &[&TensorType]) -> Result<TensorType, String> {
    match a {
        Attn::KvAppend { len, .. } => {
            let (cache, new) = (ins[0], ins[1]);
            want_rank("cache", cache, 3)?;
            want_rank("new rows", new, 3)?;
            if cache.dtype != new.dtype {
                return Err(format!(
                    "cache is {cache} but new rows are {new}: dtypes differ"
                ));
            }
            want_dim("cache heads", &cache.dims()[1], &new.dims()[1])?;
            want_dim("cache head dim", &cache.dims()[2], &new.dims()[2])?;
            Ok(TensorType::new(
                cache.dtype,
                Shape(vec![
                    len.clone() + new.dims()[0].clone(),
                    new.dims()[1].clone(),
                    new.dims()[2].clone(),
                ]),
            ))
        }
        Attn::Attention { mask, scale, sinks } => {
            let (q, k, v) = (ins[0], ins[1], ins[2]);
            for (n, t) in [("q", q), ("k", k), ("v", v)] {
                want_activation(n, t)?;
                want_rank(n, t, 3)?;
            }
            if k.dtype != q.dtype || v.dtype != q.dtype {
                return Err(format!("q, k, v must share a dtype, found {q}, {k}, {v}"));
            }
            want_dim(
                "key head dim (axis 2 of k vs q)",
                &k.dims()[2],
                &q.dims()[2],
            )?;
            want_dim(
                "value length (axis 0 of v vs k)",
                &v.dims()[0],
                &k.dims()[0],
            )?;
            want_dim("value heads (axis 1 of v vs k)", &v.dims()[1], &k.dims()[1])?;
            if let (Some(hq), Some(hkv)) = (q.dims()[1].as_const(), k.dims()[1].as_const()) {
                if hkv == 0 || hq % hkv != 0 {
                    return Err(format!(
                        "query heads ({hq}) must be a multiple of kv heads ({hkv})"
                    ));
                }
            } else {
                return Err(format!(
                    "head counts must be constant, found q {q} and k {k}"
                ));
            }
            if let Mask::Causal { window: Some(0) } | Mask::Block { window: Some(0) } = mask {
                return Err("window must be >= 1".into());
            }
            if !scale.is_finite() {
                return Err(format!("scale must be finite, found {scale}"));
            }
            if *sinks {
                let s = ins[3];
                want_activation("sinks", s)?;
                want_rank("sinks", s, 1)?;
                want_dim("sinks length (query heads)", &s.dims()[0], &q.dims()[1])?;
            }
            Ok(TensorType::new(
                q.dtype,
                Shape(vec![
                    q.dims()[0].clone(),
                    q.dims()[1].clone(),
                    v.dims()[2].clone(),
                ]),
            ))
        }
    }
}

fn infer_moe(m: &Moe, ins: &[&TensorType]) -> Result<TensorType, String> {
    match m {
        Moe::RouterSelect {
            top_k,
            n_group,
            topk_group,
            bias,
            ..
        } => {
            let logits = ins[0];
            want_dtype("router logits", logits, DType::F32)?;
            want_rank("router logits", logits, 2)?;
            let e = logits.dims()[1]
                .as_const()
                .ok_or_else(|| format!("expert count must be constant, found {logits}"))?;
            if *top_k == 0 || *top_k > e {
                return Err(format!(
                    "top_k must be in 1..={e} (the experts), found {top_k}"
                ));
            }
            if *n_group == 0 || e % n_group != 0 {
                return Err(format!("n_group ({n_group}) must divide the {e} experts"));
            }
            if *topk_group == 0 || topk_group > n_group {
                return Err(format!(
                    "topk_group must be in 1..={n_group}, found {topk_group}"
                ));
            }
            if *n_group > 1 && e / n_group < 2 {
                return Err("group scores need at least 2 experts per group".into());
            }
            if *n_group > 1 && top_k > &(topk_group * (e / n_group)) {
                return Err(format!(
                    "top_k ({top_k}) exceeds the experts in {topk_group} kept groups"
                ));
            }
            if *bias {
                let b = ins[1];
                want_dtype("correction bias", b, DType::F32)?;
                want_rank("correction bias", b, 1)?;
                want_dim("correction bias length", &b.dims()[0], &Dim::c(e))?;
            }
            Ok(TensorType::new(
                DType::I32,
                Shape(vec![logits.dims()[0].clone(), Dim::c(*top_k)]),
            ))
        }
        Moe::RouterWeights { .. } => {
            let (logits, idx) = (ins[0], ins[1]);
            want_dtype("router logits", logits, DType::F32)?;
            want_rank("router logits", logits, 2)?;
            want_dtype("expert indices", idx, DType::I32)?;
            want_rank("expert indices", idx, 2)?;
            want_dim(
                "tokens (axis 0 of indices)",
                &idx.dims()[0],
                &logits.dims()[0],
            )?;
            Ok(TensorType::new(DType::F32, idx.shape.clone()))
        }
        Moe::LocalIndex { first, count } => {
            let idx = ins[0];
            want_dtype("expert indices", idx, DType::I32)?;
            want_rank("expert indices", idx, 2)?;
            if *count == 0
                || first
                    .checked_add(*count)
                    .is_none_or(|e| e > i32::MAX as usize)
            {
                return Err(format!(
                    "experts {first}..{first}+{count} must be a non-empty range of i32 indices"
                ));
            }
            Ok(idx.clone())
        }
        Moe::Experts => {
            let (x, idx, w, w13, w2) = (ins[0], ins[1], ins[2], ins[3], ins[4]);
            want_activation("x", x)?;
            want_rank("x", x, 2)?;
            want_dtype("expert indices", idx, DType::I32)?;
            want_rank("expert indices", idx, 2)?;
            want_dtype("expert weights", w, DType::F32)?;
            if w.shape != idx.shape {
                return Err(format!("expert weights {w} must match indices {idx}"));
            }
            want_dim(
                "tokens (axis 0 of indices vs x)",
                &idx.dims()[0],
                &x.dims()[0],
            )?;
            want_rank("gate_up", w13, 3)?;
            want_rank("down", w2, 3)?;
            let h = &x.dims()[1];
            want_dim("gate_up [E, 2I, H] axis 2", &w13.dims()[2], h)?;
            want_dim("down [E, H, I] axis 1", &w2.dims()[1], h)?;
            want_dim(
                "down experts (axis 0 vs gate_up)",
                &w2.dims()[0],
                &w13.dims()[0],
            )?;
            want_dim(
                "gate_up rows (2 x down axis 2)",
                &w13.dims()[1],
                &(w2.dims()[2].clone() * 2),
            )?;
            for (n, t) in [("gate_up", w13), ("down", w2)] {
                if t.dtype == DType::I32 {
                    return Err(format!("{n} must be a float or FP4 dtype, found {t}"));
                }
                if let Some(b) = t.dtype.block_size() {
                    if t.dims()[2].as_const().is_none_or(|k| k % b != 0) {
                        return Err(format!(
                            "{n} is {t}: its last axis must be a multiple of {b}"
                        ));
                    }
                }
            }
            Ok(x.clone())
        }
    }
}

fn infer_comm(c: &Comm, ins: &[&TensorType]) -> Result<TensorType, String> {
    let x = ins[0];
    if c.ranks() == 0 {
        return Err("ranks must be >= 1".into());
    }
    match c {
        Comm::AllReduce { .. } => {
            want_activation("input", x)?;
            Ok(x.clone())
        }
        Comm::AllGather { axis, ranks } => {
            if !(x.dtype.is_float() || x.dtype == DType::I32) {
                return Err(format!(
                    "input must be a float or i32 tensor, found {x}; gather weights when loading"
                ));
            }
            want_axis(*axis, x)?;
            let mut dims = x.dims().to_vec();
            dims[*axis] = dims[*axis].clone() * (*ranks as i64);
            Ok(TensorType::new(x.dtype, Shape(dims)))
        }
    }
}

fn infer_sample(s: &Sample, ins: &[&TensorType]) -> Result<TensorType, String> {
    let x = ins[0];
    want_activation("logits", x)?;
    match s {
        Sample::Argmax => {
            let mut dims = x.dims().to_vec();
            if dims.pop().is_none() {
                return Err("logits must have rank >= 1".into());
            }
            Ok(TensorType::new(DType::I32, Shape(dims)))
        }
        Sample::Sample { temperature } => {
            want_rank("logits", x, 2)?;
            let seed = ins[1];
            want_dtype("seed", seed, DType::I32)?;
            if seed.shape != Shape(vec![Dim::c(2)]) {
                return Err(format!("seed must be i32[2] (seed, counter), found {seed}"));
            }
            if !(*temperature > 0.0 && temperature.is_finite()) {
                return Err(format!(
                    "temperature must be > 0 (use argmax for greedy), found {temperature}"
                ));
            }
            Ok(TensorType::new(
                DType::I32,
                Shape(vec![x.dims()[0].clone()]),
            ))
        }
    }
}
