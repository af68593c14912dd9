//! `consumer-restriction`: lets through only the consumers a whitelist names, or all but those
//! a blacklist names, optionally per method. Runs after the auth plugins.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

use crate::{LegacyFactory, Factory, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    let names = json!({"type": "array", "minItems": 1, "items": {"type": "string"}});
    LegacyFactory {
        name: "consumer-restriction",
        priority: 2400,
        schema: json!({"type": "object", "properties": {
            "type": {"type": "string", "enum": ["consumer_name"], "default": "consumer_name"},
            "blacklist": names,
            "whitelist": names,
            "allowed_by_methods": {"type": "array", "items": {"type": "object", "properties": {
                "user": {"type": "string"},
                "methods": {"type": "array", "minItems": 1, "items": {"type": "string",
                    "enum": ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE"]}}
            }}},
            "rejected_code": {"type": "integer", "minimum": 200, "default": 403},
            "rejected_msg": {"type": "string"}
        }, "anyOf": [{"required": ["blacklist"]}, {"required": ["whitelist"]}, {"required": ["allowed_by_methods"]}]}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| {
            let c: Config = serde_json::from_value(conf.clone()).map_err(|e| e.to_string())?;
            Ok(Arc::new(c))
        },
    }
    .into()
}

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    blacklist: Vec<String>,
    whitelist: Option<Vec<String>>,
    #[serde(default)]
    allowed_by_methods: Vec<ByMethod>,
    #[serde(default = "code_403")]
    rejected_code: u16,
    rejected_msg: Option<String>,
}

#[derive(Deserialize)]
struct ByMethod {
    user: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
}

fn code_403() -> u16 {
    403
}

impl Config {
    fn reject(&self) -> Reply {
        let msg = self.rejected_msg.as_deref().unwrap_or("The consumer_name is forbidden.");
        Reply::new(self.rejected_code, Some(json!({ "message": msg })))
    }
}

impl Plugin for Config {
    fn access(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let Some(name) = ctx.consumer.as_ref().map(|c| c.username.clone()) else {
            return Err(Reply::new(401, Some(json!({"message": "Missing authentication or identity verification."}))));
        };
        if let Some(white) = &self.whitelist
            && !white.contains(&name)
        {
            return Err(self.reject());
        }
        if self.blacklist.contains(&name) {
            return Err(self.reject());
        }
        let method = ctx.parts.method.as_str();
        let listed = self.allowed_by_methods.iter().find(|m| m.user.as_deref() == Some(name.as_str()));
        if let Some(rule) = listed
            && !rule.methods.iter().any(|m| m == method)
        {
            return Err(self.reject());
        }
        Ok(())
    }
}
