//! The hub's pages: askama templates (`templates/`, compiled in; every value
//! they print is HTML-escaped by construction) and what they are given.
//! The site's name, logo and message of the day come from [`Site`]; the
//! stylesheet and the home page's script are the hub's own files
//! (`static/`, served by [`crate::site`]).
//!
//! The session cards are one fragment (`cards.html`), part of the home and
//! admin pages and served alone at `/hub/cards`, which the home page's
//! script fetches every two seconds. A card says only what is known: a
//! node or a time left that the scheduler has not given yet is left out,
//! never shown as a placeholder; a queued job's start reads as the
//! notebook's queue note reads it (`start in about 4 min, 14:02`, or
//! `start time not known yet`, also for Slurm's placeholder a year ahead).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use askama::Template;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use noyau_sched::{PartitionLoad, Scheduler};

use crate::auth::Who;
use crate::config::HubConfig;
use crate::db::{Choice, Session, State};
use crate::site::Site;

/// Ended sessions shown unfolded under the live ones.
const RECENT: usize = 3;
/// Ended sessions listed at all on a user's page (the rest are in the
/// audit table); the admin page lists [`ADMIN_HISTORY`].
pub const HISTORY: usize = 20;
pub const ADMIN_HISTORY: usize = 100;

/// The pages' own policy: only the hub's stylesheet, script and logo; no
/// framing (a Cancel button under someone else's page).
const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// What every page has around its content.
pub struct Chrome<'a> {
    pub site: &'a Site,
    pub who: Option<&'a Who>,
    pub title: &'a str,
    /// An error to show above the content.
    pub message: Option<&'a str>,
    /// Whether the message of the day is shown (login and home pages).
    pub motd: bool,
}

impl<'a> Chrome<'a> {
    fn new(site: &'a Site, who: Option<&'a Who>, title: &'a str) -> Self {
        Chrome {
            site,
            who,
            title,
            message: None,
            motd: false,
        }
    }
}

fn render(status: StatusCode, t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => {
            let mut r = (status, axum::response::Html(html)).into_response();
            r.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            );
            r
        }
        Err(e) => {
            tracing::error!("rendering a page: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the hub could not render this page",
            )
                .into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    chrome: Chrome<'a>,
}

pub fn error(site: &Site, status: StatusCode, message: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    let mut chrome = Chrome::new(site, None, title);
    chrome.message = Some(message);
    render(status, &ErrorPage { chrome })
}

pub fn redirect(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

#[derive(Template)]
#[template(path = "login.html")]
struct Login<'a> {
    chrome: Chrome<'a>,
    csrf: &'a str,
    next: &'a str,
}

pub fn login(
    site: &Site,
    status: StatusCode,
    csrf: &str,
    next: &str,
    message: Option<&str>,
) -> Response {
    let mut chrome = Chrome::new(site, None, "Log in");
    chrome.message = message;
    chrome.motd = true;
    render(status, &Login { chrome, csrf, next })
}

#[derive(Template)]
#[template(path = "logout.html")]
struct Logout<'a> {
    chrome: Chrome<'a>,
    csrf: &'a str,
}

/// Asks before logging out (GET /hub/logout); the form posts to the same path.
pub fn logout(site: &Site, who: &Who) -> Response {
    let chrome = Chrome::new(site, Some(who), "Log out");
    render(
        StatusCode::OK,
        &Logout {
            chrome,
            csrf: &who.csrf,
        },
    )
}

/// A number field of the start form; `shown: false` sends 0 (a resource
/// the profile does not offer).
struct NumberField {
    name: &'static str,
    label: &'static str,
    min: u32,
    max: u32,
    value: u32,
    shown: bool,
}

/// One profile's start form.
struct SpawnForm<'a> {
    id: &'a str,
    label: &'a str,
    /// Each partition, and whether it is the one chosen last.
    partitions: Vec<(&'a str, bool)>,
    numbers: [NumberField; 4],
}

fn spawn_forms<'a>(cfg: &'a HubConfig, last: Option<&Choice>) -> Vec<SpawnForm<'a>> {
    // One form per profile keeps min/max per profile without scripting.
    cfg.profiles
        .iter()
        .map(|(name, p)| {
            let last = last.filter(|c| &c.profile == name);
            let field = |name, label, r: crate::config::Range, f: fn(&Choice) -> u32| NumberField {
                name,
                label,
                min: r.min,
                max: r.max,
                value: last.map(f).unwrap_or(r.default),
                shown: r.max > 0,
            };
            SpawnForm {
                id: name,
                label: p.label.as_deref().unwrap_or(name),
                partitions: p
                    .partitions
                    .iter()
                    .map(|part| (part.as_str(), last.is_some_and(|c| &c.partition == part)))
                    .collect(),
                numbers: [
                    field("cores", "Cores", p.cores, |c| c.cores),
                    field("mem_gb", "Memory (GB)", p.mem_gb, |c| c.mem_gb),
                    field("gpus", "GPUs", p.gpus, |c| c.gpus),
                    field("minutes", "Minutes", p.minutes, |c| c.minutes),
                ],
            }
        })
        .collect()
}

#[derive(Template)]
#[template(path = "home.html")]
struct Home<'a> {
    chrome: Chrome<'a>,
    view: CardsView<'a>,
    forms: Vec<SpawnForm<'a>>,
    queue_word: &'static str,
    scheduler: &'static str,
    loads: Result<Vec<&'a PartitionLoad>, &'a str>,
}

/// What the home page shows.
pub struct HomeParts<'a> {
    pub last: Option<&'a Choice>,
    /// The scheduler's free resources, or why it could not say.
    pub loads: &'a Result<Vec<PartitionLoad>, String>,
    pub message: Option<&'a str>,
}

pub fn home(
    hub: &crate::Hub,
    who: &Who,
    sessions: &[Session],
    tails: &HashMap<String, Arc<str>>,
    parts: HomeParts<'_>,
    status: StatusCode,
) -> Response {
    let cfg = &hub.cfg;
    let mut chrome = Chrome::new(&hub.site, Some(who), "Interactive sessions");
    chrome.message = parts.message;
    chrome.motd = true;
    // Only the partitions the profiles offer: the others are no choice here.
    let offered = |l: &PartitionLoad| {
        cfg.profiles
            .values()
            .any(|p| p.partitions.iter().any(|part| l.serves(part)))
    };
    let page = Home {
        chrome,
        view: CardsView::new(cfg, &hub.sched, who, sessions, tails, false),
        forms: spawn_forms(cfg, parts.last),
        queue_word: hub.sched.queue_word(),
        scheduler: hub.sched.display(),
        loads: match parts.loads {
            Ok(v) => Ok(v.iter().filter(|l| offered(l)).collect()),
            Err(e) => Err(e.as_str()),
        },
    };
    render(status, &page)
}

#[derive(Template)]
#[template(path = "cards.html")]
struct CardsFragment<'a> {
    view: CardsView<'a>,
}

/// `/hub/cards`: the user's cards alone.
pub fn cards(
    hub: &crate::Hub,
    who: &Who,
    sessions: &[Session],
    tails: &HashMap<String, Arc<str>>,
) -> Response {
    let view = CardsView::new(&hub.cfg, &hub.sched, who, sessions, tails, false);
    render(StatusCode::OK, &CardsFragment { view })
}

#[derive(Template)]
#[template(path = "admin.html")]
struct Admin<'a> {
    chrome: Chrome<'a>,
    view: CardsView<'a>,
    polls: u64,
}

pub fn admin(
    hub: &crate::Hub,
    who: &Who,
    sessions: &[Session],
    tails: &HashMap<String, Arc<str>>,
) -> Response {
    let page = Admin {
        chrome: Chrome::new(&hub.site, Some(who), "Admin"),
        view: CardsView::new(&hub.cfg, &hub.sched, who, sessions, tails, true),
        polls: hub.sched.polls(),
    };
    render(StatusCode::OK, &page)
}

/// The cards of some sessions (newest first): the live ones, the last
/// ended ones, and the older ones folded.
pub struct CardsView<'a> {
    live: Vec<Card<'a>>,
    recent: Vec<Card<'a>>,
    older: Vec<Card<'a>>,
    csrf: &'a str,
    /// The admin's view: every user's, with their names, no relaunch.
    admin: bool,
    any_live: bool,
}

impl<'a> CardsView<'a> {
    fn new(
        cfg: &'a HubConfig,
        sched: &Scheduler,
        who: &'a Who,
        sessions: &'a [Session],
        tails: &HashMap<String, Arc<str>>,
        admin: bool,
    ) -> Self {
        let (live, ended): (Vec<&Session>, Vec<&Session>) =
            sessions.iter().partition(|s| s.state != State::Ended);
        let any_live = !live.is_empty();
        let card = |s: &'a Session| Card::new(cfg, sched, s, admin, tails.get(&s.id));
        let mut ended: Vec<Card<'a>> = ended.into_iter().map(card).collect();
        // The newest ended session's log is open when nothing else is going on.
        if let Some(first) = ended.first_mut().filter(|_| !any_live) {
            first.tail_open = true;
        }
        let older = ended.split_off(RECENT.min(ended.len()));
        CardsView {
            live: live.into_iter().map(card).collect(),
            recent: ended,
            older,
            csrf: &who.csrf,
            admin,
            any_live,
        }
    }
}

/// One session's card.
pub struct Card<'a> {
    id: &'a str,
    /// `queued`, `starting`, `running`, `ended` (its CSS class and `data-state`).
    state: &'static str,
    badge: &'static str,
    title: &'a str,
    /// The session's user, on the admin page.
    user: Option<&'a str>,
    job: Option<&'a str>,
    /// One line: where the session is at.
    status: String,
    facts: Vec<(&'static str, String)>,
    url: String,
    /// Seconds left, for the page's script ("" when unknown).
    left: String,
    open: bool,
    can_relaunch: bool,
    tail: Option<String>,
    tail_open: bool,
}

impl<'a> Card<'a> {
    fn new(
        cfg: &'a HubConfig,
        sched: &Scheduler,
        s: &'a Session,
        admin: bool,
        tail: Option<&Arc<str>>,
    ) -> Self {
        let (state, badge) = match s.state {
            State::Queued => ("queued", "Queued"),
            State::Starting => ("starting", "Starting"),
            State::Running => ("running", "Running"),
            State::Ended => ("ended", "Ended"),
        };
        let secs_left = s.time_left.as_deref().and_then(noyau_sched::parse_duration);
        let facts = vec![
            ("Resources", resources(&s.choice)),
            ("Submitted", when(s.created)),
        ];
        Card {
            id: &s.id,
            state,
            badge,
            title: cfg
                .profiles
                .get(&s.choice.profile)
                .and_then(|p| p.label.as_deref())
                .unwrap_or(&s.choice.profile),
            user: admin.then_some(s.user.as_str()),
            job: s.job_id.as_deref(),
            status: status(s, secs_left, SystemTime::now()),
            facts,
            url: format!("/user/{}/lab", s.user),
            left: secs_left.map(|t| t.to_string()).unwrap_or_default(),
            open: s.state == State::Running && !admin,
            can_relaunch: s.state == State::Ended && !admin,
            tail: tail.and_then(|t| without_end_notices(sched, t)),
            tail_open: false,
        }
    }
}

/// The line a card leads with, from what is known only, at `now`.
fn status(s: &Session, secs_left: Option<u64>, now: SystemTime) -> String {
    let on = |n: &Option<String>| {
        n.as_deref()
            .filter(|n| !n.is_empty())
            .map(|n| format!(" on {n}"))
            .unwrap_or_default()
    };
    match s.state {
        State::Queued => {
            let reason = match s.reason.as_deref() {
                None | Some("submitting") => "submitting the job".to_string(),
                Some(r) => r.to_string(),
            };
            // Said as the notebook's queue note says it (relative, and not
            // at all when absurd), from the estimate stored in local time.
            let start = match s.reason.as_deref() {
                None | Some("submitting") => String::new(),
                Some(_) => {
                    let at = s
                        .start_est
                        .as_deref()
                        .and_then(noyau_sched::parse_local_time);
                    let est = noyau_sched::start_estimate(at, now, &chrono::Local);
                    format!(" · {est}")
                }
            };
            format!("Queued: {reason}{start}")
        }
        State::Starting => format!("Starting{}: JupyterLab is starting", on(&s.node)),
        State::Running => {
            let left = secs_left
                .map(|t| format!(" · {} left", human(t)))
                .unwrap_or_default();
            format!("Running{}{left}", on(&s.node))
        }
        State::Ended => format!("Ended: {}", s.ended_why.as_deref().unwrap_or("ended")),
    }
}

/// The log's tail without the scheduler's own notice that it ended the job
/// (the card already says how it ended); None if nothing else is left.
fn without_end_notices(sched: &Scheduler, tail: &str) -> Option<String> {
    let kept: Vec<&str> = tail.lines().filter(|l| !sched.is_end_notice(l)).collect();
    let text = kept.join("\n");
    (!text.trim().is_empty()).then_some(text)
}

fn plural(n: u32, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `debug · 2 cores · 4 GB · 1 GPU · 1 h 30 min`.
fn resources(c: &Choice) -> String {
    let mut parts = vec![c.partition.clone(), plural(c.cores, "core", "cores")];
    if c.mem_gb > 0 {
        parts.push(format!("{} GB", c.mem_gb));
    }
    if c.gpus > 0 {
        parts.push(plural(c.gpus, "GPU", "GPUs"));
    }
    parts.push(human(u64::from(c.minutes) * 60));
    parts.join(" · ")
}

/// A duration for people: `2 h 05 min`, `9 min`, `40 s`.
pub(crate) fn human(secs: u64) -> String {
    match secs {
        s if s >= 3600 && s % 3600 / 60 == 0 => format!("{} h", s / 3600),
        s if s >= 3600 => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// A time stamp as `2026-12-06 14:05`, local time.
fn when(ts: i64) -> String {
    u64::try_from(ts)
        .ok()
        .map(|t| short_time(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)))
        .unwrap_or_default()
}

/// A time as `2026-12-06 14:05`, local time.
pub(crate) fn short_time(t: std::time::SystemTime) -> String {
    noyau_sched::local_time(t)
        .replace('T', " ")
        .chars()
        .take(16)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(state: State) -> Session {
        let choice = Choice {
            profile: "cpu".into(),
            partition: "debug".into(),
            cores: 1,
            mem_gb: 0,
            gpus: 0,
            minutes: 90,
        };
        let mut s = Session::submitting("s1".into(), "alice".into(), choice);
        s.state = state;
        s
    }

    #[test]
    fn cards_say_only_what_is_known() {
        let mut s = session(State::Running);
        assert_eq!(status(&s, None, SystemTime::now()), "Running");
        s.node = Some(String::new());
        assert_eq!(status(&s, None, SystemTime::now()), "Running");
        s.node = Some("n1".into());
        assert_eq!(
            status(&s, Some(125), SystemTime::now()),
            "Running on n1 · 2 min left"
        );
        assert_eq!(
            status(&session(State::Starting), None, SystemTime::now()),
            "Starting: JupyterLab is starting"
        );
        assert_eq!(
            status(&session(State::Queued), None, SystemTime::now()),
            "Queued: submitting the job"
        );
        assert_eq!(resources(&s.choice), "debug · 1 core · 1 h 30 min");
        assert_eq!(human(3600), "1 h");
        assert_eq!(human(40), "40 s");
    }

    #[test]
    fn a_queued_cards_start_reads_as_the_notebooks_note() {
        let now = noyau_sched::parse_local_time("2026-12-06T13:58:00").unwrap();
        let mut s = session(State::Queued);
        s.reason = Some("Resources".into());
        let line = |s: &Session| status(s, None, now);
        assert_eq!(line(&s), "Queued: Resources · start time not known yet");
        s.start_est = Some("2026-12-06T14:02:00".into());
        assert_eq!(line(&s), "Queued: Resources · start in about 4 min, 14:02");
        // Slurm's placeholder when it cannot estimate: a year after its
        // scheduler's last pass, so a little less than a year from now.
        s.start_est = Some("2027-12-06T13:50:00".into());
        assert_eq!(line(&s), "Queued: Resources · start time not known yet");
        s.start_est = Some("2026-12-06T11:00:00".into());
        assert_eq!(line(&s), "Queued: Resources · start time not known yet");
    }

    #[test]
    fn the_rendered_card_says_when_the_job_should_start() {
        let cfg: HubConfig = toml::from_str(
            "listen = \"127.0.0.1:1\"\nlink_bind = \"127.0.0.1:2\"\nstate_dir = \"/x\"\n\
             [profiles.cpu]\npartitions = [\"debug\"]\ncores = { min = 1, max = 2, default = 1 }\n\
             minutes = { min = 1, max = 9, default = 5 }\n",
        )
        .unwrap();
        let sched = Scheduler::named("slurm").unwrap();
        let who = Who {
            name: "alice".into(),
            admin: false,
            csrf: "t".into(),
        };
        let start = SystemTime::now() + std::time::Duration::from_secs(4 * 60 + 20);
        let mut s = session(State::Queued);
        s.reason = Some("Priority".into());
        s.start_est = Some(noyau_sched::local_time(start));
        let sessions = [s];
        let tails = HashMap::new();
        let view = CardsView::new(&cfg, &sched, &who, &sessions, &tails, false);
        let html = CardsFragment { view }.render().unwrap();
        let state = html
            .split("<p class=\"state\">")
            .nth(1)
            .and_then(|t| t.split("</p>").next())
            .unwrap_or_else(|| panic!("no state line in {html}"));
        // (the day is named too when the start is past midnight)
        let clock = &noyau_sched::local_time(start)[11..16];
        assert!(
            state.starts_with("Queued: Priority · start in about 4 min, ")
                && state.ends_with(clock),
            "{state}"
        );
    }

    #[test]
    fn the_schedulers_end_notice_leaves_the_tail() {
        let slurm = Scheduler::named("slurm").unwrap();
        let tail = "jupyter lab started\nslurmstepd: error: *** JOB 7 ON n1 CANCELLED AT 2026-12-06T03:00:00 ***";
        assert_eq!(
            without_end_notices(&slurm, tail).as_deref(),
            Some("jupyter lab started")
        );
        let only = "slurmstepd: error: *** JOB 7 ON n1 CANCELLED AT 2026-12-06T03:00:00 ***\n";
        assert_eq!(without_end_notices(&slurm, only), None);
    }
}
