//! `noyau hub`: JupyterLab in batch jobs, served to a centre's users from
//! one web page, as JupyterHub with batchspawner or Open OnDemand do.
//!
//! How the pieces fit:
//!
//! * [`config`]: `hub.toml`, the spawn form's profiles and their limits.
//! * [`db`]: SQLite state (users and their last choices, logins, sessions,
//!   audit log), so a restarted hub lists every session it had.
//! * [`auth`]: PAM or a trusted SSO header; HttpOnly cookies; CSRF tokens.
//! * [`jobs`]: the sessions' jobs through noyau-sched's scheduler handle:
//!   submitted and cancelled as the user (through `submit_as`, e.g.
//!   `runuser`), followed by the one watcher (one listing call per interval
//!   for every user's sessions), free resources per partition.
//! * The link: each job runs `noyau agent --serve lab`, which starts
//!   JupyterLab on a unix socket in a 0700 directory and dials the hub's
//!   link listener (nothing listens on the compute node). Its token is an
//!   HMAC of the session id under the hub's key, so a restarted hub can
//!   accept the agents of the sessions it still lists.
//! * [`proxy`]: `/user/NAME/…` to that socket over the link's tunnel, for
//!   NAME only.
//! * [`pages`]: the HTML.

// Handlers refuse with a ready `Response` (`Err(page)`), returned as is;
// boxing it would only add an allocation to the refusal path.
#![allow(clippy::result_large_err)]

pub mod auth;
pub mod config;
pub mod db;
pub mod jobs;
pub mod pages;
pub mod proxy;

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Form, Path as UrlPath, Query, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use noyau_link::tunnel::{Delivered, Tunnel};
use noyau_link::{Incoming, LinkConfig, LinkEvent, LinkListener, ServerIdentity};
use serde::Deserialize;

use crate::auth::{cookie, random_hex, sha256_hex, Who, LOGIN_COOKIE, LOGIN_SECS, PRE_COOKIE};
use crate::config::{Auth, HubConfig};
use crate::db::{now, Choice, Db, Session, State, Update};

/// How long an agent gets to say which session it serves.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Hub {
    pub cfg: HubConfig,
    pub db: Db,
    key: Vec<u8>,
    pin: String,
    link_advertise: String,
    agent_exe: PathBuf,
    tokens: noyau_link::Tokens,
    /// The connected sessions' servers, by session id.
    upstreams: Mutex<HashMap<String, Arc<proxy::Upstream>>>,
    /// The batch scheduler, following every user's sessions.
    pub sched: noyau_sched::Scheduler,
    sinfo_cache: tokio::sync::Mutex<Option<(Instant, Vec<noyau_sched::PartitionLoad>)>>,
}

impl Hub {
    /// The link token of a session's agent.
    fn link_token(&self, session: &str) -> String {
        self.mac(&format!("link:{session}"))
    }

    pub fn upstream(&self, session: &str) -> Option<Arc<proxy::Upstream>> {
        self.upstreams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(session)
            .cloned()
    }

    fn drop_upstream(&self, session: &str) {
        self.upstreams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(session);
    }

    /// `user`'s running session's server (one live session per user),
    /// found without the database: this is on every proxied request.
    fn user_upstream(&self, user: &str) -> Option<Arc<proxy::Upstream>> {
        self.upstreams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|u| u.user == user)
            .cloned()
    }
}

/// Reads a 0600 file, or creates it with `make()`.
fn private_file(
    path: &Path,
    make: impl FnOnce() -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => {
            let mode = std::fs::metadata(path)?.permissions().mode();
            anyhow::ensure!(
                mode & 0o077 == 0,
                "{} has mode {:o}; it must be 0600",
                path.display(),
                mode & 0o777
            );
            Ok(b)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let b = make()?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            std::io::Write::write_all(&mut f, &b)?;
            Ok(b)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Runs the hub until it is killed.
pub async fn run(config: PathBuf) -> anyhow::Result<()> {
    let cfg = HubConfig::load(&config)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.state_dir)
        .with_context(|| {
            format!(
                "cannot create the state directory {}",
                cfg.state_dir.display()
            )
        })?;
    let key = private_file(&cfg.state_dir.join("hub.key"), || {
        Ok(rand::random::<[u8; 32]>().to_vec())
    })?;
    // The same certificate across restarts: running agents keep its pin.
    let identity: ServerIdentity = serde_json::from_slice(&private_file(
        &cfg.state_dir.join("link-identity.json"),
        || {
            Ok(serde_json::to_vec(&ServerIdentity::generate(&[
                hostname(),
            ])?)?)
        },
    )?)
    .context(
        "the hub's link identity file is damaged; remove it (running sessions will then be lost)",
    )?;
    let db = Db::open(&cfg.state_dir.join("hub.sqlite"))?;
    let link_cfg = LinkConfig {
        give_up_after: Duration::from_secs(120),
        ..LinkConfig::default()
    };
    let listener = LinkListener::bind(cfg.link_bind, identity, link_cfg)
        .await
        .context("the hub's link listener (link_bind)")?;
    let link_advertise = cfg
        .link_advertise
        .clone()
        .unwrap_or_else(|| format!("{}:{}", hostname(), listener.local_addr().port()));
    let agent_exe = match &cfg.agent {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("cannot find the noyau binary; set `agent` in hub.toml")?,
    };
    let sched = jobs::scheduler(&cfg)?;
    let hub = Arc::new(Hub {
        sched,
        pin: listener.pin(),
        tokens: listener.tokens(),
        cfg,
        db,
        key,
        link_advertise,
        agent_exe,
        upstreams: Mutex::new(HashMap::new()),
        sinfo_cache: tokio::sync::Mutex::new(None),
    });
    // Agents of sessions from before a restart dial again with their token.
    let live = hub.db.live_sessions()?;
    for s in &live {
        hub.tokens.add(&hub.link_token(&s.id));
        if s.state == State::Running {
            hub.db.update(
                &s.id,
                &Update {
                    state: Some(State::Starting),
                    ..Default::default()
                },
            )?;
        }
    }
    tracing::info!(sessions = live.len(), "hub state loaded");
    tokio::spawn(accept_agents(hub.clone(), listener));
    tokio::spawn(jobs::follow(hub.clone()));
    let app = Router::new()
        .route("/", get(|| async { pages::redirect("/hub/home") }))
        .route("/hub/login", get(login_page).post(login))
        .route("/hub/logout", post(logout))
        .route("/hub/home", get(home))
        .route("/hub/cards", get(cards))
        .route("/hub/spawn", post(spawn))
        .route("/hub/sessions/{id}/cancel", post(cancel))
        .route("/hub/sessions/{id}/relaunch", post(relaunch))
        .route("/hub/api/sessions", get(api_sessions))
        .route("/hub/admin", get(admin))
        .route("/user/{*rest}", any(proxy::user_route))
        .with_state(hub.clone());
    let tcp = tokio::net::TcpListener::bind(hub.cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", hub.cfg.listen))?;
    eprintln!(
        "noyau hub: listening on http://{} (agents dial {})",
        tcp.local_addr()?,
        hub.link_advertise
    );
    // Responses go out as headers then body: without NODELAY, Nagle and
    // the client's delayed ACK add 40 ms to every proxied request.
    let tcp = axum::serve::ListenerExt::tap_io(tcp, |t| {
        if let Err(e) = t.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
    });
    axum::serve(tcp, app)
        .await
        .context("the web server stopped")
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into())
}

async fn accept_agents(hub: Arc<Hub>, mut listener: LinkListener) {
    loop {
        match listener.accept().await {
            Ok(link) => {
                tokio::spawn(serve_agent(hub.clone(), link));
            }
            Err(e) => {
                tracing::error!("the link listener stopped: {e}");
                return;
            }
        }
    }
}

/// One agent: checks which session it serves, then feeds its tunnel.
async fn serve_agent(hub: Arc<Hub>, mut link: noyau_link::Link) {
    let tunnel = Tunnel::new(link.sender());
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
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
    .flatten();
    let Some(hello) = hello else {
        tracing::warn!("an agent connected but never said which session it serves");
        return;
    };
    let session = hello["hello"].as_str().unwrap_or_default().to_string();
    let token = hello["token"].as_str().unwrap_or_default();
    let known = hub
        .db
        .session(&session)
        .ok()
        .flatten()
        .filter(|s| s.state != State::Ended);
    if known.is_none() || !auth::ct_eq(hub.link_token(&session).as_bytes(), token.as_bytes()) {
        tracing::warn!(
            session,
            "refused an agent: unknown or ended session, or wrong token"
        );
        return;
    }
    // Its next dial (after a hub restart or a long outage) needs the token again.
    hub.tokens.add(token);
    tunnel.set_peer_credit(hello["credit"] == true);
    tracing::info!(session, host = hello["host"].as_str(), "agent connected");
    let Some(owner) = known.as_ref().map(|s| s.user.clone()) else {
        return;
    };
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
                    if let Some(why) = v["ended"].as_str() {
                        let _ = hub.db.update(
                            &session,
                            &Update {
                                ended_why: Some(why.into()),
                                ..Default::default()
                            },
                        );
                    }
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

fn need_login(hub: &Hub, headers: &HeaderMap) -> Result<Who, Response> {
    hub.who(headers).ok_or_else(|| match hub.cfg.auth {
        Auth::Pam => pages::redirect("/hub/login"),
        Auth::Header => pages::error(
            StatusCode::UNAUTHORIZED,
            &format!(
                "This hub expects its SSO proxy to set the {} header.",
                hub.cfg.auth_header
            ),
        ),
    })
}

fn csrf_checked(hub: &Hub, headers: &HeaderMap, token: &str) -> Result<Who, Response> {
    let who = need_login(hub, headers)?;
    if !hub.csrf_ok(&who, token) {
        return Err(pages::error(
            StatusCode::FORBIDDEN,
            "The form's security token is missing or stale: reload the page and try again.",
        ));
    }
    Ok(who)
}

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

/// Only local paths: the login form must not become an open redirect.
fn safe_next(next: Option<&str>) -> String {
    next.filter(|n| n.starts_with('/') && !n.starts_with("//") && !n.contains('\\'))
        .unwrap_or("/hub/home")
        .to_string()
}

async fn login_page(
    AxState(hub): AxState<Arc<Hub>>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Response {
    if hub.who(&headers).is_some() || hub.cfg.auth == Auth::Header {
        return pages::redirect(&safe_next(q.next.as_deref()));
    }
    login_form(&hub, &headers, q.next.as_deref(), None, StatusCode::OK)
}

fn login_form(
    hub: &Hub,
    headers: &HeaderMap,
    next: Option<&str>,
    msg: Option<&str>,
    status: StatusCode,
) -> Response {
    let pre = cookie(headers, PRE_COOKIE)
        .filter(|p| p.len() == 64)
        .unwrap_or_else(random_hex);
    (
        status,
        [(header::SET_COOKIE, hub.set_cookie(PRE_COOKIE, &pre, 3600))],
        pages::login(&hub.login_csrf(&pre), &safe_next(next), msg),
    )
        .into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
    #[serde(rename = "_csrf")]
    csrf: String,
    next: Option<String>,
}

async fn login(
    AxState(hub): AxState<Arc<Hub>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if hub.cfg.auth != Auth::Pam {
        return pages::error(
            StatusCode::NOT_FOUND,
            "This hub logs users in through its SSO proxy.",
        );
    }
    let pre = cookie(&headers, PRE_COOKIE).unwrap_or_default();
    if pre.is_empty() || !auth::ct_eq(hub.login_csrf(&pre).as_bytes(), f.csrf.as_bytes()) {
        return login_form(
            &hub,
            &headers,
            f.next.as_deref(),
            Some("The form expired: please log in again."),
            StatusCode::FORBIDDEN,
        );
    }
    let user = f.user.trim().to_string();
    let ok = if auth::valid_user_name(&user) {
        let (service, u) = (hub.cfg.pam_service.clone(), user.clone());
        tokio::task::spawn_blocking(move || auth::pam_check(&service, &u, &f.password))
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
    } else {
        Err("not a valid user name".into())
    };
    if let Err(why) = ok {
        hub.db.audit(&user, "login-failed", &why);
        return login_form(
            &hub,
            &headers,
            f.next.as_deref(),
            Some("Wrong user name or password."),
            StatusCode::UNAUTHORIZED,
        );
    }
    let id = random_hex();
    if let Err(e) = hub
        .db
        .add_login(&sha256_hex(&id), &user, now() + LOGIN_SECS)
    {
        tracing::error!("recording a login: {e:#}");
        return pages::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The hub cannot record your login; tell the administrators.",
        );
    }
    hub.db.audit(&user, "login", "pam");
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                hub.set_cookie(LOGIN_COOKIE, &id, LOGIN_SECS),
            ),
            (header::LOCATION, safe_next(f.next.as_deref())),
        ],
    )
        .into_response()
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(rename = "_csrf")]
    csrf: String,
}

async fn logout(
    AxState(hub): AxState<Arc<Hub>>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Result<Response, Response> {
    let who = csrf_checked(&hub, &headers, &f.csrf)?;
    if let Some(c) = cookie(&headers, LOGIN_COOKIE) {
        let _ = hub.db.remove_login(&sha256_hex(&c));
    }
    hub.db.audit(&who.name, "logout", "");
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, hub.set_cookie(LOGIN_COOKIE, "", 0)),
            (header::LOCATION, "/hub/login".to_string()),
        ],
    )
        .into_response())
}

async fn render_home(hub: &Hub, who: &Who, message: Option<&str>, status: StatusCode) -> Response {
    let sessions = hub.db.sessions(Some(&who.name)).unwrap_or_default();
    let last = hub.db.last_choice(&who.name).ok().flatten();
    let loads = jobs::partitions(hub).await;
    let cards = pages::cards(&sessions, who, false);
    (
        status,
        pages::home(&hub.cfg, who, last.as_ref(), &loads, &cards, message),
    )
        .into_response()
}

async fn home(AxState(hub): AxState<Arc<Hub>>, headers: HeaderMap) -> Response {
    match need_login(&hub, &headers) {
        Ok(who) => render_home(&hub, &who, None, StatusCode::OK).await,
        Err(r) => r,
    }
}

async fn cards(AxState(hub): AxState<Arc<Hub>>, headers: HeaderMap) -> Response {
    let Some(who) = hub.who(&headers) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let sessions = hub.db.sessions(Some(&who.name)).unwrap_or_default();
    axum::response::Html(pages::cards(&sessions, &who, false)).into_response()
}

#[derive(Deserialize)]
struct SpawnForm {
    #[serde(rename = "_csrf")]
    csrf: String,
    profile: String,
    partition: String,
    cores: u32,
    mem_gb: u32,
    #[serde(default)]
    gpus: u32,
    minutes: u32,
}

/// The form's values against the profile's limits (the browser's min/max
/// are a convenience; this is the check).
fn check_choice(cfg: &HubConfig, c: &Choice) -> Result<(), String> {
    let p = cfg
        .profiles
        .get(&c.profile)
        .ok_or_else(|| format!("there is no profile {:?}", c.profile))?;
    if !p.partitions.contains(&c.partition) {
        return Err(format!(
            "partition {:?} is not offered by profile {}; choose one of {}",
            c.partition,
            c.profile,
            p.partitions.join(", ")
        ));
    }
    for (what, v, r) in [
        ("cores", c.cores, p.cores),
        ("memory (GB)", c.mem_gb, p.mem_gb),
        ("GPUs", c.gpus, p.gpus),
        ("minutes", c.minutes, p.minutes),
    ] {
        if v < r.min || v > r.max {
            return Err(format!(
                "{what} must be between {} and {} for profile {} (got {v})",
                r.min, r.max, c.profile
            ));
        }
    }
    Ok(())
}

async fn start_session(
    hub: &Arc<Hub>,
    who: &Who,
    choice: Choice,
) -> Result<(), (StatusCode, String)> {
    check_choice(&hub.cfg, &choice).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let live = hub
        .db
        .live_sessions()
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    if live.iter().any(|s| s.user == who.name) {
        return Err((
            StatusCode::CONFLICT,
            "You already have a session: cancel it before starting another.".into(),
        ));
    }
    let s = Session {
        id: random_hex()[..16].to_string(),
        user: who.name.clone(),
        choice,
        job_id: None,
        state: State::Queued,
        reason: Some("submitting".into()),
        start_est: None,
        node: None,
        time_left: None,
        ended_why: None,
        log_path: None,
        created: now(),
    };
    hub.db
        .new_session(&s)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    hub.tokens.add(&hub.link_token(&s.id));
    match jobs::submit(hub, &s).await {
        Ok((job, log)) => {
            let _ = hub.db.set_job(&s.id, &job, &log);
            hub.db.audit(
                &who.name,
                "spawn",
                &format!(
                    "session {} job {job} {}",
                    s.id,
                    serde_json::to_string(&s.choice).unwrap_or_default()
                ),
            );
            Ok(())
        }
        Err(why) => {
            let _ = hub.db.update(
                &s.id,
                &Update {
                    state: Some(State::Ended),
                    ended_why: Some(format!("could not submit the job: {why}")),
                    ..Default::default()
                },
            );
            hub.db.audit(&who.name, "spawn-failed", &why);
            Err((
                StatusCode::BAD_GATEWAY,
                format!("{} refused the job: {why}", hub.sched.display()),
            ))
        }
    }
}

async fn spawn(
    AxState(hub): AxState<Arc<Hub>>,
    headers: HeaderMap,
    Form(f): Form<SpawnForm>,
) -> Result<Response, Response> {
    let who = csrf_checked(&hub, &headers, &f.csrf)?;
    let choice = Choice {
        profile: f.profile,
        partition: f.partition,
        cores: f.cores,
        mem_gb: f.mem_gb,
        gpus: f.gpus,
        minutes: f.minutes,
    };
    Ok(match start_session(&hub, &who, choice).await {
        Ok(()) => pages::redirect("/hub/home"),
        Err((status, msg)) => render_home(&hub, &who, Some(&msg), status).await,
    })
}

/// The session, if `who` may act on it (its owner, or an admin).
fn owned(hub: &Hub, who: &Who, id: &str) -> Result<Session, Response> {
    match hub.db.session(id) {
        Ok(Some(s)) if s.user == who.name || who.admin => Ok(s),
        Ok(Some(_)) => {
            hub.db
                .audit(&who.name, "forbidden", &format!("session {id}"));
            Err(pages::error(
                StatusCode::FORBIDDEN,
                "This session is another user's.",
            ))
        }
        _ => Err(pages::error(
            StatusCode::NOT_FOUND,
            "There is no such session.",
        )),
    }
}

async fn cancel(
    AxState(hub): AxState<Arc<Hub>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, Response> {
    let who = csrf_checked(&hub, &headers, &f.csrf)?;
    let s = owned(&hub, &who, &id)?;
    let why = if s.user == who.name {
        "cancelled".to_string()
    } else {
        format!("cancelled by the administrator {}", who.name)
    };
    if s.state != State::Ended {
        if let Some(job) = &s.job_id {
            if let Err(e) = jobs::cancel(&hub, &s.user, job).await {
                return Err(pages::error(
                    StatusCode::BAD_GATEWAY,
                    &format!("{} did not cancel the job: {e}", hub.sched.display()),
                ));
            }
        }
        let mut u = Update {
            ended_why: Some(why),
            ..Default::default()
        };
        if s.job_id.is_none() {
            u.state = Some(State::Ended);
        }
        let _ = hub.db.update(&id, &u);
        hub.db
            .audit(&who.name, "cancel", &format!("session {id} of {}", s.user));
    }
    let back = headers
        .get(header::REFERER)
        .and_then(|r| r.to_str().ok())
        .filter(|r| r.contains("/hub/admin"))
        .map(|_| "/hub/admin")
        .unwrap_or("/hub/home");
    Ok(pages::redirect(back))
}

async fn relaunch(
    AxState(hub): AxState<Arc<Hub>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, Response> {
    let who = csrf_checked(&hub, &headers, &f.csrf)?;
    let s = owned(&hub, &who, &id)?;
    if s.user != who.name {
        return Err(pages::error(
            StatusCode::FORBIDDEN,
            "Only its owner can relaunch a session.",
        ));
    }
    Ok(match start_session(&hub, &who, s.choice).await {
        Ok(()) => pages::redirect("/hub/home"),
        Err((status, msg)) => render_home(&hub, &who, Some(&msg), status).await,
    })
}

#[derive(Deserialize)]
struct AllQuery {
    #[serde(default)]
    all: bool,
}

async fn api_sessions(
    AxState(hub): AxState<Arc<Hub>>,
    headers: HeaderMap,
    Query(q): Query<AllQuery>,
) -> Response {
    let Some(who) = hub.who(&headers) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    if q.all && !who.admin {
        return StatusCode::FORBIDDEN.into_response();
    }
    let user = (!q.all).then_some(who.name.as_str());
    match hub.db.sessions(user) {
        Ok(s) => axum::Json(serde_json::json!({
            "user": who.name,
            "sessions": s,
            "scheduler_polls": if who.admin { Some(hub.sched.polls()) } else { None },
        }))
        .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
    }
}

async fn admin(AxState(hub): AxState<Arc<Hub>>, headers: HeaderMap) -> Result<Response, Response> {
    let who = need_login(&hub, &headers)?;
    if !who.admin {
        hub.db.audit(&who.name, "forbidden", "/hub/admin");
        return Err(pages::error(
            StatusCode::FORBIDDEN,
            "The admin page is for the hub's administrators.",
        ));
    }
    let sessions = hub.db.sessions(None).unwrap_or_default();
    Ok(pages::admin(&who, &sessions, hub.sched.polls()).into_response())
}
