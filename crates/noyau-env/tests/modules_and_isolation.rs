//! `modules` with Debian's environment-modules and a test modulefile, and
//! bubblewrap isolation, both with real processes (the end-to-end tests in
//! tests/python run a real kernel through them).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use noyau_env::{realise, Cache, EnvSpec};
use serde_json::json;

fn have(exe: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {exe}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn skip(what: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{what} is missing (scripts/test installs it)");
    }
    eprintln!("skipped: {what} is missing (scripts/test installs it)");
    true
}

fn run(argv: &[String], env: &BTreeMap<String, String>, cwd: &Path) -> (bool, String) {
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn modules_set_the_kernels_environment() {
    if !Path::new("/usr/share/modules/init/bash").exists() && skip("environment-modules") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let mf = t.path().join("modulefiles/noyautest");
    std::fs::create_dir_all(&mf).unwrap();
    std::fs::write(
        mf.join("1.0"),
        "#%Module1.0\nsetenv NOYAU_TEST_MODULE loaded-1.0\nprepend-path PATH /opt/noyautest/bin\n",
    )
    .unwrap();
    let spec = EnvSpec::from_value(json!({
        "modules": ["noyautest/1.0"], "module_use": [t.path().join("modulefiles")],
        "notebook_dir": t.path(),
    }))
    .unwrap()
    .normalise()
    .unwrap();
    let cache = Cache::new(t.path().join("cache"));
    let r = realise(&spec, &cache, &mut |_: &str| {}).unwrap();
    assert!(
        r.record["module_list"]
            .as_str()
            .unwrap()
            .contains("noyautest/1.0"),
        "{}",
        r.record
    );
    let kernel = vec![
        "sh".to_string(),
        "-c".into(),
        "echo \"$NOYAU_TEST_MODULE $PATH\"".into(),
    ];
    let (argv, env) = r.command(&kernel, &BTreeMap::new(), t.path()).unwrap();
    let (ok, out) = run(&argv, &env, t.path());
    assert!(ok, "{out}");
    assert!(out.starts_with("loaded-1.0 /opt/noyautest/bin:"), "{out}");

    // A module that does not exist: the tool's message and a summary.
    let bad = EnvSpec::from_value(json!({"modules": ["nosuchmodule/9"], "notebook_dir": t.path()}))
        .unwrap()
        .normalise()
        .unwrap();
    let e = realise(&bad, &cache, &mut |_: &str| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("module load nosuchmodule/9` failed") && e.contains("nosuchmodule"),
        "{e}"
    );
}

#[test]
fn container_isolation_hides_home_and_network_and_keeps_the_notebook_dir_writable() {
    if !have("bwrap") && skip("bwrap (Debian package bubblewrap)") {
        return;
    }
    let home = std::env::var("HOME").unwrap();
    let secret = Path::new(&home).join(".noyau-env-test-secret");
    std::fs::write(&secret, "secret").unwrap();
    let t = tempfile::tempdir().unwrap();
    let nb = t.path().join("nb");
    let rt = t.path().join("rt");
    std::fs::create_dir_all(&nb).unwrap();
    std::fs::create_dir_all(&rt).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let spec = EnvSpec::from_value(json!({"isolation": "container", "notebook_dir": nb}))
        .unwrap()
        .normalise()
        .unwrap();
    let cache = Cache::new(t.path().join("cache"));
    let r = realise(&spec, &cache, &mut |_: &str| {}).unwrap();
    let py = |code: &str| vec!["python3".to_string(), "-c".into(), code.into()];
    let check = |code: &str| {
        let (argv, env) = r.command(&py(code), &BTreeMap::new(), &rt).unwrap();
        run(&argv, &env, &nb)
    };
    let (ok, out) = check(&format!("open({:?}).read()", secret.display().to_string()));
    assert!(
        !ok && out.contains("FileNotFoundError"),
        "home is visible: {out}"
    );
    let (ok, out) = check(&format!(
        "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
    ));
    assert!(
        !ok && out.contains("Error"),
        "the network is reachable: {out}"
    );
    let (ok, out) = check(&format!(
        "open({:?}, 'w').write('hi'); open({:?}, 'w').write('x')",
        nb.join("written.txt").display().to_string(),
        rt.join("sock").display().to_string()
    ));
    assert!(ok, "cannot write to the notebook's or runtime dir: {out}");
    assert_eq!(
        std::fs::read_to_string(nb.join("written.txt")).unwrap(),
        "hi"
    );
    let (ok, _) = check("open('/etc/noyau-should-not-write', 'w')");
    assert!(!ok, "the system is writable");

    // network = true keeps it
    let spec =
        EnvSpec::from_value(json!({"isolation": "container", "network": true, "notebook_dir": nb}))
            .unwrap()
            .normalise()
            .unwrap();
    let r2 = realise(&spec, &cache, &mut |_: &str| {}).unwrap();
    let (argv, env) = r2
        .command(
            &py(&format!(
                "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
            )),
            &BTreeMap::new(),
            &rt,
        )
        .unwrap();
    let (ok, out) = run(&argv, &env, &nb);
    assert!(ok, "network = true but no network: {out}");
    let _ = std::fs::remove_file(&secret);
}

#[test]
fn container_isolation_runs_an_interpreter_reached_through_a_symlink() {
    if !have("bwrap") && skip("bwrap (Debian package bubblewrap)") {
        return;
    }
    // A venv under /tmp (hidden in the sandbox) named through a symlink
    // that is not hidden (a worktree's `.venv` linking to another one).
    let t = tempfile::tempdir().unwrap();
    let venv = t.path().join("venv");
    let made = Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status()
        .unwrap();
    assert!(made.success());
    let links = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let link = links.path().join(".venv");
    std::os::unix::fs::symlink(&venv, &link).unwrap();
    let nb = t.path().join("nb");
    let rt = t.path().join("rt");
    std::fs::create_dir_all(&nb).unwrap();
    std::fs::create_dir_all(&rt).unwrap();
    let spec = EnvSpec::from_value(json!({"isolation": "container", "notebook_dir": nb}))
        .unwrap()
        .normalise()
        .unwrap();
    let r = realise(
        &spec,
        &Cache::new(t.path().join("cache")),
        &mut |_: &str| {},
    )
    .unwrap();
    let argv = vec![
        link.join("bin/python").display().to_string(),
        "-c".into(),
        "import sys; print(sys.prefix)".into(),
    ];
    let (argv, env) = r.command(&argv, &BTreeMap::new(), &rt).unwrap();
    let (ok, out) = run(&argv, &env, &nb);
    assert!(ok, "{argv:?}: {out}");
    assert_eq!(out.trim(), link.display().to_string());
}
