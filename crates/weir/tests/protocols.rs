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
