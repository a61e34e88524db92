//! # tilefuse-macros
//!
//! The graph-definition DSL: [`macro@graph`], an attribute that turns an
//! ordinary Rust function into one that builds a `tilefuse-ir` graph (the
//! facade re-exports it as `tilefuse::graph`). Model authors write the forward
//! pass like the math; the expansion is plain calls on
//! `::tilefuse_ir::Builder`, so rustc type-checks what they wrote, and every
//! node records a readable name and the author's `file:line`. The syntax is
//! documented on [`macro@graph`].
//!
//! ## Design
//!
//! - **Two halves.** `parse` turns the `syn` item into the DSL's own small
//!   AST and holds every rule (which variables are tensors, which methods are
//!   ops, what a shape, a dim or a dtype is) and every diagnostic; `generate`
//!   turns the AST into tokens with `quote` and makes no decisions.
//! - **Tensor-ness is syntactic.** A proc macro sees no types, so the parser
//!   tracks tensor variables through parameters and `let`s, scoped like Rust's
//!   bindings. Code that touches no tensor op is emitted verbatim, so plain
//!   Rust (`let nh = cfg.num_attention_heads;`, `if cfg.dense[i] { .. }`) is
//!   untouched and rustc reports its errors as usual.
//! - **Small, flat expansions.** A builder call is never nested in another
//!   (two `&mut` borrows): operands that call the builder are bound to
//!   temporaries first, in evaluation order, which keeps node creation (and
//!   the builder's default names `matmul`, `matmul_1`, …) in written order.
//!   A source place is recorded once per statement, and again after a nested
//!   `#[graph]` call or block has moved it.
//! - **Spans.** The author's tokens keep their spans, so type errors point at
//!   the author's code, and `::core::line!()` spanned at a statement gives the
//!   author's line. The builder and temporaries use `Span::mixed_site()`, so
//!   they neither see nor shadow the author's names.
//! - **Paths.** Generated code uses absolute paths (`::tilefuse_ir::…`,
//!   `::core::…`, `::std::…`): the calling crate depends on `tilefuse-ir` and
//!   needs no alias.
//! - **Errors.** A misuse is a `syn::Error` at the author's tokens that says
//!   what to write instead, emitted as `compile_error!` *together with the
//!   original item*, so the function still exists for the IDE. rustc then also
//!   reports the original body's own errors (a `NodeId` has no `silu`); the
//!   first error is the macro's.
//! - **Lean syn.** Features `full`, `parsing`, `printing`, `proc-macro` and
//!   `visit-mut` (to find tensor sub-expressions inside arbitrary Rust).
//!
//! Tests: `tests/dsl.rs` builds graphs and checks names, places and shape
//! errors; `tests/ui/` holds a compile-fail case with its `.stderr` for every
//! diagnostic; `tests/snapshots/` shows the expansion of the core constructs.

use proc_macro::TokenStream;

mod generate;
mod parse;

/// Turns a function into one that builds graph nodes.
///
/// ```
/// use tilefuse_ir::{shape, Builder, DType, NodeId};
/// use tilefuse_macros::graph;
///
/// /// RMSNorm, then a SwiGLU MLP.
/// #[graph(scope = "mlp")]
/// fn norm_mlp(x: Tensor![T, hidden], hidden: usize, inter: usize) -> NodeId {
///     let norm = weight!("mlp.norm.weight", bf16, [hidden]);
///     let wg = weight!("mlp.gate_proj.weight", bf16, [inter, hidden]);
///     let wu = weight!("mlp.up_proj.weight", bf16, [inter, hidden]);
///     let wd = weight!("mlp.down_proj.weight", bf16, [hidden, inter]);
///     let h = x.rms_norm(norm, 1e-6);
///     let act = h.matmul(wg).silu() * h.matmul(wu);
///     act.matmul(wd)
/// }
///
/// let mut b = Builder::new("norm_mlp", &["T"]);
/// let x = b.input("x", DType::BF16, shape![T, 64])?;
/// let y = norm_mlp(&mut b, x, 64, 128)?;
/// b.output("y", y)?;
/// let text = b.finish()?.to_string();
/// println!("{text}");
/// assert!(text.contains(r#"nn.rms_norm{eps=1e-6}(%0, %1) : bf16[T,64] "mlp.h" @ "#));
/// assert!(text.contains(r#"ew.mul(%7, %8) : bf16[T,128] "mlp.act" @ "#));
/// assert!(text.contains(r#"nn.matmul{out=bf16}(%9, %4) : bf16[T,64] "mlp.out" @ "#));
///
/// // A declared shape is checked when the graph is built.
/// let mut b = Builder::new("bad", &["T"]);
/// let x = b.input("x", DType::BF16, shape![T, 32])?;
/// let err = norm_mlp(&mut b, x, 64, 128).unwrap_err().to_string();
/// assert!(err.starts_with("parameter `x` of `norm_mlp` at "), "{err}");
/// assert!(err.ends_with("expected shape [T,64], found bf16[T,32]"), "{err}");
/// # Ok::<(), tilefuse_ir::IrError>(())
/// ```
///
/// # The function
///
/// `#[graph] fn f(params) -> R { body }` becomes
/// `fn f(builder: &mut ::tilefuse_ir::Builder, params) -> ::tilefuse_ir::Result<R>`:
/// the builder is an implicit first parameter and errors propagate. `R` is
/// `NodeId`, a tuple of `NodeId`s, or nothing. Plain Rust calls it as
/// `f(&mut b, ...)?`. The body runs in a name scope (the function's name, or
/// the `scope` argument), so its nodes are named `scope.binding`.
///
/// Attribute arguments:
/// - `scope = "attn"` names the scope; `scope = "layer{i}"` formats the
///   function's parameters; `scope = ""` adds no level (a helper whose nodes
///   belong to its caller's scope).
/// - `calls(attention, mlp)` lists the `#[graph]` functions the body calls:
///   `attention(a, b)` (or any path ending in a listed name) becomes
///   `attention(builder, a, b)?`. The list is the explicit marker, since a
///   macro cannot see other functions; every other call stays plain Rust.
///
/// # Tensors and values
///
/// A tensor is a `NodeId`. A variable is a tensor when it is a parameter typed
/// `NodeId` or `Tensor![..]`, a `let` bound to a tensor expression, or a
/// `let x: NodeId = ..`. Everything else is ordinary Rust and is left alone.
/// A binding the macro cannot see into, such as the `b` of
/// `if let Some(b) = bias`, is a plain value: write `let b: NodeId = b;` to
/// use it as a tensor.
///
/// Tensor expressions:
/// - methods named as on the builder, the tensor being the receiver:
///   `x.rms_norm(w, eps)`, `h.matmul(w)`, `h.matmul_to(w, f32)`, `x.silu()`,
///   `q.rope(pos, theta, rot_dims)`, `x.reshape([T, nh, dk])`, `x.scale(c)`,
///   `x.cast(f32)`, `cache.kv_append(k, S, ring)`,
///   `q.attention(k, v, sinks, mask, scale)`, `logits.router_select(bias, &router)`,
///   `logits.router_weights(idx, &router)`, `x.experts(idx, w, gate_up, down)`,
///   `table.embedding(ids)`, `x.argmax()`, `logits.sample(seed, temperature)`,
///   `x.slice(axis, start, len)`, `x.permute(&[1, 0, 2])`, `[a, b].concat(axis)`,
///   `x.add(y)`, `x.mul(y)`, and `x.unary(op)`, `x.binary(op, y)`,
///   `x.scalar(op, c)`, `x.reduce(kind, axis)`. A tensor argument may be
///   written `w` or `&w`.
/// - operators: `a + b`, `a - b`, `a * b`, `a / b` on two tensors; a tensor
///   and an `f32` (`x * 0.5`, `1.0 + x`, `x - c`, `x / c`); unary `-x`; and
///   `x += y` (`-=`, `*=`, `/=`) on a tensor variable.
/// - declarations: `weight!(name, dtype, shape)`, `input!(..)` and
///   `cache!(..)` add graph inputs; `output!(name, tensor)` marks an output.
///   A literal name is a format string with captured variables
///   (`"model.layers.{i}.mlp.gate.weight"`) and is used verbatim, not scoped.
/// - calls to the functions listed in `calls(..)`, and `if`, `match` and
///   blocks whose every branch is a tensor.
///
/// Tensor sub-expressions inside plain Rust (`Some(weight!(..))`,
/// `(x.silu(), mask)`) are evaluated first, left to right, then the Rust.
/// Loops, `if`, `match` and early `return` work as in Rust.
///
/// A shape is written `[dim, ...]`. A dim that is an identifier with no
/// lower-case letter (`T`, `S`) is a symbol; anything else is a value (`hid`,
/// `nh * dk`, and `(HIDDEN)` for a constant). A dim argument (`kv_append`'s
/// length, `slice`'s start and length) follows the same rule. A dtype
/// argument is a name (`f32`, `f16`, `bf16`, `f8e4m3`, `i32`, `mxfp4`,
/// `nvfp4`) or any `DType` expression (`opt.dtype`).
///
/// # Names and places
///
/// `let q = <op>;` names the new node `q` in the current scope
/// (`layer3.attn.q`); a new node the function returns is named `out`. Inputs
/// keep their declared names, intermediate nodes the builder's default
/// (`layer3.attn.matmul_1`), and a value passed on (`let y = x;`, a
/// `#[graph]` call's result) is not renamed. Each statement that adds nodes
/// first records its `file:line` (`Builder::set_loc`), so every node, and
/// every shape error the builder reports, points at the author's line.
///
/// A parameter declared `x: Tensor![T, cfg.hidden_size]` is a `NodeId` whose
/// recorded shape is checked on entry; a mismatch is an error naming the
/// parameter, the function, the author's `file:line`, and the expected and
/// found shapes.
///
/// # Diagnostics
///
/// Misuse is a compile error at the author's tokens that says what to write
/// instead: the attribute on something other than a free, synchronous,
/// non-`const`, safe Rust function; unknown, repeated or malformed attribute
/// arguments; a scope that formats a name which is not a parameter; a
/// malformed `Tensor![..]` or shape; a return type other than `NodeId`s; a
/// method that is not a tensor op (the message lists them), with type
/// arguments, or with the wrong number of arguments; a tensor bound to a
/// pattern; an operator tensors lack, or a scalar on the left of `-` or `/`;
/// `?` after an op; a loop over a tensor or a `while` condition that adds
/// nodes; tensor ops in a closure or a `let .. else`; a DSL macro with the
/// wrong arguments.
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
