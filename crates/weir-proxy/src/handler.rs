//! Routes that end in-process: a route's target is an upstream or a [`Handler`]. Functions,
//! MCP and the AI gateway are handlers; a [`crate::snapshot::Contributor`] puts them on the
//! routes it lowers. The plugins of the route run around a handler as around an upstream.
//!
//! A handler runs on the proxy worker that took the request, so it must never block it: work
//! that may block (a JavaScript engine, a synchronous parser) goes to an [`Offload`] pool,
//! whose threads are no worker's, and the worker awaits the answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use weir_core::error::{Error, ErrorKind};
use weir_http::body::RespBody;
use weir_plugins::Notes;

/// The most a handler reads of a request body unless it says otherwise: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// How long a handler has to answer unless it says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a handler sees of a request: its head, its body read whole (within
/// [`Handler::max_body`]), and what the gateway decided of it.
pub struct Call<'a> {
    pub parts: http::request::Parts,
    pub body: Bytes,
    /// The matched route's id.
    pub route_id: &'a str,
    /// The consumer an auth plugin named, when one did.
    pub consumer: Option<&'a str>,
    /// What the route's plugins noted for later phases.
    pub notes: &'a Notes,
    /// The path the route matched, where it is not `parts.uri`'s: decoded from it, or as it was
    /// before a plugin rewrote it (kept only for a handler that [`Handler::reads_matched_path`]).
    pub matched: Option<&'a str>,
}

impl Call<'_> {
    /// The path the route matched (its normal form, before any plugin rewrote it).
    pub fn matched_path(&self) -> &str {
        self.matched.unwrap_or(self.parts.uri.path())
    }
}

/// The work that answers a call, once the handler has read what it needs of the call.
pub type Answer = Pin<Box<dyn Future<Output = Response<RespBody>> + Send + 'static>>;

/// An in-process end of a route.
pub trait Handler: Send + Sync + 'static {
    /// The longest body read for a call; a longer one is answered 413 and the handler is not
    /// called.
    fn max_body(&self) -> usize {
        DEFAULT_MAX_BODY
    }

    /// How long the work may take to produce the response head; past it the call is dropped
    /// and answered 504. A streaming body is not bounded by it.
    fn timeout(&self) -> Duration {
        DEFAULT_TIMEOUT
    }

    /// Whether it tells its ends apart by the path the route matched ([`Call::matched_path`]),
    /// which a route with plugins then keeps a copy of before they may rewrite the path.
    fn reads_matched_path(&self) -> bool {
        false
    }

    /// Reads what it needs of `call` and returns the work that answers it. The response body
    /// may stream ([`RespBody::stream`]).
    fn call(&self, call: Call<'_>) -> Answer;
}

type Job = Box<dyn FnOnce() + Send>;

/// A pool of threads for work that may block, apart from the proxy workers: a bounded queue
/// in front of a fixed number of threads. A full queue refuses new work at once rather than
/// let one caller's backlog grow without bound.
#[derive(Clone)]
pub struct Offload {
    jobs: mpsc::SyncSender<Job>,
}

impl Offload {
    /// `threads` threads named `{name}-{i}`, taking jobs from a queue of `queue` places.
    pub fn new(name: &str, threads: usize, queue: usize) -> std::io::Result<Offload> {
        let (jobs, rx) = mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            weir_core::threads::spawn(std::thread::Builder::new().name(format!("{name}-{i}")), move || {
                loop {
                    // The lock is held only to take a job, never while running one.
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            })?;
        }
        Ok(Offload { jobs })
    }

    /// Runs `work` on one of the pool's threads and waits for its result without blocking the
    /// caller's thread. `Unavailable` when the queue is full; `Internal` when the work panicked.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            // Whoever asked is gone (the client left, the call timed out): the work is skipped.
            if tx.is_closed() {
                return;
            }
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            let _ = tx.send(out);
        });
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => Error::new(ErrorKind::Unavailable, "the offload queue is full"),
            mpsc::TrySendError::Disconnected(_) => Error::new(ErrorKind::Internal, "the offload pool has stopped"),
        })?;
        match rx.await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(_)) => Err(Error::new(ErrorKind::Internal, "offloaded work panicked")),
            Err(_) => Err(Error::new(ErrorKind::Internal, "the offload pool has stopped")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One thread, one place in the queue: with the thread busy and the place taken, more work
    /// is refused at once, and the pool serves again once the thread is free.
    #[tokio::test]
    async fn a_full_queue_refuses_work_and_a_panic_is_an_error() {
        let pool = Offload::new("offload-test", 1, 1).unwrap();
        let (release, held) = mpsc::channel::<()>();
        let busy = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(move || held.recv().is_ok()).await }
        });
        // Until the thread has taken the first job, the second may fill the queue's place.
        let queued = loop {
            let pool = pool.clone();
            let job = tokio::spawn(async move { pool.run(|| 2).await });
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            if !job.is_finished() {
                break job;
            }
        };
        let refused = pool.run(|| 3).await.unwrap_err();
        assert_eq!(refused.kind, ErrorKind::Unavailable);
        release.send(()).unwrap();
        assert!(busy.await.unwrap().unwrap());
        assert_eq!(queued.await.unwrap().unwrap(), 2);
        let panicked = pool.run(|| -> u8 { panic!("a hostile job") }).await.unwrap_err();
        assert_eq!(panicked.kind, ErrorKind::Internal);
        assert_eq!(pool.run(|| 4).await.unwrap(), 4);
    }

    /// Work whose caller is gone by the time a thread takes it is not run.
    #[tokio::test]
    async fn work_nobody_waits_for_is_skipped() {
        let pool = Offload::new("offload-skip", 1, 4).unwrap();
        let (release, held) = mpsc::channel::<()>();
        let busy = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(move || held.recv().is_ok()).await }
        });
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let abandoned = tokio::spawn({
            let (pool, ran) = (pool.clone(), ran.clone());
            async move { pool.run(move || ran.store(true, std::sync::atomic::Ordering::SeqCst)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        abandoned.abort();
        let _ = abandoned.await;
        release.send(()).unwrap();
        assert!(busy.await.unwrap().unwrap());
        // The pool's one thread takes jobs in order: once this one ran, the abandoned one was seen.
        assert_eq!(pool.run(|| 5).await.unwrap(), 5);
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }
}
