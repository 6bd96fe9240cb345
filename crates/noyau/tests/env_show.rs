//! `noyau env show` on a notebook whose data file is in the cache but
//! refused (its description names another size): the file is shown as
//! refused with the reason, and the listing goes on.

use std::process::Command;

#[test]
fn a_refused_data_file_is_shown_with_its_reason_and_the_rest_listed() {
    let t = tempfile::tempdir().unwrap();
    let sha = |b: &[u8]| noyau_env::sha256_hex(b);
    let (ha, hb) = (sha(b"aaa"), sha(b"bbb"));
    let store = t.path().join("cache/data/sha256");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(store.join(&ha), "aaa").unwrap();
    let about = serde_json::json!({"sha256": ha, "size": 999});
    std::fs::write(store.join(format!("{ha}.json")), about.to_string()).unwrap();
    let nb = serde_json::json!({
        "cells": [], "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"noyau": {"data": [
            {"url": "a.bin", "sha256": ha, "name": "a.bin"},
            {"url": "b.bin", "sha256": hb, "name": "b.bin"},
        ]}},
    });
    let path = t.path().join("nb.ipynb");
    std::fs::write(&path, nb.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_noyau"))
        .args(["env", "show"])
        .arg(&path)
        .current_dir(t.path())
        .env("NOYAU_ENV_CACHE", t.path().join("cache"))
        .env("XDG_CACHE_HOME", t.path().join("home-cache"))
        .env_remove("NOYAU_ENV_SITE_CACHE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l.starts_with("data a.bin:")
            && l.contains("refused:")
            && l.contains("described as another file")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("data b.bin:") && l.contains("not fetched yet")),
        "{stdout}"
    );
}
