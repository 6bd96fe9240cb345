//! Guix and Apptainer cannot run on this machine: these tests put stand-in
//! executables named `guix` and `apptainer` on PATH, which record their argv
//! (one argument per line) and then run the kernel command they were given,
//! and check the exact command lines noyau builds and what it records.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use noyau_env::{realise, Cache, EnvSpec};
use serde_json::json;

fn standin(bin: &Path, name: &str, log: &Path, body: &str) {
    let p = bin.join(name);
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\n# stand-in for {name}: records its argv\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > {log}.$$\nmv {log}.$$ {log}-$(date +%s%N)\n{body}\n",
            log = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn logs(dir: &Path, prefix: &str) -> Vec<Vec<String>> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{prefix}-"))
        })
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(String::from)
                .collect()
        })
        .collect()
}

fn run(argv: &[String], env: &BTreeMap<String, String>, path: &str) -> String {
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env)
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn guix_and_apptainer_command_lines_with_standin_executables() {
    let t = tempfile::tempdir().unwrap();
    let bin = t.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let nb = t.path().join("nb");
    let rt = t.path().join("rt");
    std::fs::create_dir(&nb).unwrap();
    std::fs::create_dir(&rt).unwrap();
    // guix: `describe` prints channels; `shell … -- CMD` runs CMD.
    standin(
        &bin,
        "guix",
        &t.path().join("guix"),
        "case \" $* \" in *' describe '*) echo '(list (channel (name (quote guix)) (commit \"abc123\")))'; exit 0;; esac\n\
         while [ $# -gt 0 ] && [ \"$1\" != shell ]; do shift; done\n\
         while [ $# -gt 0 ] && [ \"$1\" != -- ]; do shift; done; shift; exec \"$@\"",
    );
    // apptainer exec [opts] IMAGE CMD…: skip to the image, run CMD.
    standin(
        &bin,
        "apptainer",
        &t.path().join("apptainer"),
        "shift; while [ $# -gt 0 ]; do case \"$1\" in --bind) shift 2;; --*) shift;; *) shift; break;; esac; done\n\
         exec env \"$@\"",
    );
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    std::env::set_var("PATH", &path);
    std::fs::write(nb.join("channels.scm"), "(list %default-guix-channel)").unwrap();
    std::fs::write(
        nb.join("manifest.scm"),
        "(specifications->manifest '(\"python\"))",
    )
    .unwrap();
    let cache = Cache::new(t.path().join("cache"));
    let mut lines = Vec::new();
    let kernel: Vec<String> = vec!["sh".into(), "-c".into(), "echo kernel-ran $MARK".into()];
    let kenv = BTreeMap::from([("MARK".to_string(), "m1".to_string())]);

    // guix, without and with container isolation
    for container in [false, true] {
        let spec = EnvSpec::from_value(json!({
            "channels": nb.join("channels.scm"), "manifest": nb.join("manifest.scm"),
            "isolation": if container { "container" } else { "none" },
            "notebook_dir": nb,
        }))
        .unwrap()
        .normalise()
        .unwrap();
        let r = realise(&spec, &cache, &mut |l: &str| lines.push(l.to_string())).unwrap();
        assert!(r.record["describe"].as_str().unwrap().contains("abc123"));
        assert_eq!(r.record["lock"], r.record["describe"]);
        let (argv, env) = r.command(&kernel, &kenv, &rt).unwrap();
        let mut want: Vec<String> = vec![
            "guix",
            "time-machine",
            "-C",
            &nb.join("channels.scm").display().to_string(),
            "--",
            "shell",
            "-m",
            &nb.join("manifest.scm").display().to_string(),
        ]
        .into_iter()
        .map(String::from)
        .collect();
        if container {
            want.push("--container".into());
            want.push(format!("--share={}", nb.display()));
            want.push(format!("--share={}", rt.display()));
        }
        want.push("--".into());
        want.extend(kernel.iter().cloned());
        assert_eq!(argv, want);
        assert_eq!(run(&argv, &env, &path).trim(), "kernel-ran m1");
        let recorded = logs(t.path(), "guix");
        assert_eq!(
            recorded.last().unwrap(),
            &want[1..].to_vec(),
            "the stand-in saw another argv"
        );
        assert_eq!(
            recorded[recorded.len() - 2],
            vec![
                "time-machine",
                "-C",
                &nb.join("channels.scm").display().to_string(),
                "--",
                "describe",
                "-f",
                "channels"
            ]
        );
    }

    // apptainer with a local image: digest recorded, env passed as APPTAINERENV_
    let image = nb.join("img.sif");
    std::fs::write(&image, b"not really an image").unwrap();
    let spec = EnvSpec::from_value(json!({"image": image, "nv": true, "notebook_dir": nb}))
        .unwrap()
        .normalise()
        .unwrap();
    let r = realise(&spec, &cache, &mut |l: &str| lines.push(l.to_string())).unwrap();
    assert_eq!(
        r.record["digest"],
        json!(format!(
            "sha256:{}",
            noyau_env::sha256_hex(b"not really an image")
        ))
    );
    // the digest is remembered: the next start reads nothing of the image...
    let hashed = |lines: &[String]| lines.iter().filter(|l| l.starts_with("hashing")).count();
    let before = hashed(&lines);
    let again = realise(&spec, &cache, &mut |l: &str| lines.push(l.to_string())).unwrap();
    assert_eq!(again.record["digest"], r.record["digest"]);
    assert_eq!(hashed(&lines), before, "{lines:?}");
    // ...until the file changes
    std::fs::write(&image, b"another image").unwrap();
    let changed = realise(&spec, &cache, &mut |l: &str| lines.push(l.to_string())).unwrap();
    assert_eq!(
        changed.record["digest"],
        json!(format!(
            "sha256:{}",
            noyau_env::sha256_hex(b"another image")
        ))
    );
    assert_eq!(hashed(&lines), before + 1, "{lines:?}");
    let (argv, env) = r.command(&kernel, &kenv, &rt).unwrap();
    let mut want: Vec<String> = vec![
        "apptainer".to_string(),
        "exec".into(),
        "--cleanenv".into(),
        "--nv".into(),
        "--bind".into(),
        rt.display().to_string(),
        "--bind".into(),
        nb.display().to_string(),
        image.display().to_string(),
    ];
    want.extend(kernel.iter().cloned());
    assert_eq!(argv, want);
    assert_eq!(env.get("APPTAINERENV_MARK").map(String::as_str), Some("m1"));
    assert!(!env.contains_key("MARK"));
    let env2: BTreeMap<String, String> = BTreeMap::from([("MARK".into(), "m1".into())]);
    assert_eq!(run(&argv, &env2, &path).trim(), "kernel-ran m1");
    assert_eq!(
        logs(t.path(), "apptainer").last().unwrap(),
        &want[1..].to_vec()
    );
}
