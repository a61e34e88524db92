//! Parsing: syn's function item → the DSL's own small AST ([`GraphFn`]).
//!
//! This is where the DSL's rules live: which variables are tensors, which
//! method calls are ops, what a shape or a dtype argument is. Every misuse is a
//! [`syn::Error`] spanned at the author's tokens, with a message that says
//! what to write instead. Nothing here produces output tokens except the
//! placeholders that stand for hoisted sub-expressions ([`Expr::Template`]).
//!
//! Tensor-ness is syntactic: a variable is a tensor when it is a `NodeId` or
//! `Tensor![..]` parameter, or is bound by `let` to a tensor expression (or
//! annotated `: NodeId`). The sets are scoped like Rust's bindings: a block
//! works on a copy, and shadowing by a plain value removes a name.

use std::collections::BTreeSet;

use proc_macro2::{Span, TokenStream};
use syn::ext::IdentExt;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::visit_mut::{self, VisitMut};
use syn::{Error, Ident, LitStr, Pat, Result, Token};

/// A parsed `#[graph]` function.
pub struct GraphFn {
    /// Attributes kept on the expanded function (docs, lints).
    pub attrs: Vec<syn::Attribute>,
    /// Visibility.
    pub vis: syn::Visibility,
    /// The function's name.
    pub ident: Ident,
    /// Generics and where clause, unchanged.
    pub generics: syn::Generics,
    /// Parameters after the implicit builder.
    pub params: Vec<Param>,
    /// The declared return type (`None` for `()`); the expansion wraps it in `Result`.
    pub ret: Option<syn::Type>,
    /// The name scope the body runs in; `None` adds no scope level.
    pub scope: Option<LitStr>,
    /// The body.
    pub body: Block,
}

/// A parameter; `shape` is set for `Tensor![..]` parameters.
pub struct Param {
    /// Attributes on the parameter.
    pub attrs: Vec<syn::Attribute>,
    /// The binding pattern.
    pub pat: Pat,
    /// The type (`NodeId` for a `Tensor![..]` parameter is written by the generator).
    pub ty: syn::Type,
    /// The declared shape of a `Tensor![..]` parameter, with the name it checks.
    pub shape: Option<(Ident, Vec<Dim>, Span)>,
}

/// A block: statements, the last of which may be its value (an expression without `;`).
pub struct Block {
    /// The statements.
    pub stmts: Vec<Stmt>,
}

/// A statement.
pub enum Stmt {
    /// Plain Rust with no tensor op inside, emitted verbatim.
    Rust(syn::Stmt),
    /// `let pat = init;` where `init` builds nodes; `name` is set when the new node is named.
    Let {
        /// The `let` token's span (the source place recorded).
        span: Span,
        /// The pattern, type annotation included.
        pat: Pat,
        /// The initialiser.
        init: Expr,
        /// The binding a fresh node is named after.
        name: Option<Ident>,
    },
    /// An expression statement; `semi` is false for a block's value.
    Expr {
        /// The source place recorded.
        span: Span,
        /// The expression.
        expr: Expr,
        /// Whether a `;` follows.
        semi: bool,
    },
}

/// A DSL expression. Invariant: `Rust` and `Var` never contain a tensor op;
/// every other variant calls the builder somewhere.
pub enum Expr {
    /// Plain Rust, verbatim.
    Rust(syn::Expr),
    /// A tensor variable.
    Var(Ident),
    /// A builder op; `args` in the builder method's order, receiver included.
    Op {
        /// The method token as written (an entry of [`OPS`]).
        method: Ident,
        /// The arguments.
        args: Vec<Arg>,
    },
    /// `a + b` etc. on two tensors.
    Binary {
        /// The operator.
        op: Arith,
        /// The operator's span.
        span: Span,
        /// Left tensor.
        lhs: Box<Expr>,
        /// Right tensor.
        rhs: Box<Expr>,
    },
    /// A tensor and a scalar: `x * c`, `c + x`, `x - c`, `x / c`.
    Scalar {
        /// The operator.
        op: Arith,
        /// The operator's span.
        span: Span,
        /// The tensor operand.
        tensor: Box<Expr>,
        /// The scalar operand (an `f32`).
        value: Box<Expr>,
    },
    /// `-x` on a tensor.
    Neg {
        /// The `-` span.
        span: Span,
        /// The operand.
        x: Box<Expr>,
    },
    /// `weight!`, `input!` or `cache!`.
    Decl {
        /// Which builder method.
        kind: Ident,
        /// The name.
        name: Name,
        /// The dtype.
        dtype: DTypeArg,
        /// The shape.
        shape: ShapeArg,
    },
    /// `output!(name, value)`.
    Output {
        /// The macro path's span.
        span: Span,
        /// The output name.
        name: Name,
        /// The value.
        value: Box<Expr>,
    },
    /// A call to another `#[graph]` function listed in `calls(..)`.
    Call {
        /// The function path as written.
        func: syn::ExprPath,
        /// The arguments after the builder.
        args: Vec<Expr>,
    },
    /// Plain Rust in which tensor sub-expressions were replaced by
    /// placeholders; the holes are evaluated first, in order.
    Template {
        /// The Rust expression with placeholders.
        expr: syn::Expr,
        /// Placeholder and the expression it stands for.
        holes: Vec<(Ident, Expr)>,
    },
    /// `if cond { .. } else ..`.
    If {
        /// The condition.
        cond: Box<Expr>,
        /// The then branch.
        then: Block,
        /// The else branch (a block or another `if`).
        els: Option<Box<Expr>>,
    },
    /// `match scrutinee { arms }`.
    Match {
        /// The scrutinee.
        expr: Box<Expr>,
        /// The arms.
        arms: Vec<Arm>,
    },
    /// A block.
    Block {
        /// Its label.
        label: Option<syn::Label>,
        /// The block.
        block: Block,
    },
    /// `for`, `while` or `loop`.
    Loop {
        /// Its label.
        label: Option<syn::Label>,
        /// What kind of loop.
        head: LoopHead,
        /// The body.
        body: Block,
    },
    /// `place = value` (also the expansion of `x += y` on a tensor `x`).
    Assign {
        /// The place, verbatim.
        lhs: syn::Expr,
        /// The value.
        rhs: Box<Expr>,
    },
    /// `return value`.
    Return {
        /// The value.
        value: Option<Box<Expr>>,
    },
}

/// A `match` arm.
pub struct Arm {
    /// Attributes.
    pub attrs: Vec<syn::Attribute>,
    /// The pattern.
    pub pat: Pat,
    /// The guard, verbatim.
    pub guard: Option<syn::Expr>,
    /// The body.
    pub body: Expr,
}

/// The head of a loop.
pub enum LoopHead {
    /// `for pat in iter`.
    For(Pat, Box<Expr>),
    /// `while cond`.
    While(Box<Expr>),
    /// `loop`.
    Loop,
}

/// An argument of an op, shaped by its [`Kind`].
pub enum Arg {
    /// An expression (tensor or value).
    Expr(Expr),
    /// A shape written `[dim, ...]`.
    Shape(Vec<Dim>),
    /// A dim (`S` or a value).
    Dim(Dim),
    /// A dtype.
    DType(DTypeArg),
    /// The tensors of `[a, b].concat(axis)`.
    Tensors(Vec<Expr>),
}

/// One dim of a written shape.
pub enum Dim {
    /// A symbol: an identifier with no lower-case letter (`T`, `S`).
    Sym(String, Span),
    /// A value (`usize`, `Dim`), verbatim.
    Value(syn::Expr),
}

/// A shape argument.
pub enum ShapeArg {
    /// Written `[dim, ...]`.
    Dims(Vec<Dim>),
    /// An expression giving a `Shape`.
    Expr(Box<Expr>),
}

/// A dtype argument.
pub enum DTypeArg {
    /// A dtype name (`bf16`): the `DType` variant and the token's span.
    Named(&'static str, Span),
    /// An expression giving a `DType`.
    Expr(Box<Expr>),
}

/// The name of a declared input or output.
pub enum Name {
    /// A string literal, formatted with captured variables (`"layers.{i}.w"`).
    Format(LitStr),
    /// An expression giving a `&str` or `String`.
    Expr(syn::Expr),
}

/// An arithmetic operator on tensors.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Arith {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
}

impl Arith {
    /// The `BinaryOp` variant name.
    pub fn variant(self) -> &'static str {
        match self {
            Arith::Add => "Add",
            Arith::Sub => "Sub",
            Arith::Mul => "Mul",
            Arith::Div => "Div",
        }
    }
}

/// What an op argument is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A tensor (`&x` is accepted for `x`).
    Tensor,
    /// A shape: `[dim, ...]` or a `Shape` value.
    Shape,
    /// A dim: a symbol (`S`) or a value.
    Dim,
    /// A dtype: a name (`f32`) or a `DType` value.
    DType,
    /// Any Rust value, passed through.
    Value,
}

/// A builder op callable as a method: `recv.name(args)` is
/// `Builder::name(params)` with the receiver at `params[recv]`.
pub struct OpSig {
    /// The builder method.
    pub name: &'static str,
    /// Index of the receiver in `params`.
    pub recv: usize,
    /// Parameter names and kinds in the builder's order.
    pub params: &'static [(&'static str, Kind)],
}

impl OpSig {
    /// `x.rope(pos, theta, rot_dims)`: how the method is written.
    pub fn usage(&self) -> String {
        let args: Vec<&str> = (self.params.iter().enumerate())
            .filter(|(i, _)| *i != self.recv)
            .map(|(_, (n, _))| *n)
            .collect();
        let recv = self.params[self.recv].0;
        if self.name == "concat" {
            return format!("[a, b].concat({})", args.join(", "));
        }
        format!("{recv}.{}({})", self.name, args.join(", "))
    }
}

use Kind::{DType as D, Dim as M, Shape as S, Tensor as X, Value as V};

/// The ops a tensor has as methods, sorted by name (the names are `Builder`'s).
pub const OPS: &[OpSig] = &[
    op("add", 0, &[("x", X), ("y", X)]),
    op("argmax", 0, &[("x", X)]),
    op(
        "attention",
        0,
        &[
            ("q", X),
            ("k", X),
            ("v", X),
            ("sinks", V),
            ("mask", V),
            ("scale", V),
        ],
    ),
    op("binary", 1, &[("op", V), ("x", X), ("y", X)]),
    op("cast", 0, &[("x", X), ("dtype", D)]),
    op("concat", 0, &[("xs", X), ("axis", V)]),
    op("embedding", 0, &[("table", X), ("ids", X)]),
    op(
        "experts",
        0,
        &[("x", X), ("idx", X), ("w", X), ("gate_up", X), ("down", X)],
    ),
    op(
        "kv_append",
        0,
        &[("cache", X), ("new", X), ("len", M), ("ring", V)],
    ),
    op("matmul", 0, &[("x", X), ("w", X)]),
    op("matmul_to", 0, &[("x", X), ("w", X), ("dtype", D)]),
    op("mul", 0, &[("x", X), ("y", X)]),
    op("permute", 0, &[("x", X), ("perm", V)]),
    op("reduce", 1, &[("kind", V), ("x", X), ("axis", V)]),
    op("reshape", 0, &[("x", X), ("shape", S)]),
    op("rms_norm", 0, &[("x", X), ("w", X), ("eps", V)]),
    op(
        "rope",
        0,
        &[("x", X), ("pos", X), ("theta", V), ("rot_dims", V)],
    ),
    op(
        "router_select",
        0,
        &[("logits", X), ("bias", V), ("router", V)],
    ),
    op(
        "router_weights",
        0,
        &[("logits", X), ("idx", X), ("router", V)],
    ),
    op(
        "sample",
        0,
        &[("logits", X), ("seed", X), ("temperature", V)],
    ),
    op("scalar", 1, &[("op", V), ("x", X), ("c", V)]),
    op("scale", 0, &[("x", X), ("c", V)]),
    op("silu", 0, &[("x", X)]),
    op(
        "slice",
        0,
        &[("x", X), ("axis", V), ("start", M), ("len", M)],
    ),
    op("unary", 1, &[("op", V), ("x", X)]),
];

const fn op(name: &'static str, recv: usize, params: &'static [(&'static str, Kind)]) -> OpSig {
    OpSig { name, recv, params }
}

fn find_op(name: &str) -> Option<&'static OpSig> {
    OPS.iter().find(|o| o.name == name)
}

/// The dtype names a `dtype` argument may use, with their `DType` variants.
const DTYPES: &[(&str, &str)] = &[
    ("f32", "F32"),
    ("f16", "F16"),
    ("bf16", "BF16"),
    ("f8e4m3", "F8E4M3"),
    ("i32", "I32"),
    ("mxfp4", "MXFP4"),
    ("nvfp4", "NVFP4"),
];

/// The DSL's macros inside a body.
const DECLS: &[&str] = &["weight", "input", "cache"];

/// Parses the attribute arguments and the function.
pub fn parse(attr: TokenStream, item: TokenStream) -> Result<GraphFn> {
    let args = parse_args(attr)?;
    let item: syn::Item = syn::parse2(item)?;
    let f = match item {
        syn::Item::Fn(f) => f,
        other => {
            return Err(Error::new(
                other.span(),
                "#[graph] applies to a function: write `#[graph] fn name(x: NodeId, ...) -> NodeId { ... }`",
            ))
        }
    };
    let sig = f.sig;
    check_qualifiers(&sig)?;
    let ret = parse_return(sig.output)?;
    let mut tensors = BTreeSet::new();
    let mut params = Vec::new();
    for input in sig.inputs {
        let pt = match input {
            syn::FnArg::Typed(pt) => pt,
            syn::FnArg::Receiver(r) => {
                return Err(Error::new(
                    r.self_token.span,
                    "a #[graph] function is a free function (the builder is its receiver); \
                     pass what `self` holds as a parameter: `cfg: &Config`",
                ))
            }
        };
        params.push(parse_param(pt, &mut tensors)?);
    }
    let scope = match args.scope {
        None => Some(LitStr::new(
            &sig.ident.unraw().to_string(),
            sig.ident.span(),
        )),
        Some(lit) if lit.value().is_empty() => None,
        Some(lit) => {
            check_scope(&lit, &params, &sig.ident)?;
            Some(lit)
        }
    };
    let p = Parser { calls: args.calls };
    let body = p.block(*f.block, tensors)?;
    Ok(GraphFn {
        attrs: f.attrs,
        vis: f.vis,
        ident: sig.ident,
        generics: sig.generics,
        params,
        ret,
        scope,
        body,
    })
}

struct Args {
    scope: Option<LitStr>,
    calls: Vec<Ident>,
}

const ARGS_HELP: &str =
    "expected `scope = \"name\"` (\"layer{i}\" formats parameters, \"\" adds no level) \
                         or `calls(f, g)` naming the #[graph] functions this body calls";

fn parse_args(attr: TokenStream) -> Result<Args> {
    let mut args = Args {
        scope: None,
        calls: Vec::new(),
    };
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("scope") {
            if args.scope.is_some() {
                return Err(meta.error("`scope` is given twice; keep one"));
            }
            let value: syn::Expr = meta.value()?.parse()?;
            match value {
                syn::Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(s),
                    ..
                }) => args.scope = Some(s),
                other => return Err(Error::new(
                    other.span(),
                    "`scope` takes a string literal: `scope = \"attn\"` or `scope = \"layer{i}\"`",
                )),
            }
            Ok(())
        } else if meta.path.is_ident("calls") {
            let content;
            syn::parenthesized!(content in meta.input);
            let names = Punctuated::<syn::Expr, Token![,]>::parse_terminated(&content)?;
            for n in names {
                match &n {
                    syn::Expr::Path(p) if p.qself.is_none() && p.path.get_ident().is_some() => {
                        if let Some(id) = p.path.get_ident() {
                            args.calls.push(id.clone());
                        }
                    }
                    other => {
                        return Err(Error::new(
                            other.span(),
                            "`calls` lists function names, without paths or arguments: `calls(attention, mlp)`",
                        ))
                    }
                }
            }
            Ok(())
        } else {
            Err(meta.error(format!(
                "unknown argument `{}`; {ARGS_HELP}",
                meta.path
                    .get_ident()
                    .map(|i| i.to_string())
                    .unwrap_or_default()
            )))
        }
    });
    syn::parse::Parser::parse2(parser, attr)?;
    Ok(args)
}

fn check_qualifiers(sig: &syn::Signature) -> Result<()> {
    let bad = |span: Span, what: &str| {
        Err(Error::new(
            span,
            format!(
                "a #[graph] function cannot be {what}: it runs once, on the host, while the graph is built; remove it"
            ),
        ))
    };
    if let Some(t) = &sig.asyncness {
        return bad(t.span, "`async`");
    }
    if let Some(t) = &sig.constness {
        return bad(t.span, "`const`");
    }
    if let Some(t) = &sig.unsafety {
        return bad(t.span, "`unsafe`");
    }
    if let Some(abi) = &sig.abi {
        return bad(abi.extern_token.span, "`extern`");
    }
    Ok(())
}

const RETURN_HELP: &str =
    "a #[graph] function returns `NodeId`, a tuple of `NodeId`s, or nothing; \
                           the macro wraps it in `tilefuse_ir::Result`, so write `-> NodeId`";

fn parse_return(out: syn::ReturnType) -> Result<Option<syn::Type>> {
    fn allowed(ty: &syn::Type) -> bool {
        match ty {
            syn::Type::Path(p) => p.qself.is_none() && is_node_id_path(&p.path),
            syn::Type::Tuple(t) => t.elems.iter().all(allowed),
            syn::Type::Paren(p) => allowed(&p.elem),
            _ => false,
        }
    }
    match out {
        syn::ReturnType::Default => Ok(None),
        syn::ReturnType::Type(_, ty) if allowed(&ty) => Ok(Some(*ty)),
        syn::ReturnType::Type(_, ty) => Err(Error::new(ty.span(), RETURN_HELP)),
    }
}

fn is_node_id_path(p: &syn::Path) -> bool {
    p.segments
        .last()
        .is_some_and(|s| s.ident == "NodeId" && s.arguments.is_none())
}

fn is_node_id(ty: &syn::Type) -> bool {
    matches!(ty, syn::Type::Path(p) if p.qself.is_none() && is_node_id_path(&p.path))
}

const SHAPE_HELP: &str = "write a shape as `[dim, ...]`: upper-case names are symbols (`T`, `S`), \
                          anything else a value (`hid`, `nh * dk`, `(HIDDEN)`)";

fn parse_param(pt: syn::PatType, tensors: &mut BTreeSet<String>) -> Result<Param> {
    let syn::PatType { attrs, pat, ty, .. } = pt;
    let mut shape = None;
    if let syn::Type::Macro(m) = &*ty {
        if m.mac.path.is_ident("Tensor") {
            let ident = match &*pat {
                Pat::Ident(p) if p.subpat.is_none() => p.ident.clone(),
                other => {
                    return Err(Error::new(
                        other.span(),
                        "a `Tensor![..]` parameter is bound to a name: `x: Tensor![T, H]`",
                    ))
                }
            };
            let dims = m
                .mac
                .parse_body_with(Punctuated::<syn::Expr, Token![,]>::parse_terminated)
                .map_err(|e| {
                    Error::new(
                        e.span(),
                        format!("{SHAPE_HELP}, as in `Tensor![T, cfg.hidden_size]`"),
                    )
                })?;
            let span = m.mac.path.span();
            shape = Some((ident, dims.into_iter().map(dim).collect(), span));
        }
    }
    if shape.is_some() || is_node_id(&ty) {
        if let Pat::Ident(p) = &*pat {
            tensors.insert(p.ident.to_string());
        }
    }
    Ok(Param {
        attrs,
        pat: *pat,
        ty: *ty,
        shape,
    })
}

/// Checks that every `{name}` in a scope literal names a parameter.
fn check_scope(lit: &LitStr, params: &[Param], f: &Ident) -> Result<()> {
    let names: Vec<String> = (params.iter())
        .filter_map(|p| match &p.pat {
            Pat::Ident(i) => Some(i.ident.to_string()),
            _ => None,
        })
        .collect();
    let text = lit.value();
    let mut rest = text.as_str();
    while let Some(open) = rest.find('{') {
        if rest[open..].starts_with("{{") {
            rest = &rest[open + 2..];
            continue;
        }
        let close = rest[open..]
            .find('}')
            .map(|c| open + c)
            .unwrap_or(rest.len());
        let inner = &rest[open + 1..close];
        let name = inner.split(':').next().unwrap_or("").trim();
        if !names.iter().any(|n| n == name) {
            let msg = if name.is_empty() {
                format!(
                    "name the parameter the scope formats, as in \"layer{{i}}\"; `{f}` has: {}",
                    names.join(", ")
                )
            } else {
                format!(
                    "`{name}` is not a parameter of `{f}`; the scope can format: {}",
                    names.join(", ")
                )
            };
            return Err(Error::new(lit.span(), msg));
        }
        rest = &rest[(close + 1).min(rest.len())..];
    }
    Ok(())
}

/// A dim written in a shape: a symbol or a value.
fn dim(e: syn::Expr) -> Dim {
    // `(HIDDEN)` is how a constant is written; the parentheses only say "value".
    let e = match e {
        syn::Expr::Paren(p) => *p.expr,
        e => return symbol_or_value(e),
    };
    Dim::Value(e)
}

fn symbol_or_value(e: syn::Expr) -> Dim {
    if let syn::Expr::Path(p) = &e {
        if let Some(id) = p.path.get_ident() {
            let s = id.to_string();
            if p.qself.is_none() && is_symbol_name(&s) {
                return Dim::Sym(s, id.span());
            }
        }
    }
    Dim::Value(e)
}

/// A symbol: starts with an upper-case letter and has no lower-case one.
fn is_symbol_name(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase()) && !s.chars().any(|c| c.is_ascii_lowercase())
}

/// The body parser: knows which functions are graph functions.
struct Parser {
    calls: Vec<Ident>,
}

/// The tensor variables in scope.
type Vars = BTreeSet<String>;

impl Parser {
    fn block(&self, block: syn::Block, mut vars: Vars) -> Result<Block> {
        let mut stmts = Vec::new();
        for s in block.stmts {
            stmts.push(self.stmt(s, &mut vars)?);
        }
        Ok(Block { stmts })
    }

    fn stmt(&self, s: syn::Stmt, vars: &mut Vars) -> Result<Stmt> {
        match s {
            syn::Stmt::Local(local) => self.local(local, vars),
            syn::Stmt::Expr(mut e, semi) => {
                // A block's value is kept as an expression even when plain:
                // the function body wraps it in `Ok`, and a tensor tail makes
                // the block a tensor.
                if semi.is_some() && !self.contains_op(&mut e, vars) {
                    return Ok(Stmt::Rust(syn::Stmt::Expr(e, semi)));
                }
                let span = e.span();
                Ok(Stmt::Expr {
                    span,
                    expr: self.expr(e, vars)?,
                    semi: semi.is_some(),
                })
            }
            syn::Stmt::Macro(m) => match dsl_macro_kind(&m.mac) {
                Some(kind) => Ok(Stmt::Expr {
                    span: kind.span(),
                    semi: m.semi_token.is_some(),
                    expr: self.dsl_macro(kind, m.mac, vars)?,
                }),
                None => Ok(Stmt::Rust(syn::Stmt::Macro(m))),
            },
            other => Ok(Stmt::Rust(other)),
        }
    }

    fn local(&self, mut local: syn::Local, vars: &mut Vars) -> Result<Stmt> {
        let annotated = matches!(&local.pat, Pat::Type(t) if is_node_id(&t.ty));
        let Some(mut init) = local.init.take() else {
            shadow(&local.pat, vars, annotated);
            return Ok(Stmt::Rust(syn::Stmt::Local(local)));
        };
        let in_else = match init.diverge.as_mut() {
            Some((_, e)) => self.contains_op(e, vars),
            None => false,
        };
        if !in_else && !self.contains_op(&mut init.expr, vars) {
            // Plain Rust; an alias of a tensor (`let y = x;`) is a tensor too.
            let alias = self.is_tensor(&init.expr, vars);
            shadow(&local.pat, vars, annotated || alias);
            local.init = Some(init);
            return Ok(Stmt::Rust(syn::Stmt::Local(local)));
        }
        if let Some((else_token, _)) = &init.diverge {
            return Err(Error::new(
                else_token.span,
                "`let ... else` cannot build graph nodes; bind the tensor with a plain `let` first, \
                 or use `match` / `if let`",
            ));
        }
        let span = local.let_token.span;
        let init = self.expr(*init.expr, vars)?;
        let pat = local.pat;
        let mut name = None;
        if init.is_tensor() {
            let bare = match &pat {
                Pat::Type(t) => &*t.pat,
                p => p,
            };
            match bare {
                Pat::Ident(p) if p.subpat.is_none() => {
                    vars.insert(p.ident.to_string());
                    if init.is_fresh() {
                        name = Some(p.ident.clone());
                    }
                }
                Pat::Wild(_) => {}
                Pat::Tuple(t) if matches!(init, Expr::Call { .. }) && t.elems.iter().all(is_simple_binding) => {
                    shadow(&pat, vars, true);
                }
                other => {
                    return Err(Error::new(
                        other.span(),
                        "bind a tensor to one name: `let y = ...;` (a tuple pattern takes the result of a \
                         #[graph] function that returns a tuple)",
                    ))
                }
            }
        } else {
            shadow(&pat, vars, annotated);
        }
        Ok(Stmt::Let {
            span,
            pat,
            init,
            name,
        })
    }

    /// Parses an expression that may contain tensor ops.
    fn expr(&self, mut e: syn::Expr, vars: &Vars) -> Result<Expr> {
        if !self.contains_op(&mut e, vars) {
            return Ok(match ident_of(&e) {
                Some(id) if vars.contains(&id.to_string()) => Expr::Var(id.clone()),
                _ => Expr::Rust(e),
            });
        }
        match e {
            syn::Expr::Paren(p) => self.expr(*p.expr, vars),
            syn::Expr::Group(g) => self.expr(*g.expr, vars),
            syn::Expr::MethodCall(m) => self.method(m, vars),
            syn::Expr::Binary(b) => self.binary(b, vars),
            syn::Expr::Unary(syn::ExprUnary {
                op: syn::UnOp::Neg(minus),
                expr,
                ..
            }) if self.is_tensor(&expr, vars) => Ok(Expr::Neg {
                span: minus.span,
                x: Box::new(self.expr(*expr, vars)?),
            }),
            syn::Expr::Macro(m) => match dsl_macro_kind(&m.mac) {
                Some(kind) => self.dsl_macro(kind, m.mac, vars),
                None => self.template(syn::Expr::Macro(m), Vec::new(), vars),
            },
            syn::Expr::Call(mut c) => match *c.func {
                syn::Expr::Path(func) if self.is_graph_path(&func) => {
                    let args = c
                        .args
                        .into_iter()
                        .map(|a| self.expr(a, vars))
                        .collect::<Result<_>>()?;
                    Ok(Expr::Call { func, args })
                }
                func => {
                    c.func = Box::new(func);
                    self.template(syn::Expr::Call(c), Vec::new(), vars)
                }
            },
            syn::Expr::If(i) => self.if_expr(i, vars),
            syn::Expr::Match(m) => {
                let expr = Box::new(self.expr(*m.expr, vars)?);
                let mut arms = Vec::new();
                for arm in m.arms {
                    let mut inner = vars.clone();
                    shadow(&arm.pat, &mut inner, false);
                    arms.push(Arm {
                        attrs: arm.attrs,
                        pat: arm.pat,
                        guard: arm.guard.map(|(_, g)| *g),
                        body: self.expr(*arm.body, &inner)?,
                    });
                }
                Ok(Expr::Match { expr, arms })
            }
            syn::Expr::Block(b) if b.attrs.is_empty() => Ok(Expr::Block {
                label: b.label,
                block: self.block(b.block, vars.clone())?,
            }),
            syn::Expr::ForLoop(f) => {
                self.not_iterable(&f.expr, vars)?;
                let iter = Box::new(self.expr(*f.expr, vars)?);
                let mut inner = vars.clone();
                shadow(&f.pat, &mut inner, false);
                Ok(Expr::Loop {
                    label: f.label,
                    head: LoopHead::For(*f.pat, iter),
                    body: self.block(f.body, inner)?,
                })
            }
            syn::Expr::While(w) => {
                self.not_iterable(&w.cond, vars)?;
                let span = w.cond.span();
                let cond = self.expr(*w.cond, vars)?;
                if cond.uses_builder() {
                    return Err(Error::new(
                        span,
                        "a `while` condition cannot add graph nodes (it runs on every iteration); \
                         build the tensor before the loop or inside its body",
                    ));
                }
                Ok(Expr::Loop {
                    label: w.label,
                    head: LoopHead::While(Box::new(cond)),
                    body: self.block(w.body, vars.clone())?,
                })
            }
            syn::Expr::Loop(l) => Ok(Expr::Loop {
                label: l.label,
                head: LoopHead::Loop,
                body: self.block(l.body, vars.clone())?,
            }),
            syn::Expr::Assign(a) => Ok(Expr::Assign {
                lhs: *a.left,
                rhs: Box::new(self.expr(*a.right, vars)?),
            }),
            syn::Expr::Return(r) => Ok(Expr::Return {
                value: match r.expr {
                    Some(v) => Some(Box::new(self.expr(*v, vars)?)),
                    None => None,
                },
            }),
            syn::Expr::Try(t) if self.is_tensor(&t.expr, vars) => Err(Error::new(
                t.question_token.span,
                "remove this `?`: tensor ops and #[graph] calls already propagate their errors",
            )),
            syn::Expr::Closure(c) => Err(closure_error(&c)),
            other => self.template(other, Vec::new(), vars),
        }
    }

    /// Plain Rust with tensor sub-expressions hoisted into holes.
    fn template(&self, mut e: syn::Expr, holes: Vec<(Ident, Expr)>, vars: &Vars) -> Result<Expr> {
        let mut h = Holes {
            parser: self,
            vars,
            holes,
            err: None,
        };
        visit_mut::visit_expr_mut(&mut h, &mut e);
        if let Some(err) = h.err {
            return Err(err);
        }
        if h.holes.is_empty() {
            return Ok(Expr::Rust(e));
        }
        Ok(Expr::Template {
            expr: e,
            holes: h.holes,
        })
    }

    fn if_expr(&self, i: syn::ExprIf, vars: &Vars) -> Result<Expr> {
        let cond = Box::new(self.expr(*i.cond, vars)?);
        let then = self.block(i.then_branch, vars.clone())?;
        let els = match i.else_branch {
            Some((_, e)) => Some(Box::new(self.expr(*e, vars)?)),
            None => None,
        };
        Ok(Expr::If { cond, then, els })
    }

    fn method(&self, m: syn::ExprMethodCall, vars: &Vars) -> Result<Expr> {
        let name = m.method.to_string();
        let on_array = name == "concat"
            && matches!(&*m.receiver, syn::Expr::Array(a) if a.elems.iter().any(|x| self.is_tensor(x, vars)));
        if !on_array && !self.is_tensor(&m.receiver, vars) {
            return self.template(syn::Expr::MethodCall(m), Vec::new(), vars);
        }
        let Some(sig) = find_op(&name).filter(|s| s.name != "concat" || on_array) else {
            let names: Vec<&str> = OPS
                .iter()
                .map(|o| o.name)
                .filter(|n| *n != "concat")
                .collect();
            return Err(Error::new(
                m.method.span(),
                format!(
                    "`{name}` is not a tensor op; tensors have {}, `[a, b].concat(axis)`, \
                     and the operators `+ - * /` and unary `-`",
                    names.join(", ")
                ),
            ));
        };
        if let Some(tf) = &m.turbofish {
            return Err(Error::new(
                tf.lt_token.span,
                format!("tensor ops take no type arguments: write `{}`", sig.usage()),
            ));
        }
        if m.args.len() + 1 != sig.params.len() {
            return Err(Error::new(
                m.method.span(),
                format!(
                    "`{}` takes {} argument{}: `{}`; found {}",
                    sig.name,
                    sig.params.len() - 1,
                    if sig.params.len() == 2 { "" } else { "s" },
                    sig.usage(),
                    m.args.len()
                ),
            ));
        }
        let recv = match *m.receiver {
            syn::Expr::Array(a) if on_array => Arg::Tensors(
                a.elems
                    .into_iter()
                    .map(|x| self.expr(x, vars))
                    .collect::<Result<_>>()?,
            ),
            recv => self.arg(recv, Kind::Tensor, vars)?,
        };
        let mut rest = m.args.into_iter();
        let mut args = Vec::new();
        for (i, (_, kind)) in sig.params.iter().enumerate() {
            if i == sig.recv {
                continue;
            }
            let Some(a) = rest.next() else { break };
            args.push(self.arg(a, *kind, vars)?);
        }
        args.insert(sig.recv, recv);
        Ok(Expr::Op {
            method: m.method,
            args,
        })
    }

    fn arg(&self, e: syn::Expr, kind: Kind, vars: &Vars) -> Result<Arg> {
        Ok(match kind {
            Kind::Tensor => match e {
                syn::Expr::Reference(r)
                    if r.mutability.is_none() && self.is_tensor(&r.expr, vars) =>
                {
                    Arg::Expr(self.expr(*r.expr, vars)?)
                }
                e => Arg::Expr(self.expr(e, vars)?),
            },
            Kind::Shape => match self.shape(e, vars)? {
                ShapeArg::Dims(d) => Arg::Shape(d),
                ShapeArg::Expr(x) => Arg::Expr(*x),
            },
            Kind::Dim => Arg::Dim(dim(e)),
            Kind::DType => Arg::DType(self.dtype(e, vars)?),
            Kind::Value => Arg::Expr(self.expr(e, vars)?),
        })
    }

    fn shape(&self, e: syn::Expr, vars: &Vars) -> Result<ShapeArg> {
        match e {
            syn::Expr::Array(a) => Ok(ShapeArg::Dims(a.elems.into_iter().map(dim).collect())),
            e @ (syn::Expr::Repeat(_) | syn::Expr::Tuple(_) | syn::Expr::Paren(_)) => {
                Err(Error::new(e.span(), SHAPE_HELP))
            }
            e => Ok(ShapeArg::Expr(Box::new(self.expr(e, vars)?))),
        }
    }

    fn dtype(&self, e: syn::Expr, vars: &Vars) -> Result<DTypeArg> {
        if let Some(id) = ident_of(&e) {
            if let Some((_, v)) = DTYPES.iter().find(|(n, _)| id == n) {
                return Ok(DTypeArg::Named(v, id.span()));
            }
        }
        Ok(DTypeArg::Expr(Box::new(self.expr(e, vars)?)))
    }

    fn binary(&self, b: syn::ExprBinary, vars: &Vars) -> Result<Expr> {
        use syn::BinOp as B;
        let (lt, rt) = (
            self.is_tensor(&b.left, vars),
            self.is_tensor(&b.right, vars),
        );
        let span = b.op.span();
        let (arith, compound) = match b.op {
            B::Add(_) => (Arith::Add, false),
            B::Sub(_) => (Arith::Sub, false),
            B::Mul(_) => (Arith::Mul, false),
            B::Div(_) => (Arith::Div, false),
            B::AddAssign(_) => (Arith::Add, true),
            B::SubAssign(_) => (Arith::Sub, true),
            B::MulAssign(_) => (Arith::Mul, true),
            B::DivAssign(_) => (Arith::Div, true),
            B::Eq(_) | B::Ne(_) | B::Lt(_) | B::Le(_) | B::Gt(_) | B::Ge(_) | B::And(_) | B::Or(_) => {
                return self.template(syn::Expr::Binary(b), Vec::new(), vars);
            }
            _ if lt || rt => {
                return Err(Error::new(
                    span,
                    "tensors have the operators `+ - * /` (and `+= -= *= /=`); for other math write \
                     `x.binary(BinaryOp::Max, y)`, `x.scalar(BinaryOp::Max, c)` or `x.unary(UnaryOp::Exp)`",
                ))
            }
            _ => return self.template(syn::Expr::Binary(b), Vec::new(), vars),
        };
        if !lt && !rt {
            return self.template(syn::Expr::Binary(b), Vec::new(), vars);
        }
        if compound {
            let Some(id) = ident_of(&b.left).filter(|_| lt).cloned() else {
                return Err(Error::new(
                    span,
                    "an assigning operator on tensors needs a tensor variable on the left: `x += y`",
                ));
            };
            let rhs = self.expr(*b.right, vars)?;
            let lhs = Expr::Var(id);
            return Ok(Expr::Assign {
                lhs: *b.left,
                rhs: Box::new(arith_expr(arith, span, lhs, rhs, rt)),
            });
        }
        if !lt && matches!(arith, Arith::Sub | Arith::Div) {
            let fix = if arith == Arith::Sub {
                "`x * -1.0 + c`"
            } else {
                "`x.unary(UnaryOp::Recip) * c`"
            };
            return Err(Error::new(
                span,
                format!(
                    "a scalar on the left of `{}` is not an op; write {fix}",
                    if arith == Arith::Sub { "-" } else { "/" }
                ),
            ));
        }
        let l = self.expr(*b.left, vars)?;
        let r = self.expr(*b.right, vars)?;
        Ok(match (lt, rt) {
            (true, rt) => arith_expr(arith, span, l, r, rt),
            // A scalar on the left of a commutative operator.
            (false, _) => arith_expr(arith, span, r, l, false),
        })
    }

    fn dsl_macro(&self, kind: Ident, mac: syn::Macro, vars: &Vars) -> Result<Expr> {
        let usage = if kind == "output" {
            "output!(name, tensor)".to_string()
        } else {
            format!("{kind}!(\"name.{{i}}\", dtype, [dim, ...])")
        };
        let args = mac
            .parse_body_with(Punctuated::<syn::Expr, Token![,]>::parse_terminated)
            .map_err(|e| Error::new(e.span(), format!("expected `{usage}`")))?;
        let count = |n: usize, found: usize| {
            Error::new(
                kind.span(),
                format!("`{kind}!` takes {n} arguments: `{usage}`; found {found}"),
            )
        };
        let args: Vec<syn::Expr> = args.into_iter().collect();
        let (name, second, shape) = if kind == "output" {
            let [name, value] = <[syn::Expr; 2]>::try_from(args).map_err(|a| count(2, a.len()))?;
            (name, value, None)
        } else {
            let [name, dtype, shape] =
                <[syn::Expr; 3]>::try_from(args).map_err(|a| count(3, a.len()))?;
            (name, dtype, Some(shape))
        };
        let name = match name {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) => Name::Format(s),
            e => Name::Expr(e),
        };
        let Some(shape) = shape else {
            return Ok(Expr::Output {
                span: kind.span(),
                name,
                value: Box::new(self.expr(second, vars)?),
            });
        };
        Ok(Expr::Decl {
            dtype: self.dtype(second, vars)?,
            shape: self.shape(shape, vars)?,
            kind,
            name,
        })
    }

    fn not_iterable(&self, e: &syn::Expr, vars: &Vars) -> Result<()> {
        if self.is_tensor(e, vars) {
            return Err(Error::new(
                e.span(),
                "a tensor is not a Rust value to loop over or test: loop over indices \
                 (`for i in 0..n`) and slice with `x.slice(axis, start, len)`",
            ));
        }
        Ok(())
    }

    fn is_graph_call(&self, c: &syn::ExprCall) -> bool {
        matches!(&*c.func, syn::Expr::Path(p) if self.is_graph_path(p))
    }

    /// A path ending in a name listed in `calls(..)`.
    fn is_graph_path(&self, p: &syn::ExprPath) -> bool {
        (p.path.segments.last()).is_some_and(|s| self.calls.contains(&s.ident))
    }

    /// True when `e` evaluates to a tensor (syntactically).
    fn is_tensor(&self, e: &syn::Expr, vars: &Vars) -> bool {
        match e {
            syn::Expr::Path(_) => ident_of(e).is_some_and(|i| vars.contains(&i.to_string())),
            syn::Expr::Paren(p) => self.is_tensor(&p.expr, vars),
            syn::Expr::Group(g) => self.is_tensor(&g.expr, vars),
            syn::Expr::MethodCall(m) => {
                find_op(&m.method.to_string()).is_some()
                    && (self.is_tensor(&m.receiver, vars)
                        || matches!(&*m.receiver, syn::Expr::Array(a) if a.elems.iter().any(|x| self.is_tensor(x, vars))))
            }
            syn::Expr::Binary(b) => {
                use syn::BinOp as B;
                matches!(b.op, B::Add(_) | B::Sub(_) | B::Mul(_) | B::Div(_))
                    && (self.is_tensor(&b.left, vars) || self.is_tensor(&b.right, vars))
            }
            syn::Expr::Unary(u) => {
                matches!(u.op, syn::UnOp::Neg(_)) && self.is_tensor(&u.expr, vars)
            }
            syn::Expr::Macro(m) => m
                .mac
                .path
                .get_ident()
                .is_some_and(|i| DECLS.iter().any(|d| i == d)),
            syn::Expr::Call(c) => self.is_graph_call(c),
            syn::Expr::If(i) => {
                self.block_is_tensor(&i.then_branch, vars)
                    && i.else_branch
                        .as_ref()
                        .is_some_and(|(_, e)| self.is_tensor(e, vars))
            }
            syn::Expr::Block(b) => self.block_is_tensor(&b.block, vars),
            syn::Expr::Match(m) => {
                !m.arms.is_empty() && m.arms.iter().all(|a| self.is_tensor(&a.body, vars))
            }
            _ => false,
        }
    }

    fn block_is_tensor(&self, b: &syn::Block, vars: &Vars) -> bool {
        let mut vars = vars.clone();
        for s in &b.stmts {
            match s {
                syn::Stmt::Local(l) => {
                    let t = l
                        .init
                        .as_ref()
                        .is_some_and(|i| self.is_tensor(&i.expr, &vars));
                    let annotated = matches!(&l.pat, Pat::Type(t) if is_node_id(&t.ty));
                    shadow(&l.pat, &mut vars, t || annotated);
                }
                syn::Stmt::Expr(e, None) => return self.is_tensor(e, &vars),
                _ => {}
            }
        }
        false
    }

    /// True when `e` contains a tensor op, a DSL macro, a #[graph] call or a
    /// `: NodeId` binding anywhere, closures included (where they are errors).
    fn contains_op(&self, e: &mut syn::Expr, vars: &Vars) -> bool {
        let mut f = Finder {
            parser: self,
            vars,
            found: false,
        };
        f.visit_expr_mut(e);
        f.found
    }

    /// True when a closure's body has a tensor op, its parameters shadowing.
    fn closure_has_op(&self, c: &mut syn::ExprClosure, vars: &Vars) -> bool {
        let mut inner = vars.clone();
        c.inputs.iter().for_each(|p| shadow(p, &mut inner, false));
        self.contains_op(&mut c.body, &inner)
    }

    /// True when the node itself (not its children) is a tensor construct.
    fn is_op_node(&self, e: &syn::Expr, vars: &Vars) -> bool {
        match e {
            syn::Expr::MethodCall(m) => {
                self.is_tensor(&m.receiver, vars)
                    || (m.method == "concat"
                        && matches!(&*m.receiver, syn::Expr::Array(a) if a.elems.iter().any(|x| self.is_tensor(x, vars))))
            }
            syn::Expr::Binary(b) => self.is_tensor(&b.left, vars) || self.is_tensor(&b.right, vars),
            syn::Expr::Unary(u) => {
                matches!(u.op, syn::UnOp::Neg(_)) && self.is_tensor(&u.expr, vars)
            }
            syn::Expr::Macro(m) => is_dsl_macro(&m.mac),
            syn::Expr::Call(c) => self.is_graph_call(c),
            syn::Expr::Try(t) => self.is_tensor(&t.expr, vars),
            syn::Expr::ForLoop(f) => self.is_tensor(&f.expr, vars),
            syn::Expr::While(w) => self.is_tensor(&w.cond, vars),
            _ => false,
        }
    }
}

fn arith_expr(op: Arith, span: Span, tensor: Expr, other: Expr, other_is_tensor: bool) -> Expr {
    if other_is_tensor {
        Expr::Binary {
            op,
            span,
            lhs: Box::new(tensor),
            rhs: Box::new(other),
        }
    } else {
        Expr::Scalar {
            op,
            span,
            tensor: Box::new(tensor),
            value: Box::new(other),
        }
    }
}

fn closure_error(c: &syn::ExprClosure) -> Error {
    Error::new(
        c.or1_token.span,
        "a closure cannot add graph nodes (the builder is not passed into it); \
         use a `for` loop, or a #[graph] function listed in `calls(..)`",
    )
}

fn is_dsl_macro(mac: &syn::Macro) -> bool {
    dsl_macro_kind(mac).is_some()
}

/// `weight`, `input`, `cache` or `output` for the DSL's macros.
fn dsl_macro_kind(mac: &syn::Macro) -> Option<Ident> {
    (mac.path.get_ident())
        .filter(|i| *i == "output" || DECLS.iter().any(|d| *i == d))
        .cloned()
}

fn ident_of(e: &syn::Expr) -> Option<&Ident> {
    match e {
        syn::Expr::Path(p) if p.qself.is_none() && p.attrs.is_empty() => p.path.get_ident(),
        _ => None,
    }
}

fn is_simple_binding(p: &Pat) -> bool {
    matches!(p, Pat::Wild(_)) || matches!(p, Pat::Ident(i) if i.subpat.is_none())
}

/// Updates the tensor set for the names `pat` binds: all become tensors when
/// `tensor`, otherwise they shadow (remove) tensors of the same name.
fn shadow(pat: &Pat, vars: &mut Vars, tensor: bool) {
    let mut names = Vec::new();
    pat_idents(pat, &mut names);
    for n in names {
        if tensor {
            vars.insert(n);
        } else {
            vars.remove(&n);
        }
    }
}

fn pat_idents(p: &Pat, out: &mut Vec<String>) {
    match p {
        Pat::Ident(i) => {
            out.push(i.ident.to_string());
            if let Some((_, sub)) = &i.subpat {
                pat_idents(sub, out);
            }
        }
        Pat::Tuple(t) => t.elems.iter().for_each(|e| pat_idents(e, out)),
        Pat::TupleStruct(t) => t.elems.iter().for_each(|e| pat_idents(e, out)),
        Pat::Struct(s) => s.fields.iter().for_each(|f| pat_idents(&f.pat, out)),
        Pat::Slice(s) => s.elems.iter().for_each(|e| pat_idents(e, out)),
        Pat::Or(o) => o.cases.iter().for_each(|e| pat_idents(e, out)),
        Pat::Reference(r) => pat_idents(&r.pat, out),
        Pat::Type(t) => pat_idents(&t.pat, out),
        Pat::Paren(p) => pat_idents(&p.pat, out),
        _ => {}
    }
}

/// Finds whether an expression contains anything the DSL rewrites.
struct Finder<'a> {
    parser: &'a Parser,
    vars: &'a Vars,
    found: bool,
}

impl VisitMut for Finder<'_> {
    fn visit_expr_mut(&mut self, e: &mut syn::Expr) {
        if self.found {
            return;
        }
        if self.parser.is_op_node(e, self.vars) {
            self.found = true;
            return;
        }
        if let syn::Expr::Closure(c) = e {
            self.found |= self.parser.closure_has_op(c, self.vars);
            return;
        }
        visit_mut::visit_expr_mut(self, e);
    }

    fn visit_macro_mut(&mut self, m: &mut syn::Macro) {
        self.found |= is_dsl_macro(m);
    }

    fn visit_local_mut(&mut self, l: &mut syn::Local) {
        self.found |= matches!(&l.pat, Pat::Type(t) if is_node_id(&t.ty));
        visit_mut::visit_local_mut(self, l);
    }

    fn visit_item_mut(&mut self, _: &mut syn::Item) {
        // Nested items are plain Rust with their own scope.
    }
}

/// Replaces the tensor sub-expressions of a plain Rust expression by placeholders.
struct Holes<'a> {
    parser: &'a Parser,
    vars: &'a Vars,
    holes: Vec<(Ident, Expr)>,
    err: Option<Error>,
}

impl VisitMut for Holes<'_> {
    fn visit_expr_mut(&mut self, e: &mut syn::Expr) {
        if self.err.is_some() {
            return;
        }
        if let syn::Expr::Closure(c) = e {
            if self.parser.closure_has_op(c, self.vars) {
                self.err = Some(closure_error(c));
            }
            return;
        }
        let structural = matches!(
            e,
            syn::Expr::If(_)
                | syn::Expr::Match(_)
                | syn::Expr::Block(_)
                | syn::Expr::ForLoop(_)
                | syn::Expr::While(_)
                | syn::Expr::Loop(_)
                | syn::Expr::Assign(_)
                | syn::Expr::Return(_)
        );
        let hole = self.parser.is_op_node(e, self.vars)
            || (structural && self.parser.contains_op(e, self.vars));
        if !hole {
            visit_mut::visit_expr_mut(self, e);
            return;
        }
        let id = Ident::new(&format!("__h{}", self.holes.len()), Span::mixed_site());
        let placeholder = syn::Expr::Path(syn::ExprPath {
            attrs: Vec::new(),
            qself: None,
            path: id.clone().into(),
        });
        let taken = std::mem::replace(e, placeholder);
        match self.parser.expr(taken, self.vars) {
            Ok(x) => self.holes.push((id, x)),
            Err(err) => self.err = Some(err),
        }
    }

    fn visit_item_mut(&mut self, _: &mut syn::Item) {}
}

impl Expr {
    /// True when the value is a tensor (or a tuple from a #[graph] call).
    pub fn is_tensor(&self) -> bool {
        match self {
            Expr::Var(_)
            | Expr::Op { .. }
            | Expr::Binary { .. }
            | Expr::Scalar { .. }
            | Expr::Neg { .. }
            | Expr::Decl { .. }
            | Expr::Call { .. } => true,
            Expr::If { then, els, .. } => {
                then.tail().is_some_and(Expr::is_tensor)
                    && els.as_ref().is_some_and(|e| e.is_tensor())
            }
            Expr::Match { arms, .. } => !arms.is_empty() && arms.iter().all(|a| a.body.is_tensor()),
            Expr::Block { block, .. } => block.tail().is_some_and(Expr::is_tensor),
            _ => false,
        }
    }

    /// True when the value is a node this expression creates (so a binding may name it).
    pub fn is_fresh(&self) -> bool {
        match self {
            Expr::Op { .. } | Expr::Binary { .. } | Expr::Scalar { .. } | Expr::Neg { .. } => true,
            Expr::If { then, els, .. } => {
                then.tail().is_some_and(Expr::is_fresh)
                    && els.as_ref().is_some_and(|e| e.is_fresh())
            }
            Expr::Match { arms, .. } => !arms.is_empty() && arms.iter().all(|a| a.body.is_fresh()),
            Expr::Block { block, .. } => block.tail().is_some_and(Expr::is_fresh),
            _ => false,
        }
    }

    /// True when evaluating it calls the builder.
    pub fn uses_builder(&self) -> bool {
        !matches!(self, Expr::Rust(_) | Expr::Var(_))
    }

    /// True when it creates nodes that take the place of the statement it is in
    /// (those inside nested blocks and #[graph] calls set their own).
    pub fn needs_loc(&self) -> bool {
        match self {
            Expr::Rust(_) | Expr::Var(_) | Expr::Block { .. } => false,
            Expr::Op { .. }
            | Expr::Binary { .. }
            | Expr::Scalar { .. }
            | Expr::Neg { .. }
            | Expr::Decl { .. } => true,
            Expr::Output { value, .. } => value.needs_loc(),
            Expr::Call { args, .. } => args.iter().any(Expr::needs_loc),
            Expr::Template { holes, .. } => holes.iter().any(|(_, h)| h.needs_loc()),
            Expr::If { cond, .. } => cond.needs_loc(),
            Expr::Match { expr, .. } => expr.needs_loc(),
            Expr::Loop { head, .. } => match head {
                LoopHead::For(_, e) | LoopHead::While(e) => e.needs_loc(),
                LoopHead::Loop => false,
            },
            Expr::Assign { rhs, .. } => rhs.needs_loc(),
            Expr::Return { value } => value.as_ref().is_some_and(|v| v.needs_loc()),
        }
    }

    /// True when, after evaluating it, the builder's source place may be
    /// another line's (a #[graph] call or a nested block set it).
    pub fn moves_loc(&self) -> bool {
        match self {
            Expr::Rust(_) | Expr::Var(_) => false,
            // An op resets the place before its call when an operand moved it.
            Expr::Op { .. }
            | Expr::Binary { .. }
            | Expr::Scalar { .. }
            | Expr::Neg { .. }
            | Expr::Decl { .. } => false,
            Expr::Output { value, .. } => value.moves_loc(),
            Expr::Template { holes, .. } => holes.iter().any(|(_, h)| h.moves_loc()),
            Expr::Assign { rhs, .. } => rhs.moves_loc(),
            Expr::Return { .. } => false,
            Expr::Call { .. }
            | Expr::If { .. }
            | Expr::Match { .. }
            | Expr::Block { .. }
            | Expr::Loop { .. } => true,
        }
    }
}

impl Block {
    /// The block's value: its last statement when that is an expression without `;`.
    pub fn tail(&self) -> Option<&Expr> {
        match self.stmts.last() {
            Some(Stmt::Expr {
                expr, semi: false, ..
            }) => Some(expr),
            _ => None,
        }
    }
}
