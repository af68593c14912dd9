//! The platform rows: a request to one gateway among 1,000 against the same request with one
//! gateway, and the time from creating a gateway to its first request served.
//!
//! Two Weir processes on the proxy core, measured in interleaved rounds: one holds a single
//! gateway, the other `--platform` gateways (each with its environments' routes and plugin
//! configs, as the platform renders them). Every gateway's dev environment sends to the origin.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::{Args, ORIGIN_PORT, Weir, median_result, origin, other_cores, percentile, row, tempfile_dir, wait_port, wrk_url};

/// One exchange on a fresh connection with a Host of our choosing: (status, body).
fn call(port: u16, method: &str, path: &str, host: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
    crate::functions::call(port, method, path, host, body).map(|(status, body, _)| (status, body))
}

fn admin(w: &Weir, method: &str, path: &str, body: &str) -> anyhow::Result<String> {
    let (s, b) = call(w.admin, method, path, "bench.local", Some(body))?;
    if !(200..300).contains(&s) {
        bail!("{method} {path}: {s} {b}");
    }
    Ok(b)
}

/// Creates gateway `gid`; the reconciler provisions it.
fn create(w: &Weir, gid: &str) -> anyhow::Result<()> {
    admin(w, "POST", "/v1/api-gateways", &format!("{{\"name\":\"{gid}\",\"gatewayId\":\"{gid}\"}}"))?;
    Ok(())
}

/// Points gateway `gid`'s dev environment at the origin.
fn publish(w: &Weir, gid: &str) -> anyhow::Result<()> {
    let body = format!("{{\"upstream\":{{\"type\":\"roundrobin\",\"nodes\":{{\"127.0.0.1:{ORIGIN_PORT}\":1}},\"keepalive_pool\":{{\"requests\":1000000}}}}}}");
    let path = format!("/v1/api-gateways/{gid}/environments/dev");
    let started = Instant::now();
    // The environments exist once the reconciler has created them.
    loop {
        match call(w.admin, "PATCH", &path, "bench.local", Some(&body))? {
            (200, _) => return Ok(()),
            (404, _) if started.elapsed() < Duration::from_secs(60) => std::thread::sleep(Duration::from_millis(5)),
            (s, b) => bail!("PATCH {path}: {s} {b}"),
        }
    }
}

/// Waits until `host` serves `path` from the origin.
fn served(w: &Weir, host: &str, path: &str, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    while call(w.port, "GET", path, host, None)?.0 != 200 {
        if started.elapsed() > limit {
            bail!("{host}{path} never served");
        }
    }
    Ok(())
}

pub fn run(args: &Args, gateways: usize) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let other = other_cores(args.proxy_core);
    let _origin = origin(&dir, &other)?;
    wait_port(ORIGIN_PORT)?;
    // The origin listens on loopback, which tenants may not reach by default.
    let loopback = "platform:\n  denied_networks: []\n";
    let one = Weir::start_with(args, &args.weir, &dir.join("weir-one"), 18082, loopback)?;
    let many = Weir::start_with(args, &args.weir, &dir.join("weir-many"), 18084, loopback)?;
    for w in [&one, &many] {
        create(w, "gw0")?;
        publish(w, "gw0")?;
        served(w, "gw0.localhost", "/dev/items", Duration::from_secs(30))?;
    }
    let started = Instant::now();
    for i in 1..gateways {
        create(&many, &format!("gw{i}"))?;
    }
    for i in 1..gateways {
        publish(&many, &format!("gw{i}"))?;
    }
    let last = format!("gw{}.localhost", gateways - 1);
    served(&many, &last, "/dev/items", Duration::from_secs(600))?;
    let (_, list) = call(many.admin, "GET", "/apisix/admin/routes", "bench.local", None)?;
    let routes = list.split("\"total\":").nth(1).and_then(|t| t.trim_end_matches('}').trim().parse::<usize>().ok()).unwrap_or(0);
    eprintln!("{gateways} gateways ({routes} routes) created and published in {:.1}s", started.elapsed().as_secs_f64());

    println!("Platform: a request to one gateway, with 1 and with {gateways} gateways on the node; wrk -t1 -c{} -d{}s; median of {} interleaved rounds", args.connections, args.duration, args.rounds);
    let host = ["Host: gw0.localhost"];
    let (mut one_runs, mut many_runs) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let o = wrk_url(args, &format!("http://127.0.0.1:{}/dev/items", one.port), Some(one.proc.0.id()), &host)?;
        let m = wrk_url(args, &format!("http://127.0.0.1:{}/dev/items", many.port), Some(many.proc.0.id()), &host)?;
        println!("round {round}: 1 gateway {:.0} req/s, {gateways} gateways {:.0} req/s ({:.3}x)", o.rps, m.rps, m.rps / o.rps);
        one_runs.push(o);
        many_runs.push(m);
    }
    let (o, m) = (median_result(&one_runs), median_result(&many_runs));
    row("weir, 1 gateway", &o, Some(&o));
    row(&format!("weir, {gateways} gateways ({routes} routes)"), &m, Some(&o));
    println!("{gateways} gateways vs 1: {:.3}x throughput", m.rps / o.rps);

    // Created → first request served: a new gateway, its dev environment published, and the
    // first 200 through the proxy, timed from the POST.
    for (w, what) in [(&one, "few gateways"), (&many, "with the others")] {
        let mut times = Vec::new();
        for i in 0..args.changes.min(100) {
            let gid = format!("new-{}-{i}", w.port);
            let t = Instant::now();
            create(w, &gid)?;
            publish(w, &gid)?;
            served(w, &format!("{gid}.localhost"), "/dev/x", Duration::from_secs(30))?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        println!("gateway created to first request served ({what}, {} gateways): p50 {:.1} ms, p99 {:.1} ms", times.len(), percentile(&times, 0.5), percentile(&times, 0.99));
    }
    drop((one, many));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
