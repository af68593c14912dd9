//! The cloud function rows:
//! - a hello-world function returning JSON through Weir against Node 20's `http` module
//!   serving the same JSON (what laf and imprun run functions on), each pinned to the proxy
//!   core, in interleaved rounds;
//! - the same JSON from a route with the mocking plugin on the same node: the proxy's own
//!   cost, without JavaScript, so the rows show what the function runtime adds;
//! - the same function in a gateway that holds `--functions` functions, against one alone;
//! - save → live on the same node and across two nodes sharing etcd (p50, p99), and on each
//!   while another gateway saves a large function in a loop;
//! - the first call of a function just saved against a warm call;
//! - promote (dev → staging) → live in staging, on the same node and across two nodes;
//! - memory per idle function.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{Args, Proc, Weir, WrkResult, median, median_result, other_cores, percentile, row, tempfile_dir, wait_port, wrk_url};

const NODE_PORT: u16 = 18180;
const ETCD_PORT: u16 = 18379;

/// One exchange on a fresh connection with a Host of our choosing: (status, body, time to
/// the answer).
pub(crate) fn call(port: u16, method: &str, path: &str, host: &str, body: Option<&str>) -> anyhow::Result<(u16, String, Duration)> {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nX-API-KEY: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        crate::KEY,
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let took = started.elapsed();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).context("malformed response")?;
    Ok((status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default(), took))
}

pub(crate) fn v1(w: &Weir, method: &str, path: &str, body: &str) -> anyhow::Result<String> {
    let (s, b, _) = call(w.admin, method, &format!("/v1/{path}"), "bench.local", Some(body))?;
    if !(200..300).contains(&s) {
        bail!("{method} /v1/{path}: {s} {b}");
    }
    Ok(b)
}

/// Creates gateway `gid` and waits until it has started.
pub(crate) fn gateway(w: &Weir, gid: &str) -> anyhow::Result<()> {
    v1(w, "POST", "api-gateways", &format!("{{\"name\":\"{gid}\",\"gatewayId\":\"{gid}\"}}"))?;
    let started = Instant::now();
    while !v1(w, "GET", &format!("api-gateways/{gid}"), "")?.contains("\"phase\":\"Started\"") {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("gateway {gid} never started");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

pub(crate) fn save(w: &Weir, gid: &str, name: &str, code: &str) -> anyhow::Result<()> {
    let body = serde_json::json!({"name": name, "source": {"code": code}}).to_string();
    v1(w, "POST", &format!("api-gateways/{gid}/functions"), &body).map(|_| ())
}

/// Saves `code` in dev (untimed), then promotes it to staging and times the promotion until
/// staging answers with `want`, on `reader`.
fn promote(w: &Weir, reader: &Weir, gid: &str, name: &str, code: &str, want: &str) -> anyhow::Result<f64> {
    patch(w, gid, name, code)?;
    let t = Instant::now();
    v1(w, "POST", &format!("api-gateways/{gid}/functions/dev%2F{name}/deploy-to-stage"), "{\"targetStage\":\"staging\"}")?;
    Ok(ms(live(reader.port, &format!("{gid}.staging.localhost"), &format!("/{name}"), want, t)?.0))
}

pub(crate) fn patch(w: &Weir, gid: &str, name: &str, code: &str) -> anyhow::Result<()> {
    let body = serde_json::json!({"source": {"code": code}}).to_string();
    v1(w, "PATCH", &format!("api-gateways/{gid}/functions/dev%2F{name}"), &body).map(|_| ())
}

/// Polls `port` until `path` on `host` answers 200 with `want` in its body; the time from
/// `since`, and the time the successful call itself took.
pub(crate) fn live(port: u16, host: &str, path: &str, want: &str, since: Instant) -> anyhow::Result<(Duration, Duration)> {
    loop {
        let (s, b, took) = call(port, "GET", path, host, None)?;
        if s == 200 && b.contains(want) {
            return Ok((since.elapsed(), took));
        }
        if since.elapsed() > Duration::from_secs(30) {
            bail!("{host}{path} never answered {want}: {s} {b}");
        }
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(what: &str, mut times: Vec<f64>) {
    times.sort_by(|a, b| a.total_cmp(b));
    println!("{what}: p50 {:.2} ms, p99 {:.2} ms ({} changes)", percentile(&times, 0.5), percentile(&times, 0.99), times.len());
}

/// A large function: two files of 300 KB of TypeScript (a save and its history entry, twice
/// that, fit in one etcd request).
fn large_source(seed: usize) -> serde_json::Value {
    let lib = |n: usize| {
        let mut code = String::new();
        for i in 0.. {
            if code.len() > 300_000 {
                break;
            }
            code += &format!("export function f{i}(a: number, b: string): string {{ const x = {{ k: a + {i}, s: b.repeat(2) }}; return JSON.stringify(x) + '{n}'; }}\n");
        }
        code
    };
    let index = format!("import {{ f1 }} from './a';\nimport {{ f2 }} from './b';\nexport default () => ({{ seed: {seed}, a: typeof f1, b: typeof f2 }});\n");
    serde_json::json!({"files": {"a.ts": lib(seed), "b.ts": lib(seed + 1), "index.ts": index}, "entrypoint": "index.ts"})
}

/// Save → live of `gid`'s hello (saved on `w`, read on `reader`) while another gateway saves
/// a large function over and over on `w` (what one tenant may do to the others); and how many
/// saves it made and how many were refused for its pace (it tries again 100 ms later).
fn beside_large_saves(args: &Args, w: &Weir, reader: &Weir, gid: &str) -> anyhow::Result<(Vec<f64>, (usize, usize))> {
    gateway(w, "noisy")?;
    v1(w, "POST", "api-gateways/noisy/functions", &serde_json::json!({"name": "big", "source": large_source(0)}).to_string())?;
    let sources = [large_source(10), large_source(20)].map(|s| serde_json::json!({"source": s}).to_string());
    beside_saves(args, (w, reader, gid), ("noisy", "big"), |i| sources[i % 2].clone())
}

/// Save → live of a small gateway's hello on `w` while the gateway of `many` functions there
/// (`fns`) saves one of them over and over: each of its saves lowers all its functions again.
fn beside_many(args: &Args, w: &Weir, many: usize) -> anyhow::Result<(Vec<f64>, (usize, usize))> {
    gateway(w, "small")?;
    save(w, "small", "hello", HELLO)?;
    live(w.port, "small.localhost", "/dev/hello", "world", Instant::now())?;
    let one = if many > 1 { "f1" } else { "hello" };
    beside_saves(args, (w, w, "small"), ("fns", one), |i| serde_json::json!({"source": {"code": format!("export default () => ({{ n: 'again {i}' }})")}}).to_string())
}

/// Save → live of `gid`'s hello (saved on `w`, read on `reader`), `args.changes` times, while
/// `noisy` (gateway, function) is saved with `body(i)` over and over on `w`; and how many of
/// those saves went through and how many were refused for its pace (tried again 100 ms later).
fn beside_saves(args: &Args, (w, reader, gid): (&Weir, &Weir, &str), noisy: (&str, &str), body: impl Fn(usize) -> String + Sync) -> anyhow::Result<(Vec<f64>, (usize, usize))> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let path = format!("/v1/api-gateways/{}/functions/dev%2F{}", noisy.0, noisy.1);
    std::thread::scope(|scope| {
        let noisy = scope.spawn(|| {
            let (mut saves, mut refused) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match call(w.admin, "PATCH", &path, "bench.local", Some(&body(saves)))? {
                    (200, _, _) => saves += 1,
                    (429, _, _) => {
                        refused += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    (s, b, _) => bail!("the neighbour's save: {s} {b}"),
                }
            }
            anyhow::Ok((saves, refused))
        });
        // The neighbour is under way before the first timed save.
        std::thread::sleep(Duration::from_millis(500));
        let timed = (0..args.changes)
            .map(|i| {
                let t = Instant::now();
                patch(w, gid, "hello", &format!("export default () => ({{ hello: 'world', beside: {i} }})"))?;
                Ok(ms(live(reader.port, &format!("{gid}.localhost"), "/dev/hello", &format!("\"beside\":{i}"), t)?.0))
            })
            .collect::<anyhow::Result<Vec<f64>>>();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let saves = noisy.join().map_err(|_| anyhow::anyhow!("the neighbour's saves panicked"))??;
        Ok((timed?, saves))
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

const HELLO: &str = "export default () => ({ hello: 'world' })";

fn node(args: &Args, dir: &Path) -> anyhow::Result<Proc> {
    let script = dir.join("hello.js");
    std::fs::write(
        &script,
        format!("require('http').createServer((req, res) => {{ res.writeHead(200, {{'content-type': 'application/json'}}); res.end(JSON.stringify({{hello: 'world'}})); }}).listen({NODE_PORT}, '127.0.0.1');\n"),
    )?;
    let child = Command::new("taskset")
        .args(["-c", &args.proxy_core.to_string(), "node"])
        .arg(&script)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting node (Node 20)")?;
    Ok(Proc(child, "node"))
}

fn etcd(dir: &Path, cores: &str) -> anyhow::Result<Proc> {
    let data = dir.join("etcd");
    let child = Command::new("taskset")
        .args(["-c", cores, "etcd", "--data-dir"])
        .arg(&data)
        .args(["--listen-client-urls", &format!("http://127.0.0.1:{ETCD_PORT}"), "--advertise-client-urls", &format!("http://127.0.0.1:{ETCD_PORT}")])
        .args(["--listen-peer-urls", "http://127.0.0.1:18380", "--initial-advertise-peer-urls", "http://127.0.0.1:18380", "--initial-cluster", "default=http://127.0.0.1:18380"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting etcd (apt-get install -y etcd-server)")?;
    Ok(Proc(child, "etcd"))
}

/// The mocking route of `w`, alone and then while three other gateways of it keep their
/// runtimes busy: each with a client calling a function that spins until its CPU budget stops
/// it, again and again. Measured once the watchdog has put the three runtimes at the nicest
/// niceness, whose time from the start of the spinning is the third value (`None`: not within
/// 30 s; measured then all the same).
fn beside_spinners(args: &Args, w: &Weir) -> anyhow::Result<(WrkResult, WrkResult, Option<Duration>)> {
    let gids = ["spina", "spinb", "spinc"];
    for gid in gids {
        gateway(w, gid)?;
        save(w, gid, "spin", "export default () => { for (;;) {} }")?;
        // Live once it answers 504 for its budget (and no longer 404).
        let since = Instant::now();
        while call(w.port, "GET", "/dev/spin", &format!("{gid}.localhost"), None)?.0 != 504 {
            if since.elapsed() > Duration::from_secs(30) {
                bail!("{gid}: the spinning function never answered 504");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let mock = |args| wrk_url(args, &format!("http://127.0.0.1:{}/hello", w.port), Some(w.proc.0.id()), &["Host: mock.localhost"]);
    let quiet = mock(args)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = gids
        .map(|gid| {
            let (stop, port) = (stop.clone(), w.port);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = call(port, "GET", "/dev/spin", &format!("{gid}.localhost"), None);
                }
            })
        })
        .into_iter()
        .collect();
    // The watchdog puts a runtime busy for a few seconds in a row at the nicest niceness.
    let started = Instant::now();
    let nice = |gid: &str| niceness_of(w.proc.0.id(), &format!("fn-{gid}")) == Some(19);
    while !gids.iter().all(|gid| nice(gid)) && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let niced = gids.iter().all(|gid| nice(gid)).then(|| started.elapsed());
    let noisy = mock(args);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        let _ = s.join();
    }
    Ok((quiet, noisy?, niced))
}

/// The niceness of the one thread of process `pid` named `name`.
fn niceness_of(pid: u32, name: &str) -> Option<i32> {
    let mut named = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten().filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name));
    let (one, None) = (named.next()?, named.next()) else { return None };
    let stat = std::fs::read_to_string(one.path().join("stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19 - 3)?.parse().ok()
}

pub fn run(args: &Args, many: usize) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let other = other_cores(args.proxy_core);
    let _node = node(args, &dir)?;
    wait_port(NODE_PORT)?;
    let one = Weir::start_with(args, &args.weir, &dir.join("weir-one"), 18182, "")?;
    let big = Weir::start_with(args, &args.weir, &dir.join("weir-many"), 18184, "")?;
    for w in [&one, &big] {
        gateway(w, "fns")?;
        save(w, "fns", "hello", HELLO)?;
        live(w.port, "fns.localhost", "/dev/hello", "world", Instant::now())?;
    }
    let mock = serde_json::json!({"uri": "/hello", "host": "mock.localhost", "plugins": {"mocking": {"response_example": "{\"hello\":\"world\"}", "content_type": "application/json"}}});
    one.put("routes/no-js", &mock.to_string())?;
    live(one.port, "mock.localhost", "/hello", "world", Instant::now())?;
    let before = rss_kib(big.proc.0.id());
    let started = Instant::now();
    for i in 1..many {
        save(&big, "fns", &format!("f{i}"), &format!("export default () => ({{ n: {i} }})"))?;
    }
    live(big.port, "fns.localhost", &format!("/dev/f{}", many - 1), &format!("\"n\":{}", many - 1), started)?;
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(big.proc.0.id());
    eprintln!("{} functions saved and live in {:.1}s", many - 1, started.elapsed().as_secs_f64());

    println!("Functions: a hello-world function returning JSON; wrk -t1 -c{} -d{}s; median of {} interleaved rounds, each server on core {}", args.connections, args.duration, args.rounds, args.proxy_core);
    let host = ["Host: fns.localhost"];
    let (mut node_runs, mut one_runs, mut many_runs, mut mock_runs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let n = wrk_url(args, &format!("http://127.0.0.1:{NODE_PORT}/"), Some(_node.0.id()), &[])?;
        // The two Weir rows swap places every other round, so neither always runs first.
        let one_row = || wrk_url(args, &format!("http://127.0.0.1:{}/dev/hello", one.port), Some(one.proc.0.id()), &host);
        let many_row = || wrk_url(args, &format!("http://127.0.0.1:{}/dev/hello", big.port), Some(big.proc.0.id()), &host);
        let (o, m) = if round % 2 == 1 {
            let o = one_row()?;
            (o, many_row()?)
        } else {
            let m = many_row()?;
            (one_row()?, m)
        };
        let j = wrk_url(args, &format!("http://127.0.0.1:{}/hello", one.port), Some(one.proc.0.id()), &["Host: mock.localhost"])?;
        println!(
            "round {round}: node {:.0} req/s, weir {:.0} req/s ({:.2}x), weir beside {many} functions {:.0} req/s ({:.3}x), weir without JavaScript {:.0} req/s ({:.2}x); wrk busy {:.0}%, {:.0}%, {:.0}%, {:.0}%",
            n.rps,
            o.rps,
            o.rps / n.rps,
            m.rps,
            m.rps / o.rps,
            j.rps,
            j.rps / n.rps,
            n.client_busy * 100.0,
            o.client_busy * 100.0,
            m.client_busy * 100.0,
            j.client_busy * 100.0
        );
        mock_runs.push(j);
        node_runs.push(n);
        one_runs.push(o);
        many_runs.push(m);
    }
    let (n, o, m, j) = (median_result(&node_runs), median_result(&one_runs), median_result(&many_runs), median_result(&mock_runs));
    println!("{:<28} {:>9} {:>8} {:>8} {:>7} {:>9} {:>10} {:>7}", "", "req/s", "p50 ms", "p99 ms", "ratio", "CPU us/r", "req/core/s", "/core");
    row("node 20 http", &n, Some(&n));
    row("weir, 1 function", &o, Some(&n));
    row(&format!("weir, {many} functions"), &m, Some(&o));
    row("weir, mocking (no JS)", &j, Some(&n));
    // Each round's runs are next to each other in time, so the machine's drift cancels in a
    // round's ratio; the ratio of the medians above mixes rounds.
    let per_round = |a: &[WrkResult], b: &[WrkResult]| median(a.iter().zip(b).map(|(a, b)| a.rps / b.rps).collect());
    println!(
        "weir vs node: {:.2}x throughput; {many} functions vs 1: {:.3}x (medians of the rounds' ratios; ratios of the medians: {:.2}x, {:.3}x)",
        per_round(&one_runs, &node_runs),
        per_round(&many_runs, &one_runs),
        o.rps / n.rps,
        m.rps / o.rps
    );
    // wrk has one core: where it is busy all the time, the row measured wrk, and its ratio is a floor.
    println!(
        "wrk's share of its core: node {:.0}%, weir {:.0}%, mocking {:.0}%; the most this client measures is about {:.2}x node",
        n.client_busy * 100.0,
        o.client_busy * 100.0,
        j.client_busy * 100.0,
        j.rps / j.client_busy.max(0.01) / n.rps
    );
    println!("memory per idle function: {:.1} KiB ({} KiB more RSS for {} functions)", (after.saturating_sub(before)) as f64 / (many - 1).max(1) as f64, after.saturating_sub(before), many - 1);
    let (quiet, noisy, niced) = beside_spinners(args, &one)?;
    println!(
        "mocking route beside three gateways whose calls spin to their CPU budget, one after another, on Weir's core: {:.0} req/s, {:.2}x of the {:.0} req/s it serves alone; p99 {:.2} ms (alone {:.2} ms); the spinning runtimes {}",
        noisy.rps,
        noisy.rps / quiet.rps,
        quiet.rps,
        noisy.p99_ms,
        quiet.p99_ms,
        niced.map_or_else(|| "not all at the nicest niceness after 30 s".to_string(), |d| format!("at the nicest niceness {:.1} s after they began", d.as_secs_f64()))
    );

    // Save → live on one node, and the first call of a new function against a warm one.
    let (mut saves, mut firsts, mut warms) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.changes {
        let t = Instant::now();
        patch(&one, "fns", "hello", &format!("export default () => ({{ hello: 'world', v: {i} }})"))?;
        saves.push(ms(live(one.port, "fns.localhost", "/dev/hello", &format!("\"v\":{i}"), t)?.0));
        let name = format!("new{i}");
        let t = Instant::now();
        save(&one, "fns", &name, &format!("export default () => ({{ fresh: {i} }})"))?;
        let (_, first) = live(one.port, "fns.localhost", &format!("/dev/{name}"), "fresh", t)?;
        let (_, _, warm) = call(one.port, "GET", &format!("/dev/{name}"), "fns.localhost", None)?;
        firsts.push(ms(first));
        warms.push(ms(warm));
    }
    report("save to live, same node", saves);
    firsts.sort_by(|a, b| a.total_cmp(b));
    warms.sort_by(|a, b| a.total_cmp(b));
    println!("first call after save: p50 {:.3} ms; warm call: p50 {:.3} ms (each on a new connection)", percentile(&firsts, 0.5), percentile(&warms, 0.5));
    let promotions = (0..args.changes).map(|i| promote(&one, &one, "fns", "hello", &format!("export default () => ({{ p: {i} }})"), &format!("\"p\":{i}"))).collect::<anyhow::Result<Vec<f64>>>()?;
    report("promote to live in staging, same node", promotions);
    let (beside, (noisy, refused)) = beside_large_saves(args, &one, &one, "fns")?;
    report(&format!("save to live beside a gateway saving a 600 KB function in a loop ({noisy} saves, {refused} refused for its pace), same node"), beside);
    let (beside, (noisy, refused)) = beside_many(args, &big, many)?;
    report(&format!("save to live beside the gateway of {many} functions saving one in a loop ({noisy} saves, {refused} refused for its pace), same node"), beside);
    drop((one, big));

    // Across two nodes sharing etcd.
    let _etcd = etcd(&dir, &other)?;
    wait_port(ETCD_PORT)?;
    let store = format!("store:\n  type: etcd\n  etcd:\n    endpoints: [\"http://127.0.0.1:{ETCD_PORT}\"]\n");
    let a = Weir::start_store(args, &args.weir, &dir.join("weir-a"), 18186, &store)?;
    let b = Weir::start_store(args, &args.weir, &dir.join("weir-b"), 18188, &store)?;
    gateway(&a, "two")?;
    save(&a, "two", "hello", HELLO)?;
    live(b.port, "two.localhost", "/dev/hello", "world", Instant::now())?;
    let mut saves = Vec::new();
    for i in 0..args.changes {
        let t = Instant::now();
        patch(&a, "two", "hello", &format!("export default () => ({{ v: {i} }})"))?;
        saves.push(ms(live(b.port, "two.localhost", "/dev/hello", &format!("\"v\":{i}"), t)?.0));
    }
    report("save to live, across two nodes on etcd", saves);
    let promotions = (0..args.changes).map(|i| promote(&a, &b, "two", "hello", &format!("export default () => ({{ p: {i} }})"), &format!("\"p\":{i}"))).collect::<anyhow::Result<Vec<f64>>>()?;
    report("promote to live in staging, across two nodes on etcd", promotions);
    let (beside, (noisy, refused)) = beside_large_saves(args, &a, &b, "two")?;
    report(&format!("save to live beside a gateway saving a 600 KB function in a loop ({noisy} saves, {refused} refused for its pace), across two nodes on etcd"), beside);
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
