//! Sealing private keys at rest with AES-256-GCM.
//!
//! A keyring is a list of secrets: the first seals, every one is tried when opening, so a secret
//! can be rotated by putting the new one first. Each secret is hashed with SHA-256 into an AES
//! key. A sealed value is base64 of `nonce (12 bytes) ‖ ciphertext ‖ tag`; a fresh random nonce
//! is drawn for every seal. Values that are already PEM were never sealed and open as they are.

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

pub struct Keyring {
    keys: Vec<LessSafeKey>,
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
        Keyring { keys, rng: SystemRandom::new() }
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
}
