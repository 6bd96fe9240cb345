//! The `%%noyau on TARGET` and `%noyau …` magics: recognised the same way
//! by the proxy kernel (interactive notebooks) and by `noyau run`
//! (headless), so a notebook delegates the same cells either way.

/// A parsed `%%noyau on NAME [key=value …] [--quiet]` first line.
#[derive(Debug, PartialEq, Eq)]
pub struct OnMagic {
    pub target: String,
    pub overrides: Vec<String>,
    pub quiet: bool,
    /// `--tasks N`: run the cell as N tasks of the allocation.
    pub tasks: Option<u32>,
}

/// What the proxy does with a cell.
#[derive(Debug, PartialEq, Eq)]
pub enum Magic {
    /// Run `body` on a target.
    On(OnMagic, String),
    /// A `%noyau …` line magic the proxy answers itself.
    Line(Vec<String>),
    /// Not ours.
    None,
}

/// Recognises a cell's magic from its code.
pub fn parse(code: &str) -> Result<Magic, String> {
    let trimmed = code.trim_start();
    let (first, body) = trimmed.split_once('\n').unwrap_or((trimmed, ""));
    let words: Vec<&str> = first.split_whitespace().collect();
    match words.first() {
        Some(&"%%noyau") => {
            if words.get(1) != Some(&"on") || words.len() < 3 {
                return Err("usage: %%noyau on TARGET [key=value …] [--tasks N] [--quiet] as the cell's first line, the code below it".into());
            }
            let mut m = OnMagic {
                target: words[2].to_string(),
                overrides: vec![],
                quiet: false,
                tasks: None,
            };
            let mut rest = words[3..].iter();
            while let Some(w) = rest.next() {
                let tasks = match *w {
                    "--quiet" | "-q" => {
                        m.quiet = true;
                        continue;
                    }
                    "--tasks" => rest.next().copied(),
                    t if t.starts_with("--tasks=") => t.strip_prefix("--tasks="),
                    kv if kv.contains('=') && !kv.starts_with('-') => {
                        m.overrides.push(kv.to_string());
                        continue;
                    }
                    other => {
                        return Err(format!(
                            "%%noyau on: {other:?} is neither key=value, --tasks N nor --quiet"
                        ))
                    }
                };
                match tasks.and_then(|t| t.parse::<u32>().ok()).filter(|n| *n > 0) {
                    Some(n) => m.tasks = Some(n),
                    None => return Err("%%noyau on: --tasks needs a positive number".into()),
                }
            }
            Ok(Magic::On(m, body.to_string()))
        }
        Some(&"%noyau") => Ok(Magic::Line(
            words[1..].iter().map(|w| w.to_string()).collect(),
        )),
        _ => Ok(Magic::None),
    }
}

/// Python that runs `body` as `n` tasks and prints their output grouped by
/// task: through `srun` inside a Slurm allocation; inside an OAR job, on the
/// job's cores as `$OAR_NODEFILE` lists them (task i on line i, so tasks
/// fill a node before the next), each through `oarsh`, which puts it in the
/// job's cpuset on that node; as local processes elsewhere. Each task sees
/// `NOYAU_TASK_ID` and `NOYAU_NTASKS`; a failed task fails the cell.
///
/// oarsh is ssh: it carries neither the environment nor the working
/// directory, so a small launcher reads them (and the command) as JSON on
/// its stdin, keeping the environment's secrets off every command line.
pub fn fan_out(body: &str, n: u32) -> String {
    let body = serde_json::to_string(body).expect("a string serialises");
    format!(
        r#"def __noyau_tasks(body, n):
    import json, os, shlex, shutil, subprocess, sys
    env = dict(os.environ, NOYAU_NTASKS=str(n))
    prelude = "import os\nos.environ['NOYAU_TASK_ID'] = os.environ.get('NOYAU_TASK_ID') or os.environ.get('SLURM_PROCID', '0')\n"
    out = {{i: [] for i in range(n)}}
    failed = []
    if os.environ.get("SLURM_JOB_ID") and shutil.which("srun"):
        p = subprocess.run(["srun", f"--ntasks={{n}}", "--label", sys.executable, "-c", prelude + body],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in p.stdout.splitlines():
            tid, sep, text = line.partition(": ")
            if sep and tid.strip().isdigit() and int(tid) in out:
                out[int(tid)].append(text)
            else:
                out.setdefault("srun", []).append(line)
        if p.returncode:
            failed.append(f"srun exited {{p.returncode}}")
    else:
        slots = []
        if os.environ.get("OAR_NODEFILE") and shutil.which("oarsh"):
            with open(os.environ["OAR_NODEFILE"]) as f:
                slots = [l.strip() for l in f if l.strip()]
        argv = [sys.executable, "-c", prelude + body]
        launcher = "import json, os, sys; d = json.load(sys.stdin); os.chdir(d['cwd']); os.execve(d['argv'][0], d['argv'], d['env'])"
        procs, where = [], []
        for i in range(n):
            task_env = dict(env, NOYAU_TASK_ID=str(i))
            if slots:
                host = slots[i % len(slots)]
                where.append(f" on {{host}}")
                p = subprocess.Popen(["oarsh", host, shlex.join([sys.executable, "-c", launcher])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                try:
                    p.stdin.write(json.dumps({{"cwd": os.getcwd(), "argv": argv, "env": task_env}}))
                    p.stdin.close()
                except BrokenPipeError:
                    pass  # oarsh failed first: its exit status and message say why
            else:
                where.append("")
                p = subprocess.Popen(argv, env=task_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(p)
        for i, p in enumerate(procs):
            out[i] = p.stdout.read().splitlines()
            if p.wait():
                failed.append(f"task {{i}}{{where[i]}} exited {{p.returncode}}")
    for key, lines in out.items():
        print(f"--- task {{key}} ---")
        for line in lines:
            print(line)
    if failed:
        raise RuntimeError("; ".join(failed))
__noyau_tasks({body}, {n})
del __noyau_tasks
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_magics() {
        assert_eq!(
            parse("%%noyau on gpu mem=4G --quiet\nimport torch\nx = 1").unwrap(),
            Magic::On(
                OnMagic {
                    target: "gpu".into(),
                    overrides: vec!["mem=4G".into()],
                    quiet: true,
                    tasks: None,
                },
                "import torch\nx = 1".into()
            )
        );
        assert_eq!(
            parse("%noyau release gpu").unwrap(),
            Magic::Line(vec!["release".into(), "gpu".into()])
        );
        assert_eq!(parse("print('%%noyau on x')").unwrap(), Magic::None);
        assert!(parse("%%noyau gpu\n1").unwrap_err().contains("usage"));
        match parse("%%noyau on cpu --tasks 4\nprint(1)").unwrap() {
            Magic::On(m, _) => assert_eq!(m.tasks, Some(4)),
            other => panic!("{other:?}"),
        }
        assert!(parse("%%noyau on cpu --tasks zero\n1").is_err());
        assert!(parse("%%noyau on gpu bogus\n1").is_err());
    }
}
