//! How busy a node is: requests in flight and a decayed latency average, shared by every
//! worker and read by the `least_conn` and `ewma` balancers.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

/// How long a latency sample takes to fade to 1/e of its weight (APISIX's `DECAY_TIME`).
const EWMA_DECAY_SECS: f64 = 10.0;

/// Load figures of one node, shared by every worker: requests in flight and a latency average.
#[derive(Default)]
pub struct NodeLoad {
    inflight: AtomicU32,
    ewma: Mutex<Option<(f64, Instant)>>,
}

impl NodeLoad {
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Folds one response time (seconds) into the average.
    pub fn observe(&self, secs: f64) {
        let now = Instant::now();
        let mut e = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        *e = Some(match *e {
            None => (secs, now),
            Some((avg, at)) => {
                let w = (-now.duration_since(at).as_secs_f64() / EWMA_DECAY_SECS).exp();
                (avg * w + secs * (1.0 - w), now)
            }
        });
    }

    /// The average, decayed towards zero for the time since the last sample, so a node that was
    /// slow a while ago gets tried again.
    pub(crate) fn ewma(&self, now: Instant) -> f64 {
        let e = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        match *e {
            None => 0.0,
            Some((avg, at)) => avg * (-now.saturating_duration_since(at).as_secs_f64() / EWMA_DECAY_SECS).exp(),
        }
    }
}

/// Counts a request against a node's load until dropped (when its response body is done).
pub struct InFlight(std::sync::Arc<NodeLoad>);

impl InFlight {
    pub fn start(load: &std::sync::Arc<NodeLoad>) -> InFlight {
        load.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(load.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}
