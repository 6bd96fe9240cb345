//! The job script, written once for every scheduler: the scheduler's own
//! `head` (Slurm's `#SBATCH` lines, OAR's sourcing of the environment
//! file), then the profile's environment and prologue, then `exec` of the
//! job's program. It holds no secret: those travel in the job's
//! environment.

use crate::quote::sh_quote;
use crate::JobSpec;

/// `#!/bin/sh`, `head`, then the body every scheduler shares.
pub(crate) fn job_script(head: &str, spec: &JobSpec) -> String {
    let p = &spec.profile;
    let mut s = format!("#!/bin/sh\n{head}");
    if !p.env.is_empty() {
        s.push_str("\n# environment of the profile\n");
        for (k, v) in &p.env {
            s.push_str(&format!("export {k}={}\n", sh_quote(v)));
        }
    }
    if let Some(pro) = &p.prologue {
        s.push_str("\n# prologue of the profile\n");
        s.push_str(pro.trim_end());
        s.push('\n');
    }
    s.push_str("\n# the link's address, pin and token are in the job's environment\nexec ");
    s.push_str(&command_line(spec));
    s.push('\n');
    s
}

/// The job's program and arguments, quoted for sh.
pub(crate) fn command_line(spec: &JobSpec) -> String {
    std::iter::once(spec.program.display().to_string())
        .chain(spec.args.iter().cloned())
        .map(|a| sh_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}
