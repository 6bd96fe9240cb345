//! The network as the submitting host sees it: the site's package index and
//! HTTP(S) proxy, read once from the environment and pip's configuration.
//!
//! A login node often reaches PyPI only through a mirror (`UV_INDEX_URL`,
//! `UV_DEFAULT_INDEX`, `PIP_INDEX_URL`, or `index-url` in a pip.conf) or a
//! proxy (`HTTPS_PROXY`…). uv reads its own variables and the proxy ones;
//! pip's index (the variable or pip.conf), which uv does not read, is handed
//! to uv as `UV_DEFAULT_INDEX` when uv has none of its own. Whatever was
//! used goes into the environment's record, which ends up in the output
//! notebook, so it is shown without credentials ([`redact`]): a
//! `user:password@` and a query string are dropped.
//!
//! pip.conf is INI; only `index-url` and `extra-index-url` of `[global]`
//! or `[install]` matter here, so it is read by a few lines below rather
//! than a full INI library (pip's continuation lines are understood).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// uv's own index variables, strongest first.
const UV_INDEX_VARS: &[&str] = &["UV_DEFAULT_INDEX", "UV_INDEX_URL"];
const UV_EXTRA_VARS: &[&str] = &["UV_INDEX", "UV_EXTRA_INDEX_URL"];
const PIP_INDEX_VAR: &str = "PIP_INDEX_URL";
const PIP_EXTRA_VAR: &str = "PIP_EXTRA_INDEX_URL";
const PIP_CONFIG_VAR: &str = "PIP_CONFIG_FILE";
/// The proxy variables curl, pip, uv and reqwest read (lower case first, as they do).
const PROXY_VARS: &[&str] = &[
    "https_proxy",
    "HTTPS_PROXY",
    "http_proxy",
    "HTTP_PROXY",
    "all_proxy",
    "ALL_PROXY",
];
const NO_PROXY_VARS: &[&str] = &["no_proxy", "NO_PROXY"];

/// One index URL and where it was found.
#[derive(Debug, Clone, PartialEq)]
pub struct Index {
    /// As given, credentials included: only ever passed to uv.
    url: String,
    /// `UV_INDEX_URL`, `pip.conf (/etc/pip.conf)`…
    pub from: String,
}

impl Index {
    /// The URL without credentials, for records and messages.
    pub fn shown(&self) -> String {
        redact(&self.url)
    }
}

/// The site's network settings as this process sees them.
#[derive(Debug, Clone, Default)]
pub struct Network {
    /// The default index (None: uv's default, PyPI).
    pub index: Option<Index>,
    pub extra: Vec<Index>,
    /// (variable, value) of each proxy variable set.
    pub proxies: Vec<(String, String)>,
    pub no_proxy: Option<String>,
    /// True when the index came from pip's settings and uv must be told.
    pip_only: bool,
    /// pip's own index (`PIP_INDEX_URL`, pip.conf), which pip uses to
    /// install uv when there is none.
    pip_index: Option<Index>,
    /// uv's index variables of this process are ignored ([`Network::recorded`]).
    exclusive: bool,
}

impl Network {
    /// Reads the process environment and pip's configuration files.
    pub fn from_env() -> Network {
        Network::read(&|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// Reads from `var` (the environment, or a test's table).
    pub fn read(var: &dyn Fn(&str) -> Option<String>) -> Network {
        let found = |names: &[&str]| {
            names.iter().find_map(|n| {
                var(n).map(|url| Index {
                    url,
                    from: (*n).to_string(),
                })
            })
        };
        let mut net = Network {
            proxies: PROXY_VARS
                .iter()
                .filter_map(|n| var(n).map(|v| ((*n).to_string(), v)))
                .collect(),
            no_proxy: NO_PROXY_VARS.iter().find_map(|n| var(n)),
            ..Network::default()
        };
        let extra_from = |names: &[&str]| -> Vec<Index> {
            names
                .iter()
                .filter_map(|n| var(n).map(|v| (n, v)))
                .flat_map(|(n, v)| {
                    v.split_whitespace()
                        .map(|u| Index {
                            url: u.to_string(),
                            from: (*n).to_string(),
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let conf = pip_conf(var);
        net.pip_index = found(&[PIP_INDEX_VAR]).or(conf.index);
        net.extra = extra_from(UV_EXTRA_VARS);
        if let Some(i) = found(UV_INDEX_VARS) {
            net.index = Some(i);
            return net;
        }
        net.index = net.pip_index.clone();
        if net.extra.is_empty() {
            net.extra = extra_from(&[PIP_EXTRA_VAR]);
            if net.extra.is_empty() {
                net.extra = conf.extra;
            }
        }
        net.pip_only = net.index.is_some() || !net.extra.is_empty();
        net
    }

    /// The indexes a build's record says it used (its `network`, without
    /// credentials), and only those: uv's cache keeps what it fetched per
    /// index, so an offline install must name the build's index to find it.
    pub fn recorded(net: &Value) -> Network {
        let one = |v: &Value| {
            v["url"].as_str().map(|u| Index {
                url: u.to_string(),
                from: "the build's record".into(),
            })
        };
        Network {
            index: one(&net["index"]),
            extra: net["extra_index"]
                .as_array()
                .map(|a| a.iter().filter_map(one).collect())
                .unwrap_or_default(),
            pip_only: true,
            exclusive: true,
            ..Network::default()
        }
    }

    /// uv's variables to unset before [`Network::uv_env`]'s are set.
    pub fn uv_env_removed(&self) -> Vec<&'static str> {
        match self.exclusive {
            true => UV_INDEX_VARS.iter().chain(UV_EXTRA_VARS).copied().collect(),
            false => Vec::new(),
        }
    }

    /// Variables to give uv so that it uses pip's index too.
    pub fn uv_env(&self) -> Vec<(String, String)> {
        if !self.pip_only {
            return Vec::new();
        }
        let mut env = Vec::new();
        if let Some(i) = &self.index {
            env.push(("UV_DEFAULT_INDEX".to_string(), i.url.clone()));
        }
        if !self.extra.is_empty() {
            let urls: Vec<&str> = self.extra.iter().map(|i| i.url.as_str()).collect();
            env.push(("UV_INDEX".to_string(), urls.join(" ")));
        }
        env
    }

    /// The index in words, for an error message: `http://…/simple (UV_INDEX_URL)`.
    pub fn index_shown(&self) -> String {
        match &self.index {
            Some(i) => format!("{} (from {})", i.shown(), i.from),
            None => "uv's default index, https://pypi.org/simple".into(),
        }
    }

    /// pip's index in words: where installing uv looks.
    pub fn pip_index_shown(&self) -> String {
        match &self.pip_index {
            Some(i) => format!("{} (from {})", i.shown(), i.from),
            None => "pip's default index, https://pypi.org/simple".into(),
        }
    }

    /// What goes in the record: indexes and proxies, without credentials.
    pub fn record(&self) -> Value {
        let one = |i: &Index| json!({"url": i.shown(), "from": i.from});
        let mut v = json!({});
        if let Some(i) = &self.index {
            v["index"] = one(i);
        }
        if !self.extra.is_empty() {
            v["extra_index"] = Value::Array(self.extra.iter().map(one).collect());
        }
        if let Some((n, p)) = self.proxies.first() {
            v["proxy"] = json!({"url": redact(p), "from": n});
        }
        v
    }
}

impl Network {
    /// An HTTP client that goes through the site's proxy as curl would:
    /// `https_proxy` for https URLs, `http_proxy` for http, `all_proxy`
    /// for both, none for hosts in `no_proxy`. (reqwest would read the
    /// same variables itself; reading them here keeps what was used in one
    /// place, and lets a test give its own.)
    pub fn http_client(&self) -> reqwest::Result<reqwest::blocking::Client> {
        let no_proxy = self
            .no_proxy
            .as_deref()
            .and_then(reqwest::NoProxy::from_string);
        let mut b = reqwest::blocking::Client::builder()
            .no_proxy()
            .connect_timeout(crate::data::CONNECT_TIMEOUT)
            .timeout(None)
            .user_agent(concat!("noyau/", env!("CARGO_PKG_VERSION")));
        for (var, url) in &self.proxies {
            let p = match var.to_ascii_lowercase().as_str() {
                "https_proxy" => reqwest::Proxy::https(url)?,
                "http_proxy" => reqwest::Proxy::http(url)?,
                _ => reqwest::Proxy::all(url)?,
            };
            b = b.proxy(p.no_proxy(no_proxy.clone()));
        }
        b.build()
    }
}

/// pip.conf's settings: the files pip reads, later wins.
#[derive(Default)]
struct PipConf {
    index: Option<Index>,
    extra: Vec<Index>,
}

fn pip_conf_files(var: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    if let Some(f) = var(PIP_CONFIG_VAR) {
        return vec![PathBuf::from(f)];
    }
    let mut files = vec![
        PathBuf::from("/etc/xdg/pip/pip.conf"),
        PathBuf::from("/etc/pip.conf"),
    ];
    // An empty or relative HOME is none (as a relative XDG_CONFIG_HOME):
    // it would name pip settings in the working directory, another user's
    // perhaps, whose index would then build the environment.
    let home = var(noyau_vars::EnvVars::HOME)
        .map(PathBuf::from)
        .filter(|h| h.is_absolute());
    if let Some(h) = &home {
        files.push(h.join(".pip/pip.conf"));
    }
    // A relative (or empty) XDG_CONFIG_HOME is ignored, as the XDG Base
    // Directory spec says: it would name a file in the working directory.
    let xdg = var(noyau_vars::EnvVars::XDG_CONFIG_HOME).filter(|x| Path::new(x).is_absolute());
    match xdg {
        Some(x) => files.push(PathBuf::from(x).join("pip/pip.conf")),
        None => files.extend(home.map(|h| h.join(".config/pip/pip.conf"))),
    }
    if let Some(v) = var(noyau_vars::EnvVars::VIRTUAL_ENV) {
        files.push(PathBuf::from(v).join("pip.conf"));
    }
    files
}

fn pip_conf(var: &dyn Fn(&str) -> Option<String>) -> PipConf {
    let mut conf = PipConf::default();
    for f in pip_conf_files(var) {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let from = format!("pip.conf ({})", f.display());
        for (key, value) in ini_values(&text) {
            let mut urls = value.split_whitespace().map(|u| Index {
                url: u.to_string(),
                from: from.clone(),
            });
            match key.as_str() {
                "index-url" => conf.index = urls.next_back(),
                "extra-index-url" => conf.extra = urls.collect(),
                _ => {}
            }
        }
    }
    conf
}

/// `(key, value)` of `[global]` and `[install]`, keys with `_` as `-`,
/// continuation lines (indented) joined to their key's value by a space.
fn ini_values(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut wanted = false;
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if let Some(section) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            wanted = matches!(section.trim(), "global" | "install");
            continue;
        }
        if !wanted {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = out.last_mut() {
                v.push(' ');
                v.push_str(t);
            }
            continue;
        }
        if let Some((k, v)) = t.split_once(['=', ':']) {
            out.push((k.trim().replace('_', "-"), v.trim().to_string()));
        }
    }
    out
}

/// A URL without its credentials and query: `https://u:p@host/x?t=1` →
/// `https://host/x`. Anything that does not parse is shown as its scheme
/// and host only, or `(hidden)`.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) if !url.contains('@') && !url.contains('?') => url.to_string(),
        Err(_) => "(hidden: not a URL noyau can show without its credentials)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn net(vars: &[(&str, &str)]) -> Network {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Network::read(&move |n| m.get(n).cloned())
    }

    #[test]
    fn uv_variables_win_and_need_no_translation() {
        let n = net(&[
            (
                "UV_INDEX_URL",
                "https://bob:s3cret@mirror.example/simple?token=x",
            ),
            ("PIP_INDEX_URL", "https://other/simple"),
            ("HTTPS_PROXY", "http://alice:pw@proxy:3128"),
        ]);
        assert!(n.uv_env().is_empty());
        let rec = n.record().to_string();
        assert!(rec.contains("https://mirror.example/simple"), "{rec}");
        assert!(rec.contains("http://proxy:3128/"), "{rec}");
        for secret in ["bob", "s3cret", "token", "alice", "pw@"] {
            assert!(!rec.contains(secret), "{secret} in {rec}");
        }
        assert!(n.index_shown().contains("UV_INDEX_URL"));
    }

    #[test]
    fn pip_settings_are_handed_to_uv() {
        let t = tempfile::tempdir().unwrap();
        let conf = t.path().join("pip.conf");
        std::fs::write(
            &conf,
            "[global]\nindex_url = https://u:p@mirror.site/pypi/simple\nextra-index-url =\n    https://a/simple\n    https://b/simple\n[freeze]\nindex-url = https://ignored\n",
        )
        .unwrap();
        let n = net(&[("PIP_CONFIG_FILE", conf.to_str().unwrap())]);
        assert_eq!(
            n.uv_env(),
            vec![
                (
                    "UV_DEFAULT_INDEX".to_string(),
                    "https://u:p@mirror.site/pypi/simple".to_string()
                ),
                (
                    "UV_INDEX".to_string(),
                    "https://a/simple https://b/simple".to_string()
                ),
            ]
        );
        let rec = n.record();
        assert_eq!(rec["index"]["url"], "https://mirror.site/pypi/simple");
        assert!(rec["index"]["from"].as_str().unwrap().contains("pip.conf"));
        let n = net(&[
            ("PIP_CONFIG_FILE", conf.to_str().unwrap()),
            ("PIP_INDEX_URL", "http://127.0.0.1:9/simple"),
        ]);
        assert_eq!(n.uv_env()[0].1, "http://127.0.0.1:9/simple");
        assert!(net(&[]).uv_env().is_empty() && net(&[]).record() == json!({}));
    }

    /// A relative XDG_CONFIG_HOME would read a pip.conf from the working
    /// directory (a shared one, maybe): ignored, as the XDG spec says.
    #[test]
    fn a_relative_xdg_config_home_is_ignored() {
        let with = |xdg: &'static str| {
            move |n: &str| match n {
                "HOME" => Some("/home/u".to_string()),
                "XDG_CONFIG_HOME" => Some(xdg.to_string()),
                _ => None,
            }
        };
        for relative in ["conf", ""] {
            let files = pip_conf_files(&with(relative));
            assert!(files.iter().all(|f| f.is_absolute()), "{files:?}");
            assert!(files.contains(&PathBuf::from("/home/u/.config/pip/pip.conf")));
        }
        let files = pip_conf_files(&with("/x"));
        assert!(
            files.contains(&PathBuf::from("/x/pip/pip.conf")),
            "{files:?}"
        );
    }

    /// An empty or relative HOME named pip.conf files in the working
    /// directory (another user's, maybe, whose index then built the
    /// environment): none is read from there.
    #[test]
    fn a_relative_home_is_ignored() {
        for home in ["", "u", "./u"] {
            let files = pip_conf_files(&move |n: &str| (n == "HOME").then(|| home.to_string()));
            assert!(
                files.iter().all(|f| f.is_absolute()),
                "HOME={home:?}: {files:?}"
            );
        }
    }
}
