//! `prometheus`: per-request metrics under APISIX's names and labels, and the process-wide
//! connection and request counters, rendered in the Prometheus text format.
//!
//! The exposition is written here rather than through a metrics crate because APISIX's names
//! are part of the contract (dashboards and alerts query `apisix_http_status`, a counter without
//! the `_total` suffix OpenMetrics encoders add).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Deserialize;

use crate::{Factory, JsonSchema, LogRecord, Notes, Phases, Plugin};

pub(crate) fn factory() -> Factory {
    Factory::new("prometheus", 500, |c: Config, _| Ok(Arc::new(Prometheus { prefer_name: c.prefer_name })))
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// Label a route's metrics with its name rather than its id (when it has one).
    #[serde(default)]
    prefer_name: bool,
}

struct Prometheus {
    prefer_name: bool,
}

impl Plugin for Prometheus {
    fn phases(&self) -> Phases {
        Phases { response: false, log: true, body: false }
    }

    fn log(&self, r: &LogRecord, _notes: &Notes) {
        let route = if self.prefer_name && !r.route_name.is_empty() { &r.route_name } else { &r.route_id };
        metrics().observe(route, r);
    }
}

/// Latency buckets in milliseconds, as APISIX's defaults.
const BUCKETS: [f64; 15] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0, 60000.0];

#[derive(Default, Clone)]
struct Histogram {
    /// Count per bucket (not cumulative); the last slot is `+Inf`.
    buckets: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, ms: f64) {
        let i = BUCKETS.iter().position(|b| ms <= *b).unwrap_or(BUCKETS.len());
        self.buckets[i] += 1;
        self.sum += ms;
        self.count += 1;
    }
}

/// Everything counted for one (route, service, consumer, node).
#[derive(Default)]
struct Series {
    matched_uri: String,
    matched_host: String,
    codes: Vec<(u16, u64)>,
    request: Histogram,
    upstream: Histogram,
    apisix: Histogram,
    ingress: u64,
    egress: u64,
}

#[derive(Default)]
pub struct Metrics {
    /// Keyed by route, service, consumer and node, joined with NUL bytes.
    series: Mutex<HashMap<String, Series>>,
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Metrics {
    fn observe(&self, route: &str, r: &LogRecord) {
        let consumer = r.consumer.as_deref().unwrap_or("");
        let mut key = String::with_capacity(route.len() + r.service_id.len() + consumer.len() + r.node.len() + 3);
        for part in [route, &r.service_id, consumer, &r.node] {
            key.push_str(part);
            key.push('\0');
        }
        let mut all = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let s = all.entry(key).or_insert_with(|| Series {
            matched_uri: r.matched_uri.to_string(),
            matched_host: r.matched_host.to_string(),
            ..Series::default()
        });
        match s.codes.iter_mut().find(|(c, _)| *c == r.status) {
            Some((_, n)) => *n += 1,
            None => s.codes.push((r.status, 1)),
        }
        let total = ms(r.request_time);
        s.request.observe(total);
        if let Some(up) = r.upstream_time {
            s.upstream.observe(ms(up));
            s.apisix.observe((total - ms(up)).max(0.0));
        } else {
            s.apisix.observe(total);
        }
        s.ingress += r.request_bytes;
        s.egress += r.response_bytes;
    }
}

/// The metrics page: every series, then the connection and request counters.
pub fn render() -> String {
    let mut out = String::new();
    let all = metrics().series.lock().unwrap_or_else(|p| p.into_inner());
    let mut keys: Vec<&String> = all.keys().collect();
    keys.sort();
    let labels = |key: &str| -> [String; 4] {
        let mut it = key.split('\0').map(escape);
        std::array::from_fn(|_| it.next().unwrap_or_default())
    };

    out.push_str("# HELP apisix_http_status HTTP status codes per service in Weir\n# TYPE apisix_http_status counter\n");
    for k in &keys {
        let s = &all[*k];
        let [route, service, consumer, node] = labels(k);
        for (code, n) in &s.codes {
            let _ = writeln!(
                out,
                "apisix_http_status{{code=\"{code}\",route=\"{route}\",matched_uri=\"{}\",matched_host=\"{}\",service=\"{service}\",consumer=\"{consumer}\",node=\"{node}\"}} {n}",
                escape(&s.matched_uri),
                escape(&s.matched_host),
            );
        }
    }

    out.push_str("# HELP apisix_http_latency HTTP request latency in milliseconds per service in Weir\n# TYPE apisix_http_latency histogram\n");
    for k in &keys {
        let s = &all[*k];
        let [route, service, consumer, node] = labels(k);
        for (kind, h) in [("request", &s.request), ("upstream", &s.upstream), ("apisix", &s.apisix)] {
            if h.count == 0 {
                continue;
            }
            let base = format!("type=\"{kind}\",route=\"{route}\",service=\"{service}\",consumer=\"{consumer}\",node=\"{node}\"");
            let mut cumulative = 0;
            for (i, n) in h.buckets.iter().enumerate() {
                cumulative += n;
                let le = BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                let _ = writeln!(out, "apisix_http_latency_bucket{{{base},le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(out, "apisix_http_latency_sum{{{base}}} {}", h.sum);
            let _ = writeln!(out, "apisix_http_latency_count{{{base}}} {}", h.count);
        }
    }

    out.push_str("# HELP apisix_bandwidth Total bandwidth in bytes consumed per service in Weir\n# TYPE apisix_bandwidth counter\n");
    for k in &keys {
        let s = &all[*k];
        let [route, service, consumer, node] = labels(k);
        for (kind, n) in [("ingress", s.ingress), ("egress", s.egress)] {
            let _ = writeln!(
                out,
                "apisix_bandwidth{{type=\"{kind}\",route=\"{route}\",service=\"{service}\",consumer=\"{consumer}\",node=\"{node}\"}} {n}"
            );
        }
    }
    drop(all);

    let c = &weir_telemetry::COUNTERS;
    out.push_str("# HELP apisix_nginx_http_current_connections Number of HTTP connections\n# TYPE apisix_nginx_http_current_connections gauge\n");
    for (state, v) in [("accepted", &c.accepted), ("active", &c.active), ("handled", &c.handled)] {
        let _ = writeln!(out, "apisix_nginx_http_current_connections{{state=\"{state}\"}} {}", v.load(Ordering::Relaxed));
    }
    out.push_str("# HELP apisix_http_requests_total The total number of client requests since Weir started\n# TYPE apisix_http_requests_total gauge\n");
    let _ = writeln!(out, "apisix_http_requests_total {}", c.requests.load(Ordering::Relaxed));
    out.push_str("# HELP weir_gateway_errors_total Requests the gateway answered with an error of its own, by kind\n# TYPE weir_gateway_errors_total counter\n");
    for kind in weir_core::error::ErrorKind::ALL {
        let _ = writeln!(out, "weir_gateway_errors_total{{kind=\"{}\"}} {}", kind.name(), c.errors(kind));
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    out.push_str("# HELP apisix_node_info Info of Weir node\n# TYPE apisix_node_info gauge\n");
    let _ = writeln!(out, "apisix_node_info{{hostname=\"{}\"}} 1", escape(host.trim()));
    for source in sources().lock().unwrap_or_else(|p| p.into_inner()).iter() {
        source(&mut out);
    }
    out
}

type Source = Box<dyn Fn(&mut String) + Send + Sync>;

fn sources() -> &'static Mutex<Vec<Source>> {
    static SOURCES: OnceLock<Mutex<Vec<Source>>> = OnceLock::new();
    SOURCES.get_or_init(Mutex::default)
}

/// Adds series from another part of the process (cloud functions, say) to the metrics page:
/// `write` appends them, in the text format, after the gateway's own.
pub fn add_source(write: impl Fn(&mut String) + Send + Sync + 'static) {
    sources().lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(write));
}

/// A label value in the text format, for sources.
pub fn label(v: &str) -> String {
    escape(v)
}

/// A label value in the text format: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_label_values_escaped() {
        let mut h = Histogram::default();
        for v in [0.5, 1.5, 3.0, 70000.0] {
            h.observe(v);
        }
        assert_eq!(&h.buckets[..3], &[1, 1, 1]);
        assert_eq!(h.buckets[BUCKETS.len()], 1, "beyond the last bucket is +Inf");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
