//! JSON schemas of the Admin API resources, in the shape of APISIX's `schema_def.lua`, and the
//! checks a schema cannot express (mutually exclusive fields, CIDRs, `vars` expressions, node
//! addresses). [`check`] reports every problem it finds, not just the first.

use std::sync::OnceLock;

use serde_json::{Value, json};

use crate::Resource;
use crate::expr::Expr;
use crate::model;

const ID_PATTERN: &str = "^[a-zA-Z0-9-_.]+$";
const HOST_PATTERN: &str = r"^\*$|^\*?[0-9a-zA-Z-._\[\]:]+$";

fn id_schema() -> Value {
    json!({"anyOf": [
        {"type": "string", "minLength": 1, "maxLength": 64, "pattern": ID_PATTERN},
        {"type": "integer", "minimum": 1}
    ]})
}

fn host_def() -> Value {
    json!({"type": "string", "pattern": HOST_PATTERN})
}

fn labels_def() -> Value {
    json!({"type": "object", "description": "key/value pairs to specify attributes",
        "patternProperties": {".*": {"type": "string", "pattern": "^\\S+$", "minLength": 1, "maxLength": 256}}})
}

fn timeout_def() -> Value {
    json!({"type": "object", "properties": {
        "connect": {"type": "number", "exclusiveMinimum": 0},
        "send": {"type": "number", "exclusiveMinimum": 0},
        "read": {"type": "number", "exclusiveMinimum": 0}
    }, "required": ["connect", "send", "read"], "additionalProperties": false})
}

/// Metadata fields every resource carries.
fn with_metadata(mut props: serde_json::Map<String, Value>, named: bool) -> serde_json::Map<String, Value> {
    props.insert("id".into(), id_schema());
    if named {
        props.insert("name".into(), json!({"type": "string", "minLength": 1, "maxLength": 256}));
    }
    props.insert("desc".into(), json!({"type": "string", "maxLength": 256}));
    props.insert("labels".into(), labels_def());
    props.insert("create_time".into(), json!({"type": "integer"}));
    props.insert("update_time".into(), json!({"type": "integer"}));
    props
}

fn object(props: Value, named: bool, required: &[&str]) -> Value {
    let Value::Object(props) = props else { unreachable!("schema properties are an object") };
    json!({
        "type": "object",
        "properties": with_metadata(props, named),
        "required": required,
        "additionalProperties": false,
    })
}

fn health_checks() -> Value {
    let statuses = json!({"type": "array", "minItems": 1, "uniqueItems": true,
        "items": {"type": "integer", "minimum": 200, "maximum": 599}});
    json!({"type": "object", "properties": {
        "active": {"type": "object", "properties": {
            "type": {"type": "string", "enum": ["http", "https", "tcp"], "default": "http"},
            "timeout": {"type": "number", "default": 1},
            "concurrency": {"type": "integer", "default": 10},
            "host": host_def(),
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "http_path": {"type": "string", "default": "/"},
            "https_verify_certificate": {"type": "boolean", "default": true},
            "req_headers": {"type": "array", "minItems": 1, "items": {"type": "string", "uniqueItems": true}},
            "healthy": {"type": "object", "properties": {
                "interval": {"type": "integer", "minimum": 1, "default": 1},
                "http_statuses": statuses,
                "successes": {"type": "integer", "minimum": 1, "maximum": 254, "default": 2}
            }},
            "unhealthy": {"type": "object", "properties": {
                "interval": {"type": "integer", "minimum": 1, "default": 1},
                "http_statuses": statuses,
                "http_failures": {"type": "integer", "minimum": 1, "maximum": 254, "default": 5},
                "tcp_failures": {"type": "integer", "minimum": 1, "maximum": 254, "default": 2},
                "timeouts": {"type": "integer", "minimum": 1, "maximum": 254, "default": 3}
            }}
        }},
        "passive": {"type": "object", "properties": {
            "type": {"type": "string", "enum": ["http", "https", "tcp"], "default": "http"},
            "healthy": {"type": "object", "properties": {
                "http_statuses": statuses,
                "successes": {"type": "integer", "minimum": 0, "maximum": 254, "default": 5}
            }},
            "unhealthy": {"type": "object", "properties": {
                "http_statuses": statuses,
                "http_failures": {"type": "integer", "minimum": 0, "maximum": 254, "default": 5},
                "tcp_failures": {"type": "integer", "minimum": 0, "maximum": 254, "default": 2},
                "timeouts": {"type": "integer", "minimum": 0, "maximum": 254, "default": 7}
            }}
        }}
    }, "anyOf": [{"required": ["active"]}, {"required": ["active", "passive"]}]})
}

fn upstream_schema() -> Value {
    object(
        json!({
            // if/then/else rather than anyOf, so an error names the field that is wrong.
            "nodes": {"type": ["object", "array"], "if": {"type": "object"},
                "then": {"type": "object", "patternProperties": {".*": {"type": "integer", "minimum": 0}}},
                "else": {"type": "array", "items": {"type": "object", "properties": {
                    "host": host_def(),
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "weight": {"type": "integer", "minimum": 0},
                    "priority": {"type": "integer", "default": 0},
                    "metadata": {"type": "object"}
                }, "required": ["host", "weight"]}}
            },
            "retries": {"type": "integer", "minimum": 0},
            "retry_timeout": {"type": "number", "minimum": 0},
            "timeout": timeout_def(),
            "tls": {"type": "object", "properties": {
                "client_cert_id": id_schema(),
                "client_cert": {"type": "string", "minLength": 128, "maxLength": 65536},
                "client_key": {"type": "string", "minLength": 64, "maxLength": 65536},
                "verify": {"type": "boolean", "default": false}
            }, "dependencies": {
                "client_cert": {"required": ["client_key"]},
                "client_key": {"required": ["client_cert"]}
            }},
            "keepalive_pool": {"type": "object", "properties": {
                "size": {"type": "integer", "minimum": 1, "default": 320},
                "idle_timeout": {"type": "number", "minimum": 0, "default": 60},
                "requests": {"type": "integer", "minimum": 1, "default": 1000}
            }},
            "type": {"type": "string", "default": "roundrobin",
                "enum": ["roundrobin", "chash", "ewma", "least_conn"]},
            "checks": health_checks(),
            "hash_on": {"type": "string", "default": "vars",
                "enum": ["vars", "header", "cookie", "consumer", "vars_combinations"]},
            "key": {"type": "string"},
            "scheme": {"default": "http", "enum": ["grpc", "grpcs", "http", "https"]},
            "pass_host": {"type": "string", "enum": ["pass", "node", "rewrite"], "default": "pass"},
            "upstream_host": host_def(),
            "service_name": {"type": "string", "minLength": 1, "maxLength": 256},
            "discovery_type": {"type": "string"}
        }),
        true,
        &["nodes"],
    )
}

fn plugins_def() -> Value {
    json!({"type": "object"})
}

fn route_schema() -> Value {
    let remote_addr = json!({"type": "string", "description": "client IP or CIDR"});
    object(
        json!({
            "uri": {"type": "string", "minLength": 1, "maxLength": 4096},
            "uris": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 4096},
                "minItems": 1, "uniqueItems": true},
            "priority": {"type": "integer", "default": 0},
            "methods": {"type": "array", "uniqueItems": true, "items": {"type": "string",
                "enum": ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE"]}},
            "host": host_def(),
            "hosts": {"type": "array", "items": host_def(), "minItems": 1, "uniqueItems": true},
            "remote_addr": remote_addr,
            "remote_addrs": {"type": "array", "items": remote_addr, "minItems": 1, "uniqueItems": true},
            "timeout": timeout_def(),
            "vars": {"type": "array"},
            "plugins": plugins_def(),
            "plugin_config_id": id_schema(),
            "upstream": upstream_schema(),
            "service_id": id_schema(),
            "upstream_id": id_schema(),
            "enable_websocket": {"type": "boolean"},
            "status": {"type": "integer", "enum": [1, 0], "default": 1}
        }),
        true,
        &[],
    )
}

/// The JSON schema of a resource, as served by `GET /apisix/admin/schema/{resource}`.
pub fn schema_of(resource: Resource) -> &'static Value {
    static SCHEMAS: OnceLock<Vec<Value>> = OnceLock::new();
    let all = SCHEMAS.get_or_init(|| Resource::ALL.iter().map(|r| build_schema(*r)).collect());
    &all[Resource::ALL.iter().position(|r| *r == resource).expect("every resource has a schema")]
}

fn build_schema(resource: Resource) -> Value {
    match resource {
        Resource::Routes => route_schema(),
        Resource::Upstreams => upstream_schema(),
        Resource::Services => object(
            json!({
                "plugins": plugins_def(),
                "upstream": upstream_schema(),
                "upstream_id": id_schema(),
                "enable_websocket": {"type": "boolean"},
                "hosts": {"type": "array", "items": host_def(), "minItems": 1, "uniqueItems": true}
            }),
            true,
            &[],
        ),
        Resource::Consumers => {
            let mut s = object(
                json!({
                    "username": {"type": "string", "minLength": 1, "maxLength": 256,
                        "pattern": "^[a-zA-Z0-9_\\-]+$"},
                    "group_id": id_schema(),
                    "plugins": plugins_def()
                }),
                false,
                &["username"],
            );
            s["properties"].as_object_mut().expect("object").remove("id");
            s
        }
        Resource::Credentials => object(
            json!({"plugins": {"type": "object", "maxProperties": 1}}),
            true,
            &[],
        ),
        Resource::ConsumerGroups => object(json!({"plugins": plugins_def()}), true, &["plugins"]),
        Resource::PluginConfigs => object(json!({"plugins": plugins_def()}), true, &["plugins"]),
        Resource::GlobalRules => object(json!({"plugins": plugins_def()}), false, &["plugins"]),
        Resource::Ssls => {
            let cert = json!({"type": "string", "minLength": 128, "maxLength": 65536});
            let key = json!({"type": "string", "minLength": 64, "maxLength": 65536});
            object(
                json!({
                    "type": {"type": "string", "enum": ["server", "client"], "default": "server"},
                    "cert": cert, "key": key,
                    "sni": {"type": "string", "pattern": HOST_PATTERN},
                    "snis": {"type": "array", "items": {"type": "string", "pattern": HOST_PATTERN}, "minItems": 1},
                    "certs": {"type": "array", "items": cert},
                    "keys": {"type": "array", "items": key},
                    "client": {"type": "object", "properties": {
                        "ca": cert,
                        "depth": {"type": "integer", "minimum": 0, "default": 1},
                        "skip_mtls_uri_regex": {"type": "array", "minItems": 1, "uniqueItems": true,
                            "items": {"type": "string"}}
                    }, "required": ["ca"]},
                    "status": {"type": "integer", "enum": [1, 0], "default": 1},
                    "ssl_protocols": {"type": "array", "maxItems": 3, "uniqueItems": true,
                        "items": {"enum": ["TLSv1.1", "TLSv1.2", "TLSv1.3"]}}
                }),
                false,
                &["cert", "key"],
            )
        }
        // Plugin metadata is checked against the named plugin's metadata schema.
        Resource::PluginMetadata => json!({"type": "object"}),
    }
}

fn validator(resource: Resource) -> &'static jsonschema::Validator {
    static VALIDATORS: OnceLock<Vec<jsonschema::Validator>> = OnceLock::new();
    let all = VALIDATORS.get_or_init(|| {
        Resource::ALL
            .iter()
            .map(|r| jsonschema::validator_for(schema_of(*r)).expect("built-in schemas compile"))
            .collect()
    });
    &all[Resource::ALL.iter().position(|r| *r == resource).expect("every resource has a schema")]
}

/// The plugins the gateway knows, as the validator sees them: a name and a config schema.
pub trait PluginCatalog: Send + Sync {
    /// The JSON schema of the plugin's configuration, or `None` for an unknown plugin.
    fn config_schema(&self, name: &str) -> Option<&Value>;

    /// Every plugin name, sorted.
    fn names(&self) -> Vec<&str>;

    /// The schema of the plugin's config on a consumer or credential (an auth plugin's
    /// secret), when it differs from the route config.
    fn consumer_schema(&self, _name: &str) -> Option<&Value> {
        None
    }

    /// Checks a config the schema accepted for what a schema cannot say (a regex that does not
    /// compile, options that exclude each other).
    fn check_config(&self, _name: &str, _conf: &Value) -> Result<(), String> {
        Ok(())
    }

    /// Checks a consumer's (or credential's) config of an auth plugin beyond its schema: a
    /// public key that does not parse, say.
    fn check_consumer_config(&self, _name: &str, _conf: &Value) -> Result<(), String> {
        Ok(())
    }

    /// The schema of `_meta`, which every plugin config may carry.
    fn meta_schema(&self) -> Value {
        json!({"type": "object"})
    }
}

/// A catalog with no plugins: every plugin name is unknown.
pub struct NoPlugins;

impl PluginCatalog for NoPlugins {
    fn config_schema(&self, _name: &str) -> Option<&Value> {
        None
    }

    fn names(&self) -> Vec<&str> {
        Vec::new()
    }
}

/// How deeply an object's arrays and objects may nest. Real configs stay far below it; the
/// data plane's JSON reader and every recursive walk over a config stay far within their
/// stacks.
pub const MAX_DEPTH: usize = 64;

/// How deeply `value` nests (a scalar is 0), counted without recursion.
pub fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, d)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        deepest = deepest.max(d + 1);
        stack.extend(children.map(|c| (c, d + 1)));
    }
    deepest
}

/// Every problem with `value` as a `resource` object, checked without the store. References to
/// other objects are the caller's to check.
pub fn check(resource: Resource, value: &Value, plugins: &dyn PluginCatalog) -> Result<(), Vec<String>> {
    if depth(value) > MAX_DEPTH {
        return Err(vec![format!("the configuration nests deeper than {MAX_DEPTH} levels")]);
    }
    let mut errors = Vec::new();
    check_schema(resource, value, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    match resource {
        Resource::Routes => check_route(value, &mut errors),
        Resource::Upstreams => check_upstream("", value, &mut errors),
        Resource::Services => {
            if let Some(up) = value.get("upstream") {
                check_upstream("upstream.", up, &mut errors);
            }
        }
        Resource::Ssls => {
            let is_server = value.get("type").and_then(Value::as_str).unwrap_or("server") == "server";
            if is_server && value.get("sni").is_none() && value.get("snis").is_none() {
                errors.push("one of sni or snis is required for a server certificate".into());
            }
            if value.get("sni").is_some() && value.get("snis").is_some() {
                errors.push("only one of sni or snis is allowed".into());
            }
        }
        _ => {}
    }
    if let Some(Value::Object(plugins_conf)) = value.get("plugins") {
        let on_consumer = matches!(resource, Resource::Consumers | Resource::Credentials);
        let meta_schema = plugins.meta_schema();
        for (name, conf) in plugins_conf {
            let schema = if on_consumer {
                plugins.consumer_schema(name).or_else(|| plugins.config_schema(name))
            } else {
                plugins.config_schema(name)
            };
            let Some(schema) = schema else {
                errors.push(format!("unknown plugin [{name}]"));
                continue;
            };
            let mut plain = conf.clone();
            let meta = plain.as_object_mut().and_then(|o| o.remove("_meta"));
            let check = |schema: &Value, v: &Value, what: &str, errors: &mut Vec<String>| match jsonschema::validator_for(schema) {
                Ok(validator) => {
                    for e in validator.iter_errors(v) {
                        errors.push(format!("failed to check the configuration of plugin {name}{what}: {}", describe(&e)));
                    }
                }
                Err(e) => errors.push(format!("plugin {name} has an invalid schema: {e}")),
            };
            let before = errors.len();
            check(schema, &plain, "", &mut errors);
            if errors.len() == before {
                let checked = if on_consumer { plugins.check_consumer_config(name, &plain) } else { plugins.check_config(name, &plain) };
                if let Err(e) = checked {
                    errors.push(format!("failed to check the configuration of plugin {name}: {e}"));
                }
            }
            if let Some(meta) = &meta {
                check(&meta_schema, meta, " (_meta)", &mut errors);
                if let Some(filter) = meta.get("filter")
                    && let Err(e) = crate::expr::Expr::compile(filter)
                {
                    errors.push(format!("failed to check the configuration of plugin {name} (_meta): filter: {e}"));
                }
            }
        }
    }
    // Last, once everything else holds: the data plane's own read of the object.
    if errors.is_empty()
        && let Err(e) = model::check_readable(resource, value)
    {
        errors.push(e);
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

fn describe(e: &jsonschema::ValidationError<'_>) -> String {
    let path = e.instance_path().to_string();
    if path.is_empty() {
        e.to_string()
    } else {
        // "/upstream/nodes" reads better as "property upstream.nodes".
        let dotted = path.trim_start_matches('/').replace('/', ".");
        format!("property \"{dotted}\" validation failed: {e}")
    }
}

fn check_schema(resource: Resource, value: &Value, errors: &mut Vec<String>) {
    if !value.is_object() {
        errors.push("the configuration must be a JSON object".into());
        return;
    }
    errors.extend(validator(resource).iter_errors(value).map(|e| describe(&e)));
}

fn check_route(value: &Value, errors: &mut Vec<String>) {
    let has = |k: &str| value.get(k).is_some();
    match (has("uri"), has("uris")) {
        (false, false) => errors.push("one of uri or uris is required".into()),
        (true, true) => errors.push("only one of uri or uris is allowed".into()),
        _ => {}
    }
    if has("host") && has("hosts") {
        errors.push("only one of host or hosts is allowed".into());
    }
    if has("remote_addr") && has("remote_addrs") {
        errors.push("only one of remote_addr or remote_addrs is allowed".into());
    }
    if !["plugins", "upstream", "upstream_id", "service_id"].iter().any(|k| has(k)) {
        errors.push("a route needs one of plugins, upstream, upstream_id or service_id".into());
    }
    let addrs = value
        .get("remote_addrs")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect::<Vec<_>>())
        .or_else(|| value.get("remote_addr").map(|v| vec![v]))
        .unwrap_or_default();
    for a in addrs {
        if let Some(s) = a.as_str()
            && model::parse_ip_net(s).is_none() {
                errors.push(format!("invalid remote_addr \"{s}\": not an IP address or CIDR"));
            }
    }
    if let Some(vars) = value.get("vars")
        && let Err(e) = Expr::compile(vars) {
            errors.push(format!("failed to validate the 'vars' expression: {e}"));
        }
    if let Some(up) = value.get("upstream") {
        check_upstream("upstream.", up, errors);
    }
}

fn check_upstream(path: &str, value: &Value, errors: &mut Vec<String>) {
    if let Some(Value::Object(nodes)) = value.get("nodes") {
        for addr in nodes.keys() {
            if model::parse_host_port(addr).is_none() {
                errors.push(format!("invalid {path}nodes key \"{addr}\": expected host or host:port"));
            }
        }
    }
    if value.get("type").and_then(Value::as_str) == Some("chash") && value.get("key").is_none() {
        errors.push(format!("{path}key is required when type is chash"));
    }
    if value.get("pass_host").and_then(Value::as_str) == Some("rewrite")
        && value.get("upstream_host").is_none()
    {
        errors.push(format!("{path}upstream_host is required when pass_host is rewrite"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(r: Resource, v: Value) -> Vec<String> {
        check(r, &v, &NoPlugins).err().unwrap_or_default()
    }

    #[test]
    fn valid_route_passes() {
        let v = json!({"uri": "/a", "upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:80": 1}}});
        assert_eq!(errs(Resource::Routes, v), Vec::<String>::new());
    }

    #[test]
    fn route_reports_every_problem() {
        let v = json!({"uri": "/a", "uris": ["/b"], "host": "a.com", "hosts": ["b.com"],
            "remote_addr": "1.2.3.999", "vars": [["arg_a", "@@", "1"]], "upstream_id": 1});
        let e = errs(Resource::Routes, v);
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e.iter().any(|m| m.contains("uri or uris")));
        assert!(e.iter().any(|m| m.contains("host or hosts")));
        assert!(e.iter().any(|m| m.contains("1.2.3.999")));
        assert!(e.iter().any(|m| m.contains("vars")));
    }

    #[test]
    fn unknown_fields_and_types_are_named() {
        let e = errs(Resource::Routes, json!({"uri": 5, "upstream_id": "1", "bogus": true}));
        assert!(e.iter().any(|m| m.contains("bogus")), "{e:?}");
        assert!(e.iter().any(|m| m.contains("\"uri\"")), "{e:?}");
    }

    #[test]
    fn unknown_plugin_is_refused() {
        let e = errs(Resource::Routes, json!({"uri": "/", "plugins": {"nope": {}}}));
        assert_eq!(e, vec!["unknown plugin [nope]".to_string()]);
    }

    #[test]
    fn upstream_nodes_are_checked() {
        let e = errs(Resource::Upstreams, json!({"nodes": {"127.0.0.1:99999": 1}}));
        assert_eq!(e.len(), 1, "{e:?}");
        let e = errs(Resource::Upstreams, json!({"nodes": [{"host": "a", "port": 1}]}));
        assert!(e.iter().any(|m| m.contains("weight")), "{e:?}");
        assert!(errs(Resource::Upstreams, json!({"type": "chash", "nodes": {"a:1": 1}}))[0].contains("key"));
    }

    #[test]
    fn numbers_the_data_plane_cannot_hold_exactly_are_refused() {
        let route = |extra: &str| -> Value {
            serde_json::from_str(&format!(r#"{{"uri": "/a", "upstream_id": "1", {extra}}}"#)).unwrap()
        };
        for (extra, field) in [
            (r#""priority": 1.0"#, "priority"),
            (r#""priority": 1e2"#, "priority"),
            (r#""priority": 9223372036854775808"#, "priority"),
            (r#""status": 1.0"#, "status"),
        ] {
            let e = errs(Resource::Routes, route(extra));
            assert_eq!(e.len(), 1, "{extra}: {e:?}");
            assert!(e[0].contains(&format!("\"{field}\"")), "{extra}: {e:?}");
        }
        assert!(errs(Resource::Routes, route(r#""priority": -9223372036854775808"#)).is_empty());
        let e = errs(Resource::Upstreams, serde_json::from_str(r#"{"nodes": {"127.0.0.1:80": 1.0}}"#).unwrap());
        assert_eq!(e.len(), 1, "{e:?}");
        let e = errs(Resource::Upstreams, serde_json::from_str(r#"{"nodes": [{"host": "a", "port": 80, "weight": 1.0}]}"#).unwrap());
        assert_eq!(e.len(), 1, "{e:?}");
        let e = errs(Resource::Routes, serde_json::from_str(r#"{"uri": "/", "upstream": {"nodes": {"a:1": 1}, "retries": 2.0}}"#).unwrap());
        assert!(e[0].contains("upstream.retries"), "{e:?}");
    }

    #[test]
    fn consumer_needs_username() {
        assert!(!errs(Resource::Consumers, json!({})).is_empty());
        assert!(errs(Resource::Consumers, json!({"username": "jack"})).is_empty());
        assert!(!errs(Resource::Consumers, json!({"username": "ja ck"})).is_empty());
    }
}
