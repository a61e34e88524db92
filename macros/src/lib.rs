//! # tilefuse-macros
//!
//! The graph-definition DSL: [`macro@graph`], an attribute that turns an
//! ordinary Rust function into one that builds a `tilefuse-ir` graph. Model
//! authors write the forward pass like the math; the expansion is plain calls
//! on `::tilefuse_ir::Builder`, so rustc type-checks what they wrote, and every
//! node records a readable name and the author's `file:line`.
//!
//! ```
//! use tilefuse_ir::{shape, Builder, DType, NodeId};
//! use tilefuse_macros::graph;
//!
//! /// RMSNorm, then a SwiGLU MLP.
//! #[graph(scope = "mlp")]
//! fn norm_mlp(x: Tensor![T, hidden], hidden: usize, inter: usize) -> NodeId {
//!     let norm = weight!("mlp.norm.weight", bf16, [hidden]);
//!     let wg = weight!("mlp.gate_proj.weight", bf16, [inter, hidden]);
//!     let wu = weight!("mlp.up_proj.weight", bf16, [inter, hidden]);
//!     let wd = weight!("mlp.down_proj.weight", bf16, [hidden, inter]);
//!     let h = x.rms_norm(norm, 1e-6);
//!     let act = h.matmul(wg).silu() * h.matmul(wu);
//!     act.matmul(wd)
//! }
//!
//! let mut b = Builder::new("norm_mlp", &["T"]);
//! let x = b.input("x", DType::BF16, shape![T, 64])?;
//! let y = norm_mlp(&mut b, x, 64, 128)?;
//! b.output("y", y)?;
//! let g = b.finish()?;
//! let text = g.to_string();
//! println!("{text}");
//! assert!(text.contains(r#"nn.rms_norm{eps=1e-6}(%0, %1) : bf16[T,64] "mlp.h""#));
//! assert!(text.contains(r#"ew.mul(%7, %8) : bf16[T,128] "mlp.act""#));
//! assert!(text.contains(r#"nn.matmul{out=bf16}(%9, %4) : bf16[T,64] "mlp.out""#));
//!
//! // A declared shape is checked when the graph is built.
//! let mut b = Builder::new("bad", &["T"]);
//! let x = b.input("x", DType::BF16, shape![T, 32])?;
//! let err = norm_mlp(&mut b, x, 64, 128).unwrap_err().to_string();
//! assert!(err.starts_with("parameter `x` of `norm_mlp` at "), "{err}");
//! assert!(err.ends_with("expected shape [T,64], found bf16[T,32]"), "{err}");
//! # Ok::<(), tilefuse_ir::IrError>(())
//! ```
//!
//! ## The function
//!
//! `#[graph] fn f(params) -> R { body }` becomes
//! `fn f(builder: &mut ::tilefuse_ir::Builder, params) -> ::tilefuse_ir::Result<R>`:
//! the builder is an implicit first parameter and errors propagate. `R` is
//! `NodeId`, a tuple of `NodeId`s, or nothing. Call the result from plain Rust
//! as `f(&mut b, ...)?`. The body runs inside the name scope of the function
//! (its name, or the `scope` argument), so nodes are named `scope.binding`.
//!
//! Attribute arguments:
//! - `scope = "attn"` names the scope; `scope = "layer{i}"` formats the
//!   function's parameters; `scope = ""` adds no level (a helper that names
//!   its nodes in its caller's scope).
//! - `calls(attention, mlp)` lists the `#[graph]` functions the body calls.
//!   A call `attention(a, b)` (any path ending in a listed name) becomes
//!   `attention(builder, a, b)?`. The list is the explicit marker: the macro
//!   cannot see other functions, and plain Rust calls stay plain.
//!
//! ## Tensors and values
//!
//! A tensor is a `NodeId`. The macro knows a variable is a tensor when it is a
//! parameter typed `NodeId` or `Tensor![..]`, a `let` bound to a tensor
//! expression, or a `let x: NodeId = ..`. Everything else is ordinary Rust and
//! is left alone: `let nh = cfg.num_attention_heads;`, `if cfg.dense[i] { .. }`,
//! `for i in 0..n { .. }`, `format!(..)`.
//!
//! Tensor expressions:
//! - methods named like the builder's, with the tensor as receiver:
//!   `x.rms_norm(w, eps)`, `h.matmul(w)`, `h.matmul_to(w, f32)`, `x.silu()`,
//!   `q.rope(pos, theta, rot_dims)`, `x.reshape([T, nh, dk])`, `x.scale(c)`,
//!   `x.cast(f32)`, `cache.kv_append(k, S, ring)`,
//!   `q.attention(k, v, sinks, mask, scale)`, `logits.router_select(bias, &cfg)`,
//!   `logits.router_weights(idx, &cfg)`, `x.experts(idx, w, gate_up, down)`,
//!   `table.embedding(ids)`, `x.argmax()`, `logits.sample(seed, t)`,
//!   `x.slice(axis, start, len)`, `x.permute(&[1, 0, 2])`, `[a, b].concat(axis)`,
//!   `x.add(y)`, `x.mul(y)`, and `x.unary(op)`, `x.binary(op, y)`,
//!   `x.scalar(op, c)`, `x.reduce(kind, axis)`. A tensor argument may be
//!   written `w` or `&w`.
//! - operators: `a + b`, `a - b`, `a * b`, `a / b` on two tensors; a tensor
//!   and an `f32` (`x * 0.5`, `1.0 + x`, `x - c`, `x / c`); unary `-x`;
//!   `x += y` and the like on a tensor variable.
//! - declarations: `weight!(name, dtype, shape)`, `input!(..)`, `cache!(..)`
//!   declare graph inputs; `output!(name, tensor)` marks an output. A name
//!   literal is a format string with captured variables
//!   (`"model.layers.{i}.mlp.gate.weight"`) and is used verbatim (not scoped).
//! - calls to the functions listed in `calls(..)`, and `if`/`match`/blocks
//!   whose every branch is a tensor.
//!
//! Tensor sub-expressions inside plain Rust (`Some(weight!(..))`,
//! `(x.silu(), mask)`) are evaluated first, left to right, then the Rust.
//!
//! Shapes are written `[dim, ...]`. A dim that is an identifier with no
//! lower-case letter (`T`, `S`) is a symbol; anything else is a value
//! (`hid`, `nh * dk`, `(HIDDEN)` for a constant). A dim argument (`kv_append`'s
//! length, `slice`'s start and length) follows the same rule. A dtype argument
//! is a name (`f32`, `f16`, `bf16`, `f8e4m3`, `i32`, `mxfp4`, `nvfp4`) or any
//! `DType` expression (`opt.dtype`).
//!
//! ## Names and places
//!
//! `let q = <op>;` names the new node `q` in the current scope
//! (`layer3.attn.q`); a new node a function returns is named `out`. Inputs keep
//! their declared names; intermediate nodes keep the builder's default
//! (`layer3.attn.matmul_1`); a value passed through (`let y = x;`, a
//! `#[graph]` call's result) is not renamed. Before each statement that adds
//! nodes, the expansion records the statement's `file:line`
//! (`Builder::set_loc`), so every node, and every shape error the builder
//! reports, points at the author's line.
//!
//! A parameter declared `x: Tensor![T, cfg.hidden_size]` is a `NodeId` whose
//! recorded shape is checked on entry; a mismatch is an error naming the
//! parameter, the function, the author's `file:line`, and the expected and
//! found shapes.
//!
//! ## Diagnostics
//!
//! Misuse is a compile error at the author's tokens that says what to write
//! instead: an attribute on something other than a free, synchronous,
//! non-`const` function; unknown or malformed attribute arguments; a scope
//! that formats a name which is not a parameter; a malformed `Tensor![..]` or
//! shape; a return type other than `NodeId`s; a method that is not a tensor op
//! (the message lists them) or an op with the wrong number of arguments; a
//! tensor bound to a pattern; an operator tensors lack, or a scalar on the left
//! of `-` and `/`; `?` after an op; a loop over a tensor; tensor ops in a
//! closure or a `let .. else`; DSL macros with the wrong arguments. On an error
//! the original item is emitted too, so the function still exists for the IDE
//! and for its callers.
//!
//! ## Design
//!
//! `parse` turns the `syn` item into the DSL's own small AST (and holds every
//! rule and diagnostic); `generate` turns the AST into tokens with `quote`.
//! syn is used with `full`, `parsing`, `printing`, `proc-macro` and
//! `visit-mut` (the last to find tensor sub-expressions in arbitrary Rust).
//! The expansion uses absolute paths (`::tilefuse_ir::…`), so the calling
//! crate needs `tilefuse-ir` as a dependency and no alias.

use proc_macro::TokenStream;

mod generate;
mod parse;

/// Turns a function into a graph-building function; see the [crate docs](crate)
/// for the syntax.
///
/// ```
/// # use tilefuse_ir::NodeId;
/// #[tilefuse_macros::graph(scope = "")]
/// fn residual(x: NodeId, y: NodeId) -> NodeId {
///     x + y
/// }
/// ```
#[proc_macro_attribute]
pub fn graph(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(attr.into(), item.clone().into()) {
        Ok(tokens) => tokens.into(),
        Err(err) => {
            let mut out = proc_macro2::TokenStream::from(item);
            out.extend(err.to_compile_error());
            out.into()
        }
    }
}

/// Parses and generates; an error is spanned at the author's tokens.
fn expand(
    attr: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
) -> syn::Result<proc_macro2::TokenStream> {
    let f = parse::parse(attr, item)?;
    Ok(generate::generate(&f))
}

#[cfg(test)]
mod expand_tests;
