//! Request bodies as they go upstream. They stream frame by frame; nothing here buffers a
//! body.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What is sent upstream: the client's body as it streams in, the body a plugin needed read
/// first, or nothing (a retry of a bodiless request).
pub enum ReqBody {
    Incoming(Incoming),
    /// A client's body with a bound on each wait for more (`client_body_timeout`), after the
    /// bytes already read ahead of it.
    Client(Box<ClientBody>),
    Read(Option<Bytes>),
    Empty,
}

/// A client's request body: the bytes the front read ahead (to check a chunked body before
/// anything goes upstream), then the rest as it arrives, each wait bounded by `idle`.
pub struct ClientBody {
    ahead: Option<Bytes>,
    inner: Incoming,
    idle: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// The client sent nothing more for the body read timeout.
#[derive(Debug, thiserror::Error)]
#[error("client body read timed out")]
pub struct BodyTimeout;

impl ClientBody {
    pub fn new(ahead: Option<Bytes>, inner: Incoming, idle: Duration) -> ClientBody {
        ClientBody { ahead: ahead.filter(|b| !b.is_empty()), inner, idle, sleep: None }
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.inner.size_hint().exact() {
            Some(n) => SizeHint::with_exact(n + self.ahead.as_ref().map_or(0, |a| a.len() as u64)),
            None => SizeHint::default(),
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(b) = self.ahead.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(f) => {
                self.sleep = None;
                Poll::Ready(f.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = self.idle;
                let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout.into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ReqBody::Client(b) => b.poll_frame(cx),
            ReqBody::Read(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Incoming(b) => b.is_end_stream(),
            ReqBody::Client(b) => b.ahead.is_none() && b.inner.is_end_stream(),
            ReqBody::Read(b) => b.is_none(),
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Incoming(b) => b.size_hint(),
            ReqBody::Client(b) => b.size_hint(),
            ReqBody::Read(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}
