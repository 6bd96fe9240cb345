//! What a kernel's IOPub messages do to the notebook: nbclient's
//! `metadata.execution` timestamps, the execution count, the outputs
//! (recorded by noyau-notebook's builder), ipywidgets' comm messages (to
//! [`crate::widgets`]), and `--log-output`'s copy on stderr.

use std::borrow::Cow;

use noyau_client::remote::KernelMessage;
use noyau_notebook::Notebook;
use serde_json::Value;

use crate::cells::{On, Runner};

/// nbclient's `timestamp(msg)`: the header date, `%Y-%m-%dT%H:%M:%S.%fZ`.
pub(crate) fn timestamp(m: &KernelMessage) -> String {
    let t = m
        .date
        .as_deref()
        .and_then(|d| chrono::DateTime::parse_from_rfc3339(d).ok())
        .map(|d| d.to_utc())
        .unwrap_or_else(chrono::Utc::now);
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// `metadata.execution` of cell `i`, once the cell started.
pub(crate) fn execution(
    nb: &mut Notebook,
    i: usize,
) -> Option<&mut serde_json::Map<String, Value>> {
    nb.cells[i]
        .metadata
        .get_mut("execution")
        .and_then(Value::as_object_mut)
}

/// The notebook's own execution counts, as an interactive noyau kernel
/// shows them (noyau-proxy renumbers the same way): a cell run on a target
/// takes the notebook's next count, not its target kernel's, and the
/// notebook kernel's later counts shift by one for each such cell.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    /// The notebook's last count.
    last: i64,
    /// Cells run on targets so far.
    delegated: i64,
    /// The running cell is on a target; its count, once it took one.
    target: Option<Option<i64>>,
}

impl Counts {
    /// A cell starts on `on`.
    pub fn start(&mut self, on: &On) {
        self.target = match on {
            On::Main => None,
            On::Target(_) => Some(None),
        };
    }

    /// The count the notebook shows for the running cell, whose kernel
    /// said `kernel`.
    pub fn shown(&mut self, kernel: i64) -> i64 {
        match &mut self.target {
            None => {
                self.last = kernel + self.delegated;
                self.last
            }
            Some(Some(n)) => *n,
            Some(own) => {
                self.last += 1;
                self.delegated += 1;
                *own = Some(self.last);
                self.last
            }
        }
    }

    /// `content` with its `execution_count` (if any) the notebook's.
    fn renumber<'a>(&mut self, content: &'a Value) -> Cow<'a, Value> {
        let Some(n) = content.get("execution_count").and_then(Value::as_i64) else {
            return Cow::Borrowed(content);
        };
        match self.shown(n) {
            // (most cells: no target ran before them, nothing to copy)
            same if same == n => Cow::Borrowed(content),
            shown => {
                let mut c = content.clone();
                c["execution_count"] = shown.into();
                Cow::Owned(c)
            }
        }
    }
}

impl Runner<'_> {
    /// One IOPub message of cell `i`; true on `idle`.
    pub fn on_iopub(&mut self, i: usize, m: &KernelMessage) -> bool {
        let nb = &mut self.doc.nb;
        let mut exec = |k: &str| {
            if let Some(e) = execution(nb, i) {
                e.insert(k.into(), timestamp(m).into());
            }
        };
        match m.msg_type.as_str() {
            "status" => {
                return match m.content.get("execution_state").and_then(Value::as_str) {
                    Some("busy") => {
                        exec("iopub.status.busy");
                        false
                    }
                    Some("idle") => {
                        exec("iopub.status.idle");
                        true
                    }
                    _ => false,
                };
            }
            "execute_input" => {
                exec("iopub.execute_input");
                if let Some(n) = m.content.get("execution_count") {
                    let n = n.as_i64().map(|n| self.counts.shown(n));
                    nb.cells[i].set_execution_count(n);
                }
                return false;
            }
            "comm_open" | "comm_msg" => {
                self.widgets.take(&m.content);
                return false;
            }
            _ => {}
        }
        if self.opts.log_output {
            self.log(m);
        }
        let content = match m.msg_type.as_str() {
            "execute_result" => self.counts.renumber(&m.content),
            _ => Cow::Borrowed(&m.content),
        };
        let d = &mut self.doc;
        match d.builder.handle(&mut d.nb, i, &m.msg_type, &content) {
            Ok(noyau_notebook::OutputEvent::Ignored) => {}
            Ok(_) => d.saver.output_changed(),
            Err(e) => tracing::warn!("an output could not be recorded: {e}"),
        }
        false
    }

    /// `--log-output`: the message's text on stderr.
    fn log(&self, m: &KernelMessage) {
        let c = &m.content;
        let text = match m.msg_type.as_str() {
            "stream" => c.get("text").and_then(Value::as_str).map(str::to_string),
            "error" => c.get("traceback").and_then(Value::as_array).map(|t| {
                let mut s = t
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("\n");
                s.push('\n');
                s
            }),
            "execute_result" | "display_data" => c
                .get("data")
                .and_then(|d| d.get("text/plain"))
                .and_then(Value::as_str)
                .map(|t| format!("{t}\n")),
            _ => None,
        };
        if let Some(t) = text {
            // Colours stay (ipykernel's tracebacks); cursor moves, OSC
            // (clipboard, links, title) and the rest do not reach the
            // terminal. The notebook keeps what the kernel sent.
            self.doc
                .progress
                .log(&noyau_text::for_terminal(&t, noyau_text::Keep::Colours));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_cells_take_the_notebooks_next_count() {
        let mut c = Counts::default();
        let main = On::Main;
        let side = On::Target("side".into());
        c.start(&main);
        assert_eq!(c.shown(1), 1);
        // Three target cells in a row, their kernel counting 1, 2, 3; a
        // cell's messages (execute_input, execute_result) share its count.
        for (kernel, want) in [(1, 2), (2, 3), (3, 4)] {
            c.start(&side);
            assert_eq!(c.shown(kernel), want);
            assert_eq!(c.shown(kernel), want);
        }
        c.start(&main);
        assert_eq!(c.shown(2), 5);
        let result = serde_json::json!({"execution_count": 2, "data": {}});
        assert_eq!(c.renumber(&result)["execution_count"], 5);
        let stream = serde_json::json!({"text": "x"});
        assert!(matches!(c.renumber(&stream), Cow::Borrowed(_)));
    }
}
