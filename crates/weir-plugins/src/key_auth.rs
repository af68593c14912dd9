//! `key-auth`: the caller names itself with a key, in a header or the query string, that a
//! consumer (or one of its credentials) holds.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use serde::Deserialize;

use crate::{Factory, JsonSchema, Plugin, Reply, RequestCtx, attach_consumer, unauthorized};

pub(crate) fn factory() -> Factory {
    Factory::new("key-auth", 2500, |c: Config, _| {
        let header = HeaderName::from_bytes(c.header.as_bytes()).map_err(|e| format!("header: {e}"))?;
        let challenge = HeaderValue::from_str(&format!("apikey realm=\"{}\"", c.realm)).map_err(|e| format!("realm: {e}"))?;
        Ok(Arc::new(KeyAuth { header, query: c.query, hide: c.hide_credentials, challenge }))
    })
    .with_credential(|c: Credential| Ok((c.key, Arc::new(()))))
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// The request header the key is read from.
    #[serde(default = "apikey")]
    header: String,
    /// The query argument the key is read from when the header is absent.
    #[serde(default = "apikey")]
    query: String,
    /// The realm named in `WWW-Authenticate` when the key is refused.
    #[serde(default = "realm")]
    realm: String,
    /// Remove the key from the request before it goes upstream.
    #[serde(default)]
    hide_credentials: bool,
    #[schemars(length(min = 1))]
    #[allow(dead_code)]
    anonymous_consumer: Option<String>,
}

fn apikey() -> String {
    "apikey".into()
}

fn realm() -> String {
    "key".into()
}

/// A consumer's key; sealed at rest by the Admin API (APISIX's `encrypt_fields`).
#[derive(Deserialize, JsonSchema)]
#[schemars(extend("encrypt_fields" = ["key"]))]
struct Credential {
    key: String,
}

struct KeyAuth {
    header: HeaderName,
    query: String,
    hide: bool,
    challenge: HeaderValue,
}

impl Plugin for KeyAuth {
    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let refuse = |msg: &str| Err(unauthorized(msg).with_header(http::header::WWW_AUTHENTICATE, self.challenge.clone()));
        let from_header = ctx.parts.headers.get(&self.header).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (key, in_header) = match from_header {
            Some(k) => (k, true),
            None => match ctx.var(&format!("arg_{}", self.query)) {
                Some(k) => (k, false),
                None => return refuse("Missing API key in request"),
            },
        };
        let Some(consumer) = ctx.consumers.find("key-auth", &key).map(|c| c.consumer.clone()) else {
            tracing::warn!(route = ctx.route_id, "key-auth: no consumer holds the key given");
            return refuse("Invalid API key in request");
        };
        if self.hide {
            if in_header {
                ctx.parts.headers.remove(&self.header);
            } else {
                remove_query_arg(&mut ctx.parts.uri, &self.query);
            }
        }
        attach_consumer(ctx, consumer);
        Ok(())
    }
}

/// Drops every `name=…` pair from the query string.
pub(crate) fn remove_query_arg(uri: &mut http::Uri, name: &str) {
    let Some(query) = uri.query() else { return };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| weir_core::text::percent_decode(pair.split('=').next().unwrap_or("")) != name)
        .collect();
    let path = uri.path();
    let pq = if kept.is_empty() { path.to_string() } else { format!("{path}?{}", kept.join("&")) };
    let mut parts = uri.clone().into_parts();
    if let Ok(pq) = pq.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(u) = http::Uri::from_parts(parts) {
            *uri = u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_args_are_removed() {
        let mut u: http::Uri = "/a?apikey=s3&x=1&apikey=t".parse().unwrap();
        remove_query_arg(&mut u, "apikey");
        assert_eq!(u.to_string(), "/a?x=1");
        let mut u: http::Uri = "/a?apikey=s3".parse().unwrap();
        remove_query_arg(&mut u, "apikey");
        assert_eq!(u.to_string(), "/a");
    }
}
