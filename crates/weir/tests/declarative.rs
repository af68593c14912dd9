//! Declarative standalone mode: the config is one file in APISIX's layout, followed live; a
//! broken edit is refused and logged while the last good config serves. `weir validate` checks
//! a file offline; `weir dump --declarative` prints a store in the same layout, which the file mode reads.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Etcd, Upstream, Weir};
use serde_json::json;

fn file_mode(dir: tempfile::TempDir, file: &Path) -> Weir {
    let cfg = dir.path().join("weir.yaml");
    std::fs::write(
        &cfg,
        format!(
            "proxy:\n  listen: [\"127.0.0.1:0\"]\n  workers: 1\nstore:\n  type: file\n  path: \"{}\"\nplugin_attr:\n  prometheus:\n    enable_export_server: false\n",
            file.display()
        ),
    )
    .unwrap();
    Weir::spawn(dir, &cfg, &[])
}

async fn until(w: &Weir, path: &str, status: u16) {
    let started = Instant::now();
    while w.get(path, &[]).await.status != status {
        assert!(started.elapsed() < Duration::from_secs(10), "{path} never answered {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn apisix_yaml(node: &str, routes: &str) -> String {
    format!("upstreams:\n  - id: up\n    nodes:\n      \"{node}\": 1\n    type: roundrobin\nroutes:\n{routes}#END\n")
}

#[tokio::test]
async fn a_file_is_followed_and_a_broken_edit_keeps_the_last_good_config() {
    let up = Upstream::start("backend").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("apisix.yaml");
    std::fs::write(&file, apisix_yaml(&up.node(), "  - id: one\n    uri: /one\n    upstream_id: up\n")).unwrap();
    let w = file_mode(dir, &file);
    assert_eq!(w.admin.port(), 0, "no Admin API in file mode");
    assert_eq!(w.get("/one", &[]).await.status, 200);

    // An edit goes live.
    std::fs::write(&file, apisix_yaml(&up.node(), "  - id: one\n    uri: /one\n    upstream_id: up\n  - id: two\n    uri: /two\n    upstream_id: up\n")).unwrap();
    until(&w, "/two", 200).await;

    // A YAML error: refused, logged with its line; the last good config serves.
    std::fs::write(&file, "routes:\n  - id: one\n    uri: [/one\n").unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(w.get("/two", &[]).await.status, 200);
    let log = w.log();
    assert!(log.contains("config file refused") && log.contains("line 3"), "{log}");

    // An object that does not check: refused with every error named.
    std::fs::write(&file, apisix_yaml(&up.node(), "  - id: bad\n    uri: 7\n    upstream_id: up\n  - uri: /no-id\n")).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(w.get("/two", &[]).await.status, 200);
    let log = w.log();
    assert!(log.contains("routes[0] (bad) (line 7)") && log.contains("routes[1] (line 10): id is required"), "{log}");

    // A good edit after the broken ones: a removed route goes away.
    std::fs::write(&file, apisix_yaml(&up.node(), "  - id: two\n    uri: /two\n    upstream_id: up\n")).unwrap();
    until(&w, "/one", 404).await;
    assert_eq!(w.get("/two", &[]).await.status, 200);
}

#[test]
fn validate_lists_every_error_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, apisix_yaml("127.0.0.1:1980", "  - id: r\n    uri: /r\n    upstream_id: up\n    plugins:\n      key-auth: {}\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weir")).arg("validate").arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, apisix_yaml("127.0.0.1:1980", "  - id: r\n    uri: /r\n    plugins:\n      no-such-plugin: {}\n  - id: s\n    uris: 5\nservicez: []\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weir")).arg("validate").arg(&bad).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    for expected in ["routes[0] (r)", "unknown plugin [no-such-plugin]", "routes[1] (s)", "servicez: unknown section"] {
        assert!(text.contains(expected), "{expected} in {text}");
    }
}

#[tokio::test]
async fn dump_prints_a_store_in_a_layout_the_file_mode_reads_back() {
    let etcd = Etcd::start().await;
    let up = Upstream::start("backend").await;
    let store = format!("  etcd:\n    endpoints: [\"{}\"]\n", etcd.endpoint());
    let w = Weir::start_store(tempfile::tempdir().unwrap(), "etcd", &store);
    let (s, _) = w.admin("PUT", "/upstreams/u", Some(json!({"nodes": {up.node(): 1}}))).await;
    assert_eq!(s, 201);
    let (s, _) = w.admin("PUT", "/routes/r", Some(json!({"uri": "/dumped", "upstream_id": "u", "plugins": {"key-auth": {}}}))).await;
    assert_eq!(s, 201);
    let (s, _) = w.admin("PUT", "/consumers", Some(json!({"username": "ann", "plugins": {"key-auth": {"key": "k-ann"}}}))).await;
    assert_eq!(s, 201);

    let cfg = w.dir.path().join("weir.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_weir")).arg("dump").arg("--declarative").arg("--config").arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dumped.json");
    std::fs::write(&file, &out.stdout).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weir")).arg("validate").arg(&file).output().unwrap();
    assert!(out.status.success(), "the dump validates: {}", String::from_utf8_lossy(&out.stdout));

    let standalone = file_mode(dir, &file);
    assert_eq!(standalone.get("/dumped", &[]).await.status, 401, "the route and its plugin came across");
    assert_eq!(standalone.get("/dumped", &[("apikey", "k-ann")]).await.status, 200, "and the consumer");
}
