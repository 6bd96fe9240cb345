//! What the hosts share about `%%noyau on` targets: the `%noyau targets`
//! table and the line telling where a cell ran (the idle clock is the
//! proxy's, shared with its own kernel's job). Each
//! host keeps its targets its own way (the proxy relays a target's frames
//! to the frontend; `noyau run` drives the target's kernel).

/// One target, as `%noyau targets` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub name: String,
    /// `queued`, `starting`, `idle`, `busy`, `releasing`.
    pub state: &'static str,
    pub backend: String,
    pub job: String,
    pub node: Option<String>,
    pub idle_secs: u64,
}

/// `%noyau targets`.
pub fn table(rows: &[Row]) -> String {
    if rows.is_empty() {
        return "[noyau] no targets; `%%noyau on NAME` starts one from [profiles.NAME] in noyau.toml\n".into();
    }
    let mut out = format!(
        "{:<14} {:<9} {:<8} {:<14} {:<14} {}\n",
        "TARGET", "STATE", "BACKEND", "JOB", "NODE", "IDLE"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<14} {:<9} {:<8} {:<14} {:<14} {}s\n",
            r.name,
            r.state,
            r.backend,
            r.job,
            r.node.as_deref().unwrap_or("-"),
            r.idle_secs
        ));
    }
    out
}

/// The line telling where a cell ran.
pub fn where_line(name: &str, backend: &str, job: &str, node: Option<&str>) -> String {
    format!(
        "[noyau] on target {name} ({backend} job {job}{})\n",
        node.map(|n| format!(", node {n}")).unwrap_or_default()
    )
}

/// What `%noyau release` / `cancel` says.
pub fn releasing(name: &str, backend: &str, job: &str) -> String {
    format!("[noyau] releasing target {name} ({backend} job {job})\n")
}

/// The error for a target that is not there.
pub fn unknown(name: &str) -> crate::MagicError {
    crate::MagicError::Target(format!(
        "no target named {name:?} is running; `%noyau targets` lists them"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_where_line() {
        assert!(table(&[]).starts_with("[noyau] no targets"));
        let t = table(&[Row {
            name: "gpu".into(),
            state: "idle",
            backend: "slurm".into(),
            job: "12".into(),
            node: None,
            idle_secs: 3,
        }]);
        assert!(t
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("gpu            idle      slurm    12"));
        assert_eq!(
            where_line("a", "local", "local:1", Some("n")),
            "[noyau] on target a (local job local:1, node n)\n"
        );
    }
}
