//! Generation: the DSL's AST → Rust that calls `::tilefuse_ir::Builder`.
//!
//! Conventions of the output:
//! - every path is absolute (`::tilefuse_ir::…`, `::core::…`, `::std::…`);
//! - the builder and the temporaries carry `Span::mixed_site()`, so they
//!   neither see nor shadow the author's names;
//! - the author's tokens keep their spans, so rustc's type errors point at
//!   the author's code, and `::core::line!()` spanned at a statement gives
//!   the author's line;
//! - a builder call is never nested in another (two `&mut` borrows):
//!   operands that call the builder are first bound to temporaries, in
//!   evaluation order, which keeps the order of node creation (and so the
//!   default names `matmul`, `matmul_1`, …) that of the written code.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::Ident;

use crate::parse::{
    Arg, Arith, Block, DTypeArg, Dim, Expr, GraphFn, LoopHead, Name, ShapeArg, Stmt,
};

/// Expands a parsed graph function.
pub fn generate(f: &GraphFn) -> TokenStream {
    let mut g = Gen {
        b: Ident::new("builder", Span::mixed_site()),
        next: 0,
    };
    let b = g.b.clone();
    let GraphFn {
        attrs,
        vis,
        ident,
        generics,
        params,
        ret,
        scope,
        body,
    } = f;
    let (_, _, where_clause) = generics.split_for_impl();
    let unit = match ret {
        None => true,
        Some(syn::Type::Tuple(t)) => t.elems.is_empty(),
        Some(_) => false,
    };
    let ret = match ret {
        Some(t) => quote!(#t),
        None => quote!(()),
    };
    let result = quote!(::tilefuse_ir::Result<#ret>);
    let mut inputs = Vec::new();
    let mut checks = Vec::new();
    for p in params {
        let (pat, pattrs) = (&p.pat, &p.attrs);
        match &p.shape {
            Some((name, dims, span)) => {
                inputs.push(quote!(#(#pattrs)* #pat: ::tilefuse_ir::NodeId));
                checks.push(g.shape_check(name, dims, *span, ident));
            }
            None => {
                let ty = &p.ty;
                inputs.push(quote!(#(#pattrs)* #pat: #ty));
            }
        }
    }
    let stmts = g.fn_body(body, unit);
    let run = match scope {
        Some(lit) => {
            let name = if lit.value().contains('{') {
                quote!(&::std::format!(#lit))
            } else {
                quote!(#lit)
            };
            quote! {
                #b.scoped(#name, |#b: &mut ::tilefuse_ir::Builder| -> #result { #stmts })
            }
        }
        None => stmts,
    };
    quote! {
        #(#attrs)*
        #vis fn #ident #generics (#b: &mut ::tilefuse_ir::Builder, #(#inputs),*) -> #result #where_clause {
            #(#checks)*
            #run
        }
    }
}

struct Gen {
    /// The builder variable.
    b: Ident,
    /// Next temporary's number.
    next: usize,
}

impl Gen {
    fn temp(&mut self) -> Ident {
        let t = format_ident!("__t{}", self.next, span = Span::mixed_site());
        self.next += 1;
        t
    }

    /// `builder.set_loc(file!(), line!())` at the author's `span`.
    fn set_loc(&self, span: Span) -> TokenStream {
        let b = &self.b;
        let here = quote_spanned!(span=> ::core::file!(), ::core::line!());
        quote!(#b.set_loc(#here);)
    }

    /// The entry check of a `Tensor![..]` parameter against the recorded shape.
    fn shape_check(&mut self, x: &Ident, dims: &[Dim], span: Span, f: &Ident) -> TokenStream {
        let b = &self.b;
        let want = Ident::new("__want", Span::mixed_site());
        let dims = dims.iter().map(dim);
        let here = quote_spanned!(span=> ::core::file!(), ::core::line!());
        let (xs, fs) = (x.unraw().to_string(), f.unraw().to_string());
        quote! {
            let #want = ::tilefuse_ir::Shape::new([#(#dims),*]);
            if *#b.shape(#x) != #want {
                return ::core::result::Result::Err(::tilefuse_ir::IrError::new(
                    ::tilefuse_ir::ErrorKind::Type,
                    ::std::format!("expected shape {}, found {}", #want, #b.ty(#x)),
                ).at(::std::format!("parameter `{}` of `{}` at {}:{}", #xs, #fs, #here)));
            }
        }
    }

    /// The function body: its statements, then `Ok(value)`; a fresh node
    /// returned is named `out`.
    fn fn_body(&mut self, body: &Block, unit: bool) -> TokenStream {
        let (stmts, tail) = match body.tail() {
            Some(t) => (&body.stmts[..body.stmts.len() - 1], Some(t)),
            None => (&body.stmts[..], None),
        };
        let stmts: Vec<TokenStream> = stmts.iter().map(|s| self.stmt(s)).collect();
        let tail = match tail {
            Some(t) => {
                let loc = match body.stmts.last() {
                    Some(Stmt::Expr { span, .. }) if t.needs_loc() => self.set_loc(*span),
                    _ => TokenStream::new(),
                };
                let mut pre = Vec::new();
                let v = self.result(t, &mut pre);
                quote!(#loc #(#pre)* #v)
            }
            None if unit => quote!(::core::result::Result::Ok(())),
            None => TokenStream::new(),
        };
        quote!(#(#stmts)* #tail)
    }

    /// The function's `Result` for a returned value: a #[graph] call's own
    /// result, or `Ok(value)`, where a fresh node is named `out`.
    fn result(&mut self, e: &Expr, pre: &mut Vec<TokenStream>) -> TokenStream {
        if let Expr::Call { func, args } = e {
            let args: Vec<_> = args.iter().map(|a| self.operand(a, pre)).collect();
            let b = &self.b;
            return quote!(#func(#b, #(#args),*));
        }
        let mut v = self.flat(e, pre);
        if e.is_fresh() {
            let (b, t) = (self.b.clone(), self.temp());
            pre.push(quote!(let #t = #v;));
            v = quote!(#b.name(#t, "out"));
        }
        quote!(::core::result::Result::Ok(#v))
    }

    fn block(&mut self, block: &Block) -> TokenStream {
        let stmts = block.stmts.iter().map(|s| self.stmt(s)).collect::<Vec<_>>();
        quote!({ #(#stmts)* })
    }

    /// A statement: its source place, the temporaries its value needs, then itself.
    fn stmt(&mut self, s: &Stmt) -> TokenStream {
        match s {
            Stmt::Rust(s) => quote!(#s),
            Stmt::Let {
                span,
                pat,
                init,
                name,
            } => {
                let loc = if init.needs_loc() {
                    self.set_loc(*span)
                } else {
                    TokenStream::new()
                };
                let mut pre = Vec::new();
                let v = self.flat(init, &mut pre);
                let named = name.as_ref().map(|n| {
                    let b = &self.b;
                    let s = n.unraw().to_string();
                    quote!(#b.name(#n, #s);)
                });
                quote!(#loc #(#pre)* let #pat = #v; #named)
            }
            Stmt::Expr { span, expr, semi } => {
                let loc = if expr.needs_loc() {
                    self.set_loc(*span)
                } else {
                    TokenStream::new()
                };
                let mut pre = Vec::new();
                let v = self.flat(expr, &mut pre);
                let semi = semi.then(|| quote!(;));
                quote!(#loc #(#pre)* #v #semi)
            }
        }
    }

    /// An operand: inline when it does not call the builder, otherwise bound
    /// to a temporary in `pre`.
    fn operand(&mut self, e: &Expr, pre: &mut Vec<TokenStream>) -> TokenStream {
        let v = self.flat(e, pre);
        if !e.uses_builder() {
            return v;
        }
        let t = self.temp();
        pre.push(quote!(let #t = #v;));
        quote!(#t)
    }

    /// A self-contained expression: `{ pre; value }`, or just `value`.
    fn expr(&mut self, e: &Expr) -> TokenStream {
        let mut pre = Vec::new();
        let v = self.flat(e, &mut pre);
        if pre.is_empty() {
            v
        } else {
            quote!({ #(#pre)* #v })
        }
    }

    /// The value of `e`, with what must run before it appended to `pre`, in
    /// evaluation order. When an operand moved the source place, `reset`
    /// records the op's own line again before the call.
    fn flat(&mut self, e: &Expr, pre: &mut Vec<TokenStream>) -> TokenStream {
        let b = self.b.clone();
        match e {
            Expr::Rust(e) => quote!(#e),
            Expr::Var(v) => quote!(#v),
            Expr::Op { method, args } => {
                let mut moved = false;
                let args: Vec<TokenStream> = (args.iter())
                    .map(|a| match a {
                        Arg::Expr(x) => {
                            moved |= x.moves_loc();
                            self.operand(x, pre)
                        }
                        Arg::Shape(d) => shape(d),
                        Arg::Dim(d) => dim_arg(d),
                        Arg::DType(d) => self.dtype(d, pre),
                        Arg::Tensors(xs) => {
                            moved |= xs.iter().any(Expr::moves_loc);
                            let xs: Vec<_> = xs.iter().map(|x| self.operand(x, pre)).collect();
                            quote!(&[#(#xs),*])
                        }
                    })
                    .collect();
                self.reset(moved, method.span(), pre);
                quote!(#b.#method(#(#args),*)?)
            }
            Expr::Binary { op, span, lhs, rhs } => {
                let moved = lhs.moves_loc() || rhs.moves_loc();
                let (l, r) = (self.operand(lhs, pre), self.operand(rhs, pre));
                self.reset(moved, *span, pre);
                match op {
                    Arith::Add => quote!(#b.add(#l, #r)?),
                    Arith::Mul => quote!(#b.mul(#l, #r)?),
                    op => {
                        let v = Ident::new(op.variant(), *span);
                        quote!(#b.binary(::tilefuse_ir::BinaryOp::#v, #l, #r)?)
                    }
                }
            }
            Expr::Scalar {
                op,
                span,
                tensor,
                value,
            } => {
                let moved = tensor.moves_loc() || value.moves_loc();
                let (t, c) = (self.operand(tensor, pre), self.operand(value, pre));
                self.reset(moved, *span, pre);
                let v = Ident::new(op.variant(), *span);
                quote!(#b.scalar(::tilefuse_ir::BinaryOp::#v, #t, #c)?)
            }
            Expr::Neg { span, x } => {
                let moved = x.moves_loc();
                let x = self.operand(x, pre);
                self.reset(moved, *span, pre);
                quote!(#b.unary(::tilefuse_ir::UnaryOp::Neg, #x)?)
            }
            Expr::Decl {
                kind,
                name,
                dtype,
                shape: s,
            } => {
                let name = self.name(name);
                let dtype = self.dtype(dtype, pre);
                let s = match s {
                    ShapeArg::Dims(d) => shape(d),
                    ShapeArg::Expr(x) => self.operand(x, pre),
                };
                quote!(#b.#kind(#name, #dtype, #s)?)
            }
            Expr::Output { span, name, value } => {
                let name = self.name(name);
                let v = self.operand(value, pre);
                let method = Ident::new("output", *span);
                quote!(#b.#method(#name, #v)?)
            }
            Expr::Call { func, args } => {
                let args: Vec<_> = args.iter().map(|a| self.operand(a, pre)).collect();
                quote!(#func(#b, #(#args),*)?)
            }
            Expr::Template { expr, holes } => {
                for (id, h) in holes {
                    let v = self.flat(h, pre);
                    pre.push(quote!(let #id = #v;));
                }
                quote!(#expr)
            }
            Expr::If { cond, then, els } => {
                let cond = self.cond(cond, pre);
                let then = self.block(then);
                // `else` takes a block or an `if`, which is what `expr` gives
                // (a block when the nested condition needs temporaries).
                let els = els.as_ref().map(|e| {
                    let v = self.expr(e);
                    quote!(else #v)
                });
                quote!(if #cond #then #els)
            }
            Expr::Match { expr, arms } => {
                let scrutinee = self.cond(expr, pre);
                let arms: Vec<_> = (arms.iter())
                    .map(|a| {
                        let (attrs, pat, body) = (&a.attrs, &a.pat, self.expr(&a.body));
                        let guard = a.guard.as_ref().map(|g| quote!(if #g));
                        quote!(#(#attrs)* #pat #guard => #body,)
                    })
                    .collect();
                quote!(match #scrutinee { #(#arms)* })
            }
            Expr::Block { label, block } => {
                let block = self.block(block);
                quote!(#label #block)
            }
            Expr::Loop { label, head, body } => {
                let head = match head {
                    LoopHead::For(pat, iter) => {
                        let iter = self.cond(iter, pre);
                        quote!(for #pat in #iter)
                    }
                    // The parser rejects a condition that calls the builder:
                    // it would run on every iteration.
                    LoopHead::While(c) => {
                        let c = self.expr(c);
                        quote!(while #c)
                    }
                    LoopHead::Loop => quote!(loop),
                };
                let body = self.block(body);
                quote!(#label #head #body)
            }
            Expr::Assign { lhs, rhs } => {
                let v = self.flat(rhs, pre);
                quote!(#lhs = #v)
            }
            Expr::Return { value } => {
                let v = match value {
                    Some(v) => self.result(v, pre),
                    None => quote!(::core::result::Result::Ok(())),
                };
                quote!(return #v)
            }
        }
    }

    /// Records the op's line again when an operand moved the source place.
    fn reset(&mut self, moved: bool, span: Span, pre: &mut Vec<TokenStream>) {
        if moved {
            pre.push(self.set_loc(span));
        }
    }

    /// A condition, scrutinee or iterable: evaluated once, before the
    /// construct; a template stays in place (so `if let` keeps its `let`).
    fn cond(&mut self, e: &Expr, pre: &mut Vec<TokenStream>) -> TokenStream {
        match e {
            Expr::Template { .. } => self.flat(e, pre),
            e => self.operand(e, pre),
        }
    }

    fn dtype(&mut self, d: &DTypeArg, pre: &mut Vec<TokenStream>) -> TokenStream {
        match d {
            DTypeArg::Named(v, span) => {
                let v = Ident::new(v, *span);
                quote!(::tilefuse_ir::DType::#v)
            }
            DTypeArg::Expr(x) => self.operand(x, pre),
        }
    }

    fn name(&self, n: &Name) -> TokenStream {
        match n {
            Name::Format(lit) if lit.value().contains('{') => quote!(&::std::format!(#lit)),
            Name::Format(lit) => quote!(#lit),
            Name::Expr(e) => quote!(&#e),
        }
    }
}

/// `::tilefuse_ir::Shape::new([..])`.
fn shape(dims: &[Dim]) -> TokenStream {
    let dims = dims.iter().map(dim);
    quote!(::tilefuse_ir::Shape::new([#(#dims),*]))
}

/// A dim as a `Dim` value.
fn dim(d: &Dim) -> TokenStream {
    match d {
        Dim::Sym(s, span) => quote_spanned!(*span=> ::tilefuse_ir::Dim::sym(#s)),
        Dim::Value(e) => quote!(::tilefuse_ir::IntoDim::into_dim(#e)),
    }
}

/// A dim argument of an op taking `impl Into<Dim>`.
fn dim_arg(d: &Dim) -> TokenStream {
    match d {
        Dim::Sym(s, span) => quote_spanned!(*span=> ::tilefuse_ir::Dim::sym(#s)),
        Dim::Value(e) => quote!(#e),
    }
}
