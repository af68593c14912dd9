//! What a hostile client or a careless operator must not get past: numbers the data plane would
//! not apply as written, stored objects it cannot read (fail closed), and spellings of a path
//! that would dodge the route guarding it.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use base64::Engine;
use common::{Etcd, Upstream, Weir};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn put(w: &Weir, path: &str, body: Value) {
    let (s, b) = w.admin("PUT", path, Some(body)).await;
    assert!(s == 200 || s == 201, "{path}: {s} {b}");
}

/// One request written byte for byte (no client library tidies the path), on its own
/// connection; the status and the body.
async fn raw(addr: SocketAddr, target: &str, headers: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {target} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n{headers}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status line: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A key-auth route on `/admin/*` and an open one on `/*`, both to `up`.
async fn guarded(w: &Weir, up: &Upstream) {
    put(w, "/consumers", json!({"username": "ops", "plugins": {"key-auth": {"key": "ops-key"}}})).await;
    put(w, "/routes/admin", json!({"uri": "/admin/*", "plugins": {"key-auth": {}}, "upstream": {"nodes": {up.node(): 1}}})).await;
    put(w, "/routes/open", json!({"uri": "/*", "upstream": {"nodes": {up.node(): 1}}})).await;
    w.until("/admin/x", &[], |r| r.status == 401).await;
}

#[tokio::test]
async fn numbers_the_data_plane_would_not_apply_are_refused_and_change_nothing() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    guarded(&w, &up).await;
    for patch in [r#"{"priority": 1.0}"#, r#"{"priority": 1e2}"#, r#"{"priority": 9223372036854775808}"#, r#"{"status": 1.0}"#] {
        let body: Value = serde_json::from_str(patch).unwrap();
        let (s, b) = w.admin("PATCH", "/routes/admin", Some(body)).await;
        assert_eq!(s, 400, "{patch}: {b}");
        let msg = b["error_msg"].as_str().unwrap_or_default();
        assert!(msg.contains("priority") || msg.contains("status"), "{patch}: the message names the field: {b}");
        let r = w.get("/admin/x", &[]).await;
        assert_eq!(r.status, 401, "after {patch} the route still asks for a key: {}", r.text());
    }
    let (s, b) = w.admin("GET", "/routes/admin", None).await;
    assert_eq!((s, b["value"].get("priority")), (200, None), "nothing was stored: {b}");

    // The same at every numeric field: a weight of 1.0 is not the integer a weight must be.
    let (s, b) = w.admin("PUT", "/upstreams/u", Some(json!({"nodes": {up.node(): 1.0}}))).await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = w.admin("PUT", "/upstreams/u", Some(json!({"nodes": [{"host": "127.0.0.1", "port": 1, "weight": 1.5}]}))).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(w.admin("GET", "/upstreams/u", None).await.0, 404);
    let (s, b) = w.admin("PUT", "/routes/r", Some(json!({"uri": "/r", "upstream": {"nodes": {up.node(): 1}, "retries": 1.0}}))).await;
    assert_eq!(s, 400, "{b}");
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn objects_the_data_plane_cannot_apply_close_their_routes() {
    let etcd = Etcd::start().await;
    let up = Upstream::start("backend").await;
    let store = format!("  etcd:\n    endpoints: [\"{}\"]\n    prefix: /apisix\n    timeout: 2\n", etcd.endpoint());
    let w = Weir::start_store(tempfile::tempdir().unwrap(), "etcd", &store);
    guarded(&w, &up).await;
    let put_raw = |key: &'static str, value: String| {
        let etcd = &etcd;
        async move { etcd.v3("/v3/kv/put", json!({"key": b64(key), "value": b64(&value)})).await }
    };

    // Written by something that skipped the Admin API's checks: the data plane cannot read the
    // route whole, so it is closed, never served without its key-auth.
    let before = up.hits.load(Ordering::SeqCst);
    let route = json!({"uri": "/admin/*", "priority": 1.0, "plugins": {"key-auth": {}}, "upstream": {"nodes": {up.node(): 1}}});
    put_raw("/apisix/routes/admin", route.to_string()).await;
    let r = w.until("/admin/x", &[], |r| r.status != 401).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.json()["error_msg"].as_str().unwrap().contains("503"), "a JSON answer: {}", r.text());
    assert_eq!(w.get("/admin/x", &[("apikey", "ops-key")]).await.status, 503, "not even with a key");
    assert_eq!(w.get("/elsewhere", &[]).await.status, 200, "other routes serve on");
    assert_eq!(up.hits.load(Ordering::SeqCst), before + 1, "only /elsewhere reached the upstream");
    assert!(w.log().contains("cannot be applied"), "the reason is logged: {}", w.log());

    // Plugins that cannot run, or a plugin config that is not there: closed as well.
    put_raw("/apisix/routes/admin", json!({"uri": "/admin/*", "plugins": {"key-auth": {"hide_credentials": "yes"}}, "upstream": {"nodes": {up.node(): 1}}}).to_string()).await;
    w.until("/admin/x", &[("apikey", "ops-key")], |r| r.status == 503).await;
    put_raw("/apisix/routes/admin", json!({"uri": "/admin/*", "plugin_config_id": "gone", "upstream": {"nodes": {up.node(): 1}}}).to_string()).await;
    w.until("/admin/x", &[("apikey", "ops-key")], |r| r.status == 503).await;

    // Fixed, it serves again.
    put_raw("/apisix/routes/admin", json!({"uri": "/admin/*", "priority": 1, "plugins": {"key-auth": {}}, "upstream": {"nodes": {up.node(): 1}}}).to_string()).await;
    w.until("/admin/x", &[("apikey", "ops-key")], |r| r.status == 200).await;
    assert_eq!(w.get("/admin/x", &[]).await.status, 401);

    // A consumer whose own plugins cannot run, or whose group is missing, is not let in: it
    // would pass without the limits those plugins set.
    let good = json!({"username": "ops", "plugins": {"key-auth": {"key": "ops-key"}}}).to_string();
    put_raw("/apisix/consumers/ops", json!({"username": "ops", "plugins": {"key-auth": {"key": "ops-key"}, "limit-count": {"count": "x"}}}).to_string()).await;
    w.until("/admin/x", &[("apikey", "ops-key")], |r| r.status == 401).await;
    put_raw("/apisix/consumers/ops", good.clone()).await;
    w.until("/admin/x", &[("apikey", "ops-key")], |r| r.status == 200).await;
    put_raw("/apisix/consumers/ops", json!({"username": "ops", "group_id": "g", "plugins": {"key-auth": {"key": "ops-key"}}}).to_string()).await;
    w.until("/admin/x", &[("apikey", "ops-key")], |r| r.status == 401).await;
    put_raw("/apisix/consumer_groups/g", json!({"plugins": {"limit-count": {"count": 1000, "time_window": 60}}}).to_string()).await;
    w.until("/admin/x", &[("apikey", "ops-key")], |r| r.status == 200).await;
    etcd.v3("/v3/kv/deleterange", json!({"key": b64("/apisix/consumer_groups/g")})).await;
    w.until("/admin/x", &[("apikey", "ops-key")], |r| r.status == 401).await;
    put_raw("/apisix/consumers/ops", good).await;
    w.until("/admin/x", &[("apikey", "ops-key")], |r| r.status == 200).await;

    // A global rule that cannot be read closes every route until it is removed: it may have
    // held the plugins that guard them.
    put_raw("/apisix/global_rules/g", json!({"plugins": "key-auth"}).to_string()).await;
    let r = w.until("/elsewhere", &[], |r| r.status != 200).await;
    assert_eq!(r.status, 503, "{}", r.text());
    etcd.v3("/v3/kv/deleterange", json!({"key": b64("/apisix/global_rules/g")})).await;
    w.until("/elsewhere", &[], |r| r.status == 200).await;
}

/// Every way of writing `admin` and the slashes around it that a client might try.
fn admin_spellings() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let word = |style: usize| -> String {
        "admin"
            .chars()
            .enumerate()
            .map(|(i, c)| match (style >> i) & 1 {
                0 => c.to_string(),
                _ if style & 32 != 0 => format!("%{:02X}", c as u32),
                _ => format!("%{:02x}", c as u32),
            })
            .collect()
    };
    let leads = ["/", "//", "///", "/./", "/public/../", "/public/%2e%2e/", "/public/%2E%2E/", "/public/.%2e/", "/%2e/", "/%2f", "/%2F", "/public/..%2f", "/a/b/../../", "/./././"];
    let joins = ["/", "%2f", "%2F", "//", "/./", "/y/../", "/%2e/", "/y/%2e%2e/"];
    for (i, lead) in leads.iter().enumerate() {
        for (j, join) in joins.iter().enumerate() {
            // Every lead with every join, each with a different spelling of the word.
            let style = (i * joins.len() + j) % 64;
            out.insert(format!("{lead}{}{join}x", word(style)));
        }
    }
    for style in 0..64 {
        out.insert(format!("/{}/x", word(style)));
    }
    out
}

#[tokio::test]
async fn no_spelling_of_a_path_gets_past_the_route_that_guards_it() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    guarded(&w, &up).await;
    let corpus = admin_spellings();
    assert!(corpus.len() >= 150, "{}", corpus.len());
    let mut answers = std::collections::BTreeMap::<u16, usize>::new();
    for path in &corpus {
        let before = up.hits.load(Ordering::SeqCst);
        let (status, body) = raw(w.proxy, path, "").await;
        assert!(status == 401 || status == 400, "{path} got past key-auth: {status} {body}");
        assert_eq!(up.hits.load(Ordering::SeqCst), before, "{path} reached the upstream");
        *answers.entry(status).or_default() += 1;
        // With the key, the upstream is asked for the path that was matched.
        if status == 401 {
            let (status, body) = raw(w.proxy, path, "apikey: ops-key\r\n").await;
            assert_eq!(status, 200, "{path}: {body}");
            let seen: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(seen["uri"], "/admin/x", "{path}");
        }
    }
    assert!(answers.get(&401).copied().unwrap_or(0) > 100, "most spellings normalize to /admin/x: {answers:?}");
}

#[tokio::test]
async fn the_normal_form_of_a_path_is_what_the_upstream_gets() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    put(&w, "/routes/open", json!({"uri": "/*", "upstream": {"nodes": {up.node(): 1}}})).await;
    put(&w, "/routes/cafe", json!({"uri": "/café", "plugins": {"mocking": {"response_example": "coffee"}}, "upstream": {"nodes": {up.node(): 1}}})).await;
    w.until("/x", &[], |r| r.status == 200).await;
    for (sent, forwarded) in [
        ("/a/./b/../c?q=1&r=%2F", "/a/c?q=1&r=%2F"),
        ("/a%20b", "/a%20b"),
        ("/a%3Fb?c", "/a%3Fb?c"),
        ("/%7Euser//docs/", "/~user/docs/"),
        ("/plain/path.html", "/plain/path.html"),
    ] {
        let (status, body) = raw(w.proxy, sent, "").await;
        assert_eq!(status, 200, "{sent}: {body}");
        let seen: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(seen["uri"], forwarded, "{sent}");
    }
    // Routes are written decoded, as for APISIX: an escaped request path finds them.
    assert_eq!(raw(w.proxy, "/caf%C3%A9", "").await, (200, "coffee".to_string()));
    for bad in ["/..", "/a/../../etc/passwd", "/%2e%2e/x", "/a%zz", "/a%00b"] {
        let (status, body) = raw(w.proxy, bad, "").await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

#[tokio::test]
async fn deep_or_costly_admin_input_is_refused_and_weir_stays_up() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    put(&w, "/routes/1", json!({"uri": "/r", "labels": {"a": "b"}, "upstream": {"nodes": {up.node(): 1}}})).await;
    // A sub-path of 16,000 segments once overflowed the control thread's stack.
    let deep = format!("/routes/1/labels{}", "/a".repeat(16_000));
    let (s, b) = w.admin("PATCH", &deep, Some(json!("x"))).await;
    assert_eq!(s, 400, "{b}");
    assert!(b["error_msg"].as_str().unwrap().contains("deeper"), "{b}");
    // A body nested deeper than any config may be.
    let mut nested = json!("x");
    for _ in 0..100 {
        nested = json!({"a": nested});
    }
    let (s, b) = w.admin("PATCH", "/routes/1", Some(json!({"labels": nested}))).await;
    assert_eq!(s, 400, "{b}");
    assert!(b["error_msg"].as_str().unwrap().contains("deeper"), "{b}");
    // A list filter whose regex would compile huge, or is simply too long.
    let (s, b) = w.admin("GET", "/routes?name=(a%7B1000%7D)%7B1000%7D", None).await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = w.admin("GET", &format!("/routes?name={}", "a".repeat(300)), None).await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = w.admin("GET", "/routes?name=%5E%24", None).await;
    assert_eq!((s, b["total"].clone()), (200, json!(0)), "{b}");
    // Still up, still serving, still writable.
    let (s, b) = w.admin("PATCH", "/routes/1/labels/a", Some(json!("c"))).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(w.get("/r", &[]).await.status, 200);
}

#[tokio::test]
async fn proxy_rewrite_values_cannot_split_a_request() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    for conf in [
        json!({"headers": {"set": {"X-A": "a\r\nX-Injected: 1"}}}),
        json!({"headers": {"add": {"X-A": "a\nb"}}}),
        json!({"headers": {"X-A": "a\rb"}}),
        json!({"uri": "/a\r\nHost: evil"}),
        json!({"regex_uri": ["^/(.*)", "/$1\r\nX: y"]}),
    ] {
        let (s, b) = w.admin("PUT", "/routes/r", Some(json!({"uri": "/r", "plugins": {"proxy-rewrite": conf}, "upstream": {"nodes": {up.node(): 1}}}))).await;
        assert_eq!(s, 400, "{conf}: {b}");
        assert!(b["error_msg"].as_str().unwrap().contains("proxy-rewrite"), "{b}");
    }
    assert_eq!(w.admin("GET", "/routes/r", None).await.0, 404, "nothing was stored");
}
