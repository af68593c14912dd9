//! `proxy-rewrite`: changes what is sent upstream: the path (`uri`, or `regex_uri` pairs), the
//! Host, the method, and headers (`add`, `set`, `remove`; a plain map means `set`). `$var`
//! references in `uri` and header values are filled in from the request.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use regex::Regex;
use serde_json::{Value, json};

use crate::{LegacyFactory, Factory, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    let header_map = json!({"type": "object", "minProperties": 1,
        "patternProperties": {"^[^:]+$": {"oneOf": [{"type": "string"}, {"type": "number"}]}}});
    LegacyFactory {
        name: "proxy-rewrite",
        priority: 1008,
        schema: json!({"type": "object", "properties": {
            "uri": {"type": "string", "minLength": 1, "maxLength": 4096, "pattern": "^\\/.*"},
            "method": {"type": "string", "enum": ["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "MKCOL", "COPY",
                "MOVE", "PROPFIND", "LOCK", "UNLOCK", "PATCH", "TRACE"]},
            "regex_uri": {"type": "array", "minItems": 2, "items": {"type": "string"}},
            "host": {"type": "string", "pattern": "^[0-9a-zA-Z-.]+(:\\d{1,5})?$"},
            "headers": {"type": "object", "anyOf": [
                {"properties": {"add": header_map, "set": header_map,
                    "remove": {"type": "array", "minItems": 1, "items": {"type": "string"}}}, "additionalProperties": false},
                {"patternProperties": {"^[^:]+$": {"oneOf": [{"type": "string"}, {"type": "number"}]}}}
            ]},
            "use_real_request_uri_unsafe": {"type": "boolean", "default": false}
        }, "minProperties": 1}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| build(conf).map(|p| Arc::new(p) as Arc<dyn Plugin>),
    }
    .into()
}

struct ProxyRewrite {
    uri: Option<String>,
    regex_uri: Vec<(Regex, String)>,
    host: Option<HeaderValue>,
    method: Option<http::Method>,
    add: Vec<(HeaderName, String)>,
    set: Vec<(HeaderName, String)>,
    remove: Vec<HeaderName>,
}

fn header_list(v: Option<&Value>) -> Result<Vec<(HeaderName, String)>, String> {
    let Some(Value::Object(m)) = v else { return Ok(Vec::new()) };
    m.iter()
        .map(|(k, v)| {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("header {k}: {e}"))?;
            let value = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(format!("header {k}: a value must not hold CR, LF or NUL"));
            }
            Ok((name, value))
        })
        .collect()
}

fn build(conf: &Value) -> Result<ProxyRewrite, String> {
    let text = |k: &str| conf.get(k).and_then(Value::as_str).map(str::to_string);
    // What is written into the request line or a header field may not end it early.
    for key in ["uri", "regex_uri"] {
        let values: Vec<&str> = match conf.get(key) {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if values.iter().any(|v| v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)) {
            return Err(format!("{key}: must not hold CR, LF or NUL"));
        }
    }
    let mut regex_uri = Vec::new();
    if let Some(list) = conf.get("regex_uri").and_then(Value::as_array) {
        if list.len() % 2 != 0 {
            return Err("The length of regex_uri should be an even number".into());
        }
        for pair in list.chunks(2) {
            let (p, r) = (pair[0].as_str().unwrap_or(""), pair[1].as_str().unwrap_or(""));
            let re = Regex::new(p).map_err(|e| format!("invalid regex_uri({p}): {e}"))?;
            regex_uri.push((re, r.to_string()));
        }
    }
    let headers = conf.get("headers");
    let structured = headers.is_some_and(|h| ["add", "set", "remove"].iter().any(|k| h.get(k).is_some_and(|v| !v.is_string())));
    let (add, set, remove) = if structured {
        let h = headers.expect("checked above");
        let remove = h
            .get("remove")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok()).collect())
            .unwrap_or_default();
        (header_list(h.get("add"))?, header_list(h.get("set"))?, remove)
    } else {
        (Vec::new(), header_list(headers)?, Vec::new())
    };
    Ok(ProxyRewrite {
        uri: text("uri"),
        regex_uri,
        host: text("host").map(|h| HeaderValue::from_str(&h)).transpose().map_err(|e| format!("host: {e}"))?,
        method: text("method").map(|m| m.parse::<http::Method>()).transpose().map_err(|e| format!("method: {e}"))?,
        add,
        set,
        remove,
    })
}

/// `text` with `$var`s filled in; as written when it names none.
fn resolve(ctx: &RequestCtx<'_>, text: &str) -> String {
    if !text.contains('$') {
        return text.to_string();
    }
    weir_core::text::interpolate(text, |name| ctx.var(name)).unwrap_or_else(|| text.to_string())
}

impl Plugin for ProxyRewrite {
    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let query = ctx.parts.uri.query().map(str::to_string);
        let path = ctx.parts.uri.path().to_string();
        let new_path = match &self.uri {
            Some(u) => Some(resolve(ctx, u)),
            None => self.regex_uri.iter().find(|(re, _)| re.is_match(&path)).map(|(re, r)| re.replace(&path, r.as_str()).into_owned()),
        };
        if let Some(p) = new_path {
            // The rewritten path keeps the request's query string unless it brings its own.
            let pq = match (&query, p.contains('?')) {
                (Some(q), false) => format!("{p}?{q}"),
                _ => p,
            };
            match pq.parse::<http::uri::PathAndQuery>() {
                Ok(pq) => {
                    let mut parts = std::mem::take(&mut ctx.parts.uri).into_parts();
                    parts.path_and_query = Some(pq);
                    ctx.parts.uri = http::Uri::from_parts(parts).unwrap_or_default();
                }
                Err(e) => tracing::warn!(route = ctx.route_id, error = %e, "proxy-rewrite made an invalid URI; left as it was"),
            }
        }
        if let Some(m) = &self.method {
            ctx.parts.method = m.clone();
        }
        if let Some(h) = &self.host {
            ctx.parts.headers.insert(http::header::HOST, h.clone());
        }
        for (name, value) in &self.add {
            if let Ok(v) = HeaderValue::from_str(&resolve(ctx, value)) {
                ctx.parts.headers.append(name.clone(), v);
            }
        }
        for (name, value) in &self.set {
            match HeaderValue::from_str(&resolve(ctx, value)) {
                // An empty value removes the header, as in APISIX.
                Ok(v) if !v.is_empty() => {
                    ctx.parts.headers.insert(name.clone(), v);
                }
                _ => {
                    ctx.parts.headers.remove(name);
                }
            }
        }
        for name in &self.remove {
            ctx.parts.headers.remove(name);
        }
        Ok(())
    }
}
