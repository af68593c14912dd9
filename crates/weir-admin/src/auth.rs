//! Admin keys: `X-API-KEY` header, `?api_key=` or the `X-API-KEY` cookie, compared in constant
//! time against every configured key. The comparison is exact: the value given is never
//! trimmed or decoded (APISIX compares nginx's raw `$arg_api_key`), so `key ` and `key%20` are
//! other keys. (HTTP itself drops whitespace around a header field's value, RFC 9110 §5.5.)

use http::request::Parts;
use subtle::ConstantTimeEq;
use weir_core::text::query_param;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    /// May only read.
    Viewer,
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminKey {
    pub name: String,
    pub key: String,
    pub role: Role,
}

/// The key from a `Cookie` header, byte for byte: only the separator (`; `) before a cookie's
/// name is skipped, never anything around its value, so `key ` is not `key`.
fn cookie_key(parts: &Parts) -> Option<&str> {
    let is_key = |k: &str| k.eq_ignore_ascii_case("x-api-key") || k.eq_ignore_ascii_case("x_api_key");
    parts.headers.get_all(http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|line| {
        line.split(';').find_map(|pair| {
            let (name, value) = pair.trim_start_matches([' ', '\t']).split_once('=')?;
            is_key(name).then_some(value)
        })
    })
}

/// `Err` carries the description APISIX gives.
pub fn check(keys: &[AdminKey], parts: &Parts) -> Result<(), &'static str> {
    match role(keys, parts)? {
        Role::Viewer if parts.method != http::Method::GET => Err("invalid method for role viewer"),
        _ => Ok(()),
    }
}

/// The role of the admin key a call presents, whatever its method.
pub fn role(keys: &[AdminKey], parts: &Parts) -> Result<Role, &'static str> {
    let given = parts.uri.query().and_then(|q| query_param(q, "api_key"))
        .or_else(|| parts.headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .or_else(|| cookie_key(parts));
    let Some(given) = given else { return Err("missing apikey") };
    // Compare against every key, so timing does not reveal which (if any) matched.
    let mut found: Option<&AdminKey> = None;
    for k in keys {
        if bool::from(k.key.as_bytes().ct_eq(given.as_bytes())) {
            found = Some(k);
        }
    }
    found.map(|k| k.role).ok_or("wrong apikey")
}
