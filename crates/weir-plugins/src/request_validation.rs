//! `request-validation`: checks the request's headers and body (JSON, or a URL-encoded form)
//! against JSON schemas before proxying; a request that fails gets `rejected_code`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{Factory, JsonSchema, Phases, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("request-validation", 2800, |c: Config, _| {
        let compile = |k: &str, s: Option<Value>| s.map(|s| jsonschema::validator_for(&s).map_err(|e| format!("{k}: {e}"))).transpose();
        Ok(Arc::new(RequestValidation {
            headers: compile("header_schema", c.header_schema)?,
            body: compile("body_schema", c.body_schema)?,
            code: c.rejected_code,
            msg: c.rejected_msg,
        }))
    })
}

#[derive(Deserialize, JsonSchema)]
#[schemars(extend("anyOf" = [{"required": ["header_schema"]}, {"required": ["body_schema"]}]))]
struct Config {
    /// The JSON schema the request's headers must satisfy.
    #[schemars(extend("type" = "object"))]
    header_schema: Option<Value>,
    /// The JSON schema the request's body must satisfy.
    #[schemars(extend("type" = "object"))]
    body_schema: Option<Value>,
    /// The status a request that fails gets.
    #[serde(default = "bad_request")]
    #[schemars(range(min = 200, max = 599))]
    rejected_code: u16,
    /// The body a request that fails gets, instead of what failed.
    #[schemars(length(min = 1, max = 256))]
    rejected_msg: Option<String>,
}

fn bad_request() -> u16 {
    400
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
