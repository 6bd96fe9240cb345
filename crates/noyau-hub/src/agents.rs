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
//! Within one hub process a used token never works again, and the token in
//! an agent's hello must be the one it dialled with.
//!
//! The agent runs in the user's job, so whoever holds the job's token can
//! run an agent of their own making: the hub holds it to the tunnel's
//! limits (flow control on every stream, frames of at most
//! [`tunnel::MAX_FRAME`], notices of at most [`tunnel::MAX_NOTICE`], a
//! bounded backlog), closes its link when it breaks them, acts on each
//! kind of notice once per link, and bounds what it stores of them.

use std::sync::Arc;
use std::time::Duration;

use noyau_link::tunnel::{self, Delivered, Tunnel};
use noyau_link::{Incoming, Link, LinkConfig, LinkEvent, LinkListener};

use crate::db::{Session, State, Update};
use crate::{auth, proxy, Hub};

/// How long an agent gets to say which session it serves.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Most characters of the reason an agent gives for its server's end (stored,
/// and shown on the owner's cards and the admin page).
const ENDED_MAX: usize = 1024;

/// The hub's link listener's settings: agents come back within two
/// minutes of a break; a link carries only a tunnel, so its frames are
/// small; and what waits to go to an agent is bounded below the default
/// (an agent that grants credit and never acknowledges would otherwise
/// hold 256 MiB of its user's uploads in the hub: past the limit a
/// stream's send fails and the stream is reset).
pub(crate) fn link_config() -> LinkConfig {
    LinkConfig {
        give_up_after: Duration::from_secs(120),
        max_frame: tunnel::MAX_FRAME,
        buffer_limit: 64 * 1024 * 1024,
        ..LinkConfig::default()
    }
}

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
            // An agent that never connected: its first token waits for
            // the job to leave the queue (`jobs::follow`).
            if (gen, next) != (0, None) {
                for g in std::iter::once(gen).chain(next) {
                    self.tokens.add(&self.link_token_gen(&s.id, g));
                }
            } else {
                self.tokens.expect(&self.link_token(&s.id));
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

impl Hub {
    /// Lets the listener take a session's first link token (the one in its
    /// job's environment) if no agent has used it yet. Called once the
    /// scheduler no longer says the job waits ([`first_token_due`]): the
    /// job's environment is kept by the scheduler (and shown to its
    /// operators) from submission, but no agent can run before the job
    /// does, so the token opens nothing while the job is queued.
    pub(crate) fn admit_first_token(&self, session: &str) -> anyhow::Result<()> {
        if self.db.link_gens(session)? == (0, None) {
            self.tokens.add(&self.link_token(session));
        }
        Ok(())
    }

    /// Takes back a session's first link token if no agent has used it:
    /// its job is said to wait again (the scheduler could not say before).
    pub(crate) fn revoke_first_token(&self, session: &str) -> anyhow::Result<()> {
        if self.db.link_gens(session)? == (0, None) {
            self.tokens.revoke(&self.link_token(session));
        }
        Ok(())
    }
}

/// Whether a session's first link token is due, by what the scheduler says
/// of its job: once it runs; also when the scheduler cannot say (a
/// listing failing while the job starts must not keep its agent out until
/// the agent gives up, `NOYAU_LINK_GIVE_UP`). Not while it waits, nor
/// once it ended.
pub(crate) fn first_token_due(state: &noyau_sched::JobState) -> bool {
    use noyau_sched::JobState;
    matches!(state, JobState::Running { .. } | JobState::Unknown { .. })
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

/// The agent's hello: `{"hello": session, "token": …, "credit": true}`.
async fn hello(link: &mut Link, tunnel: &Tunnel) -> Option<serde_json::Value> {
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

/// The session a hello names and the token it shows, once the hello passes
/// what needs no database: the agent grants credit (flow control is not the
/// agent's to turn off: the agent shipped with this hub always says so),
/// and its token is the one it dialled with.
fn read_hello<'a>(
    link: &Link,
    hello: &'a serde_json::Value,
) -> Result<(&'a str, &'a str), &'static str> {
    let session = hello["hello"].as_str().unwrap_or_default();
    let token = hello["token"].as_str().unwrap_or_default();
    if hello["credit"] != true {
        return Err("its hello does not grant flow-control credit (an agent older than this hub?): relaunch the session so that its job runs this hub's noyau");
    }
    if !link.dialled_with(token) {
        return Err("the token in its hello is not the one it dialled with");
    }
    Ok((session, token))
}

/// Checks the hello's token against the session's; on success retires the
/// session's other token and hands the agent the one for its next dial.
/// Returns the session (as it was before) and the generation handed out.
fn admit(hub: &Hub, tunnel: &Tunnel, session: &str, token: &str) -> Option<(Session, i64)> {
    let s = hub
        .db
        .session(session)
        .ok()
        .flatten()
        .filter(|s| s.state != State::Ended)?;
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
    Some((s, fresh))
}

/// Whether a session's card turns Running when its agent connects: if
/// the scheduler has said the job runs, and on which node (Starting, or
/// Running before a restart of the hub). An agent can dial before the
/// hub's next listing of the scheduler has seen its job start; the card
/// then stays Queued until that listing, which makes it Running with its
/// node ([`crate::jobs`] sees the agent connected; if the listing cannot
/// say, with the node the agent's hello named), so no card says Running
/// without saying where.
fn said_running(s: &Session) -> bool {
    matches!(s.state, State::Starting | State::Running)
        && s.node.as_deref().is_some_and(|n| !n.is_empty())
}

/// The node an agent's hello names, fit for a card (it is the job's
/// owner's to write): cleaned, bounded, and none if empty.
fn hello_node(hello: &serde_json::Value) -> Option<String> {
    let host = hello["host"].as_str()?;
    Some(crate::text::clean(host, 255, crate::text::Unsafe::Strip)).filter(|h| !h.is_empty())
}

/// One agent: checks which session it serves, then feeds its tunnel.
async fn serve(hub: Arc<Hub>, mut link: Link) {
    let tunnel = Tunnel::new(link.sender());
    let Some(hello) = hello(&mut link, &tunnel).await else {
        tracing::warn!("an agent connected but never said which session it serves");
        return;
    };
    let (session, token) = match read_hello(&link, &hello) {
        Ok((s, t)) => (s.to_string(), t),
        Err(why) => {
            let session = hello["hello"].as_str().unwrap_or_default();
            tracing::warn!(session, "refused an agent: {why}");
            hub.db
                .audit("-", "agent-refused", &format!("session {session}: {why}"));
            return;
        }
    };
    let Some((s, fresh)) = admit(&hub, &tunnel, &session, token) else {
        tracing::warn!(
            session,
            "refused an agent: unknown or ended session, or a token not (or no longer) its own"
        );
        hub.db
            .audit("-", "agent-refused", &format!("session {session}"));
        return;
    };
    tracing::info!(session, host = hello["host"].as_str(), "agent connected");
    let owner = s.user.clone();
    let upstream = proxy::Upstream::new(owner.clone(), hello_node(&hello), tunnel.clone());
    hub.upstreams
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(session.clone(), upstream.clone());
    if said_running(&s) {
        let running = Update {
            state: Some(State::Running),
            ..Default::default()
        };
        let _ = hub.db.update(&session, &running);
    }
    hub.db.audit(&owner, "running", &session);
    let mut seen = Seen::default();
    while let Some(m) = link.recv().await {
        match m {
            Incoming::Message(_, frames) => match tunnel.deliver(&frames) {
                Delivered::Notice(v) => notice(&hub, &session, fresh, seen.news(&v)),
                Delivered::Violation(why) => {
                    tracing::warn!(session, "closing the agent's link: {why}");
                    hub.db
                        .audit(&owner, "agent-closed", &format!("session {session}: {why}"));
                    break;
                }
                // Streams are the hub's to open; a malformed message is
                // dropped.
                Delivered::Handled | Delivered::Opened { .. } | Delivered::Malformed => {}
            },
            Incoming::Event(LinkEvent::Closed(reason)) => {
                tracing::info!(session, "agent link closed: {reason}");
                break;
            }
            Incoming::Event(_) => {}
        }
    }
    {
        let mut upstreams = hub.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        if upstreams
            .get(&session)
            .is_some_and(|u| Arc::ptr_eq(u, &upstream))
        {
            upstreams.remove(&session);
        }
    }
    // Requests still on the tunnel end now rather than wait for an agent
    // that is gone (or was cut off); dropping the link closes it.
    tunnel.reset_all();
}

/// What an agent told the hub on this link so far. Each notice the hub
/// acts on costs it a database write, and an agent has one thing to say of
/// each kind per link: repeats are dropped, so that an agent cannot keep
/// the hub busy writing (and its link's backlog full) with them.
#[derive(Default)]
struct Seen {
    ended: bool,
    acked: bool,
}

/// What a notice says that the hub has not heard on this link.
#[derive(Debug, Default, PartialEq)]
struct News<'a> {
    ended: Option<&'a str>,
    acked: bool,
}

impl Seen {
    fn news<'a>(&mut self, v: &'a serde_json::Value) -> News<'a> {
        let ended = v["ended"].as_str().filter(|_| !self.ended);
        let acked = v["next_token_ack"] == true && !self.acked;
        self.ended |= ended.is_some();
        self.acked |= acked;
        News { ended, acked }
    }
}

/// What a connected agent tells the hub.
fn notice(hub: &Hub, session: &str, fresh: i64, news: News) {
    if let Some(why) = news.ended {
        let _ = hub.db.update(
            session,
            &Update {
                ended_why: Some(ended_why(why)),
                ..Default::default()
            },
        );
    }
    // The agent holds its next token: the one it used is forgotten.
    if news.acked {
        if let Err(e) = hub.db.set_link_gens(session, fresh, None) {
            tracing::error!(session, "recording the agent's link token: {e:#}");
        }
    }
}

/// The agent's reason for its server's end, as stored and shown on the
/// owner's cards and the admin page: without control characters nor
/// bidirectional overrides, and at most [`ENDED_MAX`] characters.
fn ended_why(why: &str) -> String {
    crate::text::clean(why, ENDED_MAX, crate::text::Unsafe::Strip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use noyau_link::ServerIdentity;

    /// The hub's end of a real link, and the token its agent dialled with.
    async fn dialled() -> (Link, Link, String) {
        let id = ServerIdentity::generate(&["localhost".into()]).unwrap();
        let mut l = LinkListener::bind("127.0.0.1:0".parse().unwrap(), id, link_config())
            .await
            .unwrap();
        let token = l.issue_token();
        let (addr, pin) = (l.local_addr().to_string(), l.pin());
        let (agent, hub) = tokio::join!(
            noyau_link::dial(&addr, &pin, &token, LinkConfig::default()),
            l.accept()
        );
        (agent.unwrap(), hub.unwrap(), token)
    }

    /// An agent in the user's job may be the user's own program: it cannot
    /// turn off flow control by leaving `credit` out of its hello, nor show
    /// in its hello a token other than the one it dialled with (another
    /// session's, read from that job's environment).
    #[tokio::test]
    async fn a_hello_must_grant_credit_and_show_the_token_it_dialled_with() {
        let (_agent, hub, token) = dialled().await;
        let good = serde_json::json!({"hello": "s1", "token": token, "credit": true});
        assert_eq!(read_hello(&hub, &good), Ok(("s1", token.as_str())));
        for credit in [serde_json::json!(false), serde_json::json!("true")] {
            let h = serde_json::json!({"hello": "s1", "token": token, "credit": credit});
            let e = read_hello(&hub, &h).unwrap_err();
            assert!(
                e.contains("flow-control credit") && e.contains("relaunch"),
                "{e}"
            );
        }
        let no_credit = serde_json::json!({"hello": "s1", "token": token});
        assert!(read_hello(&hub, &no_credit).is_err());
        let other = "b".repeat(64);
        let h = serde_json::json!({"hello": "s2", "token": other, "credit": true});
        let e = read_hello(&hub, &h).unwrap_err();
        assert!(e.contains("not the one it dialled with"), "{e}");
    }

    /// An agent repeating its notices gets no more database writes.
    #[test]
    fn an_agent_is_heard_once_per_kind_of_notice() {
        let mut seen = Seen::default();
        let ended = serde_json::json!({"ended": "exited"});
        let ack = serde_json::json!({"next_token_ack": true});
        assert_eq!(
            seen.news(&ack),
            News {
                ended: None,
                acked: true
            }
        );
        assert_eq!(
            seen.news(&ended),
            News {
                ended: Some("exited"),
                acked: false
            }
        );
        for _ in 0..3 {
            assert_eq!(seen.news(&ended), News::default());
            assert_eq!(seen.news(&ack), News::default());
        }
    }

    #[test]
    fn an_agents_ended_reason_is_bounded_and_has_no_control_characters() {
        assert_eq!(
            ended_why("the Jupyter server exited with status 1"),
            "the Jupyter server exited with status 1"
        );
        assert_eq!(ended_why("a\nb\r\u{1b}[31mc\u{7f}\u{85}d"), "ab[31mcd");
        // Nor bidi overrides: "cancelled \u{202e}tixe" would read "exit".
        assert_eq!(
            ended_why("x\u{202a}\u{202e}y\u{2066}\u{2069}z\u{200f}"),
            "xyz"
        );
        let long = "é".repeat(4000);
        let cut = ended_why(&long);
        assert_eq!(cut.chars().count(), ENDED_MAX + 1, "{}", cut.len());
        assert!(cut.starts_with('é') && cut.ends_with('…'));
    }

    #[test]
    fn an_agent_makes_its_card_running_only_once_the_scheduler_said_where() {
        let choice = crate::db::Choice {
            profile: "p".into(),
            partition: "q".into(),
            cores: 1,
            mem_gb: 0,
            gpus: 0,
            minutes: 10,
        };
        let mut s = Session::submitting("s1".into(), "alice".into(), choice);
        // Submitted, or queued in the hub's last listing: the agent came
        // first; the next listing makes the card Running, with its node.
        assert_eq!(s.state, State::Queued);
        assert!(!said_running(&s));
        s.node = Some("n1".into());
        for state in [State::Starting, State::Running] {
            s.state = state;
            assert!(said_running(&s), "{state:?}");
        }
        // A node with no name is none.
        s.node = Some(String::new());
        assert!(!said_running(&s));
        // A job queued again (requeued) with its old node: not running.
        s.node = Some("n1".into());
        s.state = State::Queued;
        assert!(!said_running(&s));
        // The hello's node, as a card may show it.
        let node = |h: serde_json::Value| hello_node(&serde_json::json!({ "host": h }));
        assert_eq!(node("n1\u{202e}\n".into()), Some("n1".into()));
        assert_eq!(node("\u{1b}".into()), None);
        assert_eq!(node(serde_json::Value::Null), None);
    }

    #[test]
    fn the_first_token_is_due_once_the_job_left_the_queue() {
        use noyau_sched::{JobEnd, JobState};
        let pending = JobState::Pending {
            reason: "Resources".into(),
            start: None,
            partition: None,
        };
        let running = JobState::Running {
            node: "n1".into(),
            ends_at: None,
        };
        let unknown = JobState::Unknown {
            why: "squeue failed".into(),
        };
        let ended = JobState::Ended(JobEnd {
            description: "cancelled".into(),
            success: false,
        });
        assert!(!first_token_due(&pending) && !first_token_due(&ended));
        assert!(first_token_due(&running) && first_token_due(&unknown));
    }
}
