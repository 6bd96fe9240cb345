//! `modules`: Lmod / environment-modules lines run in a shell that then
//! execs the kernel, so the kernel inherits what `module load` set.
//!
//! A batch job's shell is not a login shell, so `module` may not be
//! defined: the script sources an init file first (`modules_init`, else the
//! first found of `$MODULESHOME/init/bash`, environment-modules'
//! `/usr/share/modules/init/bash`, Lmod's `/usr/share/lmod/lmod/init/bash`,
//! `/etc/profile.d/modules.sh`, `/etc/profile.d/lmod.sh`). A failing
//! `module load` stops the start with the tool's own message.

use std::path::PathBuf;
use std::process::Command;

use crate::{cmd, EnvError, EnvSpec};

fn init_file(spec: &EnvSpec) -> Option<PathBuf> {
    if let Some(p) = &spec.modules_init {
        return Some(p.clone());
    }
    let mut candidates = Vec::new();
    if let Some(h) = std::env::var_os("MODULESHOME") {
        candidates.push(PathBuf::from(h).join("init/bash"));
    }
    for p in [
        "/usr/share/modules/init/bash",
        "/usr/share/lmod/lmod/init/bash",
        "/etc/profile.d/modules.sh",
        "/etc/profile.d/lmod.sh",
    ] {
        candidates.push(PathBuf::from(p));
    }
    candidates.into_iter().find(|p| p.is_file())
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The bash script that loads the modules (ending in `exec "$@"` when
/// `then_exec`, in `module list` otherwise).
pub fn script(spec: &EnvSpec, then_exec: bool) -> Result<String, EnvError> {
    let mut s = String::from("set -e\n");
    match init_file(spec) {
        Some(init) => s.push_str(&format!(
            "if ! type module >/dev/null 2>&1; then . {}; fi\n",
            quote(&init.display().to_string())
        )),
        None => s.push_str(
            "type module >/dev/null 2>&1 || { echo 'noyau: no `module` command: install environment-modules or Lmod, or set modules_init' >&2; exit 1; }\n",
        ),
    }
    for d in &spec.module_use {
        s.push_str(&format!("module use {}\n", quote(&d.display().to_string())));
    }
    let mods: Vec<String> = spec.modules.iter().map(|m| quote(m)).collect();
    s.push_str(&format!(
        "module load {} || {{ echo 'noyau: module load failed' >&2; exit 1; }}\n",
        mods.join(" ")
    ));
    if then_exec {
        s.push_str("exec \"$@\"\n");
    } else {
        s.push_str("module list 2>&1\n");
    }
    Ok(s)
}

/// Wraps `argv` in the loading shell.
pub fn wrap(spec: &EnvSpec, argv: Vec<String>) -> Result<Vec<String>, EnvError> {
    let mut out = vec![
        "bash".to_string(),
        "-c".into(),
        script(spec, true)?,
        "noyau-modules".into(),
    ];
    out.extend(argv);
    Ok(out)
}

/// Loads the modules once, to fail early with the tool's message, and
/// returns `module list` for the record.
pub fn check(spec: &EnvSpec, progress: crate::Progress<'_>) -> Result<String, EnvError> {
    progress(&format!("loading modules: {}", spec.modules.join(" ")));
    cmd::run(
        Command::new("bash").arg("-c").arg(script(spec, false)?),
        &format!("`module load {}` failed", spec.modules.join(" ")),
        progress,
    )
}
