//! The scheduler for the hub: submitting a session's job as its user,
//! cancelling it, the one watcher that follows every user's session with a
//! single `squeue` (or `oarstat`, see [`crate::oar`]) per interval, and the
//! free cores and GPUs per partition from `sinfo` (or `oarnodes`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use noyau_sched::slurm::{parse_squeue, sh_quote, state_of, SQUEUE_FORMAT};
use noyau_sched::{JobSpec, JobState};
use rand::Rng;
use tokio::process::Command;

use crate::config::{HubProfile, Scheduler};
use crate::db::{now, Session, State, Update};
use crate::Hub;

/// How long a Slurm command may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The job name squeue shows to everyone: says what runs, holds no secret.
pub const JOB_NAME: &str = "noyau-hub";

/// Runs a command; stdout, or an error naming it.
pub(crate) async fn run(
    argv: &[String],
    stdin: Option<&str>,
    env: &[(String, String)],
) -> Result<String, String> {
    let shown = argv.join(" ");
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if !env.is_empty() {
        // A job gets a clean environment, not the hub's.
        cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    }
    noyau_sched::slurm::output_of(cmd, &shown, TIMEOUT, stdin).await
}

/// The hub's own values of `keys`, for a command run with a clean
/// environment.
pub(crate) fn passed_env(keys: &[&str]) -> Vec<(String, String)> {
    keys.iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// The submit_as prefix for `user`, then `rest`.
pub(crate) fn as_user(hub: &Hub, user: &str, rest: &[&str]) -> Vec<String> {
    hub.cfg
        .submit_as
        .iter()
        .map(|a| a.replace("{user}", user))
        .chain(rest.iter().map(|s| s.to_string()))
        .collect()
}

/// Submits the session's job as its user; returns the job id and log path.
pub async fn submit(hub: &Hub, s: &Session) -> Result<(String, String), String> {
    let user = nix::unistd::User::from_name(&s.user)
        .map_err(|e| format!("cannot look up user {}: {e}", s.user))?
        .ok_or_else(|| format!("{} is not a user of this system", s.user))?;
    let prof = hub
        .cfg
        .profiles
        .get(&s.choice.profile)
        .ok_or_else(|| format!("profile {} is no longer offered", s.choice.profile))?;
    // What the agent needs (secrets included): never on a command line.
    let secrets: Vec<(String, String)> = vec![
        ("NOYAU_LINK_ADDR".into(), hub.link_advertise.clone()),
        ("NOYAU_LINK_PIN".into(), hub.pin.clone()),
        ("NOYAU_LINK_TOKEN".into(), hub.link_token(&s.id)),
        ("NOYAU_HUB_SESSION".into(), s.id.clone()),
        ("NOYAU_HUB_BASE_URL".into(), format!("/user/{}/", s.user)),
    ];
    match hub.cfg.scheduler {
        Scheduler::Slurm => submit_slurm(hub, s, &user, prof, secrets).await,
        Scheduler::Oar => crate::oar::submit(hub, s, &user, prof, secrets).await,
    }
}

async fn submit_slurm(
    hub: &Hub,
    s: &Session,
    user: &nix::unistd::User,
    prof: &HubProfile,
    secrets: Vec<(String, String)>,
) -> Result<(String, String), String> {
    let home = user.dir.display().to_string();
    let c = &s.choice;
    let profile = noyau_config::Profile {
        partition: Some(c.partition.clone()),
        time: Some(c.minutes.to_string()),
        cpus_per_task: Some(c.cores),
        // No memory asked: Slurm's default per CPU (--mem=0 would be the whole node).
        mem: (c.mem_gb > 0).then(|| format!("{}G", c.mem_gb)),
        gpus: (c.gpus > 0).then(|| c.gpus.to_string()),
        account: prof.account.clone(),
        qos: prof.qos.clone(),
        env: prof.env.clone(),
        prologue: prof.prologue.clone(),
        ..Default::default()
    };
    let log_dir = PathBuf::from(
        hub.cfg
            .log_dir
            .replace("{home}", &home)
            .replace("{user}", &s.user),
    );
    // Slurm opens the log before the script runs: the directory must exist,
    // and belong to the user.
    run(
        &as_user(
            hub,
            &s.user,
            &["mkdir", "-p", &log_dir.display().to_string()],
        ),
        None,
        &[],
    )
    .await?;
    let spec = JobSpec {
        name: JOB_NAME.into(),
        program: hub.agent_exe.clone(),
        args: vec!["agent".into(), "--serve".into(), prof.server.clone()],
        env: Default::default(),
        cwd: Some(user.dir.clone()),
        profile,
        array: None,
    };
    let script = noyau_sched::slurm::job_script(&spec, &log_dir);
    // Secrets go in sbatch's environment, which Slurm exports to the job.
    let mut env = passed_env(&["PATH", "SLURM_CONF", "LANG"]);
    env.extend(secrets);
    let argv = as_user(hub, &s.user, &[&hub.cfg.slurm.sbatch, "--parsable"]);
    let out = run(&argv, Some(&script), &env).await?;
    let id = out
        .trim()
        .split(';')
        .next()
        .filter(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("sbatch answered {:?}, not a job id", out.trim()))?
        .to_string();
    let log = log_dir.join(format!("{JOB_NAME}-{id}.log"));
    tracing::info!(
        user = s.user,
        job = id,
        "submitted: {}",
        sh_quote(&log.display().to_string())
    );
    Ok((id, log.display().to_string()))
}

/// Cancels `user`'s job as that user (through `submit_as`, as it was
/// submitted): the hub needs no scheduler operator rights.
pub async fn cancel(hub: &Hub, user: &str, job: &str) -> Result<(), String> {
    let prog = match hub.cfg.scheduler {
        Scheduler::Slurm => &hub.cfg.slurm.scancel,
        Scheduler::Oar => &hub.cfg.oar.oardel,
    };
    let env = passed_env(&["PATH", "SLURM_CONF", "LANG"]);
    run(&as_user(hub, user, &[prog, job]), None, &env)
        .await
        .map(|_| ())
}

/// Seconds in a Slurm duration (`D-HH:MM:SS`, `HH:MM:SS`, `MM:SS`).
pub fn secs_of(t: &str) -> Option<u64> {
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, t),
    };
    let parts: Vec<u64> = rest
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let hms = match parts[..] {
        [h, m, s] => h * 3600 + m * 60 + s,
        [m, s] => m * 60 + s,
        [s] => s,
        _ => return None,
    };
    Some(days * 86400 + hms)
}

/// The one watcher: a single `squeue` for every user's live session per
/// interval (±20 % jitter), whatever their number.
pub async fn watch(hub: Arc<Hub>) {
    let interval = Duration::from_secs_f64(hub.cfg.poll_interval);
    loop {
        let jitter = rand::rng().random_range(0.8..1.2);
        tokio::time::sleep(interval.mul_f64(jitter)).await;
        if let Err(e) = poll_once(&hub).await {
            tracing::warn!("watching the sessions' jobs: {e:#}");
        }
    }
}

/// What one poll of the scheduler says of a job.
pub(crate) struct Seen {
    pub state: JobState,
    /// Slurm's `%L` form (`D-HH:MM:SS`, `HH:MM:SS`, `MM:SS`), while running.
    pub time_left: Option<String>,
}

async fn poll_once(hub: &Hub) -> anyhow::Result<()> {
    let live: Vec<Session> = hub
        .db
        .live_sessions()?
        .into_iter()
        .filter(|s| s.job_id.is_some())
        .collect();
    if live.is_empty() {
        return Ok(());
    }
    let asked = now();
    hub.squeue_calls
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seen = match hub.cfg.scheduler {
        Scheduler::Slurm => slurm_states(hub).await,
        Scheduler::Oar => {
            let ids: Vec<&str> = live.iter().filter_map(|s| s.job_id.as_deref()).collect();
            crate::oar::states(hub, &ids).await
        }
    };
    // The scheduler may be restarting: that says nothing about the jobs.
    let seen = seen.map_err(|why| anyhow::anyhow!("{why}"))?;
    let slack = (2.0 * hub.cfg.poll_interval) as u64 + 5;
    for s in live {
        let job = s.job_id.as_deref().unwrap_or_default();
        let u = match seen.get(job) {
            Some(Seen { state, time_left }) => match state {
                JobState::Pending { reason, start, .. } => Update {
                    state: Some(State::Queued),
                    reason: Some(Some(reason.clone())),
                    start_est: Some(start.clone()),
                    ..Default::default()
                },
                JobState::Running { node } => Update {
                    state: Some(if hub.upstream(&s.id).is_some() {
                        State::Running
                    } else {
                        State::Starting
                    }),
                    reason: Some(None),
                    node: Some(Some(node.clone())),
                    time_left: Some(time_left.clone()),
                    ..Default::default()
                },
                JobState::Ended(end) => ended(&s, end.description.clone(), slack),
                JobState::Unknown { .. } => continue,
            },
            // Submitted after the listing was asked for: not a verdict.
            None if s.created >= asked - 1 => continue,
            None => ended(&s, "left the queue".into(), slack),
        };
        if u.state == Some(State::Ended) {
            hub.drop_upstream(&s.id);
        }
        if u.changes(&s) {
            hub.db.update(&s.id, &u)?;
        }
    }
    Ok(())
}

/// One `squeue --states=all` for every job (all users': the hub is root).
async fn slurm_states(hub: &Hub) -> Result<HashMap<String, Seen>, String> {
    let argv = [
        hub.cfg.slurm.squeue.clone(),
        "--states=all".into(),
        "-h".into(),
        "-o".into(),
        SQUEUE_FORMAT.into(),
    ];
    let out = run(&argv, None, &[]).await?;
    Ok(parse_squeue(&out)
        .into_iter()
        .map(|l| {
            let seen = Seen {
                state: state_of(&l),
                time_left: Some(l.time_left.clone()),
            };
            (l.id, seen)
        })
        .collect())
}

fn ended(s: &Session, description: String, slack: u64) -> Update {
    let near_walltime = s
        .time_left
        .as_deref()
        .and_then(secs_of)
        .is_some_and(|t| t <= slack);
    let why =
        if description.contains("TIMEOUT") || description.contains("walltime") || near_walltime {
            "reached its walltime".to_string()
        } else if description.contains("cancelled") {
            "cancelled".to_string()
        } else if s.state == State::Queued {
            format!("failed before it started: the job {description}")
        } else {
            format!("the job {description}")
        };
    Update {
        state: Some(State::Ended),
        ended_why: Some(why),
        time_left: Some(None),
        ..Default::default()
    }
}

/// Free and total cores and GPUs per partition, from one `sinfo` call
/// (cached for the poll interval).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PartitionLoad {
    pub partition: String,
    pub idle_cores: u64,
    pub total_cores: u64,
    /// GPUs not held by a job, on nodes that can take jobs.
    pub free_gpus: u64,
    pub total_gpus: u64,
}

/// One line per node and partition: `sinfo -N` (a partition's nodes are
/// summed here; without `-N`, sinfo merges nodes and their gres).
const SINFO_FORMAT: &str = "Partition:|,CPUsState:|,Gres:|,GresUsed:|,StateCompact:|";

pub async fn partitions(hub: &Hub) -> Result<Vec<PartitionLoad>, String> {
    let ttl = Duration::from_secs_f64(hub.cfg.poll_interval.max(5.0));
    if let Some((at, v)) = &*hub.sinfo_cache.lock().await {
        if at.elapsed() < ttl {
            return Ok(v.clone());
        }
    }
    let v = match hub.cfg.scheduler {
        Scheduler::Slurm => {
            let argv = [
                hub.cfg.slurm.sinfo.clone(),
                "-h".into(),
                "-N".into(),
                "-O".into(),
                SINFO_FORMAT.into(),
            ];
            parse_sinfo(&run(&argv, None, &[]).await?)
        }
        Scheduler::Oar => crate::oar::load(hub).await?,
    };
    *hub.sinfo_cache.lock().await = Some((Instant::now(), v.clone()));
    Ok(v)
}

/// Sums `sinfo -N -O SINFO_FORMAT` lines by partition.
fn parse_sinfo(out: &str) -> Vec<PartitionLoad> {
    let mut v: Vec<PartitionLoad> = Vec::new();
    for l in out.lines() {
        let f: Vec<&str> = l.trim().split('|').map(str::trim).collect();
        let [p, cpus, gres, used, state, ..] = f[..] else {
            continue;
        };
        // The default partition is marked `debug*`.
        let p = p.trim_end_matches('*');
        // CPUsState: allocated/idle/other/total
        let c: Vec<u64> = cpus.split('/').filter_map(|x| x.parse().ok()).collect();
        let [_, idle, _, total] = c[..] else { continue };
        let gpus = gpu_count(gres);
        // A node down, drained or failing takes no job: its GPUs are not free.
        let usable = ["idle", "mix", "alloc", "comp"]
            .iter()
            .any(|s| state.starts_with(s));
        let free = if usable {
            gpus.saturating_sub(gpu_count(used))
        } else {
            0
        };
        let x = match v.iter_mut().position(|x| x.partition == p) {
            Some(i) => &mut v[i],
            None => {
                v.push(PartitionLoad {
                    partition: p.into(),
                    ..Default::default()
                });
                v.last_mut().expect("just pushed")
            }
        };
        x.idle_cores += idle;
        x.total_cores += total;
        x.total_gpus += gpus;
        x.free_gpus += free;
    }
    v
}

/// GPUs in a gres list: `gpu:2`, `gpu:a100:4(S:0-1)`, `gpu:1(IDX:0,2),mps:100`.
fn gpu_count(gres: &str) -> u64 {
    // Drop the parenthesised details first: they may hold commas.
    let mut plain = String::with_capacity(gres.len());
    let mut depth = 0u32;
    for ch in gres.chars() {
        match ch {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ if depth == 0 => plain.push(ch),
            _ => {}
        }
    }
    plain
        .split(',')
        .filter_map(|item| {
            let item = item.trim();
            let (name, _) = item.split_once(':')?;
            (name == "gpu").then(|| item.rsplit(':').next()?.parse::<u64>().ok())?
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_durations() {
        assert_eq!(secs_of("1-02:03:04"), Some(93784));
        assert_eq!(secs_of("05:00"), Some(300));
        assert_eq!(secs_of("UNLIMITED"), None);
    }

    #[test]
    fn gpus_in_gres() {
        assert_eq!(gpu_count("gpu:2"), 2);
        assert_eq!(gpu_count("gpu:a100:4(S:0-1)"), 4);
        assert_eq!(gpu_count("gpu:1(IDX:0,2),mps:100"), 1);
        assert_eq!(gpu_count("gpu:a100:1(IDX:0),gpu:v100:2(IDX:0-1)"), 3);
        assert_eq!(gpu_count("(null)"), 0);
        assert_eq!(gpu_count("gpu"), 0);
    }

    #[test]
    fn free_gpus_per_partition() {
        let out = "debug*|1/3/0/4|gpu:2|gpu:1(IDX:0)|mix|\n\
                   debug*|0/8/0/8|gpu:4|gpu:0|idle|\n\
                   debug*|0/0/8/8|gpu:4|gpu:0|drain|\n\
                   batch|1/3/0/4|(null)|gpu:0|mix|\n";
        let v = parse_sinfo(out);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].partition, "debug");
        assert_eq!((v[0].idle_cores, v[0].total_cores), (11, 20));
        assert_eq!((v[0].free_gpus, v[0].total_gpus), (5, 10));
        assert_eq!((v[1].free_gpus, v[1].total_gpus), (0, 0));
    }
}
