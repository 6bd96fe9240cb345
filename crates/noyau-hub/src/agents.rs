//! The sessions' agents on the link: which session each serves, and the
//! one-time tokens they dial with.
//!
//! A session's first token is HMAC(key, "link:" + session), in its job's
//! environment, where whoever reads that environment (the scheduler's spool,
//! root on the node, accounting's stored job environment) finds it too. So
//! a token works once: the listener forgets it when an agent dials with it, and the hub then gives
//! that agent, over the link, the token of its next dial (generation n+1,
//! HMAC(key, "link:SESSION:n")), recorded in the database so that a
//! restarted hub accepts it. The agent acknowledges it; until then the
//! database keeps the token it used too, so that a hub restarting right
//! after handing out a token does not lock out an agent that never got it.
//! Within one hub process a used token never works again.

use std::sync::Arc;
use std::time::Duration;

use noyau_link::tunnel::{Delivered, Tunnel};
use noyau_link::{Incoming, LinkEvent, LinkListener};

use crate::db::{State, Update};
use crate::{auth, proxy, Hub};

/// How long an agent gets to say which session it serves.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

impl Hub {
    /// The link token of generation `gen` of a session's agent.
    pub(crate) fn link_token_gen(&self, session: &str, gen: i64) -> String {
        if gen == 0 {
            self.link_token(session)
        } else {
            self.mac(&format!("link:{session}:{gen}"))
        }
    }

    /// At start: lets the listener accept what the live sessions' agents
    /// may dial with (those from before a restart dial again), and shows
    /// `running` sessions as `starting` until their agent is back. Returns
    /// the number of live sessions.
    pub(crate) fn admit_agents(&self) -> anyhow::Result<usize> {
        let live = self.db.live_sessions()?;
        for s in &live {
            let (gen, next) = self.db.link_gens(&s.id)?;
            for g in std::iter::once(gen).chain(next) {
                self.tokens.add(&self.link_token_gen(&s.id, g));
            }
            if s.state == State::Running {
                self.db.update(
                    &s.id,
                    &Update {
                        state: Some(State::Starting),
                        ..Default::default()
                    },
                )?;
            }
        }
        Ok(live.len())
    }
}

pub(crate) async fn accept(hub: Arc<Hub>, mut listener: LinkListener) {
    loop {
        match listener.accept().await {
            Ok(link) => {
                tokio::spawn(serve(hub.clone(), link));
            }
            Err(e) => {
                tracing::error!("the link listener stopped: {e}");
                return;
            }
        }
    }
}

/// The agent's hello: `{"hello": session, "token": …}`.
async fn hello(link: &mut noyau_link::Link, tunnel: &Tunnel) -> Option<serde_json::Value> {
    tokio::time::timeout(HELLO_TIMEOUT, async {
        loop {
            match link.recv().await? {
                Incoming::Message(_, frames) => {
                    if let Delivered::Notice(v) = tunnel.deliver(&frames) {
                        return Some(v);
                    }
                }
                Incoming::Event(_) => {}
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Checks the hello's token against the session's; on success retires the
/// session's other token and hands the agent the one for its next dial.
/// Returns the session's owner and the generation handed out.
fn admit(hub: &Hub, tunnel: &Tunnel, session: &str, token: &str) -> Option<(String, i64)> {
    let owner = hub
        .db
        .session(session)
        .ok()
        .flatten()
        .filter(|s| s.state != State::Ended)?
        .user;
    let (gen, next) = hub.db.link_gens(session).ok()?;
    let valid: Vec<i64> = std::iter::once(gen).chain(next).collect();
    let used = valid
        .iter()
        .copied()
        .find(|&g| auth::ct_eq(hub.link_token_gen(session, g).as_bytes(), token.as_bytes()))?;
    // One agent per session: the other token this agent could have used
    // is void now.
    for &g in valid.iter().filter(|&&g| g != used) {
        hub.tokens.revoke(&hub.link_token_gen(session, g));
    }
    let fresh = valid.iter().max().copied().unwrap_or(used) + 1;
    if let Err(e) = hub.db.set_link_gens(session, used, Some(fresh)) {
        tracing::error!(session, "recording the agent's next link token: {e:#}");
        return None;
    }
    let next_token = hub.link_token_gen(session, fresh);
    hub.tokens.add(&next_token);
    if tunnel
        .notice(&serde_json::json!({ "next_token": next_token }))
        .is_err()
    {
        return None;
    }
    Some((owner, fresh))
}

/// One agent: checks which session it serves, then feeds its tunnel.
async fn serve(hub: Arc<Hub>, mut link: noyau_link::Link) {
    let tunnel = Tunnel::new(link.sender());
    let Some(hello) = hello(&mut link, &tunnel).await else {
        tracing::warn!("an agent connected but never said which session it serves");
        return;
    };
    let session = hello["hello"].as_str().unwrap_or_default().to_string();
    let token = hello["token"].as_str().unwrap_or_default();
    let Some((owner, fresh)) = admit(&hub, &tunnel, &session, token) else {
        tracing::warn!(
            session,
            "refused an agent: unknown or ended session, or a token not (or no longer) its own"
        );
        hub.db
            .audit("-", "agent-refused", &format!("session {session}"));
        return;
    };
    tunnel.set_peer_credit(hello["credit"] == true);
    tracing::info!(session, host = hello["host"].as_str(), "agent connected");
    let upstream = proxy::Upstream::new(owner.clone(), tunnel.clone());
    hub.upstreams
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(session.clone(), upstream.clone());
    let _ = hub.db.update(
        &session,
        &Update {
            state: Some(State::Running),
            ..Default::default()
        },
    );
    hub.db.audit(&owner, "running", &session);
    while let Some(m) = link.recv().await {
        match m {
            Incoming::Message(_, frames) => {
                if let Delivered::Notice(v) = tunnel.deliver(&frames) {
                    notice(&hub, &session, fresh, &v);
                }
            }
            Incoming::Event(LinkEvent::Closed(reason)) => {
                tracing::info!(session, "agent link closed: {reason}");
                break;
            }
            Incoming::Event(_) => {}
        }
    }
    let mut upstreams = hub.upstreams.lock().unwrap_or_else(|e| e.into_inner());
    if upstreams
        .get(&session)
        .is_some_and(|u| Arc::ptr_eq(u, &upstream))
    {
        upstreams.remove(&session);
    }
}

/// What a connected agent tells the hub.
fn notice(hub: &Hub, session: &str, fresh: i64, v: &serde_json::Value) {
    if let Some(why) = v["ended"].as_str() {
        let _ = hub.db.update(
            session,
            &Update {
                ended_why: Some(why.into()),
                ..Default::default()
            },
        );
    }
    // The agent holds its next token: the one it used is forgotten.
    if v["next_token_ack"] == true {
        if let Err(e) = hub.db.set_link_gens(session, fresh, None) {
            tracing::error!(session, "recording the agent's link token: {e:#}");
        }
    }
}
