//! The client side of a connection: a lean HTTP/1.1 loop for the requests most traffic is made
//! of, and hyper for everything else.
//!
//! The loop serves HTTP/1.1 requests without a body, an upgrade or an expectation, in
//! origin form: it parses the head, runs the proxy and writes the response in the connection's
//! task, with no dispatcher state machine between them. The first request it does not
//! recognize (one with a body, a WebSocket handshake, HTTP/1.0, the HTTP/2 preface, or a head
//! that does not parse) hands the connection, with every byte already read, to hyper's server
//! for the rest of its life, so anything unusual gets hyper's full handling and its errors.

use std::cell::RefCell;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::body::{ReqBody, RespBody};
use crate::h1::{Outbox, Span};
use crate::proxy::{ConnInfo, Proxy};

const MAX_HEADERS: usize = 100;
/// A head still incomplete past this goes to hyper, which answers it.
const MAX_HEAD: usize = 16 * 1024;

/// Serves one client connection until it closes.
pub async fn serve<I>(mut io: I, info: Arc<ConnInfo>, proxy: Arc<Proxy>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    // Fires when the process starts draining: an idle connection closes then.
    let drained = crate::drain::connection_ends();
    tokio::pin!(drained);
    loop {
        let req = loop {
            if !buf.is_empty() {
                match parse(&mut buf) {
                    Parsed::Simple(req) => break req,
                    Parsed::Partial if buf.len() <= MAX_HEAD => {}
                    Parsed::Partial | Parsed::Other => return hand_over(io, buf.freeze(), info, proxy).await,
                }
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            let idle = buf.is_empty();
            let read = std::future::poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, &mut buf));
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
                // A close between requests is the normal end; mid-head it is the client's loss.
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let keep_alive = req.keep_alive;
        let head_only = req.head.method() == Method::HEAD;
        let resp = proxy.handle(&info, req.head).await;
        let keep_alive = keep_alive && !crate::drain::is_draining();
        if let Err(e) = respond(&mut io, resp, head_only, keep_alive, &mut out).await {
            tracing::debug!(error = %e, "client connection ended with an error");
            return;
        }
        if !keep_alive {
            let _ = io.shutdown().await;
            return;
        }
    }
}

/// The rest of the connection goes to hyper: HTTP/1.1 with upgrades, or HTTP/2 when the
/// client opens with its preface (h2c with prior knowledge, or h2 picked by ALPN).
async fn hand_over<I>(io: I, read: Bytes, info: Arc<ConnInfo>, proxy: Arc<Proxy>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let proxy = proxy.clone();
        let info = info.clone();
        async move { Ok::<_, Infallible>(proxy.handle(&info, req.map(ReqBody::Incoming)).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Heads and small bodies are copied into one buffer and leave in one write: cheaper than
    // gathering slices for the answers a gateway mostly sends.
    builder.http1().writev(false);
    let io = TokioIo::new(Prefixed { read, io });
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    // Draining: hyper finishes what is in flight, then closes (GOAWAY on HTTP/2).
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        () = crate::drain::connection_ends() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
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
    let (Some(method), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version) else { return Parsed::Other };
    if !path.starts_with('/') || method == "CONNECT" {
        return Parsed::Other;
    }
    let base = buf.as_ptr() as usize;
    let mut spans = [Span::default(); MAX_HEADERS];
    let count = parsed.headers.len();
    let mut close = false;
    for (span, field) in spans.iter_mut().zip(parsed.headers.iter()) {
        let name = field.name.as_bytes();
        let simple = if name.eq_ignore_ascii_case(b"content-length") {
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
            return Parsed::Other;
        }
        *span = Span::of(buf, field);
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
    for (name, value) in &parts.headers {
        // Framing is this hop's own business.
        if name == header::TRANSFER_ENCODING || name == header::CONNECTION {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            if bodiless {
                continue;
            }
            has_length = true;
        }
        has_date |= name == header::DATE;
        crate::h1::encode_field(name, value, out);
    }
    let chunked = !bodiless && !has_length && body.size_hint().exact().is_none();
    if !bodiless && !has_length && !chunked {
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
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
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
