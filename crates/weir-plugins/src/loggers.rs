//! `file-logger` and `http-logger`: one JSON entry per request, in APISIX's default log
//! format, written or sent in the background. A request never waits on a logger: entries go
//! through a bounded queue, and when it is full they are dropped and counted in the log.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::{Build, Factory, JsonSchema, LogRecord, Notes, Phases, Plugin};

/// Entries waiting for a writer, per logger.
pub(crate) const QUEUE: usize = 10_000;

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// A request as APISIX's loggers describe it.
pub(crate) fn entry(r: &LogRecord) -> Value {
    let start = r.started.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_millis() as u64);
    let latency = ms(r.request_time);
    let mut e = json!({
        "client_ip": r.client_ip,
        "route_id": &*r.route_id,
        "service_id": &*r.service_id,
        "start_time": start,
        "latency": latency,
        "upstream": r.node,
        "request": {"method": r.method, "uri": r.uri, "url": format!("http://{}{}", r.host, r.uri), "size": r.request_bytes},
        "response": {"status": r.status, "size": r.response_bytes},
        "server": {"version": concat!("weir/", env!("CARGO_PKG_VERSION"))},
    });
    if let Some(up) = r.upstream_time {
        e["upstream_latency"] = json!(ms(up));
        e["apisix_latency"] = json!((latency - ms(up)).max(0.0));
    }
    if let Some(c) = &r.consumer {
        e["consumer"] = json!({ "username": c });
    }
    e
}

/// A custom entry (`log_format`, on the plugin or in its `plugin_metadata`): each field a
/// literal, or a `$variable` of the request.
struct Format(Vec<(String, Value)>);

impl Format {
    /// The plugin's own `log_format`, else its `plugin_metadata`'s.
    fn of(own: Option<LogFormat>, b: &Build<'_>) -> Option<Format> {
        let f = own.or_else(|| b.metadata.and_then(|m| Metadata::of(m).log_format))?;
        Some(Format(f.0.into_iter().collect()))
    }

    fn render(&self, r: &LogRecord) -> Value {
        let fields = self.0.iter().map(|(k, v)| {
            let value = match v.as_str().and_then(|s| s.strip_prefix('$')) {
                Some(name) => var(r, name),
                None => v.clone(),
            };
            (k.clone(), value)
        });
        Value::Object(fields.collect())
    }
}

/// A log entry's fields, by name: a literal, or a `$variable` of the request.
#[derive(Deserialize)]
#[serde(transparent)]
struct LogFormat(Map<String, Value>);

impl JsonSchema for LogFormat {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "LogFormat".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "object"})
    }
}

/// What a logger reads of its `plugin_metadata`.
#[derive(Deserialize, Default)]
struct Metadata {
    log_format: Option<LogFormat>,
}

impl Metadata {
    fn of(m: &Value) -> Metadata {
        Metadata::deserialize(m).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "logger plugin_metadata ignored");
            Metadata::default()
        })
    }
}

/// The request variables a log format may name, from the log record.
fn var(r: &LogRecord, name: &str) -> Value {
    let start = r.started.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
    match name {
        "remote_addr" | "client_ip" => json!(r.client_ip),
        "host" => json!(r.host.split(':').next().unwrap_or("")),
        "http_host" => json!(r.host),
        "request_uri" => json!(r.uri),
        "uri" => json!(r.uri.split('?').next().unwrap_or("")),
        "args" | "query_string" => json!(r.uri.split_once('?').map_or("", |(_, q)| q)),
        "request_method" => json!(r.method),
        "status" => json!(r.status),
        "upstream_status" => r.upstream_status.map_or(Value::Null, |s| json!(s)),
        "upstream_addr" => json!(r.node),
        "request_time" => json!(r.request_time.as_secs_f64()),
        "upstream_response_time" => r.upstream_time.map_or(Value::Null, |t| json!(t.as_secs_f64())),
        "request_length" => json!(r.request_bytes),
        "bytes_sent" => json!(r.response_bytes),
        "route_id" => json!(&*r.route_id),
        "route_name" => json!(&*r.route_name),
        "service_id" => json!(&*r.service_id),
        "consumer_name" => r.consumer.as_ref().map_or(Value::Null, |c| json!(c)),
        "msec" => json!(start.as_secs_f64()),
        "time_iso8601" => json!(iso8601(start.as_secs())),
        _ => Value::Null,
    }
}

/// `YYYY-MM-DDThh:mm:ss+00:00` for a Unix time.
fn iso8601(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    let (year, month, day) = weir_core::text::civil_date(days);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}+00:00")
}

/// The sending end of a background writer; entries beyond the queue are dropped and counted.
pub(crate) struct Queue {
    pub(crate) tx: SyncSender<Value>,
    pub(crate) dropped: AtomicU64,
    pub(crate) what: String,
}

impl Queue {
    pub(crate) fn push(&self, v: Value) {
        match self.tx.try_send(v) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(logger = %self.what, dropped = n, "log queue full; entries dropped");
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

pub(crate) fn file_factory() -> Factory {
    Factory::new("file-logger", 399, |c: FileConfig, b| {
        if b.is_check() {
            return Ok(Arc::new(Logger { queue: None, format: None }));
        }
        let path = c.path;
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
        let (tx, rx) = sync_channel::<Value>(QUEUE);
        weir_core::threads::spawn(std::thread::Builder::new().name("weir-file-logger".into()), move || write_lines(file, rx)).map_err(|e| e.to_string())?;
        Ok(Arc::new(Logger { queue: Some(Queue { tx, dropped: AtomicU64::new(0), what: path }), format: Format::of(c.log_format, b) }))
    })
}

#[derive(Deserialize, JsonSchema)]
struct FileConfig {
    /// The file entries are appended to.
    #[schemars(length(min = 1))]
    path: String,
    #[serde(default)]
    #[allow(dead_code)]
    include_req_body: bool,
    #[serde(default)]
    #[allow(dead_code)]
    include_resp_body: bool,
    /// A custom entry: each field a literal, or a `$variable` of the request.
    log_format: Option<LogFormat>,
}

fn write_lines(file: std::fs::File, rx: Receiver<Value>) {
    let mut out = std::io::BufWriter::new(file);
    while let Ok(v) = rx.recv() {
        let _ = writeln!(out, "{v}");
        // Flush once the queue is drained, so lines reach the file promptly under light load.
        while let Ok(v) = rx.try_recv() {
            let _ = writeln!(out, "{v}");
        }
        if let Err(e) = out.flush() {
            tracing::warn!(error = %e, "file-logger: write failed");
        }
    }
}

struct Logger {
    /// `None` for the instance built only to check a config at write time.
    queue: Option<Queue>,
    format: Option<Format>,
}

impl Plugin for Logger {
    fn phases(&self) -> Phases {
        Phases { response: false, log: true, body: false }
    }

    fn log(&self, record: &LogRecord, _notes: &Notes) {
        if let Some(q) = &self.queue {
            q.push(match &self.format {
                Some(f) => f.render(record),
                None => entry(record),
            });
        }
    }
}

pub(crate) fn http_factory() -> Factory {
    Factory::new("http-logger", 410, |c: HttpConfig, b| {
        let target = HttpTarget::of(&c)?;
        if b.is_check() {
            return Ok(Arc::new(Logger { queue: None, format: None }));
        }
        let what = target.uri.to_string();
        let (tx, rx) = sync_channel::<Value>(QUEUE);
        weir_core::threads::spawn(std::thread::Builder::new().name("weir-http-logger".into()), move || send_batches(target, rx)).map_err(|e| e.to_string())?;
        Ok(Arc::new(Logger { queue: Some(Queue { tx, dropped: AtomicU64::new(0), what }), format: Format::of(c.log_format, b) }))
    })
}

#[derive(Deserialize, JsonSchema)]
#[schemars(extend("encrypt_fields" = ["auth_header"]))]
struct HttpConfig {
    /// The log server entries are posted to.
    #[schemars(regex(pattern = r"^https?://"))]
    uri: String,
    /// Sent as the `Authorization` header.
    auth_header: Option<String>,
    /// Seconds to wait for the log server.
    #[serde(default = "secs_3")]
    #[schemars(range(min = 1))]
    timeout: u64,
    #[serde(default = "http_logger")]
    #[allow(dead_code)]
    name: String,
    /// Entries sent in one request at most.
    #[serde(default = "entries_1000")]
    #[schemars(range(min = 1))]
    batch_max_size: u64,
    /// Seconds without a new entry after which a batch is sent.
    #[serde(default = "secs_5")]
    #[schemars(range(min = 1))]
    inactive_timeout: u64,
    /// Seconds after its first entry that a batch is sent at the latest.
    #[serde(default = "secs_60")]
    #[schemars(range(min = 1))]
    buffer_duration: u64,
    /// Times a batch is sent again after a failure.
    #[serde(default)]
    max_retry_count: u64,
    /// Seconds between retries.
    #[serde(default = "secs_1")]
    retry_delay: u64,
    /// A batch as a JSON array, or one JSON entry a line.
    #[serde(default)]
    concat_method: ConcatMethod,
    #[serde(default)]
    #[allow(dead_code)]
    include_req_body: bool,
    #[serde(default)]
    #[allow(dead_code)]
    include_resp_body: bool,
    #[serde(default)]
    #[allow(dead_code)]
    ssl_verify: bool,
    /// A custom entry: each field a literal, or a `$variable` of the request.
    log_format: Option<LogFormat>,
}

#[derive(Deserialize, Serialize, JsonSchema, Default, Clone, Copy, PartialEq)]
#[serde(rename_all = "snake_case")]
enum ConcatMethod {
    #[default]
    Json,
    NewLine,
}

fn secs_1() -> u64 {
    1
}
fn secs_3() -> u64 {
    3
}
fn secs_5() -> u64 {
    5
}
fn secs_60() -> u64 {
    60
}
fn entries_1000() -> u64 {
    1000
}
fn http_logger() -> String {
    "http logger".into()
}

/// Where and how an `http-logger` (or the span exporter) sends its batches.
pub(crate) struct HttpTarget {
    uri: http::Uri,
    authority: String,
    auth_header: Option<http::HeaderValue>,
    timeout: Duration,
    batch_max_size: usize,
    inactive: Duration,
    buffer: Duration,
    retries: u32,
    retry_delay: Duration,
    body: BatchBody,
}

/// How a batch of entries becomes one request body.
pub(crate) enum BatchBody {
    /// A JSON array.
    Json,
    /// One JSON document a line.
    NewLine,
    /// An OTLP/HTTP JSON trace export: the entries are spans of one resource.
    Otlp { resource: Value },
}

impl HttpTarget {
    /// An OTLP/HTTP trace exporter's target: `http://{address}/v1/traces`, batched as the
    /// collector settings say.
    pub(crate) fn otlp(address: &str, timeout: Duration, resource: Value) -> Result<HttpTarget, String> {
        let uri: http::Uri = format!("http://{address}/v1/traces").parse().map_err(|e| format!("collector.address: {e}"))?;
        Ok(HttpTarget {
            authority: crate::client::authority(&uri)?,
            uri,
            auth_header: None,
            timeout,
            batch_max_size: 512,
            inactive: Duration::from_secs(1),
            buffer: Duration::from_secs(5),
            retries: 1,
            retry_delay: Duration::from_secs(1),
            body: BatchBody::Otlp { resource },
        })
    }

    fn of(c: &HttpConfig) -> Result<HttpTarget, String> {
        let uri: http::Uri = c.uri.parse().map_err(|e| format!("uri: {e}"))?;
        let authority = crate::client::authority(&uri).map_err(|e| format!("uri: {e}"))?;
        let auth_header = c.auth_header.as_deref().map(|h| http::HeaderValue::from_str(h).map_err(|e| format!("auth_header: {e}"))).transpose()?;
        Ok(HttpTarget {
            uri,
            authority,
            auth_header,
            timeout: Duration::from_secs(c.timeout),
            batch_max_size: c.batch_max_size as usize,
            inactive: Duration::from_secs(c.inactive_timeout),
            buffer: Duration::from_secs(c.buffer_duration),
            retries: c.max_retry_count as u32,
            retry_delay: Duration::from_secs(c.retry_delay),
            body: if c.concat_method == ConcatMethod::NewLine { BatchBody::NewLine } else { BatchBody::Json },
        })
    }

    async fn post(&self, body: Bytes) -> Result<(), String> {
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = http::Request::post(path)
            .header(http::header::HOST, self.authority.as_str())
            .header(http::header::CONTENT_TYPE, if matches!(self.body, BatchBody::NewLine) { "text/plain" } else { "application/json" })
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        if let Some(h) = &self.auth_header {
            req.headers_mut().insert(http::header::AUTHORIZATION, h.clone());
        }
        let status = crate::client::send(&self.authority, req).await?;
        if status.is_success() { Ok(()) } else { Err(format!("log server answered {status}")) }
    }
}

/// Collects entries into batches (full at `batch_max_size`, or sent after `inactive_timeout`
/// without a new entry, or `buffer_duration` after the first) and posts each, with retries.
pub(crate) fn send_batches(target: HttpTarget, rx: Receiver<Value>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    let target = Arc::new(target);
    let mut pending: Vec<Value> = Vec::new();
    let mut first: Option<Instant> = None;
    loop {
        let wait = match first {
            Some(f) => target.inactive.min(target.buffer.saturating_sub(f.elapsed())),
            None => Duration::from_secs(3600),
        };
        let closed = match rx.recv_timeout(wait) {
            Ok(v) => {
                pending.push(v);
                first.get_or_insert_with(Instant::now);
                if pending.len() < target.batch_max_size && first.is_some_and(|f| f.elapsed() < target.buffer) {
                    continue;
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        let batch = std::mem::take(&mut pending);
        first = None;
        if !batch.is_empty() {
            let body = match &target.body {
                BatchBody::NewLine => batch.iter().map(Value::to_string).collect::<Vec<_>>().join("\n"),
                BatchBody::Json => Value::Array(batch).to_string(),
                BatchBody::Otlp { resource } => json!({"resourceSpans": [{
                    "resource": resource,
                    "scopeSpans": [{"scope": {"name": "weir", "version": env!("CARGO_PKG_VERSION")}, "spans": batch}]
                }]})
                .to_string(),
            };
            rt.block_on(deliver(&target, Bytes::from(body)));
        }
        if closed {
            return;
        }
    }
}

async fn deliver(target: &HttpTarget, body: Bytes) {
    for attempt in 0..=target.retries {
        match tokio::time::timeout(target.timeout, target.post(body.clone())).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => tracing::warn!(uri = %target.uri, attempt, error = %e, "http-logger: batch not delivered"),
            Err(_) => tracing::warn!(uri = %target.uri, attempt, "http-logger: log server timed out"),
        }
        if attempt < target.retries {
            tokio::time::sleep(target.retry_delay).await;
        }
    }
    tracing::error!(uri = %target.uri, "http-logger: batch dropped after its retries");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00+00:00");
        assert_eq!(iso8601(1_709_251_199), "2024-02-29T23:59:59+00:00");
        let meta = json!({"log_format": {"host": "$host", "code": "$status", "fixed": "x"}});
        let b = Build { scope: "r1", metadata: Some(&meta), attr: None };
        let f = Format::of(None, &b).unwrap();
        let r = LogRecord { host: "a.test:8080".into(), status: 201, ..LogRecord::default() };
        assert_eq!(f.render(&r), json!({"host": "a.test", "code": 201, "fixed": "x"}));
    }

    #[test]
    fn the_plugins_own_format_comes_first() {
        let meta = json!({"log_format": {"from": "metadata"}});
        let b = Build { scope: "r1", metadata: Some(&meta), attr: None };
        let own: LogFormat = serde_json::from_value(json!({"from": "plugin"})).unwrap();
        assert_eq!(Format::of(Some(own), &b).unwrap().0, vec![("from".to_string(), json!("plugin"))]);
        let meta = json!({"log_format": "not an object"});
        let b = Build { scope: "r1", metadata: Some(&meta), attr: None };
        assert!(Format::of(None, &b).is_none(), "a metadata log_format that is no object is ignored");
    }

    #[test]
    fn http_logger_configs() {
        use weir_core::schema::PluginCatalog as _;
        let r = crate::Registry::new(vec![http_factory()]);
        assert!(r.check_config("http-logger", &json!({"uri": "http://logs.test/in", "concat_method": "new_line"})).is_ok());
        let e = r.check_config("http-logger", &json!({"uri": "http://logs.test/in", "concat_method": "csv"})).unwrap_err();
        assert!(e.contains("concat_method"), "{e}");
        let e = r.check_config("http-logger", &json!({"uri": "http://logs.test/in", "auth_header": "a\nb"})).unwrap_err();
        assert!(e.starts_with("auth_header:"), "{e}");
    }
}
