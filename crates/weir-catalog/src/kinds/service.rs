//! `services`: plugins and an upstream that routes share.

use std::sync::OnceLock;

use serde_json::{Map, Value, json};
use weir_core::model::Service;
use weir_tls::Keyring;

use crate::defs::{check_upstream, host_def, id_schema, object_schema, plugins_def, upstream_schema};
use crate::{Kind, PluginSlot, Reference, read_as};

use super::{CLIENT_CERT, inline_upstream_seal};

pub struct Services;

const REFERENCES: &[Reference] = &[
    Reference { path: &["upstream_id"], kind: "upstreams", what: "upstream info by upstream", accept: None, holds: Some("can not delete this upstream, service") },
    Reference { path: &["upstream", "tls", "client_cert_id"], ..CLIENT_CERT },
];

impl Kind for Services {
    fn name(&self) -> &'static str {
        "services"
    }

    fn noun(&self) -> &'static str {
        "service"
    }

    fn schema(&self) -> &Value {
        static SCHEMA: OnceLock<Value> = OnceLock::new();
        SCHEMA.get_or_init(|| {
            object_schema(
                json!({
                    "plugins": plugins_def(),
                    "upstream": upstream_schema(),
                    "upstream_id": id_schema(),
                    "enable_websocket": {"type": "boolean"},
                    "hosts": {"type": "array", "items": host_def(), "minItems": 1, "uniqueItems": true}
                }),
                true,
                &[],
            )
        })
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

    fn check(&self, value: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(up) = value.get("upstream") {
            check_upstream("upstream.", up, &mut errors);
        }
        errors
    }

    fn read(&self, value: &Value) -> Result<(), String> {
        read_as::<Service>(value)
    }

    fn seal(&self, obj: &mut Map<String, Value>, keyring: &Keyring) -> Result<(), String> {
        inline_upstream_seal(obj, keyring)
    }
}
