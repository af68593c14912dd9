//! The gateway in process, for tests where sockets are not the point: config objects go in as
//! store events, a snapshot is built from them exactly as the data plane builds it, and requests
//! go through `Proxy::handle` without a listener. What a plugin answers by itself (an auth
//! refusal, a limit, a mock, a redirect) needs no upstream at all. `tests/plugins.rs` runs
//! tables of (config, request, answer) through it.

use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt as _;
use serde_json::Value;
use weir_http::ConnInfo;
use weir_http::body::ReqBody;
use weir_proxy::proxy::Proxy;
use weir_proxy::handler::{self, Call, Handler};
use weir_proxy::snapshot::{Builder, Contributor, Lowered, LoweredRoute, Snapshot};
use weir_proxy::state::{Changes, ConfigState};
use weir_store::{Event, EventKind, KeyValue};

const PREFIX: &str = "/apisix";

/// One gateway: its config as the data plane holds it, and the proxy serving the last build.
pub struct Gateway {
    state: ConfigState,
    builder: Builder,
    snapshot: Arc<ArcSwap<Snapshot>>,
    proxy: Proxy,
    revision: i64,
    conn: ConnInfo,
}

/// A response, its body read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway::new()
    }
}

impl Gateway {
    /// A gateway with every APISIX plugin and no config.
    pub fn new() -> Gateway {
        Gateway::with_contributors(Vec::new())
    }

    /// A gateway whose snapshots carry the partitions these contributors lower.
    pub fn with_contributors(contributors: Vec<Arc<dyn Contributor>>) -> Gateway {
        let keyring = Arc::new(weir_tls::Keyring::new(&["a keyring for in-process tests".to_string()]));
        let mut builder = Builder::new(PREFIX, keyring, Arc::new(weir_plugins::registry()));
        for c in contributors {
            builder = builder.with_contributor(c);
        }
        let state = ConfigState::claiming(PREFIX, &[], 0, builder.claims());
        let snapshot = Arc::new(ArcSwap::from_pointee(builder.build(&state)));
        let proxy = Proxy::new(snapshot.clone());
        let conn = ConnInfo::new(([127, 0, 0, 1], 40000).into(), ([127, 0, 0, 1], 9080).into(), "http");
        Gateway { state, builder, snapshot, proxy, revision: 1, conn }
    }

    /// Puts an object (`routes/1`, `consumers/jack`, `consumers/jack/credentials/a`…), as the
    /// store would report it, and rebuilds what it changes.
    pub fn put(&mut self, path: &str, value: Value) -> &mut Gateway {
        self.apply(EventKind::Put, path, Bytes::from(value.to_string()))
    }

    /// Deletes an object and rebuilds what it changes.
    pub fn delete(&mut self, path: &str) -> &mut Gateway {
        self.apply(EventKind::Delete, path, Bytes::new())
    }

    fn apply(&mut self, kind: EventKind, path: &str, value: Bytes) -> &mut Gateway {
        self.revision += 1;
        let kv = KeyValue { key: format!("{PREFIX}/{path}"), value, create_revision: self.revision, mod_revision: self.revision };
        let mut changes = Changes::default();
        self.state.apply(PREFIX, self.revision, &[Event { kind, kv }], &mut changes);
        // The data plane's own path: routes alone are laid over the last build, the rest
        // rebuilds it.
        self.snapshot.store(Arc::new(self.builder.update(&self.state, &changes)));
        self
    }

    /// Sends a request (its URI a path, or a full URL for its host) from 127.0.0.1.
    /// The response as the proxy makes it, its body not yet read (to follow a stream).
    pub async fn respond(&self, req: Request<Bytes>) -> http::Response<weir_http::body::RespBody> {
        let (parts, body) = req.into_parts();
        let body = if body.is_empty() { ReqBody::Empty } else { ReqBody::Read(Some(body)) };
        self.proxy.handle(&self.conn, Request::from_parts(parts, body)).await
    }

    pub async fn send(&self, req: Request<Bytes>) -> Answer {
        let (mut parts, body) = req.into_parts();
        if !parts.headers.contains_key(http::header::HOST) {
            let host = parts.uri.host().unwrap_or("localhost").to_string();
            parts.headers.insert(http::header::HOST, host.parse().expect("a host is a header value"));
        }
        let resp = self.respond(Request::from_parts(parts, body)).await;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Answer { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&bytes).into_owned() }
    }

    /// `GET path` with `headers`.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut req = Request::get(path);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        self.send(req.body(Bytes::new()).expect("a valid request")).await
    }
}

/// A contributor of routes that end in handlers, for tests: objects under
/// `/apisix/apps/{app}/{name}` (put as `apps/{app}/{name}`) make one partition per app,
/// answering `{app}.example`. Each object is an APISIX route plus `handler`, which names one of
/// `handlers`.
pub struct Apps {
    pub handlers: Vec<(&'static str, Arc<dyn Handler>)>,
}

impl Contributor for Apps {
    fn partition<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix("/apisix/apps/")?;
        Some(&key[.."/apisix/apps/".len() + rest.find('/')? + 1])
    }

    fn lower(&self, partition: &str, objects: &[(&str, &[u8])]) -> Lowered {
        let app = partition.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
        let mut routes = Vec::new();
        for (key, value) in objects {
            let Ok(mut obj) = serde_json::from_slice::<Value>(value) else { continue };
            let name = obj.as_object_mut().and_then(|o| o.remove("handler"));
            let handler = self.handlers.iter().find(|(n, _)| Some(*n) == name.as_ref().and_then(Value::as_str)).map(|(_, h)| h.clone());
            let Ok(route) = serde_json::from_value(obj) else { continue };
            routes.push(LoweredRoute { id: key[partition.len()..].to_string(), route, handler });
        }
        Lowered { hosts: vec![format!("{app}.example")], routes }
    }
}

/// A handler that answers 200 `ok` to everything.
pub struct Ok200;

impl Handler for Ok200 {
    fn call(&self, _call: Call<'_>) -> handler::Answer {
        Box::pin(async { http::Response::new(weir_http::body::RespBody::full("ok")) })
    }
}
