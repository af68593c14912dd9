//! Keep-alive connections to upstream nodes. Each worker thread keeps its own idle list, as
//! nginx workers do, so checkout and release never contend across threads.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::ReqBody;
use crate::snapshot::{Keepalive, NodeRt};

/// A connection checked out for one request. Dropping it closes the connection; `release`
/// returns it to the idle list.
pub struct Conn {
    pub sender: http1::SendRequest<ReqBody>,
    pub reused: bool,
    authority: Arc<str>,
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
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(String),
    #[error("connect to {0}: {1}")]
    Io(String, std::io::Error),
    #[error("handshake with {0}: {1}")]
    Handshake(String, hyper::Error),
}

impl Conn {
    pub fn release(self) {
        let Conn { sender, authority, uses, keepalive, .. } = self;
        if uses >= keepalive.requests || sender.is_closed() {
            return;
        }
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = match idle.get_mut(&*authority) {
                Some(list) => list,
                None => idle.entry(authority).or_default(),
            };
            if list.len() < keepalive.size {
                list.push(Idle { sender, since: Instant::now(), uses });
            }
        });
    }
}

/// An idle connection to `node`, if one is still open and fresh.
pub fn checkout(node: &NodeRt, keepalive: Keepalive) -> Option<Conn> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&*node.authority)?;
        while let Some(c) = list.pop() {
            if c.sender.is_closed() || c.since.elapsed() > keepalive.idle_timeout {
                continue;
            }
            return Some(Conn {
                sender: c.sender,
                reused: true,
                authority: node.authority.clone(),
                uses: c.uses + 1,
                keepalive,
            });
        }
        None
    })
}

pub async fn connect(node: &NodeRt, keepalive: Keepalive, timeout: Duration) -> Result<Conn, ConnectError> {
    let dial = async {
        let stream = match node.socket {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect(&*node.authority).await,
        }
        .map_err(|e| ConnectError::Io(node.authority.to_string(), e))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError::Handshake(node.authority.to_string(), e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Conn { sender, reused: false, authority: node.authority.clone(), uses: 1, keepalive })
    };
    match tokio::time::timeout(timeout, dial).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout(node.authority.to_string())),
    }
}
