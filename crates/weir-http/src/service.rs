//! What the client side serves requests with, and the facts of the connection they came on.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use ipnet::IpNet;

use crate::body::{ReqBody, RespBody};

/// What answers the requests of client connections.
pub trait Service: Send + Sync + 'static {
    /// Timeouts and limits of the client connections it serves.
    fn limits(&self) -> &Limits;

    /// Answers one request. Never fails: every error is a response.
    fn call(&self, conn: &ConnInfo, req: Request<ReqBody>) -> impl Future<Output = Response<RespBody>> + Send;
}

/// Facts about the client connection a request arrived on, with the header values derived
/// from them computed once per connection rather than once per request.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub scheme: &'static str,
    /// The peer is in `proxy.trusted_addresses`: its `X-Forwarded-*` fields are kept.
    pub trusted: bool,
    remote_ip: HeaderValue,
    local_port: HeaderValue,
}

impl ConnInfo {
    pub fn new(remote: SocketAddr, local: SocketAddr, scheme: &'static str) -> ConnInfo {
        let remote_ip = HeaderValue::from_str(&remote.ip().to_string()).expect("an IP address is a valid header value");
        ConnInfo { remote, local, scheme, trusted: false, remote_ip, local_port: HeaderValue::from(local.port()) }
    }

    /// The same connection, its peer trusted (`proxy.trusted_addresses`) or not.
    pub fn trusting(self, trusted: bool) -> ConnInfo {
        ConnInfo { trusted, ..self }
    }

    /// The peer's address as a header value (`X-Real-IP`, `X-Forwarded-For`).
    pub fn remote_ip(&self) -> &HeaderValue {
        &self.remote_ip
    }

    /// The port the connection came in on, as a header value (`X-Forwarded-Port`).
    pub fn local_port(&self) -> &HeaderValue {
        &self.local_port
    }
}

/// A JSON answer made by the gateway itself.
pub fn error_response(status: StatusCode, message: &'static str) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::full(Bytes::from_static(message.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Timeouts and limits of client connections (`proxy` in the process config).
#[derive(Clone, Debug)]
pub struct Limits {
    /// From a head's first byte to its end (nginx's `client_header_timeout`).
    pub header_timeout: Duration,
    /// Waiting for the next request on an open connection.
    pub keepalive_timeout: Duration,
    /// Between two reads of a request body.
    pub body_timeout: Duration,
    /// Between two writes of a response the client does not read.
    pub send_timeout: Duration,
    /// Client connections open at once, over all workers; more are closed as they come.
    pub max_connections: usize,
    /// Peers whose `X-Forwarded-*` fields are kept; every other client's are replaced.
    pub trusted: Vec<IpNet>,
}

impl Default for Limits {
    fn default() -> Self {
        let minute = Duration::from_secs(60);
        Limits {
            header_timeout: minute,
            keepalive_timeout: minute,
            body_timeout: minute,
            send_timeout: minute,
            max_connections: 10_000,
            trusted: Vec::new(),
        }
    }
}

impl Limits {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|n| n.contains(&ip))
    }
}
