//! Listeners and worker threads. Each worker is a thread with its own single-threaded runtime
//! and its own `SO_REUSEPORT` socket on every listen address, so the kernel spreads connections
//! across workers and a request never leaves the thread that accepted it (nginx's model).
//! Plain listeners speak HTTP/1.1 and HTTP/2 with prior knowledge (h2c).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use crate::proxy::{ConnInfo, Proxy};

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Binds every address once per worker (so a bad address fails start-up, not a worker) and
/// starts the workers. Returns the bound addresses (useful when a port was 0).
pub fn start(addrs: &[SocketAddr], workers: usize, proxy: Arc<Proxy>) -> std::io::Result<Vec<SocketAddr>> {
    let workers = if workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        workers
    };
    // With port 0 the first bind picks the port and the other workers join it.
    let mut bound: Vec<SocketAddr> = Vec::new();
    let mut per_worker: Vec<Vec<std::net::TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    for addr in addrs {
        let first = bind(*addr)?;
        let actual = first.local_addr()?;
        bound.push(actual);
        per_worker[0].push(first);
        for list in per_worker.iter_mut().skip(1) {
            list.push(bind(actual)?);
        }
    }
    for (n, listeners) in per_worker.into_iter().enumerate() {
        let proxy = proxy.clone();
        std::thread::Builder::new().name(format!("weir-worker-{n}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("worker runtime");
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for l in listeners {
                    let l = TcpListener::from_std(l).expect("listener registers with the runtime");
                    tasks.push(tokio::spawn(accept_loop(l, proxy.clone())));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        })?;
    }
    Ok(bound)
}

async fn accept_loop(listener: TcpListener, proxy: Arc<Proxy>) {
    let local = listener.local_addr().expect("bound listener has an address");
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let info = Arc::new(ConnInfo::new(remote, local, "http"));
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let proxy = proxy.clone();
                let info = info.clone();
                async move { Ok::<_, Infallible>(proxy.handle(&info, req).await) }
            });
            // HTTP/1.1, or HTTP/2 when the client opens with its preface (h2c prior knowledge).
            let builder = auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
    }
}
