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
