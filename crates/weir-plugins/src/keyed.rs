//! What the auth plugins' hashed credentials share: the node's hash key (a subkey of the
//! keyring, in each plugin's `plugin_attr`), keyed hashes in hex, and the id prefix that keeps
//! a stored hash from ever working as a plain key or username.

use std::time::{SystemTime, UNIX_EPOCH};

use ring::hmac;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::parse;

/// What a hashed credential's id starts with: no key or username a caller presents is looked
/// up as it is when it starts with this, and no plain one may, so a stored hash never works as
/// one.
pub(crate) const HASHED: &str = "\0hash:";

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Appends `bytes` as lowercase hex.
fn push_hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
}

/// `bytes` as lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 * bytes.len());
    push_hex(&mut out, bytes);
    out
}

/// The bytes of hex `text`, if it is hex.
pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.is_empty() || !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// Lowercase hex of HMAC-SHA256 of `text` under `key`.
pub(crate) fn keyed_hash(key: &hmac::Key, text: &str) -> String {
    hex(hmac::sign(key, text.as_bytes()).as_ref())
}

/// The id a hashed credential of `text` is found by: [`HASHED`] and its keyed hash. Made on
/// the stack: a lookup per request keeps nothing of it.
pub(crate) fn hashed_id(key: &hmac::Key, text: &str) -> HashedId {
    let mut out = [0u8; HASHED.len() + 64];
    out[..HASHED.len()].copy_from_slice(HASHED.as_bytes());
    let tag = hmac::sign(key, text.as_bytes());
    for (i, b) in tag.as_ref().iter().enumerate() {
        out[HASHED.len() + 2 * i] = DIGITS[usize::from(b >> 4)];
        out[HASHED.len() + 2 * i + 1] = DIGITS[usize::from(b & 15)];
    }
    HashedId(out)
}

/// A hashed credential's id: [`HASHED`] and 64 hex digits.
pub(crate) struct HashedId([u8; HASHED.len() + 64]);

impl std::ops::Deref for HashedId {
    type Target = str;

    fn deref(&self) -> &str {
        // ASCII throughout: the prefix and hex digits.
        std::str::from_utf8(&self.0).expect("the prefix and hex digits are ASCII")
    }
}

/// Whether `text` is 64 lowercase hex digits (a SHA-256 in hex).
pub(crate) fn is_hex64(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The `plugin_attr` settings of a plugin that make its hashed credentials work with
/// `hash_key`.
pub(crate) fn attr(hash_key: &[u8]) -> Value {
    json!({ "hash_key": hex(hash_key) })
}

/// What a plugin reads of its `plugin_attr` (`key-auth`, `basic-auth`, `jwt-auth`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Attr {
    /// Hex; without it, hashed (or derived) credentials never match.
    hash_key: Option<String>,
}

/// The node's hash key in a plugin's `plugin_attr`, if set.
pub(crate) fn hash_key(attr: Option<&Value>) -> Result<Option<hmac::Key>, String> {
    match attr.map(parse::<Attr>).transpose().map_err(|e| format!("plugin_attr: {e}"))?.and_then(|a| a.hash_key) {
        Some(h) => Ok(Some(hmac::Key::new(hmac::HMAC_SHA256, &unhex(&h).ok_or("plugin_attr: hash_key: must be hex")?))),
        None => Ok(None),
    }
}

/// Unix seconds now.
pub(crate) fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Consumers holding `credentials` (username, config of plugin `plugin`), one credential
/// object each: what the plugins' tests authenticate against.
#[cfg(test)]
pub(crate) fn consumers_of(plugin: &str, credentials: &[(&str, Value)]) -> crate::Consumers {
    let registry = crate::registry();
    let mut out = crate::Consumers::default();
    for (n, (username, cred)) in credentials.iter().enumerate() {
        let plugins = json!({ plugin: cred });
        out.add(&registry, username, Some(&format!("c{n}")), plugins.as_object().expect("an object"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_ids_carry_the_prefix() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(unhex("000fa5ff"), Some(vec![0x00, 0x0f, 0xa5, 0xff]));
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"k");
        let id = hashed_id(&key, "text");
        assert_eq!(&*id, format!("{HASHED}{}", keyed_hash(&key, "text")));
        assert!(is_hex64(&id[HASHED.len()..]));
        assert!(hash_key(Some(&attr(b"k"))).unwrap().is_some());
        assert!(hash_key(Some(&json!({"hash_key": "xyz"}))).is_err());
    }
}
