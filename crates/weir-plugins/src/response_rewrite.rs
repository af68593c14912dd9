//! `response-rewrite`: changes the status, headers and body of the response on its way to the
//! client, when its `vars` (over the response status) hold.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value};
use weir_core::expr::{Expr, Vars};

use crate::{Factory, JsonSchema, Phases, Plugin, ResponseCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("response-rewrite", 899, |c: Config, _| Ok(Arc::new(build(c)?)))
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// The status the client gets.
    #[schemars(range(min = 200, max = 598))]
    status_code: Option<u16>,
    /// The body the client gets.
    body: Option<String>,
    /// `body` is base64: the client gets it decoded.
    #[serde(default)]
    body_base64: bool,
    /// Headers to `add` (`"name: value"` lines), `set` and `remove`; a plain map of headers
    /// means `set`, where an empty value removes the header.
    #[schemars(extend("minProperties" = 1))]
    headers: Option<Map<String, Value>>,
    /// A condition over the response status: the rewrite happens only when it holds.
    #[schemars(extend("type" = "array"))]
    vars: Option<Value>,
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

fn build(c: Config) -> Result<ResponseRewrite, String> {
    let body = match c.body {
        Some(b) if c.body_base64 => Some(Bytes::from(
            base64::engine::general_purpose::STANDARD.decode(b).map_err(|e| format!("body is not base64: {e}"))?,
        )),
        Some(b) => Some(Bytes::from(b)),
        None => None,
    };
    let (mut add, mut set, mut remove) = (Vec::new(), Vec::new(), Vec::new());
    if let Some(h) = c.headers {
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
            for (n, v) in &h {
                match v.as_str().unwrap_or("") {
                    "" => remove.push(HeaderName::from_bytes(n.as_bytes()).map_err(|e| format!("headers: {n}: {e}"))?),
                    v => set.push(header(n, v)?),
                }
            }
        }
    }
    let vars = c.vars.as_ref().map(Expr::compile).transpose().map_err(|e| format!("vars: {e}"))?;
    let status = c.status_code.map(|c| http::StatusCode::from_u16(c).map_err(|e| e.to_string())).transpose()?;
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
