//! `jwt-auth`: the caller sends a JWT (in a header, `?jwt=` or a cookie) whose `key` claim names
//! a consumer's credential; the token must be signed with that credential's secret or key, and
//! its `exp` and `nbf`, when present, must hold. The claims `claims_to_verify` names must be
//! present too (APISIX's `verify_claims`: an empty or absent list checks only what is there).

use std::sync::Arc;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Factory, JsonSchema, Plugin, Reply, RequestCtx, attach_consumer, unauthorized};

pub(crate) fn factory() -> Factory {
    Factory::new("jwt-auth", 2510, |c: Config, _| Ok(Arc::new(c))).with_credential(|c: Credential| {
        let verifier = c.verifier()?;
        Ok((c.key, Arc::new(verifier)))
    })
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// The request header the token is read from.
    #[serde(default = "authorization")]
    header: String,
    /// The query argument the token is read from when the header is absent.
    #[serde(default = "jwt")]
    query: String,
    /// The cookie the token is read from when the header and the query argument are absent.
    #[serde(default = "jwt")]
    cookie: String,
    /// Remove the token from the request before it goes upstream.
    #[serde(default)]
    hide_credentials: bool,
    /// The claim that names the consumer's key.
    #[serde(default = "key")]
    #[schemars(length(min = 1))]
    key_claim_name: String,
    #[serde(default)]
    #[allow(dead_code)]
    store_in_ctx: bool,
    #[schemars(length(min = 1))]
    #[allow(dead_code)]
    anonymous_consumer: Option<String>,
    /// Claims the token must carry (each is then checked as when present).
    #[serde(default)]
    #[schemars(extend("uniqueItems" = true))]
    claims_to_verify: Vec<Claim>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Claim {
    Exp,
    Nbf,
}

impl Claim {
    fn name(&self) -> &'static str {
        match self {
            Claim::Exp => "exp",
            Claim::Nbf => "nbf",
        }
    }
}

fn authorization() -> String {
    "authorization".into()
}

fn jwt() -> String {
    "jwt".into()
}

fn key() -> String {
    "key".into()
}

/// A consumer's key and what its tokens are signed with; the secret is sealed at rest by the
/// Admin API.
#[derive(Deserialize, JsonSchema)]
#[schemars(extend("encrypt_fields" = ["secret"]))]
struct Credential {
    /// The value of the token's key claim that names this consumer.
    #[schemars(length(min = 1))]
    key: String,
    /// The shared secret of the HS algorithms.
    #[schemars(length(min = 1))]
    secret: Option<String>,
    /// The PEM public key of the other algorithms.
    public_key: Option<String>,
    #[serde(default)]
    algorithm: JwtAlgorithm,
    #[serde(default = "day")]
    #[schemars(range(min = 1))]
    #[allow(dead_code)]
    exp: u64,
    /// `secret` is base64-encoded.
    #[serde(default)]
    base64_secret: bool,
    /// Seconds of leeway when checking `exp` and `nbf`.
    #[serde(default)]
    lifetime_grace_period: u64,
}

#[derive(Deserialize, Serialize, JsonSchema, Default, Clone, Copy)]
#[serde(rename_all = "UPPERCASE")]
enum JwtAlgorithm {
    #[default]
    Hs256,
    Hs384,
    Hs512,
    Rs256,
    Rs384,
    Rs512,
    Es256,
    Es384,
    Ps256,
    Ps384,
    Ps512,
    #[serde(rename = "EdDSA")]
    EdDsa,
}

impl JwtAlgorithm {
    /// The algorithm, and its name as a token's header gives it.
    fn algorithm(self) -> (Algorithm, &'static str) {
        match self {
            JwtAlgorithm::Hs256 => (Algorithm::HS256, "HS256"),
            JwtAlgorithm::Hs384 => (Algorithm::HS384, "HS384"),
            JwtAlgorithm::Hs512 => (Algorithm::HS512, "HS512"),
            JwtAlgorithm::Rs256 => (Algorithm::RS256, "RS256"),
            JwtAlgorithm::Rs384 => (Algorithm::RS384, "RS384"),
            JwtAlgorithm::Rs512 => (Algorithm::RS512, "RS512"),
            JwtAlgorithm::Es256 => (Algorithm::ES256, "ES256"),
            JwtAlgorithm::Es384 => (Algorithm::ES384, "ES384"),
            JwtAlgorithm::Ps256 => (Algorithm::PS256, "PS256"),
            JwtAlgorithm::Ps384 => (Algorithm::PS384, "PS384"),
            JwtAlgorithm::Ps512 => (Algorithm::PS512, "PS512"),
            JwtAlgorithm::EdDsa => (Algorithm::EdDSA, "EdDSA"),
        }
    }
}

fn day() -> u64 {
    86400
}

/// What checking a token of one credential needs, prepared once per snapshot.
struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Credential {
    fn verifier(&self) -> Result<Verifier, String> {
        let (alg, name) = self.algorithm.algorithm();
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
        if let Some(missing) = self.claims_to_verify.iter().find(|c| !claims.get(c.name()).is_some_and(Value::is_number)) {
            tracing::warn!(route = ctx.route_id, claim = missing.name(), "jwt-auth: token refused: a claim to verify is missing");
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
    use serde_json::json;

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
        let c = |v: Value| crate::parse::<Credential>(&v).unwrap().verifier().map(drop);
        assert!(c(json!({"key": "k", "secret": "s"})).is_ok());
        assert!(c(json!({"key": "k"})).unwrap_err().contains("secret is required"));
        assert!(c(json!({"key": "k", "algorithm": "RS256"})).unwrap_err().contains("public_key is required"));
        assert!(c(json!({"key": "k", "algorithm": "ES256", "public_key": "junk"})).unwrap_err().contains("invalid public_key"));
    }
}
