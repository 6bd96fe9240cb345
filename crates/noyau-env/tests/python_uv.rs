//! A real uv-built environment with a small pinned pure-Python package.
//! uv is taken from PATH, or installed by noyau from PyPI into the cache
//! (`python3 -m pip install uv`), as it would be on a cluster.

use std::process::Command;

use noyau_env::{realise, Cache, EnvSpec};
use serde_json::json;

fn pip_freeze(python: &str) -> String {
    let out = Command::new(python)
        .args(["-c", "import importlib.metadata as m; print('\\n'.join(sorted(f\"{d.metadata['Name'].lower()}=={d.version}\" for d in m.distributions())))"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_uv_environment_rebuilt_from_its_lock_on_a_clean_cache_is_identical() {
    let t = tempfile::tempdir().unwrap();
    let spec =
        EnvSpec::from_value(json!({"requirements": ["six==1.16.0"], "notebook_dir": t.path()}))
            .unwrap()
            .normalise()
            .unwrap();
    let first = Cache::new(t.path().join("cache1"));
    let mut lines = Vec::new();
    let r1 = realise(&spec, &first, &mut |l: &str| lines.push(l.to_string())).unwrap();
    let lock = r1.record["lock"].as_str().unwrap().to_string();
    assert!(
        lock.contains("six==1.16.0") && lock.contains("--hash=sha256:"),
        "{lock}"
    );
    assert!(
        lock.contains("ipykernel=="),
        "ipykernel was not added: {lock}"
    );
    assert_eq!(
        r1.record["lock_sha256"],
        json!(noyau_env::sha256_hex(lock.as_bytes()))
    );
    // The lock names no build path: the same spec locks the same anywhere.
    assert!(
        !lock.contains(".tmp-") && !lock.contains(first.root().to_str().unwrap()),
        "{lock}"
    );
    assert!(lock.contains("# via -r requirements.in"), "{lock}");
    assert!(lines.iter().any(|l| l.contains("resolving")), "{lines:?}");
    let (argv1, _) = r1
        .command(&["python3".into()], &Default::default(), t.path())
        .unwrap();
    // Compiled at build time: a read-only shared entry still starts fast.
    let lib = first
        .entry(r1.record["key"].as_str().unwrap())
        .join("venv/lib");
    let compiled = std::fs::read_dir(&lib).unwrap().flatten().any(|py| {
        py.path()
            .join("site-packages/ipykernel/__pycache__")
            .is_dir()
    });
    assert!(compiled, "no ipykernel/__pycache__ under {}", lib.display());
    let freeze1 = pip_freeze(&argv1[0]);
    assert!(freeze1.contains("six==1.16.0"), "{freeze1}");

    // Asking again: found in the cache, nothing built.
    let mut again = Vec::new();
    let r1b = realise(&spec, &first, &mut |l: &str| again.push(l.to_string())).unwrap();
    assert_eq!(r1b.record["build_id"], r1.record["build_id"]);
    assert!(again.is_empty(), "{again:?}");

    // The recorded lock, on a clean cache (uv reused from the first one).
    let uv = std::fs::read_dir(first.root().join(".tools"))
        .ok()
        .and_then(|mut d| d.find_map(|e| e.ok().map(|e| e.path().join("venv/bin/uv"))))
        .filter(|p| p.exists());
    if let Some(uv) = uv {
        std::env::set_var("NOYAU_UV", uv);
    }
    let locked = EnvSpec::from_value(
        json!({"requirements": ["six==1.16.0"], "lock": lock, "notebook_dir": t.path()}),
    )
    .unwrap()
    .normalise()
    .unwrap();
    let second = Cache::new(t.path().join("cache2"));
    let r2 = realise(&locked, &second, &mut |_: &str| {}).unwrap();
    let (argv2, env2) = r2
        .command(
            &["python3".into(), "-m".into(), "ipykernel_launcher".into()],
            &Default::default(),
            t.path(),
        )
        .unwrap();
    assert!(
        argv2[0].starts_with(second.root().to_str().unwrap()),
        "{argv2:?}"
    );
    assert!(env2["VIRTUAL_ENV"].starts_with(second.root().to_str().unwrap()));
    assert_eq!(pip_freeze(&argv2[0]), freeze1);
    assert_eq!(r2.record["freeze"], r1.record["freeze"]);
    assert_eq!(r2.record["lock"], r1.record["lock"]);

    // A requirement that cannot be resolved: uv's own message, a summary, nothing cached.
    let bad =
        EnvSpec::from_value(json!({"requirements": ["six==0.0.999"], "notebook_dir": t.path()}))
            .unwrap()
            .normalise()
            .unwrap();
    let e = realise(&bad, &second, &mut |_: &str| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("could not be built") && e.contains("nothing was cached"),
        "{e}"
    );
    assert!(
        e.contains("six==0.0.999") || e.contains("six"),
        "no uv message: {e}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(second.root())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp") || n == &bad.cache_key())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A wheel whose `.pth` file writes `marker` when any python starts in the
/// environment it is installed in; its path and sha256.
fn pth_wheel(dir: &std::path::Path, marker: &std::path::Path) -> (std::path::PathBuf, String) {
    let wheel = dir.join("evilpth-1.0-py3-none-any.whl");
    let script = r#"
import base64, hashlib, sys, zipfile
wheel, marker = sys.argv[1], sys.argv[2]
files = {
    "evilpth.pth": f"import os; open({marker!r}, 'a').write('ran')\n",
    "evilpth-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: evilpth\nVersion: 1.0\n",
    "evilpth-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
for name, text in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
    record.append(f"{name},sha256={digest},{len(text.encode())}")
record.append("evilpth-1.0.dist-info/RECORD,,")
files["evilpth-1.0.dist-info/RECORD"] = "\n".join(record) + "\n"
with zipfile.ZipFile(wheel, "w") as z:
    for name, text in files.items():
        z.writestr(name, text)
"#;
    written(script, &wheel, marker)
}

/// Runs `script` (given the file to write and the marker) and returns the
/// file it wrote with its sha256.
fn written(
    script: &str,
    path: &std::path::Path,
    marker: &std::path::Path,
) -> (std::path::PathBuf, String) {
    let ok = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .arg(marker)
        .status()
        .unwrap()
        .success();
    assert!(ok, "could not write the test file {}", path.display());
    let sha = noyau_env::sha256_hex(&std::fs::read(path).unwrap());
    (path.to_path_buf(), sha)
}

/// Requirements a notebook chose (`wheels_only`) are installed without
/// running the environment's python here (outside the sandbox): a wheel's
/// `.pth` file does not run while it is built. The user's own requirements
/// are compiled to bytecode, which does run it (the check fails if the
/// build stops running python at all, so it cannot pass vacuously).
#[test]
fn a_wheels_pth_file_does_not_run_while_an_untrusted_environment_is_built() {
    let t = tempfile::tempdir().unwrap();
    for wheels_only in [true, false] {
        let marker = t.path().join(format!("ran-{wheels_only}"));
        let (wheel, sha) = pth_wheel(t.path(), &marker);
        let lock = format!("evilpth @ file://{} --hash=sha256:{sha}\n", wheel.display());
        let spec = EnvSpec::from_value(json!({
            "kind": "python", "lock": lock, "wheels_only": wheels_only, "notebook_dir": t.path(),
        }))
        .unwrap()
        .normalise()
        .unwrap();
        let cache = Cache::new(t.path().join(format!("cache-{wheels_only}")));
        // (no ipykernel in this lock: the build is refused after installing)
        let e = realise(&spec, &cache, &mut |_: &str| {}).unwrap_err();
        assert!(e.to_string().contains("no ipykernel"), "{e}");
        assert_eq!(marker.exists(), !wheels_only, "wheels_only = {wheels_only}");
    }
}

/// A source distribution whose setup.py writes `marker` when built; its
/// path and sha256.
fn sdist(dir: &std::path::Path, marker: &std::path::Path) -> (std::path::PathBuf, String) {
    let path = dir.join("evilsdist-1.0.tar.gz");
    let script = r#"
import io, sys, tarfile
path, marker = sys.argv[1], sys.argv[2]
files = {
    "evilsdist-1.0/setup.py": f"open({marker!r}, 'a').write('built')\nfrom setuptools import setup\nsetup(name='evilsdist', version='1.0')\n",
    "evilsdist-1.0/PKG-INFO": "Metadata-Version: 2.1\nName: evilsdist\nVersion: 1.0\n",
}
with tarfile.open(path, "w:gz") as t:
    for name, text in files.items():
        data = text.encode()
        info = tarfile.TarInfo(name)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
"#;
    written(script, &path, marker)
}

/// With `wheels_only` (requirements from a notebook or project the user
/// has not trusted), uv refuses to build a source distribution, so its
/// setup.py does not run here; the error says why and what to do.
#[test]
fn an_untrusted_source_distribution_is_not_built() {
    let t = tempfile::tempdir().unwrap();
    let marker = t.path().join("built");
    let (path, sha) = sdist(t.path(), &marker);
    let lock = format!(
        "evilsdist @ file://{} --hash=sha256:{sha}\n",
        path.display()
    );
    let spec = EnvSpec::from_value(json!({
        "kind": "python", "lock": lock, "wheels_only": true, "notebook_dir": t.path(),
    }))
    .unwrap()
    .normalise()
    .unwrap();
    let e = realise(
        &spec,
        &Cache::new(t.path().join("cache")),
        &mut |_: &str| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("only wheels are installed") && e.contains("noyau trust DIR"),
        "{e}"
    );
    assert!(!marker.exists());
}

/// A cloned project is where noyau is started (JupyterLab's proxy, `noyau
/// run`): its `uv.toml` asks uv to compile bytecode (which would run a
/// wheel's `.pth` file here, outside the sandbox), and its `venv/` and
/// `pip/` packages would shadow the stdlib's when noyau installs uv with
/// `python3 -m venv` and `-m pip` (this test's cache has no uv, and uv is
/// not on PATH here, so noyau installs it). None of them is run: uv and
/// python run in noyau's own directories, uv without config discovery,
/// python isolated. Changes the process's directory: nextest runs each
/// test in a process of its own.
#[test]
fn a_projects_uv_toml_and_modules_in_the_current_directory_are_not_used() {
    let t = tempfile::tempdir().unwrap();
    let project = t.path().join("project");
    let shadowed = t.path().join("shadowed");
    for module in ["venv", "pip"] {
        let pkg = project.join(module);
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::write(pkg.join("__init__.py"), "").unwrap();
        std::fs::write(
            pkg.join("__main__.py"),
            format!(
                "open({:?}, 'a').write('{module}')\n",
                shadowed.display().to_string()
            ),
        )
        .unwrap();
    }
    std::fs::write(project.join("uv.toml"), "[pip]\ncompile-bytecode = true\n").unwrap();
    let marker = t.path().join("ran");
    let (wheel, sha) = pth_wheel(t.path(), &marker);
    let lock = format!("evilpth @ file://{} --hash=sha256:{sha}\n", wheel.display());
    let spec = EnvSpec::from_value(json!({
        "kind": "python", "lock": lock, "wheels_only": true, "notebook_dir": project,
    }))
    .unwrap()
    .normalise()
    .unwrap();
    std::env::set_current_dir(&project).unwrap();
    let e = realise(
        &spec,
        &Cache::new(t.path().join("cache")),
        &mut |_: &str| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("no ipykernel"), "{e}");
    assert!(!marker.exists(), "the project's uv.toml compiled the wheel");
    assert!(
        !shadowed.exists(),
        "the project's {} ran",
        std::fs::read_to_string(&shadowed).unwrap_or_default()
    );
}
