//! Real files, as the hostile user would leave them. Giving a file away
//! (to `nobody`) needs root, as scripts/test runs.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::anchor::ProjectDir;
use crate::{create_private, replace, Expect, Mode, Owner, Problem, TrustError};

const NOBODY: u32 = 65534;

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn problem(e: &TrustError) -> Problem {
    e.problem()
        .unwrap_or_else(|| panic!("not a refusal: {e}"))
        .clone()
}

use crate::testing::root;

#[test]
fn a_private_dir_is_made_0700_with_its_parents_and_found_again() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("a/b");
    Expect::dir().make_dir(&d).unwrap();
    assert_eq!(mode_of(&d), 0o700);
    assert_eq!(mode_of(&t.path().join("a")), 0o700);
    Expect::dir().make_dir(&d).unwrap();
    Expect::dir().mode(Mode::Exactly(0o700)).check(&d).unwrap();
}

#[test]
fn another_users_dir_is_refused_naming_its_owner() {
    if !root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("theirs");
    std::fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
    std::os::unix::fs::chown(&d, Some(NOBODY), None).unwrap();
    let e = Expect::dir().make_dir(&d).unwrap_err();
    assert!(
        matches!(problem(&e), Problem::NotOwned { owner: NOBODY, .. }),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains(&format!(
            "{} belongs to uid 65534, not to you (uid 0)",
            d.display()
        )),
        "{text}"
    );
    assert!(
        text.contains("used only if owned by you (uid 0): remove it"),
        "{text}"
    );
    // Not even a mode to set: root could, but it is not ours to change.
    let e = Expect::dir()
        .mode(Mode::Set(0o700))
        .make_dir(&d)
        .unwrap_err();
    assert!(matches!(problem(&e), Problem::NotOwned { .. }), "{e}");
    // Named owners: the one trusted, or another named in the message.
    Expect::dir()
        .owner(Owner::Uid(NOBODY, "the site's account"))
        .check(&d)
        .unwrap();
    let e = Expect::dir()
        .owner(Owner::MeOr(1, "the cache's owner"))
        .check(&d)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("not to you (uid 0) or the cache's owner (uid 1)"),
        "{e}"
    );
    Expect::dir().owner(Owner::Any).check(&d).unwrap();
}

#[test]
fn a_group_writable_dir_is_refused_or_its_mode_set_when_ours() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("open");
    std::fs::create_dir(&d).unwrap();
    chmod(&d, 0o775);
    let e = Expect::dir().make_dir(&d).unwrap_err();
    assert_eq!(
        problem(&e),
        Problem::TooOpen {
            mode: 0o775,
            want: 0o700
        }
    );
    assert!(
        e.to_string().contains(&format!(
            "has mode 0775; it must be 0700 (only its owner may use it): `chmod 700 {}`",
            d.display()
        )),
        "{e}"
    );
    let e = Expect::dir()
        .mode(Mode::NoOthersWrite)
        .check(&d)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("is writable by its group or others (mode 0775)"),
        "{e}"
    );
    assert!(e.to_string().contains("chmod go-w"), "{e}");
    chmod(&d, 0o755);
    Expect::dir().mode(Mode::NoOthersWrite).check(&d).unwrap();
    let e = Expect::dir()
        .mode(Mode::Exactly(0o700))
        .check(&d)
        .unwrap_err();
    assert_eq!(
        problem(&e),
        Problem::TooOpen {
            mode: 0o755,
            want: 0o700
        }
    );
    Expect::dir().mode(Mode::Set(0o700)).make_dir(&d).unwrap();
    assert_eq!(mode_of(&d), 0o700);
}

#[test]
fn a_symlink_in_place_of_a_dir_or_file_is_refused_unless_followed() {
    let t = tempfile::tempdir().unwrap();
    let real = t.path().join("real");
    Expect::dir().make_dir(&real).unwrap();
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let e = Expect::dir().make_dir(&link).unwrap_err();
    assert_eq!(problem(&e), Problem::Symlink);
    assert!(
        e.to_string().contains(&format!(
            "{} is a symlink: another user may have put it there: remove it",
            link.display()
        )),
        "{e}"
    );
    Expect::dir().follow_links().make_dir(&link).unwrap();

    let file = t.path().join("file");
    std::fs::write(&file, "mine").unwrap();
    chmod(&file, 0o600);
    let flink = t.path().join("flink");
    std::os::unix::fs::symlink(&file, &flink).unwrap();
    assert_eq!(
        problem(&Expect::file().open(&flink).unwrap_err()),
        Problem::Symlink
    );
    assert_eq!(
        problem(&Expect::file().check(&flink).unwrap_err()),
        Problem::Symlink
    );
    Expect::file().follow_links().open(&flink).unwrap();
    // Written through: never; the file it leads to is left as it was.
    assert_eq!(
        problem(&create_private(&flink, 0o600).unwrap_err()),
        Problem::Symlink
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
}

#[test]
fn a_fifo_in_place_of_a_file_is_refused_at_once() {
    let t = tempfile::tempdir().unwrap();
    let fifo = t.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // No writer: a blocking open would wait forever.
    let e = Expect::file().mode(Mode::Any).open(&fifo).unwrap_err();
    assert_eq!(
        problem(&e),
        Problem::WrongKind {
            found: "a FIFO",
            want: crate::Kind::File
        }
    );
    assert!(
        e.to_string().contains("is a FIFO, not a regular file"),
        "{e}"
    );
    let e = create_private(&fifo, 0o600).unwrap_err();
    assert!(
        matches!(
            problem(&e),
            Problem::WrongKind {
                found: "a FIFO",
                ..
            }
        ),
        "{e}"
    );
    let e = Expect::dir().make_dir(&fifo).unwrap_err();
    assert!(e.to_string().contains("is a FIFO, not a directory"), "{e}");
}

#[test]
fn another_users_file_is_refused_even_to_root() {
    if !root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("theirs");
    std::fs::write(&f, "theirs").unwrap();
    chmod(&f, 0o600);
    std::os::unix::fs::chown(&f, Some(NOBODY), None).unwrap();
    let e = Expect::file().open(&f).unwrap_err();
    assert!(
        matches!(problem(&e), Problem::NotOwned { owner: NOBODY, .. }),
        "{e}"
    );
    // Checked before it is emptied.
    assert!(create_private(&f, 0o600).is_err());
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "theirs");
    Expect::file()
        .owner(Owner::Uid(NOBODY, "the log's user"))
        .mode(Mode::Any)
        .open(&f)
        .unwrap();
}

#[test]
fn files_open_to_others_are_refused_by_the_rule_asked() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("f");
    std::fs::write(&f, "x").unwrap();
    chmod(&f, 0o644);
    let e = Expect::file().open(&f).unwrap_err();
    assert_eq!(
        problem(&e),
        Problem::TooOpen {
            mode: 0o644,
            want: 0o600
        }
    );
    assert!(e.to_string().contains("`chmod 600 "), "{e}");
    Expect::file().mode(Mode::NoOthersWrite).open(&f).unwrap();
    chmod(&f, 0o620);
    let e = Expect::file()
        .mode(Mode::NoOthersWrite)
        .open(&f)
        .unwrap_err();
    assert_eq!(problem(&e), Problem::OthersWrite { mode: 0o620 });
    assert!(Expect::file()
        .check(&t.path().join("missing"))
        .unwrap_err()
        .is_not_found());
}

#[test]
fn create_private_makes_or_empties_a_file_of_ours_with_its_mode() {
    use std::io::Write;
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("secret");
    create_private(&f, 0o600)
        .unwrap()
        .write_all(b"first, longer")
        .unwrap();
    assert_eq!(mode_of(&f), 0o600);
    chmod(&f, 0o644);
    create_private(&f, 0o600)
        .unwrap()
        .write_all(b"second")
        .unwrap();
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "second");
    assert_eq!(mode_of(&f), 0o600);
    create_private(&f, 0o700).unwrap();
    assert_eq!(mode_of(&f), 0o700);
    let e = create_private(t.path(), 0o600).unwrap_err();
    assert!(
        e.to_string().contains("is a directory, not a regular file"),
        "{e}"
    );
}

#[test]
fn create_private_refuses_a_hard_link_to_a_file_of_ours() {
    let t = tempfile::tempdir().unwrap();
    let mine = t.path().join("mine");
    std::fs::write(&mine, "precious").unwrap();
    let link = t.path().join("link");
    std::fs::hard_link(&mine, &link).unwrap();
    let e = create_private(&link, 0o600).unwrap_err();
    assert_eq!(problem(&e), Problem::HardLinked { links: 2 });
    assert!(e.to_string().contains("rm "), "{e}");
    assert_eq!(std::fs::read_to_string(&mine).unwrap(), "precious");
}

#[test]
fn a_trailing_slash_does_not_hide_a_symlink() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("dir");
    std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
    std::fs::write(dir.join("f"), "x").unwrap();
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    let slashed = Path::new(&format!("{}/", link.display())).to_path_buf();
    for e in [
        Expect::dir().check(&slashed).unwrap_err(),
        Expect::dir().open(&slashed).unwrap_err(),
        Expect::dir().make_dir(&slashed).unwrap_err(),
    ] {
        assert_eq!(problem(&e), Problem::Symlink, "{e}");
    }
}

#[test]
fn misuses_are_refused_not_ignored() {
    let t = tempfile::tempdir().unwrap();
    let e = Expect::dir()
        .mode(Mode::Set(0o700))
        .check(t.path())
        .unwrap_err();
    assert!(e.to_string().contains("noyau bug"), "{e}");
    let e = Expect::file().make_dir(&t.path().join("d")).unwrap_err();
    assert!(e.to_string().contains("noyau bug"), "{e}");
    assert!(!t.path().join("d").exists());
    // Following a link that leads nowhere would create its target.
    let link = t.path().join("link");
    std::os::unix::fs::symlink(t.path().join("target"), &link).unwrap();
    let mut create = std::fs::OpenOptions::new();
    create.write(true).create(true);
    let e = Expect::file()
        .follow_links()
        .open_with(&link, &mut create)
        .unwrap_err();
    assert_eq!(problem(&e), Problem::Symlink);
    assert!(!t.path().join("target").exists());
    // Only read, it is a file not found (a config file's link into an
    // unmounted filesystem: there is none to read), not a planted link.
    let e = Expect::file().follow_links().open(&link).unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

/// As an `io::Error`: the kind of the I/O error kept, a refusal is
/// PermissionDenied, the text says the path.
#[test]
fn a_trust_error_as_an_io_error() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("missing");
    let e: std::io::Error = Expect::file().open(&missing).unwrap_err().into();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert!(e.to_string().contains("missing"), "{e}");
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&missing, &link).unwrap();
    let e: std::io::Error = Expect::file().open(&link).unwrap_err().into();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(e.to_string().contains("is a symlink"), "{e}");
}

/// What another user left at a path noyau replaces (a link to a file of
/// the user's, a FIFO, their own file) is replaced, never written through
/// nor waited on; the new file has the mode asked, whatever the umask.
#[test]
fn replace_writes_a_new_file_never_through_what_was_there() {
    let t = tempfile::tempdir().unwrap();
    let canary = t.path().join("canary");
    std::fs::write(&canary, "the user's").unwrap();
    let link = t.path().join("noyau.lock");
    std::os::unix::fs::symlink(&canary, &link).unwrap();
    replace(&link, b"new", 0o644).unwrap();
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), "the user's");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
    assert_eq!(std::fs::read_to_string(&link).unwrap(), "new");
    assert_eq!(mode_of(&link), 0o644);
    let fifo = t.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    replace(&fifo, b"x", 0o600).unwrap();
    assert_eq!(std::fs::read_to_string(&fifo).unwrap(), "x");
    assert_eq!(mode_of(&fifo), 0o600);
    // Nothing left beside them.
    let mut names: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["canary", "fifo", "noyau.lock"]);
}

/// A file replaced in an anchored project lands in the directory the
/// project was anchored to, even after its path was swapped for a link to
/// another directory (a trusted project of the user's), which is left as
/// it was; a name that is not one component is refused.
#[test]
fn replace_at_writes_into_the_anchored_directory_not_a_swapped_in_one() {
    let d = tempfile::tempdir().unwrap();
    let proj = d.path().join("proj");
    let trusted = d.path().join("trusted");
    std::fs::create_dir(&proj).unwrap();
    std::fs::create_dir(&trusted).unwrap();
    let anchored = ProjectDir::open(&proj).unwrap();
    std::fs::rename(&proj, d.path().join("proj.x")).unwrap();
    std::os::unix::fs::symlink(&trusted, &proj).unwrap();
    crate::replace_at(&anchored, "noyau.lock", b"pins", 0o644).unwrap();
    let landed = d.path().join("proj.x/noyau.lock");
    assert_eq!(std::fs::read_to_string(&landed).unwrap(), "pins");
    assert_eq!(mode_of(&landed), 0o644);
    assert_eq!(std::fs::read_dir(&trusted).unwrap().count(), 0);
    for bad in ["../noyau.lock", "a/b", "/etc/x", "..", ""] {
        let e = crate::replace_at(&anchored, bad, b"x", 0o644).unwrap_err();
        assert!(e.to_string().contains("one component"), "{bad}: {e}");
    }
    let names: Vec<_> = std::fs::read_dir(d.path().join("proj.x"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["noyau.lock"]);
}

/// A file opened beneath a held directory is the one in that directory,
/// even after the directory's path was swapped for a link elsewhere (what
/// a path checked and then opened would follow); no `..`, absolute path
/// or link leads out of it, and a FIFO is refused without waiting.
#[test]
fn beneath_a_held_directory_nothing_leads_out_of_it() {
    use crate::Beneath;
    use std::io::Read;
    let t = tempfile::tempdir().unwrap();
    let (dir, elsewhere) = (t.path().join("proj"), t.path().join("elsewhere"));
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(dir.join("sub/f"), "mine").unwrap();
    std::fs::write(elsewhere.join("f"), "secret").unwrap();
    std::fs::create_dir(elsewhere.join("sub")).unwrap();
    std::fs::write(elsewhere.join("sub/f"), "secret").unwrap();
    let held = Beneath::open(&dir).unwrap();
    let any = Expect::file()
        .owner(Owner::Any)
        .mode(Mode::Any)
        .follow_links();
    let read = |rel: &str| -> Result<String, TrustError> {
        let mut text = String::new();
        held.open_file(&any, Path::new(rel))?
            .read_to_string(&mut text)
            .unwrap();
        Ok(text)
    };
    // Swapped: the path now leads elsewhere; the held directory does not.
    std::fs::rename(&dir, t.path().join("moved")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
    assert_eq!(read("sub/f").unwrap(), "mine");
    let moved = t.path().join("moved");
    std::os::unix::fs::symlink(elsewhere.join("f"), moved.join("abs")).unwrap();
    std::os::unix::fs::symlink("../elsewhere/f", moved.join("rel")).unwrap();
    std::os::unix::fs::symlink("sub/f", moved.join("inside")).unwrap();
    for out in ["../elsewhere/f", "abs", "rel", "/proc/self/root/etc/passwd"] {
        let e = read(out).unwrap_err();
        assert_eq!(problem(&e), Problem::Outside, "{out}: {e}");
    }
    assert_eq!(read("inside").unwrap(), "mine", "a link inside is followed");
    // An absolute link, even to a file inside, is refused: what it leads
    // to is not judged afterwards on a path (which can be stale, or `/`
    // on a detached mount).
    std::os::unix::fs::symlink(moved.join("sub/f"), moved.join("absin")).unwrap();
    let e = read("absin").unwrap_err();
    assert_eq!(problem(&e), Problem::Outside, "absolute link inside: {e}");
    let e = held
        .open_file(
            &Expect::file().owner(Owner::Any).mode(Mode::Any),
            Path::new("inside"),
        )
        .unwrap_err();
    assert_eq!(problem(&e), Problem::Symlink, "not followed unless asked");
    nix::unistd::mkfifo(&moved.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let e = read("fifo").unwrap_err();
    assert!(matches!(problem(&e), Problem::WrongKind { .. }), "{e}");
    assert!(read("none").unwrap_err().is_not_found());
}

/// `proj/sub/f` ("mine") in a temporary directory, and `proj/out`, a
/// link to `f` ("secret") beside `proj`.
fn project_with_a_link_out() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("proj");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/f"), "mine").unwrap();
    std::fs::write(t.path().join("f"), "secret").unwrap();
    std::os::unix::fs::symlink("../f", dir.join("out")).unwrap();
    (t, dir)
}

/// Without `openat2` (a kernel before Linux 5.6, or a seccomp filter
/// refusing it), what a path leads to is opened as a place only, and
/// read only if it is the file found at its own path beneath the held
/// directory through no link: a link inside is followed, one out refused.
#[test]
fn without_openat2_what_was_opened_must_be_beneath_the_directory() {
    use crate::Beneath;
    let (_t, dir) = project_with_a_link_out(); // (_t: removed when dropped)
    std::os::unix::fs::symlink("sub/f", dir.join("in")).unwrap();
    std::os::unix::fs::symlink(dir.join("sub/f"), dir.join("absin")).unwrap();
    let held = Beneath::open(&dir).unwrap();
    let any = Expect::file()
        .owner(Owner::Any)
        .mode(Mode::Any)
        .follow_links();
    let e = held.open_walked(&any, Path::new("out"), || {}).unwrap_err();
    assert_eq!(problem(&e), Problem::Outside, "{e}");
    for inside in ["in", "absin", "sub/f"] {
        let mut text = String::new();
        let mut f = held.open_walked(&any, Path::new(inside), || {}).unwrap();
        std::io::Read::read_to_string(&mut f, &mut text).unwrap();
        assert_eq!(text, "mine", "{inside}");
    }
    let e = held
        .open_walked(
            &Expect::file().owner(Owner::Any).mode(Mode::Any),
            Path::new("in"),
            || {},
        )
        .unwrap_err();
    assert_eq!(problem(&e), Problem::Symlink, "not followed unless asked");
    let e = held
        .open_walked(&any, Path::new("none"), || {})
        .unwrap_err();
    assert!(e.is_not_found(), "missing inside: {e}");
}

/// Without `openat2`, a file opened outside is refused even when the
/// paths seem to agree: here the project (held) is renamed away after its
/// path was read, and the victim's directory, into which a link led, is
/// renamed to the project's old name (a group-writable parent without
/// the sticky bit allows both), so the file's path now starts with the
/// project's path as it was read. On the path strings alone it was read.
#[test]
fn without_openat2_a_rename_does_not_make_a_file_outside_look_inside() {
    use crate::Beneath;
    let t = tempfile::tempdir().unwrap();
    let (demo, keys) = (t.path().join("demo"), t.path().join("keys"));
    std::fs::create_dir(&demo).unwrap();
    std::fs::create_dir(&keys).unwrap();
    std::fs::write(keys.join("id"), "secret").unwrap();
    std::os::unix::fs::symlink(keys.join("id"), demo.join("x")).unwrap();
    let held = Beneath::open(&demo).unwrap();
    let any = Expect::file()
        .owner(Owner::Any)
        .mode(Mode::Any)
        .follow_links();
    let swap = || {
        std::fs::rename(&demo, t.path().join("demo2")).unwrap();
        std::fs::rename(&keys, &demo).unwrap();
    };
    let e = held.open_walked(&any, Path::new("x"), swap).unwrap_err();
    assert_eq!(problem(&e), Problem::Outside, "{e}");
}

/// Without `openat2`, every failure past the held directory gets one
/// answer (not whether a file of the user's exists), and a FIFO or device
/// a link leads to is never opened for reading (a tty's open can toggle
/// its modem lines; a FIFO's tells its writer).
#[test]
fn without_openat2_nothing_outside_is_told_or_opened() {
    use crate::Beneath;
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("proj"), t.path().join("home"));
    std::fs::create_dir(&dir).unwrap();
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join("id_rsa"), "secret").unwrap();
    let fifo = home.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    // One through a file (ENOTDIR), one through nothing (ENOENT).
    std::os::unix::fs::symlink(home.join("id_rsa/z"), dir.join("exists")).unwrap();
    std::os::unix::fs::symlink(home.join("none/z"), dir.join("missing")).unwrap();
    std::os::unix::fs::symlink(&fifo, dir.join("fifo")).unwrap();
    let held = Beneath::open(&dir).unwrap();
    let any = Expect::file()
        .owner(Owner::Any)
        .mode(Mode::Any)
        .follow_links();
    let said = |rel: &str| {
        let e = held.open_walked(&any, Path::new(rel), || {}).unwrap_err();
        assert_eq!(problem(&e), Problem::Outside, "{rel}: {e}");
        e.to_string().replace(rel, "NAME")
    };
    assert_eq!(said("exists"), said("missing"));
    // With no reader, a writer's non-blocking open fails with ENXIO.
    let no_reader = || {
        use nix::fcntl::OFlag;
        let w = nix::fcntl::open(
            &fifo,
            OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        );
        assert_eq!(
            w.unwrap_err(),
            nix::errno::Errno::ENXIO,
            "opened for reading"
        );
    };
    let e = held
        .open_walked(&any, Path::new("fifo"), no_reader)
        .unwrap_err();
    assert_eq!(problem(&e), Problem::Outside, "{e}");
}

/// Where `openat2` is refused by a seccomp filter written before it
/// (EPERM: Docker before 20.10, systemd's `SystemCallFilter`) or missing
/// (ENOSYS: before Linux 5.6), a project's file is still read beneath
/// its directory, and a link out still refused: through the fallback.
#[test]
fn where_openat2_is_refused_or_missing_the_fallback_reads_beneath() {
    use crate::Beneath;
    use std::io::Read;
    let (_t, dir) = project_with_a_link_out(); // (_t: removed when dropped)
    for errno in [nix::errno::Errno::EPERM, nix::errno::Errno::ENOSYS] {
        let dir = dir.clone();
        // The filter is this thread's only (no TSYNC), and ends with it.
        std::thread::spawn(move || {
            deny_openat2(errno);
            let held = Beneath::open(&dir).unwrap();
            let how = nix::fcntl::OpenHow::new().flags(nix::fcntl::OFlag::O_RDONLY);
            let direct = nix::fcntl::openat2(held.fd(), "sub/f", how);
            assert_eq!(direct.unwrap_err(), errno, "the filter answers");
            let any = Expect::file()
                .owner(Owner::Any)
                .mode(Mode::Any)
                .follow_links();
            let mut text = String::new();
            held.open_file(&any, Path::new("sub/f"))
                .unwrap_or_else(|e| panic!("{errno}: {e}"))
                .read_to_string(&mut text)
                .unwrap();
            assert_eq!(text, "mine", "{errno}");
            let e = held.open_file(&any, Path::new("out")).unwrap_err();
            assert_eq!(problem(&e), Problem::Outside, "{errno}: {e}");
        })
        .join()
        .unwrap();
    }
}

/// Makes `openat2` fail with `errno` in the calling thread (a seccomp
/// filter, as a container runtime's that predates it).
fn deny_openat2(errno: nix::errno::Errno) {
    use nix::libc;
    let filter = [
        // The syscall number (seccomp_data.nr, at offset 0).
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_openat2 as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | errno as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with a valid program that outlives the call; it only
    // changes this thread's syscall filter (no TSYNC flag).
    let rc = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        )
    };
    assert_eq!(rc, 0, "seccomp: {}", std::io::Error::last_os_error());
}

/// Nothing beneath a held directory is reached across a mount, with
/// `openat2` (`RESOLVE_NO_XDEV`) or without: a FUSE mounted there could
/// say anything of its files. /dev/shm is a tmpfs mounted below /dev (a
/// devtmpfs), so a file there, named beneath /dev, crosses one.
#[test]
fn beneath_a_held_directory_no_mount_is_crossed() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let dev = |p: &Path| nix::sys::stat::stat(p).unwrap().st_dev;
    assert_ne!(
        dev(Path::new("/dev")),
        dev(shm.path()),
        "/dev/shm is no mount here"
    );
    std::fs::write(shm.path().join("f"), "x").unwrap();
    let rel = Path::new("shm")
        .join(shm.path().file_name().unwrap())
        .join("f");
    let held = crate::Beneath::open(Path::new("/dev")).unwrap();
    let any = Expect::file().owner(Owner::Any).mode(Mode::Any);
    for e in [
        held.open_file(&any, &rel).unwrap_err(),
        held.open_walked(&any, &rel, || {}).unwrap_err(),
    ] {
        assert_eq!(e.problem(), Some(&Problem::Outside), "{e}");
    }
    // On one filesystem the same file is read.
    let held = crate::Beneath::open(shm.path()).unwrap();
    held.open_file(&any, Path::new("f")).unwrap();
    held.open_walked(&any, Path::new("f"), || {}).unwrap();
}

/// The anchor holds the notebook's directory open, not just its device
/// and inode: removed, the directory is still there to `fstat` through
/// the anchor, the same inode (not freed, so its number not reused).
/// That it keeps an automounted directory from expiring (and coming
/// back on another device) cannot be tested here: it needs autofs.
#[test]
fn an_anchor_holds_the_notebooks_directory_open() {
    let d = tempfile::tempdir().unwrap();
    let proj = d.path().join("proj");
    std::fs::create_dir(&proj).unwrap();
    std::fs::write(proj.join("nb.ipynb"), "{}").unwrap();
    let id = crate::anchor::identity_of(&proj).unwrap();
    let (bytes, anchored) = crate::anchor::read_notebook(&proj.join("nb.ipynb")).unwrap();
    assert_eq!(bytes, b"{}");
    std::fs::remove_dir_all(&proj).unwrap();
    assert_eq!(crate::anchor::identity(anchored.fd()).unwrap(), id);
    assert_eq!(anchored.identity(), id);
    assert_eq!(anchored.path(), proj);
}

/// Two projects of the same path made at different times in one process
/// each keep their own directory: the first, made before its path was
/// swapped for another directory, is refused as moved (what is read for
/// it is never the new directory's), even after the second was made for
/// the new one, which reads its own file. (On the code of before, which
/// kept one anchor per path for the process, anchoring the second
/// replaced the first's, and the first then read the new directory's
/// file.)
#[test]
fn a_project_keeps_its_directory_when_another_is_made_for_its_path() {
    let d = tempfile::tempdir().unwrap();
    let proj = d.path().join("proj");
    std::fs::create_dir(&proj).unwrap();
    std::fs::write(proj.join("f"), "first").unwrap();
    chmod(&proj.join("f"), 0o600);
    let first = ProjectDir::open(&proj).unwrap();
    std::fs::rename(&proj, d.path().join("proj.x")).unwrap();
    std::fs::create_dir(&proj).unwrap();
    std::fs::write(proj.join("f"), "second").unwrap();
    chmod(&proj.join("f"), 0o600);
    let second = ProjectDir::open(&proj).unwrap();
    assert_ne!(first, second);
    let read = |p: &ProjectDir| -> Result<String, TrustError> {
        let mut f = crate::Beneath::project(p)?.open_file(&Expect::file(), Path::new("f"))?;
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).unwrap();
        Ok(s)
    };
    assert_eq!(read(&second).unwrap(), "second");
    let e = read(&first).expect_err("the first project read the second's file");
    assert!(matches!(e.problem(), Some(Problem::Moved)), "{e}");
    assert!(first.check_path(&proj).is_err());
    // Its path led back to it: read again, from the directory held.
    std::fs::rename(&proj, d.path().join("proj.y")).unwrap();
    std::fs::rename(d.path().join("proj.x"), &proj).unwrap();
    assert_eq!(read(&first).unwrap(), "first");
    assert!(matches!(
        read(&second).unwrap_err().problem(),
        Some(Problem::Moved)
    ));
}

/// Without /proc (a chroot, a bwrap sandbox without --proc) the reopen
/// of a checked file fails: that is said, and is not a missing file
/// (which a caller takes for "there is none": a project's noyau.toml
/// silently skipped). On the code of before it was ENOENT, NotFound.
#[test]
fn a_reopen_without_proc_is_not_a_missing_file() {
    use std::os::fd::OwnedFd;
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("noyau.toml");
    std::fs::write(&f, "").unwrap();
    chmod(&f, 0o600);
    let flags = nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC;
    let place: OwnedFd = nix::fcntl::open(&f, flags, nix::sys::stat::Mode::empty()).unwrap();
    let no_proc = d.path().join("proc/self/fd");
    let e = crate::beneath::reopen_through(no_proc.to_str().unwrap(), place, &Expect::file(), &f)
        .unwrap_err();
    assert!(!e.is_not_found(), "{e}");
    assert!(e.to_string().contains("/proc must be mounted"), "{e}");
    assert!(e.to_string().contains("noyau.toml"), "{e}");
}
