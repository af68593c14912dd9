//! Bounds on an HTTP/2 client connection that hyper's server does not keep: an idle
//! connection (no stream open) closes after `keepalive_timeout`, as an HTTP/1.1 one does, and a
//! client that stops taking a response (it never opens its flow-control window, so hyper cannot
//! write and no socket write ever waits) loses the connection after `send_timeout`.
//!
//! Each stream holds a [`Slot`] from the moment its request arrives until its response body is
//! dropped. The slot is marked when the response head, or a piece of its body, is handed to
//! hyper, and cleared when hyper comes back to the body for more; a slot marked for longer
//! than `send_timeout` is a client that does not read. One watchdog per connection looks at the slots a few times per bound.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::body::{BoxError, RespBody};

/// The streams of one connection.
pub(crate) struct Streams {
    epoch: Instant,
    slots: Mutex<Vec<Weak<Slot>>>,
    /// Milliseconds since the epoch when the last stream ended.
    last_end: Arc<AtomicU64>,
}

/// One stream in flight.
pub(crate) struct Slot {
    epoch: Instant,
    last_end: Arc<AtomicU64>,
    /// Milliseconds since the connection's epoch, plus one, when the response body handed
    /// hyper data that hyper has not come back after; 0 when it has not.
    handed: AtomicU64,
}

impl Slot {
    /// Data or a response head was handed to hyper, which has not come back for more yet.
    pub(crate) fn hand(&self) {
        self.handed.store(millis_since(self.epoch, Instant::now()) + 1, Ordering::Relaxed);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.last_end.fetch_max(millis_since(self.epoch, Instant::now()), Ordering::Relaxed);
    }
}

/// Why the watchdog ends a connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// No stream for `keepalive_timeout`: closed gracefully (GOAWAY).
    Idle,
    /// A response waited for the client longer than `send_timeout`: dropped.
    Stalled,
}

impl Streams {
    pub(crate) fn new() -> Arc<Streams> {
        Arc::new(Streams { epoch: Instant::now(), slots: Mutex::new(Vec::new()), last_end: Arc::default() })
    }

    /// A new stream, counted until the returned slot and every clone of it are dropped.
    pub(crate) fn open(&self) -> Arc<Slot> {
        let slot = Arc::new(Slot { epoch: self.epoch, last_end: self.last_end.clone(), handed: AtomicU64::new(0) });
        self.slots.lock().expect("never poisoned").push(Arc::downgrade(&slot));
        slot
    }

    fn millis(&self, at: Instant) -> u64 {
        millis_since(self.epoch, at)
    }

    /// Resolves when the connection should end, and why.
    pub(crate) async fn watch(&self, keepalive: Duration, send: Duration) -> Ending {
        let tick = keepalive.min(send).min(Duration::from_secs(4)) / 4;
        loop {
            tokio::time::sleep(tick).await;
            let now = Instant::now();
            let (now_ms, send_ms) = (self.millis(now), u64::try_from(send.as_millis()).unwrap_or(u64::MAX));
            let mut slots = self.slots.lock().expect("never poisoned");
            slots.retain(|w| w.strong_count() > 0);
            if slots.is_empty() {
                if now_ms.saturating_sub(self.last_end.load(Ordering::Relaxed)) >= u64::try_from(keepalive.as_millis()).unwrap_or(u64::MAX) {
                    return Ending::Idle;
                }
                continue;
            }
            let stalled = slots.iter().filter_map(Weak::upgrade).any(|s| {
                let handed = s.handed.load(Ordering::Relaxed);
                handed != 0 && now_ms.saturating_sub(handed - 1) >= send_ms
            });
            if stalled {
                return Ending::Stalled;
            }
        }
    }
}

fn millis_since(epoch: Instant, at: Instant) -> u64 {
    u64::try_from(at.duration_since(epoch).as_millis()).unwrap_or(u64::MAX - 1)
}

/// A response body on a watched connection (or, with no slot, any other).
pub(crate) struct Watched {
    inner: RespBody,
    slot: Option<Arc<Slot>>,
}

impl Watched {
    /// `inner` as the response to the stream of `slot`. hyper polls a body only once the
    /// client's window has room, so the wait for the client starts with the head.
    pub(crate) fn new(inner: RespBody, slot: Option<Arc<Slot>>) -> Watched {
        if let Some(slot) = &slot {
            slot.hand();
        }
        Watched { inner, slot }
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(slot) = &this.slot {
            // Data out: hyper now owes a write, which the client's window may hold up. Any
            // other outcome means hyper came back, and the wait, if any, is the upstream's.
            match &polled {
                Poll::Ready(Some(Ok(frame))) if frame.data_ref().is_some_and(|d| !d.is_empty()) => slot.hand(),
                _ => slot.handed.store(0, Ordering::Relaxed),
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_streams_ends_after_the_keepalive_timeout() {
        let streams = Streams::new();
        let started = Instant::now();
        assert_eq!(streams.watch(Duration::from_secs(5), Duration::from_secs(60)).await, Ending::Idle);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(5) && waited < Duration::from_secs(7), "{waited:?}");
        // A stream that opens and ends between two looks still counts: the idle time runs
        // from its end.
        let streams = Streams::new();
        let brief = async {
            tokio::time::sleep(Duration::from_millis(3_100)).await;
            drop(streams.open());
        };
        let started = Instant::now();
        let (ending, ()) = tokio::join!(streams.watch(Duration::from_secs(5), Duration::from_secs(60)), brief);
        assert_eq!(ending, Ending::Idle);
        assert!(started.elapsed() >= Duration::from_millis(8_100), "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_stream_keeps_the_connection_and_a_stalled_one_ends_it() {
        let streams = Streams::new();
        let slot = streams.open();
        // In flight and not stalled (waiting for its upstream): the connection stays.
        let watch = tokio::time::timeout(Duration::from_secs(30), streams.watch(Duration::from_secs(5), Duration::from_secs(10))).await;
        assert!(watch.is_err(), "a stream waiting for its upstream is neither idle nor stalled");
        // Data handed to hyper and never taken.
        slot.handed.store(millis_since(slot.epoch, Instant::now()) + 1, Ordering::Relaxed);
        let started = Instant::now();
        assert_eq!(streams.watch(Duration::from_secs(5), Duration::from_secs(10)).await, Ending::Stalled);
        assert!(started.elapsed() >= Duration::from_secs(10), "{:?}", started.elapsed());
        // Once it is dropped, the connection is idle.
        drop(slot);
        assert_eq!(streams.watch(Duration::from_secs(5), Duration::from_secs(10)).await, Ending::Idle);
    }
}
