//! A node of an upstream as the data plane dials it, and the bounds of an exchange with it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::load::NodeLoad;
use crate::health::NodeHealth;

/// APISIX's default for each of connect, send and read.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timeouts {
    pub connect: Duration,
    pub send: Duration,
    pub read: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { connect: DEFAULT_TIMEOUT, send: DEFAULT_TIMEOUT, read: DEFAULT_TIMEOUT }
    }
}

pub struct NodeRt {
    /// `host:port` as dialled.
    pub authority: Arc<str>,
    /// Set when the host is an IP literal, so no lookup is needed.
    pub socket: Option<SocketAddr>,
    /// The Host header for `pass_host: node`: the port is left out when it is the default.
    pub host_header: HeaderValue,
    pub weight: u32,
    pub priority: i64,
    pub health: Arc<NodeHealth>,
    pub load: Arc<NodeLoad>,
    /// Which pooled connections may serve this node: plain HTTP/1.1 ones are shared by every
    /// upstream naming the node; TLS and HTTP/2 ones belong to one upstream runtime.
    pub pool_key: Arc<str>,
}

impl NodeRt {
    /// A node at `host:port`; `default_port` is the scheme's, left out of its Host header.
    pub fn new(host: &str, port: u16, default_port: u16, weight: u32, priority: i64) -> NodeRt {
        let authority = format!("{host}:{port}");
        let host_text = if port == default_port { host } else { &authority };
        NodeRt {
            pool_key: authority.clone().into(),
            socket: authority.parse().ok(),
            host_header: HeaderValue::from_str(host_text).unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            authority: authority.into(),
            weight,
            priority,
            health: Arc::default(),
            load: Arc::default(),
        }
    }
}

impl NodeRt {
    /// The host part of the address (brackets kept for IPv6).
    pub fn host(&self) -> &str {
        self.authority.rsplit_once(':').map_or(&self.authority, |(h, _)| h)
    }
}

#[cfg(test)]
pub(crate) fn test_node(authority: &str, weight: u32, priority: i64) -> NodeRt {
    let (host, port) = authority.rsplit_once(':').expect("host:port");
    NodeRt::new(host, port.parse().expect("port"), 80, weight, priority)
}

#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    pub size: usize,
    pub idle_timeout: Duration,
    pub requests: u64,
}
