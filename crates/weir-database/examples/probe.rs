//! A quick throughput probe of both engines through `Databases::execute`, one thread: N
//! `insertOne` into a collection with a unique index, then N `findOne` through that index;
//! and, on PostgreSQL, two nodes each making 200 `$inc` on one document.
//!
//! `cargo run --release -p weir-database --example probe [N]` (N defaults to 10000). It starts
//! a PostgreSQL of its own as the tests do (see `tests/common/pg.rs`), or uses the database at
//! `WEIR_PROBE_PG_URL` when that is set.

#[path = "../tests/common/pg.rs"]
#[allow(dead_code)] // the tests use more of the harness than the probe
mod pg;

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use weir_database::{Databases, DbErrorKind, Opener, Quota, embedded};

fn run(d: &Databases, req: Value) -> Value {
    d.execute("probe", &Quota::default(), &req).unwrap()
}

fn rate(n: usize, since: Instant) -> String {
    let secs = since.elapsed().as_secs_f64();
    format!("{:>8.0} ops/s ({n} in {secs:.2} s)", n as f64 / secs)
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let (_server, url) = match std::env::var("WEIR_PROBE_PG_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let server = pg::PgServer::start();
            let url = server.database("probe");
            (Some(server), url)
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let engines: [(&str, Opener); 2] = [("embedded", embedded::opener(dir.path().to_path_buf())), ("postgres", weir_database::postgres::opener(url, 4))];
    for (label, opener) in engines {
        let d = Databases::new(opener.clone());
        run(&d, json!({"op": "createIndex", "collection": "users", "keys": {"email": 1}, "options": {"unique": true}}));
        let t = Instant::now();
        for i in 0..n {
            run(&d, json!({"op": "insertOne", "collection": "users", "doc": {"email": format!("u{i}@example.com"), "n": i, "name": "someone"}}));
        }
        println!("{label:>8} insertOne {}", rate(n, t));
        let t = Instant::now();
        for i in 0..n {
            let found = run(&d, json!({"op": "findOne", "collection": "users", "filter": {"email": format!("u{i}@example.com")}}));
            assert_eq!(found["n"], i);
        }
        println!("{label:>8} findOne   {}", rate(n, t));
        if label == "postgres" {
            increments(opener);
        }
    }
}

/// Two nodes, one thread each, 200 `$inc` each on one document: how long, and how many came
/// back as conflicts after the operation's own tries (then tried again here).
fn increments(opener: Opener) {
    const EACH: usize = 200;
    let nodes = [Databases::new(opener.clone()), Databases::new(opener)];
    run(&nodes[0], json!({"op": "insertOne", "collection": "counter", "doc": {"_id": "n", "n": 0}}));
    let t = Instant::now();
    let threads = nodes.clone().map(|d: Arc<Databases>| {
        std::thread::spawn(move || {
            let mut surfaced = 0;
            for _ in 0..EACH {
                while let Err(e) = d.execute("probe", &Quota::default(), &json!({"op": "updateOne", "collection": "counter", "filter": {"_id": "n"}, "update": {"$inc": {"n": 1}}})) {
                    assert_eq!(e.kind, DbErrorKind::Conflict, "{e:?}");
                    surfaced += 1;
                }
            }
            surfaced
        })
    });
    let surfaced: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let n = run(&nodes[0], json!({"op": "findOne", "collection": "counter", "filter": {"_id": "n"}}))["n"].clone();
    println!("postgres 2 nodes x {EACH} $inc: n = {n}, {}, {surfaced} conflicts surfaced", rate(2 * EACH, t));
}
