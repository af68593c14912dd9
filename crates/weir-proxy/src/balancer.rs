//! Smooth weighted round robin, as nginx does it: every pick adds each node's weight to its
//! running score, takes the highest, and subtracts the total from the winner. Over any window of
//! `sum(weights)` picks each node is chosen exactly `weight` times, evenly interleaved.

use std::sync::Mutex;

pub struct RoundRobin {
    weights: Vec<u32>,
    total: i64,
    current: Mutex<Vec<i64>>,
}

impl RoundRobin {
    pub fn new(weights: Vec<u32>) -> RoundRobin {
        let total = weights.iter().map(|w| i64::from(*w)).sum();
        RoundRobin { current: Mutex::new(vec![0; weights.len()]), weights, total }
    }

    /// The next node, skipping those in `exclude` (already tried for this request). `None` when
    /// no node with weight is left.
    pub fn pick(&self, exclude: &[usize]) -> Option<usize> {
        if self.weights.len() == 1 {
            return (self.weights[0] > 0 && exclude.is_empty()).then_some(0);
        }
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut best: Option<usize> = None;
        let mut total = 0;
        for (i, w) in self.weights.iter().enumerate() {
            if *w == 0 || exclude.contains(&i) {
                continue;
            }
            current[i] += i64::from(*w);
            total += i64::from(*w);
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        current[b] -= if exclude.is_empty() { self.total } else { total };
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_and_exact() {
        let rr = RoundRobin::new(vec![5, 1, 1]);
        let picks: Vec<usize> = (0..7).map(|_| rr.pick(&[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
        let rr = RoundRobin::new(vec![3, 0, 1]);
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[rr.pick(&[]).unwrap()] += 1;
        }
        assert_eq!(counts, [300, 0, 100]);
    }

    #[test]
    fn exclusions() {
        let rr = RoundRobin::new(vec![1, 1]);
        assert_eq!(rr.pick(&[0]), Some(1));
        assert_eq!(rr.pick(&[0, 1]), None);
        let single = RoundRobin::new(vec![1]);
        assert_eq!(single.pick(&[]), Some(0));
        assert_eq!(single.pick(&[0]), None);
        assert_eq!(RoundRobin::new(vec![0]).pick(&[]), None);
    }
}
