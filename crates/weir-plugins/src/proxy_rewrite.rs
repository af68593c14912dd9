//! `proxy-rewrite`: changes what is sent upstream: the path (`uri`, or `regex_uri` pairs), the
//! Host, the method, and headers (`add`, `set`, `remove`; a plain map means `set`). `$var`
//! references in `uri` and header values are filled in from the request.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use regex::Regex;
use serde::Deserialize;

use crate::{Factory, JsonSchema, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("proxy-rewrite", 1008, |c: Config, _| build(c).map(|p| Arc::new(p) as Arc<dyn Plugin>))
}

#[derive(Deserialize, JsonSchema)]
#[schemars(extend("minProperties" = 1))]
struct Config {
    /// The path sent upstream; `$var`s are filled in from the request.
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^\/.*"))]
    uri: Option<String>,
    /// The method sent upstream.
    method: Option<Method>,
    /// Pairs of a regex over the path and its replacement; the first pair that matches applies.
    #[schemars(length(min = 2))]
    regex_uri: Option<Vec<String>>,
    /// The Host sent upstream.
    #[schemars(regex(pattern = r"^[0-9a-zA-Z-.]+(:\d{1,5})?$"))]
    host: Option<String>,
    /// Headers to `add`, `set` and `remove`; a plain map of headers means `set`.
    headers: Option<Headers>,
    #[serde(default)]
    #[allow(dead_code)]
    use_real_request_uri_unsafe: bool,
}

#[derive(Deserialize, JsonSchema, Debug)]
#[serde(rename_all = "UPPERCASE")]
enum Method {
    Get,
    Post,
    Put,
    Head,
    Delete,
    Options,
    Mkcol,
    Copy,
    Move,
    Propfind,
    Lock,
    Unlock,
    Patch,
    Trace,
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
#[schemars(extend("type" = "object"))]
enum Headers {
    Ops(HeaderOps),
    Set(HeaderMap),
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct HeaderOps {
    #[schemars(extend("minProperties" = 1))]
    add: Option<HeaderMap>,
    #[schemars(extend("minProperties" = 1))]
    set: Option<HeaderMap>,
    #[schemars(length(min = 1))]
    remove: Option<Vec<String>>,
}

type HeaderMap = BTreeMap<String, HeaderText>;

/// A header value: text, or a number written as text.
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
#[schemars(transform = one_of)]
enum HeaderText {
    Text(String),
    Number(serde_json::Number),
}

/// The variants exclude each other: `oneOf`, as APISIX writes it.
fn one_of(schema: &mut schemars::Schema) {
    if let Some(variants) = schema.remove("anyOf") {
        schema.insert("oneOf".into(), variants);
    }
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

fn header_list(m: Option<HeaderMap>) -> Result<Vec<(HeaderName, String)>, String> {
    m.into_iter()
        .flatten()
        .map(|(k, v)| {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("header {k}: {e}"))?;
            let value = match v {
                HeaderText::Text(s) => s,
                HeaderText::Number(n) => n.to_string(),
            };
            if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(format!("header {k}: a value must not hold CR, LF or NUL"));
            }
            Ok((name, value))
        })
        .collect()
}

fn build(c: Config) -> Result<ProxyRewrite, String> {
    // What is written into the request line or a header field may not end it early.
    let unsafe_text = |v: &String| v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0);
    if c.uri.iter().any(unsafe_text) {
        return Err("uri: must not hold CR, LF or NUL".into());
    }
    if c.regex_uri.iter().flatten().any(unsafe_text) {
        return Err("regex_uri: must not hold CR, LF or NUL".into());
    }
    let mut regex_uri = Vec::new();
    if let Some(list) = &c.regex_uri {
        if list.len() % 2 != 0 {
            return Err("The length of regex_uri should be an even number".into());
        }
        for pair in list.chunks(2) {
            let (p, r) = (&pair[0], &pair[1]);
            let re = Regex::new(p).map_err(|e| format!("invalid regex_uri({p}): {e}"))?;
            regex_uri.push((re, r.clone()));
        }
    }
    let (add, set, remove) = match c.headers {
        Some(Headers::Ops(h)) => {
            let remove = h.remove.into_iter().flatten().filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok()).collect();
            (header_list(h.add)?, header_list(h.set)?, remove)
        }
        Some(Headers::Set(h)) => (Vec::new(), header_list(Some(h))?, Vec::new()),
        None => (Vec::new(), Vec::new(), Vec::new()),
    };
    Ok(ProxyRewrite {
        uri: c.uri,
        regex_uri,
        host: c.host.map(|h| HeaderValue::from_str(&h)).transpose().map_err(|e| format!("host: {e}"))?,
        // A variant's name, upper-cased, is its method.
        method: c.method.map(|m| format!("{m:?}").to_ascii_uppercase().parse()).transpose().map_err(|e| format!("method: {e}"))?,
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn built(conf: serde_json::Value) -> Result<ProxyRewrite, String> {
        build(crate::parse(&conf)?)
    }

    #[test]
    fn headers_are_operations_or_a_plain_map_to_set() {
        let p = built(json!({"headers": {"add": {"X-A": "1"}, "set": {"X-N": 2}, "remove": ["X-B"]}})).unwrap();
        assert_eq!(p.add, vec![(HeaderName::from_static("x-a"), "1".to_string())]);
        assert_eq!(p.set, vec![(HeaderName::from_static("x-n"), "2".to_string())]);
        assert_eq!(p.remove, vec![HeaderName::from_static("x-b")]);
        // A string under `add` is a header named `add`, as the plain form has it.
        let p = built(json!({"headers": {"X-A": "1", "add": "x"}})).unwrap();
        assert!(p.add.is_empty() && p.remove.is_empty());
        assert_eq!(p.set.len(), 2);
        assert!(built(json!({"headers": {"ad": {"X-A": "1"}}})).is_err());
        assert!(built(json!({"headers": {"X-A": "a\r\nb"}})).err().unwrap().contains("CR, LF or NUL"));
    }

    #[test]
    fn methods_and_regex_uri_are_checked() {
        assert_eq!(built(json!({"method": "MKCOL"})).unwrap().method.unwrap().as_str(), "MKCOL");
        assert!(built(json!({"method": "get"})).is_err());
        assert_eq!(built(json!({"regex_uri": ["^/a", "/b", "^/c"]})).err().unwrap(), "The length of regex_uri should be an even number");
        assert!(built(json!({"regex_uri": ["(", "/b"]})).err().unwrap().starts_with("invalid regex_uri(()"));
    }
}
