//! `uri-blocker`: refuses requests whose URI (path and query) matches any of its regexes.

use std::sync::Arc;

use regex::RegexSet;
use serde_json::{Value, json};

use crate::{LegacyFactory, Factory, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    LegacyFactory {
        name: "uri-blocker",
        priority: 2900,
        schema: json!({"type": "object", "properties": {
            "block_rules": {"type": "array", "minItems": 1, "uniqueItems": true, "items": {"type": "string", "minLength": 1, "maxLength": 4096}},
            "rejected_code": {"type": "integer", "minimum": 200, "default": 403},
            "rejected_msg": {"type": "string", "minLength": 1},
            "case_insensitive": {"type": "boolean", "default": false}
        }, "required": ["block_rules"]}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| {
            let insensitive = conf.get("case_insensitive").and_then(Value::as_bool).unwrap_or(false);
            let rules: Vec<String> = conf
                .get("block_rules")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|r| if insensitive { format!("(?i){r}") } else { r.to_string() })
                .collect();
            let rules = RegexSet::new(&rules).map_err(|e| format!("block_rules: {e}"))?;
            Ok(Arc::new(UriBlocker {
                rules,
                code: conf.get("rejected_code").and_then(Value::as_u64).unwrap_or(403) as u16,
                msg: conf.get("rejected_msg").and_then(Value::as_str).map(str::to_string),
            }))
        },
    }
    .into()
}

struct UriBlocker {
    rules: RegexSet,
    code: u16,
    msg: Option<String>,
}

impl Plugin for UriBlocker {
    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let uri = ctx.parts.uri.path_and_query().map_or("/", |p| p.as_str());
        if self.rules.is_match(uri) {
            return Err(Reply::new(self.code, self.msg.as_ref().map(|m| json!({"error_msg": m}))));
        }
        Ok(())
    }
}
