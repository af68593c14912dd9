//! Running Weir as an operator does: signals, listeners already taken, logs, backups.

mod common;

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use common::{KEY, Upstream, Weir, run_weir, send};
use serde_json::json;

async fn route_to(w: &Weir, up: &Upstream) {
    let (s, _) = w.admin("PUT", "/upstreams/u", Some(json!({"nodes": {up.node(): 1}}))).await;
    assert_eq!(s, 201);
    let (s, _) = w.admin("PUT", "/routes/r", Some(json!({"uri": "/*", "upstream_id": "u"}))).await;
    assert_eq!(s, 201);
    w.until("/", &[], |r| r.status == 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_request_in_flight_finish_then_exits_zero() {
    let up = Upstream::start("slow").await;
    let mut w = Weir::start();
    route_to(&w, &up).await;

    // A keep-alive connection that has served one request and now sits idle.
    let mut idle = std::net::TcpStream::connect(w.proxy).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));

    let proxy = w.proxy;
    let started = Instant::now();
    let slow = tokio::spawn(async move { send(proxy, "GET", "/sleep/3000", &[], None).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.signal("TERM");

    // The idle connection is closed, and nobody new gets in.
    let mut rest = Vec::new();
    let closed = idle.read_to_end(&mut rest);
    assert!(matches!(closed, Ok(0)) || closed.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset), "the idle connection is closed");
    assert!(started.elapsed() < Duration::from_secs(2), "at once, not when the slow request ends");
    let mut refused = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(proxy).is_err() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(refused, "new connections are refused while draining");

    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "the request in flight completes");
    assert!(started.elapsed() >= Duration::from_secs(3));
    let status = w.wait_exit(Duration::from_secs(10)).expect("weir exits after draining");
    assert_eq!(status.code(), Some(0), "{}", w.log());
    assert!(w.log().contains("stopping"), "{}", w.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_http2_connections_with_goaway() {
    use http_body_util::BodyExt as _;
    let up = Upstream::start("slow").await;
    let mut w = Weir::start();
    route_to(&w, &up).await;
    let stream = tokio::net::TcpStream::connect(w.proxy).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    let conn = tokio::spawn(conn);
    let proxy = w.proxy;
    let req = move |path: &str| {
        http::Request::builder().uri(format!("http://{proxy}{path}")).body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap()
    };
    let r = sender.send_request(req("/")).await.unwrap();
    assert_eq!((r.version(), r.status().as_u16()), (http::Version::HTTP_2, 200));

    let slow = tokio::spawn(sender.send_request(req("/sleep/2000")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.signal("TERM");
    let r = slow.await.unwrap().expect("the stream in flight is answered");
    assert_eq!(r.status(), 200);
    assert!(!r.into_body().collect().await.unwrap().to_bytes().is_empty());
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await.expect("the server ends the connection");
    assert!(ended.unwrap().is_ok(), "with GOAWAY, not an error");
    assert_eq!(w.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()), Some(0), "{}", w.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_an_open_websocket() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    // An echo server: what the client sends comes back.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(Message::Text(t))) = ws.next().await {
                    let _ = ws.send(Message::text(t.to_string())).await;
                }
            });
        }
    });
    let mut w = Weir::start();
    let (s, _) = w.admin("PUT", "/routes/ws", Some(json!({"uri": "/ws", "enable_websocket": true, "upstream": {"nodes": {echo.to_string(): 1}}}))).await;
    assert_eq!(s, 201);
    w.until("/ws", &[], |r| r.status != 404).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", w.proxy)).await.expect("handshake");
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));

    w.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(Message::text("while draining")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("while draining"), "the tunnel lives on");
    assert!(w.wait_exit(Duration::from_millis(10)).is_none(), "weir waits for it");
    ws.close(None).await.unwrap();
    drop(ws);
    assert_eq!(w.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()), Some(0), "then exits: {}", w.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_bounds_the_wait() {
    let up = Upstream::start("slow").await;
    let mut w = Weir::start();
    // The harness's config has no shutdown_timeout; give it one through SIGHUP, which applies
    // it live.
    let cfg = w.dir.path().join("weir.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}shutdown_timeout: 1\n")).unwrap();
    w.signal("HUP");
    for _ in 0..200 {
        if w.log().contains("re-read") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(w.log().contains("shutdown_timeout"), "{}", w.log());
    route_to(&w, &up).await;

    let proxy = w.proxy;
    let slow = tokio::spawn(async move {
        let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let mut stream = stream;
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET /sleep/10000 HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut out).await;
        out
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    w.signal("TERM");
    let status = w.wait_exit(Duration::from_secs(5)).expect("weir exits once shutdown_timeout passes");
    assert_eq!(status.code(), Some(0));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3), "{waited:?}: {}", w.log());
    assert!(slow.await.unwrap().is_empty(), "the request still in flight was cut");
    assert!(w.log().contains("shutdown_timeout reached"), "{}", w.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_exits_at_once() {
    let up = Upstream::start("slow").await;
    let mut w = Weir::start();
    route_to(&w, &up).await;
    let proxy = w.proxy;
    let _slow = tokio::spawn(async move {
        let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET /sleep/10000 HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut out).await;
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    w.signal("QUIT");
    let status = w.wait_exit(Duration::from_secs(5)).expect("weir exits");
    assert!(started.elapsed() < Duration::from_secs(2), "without waiting for the request in flight");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_config_and_names_what_needs_a_restart() {
    let w = Weir::start();
    let cfg = w.dir.path().join("weir.yaml");
    let original = std::fs::read_to_string(&cfg).unwrap();

    let log_until = |needle: &'static str| {
        let w = &w;
        async move {
            for _ in 0..300 {
                if w.log().contains(needle) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{needle} not logged: {}", w.log());
        }
    };

    // A file that does not parse changes nothing, and says so.
    std::fs::write(&cfg, format!("{original}no_such_key: 1\n")).unwrap();
    w.signal("HUP");
    log_until("the running config stays").await;
    assert!(w.log().contains("no_such_key"), "{}", w.log());

    // A change the process cannot apply while running is named; the level applies live.
    let changed = original.replace("workers: 1", "workers: 3");
    assert_ne!(changed, original);
    std::fs::write(&cfg, format!("{changed}log:\n  level: debug\n")).unwrap();
    w.signal("HUP");
    log_until("re-read").await;
    let log = w.log();
    assert!(log.contains("proxy.workers") && log.contains("restart"), "{log}");
    assert!(!log.contains("key=\"proxy.listen\"") && !log.contains("key=proxy.listen"), "unchanged keys are not named: {log}");
    assert!(log.contains("log.level"), "applied live: {log}");

    // Still serving, on the same listeners.
    assert_eq!(send(w.proxy, "GET", "/nothing", &[], None).await.status, 404);
    let (s, _) = w.admin("GET", "/routes", None).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_weir_on_a_taken_port_refuses_to_start() {
    let up = Upstream::start("first").await;
    let w = Weir::start();
    route_to(&w, &up).await;

    let dir = tempfile::tempdir().unwrap();
    let second = |proxy: std::net::SocketAddr, admin: std::net::SocketAddr, name: &str| {
        let cfg = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "proxy:\n  listen: [\"{proxy}\"]\n  workers: 2\nadmin:\n  listen: \"{admin}\"\n  keys:\n    - {{name: admin, key: \"{KEY}\", role: admin}}\nstore:\n  path: \"{}\"\nplugin_attr:\n  prometheus:\n    enable_export_server: false\n",
                dir.path().join(name).display()
            ),
        )
        .unwrap();
        run_weir(&["serve".as_ref(), "--config".as_ref(), cfg.as_os_str()], Duration::from_secs(10))
    };
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();

    let (status, _, stderr) = second(w.proxy, any, "proxy");
    assert!(!status.success());
    assert!(stderr.contains(&format!("weir: cannot listen on {}: ", w.proxy)), "{stderr}");
    let (status, _, stderr) = second(any, w.admin, "admin");
    assert!(!status.success());
    assert!(stderr.contains(&format!("weir: cannot listen on {}: ", w.admin)), "{stderr}");

    // The first keeps all the traffic.
    for _ in 0..20 {
        assert_eq!(w.get("/", &[]).await.status, 200);
    }
    let (s, _) = w.admin("GET", "/routes", None).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_a_fixed_port_and_restart_on_it() {
    // The check for a foreign listener must not stop our own workers from sharing a port, nor a
    // restart on the same port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("weir.yaml");
        std::fs::write(
            &cfg,
            format!(
                "proxy:\n  listen: [\"{port}\"]\n  workers: 3\nadmin:\n  listen: \"127.0.0.1:0\"\n  keys:\n    - {{name: admin, key: \"{KEY}\", role: admin}}\nstore:\n  path: \"{}\"\nplugin_attr:\n  prometheus:\n    enable_export_server: false\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let mut w = Weir::spawn(dir, &cfg, &[]);
        assert_eq!(w.proxy, port, "{}", w.log());
        for _ in 0..10 {
            assert_eq!(w.get("/", &[]).await.status, 404);
        }
        w.signal("TERM");
        assert_eq!(w.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()), Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_has_no_colours_off_a_terminal_and_can_be_json() {
    let w = Weir::start();
    let (s, _) = w.admin("GET", "/routes", None).await;
    assert_eq!(s, 200);
    let log = w.log();
    assert!(log.contains("config loaded"), "{log}");
    assert!(!log.contains('\u{1b}'), "no ANSI escapes when stderr is a file: {log:?}");

    let w = Weir::start_full(tempfile::tempdir().unwrap(), "", "", "log:\n  format: json\n  level: info\n");
    // "config loaded" may be written just after the node said it is ready.
    let mut log = w.log();
    for _ in 0..250 {
        if log.contains("config loaded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        log = w.log();
    }
    let lines: Vec<&str> = log.lines().collect();
    assert!(!lines.is_empty());
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["message"].is_string() && v["level"] == "INFO" && v["time"].is_string(), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_request() {
    let up = Upstream::start("logged").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let w = Weir::start_full(dir, "", "", &format!("access_log:\n  enabled: true\n  path: \"{}\"\n", path.display()));
    route_to(&w, &up).await;
    let r = w.get("/logged/here?a=1", &[]).await;
    assert_eq!(r.status, 200);
    let mut line = None;
    for _ in 0..300 {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("/logged/here")) {
            line = Some(l.to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let line = line.expect("the request is logged");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["remote_addr"], "127.0.0.1", "{line}");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["uri"], "/logged/here?a=1");
    assert_eq!(v["status"], 200);
    assert_eq!(v["route_id"], "r");
    assert_eq!(v["bytes"].as_u64(), Some(r.body.len() as u64), "{line}");
    assert!(v["request_time"].as_f64().is_some_and(|t| (0.0..5.0).contains(&t)), "{line}");
    assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");

}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_is_off_by_default_and_refused_admin_calls_are_logged() {
    let up = Upstream::start("quiet").await;
    let w = Weir::start();
    route_to(&w, &up).await;
    assert!(!w.log().contains("\"route_id\""));
    let r = send(w.admin, "GET", "/apisix/admin/routes", &[("x-api-key", "wrong-key-123")], None).await;
    assert_eq!(r.status, 401);
    for _ in 0..100 {
        if w.log().contains("admin call refused") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = w.log();
    let line = log.lines().find(|l| l.contains("admin call refused")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("client=127.0.0.1:"), "{line}");
    assert!(!line.contains("wrong-key-123"), "the key tried is not logged: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_while_serving_then_restore_into_the_stopped_node() {
    let up = Upstream::start("backed-up").await;
    let mut w = Weir::start();
    let (s, _) = w.admin("PUT", "/upstreams/u", Some(json!({"nodes": {up.node(): 1}}))).await;
    assert_eq!(s, 201);
    let (s, _) = w.admin("PUT", "/routes/secure", Some(json!({"uri": "/secure", "upstream_id": "u", "plugins": {"key-auth": {}}}))).await;
    assert_eq!(s, 201);
    let (s, _) = w.admin("PUT", "/consumers", Some(json!({"username": "ann"}))).await;
    assert_eq!(s, 201);
    let (s, body) = w.admin("PUT", "/consumers/ann/credentials/c1", Some(json!({"plugins": {"key-auth": {"key": "k-ann"}}}))).await;
    assert_eq!(s, 201, "{body}");
    w.until("/secure", &[("apikey", "k-ann")], |r| r.status == 200).await;
    let ck = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
    let ssl = json!({"cert": ck.cert.pem(), "key": ck.signing_key.serialize_pem(), "snis": ["a.test"]});
    let (s, body) = w.admin("PUT", "/ssls/1", Some(ssl)).await;
    assert_eq!(s, 201, "{body}");

    let cfg = w.dir.path().join("weir.yaml");
    // The config says port 0, so the node's actual address is given.
    let dump = |admin: std::net::SocketAddr| {
        let admin = admin.to_string();
        run_weir(&["dump".as_ref(), "--config".as_ref(), cfg.as_os_str(), "--admin".as_ref(), admin.as_ref()], Duration::from_secs(20))
    };
    let (status, backup, stderr) = dump(w.admin);
    assert!(status.success(), "dump while the node serves: {stderr}");
    let doc: serde_json::Value = serde_json::from_str(&backup).unwrap();
    let objects = doc["objects"].as_object().unwrap().clone();
    for key in ["upstreams/u", "routes/secure", "consumers/ann", "consumers/ann/credentials/c1", "ssls/1"] {
        assert!(objects.contains_key(key), "{key} in {backup}");
    }
    assert!(!backup.contains("PRIVATE KEY"), "private keys stay sealed in a backup");
    let file = w.dir.path().join("backup.json");
    std::fs::write(&file, &backup).unwrap();

    // A running node holds its store: restoring into it is refused, and changes nothing.
    let restore = |cfg: &std::path::Path| run_weir(&["restore".as_ref(), "--config".as_ref(), cfg.as_os_str(), file.as_os_str()], Duration::from_secs(20));
    let (status, _, stderr) = restore(&cfg);
    assert!(!status.success());
    assert!(stderr.contains("stop it first"), "{stderr}");

    // Stop, lose the store, restore it, start again.
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()), Some(0));
    let dir = std::mem::replace(&mut w.dir, tempfile::tempdir().unwrap());
    drop(w);
    std::fs::remove_file(dir.path().join("data").join("weir.redb")).unwrap();
    let (status, _, stderr) = restore(&cfg);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("restored 5 objects"), "{stderr}");

    let w = Weir::spawn(dir, &cfg, &[]);
    assert_eq!(w.get("/secure", &[]).await.status, 401, "the route and its plugin are back");
    assert_eq!(w.get("/secure", &[("apikey", "k-ann")]).await.status, 200, "and the credential");
    let (s, body) = w.admin("GET", "/ssls/1", None).await;
    assert_eq!((s, &body["value"]["snis"]), (200, &json!(["a.test"])), "and the certificate");
    let (status, again, _) = dump(w.admin);
    assert!(status.success());
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["objects"], serde_json::Value::Object(objects), "the same objects, byte for byte");

    // Without an admin key, no backup.
    let r = send(w.admin, "GET", "/apisix/admin/backup", &[("x-api-key", "not-a-key-000")], None).await;
    assert_eq!(r.status, 401);
}
