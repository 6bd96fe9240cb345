//! The nbformat v4 document: lossless reading, nbformat-identical writing,
//! and atomic saving.
//!
//! Reading follows nbformat's `reads`: multi-line fields stored as lists of
//! strings are joined (`rejoin_lines`) and the transient keys nbformat drops
//! (`metadata.orig_nbformat`, `orig_nbformat_minor`, `signature`, cell
//! `metadata.trusted`) are dropped. Writing follows nbformat's `writes` +
//! `write`: `split_lines`, sorted keys, one-space indent, `ensure_ascii=False`,
//! a trailing newline. Every key this crate does not know is kept, at every
//! level, so `write(read(x)) == x` for any file nbformat wrote.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::pyjson::{self, write_entries, write_split_str, write_str, write_value, Writer};

/// Why a notebook could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NotebookError {
    /// The bytes are not JSON (or not UTF-8).
    #[error("invalid JSON: {0}")]
    Json(String),
    /// The JSON is not an nbformat 4 notebook at all (or another version).
    #[error("not a notebook: {0}")]
    NotANotebook(String),
    /// An nbformat 4 notebook with a structural problem; the message names
    /// the cell (1-based) and the key.
    #[error("malformed notebook: {0}")]
    Malformed(String),
    /// Reading or writing the file failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One cell. `source` is always held joined; the known fields are typed and
/// every other key (`id`, `execution_count`, `attachments`, anything unknown)
/// stays in `extra`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub cell_type: String,
    pub source: String,
    pub metadata: Map<String, Value>,
    /// `Some` for code cells (and any cell whose file had `outputs`).
    /// Outputs are raw JSON objects, text fields joined like nbformat holds them.
    pub outputs: Option<Vec<Value>>,
    pub extra: Map<String, Value>,
}

/// An nbformat 4 notebook.
#[derive(Debug, Clone, PartialEq)]
pub struct Notebook {
    pub nbformat_minor: u64,
    pub metadata: Map<String, Value>,
    pub cells: Vec<Cell>,
    /// Top-level keys other than `nbformat`, `nbformat_minor`, `metadata`, `cells`.
    pub extra: Map<String, Value>,
}

const JSON_MIME_SUFFIX: &str = "+json";

fn is_json_mime(mime: &str) -> bool {
    mime == "application/json"
        || (mime.starts_with("application/") && mime.ends_with(JSON_MIME_SUFFIX))
}

/// nbformat's `_rejoin_mimebundle`.
fn rejoin_mimebundle(data: &mut Value) {
    let Some(map) = data.as_object_mut() else {
        return;
    };
    for (key, value) in map.iter_mut() {
        if is_json_mime(key) {
            continue;
        }
        if let Some(joined) = join_str_list(value) {
            *value = Value::String(joined);
        }
    }
}

fn join_str_list(v: &Value) -> Option<String> {
    let list = v.as_array()?;
    let mut s = String::new();
    for item in list {
        s.push_str(item.as_str()?);
    }
    Some(s)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl Cell {
    fn empty(cell_type: &str, source: &str) -> Cell {
        Cell {
            cell_type: cell_type.into(),
            source: source.into(),
            metadata: Map::new(),
            outputs: None,
            extra: Map::new(),
        }
    }

    /// A new code cell like `nbformat.v4.new_code_cell` (without an `id`; see
    /// [`Cell::with_id`] and [`new_cell_id`]).
    pub fn new_code(source: &str) -> Cell {
        let mut c = Cell::empty("code", source);
        c.outputs = Some(Vec::new());
        c.extra.insert("execution_count".into(), Value::Null);
        c
    }

    /// A new markdown cell.
    pub fn new_markdown(source: &str) -> Cell {
        Cell::empty("markdown", source)
    }

    /// A new raw cell.
    pub fn new_raw(source: &str) -> Cell {
        Cell::empty("raw", source)
    }

    /// Sets the cell `id` (nbformat 4.5+).
    pub fn with_id(mut self, id: impl Into<String>) -> Cell {
        self.extra.insert("id".into(), Value::String(id.into()));
        self
    }

    pub fn is_code(&self) -> bool {
        self.cell_type == "code"
    }

    pub fn id(&self) -> Option<&str> {
        self.extra.get("id").and_then(Value::as_str)
    }

    pub fn execution_count(&self) -> Option<i64> {
        self.extra.get("execution_count").and_then(Value::as_i64)
    }

    pub fn set_execution_count(&mut self, n: Option<i64>) {
        self.extra
            .insert("execution_count".into(), n.map_or(Value::Null, Value::from));
    }

    /// `metadata.tags` (non-string entries skipped).
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        self.metadata
            .get("tags")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
    }

    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags().any(|t| t == tag)
    }

    /// The outputs, created empty if the cell had none.
    pub fn outputs_mut(&mut self) -> &mut Vec<Value> {
        self.outputs.get_or_insert_with(Vec::new)
    }

    fn from_value(v: Value, n: usize) -> Result<Cell, NotebookError> {
        let bad = |msg: String| NotebookError::Malformed(format!("cell {n}: {msg}"));
        let Value::Object(mut map) = v else {
            return Err(bad(format!("expected an object, found {}", type_name(&v))));
        };
        let cell_type = match map.remove("cell_type") {
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(bad(format!(
                    "'cell_type' must be a string, found {}",
                    type_name(&other)
                )))
            }
            None => return Err(bad("missing 'cell_type'".into())),
        };
        let source = match map.remove("source") {
            Some(Value::String(s)) => s,
            Some(v @ Value::Array(_)) => {
                join_str_list(&v).ok_or_else(|| bad("'source' list holds a non-string".into()))?
            }
            Some(other) => {
                return Err(bad(format!(
                    "'source' must be a string or a list of strings, found {}",
                    type_name(&other)
                )))
            }
            None => return Err(bad("missing 'source'".into())),
        };
        let mut metadata = match map.remove("metadata") {
            Some(Value::Object(m)) => m,
            // Tolerated like nbformat's reader does; written back as {}.
            None | Some(Value::Null) => Map::new(),
            Some(other) => {
                return Err(bad(format!(
                    "'metadata' must be an object, found {}",
                    type_name(&other)
                )))
            }
        };
        metadata.remove("trusted");
        if let Some(Value::Object(att)) = map.get_mut("attachments") {
            for bundle in att.values_mut() {
                rejoin_mimebundle(bundle);
            }
        }
        let outputs = match map.remove("outputs") {
            Some(Value::Array(list)) => {
                let mut outs = Vec::with_capacity(list.len());
                for (i, o) in list.into_iter().enumerate() {
                    outs.push(parse_output(o).map_err(|m| bad(format!("output {}: {m}", i + 1)))?);
                }
                Some(outs)
            }
            Some(other) => {
                return Err(bad(format!(
                    "'outputs' must be a list, found {}",
                    type_name(&other)
                )))
            }
            None if cell_type == "code" => Some(Vec::new()),
            None => None,
        };
        if cell_type == "code" && !map.contains_key("execution_count") {
            map.insert("execution_count".into(), Value::Null);
        }
        Ok(Cell {
            cell_type,
            source,
            metadata,
            outputs,
            extra: map,
        })
    }

    fn write(&self, out: &mut String, indent: usize) {
        let mut e: Vec<(&str, Writer<'_>)> = vec![
            (
                "cell_type",
                Box::new(|o: &mut String, _| write_str(o, &self.cell_type)),
            ),
            (
                "source",
                Box::new(|o: &mut String, i| write_split_str(o, &self.source, i)),
            ),
            (
                "metadata",
                Box::new(|o: &mut String, i| pyjson::write_object(o, &self.metadata, i)),
            ),
        ];
        if let Some(outputs) = &self.outputs {
            let is_code = self.is_code();
            e.push((
                "outputs",
                Box::new(move |o: &mut String, i| {
                    pyjson::write_array(o, outputs.iter(), i, |o, v, i| {
                        if is_code {
                            write_output(o, v, i)
                        } else {
                            write_value(o, v, i)
                        }
                    })
                }),
            ));
        }
        for (k, v) in &self.extra {
            if k == "attachments" {
                e.push((
                    k,
                    Box::new(move |o: &mut String, i| write_attachments(o, v, i)),
                ));
            } else {
                e.push((k, Box::new(move |o: &mut String, i| write_value(o, v, i))));
            }
        }
        write_entries(out, e, indent);
    }
}

fn parse_output(v: Value) -> Result<Value, String> {
    let Value::Object(mut map) = v else {
        return Err(format!("expected an object, found {}", type_name(&v)));
    };
    let ot = match map.get("output_type") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(format!(
                "'output_type' must be a string, found {}",
                type_name(other)
            ))
        }
        None => return Err("missing 'output_type'".into()),
    };
    if ot == "execute_result" || ot == "display_data" {
        if let Some(data) = map.get_mut("data") {
            rejoin_mimebundle(data);
        }
    } else if let Some(text) = map.get_mut("text") {
        if let Some(joined) = join_str_list(text) {
            *text = Value::String(joined);
        }
    }
    Ok(Value::Object(map))
}

const NON_TEXT_SPLIT_MIMES: [&str; 2] = ["application/javascript", "image/svg+xml"];

/// nbformat's `_split_mimebundle`, applied while writing.
fn write_mimebundle(out: &mut String, data: &Value, indent: usize) {
    let Some(map) = data.as_object() else {
        write_value(out, data, indent);
        return;
    };
    let e = map
        .iter()
        .map(|(k, v)| {
            let split = v.is_string()
                && (k.starts_with("text/") || NON_TEXT_SPLIT_MIMES.contains(&k.as_str()));
            let w: Writer = if split {
                let s = v.as_str().unwrap_or_default();
                Box::new(move |o: &mut String, i| write_split_str(o, s, i))
            } else {
                Box::new(move |o: &mut String, i| write_value(o, v, i))
            };
            (k.as_str(), w)
        })
        .collect();
    write_entries(out, e, indent);
}

fn write_attachments(out: &mut String, att: &Value, indent: usize) {
    let Some(map) = att.as_object() else {
        write_value(out, att, indent);
        return;
    };
    let e = map
        .iter()
        .map(|(k, v)| {
            let w: Writer = Box::new(move |o: &mut String, i| write_mimebundle(o, v, i));
            (k.as_str(), w)
        })
        .collect();
    write_entries(out, e, indent);
}

fn write_output(out: &mut String, output: &Value, indent: usize) {
    let Some(map) = output.as_object() else {
        write_value(out, output, indent);
        return;
    };
    let ot = map.get("output_type").and_then(Value::as_str).unwrap_or("");
    let bundle = ot == "execute_result" || ot == "display_data";
    let e = map
        .iter()
        .map(|(k, v)| {
            let w: Writer = match (k.as_str(), v) {
                ("data", _) if bundle => {
                    Box::new(move |o: &mut String, i| write_mimebundle(o, v, i))
                }
                ("text", Value::String(s)) if ot == "stream" => {
                    Box::new(move |o: &mut String, i| write_split_str(o, s, i))
                }
                _ => Box::new(move |o: &mut String, i| write_value(o, v, i)),
            };
            (k.as_str(), w)
        })
        .collect();
    write_entries(out, e, indent);
}

/// A random cell id like nbformat's (`uuid4().hex[:8]`).
pub fn new_cell_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

impl Notebook {
    /// An empty nbformat 4.5 notebook.
    pub fn new() -> Notebook {
        Notebook {
            nbformat_minor: 5,
            metadata: Map::new(),
            cells: Vec::new(),
            extra: Map::new(),
        }
    }

    /// Parses notebook JSON text.
    pub fn from_json_str(s: &str) -> Result<Notebook, NotebookError> {
        let v: Value = serde_json::from_str(s).map_err(|e| NotebookError::Json(e.to_string()))?;
        Notebook::from_value(v)
    }

    /// Parses notebook JSON bytes (UTF-8, an optional BOM is accepted).
    pub fn from_slice(b: &[u8]) -> Result<Notebook, NotebookError> {
        let b = b.strip_prefix(b"\xef\xbb\xbf").unwrap_or(b);
        let s = std::str::from_utf8(b)
            .map_err(|e| NotebookError::Json(format!("the file is not UTF-8 text ({e})")))?;
        Notebook::from_json_str(s)
    }

    /// Reads a notebook file.
    pub fn read(path: impl AsRef<Path>) -> Result<Notebook, NotebookError> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|source| NotebookError::Io {
            op: "cannot read",
            path: path.into(),
            source,
        })?;
        Notebook::from_slice(&bytes)
    }

    /// Builds a notebook from parsed JSON.
    pub fn from_value(v: Value) -> Result<Notebook, NotebookError> {
        let Value::Object(mut root) = v else {
            return Err(NotebookError::NotANotebook(format!(
                "the top level is {}, a notebook is a JSON object",
                type_name(&v)
            )));
        };
        let major = match root.remove("nbformat") {
            Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64().unwrap_or(0),
            Some(other) => {
                return Err(NotebookError::NotANotebook(format!(
                    "'nbformat' must be an integer, found {}",
                    type_name(&other)
                )))
            }
            None => {
                return Err(NotebookError::NotANotebook(
                    "no 'nbformat' key (is this a Jupyter .ipynb file?)".into(),
                ))
            }
        };
        if major < 4 {
            return Err(NotebookError::NotANotebook(format!(
                "nbformat {major} is not supported, convert with \
                 `jupyter nbconvert --to notebook --nbformat 4 FILE`"
            )));
        }
        if major > 4 {
            return Err(NotebookError::NotANotebook(format!(
                "nbformat {major} is newer than the supported version 4"
            )));
        }
        let nbformat_minor = match root.remove("nbformat_minor") {
            Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64().unwrap_or(0),
            Some(other) => {
                return Err(NotebookError::Malformed(format!(
                    "'nbformat_minor' must be an integer, found {}",
                    type_name(&other)
                )))
            }
            None => return Err(NotebookError::Malformed("missing 'nbformat_minor'".into())),
        };
        let mut metadata = match root.remove("metadata") {
            Some(Value::Object(m)) => m,
            None => Map::new(),
            Some(other) => {
                return Err(NotebookError::Malformed(format!(
                    "'metadata' must be an object, found {}",
                    type_name(&other)
                )))
            }
        };
        for k in ["orig_nbformat", "orig_nbformat_minor", "signature"] {
            metadata.remove(k);
        }
        let cells = match root.remove("cells") {
            Some(Value::Array(list)) => list
                .into_iter()
                .enumerate()
                .map(|(i, c)| Cell::from_value(c, i + 1))
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(NotebookError::Malformed(format!(
                    "'cells' must be a list, found {}",
                    type_name(&other)
                )))
            }
            None => return Err(NotebookError::Malformed("missing 'cells'".into())),
        };
        Ok(Notebook {
            nbformat_minor,
            metadata,
            cells,
            extra: root,
        })
    }

    /// The notebook as nbformat writes it (`nbformat.write`): sorted keys,
    /// 1-space indent, multi-line strings split into lists, trailing newline.
    pub fn to_json_string(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut e: Vec<(&str, Writer<'_>)> = vec![
            (
                "cells",
                Box::new(|o: &mut String, i| {
                    pyjson::write_array(o, self.cells.iter(), i, |o, c, i| c.write(o, i))
                }),
            ),
            (
                "metadata",
                Box::new(|o: &mut String, i| pyjson::write_object(o, &self.metadata, i)),
            ),
            ("nbformat", Box::new(|o: &mut String, _| o.push('4'))),
            (
                "nbformat_minor",
                Box::new(|o: &mut String, _| o.push_str(&self.nbformat_minor.to_string())),
            ),
        ];
        for (k, v) in &self.extra {
            e.push((k, Box::new(move |o: &mut String, i| write_value(o, v, i))));
        }
        write_entries(&mut out, e, 0);
        out.push('\n');
        out
    }

    /// Writes [`Notebook::to_json_string`] to `w`.
    pub fn write_to(&self, mut w: impl Write) -> io::Result<()> {
        w.write_all(self.to_json_string().as_bytes())
    }

    /// Saves atomically: see [`write_atomic`]. On error the previous file is
    /// untouched.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), NotebookError> {
        let path = path.as_ref();
        write_atomic(path, self.to_json_string().as_bytes()).map_err(|source| NotebookError::Io {
            op: "cannot write",
            path: path.into(),
            source,
        })
    }

    /// The language the way papermill finds it: `metadata.language_info.name`,
    /// else `metadata.kernelspec.language`.
    pub fn language(&self) -> Option<&str> {
        let get = |a: &str, b: &str| {
            self.metadata
                .get(a)
                .and_then(|m| m.get(b))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        get("language_info", "name").or_else(|| get("kernelspec", "language"))
    }

    /// `metadata.kernelspec.name`.
    pub fn kernel_name(&self) -> Option<&str> {
        self.metadata
            .get("kernelspec")
            .and_then(|k| k.get("name"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Like `nbformat.v4.upgrade` for 4.x notebooks: below 4.5, gives every
    /// cell a random `id` and sets `nbformat_minor` to 5.
    pub fn upgrade_minor(&mut self) {
        if self.nbformat_minor < 5 {
            for c in &mut self.cells {
                c.extra.insert("id".into(), Value::String(new_cell_id()));
            }
            self.nbformat_minor = 5;
        }
    }

    /// Index of the first cell carrying `tag` (papermill's
    /// `find_first_tagged_cell_index`).
    pub fn first_tagged(&self, tag: &str) -> Option<usize> {
        self.cells.iter().position(|c| c.has_tag(tag))
    }
}

impl Default for Notebook {
    fn default() -> Self {
        Notebook::new()
    }
}

/// Where an output leads, if noyau may write there: a symlink is followed
/// one link at a time, and each must be the user's own (or root's). An
/// output often lies in a shared project directory, where another user
/// could plant `OUT -> ~/.bashrc` and have the user's next save replace
/// that file with a notebook; or, behind the user's own link into a
/// shared directory, replace the file it names with such a link. A link
/// to nothing yet is followed to the file it names, which the save makes.
/// Also gives what is at that path, if anything.
fn followed(path: &Path, me: u32) -> io::Result<(PathBuf, Option<fs::Metadata>)> {
    /// As the kernel's limit (`ELOOP` past it).
    const MAX_LINKS: usize = 40;
    let mut at = path.to_path_buf();
    for _ in 0..=MAX_LINKS {
        let link = match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => m,
            found => return Ok((at, found.ok())),
        };
        let owner = link.uid();
        if owner != me && owner != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is a symbolic link of another user's (uid {owner}): noyau writes \
                     through no link but yours; remove it or name another output",
                    at.display()
                ),
            ));
        }
        let next = fs::read_link(&at)?;
        at = match at.parent() {
            Some(dir) => dir.join(next),
            None => next,
        };
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{}: more than {MAX_LINKS} symbolic links in a row; name the file itself",
            path.display()
        ),
    ))
}

/// Replaces `path` with `contents` atomically; see [`write_atomic_with`].
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |f| f.write_all(contents))
}

/// Writes a temporary file in the target's directory with `fill`, fsyncs it,
/// gives it the permissions of the file it replaces if that is the user's
/// (else, and for new files, 0666 less the umask; it is 0600 until then),
/// renames it over the
/// target and fsyncs the directory. A symlink target is followed (the link
/// stays) when each link on the way is the user's own or root's, else
/// refused ([`followed`]). If anything fails the
/// temporary file is removed, the previous file is untouched and the error
/// returned.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    let (target, there) = followed(path, me)?;
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?
        .to_string_lossy()
        .into_owned();
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Another user's file (in a shared directory) lends no mode: a 0666
    // one would leave the user's notebook writable by all.
    let old_perms = there
        .filter(|m| m.is_file() && m.uid() == me)
        .map(|m| m.permissions());

    // No one else may open the next version while it is written: one that
    // others may read then would hand each saved version of a private
    // notebook to whoever opened it (an open file stays readable).
    let (mut file, mut tmp) = create_temp(&dir, &name)?;
    let result = (|| {
        fill(&mut file)?;
        file.flush()?;
        match (&old_perms, &tmp) {
            (Some(p), _) => file.set_permissions(p.clone())?,
            (None, None) => {} // unnamed: it has a new file's mode already
            (None, Some(_)) => file.set_permissions(new_file_permissions())?,
        }
        file.sync_all()?;
        let named = match &tmp {
            Some(p) => p.clone(),
            None => tmp.insert(name_unnamed(&file, &dir, &name)?).clone(),
        };
        drop(file);
        fs::rename(named, &target)
    })();
    if let Err(e) = result {
        if let Some(tmp) = tmp {
            let _ = fs::remove_file(tmp);
        }
        return Err(e);
    }
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A new file's mode where the temporary file had a name (no
/// `O_TMPFILE`): 0666 less the umask, as a plain `open` would give (a
/// directory's default ACL is not applied then). The umask is read from
/// /proc (setting it to learn it would race with other threads); without
/// /proc, 0600.
fn new_file_permissions() -> fs::Permissions {
    let umask = fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        let line = s.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(line.trim(), 8).ok()
    });
    fs::Permissions::from_mode(umask.map_or(0o600, |m| 0o666 & !m))
}

/// The file the next version is written to: unnamed (`O_TMPFILE`, no
/// path: None) where the filesystem has them, made with the mode a new
/// file gets in `dir` (its umask, and a project directory's default ACL,
/// which a team's group access often comes from); else named, 0600 (NFS
/// and some Lustre have no `O_TMPFILE`).
fn create_temp(dir: &Path, name: &str) -> io::Result<(File, Option<PathBuf>)> {
    use std::os::unix::fs::OpenOptionsExt;
    // naming it later goes through /proc/self/fd: without /proc, a name now
    if !Path::new("/proc/self/fd").is_dir() {
        return create_named(dir, name);
    }
    let unnamed = OpenOptions::new()
        .write(true)
        .mode(0o666)
        .custom_flags(libc_o_tmpfile())
        .open(dir);
    match unnamed {
        Ok(f) => Ok((f, None)),
        // unsupported there (EOPNOTSUPP, or EISDIR/EINVAL from older kernels)
        Err(e) if !matches!(e.raw_os_error(), Some(code) if unsupported(code)) => Err(e),
        Err(_) => create_named(dir, name),
    }
}

/// A named temporary file beside the output, 0600.
fn create_named(dir: &Path, name: &str) -> io::Result<(File, Option<PathBuf>)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut last = None;
    for _ in 0..64 {
        let tmp = temp_name(dir, name);
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true).mode(0o600);
        match opts.open(&tmp) {
            Ok(f) => return Ok((f, Some(tmp))),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("cannot create a temporary file")))
}

/// `O_TMPFILE`'s flags (it includes `O_DIRECTORY`).
fn libc_o_tmpfile() -> i32 {
    nix::fcntl::OFlag::O_TMPFILE.bits()
}

/// An `O_TMPFILE` error that means "not here", not "cannot".
fn unsupported(code: i32) -> bool {
    use nix::errno::Errno;
    [Errno::EOPNOTSUPP, Errno::EISDIR, Errno::EINVAL]
        .iter()
        .any(|e| *e as i32 == code)
}

/// A fresh temporary name beside the output.
fn temp_name(dir: &Path, name: &str) -> PathBuf {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..12];
    dir.join(format!(".{name}.{}.{tag}.tmp", std::process::id()))
}

/// Gives the unnamed, complete `file` a temporary name in `dir` (through
/// /proc/self/fd: linking an open file needs no privilege that way), to
/// be renamed over the output.
fn name_unnamed(file: &File, dir: &Path, name: &str) -> io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    let from = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let at = nix::fcntl::AT_FDCWD;
    for _ in 0..64 {
        let tmp = temp_name(dir, name);
        match nix::unistd::linkat(at, &from, at, &tmp, nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW) {
            Ok(()) => return Ok(tmp),
            Err(nix::errno::Errno::EEXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::other("cannot name the temporary file"))
}
