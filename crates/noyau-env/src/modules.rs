//! `modules`: Lmod / environment-modules lines run in a shell that then
//! execs the kernel, so the kernel inherits what `module load` set.
//!
//! A batch job's shell is not a login shell, so `module` may not be
//! defined: the script sources an init file first (`modules_init`, else the
//! first found of `$MODULESHOME/init/bash`, `$LMOD_PKG/init/bash`,
//! environment-modules' `/usr/share/modules/init/bash`, Lmod's
//! `/usr/share/lmod/lmod/init/bash`, `/etc/profile.d/modules.sh`,
//! `/etc/profile.d/lmod.sh`); a `module` function the job inherited (Lmod
//! exports `module` and `ml` as `BASH_FUNC_module%%`) is used as it is.
//! Both tools take the same `module use`, `module load`, `module list` and
//! `module is-avail`, so one script serves both. A failing `module load`
//! stops the start with the tool's own message (Lmod's "The following
//! module(s) are unknown", which suggests `module spider`), and noyau
//! names each module the tool does not know (`module is-avail`). Which
//! tool it was (`Lmod 8.6.19`, `Modules Release 5.2.0`) is recorded.
//!
use std::path::PathBuf;
use std::process::Command;

use crate::{cmd, EnvError, EnvSpec};

fn init_file(spec: &EnvSpec) -> Option<PathBuf> {
    if let Some(p) = &spec.modules_init {
        return Some(p.clone());
    }
    let mut candidates = Vec::new();
    for var in ["MODULESHOME", "LMOD_PKG"] {
        if let Some(h) = std::env::var_os(var) {
            candidates.push(PathBuf::from(h).join("init/bash"));
        }
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

/// What the script ends with.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    /// `exec "$@"`: the kernel.
    Exec,
    /// The tool's name and version, then `module list`.
    List,
}

/// The bash script that loads the modules, then does `then`.
fn script(spec: &EnvSpec, then: Then) -> Result<String, EnvError> {
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
    let mods = mods.join(" ");
    // On failure, each module the tool does not know is named.
    s.push_str(&format!(
        "module load {mods} || {{ for m in {mods}; do module is-avail \"$m\" >/dev/null 2>&1 || \
         echo \"noyau: module $m does not exist here (module avail, or Lmod's module spider, lists those that do)\" >&2; \
         done; exit 1; }}\n"
    ));
    match then {
        Then::Exec => s.push_str("exec \"$@\"\n"),
        Then::List => s.push_str(
            "if [ -n \"${LMOD_VERSION:-}\" ]; then echo \"Lmod $LMOD_VERSION\"; \
             else module --version 2>&1 | head -n 1; fi\nmodule list 2>&1\n",
        ),
    }
    Ok(s)
}

/// Wraps `argv` in the loading shell.
pub fn wrap(spec: &EnvSpec, argv: Vec<String>) -> Result<Vec<String>, EnvError> {
    let mut out = vec![
        "bash".to_string(),
        "-c".into(),
        script(spec, Then::Exec)?,
        "noyau-modules".into(),
    ];
    out.extend(argv);
    Ok(out)
}

/// What loading the modules said, for the record.
pub struct Checked {
    /// `Lmod 8.6.19`, `Modules Release 5.2.0 (…)`.
    pub tool: String,
    /// `module list`.
    pub list: String,
}

/// Loads the modules once, to fail early with the tool's message, and
/// returns which tool it was and `module list` for the record.
pub fn check(spec: &EnvSpec, progress: crate::Progress<'_>) -> Result<Checked, EnvError> {
    progress(&format!("loading modules: {}", spec.modules.join(" ")));
    let out = cmd::run(
        Command::new("bash")
            .arg("-c")
            .arg(script(spec, Then::List)?),
        &format!("`module load {}` failed", spec.modules.join(" ")),
        progress,
    )?;
    let (tool, list) = out.split_once('\n').unwrap_or((out.as_str(), ""));
    Ok(Checked {
        tool: tool.trim().to_string(),
        list: list.to_string(),
    })
}
