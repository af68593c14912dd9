//! What the process counts of itself, kept by the data plane whatever its config says and read
//! by whoever exports it (the `prometheus` plugin). It depends on nothing, so the hot path
//! counts without knowing any plugin.

use std::sync::atomic::AtomicU64;

/// Process-wide counters the proxy keeps whether or not any route runs the plugin.
#[derive(Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub handled: AtomicU64,
    pub active: AtomicU64,
    pub requests: AtomicU64,
}

pub static COUNTERS: Counters = Counters {
    accepted: AtomicU64::new(0),
    handled: AtomicU64::new(0),
    active: AtomicU64::new(0),
    requests: AtomicU64::new(0),
};
