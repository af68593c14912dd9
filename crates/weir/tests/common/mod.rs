//! Test harness: a real `weir` process on loopback with a temporary store, a real upstream
//! HTTP server, and a small HTTP client over real sockets.
#![allow(dead_code)]

pub mod platform;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

pub const KEY: &str = "test-admin-key-0123";

pub struct Weir {
    child: Child,
    pub dir: tempfile::TempDir,
    pub proxy: SocketAddr,
    /// The TLS listener, when started with one.
    pub tls: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// The Prometheus exporter, when it listens.
    pub metrics: Option<SocketAddr>,
    /// The status API, when it listens.
    pub status: Option<SocketAddr>,
}

/// A `kB` field of process `pid`'s `/proc` status (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap()
}

impl Weir {
    pub fn start() -> Weir {
        Self::start_in(tempfile::tempdir().unwrap(), "")
    }

    /// Starts weir with its store in `dir`; `extra` is appended to the config's admin section.
    pub fn start_in(dir: tempfile::TempDir, extra_admin: &str) -> Weir {
        Self::start_with(dir, "", extra_admin)
    }

    /// Also listens for TLS.
    pub fn start_tls() -> Weir {
        Self::start_with(tempfile::tempdir().unwrap(), "  tls_listen: [\"127.0.0.1:0\"]\n", "")
    }

    /// `extra_proxy` and `extra_admin` are appended to those sections of the config.
    pub fn start_with(dir: tempfile::TempDir, extra_proxy: &str, extra_admin: &str) -> Weir {
        Self::start_full(dir, extra_proxy, extra_admin, "")
    }

    /// Started on another store: `kind` is `store.type`, `extra` more `store:` keys (indented).
    pub fn start_store(dir: tempfile::TempDir, kind: &str, extra: &str) -> Weir {
        Self::start_role(dir, "traditional", kind, extra)
    }

    /// Started in a deployment role (`traditional`, `control_plane`, `data_plane`) on a store,
    /// with the status API listening.
    pub fn start_role(dir: tempfile::TempDir, role: &str, kind: &str, extra: &str) -> Weir {
        let cfg = dir.path().join("weir.yaml");
        let data = dir.path().join("data");
        std::fs::write(
            &cfg,
            format!(
                "deployment:\n  role: {role}\nstatus:\n  listen: \"127.0.0.1:0\"\nproxy:\n  listen: [\"127.0.0.1:0\"]\n  workers: 1\nadmin:\n  listen: \"127.0.0.1:0\"\n  keys:\n    - {{name: admin, key: \"{KEY}\", role: admin}}\nstore:\n  type: {kind}\n  path: \"{}\"\n{extra}plugin_attr:\n  prometheus:\n    enable_export_server: false\ndata_encryption:\n  keyring: [\"a shared secret for tests\"]\n",
                data.display()
            ),
        )
        .unwrap();
        Self::spawn(dir, &cfg, &[])
    }

    /// As `start_with`, with more `plugin_attr` settings (YAML indented under `plugin_attr:`).
    pub fn start_full(dir: tempfile::TempDir, extra_proxy: &str, extra_admin: &str, extra_attr: &str) -> Weir {
        let cfg = dir.path().join("weir.yaml");
        let store = dir.path().join("data");
        std::fs::write(
            &cfg,
            format!(
                "proxy:\n  listen: [\"127.0.0.1:0\"]\n  workers: 1\n{extra_proxy}admin:\n  listen: \"127.0.0.1:0\"\n  keys:\n    - {{name: admin, key: \"{KEY}\", role: admin}}\n{extra_admin}store:\n  type: embedded\n  path: \"{}\"\nplugin_attr:\n  prometheus:\n    export_addr: {{ip: 127.0.0.1, port: 0}}\n{extra_attr}",
                store.display()
            ),
        )
        .unwrap();
        Self::spawn(dir, &cfg, &[])
    }

    pub fn spawn(dir: tempfile::TempDir, cfg: &Path, env: &[(&str, &str)]) -> Weir {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
        // Its log goes to a file beside the config, for tests that look for a logged error.
        let log = std::fs::File::create(dir.path().join("weir.log")).unwrap();
        cmd.arg("serve").arg("--config").arg(cfg).stdout(Stdio::piped()).stderr(log);
        cmd.env_remove("WEIR_ADMIN_KEY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("weir starts");
        let out = BufReader::new(child.stdout.take().unwrap());
        let (mut proxy, mut tls, mut admin, mut metrics, mut status) = (None, None, None, None, None);
        for line in out.lines() {
            let line = line.unwrap();
            if let Some(a) = line.strip_prefix("weir: proxy listening on http://") {
                proxy = Some(a.parse().unwrap());
            }
            if let Some(a) = line.strip_prefix("weir: proxy listening on https://") {
                tls = Some(a.parse().unwrap());
            }
            if let Some(a) = line.strip_prefix("weir: prometheus metrics on http://") {
                metrics = a.split_once('/').and_then(|(addr, _)| addr.parse().ok());
            }
            if let Some(a) = line.strip_prefix("weir: status listening on http://") {
                status = Some(a.parse().unwrap());
            }
            if let Some(a) = line.strip_prefix("weir: admin listening on http://") {
                admin = Some(a.parse().unwrap());
            }
            if line.starts_with("weir: ready") {
                break;
            }
        }
        // A control plane has no proxy and a data plane no Admin API: their addresses stay
        // unroutable (port 0), so a test that uses one fails at once.
        let none: SocketAddr = ([127, 0, 0, 1], 0).into();
        Weir { child, dir, proxy: proxy.unwrap_or(none), tls, admin: admin.unwrap_or(none), metrics, status }
    }

    /// The process id, to read its memory from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weir.log")).unwrap_or_default()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill9(mut self) -> tempfile::TempDir {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let headers = [("x-api-key", KEY)];
        let body = body.map(|b| b.to_string());
        let r = send(self.admin, method, &format!("/apisix/admin{path}"), &headers, body.as_deref()).await;
        (r.status, r.json())
    }

    /// `GET /v1/{path}` on the admin listener (the control API).
    pub async fn control(&self, path: &str) -> (u16, Value) {
        let r = send(self.admin, "GET", &format!("/v1/{path}"), &[("x-api-key", KEY)], None).await;
        (r.status, r.json())
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        send(self.proxy, "GET", path, headers, None).await
    }

    /// Polls the proxy until `check` holds (config changes apply asynchronously, in ms).
    pub async fn until(&self, path: &str, headers: &[(&str, &str)], check: impl Fn(&Resp) -> bool) -> Resp {
        for _ in 0..200 {
            let r = self.get(path, headers).await;
            if check(&r) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached for {path}");
    }
}

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        if self.body.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(&self.body).unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&self.body)}))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on a fresh connection.
pub async fn send(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path);
    let has_host = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host"));
    if !has_host {
        req = req.header("host", addr.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or("").to_string()))).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Resp { status, headers, body }
}

/// A real HTTP upstream. It answers with JSON describing the request it got, and the name it
/// was given, so tests can see what the gateway forwarded and to which node.
/// `/status/N` answers N; `/sleep/MS` (or `?sleep=MS`) waits first; `/health…` is a health
/// probe, counted apart. Dropping it closes the listener and every open connection.
pub struct Upstream {
    pub addr: SocketAddr,
    /// Requests other than health probes.
    pub hits: Arc<AtomicUsize>,
    /// Health probes (paths starting `/health`).
    pub probes: Arc<AtomicUsize>,
    /// Connections accepted.
    pub conns: Arc<AtomicUsize>,
    /// Added to every request's handling time, in ms.
    pub delay_ms: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(name: &'static str) -> Upstream {
        Self::start_at(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Listens on `addr`: pass a stopped upstream's address to bring it back.
    pub async fn start_at(name: &'static str, addr: SocketAddr) -> Upstream {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let probes = Arc::new(AtomicUsize::new(0));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (h, p, d) = (hits.clone(), probes.clone(), delay_ms.clone());
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        let task = tokio::spawn(async move {
            // Owned by this task, so stopping the upstream also drops its connections.
            let mut open = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                c.fetch_add(1, Ordering::SeqCst);
                let (h, p, d) = (h.clone(), p.clone(), d.clone());
                while open.try_join_next().is_some() {}
                open.spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (h, p, d) = (h.clone(), p.clone(), d.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let path = parts.uri.path().to_string();
                            if path.starts_with("/health") { &p } else { &h }.fetch_add(1, Ordering::SeqCst);
                            let delay = d.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let delay = path
                                .strip_prefix("/sleep/")
                                .or_else(|| parts.uri.query().and_then(|q| q.strip_prefix("sleep=")));
                            if let Some(ms) = delay {
                                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
                            }
                            let status = path.strip_prefix("/status/").and_then(|s| s.parse().ok()).unwrap_or(200u16);
                            let headers: HashMap<String, String> = parts
                                .headers
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                                .collect();
                            let out = json!({
                                "server": name,
                                "method": parts.method.as_str(),
                                "uri": parts.uri.to_string(),
                                "headers": headers,
                                "body": String::from_utf8_lossy(&body),
                            });
                            let mut resp = Response::new(Full::new(Bytes::from(out.to_string())));
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
                            resp.headers_mut().insert("x-upstream", name.parse().unwrap());
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Upstream { addr, hits, probes, conns, delay_ms, task }
    }

    pub fn node(&self) -> String {
        self.addr.to_string()
    }
}

/// A loopback port with nothing listening on it.
pub fn dead_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// A loopback address where a TCP connect hangs: a listener that never accepts, with its
/// backlog already full, so further SYNs are dropped. Keep the returned value alive.
pub fn hanging_port() -> (SocketAddr, socket2::Socket, Vec<std::net::TcpStream>) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    // Fill the accept queue; connects past it get no answer.
    for _ in 0..4 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fill.push(s),
            Err(_) => break,
        }
    }
    (addr, sock, fill)
}

/// A real `redis-server` on loopback, with its own temporary directory and no persistence;
/// stopped (by its PID) when dropped.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub async fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (Debian package redis-server)");
        let redis = Redis { child: Some(child), port, _dir: dir };
        for _ in 0..200 {
            if redis.ping().await {
                return redis;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("redis-server did not come up on port {port}");
    }

    async fn ping(&self) -> bool {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else { return false };
        if s.write_all(b"PING\r\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.is_ok() && &buf == b"+PONG\r\n"
    }

    /// Stops the server and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real single-member `etcd` on loopback ports, with its own temporary data directory;
/// stopped (by its PID) when dropped, and restartable on the same ports and data.
pub struct Etcd {
    child: Option<Child>,
    pub port: u16,
    peer: u16,
    dir: tempfile::TempDir,
}

impl Etcd {
    pub async fn start() -> Etcd {
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut e = Etcd { child: None, port: free(), peer: free(), dir: tempfile::tempdir().unwrap() };
        e.restart().await;
        e
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) and waits until it answers.
    pub async fn restart(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("etcd")
            .arg("--name").arg("weir-test")
            .arg("--data-dir").arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .arg("--initial-cluster").arg(format!("weir-test={peer}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd is installed (Debian package etcd-server)");
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                let r = send(addr, "GET", "/health", &[], None).await;
                if r.status == 200 && r.text().contains("true") {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("etcd did not come up on {client}");
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A call to etcd's JSON gateway (`/v3/...`), as `etcdctl` would make it.
    pub async fn v3(&self, path: &str, body: Value) -> Value {
        let r = send(([127, 0, 0, 1], self.port).into(), "POST", path, &[("content-type", "application/json")], Some(&body.to_string())).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        r.json()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Signals and exit, for tests of how the process stops.
impl Weir {
    /// Sends `signal` (`TERM`, `HUP`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status().unwrap().success();
        assert!(ok, "kill -{signal}");
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + limit;
        while std::time::Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

/// Runs `weir` with `args` until it exits (or `limit` passes: then it is killed and the test
/// fails); returns its exit status, stdout and stderr.
pub fn run_weir(args: &[&std::ffi::OsStr], limit: Duration) -> (std::process::ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .env_remove("WEIR_ADMIN_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("weir {args:?} did not exit; stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Keys and tokens minted by PyJWT (`tests/peers/jwt_tokens.py`), as JSON.
pub fn jwt_tokens() -> Value {
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/jwt_tokens.py"))
        .output()
        .expect("python3 runs (scripts/test puts a virtualenv with PyJWT on PATH)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}
