//! Runs the operations functions send: `{"op": "findOne", "collection": "users", "filter":
//! {...}}` in, MongoDB's result shapes out.
//!
//! Writes outside a transaction read, change and write one document at a time under the
//! database's lock on this node, each write carrying what it read (`Write::Put::expect`), so a
//! backend shared by several nodes refuses a write over another node's and the operation runs
//! again. A transaction (`begin` … `commit`) keeps its writes aside: its reads see them, and
//! `commit` writes them all in one backend transaction that checks every document it changes
//! is still as the transaction first saw it, or writes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::filter::{Budget, Filter};
use crate::update::{Projection, Update, id_key, id_keys, parse_sort, prepare, prepare_sized, sort};
use crate::{Backend, DbError, DbErrorKind, IndexDef, Opener, Quota, Write, check_collection, index_key};

/// Times an operation outside a transaction is tried again when another node wrote first.
const RETRIES: usize = 16;
/// Transactions open at once on one database (on this node), and how long one may stay open.
const MAX_TXS: usize = 64;
const TX_LIFETIME: Duration = Duration::from_secs(120);
/// Bytes of documents a database's open transactions may hold: what they wrote and have not
/// committed, and what they read (kept to check at the commit).
const TX_PENDING: usize = 32 << 20;
/// Documents `insertMany` takes at once.
const MAX_BATCH: usize = 10_000;
/// Indexes one collection may have.
const MAX_INDEXES: usize = 16;
/// Documents one `find` answers at most (`skip` pages through more).
pub const MAX_RESULTS: usize = 10_000;

/// One database: a backend and the lock its writers take on this node.
pub struct Db {
    pub name: String,
    pub backend: Arc<dyn Backend>,
    lock: Mutex<()>,
    /// Index definitions by collection, kept when this process is the only writer.
    indexes: Mutex<HashMap<String, Arc<Vec<IndexDef>>>>,
    /// Bytes of documents its open transactions hold (`TX_PENDING` at most).
    pending: std::sync::atomic::AtomicUsize,
}

impl Db {
    fn indexes(&self, coll: &str) -> Result<Arc<Vec<IndexDef>>, DbError> {
        if !self.backend.single_writer() {
            return Ok(Arc::new(self.backend.indexes(coll)?));
        }
        let mut cache = self.indexes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(defs) = cache.get(coll) {
            return Ok(defs.clone());
        }
        let defs = Arc::new(self.backend.indexes(coll)?);
        cache.insert(coll.to_string(), defs.clone());
        Ok(defs)
    }

    /// Applies a change of `coll`'s indexes (under the writers' lock `execute` holds),
    /// forgetting what was kept of them.
    fn change_indexes(&self, coll: &str, write: Write) -> Result<(), DbError> {
        let out = self.backend.apply(&[write]);
        self.indexes.lock().unwrap_or_else(|e| e.into_inner()).remove(coll);
        out
    }
}

/// A transaction's view: the documents it wrote (`None`: deleted), and what each was when the
/// transaction first touched it.
struct Tx {
    writes: BTreeMap<(String, String), Option<Value>>,
    seen: BTreeMap<(String, String), Option<Value>>,
    /// Its database, whose count of pending bytes holds this one's `bytes` until it goes.
    of: Arc<Db>,
    bytes: usize,
    /// Committed, aborted or expired: an operation that got hold of it before it left the map
    /// of open ones finds it over.
    over: bool,
}

impl Drop for Tx {
    fn drop(&mut self) {
        self.of.pending.fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An open transaction: its database's name and when it began, readable without waiting for
/// an operation that runs in it (each runs holding the transaction, never the whole map).
struct Open {
    db: String,
    started: Instant,
    tx: Arc<Mutex<Tx>>,
}

/// The node's databases, opened on first use.
pub struct Databases {
    opener: Opener,
    open: Mutex<HashMap<String, Arc<Db>>>,
    txs: Mutex<HashMap<u64, Open>>,
    /// Names destroyed on this node (the newest `RETIRED_KEPT`), never opened again: a call of
    /// a deleted gateway still running would otherwise make its database afresh.
    retired: Mutex<(std::collections::HashSet<String>, std::collections::VecDeque<String>)>,
}

/// How long a backend keeps what it holds for speed alone (an idle connection) unused, and how
/// often the node looks.
pub const IDLE_KEPT: Duration = Duration::from_secs(60);
pub const REST_EVERY: Duration = Duration::from_secs(10);

/// Destroyed database names a node remembers.
pub const RETIRED_KEPT: usize = 65_536;

/// How a query found its documents, for `explain`.
#[derive(Debug, Default)]
struct Plan {
    index: Option<String>,
    examined: u64,
    /// Matches counted without being kept (a count outside a transaction).
    unkept: usize,
}

impl Databases {
    pub fn new(opener: Opener) -> Arc<Databases> {
        Arc::new(Databases { opener, open: Mutex::default(), txs: Mutex::default(), retired: Mutex::default() })
    }

    pub fn get(&self, name: &str) -> Result<Arc<Db>, DbError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(db) = open.get(name) {
            return Ok(db.clone());
        }
        if self.retired.lock().unwrap_or_else(|e| e.into_inner()).0.contains(name) {
            return Err(DbError::unavailable(format!("the database {name} was deleted")));
        }
        let db = self.opened(name)?;
        open.insert(name.to_string(), db.clone());
        Ok(db)
    }

    fn opened(&self, name: &str) -> Result<Arc<Db>, DbError> {
        Ok(Arc::new(Db { name: name.to_string(), backend: (self.opener)(name)?, lock: Mutex::new(()), indexes: Mutex::default(), pending: Default::default() }))
    }

    /// Deletes database `name` and everything in it.
    pub fn destroy(&self, name: &str) -> Result<(), DbError> {
        let db = {
            // Opened (to be destroyed) and retired under one lock: nothing opens it between.
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            let db = match open.remove(name) {
                Some(db) => db,
                None => self.opened(name)?,
            };
            let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
            let (names, order) = &mut *retired;
            if names.insert(name.to_string()) {
                order.push_back(name.to_string());
                if order.len() > RETIRED_KEPT
                    && let Some(old) = order.pop_front()
                {
                    names.remove(&old);
                }
            }
            db
        };
        let gone: Vec<Open> = {
            let mut txs = self.txs.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<u64> = txs.iter().filter(|(_, o)| o.db == name).map(|(id, _)| *id).collect();
            ids.iter().filter_map(|id| txs.remove(id)).collect()
        };
        end(gone.into_iter());
        db.backend.destroy()
    }

    /// Has every open database's backend let go of what it held idle for `idle_for` (a
    /// database's idle connections to PostgreSQL): many databases each keeping a pool would
    /// otherwise hold the server's connections for good.
    pub fn rest(&self, idle_for: Duration) {
        let open: Vec<Arc<Db>> = self.open.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for db in open {
            db.backend.rest(idle_for);
        }
    }

    /// Has a thread of its own ask every open database to let go of what it held idle for
    /// `idle_for`, every `every`, for as long as the databases are in use: quiet databases
    /// hold nothing of the server's whether or not any other is busy.
    pub fn rest_every(self: &Arc<Self>, every: Duration, idle_for: Duration) -> std::io::Result<()> {
        let dbs = Arc::downgrade(self);
        std::thread::Builder::new().name("weir-db-rest".into()).spawn(move || {
            loop {
                std::thread::sleep(every);
                match dbs.upgrade() {
                    Some(dbs) => dbs.rest(idle_for),
                    None => return,
                }
            }
        })?;
        Ok(())
    }

    /// Runs one operation on database `name` within `quota`.
    pub fn execute(&self, name: &str, quota: &Quota, request: &Value) -> Result<Value, DbError> {
        let op = request["op"].as_str().ok_or_else(|| DbError::bad("an operation has an op"))?;
        let db = self.get(name)?;
        let deadline = Instant::now() + Duration::from_millis(quota.query_ms.max(1));
        let tx = match request.get("tx") {
            None | Some(Value::Null) => None,
            Some(t) => Some(t.as_u64().ok_or_else(|| DbError::bad("tx is a transaction id"))?),
        };
        match op {
            "begin" => return self.begin(&db),
            "commit" => return self.commit(&db, quota, tx.ok_or_else(|| DbError::bad("commit needs tx"))?),
            "abort" => {
                // Only a transaction of this database: an id is no key to another's.
                let gone = {
                    let mut txs = self.txs.lock().unwrap_or_else(|e| e.into_inner());
                    match txs.get(&tx.unwrap_or(0)) {
                        Some(o) if o.db == name => txs.remove(&tx.unwrap_or(0)),
                        _ => None,
                    }
                };
                end(gone.into_iter());
                return Ok(Value::Null);
            }
            "collections" => return Ok(json!(db.backend.collections()?.into_keys().collect::<Vec<_>>())),
            _ => {}
        }
        let coll = request["collection"].as_str().ok_or_else(|| DbError::bad("an operation names its collection"))?;
        check_collection(coll)?;
        let run = Run { db: &db, coll, quota, deadline, request };
        match tx {
            Some(id) => {
                if matches!(op, "createIndex" | "dropIndex" | "drop") {
                    return Err(DbError::bad(format!("{op} is not allowed in a transaction")));
                }
                let tx = self.txs.lock().unwrap_or_else(|e| e.into_inner()).get(&id).filter(|o| o.db == name).map(|o| o.tx.clone());
                let tx = tx.ok_or_else(|| DbError::bad("the transaction is over"))?;
                let mut t = tx.lock().unwrap_or_else(|e| e.into_inner());
                if t.over {
                    return Err(DbError::bad("the transaction is over"));
                }
                run.op(op, Some(&mut t))
            }
            None => {
                let _serial = if is_write(op) { Some(db.lock.lock().unwrap_or_else(|e| e.into_inner())) } else { None };
                let mut tries = 0;
                loop {
                    match run.op(op, None) {
                        Err(e) if e.kind == DbErrorKind::Conflict && tries < RETRIES => {
                            // Another node wrote first: step aside a little, more each time, so
                            // the nodes do not keep colliding.
                            tries += 1;
                            std::thread::sleep(Duration::from_micros(fastrand::u64(0..=500 * tries as u64)));
                        }
                        other => return other,
                    }
                }
            }
        }
    }

    fn begin(&self, db: &Arc<Db>) -> Result<Value, DbError> {
        let mut txs = self.txs.lock().unwrap_or_else(|e| e.into_inner());
        let expired: Vec<u64> = txs.iter().filter(|(_, o)| o.started.elapsed() >= TX_LIFETIME).map(|(id, _)| *id).collect();
        let expired: Vec<Open> = expired.iter().filter_map(|id| txs.remove(id)).collect();
        let answer = if txs.values().filter(|o| o.db == db.name).count() >= MAX_TXS {
            Err(DbError { kind: DbErrorKind::Quota, message: format!("at most {MAX_TXS} transactions may be open at once") })
        } else {
            let id = fastrand::u64(1..(1 << 53));
            let tx = Tx { writes: BTreeMap::new(), seen: BTreeMap::new(), of: db.clone(), bytes: 0, over: false };
            txs.insert(id, Open { db: db.name.clone(), started: Instant::now(), tx: Arc::new(Mutex::new(tx)) });
            Ok(json!({"tx": id}))
        };
        drop(txs);
        // Marked over outside the map's lock: an operation may still hold one.
        end(expired.into_iter());
        answer
    }

    fn commit(&self, db: &Db, quota: &Quota, id: u64) -> Result<Value, DbError> {
        let open = {
            let mut txs = self.txs.lock().unwrap_or_else(|e| e.into_inner());
            match txs.get(&id) {
                Some(o) if o.db == db.name => txs.remove(&id),
                _ => None,
            }
        };
        let open = open.ok_or_else(|| DbError::bad("the transaction is over"))?;
        // An operation still running in it finishes first; one that comes later finds it over.
        let mut tx = open.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.over = true;
        // Its bytes stay counted until it is done (the transaction drops with `open`).
        let (writes, seen) = (std::mem::take(&mut tx.writes), std::mem::take(&mut tx.seen));
        drop(tx);
        let writes: Vec<Write> = writes
            .into_iter()
            .filter_map(|((coll, id), doc)| {
                let expect = seen.get(&(coll.clone(), id.clone())).cloned().unwrap_or(None);
                match (doc, expect) {
                    (Some(doc), expect) => Some(Write::Put { coll, id, doc, expect: Some(expect) }),
                    (None, Some(expect)) => Some(Write::Delete { coll, id, expect: Some(expect) }),
                    // Added and deleted again within the transaction: nothing of it is written
                    // (a delete without what it expects deletes whatever is there, another
                    // writer's document written meanwhile too).
                    (None, None) => None,
                }
            })
            .collect();
        let _serial = db.lock.lock().unwrap_or_else(|e| e.into_inner());
        check_quota(db, quota, &writes)?;
        db.backend.apply(&writes).map_err(|e| match e.kind {
            DbErrorKind::Conflict => DbError { kind: DbErrorKind::Conflict, message: "transaction conflict: a document it changed was changed meanwhile; nothing was written".into() },
            _ => e,
        })?;
        Ok(json!({"committed": true}))
    }
}

/// Marks transactions taken out of the map as over (waiting for an operation running in one).
fn end(gone: impl Iterator<Item = Open>) {
    for open in gone {
        open.tx.lock().unwrap_or_else(|e| e.into_inner()).over = true;
    }
}

/// A write would hold more than [`WRITE_HOLD`] bytes of documents.
fn held_too_much() -> DbError {
    DbError { kind: DbErrorKind::Quota, message: format!("the operation would change more than {} MiB of documents at once; narrow its filter and repeat it", WRITE_HOLD >> 20) }
}

/// Counts `size` more bytes as held by transaction `t` against its database's `pending`,
/// unless that would pass [`TX_PENDING`].
fn hold(pending: &std::sync::atomic::AtomicUsize, t: &mut Tx, size: usize) -> Result<(), DbError> {
    let held = pending.fetch_add(size, std::sync::atomic::Ordering::Relaxed);
    if held + size > TX_PENDING {
        pending.fetch_sub(size, std::sync::atomic::Ordering::Relaxed);
        return Err(tx_full());
    }
    t.bytes += size;
    Ok(())
}

/// Open transactions of a database hold at most [`TX_PENDING`] bytes of what they read and wrote.
fn tx_full() -> DbError {
    DbError { kind: DbErrorKind::Quota, message: format!("this database's open transactions would hold more than {} MiB of documents read and written; commit or abort some", TX_PENDING >> 20) }
}

fn is_write(op: &str) -> bool {
    !matches!(op, "findOne" | "find" | "countDocuments" | "explain")
}

/// Refuses `writes` when they would take the database past its quota.
fn check_quota(db: &Db, quota: &Quota, writes: &[Write]) -> Result<(), DbError> {
    let (mut docs, mut bytes) = (0i64, 0i64);
    // The index entries the writes file count as the documents do, and are bounded at once as
    // what a write holds is.
    let mut filing = 0u64;
    let mut indexed: HashMap<&str, Arc<Vec<IndexDef>>> = HashMap::new();
    for w in writes {
        match w {
            Write::Put { coll, id, doc, expect } => {
                let old = match expect {
                    Some(old) => old.clone(),
                    None => db.backend.get(coll, id)?,
                };
                if !indexed.contains_key(coll.as_str()) {
                    indexed.insert(coll, db.indexes(coll)?);
                }
                let indexes = indexed[coll.as_str()].clone();
                let files = crate::filing_bytes(&indexes, coll, id, doc)?;
                filing += files;
                if filing > WRITE_HOLD as u64 {
                    return Err(DbError { kind: DbErrorKind::Quota, message: format!("the operation would file more than {} MiB of index entries at once; write fewer documents at a time", WRITE_HOLD >> 20) });
                }
                let new = serde_json::to_vec(doc).map(|b| b.len() as i64).unwrap_or(0) + files as i64;
                let was = old.as_ref().map(|o| serde_json::to_vec(o).map(|b| b.len() as i64).unwrap_or(0) + crate::filed_bytes(&indexes, coll, id, o) as i64);
                docs += i64::from(was.is_none());
                bytes += new - was.unwrap_or(0);
            }
            Write::Delete { .. } | Write::CreateIndex { .. } | Write::DropIndex { .. } | Write::DropCollection { .. } => {}
        }
    }
    if docs <= 0 && bytes <= 0 {
        return Ok(());
    }
    let all = db.backend.collections()?;
    room_for_collections(&all, writes.iter().map(Write::coll))?;
    let (have_docs, have_bytes) = all.values().fold((0u64, 0u64), |(d, b), s| (d + s.documents, b + s.bytes));
    if have_docs as i64 + docs > quota.documents as i64 {
        return Err(DbError { kind: DbErrorKind::Quota, message: format!("quota exceeded: the database may hold {} documents", quota.documents) });
    }
    if have_bytes as i64 + bytes > quota.bytes as i64 {
        return Err(DbError { kind: DbErrorKind::Quota, message: format!("quota exceeded: the database may hold {} bytes", quota.bytes) });
    }
    Ok(())
}

/// Which of the documents a read matches it keeps.
enum Keep<'a> {
    /// Every one, up to [`WRITE_HOLD`] bytes of them (what a write changes).
    All,
    /// Only which match, without their documents (a count).
    Which,
    /// The first so many in `_id` order: a scan stops there.
    First(usize),
    /// The first so many in the order of a sort.
    Top(&'a [(String, bool)], usize),
}

/// The documents a read keeps as it goes: with a sort, only the first so many in its order,
/// so a sorted read holds about twice its window, however many documents match.
struct Kept<'a> {
    out: BTreeMap<String, Value>,
    values: bool,
    top: Option<(&'a [(String, bool)], usize)>,
    /// Bytes of the documents kept, bounded by [`WRITE_HOLD`] whatever the operation: a read
    /// (its `skip`, its sort's window, a count in a transaction) holds no more than a write.
    held: usize,
    /// Whether the documents are kept for a write (its error says so).
    writing: bool,
    /// Whether a match may come twice (through several keys of an index, or ids given twice):
    /// a count then keeps which matched; otherwise it only counts them, in `unkept`.
    twice: bool,
    unkept: usize,
    /// When the read must end: a sort of its window stops comparing then.
    deadline: Instant,
    /// The query's time, for the error that says it ran past it.
    query_ms: u64,
}

impl Kept<'_> {
    fn offer(&mut self, id: String, doc: Value) -> Result<(), DbError> {
        if !self.values && !self.twice {
            self.unkept += 1;
            return Ok(());
        }
        self.held += self.weight(&id, &doc);
        self.out.insert(id, if self.values { doc } else { Value::Null });
        if self.held > WRITE_HOLD {
            // A sort's window drops what falls out of it first.
            self.prune()?;
            if self.held > WRITE_HOLD {
                return Err(if self.writing { held_too_much() } else { read_too_much() });
            }
        }
        if let Some((_, n)) = self.top
            && self.out.len() >= (2 * n).max(1024)
        {
            self.prune()?;
        }
        Ok(())
    }

    /// What one kept match counts against [`WRITE_HOLD`]: its document, or for a count that
    /// keeps which matched, its id (and what a map spends on each).
    fn weight(&self, id: &str, doc: &Value) -> usize {
        if self.values { serde_json::to_vec(doc).map_or(0, |b| b.len()) } else { id.len() + 64 }
    }

    /// Keeps only the first `n` by id.
    fn keep_first(&mut self, n: usize) {
        if self.out.len() <= n {
            return;
        }
        while self.out.len() > n {
            self.out.pop_last();
        }
        self.held = self.out.iter().map(|(id, d)| self.weight(id, d)).sum();
    }

    /// Keeps only the first of the sort's window.
    fn prune(&mut self) -> Result<(), DbError> {
        let Some((by, n)) = self.top else { return Ok(()) };
        if self.out.len() <= n {
            return Ok(());
        }
        let mut all: Vec<(String, Value)> = std::mem::take(&mut self.out).into_iter().collect();
        if !crate::update::sort_by(&mut all, |(_, d)| d, by, self.deadline) {
            return Err(late(self.query_ms));
        }
        all.truncate(n);
        if self.values {
            self.held = all.iter().map(|(id, d)| self.weight(id, d)).sum();
        }
        self.out = all.into_iter().collect();
        Ok(())
    }
}

fn late(query_ms: u64) -> DbError {
    DbError { kind: DbErrorKind::Timeout, message: format!("the query ran past its {query_ms} ms") }
}

fn read_too_much() -> DbError {
    DbError { kind: DbErrorKind::Quota, message: format!("the read would hold more than {} MiB of documents at once (its skip, its sort's window); page by a range of a field instead", WRITE_HOLD >> 20) }
}

/// The most bytes of documents one `updateMany` or `deleteMany` changes: it holds them all
/// until they are written together, as read (counted once) and, for an update, as changed
/// (counted again, against the same bound).
const WRITE_HOLD: usize = 64 << 20;

/// A sorted find keeps at most this many documents in memory (its `skip` and `limit`), as
/// MongoDB bounds the memory of a sort made without an index.
const MAX_SORTED: usize = 100_000;

/// One operation on one collection.
struct Run<'a> {
    db: &'a Db,
    coll: &'a str,
    quota: &'a Quota,
    deadline: Instant,
    request: &'a Value,
}

fn options(request: &Value) -> &Value {
    &request["options"]
}

impl Run<'_> {
    /// The operation ran past its time.
    fn late(&self) -> DbError {
        late(self.quota.query_ms)
    }

    fn op(&self, op: &str, mut tx: Option<&mut Tx>) -> Result<Value, DbError> {
        let r = self.request;
        match op {
            "insertOne" => {
                let mut doc = r["doc"].clone();
                let id = prepare(&mut doc)?;
                if self.held(&doc["_id"], tx.as_deref_mut())? {
                    return Err(duplicate_id(self.coll, &doc["_id"]));
                }
                let shown = doc["_id"].clone();
                self.write(tx, vec![Write::Put { coll: self.coll.into(), id, doc, expect: Some(None) }])?;
                Ok(json!({"acknowledged": true, "insertedId": shown}))
            }
            "insertMany" => {
                let docs = r["docs"].as_array().ok_or_else(|| DbError::bad("insertMany takes an array of documents"))?;
                if docs.len() > MAX_BATCH {
                    return Err(DbError::bad(format!("insertMany takes at most {MAX_BATCH} documents at once")));
                }
                let mut writes = Vec::with_capacity(docs.len());
                let mut ids = Map::new();
                let mut seen = std::collections::HashSet::new();
                for (i, d) in docs.iter().enumerate() {
                    let mut doc = d.clone();
                    let id = prepare(&mut doc)?;
                    if id_keys(&doc["_id"])?.into_iter().any(|k| !seen.insert(k)) || self.held(&doc["_id"], tx.as_deref_mut())? {
                        return Err(duplicate_id(self.coll, &doc["_id"]));
                    }
                    ids.insert(i.to_string(), doc["_id"].clone());
                    writes.push(Write::Put { coll: self.coll.into(), id, doc, expect: Some(None) });
                }
                self.write(tx, writes)?;
                Ok(json!({"acknowledged": true, "insertedCount": ids.len(), "insertedIds": ids}))
            }
            "findOne" | "find" | "explain" | "countDocuments" => {
                let filter = parse_filter(&r["filter"])?;
                let mut plan = Plan::default();
                let o = options(r);
                let by = parse_sort(o.get("sort"))?;
                let projection = Projection::parse(o.get("projection"))?;
                let skip = count_option(o, "skip")?.unwrap_or(0) as usize;
                let limit = if op == "findOne" { Some(1) } else { count_option(o, "limit")?.filter(|l| *l > 0) };
                // What a read keeps: a count only which match; otherwise the first `skip +
                // limit`, and one past the most a find may answer (to say it is too many), by
                // `_id` (a scan may stop there) or by the sort (`explain` only counts them).
                let window = skip.saturating_add(limit.map_or(MAX_RESULTS + 1, |l| (l as usize).min(MAX_RESULTS + 1)));
                let keep = match op {
                    "countDocuments" => Keep::Which,
                    _ if by.is_empty() => Keep::First(window),
                    "explain" => Keep::Which,
                    _ if window > MAX_SORTED => {
                        return Err(DbError::bad(format!("a sorted find keeps at most {MAX_SORTED} documents (skip + limit); page by a range of the sort's field")));
                    }
                    _ => Keep::Top(&by, window),
                };
                let mut docs: Vec<Value> = self.matching(&filter, tx.as_deref_mut(), &mut plan, keep)?.into_iter().map(|(_, d)| d).collect();
                let total = docs.len() + plan.unkept;
                if op == "countDocuments" {
                    return Ok(json!(total));
                }
                if !sort(&mut docs, &by, self.deadline) {
                    return Err(self.late());
                }
                if op == "find" && docs.len().saturating_sub(skip).min(limit.map_or(usize::MAX, |l| l as usize)) > MAX_RESULTS {
                    return Err(DbError::bad(format!("find would answer more than {MAX_RESULTS} documents: give a limit (at most {MAX_RESULTS}) and page with skip")));
                }
                let docs: Vec<Value> = docs.into_iter().skip(skip).take(limit.map_or(usize::MAX, |l| l as usize)).collect();
                if op == "explain" {
                    let returned = total.saturating_sub(skip).min(limit.map_or(usize::MAX, |l| l as usize));
                    return Ok(json!({"index": plan.index, "docsExamined": plan.examined, "returned": returned}));
                }
                let mut docs: Vec<Value> = docs.into_iter().map(|d| projection.as_ref().map_or(d.clone(), |p| p.apply(d))).collect();
                Ok(if op == "findOne" { docs.pop().unwrap_or(Value::Null) } else { Value::Array(docs) })
            }
            "updateOne" | "updateMany" | "replaceOne" => {
                let filter = parse_filter(&r["filter"])?;
                let change = if op == "replaceOne" { None } else { Some(Update::parse(&r["update"])?) };
                let upsert = options(r)["upsert"].as_bool().unwrap_or(false);
                let mut found = self.matching(&filter, tx.as_deref_mut(), &mut Plan::default(), if op == "updateMany" { Keep::All } else { Keep::First(1) })?;
                if op != "updateMany" {
                    found.truncate(1);
                }
                let (matched, mut writes) = (found.len(), Vec::new());
                let mut budget = Budget::until(self.deadline);
                // The documents as changed are held until written: bounded as those matched are.
                let mut changed = 0usize;
                for (id, old) in found {
                    if Instant::now() > self.deadline {
                        return Err(self.late());
                    }
                    let mut doc = old.clone();
                    match &change {
                        Some(u) => {
                            if !u.apply_within(&mut doc, &mut budget)? {
                                continue;
                            }
                        }
                        None => doc = replacement(&r["doc"], &old["_id"])?,
                    }
                    let (_, size) = prepare_sized(&mut doc)?;
                    if doc == old {
                        continue;
                    }
                    changed += size;
                    if changed > WRITE_HOLD {
                        return Err(held_too_much());
                    }
                    writes.push(Write::Put { coll: self.coll.into(), id, doc, expect: Some(Some(old)) });
                }
                let modified = writes.len();
                let mut upserted = Value::Null;
                if matched == 0 && upsert {
                    let mut seed = Map::new();
                    filter.seed(&mut seed);
                    let mut doc = match &change {
                        Some(u) => {
                            let mut d = Value::Object(seed);
                            u.apply(&mut d)?;
                            d
                        }
                        None => {
                            let mut d = r["doc"].clone();
                            if let (Some(o), Some(id)) = (d.as_object_mut(), seed.get("_id")) {
                                o.entry("_id").or_insert(id.clone());
                            }
                            d
                        }
                    };
                    let id = prepare(&mut doc)?;
                    if self.held(&doc["_id"], tx.as_deref_mut())? {
                        return Err(duplicate_id(self.coll, &doc["_id"]));
                    }
                    upserted = doc["_id"].clone();
                    writes.push(Write::Put { coll: self.coll.into(), id, doc, expect: Some(None) });
                }
                self.write(tx, writes)?;
                Ok(json!({"acknowledged": true, "matchedCount": matched, "modifiedCount": modified, "upsertedId": upserted, "upsertedCount": i32::from(!upserted.is_null())}))
            }
            "deleteOne" | "deleteMany" => {
                let filter = parse_filter(&r["filter"])?;
                let mut found = self.matching(&filter, tx.as_deref_mut(), &mut Plan::default(), if op == "deleteMany" { Keep::All } else { Keep::First(1) })?;
                if op == "deleteOne" {
                    found.truncate(1);
                }
                let n = found.len();
                self.write(tx, found.into_iter().map(|(id, old)| Write::Delete { coll: self.coll.into(), id, expect: Some(old) }).collect())?;
                Ok(json!({"acknowledged": true, "deletedCount": n}))
            }
            "createIndex" => {
                let def = index_def(&r["keys"], options(r))?;
                let name = def.name.clone();
                // Each index is written with every document: their number is bounded.
                let held = self.db.indexes(self.coll)?;
                // As MongoDB: one index per set of keys, so a document's keys are not filed
                // again and again under other names.
                if let Some(same) = held.iter().find(|d| d.keys == def.keys && d.name != name) {
                    return Err(DbError::bad(format!("Index already exists with a different name: {}", same.name)));
                }
                if held.len() >= MAX_INDEXES && !held.iter().any(|d| d.name == name) {
                    return Err(DbError { kind: DbErrorKind::Quota, message: format!("collection {} has {MAX_INDEXES} indexes, the most one may; drop one first", self.coll) });
                }
                if !held.iter().any(|d| d.name == name) {
                    self.room_for_index(&def)?;
                }
                self.db.change_indexes(self.coll, Write::CreateIndex { coll: self.coll.into(), def })?;
                Ok(json!(name))
            }
            "dropIndex" => {
                let name = r["name"].as_str().ok_or_else(|| DbError::bad("dropIndex takes an index name"))?;
                self.db.change_indexes(self.coll, Write::DropIndex { coll: self.coll.into(), name: name.into() })?;
                Ok(json!({"ok": 1}))
            }
            "drop" => {
                self.db.change_indexes(self.coll, Write::DropCollection { coll: self.coll.into() })?;
                Ok(json!(true))
            }
            other => Err(DbError::bad(format!("unknown operation {other}"))),
        }
    }

    /// The document stored under `id`, as the transaction sees it.
    fn get(&self, id: &str, tx: Option<&mut Tx>) -> Result<Option<Value>, DbError> {
        if let Some(t) = &tx
            && let Some(w) = t.writes.get(&(self.coll.to_string(), id.to_string()))
        {
            return Ok(w.clone());
        }
        self.db.backend.get(self.coll, id)
    }

    /// Whether a document with this `_id` is stored, under any of its keys, as the transaction
    /// sees it.
    fn held(&self, id: &Value, mut tx: Option<&mut Tx>) -> Result<bool, DbError> {
        for key in id_keys(id)? {
            if self.get(&key, tx.as_deref_mut())?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Applies `writes` now, or keeps them in the transaction.
    fn write(&self, tx: Option<&mut Tx>, writes: Vec<Write>) -> Result<(), DbError> {
        if writes.is_empty() {
            return Ok(());
        }
        match tx {
            None => {
                check_quota(self.db, self.quota, &writes)?;
                self.db.backend.apply(&writes)
            }
            Some(t) => {
                // What it holds uncommitted counts against its database's bound.
                let size: usize = writes.iter().map(|w| if let Write::Put { doc, .. } = w { serde_json::to_vec(doc).map_or(0, |b| b.len()) } else { 0 }).sum();
                hold(&self.db.pending, t, size)?;
                for w in writes {
                    let (key, doc, expect) = match w {
                        Write::Put { coll, id, doc, expect } => ((coll, id), Some(doc), expect.unwrap_or(None)),
                        Write::Delete { coll, id, expect } => ((coll, id), None, expect),
                        _ => continue,
                    };
                    // What the transaction first saw is what its commit checks.
                    if !t.writes.contains_key(&key) {
                        t.seen.entry(key.clone()).or_insert(expect);
                    }
                    t.writes.insert(key, doc);
                }
                Ok(())
            }
        }
    }

    /// Every document matching `filter` with its id key, in id order: by `_id` when the filter
    /// names it, through an index whose every field the filter sets by equality, else by a
    /// scan bounded by the query's time.
    /// `keep`: which of the matching documents are wanted. A document the transaction `tx`
    /// wrote is read as it wrote it, and not as stored.
    fn matching(&self, filter: &Filter, tx: Option<&mut Tx>, plan: &mut Plan, keep: Keep) -> Result<Vec<(String, Value)>, DbError> {
        let mut kept = Kept { out: BTreeMap::new(), values: !matches!(keep, Keep::Which) || tx.is_some(), top: None, held: 0, writing: matches!(keep, Keep::All), twice: false, unkept: 0, deadline: self.deadline, query_ms: self.quota.query_ms };
        let stop = match keep {
            Keep::First(n) => Some(n),
            Keep::Top(by, n) => {
                kept.top = Some((by, n));
                None
            }
            Keep::All | Keep::Which => None,
        };
        let held: Option<&Tx> = tx.as_deref();
        let written = |id: &str| held.is_some_and(|t| t.writes.contains_key(&(self.coll.to_string(), id.to_string())));
        let deadline = self.deadline;
        let mut budget = Budget::until(deadline);
        if let Some(ids) = filter.equalities("_id") {
            plan.index = Some("_id_".into());
            kept.twice = true;
            let mut keys: Vec<String> = ids.iter().filter_map(|v| id_keys(v).ok()).flatten().collect();
            keys.sort();
            keys.dedup();
            for id in keys {
                if budget.spent() || Instant::now() > deadline {
                    return Err(self.late());
                }
                plan.examined += 1;
                if !written(&id)
                    && let Some(d) = self.db.backend.get(self.coll, &id)?
                    && filter.matches_within(&d, &mut budget)
                {
                    kept.offer(id, d)?;
                }
            }
        } else if let Some((def, keys)) = self.usable_index(filter)? {
            plan.index = Some(def.name.clone());
            // A document filed under several of the keys (an array's elements, zero as `0.0`
            // and `-0.0`) may come through each: the matches are kept by id, once.
            let mut keys = keys;
            let mut unique = std::collections::HashSet::new();
            keys.retain(|k| unique.insert(k.clone()));
            kept.twice = keys.len() > 1;
            for key in &keys {
                // One key's entries come in `_id` order: its first so many are all it can add
                // to those asked for.
                let mut taken = 0;
                self.db.backend.lookup_each(self.coll, &def.name, key, &mut |id, d| {
                    if budget.spent() || Instant::now() > deadline {
                        return Err(self.late());
                    }
                    plan.examined += 1;
                    if !written(&id) && filter.matches_within(&d, &mut budget) {
                        taken += 1;
                        kept.offer(id, d)?;
                    }
                    Ok(stop.is_none_or(|s| taken < s))
                })?;
            }
            // The first so many by `_id` of all the keys' are those asked for.
            if let Some(s) = stop {
                kept.keep_first(s);
            }
        } else {
            let mut n = 0u64;
            self.db.backend.scan(self.coll, &mut |d| {
                n += 1;
                // Every document: one can take long to match (a long array, a long `$in`).
                if budget.spent() || Instant::now() > deadline {
                    return Err(self.late());
                }
                let id = id_key(&d["_id"])?;
                if !written(&id) && filter.matches_within(&d, &mut budget) {
                    kept.offer(id, d)?;
                }
                // The first so many by `_id` are those asked for, whatever the transaction
                // wrote: the scan goes in `_id` order.
                Ok(stop.is_none_or(|s| kept.out.len() < s))
            })?;
            plan.examined = n;
        }
        if let Some(t) = tx {
            // The transaction's writes to this collection: only those of the `_id`s asked for,
            // when the filter names them (one write after another stays linear).
            let coll = self.coll.to_string();
            let mine: Vec<(&String, &Option<Value>)> = match filter.equalities("_id") {
                Some(ids) => ids.iter().filter_map(|v| id_keys(v).ok()).flatten().collect::<std::collections::BTreeSet<String>>().into_iter().filter_map(|id| t.writes.get_key_value(&(coll.clone(), id))).map(|((_, id), d)| (id, d)).collect(),
                None => t.writes.range((coll.clone(), String::new())..).take_while(|((c, _), _)| *c == coll).map(|((_, id), d)| (id, d)).collect(),
            };
            for (id, doc) in mine {
                if budget.spent() || Instant::now() > deadline {
                    return Err(self.late());
                }
                if let Some(d) = doc
                    && filter.matches_within(d, &mut budget)
                {
                    kept.offer(id.clone(), d.clone())?;
                }
            }
            kept.prune()?;
            // What the transaction read of what it has not written is what it saw first. It is
            // held until the transaction ends, so it counts against its database's bound as
            // what it writes does.
            for (id, d) in &kept.out {
                let key = (self.coll.to_string(), id.clone());
                if t.writes.contains_key(&key) || t.seen.contains_key(&key) {
                    continue;
                }
                hold(&self.db.pending, t, serde_json::to_vec(d).map_or(0, |b| b.len()))?;
                t.seen.insert(key, Some(d.clone()));
            }
        }
        if budget.spent() {
            return Err(self.late());
        }
        kept.prune()?;
        plan.unkept = kept.unkept;
        Ok(kept.out.into_iter().collect())
    }

    /// Refuses index `def` when the entries it would file for the documents now in the
    /// collection pass what the database's quota has left of its bytes (they count as the
    /// documents do), or when counting them runs past the query's time.
    fn room_for_index(&self, def: &IndexDef) -> Result<(), DbError> {
        let all = self.db.backend.collections()?;
        room_for_collections(&all, std::iter::once(self.coll))?;
        let have: u64 = all.values().map(|s| s.bytes).sum();
        let room = self.quota.bytes.saturating_sub(have);
        let mut adding = 0u64;
        self.db.backend.scan(self.coll, &mut |d| {
            if Instant::now() > self.deadline {
                return Err(self.late());
            }
            adding += crate::filing_bytes(std::slice::from_ref(def), self.coll, &id_key(&d["_id"])?, &d)?;
            if adding > room {
                return Err(DbError { kind: DbErrorKind::Quota, message: format!("quota exceeded: index {} would file more than the {} bytes the database has left", def.name, room) });
            }
            Ok(true)
        })
    }

    /// An index every field of which the filter sets by equality, with the keys to look up.
    fn usable_index(&self, filter: &Filter) -> Result<Option<(IndexDef, Vec<String>)>, DbError> {
        for def in self.db.indexes(self.coll)?.iter() {
            let mut combos: Vec<Vec<Value>> = vec![Vec::new()];
            let mut usable = true;
            for (field, _) in &def.keys {
                // Zero is filed as `0.0` or `-0.0`: both are looked up.
                let values = filter.equalities(field).map(|vs| vs.into_iter().flat_map(|v| if v.as_f64() == Some(0.0) { vec![json!(0.0), json!(-0.0)] } else { vec![v] }).collect::<Vec<Value>>());
                match values {
                    Some(values) if !values.is_empty() && values.iter().all(keyed_alike) && values.len() * combos.len() <= 1024 => {
                        combos = combos.into_iter().flat_map(|c| values.iter().map(move |v| [c.clone(), vec![v.clone()]].concat())).collect();
                    }
                    _ => {
                        usable = false;
                        break;
                    }
                }
            }
            if usable {
                let keys = combos.iter().map(|c| index_key(c)).collect();
                return Ok(Some((def.clone(), keys)));
            }
        }
        Ok(None)
    }
}

/// Whether every value equal to `v` is filed under `v`'s index key (zero, filed under two, is
/// looked up under both by the caller). Not so for numbers inside an object (`{"a": 1}` and
/// `{"a": 1.0}` are two keys): looking those up by key would miss documents that hold them in
/// the other form, so they are matched by a scan.
fn keyed_alike(v: &Value) -> bool {
    fn holds_a_number(v: &Value) -> bool {
        match v {
            Value::Number(_) => true,
            Value::Array(a) => a.iter().any(holds_a_number),
            Value::Object(o) => o.values().any(holds_a_number),
            _ => false,
        }
    }
    match v {
        Value::Object(_) | Value::Array(_) => !holds_a_number(v),
        _ => true,
    }
}

fn parse_filter(v: &Value) -> Result<Filter, DbError> {
    match v {
        Value::Null => Ok(Filter::all()),
        v => Filter::parse(v),
    }
}

fn count_option(o: &Value, name: &str) -> Result<Option<u64>, DbError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| DbError::bad(format!("{name} is a whole number"))),
    }
}

fn duplicate_id(coll: &str, id: &Value) -> DbError {
    DbError { kind: DbErrorKind::Duplicate, message: format!("duplicate key: {coll} already holds _id {id}") }
}

/// A replacement document keeps the `_id` of the one it replaces.
fn replacement(doc: &Value, id: &Value) -> Result<Value, DbError> {
    let Some(o) = doc.as_object() else { return Err(DbError::bad("replaceOne takes a document")) };
    if o.keys().any(|k| k.starts_with('$')) {
        return Err(DbError::bad("a replacement holds no operators; use updateOne"));
    }
    if o.get("_id").is_some_and(|given| !crate::filter::json_eq(given, id)) {
        return Err(DbError::bad("_id cannot be changed"));
    }
    let mut out = Map::with_capacity(o.len() + 1);
    out.insert("_id".into(), id.clone());
    out.extend(o.iter().filter(|(k, _)| *k != "_id").map(|(k, v)| (k.clone(), v.clone())));
    Ok(Value::Object(out))
}

/// The most collections one database holds: each has a stats row every write reads.
pub const MAX_COLLECTIONS: usize = 1000;

/// Refuses writes that would make the database hold more than [`MAX_COLLECTIONS`].
fn room_for_collections<'c>(all: &BTreeMap<String, crate::CollStats>, colls: impl Iterator<Item = &'c str>) -> Result<(), DbError> {
    let new: std::collections::BTreeSet<&str> = colls.filter(|c| !all.contains_key(*c)).collect();
    if !new.is_empty() && all.len() + new.len() > MAX_COLLECTIONS {
        return Err(DbError { kind: DbErrorKind::Quota, message: format!("the database holds {} collections, the most it may; drop one first", all.len()) });
    }
    Ok(())
}

/// `createIndex(keys, {unique, name})`: the name is MongoDB's (`email_1`, `a_1_b_-1`).
fn index_def(keys: &Value, options: &Value) -> Result<IndexDef, DbError> {
    let o = keys.as_object().filter(|o| !o.is_empty() && o.len() <= 16).ok_or_else(|| DbError::bad("createIndex takes an object of 1 to 16 fields with 1 or -1"))?;
    // Every write reads the definitions: they are small.
    if o.keys().map(String::len).sum::<usize>() > 1024 {
        return Err(DbError::bad("createIndex: the fields' paths are at most 1024 characters in all"));
    }
    let mut fields = Vec::with_capacity(o.len());
    for (k, d) in o {
        if k.is_empty() || k.split('.').any(|p| p.is_empty() || p.starts_with('$')) {
            return Err(DbError::bad(format!("createIndex: {k:?} is not a field path")));
        }
        fields.push((k.clone(), match d.as_i64() {
            Some(1) => 1,
            Some(-1) => -1,
            _ => return Err(DbError::bad(format!("createIndex: {k} takes 1 or -1"))),
        }));
    }
    let name = match options.get("name") {
        Some(Value::String(n)) if !n.is_empty() && n.len() <= 128 && n != "_id_" => n.clone(),
        Some(_) => return Err(DbError::bad("createIndex: name is 1 to 128 characters (not _id_)")),
        None => fields.iter().map(|(k, d)| format!("{k}_{d}")).collect::<Vec<_>>().join("_"),
    };
    Ok(IndexDef { name, keys: fields, unique: options["unique"].as_bool().unwrap_or(false) })
}
