//! HTTP/1.1 to upstream nodes, driven by the request that uses the connection.
//!
//! hyper's client gives every connection a task of its own and passes the request, the response
//! and each body chunk between that task and the request's over channels: several task wake-ups
//! per exchange. Here the request's own task writes the request and reads the response head,
//! and the response body reads straight from the socket as the client side polls it, as nginx's
//! upstream module does. A connection always has exactly one owner: the exchange, then the
//! response body, then the worker's idle list.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::deadline;
use crate::hop::{self, AsIs, Fields};
use crate::req_body::ReqBody;
use weir_upstream::Timeouts;

/// The most a response head (status line and headers) may take.
const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a response head or a trailer section.
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line accepted (extensions included).
const MAX_CHUNK_LINE: usize = 4096;
/// The most a trailer section may take.
const MAX_TRAILERS: usize = 16 * 1024;
/// Body chunks up to this size are copied next to what precedes them, so a small message
/// leaves in one write; larger ones are written as they are.
const COALESCE: usize = 16 * 1024;
/// How much room each read asks for.
const READ_SIZE: usize = 16 * 1024;

/// The byte stream of an upstream connection.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("connection closed before a response")]
    ClosedEarly,
    #[error("connection closed before the response was complete")]
    Incomplete,
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error("reading the request body: {0}")]
    RequestBody(crate::req_body::BoxError),
    /// The node took longer than its send or read timeout.
    #[error("timed out")]
    Timeout,
    #[error("the request body did not match its content-length")]
    BodyLength,
}

/// An exchange that got no response.
pub struct Failed {
    pub error: Error,
    /// The request, when it may go out again on another connection: none of it was written,
    /// or the node closed a reused connection without answering and the request is idempotent
    /// and has no body still streaming in.
    pub request: Option<Request<ReqBody>>,
}

/// An open HTTP/1.1 connection to a node, between exchanges.
pub struct Connection {
    io: Stream,
    /// Bytes read and not yet taken; frozen pieces of it become header values and body chunks.
    buf: BytesMut,
}

/// How a request body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Out {
    None,
    Length(u64),
    Chunked,
}

impl Connection {
    pub fn new(io: Stream) -> Connection {
        Connection { io, buf: BytesMut::new() }
    }

    /// Whether the node closed this idle connection, or sent something nobody asked for.
    /// Costs a system call only when the socket became readable while idle.
    pub fn is_stale(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        // Pending: nothing to read, the connection is as we left it. Anything else is an end,
        // an error, or bytes that belong to no request.
        Pin::new(&mut self.io).poll_read(&mut cx, &mut probe).is_ready()
    }

    /// Sends `req` and reads the response head. The body is read as the returned response's
    /// body is polled; once it has been read to its end, [`Body::idle`] gives the connection
    /// back for another exchange.
    ///
    /// Each phase has its own bound, as nginx's `proxy_send_timeout` and `proxy_read_timeout`:
    /// every write to the node must finish within `timeouts.send` (waits for the client's body
    /// are the client's own timeout), and the response head must arrive within
    /// `timeouts.read` of the request having gone out.
    pub async fn send(mut self, mut req: Request<ReqBody>, reused: bool, fields: &impl Fields, timeouts: &Timeouts) -> Result<Response<Body>, Failed> {
        let head_only = req.method() == Method::HEAD;
        let out = request_framing(&req);
        // A body already read can be sent again; one streaming in from the client cannot.
        let replay = match req.body() {
            ReqBody::Read(b) => Some(b.clone()),
            ReqBody::Empty => Some(None),
            ReqBody::Incoming(b) if b.is_end_stream() => Some(None),
            ReqBody::Incoming(_) | ReqBody::Client(_) => None,
        };
        let mut head = Vec::with_capacity(512);
        encode_head(&req, out, fields, &mut head);
        let written = self.write_request(&mut req, out, head, timeouts.send).await;
        let give_back = |mut req: Request<ReqBody>, error| {
            let request = replay.map(|body| {
                *req.body_mut() = match body {
                    Some(b) => ReqBody::Read(Some(b)),
                    None => ReqBody::Empty,
                };
                req
            });
            Failed { error, request }
        };
        let resend_ok = reused && is_idempotent(req.method());
        match written {
            Ok(()) => {}
            Err((error, sent_any)) => {
                if let Error::Io(_) = error {
                    // A node may answer and stop reading before the body is done (a 413, say):
                    // its answer is worth more than our write error.
                    if let Ok(Ok((resp, framing, _))) = deadline::within(timeouts.read, self.read_head(head_only)).await {
                        let mut body = Body { conn: Some(self), framing, keep_alive: false };
                        body.settle();
                        return Ok(resp.map(|()| body));
                    }
                }
                return Err(if !sent_any || resend_ok { give_back(req, error) } else { Failed { error, request: None } });
            }
        }
        let head = deadline::within(timeouts.read, self.read_head(head_only)).await.unwrap_or(Err(Error::Timeout));
        match head {
            Ok((resp, framing, keep_alive)) => {
                let mut body = Body { conn: Some(self), framing, keep_alive };
                body.settle();
                Ok(resp.map(|()| body))
            }
            Err(Error::ClosedEarly) if resend_ok => Err(give_back(req, Error::ClosedEarly)),
            Err(error) => Err(Failed { error, request: None }),
        }
    }

    /// Writes the head and the body. The error says whether any of the request went out.
    async fn write_request(&mut self, req: &mut Request<ReqBody>, out: Out, head: Vec<u8>, send: Duration) -> Result<(), (Error, bool)> {
        let mut outbox = Outbox::new(head);
        let chunked = out == Out::Chunked;
        let mut body_bytes = 0u64;
        let failed = |e: Error, outbox: &Outbox| (e, outbox.started);
        if out != Out::None {
            loop {
                let body = req.body_mut();
                let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await {
                    Poll::Ready(f) => f,
                    // The client's body must wait: what is gathered goes out meanwhile.
                    Poll::Pending => {
                        timed(send, outbox.flush(&mut self.io)).await.map_err(|e| failed(e, &outbox))?;
                        poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
                    }
                };
                let frame = match frame {
                    None => break,
                    Some(Ok(f)) => f,
                    Some(Err(e)) => return Err((Error::RequestBody(e), outbox.started)),
                };
                let data = match frame.into_data() {
                    Ok(d) => d,
                    Err(frame) => {
                        // Trailers: only chunked framing can carry them, and they end the body.
                        if let (true, Ok(trailers)) = (chunked, frame.into_trailers()) {
                            outbox.buf.extend_from_slice(b"0\r\n");
                            AsIs.encode(&trailers, false, &mut outbox.buf);
                            outbox.buf.extend_from_slice(b"\r\n");
                            return timed(send, outbox.flush(&mut self.io)).await.map_err(|e| failed(e, &outbox));
                        }
                        continue;
                    }
                };
                body_bytes += data.len() as u64;
                if let Out::Length(n) = out
                    && body_bytes > n
                {
                    return Err((Error::BodyLength, outbox.started));
                }
                timed(send, outbox.data(&mut self.io, &data, chunked)).await.map_err(|e| failed(e, &outbox))?;
            }
            match out {
                Out::Chunked => outbox.buf.extend_from_slice(b"0\r\n\r\n"),
                Out::Length(n) if body_bytes != n => return Err((Error::BodyLength, outbox.started)),
                _ => {}
            }
        }
        timed(send, outbox.flush(&mut self.io)).await.map_err(|e| failed(e, &outbox))
    }

    /// Reads until a final response head is complete (interim 1xx answers are skipped).
    async fn read_head(&mut self, head_only: bool) -> Result<(Response<()>, Framing, bool), Error> {
        let mut received = !self.buf.is_empty();
        loop {
            if !self.buf.is_empty() {
                match parse_head(&mut self.buf, head_only)? {
                    Parsed::Final(resp, framing, keep_alive) => return Ok((resp, framing, keep_alive)),
                    Parsed::Interim => continue,
                    Parsed::Partial if self.buf.len() > MAX_HEAD => return Err(Error::Malformed("response head too large")),
                    Parsed::Partial => {}
                }
            }
            let n = poll_fn(|cx| self.poll_fill(cx)).await.map_err(|e| match e.kind() {
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted if !received => Error::ClosedEarly,
                _ => Error::Io(e),
            })?;
            if n == 0 {
                return Err(if received { Error::Incomplete } else { Error::ClosedEarly });
            }
            received = true;
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

/// A write to the node, bounded by the send timeout.
async fn timed<T>(send: Duration, write: impl std::future::Future<Output = io::Result<T>>) -> Result<T, Error> {
    match deadline::within(send, write).await {
        Ok(r) => r.map_err(Error::Io),
        Err(_) => Err(Error::Timeout),
    }
}

fn request_framing(req: &Request<ReqBody>) -> Out {
    match req.body() {
        ReqBody::Empty | ReqBody::Read(None) => Out::None,
        ReqBody::Read(Some(b)) => Out::Length(b.len() as u64),
        ReqBody::Incoming(b) if b.is_end_stream() => Out::None,
        ReqBody::Incoming(b) => match b.size_hint().exact() {
            Some(n) => Out::Length(n),
            None => Out::Chunked,
        },
        ReqBody::Client(b) => match b.size_hint().exact() {
            Some(n) => Out::Length(n),
            None => Out::Chunked,
        },
    }
}

/// The request line and header fields, with the framing header the body needs. The request's
/// own framing fields are left out: the body's framing is decided here.
fn encode_head(req: &Request<ReqBody>, out: Out, fields: &impl Fields, buf: &mut Vec<u8>) {
    buf.extend_from_slice(req.method().as_str().as_bytes());
    buf.push(b' ');
    let target = match req.uri().path_and_query() {
        Some(pq) => pq.as_str(),
        None if req.method() == Method::CONNECT => req.uri().authority().map_or("/", |a| a.as_str()),
        None => "/",
    };
    buf.extend_from_slice(target.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    // With a body, its own length is the truth: a content-length from the client is replaced.
    fields.encode(req.headers(), out != Out::None, buf);
    match out {
        Out::Length(n) => {
            buf.extend_from_slice(b"content-length: ");
            buf.extend_from_slice(n.to_string().as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        Out::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Out::None => {}
    }
    buf.extend_from_slice(b"\r\n");
}

/// The bytes of one outgoing message, gathered so that a small message leaves in one write.
/// Both directions use it: requests to nodes here, responses to clients in `front`.
pub(crate) struct Outbox {
    pub buf: Vec<u8>,
    /// A write already went out: a failure now may follow bytes the peer received.
    pub started: bool,
}

impl Outbox {
    pub fn new(buf: Vec<u8>) -> Outbox {
        Outbox { buf, started: false }
    }

    /// Writes what is gathered, flushed (a TLS stream may hold it otherwise).
    pub async fn flush<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        io.write_all(&self.buf).await?;
        self.started = true;
        self.buf.clear();
        io.flush().await
    }

    /// The body's next frame. What the body has ready joins what is gathered; only when it
    /// must wait for more is what is gathered written first.
    pub async fn next_frame<W, B>(&mut self, io: &mut W, body: &mut B) -> io::Result<Option<Result<Frame<B::Data>, B::Error>>>
    where
        W: AsyncWrite + Unpin,
        B: http_body::Body + Unpin,
    {
        if let Poll::Ready(f) = poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await {
            return Ok(f);
        }
        self.flush(io).await?;
        Ok(poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await)
    }

    /// Adds `data` as the body's next piece, in a chunk when `chunked`. A large piece is
    /// written as it is, after what is gathered, rather than copied.
    pub async fn data<W: AsyncWrite + Unpin>(&mut self, io: &mut W, data: &[u8], chunked: bool) -> io::Result<()> {
        if data.is_empty() {
            // An empty chunk would end a chunked body.
            return Ok(());
        }
        if chunked {
            use std::io::Write as _;
            let _ = write!(self.buf, "{:x}\r\n", data.len());
        }
        if data.len() <= COALESCE {
            self.buf.extend_from_slice(data);
        } else {
            self.flush(io).await?;
            io.write_all(data).await?;
            self.started = true;
        }
        if chunked {
            self.buf.extend_from_slice(b"\r\n");
        }
        if self.buf.len() >= COALESCE {
            self.flush(io).await?;
        }
        Ok(())
    }
}

/// How the rest of a response body is delimited.
#[derive(Debug, PartialEq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Until the node closes the connection.
    Close,
    /// The connection now speaks another protocol (101 Switching Protocols).
    Upgraded,
    Done,
}

#[derive(Debug, PartialEq)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

enum Parsed {
    Final(Response<()>, Framing, bool),
    /// A 1xx other than 101, consumed: the final response follows.
    Interim,
    Partial,
}

/// Parses a response head at the start of `buf`, taking it off the buffer when complete. Header
/// values are slices of the buffer, not copies. Connection-scoped fields are left out.
fn parse_head(buf: &mut BytesMut, head_only: bool) -> Result<Parsed, Error> {
    // Left uninitialized: the parser writes only the fields it finds, and most heads are short.
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut parsed, buf, &mut fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::Malformed("too many header fields")),
        Err(_) => return Err(Error::Malformed("invalid response head")),
    };
    let code = parsed.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| Error::Malformed("invalid status code"))?;
    if status.is_informational() && code != 101 {
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // Where each name and value sits, so both can be taken from the frozen head.
    let mut spans = [Span::default(); MAX_HEADERS];
    let count = parsed.headers.len();
    for (span, field) in spans.iter_mut().zip(parsed.headers.iter()) {
        *span = Span::of(buf, field);
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    let (mut length, mut chunked, mut encoded) = (None::<u64>, false, false);
    let (mut close, mut keep_alive) = (false, false);
    let mut named = Vec::new();
    for span in &spans[..count] {
        let (name, value) = span.field(&head).ok_or(Error::Malformed("invalid header field"))?;
        if name == header::CONTENT_LENGTH {
            let n = parse_length(value.as_bytes()).ok_or(Error::Malformed("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Malformed("conflicting content-length"));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            encoded = true;
            // Chunked must be the last coding applied; anything else runs to the close.
            chunked = value.as_bytes().rsplit(|&b| b == b',').next().is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else if let Ok(n) = HeaderName::from_bytes(token)
                    && !hop::is_hop_by_hop(&n)
                {
                    // Any other field a Connection field names is connection-scoped too.
                    named.push(n);
                }
            }
        }
        // Connection-scoped fields stop here, except on a 101, whose switch needs them all,
        // and a 426's Upgrade, which says what to switch to.
        if code != 101 && !hop::passes_in_answer(code, &name) {
            continue;
        }
        headers.append(name, value);
    }
    for name in &named {
        headers.remove(name);
    }
    let framing = if code == 101 {
        Framing::Upgraded
    } else if head_only || code == 204 || code == 304 {
        Framing::Done
    } else if encoded {
        // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3); the length goes, so the
        // client side frames the decoded body itself.
        headers.remove(header::CONTENT_LENGTH);
        if chunked { Framing::Chunked(Chunk::Size) } else { Framing::Close }
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let reusable = match version {
        Version::HTTP_10 => keep_alive && !close,
        _ => !close,
    } && !(encoded && length.is_some())
        && !matches!(framing, Framing::Close | Framing::Upgraded);
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = headers;
    Ok(Parsed::Final(resp, framing, reusable))
}

/// Where a header field sits in a head being parsed, so that once the head is frozen its name
/// and value can be taken from it without copying the value.
#[derive(Clone, Copy, Default)]
pub(crate) struct Span {
    name: (u32, u32),
    value: (u32, u32),
}

impl Span {
    /// `field` must borrow from `head`.
    pub fn of(head: &[u8], field: &httparse::Header<'_>) -> Span {
        let at = |s: &[u8]| ((s.as_ptr() as usize - head.as_ptr() as usize) as u32, s.len() as u32);
        Span { name: at(field.name.as_bytes()), value: at(field.value) }
    }

    /// The field, if `http` accepts it as well as httparse did.
    pub fn field(&self, head: &Bytes) -> Option<(HeaderName, HeaderValue)> {
        let range = |(at, len): (u32, u32)| at as usize..(at + len) as usize;
        let name = header_name(&head[range(self.name)])?;
        let value = HeaderValue::from_maybe_shared(head.slice(range(self.value))).ok()?;
        Some((name, value))
    }
}

/// Names longer than this are parsed every time.
const CACHED_NAME: usize = 32;

/// One slot of a worker's header-name cache: the bytes as they arrived, and what they parse to.
struct CachedName {
    len: u8,
    raw: [u8; CACHED_NAME],
    name: HeaderName,
}

/// `HeaderName::from_bytes`, remembered per worker: the same few spellings of the same few
/// names arrive request after request, and a slot hit costs one comparison instead of a parse.
/// The cache is keyed by the exact bytes, so a hit returns what parsing them would.
pub(crate) fn header_name(raw: &[u8]) -> Option<HeaderName> {
    const SLOTS: usize = 64;
    thread_local! {
        static CACHE: std::cell::RefCell<[Option<CachedName>; SLOTS]> = const { std::cell::RefCell::new([const { None }; SLOTS]) };
    }
    let len = raw.len();
    if len == 0 || len > CACHED_NAME {
        return HeaderName::from_bytes(raw).ok();
    }
    let slot = (len.wrapping_mul(31) ^ usize::from(raw[0]) ^ usize::from(raw[len - 1]).wrapping_mul(7) ^ usize::from(raw[len / 2]).wrapping_mul(13)) % SLOTS;
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(hit) = &cache[slot]
            && usize::from(hit.len) == len
            && hit.raw[..len] == *raw
        {
            return Some(hit.name.clone());
        }
        let name = HeaderName::from_bytes(raw).ok()?;
        let mut bytes = [0; CACHED_NAME];
        bytes[..len].copy_from_slice(raw);
        cache[slot] = Some(CachedName { len: len as u8, raw: bytes, name: name.clone() });
        Some(name)
    })
}

fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// A response body read from the node's connection as it is polled.
pub struct Body {
    /// None once the body failed: the connection is then closed, never reused.
    conn: Option<Connection>,
    framing: Framing,
    keep_alive: bool,
}

enum Step {
    Frame(Frame<Bytes>),
    End,
    /// More bytes are needed from the connection.
    Read,
}

impl Body {
    /// Marks an empty remainder as done, so the end is known without another poll.
    fn settle(&mut self) {
        if self.framing == Framing::Length(0) {
            self.framing = Framing::Done;
        }
    }

    /// The connection, for another exchange: only once the body was read to its end, the node
    /// allowed keep-alive and sent nothing beyond the response.
    pub fn idle(&mut self) -> Option<Connection> {
        if self.framing != Framing::Done || !self.keep_alive || self.conn.as_ref().is_some_and(|c| !c.buf.is_empty()) {
            return None;
        }
        self.conn.take()
    }

    /// After a 101 answer: the connection's stream and whatever of the new protocol already
    /// arrived.
    pub fn upgraded(self) -> Option<(Stream, Bytes)> {
        match (self.framing, self.conn) {
            (Framing::Upgraded, Some(c)) => Some((c.io, c.buf.freeze())),
            _ => None,
        }
    }

    fn step(framing: &mut Framing, buf: &mut BytesMut) -> Result<Step, Error> {
        loop {
            return Ok(match framing {
                Framing::Done | Framing::Upgraded => Step::End,
                Framing::Length(left) => {
                    let Some(data) = take(left, buf) else { return Ok(Step::Read) };
                    if *left == 0 {
                        *framing = Framing::Done;
                    }
                    Step::Frame(Frame::data(data))
                }
                Framing::Close => {
                    if buf.is_empty() {
                        return Ok(Step::Read);
                    }
                    Step::Frame(Frame::data(buf.split().freeze()))
                }
                Framing::Chunked(chunk) => match chunk {
                    Chunk::Size => {
                        let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
                            if buf.len() > MAX_CHUNK_LINE {
                                return Err(Error::Malformed("chunk size line too long"));
                            }
                            return Ok(Step::Read);
                        };
                        let size = parse_chunk_size(&buf[..eol]).ok_or(Error::Malformed("invalid chunk size"))?;
                        buf.advance(eol + 1);
                        *chunk = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
                        continue;
                    }
                    Chunk::Data(left) => {
                        let Some(data) = take(left, buf) else { return Ok(Step::Read) };
                        if *left == 0 {
                            *chunk = Chunk::DataEnd;
                        }
                        Step::Frame(Frame::data(data))
                    }
                    Chunk::DataEnd => {
                        match buf.first() {
                            None => return Ok(Step::Read),
                            Some(b'\n') => buf.advance(1),
                            Some(b'\r') if buf.len() < 2 => return Ok(Step::Read),
                            Some(b'\r') if buf[1] == b'\n' => buf.advance(2),
                            Some(_) => return Err(Error::Malformed("missing CRLF after chunk data")),
                        }
                        *chunk = Chunk::Size;
                        continue;
                    }
                    Chunk::Trailers => {
                        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                        let (len, map) = match httparse::parse_headers(buf, &mut fields) {
                            Ok(httparse::Status::Complete((len, fields))) => {
                                let mut map = HeaderMap::with_capacity(fields.len());
                                for f in fields.iter() {
                                    // A trailer field that is not valid HTTP is dropped, as a proxy
                                    // may; the body itself arrived whole.
                                    if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(f.name.as_bytes()), HeaderValue::from_bytes(f.value)) {
                                        map.append(n, v);
                                    }
                                }
                                (len, map)
                            }
                            Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                                return Err(Error::Malformed("trailer section too large"));
                            }
                            Ok(httparse::Status::Partial) => return Ok(Step::Read),
                            Err(_) => return Err(Error::Malformed("invalid trailer section")),
                        };
                        buf.advance(len);
                        *framing = Framing::Done;
                        if map.is_empty() { Step::End } else { Step::Frame(Frame::trailers(map)) }
                    }
                },
            });
        }
    }
}

/// Up to `left` bytes of what is buffered, counted off `left`; None when nothing is buffered.
fn take(left: &mut u64, buf: &mut BytesMut) -> Option<Bytes> {
    if buf.is_empty() {
        return None;
    }
    let n = (*left).min(buf.len() as u64);
    *left -= n;
    Some(buf.split_to(n as usize).freeze())
}

/// A chunk-size line without its LF: hex digits, then optional extensions, then an optional CR.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return None;
    }
    let rest = &line[digits..];
    let rest = rest.trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return None;
    }
    let hex = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(hex, 16).ok()
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            match Body::step(&mut this.framing, &mut conn.buf) {
                Ok(Step::Frame(f)) => return Poll::Ready(Some(Ok(f))),
                Ok(Step::End) => return Poll::Ready(None),
                Ok(Step::Read) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if this.framing == Framing::Close => {
                    this.framing = Framing::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Error::Incomplete)));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Upgraded) || self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done | Framing::Upgraded => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Methods a request may be sent again with after a connection broke (RFC 9110 §9.2.2).
pub fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use tokio::io::AsyncReadExt;

    #[test]
    fn cached_header_names_parse_as_http_does() {
        let mut names: Vec<Vec<u8>> = ["Host", "host", "HOST", "Content-Length", "content-type", "X-Custom-Field", "x-custom-fielD", "Date", "ETag", "a", "", "bad name", "bad:name", "é"]
            .iter()
            .map(|n| n.as_bytes().to_vec())
            .collect();
        names.push(vec![b'x'; CACHED_NAME]);
        names.push(vec![b'y'; CACHED_NAME + 1]);
        // Enough distinct names of one length that many share a slot and evict one another.
        names.extend((0..300).map(|i| format!("x-h{i:04}").into_bytes()));
        for round in 0..3 {
            for raw in &names {
                let want = HeaderName::from_bytes(raw).ok();
                assert_eq!(header_name(raw), want, "round {round}, name {:?}", String::from_utf8_lossy(raw));
            }
        }
    }

    /// Runs one exchange against a scripted node: what the node reads is returned with the
    /// response and its body.
    async fn exchange(req: Request<ReqBody>, answer: &'static [&'static [u8]]) -> (String, Result<(Response<()>, Vec<u8>, Option<HeaderMap>), Error>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let node = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // The request ends with its head when it has no body; the tests' bodies are small.
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if let Ok(Ok(n)) = tokio::time::timeout(std::time::Duration::from_millis(5), s.read(&mut buf)).await {
                got.extend_from_slice(&buf[..n]);
            }
            for part in answer {
                s.write_all(part).await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            String::from_utf8(got).unwrap()
        });
        let conn = Connection::new(Stream::Plain(TcpStream::connect(addr).await.unwrap()));
        let result = match conn.send(req, false, &AsIs, &Timeouts::default()).await {
            Ok(resp) => {
                let (head, body) = resp.into_parts();
                match body.collect().await {
                    Ok(c) => {
                        let trailers = c.trailers().cloned();
                        Ok((Response::from_parts(head, ()), c.to_bytes().to_vec(), trailers))
                    }
                    Err(e) => Err(e),
                }
            }
            Err(f) => Err(f.error),
        };
        (node.await.unwrap(), result)
    }

    fn get(path: &str) -> Request<ReqBody> {
        let mut req = Request::new(ReqBody::Empty);
        *req.uri_mut() = path.parse().unwrap();
        req.headers_mut().insert(header::HOST, HeaderValue::from_static("node"));
        req
    }

    #[tokio::test]
    async fn framings() {
        struct Case {
            name: &'static str,
            answer: &'static [&'static [u8]],
            status: u16,
            body: &'static str,
        }
        let cases = [
            Case { name: "length", answer: &[b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"], status: 200, body: "hello" },
            Case {
                name: "length in pieces",
                answer: &[b"HTTP/1.1 200 OK\r\nConte", b"nt-Length: 11\r\n\r\nhello", b" world"],
                status: 200,
                body: "hello world",
            },
            Case {
                name: "chunked",
                answer: &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"],
                status: 200,
                body: "hello world",
            },
            Case {
                name: "chunked, split everywhere",
                answer: &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5", b"\r\nhel", b"lo\r", b"\n0\r\n", b"\r\n"],
                status: 200,
                body: "hello",
            },
            Case {
                name: "to the close",
                answer: &[b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall ", b"of it"],
                status: 200,
                body: "all of it",
            },
            Case { name: "no content", answer: &[b"HTTP/1.1 204 No Content\r\n\r\n"], status: 204, body: "" },
            Case {
                name: "interim answers skipped",
                answer: &[b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"],
                status: 201,
                body: "ok",
            },
        ];
        for case in cases {
            let (_, result) = exchange(get("/x"), case.answer).await;
            let (resp, body, _) = result.unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert_eq!(resp.status().as_u16(), case.status, "{}", case.name);
            assert_eq!(String::from_utf8(body).unwrap(), case.body, "{}", case.name);
        }
    }

    #[tokio::test]
    async fn trailers_and_encoded_length() {
        let answer: &[&[u8]] = &[b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-sum: 7\r\n\r\n"];
        let (_, result) = exchange(get("/"), answer).await;
        let (resp, body, trailers) = result.unwrap();
        assert_eq!(body, b"ok");
        assert!(!resp.headers().contains_key(header::CONTENT_LENGTH), "the length yields to the coding");
        assert_eq!(trailers.unwrap()["x-sum"], "7");
    }

    /// Connection-scoped fields stay on this hop, but a 426 keeps the `Upgrade` that says what
    /// to switch to.
    #[tokio::test]
    async fn an_answers_connection_scoped_fields_stop_here_but_a_426s_upgrade() {
        let answer: &[&[u8]] = &[b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: TLS/1.2, HTTP/1.1\r\nConnection: Upgrade, x-hop\r\nx-hop: 1\r\nKeep-Alive: timeout=5\r\nx-end: 2\r\nContent-Length: 0\r\n\r\n"];
        let (resp, _, _) = exchange(get("/"), answer).await.1.unwrap();
        assert_eq!(resp.status(), 426);
        assert_eq!(resp.headers()[header::UPGRADE], "TLS/1.2, HTTP/1.1");
        assert!(!["connection", "x-hop", "keep-alive"].iter().any(|n| resp.headers().contains_key(*n)), "{:?}", resp.headers());
        assert_eq!(resp.headers()["x-end"], "2");
        let answer: &[&[u8]] = &[b"HTTP/1.1 200 OK\r\nUpgrade: TLS/1.2\r\nContent-Length: 0\r\n\r\n"];
        let (resp, _, _) = exchange(get("/"), answer).await.1.unwrap();
        assert!(!resp.headers().contains_key(header::UPGRADE), "{:?}", resp.headers());
    }

    #[tokio::test]
    async fn broken_answers() {
        let cases: [(&str, &'static [&'static [u8]], &str); 5] = [
            ("closed at once", &[], "connection closed before a response"),
            ("cut short", &[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"], "connection closed before the response was complete"),
            ("two lengths", &[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"], "conflicting content-length"),
            ("bad chunk", &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"], "invalid chunk size"),
            ("not HTTP", &[b"SSH-2.0-OpenSSH\r\n\r\n"], "invalid response head"),
        ];
        for (name, answer, want) in cases {
            let (_, result) = exchange(get("/"), answer).await;
            let err = result.err().unwrap_or_else(|| panic!("{name}: no error"));
            assert!(err.to_string().contains(want), "{name}: {err}");
        }
    }

    #[tokio::test]
    async fn request_framing_on_the_wire() {
        let ok: &[&[u8]] = &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"];
        let (seen, _) = exchange(get("/a?b=1"), ok).await;
        assert_eq!(seen, "GET /a?b=1 HTTP/1.1\r\nhost: node\r\n\r\n");

        let mut post = get("/p");
        *post.method_mut() = Method::POST;
        post.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        *post.body_mut() = ReqBody::Read(Some(Bytes::from_static(b"body")));
        let (seen, _) = exchange(post, ok).await;
        assert_eq!(seen, "POST /p HTTP/1.1\r\nhost: node\r\ncontent-length: 4\r\n\r\nbody", "the body's own length wins");
    }

    #[test]
    fn reuse_follows_the_node() {
        for (answer, reusable) in [
            (&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..], true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", false),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok", true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", false),
            (b"HTTP/1.1 200 OK\r\n\r\nto the close", false),
        ] {
            let mut buf = BytesMut::from(answer);
            let Ok(Parsed::Final(_, mut framing, keep_alive)) = parse_head(&mut buf, false) else { panic!("no head") };
            while let Step::Frame(_) = Body::step(&mut framing, &mut buf).unwrap() {}
            let idle = framing == Framing::Done && keep_alive && buf.is_empty();
            assert_eq!(idle, reusable, "{}", String::from_utf8_lossy(answer));
        }
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a\r"), Some(26));
        assert_eq!(parse_chunk_size(b"0"), Some(0));
        assert_eq!(parse_chunk_size(b"A ; name=v\r"), Some(10));
        assert_eq!(parse_chunk_size(b""), None);
        assert_eq!(parse_chunk_size(b"-1\r"), None);
        assert_eq!(parse_chunk_size(b"1g\r"), None);
        assert_eq!(parse_chunk_size(b"ffffffffffffffff\r"), None, "too large");
        assert_eq!(parse_length(b"123"), Some(123));
        assert_eq!(parse_length(b"+1"), None);
        assert_eq!(parse_length(b""), None);
    }
}
