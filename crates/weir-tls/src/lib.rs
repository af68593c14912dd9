//! TLS for Weir: private keys sealed at rest ([`Keyring`]), certificate objects checked before
//! they are stored ([`check_ssl`]), and the per-SNI server configurations the proxy hands to
//! each TLS handshake ([`SniTable`]).

mod client;
mod keyring;
mod server;

pub use client::client_config;
pub use keyring::{FIELD_MARK, Keyring, KeyringError};
pub use server::{SniTable, server_config};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Map, Value};

/// The crypto provider every TLS config in Weir uses.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM text, or why there is none.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    match certs {
        Ok(c) if c.is_empty() => Err("no certificate found in PEM".into()),
        Ok(c) => Ok(c),
        Err(e) => Err(format!("invalid PEM certificate: {e}")),
    }
}

pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("invalid PEM private key: {e}"))
}

/// A certificate chain with its key, refused when the key is unusable or belongs to another
/// certificate.
pub fn certified_key(cert: &str, key: &str) -> Result<rustls::sign::CertifiedKey, String> {
    let chain = parse_certs(cert)?;
    let key = parse_key(key)?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unsupported private key: {e}"))?;
    let ck = rustls::sign::CertifiedKey::new(chain, signer);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(rustls::Error::InconsistentKeys(_)) => Err("the private key does not match the certificate".into()),
        Err(e) => Err(format!("invalid certificate: {e}")),
    }
}

/// Checks an `ssls` object whose keys are in the clear: every PEM parses, every key matches
/// its certificate, and `certs`/`keys` pair up. Returns every problem found.
pub fn check_ssl(obj: &Map<String, Value>) -> Vec<String> {
    let mut errors = Vec::new();
    let text = |v: &Value| v.as_str().map(str::to_string);
    if let (Some(cert), Some(key)) = (obj.get("cert").and_then(text), obj.get("key").and_then(text))
        && let Err(e) = certified_key(&cert, &key)
    {
        errors.push(format!("cert/key: {e}"));
    }
    let list = |name: &str| obj.get(name).and_then(Value::as_array).map(|a| a.iter().filter_map(text).collect::<Vec<_>>());
    match (list("certs"), list("keys")) {
        (Some(certs), Some(keys)) if certs.len() == keys.len() => {
            for (i, (c, k)) in certs.iter().zip(&keys).enumerate() {
                if let Err(e) = certified_key(c, k) {
                    errors.push(format!("certs[{i}]/keys[{i}]: {e}"));
                }
            }
        }
        (None, None) => {}
        _ => errors.push("certs and keys must have the same number of items".into()),
    }
    if let Some(ca) = obj.get("client").and_then(|c| c.get("ca")).and_then(text)
        && let Err(e) = parse_certs(&ca)
    {
        errors.push(format!("client.ca: {e}"));
    }
    errors
}

/// Seals `key` and `keys` of an `ssls` object for storing.
pub fn seal_ssl(keyring: &Keyring, obj: &mut Map<String, Value>) {
    map_keys(obj, |k| Ok::<_, KeyringError>(keyring.seal(k))).expect("sealing cannot fail");
}

/// Opens `key` and `keys` of a stored `ssls` object (keys in the clear are left as they are).
pub fn open_ssl(keyring: &Keyring, obj: &mut Map<String, Value>) -> Result<(), KeyringError> {
    map_keys(obj, |k| keyring.open(k))
}

/// Checks an upstream's `tls.client_cert`/`tls.client_key` pair and seals the key for storing
/// (a key that is already sealed, as a PATCH leaves it, is opened first). `path` prefixes the
/// field names in errors (`upstream.` for an inline upstream).
pub fn seal_upstream_key(keyring: &Keyring, upstream: &mut Value, path: &str) -> Result<(), String> {
    let Some(tls) = upstream.get_mut("tls").and_then(Value::as_object_mut) else { return Ok(()) };
    let Some(Value::String(sealed_or_plain)) = tls.get("client_key") else { return Ok(()) };
    let key = keyring.open(sealed_or_plain).map_err(|e| format!("{path}tls.client_key: {e}"))?;
    if let Some(cert) = tls.get("client_cert").and_then(Value::as_str) {
        certified_key(cert, &key).map_err(|e| format!("{path}tls.client_cert/client_key: {e}"))?;
    }
    tls.insert("client_key".into(), Value::String(keyring.seal(&key)));
    Ok(())
}

fn map_keys<E>(obj: &mut Map<String, Value>, mut f: impl FnMut(&str) -> Result<String, E>) -> Result<(), E> {
    if let Some(Value::String(k)) = obj.get_mut("key") {
        *k = f(k)?;
    }
    if let Some(Value::Array(ks)) = obj.get_mut("keys") {
        for k in ks {
            if let Value::String(s) = k {
                *s = f(s)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testing {
    /// A self-signed certificate and its key for `names`, in PEM.
    pub fn self_signed(names: &[&str]) -> (String, String) {
        let ck = rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        (ck.cert.pem(), ck.signing_key.serialize_pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mismatched_and_broken_pems_are_named() {
        let (cert_a, key_a) = testing::self_signed(&["a.test"]);
        let (_, key_b) = testing::self_signed(&["b.test"]);
        let ok = json!({"cert": cert_a, "key": key_a, "snis": ["a.test"]});
        assert!(check_ssl(ok.as_object().unwrap()).is_empty());
        let wrong = json!({"cert": cert_a, "key": key_b});
        assert_eq!(check_ssl(wrong.as_object().unwrap()), vec!["cert/key: the private key does not match the certificate"]);
        let broken = json!({"cert": "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", "key": key_a,
            "certs": [cert_a], "keys": [], "client": {"ca": "nothing here"}});
        let errs = check_ssl(broken.as_object().unwrap());
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].starts_with("cert/key: invalid PEM certificate"), "{errs:?}");
        assert_eq!(errs[1], "certs and keys must have the same number of items");
        assert!(errs[2].starts_with("client.ca: "), "{errs:?}");
    }

    #[test]
    fn upstream_client_keys_are_checked_and_sealed() {
        let ring = Keyring::new(&["k".to_string()]);
        let (cert, key) = testing::self_signed(&["client"]);
        let (_, other) = testing::self_signed(&["other"]);
        let mut up = json!({"tls": {"client_cert": cert, "client_key": key}});
        seal_upstream_key(&ring, &mut up, "").unwrap();
        let sealed = up["tls"]["client_key"].as_str().unwrap().to_string();
        assert_eq!(ring.open(&sealed).unwrap(), key);
        // Sealing again (a PATCH of something else) keeps the same key.
        seal_upstream_key(&ring, &mut up, "").unwrap();
        assert_eq!(ring.open(up["tls"]["client_key"].as_str().unwrap()).unwrap(), key);
        let mut wrong = json!({"tls": {"client_cert": cert, "client_key": other}});
        let e = seal_upstream_key(&ring, &mut wrong, "upstream.").unwrap_err();
        assert_eq!(e, "upstream.tls.client_cert/client_key: the private key does not match the certificate");
    }

    #[test]
    fn keys_are_sealed_and_opened() {
        let ring = Keyring::new(&["first-key".to_string()]);
        let (cert, key) = testing::self_signed(&["a.test"]);
        let mut obj = json!({"cert": cert, "key": key, "keys": [key]}).as_object().unwrap().clone();
        seal_ssl(&ring, &mut obj);
        let sealed = obj["key"].as_str().unwrap().to_string();
        assert!(!sealed.contains("PRIVATE KEY"), "no key in the clear");
        assert_ne!(obj["keys"][0].as_str().unwrap(), sealed, "a fresh nonce per seal");
        open_ssl(&ring, &mut obj).unwrap();
        assert_eq!(obj["key"], json!(key));
        assert_eq!(obj["keys"][0], json!(key));
    }
}
