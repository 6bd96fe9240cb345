//! Built where the network is, used where it is not: a real uv build of
//! `six==1.16.0` prepared here, then used by `realise_job` with the
//! package index pointed at an address that refuses connections (as a
//! compute node without a route to PyPI would), which contacts no index;
//! the same spec with `build = "node"` fails naming that index. One test
//! in its own binary: it sets process environment variables, as a job's
//! environment would.

use std::process::Command;

use noyau_env::{prepare, realise_job, Cache, EnvSpec};
use serde_json::json;

const REFUSED: &str = "http://127.0.0.1:9/simple";

fn spec(extra: serde_json::Value, dir: &std::path::Path) -> EnvSpec {
    let mut v = json!({"requirements": ["six==1.16.0"], "notebook_dir": dir});
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    EnvSpec::from_value(v).unwrap().normalise().unwrap()
}

fn six_version(r: &noyau_env::Realised, dir: &std::path::Path) -> String {
    let (argv, env) = r
        .command(
            &[
                "python3".into(),
                "-c".into(),
                "import six; print(six.__version__)".into(),
            ],
            &Default::default(),
            dir,
        )
        .unwrap();
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn which_uv() -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("uv"))
        .find(|p| p.is_file())
}

#[test]
fn prepared_before_submission_runs_without_an_index_and_build_node_names_the_index_it_missed() {
    let t = tempfile::tempdir().unwrap();
    let cache = Cache::new(t.path().join("cache"));
    let s = spec(json!({}), t.path());
    let mut lines = Vec::new();
    let p = prepare(Some(&s), &[], &cache, &mut |l: &str| {
        lines.push(l.to_string())
    })
    .unwrap();
    let e = p.entry.clone().expect("a python spec is prepared here");
    assert!(
        e.lock.contains("six==1.16.0") && e.lock_sha256 == noyau_env::sha256_hex(e.lock.as_bytes())
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("building the Python environment")),
        "{lines:?}"
    );
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.entry(&e.key).join("noyau-env.json")).unwrap())
            .unwrap();
    assert!(rec["network"].is_object(), "{rec}");
    // It travels as JSON in the job's environment.
    let p = noyau_env::Prepared::from_json(&p.to_json()).unwrap();

    // The job: every index it could use refuses connections.
    std::env::set_var("UV_INDEX_URL", REFUSED);
    std::env::set_var("PIP_INDEX_URL", REFUSED);
    let mut lines = Vec::new();
    let r = realise_job(Some(&s), Some(&p), &cache, &mut |l: &str| {
        lines.push(l.to_string())
    })
    .unwrap()
    .unwrap();
    assert_eq!(six_version(&r, t.path()), "1.16.0");
    assert_eq!(r.record["lock_sha256"], json!(e.lock_sha256));
    assert!(lines.iter().any(|l| l.contains("offline")), "{lines:?}");
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("resolving") || l.contains("uv")),
        "{lines:?}"
    );
    drop(r);

    // build = "node": the job builds, and cannot reach the index: uv's
    // (found in the cache) and, where noyau must first install uv, pip's.
    let node = spec(json!({"build": "node"}), t.path());
    let uv = cache.root().join(".tools/uv-0.13.9/venv/bin/uv");
    if uv.exists() {
        std::env::set_var("NOYAU_UV", &uv);
    }
    let node_cache = Cache::new(t.path().join("node-cache"));
    let e2 = realise_job(Some(&node), None, &node_cache, &mut |_: &str| {})
        .unwrap_err()
        .to_string();
    assert!(e2.contains(REFUSED) && e2.contains("UV_INDEX_URL"), "{e2}");
    assert!(e2.contains("could not resolve"), "{e2}");
    std::env::remove_var("NOYAU_UV");
    if cfg!(target_arch = "x86_64") && which_uv().is_none() {
        let e2 = realise_job(Some(&node), None, &node_cache, &mut |_: &str| {})
            .unwrap_err()
            .to_string();
        assert!(e2.contains(REFUSED) && e2.contains("PIP_INDEX_URL"), "{e2}");
    }

    // The prepared entry is not in the cache on this "node" (gc'd, or a
    // cache not shared): its lock is installed offline, from uv's cache.
    std::fs::remove_dir_all(cache.entry(&e.key)).unwrap();
    let mut lines = Vec::new();
    let r = realise_job(Some(&s), Some(&p), &cache, &mut |l: &str| {
        lines.push(l.to_string())
    })
    .unwrap()
    .unwrap();
    assert_eq!(six_version(&r, t.path()), "1.16.0");
    assert_eq!(r.record["offline"], json!(true));
    assert_eq!(r.record["key"], json!(e.key));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("installing its lock offline")),
        "{lines:?}"
    );
    drop(r);

    // …and when uv's cache does not have it either: where the cache must be.
    std::fs::remove_dir_all(cache.entry(&e.key)).unwrap();
    std::env::set_var("UV_CACHE_DIR", t.path().join("empty-uv-cache"));
    let e3 = realise_job(Some(&s), Some(&p), &cache, &mut |_: &str| {})
        .unwrap_err()
        .to_string();
    assert!(
        e3.contains("could not be installed offline") && e3.contains("NOYAU_ENV_CACHE"),
        "{e3}"
    );
    std::env::remove_var("UV_CACHE_DIR");

    // An entry that is not the one prepared (another lock) is refused.
    let mut other = p.clone();
    other.entry.as_mut().unwrap().lock_sha256 = "0".repeat(64);
    std::env::remove_var("UV_INDEX_URL");
    std::env::remove_var("PIP_INDEX_URL");
    prepare(Some(&s), &[], &cache, &mut |_: &str| {}).unwrap();
    let e4 = realise_job(Some(&s), Some(&other), &cache, &mut |_: &str| {})
        .unwrap_err()
        .to_string();
    assert!(e4.contains("is not the one prepared"), "{e4}");
}
