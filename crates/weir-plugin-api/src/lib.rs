//! What a plugin is and how plugins run, apart from any plugin: the [`Plugin`] trait, the
//! request and response contexts, [`Pipeline`]s and the [`Registry`] plugins register with
//! (a [`Factory`] each). A crate that adds a plugin depends on this crate only, and the binary
//! registers its factory with one call.
//!
//! A [`Registry`] knows every plugin: its name, default priority, config schema (served by the
//! Admin API and checked at write time) and how to build an instance from a config. Instances
//! are built when a snapshot is compiled, never per request, and run in priority order, highest
//! first: every plugin's `rewrite`, then every plugin's `access`, then, on the response, every
//! plugin's `header_filter`. A phase may answer the request itself with a [`Reply`].


mod config;
mod consumers;
mod layers;
mod vars;

use std::any::Any;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use http::header::{HeaderName, HeaderValue};
use serde_json::{Value, json};
use weir_core::expr::Expr;
use weir_core::schema::PluginCatalog;

pub use config::{Build, Factory, parse, schema_of};
pub use consumers::{Consumer, Consumers, Credential};
pub use layers::{Layers, Scope};
pub use schemars::{self, JsonSchema};
pub use vars::RequestVars;

/// An answer a plugin gives instead of proxying: a status, an optional JSON body, headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Option<Value>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Reply {
    pub fn new(status: u16, body: Option<Value>) -> Reply {
        Reply { status, body, headers: Vec::new() }
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Reply {
        self.headers.push((name, value));
        self
    }
}

/// Sets the consumer an auth plugin identified, and tells the upstream who it is.
pub fn attach_consumer(ctx: &mut RequestCtx<'_>, consumer: Arc<Consumer>) {
    const X_CONSUMER_USERNAME: HeaderName = HeaderName::from_static("x-consumer-username");
    const X_CREDENTIAL_IDENTIFIER: HeaderName = HeaderName::from_static("x-credential-identifier");
    match &consumer.username_header {
        Some(v) => {
            ctx.parts.headers.insert(X_CONSUMER_USERNAME, v.clone());
        }
        None => {
            ctx.parts.headers.remove(X_CONSUMER_USERNAME);
        }
    }
    match &consumer.credential_header {
        Some(v) => {
            ctx.parts.headers.insert(X_CREDENTIAL_IDENTIFIER, v.clone());
        }
        None => {
            // Never let a client claim an identity the gateway did not establish.
            ctx.parts.headers.remove(X_CREDENTIAL_IDENTIFIER);
        }
    }
    ctx.consumer = Some(consumer);
}

/// The key a rate limiter counts a request under: a variable (`key_type: var`), a template of
/// variables (`var_combination`), or the key itself (`constant`). Without a value, the client
/// address stands in, as in APISIX.
pub fn limit_key(ctx: &RequestCtx<'_>, key: &str, key_type: Option<&str>) -> String {
    let value = match key_type {
        Some("constant") => Some(key.to_string()),
        Some("var_combination") => weir_core::text::interpolate(key, |name| ctx.var(name)),
        _ => ctx.var(key),
    };
    value.unwrap_or_else(|| weir_core::text::ip_text(ctx.remote_ip()))
}

/// A plugin's `401 {"message": …}`, as APISIX's auth plugins answer.
pub fn unauthorized(message: &str) -> Reply {
    Reply::new(401, Some(json!({ "message": message })))
}

/// What a plugin sees of one request.
pub struct RequestCtx<'a> {
    pub parts: &'a mut http::request::Parts,
    pub remote: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    pub scheme: &'static str,
    pub route_id: &'a str,
    pub consumers: &'a Consumers,
    /// Set by the auth plugin that identified the caller.
    pub consumer: Option<Arc<Consumer>>,
    /// Added to the response by the pipeline (rate-limit quotas, say).
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    pub notes: Notes,
    /// Set by `traffic-split`: which of the route's alternative upstreams serves the request.
    pub upstream_choice: Option<usize>,
    /// The request body, read when a plugin of the pipeline asked for it.
    pub body: Option<Bytes>,
}

impl<'a> RequestCtx<'a> {
    /// A request's context before any plugin ran: no consumer, no notes, no body read.
    pub fn new(parts: &'a mut http::request::Parts, remote: std::net::SocketAddr, local: std::net::SocketAddr, scheme: &'static str, route_id: &'a str, consumers: &'a Consumers) -> RequestCtx<'a> {
        RequestCtx {
            parts,
            remote,
            local,
            scheme,
            route_id,
            consumers,
            consumer: None,
            response_headers: Vec::new(),
            notes: Notes::default(),
            upstream_choice: None,
            body: None,
        }
    }
}

impl RequestCtx<'_> {
    /// A request variable, as `vars` expressions name them (`remote_addr`, `http_x_id`, …).
    pub fn var(&self, name: &str) -> Option<String> {
        use weir_core::expr::Vars as _;
        let host = self.parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok());
        let vars = RequestVars {
            method: &self.parts.method,
            uri: &self.parts.uri,
            headers: &self.parts.headers,
            host,
            remote: self.remote,
            local: self.local,
            scheme: self.scheme,
        };
        if name == "consumer_name" {
            return self.consumer.as_ref().map(|c| c.username.clone());
        }
        vars.get(name).map(|v| v.into_owned())
    }

    pub fn remote_ip(&self) -> IpAddr {
        self.remote.ip()
    }
}

/// The phases a plugin has work in beyond the request's (`rewrite`, `access`): a pipeline
/// skips the response and log phases when none of its plugins has them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Phases {
    pub response: bool,
    pub log: bool,
    /// The request body is read before the plugins run, and given to them (bounded).
    pub body: bool,
}

/// What plugins see of a response on its way to the client (`header_filter`, and
/// `body_filter` for a plugin that replaces the whole body).
pub struct ResponseCtx<'a> {
    pub parts: &'a mut http::response::Parts,
    /// When set, replaces the body (the upstream's is dropped, `Content-Length` recomputed).
    pub body: &'a mut Option<Bytes>,
    pub route_id: &'a str,
    pub consumer: Option<&'a Consumer>,
    pub notes: &'a mut Notes,
    /// When set, every chunk of the body goes through it (`true` with the last, empty call):
    /// a compressor, say. The body still streams.
    pub transform: &'a mut Option<BodyTransform>,
    /// When the plugins began on the request: the response head is this long after it.
    pub started: std::time::Instant,
}

/// A streaming body rewrite: each chunk in, what to send in its place out.
pub type BodyTransform = Box<dyn FnMut(&[u8], bool) -> Bytes + Send>;

/// What the log phase is told of a request once its response has been sent.
#[derive(Debug, Default, Clone)]
pub struct LogRecord {
    pub route_id: Arc<str>,
    pub route_name: Arc<str>,
    pub service_id: Arc<str>,
    /// The route's `uri` (its first, when it has `uris`) and `host` patterns.
    pub matched_uri: Arc<str>,
    pub matched_host: Arc<str>,
    pub consumer: Option<String>,
    /// The upstream node that answered (`host:port`), empty when none did.
    pub node: String,
    pub status: u16,
    /// What the upstream answered, when one did (before any plugin changed the status).
    pub upstream_status: Option<u16>,
    pub method: String,
    /// The request URI as the client sent it.
    pub uri: String,
    pub host: String,
    pub client_ip: String,
    /// From the request's arrival to the end of the response.
    pub request_time: Duration,
    /// From sending upstream to the upstream's response head.
    pub upstream_time: Option<Duration>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub started: Option<SystemTime>,
}

/// Per-request values a plugin leaves for its own later phases (by plugin name).
#[derive(Default)]
pub struct Notes(Vec<(&'static str, Box<dyn Any + Send>)>);

impl Notes {
    pub fn put<T: Any + Send>(&mut self, plugin: &'static str, value: T) {
        self.0.retain(|(p, _)| *p != plugin);
        self.0.push((plugin, Box::new(value)));
    }

    /// Keeps `value` until the request is done (a guard whose drop releases something).
    pub fn hold<T: Any + Send>(&mut self, value: T) {
        self.0.push(("", Box::new(value)));
    }

    pub fn get<T: Any>(&self, plugin: &'static str) -> Option<&T> {
        self.0.iter().find(|(p, _)| *p == plugin).and_then(|(_, v)| v.downcast_ref())
    }
}

/// What an access check that waits on I/O ends with: headers for the response, or a reply.
pub type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<(HeaderName, HeaderValue)>, Reply>> + Send>>;

/// One plugin instance, configured. Phases do nothing unless a plugin has work there.
pub trait Plugin: Send + Sync {
    /// Which phases beyond the request's this plugin uses.
    fn phases(&self) -> Phases {
        Phases::default()
    }

    fn rewrite(&self, _ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        Ok(())
    }

    fn access(&self, _ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        Ok(())
    }

    /// Whether the plugin has work in the access phase (`access` or `access_io`). One that
    /// has none says so, and the phase passes it by.
    fn has_access(&self) -> bool {
        true
    }

    /// A rewrite that waits (a delay injected on purpose): as `access_io`, for the rewrite
    /// phase.
    fn rewrite_io(&self, _ctx: &mut RequestCtx<'_>) -> Option<Pending> {
        None
    }

    /// An access check that waits on I/O (a counter shared in Redis): the plugin reads what it
    /// needs from the request and returns the wait, which runs in place of `access`. The
    /// headers it yields are added to the response.
    fn access_io(&self, _ctx: &mut RequestCtx<'_>) -> Option<Pending> {
        None
    }

    /// The response head (and, through `ctx.body`, a replacement body).
    fn header_filter(&self, _ctx: &mut ResponseCtx<'_>) {}

    /// The request is done: its response has been sent (or the client went away).
    fn log(&self, _record: &LogRecord, _notes: &Notes) {}
}

/// A configured plugin in a route's pipeline, with what `_meta` says about it.
pub struct Instance {
    pub name: &'static str,
    pub priority: i64,
    pub plugin: Arc<dyn Plugin>,
    /// `_meta.filter`: the plugin runs only for requests this holds for.
    pub filter: Option<Arc<Expr>>,
    /// `_meta.error_response`: replaces the body of any reply the plugin gives.
    pub error_response: Option<Value>,
}

/// The most plugins one pipeline holds: which of them a request ran is one bit each.
pub const MAX_PLUGINS: usize = 64;

/// A compiled pipeline: instances highest priority first, and the phases any of them has.
#[derive(Default)]
pub struct Pipeline {
    pub instances: Vec<Instance>,
    pub phases: Phases,
    /// The instances with work in the access phase, one bit each.
    access: Ran,
}

impl Pipeline {
    fn new(mut instances: Vec<Instance>) -> Result<Pipeline, String> {
        if instances.len() > MAX_PLUGINS {
            return Err(format!("more than {MAX_PLUGINS} plugins in one pipeline"));
        }
        instances.sort_by_key(|i| std::cmp::Reverse(i.priority));
        let mut phases = Phases::default();
        for i in &instances {
            let p = i.plugin.phases();
            phases.response |= p.response;
            phases.log |= p.log;
            phases.body |= p.body;
        }
        let access = Ran(instances.iter().enumerate().filter(|(_, i)| i.plugin.has_access()).fold(0, |bits, (n, _)| bits | 1 << n));
        Ok(Pipeline { instances, phases, access })
    }

    /// Joins pipelines (the global rules') into one, in priority order.
    pub fn join(parts: Vec<Pipeline>) -> Result<Pipeline, String> {
        Pipeline::new(parts.into_iter().flat_map(|p| p.instances).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }
}

/// Which instances of a pipeline a request ran (their `_meta.filter` held), one bit each.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Ran(u64);

impl Ran {
    fn has(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }
}

/// Opens the sealed fields of a plugin config read from the store: `Ok(None)` when nothing in
/// it is sealed.
pub type SecretOpener = Arc<dyn Fn(&Value) -> Result<Option<Value>, String> + Send + Sync>;

/// Every plugin Weir has, and the process's `plugin_attr` settings for them.
pub struct Registry {
    factories: Vec<Factory>,
    attrs: HashMap<String, Value>,
    /// Set by the data plane: configs reach builders and credentials in the clear.
    secrets: Option<SecretOpener>,
}

impl Registry {
    /// A registry of `factories` (sorted by name here).
    pub fn new(mut factories: Vec<Factory>) -> Registry {
        factories.sort_by_key(|f| f.name);
        Registry { factories, attrs: HashMap::new(), secrets: None }
    }

    /// Adds a plugin; one of the same name is replaced.
    pub fn register(&mut self, factory: Factory) {
        self.factories.retain(|f| f.name != factory.name);
        let at = self.factories.partition_point(|f| f.name < factory.name);
        self.factories.insert(at, factory);
    }

    fn factory(&self, name: &str) -> Option<&Factory> {
        self.factories.iter().find(|f| f.name == name)
    }

    /// Sets a plugin's process-wide settings (`plugin_attr.{name}`): they reach its builder
    /// as the config's `_attr`.
    pub fn with_attr(mut self, name: &str, attr: Value) -> Registry {
        self.attrs.insert(name.to_string(), attr);
        self
    }

    /// Opens sealed fields (APISIX's `encrypt_fields`, sealed at rest by the Admin API) before
    /// a config is built or a credential prepared.
    pub fn with_secrets(mut self, open: SecretOpener) -> Registry {
        self.secrets = Some(open);
        self
    }

    fn opened<'a>(&self, conf: &'a Value) -> Result<std::borrow::Cow<'a, Value>, String> {
        match self.secrets.as_ref().map(|open| open(conf)).transpose()?.flatten() {
            Some(plain) => Ok(std::borrow::Cow::Owned(plain)),
            None => Ok(std::borrow::Cow::Borrowed(conf)),
        }
    }

    /// Whether `name` is an auth plugin (its consumer config is a credential).
    pub fn is_auth(&self, name: &str) -> bool {
        self.factory(name).is_some_and(|f| f.credential.is_some())
    }

    /// The pipeline for a merged `plugins` object, highest priority first. Disabled plugins are
    /// left out; a plugin whose config cannot be built is an error naming it.
    /// A plugin's `plugin_metadata`, if any, reaches its builder as the config's `_metadata`.
    pub fn pipeline(
        &self,
        plugins: &serde_json::Map<String, Value>,
        scope: &str,
        metadata: &std::collections::BTreeMap<String, Value>,
        cache: &mut InstanceCache,
    ) -> Result<Pipeline, String> {
        let mut out = Vec::new();
        for (name, conf) in plugins {
            let Some(f) = self.factory(name) else { return Err(format!("unknown plugin [{name}]")) };
            let meta: config::Meta = match conf.get("_meta") {
                Some(m) => config::parse(m).map_err(|e| format!("plugin {name}: _meta: {e}"))?,
                None => config::Meta::default(),
            };
            if meta.disable == Some(true) {
                continue;
            }
            // One compile of a filter per build and text: the same filter on many routes (an
            // environment's layer on each of its functions' routes) shares its expressions.
            let filter = match &meta.filter {
                Some(f) => {
                    let text = Value::Array(f.clone()).to_string();
                    let expr = match cache.next_filters.get(&text).cloned().or_else(|| cache.previous_filters.remove(&text)) {
                        Some(e) => e,
                        None => Arc::new(Expr::compile(&Value::Array(f.clone())).map_err(|e| format!("plugin {name}: _meta.filter: {e}"))?),
                    };
                    cache.next_filters.insert(text, expr.clone());
                    Some(expr)
                }
                None => None,
            };
            let mut plain = self.opened(conf).map_err(|e| format!("plugin {name}: {e}"))?.into_owned();
            if let Some(o) = plain.as_object_mut() {
                o.remove("_meta");
            }
            let b = Build { scope, metadata: metadata.get(f.name), attr: self.attrs.get(f.name) };
            // A `group` makes every route naming it share one instance (and its state).
            let scope = match plain.get("group").and_then(Value::as_str) {
                Some(g) => format!("group:{g}"),
                None => scope.to_string(),
            };
            // The instance depends on its config, its plugin's metadata and the process's
            // settings for it: a change to any of them builds a new one.
            let mut text = plain.to_string();
            for extra in [b.metadata, b.attr].into_iter().flatten() {
                text.push('\0');
                text.push_str(&extra.to_string());
            }
            let key = (scope, f.name, text);
            let plugin = match cache.next.get(&key).cloned().or_else(|| cache.previous.remove(&key)) {
                Some(p) => p,
                None => (f.build)(&plain, &Build { scope: &key.0, ..b }).map_err(|e| format!("plugin {name}: {e}"))?,
            };
            cache.next.insert(key, plugin.clone());
            out.push(Instance {
                name: f.name,
                priority: meta.priority.unwrap_or(f.priority),
                plugin,
                filter,
                error_response: meta.error_response.map(config::ErrorResponse::into_value),
            });
        }
        Pipeline::new(out)
    }
}

/// Plugin instances kept across snapshot builds: an instance whose scope and config are
/// unchanged keeps its state (counters, say).
#[derive(Default)]
pub struct InstanceCache {
    previous: HashMap<(String, &'static str, String), Arc<dyn Plugin>>,
    next: HashMap<(String, &'static str, String), Arc<dyn Plugin>>,
    /// Compiled `_meta.filter`s by their text, kept as instances are.
    previous_filters: HashMap<String, Arc<Expr>>,
    next_filters: HashMap<String, Arc<Expr>>,
}

impl InstanceCache {
    /// Ends a build: what it used is kept for the next; the rest is dropped.
    pub fn finish(&mut self) {
        self.previous = std::mem::take(&mut self.next);
        self.previous_filters = std::mem::take(&mut self.next_filters);
    }

    /// Drops the instances kept for the scopes `stale` names (a consumer compiled again) that
    /// the update under way did not use: that scope holds none of them any more.
    pub fn forget(&mut self, stale: impl Fn(&str) -> bool) {
        self.previous.retain(|(scope, _, _), _| !stale(scope));
    }

    /// Whether a plugins object holds what its instances may share beyond their scope: a
    /// plugin's `group` (one instance for every holder naming it) or a `_meta.filter` (one
    /// compile per text).
    pub fn shares(plugins: &serde_json::Map<String, Value>) -> bool {
        plugins.values().any(|conf| conf.get("group").is_some() || conf.pointer("/_meta/filter").is_some())
    }

    /// Ends an update that compiled only some routes: what it used joins what was kept.
    pub fn merge(&mut self) {
        let next = std::mem::take(&mut self.next);
        self.previous.extend(next);
        let next = std::mem::take(&mut self.next_filters);
        self.previous_filters.extend(next);
    }
}

impl PluginCatalog for Registry {
    fn config_schema(&self, name: &str) -> Option<&Value> {
        self.factory(name).map(|f| &f.schema)
    }

    fn consumer_schema(&self, name: &str) -> Option<&Value> {
        self.factory(name).and_then(|f| f.consumer_schema.as_ref())
    }

    fn names(&self) -> Vec<&str> {
        self.factories.iter().map(|f| f.name).collect()
    }

    fn meta_schema(&self) -> Value {
        schema_of::<config::Meta>()
    }

    fn check_config(&self, name: &str, conf: &Value) -> Result<(), String> {
        match self.factory(name) {
            Some(f) => (f.build)(conf, &Build { scope: config::CHECK, metadata: None, attr: None }).map(drop),
            None => Err(format!("unknown plugin [{name}]")),
        }
    }

    fn check_consumer_config(&self, name: &str, conf: &Value) -> Result<(), String> {
        match self.factory(name).and_then(|f| f.credential.as_ref()) {
            Some(prepare) => prepare(conf).map(drop),
            None => Ok(()),
        }
    }
}

/// Runs the request phases of `pipeline`: every `rewrite`, then every `access`. Stops at the
/// first reply. Either way, says which plugins ran, for the later phases.
pub async fn run_request(pipeline: &Pipeline, ctx: &mut RequestCtx<'_>) -> (Ran, Result<(), Reply>) {
    let ran = filters(pipeline, ctx);
    let mut outcome = run_phase(&[(pipeline, ran)], Phase::Rewrite, ctx).await;
    if outcome.is_ok() {
        outcome = run_phase(&[(pipeline, ran)], Phase::Access, ctx).await;
    }
    (ran, outcome)
}

/// Decides `_meta.filter` for each plugin of `pipeline`: which of them run for this request.
/// Decided once, before the plugins change the request.
pub fn filters(pipeline: &Pipeline, ctx: &RequestCtx<'_>) -> Ran {
    let mut ran = Ran(0);
    for (n, i) in pipeline.instances.iter().enumerate() {
        if i.filter.as_ref().is_none_or(|f| f.eval(&FilterVars(ctx))) {
            ran.0 |= 1 << n;
        }
    }
    ran
}

impl Ran {
    /// Leaves out the plugins `overridden` names (a consumer brings its own config of them).
    pub fn without(self, pipeline: &Pipeline, overridden: &Pipeline) -> Ran {
        let mut bits = self.0;
        for (n, i) in pipeline.instances.iter().enumerate() {
            if overridden.instances.iter().any(|o| o.name == i.name) {
                bits &= !(1 << n);
            }
        }
        Ran(bits)
    }
}

/// Runs one request phase of the plugins each `(pipeline, ran)` marks, in priority order across
/// all of them. Stops at the first reply.
pub async fn run_phase(parts: &[(&Pipeline, Ran)], phase: Phase, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
    if let [(pipeline, ran)] = parts {
        let ran = due(pipeline, *ran, phase);
        // One pipeline is already in order: no list to make.
        for (n, i) in pipeline.instances.iter().enumerate() {
            if ran.has(n) {
                run_one(i, phase, ctx).await?;
            }
        }
        return Ok(());
    }
    if let [(a, ran_a), (b, ran_b)] = parts {
        let (ran_a, ran_b) = (due(a, *ran_a, phase), due(b, *ran_b, phase));
        // Two pipelines (a route's and its consumer's), each in order: merged as they run, the
        // first one's plugin going first among equal priorities, as a stable sort would.
        let (xs, ys) = (&a.instances, &b.instances);
        let (mut i, mut j) = (0, 0);
        loop {
            while i < xs.len() && !ran_a.has(i) {
                i += 1;
            }
            while j < ys.len() && !ran_b.has(j) {
                j += 1;
            }
            let next = match (xs.get(i), ys.get(j)) {
                (Some(x), Some(y)) if y.priority > x.priority => {
                    j += 1;
                    y
                }
                (Some(x), _) => {
                    i += 1;
                    x
                }
                (None, Some(y)) => {
                    j += 1;
                    y
                }
                (None, None) => return Ok(()),
            };
            run_one(next, phase, ctx).await?;
        }
    }
    let mut order: Vec<&Instance> = Vec::new();
    for (pipeline, ran) in parts {
        let ran = due(pipeline, *ran, phase);
        order.extend(pipeline.instances.iter().enumerate().filter(|(n, _)| ran.has(*n)).map(|(_, i)| i));
    }
    order.sort_by_key(|i| std::cmp::Reverse(i.priority));
    for i in order {
        run_one(i, phase, ctx).await?;
    }
    Ok(())
}

/// The instances of `pipeline` marked in `ran` that have work in `phase`: in the access
/// phase, plugins without any are passed by.
fn due(pipeline: &Pipeline, ran: Ran, phase: Phase) -> Ran {
    match phase {
        Phase::Access => Ran(ran.0 & pipeline.access.0),
        Phase::Rewrite => ran,
    }
}

/// One plugin's request phase, its panics caught and its reply given `_meta.error_response`.
async fn run_one(i: &Instance, phase: Phase, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
    use futures_util::FutureExt as _;
    {
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match phase {
            Phase::Rewrite => match i.plugin.rewrite_io(ctx) {
                Some(wait) => Step::Wait(wait),
                None => Step::Done(i.plugin.rewrite(ctx)),
            },
            Phase::Access => match i.plugin.access_io(ctx) {
                Some(wait) => Step::Wait(wait),
                None => Step::Done(i.plugin.access(ctx)),
            },
        }));
        let result = match step {
            Ok(Step::Done(r)) => Ok(r),
            Ok(Step::Wait(wait)) => std::panic::AssertUnwindSafe(wait)
                .catch_unwind()
                .await
                .map(|r| r.map(|headers| ctx.response_headers.extend(headers))),
            Err(panic) => Err(panic),
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(mut reply)) => {
                if let Some(custom) = &i.error_response {
                    reply.body = Some(custom.clone());
                }
                return Err(reply);
            }
            Err(_) => {
                tracing::error!(plugin = i.name, route = ctx.route_id, "plugin panicked; the request fails with 500");
                return Err(Reply::new(500, None));
            }
        }
    }
    Ok(())
}

enum Step {
    Done(Result<(), Reply>),
    Wait(Pending),
}

/// Runs `header_filter` of the plugins that ran on the request. A panic is logged and the
/// response goes on as the other plugins leave it.
pub fn run_response(pipeline: &Pipeline, ran: Ran, ctx: &mut ResponseCtx<'_>) {
    if !pipeline.phases.response {
        return;
    }
    for (n, i) in pipeline.instances.iter().enumerate() {
        if ran.has(n) && i.plugin.phases().response {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| i.plugin.header_filter(ctx)));
            if result.is_err() {
                tracing::error!(plugin = i.name, route = ctx.route_id, "plugin panicked in header_filter");
            }
        }
    }
}

/// Runs `log` of the plugins that ran on the request.
pub fn run_log(pipeline: &Pipeline, ran: Ran, record: &LogRecord, notes: &Notes) {
    if !pipeline.phases.log {
        return;
    }
    for (n, i) in pipeline.instances.iter().enumerate() {
        if ran.has(n) && i.plugin.phases().log {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| i.plugin.log(record, notes)));
            if result.is_err() {
                tracing::error!(plugin = i.name, route = %record.route_id, "plugin panicked in log");
            }
        }
    }
}

/// The request phases.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Phase {
    Rewrite,
    Access,
}

pub struct FilterVars<'c, 'a>(pub &'c RequestCtx<'a>);

impl weir_core::expr::Vars for FilterVars<'_, '_> {
    fn get(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        self.0.var(name).map(std::borrow::Cow::Owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Panics;
    impl Plugin for Panics {
        fn access(&self, _ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
            panic!("a plugin bug")
        }
    }

    struct Refuses;
    impl Plugin for Refuses {
        fn rewrite(&self, _ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
            Err(Reply::new(403, Some(json!({"message": "no"}))))
        }
    }

    fn instance(plugin: Arc<dyn Plugin>, error_response: Option<Value>) -> Instance {
        Instance { name: "test", priority: 0, plugin, filter: None, error_response }
    }

    fn run(pipeline: Vec<Instance>) -> Result<(), Reply> {
        let (mut parts, ()) = http::Request::new(()).into_parts();
        let consumers = Consumers::default();
        let mut ctx = RequestCtx::new(&mut parts, "127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap(), "http", "r", &consumers);
        let pipeline = Pipeline::new(pipeline).unwrap();
        let run = run_request(&pipeline, &mut ctx);
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(run).1
    }

    /// Notes its mark in the request's `x-order` header when its access phase runs.
    struct Marks(&'static str);
    impl Plugin for Marks {
        fn access(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
            let before = ctx.parts.headers.get("x-order").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            ctx.parts.headers.insert("x-order", HeaderValue::from_str(&format!("{before}{}", self.0)).unwrap());
            Ok(())
        }
    }

    #[test]
    fn two_pipelines_run_in_priority_order_the_first_going_first_among_equals() {
        let mark = |name: &'static str, priority: i64| Instance { name, priority, plugin: Arc::new(Marks(name)), filter: None, error_response: None };
        let route = Pipeline::new(vec![mark("a", 30), mark("b", 20), mark("c", 10), mark("d", 5)]).unwrap();
        let own = Pipeline::new(vec![mark("x", 40), mark("y", 20), mark("z", 1)]).unwrap();
        let (mut parts, ()) = http::Request::new(()).into_parts();
        let consumers = Consumers::default();
        let mut ctx = RequestCtx::new(&mut parts, "127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap(), "http", "r", &consumers);
        // `c` is filtered out of the route's.
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(run_phase(&[(&route, Ran(0b1011)), (&own, Ran(0b111))], Phase::Access, &mut ctx)).unwrap();
        assert_eq!(ctx.parts.headers["x-order"], "xabydz");
        let mut three = ctx.parts.clone();
        three.headers.remove("x-order");
        let mut ctx = RequestCtx::new(&mut three, "127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap(), "http", "r", &consumers);
        let single = Pipeline::new(vec![mark("m", 25)]).unwrap();
        rt.block_on(run_phase(&[(&route, Ran(0b1111)), (&own, Ran(0b111)), (&single, Ran(1))], Phase::Access, &mut ctx)).unwrap();
        assert_eq!(ctx.parts.headers["x-order"], "xambycdz", "three pipelines: the same order");
    }

    /// Says it has no access phase, whose `access` would fail the request.
    struct RewriteOnly;
    impl Plugin for RewriteOnly {
        fn access(&self, _ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
            Err(Reply::new(500, None))
        }

        fn has_access(&self) -> bool {
            false
        }
    }

    #[test]
    fn the_access_phase_passes_by_plugins_without_one() {
        assert_eq!(run(vec![instance(Arc::new(RewriteOnly), None)]), Ok(()));
        assert_eq!(run(vec![instance(Arc::new(RewriteOnly), None), instance(Arc::new(Panics), None)]), Err(Reply::new(500, None)), "the others still run");
    }

    #[test]
    fn a_panic_is_a_500_and_error_response_replaces_bodies() {
        assert_eq!(run(vec![instance(Arc::new(Panics), None)]), Err(Reply::new(500, None)));
        assert_eq!(run(vec![instance(Arc::new(Refuses), None)]), Err(Reply::new(403, Some(json!({"message": "no"})))));
        let custom = json!({"message": "custom"});
        assert_eq!(run(vec![instance(Arc::new(Refuses), Some(custom.clone()))]), Err(Reply::new(403, Some(custom))));
    }
}
