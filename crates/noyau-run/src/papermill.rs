//! The notebook metadata and marker cells papermill writes, so that tools
//! reading papermill's output (scrapbook, dashboards, CI checks) read ours.
//!
//! Matched against papermill 2.7 (`iorw.load_notebook_node`,
//! `engines.NotebookExecutionManager`, `execute.raise_for_execution_errors`):
//! the same keys, the same values (`pending`/`running`/`completed`/`failed`,
//! ISO timestamps with `+00:00`, durations in seconds as floats), the same
//! marker cell HTML.

use noyau_notebook::{new_cell_id, Cell, Notebook};
use serde_json::{json, Map, Value};

/// The papermill version whose metadata format this follows.
pub const PAPERMILL_FORMAT_VERSION: &str = "2.7.0";

pub const ERROR_MARKER_TAG: &str = "papermill-error-cell-tag";
const ERROR_STYLE: &str =
    "style=\"color:red; font-family:Helvetica Neue, Helvetica, Arial, sans-serif; font-size:2em;\"";

pub const PENDING: &str = "pending";
pub const RUNNING: &str = "running";
pub const COMPLETED: &str = "completed";
pub const FAILED: &str = "failed";

/// papermill's timestamps: `datetime.now(timezone.utc).isoformat()`.
pub fn now_iso() -> String {
    iso(chrono::Utc::now())
}

pub fn iso(t: chrono::DateTime<chrono::Utc>) -> String {
    use chrono::Timelike;
    if t.nanosecond() / 1000 == 0 {
        t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
    }
}

fn obj(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    v.as_object_mut().expect("made an object")
}

/// `metadata.papermill` of the notebook (made if missing).
pub fn nb_meta(nb: &mut Notebook) -> &mut Map<String, Value> {
    obj(nb
        .metadata
        .entry("papermill")
        .or_insert_with(|| Value::Object(Map::new())))
}

/// `metadata.papermill` of a cell (made if missing).
pub fn cell_meta(c: &mut Cell) -> &mut Map<String, Value> {
    obj(c
        .metadata
        .entry("papermill")
        .or_insert_with(|| Value::Object(Map::new())))
}

/// What `load_notebook_node` adds: notebook-level papermill metadata when
/// there is none, `tags: []` and `papermill: {}` on every cell.
pub fn on_load(nb: &mut Notebook) {
    if !nb.metadata.contains_key("papermill") {
        nb.metadata.insert(
            "papermill".into(),
            json!({
                "default_parameters": {},
                "parameters": {},
                "environment_variables": {},
                "version": PAPERMILL_FORMAT_VERSION,
            }),
        );
    }
    for c in &mut nb.cells {
        c.metadata
            .entry("tags")
            .or_insert_with(|| Value::Array(vec![]));
        c.metadata
            .entry("papermill")
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// `prepare_notebook_metadata` (paths as given) and `remove_error_markers`.
pub fn prepare(nb: &mut Notebook, input: &str, output: &str, report_mode: bool) {
    if report_mode {
        for c in nb.cells.iter_mut().filter(|c| c.is_code()) {
            let j = obj(c
                .metadata
                .entry("jupyter")
                .or_insert_with(|| Value::Object(Map::new())));
            j.insert("source_hidden".into(), Value::Bool(true));
        }
    }
    let m = nb_meta(nb);
    m.insert("input_path".into(), input.into());
    m.insert("output_path".into(), output.into());
    nb.cells.retain(|c| !c.has_tag(ERROR_MARKER_TAG));
}

/// `notebook_start`: run metadata reset, code cells cleared, every cell pending.
pub fn notebook_start(nb: &mut Notebook, start: &str) {
    let m = nb_meta(nb);
    m.insert("start_time".into(), start.into());
    m.insert("end_time".into(), Value::Null);
    m.insert("duration".into(), Value::Null);
    m.insert("exception".into(), Value::Null);
    for c in &mut nb.cells {
        if c.is_code() {
            c.set_execution_count(None);
            c.outputs_mut().clear();
        }
        c.metadata.insert(
            "papermill".into(),
            json!({
                "exception": null, "start_time": null, "end_time": null,
                "duration": null, "status": PENDING,
            }),
        );
    }
}

pub fn cell_start(c: &mut Cell, start: &str) {
    let m = cell_meta(c);
    m.insert("start_time".into(), start.into());
    m.insert("status".into(), RUNNING.into());
    m.insert("exception".into(), false.into());
}

pub fn cell_exception(nb: &mut Notebook, i: usize) {
    let m = cell_meta(&mut nb.cells[i]);
    m.insert("exception".into(), true.into());
    m.insert("status".into(), FAILED.into());
    nb_meta(nb).insert("exception".into(), true.into());
}

pub fn cell_complete(c: &mut Cell, start: chrono::DateTime<chrono::Utc>) {
    let end = chrono::Utc::now();
    let m = cell_meta(c);
    m.insert("end_time".into(), iso(end).into());
    m.insert("duration".into(), seconds(start, end));
    if m.get("status").and_then(Value::as_str) != Some(FAILED) {
        m.insert("status".into(), COMPLETED.into());
    }
}

pub fn seconds(a: chrono::DateTime<chrono::Utc>, b: chrono::DateTime<chrono::Utc>) -> Value {
    let us = (b - a).num_microseconds().unwrap_or(0);
    Value::from(us as f64 / 1e6)
}

/// `notebook_complete`. `mark_rest` is papermill's rule (pending cells
/// before the first failed one become completed); after a kernel death or
/// a stop the cells that did not run stay pending.
pub fn notebook_complete(nb: &mut Notebook, start: chrono::DateTime<chrono::Utc>, mark_rest: bool) {
    let end = chrono::Utc::now();
    let m = nb_meta(nb);
    m.insert("end_time".into(), iso(end).into());
    m.insert("duration".into(), seconds(start, end));
    if !mark_rest {
        return;
    }
    for c in &mut nb.cells {
        let m = cell_meta(c);
        match m.get("status").and_then(Value::as_str) {
            Some(FAILED) => break,
            Some(PENDING) => {
                m.insert("status".into(), COMPLETED.into());
            }
            _ => {}
        }
    }
}

fn marker(source: String) -> Cell {
    let mut c = Cell::new_markdown(&source).with_id(new_cell_id());
    c.metadata.insert("tags".into(), json!([ERROR_MARKER_TAG]));
    c
}

/// `raise_for_execution_errors`' two cells: an anchor before the failing
/// cell and a message at the top linking to it.
pub fn add_error_markers(nb: &mut Notebook, cell_index: usize, exec_count: Option<i64>) {
    let count = exec_count.map_or("None".to_string(), |n| n.to_string());
    let msg = format!(
        "<span {ERROR_STYLE}>An Exception was encountered at '<a href=\"#papermill-error-cell\">In [{count}]</a>'.</span>"
    );
    let anchor = format!(
        "<span id=\"papermill-error-cell\" {ERROR_STYLE}>Execution using papermill encountered an exception here and stopped:</span>"
    );
    nb.cells
        .insert(cell_index.min(nb.cells.len()), marker(anchor));
    nb.cells.insert(0, marker(msg));
}

/// A marker at the top saying the run was stopped by a signal (tagged like
/// papermill's markers, so a rerun removes it).
pub fn add_stop_marker(nb: &mut Notebook, signal: &str, at: Option<(usize, Option<i64>)>) {
    let place = match at {
        Some((i, n)) => format!(
            " while cell {} (In [{}]) was running; the cells after it did not run",
            i + 1,
            n.map_or("None".to_string(), |n| n.to_string())
        ),
        None => String::new(),
    };
    nb.cells.insert(
        0,
        marker(format!(
            "<span {ERROR_STYLE}>This run was stopped by {signal}{place}. The outputs are those saved when it stopped.</span>"
        )),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_match_papermill() {
        let mut nb = Notebook::new();
        nb.cells.push(Cell::new_code("1"));
        nb.cells.push(Cell::new_code("1/0"));
        add_error_markers(&mut nb, 1, Some(2));
        assert_eq!(nb.cells.len(), 4);
        assert_eq!(
            nb.cells[0].source,
            "<span style=\"color:red; font-family:Helvetica Neue, Helvetica, Arial, sans-serif; font-size:2em;\">An Exception was encountered at '<a href=\"#papermill-error-cell\">In [2]</a>'.</span>"
        );
        assert!(nb.cells[2]
            .source
            .starts_with("<span id=\"papermill-error-cell\""));
        assert!(nb.cells[2].has_tag(ERROR_MARKER_TAG));
        assert_eq!(nb.cells[3].source, "1/0");
    }

    #[test]
    fn iso_like_python() {
        let t = chrono::DateTime::parse_from_rfc3339("2024-05-06T07:08:09.012345Z")
            .unwrap()
            .to_utc();
        assert_eq!(iso(t), "2024-05-06T07:08:09.012345+00:00");
        let t = chrono::DateTime::parse_from_rfc3339("2024-05-06T07:08:09Z")
            .unwrap()
            .to_utc();
        assert_eq!(iso(t), "2024-05-06T07:08:09+00:00");
    }
}
