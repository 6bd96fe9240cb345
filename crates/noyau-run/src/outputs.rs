//! What a kernel's IOPub messages do to the notebook: nbclient's
//! `metadata.execution` timestamps, the execution count, the outputs
//! (recorded by noyau-notebook's builder), and `--log-output`'s copy on
//! stderr.

use noyau_client::remote::KernelMessage;
use noyau_notebook::Notebook;
use serde_json::Value;

use crate::cells::Runner;

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
                    nb.cells[i].set_execution_count(n.as_i64());
                }
                return false;
            }
            _ => {}
        }
        if self.opts.log_output {
            self.log(m);
        }
        let d = &mut self.doc;
        match d.builder.handle(&mut d.nb, i, &m.msg_type, &m.content) {
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
            self.doc.progress.log(&t);
        }
    }
}
