//! What Slurm's commands print, as noyau reads it: squeue listings (and the
//! job states they map to), sacct lines, sbatch --parsable, sinfo lines,
//! squeue's %L.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    noyau_sched::fuzzing::slurm_output(&String::from_utf8_lossy(data));
});
