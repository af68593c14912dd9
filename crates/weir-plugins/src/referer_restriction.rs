//! `referer-restriction`: lets through, or refuses, requests by the host of their `Referer`
//! (exact names, or `*.` wildcards).

use std::sync::Arc;

use serde_json::{Value, json};

use crate::{LegacyFactory, Factory, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    let hosts = json!({"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^\\*?[0-9a-zA-Z-._]+$"}});
    LegacyFactory {
        name: "referer-restriction",
        priority: 2990,
        schema: json!({"type": "object", "properties": {
            "bypass_missing": {"type": "boolean", "default": false},
            "whitelist": hosts,
            "blacklist": hosts,
            "message": {"type": "string", "minLength": 1, "maxLength": 1024, "default": "Your referer host is not allowed"}
        }, "oneOf": [{"required": ["whitelist"]}, {"required": ["blacklist"]}]}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| {
            let list = |k: &str| -> Option<Vec<String>> {
                conf.get(k).and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).map(str::to_ascii_lowercase).collect())
            };
            Ok(Arc::new(RefererRestriction {
                white: list("whitelist"),
                black: list("blacklist"),
                bypass_missing: conf.get("bypass_missing").and_then(Value::as_bool).unwrap_or(false),
                message: conf.get("message").and_then(Value::as_str).unwrap_or("Your referer host is not allowed").to_string(),
            }))
        },
    }
    .into()
}

struct RefererRestriction {
    white: Option<Vec<String>>,
    black: Option<Vec<String>>,
    bypass_missing: bool,
    message: String,
}

/// The host of a `Referer` URL, lower-cased, without port or credentials.
fn referer_host(referer: &str) -> Option<String> {
    let rest = referer.split_once("://").map_or(referer, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host.starts_with('[') { host.split_inclusive(']').next()? } else { host.split(':').next()? };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

fn matches(patterns: &[String], host: &str) -> bool {
    patterns.iter().any(|p| match p.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix),
        None => p == host,
    })
}

impl Plugin for RefererRestriction {
    fn access(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let host = ctx.parts.headers.get(http::header::REFERER).and_then(|v| v.to_str().ok()).and_then(referer_host);
        let allowed = match (&host, &self.white, &self.black) {
            (None, _, _) => self.bypass_missing,
            (Some(h), Some(white), _) => matches(white, h),
            (Some(h), None, Some(black)) => !matches(black, h),
            (Some(_), None, None) => true,
        };
        if allowed { Ok(()) } else { Err(Reply::new(403, Some(json!({"message": self.message})))) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_referers() {
        assert_eq!(referer_host("https://User@Example.com:8443/a?b").as_deref(), Some("example.com"));
        assert_eq!(referer_host("http://[::1]:80/").as_deref(), Some("[::1]"));
        assert_eq!(referer_host("").as_deref(), None);
        assert!(matches(&["*.example.com".into()], "a.example.com"));
        assert!(!matches(&["*.example.com".into()], "example.org"));
    }
}
