//! What Slurm's commands print, as noyau reads it: squeue listings (and the
//! job states they map to), sacct lines, sbatch --parsable, squeue's %L.
#![no_main]

use libfuzzer_sys::fuzz_target;
use noyau_sched::slurm;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in slurm::parse_squeue(&text) {
        let _ = slurm::state_of(&line);
    }
    let _ = slurm::parse_sacct(&text);
    let _ = slurm::parse_sbatch(&text);
    for l in text.lines() {
        let _ = slurm::parse_time_left(l);
    }
});
