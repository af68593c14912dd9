//! Connections to upstream nodes. Each worker thread keeps its own, as nginx workers do, so
//! checkout and release never contend across threads: idle HTTP/1.1 connections in a list per
//! node, and one shared HTTP/2 connection per node (its requests are multiplexed).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::body::ReqBody;
use crate::snapshot::{Keepalive, NodeRt};

/// How an upstream's nodes are spoken to.
#[derive(Clone, Default)]
pub struct Transport {
    /// TLS, for `https` and `grpcs`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// HTTP/2, for `grpc` and `grpcs`.
    pub h2: bool,
    /// The TLS server name, when it is not the node's host (`upstream_host` with rewrite).
    pub sni: Option<String>,
}

pub enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

impl Sender {
    pub async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    pub async fn try_send_request(
        &mut self,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<ReqBody>>> {
        match self {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => s.try_send_request(req).await,
        }
    }

    pub fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(_))
    }
}

/// A connection checked out for one request. Dropping it closes an HTTP/1.1 connection;
/// `release` returns it to the idle list. An HTTP/2 connection stays shared either way.
pub struct Conn {
    pub sender: Sender,
    pub reused: bool,
    key: Arc<str>,
    uses: u64,
    keepalive: Keepalive,
}

struct Idle {
    sender: http1::SendRequest<ReqBody>,
    since: Instant,
    uses: u64,
}

thread_local! {
    static IDLE: RefCell<HashMap<Arc<str>, Vec<Idle>>> = RefCell::new(HashMap::new());
    static SHARED: RefCell<HashMap<Arc<str>, http2::SendRequest<ReqBody>>> = RefCell::new(HashMap::new());
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(String),
    #[error("connect to {0}: {1}")]
    Io(String, std::io::Error),
    #[error("TLS with {0}: {1}")]
    Tls(String, std::io::Error),
    #[error("handshake with {0}: {1}")]
    Handshake(String, hyper::Error),
}

impl Conn {
    pub fn release(self) {
        let Conn { sender, key, uses, keepalive, .. } = self;
        let Sender::H1(sender) = sender else { return };
        if uses >= keepalive.requests || sender.is_closed() {
            return;
        }
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = match idle.get_mut(&*key) {
                Some(list) => list,
                None => idle.entry(key).or_default(),
            };
            if list.len() < keepalive.size {
                list.push(Idle { sender, since: Instant::now(), uses });
            }
        });
    }
}

/// An open connection to `node`: an idle HTTP/1.1 one that is still fresh, or the node's
/// shared HTTP/2 one.
pub fn checkout(node: &NodeRt, keepalive: Keepalive, h2: bool) -> Option<Conn> {
    let conn = |sender, uses| Conn { sender, reused: true, key: node.pool_key.clone(), uses, keepalive };
    if h2 {
        return SHARED.with(|shared| {
            let mut shared = shared.borrow_mut();
            match shared.get(&*node.pool_key) {
                Some(s) if !s.is_closed() => Some(conn(Sender::H2(s.clone()), 1)),
                Some(_) => {
                    shared.remove(&*node.pool_key);
                    None
                }
                None => None,
            }
        });
    }
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&*node.pool_key)?;
        while let Some(c) = list.pop() {
            if c.sender.is_closed() || c.since.elapsed() > keepalive.idle_timeout {
                continue;
            }
            return Some(conn(Sender::H1(c.sender), c.uses + 1));
        }
        None
    })
}

/// Forgets the node's shared HTTP/2 connection (it failed), so the next request dials anew.
pub fn discard_shared(node: &NodeRt) {
    SHARED.with(|shared| shared.borrow_mut().remove(&*node.pool_key));
}

pub async fn connect(node: &NodeRt, transport: &Transport, keepalive: Keepalive, timeout: Duration) -> Result<Conn, ConnectError> {
    let dial = async {
        let stream = match node.socket {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect(&*node.authority).await,
        }
        .map_err(|e| ConnectError::Io(node.authority.to_string(), e))?;
        let _ = stream.set_nodelay(true);
        let sender = match &transport.tls {
            None => handshake(stream, node, transport.h2).await?,
            Some(config) => {
                let host = transport.sni.as_deref().unwrap_or_else(|| node.host());
                let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
                    .map_err(|e| ConnectError::Tls(node.authority.to_string(), std::io::Error::other(e)))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| ConnectError::Tls(node.authority.to_string(), e))?;
                handshake(tls, node, transport.h2).await?
            }
        };
        if let Sender::H2(s) = &sender {
            SHARED.with(|shared| shared.borrow_mut().insert(node.pool_key.clone(), s.clone()));
        }
        Ok(Conn { sender, reused: false, key: node.pool_key.clone(), uses: 1, keepalive })
    };
    match tokio::time::timeout(timeout, dial).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout(node.authority.to_string())),
    }
}

async fn handshake<I>(io: I, node: &NodeRt, h2: bool) -> Result<Sender, ConnectError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let failed = |e| ConnectError::Handshake(node.authority.to_string(), e);
    if h2 {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.map_err(failed)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        return Ok(Sender::H2(sender));
    }
    let (sender, conn) = http1::handshake(TokioIo::new(io)).await.map_err(failed)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(Sender::H1(sender))
}
