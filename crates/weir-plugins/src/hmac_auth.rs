//! `hmac-auth`: requests signed as draft-cavage HTTP signatures, in APISIX's form:
//! `Authorization: Signature keyId="…",algorithm="hmac-sha256",headers="@request-target date",signature="…"`.
//! The signing string is the key id, then one line per listed header (`@request-target` is
//! `METHOD /path?query`, others `name: value`), each followed by a newline. The `Date` must be
//! within `clock_skew`; with `validate_request_body`, `Digest: SHA-256=…` must match the body.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::{digest, hmac};
use serde_json::{Value, json};

use crate::{LegacyFactory, Factory, Phases, Plugin, Reply, RequestCtx, attach_consumer, unauthorized};

const ALGORITHMS: [&str; 3] = ["hmac-sha1", "hmac-sha256", "hmac-sha512"];

pub(crate) fn factory() -> Factory {
    LegacyFactory {
        name: "hmac-auth",
        priority: 2530,
        schema: json!({"type": "object", "properties": {
            "allowed_algorithms": {"type": "array", "minItems": 1, "items": {"type": "string", "enum": ALGORITHMS}, "default": ALGORITHMS},
            "clock_skew": {"type": "integer", "minimum": 1, "default": 300},
            "signed_headers": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 50}},
            "validate_request_body": {"type": "boolean", "default": false},
            "hide_credentials": {"type": "boolean", "default": false},
            "anonymous_consumer": {"type": "string", "minLength": 1}
        }}),
        consumer_schema: Some(json!({"type": "object", "properties": {
            "key_id": {"type": "string", "minLength": 1, "maxLength": 256},
            "secret_key": {"type": "string", "minLength": 1, "maxLength": 256}
        }, "required": ["key_id", "secret_key"], "encrypt_fields": ["secret_key"]})),
        build: |conf, _| {
            let list = |k: &str| conf.get(k).and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).map(str::to_ascii_lowercase).collect::<Vec<_>>());
            Ok(Arc::new(HmacAuth {
                algorithms: list("allowed_algorithms").unwrap_or_else(|| ALGORITHMS.map(String::from).to_vec()),
                clock_skew: conf.get("clock_skew").and_then(Value::as_u64).unwrap_or(300),
                signed_headers: list("signed_headers").unwrap_or_default(),
                validate_body: conf.get("validate_request_body").and_then(Value::as_bool).unwrap_or(false),
                hide: conf.get("hide_credentials").and_then(Value::as_bool).unwrap_or(false),
            }))
        },
        credential: Some(|conf| {
            let text = |k: &str| conf.get(k).and_then(Value::as_str).ok_or(format!("{k} is required"));
            Ok((text("key_id")?.to_string(), Arc::new(Secret(text("secret_key")?.as_bytes().to_vec()))))
        }),
    }
    .into()
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
