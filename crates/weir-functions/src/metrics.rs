//! `weir_function_calls_total`, `weir_function_errors_total` and
//! `weir_function_duration_seconds`, labelled gateway, environment and function. Only the
//! handlers of published functions observe, so a name nobody published never makes a series;
//! a function's series go when it is no longer loaded on this node.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use crate::Logs;

const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

#[derive(Default)]
struct Series {
    calls: u64,
    errors: u64,
    buckets: [u64; BUCKETS.len() + 1],
    sum: f64,
    /// The function's log buffer: alive while the function is loaded.
    alive: Weak<Logs>,
}

type Key = (String, String, String);

fn all() -> &'static Mutex<BTreeMap<Key, Series>> {
    static ALL: OnceLock<Mutex<BTreeMap<Key, Series>>> = OnceLock::new();
    ALL.get_or_init(|| {
        weir_plugins::prometheus::add_source(render);
        Mutex::default()
    })
}

/// One call of function `name` of `env` of gateway `gid`.
pub fn observe(gid: &str, env: &str, name: &str, alive: &Arc<Logs>, took: Duration, error: bool) {
    let mut all = all().lock().unwrap_or_else(|p| p.into_inner());
    let s = all.entry((gid.to_string(), env.to_string(), name.to_string())).or_default();
    s.alive = Arc::downgrade(alive);
    s.calls += 1;
    s.errors += u64::from(error);
    let secs = took.as_secs_f64();
    s.buckets[BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len())] += 1;
    s.sum += secs;
}

/// Appends the series to the metrics page.
pub fn render(out: &mut String) {
    let mut all = all().lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|_, s| s.alive.strong_count() > 0);
    let label = weir_plugins::prometheus::label;
    let labels = |(g, e, f): &Key| format!("gateway=\"{}\",environment=\"{}\",function=\"{}\"", label(g), label(e), label(f));
    out.push_str("# HELP weir_function_calls_total Calls of cloud functions\n# TYPE weir_function_calls_total counter\n");
    for (k, s) in all.iter() {
        let _ = writeln!(out, "weir_function_calls_total{{{}}} {}", labels(k), s.calls);
    }
    out.push_str("# HELP weir_function_errors_total Calls of cloud functions that failed (thrown, timed out, out of memory, refused) or answered 5xx\n# TYPE weir_function_errors_total counter\n");
    for (k, s) in all.iter() {
        let _ = writeln!(out, "weir_function_errors_total{{{}}} {}", labels(k), s.errors);
    }
    out.push_str("# HELP weir_function_duration_seconds How long calls of cloud functions took\n# TYPE weir_function_duration_seconds histogram\n");
    for (k, s) in all.iter() {
        let l = labels(k);
        let mut cumulative = 0;
        for (i, n) in s.buckets.iter().enumerate() {
            cumulative += n;
            let le = BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "weir_function_duration_seconds_bucket{{{l},le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "weir_function_duration_seconds_sum{{{l}}} {}", s.sum);
        let _ = writeln!(out, "weir_function_duration_seconds_count{{{l}}} {}", s.calls);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_follow_loaded_functions_only() {
        let logs = Arc::new(Logs::default());
        observe("gw-metrics", "dev", "a\"b", &logs, Duration::from_millis(3), false);
        observe("gw-metrics", "dev", "a\"b", &logs, Duration::from_millis(40), true);
        let page = weir_plugins::prometheus::render();
        let l = r#"gateway="gw-metrics",environment="dev",function="a\"b""#;
        assert!(page.contains(&format!("weir_function_calls_total{{{l}}} 2")), "{page}");
        assert!(page.contains(&format!("weir_function_errors_total{{{l}}} 1")), "{page}");
        assert!(page.contains(&format!("weir_function_duration_seconds_bucket{{{l},le=\"0.005\"}} 1")), "{page}");
        assert!(page.contains(&format!("weir_function_duration_seconds_bucket{{{l},le=\"+Inf\"}} 2")), "{page}");
        drop(logs);
        assert!(!weir_plugins::prometheus::render().contains("gw-metrics"), "an unloaded function's series are gone");
    }
}
