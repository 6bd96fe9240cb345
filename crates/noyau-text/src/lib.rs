//! Text that noyau did not write (a kernel's output, a notebook's source
//! or metadata, a file's content, a scheduler's job name, a login form's
//! name) on its way to a terminal, a page or a record: one sanitizer, so
//! that no such text can move the terminal's cursor, write its clipboard
//! (OSC 52), make a link (OSC 8), reorder the text around it or hide in it.
//!
//! [`clean`] works character by character (escaped or left out), for the
//! hub's pages and records; [`for_terminal`] understands escape sequences,
//! dropping each one whole, and may keep colours for a kernel's streams
//! and tracebacks.

mod clean;
mod terminal;

pub use clean::{bounded, clean, is_unsafe, Unsafe};
pub use terminal::{for_terminal, Keep};
