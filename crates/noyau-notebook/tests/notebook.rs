use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use noyau_notebook::{write_atomic_with, Cell, Notebook, NotebookError};

const INPUT: &str = include_str!("data/unknown_keys.ipynb");
/// What Python's nbformat 5.11 writes for INPUT (`nbformat.write(nbformat.read(...))`).
const NBFORMAT_OUT: &str = include_str!("data/unknown_keys.nbformat.ipynb");

#[test]
fn writes_exactly_what_nbformat_writes() {
    let nb = Notebook::from_json_str(INPUT).unwrap();
    assert_eq!(nb.to_json_string(), NBFORMAT_OUT);
}

#[test]
fn round_trip_of_nbformat_output_is_byte_identical() {
    let nb = Notebook::from_json_str(NBFORMAT_OUT).unwrap();
    assert_eq!(nb.to_json_string(), NBFORMAT_OUT);
    // and the model holds joined text and the unknown keys
    assert_eq!(nb.cells[1].source, "x = 1\nprint(x)");
    assert_eq!(nb.cells[0].extra["cell_unknown"], 7);
    assert_eq!(nb.extra["zz_top_unknown"]["b"], 1);
    assert_eq!(
        nb.cells[1].outputs.as_ref().unwrap()[0]["out_unknown"],
        "keep"
    );
    assert_eq!(nb.cells[1].execution_count(), Some(3));
    assert!(nb.cells[0].has_tag("x"));
    assert_eq!(nb.language(), Some("python"));
    assert_eq!(nb.kernel_name(), Some("python3"));
}

/// Found by fuzz/notebook_read: a number too big for an integer was parsed
/// to a float one way, written, then parsed to another on the next read, so
/// each save changed it. Writes must be stable from the first one.
#[test]
fn big_numbers_are_stable_across_saves() {
    let digits = "7".repeat(105);
    let input = format!(
        r#"{{"nbformat": 4, "nbformat_minor": 5, "metadata": {{"x": 3{digits}, "y": 1.7976931348623157e308, "z": 5e-324}}, "cells": []}}"#
    );
    let first = Notebook::from_json_str(&input).unwrap().to_json_string();
    let second = Notebook::from_json_str(&first).unwrap().to_json_string();
    assert_eq!(first, second);
    assert!(first.contains("3.7777777777777776e+105"), "{first}");
}

fn err(s: &str) -> String {
    match Notebook::from_json_str(s) {
        Ok(_) => panic!("accepted: {s}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_inputs_are_named() {
    assert!(err("{\"nbformat\": 4,").starts_with("invalid JSON: "));
    assert_eq!(
        err("[1]"),
        "not a notebook: the top level is a list, a notebook is a JSON object"
    );
    assert_eq!(
        err("{}"),
        "not a notebook: no 'nbformat' key (is this a Jupyter .ipynb file?)"
    );
    assert_eq!(
        err(r#"{"nbformat": 3, "nbformat_minor": 0, "worksheets": []}"#),
        "not a notebook: nbformat 3 is not supported, convert with \
         `jupyter nbconvert --to notebook --nbformat 4 FILE`"
    );
    assert!(err(r#"{"nbformat": 5, "nbformat_minor": 0}"#).contains("newer"));
    assert_eq!(
        err(r#"{"nbformat": 4, "metadata": {}, "cells": []}"#),
        "malformed notebook: missing 'nbformat_minor'"
    );
    let cell2 = |c: &str| {
        err(&format!(
            r#"{{"nbformat": 4, "nbformat_minor": 5, "metadata": {{}},
                "cells": [{{"cell_type": "markdown", "metadata": {{}}, "source": ""}}, {c}]}}"#
        ))
    };
    assert_eq!(
        cell2(r#"{"cell_type": "code", "metadata": {}}"#),
        "malformed notebook: cell 2: missing 'source'"
    );
    assert_eq!(
        cell2(r#"{"source": ""}"#),
        "malformed notebook: cell 2: missing 'cell_type'"
    );
    assert_eq!(
        cell2("3"),
        "malformed notebook: cell 2: expected an object, found a number"
    );
    assert_eq!(
        cell2(r#"{"cell_type": "code", "source": ["a", 1]}"#),
        "malformed notebook: cell 2: 'source' list holds a non-string"
    );
    assert_eq!(
        cell2(r#"{"cell_type": "code", "source": "", "outputs": [{"text": "x"}]}"#),
        "malformed notebook: cell 2: output 1: missing 'output_type'"
    );
    assert!(matches!(
        Notebook::from_slice(b"\xff\xfe"),
        Err(NotebookError::Json(_))
    ));
}

#[test]
fn lenient_where_nbformat_reads_anyway() {
    // a code cell without outputs/execution_count/metadata gets them back
    let nb = Notebook::from_json_str(
        r#"{"nbformat": 4, "nbformat_minor": 2, "metadata": {}, "cells": [{"cell_type": "code", "source": "1"}]}"#,
    )
    .unwrap();
    let s = nb.to_json_string();
    assert!(s.contains("\"execution_count\": null"));
    assert!(s.contains("\"outputs\": []"));
}

#[test]
fn new_cells_and_upgrade() {
    let mut nb = Notebook::from_json_str(
        r#"{"nbformat": 4, "nbformat_minor": 4, "metadata": {}, "cells": [{"cell_type": "markdown", "metadata": {}, "source": "a"}]}"#,
    )
    .unwrap();
    nb.upgrade_minor();
    assert_eq!(nb.nbformat_minor, 5);
    assert_eq!(nb.cells[0].id().unwrap().len(), 8);
    nb.cells.push(Cell::new_code("print(1)\n").with_id("abc"));
    let again = Notebook::from_json_str(&nb.to_json_string()).unwrap();
    assert_eq!(again, nb);
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn atomic_save_keeps_permissions_and_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.ipynb");
    fs::write(&p, "old").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    let nb = Notebook::from_json_str(NBFORMAT_OUT).unwrap();
    nb.save(&p).unwrap();
    assert_eq!(fs::read_to_string(&p).unwrap(), NBFORMAT_OUT);
    assert_eq!(mode(&p), 0o640);
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left"
    );

    // a new file gets the usual umask-based mode, not tempfile's 0600
    let q = dir.path().join("new.ipynb");
    nb.save(&q).unwrap();
    assert_ne!(mode(&q) & 0o044, 0, "mode {:o}", mode(&q));
}

/// While it is written, the next version of a notebook is the user's
/// alone, whatever mode it gets once full: a neighbour who opened it then
/// would keep reading every saved version of a private notebook. It has
/// no name at all (`O_TMPFILE`), or a 0600 one where the filesystem has
/// no unnamed files.
#[test]
fn a_save_is_private_until_it_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.ipynb");
    fs::write(&p, "old").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    write_atomic_with(&p, |f| {
        use std::io::Write;
        for entry in fs::read_dir(dir.path())? {
            let entry = entry?;
            let m = entry.metadata()?.permissions().mode() & 0o7777;
            let named = entry.file_name() != "out.ipynb";
            assert!(
                !named || m == 0o600,
                "{:?} is {m:o} while written",
                entry.file_name()
            );
        }
        f.write_all(b"new")
    })
    .unwrap();
    assert_eq!(mode(&p), 0o644, "the mode it replaces, once full");
    assert_eq!(fs::read_to_string(&p).unwrap(), "new");
}

#[test]
fn failed_write_leaves_previous_file_intact() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.ipynb");
    fs::write(&p, "previous complete notebook").unwrap();
    // like a disk filling up halfway through the write
    let e = write_atomic_with(&p, |f| {
        use std::io::Write;
        f.write_all(b"{\"partial")?;
        Err(std::io::Error::other("No space left on device"))
    })
    .unwrap_err();
    assert_eq!(e.to_string(), "No space left on device");
    assert_eq!(
        fs::read_to_string(&p).unwrap(),
        "previous complete notebook"
    );
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "temporary file removed"
    );

    // an unwritable destination is an error naming the path
    let nb = Notebook::new();
    let bad = dir.path().join("no/such/dir/x.ipynb");
    let msg = nb.save(&bad).unwrap_err().to_string();
    assert!(
        msg.starts_with("cannot write ") && msg.contains("no/such/dir"),
        "{msg}"
    );
}

#[test]
fn save_through_a_symlink_keeps_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.ipynb");
    let link = dir.path().join("link.ipynb");
    fs::write(&real, "x").unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    Notebook::new().save(&link).unwrap();
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(fs::read_to_string(&real)
        .unwrap()
        .contains("\"nbformat\": 4"));
}

#[test]
fn save_through_another_users_symlink_is_refused_and_its_target_kept() {
    // Giving the link to `nobody` needs root, as scripts/test runs.
    if !noyau_trust::testing::root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("bashrc");
    let link = dir.path().join("out.ipynb");
    fs::write(&canary, "keep me").unwrap();
    std::os::unix::fs::symlink(&canary, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
    let e = Notebook::new().save(&link).unwrap_err().to_string();
    assert!(
        e.contains("another user's (uid 65534)") && e.contains("name another output"),
        "{e}"
    );
    assert_eq!(fs::read_to_string(&canary).unwrap(), "keep me");
}

/// Behind the user's own link into a shared directory, another user
/// replaced the file it names with a link of theirs: refused, each link on
/// the way is checked. And another user's 0666 file replaced by a save
/// lends the notebook no mode.
#[test]
fn save_through_a_chain_with_another_users_link_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    if !noyau_trust::testing::root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("bashrc");
    let shared = dir.path().join("shared.ipynb");
    let mine = dir.path().join("out.ipynb");
    fs::write(&canary, "keep me").unwrap();
    std::os::unix::fs::symlink(&canary, &shared).unwrap();
    std::os::unix::fs::lchown(&shared, Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::symlink(&shared, &mine).unwrap();
    let e = Notebook::new().save(&mine).unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "{} is a symbolic link of another user's (uid 65534)",
            shared.display()
        )),
        "{e}"
    );
    assert_eq!(fs::read_to_string(&canary).unwrap(), "keep me");

    // The user's link to a link of their own to nothing yet: the file is made.
    let made = dir.path().join("made.ipynb");
    let via = dir.path().join("via.ipynb");
    std::os::unix::fs::symlink("made.ipynb", &via).unwrap();
    fs::remove_file(&mine).unwrap();
    std::os::unix::fs::symlink(&via, &mine).unwrap();
    Notebook::new().save(&mine).unwrap();
    assert!(fs::symlink_metadata(&mine)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(fs::read_to_string(&made)
        .unwrap()
        .contains("\"nbformat\": 4"));

    let theirs = dir.path().join("theirs.ipynb");
    fs::write(&theirs, "{}").unwrap();
    fs::set_permissions(&theirs, fs::Permissions::from_mode(0o666)).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    Notebook::new().save(&theirs).unwrap();
    let mode = fs::metadata(&theirs).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode & 0o022,
        0,
        "the notebook took another user's 0666: {mode:o}"
    );
}

/// The test venv's Python (it has nbformat): `NOYAU_TEST_PYTHON`, which
/// scripts/test sets, else the `.venv` scripts/test makes in the repository.
fn test_python() -> PathBuf {
    std::env::var_os("NOYAU_TEST_PYTHON")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"))
}

/// Checks with Python's nbformat that what we write validates and reads back
/// to the same bytes.
#[test]
#[ignore = "needs the test venv's Python with nbformat (NOYAU_TEST_PYTHON; scripts/test sets it and runs this)"]
fn nbformat_validates_our_output() {
    let py = test_python();
    assert!(
        py.exists(),
        "{} not found: set NOYAU_TEST_PYTHON to a Python with nbformat (scripts/test makes .venv)",
        py.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nb.ipynb");
    // nbformat's schema forbids unknown keys outside metadata: drop those.
    let mut nb = Notebook::from_json_str(INPUT).unwrap();
    nb.extra.clear();
    nb.cells[0].extra.remove("cell_unknown");
    let outs = nb.cells[1].outputs.as_mut().unwrap();
    outs.pop();
    outs[0].as_object_mut().unwrap().remove("out_unknown");
    nb.cells
        .push(Cell::new_code("print('é')\n").with_id("new1"));
    nb.save(&p).unwrap();
    let out = Command::new(&py)
        .arg("-c")
        .arg(
            "import sys, io, nbformat\n\
             s = open(sys.argv[1], encoding='utf-8').read()\n\
             nb = nbformat.reads(s, as_version=4)\n\
             nbformat.validate(nb)\n\
             b = io.StringIO(); nbformat.write(nb, b)\n\
             assert b.getvalue() == s, 'nbformat rewrites differently'\n",
        )
        .arg(&p)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{} -c …: {stderr}", py.display());
}
