//! `response-rewrite`: changes the status, headers and body of the response on its way to the
//! client, when its `vars` (over the response status) hold.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use serde_json::{Value, json};
use weir_core::expr::{Expr, Vars};

use crate::{LegacyFactory, Factory, Phases, Plugin, ResponseCtx};

pub(crate) fn factory() -> Factory {
    LegacyFactory {
        name: "response-rewrite",
        priority: 899,
        schema: json!({"type": "object", "properties": {
            "status_code": {"type": "integer", "minimum": 200, "maximum": 598},
            "body": {"type": "string"},
            "body_base64": {"type": "boolean", "default": false},
            "headers": {"type": "object", "minProperties": 1},
            "vars": {"type": "array"}
        }}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| Ok(Arc::new(build(conf)?)),
    }
    .into()
}

struct ResponseRewrite {
    status: Option<http::StatusCode>,
    body: Option<Bytes>,
    add: Vec<(HeaderName, HeaderValue)>,
    set: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
    vars: Option<Expr>,
}

fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let n = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| format!("headers: {name}: {e}"))?;
    let v = HeaderValue::from_str(value.trim()).map_err(|e| format!("headers: {name}: {e}"))?;
    Ok((n, v))
}

fn build(conf: &Value) -> Result<ResponseRewrite, String> {
    let body = match conf.get("body").and_then(Value::as_str) {
        Some(b) if conf.get("body_base64").and_then(Value::as_bool) == Some(true) => Some(Bytes::from(
            base64::engine::general_purpose::STANDARD.decode(b).map_err(|e| format!("body is not base64: {e}"))?,
        )),
        Some(b) => Some(Bytes::from(b.to_string())),
        None => None,
    };
    let (mut add, mut set, mut remove) = (Vec::new(), Vec::new(), Vec::new());
    if let Some(h) = conf.get("headers").and_then(Value::as_object) {
        let is_ops = ["add", "set", "remove"].iter().any(|k| h.contains_key(*k));
        if is_ops {
            // `add` is a list of "Name: value" lines, as APISIX has it.
            for line in h.get("add").and_then(Value::as_array).into_iter().flatten() {
                let line = line.as_str().unwrap_or("");
                let (n, v) = line.split_once(':').ok_or(format!("headers.add: {line:?} is not \"name: value\""))?;
                add.push(header(n, v)?);
            }
            for (n, v) in h.get("set").and_then(Value::as_object).into_iter().flatten() {
                set.push(header(n, v.as_str().unwrap_or(""))?);
            }
            for n in h.get("remove").and_then(Value::as_array).into_iter().flatten() {
                let n = n.as_str().unwrap_or("");
                remove.push(HeaderName::from_bytes(n.as_bytes()).map_err(|e| format!("headers.remove: {n}: {e}"))?);
            }
        } else {
            // The older form: a map of headers to set; an empty value removes the header.
            for (n, v) in h {
                match v.as_str().unwrap_or("") {
                    "" => remove.push(HeaderName::from_bytes(n.as_bytes()).map_err(|e| format!("headers: {n}: {e}"))?),
                    v => set.push(header(n, v)?),
                }
            }
        }
    }
    let vars = conf.get("vars").map(Expr::compile).transpose().map_err(|e| format!("vars: {e}"))?;
    let status = conf
        .get("status_code")
        .and_then(Value::as_u64)
        .map(|c| http::StatusCode::from_u16(c as u16).map_err(|e| e.to_string()))
        .transpose()?;
    Ok(ResponseRewrite { status, body, add, set, remove, vars })
}

/// What `vars` may name here: the response's status.
struct StatusVars(u16);

impl Vars for StatusVars {
    fn get(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        matches!(name, "status" | "upstream_status").then(|| self.0.to_string().into())
    }
}

impl Plugin for ResponseRewrite {
    fn phases(&self) -> Phases {
        Phases { response: true, log: false, body: false }
    }

    fn header_filter(&self, ctx: &mut ResponseCtx<'_>) {
        if let Some(vars) = &self.vars
            && !vars.eval(&StatusVars(ctx.parts.status.as_u16()))
        {
            return;
        }
        if let Some(s) = self.status {
            ctx.parts.status = s;
        }
        let h = &mut ctx.parts.headers;
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for n in &self.remove {
            h.remove(n);
        }
        if let Some(b) = &self.body {
            *ctx.body = Some(b.clone());
        }
    }
}
