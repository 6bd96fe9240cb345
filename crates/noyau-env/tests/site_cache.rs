//! A site's read-only cache (`NOYAU_ENV_SITE_CACHE`): an admin's entries
//! and data files are used before the user's own, without building or
//! fetching anything; one not owned by the cache's owner, or writable by
//! others, or a data file without its description, is refused (saying
//! why) and the user's own cache is used instead. Entries
//! owned by other users need root to make (`chown`): `#[ignore]`d, run by
//! `scripts/test` as root. One test in its own binary: it sets
//! `NOYAU_ENV_SITE_CACHE` for the process.

use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;

use noyau_env::data::{DataRef, Store};
use noyau_env::{prepare, realise_job, Cache, EnvSpec};
use serde_json::json;

const NOBODY: u32 = 65534;

/// A finished python entry as a build leaves it (no venv: nothing runs it).
fn entry(root: &Path, key: &str) {
    let dir = root.join(key);
    std::fs::create_dir_all(dir.join("venv/bin")).unwrap();
    let lock = "six==1.16.0 --hash=sha256:00\n";
    let rec = json!({"kind": "python", "key": key, "lock": lock,
                     "lock_sha256": noyau_env::sha256_hex(lock.as_bytes()), "network": {}});
    std::fs::write(dir.join("noyau-env.json"), rec.to_string()).unwrap();
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
#[ignore = "needs root: entries owned by another user (scripts/test runs this as root)"]
fn the_sites_entries_come_first_and_only_its_owners_are_trusted() {
    assert_eq!(
        unsafe { libc::getuid() },
        0,
        "run as root (scripts/test does)"
    );
    let t = tempfile::tempdir().unwrap();
    let site = t.path().join("site");
    std::env::set_var("NOYAU_ENV_SITE_CACHE", &site);
    let spec =
        EnvSpec::from_value(json!({"requirements": ["six==1.16.0"], "notebook_dir": t.path()}))
            .unwrap()
            .normalise()
            .unwrap();
    let key = spec.cache_key();
    let mine = Cache::new(t.path().join("mine"));
    let quiet = &mut |_: &str| {};

    // The admin's entry and data file: used as they are.
    entry(&site, &key);
    let data = b"site data";
    let sha = noyau_env::sha256_hex(data);
    std::fs::create_dir_all(site.join("data/sha256")).unwrap();
    std::fs::write(site.join(format!("data/sha256/{sha}")), data).unwrap();
    // Described as the store describes what it fetched (an admin fills
    // the site cache with noyau): a file is used only for its own hash.
    let about = json!({"sha256": sha, "size": data.len(), "url": "http://127.0.0.1:9/x.bin"});
    std::fs::write(
        site.join(format!("data/sha256/{sha}.json")),
        about.to_string(),
    )
    .unwrap();
    // An unreachable URL: found by its hash, never fetched.
    let r = DataRef::new("http://127.0.0.1:9/x.bin", &sha, None, t.path()).unwrap();
    let p = prepare(Some(&spec), std::slice::from_ref(&r), &mine, quiet).unwrap();
    let e = p.entry.as_ref().unwrap();
    assert!(e.site && e.cache == site, "{e:?}");
    assert!(
        p.data[0].site && p.data[0].path().starts_with(&site),
        "{:?}",
        p.data
    );
    assert!(!mine.root().exists(), "the user's cache was touched");
    let job = realise_job(Some(&spec), Some(&p), &mine, quiet)
        .unwrap()
        .unwrap();
    assert!(job.record["key"] == json!(key));
    drop(job);

    // Owned by someone else than the cache's owner: refused, and the
    // user's own (already built here) is used instead.
    chown_all(&site.join(&key), NOBODY);
    let why = Cache::site(&site).lookup(&key).unwrap_err().to_string();
    assert!(
        why.contains("belongs to uid 65534, not to the site cache's owner (uid 0)"),
        "{why}"
    );
    entry(mine.root(), &key);
    let mut lines = Vec::new();
    let p = prepare(Some(&spec), &[], &mine, &mut |l: &str| {
        lines.push(l.to_string())
    })
    .unwrap();
    assert!(!p.entry.as_ref().unwrap().site, "{p:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("not using the site cache's entry")),
        "{lines:?}"
    );

    // The owner's, but writable by the group: refused too.
    chown_all(&site.join(&key), 0);
    std::fs::set_permissions(site.join(&key), std::fs::Permissions::from_mode(0o775)).unwrap();
    let why = Cache::site(&site).lookup(&key).unwrap_err().to_string();
    assert!(why.contains("writable by its group"), "{why}");

    // The site's owner is not the user: the user's own file there is not
    // the site's (a site cache is trusted for its owner only).
    std::fs::set_permissions(site.join(&key), std::fs::Permissions::from_mode(0o755)).unwrap();
    chown(&site, Some(NOBODY), None).unwrap();
    let why = Cache::site(&site).lookup(&key).unwrap_err().to_string();
    assert!(
        why.contains("belongs to uid 0, not to the site cache's owner (uid 65534)"),
        "{why}"
    );
    let e = Store::of(&Cache::site(&site))
        .find(&sha, "x", "u")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not to the site cache's owner"), "{e}");

    // A file an admin copied in by hand, without its description: not
    // used, and the user is told why (not silently fetched again).
    chown(&site, Some(0), None).unwrap();
    std::fs::remove_file(site.join(format!("data/sha256/{sha}.json"))).unwrap();
    std::fs::write(t.path().join("x.bin"), data).unwrap();
    let r = DataRef::new("x.bin", &sha, None, t.path()).unwrap();
    let mut lines = Vec::new();
    let p = prepare(None, std::slice::from_ref(&r), &mine, &mut |l: &str| {
        lines.push(l.to_string())
    })
    .unwrap();
    assert!(!p.data[0].site, "{:?}", p.data);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("not using the site cache's copy of x.bin")
                && l.contains(&format!(
                    "has no readable {sha}.json naming its sha256 and size"
                ))),
        "{lines:?}"
    );
    std::env::remove_var("NOYAU_ENV_SITE_CACHE");
}
