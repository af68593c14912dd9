//! Graceful shutdown of the data plane. Once [`start`] is called, every accept loop drops its
//! listener (new connections are refused), idle keep-alive connections close, and a connection
//! with a request in flight closes once its response is sent (`Connection: close`, or GOAWAY on
//! HTTP/2). [`open`] counts the client connections still alive, for the caller to wait on.
//!
//! Process-wide state rather than a handle passed down: there is one data plane per process,
//! and this keeps the connection code free of plumbing it only needs once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

static DRAINING: AtomicBool = AtomicBool::new(false);
static STARTED: Notify = Notify::const_new();
static OPEN: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Wakes the connections of one worker thread. Connections wait on their thread's own
    /// `Notify`, so registering a connection never contends with other workers; the worker's
    /// accept loops, which wait on the process-wide one, pass the signal on.
    static LOCAL: &'static Notify = Box::leak(Box::new(Notify::new()));
}

/// Starts draining: no new connections, none kept alive. Idempotent.
pub fn start() {
    DRAINING.store(true, Ordering::SeqCst);
    STARTED.notify_waiters();
}

pub fn is_draining() -> bool {
    DRAINING.load(Ordering::Relaxed)
}

/// Resolves once draining has started (at once if it already has). For an accept loop: create
/// it once, outside the loop. It wakes the connections of this thread when it fires.
pub async fn accepting_ends() {
    wait(&STARTED).await;
    LOCAL.with(|n| n.notify_waiters());
}

/// Resolves once draining has started, for a connection served on a worker thread (whose
/// accept loop passes the signal on). Create it once per connection and poll it while idle.
pub async fn connection_ends() {
    wait(LOCAL.with(|n| *n)).await;
}

async fn wait(notify: &Notify) {
    let notified = notify.notified();
    tokio::pin!(notified);
    // Registered before the flag is read, so a `start` between the two is not missed.
    notified.as_mut().enable();
    if DRAINING.load(Ordering::SeqCst) {
        return;
    }
    notified.await;
}

/// Client connections currently open.
pub fn open() -> usize {
    OPEN.load(Ordering::SeqCst)
}

/// Counts one client connection as open while it lives.
pub struct Open(());

impl Open {
    pub fn new() -> Open {
        OPEN.fetch_add(1, Ordering::SeqCst);
        Open(())
    }
}

impl Default for Open {
    fn default() -> Self {
        Open::new()
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::SeqCst);
    }
}
