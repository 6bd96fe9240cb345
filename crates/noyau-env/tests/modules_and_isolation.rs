//! `modules` with Debian's environment-modules and a test modulefile, and
//! bubblewrap isolation, both with real processes (the end-to-end tests in
//! tests/python run a real kernel through them). They need those tools
//! (`scripts/test` installs them): `#[ignore]`d, so a plain `cargo nextest
//! run` reports them skipped, and `scripts/test` runs them
//! (`--run-ignored all`); one run without its tool fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use noyau_env::{realise, Cache, EnvSpec, Realised};
use serde_json::json;

/// Fails the test when `exe` is not on PATH.
fn need(exe: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {exe}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{exe} is missing: install the Debian package {package} (scripts/test does)"
    );
}

/// A notebook and a runtime directory under `t`, and the realised
/// `isolation = "container"` environment.
fn sandbox_in(t: &Path) -> (PathBuf, PathBuf, Realised) {
    let (nb, rt) = (t.join("nb"), t.join("rt"));
    std::fs::create_dir_all(&nb).unwrap();
    std::fs::create_dir_all(&rt).unwrap();
    let spec = EnvSpec::from_value(json!({"isolation": "container", "notebook_dir": nb}))
        .unwrap()
        .normalise()
        .unwrap();
    let r = realise(&spec, &Cache::new(t.join("cache")), &mut |_: &str| {}).unwrap();
    (nb, rt, r)
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
#[ignore = "needs environment-modules (scripts/test installs it and runs this)"]
fn modules_set_the_kernels_environment() {
    assert!(
        Path::new("/usr/share/modules/init/bash").exists(),
        "environment-modules is missing: install the Debian package (scripts/test does)"
    );
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
    assert!(
        e.contains("noyau: module nosuchmodule/9 does not exist here"),
        "{e}"
    );
    assert!(
        r.record["modules_tool"]
            .as_str()
            .unwrap()
            .starts_with("Modules Release"),
        "{}",
        r.record
    );
}

/// Debian's lmod package, unpacked by scripts/test (it conflicts with
/// environment-modules, so it is not installed); its paths are fixed, so
/// the test runs itself again in a bubblewrap sandbox that shows it at
/// /usr/share/lmod and /usr/lib/lmod, and hides environment-modules.
const LMOD: &str = "/opt/noyau-test/lmod";
const IN_SANDBOX: &str = "NOYAU_TEST_IN_LMOD_SANDBOX";

fn lmod_sandbox(work: &Path) -> Vec<String> {
    let mut a: Vec<String> = [
        "bwrap",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
    ]
    .map(String::from)
    .into();
    a.extend([
        "--bind".into(),
        work.display().to_string(),
        work.display().to_string(),
    ]);
    for mine in ["/usr/share/lmod", "/usr/lib/lmod"] {
        let parent = Path::new(mine).parent().unwrap();
        a.extend(["--tmpfs".into(), parent.display().to_string()]);
        for e in std::fs::read_dir(parent).unwrap().flatten() {
            let p = e.path();
            if p == Path::new("/usr/share/modules") {
                continue; // environment-modules: not in this sandbox
            }
            let (p, shown) = (p.display().to_string(), p.display().to_string());
            match std::fs::read_link(&p) {
                Ok(target) => a.extend(["--symlink".into(), target.display().to_string(), shown]),
                Err(_) => a.extend(["--ro-bind".into(), p, shown]),
            }
        }
        a.extend(["--ro-bind".into(), format!("{LMOD}{mine}"), mine.into()]);
    }
    a
}

#[test]
#[ignore = "needs Lmod unpacked in /opt/noyau-test/lmod and bubblewrap (scripts/test)"]
fn lmod_modules_load_in_its_own_shell_function_and_unknown_ones_are_named() {
    if std::env::var_os(IN_SANDBOX).is_none() {
        assert!(
            Path::new(LMOD)
                .join("usr/share/lmod/lmod/init/bash")
                .is_file(),
            "no Lmod in {LMOD}: scripts/test unpacks Debian's lmod there (as root)"
        );
        need("bwrap", "bubblewrap");
        let t = tempfile::tempdir().unwrap();
        let me = std::env::current_exe().unwrap();
        // Lmod initialised in the job's shell, which exports `module` and
        // `ml` to noyau (BASH_FUNC_module%%), as a login shell would.
        let script = format!(
            ". /usr/share/lmod/lmod/init/bash && exec {} --exact lmod_modules_load_in_its_own_shell_function_and_unknown_ones_are_named --ignored --nocapture",
            me.display()
        );
        let out = Command::new(&lmod_sandbox(t.path())[0])
            .args(&lmod_sandbox(t.path())[1..])
            .args([
                "env",
                "-i",
                "PATH=/usr/bin:/bin",
                &format!("HOME={}", t.path().display()),
            ])
            .arg(format!("{IN_SANDBOX}={}", t.path().display()))
            .args(["bash", "--noprofile", "--norc", "-c", &script])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        return;
    }
    let work = PathBuf::from(std::env::var_os(IN_SANDBOX).unwrap());
    assert!(!Path::new("/usr/share/modules").exists());
    let mf = work.join("modulefiles/noyautest");
    std::fs::create_dir_all(&mf).unwrap();
    std::fs::write(
        mf.join("1.0.lua"),
        "setenv(\"NOYAU_TEST_MODULE\", \"lmod-1.0\")\nprepend_path(\"PATH\", \"/opt/noyautest/bin\")\n",
    )
    .unwrap();
    let spec = |mods: serde_json::Value| {
        EnvSpec::from_value(json!({
            "modules": mods, "module_use": [work.join("modulefiles")], "notebook_dir": work,
        }))
        .unwrap()
        .normalise()
        .unwrap()
    };
    let cache = Cache::new(work.join("cache"));
    let r = realise(&spec(json!(["noyautest/1.0"])), &cache, &mut |_: &str| {}).unwrap();
    assert!(
        r.record["modules_tool"]
            .as_str()
            .unwrap()
            .starts_with("Lmod 8."),
        "{}",
        r.record
    );
    assert!(
        r.record["module_list"]
            .as_str()
            .unwrap()
            .contains("noyautest/1.0"),
        "{}",
        r.record
    );
    // The kernel's own shells have Lmod's `ml`, with the module loaded.
    let kernel = ["bash", "-c", "ml 2>&1; echo \"$NOYAU_TEST_MODULE $PATH\""].map(String::from);
    let (argv, env) = r.command(&kernel, &BTreeMap::new(), &work).unwrap();
    let (ok, out) = run(&argv, &env, &work);
    assert!(ok, "{out}");
    assert!(out.contains("1) noyautest/1.0"), "{out}");
    assert!(out.contains("lmod-1.0 /opt/noyautest/bin:"), "{out}");

    // An unknown module: Lmod's own message (spider's advice), and noyau
    // names that one, not the one that exists.
    let e = realise(
        &spec(json!(["noyautest/1.0", "nosuch/2"])),
        &cache,
        &mut |_: &str| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("The following module(s) are unknown") && e.contains("module spider"),
        "{e}"
    );
    assert!(
        e.contains("noyau: module nosuch/2 does not exist here"),
        "{e}"
    );
    assert!(!e.contains("module noyautest/1.0 does not exist"), "{e}");
}

#[test]
#[ignore = "needs bubblewrap (scripts/test installs it and runs this)"]
fn container_isolation_hides_home_and_network_and_keeps_the_notebook_dir_writable() {
    need("bwrap", "bubblewrap");
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

    // The home as the notebook's directory (`noyau run ~/nb.ipynb`) would
    // be bound writable over the tmpfs hiding it: refused, nothing started.
    let at_home = EnvSpec::from_value(json!({"isolation": "container", "notebook_dir": home}))
        .unwrap()
        .normalise()
        .unwrap();
    let e = realise(&at_home, &cache, &mut |_: &str| {})
        .unwrap()
        .command(&py("pass"), &BTreeMap::new(), &rt)
        .unwrap_err()
        .to_string();
    assert!(e.contains("home directory"), "{e}");
    let _ = std::fs::remove_file(&secret);
}

#[test]
#[ignore = "needs bubblewrap (scripts/test installs it and runs this)"]
fn container_isolation_runs_an_interpreter_reached_through_a_symlink() {
    need("bwrap", "bubblewrap");
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
    let (nb, rt, r) = sandbox_in(t.path());
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

/// What a hostile cell tries from inside the sandbox, printed as one line:
/// reading (and writing: seen from outside) the home through `/proc/*/root`, listing
/// `/run/user/UID`, and TIOCSTI on the terminal (`/dev/tty` and stdin).
const PROBE: &str = r#"
import fcntl, glob, os, sys, termios
secret, home, run_user = sys.argv[1:4]
found = []
for root in glob.glob('/proc/[0-9]*/root'):
    try:
        open(root + secret).read(); found.append('read-proc-root')
    except OSError:
        pass
    try:  # lands in the host's home only through a way out (checked outside)
        open(root + home + '/.noyau-escape', 'w').write('x')
    except OSError:
        pass
try:
    os.listdir(run_user); found.append('listed-run-user')
except OSError:
    pass
try:
    fcntl.ioctl(os.open('/dev/tty', os.O_RDWR), termios.TIOCSTI, b' '); found.append('tiocsti-dev-tty')
except OSError:
    pass
try:
    fcntl.ioctl(0, termios.TIOCSTI, b' '); found.append('tiocsti-stdin')
except OSError:
    pass
print('ESCAPES', sorted(set(found)))
"#;

/// Runs `argv` with a fresh pty as its controlling terminal (as a kernel
/// started from a terminal has) and returns what it printed.
fn run_on_a_terminal(argv: &[String], env: &BTreeMap<String, String>, cwd: &Path) -> String {
    let pty_run = "import os, pty, sys\n\
        pid, fd = pty.fork()\n\
        if pid == 0:\n    os.execvp(sys.argv[1], sys.argv[1:])\n\
        out = b''\n\
        while True:\n    try:\n        b = os.read(fd, 4096)\n    except OSError:\n        break\n    if not b:\n        break\n    out += b\n\
        os.waitpid(pid, 0)\n\
        sys.stdout.write(out.decode(errors='replace'))\n";
    let mut all = vec!["python3".to_string(), "-c".into(), pty_run.into()];
    all.extend(argv.iter().cloned());
    run(&all, env, cwd).1
}

#[test]
#[ignore = "needs bubblewrap (scripts/test installs it and runs this)"]
fn container_isolation_closes_proc_run_user_and_the_terminal() {
    need("bwrap", "bubblewrap");
    let home = std::env::var("HOME").unwrap();
    let secret = Path::new(&home).join(".noyau-env-test-secret-proc");
    std::fs::write(&secret, "secret").unwrap();
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    let run_user = format!("/run/user/{uid}");
    // A login session has it; a CI container may not: make one (as root).
    let made_run_user = !Path::new(&run_user).exists();
    if made_run_user {
        std::fs::create_dir_all(&run_user)
            .unwrap_or_else(|e| panic!("{run_user} is missing and cannot be made: {e}"));
    }
    let t = tempfile::tempdir().unwrap();
    let (nb, rt, r) = sandbox_in(t.path());
    // The line the probe printed (the keys TIOCSTI pushed echo before it).
    let probe = |argv: &[String], env: &BTreeMap<String, String>| {
        let out = run_on_a_terminal(argv, env, &nb);
        let line = out
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("ESCAPES "));
        line.map_or_else(|| format!("no result: {out}"), str::to_string)
    };
    let mut argv = vec!["python3".to_string(), "-c".into(), PROBE.into()];
    argv.extend([secret.display().to_string(), home.clone(), run_user.clone()]);

    // Unsandboxed, the probe finds every way out (so it can tell).
    let escape = Path::new(&home).join(".noyau-escape");
    let bare = probe(&argv, &BTreeMap::new());
    let bare_wrote = std::fs::remove_file(&escape).is_ok();

    let (wrapped, env) = r.command(&argv, &BTreeMap::new(), &rt).unwrap();
    let sandboxed = probe(&wrapped, &env);
    let escaped = std::fs::remove_file(&escape).is_ok();
    let _ = std::fs::remove_file(&secret);
    if made_run_user {
        let _ = std::fs::remove_dir(&run_user);
    }
    for way in ["read-proc-root", "listed-run-user", "tiocsti-dev-tty"] {
        assert!(bare.contains(way), "the probe cannot see `{way}`: {bare}");
    }
    assert!(bare_wrote, "the probe cannot write through /proc/*/root");
    assert_eq!(sandboxed, "[]", "ways out of {wrapped:?}");
    assert!(!escaped, "the sandbox wrote into the home");
}
