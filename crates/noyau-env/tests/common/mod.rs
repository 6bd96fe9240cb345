//! What the wildcard tests share: a project under the user's own
//! `trusted_projects = ["…/src/*"]`, every directory the user's and closed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `d/src/proj` (and `d/src/proj/SUB` for each of `subs`), 0755, under a
/// wildcard of the user's config in `d/config`; no site file. Sets
/// `XDG_CONFIG_HOME` and `NOYAU_SYSTEM_CONFIG` for the process, so each
/// test using it is alone in its binary.
pub fn wildcard_project(d: &Path, subs: &[&str]) -> PathBuf {
    let src = d.join("src");
    let dir = src.join("proj");
    std::fs::create_dir_all(&dir).unwrap();
    chmod(&src, 0o755);
    chmod(&dir, 0o755);
    for s in subs {
        std::fs::create_dir_all(dir.join(s)).unwrap();
        chmod(&dir.join(s), 0o755);
    }
    let config = d.join("config");
    std::fs::create_dir_all(config.join("noyau")).unwrap();
    std::fs::write(
        config.join("noyau/config.toml"),
        format!("trusted_projects = [\"{}/*\"]\n", src.display()),
    )
    .unwrap();
    std::env::set_var("XDG_CONFIG_HOME", &config);
    std::env::set_var("NOYAU_SYSTEM_CONFIG", d.join("none.toml"));
    dir
}

/// The project `dir`, anchored now.
pub fn pd(dir: &std::path::Path) -> noyau_trust::anchor::ProjectDir {
    noyau_trust::anchor::ProjectDir::open(dir).unwrap()
}
