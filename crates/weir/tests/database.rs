//! Every gateway's database end to end, from functions over HTTP and through the data API,
//! against a real `weir` process: every method and operator, errors, quotas, transactions,
//! isolation between gateways and environments, indexes, export and import, deletion and
//! `kill -9`. Each scenario runs on the embedded engine and on a real PostgreSQL server.

mod common;

use std::time::Duration;

use common::platform::{fn_path, platform_weir_with, until_gateway, v1, v1_as};
use common::{Weir, send};
use serde_json::{Value, json};

/// Which engine a node keeps its databases on.
#[derive(Clone, Copy, Debug)]
enum Engine {
    Embedded,
    Postgres,
}

/// A node on its embedded store whose databases are on `engine`.
fn node(engine: Engine, pg: Option<&str>) -> Weir {
    let database = match engine {
        Engine::Embedded => "database:\n  type: embedded\n".to_string(),
        Engine::Postgres => format!("database:\n  type: postgres\n  url: \"{}\"\n  pool: 4\n", pg.expect("a PostgreSQL URL")),
    };
    platform_weir_with("  type: embedded\n  path: \"{data}\"\n", "  denied_networks: []\n", &database, &[])
}

async fn gateway(w: &Weir, gid: &str, extra: Value) -> () {
    let mut body = json!({"name": gid, "gatewayId": gid});
    body.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
    let (s, b) = v1(w, "POST", "api-gateways", Some(body)).await;
    assert_eq!(s, 201, "{b}");
    until_gateway(w, gid, |_, b| b["phase"] == "Started").await;
}

/// The files of gateway `gid`'s embedded databases (`{gid}.redb` or `{gid}.{...}.redb`).
fn db_files(w: &Weir, gid: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(w.data_dir().join("databases")) else { return Vec::new() };
    let mut names: Vec<String> = dir.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with(&format!("{gid}.")) && n.ends_with(".redb")).collect();
    names.sort();
    names
}

async fn function(w: &Weir, gid: &str, name: &str, code: &str) {
    let (s, b) = v1(w, "POST", &format!("api-gateways/{gid}/functions"), Some(json!({"name": name, "source": {"code": code}}))).await;
    assert_eq!(s, 201, "{b}");
}

/// Calls `/{env}/{name}` of gateway `gid` with `body` until it is live; status and JSON.
async fn call(w: &Weir, gid: &str, env: &str, name: &str, body: Value) -> (u16, Value) {
    let host = format!("{gid}.{env}.localhost");
    let text = body.to_string();
    for _ in 0..500 {
        let r = send(w.proxy, "POST", &format!("/{name}"), &[("host", &host), ("content-type", "application/json")], Some(&text)).await;
        if r.status != 404 {
            return (r.status, r.json());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{gid}/{env}/{name} never went live");
}

const EVERY_METHOD: &str = r#"
export default async () => {
  const db = imp.db();
  const users = db.collection("users");
  const out = {};
  out.insertOne = await users.insertOne({ _id: "u1", name: "Ada", age: 36, tags: ["math", "code"] });
  out.insertMany = await users.insertMany([{ _id: "u2", name: "Bob", age: 20 }, { _id: "u3", name: "Cy", age: 50, addr: { city: "Oslo" } }]);
  out.findOne = await users.findOne({ "addr.city": "Oslo" });
  out.find = await users.find({ age: { $gte: 20, $lt: 50 } }, { sort: { age: -1 }, projection: { name: 1 } }).toArray();
  out.cursor = await users.find({}).sort({ name: -1 }).skip(1).limit(1).toArray();
  out.or = await users.countDocuments({ $or: [{ age: { $gt: 40 } }, { tags: "math" }] });
  out.inNin = (await users.find({ name: { $in: ["Ada", "Cy"] }, age: { $nin: [50] } }).toArray()).map((d) => d._id);
  out.eqNe = [await users.countDocuments({ age: { $eq: 20 } }), await users.countDocuments({ name: { $ne: "Ada" } })];
  out.exists = await users.countDocuments({ addr: { $exists: true } });
  out.not = await users.countDocuments({ age: { $not: { $gt: 30 } } });
  out.regex = await users.countDocuments({ name: { $regex: "^b", $options: "i" } });
  out.and = await users.countDocuments({ $and: [{ age: { $gte: 20 } }, { age: { $lte: 36 } }] });
  out.updateOne = await users.updateOne({ _id: "u2" }, { $set: { "addr.city": "Rome" }, $inc: { age: 1 }, $push: { tags: "new" } });
  out.pull = await users.updateOne({ _id: "u1" }, { $pull: { tags: "math" } });
  out.updateMany = await users.updateMany({ age: { $lt: 40 } }, { $unset: { tags: "" } });
  out.upsert = await users.updateOne({ _id: "u4" }, { $set: { name: "Dee" } }, { upsert: true });
  out.replaceOne = await users.replaceOne({ _id: "u3" }, { name: "Cy II" });
  out.after = await users.find({}).toArray();
  out.deleteOne = await users.deleteOne({ _id: "u4" });
  out.deleteMany = await users.deleteMany({ age: { $lt: 30 } });
  out.createIndex = await users.createIndex({ name: 1 }, { unique: true });
  try { await users.insertOne({ name: "Ada" }); } catch (e) { out.duplicate = [e.name, e.code, e.status]; }
  out.dropIndex = await users.dropIndex("name_1");
  out.collections = await db.collections();
  out.drop = await users.drop();
  out.collectionsAfter = await db.collections();
  const events = db.collection("events");
  const r = await events.insertOne({ at: new Date(0), n: 1, nested: { list: [1, "two", null] } });
  out.generated = typeof r.insertedId === "string" && r.insertedId.length === 24;
  out.stored = await events.findOne({ _id: r.insertedId });
  delete out.stored._id;
  return out;
}
"#;

async fn every_method(engine: Engine, pg: Option<&str>) {
    let w = node(engine, pg);
    gateway(&w, "docs", json!({})).await;
    function(&w, "docs", "every", EVERY_METHOD).await;
    let (s, out) = call(&w, "docs", "dev", "every", json!({})).await;
    assert_eq!(s, 200, "{engine:?}: {out}");
    assert_eq!(out["insertOne"], json!({"acknowledged": true, "insertedId": "u1"}));
    assert_eq!(out["insertMany"], json!({"acknowledged": true, "insertedCount": 2, "insertedIds": {"0": "u2", "1": "u3"}}));
    assert_eq!(out["findOne"], json!({"_id": "u3", "name": "Cy", "age": 50, "addr": {"city": "Oslo"}}));
    assert_eq!(out["find"], json!([{"_id": "u1", "name": "Ada"}, {"_id": "u2", "name": "Bob"}]));
    assert_eq!(out["cursor"], json!([{"_id": "u2", "name": "Bob", "age": 20}]));
    assert_eq!((&out["or"], &out["inNin"], &out["eqNe"]), (&json!(2), &json!(["u1"]), &json!([1, 2])));
    assert_eq!((&out["exists"], &out["not"], &out["regex"], &out["and"]), (&json!(1), &json!(1), &json!(1), &json!(2)));
    let updated = json!({"acknowledged": true, "matchedCount": 1, "modifiedCount": 1, "upsertedId": null, "upsertedCount": 0});
    assert_eq!((&out["updateOne"], &out["pull"], &out["replaceOne"]), (&updated, &updated, &updated));
    assert_eq!(out["updateMany"], json!({"acknowledged": true, "matchedCount": 2, "modifiedCount": 2, "upsertedId": null, "upsertedCount": 0}));
    assert_eq!(out["upsert"], json!({"acknowledged": true, "matchedCount": 0, "modifiedCount": 0, "upsertedId": "u4", "upsertedCount": 1}));
    assert_eq!(
        out["after"],
        json!([
            {"_id": "u1", "name": "Ada", "age": 36},
            {"_id": "u2", "name": "Bob", "age": 21, "addr": {"city": "Rome"}},
            {"_id": "u3", "name": "Cy II"},
            {"_id": "u4", "name": "Dee"}
        ])
    );
    assert_eq!((&out["deleteOne"], &out["deleteMany"]), (&json!({"acknowledged": true, "deletedCount": 1}), &json!({"acknowledged": true, "deletedCount": 1})));
    assert_eq!((&out["createIndex"], &out["duplicate"], &out["dropIndex"]), (&json!("name_1"), &json!(["DatabaseError", "duplicate_key", 409]), &json!({"ok": 1})));
    assert_eq!((&out["collections"], &out["drop"], &out["collectionsAfter"]), (&json!(["users"]), &json!(true), &json!([])));
    assert_eq!((&out["generated"], &out["stored"]), (&json!(true), &json!({"at": "1970-01-01T00:00:00.000Z", "n": 1, "nested": {"list": [1, "two", null]}})));
}

const ERRORS: &str = r#"
export default async (ctx) => {
  const db = imp.db();
  const c = db.collection("things");
  const err = async (f) => { try { await f(); return "no error"; } catch (e) { return e.message; } };
  if (ctx.body.uncaught === "quota") { for (let i = 0; i < 10; i++) await c.insertOne({ i }); }
  if (ctx.body.uncaught === "slow") return await c.find({ s: { $regex: "(x|xx)+y$" } }).toArray();
  if (ctx.body.fill) { for (let i = 0; i < 4; i++) await c.insertMany(Array.from({ length: 5000 }, (_, j) => ({ s: "x".repeat(200) + j }))); return "filled"; }
  const out = {};
  out.where = await err(() => c.find({ $where: "1" }).toArray());
  out.nor = await err(() => c.countDocuments({ $nor: [{ a: 1 }] }));
  out.elemMatch = await err(() => c.findOne({ a: { $elemMatch: { b: 1 } } }));
  out.rename = await err(() => c.updateOne({}, { $rename: { a: "b" } }));
  out.reserved = await err(() => db.collection("__system").findOne({}));
  out.traversal = await err(() => db.collection("../other").findOne({}));
  out.lookalike = await err(() => db.collection("thing\u0455").findOne({}));
  out.long = await err(() => db.collection("x".repeat(5000)).findOne({}));
  out.notObject = await err(() => c.insertOne([1, 2]));
  out.dollarField = await err(() => c.insertOne({ $set: 1 }));
  await c.insertOne({ _id: "a", n: 1 });
  out.quota = await err(() => c.insertMany([{ n: 2 }, { n: 3 }, { n: 4 }]));
  const acct = db.collection("acct");
  await acct.insertOne({ _id: "a", bal: 10 });
  out.rollback = await err(() => db.transaction(async (tx) => {
    await tx.collection("acct").updateOne({ _id: "a" }, { $inc: { bal: -5 } });
    await tx.collection("acct").insertOne({ _id: "b", bal: 5 });
    out.inside = await tx.collection("acct").countDocuments({});
    throw new Error("changed my mind");
  }));
  out.afterRollback = await acct.find({}).toArray();
  out.commit = await db.transaction(async (tx) => {
    await tx.collection("acct").updateOne({ _id: "a" }, { $inc: { bal: -5 } });
    await tx.collection("acct").insertOne({ _id: "b", bal: 5 });
    return "done";
  });
  out.afterCommit = await acct.find({}).toArray();
  return out;
}
"#;

async fn errors_quotas_and_transactions(engine: Engine, pg: Option<&str>) {
    let w = node(engine, pg);
    gateway(&w, "errs", json!({"limits": {"dbDocuments": 3}})).await;
    function(&w, "errs", "errors", ERRORS).await;
    let (s, out) = call(&w, "errs", "dev", "errors", json!({})).await;
    assert_eq!(s, 200, "{engine:?}: {out}");
    for (field, says) in [
        ("where", "$where"),
        ("nor", "$nor"),
        ("elemMatch", "$elemMatch"),
        ("rename", "$rename"),
        ("reserved", "reserved"),
        ("traversal", "collection name"),
        ("lookalike", "collection name"),
        ("long", "collection name"),
        ("notObject", "JSON object"),
        ("dollarField", "field name"),
        ("quota", "quota exceeded"),
        ("rollback", "changed my mind"),
    ] {
        assert!(out[field].as_str().unwrap().contains(says), "{engine:?} {field}: {}", out[field]);
    }
    assert_eq!((&out["inside"], &out["afterRollback"]), (&json!(2), &json!([{"_id": "a", "bal": 10}])));
    assert_eq!((&out["commit"], &out["afterCommit"]), (&json!("done"), &json!([{"_id": "a", "bal": 5}, {"_id": "b", "bal": 5}])));
    // Uncaught: the quota is 507, a query past its time 504, as JSON.
    let (s, b) = call(&w, "errs", "dev", "errors", json!({"uncaught": "quota"})).await;
    assert_eq!((s, b["error_msg"].as_str().unwrap().contains("quota exceeded")), (507, true), "{b}");
    let (s, b) = v1(&w, "PATCH", "api-gateways/errs", Some(json!({"limits": {"dbDocuments": 100000, "dbQueryMs": 1}}))).await;
    assert_eq!(s, 200, "{b}");
    until_gateway(&w, "errs", |_, b| b["phase"] == "Started").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, b) = call(&w, "errs", "dev", "errors", json!({"fill": true})).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = call(&w, "errs", "dev", "errors", json!({"uncaught": "slow"})).await;
    assert_eq!((s, b["error_msg"].as_str().unwrap().contains("ran past")), (504, true), "{b}");
}

const WRITE_SECRET: &str = r#"export default async (ctx) => { await imp.db().collection("secrets").insertOne({ _id: "k", owner: ctx.body.owner }); return "ok"; }"#;
const READ_EVERYTHING: &str = r#"
export default async () => {
  const db = imp.db();
  const seen = {};
  for (const name of ["secrets", "../iso-a/secrets", "iso-a.secrets", "__secrets", "iso-a", "ѕecrets", "secrets%00", "secrets\u0000"]) {
    try { seen[name] = await db.collection(name).findOne({}); } catch (e) { seen[name] = "refused"; }
  }
  seen.collections = await db.collections();
  return seen;
}
"#;

async fn isolation(engine: Engine, pg: Option<&str>) {
    let w = node(engine, pg);
    gateway(&w, "iso-a", json!({})).await;
    gateway(&w, "iso-b", json!({})).await;
    gateway(&w, "iso-c", json!({"databaseIsolation": "environment"})).await;
    function(&w, "iso-a", "write", WRITE_SECRET).await;
    function(&w, "iso-b", "read", READ_EVERYTHING).await;
    assert_eq!(call(&w, "iso-a", "dev", "write", json!({"owner": "a"})).await.0, 200);
    let (s, seen) = call(&w, "iso-b", "dev", "read", json!({})).await;
    assert_eq!(s, 200, "{seen}");
    assert_eq!(seen["secrets"], Value::Null, "{engine:?}: B sees none of A's data: {seen}");
    assert_eq!(seen["collections"], json!([]), "{seen}");
    for (name, v) in seen.as_object().unwrap() {
        assert!(*v == Value::Null || v == "refused" || name == "collections", "{engine:?} {name}: {v}");
    }
    // Gateway-wide by default: every environment of A shares its database.
    function(&w, "iso-a", "read", READ_EVERYTHING).await;
    assert_eq!(v1(&w, "POST", &format!("{}/deploy-to-stage", fn_path("iso-a", "dev/read")), Some(json!({"targetStage": "prod"}))).await.0, 200);
    let (_, prod) = call(&w, "iso-a", "prod", "read", json!({})).await;
    assert_eq!(prod["secrets"], json!({"_id": "k", "owner": "a"}));
    // Per environment when the gateway was made so: staging does not see dev's.
    function(&w, "iso-c", "write", WRITE_SECRET).await;
    function(&w, "iso-c", "read", READ_EVERYTHING).await;
    assert_eq!(v1(&w, "POST", &format!("{}/deploy-to-stage", fn_path("iso-c", "dev/read")), Some(json!({"targetStage": "staging"}))).await.0, 200);
    assert_eq!(call(&w, "iso-c", "dev", "write", json!({"owner": "c-dev"})).await.0, 200);
    let (_, dev) = call(&w, "iso-c", "dev", "read", json!({})).await;
    let (_, staging) = call(&w, "iso-c", "staging", "read", json!({})).await;
    assert_eq!((&dev["secrets"]["owner"], &staging["secrets"]), (&json!("c-dev"), &Value::Null));
    // The data API: a token of B reaches B's database only.
    let (_, t) = v1(&w, "POST", "tokens", Some(json!({"name": "b", "role": "owner", "gateways": ["iso-b"]}))).await;
    let token = t["token"].as_str().unwrap();
    assert_eq!(v1_as(&w, token, "GET", "api-gateways/iso-a/database/collections/secrets/documents", None).await.0, 404);
    assert_eq!(v1_as(&w, token, "GET", "api-gateways/iso-b/database/collections/secrets/documents", None).await.1["total"], 0);
    // The isolation setting is fixed once the gateway is made.
    assert_eq!(v1(&w, "PATCH", "api-gateways/iso-a", Some(json!({"databaseIsolation": "environment"}))).await.0, 400);
}

async fn data_api(engine: Engine, pg: Option<&str>) {
    let w = node(engine, pg);
    gateway(&w, "data", json!({})).await;
    gateway(&w, "copy", json!({})).await;
    let docs = "api-gateways/data/database/collections/orders/documents";
    for (i, item) in ["pen", "ink", "pad"].iter().enumerate() {
        let (s, b) = v1(&w, "POST", docs, Some(json!({"_id": format!("o{i}"), "item": item, "qty": i + 1}))).await;
        assert_eq!((s, &b["insertedId"]), (201, &json!(format!("o{i}"))), "{b}");
    }
    let filter = "filter=%7B%22qty%22%3A%7B%22%24gte%22%3A2%7D%7D&sort=%7B%22qty%22%3A-1%7D&limit=1";
    let (s, b) = v1(&w, "GET", &format!("{docs}?{filter}"), None).await;
    assert_eq!((s, &b["list"]), (200, &json!([{"_id": "o2", "item": "pad", "qty": 3}])), "{b}");
    let (s, b) = v1(&w, "GET", &format!("{docs}?filter=%7B%22%24where%22%3A1%7D"), None).await;
    assert_eq!((s, b["error"]["message"].as_str().unwrap().contains("$where")), (400, true), "{b}");
    assert_eq!(v1(&w, "GET", &format!("{docs}?filter=nope"), None).await.0, 400);
    assert_eq!(v1(&w, "GET", &format!("{docs}/o1"), None).await.1, json!({"_id": "o1", "item": "ink", "qty": 2}));
    let (s, b) = v1(&w, "PUT", &format!("{docs}/o1"), Some(json!({"item": "ink", "qty": 20}))).await;
    assert_eq!((s, &b["document"]), (200, &json!({"_id": "o1", "item": "ink", "qty": 20})), "{b}");
    assert_eq!(v1(&w, "DELETE", &format!("{docs}/o0"), None).await.0, 200);
    assert_eq!(v1(&w, "GET", &format!("{docs}/o0"), None).await.0, 404);
    assert_eq!(v1(&w, "GET", "api-gateways/data/database/collections/__x/documents", None).await.0, 400);
    let (_, c) = v1(&w, "GET", "api-gateways/data/database/collections", None).await;
    assert_eq!((&c["list"][0]["name"], &c["list"][0]["documents"]), (&json!("orders"), &json!(2)), "{c}");
    // A viewer reads and never writes.
    let (_, t) = v1(&w, "POST", "tokens", Some(json!({"name": "v", "role": "viewer", "gateways": ["data"]}))).await;
    let viewer = t["token"].as_str().unwrap();
    assert_eq!(v1_as(&w, viewer, "GET", docs, None).await.0, 200);
    assert_eq!(v1_as(&w, viewer, "POST", docs, Some(json!({"x": 1}))).await.0, 403);
    assert_eq!(v1_as(&w, viewer, "DELETE", &format!("{docs}/o1"), None).await.0, 403);
    // The gateway's one database is dev's to write, whichever environment a request names: a
    // qa token reads it and writes none of it.
    let (_, t) = v1(&w, "POST", "tokens", Some(json!({"name": "q", "role": "qa", "gateways": ["data"]}))).await;
    let qa = t["token"].as_str().unwrap();
    assert_eq!(v1_as(&w, qa, "GET", &format!("{docs}?environment=staging"), None).await.1["total"], 2);
    let (s, b) = v1_as(&w, qa, "POST", &format!("{docs}?environment=staging"), Some(json!({"x": 1}))).await;
    assert_eq!(s, 403, "{b}");
    assert_eq!(v1_as(&w, qa, "DELETE", &format!("{docs}/o1?environment=staging"), None).await.0, 403);
    // Export, then import into another gateway: the same documents.
    let r = send(w.admin, "GET", "/v1/api-gateways/data/database/export", &[("x-api-key", common::KEY)], None).await;
    assert_eq!((r.status, r.headers["content-type"].to_str().unwrap()), (200, "application/x-ndjson"));
    let lines = r.text();
    assert_eq!(lines.lines().count(), 2, "{lines}");
    let r = send(w.admin, "POST", "/v1/api-gateways/copy/database/import", &[("x-api-key", common::KEY)], Some(&lines)).await;
    assert_eq!((r.status, r.json()["imported"].clone()), (200, json!(2)), "{}", r.text());
    let r2 = send(w.admin, "GET", "/v1/api-gateways/copy/database/export", &[("x-api-key", common::KEY)], None).await;
    assert_eq!(r2.text(), lines);
    let r = send(w.admin, "POST", "/v1/api-gateways/copy/database/import", &[("x-api-key", common::KEY)], Some("{\"collection\": \"x\"}\nnot json")).await;
    assert_eq!(r.status, 400, "{}", r.text());
    // An import the database refuses part of (past its quota) writes none of it.
    gateway(&w, "tiny", json!({"limits": {"dbDocuments": 1}})).await;
    let r = send(w.admin, "POST", "/v1/api-gateways/tiny/database/import", &[("x-api-key", common::KEY)], Some(&lines)).await;
    assert_eq!((r.status, r.json()["error"]["kind"].clone()), (507, json!("quota")), "{}", r.text());
    let r = send(w.admin, "GET", "/v1/api-gateways/tiny/database/export", &[("x-api-key", common::KEY)], None).await;
    assert_eq!((r.status, r.text()), (200, String::new()));
    // A replace adds the document it names and answers with it as written; one past the quota
    // writes nothing.
    let tiny = "api-gateways/tiny/database/collections/c/documents";
    let (s, b) = v1(&w, "PUT", &format!("{tiny}/a"), Some(json!({"n": 1}))).await;
    assert_eq!((s, &b["document"], &b["result"]["upsertedCount"]), (200, &json!({"_id": "a", "n": 1}), &json!(1)), "{b}");
    let (s, b) = v1(&w, "PUT", &format!("{tiny}/b"), Some(json!({"n": 2}))).await;
    assert_eq!((s, &b["error"]["kind"]), (507, &json!("quota")), "{b}");
    assert_eq!(v1(&w, "GET", &format!("{tiny}/b"), None).await.0, 404);
    // Deleting a gateway deletes its database.
    if let Engine::Embedded = engine {
        assert_eq!(db_files(&w, "data").len(), 1);
    }
    assert_eq!(v1(&w, "DELETE", "api-gateways/data", None).await.0, 202);
    until_gateway(&w, "data", |s, _| s == 404).await;
    if let Engine::Embedded = engine {
        // Its file goes just after its document.
        for _ in 0..300 {
            if db_files(&w, "data").is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(db_files(&w, "data"), Vec::<String>::new(), "the file is removed with its gateway");
    }
    gateway(&w, "data", json!({})).await;
    assert_eq!(v1(&w, "GET", "api-gateways/data/database/collections", None).await.1["total"], 0, "a new gateway of the old name starts empty");
    assert_eq!(v1(&w, "GET", &format!("{docs}/o1"), None).await.0, 404);
}

#[tokio::test]
async fn every_method_and_operator_answers_as_mongodb_does_on_embedded() {
    every_method(Engine::Embedded, None).await;
}

#[tokio::test]
async fn errors_quotas_and_transactions_on_embedded() {
    errors_quotas_and_transactions(Engine::Embedded, None).await;
}

#[tokio::test]
async fn a_function_reaches_only_its_own_gateways_database_on_embedded() {
    isolation(Engine::Embedded, None).await;
}

#[tokio::test]
async fn the_data_api_reads_writes_exports_and_imports_on_embedded() {
    data_api(Engine::Embedded, None).await;
}

/// Set up by a call that outlives its gateway: it plants a global and a log line, waits, and
/// then writes to its database.
const LINGER: &str = r#"
export default async (ctx) => {
  globalThis.planted = "the deleted gateway's";
  console.log("a line of the deleted gateway");
  await new Promise((r) => setTimeout(r, ctx.body.wait));
  try { await imp.db().collection("planted").insertOne({ _id: "p" }); return "wrote"; } catch (e) { return "refused"; }
}
"#;

/// What the gateway made again under the same id finds.
const LOOK: &str = r#"
export default async () => ({ planted: globalThis.planted ?? null, docs: await imp.db().collection("planted").find({}).toArray() })
"#;

#[tokio::test]
async fn a_gateway_made_again_under_a_deleted_ones_id_finds_nothing_of_it() {
    let w = node(Engine::Embedded, None);
    gateway(&w, "again", json!({})).await;
    function(&w, "again", "linger", LINGER).await;
    // Live, then a call that is still running when the gateway goes and comes back.
    let (proxy, host) = (w.proxy, "again.dev.localhost".to_string());
    let first = call(&w, "again", "dev", "linger", json!({"wait": 0}));
    let (s, _) = tokio::time::timeout(Duration::from_secs(10), first).await.expect("the first call ends");
    assert_eq!(s, 200);
    // Long enough for the gateway to go and come back on a slow machine.
    let lingering = tokio::spawn(async move { send(proxy, "POST", "/linger", &[("host", &host), ("content-type", "application/json")], Some("{\"wait\": 10000}")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(v1(&w, "DELETE", "api-gateways/again", None).await.0, 202);
    until_gateway(&w, "again", |s, _| s == 404).await;
    gateway(&w, "again", json!({})).await;
    function(&w, "again", "linger", LOOK).await;
    let (s, seen) = call(&w, "again", "dev", "linger", json!({})).await;
    assert!(!lingering.is_finished(), "the earlier gateway's call still runs while the new gateway answers");
    assert_eq!((s, &seen["planted"]), (200, &Value::Null), "the new gateway runs on a runtime of its own: {seen}");
    let (_, logs) = v1(&w, "GET", &format!("{}/logs?limit=100", fn_path("again", "dev/linger")), None).await;
    assert!(!logs.to_string().contains("deleted gateway"), "the new gateway's logs hold none of the earlier one's: {logs}");
    // The earlier call ends refused: its database was deleted and is not made again.
    let late = lingering.await.unwrap();
    assert_eq!(late.text(), "refused");
    assert_eq!(call(&w, "again", "dev", "linger", json!({})).await.1["docs"], json!([]));
    assert_eq!(db_files(&w, "again").len(), 1, "one database file, the new gateway's: {:?}", db_files(&w, "again"));
}

const INDEXED: &str = r#"
export default async (ctx) => {
  const c = imp.db().collection("people");
  if (ctx.body.fill) {
    for (let b = 0; b < 10; b++) await c.insertMany(Array.from({ length: 5000 }, (_, i) => ({ email: `u${b * 5000 + i}@x`, n: i })));
    await c.createIndex({ email: 1 }, { unique: true });
    return { filled: true };
  }
  return { plan: await c.find({ email: "u31337@x" }).explain(), doc: await c.findOne({ email: "u31337@x" }, { projection: { _id: 0 } }), scan: await c.find({ n: 7 }).explain() };
}
"#;

#[tokio::test]
async fn indexed_lookups_use_the_index_and_do_not_scan() {
    let w = node(Engine::Embedded, None);
    gateway(&w, "idx", json!({"limits": {"timeoutMs": 10000}})).await;
    function(&w, "idx", "q", INDEXED).await;
    assert_eq!(call(&w, "idx", "dev", "q", json!({"fill": true})).await, (200, json!({"filled": true})));
    let (s, b) = call(&w, "idx", "dev", "q", json!({})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!((&b["plan"]["index"], &b["plan"]["docsExamined"]), (&json!("email_1"), &json!(1)), "{b}");
    assert_eq!(b["doc"], json!({"email": "u31337@x", "n": 1337}));
    assert_eq!((&b["scan"]["index"], &b["scan"]["docsExamined"]), (&Value::Null, &json!(50_000)), "without an index it scans: {b}");
}

#[tokio::test]
async fn every_acknowledged_insert_survives_kill_9() {
    let w = node(Engine::Embedded, None);
    gateway(&w, "crash", json!({})).await;
    function(&w, "crash", "put", r#"export default async (ctx) => imp.db().collection("log").insertOne({ _id: ctx.body.i })"#).await;
    assert_eq!(call(&w, "crash", "dev", "put", json!({"i": 0})).await.0, 200);
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for t in 0..4u64 {
        let (proxy, acked) = (w.proxy, acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 1.. {
                let body = json!({"i": t * 1_000_000 + i}).to_string();
                let r = send(proxy, "POST", "/put", &[("host", "crash.dev.localhost"), ("content-type", "application/json")], Some(&body)).await;
                if r.status != 200 {
                    return;
                }
                acked.lock().unwrap().push(t * 1_000_000 + i);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cfg = w.data_dir().parent().unwrap().join("weir.yaml");
    let dir = w.kill9();
    for wr in writers {
        let _ = wr.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 20, "{} inserts acknowledged before the kill", acked.len());
    let w = Weir::spawn(dir, &cfg, &[]);
    let r = send(w.admin, "GET", "/v1/api-gateways/crash/database/export", &[("x-api-key", common::KEY)], None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let stored: std::collections::HashSet<u64> = r.text().lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["document"]["_id"].as_u64().unwrap()).collect();
    let lost: Vec<&u64> = acked.iter().filter(|i| !stored.contains(i)).collect();
    assert!(lost.is_empty(), "{} acknowledged inserts lost: {:?}", lost.len(), &lost[..lost.len().min(10)]);
}

#[path = "../../weir-database/tests/common/pg.rs"]
#[allow(dead_code)]
mod pg;

/// The shared test server and a new database on it (made off the async thread, as the
/// PostgreSQL client blocks).
fn pg_database(label: &'static str) -> (std::sync::Arc<pg::PgServer>, String) {
    std::thread::spawn(move || {
        let server = pg::PgServer::shared();
        let url = server.database(label);
        (server, url)
    })
    .join()
    .unwrap()
}

#[tokio::test]
async fn every_method_and_operator_answers_as_mongodb_does_on_postgres() {
    let (_server, url) = pg_database("every");
    every_method(Engine::Postgres, Some(&url)).await;
}

#[tokio::test]
async fn errors_quotas_and_transactions_on_postgres() {
    let (_server, url) = pg_database("errors");
    errors_quotas_and_transactions(Engine::Postgres, Some(&url)).await;
}

#[tokio::test]
async fn a_function_reaches_only_its_own_gateways_database_on_postgres() {
    let (_server, url) = pg_database("isolation");
    isolation(Engine::Postgres, Some(&url)).await;
}

#[tokio::test]
async fn the_data_api_reads_writes_exports_and_imports_on_postgres() {
    let (_server, url) = pg_database("data_api");
    data_api(Engine::Postgres, Some(&url)).await;
}

/// Two nodes on one etcd and one PostgreSQL: what a function writes on one is read at once on
/// the other; and an export of the embedded engine imports into PostgreSQL as the same
/// documents.
#[tokio::test]
async fn nodes_sharing_postgres_see_each_others_writes_and_embedded_exports_import_into_it() {
    let (_server, url) = pg_database("shared");
    let etcd = common::Etcd::start().await;
    let store = format!("  type: etcd\n  etcd:\n    endpoints: [\"{}\"]\n    timeout: 2\n", etcd.endpoint());
    let database = format!("database:\n  type: postgres\n  url: \"{url}\"\n  pool: 2\n");
    let a = platform_weir_with(&store, "  lease_timeout: 2\n  denied_networks: []\n", &database, &[]);
    let b = platform_weir_with(&store, "  lease_timeout: 2\n  denied_networks: []\n", &database, &[]);
    gateway(&a, "both", json!({})).await;
    function(&a, "both", "put", r#"export default async (ctx) => imp.db().collection("c").insertOne(ctx.body)"#).await;
    function(&a, "both", "get", r#"export default async (ctx) => ({ doc: await imp.db().collection("c").findOne({ _id: ctx.body.id }) })"#).await;
    call(&b, "both", "dev", "get", json!({"id": "none"})).await;
    for i in 0..20 {
        let id = format!("d{i}");
        let (s, _) = call(&a, "both", "dev", "put", json!({"_id": id, "i": i})).await;
        assert_eq!(s, 200);
        let (s, got) = call(&b, "both", "dev", "get", json!({"id": id})).await;
        assert_eq!((s, &got["doc"]), (200, &json!({"_id": id, "i": i})), "node B reads node A's write at once");
    }

    let e = node(Engine::Embedded, None);
    gateway(&e, "move", json!({})).await;
    for (i, doc) in [json!({"_id": "x", "list": [1, {"a": null}], "s": "é"}), json!({"_id": "y", "n": 1.5, "z": false})].iter().enumerate() {
        let coll = if i == 0 { "first" } else { "second" };
        assert_eq!(v1(&e, "POST", &format!("api-gateways/move/database/collections/{coll}/documents"), Some(doc.clone())).await.0, 201);
    }
    let exported = send(e.admin, "GET", "/v1/api-gateways/move/database/export", &[("x-api-key", common::KEY)], None).await.text();
    gateway(&a, "move", json!({})).await;
    let r = send(a.admin, "POST", "/v1/api-gateways/move/database/import", &[("x-api-key", common::KEY)], Some(&exported)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let again = send(b.admin, "GET", "/v1/api-gateways/move/database/export", &[("x-api-key", common::KEY)], None).await.text();
    assert_eq!(again, exported, "PostgreSQL holds the same documents");
    let stats = |w: &Weir| {
        let admin = w.admin;
        async move { send(admin, "GET", "/v1/api-gateways/move/database/collections", &[("x-api-key", common::KEY)], None).await.json() }
    };
    assert_eq!(stats(&e).await, stats(&b).await, "and the same counts and sizes");
    drop((a, b, etcd));
}

/// A large answer (here an export) is counted against its gateway's share while a client that
/// does not read holds it: more of the gateway's is refused with 503 and `Retry-After`, another
/// gateway's is answered, and the share comes back when the connection ends.
#[tokio::test]
async fn a_large_answer_a_client_does_not_read_counts_against_its_gateway_until_it_goes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = platform_weir_with(
        "  type: embedded\n  path: \"{data}\"\n",
        "  denied_networks: []\n  large_answers:\n    per_gateway_bytes: 41943040\n    node_bytes: 62914560\n",
        "database:\n  type: embedded\n",
        &[],
    );
    gateway(&w, "big", json!({})).await;
    gateway(&w, "other", json!({})).await;
    // About 1.2 MB of JSON lines an import, under the Admin API's body bound.
    let chunk = |round: usize| -> String {
        (0..12).map(|i| json!({"collection": "c", "document": {"_id": format!("{round}-{i}"), "pad": "x".repeat(100_000)}}).to_string() + "\n").collect()
    };
    for round in 0..24 {
        let r = send(w.admin, "POST", "/v1/api-gateways/big/database/import", &[("x-api-key", common::KEY)], Some(&chunk(round))).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = send(w.admin, "POST", "/v1/api-gateways/other/database/import", &[("x-api-key", common::KEY)], Some(&chunk(0))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let admin = w.admin;
    let export = |gid: &'static str| async move { send(admin, "GET", &format!("/v1/api-gateways/{gid}/database/export"), &[("x-api-key", common::KEY)], None).await };
    let whole = export("big").await;
    assert_eq!((whole.status, whole.text().lines().count()), (200, 24 * 12));
    assert!(whole.text().len() > 28_000_000);

    // A client asks for it and reads only the first bytes: far more than the sockets buffer
    // stays with the node.
    let mut slow = tokio::net::TcpStream::connect(w.admin).await.unwrap();
    let head = format!("GET /v1/api-gateways/big/database/export HTTP/1.1\r\nhost: {}\r\nx-api-key: {}\r\n\r\n", w.admin, common::KEY);
    slow.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    slow.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let r = export("big").await;
    assert_eq!((r.status, r.headers.get("retry-after").map(|v| v.to_str().unwrap().to_string())), (503, Some("1".into())), "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("platform.large_answers"), "{}", r.text());
    // So is a page of documents as large, and a small one is answered.
    let page = |limit: usize| async move { send(admin, "GET", &format!("/v1/api-gateways/big/database/collections/c/documents?limit={limit}"), &[("x-api-key", common::KEY)], None).await };
    let r = page(1000).await;
    assert_eq!((r.status, r.headers.get("retry-after").map(|v| v.to_str().unwrap().to_string())), (503, Some("1".into())), "{}", r.text());
    let r = page(2).await;
    assert_eq!((r.status, r.json()["total"].clone()), (200, json!(2)));
    let r = export("other").await;
    assert_eq!((r.status, r.text().lines().count()), (200, 12), "another gateway's large answer fits beside it");
    // The connection ends; its answer is let go, and the gateway's next one is answered.
    drop(slow);
    let mut again = export("big").await;
    for _ in 0..200 {
        if again.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        again = export("big").await;
    }
    assert_eq!((again.status, again.text().len()), (200, whole.text().len()));
}
