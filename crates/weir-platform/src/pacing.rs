//! How fast one gateway may write functions to the store, on this node.
//!
//! Every gateway's publications go to one store, which writes them one after another: etcd
//! takes about 10 ms for a write of a megabyte, and a small write that comes meanwhile waits
//! for it. A gateway saving its largest functions in a loop would so slow every other
//! gateway's saves and promotions. Each gateway has a bucket of bytes on each node, refilled at
//! `platform.functions.publish_bytes_per_minute`. A publication that finds too few bytes in
//! it is refused (429, with when to come back) before anything is written (a save checks its
//! body's size before it compiles, too), and one that is written takes its bytes from it: an
//! attempt that a conflict makes try again, or that fails, takes nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most a bucket holds (a minute's bytes when that is less): a few of the largest
/// publications one store write takes (etcd's 1.5 MiB), so a burst of saves goes through at
/// once and a loop is held to the rate.
pub const BURST_BYTES: u64 = 4 << 20;

/// Buckets kept before the full ones (gateways that published nothing lately) are let go.
const KEPT: usize = 4096;

pub struct Pacer {
    /// Bytes a minute a gateway's bucket refills at; 0: no bound.
    per_minute: u64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    /// Bytes held; below zero when the last publication took more than it held.
    level: f64,
    at: Instant,
}

impl Pacer {
    pub fn new(per_minute: u64) -> Pacer {
        Pacer { per_minute, buckets: Mutex::new(HashMap::new()) }
    }

    /// Whether `gid`'s bucket holds `bytes` now, or how long until it does. A publication
    /// larger than the bucket itself may go once the bucket is full.
    pub fn check(&self, gid: &str, bytes: u64) -> Result<(), Duration> {
        self.at(gid, bytes, Instant::now(), false)
    }

    /// Takes the bytes a publication wrote from `gid`'s bucket, whatever it holds: one larger
    /// than the bucket leaves it that far below empty.
    pub fn spend(&self, gid: &str, bytes: u64) {
        let _ = self.at(gid, bytes, Instant::now(), true);
    }

    #[cfg(test)]
    fn take_at(&self, gid: &str, bytes: u64, now: Instant) -> Result<(), Duration> {
        self.at(gid, bytes, now, false)?;
        self.at(gid, bytes, now, true)
    }

    /// Checks `bytes` against `gid`'s bucket at `now`, and with `spend` takes them.
    fn at(&self, gid: &str, bytes: u64, now: Instant, spend: bool) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let rate = self.per_minute as f64 / 60.0;
        let cap = self.per_minute.min(BURST_BYTES) as f64;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= KEPT && !buckets.contains_key(gid) {
            buckets.retain(|_, b| b.level + rate * now.saturating_duration_since(b.at).as_secs_f64() < cap);
        }
        let b = buckets.entry(gid.to_string()).or_insert(Bucket { level: cap, at: now });
        b.level = (b.level + rate * now.saturating_duration_since(b.at).as_secs_f64()).min(cap);
        b.at = now;
        if spend {
            b.level -= bytes as f64;
            return Ok(());
        }
        let needed = (bytes as f64).min(cap);
        if b.level < needed {
            return Err(Duration::from_secs_f64((needed - b.level) / rate));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_goes_through_then_the_rate_holds() {
        let p = Pacer::new(6 << 20);
        let t0 = Instant::now();
        let mb = 1 << 20;
        for _ in 0..4 {
            assert_eq!(p.take_at("g", mb, t0), Ok(()));
        }
        // Empty: 1 MiB comes back in 10 s at 6 MiB a minute.
        let wait = p.take_at("g", mb, t0).unwrap_err();
        assert!((9.9..=10.1).contains(&wait.as_secs_f64()), "{wait:?}");
        assert!(p.take_at("g", mb, t0 + Duration::from_secs(9)).is_err());
        assert_eq!(p.take_at("g", mb, t0 + Duration::from_millis(10_500)), Ok(()));
        // Another gateway has a bucket of its own.
        assert_eq!(p.take_at("other", 4 * mb, t0), Ok(()));
    }

    #[test]
    fn a_check_takes_nothing_and_only_a_spend_does() {
        let p = Pacer::new(6 << 20);
        for _ in 0..10 {
            assert_eq!(p.check("g", 4 << 20), Ok(()));
        }
        p.spend("g", 3 << 20);
        assert!(p.check("g", 2 << 20).is_err());
        assert_eq!(p.check("g", 1 << 20), Ok(()));
    }

    #[test]
    fn a_publication_past_the_bucket_waits_for_a_full_one_and_leaves_a_debt() {
        let p = Pacer::new(6 << 20);
        let t0 = Instant::now();
        assert_eq!(p.take_at("g", 6 << 20, t0), Ok(()));
        // 2 MiB below empty: a small one waits until the debt is paid and it fits.
        let wait = p.take_at("g", 1 << 20, t0).unwrap_err();
        assert!((29.9..=30.1).contains(&wait.as_secs_f64()), "{wait:?}");
        assert!(p.take_at("g", 6 << 20, t0 + Duration::from_secs(59)).is_err());
        assert_eq!(p.take_at("g", 6 << 20, t0 + Duration::from_secs(61)), Ok(()));
    }

    #[test]
    fn zero_is_no_bound_and_idle_buckets_are_let_go() {
        let free = Pacer::new(0);
        for _ in 0..100 {
            assert_eq!(free.check("g", 1 << 30), Ok(()));
            free.spend("g", 1 << 30);
        }
        let p = Pacer::new(60 << 20);
        let t0 = Instant::now();
        for i in 0..KEPT {
            p.take_at(&format!("g{i}"), 1, t0).unwrap();
        }
        // A minute on, every bucket is full again: the next gateway's finds them let go.
        p.take_at("new", 1, t0 + Duration::from_secs(60)).unwrap();
        assert_eq!(p.buckets.lock().unwrap().len(), 1);
    }
}
