//! `redirect`: answers with a redirect to another URI (a template with `$var`s, or a
//! `regex_uri` rewrite of the path), or from `http` to `https`.

use std::sync::Arc;

use http::header::{HeaderValue, LOCATION};
use regex::Regex;
use serde_json::{Value, json};

use crate::{LegacyFactory, Factory, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    LegacyFactory {
        name: "redirect",
        priority: 900,
        schema: json!({"type": "object", "properties": {
            "ret_code": {"type": "integer", "minimum": 200, "default": 302},
            "uri": {"type": "string", "minLength": 2},
            "regex_uri": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "string"}},
            "http_to_https": {"type": "boolean"},
            "encode_uri": {"type": "boolean", "default": false},
            "append_query_string": {"type": "boolean", "default": false}
        }, "oneOf": [{"required": ["uri"]}, {"required": ["regex_uri"]}, {"required": ["http_to_https"]}]}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| Ok(Arc::new(build(conf)?)),
    }
    .into()
}

struct Redirect {
    code: u16,
    uri: Option<String>,
    regex_uri: Option<(Regex, String)>,
    http_to_https: bool,
    append_query: bool,
}

fn build(conf: &Value) -> Result<Redirect, String> {
    let regex_uri = match conf.get("regex_uri").and_then(Value::as_array) {
        Some(pair) => {
            let pattern = pair[0].as_str().unwrap_or("");
            let re = Regex::new(pattern).map_err(|e| format!("invalid regex_uri {pattern}: {e}"))?;
            Some((re, pair[1].as_str().unwrap_or("").to_string()))
        }
        None => None,
    };
    let http_to_https = conf.get("http_to_https").and_then(Value::as_bool).unwrap_or(false);
    let append_query = conf.get("append_query_string").and_then(Value::as_bool).unwrap_or(false);
    if http_to_https && append_query {
        return Err("only one of `http_to_https` and `append_query_string` can be configured".into());
    }
    Ok(Redirect {
        code: conf.get("ret_code").and_then(Value::as_u64).unwrap_or(302) as u16,
        uri: conf.get("uri").and_then(Value::as_str).map(str::to_string),
        regex_uri,
        http_to_https,
        append_query,
    })
}

impl Plugin for Redirect {
    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let target = if self.http_to_https && ctx.scheme == "http" {
            let host = ctx.var("host").unwrap_or_default();
            let pq = ctx.parts.uri.path_and_query().map_or("/", |p| p.as_str());
            // Methods other than GET and HEAD keep their method and body only through a 308.
            let code = if matches!(ctx.parts.method, http::Method::GET | http::Method::HEAD) { 301 } else { 308 };
            return Err(location(code, format!("https://{host}{pq}")));
        } else if let Some(t) = &self.uri {
            weir_core::text::substitute(t, |n| ctx.var(n))
        } else if let Some((re, template)) = &self.regex_uri {
            let path = ctx.parts.uri.path();
            if !re.is_match(path) {
                return Ok(());
            }
            re.replace(path, template.as_str()).into_owned()
        } else {
            return Ok(());
        };
        let target = match (self.append_query, ctx.parts.uri.query()) {
            (true, Some(q)) => format!("{target}{}{q}", if target.contains('?') { '&' } else { '?' }),
            _ => target,
        };
        Err(location(self.code, target))
    }
}

fn location(code: u16, to: String) -> Reply {
    let mut reply = Reply::new(code, Some(Value::String(String::new())));
    if let Ok(v) = HeaderValue::from_str(&to) {
        reply.headers.push((LOCATION, v));
    }
    reply
}
