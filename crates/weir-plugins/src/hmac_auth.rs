//! `hmac-auth`: requests signed as draft-cavage HTTP signatures, in APISIX's form:
//! `Authorization: Signature keyId="…",algorithm="hmac-sha256",headers="@request-target date",signature="…"`.
//! The signing string is the key id, then one line per listed header (`@request-target` is
//! `METHOD /path?query`, others `name: value`), each followed by a newline. The `Date` must be
//! within `clock_skew`; with `validate_request_body`, `Digest: SHA-256=…` must match the body.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::{digest, hmac};
use serde::{Deserialize, Serialize};

use crate::{Factory, JsonSchema, Phases, Plugin, Reply, RequestCtx, attach_consumer, unauthorized};

pub(crate) fn factory() -> Factory {
    Factory::new("hmac-auth", 2530, |c: Config, _| {
        Ok(Arc::new(HmacAuth {
            algorithms: c.allowed_algorithms.iter().map(|a| a.name().to_string()).collect(),
            clock_skew: c.clock_skew,
            signed_headers: c.signed_headers.iter().flatten().map(|h| h.to_ascii_lowercase()).collect(),
            validate_body: c.validate_request_body,
            hide: c.hide_credentials,
        }))
    })
    .with_credential(|c: Credential| Ok((c.key_id, Arc::new(Secret(c.secret_key.into_bytes())))))
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// The signature algorithms accepted.
    #[serde(default = "all_algorithms")]
    #[schemars(length(min = 1))]
    allowed_algorithms: Vec<HmacAlgorithm>,
    /// How far, in seconds, the request's `Date` may be from now.
    #[serde(default = "secs_300")]
    #[schemars(range(min = 1))]
    clock_skew: u64,
    /// Headers every signature must cover.
    #[schemars(inner(length(min = 1, max = 50)))]
    signed_headers: Option<Vec<String>>,
    /// Check the request body against its `Digest` header.
    #[serde(default)]
    validate_request_body: bool,
    /// Remove the `Authorization` header before the request goes upstream.
    #[serde(default)]
    hide_credentials: bool,
    #[schemars(length(min = 1))]
    #[allow(dead_code)]
    anonymous_consumer: Option<String>,
}

#[derive(Deserialize, Serialize, JsonSchema, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum HmacAlgorithm {
    HmacSha1,
    HmacSha256,
    HmacSha512,
}

impl HmacAlgorithm {
    fn name(self) -> &'static str {
        match self {
            HmacAlgorithm::HmacSha1 => "hmac-sha1",
            HmacAlgorithm::HmacSha256 => "hmac-sha256",
            HmacAlgorithm::HmacSha512 => "hmac-sha512",
        }
    }
}

fn all_algorithms() -> Vec<HmacAlgorithm> {
    vec![HmacAlgorithm::HmacSha1, HmacAlgorithm::HmacSha256, HmacAlgorithm::HmacSha512]
}

fn secs_300() -> u64 {
    300
}

/// A consumer's key id and secret; the secret is sealed at rest by the Admin API.
#[derive(Deserialize, JsonSchema)]
#[schemars(extend("encrypt_fields" = ["secret_key"]))]
struct Credential {
    #[schemars(length(min = 1, max = 256))]
    key_id: String,
    #[schemars(length(min = 1, max = 256))]
    secret_key: String,
}

struct Secret(Vec<u8>);

struct HmacAuth {
    algorithms: Vec<String>,
    clock_skew: u64,
    signed_headers: Vec<String>,
    validate_body: bool,
    hide: bool,
}

/// The fields of a `Signature …` authorization value.
#[derive(Debug, Default, PartialEq)]
struct Params {
    key_id: String,
    algorithm: String,
    headers: Vec<String>,
    signature: String,
}

fn parse(value: &str) -> Option<Params> {
    let rest = value.strip_prefix("Signature ")?;
    let mut p = Params::default();
    // `name="value"` pairs separated by commas; values do not contain quotes.
    for pair in rest.split(',') {
        let (k, v) = pair.trim().split_once('=')?;
        let v = v.trim().trim_matches('"').to_string();
        match k.trim() {
            "keyId" => p.key_id = v,
            "algorithm" => p.algorithm = v,
            "headers" => p.headers = v.split_whitespace().map(str::to_ascii_lowercase).collect(),
            "signature" => p.signature = v,
            _ => {}
        }
    }
    Some(p)
}

/// Seconds since the epoch of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(s: &str) -> Option<u64> {
    let mut it = s.split_whitespace().skip(1);
    let day: u64 = it.next()?.parse().ok()?;
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"].iter().position(|m| Some(*m) == it.clone().next())? as u64 + 1;
    it.next();
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|x| x.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" || !(1..=31).contains(&day) {
        return None;
    }
    // Days from the civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let (y, mo) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400) as u64;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe as i64 - 719_468;
    u64::try_from(days).ok().map(|d| d * 86_400 + h * 3600 + m * 60 + sec)
}

impl HmacAuth {
    fn verify(&self, ctx: &RequestCtx<'_>) -> Result<Arc<crate::Consumer>, String> {
        let auth = ctx.parts.headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or("missing Authorization header")?;
        let p = parse(auth).ok_or("Authorization is not a Signature")?;
        if p.key_id.is_empty() || p.signature.is_empty() {
            return Err("keyId or signature missing".into());
        }
        if p.algorithm.is_empty() {
            return Err("algorithm missing".into());
        }
        let cred = ctx.consumers.find("hmac-auth", &p.key_id).ok_or("Invalid keyId")?;
        if !self.algorithms.contains(&p.algorithm) {
            return Err("Invalid algorithm".into());
        }
        let header = |name: &str| ctx.parts.headers.get(name).and_then(|v| v.to_str().ok());
        let date = header("date").ok_or("Date header missing. failed to validate clock skew")?;
        let signed_at = http_date(date).ok_or("Invalid GMT format time")?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now.abs_diff(signed_at) > self.clock_skew {
            return Err("Clock skew exceeded".into());
        }
        for required in &self.signed_headers {
            if !p.headers.contains(required) {
                return Err(format!("expected header \"{required}\" missing in signing"));
            }
        }
        let mut signing = format!("{}\n", p.key_id);
        for h in &p.headers {
            match header(h) {
                Some(v) => signing.push_str(&format!("{h}: {v}\n")),
                None if h == "@request-target" => {
                    let target = ctx.parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
                    signing.push_str(&format!("{} {target}\n", ctx.parts.method));
                }
                None => {}
            }
        }
        let alg = match p.algorithm.as_str() {
            "hmac-sha1" => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            "hmac-sha512" => hmac::HMAC_SHA512,
            _ => hmac::HMAC_SHA256,
        };
        let secret = cred.data.downcast_ref::<Secret>().ok_or("Invalid keyId")?;
        let given = base64::engine::general_purpose::STANDARD.decode(&p.signature).map_err(|_| "Invalid signature")?;
        hmac::verify(&hmac::Key::new(alg, &secret.0), signing.as_bytes(), &given).map_err(|_| "Invalid signature")?;
        if self.validate_body {
            let body = ctx.body.as_deref().unwrap_or(b"");
            let expected = format!("SHA-256={}", base64::engine::general_purpose::STANDARD.encode(digest::digest(&digest::SHA256, body)));
            if header("digest") != Some(expected.as_str()) {
                return Err("Invalid digest".into());
            }
        }
        Ok(cred.consumer.clone())
    }
}

impl Plugin for HmacAuth {
    fn phases(&self) -> Phases {
        Phases { response: false, log: false, body: self.validate_body }
    }

    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let consumer = self.verify(ctx).map_err(|why| {
            tracing::warn!(route = ctx.route_id, reason = %why, "hmac-auth: request refused");
            unauthorized("client request can't be validated")
        })?;
        if self.hide {
            ctx.parts.headers.remove(http::header::AUTHORIZATION);
        }
        attach_consumer(ctx, consumer);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_headers_and_dates() {
        let p = parse(r#"Signature keyId="k1",algorithm="hmac-sha256",headers="@request-target date",signature="c2ln""#).unwrap();
        assert_eq!(p, Params { key_id: "k1".into(), algorithm: "hmac-sha256".into(), headers: vec!["@request-target".into(), "date".into()], signature: "c2ln".into() });
        assert!(parse("Basic x").is_none());
        assert_eq!(http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(http_date("Thu, 29 Feb 2024 23:59:59 GMT"), Some(1_709_251_199));
        assert_eq!(http_date("yesterday"), None);
    }
}
