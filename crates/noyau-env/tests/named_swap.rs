//! A file a notebook names is opened beneath its directory, held open, and
//! judged on what was opened: someone who can write a directory on the
//! way cannot swap it for a link out between the check and the read.
//! One test in its own binary: it sets `XDG_CONFIG_HOME` and
//! `NOYAU_SYSTEM_CONFIG` for the process.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
use noyau_env::sources::from_cell_env;
use noyau_env::EnvError;

/// `proj/sub` is swapped, over and over and atomically, with a link to a
/// directory outside whose `env.toml` holds a secret; a cell's
/// `--env sub/env.toml` read meanwhile gives the project's file or the
/// refusal of a file outside, never the secret. (Checked against the
/// directory check of before, which resolved the path and then opened it:
/// the secret was read within the first few hundred reads.)
#[test]
fn a_directory_swapped_for_a_link_out_while_a_file_is_read_is_never_followed() {
    let d = tempfile::tempdir().unwrap();
    let config = d.path().join("config");
    std::fs::create_dir(&config).unwrap();
    std::env::set_var("XDG_CONFIG_HOME", &config);
    std::env::set_var("NOYAU_SYSTEM_CONFIG", d.path().join("none.toml"));
    let (proj, out) = (d.path().join("proj"), d.path().join("out"));
    std::fs::create_dir_all(proj.join("sub")).unwrap();
    std::fs::create_dir(&out).unwrap();
    std::fs::write(proj.join("sub/env.toml"), "kind = \"python\"\n").unwrap();
    std::fs::write(
        out.join("env.toml"),
        "kind = \"python\"\nrequirements = [\"ghp-SECRET\"]\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(&out, proj.join("alt")).unwrap();
    let project = noyau_trust::anchor::ProjectDir::open(&proj).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                renameat2(
                    AT_FDCWD,
                    &proj.join("sub"),
                    AT_FDCWD,
                    &proj.join("alt"),
                    RenameFlags::RENAME_EXCHANGE,
                )
                .unwrap();
            }
        });
        // (A failed assertion stops the swapping too: the scope waits for it.)
        let stopper = StopOnDrop(&stop);
        let (mut read, mut refused) = (0, 0);
        for _ in 0..3000 {
            match from_cell_env("sub/env.toml", &project) {
                Ok(source) => {
                    read += 1;
                    assert!(
                        source.table.get("requirements").is_none(),
                        "the secret was read: {:?}",
                        source.table
                    );
                }
                Err(EnvError::OutsideProject { .. }) => refused += 1,
                // Swapped between the read and the name's second look.
                Err(e)
                    if e.to_string()
                        .contains("replaced or removed while it was read") =>
                {
                    refused += 1
                }
                Err(e) => panic!("{e}"),
            }
        }
        drop(stopper);
        // Both happened: the swap raced the reads.
        assert!(read > 0 && refused > 0, "read {read}, refused {refused}");
    });
}

/// Sets its flag when dropped, as a panic unwinds too.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
