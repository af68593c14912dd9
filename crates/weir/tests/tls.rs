//! TLS end to end: certificates from `ssls` objects chosen by SNI, swapped live, client
//! certificates checked, keys sealed at rest. The client is curl, verifying against exactly the
//! certificate (or CA) the test expects, so a wrong certificate fails the request.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Upstream, Weir};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;

struct Pem {
    cert: String,
    key: String,
}

fn self_signed(names: &[&str]) -> Pem {
    let ck = rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    Pem { cert: ck.cert.pem(), key: ck.signing_key.serialize_pem() }
}

/// A CA, and a client certificate it issued.
fn ca_and_client(name: &str) -> (Pem, Pem) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec![format!("{name}-client")]).unwrap();
    client_params.distinguished_name.push(DnType::CommonName, format!("{name} client"));
    let client = client_params.signed_by(&client_key, &ca).unwrap();
    (Pem { cert: ca.pem(), key: String::new() }, Pem { cert: client.pem(), key: client_key.serialize_pem() })
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// curl to `https://{host}:{port}{path}` resolved to the TLS listener, trusting only `ca`.
/// Returns (exit ok, HTTP version, status, stderr).
fn curl(tls: SocketAddr, host: &str, path: &str, ca: &Path, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", "--max-time", "5"])
        .arg("--resolve")
        .arg(format!("{host}:{}:127.0.0.1", tls.port()))
        .arg("--cacert")
        .arg(ca)
        .args(extra)
        .arg(format!("https://{host}:{}{path}", tls.port()))
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

async fn curl_async(tls: SocketAddr, host: &str, path: &str, ca: &Path, extra: &[&str]) -> (bool, String, String) {
    let (host, path, ca) = (host.to_string(), path.to_string(), ca.to_path_buf());
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        curl(tls, &host, &path, &ca, &extra)
    })
    .await
    .unwrap()
}

/// Polls until curl succeeds (`want` true) or fails (`want` false); config changes are live
/// within milliseconds, not at once.
async fn until_curl(tls: SocketAddr, host: &str, ca: &Path, extra: &[&str], want: bool) -> bool {
    for _ in 0..100 {
        if curl_async(tls, host, "/", ca, extra).await.0 == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn put_ssl(w: &Weir, id: &str, body: serde_json::Value) {
    let (s, b) = w.admin("PUT", &format!("/ssls/{id}"), Some(body)).await;
    assert!(s == 200 || s == 201, "ssl {id}: {s} {b}");
}

#[tokio::test]
async fn sni_selects_certificates_and_changes_are_live() {
    let w = Weir::start_tls();
    let tls = w.tls.expect("a TLS listener");
    let up = Upstream::start("backend").await;
    let (s, b) = w.admin("PUT", "/routes/r", Some(json!({"uri": "/*", "upstream": {"nodes": {up.node(): 1}}}))).await;
    assert_eq!(s, 201, "{b}");
    let dir = tempfile::tempdir().unwrap();
    let a = self_signed(&["a.test"]);
    let b = self_signed(&["b.test"]);
    let wild = self_signed(&["*.wild.test"]);
    put_ssl(&w, "a", json!({"cert": a.cert, "key": a.key, "snis": ["a.test"]})).await;
    put_ssl(&w, "b", json!({"cert": b.cert, "key": b.key, "sni": "b.test"})).await;
    put_ssl(&w, "w", json!({"cert": wild.cert, "key": wild.key, "snis": ["*.wild.test"]})).await;
    let (ca_a, ca_b, ca_w) = (write(dir.path(), "a.pem", &a.cert), write(dir.path(), "b.pem", &b.cert), write(dir.path(), "w.pem", &wild.cert));

    // Each name gets its own certificate: curl trusts only that one.
    assert!(until_curl(tls, "a.test", &ca_a, &[], true).await, "a.test served");
    for (host, ca) in [("a.test", &ca_a), ("b.test", &ca_b), ("x.wild.test", &ca_w)] {
        let (ok, out, err) = curl_async(tls, host, "/", ca, &[]).await;
        assert!(ok, "{host}: {err}");
        assert_eq!(out, "2 200", "{host}: HTTP/2 by ALPN");
    }
    let (ok, _, _) = curl_async(tls, "b.test", "/", &ca_a, &[]).await;
    assert!(!ok, "b.test does not get a.test's certificate");
    let (ok, out, _) = curl_async(tls, "a.test", "/", &ca_a, &["--http1.1"]).await;
    assert!(ok && out == "1.1 200", "HTTP/1.1 over TLS: {out}");
    let (ok, _, err) = curl_async(tls, "unknown.test", "/", &ca_a, &[]).await;
    assert!(!ok, "a name no certificate covers is refused: {err}");

    let (ok, out, _) = curl_async(tls, "a.test", "/", &ca_a, &["--http2"]).await;
    assert!(ok && out == "2 200", "curl --http2 negotiates h2 by ALPN: {out}");

    // ssl_protocols limits the versions offered.
    let only13 = self_signed(&["new.test"]);
    let ca_13 = write(dir.path(), "13.pem", &only13.cert);
    put_ssl(&w, "v13", json!({"cert": only13.cert, "key": only13.key, "snis": ["new.test"], "ssl_protocols": ["TLSv1.3"]})).await;
    assert!(until_curl(tls, "new.test", &ca_13, &[], true).await, "TLS 1.3 accepted");
    let (ok, _, err) = curl_async(tls, "new.test", "/", &ca_13, &["--tls-max", "1.2"]).await;
    assert!(!ok, "a TLS 1.2 client is refused by a TLSv1.3-only certificate: {err}");
    assert!(curl_async(tls, "a.test", "/", &ca_a, &["--tls-max", "1.2"]).await.0, "others still take TLS 1.2");

    // The upstream sees the request came over TLS.
    let r = tokio::task::spawn_blocking({
        let ca = ca_a.clone();
        move || {
            Command::new("curl")
                .args(["-sS", "--resolve", &format!("a.test:{}:127.0.0.1", tls.port()), "--cacert"])
                .arg(&ca)
                .arg(format!("https://a.test:{}/proto", tls.port()))
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let seen: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");

    // Replacing an ssls object swaps the certificate without a restart.
    let a2 = self_signed(&["a.test"]);
    let ca_a2 = write(dir.path(), "a2.pem", &a2.cert);
    put_ssl(&w, "a", json!({"cert": a2.cert, "key": a2.key, "snis": ["a.test"]})).await;
    assert!(until_curl(tls, "a.test", &ca_a2, &[], true).await, "the new certificate is served");
    assert!(!curl_async(tls, "a.test", "/", &ca_a, &[]).await.0, "the old one is gone");
    // Deleting it stops serving the name.
    assert_eq!(w.admin("DELETE", "/ssls/b", None).await.0, 200);
    assert!(until_curl(tls, "b.test", &ca_b, &[], false).await, "a deleted certificate is no longer served");
}

#[tokio::test]
async fn client_certificates_are_required_when_configured() {
    let w = Weir::start_tls();
    let tls = w.tls.unwrap();
    let up = Upstream::start("backend").await;
    w.admin("PUT", "/routes/r", Some(json!({"uri": "/*", "upstream": {"nodes": {up.node(): 1}}}))).await;
    let dir = tempfile::tempdir().unwrap();
    let server = self_signed(&["mtls.test"]);
    let (ca, client) = ca_and_client("trusted");
    let (_, stranger) = ca_and_client("other");
    put_ssl(&w, "m", json!({"cert": server.cert, "key": server.key, "snis": ["mtls.test"], "client": {"ca": ca.cert, "depth": 1}})).await;
    let server_ca = write(dir.path(), "server.pem", &server.cert);
    let (cc, ck) = (write(dir.path(), "c.pem", &client.cert), write(dir.path(), "c.key", &client.key));
    let (sc, sk) = (write(dir.path(), "s.pem", &stranger.cert), write(dir.path(), "s.key", &stranger.key));
    let with_cert = ["--cert", cc.to_str().unwrap(), "--key", ck.to_str().unwrap()];
    assert!(until_curl(tls, "mtls.test", &server_ca, &with_cert, true).await, "a client with a certificate from the CA gets through");
    assert_eq!(curl_async(tls, "mtls.test", "/", &server_ca, &with_cert).await.1, "2 200");
    let (good, _, err) = curl_async(tls, "mtls.test", "/", &server_ca, &[]).await;
    assert!(!good, "no client certificate: refused ({err})");
    let (good, _, err) = curl_async(tls, "mtls.test", "/", &server_ca, &["--cert", sc.to_str().unwrap(), "--key", sk.to_str().unwrap()]).await;
    assert!(!good, "a certificate from another CA: refused ({err})");
}

#[tokio::test]
async fn keys_are_checked_sealed_and_never_shown() {
    let w = Weir::start();
    let a = self_signed(&["a.test"]);
    let other = self_signed(&["other.test"]);

    // Broken PEM and a key that is not the certificate's are refused; nothing is stored.
    let (s, b) = w.admin("PUT", "/ssls/bad", Some(json!({"cert": a.cert, "key": other.key, "snis": ["a.test"]}))).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error_msg"], "invalid configuration: cert/key: the private key does not match the certificate");
    let garbage = format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", "A".repeat(200));
    let (s, b) = w.admin("PUT", "/ssls/bad", Some(json!({"cert": garbage, "key": a.key, "snis": ["a.test"]}))).await;
    assert_eq!(s, 400, "{b}");
    assert!(b["error_msg"].as_str().unwrap().contains("cert/key: invalid"), "{b}");
    assert_eq!(w.admin("GET", "/ssls/bad", None).await.0, 404);

    // A good one: stored, shown without its key, and the key is not in the store in the clear.
    let (s, b) = w.admin("PUT", "/ssls/1", Some(json!({"cert": a.cert, "key": a.key, "snis": ["a.test"]}))).await;
    assert_eq!(s, 201, "{b}");
    assert!(b["value"].get("key").is_none(), "{b}");
    let (_, got) = w.admin("GET", "/ssls/1", None).await;
    assert!(got["value"].get("key").is_none() && got["value"]["cert"] == json!(a.cert), "{got}");
    let (_, list) = w.admin("GET", "/ssls", None).await;
    assert!(list["list"][0]["value"].get("key").is_none(), "{list}");
    let key_body: String = a.key.lines().filter(|l| !l.starts_with("-----")).collect();
    let stored = std::fs::read(w.data_dir().join("weir.redb")).unwrap();
    let stored = String::from_utf8_lossy(&stored);
    assert!(stored.contains(&a.cert.lines().nth(1).unwrap().to_string()), "the certificate is stored");
    assert!(!stored.contains(&key_body[..40]), "the private key is not stored in the clear");

    // PATCH merges onto the sealed key and still checks the pair.
    let (s, b) = w.admin("PATCH", "/ssls/1", Some(json!({"snis": ["a.test", "www.a.test"]}))).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = w.admin("PATCH", "/ssls/1", Some(json!({"cert": other.cert}))).await;
    assert_eq!(s, 400, "a PATCHed certificate must still match the stored key: {b}");

    // An upstream's client certificate key: checked against its certificate, and sealed.
    let up = |cert: &str, key: &str| json!({"scheme": "https", "nodes": {"127.0.0.1:1": 1}, "tls": {"client_cert": cert, "client_key": key}});
    let (s, b) = w.admin("PUT", "/upstreams/u", Some(up(&a.cert, &other.key))).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error_msg"], "invalid configuration: tls.client_cert/client_key: the private key does not match the certificate");
    let (s, b) = w.admin("PUT", "/routes/r", Some(json!({"uri": "/", "upstream": up(&a.cert, &other.key)}))).await;
    assert_eq!(s, 400, "inline upstreams too: {b}");
    let (s, b) = w.admin("PUT", "/upstreams/u", Some(up(&a.cert, &a.key))).await;
    assert_eq!(s, 201, "{b}");
    let shown = b["value"]["tls"]["client_key"].as_str().unwrap().to_string();
    assert!(!shown.contains("PRIVATE KEY"), "sealed: {shown}");
    let (s, b) = w.admin("PATCH", "/upstreams/u", Some(json!({"retries": 1}))).await;
    assert_eq!(s, 200, "a PATCH keeps the sealed key usable: {b}");
}

#[tokio::test]
async fn clients_without_sni_get_the_fallback_name() {
    let w = Weir::start_with(tempfile::tempdir().unwrap(), "  tls_listen: [\"127.0.0.1:0\"]\n  tls_fallback_sni: a.test\n", "");
    let tls = w.tls.unwrap();
    let up = Upstream::start("backend").await;
    w.admin("PUT", "/routes/r", Some(json!({"uri": "/*", "upstream": {"nodes": {up.node(): 1}}}))).await;
    let dir = tempfile::tempdir().unwrap();
    // The certificate names the address too, so curl (which sends no SNI to an IP) can verify it.
    let ck = rcgen::generate_simple_self_signed(vec!["a.test".to_string(), "127.0.0.1".to_string()]).unwrap();
    put_ssl(&w, "a", json!({"cert": ck.cert.pem(), "key": ck.signing_key.serialize_pem(), "snis": ["a.test"]})).await;
    let ca = write(dir.path(), "a.pem", &ck.cert.pem());
    assert!(until_curl(tls, "127.0.0.1", &ca, &[], true).await, "no SNI: the fallback name's certificate");
}
