//! Shapes whose dims are constants or linear expressions over named symbols.
//!
//! A dim is `c + Σ aᵢ·symᵢ` with integer coefficients, kept canonical (sorted
//! symbols, no zero coefficients), so structural equality is semantic equality
//! for the expressions a forward pass needs: `T`, `S+T`, `C+S+T`, `4096`.
//! Symbols are bound to sizes when a graph is executed ([`Bindings`]).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Add, Mul};

/// A dimension: a constant or a linear expression over symbols.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Dim {
    constant: i64,
    terms: BTreeMap<String, i64>,
}

impl Dim {
    /// A constant dim.
    pub fn c(n: usize) -> Dim {
        Dim {
            constant: n as i64,
            terms: BTreeMap::new(),
        }
    }

    /// A dim that is exactly one symbol.
    pub fn sym(name: &str) -> Dim {
        let mut terms = BTreeMap::new();
        terms.insert(name.to_string(), 1);
        Dim { constant: 0, terms }
    }

    /// The value if the dim has no symbols.
    pub fn as_const(&self) -> Option<usize> {
        if self.terms.is_empty() && self.constant >= 0 {
            Some(self.constant as usize)
        } else {
            None
        }
    }

    /// True when the dim is a constant.
    pub fn is_const(&self) -> bool {
        self.terms.is_empty()
    }

    /// The constant term.
    pub fn constant(&self) -> i64 {
        self.constant
    }

    /// The symbols with their coefficients, in symbol order.
    pub fn terms(&self) -> impl Iterator<Item = (&str, i64)> {
        self.terms.iter().map(|(s, &a)| (s.as_str(), a))
    }

    /// The symbols the dim mentions, in order.
    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.terms.keys().map(String::as_str)
    }

    /// The dim with its symbols bound; an error names the first unbound symbol
    /// or reports a negative value.
    pub fn eval(&self, bindings: &Bindings) -> Result<usize, String> {
        let mut v = self.constant;
        for (s, a) in &self.terms {
            let x = bindings
                .get(s)
                .ok_or_else(|| format!("symbol `{s}` (in dim `{self}`) is not bound"))?;
            v += a * x as i64;
        }
        usize::try_from(v).map_err(|_| format!("dim `{self}` evaluates to {v}, which is negative"))
    }

    /// `self - other`, when the result is again a dim expression.
    pub fn sub(&self, other: &Dim) -> Dim {
        self.clone() + other.clone() * -1
    }

    fn normalize(mut self) -> Dim {
        self.terms.retain(|_, a| *a != 0);
        self
    }
}

impl Add for Dim {
    type Output = Dim;
    fn add(mut self, rhs: Dim) -> Dim {
        self.constant += rhs.constant;
        for (s, a) in rhs.terms {
            *self.terms.entry(s).or_insert(0) += a;
        }
        self.normalize()
    }
}

impl Mul<i64> for Dim {
    type Output = Dim;
    fn mul(mut self, k: i64) -> Dim {
        self.constant *= k;
        for a in self.terms.values_mut() {
            *a *= k;
        }
        self.normalize()
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::c(n)
    }
}

impl From<&str> for Dim {
    fn from(s: &str) -> Dim {
        Dim::sym(s)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (s, a) in &self.terms {
            let a = *a;
            if first {
                if a == -1 {
                    f.write_str("-")?;
                } else if a != 1 {
                    write!(f, "{a}*")?;
                }
            } else if a == 1 {
                f.write_str("+")?;
            } else if a == -1 {
                f.write_str("-")?;
            } else if a < 0 {
                write!(f, "-{}*", -a)?;
            } else {
                write!(f, "+{a}*")?;
            }
            f.write_str(s)?;
            first = false;
        }
        if first {
            write!(f, "{}", self.constant)
        } else if self.constant > 0 {
            write!(f, "+{}", self.constant)
        } else if self.constant < 0 {
            write!(f, "-{}", -self.constant)
        } else {
            Ok(())
        }
    }
}

/// Parses the printed form of a dim: terms `n`, `sym` or `n*sym` joined by `+`/`-`.
impl std::str::FromStr for Dim {
    type Err = String;
    fn from_str(s: &str) -> Result<Dim, String> {
        let text = s.trim();
        if text.is_empty() {
            return Err("empty dim".into());
        }
        let mut dim = Dim::c(0);
        let mut rest = text;
        let mut sign = 1i64;
        if let Some(r) = rest.strip_prefix('-') {
            sign = -1;
            rest = r;
        }
        loop {
            let end = rest.find(['+', '-']).unwrap_or(rest.len());
            let term = rest[..end].trim();
            let (coef, name) = match term.split_once('*') {
                Some((c, n)) => (
                    c.trim()
                        .parse::<i64>()
                        .map_err(|_| format!("bad coefficient `{c}` in dim `{text}`"))?,
                    Some(n.trim()),
                ),
                None => match term.parse::<i64>() {
                    Ok(n) => (n, None),
                    Err(_) => (1, Some(term)),
                },
            };
            match name {
                Some(n) if is_symbol(n) => dim = dim + Dim::sym(n) * (sign * coef),
                Some(n) => return Err(format!("bad symbol `{n}` in dim `{text}`")),
                None => dim = dim + const_dim(sign * coef),
            }
            if end == rest.len() {
                break;
            }
            sign = if rest.as_bytes()[end] == b'-' { -1 } else { 1 };
            rest = &rest[end + 1..];
        }
        Ok(dim)
    }
}

fn const_dim(v: i64) -> Dim {
    Dim {
        constant: v,
        terms: BTreeMap::new(),
    }
}

/// A symbol name: an ASCII letter followed by letters, digits or `_`.
pub fn is_symbol(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A shape: one [`Dim`] per axis.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    /// A shape from anything convertible to dims: `Shape::new(["T".into(), 4096.into()])`.
    pub fn new(dims: impl IntoIterator<Item = Dim>) -> Shape {
        Shape(dims.into_iter().collect())
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// The dims.
    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    /// The last dim, if any.
    pub fn last(&self) -> Option<&Dim> {
        self.0.last()
    }

    /// Concrete sizes with symbols bound.
    pub fn eval(&self, bindings: &Bindings) -> Result<Vec<usize>, String> {
        self.0.iter().map(|d| d.eval(bindings)).collect()
    }

    /// All symbols mentioned.
    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.0.iter().flat_map(|d| d.symbols())
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Builds a [`Shape`] from a mix of integer constants and symbol names:
/// `shape![T, 4096]` (bare identifiers are symbols) or `shape!["S+T", 8]`.
#[macro_export]
macro_rules! shape {
    ($($d:tt),* $(,)?) => {
        $crate::Shape::new([$($crate::__dim!($d)),*])
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __dim {
    ($d:literal) => {
        $crate::IntoDim::into_dim($d)
    };
    ($d:ident) => {
        $crate::Dim::sym(stringify!($d))
    };
    (($d:expr)) => {
        $crate::IntoDim::into_dim($d)
    };
}

/// Conversion used by [`shape!`]: integers are constants, strings are parsed.
pub trait IntoDim {
    /// The dim.
    fn into_dim(self) -> Dim;
}
impl IntoDim for usize {
    fn into_dim(self) -> Dim {
        Dim::c(self)
    }
}
impl IntoDim for i32 {
    fn into_dim(self) -> Dim {
        Dim::c(usize::try_from(self).expect("negative constant dim"))
    }
}
impl IntoDim for &str {
    fn into_dim(self) -> Dim {
        self.parse().expect("malformed dim expression")
    }
}
impl IntoDim for Dim {
    fn into_dim(self) -> Dim {
        self
    }
}

/// Values of the symbols for one execution (`T = 1`, `S = 37`, ...).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bindings(BTreeMap<String, usize>);

impl Bindings {
    /// No symbols bound.
    pub fn new() -> Bindings {
        Bindings::default()
    }

    /// Binds `sym` to `value` (builder style).
    pub fn with(mut self, sym: &str, value: usize) -> Bindings {
        self.0.insert(sym.to_string(), value);
        self
    }

    /// Binds `sym` to `value`.
    pub fn set(&mut self, sym: &str, value: usize) {
        self.0.insert(sym.to_string(), value);
    }

    /// The value of `sym`.
    pub fn get(&self, sym: &str) -> Option<usize> {
        self.0.get(sym).copied()
    }

    /// All bound symbols in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, usize)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn display_and_eval() {
        let d = Dim::sym("S") + Dim::sym("T");
        assert_eq!(d.to_string(), "S+T");
        let b = Bindings::new().with("S", 5).with("T", 3);
        assert_eq!(d.eval(&b), Ok(8));
        assert_eq!((Dim::sym("T") * 2 + Dim::c(1)).to_string(), "2*T+1");
        assert_eq!(Dim::c(4096).to_string(), "4096");
        assert!(Dim::sym("C").eval(&b).unwrap_err().contains("`C`"));
        assert_eq!(shape![T, 4096].to_string(), "[T,4096]");
        assert_eq!(Dim::sym("T").sub(&Dim::sym("T")), Dim::c(0));
    }

    fn arb_dim() -> impl Strategy<Value = Dim> {
        (
            -50i64..5000,
            proptest::collection::btree_map("[A-Z][a-z0-9_]{0,2}", -3i64..4, 0..3),
        )
            .prop_map(|(c, terms)| {
                terms
                    .into_iter()
                    .fold(const_dim(c), |d, (s, a)| d + Dim::sym(&s) * a)
            })
    }

    proptest! {
        #[test]
        fn dim_print_parse_round_trip(d in arb_dim()) {
            let text = d.to_string();
            let back: Dim = text.parse().map_err(TestCaseError::fail)?;
            prop_assert_eq!(back, d);
        }

        #[test]
        fn dim_eval_is_linear(a in arb_dim(), b in arb_dim(), x in 0usize..100, y in 0usize..100) {
            let mut bind = Bindings::new();
            for s in a.symbols().chain(b.symbols()) {
                bind.set(s, if s.len() % 2 == 0 { x } else { y });
            }
            let ea = a.eval(&bind);
            let eb = b.eval(&bind);
            if let (Ok(ea), Ok(eb)) = (ea, eb) {
                prop_assert_eq!((a + b).eval(&bind), Ok(ea + eb));
            }
        }
    }
}
