//! The hub's pages, as plain HTML strings: a login form, the home page
//! (spawn form, free cores, session cards) and the admin list. Every value
//! that comes from a user or from Slurm goes through [`esc`].
//!
//! The cards are one HTML fragment (`/hub/cards`), rendered here only; the
//! home page's script fetches it every two seconds and raises a browser
//! notification when a session starts and when its time left falls under
//! ten minutes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};

use crate::auth::Who;
use crate::config::HubConfig;
use crate::db::{Choice, Session, State};
use noyau_sched::PartitionLoad;

pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

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

const STYLE: &str = "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}
.card{border:1px solid #aaa;border-radius:6px;padding:.6em 1em;margin:.6em 0}
.queued{border-left:6px solid #d90}.starting{border-left:6px solid #39c}
.running{border-left:6px solid #2a2}.ended{border-left:6px solid #888}
pre{background:#f4f4f4;padding:.5em;overflow:auto;max-height:12em}
label{display:inline-block;min-width:9em}.err{color:#b00}form.inline{display:inline}";

pub fn layout(title: &str, who: Option<&Who>, body: &str) -> Html<String> {
    let nav = match who {
        Some(w) => format!(
            "<nav>Signed in as <b id=\"who\">{}</b> · <a href=\"/hub/home\">Home</a>{} · \
             <form class=\"inline\" method=\"post\" action=\"/hub/logout\"><input type=\"hidden\" name=\"_csrf\" value=\"{}\"><button>Log out</button></form></nav>",
            esc(&w.name),
            if w.admin { " · <a href=\"/hub/admin\">Admin</a>" } else { "" },
            esc(&w.csrf)
        ),
        None => String::new(),
    };
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{} · noyau hub</title><style>{STYLE}</style></head><body>{nav}<h1>{}</h1>{body}</body></html>",
        esc(title),
        esc(title)
    ))
}

pub fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        layout(
            status.canonical_reason().unwrap_or("Error"),
            None,
            &format!("<p class=\"err\">{}</p>", esc(message)),
        ),
    )
        .into_response()
}

pub fn redirect(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

pub fn login(csrf: &str, next: &str, message: Option<&str>) -> Html<String> {
    let msg = message
        .map(|m| format!("<p class=\"err\" id=\"error\">{}</p>", esc(m)))
        .unwrap_or_default();
    layout(
        "Log in",
        None,
        &format!(
            "{msg}<form method=\"post\" action=\"/hub/login\">\
             <input type=\"hidden\" name=\"_csrf\" value=\"{}\"><input type=\"hidden\" name=\"next\" value=\"{}\">\
             <p><label for=\"user\">User name</label><input id=\"user\" name=\"user\" autocomplete=\"username\"></p>\
             <p><label for=\"password\">Password</label><input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\"></p>\
             <p><button id=\"login\">Log in</button></p></form>",
            esc(csrf),
            esc(next)
        ),
    )
}

/// Asks before logging out (GET /hub/logout); the form posts to the same path.
pub fn logout(who: &Who) -> Html<String> {
    layout(
        "Log out",
        Some(who),
        &format!(
            "<p>Log out of the hub? Your running sessions go on; log in again to reach them.</p>\
             <form method=\"post\" action=\"/hub/logout\"><input type=\"hidden\" name=\"_csrf\" value=\"{}\">\
             <button id=\"logout\">Log out</button> <a href=\"/hub/home\">Back to the hub</a></form>",
            esc(&who.csrf)
        ),
    )
}

fn number(name: &str, label: &str, min: u32, max: u32, value: u32) -> String {
    format!(
        "<p><label for=\"{name}\">{label}</label><input id=\"{name}\" name=\"{name}\" type=\"number\" min=\"{min}\" max=\"{max}\" value=\"{value}\"> ({min}–{max})</p>"
    )
}

pub fn home(
    cfg: &HubConfig,
    who: &Who,
    last: Option<&Choice>,
    loads: &Result<Vec<PartitionLoad>, String>,
    cards: &str,
    message: Option<&str>,
) -> Html<String> {
    let mut form = String::new();
    let msg = message
        .map(|m| format!("<p class=\"err\" id=\"error\">{}</p>", esc(m)))
        .unwrap_or_default();
    // One form per profile keeps min/max per profile without scripting.
    for (name, p) in &cfg.profiles {
        let last = last.filter(|c| &c.profile == name);
        let pick = |f: fn(&Choice) -> u32, d: u32| last.map(f).unwrap_or(d);
        let parts: String = p
            .partitions
            .iter()
            .map(|part| {
                let sel = if last.is_some_and(|c| &c.partition == part) {
                    " selected"
                } else {
                    ""
                };
                format!("<option{sel}>{}</option>", esc(part))
            })
            .collect();
        form.push_str(&format!(
            "<form class=\"card spawn\" method=\"post\" action=\"/hub/spawn\" id=\"spawn-{pid}\">\
             <h3>{label}</h3><input type=\"hidden\" name=\"_csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"profile\" value=\"{pid}\">\
             <p><label for=\"partition-{pid}\">{queue}</label><select id=\"partition-{pid}\" name=\"partition\">{parts}</select></p>\
             {cores}{mem}{gpus}{minutes}<p><button>Start</button></p></form>",
            pid = esc(name),
            label = esc(p.label.as_deref().unwrap_or(name)),
            queue = queue_word(cfg),
            csrf = esc(&who.csrf),
            cores = number("cores", "Cores", p.cores.min, p.cores.max, pick(|c| c.cores, p.cores.default)),
            mem = if p.mem_gb.max > 0 {
                number("mem_gb", "Memory (GB)", p.mem_gb.min, p.mem_gb.max, pick(|c| c.mem_gb, p.mem_gb.default))
            } else {
                "<input type=\"hidden\" name=\"mem_gb\" value=\"0\">".into()
            },
            gpus = if p.gpus.max > 0 {
                number("gpus", "GPUs", p.gpus.min, p.gpus.max, pick(|c| c.gpus, p.gpus.default))
            } else {
                "<input type=\"hidden\" name=\"gpus\" value=\"0\">".into()
            },
            minutes = number("minutes", "Minutes", p.minutes.min, p.minutes.max, pick(|c| c.minutes, p.minutes.default)),
        ));
    }
    let loads = match loads {
        Ok(v) => {
            let rows: String = v
                .iter()
                .map(|l| {
                    format!(
                        "<tr><td>{}</td><td class=\"idle\">{}</td><td>{}</td><td class=\"gpus\">{}</td></tr>",
                        esc(&l.partition),
                        l.idle_cores,
                        l.total_cores,
                        if l.total_gpus == 0 {
                            "none".to_string()
                        } else {
                            format!("{} free of {}", l.free_gpus, l.total_gpus)
                        }
                    )
                })
                .collect();
            format!("<table id=\"partitions\"><tr><th>{}</th><th>Free cores</th><th>Cores</th><th>GPUs</th></tr>{rows}</table>", queue_word(cfg))
        }
        Err(e) => format!(
            "<p class=\"err\">Cannot ask {} for free resources: {}</p>",
            names(cfg).0,
            esc(e)
        ),
    };
    layout(
        "noyau hub",
        Some(who),
        &format!(
            "{msg}<h2>Your sessions</h2><div id=\"cards\">{cards}</div>\
             <h2>Start a session</h2>{loads}{form}<script>{SCRIPT}</script>"
        ),
    )
}

/// Refreshes the cards and notifies on start and near the walltime.
const SCRIPT: &str = r#"
const seen = {};
function notify(text) {
  if (!("Notification" in window)) return;
  if (Notification.permission === "granted") new Notification("noyau hub", {body: text});
}
if ("Notification" in window && Notification.permission === "default") Notification.requestPermission();
async function refresh() {
  try {
    const r = await fetch("/hub/cards", {credentials: "same-origin"});
    if (!r.ok) return;
    document.getElementById("cards").innerHTML = await r.text();
    for (const c of document.querySelectorAll(".card[data-session]")) {
      const id = c.dataset.session, st = c.dataset.state, left = Number(c.dataset.left || -1);
      const was = seen[id] || {};
      if (was.state && was.state !== "running" && st === "running") notify("Your session is running: " + c.dataset.url);
      if (st === "running" && left >= 0 && left < 600 && !was.warned) { notify("Your session ends in " + Math.round(left / 60) + " min (walltime)"); was.warned = true; }
      seen[id] = {state: st, warned: was.warned};
    }
  } catch (e) {}
}
for (const c of document.querySelectorAll(".card[data-session]")) seen[c.dataset.session] = {state: c.dataset.state};
setInterval(refresh, 2000);
"#;

fn button(action: &str, csrf: &str, label: &str, id: &str) -> String {
    format!(
        "<form class=\"inline\" method=\"post\" action=\"{action}\"><input type=\"hidden\" name=\"_csrf\" value=\"{}\"><button id=\"{id}\">{label}</button></form>",
        esc(csrf)
    )
}

/// What the hub's scheduler is called, and what it calls a queue.
fn names(cfg: &HubConfig) -> (&'static str, &'static str) {
    noyau_sched::Scheduler::named(&cfg.scheduler).map_or(("the scheduler", "Queue"), |s| {
        (s.display(), s.queue_word())
    })
}

/// What the scheduler calls the choice of queue.
fn queue_word(cfg: &HubConfig) -> &'static str {
    names(cfg).1
}

/// One card per session; `tails`: the ended ones' log tails, by id
/// ([`crate::logs::Tails`]).
pub fn cards(
    sessions: &[Session],
    who: &Who,
    with_user: bool,
    tails: &HashMap<String, Arc<str>>,
) -> String {
    if sessions.is_empty() {
        return "<p id=\"no-sessions\">No sessions yet.</p>".into();
    }
    let mut out = String::new();
    for s in sessions {
        let c = &s.choice;
        let res = format!(
            "{} · {} cores{}{} · {} min",
            esc(&c.partition),
            c.cores,
            if c.mem_gb > 0 {
                format!(" · {} GB", c.mem_gb)
            } else {
                String::new()
            },
            if c.gpus > 0 {
                format!(" · {} GPUs", c.gpus)
            } else {
                String::new()
            },
            c.minutes
        );
        let job = s
            .job_id
            .as_deref()
            .map(|j| format!(" · job {}", esc(j)))
            .unwrap_or_default();
        let user = if with_user {
            format!("<b>{}</b> · ", esc(&s.user))
        } else {
            String::new()
        };
        let url = format!("/user/{}/lab", s.user);
        let detail = match s.state {
            State::Queued => format!(
                "Queued: {}{}",
                esc(s.reason.as_deref().unwrap_or("submitted")),
                s.start_est
                    .as_deref()
                    .map(|t| format!(" · estimated start {}", esc(t)))
                    .unwrap_or_default()
            ),
            State::Starting => format!("Starting on {}", esc(s.node.as_deref().unwrap_or("?"))),
            State::Running => format!(
                "Running on {} · {} left · <a id=\"open-{}\" href=\"{}\">Open JupyterLab</a>",
                esc(s.node.as_deref().unwrap_or("?")),
                esc(s.time_left.as_deref().unwrap_or("?")),
                esc(&s.id),
                esc(&url)
            ),
            State::Ended => {
                let tail = tails
                    .get(&s.id)
                    .filter(|t| !t.trim().is_empty())
                    .map(|t| format!("<pre class=\"log\">{}</pre>", esc(t)))
                    .unwrap_or_default();
                format!(
                    "Ended: {}{tail}",
                    esc(s.ended_why.as_deref().unwrap_or("ended"))
                )
            }
        };
        let actions = if s.state == State::Ended {
            if with_user {
                String::new()
            } else {
                button(
                    &format!("/hub/sessions/{}/relaunch", s.id),
                    &who.csrf,
                    "Relaunch",
                    &format!("relaunch-{}", s.id),
                )
            }
        } else {
            button(
                &format!("/hub/sessions/{}/cancel", s.id),
                &who.csrf,
                "Cancel",
                &format!("cancel-{}", s.id),
            )
        };
        let left = s
            .time_left
            .as_deref()
            .and_then(noyau_sched::parse_duration)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let state = serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        out.push_str(&format!(
            "<div class=\"card {state}\" id=\"card-{id}\" data-session=\"{id}\" data-state=\"{state}\" data-left=\"{left}\" data-url=\"{url}\">\
             <div>{user}{res}{job}</div><div class=\"state\">{detail}</div><div>{actions}</div></div>",
            id = esc(&s.id),
            url = esc(&url),
        ));
    }
    out
}

pub fn admin(
    who: &Who,
    sessions: &[Session],
    tails: &HashMap<String, Arc<str>>,
    polls: u64,
) -> Html<String> {
    layout(
        "Admin",
        Some(who),
        &format!(
            "<p>Scheduler polls (one listing call for all sessions) since start: <span id=\"scheduler-polls\">{polls}</span></p><div id=\"cards\">{}</div>",
            cards(sessions, who, true, tails)
        ),
    )
}
