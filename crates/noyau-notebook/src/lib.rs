//! Notebooks for `noyau run`: the document, its outputs, its parameters.
//!
//! How the pieces fit, in the order a headless run uses them:
//!
//! 1. [`Notebook::read`] parses an nbformat 4 file into a [`Notebook`] of
//!    [`Cell`]s. Known fields are typed; every other key, at every level, is
//!    kept in an `extra` map or in the raw JSON of outputs, so nothing is lost.
//!    Errors ([`NotebookError`]) name the problem and, for old formats, the fix.
//! 2. [`params::inject`] turns [`Parameters`] (typed [`Param`] values from
//!    `-p`/`-r`/`-f`/`-y`) into code for the notebook's language and puts it in
//!    an `injected-parameters` cell, the way papermill does.
//! 3. While a cell runs, the runner feeds every IOPub message of that
//!    execution to one notebook-wide [`OutputBuilder`], which appends, merges,
//!    clears and updates the cells' `outputs` in place as nbclient would; its
//!    [`DisplayIndex`] lets `update_display_data` reach outputs in earlier
//!    cells.
//! 4. At any moment [`Notebook::save`] writes the notebook exactly as
//!    Python's nbformat would (sorted keys, 1-space indent, lines split, a
//!    trailing newline) through an atomic replace ([`write_atomic`]): the file
//!    on disk is always either the previous or the new complete notebook.

pub mod notebook;
pub mod outputs;
pub mod params;
mod pyjson;

pub use notebook::{new_cell_id, write_atomic, write_atomic_with, Cell, Notebook, NotebookError};
pub use outputs::{DisplayIndex, OutputBuilder, OutputError, OutputEvent, StreamMode};
pub use params::{
    check_name, inject, InjectOptions, Injected, Language, Param, ParamError, Parameters,
};
