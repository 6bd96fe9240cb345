//! The agent side: dials out, authenticates, redials after a break.
//!
//! The first dial fails fast (a few quick tries, then a clear error) because
//! a wrong address, pin or token will not fix itself and the user is waiting.
//! Later redials are patient: exponential backoff with jitter, so that many
//! jobs cut off by the same network blip do not hammer the proxy in step,
//! until `give_up_after`.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::{TlsConnector, TlsStream};

use crate::codec::{Frame, Secret, SessionId};
use crate::connection::Conn;
use crate::session::{self, Reconnect};
use crate::state::Shared;
use crate::tls::{client_config, PinVerifier};
use crate::{CloseReason, Link, LinkConfig, LinkError};

const FIRST_DIAL_TRIES: u32 = 4;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Time for TCP + TLS + the welcome.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the proxy at `addr` (`host:port`), checks its certificate
/// against `pin`, and opens a new session with the one-time `token`.
pub async fn dial(addr: &str, pin: &str, token: &str, cfg: LinkConfig) -> Result<Link, LinkError> {
    let verifier = Arc::new(PinVerifier::new(pin)?);
    let connector = TlsConnector::from(Arc::new(client_config(verifier.clone())?));
    let mut delay = BACKOFF_START;
    let mut tries = 0;
    let mut conn = loop {
        tries += 1;
        match connect(addr, &connector, &verifier).await {
            Ok(c) => break c,
            // Only "nothing there (yet)" is worth retrying here.
            Err(e @ LinkError::Connect { .. }) if tries < FIRST_DIAL_TRIES => {
                tracing::debug!("link: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(e),
        }
    };
    conn.write_frame(&Frame::Hello {
        token: token.to_string(),
    })
    .await?;
    let (session, secret) =
        match timed(conn.read_frame(), "waiting for the proxy's welcome").await? {
            Frame::Welcome {
                session, secret, ..
            } => (session, secret),
            Frame::Refused { reason } => return Err(LinkError::Refused(reason)),
            _ => {
                return Err(LinkError::Protocol(
                    "proxy answered the hello with neither welcome nor refusal".into(),
                ))
            }
        };
    let side = AgentSide {
        addr: addr.to_string(),
        connector,
        verifier,
        session,
        secret,
        give_up_after: cfg.give_up_after,
    };
    Ok(session::start(session::new_shared(cfg), conn, side, None))
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, LinkError>>,
    what: &'static str,
) -> Result<T, LinkError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f)
        .await
        .unwrap_or(Err(LinkError::Timeout(what)))
}

/// TCP connect plus TLS handshake, with pin failures reported as such.
async fn connect(
    addr: &str,
    connector: &TlsConnector,
    verifier: &PinVerifier,
) -> Result<Conn, LinkError> {
    let tcp = timed(
        async {
            TcpStream::connect(addr)
                .await
                .map_err(|source| LinkError::Connect {
                    addr: addr.to_string(),
                    source,
                })
        },
        "connecting to the proxy",
    )
    .await?;
    let _ = tcp.set_nodelay(true);
    crate::connection::keep_alive(&tcp);
    // The verifier ignores the name (the pin is the identity); rustls still
    // needs one.
    let name = rustls::pki_types::ServerName::try_from("noyau-proxy")
        .map_err(|_| LinkError::Protocol("invalid server name".into()))?;
    let tls = timed(
        async {
            connector.connect(name, tcp).await.map_err(|e| {
                match verifier.refused.lock().ok().and_then(|mut r| r.take()) {
                    Some(got) => LinkError::PinMismatch {
                        expected: verifier.pin_hex(),
                        got,
                    },
                    None => LinkError::io("TLS handshake with the proxy", e),
                }
            })
        },
        "TLS handshake with the proxy",
    )
    .await?;
    Ok(Conn::new(TlsStream::Client(tls)))
}

struct AgentSide {
    addr: String,
    connector: TlsConnector,
    verifier: Arc<PinVerifier>,
    session: SessionId,
    secret: Secret,
    give_up_after: Duration,
}

impl AgentSide {
    async fn try_resume(&mut self, shared: &Arc<Shared>) -> Result<Conn, LinkError> {
        let mut conn = connect(&self.addr, &self.connector, &self.verifier).await?;
        // What we have delivered; the proxy resends from there.
        let last_recv = shared.recv().take_ack();
        conn.write_frame(&Frame::Resume {
            session: self.session,
            secret: self.secret,
            last_recv,
        })
        .await?;
        match timed(conn.read_frame(), "waiting for the proxy's welcome").await? {
            Frame::Welcome {
                session,
                secret,
                last_recv,
            } if session == self.session => {
                self.secret = secret;
                shared.out().rewind(&last_recv)?;
                Ok(conn)
            }
            Frame::Refused { reason } => Err(LinkError::Refused(reason)),
            _ => Err(LinkError::Protocol(
                "proxy answered the resume with neither welcome nor refusal".into(),
            )),
        }
    }
}

impl Reconnect for AgentSide {
    type Replacement = std::convert::Infallible;

    fn replacements(&mut self) -> Option<&mut tokio::sync::mpsc::Receiver<Self::Replacement>> {
        None
    }

    async fn adopt(&mut self, _: &Arc<Shared>, r: Self::Replacement) -> Result<Conn, LinkError> {
        match r {}
    }

    async fn reconnect(&mut self, shared: &Arc<Shared>) -> Result<Conn, CloseReason> {
        let deadline = Instant::now() + self.give_up_after;
        let mut delay = BACKOFF_START;
        loop {
            match self.try_resume(shared).await {
                Ok(c) => return Ok(c),
                // The proxy forgot the session (restart, gave up): retrying
                // cannot help.
                Err(LinkError::Refused(reason)) => {
                    tracing::warn!("link: proxy refused to resume the session: {reason}");
                    return Err(CloseReason::ResumeRefused(reason));
                }
                Err(e) => tracing::debug!("link: redial failed: {e}"),
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    "link: giving up after {:?} without the proxy",
                    self.give_up_after
                );
                return Err(CloseReason::GaveUp);
            }
            // Full jitter on the upper half: between delay/2 and delay.
            let jittered = delay.mul_f64(rand::random_range(0.5..=1.0));
            tokio::time::sleep(jittered.min(deadline - now)).await;
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }
}
