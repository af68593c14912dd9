//! The client side of a connection: a lean HTTP/1.1 loop for the requests most traffic is made
//! of, and hyper for everything else.
//!
//! The loop serves HTTP/1.1 requests without a body, an upgrade or an expectation, in
//! origin form: it parses the head, runs the proxy and writes the response in the connection's
//! task, with no dispatcher state machine between them. The first request it does not
//! recognize (one with a body, a WebSocket handshake, HTTP/1.0, the HTTP/2 preface, or a head
//! that does not parse) hands the connection, with every byte already read, to hyper's server
//! for the rest of its life, so anything unusual gets hyper's full handling and its errors.
//!
//! Bounds, as nginx's defaults: a head line may be 8 KiB and a head 32 KiB (431, or 414 for the
//! request line); a head must arrive within `header_timeout` of its first byte, the next
//! request within `keepalive_timeout`; a client that stops reading its response for
//! `send_timeout`, or stops sending its body for `body_timeout`, loses the connection. Framing
//! that could be read two ways (Content-Length with Transfer-Encoding) is refused with 400 and
//! the connection closed, a transfer coding other than `chunked` with 501, a request without
//! exactly one Host with 400. hyper's server gets the same bounds for the requests it serves.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::body::{ClientBody, ReqBody, RespBody};
use crate::h1::{Outbox, Span};
use crate::hop;
pub use crate::service::Limits;
use crate::service::{ConnInfo, Service, error_response};
use crate::streams::{Ending, Streams, Watched};

/// How an HTTP/2 client opens its connection (RFC 9113 §3.4), as far as the lean loop reads it
/// before handing over.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2";

const MAX_HEADERS: usize = 100;
/// The longest line of a request head, CRLF included (nginx: `large_client_header_buffers 4 8k`).
pub const MAX_LINE: usize = 8 * 1024;
/// The largest request head.
pub const MAX_HEAD: usize = 32 * 1024;
/// A chunked request body is read this far before anything goes upstream, so a malformed one
/// is answered with 400 here; a small one goes out whole, with its length.
const READ_AHEAD: usize = 64 * 1024;

/// A declared length is the body's own, as the lean loop writes it (hyper would write a length
/// a plugin set and then the whole body, which the connection's next answer would begin with):
/// replaced by the body's length where that is known, left out where it is not. A HEAD answer
/// keeps the length given (an upstream's is its GET's).
fn own_length(resp: &mut Response<RespBody>, head_only: bool) {
    if head_only || !resp.headers().contains_key(header::CONTENT_LENGTH) {
        return;
    }
    match resp.body().size_hint().exact() {
        Some(n) => {
            resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            resp.headers_mut().remove(header::CONTENT_LENGTH);
        }
    }
}

/// How long a call runs before its connection is watched for the client leaving: watching
/// costs a read, which the many calls answered sooner do without.
const WATCH_AFTER: Duration = Duration::from_secs(1);

/// Serves one client connection until it closes.
pub async fn serve<I, S: Service>(io: I, info: Arc<ConnInfo>, proxy: Arc<S>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (header_timeout, keepalive_timeout) = (proxy.limits().header_timeout, proxy.limits().keepalive_timeout);
    let mut io = Timed::new(io, proxy.limits().send_timeout);
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    // The first request has the head's time from the connection's start.
    let mut wait = header_timeout;
    // Fires when the process starts draining: an idle connection closes then.
    let drained = crate::drain::connection_ends();
    tokio::pin!(drained);
    loop {
        let mut arriving = Arriving::default();
        // The timer is set only once a read has to wait, for `wait` from then.
        let mut armed = false;
        let req = loop {
            if !buf.is_empty() {
                // Once a head is known to be partial, it is parsed again only when a line ended.
                let worth = match arriving.seen {
                    0 => Ok(true),
                    _ => arriving.look(&buf),
                };
                let parsed = match worth {
                    Ok(true) => parse(&mut buf),
                    Ok(false) => Parsed::Partial,
                    Err(status) => Parsed::Reject(status),
                };
                match parsed {
                    Parsed::Simple(req) => break req,
                    Parsed::Partial if arriving.seen == 0 => {
                        if let Err(status) = arriving.look(&buf) {
                            drop(buf);
                            return reject(io, status, &mut out).await;
                        }
                        // The head's own time starts with its first bytes.
                        wait = header_timeout;
                        armed = false;
                    }
                    Parsed::Partial => {}
                    Parsed::Reject(status) => {
                        drop(buf);
                        return reject(io, status, &mut out).await;
                    }
                    Parsed::Other => return hand_over(io, buf.freeze(), info, proxy).await,
                }
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            let idle = buf.is_empty();
            let read = poll_fn(|cx| io.poll_read_within(cx, &mut buf, &mut armed, wait));
            let read = if idle {
                tokio::select! {
                    biased;
                    r = read => r,
                    () = &mut drained => return,
                }
            } else {
                read.await
            };
            match read {
                // A close between requests is the normal end; mid-head it is the client's loss,
                // and so is a timeout.
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let keep_alive = req.keep_alive;
        let head_only = req.head.method() == Method::HEAD;
        let call = proxy.call(&info, req.head);
        tokio::pin!(call);
        let resp = match crate::deadline::within(WATCH_AFTER, call.as_mut()).await {
            Ok(resp) => resp,
            // A long call: from now on the client leaving ends it (nothing else would read the
            // connection until the answer is written). What it pipelines meanwhile is kept for
            // its next request, up to a head's worth.
            Err(_) => loop {
                if buf.len() >= MAX_HEAD {
                    break call.as_mut().await;
                }
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(4096);
                }
                tokio::select! {
                    biased;
                    resp = call.as_mut() => break resp,
                    read = poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, &mut buf)) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                }
            },
        };
        let keep_alive = keep_alive && !crate::drain::is_draining();
        if let Err(e) = respond(&mut io, resp, head_only, keep_alive, &mut out).await {
            tracing::debug!(error = %e, "client connection ended with an error");
            return;
        }
        if !keep_alive {
            let _ = io.shutdown().await;
            return;
        }
        wait = keepalive_timeout;
    }
}

/// How far a partial head has been looked at, for its bounds and for whether parsing it again
/// could succeed (only a line's end can complete it).
#[derive(Default)]
struct Arriving {
    seen: usize,
    /// Bytes of the current line so far.
    line: usize,
    lines: usize,
    /// Whether a line with something on it has ended: empty lines before the request line are
    /// skipped, and only one after it ends the head.
    begun: bool,
}

impl Arriving {
    /// Looks at what arrived since the last look: whether a line ended, or the answer for a
    /// head past its bounds.
    fn look(&mut self, buf: &[u8]) -> Result<bool, StatusCode> {
        let mut ended = false;
        let mut at = self.seen;
        for piece in buf[self.seen..].split_inclusive(|&b| b == b'\n') {
            at += piece.len();
            self.line += piece.len();
            if self.line > MAX_LINE {
                return Err(if self.lines == 0 { StatusCode::URI_TOO_LONG } else { StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE });
            }
            if piece.ends_with(b"\n") {
                let empty = self.line == 1 || (self.line == 2 && buf[at - 2] == b'\r');
                // The empty line after the head's own: the head is whole, and what came after
                // it (a body) is no part of it, whatever its lines' lengths.
                if empty && self.begun {
                    self.seen = buf.len();
                    return if at > MAX_HEAD { Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE) } else { Ok(true) };
                }
                self.begun |= !empty;
                self.lines += 1;
                self.line = 0;
                ended = true;
            }
        }
        self.seen = buf.len();
        if buf.len() > MAX_HEAD {
            return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
        Ok(ended)
    }
}

/// Answers a request that cannot be served and closes the connection. What the client still
/// sends (a body, say) is read for a moment first, so that the close does not reset the
/// connection before the client has read the answer.
async fn reject<I>(mut io: Timed<I>, status: StatusCode, out: &mut Vec<u8>)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    tracing::debug!(status = status.as_u16(), "refusing a client request");
    if respond(&mut io, refusal(status), false, false, out).await.is_err() {
        return;
    }
    let _ = io.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left = 1 << 20;
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// The answer to a request refused at the door; the connection closes after it.
fn refusal(status: StatusCode) -> Response<RespBody> {
    let message = match status {
        StatusCode::URI_TOO_LONG => r#"{"error_msg":"414 Request-URI Too Large"}"#,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => r#"{"error_msg":"431 Request Header Fields Too Large"}"#,
        StatusCode::NOT_IMPLEMENTED => r#"{"error_msg":"501 Not Implemented"}"#,
        StatusCode::REQUEST_TIMEOUT => r#"{"error_msg":"408 Request Timeout"}"#,
        _ => r#"{"error_msg":"400 Bad Request"}"#,
    };
    let mut resp = error_response(status, message);
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The rest of the connection goes to hyper: HTTP/1.1 with upgrades, or HTTP/2 when the
/// client opens with its preface (h2c with prior knowledge, or h2 picked by ALPN).
async fn hand_over<I, S: Service>(io: Timed<I>, read: Bytes, info: Arc<ConnInfo>, proxy: Arc<S>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = proxy.limits().clone();
    // HTTP/2 (the client's preface is what was read): its idle and stalled streams are
    // watched, since hyper's server bounds neither.
    let streams = read.starts_with(H2_PREFACE).then(Streams::new);
    let watched = streams.clone();
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let proxy = proxy.clone();
        let info = info.clone();
        let slot = watched.as_ref().map(|s| s.open());
        async move {
            let (mut parts, body) = req.into_parts();
            if let Some(status) = refused(&parts) {
                return Ok::<_, Infallible>(refusal_for(status, parts.version).map(|b| Watched::new(b, slot)));
            }
            target_host(&mut parts);
            hop::strip_connection_named(&mut parts.headers);
            let body = match client_body(&parts, body, proxy.limits().body_timeout).await {
                Ok(b) => b,
                Err(status) => return Ok(refusal_for(status, parts.version).map(|b| Watched::new(b, slot))),
            };
            let head_only = parts.method == Method::HEAD;
            let version = parts.version;
            let mut resp = proxy.call(&info, Request::from_parts(parts, body)).await;
            own_length(&mut resp, head_only);
            if version == http::Version::HTTP_11 {
                upgrade_named(&mut resp);
            }
            Ok(resp.map(|b| Watched::new(b, slot)))
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Heads and small bodies are copied into one buffer and leave in one write: cheaper than
    // gathering slices for the answers a gateway mostly sends. hyper's head timer also runs
    // while a connection waits for its next request.
    builder
        .http1()
        .writev(false)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(MAX_HEAD as u32);
    let io = TokioIo::new(Prefixed { read, io });
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let watchdog = async {
        match &streams {
            Some(s) => s.watch(limits.keepalive_timeout, limits.send_timeout).await,
            None => std::future::pending().await,
        }
    };
    // Draining: hyper finishes what is in flight, then closes (GOAWAY on HTTP/2).
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        () = crate::drain::connection_ends() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        ending = watchdog => {
            tracing::debug!(?ending, "HTTP/2 client connection closed by its watchdog");
            if ending == Ending::Idle {
                // GOAWAY; a client that does not answer it is not waited for long.
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
            }
            return;
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// What hyper accepts but this gateway refuses: a head past the bounds the lean loop keeps
/// (hyper's buffer bound stops only heads still partial when it fills), a transfer coding other
/// than `chunked` (501, as nginx), no Host in HTTP/1.1 or more than one Host (400, RFC 9112
/// §3.2).
fn refused(parts: &http::request::Parts) -> Option<StatusCode> {
    if parts.version != Version::HTTP_2 {
        // The request line: method, target, version, spaces and CRLF.
        let target = parts.uri.path_and_query().map_or(0, |p| p.as_str().len()) + parts.uri.authority().map_or(0, |a| a.as_str().len() + 7);
        if parts.method.as_str().len() + target + 12 > MAX_LINE {
            return Some(StatusCode::URI_TOO_LONG);
        }
        let mut total = 0;
        for (name, value) in &parts.headers {
            let line = name.as_str().len() + value.len() + 4;
            total += line;
            if line > MAX_LINE || total > MAX_HEAD {
                return Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
            }
        }
    }
    let mut te = parts.headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = te.next()
        && (te.next().is_some() || !first.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"))
    {
        return Some(StatusCode::NOT_IMPLEMENTED);
    }
    let hosts = parts.headers.get_all(header::HOST).iter().count();
    // HTTP/2 names the host in `:authority`; a Host field naming another is malformed (RFC
    // 9113 §8.3.1), or routing and the upstream could each take a different one. A target
    // with user information is an error (RFC 9110 §4.2.4).
    let two_hosts = parts.version == Version::HTTP_2
        && parts.uri.authority().zip(parts.headers.get(header::HOST)).is_some_and(|(a, h)| !weir_core::text::host_name(a.host().trim()).eq_ignore_ascii_case(weir_core::text::host_name(h.to_str().unwrap_or("").trim())));
    let userinfo = parts.uri.authority().is_some_and(|a| a.as_str().contains('@'));
    (hosts > 1 || (hosts == 0 && parts.version == Version::HTTP_11) || two_hosts || userinfo).then_some(StatusCode::BAD_REQUEST)
}

/// A request whose target names its host, an HTTP/1.1 absolute-form one (`GET
/// http://host/path`) or HTTP/2's `:authority`, is for that host, whatever its Host field
/// says (RFC 9112 §3.2.2; HTTP/2's field may differ only in port and case): the field is made
/// to say it, so that routing, plugins and the upstream all see the one host, as nginx's
/// `$host` does. An authority-form target (`CONNECT host:port`) is left alone.
fn target_host(parts: &mut http::request::Parts) {
    if parts.version != Version::HTTP_2 && parts.uri.scheme().is_none() {
        return;
    }
    let Some(a) = parts.uri.authority() else { return };
    let named = match a.port() {
        Some(port) => http::HeaderValue::try_from(format!("{}:{}", a.host(), port.as_str())),
        None => http::HeaderValue::try_from(a.host()),
    };
    if let Ok(h) = named {
        parts.headers.insert(header::HOST, h);
    }
}

fn refusal_for(status: StatusCode, version: Version) -> Response<RespBody> {
    let mut resp = refusal(status);
    if version == Version::HTTP_2 {
        resp.headers_mut().remove(header::CONNECTION);
    }
    resp
}

/// The client's body as it goes upstream. A chunked one is read up to [`READ_AHEAD`] first:
/// when it is malformed the client gets a 400 and no node hears of the request, and when it
/// ends within that it goes out whole. A larger one streams from there; should it break
/// later, the node sees a request cut short, never a complete one.
async fn client_body(parts: &http::request::Parts, body: hyper::body::Incoming, timeout: Duration) -> Result<ReqBody, StatusCode> {
    if body.is_end_stream() {
        return Ok(ReqBody::Incoming(body));
    }
    if !parts.headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok(ReqBody::Client(Box::new(ClientBody::new(None, body, timeout))));
    }
    let mut body = body;
    let mut ahead = BytesMut::new();
    while ahead.len() < READ_AHEAD {
        match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => return Err(StatusCode::REQUEST_TIMEOUT),
            Ok(None) => return Ok(ReqBody::Read(Some(ahead.freeze()))),
            Ok(Some(Err(_))) => return Err(StatusCode::BAD_REQUEST),
            Ok(Some(Ok(frame))) => {
                // Trailers end the body; only a streamed chunked body could carry them on.
                if let Ok(data) = frame.into_data() {
                    ahead.extend_from_slice(&data);
                }
            }
        }
    }
    Ok(ReqBody::Client(Box::new(ClientBody::new(Some(ahead.freeze()), body, timeout))))
}

struct Simple {
    head: Request<ReqBody>,
    keep_alive: bool,
}

// The request is the common case; boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Simple(Simple),
    Partial,
    /// Refused at the door: the answer, and the connection closes.
    Reject(StatusCode),
    /// Anything this loop leaves to hyper.
    Other,
}

/// Parses the head at the start of `buf` if it is one this loop serves, taking it off the
/// buffer; anything else stays in the buffer for hyper.
fn parse(buf: &mut BytesMut) -> Parsed {
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut parsed, buf, &mut fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    // Only a large head can have a line past the bound.
    if len > MAX_LINE
        && let Err(status) = Arriving::default().look(&buf[..len])
    {
        return Parsed::Reject(status);
    }
    let (Some(method), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version) else { return Parsed::Other };
    if !path.starts_with('/') || method == "CONNECT" {
        return checked(parsed.headers);
    }
    let base = buf.as_ptr() as usize;
    let mut spans = [Span::default(); MAX_HEADERS];
    let count = parsed.headers.len();
    let mut close = false;
    let mut hosts = 0;
    for (span, field) in spans.iter_mut().zip(parsed.headers.iter()) {
        let name = field.name.as_bytes();
        let simple = if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            true
        } else if name.eq_ignore_ascii_case(b"content-length") {
            field.value.trim_ascii() == b"0"
        } else if name.eq_ignore_ascii_case(b"connection") {
            // Only close and keep-alive; an upgrade, or fields it names, are hyper's.
            field.value.split(|&b| b == b',').map(<[u8]>::trim_ascii).all(|t| {
                close |= t.eq_ignore_ascii_case(b"close");
                t.eq_ignore_ascii_case(b"close") || t.eq_ignore_ascii_case(b"keep-alive")
            })
        } else {
            !(name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"upgrade")
                || name.eq_ignore_ascii_case(b"expect"))
        };
        if !simple {
            return checked(parsed.headers);
        }
        *span = Span::of(buf, field);
    }
    if hosts != 1 {
        return Parsed::Reject(StatusCode::BAD_REQUEST);
    }
    let (method_at, method_len) = (method.as_ptr() as usize - base, method.len());
    let (path_at, path_len) = (path.as_ptr() as usize - base, path.len());
    let head = buf.split_to(len).freeze();
    // What `http` refuses after httparse accepted (it should not happen) goes back into the
    // buffer, for hyper to answer.
    let give_back = |buf: &mut BytesMut, head: &Bytes| {
        let mut all = BytesMut::with_capacity(head.len() + buf.len());
        all.extend_from_slice(head);
        all.extend_from_slice(buf);
        *buf = all;
        Parsed::Other
    };
    let Ok(method) = Method::from_bytes(&head[method_at..method_at + method_len]) else { return give_back(buf, &head) };
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path_at..path_at + path_len)) else { return give_back(buf, &head) };
    let mut headers = HeaderMap::with_capacity(count);
    for span in &spans[..count] {
        let Some((name, value)) = span.field(&head) else { return give_back(buf, &head) };
        headers.append(name, value);
    }
    let mut head = Request::new(ReqBody::Empty);
    *head.method_mut() = method;
    *head.uri_mut() = uri;
    *head.version_mut() = Version::HTTP_11;
    *head.headers_mut() = headers;
    Parsed::Simple(Simple { head, keep_alive: !close })
}

/// An HTTP/1.1 head going to hyper, checked for what hyper would accept but must be refused
/// first: framing that could be read two ways (hyper would quietly prefer Transfer-Encoding),
/// a transfer coding other than `chunked`, and a Host missing or repeated.
fn checked(fields: &[httparse::Header<'_>]) -> Parsed {
    let (mut hosts, mut lengths, mut codings) = (0, 0, 0);
    let mut chunked = true;
    for f in fields {
        let name = f.name.as_bytes();
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            codings += 1;
            chunked &= f.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
        }
    }
    if codings > 0 && lengths > 0 {
        Parsed::Reject(StatusCode::BAD_REQUEST)
    } else if codings > 1 || !chunked {
        Parsed::Reject(StatusCode::NOT_IMPLEMENTED)
    } else if hosts != 1 {
        Parsed::Reject(StatusCode::BAD_REQUEST)
    } else {
        Parsed::Other
    }
}

/// An HTTP/1.1 answer that carries `Upgrade` (a 426's, saying what to switch to) names it in
/// `Connection`, as RFC 9110 asks of whoever sends one; a 101 is hyper's to write.
fn upgrade_named(resp: &mut Response<RespBody>) {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS && resp.headers().contains_key(header::UPGRADE) {
        resp.headers_mut().append(header::CONNECTION, http::HeaderValue::from_static("upgrade"));
    }
}

/// Writes `resp`: its head with the framing it needs, then its body, coalescing small pieces
/// into as few writes as the body allows.
async fn respond<I>(io: &mut I, resp: Response<RespBody>, head_only: bool, keep_alive: bool, out: &mut Vec<u8>) -> io::Result<()>
where
    I: AsyncWrite + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let bodiless = parts.status.is_informational() || parts.status == StatusCode::NO_CONTENT || parts.status == StatusCode::NOT_MODIFIED;
    let mut has_date = false;
    let mut has_length = false;
    let mut has_upgrade = false;
    for (name, value) in &parts.headers {
        // Framing is this hop's own business.
        if name == header::TRANSFER_ENCODING || name == header::CONNECTION {
            continue;
        }
        // The length sent is the body's own (or chunks where it is not known): a length a
        // plugin set that the body does not have would let the bytes after it answer the
        // connection's next request. A HEAD answer keeps the first length given (an
        // upstream's is its GET's).
        if name == header::CONTENT_LENGTH {
            if bodiless || !head_only || has_length {
                continue;
            }
            has_length = true;
        }
        has_date |= name == header::DATE;
        has_upgrade |= name == header::UPGRADE;
        crate::hop::encode_field(name, value, out);
    }
    let chunked = !bodiless && !has_length && body.size_hint().exact().is_none();
    // A HEAD answer with no length of its own says none (as hyper does): an empty body there
    // is no sign that the GET's is empty.
    let unknown_head = head_only && body.size_hint().exact() == Some(0);
    if !bodiless && !has_length && !chunked && !unknown_head {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body.size_hint().exact().unwrap_or(0).to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunked && !head_only {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    // An answer carrying `Upgrade` (a 426's) names it in `Connection`, as RFC 9110 asks.
    match (keep_alive, has_upgrade) {
        (true, false) => {}
        (false, false) => out.extend_from_slice(b"connection: close\r\n"),
        (true, true) => out.extend_from_slice(b"connection: upgrade\r\n"),
        (false, true) => out.extend_from_slice(b"connection: close, upgrade\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    let mut outbox = Outbox::new(std::mem::take(out));
    let sent = if head_only || bodiless { Ok(()) } else { write_body(io, &mut body, chunked, &mut outbox).await };
    let sent = match sent {
        Ok(()) => outbox.flush(io).await,
        Err(e) => Err(e),
    };
    // The buffer is kept for the connection's next response.
    *out = outbox.buf;
    sent
}

async fn write_body<I>(io: &mut I, body: &mut RespBody, chunked: bool, outbox: &mut Outbox) -> io::Result<()>
where
    I: AsyncWrite + Unpin,
{
    while let Some(frame) = outbox.next_frame(io, body).await? {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                // What arrived goes out before the connection closes: the client sees a
                // response cut short (its length or last chunk missing), not an empty reply.
                outbox.flush(io).await?;
                return Err(io::Error::other(e));
            }
        };
        // Trailers are not sent to HTTP/1.1 clients, as hyper's server does not unless asked.
        if let Ok(data) = frame.into_data() {
            outbox.data(io, &data, chunked).await?;
        }
    }
    if chunked {
        outbox.buf.extend_from_slice(b"0\r\n\r\n");
    }
    Ok(())
}

/// The `Date` value, made once a second per worker.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_empty() {
            *c = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(c.1.as_bytes());
    });
}

/// A stream whose first bytes were already read: they are read again first.
struct Prefixed<I> {
    read: Bytes,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A client connection with one timer: a write may wait at most `send_timeout` for the client
/// to read (nginx's `send_timeout`, counted from the write that had to wait), and the lean loop
/// bounds its reads with the same timer. One timer per connection, set again only when an
/// operation has to wait, so a request that flows costs no timer work.
struct Timed<I> {
    io: I,
    timer: Pin<Box<Sleep>>,
    /// When the wait under way times out. The timer may be set earlier than this (it is moved
    /// only when it must fire sooner); when it fires early it is set again for `due`. So a
    /// keep-alive connection's next wait costs a clock read, not a timer update.
    due: Instant,
    send_timeout: Duration,
    /// A write waits for the client: the timer runs for it.
    stalled: bool,
}

impl<I> Timed<I> {
    fn new(io: I, send_timeout: Duration) -> Timed<I> {
        let due = Instant::now() + send_timeout;
        Timed { io, timer: Box::pin(tokio::time::sleep_until(due)), due, send_timeout, stalled: false }
    }

    /// Starts a wait that times out `wait` from now.
    fn arm(&mut self, wait: Duration) {
        self.due = Instant::now() + wait;
        if self.timer.is_elapsed() || self.timer.deadline() > self.due {
            self.timer.as_mut().reset(self.due);
        }
    }

    /// Whether the wait under way has timed out; registers for a wake-up when it has not.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= self.due {
                return true;
            }
            // Set for an earlier wait: on to this one's end.
            self.timer.as_mut().reset(self.due);
        }
        false
    }

    fn on_write<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = false;
            return r;
        }
        if !self.stalled {
            self.stalled = true;
            self.arm(self.send_timeout);
        }
        if self.expired(cx) {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client did not read its response in time")));
        }
        Poll::Pending
    }
}

impl<I: AsyncRead + Unpin> Timed<I> {
    /// Reads into `buf`, failing once a wait that started when `armed` was set has lasted
    /// `wait`.
    fn poll_read_within(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut, armed: &mut bool, wait: Duration) -> Poll<io::Result<usize>> {
        if let Poll::Ready(r) = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, buf) {
            return Poll::Ready(r);
        }
        if !*armed {
            *armed = true;
            self.arm(wait);
        }
        if self.expired(cx) {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        Poll::Pending
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Timed<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Timed<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.on_write(cx, r)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.on_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.on_write(cx, r)
    }

    /// A shutdown writes too (TLS's close_notify, which waits until it is sent): it is held to
    /// the same send timeout, so a client that stops reading cannot hold the connection there.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.on_write(cx, r)
    }
}

/// Feeds `data` to the head parser as a connection's first bytes, then every head it takes to
/// the path normalization the proxy applies next: for the fuzz targets (`fuzz/`), which must
/// find no input that panics.
#[doc(hidden)]
pub fn fuzz_head(data: &[u8]) {
    // The bounds a partial head is held to, fed as the bytes might arrive.
    let mut arriving = Arriving::default();
    for end in (0..=data.len()).step_by(7) {
        if arriving.look(&data[..end]).is_err() {
            break;
        }
    }
    let mut buf = BytesMut::from(data);
    while let Parsed::Simple(req) = parse(&mut buf) {
        let path = req.head.uri().path();
        if let Ok(normal) = weir_core::path::normalize(path) {
            // The normal form is its own normal form, and a path the cheap scan lets through
            // is already in it: otherwise two spellings of one path could be told apart.
            assert_eq!(weir_core::path::normalize(&normal.encoded).as_ref(), Ok(&normal), "{path:?}");
            if !weir_core::path::may_need_normalizing(path) {
                assert_eq!(normal.encoded, path, "{path:?} passed the scan but is not in normal form");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that takes every write and never finishes a shutdown, as a TLS connection
    /// whose close_notify waits on a client that stopped reading.
    struct Stuck;

    impl AsyncRead for Stuck {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Stuck {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_that_never_finishes_ends_at_the_send_timeout() {
        let mut io = Timed::new(Stuck, Duration::from_secs(60));
        let r = tokio::time::timeout(Duration::from_secs(3600), io.shutdown()).await.expect("the send timeout ends the shutdown");
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
}
