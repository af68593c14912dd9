//! Sealing private keys at rest with AES-256-GCM.
//!
//! A keyring is a list of secrets: the first seals, every one is tried when opening, so a secret
//! can be rotated by putting the new one first. Each secret is hashed with SHA-256 into an AES
//! key. A sealed value is base64 of `nonce (12 bytes) ‖ ciphertext ‖ tag`; a fresh random nonce
//! is drawn for every seal. Values that are already PEM were never sealed and open as they are.
//!
//! Plugin fields (an API key, a password: APISIX's `encrypt_fields`) are sealed the same way
//! behind a mark, [`FIELD_MARK`], so a sealed field is told from a plain one without trying to
//! open it: a store written by APISIX, or a declarative file, holds plain values, and those are
//! used as they are.
//!
//! The primary secret also derives node-wide subkeys, one per label ([`Keyring::derive`]), for
//! what needs a key of its own rather than a seal (the `key-auth` plugin's key hashes, say).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KeyringError {
    #[error("stored private key is neither PEM nor sealed data")]
    Malformed,
    #[error("stored private key was sealed with a secret that is not in the keyring")]
    UnknownSecret,
}

/// What a sealed plugin field starts with.
pub const FIELD_MARK: &str = "$weir-sealed$";

pub struct Keyring {
    keys: Vec<LessSafeKey>,
    /// HMAC-SHA256 keyed with the primary secret's bytes, for [`Keyring::derive`].
    derive: ring::hmac::Key,
    rng: SystemRandom,
}

impl Keyring {
    /// `secrets` must not be empty; the first one seals.
    pub fn new(secrets: &[String]) -> Keyring {
        assert!(!secrets.is_empty(), "a keyring needs a secret");
        let keys = secrets
            .iter()
            .map(|s| {
                let digest = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
                LessSafeKey::new(UnboundKey::new(&AES_256_GCM, digest.as_ref()).expect("a SHA-256 digest is an AES-256 key"))
            })
            .collect();
        let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secrets[0].as_bytes());
        Keyring { keys, derive, rng: SystemRandom::new() }
    }

    /// A 32-byte subkey for `label`: HMAC-SHA256 of the label under the primary secret. The
    /// same secret and label give the same subkey on every node; putting a new secret first
    /// changes every subkey (unlike sealing, older secrets are not tried), so whatever was made
    /// with the old subkey must be made again.
    pub fn derive(&self, label: &str) -> [u8; 32] {
        let tag = ring::hmac::sign(&self.derive, label.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// A new random secret, as 64 hex digits.
    pub fn generate_secret() -> String {
        let mut raw = [0u8; 32];
        SystemRandom::new().fill(&mut raw).expect("the system RNG works");
        raw.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn seal(&self, plain: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).expect("the system RNG works");
        let mut data = plain.as_bytes().to_vec();
        self.keys[0]
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut data)
            .expect("AES-GCM seals any length we store");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        STANDARD.encode(out)
    }

    pub fn open(&self, stored: &str) -> Result<String, KeyringError> {
        if stored.trim_start().starts_with("-----BEGIN") {
            return Ok(stored.to_string());
        }
        let raw = STANDARD.decode(stored.trim()).map_err(|_| KeyringError::Malformed)?;
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(KeyringError::Malformed);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        for key in &self.keys {
            let mut data = sealed.to_vec();
            let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KeyringError::Malformed)?;
            if let Ok(plain) = key.open_in_place(nonce, Aad::empty(), &mut data) {
                return String::from_utf8(plain.to_vec()).map_err(|_| KeyringError::Malformed);
            }
        }
        Err(KeyringError::UnknownSecret)
    }
}

impl Keyring {
    /// Seals a plugin field's value, marked as sealed.
    pub fn seal_field(&self, plain: &str) -> String {
        format!("{FIELD_MARK}{}", self.seal(plain))
    }

    /// Opens a field [`seal_field`](Self::seal_field) sealed; a value without the mark is plain
    /// and comes back as it is.
    pub fn open_field<'a>(&self, stored: &'a str) -> Result<std::borrow::Cow<'a, str>, KeyringError> {
        match stored.strip_prefix(FIELD_MARK) {
            Some(sealed) => self.open_sealed(sealed).map(std::borrow::Cow::Owned),
            None => Ok(std::borrow::Cow::Borrowed(stored)),
        }
    }

    /// Opens every sealed field anywhere in `value`, in place. On error, `value` may be
    /// partly opened.
    pub fn open_fields(&self, value: &mut serde_json::Value) -> Result<(), KeyringError> {
        use serde_json::Value;
        // An explicit stack: a config nested deeply must not overflow the thread's stack.
        let mut todo = vec![value];
        while let Some(v) = todo.pop() {
            match v {
                Value::String(s) if s.starts_with(FIELD_MARK) => {
                    let plain = self.open_sealed(&s[FIELD_MARK.len()..])?;
                    *s = plain;
                }
                Value::Array(a) => todo.extend(a.iter_mut()),
                Value::Object(o) => todo.extend(o.values_mut()),
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether anything in `value` is a sealed field.
    pub fn has_sealed_fields(value: &serde_json::Value) -> bool {
        use serde_json::Value;
        let mut todo = vec![value];
        while let Some(v) = todo.pop() {
            match v {
                Value::String(s) if s.starts_with(FIELD_MARK) => return true,
                Value::Array(a) => todo.extend(a.iter()),
                Value::Object(o) => todo.extend(o.values()),
                _ => {}
            }
        }
        false
    }

    fn open_sealed(&self, sealed: &str) -> Result<String, KeyringError> {
        if sealed.trim_start().starts_with("-----BEGIN") {
            return Err(KeyringError::Malformed);
        }
        self.open(sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_and_refusals() {
        let old = Keyring::new(&["old".to_string()]);
        let sealed = old.seal("-----BEGIN PRIVATE KEY-----\nabc\n");
        let rotated = Keyring::new(&["new".to_string(), "old".to_string()]);
        assert_eq!(rotated.open(&sealed).unwrap(), "-----BEGIN PRIVATE KEY-----\nabc\n");
        assert!(!rotated.seal("x").is_empty());
        let other = Keyring::new(&["other".to_string()]);
        assert_eq!(other.open(&sealed), Err(KeyringError::UnknownSecret));
        assert_eq!(other.open("!!not base64"), Err(KeyringError::Malformed));
        assert_eq!(other.open("-----BEGIN PRIVATE KEY-----"), Ok("-----BEGIN PRIVATE KEY-----".into()));
        // Tampering is detected.
        let mut raw = STANDARD.decode(&sealed).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert_eq!(old.open(&STANDARD.encode(raw)), Err(KeyringError::UnknownSecret));
        assert_eq!(Keyring::generate_secret().len(), 64);
    }

    #[test]
    fn subkeys_depend_on_the_label_and_the_primary_secret() {
        let ring = Keyring::new(&["a".to_string(), "b".to_string()]);
        assert_eq!(ring.derive("key-auth"), Keyring::new(&["a".to_string()]).derive("key-auth"), "only the primary secret counts");
        assert_ne!(ring.derive("key-auth"), ring.derive("other"));
        assert_ne!(ring.derive("key-auth"), Keyring::new(&["b".to_string(), "a".to_string()]).derive("key-auth"));
        // HMAC-SHA256(key = "a", "key-auth"), as any other HMAC implementation computes it.
        let hex: String = ring.derive("key-auth").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "1e45100b2ecb8af021cb17236bde06da74711198269e7a0e9604da38fd69c414");
    }

    #[test]
    fn fields_are_marked_and_plain_values_pass() {
        let ring = Keyring::new(&["a".to_string()]);
        let sealed = ring.seal_field("key-1");
        assert!(sealed.starts_with(FIELD_MARK) && !sealed.contains("key-1"));
        assert_eq!(ring.open_field(&sealed).unwrap(), "key-1");
        // A plain value, even one that looks like base64, is used as it is.
        assert_eq!(ring.open_field("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0").unwrap(), "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0");
        let other = Keyring::new(&["b".to_string()]);
        assert_eq!(other.open_field(&sealed), Err(KeyringError::UnknownSecret));
        assert_eq!(ring.open_field(&format!("{FIELD_MARK}-----BEGIN")), Err(KeyringError::Malformed));
        let mut v = serde_json::json!({"key-auth": {"key": sealed}, "l": [ring.seal_field("x"), "y"], "n": 1});
        assert!(Keyring::has_sealed_fields(&v));
        ring.open_fields(&mut v).unwrap();
        assert_eq!(v, serde_json::json!({"key-auth": {"key": "key-1"}, "l": ["x", "y"], "n": 1}));
        assert!(!Keyring::has_sealed_fields(&v));
    }
}
