//! The embedded engine: one redb file per database (`{dir}/{name}.redb`).
//!
//! redb because the node already trusts it with its config: a B-tree with ACID write
//! transactions that are durable (fsynced) when `commit` returns, so an acknowledged write
//! survives `kill -9`, with readers that never wait for the writer. Tables:
//! - `docs` `(collection, id key)` → the document's JSON;
//! - `index` `(collection, index, key, id key)` → nothing: an index is a sorted set, and a
//!   lookup is a range over its first three parts;
//! - `meta` `collection` → its counts and index definitions.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde_json::Value;

use crate::{Backend, CollStats, DbError, DbErrorKind, Holders, IndexDef, Opener, Write, entry_bytes, filed_keys};

const DOCS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("docs");
const INDEX: TableDefinition<(&str, &str, &str, &str), ()> = TableDefinition::new("index");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub struct Embedded {
    path: PathBuf,
    db: RwLock<Option<Database>>,
}

/// Opens database `name` as `{dir}/{name}.redb`.
pub fn opener(dir: PathBuf) -> Opener {
    Arc::new(move |name: &str| Ok(Arc::new(Embedded::open(dir.join(format!("{name}.redb")))?) as Arc<dyn Backend>))
}

fn failed(e: impl std::fmt::Display) -> DbError {
    DbError::unavailable(e)
}

impl Embedded {
    pub fn open(path: PathBuf) -> Result<Embedded, DbError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
        }
        let db = Database::create(&path).map_err(|e| failed(format!("{}: {e}", path.display())))?;
        let wtx = db.begin_write().map_err(failed)?;
        wtx.open_table(DOCS).map_err(failed)?;
        wtx.open_table(INDEX).map_err(failed)?;
        wtx.open_table(META).map_err(failed)?;
        wtx.commit().map_err(failed)?;
        Ok(Embedded { path, db: RwLock::new(Some(db)) })
    }

    fn with<T>(&self, f: impl FnOnce(&Database) -> Result<T, DbError>) -> Result<T, DbError> {
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(db) => f(db),
            None => Err(failed("the database was deleted")),
        }
    }
}

fn meta_of(wtx: &WriteTransaction, coll: &str) -> Result<Option<CollStats>, DbError> {
    let meta = wtx.open_table(META).map_err(failed)?;
    let got = meta.get(coll).map_err(failed)?;
    Ok(got.and_then(|g| serde_json::from_slice(g.value()).ok()))
}

fn doc_bytes(doc: &Value) -> Vec<u8> {
    serde_json::to_vec(doc).expect("JSON values serialize")
}

/// Files `doc` (stored under `id`) in every index of `stats`, refusing a second holder of a
/// unique key; answers the bytes filed (`entry_bytes`).
fn file_in_indexes(wtx: &WriteTransaction, docs: &redb::Table<(&str, &str), &[u8]>, coll: &str, id: &str, doc: &Value, indexes: &[IndexDef]) -> Result<u64, DbError> {
    let mut index = wtx.open_table(INDEX).map_err(failed)?;
    let mut filed = 0;
    for def in indexes {
        let mut holders = Holders::new(def, doc);
        for key in def.keys_of(doc)? {
            filed += entry_bytes(coll, &def.name, &key, id);
            if def.unique {
                // The key's other holders; one holding these very values is a duplicate (a
                // key may stand for several values: see `IndexDef::values_by_key`).
                let mut others = Vec::new();
                for entry in index.range((coll, def.name.as_str(), key.as_str(), "")..).map_err(failed)? {
                    let (k, _) = entry.map_err(failed)?;
                    let (c, n, kk, other) = k.value();
                    if (c, n, kk) != (coll, def.name.as_str(), key.as_str()) {
                        break;
                    }
                    if other != id {
                        others.push(other.to_string());
                    }
                }
                for other in others {
                    let read = || Ok::<_, DbError>(docs.get((coll, other.as_str())).map_err(failed)?.and_then(|d| serde_json::from_slice::<Value>(d.value()).ok()));
                    if holders.duplicate(&key, &other, read)? {
                        return Err(DbError { kind: DbErrorKind::Duplicate, message: format!("duplicate key: index {} of {coll} already holds {key}", def.name) });
                    }
                }
            }
            index.insert((coll, def.name.as_str(), key.as_str(), id), ()).map_err(failed)?;
        }
    }
    Ok(filed)
}

/// Takes `doc` (stored under `id`) out of `indexes`; answers the bytes it had filed.
fn unfile(wtx: &WriteTransaction, coll: &str, id: &str, doc: &Value, indexes: &[IndexDef]) -> Result<u64, DbError> {
    let mut index = wtx.open_table(INDEX).map_err(failed)?;
    let mut freed = 0;
    for def in indexes {
        for key in filed_keys(def, doc) {
            freed += entry_bytes(coll, &def.name, &key, id);
            index.remove((coll, def.name.as_str(), key.as_str(), id)).map_err(failed)?;
        }
    }
    Ok(freed)
}

/// Entries (or documents) a drop reads at once before it removes them: it holds no more than
/// these, however large the index or collection.
const DROP_BATCH: usize = 4096;

/// Removes every entry of `index` (or of every index with `None`) of `coll`, a batch at a
/// time; answers their bytes.
fn clear_index(wtx: &WriteTransaction, coll: &str, name: Option<&str>) -> Result<u64, DbError> {
    let mut index = wtx.open_table(INDEX).map_err(failed)?;
    let start = (coll, name.unwrap_or(""), "", "");
    let mut freed = 0;
    loop {
        let mut doomed: Vec<(String, String, String, String)> = Vec::new();
        for entry in index.range(start..).map_err(failed)? {
            let (k, _) = entry.map_err(failed)?;
            let (c, n, key, id) = k.value();
            if c != coll || name.is_some_and(|name| name != n) || doomed.len() == DROP_BATCH {
                break;
            }
            doomed.push((c.to_string(), n.to_string(), key.to_string(), id.to_string()));
        }
        for (c, n, key, id) in &doomed {
            freed += entry_bytes(c, n, key, id);
            index.remove((c.as_str(), n.as_str(), key.as_str(), id.as_str())).map_err(failed)?;
        }
        if doomed.len() < DROP_BATCH {
            return Ok(freed);
        }
    }
}

fn write_one(wtx: &WriteTransaction, metas: &mut BTreeMap<String, CollStats>, w: &Write) -> Result<(), DbError> {
    let coll = w.coll();
    if !metas.contains_key(coll) {
        let m = meta_of(wtx, coll)?;
        metas.insert(coll.to_string(), m.unwrap_or_default());
    }
    let stats = metas.get_mut(coll).expect("loaded above");
    match w {
        Write::Put { id, doc, expect, .. } => {
            let old = read_doc(wtx, coll, id)?;
            if let Some(expect) = expect
                && *expect != old
            {
                return Err(DbError { kind: DbErrorKind::Conflict, message: "the document changed meanwhile".into() });
            }
            if let Some(old) = &old {
                let freed = unfile(wtx, coll, id, old, &stats.indexes)?;
                stats.documents -= 1;
                stats.bytes = stats.bytes.saturating_sub(doc_bytes(old).len() as u64 + freed);
            }
            let mut docs = wtx.open_table(DOCS).map_err(failed)?;
            let filed = file_in_indexes(wtx, &docs, coll, id, doc, &stats.indexes)?;
            let bytes = doc_bytes(doc);
            stats.documents += 1;
            stats.bytes += bytes.len() as u64 + filed;
            docs.insert((coll, id.as_str()), bytes.as_slice()).map_err(failed)?;
        }
        Write::Delete { id, expect, .. } => {
            let old = read_doc(wtx, coll, id)?;
            if let Some(expect) = expect
                && old.as_ref() != Some(expect)
            {
                return Err(DbError { kind: DbErrorKind::Conflict, message: "the document changed meanwhile".into() });
            }
            if let Some(old) = &old {
                let freed = unfile(wtx, coll, id, old, &stats.indexes)?;
                stats.documents -= 1;
                stats.bytes = stats.bytes.saturating_sub(doc_bytes(old).len() as u64 + freed);
                wtx.open_table(DOCS).map_err(failed)?.remove((coll, id.as_str())).map_err(failed)?;
            }
        }
        Write::CreateIndex { def, .. } => {
            if let Some(existing) = stats.indexes.iter().find(|d| d.name == def.name) {
                if existing == def {
                    return Ok(());
                }
                return Err(DbError::bad(format!("an index named {} exists with other keys or options", def.name)));
            }
            // Each document is filed as it is read: the collection is never held whole.
            let docs = wtx.open_table(DOCS).map_err(failed)?;
            let mut filed = 0;
            for entry in docs.range((coll, "")..).map_err(failed)? {
                let (k, v) = entry.map_err(failed)?;
                let (c, id) = k.value();
                if c != coll {
                    break;
                }
                let doc = serde_json::from_slice::<Value>(v.value()).map_err(failed)?;
                filed += file_in_indexes(wtx, &docs, coll, id, &doc, std::slice::from_ref(def))?;
            }
            stats.bytes += filed;
            stats.indexes.push(def.clone());
        }
        Write::DropIndex { name, .. } => {
            if !stats.indexes.iter().any(|d| d.name == *name) {
                return Err(DbError::bad(format!("{coll} has no index named {name}")));
            }
            let freed = clear_index(wtx, coll, Some(name))?;
            stats.bytes = stats.bytes.saturating_sub(freed);
            stats.indexes.retain(|d| d.name != *name);
        }
        Write::DropCollection { .. } => {
            clear_index(wtx, coll, None)?;
            let mut docs = wtx.open_table(DOCS).map_err(failed)?;
            loop {
                let mut doomed = Vec::new();
                for entry in docs.range((coll, "")..).map_err(failed)? {
                    let (k, _) = entry.map_err(failed)?;
                    let (c, id) = k.value();
                    if c != coll || doomed.len() == DROP_BATCH {
                        break;
                    }
                    doomed.push(id.to_string());
                }
                for id in &doomed {
                    docs.remove((coll, id.as_str())).map_err(failed)?;
                }
                if doomed.len() < DROP_BATCH {
                    break;
                }
            }
            *stats = CollStats::default();
            metas.insert(format!("\0dropped:{coll}"), CollStats::default());
        }
    }
    Ok(())
}

fn read_doc(wtx: &WriteTransaction, coll: &str, id: &str) -> Result<Option<Value>, DbError> {
    let docs = wtx.open_table(DOCS).map_err(failed)?;
    let got = docs.get((coll, id)).map_err(failed)?;
    got.map(|g| serde_json::from_slice(g.value()).map_err(failed)).transpose()
}

impl Backend for Embedded {
    fn collections(&self) -> Result<BTreeMap<String, CollStats>, DbError> {
        self.with(|db| {
            let rtx = db.begin_read().map_err(failed)?;
            let meta = rtx.open_table(META).map_err(failed)?;
            let mut out = BTreeMap::new();
            for entry in meta.iter().map_err(failed)? {
                let (k, v) = entry.map_err(failed)?;
                if let Ok(stats) = serde_json::from_slice::<CollStats>(v.value()) {
                    out.insert(k.value().to_string(), stats);
                }
            }
            Ok(out)
        })
    }

    fn get(&self, coll: &str, id: &str) -> Result<Option<Value>, DbError> {
        self.with(|db| {
            let rtx = db.begin_read().map_err(failed)?;
            let docs = rtx.open_table(DOCS).map_err(failed)?;
            let got = docs.get((coll, id)).map_err(failed)?;
            got.map(|g| serde_json::from_slice(g.value()).map_err(failed)).transpose()
        })
    }

    fn scan(&self, coll: &str, visit: &mut dyn FnMut(Value) -> Result<bool, DbError>) -> Result<(), DbError> {
        self.with(|db| {
            let rtx = db.begin_read().map_err(failed)?;
            let docs = rtx.open_table(DOCS).map_err(failed)?;
            for entry in docs.range((coll, "")..).map_err(failed)? {
                let (k, v) = entry.map_err(failed)?;
                if k.value().0 != coll {
                    break;
                }
                if !visit(serde_json::from_slice(v.value()).map_err(failed)?)? {
                    break;
                }
            }
            Ok(())
        })
    }

    fn indexes(&self, coll: &str) -> Result<Vec<IndexDef>, DbError> {
        self.with(|db| {
            let rtx = db.begin_read().map_err(failed)?;
            let meta = rtx.open_table(META).map_err(failed)?;
            let got = meta.get(coll).map_err(failed)?;
            Ok(got.and_then(|g| serde_json::from_slice::<CollStats>(g.value()).ok()).map(|s| s.indexes).unwrap_or_default())
        })
    }

    fn single_writer(&self) -> bool {
        true
    }

    fn lookup_each(&self, coll: &str, index: &str, key: &str, visit: &mut dyn FnMut(String, Value) -> Result<bool, DbError>) -> Result<(), DbError> {
        self.with(|db| {
            // One read transaction for the index and the documents it names.
            let rtx = db.begin_read().map_err(failed)?;
            let table = rtx.open_table(INDEX).map_err(failed)?;
            let docs = rtx.open_table(DOCS).map_err(failed)?;
            for entry in table.range((coll, index, key, "")..).map_err(failed)? {
                let (k, _) = entry.map_err(failed)?;
                let (c, n, kk, id) = k.value();
                if (c, n, kk) != (coll, index, key) {
                    break;
                }
                if let Some(v) = docs.get((coll, id)).map_err(failed)?
                    && !visit(id.to_string(), serde_json::from_slice(v.value()).map_err(failed)?)?
                {
                    break;
                }
            }
            Ok(())
        })
    }

    fn lookup(&self, coll: &str, index: &str, key: &str) -> Result<Vec<String>, DbError> {
        self.with(|db| {
            let rtx = db.begin_read().map_err(failed)?;
            let table = rtx.open_table(INDEX).map_err(failed)?;
            let mut ids = Vec::new();
            for entry in table.range((coll, index, key, "")..).map_err(failed)? {
                let (k, _) = entry.map_err(failed)?;
                let (c, n, kk, id) = k.value();
                if (c, n, kk) != (coll, index, key) {
                    break;
                }
                ids.push(id.to_string());
            }
            Ok(ids)
        })
    }

    fn apply(&self, writes: &[Write]) -> Result<(), DbError> {
        self.with(|db| {
            let wtx = db.begin_write().map_err(failed)?;
            let mut metas: BTreeMap<String, CollStats> = BTreeMap::new();
            for w in writes {
                // On error the transaction is dropped, which aborts it: nothing is written.
                write_one(&wtx, &mut metas, w)?;
            }
            {
                let mut meta = wtx.open_table(META).map_err(failed)?;
                for (coll, stats) in &metas {
                    if coll.starts_with('\0') {
                        continue;
                    }
                    let dropped = metas.contains_key(&format!("\0dropped:{coll}"));
                    if dropped && stats.documents == 0 && stats.indexes.is_empty() {
                        meta.remove(coll.as_str()).map_err(failed)?;
                    } else {
                        meta.insert(coll.as_str(), serde_json::to_vec(stats).expect("stats serialize").as_slice()).map_err(failed)?;
                    }
                }
            }
            wtx.commit().map_err(failed)
        })
    }

    fn destroy(&self) -> Result<(), DbError> {
        let mut guard = self.db.write().unwrap_or_else(|e| e.into_inner());
        *guard = None;
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(failed(e)),
        }
    }
}
