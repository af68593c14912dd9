//! `key-auth`: the caller names itself with a key, in a header or the query string, that a
//! consumer (or one of its credentials) holds.
//!
//! Weir adds credentials that never hold the key readable: `key_hash` is [`key_hash`] of the key
//! under the node's hash key (`plugin_attr.key-auth.hash_key`, derived from the keyring), scoped
//! to a route `scope` and valid until `not_after`, so a key can be rotated with an overlap. A
//! caller's key is looked up as it is first, then by its hash. Every refusal of a key given,
//! whatever its reason, is the same answer, so a caller learns nothing of what the store holds.

use std::any::Any;
use std::borrow::Cow;
use std::sync::Arc;

use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use ring::hmac;
use serde::Deserialize;
use serde_json::Value;

use crate::keyed::{self, HASHED, hash_key, hashed_id, keyed_hash, now_secs};
use crate::{Consumer, Consumers, Factory, JsonSchema, Plugin, Reply, RequestCtx, attach_consumer, unauthorized};

const NAME: &str = "key-auth";


pub(crate) fn factory() -> Factory {
    Factory::new(NAME, 2500, |c: Config, b| Ok(Arc::new(build(c, b.attr)?))).with_credential(prepare)
}

/// Lowercase hex of HMAC-SHA256(`hash_key`, `key`): what a credential's `key_hash` holds for
/// `key` on a node whose `plugin_attr.key-auth.hash_key` is `hash_key`.
pub fn key_hash(hash_key: &[u8], key: &str) -> String {
    keyed_hash(&hmac::Key::new(hmac::HMAC_SHA256, hash_key), key)
}

/// The `plugin_attr.key-auth` settings that make hashed credentials work with `hash_key`.
pub fn attr(hash_key: &[u8]) -> Value {
    keyed::attr(hash_key)
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
    /// Weir's: when the header is absent, the key may also come as `Authorization: Bearer <key>`
    /// (before the query argument).
    #[serde(default)]
    bearer: bool,
    /// Weir's: only hashed credentials of exactly this scope are accepted. Without it, only
    /// plain keys and hashed credentials without a scope are.
    #[schemars(length(min = 1, max = 128))]
    scope: Option<String>,
}

fn apikey() -> String {
    "apikey".into()
}

fn realm() -> String {
    "key".into()
}

/// A consumer's key: APISIX's `key`, sealed at rest by the Admin API (`encrypt_fields`), or
/// Weir's `key_hash` of it, which needs no sealing. Exactly one of the two.
#[derive(Deserialize, JsonSchema)]
#[schemars(extend("encrypt_fields" = ["key"]))]
#[schemars(extend("oneOf" = [{"required": ["key"]}, {"required": ["key_hash"]}]))]
#[schemars(extend("dependencies" = {"scope": ["key_hash"], "not_after": ["key_hash"]}))]
struct Credential {
    /// The key itself.
    key: Option<String>,
    /// Lowercase hex of HMAC-SHA256 of the key under the node's hash key ([`key_hash`]).
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    key_hash: Option<String>,
    /// Only routes of this `scope` accept the key; without it, only routes without a scope do.
    #[schemars(length(min = 1, max = 128))]
    scope: Option<String>,
    /// Unix seconds after which the key is refused.
    not_after: Option<i64>,
}

/// What a hashed credential is checked against once its hash matched.
struct Hashed {
    scope: Option<String>,
    not_after: Option<i64>,
}

fn prepare(c: Credential) -> Result<(String, Arc<dyn Any + Send + Sync>), String> {
    match (c.key, c.key_hash) {
        (Some(_), Some(_)) | (None, None) => Err("exactly one of key and key_hash is needed".into()),
        (Some(_), None) if c.scope.is_some() || c.not_after.is_some() => Err("scope and not_after go with key_hash".into()),
        (Some(key), None) if key.starts_with(HASHED) => Err(format!("key: must not start with {HASHED:?}")),
        (Some(key), None) => Ok((key, Arc::new(()))),
        (None, Some(hash)) => {
            if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err("key_hash: must be 64 lowercase hex digits".into());
            }
            if c.scope.as_ref().is_some_and(|s| s.is_empty() || s.len() > 128) {
                return Err("scope: must be 1 to 128 characters".into());
            }
            Ok((format!("{HASHED}{hash}"), Arc::new(Hashed { scope: c.scope, not_after: c.not_after })))
        }
    }
}

fn build(c: Config, attr: Option<&Value>) -> Result<KeyAuth, String> {
    let header = HeaderName::from_bytes(c.header.as_bytes()).map_err(|e| format!("header: {e}"))?;
    let challenge = HeaderValue::from_str(&format!("apikey realm=\"{}\"", c.realm)).map_err(|e| format!("realm: {e}"))?;
    Ok(KeyAuth { header, query: c.query, hide: c.hide_credentials, challenge, bearer: c.bearer, scope: c.scope, hash_key: hash_key(attr)? })
}

struct KeyAuth {
    header: HeaderName,
    query: String,
    hide: bool,
    challenge: HeaderValue,
    bearer: bool,
    scope: Option<String>,
    hash_key: Option<hmac::Key>,
}

/// Where the caller's key was.
enum Source {
    Header,
    Bearer,
    Query,
}

impl Plugin for KeyAuth {
    fn has_access(&self) -> bool {
        false
    }

    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        self.authenticate(ctx, now_secs)
    }
}

impl KeyAuth {
    /// The request phase, with `now` telling the time (unix seconds) when an expiry is to be
    /// checked: most keys have none, and they cost no clock read.
    fn authenticate(&self, ctx: &mut RequestCtx<'_>, now: impl Fn() -> i64) -> Result<(), Reply> {
        let refuse = |msg: &str| Err(unauthorized(msg).with_header(http::header::WWW_AUTHENTICATE, self.challenge.clone()));
        let header = |name: &HeaderName| ctx.parts.headers.get(name).and_then(|v| v.to_str().ok());
        // The key is read where it is (a query argument is decoded into a string of its own),
        // and the caller identified, before the request is changed.
        let found = match header(&self.header) {
            Some(k) => Some((Cow::Borrowed(k), Source::Header)),
            None => self.bearer.then(|| header(&AUTHORIZATION).and_then(bearer_token)).flatten().map(|k| (Cow::Borrowed(k), Source::Bearer)),
        };
        let (identified, source) = match found.or_else(|| ctx.var(&format!("arg_{}", self.query)).map(|k| (Cow::Owned(k), Source::Query))) {
            Some((key, source)) => (self.identify(ctx.consumers, &key, now), source),
            None => return refuse("Missing API key in request"),
        };
        let consumer = match identified {
            Ok(c) => c,
            Err(reason) => {
                tracing::warn!(route = ctx.route_id, reason, "key-auth: the key given is refused");
                return refuse("Invalid API key in request");
            }
        };
        if self.hide {
            match source {
                Source::Header => drop(ctx.parts.headers.remove(&self.header)),
                Source::Bearer => drop(ctx.parts.headers.remove(AUTHORIZATION)),
                Source::Query => remove_query_arg(&mut ctx.parts.uri, &self.query),
            }
        }
        attach_consumer(ctx, consumer);
        Ok(())
    }

    /// The consumer `key` names on this route at `now`, or why none does (for the log only).
    fn identify(&self, consumers: &Consumers, key: &str, now: impl Fn() -> i64) -> Result<Arc<Consumer>, &'static str> {
        if self.scope.is_none()
            && !key.starts_with(HASHED)
            && let Some(c) = consumers.find(NAME, key).filter(|c| c.data.is::<()>())
        {
            return Ok(c.consumer.clone());
        }
        let hash_key = self.hash_key.as_ref().ok_or("no consumer holds the key")?;
        let c = consumers.find(NAME, &hashed_id(hash_key, key)).ok_or("no consumer holds the key")?;
        let h = c.data.downcast_ref::<Hashed>().ok_or("no consumer holds the key")?;
        if h.scope != self.scope {
            return Err("the key belongs to another scope");
        }
        if h.not_after.is_some_and(|t| t < now()) {
            return Err("the key has expired");
        }
        Ok(c.consumer.clone())
    }
}

/// The token of `Bearer <token>` (the scheme in any case).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
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
    use serde_json::json;

    use crate::parse;

    use super::*;

    const HASH_KEY: [u8; 32] = [7; 32];
    const NOW: i64 = 1_700_000_000;

    /// Consumers holding `credentials` (username, `key-auth` config), one credential object each.
    fn consumers(credentials: &[(&str, Value)]) -> Consumers {
        crate::keyed::consumers_of(NAME, credentials)
    }

    fn plugin(route: Value) -> KeyAuth {
        build(parse(&route).unwrap(), Some(&attr(&HASH_KEY))).unwrap()
    }

    fn hashed(key: &str, extra: Value) -> Value {
        let mut c = json!({ "key_hash": key_hash(&HASH_KEY, key) });
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        c
    }

    /// The consumer `plugin` lets in for a request to `uri` with `headers` at `now`, and what
    /// goes upstream of the request's headers.
    fn call(plugin: &KeyAuth, consumers: &Consumers, uri: &str, headers: &[(&str, &str)], now: i64) -> Result<(String, http::HeaderMap), Reply> {
        let mut req = http::Request::builder().uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let (mut parts, ()) = req.body(()).unwrap().into_parts();
        let mut ctx = RequestCtx::new(&mut parts, "127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap(), "http", "r", consumers);
        plugin.authenticate(&mut ctx, || now)?;
        let who = ctx.consumer.as_ref().map(|c| c.username.clone()).unwrap_or_default();
        Ok((who, parts.headers))
    }

    fn who(plugin: &KeyAuth, consumers: &Consumers, headers: &[(&str, &str)], now: i64) -> Result<String, Reply> {
        call(plugin, consumers, "/", headers, now).map(|(who, _)| who)
    }

    #[test]
    fn hashed_keys_match_in_the_header_and_as_bearer_when_allowed() {
        let cs = consumers(&[("alice", hashed("k-alice", json!({})))]);
        let plain = plugin(json!({}));
        assert_eq!(who(&plain, &cs, &[("apikey", "k-alice")], NOW).unwrap(), "alice");
        assert_eq!(who(&plain, &cs, &[("authorization", "Bearer k-alice")], NOW).unwrap_err().body, Some(json!({"message": "Missing API key in request"})));
        let bearer = plugin(json!({"bearer": true, "hide_credentials": true}));
        let (name, upstream) = call(&bearer, &cs, "/", &[("authorization", "bearer k-alice")], NOW).unwrap();
        assert_eq!(name, "alice");
        assert!(upstream.get(AUTHORIZATION).is_none(), "hidden from the upstream");
        // The configured header comes first.
        assert!(who(&bearer, &cs, &[("apikey", "wrong"), ("authorization", "Bearer k-alice")], NOW).is_err());
        assert_eq!(who(&bearer, &cs, &[("authorization", "Basic k-alice")], NOW).unwrap_err().body, Some(json!({"message": "Missing API key in request"})));
        // Without the node's hash key, a hashed credential never matches.
        let keyless = build(parse(&json!({})).unwrap(), None).unwrap();
        assert!(who(&keyless, &cs, &[("apikey", "k-alice")], NOW).is_err());
    }

    #[test]
    fn every_refusal_of_a_key_is_the_same_answer() {
        let cs = consumers(&[
            ("alice", hashed("k-alice", json!({"scope": "prod"}))),
            ("bob", hashed("k-bob", json!({"scope": "prod", "not_after": NOW - 1}))),
            ("carol", hashed("k-carol", json!({"scope": "staging"}))),
            ("dave", json!({"key": "k-dave"})),
            ("erin", hashed("k-erin", json!({}))),
        ]);
        let prod = plugin(json!({"scope": "prod"}));
        assert_eq!(who(&prod, &cs, &[("apikey", "k-alice")], NOW).unwrap(), "alice");
        let wrong = who(&prod, &cs, &[("apikey", "nope")], NOW).unwrap_err();
        assert_eq!(wrong.status, 401);
        assert_eq!(wrong.body, Some(json!({"message": "Invalid API key in request"})));
        assert_eq!(wrong.headers, vec![(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("apikey realm=\"key\""))]);
        for refused in ["k-bob", "k-carol", "k-dave", "k-erin", &key_hash(&HASH_KEY, "k-alice")] {
            assert_eq!(who(&prod, &cs, &[("apikey", refused)], NOW), Err(wrong.clone()), "{refused:?}");
        }
        // A route without a scope takes plain keys and unscoped hashes, not scoped ones.
        let open = plugin(json!({}));
        assert_eq!(who(&open, &cs, &[("apikey", "k-dave")], NOW).unwrap(), "dave");
        assert_eq!(call(&open, &cs, "/?apikey=k-erin", &[], NOW).unwrap().0, "erin");
        assert_eq!(who(&open, &cs, &[("apikey", "k-alice")], NOW), Err(wrong.clone()));
        // The stored hash is no key, in the query string either.
        let hash = key_hash(&HASH_KEY, "k-erin");
        assert_eq!(call(&open, &cs, &format!("/?apikey=%00hash:{hash}"), &[], NOW).map(|(w, _)| w), Err(wrong.clone()));
        assert_eq!(call(&open, &cs, &format!("/?apikey={hash}"), &[], NOW).map(|(w, _)| w), Err(wrong));
    }

    #[test]
    fn a_rotated_key_overlaps_until_its_not_after() {
        let cs = consumers(&[("alice", hashed("new", json!({"scope": "prod"}))), ("alice", hashed("old", json!({"scope": "prod", "not_after": NOW + 60})))]);
        let prod = plugin(json!({"scope": "prod"}));
        for now in [NOW, NOW + 60] {
            assert_eq!(who(&prod, &cs, &[("apikey", "new")], now).unwrap(), "alice");
            assert_eq!(who(&prod, &cs, &[("apikey", "old")], now).unwrap(), "alice");
        }
        assert_eq!(who(&prod, &cs, &[("apikey", "new")], NOW + 61).unwrap(), "alice");
        assert!(who(&prod, &cs, &[("apikey", "old")], NOW + 61).is_err());
    }

    #[test]
    fn credentials_are_a_key_or_a_well_formed_hash() {
        let schema = crate::schema_of::<Credential>();
        assert_eq!(schema["encrypt_fields"], json!(["key"]));
        let valid = jsonschema::validator_for(&schema).unwrap();
        let hash = key_hash(&HASH_KEY, "k");
        for good in [json!({"key": "k"}), json!({"key_hash": hash}), json!({"key_hash": hash, "scope": "prod", "not_after": NOW})] {
            assert!(valid.is_valid(&good), "{good}");
            assert!(prepare(parse(&good).unwrap()).is_ok(), "{good}");
        }
        let bad = [
            json!({}),
            json!({"key": "k", "key_hash": hash}),
            json!({"key_hash": hash.to_uppercase()}),
            json!({"key_hash": &hash[1..]}),
            json!({"key_hash": hash, "scope": ""}),
            json!({"key_hash": hash, "not_after": 1.5}),
            json!({"key": "k", "scope": "prod"}),
        ];
        for bad in bad {
            assert!(!valid.is_valid(&bad), "{bad}");
            assert!(parse::<Credential>(&bad).map_err(drop).and_then(|c| prepare(c).map_err(drop)).is_err(), "{bad}");
        }
        assert!(prepare(parse(&json!({"key": format!("{HASHED}x")})).unwrap()).is_err());
        // The hash the platform computes: HMAC-SHA256 in lowercase hex.
        assert_eq!(key_hash(&(0..32).collect::<Vec<u8>>(), "k3y"), "2a2f404139850ecb0219c22d19302caf05ff3ac80485233ba2d555a622af0817");
        assert!(build(parse(&json!({})).unwrap(), Some(&json!({"hash_key": "xyz"}))).is_err());
    }

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
