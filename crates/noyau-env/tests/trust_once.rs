//! The trust of an environment's sources is decided once: merging a
//! notebook's sources reads the user's config file (its
//! `trusted_projects`) once, not once per key, check and file. One test
//! in its own binary: it sets `XDG_CONFIG_HOME` and
//! `NOYAU_SYSTEM_CONFIG` for the process.

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use noyau_env::sources::{from_metadata, from_noyau_toml, merge};
use noyau_trust::anchor::ProjectDir;

fn pd(dir: &std::path::Path) -> ProjectDir {
    ProjectDir::open(dir).unwrap()
}
use serde_json::json;

/// Two project sources (noyau.toml, the notebook's metadata) and the lock
/// file one names: the user's config file is opened once by the merge,
/// as the kernel counts opens (inotify). (Five times before.)
#[test]
fn merging_a_notebooks_sources_reads_the_trust_config_once() {
    let d = tempfile::tempdir().unwrap();
    let config = d.path().join("config");
    std::fs::create_dir_all(config.join("noyau")).unwrap();
    let user = config.join("noyau/config.toml");
    std::fs::write(&user, "trusted_projects = []\n").unwrap();
    std::env::set_var("XDG_CONFIG_HOME", &config);
    std::env::set_var("NOYAU_SYSTEM_CONFIG", d.path().join("none.toml"));
    let proj = d.path().join("proj");
    std::fs::create_dir(&proj).unwrap();
    std::fs::write(
        proj.join("noyau.toml"),
        "[environment]\nkind = \"python\"\nlock_file = \"r.lock\"\n",
    )
    .unwrap();
    std::fs::write(proj.join("r.lock"), "six==1.16.0\n").unwrap();
    let meta = json!({"noyau": {"environment": {"requirements": ["six"]}}});
    let sources: Vec<_> = [
        from_noyau_toml(&pd(&proj)).unwrap(),
        from_metadata(&meta, &pd(&proj)).unwrap(),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert_eq!(sources.len(), 2);
    let opens = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
    // (Closes watched too: the kernel merges an event into the same one
    // unread just before it, so opens alone would count as one.)
    let watched = AddWatchFlags::IN_OPEN | AddWatchFlags::IN_CLOSE_NOWRITE;
    opens.add_watch(&user, watched).unwrap();
    let spec = merge(&sources, &proj).unwrap().unwrap();
    assert!(spec.wheels_only, "untrusted: wheels only");
    let events = opens.read_events().map_or(0, |e| {
        e.iter()
            .filter(|e| e.mask.contains(AddWatchFlags::IN_OPEN))
            .count()
    });
    assert_eq!(
        events, 1,
        "the user's config file was opened {events} times"
    );
}
