//! `routes`: what a request must look like, and where it goes.

use std::sync::OnceLock;

use serde_json::{Value, json};
use weir_core::expr::Expr;
use weir_core::model::{self, Route};
use weir_tls::Keyring;

use crate::defs::{check_upstream, host_def, id_schema, object_schema, plugins_def, timeout_def, upstream_schema};
use crate::{Kind, PluginSlot, Reference, read_as};

use super::{CLIENT_CERT, inline_upstream_seal};

pub struct Routes;

const REFERENCES: &[Reference] = &[
    Reference { path: &["upstream_id"], kind: "upstreams", what: "upstream info by upstream", accept: None, holds: Some("can not delete this upstream, route") },
    Reference { path: &["service_id"], kind: "services", what: "service info by service", accept: None, holds: Some("can not delete this service directly, route") },
    Reference { path: &["plugin_config_id"], kind: "plugin_configs", what: "plugin config info by plugin config", accept: None, holds: Some("can not delete this plugin config, route") },
    Reference { path: &["upstream", "tls", "client_cert_id"], ..CLIENT_CERT },
];

impl Kind for Routes {
    fn name(&self) -> &'static str {
        "routes"
    }

    fn noun(&self) -> &'static str {
        "route"
    }

    fn schema(&self) -> &Value {
        static SCHEMA: OnceLock<Value> = OnceLock::new();
        SCHEMA.get_or_init(route_schema)
    }

    fn allows_post(&self) -> bool {
        true
    }

    fn plugins(&self) -> PluginSlot {
        PluginSlot::Route
    }

    fn references(&self) -> &'static [Reference] {
        REFERENCES
    }

    fn list_filters(&self) -> &'static [&'static str] {
        &["service_id", "upstream_id"]
    }

    fn check(&self, value: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        check_route(value, &mut errors);
        errors
    }

    fn read(&self, value: &Value) -> Result<(), String> {
        read_as::<Route>(value)
    }

    fn seal(&self, obj: &mut serde_json::Map<String, Value>, keyring: &Keyring) -> Result<(), String> {
        inline_upstream_seal(obj, keyring)
    }
}

fn route_schema() -> Value {
    let remote_addr = json!({"type": "string", "description": "client IP or CIDR"});
    object_schema(
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

