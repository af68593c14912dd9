//! A blocking HTTP/1.1 client for the command line: one request per connection
//! (`Connection: close`), the answer read to its end. Plain HTTP only; what the commands talk to
//! is a node's admin listener, which serves no TLS.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::time::Duration;

use anyhow::Context as _;

/// The most of an answer that is read; a larger one is refused rather than buffered.
const MAX_ANSWER: u64 = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Long enough for a function's whole wall-clock budget (30 s by default) and then some.
const IO_TIMEOUT: Duration = Duration::from_secs(90);

/// Where requests go: `http://host[:port][/base]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Without brackets for IPv6.
    host: String,
    port: u16,
    /// A path the API is mounted under, without a trailing slash (often empty).
    base: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> anyhow::Result<Endpoint> {
        let url = url.trim();
        if url.len() >= 8 && url[..8].eq_ignore_ascii_case("https://") {
            anyhow::bail!("{url}: https is not supported; give the node's admin listener as http://host:port");
        }
        let rest = match url.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case("http://") => &url[7..],
            _ => anyhow::bail!("{url}: not a server URL; give it as http://host:port"),
        };
        let (authority, base) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
        anyhow::ensure!(!base.contains(['?', '#']), "{url}: a server URL has no query or fragment");
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').with_context(|| format!("{url}: an IPv6 address needs its closing ]"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        anyhow::ensure!(!host.is_empty() && !host.contains('@'), "{url}: no host (or credentials in the URL, which are not used)");
        let port = match port {
            None => 80,
            Some(p) => p.parse().ok().filter(|p| *p != 0).with_context(|| format!("{url}: {p:?} is not a port"))?,
        };
        Ok(Endpoint { host: host.to_string(), port, base: base.trim_end_matches('/').to_string() })
    }

    pub fn from_addr(addr: SocketAddr) -> Endpoint {
        Endpoint { host: addr.ip().to_string(), port: addr.port(), base: String::new() }
    }

    /// The `Host` header's value.
    fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == 80 { host } else { format!("{host}:{}", self.port) }
    }

    fn connect(&self) -> anyhow::Result<TcpStream> {
        let place = self.authority();
        let addrs = (self.host.as_str(), self.port).to_socket_addrs().with_context(|| format!("resolving {place}"))?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(conn) => return Ok(conn),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(e).with_context(|| format!("connecting to {place}")),
            None => anyhow::bail!("{place}: the name has no address"),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.base)
    }
}

pub struct Response {
    pub status: u16,
    pub reason: String,
    pub body: Vec<u8>,
    /// Seconds the server asked to wait before trying again (`Retry-After`), when it did.
    pub retry_after: Option<u64>,
}

/// Sends one request (`path` starts with `/`, query included) and reads the whole answer.
pub fn send(to: &Endpoint, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> anyhow::Result<Response> {
    let mut conn = to.connect()?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = format!("{method} {}{path} HTTP/1.1\r\nhost: {}\r\nuser-agent: weir/{}\r\naccept: application/json\r\nconnection: close\r\n", to.base, to.authority(), env!("CARGO_PKG_VERSION"));
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let place = to.authority();
    conn.write_all(head.as_bytes()).and_then(|()| conn.write_all(body.unwrap_or_default())).with_context(|| format!("sending to {place}"))?;
    let mut raw = Vec::new();
    conn.take(MAX_ANSWER + 1).read_to_end(&mut raw).with_context(|| format!("reading the answer of {place}"))?;
    anyhow::ensure!(raw.len() as u64 <= MAX_ANSWER, "{place} answered more than {} MiB", MAX_ANSWER >> 20);
    parse(&raw).with_context(|| format!("reading the answer of {place}"))
}

/// Status line, headers and body of a whole answer; the body de-chunked or cut to its length.
fn parse(raw: &[u8]) -> anyhow::Result<Response> {
    anyhow::ensure!(!raw.is_empty(), "the connection closed without an answer");
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").context("the answer has no complete head")?;
    let head = std::str::from_utf8(&raw[..end]).context("the answer's head is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, status, reason) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    anyhow::ensure!(version.starts_with("HTTP/1."), "not an HTTP/1 answer: {status_line:?}");
    let status: u16 = status.parse().ok().filter(|s| (100..1000).contains(s)).with_context(|| format!("bad status line {status_line:?}"))?;
    let (mut chunked, mut length, mut retry_after) = (false, None, None);
    for line in lines {
        let (name, value) = line.split_once(':').with_context(|| format!("bad header line {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.rsplit(',').next().is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().with_context(|| format!("bad content-length {value:?}"))?);
        } else if name.eq_ignore_ascii_case("retry-after") {
            retry_after = value.parse().ok();
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        anyhow::ensure!(rest.len() >= n, "the answer was cut short ({} of {n} bytes)", rest.len());
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, reason: reason.to_string(), body, retry_after })
}

/// A `Transfer-Encoding: chunked` body; extensions and trailers are read past.
fn dechunk(mut rest: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").context("a chunk's size line is cut short")?;
        let line = std::str::from_utf8(&rest[..eol]).unwrap_or_default();
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).with_context(|| format!("bad chunk size {line:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        anyhow::ensure!(rest.len() >= size + 2 && &rest[size..size + 2] == b"\r\n", "a chunk is cut short");
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// `s` as one URL path segment or query value: everything but the unreserved characters
/// percent-encoded (so `dev/user/me` is the one segment `dev%2Fuser%2Fme`).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_are_http_with_a_host_and_maybe_a_port_and_base() {
        let ep = |host: &str, port, base: &str| Endpoint { host: host.into(), port, base: base.into() };
        for (url, want) in [
            ("http://127.0.0.1:9180", ep("127.0.0.1", 9180, "")),
            ("HTTP://example.test/", ep("example.test", 80, "")),
            ("http://[::1]:9180/api/", ep("::1", 9180, "/api")),
        ] {
            assert_eq!(Endpoint::parse(url).unwrap(), want, "{url}");
        }
        assert_eq!(Endpoint::parse("http://[::1]:9180/api").unwrap().to_string(), "http://[::1]:9180/api");
        let https = Endpoint::parse("https://example.test").unwrap_err().to_string();
        assert!(https.contains("https is not supported"), "{https}");
        for bad in ["example.test:80", "http://", "http://h:0", "http://h:x", "http://u@h", "http://h/?q", "http://[::1"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_are_read_by_length_by_chunks_or_to_the_end() {
        let r = parse(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.reason.as_str(), r.body.as_slice()), (201, "Created", &b"{}"[..]));
        let r = parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4;x=y\r\nWiki\r\n5\r\npedia\r\n0\r\nx-trailer: 1\r\n\r\n").unwrap();
        assert_eq!(r.body, b"Wikipedia");
        let r = parse(b"HTTP/1.0 404 Not Found\r\nx: y\r\n\r\nto the end").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"to the end"[..]));
        for bad in [&b""[..], b"HTTP/1.1 200 OK\r\n", b"SSH-2.0\r\n\r\n", b"HTTP/1.1 2 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nz\r\n"] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn names_are_one_segment() {
        assert_eq!(encode("dev/user/me"), "dev%2Fuser%2Fme");
        assert_eq!(encode("2024-01-01T10:00:00.5+01:00"), "2024-01-01T10%3A00%3A00.5%2B01%3A00");
        assert_eq!(encode("a_b-c~d.e"), "a_b-c~d.e");
    }
}
