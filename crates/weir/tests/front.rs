//! The client side of the proxy end to end: request framing, Host rules, hop-by-hop fields,
//! forwarded fields, head bounds, client timeouts and the connection cap, and upstream
//! timeouts per phase. Malformed requests go over raw sockets.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Upstream, Weir};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn put(w: &Weir, path: &str, body: Value) {
    let (s, b) = w.admin("PUT", path, Some(body)).await;
    assert!(s == 200 || s == 201, "{path}: {s} {b}");
}

/// A route on `/*` to `up`, live once it answers.
async fn open_route(w: &Weir, up: &Upstream) {
    put(w, "/routes/all", json!({"uri": "/*", "upstream": {"nodes": {up.node(): 1}}})).await;
    w.until("/", &[], |r| r.status == 200).await;
}

/// Sends `request` as it is and reads until the server closes (or 5 s pass): what came back,
/// and whether the connection was closed by the server.
async fn raw(addr: SocketAddr, request: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may stop reading (and answer) before all of it is written.
    let _ = s.write_all(request).await;
    read_to_close(&mut s, Duration::from_secs(5)).await
}

async fn read_to_close(s: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    let closed = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

fn status_of(response: &str) -> u16 {
    response.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Reads one response (head and a Content-Length body) off a connection that stays open.
async fn read_response(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + len {
                return String::from_utf8_lossy(&got[..end + 4 + len]).into_owned();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("a response in time").unwrap();
        assert!(n > 0, "closed before a full response: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn ambiguous_or_unknown_framing_is_refused_before_the_upstream() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    open_route(&w, &up).await;
    let before = up.hits.load(Ordering::SeqCst);

    // Content-Length and Transfer-Encoding together could be read two ways: 400, and closed.
    let (resp, closed) = raw(w.proxy, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").await;
    assert_eq!(status_of(&resp), 400, "{resp}");
    assert!(closed && resp.to_ascii_lowercase().contains("connection: close"), "{resp}");
    let (resp, closed) = raw(w.proxy, b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n").await;
    assert_eq!((status_of(&resp), closed), (400, true), "{resp}");

    // A transfer coding other than chunked is not implemented.
    let (resp, closed) = raw(w.proxy, b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n").await;
    assert_eq!((status_of(&resp), closed), (501, true), "{resp}");
    let (resp, _) = raw(w.proxy, b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").await;
    assert_eq!(status_of(&resp), 501, "{resp}");

    // A chunked body that breaks off into garbage: 400, and no node hears of it.
    let (resp, closed) = raw(w.proxy, b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n\r\n").await;
    assert_eq!((status_of(&resp), closed), (400, true), "{resp}");
    assert_eq!(up.hits.load(Ordering::SeqCst), before, "nothing refused reached the upstream");

    // The same body well formed goes through whole.
    let (resp, _) = raw(w.proxy, b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert!(resp.contains(r#""body":"hello world""#), "{resp}");
    assert_eq!(up.hits.load(Ordering::SeqCst), before + 1);

    // Once a connection is served by the full server (after a request with a body), its next
    // requests are held to the same rules.
    let mut s = TcpStream::connect(w.proxy).await.unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi").await.unwrap();
    assert_eq!(status_of(&read_response(&mut s).await), 200);
    s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n").await.unwrap();
    let (resp, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!((status_of(&resp), closed), (501, true), "{resp}");
    assert_eq!(up.hits.load(Ordering::SeqCst), before + 2);

    // There hyper reads Content-Length beside Transfer-Encoding as chunked and closes after
    // it: what follows the chunked body is never read as another request.
    let mut s = TcpStream::connect(w.proxy).await.unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi").await.unwrap();
    assert_eq!(status_of(&read_response(&mut s).await), 200);
    s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (resp, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(closed && resp.matches("HTTP/1.1 ").count() == 1 && !resp.contains("smuggled"), "{resp}");
    assert_eq!(up.hits.load(Ordering::SeqCst), before + 4, "the smuggled request never reached the node");
}

#[tokio::test]
async fn host_is_required_once_and_a_trailing_dot_matches() {
    let w = Weir::start();
    let open = Upstream::start("open").await;
    let admin = Upstream::start("admin").await;
    open_route(&w, &open).await;
    put(&w, "/routes/admin", json!({"uri": "/*", "host": "admin.internal", "upstream": {"nodes": {admin.node(): 1}}})).await;
    w.until("/", &[("host", "admin.internal")], |r| r.json()["server"] == "admin").await;

    for request in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: admin.internal\r\n\r\n",
        // Through the full server too (an upgrade it would otherwise handle).
        b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 0\r\nHost: a\r\nhost: b\r\n\r\n",
    ] {
        let (resp, closed) = raw(w.proxy, request).await;
        assert_eq!((status_of(&resp), closed), (400, true), "{}: {resp}", String::from_utf8_lossy(request));
    }
    // HTTP/1.0 needs no Host; it goes on as HTTP/1.1 with the node's.
    let (resp, _) = raw(w.proxy, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    let body: serde_json::Value = serde_json::from_str(resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)).unwrap_or_default();
    assert_eq!(body["headers"]["host"], open.node(), "{resp}");

    for host in ["admin.internal.", "ADMIN.internal.:9080", "admin.internal"] {
        let r = w.get("/", &[("host", host)]).await;
        assert_eq!(r.json()["server"], "admin", "{host}");
    }
    assert_eq!(w.get("/", &[("host", "other.internal.")]).await.json()["server"], "open");

    // An absolute-form target names the host, whatever Host says (RFC 9112 §3.2.2): the route
    // and the upstream see the target's. One with user information is refused.
    let body = |resp: &str| serde_json::from_str::<Value>(resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)).unwrap_or_default();
    for (request, server, host) in [
        (&b"GET http://admin.internal/x HTTP/1.1\r\nHost: other.internal\r\nConnection: close\r\n\r\n"[..], "admin", "admin.internal"),
        (b"GET http://other.internal:81/x HTTP/1.1\r\nHost: admin.internal\r\nConnection: close\r\n\r\n", "open", "other.internal:81"),
    ] {
        let (resp, _) = raw(w.proxy, request).await;
        let seen = body(&resp);
        assert_eq!((status_of(&resp), &seen["server"], &seen["headers"]["host"], &seen["uri"]), (200, &json!(server), &json!(host), &json!("/x")), "{resp}");
    }
    let (resp, _) = raw(w.proxy, b"GET http://user:pw@admin.internal/x HTTP/1.1\r\nHost: admin.internal\r\n\r\n").await;
    assert_eq!(status_of(&resp), 400, "{resp}");
    // HTTP/2: a Host field naming another host than `:authority` is malformed (RFC 9113
    // §8.3.1); the same host in both, ports and case aside, is served, and the route, its
    // plugins and the upstream see `:authority`. User information is refused.
    let (h2, _conn) = h2_connect(w.proxy, 65_535).await;
    for (authority, host, want) in [
        ("admin.internal", Some("other.internal"), (400, None)),
        ("admin.internal:9080", Some("ADMIN.internal:1"), (200, Some("admin.internal:9080"))),
        ("other.internal", Some("other.internal"), (200, Some("other.internal"))),
        ("admin.internal", None, (200, Some("admin.internal"))),
        ("user@admin.internal", None, (400, None)),
    ] {
        let mut req = http::Request::get(format!("http://{authority}/"));
        if let Some(host) = host {
            req = req.header("host", host);
        }
        let (resp, _) = h2.clone().ready().await.unwrap().send_request(req.body(()).unwrap(), true).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp).await.expect("an answer in time").unwrap();
        let status = resp.status().as_u16();
        let mut got = resp.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = got.data().await {
            text.extend_from_slice(&chunk.unwrap());
        }
        let seen: Value = serde_json::from_slice(&text).unwrap_or_default();
        let host_seen = seen["headers"]["host"].as_str();
        assert_eq!((status, host_seen), (want.0, want.1), "{authority} with Host {host:?}: {}", String::from_utf8_lossy(&text));
    }
}

#[tokio::test]
async fn a_client_connection_field_removes_only_its_own_fields() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    put(&w, "/consumers", json!({"username": "jack", "plugins": {"key-auth": {"key": "jack-key"}}})).await;
    put(&w, "/routes/r", json!({"uri": "/k", "plugins": {"key-auth": {},
        "proxy-rewrite": {"headers": {"set": {"x-set": "by-gateway"}}}}, "upstream": {"nodes": {up.node(): 1}}})).await;
    w.until("/k", &[("apikey", "jack-key")], |r| r.status == 200).await;

    let r = w
        .get(
            "/k",
            &[
                ("apikey", "jack-key"),
                ("connection", "keep-alive, X-Consumer-Username, Host, x-set, x-own, content-length"),
                ("x-own", "mine"),
                ("x-kept", "yes"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = &r.json()["headers"];
    assert_eq!(h["x-consumer-username"], "jack", "set by key-auth after the client's fields were dropped: {h}");
    assert_eq!(h["x-set"], "by-gateway", "{h}");
    assert_eq!(h["host"], w.proxy.to_string(), "a client cannot remove Host: {h}");
    assert!(h.get("x-own").is_none(), "the client's own named field is dropped: {h}");
    assert!(h.get("connection").is_none(), "{h}");
    assert_eq!(h["x-kept"], "yes");
}

/// A length a plugin sets that the body does not have is not sent: the next answer on the
/// connection is the gateway's own, never bytes of the body; a HEAD answer keeps its length.
#[tokio::test]
async fn an_answers_length_is_its_bodys_whatever_a_plugin_set() {
    let w = Weir::start();
    let forged = "HTTP/1.1 200 OK\r\nx-forged: yes\r\ncontent-length: 5\r\n\r\nhello";
    put(&w, "/routes/r", json!({"uri": "/r", "plugins": {"mocking": {"response_example": forged, "content_type": "text/plain"},
        "response-rewrite": {"headers": {"set": {"Content-Length": "0"}, "add": {"Content-Length": "1"}}}}})).await;
    w.until("/r", &[], |r| r.status == 200).await;
    // Twice on one connection: through the lean path (a GET) and through hyper (a request
    // with a body).
    let mut s = TcpStream::connect(w.proxy).await.unwrap();
    let mut p = TcpStream::connect(w.proxy).await.unwrap();
    let get = format!("GET /r HTTP/1.1\r\nhost: {}\r\n\r\n", w.proxy);
    let post = format!("POST /r HTTP/1.1\r\nhost: {}\r\ncontent-length: 2\r\n\r\nhi", w.proxy);
    for (conn, request) in [(&mut s, &get), (&mut p, &post)] {
        for _ in 0..2 {
            conn.write_all(request.as_bytes()).await.unwrap();
            let answer = read_response(conn).await;
            let head = answer.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
            assert_eq!(head.matches("content-length:").count(), 1, "{answer}");
            assert!(head.contains(&format!("content-length: {}", forged.len())) && answer.ends_with("hello") && !head.contains("x-forged"), "{answer}");
        }
    }
    s.write_all(format!("HEAD /r HTTP/1.1\r\nhost: {}\r\n\r\n", w.proxy).as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200") && head.matches("content-length:").count() == 1, "{head}");
}

/// A HEAD answer whose node gave no length (it would stream its GET in chunks) says no
/// length either, on both paths: `content-length: 0` would tell the client the resource is
/// empty.
#[tokio::test]
async fn a_head_answer_without_a_length_says_none() {
    let w = Weir::start();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let _ = c.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await;
                }
            });
        }
    });
    put(&w, "/routes/stream", json!({"uri": "/stream", "upstream": {"nodes": {node.to_string(): 1}}})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The lean path, then hyper's (a request with a body).
    for request in [format!("HEAD /stream HTTP/1.1\r\nhost: {}\r\n\r\n", w.proxy), format!("HEAD /stream HTTP/1.1\r\nhost: {}\r\ncontent-length: 2\r\n\r\nhi", w.proxy)] {
        let mut s = TcpStream::connect(w.proxy).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200") && !head.contains("content-length"), "{head}");
    }
}

async fn forwarded_seen(w: &Weir) -> Value {
    let r = w
        .get(
            "/f",
            &[
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "evil.test"),
                ("x-forwarded-port", "1"),
                ("x-real-ip", "6.6.6.6"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["headers"].clone()
}

#[tokio::test]
async fn forwarded_fields_of_untrusted_clients_are_replaced() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    open_route(&w, &up).await;
    let h = forwarded_seen(&w).await;
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{h}");
    assert_eq!(h["x-real-ip"], "127.0.0.1", "{h}");
    assert_eq!(h["x-forwarded-proto"], "http", "{h}");
    assert_eq!(h["x-forwarded-host"], w.proxy.to_string(), "{h}");
    assert_eq!(h["x-forwarded-port"], w.proxy.port().to_string(), "{h}");

    let trusted = Weir::start_with(tempfile::tempdir().unwrap(), "  trusted_addresses: [\"127.0.0.0/8\"]\n", "");
    open_route(&trusted, &up).await;
    let h = forwarded_seen(&trusted).await;
    assert_eq!(h["x-forwarded-for"], "1.2.3.4, 127.0.0.1", "{h}");
    assert_eq!(h["x-forwarded-proto"], "https", "{h}");
    assert_eq!(h["x-forwarded-host"], "evil.test", "{h}");
    assert_eq!(h["x-forwarded-port"], "1", "{h}");
    assert_eq!(h["x-real-ip"], "127.0.0.1", "X-Real-IP is always the peer: {h}");
}

#[tokio::test]
async fn heads_past_their_bounds_are_refused_and_not_forwarded() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    open_route(&w, &up).await;
    let before = up.hits.load(Ordering::SeqCst);

    let line = |n: usize| format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "v".repeat(n));
    // One field line of 9 KiB.
    let (resp, closed) = raw(w.proxy, line(9 * 1024).as_bytes()).await;
    assert_eq!((status_of(&resp), closed), (431, true), "{resp}");
    // A 400 KiB value, sent whole and never finished.
    let head = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}", "v".repeat(400 * 1024));
    let (resp, closed) = raw(w.proxy, head.as_bytes()).await;
    assert_eq!((status_of(&resp), closed), (431, true), "{resp}");
    // ... and finished.
    let (resp, _) = raw(w.proxy, line(400 * 1024).as_bytes()).await;
    assert_eq!(status_of(&resp), 431, "{resp}");
    // Many lines under the line bound, over the head bound.
    let many: String = (0..40).map(|i| format!("X-F{i}: {}\r\n", "v".repeat(1000))).collect();
    let (resp, _) = raw(w.proxy, format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes()).await;
    assert_eq!(status_of(&resp), 431, "{resp}");
    // A request line of 9 KiB.
    let (resp, closed) = raw(w.proxy, format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "p".repeat(9 * 1024)).as_bytes()).await;
    assert_eq!((status_of(&resp), closed), (414, true), "{resp}");
    assert_eq!(up.hits.load(Ordering::SeqCst), before, "nothing refused was forwarded");
    // ... after empty lines, which come before a request line and never end its head: on a
    // connection whose buffer a large head grew, so that it arrives in one read.
    let mut s = TcpStream::connect(w.proxy).await.unwrap();
    let fields: String = (0..3).map(|i| format!("X-F{i}: {}\r\n", "v".repeat(7000))).collect();
    s.write_all(format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}\r\n").as_bytes()).await.unwrap();
    assert_eq!(status_of(&read_response(&mut s).await), 200);
    s.write_all(format!("\r\n\r\nGET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "p".repeat(12 * 1024)).as_bytes()).await.unwrap();
    let (resp, _) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert!([414, 431].contains(&status_of(&resp)), "{resp}");
    assert_eq!(up.hits.load(Ordering::SeqCst), before + 1, "the long request line was not forwarded");

    // Just under the bounds passes.
    let (resp, _) = raw(w.proxy, format!("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Big: {}\r\n\r\n", "v".repeat(8000)).as_bytes()).await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    // So does a large head followed at once by a body without a line end: the body is no line
    // of the head.
    let fields: String = (0..4).map(|i| format!("X-F{i}: {}\r\n", "v".repeat(4200))).collect();
    let body = "b".repeat(20_000);
    let (resp, _) = raw(w.proxy, format!("POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{fields}Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes()).await;
    assert_eq!(status_of(&resp), 200, "{resp}");

    // The same bounds on a connection the full server took over.
    let mut s = TcpStream::connect(w.proxy).await.unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi").await.unwrap();
    assert_eq!(status_of(&read_response(&mut s).await), 200);
    let _ = s.write_all(line(40 * 1024).as_bytes()).await;
    let (resp, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!((status_of(&resp), closed), (431, true), "{resp}");
}

#[tokio::test]
async fn unfinished_heads_are_bounded_and_dropped_at_the_header_timeout() {
    let w = Weir::start_with(tempfile::tempdir().unwrap(), "  client_header_timeout: 1.5\n", "");
    let up = Upstream::start("backend").await;
    open_route(&w, &up).await;
    let rss_before = common::status_kib(w.pid(), "VmRSS");

    // 200 slow clients, each a partial head and a byte now and then; and 300 that send 390 KiB
    // of one header without finishing it.
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(w.proxy).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ").await.unwrap();
        slow.push(s);
    }
    let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}", "v".repeat(390 * 1024));
    let mut large = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(w.proxy).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(200), s.write_all(big.as_bytes())).await;
        large.push(s);
    }
    let rss_loaded = common::status_kib(w.pid(), "VmRSS");
    assert!(rss_loaded < rss_before + 64 * 1024, "500 unfinished heads cost {} KiB", rss_loaded - rss_before);
    for s in &mut large {
        let (resp, closed) = read_to_close(s, Duration::from_secs(5)).await;
        assert_eq!((status_of(&resp), closed), (431, true), "{resp}");
    }

    // Normal clients are served meanwhile.
    let drip = tokio::spawn(async move {
        for _ in 0..4 {
            for s in &mut slow {
                let _ = s.write_all(b"x").await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        slow
    });
    for _ in 0..5 {
        let r = w.get("/", &[]).await;
        assert_eq!(r.status, 200);
    }
    let mut slow = drip.await.unwrap();
    // Each slow head is dropped at its timeout, dripping or not.
    for s in &mut slow {
        let (resp, closed) = read_to_close(s, Duration::from_secs(5)).await;
        assert!(closed && resp.is_empty(), "{resp}");
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(6), "{took:?}");
    assert_eq!(w.get("/", &[]).await.status, 200);
}

#[tokio::test]
async fn idle_connections_close_after_the_keepalive_timeout() {
    let w = Weir::start_with(tempfile::tempdir().unwrap(), "  keepalive_timeout: 1\n", "");
    let up = Upstream::start("backend").await;
    open_route(&w, &up).await;
    let mut s = TcpStream::connect(w.proxy).await.unwrap();
    // Busy for three times the timeout, with pauses shorter than it: never cut.
    let busy = Instant::now();
    while busy.elapsed() < Duration::from_secs(3) {
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        assert_eq!(status_of(&read_response(&mut s).await), 200, "after {:?}", busy.elapsed());
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert_eq!(status_of(&read_response(&mut s).await), 200);
    let idle = Instant::now();
    let (rest, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(closed && rest.is_empty(), "{rest}");
    let waited = idle.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3), "{waited:?}");
}

#[tokio::test]
async fn silent_connections_close_after_the_header_timeout() {
    let w = Weir::start_with(tempfile::tempdir().unwrap(), "  client_header_timeout: 1\n", "");
    let started = Instant::now();
    let mut silent: Vec<TcpStream> = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(w.proxy).await.unwrap());
    }
    for s in &mut silent {
        let (rest, closed) = read_to_close(s, Duration::from_secs(5)).await;
        assert!(closed && rest.is_empty(), "{rest}");
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3), "{waited:?}");
}

/// A node that answers every request with an endless chunked body, counting connections.
async fn endless_node() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let closed = Arc::new(AtomicUsize::new(0));
    let c = closed.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await;
                let chunk = format!("{:x}\r\n{}\r\n", 65536, "z".repeat(65536));
                while s.write_all(chunk.as_bytes()).await.is_ok() {}
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, closed)
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_after_the_send_timeout() {
    let w = Weir::start_with(tempfile::tempdir().unwrap(), "  send_timeout: 1\n", "");
    let (node, closed) = endless_node().await;
    put(&w, "/routes/r", json!({"uri": "/endless", "upstream": {"nodes": {node.to_string(): 1}}})).await;
    // Changes apply in order: once this later route answers, the one above is live too.
    let up = Upstream::start("backend").await;
    open_route(&w, &up).await;
    let mut s = TcpStream::connect(w.proxy).await.unwrap();
    s.write_all(b"GET /endless HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    // Never read: the gateway's writes stall, and after a second it gives up on this client
    // (and on the node's connection with it).
    let started = Instant::now();
    while closed.load(Ordering::SeqCst) == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the stalled response was never abandoned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, ended) = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(ended, "the client's connection is closed too");
}

#[tokio::test]
async fn a_body_that_stops_arriving_ends_after_the_body_timeout() {
    let w = Weir::start_with(tempfile::tempdir().unwrap(), "  client_body_timeout: 1\n", "");
    let up = Upstream::start("backend").await;
    open_route(&w, &up).await;
    let mut s = TcpStream::connect(w.proxy).await.unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc").await.unwrap();
    let started = Instant::now();
    let (resp, closed) = read_to_close(&mut s, Duration::from_secs(8)).await;
    assert!(closed, "still waiting for the body after {:?}: {resp}", started.elapsed());
    assert_eq!(status_of(&resp), 408, "the client's stall is not the node's failure: {resp}");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    // A chunked body that stops while it is read ahead gets its answer.
    let mut s = TcpStream::connect(w.proxy).await.unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n").await.unwrap();
    let (resp, closed) = read_to_close(&mut s, Duration::from_secs(8)).await;
    assert_eq!((status_of(&resp), closed), (408, true), "{resp}");
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_and_logged() {
    let w = Weir::start_with(tempfile::tempdir().unwrap(), "  max_connections: 5\n", "");
    let up = Upstream::start("backend").await;
    open_route(&w, &up).await;
    // The probes' connections end first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(w.proxy).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        assert_eq!(status_of(&read_response(&mut s).await), 200);
        held.push(s);
    }
    let (resp, closed) = raw(w.proxy, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(closed && resp.is_empty(), "{resp}");
    assert!(w.log().contains("client connection limit reached"), "{}", w.log());
    // The connections in keep being served; once one ends, a newcomer is served.
    held[0].write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert_eq!(status_of(&read_response(&mut held[0]).await), 200);
    held.pop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(w.get("/", &[]).await.status, 200);
}

/// A node that accepts, reads, and never answers.
async fn silent_node() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut open = Vec::new();
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            open.push(s);
        }
    });
    addr
}

#[tokio::test]
async fn each_upstream_phase_has_its_own_timeout() {
    let w = Weir::start();
    let node = silent_node().await;
    put(&w, "/routes/r", json!({"uri": "/silent", "upstream": {"nodes": {node.to_string(): 1},
        "timeout": {"connect": 1, "send": 1, "read": 2}}})).await;
    w.until("/silent", &[], |r| r.status == 504).await;
    let started = Instant::now();
    let r = w.get("/silent", &[]).await;
    let took = started.elapsed();
    assert_eq!(r.status, 504);
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_millis(2900), "the read phase is bounded by read alone: {took:?}");
}

#[tokio::test]
async fn the_admin_listener_bounds_heads_and_their_time() {
    let w = Weir::start_with(tempfile::tempdir().unwrap(), "", "  client_header_timeout: 1\n");
    let big = format!("GET /apisix/admin/routes HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "v".repeat(40 * 1024));
    let (resp, closed) = raw(w.admin, big.as_bytes()).await;
    assert_eq!((status_of(&resp), closed), (431, true), "{resp}");
    // A head that never ends is dropped at the timeout, and others are served meanwhile.
    let mut slow = TcpStream::connect(w.admin).await.unwrap();
    slow.write_all(b"GET /apisix/admin/routes HTTP/1.1\r\nHost: a\r\n").await.unwrap();
    let started = Instant::now();
    assert_eq!(w.admin("GET", "/routes", None).await.0, 200);
    let (_, closed) = read_to_close(&mut slow, Duration::from_secs(5)).await;
    assert!(closed && started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

/// An HTTP/2 connection with prior knowledge (h2c) to `addr`, its stream windows `window`
/// bytes; the task ends when the server closes the connection.
async fn h2_connect(addr: SocketAddr, window: u32) -> (h2::client::SendRequest<bytes::Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::Builder::new().initial_window_size(window).handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, driver)
}

/// `GET path` on an HTTP/2 connection: the status, with the body read when `read_body`.
async fn h2_get(send: &mut h2::client::SendRequest<bytes::Bytes>, path: &str, read_body: bool) -> (u16, h2::RecvStream) {
    let req = http::Request::get(format!("http://a{path}")).body(()).unwrap();
    let (resp, _) = send.clone().ready().await.unwrap().send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp).await.expect("an answer in time").unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    if read_body {
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
        }
    }
    (status, body)
}

#[tokio::test]
async fn idle_http2_connections_close_after_the_keepalive_timeout() {
    let w = Weir::start_with(tempfile::tempdir().unwrap(), "  keepalive_timeout: 1\n", "");
    let up = Upstream::start("backend").await;
    open_route(&w, &up).await;
    let (mut send, driver) = h2_connect(w.proxy, 65_535).await;
    // Busy for three times the timeout, with pauses shorter than it: never cut.
    let busy = Instant::now();
    loop {
        assert_eq!(h2_get(&mut send, "/", true).await.0, 200, "after {:?}", busy.elapsed());
        if busy.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let idle = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), driver).await.expect("the idle connection is closed").unwrap();
    let waited = idle.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3), "{waited:?}");
}

#[tokio::test]
async fn an_http2_client_that_never_opens_its_window_is_dropped_after_the_send_timeout() {
    let w = Weir::start_with(tempfile::tempdir().unwrap(), "  send_timeout: 1\n", "");
    let (node, closed) = endless_node().await;
    put(&w, "/routes/r", json!({"uri": "/endless", "upstream": {"nodes": {node.to_string(): 1}}})).await;
    let up = Upstream::start("backend").await;
    open_route(&w, &up).await;
    // Stream windows of 0 bytes, never opened: the head arrives, no byte of the body can.
    let (mut send, driver) = h2_connect(w.proxy, 0).await;
    let started = Instant::now();
    let (status, _body) = h2_get(&mut send, "/endless", false).await;
    assert_eq!(status, 200);
    // Others are served meanwhile.
    assert_eq!(w.get("/", &[]).await.status, 200);
    tokio::time::timeout(Duration::from_secs(10), driver).await.expect("the stalled connection is dropped").unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    // The node's connection goes with it.
    while closed.load(Ordering::SeqCst) == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the node's connection was kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_admin_listener_checks_the_key_first_and_bounds_bodies_readers_and_connections() {
    let w = Weir::start_with(tempfile::tempdir().unwrap(), "", "  client_body_timeout: 1\n  send_timeout: 1\n  max_connections: 8\n");
    // No key: refused on the head alone, the promised megabyte never waited for.
    let mut s = TcpStream::connect(w.admin).await.unwrap();
    s.write_all(b"PUT /apisix/admin/routes/1 HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n").await.unwrap();
    let started = Instant::now();
    let (resp, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!((status_of(&resp), closed), (401, true), "{resp}");
    assert!(started.elapsed() < Duration::from_millis(900), "{:?}", started.elapsed());
    // With the key, a body that stops arriving gets 408 after the body timeout.
    let mut s = TcpStream::connect(w.admin).await.unwrap();
    let head = format!("PUT /apisix/admin/routes/1 HTTP/1.1\r\nHost: a\r\nX-API-KEY: {}\r\nContent-Length: 100\r\n\r\n{{\"uri\"", common::KEY);
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (resp, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!((status_of(&resp), closed), (408, true), "{resp}");
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    assert_eq!(w.admin("GET", "/routes/1", None).await.0, 404, "nothing was stored");

    // A reader that stops reading: lists of about 1 MB each, asked for 64 times in one go.
    for i in 0..16 {
        put(&w, &format!("/routes/big{i}"), json!({"uri": format!("/big{i}"), "plugins": {"mocking": {"response_example": "b".repeat(64 * 1024)}}, "upstream": {"nodes": {"127.0.0.1:1": 1}}})).await;
    }
    let ask = format!("GET /apisix/admin/routes HTTP/1.1\r\nHost: a\r\nX-API-KEY: {}\r\n\r\n", common::KEY).repeat(64);
    let mut s = TcpStream::connect(w.admin).await.unwrap();
    s.write_all(ask.as_bytes()).await.unwrap();
    // Its buffers fill, its answers wait, and after the send timeout the connection goes.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection stayed open after {got} bytes");
    assert!(got < 32 << 20, "every answer was sent ({got} bytes): the stalled writes were not bounded");

    // Past the connection cap, newcomers are closed and the cap is logged; the held ones
    // are still served.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(w.admin).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (resp, closed) = raw(w.admin, b"GET /apisix/admin/routes HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(closed && resp.is_empty(), "{resp}");
    assert!(w.log().contains("admin connection limit reached"), "{}", w.log());
    let ask = format!("GET /apisix/admin/routes/big0 HTTP/1.1\r\nHost: a\r\nX-API-KEY: {}\r\n\r\n", common::KEY);
    held[0].write_all(ask.as_bytes()).await.unwrap();
    assert_eq!(status_of(&read_response(&mut held[0]).await), 200);
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(w.admin("GET", "/routes/big0", None).await.0, 200);
}
