//! `hub.toml`: where the hub listens, how users log in, and the spawn form's
//! profiles with the limits enforced on every request.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::listen::Listen;

/// hub.toml's keys, for suggestions.
const KEYS: &[&str] = &[
    "listen",
    "listen_group",
    "link_bind",
    "link_advertise",
    "state_dir",
    "auth",
    "pam_service",
    "auth_header",
    "auth_secret_header",
    "auth_secret_file",
    "auth_secret",
    "proxy_addresses",
    "min_uid",
    "allowed_users",
    "allowed_groups",
    "login_failures",
    "login_delay",
    "pam_in_flight",
    "concurrent_submissions",
    "admins",
    "poll_interval",
    "cookie_secure",
    "submit_as",
    "agent",
    "log_dir",
    "scheduler",
    "site_name",
    "logo",
    "motd",
    "idle_timeout",
    "profiles",
];

// Unknown keys are refused by `validate` (a scheduler's `[NAME]` table of
// command paths is a key serde cannot know).
#[derive(Debug, Clone, Deserialize)]
pub struct HubConfig {
    /// The web server's address, or `unix:PATH` (put TLS in front, e.g.
    /// nginx, for a centre; see [`crate::listen`]).
    pub listen: Listen,
    /// The group given the unix socket of `listen` (the web server's).
    pub listen_group: Option<String>,
    /// Where agents dial in: a fixed port, so that they find the hub again
    /// after a restart.
    pub link_bind: SocketAddr,
    /// The address jobs dial (default: this host's name and link_bind's port).
    pub link_advertise: Option<String>,
    /// Database, link identity and key (created 0700).
    pub state_dir: PathBuf,
    #[serde(default)]
    pub auth: Auth,
    /// The PAM service used to check passwords.
    #[serde(default = "default_pam_service")]
    pub pam_service: String,
    /// The header an SSO reverse proxy sets to the user name (`auth = "header"`).
    #[serde(default = "default_auth_header")]
    pub auth_header: String,
    /// A header the SSO proxy adds to every request with a secret value
    /// (`auth = "header"`): a request without it is nobody's. Needed in
    /// header mode, even on a loopback address (every local account reaches
    /// that).
    pub auth_secret_header: Option<String>,
    /// The file holding that secret (0600, the hub's own).
    pub auth_secret_file: Option<PathBuf>,
    /// The secret itself, when hub.toml is 0600 (prefer `auth_secret_file`).
    pub auth_secret: Option<ProxySecret>,
    /// The reverse proxies' addresses: with `auth = "header"` only they may
    /// name the user; their `X-Forwarded-For` gives the client's address
    /// (for the login throttle).
    #[serde(default)]
    pub proxy_addresses: Vec<IpAddr>,
    /// Accounts below this uid (system accounts) never log in; root never.
    #[serde(default = "default_min_uid")]
    pub min_uid: u32,
    /// If either is set, only these users, members of these groups, and the
    /// admins log in.
    #[serde(default)]
    pub allowed_users: Vec<String>,
    #[serde(default)]
    pub allowed_groups: Vec<String>,
    /// Failed logins within a minute, for one user or from one address,
    /// after which further attempts wait.
    #[serde(default = "default_login_failures")]
    pub login_failures: u32,
    /// The first wait, in seconds; it doubles with each failure after it.
    #[serde(default = "default_login_delay")]
    pub login_delay: f64,
    /// PAM conversations at once; more wait a few seconds, then get a 503.
    #[serde(default = "default_pam_in_flight")]
    pub pam_in_flight: usize,
    /// Scheduler commands that submit or cancel jobs the hub runs at once,
    /// for all of its users together (1 to 64).
    #[serde(
        default = "default_concurrent_submissions",
        deserialize_with = "submissions"
    )]
    pub concurrent_submissions: usize,
    #[serde(default)]
    pub admins: Vec<String>,
    /// Seconds between the scheduler's listing calls (one for all users).
    #[serde(default = "default_poll")]
    pub poll_interval: f64,
    /// Send cookies with `Secure` (set false only for plain-HTTP tests).
    #[serde(default = "default_true")]
    pub cookie_secure: bool,
    /// The command prefix that submits and cancels as the user; `{user}` is replaced.
    #[serde(default = "default_submit_as")]
    pub submit_as: Vec<String>,
    /// The noyau binary the job runs (default: this one).
    pub agent: Option<PathBuf>,
    /// Where job logs go; `{home}` and `{user}` are replaced.
    #[serde(default = "default_log_dir")]
    pub log_dir: String,
    /// The batch scheduler the sessions' jobs go to (a name noyau-sched
    /// registers: `slurm`, `oar`).
    #[serde(default = "default_scheduler")]
    pub scheduler: String,
    /// The site's name, in every page's title and header.
    #[serde(default = "default_site_name")]
    pub site_name: String,
    /// An image file (PNG, JPEG, GIF, WebP or SVG, at most 256 KiB) shown
    /// beside the site's name; read once at start and served by the hub.
    pub logo: Option<PathBuf>,
    /// A message of the day, on the login and home pages (plain text;
    /// blank lines separate paragraphs).
    pub motd: Option<String>,
    /// Seconds without activity in a running session's JupyterLab after
    /// which the hub ends it (0, the default: never). A session with a
    /// busy kernel is never ended.
    #[serde(default)]
    pub idle_timeout: u64,
    pub profiles: BTreeMap<String, HubProfile>,
    /// The other top-level keys: a scheduler's `[NAME]` table gives paths
    /// of its commands (`[NAME]` with `COMMAND = "/path/to/COMMAND"` lines).
    #[serde(flatten)]
    pub other: BTreeMap<String, toml::Value>,
    /// The secret the SSO proxy adds, read from `auth_secret_file` or
    /// `auth_secret` by [`HubConfig::load`].
    #[serde(skip)]
    pub proxy_secret: Option<ProxySecret>,
}

/// A secret that `{:?}` does not print (the configuration is logged at
/// times).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct ProxySecret(String);

impl ProxySecret {
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for ProxySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxySecret(…)")
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Auth {
    #[default]
    Pam,
    Header,
}

/// A numeric field of the form: allowed range and the preset value.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub min: u32,
    pub max: u32,
    pub default: u32,
}

impl Range {
    fn check(&self, what: &str, profile: &str) -> anyhow::Result<()> {
        if !(self.min <= self.default && self.default <= self.max) {
            bail!("profile {profile}: {what} needs min <= default <= max");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubProfile {
    /// What the form shows.
    pub label: Option<String>,
    pub partitions: Vec<String>,
    pub cores: Range,
    /// 0 to 0 (the default): the job names no memory (OAR has no such request).
    #[serde(default = "zero")]
    pub mem_gb: Range,
    #[serde(default = "zero")]
    pub gpus: Range,
    pub minutes: Range,
    /// `lab` (JupyterLab) or `server` (jupyter_server).
    #[serde(default = "default_server")]
    pub server: String,
    /// Environment of the job (e.g. PATH to the Jupyter installation).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Shell lines run before the agent (e.g. `module load jupyter`).
    pub prologue: Option<String>,
    /// Slurm's account, OAR's project.
    pub account: Option<String>,
    pub qos: Option<String>,
}

fn default_pam_service() -> String {
    "login".into()
}
fn default_auth_header() -> String {
    "X-Remote-User".into()
}
fn default_min_uid() -> u32 {
    1000
}
fn default_login_failures() -> u32 {
    5
}
fn default_login_delay() -> f64 {
    30.0
}
fn default_pam_in_flight() -> usize {
    8
}
fn default_concurrent_submissions() -> usize {
    noyau_sched::DEFAULT_SLOTS
}
/// `concurrent_submissions`, refused at start unless 1 to 64.
fn submissions<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = i64::deserialize(d)?;
    noyau_sched::check_slots(n).map_err(|_| {
        serde::de::Error::custom(format!(
            "concurrent_submissions = {n}: it is how many scheduler commands that submit or \
             cancel jobs the hub runs at once, for all of its users together; give a whole \
             number from 1 to {} (default {})",
            noyau_sched::MAX_SLOTS,
            noyau_sched::DEFAULT_SLOTS
        ))
    })
}
fn default_poll() -> f64 {
    5.0
}
fn default_true() -> bool {
    true
}
fn default_scheduler() -> String {
    "slurm".into()
}
fn default_submit_as() -> Vec<String> {
    ["runuser", "-u", "{user}", "--"].map(String::from).to_vec()
}
fn default_log_dir() -> String {
    "{home}/.local/state/noyau/hub".into()
}
fn default_site_name() -> String {
    "noyau hub".into()
}
fn default_server() -> String {
    "lab".into()
}
fn zero() -> Range {
    Range {
        min: 0,
        max: 0,
        default: 0,
    }
}
impl HubConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the hub configuration {}", path.display()))?;
        let mut cfg: HubConfig = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid hub configuration", path.display()))?;
        cfg.validate()
            .with_context(|| format!("in {}", path.display()))?;
        cfg.proxy_secret = cfg.read_proxy_secret(path)?;
        Ok(cfg)
    }

    /// `idle_timeout`, if the culler is on.
    pub fn idle_limit(&self) -> Option<std::time::Duration> {
        (self.idle_timeout > 0).then(|| std::time::Duration::from_secs(self.idle_timeout))
    }

    /// Only `state_dir` of a hub.toml, for commands that read the hub's
    /// state (`noyau hub audit`), run by root or the hub's account: they
    /// need neither the proxy's secret nor the scheduler.
    pub fn state_dir_of(path: &Path) -> anyhow::Result<PathBuf> {
        #[derive(Deserialize)]
        struct StateOnly {
            state_dir: PathBuf,
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the hub configuration {}", path.display()))?;
        let s: StateOnly = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid hub configuration", path.display()))?;
        Ok(s.state_dir)
    }

    /// The SSO proxy's secret, from a private file or a private hub.toml.
    fn read_proxy_secret(&self, config: &Path) -> anyhow::Result<Option<ProxySecret>> {
        let (path, inline) = match (&self.auth_secret_file, &self.auth_secret) {
            (Some(f), None) => (f.as_path(), false),
            (None, Some(_)) => (config, true),
            _ => return Ok(None),
        };
        // The admin's path: a link (to a mounted secret) is followed.
        let mut file = noyau_trust::Expect::file()
            .follow_links()
            .open(path)
            .context("it holds the SSO proxy's secret")?;
        let secret = match (inline, &self.auth_secret) {
            (true, Some(s)) => s.0.clone(),
            _ => {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut file, &mut text)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                text.trim().to_string()
            }
        };
        if secret.len() < 16 {
            bail!(
                "the SSO proxy's secret in {} is shorter than 16 characters; \
                 make one with `openssl rand -hex 32`",
                path.display()
            );
        }
        Ok(Some(ProxySecret(secret)))
    }

    /// The command paths hub.toml gives scheduler `name` (`[NAME]`).
    pub fn commands(&self, name: &str) -> anyhow::Result<Vec<(String, String)>> {
        let Some(table) = self.other.get(name) else {
            return Ok(Vec::new());
        };
        let bad = || {
            anyhow::anyhow!(
                "[{name}] holds paths of {name}'s commands: COMMAND = \"/path/to/COMMAND\""
            )
        };
        table
            .as_table()
            .ok_or_else(bad)?
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_str().ok_or_else(bad)?.to_string())))
            .collect()
    }

    /// The scheduler names a known one, and every other top-level key is
    /// a scheduler's table of command paths.
    fn validate_scheduler(&self) -> anyhow::Result<()> {
        let known = noyau_sched::schedulers();
        if !known.contains(&self.scheduler.as_str()) {
            bail!(
                "scheduler {:?} is not one noyau knows{}; schedulers: {}",
                self.scheduler,
                noyau_config::suggest(&self.scheduler, known.iter().copied()),
                known.join(", ")
            );
        }
        for key in self.other.keys() {
            if !known.contains(&key.as_str()) {
                bail!(
                    "unknown key `{key}`{}",
                    noyau_config::suggest(key, KEYS.iter().chain(&known).copied())
                );
            }
            let builder = noyau_sched::Scheduler::builder(key)?;
            self.commands(key)?
                .iter()
                .try_fold(builder, |b, (name, path)| b.command(name, path))?;
        }
        Ok(())
    }

    /// A warning for the hub's start, when `listen` is a unix socket and
    /// the web server's address there ([`crate::listen::UNIX_PEER`]) is
    /// not in `proxy_addresses`: every client then has that one address.
    /// The hub does not trust its `X-Forwarded-For` unasked, since nginx
    /// passes a client's own header on unless told to set it.
    pub fn unix_peer_warning(&self) -> Option<&'static str> {
        let peer = crate::listen::UNIX_PEER.ip();
        (matches!(self.listen, Listen::Unix(_)) && !self.proxy_addresses.contains(&peer)).then_some(
            "listen is a unix socket and 127.0.0.1 is not in proxy_addresses: every client \
             counts as 127.0.0.1 for the login throttle (one guesser makes every user wait): \
             set proxy_addresses = [\"127.0.0.1\"] and have the web server set \
             X-Forwarded-For ($remote_addr)",
        )
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.validate_login()?;
        self.validate_scheduler()?;
        if self.listen_group.is_some() && !matches!(self.listen, Listen::Unix(_)) {
            bail!("listen_group is the group of a unix socket: it needs listen = \"unix:PATH\"");
        }
        let sched = noyau_sched::Scheduler::named(&self.scheduler)?;
        if self.profiles.is_empty() {
            bail!("no [profiles.NAME]: the spawn form needs at least one");
        }
        if self.poll_interval.is_nan() || self.poll_interval < 0.1 {
            bail!("poll_interval must be at least 0.1 seconds");
        }
        if self.site_name.trim().is_empty() || self.site_name.chars().any(char::is_control) {
            bail!("site_name must be a name on one line");
        }
        for (name, p) in &self.profiles {
            if p.partitions.is_empty() {
                bail!("profile {name}: partitions is empty");
            }
            p.cores.check("cores", name)?;
            p.mem_gb.check("mem_gb", name)?;
            p.gpus.check("gpus", name)?;
            p.minutes.check("minutes", name)?;
            if p.cores.min == 0 || p.minutes.min == 0 {
                bail!("profile {name}: cores and minutes must be at least 1");
            }
            if p.qos.is_some() && !sched.accepts("qos") {
                bail!(
                    "profile {name}: qos has no meaning on {}; remove it",
                    sched.display()
                );
            }
            // The form's resource fields this scheduler cannot ask for.
            let fields = [
                ("mem_gb", "mem", p.mem_gb.max),
                ("gpus", "gpus", p.gpus.max),
            ];
            let foreign: Vec<_> = fields.iter().filter(|f| !sched.accepts(f.1)).collect();
            if foreign.iter().any(|f| f.2 > 0) {
                let names: Vec<&str> = foreign.iter().map(|f| f.0).collect();
                bail!(
                    "profile {name}: {} jobs cannot ask for {}: remove {}",
                    sched.display(),
                    names.join(" or "),
                    names.join(" and ")
                );
            }
            if !matches!(p.server.as_str(), "lab" | "server") {
                bail!("profile {name}: server must be \"lab\" or \"server\"");
            }
        }
        Ok(())
    }
}

impl HubConfig {
    /// Trusted-header mode must not trust every client; the throttle's
    /// numbers must mean something.
    fn validate_login(&self) -> anyhow::Result<()> {
        let secret_source = self.auth_secret_file.is_some() || self.auth_secret.is_some();
        if self.auth_secret_file.is_some() && self.auth_secret.is_some() {
            bail!("give the SSO proxy's secret once: auth_secret_file or auth_secret, not both");
        }
        if self.auth_secret_header.is_some() != secret_source {
            bail!(
                "auth_secret_header (the header the SSO proxy adds) and auth_secret_file \
                 (the secret it holds) go together: set both"
            );
        }
        match self.auth {
            Auth::Pam if self.auth_secret_header.is_some() => {
                bail!("auth_secret_header is for auth = \"header\"; with PAM logins remove it")
            }
            Auth::Header if self.auth_secret_header.is_none() => {
                bail!(
                    "auth = \"header\" trusts the {} header only on requests that prove they \
                     came through the SSO proxy: without a secret, anyone who can reach \
                     listen = {} could log in as anyone ({}). Set auth_secret_header and \
                     auth_secret_file to a header the SSO proxy adds to every request and \
                     the secret it sets it to (`openssl rand -hex 32`, in a 0600 file of the \
                     hub's account); optionally also proxy_addresses, the proxy's addresses",
                    self.auth_header,
                    self.listen,
                    match &self.listen {
                        Listen::Unix(_) => "on a unix socket: every account that may connect to it",
                        Listen::Tcp(a) if a.ip().is_loopback() => {
                            "on a loopback address: every account of this host"
                        }
                        Listen::Tcp(_) => "other hosts too",
                    }
                )
            }
            _ => {}
        }
        if self.login_failures == 0 || !(self.login_delay > 0.0 && self.login_delay < 86400.0) {
            bail!("login_failures must be at least 1 and login_delay between 0 and 86400 seconds");
        }
        if self.pam_in_flight == 0 {
            bail!("pam_in_flight must be at least 1");
        }
        self.validate_cookie_secure()
    }

    /// `cookie_secure = false` is for plain-HTTP tests on the hub's own
    /// host: with PAM logins (header mode sets no cookie: the SSO proxy
    /// names the user on every request) it is accepted only on a loopback
    /// TCP `listen` with no `proxy_addresses`. Anything else means users
    /// reach the hub over the network, directly or through a web server
    /// (a unix socket, or trusted proxies): a login cookie without Secure
    /// then goes over plain HTTP to anyone on the path (a link to
    /// `http://` the web server answers, or one that serves both). The
    /// hub says so rather than start. ([`crate::auth::secure_cookies`]
    /// makes requests that came over HTTPS Secure whatever hub.toml says;
    /// this refusal is what covers the others.)
    fn validate_cookie_secure(&self) -> anyhow::Result<()> {
        if self.cookie_secure || self.auth != Auth::Pam {
            return Ok(());
        }
        let listen = &self.listen;
        let why = match listen {
            Listen::Tcp(a) if !a.ip().is_loopback() => {
                format!("listen = {listen} is reached from other hosts")
            }
            Listen::Unix(_) => format!(
                "listen = {listen} is a unix socket, for a web server that users reach over \
                 the network"
            ),
            Listen::Tcp(_) if !self.proxy_addresses.is_empty() => format!(
                "proxy_addresses ({}) says a reverse proxy forwards users' requests to \
                 listen = {listen}",
                self.proxy_addresses
                    .iter()
                    .map(IpAddr::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Listen::Tcp(_) => return Ok(()),
        };
        bail!(
            "cookie_secure = false sends the login cookie without Secure, for plain-HTTP tests \
             on a loopback address with no proxy_addresses only; here {why}, and a cookie \
             without Secure goes to anyone on the path of a plain-HTTP request. Remove \
             cookie_secure (its default, true) and terminate TLS at the web server, which \
             sends X-Forwarded-Proto: https (docs/hub.md, \"For a real site\")"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str, profile: &str) -> anyhow::Result<HubConfig> {
        let cfg: HubConfig = toml::from_str(&format!(
            "listen = \"127.0.0.1:1\"\nlink_bind = \"127.0.0.1:2\"\nstate_dir = \"/x\"\n{extra}\n\
             [profiles.p]\npartitions = [\"q\"]\ncores = {{ min = 1, max = 2, default = 1 }}\n\
             minutes = {{ min = 1, max = 9, default = 5 }}\n{profile}"
        ))?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn oar_profiles_ask_for_cores_only() {
        let cfg = parse("scheduler = \"oar\"", "").unwrap();
        assert_eq!(cfg.scheduler, "oar");
        assert_eq!(cfg.profiles["p"].mem_gb.max, 0);
        let e = parse(
            "scheduler = \"oar\"",
            "mem_gb = { min = 1, max = 2, default = 1 }",
        )
        .unwrap_err();
        assert!(e.to_string().contains("remove mem_gb and gpus"), "{e}");
        assert!(parse("scheduler = \"oar\"", "qos = \"fast\"").is_err());
        assert_eq!(parse("", "").unwrap().scheduler, "slurm");
        assert!(parse("scheduler = \"pbs\"", "").is_err());
    }

    #[test]
    fn header_mode_needs_the_proxys_secret_on_every_address() {
        let on = |listen: &str, extra: &str| {
            let c: HubConfig = toml::from_str(&format!(
                "listen = \"{listen}\"\nlink_bind = \"127.0.0.1:2\"\nstate_dir = \"/x\"\n\
                 auth = \"header\"\n{extra}\n[profiles.p]\npartitions = [\"q\"]\n\
                 cores = {{ min = 1, max = 2, default = 1 }}\n\
                 minutes = {{ min = 1, max = 9, default = 5 }}\n"
            ))
            .unwrap();
            c.validate().map_err(|e| e.to_string())
        };
        let e = on("0.0.0.0:1", "").unwrap_err();
        assert!(
            e.contains("0.0.0.0:1")
                && e.contains("auth_secret_header")
                && e.contains("other hosts"),
            "{e}"
        );
        // Loopback too: every account of this host reaches it.
        let e = on("127.0.0.1:1", "").unwrap_err();
        assert!(
            e.contains("127.0.0.1:1")
                && e.contains("every account of this host")
                && e.contains("auth_secret_file"),
            "{e}"
        );
        let with_secret = "auth_secret_header = \"X-S\"\nauth_secret_file = \"/s\"";
        assert!(on("0.0.0.0:1", with_secret).is_ok());
        assert!(on("127.0.0.1:1", with_secret).is_ok());
        assert!(on("127.0.0.1:1", "auth_secret_header = \"X-S\"").is_err());
        assert!(
            parse(with_secret, "").is_err(),
            "a secret header is for header mode"
        );
        let c = parse(
            "auth_secret = \"abcdefghijklmnopqrs\"\nauth = \"header\"\nauth_secret_header = \"X\"",
            "",
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("abcdefghijklmnopqrs"));
    }

    #[test]
    fn cookie_secure_false_only_on_loopback_without_a_proxy() {
        let on = |listen: &str, extra: &str| {
            let c: HubConfig = toml::from_str(&format!(
                "listen = \"{listen}\"\nlink_bind = \"127.0.0.1:2\"\nstate_dir = \"/x\"\n\
                 {extra}\n[profiles.p]\npartitions = [\"q\"]\n\
                 cores = {{ min = 1, max = 2, default = 1 }}\n\
                 minutes = {{ min = 1, max = 9, default = 5 }}\n"
            ))
            .unwrap();
            c.validate().map_err(|e| e.to_string())
        };
        let plain = "cookie_secure = false";
        for listen in ["0.0.0.0:8000", "192.0.2.1:8000", "[::]:8000"] {
            let e = on(listen, plain).unwrap_err();
            assert!(
                e.contains(listen) && e.contains("Remove cookie_secure"),
                "{e}"
            );
            assert!(on(listen, "").is_ok());
        }
        for listen in ["127.0.0.1:8000", "[::1]:8000"] {
            assert!(on(listen, plain).is_ok(), "{listen}");
        }
        // Behind a web server users reach over the network: refused too.
        let e = on("unix:/run/hub/web.sock", plain).unwrap_err();
        assert!(
            e.contains("unix:/run/hub/web.sock")
                && e.contains("unix socket")
                && e.contains("X-Forwarded-Proto: https")
                && e.contains("Remove cookie_secure"),
            "{e}"
        );
        assert!(on("unix:/run/hub/web.sock", "").is_ok());
        for listen in ["127.0.0.1:8000", "[::1]:8000"] {
            let proxied = format!("{plain}\nproxy_addresses = [\"127.0.0.1\"]");
            let e = on(listen, &proxied).unwrap_err();
            assert!(
                e.contains(listen)
                    && e.contains("proxy_addresses (127.0.0.1)")
                    && e.contains("X-Forwarded-Proto: https")
                    && e.contains("Remove cookie_secure"),
                "{e}"
            );
            assert!(on(listen, "proxy_addresses = [\"127.0.0.1\"]").is_ok());
        }
        // Header mode logs no one in with a cookie: nothing to refuse.
        let header = "cookie_secure = false\nauth = \"header\"\n\
                      auth_secret_header = \"X-S\"\nauth_secret_file = \"/s\"";
        assert!(on("0.0.0.0:8000", header).is_ok());
    }

    #[test]
    fn concurrent_submissions_is_1_to_64_default_4() {
        assert_eq!(parse("", "").unwrap().concurrent_submissions, 4);
        let n = parse("concurrent_submissions = 16", "").unwrap();
        assert_eq!(n.concurrent_submissions, 16);
        assert_eq!(
            parse("concurrent_submissions = 64", "")
                .unwrap()
                .concurrent_submissions,
            64
        );
        for bad in ["0", "65", "-1"] {
            let e = parse(&format!("concurrent_submissions = {bad}"), "").unwrap_err();
            let e = format!("{e:#}");
            assert!(
                e.contains(&format!("concurrent_submissions = {bad}: "))
                    && e.contains("give a whole number from 1 to 64 (default 4)"),
                "{e}"
            );
        }
        let e = parse("concurrent_submissions = \"8\"", "").unwrap_err();
        assert!(format!("{e:#}").contains("concurrent_submissions"), "{e:#}");
    }

    #[test]
    fn scheduler_tables_give_command_paths() {
        let cmd = noyau_sched::Scheduler::named("slurm").unwrap().commands()[1];
        let cfg = parse(&format!("[slurm]\n{cmd} = \"/x/{cmd}\"\n[oar]\n"), "").unwrap();
        assert_eq!(
            cfg.commands("slurm").unwrap(),
            [(cmd.to_string(), format!("/x/{cmd}"))]
        );
        let typo = &cmd[..cmd.len() - 1];
        let e = parse(&format!("[slurm]\n{typo} = \"/x\""), "").unwrap_err();
        assert!(
            format!("{e:#}").contains(&format!("did you mean `{cmd}`")),
            "{e:#}"
        );
        let e = parse("[slrum]\n", "").unwrap_err().to_string();
        assert!(
            e.contains("unknown key `slrum`, did you mean `slurm`"),
            "{e}"
        );
        let e = parse("polll_interval = 3", "").unwrap_err().to_string();
        assert!(e.contains("did you mean `poll_interval`"), "{e}");
    }
}
