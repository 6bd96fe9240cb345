//! Parameter files and `-y` strings read the way papermill reads them:
//! PyYAML's `SafeLoader` without the timestamp rule (papermill's
//! `NoDatesSafeLoader`), i.e. YAML 1.1 typing of plain scalars.
//!
//! YAML 1.2 parsers (and so the usual Rust crates' loaders) type `yes`,
//! `off`, `0o17`, `1:30` or `1e3` differently from PyYAML, and a parameter
//! that is a bool under papermill must not become a string under noyau. So
//! this module takes yaml-rust2's events, which keep the scalar style (plain
//! or quoted), and applies PyYAML's implicit resolvers itself.

use std::collections::HashMap;

use noyau_notebook::Param;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    #[error("invalid YAML: {0}")]
    Syntax(String),
    #[error("unsupported YAML tag !!{0} (use plain values, lists and mappings)")]
    Tag(String),
    #[error("invalid YAML: the value {0:?} does not fit its tag")]
    BadValue(String),
    /// Aliases copy what they name: a few lines that alias an alias of an
    /// alias would fill the login node's memory.
    #[error(
        "the YAML would take more than {} MiB once its aliases are expanded: \
         a parameters or sweep file this large is refused (split it)",
        MAX_WEIGHT >> 20
    )]
    TooLarge,
    /// Values nested deeper than a parameter needs would overflow the
    /// stack of what reads and writes them.
    #[error("the YAML nests lists or mappings more than {MAX_DEPTH} deep: flatten it")]
    TooDeep,
}

/// The most a file may weigh, aliases expanded: about the memory its
/// values take ([`VALUE_WEIGHT`] each, and a text its length more). A
/// sweep of 100,000 points of 9 parameters weighs about 60 MiB.
const MAX_WEIGHT: usize = 256 << 20;
/// What one value (a scalar, a key, a list or a mapping) weighs.
const VALUE_WEIGHT: usize = 32;
/// The deepest nesting of lists and mappings.
const MAX_DEPTH: usize = 64;

enum Frame {
    Seq(usize, Vec<Param>),
    Map(usize, Vec<(String, Param)>, Option<String>),
}

/// What a value costs: its weight, and how many lists or mappings deep
/// it nests (0 for a scalar). An alias copies both.
#[derive(Clone, Copy)]
struct Shape {
    weight: usize,
    height: usize,
}

const SCALAR: Shape = Shape {
    weight: VALUE_WEIGHT,
    height: 0,
};

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Param>,
    /// Each anchor's value, and its shape.
    anchors: HashMap<usize, (Param, Shape)>,
    /// The weight of all made so far, aliases counted at their full weight.
    weight: usize,
    /// Each open list or mapping's shape so far: itself and all it holds.
    open: Vec<Shape>,
    error: Option<YamlError>,
}

impl Builder {
    /// Counts `w` more weight, and whether the budget still holds.
    fn count(&mut self, w: usize) -> bool {
        self.weight = self.weight.saturating_add(w);
        if self.weight > MAX_WEIGHT {
            self.error = Some(YamlError::TooLarge);
        }
        self.error.is_none()
    }

    /// Counts a value of shape `s` that goes into what is open, and
    /// whether the budget still holds.
    fn add(&mut self, s: Shape) -> bool {
        if let Some(open) = self.open.last_mut() {
            open.weight = open.weight.saturating_add(s.weight);
            open.height = open.height.max(s.height);
        }
        self.count(s.weight)
    }

    /// `v`, of shape `s`, into what is open.
    fn push_value(&mut self, v: Param, anchor: usize, s: Shape) {
        if anchor > 0 {
            self.anchors.insert(anchor, (v.clone(), s));
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(v)
                }
            }
            Some(Frame::Seq(_, items)) => items.push(v),
            Some(Frame::Map(_, entries, key)) => match key.take() {
                None => *key = Some(key_string(&v)),
                Some(k) => {
                    // PyYAML: a repeated key keeps its last value.
                    if let Some(e) = entries.iter_mut().find(|(n, _)| *n == k) {
                        e.1 = v;
                    } else {
                        entries.push((k, v));
                    }
                }
            },
        }
    }
}

/// Mapping keys become strings (Python would keep an int key as an int;
/// notebook parameters are names, so they are strings anyway).
fn key_string(v: &Param) -> String {
    match v {
        Param::Str(s) => s.clone(),
        Param::None => "None".into(),
        Param::Bool(b) => if *b { "True" } else { "False" }.into(),
        Param::Int(i) => i.to_string(),
        Param::Float(f) => f.to_string(),
        other => format!("{other:?}"),
    }
}

impl Builder {
    /// A list or mapping begins: its own weight, and what it will hold.
    fn open(&mut self, frame: Frame) {
        if self.count(VALUE_WEIGHT) {
            self.stack.push(frame);
            self.open.push(SCALAR);
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, _mark: Marker) {
        if self.error.is_some() {
            return;
        }
        match ev {
            Event::Scalar(value, style, anchor, tag) => match scalar(&value, style, tag.as_ref()) {
                Ok(v) => {
                    let s = Shape {
                        weight: VALUE_WEIGHT + value.len(),
                        height: 0,
                    };
                    if self.add(s) {
                        self.push_value(v, anchor, s)
                    }
                }
                Err(e) => self.error = Some(e),
            },
            Event::Alias(id) => {
                let s = self.anchors.get(&id).map_or(SCALAR, |(_, s)| *s);
                // an alias nests what it names where it stands
                if self.stack.len() + s.height > MAX_DEPTH {
                    self.error = Some(YamlError::TooDeep);
                // counted before it is copied: the copy is what fills memory
                } else if self.add(s) {
                    let v = self
                        .anchors
                        .get(&id)
                        .map_or(Param::None, |(v, _)| v.clone());
                    self.push_value(v, 0, s);
                }
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if self.stack.len() >= MAX_DEPTH => {
                self.error = Some(YamlError::TooDeep)
            }
            Event::SequenceStart(anchor, _) => self.open(Frame::Seq(anchor, vec![])),
            Event::MappingStart(anchor, _) => self.open(Frame::Map(anchor, vec![], None)),
            Event::SequenceEnd | Event::MappingEnd => {
                let (anchor, v) = match self.stack.pop() {
                    Some(Frame::Seq(a, items)) => (a, Param::List(items)),
                    Some(Frame::Map(a, entries, _)) => (a, Param::Dict(entries)),
                    None => return,
                };
                // what it holds weighs in the list or mapping that holds it
                let mut s = self.open.pop().unwrap_or(SCALAR);
                s.height += 1;
                if let Some(open) = self.open.last_mut() {
                    open.weight = open.weight.saturating_add(s.weight);
                    open.height = open.height.max(s.height);
                }
                self.push_value(v, anchor, s);
            }
            _ => {}
        }
    }
}

/// Parses one YAML document into a value (an empty document is `None`).
pub fn parse(text: &str) -> Result<Param, YamlError> {
    let mut b = Builder::default();
    let mut parser = Parser::new_from_str(text);
    // The events one at a time, up to the first document's end:
    // yaml-rust2's own `load` recurses once per level of nesting, and a
    // deep file overflowed its stack before the builder could refuse it.
    loop {
        let (ev, mark) = parser
            .next_token()
            .map_err(|e| YamlError::Syntax(e.to_string()))?;
        if matches!(ev, Event::DocumentEnd | Event::StreamEnd) {
            break;
        }
        b.on_event(ev, mark);
        if let Some(e) = b.error.take() {
            return Err(e);
        }
    }
    Ok(b.root.unwrap_or(Param::None))
}

fn scalar(v: &str, style: TScalarStyle, tag: Option<&Tag>) -> Result<Param, YamlError> {
    if let Some(tag) = tag {
        if tag.handle == "!!" || tag.handle == "tag:yaml.org,2002:" {
            let bad = || YamlError::BadValue(v.to_string());
            return match tag.suffix.as_str() {
                "str" => Ok(Param::Str(v.into())),
                "int" => py_int(v).map(Param::Int).ok_or_else(bad),
                "float" => py_float(v)
                    .or_else(|| py_int(v).map(|i| i as f64))
                    .map(Param::Float)
                    .ok_or_else(bad),
                "bool" => py_bool(v).map(Param::Bool).ok_or_else(bad),
                "null" => Ok(Param::None),
                other => Err(YamlError::Tag(other.into())),
            };
        }
        return Err(YamlError::Tag(format!("{}{}", tag.handle, tag.suffix)));
    }
    if style != TScalarStyle::Plain {
        return Ok(Param::Str(v.into()));
    }
    Ok(resolve_plain(v))
}

/// PyYAML's implicit resolvers for a plain scalar (no timestamps).
pub fn resolve_plain(v: &str) -> Param {
    if matches!(v, "" | "~" | "null" | "Null" | "NULL") {
        return Param::None;
    }
    if let Some(b) = py_bool(v) {
        return Param::Bool(b);
    }
    if let Some(i) = py_int(v) {
        return Param::Int(i);
    }
    if let Some(f) = py_float(v) {
        return Param::Float(f);
    }
    Param::Str(v.into())
}

fn py_bool(v: &str) -> Option<bool> {
    match v {
        "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => Some(true),
        "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

fn split_sign(v: &str) -> (i64, &str) {
    match v.as_bytes().first() {
        Some(b'-') => (-1, &v[1..]),
        Some(b'+') => (1, &v[1..]),
        _ => (1, v),
    }
}

fn all(s: &str, f: impl Fn(u8) -> bool) -> bool {
    !s.is_empty() && s.bytes().all(f)
}

/// PyYAML 1.1 ints: `0b…`, `0…` octal, decimal, `0x…`, sexagesimal `1:30`,
/// with `_` allowed between digits.
fn py_int(v: &str) -> Option<i64> {
    let (sign, rest) = split_sign(v);
    let clean: String = rest.chars().filter(|c| *c != '_').collect();
    let n = if let Some(b) = rest.strip_prefix("0b") {
        if !all(b, |c| c == b'0' || c == b'1' || c == b'_') {
            return None;
        }
        i64::from_str_radix(&clean[2..], 2).ok()?
    } else if let Some(h) = rest.strip_prefix("0x") {
        if !all(h, |c| c.is_ascii_hexdigit() || c == b'_') {
            return None;
        }
        i64::from_str_radix(&clean[2..], 16).ok()?
    } else if rest == "0" {
        0
    } else if let Some(oct) = rest.strip_prefix('0') {
        if !all(oct, |c| (b'0'..=b'7').contains(&c) || c == b'_') {
            return None;
        }
        i64::from_str_radix(&clean[1..], 8).ok()?
    } else if rest.contains(':') {
        let mut parts = rest.split(':');
        let first = parts.next()?;
        if !first.starts_with(|c: char| ('1'..='9').contains(&c))
            || !all(first, |c| c.is_ascii_digit() || c == b'_')
        {
            return None;
        }
        let mut n: i64 = first.replace('_', "").parse().ok()?;
        for p in parts {
            if p.is_empty() || p.len() > 2 || !all(p, |c| c.is_ascii_digit()) {
                return None;
            }
            let d: i64 = p.parse().ok()?;
            if d > 59 {
                return None;
            }
            n = n.checked_mul(60)?.checked_add(d)?;
        }
        n
    } else {
        if !rest.starts_with(|c: char| ('1'..='9').contains(&c))
            || !all(rest, |c| c.is_ascii_digit() || c == b'_')
        {
            return None;
        }
        clean.parse().ok()?
    };
    Some(sign * n)
}

/// PyYAML 1.1 floats: a dot is required (`1e3` is a string), an exponent
/// needs its sign, `.inf`, `.nan`, sexagesimal `1:30.5`.
fn py_float(v: &str) -> Option<f64> {
    let (sign, rest) = split_sign(v);
    let sign = sign as f64;
    match rest {
        ".inf" | ".Inf" | ".INF" => return Some(sign * f64::INFINITY),
        ".nan" | ".NaN" | ".NAN" if v == rest => return Some(f64::NAN),
        _ => {}
    }
    if rest.contains(':') {
        let (whole, frac) = rest.rsplit_once('.')?;
        let mut parts = whole.split(':');
        let first = parts.next()?;
        if !all(first, |c| c.is_ascii_digit() || c == b'_') {
            return None;
        }
        let mut n: f64 = first.replace('_', "").parse().ok()?;
        for p in parts {
            if p.is_empty() || p.len() > 2 || !all(p, |c| c.is_ascii_digit()) {
                return None;
            }
            n = n * 60.0 + p.parse::<f64>().ok()?;
        }
        let frac_v: f64 = format!("0.{}", frac.replace('_', "")).parse().ok()?;
        return Some(sign * (n + frac_v));
    }
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (int_part, frac_part) = mantissa.split_once('.')?;
    if !int_part.is_empty() && !all(int_part, |c| c.is_ascii_digit() || c == b'_') {
        return None;
    }
    if !int_part.is_empty() && int_part.starts_with('_') {
        return None;
    }
    if int_part.is_empty() && (frac_part.is_empty() || v != rest) {
        // `.5` is a float only without a sign; `.` alone is not.
        return None;
    }
    if !frac_part.is_empty() && !all(frac_part, |c| c.is_ascii_digit() || c == b'_') {
        return None;
    }
    if let Some(e) = exp {
        let digits = e.strip_prefix(['+', '-'])?;
        if !all(digits, |c| c.is_ascii_digit()) {
            return None;
        }
    }
    let clean: String = rest.chars().filter(|c| *c != '_').collect();
    let clean = if clean.starts_with('.') {
        format!("0{clean}")
    } else {
        clean
    };
    let clean = clean.replace(".e", ".0e").replace(".E", ".0E");
    let clean = clean.strip_suffix('.').map(str::to_string).unwrap_or(clean);
    Some(sign * clean.parse::<f64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Param {
        parse(s).unwrap()
    }

    /// A few lines whose aliases name aliases ("billion laughs") are
    /// refused before they are copied out, and so is a nesting too deep
    /// to read and write back without overflowing the stack.
    #[test]
    fn aliases_that_multiply_and_deep_nesting_are_refused() {
        let mut laughs = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (n, prev) in ["b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .zip(["a", "b", "c", "d", "e", "f", "g"])
        {
            let row = vec![format!("*{prev}"); 10].join(", ");
            laughs.push_str(&format!("{n}: &{n} [{row}]\n"));
        }
        assert!(matches!(parse(&laughs), Err(YamlError::TooLarge)));
        // nested: an anchor on [[…]] weighs what its inner list holds
        let mut nested = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (n, prev) in ["b", "c", "d", "e", "f", "g", "h", "i"]
            .iter()
            .zip(["a", "b", "c", "d", "e", "f", "g", "h"])
        {
            let row = vec![format!("*{prev}"); 10].join(", ");
            nested.push_str(&format!("{n}: &{n} [[{row}]]\n"));
        }
        assert!(matches!(parse(&nested), Err(YamlError::TooLarge)));
        // one long text, aliased: its length weighs at every copy
        let mut long = format!("a: &a {}\n", "x".repeat(100_000));
        for (n, prev) in ["b", "c", "d", "e"].iter().zip(["a", "b", "c", "d"]) {
            let row = vec![format!("*{prev}"); 10].join(", ");
            long.push_str(&format!("{n}: &{n} [{row}]\n"));
        }
        assert!(matches!(parse(&long), Err(YamlError::TooLarge)));
        // aliases that stay small are read as before
        let small = parse("a: &a [1, 2]\nb: [*a, *a]\n").unwrap();
        let want = Param::List(vec![Param::Int(1), Param::Int(2)]);
        assert_eq!(
            small,
            Param::Dict(vec![
                ("a".into(), want.clone()),
                ("b".into(), Param::List(vec![want.clone(), want]))
            ])
        );
        let deep = "- ".repeat(100_000) + "x\n";
        assert!(matches!(parse(&deep), Err(YamlError::TooDeep)));
        let flow = "[".repeat(100_000);
        assert!(parse(&flow).is_err());
        assert!(parse(&("- ".repeat(MAX_DEPTH) + "x\n")).is_ok());
        // aliases of aliases, each nesting the last a level deeper
        let mut chain = String::from("a0: &a0 [x]\n");
        for i in 1..200 {
            chain.push_str(&format!("a{i}: &a{i} [[*a{}]]\n", i - 1));
        }
        assert!(matches!(parse(&chain), Err(YamlError::TooDeep)));
    }

    /// A large sweep a user may well write: 100,000 points of 9 parameters.
    #[test]
    fn a_large_legitimate_points_file_is_read() {
        let point = "  - {alpha: 0.5, beta: 12, gamma: x, delta: true, eps: 1e-3, zeta: 7, eta: abc, theta: 0, iota: 9}\n";
        let text = format!("points:\n{}", point.repeat(100_000));
        let Param::Dict(top) = parse(&text).unwrap() else {
            panic!("not a mapping")
        };
        let Param::List(points) = &top[0].1 else {
            panic!("not a list")
        };
        assert_eq!(points.len(), 100_000);
    }

    #[test]
    fn pyyaml_scalars() {
        assert_eq!(one("yes"), Param::Bool(true));
        assert_eq!(one("Off"), Param::Bool(false));
        assert_eq!(one("'yes'"), Param::Str("yes".into()));
        assert_eq!(one("~"), Param::None);
        assert_eq!(one("null"), Param::None);
        assert_eq!(one("010"), Param::Int(8));
        assert_eq!(one("0x1f"), Param::Int(31));
        assert_eq!(one("0b101"), Param::Int(5));
        assert_eq!(one("1_000"), Param::Int(1000));
        assert_eq!(one("-3"), Param::Int(-3));
        assert_eq!(one("1:30"), Param::Int(90));
        assert_eq!(one("1e3"), Param::Str("1e3".into()));
        assert_eq!(one("1.0e+3"), Param::Float(1000.0));
        assert_eq!(one("1.5"), Param::Float(1.5));
        assert_eq!(one("1."), Param::Float(1.0));
        assert_eq!(one(".5"), Param::Float(0.5));
        assert_eq!(one("-.inf"), Param::Float(f64::NEG_INFINITY));
        assert!(matches!(one(".nan"), Param::Float(f) if f.is_nan()));
        assert_eq!(one("2024-01-02"), Param::Str("2024-01-02".into()));
        assert_eq!(one("!!str 12"), Param::Str("12".into()));
        assert_eq!(one("!!float 12"), Param::Float(12.0));
        assert_eq!(one("hello world"), Param::Str("hello world".into()));
        assert_eq!(one(""), Param::None);
    }

    #[test]
    fn structures_keep_order_and_aliases() {
        let v = one("b: [1, two, {c: off}]\na: &x 3\nd: *x\n");
        assert_eq!(
            v,
            Param::Dict(vec![
                (
                    "b".into(),
                    Param::List(vec![
                        Param::Int(1),
                        Param::Str("two".into()),
                        Param::Dict(vec![("c".into(), Param::Bool(false))])
                    ])
                ),
                ("a".into(), Param::Int(3)),
                ("d".into(), Param::Int(3)),
            ])
        );
    }

    #[test]
    fn errors_are_reported() {
        assert!(parse("a: [1, 2").is_err());
        assert!(parse("!!binary aGk=").is_err());
        assert!(parse("!!int abc").is_err());
    }
}
