//! One suite, both engines: every test in `on_both_engines!` runs on the embedded engine (in
//! a temporary directory) and on PostgreSQL (a real server, a database of its own), and must
//! answer alike on both.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::PgServer;
use serde_json::{Value, json};
use weir_database::postgres::Postgres;
use weir_database::update::id_key;
use weir_database::{Backend, CollStats, Databases, DbError, DbErrorKind, IndexDef, Opener, Quota, Write, embedded, index_key};

/// An engine to test: how its databases open, and what keeps them there.
struct Engine {
    opener: Opener,
    /// Several nodes share a PostgreSQL database; an embedded one is one node's.
    shared: bool,
    _dir: Option<tempfile::TempDir>,
    _server: Option<Arc<PgServer>>,
}

impl Engine {
    fn embedded() -> Engine {
        let dir = tempfile::tempdir().unwrap();
        Engine { opener: embedded::opener(dir.path().to_path_buf()), shared: false, _dir: Some(dir), _server: None }
    }

    fn postgres(label: &str) -> Engine {
        let server = PgServer::shared();
        let url = server.database(label);
        Engine { opener: weir_database::postgres::opener(url, 4), shared: true, _dir: None, _server: Some(server) }
    }

    fn databases(&self) -> Arc<Databases> {
        Databases::new(self.opener.clone())
    }

    /// Two nodes' databases: two instances over PostgreSQL, one instance on the embedded
    /// engine (its file is one node's).
    fn two_nodes(&self) -> (Arc<Databases>, Arc<Databases>) {
        let a = self.databases();
        let b = if self.shared { self.databases() } else { a.clone() };
        (a, b)
    }

    fn backend(&self, name: &str) -> Arc<dyn Backend> {
        (self.opener)(name).unwrap()
    }

    /// Two nodes' backends of database `name`, as `two_nodes`.
    fn two_backends(&self, name: &str) -> (Arc<dyn Backend>, Arc<dyn Backend>) {
        let a = self.backend(name);
        let b = if self.shared { self.backend(name) } else { a.clone() };
        (a, b)
    }
}

macro_rules! on_both_engines {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[test]
            fn embedded() {
                super::$test(&super::Engine::embedded());
            }

            #[test]
            fn postgres() {
                super::$test(&super::Engine::postgres(stringify!($test)));
            }
        }
    )*};
}

on_both_engines!(
    the_methods_answer_as_mongodb_does,
    indexes_are_used_and_unique_ones_hold,
    transactions_are_all_or_nothing,
    quotas_and_bad_input,
    index_keys_stay_in_proportion,
    sorted_reads_keep_their_window,
    a_write_holds_a_bounded_share_of_the_collection,
    index_entries_count_against_the_quota,
    a_scan_past_its_time_fails,
    backends_keep_their_contract,
    nodes_see_each_others_writes_at_once,
    increments_from_two_nodes_are_all_kept,
    writers_of_several_collections_never_deadlock,
    counts_are_exact_on_every_path,
    large_indexes_and_collections_drop_whole,
    numbers_are_kept_and_matched_by_their_exact_values,
);

fn run(d: &Databases, req: Value) -> Result<Value, DbError> {
    d.execute("g", &Quota::default(), &req)
}

fn the_methods_answer_as_mongodb_does(e: &Engine) {
    let d = e.databases();
    let r = run(&d, json!({"op": "insertOne", "collection": "users", "doc": {"_id": "u1", "name": "Ada", "age": 36}})).unwrap();
    assert_eq!(r, json!({"acknowledged": true, "insertedId": "u1"}));
    let r = run(&d, json!({"op": "insertMany", "collection": "users", "docs": [{"name": "Bob", "age": 20}, {"name": "Cy", "age": 50, "tags": ["x"]}]})).unwrap();
    assert_eq!(r["insertedCount"], 2);
    assert_eq!(run(&d, json!({"op": "insertOne", "collection": "users", "doc": {"_id": "u1"}})).unwrap_err().kind, DbErrorKind::Duplicate);
    assert_eq!(run(&d, json!({"op": "findOne", "collection": "users", "filter": {"_id": "u1"}})).unwrap(), json!({"_id": "u1", "name": "Ada", "age": 36}));
    let r = run(&d, json!({"op": "find", "collection": "users", "filter": {"age": {"$gte": 30}}, "options": {"sort": {"age": -1}, "projection": {"name": 1, "_id": 0}}})).unwrap();
    assert_eq!(r, json!([{"name": "Cy"}, {"name": "Ada"}]));
    assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "users", "filter": {}})).unwrap(), json!(3));
    let r = run(&d, json!({"op": "updateOne", "collection": "users", "filter": {"name": "Bob"}, "update": {"$inc": {"age": 1}, "$push": {"tags": "new"}}})).unwrap();
    assert_eq!((&r["matchedCount"], &r["modifiedCount"]), (&json!(1), &json!(1)));
    let r = run(&d, json!({"op": "updateMany", "collection": "users", "filter": {}, "update": {"$set": {"seen": true}}})).unwrap();
    assert_eq!(r["modifiedCount"], 3);
    let r = run(&d, json!({"op": "updateOne", "collection": "users", "filter": {"name": "Dee"}, "update": {"$set": {"age": 9}}, "options": {"upsert": true}})).unwrap();
    assert_eq!(r["upsertedCount"], 1);
    assert_eq!(run(&d, json!({"op": "findOne", "collection": "users", "filter": {"name": "Dee"}, "options": {"projection": {"_id": 0}}})).unwrap(), json!({"name": "Dee", "age": 9}));
    let r = run(&d, json!({"op": "replaceOne", "collection": "users", "filter": {"_id": "u1"}, "doc": {"name": "Ada L."}})).unwrap();
    assert_eq!(r["modifiedCount"], 1);
    assert_eq!(run(&d, json!({"op": "findOne", "collection": "users", "filter": {"_id": "u1"}})).unwrap(), json!({"_id": "u1", "name": "Ada L."}));
    assert_eq!(run(&d, json!({"op": "deleteMany", "collection": "users", "filter": {"age": {"$lt": 30}}})).unwrap()["deletedCount"], 2);
    assert_eq!(run(&d, json!({"op": "collections"})).unwrap(), json!(["users"]));
    assert_eq!(run(&d, json!({"op": "drop", "collection": "users"})).unwrap(), json!(true));
    assert_eq!(run(&d, json!({"op": "collections"})).unwrap(), json!([]));
}

/// Integers past 2^53 are values of their own, not the double nearest them, and an `_id` is
/// one whatever form its number is written in.
fn numbers_are_kept_and_matched_by_their_exact_values(e: &Engine) {
    let d = e.databases();
    let docs = json!([{"_id": "a", "n": 9007199254740992u64}, {"_id": "b", "n": 9007199254740993u64}, {"_id": "c", "n": 9007199254740994u64}]);
    run(&d, json!({"op": "insertMany", "collection": "big", "docs": docs})).unwrap();
    let ids = |filter: Value| run(&d, json!({"op": "find", "collection": "big", "filter": filter, "options": {"projection": {"n": 0}}})).unwrap();
    assert_eq!(ids(json!({"n": 9007199254740993u64})), json!([{"_id": "b"}]));
    assert_eq!(ids(json!({"n": {"$gt": 9007199254740992.0}})), json!([{"_id": "b"}, {"_id": "c"}]));
    let sorted = run(&d, json!({"op": "find", "collection": "big", "filter": {}, "options": {"sort": {"n": -1}, "projection": {"n": 0}}})).unwrap();
    assert_eq!(sorted, json!([{"_id": "c"}, {"_id": "b"}, {"_id": "a"}]));
    // An increment of one is a change, though the double nearest the value stays.
    let r = run(&d, json!({"op": "updateOne", "collection": "big", "filter": {"_id": "a"}, "update": {"$inc": {"n": 1}}})).unwrap();
    assert_eq!(r["modifiedCount"], 1, "{r}");
    assert_eq!(run(&d, json!({"op": "findOne", "collection": "big", "filter": {"_id": "a"}})).unwrap()["n"], json!(9007199254740993u64));
    // Through an index the same: its keys only lead to the documents to match.
    run(&d, json!({"op": "createIndex", "collection": "big", "keys": {"n": 1}})).unwrap();
    assert_eq!(ids(json!({"n": 9007199254740994u64})), json!([{"_id": "c"}]));
    assert_eq!(run(&d, json!({"op": "deleteMany", "collection": "big", "filter": {"n": 9007199254740994u64}})).unwrap()["deletedCount"], 1);
    assert_eq!(ids(json!({})), json!([{"_id": "a"}, {"_id": "b"}]));

    // A unique index holds two values that round to one double (they share an index key),
    // and refuses the same value again in any form; made over documents, the same.
    run(&d, json!({"op": "createIndex", "collection": "snow", "keys": {"n": 1}, "options": {"unique": true}})).unwrap();
    for n in [json!(9007199254740993u64), json!(9007199254740992u64), json!([9007199254740995u64, 1])] {
        run(&d, json!({"op": "insertOne", "collection": "snow", "doc": {"n": n}})).unwrap_or_else(|e| panic!("{n}: {e:?}"));
    }
    for n in [json!(9007199254740993u64), json!(9007199254740992.0), json!(9007199254740995u64), json!([2, 1.0])] {
        let e = run(&d, json!({"op": "insertOne", "collection": "snow", "doc": {"n": n}})).unwrap_err();
        assert_eq!(e.kind, DbErrorKind::Duplicate, "{n}: {e:?}");
    }
    assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "snow", "filter": {"n": 9007199254740992u64}})).unwrap(), json!(1));
    let r = run(&d, json!({"op": "updateOne", "collection": "snow", "filter": {"n": 9007199254740992u64}, "update": {"$set": {"n": 9007199254740994u64}}})).unwrap();
    assert_eq!(r["modifiedCount"], 1, "{r}");
    let docs = json!([{"n": 9007199254740993u64}, {"n": 9007199254740992u64}, {"n": [5, 9007199254740995u64]}]);
    run(&d, json!({"op": "insertMany", "collection": "made", "docs": docs})).unwrap();
    run(&d, json!({"op": "createIndex", "collection": "made", "keys": {"n": 1}, "options": {"unique": true}})).unwrap();
    run(&d, json!({"op": "insertOne", "collection": "made", "doc": {"n": 9007199254740996u64}})).unwrap();
    assert_eq!(run(&d, json!({"op": "insertOne", "collection": "made", "doc": {"n": 5.0}})).unwrap_err().kind, DbErrorKind::Duplicate);
    run(&d, json!({"op": "dropIndex", "collection": "made", "name": "n_1"})).unwrap();
    run(&d, json!({"op": "insertOne", "collection": "made", "doc": {"n": 5.0}})).unwrap();
    let e = run(&d, json!({"op": "createIndex", "collection": "made", "keys": {"n": 1}, "options": {"unique": true}})).unwrap_err();
    assert_eq!(e.kind, DbErrorKind::Duplicate, "{e:?}");

    // A value filed under two keys is found in either form: zero under both of its keys,
    // numbers inside an object by a scan rather than the index.
    run(&d, json!({"op": "createIndex", "collection": "forms", "keys": {"n": 1}})).unwrap();
    run(&d, json!({"op": "insertMany", "collection": "forms", "docs": [{"_id": "z", "n": -0.0}, {"_id": "o", "n": {"a": [1, {"b": 2.0}]}}, {"_id": "s", "n": "x"}]})).unwrap();
    for (n, id, index) in [(json!(0), "z", json!("n_1")), (json!(0.0), "z", json!("n_1")), (json!({"a": [1.0, {"b": 2}]}), "o", Value::Null)] {
        let found = run(&d, json!({"op": "explain", "collection": "forms", "filter": {"n": n}})).unwrap();
        assert_eq!((&found["index"], &found["returned"]), (&index, &json!(1)), "{n}: {found}");
        assert_eq!(run(&d, json!({"op": "findOne", "collection": "forms", "filter": {"n": n}})).unwrap()["_id"], id, "{n}");
    }
    let some = run(&d, json!({"op": "find", "collection": "forms", "filter": {"n": {"$in": [0, "x"]}}, "options": {"projection": {"n": 0}}})).unwrap();
    assert_eq!(some, json!([{"_id": "s"}, {"_id": "z"}]));
    // A document filed under both of zero's keys comes once, and counts once.
    run(&d, json!({"op": "insertOne", "collection": "forms", "doc": {"_id": "both", "n": [0, -0.0]}})).unwrap();
    for filter in [json!({"n": 0}), json!({"n": {"$in": [0, -0.0, 0]}})] {
        let found = run(&d, json!({"op": "find", "collection": "forms", "filter": filter, "options": {"projection": {"n": 0}}})).unwrap();
        assert_eq!(found, json!([{"_id": "both"}, {"_id": "z"}]), "{filter}");
        assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "forms", "filter": filter})).unwrap(), json!(2), "{filter}");
        assert_eq!(run(&d, json!({"op": "findOne", "collection": "forms", "filter": filter})).unwrap()["_id"], "both", "{filter}");
    }
    let r = run(&d, json!({"op": "deleteOne", "collection": "forms", "filter": {"n": 0}})).unwrap();
    assert_eq!(r["deletedCount"], 1);
    assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "forms", "filter": {"n": 0}})).unwrap(), json!(1));
    let seek = run(&d, json!({"op": "explain", "collection": "forms", "filter": {"n": "x"}})).unwrap();
    assert_eq!(seek["index"], "n_1", "{seek}");

    // A document sharing every key of another's long array, and none of its values, is held.
    let spread = |plus: u64| (0..2000u64).map(|i| json!((1u64 << 60) + 256 * i + plus)).collect::<Vec<_>>();
    run(&d, json!({"op": "insertOne", "collection": "snow", "doc": {"_id": "wide", "n": spread(0)}})).unwrap();
    run(&d, json!({"op": "insertOne", "collection": "snow", "doc": {"_id": "beside", "n": spread(1)}})).unwrap();
    assert_eq!(run(&d, json!({"op": "insertOne", "collection": "snow", "doc": {"n": [(1u64 << 60) + 256 * 1999 + 1]}})).unwrap_err().kind, DbErrorKind::Duplicate);

    // `_id: 1` and `_id: 1.0` are one `_id`, as in MongoDB: the second is a duplicate, and
    // either finds the document.
    run(&d, json!({"op": "insertOne", "collection": "ids", "doc": {"_id": 1, "v": "int"}})).unwrap();
    run(&d, json!({"op": "insertOne", "collection": "ids", "doc": {"_id": 2.0, "v": "double"}})).unwrap();
    for (id, v) in [(json!(1.0), "int"), (json!(2), "double")] {
        let e = run(&d, json!({"op": "insertOne", "collection": "ids", "doc": {"_id": id}})).unwrap_err();
        assert_eq!(e.kind, DbErrorKind::Duplicate, "{id}: {e:?}");
        assert_eq!(run(&d, json!({"op": "findOne", "collection": "ids", "filter": {"_id": id}})).unwrap()["v"], v, "{id}");
    }
    let e = run(&d, json!({"op": "insertMany", "collection": "ids", "docs": [{"_id": 3}, {"_id": 3.0}]})).unwrap_err();
    assert_eq!(e.kind, DbErrorKind::Duplicate, "{e:?}");
    let r = run(&d, json!({"op": "updateOne", "collection": "ids", "filter": {"_id": 1.0}, "update": {"$set": {"seen": true}}, "options": {"upsert": true}})).unwrap();
    assert_eq!((&r["matchedCount"], &r["upsertedCount"]), (&json!(1), &json!(0)), "{r}");
    assert_eq!(run(&d, json!({"op": "deleteOne", "collection": "ids", "filter": {"_id": {"$in": [2]}}})).unwrap()["deletedCount"], 1);
    assert_eq!(run(&d, json!({"op": "find", "collection": "ids", "filter": {}})).unwrap(), json!([{"_id": 1, "v": "int", "seen": true}]));
    // A replacement may name the `_id` in another form; the stored one stays.
    let r = run(&d, json!({"op": "replaceOne", "collection": "ids", "filter": {"_id": 1}, "doc": {"_id": 1.0, "v": "replaced"}})).unwrap();
    assert_eq!(r["modifiedCount"], 1, "{r}");
    assert_eq!(run(&d, json!({"op": "findOne", "collection": "ids", "filter": {"_id": 1}})).unwrap(), json!({"_id": 1, "v": "replaced"}));
    // Zero is one `_id` however it is written.
    run(&d, json!({"op": "insertOne", "collection": "ids", "doc": {"_id": 0.0}})).unwrap();
    for zero in [json!(0), json!(-0.0)] {
        assert_eq!(run(&d, json!({"op": "insertOne", "collection": "ids", "doc": {"_id": zero}})).unwrap_err().kind, DbErrorKind::Duplicate, "{zero}");
    }
    run(&d, json!({"op": "deleteOne", "collection": "ids", "filter": {"_id": -0.0}})).unwrap();
    // Inside a transaction, its own writes are found by either form too.
    let tx = run(&d, json!({"op": "begin"})).unwrap()["tx"].clone();
    run(&d, json!({"op": "insertOne", "collection": "ids", "tx": tx, "doc": {"_id": 5, "v": "tx"}})).unwrap();
    assert_eq!(run(&d, json!({"op": "findOne", "collection": "ids", "tx": tx, "filter": {"_id": 5.0}})).unwrap()["v"], "tx");
    let e = run(&d, json!({"op": "insertOne", "collection": "ids", "tx": tx, "doc": {"_id": 5.0}})).unwrap_err();
    assert_eq!(e.kind, DbErrorKind::Duplicate, "{e:?}");
    run(&d, json!({"op": "commit", "tx": tx})).unwrap();
    assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "ids", "filter": {}})).unwrap(), json!(2));
}

fn indexes_are_used_and_unique_ones_hold(e: &Engine) {
    let d = e.databases();
    let docs: Vec<Value> = (0..5000).map(|i| json!({"email": format!("u{i}@x"), "n": i % 10})).collect();
    run(&d, json!({"op": "insertMany", "collection": "people", "docs": docs})).unwrap();
    let scan = run(&d, json!({"op": "explain", "collection": "people", "filter": {"email": "u42@x"}})).unwrap();
    assert_eq!((&scan["index"], &scan["docsExamined"]), (&Value::Null, &json!(5000)));
    assert_eq!(run(&d, json!({"op": "createIndex", "collection": "people", "keys": {"email": 1}, "options": {"unique": true}})).unwrap(), json!("email_1"));
    let seek = run(&d, json!({"op": "explain", "collection": "people", "filter": {"email": "u42@x"}})).unwrap();
    assert_eq!((&seek["index"], &seek["docsExamined"], &seek["returned"]), (&json!("email_1"), &json!(1), &json!(1)));
    let e = run(&d, json!({"op": "insertOne", "collection": "people", "doc": {"email": "u42@x"}})).unwrap_err();
    assert_eq!(e.kind, DbErrorKind::Duplicate, "{e:?}");
    // One index per set of keys, as MongoDB: the same keys under another name are refused.
    let e = run(&d, json!({"op": "createIndex", "collection": "people", "keys": {"email": 1}, "options": {"name": "again"}})).unwrap_err();
    assert_eq!((e.kind, e.message.as_str()), (DbErrorKind::BadInput, "Index already exists with a different name: email_1"));
    assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "people", "filter": {}})).unwrap(), json!(5000));
    // A unique index over values held twice is refused whole.
    assert!(run(&d, json!({"op": "createIndex", "collection": "people", "keys": {"n": 1}, "options": {"unique": true}})).is_err());
    assert_eq!(run(&d, json!({"op": "dropIndex", "collection": "people", "name": "email_1"})).unwrap(), json!({"ok": 1}));
    run(&d, json!({"op": "insertOne", "collection": "people", "doc": {"email": "u42@x"}})).unwrap();
}

fn transactions_are_all_or_nothing(e: &Engine) {
    let d = e.databases();
    run(&d, json!({"op": "insertOne", "collection": "acct", "doc": {"_id": "a", "bal": 10}})).unwrap();
    let tx = run(&d, json!({"op": "begin"})).unwrap()["tx"].clone();
    run(&d, json!({"op": "updateOne", "collection": "acct", "filter": {"_id": "a"}, "update": {"$inc": {"bal": -5}}, "tx": tx})).unwrap();
    run(&d, json!({"op": "insertOne", "collection": "acct", "doc": {"_id": "b", "bal": 5}, "tx": tx})).unwrap();
    // Inside, the transaction sees its writes; outside, nothing yet.
    assert_eq!(run(&d, json!({"op": "findOne", "collection": "acct", "filter": {"_id": "a"}, "tx": tx})).unwrap()["bal"], 5);
    assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "acct", "filter": {}, "tx": tx})).unwrap(), json!(2));
    assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "acct", "filter": {}})).unwrap(), json!(1));
    run(&d, json!({"op": "abort", "tx": tx})).unwrap();
    assert_eq!(run(&d, json!({"op": "findOne", "collection": "acct", "filter": {"_id": "a"}})).unwrap()["bal"], 10);

    let tx = run(&d, json!({"op": "begin"})).unwrap()["tx"].clone();
    run(&d, json!({"op": "updateOne", "collection": "acct", "filter": {"_id": "a"}, "update": {"$inc": {"bal": -5}}, "tx": tx})).unwrap();
    run(&d, json!({"op": "insertOne", "collection": "acct", "doc": {"_id": "b", "bal": 5}, "tx": tx})).unwrap();
    run(&d, json!({"op": "commit", "tx": tx})).unwrap();
    assert_eq!(run(&d, json!({"op": "find", "collection": "acct", "filter": {}})).unwrap(), json!([{"_id": "a", "bal": 5}, {"_id": "b", "bal": 5}]));

    // A document changed outside after the transaction read it: the commit writes nothing.
    let tx = run(&d, json!({"op": "begin"})).unwrap()["tx"].clone();
    run(&d, json!({"op": "updateOne", "collection": "acct", "filter": {"_id": "a"}, "update": {"$set": {"bal": 0}}, "tx": tx})).unwrap();
    run(&d, json!({"op": "insertOne", "collection": "acct", "doc": {"_id": "c"}, "tx": tx})).unwrap();
    run(&d, json!({"op": "updateOne", "collection": "acct", "filter": {"_id": "a"}, "update": {"$set": {"bal": 99}}})).unwrap();
    assert_eq!(run(&d, json!({"op": "commit", "tx": tx})).unwrap_err().kind, DbErrorKind::Conflict);
    assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "acct", "filter": {}})).unwrap(), json!(2));
    assert_eq!(run(&d, json!({"op": "findOne", "collection": "acct", "filter": {"_id": "a"}})).unwrap()["bal"], 99);

    // A document a transaction adds and deletes again is none of its writes: another writer's
    // document of that id, added meanwhile, stays.
    let tx = run(&d, json!({"op": "begin"})).unwrap()["tx"].clone();
    run(&d, json!({"op": "insertOne", "collection": "acct", "doc": {"_id": "k"}, "tx": tx})).unwrap();
    run(&d, json!({"op": "deleteOne", "collection": "acct", "filter": {"_id": "k"}, "tx": tx})).unwrap();
    run(&d, json!({"op": "insertOne", "collection": "acct", "doc": {"_id": "k", "important": 1}})).unwrap();
    run(&d, json!({"op": "commit", "tx": tx})).unwrap();
    assert_eq!(run(&d, json!({"op": "findOne", "collection": "acct", "filter": {"_id": "k"}})).unwrap(), json!({"_id": "k", "important": 1}));
    run(&d, json!({"op": "deleteOne", "collection": "acct", "filter": {"_id": "k"}})).unwrap();

    // A transaction is its database's: another database's caller neither aborts nor commits
    // it, whatever id it sends.
    let tx = run(&d, json!({"op": "begin"})).unwrap()["tx"].clone();
    run(&d, json!({"op": "insertOne", "collection": "acct", "doc": {"_id": "mine"}, "tx": tx})).unwrap();
    let other = |req: Value| d.execute("other", &Quota::default(), &req);
    other(json!({"op": "abort", "tx": tx})).unwrap();
    assert_eq!(other(json!({"op": "commit", "tx": tx})).unwrap_err().message, "the transaction is over");
    run(&d, json!({"op": "commit", "tx": tx})).unwrap();
    assert!(other(json!({"op": "findOne", "collection": "acct", "filter": {"_id": "mine"}})).unwrap().is_null());
    assert_eq!(run(&d, json!({"op": "findOne", "collection": "acct", "filter": {"_id": "mine"}})).unwrap(), json!({"_id": "mine"}));

    // What open transactions hold uncommitted is bounded per database; it is given back when
    // they end.
    let big = "x".repeat(1 << 20);
    let tx = run(&d, json!({"op": "begin"})).unwrap()["tx"].clone();
    let mut refused = None;
    for i in 0..40 {
        if let Err(e) = run(&d, json!({"op": "insertOne", "collection": "big", "doc": {"_id": i, "v": big}, "tx": tx})) {
            refused = Some((i, e));
            break;
        }
    }
    let (at, e) = refused.expect("refused before 40 MiB");
    assert_eq!((at, e.kind), (31, DbErrorKind::Quota), "{}", e.message);
    assert!(e.message.contains("more than 32 MiB"), "{}", e.message);
    run(&d, json!({"op": "abort", "tx": tx})).unwrap();
    let tx = run(&d, json!({"op": "begin"})).unwrap()["tx"].clone();
    run(&d, json!({"op": "insertOne", "collection": "big", "doc": {"_id": 0, "v": big}, "tx": tx})).unwrap();
    run(&d, json!({"op": "abort", "tx": tx})).unwrap();
}

/// A document files a bounded number of keys in an index: two arrays under one compound index
/// ("parallel arrays", whose keys would be the product of their lengths) are refused as MongoDB
/// refuses them, on a write and when an index is made over stored documents, and nothing changes.
fn index_keys_stay_in_proportion(e: &Engine) {
    let d = e.databases();
    run(&d, json!({"op": "createIndex", "collection": "px", "keys": {"a": 1, "b": 1}})).unwrap();
    let wide: Vec<u32> = (0..5000).collect();
    let refused = run(&d, json!({"op": "insertOne", "collection": "px", "doc": {"_id": 1, "a": wide, "b": wide}})).unwrap_err();
    assert_eq!(refused.kind, DbErrorKind::BadInput, "{}", refused.message);
    assert!(refused.message.contains("parallel arrays"), "{}", refused.message);
    assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "px", "filter": {}})).unwrap(), json!(0));
    run(&d, json!({"op": "insertOne", "collection": "px", "doc": {"_id": 2, "a": [1, 2], "b": 3}})).unwrap();
    assert_eq!(run(&d, json!({"op": "find", "collection": "px", "filter": {"a": 2, "b": 3}})).unwrap(), json!([{"_id": 2, "a": [1, 2], "b": 3}]));
    let refused = run(&d, json!({"op": "updateOne", "collection": "px", "filter": {"_id": 2}, "update": {"$set": {"b": [3, 4]}}})).unwrap_err();
    assert!(refused.message.contains("parallel arrays"), "{}", refused.message);
    assert_eq!(run(&d, json!({"op": "find", "collection": "px", "filter": {"a": 1, "b": 3}})).unwrap(), json!([{"_id": 2, "a": [1, 2], "b": 3}]));
    // Stored documents a new index could not file: the index is not made.
    run(&d, json!({"op": "insertOne", "collection": "py", "doc": {"_id": 1, "a": [1, 2], "b": [3, 4]}})).unwrap();
    let refused = run(&d, json!({"op": "createIndex", "collection": "py", "keys": {"a": 1, "b": 1}})).unwrap_err();
    assert!(refused.message.contains("parallel arrays"), "{}", refused.message);
    let plan = run(&d, json!({"op": "explain", "collection": "py", "filter": {"a": 1, "b": 3}})).unwrap();
    assert_eq!(plan["index"], Value::Null, "{plan}");
    // One array of more elements than an index files for one document.
    run(&d, json!({"op": "createIndex", "collection": "pz", "keys": {"t": 1}})).unwrap();
    let many: Vec<u32> = (0..10_001).collect();
    let refused = run(&d, json!({"op": "insertOne", "collection": "pz", "doc": {"_id": 1, "t": many}})).unwrap_err();
    assert!(refused.message.contains("at most 10000"), "{}", refused.message);
    run(&d, json!({"op": "insertOne", "collection": "pz", "doc": {"_id": 2, "t": many[..10_000]}})).unwrap();
    let plan = run(&d, json!({"op": "explain", "collection": "pz", "filter": {"t": 9999}})).unwrap();
    assert_eq!((&plan["index"], &plan["returned"]), (&json!("t_1"), &json!(1)), "{plan}");
}

/// A sorted find keeps only its window (skip + limit) as it reads, and answers what sorting
/// everything would: ties in `_id` order, a transaction's own writes ranked as written.
fn sorted_reads_keep_their_window(e: &Engine) {
    let d = e.databases();
    let docs: Vec<Value> = (0..5000).map(|i| json!({"_id": format!("{i:05}"), "v": (i * 7919) % 97})).collect();
    run(&d, json!({"op": "insertMany", "collection": "s", "docs": docs.clone()})).unwrap();
    let mut expected = docs.clone();
    expected.sort_by(|a, b| b["v"].as_i64().cmp(&a["v"].as_i64()).then_with(|| a["_id"].as_str().cmp(&b["_id"].as_str())));
    let got = run(&d, json!({"op": "find", "collection": "s", "filter": {}, "options": {"sort": {"v": -1}, "skip": 1000, "limit": 60}})).unwrap();
    assert_eq!(got, json!(expected[1000..1060]));
    let one = run(&d, json!({"op": "findOne", "collection": "s", "filter": {"v": {"$lt": 5}}, "options": {"sort": {"v": 1, "_id": -1}}})).unwrap();
    assert_eq!(one["v"], 0);
    assert_eq!(one["_id"], expected.iter().filter(|x| x["v"] == 0).map(|x| x["_id"].clone()).max_by(|a, b| a.as_str().cmp(&b.as_str())).unwrap());
    // Inside a transaction, what it wrote ranks as written.
    let tx = run(&d, json!({"op": "begin"})).unwrap()["tx"].clone();
    run(&d, json!({"op": "updateOne", "collection": "s", "filter": {"_id": "04999"}, "update": {"$set": {"v": 1000}}, "tx": tx})).unwrap();
    run(&d, json!({"op": "updateOne", "collection": "s", "filter": {"_id": expected[0]["_id"]}, "update": {"$set": {"v": -1}}, "tx": tx})).unwrap();
    let got = run(&d, json!({"op": "find", "collection": "s", "filter": {}, "options": {"sort": {"v": -1}, "limit": 3}, "tx": tx})).unwrap();
    assert_eq!(got, json!([{"_id": "04999", "v": 1000}, expected[1], expected[2]]));
    let last = run(&d, json!({"op": "find", "collection": "s", "filter": {}, "options": {"sort": {"v": 1}, "limit": 1}, "tx": tx})).unwrap();
    assert_eq!(last, json!([{"_id": expected[0]["_id"], "v": -1}]));
    let by_id = run(&d, json!({"op": "find", "collection": "s", "filter": {"_id": {"$in": ["04999", "04998"]}}, "tx": tx})).unwrap();
    assert_eq!(by_id, json!([{"_id": "04998", "v": (4998 * 7919) % 97}, {"_id": "04999", "v": 1000}]));
    run(&d, json!({"op": "abort", "tx": tx})).unwrap();
    // An import's shape: many writes by `_id` in one transaction, each reading only its own.
    let tx = run(&d, json!({"op": "begin"})).unwrap()["tx"].clone();
    let t = Instant::now();
    for i in 0..20_000 {
        run(&d, json!({"op": "replaceOne", "collection": "imported", "filter": {"_id": i}, "doc": {"_id": i, "n": i}, "options": {"upsert": true}, "tx": tx})).unwrap();
    }
    run(&d, json!({"op": "commit", "tx": tx})).unwrap();
    eprintln!("20,000 writes in one transaction: {:?}", t.elapsed());
    assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "imported", "filter": {}})).unwrap(), json!(20_000));
    // Without a limit the window is what a find may answer, and one more to say it is too many.
    let e1 = run(&d, json!({"op": "find", "collection": "s", "filter": {}, "options": {"sort": {"v": 1}, "skip": 99_990, "limit": 20}})).unwrap_err();
    assert!(e1.message.contains("at most 100000"), "{}", e1.message);
    assert_eq!(run(&d, json!({"op": "find", "collection": "s", "filter": {}, "options": {"sort": {"v": 1}, "skip": 4990}})).unwrap().as_array().unwrap().len(), 10);
    let more: Vec<Value> = (5000..10_001).map(|i| json!({"_id": format!("{i:05}"), "v": 1})).collect();
    run(&d, json!({"op": "insertMany", "collection": "s", "docs": more})).unwrap();
    for options in [json!({}), json!({"sort": {"v": 1}})] {
        let e = run(&d, json!({"op": "find", "collection": "s", "filter": {}, "options": options})).unwrap_err();
        assert!(e.message.contains("more than 10000"), "{options}: {}", e.message);
    }
    assert_eq!(run(&d, json!({"op": "find", "collection": "s", "filter": {}, "options": {"skip": 1}})).unwrap().as_array().unwrap().len(), 10_000);
}

/// `updateMany` and `deleteMany` hold what they change until it is written: at most 64 MiB
/// of it. `updateOne` and `deleteOne` read only as far as their first match.
fn a_write_holds_a_bounded_share_of_the_collection(e: &Engine) {
    let d = e.databases();
    let big = "x".repeat(4 << 20).chars().take((4 << 20) - 64).collect::<String>();
    for i in 0..17 {
        run(&d, json!({"op": "insertOne", "collection": "b", "doc": {"_id": format!("b{i:02}"), "v": big}})).unwrap();
    }
    for req in [
        json!({"op": "updateMany", "collection": "b", "filter": {}, "update": {"$set": {"w": 1}}}),
        json!({"op": "deleteMany", "collection": "b", "filter": {}}),
    ] {
        let e = run(&d, req).unwrap_err();
        assert_eq!(e.kind, DbErrorKind::Quota, "{}", e.message);
        assert!(e.message.contains("more than 64 MiB"), "{}", e.message);
    }
    // A read holds no more: its skip, its sort's window.
    for options in [json!({"skip": 1000}), json!({"sort": {"_id": -1}, "limit": 17})] {
        let e = run(&d, json!({"op": "find", "collection": "b", "filter": {}, "options": options})).unwrap_err();
        assert!(e.kind == DbErrorKind::Quota && e.message.contains("the read would hold more than 64 MiB"), "{options}: {}", e.message);
    }
    let two = run(&d, json!({"op": "find", "collection": "b", "filter": {}, "options": {"sort": {"_id": -1}, "limit": 2, "projection": {"v": 0}}})).unwrap();
    assert_eq!(two, json!([{"_id": "b16"}, {"_id": "b15"}]));
    assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "b", "filter": {"w": 1}})).unwrap(), json!(0));
    let r = run(&d, json!({"op": "updateMany", "collection": "b", "filter": {"_id": {"$lt": "b08"}}, "update": {"$set": {"w": 1}}})).unwrap();
    assert_eq!(r["modifiedCount"], 8);
    let r = run(&d, json!({"op": "updateOne", "collection": "b", "filter": {"w": {"$exists": false}}, "update": {"$set": {"w": 2}}})).unwrap();
    assert_eq!(r["modifiedCount"], 1);
    assert_eq!(run(&d, json!({"op": "findOne", "collection": "b", "filter": {"w": 2}, "options": {"projection": {"v": 0}}})).unwrap(), json!({"_id": "b08", "w": 2}));
    assert_eq!(run(&d, json!({"op": "deleteOne", "collection": "b", "filter": {}})).unwrap()["deletedCount"], 1);
    assert_eq!(run(&d, json!({"op": "findOne", "collection": "b", "filter": {}, "options": {"projection": {"v": 0}}})).unwrap(), json!({"_id": "b01", "w": 1}));
    assert_eq!(run(&d, json!({"op": "deleteMany", "collection": "b", "filter": {"_id": {"$gte": "b10"}}})).unwrap()["deletedCount"], 7);
    // What a transaction reads is held until it ends: nine documents of 4 MiB pass the 32 MiB
    // its database's open transactions may hold, and the next transaction has it all again.
    for _ in 0..2 {
        let tx = run(&d, json!({"op": "begin"})).unwrap()["tx"].clone();
        let e = run(&d, json!({"op": "countDocuments", "collection": "b", "filter": {}, "tx": tx})).unwrap_err();
        assert!(e.kind == DbErrorKind::Quota && e.message.contains("more than 32 MiB of documents read and written"), "{}", e.message);
        assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "b", "filter": {"_id": {"$lt": "b05"}}, "tx": tx})).unwrap(), json!(4));
        run(&d, json!({"op": "abort", "tx": tx})).unwrap();
    }
    // Small documents made large: what the update makes is held within the same bound.
    for i in 0..17 {
        run(&d, json!({"op": "insertOne", "collection": "s", "doc": {"_id": format!("s{i:02}")}})).unwrap();
    }
    let e = run(&d, json!({"op": "updateMany", "collection": "s", "filter": {}, "update": {"$set": {"v": big}}})).unwrap_err();
    assert_eq!(e.kind, DbErrorKind::Quota, "{}", e.message);
    assert!(e.message.contains("more than 64 MiB"), "{}", e.message);
    assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "s", "filter": {"v": {"$exists": true}}})).unwrap(), json!(0));
}

/// A document that files many long keys pays for them: the index entries count against the
/// database's bytes as the documents do, at a write, at an index made over the documents there,
/// and at once for one operation.
fn index_entries_count_against_the_quota(e: &Engine) {
    let d = e.databases();
    let quota = Quota { bytes: 20 << 20, ..Quota::default() };
    let q = |req: Value| d.execute("g", &quota, &req);
    // About 4 MiB of keys in each index: a 400-byte field beside each of 10,000 numbers.
    let doc = |i: usize| json!({"_id": format!("d{i}"), "a": "x".repeat(400), "b": (0..10_000).collect::<Vec<_>>()});
    q(json!({"op": "createIndex", "collection": "amp", "keys": {"a": 1, "b": 1}})).unwrap();
    q(json!({"op": "createIndex", "collection": "amp", "keys": {"b": 1, "a": 1}})).unwrap();
    for i in 0..2 {
        q(json!({"op": "insertOne", "collection": "amp", "doc": doc(i)})).unwrap();
    }
    let e = q(json!({"op": "insertOne", "collection": "amp", "doc": doc(2)})).unwrap_err();
    assert!(e.kind == DbErrorKind::Quota && e.message.contains("bytes"), "{}", e.message);
    assert_eq!(q(json!({"op": "countDocuments", "collection": "amp", "filter": {}})).unwrap(), json!(2));
    let bytes = d.get("g").unwrap().backend.collections().unwrap()["amp"].bytes;
    assert!(bytes > 15 << 20, "{bytes} bytes: the entries are counted");
    // An index over the documents there.
    for i in 0..3 {
        q(json!({"op": "insertOne", "collection": "flat", "doc": doc(i)})).unwrap();
    }
    let e = q(json!({"op": "createIndex", "collection": "flat", "keys": {"a": 1, "b": 1}})).unwrap_err();
    assert!(e.kind == DbErrorKind::Quota && e.message.contains("index a_1_b_1"), "{}", e.message);
    assert_eq!(q(json!({"op": "createIndex", "collection": "flat", "keys": {"a": 1}})).unwrap(), json!("a_1"));
    // A database holds at most so many collections (made here in one transaction).
    let g = |req: Value| d.execute("g3", &Quota::default(), &req);
    let tx = g(json!({"op": "begin"})).unwrap()["tx"].clone();
    for i in 0..weir_database::exec::MAX_COLLECTIONS {
        g(json!({"op": "insertOne", "collection": format!("c{i}"), "doc": {"_id": 1}, "tx": tx})).unwrap();
    }
    g(json!({"op": "commit", "tx": tx})).unwrap();
    for req in [json!({"op": "insertOne", "collection": "one-more", "doc": {}}), json!({"op": "createIndex", "collection": "one-more", "keys": {"a": 1}})] {
        let e = g(req).unwrap_err();
        assert!(e.kind == DbErrorKind::Quota && e.message.contains("1000 collections"), "{}", e.message);
    }
    g(json!({"op": "insertOne", "collection": "c5", "doc": {"_id": 2}})).unwrap();
    let long = json!({"op": "createIndex", "collection": "c5", "keys": {"a".repeat(1025): 1}});
    assert_eq!(g(long).unwrap_err().kind, DbErrorKind::BadInput);
    // One operation files at most 64 MiB of entries, whatever the quota.
    let docs: Vec<Value> = (10..30).map(doc).collect();
    let e = d.execute("g2", &Quota::default(), &json!({"op": "createIndex", "collection": "m", "keys": {"a": 1, "b": 1}})).map(|_| ()).and_then(|()| d.execute("g2", &Quota::default(), &json!({"op": "insertMany", "collection": "m", "docs": docs}))).unwrap_err();
    assert!(e.kind == DbErrorKind::Quota && e.message.contains("64 MiB of index entries"), "{}", e.message);
}

fn quotas_and_bad_input(e: &Engine) {
    let d = e.databases();
    // A collection has at most 16 indexes; one made again is no new one.
    for i in 0..16 {
        run(&d, json!({"op": "createIndex", "collection": "ix", "keys": {format!("f{i}"): 1}})).unwrap();
    }
    run(&d, json!({"op": "createIndex", "collection": "ix", "keys": {"f3": 1}})).unwrap();
    let e16 = run(&d, json!({"op": "createIndex", "collection": "ix", "keys": {"f16": 1}})).unwrap_err();
    assert_eq!(e16.kind, DbErrorKind::Quota, "{}", e16.message);
    run(&d, json!({"op": "dropIndex", "collection": "ix", "name": "f0_1"})).unwrap();
    run(&d, json!({"op": "createIndex", "collection": "ix", "keys": {"f16": 1}})).unwrap();
    let q = Quota { documents: 2, bytes: 1 << 20, query_ms: 5000 };
    d.execute("g", &q, &json!({"op": "insertMany", "collection": "c", "docs": [{}, {}]})).unwrap();
    let e = d.execute("g", &q, &json!({"op": "insertOne", "collection": "c", "doc": {}})).unwrap_err();
    assert_eq!((e.kind, e.status()), (DbErrorKind::Quota, 507));
    let q = Quota { documents: 100, bytes: 200, query_ms: 5000 };
    let e = d.execute("g", &q, &json!({"op": "insertOne", "collection": "c", "doc": {"big": "x".repeat(300)}})).unwrap_err();
    assert_eq!(e.kind, DbErrorKind::Quota);
    for (req, says) in [
        (json!({"op": "find", "collection": "__x", "filter": {}}), "reserved"),
        (json!({"op": "find", "collection": "../etc", "filter": {}}), "collection name"),
        (json!({"op": "find", "collection": "c", "filter": {"$where": "1"}}), "$where"),
        (json!({"op": "updateOne", "collection": "c", "filter": {}, "update": {"$rename": {}}}), "$rename"),
        (json!({"op": "nope", "collection": "c"}), "unknown operation"),
        // A path of more parts than a document may nest (an update would build a level per
        // part), however many: refused before anything is built.
        (json!({"op": "updateOne", "collection": "c", "filter": {}, "update": {"$set": {vec!["a"; 65].join("."): 1}}}), "at most 64 parts"),
        (json!({"op": "updateOne", "collection": "c", "filter": {}, "update": {"$set": {vec!["a"; 1_000_000].join("."): 1}}, "options": {"upsert": true}}), "at most 64 parts"),
        (json!({"op": "find", "collection": "c", "filter": {}, "options": {"projection": {vec!["a"; 65].join("."): 1}}}), "at most 64 parts"),
        (json!({"op": "find", "collection": "c", "filter": {}, "options": {"sort": (0..33).map(|i| (format!("f{i}"), json!(1))).collect::<serde_json::Map<_, _>>()}}), "at most 32 fields"),
        (json!({"op": "find", "collection": "c", "filter": {}, "options": {"projection": (0..257).map(|i| (format!("f{i}"), json!(1))).collect::<serde_json::Map<_, _>>()}}), "at most 256 fields"),
    ] {
        let e = run(&d, req).unwrap_err();
        assert!(e.message.contains(says), "{e:?}");
    }
}

fn a_scan_past_its_time_fails(e: &Engine) {
    let d = e.databases();
    let docs: Vec<Value> = (0..10_000).map(|i| json!({"s": format!("{i}{}", "a".repeat(200))})).collect();
    run(&d, json!({"op": "insertMany", "collection": "c", "docs": docs})).unwrap();
    let q = Quota { query_ms: 1, ..Quota::default() };
    let e = d.execute("g", &q, &json!({"op": "find", "collection": "c", "filter": {"s": {"$regex": "(a|aa)+b$"}}})).unwrap_err();
    assert_eq!((e.kind, e.status()), (DbErrorKind::Timeout, 504));
    // One document whose long array meets a long `$in` (10^10 comparisons): the query stops
    // at its time within the document, on a find and on an update's `$pull` alike.
    let long: Vec<u32> = (0..500_000).collect();
    run(&d, json!({"op": "insertOne", "collection": "long", "doc": {"_id": 1, "arr": long}})).unwrap();
    run(&d, json!({"op": "insertOne", "collection": "long", "doc": {"_id": 2, "objs": vec![json!({}); 300_000]}})).unwrap();
    let absent: Vec<i32> = (1..=20_000).map(|i| -i).collect();
    let q = Quota { query_ms: 200, ..Quota::default() };
    for req in [
        json!({"op": "find", "collection": "long", "filter": {"arr": {"$in": absent}}}),
        json!({"op": "countDocuments", "collection": "long", "filter": {"$or": absent.iter().map(|v| json!({"arr": v})).collect::<Vec<_>>()}}),
        json!({"op": "updateOne", "collection": "long", "filter": {"_id": 1}, "update": {"$pull": {"arr": {"$in": absent}}}}),
        // A path that walks a long array of objects and finds nothing, many times over.
        json!({"op": "countDocuments", "collection": "long", "filter": {"$or": absent.iter().map(|v| json!({"objs.x": v})).collect::<Vec<_>>()}}),
    ] {
        let t = Instant::now();
        let e = d.execute("g", &q, &req).unwrap_err();
        assert_eq!(e.kind, DbErrorKind::Timeout, "{}", e.message);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
    assert_eq!(run(&d, json!({"op": "findOne", "collection": "long", "filter": {"_id": 1}})).unwrap()["arr"].as_array().unwrap().len(), 500_000);
}

fn id(v: impl Into<Value>) -> String {
    id_key(&v.into()).unwrap()
}

fn key(v: impl Into<Value>) -> String {
    index_key(&[v.into()])
}

fn put(id: &str, doc: Value, expect: Option<Option<Value>>) -> Write {
    put_to("c", id, doc, expect)
}

fn put_to(coll: &str, id: &str, doc: Value, expect: Option<Option<Value>>) -> Write {
    Write::Put { coll: coll.into(), id: id.into(), doc, expect }
}

fn index(name: &str, field: &str, unique: bool) -> Write {
    Write::CreateIndex { coll: "c".into(), def: IndexDef { name: name.into(), keys: vec![(field.into(), 1)], unique } }
}

fn all_of(b: &dyn Backend, coll: &str) -> Vec<Value> {
    let mut docs = Vec::new();
    b.scan(coll, &mut |d| {
        docs.push(d);
        Ok(true)
    })
    .unwrap();
    docs
}

/// What `Backend` promises, checked on the trait itself.
fn backends_keep_their_contract(e: &Engine) {
    let b = e.backend("contract");
    let a = json!({"_id": "a", "email": "x@y", "tags": ["p", "q"]});
    b.apply(&[put(&id("a"), a.clone(), Some(None))]).unwrap();

    // A failed `expect` is a conflict, and the batch it is in writes nothing.
    let err = b.apply(&[put(&id("b"), json!({"_id": "b"}), Some(None)), put(&id("a"), a.clone(), Some(None))]).unwrap_err();
    assert_eq!(err.kind, DbErrorKind::Conflict);
    assert_eq!(b.get("c", &id("b")).unwrap(), None);
    let err = b.apply(&[Write::Delete { coll: "c".into(), id: id("a"), expect: Some(json!({"_id": "a"})) }]).unwrap_err();
    assert_eq!(err.kind, DbErrorKind::Conflict);
    assert_eq!(b.get("c", &id("a")).unwrap(), Some(a.clone()));

    // Index definitions: again the same is nothing, the same name otherwise is refused.
    b.apply(&[index("email_1", "email", true)]).unwrap();
    b.apply(&[index("email_1", "email", true)]).unwrap();
    assert_eq!(b.apply(&[index("email_1", "email", false)]).unwrap_err().kind, DbErrorKind::BadInput);
    assert_eq!(b.apply(&[Write::DropIndex { coll: "c".into(), name: "nope".into() }]).unwrap_err().kind, DbErrorKind::BadInput);
    assert_eq!(b.lookup("c", "email_1", &key("x@y")).unwrap(), vec![id("a")]);

    // A second holder of a unique key is refused, with the rest of its batch.
    let err = b.apply(&[put(&id("b"), json!({"_id": "b", "email": "b@y"}), Some(None)), put(&id("d"), json!({"_id": "d", "email": "x@y"}), Some(None))]).unwrap_err();
    assert_eq!(err.kind, DbErrorKind::Duplicate);
    assert_eq!(b.get("c", &id("b")).unwrap(), None);
    assert!(b.lookup("c", "email_1", &key("b@y")).unwrap().is_empty());
    // Writes apply in their order: a key taken before its holder lets it go is refused...
    let moved = json!({"_id": "a", "email": "new@y", "tags": ["p", "q"]});
    let d = json!({"_id": "d", "email": "x@y"});
    let err = b.apply(&[put(&id("d"), d.clone(), Some(None)), put(&id("a"), moved.clone(), Some(Some(a.clone())))]).unwrap_err();
    assert_eq!(err.kind, DbErrorKind::Duplicate);
    // ...and taken after.
    b.apply(&[put(&id("a"), moved.clone(), Some(Some(a.clone()))), put(&id("d"), d.clone(), Some(None))]).unwrap();
    assert_eq!(b.lookup("c", "email_1", &key("x@y")).unwrap(), vec![id("d")]);
    assert_eq!(b.lookup("c", "email_1", &key("new@y")).unwrap(), vec![id("a")]);
    // A document written again as it is keeps its entries.
    b.apply(&[put(&id("a"), moved.clone(), None)]).unwrap();
    assert_eq!(b.lookup("c", "email_1", &key("new@y")).unwrap(), vec![id("a")]);

    // A multikey index over the documents there, its ids in their key order.
    b.apply(&[put(&id(7), json!({"_id": 7, "tags": ["q"]}), Some(None))]).unwrap();
    b.apply(&[index("tags_1", "tags", false)]).unwrap();
    assert_eq!(b.lookup("c", "tags_1", &key("q")).unwrap(), vec![id("a"), id(7)]);
    assert_eq!(b.lookup("c", "tags_1", &key("p")).unwrap(), vec![id("a")]);
    // A unique index over values held twice is refused whole.
    assert_eq!(b.apply(&[index("tags_u", "tags", true)]).unwrap_err().kind, DbErrorKind::Duplicate);
    assert!(b.lookup("c", "tags_u", &key("p")).unwrap().is_empty());
    assert_eq!(b.indexes("c").unwrap().iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["email_1", "tags_1"]);

    // Long keys and any index name.
    let long = "l".repeat(3000);
    let def = IndexDef { name: "odd \u{0}\"name'".into(), keys: vec![("s".into(), 1)], unique: true };
    b.apply(&[Write::CreateIndex { coll: "long".into(), def: def.clone() }]).unwrap();
    b.apply(&[put_to("long", &id("e"), json!({"_id": "e", "s": long}), Some(None))]).unwrap();
    let err = b.apply(&[put_to("long", &id("f"), json!({"_id": "f", "s": long}), Some(None))]).unwrap_err();
    assert_eq!(err.kind, DbErrorKind::Duplicate);
    assert_eq!(b.lookup("long", &def.name, &key(long.clone())).unwrap(), vec![id("e")]);
    assert!(b.lookup("long", &def.name, &key(format!("{long}x"))).unwrap().is_empty());

    // Documents come back as stored, field order and all.
    let stored = json!({"_id": "z", "email": "z@y", "zeta": 1, "alpha": {"y": 2.5, "x": [1, "\u{0}", "é😀", 1.0, -0.0]}, "0": null, "dup": "\\\""});
    b.apply(&[put(&id("z"), stored.clone(), Some(None))]).unwrap();
    let got = b.get("c", &id("z")).unwrap().unwrap();
    assert_eq!(serde_json::to_string(&got).unwrap(), serde_json::to_string(&stored).unwrap());

    // A scan is in `_id` key order, and stops when told.
    let ids: Vec<Value> = all_of(&*b, "c").iter().map(|d| d["_id"].clone()).collect();
    assert_eq!(ids, [json!("a"), json!("d"), json!("z"), json!(7)]);
    let mut seen = 0;
    b.scan("c", &mut |_| {
        seen += 1;
        Ok(seen < 2)
    })
    .unwrap();
    assert_eq!(seen, 2);
    let err = b.scan("c", &mut |_| Err(DbError { kind: DbErrorKind::Timeout, message: "late".into() })).unwrap_err();
    assert_eq!(err.kind, DbErrorKind::Timeout);

    // The counts are those of the documents there, and their bytes those of the documents
    // and of the index entries they file; an index dropped gives its entries' bytes back.
    let stats = b.collections().unwrap();
    let docs = all_of(&*b, "c");
    let indexes = b.indexes("c").unwrap();
    let bytes: u64 = docs.iter().map(|d| serde_json::to_vec(d).unwrap().len() as u64).sum();
    let entries: u64 = docs.iter().map(|d| weir_database::filing_bytes(&indexes, "c", &id_key(&d["_id"]).unwrap(), d).unwrap()).sum();
    assert!(entries > 0);
    assert_eq!((stats["c"].documents, stats["c"].bytes), (docs.len() as u64, bytes + entries));
    b.apply(&[Write::DropIndex { coll: "c".into(), name: "email_1".into() }]).unwrap();
    let tags: Vec<IndexDef> = indexes.iter().filter(|d| d.name == "tags_1").cloned().collect();
    let left: u64 = docs.iter().map(|d| weir_database::filing_bytes(&tags, "c", &id_key(&d["_id"]).unwrap(), d).unwrap()).sum();
    assert_eq!(b.collections().unwrap()["c"].bytes, bytes + left);
    b.apply(&[Write::Delete { coll: "c".into(), id: id(7), expect: None }, Write::Delete { coll: "c".into(), id: id("none"), expect: None }]).unwrap();
    assert_eq!(b.collections().unwrap()["c"].documents, docs.len() as u64 - 1);
    assert_eq!(b.lookup("c", "tags_1", &key("q")).unwrap(), vec![id("a")]);

    // Dropping a collection takes its documents, entries and counts; an index alone keeps
    // one listed.
    b.apply(&[Write::CreateIndex { coll: "other".into(), def: IndexDef { name: "k_1".into(), keys: vec![("k".into(), 1)], unique: false } }]).unwrap();
    b.apply(&[Write::DropCollection { coll: "c".into() }]).unwrap();
    assert_eq!(b.collections().unwrap().into_keys().collect::<Vec<_>>(), ["long", "other"]);
    assert_eq!(b.collections().unwrap()["other"], CollStats { documents: 0, bytes: 0, indexes: b.indexes("other").unwrap() });
    assert_eq!(b.get("c", &id("a")).unwrap(), None);
    assert!(all_of(&*b, "c").is_empty() && b.indexes("c").unwrap().is_empty());
    assert!(b.lookup("c", "email_1", &key("new@y")).unwrap().is_empty());
    // Written again after a drop in one batch, a collection starts from nothing.
    b.apply(&[put(&id("n"), json!({"_id": "n"}), Some(None)), Write::DropCollection { coll: "c".into() }, put(&id("m"), json!({"_id": "m"}), Some(None))]).unwrap();
    assert_eq!(all_of(&*b, "c"), [json!({"_id": "m"})]);
    assert_eq!(b.collections().unwrap()["c"].documents, 1);

    b.destroy().unwrap();
    assert!(b.get("c", &id("m")).is_err());
    assert!(e.backend("contract").collections().unwrap().is_empty());
}

fn nodes_see_each_others_writes_at_once(e: &Engine) {
    let (a, b) = e.two_nodes();
    run(&a, json!({"op": "insertOne", "collection": "k", "doc": {"_id": "k", "v": 1}})).unwrap();
    assert_eq!(run(&b, json!({"op": "findOne", "collection": "k", "filter": {"_id": "k"}})).unwrap(), json!({"_id": "k", "v": 1}));
    run(&b, json!({"op": "createIndex", "collection": "k", "keys": {"v": 1}, "options": {"unique": true}})).unwrap();
    let plan = run(&a, json!({"op": "explain", "collection": "k", "filter": {"v": 1}})).unwrap();
    assert_eq!(plan["index"], "v_1");
    let err = run(&a, json!({"op": "insertOne", "collection": "k", "doc": {"_id": "k2", "v": 1}})).unwrap_err();
    assert_eq!(err.kind, DbErrorKind::Duplicate);
    // A transaction on one node, and a write on the other of what it read: nothing commits.
    let tx = run(&a, json!({"op": "begin"})).unwrap()["tx"].clone();
    run(&a, json!({"op": "updateOne", "collection": "k", "filter": {"_id": "k"}, "update": {"$set": {"v": 2}}, "tx": tx})).unwrap();
    run(&b, json!({"op": "updateOne", "collection": "k", "filter": {"_id": "k"}, "update": {"$set": {"v": 5}}})).unwrap();
    assert_eq!(run(&a, json!({"op": "commit", "tx": tx})).unwrap_err().kind, DbErrorKind::Conflict);
    assert_eq!(run(&a, json!({"op": "findOne", "collection": "k", "filter": {"_id": "k"}})).unwrap()["v"], 5);
    run(&a, json!({"op": "drop", "collection": "k"})).unwrap();
    assert_eq!(run(&b, json!({"op": "collections"})).unwrap(), json!([]));
}

fn increments_from_two_nodes_are_all_kept(e: &Engine) {
    const EACH: usize = 200;
    let (a, b) = e.two_nodes();
    run(&a, json!({"op": "insertOne", "collection": "n", "doc": {"_id": "n", "n": 0}})).unwrap();
    let threads = [a.clone(), b].map(|d| {
        std::thread::spawn(move || {
            // A conflict that outlasts the operation's own tries is an error the caller sees:
            // nothing was written, so the caller's try again is still one increment.
            let mut conflicts = 0;
            for _ in 0..EACH {
                loop {
                    match run(&d, json!({"op": "updateOne", "collection": "n", "filter": {"_id": "n"}, "update": {"$inc": {"n": 1}}})) {
                        Ok(r) => {
                            assert_eq!(r["modifiedCount"], 1);
                            break;
                        }
                        Err(e) if e.kind == DbErrorKind::Conflict => conflicts += 1,
                        Err(e) => panic!("{e:?}"),
                    }
                }
            }
            conflicts
        })
    });
    let conflicts: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(conflicts < EACH, "{conflicts} increments ran out of tries");
    assert_eq!(run(&a, json!({"op": "findOne", "collection": "n", "filter": {"_id": "n"}})).unwrap()["n"], 2 * EACH);
}

fn writers_of_several_collections_never_deadlock(e: &Engine) {
    const ROUNDS: usize = 100;
    let (a, b) = e.two_backends("several");
    let orders = [["left", "right"], ["right", "left"]];
    let threads: Vec<_> = [a.clone(), b].into_iter().zip(orders).enumerate().map(|(node, (backend, order))| {
        std::thread::spawn(move || {
            for round in 0..ROUNDS {
                let writes: Vec<Write> = order.iter().map(|coll| Write::Put { coll: coll.to_string(), id: id(format!("{node}-{round}")), doc: json!({"_id": format!("{node}-{round}")}), expect: Some(None) }).collect();
                backend.apply(&writes).unwrap();
            }
        })
    }).collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let stats = a.collections().unwrap();
    assert_eq!((stats["left"].documents, stats["right"].documents), (2 * ROUNDS as u64, 2 * ROUNDS as u64));
}

/// The same documents, written the same way into both engines, read back alike: what an
/// export from one and an import into the other rely on.
#[test]
fn both_engines_keep_documents_alike() {
    const TAGS: [&str; 3] = ["a", "b", "c"];
    let engines = [Engine::embedded(), Engine::postgres("alike")];
    let mut docs: Vec<Value> = vec![
        json!({"_id": "first", "z": 1, "a": 2, "m": {"y": [3, {"b": 1, "a": 0}], "x": null}}),
        json!({"_id": 10, "text": "é, 😀, \u{0}, \"quoted\", \\", "f": 1.5, "i": -7, "big": 12345678901234567i64}),
        json!({"_id": 9.5, "nested": {"deep": {"deeper": {"list": [[], {}, [1, [2, [3]]]]}}}}),
        json!({"_id": "e", "float": 1.0, "neg": -0.0, "exp": 1e300, "bool": false}),
    ];
    docs.extend((0..300).map(|i| json!({"_id": format!("d{i:03}"), "n": i % 7, "tag": TAGS[i % 3], "pad": "x".repeat(i)})));
    let mut seen = Vec::new();
    for engine in &engines {
        let d = engine.databases();
        run(&d, json!({"op": "insertMany", "collection": "things", "docs": docs})).unwrap();
        run(&d, json!({"op": "createIndex", "collection": "things", "keys": {"n": 1, "tag": -1}})).unwrap();
        run(&d, json!({"op": "updateMany", "collection": "things", "filter": {"n": 3}, "update": {"$set": {"three": true}, "$push": {"log": "x"}}})).unwrap();
        run(&d, json!({"op": "deleteMany", "collection": "things", "filter": {"tag": "c", "n": 1}})).unwrap();
        run(&d, json!({"op": "insertOne", "collection": "other", "doc": {"_id": 1}})).unwrap();
        let found = run(&d, json!({"op": "find", "collection": "things", "filter": {}})).unwrap();
        let stats = d.get("g").unwrap().backend.collections().unwrap();
        seen.push((serde_json::to_string(&found).unwrap(), stats));
    }
    let (embedded, postgres) = (&seen[0], &seen[1]);
    assert_eq!(embedded.0, postgres.0, "find {{}} reads the same documents, in the same order and form");
    assert_eq!(embedded.1, postgres.1, "the collections' counts agree");
    assert_eq!(embedded.1["things"].documents, 304 - 14);
}

fn open_pg(url: &str, name: &str, pool: usize) -> Postgres {
    Postgres::open(url, name, pool).unwrap()
}

/// The connections of database `url` that engines opened.
fn engine_connections(admin: &mut postgres::Client) -> i64 {
    admin.query_one("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'weir-database'", &[]).unwrap().get(0)
}

#[test]
fn postgres_pool_stays_bounded_and_replaces_lost_connections() {
    let server = PgServer::shared();
    let url = server.database("pool");
    let pg = Arc::new(open_pg(&url, "pool", 2));
    let doc = json!({"_id": "a", "v": 1});
    pg.apply(&[put(&id("a"), doc.clone(), Some(None))]).unwrap();
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();

    let workers: Vec<_> = (0..6)
        .map(|_| {
            let pg = pg.clone();
            std::thread::spawn(move || {
                for _ in 0..150 {
                    assert!(pg.get("c", &id("a")).unwrap().is_some());
                    assert_eq!(all_of(&*pg, "c").len(), 1);
                }
            })
        })
        .collect();
    let mut most = 0;
    while !workers.iter().all(|w| w.is_finished()) {
        most = most.max(engine_connections(&mut admin));
        std::thread::sleep(Duration::from_millis(2));
    }
    workers.into_iter().for_each(|w| w.join().unwrap());
    assert!((1..=2).contains(&most), "{most} connections for a pool of 2");

    // Connections ended under it are let go, and the next call makes new ones.
    for round in 0..2 {
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'weir-database'", &[]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while engine_connections(&mut admin) > 0 {
            assert!(Instant::now() < deadline, "the connections did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
        if round == 0 {
            assert_eq!(pg.get("c", &id("a")).unwrap(), Some(doc.clone()));
        } else {
            pg.apply(&[put(&id("b"), json!({"_id": "b"}), Some(None))]).unwrap();
        }
    }
    assert_eq!(all_of(&*pg, "c").len(), 2);
    assert!(engine_connections(&mut admin) <= 2);

    // Idle connections go once unused for long enough (the node's databases are asked every
    // few seconds by a thread of their own, with no other call needed), and the next call makes
    // one again.
    pg.rest(Duration::from_secs(3600));
    assert!(engine_connections(&mut admin) >= 1, "recently used connections stay");
    let dbs = Databases::new(weir_database::postgres::opener(url.clone(), 2));
    let idle_for = Duration::from_secs(3);
    dbs.rest_every(Duration::from_millis(100), idle_for).unwrap();
    let used = Instant::now();
    dbs.execute("pool", &Quota::default(), &json!({"op": "find", "collection": "c", "filter": {}})).unwrap();
    pg.rest(Duration::ZERO);
    assert!(engine_connections(&mut admin) >= 1, "a database's connection stays while it was used lately");
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine_connections(&mut admin) > 0 {
        assert!(Instant::now() < deadline, "idle connections were let go");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(used.elapsed() >= idle_for, "let go after {:?}, before it was idle long enough", used.elapsed());
    assert_eq!(pg.get("c", &id("a")).unwrap(), Some(doc));
}

#[test]
fn postgres_databases_live_in_schemas_of_their_own() {
    let server = PgServer::shared();
    let url = server.database("schemas");
    let d = Databases::new(weir_database::postgres::opener(url.clone(), 2));
    let long = format!("gw-{}", "x".repeat(70));
    let names = ["shop", "shop.dev", "shop-dev", long.as_str()];
    for name in names {
        d.execute(name, &Quota::default(), &json!({"op": "insertOne", "collection": "c", "doc": {"_id": name}})).unwrap();
    }
    for name in names {
        assert_eq!(d.execute(name, &Quota::default(), &json!({"op": "find", "collection": "c", "filter": {}})).unwrap(), json!([{"_id": name}]));
    }
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let schemas = |admin: &mut postgres::Client| -> Vec<String> {
        admin.query("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'wdb\\_%' ORDER BY nspname", &[]).unwrap().iter().map(|r| r.get(0)).collect()
    };
    let made = schemas(&mut admin);
    assert_eq!(made.len(), 4, "{made:?}");
    assert!(made.contains(&"wdb_shop.dev".to_string()) && made.iter().all(|s| s.len() <= 63), "{made:?}");

    d.destroy("shop.dev").unwrap();
    assert!(!schemas(&mut admin).contains(&"wdb_shop.dev".to_string()));
    assert_eq!(d.execute("shop", &Quota::default(), &json!({"op": "find", "collection": "c", "filter": {}})).unwrap(), json!([{"_id": "shop"}]));
    // A destroyed name is never opened again on the node: a call still running after its
    // gateway went cannot make the database afresh.
    let after = d.execute("shop.dev", &Quota::default(), &json!({"op": "insertOne", "collection": "c", "doc": {"_id": "late"}}));
    assert_eq!(after.err().map(|e| e.kind), Some(DbErrorKind::Unavailable));
    assert!(!schemas(&mut admin).contains(&"wdb_shop.dev".to_string()), "nothing made it again");

    assert_eq!(open_pg(&url, "shop.dev", 1).schema(), "wdb_shop.dev");
    assert_eq!(Postgres::open(&url, "Shop_1", 1).err().map(|e| e.kind), Some(DbErrorKind::BadInput));
    let refused = Postgres::open("postgres://postgres@127.0.0.1:1/none", "shop", 1).err().map(|e| e.kind);
    assert_eq!(refused, Some(DbErrorKind::Unavailable));
}

/// A count is exact whichever way it reads: a scan and one key of an index count without
/// keeping what matched; several keys of an index, where a document may come twice, count it
/// once; a transaction counts its own writes.
fn counts_are_exact_on_every_path(e: &Engine) {
    let d = e.databases();
    let docs: Vec<Value> = (0..300).map(|i| json!({"_id": format!("d{i}"), "tags": [i % 3, i % 5], "n": i, "k": "same"})).collect();
    run(&d, json!({"op": "insertMany", "collection": "c", "docs": docs})).unwrap();
    run(&d, json!({"op": "createIndex", "collection": "c", "keys": {"tags": 1}})).unwrap();
    run(&d, json!({"op": "createIndex", "collection": "c", "keys": {"k": 1}})).unwrap();
    let count = |filter: Value| run(&d, json!({"op": "countDocuments", "collection": "c", "filter": filter})).unwrap();
    assert_eq!(count(json!({})), json!(300));
    // One key filing more documents than a page of them: every page is read, and a find that
    // stops early stops there.
    assert_eq!(count(json!({"k": "same"})), json!(300));
    let found = run(&d, json!({"op": "find", "collection": "c", "filter": {"k": "same"}, "options": {"limit": 2}})).unwrap();
    assert_eq!(found.as_array().map(|a| a.iter().map(|d| d["_id"].clone()).collect::<Vec<_>>()), Some(vec![json!("d0"), json!("d1")]));
    assert_eq!(count(json!({"n": {"$gte": 100}})), json!(200));
    assert_eq!(count(json!({"tags": 0})), json!(100 + 60 - 20));
    // i % 3 == 1 or i % 5 == 1 (and 4 == 1 % 3 too): each document once.
    assert_eq!(count(json!({"tags": {"$in": [1, 4]}})), json!((0..300).filter(|i| [i % 3, i % 5].iter().any(|t| *t == 1 || *t == 4)).count()));
    assert_eq!(count(json!({"_id": {"$in": ["d1", "d1", "d2", "nope"]}})), json!(2));
    let tx = run(&d, json!({"op": "begin"})).unwrap()["tx"].clone();
    run(&d, json!({"op": "insertOne", "collection": "c", "doc": {"_id": "x", "tags": [0]}, "tx": tx})).unwrap();
    run(&d, json!({"op": "deleteOne", "collection": "c", "filter": {"_id": "d0"}, "tx": tx})).unwrap();
    assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "c", "filter": {"tags": 0}, "tx": tx})).unwrap(), json!(140));
    run(&d, json!({"op": "abort", "tx": tx})).unwrap();
    let explained = run(&d, json!({"op": "explain", "collection": "c", "filter": {}, "options": {"sort": {"n": -1}, "skip": 290, "limit": 50}})).unwrap();
    assert_eq!(explained["returned"], json!(10), "{explained}");
}

/// An index and a collection larger than a drop reads at once go whole, and what they held is
/// no longer counted.
fn large_indexes_and_collections_drop_whole(e: &Engine) {
    let d = e.databases();
    let docs: Vec<Value> = (0..5000).map(|i| json!({"_id": format!("d{i:05}"), "tags": [i, i + 1]})).collect();
    run(&d, json!({"op": "insertMany", "collection": "big", "docs": docs})).unwrap();
    run(&d, json!({"op": "insertOne", "collection": "small", "doc": {"_id": "s"}})).unwrap();
    let stats = || d.get("g").unwrap().backend.collections().unwrap();
    let plain = stats()["big"].bytes;
    run(&d, json!({"op": "createIndex", "collection": "big", "keys": {"tags": 1}})).unwrap();
    assert!(stats()["big"].bytes > plain);
    run(&d, json!({"op": "dropIndex", "collection": "big", "name": "tags_1"})).unwrap();
    assert_eq!(stats()["big"].bytes, plain);
    run(&d, json!({"op": "createIndex", "collection": "big", "keys": {"tags": 1}})).unwrap();
    assert_eq!(run(&d, json!({"op": "drop", "collection": "big"})).unwrap(), json!(true));
    assert_eq!(run(&d, json!({"op": "collections"})).unwrap(), json!(["small"]));
    assert_eq!(run(&d, json!({"op": "countDocuments", "collection": "big", "filter": {}})).unwrap(), json!(0));
    // Made again, the collection has nothing of the dropped one, its index entries neither.
    run(&d, json!({"op": "createIndex", "collection": "big", "keys": {"tags": 1}})).unwrap();
    run(&d, json!({"op": "insertOne", "collection": "big", "doc": {"_id": "n", "tags": [1]}})).unwrap();
    assert_eq!(run(&d, json!({"op": "find", "collection": "big", "filter": {"tags": 1}})).unwrap(), json!([{"_id": "n", "tags": [1]}]));
}
