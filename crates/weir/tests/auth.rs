//! Authentication as APISIX enforces it: one consumer per auth key, the JWT claims a route asks
//! for, auth secrets sealed at rest, and admin keys compared exactly.

mod common;

use common::{KEY, Upstream, Weir, send};
use serde_json::{Value, json};

async fn put(w: &Weir, path: &str, body: Value) {
    let (s, b) = w.admin("PUT", path, Some(body)).await;
    assert!(s == 200 || s == 201, "{path}: {s} {b}");
}

async fn refused(w: &Weir, path: &str, body: Value, message: &str) {
    let (s, b) = w.admin("PUT", path, Some(body)).await;
    assert_eq!((s, b), (400, json!({ "error_msg": message })), "{path}");
}

#[tokio::test]
async fn an_auth_key_belongs_to_one_consumer_or_credential() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    put(&w, "/consumers", json!({"username": "jack", "plugins": {"key-auth": {"key": "k1"}}})).await;
    put(&w, "/consumers/jack/credentials/phone", json!({"plugins": {"key-auth": {"key": "k2"}}})).await;
    put(&w, "/routes/k", json!({"uri": "/k", "plugins": {"key-auth": {}}, "upstream": {"nodes": {up.node(): 1}}})).await;

    // Another consumer, or another consumer's credential, cannot take a key that is held.
    refused(&w, "/consumers", json!({"username": "rose", "plugins": {"key-auth": {"key": "k1"}}}),
        "duplicate key of plugin key-auth found with consumer: jack").await;
    refused(&w, "/consumers", json!({"username": "rose", "plugins": {"key-auth": {"key": "k2"}}}),
        "duplicate key of plugin key-auth found with credential: phone of consumer: jack").await;
    put(&w, "/consumers", json!({"username": "rose"})).await;
    refused(&w, "/consumers/rose/credentials/c", json!({"plugins": {"key-auth": {"key": "k1"}}}),
        "duplicate key of plugin key-auth found with consumer: jack").await;
    // Nor can another credential of the same consumer (only the object itself is skipped).
    refused(&w, "/consumers/jack/credentials/laptop", json!({"plugins": {"key-auth": {"key": "k2"}}}),
        "duplicate key of plugin key-auth found with credential: phone of consumer: jack").await;

    // Writing an object again with the key it holds is no conflict; a consumer may repeat a key
    // its own credential holds.
    put(&w, "/consumers", json!({"username": "jack", "desc": "again", "plugins": {"key-auth": {"key": "k1"}}})).await;
    put(&w, "/consumers/jack/credentials/phone", json!({"desc": "again", "plugins": {"key-auth": {"key": "k2"}}})).await;
    put(&w, "/consumers", json!({"username": "jack", "plugins": {"key-auth": {"key": "k2"}}})).await;
    put(&w, "/consumers", json!({"username": "jack", "plugins": {"key-auth": {"key": "k1"}}})).await;

    // The other auth plugins' lookup attributes, as APISIX's `check_duplicate_key`.
    put(&w, "/consumers/jack/credentials/b", json!({"plugins": {"basic-auth": {"username": "jack-user", "password": "p"}}})).await;
    put(&w, "/consumers/jack/credentials/j", json!({"plugins": {"jwt-auth": {"key": "jack-jwt", "secret": "s"}}})).await;
    put(&w, "/consumers/jack/credentials/h", json!({"plugins": {"hmac-auth": {"key_id": "jack-hmac", "secret_key": "s"}}})).await;
    refused(&w, "/consumers/rose/credentials/b", json!({"plugins": {"basic-auth": {"username": "jack-user", "password": "q"}}}),
        "duplicate username of plugin basic-auth found with credential: b of consumer: jack").await;
    refused(&w, "/consumers/rose/credentials/j", json!({"plugins": {"jwt-auth": {"key": "jack-jwt", "secret": "t"}}}),
        "duplicate key of plugin jwt-auth found with credential: j of consumer: jack").await;
    refused(&w, "/consumers", json!({"username": "rose", "plugins": {"hmac-auth": {"key_id": "jack-hmac", "secret_key": "t"}}}),
        "duplicate key_id of plugin hmac-auth found with credential: h of consumer: jack").await;
    // The same value under another plugin is another lookup table: no conflict.
    put(&w, "/consumers/rose/credentials/j", json!({"plugins": {"jwt-auth": {"key": "k1", "secret": "t"}}})).await;

    // The refusals changed nothing: the key still names jack.
    let r = w.until("/k", &[("apikey", "k1")], |r| r.status == 200).await;
    assert_eq!(r.json()["headers"]["x-consumer-username"], "jack");
    // Once a key is given up, another consumer may have it.
    put(&w, "/consumers/jack/credentials/phone", json!({"plugins": {"key-auth": {"key": "k3"}}})).await;
    put(&w, "/consumers", json!({"username": "rose", "plugins": {"key-auth": {"key": "k2"}}})).await;
    let r = w.until("/k", &[("apikey", "k2")], |r| r.status == 200 && r.json()["headers"]["x-consumer-username"] == "rose").await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn jwt_claims_to_verify_must_be_present() {
    let minted = common::jwt_tokens();
    let token = |name: &str| minted["tokens"][name].as_str().unwrap().to_string();

    let w = Weir::start();
    let up = Upstream::start("backend").await;
    put(&w, "/consumers", json!({"username": "jo", "plugins": {"jwt-auth": {"key": "hs256", "secret": "hs256-secret"}}})).await;
    let route = |uri: &str, conf: Value| json!({"uri": uri, "plugins": {"jwt-auth": conf}, "upstream": {"nodes": {up.node(): 1}}});
    put(&w, "/routes/default", route("/default", json!({}))).await;
    put(&w, "/routes/exp", route("/exp", json!({"claims_to_verify": ["exp"]}))).await;
    put(&w, "/routes/both", route("/both", json!({"claims_to_verify": ["exp", "nbf"]}))).await;
    w.until("/both", &[], |r| r.status == 401).await;

    let status = |path: &'static str, name: &'static str| {
        let w = &w;
        let t = token(name);
        async move {
            let r = w.get(path, &[("authorization", &format!("Bearer {t}"))]).await;
            if r.status == 401 {
                assert_eq!(r.json(), json!({"message": "failed to verify jwt"}), "{path} {name}");
            }
            r.status
        }
    };
    // Without `claims_to_verify`, `exp` and `nbf` are checked when present (APISIX's default).
    assert_eq!(status("/default", "no_exp").await, 200);
    assert_eq!(status("/default", "HS256").await, 200);
    assert_eq!(status("/default", "expired").await, 401);
    assert_eq!(status("/default", "not_yet").await, 401, "nbf in the future");
    assert_eq!(status("/default", "exp_not_a_number").await, 401);
    // Listed claims must be there, and hold.
    assert_eq!(status("/exp", "no_exp").await, 401, "a token without exp where exp must be verified");
    assert_eq!(status("/exp", "HS256").await, 200);
    assert_eq!(status("/exp", "expired").await, 401);
    assert_eq!(status("/exp", "not_yet").await, 401, "a present nbf is still checked");
    assert_eq!(status("/both", "HS256").await, 401, "no nbf");
    assert_eq!(status("/both", "exp_and_nbf").await, 200);

    let (s, b) = w.admin("PUT", "/routes/bad", Some(route("/bad", json!({"claims_to_verify": ["iat"]})))).await;
    assert_eq!(s, 400, "only exp and nbf can be verified: {b}");
}

/// Every file under `dir`, concatenated: what is at rest.
fn bytes_at_rest(dir: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            out.extend(std::fs::read(&p).unwrap());
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn auth_secrets_are_sealed_at_rest_and_shown_opened() {
    let secrets = ["key-auth-secret-4f1c", "basic-password-77aa", "jwt-secret-91bd", "hmac-secret-c3e0", "csrf-key-5d2e"];
    let dir = tempfile::tempdir().unwrap();
    let w = Weir::start_role(dir, "traditional", "embedded", "");
    let up = Upstream::start("backend").await;
    let (s, b) = w.admin("PUT", "/consumers", Some(json!({"username": "ann", "plugins": {"key-auth": {"key": secrets[0]}}}))).await;
    assert_eq!(s, 201, "{b}");
    // The answer to a write shows the object as stored, as APISIX's does: sealed.
    let stored_key = b["value"]["plugins"]["key-auth"]["key"].as_str().unwrap().to_string();
    assert_ne!(stored_key, secrets[0]);
    put(&w, "/consumers/ann/credentials/b", json!({"plugins": {"basic-auth": {"username": "ann", "password": secrets[1]}}})).await;
    put(&w, "/consumers/ann/credentials/j", json!({"plugins": {"jwt-auth": {"key": "ann-jwt", "secret": secrets[2]}}})).await;
    put(&w, "/consumers/ann/credentials/h", json!({"plugins": {"hmac-auth": {"key_id": "ann-hmac", "secret_key": secrets[3]}}})).await;
    put(&w, "/routes/k", json!({"uri": "/k", "plugins": {"key-auth": {}}, "upstream": {"nodes": {up.node(): 1}}})).await;
    put(&w, "/routes/b", json!({"uri": "/b", "plugins": {"basic-auth": {}}, "upstream": {"nodes": {up.node(): 1}}})).await;
    put(&w, "/routes/csrf", json!({"uri": "/csrf", "plugins": {"csrf": {"key": secrets[4]}}, "upstream": {"nodes": {up.node(): 1}}})).await;

    // Nothing the store keeps on disk holds a secret in the clear.
    let raw = bytes_at_rest(&w.data_dir());
    assert!(contains(&raw, "ann-hmac"), "the store file is readable as it is (the check below means something)");
    for s in secrets {
        assert!(!contains(&raw, s), "{s} is stored in the clear");
    }

    // GET shows them opened, as APISIX does.
    let (_, b) = w.admin("GET", "/consumers/ann", None).await;
    assert_eq!(b["value"]["plugins"]["key-auth"]["key"], secrets[0]);
    let (_, b) = w.admin("GET", "/consumers/ann/credentials", None).await;
    let creds: std::collections::HashMap<String, Value> =
        b["list"].as_array().unwrap().iter().map(|c| (c["value"]["id"].as_str().unwrap().to_string(), c["value"]["plugins"].clone())).collect();
    assert_eq!(creds["b"]["basic-auth"]["password"], secrets[1]);
    assert_eq!(creds["j"]["jwt-auth"]["secret"], secrets[2]);
    assert_eq!(creds["h"]["hmac-auth"]["secret_key"], secrets[3]);
    assert_eq!(creds["j"]["jwt-auth"]["key"], "ann-jwt", "only encrypt_fields are sealed");
    let (_, b) = w.admin("GET", "/routes", None).await;
    let csrf = b["list"].as_array().unwrap().iter().find(|r| r["value"]["id"] == "csrf").unwrap();
    assert_eq!(csrf["value"]["plugins"]["csrf"]["key"], secrets[4]);

    // The data plane opens them: the keys work, and the sealed text is no key.
    let r = w.until("/k", &[("apikey", secrets[0])], |r| r.status == 200).await;
    assert_eq!(r.json()["headers"]["x-consumer-username"], "ann");
    assert_eq!(w.get("/k", &[("apikey", &stored_key)]).await.status, 401);
    let basic = format!("Basic {}", base64_encode(&format!("ann:{}", secrets[1])));
    assert_eq!(w.get("/b", &[("authorization", &basic)]).await.status, 200);

    // A PATCH merges onto the sealed values, and they still work afterwards (routes may be
    // patched; the csrf key must survive it).
    let (s, b) = w.admin("PATCH", "/routes/csrf", Some(json!({"desc": "patched"}))).await;
    assert_eq!(s, 200, "{b}");
    let (_, b) = w.admin("GET", "/routes/csrf", None).await;
    assert_eq!(b["value"]["plugins"]["csrf"]["key"], secrets[4]);
    assert!(!contains(&bytes_at_rest(&w.data_dir()), secrets[4]));

    // A restart reads them back.
    let dir = w.kill9();
    let cfg = dir.path().join("weir.yaml");
    let w = Weir::spawn(dir, &cfg, &[]);
    assert_eq!(w.get("/k", &[("apikey", secrets[0])]).await.status, 200, "after a restart");

    // With a keyring that lacks the secret, nothing opens: the credential is left out (never
    // usable by its sealed text), and GET shows what is stored.
    let dir = w.kill9();
    let text = std::fs::read_to_string(&cfg).unwrap().replace("a shared secret for tests", "some other secret entirely");
    std::fs::write(&cfg, text).unwrap();
    let w = Weir::spawn(dir, &cfg, &[]);
    assert_eq!(w.get("/k", &[("apikey", secrets[0])]).await.status, 401);
    assert_eq!(w.get("/k", &[("apikey", &stored_key)]).await.status, 401);
    let (_, b) = w.admin("GET", "/consumers/ann", None).await;
    assert_eq!(b["value"]["plugins"]["key-auth"]["key"], json!(stored_key));
    assert!(w.log().contains("credential cannot be opened"), "{}", w.log());

    // `weir dump` prints the store as a declarative file: fields opened with its keyring (here
    // the original one), as file mode reads them.
    let dir = w.kill9();
    let text = std::fs::read_to_string(&cfg).unwrap().replace("some other secret entirely", "a shared secret for tests");
    std::fs::write(&cfg, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir")).arg("dump").arg("--declarative").arg("--config").arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dumped: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dumped["consumers"][0]["plugins"]["key-auth"]["key"], secrets[0]);
    drop(dir);
}

fn base64_encode(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn admin_keys_are_compared_exactly() {
    let w = Weir::start();
    let ok = |r: &common::Resp| r.status == 200;
    let get = |headers: Vec<(&'static str, String)>, path: String| {
        let admin = w.admin;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            send(admin, "GET", &path, &h, None).await
        }
    };
    assert!(ok(&get(vec![("x-api-key", KEY.to_string())], "/apisix/admin/routes".into()).await));
    assert!(ok(&get(vec![("cookie", format!("a=1; X-API-KEY={KEY}"))], "/apisix/admin/routes".into()).await));
    assert!(ok(&get(vec![], format!("/apisix/admin/routes?api_key={KEY}")).await));

    let wrong = [
        (vec![("cookie", format!("X-API-KEY={KEY} ; a=1"))], "/apisix/admin/routes".to_string()),
        (vec![("cookie", format!("X-API-KEY= {KEY}"))], "/apisix/admin/routes".to_string()),
        (vec![], format!("/apisix/admin/routes?api_key={KEY}%20")),
        (vec![], format!("/apisix/admin/routes?api_key={KEY}+")),
        (vec![("x-api-key", format!("{KEY}x"))], "/apisix/admin/routes".to_string()),
        (vec![("x-api-key", KEY[..KEY.len() - 1].to_string())], "/apisix/admin/routes".to_string()),
    ];
    for (headers, path) in wrong {
        let r = get(headers.clone(), path.clone()).await;
        assert_eq!(
            (r.status, r.json()),
            (401, json!({"error_msg": "failed to check token", "description": "wrong apikey"})),
            "{headers:?} {path}"
        );
    }
}
