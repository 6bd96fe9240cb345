//! The idle culler (`idle_timeout` in hub.toml): a running session whose
//! JupyterLab has had no activity for that long is ended, its job
//! cancelled as its user and its card saying why, as JupyterHub's idle
//! culler ends servers from the activity they report.
//!
//! Activity is what jupyter_server counts and `/api/status` reports as
//! `last_activity`: its API requests (an open JupyterLab tab polls them),
//! every kernel message and terminal traffic. The hub asks through the
//! session's tunnel, as the proxy forwards, with `no_track_activity` so
//! that asking is no activity. A kernel running a long cell sends nothing
//! until it ends, so a session with a busy (or starting) kernel, from
//! `/api/kernels`, is never ended, whatever its last activity.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};

use crate::db::{Session, State, Update};
use crate::{jobs, proxy, Hub};

/// How long one question to a session's server may take.
const ASK: Duration = Duration::from_secs(10);

pub(crate) async fn run(hub: Arc<Hub>, limit: Duration) {
    let every = (limit / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::time::sleep(every).await;
        let live = match hub.db.live_sessions() {
            Ok(live) => live,
            Err(e) => {
                tracing::warn!("the idle culler cannot list the sessions: {e:#}");
                continue;
            }
        };
        for s in live.iter().filter(|s| s.state == State::Running) {
            let Some(up) = hub.upstream(&s.id) else {
                continue;
            };
            match last_activity(&up, &s.user).await {
                Ok(Some(last)) => {
                    let idle = (Utc::now() - last).to_std().unwrap_or_default();
                    if idle >= limit {
                        cull(&hub, s, last, limit).await;
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(session = s.id, "asking its server's activity: {e:#}"),
            }
        }
    }
}

/// When the session's server was last active; None while a kernel is busy.
async fn last_activity(
    up: &Arc<proxy::Upstream>,
    user: &str,
) -> anyhow::Result<Option<DateTime<Utc>>> {
    let ask = |what: &str| {
        let path = format!("/user/{user}/api/{what}?no_track_activity=1");
        async move {
            tokio::time::timeout(ASK, proxy::get_json(up, &path))
                .await
                .with_context(|| format!("{path}: no answer within {ASK:?}"))?
        }
    };
    let kernels = ask("kernels").await?;
    let busy = kernels.as_array().is_some_and(|ks| {
        ks.iter()
            .any(|k| matches!(k["execution_state"].as_str(), Some("busy" | "starting")))
    });
    if busy {
        return Ok(None);
    }
    let status = ask("status").await?;
    let last = status["last_activity"]
        .as_str()
        .context("/api/status says no last_activity")?;
    Ok(Some(
        DateTime::parse_from_rfc3339(last)?.with_timezone(&Utc),
    ))
}

/// Ends an idle session: its job cancelled as its user, the reason on its
/// card and in the audit table.
async fn cull(hub: &Hub, s: &Session, last: DateTime<Utc>, limit: Duration) {
    let Some(job) = &s.job_id else {
        return;
    };
    if let Err(e) = jobs::cancel(hub, &s.user, job).await {
        tracing::warn!(
            session = s.id,
            "the idle culler could not cancel job {job}: {e}"
        );
        return;
    }
    let why = format!(
        "idle: no activity in JupyterLab for {} (since {}), so the hub ended it",
        crate::pages::human(limit.as_secs()),
        crate::pages::short_time(last.into())
    );
    if let Err(e) = hub.db.update(
        &s.id,
        &Update {
            ended_why: Some(why),
            ..Default::default()
        },
    ) {
        tracing::error!(session = s.id, "recording why the culler ended it: {e:#}");
    }
    hub.db.audit(
        &s.user,
        "culled",
        &format!("session {} job {job}: no activity since {last}", s.id),
    );
}
