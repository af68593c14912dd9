//! Protocol upgrades (WebSocket): once the upstream answers 101, the client's connection and
//! the node's are joined byte for byte. A tunnel counts as a client connection (against
//! `proxy.max_connections`, and for draining), and ends once neither side has sent anything
//! for the route's read timeout, as nginx ends one after `proxy_read_timeout`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Joins the client's upgraded connection (once hyper hands it over) and the node's, `early`
/// (bytes of the new protocol that came with the node's 101) going to the client first, until
/// either side closes or both stay silent for `idle`.
pub(crate) fn spawn<S>(client: OnUpgrade, upstream: S, early: Bytes, idle: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Taken before the client's connection gives up its own place, so the count never dips
    // below what is open.
    let place = crate::places::Open::held();
    tokio::spawn(async move {
        let _place = place;
        // Draining waits for it (up to shutdown_timeout).
        let _open = weir_http::drain::Open::new();
        let client = match client.await {
            Ok(c) => c,
            Err(e) => return tracing::debug!(error = %e, "protocol upgrade failed"),
        };
        let mut client = TokioIo::new(client);
        if !early.is_empty()
            && let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut client, &early).await
        {
            return tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
        if let Err(e) = join(client, upstream, idle).await {
            tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
    });
}

/// Copies both ways until either side closes, or until neither has sent a byte for `idle`.
async fn join<A, B>(a: A, b: B, idle: Duration) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let base = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let (mut a, mut b) = (Watched { io: a, base, last: last.clone() }, Watched { io: b, base, last: last.clone() });
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let quiet_until = base + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        tokio::select! {
            done = &mut copy => return done.map(drop),
            () = tokio::time::sleep_until(quiet_until) => {
                if base + Duration::from_millis(last.load(Ordering::Relaxed)) + idle <= Instant::now() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "neither side sent anything within the read timeout"));
                }
            }
        }
    }
}

/// One side of a tunnel, noting when bytes last moved through it (ms after `base`).
struct Watched<S> {
    io: S,
    base: Instant,
    last: Arc<AtomicU64>,
}

impl<S> Watched<S> {
    fn moved(&self) {
        self.last.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.moved();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.moved();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A tunnel carries bytes both ways while they flow, and ends once both sides have been
    /// silent for its idle time.
    #[tokio::test(start_paused = true)]
    async fn a_tunnel_ends_once_both_sides_stay_silent() {
        let (client, mut client_end) = tokio::io::duplex(64);
        let (node, mut node_end) = tokio::io::duplex(64);
        let joined = tokio::spawn(join(client, node, Duration::from_secs(60)));
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            client_end.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            node_end.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
        }
        assert!(!joined.is_finished(), "bytes every 50 s keep it open past 60 s");
        tokio::time::sleep(Duration::from_secs(61)).await;
        let ended = joined.await.unwrap().unwrap_err();
        assert_eq!(ended.kind(), io::ErrorKind::TimedOut);
    }
}
