//! `mocking`: answers with a fixed example, or a value made from a JSON schema, without
//! calling the upstream.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use serde_json::{Value, json};

use crate::{LegacyFactory, Factory, Pending, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    LegacyFactory {
        name: "mocking",
        priority: 10900,
        schema: json!({"type": "object", "properties": {
            "delay": {"type": "integer", "minimum": 0, "default": 0},
            "response_status": {"type": "integer", "minimum": 100, "default": 200},
            "content_type": {"type": "string", "default": "application/json;charset=utf8"},
            "response_example": {"type": "string"},
            "response_schema": {"type": "object"},
            "with_mock_header": {"type": "boolean", "default": true},
            "response_headers": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}}
        }, "anyOf": [{"required": ["response_example"]}, {"required": ["response_schema"]}]}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| {
            let text = |k: &str, d: &str| conf.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
            let mut headers = vec![(
                http::header::CONTENT_TYPE,
                HeaderValue::from_str(&text("content_type", "application/json;charset=utf8")).map_err(|e| format!("content_type: {e}"))?,
            )];
            if conf.get("with_mock_header").and_then(Value::as_bool).unwrap_or(true) {
                headers.push((HeaderName::from_static("x-mock-by"), HeaderValue::from_static(concat!("Weir/", env!("CARGO_PKG_VERSION")))));
            }
            for (k, v) in conf.get("response_headers").and_then(Value::as_object).into_iter().flatten() {
                let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("response_headers: {e}"))?;
                let value = HeaderValue::from_str(v.as_str().unwrap_or("")).map_err(|e| format!("response_headers.{k}: {e}"))?;
                headers.push((name, value));
            }
            Ok(Arc::new(Mocking {
                delay: Duration::from_secs(conf.get("delay").and_then(Value::as_u64).unwrap_or(0)),
                status: conf.get("response_status").and_then(Value::as_u64).unwrap_or(200) as u16,
                example: conf.get("response_example").and_then(Value::as_str).map(str::to_string),
                schema: conf.get("response_schema").cloned(),
                headers,
            }))
        },
    }
    .into()
}

struct Mocking {
    delay: Duration,
    status: u16,
    example: Option<String>,
    schema: Option<Value>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Mocking {
    fn reply(&self) -> Reply {
        let body = match (&self.example, &self.schema) {
            (Some(e), _) => e.clone(),
            (None, Some(s)) => sample(s, 0).to_string(),
            (None, None) => String::new(),
        };
        let mut reply = Reply::new(self.status, Some(Value::String(body)));
        reply.headers.extend(self.headers.iter().cloned());
        reply
    }
}

/// A value that fits `schema`: each property present, one item per array, short random
/// strings and numbers within any bounds given.
fn sample(schema: &Value, depth: usize) -> Value {
    if let Some(e) = schema.get("example") {
        return e.clone();
    }
    if let Some(first) = schema.get("enum").and_then(Value::as_array).and_then(|a| a.first()) {
        return first.clone();
    }
    if depth > 8 {
        return Value::Null;
    }
    let num = |k: &str| schema.get(k).and_then(Value::as_f64);
    match schema.get("type").and_then(Value::as_str).unwrap_or("object") {
        "object" => Value::Object(
            schema
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), sample(v, depth + 1)))
                .collect(),
        ),
        "array" => Value::Array(vec![sample(schema.get("items").unwrap_or(&json!({"type": "string"})), depth + 1)]),
        "string" => Value::String((0..8).map(|_| fastrand::lowercase()).collect()),
        "integer" => {
            let lo = num("minimum").unwrap_or(0.0) as i64;
            let hi = num("maximum").map_or(lo + 100, |h| h as i64).max(lo);
            json!(fastrand::i64(lo..=hi))
        }
        "number" => {
            let lo = num("minimum").unwrap_or(0.0);
            let hi = num("maximum").unwrap_or(lo + 100.0).max(lo);
            json!(lo + fastrand::f64() * (hi - lo))
        }
        "boolean" => json!(fastrand::bool()),
        _ => Value::Null,
    }
}

impl Plugin for Mocking {
    fn access(&self, _ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        Err(self.reply())
    }

    fn access_io(&self, _ctx: &mut RequestCtx<'_>) -> Option<Pending> {
        if self.delay.is_zero() {
            return None;
        }
        let (delay, reply) = (self.delay, self.reply());
        Some(Box::pin(async move {
            tokio::time::sleep(delay).await;
            Err(reply)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_fit_their_schema() {
        let schema = json!({"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 5, "maximum": 9},
            "tags": {"type": "array", "items": {"type": "string"}},
            "kind": {"enum": ["a", "b"]},
            "ok": {"type": "boolean"}
        }});
        let v = sample(&schema, 0);
        let validator = jsonschema_free_check(&v);
        assert!(validator, "{v}");
    }

    fn jsonschema_free_check(v: &Value) -> bool {
        let id = v["id"].as_i64().unwrap();
        (5..=9).contains(&id) && v["tags"].as_array().unwrap().len() == 1 && v["kind"] == "a" && v["ok"].is_boolean()
    }
}
