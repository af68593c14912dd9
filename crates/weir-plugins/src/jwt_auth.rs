//! `jwt-auth`: the caller sends a JWT (in a header, `?jwt=` or a cookie) whose `key` claim names
//! a consumer's credential; the token must be signed with that credential's secret or key, and
//! its `exp` and `nbf`, when present, must hold. The claims `claims_to_verify` names must be
//! present too (APISIX's `verify_claims`: an empty or absent list checks only what is there).
//!
//! Weir adds HS credentials whose secret is never stored: a `secret_seed` from which the
//! secret is derived ([`secret`]: HMAC-SHA256 of the seed under the node's hash key,
//! `plugin_attr.jwt-auth.hash_key`, derived from the keyring), scoped to a route `scope` and
//! valid until `not_after`. Since tokens name their credential by its `key`, a rotated secret
//! overlaps as the same credential's `previous_seed`, until `previous_not_after`. A credential
//! a route may not use (another scope's, expired) is refused as an unknown key is; on a route
//! with a `scope`, every refusal of a token that names a key is the same answer, so a caller
//! learns nothing of what the store holds.

use std::any::Any;
use std::sync::Arc;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use ring::hmac;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::keyed::{hash_key, is_hex64, keyed_hash, now_secs};
use crate::{Consumer, Consumers, Factory, JsonSchema, Plugin, Reply, RequestCtx, attach_consumer, unauthorized};

const NAME: &str = "jwt-auth";

/// The answer to every refusal of a token naming a key on a route with a `scope`.
const REFUSED: &str = "failed to verify jwt";

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, 2510, |c: Config, b| Ok(Arc::new(JwtAuth { hash_key: hash_key(b.attr)?, config: c }))).with_credential(prepare)
}

/// The HS secret of a credential whose `secret_seed` is `seed`, on a node whose
/// `plugin_attr.jwt-auth.hash_key` is `hash_key`: lowercase hex of HMAC-SHA256(`hash_key`,
/// `seed`). Tokens are signed with the bytes of this text.
pub fn secret(hash_key: &[u8], seed: &str) -> String {
    keyed_hash(&hmac::Key::new(hmac::HMAC_SHA256, hash_key), seed)
}

/// The `plugin_attr.jwt-auth` settings that make seeded credentials work with `hash_key`.
pub fn attr(hash_key: &[u8]) -> Value {
    crate::basic_auth::attr(hash_key)
}

fn prepare(c: Credential) -> Result<(String, Arc<dyn Any + Send + Sync>), String> {
    if c.secret_seed.is_none() {
        if c.scope.is_some() || c.not_after.is_some() || c.previous_seed.is_some() || c.previous_not_after.is_some() {
            return Err("scope, not_after, previous_seed and previous_not_after go with secret_seed".into());
        }
        let verifier = c.verifier()?;
        return Ok((c.key, Arc::new(verifier)));
    }
    let key = c.key.clone();
    Ok((key, Arc::new(c.seeded()?)))
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
    /// Weir's: only seeded credentials of exactly this scope are accepted. Without it, only
    /// credentials without a scope are.
    #[schemars(length(min = 1, max = 128))]
    scope: Option<String>,
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

/// A consumer's key and what its tokens are signed with: APISIX's `secret` (sealed at rest by
/// the Admin API) or `public_key`, or Weir's `secret_seed` the secret is derived from, which
/// needs no sealing (only HS algorithms, no `secret`, `public_key` or `base64_secret` beside).
#[derive(Deserialize, JsonSchema)]
#[schemars(extend("encrypt_fields" = ["secret"]))]
#[schemars(extend("dependencies" = {
    "secret_seed": {
        "properties": {"algorithm": {"enum": ["HS256", "HS384", "HS512"]}},
        "not": {"anyOf": [{"required": ["secret"]}, {"required": ["public_key"]}, {"properties": {"base64_secret": {"const": true}}, "required": ["base64_secret"]}]}
    },
    "scope": ["secret_seed"],
    "not_after": ["secret_seed"],
    "previous_seed": ["secret_seed", "previous_not_after"],
    "previous_not_after": ["previous_seed"]
}))]
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
    /// Weir's: 64 lowercase hex digits the HS secret is derived from ([`secret`]).
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    secret_seed: Option<String>,
    /// Only routes of this `scope` accept the credential; without it, only routes without one.
    #[schemars(length(min = 1, max = 128))]
    scope: Option<String>,
    /// Unix seconds after which the credential is refused.
    not_after: Option<i64>,
    /// The seed of the secret before the last rotation, accepted too until `previous_not_after`.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    previous_seed: Option<String>,
    /// Unix seconds after which the previous secret is refused.
    previous_not_after: Option<i64>,
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

/// What checking a token of a seeded credential needs: its secrets are derived per request,
/// with the node's hash key only the plugin instance holds.
struct Seeded {
    seed: String,
    /// The previous seed, and until when it is accepted.
    previous: Option<(String, i64)>,
    scope: Option<String>,
    not_after: Option<i64>,
    validation: Validation,
}

/// The validation of tokens signed with `alg`, with `leeway` seconds on `exp` and `nbf`.
fn validation(alg: Algorithm, leeway: u64) -> Validation {
    let mut validation = Validation::new(alg);
    // `exp` and `nbf` are checked when the token has them, as APISIX does; none is required.
    validation.required_spec_claims.clear();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation.leeway = leeway;
    validation
}

impl Credential {
    fn seeded(self) -> Result<Seeded, String> {
        let (alg, name) = self.algorithm.algorithm();
        if !name.starts_with("HS") {
            return Err(format!("secret_seed needs an HS algorithm, not {name}"));
        }
        if self.secret.is_some() || self.public_key.is_some() || self.base64_secret {
            return Err("secret_seed goes without secret, public_key and base64_secret".into());
        }
        let seed = self.secret_seed.unwrap_or_default();
        if !is_hex64(&seed) || self.previous_seed.as_deref().is_some_and(|s| !is_hex64(s)) {
            return Err("secret_seed and previous_seed: must be 64 lowercase hex digits".into());
        }
        if self.scope.as_ref().is_some_and(|s| s.is_empty() || s.len() > 128) {
            return Err("scope: must be 1 to 128 characters".into());
        }
        let previous = match (self.previous_seed, self.previous_not_after) {
            (Some(s), Some(t)) => Some((s, t)),
            (None, None) => None,
            _ => return Err("previous_seed and previous_not_after go together".into()),
        };
        Ok(Seeded { seed, previous, scope: self.scope, not_after: self.not_after, validation: validation(alg, self.lifetime_grace_period) })
    }

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
        Ok(Verifier { key, validation: validation(alg, self.lifetime_grace_period) })
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

struct JwtAuth {
    config: Config,
    hash_key: Option<hmac::Key>,
}

/// Why a token naming a key is refused: APISIX's answers on routes without a scope.
enum Refusal {
    /// No credential of this key may be used here (none, another scope's, expired).
    Unknown(&'static str),
    /// The credential's secret does not verify the token, or a claim fails.
    Unverified(String),
}

impl Plugin for JwtAuth {
    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        self.authenticate(ctx, now_secs())
    }
}

impl JwtAuth {
    /// The request phase at `now` (unix seconds).
    fn authenticate(&self, ctx: &mut RequestCtx<'_>, now: i64) -> Result<(), Reply> {
        let Some((token, source)) = self.config.token(ctx) else {
            return Err(unauthorized("Missing JWT token in request"));
        };
        let Some(claims) = payload(&token) else {
            return Err(unauthorized("JWT token invalid"));
        };
        let Some(key) = claims.get(&self.config.key_claim_name).and_then(Value::as_str) else {
            return Err(unauthorized("missing user key in JWT token"));
        };
        let consumer = match self.identify(ctx.consumers, key, &token, &claims, now) {
            Ok(c) => c,
            Err(refusal) => {
                let (reason, answer) = match &refusal {
                    Refusal::Unknown(reason) => (reason.to_string(), "Invalid user key in JWT token"),
                    Refusal::Unverified(reason) => (reason.clone(), REFUSED),
                };
                tracing::warn!(route = ctx.route_id, reason, "jwt-auth: token refused");
                return Err(unauthorized(if self.config.scope.is_some() { REFUSED } else { answer }));
            }
        };
        if self.config.hide_credentials {
            match source {
                Source::Header => {
                    ctx.parts.headers.remove(self.config.header.as_str());
                }
                Source::Query => crate::key_auth::remove_query_arg(&mut ctx.parts.uri, &self.config.query),
                Source::Cookie => remove_cookie(&mut ctx.parts.headers, &self.config.cookie),
            }
        }
        attach_consumer(ctx, consumer);
        Ok(())
    }

    /// The consumer `token` (of `claims`, naming `key`) is from on this route at `now`, or why
    /// it is refused.
    fn identify(&self, consumers: &Consumers, key: &str, token: &str, claims: &Value, now: i64) -> Result<Arc<Consumer>, Refusal> {
        let cred = consumers.find(NAME, key).ok_or(Refusal::Unknown("no consumer holds the key"))?;
        let verified = if let Some(v) = cred.data.downcast_ref::<Verifier>() {
            if self.config.scope.is_some() {
                return Err(Refusal::Unknown("a credential without a scope on a route with one"));
            }
            jsonwebtoken::decode::<Value>(token, &v.key, &v.validation).map(drop)
        } else if let Some(s) = cred.data.downcast_ref::<Seeded>() {
            if s.scope != self.config.scope {
                return Err(Refusal::Unknown("the key belongs to another scope"));
            }
            if s.not_after.is_some_and(|t| t < now) {
                return Err(Refusal::Unknown("the key has expired"));
            }
            let hash_key = self.hash_key.as_ref().ok_or(Refusal::Unknown("no hash key to derive the secret with"))?;
            let check = |seed: &str| jsonwebtoken::decode::<Value>(token, &DecodingKey::from_secret(keyed_hash(hash_key, seed).as_bytes()), &s.validation).map(drop);
            match (check(&s.seed), &s.previous) {
                (Err(_), Some((seed, until))) if *until >= now && check(seed).is_ok() => Ok(()),
                (outcome, _) => outcome,
            }
        } else {
            return Err(Refusal::Unknown("no consumer holds the key"));
        };
        verified.map_err(|e| Refusal::Unverified(e.to_string()))?;
        // `decode` checked `exp` and `nbf` where present (a present one that is not a number
        // fails there); a claim listed here must also be present.
        if let Some(missing) = self.config.claims_to_verify.iter().find(|c| !claims.get(c.name()).is_some_and(Value::is_number)) {
            return Err(Refusal::Unverified(format!("the claim {} to verify is missing", missing.name())));
        }
        Ok(cred.consumer.clone())
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

    const HASH_KEY: [u8; 32] = [5; 32];
    const NOW: i64 = 1_700_000_000;

    fn seed(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    /// Consumers holding `credentials` (username, `jwt-auth` config), one credential object each.
    fn consumers(credentials: &[(&str, Value)]) -> Consumers {
        crate::keyed::consumers_of(NAME, credentials)
    }

    fn plugin(route: Value) -> JwtAuth {
        JwtAuth { config: crate::parse(&route).unwrap(), hash_key: hash_key(Some(&attr(&HASH_KEY))).unwrap() }
    }

    /// An HS256 token of `claims` signed with `secret`.
    fn token(claims: Value, secret: &str) -> String {
        jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), &claims, &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    /// The consumer `plugin` lets in for `Authorization: Bearer {token}` at `now`.
    fn who(plugin: &JwtAuth, consumers: &Consumers, token: &str, now: i64) -> Result<String, Reply> {
        let auth = format!("Bearer {token}");
        let (mut parts, ()) = http::Request::builder().uri("/").header("authorization", auth).body(()).unwrap().into_parts();
        let mut ctx = RequestCtx::new(&mut parts, "127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap(), "http", "r", consumers);
        plugin.authenticate(&mut ctx, now)?;
        Ok(ctx.consumer.as_ref().map(|c| c.username.clone()).unwrap_or_default())
    }

    #[test]
    fn seeded_secrets_verify_tokens_in_their_scope_only() {
        let cs = consumers(&[
            ("alice", json!({"key": "alice", "secret_seed": seed(1), "scope": "prod"})),
            ("bob", json!({"key": "bob", "secret_seed": seed(2), "scope": "prod", "not_after": NOW - 1})),
            ("carol", json!({"key": "carol", "secret_seed": seed(3), "scope": "staging"})),
            ("dave", json!({"key": "dave", "secret": "plain"})),
            ("erin", json!({"key": "erin", "secret_seed": seed(5)})),
        ]);
        let s = |n: u8| secret(&HASH_KEY, &seed(n));
        let prod = plugin(json!({"scope": "prod"}));
        let exp = NOW * 2;
        assert_eq!(who(&prod, &cs, &token(json!({"key": "alice", "exp": exp}), &s(1)), NOW).unwrap(), "alice");
        let refused = unauthorized(REFUSED);
        let tokens = [
            ("unknown key", token(json!({"key": "nobody"}), &s(1))),
            ("bad signature", token(json!({"key": "alice"}), &s(2))),
            ("signed with the seed", token(json!({"key": "alice"}), &seed(1))),
            ("expired credential", token(json!({"key": "bob"}), &s(2))),
            ("another scope", token(json!({"key": "carol"}), &s(3))),
            ("plain credential", token(json!({"key": "dave"}), "plain")),
            ("unscoped credential", token(json!({"key": "erin"}), &s(5))),
            ("expired token", token(json!({"key": "alice", "exp": NOW - 3600}), &s(1))),
        ];
        for (what, t) in &tokens {
            assert_eq!(who(&prod, &cs, t, NOW), Err(refused.clone()), "{what}");
        }
        // The credential works through its second of expiry.
        assert_eq!(who(&prod, &cs, &token(json!({"key": "bob"}), &s(2)), NOW - 1).unwrap(), "bob");
        // A route without a scope: APISIX's answers, plain and unscoped seeded credentials.
        let open = plugin(json!({}));
        assert_eq!(who(&open, &cs, &token(json!({"key": "dave"}), "plain"), NOW).unwrap(), "dave");
        assert_eq!(who(&open, &cs, &token(json!({"key": "erin"}), &s(5)), NOW).unwrap(), "erin");
        assert_eq!(who(&open, &cs, &token(json!({"key": "dave"}), "wrong"), NOW), Err(unauthorized("failed to verify jwt")));
        assert_eq!(who(&open, &cs, &token(json!({"key": "nobody"}), "x"), NOW), Err(unauthorized("Invalid user key in JWT token")));
        assert_eq!(who(&open, &cs, &token(json!({"key": "alice"}), &s(1)), NOW), Err(unauthorized("Invalid user key in JWT token")), "scoped credentials are unknown here");
        // Without the node's hash key, no seeded credential verifies anything.
        let keyless = JwtAuth { config: crate::parse(&json!({})).unwrap(), hash_key: None };
        assert!(who(&keyless, &cs, &token(json!({"key": "erin"}), &s(5)), NOW).is_err());
    }

    #[test]
    fn a_rotated_secret_overlaps_until_its_previous_not_after() {
        let cs = consumers(&[("alice", json!({"key": "alice", "secret_seed": seed(2), "scope": "prod", "previous_seed": seed(1), "previous_not_after": NOW + 60}))]);
        let prod = plugin(json!({"scope": "prod"}));
        let (old, new) = (token(json!({"key": "alice"}), &secret(&HASH_KEY, &seed(1))), token(json!({"key": "alice"}), &secret(&HASH_KEY, &seed(2))));
        for now in [NOW, NOW + 60] {
            assert_eq!(who(&prod, &cs, &new, now).unwrap(), "alice");
            assert_eq!(who(&prod, &cs, &old, now).unwrap(), "alice");
        }
        assert_eq!(who(&prod, &cs, &new, NOW + 61).unwrap(), "alice");
        assert_eq!(who(&prod, &cs, &old, NOW + 61), Err(unauthorized(REFUSED)));
    }

    #[test]
    fn seeded_credentials_are_well_formed() {
        let schema = crate::schema_of::<Credential>();
        assert_eq!(schema["encrypt_fields"], json!(["secret"]));
        let valid = jsonschema::validator_for(&schema).unwrap();
        let good = [
            json!({"key": "k", "secret": "s"}),
            json!({"key": "k", "algorithm": "RS256", "public_key": "pem", "secret": "s"}),
            json!({"key": "k", "secret_seed": seed(1), "base64_secret": false}),
            json!({"key": "k", "secret_seed": seed(1), "algorithm": "HS512", "scope": "prod", "not_after": NOW, "previous_seed": seed(2), "previous_not_after": NOW}),
        ];
        for good in good {
            assert!(valid.is_valid(&good), "{good}");
        }
        for good in [json!({"key": "k", "secret_seed": seed(1), "base64_secret": false}), json!({"key": "k", "secret_seed": seed(1), "scope": "p", "previous_seed": seed(2), "previous_not_after": NOW})] {
            assert!(prepare(crate::parse(&good).unwrap()).is_ok(), "{good}");
        }
        let bad = [
            json!({"key": "k", "secret_seed": seed(1), "secret": "s"}),
            json!({"key": "k", "secret_seed": seed(1), "base64_secret": true}),
            json!({"key": "k", "secret_seed": seed(1), "algorithm": "RS256", "public_key": "pem"}),
            json!({"key": "k", "secret_seed": seed(1), "algorithm": "RS256"}),
            json!({"key": "k", "secret_seed": seed(0xab).to_uppercase()}),
            json!({"key": "k", "secret_seed": &seed(1)[1..]}),
            json!({"key": "k", "secret_seed": seed(1), "scope": ""}),
            json!({"key": "k", "secret_seed": seed(1), "previous_seed": seed(2)}),
            json!({"key": "k", "secret_seed": seed(1), "previous_not_after": NOW}),
            json!({"key": "k", "secret_seed": seed(1), "previous_seed": "x", "previous_not_after": NOW}),
            json!({"key": "k", "secret": "s", "scope": "prod"}),
            json!({"key": "k", "secret": "s", "not_after": NOW}),
            json!({"key": "k", "secret": "s", "previous_seed": seed(2), "previous_not_after": NOW}),
        ];
        for bad in bad {
            assert!(!valid.is_valid(&bad), "{bad}");
            assert!(crate::parse::<Credential>(&bad).map_err(drop).and_then(|c| prepare(c).map_err(drop)).is_err(), "{bad}");
        }
        // The secret the platform hands out: HMAC-SHA256 of the seed in lowercase hex.
        let key: Vec<u8> = (0..32).collect();
        assert_eq!(secret(&key, &seed(1)), crate::key_auth_hash(&key, &seed(1)));
    }
}
