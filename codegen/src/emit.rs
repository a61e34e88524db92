//! A small typed emitter for CUDA C++: expressions, statements and functions
//! as values with `Display`. Lowering builds these and never splices strings
//! into other strings; temporaries are numbered per kernel by [`Temps`].

use std::fmt;

/// A C++ type as written in generated code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ty {
    /// `float`
    F32,
    /// `int`
    I32,
    /// `tf::bf16`
    Bf16,
    /// `__half`
    F16,
    /// `uint8_t`
    U8,
    /// `char`
    Char,
    /// `const T*`
    ConstPtr(Box<Ty>),
    /// `T*`
    Ptr(Box<Ty>),
    /// A named type (template instantiation, struct).
    Named(String),
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ty::F32 => f.write_str("float"),
            Ty::I32 => f.write_str("int"),
            Ty::Bf16 => f.write_str("tf::bf16"),
            Ty::F16 => f.write_str("__half"),
            Ty::U8 => f.write_str("uint8_t"),
            Ty::Char => f.write_str("char"),
            Ty::ConstPtr(t) => write!(f, "const {t}* __restrict__"),
            Ty::Ptr(t) => write!(f, "{t}* __restrict__"),
            Ty::Named(n) => f.write_str(n),
        }
    }
}

/// An expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// A variable or any name in scope.
    Var(String),
    /// An f32 literal, printed so it reads back to the same bits.
    F32(f32),
    /// An int literal.
    I32(i64),
    /// `a op b`.
    Bin(Box<Expr>, &'static str, Box<Expr>),
    /// `f<targs>(args)`.
    Call(String, Vec<Expr>),
    /// `base[index]`.
    Index(Box<Expr>, Box<Expr>),
    /// `reinterpret_cast<ty>(e)`.
    Reinterpret(Ty, Box<Expr>),
    /// `c ? a : b`.
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
    /// `T{args}`: a call printed with braces (aggregate initialisation).
    Brace(Box<Expr>),
    /// A byte offset into one of the kernel's buffers. Printed as its value;
    /// [`parameterize`] turns each into a read of the kernel's offset table,
    /// so kernels that differ only in where their data lives share one body.
    Offset(i64),
}

impl Expr {
    /// A variable.
    pub fn var(s: impl Into<String>) -> Expr {
        Expr::Var(s.into())
    }
    /// `f(args)`.
    pub fn call(f: impl Into<String>, args: Vec<Expr>) -> Expr {
        Expr::Call(f.into(), args)
    }
    /// `self op rhs`.
    pub fn bin(self, op: &'static str, rhs: Expr) -> Expr {
        Expr::Bin(Box::new(self), op, Box::new(rhs))
    }
    /// The call `self` printed as aggregate initialisation `T{args}`.
    pub fn brace(self) -> Expr {
        Expr::Brace(Box::new(self))
    }
    /// `self[i]`.
    pub fn index(self, i: Expr) -> Expr {
        Expr::Index(Box::new(self), Box::new(i))
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Var(v) => f.write_str(v),
            Expr::F32(x) => {
                if x.is_nan() {
                    f.write_str("__int_as_float(0x7fc00000)")
                } else if x.is_infinite() {
                    f.write_str(if *x > 0.0 { "INFINITY" } else { "-INFINITY" })
                } else {
                    // Shortest round-trip form, always with a decimal point or exponent.
                    let s = format!("{x:?}");
                    write!(f, "{s}f")
                }
            }
            Expr::I32(i) => write!(f, "{i}"),
            Expr::Bin(a, op, b) => write!(f, "({a} {op} {b})"),
            Expr::Call(n, args) => {
                write!(f, "{n}(")?;
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a}")?;
                }
                f.write_str(")")
            }
            Expr::Index(b, i) => write!(f, "{b}[{i}]"),
            Expr::Reinterpret(t, e) => write!(f, "reinterpret_cast<{t}>({e})"),
            Expr::Select(c, a, b) => write!(f, "({c} ? {a} : {b})"),
            Expr::Offset(v) => write!(f, "{v}"),
            Expr::Brace(call) => match call.as_ref() {
                Expr::Call(n, args) => {
                    write!(f, "{n}{{")?;
                    for (i, a) in args.iter().enumerate() {
                        if i > 0 {
                            f.write_str(", ")?;
                        }
                        write!(f, "{a}")?;
                    }
                    f.write_str("}")
                }
                other => write!(f, "{other}"),
            },
        }
    }
}

/// A statement.
#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    /// `const ty name = e;`
    Let(Ty, String, Expr),
    /// `lhs = e;`
    Assign(Expr, Expr),
    /// `e;`
    Expr(Expr),
    /// `if (c) { .. } else { .. }`
    If(Expr, Vec<Stmt>, Vec<Stmt>),
    /// `for (int v = from; v < to; v += step) { .. }`
    For(String, Expr, Expr, Expr, Vec<Stmt>),
    /// `return;`
    Return,
    /// `// text`
    Comment(String),
    /// A lambda bound to a name: `auto name = [&](params) { body };`
    Lambda(String, Vec<(Ty, String)>, Vec<Stmt>),
    /// A comment naming the graph nodes a statement computes; dropped from
    /// bodies shared by several kernels (the kernel header lists the nodes).
    NodeComment(String),
}

fn indent(f: &mut fmt::Formatter<'_>, n: usize) -> fmt::Result {
    for _ in 0..n {
        f.write_str("    ")?;
    }
    Ok(())
}

/// Statements printed at an indentation level.
pub struct Block<'a>(pub &'a [Stmt], pub usize);

impl fmt::Display for Block<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in self.0 {
            write_stmt(f, s, self.1)?;
        }
        Ok(())
    }
}

fn write_stmt(f: &mut fmt::Formatter<'_>, s: &Stmt, level: usize) -> fmt::Result {
    indent(f, level)?;
    match s {
        Stmt::Let(t, n, e) => writeln!(f, "const {t} {n} = {e};"),
        Stmt::Assign(l, e) => writeln!(f, "{l} = {e};"),
        Stmt::Expr(e) => writeln!(f, "{e};"),
        Stmt::If(c, a, b) => {
            writeln!(f, "if ({c}) {{")?;
            write!(f, "{}", Block(a, level + 1))?;
            if !b.is_empty() {
                indent(f, level)?;
                writeln!(f, "}} else {{")?;
                write!(f, "{}", Block(b, level + 1))?;
            }
            indent(f, level)?;
            writeln!(f, "}}")
        }
        Stmt::For(v, from, to, step, body) => {
            writeln!(f, "for (int {v} = {from}; {v} < {to}; {v} += {step}) {{")?;
            write!(f, "{}", Block(body, level + 1))?;
            indent(f, level)?;
            writeln!(f, "}}")
        }
        Stmt::Return => writeln!(f, "return;"),
        Stmt::Comment(c) | Stmt::NodeComment(c) => {
            for (i, l) in c.lines().enumerate() {
                if i > 0 {
                    indent(f, level)?;
                }
                writeln!(f, "// {l}")?;
            }
            Ok(())
        }
        Stmt::Lambda(n, params, body) => {
            let ps: Vec<String> = params.iter().map(|(t, n)| format!("{t} {n}")).collect();
            writeln!(f, "auto {n} = [&]({}) {{", ps.join(", "))?;
            write!(f, "{}", Block(body, level + 1))?;
            indent(f, level)?;
            writeln!(f, "}};")
        }
    }
}

/// A function definition.
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    /// Leading qualifiers (`extern "C" __global__`, `__device__ __forceinline__`).
    pub qualifiers: String,
    /// `__launch_bounds__(threads, min CTAs an SM)`, for kernels.
    pub launch_bounds: Option<(u32, u32)>,
    /// Return type (`void`).
    pub ret: String,
    /// Name.
    pub name: String,
    /// Parameters.
    pub params: Vec<(Ty, String)>,
    /// Body.
    pub body: Vec<Stmt>,
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.qualifiers)?;
        if let Some((n, m)) = self.launch_bounds {
            write!(f, "__launch_bounds__({n}, {m}) ")?;
        }
        let ps: Vec<String> = self
            .params
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        writeln!(f, "{} {}({}) {{", self.ret, self.name, ps.join(", "))?;
        write!(f, "{}", Block(&self.body, 1))?;
        writeln!(f, "}}")
    }
}

fn param_expr(e: &mut Expr, offsets: &mut Vec<i64>, table: &str) {
    match e {
        Expr::Offset(v) => {
            offsets.push(*v);
            *e = Expr::Var(format!("{table}[{}]", offsets.len() - 1));
        }
        Expr::Bin(a, _, b) => {
            param_expr(a, offsets, table);
            param_expr(b, offsets, table);
        }
        Expr::Call(_, args) => args.iter_mut().for_each(|a| param_expr(a, offsets, table)),
        Expr::Index(a, b) => {
            param_expr(a, offsets, table);
            param_expr(b, offsets, table);
        }
        Expr::Reinterpret(_, a) | Expr::Brace(a) => param_expr(a, offsets, table),
        Expr::Select(a, b, c) => {
            param_expr(a, offsets, table);
            param_expr(b, offsets, table);
            param_expr(c, offsets, table);
        }
        Expr::Var(_) | Expr::F32(_) | Expr::I32(_) => {}
    }
}

/// Replaces every [`Expr::Offset`] of `body`, in order, by `table[i]` and
/// drops [`Stmt::NodeComment`]s; returns the offsets. Two kernels whose
/// parameterized bodies print the same can share one function.
pub fn parameterize(body: &mut Vec<Stmt>, table: &str) -> Vec<i64> {
    fn walk(body: &mut Vec<Stmt>, offsets: &mut Vec<i64>, table: &str) {
        body.retain(|s| !matches!(s, Stmt::NodeComment(_)));
        for s in body.iter_mut() {
            match s {
                Stmt::Let(_, _, e) | Stmt::Expr(e) => param_expr(e, offsets, table),
                Stmt::Assign(l, e) => {
                    param_expr(l, offsets, table);
                    param_expr(e, offsets, table);
                }
                Stmt::If(c, a, b) => {
                    param_expr(c, offsets, table);
                    walk(a, offsets, table);
                    walk(b, offsets, table);
                }
                Stmt::For(_, a, b, c, body) => {
                    param_expr(a, offsets, table);
                    param_expr(b, offsets, table);
                    param_expr(c, offsets, table);
                    walk(body, offsets, table);
                }
                Stmt::Lambda(_, _, body) => walk(body, offsets, table),
                Stmt::Return | Stmt::Comment(_) | Stmt::NodeComment(_) => {}
            }
        }
    }
    let mut offsets = Vec::new();
    walk(body, &mut offsets, table);
    offsets
}

/// Numbers temporaries per kernel: `v0`, `v1`, ...
#[derive(Debug, Default)]
pub struct Temps(usize);

impl Temps {
    /// A fresh name.
    pub fn fresh(&mut self) -> String {
        let n = format!("v{}", self.0);
        self.0 += 1;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_readable_cpp() {
        let mut t = Temps::default();
        let v0 = t.fresh();
        let body = vec![
            Stmt::Comment("epilogue".into()),
            Stmt::Let(
                Ty::F32,
                v0.clone(),
                Expr::var("acc").bin("*", Expr::F32(0.707)),
            ),
            Stmt::If(
                Expr::var("n").bin("<", Expr::I32(64)),
                vec![Stmt::Assign(
                    Expr::var("out").index(Expr::var("n")),
                    Expr::var(&v0),
                )],
                vec![],
            ),
        ];
        let f = Function {
            qualifiers: "__device__ __forceinline__".into(),
            launch_bounds: None,
            ret: "void".into(),
            name: "epi".into(),
            params: vec![
                (Ty::Ptr(Box::new(Ty::F32)), "out".into()),
                (Ty::I32, "n".into()),
            ],
            body,
        };
        let s = f.to_string();
        assert_eq!(
            s,
            "__device__ __forceinline__ void epi(float* __restrict__ out, int n) {\n    // epilogue\n    const float v0 = (acc * 0.707f);\n    if ((n < 64)) {\n        out[n] = v0;\n    }\n}\n"
        );
        assert_eq!(Expr::F32(1e-5).to_string(), "1e-5f");
        assert_eq!(Expr::F32(2.0).to_string(), "2.0f");
    }
}
