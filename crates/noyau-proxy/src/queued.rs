//! A kernel whose batch job waits in the queue.
//!
//! Until the agent dials in, the proxy stands in for the kernel: it answers
//! `kernel_info_request` at once from the inner kernelspec (so frontends do
//! not time out while the job waits), queues every other request, and shows
//! the queue state in the notebook as a `display_data` with a `display_id`
//! attached to the first waiting cell, updated (`update_display_data`) as
//! the scheduler's reason and estimated start change. When the job starts,
//! the note is cleared (`clear_output`) before the cell runs, so the saved
//! notebook holds what the kernel printed and nothing else.

use bytes::Bytes;
use noyau_sched::JobState;
use serde_json::{json, Value};

/// `language_info` for a kernelspec's language, as its kernel would give it
/// in broad strokes (the real kernel's reply replaces it once it runs).
pub fn language_info(language: &str) -> Value {
    let (mime, ext) = match language.to_ascii_lowercase().as_str() {
        "python" => ("text/x-python", ".py"),
        "r" => ("text/x-r-source", ".r"),
        "julia" => ("application/julia", ".jl"),
        "c++" | "cpp" => ("text/x-c++src", ".cpp"),
        "javascript" => ("application/javascript", ".js"),
        _ => ("text/plain", ".txt"),
    };
    json!({
        "name": language.to_ascii_lowercase(),
        "version": "",
        "mimetype": mime,
        "file_extension": ext,
    })
}

pub fn kernel_info_content(language: &str, job: &str) -> Value {
    json!({
        "status": "ok",
        "protocol_version": noyau_wire::build::PROTOCOL_VERSION,
        "implementation": "noyau",
        "implementation_version": env!("CARGO_PKG_VERSION"),
        "language_info": language_info(language),
        "banner": format!("noyau: this kernel waits for its batch job {job}; requests are queued until it starts"),
        "help_links": [],
        "debugger": false,
    })
}

/// The line the notebook shows while the job waits; None once it runs.
pub fn describe(backend: &str, job: &str, state: &JobState, waited_secs: u64) -> Option<String> {
    let waited = if waited_secs >= 60 {
        format!("{}m{:02}s", waited_secs / 60, waited_secs % 60)
    } else {
        format!("{waited_secs}s")
    };
    match state {
        JobState::Pending {
            reason,
            start,
            partition,
        } => {
            let part = partition
                .as_deref()
                .map(|p| format!(" (partition {p})"))
                .unwrap_or_default();
            let start = start
                .map(|s| format!(", estimated start {}", noyau_sched::local_time(s)))
                .unwrap_or_default();
            Some(format!(
                "noyau: queued on {backend} job {job}{part}: reason {reason}{start}; waiting for {waited}. \
                 Cells run when the job starts; interrupt or shut down the kernel to cancel the job."
            ))
        }
        JobState::Unknown { why } => Some(format!(
            "noyau: {backend} job {job} is queued or starting, but the scheduler does not answer ({why}); still waiting ({waited})."
        )),
        JobState::Running { .. } | JobState::Ended(_) => None,
    }
}

/// The note's display: a fresh `display_data`, then `update_display_data`s.
pub struct Note {
    pub parent: Bytes,
    pub display_id: String,
    pub shown: bool,
    pub last: String,
}

impl Note {
    pub fn new(parent: Bytes) -> Self {
        Note {
            parent,
            display_id: format!("noyau-queue-{}", uuid::Uuid::new_v4()),
            shown: false,
            last: String::new(),
        }
    }

    /// (msg_type, content) to publish for `text`, or None when unchanged.
    pub fn update(&mut self, text: &str) -> Option<(&'static str, Value)> {
        if self.shown && self.last == text {
            return None;
        }
        let kind = if self.shown {
            "update_display_data"
        } else {
            "display_data"
        };
        self.shown = true;
        self.last = text.to_string();
        Some((
            kind,
            json!({
                "data": {"text/plain": text},
                "metadata": {},
                "transient": {"display_id": self.display_id},
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_the_queue() {
        let s = JobState::Pending {
            reason: "Resources".into(),
            start: noyau_sched::parse_local_time("2026-01-01T10:00:00"),
            partition: Some("batch".into()),
        };
        let t = describe("slurm", "42", &s, 75).unwrap();
        assert!(
            t.contains("queued on slurm job 42 (partition batch): reason Resources, estimated start 2026-01-01T10:00:00; waiting for 1m15s"),
            "{t}"
        );
        let running = JobState::Running {
            node: "n".into(),
            ends_at: None,
        };
        assert!(describe("slurm", "42", &running, 1).is_none());
    }

    #[test]
    fn note_shows_then_updates() {
        let mut n = Note::new(Bytes::new());
        assert_eq!(n.update("a").unwrap().0, "display_data");
        assert!(n.update("a").is_none());
        let (kind, c) = n.update("b").unwrap();
        assert_eq!(kind, "update_display_data");
        assert_eq!(c["transient"]["display_id"], n.display_id.as_str());
        assert_eq!(language_info("python")["file_extension"], ".py");
    }
}
