//! The access log: one JSON line per proxied request, with the fields of APISIX's (nginx's)
//! access log, written once the response body is done (so `bytes` and `request_time` are the
//! whole exchange). Off unless [`init`] was called.
//!
//! Lines go through a bounded queue to one writer thread, so a slow disk never blocks a worker;
//! when the queue is full, lines are dropped and counted, and the writer says how many.

use std::io::Write as _;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{Instant, SystemTime};

use http::{Method, Request, Response, Uri};

use weir_http::ConnInfo;
use weir_http::body::{ReqBody, RespBody};

static SINK: OnceLock<SyncSender<String>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);
const QUEUE: usize = 16 * 1024;

/// Starts the access log: appended to `path`, or written to stdout without one.
pub fn init(path: Option<&Path>) -> std::io::Result<()> {
    let mut out: Box<dyn std::io::Write + Send> = match path {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| std::io::Error::new(e.kind(), format!("access log {}: {e}", p.display())))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let (tx, rx) = sync_channel::<String>(QUEUE);
    std::thread::Builder::new().name("weir-access-log".into()).spawn(move || {
        while let Ok(line) = rx.recv() {
            let mut ok = out.write_all(line.as_bytes()).is_ok();
            // Whatever else is queued goes out in the same flush.
            while let Ok(line) = rx.try_recv() {
                ok &= out.write_all(line.as_bytes()).is_ok();
            }
            ok &= out.flush().is_ok();
            if !ok {
                tracing::warn!("access log: write failed");
            }
            let dropped = DROPPED.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                tracing::warn!(dropped, "access log: queue full, lines dropped");
            }
        }
    })?;
    let _ = SINK.set(tx);
    Ok(())
}

/// What is known of a request when it arrives; `None` when the access log is off.
pub struct Entry {
    start: Instant,
    time: SystemTime,
    method: Method,
    uri: Uri,
    route: Option<std::sync::Arc<str>>,
}

impl Entry {
    pub fn start(req: &Request<ReqBody>) -> Option<Entry> {
        SINK.get()?;
        Some(Entry { start: Instant::now(), time: SystemTime::now(), method: req.method().clone(), uri: req.uri().clone(), route: None })
    }

    /// The route the request matched.
    pub fn route(&mut self, id: &std::sync::Arc<str>) {
        self.route = Some(id.clone());
    }

    /// Logs the request once `resp`'s body is done.
    pub fn finish(self, conn: &ConnInfo, resp: Response<RespBody>) -> Response<RespBody> {
        let status = resp.status().as_u16();
        let remote = conn.remote;
        resp.map(move |body| {
            body.on_end(move |bytes| {
                let line = serde_json::json!({
                    "remote_addr": remote.ip().to_string(),
                    "remote_port": remote.port(),
                    "time": rfc3339(self.time),
                    "method": self.method.as_str(),
                    "uri": self.uri.path_and_query().map_or("/", |p| p.as_str()),
                    "status": status,
                    "bytes": bytes,
                    "request_time": (self.start.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
                    "route_id": self.route.as_deref(),
                });
                send(format!("{line}\n"));
            })
        })
    }
}

fn send(line: String) {
    if let Some(tx) = SINK.get()
        && let Err(TrySendError::Full(_)) = tx.try_send(line)
    {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// `2026-12-03T05:47:51.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (year, month, day) = weir_core::text::civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day of a century leap year), and 2026-12-03 05:47:51.25.
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_276_871_250)), "2026-12-03T05:47:51.250Z");
    }
}
