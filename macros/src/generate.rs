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

use crate::parse::{Arg, Block, DTypeArg, Dim, Expr, GraphFn, LoopHead, Name, ShapeArg, Stmt};

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
    let unit = matches!(ret, None | Some(syn::Type::Tuple(syn::TypeTuple { elems, .. })) if elems.is_empty());
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
                let v = self.returned(t);
                quote!(#loc ::core::result::Result::Ok(#v))
            }
            None if unit => quote!(::core::result::Result::Ok(())),
            None => TokenStream::new(),
        };
        quote!(#(#stmts)* #tail)
    }

    /// A returned value; a fresh node is named `out`.
    fn returned(&mut self, e: &Expr) -> TokenStream {
        let v = self.expr(e);
        if !e.is_fresh() {
            return v;
        }
        let (b, t) = (self.b.clone(), self.temp());
        quote!({ let #t = #v; #b.name(#t, "out") })
    }

    fn block(&mut self, block: &Block) -> TokenStream {
        let stmts = block.stmts.iter().map(|s| self.stmt(s)).collect::<Vec<_>>();
        quote!({ #(#stmts)* })
    }

    fn stmt(&mut self, s: &Stmt) -> TokenStream {
        match s {
            Stmt::Rust(s) => quote!(#s),
            Stmt::Let { span, pat, init, name } => {
                let loc = if init.needs_loc() { self.set_loc(*span) } else { TokenStream::new() };
                let v = self.expr(init);
                let named = name.as_ref().map(|n| {
                    let b = &self.b;
                    let s = n.unraw().to_string();
                    quote!(#b.name(#n, #s);)
                });
                quote!(#loc let #pat = #v; #named)
            }
            Stmt::Expr { span, expr, semi } => {
                let loc = if expr.needs_loc() { self.set_loc(*span) } else { TokenStream::new() };
                let v = self.expr(expr);
                let semi = semi.then(|| quote!(;));
                quote!(#loc #v #semi)
            }
        }
    }

    /// An operand: inline when it does not call the builder, otherwise bound
    /// to a temporary in `pre`.
    fn operand(&mut self, e: &Expr, pre: &mut Vec<TokenStream>) -> TokenStream {
        let v = self.expr(e);
        if !e.uses_builder() {
            return v;
        }
        let t = self.temp();
        pre.push(quote!(let #t = #v;));
        quote!(#t)
    }

    /// `{ pre; [set_loc]; call }`, or just `call`.
    fn call(&mut self, pre: Vec<TokenStream>, reset: Option<Span>, call: TokenStream) -> TokenStream {
        let reset = reset.map(|s| self.set_loc(s));
        if pre.is_empty() && reset.is_none() {
            call
        } else {
            quote!({ #(#pre)* #reset #call })
        }
    }

    fn expr(&mut self, e: &Expr) -> TokenStream {
        let b = self.b.clone();
        match e {
            Expr::Rust(e) => quote!(#e),
            Expr::Var(v) => quote!(#v),
            Expr::Op { method, args, .. } => {
                let mut pre = Vec::new();
                let mut moved = false;
                let args: Vec<TokenStream> = (args.iter())
                    .map(|a| match a {
                        Arg::Expr(x) => {
                            moved |= x.moves_loc();
                            self.operand(x, &mut pre)
                        }
                        Arg::Shape(d) => shape(d),
                        Arg::Dim(d) => dim_arg(d),
                        Arg::DType(d) => self.dtype(d, &mut pre),
                        Arg::Tensors(xs) => {
                            moved |= xs.iter().any(Expr::moves_loc);
                            let xs: Vec<_> = xs.iter().map(|x| self.operand(x, &mut pre)).collect();
                            quote!(&[#(#xs),*])
                        }
                    })
                    .collect();
                let call = quote!(#b.#method(#(#args),*)?);
                self.call(pre, moved.then(|| method.span()), call)
            }
            Expr::Binary { op, span, lhs, rhs } => {
                let mut pre = Vec::new();
                let moved = lhs.moves_loc() || rhs.moves_loc();
                let (l, r) = (self.operand(lhs, &mut pre), self.operand(rhs, &mut pre));
                let call = match op {
                    crate::parse::Arith::Add => quote!(#b.add(#l, #r)?),
                    crate::parse::Arith::Mul => quote!(#b.mul(#l, #r)?),
                    op => {
                        let v = Ident::new(op.variant(), *span);
                        quote!(#b.binary(::tilefuse_ir::BinaryOp::#v, #l, #r)?)
                    }
                };
                self.call(pre, moved.then_some(*span), call)
            }
            Expr::Scalar { op, span, tensor, value } => {
                let mut pre = Vec::new();
                let moved = tensor.moves_loc() || value.moves_loc();
                let (t, c) = (self.operand(tensor, &mut pre), self.operand(value, &mut pre));
                let v = Ident::new(op.variant(), *span);
                let call = quote!(#b.scalar(::tilefuse_ir::BinaryOp::#v, #t, #c)?);
                self.call(pre, moved.then_some(*span), call)
            }
            Expr::Neg { span, x } => {
                let mut pre = Vec::new();
                let moved = x.moves_loc();
                let x = self.operand(x, &mut pre);
                let call = quote!(#b.unary(::tilefuse_ir::UnaryOp::Neg, #x)?);
                self.call(pre, moved.then_some(*span), call)
            }
            Expr::Decl { kind, name, dtype, shape: s } => {
                let mut pre = Vec::new();
                let name = self.name(name);
                let dtype = self.dtype(dtype, &mut pre);
                let s = match s {
                    ShapeArg::Dims(d) => shape(d),
                    ShapeArg::Expr(x) => self.operand(x, &mut pre),
                };
                let call = quote!(#b.#kind(#name, #dtype, #s)?);
                self.call(pre, None, call)
            }
            Expr::Output { span, name, value } => {
                let mut pre = Vec::new();
                let name = self.name(name);
                let v = self.operand(value, &mut pre);
                let method = Ident::new("output", *span);
                let call = quote!(#b.#method(#name, #v)?);
                self.call(pre, None, call)
            }
            Expr::Call { func, args } => {
                let mut pre = Vec::new();
                let args: Vec<_> = args.iter().map(|a| self.operand(a, &mut pre)).collect();
                let call = quote!(#func(#b, #(#args),*)?);
                self.call(pre, None, call)
            }
            Expr::Template { expr, holes } => {
                let holes: Vec<_> = (holes.iter())
                    .map(|(id, h)| {
                        let v = self.expr(h);
                        quote!(let #id = #v;)
                    })
                    .collect();
                quote!({ #(#holes)* #expr })
            }
            Expr::If { cond, then, els } => {
                let mut pre = Vec::new();
                let cond = self.cond(cond, &mut pre);
                let then = self.block(then);
                let els = els.as_ref().map(|e| {
                    let e = self.expr(e);
                    quote!(else #e)
                });
                self.call(pre, None, quote!(if #cond #then #els))
            }
            Expr::Match { expr, arms } => {
                let mut pre = Vec::new();
                let scrutinee = self.cond(expr, &mut pre);
                let arms: Vec<_> = (arms.iter())
                    .map(|a| {
                        let (attrs, pat, body) = (&a.attrs, &a.pat, self.expr(&a.body));
                        let guard = a.guard.as_ref().map(|g| quote!(if #g));
                        quote!(#(#attrs)* #pat #guard => #body,)
                    })
                    .collect();
                self.call(pre, None, quote!(match #scrutinee { #(#arms)* }))
            }
            Expr::Block { label, block } => {
                let block = self.block(block);
                quote!(#label #block)
            }
            Expr::Loop { label, head, body } => {
                let mut pre = Vec::new();
                let head = match head {
                    LoopHead::For(pat, iter) => {
                        let iter = self.cond(iter, &mut pre);
                        quote!(for #pat in #iter)
                    }
                    LoopHead::While(c) => {
                        let c = self.cond(c, &mut pre);
                        quote!(while #c)
                    }
                    LoopHead::Loop => quote!(loop),
                };
                let body = self.block(body);
                self.call(pre, None, quote!(#label #head #body))
            }
            Expr::Assign { lhs, rhs } => {
                let v = self.expr(rhs);
                quote!(#lhs = #v)
            }
            Expr::Return { value } => {
                let v = match value {
                    Some(v) => self.returned(v),
                    None => quote!(()),
                };
                quote!(return ::core::result::Result::Ok(#v))
            }
        }
    }

    /// A condition, scrutinee or iterable: a template's holes go before the
    /// construct (so `if let` stays a `let` in condition position).
    fn cond(&mut self, e: &Expr, pre: &mut Vec<TokenStream>) -> TokenStream {
        match e {
            Expr::Template { expr, holes } => {
                for (id, h) in holes {
                    let v = self.expr(h);
                    pre.push(quote!(let #id = #v;));
                }
                quote!(#expr)
            }
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
            Name::Format(lit) => quote!(&::std::format!(#lit)),
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
