//! The user's cache without a home (no `XDG_CACHE_HOME` nor `HOME`, or
//! empty or relative ones: a job or service started with an empty
//! environment): it is `$TMPDIR/noyau-cache-EUID/noyau/envs`, never under
//! the working directory, and one that another user made first is refused
//! before anything in it is trusted. Giving the planted directory away (to
//! `nobody`) needs root, as scripts/test runs. One test in its own binary:
//! it sets `TMPDIR`, `HOME` and `XDG_CACHE_HOME` for the process.

use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::path::Path;

use noyau_env::cache::private_root;
use noyau_env::Cache;
use serde_json::json;

const NOBODY: u32 = 65534;

/// A finished entry, as another user would plant it.
fn plant(root: &Path, key: &str) {
    std::fs::create_dir_all(root.join(key)).unwrap();
    let rec = json!({"key": key, "planted": true});
    std::fs::write(root.join(key).join("noyau-env.json"), rec.to_string()).unwrap();
}

fn chown_all(p: &Path, uid: u32) {
    chown(p, Some(uid), Some(uid)).unwrap();
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            chown_all(&e.path(), uid);
        }
    }
}

#[test]
fn without_a_home_the_cache_is_a_private_dir_in_tmp_and_a_planted_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    std::env::set_var("TMPDIR", tmp.path());
    std::env::remove_var("NOYAU_ENV_CACHE");
    std::env::remove_var("NOYAU_ENV_SITE_CACHE");
    let home = tmp
        .path()
        .join(format!("noyau-cache-{}", noyau_trust::me()));
    for (xdg, h) in [(None, None), (Some(""), Some("")), (Some("rel"), Some("."))] {
        match xdg {
            Some(v) => std::env::set_var("XDG_CACHE_HOME", v),
            None => std::env::remove_var("XDG_CACHE_HOME"),
        }
        match h {
            Some(v) => std::env::set_var("HOME", v),
            None => std::env::remove_var("HOME"),
        }
        assert_eq!(private_root(), home.join("noyau/envs"), "{xdg:?} {h:?}");
        assert_eq!(Cache::at_default().root(), home.join("noyau/envs"));
    }

    // Another user made it first, with an entry the cache's owner (they)
    // would be trusted for.
    if noyau_trust::me() != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root under CI"
        );
        return;
    }
    plant(&home.join("noyau/envs"), "k");
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    chown_all(&home, NOBODY);
    let cache = Cache::at_default();
    let why = cache.lookup("k").unwrap_err().to_string();
    assert!(
        why.contains(&format!("{} belongs to uid 65534", home.display())),
        "{why}"
    );
    let e = cache
        .get_or_build("j", &mut |_: &str| {}, |_, _| Ok(json!({"key": "j"})))
        .unwrap_err();
    assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
    assert!(!home.join("noyau/envs/j").exists() && !home.join("noyau/envs/j.lock").exists());

    // Made by the user: 0700, and used.
    std::fs::remove_dir_all(&home).unwrap();
    let (entry, _) = Cache::at_default()
        .get_or_build("j", &mut |_: &str| {}, |_, _| Ok(json!({"key": "j"})))
        .unwrap();
    assert!(entry.starts_with(&home));
    let meta = std::fs::symlink_metadata(&home).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o700));
    assert_eq!(
        Cache::at_default().lookup("j").unwrap(),
        Some(json!({"key": "j"}))
    );
}
