//! `request-validation`: checks the request's headers and body (JSON, or a URL-encoded form)
//! against JSON schemas before proxying; a request that fails gets `rejected_code`.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::{LegacyFactory, Factory, Phases, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    LegacyFactory {
        name: "request-validation",
        priority: 2800,
        schema: json!({"type": "object", "properties": {
            "header_schema": {"type": "object"},
            "body_schema": {"type": "object"},
            "rejected_code": {"type": "integer", "minimum": 200, "maximum": 599, "default": 400},
            "rejected_msg": {"type": "string", "minLength": 1, "maxLength": 256}
        }, "anyOf": [{"required": ["header_schema"]}, {"required": ["body_schema"]}]}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| {
            let compile = |k: &str| {
                conf.get(k).map(|s| jsonschema::validator_for(s).map_err(|e| format!("{k}: {e}"))).transpose()
            };
            Ok(Arc::new(RequestValidation {
                headers: compile("header_schema")?,
                body: compile("body_schema")?,
                code: conf.get("rejected_code").and_then(Value::as_u64).unwrap_or(400) as u16,
                msg: conf.get("rejected_msg").and_then(Value::as_str).map(str::to_string),
            }))
        },
    }
    .into()
}

struct RequestValidation {
    headers: Option<jsonschema::Validator>,
    body: Option<jsonschema::Validator>,
    code: u16,
    msg: Option<String>,
}

impl RequestValidation {
    fn refuse(&self, why: String) -> Reply {
        Reply::new(self.code, Some(Value::String(self.msg.clone().unwrap_or(why))))
    }
}

/// The body as a JSON value: parsed as JSON, or as a URL-encoded form when it says it is one.
fn body_value(ctx: &RequestCtx<'_>) -> Result<Value, String> {
    let raw = ctx.body.as_deref().unwrap_or(b"");
    let form = ctx
        .parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    if form {
        let text = std::str::from_utf8(raw).map_err(|_| "body is not UTF-8".to_string())?;
        let fields: Map<String, Value> = weir_core::text::query_pairs(text)
            .map(|(k, v)| (weir_core::text::percent_decode(k).into_owned(), Value::String(weir_core::text::percent_decode(v).into_owned())))
            .collect();
        return Ok(Value::Object(fields));
    }
    serde_json::from_slice(raw).map_err(|e| format!("invalid JSON body: {e}"))
}

impl Plugin for RequestValidation {
    fn phases(&self) -> Phases {
        Phases { response: false, log: false, body: self.body.is_some() }
    }

    fn access(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        if let Some(v) = &self.headers {
            let headers: Map<String, Value> = ctx
                .parts
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), Value::String(v.to_str().unwrap_or("").to_string())))
                .collect();
            if let Some(e) = v.iter_errors(&Value::Object(headers)).next() {
                return Err(self.refuse(format!("header: {e}")));
            }
        }
        if let Some(v) = &self.body {
            let body = body_value(ctx).map_err(|e| self.refuse(e))?;
            if let Some(e) = v.iter_errors(&body).next() {
                return Err(self.refuse(format!("body: {e}")));
            }
        }
        Ok(())
    }
}
