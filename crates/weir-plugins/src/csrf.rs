//! `csrf`: double-submit cookies. Every response sets a signed token cookie; a request other
//! than GET must send the same token in a header, and the token's signature (HMAC-SHA256 with
//! `key`) and age (`expires`) must hold.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::header::{HeaderName, HeaderValue, SET_COOKIE};
use ring::hmac;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Factory, JsonSchema, Phases, Plugin, Reply, RequestCtx, ResponseCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("csrf", 2980, |c: Config, _| {
        let header = HeaderName::from_bytes(c.name.as_bytes()).map_err(|e| format!("name: {e}"))?;
        Ok(Arc::new(Csrf { key: hmac::Key::new(hmac::HMAC_SHA256, c.key.as_bytes()), expires: c.expires, name: c.name, header }))
    })
}

#[derive(Deserialize, JsonSchema)]
#[schemars(extend("encrypt_fields" = ["key"]))]
struct Config {
    /// The secret tokens are signed with; sealed at rest by the Admin API.
    #[schemars(length(min = 1))]
    key: String,
    /// How long a token is valid, in seconds.
    #[serde(default = "secs_7200")]
    #[schemars(range(min = 1))]
    expires: u64,
    /// The name of the cookie and of the header that carry the token.
    #[serde(default = "token_name")]
    #[schemars(length(min = 1))]
    name: String,
}

fn secs_7200() -> u64 {
    7200
}

fn token_name() -> String {
    "apisix-csrf-token".into()
}

struct Csrf {
    key: hmac::Key,
    expires: u64,
    name: String,
    header: HeaderName,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

impl Csrf {
    fn sign(&self, random: &str, issued: u64) -> String {
        B64.encode(hmac::sign(&self.key, format!("{random}:{issued}:{}", self.expires).as_bytes()))
    }

    fn token(&self) -> String {
        let random = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let issued = now();
        let sign = self.sign(&random, issued);
        B64.encode(json!({"random": random, "issued": issued, "expires": self.expires, "sign": sign}).to_string())
    }

    /// `Ok` when the token is one this config signed and it has not expired.
    fn check(&self, token: &str) -> Result<(), &'static str> {
        const BAD: &str = "Failed to verify the csrf token signature";
        let raw = B64.decode(token).map_err(|_| BAD)?;
        let t: Value = serde_json::from_slice(&raw).map_err(|_| BAD)?;
        let random = t.get("random").and_then(Value::as_str).ok_or(BAD)?;
        let issued = t.get("issued").and_then(Value::as_u64).ok_or(BAD)?;
        let sign = t.get("sign").and_then(Value::as_str).and_then(|s| B64.decode(s).ok()).ok_or(BAD)?;
        hmac::verify(&self.key, format!("{random}:{issued}:{}", self.expires).as_bytes(), &sign).map_err(|_| BAD)?;
        if now().saturating_sub(issued) > self.expires {
            return Err("csrf token expired");
        }
        Ok(())
    }
}

impl Plugin for Csrf {
    fn phases(&self) -> Phases {
        Phases { response: true, log: false, body: false }
    }

    fn access(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        if ctx.parts.method == http::Method::GET {
            return Ok(());
        }
        let refuse = |msg: &str| Err(Reply::new(401, Some(json!({ "error_msg": msg }))));
        let Some(header) = ctx.parts.headers.get(&self.header).and_then(|v| v.to_str().ok()).map(str::to_string) else {
            return refuse("no csrf token in headers");
        };
        let Some(cookie) = ctx.var(&format!("cookie_{}", self.name)) else {
            return refuse("no csrf cookie");
        };
        if header != cookie {
            return refuse("csrf token mismatch");
        }
        self.check(&cookie).or_else(refuse)
    }

    fn header_filter(&self, ctx: &mut ResponseCtx<'_>) {
        let cookie = format!("{}={};path=/;Max-Age={};SameSite=Lax", self.name, self.token(), self.expires);
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            ctx.parts.headers.append(SET_COOKIE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csrf(key: &str, expires: u64) -> Csrf {
        Csrf { key: hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes()), expires, name: "t".into(), header: HeaderName::from_static("t") }
    }

    #[test]
    fn tokens_verify_only_under_their_key() {
        let a = csrf("one", 60);
        let t = a.token();
        assert_eq!(a.check(&t), Ok(()));
        assert!(csrf("two", 60).check(&t).is_err(), "another key");
        assert!(a.check("bm90IGEgdG9rZW4=").is_err());
    }
}
