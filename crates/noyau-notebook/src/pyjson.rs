//! JSON text laid out exactly like Python's `json.dumps(obj, indent=1,
//! sort_keys=True, separators=(",", ": "), ensure_ascii=False)`, which is what
//! nbformat's writer calls, plus Python's `repr(float)` and `str.splitlines`.

use serde_json::{Map, Value};

/// Python's `repr(float)` for a finite or non-finite `f64`
/// (`1.0`, `1e+16`, `1.5e-07`, `inf`, `-inf`, `nan`).
pub(crate) fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, like Python's repr.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if f < 0.0 { "-" } else { "" };
    if !(-4..16).contains(&exp) {
        let mut m = String::new();
        m.push_str(&digits[..1]);
        if digits.len() > 1 {
            m.push('.');
            m.push_str(&digits[1..]);
        }
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{m}e{esign}{:02}", exp.abs());
    }
    let n = digits.len() as i32;
    let body = if exp < 0 {
        format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
    } else if exp + 1 >= n {
        format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
    } else {
        let (a, b) = digits.split_at((exp + 1) as usize);
        format!("{a}.{b}")
    };
    format!("{sign}{body}")
}

/// Python's `str.splitlines(keepends=True)`.
pub(crate) fn splitlines_keepends(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut iter = s.char_indices().peekable();
    while let Some((i, c)) = iter.next() {
        let end = match c {
            '\r' => {
                if let Some((j, '\n')) = iter.peek().copied() {
                    iter.next();
                    j + 1
                } else {
                    i + 1
                }
            }
            '\n' | '\x0b' | '\x0c' | '\x1c' | '\x1d' | '\x1e' | '\u{85}' | '\u{2028}'
            | '\u{2029}' => i + c.len_utf8(),
            _ => continue,
        };
        out.push(&s[start..end]);
        start = end;
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

pub(crate) fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Writes one value at the given depth.
pub(crate) type Writer<'a> = Box<dyn Fn(&mut String, usize) + 'a>;

pub(crate) fn newline(out: &mut String, indent: usize) {
    out.push('\n');
    for _ in 0..indent {
        out.push(' ');
    }
}

/// Serialises any JSON value; `indent` is the current nesting depth.
pub(crate) fn write_value(out: &mut String, v: &Value, indent: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.is_finite() {
                    out.push_str(&py_float_repr(f));
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else if f > 0.0 {
                    out.push_str("Infinity");
                } else {
                    out.push_str("-Infinity");
                }
            }
        }
        Value::String(s) => write_str(out, s),
        Value::Array(a) => write_array(out, a.iter(), indent, |out, v, ind| {
            write_value(out, v, ind)
        }),
        Value::Object(m) => write_object(out, m, indent),
    }
}

pub(crate) fn write_array<'a, T: 'a>(
    out: &mut String,
    items: impl ExactSizeIterator<Item = T>,
    indent: usize,
    mut each: impl FnMut(&mut String, T, usize),
) {
    if items.len() == 0 {
        out.push_str("[]");
        return;
    }
    out.push('[');
    for (i, v) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        newline(out, indent + 1);
        each(out, v, indent + 1);
    }
    newline(out, indent);
    out.push(']');
}

/// Writes an object whose entries are given as (key, writer) pairs; sorts them
/// by key like `sort_keys=True` (code point order = UTF-8 byte order).
pub(crate) fn write_entries<'a>(
    out: &mut String,
    mut entries: Vec<(&'a str, Writer<'a>)>,
    indent: usize,
) {
    if entries.is_empty() {
        out.push_str("{}");
        return;
    }
    entries.sort_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (k, w)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        newline(out, indent + 1);
        write_str(out, k);
        out.push_str(": ");
        w(out, indent + 1);
    }
    newline(out, indent);
    out.push('}');
}

pub(crate) fn write_object(out: &mut String, m: &Map<String, Value>, indent: usize) {
    if m.is_empty() {
        out.push_str("{}");
        return;
    }
    let mut keys: Vec<(&String, &Value)> = m.iter().collect();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (k, v)) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        newline(out, indent + 1);
        write_str(out, k);
        out.push_str(": ");
        write_value(out, v, indent + 1);
    }
    newline(out, indent);
    out.push('}');
}

/// A string written as nbformat's `split_lines` does: a list of lines.
pub(crate) fn write_split_str(out: &mut String, s: &str, indent: usize) {
    let lines = splitlines_keepends(s);
    write_array(out, lines.into_iter(), indent, |out, l, _| {
        write_str(out, l)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345.0, "123456789012345.0"),
            (1234567890123456.0, "1234567890123456.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e100, "1e+100"),
            (2.71, "2.71"),
            (100.0, "100.0"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (f64::NAN, "nan"),
            (-0.0, "-0.0"),
            (1e22, "1e+22"),
            (123.456, "123.456"),
        ];
        for (f, want) in cases {
            assert_eq!(py_float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn splitlines_matches_python() {
        assert_eq!(splitlines_keepends(""), Vec::<&str>::new());
        assert_eq!(splitlines_keepends("a\nb"), vec!["a\n", "b"]);
        assert_eq!(splitlines_keepends("a\n"), vec!["a\n"]);
        assert_eq!(
            splitlines_keepends("a\r\nb\rc\x0bd\u{2028}e"),
            vec!["a\r\n", "b\r", "c\x0b", "d\u{2028}", "e"]
        );
        assert_eq!(splitlines_keepends("\n\n"), vec!["\n", "\n"]);
    }

    #[test]
    fn layout_matches_python_json() {
        let v: Value = serde_json::from_str(
            r#"{"b": [1, {"z": null, "a": "é\u0001\"\\"}], "a": {}, "c": [], "d": 2.0}"#,
        )
        .unwrap();
        let mut s = String::new();
        write_value(&mut s, &v, 0);
        assert_eq!(
            s,
            "{\n \"a\": {},\n \"b\": [\n  1,\n  {\n   \"a\": \"é\\u0001\\\"\\\\\",\n   \"z\": null\n  }\n ],\n \"c\": [],\n \"d\": 2.0\n}"
        );
    }
}
