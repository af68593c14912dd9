//! Helpers for driving the API platform (`/v1/`) of a real node.

use std::time::Duration;

use serde_json::Value;

use super::{KEY, Weir, send};

pub async fn v1(w: &Weir, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let r = send(w.admin, method, &format!("/v1/{path}"), &[("x-api-key", KEY)], body.as_deref()).await;
    (r.status, r.json())
}

/// Polls the gateway until `check` holds.
pub async fn until_gateway(w: &Weir, gid: &str, check: impl Fn(u16, &Value) -> bool) -> Value {
    for _ in 0..500 {
        let (s, b) = v1(w, "GET", &format!("api-gateways/{gid}"), None).await;
        if check(s, &b) {
            return b;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("gateway {gid} never reached the state asked for");
}

/// Makes gateway `gid` (named after it) and waits until it serves.
pub async fn started_gateway(w: &Weir, gid: &str) {
    let (s, b) = v1(w, "POST", "api-gateways", Some(serde_json::json!({"name": gid, "gatewayId": gid}))).await;
    assert_eq!(s, 201, "{b}");
    until_gateway(w, gid, |_, b| b["phase"] == "Started").await;
}

pub fn problems(b: &Value) -> Vec<String> {
    b["error"]["problems"].as_array().map(|a| a.iter().filter_map(|p| p.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// Weir on its embedded store whose tenants may reach loopback (where the tests' upstreams
/// listen), with more `platform:` settings.
pub fn on_loopback(platform: &str) -> Weir {
    platform_weir("  type: embedded\n  path: \"{data}\"\n", &format!("  denied_networks: []\n{platform}"), &[])
}

pub async fn v1_as(w: &Weir, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let auth = format!("Bearer {token}");
    let r = send(w.admin, method, &format!("/v1/{path}"), &[("authorization", &auth)], body.as_deref()).await;
    (r.status, r.json())
}

/// Weir with its store (`store:` keys, indented) and `platform:` settings (indented); `env`
/// reaches its process.
pub fn platform_weir(store: &str, platform: &str, env: &[(&str, &str)]) -> Weir {
    platform_weir_with(store, platform, "", env)
}

/// As [`platform_weir`], with more top-level config (`extra`, whole sections).
pub fn platform_weir_with(store: &str, platform: &str, extra: &str, env: &[(&str, &str)]) -> Weir {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("weir.yaml");
    let store = store.replace("{data}", &dir.path().join("data").display().to_string());
    std::fs::write(
        &cfg,
        format!(
            "proxy:\n  listen: [\"127.0.0.1:0\"]\n  workers: 1\nadmin:\n  listen: \"127.0.0.1:0\"\n  keys:\n    - {{name: admin, key: \"{KEY}\", role: admin}}\nstore:\n{store}plugin_attr:\n  prometheus:\n    export_addr: {{ip: 127.0.0.1, port: 0}}\ndata_encryption:\n  keyring: [\"a shared secret for tests\"]\n{extra}platform:\n{platform}"
        ),
    )
    .unwrap();
    Weir::spawn(dir, &cfg, env)
}

/// A node of a cluster on `etcd`, with a short platform lease.
pub fn platform_node(etcd: &super::Etcd, env: &[(&str, &str)]) -> Weir {
    platform_weir(&format!("  type: etcd\n  etcd:\n    endpoints: [\"{}\"]\n    timeout: 2\n", etcd.endpoint()), "  lease_timeout: 2\n  denied_networks: []\n", env)
}

/// `/v1/api-gateways/{gid}/functions/{fn}` for a full name (`dev/user/me`).
pub fn fn_path(gid: &str, full: &str) -> String {
    format!("api-gateways/{gid}/functions/{}", full.replace('/', "%2F"))
}
