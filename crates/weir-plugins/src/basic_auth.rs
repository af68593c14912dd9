//! `basic-auth`: the caller sends `Authorization: Basic base64(username:password)` matching a
//! consumer's (or credential's) `username` and `password`.

use std::sync::Arc;

use base64::Engine as _;
use http::header::{self, HeaderValue};
use serde::Deserialize;
use subtle::ConstantTimeEq as _;

use crate::{Factory, JsonSchema, Plugin, Reply, RequestCtx, attach_consumer, unauthorized};

pub(crate) fn factory() -> Factory {
    Factory::new("basic-auth", 2520, |c: Config, _| Ok(Arc::new(BasicAuth { hide: c.hide_credentials })))
        .with_credential(|c: Credential| Ok((c.username, Arc::new(Password(c.password)))))
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// Remove the `Authorization` header before the request goes upstream.
    #[serde(default)]
    hide_credentials: bool,
    #[schemars(length(min = 1))]
    #[allow(dead_code)]
    anonymous_consumer: Option<String>,
}

/// A consumer's username and password; the password is sealed at rest by the Admin API.
#[derive(Deserialize, JsonSchema)]
#[schemars(extend("encrypt_fields" = ["password"]))]
struct Credential {
    username: String,
    password: String,
}

struct Password(String);

struct BasicAuth {
    hide: bool,
}

/// `username:password` from a `Basic` authorization value, whitespace removed as APISIX does.
fn decode(value: &str) -> Result<(String, String), &'static str> {
    let encoded = value.strip_prefix("Basic ").ok_or("Invalid authorization header format")?.trim();
    let raw = base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|_| "Failed to decode authentication header")?;
    let text = String::from_utf8(raw).map_err(|_| "Failed to decode authentication header")?;
    let (user, pass) = text.split_once(':').ok_or("Split authorization err: invalid decoded data")?;
    let strip = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    Ok((strip(user), strip(pass)))
}

impl Plugin for BasicAuth {
    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let Some(value) = ctx.parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return Err(unauthorized("Missing authorization in request")
                .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm='.'")));
        };
        let (user, pass) = decode(value).map_err(|e| {
            tracing::warn!(route = ctx.route_id, error = e, "basic-auth: unreadable authorization header");
            unauthorized("Invalid authorization in request")
        })?;
        let Some(cred) = ctx.consumers.find("basic-auth", &user) else {
            return Err(unauthorized("Invalid user authorization"));
        };
        let expected = cred.data.downcast_ref::<Password>().map_or(&[][..], |p| p.0.as_bytes());
        if !bool::from(expected.ct_eq(pass.as_bytes())) {
            return Err(unauthorized("Invalid user authorization"));
        }
        let consumer = cred.consumer.clone();
        if self.hide {
            ctx.parts.headers.remove(header::AUTHORIZATION);
        }
        attach_consumer(ctx, consumer);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_basic_values() {
        assert_eq!(decode("Basic Zm9vOmJhcg==").unwrap(), ("foo".into(), "bar".into()));
        assert_eq!(decode("Basic Zm9vIDogYmEgcg==").unwrap(), ("foo".into(), "bar".into()), "whitespace dropped");
        assert!(decode("Bearer x").is_err());
        assert!(decode("Basic !!!").is_err());
        assert!(decode("Basic Zm9v").is_err(), "no colon");
    }
}
