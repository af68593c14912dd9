//! The soak: one Weir under mixed traffic for a long time while its configuration churns.
//!
//! Traffic (wrk, one minute at a time) cycles over a plain route, a route with key-auth,
//! limit-count and prometheus, and a route whose fault-injection answers 418 to a tenth of
//! requests: the only errors expected. Meanwhile a churn thread puts, patches and deletes
//! routes, upstreams and consumers through the Admin API several times a second. After each
//! minute the report shows Weir's resident memory and every answer by status; any status
//! other than 200 and the injected 418, any failed admin call, fails the soak.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{Args, ORIGIN_PORT, Weir, http, origin, other_cores, tempfile_dir, wait_port};

/// wrk's script: the three paths in turn, every answer counted by status across threads.
const SCRIPT: &str = r#"
local threads = {}
function setup(thread) table.insert(threads, thread) end
local paths = {"/svc/a", "/plug/b", "/fault/c"}
local n = 0
counts = {}
function request()
  n = n + 1
  return wrk.format("GET", paths[n % #paths + 1], {["apikey"] = "soak-key"})
end
function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end
function done(summary, latency, requests)
  local all = {}
  for _, t in ipairs(threads) do
    local c = t:get("counts")
    for status, k in pairs(c) do all[status] = (all[status] or 0) + k end
  end
  for status, k in pairs(all) do io.write(string.format("status %d %d\n", status, k)) end
  io.write(string.format("errors %d %d %d %d\n", summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
end
"#;

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// Opens idle keep-alive connections (each has served one request) and prints what each costs
/// Weir in resident memory.
fn idle_cost(port: u16, pid: u32) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    const IDLE: usize = 2000;
    let before = rss_kib(pid);
    let mut open = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(b"GET /svc/idle HTTP/1.1\r\nHost: soak\r\n\r\n")?;
        let mut got = [0u8; 1024];
        let n = s.read(&mut got)?;
        if !got[..n].starts_with(b"HTTP/1.1 200") {
            bail!("idle connection setup: {}", String::from_utf8_lossy(&got[..n]));
        }
        open.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(pid);
    println!(
        "{IDLE} idle keep-alive connections: rss {before} -> {after} KiB, {:.1} KiB each",
        after.saturating_sub(before) as f64 / IDLE as f64
    );
    drop(open);
    Ok(())
}

pub fn run(args: &Args, secs: u64) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let other = other_cores(args.proxy_core);
    let _origin = origin(&dir, &other)?;
    wait_port(ORIGIN_PORT)?;
    let w = Weir::start(args, &args.weir, &dir.join("weir-soak"), 18082)?;
    let pid = w.proc.0.id();
    w.put("upstreams/origin", &format!("{{\"type\":\"roundrobin\",\"nodes\":{{\"127.0.0.1:{ORIGIN_PORT}\":1}}}}"))?;
    w.put("routes/svc", "{\"uri\":\"/svc/*\",\"upstream_id\":\"origin\"}")?;
    w.put("consumers/soak", "{\"username\":\"soak\",\"plugins\":{\"key-auth\":{\"key\":\"soak-key\"}}}")?;
    w.put(
        "routes/plug",
        "{\"uri\":\"/plug/*\",\"upstream_id\":\"origin\",\"plugins\":{\"key-auth\":{},\
         \"limit-count\":{\"count\":1000000000,\"time_window\":60},\"prometheus\":{}}}",
    )?;
    w.put(
        "routes/fault",
        "{\"uri\":\"/fault/*\",\"upstream_id\":\"origin\",\"plugins\":{\"fault-injection\":{\"abort\":{\"http_status\":418,\"percentage\":10}}}}",
    )?;
    let script = dir.join("soak.lua");
    std::fs::write(&script, SCRIPT)?;
    let url = format!("http://127.0.0.1:{}/", w.port);
    // A first minute's worth of warm-up, so the starting figure is a settled one.
    let warm = std::process::Command::new("taskset").args(["-c", &other, "wrk", "-t1", "-c50", "-d10s", "-s"]).arg(&script).arg(&url).output()?;
    if !warm.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&warm.stderr));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (changes, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let churn = {
        let (stop, changes, failures, admin) = (stop.clone(), changes.clone(), failures.clone(), w.admin);
        std::thread::spawn(move || {
            let call = |method: &str, path: &str, body: Option<&str>| match http(admin, method, &format!("/apisix/admin/{path}"), body) {
                Ok((200 | 201, _)) => changes.fetch_add(1, Ordering::Relaxed),
                Ok((s, b)) => {
                    eprintln!("soak: {method} {path}: {s} {b}");
                    failures.fetch_add(1, Ordering::Relaxed)
                }
                Err(e) => {
                    eprintln!("soak: {method} {path}: {e}");
                    failures.fetch_add(1, Ordering::Relaxed)
                }
            };
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let n = i % 50;
                call("PUT", &format!("routes/churn-{n}"), Some(&format!("{{\"uri\":\"/churn/{i}/*\",\"upstream_id\":\"origin\",\"plugins\":{{\"limit-count\":{{\"count\":100,\"time_window\":{}}}}}}}", 1 + n)));
                if i.is_multiple_of(3) {
                    call("PATCH", "upstreams/origin", Some(&format!("{{\"retries\":{}}}", i % 3)));
                }
                // A consumer comes and goes every second: put, then deleted half a second later.
                let c = i / 10 % 10;
                match i % 10 {
                    0 => call("PUT", &format!("consumers/churn{c}"), Some(&format!("{{\"username\":\"churn{c}\",\"plugins\":{{\"key-auth\":{{\"key\":\"churn-{i}\"}}}}}}"))),
                    5 => call("DELETE", &format!("consumers/churn{c}"), None),
                    _ => 0,
                };
                // Routes are deleted too; each comes back 25 steps later.
                if i.is_multiple_of(7) && i >= 50 {
                    call("DELETE", &format!("routes/churn-{}", (i + 25) % 50), None);
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let started = Instant::now();
    let start_rss = rss_kib(pid);
    println!("Weir soak: {secs} s of mixed traffic (wrk -t1 -c{}) with config churn; RSS at start {start_rss} KiB", args.connections);
    let (mut ok, mut injected, mut unexpected) = (0u64, 0u64, 0u64);
    let mut samples = vec![start_rss];
    while started.elapsed().as_secs() < secs {
        let left = secs.saturating_sub(started.elapsed().as_secs()).clamp(1, 60);
        let out = std::process::Command::new("taskset")
            .args(["-c", &other, "wrk", "-t1", &format!("-c{}", args.connections), &format!("-d{left}s"), "-s"])
            .arg(&script)
            .arg(&url)
            .output()
            .context("running wrk")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (mut m_ok, mut m_inj, mut m_bad) = (0u64, 0u64, 0u64);
        for line in text.lines() {
            let t: Vec<&str> = line.split_whitespace().collect();
            match t.as_slice() {
                ["status", "200", k] => m_ok += k.parse::<u64>().unwrap_or(0),
                ["status", "418", k] => m_inj += k.parse::<u64>().unwrap_or(0),
                ["status", s, k] => {
                    eprintln!("soak: {k} answers with status {s}");
                    m_bad += k.parse::<u64>().unwrap_or(0);
                }
                ["errors", c, r, w, t] => {
                    let socket: u64 = [c, r, w, t].iter().map(|v| v.parse::<u64>().unwrap_or(0)).sum();
                    if socket > 0 {
                        eprintln!("soak: socket errors (connect read write timeout): {c} {r} {w} {t}");
                    }
                    m_bad += socket;
                }
                _ => {}
            }
        }
        let rss = rss_kib(pid);
        samples.push(rss);
        println!(
            "t={:>5}s  rss {rss:>7} KiB  200: {m_ok:>8}  injected 418: {m_inj:>6}  unexpected: {m_bad}  admin changes: {}  admin failures: {}",
            started.elapsed().as_secs(),
            changes.load(Ordering::Relaxed),
            failures.load(Ordering::Relaxed)
        );
        ok += m_ok;
        injected += m_inj;
        unexpected += m_bad;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = churn.join();
    let end_rss = rss_kib(pid);
    let peak = samples.iter().copied().max().unwrap_or(0);
    // Last, so its connections do not weigh on the figures above.
    idle_cost(w.port, pid)?;
    println!();
    println!("requests: {ok} answered 200, {injected} injected 418 ({:.1}% of all), {unexpected} unexpected", injected as f64 * 100.0 / (ok + injected).max(1) as f64);
    println!("admin changes applied: {}, failed: {}", changes.load(Ordering::Relaxed), failures.load(Ordering::Relaxed));
    println!("rss: start {start_rss} KiB, end {end_rss} KiB ({:+.1}%), peak {peak} KiB", (end_rss as f64 / start_rss.max(1) as f64 - 1.0) * 100.0);
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
    if unexpected > 0 || failures.load(Ordering::Relaxed) > 0 {
        bail!("the soak saw {unexpected} unexpected answers and {} failed admin calls", failures.load(Ordering::Relaxed));
    }
    Ok(())
}
