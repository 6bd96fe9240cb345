//! A lock file under the user's own `trusted_projects` wildcard: its code
//! is trusted only if no one but the user or root could have written it
//! (theirs, not writable by group or others, not a link), as the
//! project's noyau.toml and directory must be. One test in its own
//! binary: it sets `XDG_CONFIG_HOME` and `NOYAU_SYSTEM_CONFIG` for the
//! process.

mod common;

use common::{chmod, pd, wildcard_project};
use noyau_env::sources::for_notebook;
use noyau_env::EnvError;

#[test]
fn a_lock_file_others_could_write_is_not_trusted_under_a_wildcard() {
    let d = tempfile::tempdir().unwrap();
    let dir = wildcard_project(d.path(), &[]);
    let project = dir.join("noyau.toml");
    std::fs::write(
        &project,
        "[environment]\nkind = \"python\"\nlock_file = \"r.lock\"\n",
    )
    .unwrap();
    chmod(&project, 0o644);
    let lock = dir.join("r.lock");
    std::fs::write(
        &lock,
        "pkg @ https://example.invalid/pkg-1.0-py3-none-any.whl\n",
    )
    .unwrap();
    chmod(&lock, 0o644);
    // All of it the user's and closed: the lock's direct reference is trusted.
    let spec = for_notebook(&pd(&dir), None, None, &dir).unwrap().unwrap();
    assert!(!spec.wheels_only);
    // The lock writable by the group: refused, saying why and what to do.
    chmod(&lock, 0o664);
    let e = for_notebook(&pd(&dir), None, None, &dir).unwrap_err();
    assert!(matches!(e, EnvError::UntrustedCode(_)), "{e}");
    let e = e.to_string();
    assert!(
        e.contains(&format!(
            "{} is writable by its group or others (mode 0664)",
            lock.display()
        )) && e.contains(&format!("`chmod g-w {}`", lock.display()))
            && e.contains("a wildcard trusts only directories, and the noyau.toml, lock file and settings files"),
        "{e}"
    );
    // A link to a lock elsewhere (the team's), even a closed one.
    let team = d.path().join("team.lock");
    std::fs::write(&team, "six==1.16.0\n").unwrap();
    chmod(&team, 0o644);
    std::fs::remove_file(&lock).unwrap();
    std::os::unix::fs::symlink("../../team.lock", &lock).unwrap();
    // (The link leads out of the project: refused as outside it first.)
    let e = for_notebook(&pd(&dir), None, None, &dir).unwrap_err();
    assert!(matches!(e, EnvError::OutsideProject { .. }), "{e}");
    let inside = dir.join("team.lock");
    std::fs::rename(&team, &inside).unwrap();
    std::fs::remove_file(&lock).unwrap();
    std::os::unix::fs::symlink("team.lock", &lock).unwrap();
    // A lock naming no code, by a link: not trusted, so wheels only.
    let spec = for_notebook(&pd(&dir), None, None, &dir).unwrap().unwrap();
    assert!(spec.wheels_only, "a linked lock is not trusted");
    std::fs::remove_file(&lock).unwrap();
    std::fs::write(&lock, "six==1.16.0\n").unwrap();
    chmod(&lock, 0o644);
    let spec = for_notebook(&pd(&dir), None, None, &dir).unwrap().unwrap();
    assert!(!spec.wheels_only, "the user's own closed lock is trusted");
    // A closed lock in a subdirectory the group may write in: its
    // directory is checked too (the group could have put it there).
    let deps = dir.join("deps");
    std::fs::create_dir(&deps).unwrap();
    chmod(&deps, 0o775);
    std::fs::rename(&lock, deps.join("r.lock")).unwrap();
    std::fs::write(
        &project,
        "[environment]\nkind = \"python\"\nlock_file = \"deps/r.lock\"\n",
    )
    .unwrap();
    let spec = for_notebook(&pd(&dir), None, None, &dir).unwrap().unwrap();
    assert!(spec.wheels_only, "a lock in a group-writable directory");
    chmod(&deps, 0o755);
    let spec = for_notebook(&pd(&dir), None, None, &dir).unwrap().unwrap();
    assert!(!spec.wheels_only, "a closed lock in a closed directory");
    // The user's own `--env` file may name a lock anywhere, by a link out
    // of its directory too (the wildcard's rules are for what a project
    // names, not for what the user gives).
    let mine = d.path().join("mine.lock");
    std::fs::write(&mine, "six==1.16.0\n").unwrap();
    std::os::unix::fs::symlink(&mine, dir.join("mine.lock")).unwrap();
    let env = dir.join("env.toml");
    std::fs::write(&env, "kind = \"python\"\nlock_file = \"mine.lock\"\n").unwrap();
    std::fs::write(&project, "[environment]\nkind = \"python\"\n").unwrap();
    let spec = for_notebook(&pd(&dir), None, Some(env.to_str().unwrap()), &dir)
        .unwrap()
        .unwrap();
    assert_eq!(spec.lock.as_deref(), Some("six==1.16.0\n"));
}
