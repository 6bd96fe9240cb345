//! papermill-compatible parameters: values, typing of command-line strings,
//! translation into Python / R / Julia / bash source, and injection of the
//! `injected-parameters` cell.
//!
//! The generated source is papermill's (`papermill/translators.py`) byte for
//! byte for Python (papermill without `black` installed), and for R, Julia and
//! bash except where papermill emits code that is wrong in the target
//! language:
//! - R and Julia: characters U+0080..U+00FF are written `\u00e9`, not
//!   papermill's `\xe9` (a raw byte there, not the character); non-finite
//!   floats are `Inf`, `-Inf`, `NaN` rather than `inf`/`nan`.
//! - Julia: `$` in strings is escaped (`\$`), else Julia would interpolate.
//! - R: a NUL character is an error (R strings cannot hold it).
//! - bash: dicts and nested lists are an error naming the parameter
//!   (papermill raises `NotImplementedError` for dicts).

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::notebook::{new_cell_id, Cell, Notebook};
use crate::pyjson::py_float_repr;

/// A parameter value: what YAML, JSON or a command-line string can give.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Param>),
    /// Entries in their given order.
    Dict(Vec<(String, Param)>),
}

/// Why parameters could not be made into code or injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error(
        "no parameter translator for kernel '{kernel}' or language '{language}'; \
         supported languages: python, R, julia, bash"
    )]
    UnknownLanguage { kernel: String, language: String },
    #[error("parameter '{name}': {problem}")]
    Unsupported { name: String, problem: String },
    #[error("parameters must be a mapping of names to values, got {0}")]
    NotAMapping(String),
    /// A name that is not a plain identifier: the parameters cell writes
    /// `NAME = VALUE`, and anything else in NAME would be code.
    #[error(
        "parameter name {0:?} is not a plain identifier (letters, digits and `_`, not starting \
         with a digit; `.` too for R): rename it"
    )]
    BadName(String),
    /// In bash an upper-case name is the shell's or the environment's
    /// (`PATH`, `PROMPT_COMMAND`, `LD_PRELOAD`): setting it runs code;
    /// `https_proxy` would send the notebook's traffic elsewhere.
    #[error(
        "parameter name {0:?} is a shell or environment variable in bash (an upper-case name: \
         PATH, PROMPT_COMMAND, LD_PRELOAD…; or a proxy's, https_proxy), which a parameter \
         must not set: name it otherwise"
    )]
    ShellName(String),
}

/// Refuses a parameter name that is not an identifier in any of the
/// languages (letters, digits, `_` and, for R's `my.param`, `.`; not
/// starting with a digit or `.`): a name is written as code, unquoted,
/// and a sweep file or parameters file may come from someone else.
pub fn check_name(name: &str) -> Result<(), ParamError> {
    let mut chars = name.chars();
    let first = chars.next().is_some_and(|c| c.is_alphabetic() || c == '_');
    match first && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '.') {
        true => Ok(()),
        false => Err(ParamError::BadName(name.into())),
    }
}

/// papermill's `_is_int`: Python's `int(str)` grammar (surrounding
/// whitespace, a sign, digits with single `_` between digits).
fn py_int(s: &str) -> Option<i64> {
    let t = s.trim();
    let (sign, digits) = match t.as_bytes().first() {
        Some(b'+') | Some(b'-') => t.split_at(1),
        _ => ("", t),
    };
    let clean = strip_underscores(digits)?;
    if clean.is_empty() || !clean.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    format!("{sign}{clean}").parse().ok()
}

/// Removes `_` that stand between two ASCII digits; `None` if any other `_`.
fn strip_underscores(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    for (i, &c) in b.iter().enumerate() {
        if c == b'_' {
            let ok = i > 0
                && b[i - 1].is_ascii_digit()
                && b.get(i + 1).is_some_and(|n| n.is_ascii_digit());
            if !ok {
                return None;
            }
        } else {
            out.push(c as char);
        }
    }
    Some(out)
}

/// papermill's `_is_float`: Python's `float(str)` grammar.
fn py_float(s: &str) -> Option<f64> {
    let t = s.trim();
    if !t.is_ascii() || t.is_empty() {
        return None;
    }
    let clean = strip_underscores(t)?;
    // Rust accepts the same decimal / inf / infinity / nan spellings as Python
    // (case-insensitive, signed) once underscores are gone.
    clean.parse::<f64>().ok()
}

impl Param {
    /// Types a command-line value like papermill's `-p NAME VALUE`:
    /// `True`/`true`, `False`/`false`, `None`/`null`, then an int, then a
    /// float, else the string itself. (papermill knows only the capitalised
    /// spellings; integers beyond 64 bits become floats here.)
    pub fn from_cli(s: &str) -> Param {
        match s {
            "True" | "true" => Param::Bool(true),
            "False" | "false" => Param::Bool(false),
            "None" | "null" => Param::None,
            _ => {
                if let Some(i) = py_int(s) {
                    Param::Int(i)
                } else if let Some(f) = py_float(s) {
                    Param::Float(f)
                } else {
                    Param::Str(s.to_string())
                }
            }
        }
    }

    /// `-r NAME VALUE`: the string as given.
    pub fn raw(s: &str) -> Param {
        Param::Str(s.to_string())
    }

    /// From a JSON value (integers beyond 64 bits become floats).
    pub fn from_json(v: &Value) -> Param {
        match v {
            Value::Null => Param::None,
            Value::Bool(b) => Param::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Param::Int(i),
                None => Param::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Param::Str(s.clone()),
            Value::Array(a) => Param::List(a.iter().map(Param::from_json).collect()),
            Value::Object(m) => Param::Dict(
                m.iter()
                    .map(|(k, v)| (k.clone(), Param::from_json(v)))
                    .collect(),
            ),
        }
    }

    /// As JSON (for `metadata.papermill.parameters`). JSON has no infinity or
    /// NaN: those are written as the strings `"inf"`, `"-inf"`, `"nan"`.
    pub fn to_json(&self) -> Value {
        match self {
            Param::None => Value::Null,
            Param::Bool(b) => Value::Bool(*b),
            Param::Int(i) => Value::from(*i),
            Param::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(py_float_repr(*f))),
            Param::Str(s) => Value::String(s.clone()),
            Param::List(l) => Value::Array(l.iter().map(Param::to_json).collect()),
            Param::Dict(d) => {
                Value::Object(d.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
        }
    }

    /// Python's `str()` of a scalar, for YAML keys that are not strings.
    fn key_string(self) -> String {
        match self {
            Param::None => "None".into(),
            Param::Bool(true) => "True".into(),
            Param::Bool(false) => "False".into(),
            Param::Int(i) => i.to_string(),
            Param::Float(f) => py_float_repr(f),
            Param::Str(s) => s,
            other => format!("{other:?}"),
        }
    }
}

struct ParamVisitor;

impl<'de> Visitor<'de> for ParamVisitor {
    type Value = Param;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a parameter value")
    }
    fn visit_unit<E>(self) -> Result<Param, E> {
        Ok(Param::None)
    }
    fn visit_none<E>(self) -> Result<Param, E> {
        Ok(Param::None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Param, D::Error> {
        Param::deserialize(d)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Param, E> {
        Ok(Param::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<Param, E> {
        Ok(Param::Int(i))
    }
    fn visit_u64<E>(self, u: u64) -> Result<Param, E> {
        Ok(i64::try_from(u)
            .map(Param::Int)
            .unwrap_or(Param::Float(u as f64)))
    }
    fn visit_f64<E>(self, f: f64) -> Result<Param, E> {
        Ok(Param::Float(f))
    }
    fn visit_str<E>(self, s: &str) -> Result<Param, E> {
        Ok(Param::Str(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Param, E> {
        Ok(Param::Str(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Param, A::Error> {
        let mut v = Vec::new();
        while let Some(p) = seq.next_element()? {
            v.push(p);
        }
        Ok(Param::List(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Param, A::Error> {
        let mut v: Vec<(String, Param)> = Vec::new();
        while let Some((k, val)) = map.next_entry::<Param, Param>()? {
            set_entry(&mut v, k.key_string(), val);
        }
        Ok(Param::Dict(v))
    }
}

/// Any serde format (JSON, YAML through the caller's YAML crate) gives a `Param`.
impl<'de> Deserialize<'de> for Param {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Param, D::Error> {
        d.deserialize_any(ParamVisitor)
    }
}

/// Python `dict` assignment: an existing key keeps its place.
fn set_entry(v: &mut Vec<(String, Param)>, k: String, val: Param) {
    match v.iter_mut().find(|(n, _)| *n == k) {
        Some(slot) => slot.1 = val,
        None => v.push((k, val)),
    }
}

/// Ordered parameters, merged like papermill merges `-f`, `-y`, `-p`, `-r`
/// (Python `dict.update`: a name given again keeps its first position).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parameters {
    items: Vec<(String, Param)>,
}

impl Parameters {
    pub fn new() -> Parameters {
        Parameters::default()
    }

    pub fn set(&mut self, name: impl Into<String>, value: Param) {
        set_entry(&mut self.items, name.into(), value);
    }

    /// Merges a mapping (`-f file.yaml`, `-y YAML` once parsed). A null or
    /// empty document adds nothing, like papermill's `... or {}`.
    pub fn merge(&mut self, mapping: Param) -> Result<(), ParamError> {
        match mapping {
            Param::None => Ok(()),
            Param::Dict(d) => {
                // all or nothing: no name set when one is refused
                d.iter().try_for_each(|(k, _)| check_name(k))?;
                for (k, v) in d {
                    self.set(k, v);
                }
                Ok(())
            }
            other => Err(ParamError::NotAMapping(format!("{other:?}"))),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Param> {
        self.items.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Param)> {
        self.items.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// As a JSON object (for `metadata.papermill.parameters`).
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.items
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect::<Map<_, _>>(),
        )
    }
}

/// A language parameters can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    Python,
    R,
    Julia,
    Bash,
}

impl Language {
    /// A kernel or language name papermill registers a translator under
    /// (`python`, `R`, `julia`, `bash`, `pysparkkernel`, `sparkrkernel`),
    /// case-insensitively.
    pub fn from_name(name: &str) -> Option<Language> {
        match name.to_ascii_lowercase().as_str() {
            "python" | "pysparkkernel" => Some(Language::Python),
            "r" | "sparkrkernel" => Some(Language::R),
            "julia" => Some(Language::Julia),
            "bash" => Some(Language::Bash),
            _ => None,
        }
    }

    /// papermill's `find_translator`: the kernel name first, then the language.
    pub fn resolve(
        kernel_name: Option<&str>,
        language: Option<&str>,
    ) -> Result<Language, ParamError> {
        kernel_name
            .and_then(Language::from_name)
            .or_else(|| language.and_then(Language::from_name))
            .ok_or_else(|| ParamError::UnknownLanguage {
                kernel: kernel_name.unwrap_or("").into(),
                language: language.unwrap_or("").into(),
            })
    }

    /// The comment line (`# Parameters`).
    pub fn comment(self, text: &str) -> String {
        format!("# {text}").trim().to_string()
    }

    /// `name` as this language reads an identifier: [`check_name`]'s
    /// rule, and `.` only in R (elsewhere it would assign to an attribute
    /// or a field of something that exists).
    fn check_name(self, name: &str) -> Result<(), ParamError> {
        check_name(name)?;
        if self != Language::R && name.contains('.') {
            return Err(ParamError::BadName(name.into()));
        }
        // and the lower-case ones the environment exports: `https_proxy`
        let shell =
            !name.chars().any(char::is_lowercase) || name.to_ascii_lowercase().ends_with("_proxy");
        match self == Language::Bash && shell {
            true => Err(ParamError::ShellName(name.into())),
            false => Ok(()),
        }
    }

    /// One assignment line, without its newline.
    pub fn assign(self, name: &str, value: &str) -> String {
        match self {
            Language::Bash => format!("{name}={value}"),
            // Leading '_' is not legal in R names: papermill drops it.
            Language::R => format!("{} = {value}", name.trim_start_matches('_')),
            _ => format!("{name} = {value}"),
        }
    }

    /// The source text of one value. `name` is only for error messages.
    pub fn translate(self, name: &str, v: &Param) -> Result<String, ParamError> {
        self.translate_at(name, v, 0)
    }

    fn translate_at(self, name: &str, v: &Param, depth: usize) -> Result<String, ParamError> {
        use Language::*;
        let unsupported = |problem: &str| ParamError::Unsupported {
            name: name.into(),
            problem: problem.into(),
        };
        Ok(match (self, v) {
            (Python, Param::None) => "None".into(),
            (R, Param::None) => "NULL".into(),
            (Julia, Param::None) => "nothing".into(),
            (Bash, Param::None) => String::new(),
            (Python, Param::Bool(b)) => if *b { "True" } else { "False" }.into(),
            (R, Param::Bool(b)) => if *b { "TRUE" } else { "FALSE" }.into(),
            (_, Param::Bool(b)) => if *b { "true" } else { "false" }.into(),
            (_, Param::Int(i)) => i.to_string(),
            (_, Param::Float(f)) if f.is_finite() => py_float_repr(*f),
            (Python, Param::Float(f)) => if f.is_nan() {
                "float('nan')"
            } else if *f < 0.0 {
                "float('-inf')"
            } else {
                "float('inf')"
            }
            .into(),
            (R | Julia, Param::Float(f)) => if f.is_nan() {
                "NaN"
            } else if *f < 0.0 {
                "-Inf"
            } else {
                "Inf"
            }
            .into(),
            (Bash, Param::Float(f)) => py_float_repr(*f),
            (Bash, Param::Str(s)) => shell_quote(s),
            (_, Param::Str(s)) => self.quote(name, s)?,
            (Bash, Param::List(items)) => {
                if depth > 0 {
                    return Err(unsupported("bash arrays cannot hold lists"));
                }
                let parts = items
                    .iter()
                    .map(|p| self.translate_at(name, p, depth + 1))
                    .collect::<Result<Vec<_>, _>>()?;
                format!("({})", parts.join(" "))
            }
            (Bash, Param::Dict(_)) => {
                return Err(unsupported("dicts cannot be expressed as bash variables"))
            }
            (_, Param::List(items)) => {
                let parts = items
                    .iter()
                    .map(|p| self.translate_at(name, p, depth + 1))
                    .collect::<Result<Vec<_>, _>>()?;
                let body = parts.join(", ");
                match self {
                    R => format!("list({body})"),
                    _ => format!("[{body}]"),
                }
            }
            (_, Param::Dict(entries)) => {
                let mut parts = Vec::with_capacity(entries.len());
                for (k, v) in entries {
                    let k = self.quote(name, k)?;
                    let v = self.translate_at(name, v, depth + 1)?;
                    parts.push(match self {
                        Python => format!("{k}: {v}"),
                        R => format!("{k} = {v}"),
                        _ => format!("{k} => {v}"),
                    });
                }
                let body = parts.join(", ");
                match self {
                    Python => format!("{{{body}}}"),
                    R => format!("list({body})"),
                    _ => format!("Dict({body})"),
                }
            }
        })
    }

    /// papermill's `translate_escaped_str`: Python's `unicode_escape` codec,
    /// then `"` → `\"`, in double quotes (with the R/Julia fixes above).
    fn quote(self, name: &str, s: &str) -> Result<String, ParamError> {
        let mut out = String::with_capacity(s.len() + 2);
        out.push('"');
        for c in s.chars() {
            let u = c as u32;
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '"' => out.push_str("\\\""),
                '$' if self == Language::Julia => out.push_str("\\$"),
                '\0' if self == Language::R => {
                    return Err(ParamError::Unsupported {
                        name: name.into(),
                        problem: "R strings cannot contain a NUL character".into(),
                    })
                }
                _ if u < 0x20 || u == 0x7f => out.push_str(&format!("\\x{u:02x}")),
                _ if u < 0x7f => out.push(c),
                _ if u <= 0xff && self == Language::Python => out.push_str(&format!("\\x{u:02x}")),
                _ if u <= 0xffff => out.push_str(&format!("\\u{u:04x}")),
                _ => out.push_str(&format!("\\U{u:08x}")),
            }
        }
        out.push('"');
        Ok(out)
    }

    /// papermill's `codify`: the comment line, then one assignment per line.
    pub fn codify(self, params: &Parameters, comment: &str) -> Result<String, ParamError> {
        let mut s = self.comment(comment);
        s.push('\n');
        for (name, v) in params.iter() {
            self.check_name(name)?;
            s.push_str(&self.assign(name, &self.translate(name, v)?));
            s.push('\n');
        }
        Ok(s)
    }
}

/// Python's `shlex.quote`.
pub fn shell_quote(s: &str) -> String {
    if s.is_empty() {
        return "''".into();
    }
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\"'\"'"))
}

/// Options of [`inject`].
#[derive(Debug, Clone)]
pub struct InjectOptions<'a> {
    /// The comment line's text; papermill's default is `Parameters`.
    pub comment: &'a str,
    /// Overrides `metadata.kernelspec.name` (`--kernel`).
    pub kernel_name: Option<&'a str>,
    /// Overrides the notebook's language.
    pub language: Option<&'a str>,
    /// papermill's report mode: `metadata.jupyter.source_hidden = true`.
    pub hide_source: bool,
}

impl Default for InjectOptions<'_> {
    fn default() -> Self {
        InjectOptions {
            comment: "Parameters",
            kernel_name: None,
            language: None,
            hide_source: false,
        }
    }
}

/// Where the parameters went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// Index of the `injected-parameters` cell.
    pub index: usize,
    /// The language the code was written in.
    pub language: Language,
    /// papermill's warning when there is no `parameters` cell (the cell then
    /// goes at the top).
    pub warning: Option<String>,
}

/// papermill's `parameterize_notebook`: writes the parameters as code in a
/// new code cell tagged `injected-parameters`, which replaces an existing
/// `injected-parameters` cell in place, else goes right after the first cell
/// tagged `parameters`, else at the top (with a warning). Like papermill it
/// upgrades the notebook to nbformat 4.5 (cell ids) and records the
/// parameters in `metadata.papermill.parameters`. On error the notebook is
/// unchanged.
pub fn inject(
    nb: &mut Notebook,
    params: &Parameters,
    opts: &InjectOptions,
) -> Result<Injected, ParamError> {
    let kernel = opts.kernel_name.or(nb.kernel_name()).map(str::to_string);
    let lang_name = opts.language.or(nb.language()).map(str::to_string);
    let language = Language::resolve(kernel.as_deref(), lang_name.as_deref())?;
    let source = language.codify(params, opts.comment)?;

    nb.upgrade_minor();
    let mut cell = Cell::new_code(&source).with_id(new_cell_id());
    cell.metadata
        .insert("tags".into(), Value::from(vec!["injected-parameters"]));
    if opts.hide_source {
        cell.metadata
            .insert("jupyter".into(), serde_json::json!({"source_hidden": true}));
    }

    let mut warning = None;
    let index = if let Some(i) = nb.first_tagged("injected-parameters") {
        nb.cells[i] = cell;
        i
    } else if let Some(i) = nb.first_tagged("parameters") {
        nb.cells.insert(i + 1, cell);
        i + 1
    } else {
        warning = Some("Input notebook does not contain a cell with tag 'parameters'".to_string());
        nb.cells.insert(0, cell);
        0
    };

    let pm = nb
        .metadata
        .entry("papermill")
        .or_insert_with(|| Value::Object(Map::new()));
    if !pm.is_object() {
        *pm = Value::Object(Map::new());
    }
    if let Some(pm) = pm.as_object_mut() {
        pm.insert("parameters".into(), params.to_json());
    }
    Ok(Injected {
        index,
        language,
        warning,
    })
}
