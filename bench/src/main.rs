//! `weir-bench`: Weir side by side with nginx on this machine.
//!
//! Layout on a 2-core machine: the proxy under test (nginx or Weir, one worker) is pinned to
//! one core; the origin (nginx serving a fixed body) and the load generator (wrk) share the
//! other. Every row is measured the same way, so the ratios compare like with like.
//!
//! Rows: the origin served directly (the ceiling), nginx as a reverse proxy, Weir with one route,
//! Weir with 10,000 routes, Weir with key-auth, limit-count and prometheus on the route, both proxies over HTTPS (wrk, keep-alive) and over HTTP/2 with TLS
//! (h2load, 10 streams per connection), and the time from an Admin API PUT to the first request
//! served by the new route, and the memory an idle keep-alive client connection costs each proxy.
//!
//! Other modes, each instead of the comparison: `--soak SECONDS` (soak.rs), `--platform N`
//! (platform.rs), `--functions N` (functions.rs), `--database N` (database.rs: the embedded
//! engine and PostgreSQL, a server of its own unless `--database-url` names one) and
//! `--grants N` (grants.rs: a function behind key-auth with N grants against auth off).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

mod database;
mod functions;
mod grants;
mod platform;
mod soak;

#[derive(Parser)]
#[command(about = "Benchmark Weir against nginx on this machine")]
struct Args {
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrent connections of wrk.
    #[arg(long, default_value_t = 50)]
    connections: u32,
    /// Routes in the large-table row.
    #[arg(long, default_value_t = 10_000)]
    routes: usize,
    /// Admin PUTs timed in the PUT-to-live row.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// The weir binary (built with --release).
    #[arg(long, default_value = "target/release/weir")]
    weir: PathBuf,
    /// Core the proxy under test is pinned to; origin and wrk get the others.
    #[arg(long, default_value_t = 1)]
    proxy_core: usize,
    /// Rounds of (nginx, weir, weir with many routes), interleaved; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Instead of the comparison, a soak of this many seconds: mixed traffic through one Weir
    /// while its config churns, reporting its memory over time and every unexpected answer.
    #[arg(long)]
    soak: Option<u64>,
    /// Another weir binary (the one before a change, say) measured in the same rounds on the
    /// same core: the plain, large-table and plugin rows side by side.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Instead of the comparison, the platform rows with this many gateways: a request to one
    /// gateway among them against one alone, and the time from creating a gateway to serving.
    #[arg(long)]
    platform: Option<usize>,
    /// Instead of the comparison, the cloud function rows: a hello-world function against
    /// Node's `http`, one function against this many in one gateway, save to live (one node
    /// and two on etcd), first call against warm, memory per idle function.
    #[arg(long)]
    functions: Option<usize>,
    /// Instead of the comparison, the database rows: a function doing an indexed `findOne` in a
    /// collection of this many documents, and one doing `insertOne`, on the embedded engine and
    /// on PostgreSQL (the server at `--database-url`, else one of its own when PostgreSQL is
    /// installed).
    #[arg(long)]
    database: Option<usize>,
    /// A PostgreSQL server (`postgres://...`) for the database rows' second engine, instead of
    /// starting one.
    #[arg(long)]
    database_url: Option<String>,
    /// Instead of the comparison, the grants rows: a function behind key-auth in a gateway whose
    /// dev environment has this many grants (one application each), against the same function
    /// with auth off, and the time to create the grants.
    #[arg(long)]
    grants: Option<usize>,
}

const ORIGIN_PORT: u16 = 18080;
const NGINX_PROXY_PORT: u16 = 18081;
const NGINX_TLS_PORT: u16 = 18091;
/// Weir's TLS listener is its plain port plus this.
const TLS_OFFSET: u16 = 10;
/// The name the TLS rows ask for (h2load connects to 127.0.0.1 and sends it as SNI).
const TLS_NAME: &str = "bench.local";
const KEY: &str = "bench-admin-key";

struct Proc(Child, &'static str);

impl Drop for Proc {
    fn drop(&mut self) {
        // Stopped by PID; nginx's master takes its workers with it on SIGTERM.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
        eprintln!("stopped {}", self.1);
    }
}

fn other_cores(proxy_core: usize) -> String {
    let n = std::thread::available_parallelism().map_or(2, |n| n.get());
    let others: Vec<String> = (0..n).filter(|c| *c != proxy_core).map(|c| c.to_string()).collect();
    if others.is_empty() { proxy_core.to_string() } else { others.join(",") }
}

fn nginx(dir: &Path, name: &'static str, body: &str, core: &str) -> anyhow::Result<Proc> {
    let conf = dir.join(format!("{name}.conf"));
    std::fs::create_dir_all(dir.join("logs"))?;
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\npid {pid};\nerror_log {dir}/logs/{name}.err warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;\n  \
             fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;\n  \
             keepalive_requests 1000000;\n{body}\n}}\n",
            pid = dir.join(format!("{name}.pid")).display(),
            dir = dir.display(),
        ),
    )?;
    let child = Command::new("taskset")
        .args(["-c", core, "nginx", "-p"])
        .arg(dir)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting nginx (apt-get install -y nginx)")?;
    Ok(Proc(child, name))
}

/// The origin every proxy under test forwards to: nginx answering a fixed body, on `cores`.
fn origin(dir: &Path, cores: &str) -> anyhow::Result<Proc> {
    nginx(
        &dir.join("origin"),
        "origin",
        &format!("  server {{ listen 127.0.0.1:{ORIGIN_PORT} reuseport; location / {{ return 200 \"hello from the origin\\n\"; }} }}"),
        cores,
    )
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..500 {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("nothing listens on {port}")
}

/// A minimal HTTP/1.1 exchange on a fresh connection: (status, body).
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: bench.local\r\nX-API-KEY: {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.get(9..12).and_then(|c| c.parse().ok()).context("malformed response")?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

#[derive(Clone)]
struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU time the proxy spent per request, in microseconds (user + system).
    cpu_us: Option<f64>,
    /// The share of its one core the load generator used: near 1, the figure is the client's
    /// ceiling rather than the server's.
    client_busy: f64,
}

/// CPU seconds used so far by a process and its children's tasks (nginx's workers are children
/// of its master; Weir is one process).
fn cpu_seconds(pid: u32) -> f64 {
    let mut pids = vec![pid];
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        pids.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
    }
    let ticks = 100.0; // USER_HZ on Linux
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|stat| {
            // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            (ut + st) / ticks
        })
        .sum()
}

/// CPU seconds this process's children used, counting only those that ended and were waited
/// for: the servers run on, so across one `output()` of the load generator this grows by the
/// generator's own time.
fn waited_children_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the parenthesised command name; cutime and cstime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (field(13) + field(14)) / 100.0 // USER_HZ on Linux
}

/// Resident memory of a process and its children (nginx's workers), in KiB.
fn rss_kib(pid: u32) -> u64 {
    let mut pids = vec![pid];
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        pids.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
    }
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()))
        .sum()
}

/// What one idle keep-alive client connection costs a proxy: `n` connections each serve one
/// request and then stay open; the proxy's resident memory before and after, per connection,
/// in KiB.
fn idle_cost(port: u16, pid: u32, n: usize, path: &str) -> anyhow::Result<f64> {
    let before = rss_kib(pid);
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: bench.local\r\n\r\n")?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // The origin's answer ends with its body's newline.
        while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"\n") && !got.ends_with(b"\r\n")) {
            let k = s.read(&mut buf)?;
            if k == 0 {
                bail!("connection closed before the response on port {port}");
            }
            got.extend_from_slice(&buf[..k]);
        }
        open.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_kib(pid);
    drop(open);
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

fn parse_ms(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        _ => return None,
    })
}

fn wrk(args: &Args, port: u16, path: &str, proxy_pid: Option<u32>) -> anyhow::Result<WrkResult> {
    wrk_url(args, &format!("http://127.0.0.1:{port}{path}"), proxy_pid, &[])
}

/// `headers` are `name: value` lines sent with every request.
fn wrk_url(args: &Args, url: &str, proxy_pid: Option<u32>, headers: &[&str]) -> anyhow::Result<WrkResult> {
    let url = url.to_string();
    let header_args: Vec<String> = headers.iter().flat_map(|h| ["-H".to_string(), h.to_string()]).collect();
    let cores = other_cores(args.proxy_core);
    // Warm up pools and caches first.
    Command::new("taskset").args(["-c", &cores, "wrk", "-t1", "-c16", "-d2s"]).args(&header_args).arg(&url).output()?;
    let cpu_before = proxy_pid.map(cpu_seconds);
    let client_before = waited_children_cpu_seconds();
    let out = Command::new("taskset")
        .args(["-c", &cores, "wrk", "-t1", &format!("-c{}", args.connections), &format!("-d{}s", args.duration), "--latency"])
        .args(&header_args)
        .arg(&url)
        .output()
        .context("running wrk (apt-get install -y wrk)")?;
    let cpu_used = proxy_pid.zip(cpu_before).map(|(p, b)| cpu_seconds(p) - b);
    let client_used = waited_children_cpu_seconds() - client_before;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = WrkResult { rps: 0.0, p50_ms: f64::NAN, p99_ms: f64::NAN, cpu_us: None, client_busy: client_used / args.duration as f64 };
    let mut requests = 0.0;
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        match t.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => r.p50_ms = parse_ms(v).unwrap_or(f64::NAN),
            ["99%", v] => r.p99_ms = parse_ms(v).unwrap_or(f64::NAN),
            ["Non-2xx", ..] => bail!("wrk saw errors against {url}:\n{text}"),
            [n, "requests", "in", ..] => requests = n.parse().unwrap_or(0.0),
            _ => {}
        }
    }
    if r.rps == 0.0 {
        bail!("wrk produced no result for {url}:\n{text}");
    }
    if requests > 0.0 {
        r.cpu_us = cpu_used.map(|c| c * 1e6 / requests);
    }
    Ok(r)
}

/// HTTP/2 over TLS with h2load: one client thread, `connections` connections, 10 streams each.
/// h2load reports no percentiles; the latency columns stay empty.
fn h2load(args: &Args, port: u16, path: &str, proxy_pid: Option<u32>) -> anyhow::Result<WrkResult> {
    let url = format!("https://{TLS_NAME}:{port}{path}");
    let target = format!("127.0.0.1:{port}");
    let cores = other_cores(args.proxy_core);
    let run = |secs: u64, conns: u32| {
        Command::new("taskset")
            .args(["-c", &cores, "h2load", "-t1", "-m10", &format!("-c{conns}"), &format!("-D{secs}")])
            .arg(format!("--connect-to={target}"))
            .arg(&url)
            .output()
            .context("running h2load (apt-get install -y nghttp2-client)")
    };
    run(2, 16)?;
    let cpu_before = proxy_pid.map(cpu_seconds);
    let client_before = waited_children_cpu_seconds();
    let out = run(args.duration, args.connections)?;
    let cpu_used = proxy_pid.zip(cpu_before).map(|(p, b)| cpu_seconds(p) - b);
    let client_used = waited_children_cpu_seconds() - client_before;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = WrkResult { rps: 0.0, p50_ms: f64::NAN, p99_ms: f64::NAN, cpu_us: None, client_busy: client_used / args.duration as f64 };
    let mut done = 0.0;
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        match t.as_slice() {
            ["finished", "in", _, rps, "req/s,", ..] => r.rps = rps.parse().unwrap_or(0.0),
            ["requests:", _, "total,", _, "started,", n, "done,", ok, "succeeded,", failed, "failed,", ..] => {
                if *failed != "0" || ok != n {
                    bail!("h2load saw failures against {url}:\n{text}");
                }
                done = n.parse().unwrap_or(0.0);
            }
            _ => {}
        }
    }
    if r.rps == 0.0 || done == 0.0 {
        bail!("h2load produced no result for {url}:\n{text}");
    }
    r.cpu_us = cpu_used.map(|c| c * 1e6 / done);
    Ok(r)
}

/// A self-signed ECDSA certificate for both proxies' TLS rows, made with the openssl CLI.
fn make_cert(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("bench.crt"), dir.join("bench.key"));
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={TLS_NAME}"), "-addext", &format!("subjectAltName=DNS:{TLS_NAME},IP:127.0.0.1")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .context("running openssl")?
        .success();
    if !ok {
        bail!("openssl could not make a certificate");
    }
    Ok((cert, key))
}

struct Weir {
    proc: Proc,
    port: u16,
    admin: u16,
}

impl Weir {
    /// Starts weir on `port` (admin on `port + 1`, TLS on `port + TLS_OFFSET`), pinned to the
    /// proxy core.
    fn start(args: &Args, bin: &Path, dir: &Path, port: u16) -> anyhow::Result<Weir> {
        Self::start_with(args, bin, dir, port, "")
    }

    /// As `start`, with `extra` appended to the config (top-level YAML sections).
    fn start_with(args: &Args, bin: &Path, dir: &Path, port: u16, extra: &str) -> anyhow::Result<Weir> {
        let store = format!("store:\n  type: embedded\n  path: \"{}\"\n", dir.join("data").display());
        Self::start_store(args, bin, dir, port, &format!("{store}{extra}"))
    }

    /// As `start`, with `extra` appended to the config: its `store:` section among others.
    fn start_store(args: &Args, bin: &Path, dir: &Path, port: u16, extra: &str) -> anyhow::Result<Weir> {
        std::fs::create_dir_all(dir)?;
        let admin = port + 1;
        let cfg = dir.join("weir.yaml");
        std::fs::write(
            &cfg,
            format!(
                "proxy:\n  listen: [\"127.0.0.1:{port}\"]\n  tls_listen: [\"127.0.0.1:{}\"]\n  tls_fallback_sni: {TLS_NAME}\n  workers: 1\nadmin:\n  listen: \"127.0.0.1:{admin}\"\n  keys:\n    - {{name: bench, key: \"{KEY}\", role: admin}}\nplugin_attr:\n  prometheus:\n    enable_export_server: false\n{extra}",
                port + TLS_OFFSET,
            ),
        )?;
        let child = Command::new("taskset")
            .args(["-c", &args.proxy_core.to_string()])
            .arg(bin)
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn,rustls=error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} (cargo build --release)", bin.display()))?;
        let mut proc = Proc(child, "weir");
        let mut out = BufReader::new(proc.0.stdout.take().expect("piped")).lines();
        for line in out.by_ref() {
            if line?.starts_with("weir: ready") {
                // Whatever it prints later is read and dropped, so its stdout never closes.
                std::thread::spawn(move || out.for_each(drop));
                return Ok(Weir { proc, port, admin });
            }
        }
        bail!("weir exited before it was ready")
    }

    /// The upstream and the route every row asks for.
    fn put_target(&self) -> anyhow::Result<()> {
        // As in the nginx proxy: upstream connections are not retired after 1,000 requests.
        self.put(
            "upstreams/origin",
            &format!("{{\"type\":\"roundrobin\",\"nodes\":{{\"127.0.0.1:{ORIGIN_PORT}\":1}},\"keepalive_pool\":{{\"requests\":1000000}}}}"),
        )?;
        self.put("routes/target", "{\"uri\":\"/svc/7777/*\",\"upstream_id\":\"origin\"}")
    }

    /// The plugin row: key-auth, a local limit-count high enough never to refuse, and
    /// prometheus, on `/plug/*`.
    fn put_plugins(&self) -> anyhow::Result<()> {
        self.put("consumers/bench", "{\"username\":\"bench\",\"plugins\":{\"key-auth\":{\"key\":\"bench-key\"}}}")?;
        self.put(
            "routes/plugins",
            "{\"uri\":\"/plug/*\",\"upstream_id\":\"origin\",\"plugins\":{\"key-auth\":{},\
             \"limit-count\":{\"count\":1000000000,\"time_window\":60},\"prometheus\":{}}}",
        )
    }

    /// `routes` routes in all (the target among them), live once this returns.
    fn put_table(&self, routes: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        for i in 0..routes {
            if i != 7777 {
                self.put(&format!("routes/bulk-{i}"), &format!("{{\"uri\":\"/svc/{i}/*\",\"upstream_id\":\"origin\"}}"))?;
            }
        }
        eprintln!("created {routes} routes in {:.1}s", started.elapsed().as_secs_f64());
        let last = format!("/svc/{}/x", routes - 1);
        while http(self.port, "GET", &last, None)?.0 != 200 {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn put(&self, path: &str, body: &str) -> anyhow::Result<()> {
        let (s, b) = http(self.admin, "PUT", &format!("/apisix/admin/{path}"), Some(body))?;
        if s != 200 && s != 201 {
            bail!("PUT {path}: {s} {b}");
        }
        Ok(())
    }

    /// From sending the PUT to the first 200 from the proxy for the new route.
    fn put_to_live(&self, changes: usize, tag: &str) -> anyhow::Result<(f64, f64)> {
        // Each PUT waits for its write to reach the disk. Dirty pages left by whatever ran
        // before (the build of the binary under test writes gigabytes) are flushed first, so
        // their writeback is not timed as Weir's.
        let synced = Command::new("sync").status()?;
        if !synced.success() {
            bail!("sync: {synced}");
        }
        let mut times = Vec::with_capacity(changes);
        for i in 0..changes {
            let path = format!("/live-{tag}-{i}");
            let started = Instant::now();
            self.put(&format!("routes/live-{tag}-{i}"), &format!("{{\"uri\":\"{path}\",\"upstream_id\":\"origin\"}}"))?;
            loop {
                if http(self.port, "GET", &path, None)?.0 == 200 {
                    break;
                }
                if started.elapsed() > Duration::from_secs(5) {
                    bail!("route {path} never went live");
                }
            }
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok((percentile(&times, 0.5), percentile(&times, 0.99)))
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn row(name: &str, r: &WrkResult, base: Option<&WrkResult>) {
    let ratio = base.map_or(String::new(), |b| format!("{:.2}x", r.rps / b.rps));
    let (cpu, per_core) = match r.cpu_us {
        Some(c) if c > 0.0 => (format!("{c:.1}"), format!("{:.0}", 1e6 / c)),
        _ => ("-".into(), "-".into()),
    };
    let core_ratio = match (r.cpu_us, base.and_then(|b| b.cpu_us)) {
        (Some(c), Some(b)) if c > 0.0 => format!("{:.2}x", b / c),
        _ => String::new(),
    };
    let ms = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.3}") };
    println!(
        "{name:<28} {:>9.0} {:>8} {:>8} {ratio:>7} {cpu:>9} {per_core:>10} {core_ratio:>7}",
        r.rps,
        ms(r.p50_ms),
        ms(r.p99_ms)
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The median of each figure over the rounds (each figure on its own).
fn median_result(rs: &[WrkResult]) -> WrkResult {
    WrkResult {
        rps: median(rs.iter().map(|r| r.rps).collect()),
        p50_ms: median(rs.iter().map(|r| r.p50_ms).collect()),
        p99_ms: median(rs.iter().map(|r| r.p99_ms).collect()),
        cpu_us: rs.iter().map(|r| r.cpu_us).collect::<Option<Vec<_>>>().map(median),
        client_busy: median(rs.iter().map(|r| r.client_busy).collect()),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(secs) = args.soak {
        return soak::run(&args, secs);
    }
    if let Some(n) = args.platform {
        return platform::run(&args, n);
    }
    if let Some(n) = args.functions {
        return functions::run(&args, n);
    }
    if let Some(n) = args.database {
        return database::run(&args, n);
    }
    if let Some(n) = args.grants {
        return grants::run(&args, n);
    }
    let dir = tempfile_dir()?;
    let other = other_cores(args.proxy_core);
    let proxy_core = args.proxy_core.to_string();

    let _origin = origin(&dir, &other)?;
    let (cert, key) = make_cert(&dir)?;
    let location = "location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; \
        proxy_set_header Host $host; proxy_set_header X-Real-IP $remote_addr; \
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }";
    let nginx_proxy = nginx(
        &dir.join("nginx-proxy"),
        "nginx-proxy",
        &format!(
            "  upstream origin {{ server 127.0.0.1:{ORIGIN_PORT}; keepalive 320; keepalive_requests 1000000; }}\n  \
             server {{ listen 127.0.0.1:{NGINX_PROXY_PORT}; {location} }}\n  \
             server {{ listen 127.0.0.1:{NGINX_TLS_PORT} ssl http2; ssl_certificate {}; ssl_certificate_key {}; \
             {location} }}",
            cert.display(),
            key.display()
        ),
        &proxy_core,
    )?;
    // Two Weir processes on the same core, measured in turn: one with a single route, one with
    // the large route table.
    let small = Weir::start(&args, &args.weir, &dir.join("weir-small"), 18082)?;
    let large = Weir::start(&args, &args.weir, &dir.join("weir-large"), 18084)?;
    for p in [ORIGIN_PORT, NGINX_PROXY_PORT, NGINX_TLS_PORT] {
        wait_port(p)?;
    }
    let target = "/svc/7777/items";
    for w in [&small, &large] {
        w.put_target()?;
    }
    let ssl = serde_json::json!({
        "cert": std::fs::read_to_string(&cert)?,
        "key": std::fs::read_to_string(&key)?,
        "snis": [TLS_NAME],
    });
    small.put("ssls/bench", &ssl.to_string())?;
    small.put_plugins()?;

    let (p50, p99) = large.put_to_live(args.changes, "small")?;
    let live_small = format!("PUT-to-live over {} changes (few routes): p50 {p50:.2} ms, p99 {p99:.2} ms", args.changes);
    large.put_table(args.routes)?;
    let (p50k, p99k) = large.put_to_live(args.changes, "large")?;
    // The baseline gets the same routes, and is measured in the same rounds.
    let baseline = match &args.baseline {
        Some(bin) => {
            let (small, large) = (Weir::start(&args, bin, &dir.join("base-small"), 18086)?, Weir::start(&args, bin, &dir.join("base-large"), 18088)?);
            for w in [&small, &large] {
                w.put_target()?;
            }
            small.put_plugins()?;
            large.put_table(args.routes)?;
            Some((small, large))
        }
        None => None,
    };

    println!(
        "Weir benchmark: proxy pinned to core {proxy_core}, origin and wrk on {other}; wrk -t1 -c{} -d{}s; median of {} interleaved rounds",
        args.connections, args.duration, args.rounds
    );
    println!("req/s is bounded by the core that wrk and the origin share; CPU per request is the proxy's own cost.");
    println!(
        "{:<28} {:>9} {:>8} {:>8} {:>7} {:>9} {:>10} {:>7}",
        "", "req/s", "p50 ms", "p99 ms", "ratio", "cpu us/req", "req/s/core", "ratio"
    );
    let origin = wrk(&args, ORIGIN_PORT, target, None)?;
    row("origin direct (ceiling)", &origin, None);
    let (mut n_runs, mut s_runs, mut l_runs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut nt_runs, mut wt_runs, mut nh_runs, mut wh_runs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut p_runs = Vec::new();
    let (mut bs_runs, mut bl_runs, mut bp_runs) = (Vec::new(), Vec::new(), Vec::new());
    let (nginx_pid, small_pid) = (nginx_proxy.0.id(), small.proc.0.id());
    let small_tls = small.port + TLS_OFFSET;
    for round in 1..=args.rounds {
        n_runs.push(wrk(&args, NGINX_PROXY_PORT, target, Some(nginx_pid))?);
        s_runs.push(wrk(&args, small.port, target, Some(small_pid))?);
        l_runs.push(wrk(&args, large.port, target, Some(large.proc.0.id()))?);
        // Each round's plain-proxy figures, so the spread behind the medians can be seen.
        let cpu = |r: &WrkResult| r.cpu_us.map_or("-".to_string(), |c| format!("{c:.1}"));
        let (n, s, l) = (&n_runs[round - 1], &s_runs[round - 1], &l_runs[round - 1]);
        eprintln!(
            "round {round}: nginx {:.0} req/s ({} us), weir {:.0} req/s ({} us), weir with {} routes {:.0} req/s ({} us)",
            n.rps,
            cpu(n),
            s.rps,
            cpu(s),
            args.routes,
            l.rps,
            cpu(l)
        );
        let plug = format!("http://127.0.0.1:{}/plug/items", small.port);
        p_runs.push(wrk_url(&args, &plug, Some(small_pid), &["apikey: bench-key"])?);
        eprintln!("round {round}: weir with plugins {:.0} req/s ({} us)", p_runs[round - 1].rps, cpu(&p_runs[round - 1]));
        if let Some((bs, bl)) = &baseline {
            bs_runs.push(wrk(&args, bs.port, target, Some(bs.proc.0.id()))?);
            bl_runs.push(wrk(&args, bl.port, target, Some(bl.proc.0.id()))?);
            let plug = format!("http://127.0.0.1:{}/plug/items", bs.port);
            bp_runs.push(wrk_url(&args, &plug, Some(bs.proc.0.id()), &["apikey: bench-key"])?);
            let (b, bl) = (&bs_runs[round - 1], &bl_runs[round - 1]);
            let bp = &bp_runs[round - 1];
            eprintln!(
                "round {round}: baseline {:.0} req/s ({} us), baseline with {} routes {:.0} req/s ({} us), baseline with plugins {:.0} req/s ({} us)",
                b.rps,
                cpu(b),
                args.routes,
                bl.rps,
                cpu(bl),
                bp.rps,
                cpu(bp)
            );
        }
        nt_runs.push(wrk_url(&args, &format!("https://127.0.0.1:{NGINX_TLS_PORT}{target}"), Some(nginx_pid), &[])?);
        wt_runs.push(wrk_url(&args, &format!("https://127.0.0.1:{small_tls}{target}"), Some(small_pid), &[])?);
        nh_runs.push(h2load(&args, NGINX_TLS_PORT, target, Some(nginx_pid))?);
        wh_runs.push(h2load(&args, small_tls, target, Some(small_pid))?);
    }
    let (nginx, one, many) = (median_result(&n_runs), median_result(&s_runs), median_result(&l_runs));
    row("nginx reverse proxy", &nginx, Some(&nginx));
    row("weir, 1 route", &one, Some(&nginx));
    row(&format!("weir, {} routes", args.routes), &many, Some(&nginx));
    let plugged = median_result(&p_runs);
    row("weir, key-auth+limit-count+prometheus", &plugged, Some(&nginx));
    let compared = (!bs_runs.is_empty()).then(|| {
        let (b1, bm, bp) = (median_result(&bs_runs), median_result(&bl_runs), median_result(&bp_runs));
        row("baseline, 1 route", &b1, Some(&nginx));
        row(&format!("baseline, {} routes", args.routes), &bm, Some(&nginx));
        row("baseline, key-auth+limit-count+prometheus", &bp, Some(&nginx));
        [("1 route", one.clone(), b1), (&*format!("{} routes", args.routes), many.clone(), bm), ("key-auth+limit-count+prometheus", plugged.clone(), bp)]
            .map(|(name, new, old)| (name.to_string(), new, old))
    });
    let (nginx_tls, weir_tls) = (median_result(&nt_runs), median_result(&wt_runs));
    row("nginx, HTTPS", &nginx_tls, Some(&nginx_tls));
    row("weir, HTTPS", &weir_tls, Some(&nginx_tls));
    let (nginx_h2, weir_h2) = (median_result(&nh_runs), median_result(&wh_runs));
    row("nginx, HTTP/2 + TLS (h2load)", &nginx_h2, Some(&nginx_h2));
    row("weir, HTTP/2 + TLS (h2load)", &weir_h2, Some(&nginx_h2));

    println!();
    println!("weir/nginx throughput, 1 route: {:.2}x (p99 {:.3} ms vs {:.3} ms)", one.rps / nginx.rps, one.p99_ms, nginx.p99_ms);
    if let (Some(w), Some(n)) = (one.cpu_us, nginx.cpu_us) {
        println!("weir/nginx requests per core-second, 1 route: {:.2}x ({w:.1} vs {n:.1} us CPU per request)", n / w);
    }
    println!("{} routes vs 1 route: {:+.1}% throughput", args.routes, (many.rps / one.rps - 1.0) * 100.0);
    println!("key-auth + limit-count + prometheus vs plain weir: {:.2}x throughput", plugged.rps / one.rps);
    if let (Some(p), Some(o)) = (plugged.cpu_us, one.cpu_us) {
        println!("key-auth + limit-count + prometheus vs plain weir: {:+.1}% CPU per request ({p:.1} vs {o:.1} us)", (p / o - 1.0) * 100.0);
    }
    if let (Some(m), Some(o)) = (many.cpu_us, one.cpu_us) {
        println!("{} routes vs 1 route: {:+.1}% CPU per request", args.routes, (m / o - 1.0) * 100.0);
    }
    for (name, new, old) in compared.iter().flatten() {
        let cpu = match (new.cpu_us, old.cpu_us) {
            (Some(n), Some(o)) => format!(", {:+.1}% CPU per request ({n:.1} vs {o:.1} us)", (n / o - 1.0) * 100.0),
            _ => String::new(),
        };
        println!("weir vs baseline, {name}: {:+.1}% throughput{cpu}", (new.rps / old.rps - 1.0) * 100.0);
    }
    // Idle connections last: they stay counted in the allocators of both proxies afterwards.
    let idle = 2000;
    let nginx_idle = idle_cost(NGINX_PROXY_PORT, nginx_pid, idle, target)?;
    let weir_idle = idle_cost(small.port, small_pid, idle, target)?;
    println!("memory per idle keep-alive connection ({idle} open): nginx {nginx_idle:.1} KiB, weir {weir_idle:.1} KiB");
    println!("{live_small}");
    println!("PUT-to-live over {} changes ({} routes): p50 {p50k:.2} ms, p99 {p99k:.2} ms", args.changes, args.routes);
    drop((small, large, baseline));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("weir-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
