//! The text form of a graph: a deterministic printer and a parser that reads it back.
//!
//! ```text
//! graph qwen3_moe_layer(S, T) {
//!   %0 = input : bf16[T,64] "x"
//!   %1 = weight : bf16[64] "input_layernorm.weight"
//!   %2 = nn.rms_norm{eps=1e-6}(%0, %1) : bf16[T,64] "attn.norm" @ model/src/qwen3_moe.rs:41
//!   ...
//!   return "hidden" = %40
//! }
//! ```
//!
//! Nodes are numbered in topological order (smallest node id first among the
//! ready ones), attributes print in a fixed order, floats in their shortest
//! round-trip form: printing the same graph twice gives the same bytes, and
//! `print(parse(print(g))) == print(g)`.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::{ErrorKind, IrError, Result};
use crate::graph::{Graph, Loc, NodeId};
use crate::op::{Attr, Op, TensorType};
use crate::shape::{is_symbol, Dim, Shape};

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attr::Int(i) => write!(f, "{i}"),
            Attr::Float(x) => write!(f, "{x:?}"),
            Attr::Bool(b) => write!(f, "{b}"),
            Attr::Word(w) => f.write_str(w),
            Attr::DType(d) => write!(f, "{d}"),
            Attr::Dim(d) => write!(f, "{d}"),
            Attr::Shape(s) => write!(f, "{s}"),
            Attr::Ints(v) => {
                let items: Vec<String> = v.iter().map(|x| x.to_string()).collect();
                write!(f, "[{}]", items.join(","))
            }
        }
    }
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// One node's printed line (without indentation), with `%n` from `num`.
pub fn node_line(g: &Graph, id: NodeId, num: &BTreeMap<NodeId, usize>) -> String {
    let n = g.node(id);
    let pct = |i: &NodeId| match num.get(i) {
        Some(k) => format!("%{k}"),
        None => format!("%?{}", i.index()),
    };
    let mut s = format!("{} = {}", pct(&id), n.op.mnemonic());
    let attrs = n.op.attrs();
    if !attrs.is_empty() {
        let a: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        s.push_str(&format!("{{{}}}", a.join(", ")));
    }
    if !matches!(n.op, Op::Input(_)) {
        let ins: Vec<String> = g.inputs(id).iter().map(pct).collect();
        s.push_str(&format!("({})", ins.join(", ")));
    }
    s.push_str(&format!(" : {} {}", n.ty, quote(&n.name)));
    if let Some(l) = &n.loc {
        s.push_str(&format!(" @ {l}"));
    }
    s
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let order = self
            .topo_order()
            .unwrap_or_else(|_| self.numbering().into_keys().collect());
        let num: BTreeMap<NodeId, usize> = order.iter().enumerate().map(|(k, &i)| (i, k)).collect();
        let syms: Vec<&str> = self.symbols().collect();
        writeln!(f, "graph {}({}) {{", self.name, syms.join(", "))?;
        for id in &order {
            writeln!(f, "  {}", node_line(self, *id, &num))?;
        }
        for (name, id) in self.outputs() {
            writeln!(
                f,
                "  return {} = %{}",
                quote(name),
                num.get(id).copied().unwrap_or(usize::MAX)
            )?;
        }
        writeln!(f, "}}")
    }
}

/// Parses the printed form of a graph. Every node is re-checked as it is
/// added; a printed type that differs from the inferred one is an error.
pub fn parse(text: &str) -> Result<Graph> {
    Parser::default().run(text)
}

impl std::str::FromStr for Graph {
    type Err = IrError;
    fn from_str(s: &str) -> Result<Graph> {
        parse(s)
    }
}

#[derive(Default)]
struct Parser {
    ids: BTreeMap<usize, NodeId>,
}

fn perr(line_no: usize, line: &str, msg: impl Into<String>) -> IrError {
    IrError::new(ErrorKind::Parse, format!("line {line_no}: {}", msg.into()))
        .with_context(format!("  {line_no} | {line}"))
}

/// A cursor over one line.
struct Cur<'a> {
    s: &'a str,
}

impl<'a> Cur<'a> {
    fn ws(&mut self) {
        self.s = self.s.trim_start();
    }
    fn eat(&mut self, p: &str) -> bool {
        self.ws();
        if let Some(r) = self.s.strip_prefix(p) {
            self.s = r;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, p: &str) -> std::result::Result<(), String> {
        if self.eat(p) {
            Ok(())
        } else {
            Err(format!("expected `{p}` at `{}`", self.s))
        }
    }
    fn word(&mut self) -> &'a str {
        self.ws();
        let end = self
            .s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(self.s.len());
        let (w, r) = self.s.split_at(end);
        self.s = r;
        w
    }
    fn number_ref(&mut self) -> std::result::Result<usize, String> {
        self.expect("%")?;
        let w = self.word();
        w.parse().map_err(|_| format!("bad node reference `%{w}`"))
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        self.expect("\"")?;
        let mut out = String::new();
        let mut chars = self.s.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, e)) => out.push(e),
                    None => break,
                },
                '"' => {
                    self.s = &self.s[i + 1..];
                    return Ok(out);
                }
                c => out.push(c),
            }
        }
        Err("unterminated string".into())
    }
    /// Text up to the next `,` or closing `}` at bracket depth 0.
    fn attr_value(&mut self) -> &'a str {
        self.ws();
        let mut depth = 0i32;
        let mut end = self.s.len();
        for (i, c) in self.s.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                ',' | '}' if depth == 0 => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        let (v, r) = self.s.split_at(end);
        self.s = r;
        v.trim()
    }
    fn type_(&mut self) -> std::result::Result<TensorType, String> {
        self.ws();
        let open = self.s.find('[').ok_or("expected a type like bf16[T,64]")?;
        let dtype = self.s[..open].trim().parse()?;
        let close = self.s.find(']').ok_or("unclosed shape")?;
        let shape = parse_shape(&self.s[open..=close])?;
        self.s = &self.s[close + 1..];
        Ok(TensorType::new(dtype, shape))
    }
}

fn parse_shape(s: &str) -> std::result::Result<Shape, String> {
    let inner = s
        .trim()
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .ok_or_else(|| format!("`{s}` is not a shape like [T,64]"))?;
    if inner.trim().is_empty() {
        return Ok(Shape(vec![]));
    }
    inner
        .split(',')
        .map(|d| d.parse::<Dim>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Shape)
}

fn parse_attr(v: &str) -> std::result::Result<Attr, String> {
    if v.starts_with('[') {
        let shape = parse_shape(v)?;
        if shape.dims().iter().all(Dim::is_const) {
            return Ok(Attr::Ints(
                shape
                    .dims()
                    .iter()
                    .map(|d| d.as_const().unwrap_or(0) as i64)
                    .collect(),
            ));
        }
        return Ok(Attr::Shape(shape));
    }
    match v {
        "true" => return Ok(Attr::Bool(true)),
        "false" => return Ok(Attr::Bool(false)),
        "inf" | "-inf" | "NaN" => return v.parse().map(Attr::Float).map_err(|e| format!("{e}")),
        _ => {}
    }
    if let Ok(i) = v.parse::<i64>() {
        return Ok(Attr::Int(i));
    }
    if is_symbol(v) {
        return Ok(Attr::Word(v.to_string()));
    }
    if !v.contains('*') && !v.chars().any(|c| c.is_ascii_alphabetic() && c != 'e') {
        if let Ok(x) = v.parse::<f32>() {
            return Ok(Attr::Float(x));
        }
    }
    v.parse::<Dim>()
        .map(Attr::Dim)
        .map_err(|e| format!("bad attribute value `{v}`: {e}"))
}

impl Parser {
    fn run(mut self, text: &str) -> Result<Graph> {
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
        let (hno, header) = lines
            .by_ref()
            .find(|(_, l)| !l.trim().is_empty())
            .ok_or_else(|| {
                IrError::new(
                    ErrorKind::Parse,
                    "empty text: expected `graph NAME(SYMS) {`",
                )
            })?;
        let mut c = Cur { s: header };
        let mut g = (|| {
            c.expect("graph")?;
            let name = c.word().to_string();
            c.expect("(")?;
            let close = c.s.find(')').ok_or("expected `)` after the symbols")?;
            let syms: Vec<&str> = c.s[..close]
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            c.s = &c.s[close + 1..];
            c.expect("{")?;
            let mut g = Graph::new(&name, &[]);
            for s in syms {
                g.declare_symbol(s).map_err(|e| e.message)?;
            }
            Ok::<Graph, String>(g)
        })()
        .map_err(|m| perr(hno, header, m))?;
        let mut closed = false;
        for (no, line) in lines {
            let t = line.trim();
            if t.is_empty() {
                continue;
            }
            if closed {
                return Err(perr(no, line, "text after the closing `}`"));
            }
            if t == "}" {
                closed = true;
                continue;
            }
            if let Some(rest) = t.strip_prefix("return ") {
                let mut c = Cur { s: rest };
                let (name, num) = (|| {
                    let name = c.string()?;
                    c.expect("=")?;
                    Ok::<_, String>((name, c.number_ref()?))
                })()
                .map_err(|m| perr(no, line, m))?;
                let id = *self
                    .ids
                    .get(&num)
                    .ok_or_else(|| perr(no, line, format!("%{num} is not defined")))?;
                g.set_output(&name, id)
                    .map_err(|e| perr(no, line, e.message))?;
                continue;
            }
            self.node(&mut g, t).map_err(|e| match e {
                Ok(m) => perr(no, line, m),
                Err(ir) => perr(no, line, ir.to_string()),
            })?;
        }
        if !closed {
            return Err(IrError::new(ErrorKind::Parse, "missing the closing `}`"));
        }
        Ok(g)
    }

    /// Parses one node line; `Err(Ok(msg))` is a syntax error, `Err(Err(e))` a type error.
    fn node(
        &mut self,
        g: &mut Graph,
        line: &str,
    ) -> std::result::Result<(), std::result::Result<String, IrError>> {
        let mut c = Cur { s: line };
        let num = c.number_ref().map_err(Ok)?;
        if self.ids.contains_key(&num) {
            return Err(Ok(format!("%{num} is defined twice")));
        }
        c.expect("=").map_err(Ok)?;
        let mnemonic = c.word();
        let mut attrs = BTreeMap::new();
        if c.eat("{") {
            loop {
                let k = c.word().to_string();
                c.expect("=").map_err(Ok)?;
                let v = parse_attr(c.attr_value()).map_err(Ok)?;
                if attrs.insert(k.clone(), v).is_some() {
                    return Err(Ok(format!("attribute `{k}` given twice")));
                }
                if c.eat("}") {
                    break;
                }
                c.expect(",").map_err(Ok)?;
            }
        }
        let op = Op::from_parts(mnemonic, &attrs).map_err(Ok)?;
        let mut inputs = Vec::new();
        if !matches!(op, Op::Input(_)) {
            c.expect("(").map_err(Ok)?;
            if !c.eat(")") {
                loop {
                    let r = c.number_ref().map_err(Ok)?;
                    inputs.push(
                        *self
                            .ids
                            .get(&r)
                            .ok_or_else(|| Ok(format!("%{r} is used before it is defined")))?,
                    );
                    if c.eat(")") {
                        break;
                    }
                    c.expect(",").map_err(Ok)?;
                }
            }
        }
        c.expect(":").map_err(Ok)?;
        let ty = c.type_().map_err(Ok)?;
        let name = c.string().map_err(Ok)?;
        let loc = if c.eat("@") {
            let rest = c.s.trim();
            let (file, l) = rest
                .rsplit_once(':')
                .ok_or_else(|| Ok(format!("bad location `{rest}`; expected FILE:LINE")))?;
            let line = l
                .parse()
                .map_err(|_| Ok(format!("bad line number `{l}` in location")))?;
            c.s = "";
            Some(Loc {
                file: file.to_string(),
                line,
            })
        } else {
            None
        };
        c.ws();
        if !c.s.is_empty() {
            return Err(Ok(format!("unexpected `{}` at the end of the line", c.s)));
        }
        let id = match op {
            Op::Input(kind) => g.add_input(kind, &name, ty.clone(), loc).map_err(Err)?,
            op => {
                let id = g.add(op, &inputs, &name, loc).map_err(Err)?;
                if g.node(id).ty != ty {
                    return Err(Ok(format!(
                        "printed type {ty} differs from the inferred type {}",
                        g.node(id).ty
                    )));
                }
                id
            }
        };
        self.ids.insert(num, id);
        Ok(())
    }
}
