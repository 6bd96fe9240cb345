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

/// A finished entry under `home`, as the user `uid` would plant it (all
/// of it theirs, from `home` down).
fn plant(home: &Path, key: &str, uid: u32) {
    let entry = home.join("noyau/envs").join(key);
    std::fs::create_dir_all(&entry).unwrap();
    let rec = json!({"key": key, "planted": true});
    std::fs::write(entry.join("noyau-env.json"), rec.to_string()).unwrap();
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o755)).unwrap();
    for p in [
        home.to_path_buf(),
        home.join("noyau"),
        home.join("noyau/envs"),
        entry.join("noyau-env.json"),
        entry,
    ] {
        chown(p, Some(uid), Some(uid)).unwrap();
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
    if !noyau_trust::testing::root() {
        return;
    }
    plant(&home, "k", NOBODY);
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
