//! Notes about jobs that wait in the queue: one line from the scheduler's
//! state ([`describe`]), shown as a display in a cell and updated in place
//! ([`Note`]) as the reason or the estimated start changes. A queued
//! kernel, a queued target and a Dask cluster's waiting jobs all say why
//! they wait this way.

use std::time::SystemTime;

use chrono::Local;
use noyau_sched::JobState;

use crate::Output;

/// `1m05s`, `42s`.
pub fn waited(secs: u64) -> String {
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

/// `queued on slurm job 42 (partition batch): reason Resources, estimated
/// start …`, the part of a note that names one job; None once it runs.
pub fn job_wait(backend: &str, job: &str, state: &JobState) -> Option<String> {
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
            let start = noyau_sched::start_estimate(*start, SystemTime::now(), &Local);
            let start = format!(", {start}");
            Some(format!(
                "queued on {backend} job {job}{part}: reason {reason}{start}"
            ))
        }
        JobState::Unknown { why } => Some(format!(
            "{backend} job {job} is queued or starting, but the scheduler does not answer ({why})"
        )),
        JobState::Running { .. } | JobState::Ended(_) => None,
    }
}

/// The line the notebook shows while a kernel's job waits; None once it runs.
pub fn describe(backend: &str, job: &str, state: &JobState, waited_secs: u64) -> Option<String> {
    let wait = job_wait(backend, job, state)?;
    let waited = waited(waited_secs);
    Some(match state {
        JobState::Unknown { .. } => format!("noyau: {wait}; still waiting ({waited})."),
        _ => format!(
            "noyau: {wait}; waiting for {waited}. \
             Cells run when the job starts; interrupt or shut down the kernel to cancel the job."
        ),
    })
}

/// A note's display: a fresh `display_data`, then `update_display_data`s.
#[derive(Debug, Clone)]
pub struct Note {
    pub display_id: String,
    /// The display was sent (a later text is an update).
    pub shown: bool,
    pub last: String,
}

impl Default for Note {
    fn default() -> Self {
        Note::new()
    }
}

impl Note {
    pub fn new() -> Self {
        Note {
            display_id: format!("noyau-queue-{}", uuid::Uuid::new_v4()),
            shown: false,
            last: String::new(),
        }
    }

    /// The output that shows `text`, or None when it is unchanged.
    pub fn update(&mut self, text: &str) -> Option<Output> {
        if self.shown && self.last == text {
            return None;
        }
        let out = if self.shown {
            Output::update(&self.display_id, text)
        } else {
            Output::display(&self.display_id, text)
        };
        self.shown = true;
        self.last = text.to_string();
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_the_queue() {
        let s = JobState::Pending {
            reason: "Resources".into(),
            start: None,
            partition: Some("batch".into()),
        };
        let t = describe("slurm", "42", &s, 75).unwrap();
        assert!(
            t.contains("queued on slurm job 42 (partition batch): reason Resources, start time not known yet; waiting for 1m15s"),
            "{t}"
        );
        // The counter is the one given: each update shows the time waited so far.
        assert!(describe("slurm", "42", &s, 85)
            .unwrap()
            .contains("waiting for 1m25s"));
        let running = JobState::Running {
            node: "n".into(),
            ends_at: None,
        };
        assert!(describe("slurm", "42", &running, 1).is_none());
        let unknown = JobState::Unknown { why: "x".into() };
        assert_eq!(
            describe("slurm", "42", &unknown, 3).unwrap(),
            "noyau: slurm job 42 is queued or starting, but the scheduler does not answer (x); still waiting (3s)."
        );
    }

    #[test]
    fn note_shows_then_updates() {
        let mut n = Note::new();
        assert_eq!(n.update("a").unwrap().msg_type, "display_data");
        assert!(n.update("a").is_none());
        let out = n.update("b").unwrap();
        assert_eq!(out.msg_type, "update_display_data");
        assert_eq!(
            out.content["transient"]["display_id"],
            n.display_id.as_str()
        );
    }
}
