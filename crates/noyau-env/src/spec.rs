//! The declaration of an environment, and its normal form.
//!
//! One flat table rather than one type per kind: the same keys come from a
//! TOML file, notebook metadata and the command line, merged key by key, so
//! a later source can change one key (`lock`, `isolation`) without
//! restating the rest. `kind` may be left out; it is inferred from the keys
//! present. Unknown keys are refused, so a typo is an error, not a silently
//! different environment.

use std::path::{Path, PathBuf};

use noyau_vars::EnvVars;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::EnvError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// No environment: the kernelspec as it is (e.g. only to isolate it).
    System,
    Python,
    Modules,
    Prefix,
    Guix,
    Apptainer,
}

impl Kind {
    /// As a spec writes it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::System => "system",
            Kind::Python => "python",
            Kind::Modules => "modules",
            Kind::Prefix => "prefix",
            Kind::Guix => "guix",
            Kind::Apptainer => "apptainer",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    #[default]
    None,
    Container,
}

/// Where a `python` environment is resolved and built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildAt {
    /// On the submitting host (login node), before the job is submitted,
    /// into the shared cache; the job only checks the entry and uses it,
    /// offline. Compute nodes of most clusters cannot reach a package index.
    #[default]
    Submit,
    /// Inside the job, on the compute node (a site whose nodes have a mirror).
    Node,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,

    // python
    /// A Python version or interpreter for `uv venv --python` (default: python3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,
    /// Requirement lines (`six==1.16.0`); ipykernel is added when missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<String>,
    /// A lock (requirements.txt with exact versions and `--hash` lines, as
    /// `uv pip compile --generate-hashes` writes it): installed exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<String>,
    /// A file holding the lock; read into `lock` when the spec is normalised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_file: Option<PathBuf>,

    // modules (also usable with any other kind)
    /// Modules to load before the kernel starts (`gcc/12`, `cuda/12.4`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<String>,
    /// Directories for `module use` before loading.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub module_use: Vec<PathBuf>,
    /// The shell init file defining `module` (default: the first found of
    /// `$MODULESHOME/init/bash`, environment-modules' and Lmod's usual places).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_init: Option<PathBuf>,

    // prefix
    /// An existing venv or conda environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<PathBuf>,

    // guix
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<PathBuf>,
    /// Guix packages, when there is no manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,

    // apptainer
    /// An image file (`.sif`) or a URI (`docker://…`, `oras://…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Pass the GPUs in (`--nv`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub nv: bool,

    /// Install only wheels (uv's `--no-build`): uv builds a source
    /// distribution by running its code. Set by [`crate::sources::merge`]
    /// whenever the requirements come from a notebook or project that is
    /// not trusted ([`crate::trust`]); a user may set it too.
    #[serde(default, skip_serializing_if = "is_false")]
    pub wheels_only: bool,

    /// Where it is built: `submit` (default) or `node`.
    #[serde(default, skip_serializing_if = "is_submit")]
    pub build: BuildAt,

    // isolation
    #[serde(default, skip_serializing_if = "is_default")]
    pub isolation: Isolation,
    /// Under isolation, keep the network (default: none).
    #[serde(default, skip_serializing_if = "is_false")]
    pub network: bool,
    /// Under isolation, an extra writable scratch directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch: Option<PathBuf>,
    /// Under isolation, more paths to show read-only (e.g. data under $HOME).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ro_bind: Vec<PathBuf>,

    /// The notebook's directory: writable under isolation, the base for
    /// relative paths. Set by [`crate::sources`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notebook_dir: Option<PathBuf>,
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_default(i: &Isolation) -> bool {
    *i == Isolation::None
}
fn is_submit(b: &BuildAt) -> bool {
    *b == BuildAt::Submit
}

/// The keys a spec takes, for messages.
pub(crate) const KNOWN_KEYS: &str = "kind, python, requirements, lock, lock_file, modules, \
     module_use, modules_init, prefix, channels, manifest, packages, image, nv, wheels_only, \
     build, isolation, network, scratch, ro_bind";

/// Keys holding paths, resolved against their source's directory.
pub(crate) const PATH_KEYS: &[&str] = &[
    "lock_file",
    "modules_init",
    "prefix",
    "channels",
    "manifest",
    "scratch",
    "notebook_dir",
];
pub(crate) const PATH_LIST_KEYS: &[&str] = &["module_use", "ro_bind"];

impl EnvSpec {
    /// A spec as it travels to a job (`NOYAU_ENV_SPEC`), normalised.
    pub fn from_json(s: &str) -> Result<Self, EnvError> {
        let v = serde_json::from_str(s).map_err(|e| {
            EnvError::Invalid(format!("{}: not JSON: {e}", EnvVars::NOYAU_ENV_SPEC))
        })?;
        Self::from_value(v)?.normalise()
    }

    /// Reads a spec from a JSON value (the merged sources).
    pub fn from_value(v: Value) -> Result<Self, EnvError> {
        serde_json::from_value(v)
            .map_err(|e| EnvError::Invalid(format!("{e}. Known keys: {KNOWN_KEYS}")))
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("a spec serialises")
    }

    /// The kind, given or inferred.
    pub fn kind(&self) -> Result<Kind, EnvError> {
        if let Some(k) = self.kind {
            return Ok(k);
        }
        let k = if self.image.is_some() {
            Kind::Apptainer
        } else if self.manifest.is_some() || self.channels.is_some() || !self.packages.is_empty() {
            Kind::Guix
        } else if self.prefix.is_some() {
            Kind::Prefix
        } else if self.python.is_some() || !self.requirements.is_empty() || self.lock.is_some() {
            Kind::Python
        } else if !self.modules.is_empty() {
            Kind::Modules
        } else if self.isolation != Isolation::None {
            Kind::System
        } else {
            return Err(EnvError::Invalid(
                "it says nothing to build: give `kind` and its keys (e.g. kind = \"python\", \
                 requirements = [\"numpy\"])"
                    .into(),
            ));
        };
        Ok(k)
    }

    /// Checks the keys fit the kind, reads `lock_file`, and sorts what has
    /// no order, so that equal environments have equal normal forms.
    pub fn normalise(mut self) -> Result<Self, EnvError> {
        let kind = self.kind()?;
        self.kind = Some(kind);
        if let Some(f) = self.lock_file.take() {
            if self.lock.is_some() {
                return Err(EnvError::Invalid(
                    "both `lock` and `lock_file` are given; keep one".into(),
                ));
            }
            // What it pins is what gets installed: read as the project's
            // noyau.toml is (refused if another user could have written it).
            // (A spec from sources has its lock_file read already, where
            // who named it is known: `sources::merge`. This is a spec
            // built by the user's own code or tests.)
            let text =
                noyau_config::project_text(&f, noyau_config::MAX_LOCK_SIZE)?.ok_or_else(|| {
                    EnvError::Invalid(format!(
                        "cannot read lock_file {}: it does not exist",
                        f.display()
                    ))
                })?;
            self.lock = Some(text);
        }
        for r in &mut self.requirements {
            *r = r.trim().to_string();
        }
        self.requirements.retain(|r| !r.is_empty());
        self.requirements.sort();
        self.requirements.dedup();
        self.packages.sort();
        self.packages.dedup();
        if let Some(p) = self.packages.iter().find(|p| !guix_package_spec(p)) {
            return Err(EnvError::Invalid(format!(
                "`packages` item {p:?} is not a Guix package (`name`, `name@version`, \
                 `name:output`): each is passed to `guix shell` as a package, and one \
                 starting with `-` would be an option (an expression to evaluate, a file \
                 to load, a directory to share)"
            )));
        }
        let need = |ok: bool, what: &str| -> Result<(), EnvError> {
            if ok {
                Ok(())
            } else {
                Err(EnvError::Invalid(what.to_string()))
            }
        };
        match kind {
            Kind::Python | Kind::System => {}
            Kind::Modules => need(
                !self.modules.is_empty(),
                "kind = \"modules\" needs `modules = [\"gcc/12\", …]`",
            )?,
            Kind::Prefix => need(
                self.prefix.is_some(),
                "kind = \"prefix\" needs `prefix = \"/path/to/env\"`",
            )?,
            Kind::Guix => need(
                self.manifest.is_some() || !self.packages.is_empty(),
                "kind = \"guix\" needs `manifest = \"manifest.scm\"` or `packages = [...]`",
            )?,
            Kind::Apptainer => need(
                self.image.is_some(),
                "kind = \"apptainer\" needs `image = \"image.sif\"`",
            )?,
        }
        if kind != Kind::Python && (!self.requirements.is_empty() || self.lock.is_some()) {
            return Err(EnvError::Invalid(format!(
                "`requirements`/`lock` belong to kind = \"python\", not {kind:?}"
            )));
        }
        Ok(self)
    }

    /// The content-addressed key of what gets built: the build-relevant
    /// keys of the normal form (not isolation or the notebook's place, which
    /// change how the kernel is started, not what is built).
    pub fn cache_key(&self) -> String {
        let build = serde_json::json!({
            "v": 1,
            "kind": self.kind,
            "python": self.python,
            "requirements": self.requirements,
            "lock": self.lock,
        });
        let digest = crate::sha256_hex(build.to_string().as_bytes());
        format!("py-{}", &digest[..32])
    }

    /// The notebook's directory, or the current one.
    pub fn notebook_dir(&self) -> PathBuf {
        self.notebook_dir
            .clone()
            .or_else(|| std::env::current_dir().ok())
            .unwrap_or_else(|| PathBuf::from("."))
    }
}

/// Makes `p` absolute against `base` (no symlink resolution).
pub(crate) fn absolute(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// A Guix package spec (`name[@version][:output]`): letters, digits and
/// `+._@:-`, starting with a letter or digit. `guix shell` takes options
/// anywhere before the command's `--` and has no separator for packages,
/// so this is what keeps an item from being one.
fn guix_package_spec(p: &str) -> bool {
    p.starts_with(|c: char| c.is_ascii_alphanumeric())
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+._@:-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A `packages` item is a package, from any source: one that `guix
    /// shell` would read as an option (evaluate Scheme, load a file,
    /// share a home, the network) is refused.
    #[test]
    fn a_guix_package_item_is_never_an_option() {
        for bad in [
            "--expression=(system \"touch /tmp/x\")",
            "-e(system \"x\")",
            "--file=/home/attacker/x.scm",
            "--load-path=/home/attacker",
            "--share=/home/victim",
            "--network",
            "-C",
            "python numpy",
            "",
        ] {
            let e = EnvSpec::from_value(json!({"kind": "guix", "packages": ["python", bad]}))
                .unwrap()
                .normalise()
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a Guix package"), "{bad}: {e}");
        }
        let ok = EnvSpec::from_value(json!({
            "kind": "guix",
            "packages": ["python", "python-numpy@1.26.4", "gcc-toolchain@12:debug", "gtk+"],
        }))
        .unwrap()
        .normalise();
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn kind_is_inferred_and_keys_checked() {
        let s = EnvSpec::from_value(json!({"requirements": ["six==1.16.0"]})).unwrap();
        assert_eq!(s.kind().unwrap(), Kind::Python);
        let s = EnvSpec::from_value(json!({"image": "x.sif"})).unwrap();
        assert_eq!(s.kind().unwrap(), Kind::Apptainer);
        let e = EnvSpec::from_value(json!({"requirement": ["six"]})).unwrap_err();
        assert!(e.to_string().contains("requirement"), "{e}");
        let e = EnvSpec::from_value(json!({"kind": "modules"}))
            .unwrap()
            .normalise()
            .unwrap_err();
        assert!(e.to_string().contains("modules = "), "{e}");
        let e =
            EnvSpec::from_value(json!({"kind": "prefix", "prefix": "/x", "requirements": ["a"]}))
                .unwrap()
                .normalise()
                .unwrap_err();
        assert!(e.to_string().contains("kind = \"python\""), "{e}");
    }

    #[test]
    fn key_ignores_order_and_isolation() {
        let a = EnvSpec::from_value(json!({"requirements": ["b", "a"]}))
            .unwrap()
            .normalise()
            .unwrap();
        let b = EnvSpec::from_value(
            json!({"requirements": ["a", " b "], "isolation": "container", "notebook_dir": "/x"}),
        )
        .unwrap()
        .normalise()
        .unwrap();
        assert_eq!(a.cache_key(), b.cache_key());
        let c = EnvSpec::from_value(json!({"requirements": ["a", "b"], "lock": "a==1\n"}))
            .unwrap()
            .normalise()
            .unwrap();
        assert_ne!(a.cache_key(), c.cache_key());
    }

    /// A lock says what gets installed: one another user could have
    /// written (here, group-writable) is refused as a project's noyau.toml
    /// would be; a missing one is named.
    #[test]
    fn a_lock_file_others_could_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let lock = d.path().join("noyau.lock");
        std::fs::write(&lock, "six==1.16.0\n").unwrap();
        let spec = |f: &std::path::Path| {
            EnvSpec::from_value(json!({"lock_file": f, "requirements": ["six"]}))
                .unwrap()
                .normalise()
        };
        let mode = |m| std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(m));
        mode(0o644).unwrap();
        assert_eq!(spec(&lock).unwrap().lock.as_deref(), Some("six==1.16.0\n"));
        mode(0o664).unwrap();
        let e = spec(&lock).unwrap_err().to_string();
        assert!(
            e.contains("is writable by its group or others (mode 0664)")
                && e.contains("trusted_projects"),
            "{e}"
        );
        let e = spec(&d.path().join("none.lock")).unwrap_err().to_string();
        assert!(e.contains("it does not exist"), "{e}");
    }
}
