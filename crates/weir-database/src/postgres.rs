//! The PostgreSQL engine: every database in a schema of its own, which every node opening the
//! database shares, so a gateway's functions see one database whichever node runs them.
//!
//! The layout is the embedded one's, as tables of the schema:
//! - `docs (coll, id, doc)`: a document's JSON text under its collection and `_id` key;
//! - `entries (coll, idx, key, id)`: an index entry, all four columns the primary key, so a
//!   lookup is a range scan of that btree;
//! - `collections (coll, documents, bytes, indexes)`: a collection's counts and its index
//!   definitions (JSON).
//!
//! Keys are `text COLLATE "C"`, ordered by their bytes as redb orders them, so a scan returns
//! documents in the same `_id` order on both engines. PostgreSQL's `text` holds no NUL: `id`
//! and `key` are JSON text (escaped) and collection names are checked, and `idx` holds the
//! index's name as a JSON string too, as a name may hold any character.
//!
//! A write first locks the row in `collections` of every collection it changes (`FOR UPDATE`,
//! in name order, so two writers never wait on each other in a circle), then reads: writers
//! of one collection, from any node, go one at a time, each reading what the one before
//! committed, so an `expect` and a unique index are checked against the truth and the counts
//! stay exact. READ COMMITTED is enough under that lock; SERIALIZABLE would make concurrent
//! writers of a collection fail on the counts row they all update, and try again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ::postgres::error::SqlState;
use ::postgres::types::ToSql;
use ::postgres::{Client, Config, GenericClient, IsolationLevel, NoTls, Row, Statement, Transaction};
use serde_json::Value;

use crate::{Backend, CollStats, DbError, DbErrorKind, Holders, IndexDef, Opener, Write, entry_bytes, filed_keys};

/// How long a caller waits for a connection while all of the pool's are busy.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// Rows a scan fetches at a time.
const SCAN_BATCH: usize = 256;
/// Rows one statement writes at most.
const WRITE_BATCH: usize = 5_000;
/// An index key longer than this is filed under its SHA-256: a btree row holds at most about
/// 2.7 kB, and a key is only ever looked up whole.
const LONG_KEY: usize = 512;
/// Times a writer looks for a collection's row that others drop and make again meanwhile.
const LOCK_TRIES: usize = 64;

/// A database in PostgreSQL, with a pool of connections to it.
pub struct Postgres {
    schema: String,
    sql: Sql,
    pool: Pool,
    destroyed: AtomicBool,
}

/// Opens database `name` in the PostgreSQL at `url`, with at most `pool` connections each.
pub fn opener(url: String, pool: usize) -> Opener {
    Arc::new(move |name: &str| Ok(Arc::new(Postgres::open(&url, name, pool)?) as Arc<dyn Backend>))
}

impl Postgres {
    /// Opens database `name` (`[a-z0-9.-]`), making its schema and tables when they are missing.
    pub fn open(url: &str, name: &str, pool: usize) -> Result<Postgres, DbError> {
        let schema = schema_of(name)?;
        let mut config: Config = url.parse().map_err(|e| DbError::unavailable(format!("the PostgreSQL url: {e}")))?;
        if config.get_application_name().is_none() {
            config.application_name("weir-database");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        let pg = Postgres {
            sql: Sql::new(&quoted(&schema)),
            schema,
            pool: Pool { config, max: pool.max(1), idle: Mutex::new(Idle { conns: Vec::new(), open: 0 }), freed: Condvar::new() },
            destroyed: AtomicBool::new(false),
        };
        pg.run_any(|c, _| {
            let mut tx = c.client.transaction()?;
            // Two nodes opening one database at once would both create its schema.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(&pg.schema)])?;
            let encoding: String = tx.query_one("SELECT current_setting('server_encoding')", &[])?.try_get(0)?;
            if encoding != "UTF8" {
                return Err(Fail::Db(DbError::unavailable(format!("PostgreSQL's server_encoding is {encoding}; the database needs UTF8"))));
            }
            tx.batch_execute(&pg.sql.setup)?;
            tx.commit()?;
            Ok(())
        })?;
        Ok(pg)
    }

    /// The schema holding the database.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    fn run<T>(&self, f: impl FnMut(&mut Conn, &mut bool) -> Result<T, Fail>) -> Result<T, DbError> {
        if self.destroyed.load(Ordering::Acquire) {
            return Err(DbError::unavailable("the database was deleted"));
        }
        self.run_any(f)
    }

    /// Runs `f` on a connection of the pool. A connection that died while idle (the server
    /// restarted, or ended it) fails its first request: then every idle one is let go, and `f`
    /// runs once more on a new connection, unless it cleared its `again` (what it did may have
    /// taken effect).
    fn run_any<T>(&self, mut f: impl FnMut(&mut Conn, &mut bool) -> Result<T, Fail>) -> Result<T, DbError> {
        let mut conn = self.pool.lease()?;
        let mut again = true;
        match f(&mut conn, &mut again) {
            Err(Fail::Pg(e)) if lost(&e) => {
                conn.broken = true;
                let reused = conn.reused;
                drop(conn);
                self.pool.clear();
                if !(again && reused) {
                    return Err(pg_failed(e));
                }
                tracing::debug!(schema = %self.schema, "a pooled PostgreSQL connection was lost; trying on a new one");
                let mut conn = self.pool.lease()?;
                f(&mut conn, &mut again).map_err(|e| {
                    if let Fail::Pg(e) = &e
                        && lost(e)
                    {
                        conn.broken = true;
                    }
                    DbError::from(e)
                })
            }
            other => other.map_err(DbError::from),
        }
    }
}

/// The schema of database `name`: `wdb_` and the name, which never holds `_`; for a name too
/// long for PostgreSQL's 63 bytes, `wdb_`, its first 26 characters, `_` and 128 bits of its
/// SHA-256. One schema per name either way.
fn schema_of(name: &str) -> Result<String, DbError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-')) {
        return Err(DbError::bad(format!("database name {name:?}: one or more of a-z 0-9 . -")));
    }
    if name.len() <= 59 {
        return Ok(format!("wdb_{name}"));
    }
    Ok(format!("wdb_{}_{}", &name[..26], hex(&sha256(name.as_bytes())[..16])))
}

fn quoted(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The advisory lock taken while a schema is made or dropped.
fn lock_key(schema: &str) -> i64 {
    let digest = sha256(format!("weir-database {schema}").as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 is 32 bytes"))
}

/// How index `name` is filed in `entries.idx`.
fn index_column(name: &str) -> String {
    Value::String(name.to_string()).to_string()
}

/// How index key `key` (a JSON array) is filed in `entries.key`: itself, or when long `#` and
/// its SHA-256, which no JSON array starts with.
fn key_column(key: &str) -> String {
    if key.len() <= LONG_KEY { key.to_string() } else { format!("#{}", hex(&sha256(key.as_bytes()))) }
}

/// The statements, for one schema. Each is prepared once per connection, and so planned
/// without the statistics of its tables (a new collection has none until autovacuum analyzes
/// it) and kept as the table grows: their shapes leave the planner no choice that turns into
/// a scan of the table. Looking up many keys is one index probe per key (a LATERAL subquery,
/// which `OFFSET 0` keeps from being flattened into a join the planner could hash); a delete
/// of many rows finds them so and deletes by `ctid`; a scan reads pages of `SCAN_BATCH` in
/// index order (`id > $2 ... LIMIT`), where one `ORDER BY id` over the collection may be
/// planned as a read of all of it and a sort before the first row.
struct Sql {
    setup: String,
    drop: String,
    get: String,
    scan: String,
    lookup: String,
    /// A page of `lookup`: the ids after `$4`.
    lookup_page: String,
    collections: String,
    indexes: String,
    lock: String,
    create_stats: String,
    read: String,
    write: String,
    clear_index: String,
    clear_entries: String,
    clear_docs: String,
}

impl Sql {
    fn new(s: &str) -> Sql {
        Sql {
            // Documents are kept as the JSON text they were given, not as `jsonb`: `jsonb`
            // orders an object's keys its own way (a document must come back as stored, field
            // order included), keeps one of duplicate keys and refuses a string holding
            // `\u0000`. Nothing here reads inside a document: the filters run in `exec.rs`.
            setup: format!(
                "CREATE SCHEMA IF NOT EXISTS {s};
                 CREATE TABLE IF NOT EXISTS {s}.docs (
                     coll text COLLATE \"C\" NOT NULL,
                     id text COLLATE \"C\" NOT NULL,
                     doc text NOT NULL,
                     PRIMARY KEY (coll, id));
                 CREATE TABLE IF NOT EXISTS {s}.entries (
                     coll text COLLATE \"C\" NOT NULL,
                     idx text COLLATE \"C\" NOT NULL,
                     key text COLLATE \"C\" NOT NULL,
                     id text COLLATE \"C\" NOT NULL,
                     PRIMARY KEY (coll, idx, key, id));
                 CREATE TABLE IF NOT EXISTS {s}.collections (
                     coll text COLLATE \"C\" PRIMARY KEY,
                     documents bigint NOT NULL,
                     bytes bigint NOT NULL,
                     indexes text NOT NULL);"
            ),
            drop: format!("DROP SCHEMA IF EXISTS {s} CASCADE"),
            get: format!("SELECT doc FROM {s}.docs WHERE coll = $1 AND id = $2"),
            scan: format!("SELECT id, doc FROM {s}.docs WHERE coll = $1 AND id > $2 ORDER BY id LIMIT {SCAN_BATCH}"),
            lookup: format!("SELECT id FROM {s}.entries WHERE coll = $1 AND idx = $2 AND key = $3 ORDER BY id"),
            lookup_page: format!("SELECT id FROM {s}.entries WHERE coll = $1 AND idx = $2 AND key = $3 AND id > $4 ORDER BY id LIMIT {SCAN_BATCH}"),
            collections: format!("SELECT coll, documents, bytes, indexes FROM {s}.collections ORDER BY coll"),
            indexes: format!("SELECT indexes FROM {s}.collections WHERE coll = $1"),
            lock: format!("SELECT documents, bytes, indexes FROM {s}.collections WHERE coll = $1 FOR UPDATE"),
            create_stats: format!("INSERT INTO {s}.collections (coll, documents, bytes, indexes) VALUES ($1, 0, 0, '[]') ON CONFLICT (coll) DO NOTHING"),
            // Documents by (collection, id), and the ids filed under (collection, index, key):
            // rows `(0, n, id, doc)` and `(1, n, id, NULL)` for the n-th of each list.
            read: format!(
                "SELECT 0 AS kind, k.n, d.id, d.doc FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(coll, id, n)
                     CROSS JOIN LATERAL (SELECT id, doc FROM {s}.docs WHERE coll = k.coll AND id = k.id OFFSET 0) d
                 UNION ALL
                 SELECT 1, k.n, e.id, NULL FROM unnest($3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS k(coll, idx, key, n)
                     CROSS JOIN LATERAL (SELECT id FROM {s}.entries WHERE coll = k.coll AND idx = k.idx AND key = k.key OFFSET 0) e"
            ),
            // Every change at once: documents deleted and put, index entries removed and
            // added, counts saved and dropped. No two parts touch one row (each change is the
            // last of its row), so that they run on one snapshot changes nothing.
            write: format!(
                "WITH deleted_docs AS (
                     DELETE FROM {s}.docs WHERE ctid = ANY(ARRAY(
                         SELECT d.ctid FROM unnest($1::text[], $2::text[]) AS k(coll, id)
                         CROSS JOIN LATERAL (SELECT ctid FROM {s}.docs WHERE coll = k.coll AND id = k.id OFFSET 0) d))),
                 put_docs AS (
                     INSERT INTO {s}.docs (coll, id, doc) SELECT * FROM unnest($3::text[], $4::text[], $5::text[])
                     ON CONFLICT (coll, id) DO UPDATE SET doc = EXCLUDED.doc),
                 removed_entries AS (
                     DELETE FROM {s}.entries WHERE ctid = ANY(ARRAY(
                         SELECT e.ctid FROM unnest($6::text[], $7::text[], $8::text[], $9::text[]) AS k(coll, idx, key, id)
                         CROSS JOIN LATERAL (SELECT ctid FROM {s}.entries WHERE coll = k.coll AND idx = k.idx AND key = k.key AND id = k.id OFFSET 0) e))),
                 added_entries AS (
                     INSERT INTO {s}.entries (coll, idx, key, id) SELECT * FROM unnest($10::text[], $11::text[], $12::text[], $13::text[])
                     ON CONFLICT DO NOTHING),
                 saved_stats AS (
                     UPDATE {s}.collections c SET documents = t.documents, bytes = t.bytes, indexes = t.indexes
                     FROM unnest($14::text[], $15::int8[], $16::int8[], $17::text[]) AS t(coll, documents, bytes, indexes)
                     WHERE c.coll = t.coll),
                 dropped_stats AS (
                     DELETE FROM {s}.collections WHERE coll = ANY($18::text[]))
                 SELECT 1"
            ),
            clear_index: format!("DELETE FROM {s}.entries WHERE coll = $1 AND idx = $2"),
            clear_entries: format!("DELETE FROM {s}.entries WHERE coll = $1"),
            clear_docs: format!("DELETE FROM {s}.docs WHERE coll = $1"),
        }
    }
}

/// A failure inside a session: PostgreSQL's (or the connection's), or one of ours to pass on.
enum Fail {
    Pg(::postgres::Error),
    Db(DbError),
}

impl From<::postgres::Error> for Fail {
    fn from(e: ::postgres::Error) -> Fail {
        Fail::Pg(e)
    }
}

impl From<DbError> for Fail {
    fn from(e: DbError) -> Fail {
        Fail::Db(e)
    }
}

impl From<Fail> for DbError {
    fn from(f: Fail) -> DbError {
        match f {
            Fail::Pg(e) => pg_failed(e),
            Fail::Db(e) => e,
        }
    }
}

/// A failed statement as the caller takes it: a serialization failure or a deadlock is a
/// conflict (nothing was written; the operation may run again), anything else unavailability.
fn pg_failed(e: ::postgres::Error) -> DbError {
    match e.code() {
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED => {
            DbError { kind: DbErrorKind::Conflict, message: "the write met another one at once; nothing was written".into() }
        }
        _ => DbError::unavailable(e),
    }
}

/// Whether the connection is gone: the error is not PostgreSQL's answer to a statement, or is
/// one that ends the session (connection exceptions, the server shutting down).
fn lost(e: &::postgres::Error) -> bool {
    e.code().is_none_or(|c| c.code().starts_with("08") || c.code().starts_with("57P"))
}

fn conflict() -> DbError {
    DbError { kind: DbErrorKind::Conflict, message: "the document changed meanwhile".into() }
}

fn duplicate(coll: &str, def: &IndexDef, key: &str) -> DbError {
    DbError { kind: DbErrorKind::Duplicate, message: format!("duplicate key: index {} of {coll} already holds {key}", def.name) }
}

fn parse(text: &str) -> Result<Value, Fail> {
    serde_json::from_str(text).map_err(|e| Fail::Db(DbError::unavailable(format!("a stored document is not JSON: {e}"))))
}

fn stats_of(row: &Row, at: usize) -> Result<CollStats, Fail> {
    let documents: i64 = row.try_get(at)?;
    let bytes: i64 = row.try_get(at + 1)?;
    let indexes: &str = row.try_get(at + 2)?;
    let indexes = serde_json::from_str(indexes).map_err(|e| Fail::Db(DbError::unavailable(format!("stored index definitions are not JSON: {e}"))))?;
    Ok(CollStats { documents: documents.max(0) as u64, bytes: bytes.max(0) as u64, indexes })
}

/// A statement of `sql`, prepared once per connection.
fn prepared(c: &mut impl GenericClient, cache: &mut HashMap<String, Statement>, sql: &str) -> Result<Statement, ::postgres::Error> {
    if let Some(s) = cache.get(sql) {
        return Ok(s.clone());
    }
    let s = c.prepare(sql)?;
    cache.insert(sql.to_string(), s.clone());
    Ok(s)
}

/// Visits the documents of `coll` in `_id` key order, a page at a time, until `visit` answers
/// `false`. Pages are statements of their own: in one snapshot when `c` is a REPEATABLE READ
/// transaction, or under the collection's lock.
fn each_doc(c: &mut impl GenericClient, cache: &mut HashMap<String, Statement>, sql: &Sql, coll: &str, visit: &mut dyn FnMut(String, Value) -> Result<bool, Fail>) -> Result<(), Fail> {
    let stmt = prepared(c, cache, &sql.scan)?;
    let mut after = String::new();
    loop {
        let rows = c.query(&stmt, &[&coll, &after])?;
        let Some(last) = rows.last() else { return Ok(()) };
        after = last.try_get(0)?;
        for row in &rows {
            if !visit(row.try_get(0)?, parse(row.try_get(1)?)?)? {
                return Ok(());
            }
        }
        if rows.len() < SCAN_BATCH {
            return Ok(());
        }
    }
}

/// A connection of the pool, with the statements it has prepared.
struct Conn {
    client: Client,
    prepared: HashMap<String, Statement>,
    broken: bool,
    reused: bool,
    /// When it was last given back to the pool.
    idle_since: Instant,
}

impl Conn {
    fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Fail> {
        let stmt = prepared(&mut self.client, &mut self.prepared, sql)?;
        Ok(self.client.query(&stmt, params)?)
    }
}

/// At most `max` connections, made when first needed; a broken one is let go, and the next
/// caller makes a new one.
struct Pool {
    config: Config,
    max: usize,
    idle: Mutex<Idle>,
    freed: Condvar,
}

struct Idle {
    conns: Vec<Conn>,
    /// Connections made and not let go: idle or leased.
    open: usize,
}

/// A connection taken from the pool, given back when dropped.
struct Lease<'p> {
    pool: &'p Pool,
    conn: Option<Conn>,
}

impl Pool {
    fn lease(&self) -> Result<Lease<'_>, DbError> {
        let deadline = Instant::now() + POOL_WAIT;
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(mut conn) = idle.conns.pop() {
                conn.reused = true;
                return Ok(Lease { pool: self, conn: Some(conn) });
            }
            if idle.open < self.max {
                idle.open += 1;
                drop(idle);
                return match self.config.connect(NoTls) {
                    Ok(client) => Ok(Lease { pool: self, conn: Some(Conn { client, prepared: HashMap::new(), broken: false, reused: false, idle_since: Instant::now() }) }),
                    Err(e) => {
                        self.idle.lock().unwrap_or_else(|e| e.into_inner()).open -= 1;
                        self.freed.notify_one();
                        Err(DbError::unavailable(e))
                    }
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DbError::unavailable(format!("all {} connections to PostgreSQL stayed busy for {} s", self.max, POOL_WAIT.as_secs())));
            }
            idle = self.freed.wait_timeout(idle, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Lets go of the connections idle for `idle_for` or longer.
    fn rest(&self, idle_for: Duration) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let (keep, gone): (Vec<Conn>, Vec<Conn>) = std::mem::take(&mut idle.conns).into_iter().partition(|c| c.idle_since.elapsed() < idle_for);
        idle.conns = keep;
        idle.open -= gone.len();
        drop(idle);
        if !gone.is_empty() {
            self.freed.notify_all();
        }
        // Closed outside the lock: saying goodbye to the server waits on it.
        drop(gone);
    }

    /// Lets every idle connection go.
    fn clear(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.open -= idle.conns.len();
        idle.conns.clear();
        drop(idle);
        self.freed.notify_all();
    }
}

impl Deref for Lease<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("leased until dropped")
    }
}

impl DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("leased until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        if conn.broken || conn.client.is_closed() {
            idle.open -= 1;
        } else {
            let mut conn = conn;
            conn.idle_since = Instant::now();
            idle.conns.push(conn);
        }
        drop(idle);
        self.pool.freed.notify_one();
    }
}

/// One `apply`: its transaction, and what it has read and will write.
struct Apply<'a> {
    tx: Transaction<'a>,
    cache: &'a mut HashMap<String, Statement>,
    sql: &'a Sql,
    /// The counts of every collection written, from their locked rows on.
    metas: BTreeMap<String, CollStats>,
    dropped: BTreeSet<String>,
    /// Documents `(collection, id)` as this transaction has them: as read, then as written.
    docs: HashMap<(String, String), Option<Value>>,
    /// For keys of unique indexes `(collection, index, key)`: the ids holding each, as this
    /// transaction has them.
    holders: HashMap<(String, String, String), BTreeSet<String>>,
    /// Writes not yet sent, the last change of each row: documents (`None`: delete) and
    /// index entries `(collection, idx, key, id)` as filed (`false`: remove).
    doc_writes: BTreeMap<(String, String), Option<String>>,
    entry_writes: BTreeMap<(String, String, String, String), bool>,
}

/// Column `i` of `rows`, a statement's array parameter.
fn column<'r, const N: usize>(rows: &'r [[&'r str; N]], i: usize) -> Vec<&'r str> {
    rows.iter().map(|r| r[i]).collect()
}

impl<'a> Apply<'a> {
    fn new(tx: Transaction<'a>, cache: &'a mut HashMap<String, Statement>, sql: &'a Sql) -> Apply<'a> {
        Apply { tx, cache, sql, metas: BTreeMap::new(), dropped: BTreeSet::new(), docs: HashMap::new(), holders: HashMap::new(), doc_writes: BTreeMap::new(), entry_writes: BTreeMap::new() }
    }

    fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Fail> {
        let stmt = prepared(&mut self.tx, self.cache, sql)?;
        Ok(self.tx.query(&stmt, params)?)
    }

    fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Fail> {
        let stmt = prepared(&mut self.tx, self.cache, sql)?;
        Ok(self.tx.execute(&stmt, params)?)
    }

    /// Locks the row of every collection `writes` change, making the missing ones.
    fn lock(&mut self, writes: &[Write]) -> Result<(), Fail> {
        let sql = self.sql;
        let colls: BTreeSet<&str> = writes.iter().map(Write::coll).collect();
        'colls: for coll in colls {
            for _ in 0..LOCK_TRIES {
                if let Some(row) = self.query(&sql.lock, &[&coll])?.first() {
                    self.metas.insert(coll.to_string(), stats_of(row, 0)?);
                    continue 'colls;
                }
                // Missing: made here, and locked until this transaction ends; or made by
                // another writer meanwhile, and then locked above.
                if self.execute(&sql.create_stats, &[&coll])? == 1 {
                    self.metas.insert(coll.to_string(), CollStats::default());
                    continue 'colls;
                }
            }
            return Err(Fail::Db(conflict()));
        }
        Ok(())
    }

    fn write_all(&mut self, writes: &[Write]) -> Result<(), Fail> {
        let mut at = 0;
        while at < writes.len() {
            let end = writes[at..].iter().position(|w| !matches!(w, Write::Put { .. } | Write::Delete { .. })).map_or(writes.len(), |p| at + p);
            if end > at {
                self.read_ahead(&writes[at..end])?;
                for w in &writes[at..end] {
                    self.write_doc(w)?;
                }
                at = end;
            } else {
                // Index and collection changes work on the tables themselves.
                self.flush(false)?;
                self.write_ddl(&writes[at])?;
                self.flush(false)?;
                self.docs.clear();
                self.holders.clear();
                at += 1;
            }
        }
        Ok(())
    }

    /// Reads at once what the document writes of `writes` need: the documents they change,
    /// and the holders of the keys they file in unique indexes.
    fn read_ahead(&mut self, writes: &[Write]) -> Result<(), Fail> {
        let mut docs = BTreeSet::new();
        let mut keys = BTreeSet::new();
        for w in writes {
            let (Write::Put { coll, id, .. } | Write::Delete { coll, id, .. }) = w else { continue };
            let at = (coll.clone(), id.clone());
            if !self.docs.contains_key(&at) {
                docs.insert(at);
            }
            let Write::Put { doc, .. } = w else { continue };
            for def in self.metas.get(coll.as_str()).map(|m| m.indexes.as_slice()).unwrap_or_default().iter().filter(|d| d.unique) {
                for key in def.keys_of(doc).map_err(Fail::Db)? {
                    let at = (coll.clone(), def.name.clone(), key);
                    if !self.holders.contains_key(&at) {
                        keys.insert(at);
                    }
                }
            }
        }
        self.read(docs, keys)
    }

    /// Reads documents `(collection, id)` and the holders of keys `(collection, index, key)`.
    fn read(&mut self, docs: BTreeSet<(String, String)>, keys: BTreeSet<(String, String, String)>) -> Result<(), Fail> {
        if docs.is_empty() && keys.is_empty() {
            return Ok(());
        }
        let sql = self.sql;
        let docs: Vec<(String, String)> = docs.into_iter().collect();
        let keys: Vec<(String, String, String)> = keys.into_iter().collect();
        let filed: Vec<[String; 2]> = keys.iter().map(|(_, name, key)| [index_column(name), key_column(key)]).collect();
        let doc_colls: Vec<&str> = docs.iter().map(|d| d.0.as_str()).collect();
        let doc_ids: Vec<&str> = docs.iter().map(|d| d.1.as_str()).collect();
        let key_colls: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let key_idx: Vec<&str> = filed.iter().map(|f| f[0].as_str()).collect();
        let key_keys: Vec<&str> = filed.iter().map(|f| f[1].as_str()).collect();
        let rows = self.query(&sql.read, &[&doc_colls, &doc_ids, &key_colls, &key_idx, &key_keys])?;
        for row in rows {
            let (kind, n, id): (i32, i64, String) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            let at = usize::try_from(n - 1).unwrap_or(usize::MAX);
            if kind == 0
                && let Some(key) = docs.get(at)
            {
                self.docs.insert(key.clone(), Some(parse(row.try_get(3)?)?));
            } else if let Some(key) = keys.get(at) {
                self.holders.entry(key.clone()).or_default().insert(id);
            }
        }
        for key in docs {
            self.docs.entry(key).or_insert(None);
        }
        for key in keys {
            self.holders.entry(key).or_default();
        }
        Ok(())
    }

    /// The document stored under `id` as this transaction has it.
    fn peek_doc(&mut self, coll: &str, id: &str) -> Result<Option<Value>, Fail> {
        let at = (coll.to_string(), id.to_string());
        if !self.docs.contains_key(&at) {
            self.read(BTreeSet::from([at.clone()]), BTreeSet::new())?;
        }
        Ok(self.docs.get(&at).cloned().flatten())
    }

    /// The document stored under `id` as this transaction has it (and forgets it).
    fn take_doc(&mut self, coll: &str, id: &str) -> Result<Option<Value>, Fail> {
        let at = (coll.to_string(), id.to_string());
        if !self.docs.contains_key(&at) {
            self.read(BTreeSet::from([at.clone()]), BTreeSet::new())?;
        }
        Ok(self.docs.remove(&at).flatten())
    }

    /// A write of a document, as `embedded::write_one` does it.
    fn write_doc(&mut self, w: &Write) -> Result<(), Fail> {
        let (coll, id) = match w {
            Write::Put { coll, id, .. } | Write::Delete { coll, id, .. } => (coll.as_str(), id.as_str()),
            _ => return Ok(()),
        };
        let indexes = self.metas.get(coll).map(|m| m.indexes.clone()).unwrap_or_default();
        let old = self.take_doc(coll, id)?;
        let expected = match w {
            Write::Put { expect, .. } => expect.as_ref().is_none_or(|e| *e == old),
            Write::Delete { expect, .. } => expect.as_ref().is_none_or(|e| old.as_ref() == Some(e)),
            _ => true,
        };
        if !expected {
            return Err(Fail::Db(conflict()));
        }
        if let Some(old) = &old {
            let freed = self.unfile(coll, id, old, &indexes);
            let stats = self.metas.entry(coll.to_string()).or_default();
            stats.documents = stats.documents.saturating_sub(1);
            stats.bytes = stats.bytes.saturating_sub(serde_json::to_vec(old).map_or(0, |b| b.len() as u64) + freed);
        }
        let at = (coll.to_string(), id.to_string());
        match w {
            Write::Put { doc, .. } => {
                let filed = self.file(coll, id, doc, &indexes)?;
                let text = serde_json::to_string(doc).expect("JSON values serialize");
                let stats = self.metas.entry(coll.to_string()).or_default();
                stats.documents += 1;
                stats.bytes += text.len() as u64 + filed;
                self.docs.insert(at.clone(), Some(doc.clone()));
                self.doc_writes.insert(at, Some(text));
            }
            _ => {
                self.docs.insert(at.clone(), None);
                if old.is_some() {
                    self.doc_writes.insert(at, None);
                }
            }
        }
        Ok(())
    }

    /// Files `doc` (stored under `id`) in `indexes`, refusing a second holder of a unique key;
    /// answers the bytes filed (`entry_bytes`).
    fn file(&mut self, coll: &str, id: &str, doc: &Value, indexes: &[IndexDef]) -> Result<u64, Fail> {
        let mut filed = 0;
        for def in indexes {
            let mut holders = Holders::new(def, doc);
            for key in def.keys_of(doc).map_err(Fail::Db)? {
                filed += entry_bytes(coll, &def.name, &key, id);
                if def.unique {
                    let at = (coll.to_string(), def.name.clone(), key.clone());
                    if !self.holders.contains_key(&at) {
                        self.read(BTreeSet::new(), BTreeSet::from([at.clone()]))?;
                    }
                    // The key's other holders; one holding these very values is a duplicate
                    // (a key may stand for several values: see `IndexDef::values_by_key`).
                    let others: Vec<String> = self.holders.get(&at).into_iter().flatten().filter(|h| *h != id).cloned().collect();
                    for other in others {
                        if holders.duplicate(&key, &other, || self.peek_doc(coll, &other))? {
                            return Err(Fail::Db(duplicate(coll, def, &key)));
                        }
                    }
                    self.holders.entry(at).or_default().insert(id.to_string());
                }
                self.entry_writes.insert((coll.to_string(), index_column(&def.name), key_column(&key), id.to_string()), true);
            }
        }
        Ok(filed)
    }

    /// Takes `doc` (stored under `id`) out of `indexes`; answers the bytes it had filed.
    fn unfile(&mut self, coll: &str, id: &str, doc: &Value, indexes: &[IndexDef]) -> u64 {
        let mut freed = 0;
        for def in indexes {
            for key in filed_keys(def, doc) {
                freed += entry_bytes(coll, &def.name, &key, id);
                if let Some(held) = self.holders.get_mut(&(coll.to_string(), def.name.clone(), key.clone())) {
                    held.remove(id);
                }
                self.entry_writes.insert((coll.to_string(), index_column(&def.name), key_column(&key), id.to_string()), false);
            }
        }
        freed
    }

    /// Sends the writes kept so far, with the counts when `counts`, in statements of at most
    /// `WRITE_BATCH` rows a kind.
    fn flush(&mut self, counts: bool) -> Result<(), Fail> {
        let sql = self.sql;
        let doc_writes = std::mem::take(&mut self.doc_writes);
        let entry_writes = std::mem::take(&mut self.entry_writes);
        let mut deleted: Vec<[&str; 2]> = Vec::new();
        let mut put: Vec<[&str; 3]> = Vec::new();
        for ((coll, id), doc) in &doc_writes {
            match doc {
                Some(text) => put.push([coll, id, text]),
                None => deleted.push([coll, id]),
            }
        }
        let (mut removed, mut added): (Vec<[&str; 4]>, Vec<[&str; 4]>) = (Vec::new(), Vec::new());
        for ((coll, idx, key, id), add) in &entry_writes {
            if *add { &mut added } else { &mut removed }.push([coll, idx, key, id]);
        }
        let mut saved: Vec<(&str, i64, i64, String)> = Vec::new();
        let mut dropped: Vec<&str> = Vec::new();
        // The counts are sent last, once.
        let metas = if counts { std::mem::take(&mut self.metas) } else { BTreeMap::new() };
        for (coll, stats) in &metas {
            if self.dropped.contains(coll) && stats.documents == 0 && stats.indexes.is_empty() {
                dropped.push(coll);
            } else {
                let indexes = serde_json::to_string(&stats.indexes).expect("index definitions serialize");
                saved.push((coll, stats.documents as i64, stats.bytes as i64, indexes));
            }
        }
        let rows = deleted.len().max(put.len()).max(removed.len()).max(added.len());
        if rows == 0 && saved.is_empty() && dropped.is_empty() {
            return Ok(());
        }
        let statements = rows.div_ceil(WRITE_BATCH).max(1);
        for n in 0..statements {
            let part = |len: usize| (n * WRITE_BATCH).min(len)..((n + 1) * WRITE_BATCH).min(len);
            let (deleted, put) = (&deleted[part(deleted.len())], &put[part(put.len())]);
            let (removed, added) = (&removed[part(removed.len())], &added[part(added.len())]);
            // The counts go with the last part.
            let last = n + 1 == statements;
            let saved = if last { saved.as_slice() } else { &[] };
            let stat_colls: Vec<&str> = saved.iter().map(|s| s.0).collect();
            let documents: Vec<i64> = saved.iter().map(|s| s.1).collect();
            let bytes: Vec<i64> = saved.iter().map(|s| s.2).collect();
            let indexes: Vec<&str> = saved.iter().map(|s| s.3.as_str()).collect();
            let dropped: &[&str] = if last { &dropped } else { &[] };
            #[rustfmt::skip]
            self.execute(&sql.write, &[
                &column(deleted, 0), &column(deleted, 1),
                &column(put, 0), &column(put, 1), &column(put, 2),
                &column(removed, 0), &column(removed, 1), &column(removed, 2), &column(removed, 3),
                &column(added, 0), &column(added, 1), &column(added, 2), &column(added, 3),
                &stat_colls, &documents, &bytes, &indexes, &dropped,
            ])?;
        }
        Ok(())
    }

    /// A change of a collection's indexes, or its drop, as `embedded::write_one` does it.
    fn write_ddl(&mut self, w: &Write) -> Result<(), Fail> {
        let sql = self.sql;
        let coll = w.coll();
        let stats = self.metas.get(coll).cloned().unwrap_or_default();
        match w {
            Write::CreateIndex { def, .. } => {
                if let Some(existing) = stats.indexes.iter().find(|d| d.name == def.name) {
                    if existing == def {
                        return Ok(());
                    }
                    return Err(Fail::Db(DbError::bad(format!("an index named {} exists with other keys or options", def.name))));
                }
                let name = index_column(&def.name);
                // A unique index's keys so far, each with the ids holding it: a holder's values
                // are read again only where a key comes twice (see `IndexDef::values_by_key`).
                let mut seen: HashMap<String, Vec<String>> = HashMap::new();
                let mut filed = 0;
                // A page of documents at a time, the entries sent as they pile up: an index
                // over a large collection is never held whole.
                let stmt = prepared(&mut self.tx, self.cache, &sql.scan)?;
                let mut after = String::new();
                loop {
                    let rows = self.tx.query(&stmt, &[&coll, &after])?;
                    let Some(last) = rows.last() else { break };
                    after = last.try_get(0)?;
                    for row in &rows {
                        let (id, doc): (String, Value) = (row.try_get(0)?, parse(row.try_get(1)?)?);
                        // A holder is read without being kept.
                        let mut check = Holders::new(def, &doc);
                        for key in def.keys_of(&doc).map_err(Fail::Db)? {
                            filed += entry_bytes(coll, &def.name, &key, &id);
                            if def.unique {
                                let holders = seen.entry(key.clone()).or_default();
                                let others: Vec<String> = holders.iter().filter(|h| **h != id).cloned().collect();
                                holders.push(id.clone());
                                for other in others {
                                    if check.duplicate(&key, &other, || self.take_doc(coll, &other))? {
                                        return Err(Fail::Db(duplicate(coll, def, &key)));
                                    }
                                }
                            }
                            self.entry_writes.insert((coll.to_string(), name.clone(), key_column(&key), id.clone()), true);
                        }
                    }
                    if self.entry_writes.len() >= 4 * WRITE_BATCH {
                        self.flush(false)?;
                    }
                    if rows.len() < SCAN_BATCH {
                        break;
                    }
                }
                let stats = self.metas.entry(coll.to_string()).or_default();
                stats.bytes += filed;
                stats.indexes.push(def.clone());
            }
            Write::DropIndex { name, .. } => {
                let Some(def) = stats.indexes.iter().find(|d| d.name == *name) else {
                    return Err(Fail::Db(DbError::bad(format!("{coll} has no index named {name}"))));
                };
                // What its entries counted, from the documents they were filed for (long keys
                // are stored as digests, so the table cannot say).
                let mut freed = 0;
                each_doc(&mut self.tx, self.cache, sql, coll, &mut |id, doc| {
                    freed += filed_keys(def, &doc).iter().map(|k| entry_bytes(coll, &def.name, k, &id)).sum::<u64>();
                    Ok(true)
                })?;
                self.execute(&sql.clear_index, &[&coll, &index_column(name)])?;
                let stats = self.metas.entry(coll.to_string()).or_default();
                stats.bytes = stats.bytes.saturating_sub(freed);
                stats.indexes.retain(|d| d.name != *name);
            }
            Write::DropCollection { .. } => {
                self.execute(&sql.clear_entries, &[&coll])?;
                self.execute(&sql.clear_docs, &[&coll])?;
                self.metas.insert(coll.to_string(), CollStats::default());
                self.dropped.insert(coll.to_string());
            }
            Write::Put { .. } | Write::Delete { .. } => {}
        }
        Ok(())
    }

    /// Sends what is left with the counts of every collection written, and hands the
    /// transaction back to commit.
    fn finish(mut self) -> Result<Transaction<'a>, Fail> {
        self.flush(true)?;
        Ok(self.tx)
    }
}

impl Backend for Postgres {
    fn rest(&self, idle_for: Duration) {
        self.pool.rest(idle_for);
    }

    fn collections(&self) -> Result<BTreeMap<String, CollStats>, DbError> {
        self.run(|c, _| {
            let mut out = BTreeMap::new();
            for row in c.query(&self.sql.collections, &[])? {
                out.insert(row.try_get(0)?, stats_of(&row, 1)?);
            }
            Ok(out)
        })
    }

    fn get(&self, coll: &str, id: &str) -> Result<Option<Value>, DbError> {
        self.run(|c, _| c.query(&self.sql.get, &[&coll, &id])?.first().map(|row| parse(row.try_get(0)?)).transpose())
    }

    fn scan(&self, coll: &str, visit: &mut dyn FnMut(Value) -> Result<bool, DbError>) -> Result<(), DbError> {
        self.run(|c, again| {
            let Conn { client, prepared, .. } = c;
            // Pages of one snapshot.
            let mut tx = client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start()?;
            each_doc(&mut tx, prepared, &self.sql, coll, &mut |_, doc| {
                *again = false;
                Ok(visit(doc)?)
            })?;
            tx.commit()?;
            Ok(())
        })
    }

    fn indexes(&self, coll: &str) -> Result<Vec<IndexDef>, DbError> {
        self.run(|c, _| match c.query(&self.sql.indexes, &[&coll])?.first() {
            Some(row) => {
                let text: &str = row.try_get(0)?;
                serde_json::from_str(text).map_err(|e| Fail::Db(DbError::unavailable(format!("stored index definitions are not JSON: {e}"))))
            }
            None => Ok(Vec::new()),
        })
    }

    fn lookup(&self, coll: &str, index: &str, key: &str) -> Result<Vec<String>, DbError> {
        self.run(|c, _| c.query(&self.sql.lookup, &[&coll, &index_column(index), &key_column(key)])?.iter().map(|row| Ok(row.try_get(0)?)).collect())
    }

    /// A page of ids at a time, as a scan reads documents: a key that files many documents is
    /// never read whole from the server before the caller may stop.
    fn lookup_each(&self, coll: &str, index: &str, key: &str, visit: &mut dyn FnMut(String, Value) -> Result<bool, DbError>) -> Result<(), DbError> {
        let (index, key) = (index_column(index), key_column(key));
        let mut after = String::new();
        loop {
            let ids: Vec<String> = self.run(|c, _| c.query(&self.sql.lookup_page, &[&coll, &index, &key, &after])?.iter().map(|row| Ok(row.try_get(0)?)).collect())?;
            let Some(last) = ids.last() else { return Ok(()) };
            after = last.clone();
            for id in &ids {
                if let Some(d) = self.get(coll, id)?
                    && !visit(id.clone(), d)?
                {
                    return Ok(());
                }
            }
            if ids.len() < SCAN_BATCH {
                return Ok(());
            }
        }
    }

    fn apply(&self, writes: &[Write]) -> Result<(), DbError> {
        if writes.is_empty() {
            return Ok(());
        }
        self.run(|c, again| {
            let Conn { client, prepared, .. } = c;
            let tx = client.build_transaction().isolation_level(IsolationLevel::ReadCommitted).start()?;
            let mut apply = Apply::new(tx, prepared, &self.sql);
            apply.lock(writes)?;
            apply.write_all(writes)?;
            let tx = apply.finish()?;
            // Whether a commit that failed on the way took effect cannot be told: not again.
            *again = false;
            tx.commit()?;
            Ok(())
        })
    }

    fn destroy(&self) -> Result<(), DbError> {
        self.run_any(|c, _| {
            let mut tx = c.client.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(&self.schema)])?;
            tx.batch_execute(&self.sql.drop)?;
            tx.commit()?;
            Ok(())
        })?;
        self.destroyed.store(true, Ordering::Release);
        self.pool.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_one_per_database_name() {
        assert_eq!(schema_of("shop").unwrap(), "wdb_shop");
        assert_eq!(schema_of("shop.dev").unwrap(), "wdb_shop.dev");
        assert_ne!(schema_of("shop.dev").unwrap(), schema_of("shop-dev").unwrap());
        let long = "a".repeat(80);
        let longer = format!("{long}b");
        for n in [&long, &longer] {
            assert!(schema_of(n).unwrap().len() <= 63);
        }
        assert_ne!(schema_of(&long).unwrap(), schema_of(&longer).unwrap());
        assert_eq!(schema_of(&"x".repeat(59)).unwrap().len(), 63);
        for bad in ["", "Shop", "a_b", "a\"b", "a b", "é"] {
            assert_eq!(schema_of(bad).unwrap_err().kind, DbErrorKind::BadInput, "{bad}");
        }
    }

    #[test]
    fn long_keys_are_filed_by_digest_and_names_as_json() {
        let short = crate::index_key(&[Value::String("x".into())]);
        assert_eq!(key_column(&short), short);
        let long = crate::index_key(&[Value::String("x".repeat(600))]);
        assert!(key_column(&long).starts_with('#') && key_column(&long).len() == 65);
        assert_eq!(index_column("a\u{0}\"b"), "\"a\\u0000\\\"b\"");
        assert_eq!(quoted("wdb_a\"b"), "\"wdb_a\"\"b\"");
    }
}
