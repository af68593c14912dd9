//! Every gateway's database (`weir_database`): how functions reach it (`runner`), and the data
//! API operators and the console read and change it with
//! (`/v1/api-gateways/{gid}/database/...`).
//!
//! Functions name no database: the environment document the reconciler writes (`EnvDoc`)
//! carries the one they reach, so a function reaches its own gateway's database and no other
//! whatever it sends. The quotas are the gateway's where it set them, never above the node's.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};
use weir_core::error::ErrorKind;
use weir_database::{Databases, DbError, DbErrorKind, Quota};
use weir_functions::lanes::Lanes;
use weir_functions::{DbRequest, DbRunner, DbScope};

use crate::Platform;
use crate::api::{Reply, bad_input, failure, json, not_found, store_down};
use crate::model::{ENVIRONMENTS, Gateway, Isolation};
use crate::tokens::Caller;

/// Documents a data API read answers at most.
const PAGE_MAX: u64 = 1000;

/// The quota of a database: the gateway's limits, within the node's.
pub fn quota(node: &Quota, scope: &DbScope) -> Quota {
    Quota {
        documents: scope.limits.documents.map_or(node.documents, |d| d.min(node.documents)),
        bytes: scope.limits.bytes.map_or(node.bytes, |b| b.min(node.bytes)),
        query_ms: scope.limits.query_ms.map_or(node.query_ms, |q| q.min(node.query_ms)),
    }
}

/// Functions' database operations running at once on the node's blocking threads, for all
/// gateways and for one (the others wait their turn): the embedded store runs on those
/// threads too.
const OPERATIONS: usize = 64;
const OPERATIONS_PER_GATEWAY: usize = 8;

/// The places of database work on the node: functions' operations and the data API's alike.
fn lanes() -> &'static Arc<Lanes> {
    static LANES: std::sync::OnceLock<Arc<Lanes>> = std::sync::OnceLock::new();
    LANES.get_or_init(|| Arc::new(Lanes::new(OPERATIONS, OPERATIONS_PER_GATEWAY)))
}

/// An export holds its database's JSON lines in memory until sent: at most this many bytes,
/// and at most two exports on the node at once, one per gateway.
const EXPORT_MAX: usize = 64 << 20;

fn export_lanes() -> &'static Lanes {
    static LANES: std::sync::OnceLock<Lanes> = std::sync::OnceLock::new();
    LANES.get_or_init(|| Lanes::new(2, 1))
}

/// Runs functions' database operations on `handle`'s blocking threads, within `OPERATIONS`.
pub fn runner(databases: Arc<Databases>, node: Quota, handle: tokio::runtime::Handle) -> DbRunner {
    let lanes = lanes().clone();
    Arc::new(move |req: DbRequest| {
        let databases = databases.clone();
        let quota = quota(&node, &req.scope);
        let (lanes, h) = (lanes.clone(), handle.clone());
        handle.spawn(async move {
            let gateway = req.gateway.clone();
            lanes
                .run(&h, &gateway, move || {
                    let result = serde_json::from_str::<Value>(&req.op).map_err(|e| DbError::bad(format!("the operation is not JSON: {e}"))).and_then(|op| databases.execute(&req.scope.name, &quota, &op));
                    (req.reply)(result.map(|v| v.to_string()).map_err(|e| json!({"message": e.message, "code": e.name(), "status": e.status()}).to_string()));
                })
                .await;
        });
    })
}

fn db_failure(e: DbError) -> Reply {
    let kind = match e.kind {
        DbErrorKind::BadInput => ErrorKind::BadInput,
        DbErrorKind::Duplicate | DbErrorKind::Conflict => ErrorKind::Conflict,
        DbErrorKind::Quota => ErrorKind::Quota,
        DbErrorKind::Timeout => ErrorKind::Timeout,
        DbErrorKind::Unavailable => ErrorKind::Unavailable,
    };
    // The status is the database's (a quota refusal is 507, as it is inside functions); the
    // kind says which failure it is, so a client retries an unavailable database only.
    let mut reply = failure(kind, e.message.clone(), if e.kind == DbErrorKind::BadInput { vec![e.message.clone()] } else { Vec::new() });
    *reply.status_mut() = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    reply
}

impl Platform {
    /// The node's databases and their default quota; functions reach them through `runner`.
    pub fn with_databases(&self, databases: Arc<Databases>, quota: Quota) {
        let _ = self.databases.set((databases, quota));
    }

    /// Deletes the databases of gateway `gw`. Their names are retired on this node: a call
    /// still running opens none of them again.
    pub(crate) async fn drop_databases(&self, gw: &Gateway) -> Result<(), String> {
        let Some((dbs, _)) = self.databases.get().cloned() else { return Ok(()) };
        let names = gw.database_names();
        let h = tokio::runtime::Handle::current();
        let dropped = lanes().run(&h, &gw.gateway_id, move || names.iter().try_for_each(|name| dbs.destroy(name).map_err(|e| format!("{name}: {e}")))).await;
        dropped.unwrap_or_else(|| Err("the removal failed".into()))
    }

    /// Runs `op` on the database of environment `env` of `gw`, off the async threads.
    async fn run_db(&self, gw: &Gateway, env: &str, op: Value) -> Result<Value, Reply> {
        let Some((dbs, node)) = self.databases.get().cloned() else { return Err(failure(ErrorKind::Unavailable, "no database on this node", Vec::new())) };
        let scope = DbScope { name: gw.database_name(env), limits: gw.db_limits };
        let quota = quota(&node, &scope);
        let h = tokio::runtime::Handle::current();
        lanes().run(&h, &gw.gateway_id, move || dbs.execute(&scope.name, &quota, &op)).await.ok_or_else(|| failure(ErrorKind::Internal, "the operation failed", Vec::new()))?.map_err(db_failure)
    }

    /// Routes `/v1/api-gateways/{gid}/database/...`; `rest` is what follows `database`.
    pub(crate) async fn database_api(&self, caller: &Caller, m: &http::Method, gid: &str, rest: &[&str], query: Option<&str>, raw: &Bytes) -> Reply {
        use http::Method;
        let gw = match self.docs.get(gid).await {
            Ok(Some((gw, _))) => gw,
            Ok(None) => return not_found("gateway"),
            Err(e) => return store_down(e),
        };
        let param = |k: &str| query.and_then(|q| weir_core::text::query_param(q, k)).map(|v| weir_core::text::percent_decode(&v.replace('+', " ")).into_owned());
        let env = match (param("environment"), gw.database_isolation) {
            (Some(e), _) if !ENVIRONMENTS.contains(&e.as_str()) => return bad_input(vec![format!("environment: {e:?} is not one of {}", ENVIRONMENTS.join(", "))]),
            (Some(e), _) => e,
            (None, Isolation::Gateway) => "dev".to_string(),
            (None, Isolation::Environment) => return bad_input(vec!["environment: this gateway's environments each have a database; name one".into()]),
        };
        // The gateway's one database is written by those who may write its dev environment,
        // whichever environment the request names.
        let writer = match gw.database_isolation {
            Isolation::Gateway => "dev",
            Isolation::Environment => env.as_str(),
        };
        if *m != Method::GET && !caller.writes_env(writer) {
            return crate::api::refuse(StatusCode::FORBIDDEN, &format!("this token may not change the {writer} environment's data"));
        }
        let coll = |c: &str| {
            let c = weir_core::text::percent_decode(c).into_owned();
            weir_database::check_collection(&c).map(|()| c).map_err(db_failure)
        };
        match (m, rest) {
            (&Method::GET, ["collections"]) => self.collection_list(&gw, &env).await,
            (&Method::GET, ["collections", c, "documents"]) => {
                let c = match coll(c) {
                    Ok(c) => c,
                    Err(r) => return r,
                };
                let mut options = serde_json::Map::new();
                for (k, max) in [("limit", Some(PAGE_MAX)), ("skip", None)] {
                    match param(k).map(|v| v.parse::<u64>()) {
                        None => {}
                        Some(Ok(n)) if max.is_none_or(|m| (1..=m).contains(&n)) => {
                            options.insert(k.into(), json!(n));
                        }
                        Some(_) => return bad_input(vec![format!("{k}: a whole number{}", max.map(|m| format!(" from 1 to {m}")).unwrap_or_default())]),
                    }
                }
                options.entry("limit").or_insert(json!(100));
                for k in ["filter", "sort"] {
                    if let Some(text) = param(k) {
                        match serde_json::from_str::<Value>(&text) {
                            Ok(v) if k == "filter" => {
                                options.insert("__filter".into(), v);
                            }
                            Ok(v) => {
                                options.insert(k.into(), v);
                            }
                            Err(e) => return bad_input(vec![format!("{k}: not JSON: {e}")]),
                        }
                    }
                }
                let filter = options.remove("__filter").unwrap_or(json!({}));
                match self.run_db(&gw, &env, json!({"op": "find", "collection": c, "filter": filter, "options": options})).await {
                    Ok(Value::Array(list)) => self.documents(&gw, StatusCode::OK, &json!({"total": list.len(), "list": list})),
                    Ok(other) => self.documents(&gw, StatusCode::OK, &other),
                    Err(r) => r,
                }
            }
            (&Method::POST, ["collections", c, "documents"]) => {
                let c = match coll(c) {
                    Ok(c) => c,
                    Err(r) => return r,
                };
                let doc: Value = match serde_json::from_slice(raw) {
                    Ok(d) => d,
                    Err(e) => return bad_input(vec![format!("body: not JSON: {e}")]),
                };
                match self.run_db(&gw, &env, json!({"op": "insertOne", "collection": c, "doc": doc})).await {
                    Ok(v) => json(StatusCode::CREATED, &v),
                    Err(r) => r,
                }
            }
            (_, ["collections", c, "documents", id]) => {
                let c = match coll(c) {
                    Ok(c) => c,
                    Err(r) => return r,
                };
                let id = Value::String(weir_core::text::percent_decode(id).into_owned());
                if *m == Method::PUT {
                    let doc: Value = match serde_json::from_slice(raw) {
                        Ok(d) => d,
                        Err(e) => return bad_input(vec![format!("body: not JSON: {e}")]),
                    };
                    return self.replace(&gw, &env, &c, id, doc).await;
                }
                let (op, status) = match *m {
                    Method::GET => (json!({"op": "findOne", "collection": c, "filter": {"_id": id}}), StatusCode::OK),
                    Method::DELETE => (json!({"op": "deleteOne", "collection": c, "filter": {"_id": id}}), StatusCode::OK),
                    _ => return crate::api::refuse(StatusCode::METHOD_NOT_ALLOWED, &format!("{m} is not allowed here")),
                };
                match self.run_db(&gw, &env, op).await {
                    Ok(Value::Null) => not_found("document"),
                    Ok(v) if *m == Method::DELETE && v["deletedCount"] == 0 => not_found("document"),
                    Ok(v) => self.documents(&gw, status, &v),
                    Err(r) => r,
                }
            }
            (&Method::GET, ["export"]) => self.export(&gw, &env).await,
            (&Method::POST, ["import"]) => self.import(&gw, &env, raw).await,
            _ => crate::api::refuse(StatusCode::METHOD_NOT_ALLOWED, &format!("{m} is not allowed here")),
        }
    }

    /// `PUT .../documents/{id}`: replaces the document (or adds it) in one operation and
    /// answers with the document as it wrote it (its fields under the id the path names), not
    /// one read again after, which could fail behind the write or be another write's. The
    /// answer is about as large as the request was, so it is not held as a large answer: one
    /// refused after the write would say the write failed.
    async fn replace(&self, gw: &Gateway, env: &str, coll: &str, id: Value, doc: Value) -> Reply {
        let op = json!({"op": "replaceOne", "collection": coll, "filter": {"_id": id}, "doc": doc, "options": {"upsert": true}});
        match self.run_db(gw, env, op).await {
            Ok(result) => {
                let mut written = serde_json::Map::new();
                written.insert("_id".into(), id);
                if let Value::Object(fields) = doc {
                    written.extend(fields.into_iter().filter(|(k, _)| k != "_id"));
                }
                json(StatusCode::OK, &json!({"result": result, "document": written}))
            }
            Err(r) => r,
        }
    }

    /// An answer of documents: a large one counts against what the gateway's answers may hold
    /// until it is sent (`platform.large_answers`), as an export does.
    fn documents(&self, gw: &Gateway, status: StatusCode, v: &Value) -> Reply {
        self.answers.answer(&gw.gateway_id, status, "application/json", serde_json::to_vec(v).expect("JSON values serialize"))
    }

    async fn collection_list(&self, gw: &Gateway, env: &str) -> Reply {
        let Some((dbs, _)) = self.databases.get().cloned() else { return failure(ErrorKind::Unavailable, "no database on this node", Vec::new()) };
        let name = gw.database_name(env);
        let h = tokio::runtime::Handle::current();
        let stats = lanes().run(&h, &gw.gateway_id, move || dbs.get(&name).and_then(|db| db.backend.collections())).await;
        match stats {
            Some(Ok(all)) => {
                let list: Vec<Value> = all
                    .into_iter()
                    .map(|(name, s)| {
                        let indexes: Vec<Value> = s.indexes.iter().map(|i| json!({"name": i.name, "keys": i.keys.iter().map(|(k, d)| (k.clone(), json!(d))).collect::<serde_json::Map<_, _>>(), "unique": i.unique})).collect();
                        json!({"name": name, "documents": s.documents, "bytes": s.bytes, "indexes": indexes})
                    })
                    .collect();
                json(StatusCode::OK, &json!({"list": list, "total": list.len()}))
            }
            Some(Err(e)) => db_failure(e),
            None => failure(ErrorKind::Internal, "listing the collections failed", Vec::new()),
        }
    }

    /// The whole database as JSON lines `{"collection", "document"}`.
    async fn export(&self, gw: &Gateway, env: &str) -> Reply {
        let Some((dbs, _)) = self.databases.get().cloned() else { return failure(ErrorKind::Unavailable, "no database on this node", Vec::new()) };
        let name = gw.database_name(env);
        let h = tokio::runtime::Handle::current();
        let export = move || -> Result<Vec<u8>, DbError> {
            let db = dbs.get(&name)?;
            let mut out = Vec::new();
            for coll in db.backend.collections()?.into_keys() {
                db.backend.scan(&coll, &mut |doc| {
                    out.extend_from_slice(json!({"collection": coll, "document": doc}).to_string().as_bytes());
                    out.push(b'\n');
                    match out.len() > EXPORT_MAX {
                        true => Err(DbError { kind: weir_database::DbErrorKind::Quota, message: format!("the database is more than {} MiB as JSON lines: too large to export at once", EXPORT_MAX >> 20) }),
                        false => Ok(true),
                    }
                })?;
            }
            Ok(out)
        };
        // One export per gateway and two on the node: the others wait their turn.
        let lines = export_lanes().run(&h, &gw.gateway_id, export).await;
        match lines {
            Some(Ok(body)) => self.answers.answer(&gw.gateway_id, StatusCode::OK, "application/x-ndjson", body),
            Some(Err(e)) => db_failure(e),
            None => failure(ErrorKind::Internal, "the export failed", Vec::new()),
        }
    }

    /// Restores JSON lines as `export` writes them: each document replaces the one of its
    /// `_id`, or is added. Every line is checked before any is written, and all are written
    /// in one transaction: a document the database refuses (its quota, say) writes none.
    async fn import(&self, gw: &Gateway, env: &str, raw: &Bytes) -> Reply {
        let text = String::from_utf8_lossy(raw);
        let mut ops = Vec::new();
        let mut problems = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            match serde_json::from_str::<Value>(line) {
                Ok(v) => match (v["collection"].as_str(), &v["document"]) {
                    (Some(c), Value::Object(d)) if d.contains_key("_id") => match weir_database::check_collection(c) {
                        Ok(()) => ops.push(json!({"op": "replaceOne", "collection": c, "filter": {"_id": d["_id"]}, "doc": v["document"], "options": {"upsert": true}})),
                        Err(e) => problems.push(format!("line {}: {e}", i + 1)),
                    },
                    _ => problems.push(format!("line {}: a line is {{\"collection\": name, \"document\": {{\"_id\": ...}}}}", i + 1)),
                },
                Err(e) => problems.push(format!("line {}: not JSON: {e}", i + 1)),
            }
        }
        if !problems.is_empty() {
            problems.truncate(20);
            return bad_input(problems);
        }
        // All or nothing: one transaction, aborted at the first failure.
        let n = ops.len();
        let tx = match self.run_db(gw, env, json!({"op": "begin"})).await {
            Ok(v) => v["tx"].clone(),
            Err(r) => return r,
        };
        for mut op in ops {
            op["tx"] = tx.clone();
            if let Err(r) = self.run_db(gw, env, op).await {
                let _ = self.run_db(gw, env, json!({"op": "abort", "tx": tx})).await;
                return r;
            }
        }
        match self.run_db(gw, env, json!({"op": "commit", "tx": tx})).await {
            Ok(_) => json(StatusCode::OK, &json!({"imported": n})),
            Err(r) => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_may_lower_its_quota_never_raise_it() {
        let node = Quota { documents: 100, bytes: 1000, query_ms: 50 };
        let scope = DbScope { name: "g".into(), limits: weir_functions::DbLimits { documents: Some(10), bytes: Some(5000), query_ms: None } };
        assert_eq!(quota(&node, &scope), Quota { documents: 10, bytes: 1000, query_ms: 50 });
    }
}
