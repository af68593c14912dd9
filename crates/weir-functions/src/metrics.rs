//! `weir_function_calls_total`, `weir_function_errors_total` and
//! `weir_function_duration_seconds`, labelled gateway, environment and function. A series
//! belongs to a published function's handlers (a name nobody published never makes one) and
//! goes when no handler holds it any more; a lowering finds the series its function's handlers
//! hold through the node's compiled copy of the function, without this registry. A call
//! counts with atomics, no lock. A node keeps
//! at most [`SERIES_AT_MOST`] series, and [`SERIES_PER_GATEWAY`] of one gateway: past that, a
//! function that has none counts in its environment's `function="(other)"` series.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

/// One function's counts.
#[derive(Default)]
pub struct Series {
    calls: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Microseconds.
    sum: AtomicU64,
    /// Whether this is an environment's [`OVERFLOW`] series.
    overflow: bool,
}

impl Series {
    /// Whether this is an environment's [`OVERFLOW`] series, which counts the functions that
    /// found no room for their own.
    pub fn is_overflow(&self) -> bool {
        self.overflow
    }

    /// One call that took `took`.
    pub fn observe(&self, took: Duration, error: bool) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let secs = took.as_secs_f64();
        self.buckets[BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len())].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }
}

type Key = (String, String, String);

/// The most series a node keeps (each is about fifteen lines of the metrics page).
pub const SERIES_AT_MOST: usize = 50_000;

/// The most series of one gateway's functions a node keeps.
pub const SERIES_PER_GATEWAY: usize = 10_000;

/// The function label of an environment's series past the bounds: no function's name (names
/// are segments of letters, digits, `_` and `-`).
pub const OVERFLOW: &str = "(other)";

/// Every series, how many each gateway has, and when the dead ones were last swept out for
/// room.
struct All {
    series: BTreeMap<Key, Weak<Series>>,
    per_gateway: std::collections::HashMap<String, usize>,
    swept: Option<std::time::Instant>,
}

fn all() -> &'static Mutex<All> {
    static ALL: OnceLock<Mutex<All>> = OnceLock::new();
    ALL.get_or_init(|| {
        weir_plugins::prometheus::add_source(render);
        Mutex::new(All { series: BTreeMap::new(), per_gateway: Default::default(), swept: None })
    })
}

/// The series of function `name` of `env` of gateway `gid`: the one its handlers hold, or a
/// new one.
pub fn series(gid: &str, env: &str, name: &str) -> Arc<Series> {
    series_in(all(), (SERIES_AT_MOST, SERIES_PER_GATEWAY), gid, env, name)
}

fn series_in(all: &Mutex<All>, (most, per_gateway): (usize, usize), gid: &str, env: &str, name: &str) -> Arc<Series> {
    let mut all = all.lock().unwrap_or_else(|p| p.into_inner());
    let all = &mut *all;
    let key = (gid.to_string(), env.to_string(), name.to_string());
    if let Some(s) = all.series.get(&key).and_then(Weak::upgrade) {
        return s;
    }
    let full = |all: &All| all.series.len() >= most || all.per_gateway.get(gid).is_some_and(|n| *n >= per_gateway);
    // Full: the dead go first (at most once a second, however many functions are lowered).
    if full(all) && all.swept.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)) {
        all.series.retain(|_, s| s.strong_count() > 0);
        all.per_gateway.clear();
        for (g, _, _) in all.series.keys() {
            *all.per_gateway.entry(g.clone()).or_default() += 1;
        }
        all.swept = Some(std::time::Instant::now());
    }
    let key = if full(all) { (gid.to_string(), env.to_string(), OVERFLOW.to_string()) } else { key };
    if let Some(s) = all.series.get(&key).and_then(Weak::upgrade) {
        return s;
    }
    let s = Arc::new(Series { overflow: key.2 == OVERFLOW, ..Series::default() });
    all.series.insert(key, Arc::downgrade(&s));
    *all.per_gateway.entry(gid.to_string()).or_default() += 1;
    s
}

/// Runs `f` while the node's registry of series is held, as a render of the metrics page or
/// another gateway's lowering may hold it.
#[cfg(test)]
pub(crate) fn while_held<R>(f: impl FnOnce() -> R) -> R {
    let _held = all().lock().unwrap_or_else(|p| p.into_inner());
    f()
}

/// Appends the series to the metrics page.
pub fn render(out: &mut String) {
    render_from(all(), out);
}

fn render_from(all: &Mutex<All>, out: &mut String) {
    let mut all = all.lock().unwrap_or_else(|p| p.into_inner());
    all.series.retain(|_, s| s.strong_count() > 0);
    let live: Vec<(&Key, Arc<Series>)> = all.series.iter().filter_map(|(k, s)| s.upgrade().map(|s| (k, s))).collect();
    let label = weir_plugins::prometheus::label;
    let labels = |(g, e, f): &Key| format!("gateway=\"{}\",environment=\"{}\",function=\"{}\"", label(g), label(e), label(f));
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    out.push_str("# HELP weir_function_calls_total Calls of cloud functions\n# TYPE weir_function_calls_total counter\n");
    for (k, s) in &live {
        let _ = writeln!(out, "weir_function_calls_total{{{}}} {}", labels(k), n(&s.calls));
    }
    out.push_str("# HELP weir_function_errors_total Calls of cloud functions that failed (thrown, whatever status the error names; timed out; out of memory; refused as busy) or answered 5xx; a refused method is no call\n# TYPE weir_function_errors_total counter\n");
    for (k, s) in &live {
        let _ = writeln!(out, "weir_function_errors_total{{{}}} {}", labels(k), n(&s.errors));
    }
    out.push_str("# HELP weir_function_duration_seconds How long calls of cloud functions took\n# TYPE weir_function_duration_seconds histogram\n");
    for (k, s) in &live {
        let l = labels(k);
        let mut cumulative = 0;
        for (i, b) in s.buckets.iter().enumerate() {
            cumulative += n(b);
            let le = BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "weir_function_duration_seconds_bucket{{{l},le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "weir_function_duration_seconds_sum{{{l}}} {}", n(&s.sum) as f64 / 1e6);
        let _ = writeln!(out, "weir_function_duration_seconds_count{{{l}}} {}", n(&s.calls));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_follow_loaded_functions_only() {
        let s = series("gw-metrics", "dev", "a\"b");
        s.observe(Duration::from_millis(3), false);
        series("gw-metrics", "dev", "a\"b").observe(Duration::from_millis(40), true);
        let page = weir_plugins::prometheus::render();
        let l = r#"gateway="gw-metrics",environment="dev",function="a\"b""#;
        assert!(page.contains(&format!("weir_function_calls_total{{{l}}} 2")), "{page}");
        assert!(page.contains(&format!("weir_function_errors_total{{{l}}} 1")), "{page}");
        assert!(page.contains(&format!("weir_function_duration_seconds_bucket{{{l},le=\"0.005\"}} 1")), "{page}");
        assert!(page.contains(&format!("weir_function_duration_seconds_bucket{{{l},le=\"+Inf\"}} 2")), "{page}");
        drop(s);
        assert!(!weir_plugins::prometheus::render().contains("gw-metrics"), "an unloaded function's series are gone");
    }

    #[test]
    fn past_so_many_series_a_function_counts_in_its_environments_other() {
        let all = Mutex::new(All { series: BTreeMap::new(), per_gateway: Default::default(), swept: None });
        let page = || {
            let mut out = String::new();
            render_from(&all, &mut out);
            out
        };
        let bounds = (5, 3);
        let held: Vec<Arc<Series>> = (0..3).map(|i| series_in(&all, bounds, "gw-full", "dev", &format!("f{i}"))).collect();
        let late = series_in(&all, bounds, "gw-full", "prod", "late");
        late.observe(Duration::from_millis(1), false);
        assert!(Arc::ptr_eq(&late, &series_in(&all, bounds, "gw-full", "prod", "later")), "one overflow series per environment");
        // The gateway's bound leaves others room; the node's then holds every gateway to it.
        let other = series_in(&all, bounds, "gw-other", "dev", "own");
        assert!(!Arc::ptr_eq(&other, &series_in(&all, bounds, "gw-other", "dev", "more")), "past the node's bound, the other gateway's overflow");
        let page = page();
        assert!(page.contains(r#"weir_function_calls_total{gateway="gw-full",environment="prod",function="(other)"} 1"#), "{page}");
        assert!(page.contains(r#"gateway="gw-other",environment="dev",function="own""#), "{page}");
        assert!(!page.contains(r#"function="late""#), "{page}");
        // Room again once a function's series goes (swept at most once a second).
        drop(held);
        drop(late);
        std::thread::sleep(Duration::from_millis(1100));
        let back = series_in(&all, bounds, "gw-full", "dev", "again");
        back.observe(Duration::from_millis(1), false);
        let mut out = String::new();
        render_from(&all, &mut out);
        assert!(out.contains(r#"function="again""#), "{out}");
    }
}
