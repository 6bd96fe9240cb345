//! The project's directory is the one the notebook was read from: whoever
//! can write its parent cannot, once the notebook was read, swap it for a
//! link to a directory of the user's and have a file there read for the
//! notebook. One test in its own binary: it sets `XDG_CONFIG_HOME` and
//! `NOYAU_SYSTEM_CONFIG` for the process.

use noyau_env::sources::from_cell_env;

/// `proj/nb.ipynb` is read (its directory anchored), then `proj` is
/// renamed and replaced by a link to a directory holding an `env.toml`
/// with a secret: a cell's `--env env.toml` is refused as the directory
/// having changed, and the secret is not read. (On the code of before,
/// which resolved the directory's path at each use, the secret was read:
/// checked by running this test with the anchor's checks removed.)
#[test]
fn a_notebooks_directory_swapped_after_it_was_read_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let config = d.path().join("config");
    std::fs::create_dir(&config).unwrap();
    std::env::set_var("XDG_CONFIG_HOME", &config);
    std::env::set_var("NOYAU_SYSTEM_CONFIG", d.path().join("none.toml"));
    let (proj, victim) = (d.path().join("proj"), d.path().join("victim"));
    std::fs::create_dir(&proj).unwrap();
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(proj.join("nb.ipynb"), "{}").unwrap();
    std::fs::write(proj.join("env.toml"), "kind = \"python\"\n").unwrap();
    std::fs::write(
        victim.join("env.toml"),
        "kind = \"python\"\nrequirements = [\"ghp-SECRET\"]\n",
    )
    .unwrap();
    let (_, project) = noyau_trust::anchor::read_notebook(&proj.join("nb.ipynb")).unwrap();
    // Before the swap the project's file is read.
    let source = from_cell_env("env.toml", &project).unwrap();
    assert!(source.table.get("requirements").is_none());
    std::fs::rename(&proj, d.path().join("proj.x")).unwrap();
    std::os::unix::fs::symlink(&victim, &proj).unwrap();
    let e = from_cell_env("env.toml", &project)
        .map(|s| s.table)
        .expect_err("the swapped directory's file was read")
        .to_string();
    assert!(
        e.contains("changed or was remounted while noyau used it") && !e.contains("SECRET"),
        "{e}"
    );
}
