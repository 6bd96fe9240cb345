//! `noyau trust DIR`: adds a project's directory to `trusted_projects` in
//! the user's own config file, the rest of the file kept as written
//! (comments, order: `toml_edit`).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::files::{self, Origin};
use crate::{ConfigError, MAX_SIZE};

/// Trusts `dir` in the user's file: (the directory as written there, the
/// file, whether it was added rather than already there).
pub fn trust_project(dir: &Path) -> Result<(PathBuf, PathBuf, bool), ConfigError> {
    let file = crate::user_file().ok_or_else(|| ConfigError::File {
        path: "~/.config/noyau/config.toml".into(),
        message: "neither HOME nor XDG_CONFIG_HOME is an absolute path: where is your config file?"
            .into(),
    })?;
    let dir = std::fs::canonicalize(dir).map_err(|source| ConfigError::Read {
        path: dir.into(),
        source,
    })?;
    let added = add_trusted(&file, &dir)?;
    Ok((dir, file, added))
}

/// Appends `dir` to `trusted_projects` in `file` (made if missing); false
/// when it is there already.
pub(crate) fn add_trusted(file: &Path, dir: &Path) -> Result<bool, ConfigError> {
    let bad = |message: String| ConfigError::File {
        path: file.into(),
        message,
    };
    let entry = dir.to_str().ok_or_else(|| {
        bad(format!(
            "{} is not valid UTF-8, which a TOML file cannot hold",
            dir.display()
        ))
    })?;
    // A link (a dotfile manager's) would be replaced by a file: say what
    // to write instead.
    if file.is_symlink() {
        return Err(bad(format!(
            "is a link, which noyau does not replace; add `trusted_projects = [\"{entry}\"]` \
             to the file it leads to yourself"
        )));
    }
    // Read as noyau reads it: yours (or root's), and no one else can write it.
    let text = files::read(file, Origin::Site, MAX_SIZE)?.unwrap_or_default();
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| bad(format!("{e}")))?;
    let list = doc
        .entry("trusted_projects")
        .or_insert_with(|| toml_edit::value(toml_edit::Array::new()))
        .as_array_mut()
        .ok_or_else(|| bad("trusted_projects is not a list of directories".into()))?;
    if list.iter().any(|v| v.as_str() == Some(entry)) {
        return Ok(false);
    }
    list.push(entry);
    let mode = std::fs::metadata(file)
        .map(|m| m.permissions().mode() & 0o755)
        .unwrap_or(0o600);
    if let Some(parent) = file.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|source| ConfigError::Read {
                path: parent.into(),
                source,
            })?;
    }
    noyau_trust::replace(file, doc.to_string().as_bytes(), mode)
        .map_err(|e| bad(format!("cannot write it: {e}")))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_added_once_and_the_rest_of_the_file_kept() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("noyau/config.toml");
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        // No file yet: made, 0600.
        assert!(add_trusted(&file, &a).unwrap());
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mine = "# mine\n[profiles.gpu]\npartition = \"gpu\" # the big one\n";
        std::fs::write(&file, mine).unwrap();
        assert!(add_trusted(&file, &a).unwrap());
        assert!(!add_trusted(&file, &a).unwrap());
        assert!(add_trusted(&file, &b).unwrap());
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.contains("# mine") && text.contains("# the big one"),
            "{text}"
        );
        let c = crate::Config::load_from(&crate::SiteFiles::user_only(&file)).unwrap();
        // Projects are directories that exist (each anchored).
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let project = crate::trust_tests::anchored_dir;
        let code = |d: &Path| c.trusted_projects.code(&project(d)).is_trusted();
        let reads = |d: &Path| c.trusted_projects.reads(&project(d));
        assert!(code(&a) && code(&b) && reads(&a));
        assert!(!code(t.path()) && !reads(t.path()));
        assert_eq!(c.profiles.len(), 1);
        // Not a list: said, the file left alone.
        std::fs::write(&file, "trusted_projects = \"/x\"\n").unwrap();
        let e = add_trusted(&file, &a).unwrap_err().to_string();
        assert!(e.contains("not a list"), "{e}");
    }
}
