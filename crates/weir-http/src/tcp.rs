//! A TCP stream that takes a short read as "nothing more has arrived".
//!
//! The kernel's receive call copies everything queued, up to the room it is given; when it
//! returns less, the queue was empty. Tokio's own stream forgets that, and the next read makes
//! one more system call only to hear `EAGAIN` (one per request on a keep-alive connection).
//! Here a short read clears the socket's readiness, so the next read waits for the kernel's
//! next event at once, as nginx does with edge-triggered epoll. The clearing is tokio's: it
//! takes effect only when no event has come since the read began, so data that arrives
//! meanwhile is never waited for in vain. A closed peer stays readable (tokio keeps that state),
//! so the end of the stream is still read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A connected TCP socket, read as described in this module.
#[derive(Debug)]
pub struct Tcp(TcpStream);

impl Tcp {
    pub fn new(stream: TcpStream) -> Tcp {
        Tcp(stream)
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.0
    }
}

impl AsyncRead for Tcp {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let tcp = &self.get_mut().0;
        loop {
            ready!(tcp.poll_read_ready(cx))?;
            let room = buf.remaining();
            let mut got = None;
            let tried = tcp.try_io(Interest::READABLE, || {
                let n = tcp.try_read_buf(buf)?;
                got = Some(n);
                // `WouldBlock` tells tokio to clear the readiness; the bytes are kept.
                if n > 0 && n < room { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(n) }
            });
            match (got, tried) {
                (Some(_), _) => return Poll::Ready(Ok(())),
                // Nothing had arrived after all: wait for the next event.
                (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                (None, Err(e)) => return Poll::Ready(Err(e)),
                (None, Ok(_)) => unreachable!("a read that succeeded noted its length"),
            }
        }
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (Tcp, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (Tcp::new(accepted.unwrap().0), client.unwrap())
    }

    #[tokio::test]
    async fn after_a_short_read_the_next_read_waits_for_what_arrives_next() {
        let (mut tcp, mut peer) = pair().await;
        let mut buf = [0u8; 64];
        peer.write_all(b"first").await.unwrap();
        assert_eq!(tcp.read(&mut buf).await.unwrap(), 5);
        // The readiness is gone: a poll does not read and does not answer.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = ReadBuf::new(&mut buf);
        assert!(Pin::new(&mut tcp).poll_read(&mut cx, &mut probe).is_pending());
        peer.write_all(b"second").await.unwrap();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf)).await.expect("the next bytes wake the read").unwrap();
        assert_eq!(&buf[..n], b"second");
    }

    #[tokio::test]
    async fn a_full_read_leaves_the_rest_readable_and_the_end_is_read() {
        let (mut tcp, mut peer) = pair().await;
        let sent: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        peer.write_all(&sent).await.unwrap();
        // Data and the close arrive together: the bytes, then the end.
        peer.shutdown().await.unwrap();
        drop(peer);
        let mut got = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf)).await.expect("no read waits in vain").unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn writes_reach_the_peer() {
        let (mut tcp, mut peer) = pair().await;
        tcp.write_all(b"answer").await.unwrap();
        let mut buf = [0u8; 6];
        peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"answer");
    }
}
