//! Node health: one state per upstream node for the whole process, fed by active probes and by
//! real traffic (passive), with APISIX's counters and thresholds.
//!
//! A node starts healthy. Each failure of a kind (HTTP status, TCP, timeout) counts towards that
//! kind's threshold and clears the success count; each success counts towards `successes` and
//! clears the failure counts. Crossing a threshold flips the state. A threshold of 0 never trips.
//! Active probes are `tcp` (connect), `http` or `https` (`GET http_path`, status judged by the
//! lists of `healthy`/`unhealthy` statuses).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use weir_core::model::{ActiveCheck, Checks, PassiveCheck};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub success: u32,
    pub http_failure: u32,
    pub tcp_failure: u32,
    pub timeout_failure: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    HttpFailure,
    TcpFailure,
    Timeout,
}

/// When a node changes state; 0 disables a rule.
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    pub successes: u32,
    pub http_failures: u32,
    pub tcp_failures: u32,
    pub timeouts: u32,
}

pub struct NodeHealth {
    healthy: AtomicBool,
    counters: Mutex<Counters>,
}

impl Default for NodeHealth {
    fn default() -> Self {
        NodeHealth { healthy: AtomicBool::new(true), counters: Mutex::new(Counters::default()) }
    }
}

impl NodeHealth {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Counts one outcome. Returns the new state when it changed.
    pub fn report(&self, outcome: Outcome, t: &Thresholds) -> Option<bool> {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let healthy = self.is_healthy();
        let bump = |n: &mut u32| *n = n.saturating_add(1);
        let flip = match outcome {
            Outcome::Success => {
                bump(&mut c.success);
                c.http_failure = 0;
                c.tcp_failure = 0;
                c.timeout_failure = 0;
                !healthy && t.successes > 0 && c.success >= t.successes
            }
            failure => {
                c.success = 0;
                let (n, limit) = match failure {
                    Outcome::HttpFailure => (&mut c.http_failure, t.http_failures),
                    Outcome::TcpFailure => (&mut c.tcp_failure, t.tcp_failures),
                    _ => (&mut c.timeout_failure, t.timeouts),
                };
                bump(n);
                healthy && limit > 0 && *n >= limit
            }
        };
        if flip {
            self.healthy.store(!healthy, Ordering::Relaxed);
            return Some(!healthy);
        }
        None
    }

    /// APISIX's four states: a healthy node with failures counted is `mostly_healthy`, an
    /// unhealthy one with successes counted is `mostly_unhealthy`.
    pub fn status(&self) -> (&'static str, Counters) {
        let c = *self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let failing = c.http_failure + c.tcp_failure + c.timeout_failure > 0;
        let status = match (self.is_healthy(), failing, c.success > 0) {
            (true, false, _) => "healthy",
            (true, true, _) => "mostly_healthy",
            (false, _, false) => "unhealthy",
            (false, _, true) => "mostly_unhealthy",
        };
        (status, c)
    }
}

/// What real traffic says about a node.
pub struct Passive {
    healthy_statuses: Vec<u16>,
    unhealthy_statuses: Vec<u16>,
    thresholds: Thresholds,
}

impl Passive {
    pub fn new(p: &PassiveCheck) -> Passive {
        Passive {
            healthy_statuses: p.healthy.http_statuses.clone(),
            unhealthy_statuses: p.unhealthy.http_statuses.clone(),
            thresholds: Thresholds {
                successes: p.healthy.successes,
                http_failures: p.unhealthy.http_failures,
                tcp_failures: p.unhealthy.tcp_failures,
                timeouts: p.unhealthy.timeouts,
            },
        }
    }

    pub fn status(&self, node: &str, health: &NodeHealth, status: u16) {
        if self.unhealthy_statuses.contains(&status) {
            log_change(node, "passive", health.report(Outcome::HttpFailure, &self.thresholds));
        } else if self.healthy_statuses.contains(&status) {
            log_change(node, "passive", health.report(Outcome::Success, &self.thresholds));
        }
    }

    pub fn failure(&self, node: &str, health: &NodeHealth, outcome: Outcome) {
        log_change(node, "passive", health.report(outcome, &self.thresholds));
    }
}

fn log_change(node: &str, by: &str, change: Option<bool>) {
    match change {
        Some(true) => tracing::info!(node, by, "upstream node is healthy again"),
        Some(false) => tracing::warn!(node, by, "upstream node is unhealthy"),
        None => {}
    }
}

/// The checking an upstream asked for, as the report shows it.
pub fn check_type(checks: &Checks) -> &str {
    checks
        .active
        .as_ref()
        .map(|a| a.kind.as_str())
        .or_else(|| checks.passive.as_ref().map(|p| p.kind.as_str()))
        .unwrap_or("http")
}

/// One node as the active checker sees it.
pub struct Target {
    /// `host:port` dialled (the check's `port` replaces the node's).
    pub authority: String,
    /// Host header of an HTTP probe.
    pub host: String,
    pub health: Arc<NodeHealth>,
    /// A tenant's upstream: the target's name is resolved and checked before it is dialled,
    /// and a refused one fails its probe without a packet sent.
    pub reach: Option<crate::reach::Tenant>,
}

/// Probes every target on its own timer until dropped: dropping the checker stops its probes.
pub struct Checker {
    _tasks: JoinSet<()>,
}

impl Checker {
    /// Starts probing on the current tokio runtime; `None` outside one (nothing could run it).
    pub fn start(cfg: &ActiveCheck, targets: Vec<Target>) -> Option<Checker> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let cfg = Arc::new(cfg.clone());
        let mut tasks = JoinSet::new();
        for t in targets {
            tasks.spawn_on(probe_loop(cfg.clone(), t), &handle);
        }
        Some(Checker { _tasks: tasks })
    }
}

async fn probe_loop(cfg: Arc<ActiveCheck>, target: Target) {
    // `https` probes: one client config for the checker's life.
    let tls = (cfg.kind == "https").then(|| {
        weir_tls::client_config(cfg.https_verify_certificate, None, false).expect("a client config without a certificate builds")
    });
    let thresholds = Thresholds {
        successes: cfg.healthy.successes,
        http_failures: cfg.unhealthy.http_failures,
        tcp_failures: cfg.unhealthy.tcp_failures,
        timeouts: cfg.unhealthy.timeouts,
    };
    let timeout = Duration::try_from_secs_f64(cfg.timeout).unwrap_or(Duration::from_secs(1));
    loop {
        if let Some(outcome) = probe(&cfg, &target, tls.as_ref(), timeout).await {
            log_change(&target.authority, "active", target.health.report(outcome, &thresholds));
        }
        let secs = if target.health.is_healthy() { cfg.healthy.interval } else { cfg.unhealthy.interval };
        tokio::time::sleep(Duration::from_secs(secs.max(1))).await;
    }
}

/// One probe. `None` when the answer counts neither way (a status in neither list).
async fn probe(
    cfg: &ActiveCheck,
    target: &Target,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Option<Outcome> {
    let dial = async {
        match &target.reach {
            None => TcpStream::connect(&target.authority).await,
            Some(reach) => TcpStream::connect(&reach.resolve(&target.authority).await?[..]).await.and_then(|s| reach.connected(&s).map(|()| s)),
        }
    };
    let stream = match tokio::time::timeout(timeout, dial).await {
        Err(_) => return Some(Outcome::Timeout),
        Ok(Err(_)) => return Some(Outcome::TcpFailure),
        Ok(Ok(s)) => s,
    };
    if cfg.kind == "tcp" {
        return Some(Outcome::Success);
    }
    let exchange = async {
        match tls {
            None => http_status(cfg, target, stream).await,
            Some(config) => {
                let host = target.host.rsplit_once(':').map_or(target.host.as_str(), |(h, _)| h);
                let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
                    .map_err(std::io::Error::other)?;
                let stream = tokio_rustls::TlsConnector::from(config.clone()).connect(name, stream).await?;
                http_status(cfg, target, stream).await
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Some(Outcome::Timeout),
        Ok(Err(_)) => Some(Outcome::TcpFailure),
        Ok(Ok(status)) if cfg.healthy.http_statuses.contains(&status) => Some(Outcome::Success),
        Ok(Ok(status)) if cfg.unhealthy.http_statuses.contains(&status) => Some(Outcome::HttpFailure),
        Ok(Ok(_)) => None,
    }
}

/// Sends `GET http_path` and reads the status code off the response's first line.
async fn http_status<S: AsyncRead + AsyncWrite + Unpin>(cfg: &ActiveCheck, target: &Target, mut stream: S) -> std::io::Result<u16> {
    let mut req = format!("GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: weir-healthcheck\r\nConnection: close\r\n", cfg.http_path, target.host);
    for h in &cfg.req_headers {
        req.push_str(h.trim_end());
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    parse_status_line(&buf).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP status line"))
}

fn parse_status_line(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_ascii_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_flip_the_state() {
        let h = NodeHealth::default();
        let t = Thresholds { successes: 2, http_failures: 3, tcp_failures: 2, timeouts: 0 };
        assert_eq!(h.report(Outcome::TcpFailure, &t), None);
        assert_eq!(h.status().0, "mostly_healthy");
        assert_eq!(h.report(Outcome::TcpFailure, &t), Some(false));
        assert_eq!(h.status(), ("unhealthy", Counters { tcp_failure: 2, ..Counters::default() }));
        assert_eq!(h.report(Outcome::Success, &t), None);
        assert_eq!(h.status().0, "mostly_unhealthy");
        assert_eq!(h.report(Outcome::Success, &t), Some(true));
        assert_eq!(h.status(), ("healthy", Counters { success: 2, ..Counters::default() }));
        // A success in between clears the failure count; a zero threshold never trips.
        for _ in 0..2 {
            h.report(Outcome::HttpFailure, &t);
        }
        h.report(Outcome::Success, &t);
        for _ in 0..2 {
            assert_eq!(h.report(Outcome::HttpFailure, &t), None);
        }
        for _ in 0..100 {
            assert_eq!(h.report(Outcome::Timeout, &t), None);
        }
        assert!(h.is_healthy());
    }

    #[test]
    fn passive_counts_only_listed_statuses() {
        let p = Passive::new(&PassiveCheck::default());
        let h = NodeHealth::default();
        for _ in 0..4 {
            p.status("n", &h, 500);
            p.status("n", &h, 404);
        }
        assert!(h.is_healthy(), "404 is in neither list");
        p.status("n", &h, 503);
        assert!(!h.is_healthy(), "5 listed failures");
        for _ in 0..5 {
            p.status("n", &h, 200);
        }
        assert!(h.is_healthy());
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503\r\n"), Some(503));
        assert_eq!(parse_status_line(b"SSH-2.0\r\n"), None);
    }
}
