//! The database rows: through a gateway's function, an indexed `findOne` in a collection of
//! `--database N` documents, and an `insertOne`, each with wrk on the proxy's core, on the
//! embedded engine and, given `--database-url`, on PostgreSQL.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::functions::{call, live, save, v1};
use crate::{Args, Weir, row, tempfile_dir, wrk_url};

const FILL: &str = r#"export default async (ctx) => {
  const c = imp.db().collection("people");
  if (ctx.query.index) return { index: await c.createIndex({ email: 1 }, { unique: true }) };
  const from = Number(ctx.query.from);
  await c.insertMany(Array.from({ length: 10000 }, (_, i) => ({ email: `u${from + i}@example.com`, n: from + i, name: "someone" })));
  return { filled: from };
}"#;
const FIND: &str = r#"export default async (ctx) => imp.db().collection("people").findOne({ email: `u${ctx.query.k}@example.com` })"#;
const INSERT: &str = r#"export default async () => imp.db().collection("log").insertOne({ at: Date.now(), note: "a line" })"#;

/// Fills gateway `gid` of `w` with `docs` documents (in batches of 10,000) and its index.
fn fill(w: &Weir, gid: &str, docs: usize) -> anyhow::Result<()> {
    let host = format!("{gid}.dev.localhost");
    let started = Instant::now();
    for from in (0..docs).step_by(10_000) {
        let (s, b, _) = call(w.port, "GET", &format!("/fill?from={from}"), &host, None)?;
        if s != 200 {
            bail!("filling {gid}: {s} {b}");
        }
    }
    let (s, b, _) = call(w.port, "GET", "/fill?index=1", &host, None)?;
    if s != 200 {
        bail!("indexing {gid}: {s} {b}");
    }
    eprintln!("{gid}: {docs} documents and their index in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

pub fn run(args: &Args, docs: usize) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    // A quota above what the rows store.
    let quota = "  quota: {documents: 100000000, bytes: 107374182400, queryMs: 5000}\n";
    let mut engines = vec![("embedded", format!("database:\n  type: embedded\n{quota}"))];
    if let Some(url) = &args.database_url {
        engines.push(("postgres", format!("database:\n  type: postgres\n  url: \"{url}\"\n  pool: 8\n{quota}")));
    }
    println!("Database: a function doing an indexed findOne among {docs} documents, and one doing insertOne; wrk -t1 -c{} -d{}s, weir on core {}", args.connections, args.duration, args.proxy_core);
    println!("{:<28} {:>9} {:>8} {:>8} {:>7} {:>9} {:>10} {:>7}", "", "req/s", "p50 ms", "p99 ms", "ratio", "CPU us/r", "req/core/s", "/core");
    for (i, (engine, extra)) in engines.iter().enumerate() {
        let w = Weir::start_with(args, &args.weir, &dir.join(format!("weir-{engine}")), 18192 + 2 * i as u16, extra)?;
        let gid = format!("db{i}");
        v1(&w, "POST", "api-gateways", &format!("{{\"name\":\"{gid}\",\"gatewayId\":\"{gid}\",\"limits\":{{\"timeoutMs\":10000,\"concurrency\":1024}}}}"))?;
        let started = Instant::now();
        while !v1(&w, "GET", &format!("api-gateways/{gid}"), "")?.contains("\"phase\":\"Started\"") {
            if started.elapsed() > Duration::from_secs(60) {
                bail!("gateway {gid} never started");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for (name, code) in [("fill", FILL), ("find", FIND), ("insert", INSERT)] {
            save(&w, &gid, name, code)?;
        }
        let host = format!("{gid}.dev.localhost");
        live(w.port, &host, "/find?k=1", "null", Instant::now())?;
        fill(&w, &gid, docs)?;
        let k = docs / 2 + 7;
        live(w.port, &host, &format!("/find?k={k}"), &format!("\"n\":{k}"), Instant::now())?;
        let header = format!("Host: {host}");
        let find = wrk_url(args, &format!("http://127.0.0.1:{}/find?k={k}", w.port), Some(w.proc.0.id()), &[&header])?;
        let insert = wrk_url(args, &format!("http://127.0.0.1:{}/insert", w.port), Some(w.proc.0.id()), &[&header])?;
        row(&format!("{engine}: indexed findOne"), &find, None);
        row(&format!("{engine}: insertOne"), &insert, None);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
