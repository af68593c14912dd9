//! One request through the gateway: match a route, pick a node, forward, stream back.
//! Every failure becomes a response here, and only here.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::Body as _;
use hyper::upgrade::OnUpgrade;
use weir_core::error::{ErrorKind, Kinded};
use weir_core::expr::Vars;
use weir_core::path;
use weir_core::text::{interpolate, ip_text};
use weir_http::body::{Received, ReqBody, RespBody};
use weir_http::hop::{self, Hop};
use weir_http::pool::{self, Conn, ConnectError, Lease, Sender};
use weir_http::{ConnInfo, deadline, error_response, h1, is_idempotent};
use weir_telemetry::COUNTERS;
use weir_plugins::{Consumers, LogRecord, Notes, Phase, Pipeline, Ran, Reply, RequestCtx, RequestVars, ResponseCtx, filters, run_log, run_phase, run_request, run_response};
use weir_upstream::balancer::hash32;
use weir_upstream::health::Outcome;
use weir_upstream::{InFlight, NodeRt, Timeouts};

use crate::handler::Call;
use crate::router::RequestFacts;
use crate::snapshot::{HashOn, PassHost, RouteRt, Snapshot, UpstreamRt};

pub struct Proxy {
    snapshot: Arc<ArcSwap<Snapshot>>,
    /// The name whose certificate a TLS client without SNI gets (APISIX's `fallback_sni`).
    fallback_sni: Option<String>,
    /// Timeouts and limits of client connections.
    pub limits: weir_http::front::Limits,
}

/// Who a failure is owed to: a stalled client body is the client's timeout (408), a stalled
/// node the gateway's (504).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Gateway,
}

/// The gateway's answer to a failure: the one place a kind becomes a response, and where it
/// is counted. A route the data plane could not apply as stored is `Unavailable` (closed, not
/// served without its plugins; the reason was logged when the snapshot was built).
fn failure(kind: ErrorKind, side: Side) -> Response<RespBody> {
    failure_saying(kind, side, None)
}

/// [`failure`], with a body of its own (`{"error_msg": ...}`) instead of the kind's.
fn failure_saying(kind: ErrorKind, side: Side, body: Option<&'static str>) -> Response<RespBody> {
    weir_telemetry::COUNTERS.error(kind);
    let (status, default) = match (kind, side) {
        (ErrorKind::Timeout, Side::Client) => (StatusCode::REQUEST_TIMEOUT, r#"{"error_msg":"408 Request Timeout"}"#),
        // A client's body over the size it may have.
        (ErrorKind::Quota, Side::Client) => (StatusCode::PAYLOAD_TOO_LARGE, r#"{"error_msg":"413 Request Entity Too Large"}"#),
        (ErrorKind::BadInput, _) => (StatusCode::BAD_REQUEST, r#"{"error_msg":"400 Bad Request"}"#),
        (ErrorKind::NotFound, _) => (StatusCode::NOT_FOUND, r#"{"error_msg":"404 Route Not Found"}"#),
        (ErrorKind::Conflict, _) => (StatusCode::CONFLICT, r#"{"error_msg":"409 Conflict"}"#),
        (ErrorKind::Unavailable, _) => {
            (StatusCode::SERVICE_UNAVAILABLE, r#"{"error_msg":"503 Service Unavailable: the route's configuration cannot be applied"}"#)
        }
        (ErrorKind::Timeout, Side::Gateway) => (StatusCode::GATEWAY_TIMEOUT, r#"{"error_msg":"504 Gateway Timeout"}"#),
        (ErrorKind::Upstream, _) => (StatusCode::BAD_GATEWAY, r#"{"error_msg":"502 Bad Gateway"}"#),
        (ErrorKind::Quota, Side::Gateway) => (StatusCode::TOO_MANY_REQUESTS, r#"{"error_msg":"429 Too Many Requests"}"#),
        (ErrorKind::Internal, _) => (StatusCode::INTERNAL_SERVER_ERROR, r#"{"error_msg":"500 Internal Server Error"}"#),
    };
    error_response(status, body.unwrap_or(default))
}

/// `uri` with its path replaced, its query and any scheme and authority kept.
fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(http::uri::PathAndQuery::try_from(pq).ok()?);
    Uri::from_parts(parts).ok()
}


/// Lower-cases the host and drops the port and a trailing dot (`admin.internal.` is the same
/// name, and nginx matches it so); borrows when nothing needs changing.
fn normalize_host(raw: &str) -> Cow<'_, str> {
    let host = weir_core::text::host_name(raw);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

enum SendError {
    /// Nothing was sent: the request comes back for another node.
    Connect(Box<Request<ReqBody>>, ConnectError),
    Timeout,
    Upstream(weir_http::body::BoxError),
    /// The client's body broke off or stalled: the client's fault, not the node's.
    Client(weir_http::body::BoxError),
}

impl Kinded for SendError {
    fn kind(&self) -> ErrorKind {
        match self {
            SendError::Connect(_, e) => e.kind(),
            SendError::Timeout => ErrorKind::Timeout,
            SendError::Upstream(_) => ErrorKind::Upstream,
            SendError::Client(e) if e.is::<weir_http::body::BodyTimeout>() => ErrorKind::Timeout,
            SendError::Client(_) => ErrorKind::BadInput,
        }
    }
}

impl weir_http::Service for Proxy {
    fn limits(&self) -> &weir_http::front::Limits {
        &self.limits
    }

    fn call(&self, conn: &ConnInfo, req: Request<ReqBody>) -> impl Future<Output = Response<RespBody>> + Send {
        self.handle(conn, req)
    }
}

impl Proxy {
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>) -> Proxy {
        Proxy { snapshot, fallback_sni: None, limits: weir_http::front::Limits::default() }
    }

    pub fn with_limits(mut self, limits: weir_http::front::Limits) -> Proxy {
        self.limits = limits;
        self
    }

    pub fn with_fallback_sni(mut self, name: Option<String>) -> Proxy {
        self.fallback_sni = name;
        self
    }

    /// The TLS server config for a handshake naming `sni` (or, without one, the fallback name),
    /// from the current snapshot.
    pub fn tls_config(&self, sni: Option<&str>) -> Option<Arc<rustls::ServerConfig>> {
        let name = sni.or(self.fallback_sni.as_deref())?;
        self.snapshot.load().tls.find(name)
    }

    /// Answers one request; with the access log on, logs it once its response body is done.
    pub async fn handle(&self, conn: &ConnInfo, req: Request<ReqBody>) -> Response<RespBody> {
        let mut entry = crate::access::Entry::start(&req);
        let resp = self.route_and_forward(conn, req, entry.as_mut()).await;
        match entry {
            Some(e) => e.finish(conn, resp),
            None => resp,
        }
    }

    async fn route_and_forward(&self, conn: &ConnInfo, req: Request<ReqBody>, entry: Option<&mut crate::access::Entry>) -> Response<RespBody> {
        COUNTERS.requests.fetch_add(1, Ordering::Relaxed);
        // A guard, not a clone: the snapshot is only needed until the route and its plugins ran.
        let snapshot = self.snapshot.load();
        let (mut parts, body) = req.into_parts();
        // Routes are matched, and plugins run, on the path's normal form; the upstream is sent
        // the same. Most paths are their own normal form, which one scan tells.
        let mut decoded = None;
        if parts.uri.path().starts_with('/') && path::may_need_normalizing(parts.uri.path()) {
            match path::normalize(parts.uri.path()) {
                Ok(n) => {
                    if n.encoded != parts.uri.path() {
                        let Some(uri) = with_path(&parts.uri, &n.encoded) else { return failure(ErrorKind::BadInput, Side::Client) };
                        parts.uri = uri;
                    }
                    if n.decoded != n.encoded {
                        decoded = Some(n.decoded);
                    }
                }
                Err(e) => {
                    tracing::debug!(path = parts.uri.path(), error = %e, "request path refused");
                    return failure(ErrorKind::BadInput, Side::Client);
                }
            }
        }
        let raw_host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.host());
        let route = {
            let host = raw_host.map(normalize_host);
            let vars = request_vars(&parts, host.as_deref(), conn);
            let facts = RequestFacts {
                method: parts.method.as_str(),
                host: host.as_deref(),
                path: decoded.as_deref().unwrap_or(parts.uri.path()),
                remote: Some(conn.remote.ip()),
                vars: &vars,
            };
            snapshot.find(&facts).cloned()
        };
        let Some(route) = route else { return failure(ErrorKind::NotFound, Side::Gateway) };
        if let Some(e) = entry {
            e.route(&route.id);
        }
        if route.unavailable.is_some() || snapshot.global_unavailable.is_some() {
            return failure(ErrorKind::Unavailable, Side::Gateway);
        }
        if route.plugins.is_empty() && snapshot.global.is_empty() {
            drop(snapshot);
            if let Some(handler) = &route.handler {
                return match read_body(body, handler.max_body()).await {
                    Ok(body) => answered(handler.as_ref(), handler.call(Call { parts, body, route_id: &route.id, consumer: None, notes: &Notes::default(), matched: decoded.as_deref() })).await,
                    Err(resp) => resp,
                };
            }
            // Boxed, as below: the upstream call's future is most of this one's size, and every
            // request's future (a handler's answer, the plugin path) would carry and move it.
            return Box::pin(self.to_upstream(&route, route.upstream.as_ref(), parts, body, conn, None, None)).await;
        }
        let global = snapshot.global.clone();
        let consumers = snapshot.consumers.clone();
        drop(snapshot);
        // Boxed: the plugin path's future is large, and keeping it out of line keeps the future
        // of every request (plugins or not) small, as hyper moves it on each poll setup.
        Box::pin(self.with_plugins(route, global, &consumers, parts, decoded, body, conn)).await
    }

    /// A request whose route or global rules have plugins: the request phases (global rules'
    /// first), then the upstream unless a plugin answered, then the response phases, and the
    /// log phase once the response has been sent.
    #[allow(clippy::too_many_arguments)]
    async fn with_plugins(
        &self,
        route: Arc<RouteRt>,
        global: Arc<Pipeline>,
        consumers: &Consumers,
        mut parts: http::request::Parts,
        decoded: Option<String>,
        body: ReqBody,
        conn: &ConnInfo,
    ) -> Response<RespBody> {
        let started = Instant::now();
        // A handler's route may have plugins that rewrite the path: the one it matched is kept.
        let matched: Option<String> = route.handler.as_ref().filter(|h| h.reads_matched_path()).map(|_| decoded.unwrap_or_else(|| parts.uri.path().to_string()));
        let logged = global.phases.log || route.plugins.phases.log;
        // A plugin that checks the body (request-validation) gets it read, within a bound.
        let (read, body) = if global.phases.body || route.plugins.phases.body {
            match read_body(body, MAX_READ_BODY).await {
                Ok(b) => (Some(b.clone()), ReqBody::Read(Some(b))),
                Err(resp) => return resp,
            }
        } else {
            (None, body)
        };
        let mut record = logged.then(|| log_record(&route, &parts, conn));
        let mut ctx = RequestCtx {
            parts: &mut parts,
            remote: conn.remote,
            local: conn.local,
            scheme: conn.scheme,
            route_id: &route.id,
            consumers,
            consumer: None,
            response_headers: Vec::new(),
            notes: Notes::default(),
            upstream_choice: None,
            body: read,
        };
        let (ran_global, mut outcome) = run_request(&global, &mut ctx).await;
        let mut ran_route = Ran::default();
        // The plugins the consumer brings, once an auth plugin has named it: they replace the
        // route's config of the same plugins (consumer > consumer group > route).
        let mut brought: Option<(Arc<Pipeline>, Ran)> = None;
        if outcome.is_ok() {
            ran_route = filters(&route.plugins, &ctx);
            outcome = run_phase(&[(&route.plugins, ran_route)], Phase::Rewrite, &mut ctx).await;
        }
        if outcome.is_ok() {
            let own = ctx.consumer.as_ref().and_then(|c| consumers.plugins_of(&c.username)).cloned();
            outcome = match own {
                None => run_phase(&[(&route.plugins, ran_route)], Phase::Access, &mut ctx).await,
                Some(own) => {
                    ran_route = ran_route.without(&route.plugins, &own);
                    let ran_own = filters(&own, &ctx);
                    let mut r = run_phase(&[(&own, ran_own)], Phase::Rewrite, &mut ctx).await;
                    if r.is_ok() {
                        r = run_phase(&[(&route.plugins, ran_route), (&own, ran_own)], Phase::Access, &mut ctx).await;
                    }
                    brought = Some((own, ran_own));
                    r
                }
            };
        }
        let plugin_headers = std::mem::take(&mut ctx.response_headers);
        let consumer = ctx.consumer.take();
        // `real-ip` may have named another client: the upstream hears of that one.
        let moved = (ctx.remote != conn.remote).then(|| ConnInfo::new(ctx.remote, conn.local, conn.scheme).trusting(conn.trusted));
        let mut notes = std::mem::take(&mut ctx.notes);
        let choice = ctx.upstream_choice;
        let conn = moved.as_ref().unwrap_or(conn);
        if record.is_none() && brought.as_ref().is_some_and(|(p, _)| p.phases.log) {
            // Only the consumer's plugins log: the record starts now, once it is known.
            record = Some(log_record(&route, &parts, conn));
        }
        if moved.is_some()
            && let Some(r) = record.as_mut()
        {
            r.record.client_ip = ip_text(conn.remote.ip());
        }
        let resp = match outcome {
            Err(reply) => {
                // The replying plugin ran last: its headers win over earlier plugins'.
                let Reply { status, body, headers } = reply;
                with_headers(with_headers(plugin_reply(status, body), plugin_headers), headers)
            }
            Ok(()) => {
                let who = consumer.as_deref().map(|c| c.username.as_str());
                let resp = match &route.handler {
                    // The handler reads what it needs of the notes before anything is awaited.
                    Some(handler) => match read_body(body, handler.max_body()).await {
                        Ok(body) => answered(handler.as_ref(), handler.call(Call { parts, body, route_id: &route.id, consumer: who, notes: &notes, matched: matched.as_deref() })).await,
                        Err(resp) => resp,
                    },
                    None => {
                        let served = record.as_mut().map(|r| &mut r.served);
                        let upstream = match choice {
                            Some(i) => route.alternatives.get(i).cloned().flatten().or_else(|| route.upstream.clone()),
                            None => route.upstream.clone(),
                        };
                        // Boxed where it is taken: the upstream call's future is most of this
                        // one's size, which every plugin request would copy when it is boxed.
                        Box::pin(self.to_upstream(&route, upstream.as_ref(), parts, body, conn, who, served)).await
                    }
                };
                with_headers(resp, plugin_headers)
            }
        };
        let brought_phases = brought.as_ref().map(|(p, _)| p.phases).unwrap_or_default();
        let resp = if global.phases.response || route.plugins.phases.response || brought_phases.response {
            let (mut head, body) = resp.into_parts();
            let mut replaced = None;
            let mut transform = None;
            let mut rctx = ResponseCtx {
                parts: &mut head,
                body: &mut replaced,
                route_id: &route.id,
                consumer: consumer.as_deref(),
                notes: &mut notes,
                transform: &mut transform,
                started,
            };
            run_response(&global, ran_global, &mut rctx);
            run_response(&route.plugins, ran_route, &mut rctx);
            if let Some((own, ran)) = &brought {
                run_response(own, *ran, &mut rctx);
            }
            let body = match replaced {
                Some(b) => {
                    head.headers.remove(header::CONTENT_LENGTH);
                    RespBody::full(b)
                }
                None => body,
            };
            match transform {
                Some(t) => Response::from_parts(head, body.transformed(t)),
                None => Response::from_parts(head, body),
            }
        } else {
            resp
        };
        let Some(mut pending) = record else { return resp };
        pending.record.status = resp.status().as_u16();
        pending.record.consumer = consumer.map(|c| c.username.clone());
        pending.head_bytes = 17 + resp.headers().iter().map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64).sum::<u64>();
        resp.map(|body| {
            body.on_end(move |sent| {
                let record = pending.finish(sent);
                run_log(&global, ran_global, &record, &notes);
                run_log(&route.plugins, ran_route, &record, &notes);
                if let Some((own, ran)) = &brought {
                    run_log(own, *ran, &record, &notes);
                }
            })
        })
    }

    /// Forwards to the route's upstream, after the plugins (if any) let the request through.
    /// `served` (when the log phase needs it) learns which node answered and how fast.
    #[allow(clippy::too_many_arguments)]
    async fn to_upstream(
        &self,
        route: &RouteRt,
        upstream: Option<&Arc<UpstreamRt>>,
        mut parts: http::request::Parts,
        body: ReqBody,
        conn: &ConnInfo,
        consumer: Option<&str>,
        served: Option<&mut Served>,
    ) -> Response<RespBody> {
        let Some(upstream) = upstream else {
            return failure_saying(ErrorKind::Unavailable, Side::Gateway, Some(r#"{"error_msg":"missing upstream configuration in Route or Service"}"#));
        };
        let hash = upstream.hash_on.as_ref().map_or(0, |on| {
            let raw_host = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).or_else(|| parts.uri.host());
            let host = raw_host.map(normalize_host);
            hash_key(on, &request_vars(&parts, host.as_deref(), conn), consumer)
        });
        let original_host = match parts.headers.get(header::HOST) {
            Some(h) => Some(h.clone()),
            // HTTP/2 carries the host in `:authority`; HTTP/1.1 upstreams need it as Host.
            None => {
                let h = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok());
                if let Some(h) = &h {
                    parts.headers.insert(header::HOST, h.clone());
                }
                h
            }
        };
        // A WebSocket handshake keeps its Upgrade and Connection headers on routes that allow it.
        let (upgrade, protocol) = match route.websocket.then(|| websocket_upgrade(&parts.headers)).flatten() {
            Some(protocol) => match parts.extensions.remove::<OnUpgrade>() {
                Some(on) => (Some(on), Some(protocol)),
                None => (None, None),
            },
            None => (None, None),
        };
        let client =
            hop::Client { ip: conn.remote_ip(), scheme: conn.scheme, port: conn.local_port(), host: original_host, trusted: conn.trusted };
        let hop = Hop::new(&parts.headers, client, protocol);
        if upstream.transport.h2 {
            hop.apply(&mut parts.headers);
        }
        if let Some(pq) = parts.uri.path_and_query()
            && parts.uri.scheme().is_some() {
                parts.uri = Uri::from(pq.clone());
            }
        parts.version = http::Version::HTTP_11;
        if let PassHost::Rewrite(h) = &upstream.pass_host {
            parts.headers.insert(header::HOST, h.clone());
        }
        let req = Request::from_parts(parts, body);
        forward(upstream, route.timeouts, hash, req, &hop, upgrade, served).await
    }
}

/// The most request body a plugin may have read into memory.
const MAX_READ_BODY: usize = 8 << 20;

/// A handler's answer, or 504 once its timeout has passed (the work is dropped). The deadline
/// is the worker's coarse one: a tokio timer per call would cost the worker a wake-up of its
/// own event loop whenever it is the earliest timer.
async fn answered(handler: &dyn crate::handler::Handler, answer: crate::handler::Answer) -> Response<RespBody> {
    match deadline::within(handler.timeout(), answer).await {
        Ok(resp) => resp,
        Err(_) => failure(ErrorKind::Timeout, Side::Gateway),
    }
}

/// The whole request body, refused (413) past `limit` bytes, and before any of it is read (no
/// `100 Continue`) when its declared length is. Past its first piece, each piece is copied into
/// one buffer as it comes, so that no piece keeps a larger buffer it may have been cut from.
async fn read_body(mut body: ReqBody, limit: usize) -> Result<Bytes, Response<RespBody>> {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    let too_large = || failure(ErrorKind::Quota, Side::Client);
    let declared = body.size_hint().lower();
    if declared > limit as u64 {
        return Err(too_large());
    }
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) if e.is::<weir_http::body::BodyTimeout>() => return Err(failure(ErrorKind::Timeout, Side::Client)),
            Err(_) => return Err(failure_saying(ErrorKind::BadInput, Side::Client, Some(r#"{"error_msg":"failed to read request body"}"#))),
        };
        let Ok(data) = frame.into_data() else { continue };
        let have = first.as_ref().map_or(0, Bytes::len) + joined.as_ref().map_or(0, bytes::BytesMut::len);
        if have + data.len() > limit {
            return Err(too_large());
        }
        match (&mut joined, first.take()) {
            (Some(buf), _) => buf.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(f)) => {
                // Room for what was declared, up to 64 KiB: more grows as it comes.
                let mut buf = bytes::BytesMut::with_capacity((declared as usize).min(64 << 10).max(f.len() + data.len()));
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
        }
    }
    Ok(joined.map(bytes::BytesMut::freeze).or(first).unwrap_or_default())
}

/// What the log phase learns of the upstream exchange.
#[derive(Default)]
struct Served {
    node: Option<Arc<str>>,
    status: Option<u16>,
    upstream_time: Option<std::time::Duration>,
}

/// A log record in the making: what is known when the request arrives, completed when the
/// response has been sent.
struct PendingLog {
    record: LogRecord,
    served: Served,
    started: Instant,
    /// The response head as sent, roughly: status line and headers.
    head_bytes: u64,
}

impl PendingLog {
    fn finish(self, body_bytes: u64) -> LogRecord {
        let mut r = self.record;
        r.node = self.served.node.as_deref().unwrap_or("").to_string();
        r.upstream_time = self.served.upstream_time;
        r.upstream_status = self.served.status;
        r.request_time = self.started.elapsed();
        r.response_bytes = self.head_bytes + body_bytes;
        r
    }
}

fn log_record(route: &RouteRt, parts: &http::request::Parts, conn: &ConnInfo) -> PendingLog {
    let headers: u64 = parts.headers.iter().map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64).sum();
    let body = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let uri = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    PendingLog {
        record: LogRecord {
            route_id: route.id.clone(),
            route_name: route.name.clone(),
            service_id: route.service_id.clone(),
            matched_uri: route.matched_uri.clone(),
            matched_host: route.matched_host.clone(),
            method: parts.method.as_str().to_owned(),
            uri: uri.to_owned(),
            host: parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_owned(),
            client_ip: ip_text(conn.remote.ip()),
            request_bytes: parts.method.as_str().len() as u64 + uri.len() as u64 + 12 + headers + 2 + body,
            started: Some(std::time::SystemTime::now()),
            // Completed when the response is done (`PendingLog::finish`). Spelled out rather
            // than taken from a default record, whose shared strings would be made and dropped.
            consumer: None,
            node: String::new(),
            status: 0,
            upstream_status: None,
            request_time: std::time::Duration::ZERO,
            upstream_time: None,
            response_bytes: 0,
        },
        served: Served::default(),
        started: Instant::now(),
        head_bytes: 0,
    }
}

fn request_vars<'a>(parts: &'a http::request::Parts, host: Option<&'a str>, conn: &ConnInfo) -> RequestVars<'a> {
    RequestVars {
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
        host,
        remote: conn.remote,
        local: conn.local,
        scheme: conn.scheme,
    }
}

/// A plugin's answer as a response: a JSON body (or a string as it is), or, without one, the
/// status in the gateway's usual JSON shape.
fn plugin_reply(status: u16, body: Option<serde_json::Value>) -> Response<RespBody> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (body, json) = match body {
        Some(serde_json::Value::String(s)) => (Bytes::from(s), false),
        Some(v) => (Bytes::from(v.to_string()), true),
        None => {
            let text = format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or(""));
            (Bytes::from(serde_json::json!({ "error_msg": text.trim_end() }).to_string()), true)
        }
    };
    let mut resp = Response::new(RespBody::full(body));
    *resp.status_mut() = status;
    if json {
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    resp
}

fn with_headers(mut resp: Response<RespBody>, headers: Vec<(HeaderName, HeaderValue)>) -> Response<RespBody> {
    for (k, v) in headers {
        resp.headers_mut().insert(k, v);
    }
    resp
}

/// The `chash` key of a request, hashed. Without a value (the variable is not set, or no
/// consumer was identified) the client address stands in, as in APISIX.
fn hash_key(on: &HashOn, vars: &RequestVars<'_>, consumer: Option<&str>) -> u32 {
    let key = match on {
        HashOn::Var(name) => vars.get(name),
        HashOn::Combination(text) => interpolate(text, |name| vars.get(name)).map(Cow::Owned),
        HashOn::Consumer => consumer.map(Cow::Borrowed),
    };
    match key {
        Some(k) => hash32(k.as_bytes()),
        None => hash32(ip_text(vars.remote.ip()).as_bytes()),
    }
}

/// Sends to a node of `upstream`, moving to another node when one cannot be connected to, or
/// (for an idempotent request without a body) when the connection breaks or the node answers
/// 502, 503 or 504.
async fn forward(
    upstream: &UpstreamRt,
    timeouts: Timeouts,
    hash: u32,
    req: Request<ReqBody>,
    hop: &Hop,
    mut upgrade: Option<OnUpgrade>,
    mut served: Option<&mut Served>,
) -> Response<RespBody> {
    // Only read the clock when a retry budget needs it.
    let started = upstream.retry_timeout.map(|_| Instant::now());
    let resend = is_idempotent(req.method()) && req.body().is_end_stream();
    let mut attempts_left = upstream.retries;
    let mut tried: Vec<usize> = Vec::new();
    let mut req = Some(req);
    loop {
        let Some(i) = upstream.balancer.pick(&upstream.nodes, upstream.checked, hash, &tried) else {
            return failure(ErrorKind::Upstream, Side::Gateway);
        };
        let node = &upstream.nodes[i];
        let in_flight = upstream.balancer.tracks_load().then(|| (InFlight::start(&node.load), Instant::now()));
        let within_budget = || match (upstream.retry_timeout, started) {
            (Some(t), Some(s)) => s.elapsed() < t,
            _ => true,
        };
        let mut this = req.take().expect("a request for each attempt");
        // Keep a copy only when a response status could send this request to another node.
        if resend && attempts_left > 0 {
            req = Some(copy_bodiless(&this));
        }
        // An HTTP/1.0 client may send no Host at all; the request goes on as HTTP/1.1, which
        // needs one: the node's, as pass_host "node" would give it.
        if upstream.pass_host == PassHost::Node || !this.headers().contains_key(header::HOST) {
            this.headers_mut().insert(header::HOST, node.host_header.clone());
        }
        if upstream.transport.h2 {
            for_h2(&mut this, upstream.transport.tls.is_some());
        }
        let sent_at = served.is_some().then(Instant::now);
        match send(node, upstream, &timeouts, this, hop).await {
            Ok((resp, lease)) => {
                let status = resp.status().as_u16();
                if let (Some(s), Some(at)) = (served.as_deref_mut(), sent_at) {
                    s.node = Some(node.authority.clone());
                    s.status = Some(status);
                    s.upstream_time = Some(at.elapsed());
                }
                if let Some((_, sent)) = &in_flight {
                    node.load.observe(sent.elapsed().as_secs_f64());
                }
                if let Some(p) = &upstream.passive {
                    p.status(&node.authority, &node.health, status);
                }
                if matches!(status, 502..=504) && req.is_some() && attempts_left > 0 && within_budget() {
                    tracing::debug!(node = %node.authority, status, "retrying on another node");
                    attempts_left -= 1;
                    tried.push(i);
                    continue;
                }
                let resp = if status == 101
                    && let Some(client) = upgrade.take()
                {
                    match tunnel(resp, client, timeouts.read) {
                        Ok(resp) => return resp,
                        Err(resp) => resp,
                    }
                } else {
                    resp
                };
                let (mut parts, body) = resp.into_parts();
                if let Received::H2(_) = body {
                    // HTTP/1.1 answers lose their connection-scoped fields as they are parsed.
                    hop::strip_hop_by_hop(&mut parts.headers);
                }
                // The client's connection speaks its own version, whatever the upstream spoke.
                parts.version = http::Version::HTTP_11;
                let guard = in_flight.map(|(g, _)| g);
                return Response::from_parts(parts, RespBody::upstream(body, timeouts.read, lease, guard));
            }
            Err(SendError::Client(e)) => {
                tracing::debug!(error = %e, "client request body failed");
                return failure(SendError::Client(e).kind(), Side::Client);
            }
            Err(e) => {
                let kind = e.kind();
                if let Some(p) = &upstream.passive {
                    let outcome = if kind == ErrorKind::Timeout { Outcome::Timeout } else { Outcome::TcpFailure };
                    p.failure(&node.authority, &node.health, outcome);
                }
                // A request that never left comes back for another node. One that left goes
                // again only when the node failed under it (a node going down, or a keep-alive
                // connection it closed as we wrote) and a bodiless idempotent copy was kept;
                // a node that was merely slow is not sent the request twice.
                let again = match e {
                    SendError::Connect(back, e) => {
                        tracing::warn!(error = %e, "upstream connect failed");
                        Some(*back)
                    }
                    e => {
                        match &e {
                            SendError::Upstream(cause) => tracing::warn!(node = %node.authority, error = %cause, "upstream request failed"),
                            _ => tracing::warn!(node = %node.authority, "upstream timed out"),
                        }
                        if kind == ErrorKind::Upstream { req.take() } else { None }
                    }
                };
                if let Some(again) = again
                    && attempts_left > 0
                    && within_budget()
                {
                    attempts_left -= 1;
                    tried.push(i);
                    req = Some(again);
                    continue;
                }
                return failure(kind, Side::Gateway);
            }
        }
    }
}

/// The protocol a client asks to switch to, when this is a WebSocket handshake.
fn websocket_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let protocol = headers.get(header::UPGRADE)?;
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    (wants && protocol.as_bytes().eq_ignore_ascii_case(b"websocket")).then(|| protocol.clone())
}

/// The upstream agreed to switch protocols: answer the client with its 101 and join the two
/// connections (`tunnel::spawn`), ended after `idle` of silence both ways. Only an HTTP/1.1
/// node can switch; any other response comes back as it was.
fn tunnel(resp: Response<Received>, client: OnUpgrade, idle: std::time::Duration) -> Result<Response<RespBody>, Response<Received>> {
    let (mut parts, body) = resp.into_parts();
    let Received::H1(body) = body else { return Err(Response::from_parts(parts, body)) };
    let Some((upstream, early)) = body.upgraded() else {
        return Ok(failure(ErrorKind::Upstream, Side::Gateway));
    };
    crate::tunnel::spawn(client, upstream, early, idle);
    parts.version = http::Version::HTTP_11;
    Ok(Response::from_parts(parts, RespBody::empty()))
}

/// HTTP/2 names the host in `:authority` and needs a scheme: the request gets an absolute URI
/// built from its Host header, which it then drops.
fn for_h2(req: &mut Request<ReqBody>, tls: bool) {
    let host = req.headers_mut().remove(header::HOST);
    let authority = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let scheme = if tls { "https" } else { "http" };
    match Uri::builder().scheme(scheme).authority(authority).path_and_query(path).build() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(e) => tracing::debug!(error = %e, "cannot form an HTTP/2 request URI; sending the path only"),
    }
    *req.version_mut() = http::Version::HTTP_2;
}

fn copy_bodiless(req: &Request<ReqBody>) -> Request<ReqBody> {
    let mut copy = Request::new(ReqBody::Empty);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

async fn send(
    node: &NodeRt,
    upstream: &UpstreamRt,
    timeouts: &Timeouts,
    mut req: Request<ReqBody>,
    hop: &Hop,
) -> Result<(Response<Received>, Lease), SendError> {
    loop {
        let Conn { sender, lease } = match pool::checkout(node, upstream.keepalive, upstream.transport.h2) {
            Some(c) => c,
            // Boxed: the connect future is large and rarely needed; keeping it out of line keeps
            // the per-request future small, and hyper moves that future on every request.
            None => match Box::pin(pool::connect(node, &upstream.transport, upstream.keepalive, timeouts.connect)).await {
                Ok(c) => c,
                Err(e) => return Err(SendError::Connect(Box::new(req), e)),
            },
        };
        let reset = || ConnectError::Io(node.authority.to_string(), std::io::ErrorKind::ConnectionReset.into());
        match sender {
            // Each phase is bounded inside the exchange by its own timeout.
            Sender::H1(conn) => match conn.send(req, lease.reused, hop, timeouts).await {
                Ok(resp) => return Ok((resp.map(Received::H1), lease)),
                Err(h1::Failed { error: h1::Error::Timeout, .. }) => return Err(SendError::Timeout),
                Err(h1::Failed { error: h1::Error::RequestBody(e), .. }) => return Err(SendError::Client(e)),
                // A reused connection the node had closed: the next one, or a fresh one.
                Err(h1::Failed { request: Some(back), .. }) if lease.reused => req = back,
                // Nothing reached the node: another node may take it.
                Err(h1::Failed { request: Some(back), error }) => {
                    tracing::debug!(error = %error, "upstream connection failed before the request went out");
                    return Err(SendError::Connect(Box::new(back), reset()));
                }
                Err(h1::Failed { error, .. }) => return Err(SendError::Upstream(Box::new(error))),
            },
            Sender::H2(mut sender) => {
                if sender.ready().await.is_err() {
                    pool::discard_shared(node);
                    if lease.reused {
                        continue;
                    }
                    return Err(SendError::Connect(Box::new(req), reset()));
                }
                // hyper's client streams the body on its own: the response head may wait for
                // the whole body, so the two phases share one bound.
                match deadline::within(timeouts.send + timeouts.read, sender.try_send_request(req)).await {
                    Err(_) => return Err(SendError::Timeout),
                    Ok(Ok(resp)) => return Ok((resp.map(Received::H2), lease)),
                    Ok(Err(mut e)) => match e.take_message() {
                        // The shared connection closed before our request went out.
                        Some(back) if lease.reused => {
                            pool::discard_shared(node);
                            req = back;
                        }
                        _ => return Err(SendError::Upstream(Box::new(e.into_error()))),
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("a.com"), "a.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("Admin.Internal.:8080"), "admin.internal");
        assert_eq!(normalize_host("admin.internal."), "admin.internal");
        assert_eq!(normalize_host("."), ".");
    }

    #[test]
    fn var_combinations() {
        struct Two;
        impl Vars for Two {
            fn get(&self, name: &str) -> Option<Cow<'_, str>> {
                match name {
                    "remote_addr" => Some(Cow::Borrowed("10.0.0.1")),
                    "arg_u" => Some(Cow::Borrowed("ann")),
                    _ => None,
                }
            }
        }
        assert_eq!(interpolate("$remote_addr-$arg_u", |n| Two.get(n)).as_deref(), Some("10.0.0.1-ann"));
        assert_eq!(interpolate("$arg_u$http_missing!", |n| Two.get(n)).as_deref(), Some("ann!"));
        assert_eq!(interpolate("$ and $http_x", |n| Two.get(n)), None, "nothing resolved");
    }
}
