//! Choosing an upstream node: APISIX's four balancers over the nodes that may take traffic.
//!
//! A node may take traffic when its weight is above zero, this request has not tried it yet,
//! and (when the upstream has health checks) it is healthy. If health rules out every node,
//! health is ignored rather than failing the request, as APISIX does. Among the nodes left only
//! the highest `priority` tier is used; a lower tier takes traffic once every node above it is
//! unhealthy or already tried.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::NodeRt;

/// Ring points per unit of (normalised) weight for consistent hashing.
const POINTS_PER_WEIGHT: usize = 160;
/// Bound on the ring's size, whatever the weights.
const MAX_POINTS: usize = 1 << 20;

pub enum Balancer {
    RoundRobin(RoundRobin),
    Chash(Ring),
    LeastConn { cursor: AtomicUsize },
    Ewma,
}

impl Balancer {
    /// `kind` is the upstream's `type`; the schema allows only the four known names.
    pub fn new(kind: &str, nodes: &[NodeRt]) -> Balancer {
        match kind {
            "chash" => Balancer::Chash(Ring::new(nodes)),
            "least_conn" => Balancer::LeastConn { cursor: AtomicUsize::new(0) },
            "ewma" => Balancer::Ewma,
            _ => Balancer::RoundRobin(RoundRobin::new(nodes.len())),
        }
    }

    /// Whether picks depend on load, so requests must be counted in flight.
    pub fn tracks_load(&self) -> bool {
        matches!(self, Balancer::LeastConn { .. } | Balancer::Ewma)
    }

    pub fn is_hashed(&self) -> bool {
        matches!(self, Balancer::Chash(_))
    }

    /// The node for this attempt, or `None` when no node is left. `checked` says whether the
    /// nodes' health counts; `hash` is the request's key for `chash`.
    pub fn pick(&self, nodes: &[NodeRt], checked: bool, hash: u32, tried: &[usize]) -> Option<usize> {
        if nodes.len() == 1 {
            return (nodes[0].weight > 0 && tried.is_empty()).then_some(0);
        }
        let open = |i: usize| nodes[i].weight > 0 && !tried.contains(&i);
        let by_health = checked && (0..nodes.len()).any(|i| open(i) && nodes[i].health.is_healthy());
        let ok = |i: usize| open(i) && (!by_health || nodes[i].health.is_healthy());
        let top = (0..nodes.len()).filter(|i| ok(*i)).map(|i| nodes[i].priority).max()?;
        let eligible = |i: usize| ok(i) && nodes[i].priority == top;
        match self {
            Balancer::RoundRobin(rr) => rr.pick(nodes, eligible),
            Balancer::Chash(ring) => ring.pick(hash, eligible),
            Balancer::LeastConn { cursor } => {
                // Fewest requests in flight per unit of weight; ties go round the nodes.
                let start = cursor.fetch_add(1, Ordering::Relaxed);
                let n = nodes.len();
                (0..n).map(|k| (start + k) % n).filter(|i| eligible(*i)).min_by(|a, b| {
                    let la = u64::from(nodes[*a].load.inflight()) + 1;
                    let lb = u64::from(nodes[*b].load.inflight()) + 1;
                    (la * u64::from(nodes[*b].weight)).cmp(&(lb * u64::from(nodes[*a].weight)))
                })
            }
            Balancer::Ewma => {
                // Power of two choices on latency × load.
                let candidates: Vec<usize> = (0..nodes.len()).filter(|i| eligible(*i)).collect();
                let (a, b) = match candidates.len() {
                    0 => return None,
                    1 => return Some(candidates[0]),
                    2 => (candidates[0], candidates[1]),
                    n => {
                        let x = fastrand::usize(..n);
                        let y = (x + 1 + fastrand::usize(..n - 1)) % n;
                        (candidates[x], candidates[y])
                    }
                };
                let now = Instant::now();
                let score = |i: usize| nodes[i].load.ewma(now) * f64::from(nodes[i].load.inflight() + 1);
                let (sa, sb) = (score(a), score(b));
                Some(if sa < sb || (sa == sb && fastrand::bool()) { a } else { b })
            }
        }
    }
}

/// Smooth weighted round robin, as nginx does it: every pick adds each eligible node's weight to
/// its running score, takes the highest, and subtracts the eligible total from the winner. Over
/// any window of `sum(weights)` picks each node is chosen exactly `weight` times, interleaved.
pub struct RoundRobin {
    current: Mutex<Vec<i64>>,
}

impl RoundRobin {
    fn new(n: usize) -> RoundRobin {
        RoundRobin { current: Mutex::new(vec![0; n]) }
    }

    fn pick(&self, nodes: &[NodeRt], eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut best: Option<usize> = None;
        let mut total = 0;
        for (i, node) in nodes.iter().enumerate() {
            if !eligible(i) {
                continue;
            }
            let w = i64::from(node.weight);
            current[i] += w;
            total += w;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        current[b] -= total;
        Some(b)
    }
}

/// A consistent-hash ring: each node owns points in proportion to its weight, and a key goes to
/// the first eligible node at or after its hash. Adding a node moves only the keys that land on
/// its new points, about 1/N of them.
pub struct Ring {
    points: Vec<(u32, u32)>,
}

impl Ring {
    fn new(nodes: &[NodeRt]) -> Ring {
        let gcd = nodes.iter().map(|n| n.weight as usize).filter(|w| *w > 0).fold(0, gcd);
        let units: usize = nodes.iter().map(|n| n.weight as usize / gcd.max(1)).sum();
        let per_unit = POINTS_PER_WEIGHT.min(MAX_POINTS / units.max(1)).max(1);
        let mut points = Vec::with_capacity(units * per_unit);
        for (i, node) in nodes.iter().enumerate() {
            for k in 0..node.weight as usize / gcd.max(1) * per_unit {
                points.push((hash32(format!("{}#{k}", node.authority).as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    fn pick(&self, hash: u32, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let start = self.points.partition_point(|p| p.0 < hash);
        let n = self.points.len();
        (0..n).map(|k| self.points[(start + k) % n].1 as usize).find(|i| eligible(*i))
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A stable 32-bit hash (FNV-1a, then a 64-bit finaliser): the same on every process and
/// machine, so every gateway instance sends a key to the same node.
pub fn hash32(bytes: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{Outcome, Thresholds};
    use crate::InFlight;
    use crate::node::test_node;

    fn nodes(spec: &[(u32, i64)]) -> Vec<NodeRt> {
        spec.iter().enumerate().map(|(i, (w, p))| test_node(&format!("10.0.0.{i}:80"), *w, *p)).collect()
    }

    fn mark_down(node: &NodeRt) {
        let t = Thresholds { successes: 1, http_failures: 1, tcp_failures: 1, timeouts: 1 };
        node.health.report(Outcome::TcpFailure, &t);
        assert!(!node.health.is_healthy());
    }

    #[test]
    fn round_robin_is_smooth_and_exact() {
        let ns = nodes(&[(5, 0), (1, 0), (1, 0)]);
        let b = Balancer::new("roundrobin", &ns);
        let picks: Vec<usize> = (0..7).map(|_| b.pick(&ns, false, 0, &[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
        let ns = nodes(&[(3, 0), (0, 0), (1, 0)]);
        let b = Balancer::new("roundrobin", &ns);
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[b.pick(&ns, false, 0, &[]).unwrap()] += 1;
        }
        assert_eq!(counts, [300, 0, 100]);
    }

    #[test]
    fn tried_nodes_are_skipped() {
        let ns = nodes(&[(1, 0), (1, 0)]);
        let b = Balancer::new("roundrobin", &ns);
        assert_eq!(b.pick(&ns, false, 0, &[0]), Some(1));
        assert_eq!(b.pick(&ns, false, 0, &[0, 1]), None);
        let single = nodes(&[(1, 0)]);
        assert_eq!(b.pick(&single, false, 0, &[]), Some(0));
        assert_eq!(b.pick(&single, false, 0, &[0]), None);
        assert_eq!(b.pick(&nodes(&[(0, 0)]), false, 0, &[]), None);
    }

    #[test]
    fn lower_tiers_wait_for_the_higher_one() {
        let ns = nodes(&[(1, 10), (1, 10), (1, 0)]);
        for kind in ["roundrobin", "chash", "least_conn", "ewma"] {
            let b = Balancer::new(kind, &ns);
            for k in 0..20 {
                assert_ne!(b.pick(&ns, true, hash32(&[k]), &[]), Some(2), "{kind}");
            }
            assert_eq!(b.pick(&ns, true, 0, &[0, 1]), Some(2), "{kind}: retries fall to the next tier");
        }
        mark_down(&ns[0]);
        mark_down(&ns[1]);
        let b = Balancer::new("roundrobin", &ns);
        assert_eq!(b.pick(&ns, true, 0, &[]), Some(2), "the top tier is down");
        assert_ne!(b.pick(&ns, false, 0, &[]), Some(2), "health not checked: ignored");
        mark_down(&ns[2]);
        assert!(b.pick(&ns, true, 0, &[]).is_some_and(|i| i < 2), "all down: health is ignored");
    }

    #[test]
    fn unhealthy_nodes_get_nothing() {
        let ns = nodes(&[(1, 0), (1, 0), (1, 0)]);
        mark_down(&ns[1]);
        for kind in ["roundrobin", "chash", "least_conn", "ewma"] {
            let b = Balancer::new(kind, &ns);
            for k in 0..50u8 {
                assert_ne!(b.pick(&ns, true, hash32(&[k]), &[]), Some(1), "{kind}");
            }
        }
    }

    #[test]
    fn chash_is_sticky_and_moves_few_keys() {
        let three = nodes(&[(1, 0), (1, 0), (1, 0)]);
        let four = nodes(&[(1, 0), (1, 0), (1, 0), (1, 0)]);
        let (r3, r4) = (Balancer::new("chash", &three), Balancer::new("chash", &four));
        let mut moved = 0;
        let mut per_node = [0; 3];
        for k in 0..10_000u32 {
            let h = hash32(format!("user-{k}").as_bytes());
            let a = r3.pick(&three, false, h, &[]).unwrap();
            assert_eq!(r3.pick(&three, false, h, &[]), Some(a), "same key, same node");
            per_node[a] += 1;
            let b = r4.pick(&four, false, h, &[]).unwrap();
            if a != b {
                assert_eq!(b, 3, "a key only ever moves to the new node");
                moved += 1;
            }
        }
        assert!((1800..3200).contains(&moved), "about a quarter of keys move: {moved}");
        assert!(per_node.iter().all(|c| (2600..4100).contains(c)), "spread: {per_node:?}");
    }

    #[test]
    fn least_conn_prefers_the_idle_node() {
        let ns = nodes(&[(1, 0), (1, 0)]);
        let b = Balancer::new("least_conn", &ns);
        let _busy = [InFlight::start(&ns[0].load), InFlight::start(&ns[0].load)];
        for _ in 0..10 {
            assert_eq!(b.pick(&ns, false, 0, &[]), Some(1));
        }
        // Weight scales capacity: 2 in flight on weight 4 beats 1 on weight 1.
        let ns = nodes(&[(4, 0), (1, 0)]);
        let _a = [InFlight::start(&ns[0].load), InFlight::start(&ns[0].load)];
        let _b = InFlight::start(&ns[1].load);
        assert_eq!(b.pick(&ns, false, 0, &[]), Some(0));
    }

    #[test]
    fn ewma_prefers_the_fast_node() {
        let ns = nodes(&[(1, 0), (1, 0), (1, 0)]);
        let b = Balancer::new("ewma", &ns);
        ns[0].load.observe(0.200);
        ns[1].load.observe(0.001);
        ns[2].load.observe(0.002);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[b.pick(&ns, false, 0, &[]).unwrap()] += 1;
        }
        assert_eq!(counts[0], 0, "the slow node loses every comparison: {counts:?}");
        assert!(counts[1] > counts[2], "{counts:?}");
    }
}
