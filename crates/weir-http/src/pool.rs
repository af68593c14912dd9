//! Connections to upstream nodes. Each worker thread keeps its own, as nginx workers do, so
//! checkout and release never contend across threads: idle HTTP/1.1 connections in a list per
//! node (taken most recent first), and one shared HTTP/2 connection per node (its requests are
//! multiplexed).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::req_body::ReqBody;
use crate::h1::{self, Stream};
use weir_upstream::{Keepalive, NodeRt};

/// How an upstream's nodes are spoken to.
#[derive(Clone, Default)]
pub struct Transport {
    /// TLS, for `https` and `grpcs`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// HTTP/2, for `grpc` and `grpcs`.
    pub h2: bool,
    /// The TLS server name, when it is not the node's host (`upstream_host` with rewrite).
    pub sni: Option<String>,
    /// For a tenant's upstream: where its nodes may connect, names resolved and checked here.
    pub reach: Option<weir_upstream::reach::Tenant>,
}

pub enum Sender {
    /// Driven by the request that uses it (see [`h1`]).
    H1(h1::Connection),
    H2(http2::SendRequest<ReqBody>),
}

/// A connection checked out for one request, with its place in the pool.
pub struct Conn {
    pub sender: Sender,
    pub lease: Lease,
}

/// Where an HTTP/1.1 connection goes back once its exchange is done. An HTTP/2 connection
/// stays shared, so its lease has nothing to give back.
pub struct Lease {
    /// The connection served requests before this one.
    pub reused: bool,
    key: Arc<str>,
    uses: u64,
    keepalive: Keepalive,
}

struct Idle {
    conn: h1::Connection,
    since: Instant,
    uses: u64,
}

/// FNV-1a, for the pool's keys: node addresses from the configuration, never chosen by a
/// client, so a fast hash without a random seed is safe here.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type ByNode<T> = HashMap<Arc<str>, T, BuildHasherDefault<Fnv>>;

thread_local! {
    static IDLE: RefCell<ByNode<VecDeque<Idle>>> = RefCell::new(ByNode::default());
    static SHARED: RefCell<ByNode<http2::SendRequest<ReqBody>>> = RefCell::new(ByNode::default());
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

impl weir_core::error::Kinded for ConnectError {
    fn kind(&self) -> weir_core::error::ErrorKind {
        match self {
            ConnectError::Timeout(_) => weir_core::error::ErrorKind::Timeout,
            _ => weir_core::error::ErrorKind::Upstream,
        }
    }
}

impl Lease {
    /// Puts `conn` on the idle list, unless it has served its share of requests or the list
    /// is full. Connections idle past the timeout leave the list's far end here, so a list
    /// nobody takes from does not keep them open.
    pub fn release(self, conn: h1::Connection) {
        let Lease { key, uses, keepalive, .. } = self;
        if uses >= keepalive.requests {
            return;
        }
        let now = Instant::now();
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = match idle.get_mut(&*key) {
                Some(list) => list,
                None => idle.entry(key).or_default(),
            };
            while list.front().is_some_and(|c| now.duration_since(c.since) > keepalive.idle_timeout) {
                list.pop_front();
            }
            if list.len() < keepalive.size {
                list.push_back(Idle { conn, since: now, uses });
            }
        });
    }
}

/// An open connection to `node`: the most recently used idle HTTP/1.1 one that is still
/// fresh, or the node's shared HTTP/2 one.
pub fn checkout(node: &NodeRt, keepalive: Keepalive, h2: bool) -> Option<Conn> {
    let lease = |uses| Lease { reused: true, key: node.pool_key.clone(), uses, keepalive };
    if h2 {
        return SHARED.with(|shared| {
            let mut shared = shared.borrow_mut();
            match shared.get(&*node.pool_key) {
                Some(s) if !s.is_closed() => Some(Conn { sender: Sender::H2(s.clone()), lease: lease(1) }),
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
        let now = Instant::now();
        while let Some(mut c) = list.pop_back() {
            if now.duration_since(c.since) > keepalive.idle_timeout || c.conn.is_stale() {
                continue;
            }
            return Some(Conn { sender: Sender::H1(c.conn), lease: lease(c.uses + 1) });
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
        let stream = match (node.socket, &transport.reach) {
            (Some(addr), None) => TcpStream::connect(addr).await,
            (None, None) => TcpStream::connect(&*node.authority).await,
            (Some(addr), Some(reach)) => match reach.refuse(addr) {
                Some(why) => Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, why)),
                None => TcpStream::connect(addr).await.and_then(|s| reach.connected(&s).map(|()| s)),
            },
            (None, Some(reach)) => match reach.resolve(&node.authority).await {
                Ok(addrs) => TcpStream::connect(&addrs[..]).await.and_then(|s| reach.connected(&s).map(|()| s)),
                Err(e) => Err(e),
            },
        }
        .map_err(|e| ConnectError::Io(node.authority.to_string(), e))?;
        let _ = stream.set_nodelay(true);
        let sender = match &transport.tls {
            None if !transport.h2 => Sender::H1(h1::Connection::new(Stream::Plain(stream))),
            None => handshake(stream, node).await?,
            Some(config) => {
                let host = transport.sni.as_deref().unwrap_or_else(|| node.host());
                let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
                    .map_err(|e| ConnectError::Tls(node.authority.to_string(), std::io::Error::other(e)))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| ConnectError::Tls(node.authority.to_string(), e))?;
                if transport.h2 { handshake(tls, node).await? } else { Sender::H1(h1::Connection::new(Stream::Tls(Box::new(tls)))) }
            }
        };
        if let Sender::H2(s) = &sender {
            SHARED.with(|shared| shared.borrow_mut().insert(node.pool_key.clone(), s.clone()));
        }
        Ok(Conn { sender, lease: Lease { reused: false, key: node.pool_key.clone(), uses: 1, keepalive } })
    };
    match tokio::time::timeout(timeout, dial).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout(node.authority.to_string())),
    }
}

async fn handshake<I>(io: I, node: &NodeRt) -> Result<Sender, ConnectError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let failed = |e| ConnectError::Handshake(node.authority.to_string(), e);
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.map_err(failed)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(Sender::H2(sender))
}
