//! The config files as another user sharing the machine would leave them:
//! real files, FIFOs, links and owners. Giving a file away (to `nobody`)
//! needs root, as scripts/test runs.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use noyau_trust::anchor::ProjectDir;

use crate::{user_path, Config, ConfigError, SiteFiles, MAX_SIZE};

/// The project `dir`, anchored now.
pub(crate) fn anchored_dir(dir: &Path) -> ProjectDir {
    ProjectDir::open(dir).unwrap()
}

const NOBODY: u32 = 65534;

/// Writes `text` to `path` as a file only its owner writes (0644,
/// whatever the umask).
pub(crate) fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    chmod(path, 0o644);
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A user's config file in `d` trusting `dirs`, and a project file's path.
fn setup(d: &Path, dirs: &[String]) -> (PathBuf, PathBuf) {
    let user = d.join("config.toml");
    write(&user, &format!("trusted_projects = {dirs:?}\n"));
    let project = d.join("proj");
    std::fs::create_dir_all(&project).unwrap();
    (user, project.join("noyau.toml"))
}

/// Config::load_with in a thread: a FIFO opened blocking would hang it,
/// and the test fails after 20 s instead of hanging too.
fn load(user: &Path, project: &Path) -> Result<Config, String> {
    let (user, project) = (user.to_path_buf(), project.to_path_buf());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r =
            Config::load_with(&SiteFiles::user_only(&user), &project).map_err(|e| e.to_string());
        let _ = tx.send(r);
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("loading the config files hung")
}

use noyau_trust::testing::root;

const PROFILE: &str = "[profiles.p]\ncpus_per_task = 2\n";

/// The refusal names the file, what was wrong, and both ways out.
fn assert_refused(e: &str, project: &Path, what: &str) {
    let dir = std::fs::canonicalize(project.parent().unwrap()).unwrap();
    assert!(
        e.starts_with(&format!("{} {what}", project.display())),
        "{e}"
    );
    assert!(
        e.contains(&format!("trusted_projects = [\"{}\"]", dir.display())),
        "{e}"
    );
    assert!(e.contains("config.toml"), "{e}");
}

#[test]
fn a_fifo_project_file_is_refused_at_once_even_in_a_trusted_directory() {
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    nix::unistd::mkfifo(&project, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let e = load(&user, &project).unwrap_err();
    assert!(
        e.contains("is a FIFO, not a regular file")
            && e.contains(&format!("rm {}", project.display())),
        "{e}"
    );
    // No setting makes a FIFO a config file.
    assert!(!e.contains("trusted_projects"), "{e}");
    let (user, _) = setup(d.path(), &[project.parent().unwrap().display().to_string()]);
    let e = load(&user, &project).unwrap_err();
    assert!(e.contains("is a FIFO, not a regular file"), "{e}");
    // Nor a directory.
    std::fs::remove_file(&project).unwrap();
    std::fs::create_dir(&project).unwrap();
    let e = load(&user, &project).unwrap_err();
    assert!(e.contains("is a directory, not a regular file"), "{e}");
}

#[test]
fn a_group_writable_project_file_is_refused_unless_its_directory_is_trusted() {
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    write(&project, PROFILE);
    chmod(&project, 0o664);
    let e = load(&user, &project).unwrap_err();
    assert_refused(
        &e,
        &project,
        "is writable by its group or others (mode 0664)",
    );
    assert!(
        e.contains(&format!("chmod go-w {}", project.display())),
        "{e}"
    );
    let dir = project.parent().unwrap();
    let (user, _) = setup(d.path(), &[dir.display().to_string()]);
    let c = load(&user, &project).unwrap();
    assert_eq!(c.names(), ["p"]);
    // Every directory under an entry ending in /*, not its neighbours.
    let (user, _) = setup(d.path(), &[format!("{}/*", d.path().display())]);
    assert!(load(&user, &project).is_ok());
    let (user, _) = setup(d.path(), &[format!("{}/*", dir.join("sub").display())]);
    assert!(load(&user, &project).is_err());
}

#[test]
fn a_symlinked_project_file_is_refused_unless_its_directory_is_trusted() {
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    let real = d.path().join("elsewhere.toml");
    write(&real, PROFILE);
    std::os::unix::fs::symlink(&real, &project).unwrap();
    let e = load(&user, &project).unwrap_err();
    assert_refused(&e, &project, "is a symlink");
    assert!(e.contains("replace the link with a copy"), "{e}");
    let (user, _) = setup(d.path(), &[project.parent().unwrap().display().to_string()]);
    // Trusted for reading, but a link out of the directory is not
    // followed: it could lead to a file of the user's an error would show.
    let e = load(&user, &project).unwrap_err();
    assert!(
        e.contains("is a link that leads out of its directory"),
        "{e}"
    );
    std::fs::remove_file(&project).unwrap();
    let inside = project.with_file_name("team.toml");
    write(&inside, PROFILE);
    std::os::unix::fs::symlink("team.toml", &project).unwrap();
    assert_eq!(load(&user, &project).unwrap().names(), ["p"]);
}

/// A project's noyau.toml with other names is refused, its directory
/// trusted or not: another user may have hard-linked a file of the
/// user's there (where `fs.protected_hardlinks` is 0), whose keys an
/// error could quote.
#[test]
fn a_hard_linked_project_file_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    let mine = d.path().join("private.toml");
    write(&mine, "ghp_SECRET = 1\n");
    std::fs::hard_link(&mine, &project).unwrap();
    let refused = |user: &Path| {
        let e = load(user, &project).unwrap_err();
        assert!(
            e.contains(&format!("{} has 2 names (hard links)", project.display()))
                && !e.contains("ghp_SECRET"),
            "{e}"
        );
    };
    refused(&user);
    let (user, _) = setup(d.path(), &[project.parent().unwrap().display().to_string()]);
    refused(&user);
    // One name: read.
    std::fs::remove_file(&mine).unwrap();
    write(&project, PROFILE);
    assert_eq!(load(&user, &project).unwrap().names(), ["p"]);
}

/// A file the project names in a subdirectory, refused, names the
/// project's directory (the one to trust, or the one a link leads out
/// of), not the subdirectory.
#[test]
fn a_refused_file_in_a_subdirectory_names_the_projects_directory() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("proj");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let real = std::fs::canonicalize(&dir).unwrap();
    write(&d.path().join("secret"), "x");
    std::os::unix::fs::symlink(d.path().join("secret"), dir.join("sub/out")).unwrap();
    write(&dir.join("sub/r.lock"), "six==1.16.0\n");
    chmod(&dir.join("sub/r.lock"), 0o666);
    let read = |rel: &str| {
        crate::TrustedProjects::default()
            .read_named(&anchored_dir(&dir), Path::new(rel), MAX_SIZE)
            .unwrap_err()
    };
    match read("sub/out") {
        ConfigError::LinkOut { dir, .. } => assert_eq!(dir, real),
        e => panic!("not a link out: {e}"),
    }
    let e = read("sub/r.lock").to_string();
    assert!(
        e.contains(&format!("trusted_projects = [\"{}\"]", real.display())),
        "{e}"
    );
}

/// A project's file that does not parse (read whoever wrote it, under a
/// site's wildcard: perhaps a link to a file of the user's) is reported
/// by line and column, its text not quoted; the user's own file is.
#[test]
fn a_project_files_text_is_not_quoted_in_a_parse_error() {
    let d = tempfile::tempdir().unwrap();
    let project = d.path().join("proj/noyau.toml");
    let (user, _) = setup(d.path(), &[project.parent().unwrap().display().to_string()]);
    write(&project, "[profiles.p]\nhttps://me:s3cret@example.org\n");
    let e = load(&user, &project).unwrap_err();
    assert!(!e.contains("s3cret"), "{e}");
    assert!(e.contains("at line 2, column"), "{e}");
    write(&user, "https://me:mine@example.org\n");
    let e = load(&user, &project).unwrap_err();
    assert!(e.contains("me:mine@example.org"), "the user's own: {e}");
}

#[test]
fn another_users_project_file_is_refused_naming_its_owner() {
    if !root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    write(&project, PROFILE);
    std::os::unix::fs::chown(&project, Some(NOBODY), None).unwrap();
    let e = load(&user, &project).unwrap_err();
    assert_refused(
        &e,
        &project,
        &format!(
            "belongs to uid {NOBODY}, not to you (uid {0}) or root (uid 0)",
            noyau_trust::me()
        ),
    );
    assert!(e.contains("another user may have written it"), "{e}");
    // The project's own trusted_projects does not count.
    write(
        &project,
        &format!(
            "trusted_projects = [\"{}\"]\n{PROFILE}",
            project.parent().unwrap().display()
        ),
    );
    std::os::unix::fs::chown(&project, Some(NOBODY), None).unwrap();
    assert!(load(&user, &project).is_err());
    let (user, _) = setup(d.path(), &[project.parent().unwrap().display().to_string()]);
    let c = load(&user, &project).unwrap();
    assert_eq!(c.names(), ["p"]);
    assert_eq!(
        c.trusted_projects,
        Config::load_from(&SiteFiles::user_only(&user))
            .unwrap()
            .trusted_projects,
        "the user's list, not the project's"
    );
}

#[test]
fn the_site_files_must_be_ours_or_roots_and_not_open_to_others() {
    let d = tempfile::tempdir().unwrap();
    let site = d.path().join("config.toml");
    write(&site, "scheduler = \"slurm\"\n");
    assert_eq!(
        Config::load_from(&SiteFiles::user_only(&site))
            .unwrap()
            .scheduler
            .as_deref(),
        Some("slurm")
    );
    chmod(&site, 0o666);
    let e = Config::load_from(&SiteFiles::user_only(&site))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is writable by its group or others (mode 0666)") && e.contains("chmod go-w"),
        "{e}"
    );
    // A link an admin or a dotfile manager made is followed.
    chmod(&site, 0o644);
    let link = d.path().join("link.toml");
    std::os::unix::fs::symlink(&site, &link).unwrap();
    assert!(Config::load_from(&SiteFiles::user_only(&link))
        .unwrap()
        .scheduler
        .is_some());
    // A missing file is no file.
    assert!(Config::load_from(&SiteFiles::user_only(&d.path().join("none.toml"))).is_ok());
}

#[test]
fn a_config_file_over_the_size_limit_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    write(&project, &format!("# {}\n", "x".repeat(MAX_SIZE as usize)));
    let e = load(&user, &project).unwrap_err();
    assert!(
        e.contains(&format!("{} is {} bytes", project.display(), MAX_SIZE + 3))
            && e.contains(&format!(
                "more than noyau reads from such a file ({MAX_SIZE} bytes)"
            )),
        "{e}"
    );
}

#[test]
fn trusted_projects_entries_must_be_absolute() {
    let d = tempfile::tempdir().unwrap();
    let (user, _) = setup(d.path(), &["proj".into()]);
    let e = Config::load_from(&SiteFiles::user_only(&user))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("trusted_projects: \"proj\" is not an absolute path"),
        "{e}"
    );
    let e = Config::default()
        .add_str(Path::new("f.toml"), "trusted_project = []\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean `trusted_projects`"), "{e}");
}

#[test]
fn a_relative_xdg_config_home_is_ignored() {
    let with = |xdg: &'static str| {
        move |n: &str| match n {
            "HOME" => Some(OsString::from("/home/u")),
            "XDG_CONFIG_HOME" => Some(OsString::from(xdg)),
            _ => None,
        }
    };
    for ignored in ["conf", "", "./x"] {
        assert_eq!(
            user_path(&with(ignored)),
            Some(PathBuf::from("/home/u/.config/noyau/config.toml")),
            "XDG_CONFIG_HOME={ignored:?}"
        );
    }
    assert_eq!(
        user_path(&with("/etc/xdg-u")),
        Some(PathBuf::from("/etc/xdg-u/noyau/config.toml"))
    );
}

/// Nor is an empty or relative HOME a home: it named a config file in
/// the working directory.
#[test]
fn a_relative_home_is_ignored() {
    for home in ["", "u", "./u"] {
        let var = move |n: &str| (n == "HOME").then(|| OsString::from(home));
        assert_eq!(user_path(&var), None, "HOME={home:?}");
    }
}

#[test]
fn errors_are_typed() {
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    write(&project, PROFILE);
    chmod(&project, 0o666);
    let e = Config::load_with(&SiteFiles::user_only(&user), &project).unwrap_err();
    assert!(
        matches!(e, ConfigError::UntrustedProject { ref path, .. } if path == &project),
        "{e}"
    );
}

/// An untrusted project's file may not set a profile key that runs code
/// (each refused, naming the file, the profile, the key, why and both ways
/// out); trusted, or in the user's own file, it may; and a project may
/// still choose resources.
#[test]
fn an_untrusted_project_may_choose_resources_but_not_code() {
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    let dir = std::fs::canonicalize(project.parent().unwrap()).unwrap();
    let code = [
        ("prologue = \"touch /tmp/x\"", "prologue", "shell lines"),
        ("env = { LD_PRELOAD = \"/tmp/x.so\" }", "env", "LD_PRELOAD"),
        (
            "sbatch = [\"--output=/home/u/.bashrc\"]",
            "sbatch",
            "submit command",
        ),
        (
            "oarsub = [\"-O\", \"/home/u/.bashrc\"]",
            "oarsub",
            "submit command",
        ),
        (
            "qsub = [\"-o\", \"/home/u/.bashrc\"]",
            "qsub",
            "submit command",
        ),
    ];
    for (line, key, why) in code {
        let text = format!("[profiles.p]\ncpus_per_task = 2\n{line}\n");
        write(&project, &text);
        let e = load(&user, &project)
            .unwrap()
            .profile(Some("p"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "{}: [profiles.p] {key} (line 3, column 1): ",
                project.display()
            )) && e.contains(why)
                && e.contains(&format!("noyau trust {}", dir.display()))
                && e.contains(&format!("set this profile in {}", user.display())),
            "{e}"
        );
        // The same lines in the user's own file, or a trusted project's.
        write(&user, &text);
        assert!(Config::load_from(&SiteFiles::user_only(&user)).is_ok());
        let (trusting, _) = setup(d.path(), &[dir.display().to_string()]);
        let trusted = load(&trusting, &project).unwrap().profile(Some("p"), &[]);
        assert!(trusted.is_ok(), "{key}: {trusted:?}");
        setup(d.path(), &[]);
    }
    write(
        &project,
        "[profiles.p]\nbackend = \"slurm\"\npartition = \"gpu\"\ntime = \"1:00:00\"\n\
         cpus_per_task = 4\nnodes = 1\nmem = \"8G\"\ngpus = \"1\"\nqos = \"normal\"\n\
         kernel = \"ir\"\nwalltime_signal = 60\n[profiles.o]\nbackend = \"oar\"\n\
         properties = \"cluster='dahu'\"\n",
    );
    let c = load(&user, &project).unwrap();
    assert_eq!(c.names(), ["o", "p"]);
}

/// A profile's `environment` records the project that set it (noyau-env
/// holds it to a project's rules); the user's file or `-o` is the user's.
#[test]
fn a_profiles_environment_records_the_project_that_set_it() {
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    let dir = std::fs::canonicalize(project.parent().unwrap()).unwrap();
    write(&user, "[profiles.p]\nenvironment = { python = \"3.12\" }\n");
    write(&project, PROFILE);
    let p = load(&user, &project)
        .unwrap()
        .profile(Some("p"), &[])
        .unwrap();
    assert!(
        p.environment.is_some() && p.environment_from.is_none(),
        "{p:?}"
    );
    write(
        &project,
        "[profiles.p]\nenvironment = { python = \"/tmp/evil\" }\n",
    );
    let c = load(&user, &project).unwrap();
    let p = c.profile(Some("p"), &[]).unwrap();
    assert_eq!(p.environment_from.as_deref(), Some(dir.as_path()));
    let p = c.profile(Some("p"), &["environment={}".into()]).unwrap();
    assert_eq!(p.environment_from, None, "-o is the user's");
}

/// A refused profile fails when used, not when the file is read: the
/// project's other profiles, and commands that use none, still work (a
/// user's own project with `[profiles.gpu] sbatch = [...]` broke every
/// kernel and `noyau ps` there).
#[test]
fn an_untrusted_projects_code_is_refused_only_in_the_profile_that_is_used() {
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    write(
        &project,
        "scheduler = \"slurm\"\n[profiles.a]\nsbatch = [\"--exclusive\"]\n\
         [profiles.b]\ncpus_per_task = 2\n",
    );
    let c = load(&user, &project).expect("the file loads");
    assert_eq!(c.scheduler.as_deref(), Some("slurm"));
    assert_eq!(c.names(), ["a", "b"]);
    let b = c.profile(Some("b"), &[]).unwrap();
    assert_eq!(b.cpus_per_task, Some(2));
    assert!(c.profile(None, &[]).is_ok());
    let e = c.profile(Some("a"), &[]).unwrap_err();
    assert!(
        matches!(e, ConfigError::UntrustedProjectKey(ref k) if k.profile == "a" && k.key == "sbatch"),
        "{e}"
    );
    assert!(e.to_string().contains("noyau trust"), "{e}");
    // No override makes it usable: nothing of the profile was kept.
    assert!(c.profile(Some("a"), &["sbatch=[]".into()]).is_err());
}

/// `noyau trust DIR` is seen by a process that already looked (a running
/// kernel told to run it): the site's `trusted_projects` is not cached.
#[test]
fn a_trust_added_after_a_first_look_is_seen() {
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    let dir = project.parent().unwrap();
    let site = SiteFiles::user_only(&user);
    assert!(!crate::site_trusted(&site)
        .unwrap()
        .code(&anchored_dir(dir))
        .is_trusted());
    setup(d.path(), &[dir.display().to_string()]);
    assert!(crate::site_trusted(&site)
        .unwrap()
        .code(&anchored_dir(dir))
        .is_trusted());
}

/// For the tests of a cell's words: a project whose noyau.toml has
/// [`PROFILE`], loaded with no `trusted_projects` (the directory, the
/// project file, the config).
fn cell_project() -> (tempfile::TempDir, PathBuf, Config) {
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    write(&project, PROFILE);
    let c = load(&user, &project).unwrap();
    (d, project, c)
}

/// A cell's `%%noyau on T key=value` words are the notebook's: one that
/// names code (prologue, env.NAME, scheduler options) is refused, naming
/// the key and both ways out, unless the notebook's directory is trusted;
/// resources stay the cell's to choose, and the user's own `-o` keeps all.
#[test]
fn a_cells_overrides_may_choose_resources_but_not_code() {
    use crate::OverridesFrom;
    let (d, project, c) = cell_project();
    let nb = project.parent().unwrap();
    for (word, key) in [
        ("prologue=touch /tmp/x", "prologue"),
        ("env.LD_PRELOAD=/tmp/x.so", "env.LD_PRELOAD"),
        ("sbatch=--output=/home/u/.bashrc", "sbatch"),
        ("oarsub=-O /home/u/.bashrc", "oarsub"),
        ("qsub=-o /home/u/.bashrc", "qsub"),
    ] {
        let words = [word.to_string()];
        let e = c
            .profile_from(Some("p"), &words, OverridesFrom::Cell(&anchored_dir(nb)))
            .unwrap_err();
        assert!(matches!(e, ConfigError::CellKey { .. }), "{e}");
        let e = e.to_string();
        let dir = std::fs::canonicalize(nb).unwrap();
        assert!(
            e.contains(&format!("a notebook cell may not set `{key}`"))
                && e.contains("your own config file")
                && e.contains(&format!("noyau trust {}", dir.display())),
            "{e}"
        );
        assert!(c.profile(Some("p"), &words).is_ok(), "-o {word}");
        let (trusting, _) = setup(d.path(), &[dir.display().to_string()]);
        let t = load(&trusting, &project).unwrap();
        assert!(
            t.profile_from(Some("p"), &words, OverridesFrom::Cell(&anchored_dir(nb)))
                .is_ok(),
            "{word}"
        );
        setup(d.path(), &[]);
    }
    let resources = ["mem=4G".to_string(), "cpus_per_task=3".into()];
    let p = c
        .profile_from(
            Some("p"),
            &resources,
            OverridesFrom::Cell(&anchored_dir(nb)),
        )
        .unwrap();
    assert_eq!(p.cpus_per_task, Some(3));
}

/// A cell's `environment=` is the notebook's (held to a cell's rules, as
/// its `--env` is); the user's `-o environment=` is the user's.
#[test]
fn a_cells_environment_is_the_notebooks() {
    use crate::OverridesFrom;
    let (_d, project, c) = cell_project();
    let nb = project.parent().unwrap();
    let words = [r#"environment={"isolation": "none"}"#.to_string()];
    let p = c
        .profile_from(Some("p"), &words, OverridesFrom::Cell(&anchored_dir(nb)))
        .unwrap();
    assert!(p.environment_from_cell, "{p:?}");
    assert_eq!(p.environment_from.as_deref(), Some(nb));
    let p = c.profile(Some("p"), &words).unwrap();
    assert!(
        !p.environment_from_cell && p.environment_from.is_none(),
        "{p:?}"
    );
}

/// A `[profiles.p]` that names code (a prologue), for the code-trust tests.
const CODE: &str = "[profiles.p]\ncpus_per_task = 2\nprologue = \"touch /tmp/x\"\n";

/// Whether profile `p` of `project` is usable with `site`'s files, and
/// the refusal's text if not.
fn code_refusal(site: &SiteFiles, project: &Path) -> Option<String> {
    let c = Config::load_with(site, project).unwrap();
    c.profile(Some("p"), &[]).err().map(|e| e.to_string())
}

/// The site's `trusted_projects` lets a project's file be read whoever
/// wrote it, but not name code: a site entry such as `/scratch/*` would
/// run, for every user, what anyone who can make a directory there
/// writes. The user's own entry trusts both.
#[test]
fn a_site_entry_lets_the_file_be_read_but_not_name_code() {
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    let dir = std::fs::canonicalize(project.parent().unwrap()).unwrap();
    let system = d.path().join("system.toml");
    let site = SiteFiles {
        system: Some(system.clone()),
        user: Some(user.clone()),
    };
    write(&project, CODE);
    chmod(&project, 0o666);
    for entry in [
        dir.display().to_string(),
        format!("{}/*", d.path().display()),
    ] {
        write(&system, &format!("trusted_projects = [\"{entry}\"]\n"));
        let c = Config::load_with(&site, &project).expect("read: the site trusts it");
        assert_eq!(c.names(), ["p"]);
        assert!(
            !c.trusted_projects.code(&anchored_dir(&dir)).is_trusted(),
            "{entry}"
        );
        let e = code_refusal(&site, &project).expect("the prologue is refused");
        assert!(
            e.contains("[profiles.p] prologue")
                && e.contains(&format!("noyau trust {}", dir.display()))
                && e.contains(&format!(
                    "The site's trusted_projects entry \"{entry}\" lets noyau read its \
                     noyau.toml, not run what it names"
                )),
            "{e}"
        );
        // A cell's code-naming word too.
        let e = c
            .profile_from(
                Some("p"),
                &["env.LD_PRELOAD=/x.so".into()],
                crate::OverridesFrom::Cell(&anchored_dir(&dir)),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("The site's trusted_projects entry"), "{e}");
    }
    // The user's own exact entry: the code is theirs to trust.
    setup(d.path(), &[dir.display().to_string()]);
    assert_eq!(code_refusal(&site, &project), None);
}

/// A user's wildcard trusts the code of a directory under it only if no
/// one else could have written it or put it there; an exact entry (what
/// `noyau trust DIR` writes) trusts it whatever its mode.
#[test]
fn a_users_wildcard_trusts_code_only_where_no_one_else_could_write() {
    let d = tempfile::tempdir().unwrap();
    let (site, dir) = wildcard_project(d.path());
    let under = dir.parent().unwrap().to_path_buf();
    let project = dir.join("noyau.toml");
    write(&project, CODE);
    assert_eq!(code_refusal(&site, &project), None, "mine, closed");
    let shown = format!("Your trusted_projects entry \"{}/*\"", under.display());
    // The project's directory open to the group: refused, saying why.
    chmod(&dir, 0o775);
    let open =
        |d: &Path, mode: &str| format!("{} {mode}writable by its group or others", d.display());
    refused_saying(
        &site,
        &project,
        &[
            shown.clone(),
            format!("{} (mode 0775)", open(&dir, "is ")),
            "a wildcard trusts only directories".into(),
            format!("`chmod g-w {}`", dir.display()),
            format!("`noyau trust {}`", dir.display()),
        ],
    );
    // A directory above it open to others (the project could be swapped
    // for theirs after the check), unless sticky.
    chmod(&dir, 0o755);
    chmod(&under, 0o777);
    refused_saying(
        &site,
        &project,
        &[
            shown.clone(),
            format!("{} (mode 0777)", open(&under, "on the way to it is ")),
        ],
    );
    chmod(&under, 0o1777);
    assert_eq!(code_refusal(&site, &project), None, "sticky parent");
    // Reached through a link in a directory others can write (not sticky).
    chmod(&under, 0o755);
    let open = d.path().join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let link = open.join("l");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    let c = Config::load_with(&site, &link.join("noyau.toml")).unwrap();
    let trust = c.trusted_projects.code(&anchored_dir(&link));
    let why = format!("{} on the way to it is writable", open.display());
    assert!(
        !trust.is_trusted() && trust.note().contains(&why),
        "{trust:?}"
    );
    assert!(c.trusted_projects.code(&anchored_dir(&dir)).is_trusted());
    // The exact entry: trusted whatever the directory's mode.
    chmod(&dir, 0o777);
    chmod(&under, 0o777);
    setup(d.path(), &[dir.display().to_string()]);
    assert_eq!(code_refusal(&site, &project), None, "exact entry");
}

/// Asserts that profile `p` of `project` is refused with `site`'s files,
/// the refusal saying each of `parts`.
fn refused_saying(site: &SiteFiles, project: &Path, parts: &[String]) {
    let e = code_refusal(site, project).expect("refused");
    assert!(parts.iter().all(|p| e.contains(p.as_str())), "{e}");
}

/// `d/src/proj`, 0755 as `d/src`, under the user's wildcard `d/src/*`
/// (their config file in `d`): the site files and the project directory.
fn wildcard_project(d: &Path) -> (SiteFiles, PathBuf) {
    let under = d.join("src");
    std::fs::create_dir(&under).unwrap();
    chmod(&under, 0o755);
    let (user, _) = setup(d, &[format!("{}/*", under.display())]);
    let dir = under.join("proj");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o755);
    (SiteFiles::user_only(&user), dir)
}

/// Under a wildcard, the files whose code is trusted are held to the
/// directory's rule: a noyau.toml (or a lock file) the group or others can
/// write, or a link (to a file others can write), is not trusted for code,
/// and the refusal says why; an exact entry trusts them.
#[test]
fn a_users_wildcard_trusts_only_files_no_one_else_could_write() {
    let d = tempfile::tempdir().unwrap();
    let (site, dir) = wildcard_project(d.path());
    let project = dir.join("noyau.toml");
    write(&project, CODE);
    chmod(&project, 0o644);
    let lock = dir.join("r.lock");
    write(&lock, "six==1.16.0\n");
    chmod(&lock, 0o644);
    let trusted = || Config::load_from(&site).unwrap().trusted_projects;
    assert_eq!(code_refusal(&site, &project), None, "mine, closed");
    // The trust is decided on what was read, and that text is the one
    // used (not a second read, which a swap in between could change).
    let lock_read = || trusted().read_named(&anchored_dir(&dir), Path::new("r.lock"), 1 << 20);
    let (text, trust) = lock_read().unwrap().unwrap();
    assert!(trust.is_trusted());
    assert_eq!(text, "six==1.16.0\n");
    // A group-writable noyau.toml: its profiles' code, and the project's.
    chmod(&project, 0o664);
    let e = code_refusal(&site, &project).expect("group-writable noyau.toml: refused");
    assert!(
        e.contains(&format!(
            "{} is writable by its group or others (mode 0664)",
            project.display()
        )) && e.contains(&format!("`chmod g-w {}`", project.display())),
        "{e}"
    );
    assert!(!trusted().code(&anchored_dir(&dir)).is_trusted());
    // A noyau.toml that is a link to a file the team can write.
    let team = d.path().join("team.toml");
    write(&team, CODE);
    chmod(&team, 0o666);
    std::fs::remove_file(&project).unwrap();
    std::os::unix::fs::symlink(&team, &project).unwrap();
    let trust = trusted().code(&anchored_dir(&dir));
    assert!(
        !trust.is_trusted()
            && trust
                .note()
                .contains(&format!("{} is a symlink", project.display())),
        "{trust:?}"
    );
    // A lock file (the project's noyau.toml fine): its code is not trusted.
    std::fs::remove_file(&project).unwrap();
    write(&project, CODE);
    chmod(&project, 0o644);
    chmod(&lock, 0o666);
    // (Read, as the wildcard reads any file of the project's, untrusted.)
    let (_, trust) = lock_read().unwrap().unwrap();
    assert!(
        !trust.is_trusted()
            && trust.note().contains(&format!(
                "{} is writable by its group or others (mode 0666)",
                lock.display()
            )),
        "{trust:?}"
    );
    assert!(
        trusted().code(&anchored_dir(&dir)).is_trusted(),
        "the rest of the project"
    );
    // The exact entry trusts them as they are.
    chmod(&project, 0o666);
    setup(d.path(), &[dir.display().to_string()]);
    assert_eq!(code_refusal(&site, &project), None, "exact entry");
    assert!(lock_read().unwrap().unwrap().1.is_trusted());
}

/// A directory another user made under the user's wildcard (theirs, so
/// its noyau.toml is read: the wildcard still reads) does not get its
/// code trusted; an exact entry trusts it.
#[test]
fn a_users_wildcard_does_not_trust_another_users_directory() {
    if !root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[format!("{}/*", d.path().display())]);
    let dir = project.parent().unwrap();
    write(&project, CODE);
    std::os::unix::fs::chown(&project, Some(NOBODY), None).unwrap();
    std::os::unix::fs::chown(dir, Some(NOBODY), None).unwrap();
    let site = SiteFiles::user_only(&user);
    let e = code_refusal(&site, &project).expect("theirs: refused");
    assert!(
        e.contains(&format!(
            "{} belongs to uid {NOBODY}, not to you",
            std::fs::canonicalize(dir).unwrap().display()
        )) && e.contains("does not trust its code"),
        "{e}"
    );
    setup(d.path(), &[dir.display().to_string()]);
    assert_eq!(code_refusal(&site, &project), None, "exact entry");
    // The user's own directory, reached through another user's link
    // (which they could point elsewhere after the check).
    std::os::unix::fs::chown(dir, Some(noyau_trust::me()), None).unwrap();
    std::os::unix::fs::chown(&project, Some(noyau_trust::me()), None).unwrap();
    setup(d.path(), &[format!("{}/*", d.path().display())]);
    let link = d.path().join("link");
    std::os::unix::fs::symlink(dir, &link).unwrap();
    let c = Config::load_with(&site, &link.join("noyau.toml")).unwrap();
    assert!(
        c.trusted_projects.code(&anchored_dir(&link)).is_trusted(),
        "my own link"
    );
    std::os::unix::fs::lchown(&link, Some(NOBODY), None).unwrap();
    let trust = c.trusted_projects.code(&anchored_dir(&link));
    let why = format!(
        "{} on the way to it belongs to uid {NOBODY}, who could point it elsewhere",
        link.display()
    );
    assert!(
        !trust.is_trusted() && trust.note().contains(&why),
        "{trust:?}"
    );
}

/// Thread counts (`OMP_NUM_THREADS = "8"`…, a whole number) are a
/// project's or a cell's to set without trust; any other variable, or a
/// value that is not a number, still needs it.
#[test]
fn thread_counts_need_no_trust_and_nothing_else_in_env_does() {
    use crate::OverridesFrom;
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    let nb = project.parent().unwrap();
    write(
        &project,
        "[profiles.p]\nenv = { OMP_NUM_THREADS = \"8\", MKL_NUM_THREADS = \"2\", \
         OPENBLAS_NUM_THREADS = \"1\", NUMEXPR_NUM_THREADS = \"16\" }\n",
    );
    let p = load(&user, &project)
        .unwrap()
        .profile(Some("p"), &[])
        .unwrap();
    assert_eq!(p.env["OMP_NUM_THREADS"], "8");
    assert_eq!(p.env.len(), 4);
    for env in [
        "{ OMP_NUM_THREADS = \"8\", LD_PRELOAD = \"/tmp/x.so\" }",
        "{ OMP_NUM_THREADS = \"8 \" }",
        "{ OMP_NUM_THREADS = \"$(id)\" }",
        "{ OMP_NUM_THREADS = \"\" }",
        "{ OMP_NUM_THREADS = \"12345\" }",
        "{ OMP_NUM_THREADS = \"-1\" }",
        "{ GOMP_CPU_AFFINITY = \"0\" }",
    ] {
        write(&project, &format!("[profiles.p]\nenv = {env}\n"));
        let e = load(&user, &project)
            .unwrap()
            .profile(Some("p"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[profiles.p] env") && e.contains("only thread counts (OMP_NUM_THREADS"),
            "{env}: {e}"
        );
    }
    write(&project, PROFILE);
    let c = load(&user, &project).unwrap();
    let cell = |word: &str| {
        c.profile_from(
            Some("p"),
            &[word.into()],
            OverridesFrom::Cell(&anchored_dir(nb)),
        )
    };
    assert_eq!(
        cell("env.OMP_NUM_THREADS=4").unwrap().env["OMP_NUM_THREADS"],
        "4"
    );
    assert!(cell("env.MKL_NUM_THREADS = 2").is_ok());
    for word in [
        "env.OMP_NUM_THREADS=4x",
        "env.LD_PRELOAD=4",
        "env.OMP_NUM_THREADS=",
    ] {
        assert!(
            matches!(cell(word), Err(ConfigError::CellKey { .. })),
            "{word}"
        );
    }
}

/// Under a wildcard, a project's noyau.toml has its code trusted on what
/// was read, not on what is at its path afterwards: with the file swapped,
/// over and over, for one its group can write (another prologue), a
/// profile whose prologue came from that one is never usable. (Checked
/// against the check of before, by the path once read: the group's
/// prologue was accepted within the first few hundred loads.)
#[test]
fn a_projects_noyau_toml_is_trusted_on_what_was_read() {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    use std::sync::atomic::{AtomicBool, Ordering};
    let d = tempfile::tempdir().unwrap();
    let (site, dir) = wildcard_project(d.path());
    let (project, other) = (dir.join("noyau.toml"), dir.join("other.toml"));
    write(&project, CODE);
    write(&other, &CODE.replace("touch /tmp/x", "touch /tmp/group"));
    chmod(&other, 0o664);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let flags = RenameFlags::RENAME_EXCHANGE;
                renameat2(AT_FDCWD, &project, AT_FDCWD, &other, flags).unwrap();
            }
        });
        // (A failed assertion stops the swapping too: the scope waits for it.)
        let stopper = StopOnDrop(&stop);
        let (mut ours, mut refused) = (0, 0);
        for _ in 0..2000 {
            let c = match Config::load_with(&site, &project) {
                Ok(c) => c,
                // Swapped between the read and the name's second look.
                Err(e)
                    if e.to_string()
                        .contains("replaced or removed while it was read") =>
                {
                    refused += 1;
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            match c.profile(Some("p"), &[]) {
                Ok(p) => {
                    assert_eq!(p.prologue.as_deref(), Some("touch /tmp/x"));
                    ours += 1;
                }
                Err(ConfigError::UntrustedProjectKey(_)) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        drop(stopper);
        assert!(ours > 0 && refused > 0, "ours {ours}, refused {refused}");
    });
}

/// Sets its flag when dropped, as a panic unwinds too.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A notebook's directory, swapped after the notebook was read (its
/// anchor) for a link to a directory the user trusts by an exact entry,
/// is not trusted: the entry is matched on the directory the notebook
/// was read from, not on where its path leads now. (On the code of
/// before, which matched the path resolved at each use, it was trusted.)
#[test]
fn a_notebooks_directory_swapped_for_a_link_to_a_trusted_one_is_not_trusted() {
    let d = tempfile::tempdir().unwrap();
    let d = std::fs::canonicalize(d.path()).unwrap();
    let trusted = d.join("trusted");
    std::fs::create_dir(&trusted).unwrap();
    let (user, _) = setup(&d, &[trusted.display().to_string()]);
    let proj = d.join("proj");
    let c = Config::load_with(&SiteFiles::user_only(&user), &trusted.join("noyau.toml")).unwrap();
    let anchored = anchored_dir(&proj);
    assert!(!c.trusted_projects.code(&anchored).is_trusted());
    std::fs::rename(&proj, d.join("proj.x")).unwrap();
    std::os::unix::fs::symlink(&trusted, &proj).unwrap();
    let trust = c.trusted_projects.code(&anchored);
    assert!(
        !trust.is_trusted() && trust.note().contains("changed while noyau used it"),
        "{trust:?}"
    );
    assert!(!c.trusted_projects.reads(&anchored));
    // The trusted directory, anchored by its path or by the link, is;
    // the project anchored before the swap still is not (each value
    // keeps its own directory).
    assert!(c
        .trusted_projects
        .code(&anchored_dir(&trusted))
        .is_trusted());
    assert!(c.trusted_projects.code(&anchored_dir(&proj)).is_trusted());
    assert!(!c.trusted_projects.code(&anchored).is_trusted());
}

/// A user's wildcard does not trust a directory below it on another
/// filesystem: a mount there (a FUSE another user mounted) says what it
/// likes of its files. /dev/shm, a tmpfs, is mounted below /dev.
#[test]
fn a_users_wildcard_does_not_trust_a_mount_below_it() {
    let d = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let (user, _) = setup(d.path(), &["/dev/*".to_string()]);
    let c =
        Config::load_with(&SiteFiles::user_only(&user), &shm.path().join("noyau.toml")).unwrap();
    let trust = c.trusted_projects.code(&anchored_dir(shm.path()));
    assert!(
        !trust.is_trusted() && trust.note().contains("is on another filesystem than /dev"),
        "{trust:?}"
    );
}

/// A project's file and a read of it whose `between` saves it by rename
/// (as vim or `git pull` do) the first `saves` times it runs.
fn read_saved_by_rename(saves: usize) -> Result<Option<String>, ConfigError> {
    let d = tempfile::tempdir().unwrap();
    let (user, project) = setup(d.path(), &[]);
    let dir = project.parent().unwrap().to_path_buf();
    write(&dir.join("env.toml"), "a = 0\n");
    let c = Config::load_with(&SiteFiles::user_only(&user), &project).unwrap();
    let mut saved = 0;
    let mut save = || {
        if saved < saves {
            saved += 1;
            let new = dir.join(".env.toml.swp");
            write(&new, &format!("a = {saved}\n"));
            std::fs::rename(&new, dir.join("env.toml")).unwrap();
        }
    };
    let read = c.trusted_projects.read_in_with(
        &anchored_dir(&dir),
        Path::new("env.toml"),
        MAX_SIZE,
        true,
        None,
        &mut save,
    )?;
    Ok(read.map(|(text, _)| text))
}

/// A project's file saved by rename while it was read is read again: once
/// saved, the new text is read. (On the code of before, the one read was
/// refused, "replaced or removed while it was read".)
#[test]
fn a_project_file_saved_while_it_was_read_is_read_again() {
    assert_eq!(read_saved_by_rename(1).unwrap().as_deref(), Some("a = 1\n"));
    assert_eq!(read_saved_by_rename(2).unwrap().as_deref(), Some("a = 2\n"));
}

/// One saved at every read is refused after the third, saying so.
#[test]
fn a_project_file_replaced_at_every_read_is_refused() {
    let e = read_saved_by_rename(usize::MAX).unwrap_err().to_string();
    assert!(
        e.contains("replaced or removed while it was read, 3 times"),
        "{e}"
    );
}
