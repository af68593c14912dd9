//! Tenants' blocking work (name lookups for `fetch` and upstreams, database operations) on the runtime's
//! blocking threads, bounded. The node's own blocking work (the embedded store) runs on those
//! threads too, so tenants together may hold only some of them, and one gateway only a few of
//! those: a gateway whose lookups hang, or whose queries crawl, waits for its own places and
//! leaves everyone else's alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Semaphore;

/// Places for tenants' blocking work: so many on the node, so many per gateway.
pub struct Lanes {
    node: Arc<Semaphore>,
    per_gateway: usize,
    gateways: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A gateway's place and the node's, held (`Lanes::enter`).
pub struct Pass {
    _places: (tokio::sync::OwnedSemaphorePermit, tokio::sync::OwnedSemaphorePermit),
}

/// Gateways whose places are kept before those no work holds are let go.
const KEPT: usize = 1024;

impl Lanes {
    pub fn new(node: usize, per_gateway: usize) -> Lanes {
        Lanes { node: Arc::new(Semaphore::new(node)), per_gateway, gateways: Mutex::default() }
    }

    fn gateway(&self, gateway: &str) -> Arc<Semaphore> {
        let mut all = self.gateways.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = all.get(gateway) {
            return s.clone();
        }
        if all.len() >= KEPT {
            all.retain(|_, s| Arc::strong_count(s) > 1);
        }
        let s = Arc::new(Semaphore::new(self.per_gateway));
        all.insert(gateway.to_string(), s.clone());
        s
    }

    /// Waits until `gateway` and the node each have a place free, and holds both until the
    /// pass is dropped: for async work bounded the same way.
    pub async fn enter(&self, gateway: &str) -> Option<Pass> {
        let own = self.gateway(gateway).acquire_owned().await.ok()?;
        let node = self.node.clone().acquire_owned().await.ok()?;
        Some(Pass { _places: (own, node) })
    }

    /// Runs `f` on a blocking thread of `handle` once `gateway` and the node each have a place
    /// free. The places go when `f` returns, not when the caller stops waiting: a lookup that
    /// cannot be cancelled holds its place until it ends. `None` when `f` panicked.
    pub async fn run<T: Send + 'static>(&self, handle: &tokio::runtime::Handle, gateway: &str, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        // The gateway's place first, so that its waiting work holds none of the node's.
        let own = self.gateway(gateway).acquire_owned().await.ok()?;
        let node = self.node.clone().acquire_owned().await.ok()?;
        handle
            .spawn_blocking(move || {
                let out = f();
                drop((own, node));
                out
            })
            .await
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[derive(Default)]
    struct Gauge {
        now: AtomicUsize,
        most: AtomicUsize,
    }

    impl Gauge {
        fn enter(&self) {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
        }
        fn leave(&self) {
            self.now.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_runs_within_the_gateways_and_the_nodes_places() {
        let lanes = Arc::new(Lanes::new(3, 2));
        let (node, a) = (Arc::new(Gauge::default()), Arc::new(Gauge::default()));
        let mut runs = Vec::new();
        for gw in ["a", "a", "a", "a", "a", "b", "b", "c"] {
            let (lanes, node, a) = (lanes.clone(), node.clone(), a.clone());
            runs.push(tokio::spawn(async move {
                let h = tokio::runtime::Handle::current();
                lanes
                    .run(&h, gw, move || {
                        node.enter();
                        if gw == "a" {
                            a.enter();
                        }
                        std::thread::sleep(Duration::from_millis(30));
                        if gw == "a" {
                            a.leave();
                        }
                        node.leave();
                        gw
                    })
                    .await
            }));
        }
        let mut done = Vec::new();
        for r in runs {
            done.push(r.await.unwrap().unwrap());
        }
        assert_eq!(done, ["a", "a", "a", "a", "a", "b", "b", "c"]);
        assert_eq!((a.most.load(Ordering::SeqCst), node.most.load(Ordering::SeqCst)), (2, 3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_place_is_held_until_the_work_ends_though_its_caller_left() {
        let lanes = Arc::new(Lanes::new(8, 1));
        let (release, held) = std::sync::mpsc::channel::<()>();
        let started = Arc::new(AtomicUsize::new(0));
        let caller = {
            let (lanes, started) = (lanes.clone(), started.clone());
            tokio::spawn(async move {
                let h = tokio::runtime::Handle::current();
                lanes
                    .run(&h, "slow", move || {
                        started.fetch_add(1, Ordering::SeqCst);
                        let _ = held.recv();
                    })
                    .await
            })
        };
        while started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        caller.abort();
        let h = tokio::runtime::Handle::current();
        // The gateway's one place is still the hung work's; another gateway is not held up.
        assert_eq!(lanes.run(&h, "other", || 1).await, Some(1));
        let next = tokio::time::timeout(Duration::from_millis(100), lanes.run(&h, "slow", || 2)).await;
        assert!(next.is_err(), "the place went with the caller");
        release.send(()).unwrap();
        assert_eq!(lanes.run(&h, "slow", || 3).await, Some(3));
    }
}
