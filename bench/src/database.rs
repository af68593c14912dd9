//! The database rows: through a gateway's function, an indexed `findOne` in a collection of
//! `--database N` documents, and an `insertOne`, each with wrk on the proxy's core, on the
//! embedded engine and on PostgreSQL: the server at `--database-url`, or else one of its own
//! started as the tests start theirs (Debian's `postgresql` package, in a temporary directory,
//! pinned off the proxy core), its rows skipped when PostgreSQL is not installed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::functions::{call, live, save, v1};
use crate::{Args, Weir, other_cores, row, tempfile_dir, wrk_url};

#[path = "../../crates/weir-database/tests/common/pg.rs"]
#[allow(dead_code)] // the tests use more of the harness than the rows
mod pg;

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

/// Why no PostgreSQL server can be started here, if none can: the test server's programs are
/// in `WEIR_PG_BIN`, or else under /usr/lib/postgresql/<version>/bin.
fn postgres_missing() -> Option<String> {
    let found = match std::env::var_os("WEIR_PG_BIN") {
        Some(dir) => vec![PathBuf::from(dir)],
        None => std::fs::read_dir("/usr/lib/postgresql").into_iter().flatten().flatten().map(|e| e.path().join("bin")).collect(),
    };
    if found.iter().any(|bin| bin.join("postgres").exists() && bin.join("initdb").exists()) {
        return None;
    }
    Some(match std::env::var_os("WEIR_PG_BIN") {
        Some(dir) => format!("no initdb and postgres in WEIR_PG_BIN ({})", Path::new(&dir).display()),
        None => "PostgreSQL is not installed (apt-get install -y postgresql, or set WEIR_PG_BIN, or give --database-url)".into(),
    })
}

/// Pins `server` to `cores`: its postmaster and the processes it has started; those it forks
/// later (a backend for each connection) inherit the postmaster's affinity.
fn pin(server: &pg::PgServer, cores: &str) -> anyhow::Result<()> {
    let data: String = server.admin().query_one("SHOW data_directory", &[])?.get(0);
    let text = std::fs::read_to_string(Path::new(&data).join("postmaster.pid")).context("reading postmaster.pid")?;
    let pid: u32 = text.lines().next().and_then(|l| l.trim().parse().ok()).context("a PID in postmaster.pid")?;
    let mut pids = vec![pid];
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        pids.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
    }
    for p in pids {
        let ok = Command::new("taskset").args(["-p", "-c", cores, &p.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).status().context("running taskset")?.success();
        // A background process may have ended meanwhile; the postmaster may not.
        if !ok && p == pid {
            bail!("taskset could not pin the PostgreSQL server ({pid}) to cores {cores}");
        }
    }
    Ok(())
}

pub fn run(args: &Args, docs: usize) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    // A quota above what the rows store.
    let quota = "  quota: {documents: 100000000, bytes: 107374182400, queryMs: 5000}\n";
    let mut engines = vec![("embedded", format!("database:\n  type: embedded\n{quota}"))];
    // The server started here lives until the rows are done (after every Weir connected to it).
    let mut server = None;
    let url = match &args.database_url {
        Some(url) => Some(url.clone()),
        None => match postgres_missing() {
            Some(why) => {
                println!("postgres: rows skipped: {why}");
                None
            }
            None => {
                let other = other_cores(args.proxy_core);
                let started = Instant::now();
                let s = server.insert(pg::PgServer::start());
                pin(s, &other)?;
                let url = s.database("bench");
                eprintln!("PostgreSQL started on cores {other} in {:.1}s: {url}", started.elapsed().as_secs_f64());
                Some(url)
            }
        },
    };
    if let Some(url) = url {
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
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
