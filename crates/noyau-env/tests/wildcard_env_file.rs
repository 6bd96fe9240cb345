//! A settings file a project names (`%%noyau on T --env envs/gpu.toml`, a
//! profile's `environment`) under the user's own `trusted_projects`
//! wildcard: what it names is trusted only if no one but the user or root
//! could have written it, nor the directories down to it, as a lock file
//! is. One test in its own binary: it sets `XDG_CONFIG_HOME` and
//! `NOYAU_SYSTEM_CONFIG` for the process.

mod common;

use common::{chmod, pd, wildcard_project};
use noyau_env::sources::{from_cell_env, merge};
use noyau_env::EnvError;

#[test]
fn an_env_file_others_could_write_is_not_trusted_under_a_wildcard() {
    let d = tempfile::tempdir().unwrap();
    let dir = wildcard_project(d.path(), &["envs"]);
    let envs = dir.join("envs");
    let file = envs.join("gpu.toml");
    std::fs::write(
        &file,
        "kind = \"python\"\nrequirements = [\"pkg @ https://example.invalid/pkg-1.0-py3-none-any.whl\"]\n",
    )
    .unwrap();
    chmod(&file, 0o644);
    let run = || {
        let s = from_cell_env("envs/gpu.toml", &pd(&dir))?;
        merge(&[s], &dir)
    };
    // All of it the user's and closed: its direct reference is trusted.
    let spec = run().unwrap().unwrap();
    assert!(!spec.wheels_only);
    // The file writable by the group: refused, saying why.
    chmod(&file, 0o664);
    let e = run().unwrap_err();
    assert!(matches!(e, EnvError::UntrustedCode(_)), "{e}");
    let e = e.to_string();
    assert!(
        e.contains(&format!(
            "{} is writable by its group or others (mode 0664)",
            file.display()
        )),
        "{e}"
    );
    // The file closed, the directory it is in writable by the group.
    chmod(&file, 0o644);
    chmod(&envs, 0o775);
    let e = run().unwrap_err();
    assert!(matches!(e, EnvError::UntrustedCode(_)), "{e}");
    let e = e.to_string();
    assert!(
        e.contains(&format!("{}", envs.display())) && e.contains("mode 0775"),
        "{e}"
    );
    chmod(&envs, 0o755);
    assert!(!run().unwrap().unwrap().wheels_only);
}
