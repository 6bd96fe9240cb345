//! A job's directory or name with a line break is refused before any
//! scheduler command runs: `#SBATCH --chdir=DIR` is one line of the job
//! script, and a line break in `DIR` (a directory cloned from a repository
//! can have one) would end it and run the rest as a command of the job.

use noyau_sched::{JobSpec, SchedError, Scheduler};

mod fake;

#[tokio::test]
async fn a_directory_with_a_line_break_never_reaches_sbatch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fake::private_dirs(d);
    let (sbatch, ran) = (d.join("sbatch"), d.join("ran"));
    fake::script(&sbatch, &format!("touch {}\necho 7", ran.display()));
    let s = Scheduler::builder("slurm")
        .unwrap()
        .command("sbatch", sbatch.to_str().unwrap())
        .unwrap()
        .build();
    let cases = [
        (Some(d.join("data\ntouch /tmp/pwned\n#")), None, "noyau-run"),
        (None, Some(d.join("logs\r")), "noyau-run"),
        (None, None, "noyau-run\nx"),
        (None, None, "noyau-run-\u{202e}txt.exe"),
    ];
    for (cwd, log_dir, name) in cases {
        let spec = JobSpec {
            name: name.into(),
            program: "/bin/true".into(),
            cwd,
            log_dir,
            ..JobSpec::default()
        };
        let dry = s.dry_run(&spec).await;
        assert!(matches!(dry, Err(SchedError::Invalid(_))), "{dry:?}");
        let Err(err) = s.submit(&spec).await else {
            panic!("submitted: {spec:?}")
        };
        let text = err.to_string();
        assert!(text.contains("control character"), "{text}");
        assert!(!ran.exists(), "sbatch ran for {spec:?}");
    }
}
