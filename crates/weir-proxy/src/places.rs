//! Client connections open in the process, held against `proxy.max_connections`: each one
//! the workers accept (`server.rs`), and each upgraded one's tunnel (`tunnel.rs`), which lives
//! on after its connection's server has ended.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Client connections open in the process (every worker, TLS handshakes included), held
/// against `proxy.max_connections`.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// One open client connection, counted while it lives.
pub(crate) struct Open;

impl Open {
    /// A place for a connection already accepted that lives on past its server (an upgraded
    /// one's tunnel), counted whatever the bound: it stands for the connection's own place.
    pub(crate) fn held() -> Open {
        OPEN.fetch_add(1, Ordering::Relaxed);
        Open
    }

    pub(crate) fn take(max: usize) -> Option<Open> {
        if OPEN.fetch_add(1, Ordering::Relaxed) < max {
            return Some(Open);
        }
        OPEN.fetch_sub(1, Ordering::Relaxed);
        // Once a second at most: a flood must not flood the log too.
        static LAST: AtomicU64 = AtomicU64::new(0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if LAST.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(max_connections = max, "client connection limit reached (proxy.max_connections): new connections are closed until others end");
        }
        None
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}
