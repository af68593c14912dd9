//! Body types of the proxy. Request and response bodies stream frame by frame; nothing here
//! buffers a body. Request bodies live in `req_body`, below the HTTP/1.1 client and the pool;
//! response bodies, which hand connections back to the pool, here above them.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::h1;
use crate::pool::Lease;
use weir_upstream::InFlight;

pub use crate::req_body::{BodyTimeout, BoxError, ClientBody, ReqBody};

/// A streaming body rewrite: each chunk in, what to send in its place out (`true` with the
/// last, empty call).
pub type BodyTransform = Box<dyn FnMut(&[u8], bool) -> Bytes + Send>;

/// What is sent to the client: an upstream's body, or one the gateway made.
pub struct RespBody(Kind);

enum Kind {
    Full(Option<Bytes>),
    /// A body an in-process handler produces as it goes (server-sent events, say).
    Stream(Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>),
    Upstream(UpstreamBody),
    Watched(Box<Watched>),
    Transformed(Box<Transformed>),
}

/// A body each chunk of which goes through a plugin's transform (a compressor).
struct Transformed {
    inner: RespBody,
    transform: BodyTransform,
    done: bool,
}

/// A body whose end (or abandonment) someone waits for, with the bytes it carried.
struct Watched {
    inner: RespBody,
    sent: u64,
    on_end: Option<Box<dyn FnOnce(u64) + Send>>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.sent);
        }
    }
}

impl RespBody {
    pub fn full(b: impl Into<Bytes>) -> RespBody {
        RespBody(Kind::Full(Some(b.into())))
    }

    pub fn empty() -> RespBody {
        RespBody(Kind::Full(None))
    }

    /// A body made as it is sent: each frame goes to the client as soon as `body` yields it.
    pub fn stream<B>(body: B) -> RespBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt as _;
        RespBody(Kind::Stream(Box::pin(body.map_err(Into::into))))
    }

    /// Streams `inner`, failing if no frame arrives for `read_timeout`, and gives the connection
    /// back to the pool once the body has been read to its end.
    /// `in_flight` counts the request against its node's load until the body is done.
    pub fn upstream(inner: Received, read_timeout: Duration, lease: Lease, in_flight: Option<InFlight>) -> RespBody {
        let mut body = UpstreamBody { inner, read_timeout, sleep: None, lease: Some(lease), in_flight };
        if body.inner.is_end_stream() {
            body.release();
        }
        RespBody(Kind::Upstream(body))
    }

    /// Streams this body through `transform`.
    pub fn transformed(self, transform: BodyTransform) -> RespBody {
        RespBody(Kind::Transformed(Box::new(Transformed { inner: self, transform, done: false })))
    }

    /// Calls `f` with the number of body bytes sent once the body is done with: read to its
    /// end, failed, or dropped because the client went away.
    pub fn on_end(self, f: impl FnOnce(u64) + Send + 'static) -> RespBody {
        RespBody(Kind::Watched(Box::new(Watched { inner: self, sent: 0, on_end: Some(Box::new(f)) })))
    }
}

/// A response body as it comes from a node.
pub enum Received {
    H1(h1::Body),
    H2(Incoming),
}

impl Body for Received {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Received::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Received::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Received::H1(b) => b.is_end_stream(),
            Received::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Received::H1(b) => b.size_hint(),
            Received::H2(b) => b.size_hint(),
        }
    }
}

struct UpstreamBody {
    inner: Received,
    read_timeout: Duration,
    /// Created on the first `Pending`: most small bodies arrive with the head and need no timer.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Taken when the connection must not be reused (a failed or timed-out body).
    lease: Option<Lease>,
    in_flight: Option<InFlight>,
}

impl UpstreamBody {
    fn release(&mut self) {
        self.in_flight = None;
        if let (Some(lease), Received::H1(body)) = (self.lease.take(), &mut self.inner)
            && let Some(conn) = body.idle()
        {
            lease.release(conn);
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("upstream sent no data for {0:?}")]
pub struct ReadTimeout(Duration);

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(s) => s.as_mut().poll_frame(cx),
            Kind::Transformed(t) => loop {
                if t.done {
                    return Poll::Ready(None);
                }
                match ready!(Pin::new(&mut t.inner).poll_frame(cx)) {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            let out = (t.transform)(&data, false);
                            if !out.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                        }
                        // Trailers pass as they are.
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    },
                    Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                    None => {
                        t.done = true;
                        let tail = (t.transform)(&[], true);
                        return Poll::Ready((!tail.is_empty()).then(|| Ok(Frame::data(tail))));
                    }
                }
            },
            Kind::Watched(w) => {
                let frame = ready!(Pin::new(&mut w.inner).poll_frame(cx));
                if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                    w.sent += data.map_or(0, |d| d.len() as u64);
                }
                Poll::Ready(frame)
            }
            Kind::Upstream(u) => match Pin::new(&mut u.inner).poll_frame(cx) {
                Poll::Ready(frame) => {
                    if let Some(s) = u.sleep.as_mut() {
                        let next = tokio::time::Instant::now() + u.read_timeout;
                        s.as_mut().reset(next);
                    }
                    match &frame {
                        None => u.release(),
                        Some(Ok(_)) if u.inner.is_end_stream() => u.release(),
                        Some(Err(_)) => drop(u.lease.take()),
                        Some(Ok(_)) => {}
                    }
                    Poll::Ready(frame)
                }
                Poll::Pending => {
                    let timeout = u.read_timeout;
                    let sleep = u.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    ready!(sleep.as_mut().poll(cx));
                    drop(u.lease.take());
                    Poll::Ready(Some(Err(Box::new(ReadTimeout(timeout)))))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Full(b) => b.is_none(),
            Kind::Stream(s) => s.is_end_stream(),
            Kind::Upstream(u) => u.inner.is_end_stream(),
            Kind::Watched(w) => w.inner.is_end_stream(),
            Kind::Transformed(t) => t.done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Stream(s) => s.size_hint(),
            Kind::Upstream(u) => u.inner.size_hint(),
            Kind::Watched(w) => w.inner.size_hint(),
            Kind::Transformed(_) => SizeHint::default(),
        }
    }
}
