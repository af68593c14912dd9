//! `ua-restriction`: lets through, or refuses, requests by their `User-Agent` (regexes).

use std::sync::Arc;

use regex::RegexSet;
use serde_json::{Value, json};

use crate::{LegacyFactory, Factory, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    let list = json!({"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}});
    LegacyFactory {
        name: "ua-restriction",
        priority: 2999,
        schema: json!({"type": "object", "properties": {
            "bypass_missing": {"type": "boolean", "default": false},
            "allowlist": list,
            "denylist": list,
            "message": {"type": "string", "minLength": 1, "maxLength": 1024, "default": "Not allowed"}
        }, "oneOf": [{"required": ["allowlist"]}, {"required": ["denylist"]}]}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| {
            let set = |k: &str| -> Result<Option<RegexSet>, String> {
                conf.get(k)
                    .and_then(Value::as_array)
                    .map(|a| RegexSet::new(a.iter().filter_map(Value::as_str)).map_err(|e| format!("{k}: {e}")))
                    .transpose()
            };
            Ok(Arc::new(UaRestriction {
                allow: set("allowlist")?,
                deny: set("denylist")?,
                bypass_missing: conf.get("bypass_missing").and_then(Value::as_bool).unwrap_or(false),
                message: conf.get("message").and_then(Value::as_str).unwrap_or("Not allowed").to_string(),
            }))
        },
    }
    .into()
}

struct UaRestriction {
    allow: Option<RegexSet>,
    deny: Option<RegexSet>,
    bypass_missing: bool,
    message: String,
}

impl Plugin for UaRestriction {
    fn access(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let refuse = || Err(Reply::new(403, Some(json!({"message": self.message}))));
        // Every User-Agent header counts: a client cannot hide a denied one behind another.
        let agents: Vec<&str> = ctx.parts.headers.get_all(http::header::USER_AGENT).iter().filter_map(|v| v.to_str().ok()).collect();
        if agents.is_empty() {
            return if self.bypass_missing { Ok(()) } else { refuse() };
        }
        if let Some(allow) = &self.allow {
            return if agents.iter().all(|a| allow.is_match(a)) { Ok(()) } else { refuse() };
        }
        if let Some(deny) = &self.deny
            && agents.iter().any(|a| deny.is_match(a))
        {
            return refuse();
        }
        Ok(())
    }
}
