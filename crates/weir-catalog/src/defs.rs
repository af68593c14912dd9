//! Schema pieces several kinds share, in the shape of APISIX's `schema_def.lua`, and the
//! checks of an upstream, which routes and services hold inline.

use serde_json::{Value, json};
use weir_core::model;

const ID_PATTERN: &str = "^[a-zA-Z0-9-_.]+$";
pub(crate) const HOST_PATTERN: &str = r"^\*$|^\*?[0-9a-zA-Z-._\[\]:]+$";

pub fn id_schema() -> Value {
    json!({"anyOf": [
        {"type": "string", "minLength": 1, "maxLength": 64, "pattern": ID_PATTERN},
        {"type": "integer", "minimum": 1}
    ]})
}

pub(crate) fn host_def() -> Value {
    json!({"type": "string", "pattern": HOST_PATTERN})
}

fn labels_def() -> Value {
    json!({"type": "object", "description": "key/value pairs to specify attributes",
        "patternProperties": {".*": {"type": "string", "pattern": "^\\S+$", "minLength": 1, "maxLength": 256}}})
}

pub(crate) fn timeout_def() -> Value {
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

/// An object schema: `props` plus the metadata every object carries (`id`, `desc`, `labels`,
/// times, and `name` when `named`), no other field allowed.
pub fn object_schema(props: Value, named: bool, required: &[&str]) -> Value {
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

/// The schema of an upstream, as an `upstreams` object and inline in routes, services and
/// `traffic-split` rules.
pub fn upstream_schema() -> Value {
    object_schema(
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

pub(crate) fn plugins_def() -> Value {
    json!({"type": "object"})
}

/// A JSON schema error with the field it concerns, dotted.
pub fn describe(e: &jsonschema::ValidationError<'_>) -> String {
    let path = e.instance_path().to_string();
    if path.is_empty() {
        message(e)
    } else {
        // "/upstream/nodes" reads better as "property upstream.nodes".
        let dotted = path.trim_start_matches('/').replace('/', ".");
        format!("property \"{dotted}\" validation failed: {}", message(e))
    }
}

/// Longest schema error text that quotes the value it is about.
const QUOTED_AT_MOST: usize = 512;

/// What a schema error says, quoting the value it is about only when that keeps it short: a
/// megabyte string past its `maxLength` is "value is longer than ...", not echoed back whole.
pub fn message(e: &jsonschema::ValidationError<'_>) -> String {
    let text = e.to_string();
    if text.len() <= QUOTED_AT_MOST { text } else { e.masked().to_string() }
}

/// Reads `value` as the data plane reads a `T`, and says where and why that fails. JSON
/// Schema's `integer` takes `1.0` or `1e2`, and a number may lie beyond what the data plane
/// holds; the typed read takes neither.
pub fn read_as<T: serde::de::DeserializeOwned>(value: &Value) -> Result<(), String> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(_) => Ok(()),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path.is_empty() || path == "." {
                Err(inner.to_string())
            } else {
                Err(format!("property \"{path}\" validation failed: {inner}"))
            }
        }
    }
}

/// The checks of an upstream a schema cannot say; `path` prefixes field names (`upstream.`).
pub(crate) fn check_upstream(path: &str, value: &Value, errors: &mut Vec<String>) {
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

