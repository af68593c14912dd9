//! What a tenant may not put in its gateway, whatever the plugin schemas allow: the node and
//! the operator's systems are not the tenant's to reach, and one tenant's settings are not
//! another's to share.

use std::net::IpAddr;

use serde_json::{Map, Value};

use crate::PlatformConfig;

/// The largest a plugin layer may be, as JSON: a gateway is copied into every environment's
/// plugin config and every node's memory.
pub const MAX_LAYER_BYTES: usize = 64 * 1024;

/// The most bytes of names and values a gateway's variables hold in all: they are copied into
/// every environment's document as its plugin layers are.
pub const MAX_VARS_BYTES: usize = 64 * 1024;

/// Regular expressions a layer may hold (`allow_origins_by_regex`, `regex_uri`, the patterns
/// of `~~`/`~*` rules, and a JSON schema's `pattern` and `patternProperties`), and the most
/// each may compile to: every node compiles each of them for every route the layer is on,
/// and keeps a matching cache beside each.
const MAX_PATTERNS: usize = 32;
const PATTERN_SIZE: usize = 1 << 20;

/// Plugins that can count in Redis: their counters would be shared across tenants.
const COUNTERS: [&str; 3] = ["limit-count", "limit-req", "limit-conn"];

/// Problems with a tenant's plugin layer.
pub fn layer(cfg: &PlatformConfig, what: &str, plugins: &Map<String, Value>, problems: &mut Vec<String>) {
    for name in plugins.keys().filter(|n| cfg.denied_plugins.contains(n)) {
        problems.push(format!("{what}: plugin {name} is not available on this platform"));
    }
    let size = serde_json::to_vec(plugins).map_or(0, |v| v.len());
    if size > MAX_LAYER_BYTES {
        problems.push(format!("{what}: {size} bytes, more than the {MAX_LAYER_BYTES} a layer may hold"));
    }
    for (name, conf) in plugins {
        sealed_mark(&format!("{what}.{name}"), conf, problems);
        if weir_functions::live::SCOPED_AUTH.contains(&name.as_str()) && conf.get("scope").is_some() {
            problems.push(format!("{what}: {name}.scope is the platform's: a layer's {name} accepts its environment's grants"));
        }
        if name == weir_plugins::cookie_scope::NAME {
            problems.push(format!("{what}: {name} is the platform's own, on every route of every gateway"));
        }
        // `cookie-scope` sees a response's fields last: no plugin of a tenant's runs after it.
        match conf.pointer("/_meta/priority").map(Value::as_i64) {
            Some(Some(p)) if p <= weir_plugins::cookie_scope::PRIORITY => {
                problems.push(format!("{what}: {name}._meta.priority must be above {}, where the platform's cookie-scope runs", weir_plugins::cookie_scope::PRIORITY));
            }
            Some(None) => problems.push(format!("{what}: {name}._meta.priority must be an integer")),
            _ => {}
        }
        // An auth plugin the platform makes no grants of would accept only the operator's
        // consumers.
        if name == "hmac-auth" {
            problems.push(format!("{what}: {name} takes only the operator's consumers; the platform's grants are key-auth, basic-auth and jwt-auth"));
        }
    }
    let (mut found, mut schema) = (Vec::new(), Vec::new());
    plugins.values().for_each(|conf| patterns(conf, &mut found, &mut schema));
    // A schema's patterns are ECMA's, which the validator rewrites before compiling (`\w` is
    // ASCII there): they count, and their size is the validator's own bound.
    if found.len() + schema.len() > MAX_PATTERNS {
        problems.push(format!("{what}: {} regular expressions, more than the {MAX_PATTERNS} a layer may hold", found.len() + schema.len()));
    } else {
        for pattern in found {
            if let Err(regex::Error::CompiledTooBig(_)) = regex::RegexBuilder::new(&pattern).size_limit(PATTERN_SIZE).dfa_size_limit(PATTERN_SIZE).build() {
                problems.push(format!("{what}: the regular expression `{pattern}` compiles to more than {} KiB", PATTERN_SIZE >> 10));
            }
        }
    }
    // A `group` shares a plugin's state (counters, a breaker's) among every route that names
    // it, whoever's: no tenant's plugin has one.
    for (name, conf) in plugins {
        if conf.get("group").is_some() {
            problems.push(format!("{what}: {name}.group would share its state beyond this gateway"));
        }
    }
    for name in COUNTERS {
        let Some(conf) = plugins.get(name) else { continue };
        if conf.get("policy").and_then(Value::as_str).is_some_and(|p| p != "local") {
            problems.push(format!("{what}: {name}.policy must be local: shared counters are the operator's"));
        }
    }
}

/// The regular expressions in a plugin's config, as the plugins compile them: the entries of
/// `allow_origins_by_regex`, `block_rules` (ignoring case with `case_insensitive`),
/// `allowlist` and `denylist`, the patterns of `regex_uri` (pattern, replacement, ...), the
/// pattern of a rule `[var, "~~" | "~*", pattern]` or `[var, "!", "~~" | "~*", pattern]` (`~*`
/// ignoring case), and a schema's `pattern` and the keys of its `patternProperties`, at any
/// depth.
fn patterns(conf: &Value, found: &mut Vec<String>, schema: &mut Vec<String>) {
    let strings = |a: &Vec<Value>, prefix: &str, found: &mut Vec<String>| found.extend(a.iter().filter_map(Value::as_str).map(|p| format!("{prefix}{p}")));
    match conf {
        Value::Object(o) => {
            for (key, v) in o {
                match (key.as_str(), v) {
                    ("allow_origins_by_regex" | "allowlist" | "denylist", Value::Array(a)) => strings(a, "", found),
                    ("block_rules", Value::Array(a)) => strings(a, if o.get("case_insensitive") == Some(&Value::Bool(true)) { "(?i)" } else { "" }, found),
                    ("regex_uri", Value::Array(a)) => found.extend(a.iter().step_by(2).filter_map(Value::as_str).map(str::to_string)),
                    // A JSON schema's (request-validation): counted wherever one appears.
                    ("pattern", Value::String(p)) => schema.push(p.clone()),
                    ("patternProperties", Value::Object(props)) => {
                        schema.extend(props.keys().cloned());
                        props.values().for_each(|v| patterns(v, found, schema));
                    }
                    _ => patterns(v, found, schema),
                }
            }
        }
        Value::Array(a) => {
            let op = if a.get(1).and_then(Value::as_str) == Some("!") { 2 } else { 1 };
            if let (Some(op @ ("~~" | "~*")), Some(p)) = (a.get(op).and_then(Value::as_str), a.get(op + 1).and_then(Value::as_str)) {
                found.push(if op == "~*" { format!("(?i){p}") } else { p.to_string() });
            }
            a.iter().for_each(|v| patterns(v, found, schema));
        }
        _ => {}
    }
}

/// A tenant's value that looks sealed: the node would open it as its own secret, so it is
/// refused wherever it appears (tenants see their secrets opened and never send one sealed).
pub fn sealed_mark(what: &str, value: &Value, problems: &mut Vec<String>) {
    match value {
        Value::String(s) if s.starts_with(weir_tls::FIELD_MARK) => problems.push(format!("{what}: a value may not start with {}", weir_tls::FIELD_MARK)),
        Value::Array(a) => a.iter().for_each(|v| sealed_mark(what, v, problems)),
        Value::Object(o) => o.values().for_each(|v| sealed_mark(what, v, problems)),
        _ => {}
    }
}

/// Problems with a tenant's upstream: nodes the node itself answers on (loopback, link-local
/// metadata, `platform.denied_networks`), and fields that name the operator's objects.
pub fn upstream(cfg: &PlatformConfig, what: &str, up: &Value, problems: &mut Vec<String>) {
    for field in ["service_name", "discovery_type"] {
        if up.get(field).is_some() {
            problems.push(format!("{what}.{field}: service discovery is the operator's"));
        }
    }
    if up.get("tls").and_then(|t| t.get("client_cert_id")).is_some() {
        problems.push(format!("{what}.tls.client_cert_id: the operator's certificates are not a tenant's to present"));
    }
    let hosts: Vec<String> = match up.get("nodes") {
        Some(Value::Object(m)) => m.keys().map(|k| host_of(k).to_string()).collect(),
        Some(Value::Array(a)) => a.iter().filter_map(|n| n.get("host").and_then(Value::as_str)).map(str::to_string).collect(),
        _ => Vec::new(),
    };
    for host in hosts {
        if let Some(reason) = denied_host(cfg, &host) {
            problems.push(format!("{what}.nodes: {host} {reason}"));
        }
    }
}

/// `host:port`, `[v6]:port` or a bare host, without the port.
fn host_of(node: &str) -> &str {
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match node.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => h,
        _ => node,
    }
}

fn denied_host(cfg: &PlatformConfig, host: &str) -> Option<&'static str> {
    // A name's trailing dot (`localhost.`) names the same host.
    let lower = host.to_ascii_lowercase();
    let lower = lower.trim_end_matches('.');
    if lower == "localhost" || lower.ends_with(".localhost") {
        return Some("is this node");
    }
    // An IPv6 address that carries an IPv4 one (`::ffff:127.0.0.1`) is checked as that one.
    let ip = weir_functions::guard::canonical(host.parse().ok()?);
    cfg.denied_networks
        .iter()
        .filter_map(|n| n.parse::<ipnet::IpNet>().ok())
        .any(|n| n.contains(&ip))
        .then_some("is in a network tenants may not reach (platform.denied_networks)")
}

/// Problems with a custom domain beyond its form: an address is not a domain.
pub fn domain(field: &str, host: &str, problems: &mut Vec<String>) {
    if host.parse::<IpAddr>().is_ok() {
        problems.push(format!("{field}: {host} is an address, not a domain"));
    }
}

/// Whether a route's host pattern (`api.example.com`, `*.example.com`) takes `host`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => host.ends_with(&format!(".{suffix}")),
        None => pattern == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_layer_holds_few_regular_expressions_of_bounded_size() {
        let cfg = PlatformConfig::default();
        let check = |layer_json: Value| {
            let mut p = Vec::new();
            layer(&cfg, "l", layer_json.as_object().unwrap(), &mut p);
            p
        };
        // Where the plugins find them: cors, regex_uri pairs, and rules at any depth.
        let (mut found, mut schema) = (Vec::new(), Vec::new());
        patterns(&json!({"cors": {"allow_origins_by_regex": ["^a$", "^b$"]}, "proxy-rewrite": {"regex_uri": ["^/x/(.*)", "/$1", "^/y", "/z"]},
            "uri-blocker": {"block_rules": ["^/admin"], "case_insensitive": true}, "ua-restriction": {"allowlist": ["curl"], "denylist": ["bot"]},
            "x": {"_meta": {"filter": [["arg_a", "~~", "p1"], ["arg_b", "!", "~*", "p2"], ["arg_c", "==", "~~"], ["arg_d", "in", ["~~", "not a pattern"]]]}}}), &mut found, &mut schema);
        assert_eq!(found, ["^a$", "^b$", "^/x/(.*)", "^/y", "(?i)^/admin", "curl", "bot", "p1", "(?i)p2"]);
        assert!(schema.is_empty());
        // A request-validation schema's patterns, nested too: counted, and sized by the
        // validator (whose `\w` is ASCII), not here.
        let (mut found, mut schema) = (Vec::new(), Vec::new());
        patterns(&json!({"request-validation": {"header_schema": {"properties": {"x": {"type": "string", "pattern": "^h$"}}, "patternProperties": {"^k": {"pattern": "^v$"}}}}}), &mut found, &mut schema);
        assert_eq!((found.len(), schema), (0, vec!["^h$".to_string(), "^k".into(), "^v$".into()]));
        assert_eq!(check(json!({"request-validation": {"body_schema": {"properties": {"user": {"type": "string", "pattern": "^\\w{1,100}$"}}}}})), Vec::<String>::new());
        let many: Vec<(String, Value)> = (0..=MAX_PATTERNS).map(|i| (format!("^k{i}"), json!({}))).collect();
        let p = check(json!({"request-validation": {"body_schema": {"type": "object", "patternProperties": Map::from_iter(many)}}}));
        assert_eq!(p, ["l: 33 regular expressions, more than the 32 a layer may hold"]);
        let ok = json!({"cors": {"allow_origins_by_regex": [r"^https://[a-z]+\.example\.com$"]}, "proxy-rewrite": {"regex_uri": ["^/api/(.*)", "/$1"]}});
        assert_eq!(check(ok), Vec::<String>::new());
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("^o{i}$")).collect();
        let p = check(json!({"cors": {"allow_origins_by_regex": many}}));
        assert_eq!(p, ["l: 33 regular expressions, more than the 32 a layer may hold"]);
        // A few bytes that compile to megabytes (Unicode word characters, repeated).
        let p = check(json!({"x": {"_meta": {"filter": [["arg_a", "~*", r"\w{200}"]]}}}));
        assert_eq!(p, [r"l: the regular expression `(?i)\w{200}` compiles to more than 1024 KiB"]);
    }

    #[test]
    fn the_node_and_the_operators_objects_are_out_of_reach() {
        let cfg = PlatformConfig::default();
        let mut p = Vec::new();
        upstream(&cfg, "u", &json!({"nodes": {"127.0.0.1:2379": 1, "[::1]:9180": 1, "169.254.169.254:80": 1, "localhost:80": 1, "LOCALHOST.:81": 1, "10.1.2.3:80": 1, "backend.example.test:80": 1}}), &mut p);
        assert_eq!(p.len(), 5, "{p:?}");
        let mut p = Vec::new();
        upstream(&cfg, "u", &json!({"nodes": {"[::ffff:127.0.0.1]:2379": 1, "[::ffff:a9fe:a9fe]:80": 1, "[64:ff9b::7f00:1]:9180": 1, "[::ffff:93.184.215.14]:80": 1}}), &mut p);
        assert_eq!(p.len(), 3, "IPv6 forms of refused IPv4 addresses: {p:?}");
        let mut p = Vec::new();
        upstream(&cfg, "u", &json!({"nodes": [{"host": "127.0.0.2", "port": 80, "weight": 1}], "service_name": "x", "tls": {"client_cert_id": "1"}}), &mut p);
        assert_eq!(p.len(), 3, "{p:?}");
        let mut p = Vec::new();
        layer(&cfg, "l", json!({"limit-count": {"count": 1, "time_window": 1, "group": "g", "policy": "redis"}, "file-logger": {"path": "/x"}}).as_object().unwrap(), &mut p);
        assert_eq!(p.len(), 3, "{p:?}");
        let mut p = Vec::new();
        layer(&cfg, "l", json!({"hmac-auth": {}}).as_object().unwrap(), &mut p);
        assert_eq!(p, ["l: hmac-auth takes only the operator's consumers; the platform's grants are key-auth, basic-auth and jwt-auth"]);
        // No plugin of a tenant's shares state by group.
        let mut p = Vec::new();
        layer(&cfg, "l", json!({"api-breaker": {"break_response_code": 503, "group": "g"}, "cors": {}}).as_object().unwrap(), &mut p);
        assert_eq!(p, ["l: api-breaker.group would share its state beyond this gateway"]);
        let mut p = Vec::new();
        let sealed = format!("{}AAAA", weir_tls::FIELD_MARK);
        layer(&cfg, "l", json!({"key-auth": {"header": sealed}, "response-rewrite": {"headers": {"set": {"x": [sealed]}}}, "cors": {"allow_origins": "*"}}).as_object().unwrap(), &mut p);
        assert_eq!(p, ["l.key-auth: a value may not start with $weir-sealed$", "l.response-rewrite: a value may not start with $weir-sealed$"]);
        let mut p = Vec::new();
        layer(&cfg, "l", json!({"key-auth": {"scope": "wp.other.prod"}, "basic-auth": {}, "jwt-auth": {"scope": "wp.other.dev"}}).as_object().unwrap(), &mut p);
        assert_eq!(p, ["l: key-auth.scope is the platform's: a layer's key-auth accepts its environment's grants", "l: jwt-auth.scope is the platform's: a layer's jwt-auth accepts its environment's grants"]);
        let mut p = Vec::new();
        domain("d", "10.0.0.5", &mut p);
        assert_eq!(p.len(), 1);
        assert!(host_matches("*.operator.test", "x.operator.test") && host_matches("API.operator.test", "api.operator.test"));
        assert!(!host_matches("*.operator.test", "operator.test"));
    }
}
