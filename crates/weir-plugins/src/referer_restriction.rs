//! `referer-restriction`: lets through, or refuses, requests by the host of their `Referer`
//! (exact names, or `*.` wildcards).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

use crate::{Factory, JsonSchema, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("referer-restriction", 2990, |c: Config, _| {
        let lower = |hosts: Option<Vec<String>>| hosts.map(|h| h.iter().map(|h| h.to_ascii_lowercase()).collect());
        Ok(Arc::new(RefererRestriction {
            white: lower(c.whitelist),
            black: lower(c.blacklist),
            bypass_missing: c.bypass_missing,
            message: c.message,
        }))
    })
}

#[derive(Deserialize, JsonSchema)]
#[schemars(extend("oneOf" = [{"required": ["whitelist"]}, {"required": ["blacklist"]}]))]
struct Config {
    /// Let through requests without a `Referer`.
    #[serde(default)]
    bypass_missing: bool,
    /// The only referer hosts let through; `*.` names a domain's subdomains.
    #[schemars(length(min = 1), inner(regex(pattern = r"^\*?[0-9a-zA-Z-._]+$")))]
    whitelist: Option<Vec<String>>,
    /// The referer hosts refused; `*.` names a domain's subdomains.
    #[schemars(length(min = 1), inner(regex(pattern = r"^\*?[0-9a-zA-Z-._]+$")))]
    blacklist: Option<Vec<String>>,
    /// The message a refused request gets.
    #[serde(default = "not_allowed")]
    #[schemars(length(min = 1, max = 1024))]
    message: String,
}

fn not_allowed() -> String {
    "Your referer host is not allowed".into()
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
