//! How an agent learns where its proxy is and how to prove who it is.
//!
//! The address, certificate pin and token come from the job's environment
//! or from a 0600 file, never from argv, where `ps` and the scheduler's job
//! listing would show them to every user of the machine. They are removed from the environment
//! once read, so the kernel does not inherit them.

use noyau_vars::EnvVars;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub link_addr: String,
    pub pin: String,
    pub token: String,
    /// Name of the kernelspec to run, found on this node's Jupyter paths.
    pub inner: String,
    /// How long to wait for a new proxy after the last one detached.
    pub reattach_grace: Duration,
    /// How long to keep redialling a proxy that went away without a word.
    pub give_up_after: Duration,
    /// What the link may hold while the proxy is unreachable.
    pub buffer_limit: usize,
    /// The environment to realise before the kernel starts, from
    /// `NOYAU_ENV_SPEC` (JSON).
    pub env_spec: Option<noyau_env::EnvSpec>,
    /// What the submitting host built and fetched for it
    /// (`NOYAU_ENV_PREPARED`): checked and used here, offline.
    pub prepared: Option<noyau_env::Prepared>,
    /// The history file of an IPython kernel (`:memory:` for `noyau run`),
    /// from `NOYAU_IPYTHON_HIST_FILE`; unset or empty: IPython's default.
    pub ipython_hist_file: Option<String>,
}

#[derive(Deserialize)]
struct SecretsFile {
    link_addr: String,
    pin: String,
    token: String,
}

fn take_env(name: &str) -> Option<String> {
    let v = std::env::var(name).ok();
    std::env::remove_var(name);
    v
}

fn secs(name: &str, default: u64) -> anyhow::Result<Duration> {
    match noyau_vars::seconds(name) {
        Some(v) => v.map_err(anyhow::Error::msg),
        None => Ok(Duration::from_secs(default)),
    }
}

impl AgentConfig {
    /// Reads the configuration, from `secrets_file` if given (deleted once
    /// read), else from `NOYAU_LINK_ADDR`, `NOYAU_LINK_PIN`, `NOYAU_LINK_TOKEN`.
    pub fn load(secrets_file: Option<&Path>, inner: Option<String>) -> anyhow::Result<Self> {
        let (link_addr, pin, token) = match secrets_file {
            Some(path) => {
                // Not followed through a link, ours, 0600: it holds the link's token.
                let mut file = noyau_trust::Expect::file().open(path).with_context(|| {
                    format!("cannot use the agent's secrets file {}", path.display())
                })?;
                let mut text = Vec::new();
                std::io::Read::read_to_end(&mut file, &mut text)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let _ = std::fs::remove_file(path);
                let s: SecretsFile = serde_json::from_slice(&text)
                    .with_context(|| format!("{} is not a noyau secrets file", path.display()))?;
                (s.link_addr, s.pin, s.token)
            }
            None => {
                let missing = |n: &str| {
                    format!("{n} is not set: `noyau agent` is started by `noyau kernel` through a backend, which passes it the link address, pin and token")
                };
                (
                    take_env(EnvVars::NOYAU_LINK_ADDR)
                        .with_context(|| missing(EnvVars::NOYAU_LINK_ADDR))?,
                    take_env(EnvVars::NOYAU_LINK_PIN)
                        .with_context(|| missing(EnvVars::NOYAU_LINK_PIN))?,
                    take_env(EnvVars::NOYAU_LINK_TOKEN)
                        .with_context(|| missing(EnvVars::NOYAU_LINK_TOKEN))?,
                )
            }
        };
        let inner = inner
            .or_else(|| take_env(EnvVars::NOYAU_INNER))
            .unwrap_or_else(|| "python3".into());
        let env_spec = take_env(EnvVars::NOYAU_ENV_SPEC)
            .map(|json| {
                noyau_env::EnvSpec::from_json(&json).context("the kernel's environment spec")
            })
            .transpose()?;
        let prepared = take_env(EnvVars::NOYAU_ENV_PREPARED)
            .map(|json| noyau_env::Prepared::from_json(&json))
            .transpose()?;
        Ok(AgentConfig {
            env_spec,
            prepared,
            ipython_hist_file: take_env(EnvVars::NOYAU_IPYTHON_HIST_FILE).filter(|v| !v.is_empty()),
            link_addr,
            pin,
            token,
            inner,
            reattach_grace: secs(EnvVars::NOYAU_REATTACH_GRACE, 30)?,
            give_up_after: secs(EnvVars::NOYAU_LINK_GIVE_UP, 120)?,
            buffer_limit: match std::env::var(EnvVars::NOYAU_LINK_BUFFER_MB) {
                Ok(v) => v
                    .parse::<usize>()
                    .ok()
                    .filter(|mb| *mb > 0)
                    .map(|mb| mb << 20)
                    .with_context(|| {
                        format!("NOYAU_LINK_BUFFER_MB={v:?} is not a positive number of MiB")
                    })?,
                Err(_) => noyau_link::LinkConfig::default().buffer_limit,
            },
        })
    }
}
