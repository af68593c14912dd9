//! Routing and proxying end to end: a real `weir`, real upstream servers, real sockets.

mod common;

use std::time::Duration;

use common::{KEY, Upstream, Weir, dead_port, send};
use serde_json::json;

fn nodes(ups: &[&Upstream]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for u in ups {
        m.insert(u.node(), json!(1));
    }
    json!({"type": "roundrobin", "nodes": m})
}

async fn server_of(w: &Weir, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let r = w.get(path, headers).await;
    (r.status, r.json()["server"].as_str().unwrap_or("").to_string())
}

#[tokio::test]
async fn router_rules() {
    let w = Weir::start();
    let names = ["exact", "prefix", "longer", "param", "rest", "host", "wild", "nohost", "post", "prio-low", "prio-high", "remote", "vars", "fallback", "disabled"];
    let mut ups = std::collections::HashMap::new();
    for n in names {
        ups.insert(n, Upstream::start(n).await);
    }
    let route = |n: &str, extra: serde_json::Value| {
        let mut r = extra;
        r["upstream"] = nodes(&[&ups[n]]);
        r
    };
    let routes = [
        ("exact", json!({"uri": "/a"})),
        ("prefix", json!({"uri": "/a*"})),
        ("longer", json!({"uri": "/ab*"})),
        ("param", json!({"uri": "/user/:id"})),
        ("rest", json!({"uris": ["/files/*path"]})),
        ("host", json!({"uri": "/h*", "host": "api.example.com"})),
        ("wild", json!({"uri": "/h*", "hosts": ["*.example.com"]})),
        ("nohost", json!({"uri": "/h*"})),
        ("post", json!({"uri": "/m", "methods": ["POST"]})),
        ("prio-low", json!({"uri": "/p", "priority": 1})),
        ("prio-high", json!({"uri": "/p", "priority": 5})),
        ("remote", json!({"uri": "/ip", "remote_addrs": ["192.168.0.0/16"]})),
        ("vars", json!({"uri": "/v", "vars": [["arg_k", "==", "1"], ["http_x_team", "~~", "^blue"], ["cookie_c", "in", ["a", "b"]]]})),
        ("fallback", json!({"uri": "/*"})),
        ("disabled", json!({"uri": "/off", "status": 0})),
    ];
    for (id, body) in routes {
        let (s, b) = w.admin("PUT", &format!("/routes/{id}"), Some(route(id, body))).await;
        assert_eq!(s, 201, "{id}: {b}");
    }
    w.until("/off", &[], |r| r.status == 200).await;
    let cases: Vec<(&str, Vec<(&str, &str)>, &str)> = vec![
        ("/a", vec![], "exact"),
        ("/a?q=1", vec![], "exact"),
        ("/ax", vec![], "prefix"),
        ("/abc", vec![], "longer"),
        ("/user/7", vec![], "param"),
        ("/user/7/x", vec![], "fallback"),
        ("/files/a/b.txt", vec![], "rest"),
        ("/hello", vec![("host", "api.example.com")], "host"),
        ("/hello", vec![("host", "API.Example.com:9080")], "host"),
        ("/hello", vec![("host", "web.example.com")], "wild"),
        ("/hello", vec![("host", "other.org")], "nohost"),
        ("/m", vec![], "fallback"),
        ("/p", vec![], "prio-high"),
        ("/ip", vec![], "fallback"),
        ("/v?k=1", vec![("x-team", "blue-7"), ("cookie", "z=1; c=b")], "vars"),
        ("/v?k=2", vec![("x-team", "blue-7"), ("cookie", "c=b")], "fallback"),
        ("/v?k=1", vec![("x-team", "red"), ("cookie", "c=b")], "fallback"),
        ("/off", vec![], "fallback"),
    ];
    for (path, headers, want) in cases {
        let (status, got) = server_of(&w, path, &headers).await;
        assert_eq!((status, got.as_str()), (200, want), "{path} {headers:?}");
    }
    let r = send(w.proxy, "POST", "/m", &[], Some("x")).await;
    assert_eq!(r.json()["server"], "post");

    // With the catch-all gone, no match is a JSON 404.
    w.admin("DELETE", "/routes/fallback", None).await;
    let r = w.until("/zzz", &[], |r| r.status == 404).await;
    assert_eq!(r.json(), json!({"error_msg": "404 Route Not Found"}));
}

#[tokio::test]
async fn services_and_upstream_references() {
    let w = Weir::start();
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    w.admin("PUT", "/upstreams/ua", Some(nodes(&[&a]))).await;
    w.admin("PUT", "/upstreams/ub", Some(nodes(&[&b]))).await;
    w.admin("PUT", "/services/s", Some(json!({"upstream_id": "ua", "hosts": ["svc.local"]}))).await;
    w.admin("PUT", "/routes/1", Some(json!({"uri": "/s", "service_id": "s"}))).await;
    w.admin("PUT", "/routes/2", Some(json!({"uri": "/o", "service_id": "s", "upstream_id": "ub"}))).await;
    let r = w.until("/s", &[("host", "svc.local")], |r| r.status == 200).await;
    assert_eq!(r.json()["server"], "a", "the service supplies the upstream");
    assert_eq!(w.get("/s", &[("host", "elsewhere")]).await.status, 404, "and the hosts");
    assert_eq!(w.get("/o", &[("host", "svc.local")]).await.json()["server"], "b", "the route's own upstream wins");
    // Changing the upstream object moves traffic without touching the route.
    w.admin("PATCH", "/upstreams/ua", Some(json!({"nodes": {b.node(): 1}}))).await;
    w.until("/s", &[("host", "svc.local")], |r| r.json()["server"] == "b").await;
}

#[tokio::test]
async fn forwarded_headers_and_pass_host() {
    let w = Weir::start();
    let up = Upstream::start("u").await;
    let mut pass = nodes(&[&up]);
    pass["pass_host"] = json!("pass");
    let mut node = nodes(&[&up]);
    node["pass_host"] = json!("node");
    let mut rewrite = nodes(&[&up]);
    rewrite["pass_host"] = json!("rewrite");
    rewrite["upstream_host"] = json!("backend.internal");
    w.admin("PUT", "/routes/pass", Some(json!({"uri": "/pass", "upstream": pass}))).await;
    w.admin("PUT", "/routes/node", Some(json!({"uri": "/node", "upstream": node}))).await;
    w.admin("PUT", "/routes/rw", Some(json!({"uri": "/rw", "upstream": rewrite}))).await;
    let r = w
        .until("/rw", &[], |r| r.status == 200)
        .await;
    assert_eq!(r.json()["headers"]["host"], "backend.internal");
    let r = w
        .get("/pass?x=1", &[("host", "public.example"), ("x-forwarded-for", "1.2.3.4"), ("connection", "keep-alive, x-drop"), ("x-drop", "1"), ("te", "trailers")])
        .await;
    let h = &r.json()["headers"];
    assert_eq!(r.json()["uri"], "/pass?x=1");
    assert_eq!(h["host"], "public.example");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "an untrusted client's X-Forwarded-For is replaced");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "public.example");
    assert_eq!(h["x-forwarded-port"], w.proxy.port().to_string());
    assert!(h.get("x-drop").is_none() && h.get("te").is_none(), "hop-by-hop headers are removed: {h}");
    let r = w.get("/node", &[("host", "public.example")]).await;
    assert_eq!(r.json()["headers"]["host"], up.node());
    // The request body streams through.
    let r = send(w.proxy, "POST", "/pass", &[], Some("hello body")).await;
    assert_eq!(r.json()["body"], "hello body");
    assert_eq!(r.json()["method"], "POST");
}

#[tokio::test]
async fn weights_are_honoured() {
    let w = Weir::start();
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let z = Upstream::start("z").await;
    let up = json!({"type": "roundrobin", "nodes": [
        {"host": "127.0.0.1", "port": a.addr.port(), "weight": 3},
        {"host": "127.0.0.1", "port": b.addr.port(), "weight": 1},
        {"host": "127.0.0.1", "port": z.addr.port(), "weight": 0}
    ]});
    w.admin("PUT", "/routes/1", Some(json!({"uri": "/", "upstream": up}))).await;
    w.until("/", &[], |r| r.status == 200).await;
    let (a0, b0) = (a.hits.load(std::sync::atomic::Ordering::SeqCst), b.hits.load(std::sync::atomic::Ordering::SeqCst));
    for _ in 0..400 {
        assert_eq!(w.get("/", &[]).await.status, 200);
    }
    let ha = a.hits.load(std::sync::atomic::Ordering::SeqCst) - a0;
    let hb = b.hits.load(std::sync::atomic::Ordering::SeqCst) - b0;
    assert_eq!((ha, hb), (300, 100), "smooth weighted round robin is exact over a full cycle");
    assert_eq!(z.hits.load(std::sync::atomic::Ordering::SeqCst), 0, "weight 0 gets nothing");
}

#[tokio::test]
async fn failures_retries_and_timeouts() {
    let w = Weir::start();
    let up = Upstream::start("alive").await;
    let dead = dead_port();
    // Connect failures move to the next node.
    let both = json!({"type": "roundrobin", "nodes": {dead.to_string(): 1, up.node(): 1}});
    w.admin("PUT", "/routes/retry", Some(json!({"uri": "/r", "upstream": both}))).await;
    w.until("/r", &[], |r| r.status != 404).await;
    for _ in 0..10 {
        let r = w.get("/r", &[]).await;
        assert_eq!((r.status, r.json()["server"].as_str()), (200, Some("alive")));
    }
    // With nowhere else to go: 502 with a JSON body.
    w.admin("PUT", "/routes/dead", Some(json!({"uri": "/d", "upstream": {"nodes": {dead.to_string(): 1}}}))).await;
    let r = w.until("/d", &[], |r| r.status != 404).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json(), json!({"error_msg": "502 Bad Gateway"}));
    // retries: 0 turns retrying off.
    let no_retry = json!({"nodes": {dead.to_string(): 1, up.node(): 1}, "retries": 0});
    w.admin("PUT", "/routes/nr", Some(json!({"uri": "/nr", "upstream": no_retry}))).await;
    w.until("/nr", &[], |r| r.status != 404).await;
    let statuses: Vec<u16> = futures_statuses(&w, "/nr", 4).await;
    assert!(statuses.contains(&502) && statuses.contains(&200), "{statuses:?}");
    // A slow upstream past the read timeout: 504. The route's timeout overrides the upstream's.
    let slow = json!({"nodes": {up.node(): 1}, "timeout": {"connect": 1, "send": 1, "read": 5}});
    w.admin("PUT", "/routes/slow", Some(json!({"uri": "/sleep/*", "upstream": slow, "timeout": {"connect": 0.5, "send": 0.1, "read": 0.2}}))).await;
    w.until("/sleep/0", &[], |r| r.status == 200).await;
    let started = std::time::Instant::now();
    let r = w.get("/sleep/2000", &[]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json(), json!({"error_msg": "504 Gateway Timeout"}));
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    // An idempotent bodiless request that gets a 503 is tried on another node.
    let other = Upstream::start("other").await;
    let status_up = json!({"nodes": {up.node(): 1, other.node(): 1}});
    w.admin("PUT", "/routes/st", Some(json!({"uri": "/status/*", "upstream": status_up}))).await;
    w.until("/status/200", &[], |r| r.status == 200).await;
    let before = up.hits.load(std::sync::atomic::Ordering::SeqCst) + other.hits.load(std::sync::atomic::Ordering::SeqCst);
    let r = w.get("/status/503", &[]).await;
    assert_eq!(r.status, 503, "both nodes answer 503, so the last answer is returned");
    let after = up.hits.load(std::sync::atomic::Ordering::SeqCst) + other.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(after - before, 2, "one try per node");
    // A route with no upstream at all.
    let (s, b) = w.admin("PUT", "/routes/none", Some(json!({"uri": "/none", "service_id": "missing"}))).await;
    assert_eq!(s, 400, "{b}");
}

async fn futures_statuses(w: &Weir, path: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(w.get(path, &[]).await.status);
    }
    out
}

#[tokio::test]
async fn keepalive_reuses_upstream_connections() {
    let w = Weir::start();
    let up = Upstream::start("k").await;
    w.admin("PUT", "/routes/1", Some(json!({"uri": "/*", "upstream": nodes(&[&up])}))).await;
    w.until("/", &[], |r| r.status == 200).await;
    // Sequential requests through the gateway reach the upstream over one pooled connection.
    let before = up.conns.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..50 {
        assert_eq!(w.get("/", &[]).await.status, 200);
    }
    let opened = up.conns.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(opened <= 1, "expected pooled connections, {opened} were opened for 50 requests");
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let w = Weir::start();
    let up = Upstream::start("durable").await;
    let mut ids = Vec::new();
    for i in 0..30 {
        let (s, b) = w.admin("PUT", &format!("/routes/{i}"), Some(json!({"uri": format!("/d/{i}"), "upstream": nodes(&[&up])}))).await;
        assert_eq!(s, 201);
        ids.push(b["value"]["id"].as_str().unwrap().to_string());
    }
    let (s, _) = w.admin("PATCH", "/routes/0", Some(json!({"desc": "patched"}))).await;
    assert_eq!(s, 200);
    let (s, _) = w.admin("DELETE", "/routes/1", None).await;
    assert_eq!(s, 200);
    // No pause: kill -9 straight after the last acknowledgement.
    let dir = w.kill9();
    let w = Weir::start_in(dir, "");
    let (_, b) = w.admin("GET", "/routes", None).await;
    assert_eq!(b["total"], 29, "{b}");
    let (_, b) = w.admin("GET", "/routes/0", None).await;
    assert_eq!(b["value"]["desc"], "patched");
    assert_eq!(w.admin("GET", "/routes/1", None).await.0, 404);
    // And the restarted gateway serves them at once.
    let r = w.get("/d/29", &[]).await;
    assert_eq!(r.json()["server"], "durable");
}

#[tokio::test]
async fn generated_admin_key_and_env_override() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("weir.yaml");
    let data = dir.path().join("data");
    std::fs::write(
        &cfg,
        format!("proxy:\n  listen: [\"127.0.0.1:0\"]\nadmin:\n  listen: \"127.0.0.1:0\"\nstore:\n  path: \"{}\"\nplugin_attr:\n  prometheus:\n    enable_export_server: false\n", data.display()),
    )
    .unwrap();
    let w = Weir::spawn(dir, &cfg, &[]);
    let key = std::fs::read_to_string(w.data_dir().join("admin_key")).unwrap();
    assert_eq!(key.len(), 32);
    let r = send(w.admin, "GET", "/apisix/admin/routes", &[("x-api-key", key.trim())], None).await;
    assert_eq!(r.status, 200);
    let dir = w.kill9();
    let w = Weir::spawn(dir, &cfg, &[("WEIR_ADMIN_KEY", "from-the-environment")]);
    let r = send(w.admin, "GET", "/apisix/admin/routes", &[("x-api-key", key.trim())], None).await;
    assert_eq!(r.status, 401, "the environment's key replaces the generated one");
    let r = send(w.admin, "GET", "/apisix/admin/routes", &[("x-api-key", "from-the-environment")], None).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_closed_stdout_does_not_stop_weir() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("weir.yaml");
    let (proxy, admin) = (dead_port(), dead_port());
    std::fs::write(
        &cfg,
        format!(
            "proxy:\n  listen: [\"{proxy}\"]\n  workers: 1\nadmin:\n  listen: \"{admin}\"\n  keys:\n    - {{name: admin, key: \"{KEY}\", role: admin}}\nstore:\n  path: \"{}\"\nplugin_attr:\n  prometheus:\n    enable_export_server: false\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Whoever launched it stops reading before Weir has said anything.
    drop(child.stdout.take());
    let mut up = false;
    for _ in 0..500 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("weir exited ({status}) when its stdout closed");
        }
        if tokio::net::TcpStream::connect(admin).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "the admin listener never came up");
    let r = send(admin, "PUT", "/apisix/admin/routes/1", &[("x-api-key", KEY)], Some(r#"{"uri":"/gone","upstream":{"nodes":{"127.0.0.1:1":1}}}"#)).await;
    assert_eq!(r.status, 201);
    let mut served = 0;
    for _ in 0..200 {
        served = send(proxy, "GET", "/nothing-here", &[], None).await.status;
        if served == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(served, 404, "the proxy answers with its own 404");
    assert!(child.try_wait().unwrap().is_none(), "weir is still running");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("weir.yaml");
    std::fs::write(&cfg, "proxy:\n  listen: [\"127.0.0.1:0\"]\n  wokers: 2\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir")).arg("serve").arg("--config").arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wokers"), "{err}");
}

#[tokio::test]
async fn an_acknowledged_write_meets_the_next_request() {
    let w = Weir::start();
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    // Each answer of the Admin API comes once this node serves the write: the request sent
    // right after it, with no polling, meets the change.
    for i in 0..40 {
        let (s, body) = w.admin("PUT", &format!("/routes/{i}"), Some(json!({"uri": format!("/now/{i}"), "upstream": nodes(&[&a])}))).await;
        assert_eq!(s, 201, "{body}");
        assert_eq!(server_of(&w, &format!("/now/{i}"), &[]).await, (200, "a".to_string()), "route {i}");
        let (s, _) = w.admin("PUT", &format!("/routes/{i}"), Some(json!({"uri": format!("/now/{i}"), "upstream": nodes(&[&b])}))).await;
        assert_eq!(s, 200);
        assert_eq!(server_of(&w, &format!("/now/{i}"), &[]).await, (200, "b".to_string()), "route {i} changed");
        let (s, _) = w.admin("PATCH", &format!("/routes/{i}"), Some(json!({"methods": ["POST"]}))).await;
        assert_eq!(s, 200);
        assert_eq!(w.get(&format!("/now/{i}"), &[]).await.status, 404, "route {i} patched to POST only");
        let (s, _) = w.admin("DELETE", &format!("/routes/{i}"), None).await;
        assert_eq!(s, 200);
        assert_eq!(w.get(&format!("/now/{i}"), &[]).await.status, 404, "route {i} deleted");
    }
}

#[tokio::test]
async fn in_flight_requests_finish_on_their_snapshot() {
    let w = std::sync::Arc::new(Weir::start());
    let old = Upstream::start("old").await;
    let new = Upstream::start("new").await;
    w.admin("PUT", "/routes/1", Some(json!({"uri": "/sleep/*", "upstream": nodes(&[&old])}))).await;
    w.until("/sleep/0", &[], |r| r.status == 200).await;
    // A slow request is in flight on the old config when the route moves to another upstream.
    let slow = {
        let w = w.clone();
        tokio::spawn(async move { w.get("/sleep/400", &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (s, _) = w.admin("PUT", "/routes/1", Some(json!({"uri": "/sleep/*", "upstream": nodes(&[&new])}))).await;
    assert_eq!(s, 200);
    w.until("/sleep/0", &[], |r| r.json()["server"] == "new").await;
    let r = slow.await.unwrap();
    assert_eq!((r.status, r.json()["server"].as_str()), (200, Some("old")));
}

#[tokio::test]
async fn retry_timeout_bounds_retries() {
    let w = Weir::start();
    let ups = [Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await];
    let all = |extra: serde_json::Value| {
        let mut u = nodes(&[&ups[0], &ups[1], &ups[2]]);
        for (k, v) in extra.as_object().unwrap() {
            u[k] = v.clone();
        }
        u
    };
    w.admin("PUT", "/routes/free", Some(json!({"uri": "/status/*", "upstream": all(json!({}))}))).await;
    w.admin("PUT", "/routes/bounded", Some(json!({"uri": "/status/*", "host": "bounded", "upstream": all(json!({"retry_timeout": 0.2}))}))).await;
    w.until("/status/200", &[("host", "bounded")], |r| r.status == 200).await;
    w.until("/status/200", &[], |r| r.status == 200).await;
    let hits = || ups.iter().map(|u| u.hits.load(std::sync::atomic::Ordering::SeqCst)).sum::<usize>();
    // Without a budget, a slow 503 is tried on every node.
    let before = hits();
    assert_eq!(w.get("/status/503?sleep=300", &[]).await.status, 503);
    assert_eq!(hits() - before, 3);
    // With a 0.2 s budget, the first slow answer has used it up.
    let before = hits();
    assert_eq!(w.get("/status/503?sleep=300", &[("host", "bounded")]).await.status, 503);
    assert_eq!(hits() - before, 1);
}

#[tokio::test]
async fn connect_timeout_is_a_504() {
    let w = Weir::start();
    let (hanging, _listener, _fill) = common::hanging_port();
    let up = json!({"nodes": {hanging.to_string(): 1}, "timeout": {"connect": 0.3, "send": 5, "read": 5}});
    w.admin("PUT", "/routes/1", Some(json!({"uri": "/", "upstream": up}))).await;
    let started = std::time::Instant::now();
    let r = w.until("/", &[], |r| r.status != 404).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(r.json(), json!({"error_msg": "504 Gateway Timeout"}));
}
