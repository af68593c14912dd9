//! Compiling a [`ConfigState`] into an immutable [`Snapshot`]: the router with, for every route,
//! everything the proxy needs already resolved (service merged in, upstream built, timeouts
//! decided). The proxy reads only snapshots.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::HeaderValue;
use rustls::ServerConfig;
use weir_core::expr::Expr;
use weir_core::model::{self, Ssl, Timeout, Upstream};
use weir_upstream::reach::{Reach, Tenant};
use weir_http::pool::Transport;
use weir_plugins::{Consumers, InstanceCache, Layers, Pipeline, Registry, Scope};
use weir_tls::{Keyring, SniTable};
use weir_upstream::balancer::Balancer;
use weir_upstream::health::{self, Checker, Passive, Target};
use weir_upstream::{DEFAULT_TIMEOUT, Keepalive, NodeRt, Timeouts};

use crate::handler::Handler;
pub use crate::partition::{Claims, Contributor, Lowered, LoweredRoute};
use crate::router::{RequestFacts, RouteSpec, Router, find_layered};
use crate::state::{Changes, ConfigState, Entry};


pub struct Snapshot {
    pub revision: i64,
    /// The router of the last full build, shared by the snapshots since.
    base: Arc<Router<Arc<RouteRt>>>,
    /// Routes changed since then, laid over `base`.
    delta: Option<Arc<Delta>>,
    /// Upstreams in use that have health checks, by the key of the object that holds them
    /// (`/apisix/upstreams/1`, or the route or service with an inline upstream).
    pub checked: Arc<Vec<(String, Arc<UpstreamRt>)>>,
    /// Server certificates by SNI, for the TLS listeners.
    pub tls: Arc<SniTable>,
    /// Plugins of the global rules, run for every matched request before the route's.
    pub global: Arc<Pipeline>,
    /// Why the global rules cannot be applied, when they cannot: then every matched request
    /// answers 503 rather than run without them.
    pub global_unavailable: Option<Arc<str>>,
    /// Consumers by credential, for the auth plugins.
    pub consumers: Arc<Consumers>,
    /// The partitions, by the hosts they answer: a request for one of these hosts is matched
    /// against its partition's routes first, then against APISIX's.
    parts: Arc<HashMap<Arc<str>, Arc<Part>>>,
}

/// The routes of one partition (one tenant's environment, say), compiled apart from every
/// other partition's and from APISIX's.
pub struct Part {
    router: Router<Arc<RouteRt>>,
}

impl Drop for Part {
    /// A partition's routes (their plugins and handlers) are freed off whichever thread let
    /// the last of it go: the watch loop or a proxy worker (`background`).
    fn drop(&mut self) {
        crate::background::reclaim(std::mem::replace(&mut self.router, Router::new(Vec::new())));
    }
}

/// Work a [`Builder`] has done, counted (for tests and the status page).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildStats {
    /// Full builds: every route and every partition compiled.
    pub full: u64,
    /// Partitions compiled (in full builds and alone).
    pub parts: u64,
    /// Routes compiled, APISIX's and partitions'.
    pub routes: u64,
    /// Consumers compiled (in full builds and alone).
    pub consumers: u64,
}

/// The routes put or deleted since the last full build: their current versions in a router of
/// their own, and their ids, which hide their old versions in the base router.
struct Delta {
    router: Router<Arc<RouteRt>>,
    superseded: std::collections::HashSet<String>,
}

impl Snapshot {
    /// Another handle on the same parts (every field is shared).
    fn shallow_clone(&self) -> Snapshot {
        Snapshot {
            revision: self.revision,
            base: self.base.clone(),
            delta: self.delta.clone(),
            checked: self.checked.clone(),
            tls: self.tls.clone(),
            global: self.global.clone(),
            global_unavailable: self.global_unavailable.clone(),
            consumers: self.consumers.clone(),
            parts: self.parts.clone(),
        }
    }

    pub fn empty() -> Snapshot {
        Snapshot {
            revision: 0,
            base: Arc::new(Router::new(Vec::new())),
            delta: None,
            checked: Arc::default(),
            tls: Arc::default(),
            global: Arc::default(),
            global_unavailable: None,
            consumers: Arc::default(),
            parts: Arc::default(),
        }
    }

    /// The route for a request: its host's partition's, when it has one that matches, else
    /// APISIX's (as one router over every APISIX route would find it).
    pub fn find(&self, req: &RequestFacts<'_>) -> Option<&Arc<RouteRt>> {
        if !self.parts.is_empty()
            && let Some(host) = req.host
            && let Some(part) = self.parts.get(host)
            && let Some(found) = part.router.find(req)
        {
            return Some(found);
        }
        match &self.delta {
            None => self.base.find(req),
            Some(d) => find_layered(
                &self.base,
                &d.router,
                |r| d.superseded.contains(&*r.id),
                |a, b| (a.created, &a.id) < (b.created, &b.id),
                req,
            ),
        }
    }

    /// Health of every checked upstream, in APISIX's `/v1/healthcheck` shape.
    pub fn health_report(&self) -> serde_json::Value {
        self.checked.iter().map(|(name, up)| up.health_report(name)).collect()
    }

    /// One entry of [`Snapshot::health_report`], by the key of the object holding the upstream.
    pub fn health_of(&self, key: &str) -> Option<serde_json::Value> {
        self.checked.iter().find(|(name, _)| name == key).map(|(name, up)| up.health_report(name))
    }
}

pub struct RouteRt {
    pub id: Arc<str>,
    /// Store revision that created the route: older routes win priority ties.
    pub created: i64,
    /// Its plugins (service's, plugin config's and its own, merged), highest priority first.
    pub plugins: Pipeline,
    /// What the log phase reports of it: its service and its `uri` and `host` patterns.
    /// Shared with every log record of the route, not copied into each.
    pub service_id: Arc<str>,
    pub name: Arc<str>,
    pub matched_uri: Arc<str>,
    pub matched_host: Arc<str>,
    /// `None` when the route names no upstream (or a missing one): requests get a 503.
    pub upstream: Option<Arc<UpstreamRt>>,
    /// The upstreams its `traffic-split` may send to, in the plugin's order (`None`: the
    /// route's own upstream, or a missing `upstream_id`).
    pub alternatives: Vec<Option<Arc<UpstreamRt>>>,
    pub timeouts: Timeouts,
    /// `enable_websocket` (the route's, else its service's): upgrades are passed through.
    pub websocket: bool,
    /// The in-process end of the route, when it has one instead of an upstream.
    pub handler: Option<Arc<dyn Handler>>,
    /// Why the route cannot be applied as stored, when it cannot (an object the data plane
    /// cannot read, plugins that cannot run, a missing service or plugin config): it then
    /// answers 503 rather than serve without what it was given.
    pub unavailable: Option<Arc<str>>,
}




#[derive(Clone, Debug, PartialEq)]
pub enum PassHost {
    Pass,
    Node,
    Rewrite(HeaderValue),
}





/// Where a `chash` upstream reads a request's key (`hash_on` with `key`).
#[derive(Clone, Debug, PartialEq)]
pub enum HashOn {
    /// A variable, as in `vars` expressions (`remote_addr`, `uri`, `arg_id`…).
    Var(String),
    /// Text with `$var` references, e.g. `$remote_addr$http_user_agent`.
    Combination(String),
    /// The authenticated consumer's name.
    Consumer,
}

pub struct UpstreamRt {
    pub nodes: Vec<NodeRt>,
    pub balancer: Balancer,
    /// Whether node health decides where traffic goes (the upstream has `checks`).
    pub checked: bool,
    pub passive: Option<Passive>,
    /// For `chash`: where the key comes from.
    pub hash_on: Option<HashOn>,
    /// What the health report calls the checks (`http`, `https`, `tcp`).
    pub check_type: String,
    /// TLS and HTTP/2 towards the nodes, as `scheme` and `tls` say.
    pub transport: Transport,
    pub retries: u32,
    pub retry_timeout: Option<Duration>,
    pub timeouts: Option<Timeouts>,
    pub pass_host: PassHost,
    pub keepalive: Keepalive,
    /// The model it was built from: an unchanged upstream keeps its runtime (and balancer state)
    /// across snapshots.
    model: Upstream,
    /// The `ssls` object `tls.client_cert_id` named, as it was when this was built.
    client_ssl: Option<Ssl>,
    /// Active probes of the nodes; they stop when the runtime is dropped.
    _checker: Option<Checker>,
}


fn timeouts_from(t: &Timeout) -> Timeouts {
    let secs = |s: f64| Duration::try_from_secs_f64(s).unwrap_or(DEFAULT_TIMEOUT);
    Timeouts { connect: secs(t.connect), send: secs(t.send), read: secs(t.read) }
}

impl UpstreamRt {
    fn build(up: &Upstream, client_ssl: Option<Ssl>, keyring: &Keyring, reach: Option<Tenant>) -> UpstreamRt {
        static BUILDS: AtomicU64 = AtomicU64::new(0);
        let default_port = if up.scheme == "https" || up.scheme == "grpcs" { 443 } else { 80 };
        let transport = Transport { reach, ..transport(up, client_ssl.as_ref(), keyring) };
        let build = BUILDS.fetch_add(1, Ordering::Relaxed);
        let nodes: Vec<NodeRt> = up
            .nodes
            .0
            .iter()
            .map(|n| {
                let mut node = NodeRt::new(&n.host, n.port.unwrap_or(default_port), default_port, n.weight, n.priority);
                // A tenant's upstream never shares a pooled connection with another upstream:
                // one dialled for the operator was never checked against where tenants may go.
                if transport.tls.is_some() || transport.h2 || transport.reach.is_some() {
                    node.pool_key = format!("{}://{}#{build}", up.scheme, node.authority).into();
                }
                node
            })
            .collect();
        let pass_host = match up.pass_host.as_str() {
            "node" => PassHost::Node,
            "rewrite" => up
                .upstream_host
                .as_deref()
                .and_then(|h| HeaderValue::from_str(h).ok())
                .map_or(PassHost::Pass, PassHost::Rewrite),
            _ => PassHost::Pass,
        };
        let live = nodes.iter().filter(|n| n.weight > 0).count() as u32;
        let pool = up.keepalive_pool.clone().unwrap_or(model::KeepalivePool {
            size: 320,
            idle_timeout: 60.0,
            requests: 1000,
        });
        let hash_on = (up.lb == "chash").then(|| {
            let key = up.key.clone().unwrap_or_else(|| "remote_addr".into());
            match up.hash_on.as_deref().unwrap_or("vars") {
                "header" => HashOn::Var(format!("http_{key}")),
                "cookie" => HashOn::Var(format!("cookie_{key}")),
                "consumer" => HashOn::Consumer,
                "vars_combinations" => HashOn::Combination(key),
                _ => HashOn::Var(key),
            }
        });
        let checker = up.checks.as_ref().and_then(|c| c.active.as_ref()).and_then(|active| {
            let targets = nodes
                .iter()
                .zip(&up.nodes.0)
                .map(|(n, m)| {
                    let port = active.port.or(m.port).unwrap_or(default_port);
                    Target {
                        authority: format!("{}:{port}", m.host),
                        host: active.host.clone().unwrap_or_else(|| n.host_header.to_str().unwrap_or("localhost").to_string()),
                        health: n.health.clone(),
                        reach: transport.reach.clone(),
                    }
                })
                .collect();
            Checker::start(active, targets)
        });
        UpstreamRt {
            balancer: Balancer::new(&up.lb, &nodes),
            checked: up.checks.is_some(),
            passive: up.checks.as_ref().and_then(|c| c.passive.as_ref()).map(Passive::new),
            check_type: up.checks.as_ref().map(|c| health::check_type(c).to_string()).unwrap_or_default(),
            hash_on,
            transport,
            nodes,
            // APISIX: with no explicit value, try every other node once.
            retries: up.retries.unwrap_or(live.saturating_sub(1)),
            retry_timeout: up.retry_timeout.filter(|t| *t > 0.0).and_then(|t| Duration::try_from_secs_f64(t).ok()),
            timeouts: up.timeout.as_ref().map(timeouts_from),
            pass_host,
            keepalive: Keepalive {
                size: pool.size,
                idle_timeout: Duration::try_from_secs_f64(pool.idle_timeout).unwrap_or(Duration::from_secs(60)),
                requests: pool.requests,
            },
            model: up.clone(),
            client_ssl,
            _checker: checker,
        }
    }
}

impl UpstreamRt {
    fn health_report(&self, name: &str) -> serde_json::Value {
        let nodes: Vec<serde_json::Value> = self
            .nodes
            .iter()
            .map(|n| {
                let (status, counter) = n.health.status();
                let (ip, port) = n.authority.rsplit_once(':').unwrap_or((&n.authority, ""));
                serde_json::json!({
                    "ip": ip.trim_start_matches('[').trim_end_matches(']'),
                    "port": port.parse::<u16>().ok(),
                    "hostname": ip,
                    "status": status,
                    "counter": counter,
                })
            })
            .collect();
        serde_json::json!({"name": name, "type": self.check_type, "nodes": nodes})
    }
}

/// How to reach an upstream's nodes. A TLS config that cannot be built (an unreadable client
/// key, say) is logged, and TLS goes on without a client certificate.
fn transport(up: &Upstream, client_ssl: Option<&Ssl>, keyring: &Keyring) -> Transport {
    let h2 = up.scheme == "grpc" || up.scheme == "grpcs";
    let sni = (up.pass_host == "rewrite").then(|| up.upstream_host.clone()).flatten();
    if up.scheme != "https" && up.scheme != "grpcs" {
        return Transport { tls: None, h2, sni, reach: None };
    }
    let verify = up.tls.as_ref().is_some_and(|t| t.verify);
    let client = match client_ssl {
        Some(ssl) => ssl.cert.as_deref().zip(ssl.key.as_deref()),
        None => up.tls.as_ref().and_then(|t| t.client_cert.as_deref().zip(t.client_key.as_deref())),
    };
    let config = match client.map(|(cert, key)| keyring.open(key).map(|key| (cert, key))) {
        Some(Ok((cert, key))) => weir_tls::client_config(verify, Some((cert, &key)), h2),
        Some(Err(e)) => Err(e.to_string()),
        None => weir_tls::client_config(verify, None, h2),
    };
    let config = config.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "upstream client certificate unusable; connecting without one");
        weir_tls::client_config(verify, None, h2).expect("a config without a client certificate builds")
    });
    Transport { tls: Some(config), h2, sni, reach: None }
}

/// Where an upstream's config lives: inline in a route or service, or an upstream object.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    Route,
    Service,
    Object,
    /// An upstream inline in a route's `traffic-split` (id `{route}/traffic-split/{n}`).
    Split,
}

impl Source {
    fn resource(self) -> &'static str {
        match self {
            Source::Route | Source::Split => "routes",
            Source::Service => "services",
            Source::Object => "upstreams",
        }
    }
}

type UpstreamCache<K> = HashMap<(Source, K), Arc<UpstreamRt>>;

/// The plugins of every global rule, in one pipeline, or why they cannot be applied: a rule
/// that cannot be read or whose plugins cannot run closes the gateway (every matched request
/// answers 503) rather than let requests pass without it.
fn global_pipeline(state: &ConfigState, ctx: &mut Ctx<'_>) -> Result<Pipeline, String> {
    if let Some(id) = state.broken_global_rules.iter().next() {
        return Err(format!("global rule {id} cannot be read"));
    }
    let mut all = Vec::new();
    for (id, rule) in &state.global_rules {
        match ctx.registry.pipeline(&rule.plugins, &format!("global:{id}"), ctx.metadata, ctx.instances) {
            Ok(p) => all.push(p),
            Err(e) => return Err(format!("global rule {id} has plugins that cannot run: {e}")),
        }
    }
    Pipeline::join(all).map_err(|e| format!("global rules cannot run together: {e}"))
}

/// Consumers by the credentials they and their credential objects hold, and the plugins each
/// consumer brings to the routes it calls (its group's, overridden by its own; auth plugins
/// are credentials, not plugins to run).
fn consumers(state: &ConfigState, ctx: &mut Ctx<'_>) -> Consumers {
    let mut out = Consumers::default();
    let mut closed = std::collections::HashSet::new();
    for (username, c) in &state.consumers {
        if !file_consumer(state, ctx, &mut out, username, c) {
            closed.insert(username.as_str());
        }
    }
    for (key, c) in &state.credentials {
        if let Some((username, id)) = key.split_once("/credentials/")
            && !closed.contains(username)
        {
            out.add(ctx.registry, username, Some(id), &c.plugins);
        }
    }
    out
}

/// Files consumer `username` (`c`) in `out`: its plugins, and the credentials it holds itself.
/// A consumer whose plugins cannot be applied is not let in at all (false: neither are its
/// credential objects): it would otherwise pass without the limits its plugins set.
fn file_consumer(state: &ConfigState, ctx: &mut Ctx<'_>, out: &mut Consumers, username: &str, c: &model::PluginHolder) -> bool {
    let group = c.group_id.as_ref().and_then(|g| state.consumer_groups.get(&g.0));
    if let Some(gid) = &c.group_id
        && group.is_none()
    {
        tracing::error!(consumer = %username, group = %gid, "consumer group is missing or cannot be read; the consumer is refused until it is fixed");
        return false;
    }
    let mut merged = Layers::new().with(Scope::ConsumerGroup, group.map(|g| &g.plugins)).with(Scope::Consumer, Some(&c.plugins)).merge();
    merged.retain(|name, _| !ctx.registry.is_auth(name));
    if !merged.is_empty() {
        match ctx.registry.pipeline(&merged, &consumer_scope(username), ctx.metadata, ctx.instances) {
            Ok(p) => out.set_plugins(username, p, InstanceCache::shares(&merged)),
            Err(e) => {
                tracing::error!(consumer = %username, error = %e, "consumer has plugins that cannot run; it is refused until they are fixed");
                return false;
            }
        }
    }
    out.add(ctx.registry, username, None, &c.plugins);
    true
}

/// Files consumer `username` in `out` afresh, as a full build would: itself, then its
/// credential objects in their order (those of a consumer not stored too, as there).
fn file_consumer_again(state: &ConfigState, ctx: &mut Ctx<'_>, out: &mut Consumers, username: &str) {
    if let Some(c) = state.consumers.get(username)
        && !file_consumer(state, ctx, out, username, c)
    {
        return;
    }
    let prefix = format!("{username}/credentials/");
    for (key, c) in state.credentials.range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded)) {
        let Some(id) = key.strip_prefix(&prefix) else { break };
        out.add(ctx.registry, username, Some(id), &c.plugins);
    }
}

/// The scope of the plugin instances consumer `username` brings.
fn consumer_scope(username: &str) -> String {
    format!("consumer:{username}")
}

/// What building an upstream runtime reads besides the upstream itself.
struct Ctx<'a> {
    keyring: &'a Keyring,
    ssls: &'a std::collections::BTreeMap<String, Ssl>,
    registry: &'a Registry,
    instances: &'a mut InstanceCache,
    /// `plugin_metadata` by plugin name: plugin-wide settings every instance is built with.
    metadata: &'a std::collections::BTreeMap<String, serde_json::Value>,
    /// Where tenants' upstreams may connect (`Builder::with_tenant_reach`).
    tenant: Option<Arc<Reach>>,
    /// The route being built is a tenant's: its own upstreams connect within `tenant`.
    reach: Option<Tenant>,
}

fn reuse_or_build<'s>(
    next: &mut UpstreamCache<Cow<'s, str>>,
    previous: &UpstreamCache<String>,
    ctx: &Ctx<'_>,
    source: Source,
    id: Cow<'s, str>,
    up: &Upstream,
) -> Arc<UpstreamRt> {
    if let Some(rt) = next.get(&(source, id.clone())) {
        return rt.clone();
    }
    let client_ssl = up
        .tls
        .as_ref()
        .and_then(|t| t.client_cert_id.as_ref())
        .and_then(|cid| ctx.ssls.get(&cid.0))
        .filter(|ssl| ssl.kind == "client")
        .cloned();
    // A tenant's route's own upstreams connect only where tenants may.
    let reach = matches!(source, Source::Route | Source::Split).then(|| ctx.reach.clone()).flatten();
    let rt = match previous.get(&(source, id.to_string())) {
        Some(old) if old.model == *up && old.client_ssl == client_ssl && old.transport.reach.is_some() == reach.is_some() => old.clone(),
        _ => Arc::new(UpstreamRt::build(up, client_ssl, ctx.keyring, reach)),
    };
    next.insert((source, id), rt.clone());
    rt
}

/// Builds snapshots, keeping upstream runtimes alive across builds when their config is
/// unchanged, and TLS configs until their `ssls` object changes.
pub struct Builder {
    /// The store prefix, for naming upstreams in the health report.
    prefix: String,
    keyring: Arc<Keyring>,
    upstreams: UpstreamCache<String>,
    ssls: HashMap<String, (Ssl, Arc<ServerConfig>)>,
    registry: Arc<Registry>,
    /// Plugin instances, kept while their route and config are unchanged.
    instances: InstanceCache,
    /// What the last full build made, shared by the updates laid over it.
    last: Option<Snapshot>,
    /// The last snapshot made, full or updated.
    published: Option<Snapshot>,
    /// Routes put or deleted since the last full build.
    delta_ids: std::collections::BTreeSet<String>,
    /// Updates laid over the last full build. Each may leave plugin instances its routes no
    /// longer use in the instance cache, which only a full build clears.
    overlays: usize,
    contributors: Vec<Arc<dyn Contributor>>,
    /// Every partition as last compiled, by its key prefix.
    parts: BTreeMap<String, BuiltPart>,
    /// The `plugin_metadata` the partitions were compiled with: a change recompiles them all.
    parts_metadata: BTreeMap<String, serde_json::Value>,
    /// The partitions by host, as snapshots carry them.
    hosts: Arc<HashMap<Arc<str>, Arc<Part>>>,
    stats: BuildStats,
    tenant_reach: Option<Arc<Reach>>,
    /// Partitions changed are compiled off the caller's path ([`Builder::defer_parts`]).
    deferred: bool,
    /// Partitions changed and not yet handed off: in the order they changed (a count), with
    /// the first revision of the store that changed each (none when only their contributor
    /// asked for them to be lowered again).
    dirty: BTreeMap<String, (u64, Option<i64>)>,
    dirtied: u64,
    /// Partitions being compiled off the caller's path, with the first revision their compile
    /// applies, the revision their objects were taken at, and whether the compile is
    /// [`PartCompile::slow`]. No partition is lowered by two threads at once.
    compiling: BTreeMap<String, (Option<i64>, i64, bool)>,
    /// A partition whose last compile took this long is [`PartCompile::slow`] ([`SLOW_COMPILE`]).
    slow_compile: Duration,
}

/// Partitions compiled off the caller's path at once, at most, besides a slow one.
const PARTS_AT_ONCE: usize = 2;

/// [`PartCompile::slow`] partitions compiled at once, at most: two large gateways changing
/// again and again take one slot between them, and leave the others to every other gateway.
const SLOW_AT_ONCE: usize = 1;

/// A partition's compile that took this long or longer makes its next one [`PartCompile::slow`].
pub const SLOW_COMPILE: Duration = Duration::from_millis(5);

/// One partition's compile, handed off the watch path ([`Builder::next_compiles`]): its
/// objects as they were, and what it keeps across compiles.
pub struct PartCompile {
    prefix: String,
    contributor: Arc<dyn Contributor>,
    objects: Vec<(String, bytes::Bytes, i64)>,
    metadata: BTreeMap<String, serde_json::Value>,
    keyring: Arc<Keyring>,
    registry: Arc<Registry>,
    previous: Option<BuiltPart>,
    slow: bool,
}

/// What a [`PartCompile`] made, for [`Builder::install`]: the partition (`None`: it has no
/// objects left), or `Err` when the compile panicked (it keeps serving as it was).
pub struct PartCompiled {
    prefix: String,
    built: Result<Option<BuiltPart>, ()>,
    stats: BuildStats,
}

impl PartCompile {
    /// Whether the partition's last compile took [`SLOW_COMPILE`] or longer: the caller runs
    /// this one at a lower weight (`background`), so that a gateway of many functions or
    /// routes, changing again and again, takes little of a core the proxy workers need.
    pub fn slow(&self) -> bool {
        self.slow
    }

    /// Compiles the partition, on whatever thread may take the time.
    pub fn run(self) -> PartCompiled {
        let mut stats = BuildStats::default();
        let PartCompile { prefix, contributor, objects, metadata, keyring, registry, previous, .. } = self;
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let objects: Vec<(&str, &[u8], i64)> = objects.iter().map(|(k, v, c)| (k.as_str(), &v[..], *c)).collect();
            compile_part(contributor.as_ref(), &prefix, objects, &metadata, (&keyring, &registry), previous, &mut stats)
        }))
        .map_err(|_| tracing::error!(partition = %prefix, "compiling the partition panicked; it keeps serving as last compiled"));
        PartCompiled { prefix, built, stats }
    }
}

struct BuiltPart {
    hosts: Vec<String>,
    /// The earliest create revision of its objects: of two partitions claiming one host, the
    /// older claim keeps it.
    created: i64,
    part: Arc<Part>,
    /// Its upstream runtimes, kept across its compiles while unchanged.
    upstreams: UpstreamCache<String>,
    /// Its plugin instances, kept while their route and config are unchanged, and dropped
    /// with the partition: no partition shares one with another, or with APISIX's routes.
    instances: InstanceCache,
    /// How long its last compile took.
    took: Duration,
}

/// The objects of partition `prefix` in `state`, with their create revisions.
fn part_objects<'s>(contributor: &dyn Contributor, prefix: &str, state: &'s ConfigState) -> impl Iterator<Item = &'s weir_store::KeyValue> {
    state
        .extra
        .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
        .filter(move |(k, _)| contributor.partition(k) == Some(prefix))
        .map(|(_, kv)| kv)
}

/// Compiles one partition from its `objects`: `None` when it has none left. Lookups of
/// APISIX objects (services, upstreams, plugin configs, certificates) find nothing.
fn compile_part(
    contributor: &dyn Contributor,
    prefix: &str,
    objects: Vec<(&str, &[u8], i64)>,
    metadata: &BTreeMap<String, serde_json::Value>,
    tools: (&Keyring, &Registry),
    previous: Option<BuiltPart>,
    stats: &mut BuildStats,
) -> Option<BuiltPart> {
    if objects.is_empty() {
        contributor.gone(prefix);
        return None;
    }
    let started = Instant::now();
    let created = objects.iter().map(|(_, _, c)| *c).min().unwrap_or_default();
    let listed: Vec<(&str, &[u8])> = objects.iter().map(|(k, v, _)| (*k, *v)).collect();
    stats.parts += 1;
    let lowered = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| contributor.lower(prefix, &listed))) {
        Ok(l) => l,
        Err(_) => {
            tracing::error!(partition = %prefix, "lowering the partition panicked; it keeps serving as last compiled");
            return previous;
        }
    };
    let (mut upstreams, mut instances) = previous.map(|p| (p.upstreams, p.instances)).unwrap_or_default();
    // Ids qualified by the partition; earlier routes win priority ties.
    let entries: Vec<(String, Entry<model::Route>, Option<Arc<dyn Handler>>)> = lowered
        .routes
        .into_iter()
        .filter(|r| r.route.status != 0)
        .enumerate()
        .map(|(i, r)| (format!("{prefix}{}", r.id), Entry { created: i as i64, value: r.route, broken: None }, r.handler))
        .collect();
    stats.routes += entries.len() as u64;
    let isolated = ConfigState::default();
    let (keyring, registry) = tools;
    let mut ctx = Ctx { keyring, ssls: &isolated.ssls, registry, instances: &mut instances, metadata, tenant: None, reach: None };
    let mut next: UpstreamCache<Cow<'_, str>> = HashMap::new();
    let specs: Vec<_> = entries
        .iter()
        .filter_map(|(id, entry, handler)| route_spec(&isolated, &mut ctx, &mut next, &upstreams, id, entry, handler.clone()))
        .collect();
    ctx.instances.finish();
    upstreams = next.into_iter().map(|((source, id), rt)| ((source, id.to_string()), rt)).collect();
    Some(BuiltPart { hosts: lowered.hosts, created, part: Arc::new(Part { router: Router::new(specs) }), upstreams, instances, took: started.elapsed() })
}

/// The partitions by host. Of two partitions claiming one host, the older claim (earliest
/// created object, then prefix) keeps it, whichever compiled last.
fn host_index(parts: &BTreeMap<String, BuiltPart>) -> Arc<HashMap<Arc<str>, Arc<Part>>> {
    let mut owners: HashMap<Arc<str>, (i64, &str, &Arc<Part>)> = HashMap::new();
    for (prefix, built) in parts {
        for host in &built.hosts {
            let host: Arc<str> = host.to_ascii_lowercase().into();
            let claim = (built.created, prefix.as_str(), &built.part);
            match owners.get(&host) {
                Some(held) if (held.0, held.1) <= (claim.0, claim.1) => {
                    tracing::warn!(%host, partition = %prefix, held_by = %held.1, "host is claimed by an older partition; not served by this one");
                }
                _ => {
                    owners.insert(host, claim);
                }
            }
        }
    }
    Arc::new(owners.into_iter().map(|(host, (_, _, part))| (host, part.clone())).collect())
}

impl Builder {
    pub fn new(prefix: &str, keyring: Arc<Keyring>, registry: Arc<Registry>) -> Builder {
        Builder {
            prefix: prefix.to_string(),
            keyring,
            registry,
            instances: InstanceCache::default(),
            upstreams: HashMap::new(),
            ssls: HashMap::new(),
            last: None,
            published: None,
            delta_ids: Default::default(),
            overlays: 0,
            contributors: Vec::new(),
            parts: BTreeMap::new(),
            parts_metadata: BTreeMap::new(),
            hosts: Arc::default(),
            stats: BuildStats::default(),
            tenant_reach: None,
            deferred: false,
            dirty: BTreeMap::new(),
            dirtied: 0,
            compiling: BTreeMap::new(),
            slow_compile: SLOW_COMPILE,
        }
    }

    /// Marks partition `prefix` changed, by the store at `since` (none: only asked to be
    /// lowered again); it keeps its place in line and the first revision that changed it.
    fn mark_dirty(&mut self, prefix: &str, since: Option<i64>) {
        self.dirtied += 1;
        let (_, first) = self.dirty.entry(prefix.to_string()).or_insert((self.dirtied, None));
        *first = match (*first, since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// From now on an update does not compile the partitions it changes: they wait for
    /// [`Builder::next_compiles`] to hand them off, and go live at [`Builder::install`], so a
    /// gateway whose partition takes long to compile holds up no other gateway's changes.
    /// A build of everything still compiles every partition in place.
    pub fn defer_parts(&mut self) {
        self.deferred = true;
    }

    /// The compiles of changed partitions to start now: each partition has one under way at
    /// most (a change meanwhile waits for it), and [`PARTS_AT_ONCE`] are under way at most,
    /// and [`SLOW_AT_ONCE`] slow ones besides.
    pub fn next_compiles(&mut self, state: &ConfigState) -> Vec<PartCompile> {
        let mut out = Vec::new();
        // The longest waiting first.
        let mut waiting: Vec<(u64, &String)> = self.dirty.iter().filter(|(p, _)| !self.compiling.contains_key(*p)).map(|(p, (at, _))| (*at, p)).collect();
        waiting.sort_unstable();
        let slow_now = self.compiling.values().filter(|(_, _, slow)| *slow).count();
        let mut free = (PARTS_AT_ONCE.saturating_sub(self.compiling.len() - slow_now), SLOW_AT_ONCE.saturating_sub(slow_now));
        let mut ready: Vec<String> = Vec::new();
        for (_, prefix) in waiting {
            let slot = match self.parts.get(prefix).is_some_and(|p| p.took >= self.slow_compile) {
                true => &mut free.1,
                false => &mut free.0,
            };
            if *slot > 0 {
                *slot -= 1;
                ready.push(prefix.clone());
            }
        }
        let claims = self.claims();
        for prefix in ready {
            let Some((_, since)) = self.dirty.remove(&prefix) else { continue };
            let Some((_, contributor)) = claims.partition(&prefix) else { continue };
            let contributor = contributor.clone();
            let objects = part_objects(contributor.as_ref(), &prefix, state).map(|kv| (kv.key.clone(), kv.value.clone(), kv.create_revision)).collect();
            // It keeps serving as it is meanwhile; its compile takes what it keeps across
            // compiles (and gives it back however it ends).
            let previous = self.parts.get_mut(&prefix).map(|p| BuiltPart {
                hosts: p.hosts.clone(),
                created: p.created,
                part: p.part.clone(),
                upstreams: std::mem::take(&mut p.upstreams),
                instances: std::mem::take(&mut p.instances),
                took: p.took,
            });
            let slow = previous.as_ref().is_some_and(|p| p.took >= self.slow_compile);
            self.compiling.insert(prefix.clone(), (since, state.revision, slow));
            out.push(PartCompile {
                prefix,
                contributor,
                objects,
                metadata: state.plugin_metadata.clone(),
                keyring: self.keyring.clone(),
                registry: self.registry.clone(),
                previous,
                slow,
            });
        }
        out
    }

    /// Puts a partition compiled off the caller's path in place: the snapshot that serves it
    /// (`None` when its compile panicked: it serves as it was).
    pub fn install(&mut self, done: PartCompiled) -> Option<Snapshot> {
        self.compiling.remove(&done.prefix);
        self.stats.parts += done.stats.parts;
        self.stats.routes += done.stats.routes;
        match done.built {
            Ok(Some(built)) => {
                self.parts.insert(done.prefix, built);
            }
            Ok(None) => {
                self.parts.remove(&done.prefix);
            }
            Err(()) => return None,
        }
        self.hosts = host_index(&self.parts);
        let published = self.published.as_ref()?;
        let snapshot = Snapshot { parts: self.hosts.clone(), ..published.shallow_clone() };
        self.published = Some(snapshot.shallow_clone());
        Some(snapshot)
    }

    /// The newest revision every change of which is in the last snapshot, given that the
    /// builder has seen `revision`: one before the first change of a partition still waiting
    /// or compiling.
    pub fn settled(&self, revision: i64) -> i64 {
        self.pending().map(|(_, since)| since - 1).fold(revision, i64::min)
    }

    /// The partitions with store changes still waiting or compiling, with the first revision
    /// of each.
    fn pending(&self) -> impl Iterator<Item = (&String, i64)> {
        self.dirty.iter().filter_map(|(p, (_, since))| Some((p, (*since)?))).chain(self.compiling.iter().filter_map(|(p, (since, _, _))| Some((p, (*since)?))))
    }

    /// What the last snapshot serves, given that the builder has seen `revision`: every change
    /// up to [`Builder::settled`], and every change up to `revision` but those of the
    /// partitions pending.
    pub fn applied(&self, revision: i64) -> weir_store::settled::Applied {
        let mut pending: BTreeMap<&String, i64> = BTreeMap::new();
        for (prefix, since) in self.pending() {
            let first = pending.entry(prefix).or_insert(since);
            *first = (*first).min(since);
        }
        weir_store::settled::Applied { revision: self.settled(revision), seen: revision, pending: Arc::new(pending.into_iter().map(|(p, since)| (p.clone(), since)).collect()) }
    }

    /// Where the upstreams of tenants' routes (labelled `weir-managed-gateway`) may connect:
    /// their nodes' names are resolved and checked when a connection is made.
    pub fn with_tenant_reach(mut self, reach: Arc<Reach>) -> Builder {
        self.tenant_reach = Some(reach);
        self
    }

    /// Adds a source of partitions; the next build compiles them.
    pub fn with_contributor(mut self, contributor: Arc<dyn Contributor>) -> Builder {
        self.contributors.push(contributor);
        self
    }

    /// Hands every contributor the way to have its partitions lowered again.
    pub fn attach(&self, relower: &crate::partition::Relower) {
        for c in &self.contributors {
            c.attach(relower.clone());
        }
    }

    /// The work done so far.
    pub fn stats(&self) -> BuildStats {
        self.stats
    }

    /// The keys the state must keep for the partitions.
    pub fn claims(&self) -> Claims {
        Claims::new(self.contributors.clone())
    }

    /// Compiles the partitions `keys` belong to, keeping every other partition as it is; with
    /// `all`, every partition in `state` and none other.
    fn compile_parts<'k>(&mut self, state: &ConfigState, keys: impl Iterator<Item = &'k str>, since: Option<i64>, all: bool) {
        let claims = self.claims();
        let mut claimed: BTreeMap<&str, &Arc<dyn Contributor>> = BTreeMap::new();
        for key in keys {
            if let Some((prefix, c)) = claims.partition(key) {
                claimed.entry(prefix).or_insert(c);
            }
        }
        if claimed.is_empty() && !all {
            return;
        }
        if self.deferred && !all {
            for prefix in claimed.into_keys() {
                self.mark_dirty(prefix, since);
            }
            return;
        }
        let mut before = if all { std::mem::take(&mut self.parts) } else { BTreeMap::new() };
        // A partition compiling off the caller's path is left to that compile, and compiled
        // again after it, from what is there then.
        for (prefix, (_, taken, _)) in self.compiling.iter().map(|(p, c)| (p.clone(), *c)).collect::<Vec<_>>() {
            if let Some(served) = before.remove(&prefix) {
                self.parts.insert(prefix.clone(), served);
            }
            claimed.remove(prefix.as_str());
            // Whatever changed after its objects were taken (what a broken watch missed
            // included) is still to come.
            self.mark_dirty(&prefix, Some(taken + 1));
        }
        for (prefix, contributor) in claimed {
            self.dirty.remove(prefix);
            let previous = before.remove(prefix).or_else(|| self.parts.remove(prefix));
            let objects = part_objects(contributor.as_ref(), prefix, state).map(|kv| (kv.key.as_str(), &kv.value[..], kv.create_revision)).collect();
            if let Some(built) = compile_part(contributor.as_ref(), prefix, objects, &state.plugin_metadata, (&self.keyring, &self.registry), previous, &mut self.stats) {
                self.parts.insert(prefix.to_string(), built);
            }
        }
        // Partitions whose objects all went while nobody watched (a list after the watch broke)
        // are gone too.
        for prefix in before.keys() {
            if let Some((p, c)) = claims.partition(prefix)
                && p == prefix
            {
                c.gone(prefix);
            }
        }
        self.hosts = host_index(&self.parts);
        self.parts_metadata = state.plugin_metadata.clone();
    }

    /// Server certificates of the enabled `ssls` objects, by SNI. An object that cannot be used
    /// (its key sealed with a secret this node lacks, say) is logged and left out.
    fn tls(&mut self, state: &ConfigState) -> SniTable {
        let mut next = HashMap::new();
        let mut table = SniTable::default();
        for (id, ssl) in &state.ssls {
            if ssl.kind != "server" || ssl.status != 1 {
                continue;
            }
            let config = match self.ssls.remove(id) {
                Some((model, config)) if model == *ssl => config,
                _ => match weir_tls::server_config(ssl, &self.keyring) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(ssl = %id, error = %e, "certificate object cannot be served; skipped");
                        continue;
                    }
                },
            };
            for sni in ssl.sni_list() {
                table.insert(sni, config.clone());
            }
            next.insert(id.clone(), (ssl.clone(), config));
        }
        self.ssls = next;
        table
    }

    /// Compiles everything: APISIX's routes, every partition, the SNI table, the checked list.
    pub fn build(&mut self, state: &ConfigState) -> Snapshot {
        self.build_with(state, true)
    }

    /// Folds the route overlay into a full build of APISIX's routes, keeping the partitions
    /// as they are (their changes were compiled as they came).
    pub fn fold(&mut self, state: &ConfigState) -> Snapshot {
        self.build_with(state, false)
    }

    /// A full build of APISIX's part; the partitions are compiled anew when `parts` says so or
    /// `plugin_metadata` changed since they were.
    fn build_with(&mut self, state: &ConfigState, parts: bool) -> Snapshot {
        // Keyed by borrowed ids for this build, so a hit allocates nothing.
        let mut next: UpstreamCache<Cow<'_, str>> = HashMap::new();
        let mut ctx = Ctx { keyring: &self.keyring, ssls: &state.ssls, registry: &self.registry, instances: &mut self.instances, metadata: &state.plugin_metadata, tenant: self.tenant_reach.clone(), reach: None };

        // Older routes first, so they win priority ties (the router numbers them in this order).
        let mut routes: Vec<_> = state.routes.iter().filter(|(_, r)| r.value.status != 0).collect();
        routes.sort_by_key(|(id, r)| (r.created, id.as_str()));
        let specs: Vec<_> = routes
            .into_iter()
            .filter_map(|(id, entry)| route_spec(state, &mut ctx, &mut next, &self.upstreams, id, entry, None))
            .collect();
        let (global, global_unavailable) = match global_pipeline(state, &mut ctx) {
            Ok(p) => (p, None),
            Err(why) => {
                tracing::error!(reason = %why, "global rules cannot be applied; every request answers 503 until they are fixed");
                (Pipeline::default(), Some(why.into()))
            }
        };
        let consumers = consumers(state, &mut ctx);
        self.stats.full += 1;
        self.stats.consumers += state.consumers.len() as u64;
        self.stats.routes += specs.len() as u64;
        self.instances.finish();
        if parts || self.parts_metadata != state.plugin_metadata {
            self.compile_parts(state, state.extra.keys().map(String::as_str), Some(state.revision), true);
        }
        self.upstreams = next.into_iter().map(|((source, id), rt)| ((source, id.to_string()), rt)).collect();
        let mut checked: Vec<(String, Arc<UpstreamRt>)> = self
            .upstreams
            .iter()
            .filter(|(_, rt)| rt.checked)
            .map(|((source, id), rt)| (format!("{}/{}/{id}", self.prefix, source.resource()), rt.clone()))
            .collect();
        checked.sort_by(|a, b| a.0.cmp(&b.0));
        let tls = Arc::new(self.tls(state));
        let base = Arc::new(Router::new(specs));
        let checked = Arc::new(checked);
        self.delta_ids.clear();
        self.overlays = 0;
        let snapshot = Snapshot {
            revision: state.revision,
            base,
            delta: None,
            checked,
            tls,
            global: Arc::new(global),
            global_unavailable,
            consumers: Arc::new(consumers),
            parts: self.hosts.clone(),
        };
        // Kept without its partitions: an update lays the current ones in, and partitions held
        // here would keep what they hold (a gateway's function runtime, say) past their change
        // or removal until the next full build.
        self.last = Some(Snapshot { parts: Arc::default(), ..snapshot.shallow_clone() });
        self.published = Some(snapshot.shallow_clone());
        snapshot
    }

    /// Applies `changes` (already in `state`). When only routes (or the plugin configs routes
    /// name) changed, the routes changed since the last full build are compiled into a small
    /// router laid over the last full one, so a change costs in proportion to the changes, not
    /// to the route table; a changed partition is compiled alone, and so is a changed consumer.
    /// Anything else (and a grown overlay) gets a full build.
    pub fn update(&mut self, state: &ConfigState, changes: &Changes) -> Snapshot {
        if self.last.is_none() {
            return self.build(state);
        }
        if !changes.extra.is_empty() {
            self.compile_parts(state, changes.extra.iter().map(String::as_str), changes.extra_since, false);
        }
        // A plugin config changes the routes that name it, and nothing else.
        let widened;
        let changes = if changes.plugin_configs.is_empty() {
            changes
        } else {
            let mut routes = changes.routes.clone();
            routes.extend(
                state
                    .routes
                    .iter()
                    .filter(|(_, r)| r.value.plugin_config_id.as_ref().is_some_and(|p| changes.plugin_configs.contains(&p.0)))
                    .map(|(id, _)| id.clone()),
            );
            routes.sort();
            routes.dedup();
            widened = Changes { routes, plugin_configs: Vec::new(), consumers: changes.consumers.clone(), other: changes.other, extra: Vec::new(), extra_since: None };
            &widened
        };
        if changes.other || self.delta_ids.len() + changes.routes.len() > MAX_OVERLAY || self.overlays >= MAX_OVERLAYS {
            return self.fold(state);
        }
        let consumers = match changes.consumers.is_empty() {
            true => None,
            false => match self.consumers_again(state, &changes.consumers) {
                Some(c) => Some(c),
                None => return self.fold(state),
            },
        };
        let Some(last) = self.last.as_ref().map(Snapshot::shallow_clone) else { return self.build(state) };
        if !changes.routes.is_empty() {
            self.overlays += 1;
        }
        let mut snapshot = match &self.published {
            // No APISIX route changed: its routers stay as the last update left them.
            Some(published) if changes.routes.is_empty() => Snapshot { revision: state.revision, parts: self.hosts.clone(), ..published.shallow_clone() },
            _ => {
                let last = Snapshot { parts: self.hosts.clone(), ..last };
                match self.routes_overlay(state, changes, last) {
                    Some(s) => s,
                    None => return self.fold(state),
                }
            }
        };
        if let Some(c) = consumers {
            snapshot.consumers = c;
        }
        self.published = Some(snapshot.shallow_clone());
        snapshot
    }

    /// The last full build's consumers with those named (`names`, with duplicates) filed
    /// afresh, which the last full build then holds too; `None` when only a full build will
    /// do: one of them files a credential another consumer files, before or after.
    fn consumers_again(&mut self, state: &ConfigState, names: &[String]) -> Option<Arc<Consumers>> {
        let last = self.last.as_mut()?;
        let mut next = Consumers::clone(&last.consumers);
        let overwritten = next.overwritten();
        let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
        names.sort_unstable();
        names.dedup();
        if !names.iter().all(|n| next.take_back(n)) {
            return None;
        }
        let mut ctx = Ctx { keyring: &self.keyring, ssls: &state.ssls, registry: &self.registry, instances: &mut self.instances, metadata: &state.plugin_metadata, tenant: self.tenant_reach.clone(), reach: None };
        for n in &names {
            file_consumer_again(state, &mut ctx, &mut next, n);
        }
        self.stats.consumers += names.len() as u64;
        // The instances these consumers brought before and no longer do go now, not at the
        // next full build (what they share with others takes a full build, which knows).
        let scopes: std::collections::HashSet<String> = names.iter().map(|n| consumer_scope(n)).collect();
        self.instances.forget(|scope| scope.starts_with("consumer:") && scopes.contains(scope));
        self.instances.merge();
        if next.overwritten() != overwritten || next.any_sharing(names.iter().copied()) {
            return None;
        }
        let next = Arc::new(next);
        last.consumers = next.clone();
        Some(next)
    }

    /// The last full build with the routes changed since laid over it, or `None` when only a
    /// full build will do.
    fn routes_overlay(&mut self, state: &ConfigState, changes: &Changes, last: Snapshot) -> Option<Snapshot> {
        // An inline upstream with health checks before or after the change puts a checker in or
        // out of the health report, which only a full build redoes.
        let checks_involved = changes.routes.iter().any(|id| {
            let before = self.upstreams.get(&(Source::Route, id.clone())).is_some_and(|rt| rt.checked);
            let after = state.routes.get(id).and_then(|r| r.value.upstream.as_ref()).is_some_and(|u| u.checks.is_some());
            before || after
        });
        if checks_involved {
            return None;
        }
        self.delta_ids.extend(changes.routes.iter().cloned());
        let mut ctx = Ctx { keyring: &self.keyring, ssls: &state.ssls, registry: &self.registry, instances: &mut self.instances, metadata: &state.plugin_metadata, tenant: self.tenant_reach.clone(), reach: None };
        let mut next: UpstreamCache<Cow<'_, str>> = HashMap::new();
        let mut routes: Vec<_> = self
            .delta_ids
            .iter()
            .filter_map(|id| state.routes.get_key_value(id))
            .filter(|(_, r)| r.value.status != 0)
            .collect();
        routes.sort_by_key(|(id, r)| (r.created, id.as_str()));
        let specs: Vec<_> = routes
            .into_iter()
            .filter_map(|(id, entry)| route_spec(state, &mut ctx, &mut next, &self.upstreams, id, entry, None))
            .collect();
        self.stats.routes += specs.len() as u64;
        self.instances.merge();
        if next.iter().any(|(key, rt)| rt.checked && !self.upstreams.contains_key(&(key.0, key.1.to_string()))) {
            // A route now uses a checked upstream no route used before.
            return None;
        }
        for id in &changes.routes {
            self.upstreams.remove(&(Source::Route, id.clone()));
            let split = format!("{id}/");
            self.upstreams.retain(|(source, key), _| *source != Source::Split || !key.starts_with(&split));
        }
        for ((source, id), rt) in next {
            self.upstreams.insert((source, id.to_string()), rt);
        }
        let delta = Delta { router: Router::new(specs), superseded: self.delta_ids.iter().cloned().collect() };
        Some(Snapshot { revision: state.revision, delta: Some(Arc::new(delta)), ..last })
    }

    /// Whether the last snapshot carries an overlay that a full build would fold in.
    pub fn has_overlay(&self) -> bool {
        !self.delta_ids.is_empty()
    }
}

/// Routes changed since the last full build beyond which an update rebuilds everything.
const MAX_OVERLAY: usize = 256;

/// Updates laid over one full build before the next update rebuilds everything: a route (or
/// plugin config) changed again and again leaves the instances it no longer uses behind until
/// then (a logger's thread, a counter), so they are bounded too.
const MAX_OVERLAYS: usize = 64;



/// The upstreams a route's `traffic-split` config names, in order: every weighted upstream
/// of every rule that has `upstream_id` or an inline `upstream`.
fn split_upstreams<'s>(
    state: &'s ConfigState,
    ctx: &mut Ctx<'_>,
    next: &mut UpstreamCache<Cow<'s, str>>,
    previous: &UpstreamCache<String>,
    route_id: &str,
    conf: &serde_json::Value,
) -> Vec<Option<Arc<UpstreamRt>>> {
    let mut out = Vec::new();
    let rules = conf.get("rules").and_then(serde_json::Value::as_array).into_iter().flatten();
    for wu in rules.flat_map(|r| r.get("weighted_upstreams").and_then(serde_json::Value::as_array).into_iter().flatten()) {
        if let Some(uid) = wu.get("upstream_id").and_then(|v| v.as_str().map(str::to_string).or_else(|| v.as_i64().map(|n| n.to_string()))) {
            let found = state.upstreams.get_key_value(&uid);
            out.push(found.map(|(k, up)| reuse_or_build(next, previous, ctx, Source::Object, Cow::Borrowed(k.as_str()), up)));
        } else if let Some(inline) = wu.get("upstream") {
            let key = format!("{route_id}/traffic-split/{}", out.len());
            match serde_json::from_value::<Upstream>(inline.clone()) {
                Ok(up) => out.push(Some(reuse_or_build(next, previous, ctx, Source::Split, Cow::Owned(key), &up))),
                Err(e) => {
                    tracing::warn!(route = %route_id, error = %e, "traffic-split upstream cannot be read; the route's own serves");
                    out.push(None);
                }
            }
        }
    }
    out
}

/// Marks a route unavailable for `why` (the first reason found is kept), and says so.
fn fail(broken: &mut Option<String>, id: &str, why: String) {
    tracing::error!(route = %id, reason = %why, "route cannot be applied; it answers 503 until it is fixed");
    broken.get_or_insert(why);
}

/// One route compiled for the router: service merged in, upstream runtime resolved (from
/// `previous` when unchanged), timeouts decided. A route that cannot be applied as stored is
/// still matched, as [`RouteRt::unavailable`], so its requests never reach another route.
fn route_spec<'s>(
    state: &'s ConfigState,
    ctx: &mut Ctx<'_>,
    next: &mut UpstreamCache<Cow<'s, str>>,
    previous: &UpstreamCache<String>,
    id: &'s str,
    entry: &'s Entry<model::Route>,
    handler: Option<Arc<dyn Handler>>,
) -> Option<RouteSpec<Arc<RouteRt>>> {
    let route = &entry.value;
    let gateway = route.labels.as_ref().and_then(|l| l.get(model::MANAGED_LABEL)).map(|g| g.as_str().unwrap_or_default());
    ctx.reach = gateway.zip(ctx.tenant.clone()).map(|(g, reach)| Tenant { reach, gateway: g.into() });
    let mut broken: Option<String> = entry.broken.as_deref().map(str::to_string);
    let service = route.service_id.as_ref().and_then(|s| state.services.get(&s.0));
    if let Some(sid) = &route.service_id
        && service.is_none()
    {
        fail(&mut broken, id, format!("service {sid} is missing or cannot be read"));
    }
    let plugin_config = route.plugin_config_id.as_ref().and_then(|p| state.plugin_configs.get(&p.0));
    if let Some(pid) = &route.plugin_config_id
        && plugin_config.is_none()
    {
        fail(&mut broken, id, format!("plugin config {pid} is missing or cannot be read"));
    }
    let upstream = if let Some(up) = &route.upstream {
        Some(reuse_or_build(next, previous, ctx, Source::Route, Cow::Borrowed(id), up))
    } else if let Some(uid) = &route.upstream_id {
        state.upstreams.get(&uid.0).map(|up| reuse_or_build(next, previous, ctx, Source::Object, Cow::Borrowed(&uid.0), up))
    } else if let Some(svc) = service {
        if let Some(up) = &svc.upstream {
            Some(reuse_or_build(next, previous, ctx, Source::Service, Cow::Borrowed(&svc.id.0), up))
        } else {
            svc.upstream_id
                .as_ref()
                .and_then(|uid| state.upstreams.get(&uid.0).map(|up| reuse_or_build(next, previous, ctx, Source::Object, Cow::Borrowed(&uid.0), up)))
        }
    } else {
        None
    };
    let timeouts = route
        .timeout
        .as_ref()
        .map(timeouts_from)
        .or_else(|| upstream.as_ref().and_then(|u| u.timeouts))
        .unwrap_or_default();
    let hosts = route
        .host_list()
        .map(|h| h.into_iter().map(str::to_string).collect())
        .or_else(|| service.and_then(|s| s.hosts.clone()));
    let remote_addrs = route.remote_addr_list().map(|addrs| addrs.into_iter().filter_map(model::parse_ip_net).collect());
    // Without its `vars`, a broken route matches more widely: closed for more requests, never
    // open for any it was meant to guard.
    let vars = match route.vars.as_ref().map(Expr::compile) {
        Some(Ok(e)) => Some(e),
        Some(Err(e)) => {
            fail(&mut broken, id, format!("invalid vars expression: {e}"));
            None
        }
        None => None,
    };
    // Precedence: the route's own plugins, then its plugin config's, then its service's.
    let merged = Layers::new()
        .with(Scope::Service, service.and_then(|s| s.plugins.as_ref()))
        .with(Scope::PluginConfig, plugin_config.map(|pc| &pc.plugins))
        .with(Scope::Route, route.plugins.as_ref())
        .merge();
    let (plugins, upstream, alternatives) = if broken.is_some() {
        (Pipeline::default(), None, Vec::new())
    } else {
        let alternatives = merged.get("traffic-split").map(|ts| split_upstreams(state, ctx, next, previous, id, ts)).unwrap_or_default();
        match ctx.registry.pipeline(&merged, &format!("route:{id}"), ctx.metadata, ctx.instances) {
            Ok(p) => (p, upstream, alternatives),
            Err(e) => {
                fail(&mut broken, id, format!("plugins cannot run: {e}"));
                (Pipeline::default(), None, Vec::new())
            }
        }
    };
    let paths: Vec<String> = route.paths().into_iter().map(str::to_string).collect();
    let matched_host = hosts.as_ref().and_then(|h: &Vec<String>| h.first().cloned()).unwrap_or_default();
    Some(RouteSpec {
        value: Arc::new(RouteRt {
            id: id.into(),
            created: entry.created,
            plugins,
            service_id: route.service_id.as_ref().map_or("", |s| s.0.as_str()).into(),
            name: route.name.as_deref().unwrap_or_default().into(),
            matched_uri: paths.first().map_or("", String::as_str).into(),
            matched_host: matched_host.into(),
            upstream,
            alternatives,
            timeouts,
            websocket: route.enable_websocket.or(service.and_then(|s| s.enable_websocket)).unwrap_or(false),
            handler,
            unavailable: broken.map(Into::into),
        }),
        paths,
        hosts,
        methods: route.methods.clone(),
        remote_addrs,
        vars,
        priority: route.priority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use weir_core::expr::Vars;
    use weir_store::KeyValue;

    struct NoVars;
    impl Vars for NoVars {
        fn get(&self, _: &str) -> Option<Cow<'_, str>> {
            None
        }
    }

    fn kv(key: &str, value: &str, rev: i64) -> KeyValue {
        KeyValue { key: key.into(), value: value.as_bytes().to_vec().into(), create_revision: rev, mod_revision: rev }
    }

    fn upstream_of(s: &Snapshot, path: &str) -> Arc<UpstreamRt> {
        let facts = RequestFacts { method: "GET", host: None, path, remote: None, vars: &NoVars };
        s.find(&facts).and_then(|r| r.upstream.clone()).expect("route with an upstream")
    }

    #[test]
    fn unchanged_upstreams_keep_their_runtime() {
        let mut state = ConfigState::from_list(
            "/apisix",
            &[
                kv("/apisix/upstreams/u", r#"{"nodes":{"127.0.0.1:1":1}}"#, 1),
                kv("/apisix/routes/a", r#"{"uri":"/a","upstream_id":"u","timeout":{"connect":1,"send":2,"read":3}}"#, 2),
                kv("/apisix/routes/b", r#"{"uri":"/b","upstream_id":"u"}"#, 3),
                kv("/apisix/routes/c", r#"{"uri":"/c","upstream":{"nodes":{"127.0.0.1:2":1}}}"#, 4),
            ],
            4,
        );
        let mut b = test_builder();
        let first = b.build(&state);
        assert!(Arc::ptr_eq(&upstream_of(&first, "/a"), &upstream_of(&first, "/b")), "one runtime per upstream object");
        let facts = RequestFacts { method: "GET", host: None, path: "/a", remote: None, vars: &NoVars };
        let a = first.find(&facts).unwrap();
        assert_eq!(a.timeouts.read, Duration::from_secs(3), "a route's timeout applies");
        assert_eq!(upstream_of(&first, "/b").retries, 0, "one node: nothing to retry on");

        // An unrelated change keeps both runtimes.
        let ev = |key: &str, value: &str, rev| weir_store::Event { kind: weir_store::EventKind::Put, kv: kv(key, value, rev) };
        let mut changes = Changes::default();
        state.apply("/apisix", 5, &[ev("/apisix/routes/d", r#"{"uri":"/d","upstream_id":"u"}"#, 5)], &mut changes);
        assert_eq!((changes.routes.as_slice(), changes.other), (&["d".to_string()][..], false));
        let second = b.update(&state, &changes);
        assert!(second.delta.is_some(), "a route change is laid over the last full build");
        assert!(Arc::ptr_eq(&upstream_of(&first, "/a"), &upstream_of(&second, "/a")));
        assert!(Arc::ptr_eq(&upstream_of(&first, "/c"), &upstream_of(&second, "/c")));

        // Changing the upstream replaces its runtime.
        let mut changes = Changes::default();
        state.apply("/apisix", 6, &[ev("/apisix/upstreams/u", r#"{"nodes":{"127.0.0.1:3":1,"127.0.0.1:4":1}}"#, 6)], &mut changes);
        assert!(changes.other);
        let third = b.update(&state, &changes);
        assert!(third.delta.is_none(), "anything but routes gets a full build");
        assert!(!Arc::ptr_eq(&upstream_of(&second, "/a"), &upstream_of(&third, "/a")));
        assert_eq!(upstream_of(&third, "/a").nodes.len(), 2);
        assert_eq!(upstream_of(&third, "/a").retries, 1, "retries default to the other nodes");
    }

    fn test_builder() -> Builder {
        Builder::new("/apisix", Arc::new(Keyring::new(&["test-secret".to_string()])), Arc::new(weir_plugins::registry()))
    }

    fn server_of(s: &Snapshot, method: &'static str, path: &str) -> Option<String> {
        let facts = RequestFacts { method, host: None, path, remote: None, vars: &NoVars };
        s.find(&facts).map(|r| r.id.to_string())
    }

    #[test]
    fn route_updates_match_a_full_build() {
        let route = |uri: &str, extra: &str| format!(r#"{{"uri":"{uri}","upstream":{{"nodes":{{"127.0.0.1:1":1}}}}{extra}}}"#);
        let mut kvs = Vec::new();
        for i in 0..50 {
            kvs.push(kv(&format!("/apisix/routes/r{i}"), &route(&format!("/p{i}*"), ""), i + 1));
        }
        kvs.push(kv("/apisix/routes/tie-old", &route("/tie", ""), 60));
        let mut state = ConfigState::from_list("/apisix", &kvs, 60);
        let mut b = test_builder();
        let _ = b.build(&state);
        let put = |key: &str, value: String, created: i64, rev: i64| weir_store::Event {
            kind: weir_store::EventKind::Put,
            kv: KeyValue { key: key.into(), value: value.into_bytes().into(), create_revision: created, mod_revision: rev },
        };
        let del = |key: &str, rev: i64| weir_store::Event { kind: weir_store::EventKind::Delete, kv: kv(key, "", rev) };
        let steps = vec![
            // A changed route: its old path stops matching, its new one starts.
            vec![put("/apisix/routes/r3", route("/moved*", ""), 4, 61)],
            // A new route with a longer prefix wins over an old one; one with the same path and
            // priority loses to the older route; a disabled one is not matched.
            vec![put("/apisix/routes/new", route("/p10/x*", ""), 62, 62), put("/apisix/routes/tie-new", route("/tie", ""), 63, 63)],
            vec![put("/apisix/routes/r5", route("/p5*", r#","status":0"#), 6, 64), del("/apisix/routes/r7", 65)],
            // A higher priority in the overlay beats the base; a POST-only route passes GETs on.
            vec![put("/apisix/routes/prio", route("/p20*", r#","priority":9,"methods":["POST"]"#), 66, 66)],
        ];
        let probes = ["/p3", "/moved", "/p10/x/y", "/p10/z", "/tie", "/p5", "/p7", "/p20", "/p49"];
        for (i, events) in steps.into_iter().enumerate() {
            let mut changes = Changes::default();
            state.apply("/apisix", 70 + i as i64, &events, &mut changes);
            let updated = b.update(&state, &changes);
            assert!(updated.delta.is_some());
            let full = test_builder().build(&state);
            for path in probes {
                for method in ["GET", "POST"] {
                    assert_eq!(server_of(&updated, method, path), server_of(&full, method, path), "step {i}: {method} {path}");
                }
            }
        }
        let last = b.update(&state, &Changes::default());
        assert_eq!(server_of(&last, "GET", "/tie").as_deref(), Some("tie-old"));
        assert_eq!(server_of(&last, "POST", "/p20").as_deref(), Some("prio"));
        assert_eq!(server_of(&last, "GET", "/p20").as_deref(), Some("r20"));
        assert_eq!(server_of(&last, "GET", "/p3").as_deref(), None, "nothing else matches /p3");
        assert!(b.has_overlay());
        let folded = b.build(&state);
        assert!(folded.delta.is_none() && !b.has_overlay());
        assert_eq!(server_of(&folded, "GET", "/moved").as_deref(), Some("r3"));
    }

    /// A change to consumers (or their credential objects) files those consumers afresh in
    /// a copy of the last consumers, and answers as a full build would: a credential two
    /// consumers file takes a full build, which decides which of them holds it. A consumer
    /// compiled again keeps the plugin instances its config still names (a quota's counters).
    #[test]
    fn consumer_updates_match_a_full_build_and_compile_only_the_consumers_changed() {
        let consumer = |name: &str, key: &str, extra: &str| format!(r#"{{"username":"{name}","plugins":{{"key-auth":{{"key":"{key}"}}{extra}}}}}"#);
        let quota = |n: u32| format!(r#","limit-count":{{"count":{n},"time_window":60}}"#);
        let credential = |key: &str| format!(r#"{{"plugins":{{"key-auth":{{"key":"{key}"}}}}}}"#);
        let mut kvs = vec![kv("/apisix/consumer_groups/g", r#"{"plugins":{"limit-count":{"count":9,"time_window":60}}}"#, 1)];
        for i in 0..300 {
            let extra = if i % 10 == 0 { quota(5) } else { String::new() };
            kvs.push(kv(&format!("/apisix/consumers/u{i}"), &consumer(&format!("u{i}"), &format!("k{i}"), &extra), i + 2));
        }
        kvs.push(kv("/apisix/consumers/grouped", r#"{"username":"grouped","group_id":"g","plugins":{"key-auth":{"key":"kg"}}}"#, 400));
        kvs.push(kv("/apisix/consumers/u1/credentials/c1", &credential("c1key"), 401));
        let mut state = ConfigState::from_list("/apisix", &kvs, 401);
        let mut b = test_builder();
        let first = b.build(&state);
        assert_eq!(b.stats().consumers, 301);
        let put = |key: &str, value: String, rev: i64| weir_store::Event {
            kind: weir_store::EventKind::Put,
            kv: KeyValue { key: format!("/apisix/{key}"), value: value.into_bytes().into(), create_revision: rev, mod_revision: rev },
        };
        let del = |key: &str, rev: i64| weir_store::Event { kind: weir_store::EventKind::Delete, kv: kv(&format!("/apisix/{key}"), "", rev) };
        // Each step, and whether it takes a full build.
        let steps = vec![
            // A new key for one consumer; one with a quota keeps its quota's instance.
            (vec![put("consumers/u5", consumer("u5", "k5-new", ""), 500)], false),
            (vec![put("consumers/u0", consumer("u0", "k0-new", &quota(5)), 501)], false),
            // The old key kept beside the new as a credential object; another object goes.
            (vec![put("consumers/u7/credentials/previous", credential("k7"), 502), del("consumers/u1/credentials/c1", 503)], false),
            (vec![del("consumers/u9", 504), put("consumers/u10", consumer("u10", "k10", &quota(7)), 505)], false),
            // A consumer in a group that is not there is refused, its credentials with it.
            (vec![put("consumers/lost", consumer("lost", "kl", ""), 506), put("consumers/lost/credentials/c", credential("kl2"), 507)], false),
            (vec![put("consumers/lost", r#"{"username":"lost","group_id":"nope","plugins":{"key-auth":{"key":"kl"}}}"#.into(), 508)], false),
            // A credential object whose consumer is not stored is filed as a full build files it.
            (vec![put("consumers/ghost/credentials/x", credential("kx"), 509)], false),
            // Consumers sharing one key: full builds, a third one onto it too, until all but
            // one let go of it.
            (vec![put("consumers/dup", consumer("dup", "k3", ""), 510)], true),
            (vec![put("consumers/tri", consumer("tri", "k3", ""), 511)], true),
            (vec![put("consumers/u3", consumer("u3", "k3-b", ""), 512)], true),
            (vec![del("consumers/dup", 513)], true),
            (vec![del("consumers/tri", 514)], false),
            (vec![put("consumers/grouped", r#"{"username":"grouped","group_id":"g","plugins":{"key-auth":{"key":"kg2"}}}"#.into(), 515)], false),
            // Plugins whose instances or filters others may share take full builds, before
            // and after, until the consumer has none.
            (vec![put("consumers/shared", consumer("shared", "ks", r#","limit-count":{"count":3,"time_window":60,"group":"gg"}"#), 516)], true),
            (vec![put("consumers/shared", consumer("shared", "ks2", r#","limit-count":{"count":3,"time_window":60,"group":"gg"}"#), 517)], true),
            (vec![put("consumers/shared", consumer("shared", "ks3", &quota(3)), 518)], true),
            (vec![put("consumers/shared", consumer("shared", "ks4", &quota(3)), 519)], false),
            (vec![put("consumers/filtered", consumer("filtered", "kf", r#","limit-count":{"count":3,"time_window":60,"_meta":{"filter":[["arg_x","==","1"]]}}"#), 520)], true),
            // The credential objects of a consumer that cannot be read go when it is deleted.
            (vec![put("consumers/broken", "{not json".into(), 521), put("consumers/broken/credentials/c", credential("kb"), 522)], false),
            (vec![del("consumers/broken", 523)], false),
        ];
        let probes: Vec<String> = (0..300).map(|i| format!("k{i}")).chain(["k5-new", "k0-new", "c1key", "kl", "kl2", "kx", "k3-b", "kg", "kg2", "ks", "ks2", "ks3", "ks4", "kf", "kb"].map(String::from)).collect();
        let users: Vec<String> = (0..300).map(|i| format!("u{i}")).chain(["dup", "tri", "lost", "ghost", "grouped", "shared", "filtered", "broken"].map(String::from)).collect();
        let plugins = |s: &Snapshot, user: &str| s.consumers.plugins_of(user).map(|p| p.instances.iter().map(|i| i.name).collect::<Vec<_>>());
        let held = |s: &Snapshot, key: &str| s.consumers.find("key-auth", key).map(|c| (c.consumer.username.clone(), c.consumer.credential_id.clone()));
        let instance = |s: &Snapshot, user: &str| s.consumers.plugins_of(user).map(|p| p.instances[0].plugin.clone());
        let mut last = first;
        for (i, (events, full)) in steps.into_iter().enumerate() {
            // u10's quota changes at step 3: its old instance is let go at once.
            let old_quota = instance(&last, "u10").filter(|_| i == 3).map(|p| Arc::downgrade(&p));
            let mut changes = Changes::default();
            let before = b.stats();
            state.apply("/apisix", 600 + i as i64, &events, &mut changes);
            let updated = b.update(&state, &changes);
            assert_eq!(b.stats().full - before.full, u64::from(full), "step {i}: a full build or none");
            let whole = test_builder().build(&state);
            for key in &probes {
                assert_eq!(held(&updated, key), held(&whole, key), "step {i}: key {key}");
            }
            for user in &users {
                assert_eq!(plugins(&updated, user), plugins(&whole, user), "step {i}: {user}'s plugins");
                // Without a full build, a consumer the step did not name keeps its very plugins.
                let named = events.iter().any(|e| e.kv.key.starts_with(&format!("/apisix/consumers/{user}")));
                if let (false, false, Some(a), Some(b)) = (full, named, last.consumers.plugins_of(user), updated.consumers.plugins_of(user)) {
                    assert!(Arc::ptr_eq(a, b), "step {i}: {user}'s plugins were compiled again");
                }
            }
            // A consumer untouched keeps its very instances, and so does u0 compiled again.
            for user in ["u20", "u0"] {
                let (a, b) = (instance(&last, user).expect("a quota before"), instance(&updated, user).expect("a quota after"));
                assert!(Arc::ptr_eq(&a, &b), "step {i}: {user}'s quota");
            }
            last = updated;
            if let Some(old) = old_quota {
                assert!(old.upgrade().is_none(), "u10's old quota instance is kept");
            }
        }
        assert_eq!(held(&last, "k7"), Some(("u7".into(), Some("previous".into()))));
        assert_eq!(held(&last, "k5"), None);
        assert_eq!(held(&last, "kl"), None, "a refused consumer's key");
        assert_eq!(held(&last, "kg2"), Some(("grouped".into(), None)));
        assert!(last.consumers.plugins_of("grouped").is_some(), "its group's quota");
        // The next route change lays its overlay over the last full build, consumers changed
        // since included.
        let mut changes = Changes::default();
        state.apply("/apisix", 700, &[put("routes/r", r#"{"uri":"/r","upstream":{"nodes":{"127.0.0.1:1":1}}}"#.into(), 700)], &mut changes);
        let routed = b.update(&state, &changes);
        assert!(routed.delta.is_some());
        assert_eq!(held(&routed, "kg2"), Some(("grouped".into(), None)));
        assert_eq!(held(&routed, "k3"), None);
    }

    #[test]
    fn a_plugin_config_change_recompiles_only_the_routes_naming_it() {
        let state_kvs = [
            kv("/apisix/plugin_configs/pc", r#"{"plugins":{"cors":{}}}"#, 1),
            kv("/apisix/routes/named", r#"{"uri":"/named","plugin_config_id":"pc","upstream":{"nodes":{"127.0.0.1:1":1}}}"#, 2),
            kv("/apisix/routes/other", r#"{"uri":"/other","upstream":{"nodes":{"127.0.0.1:1":1}}}"#, 3),
        ];
        let mut state = ConfigState::from_list("/apisix", &state_kvs, 3);
        let mut b = test_builder();
        let first = b.build(&state);
        fn find(s: &Snapshot, path: &'static str) -> Arc<RouteRt> {
            let facts = RequestFacts { method: "GET", host: None, path, remote: None, vars: &NoVars };
            s.find(&facts).unwrap().clone()
        }
        let names = |r: &Arc<RouteRt>| r.plugins.instances.iter().map(|i| i.name).collect::<Vec<_>>();
        assert_eq!(names(&find(&first, "/named")), ["cors"]);
        let ev = |kind, key: &str, value: &str, rev| weir_store::Event { kind, kv: kv(key, value, rev) };

        let mut changes = Changes::default();
        state.apply("/apisix", 4, &[ev(weir_store::EventKind::Put, "/apisix/plugin_configs/pc", r#"{"plugins":{"request-id":{}}}"#, 4)], &mut changes);
        assert_eq!((changes.plugin_configs.as_slice(), changes.other), (&["pc".to_string()][..], false));
        let second = b.update(&state, &changes);
        assert!(second.delta.is_some(), "laid over the last full build");
        assert_eq!(names(&find(&second, "/named")), ["request-id"]);
        assert!(Arc::ptr_eq(&find(&first, "/other"), &find(&second, "/other")), "a route not naming it is the same object");
        let full = test_builder().build(&state);
        assert_eq!(names(&find(&full, "/named")), names(&find(&second, "/named")));

        // Gone: the route naming it answers 503 (fails closed), as after a full build.
        let mut changes = Changes::default();
        state.apply("/apisix", 5, &[ev(weir_store::EventKind::Delete, "/apisix/plugin_configs/pc", "", 5)], &mut changes);
        let third = b.update(&state, &changes);
        assert!(third.delta.is_some());
        assert!(find(&third, "/named").unavailable.is_some());
        assert!(find(&test_builder().build(&state), "/named").unavailable.is_some());
    }

    #[test]
    fn a_run_of_overlays_ends_in_a_full_build() {
        let mut state = ConfigState::from_list("/apisix", &[kv("/apisix/routes/r", r#"{"uri":"/r","upstream":{"nodes":{"127.0.0.1:1":1}}}"#, 1)], 1);
        let mut b = test_builder();
        let _ = b.build(&state);
        for i in 0..MAX_OVERLAYS {
            let mut changes = Changes::default();
            let value = format!(r#"{{"uri":"/r","upstream":{{"nodes":{{"127.0.0.1:1":1}}}},"desc":"{i}"}}"#);
            state.apply("/apisix", 2 + i as i64, &[event(weir_store::EventKind::Put, "/apisix/routes/r", &value, 2 + i as i64)], &mut changes);
            assert!(b.update(&state, &changes).delta.is_some(), "update {i} is laid over");
        }
        let mut changes = Changes::default();
        state.apply("/apisix", 100, &[event(weir_store::EventKind::Put, "/apisix/routes/r", r#"{"uri":"/r","upstream":{"nodes":{"127.0.0.1:1":1}}}"#, 100)], &mut changes);
        assert!(b.update(&state, &changes).delta.is_none(), "the next one rebuilds, dropping unused instances");
        assert!(!b.has_overlay());
    }

    /// Tenants' routes under `/apisix/tenants/{tenant}/routes/{id}`, one partition per tenant,
    /// answering `{tenant}.example`.
    struct Tenants;

    impl Contributor for Tenants {
        fn partition<'k>(&self, key: &'k str) -> Option<&'k str> {
            let rest = key.strip_prefix("/apisix/tenants/")?;
            let end = rest.find('/')?;
            Some(&key[.."/apisix/tenants/".len() + end + 1])
        }

        fn lower(&self, partition: &str, objects: &[(&str, &[u8])]) -> Lowered {
            let tenant = partition.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
            let routes = objects
                .iter()
                .filter_map(|(key, value)| {
                    Some(LoweredRoute { id: key.strip_prefix(partition)?.to_string(), route: serde_json::from_slice(value).ok()?, handler: None })
                })
                .collect();
            Lowered { hosts: vec![format!("{tenant}.example")], routes }
        }
    }

    fn tenant_builder() -> Builder {
        test_builder().with_contributor(Arc::new(Tenants))
    }

    fn route_json(uri: &str) -> String {
        format!(r#"{{"uri":"{uri}","upstream":{{"nodes":{{"127.0.0.1:1":1}}}}}}"#)
    }

    fn at(s: &Snapshot, host: Option<&str>, path: &str) -> Option<String> {
        let facts = RequestFacts { method: "GET", host, path, remote: None, vars: &NoVars };
        s.find(&facts).map(|r| r.id.to_string())
    }

    /// What a request would run: its plugins, or that the route cannot be applied.
    fn served_by(s: &Snapshot, host: Option<&str>, path: &str) -> Option<(bool, Vec<&'static str>)> {
        let facts = RequestFacts { method: "GET", host, path, remote: None, vars: &NoVars };
        s.find(&facts).map(|r| (r.unavailable.is_some(), r.plugins.instances.iter().map(|i| i.name).collect()))
    }

    fn event(kind: weir_store::EventKind, key: &str, value: &str, rev: i64) -> weir_store::Event {
        weir_store::Event { kind, kv: kv(key, value, rev) }
    }

    /// [`Tenants`], noting the partitions it is told are gone.
    #[derive(Default)]
    struct Noting(std::sync::Mutex<Vec<String>>);

    impl Contributor for Noting {
        fn partition<'k>(&self, key: &'k str) -> Option<&'k str> {
            Tenants.partition(key)
        }

        fn lower(&self, partition: &str, objects: &[(&str, &[u8])]) -> Lowered {
            Tenants.lower(partition, objects)
        }

        fn gone(&self, partition: &str) {
            self.0.lock().unwrap().push(partition.to_string());
        }
    }

    #[test]
    fn a_contributor_hears_of_a_partition_gone_by_a_change_or_by_a_list() {
        let noting = Arc::new(Noting::default());
        let mut b = test_builder().with_contributor(noting.clone());
        let kvs: Vec<_> = (1..=3).map(|t| kv(&format!("/apisix/tenants/t{t}/routes/home"), &route_json("/home"), t)).collect();
        let mut state = ConfigState::claiming("/apisix", &kvs, 3, b.claims());
        b.build(&state);
        let mut changes = Changes::default();
        state.apply("/apisix", 4, &[event(weir_store::EventKind::Delete, "/apisix/tenants/t1/routes/home", "", 4)], &mut changes);
        b.update(&state, &changes);
        assert_eq!(*noting.0.lock().unwrap(), ["/apisix/tenants/t1/"]);
        // Listed again after the watch broke, with t2's objects gone meanwhile.
        let state = ConfigState::claiming("/apisix", &kvs[2..], 6, b.claims());
        b.build(&state);
        assert_eq!(*noting.0.lock().unwrap(), ["/apisix/tenants/t1/", "/apisix/tenants/t2/"]);
    }

    #[test]
    fn a_partition_compiled_again_or_gone_is_let_go() {
        let kvs = vec![kv("/apisix/tenants/t1/routes/home", &route_json("/home"), 1), kv("/apisix/tenants/t2/routes/home", &route_json("/home"), 2)];
        let mut b = tenant_builder();
        let mut state = ConfigState::claiming("/apisix", &kvs, 2, b.claims());
        let first = b.build(&state);
        let (t1, t2) = (Arc::downgrade(&first.parts["t1.example"]), Arc::downgrade(&first.parts["t2.example"]));
        drop(first);
        let mut changes = Changes::default();
        let events = [
            event(weir_store::EventKind::Put, "/apisix/tenants/t1/routes/home", &route_json("/moved"), 3),
            event(weir_store::EventKind::Delete, "/apisix/tenants/t2/routes/home", "", 3),
        ];
        state.apply("/apisix", 3, &events, &mut changes);
        let second = b.update(&state, &changes);
        assert_eq!(at(&second, Some("t1.example"), "/moved").as_deref(), Some("/apisix/tenants/t1/routes/home"));
        assert!(t1.upgrade().is_none(), "the partition compiled again is let go");
        assert!(t2.upgrade().is_none(), "the partition gone is let go");
    }

    /// With compiles deferred, an update leaves a changed partition serving as it was; its
    /// compile is handed off (one per partition at a time, a change meanwhile waiting for it),
    /// and installed when done; the settled revision stays before its change until then. A
    /// build of everything makes what was handed off before stale.
    #[test]
    fn deferred_partition_compiles_go_live_when_installed_and_hold_the_settled_revision() {
        let mut kvs = Vec::new();
        for t in 0..3 {
            kvs.push(kv(&format!("/apisix/tenants/t{t}/routes/home"), &route_json(&format!("/home{t}")), t + 1));
        }
        let mut b = tenant_builder();
        b.defer_parts();
        // However long a loaded machine takes over a compile, none is slow here.
        b.slow_compile = Duration::MAX;
        let mut state = ConfigState::claiming("/apisix", &kvs, 10, b.claims());
        let first = b.build(&state);
        assert_eq!(at(&first, Some("t1.example"), "/home1").as_deref(), Some("/apisix/tenants/t1/routes/home"), "a build compiles in place");
        assert_eq!(b.settled(10), 10);
        let change = |state: &mut ConfigState, b: &mut Builder, t: u32, uri: &str, rev: i64| {
            let mut changes = Changes::default();
            state.apply("/apisix", rev, &[event(weir_store::EventKind::Put, &format!("/apisix/tenants/t{t}/routes/home"), &route_json(uri), rev)], &mut changes);
            b.update(state, &changes)
        };
        let updated = change(&mut state, &mut b, 1, "/moved1", 11);
        assert_eq!(at(&updated, Some("t1.example"), "/home1").as_deref(), Some("/apisix/tenants/t1/routes/home"), "serving as it was");
        assert_eq!(b.settled(11), 10);
        // A write elsewhere at that revision is served; one in t1's partition is not.
        let applied = b.applied(11);
        assert!(applied.serves(11, Some(&["/apisix/routes/r".into()])));
        assert!(applied.serves(11, Some(&["/apisix/tenants/t0/routes/home".into()])));
        assert!(!applied.serves(11, Some(&["/apisix/tenants/t1/routes/home".into()])));
        assert!(!applied.serves(11, None));
        let mut jobs = b.next_compiles(&state);
        assert_eq!(jobs.len(), 1);
        assert!(b.next_compiles(&state).is_empty(), "handed off once");
        // Changed again while compiling: it waits; another partition's change is handed off.
        let _ = change(&mut state, &mut b, 1, "/again1", 12);
        let _ = change(&mut state, &mut b, 2, "/moved2", 13);
        let more = b.next_compiles(&state);
        assert_eq!(more.len(), 1);
        assert_eq!(b.settled(13), 10);
        let done = std::thread::spawn(move || jobs.remove(0).run()).join().unwrap();
        let live = b.install(done).expect("installed");
        assert_eq!(at(&live, Some("t1.example"), "/moved1").as_deref(), Some("/apisix/tenants/t1/routes/home"));
        assert_eq!(at(&live, Some("t0.example"), "/home0").as_deref(), Some("/apisix/tenants/t0/routes/home"));
        assert_eq!(b.settled(13), 11, "t1's second change and t2's are still to come");
        let again = b.next_compiles(&state);
        assert_eq!(again.len(), 1, "t1's second change, handed off now");
        for job in more.into_iter().chain(again) {
            let _ = b.install(job.run()).expect("installed");
        }
        assert_eq!(b.settled(13), 13);
        assert!(b.applied(13).serves(13, Some(&["/apisix/tenants/t1/routes/home".into()])));
        let last = b.published.as_ref().map(Snapshot::shallow_clone).unwrap();
        assert_eq!(at(&last, Some("t1.example"), "/again1").as_deref(), Some("/apisix/tenants/t1/routes/home"));
        assert_eq!(at(&last, Some("t2.example"), "/moved2").as_deref(), Some("/apisix/tenants/t2/routes/home"));
        // A partition asked to be lowered again holds no revision back.
        let relowered = Changes { extra: vec!["/apisix/tenants/t2/routes/home".into()], ..Changes::default() };
        let _ = b.update(&state, &relowered);
        assert_eq!(b.settled(13), 13);
        for job in b.next_compiles(&state) {
            let _ = b.install(job.run()).expect("installed");
        }
        // A build of everything while a partition compiles leaves it to that compile, and
        // compiles it again after: it is never lowered by two threads at once.
        let _ = change(&mut state, &mut b, 0, "/moved0", 14);
        let under_way = b.next_compiles(&state);
        let _ = change(&mut state, &mut b, 1, "/moved1-again", 15);
        let rebuilt = b.build(&state);
        assert_eq!(at(&rebuilt, Some("t1.example"), "/moved1-again").as_deref(), Some("/apisix/tenants/t1/routes/home"));
        assert_eq!(at(&rebuilt, Some("t0.example"), "/home0").as_deref(), Some("/apisix/tenants/t0/routes/home"), "t0 serves as it was");
        assert_eq!(b.settled(15), 13);
        for job in under_way {
            let _ = b.install(job.run()).expect("installed");
        }
        let again = b.next_compiles(&state);
        assert_eq!(again.len(), 1, "t0 once more");
        assert_eq!(b.settled(15), 14);
        for job in again {
            let live = b.install(job.run()).expect("installed");
            assert_eq!(at(&live, Some("t0.example"), "/moved0").as_deref(), Some("/apisix/tenants/t0/routes/home"));
        }
        assert_eq!(b.settled(15), 15);
    }

    /// Says, when dropped, on which thread.
    struct Dropped(std::sync::mpsc::Sender<String>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.send(std::thread::current().name().unwrap_or_default().to_string());
        }
    }

    impl Handler for Dropped {
        fn call(&self, _: crate::handler::Call<'_>) -> crate::handler::Answer {
            Box::pin(async { http::Response::new(weir_http::body::RespBody::empty()) })
        }
    }

    /// [`Tenants`] ending each route in a [`Dropped`]: tenants `t1` and `t2` take
    /// [`SLOW_COMPILE`] to lower, and each lowering notes on which thread, at what niceness, it
    /// ran.
    struct Slow {
        dropped: std::sync::mpsc::Sender<String>,
        lowered: std::sync::Mutex<Vec<(String, Option<String>, Option<i32>)>>,
    }

    impl Contributor for Slow {
        fn partition<'k>(&self, key: &'k str) -> Option<&'k str> {
            Tenants.partition(key)
        }

        fn lower(&self, partition: &str, objects: &[(&str, &[u8])]) -> Lowered {
            let nice = std::fs::read_to_string("/proc/thread-self/stat").ok().and_then(|s| weir_core::threads::niceness(&s));
            self.lowered.lock().unwrap().push((partition.to_string(), std::thread::current().name().map(str::to_string), nice));
            if partition.ends_with("/t1/") || partition.ends_with("/t2/") {
                std::thread::sleep(SLOW_COMPILE);
            }
            let mut lowered = Tenants.lower(partition, objects);
            for r in &mut lowered.routes {
                r.handler = Some(Arc::new(Dropped(self.dropped.clone())));
            }
            lowered
        }
    }

    /// A partition whose last compile took [`SLOW_COMPILE`] compiles next on a thread of its
    /// own at the background's weight, one such at a time and beside the others' slots; one
    /// quick to compile stays on the blocking pool. The routes a compile replaced are freed
    /// on the reclaiming thread, not where the last snapshot holding them went.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_partition_slow_to_compile_compiles_next_at_a_lower_weight_and_what_it_replaced_is_freed_off_the_loop() {
        let (dropped_tx, dropped) = std::sync::mpsc::channel();
        let slow = Arc::new(Slow { dropped: dropped_tx, lowered: Default::default() });
        let mut b = test_builder().with_contributor(slow.clone());
        b.defer_parts();
        let tenants = |uri: &str, rev: i64| (0..3).map(|t| kv(&format!("/apisix/tenants/t{t}/routes/home"), &route_json(uri), rev + t)).collect::<Vec<_>>();
        let mut state = ConfigState::claiming("/apisix", &tenants("/home", 1), 10, b.claims());
        drop(b.build(&state));
        // However long a loaded machine took over it, t0 compiled at once.
        b.parts.get_mut("/apisix/tenants/t0/").expect("t0").took = Duration::ZERO;
        let mut changes = Changes::default();
        // The slow ones changed first: t2 waits for t1's slot, and t0 takes one of its own.
        let mut events: Vec<_> = tenants("/moved", 11).into_iter().map(|kv| weir_store::Event { kind: weir_store::EventKind::Put, kv }).collect();
        let t0_event = events.remove(0);
        state.apply("/apisix", 13, &events, &mut changes);
        drop(b.update(&state, &changes));
        let mut changes = Changes::default();
        state.apply("/apisix", 14, &[t0_event], &mut changes);
        drop(b.update(&state, &changes));
        let jobs = b.next_compiles(&state);
        let slowness: Vec<(String, bool)> = jobs.iter().map(|j| (j.prefix.clone(), j.slow())).collect();
        assert_eq!(slowness, [("/apisix/tenants/t1/".to_string(), true), ("/apisix/tenants/t0/".to_string(), false)]);
        let own = std::fs::read_to_string("/proc/thread-self/stat").ok().and_then(|s| weir_core::threads::niceness(&s)).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for job in jobs {
            let tx = tx.clone();
            match job.slow() {
                true => crate::background::run_slowly(move || {
                    let _ = tx.send(job.run());
                }),
                false => {
                    tokio::task::spawn_blocking(move || tx.send(job.run()));
                }
            }
        }
        for _ in 0..2 {
            let done = rx.recv().await.expect("compiled");
            drop(b.install(done).expect("installed"));
        }
        let t2 = b.next_compiles(&state);
        assert_eq!(t2.iter().map(|j| (j.prefix.as_str(), j.slow())).collect::<Vec<_>>(), [("/apisix/tenants/t2/", true)]);
        for job in t2 {
            let tx = tx.clone();
            crate::background::run_slowly(move || {
                let _ = tx.send(job.run());
            });
        }
        drop(b.install(rx.recv().await.expect("compiled")).expect("installed"));
        let lowered = slow.lowered.lock().unwrap().clone();
        let slow_place = (Some("weir-compile-slow"), Some((own + crate::background::BACKGROUND_STEPS).min(19)));
        let last = |t: &str| lowered.iter().rfind(|(p, _, _)| p.ends_with(&format!("/{t}/"))).map(|(_, name, nice)| (name.clone(), *nice)).unwrap();
        for t in ["t1", "t2"] {
            assert_eq!(last(t), (slow_place.0.map(str::to_string), slow_place.1), "{t}");
        }
        let t0 = last("t0");
        assert!(t0.0.as_deref() != Some("weir-compile-slow") && t0.1 == Some(own), "{t0:?}");
        // The builder has let go of the first build's routes (as it installed) or does now.
        drop(b.build(&state));
        let freed: Vec<String> = (0..3).map(|_| dropped.recv_timeout(Duration::from_secs(10)).expect("the first routes freed")).collect();
        assert_eq!(freed, ["weir-reclaim"; 3]);
    }

    #[test]
    fn a_change_to_one_of_a_thousand_partitions_compiles_only_it() {
        let mut kvs = Vec::new();
        for t in 0..1000 {
            kvs.push(kv(&format!("/apisix/tenants/t{t}/routes/home"), &route_json(&format!("/home{t}")), t + 1));
        }
        kvs.push(kv("/apisix/routes/r1", &route_json("/apisix*"), 2000));
        let mut b = tenant_builder();
        let mut state = ConfigState::claiming("/apisix", &kvs, 2000, b.claims());
        let first = b.build(&state);
        assert_eq!(b.stats(), BuildStats { full: 1, parts: 1000, routes: 1001, consumers: 0 });
        assert_eq!(at(&first, Some("t7.example"), "/home7").as_deref(), Some("/apisix/tenants/t7/routes/home"));
        assert_eq!(at(&first, Some("t7.example"), "/home8"), None, "t8's route is not t7's");
        assert_eq!(at(&first, Some("t7.example"), "/apisix/x").as_deref(), Some("r1"), "APISIX's routes serve every host");

        // One tenant's route changes: that partition alone is compiled, and every other
        // router, APISIX's and the other tenants', is the very same.
        let mut changes = Changes::default();
        state.apply("/apisix", 2001, &[event(weir_store::EventKind::Put, "/apisix/tenants/t7/routes/home", &route_json("/moved"), 2001)], &mut changes);
        let second = b.update(&state, &changes);
        assert_eq!(b.stats(), BuildStats { full: 1, parts: 1001, routes: 1002, consumers: 0 });
        assert_eq!(at(&second, Some("t7.example"), "/moved").as_deref(), Some("/apisix/tenants/t7/routes/home"));
        assert_eq!(at(&second, Some("t7.example"), "/home7"), None);
        assert!(Arc::ptr_eq(&first.base, &second.base));
        for t in ["t0.example", "t8.example", "t999.example"] {
            assert!(Arc::ptr_eq(&first.parts[t], &second.parts[t]), "{t}");
        }
        assert!(!Arc::ptr_eq(&first.parts["t7.example"], &second.parts["t7.example"]));

        // A new tenant, and one whose last object goes: one compile for the first, none for
        // the second, whose host then reaches APISIX's routes only.
        let mut changes = Changes::default();
        state.apply(
            "/apisix",
            2002,
            &[
                event(weir_store::EventKind::Put, "/apisix/tenants/t1000/routes/home", &route_json("/new"), 2002),
                event(weir_store::EventKind::Delete, "/apisix/tenants/t3/routes/home", "", 2002),
            ],
            &mut changes,
        );
        let third = b.update(&state, &changes);
        assert_eq!(b.stats(), BuildStats { full: 1, parts: 1002, routes: 1003, consumers: 0 });
        assert_eq!(at(&third, Some("t1000.example"), "/new").as_deref(), Some("/apisix/tenants/t1000/routes/home"));
        assert!(!third.parts.contains_key("t3.example"));
        assert_eq!(at(&third, Some("t3.example"), "/apisix/y").as_deref(), Some("r1"));

        // An APISIX route changes: no partition is compiled.
        let mut changes = Changes::default();
        state.apply("/apisix", 2003, &[event(weir_store::EventKind::Put, "/apisix/routes/r2", &route_json("/two"), 2003)], &mut changes);
        let fourth = b.update(&state, &changes);
        assert_eq!(b.stats(), BuildStats { full: 1, parts: 1002, routes: 1004, consumers: 0 });
        assert_eq!(at(&fourth, Some("t1.example"), "/two").as_deref(), Some("r2"));
        assert!(Arc::ptr_eq(&third.parts["t1.example"], &fourth.parts["t1.example"]));

        // Folding APISIX's overlay into a full build leaves the partitions as they are; a
        // change to plugin_metadata, which every instance is built with, compiles them all.
        let folded = b.fold(&state);
        assert_eq!(b.stats(), BuildStats { full: 2, parts: 1002, routes: 1006, consumers: 0 });
        assert!(Arc::ptr_eq(&fourth.parts["t1.example"], &folded.parts["t1.example"]));
        let mut changes = Changes::default();
        state.apply("/apisix", 2004, &[event(weir_store::EventKind::Put, "/apisix/plugin_metadata/http-logger", r#"{"log_format":{"a":"$host"}}"#, 2004)], &mut changes);
        let _ = b.update(&state, &changes);
        assert_eq!(b.stats().parts, 1002 + 1000);
    }

    #[test]
    fn partitions_reach_no_apisix_object_and_the_older_claim_keeps_a_host() {
        let mut b = tenant_builder().with_contributor(Arc::new(Claimers));
        let kvs = [
            kv("/apisix/upstreams/u1", r#"{"nodes":{"127.0.0.1:1":1}}"#, 1),
            kv("/apisix/tenants/t1/routes/r", r#"{"uri":"/x","upstream_id":"u1"}"#, 2),
            // Claims t9.example, and is older than tenant t9 itself.
            kv("/apisix/claims/z/r", r#"{"host":"t9.example","uri":"/claimed","upstream":{"nodes":{"127.0.0.1:1":1}}}"#, 3),
            kv("/apisix/tenants/t9/routes/r", &route_json("/own"), 4),
        ];
        let state = ConfigState::claiming("/apisix", &kvs, 4, b.claims());
        let s = b.build(&state);
        let facts = RequestFacts { method: "GET", host: Some("t1.example"), path: "/x", remote: None, vars: &NoVars };
        let route = s.find(&facts).expect("the route matches");
        assert!(route.upstream.is_none(), "a partition's route does not reach APISIX's upstream u1");
        assert_eq!(at(&s, Some("t9.example"), "/claimed").as_deref(), Some("/apisix/claims/z/r"));
        assert_eq!(at(&s, Some("t9.example"), "/own"), None, "the younger claim does not take the host");
    }

    /// `/apisix/claims/{name}/r`: a partition answering whatever host its object names.
    struct Claimers;

    impl Contributor for Claimers {
        fn partition<'k>(&self, key: &'k str) -> Option<&'k str> {
            let rest = key.strip_prefix("/apisix/claims/")?;
            Some(&key[.."/apisix/claims/".len() + rest.find('/')? + 1])
        }

        fn lower(&self, partition: &str, objects: &[(&str, &[u8])]) -> Lowered {
            let mut lowered = Lowered::default();
            for (key, value) in objects {
                let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(value) else { continue };
                if let Some(host) = v.as_object_mut().and_then(|o| o.remove("host")).and_then(|h| h.as_str().map(str::to_string)) {
                    lowered.hosts.push(host);
                }
                if let Ok(route) = serde_json::from_value(v) {
                    lowered.routes.push(LoweredRoute { id: key[partition.len()..].to_string(), route, handler: None });
                }
            }
            lowered
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever sequence of puts and deletes of APISIX and partition routes, each update
        /// routes every probe as a full build of the same state does.
        #[test]
        fn updates_with_partitions_match_a_full_build(
            ops in proptest::collection::vec((0usize..5, 0usize..3, 0usize..5, proptest::bool::weighted(0.25)), 1..24)
        ) {
            let uris = ["/a", "/a*", "/ab", "/b*", "/"];
            let mut b = tenant_builder();
            let mut state = ConfigState::claiming("/apisix", &[], 1, b.claims());
            let _ = b.build(&state);
            for (step, (owner, id, uri, delete)) in ops.into_iter().enumerate() {
                let rev = step as i64 + 2;
                // Owner 0 is APISIX (its routes name plugin configs), 1 to 3 are tenants, 4
                // changes APISIX's plugin configs: a missing one makes its routes answer 503.
                let (key, value) = match owner {
                    0 => (format!("/apisix/routes/r{id}"), format!(r#"{{"uri":"{}","plugin_config_id":"pc{}","upstream":{{"nodes":{{"127.0.0.1:1":1}}}}}}"#, uris[uri], uri % 2)),
                    4 => (format!("/apisix/plugin_configs/pc{}", id % 2), if uri % 2 == 0 { r#"{"plugins":{"cors":{}}}"#.to_string() } else { r#"{"plugins":{"request-id":{}}}"#.to_string() }),
                    t => (format!("/apisix/tenants/t{t}/routes/r{id}"), route_json(uris[uri])),
                };
                let kind = if delete { weir_store::EventKind::Delete } else { weir_store::EventKind::Put };
                let mut changes = Changes::default();
                state.apply("/apisix", rev, &[event(kind, &key, &value, rev)], &mut changes);
                let updated = b.update(&state, &changes);
                let full = tenant_builder().build(&state);
                for host in [None, Some("t1.example"), Some("t2.example"), Some("t3.example"), Some("other.example")] {
                    for path in ["/a", "/ab", "/abc", "/b", "/c", "/"] {
                        proptest::prop_assert_eq!(at(&updated, host, path), at(&full, host, path), "step {}: {:?} {}", step, host, path);
                        proptest::prop_assert_eq!(served_by(&updated, host, path), served_by(&full, host, path), "step {}: {:?} {}", step, host, path);
                    }
                }
            }
        }
    }
}
