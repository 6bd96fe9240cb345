//! `%%noyau on TARGET --tasks N`: Python that the target's kernel runs to
//! start the cell's body as N tasks of its allocation and print their
//! output grouped by task. Each task sees `NOYAU_TASK_ID` and
//! `NOYAU_NTASKS`; a failed task fails the cell. Tasks are local processes
//! unless a scheduler's lines (its `tasks_python`, tried in the order
//! schedulers are registered) find the kernel inside one of its jobs and
//! start them its way, by redefining `spawn(i, task_env)` (one task) or
//! `run_all()` (every task, filling `out` and `failed`).

use crate::{Commands, SCHEDULERS};

const HEAD: &str = r#"def __noyau_tasks(body, n):
    import json, os, shlex, shutil, subprocess, sys
    env = dict(os.environ, NOYAU_NTASKS=str(n))
    argv = [sys.executable, "-c", body]
    out = {i: [] for i in range(n)}
    failed = []
    def spawn(i, task_env):
        p = subprocess.Popen(argv, env=task_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return p, ""
    def run_all():
        procs = [spawn(i, dict(env, NOYAU_TASK_ID=str(i))) for i in range(n)]
        for i, (p, where) in enumerate(procs):
            out[i] = p.stdout.read().splitlines()
            if p.wait():
                failed.append(f"task {i}{where} exited {p.returncode}")
"#;

const TAIL: &str = r#"    run_all()
    for key, lines in out.items():
        print(f"--- task {key} ---")
        for line in lines:
            print(line)
    if failed:
        raise RuntimeError("; ".join(failed))
"#;

/// Python that runs `body` as `n` tasks (see the module's comment).
pub fn fan_out(body: &str, n: u32) -> String {
    let mut s = String::from(HEAD);
    for (_, _, make) in SCHEDULERS {
        for line in make(Commands::default()).tasks_python().lines() {
            if !line.trim().is_empty() {
                s.push_str("    ");
                s.push_str(line);
                s.push('\n');
            }
        }
    }
    s.push_str(TAIL);
    let body = serde_json::to_string(body).expect("a string serialises");
    s.push_str(&format!("__noyau_tasks({body}, {n})\ndel __noyau_tasks\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs with python3 when there is one: local tasks, outside any job.
    #[test]
    fn local_tasks_print_grouped_and_fail_the_cell() {
        let code = fan_out(
            "import os\nprint('task', os.environ['NOYAU_TASK_ID'], 'of', os.environ['NOYAU_NTASKS'])",
            3,
        );
        let run = |code: &str| {
            std::process::Command::new("python3")
                .args(["-c", code])
                .env_remove("SLURM_JOB_ID")
                .env_remove("OAR_NODEFILE")
                .output()
        };
        let Ok(out) = run(&code) else {
            assert!(std::env::var_os("CI").is_none(), "no python3 under CI");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            text,
            "--- task 0 ---\ntask 0 of 3\n--- task 1 ---\ntask 1 of 3\n--- task 2 ---\ntask 2 of 3\n"
        );
        let out = run(&fan_out(
            "import os, sys\nsys.exit(int(os.environ['NOYAU_TASK_ID']))",
            2,
        ))
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("RuntimeError: task 1 exited 1"),
            "{err}"
        );
    }
}
