//! `cors`: answers preflight requests and adds the CORS headers to responses, with APISIX's
//! conventions: `*` is sent as `*`, `**` allows (and echoes) anything, a list allows its
//! members; `allow_origins_by_regex` replaces `allow_origins` when given.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use regex::Regex;
use serde_json::{Value, json};

use crate::{LegacyFactory, Factory, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    LegacyFactory {
        name: "cors",
        priority: 4000,
        schema: json!({"type": "object", "properties": {
            "allow_origins": {"type": "string", "pattern": "^(\\*|\\*\\*|null|\\w+://[^,]+(,\\w+://[^,]+)*)$", "default": "*"},
            "allow_methods": {"type": "string", "default": "*"},
            "allow_headers": {"type": "string", "default": "*"},
            "expose_headers": {"type": "string"},
            "max_age": {"type": "integer", "default": 5},
            "allow_credential": {"type": "boolean", "default": false},
            "allow_origins_by_regex": {"type": "array", "minItems": 1, "uniqueItems": true, "items": {"type": "string", "minLength": 1}}
        }}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| build(conf).map(|c| Arc::new(c) as Arc<dyn Plugin>),
    }
    .into()
}

struct Cors {
    origins: String,
    by_regex: Option<Vec<Regex>>,
    methods: String,
    headers: String,
    expose: Option<String>,
    max_age: i64,
    credential: bool,
}

fn build(conf: &Value) -> Result<Cors, String> {
    let text = |k: &str, d: &str| conf.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
    let c = Cors {
        origins: text("allow_origins", "*"),
        by_regex: conf
            .get("allow_origins_by_regex")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|r| Regex::new(r.as_str().unwrap_or(""))).collect::<Result<Vec<_>, _>>())
            .transpose()
            .map_err(|e| format!("allow_origins_by_regex: {e}"))?,
        methods: text("allow_methods", "*"),
        headers: text("allow_headers", "*"),
        expose: conf.get("expose_headers").and_then(Value::as_str).map(str::to_string),
        max_age: conf.get("max_age").and_then(Value::as_i64).unwrap_or(5),
        credential: conf.get("allow_credential").and_then(Value::as_bool).unwrap_or(false),
    };
    // With credentials a browser refuses `*`, so APISIX refuses the config.
    if c.credential && [&c.origins, &c.methods, &c.headers].iter().any(|v| *v == "*") && c.by_regex.is_none() {
        return Err("you can not set '*' for other option when 'allow_credential' is true".into());
    }
    Ok(c)
}

const ALLOW_ORIGIN: HeaderName = HeaderName::from_static("access-control-allow-origin");
const ALLOW_METHODS: HeaderName = HeaderName::from_static("access-control-allow-methods");
const ALLOW_HEADERS: HeaderName = HeaderName::from_static("access-control-allow-headers");
const EXPOSE_HEADERS: HeaderName = HeaderName::from_static("access-control-expose-headers");
const MAX_AGE: HeaderName = HeaderName::from_static("access-control-max-age");
const ALLOW_CREDENTIALS: HeaderName = HeaderName::from_static("access-control-allow-credentials");

impl Cors {
    /// The Access-Control-Allow-Origin value for a request from `origin`, if it is allowed.
    fn allowed_origin(&self, origin: Option<&str>) -> Option<String> {
        if let Some(res) = &self.by_regex {
            let o = origin?;
            return res.iter().any(|r| r.is_match(o)).then(|| o.to_string());
        }
        match self.origins.as_str() {
            "*" => Some("*".into()),
            "**" => origin.map(str::to_string),
            list => {
                let o = origin?;
                list.split(',').any(|allowed| allowed.trim() == o).then(|| o.to_string())
            }
        }
    }
}

impl Plugin for Cors {
    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let header = |name| ctx.parts.headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_string);
        let origin = header(http::header::ORIGIN);
        let mut out: Vec<(HeaderName, String)> = Vec::new();
        if self.origins != "*" || self.by_regex.is_some() {
            out.push((http::header::VARY, "Origin".into()));
        }
        if let Some(allow) = self.allowed_origin(origin.as_deref()) {
            let methods = if self.methods == "**" { "GET,POST,PUT,DELETE,PATCH,HEAD,OPTIONS,CONNECT,TRACE".to_string() } else { self.methods.clone() };
            let headers = if self.headers == "**" {
                header(http::header::ACCESS_CONTROL_REQUEST_HEADERS).unwrap_or_default()
            } else {
                self.headers.clone()
            };
            out.push((ALLOW_ORIGIN, allow));
            out.push((ALLOW_METHODS, methods));
            out.push((MAX_AGE, self.max_age.to_string()));
            if let Some(e) = self.expose.as_ref().filter(|e| !e.is_empty()) {
                out.push((EXPOSE_HEADERS, e.clone()));
            }
            if !headers.is_empty() {
                out.push((ALLOW_HEADERS, headers));
            }
            if self.credential {
                out.push((ALLOW_CREDENTIALS, "true".into()));
            }
        }
        ctx.response_headers.extend(out.into_iter().filter_map(|(k, v)| HeaderValue::from_str(&v).ok().map(|v| (k, v))));
        // A preflight is answered here, with the headers above.
        if ctx.parts.method == http::Method::OPTIONS {
            return Err(Reply::new(200, Some(Value::String(String::new()))));
        }
        Ok(())
    }
}
