//! Old notebooks made current, the way `nbformat.v4.upgrade` does it.
//!
//! nbformat 3 had worksheets, `input`/`prompt_number`, heading cells and
//! v3 output shapes (`pyout`, `pyerr`, mime keys like `png` at the top of
//! an output). This works on the raw JSON, before the typed model, and
//! moves every field nbformat moves; anything else on a cell or output
//! stays where it was. nbformat 4.0–4.4 files only need cell ids, which
//! [`noyau_notebook::Notebook::upgrade_minor`] gives.

use serde_json::{Map, Value};

const MIME_MAP: [(&str, &str); 8] = [
    ("text", "text/plain"),
    ("html", "text/html"),
    ("svg", "image/svg+xml"),
    ("png", "image/png"),
    ("jpeg", "image/jpeg"),
    ("latex", "text/latex"),
    ("json", "application/json"),
    ("javascript", "application/javascript"),
];

fn to_mime_keys(m: &mut Map<String, Value>) {
    for (alias, mime) in MIME_MAP {
        if let Some(v) = m.remove(alias) {
            m.insert(mime.into(), v);
        }
    }
}

/// True when `v` is an nbformat 3 notebook.
pub fn is_v3(v: &Value) -> bool {
    v.get("nbformat").and_then(Value::as_u64) == Some(3)
}

/// What makes an nbformat 3 notebook unreadable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UpgradeError(&'static str);

/// Converts an nbformat 3 notebook (as JSON) to nbformat 4.5 JSON.
pub fn v3_to_v4(mut nb: Value) -> Result<Value, UpgradeError> {
    let root = nb
        .as_object_mut()
        .ok_or(UpgradeError("the top level is not an object"))?;
    let mut cells = Vec::new();
    match root.remove("worksheets") {
        Some(Value::Array(wss)) => {
            for ws in wss {
                if let Some(Value::Array(cs)) = ws.get("cells").cloned() {
                    for c in cs {
                        cells.push(upgrade_cell(c)?);
                    }
                }
            }
        }
        None => {}
        Some(_) => return Err(UpgradeError("'worksheets' must be a list")),
    }
    root.remove("orig_nbformat");
    root.remove("orig_nbformat_minor");
    let meta = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(m) = meta.as_object_mut() {
        m.remove("name");
        m.remove("signature");
    }
    root.insert("nbformat".into(), Value::from(4));
    root.insert("nbformat_minor".into(), Value::from(5));
    root.insert("cells".into(), Value::Array(cells));
    Ok(nb)
}

fn join_source(v: Option<Value>) -> String {
    match v {
        Some(Value::String(s)) => s,
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => String::new(),
    }
}

fn upgrade_cell(mut c: Value) -> Result<Value, UpgradeError> {
    let cell = c
        .as_object_mut()
        .ok_or(UpgradeError("a cell is not an object"))?;
    cell.entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    cell.insert("id".into(), Value::String(noyau_notebook::new_cell_id()));
    let ty = cell
        .get("cell_type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    match ty.as_str() {
        "code" => {
            cell.remove("language");
            if let Some(col) = cell.remove("collapsed") {
                if let Some(m) = cell.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.insert("collapsed".into(), col);
                }
            }
            let src = join_source(cell.remove("input"));
            cell.insert("source".into(), Value::String(src));
            let n = cell.remove("prompt_number").unwrap_or(Value::Null);
            cell.insert("execution_count".into(), n);
            let outs = match cell.remove("outputs") {
                Some(Value::Array(o)) => o.into_iter().map(upgrade_output).collect(),
                _ => vec![],
            };
            cell.insert("outputs".into(), Value::Array(outs));
        }
        "heading" => {
            cell.insert("cell_type".into(), "markdown".into());
            let level = cell.remove("level").and_then(|l| l.as_u64()).unwrap_or(1);
            let src = join_source(cell.remove("source"));
            let line = src.lines().collect::<Vec<_>>().join(" ");
            cell.insert(
                "source".into(),
                Value::String(format!("{} {line}", "#".repeat(level as usize))),
            );
        }
        "html" => {
            cell.insert("cell_type".into(), "markdown".into());
        }
        _ => {}
    }
    Ok(c)
}

fn upgrade_output(mut o: Value) -> Value {
    let Some(out) = o.as_object_mut() else {
        return o;
    };
    let ty = out
        .get("output_type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    match ty.as_str() {
        "pyout" | "display_data" => {
            out.entry("metadata")
                .or_insert_with(|| Value::Object(Map::new()));
            if ty == "pyout" {
                out.insert("output_type".into(), "execute_result".into());
                let n = out.remove("prompt_number").unwrap_or(Value::Null);
                out.insert("execution_count".into(), n);
            }
            let keys: Vec<String> = out
                .keys()
                .filter(|k| !matches!(k.as_str(), "output_type" | "execution_count" | "metadata"))
                .cloned()
                .collect();
            let mut data = Map::new();
            for k in keys {
                if let Some(v) = out.remove(&k) {
                    data.insert(k, v);
                }
            }
            to_mime_keys(&mut data);
            if let Some(Value::String(j)) = data.get("application/json") {
                if let Ok(parsed) = serde_json::from_str::<Value>(j) {
                    data.insert("application/json".into(), parsed);
                }
            }
            out.insert("data".into(), Value::Object(data));
            if let Some(m) = out.get_mut("metadata").and_then(Value::as_object_mut) {
                to_mime_keys(m);
            }
        }
        "pyerr" => {
            out.insert("output_type".into(), "error".into());
        }
        "stream" => {
            let name = out.remove("stream").unwrap_or_else(|| "stdout".into());
            out.insert("name".into(), name);
        }
        _ => {}
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn v3_becomes_v4() {
        let v3 = json!({
            "nbformat": 3, "nbformat_minor": 0,
            "metadata": {"name": "x", "custom": 1},
            "worksheets": [{"cells": [
                {"cell_type": "heading", "level": 2, "source": "Title\nmore", "metadata": {}},
                {"cell_type": "code", "language": "python", "collapsed": false,
                 "input": ["print(1)\n", "2"], "prompt_number": 3, "x-keep": true,
                 "outputs": [
                    {"output_type": "stream", "stream": "stdout", "text": "1\n"},
                    {"output_type": "pyout", "prompt_number": 3, "text": "2", "png": "AAA", "metadata": {}},
                    {"output_type": "pyerr", "ename": "E", "evalue": "v", "traceback": []}
                 ]}
            ]}]
        });
        let v4 = v3_to_v4(v3).unwrap();
        assert_eq!(v4["nbformat"], 4);
        assert_eq!(v4["metadata"], json!({"custom": 1}));
        let cells = v4["cells"].as_array().unwrap();
        assert_eq!(cells[0]["cell_type"], "markdown");
        assert_eq!(cells[0]["source"], "## Title more");
        let c = &cells[1];
        assert_eq!(c["source"], "print(1)\n2");
        assert_eq!(c["execution_count"], 3);
        assert_eq!(c["metadata"]["collapsed"], false);
        assert_eq!(c["x-keep"], true);
        assert_eq!(c["outputs"][0]["name"], "stdout");
        assert_eq!(c["outputs"][1]["output_type"], "execute_result");
        assert_eq!(c["outputs"][1]["data"]["image/png"], "AAA");
        assert_eq!(c["outputs"][1]["data"]["text/plain"], "2");
        assert_eq!(c["outputs"][2]["output_type"], "error");
        noyau_notebook::Notebook::from_value(v4).unwrap();
    }
}
