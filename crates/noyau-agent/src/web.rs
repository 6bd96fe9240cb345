//! `noyau agent --serve lab|server`: the hub's side of a batch job.
//!
//! Instead of a kernel, the agent starts a Jupyter server (JupyterLab or
//! plain jupyter_server) listening on a unix socket in its 0700 runtime
//! directory, its kernels on ipc sockets in the same directory, so nothing
//! listens on a TCP port of the compute node and no other user of the node
//! can connect. It dials the hub over the link and
//! serves the hub's tunnel streams ([`noyau_link::tunnel`]) by connecting
//! each to that socket: HTTP and WebSocket traffic are bytes to it.
//!
//! Each link token works once (whoever reads the job's environment has the
//! first one): once connected, the hub sends the token for the agent's next
//! dial (`{"next_token": …}`), which the agent keeps in memory and
//! acknowledges. The hub may restart: the link's resume is then refused
//! (the new hub process does not know the session) and the agent dials
//! again with that token, which the hub recorded.

use noyau_vars::EnvVars;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use noyau_client::RuntimeDir;
use noyau_link::tunnel::{Delivered, Tunnel};
use noyau_link::{CloseReason, Incoming, LinkEvent};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use crate::AgentConfig;

/// How long the server gets to create its socket.
const SERVER_START: Duration = Duration::from_secs(180);

/// Which Jupyter application to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Lab,
    Server,
}

impl std::str::FromStr for Server {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lab" => Ok(Server::Lab),
            "server" => Ok(Server::Server),
            other => Err(format!("unknown server {other:?}: use lab or server")),
        }
    }
}

/// The hub session this job serves: `NOYAU_HUB_SESSION` (an id, no secret)
/// and `NOYAU_HUB_BASE_URL` (`/user/NAME/`), set by the hub in the job.
pub struct WebConfig {
    pub agent: AgentConfig,
    pub server: Server,
    pub session: String,
    pub base_url: String,
}

impl WebConfig {
    pub fn from_env(agent: AgentConfig, server: Server) -> anyhow::Result<Self> {
        let var = |n: &str| {
            std::env::var(n).with_context(|| {
                format!("{n} is not set: `noyau agent --serve` is started by `noyau hub` in a batch job")
            })
        };
        let base_url = var(EnvVars::NOYAU_HUB_BASE_URL)?;
        if !base_url.starts_with('/') || !base_url.ends_with('/') {
            bail!("NOYAU_HUB_BASE_URL={base_url:?} must start and end with /");
        }
        Ok(WebConfig {
            session: var(EnvVars::NOYAU_HUB_SESSION)?,
            agent,
            server,
            base_url,
        })
    }
}

/// Runs the server and serves the hub until the server ends, the job is
/// cancelled, or the hub stays away for `give_up_after`.
pub async fn serve(cfg: WebConfig) -> anyhow::Result<i32> {
    let dir = RuntimeDir::create("hub")?;
    let sock = dir.path().join("jupyter.sock");
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    // The scheduler's walltime signal (SIGUSR1; Grid Engine's SIGUSR2, which
    // is also its cancel); its default action would end the agent.
    let sched = noyau_sched::this_job().map(|(s, _)| s);
    let sig = sched
        .as_ref()
        .map_or(nix::libc::SIGUSR1, |s| s.walltime_signal());
    let mut usr1 =
        signal(SignalKind::from_raw(sig)).context("installing the walltime signal's handler")?;
    let mut child = start_server(&cfg, dir.path(), &sock)?;
    tokio::select! {
        r = wait_for_socket(&sock, &mut child) => r?,
        _ = sigterm.recv() => { stop(&mut child).await; return Ok(143); }
    }
    tracing::info!(socket = %sock.display(), "Jupyter server is up");
    let mut down_since: Option<Instant> = None;
    let mut token = cfg.agent.token.clone();
    loop {
        let link = tokio::select! {
            l = crate::dial_until(&cfg.agent, &token, Duration::from_secs(30)) => l,
            status = child.wait() => return Ok(exit_code(status)),
            _ = sigterm.recv() => { stop(&mut child).await; return Ok(143); }
        };
        let mut link = match link {
            Ok(l) => {
                down_since = None;
                l
            }
            Err(e) => {
                let since = *down_since.get_or_insert_with(Instant::now);
                if since.elapsed() > cfg.agent.give_up_after {
                    tracing::warn!("the hub stayed away: {e:#}; stopping the server");
                    stop(&mut child).await;
                    return Ok(0);
                }
                tracing::info!("hub unreachable ({e:#}); retrying");
                continue;
            }
        };
        let tunnel = Tunnel::new(link.sender());
        tunnel.notice(&serde_json::json!({
            "hello": cfg.session,
            "token": token,
            "host": crate::hostname(),
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            // it grants credit on the streams the hub opens with flow control
            "credit": true,
        }))?;
        let closed = loop {
            tokio::select! {
                m = link.recv() => match m {
                    Some(Incoming::Message(_, frames)) => {
                        from_hub(&tunnel, &frames, &sock, &mut token).await;
                    }
                    Some(Incoming::Event(LinkEvent::Closed(reason))) => break reason,
                    Some(Incoming::Event(e)) => tracing::info!("link: {e:?}"),
                    None => break CloseReason::PeerClosed,
                },
                status = child.wait() => {
                    let code = exit_code(status);
                    let _ = tunnel.notice(&serde_json::json!({"ended": format!("the Jupyter server exited with status {code}")}));
                    link.close().await;
                    return Ok(code);
                }
                _ = sigterm.recv() => { stop(&mut child).await; return Ok(143); }
                _ = usr1.recv() => {
                    if sched.as_ref().is_some_and(|s| s.signal_means_cancel()) {
                        stop(&mut child).await;
                        return Ok(143);
                    }
                    tracing::warn!("the walltime signal: the job's walltime is near");
                    let _ = tunnel.notice(&serde_json::json!({"walltime_near": true}));
                }
            }
        };
        // A hub restart refuses the resume: dial it afresh with the last token it gave.
        tracing::info!(
            "link to the hub closed ({reason}); dialling again",
            reason = closed
        );
    }
}

/// A message from the hub: a stream to connect to the Jupyter server, or
/// the token for the next dial (kept in memory only, and acknowledged).
async fn from_hub(tunnel: &Arc<Tunnel>, frames: &[bytes::Bytes], sock: &Path, token: &mut String) {
    match tunnel.deliver(frames) {
        Delivered::Opened { id, credit } => match UnixStream::connect(sock).await {
            Ok(s) => tunnel.attach(id, s, credit),
            Err(e) => {
                tracing::warn!("cannot reach the Jupyter server: {e}");
                tunnel.reset(id);
            }
        },
        Delivered::Notice(v) => {
            if let Some(next) = v["next_token"].as_str() {
                *token = next.to_string();
                let _ = tunnel.notice(&serde_json::json!({"next_token_ack": true}));
            }
        }
        // The hub is trusted: a hub this agent's tunnel finds at fault is
        // a bug to report, not a peer to cut off.
        Delivered::Violation(why) => {
            tracing::warn!("the hub broke the tunnel's limits ({why}): its streams were reset");
        }
        Delivered::Malformed => tracing::warn!("the hub sent a malformed tunnel message"),
        Delivered::Handled => {}
    }
}

fn start_server(cfg: &WebConfig, dir: &Path, sock: &Path) -> anyhow::Result<Child> {
    let jupyter = std::env::var(EnvVars::NOYAU_JUPYTER).unwrap_or_else(|_| "jupyter".into());
    let app = match cfg.server {
        Server::Lab => "lab",
        Server::Server => "server",
    };
    let config_path = hub_page_config(dir, &cfg.base_url)?;
    let mut cmd = Command::new(&jupyter);
    // No token: the socket is in a 0700 directory, so only this user can
    // connect, and the hub lets only its owner through.
    cmd.arg(app)
        .arg("--no-browser")
        .arg(format!("--ServerApp.sock={}", sock.display()))
        .arg("--ServerApp.sock_mode=0600")
        .arg(format!("--ServerApp.base_url={}", cfg.base_url))
        .arg("--IdentityProvider.token=")
        .arg("--ServerApp.password=")
        // The hub sends its own Host; the socket is private anyway.
        .arg("--ServerApp.allow_remote_access=True")
        // Kernels on ipc sockets in the private runtime directory: on tcp
        // (jupyter_client's default) any user of the node could connect to
        // a kernel's IOPub port and read every cell and output.
        .arg("--KernelManager.transport=ipc")
        .env("JUPYTER_RUNTIME_DIR", dir.join("runtime"))
        .env(EnvVars::JUPYTER_CONFIG_PATH, config_path)
        .env_remove(EnvVars::NOYAU_LINK_TOKEN)
        .env_remove(EnvVars::NOYAU_LINK_PIN)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .process_group(0);
    cmd.spawn().with_context(|| {
        format!(
            "cannot start `{jupyter} {app}` (set NOYAU_JUPYTER or PATH in the hub profile's env)"
        )
    })
}

/// Tells noyau's JupyterLab extension (labextension/src/hub.ts) that the hub
/// serves this JupyterLab, so it shows its "Hub" menu: `noyauHubPrefix` in a
/// `labconfig/page_config.json` under `dir`, a config dir put first on
/// JUPYTER_CONFIG_PATH. JupyterLab merges it into its page config with the
/// site's and the user's (`--ServerApp.tornado_settings` would replace a
/// site's tornado_settings). Returns the JUPYTER_CONFIG_PATH to set.
fn hub_page_config(dir: &Path, base_url: &str) -> anyhow::Result<std::ffi::OsString> {
    let config = dir.join("config");
    let labconfig = config.join("labconfig");
    std::fs::create_dir_all(&labconfig)
        .with_context(|| format!("cannot create {}", labconfig.display()))?;
    let page = serde_json::json!({ "noyauHubPrefix": hub_prefix(base_url) });
    std::fs::write(labconfig.join("page_config.json"), page.to_string())
        .with_context(|| format!("cannot write {}/page_config.json", labconfig.display()))?;
    let mut paths = vec![config];
    if let Some(user) = std::env::var_os(EnvVars::JUPYTER_CONFIG_PATH) {
        paths.extend(std::env::split_paths(&user));
    }
    std::env::join_paths(paths).context("JUPYTER_CONFIG_PATH holds a ':' in a path")
}

/// The hub's own pages beside a session's base URL: `/user/NAME/` is served
/// by the hub that has its pages under `/hub/` (crates/noyau-hub/src/lib.rs).
fn hub_prefix(base_url: &str) -> String {
    match base_url.rfind("/user/") {
        Some(i) => format!("{}/hub/", &base_url[..i]),
        None => "/hub/".into(),
    }
}

async fn wait_for_socket(sock: &Path, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + SERVER_START;
    loop {
        if UnixStream::connect(sock).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the Jupyter server exited before it listened ({status}); its log is above");
        }
        if Instant::now() > deadline {
            bail!(
                "the Jupyter server did not listen on {} within {SERVER_START:?}",
                sock.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    status.ok().and_then(|s| s.code()).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_prefix_beside_the_user_path() {
        assert_eq!(hub_prefix("/user/alice/"), "/hub/");
        assert_eq!(hub_prefix("/jupyter/user/alice/"), "/jupyter/hub/");
        assert_eq!(hub_prefix("/lab/"), "/hub/");
    }

    #[test]
    fn page_config_names_the_hub_and_comes_first() {
        let tmp = std::env::temp_dir().join(format!("noyau-web-test-{}", std::process::id()));
        let path = hub_page_config(&tmp, "/user/bob/").unwrap();
        let page = std::fs::read_to_string(tmp.join("config/labconfig/page_config.json")).unwrap();
        std::fs::remove_dir_all(&tmp).unwrap();
        let page: serde_json::Value = serde_json::from_str(&page).unwrap();
        assert_eq!(page, serde_json::json!({"noyauHubPrefix": "/hub/"}));
        let first = std::env::split_paths(&path).next().unwrap();
        assert_eq!(first, tmp.join("config"));
    }
}
