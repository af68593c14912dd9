//! Functions' `fetch`, carried out on the node's runtime: the URL's `host:port` must be on the
//! gateway's `fetchAllowList`; the name is resolved once, every address it resolves to must
//! pass [`Policy::refuse`], and the connection goes to a checked address (so a name cannot
//! pass the check with one address and connect to another). Responses are bounded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::engine::{Budget, FetchRequest, Fetcher, Taken};
use crate::guard::{Policy, allowed, authority};
use weir_upstream::reach::Names;

/// The largest response body a fetch reads.
pub const MAX_RESPONSE: usize = 8 << 20;
/// How long a fetch may take, connection and body included (the call's wall clock bounds it too).
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The node's outbound client for functions.
pub struct Outbound {
    policy: RwLock<Policy>,
    names: Names,
    tls: Arc<rustls::ClientConfig>,
    rt: tokio::runtime::Handle,
}

impl Outbound {
    /// `fixed`: names with fixed addresses, resolved without asking the system (tests).
    pub fn new(policy: Policy, fixed: HashMap<String, Vec<IpAddr>>, rt: tokio::runtime::Handle) -> Result<Arc<Outbound>, String> {
        let tls = weir_tls::client_config(true, None, false)?;
        Ok(Arc::new(Outbound { policy: RwLock::new(policy), names: Names::new(fixed), tls, rt }))
    }

    /// Replaces the policy (once the node's listeners are bound, say).
    pub fn set_policy(&self, policy: Policy) {
        if let Ok(mut p) = self.policy.write() {
            *p = policy;
        }
    }

    /// Functions' fetches, carried out on the node's runtime.
    pub fn fetcher(self: &Arc<Self>) -> Fetcher {
        let me = self.clone();
        Arc::new(move |req: FetchRequest| {
            let me = me.clone();
            let rt = me.rt.clone();
            rt.spawn(async move {
                let FetchRequest { gateway, method, url, headers, body, allow, budget, reply } = req;
                let result = match tokio::time::timeout(TIMEOUT, me.fetch(&gateway, &method, &url, headers, body, &allow, &budget)).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("fetch {}: no answer within {}s", without_userinfo(&url), TIMEOUT.as_secs())),
                };
                if let Err(e) = &result {
                    tracing::debug!(%gateway, error = %e, "a function's fetch failed");
                }
                reply(result);
            });
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch(&self, gateway: &str, method: &str, url: &str, headers: Vec<(String, String)>, body: Option<Vec<u8>>, allow: &[String], budget: &Arc<Budget>) -> Result<(u16, Vec<(String, String)>, Vec<u8>), String> {
        let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
        // What the messages show of the URL: no password in them, nor in the node's log.
        let shown = without_userinfo(url);
        let url = shown.as_ref();
        if !lower.starts_with("http://") && !lower.starts_with("https://") {
            return Err(format!("fetch: {url:?}: only http and https URLs may be fetched"));
        }
        let uri: http::Uri = url.parse().map_err(|_| format!("fetch: {url:?} is not a URL"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("fetch: {url:?}: only http and https URLs may be fetched")),
        };
        let (host, port) = authority(&uri).ok_or_else(|| format!("fetch: {url:?} has no host"))?;
        if !allowed(allow, &host, port) {
            return Err(format!("fetch to {host}:{port} refused: it is not on this gateway's fetchAllowList"));
        }
        let addrs = self.names.addresses(gateway, &host, port).await.map_err(|e| format!("fetch to {host}:{port} failed: {e}"))?;
        {
            let policy = self.policy.read().map_err(|_| "fetch: the policy is unreadable".to_string())?;
            for addr in &addrs {
                if let Some(refusal) = policy.refuse(*addr) {
                    return Err(format!("fetch to {host}:{port} refused: {}", refusal.why(&host, *addr)));
                }
            }
        }
        let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(addrs[0]))
            .await
            .map_err(|_| format!("fetch to {host}:{port}: connecting timed out"))?
            .map_err(|e| format!("fetch to {host}:{port}: {e}"))?;
        // This host itself, on a port the node listens on for every address: nothing is sent.
        if let (Ok(peer), Ok(local)) = (tcp.peer_addr(), tcp.local_addr()) {
            let policy = self.policy.read().map_err(|_| "fetch: the policy is unreadable".to_string())?;
            if let Some(refusal) = policy.connected(peer, local) {
                return Err(format!("fetch to {host}:{port} refused: {}", refusal.why(&host, peer)));
            }
        }
        let host_header = host_header(&host, port, https);
        let mut req = http::Request::builder().method(method).uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")).header(http::header::HOST, host_header);
        for (k, v) in headers {
            let lower = k.to_ascii_lowercase();
            if !["host", "connection", "content-length", "transfer-encoding", "upgrade", "keep-alive", "te", "trailer"].contains(&lower.as_str()) {
                req = req.header(k, v);
            }
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| format!("fetch: {e}"))?;
        if https {
            let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| format!("fetch: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp).await.map_err(|e| format!("fetch to {host}:{port}: TLS: {e}"))?;
            exchange(tls, req, budget).await
        } else {
            exchange(tcp, req, budget).await
        }
    }
}

async fn exchange<S>(io: S, req: http::Request<Full<Bytes>>, budget: &Arc<Budget>) -> Result<(u16, Vec<(String, String)>, Vec<u8>), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| format!("fetch: {e}"))?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| format!("fetch: {e}"))?;
    let status = resp.status().as_u16();
    // A `Response` holds a status of 200 to 599 (101 and 600 to 999 cannot be made one).
    if !(200..=599).contains(&status) {
        return Err(format!("fetch: the answer's status {status} is not one a Response may have (200 to 599)"));
    }
    let headers = resp.headers().iter().map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect();
    let body = read_body(resp.into_body(), budget).await?;
    Ok((status, headers, body))
}

/// A response body, at most `MAX_RESPONSE` bytes, each taken from the gateway's `budget`
/// as it arrives. On success the bytes stay taken (the engine gives them back); on failure,
/// or when the read is dropped before it ends (the fetch ran out of time), they are given
/// back here.
async fn read_body<B>(mut body: B, budget: &Arc<Budget>) -> Result<Vec<u8>, String>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut taken = Taken(budget.clone(), 0);
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("fetch: the response body: {e}"))?;
        let Ok(data) = frame.into_data() else { continue };
        if out.len() + data.len() > MAX_RESPONSE {
            return Err(format!("fetch: the response body is larger than {MAX_RESPONSE} bytes"));
        }
        if !taken.grow(data.len()) {
            return Err(format!("fetch: the response bodies of this gateway's fetches in flight would pass its memory limit ({} MiB)", budget.limit() >> 20));
        }
        out.extend_from_slice(&data);
    }
    // The engine gives these back once the body is in the runtime.
    taken.1 = 0;
    Ok(out)
}

/// `url` without the user and password its authority may carry.
pub(crate) fn without_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    let Some(start) = url.find("://").map(|i| i + 3) else { return url.into() };
    let end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}{}", &url[..start], &url[start + at + 1..]).into(),
        None => url.into(),
    }
}

/// The `Host` a request to `host:port` names: the port only where it is not the scheme's, an
/// IPv6 address in brackets.
fn host_header(host: &str, port: u16, https: bool) -> String {
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    if (https && port == 443) || (!https && port == 80) { host } else { format!("{host}:{port}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_header_brackets_an_ipv6_address_and_names_a_port_not_the_schemes() {
        assert_eq!(host_header("api.example", 80, false), "api.example");
        assert_eq!(host_header("api.example", 8443, true), "api.example:8443");
        assert_eq!(host_header("::1", 8080, false), "[::1]:8080");
        assert_eq!(host_header("2001:db8::1", 443, true), "[2001:db8::1]");
    }

    #[test]
    fn a_urls_user_and_password_are_never_shown() {
        assert_eq!(without_userinfo("https://me:pw@api.example/x?a=b@c"), "https://api.example/x?a=b@c");
        assert_eq!(without_userinfo("http://a@b@host:8080"), "http://host:8080");
        assert_eq!(without_userinfo("http://host/p@q"), "http://host/p@q");
        assert_eq!(without_userinfo("not a url"), "not a url");
    }

    /// An answer with a status no `Response` can hold fails the fetch, which the function can
    /// catch, rather than failing in the runtime as the answer is made.
    #[tokio::test]
    async fn a_status_a_response_cannot_hold_fails_the_fetch() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (status, fine) in [(700, false), (999, false), (101, false), (599, true), (204, true)] {
            let (client, mut server) = tokio::io::duplex(4096);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = server.read(&mut buf).await;
                let _ = server.write_all(format!("HTTP/1.1 {status} Odd\r\ncontent-length: 0\r\n\r\n").as_bytes()).await;
            });
            let req = http::Request::builder().uri("/").header(http::header::HOST, "h").body(Full::new(Bytes::new())).unwrap();
            let got = exchange(client, req, &Arc::new(Budget::new(1 << 20))).await;
            match got {
                Ok((s, _, _)) => assert!(fine && s == status, "{status} was taken"),
                Err(e) => assert!(!fine && e.contains(&format!("status {status}")), "{status}: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn response_bodies_take_from_the_gateways_budget_until_given_back() {
        let budget = Arc::new(Budget::new(4 << 20));
        let three = || Full::new(Bytes::from(vec![7u8; 3 << 20]));
        assert_eq!(read_body(three(), &budget).await.map(|b| b.len()), Ok(3 << 20));
        // Three more MiB would pass the four the gateway may hold: refused, and nothing kept.
        let refused = read_body(three(), &budget).await.unwrap_err();
        assert_eq!(refused, "fetch: the response bodies of this gateway's fetches in flight would pass its memory limit (4 MiB)");
        budget.give(3 << 20);
        assert_eq!(read_body(three(), &budget).await.map(|b| b.len()), Ok(3 << 20));
        budget.give(3 << 20);
        // A body past the largest one fetch reads fails whatever the budget.
        let roomy = Arc::new(Budget::new(64 << 20));
        let refused = read_body(Full::new(Bytes::from(vec![0u8; MAX_RESPONSE + 1])), &roomy).await.unwrap_err();
        assert!(refused.contains("larger than"), "{refused}");
        assert!(roomy.take(64 << 20), "a failed read gives back what it took");
    }

    /// A body that sends `first` and then nothing more, never ending.
    struct Stalls(Option<Bytes>);

    impl hyper::body::Body for Stalls {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(mut self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            match self.0.take() {
                Some(first) => std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(first)))),
                None => std::task::Poll::Pending,
            }
        }
    }

    /// A fetch whose time runs out while its body still arrives drops the read: what it took
    /// from the gateway's budget comes back, or a few slow answers would leave the gateway none.
    #[tokio::test]
    async fn a_body_read_cut_off_by_its_time_gives_back_what_it_took() {
        let budget = Arc::new(Budget::new(4 << 20));
        let read = read_body(Stalls(Some(Bytes::from(vec![1u8; 3 << 20]))), &budget);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), read).await.is_err(), "the body never ends");
        assert!(budget.take(4 << 20), "the three MiB read before the time ran out were given back");
    }
}
