//! `ssls`: certificates, served by SNI or presented to upstreams. Private keys are sealed
//! before they are stored and never shown.

use std::sync::OnceLock;

use serde_json::{Map, Value, json};
use weir_core::model::Ssl;
use weir_tls::Keyring;

use crate::defs::{HOST_PATTERN, object_schema};
use crate::{Kind, read_as};

pub struct Ssls;

impl Kind for Ssls {
    fn name(&self) -> &'static str {
        "ssls"
    }

    fn noun(&self) -> &'static str {
        "ssl"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["ssl"]
    }

    fn schema(&self) -> &Value {
        static SCHEMA: OnceLock<Value> = OnceLock::new();
        SCHEMA.get_or_init(|| {
            let cert = json!({"type": "string", "minLength": 128, "maxLength": 65536});
            let key = json!({"type": "string", "minLength": 64, "maxLength": 65536});
            object_schema(
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
        })
    }

    fn allows_post(&self) -> bool {
        true
    }

    /// SNI rules, then every PEM parsed and every key matched with its certificate.
    fn check(&self, value: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        let is_server = value.get("type").and_then(Value::as_str).unwrap_or("server") == "server";
        if is_server && value.get("sni").is_none() && value.get("snis").is_none() {
            errors.push("one of sni or snis is required for a server certificate".into());
        }
        if value.get("sni").is_some() && value.get("snis").is_some() {
            errors.push("only one of sni or snis is allowed".into());
        }
        if errors.is_empty()
            && let Some(obj) = value.as_object()
        {
            errors = weir_tls::check_ssl(obj);
        }
        errors
    }

    fn read(&self, value: &Value) -> Result<(), String> {
        read_as::<Ssl>(value)
    }

    /// A certificate's keys are checked in the clear (a PATCH merges onto sealed ones).
    fn open(&self, obj: &mut Map<String, Value>, keyring: &Keyring) -> Result<(), String> {
        weir_tls::open_ssl(keyring, obj).map_err(|e| e.to_string())
    }

    fn seal(&self, obj: &mut Map<String, Value>, keyring: &Keyring) -> Result<(), String> {
        weir_tls::seal_ssl(keyring, obj);
        Ok(())
    }

    fn hide(&self, value: &mut Value) {
        if let Some(o) = value.as_object_mut() {
            o.remove("key");
            o.remove("keys");
        }
    }
}
