//! `redirect`: answers with a redirect to another URI (a template with `$var`s, or a
//! `regex_uri` rewrite of the path), or from `http` to `https`.

use std::sync::Arc;

use http::header::{HeaderValue, LOCATION};
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use crate::{Factory, JsonSchema, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("redirect", 900, |c: Config, _| Ok(Arc::new(build(c)?)))
}

#[derive(Deserialize, JsonSchema)]
#[schemars(extend("oneOf" = [{"required": ["uri"]}, {"required": ["regex_uri"]}, {"required": ["http_to_https"]}]))]
struct Config {
    /// The status of the redirect.
    #[serde(default = "found")]
    #[schemars(range(min = 200))]
    ret_code: u64,
    /// Where to redirect; `$var`s are filled in from the request.
    #[schemars(length(min = 2))]
    uri: Option<String>,
    /// A regex over the path and its replacement, the redirect's target.
    #[schemars(length(min = 2, max = 2))]
    regex_uri: Option<Vec<String>>,
    /// Redirect `http` requests to `https`.
    http_to_https: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    encode_uri: bool,
    /// Keep the request's query string on the target.
    #[serde(default)]
    append_query_string: bool,
}

fn found() -> u64 {
    302
}

struct Redirect {
    code: u16,
    uri: Option<String>,
    regex_uri: Option<(Regex, String)>,
    http_to_https: bool,
    append_query: bool,
}

fn build(c: Config) -> Result<Redirect, String> {
    let regex_uri = match c.regex_uri.as_deref() {
        Some([pattern, replacement]) => {
            let re = Regex::new(pattern).map_err(|e| format!("invalid regex_uri {pattern}: {e}"))?;
            Some((re, replacement.clone()))
        }
        Some(_) => return Err("regex_uri: a pattern and its replacement".into()),
        None => None,
    };
    let http_to_https = c.http_to_https.unwrap_or(false);
    if http_to_https && c.append_query_string {
        return Err("only one of `http_to_https` and `append_query_string` can be configured".into());
    }
    Ok(Redirect { code: c.ret_code as u16, uri: c.uri, regex_uri, http_to_https, append_query: c.append_query_string })
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn configs_are_checked() {
        let r = build(crate::parse(&json!({"regex_uri": ["^/a/(.*)", "/b/$1"]})).unwrap()).unwrap();
        assert_eq!(r.code, 302);
        assert_eq!(r.regex_uri.unwrap().1, "/b/$1");
        let both = crate::parse(&json!({"http_to_https": true, "append_query_string": true})).unwrap();
        assert!(build(both).err().unwrap().starts_with("only one of"));
        assert!(build(crate::parse(&json!({"regex_uri": ["(", "/b"]})).unwrap()).is_err());
    }
}
