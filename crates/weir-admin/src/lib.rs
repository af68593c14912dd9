//! The Admin API, compatible with Apache APISIX's Admin API v3: same paths, fields, status codes
//! and JSON envelopes. Only this crate knows the API's JSON shapes; it talks to the data plane
//! solely through the store.

mod auth;
mod auth_keys;
mod handlers;
mod reply;
mod secrets;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
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
    plugins: Arc<dyn PluginCatalog>,
    /// Seals the private keys of `ssls` objects and plugins' `encrypt_fields` before they are
    /// stored.
    keyring: Arc<Keyring>,
    control: Option<Arc<dyn Control>>,
    /// Who holds which auth key, kept between writes.
    auth_keys: auth_keys::Index,
    /// Writes from this node take turns, so they never race each other's compare-and-set;
    /// the compare-and-set still guards against other nodes writing to a shared store.
    writes: tokio::sync::Mutex<()>,
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
        Admin { store, prefix, keys, plugins, keyring, control: None, auth_keys: auth_keys::Index::default(), writes: tokio::sync::Mutex::new(()) }
    }

    pub fn with_control(mut self, control: Arc<dyn Control>) -> Admin {
        self.control = Some(control);
        self
    }

    /// Answers one request. Never fails: every error is a response.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        if parts.uri.path() == BACKUP_PATH {
            return self.backup(&parts).await;
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
                return reply::too_large(len);
            }
        let mut body = body;
        let mut collected = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        collected.extend_from_slice(&data);
                    }
                    if collected.len() > MAX_BODY {
                        let len = collected.len();
                        drop(collected);
                        drain(body).await;
                        return reply::too_large(len);
                    }
                }
                Err(e) => {
                    let e: Box<dyn std::error::Error + Send + Sync> = e.into();
                    return reply::error(http::StatusCode::BAD_REQUEST, format!("invalid request body: {e}"));
                }
            }
        }
        let body = Bytes::from(collected);
        handlers::dispatch(self, parts, body).await
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
            Err(e) => reply::error(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
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

/// Serves the Admin API on `listener` until the process ends.
/// The largest request head the Admin API reads (as the proxy's).
const MAX_HEAD: usize = 32 * 1024;

/// Serves the Admin API. A client has `header_timeout` to send each request head (and to send
/// the next one on an open connection); a head past 32 KiB is answered with 431.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, header_timeout: std::time::Duration) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let admin = admin.clone();
                async move {
                    let (method, path) = (req.method().clone(), req.uri().path().to_string());
                    let resp = admin.handle(req).await;
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
                .header_read_timeout(header_timeout)
                .max_buf_size(MAX_HEAD)
                .max_header_size(MAX_HEAD);
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}
