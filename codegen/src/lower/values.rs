//! Where a kernel finds a value, and how generated code reads and rounds it.

use tilefuse_ir::{BinaryOp, DType, Elementwise, InputKind, NodeId, Op, UnaryOp};

use crate::emit::{Expr, Stmt, Ty};
use crate::error::CodegenError;
use crate::plan::Plan;

/// The C++ storage type of a dtype in generated code.
pub fn ctype(d: DType) -> Result<Ty, String> {
    match d {
        DType::F32 => Ok(Ty::F32),
        DType::BF16 => Ok(Ty::Bf16),
        DType::F16 => Ok(Ty::F16),
        DType::I32 => Ok(Ty::I32),
        d => Err(format!("{d} has no element-wise storage type")),
    }
}

/// A typed pointer expression to the storage of node `n`: an arena buffer,
/// a weight or (for a cache) the cache buffer.
pub fn pointer(plan: &Plan, n: NodeId, mutable: bool) -> Result<Expr, CodegenError> {
    let f = &plan.fused;
    let s = f.storage(n);
    let node = f.graph.node(s);
    let unsupported = |reason: String| CodegenError::Unsupported {
        node: f.graph.describe(s),
        reason,
    };
    let ty = ctype(node.ty.dtype).map_err(unsupported)?;
    let (base, off) = match node.op {
        Op::Input(InputKind::Weight) => (
            "wts",
            plan.weight(s).map(|w| w.offset).ok_or_else(|| {
                CodegenError::Internal(format!("no weight slot for {}", f.graph.describe(s)))
            })?,
        ),
        Op::Input(InputKind::Cache) => (
            "kv",
            plan.cache(s).map(|c| c.offset).ok_or_else(|| {
                CodegenError::Internal(format!("no cache slot for {}", f.graph.describe(s)))
            })?,
        ),
        _ => (
            "act",
            plan.offset_of(s).ok_or_else(|| {
                CodegenError::Internal(format!("no arena buffer for {}", f.graph.describe(s)))
            })?,
        ),
    };
    let ptr = if mutable {
        Ty::Ptr(Box::new(ty))
    } else {
        Ty::ConstPtr(Box::new(ty))
    };
    let ptr = match ptr {
        Ty::Ptr(t) => Ty::Named(format!("{t}*")),
        Ty::ConstPtr(t) => Ty::Named(format!("const {t}*")),
        t => t,
    };
    Ok(Expr::Reinterpret(
        ptr,
        Box::new(Expr::var(base).bin("+", Expr::Offset(off as i64))),
    ))
}

/// `tf::round_to<T>(e)` for a float dtype (identity for f32).
pub fn round(d: DType, e: Expr) -> Result<Expr, String> {
    match d {
        DType::F32 => Ok(e),
        DType::BF16 => Ok(Expr::call("tf::round_to<tf::bf16>", vec![e])),
        DType::F16 => Ok(Expr::call("tf::round_to<__half>", vec![e])),
        d => Err(format!("no element-wise rounding to {d}")),
    }
}

/// The f32 expression of one elementwise op on f32 operands (exactly the
/// interpreter's formula), before rounding to the node's dtype.
pub fn ew_expr(op: &Op, args: &[Expr]) -> Result<Expr, String> {
    let a = || args[0].clone();
    let one = || Expr::F32(1.0);
    Ok(match op {
        Op::Ew(Elementwise::Unary(u)) => match u {
            UnaryOp::Neg => Expr::F32(0.0).bin("-", a()),
            UnaryOp::Exp => Expr::call("expf", vec![a()]),
            UnaryOp::Sqrt => Expr::call("sqrtf", vec![a()]),
            UnaryOp::Rsqrt => one().bin("/", Expr::call("sqrtf", vec![a()])),
            UnaryOp::Recip => one().bin("/", a()),
            UnaryOp::Square => a().bin("*", a()),
            UnaryOp::Abs => Expr::call("fabsf", vec![a()]),
            UnaryOp::Sigmoid => one().bin(
                "/",
                one().bin("+", Expr::call("expf", vec![Expr::F32(0.0).bin("-", a())])),
            ),
            UnaryOp::Silu => a().bin(
                "*",
                one().bin(
                    "/",
                    one().bin("+", Expr::call("expf", vec![Expr::F32(0.0).bin("-", a())])),
                ),
            ),
        },
        Op::Ew(Elementwise::Binary(b)) => binary(*b, a(), args[1].clone()),
        Op::Ew(Elementwise::Scalar(b, c)) => binary(*b, a(), Expr::F32(*c)),
        Op::Ew(Elementwise::Cast(d)) if d.is_activation() => a(),
        other => {
            return Err(format!(
                "`{}` is not an element-wise op on floats",
                other.mnemonic()
            ))
        }
    })
}

fn binary(b: BinaryOp, x: Expr, y: Expr) -> Expr {
    match b {
        BinaryOp::Add => x.bin("+", y),
        BinaryOp::Sub => x.bin("-", y),
        BinaryOp::Mul => x.bin("*", y),
        BinaryOp::Div => x.bin("/", y),
        BinaryOp::Max => Expr::call("fmaxf", vec![x, y]),
        BinaryOp::Min => Expr::call("fminf", vec![x, y]),
    }
}

/// An unsupported-combination error naming the node.
pub fn unsupported(f: &crate::fusion::Fused, n: NodeId, reason: impl Into<String>) -> CodegenError {
    CodegenError::Unsupported {
        node: f.graph.describe(n),
        reason: reason.into(),
    }
}

/// A pointer of type `ty*` to the first workspace of kernel `ki`.
pub fn work_ptr(plan: &Plan, ki: usize, ty: &str) -> Result<Expr, CodegenError> {
    work_ptr_slot(plan, ki, 0, ty)
}

/// Like [`work_ptr`], for workspace `slot` of kernel `ki`.
pub fn work_ptr_slot(plan: &Plan, ki: usize, slot: u8, ty: &str) -> Result<Expr, CodegenError> {
    let b = plan
        .buffer(crate::plan::Value::Work(ki, slot))
        .ok_or_else(|| CodegenError::Internal(format!("kernel {ki} has no workspace {slot}")))?;
    Ok(Expr::Reinterpret(
        Ty::Named(format!("{ty}*")),
        Box::new(Expr::var("act").bin("+", Expr::Offset(b.offset as i64))),
    ))
}

/// `if (cond) return;` — tiles with no work leave at once (uniform over the CTA).
pub fn guard(cond: Expr) -> Stmt {
    Stmt::If(cond, vec![Stmt::Return], vec![])
}

/// A row dim (`T`, `C+T`, `S+C`, …) as a C++ expression: `T` and `S` are
/// the tile function's parameters, any other symbol is read from its word of
/// the arena head ([`Plan::symbol_slot`]).
pub fn dim_expr(plan: &Plan, d: &tilefuse_ir::Dim) -> Result<Expr, CodegenError> {
    let mut e: Option<Expr> = None;
    for (sym, a) in d.terms() {
        let v = match sym {
            "T" | "S" => Expr::var(sym),
            _ => {
                let slot = plan.symbol_slot(sym).ok_or_else(|| {
                    CodegenError::Internal(format!("symbol `{sym}` of {d} is not a graph symbol"))
                })?;
                Expr::var(format!("reinterpret_cast<const int*>(act)[{slot}]"))
            }
        };
        let term = if a == 1 { v } else { v.bin("*", Expr::I32(a)) };
        e = Some(match e {
            None => term,
            Some(x) => x.bin("+", term),
        });
    }
    let c = d.constant();
    Ok(match e {
        None => Expr::I32(c),
        Some(x) if c == 0 => x,
        Some(x) => x.bin("+", Expr::I32(c)),
    })
}
