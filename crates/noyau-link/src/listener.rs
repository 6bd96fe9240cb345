//! The proxy side: listens, authenticates agents, routes reconnects.
//!
//! Every incoming TCP connection gets its own short-lived handshake task, so a
//! slow or hostile client cannot stall others. A `Hello` with a valid one-time
//! token starts a new session (handed out by `accept`); a `Resume` with the
//! right session id and secret is passed to that session's task, which swaps
//! it in. Tokens are stored only as SHA-256 digests: the lookup then leaks
//! nothing useful through timing, and a memory dump does not reveal them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsStream};

use crate::codec::{Frame, LaneSeqs, Secret, SessionId};
use crate::connection::Conn;
use crate::session::{self, Reconnect};
use crate::state::Shared;
use crate::tls::{ct_eq, ServerIdentity};
use crate::{CloseReason, Link, LinkConfig, LinkError};

/// Time a client gets to finish TLS and say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A reconnect accepted by the handshake task, for the session to adopt.
pub(crate) struct Resumed {
    conn: Conn,
    /// The secret to give the agent for its next reconnect.
    secret: Secret,
    peer_last: LaneSeqs,
}

struct SessionEntry {
    /// The secret the agent is known to hold.
    secret: Secret,
    /// The secret last handed out, not yet proven received: a connection
    /// that drops before the agent reads its Welcome must not lock the agent
    /// out, so `secret` stays valid until `pending` is used once.
    pending: Option<Secret>,
    conns: mpsc::Sender<Resumed>,
}

#[derive(Default)]
struct Registry {
    tokens: Mutex<HashSet<[u8; 32]>>,
    /// Tokens announced but not accepted yet ([`Tokens::expect`]).
    expected: Mutex<HashSet<[u8; 32]>>,
    sessions: Mutex<HashMap<SessionId, SessionEntry>>,
}

/// Listens for agents. Dropping it stops accepting; live sessions go on but
/// can no longer reconnect.
pub struct LinkListener {
    local_addr: SocketAddr,
    /// The listening socket, shared with the accept loop, for [`Self::dup_socket`].
    tcp: Arc<TcpListener>,
    pin: String,
    registry: Arc<Registry>,
    new_links: mpsc::Receiver<Link>,
    accept_task: JoinHandle<()>,
}

impl std::fmt::Debug for LinkListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkListener")
            .field("local_addr", &self.local_addr)
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

impl Drop for LinkListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl LinkListener {
    pub async fn bind(
        addr: SocketAddr,
        identity: ServerIdentity,
        cfg: LinkConfig,
    ) -> Result<Self, LinkError> {
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|e| LinkError::io(format!("binding the link listener to {addr}"), e))?;
        Self::serve(tcp, identity, cfg)
    }

    /// Serves on a socket already listening (one a previous proxy kept
    /// for this one): the caller has checked what it is.
    pub fn from_std(
        tcp: std::net::TcpListener,
        identity: ServerIdentity,
        cfg: LinkConfig,
    ) -> Result<Self, LinkError> {
        let adopted = tcp
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(tcp));
        let tcp = adopted.map_err(|e| LinkError::io("adopting a listening socket", e))?;
        Self::serve(tcp, identity, cfg)
    }

    fn serve(
        tcp: TcpListener,
        identity: ServerIdentity,
        cfg: LinkConfig,
    ) -> Result<Self, LinkError> {
        let pin = identity.pin()?;
        let acceptor = TlsAcceptor::from(Arc::new(identity.server_config()?));
        let local_addr = tcp
            .local_addr()
            .map_err(|e| LinkError::io("reading the listener address", e))?;
        let tcp = Arc::new(tcp);
        let registry = Arc::new(Registry::default());
        let (tx, new_links) = mpsc::channel(16);
        let accept_task = tokio::spawn(accept_loop(
            tcp.clone(),
            acceptor,
            registry.clone(),
            tx,
            cfg,
        ));
        Ok(LinkListener {
            local_addr,
            tcp,
            pin,
            registry,
            new_links,
            accept_task,
        })
    }

    /// A second descriptor of the listening socket, for a process that
    /// keeps the port listening once this one is gone.
    pub fn dup_socket(&self) -> std::io::Result<OwnedFd> {
        self.tcp.as_fd().try_clone_to_owned()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The certificate pin agents must be given.
    pub fn pin(&self) -> String {
        self.pin.clone()
    }

    /// A fresh one-time token (64 hex digits) for one new agent session.
    pub fn issue_token(&self) -> String {
        let token = hex::encode(rand::random::<[u8; 32]>());
        lock(&self.registry.tokens).insert(Sha256::digest(token.as_bytes()).into());
        token
    }

    /// Accepts a one-time token chosen elsewhere: a proxy taking over from
    /// the previous one honours the token its predecessor gave the agent.
    pub fn add_token(&self, token: &str) {
        lock(&self.registry.tokens).insert(Sha256::digest(token.as_bytes()).into());
    }

    /// A handle that accepts tokens while `accept` is being awaited
    /// elsewhere (the hub adds one per session it follows).
    pub fn tokens(&self) -> Tokens {
        Tokens(self.registry.clone())
    }

    /// The next new authenticated session.
    pub async fn accept(&mut self) -> Result<Link, LinkError> {
        self.new_links.recv().await.ok_or(LinkError::ListenerClosed)
    }
}

/// Adds one-time tokens to a listener; cheap to clone.
#[derive(Clone)]
pub struct Tokens(Arc<Registry>);

impl Tokens {
    /// As [`LinkListener::add_token`].
    pub fn add(&self, token: &str) {
        lock(&self.0.tokens).insert(Sha256::digest(token.as_bytes()).into());
    }

    /// Forgets a token not used yet (one that can no longer be honoured).
    pub fn revoke(&self, token: &str) {
        lock(&self.0.tokens).remove(&<[u8; 32]>::from(Sha256::digest(token.as_bytes())));
    }

    /// Announces a token that will be accepted later ([`Tokens::add`]):
    /// a dial with it is refused as any unknown token, but logged at debug
    /// level, not as a warning (an agent may dial before the hub lets its
    /// token in: it dials again). Until used or [`Tokens::forget`]-ten.
    pub fn expect(&self, token: &str) {
        lock(&self.0.expected).insert(Sha256::digest(token.as_bytes()).into());
    }

    /// Neither accepts nor expects a token any more.
    pub fn forget(&self, token: &str) {
        let digest = <[u8; 32]>::from(Sha256::digest(token.as_bytes()));
        lock(&self.0.tokens).remove(&digest);
        lock(&self.0.expected).remove(&digest);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn accept_loop(
    tcp: Arc<TcpListener>,
    acceptor: TlsAcceptor,
    registry: Arc<Registry>,
    new_links: mpsc::Sender<Link>,
    cfg: LinkConfig,
) {
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Usually EMFILE or a connection reset before accept: keep
                // serving the others.
                tracing::warn!("link listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, registry, new_links) =
            (acceptor.clone(), registry.clone(), new_links.clone());
        tokio::spawn(async move {
            let res = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                handshake(stream, acceptor, &registry, &new_links, cfg),
            )
            .await
            .unwrap_or(Err(LinkError::Timeout("waiting for the agent's hello")));
            if let Err(e) = res {
                tracing::warn!(%peer, "link: refused connection: {e}");
            }
        });
    }
}

async fn handshake(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    registry: &Arc<Registry>,
    new_links: &mpsc::Sender<Link>,
    cfg: LinkConfig,
) -> Result<(), LinkError> {
    // Our writer batches already; don't let Nagle delay control messages.
    let _ = stream.set_nodelay(true);
    crate::connection::keep_alive(&stream);
    let tls = acceptor
        .accept(stream)
        .await
        .map_err(|e| LinkError::io("TLS handshake", e))?;
    let mut conn = Conn::new(TlsStream::Server(tls));
    match conn.read_frame().await? {
        Frame::Hello { token } => {
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            if !lock(&registry.tokens).remove(&digest) {
                let refused = refuse(conn, "unknown or already used token").await;
                if lock(&registry.expected).contains(&digest) {
                    tracing::debug!(
                        "link: refused an agent that dialled before its token was let in"
                    );
                    return Ok(());
                }
                return refused;
            }
            lock(&registry.expected).remove(&digest);
            let session: SessionId = rand::random();
            let secret: Secret = rand::random();
            let (tx, rx) = mpsc::channel(4);
            lock(&registry.sessions).insert(
                session,
                SessionEntry {
                    secret,
                    pending: None,
                    conns: tx,
                },
            );
            let mut side = ProxySide {
                session,
                registry: registry.clone(),
                conns: rx,
                give_up_after: cfg.give_up_after,
            };
            let shared = session::new_shared(cfg);
            let first = side
                .adopt(
                    &shared,
                    Resumed {
                        conn,
                        secret,
                        peer_last: [0; 4],
                    },
                )
                .await;
            match first {
                Ok(conn) => {
                    let link = session::start(shared, conn, side, Some(digest));
                    new_links
                        .send(link)
                        .await
                        .map_err(|_| LinkError::ListenerClosed)
                }
                Err(e) => {
                    side.finished();
                    Err(e)
                }
            }
        }
        Frame::Resume {
            session,
            secret,
            last_recv,
        } => {
            let entry = {
                let mut sessions = lock(&registry.sessions);
                match sessions.get_mut(&session) {
                    Some(e)
                        if ct_eq(&e.secret, &secret)
                            || e.pending.is_some_and(|p| ct_eq(&p, &secret)) =>
                    {
                        // Using the pending secret proves the agent has it; the
                        // older one is retired. Each reconnect gets a new one.
                        e.secret = secret;
                        let next: Secret = rand::random();
                        e.pending = Some(next);
                        Some((e.conns.clone(), next))
                    }
                    _ => None,
                }
            };
            let Some((conns, next)) = entry else {
                return refuse(conn, "unknown session or invalid resume secret").await;
            };
            conns
                .send(Resumed {
                    conn,
                    secret: next,
                    peer_last: last_recv,
                })
                .await
                .map_err(|_| LinkError::Refused("session already closed".into()))
        }
        _ => Err(LinkError::Protocol(
            "first frame is neither hello nor resume".into(),
        )),
    }
}

/// Tells the agent why, then hangs up. The token is never logged.
async fn refuse(mut conn: Conn, reason: &str) -> Result<(), LinkError> {
    let _ = conn
        .write_frame(&Frame::Refused {
            reason: reason.into(),
        })
        .await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut conn.stream).await;
    Err(LinkError::Refused(reason.into()))
}

struct ProxySide {
    session: SessionId,
    registry: Arc<Registry>,
    conns: mpsc::Receiver<Resumed>,
    give_up_after: Duration,
}

impl Reconnect for ProxySide {
    type Replacement = Resumed;

    fn replacements(&mut self) -> Option<&mut mpsc::Receiver<Resumed>> {
        Some(&mut self.conns)
    }

    async fn adopt(&mut self, shared: &Arc<Shared>, r: Resumed) -> Result<Conn, LinkError> {
        let Resumed {
            mut conn,
            secret,
            peer_last,
        } = r;
        shared.out().rewind(&peer_last)?;
        let last_recv = shared.recv().take_ack();
        conn.write_frame(&Frame::Welcome {
            session: self.session,
            secret,
            last_recv,
        })
        .await?;
        Ok(conn)
    }

    async fn reconnect(&mut self, shared: &Arc<Shared>) -> Result<Conn, CloseReason> {
        let deadline = tokio::time::Instant::now() + self.give_up_after;
        loop {
            match tokio::time::timeout_at(deadline, self.conns.recv()).await {
                Ok(Some(r)) => match self.adopt(shared, r).await {
                    Ok(c) => return Ok(c),
                    Err(e) => tracing::warn!("link: resume handshake failed: {e}"),
                },
                // The registry holds a sender until `finished`, so `None`
                // cannot happen; treat it like the timeout anyway.
                Ok(None) | Err(_) => return Err(CloseReason::GaveUp),
            }
        }
    }

    fn finished(&mut self) {
        lock(&self.registry.sessions).remove(&self.session);
    }
}
