//! `mocking`: answers with a fixed example, or a value made from a JSON schema, without
//! calling the upstream.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{Factory, JsonSchema, Pending, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("mocking", 10900, |c: Config, _| {
        let mut headers = vec![(
            http::header::CONTENT_TYPE,
            HeaderValue::from_str(&c.content_type).map_err(|e| format!("content_type: {e}"))?,
        )];
        if c.with_mock_header {
            headers.push((HeaderName::from_static("x-mock-by"), HeaderValue::from_static(concat!("Weir/", env!("CARGO_PKG_VERSION")))));
        }
        for (k, v) in c.response_headers.into_iter().flatten() {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("response_headers: {e}"))?;
            let value = HeaderValue::from_str(&v).map_err(|e| format!("response_headers.{k}: {e}"))?;
            headers.push((name, value));
        }
        Ok(Arc::new(Mocking {
            delay: Duration::from_secs(c.delay),
            status: c.response_status,
            example: c.response_example,
            schema: c.response_schema.map(|s| Value::Object(s.0)),
            headers,
        }))
    })
}

#[derive(Deserialize, JsonSchema)]
#[schemars(extend("anyOf" = [{"required": ["response_example"]}, {"required": ["response_schema"]}]))]
struct Config {
    /// Seconds to wait before answering.
    #[serde(default)]
    delay: u64,
    /// The status of the answer.
    #[serde(default = "status_200")]
    #[schemars(range(min = 100))]
    response_status: u16,
    /// The answer's `Content-Type`.
    #[serde(default = "json_utf8")]
    content_type: String,
    /// The body of the answer, as given.
    response_example: Option<String>,
    /// A JSON schema the body of the answer is made to fit.
    response_schema: Option<Object>,
    /// Mark the answer with an `X-Mock-By` header.
    #[serde(default = "yes")]
    with_mock_header: bool,
    /// Headers added to the answer.
    #[schemars(extend("minProperties" = 1))]
    response_headers: Option<BTreeMap<String, String>>,
}

/// Any JSON object.
#[derive(Deserialize)]
#[serde(transparent)]
struct Object(Map<String, Value>);

impl JsonSchema for Object {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Object".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "object"})
    }
}

fn status_200() -> u16 {
    200
}
fn json_utf8() -> String {
    "application/json;charset=utf8".into()
}
fn yes() -> bool {
    true
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

    #[test]
    fn configs_build_replies() {
        use weir_core::schema::PluginCatalog as _;
        let r = crate::Registry::new(vec![factory()]);
        let e = r.check_config("mocking", &json!({"response_example": "x", "response_headers": {"bad name": "v"}})).unwrap_err();
        assert!(e.starts_with("response_headers:"), "{e}");
        let c: Config = serde_json::from_value(json!({"response_example": "hi", "response_status": 201, "with_mock_header": false})).unwrap();
        assert_eq!((c.response_status, c.with_mock_header, c.content_type.as_str()), (201, false, "application/json;charset=utf8"));
    }

    fn jsonschema_free_check(v: &Value) -> bool {
        let id = v["id"].as_i64().unwrap();
        (5..=9).contains(&id) && v["tags"].as_array().unwrap().len() == 1 && v["kind"] == "a" && v["ok"].is_boolean()
    }
}
