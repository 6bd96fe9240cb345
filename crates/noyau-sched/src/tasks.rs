//! `%%noyau on TARGET --tasks N`: Python that the target's kernel runs to
//! start the cell's body as N tasks of its allocation and print their
//! output grouped by task. Each task sees `NOYAU_TASK_ID` and
//! `NOYAU_NTASKS`; a failed task fails the cell. Tasks are local processes
//! unless a scheduler's lines (its `tasks_python`, tried in the order
//! schedulers are registered) find the kernel inside one of its jobs and
//! start them its way, by redefining `spawn(i, task_env)` (one task) or
//! `run_all()` (every task, filling `out` and `failed`), with
//! `start(cmd, data, **popen_args)`, which starts a process and writes
//! `data` on its stdin.
//!
//! The body never goes on a command line: a cell may hold secrets, and
//! every user of a node sees its processes' arguments (`ps`), and Slurm
//! keeps a step's `srun` line in its accounting (`sacct -o SubmitLine`).
//! Every task runs the same fixed `runner` (`argv`), which reads the body
//! from its stdin (UTF-8, to its end) and runs it as `__main__`; so a
//! task's own stdin is empty.

use crate::{Commands, SCHEDULERS};

const HEAD: &str = r#"def __noyau_tasks(body, n):
    import contextlib, json, os, shlex, shutil, subprocess, sys
    env = dict(os.environ, NOYAU_NTASKS=str(n))
    # Its tracebacks show the body's lines, as "<cell>": they are in
    # linecache, which Python's own excepthook (before 3.13) does not read.
    runner = """def __noyau_cell():
    global __noyau_cell
    del __noyau_cell
    import linecache, sys, traceback
    src = sys.stdin.buffer.read().decode()
    linecache.cache["<cell>"] = (len(src), None, src.splitlines(True), "<cell>")
    sys.excepthook = traceback.print_exception
    return compile(src, "<cell>", "exec")
exec(__noyau_cell())
"""
    argv = [sys.executable, "-c", runner]
    out = {i: [] for i in range(n)}
    failed = []
    def start(cmd, data, **kw):
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
        try:
            # (one that ends before reading it all says why in its status and output)
            with contextlib.suppress(BrokenPipeError):
                p.stdin.buffer.write(data.encode())
            with contextlib.suppress(BrokenPipeError):
                p.stdin.close()
        except BaseException:
            # Interrupted while a body larger than the pipe waits for a
            # step still pending: it is not started, so nothing of it stays.
            p.kill()
            p.wait()
            raise
        return p
    def spawn(i, task_env):
        return start(argv, body, env=task_env), ""
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
    use std::io::Write;
    use std::process::{Command, Output, Stdio};

    /// Runs a kernel's `code` with python3 (read on its stdin, as a
    /// kernel gets it: off its command line), outside any job; `None`
    /// without python3.
    fn run(code: &str) -> Option<Output> {
        let child = Command::new("python3")
            .arg("-")
            .env_remove("SLURM_JOB_ID")
            .env_remove("OAR_NODEFILE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            assert!(std::env::var_os("CI").is_none(), "no python3 under CI");
            return None;
        };
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(code.as_bytes()).unwrap();
        drop(stdin);
        Some(child.wait_with_output().unwrap())
    }

    /// What `fan_out(body, n)` prints, run as `run` does; it must succeed.
    fn printed(body: &str, n: u32) -> Option<String> {
        let out = run(&fan_out(body, n))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}{err}");
        Some(text)
    }

    #[test]
    fn local_tasks_print_grouped_and_fail_the_cell() {
        let Some(text) = printed(
            "import os\nprint('task', os.environ['NOYAU_TASK_ID'], 'of', os.environ['NOYAU_NTASKS'])",
            3,
        ) else {
            return;
        };
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

    /// The tasks themselves look, while they run, for a mark of their body
    /// in every process's command line (a secret there would be everyone's).
    #[test]
    fn the_body_is_on_no_command_line_and_its_tracebacks_show_its_lines() {
        let mark = format!("not-a-secret-{:x}", rand::random::<u64>());
        let body = format!(
            "import glob\nseen = []\nfor f in glob.glob('/proc/[0-9]*/cmdline'):\n    \
             try:\n        if b'{mark}' in open(f, 'rb').read():\n            seen.append(f)\n    \
             except OSError:\n        pass\nprint('seen', seen, 'é')\n"
        );
        let Some(text) = printed(&body, 2) else {
            return;
        };
        assert_eq!(
            text,
            "--- task 0 ---\nseen [] é\n--- task 1 ---\nseen [] é\n"
        );
        let out = run(&fan_out("x = 1\nraise ValueError('from the cell')", 1)).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(
                "  File \"<cell>\", line 2, in <module>\n    raise ValueError('from the cell')\n"
            ) && text.contains("ValueError: from the cell"),
            "{text}"
        );
    }
}
