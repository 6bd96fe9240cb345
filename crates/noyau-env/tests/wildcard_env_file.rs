//! A settings file a project names (`%%noyau on T --env envs/gpu.toml`, a
//! profile's `environment`) under the user's own `trusted_projects`
//! wildcard: what it names is trusted only if no one but the user or root
//! could have written it, nor the directories down to it, as a lock file
//! is. One test in its own binary: it sets `XDG_CONFIG_HOME` and
//! `NOYAU_SYSTEM_CONFIG` for the process.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use noyau_env::sources::{from_cell_env, merge};
use noyau_env::EnvError;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn an_env_file_others_could_write_is_not_trusted_under_a_wildcard() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    let dir = src.join("proj");
    let envs = dir.join("envs");
    std::fs::create_dir_all(&envs).unwrap();
    for p in [&src, &dir, &envs] {
        chmod(p, 0o755);
    }
    let config = d.path().join("config");
    std::fs::create_dir_all(config.join("noyau")).unwrap();
    std::fs::write(
        config.join("noyau/config.toml"),
        format!("trusted_projects = [\"{}/*\"]\n", src.display()),
    )
    .unwrap();
    std::env::set_var("XDG_CONFIG_HOME", &config);
    std::env::set_var("NOYAU_SYSTEM_CONFIG", d.path().join("none.toml"));
    let file = envs.join("gpu.toml");
    std::fs::write(
        &file,
        "kind = \"python\"\nrequirements = [\"pkg @ https://example.invalid/pkg-1.0-py3-none-any.whl\"]\n",
    )
    .unwrap();
    chmod(&file, 0o644);
    let run = || {
        let s = from_cell_env("envs/gpu.toml", &dir)?;
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
