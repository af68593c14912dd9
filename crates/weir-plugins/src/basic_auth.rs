//! `basic-auth`: the caller sends `Authorization: Basic base64(username:password)` matching a
//! consumer's (or credential's) `username` and `password`.
//!
//! Weir adds credentials that never hold the password readable: `credential_hash` is
//! [`credential_hash`] of `username:password` under the node's hash key
//! (`plugin_attr.basic-auth.hash_key`, derived from the keyring), scoped to a route `scope` and
//! valid until `not_after`, so a password can be rotated with an overlap (the old and the new
//! hash are two credentials). A caller is looked up by its username first, then by the hash of
//! what it sent. Every refusal of the credentials given, whatever its reason, is the same
//! answer, so a caller learns nothing of what the store holds.

use std::any::Any;
use std::sync::Arc;

use base64::Engine as _;
use http::header::{self, HeaderValue};
use ring::hmac;
use serde::Deserialize;
use serde_json::Value;
use subtle::ConstantTimeEq as _;

use crate::keyed::{self, HASHED, hash_key, hashed_id, is_hex64, keyed_hash, now_secs};
use crate::{Consumer, Consumers, Factory, JsonSchema, Plugin, Reply, RequestCtx, attach_consumer, unauthorized};

const NAME: &str = "basic-auth";


pub(crate) fn factory() -> Factory {
    Factory::new(NAME, 2520, |c: Config, b| Ok(Arc::new(build(c, b.attr)?))).with_credential(prepare)
}

/// Lowercase hex of HMAC-SHA256(`hash_key`, `username:password`): what a credential's
/// `credential_hash` holds on a node whose `plugin_attr.basic-auth.hash_key` is `hash_key`.
pub fn credential_hash(hash_key: &[u8], username: &str, password: &str) -> String {
    keyed_hash(&hmac::Key::new(hmac::HMAC_SHA256, hash_key), &format!("{username}:{password}"))
}

/// The `plugin_attr.basic-auth` settings that make hashed credentials work with `hash_key`.
pub fn attr(hash_key: &[u8]) -> Value {
    keyed::attr(hash_key)
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// Remove the `Authorization` header before the request goes upstream.
    #[serde(default)]
    hide_credentials: bool,
    #[schemars(length(min = 1))]
    #[allow(dead_code)]
    anonymous_consumer: Option<String>,
    /// Weir's: only hashed credentials of exactly this scope are accepted. Without it, only
    /// plain credentials and hashed ones without a scope are.
    #[schemars(length(min = 1, max = 128))]
    scope: Option<String>,
}

/// A consumer's username and password, the password sealed at rest by the Admin API
/// (`encrypt_fields`), or Weir's `credential_hash` of both, which needs no sealing. Exactly
/// one of the two.
#[derive(Deserialize, JsonSchema)]
#[schemars(extend("encrypt_fields" = ["password"]))]
#[schemars(extend("oneOf" = [{"required": ["username", "password"]}, {"required": ["credential_hash"]}]))]
#[schemars(extend("dependencies" = {"username": ["password"], "password": ["username"], "scope": ["credential_hash"], "not_after": ["credential_hash"]}))]
struct Credential {
    username: Option<String>,
    password: Option<String>,
    /// Lowercase hex of HMAC-SHA256 of `username:password` under the node's hash key
    /// ([`credential_hash`]).
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    credential_hash: Option<String>,
    /// Only routes of this `scope` accept the credential; without it, only routes without one.
    #[schemars(length(min = 1, max = 128))]
    scope: Option<String>,
    /// Unix seconds after which the credential is refused.
    not_after: Option<i64>,
}

struct Password(String);

/// What a hashed credential is checked against once its hash matched.
struct Hashed {
    scope: Option<String>,
    not_after: Option<i64>,
}

fn prepare(c: Credential) -> Result<(String, Arc<dyn Any + Send + Sync>), String> {
    match (c.username, c.password, c.credential_hash) {
        (Some(_), Some(_), None) if c.scope.is_some() || c.not_after.is_some() => Err("scope and not_after go with credential_hash".into()),
        (Some(user), Some(_), None) if user.starts_with(HASHED) => Err(format!("username: must not start with {HASHED:?}")),
        (Some(user), Some(password), None) => Ok((user, Arc::new(Password(password)))),
        (None, None, Some(hash)) => {
            if !is_hex64(&hash) {
                return Err("credential_hash: must be 64 lowercase hex digits".into());
            }
            if c.scope.as_ref().is_some_and(|s| s.is_empty() || s.len() > 128) {
                return Err("scope: must be 1 to 128 characters".into());
            }
            Ok((format!("{HASHED}{hash}"), Arc::new(Hashed { scope: c.scope, not_after: c.not_after })))
        }
        _ => Err("exactly one of username and password, or credential_hash, is needed".into()),
    }
}

fn build(c: Config, attr: Option<&Value>) -> Result<BasicAuth, String> {
    Ok(BasicAuth { hide: c.hide_credentials, scope: c.scope, hash_key: hash_key(attr)? })
}

struct BasicAuth {
    hide: bool,
    scope: Option<String>,
    hash_key: Option<hmac::Key>,
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
        self.authenticate(ctx, now_secs)
    }
}

impl BasicAuth {
    /// The request phase, with `now` telling the time (unix seconds) when an expiry is to be
    /// checked: most credentials have none, and they cost no clock read.
    fn authenticate(&self, ctx: &mut RequestCtx<'_>, now: impl Fn() -> i64) -> Result<(), Reply> {
        let Some(value) = ctx.parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return Err(unauthorized("Missing authorization in request")
                .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm='.'")));
        };
        let (user, pass) = decode(value).map_err(|e| {
            tracing::warn!(route = ctx.route_id, error = e, "basic-auth: unreadable authorization header");
            unauthorized("Invalid authorization in request")
        })?;
        let consumer = match self.identify(ctx.consumers, &user, &pass, now) {
            Ok(c) => c,
            Err(reason) => {
                tracing::warn!(route = ctx.route_id, reason, "basic-auth: the credentials given are refused");
                return Err(unauthorized("Invalid user authorization"));
            }
        };
        if self.hide {
            ctx.parts.headers.remove(header::AUTHORIZATION);
        }
        attach_consumer(ctx, consumer);
        Ok(())
    }

    /// The consumer `user` and `pass` name on this route at `now`, or why none does (for the
    /// log only).
    fn identify(&self, consumers: &Consumers, user: &str, pass: &str, now: impl Fn() -> i64) -> Result<Arc<Consumer>, &'static str> {
        if self.scope.is_none()
            && !user.starts_with(HASHED)
            && let Some(c) = consumers.find(NAME, user)
            && let Some(p) = c.data.downcast_ref::<Password>()
            && bool::from(p.0.as_bytes().ct_eq(pass.as_bytes()))
        {
            return Ok(c.consumer.clone());
        }
        let hash_key = self.hash_key.as_ref().ok_or("no consumer holds the credentials")?;
        let c = consumers.find(NAME, &hashed_id(hash_key, &format!("{user}:{pass}"))).ok_or("no consumer holds the credentials")?;
        let h = c.data.downcast_ref::<Hashed>().ok_or("no consumer holds the credentials")?;
        if h.scope != self.scope {
            return Err("the credentials belong to another scope");
        }
        if h.not_after.is_some_and(|t| t < now()) {
            return Err("the credentials have expired");
        }
        Ok(c.consumer.clone())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::parse;

    use super::*;

    const HASH_KEY: [u8; 32] = [9; 32];
    const NOW: i64 = 1_700_000_000;

    fn basic(user: &str, pass: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
    }

    /// Consumers holding `credentials` (username, `basic-auth` config), one credential object each.
    fn consumers(credentials: &[(&str, Value)]) -> Consumers {
        crate::keyed::consumers_of(NAME, credentials)
    }

    fn plugin(route: Value) -> BasicAuth {
        build(parse(&route).unwrap(), Some(&attr(&HASH_KEY))).unwrap()
    }

    fn hashed(user: &str, pass: &str, extra: Value) -> Value {
        let mut c = json!({ "credential_hash": credential_hash(&HASH_KEY, user, pass) });
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        c
    }

    /// The consumer `plugin` lets in for `authorization` at `now`.
    fn who(plugin: &BasicAuth, consumers: &Consumers, authorization: &str, now: i64) -> Result<String, Reply> {
        let (mut parts, ()) = http::Request::builder().uri("/").header("authorization", authorization).body(()).unwrap().into_parts();
        let mut ctx = RequestCtx::new(&mut parts, "127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap(), "http", "r", consumers);
        plugin.authenticate(&mut ctx, || now)?;
        Ok(ctx.consumer.as_ref().map(|c| c.username.clone()).unwrap_or_default())
    }

    #[test]
    fn decodes_basic_values() {
        assert_eq!(decode("Basic Zm9vOmJhcg==").unwrap(), ("foo".into(), "bar".into()));
        assert_eq!(decode("Basic Zm9vIDogYmEgcg==").unwrap(), ("foo".into(), "bar".into()), "whitespace dropped");
        assert!(decode("Bearer x").is_err());
        assert!(decode("Basic !!!").is_err());
        assert!(decode("Basic Zm9v").is_err(), "no colon");
    }

    #[test]
    fn plain_and_hashed_credentials_match() {
        let cs = consumers(&[("ann", json!({"username": "ann", "password": "pw"})), ("bob", hashed("bob", "s3cret", json!({})))]);
        let open = plugin(json!({}));
        assert_eq!(who(&open, &cs, &basic("ann", "pw"), NOW).unwrap(), "ann");
        assert_eq!(who(&open, &cs, &basic("bob", "s3cret"), NOW).unwrap(), "bob");
        // Without the node's hash key, a hashed credential never matches.
        let keyless = build(parse(&json!({})).unwrap(), None).unwrap();
        assert_eq!(who(&keyless, &cs, &basic("ann", "pw"), NOW).unwrap(), "ann");
        assert!(who(&keyless, &cs, &basic("bob", "s3cret"), NOW).is_err());
    }

    #[test]
    fn every_refusal_of_credentials_is_the_same_answer() {
        let cs = consumers(&[
            ("alice", hashed("alice", "a-pass", json!({"scope": "prod"}))),
            ("bob", hashed("bob", "b-pass", json!({"scope": "prod", "not_after": NOW - 1}))),
            ("carol", hashed("carol", "c-pass", json!({"scope": "staging"}))),
            ("dave", json!({"username": "dave", "password": "d-pass"})),
            ("erin", hashed("erin", "e-pass", json!({}))),
        ]);
        let prod = plugin(json!({"scope": "prod"}));
        assert_eq!(who(&prod, &cs, &basic("alice", "a-pass"), NOW).unwrap(), "alice");
        let wrong = who(&prod, &cs, &basic("nobody", "x"), NOW).unwrap_err();
        assert_eq!(wrong, unauthorized("Invalid user authorization"));
        let refused = [
            basic("alice", "wrong"),
            basic("bob", "b-pass"),
            basic("carol", "c-pass"),
            basic("dave", "d-pass"),
            basic("erin", "e-pass"),
            basic("\0hash:", &credential_hash(&HASH_KEY, "alice", "a-pass")),
            basic(&format!("\0hash:{}", credential_hash(&HASH_KEY, "alice", "a-pass")), ""),
        ];
        for r in &refused {
            assert_eq!(who(&prod, &cs, r, NOW), Err(wrong.clone()), "{r:?}");
        }
        // The credentials work until their second of expiry.
        assert_eq!(who(&prod, &cs, &basic("bob", "b-pass"), NOW - 1).unwrap(), "bob");
        // A route without a scope takes plain credentials and unscoped hashes, not scoped ones.
        let open = plugin(json!({}));
        assert_eq!(who(&open, &cs, &basic("dave", "d-pass"), NOW).unwrap(), "dave");
        assert_eq!(who(&open, &cs, &basic("erin", "e-pass"), NOW).unwrap(), "erin");
        assert_eq!(who(&open, &cs, &basic("dave", "nope"), NOW), Err(wrong.clone()));
        assert_eq!(who(&open, &cs, &basic("alice", "a-pass"), NOW), Err(wrong));
    }

    #[test]
    fn a_rotated_password_overlaps_until_its_not_after() {
        let cs = consumers(&[("alice", hashed("alice", "new", json!({"scope": "prod"}))), ("alice", hashed("alice", "old", json!({"scope": "prod", "not_after": NOW + 60})))]);
        let prod = plugin(json!({"scope": "prod"}));
        for now in [NOW, NOW + 60] {
            assert_eq!(who(&prod, &cs, &basic("alice", "new"), now).unwrap(), "alice");
            assert_eq!(who(&prod, &cs, &basic("alice", "old"), now).unwrap(), "alice");
        }
        assert_eq!(who(&prod, &cs, &basic("alice", "new"), NOW + 61).unwrap(), "alice");
        assert!(who(&prod, &cs, &basic("alice", "old"), NOW + 61).is_err());
    }

    #[test]
    fn credentials_are_a_password_or_a_well_formed_hash() {
        let schema = crate::schema_of::<Credential>();
        assert_eq!(schema["encrypt_fields"], json!(["password"]));
        let valid = jsonschema::validator_for(&schema).unwrap();
        let hash = credential_hash(&HASH_KEY, "u", "p");
        for good in [json!({"username": "u", "password": "p"}), json!({"credential_hash": hash}), json!({"credential_hash": hash, "scope": "prod", "not_after": NOW})] {
            assert!(valid.is_valid(&good), "{good}");
            assert!(prepare(parse(&good).unwrap()).is_ok(), "{good}");
        }
        let bad = [
            json!({}),
            json!({"username": "u"}),
            json!({"password": "p"}),
            json!({"username": "u", "password": "p", "credential_hash": hash}),
            json!({"username": "u", "credential_hash": hash}),
            json!({"credential_hash": hash.to_uppercase()}),
            json!({"credential_hash": &hash[1..]}),
            json!({"credential_hash": hash, "scope": ""}),
            json!({"credential_hash": hash, "not_after": 1.5}),
            json!({"username": "u", "password": "p", "scope": "prod"}),
            json!({"username": "u", "password": "p", "not_after": NOW}),
        ];
        for bad in bad {
            assert!(!valid.is_valid(&bad), "{bad}");
            assert!(parse::<Credential>(&bad).map_err(drop).and_then(|c| prepare(c).map_err(drop)).is_err(), "{bad}");
        }
        assert!(prepare(parse(&json!({"username": format!("{HASHED}x"), "password": "p"})).unwrap()).is_err());
        // The hash the platform computes: HMAC-SHA256 of `username:password` in lowercase hex,
        // the same as key-auth's of that text.
        let key: Vec<u8> = (0..32).collect();
        assert_eq!(credential_hash(&key, "u", "p"), crate::key_auth_hash(&key, "u:p"));
        assert!(build(parse(&json!({})).unwrap(), Some(&json!({"hash_key": "xyz"}))).is_err());
    }
}
