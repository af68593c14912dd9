//! Platform tokens, sent as `Authorization: Bearer <token>`: a role on a set of gateways.
//!
//! A token is 32 random bytes (hex, after `wpt_`) shown once, when it is made; the store holds
//! only its SHA-256, as the key of its document (`{prefix}/platform/tokens/{sha256}`), so a call
//! finds its token with one read and nothing stored lets anyone call. Tokens work under `/v1/`
//! only: the APISIX Admin API knows admin keys alone.
//!
//! Roles: `owner` does everything on its gateways (and a gateway it creates joins them);
//! `developer` writes in dev and reads the rest; `qa` writes in staging and reads the rest;
//! `viewer` reads. A token sees only its gateways: any other is "not found", never "forbidden",
//! so a token learns nothing about gateways it does not hold.

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::model::GATEWAY_ID;

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    Owner,
    Developer,
    Qa,
    Viewer,
}

/// A token as stored: everything but the token itself.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Token {
    /// The first 16 hex digits of its hash: how the API names it.
    pub id: String,
    pub name: String,
    pub role: TokenRole,
    pub gateways: Vec<String>,
    /// As given (RFC 3339), and as seconds since the epoch.
    pub expires_at: Option<String>,
    pub expires: Option<i64>,
    pub created_at: u64,
    /// `admin:{key name}` or `token:{id}`.
    pub created_by: String,
}

impl Token {
    pub fn shown(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("a token serializes");
        if let Some(o) = v.as_object_mut() {
            o.remove("expires");
        }
        v
    }
}

/// `POST /v1/tokens`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateToken {
    #[schemars(length(min = 1, max = 100))]
    pub name: String,
    pub role: TokenRole,
    #[schemars(length(max = 1000), inner(regex(pattern = GATEWAY_ID)))]
    pub gateways: Option<Vec<String>>,
    /// RFC 3339.
    #[schemars(length(max = 64))]
    pub expires_at: Option<String>,
}

/// Makes a new token: what the caller is shown once, and the hash it is stored under.
pub fn mint() -> (String, String) {
    let mut bytes = [0u8; 32];
    SystemRandom::new().fill(&mut bytes).expect("the system's random source works");
    let token = format!("wpt_{}", hex(&bytes));
    let hash = hash(&token);
    (token, hash)
}

pub fn hash(token: &str) -> String {
    hex(digest(&SHA256, token.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seconds since the epoch of an RFC 3339 time.
pub fn parse_time(text: &str) -> Result<i64, String> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| format!("expiresAt: not an RFC 3339 time: {e}"))
}

/// `secs` since the epoch in RFC 3339 (UTC).
pub fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs).ok().and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()).unwrap_or_default()
}

/// Now in RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// The token a call presents, if it has the form of one.
pub fn bearer(parts: &http::request::Parts) -> Option<&str> {
    let v = parts.headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// Who is calling, once authenticated.
#[derive(Clone, Debug)]
pub enum Caller {
    /// An admin key (role admin): everything.
    Admin(String),
    /// An admin key with role viewer: reads everything.
    AdminViewer,
    Token { token: Token, key: String },
}

impl Caller {
    /// Whether the caller may know gateway `gid` exists.
    pub fn sees(&self, gid: &str) -> bool {
        match self {
            Caller::Admin(_) | Caller::AdminViewer => true,
            Caller::Token { token, .. } => token.gateways.iter().any(|g| g == gid),
        }
    }

    pub fn role(&self) -> Option<TokenRole> {
        match self {
            Caller::Token { token, .. } => Some(token.role),
            _ => None,
        }
    }

    /// May create gateways, and change or delete the ones it sees.
    pub fn owns(&self) -> bool {
        matches!(self, Caller::Admin(_)) || self.role() == Some(TokenRole::Owner)
    }

    /// May change environment `env` of a gateway it sees.
    pub fn writes_env(&self, env: &str) -> bool {
        self.owns()
            || match self.role() {
                Some(TokenRole::Developer) => env == "dev",
                Some(TokenRole::Qa) => env == "staging",
                _ => false,
            }
    }

    /// How the caller is recorded as the maker of something.
    pub fn name(&self) -> String {
        match self {
            Caller::Admin(name) => format!("admin:{name}"),
            Caller::AdminViewer => "admin:viewer".into(),
            Caller::Token { token, .. } => format!("token:{}", token.id),
        }
    }

    pub fn describe(&self) -> Value {
        match self {
            Caller::Token { token, .. } => json!({"token": token.id, "role": token.role}),
            _ => json!({"adminKey": self.name()}),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_stored_by_hash() {
        let (a, ha) = mint();
        let (b, hb) = mint();
        assert_ne!(a, b);
        assert!(a.starts_with("wpt_") && a.len() == 4 + 64);
        assert_eq!(hash(&a), ha);
        assert_ne!(ha, hb);
        assert!(!ha.contains(&a[4..]));
    }

    #[test]
    fn times_are_rfc_3339() {
        assert_eq!(parse_time("2030-01-01T00:00:00Z"), Ok(1_893_456_000));
        assert_eq!(parse_time("2030-01-01T01:00:00+01:00"), Ok(1_893_456_000));
        assert!(parse_time("tomorrow").is_err());
    }

    #[test]
    fn roles_write_where_they_may() {
        let token = |role| Caller::Token {
            token: Token { id: "t".into(), name: "t".into(), role, gateways: vec!["g1".into()], expires_at: None, expires: None, created_at: 0, created_by: "x".into() },
            key: "k".into(),
        };
        let dev = token(TokenRole::Developer);
        assert!(dev.writes_env("dev") && !dev.writes_env("staging") && !dev.writes_env("prod") && !dev.owns());
        let qa = token(TokenRole::Qa);
        assert!(qa.writes_env("staging") && !qa.writes_env("dev") && !qa.writes_env("prod"));
        assert!(!token(TokenRole::Viewer).writes_env("dev"));
        assert!(token(TokenRole::Owner).writes_env("prod") && token(TokenRole::Owner).owns());
        assert!(dev.sees("g1") && !dev.sees("g2") && Caller::AdminViewer.sees("g2"));
    }
}
