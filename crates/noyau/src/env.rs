//! `noyau env`: the environment cache as a user and an admin see it.
//!
//! `build` prebuilds on the login node what a notebook (or a spec) needs,
//! data files included; `list` shows what the caches hold; `show` what a
//! notebook resolves to and whether it is built; `gc` removes what has not
//! been used for a while (never what a kernel uses); `lock` writes the
//! resolved lock beside the notebook. An admin builds a site cache with
//! `NOYAU_ENV_CACHE=/site/cache noyau env build …` (then `chmod -R a-w`
//! is not needed: entries are sealed), and users name it in
//! `NOYAU_ENV_SITE_CACHE`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;
use noyau_env::manage;
use noyau_env::sources::{self, Declared};
use noyau_env::{Cache, EnvSpec};
use noyau_text::{for_terminal, Keep};

#[derive(clap::Subcommand)]
pub enum EnvCommand {
    /// Build (resolve, lock, install) a notebook's environment and fetch its
    /// data files here, into the cache, as a submission would
    Build {
        /// A notebook (.ipynb), or a spec as `noyau run --env` takes it
        /// (an inline TOML/JSON table, or a TOML/JSON file)
        what: String,
    },
    /// The cache's environments and data files: size, last use, what they hold
    List,
    /// What a notebook's environment and data resolve to, and whether they are built
    Show {
        /// The notebook (.ipynb)
        notebook: PathBuf,
    },
    /// Remove environments and data files unused for a while (never one in use)
    Gc {
        /// Unused for longer than this: 30d, 12h, 90m
        #[arg(long, default_value = "30d")]
        older_than: String,
        /// Only say what would be removed
        #[arg(long)]
        dry_run: bool,
    },
    /// Write the notebook's resolved lock to noyau.lock beside it (building it if needed)
    Lock {
        /// The notebook (.ipynb)
        notebook: PathBuf,
    },
}

pub fn main(cmd: EnvCommand) -> anyhow::Result<i32> {
    let cwd = std::env::current_dir().context("the current directory")?;
    let cache = Cache::at_default();
    match cmd {
        EnvCommand::Build { what } => build(&what, &cwd, &cache),
        EnvCommand::List => {
            list(&cache);
            Ok(0)
        }
        EnvCommand::Show { notebook } => show(&notebook, &cwd, &cache),
        EnvCommand::Gc {
            older_than,
            dry_run,
        } => gc(&cache, &older_than, dry_run),
        EnvCommand::Lock { notebook } => lock(&notebook, &cwd, &cache),
    }
}

/// A notebook's declarations, or a spec's (with no data).
fn declared(what: &str, cwd: &Path) -> anyhow::Result<Declared> {
    if what.ends_with(".ipynb") {
        return Ok(sources::declared_in_file(Path::new(what), None, cwd)?.0);
    }
    let spec = sources::merge(&[sources::from_cli(what, cwd)?], cwd)?;
    Ok(Declared {
        spec,
        data: Vec::new(),
    })
}

fn progress() -> impl FnMut(&str) {
    // A line may quote the notebook's metadata (a data file's URL).
    |l: &str| eprintln!("noyau: {}", for_terminal(l, Keep::Nothing))
}

fn build(what: &str, cwd: &Path, cache: &Cache) -> anyhow::Result<i32> {
    let mut d = declared(what, cwd)?;
    if d.spec.is_none() && d.data.is_empty() {
        anyhow::bail!("{what} declares no environment and no data file: nothing to build");
    }
    // Here, whatever `build` says: this is the prebuild.
    if let Some(s) = &mut d.spec {
        s.build = noyau_env::BuildAt::Submit;
        if !noyau_env::prepare::builds_here(s) {
            println!(
                "{} environments are realised where the kernel runs; nothing to build here",
                s.kind()?.name()
            );
        }
    }
    let prepared = noyau_env::prepare(d.spec.as_ref(), &d.data, cache, &mut progress())?;
    if let Some(e) = &prepared.entry {
        println!(
            "{}  {}  lock sha256 {}",
            e.key,
            e.cache.join(&e.key).display(),
            e.lock_sha256
        );
    }
    for f in &prepared.data {
        println!(
            "data {}  sha256 {}  {} bytes  {}",
            f.name,
            f.sha256,
            f.size,
            f.path().display()
        );
    }
    Ok(0)
}

fn list(cache: &Cache) {
    let mut caches = Vec::new();
    caches.extend(noyau_env::cache::site_cache().map(|c| ("site", c)));
    caches.push(("yours", cache.clone()));
    for (whose, c) in caches {
        println!("{whose}: {}", c.root().display());
        let entries = manage::list(&c);
        let data = noyau_env::data::list(&noyau_env::data::Store::of(&c));
        if entries.is_empty() && data.is_empty() {
            println!("  (empty)");
        }
        for e in entries {
            println!(
                "  {}  {:>9}  used {:<12}  {}",
                e.key,
                size(e.size),
                ago(e.last_use),
                e.summary()
            );
        }
        for f in data {
            println!(
                "  data {}…  {:>9}  used {:<12}  {} ({})",
                &f.sha256[..16],
                size(f.size),
                ago(f.last_use),
                for_terminal(f.about["name"].as_str().unwrap_or("?"), Keep::Nothing),
                for_terminal(f.about["url"].as_str().unwrap_or("?"), Keep::Nothing)
            );
        }
    }
}

fn show(notebook: &Path, cwd: &Path, cache: &Cache) -> anyhow::Result<i32> {
    let (d, _) = sources::declared_in_file(notebook, None, cwd)?;
    match &d.spec {
        None => println!("environment: none (the kernelspec's own)"),
        Some(spec) => show_spec(spec, cache)?,
    }
    let store = noyau_env::data::Store::of(cache);
    for r in &d.data {
        // A refused file is shown with its reason, not the end of the listing.
        let state = match store.find(&r.sha256, &r.name, &r.url) {
            Ok(Some(f)) => format!("fetched: {}", f.path().display()),
            Ok(None) => "not fetched yet".into(),
            Err(e) => format!("refused: {e}"),
        };
        println!(
            "data {}: {} sha256 {}: {}",
            for_terminal(&r.name, Keep::Nothing),
            for_terminal(&noyau_env::index::redact(&r.url), Keep::Nothing),
            r.sha256,
            for_terminal(&state, Keep::Nothing)
        );
    }
    Ok(0)
}

fn show_spec(spec: &EnvSpec, cache: &Cache) -> anyhow::Result<()> {
    let mut shown = spec.clone();
    shown.notebook_dir = None;
    // From the notebook: JSON escapes controls, not bidi characters.
    let value = shown.to_value().to_string();
    println!("environment: {}", for_terminal(&value, Keep::Nothing));
    if !noyau_env::prepare::builds_here(spec) {
        println!(
            "built: where the kernel runs (kind {}, build = {:?})",
            spec.kind()?.name(),
            spec.build
        );
        return Ok(());
    }
    let key = spec.cache_key();
    let net = noyau_env::index::Network::from_env();
    println!("key: {key}; packages from {}", net.index_shown());
    let site = noyau_env::cache::site_cache();
    for c in site.iter().chain(std::iter::once(cache)) {
        if let Some(rec) = c.lookup(&key)? {
            println!(
                "built: {} ({}; lock sha256 {})",
                c.entry(&key).display(),
                manage::summary(&rec),
                rec["lock_sha256"].as_str().unwrap_or("?")
            );
            return Ok(());
        }
    }
    println!("built: not yet (`noyau env build NOTEBOOK` builds it; a run or a kernel would)");
    Ok(())
}

fn gc(cache: &Cache, older_than: &str, dry_run: bool) -> anyhow::Result<i32> {
    let age = manage::parse_age(older_than)?;
    let r = manage::gc(cache, age, dry_run)?;
    let verb = if dry_run { "would remove" } else { "removed" };
    for (what, bytes) in &r.removed {
        println!("{verb} {what} ({})", size(*bytes));
    }
    for what in &r.in_use {
        println!("kept {what}: in use");
    }
    let total: u64 = r.removed.iter().map(|(_, b)| b).sum();
    println!(
        "{verb} {} ({}), kept {} used within {older_than} and {} in use, in {}",
        r.removed.len(),
        size(total),
        r.kept,
        r.in_use.len(),
        cache.root().display()
    );
    Ok(0)
}

fn lock(notebook: &Path, cwd: &Path, cache: &Cache) -> anyhow::Result<i32> {
    let (d, dir) = sources::declared_in_file(notebook, None, cwd)?;
    let mut spec = d
        .spec
        .with_context(|| format!("{} declares no environment", notebook.display()))?;
    spec.build = noyau_env::BuildAt::Submit;
    if !noyau_env::prepare::builds_here(&spec) {
        anyhow::bail!(
            "a {} environment has no lock (only kind = \"python\" does)",
            spec.kind()?.name()
        );
    }
    let prepared = noyau_env::prepare(Some(&spec), &[], cache, &mut progress())?;
    let entry = prepared.entry.expect("a python spec is prepared");
    let path = dir.join("noyau.lock");
    // The notebook's directory may be shared: written beneath the
    // directory it was read from (not where its path leads after the
    // build, which may take minutes), a link planted there replaced,
    // never written through.
    noyau_trust::replace_at(&dir, "noyau.lock", entry.lock.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "wrote {} ({} lines, sha256 {}); `lock_file = \"noyau.lock\"` under [environment] in noyau.toml reproduces it",
        path.display(),
        entry.lock.lines().count(),
        entry.lock_sha256
    );
    Ok(0)
}

fn size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn ago(t: SystemTime) -> String {
    let s = SystemTime::now()
        .duration_since(t)
        .unwrap_or_default()
        .as_secs();
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        7200..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86400),
    }
}
