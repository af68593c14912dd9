//! Compiling a [`ConfigState`] into an immutable [`Snapshot`]: the router with, for every route,
//! everything the proxy needs already resolved (service merged in, upstream built, timeouts
//! decided). The proxy reads only snapshots.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderValue;
use weir_core::expr::Expr;
use rustls::ServerConfig;
use weir_core::model::{self, Ssl, Timeout, Upstream};
use weir_tls::{Keyring, SniTable};

use crate::balancer::{Balancer, NodeLoad};
use crate::health::{self, Checker, NodeHealth, Passive, Target};
use crate::pool::Transport;
use crate::router::{RouteSpec, Router};
use crate::state::ConfigState;

/// APISIX's default for each of connect, send and read.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Snapshot {
    pub revision: i64,
    pub router: Router<Arc<RouteRt>>,
    /// Upstreams in use that have health checks, by the key of the object that holds them
    /// (`/apisix/upstreams/1`, or the route or service with an inline upstream).
    pub checked: Vec<(String, Arc<UpstreamRt>)>,
    /// Server certificates by SNI, for the TLS listeners.
    pub tls: SniTable,
}

impl Snapshot {
    pub fn empty() -> Snapshot {
        Snapshot { revision: 0, router: Router::new(Vec::new()), checked: Vec::new(), tls: SniTable::default() }
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
    pub id: String,
    /// `None` when the route names no upstream (or a missing one): requests get a 503.
    pub upstream: Option<Arc<UpstreamRt>>,
    pub timeouts: Timeouts,
    /// `enable_websocket` (the route's, else its service's): upgrades are passed through.
    pub websocket: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timeouts {
    pub connect: Duration,
    pub send: Duration,
    pub read: Duration,
}

impl Timeouts {
    fn from_model(t: &Timeout) -> Timeouts {
        let secs = |s: f64| Duration::try_from_secs_f64(s).unwrap_or(DEFAULT_TIMEOUT);
        Timeouts { connect: secs(t.connect), send: secs(t.send), read: secs(t.read) }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { connect: DEFAULT_TIMEOUT, send: DEFAULT_TIMEOUT, read: DEFAULT_TIMEOUT }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum PassHost {
    Pass,
    Node,
    Rewrite(HeaderValue),
}

pub struct NodeRt {
    /// `host:port` as dialled.
    pub authority: Arc<str>,
    /// Set when the host is an IP literal, so no lookup is needed.
    pub socket: Option<SocketAddr>,
    /// The Host header for `pass_host: node`: the port is left out when it is the default.
    pub host_header: HeaderValue,
    pub weight: u32,
    pub priority: i64,
    pub health: Arc<NodeHealth>,
    pub load: Arc<NodeLoad>,
    /// Which pooled connections may serve this node: plain HTTP/1.1 ones are shared by every
    /// upstream naming the node; TLS and HTTP/2 ones belong to one upstream runtime.
    pub pool_key: Arc<str>,
}

impl NodeRt {
    fn new(host: &str, port: u16, default_port: u16, weight: u32, priority: i64) -> NodeRt {
        let authority = format!("{host}:{port}");
        let host_text = if port == default_port { host } else { &authority };
        NodeRt {
            pool_key: authority.clone().into(),
            socket: authority.parse().ok(),
            host_header: HeaderValue::from_str(host_text).unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            authority: authority.into(),
            weight,
            priority,
            health: Arc::default(),
            load: Arc::default(),
        }
    }
}

impl NodeRt {
    /// The host part of the address (brackets kept for IPv6).
    pub fn host(&self) -> &str {
        self.authority.rsplit_once(':').map_or(&self.authority, |(h, _)| h)
    }
}

#[cfg(test)]
pub fn test_node(authority: &str, weight: u32, priority: i64) -> NodeRt {
    let (host, port) = authority.rsplit_once(':').expect("host:port");
    NodeRt::new(host, port.parse().expect("port"), 80, weight, priority)
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

#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    pub size: usize,
    pub idle_timeout: Duration,
    pub requests: u64,
}

impl UpstreamRt {
    fn build(up: &Upstream, client_ssl: Option<Ssl>, keyring: &Keyring) -> UpstreamRt {
        static BUILDS: AtomicU64 = AtomicU64::new(0);
        let default_port = if up.scheme == "https" || up.scheme == "grpcs" { 443 } else { 80 };
        let transport = transport(up, client_ssl.as_ref(), keyring);
        let build = BUILDS.fetch_add(1, Ordering::Relaxed);
        let nodes: Vec<NodeRt> = up
            .nodes
            .0
            .iter()
            .map(|n| {
                let mut node = NodeRt::new(&n.host, n.port.unwrap_or(default_port), default_port, n.weight, n.priority);
                if transport.tls.is_some() || transport.h2 {
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
            timeouts: up.timeout.as_ref().map(Timeouts::from_model),
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
        return Transport { tls: None, h2, sni };
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
    Transport { tls: Some(config), h2, sni }
}

/// Where an upstream's config lives: inline in a route or service, or an upstream object.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    Route,
    Service,
    Object,
}

impl Source {
    fn resource(self) -> &'static str {
        match self {
            Source::Route => "routes",
            Source::Service => "services",
            Source::Object => "upstreams",
        }
    }
}

type UpstreamCache<K> = HashMap<(Source, K), Arc<UpstreamRt>>;

/// What building an upstream runtime reads besides the upstream itself.
struct Ctx<'a> {
    keyring: &'a Keyring,
    ssls: &'a std::collections::BTreeMap<String, Ssl>,
}

fn reuse_or_build<'s>(
    next: &mut UpstreamCache<&'s str>,
    previous: &UpstreamCache<String>,
    ctx: &Ctx<'_>,
    source: Source,
    id: &'s str,
    up: &Upstream,
) -> Arc<UpstreamRt> {
    if let Some(rt) = next.get(&(source, id)) {
        return rt.clone();
    }
    let client_ssl = up
        .tls
        .as_ref()
        .and_then(|t| t.client_cert_id.as_ref())
        .and_then(|cid| ctx.ssls.get(&cid.0))
        .filter(|ssl| ssl.kind == "client")
        .cloned();
    let rt = match previous.get(&(source, id.to_string())) {
        Some(old) if old.model == *up && old.client_ssl == client_ssl => old.clone(),
        _ => Arc::new(UpstreamRt::build(up, client_ssl, ctx.keyring)),
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
}

impl Builder {
    pub fn new(prefix: &str, keyring: Arc<Keyring>) -> Builder {
        Builder { prefix: prefix.to_string(), keyring, upstreams: HashMap::new(), ssls: HashMap::new() }
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

    pub fn build(&mut self, state: &ConfigState) -> Snapshot {
        // Keyed by borrowed ids for this build, so a hit allocates nothing.
        let mut next: UpstreamCache<&str> = HashMap::new();
        let previous = &self.upstreams;
        let ctx = Ctx { keyring: &self.keyring, ssls: &state.ssls };
        
        // Older routes first, so they win priority ties (the router numbers them in this order).
        let mut routes: Vec<_> = state.routes.iter().filter(|(_, r)| r.value.status != 0).collect();
        routes.sort_by_key(|(id, r)| (r.created, id.as_str()));

        let mut specs = Vec::with_capacity(routes.len());
        for (id, entry) in routes {
            let route = &entry.value;
            let service = route.service_id.as_ref().and_then(|s| state.services.get(&s.0));
            let upstream = if let Some(up) = &route.upstream {
                Some(reuse_or_build(&mut next, previous, &ctx, Source::Route, id, up))
            } else if let Some(uid) = &route.upstream_id {
                state.upstreams.get(&uid.0).map(|up| reuse_or_build(&mut next, previous, &ctx, Source::Object, &uid.0, up))
            } else if let Some(svc) = service {
                if let Some(up) = &svc.upstream {
                    Some(reuse_or_build(&mut next, previous, &ctx, Source::Service, &svc.id.0, up))
                } else {
                    svc.upstream_id
                        .as_ref()
                        .and_then(|uid| state.upstreams.get(&uid.0).map(|up| reuse_or_build(&mut next, previous, &ctx, Source::Object, &uid.0, up)))
                }
            } else {
                None
            };
            let timeouts = route
                .timeout
                .as_ref()
                .map(Timeouts::from_model)
                .or_else(|| upstream.as_ref().and_then(|u| u.timeouts))
                .unwrap_or_default();
            let hosts = route
                .host_list()
                .map(|h| h.into_iter().map(str::to_string).collect())
                .or_else(|| service.and_then(|s| s.hosts.clone()));
            let remote_addrs = route
                .remote_addr_list()
                .map(|addrs| addrs.into_iter().filter_map(model::parse_ip_net).collect());
            let vars = match route.vars.as_ref().map(Expr::compile) {
                Some(Ok(e)) => Some(e),
                Some(Err(e)) => {
                    tracing::warn!(route = %id, error = %e, "route has an invalid vars expression; skipped");
                    continue;
                }
                None => None,
            };
            specs.push(RouteSpec {
                paths: route.paths().into_iter().map(str::to_string).collect(),
                hosts,
                methods: route.methods.clone(),
                remote_addrs,
                vars,
                priority: route.priority,
                value: Arc::new(RouteRt {
                    id: id.clone(),
                    upstream,
                    timeouts,
                    websocket: route.enable_websocket.or(service.and_then(|s| s.enable_websocket)).unwrap_or(false),
                }),
            });
        }
        self.upstreams = next.into_iter().map(|((source, id), rt)| ((source, id.to_string()), rt)).collect();
        let mut checked: Vec<(String, Arc<UpstreamRt>)> = self
            .upstreams
            .iter()
            .filter(|(_, rt)| rt.checked)
            .map(|((source, id), rt)| (format!("{}/{}/{id}", self.prefix, source.resource()), rt.clone()))
            .collect();
        checked.sort_by(|a, b| a.0.cmp(&b.0));
        let tls = self.tls(state);
        Snapshot { revision: state.revision, router: Router::new(specs), checked, tls }
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::RequestFacts;
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
        s.router.find(&facts).and_then(|r| r.upstream.clone()).expect("route with an upstream")
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
        let mut b = Builder::new("/apisix", Arc::new(Keyring::new(&["test-secret".to_string()])));
        let first = b.build(&state);
        assert!(Arc::ptr_eq(&upstream_of(&first, "/a"), &upstream_of(&first, "/b")), "one runtime per upstream object");
        let facts = RequestFacts { method: "GET", host: None, path: "/a", remote: None, vars: &NoVars };
        let a = first.router.find(&facts).unwrap();
        assert_eq!(a.timeouts.read, Duration::from_secs(3), "a route's timeout applies");
        assert_eq!(upstream_of(&first, "/b").retries, 0, "one node: nothing to retry on");

        // An unrelated change keeps both runtimes.
        let ev = |key: &str, value: &str, rev| weir_store::Event { kind: weir_store::EventKind::Put, kv: kv(key, value, rev) };
        state.apply("/apisix", 5, &[ev("/apisix/routes/d", r#"{"uri":"/d","upstream_id":"u"}"#, 5)]);
        let second = b.build(&state);
        assert!(Arc::ptr_eq(&upstream_of(&first, "/a"), &upstream_of(&second, "/a")));
        assert!(Arc::ptr_eq(&upstream_of(&first, "/c"), &upstream_of(&second, "/c")));

        // Changing the upstream replaces its runtime.
        state.apply("/apisix", 6, &[ev("/apisix/upstreams/u", r#"{"nodes":{"127.0.0.1:3":1,"127.0.0.1:4":1}}"#, 6)]);
        let third = b.build(&state);
        assert!(!Arc::ptr_eq(&upstream_of(&second, "/a"), &upstream_of(&third, "/a")));
        assert_eq!(upstream_of(&third, "/a").nodes.len(), 2);
        assert_eq!(upstream_of(&third, "/a").retries, 1, "retries default to the other nodes");
    }
}
