//! Typed configuration the data plane compiles. Stored objects are validated at the door by
//! `weir-catalog`; these types read them back. They tolerate fields they do not use, so a
//! store written by a newer version (or by APISIX) still loads.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};


/// Object ids are strings or positive integers in APISIX; Weir keeps them as strings.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id(pub String);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Id(s)),
            Value::Number(n) => Ok(Id(n.to_string())),
            other => Err(serde::de::Error::custom(format!("invalid id {other}"))),
        }
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Renders a JSON id (string or number) the way it appears in keys.
pub fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Seconds, as APISIX writes every timeout.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
pub struct Timeout {
    pub connect: f64,
    pub send: f64,
    pub read: f64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Route {
    #[serde(default)]
    pub id: Id,
    pub name: Option<String>,
    pub uri: Option<String>,
    pub uris: Option<Vec<String>>,
    #[serde(default)]
    pub priority: i64,
    pub methods: Option<Vec<String>>,
    pub host: Option<String>,
    pub hosts: Option<Vec<String>>,
    pub remote_addr: Option<String>,
    pub remote_addrs: Option<Vec<String>>,
    pub vars: Option<Value>,
    pub timeout: Option<Timeout>,
    pub upstream: Option<Upstream>,
    pub upstream_id: Option<Id>,
    pub service_id: Option<Id>,
    pub plugin_config_id: Option<Id>,
    pub plugins: Option<Map<String, Value>>,
    pub enable_websocket: Option<bool>,
    #[serde(default = "one")]
    pub status: i64,
    pub labels: Option<Map<String, Value>>,
}

/// The label the platform puts on the objects it makes for a tenant's gateway (its id).
pub const MANAGED_LABEL: &str = "weir-managed-gateway";

fn one() -> i64 {
    1
}

impl Route {
    /// What can still be matched of a stored route the data plane cannot read whole: its paths,
    /// hosts, methods, addresses and `vars` where they have the right types, and its priority.
    /// Such a route is served as unavailable (fail closed), so that requests meant for it never
    /// fall through to a route with fewer plugins. `None` when not even a path is readable.
    pub fn salvage(value: &Value) -> Option<Route> {
        let obj = value.as_object()?;
        let is_text = |v: &Value| v.is_string();
        let is_list = |v: &Value| v.as_array().is_some_and(|a| a.iter().all(Value::is_string));
        let mut keep = Map::new();
        for (key, fits) in [
            ("uri", &is_text as &dyn Fn(&Value) -> bool),
            ("uris", &is_list),
            ("host", &is_text),
            ("hosts", &is_list),
            ("methods", &is_list),
            ("remote_addr", &is_text),
            ("remote_addrs", &is_list),
            ("name", &is_text),
        ] {
            if let Some(v) = obj.get(key).filter(|v| fits(v)) {
                keep.insert(key.into(), v.clone());
            }
        }
        if let Some(v) = obj.get("vars") {
            keep.insert("vars".into(), v.clone());
        }
        match obj.get("priority") {
            // `as` saturates: an out-of-range priority keeps its side.
            Some(p) if p.is_number() => {
                keep.insert("priority".into(), Value::from(p.as_f64().unwrap_or_default() as i64));
            }
            // A priority that is no number could have been anything: the route is put first,
            // so that no route it might have outranked serves its requests.
            Some(_) => {
                keep.insert("priority".into(), Value::from(i64::MAX));
            }
            None => {}
        }
        let route: Route = serde_json::from_value(Value::Object(keep)).ok()?;
        (!route.paths().is_empty()).then_some(route)
    }
}

impl Route {
    pub fn paths(&self) -> Vec<&str> {
        match (&self.uris, &self.uri) {
            (Some(uris), _) => uris.iter().map(String::as_str).collect(),
            (None, Some(uri)) => vec![uri.as_str()],
            (None, None) => Vec::new(),
        }
    }

    pub fn host_list(&self) -> Option<Vec<&str>> {
        match (&self.hosts, &self.host) {
            (Some(h), _) => Some(h.iter().map(String::as_str).collect()),
            (None, Some(h)) => Some(vec![h.as_str()]),
            (None, None) => None,
        }
    }

    pub fn remote_addr_list(&self) -> Option<Vec<&str>> {
        match (&self.remote_addrs, &self.remote_addr) {
            (Some(a), _) => Some(a.iter().map(String::as_str).collect()),
            (None, Some(a)) => Some(vec![a.as_str()]),
            (None, None) => None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Service {
    #[serde(default)]
    pub id: Id,
    pub upstream: Option<Upstream>,
    pub upstream_id: Option<Id>,
    pub plugins: Option<Map<String, Value>>,
    pub hosts: Option<Vec<String>>,
    pub enable_websocket: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Upstream {
    pub id: Option<Id>,
    #[serde(default)]
    pub nodes: Nodes,
    #[serde(rename = "type", default = "roundrobin")]
    pub lb: String,
    pub retries: Option<u32>,
    pub retry_timeout: Option<f64>,
    pub timeout: Option<Timeout>,
    #[serde(default = "http")]
    pub scheme: String,
    #[serde(default = "pass")]
    pub pass_host: String,
    pub upstream_host: Option<String>,
    pub hash_on: Option<String>,
    pub key: Option<String>,
    pub keepalive_pool: Option<KeepalivePool>,
    pub checks: Option<Checks>,
    pub tls: Option<UpstreamTls>,
}

/// TLS towards the nodes of an `https`/`grpcs` upstream.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct UpstreamTls {
    /// An `ssls` object of type `client` holding the certificate and key.
    pub client_cert_id: Option<Id>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    #[serde(default)]
    pub verify: bool,
}

fn roundrobin() -> String {
    "roundrobin".into()
}
fn http() -> String {
    "http".into()
}
fn pass() -> String {
    "pass".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct KeepalivePool {
    #[serde(default = "pool_size")]
    pub size: usize,
    #[serde(default = "pool_idle")]
    pub idle_timeout: f64,
    #[serde(default = "pool_requests")]
    pub requests: u64,
}

fn pool_size() -> usize {
    320
}
fn pool_idle() -> f64 {
    60.0
}
fn pool_requests() -> u64 {
    1000
}

/// Anything that only carries plugins as far as the data plane cares: plugin configs, global
/// rules, consumers and their credentials.
#[derive(Clone, Debug, Deserialize, PartialEq, Default)]
pub struct PluginHolder {
    #[serde(default)]
    pub plugins: Map<String, Value>,
    /// A consumer's `consumer_groups` object, whose plugins it inherits.
    #[serde(default)]
    pub group_id: Option<Id>,
}

/// A certificate object (`ssls`). `key`/`keys` are as stored: encrypted, unless written by
/// something that stores them in the clear.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Ssl {
    #[serde(default)]
    pub id: Id,
    #[serde(rename = "type", default = "server")]
    pub kind: String,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub certs: Option<Vec<String>>,
    pub keys: Option<Vec<String>>,
    pub sni: Option<String>,
    pub snis: Option<Vec<String>>,
    pub client: Option<SslClient>,
    /// `TLSv1.2`, `TLSv1.3` (and `TLSv1.1`, which no supported TLS stack offers any more).
    pub ssl_protocols: Option<Vec<String>>,
    #[serde(default = "one")]
    pub status: i64,
}

fn server() -> String {
    "server".into()
}

impl Ssl {
    pub fn sni_list(&self) -> Vec<&str> {
        match (&self.snis, &self.sni) {
            (Some(s), _) => s.iter().map(String::as_str).collect(),
            (None, Some(s)) => vec![s.as_str()],
            (None, None) => Vec::new(),
        }
    }

    /// Certificate and key pairs: `cert`/`key` first, then `certs`/`keys` in order.
    pub fn pairs(&self) -> Vec<(&str, &str)> {
        let mut out = Vec::new();
        if let (Some(c), Some(k)) = (&self.cert, &self.key) {
            out.push((c.as_str(), k.as_str()));
        }
        if let (Some(cs), Some(ks)) = (&self.certs, &self.keys) {
            out.extend(cs.iter().map(String::as_str).zip(ks.iter().map(String::as_str)));
        }
        out
    }
}

/// Downstream mTLS: the CA client certificates must chain to, and how deep the chain may be.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct SslClient {
    pub ca: String,
    #[serde(default = "one_u32")]
    pub depth: u32,
}

fn one_u32() -> u32 {
    1
}

/// Health checks, with APISIX's defaults for every field left out.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Checks {
    pub active: Option<ActiveCheck>,
    pub passive: Option<PassiveCheck>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct ActiveCheck {
    #[serde(rename = "type")]
    pub kind: String,
    /// Seconds.
    pub timeout: f64,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub http_path: String,
    pub https_verify_certificate: bool,
    pub req_headers: Vec<String>,
    pub healthy: ActiveHealthy,
    pub unhealthy: ActiveUnhealthy,
}

impl Default for ActiveCheck {
    fn default() -> Self {
        ActiveCheck {
            kind: "http".into(),
            timeout: 1.0,
            host: None,
            port: None,
            http_path: "/".into(),
            https_verify_certificate: true,
            req_headers: Vec::new(),
            healthy: ActiveHealthy::default(),
            unhealthy: ActiveUnhealthy::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct ActiveHealthy {
    /// Seconds between probes of a healthy node.
    pub interval: u64,
    pub http_statuses: Vec<u16>,
    pub successes: u32,
}

impl Default for ActiveHealthy {
    fn default() -> Self {
        ActiveHealthy { interval: 1, http_statuses: vec![200, 302], successes: 2 }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct ActiveUnhealthy {
    /// Seconds between probes of an unhealthy node.
    pub interval: u64,
    pub http_statuses: Vec<u16>,
    pub http_failures: u32,
    pub tcp_failures: u32,
    pub timeouts: u32,
}

impl Default for ActiveUnhealthy {
    fn default() -> Self {
        ActiveUnhealthy {
            interval: 1,
            http_statuses: vec![429, 404, 500, 501, 502, 503, 504, 505],
            http_failures: 5,
            tcp_failures: 2,
            timeouts: 3,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct PassiveCheck {
    #[serde(rename = "type")]
    pub kind: String,
    pub healthy: PassiveHealthy,
    pub unhealthy: PassiveUnhealthy,
}

impl Default for PassiveCheck {
    fn default() -> Self {
        PassiveCheck { kind: "http".into(), healthy: PassiveHealthy::default(), unhealthy: PassiveUnhealthy::default() }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct PassiveHealthy {
    pub http_statuses: Vec<u16>,
    pub successes: u32,
}

impl Default for PassiveHealthy {
    fn default() -> Self {
        let statuses = (200..=208).chain([226]).chain(300..=308).collect();
        PassiveHealthy { http_statuses: statuses, successes: 5 }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct PassiveUnhealthy {
    pub http_statuses: Vec<u16>,
    pub http_failures: u32,
    pub tcp_failures: u32,
    pub timeouts: u32,
}

impl Default for PassiveUnhealthy {
    fn default() -> Self {
        PassiveUnhealthy { http_statuses: vec![429, 500, 503], http_failures: 5, tcp_failures: 2, timeouts: 7 }
    }
}

/// One upstream node. `host` is an IP or a name; the port defaults from the scheme.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub host: String,
    pub port: Option<u16>,
    pub weight: u32,
    pub priority: i64,
}

/// Nodes come either as `{"host:port": weight}` or as an array of node objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Nodes(pub Vec<Node>);

impl<'de> Deserialize<'de> for Nodes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct ArrayNode {
            host: String,
            port: Option<u16>,
            weight: u32,
            #[serde(default)]
            priority: i64,
        }
        let v = Value::deserialize(d)?;
        let mut out = Vec::new();
        match v {
            Value::Object(map) => {
                for (addr, weight) in map {
                    let (host, port) = parse_host_port(&addr)
                        .ok_or_else(|| serde::de::Error::custom(format!("invalid node address {addr}")))?;
                    let weight = weight
                        .as_u64()
                        .and_then(|w| u32::try_from(w).ok())
                        .ok_or_else(|| serde::de::Error::custom("node weight must be a non-negative integer"))?;
                    out.push(Node { host, port, weight, priority: 0 });
                }
            }
            Value::Array(items) => {
                for item in items {
                    let n: ArrayNode = serde_json::from_value(item).map_err(serde::de::Error::custom)?;
                    out.push(Node { host: n.host, port: n.port, weight: n.weight, priority: n.priority });
                }
            }
            _ => return Err(serde::de::Error::custom("nodes must be an object or an array")),
        }
        Ok(Nodes(out))
    }
}

/// Splits `host`, `host:port`, `[v6]` or `[v6]:port`. A bare IPv6 address has no port.
pub fn parse_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if s.is_empty() {
        return None;
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        addr.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse::<u16>().ok().filter(|p| *p > 0)?),
        };
        return Some((format!("[{addr}]"), port));
    }
    if s.parse::<std::net::Ipv6Addr>().is_ok() {
        return Some((format!("[{s}]"), None));
    }
    match s.rsplit_once(':') {
        Some((host, port)) => {
            let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
            (!host.is_empty()).then(|| (host.to_string(), Some(port)))
        }
        None => Some((s.to_string(), None)),
    }
}

/// Parses an IP address or a CIDR; a bare address becomes a host-length network.
pub fn parse_ip_net(s: &str) -> Option<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net);
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn host_port_forms() {
        assert_eq!(parse_host_port("127.0.0.1:80"), Some(("127.0.0.1".into(), Some(80))));
        assert_eq!(parse_host_port("example.com"), Some(("example.com".into(), None)));
        assert_eq!(parse_host_port("[::1]:8080"), Some(("[::1]".into(), Some(8080))));
        assert_eq!(parse_host_port("::1"), Some(("[::1]".into(), None)));
        assert_eq!(parse_host_port("a:0"), None);
        assert_eq!(parse_host_port("a:70000"), None);
        assert_eq!(parse_host_port(":80"), None);
    }

    #[test]
    fn nodes_in_both_shapes() {
        let u: Upstream = serde_json::from_value(json!({"nodes": {"10.0.0.1:80": 2}})).unwrap();
        assert_eq!(u.nodes.0, vec![Node { host: "10.0.0.1".into(), port: Some(80), weight: 2, priority: 0 }]);
        let u: Upstream = serde_json::from_value(
            json!({"nodes": [{"host": "a", "port": 81, "weight": 1, "priority": -1}], "type": "roundrobin"}),
        )
        .unwrap();
        assert_eq!(u.nodes.0[0].priority, -1);
        assert_eq!(u.pass_host, "pass");
    }

    #[test]
    fn checks_take_apisix_defaults() {
        let u: Upstream = serde_json::from_value(json!({"nodes": {"a:1": 1},
            "checks": {"active": {"unhealthy": {"tcp_failures": 1}}, "passive": {}}}))
        .unwrap();
        let checks = u.checks.unwrap();
        let active = checks.active.unwrap();
        assert_eq!(active.http_path, "/");
        assert_eq!(active.healthy, ActiveHealthy { interval: 1, http_statuses: vec![200, 302], successes: 2 });
        assert_eq!(active.unhealthy.tcp_failures, 1);
        assert_eq!(active.unhealthy.http_failures, 5);
        let passive = checks.passive.unwrap();
        assert_eq!(passive.unhealthy.timeouts, 7);
        assert!(passive.healthy.http_statuses.contains(&226));
    }

    #[test]
    fn ids_accept_numbers() {
        let r: Route = serde_json::from_value(json!({"id": 12, "uri": "/", "upstream_id": "u"})).unwrap();
        assert_eq!(r.id.0, "12");
        assert_eq!(r.status, 1);
    }
}
