//! The Admin API, compatible with Apache APISIX's Admin API v3: same paths, fields, status codes
//! and JSON envelopes. Only this crate knows the API's JSON shapes; it talks to the data plane
//! solely through the store.

mod auth;
mod auth_keys;
mod handlers;
mod reply;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use weir_catalog::Catalog;
use weir_core::schema::PluginCatalog;
use weir_store::SharedStore;
use weir_tls::Keyring;

pub use auth::{AdminKey, Role};

/// APISIX refuses Admin API bodies above 1.5 MiB.
pub const MAX_BODY: usize = 1024 * 1024 * 3 / 2;

pub struct Admin {
    store: SharedStore,
    prefix: String,
    keys: Vec<AdminKey>,
    /// The resource kinds served, and the door every object is checked through.
    kinds: Arc<Catalog>,
    plugins: Arc<dyn PluginCatalog>,
    /// Seals the private keys of `ssls` objects and plugins' `encrypt_fields` before they are
    /// stored.
    keyring: Arc<Keyring>,
    control: Option<Arc<dyn Control>>,
    /// APIs mounted beside the Admin API on its listener (the platform's `/v1/`).
    extensions: Vec<Arc<dyn Extension>>,
    /// Who holds which auth key, kept between writes.
    auth_keys: auth_keys::Index,
    /// Writes from this node take turns, so they never race each other's compare-and-set;
    /// the compare-and-set still guards against other nodes writing to a shared store.
    writes: tokio::sync::Mutex<()>,
    /// The revision this node's data plane serves, where it has one.
    applied: Option<tokio::sync::watch::Receiver<weir_store::settled::Applied>>,
}

/// An API mounted on the admin listener beside the Admin API (the platform's). It gets the
/// listener's limits (head and body sizes, timeouts) and the admin keys' verdict, and answers
/// in its own shapes.
pub trait Extension: Send + Sync {
    /// Whether this API answers `path`; asked before the Admin API's own paths.
    fn serves(&self, path: &str) -> bool;

    /// Whether a call carries a credential of the extension's own (a bearer token, say): such
    /// a call without an admin key still has its body read and reaches [`Extension::handle`],
    /// which must then check it. Any other call without a valid admin key is refused with 401
    /// before its body is read.
    fn has_credential(&self, parts: &http::request::Parts) -> bool;

    /// The extension's own answer to a call with no credential at all, in its own envelope;
    /// `None` answers as the Admin API does.
    fn unauthorized(&self) -> Option<Response<Full<Bytes>>> {
        None
    }

    /// The extension's own answer to a call refused before it was read whole (a body too
    /// large, too slow or unreadable), in its own envelope; `None` answers as the Admin API does.
    fn refused(&self, _status: http::StatusCode, _message: &str) -> Option<Response<Full<Bytes>>> {
        None
    }

    /// Answers a call. `role` is the role of the valid admin key it presented, if any.
    fn handle<'a>(
        &'a self,
        parts: http::request::Parts,
        body: Bytes,
        role: Option<Role>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Full<Bytes>>> + Send + 'a>>;
}

/// Read-only state of the running gateway served under `/v1/` on the admin listener (APISIX's
/// control API, e.g. `/v1/healthcheck`). The Admin API itself only ever sees the store; this is
/// how the data plane's live state reaches the same listener.
pub trait Control: Send + Sync {
    /// Answers `GET /v1/{path}`; `None` when nothing lives there.
    fn get(&self, path: &str) -> Option<(http::StatusCode, serde_json::Value)>;
}

impl Admin {
    /// `prefix` is the store key prefix every object lives under (`/apisix`).
    pub fn new(
        store: SharedStore,
        prefix: String,
        keys: Vec<AdminKey>,
        plugins: Arc<dyn PluginCatalog>,
        keyring: Arc<Keyring>,
    ) -> Admin {
        Admin { store, prefix, keys, kinds: Arc::new(Catalog::apisix()), plugins, keyring, control: None, extensions: Vec::new(), auth_keys: auth_keys::Index::default(), writes: tokio::sync::Mutex::new(()), applied: None }
    }

    /// Serves these resource kinds instead of APISIX's alone.
    pub fn with_catalog(mut self, kinds: Arc<Catalog>) -> Admin {
        self.kinds = kinds;
        self
    }

    /// Mounts an API beside the Admin API on its listener.
    pub fn with_extension(mut self, extension: Arc<dyn Extension>) -> Admin {
        self.extensions.push(extension);
        self
    }

    /// Answers a request that wrote through a `weir_store::settled::Settled` store once
    /// `applied` (the revision this node's data plane serves) reaches its writes, or after
    /// [`weir_store::settled::BOUND`].
    pub fn with_applied(mut self, applied: tokio::sync::watch::Receiver<weir_store::settled::Applied>) -> Admin {
        self.applied = Some(applied);
        self
    }

    pub fn with_control(mut self, control: Arc<dyn Control>) -> Admin {
        self.control = Some(control);
        self
    }

    /// Answers one request. Never fails: every error is a response. A body that stops
    /// arriving for `body_timeout` between two reads is answered with 408.
    pub async fn handle<B>(&self, req: Request<B>, body_timeout: Duration) -> Response<Full<Bytes>>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        if parts.uri.path() == BACKUP_PATH {
            return self.backup(&parts).await;
        }
        let extension = self.extensions.iter().find(|e| e.serves(parts.uri.path())).cloned();
        // A refusal before the body is read whole: in the extension's envelope on its paths
        // (with `status`), as the Admin API answers elsewhere.
        let refused = |status: http::StatusCode, admin_status: http::StatusCode, message: String| match extension.as_ref().and_then(|e| e.refused(status, &message)) {
            Some(theirs) => theirs,
            None => reply::error(admin_status, message),
        };
        let too_large = |len: usize| refused(http::StatusCode::PAYLOAD_TOO_LARGE, http::StatusCode::BAD_REQUEST, reply::too_large_message(len));
        let mut role = None;
        // The key is checked before the body is read: a caller without one gets nothing of the
        // server's memory or time, and its body is left unread (the connection then closes).
        match &extension {
            Some(ext) => match auth::role(&self.keys, &parts) {
                Ok(r) => role = Some(r),
                Err(_) if ext.has_credential(&parts) => {}
                Err(description) => return ext.unauthorized().unwrap_or_else(|| handlers::unauthorized(description)),
            },
            None => {
                if let Some(refusal) = handlers::refuse_unauthorized(self, &parts) {
                    return refusal;
                }
            }
        }
        if let Some(len) = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            && len > MAX_BODY {
                if len <= DRAIN_LIMIT {
                    drain(body).await;
                }
                return too_large(len);
            }
        let mut body = body;
        let mut collected = Vec::new();
        loop {
            let frame = match tokio::time::timeout(body_timeout, body.frame()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => return refused(http::StatusCode::REQUEST_TIMEOUT, http::StatusCode::REQUEST_TIMEOUT, "the request body stopped arriving".into()),
            };
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        collected.extend_from_slice(&data);
                    }
                    if collected.len() > MAX_BODY {
                        let len = collected.len();
                        drop(collected);
                        drain(body).await;
                        return too_large(len);
                    }
                }
                Err(e) => {
                    let e: Box<dyn std::error::Error + Send + Sync> = e.into();
                    return refused(http::StatusCode::BAD_REQUEST, http::StatusCode::BAD_REQUEST, format!("invalid request body: {e}"));
                }
            }
        }
        let body = Bytes::from(collected);
        let work = async {
            match extension {
                Some(ext) => ext.handle(parts, body, role).await,
                None => handlers::dispatch(self, parts, body).await,
            }
        };
        match &self.applied {
            Some(applied) => weir_store::settled::settle(applied, weir_store::settled::BOUND, work).await,
            None => work.await,
        }
    }
}

/// `GET` answers a backup of the whole store (`weir dump` asks a running node here).
pub const BACKUP_PATH: &str = "/apisix/admin/backup";

impl Admin {
    /// Every object under the prefix, values as stored. Only for an admin key: a backup holds
    /// every credential.
    async fn backup(&self, parts: &http::request::Parts) -> Response<Full<Bytes>> {
        if parts.method != http::Method::GET {
            return reply::error(http::StatusCode::METHOD_NOT_ALLOWED, format!("not supported `{}` method", parts.method));
        }
        // Checked as a write would be, so a viewer key (GET only) is refused.
        let (mut as_write, ()) = Request::builder().method(http::Method::PUT).uri(parts.uri.clone()).body(()).expect("a valid request").into_parts();
        as_write.headers = parts.headers.clone();
        if let Err(description) = auth::check(&self.keys, &as_write) {
            return reply::json(
                http::StatusCode::UNAUTHORIZED,
                &serde_json::json!({"error_msg": "failed to check token", "description": description}),
            );
        }
        match weir_store::backup::export(self.store.as_ref(), &self.prefix).await {
            Ok(doc) => reply::json(http::StatusCode::OK, &doc),
            Err(e) => reply::store_down(e),
        }
    }
}

/// Past this, an oversized body is not even read: the connection is dropped after the answer.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

/// Reads and discards what the client is still sending (up to [`DRAIN_LIMIT`]), so it sees the
/// refusal instead of a reset connection.
async fn drain<B: http_body::Body + Unpin>(mut body: B) {
    let mut seen = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            seen += bytes::Buf::remaining(d);
        }
        if seen > DRAIN_LIMIT {
            break;
        }
    }
}

/// The largest request head the Admin API reads (as the proxy's).
const MAX_HEAD: usize = 32 * 1024;

/// Timeouts and limits of the admin listener's connections (`admin` in the process config).
#[derive(Clone, Debug)]
pub struct Limits {
    /// To send a request head, or to start the next one on an open connection.
    pub header_timeout: Duration,
    /// Between two reads of a request body.
    pub body_timeout: Duration,
    /// A response write may wait this long for the client to read.
    pub send_timeout: Duration,
    /// Connections open at once; more are closed as they come, with a log line.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let minute = Duration::from_secs(60);
        Limits { header_timeout: minute, body_timeout: minute, send_timeout: minute, max_connections: 1024 }
    }
}

/// Serves the Admin API until the process ends, within `limits`. A head past 32 KiB is
/// answered with 431.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, limits: Limits) {
    let open = Arc::new(AtomicUsize::new(0));
    let last_warned = AtomicU64::new(0);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.fetch_add(1, Ordering::Relaxed) >= limits.max_connections {
            open.fetch_sub(1, Ordering::Relaxed);
            // Once a second at most, so a flood does not flood the log.
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            if last_warned.swap(now, Ordering::Relaxed) != now {
                tracing::warn!(max_connections = limits.max_connections, client = %peer, "admin connection limit reached (admin.max_connections): new connections are closed until others end");
            }
            drop(stream);
            continue;
        }
        let held = OpenConnection(open.clone());
        let admin = admin.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _held = held;
            let body_timeout = limits.body_timeout;
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let admin = admin.clone();
                async move {
                    let (method, path) = (req.method().clone(), req.uri().path().to_string());
                    let resp = admin.handle(req, body_timeout).await;
                    // Who was refused, for whoever watches for key guessing.
                    if resp.status() == http::StatusCode::UNAUTHORIZED {
                        tracing::warn!(client = %peer, %method, path, "admin call refused: no valid admin key");
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(MAX_HEAD)
                .max_header_size(MAX_HEAD);
            // A write that waits longer than `send_timeout` for the client ends the connection.
            let mut io = tokio_io_timeout::TimeoutStream::new(stream);
            io.set_write_timeout(Some(limits.send_timeout));
            if let Err(e) = builder.serve_connection(TokioIo::new(Box::pin(io)), service).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// An open admin connection, counted against `admin.max_connections` while it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
