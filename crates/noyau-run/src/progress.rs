//! Progress on stderr: an indicatif bar on a terminal (cells done/total,
//! elapsed, the running cell's first line), plain lines otherwise, nothing
//! with `--no-progress`. Cell output copied by `--log-output` goes through
//! here so it never tears the bar.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use noyau_text::{for_terminal, Keep};

pub enum Progress {
    Bar(ProgressBar),
    Lines,
    Off,
}

impl Progress {
    pub fn new(enabled: bool, total: usize) -> Progress {
        if !enabled {
            return Progress::Off;
        }
        if !std::io::stderr().is_terminal() {
            return Progress::Lines;
        }
        let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} cells  {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix("Executing");
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Progress::Bar(bar)
    }

    pub fn cell_start(&self, index: usize, total: usize, source: &str) {
        let first = source
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("");
        // The notebook's text: no escape sequence, no control.
        let first: String = for_terminal(first, Keep::Nothing)
            .chars()
            .take(60)
            .collect();
        match self {
            Progress::Bar(b) => {
                b.set_prefix("Executing");
                b.set_message(first)
            }
            Progress::Lines => eprintln!("noyau: cell {}/{}: {}", index + 1, total, first),
            Progress::Off => {}
        }
    }

    /// A line of the environment's preparation, before the first cell:
    /// the bar's message, and a line above it (as on a plain stderr).
    pub fn environment(&self, line: &str) {
        // It may quote the notebook's metadata (a data file's name).
        let line = &for_terminal(line, Keep::Nothing);
        let text = format!("noyau: environment: {line}");
        match self {
            Progress::Bar(b) => {
                b.set_prefix("Preparing");
                b.set_message(line.chars().take(60).collect::<String>());
                b.println(text);
            }
            _ => eprintln!("{text}"),
        }
    }

    pub fn cell_done(&self) {
        if let Progress::Bar(b) = self {
            b.inc(1);
        }
    }

    /// Writes text to stderr without breaking the bar.
    pub fn log(&self, text: &str) {
        let write = || {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(text.as_bytes());
            let _ = e.flush();
        };
        match self {
            Progress::Bar(b) => b.suspend(write),
            _ => write(),
        }
    }

    pub fn finish(&self) {
        if let Progress::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}
