//! Cell outputs built from IOPub messages, the way nbclient builds them
//! (`NotebookClient.process_message` / `output` / `clear_output` /
//! `_update_display_id` and nbformat's `output_from_msg`).
//!
//! [`OutputBuilder`] edits the outputs of the notebook's cells in place, so a
//! runner can save the notebook at any moment and get the partial outputs of
//! the running cell. It owns the notebook-level [`DisplayIndex`] that
//! `update_display_data` (and `display_data` re-using a `display_id`) needs to
//! reach outputs of earlier cells.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Map, Value};

use crate::notebook::Notebook;

/// How `stream` messages become outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamMode {
    /// One output per message: nbclient's and papermill's default
    /// (`coalesce_streams=False`).
    Separate,
    /// A stream message whose name equals the cell's last output's stream
    /// name extends it (what Jupyter frontends show and save); when the cell
    /// finishes, backspaces erase the character before them and nbclient's
    /// `\r` rule is applied. Keeps long-printing cells small.
    #[default]
    Coalesce,
    /// nbclient's `coalesce_streams=True`, applied when the cell finishes:
    /// every stream of a name merged into its first one, nbclient's `\r` rule
    /// applied, a stderr output directly followed by a stdout one swapped.
    /// (nbclient's backspace step never runs: its loop condition is false on
    /// entry, and its regex `[^\n]\b` means a word boundary. So backspaces
    /// are kept here too.)
    Nbclient,
}

/// What a message did to the notebook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEvent {
    /// Nothing to record (`status`, `execute_input`, comm messages, unknown types).
    Ignored,
    /// A new output was appended at this index of the cell's outputs.
    Appended(usize),
    /// Stream text was appended to the output at this index.
    Extended(usize),
    /// The cell's outputs were cleared.
    Cleared,
    /// `clear_output(wait=True)`: cleared at the next output.
    ClearPending,
    /// `update_display_data`: this many outputs (in any cell) were replaced.
    DisplayUpdated(usize),
}

/// A message that cannot be turned into an output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    #[error("{msg_type} message: {problem}")]
    Malformed { msg_type: String, problem: String },
    #[error("no cell {0} in the notebook")]
    NoSuchCell(usize),
}

/// For each `display_id`, the outputs (cell index, output index) that show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DisplayIndex {
    map: HashMap<String, BTreeMap<usize, Vec<usize>>>,
}

impl DisplayIndex {
    /// Records that output `output` of cell `cell` shows `display_id`.
    pub fn register(&mut self, display_id: &str, cell: usize, output: usize) {
        self.map
            .entry(display_id.to_string())
            .or_default()
            .entry(cell)
            .or_default()
            .push(output);
    }

    /// Forgets every output of `cell` (its outputs were cleared).
    pub fn clear_cell(&mut self, cell: usize) {
        for cells in self.map.values_mut() {
            cells.remove(&cell);
        }
    }

    /// The (cell, output) pairs showing `display_id`, in cell order.
    pub fn locations(&self, display_id: &str) -> Vec<(usize, usize)> {
        self.map
            .get(display_id)
            .map(|cells| {
                cells
                    .iter()
                    .flat_map(|(c, outs)| outs.iter().map(move |o| (*c, *o)))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn remap_cell(&mut self, cell: usize, new_index: &[Option<usize>]) {
        for cells in self.map.values_mut() {
            if let Some(outs) = cells.get_mut(&cell) {
                *outs = outs
                    .iter()
                    .filter_map(|o| new_index.get(*o).copied().flatten())
                    .collect();
            }
        }
    }
}

/// Turns IOPub messages into outputs of a notebook's cells.
#[derive(Debug, Clone, Default)]
pub struct OutputBuilder {
    mode: StreamMode,
    display: DisplayIndex,
    clear_before_next_output: bool,
}

fn malformed(msg_type: &str, problem: impl Into<String>) -> OutputError {
    OutputError::Malformed {
        msg_type: msg_type.into(),
        problem: problem.into(),
    }
}

fn field<'a>(msg_type: &str, content: &'a Value, key: &str) -> Result<&'a Value, OutputError> {
    content
        .get(key)
        .ok_or_else(|| malformed(msg_type, format!("missing '{key}'")))
}

/// nbformat's `output_from_msg`, a little more forgiving: a missing
/// `metadata` is `{}`, a missing `execution_count` is null.
fn output_from_msg(msg_type: &str, content: &Value) -> Result<Option<Value>, OutputError> {
    let meta = || {
        content
            .get("metadata")
            .cloned()
            .unwrap_or_else(|| json!({}))
    };
    let data = || -> Result<Value, OutputError> {
        let d = field(msg_type, content, "data")?;
        if !d.is_object() {
            return Err(malformed(msg_type, "'data' is not an object"));
        }
        Ok(d.clone())
    };
    Ok(Some(match msg_type {
        "stream" => {
            let name = field(msg_type, content, "name")?;
            let text = field(msg_type, content, "text")?;
            if !name.is_string() || !text.is_string() {
                return Err(malformed(msg_type, "'name' and 'text' must be strings"));
            }
            json!({"output_type": "stream", "name": name, "text": text})
        }
        "display_data" => {
            json!({"output_type": "display_data", "data": data()?, "metadata": meta()})
        }
        "execute_result" => json!({
            "output_type": "execute_result",
            "data": data()?,
            "metadata": meta(),
            "execution_count": content.get("execution_count").cloned().unwrap_or(Value::Null),
        }),
        "error" => json!({
            "output_type": "error",
            "ename": field(msg_type, content, "ename")?,
            "evalue": field(msg_type, content, "evalue")?,
            "traceback": field(msg_type, content, "traceback")?,
        }),
        _ => return Ok(None),
    }))
}

impl OutputBuilder {
    pub fn new(mode: StreamMode) -> OutputBuilder {
        OutputBuilder {
            mode,
            ..Default::default()
        }
    }

    pub fn mode(&self) -> StreamMode {
        self.mode
    }

    /// The notebook-level display-id index.
    pub fn display_index(&self) -> &DisplayIndex {
        &self.display
    }

    /// Call when cell `cell` is sent for execution: empties its outputs (as
    /// nbclient does) and forgets its displays.
    pub fn start_cell(&mut self, nb: &mut Notebook, cell: usize) -> Result<(), OutputError> {
        let c = nb
            .cells
            .get_mut(cell)
            .ok_or(OutputError::NoSuchCell(cell))?;
        c.outputs_mut().clear();
        self.display.clear_cell(cell);
        self.clear_before_next_output = false;
        Ok(())
    }

    /// Applies one IOPub message (its `msg_type` and `content`) belonging to
    /// the execution of cell `cell`. On error nothing was changed.
    pub fn handle(
        &mut self,
        nb: &mut Notebook,
        cell: usize,
        msg_type: &str,
        content: &Value,
    ) -> Result<OutputEvent, OutputError> {
        if cell >= nb.cells.len() {
            return Err(OutputError::NoSuchCell(cell));
        }
        // `transient` may be absent or explicitly null.
        let display_id = content
            .get("transient")
            .and_then(|t| t.get("display_id"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string);

        let output = output_from_msg(msg_type, content)?;
        let mut updated = 0;
        if let Some(id) = &display_id {
            if matches!(
                msg_type,
                "execute_result" | "display_data" | "update_display_data"
            ) {
                updated = self.update_display(nb, id, msg_type, content)?;
            }
        }

        if let Some(n) = content.get("execution_count") {
            nb.cells[cell].set_execution_count(n.as_i64());
        }

        match msg_type {
            "clear_output" => {
                return Ok(
                    if content
                        .get("wait")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
                    {
                        self.clear_before_next_output = true;
                        OutputEvent::ClearPending
                    } else {
                        nb.cells[cell].outputs_mut().clear();
                        self.display.clear_cell(cell);
                        OutputEvent::Cleared
                    },
                );
            }
            "update_display_data" => return Ok(OutputEvent::DisplayUpdated(updated)),
            _ => {}
        }
        let Some(out) = output else {
            return Ok(OutputEvent::Ignored);
        };

        if self.clear_before_next_output {
            nb.cells[cell].outputs_mut().clear();
            self.display.clear_cell(cell);
            self.clear_before_next_output = false;
        }
        let outs = nb.cells[cell].outputs_mut();
        if self.mode == StreamMode::Coalesce && msg_type == "stream" && display_id.is_none() {
            if let Some(last) = outs.last_mut() {
                if last.get("output_type").and_then(Value::as_str) == Some("stream")
                    && last.get("name") == out.get("name")
                {
                    if let (Some(Value::String(old)), Some(new)) = (
                        last.get_mut("text"),
                        out.get("text").and_then(Value::as_str),
                    ) {
                        old.push_str(new);
                        return Ok(OutputEvent::Extended(outs.len() - 1));
                    }
                }
            }
        }
        let idx = outs.len();
        outs.push(out);
        if let Some(id) = &display_id {
            self.display.register(id, cell, idx);
        }
        Ok(OutputEvent::Appended(idx))
    }

    fn update_display(
        &mut self,
        nb: &mut Notebook,
        display_id: &str,
        msg_type: &str,
        content: &Value,
    ) -> Result<usize, OutputError> {
        let locations = self.display.locations(display_id);
        if locations.is_empty() {
            return Ok(0);
        }
        let data = field(msg_type, content, "data")?.clone();
        let metadata = content
            .get("metadata")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let mut n = 0;
        for (c, o) in locations {
            let target = nb
                .cells
                .get_mut(c)
                .and_then(|cell| cell.outputs.as_mut())
                .and_then(|outs| outs.get_mut(o))
                .and_then(Value::as_object_mut);
            if let Some(target) = target {
                target.insert("data".into(), data.clone());
                target.insert("metadata".into(), metadata.clone());
                n += 1;
            }
        }
        Ok(n)
    }

    /// Call when cell `cell` has finished (execute_reply and idle received):
    /// applies the stream post-processing of the [`StreamMode`].
    pub fn finish_cell(&mut self, nb: &mut Notebook, cell: usize) -> Result<(), OutputError> {
        let c = nb
            .cells
            .get_mut(cell)
            .ok_or(OutputError::NoSuchCell(cell))?;
        let Some(outs) = c.outputs.as_mut() else {
            return Ok(());
        };
        match self.mode {
            StreamMode::Separate => {}
            StreamMode::Coalesce => {
                for o in outs.iter_mut() {
                    process_stream_text(o, true);
                }
            }
            StreamMode::Nbclient => {
                let old = std::mem::take(outs);
                let mut new_index = vec![None; old.len()];
                let mut first_of: Map<String, Value> = Map::new(); // name -> index in new
                let mut merged: Vec<Value> = Vec::with_capacity(old.len());
                for (i, o) in old.into_iter().enumerate() {
                    let stream_name = (o.get("output_type").and_then(Value::as_str)
                        == Some("stream"))
                    .then(|| o.get("name").and_then(Value::as_str).map(str::to_string))
                    .flatten();
                    if let Some(name) = stream_name {
                        if let Some(j) = first_of.get(&name).and_then(Value::as_u64) {
                            let j = j as usize;
                            let add = o
                                .get("text")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string();
                            if let Some(Value::String(t)) = merged[j].get_mut("text") {
                                t.push_str(&add);
                            }
                            continue;
                        }
                        first_of.insert(name, Value::from(merged.len() as u64));
                    }
                    new_index[i] = Some(merged.len());
                    merged.push(o);
                }
                for o in merged.iter_mut() {
                    process_stream_text(o, false);
                }
                // A stderr stream directly followed by a stdout one: swap them.
                let is_stream = |o: &Value, n: &str| {
                    o.get("output_type").and_then(Value::as_str) == Some("stream")
                        && o.get("name").and_then(Value::as_str) == Some(n)
                };
                let mut i = 0;
                while i < merged.len() {
                    if is_stream(&merged[i], "stderr")
                        && i + 1 < merged.len()
                        && is_stream(&merged[i + 1], "stdout")
                    {
                        merged.swap(i, i + 1);
                        for ni in new_index.iter_mut().flatten() {
                            if *ni == i {
                                *ni = i + 1;
                            } else if *ni == i + 1 {
                                *ni = i;
                            }
                        }
                    }
                    i += 1;
                }
                *outs = merged;
                self.display.remap_cell(cell, &new_index);
            }
        }
        Ok(())
    }
}

fn process_stream_text(o: &mut Value, backspace: bool) {
    if o.get("output_type").and_then(Value::as_str) != Some("stream") {
        return;
    }
    if let Some(Value::String(t)) = o.get_mut("text") {
        if backspace && t.contains('\x08') {
            *t = apply_backspace(t);
        }
        if t.contains('\r') {
            *t = apply_carriage_return(t);
        }
    }
}

/// A backspace character erases the character before it (not a newline),
/// repeatedly: what nbclient's backspace step means to do.
pub fn apply_backspace(text: &str) -> String {
    let mut cur: Vec<char> = text.chars().collect();
    loop {
        let mut next = Vec::with_capacity(cur.len());
        let mut i = 0;
        while i < cur.len() {
            if cur[i] != '\n' && cur.get(i + 1) == Some(&'\x08') {
                i += 2;
            } else {
                next.push(cur[i]);
                i += 1;
            }
        }
        if next.len() == cur.len() {
            return next.into_iter().collect();
        }
        cur = next;
    }
}

/// nbclient: `re.sub(r".*\r(?=[^\n])", "", text)` — on each line, drop
/// everything up to the last `\r` that is followed by another character of
/// that line.
pub fn apply_carriage_return(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (n, line) in text.split('\n').enumerate() {
        if n > 0 {
            out.push('\n');
        }
        let cut = line
            .char_indices()
            .rev()
            .find(|&(i, c)| c == '\r' && i + 1 < line.len())
            .map(|(i, _)| i + 1)
            .unwrap_or(0);
        out.push_str(&line[cut..]);
    }
    out
}
