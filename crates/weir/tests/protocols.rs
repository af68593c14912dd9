//! Protocols end to end with real clients: HTTP/2 (curl), WebSocket (tungstenite).

mod common;

use std::process::Command;

use common::{Upstream, Weir};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

async fn put(w: &Weir, path: &str, body: serde_json::Value) {
    let (s, b) = w.admin("PUT", path, Some(body)).await;
    assert!(s == 200 || s == 201, "{path}: {s} {b}");
}

/// Runs curl and returns (HTTP version, status, body).
fn curl(args: &[&str], url: &str) -> (String, u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_version} %{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "curl {args:?} {url}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, tail) = text.rsplit_once('\n').unwrap();
    let (version, code) = tail.split_once(' ').unwrap();
    (version.to_string(), code.parse().unwrap(), body.to_string())
}

#[tokio::test]
async fn h2c_with_prior_knowledge() {
    let w = Weir::start();
    let up = Upstream::start("h1-upstream").await;
    put(&w, "/routes/r", json!({"uri": "/two", "host": "api.test", "upstream": {"nodes": {up.node(): 1}}})).await;
    w.until("/two", &[("host", "api.test")], |r| r.status == 200).await;
    let url = format!("http://{}/two?x=1", w.proxy);
    // Blocking curl off the runtime, so the in-process upstream keeps answering.
    let (v, code, body) = tokio::task::spawn_blocking(move || {
        curl(&["--http2-prior-knowledge", "-H", "host: api.test", "-d", "ping"], &url)
    })
    .await
    .unwrap();
    assert_eq!((v.as_str(), code), ("2", 200), "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["server"], "h1-upstream");
    assert_eq!(seen["uri"], "/two?x=1");
    assert_eq!(seen["body"], "ping");
    assert_eq!(seen["headers"]["host"], "api.test", "the :authority reaches an HTTP/1.1 upstream as Host");
    // The same listener still speaks HTTP/1.1.
    let url = format!("http://{}/two", w.proxy);
    let (v, code, _) = tokio::task::spawn_blocking(move || curl(&["-H", "host: api.test"], &url)).await.unwrap();
    assert_eq!((v.as_str(), code), ("1.1", 200));
}

/// A WebSocket echo server on loopback (tungstenite's own handshake and framing).
async fn ws_echo() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    match msg {
                        Message::Text(t) => {
                            let _ = ws.send(Message::text(format!("echo: {t}"))).await;
                        }
                        Message::Binary(b) => {
                            let _ = ws.send(Message::Binary(b)).await;
                        }
                        Message::Close(_) => break,
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn websocket_echo_through_the_gateway() {
    let w = Weir::start();
    let (echo, _task) = ws_echo().await;
    put(&w, "/routes/ws", json!({"uri": "/ws", "enable_websocket": true, "upstream": {"nodes": {echo.to_string(): 1}}})).await;
    put(&w, "/services/s", json!({"enable_websocket": true, "upstream": {"nodes": {echo.to_string(): 1}}})).await;
    put(&w, "/routes/via-service", json!({"uri": "/ws-svc", "service_id": "s"})).await;
    put(&w, "/routes/plain", json!({"uri": "/no-ws", "upstream": {"nodes": {echo.to_string(): 1}}})).await;
    w.until("/no-ws", &[], |r| r.status != 404).await;

    for path in ["/ws", "/ws-svc"] {
        let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}{path}", w.proxy)).await.expect("handshake");
        assert_eq!(resp.status(), 101);
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("echo: hello"));
        let big = vec![7u8; 200_000];
        ws.send(Message::binary(big.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big), "{path}: large frames both ways");
        for i in 0..50 {
            ws.send(Message::text(i.to_string())).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(format!("echo: {i}")));
        }
        ws.close(None).await.unwrap();
    }

    // Without enable_websocket the upgrade headers are not passed on, so no handshake happens.
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/no-ws", w.proxy)).await;
    assert!(refused.is_err(), "no upgrade on a route without enable_websocket");
    // The gateway still serves after tunnels close.
    assert_eq!(w.get("/ws", &[]).await.status, 502, "a plain GET to the echo server gets no handshake");
}

/// A tunnel is a client connection: it counts against `proxy.max_connections` while it lives,
/// and it ends once neither side has sent anything for the route's read timeout.
#[tokio::test]
async fn tunnels_count_as_connections_and_end_when_silent() {
    let w = Weir::start_with(tempfile::tempdir().unwrap(), "  max_connections: 3\n", "");
    let (echo, _task) = ws_echo().await;
    put(&w, "/routes/ws", json!({"uri": "/ws", "enable_websocket": true, "timeout": {"connect": 1, "send": 1, "read": 2}, "upstream": {"nodes": {echo.to_string(): 1}}})).await;
    w.until("/ws", &[], |r| r.status == 502).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", w.proxy)).await.expect("handshake");
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("echo: hi"));
        tunnels.push(ws);
    }
    // Three tunnels fill the three places: a fourth connection is closed unanswered.
    let mut s = tokio::net::TcpStream::connect(w.proxy).await.unwrap();
    let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /ws HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), tokio::io::AsyncReadExt::read_to_end(&mut s, &mut got)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))) && got.is_empty(), "{}", String::from_utf8_lossy(&got));
    // Silent for the read timeout, each tunnel ends, and its place is free again.
    let started = std::time::Instant::now();
    for ws in &mut tunnels {
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await.expect("the tunnel ends");
        assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    }
    let took = started.elapsed();
    assert!(took >= std::time::Duration::from_millis(1500) && took < std::time::Duration::from_secs(6), "{took:?}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(w.get("/ws", &[]).await.status, 502, "a new connection is served again");
}

/// A Python peer (grpcio or the standard library's TLS server), stopped when dropped.
struct Peer {
    child: std::process::Child,
    port: u16,
}

impl Peer {
    fn spawn(args: &[&str]) -> Peer {
        use std::io::BufRead as _;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/grpc_peer.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| panic!("peer {args:?} printed {line:?}"));
        Peer { child, port }
    }

    fn node(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the grpcio client against `target`; returns what it saw.
async fn grpc_client(args: Vec<String>) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/grpc_peer.py");
        Command::new("python3").arg(script).arg("grpc-client").args(&args).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "grpc client: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn self_signed(name: &str) -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

fn expected_grpc() -> serde_json::Value {
    json!({
        "say": "hello weir",
        "count": ["item 0", "item 1", "item 2", "item 3", "item 4"],
        "fail": ["NOT_FOUND", "no such thing"],
    })
}

#[tokio::test]
async fn grpc_unary_and_streaming_over_h2c_and_tls() {
    let w = Weir::start_tls();
    let dir = tempfile::tempdir().unwrap();
    let plain = Peer::spawn(&["grpc-server"]);
    let (up_cert, up_key) = self_signed("grpc-upstream.test");
    let (cert_path, key_path) = (dir.path().join("up.pem"), dir.path().join("up.key"));
    std::fs::write(&cert_path, &up_cert).unwrap();
    std::fs::write(&key_path, &up_key).unwrap();
    let secure = Peer::spawn(&["grpc-server", "--tls", cert_path.to_str().unwrap(), key_path.to_str().unwrap()]);
    put(&w, "/routes/plain", json!({"uri": "/weir.test.Echo/*", "host": "plain.test",
        "upstream": {"scheme": "grpc", "nodes": {plain.node(): 1}}})).await;
    // To a TLS upstream: grpcs, without verifying its self-signed certificate (APISIX's default).
    put(&w, "/routes/secure", json!({"uri": "/weir.test.Echo/*", "host": "secure.test",
        "upstream": {"scheme": "grpcs", "nodes": {secure.node(): 1}}})).await;
    let (cert, key) = self_signed("*.test");
    put(&w, "/ssls/g", json!({"cert": cert, "key": key, "snis": ["*.test"]})).await;
    let ca = dir.path().join("gw.pem");
    std::fs::write(&ca, &cert).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    // h2c: grpcio's insecure channel speaks HTTP/2 with prior knowledge; its authority is the
    // gateway's address, so a host-less route takes it.
    put(&w, "/routes/h2c", json!({"uri": "/weir.test.Echo/*", "upstream": {"scheme": "grpc", "nodes": {plain.node(): 1}}})).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let tls = w.tls.unwrap().to_string();
    let ca = ca.to_str().unwrap().to_string();
    let over_tls = |sni: &str| vec![tls.clone(), "--ca".into(), ca.clone(), "--name".into(), sni.to_string()];
    let cases = [vec![w.proxy.to_string()], over_tls("plain.test"), over_tls("secure.test")];
    for args in cases {
        let got = grpc_client(args.clone()).await;
        for (k, v) in expected_grpc().as_object().unwrap() {
            assert_eq!(&got[k], v, "{args:?}: {got}");
        }
        assert_eq!(got["trailers"]["x-trailer"], "t1", "{args:?}: trailers reach the client");
    }
}

#[tokio::test]
async fn https_upstreams_with_and_without_verification_and_client_certificates() {
    let w = Weir::start();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (cert, key) = self_signed("localhost");
    let (cert_path, key_path) = (write("s.pem", &cert), write("s.key", &key));
    let open = Peer::spawn(&["https-server", &cert_path, &key_path]);
    // An upstream that wants a client certificate from its own CA.
    let (client_cert, client_key) = self_signed("weir-client");
    let ca_path = write("client-ca.pem", &client_cert);
    let strict = Peer::spawn(&["https-server", &cert_path, &key_path, "--client-ca", &ca_path]);

    put(&w, "/routes/open", json!({"uri": "/open", "upstream": {"scheme": "https", "nodes": {open.node(): 1}}})).await;
    put(&w, "/routes/verified", json!({"uri": "/verified", "upstream": {"scheme": "https", "tls": {"verify": true}, "nodes": {open.node(): 1}}})).await;
    put(&w, "/routes/mtls", json!({"uri": "/mtls", "upstream": {"scheme": "https",
        "tls": {"client_cert": client_cert, "client_key": client_key}, "nodes": {strict.node(): 1}}})).await;
    put(&w, "/routes/no-cert", json!({"uri": "/no-cert", "upstream": {"scheme": "https", "nodes": {strict.node(): 1}}})).await;
    // The same client certificate kept as an ssls object of type client, named by id.
    put(&w, "/ssls/client", json!({"type": "client", "cert": client_cert, "key": client_key})).await;
    put(&w, "/routes/by-id", json!({"uri": "/by-id", "upstream": {"scheme": "https",
        "tls": {"client_cert_id": "client"}, "nodes": {strict.node(): 1}}})).await;
    let (s, b) = w.admin("PUT", "/routes/bad-id", Some(json!({"uri": "/bad-id", "upstream": {"scheme": "https",
        "tls": {"client_cert_id": "nope"}, "nodes": {strict.node(): 1}}}))).await;
    assert_eq!((s, b), (400, json!({"error_msg": "failed to fetch ssl info by ssl id [nope], response code: 404"})));
    w.until("/no-cert", &[], |r| r.status != 404).await;

    let r = w.get("/open", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["server"], "https");
    assert_eq!(w.get("/verified", &[]).await.status, 502, "a self-signed certificate fails verification");
    let r = w.get("/mtls", &[]).await;
    assert_eq!((r.status, r.json()["client_cert"].clone()), (200, json!(true)), "{}", r.text());
    assert_eq!(w.get("/no-cert", &[]).await.status, 502, "without a client certificate the upstream refuses");
    let r = w.get("/by-id", &[]).await;
    assert_eq!((r.status, r.json()["client_cert"].clone()), (200, json!(true)), "client_cert_id: {}", r.text());

    // Active `https` health probes speak TLS to the node; a plain-HTTP node fails them.
    let plain = Upstream::start("plain").await;
    let checks = json!({"active": {"type": "https", "http_path": "/health", "https_verify_certificate": false,
        "healthy": {"interval": 1, "successes": 1}, "unhealthy": {"interval": 1, "tcp_failures": 1}}});
    put(&w, "/routes/checked", json!({"uri": "/checked", "upstream": {"scheme": "https", "checks": checks,
        "nodes": {open.node(): 1, plain.node(): 1}}})).await;
    let mut last = json!(null);
    for _ in 0..60 {
        let (s, v) = w.control("healthcheck/routes/checked").await;
        if s == 200 {
            let status = |port: u16| v["nodes"].as_array().unwrap().iter().find(|n| n["port"] == port).map(|n| (n["status"].clone(), n["counter"].clone()));
            let (good, bad) = (status(open.port).unwrap(), status(plain.addr.port()).unwrap());
            if good.1["success"].as_u64() >= Some(1) && bad.0 == "unhealthy" {
                assert_eq!(good.0, "healthy");
                assert_eq!(plain.probes.load(std::sync::atomic::Ordering::SeqCst), 0, "no plain HTTP probe reached it");
                return;
            }
        }
        last = w.control("healthcheck/routes/checked").await.1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("https probes did not settle: {last}");
}

/// A node that answers each request with raw bytes picked by its path, so every way an
/// HTTP/1.1 response can be framed reaches the gateway exactly as written. It counts the
/// connections it accepts; the answers that allow keep-alive serve further requests.
async fn scripted_node() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    // The gateway sends these GETs without a body: a request ends with its head.
                    let end = loop {
                        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&got[..end]).to_string();
                    got.drain(..end);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let (answer, close): (&[u8], bool) = match path.as_str() {
                        "/length" => (b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nfixed length", false),
                        "/chunked" => (
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nin two\r\n7;x=y\r\n chunks\r\n0\r\nx-trailer: t\r\n\r\n",
                            false,
                        ),
                        "/interim" => (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal", false),
                        "/empty" => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
                        "/close" => (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the node closes", true),
                        "/http10" => (b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\nold one", true),
                        "/short" => (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nnot all of it", true),
                        // Offers keep-alive, then closes while the connection sits idle.
                        "/idle-close" => (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbye.", true),
                        _ => (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", false),
                    };
                    if s.write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

#[tokio::test]
async fn http1_framings_and_bodies_with_curl() {
    use std::sync::atomic::Ordering::SeqCst;
    let w = Weir::start();
    let (node, conns) = scripted_node().await;
    let up = Upstream::start("echo").await;
    put(&w, "/routes/raw", json!({"uri": "/raw/*", "upstream": {"nodes": {node.to_string(): 1}}, "plugins": {"proxy-rewrite": {"regex_uri": ["^/raw(/.*)", "$1"]}}})).await;
    put(&w, "/routes/echo", json!({"uri": "/echo", "upstream": {"nodes": {up.node(): 1}}})).await;
    w.until("/raw/length", &[], |r| r.status == 200).await;
    let base = format!("http://{}", w.proxy);
    let run = move |args: Vec<String>, path: &str| {
        let url = format!("{base}{path}");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&args, &url)
    };
    let ask = |path: &'static str| {
        let run = run.clone();
        tokio::task::spawn_blocking(move || run(vec!["-i".into()], path))
    };

    // Keep-alive answers: one pooled connection serves them all (and the readiness probe
    // before them), whatever their framing.
    for _ in 0..3 {
        for (path, status, body) in [
            ("/raw/length", 200, "fixed length"),
            ("/raw/chunked", 200, "in two chunks"),
            ("/raw/interim", 200, "final"),
            ("/raw/empty", 204, ""),
        ] {
            let (_, code, text) = ask(path).await.unwrap();
            assert_eq!(code, status, "{path}: {text}");
            let (_, got) = text.split_once("\r\n\r\n").unwrap();
            assert_eq!(got, body, "{path}");
            assert!(!text.contains("103"), "{path}: an interim answer reached the client: {text}");
        }
    }
    assert_eq!(conns.load(SeqCst), 1, "keep-alive answers share one upstream connection");

    // Answers that end the connection are served, and the connection is not reused.
    let before = conns.load(SeqCst);
    for _ in 0..2 {
        let (_, code, text) = ask("/raw/close").await.unwrap();
        assert_eq!((code, text.split_once("\r\n\r\n").unwrap().1), (200, "until the node closes"));
        let (_, code, text) = ask("/raw/http10").await.unwrap();
        assert_eq!((code, text.split_once("\r\n\r\n").unwrap().1), (200, "old one"));
    }
    // The pooled connection carries the first; it and each later one end with their answer.
    assert_eq!(conns.load(SeqCst) - before, 3, "a closing answer's connection is not reused");

    // A pooled connection the node closed while idle is not used for the next request, which
    // is not idempotent: it must not be lost or sent twice.
    assert_eq!(ask("/raw/idle-close").await.unwrap().1, 200);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let before = conns.load(SeqCst);
    let (_, code, _) = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run(vec!["-X".into(), "POST".into()], "/raw/length")
    })
    .await
    .unwrap();
    assert_eq!(code, 200);
    assert_eq!(conns.load(SeqCst) - before, 1, "the request went out on a new connection");

    // A body cut short reaches the client as a broken transfer, not as a complete answer.
    let out = tokio::task::spawn_blocking({
        let url = format!("http://{}/raw/short", w.proxy);
        move || Command::new("curl").args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"]).arg(url).output().unwrap()
    })
    .await
    .unwrap();
    // The head arrived (200); curl's exit 18 is "transfer closed with data remaining".
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(18), "curl saw a complete response: {}", String::from_utf8_lossy(&out.stderr));

    // Request bodies stream upstream: with a length, and chunked (no length known).
    let dir = std::env::temp_dir().join(format!("weir-bodies-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let payload: String = (0..300_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let file = dir.join("payload");
    std::fs::write(&file, &payload).unwrap();
    let at_file = format!("@{}", file.display());
    for extra in [vec![], vec!["-H".to_string(), "transfer-encoding: chunked".to_string()]] {
        let mut args = vec!["-X".to_string(), "POST".to_string(), "--data-binary".to_string(), at_file.clone()];
        args.extend(extra.clone());
        let run = run.clone();
        let (_, code, body) = tokio::task::spawn_blocking(move || run(args, "/echo")).await.unwrap();
        assert_eq!(code, 200, "{extra:?}");
        let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(seen["body"].as_str().map(str::len), Some(payload.len()), "{extra:?}");
        assert!(seen["body"] == payload.as_str(), "{extra:?}: the body arrived altered");
        let chunked = !extra.is_empty();
        assert_eq!(seen["headers"].get("transfer-encoding").is_some(), chunked, "{extra:?}: {}", seen["headers"]);
        assert_eq!(seen["headers"].get("content-length").is_some(), !chunked, "{extra:?}: {}", seen["headers"]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes `sent` on one connection and reads until the gateway closes it or `wait` passes
/// without a byte.
async fn raw_exchange(addr: std::net::SocketAddr, sent: &[&[u8]]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    for part in sent {
        s.write_all(part).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(std::time::Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn client_connections_in_raw_http1() {
    let w = Weir::start();
    let up = Upstream::start("echo").await;
    put(&w, "/routes/r", json!({"uri": "/*", "upstream": {"nodes": {up.node(): 1}}})).await;
    w.until("/x", &[], |r| r.status == 200).await;

    // Pipelined requests are answered in order on one connection; the last asks to close.
    let text = raw_exchange(w.proxy, &[b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"]).await;
    let one = text.find("\"uri\":\"/one\"").expect(&text);
    let two = text.find("\"uri\":\"/two\"").expect(&text);
    assert!(one < two, "{text}");
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.contains("date: "), "{text}");

    // A request with a body, between bodiless ones on the same connection, is served whole,
    // and so is the request after it.
    let text = raw_exchange(
        w.proxy,
        &[
            b"GET /before HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /with-body HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        ],
    )
    .await;
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text}");
    assert!(text.contains("\"body\":\"hello\""), "{text}");
    assert!(text.find("/before").unwrap() < text.find("/with-body").unwrap() && text.find("/with-body").unwrap() < text.find("/after").unwrap(), "{text}");

    // HEAD: the length of what GET would send, and no body.
    let text = raw_exchange(w.proxy, &[b"HEAD /h HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"]).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("content-length: "), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "a HEAD answer carried a body: {text}");

    // HTTP/1.0 is answered, and the connection closed after it.
    let text = raw_exchange(w.proxy, &[b"GET /old HTTP/1.0\r\nHost: a\r\n\r\n"]).await;
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n") || text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("\"uri\":\"/old\""), "{text}");

    // A head that does not parse gets a 400, not silence.
    let text = raw_exchange(w.proxy, &[b"GET /bad path HTTP/1.1\r\nHost: a\r\n\r\n"]).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");

    // A head that arrives in pieces is served once it is whole.
    let text = raw_exchange(w.proxy, &[b"GET /sl", b"ow HTTP/1.1\r\nHo", b"st: a\r\nConnection: close\r\n", b"\r\n"]).await;
    assert!(text.contains("\"uri\":\"/slow\""), "{text}");
}
