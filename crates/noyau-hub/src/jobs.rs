//! The sessions' jobs, through noyau-sched's scheduler handle: submitting a
//! session's job as its user (the `submit_as` prefix), cancelling it, and
//! following every user's sessions with the one watcher of this process
//! (one listing call per poll interval, whatever the number of sessions);
//! the free cores and GPUs per partition. What is here is the hub's own:
//! which profile asks for what, and what a session's card says.

use noyau_vars::EnvVars;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use noyau_sched::{AsUser, Job, JobSpec, JobState, PartitionLoad, SchedError, Scheduler, Scope};

use crate::config::HubConfig;
use crate::db::{Session, State, Update};
use crate::Hub;

/// The job name the scheduler shows to everyone: says what runs, holds no secret.
pub const JOB_NAME: &str = "noyau-hub";

/// The hub's scheduler: every user's jobs, the commands of hub.toml's
/// `[NAME]` table, asked every `poll_interval`.
pub fn scheduler(cfg: &HubConfig) -> anyhow::Result<Scheduler> {
    let b = Scheduler::builder(&cfg.scheduler)?
        .interval(Duration::from_secs_f64(cfg.poll_interval))
        .scope(Scope::All);
    let b = cfg
        .commands(&cfg.scheduler)?
        .iter()
        .try_fold(b, |b, (name, path)| b.command(name, path))?;
    Ok(b.build())
}

/// How the hub runs commands as `user`: `submit_as`, `{user}` replaced.
fn as_user(hub: &Hub, user: &nix::unistd::User) -> AsUser {
    AsUser {
        user: user.name.clone(),
        prefix: hub
            .cfg
            .submit_as
            .iter()
            .map(|a| a.replace("{user}", &user.name))
            .collect(),
        home: user.dir.clone(),
        noyau: hub.agent_exe.clone(),
    }
}

/// `name`'s account, looked up on the blocking pool (NSS may be LDAP: not
/// on the hub's one async thread).
async fn account(name: &str) -> Result<nix::unistd::User, String> {
    let who = name.to_string();
    let found = tokio::task::spawn_blocking(move || nix::unistd::User::from_name(&who))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    found
        .map_err(|e| format!("cannot look up user {name}: {e}"))?
        .ok_or_else(|| format!("{name} is not a user of this system"))
}

/// Why a job was not submitted or cancelled.
#[derive(Debug)]
pub enum Refused {
    /// The scheduler was not asked now: another command of this user's
    /// still runs (one at a time per user), the same cancel is under way,
    /// or every permit of the hub's pool stayed taken. The words say so.
    NotNow(StatusCode, String),
    /// The scheduler (or the account lookup) said no.
    Failed(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::NotNow(_, why) | Refused::Failed(why) => f.write_str(why),
        }
    }
}

impl Refused {
    /// The answer to the user who asked: `failed` (e.g. "Slurm refused
    /// the job") in front of what the scheduler said.
    pub fn answer(&self, failed: &str) -> (StatusCode, String) {
        match self {
            Refused::NotNow(status, why) => (*status, why.clone()),
            Refused::Failed(why) => (StatusCode::BAD_GATEWAY, format!("{failed}: {why}")),
        }
    }
}

impl From<String> for Refused {
    fn from(why: String) -> Refused {
        Refused::Failed(why)
    }
}

impl From<SchedError> for Refused {
    fn from(e: SchedError) -> Refused {
        let not_now = |status, why: &str| Refused::NotNow(status, why.to_string());
        match e {
            SchedError::UserBusy(_) => not_now(
                StatusCode::CONFLICT,
                "A request of yours to the scheduler is still running; try again in a moment.",
            ),
            SchedError::CancelUnderWay(_) => not_now(
                StatusCode::CONFLICT,
                "This session's cancel is already under way; its card says it ended once the \
                 scheduler has ended the job.",
            ),
            SchedError::Busy(_) => not_now(
                StatusCode::SERVICE_UNAVAILABLE,
                "The cluster's scheduler is busy; try again in a moment.",
            ),
            e => Refused::Failed(e.to_string()),
        }
    }
}

/// Submits the session's job as its user; returns the job id and log path.
pub async fn submit(hub: &Hub, s: &Session) -> Result<(String, String), Refused> {
    let user = account(&s.user).await?;
    let prof = hub
        .cfg
        .profiles
        .get(&s.choice.profile)
        .ok_or_else(|| format!("profile {} is no longer offered", s.choice.profile))?;
    let c = &s.choice;
    let mut profile = noyau_config::Profile {
        partition: Some(c.partition.clone()),
        time: Some(c.minutes.to_string()),
        cpus_per_task: Some(c.cores),
        account: prof.account.clone(),
        env: prof.env.clone(),
        prologue: prof.prologue.clone(),
        ..Default::default()
    };
    // No memory asked: the scheduler's default per core (--mem=0 would be the whole node).
    let asked = [
        ("mem", (c.mem_gb > 0).then(|| format!("{}G", c.mem_gb))),
        ("gpus", (c.gpus > 0).then(|| c.gpus.to_string())),
        ("qos", prof.qos.clone()),
    ];
    for (key, value) in asked {
        if let Some(v) = value {
            profile
                .apply_override(&format!("{key}={v}"))
                .map_err(|e| Refused::Failed(e.to_string()))?;
        }
    }
    let home = user.dir.display().to_string();
    let spec = JobSpec {
        name: JOB_NAME.into(),
        program: hub.agent_exe.clone(),
        args: vec!["agent".into(), "--serve".into(), prof.server.clone()],
        // What the agent needs (secrets included): never on a command line.
        env: [
            (EnvVars::NOYAU_LINK_ADDR.into(), hub.link_advertise.clone()),
            (EnvVars::NOYAU_LINK_PIN.into(), hub.pin.clone()),
            (EnvVars::NOYAU_LINK_TOKEN.into(), hub.link_token(&s.id)),
            (EnvVars::NOYAU_HUB_SESSION.into(), s.id.clone()),
            (
                EnvVars::NOYAU_HUB_BASE_URL.into(),
                format!("/user/{}/", s.user),
            ),
        ]
        .into_iter()
        // (A profile's own `env` may say longer, for maintenance: it wins.)
        .chain(
            (!prof.env.contains_key(EnvVars::NOYAU_LINK_GIVE_UP)).then(|| {
                (
                    EnvVars::NOYAU_LINK_GIVE_UP.into(),
                    give_up_secs(hub.cfg.poll_interval).to_string(),
                )
            }),
        )
        .collect(),
        cwd: Some(user.dir.clone()),
        profile,
        log_dir: Some(
            hub.cfg
                .log_dir
                .replace("{home}", &home)
                .replace("{user}", &s.user)
                .into(),
        ),
        ..Default::default()
    };
    // Its agent may dial before the watcher lets the token in: quietly refused.
    hub.tokens.expect(&hub.link_token(&s.id));
    let id = hub
        .sched
        .as_user(as_user(hub, &user))
        .submit_detached(&spec)
        .await?;
    let log = spec.log_path(&id).display().to_string();
    tracing::info!(user = s.user, job = id, log, "submitted");
    Ok((id, log))
}

/// How long a session's agent keeps dialling the hub before it gives up
/// (`NOYAU_LINK_GIVE_UP`; the agent's own default is 120 s): its first
/// token is let in only once a listing of the scheduler sees the job run
/// (or cannot say), and a listing may fail or come late, so it outlasts
/// three polls with a minute to spare.
fn give_up_secs(poll_interval: f64) -> u64 {
    ((3.0 * poll_interval).ceil() as u64 + 60).max(120)
}

/// Cancels `user`'s job as that user (through `submit_as`, as it was
/// submitted): the hub needs no scheduler operator rights.
pub async fn cancel(hub: &Hub, user: &str, job: &str) -> Result<(), Refused> {
    let account = account(user).await?;
    hub.sched
        .as_user(as_user(hub, &account))
        .cancel(&[job.to_string()])
        .await?;
    Ok(())
}

/// A session's job, as the watcher follows it.
struct Followed {
    job: Job,
    /// The watcher has given its first answer (until then the state is
    /// only "submitted", which says nothing of a job adopted after a restart).
    heard: bool,
    /// The session's first link token was offered to the listener (once:
    /// the listener forgets a token once used, and it must stay so).
    token_offered: bool,
}

/// Follows every live session's job: each is adopted by the hub's
/// scheduler handle once, and its state goes to the database as the
/// watcher's answers change it.
pub async fn follow(hub: Arc<Hub>) {
    let mut followed: HashMap<String, Followed> = HashMap::new();
    let every = Duration::from_secs_f64(hub.cfg.poll_interval / 2.0);
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = sync(&hub, &mut followed) {
            tracing::warn!("following the sessions' jobs: {e:#}");
        }
    }
}

fn sync(hub: &Hub, followed: &mut HashMap<String, Followed>) -> anyhow::Result<()> {
    let live: Vec<Session> = hub
        .db
        .live_sessions()?
        .into_iter()
        .filter(|s| s.job_id.is_some())
        .collect();
    followed.retain(|id, _| live.iter().any(|s| &s.id == id));
    let slack = (2.0 * hub.cfg.poll_interval) as u64 + 5;
    for s in live {
        let job = s.job_id.as_deref().unwrap_or_default();
        let f = followed.entry(s.id.clone()).or_insert_with(|| Followed {
            job: hub.sched.adopt(job),
            heard: false,
            token_offered: false,
        });
        // (closed: the watcher's last word, an end, is there to read)
        f.heard = f.heard || f.job.state.has_changed().unwrap_or(true);
        if !f.heard {
            continue;
        }
        let state = f.job.state.borrow_and_update().clone();
        offer_first_token(hub, &s.id, &state, f);
        let connected = hub.upstream(&s.id);
        let u = match state {
            JobState::Pending { reason, start, .. } => Update {
                state: Some(State::Queued),
                reason: Some(Some(reason)),
                start_est: Some(start.map(noyau_sched::local_time)),
                ..Default::default()
            },
            JobState::Running { node, ends_at } => Update {
                state: Some(match &connected {
                    Some(_) if !node.is_empty() => State::Running,
                    _ => State::Starting,
                }),
                reason: Some(None),
                node: Some(Some(node).filter(|n| !n.is_empty())),
                time_left: Some(
                    ends_at.map(|t| noyau_sched::duration_text(noyau_sched::seconds_until(t))),
                ),
                ..Default::default()
            },
            JobState::Ended(end) => ended(&s, end.description, slack),
            // The scheduler may be restarting: that says nothing about the
            // job, unless its agent is connected (then it runs, on the node
            // its hello named).
            JobState::Unknown { .. } => match connected.and_then(|u| u.node.clone()) {
                Some(node) => Update {
                    state: Some(State::Running),
                    reason: Some(None),
                    node: Some(Some(node)),
                    ..Default::default()
                },
                None => continue,
            },
        };
        if u.state == Some(State::Ended) {
            hub.drop_upstream(&s.id);
            hub.tokens.forget(&hub.link_token(&s.id));
            // (a cancel or the culler wrote its reason first, and it stays)
            let why = s.ended_why.as_ref().or(u.ended_why.as_ref());
            hub.db.audit(
                &s.user,
                "ended",
                &format!(
                    "session {} job {job}: {}",
                    s.id,
                    why.map_or("ended", String::as_str)
                ),
            );
        }
        if u.changes(&s) {
            hub.db.update(&s.id, &u)?;
        }
    }
    Ok(())
}

/// Lets the listener take a session's first link token once its job left
/// the queue ([`crate::agents::first_token_due`]), and takes it back if the
/// job is said to wait again before any agent used it (the scheduler could
/// not say, then it could: the token opens nothing while the job waits).
fn offer_first_token(hub: &Hub, session: &str, state: &JobState, f: &mut Followed) {
    let due = crate::agents::first_token_due(state);
    let waits = matches!(state, JobState::Pending { .. });
    let r = match (f.token_offered, due, waits) {
        (false, true, _) => hub.admit_first_token(session).map(|()| true),
        (true, _, true) => hub.revoke_first_token(session).map(|()| false),
        _ => return,
    };
    match r {
        Ok(offered) => f.token_offered = offered,
        Err(e) => tracing::error!(session, "admitting the agent's first link token: {e:#}"),
    }
}

fn ended(s: &Session, description: String, slack: u64) -> Update {
    let near_walltime = s
        .time_left
        .as_deref()
        .and_then(noyau_sched::parse_duration)
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

/// Free and total cores and GPUs per partition (asked at most once per
/// poll interval, at least 5 s).
pub async fn partitions(hub: &Hub) -> Result<Vec<PartitionLoad>, String> {
    let ttl = Duration::from_secs_f64(hub.cfg.poll_interval.max(5.0));
    if let Some((at, v)) = &*hub.sinfo_cache.lock().await {
        if at.elapsed() < ttl {
            return Ok(v.clone());
        }
    }
    let v = hub.sched.partitions().await.map_err(|e| e.to_string())?;
    *hub.sinfo_cache.lock().await = Some((Instant::now(), v.clone()));
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent outlasts three listings of the scheduler, with a minute to
    /// spare, and never gives up sooner than by itself (120 s).
    #[test]
    fn the_agent_dials_for_three_polls_and_a_minute() {
        assert_eq!(give_up_secs(5.0), 120);
        assert_eq!(give_up_secs(30.0), 150);
        assert_eq!(give_up_secs(100.5), 362);
    }

    /// The gate's refusals reach the user as what to do (try again, the
    /// cancel is under way), not as the scheduler's failure; a failure
    /// keeps the scheduler's words.
    #[test]
    fn refusals_of_the_gate_say_to_try_again() {
        let r = Refused::from(SchedError::UserBusy("alice".into()));
        let (status, text) = r.answer("X did not cancel the job");
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(text.contains("still running; try again"), "{text}");
        let r = Refused::from(SchedError::CancelUnderWay(vec!["12".into()]));
        assert!(r.to_string().contains("cancel is already under way"), "{r}");
        let r = Refused::from(SchedError::Busy(Duration::from_secs(30)));
        let (status, text) = r.answer("X refused the job");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            text,
            "The cluster's scheduler is busy; try again in a moment."
        );
        let r = Refused::from(SchedError::Invalid("no such partition".into()));
        let (status, text) = r.answer("X refused the job");
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(text.starts_with("X refused the job: "), "{text}");
    }

    #[test]
    fn slurm_durations() {
        let secs_of = noyau_sched::parse_duration;
        assert_eq!(secs_of("1-02:03:04"), Some(93784));
        assert_eq!(secs_of("05:00"), Some(300));
        assert_eq!(secs_of("UNLIMITED"), None);
    }
}
