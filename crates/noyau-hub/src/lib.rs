//! `noyau hub`: JupyterLab in batch jobs, served to a centre's users from
//! one web page, as JupyterHub with batchspawner or Open OnDemand do.
//!
//! How the pieces fit:
//!
//! * [`config`]: `hub.toml`, the spawn form's profiles and their limits.
//! * [`db`]: SQLite state (users and their last choices, logins, sessions,
//!   audit log), so a restarted hub lists every session it had.
//! * [`auth`]: PAM or a trusted SSO header (with the proxy's secret); HttpOnly
//!   cookies; CSRF tokens. [`access`]: who may log in (no root, no system
//!   account, optional allowed users and groups); [`throttle`]: failed
//!   logins per user and per address.
//! * [`pam`]: the system's libpam, opened at run time (never linked).
//! * [`jobs`]: the sessions' jobs through noyau-sched's scheduler handle:
//!   submitted and cancelled as the user (through `submit_as`, e.g.
//!   `runuser`), followed by the one watcher (one listing call per interval
//!   for every user's sessions), free resources per partition.
//! * [`agents`]: each job runs `noyau agent --serve lab`, which starts
//!   JupyterLab on a unix socket in a 0700 directory and dials the hub's
//!   link listener (nothing listens on the compute node). Each of its
//!   tokens works once: the hub gives the agent the next one over the link
//!   and records it, so a restarted hub accepts the agents of the sessions
//!   it still lists.
//! * [`proxy`]: `/user/NAME/…` to that socket over the link's tunnel, for
//!   NAME only.
//! * [`pages`]: the HTML (askama templates, escaped by construction);
//!   [`site`]: the site's name, logo and message of the day, the hub's own
//!   stylesheet and script; [`logs`]: the ended sessions' log tails, read
//!   off the async threads from paths the users control.
//! * [`cull`]: ends sessions whose JupyterLab has been idle for
//!   `idle_timeout`, as JupyterHub's idle culler does.
//! * [`audit`]: `noyau hub audit`, the audit table for people.

// Handlers refuse with a ready `Response` (`Err(page)`), returned as is;
// boxing it would only add an allocation to the refusal path.
#![allow(clippy::result_large_err)]

pub mod access;
mod agents;
pub mod audit;
pub mod auth;
pub mod config;
mod cull;
pub mod db;
pub mod jobs;
pub mod listen;
pub mod logs;
pub mod pages;
pub mod pam;
pub mod proxy;
pub mod site;
/// The shared sanitizer, where the hub first had it (`crate::text::clean`).
use noyau_text as text;
pub mod throttle;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, Form, Path as UrlPath, Query, State as AxState,
};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{AppendHeaders, IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use noyau_link::{LinkListener, ServerIdentity};
use noyau_trust::Expect;
use serde::Deserialize;

use crate::access::Refusal;
use crate::auth::{cookie, random_hex, sha256_hex, Denied, Who, DEVICE_SECS, LOGIN_SECS};
use crate::config::{Auth, HubConfig};
use crate::db::{now, Choice, Db, Session, State, Update};

/// The login form's largest body: a name, a password, a token and a `next`
/// path fit; a flood of megabyte forms does not.
const LOGIN_BODY_MAX: usize = 8 * 1024;
/// How long a login waits for a free PAM slot before a 503.
const PAM_WAIT: Duration = Duration::from_secs(5);

pub struct Hub {
    pub cfg: HubConfig,
    pub site: site::Site,
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
    access: access::Access,
    throttle: throttle::Throttle,
    /// PAM conversations in flight (`pam_in_flight`).
    pam_slots: tokio::sync::Semaphore,
    tails: logs::Tails,
}

impl Hub {
    /// The first link token of a session's agent (in its job's environment).
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

/// The state directory, made 0700 if missing, refused if more open or
/// another account's (followed if a link: the admin may keep it elsewhere);
/// and the database file in it, made 0600 before SQLite opens it (SQLite
/// gives its WAL files the database's mode). Each holds logins, sessions or
/// secrets: the hub's account must own it and no one else may use it.
fn private_state(dir: &Path) -> anyhow::Result<PathBuf> {
    Expect::dir()
        .follow_links()
        .make_dir(dir)
        .context("the hub's state directory")?;
    let db = dir.join("hub.sqlite");
    Expect::file()
        .open_with(
            &db,
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600),
        )
        .context("the hub database")?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let side = dir.join(format!("hub.sqlite{suffix}"));
        match Expect::file().check(&side) {
            Err(e) if !e.is_not_found() => return Err(e).context("the hub database"),
            _ => {}
        }
    }
    Ok(db)
}

/// Reads a 0600 file of the hub's, or creates it with `make()`.
fn private_file(
    path: &Path,
    make: impl FnOnce() -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<Vec<u8>> {
    match Expect::file().open(path) {
        Ok(mut f) => {
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut b)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Ok(b)
        }
        Err(e) if e.is_not_found() => {
            let b = make()?;
            // A new file: never one someone made there meanwhile.
            let mut f = Expect::file().open_with(
                path,
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600),
            )?;
            std::io::Write::write_all(&mut f, &b)?;
            Ok(b)
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs the hub until it is killed.
pub async fn run(config: PathBuf) -> anyhow::Result<()> {
    // First: this takes LISTEN_FDS out of the environment before anything
    // could read it, and the socket systemd passed, made close-on-exec, out
    // of the reach of the commands the hub runs.
    let systemd = listenfd::ListenFd::from_env();
    let cfg = HubConfig::load(&config)?;
    if let Some(warning) = cfg.unix_peer_warning() {
        tracing::warn!("{warning}");
    }
    let web = listen::Web::bind(&cfg.listen, cfg.listen_group.as_deref(), systemd).await?;
    let site = site::Site::load(&cfg).with_context(|| format!("in {}", config.display()))?;
    if cfg.auth == Auth::Pam {
        pam::load().context("auth = \"pam\" in hub.toml")?;
    }
    let db_path = private_state(&cfg.state_dir)?;
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
    let db = Db::open(&db_path)?;
    let listener = LinkListener::bind(cfg.link_bind, identity, agents::link_config())
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
    let throttle =
        throttle::Throttle::new(cfg.login_failures, Duration::from_secs_f64(cfg.login_delay));
    let pam_slots = tokio::sync::Semaphore::new(cfg.pam_in_flight);
    // (before any submission: the pool is sized at the first)
    noyau_sched::set_concurrent_submissions(cfg.concurrent_submissions)?;
    let sched = jobs::scheduler(&cfg)?;
    let access = access::Access::new(&cfg);
    let hub = Arc::new(Hub {
        sched,
        pin: listener.pin(),
        tokens: listener.tokens(),
        cfg,
        site,
        db,
        key,
        link_advertise,
        agent_exe,
        upstreams: Mutex::new(HashMap::new()),
        sinfo_cache: tokio::sync::Mutex::new(None),
        access,
        throttle,
        pam_slots,
        tails: logs::Tails::default(),
    });
    let live = hub.admit_agents()?;
    tracing::info!(sessions = live, "hub state loaded");
    tokio::spawn(agents::accept(hub.clone(), listener));
    tokio::spawn(jobs::follow(hub.clone()));
    if let Some(limit) = hub.cfg.idle_limit() {
        tokio::spawn(cull::run(hub.clone(), limit));
    }
    let app = routes(hub.clone());
    eprintln!(
        "noyau hub: listening on {web} (agents dial {})",
        hub.link_advertise
    );
    // SIGTERM (systemd's stop) ends the serving; the caller's runtime then
    // waits for the submissions under way (`noyau_sched::settled`), whose
    // sessions record their job, rather than killing their commands.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    tokio::select! {
        served = web.serve(app) => served.context("the web server stopped"),
        _ = term.recv() => {
            tracing::info!("terminated: ending once the submissions under way have their answer");
            Ok(())
        }
    }
}

/// The web server's routes; in header mode behind [`auth::gate`].
fn routes(hub: Arc<Hub>) -> Router {
    let app = Router::new()
        .route("/", get(|| async { pages::redirect("/hub/home") }))
        .route("/hub/static/hub.css", get(|| async { site::css() }))
        .route("/hub/static/hub.js", get(|| async { site::js() }))
        .route(
            "/hub/logo",
            get(|AxState(hub): AxState<Arc<Hub>>| async move { hub.site.logo() }),
        )
        .route(
            "/hub/login",
            get(login_page)
                .post(login)
                .layer(DefaultBodyLimit::max(LOGIN_BODY_MAX)),
        )
        .route("/hub/logout", get(logout_page).post(logout))
        .route("/hub/home", get(home))
        .route("/hub/cards", get(cards))
        .route("/hub/spawn", post(spawn))
        .route("/hub/sessions/{id}/cancel", post(cancel))
        .route("/hub/sessions/{id}/relaunch", post(relaunch))
        .route("/hub/api/sessions", get(api_sessions))
        .route("/hub/admin", get(admin))
        .route("/user/{*rest}", any(proxy::user_route))
        .with_state(hub.clone());
    match hub.cfg.auth {
        Auth::Header => app.layer(axum::middleware::from_fn_with_state(hub, auth::gate)),
        Auth::Pam => app,
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into())
}

async fn need_login(hub: &Hub, headers: &HeaderMap) -> Result<Who, Response> {
    hub.identify(headers)
        .await
        .map_err(|d| denied(hub, d, "/hub/login".into()))
}

/// The answer to a request that is nobody's: the login form (at `login`),
/// or a page saying why.
pub(crate) fn denied(hub: &Hub, d: Denied, login: String) -> Response {
    match (d, hub.cfg.auth) {
        (Denied::Refused(r), _) => pages::error(&hub.site, StatusCode::FORBIDDEN, r.message()),
        (Denied::Anonymous, Auth::Pam) => pages::redirect(&login),
        (Denied::Anonymous, Auth::Header) => pages::error(
            &hub.site,
            StatusCode::UNAUTHORIZED,
            &format!(
                "This hub expects its SSO proxy to set the {} header.",
                hub.cfg.auth_header
            ),
        ),
    }
}

async fn csrf_checked(hub: &Hub, headers: &HeaderMap, token: &str) -> Result<Who, Response> {
    let who = need_login(hub, headers).await?;
    if !hub.csrf_ok(&who, token) {
        return Err(pages::error(
            &hub.site,
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

/// Only paths on the hub: the login form must not become an open redirect.
/// Browsers drop tabs and newlines from a URL and read `\\` as `/`, so
/// `/\t/evil.example` or `/\\evil.example` are `//evil.example` to them;
/// the checks hold after percent-decoding too.
fn safe_next(next: Option<&str>) -> String {
    let on_the_hub = |n: &str| {
        let decoded = proxy::percent_decode(n);
        [n, decoded.as_str()].iter().all(|p| {
            p.starts_with('/')
                && !p.starts_with("//")
                && !p.contains('\\')
                && !p.chars().any(char::is_control)
        })
    };
    next.filter(|n| on_the_hub(n))
        .unwrap_or("/hub/home")
        .to_string()
}

async fn login_page(
    AxState(hub): AxState<Arc<Hub>>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Response {
    if hub.who(&headers).await.is_some() || hub.cfg.auth == Auth::Header {
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
    let cookies = hub.cookies(headers);
    let name = cookies.names.pre;
    let pre = cookie(headers, name)
        .filter(|p| p.len() == 64)
        .unwrap_or_else(random_hex);
    (
        [(header::SET_COOKIE, cookies.set(name, &pre, 3600))],
        pages::login(
            &hub.site,
            status,
            &hub.login_csrf(&pre),
            &safe_next(next),
            msg,
        ),
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if hub.cfg.auth != Auth::Pam {
        return pages::error(
            &hub.site,
            StatusCode::NOT_FOUND,
            "This hub logs users in through its SSO proxy.",
        );
    }
    let pre = cookie(&headers, hub.cookies(&headers).names.pre).unwrap_or_default();
    let refuse =
        |msg: &str, status| login_form(&hub, &headers, f.next.as_deref(), Some(msg), status);
    if pre.is_empty() || !auth::ct_eq(hub.login_csrf(&pre).as_bytes(), f.csrf.as_bytes()) {
        return refuse(
            "The form expired: please log in again.",
            StatusCode::FORBIDDEN,
        );
    }
    let user = f.user.trim().to_string();
    let client = auth::client_addr(&hub.cfg, peer.ip(), &headers);
    let cookies = hub.cookies(&headers);
    // A device whose own count reached a wait is one no more: a shared
    // browser's next person guesses under the user's count, where the
    // lockout shows (not under a device the user may never use again).
    let from = hub.device_of(&headers, &cookies, &user);
    let device = from
        .clone()
        .filter(|nonce| !hub.throttle.is_spent(&device_key(nonce)));
    let known = device.is_some();
    // In a task of its own: a client that hangs up drops this request, not
    // the check, so that its failure is counted all the same (and the PAM
    // slot and the attempt are held until PAM answers).
    let check = {
        let (hub, user, password) = (hub.clone(), user.clone(), f.password);
        tokio::spawn(async move { check_password(&hub, &user, &password, client, device).await })
    };
    match check.await {
        Ok(Ok(())) => {}
        Ok(Err((msg, status))) => return refuse(&msg, status),
        Err(e) => {
            tracing::error!("checking a login: {e}");
            let (msg, status) = busy();
            return refuse(&msg, status);
        }
    }
    // A right password from a spent device makes it one again.
    if let Some(nonce) = from.filter(|_| !known) {
        hub.throttle.succeeded(&device_key(&nonce));
    }
    let id = random_hex();
    if let Err(e) = hub
        .db
        .add_login(&sha256_hex(&id), &user, now() + LOGIN_SECS)
    {
        tracing::error!("recording a login: {e:#}");
        return pages::error(
            &hub.site,
            StatusCode::INTERNAL_SERVER_ERROR,
            "The hub cannot record your login; tell the administrators.",
        );
    }
    let how = if known { "pam, known device" } else { "pam" };
    hub.db.audit(&user, "login", how);
    let names = cookies.names;
    (
        StatusCode::SEE_OTHER,
        AppendHeaders([
            (
                header::SET_COOKIE,
                cookies.set(names.login, &id, LOGIN_SECS),
            ),
            (
                header::SET_COOKIE,
                cookies.set(names.device, &hub.device_cookie(&user), DEVICE_SECS),
            ),
            (header::LOCATION, safe_next(f.next.as_deref())),
        ]),
    )
        .into_response()
}

/// The login's checks, in order: the client address is not waiting after
/// failed logins (checked before anything is recorded or looked up, so a
/// flood of attempts costs one map lookup each), the name is a user name,
/// neither the user (or, from a `device` of the user's, that device: see
/// [`auth::device_cookie`]) nor the address is waiting, the account may log in at
/// all (a system account's right password opens nothing, and PAM is not
/// asked), a PAM slot is free, and PAM takes the password. The refusal's
/// message and status otherwise: the same "wrong user name or password"
/// for a refused account as for a wrong password. Every refusal but a wait
/// or a busy PAM slot counts as a failure for the throttle (a busy lookup
/// of the typed name, for the address only).
async fn check_password(
    hub: &Arc<Hub>,
    user: &str,
    password: &str,
    client: std::net::IpAddr,
    device: Option<String>,
) -> Result<(), (String, StatusCode)> {
    let wrong = || {
        (
            "Wrong user name or password.".to_string(),
            StatusCode::UNAUTHORIZED,
        )
    };
    let addr = format!("addr:{client}");
    if let Some(wait) = hub.throttle.wait(std::slice::from_ref(&addr)) {
        return Err(too_many(wait));
    }
    if !auth::valid_user_name(user) {
        // Whatever was typed, bounded (the record escapes it), under no
        // user's name.
        hub.db.audit(
            audit::NO_USER,
            "login-failed",
            &format!(
                "not a valid user name: {} (from {client})",
                text::bounded(user, 64)
            ),
        );
        login_failed(hub, &[addr], audit::NO_USER, client);
        return Err(wrong());
    }
    // A browser the user logged in from is counted apart: others' guesses,
    // which make the user wait, do not lock the user out of it.
    let who = match device {
        Some(nonce) => device_key(&nonce),
        None => format!("user:{user}"),
    };
    let keys = [who, addr];
    // (The address's wait was looked at above; nothing awaited since.)
    if let Some(wait) = hub.throttle.wait(&keys[..1]) {
        return Err(too_many(wait));
    }
    // NSS (getpwnam, getgrouplist) may be LDAP: off the async thread, and
    // a few typed names at a time. A flood of made-up names keeps them all
    // busy: the address that sent this one is counted, as for any refusal.
    let Ok(account) = hub.access.check_typed(user).await else {
        login_failed(hub, &keys[1..], user, client);
        return Err(busy());
    };
    if let Err(Refusal::Rule(why)) = &account {
        // Why (the account's uid, min_uid, the allowed groups) is for the
        // admins: whoever typed the name has proved nothing yet.
        hub.db
            .audit(user, "login-refused", &format!("{why} (from {client})"));
        login_failed(hub, &keys, user, client);
        return Err(wrong());
    }
    let Ok(Ok(slot)) = tokio::time::timeout(PAM_WAIT, hub.pam_slots.acquire()).await else {
        return Err(busy());
    };
    // Failures recorded while this login waited (a burst of guesses all
    // passed the checks above before the first was counted) hold it too;
    // and the user's (or device's) attempts under way count as failures
    // until they end, so a burst gets no more guesses than one at a time.
    if let Some(wait) = hub.throttle.wait(&keys) {
        return Err(too_many(wait));
    }
    let Some(_attempt) = hub.throttle.attempt(&keys[0]) else {
        return Err(too_many(Duration::from_secs(1)));
    };
    let (service, u, p) = (
        hub.cfg.pam_service.clone(),
        user.to_string(),
        password.to_string(),
    );
    let checked = tokio::task::spawn_blocking(move || auth::pam_check(&service, &u, &p, client))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    drop(slot);
    if let Err(why) = checked {
        hub.db
            .audit(user, "login-failed", &format!("{why} (from {client})"));
        login_failed(hub, &keys, user, client);
        return Err(wrong());
    }
    hub.throttle.succeeded(&keys[0]);
    hub.access.logged_in(user);
    // PAM knows an account NSS does not: the hub could not run its jobs.
    account.map_err(|r| (r.message().to_string(), StatusCode::FORBIDDEN))
}

/// A device's key for the throttle.
fn device_key(nonce: &str) -> String {
    format!("{}{nonce}", throttle::DEVICE)
}

fn busy() -> (String, StatusCode) {
    (
        "The hub is checking many logins at once: try again in a few seconds.".into(),
        StatusCode::SERVICE_UNAVAILABLE,
    )
}

fn too_many(wait: Duration) -> (String, StatusCode) {
    (
        format!(
            "Too many failed logins for this user or from this address: try again in {} s.",
            wait.as_secs_f64().ceil() as u64
        ),
        StatusCode::TOO_MANY_REQUESTS,
    )
}

/// Counts a failed login for the throttle, and records the wait it imposes.
fn login_failed(hub: &Hub, keys: &[String], user: &str, client: std::net::IpAddr) {
    if let Some(wait) = hub.throttle.failed(keys) {
        hub.db.audit(
            user,
            "login-throttled",
            &format!("from {client}: next try in {} s", wait.as_secs()),
        );
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(rename = "_csrf")]
    csrf: String,
}

/// The page JupyterLab's "Log out of the hub" (labextension/src/hub.ts) opens:
/// one button that posts the logout form with its CSRF token, so that no
/// other site can log a user out with a mere link.
async fn logout_page(AxState(hub): AxState<Arc<Hub>>, headers: HeaderMap) -> Response {
    match hub.who(&headers).await {
        Some(who) => pages::logout(&hub.site, &who),
        None => pages::redirect("/hub/login"),
    }
}

async fn logout(
    AxState(hub): AxState<Arc<Hub>>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Result<Response, Response> {
    let who = csrf_checked(&hub, &headers, &f.csrf).await?;
    let cookies = hub.cookies(&headers);
    let name = cookies.names.login;
    if let Some(c) = cookie(&headers, name) {
        let _ = hub.db.remove_login(&sha256_hex(&c));
    }
    hub.db.audit(&who.name, "logout", "");
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookies.set(name, "", 0)),
            (header::LOCATION, "/hub/login".to_string()),
        ],
    )
        .into_response())
}

async fn render_home(hub: &Hub, who: &Who, message: Option<&str>, status: StatusCode) -> Response {
    let sessions = hub
        .db
        .sessions(Some(&who.name), pages::HISTORY)
        .unwrap_or_default();
    let last = hub.db.last_choice(&who.name).ok().flatten();
    let loads = jobs::partitions(hub).await;
    let tails = hub.tails.of(&sessions).await;
    let parts = pages::HomeParts {
        last: last.as_ref(),
        loads: &loads,
        message,
    };
    pages::home(hub, who, &sessions, &tails, parts, status)
}

async fn home(AxState(hub): AxState<Arc<Hub>>, headers: HeaderMap) -> Response {
    match need_login(&hub, &headers).await {
        Ok(who) => render_home(&hub, &who, None, StatusCode::OK).await,
        Err(r) => r,
    }
}

async fn cards(AxState(hub): AxState<Arc<Hub>>, headers: HeaderMap) -> Response {
    let Some(who) = hub.who(&headers).await else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let sessions = hub
        .db
        .sessions(Some(&who.name), pages::HISTORY)
        .unwrap_or_default();
    let tails = hub.tails.of(&sessions).await;
    pages::cards(&hub, &who, &sessions, &tails)
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
    let s = Session::submitting(random_hex()[..16].to_string(), who.name.clone(), choice);
    let made = hub
        .db
        .new_session(&s)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    if !made {
        return Err((
            StatusCode::CONFLICT,
            "You already have a session: cancel it before starting another.".into(),
        ));
    }
    // (its first link token is taken once the job leaves the queue:
    // `jobs::follow`)
    match jobs::submit(hub, &s).await {
        Ok((job, log)) => {
            if let Ok(false) = hub.db.set_job(&s.id, &job, &log) {
                cancel_late_job(hub, &s, &who.name, &job).await;
                return Ok(());
            }
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
            hub.db.audit(&who.name, "spawn-failed", &why.to_string());
            Err(why.answer(&format!("{} refused the job", hub.sched.display())))
        }
    }
}

/// The session was cancelled while its job was being submitted: the job
/// the scheduler gave after that has no session to follow it, so it is
/// cancelled at once, and said in the audit table.
/// Cancels the job of a session cancelled while it was being submitted,
/// and says so in the audit log as `by` (the session's user, or the
/// administrator who cancelled it). The user's turn may be another call's
/// (their next spawn): asked again until it is free, a while.
async fn cancel_late_job(hub: &Hub, s: &Session, by: &str, job: &str) {
    const PAUSE: std::time::Duration = std::time::Duration::from_millis(500);
    const TRIES: u32 = 90; // 45 s: a submission's command, and a margin
    let mut tries = 0;
    let done = loop {
        match jobs::cancel(hub, &s.user, job).await {
            Ok(()) => break "cancelled".to_string(),
            Err(jobs::Refused::NotNow(..)) if tries < TRIES => tries += 1,
            Err(e) => break format!("not cancelled: {e}"),
        }
        tokio::time::sleep(PAUSE).await;
    };
    hub.db.audit(
        by,
        "cancel",
        &format!(
            "session {}: its job {job} was given while the session was being cancelled; {done}",
            s.id
        ),
    );
}

async fn spawn(
    AxState(hub): AxState<Arc<Hub>>,
    headers: HeaderMap,
    Form(f): Form<SpawnForm>,
) -> Result<Response, Response> {
    let who = csrf_checked(&hub, &headers, &f.csrf).await?;
    let choice = Choice {
        profile: f.profile,
        partition: f.partition,
        cores: f.cores,
        mem_gb: f.mem_gb,
        gpus: f.gpus,
        minutes: f.minutes,
    };
    Ok(start_in_task(&hub, &who, choice).await)
}

/// Starts a session in a task of its own (a request dropped, the browser
/// gone, must not leave a session whose submission was abandoned
/// half-way); the page to answer with.
async fn start_in_task(hub: &Arc<Hub>, who: &Who, choice: Choice) -> Response {
    let started = tokio::spawn({
        let (hub, who) = (hub.clone(), who.clone());
        async move { start_session(&hub, &who, choice).await }
    });
    let started = started.await.unwrap_or_else(|e| {
        Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the session's start failed: {e}"),
        ))
    });
    match started {
        Ok(()) => pages::redirect("/hub/home"),
        Err((status, msg)) => render_home(hub, who, Some(&msg), status).await,
    }
}

/// The session, if `who` may act on it (its owner, or an admin).
fn owned(hub: &Hub, who: &Who, id: &str) -> Result<Session, Response> {
    match hub.db.session(id) {
        Ok(Some(s)) if s.user == who.name || who.admin => Ok(s),
        Ok(Some(_)) => {
            hub.db
                .audit(&who.name, "forbidden", &format!("session {id}"));
            Err(pages::error(
                &hub.site,
                StatusCode::FORBIDDEN,
                "This session is another user's.",
            ))
        }
        _ => Err(pages::error(
            &hub.site,
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
    let who = csrf_checked(&hub, &headers, &f.csrf).await?;
    let s = owned(&hub, &who, &id)?;
    let why = if s.user == who.name {
        "cancelled".to_string()
    } else {
        format!("cancelled by the administrator {}", who.name)
    };
    if s.state != State::Ended {
        match &s.job_id {
            Some(job) => {
                if let Err(e) = jobs::cancel(&hub, &s.user, job).await {
                    let (status, msg) =
                        e.answer(&format!("{} did not cancel the job", hub.sched.display()));
                    return Err(pages::error(&hub.site, status, &msg));
                }
                let u = Update {
                    ended_why: Some(why),
                    ..Default::default()
                };
                let _ = hub.db.update(&id, &u);
            }
            // Its job may have been given since the session was read: the
            // end and the job id in one statement, so that either this
            // cancels it or its submission does (`set_job`), never both.
            None => {
                if let Ok(Some(job)) = hub.db.end_jobless(&id, &why) {
                    cancel_late_job(&hub, &s, &who.name, &job).await;
                }
            }
        }
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
    let who = csrf_checked(&hub, &headers, &f.csrf).await?;
    let s = owned(&hub, &who, &id)?;
    if s.user != who.name {
        return Err(pages::error(
            &hub.site,
            StatusCode::FORBIDDEN,
            "Only its owner can relaunch a session.",
        ));
    }
    Ok(start_in_task(&hub, &who, s.choice).await)
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
    let Some(who) = hub.who(&headers).await else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    if q.all && !who.admin {
        return StatusCode::FORBIDDEN.into_response();
    }
    let user = (!q.all).then_some(who.name.as_str());
    match hub.db.sessions(user, 200) {
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
    let who = need_login(&hub, &headers).await?;
    if !who.admin {
        hub.db.audit(&who.name, "forbidden", "/hub/admin");
        return Err(pages::error(
            &hub.site,
            StatusCode::FORBIDDEN,
            "The admin page is for the hub's administrators.",
        ));
    }
    let sessions = hub
        .db
        .sessions(None, pages::ADMIN_HISTORY)
        .unwrap_or_default();
    let tails = hub.tails.of(&sessions).await;
    Ok(pages::admin(&hub, &who, &sessions, &tails))
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn next_is_a_path_on_the_hub() {
        for evil in [
            "/\t/evil.example",
            "//evil.example",
            "/\\evil.example",
            "https://evil.example",
            "/%2F/evil.example",
            "/%5Cevil.example",
            "/%09/evil.example",
            "/\r\n/evil.example",
            "evil.example",
        ] {
            assert_eq!(safe_next(Some(evil)), "/hub/home", "{evil:?}");
        }
        assert_eq!(safe_next(None), "/hub/home");
        assert_eq!(safe_next(Some("/user/a/lab?x=1")), "/user/a/lab?x=1");
    }
}
