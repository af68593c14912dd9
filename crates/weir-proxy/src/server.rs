//! Listeners and worker threads. Each worker is a thread with its own single-threaded runtime
//! and its own `SO_REUSEPORT` socket on every listen address, so the kernel spreads connections
//! across workers and a request never leaves the thread that accepted it (nginx's model).
//! Plain listeners speak HTTP/1.1 and HTTP/2 with prior knowledge (h2c); TLS listeners pick
//! the certificate by SNI from the current snapshot and offer h2 and http/1.1 by ALPN.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use socket2::{Domain, Protocol, Socket, Type};
use std::time::Duration;

use rustls::server::Acceptor;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;

use weir_http::{ConnInfo, drain, front};
use weir_telemetry::COUNTERS;

use crate::places::Open;
use crate::proxy::Proxy;

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Fails when another socket already listens on `addr`. Our workers share each address
/// through `SO_REUSEPORT`, but so would any other process that sets it (a second Weir), and
/// the kernel would split the traffic between them. A socket without `SO_REUSEPORT` cannot
/// bind where anyone listens, so it is bound once and dropped before the workers bind.
/// `SO_REUSEADDR` is kept so connections of a previous run in TIME_WAIT do not block a restart.
fn probe(addr: SocketAddr) -> std::io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

/// An error that names the address it is about: `cannot listen on 127.0.0.1:9080: ...`.
pub fn listen_error(addr: SocketAddr, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds every address once per worker (so a bad address fails start-up, not a worker) and
/// starts the workers. `plain` listeners speak HTTP; `tls` ones TLS with certificates chosen by
/// SNI. Returns the bound addresses with whether each is TLS (useful when a port was 0).
pub fn start(
    plain: &[SocketAddr],
    tls: &[SocketAddr],
    workers: usize,
    proxy: Arc<Proxy>,
) -> std::io::Result<Vec<(SocketAddr, bool)>> {
    let workers = if workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        workers
    };
    // With port 0 the first bind picks the port and the other workers join it.
    let mut bound = Vec::new();
    let mut per_worker: Vec<Vec<(std::net::TcpListener, bool)>> = (0..workers).map(|_| Vec::new()).collect();
    let all = plain.iter().map(|a| (a, false)).chain(tls.iter().map(|a| (a, true)));
    for (addr, is_tls) in all {
        let named = |e| listen_error(*addr, e);
        probe(*addr).map_err(named)?;
        let first = bind(*addr).map_err(named)?;
        let actual = first.local_addr()?;
        bound.push((actual, is_tls));
        per_worker[0].push((first, is_tls));
        for list in per_worker.iter_mut().skip(1) {
            list.push((bind(actual).map_err(named)?, is_tls));
        }
    }
    for (n, listeners) in per_worker.into_iter().enumerate() {
        let proxy = proxy.clone();
        std::thread::Builder::new().name(format!("weir-worker-{n}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("worker runtime");
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (l, is_tls) in listeners {
                    let l = TcpListener::from_std(l).expect("listener registers with the runtime");
                    tasks.push(tokio::spawn(accept_loop(l, is_tls, proxy.clone())));
                }
                for t in tasks {
                    let _ = t.await;
                }
                // The accept loops end when draining starts; the connections this runtime still
                // serves run on until the process exits (the caller waits for them).
                std::future::pending::<()>().await;
            });
        })?;
    }
    Ok(bound)
}

async fn accept_loop(listener: TcpListener, tls: bool, proxy: Arc<Proxy>) {
    let local = listener.local_addr().expect("bound listener has an address");
    let stop = drain::accepting_ends();
    tokio::pin!(stop);
    loop {
        // Draining drops the listener: the kernel refuses new connections from then on.
        let accepted = tokio::select! {
            biased;
            () = &mut stop => return,
            a = listener.accept() => a,
        };
        let (stream, remote) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        COUNTERS.accepted.fetch_add(1, Ordering::Relaxed);
        // Past the cap the connection is closed at once: clients see a refusal rather than a
        // hang, and the ones already in keep being served.
        let Some(open) = Open::take(proxy.limits.max_connections) else {
            drop(stream);
            continue;
        };
        COUNTERS.handled.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let trusted = proxy.limits.trusts(remote.ip());
        if !tls {
            let info = Arc::new(ConnInfo::new(remote, local, "http").trusting(trusted));
            tokio::spawn(serve(stream, info, proxy, open));
            continue;
        }
        tokio::spawn(async move {
            let Some(stream) = handshake(stream, &proxy).await else { return };
            let info = Arc::new(ConnInfo::new(remote, local, "https").trusting(trusted));
            serve(stream, info, proxy, open).await;
        });
    }
}

/// Reads the ClientHello, picks the `ssls` object for its SNI, and completes the handshake.
/// A client with a name no certificate covers is refused; one without SNI gets the fallback
/// name's certificate, when one is configured.
async fn handshake(stream: TcpStream, proxy: &Proxy) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let accept = async {
        let start = LazyConfigAcceptor::new(Acceptor::default(), stream).await.ok()?;
        let sni = start.client_hello().server_name().map(str::to_string);
        let Some(config) = proxy.tls_config(sni.as_deref()) else {
            tracing::debug!(sni = sni.as_deref().unwrap_or(""), "no certificate for this server name");
            return None;
        };
        match start.into_stream(config).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await.ok().flatten()
}

async fn serve<I>(io: I, info: Arc<ConnInfo>, proxy: Arc<Proxy>, _open: Open)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    COUNTERS.active.fetch_add(1, Ordering::Relaxed);
    let _active = Active;
    let _open = drain::Open::new();
    front::serve(io, info, proxy).await;
}

/// Counts a client connection as active while it lives.
struct Active;

impl Drop for Active {
    fn drop(&mut self) {
        COUNTERS.active.fetch_sub(1, Ordering::Relaxed);
    }
}
