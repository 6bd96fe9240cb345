//! `noyau install` and `noyau kernelspecs`: put a noyau proxy kernelspec on
//! the Jupyter paths, wrapping an existing ("inner") kernelspec, and list what
//! is installed.

use anyhow::{bail, Context, Result};
use noyau_wire::kernelspec::{self, EnvLookup, FoundSpec, InstallLocation, KernelSpec};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Install a kernelspec that runs an existing kernel through noyau.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// Name of the new kernelspec [default: noyau-<inner>]
    #[arg(long)]
    pub name: Option<String>,
    /// Name shown in the frontend's launcher [default: "<inner display name> (noyau <backend>[ <profile>])"]
    #[arg(long)]
    pub display_name: Option<String>,
    /// The kernelspec noyau runs inside the job
    #[arg(long, default_value = "python3")]
    pub inner: String,
    /// Scheduler backend that starts the job (local, slurm, …)
    #[arg(long, default_value = "local")]
    pub backend: String,
    /// Resource profile passed to the backend
    #[arg(long)]
    pub profile: Option<String>,
    /// Install in the user's Jupyter data dir (the default)
    #[arg(long, conflicts_with_all = ["sys_prefix", "prefix"])]
    pub user: bool,
    /// Install in the active Python environment (sys.prefix/share/jupyter)
    #[arg(long, conflicts_with = "prefix")]
    pub sys_prefix: bool,
    /// Install in DIR/share/jupyter
    #[arg(long, value_name = "DIR")]
    pub prefix: Option<PathBuf>,
    /// The noyau executable to put in the kernelspec's argv [default: this executable]
    #[arg(long, value_name = "PATH")]
    pub noyau: Option<PathBuf>,
}

impl InstallArgs {
    /// The install location chosen by `--user` / `--sys-prefix` / `--prefix`.
    pub fn location(&self) -> InstallLocation {
        match (&self.prefix, self.sys_prefix) {
            (Some(p), _) => InstallLocation::Prefix(p.clone()),
            (None, true) => InstallLocation::SysPrefix,
            (None, false) => InstallLocation::User,
        }
    }

    /// The kernelspec name: `--name`, else `noyau-<inner>`.
    pub fn spec_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("noyau-{}", self.inner.to_ascii_lowercase()))
    }
}

/// List installed kernelspecs.
#[derive(Debug, Clone, clap::Args)]
pub struct KernelspecsArgs {
    /// Print JSON (the shape of `jupyter kernelspec list --json`) instead of a table
    #[arg(long)]
    pub json: bool,
}

/// `noyau install`: write the proxy kernelspec and print where it went.
pub fn install(args: &InstallArgs) -> Result<()> {
    let exe = match &args.noyau {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("cannot determine the noyau executable's path; pass --noyau PATH")?,
    };
    let dir = install_with(args, &exe, &kernelspec::process_env)?;
    println!(
        "Installed kernelspec {} in {}",
        args.spec_name().to_ascii_lowercase(),
        dir.display()
    );
    if !labextension_found(&dir, &kernelspec::process_env) {
        println!("{LABEXTENSION_HINT}");
    }
    Ok(())
}

/// Where noyau's JupyterLab extension (labextension/, the Python package
/// noyau-jupyterlab) puts itself in a Jupyter data dir.
const LABEXTENSION: &str = "labextensions/noyau-jupyterlab/package.json";

/// Names the wheel noyau's release ships next to its own (scripts/release
/// builds it at noyau's version; tests/python/test_release.py checks that
/// this is its file name).
const LABEXTENSION_HINT: &str = concat!(
    "JupyterLab shows this kernel's batch job and allocation with noyau's extension noyau-jupyterlab, \
     not found on the Jupyter paths: install its prebuilt wheel (no Node needed), which noyau's \
     release ships next to noyau's wheel and tarball, where JupyterLab runs: \
     `python3 -m pip install --no-deps noyau_jupyterlab-",
    env!("CARGO_PKG_VERSION"),
    "-py3-none-any.whl`"
);

/// Whether the extension is in the Jupyter environment that will use the
/// kernelspec just written to `spec_dir` (`<data dir>/kernels/NAME`): that
/// data dir, or any other on the Jupyter data path.
fn labextension_found(spec_dir: &Path, env: EnvLookup) -> bool {
    let own = spec_dir
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    let path = kernelspec::kernel_dirs_from(env)
        .into_iter()
        .filter_map(|k| k.parent().map(Path::to_path_buf));
    own.into_iter()
        .chain(path)
        .any(|data| data.join(LABEXTENSION).is_file())
}

/// The work of [`install`] with the environment injected; returns the spec dir.
fn install_with(args: &InstallArgs, exe: &Path, env: EnvLookup) -> Result<PathBuf> {
    let name = args.spec_name();
    let dirs = kernelspec::kernel_dirs_from(env);
    let inner = kernelspec::find_in(&args.inner, &dirs)
        .with_context(|| format!("cannot install a noyau kernel around '{}'", args.inner))?;
    if inner.spec.metadata.contains_key("noyau") {
        bail!(
            "kernelspec '{}' ({}) is itself a noyau kernelspec; pass --inner with the real kernel \
             it wraps (e.g. --inner {})",
            inner.name,
            inner.dir.display(),
            inner.spec.metadata["noyau"]["inner"]
                .as_str()
                .unwrap_or("python3")
        );
    }
    let dest = kernelspec::install_dir_from(&args.location(), &name, env)?;
    if dest == inner.dir {
        bail!(
            "the new kernelspec would overwrite the inner one at {}; choose another --name",
            dest.display()
        );
    }
    let spec = proxy_spec(args, &inner, &absolute_exe(exe)?);
    kernelspec::write_spec(&dest, &spec)?;
    copy_logos(&inner.dir, &dest)?;
    Ok(dest)
}

/// A bare program name stays as is (found on PATH at launch); a relative
/// path is made absolute, since the frontend starts kernels from elsewhere.
fn absolute_exe(exe: &Path) -> Result<PathBuf> {
    if exe.is_absolute() || exe.components().count() <= 1 {
        return Ok(exe.to_path_buf());
    }
    std::path::absolute(exe).with_context(|| format!("cannot make {} absolute", exe.display()))
}

/// The kernelspec for the noyau proxy wrapping `inner`.
fn proxy_spec(args: &InstallArgs, inner: &FoundSpec, exe: &Path) -> KernelSpec {
    let mut argv: Vec<String> = vec![
        exe.to_string_lossy().into_owned(),
        "kernel".into(),
        "-f".into(),
        "{connection_file}".into(),
        "--inner".into(),
        inner.name.clone(),
        "--backend".into(),
        args.backend.clone(),
    ];
    if let Some(p) = &args.profile {
        argv.extend(["--profile".into(), p.clone()]);
    }
    let display_name = args.display_name.clone().unwrap_or_else(|| {
        let mut tag = format!("noyau {}", args.backend);
        if let Some(p) = &args.profile {
            tag.push(' ');
            tag.push_str(p);
        }
        format!("{} ({tag})", inner.spec.display_name)
    });
    let mut metadata = serde_json::Map::new();
    metadata.insert(
        "noyau".into(),
        json!({ "inner": inner.name, "backend": args.backend, "profile": args.profile }),
    );
    KernelSpec {
        argv,
        display_name,
        language: inner.spec.language.clone(),
        // The proxy answers interrupt_request itself and signals the real kernel.
        interrupt_mode: Some("message".into()),
        env: Default::default(),
        metadata,
        extra: Default::default(),
    }
}

/// Copy the inner spec's `logo-*.png` and `logo-svg.svg` into `dest`.
fn copy_logos(from: &Path, dest: &Path) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(from) else {
        return Ok(());
    };
    for entry in rd.filter_map(std::result::Result::ok) {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let is_logo =
            name == "logo-svg.svg" || (name.starts_with("logo-") && name.ends_with(".png"));
        if is_logo && entry.path().is_file() {
            let to = dest.join(&name);
            std::fs::copy(entry.path(), &to).with_context(|| {
                format!("cannot copy {} to {}", entry.path().display(), to.display())
            })?;
        }
    }
    Ok(())
}

/// `noyau kernelspecs`: a table, or JSON with `--json`. Malformed kernelspecs
/// are reported on stderr and skipped.
pub fn kernelspecs(args: &KernelspecsArgs) -> Result<()> {
    let (specs, errors) = kernelspec::list();
    for e in &errors {
        eprintln!("warning: skipped {e}");
    }
    let out = if args.json {
        let mut s = serde_json::to_string_pretty(&specs_json(&specs))?;
        s.push('\n');
        s
    } else {
        specs_table(&specs)
    };
    print!("{out}");
    Ok(())
}

fn specs_json(specs: &[FoundSpec]) -> Value {
    let mut map = serde_json::Map::new();
    for f in specs {
        map.insert(
            f.name.clone(),
            json!({ "resource_dir": f.dir, "spec": f.spec }),
        );
    }
    json!({ "kernelspecs": map })
}

/// `inner/backend[/profile]` for a noyau spec, `-` otherwise.
fn noyau_column(spec: &KernelSpec) -> String {
    let Some(m) = spec.metadata.get("noyau") else {
        return "-".into();
    };
    let s = |k: &str| m.get(k).and_then(Value::as_str);
    let mut out = format!(
        "{}/{}",
        s("inner").unwrap_or("?"),
        s("backend").unwrap_or("?")
    );
    if let Some(p) = s("profile") {
        out.push('/');
        out.push_str(p);
    }
    out
}

fn specs_table(specs: &[FoundSpec]) -> String {
    if specs.is_empty() {
        return "No kernelspecs found on the Jupyter paths.\n".into();
    }
    let header = ["NAME", "LANGUAGE", "DISPLAY NAME", "NOYAU", "PATH"].map(String::from);
    let rows: Vec<[String; 5]> = specs
        .iter()
        .map(|f| {
            [
                f.name.clone(),
                f.spec.language.clone(),
                f.spec.display_name.clone(),
                noyau_column(&f.spec),
                f.dir.display().to_string(),
            ]
        })
        .collect();
    let mut widths = [0usize; 5];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::collections::HashMap;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        install: InstallArgs,
    }

    fn parse(args: &[&str]) -> Result<InstallArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("noyau").chain(args.iter().copied())).map(|c| c.install)
    }

    fn env_of(pairs: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<&str, String> = pairs.into_iter().collect();
        move |k| m.get(k).cloned()
    }

    /// A Jupyter path holding a python3 kernelspec like ipykernel's, with logos.
    fn fake_jupyter_path(root: &Path) -> PathBuf {
        let d = root.join("jp/kernels/python3");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("kernel.json"),
            r#"{"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (ipykernel)", "language": "python",
                "metadata": {"debugger": true}}"#,
        )
        .unwrap();
        std::fs::write(d.join("logo-64x64.png"), b"png").unwrap();
        std::fs::write(d.join("logo-svg.svg"), b"<svg/>").unwrap();
        std::fs::write(d.join("kernel.js"), b"// not a logo").unwrap();
        root.join("jp")
    }

    #[test]
    fn install_writes_proxy_spec() {
        let tmp = tempfile::tempdir().unwrap();
        let jp = fake_jupyter_path(tmp.path());
        let env = env_of(vec![
            ("JUPYTER_PATH", jp.display().to_string()),
            (
                "JUPYTER_DATA_DIR",
                tmp.path().join("data").display().to_string(),
            ),
        ]);
        let exe = Path::new("/opt/noyau/bin/noyau");

        let args = parse(&["--backend", "slurm", "--profile", "gpu"]).unwrap();
        assert_eq!(args.location(), InstallLocation::User);
        let dir = install_with(&args, exe, &env).unwrap();
        assert_eq!(dir, tmp.path().join("data/kernels/noyau-python3"));
        let spec = KernelSpec::from_file(&dir.join("kernel.json")).unwrap();
        assert_eq!(
            spec.argv,
            [
                "/opt/noyau/bin/noyau",
                "kernel",
                "-f",
                "{connection_file}",
                "--inner",
                "python3",
                "--backend",
                "slurm",
                "--profile",
                "gpu"
            ]
        );
        assert_eq!(spec.display_name, "Python 3 (ipykernel) (noyau slurm gpu)");
        assert_eq!(spec.language, "python");
        assert!(spec.interrupt_by_message());
        assert_eq!(
            Value::Object(spec.metadata.clone()),
            json!({"noyau": {"inner": "python3", "backend": "slurm", "profile": "gpu"}})
        );
        assert_eq!(std::fs::read(dir.join("logo-64x64.png")).unwrap(), b"png");
        assert!(dir.join("logo-svg.svg").is_file());
        assert!(!dir.join("kernel.js").exists());

        // The new spec is now listed, with its noyau column.
        let dirs = kernelspec::kernel_dirs_from(&env);
        let (specs, errors) = kernelspec::list_in(&dirs);
        assert!(errors.is_empty());
        let table = specs_table(&specs);
        assert!(
            table.contains("noyau-python3") && table.contains("python3/slurm/gpu"),
            "{table}"
        );
        let j = specs_json(&specs);
        assert_eq!(
            j["kernelspecs"]["noyau-python3"]["spec"]["interrupt_mode"],
            "message"
        );

        // Wrapping a noyau spec is refused.
        let again = parse(&["--inner", "noyau-python3", "--name", "x"]).unwrap();
        let e = install_with(&again, exe, &env).unwrap_err();
        assert!(
            format!("{e:#}").contains("itself a noyau kernelspec"),
            "{e:#}"
        );
    }

    #[test]
    fn install_defaults_and_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let jp = fake_jupyter_path(tmp.path());
        let env = env_of(vec![("JUPYTER_PATH", jp.display().to_string())]);
        let prefix = tmp.path().join("pfx");
        let p = prefix.display().to_string();
        let args = parse(&["--prefix", &p, "--name", "Mine"]).unwrap();
        let dir = install_with(&args, Path::new("noyau"), &env).unwrap();
        assert_eq!(dir, prefix.join("share/jupyter/kernels/mine"));
        let spec = KernelSpec::from_file(&dir.join("kernel.json")).unwrap();
        assert_eq!(spec.argv[0], "noyau");
        assert_eq!(spec.argv.len(), 8, "no --profile");
        assert_eq!(spec.display_name, "Python 3 (ipykernel) (noyau local)");
        assert_eq!(spec.metadata["noyau"]["profile"], Value::Null);
    }

    #[test]
    fn labextension_looked_for_beside_the_spec_and_on_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let jp = fake_jupyter_path(tmp.path());
        let env = env_of(vec![("JUPYTER_PATH", jp.display().to_string())]);
        let p = tmp.path().join("pfx").display().to_string();
        let args = parse(&["--prefix", &p]).unwrap();
        let dir = install_with(&args, Path::new("noyau"), &env).unwrap();
        assert!(!labextension_found(&dir, &env));
        let put = |data: &Path| {
            let f = data.join(LABEXTENSION);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, "{}").unwrap();
        };
        // In the prefix the kernelspec went to…
        put(&tmp.path().join("pfx/share/jupyter"));
        assert!(labextension_found(&dir, &env));
        // …or anywhere on the Jupyter path.
        std::fs::remove_dir_all(tmp.path().join("pfx/share/jupyter/labextensions")).unwrap();
        put(&jp);
        assert!(labextension_found(&dir, &env));
    }

    #[test]
    fn missing_inner_lists_available() {
        let tmp = tempfile::tempdir().unwrap();
        let jp = fake_jupyter_path(tmp.path());
        let env = env_of(vec![
            ("JUPYTER_PATH", jp.display().to_string()),
            (
                "JUPYTER_DATA_DIR",
                tmp.path().join("data").display().to_string(),
            ),
        ]);
        let args = parse(&["--inner", "pyhton3"]).unwrap();
        let e = format!(
            "{:#}",
            install_with(&args, Path::new("noyau"), &env).unwrap_err()
        );
        assert!(e.contains("available: python3"), "{e}");
        assert!(e.contains("Did you mean 'python3'?"), "{e}");
    }

    #[test]
    fn location_flags_are_exclusive() {
        assert!(parse(&["--user", "--sys-prefix"]).is_err());
        assert!(parse(&["--user", "--prefix", "/x"]).is_err());
        assert!(parse(&["--sys-prefix", "--prefix", "/x"]).is_err());
        assert_eq!(
            parse(&["--sys-prefix"]).unwrap().location(),
            InstallLocation::SysPrefix
        );
        assert_eq!(
            parse(&["--user"]).unwrap().location(),
            InstallLocation::User
        );
    }
}
