//! `jwt-auth`: the caller sends a JWT (in a header, `?jwt=` or a cookie) whose `key` claim names
//! a consumer's credential; the token must be signed with that credential's secret or key, and
//! its `exp` and `nbf`, when present, must hold. The claims `claims_to_verify` names must be
//! present too (APISIX's `verify_claims`: an empty or absent list checks only what is there).

use std::sync::Arc;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{LegacyFactory, Factory, Plugin, Reply, RequestCtx, attach_consumer, unauthorized};

const ALGORITHMS: [&str; 12] = ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384", "PS512", "EdDSA"];

pub(crate) fn factory() -> Factory {
    LegacyFactory {
        name: "jwt-auth",
        priority: 2510,
        schema: json!({"type": "object", "properties": {
            "header": {"type": "string", "default": "authorization"},
            "query": {"type": "string", "default": "jwt"},
            "cookie": {"type": "string", "default": "jwt"},
            "hide_credentials": {"type": "boolean", "default": false},
            "key_claim_name": {"type": "string", "default": "key", "minLength": 1},
            "store_in_ctx": {"type": "boolean", "default": false},
            "anonymous_consumer": {"type": "string", "minLength": 1},
            "claims_to_verify": {"type": "array", "items": {"type": "string", "enum": ["exp", "nbf"]}, "uniqueItems": true}
        }}),
        consumer_schema: Some(json!({"type": "object", "properties": {
            "key": {"type": "string", "minLength": 1},
            "secret": {"type": "string", "minLength": 1},
            "public_key": {"type": "string"},
            "algorithm": {"type": "string", "enum": ALGORITHMS, "default": "HS256"},
            "exp": {"type": "integer", "minimum": 1, "default": 86400},
            "base64_secret": {"type": "boolean", "default": false},
            "lifetime_grace_period": {"type": "integer", "minimum": 0, "default": 0}
        }, "required": ["key"], "encrypt_fields": ["secret"]})),
        build: |conf, _| {
            let c: Config = serde_json::from_value(conf.clone()).map_err(|e| e.to_string())?;
            Ok(Arc::new(c))
        },
        credential: Some(|conf| {
            let c: Credential = serde_json::from_value(conf.clone()).map_err(|e| e.to_string())?;
            let key = c.key.clone();
            Ok((key, Arc::new(c.verifier()?)))
        }),
    }
    .into()
}

#[derive(Deserialize)]
#[serde(default)]
struct Config {
    header: String,
    query: String,
    cookie: String,
    hide_credentials: bool,
    key_claim_name: String,
    /// Claims the token must carry (each is then checked as when present).
    claims_to_verify: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            header: "authorization".into(),
            query: "jwt".into(),
            cookie: "jwt".into(),
            hide_credentials: false,
            key_claim_name: "key".into(),
            claims_to_verify: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
struct Credential {
    key: String,
    secret: Option<String>,
    public_key: Option<String>,
    algorithm: Option<String>,
    #[serde(default)]
    base64_secret: bool,
    #[serde(default)]
    lifetime_grace_period: u64,
}

/// What checking a token of one credential needs, prepared once per snapshot.
struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Credential {
    fn verifier(&self) -> Result<Verifier, String> {
        let name = self.algorithm.as_deref().unwrap_or("HS256");
        let alg: Algorithm = name.parse().map_err(|_| format!("unsupported algorithm {name}"))?;
        let key = if name.starts_with("HS") {
            let secret = self.secret.as_deref().ok_or(format!("secret is required when the algorithm is {name}"))?;
            if self.base64_secret {
                let raw = base64::engine::general_purpose::STANDARD.decode(secret).map_err(|e| format!("secret is not base64: {e}"))?;
                DecodingKey::from_secret(&raw)
            } else {
                DecodingKey::from_secret(secret.as_bytes())
            }
        } else {
            let pem = self.public_key.as_deref().ok_or(format!("public_key is required when the algorithm is {name}"))?;
            let parsed = match name {
                "EdDSA" => DecodingKey::from_ed_pem(pem.as_bytes()),
                n if n.starts_with("ES") => DecodingKey::from_ec_pem(pem.as_bytes()),
                _ => DecodingKey::from_rsa_pem(pem.as_bytes()),
            };
            parsed.map_err(|e| format!("invalid public_key for {name}: {e}"))?
        };
        let mut validation = Validation::new(alg);
        // `exp` and `nbf` are checked when the token has them, as APISIX does; none is required.
        validation.required_spec_claims.clear();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.leeway = self.lifetime_grace_period;
        Ok(Verifier { key, validation })
    }
}

/// The payload of a compact JWT, read without checking the signature (to find its key).
fn payload(token: &str) -> Option<Value> {
    let mut parts = token.split('.');
    let (_header, body, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(body.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&raw).ok()
}

enum Source {
    Header,
    Query,
    Cookie,
}

impl Config {
    fn token(&self, ctx: &RequestCtx<'_>) -> Option<(String, Source)> {
        if let Some(v) = ctx.parts.headers.get(self.header.as_str()).and_then(|v| v.to_str().ok()) {
            let t = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v);
            return Some((t.trim().to_string(), Source::Header));
        }
        if let Some(t) = ctx.var(&format!("arg_{}", self.query)) {
            return Some((t, Source::Query));
        }
        ctx.var(&format!("cookie_{}", self.cookie)).map(|t| (t, Source::Cookie))
    }
}

impl Plugin for Config {
    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let Some((token, source)) = self.token(ctx) else {
            return Err(unauthorized("Missing JWT token in request"));
        };
        let Some(claims) = payload(&token) else {
            return Err(unauthorized("JWT token invalid"));
        };
        let Some(key) = claims.get(&self.key_claim_name).and_then(Value::as_str) else {
            return Err(unauthorized("missing user key in JWT token"));
        };
        let Some(cred) = ctx.consumers.find("jwt-auth", key) else {
            return Err(unauthorized("Invalid user key in JWT token"));
        };
        let Some(v) = cred.data.downcast_ref::<Verifier>() else {
            return Err(unauthorized("Invalid user key in JWT token"));
        };
        if let Err(e) = jsonwebtoken::decode::<Value>(&token, &v.key, &v.validation) {
            tracing::warn!(route = ctx.route_id, error = %e, "jwt-auth: token refused");
            return Err(unauthorized("failed to verify jwt"));
        }
        // `decode` checked `exp` and `nbf` where present (a present one that is not a number
        // fails there); a claim listed here must also be present.
        if let Some(missing) = self.claims_to_verify.iter().find(|c| !claims.get(c.as_str()).is_some_and(Value::is_number)) {
            tracing::warn!(route = ctx.route_id, claim = %missing, "jwt-auth: token refused: a claim to verify is missing");
            return Err(unauthorized("failed to verify jwt"));
        }
        let consumer = cred.consumer.clone();
        if self.hide_credentials {
            match source {
                Source::Header => {
                    ctx.parts.headers.remove(self.header.as_str());
                }
                Source::Query => crate::key_auth::remove_query_arg(&mut ctx.parts.uri, &self.query),
                Source::Cookie => remove_cookie(&mut ctx.parts.headers, &self.cookie),
            }
        }
        attach_consumer(ctx, consumer);
        Ok(())
    }
}

/// Drops the cookie `name` from every `Cookie` header, and headers left empty.
fn remove_cookie(headers: &mut http::HeaderMap, name: &str) {
    let kept: Vec<String> = headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|line| {
            line.split(';')
                .map(str::trim)
                .filter(|pair| pair.split('=').next().map(str::trim) != Some(name))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|l| !l.is_empty())
        .collect();
    headers.remove(http::header::COOKIE);
    for line in kept {
        if let Ok(v) = http::HeaderValue::from_str(&line) {
            headers.append(http::header::COOKIE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_and_cookies() {
        // {"key":"k"} as the payload of an unsigned-looking token.
        assert_eq!(payload("e30.eyJrZXkiOiJrIn0.sig"), Some(json!({"key": "k"})));
        assert_eq!(payload("not-a-token"), None);
        assert_eq!(payload("a.b.c.d"), None);
        let mut h = http::HeaderMap::new();
        h.append(http::header::COOKIE, "a=1; jwt=x; b=2".parse().unwrap());
        h.append(http::header::COOKIE, "jwt=y".parse().unwrap());
        remove_cookie(&mut h, "jwt");
        let left: Vec<_> = h.get_all(http::header::COOKIE).iter().collect();
        assert_eq!(left, ["a=1; b=2"]);
    }

    #[test]
    fn credentials_need_their_key_material() {
        let c = |v: Value| serde_json::from_value::<Credential>(v).unwrap().verifier().map(drop);
        assert!(c(json!({"key": "k", "secret": "s"})).is_ok());
        assert!(c(json!({"key": "k"})).unwrap_err().contains("secret is required"));
        assert!(c(json!({"key": "k", "algorithm": "RS256"})).unwrap_err().contains("public_key is required"));
        assert!(c(json!({"key": "k", "algorithm": "ES256", "public_key": "junk"})).unwrap_err().contains("invalid public_key"));
    }
}
