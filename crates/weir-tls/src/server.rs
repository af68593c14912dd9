//! Server-side TLS: one rustls config per `ssls` object, found by SNI at handshake.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use weir_core::model::Ssl;

use crate::{Keyring, certified_key, parse_certs, provider};

/// The server config for one `ssls` object: its certificates (one per key type), its
/// `ssl_protocols`, ALPN for HTTP/2 and HTTP/1.1, and client certificate checks when it has
/// `client.ca`.
pub fn server_config(ssl: &Ssl, keyring: &Keyring) -> Result<Arc<ServerConfig>, String> {
    let mut keys = Vec::new();
    for (cert, sealed) in ssl.pairs() {
        let key = keyring.open(sealed).map_err(|e| e.to_string())?;
        keys.push(Arc::new(certified_key(cert, &key)?));
    }
    if keys.is_empty() {
        return Err("no certificate and key".into());
    }
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = match &ssl.ssl_protocols {
        None => rustls::DEFAULT_VERSIONS.to_vec(),
        Some(names) => {
            let v: Vec<_> = names
                .iter()
                .filter_map(|n| match n.as_str() {
                    "TLSv1.2" => Some(&rustls::version::TLS12),
                    "TLSv1.3" => Some(&rustls::version::TLS13),
                    _ => None,
                })
                .collect();
            if v.is_empty() {
                return Err(format!("none of ssl_protocols {names:?} is supported (TLSv1.2 and TLSv1.3 are)"));
            }
            v
        }
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions)
        .map_err(|e| e.to_string())?;
    let builder = match &ssl.client {
        None => builder.with_no_client_auth(),
        Some(client) => {
            let mut roots = RootCertStore::empty();
            for ca in parse_certs(&client.ca)? {
                roots.add(ca).map_err(|e| format!("client.ca: {e}"))?;
            }
            let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("client.ca: {e}"))?;
            builder.with_client_cert_verifier(Arc::new(DepthLimited { inner, depth: client.depth.max(1) as usize }))
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(ByKeyType(keys)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Picks, among an object's certificates, the first whose key can sign with a scheme the
/// client offers (so an RSA and an ECDSA certificate can share one name).
#[derive(Debug)]
struct ByKeyType(Vec<Arc<CertifiedKey>>);

impl ResolvesServerCert for ByKeyType {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let schemes = hello.signature_schemes();
        self.0.iter().find(|ck| ck.key.choose_scheme(schemes).is_some()).or_else(|| self.0.first()).cloned()
    }
}

/// WebPKI client verification, with the chain length bounded as `client.depth` says: depth 1
/// accepts certificates issued by the CA itself, each step more allows one intermediate.
#[derive(Debug)]
struct DepthLimited {
    inner: Arc<dyn ClientCertVerifier>,
    depth: usize,
}

impl ClientCertVerifier for DepthLimited {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if intermediates.len() >= self.depth {
            return Err(rustls::Error::General(format!("client certificate chain is deeper than {}", self.depth)));
        }
        self.inner.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server configs by SNI: exact names first, then `*.` wildcards, the longest suffix winning
/// (`*.example.com` serves `a.example.com` and `a.b.example.com`).
#[derive(Default)]
pub struct SniTable {
    exact: HashMap<String, Arc<ServerConfig>>,
    /// Keyed by the suffix with its leading dot: `.example.com`.
    wildcard: HashMap<String, Arc<ServerConfig>>,
}

impl SniTable {
    /// When two objects claim one name, the first given keeps it.
    pub fn insert(&mut self, sni: &str, config: Arc<ServerConfig>) {
        let sni = sni.to_ascii_lowercase();
        let (map, name) = match sni.strip_prefix('*') {
            Some(suffix) => (&mut self.wildcard, suffix.to_string()),
            None => (&mut self.exact, sni),
        };
        map.entry(name).or_insert(config);
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    pub fn find(&self, sni: &str) -> Option<Arc<ServerConfig>> {
        let sni = sni.to_ascii_lowercase();
        if let Some(c) = self.exact.get(&sni) {
            return Some(c.clone());
        }
        sni.match_indices('.').find_map(|(i, _)| self.wildcard.get(&sni[i..]).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::self_signed;

    fn ssl(names: &[&str], keyring: &Keyring) -> Ssl {
        let (cert, key) = self_signed(names);
        serde_json::from_value(serde_json::json!({"cert": cert, "key": keyring.seal(&key), "snis": names})).unwrap()
    }

    #[test]
    fn sni_lookup_prefers_exact_then_longest_wildcard() {
        let ring = Keyring::new(&["s".to_string()]);
        let exact = server_config(&ssl(&["api.example.com"], &ring), &ring).unwrap();
        let wild = server_config(&ssl(&["*.example.com"], &ring), &ring).unwrap();
        let deeper = server_config(&ssl(&["*.eu.example.com"], &ring), &ring).unwrap();
        let mut t = SniTable::default();
        t.insert("api.example.com", exact.clone());
        t.insert("*.example.com", wild.clone());
        t.insert("*.eu.example.com", deeper.clone());
        let is = |name: &str, want: &Arc<ServerConfig>| Arc::ptr_eq(&t.find(name).unwrap(), want);
        assert!(is("API.example.com", &exact));
        assert!(is("www.example.com", &wild));
        assert!(is("a.b.example.com", &wild));
        assert!(is("x.eu.example.com", &deeper));
        assert!(t.find("example.com").is_none(), "a wildcard needs a label in front");
        assert!(t.find("other.org").is_none());
    }

    #[test]
    fn a_key_sealed_with_another_secret_is_refused() {
        let ring = Keyring::new(&["s".to_string()]);
        let other = Keyring::new(&["t".to_string()]);
        let e = server_config(&ssl(&["a.test"], &ring), &other).err().unwrap();
        assert!(e.contains("not in the keyring"), "{e}");
    }
}
