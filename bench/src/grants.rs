//! The grants rows: a function behind key-auth in a gateway whose dev environment has
//! `--grants N` grants (N applications, one grant each), against the same function in a
//! gateway with auth off, both in one Weir on the proxy core, in interleaved rounds; and the
//! time to create the applications and their grants through the platform API, several at once.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::functions::{call, gateway, live, ms, patch, save, v1};
use crate::{Args, Weir, median_result, percentile, row, tempfile_dir, wrk_url};

const OK: &str = "export default () => ({ ok: true })";
/// Clients creating applications and grants at once.
const THREADS: usize = 8;
/// A key of the right shape that no grant holds.
const WRONG: &str = "sk-0000000000000000000000000000000000000000000000000000000000000000";

/// `GET path` on `host` through the proxy on a fresh connection, with `headers` (`name: value`
/// lines): (status, body).
fn get(port: u16, path: &str, host: &str, headers: &[&str]) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.get(9..12).and_then(|c| c.parse().ok()).context("malformed response")?;
    Ok((status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// Puts key-auth in front of everything gateway `gid`'s dev environment serves, once the
/// reconciler has made the environment.
fn key_auth(w: &Weir, gid: &str) -> anyhow::Result<()> {
    let path = format!("/v1/api-gateways/{gid}/environments/dev");
    let started = Instant::now();
    loop {
        match call(w.admin, "PATCH", &path, "bench.local", Some("{\"authType\":\"key-auth\"}"))? {
            (200, _, _) => return Ok(()),
            (404, _, _) if started.elapsed() < Duration::from_secs(60) => std::thread::sleep(Duration::from_millis(5)),
            (s, b, _) => bail!("PATCH {path}: {s} {b}"),
        }
    }
}

/// A grant made: its application, its id and its key.
struct Made {
    app: String,
    grant: String,
    key: String,
}

/// `n` applications, each with a grant on gateway `gid`'s dev environment, made by `THREADS`
/// clients at once.
fn grant(w: &Weir, gid: &str, n: usize) -> anyhow::Result<Vec<Made>> {
    let field = |body: &str, name: &str| -> anyhow::Result<String> {
        let v: Value = serde_json::from_str(body).with_context(|| format!("an answer of JSON: {body}"))?;
        v[name].as_str().map(str::to_string).with_context(|| format!("no {name} in {body}"))
    };
    let threads = THREADS.min(n).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut keys = Vec::new();
                    for i in (t..n).step_by(threads) {
                        let app = field(&v1(w, "POST", "applications", &format!("{{\"name\":\"bench-{i}\"}}"))?, "appId")?;
                        let body = format!("{{\"gatewayId\":\"{gid}\",\"environment\":\"dev\"}}");
                        let made = v1(w, "POST", &format!("applications/{app}/grants"), &body)?;
                        keys.push(Made { grant: field(&made, "grantId")?, key: field(&made, "apiKey")?, app });
                    }
                    anyhow::Ok(keys)
                })
            })
            .collect();
        let mut keys = Vec::with_capacity(n);
        for worker in workers {
            keys.extend(worker.join().map_err(|_| anyhow::anyhow!("a client making grants panicked"))??);
        }
        Ok(keys)
    })
}

pub fn run(args: &Args, n: usize) -> anyhow::Result<()> {
    if n == 0 {
        bail!("--grants needs at least one grant");
    }
    let dir = tempfile_dir()?;
    let w = Weir::start_with(args, &args.weir, &dir.join("weir-grants"), 18196, "")?;
    let (keyed, open) = ("keyed", "open");
    for gid in [keyed, open] {
        gateway(&w, gid)?;
        save(&w, gid, "ok", OK)?;
    }
    let (keyed_host, open_host) = (format!("{keyed}.dev.localhost"), format!("{open}.dev.localhost"));
    live(w.port, &open_host, "/ok", "\"ok\":true", Instant::now())?;
    key_auth(&w, keyed)?;
    let since = Instant::now();
    loop {
        match get(w.port, "/ok", &keyed_host, &[])? {
            (401, _) => break,
            (s, b) if since.elapsed() > Duration::from_secs(30) => bail!("{keyed_host}/ok never asked for a key: {s} {b}"),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }

    let started = Instant::now();
    let grants = grant(&w, keyed, n)?;
    let keys: Vec<&str> = grants.iter().map(|g| g.key.as_str()).collect();
    let made = started.elapsed();
    eprintln!("{n} applications and their grants in {:.1}s ({:.0} grants/s, {} clients at once)", made.as_secs_f64(), n as f64 / made.as_secs_f64(), THREADS.min(n));
    // The last key made, once it works; then a sample of the others.
    let key = keys.last().expect("at least one grant").to_string();
    let apikey = format!("apikey: {key}");
    loop {
        match get(w.port, "/ok", &keyed_host, &[&apikey])? {
            (200, b) if b.contains("\"ok\":true") => break,
            (s, b) if started.elapsed() > made + Duration::from_secs(60) => bail!("{keyed_host}/ok never took a granted key: {s} {b}"),
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    eprintln!("a granted key works {:.1} ms after the last grant was made", (started.elapsed() - made).as_secs_f64() * 1000.0);
    for k in keys.iter().step_by((n / 20).max(1)) {
        let (s, b) = get(w.port, "/ok", &keyed_host, &[&format!("apikey: {k}")])?;
        if s != 200 {
            bail!("{keyed_host}/ok refused a granted key: {s} {b}");
        }
    }
    // A bad setup fails here rather than measuring refusals: no key and a wrong one are
    // refused, the open gateway takes none.
    for (headers, want) in [(vec![], 401), (vec![format!("apikey: {WRONG}")], 401), (vec![apikey.clone()], 200)] {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let (s, b) = get(w.port, "/ok", &keyed_host, &headers)?;
        if s != want {
            bail!("{keyed_host}/ok with {headers:?}: {s} (expected {want}) {b}");
        }
    }
    let (s, b) = get(w.port, "/ok", &open_host, &[])?;
    if s != 200 || !b.contains("\"ok\":true") {
        bail!("{open_host}/ok without a key: {s} {b}");
    }

    println!("Grants: a function returning JSON behind key-auth with {n} grants, against auth off; wrk -t1 -c{} -d{}s; median of {} interleaved rounds, weir on core {}", args.connections, args.duration, args.rounds, args.proxy_core);
    let pid = w.proc.0.id();
    let url = format!("http://127.0.0.1:{}/ok", w.port);
    let (keyed_hdr, open_hdr) = (format!("Host: {keyed_host}"), format!("Host: {open_host}"));
    let (mut keyed_runs, mut open_runs) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        // wrk fails on any answer other than 2xx.
        let o = wrk_url(args, &url, Some(pid), &[&open_hdr])?;
        let k = wrk_url(args, &url, Some(pid), &[&keyed_hdr, &apikey])?;
        println!("round {round}: auth off {:.0} req/s, key-auth with {n} grants {:.0} req/s ({:.3}x)", o.rps, k.rps, k.rps / o.rps);
        open_runs.push(o);
        keyed_runs.push(k);
    }
    let (o, k) = (median_result(&open_runs), median_result(&keyed_runs));
    println!("{:<28} {:>9} {:>8} {:>8} {:>7} {:>9} {:>10} {:>7}", "", "req/s", "p50 ms", "p99 ms", "ratio", "CPU us/r", "req/core/s", "/core");
    row("function, auth off", &o, Some(&o));
    row(&format!("function, key-auth, {n} grants"), &k, Some(&o));
    let cpu = match (k.cpu_us, o.cpu_us) {
        (Some(k), Some(o)) if o > 0.0 => format!(", {:+.1}% CPU per request ({k:.1} vs {o:.1} us)", (k / o - 1.0) * 100.0),
        _ => String::new(),
    };
    println!("key-auth with {n} grants vs auth off: {:.3}x throughput{cpu}", k.rps / o.rps);
    println!("{n} applications with a grant each made in {:.1}s ({:.0} grants/s, {} clients at once)", made.as_secs_f64(), n as f64 / made.as_secs_f64(), THREADS.min(n));
    let (alone, beside, took) = beside_regenerations(args, &w, open, &grants[0])?;
    println!(
        "save to live of another gateway's function ({} saves), p50/p99: alone {:.2}/{:.2} ms; while one client regenerates a grant's key over and over {:.2}/{:.2} ms ({} regenerations, {:.1} ms each at the median)",
        alone.len(),
        percentile(&alone, 0.5),
        percentile(&alone, 0.99),
        percentile(&beside, 0.5),
        percentile(&beside, 0.99),
        took.len(),
        percentile(&took, 0.5)
    );
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Save → live of gateway `gid`'s function `ok`, `args.changes` times alone and as many again
/// while one client regenerates grant `g`'s key over and over (a change to one consumer among
/// many, which every node applies); and how long each regeneration took. All sorted.
fn beside_regenerations(args: &Args, w: &Weir, gid: &str, g: &Made) -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let host = format!("{gid}.dev.localhost");
    let saves = |from: usize| -> anyhow::Result<Vec<f64>> {
        let mut took = (from..from + args.changes)
            .map(|i| {
                let t = Instant::now();
                patch(w, gid, "ok", &format!("export default () => ({{ ok: true, v: {i} }})"))?;
                Ok(ms(live(w.port, &host, "/ok", &format!("\"v\":{i}"), t)?.0))
            })
            .collect::<anyhow::Result<Vec<f64>>>()?;
        took.sort_by(f64::total_cmp);
        Ok(took)
    };
    let alone = saves(0)?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let churn = scope.spawn(|| {
            let mut took = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                v1(w, "POST", &format!("applications/{}/grants/{}/regenerate", g.app, g.grant), "{}")?;
                took.push(ms(t.elapsed()));
            }
            took.sort_by(f64::total_cmp);
            anyhow::Ok(took)
        });
        // The regenerations are under way before the first timed save.
        std::thread::sleep(Duration::from_millis(500));
        let beside = saves(args.changes);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let took = churn.join().map_err(|_| anyhow::anyhow!("the regenerating client panicked"))??;
        if took.is_empty() {
            bail!("no regeneration finished while the saves were timed");
        }
        Ok((alone, beside?, took))
    })
}
