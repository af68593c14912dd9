//! What the process counts of itself, kept by the data plane whatever its config says and read
//! by whoever exports it (the `prometheus` plugin). It depends on no plugin, so the hot path
//! counts without knowing any.

use std::sync::atomic::{AtomicU64, Ordering};

use weir_core::error::ErrorKind;

/// Process-wide counters the proxy keeps whether or not any route runs the plugin.
#[derive(Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub handled: AtomicU64,
    pub active: AtomicU64,
    pub requests: AtomicU64,
    /// Requests the gateway answered with an error of its own, by kind (in `ErrorKind::ALL`'s
    /// order).
    errors: [AtomicU64; ErrorKind::ALL.len()],
}

impl Counters {
    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind as usize].load(Ordering::Relaxed)
    }
}

pub static COUNTERS: Counters = Counters {
    accepted: AtomicU64::new(0),
    handled: AtomicU64::new(0),
    active: AtomicU64::new(0),
    requests: AtomicU64::new(0),
    errors: [const { AtomicU64::new(0) }; ErrorKind::ALL.len()],
};
