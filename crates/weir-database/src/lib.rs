//! A document database for every gateway, reached from functions as `imp.db()`.
//!
//! MongoDB's shapes (collections of JSON documents with an `_id`, filters, updates, indexes)
//! over a storage [`Backend`]: the embedded one (`embedded.rs`, one redb file per database,
//! durable before a write returns) or PostgreSQL (`postgres.rs`, a schema per database that
//! every node shares). The query language is evaluated here, in one
//! place, so the backends store and look up and never interpret a filter: both engines answer
//! alike by construction.
//!
//! `exec.rs` runs the operations a function sends (JSON in, JSON out), with the quotas of its
//! gateway and all-or-nothing transactions.

pub mod embedded;
pub mod exec;
pub mod filter;
pub mod postgres;
pub mod update;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use serde_json::Value;

pub use exec::{Databases, Db, IDLE_KEPT, REST_EVERY};

/// What went wrong, and how a caller should take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbError {
    pub kind: DbErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbErrorKind {
    /// The request is wrong: a bad filter, name or document.
    BadInput,
    /// A unique index already holds the value.
    Duplicate,
    /// A quota of the gateway's database is used up.
    Quota,
    /// The query ran past its time.
    Timeout,
    /// What was read changed before it was written (a transaction's commit).
    Conflict,
    /// The engine cannot be reached or failed.
    Unavailable,
}

impl DbError {
    pub fn bad(message: impl Into<String>) -> DbError {
        DbError { kind: DbErrorKind::BadInput, message: message.into() }
    }

    pub fn unavailable(e: impl std::fmt::Display) -> DbError {
        DbError { kind: DbErrorKind::Unavailable, message: format!("the database failed: {e}") }
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            DbErrorKind::BadInput => "bad_input",
            DbErrorKind::Duplicate => "duplicate_key",
            DbErrorKind::Quota => "quota_exceeded",
            DbErrorKind::Timeout => "timeout",
            DbErrorKind::Conflict => "conflict",
            DbErrorKind::Unavailable => "unavailable",
        }
    }

    /// The HTTP status an uncaught error of this kind answers with.
    pub fn status(&self) -> u16 {
        match self.kind {
            DbErrorKind::BadInput => 400,
            DbErrorKind::Duplicate | DbErrorKind::Conflict => 409,
            DbErrorKind::Quota => 507,
            DbErrorKind::Timeout => 504,
            DbErrorKind::Unavailable => 503,
        }
    }
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// An index: its name, the fields it orders by (1 or -1 each) and whether it is unique.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexDef {
    pub name: String,
    pub keys: Vec<(String, i8)>,
    pub unique: bool,
}

impl IndexDef {
    /// The keys this index files `doc` under: one per element when a field is an array
    /// (as MongoDB's multikey indexes), the canonical JSON of the fields' values.
    ///
    /// As in MongoDB, at most one of the index's fields may hold several values in one document
    /// ("parallel arrays" are refused): otherwise one document's keys would be the product of
    /// its arrays' lengths. One document files at most [`MAX_INDEX_KEYS`] keys of at most
    /// [`MAX_INDEX_KEY_BYTES`] in all in one index, so a write's index work stays in proportion
    /// to the document.
    pub fn keys_of(&self, doc: &Value) -> Result<Vec<String>, DbError> {
        let mut keys: Vec<String> = self.keyed_tuples(doc)?.into_iter().map(|(k, _)| k).collect();
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// As [`IndexDef::keys_of`], each key with the values it was made of, a row per array
    /// element (so a key may come more than once).
    pub(crate) fn keyed_tuples(&self, doc: &Value) -> Result<Vec<(String, Vec<Value>)>, DbError> {
        let columns = self.columns(doc);
        let mut spread: Option<&str> = None;
        for ((field, _), values) in self.keys.iter().zip(&columns) {
            if values.len() > 1 {
                if let Some(other) = spread {
                    return Err(DbError::bad(format!("cannot index parallel arrays: {other} and {field} both hold several values in one document (index {})", self.name)));
                }
                spread = Some(field);
            }
            if values.len() > MAX_INDEX_KEYS {
                return Err(DbError::bad(format!("index {} would file {} keys for one document; at most {MAX_INDEX_KEYS}", self.name, values.len())));
            }
        }
        let rows = columns.iter().map(Vec::len).max().unwrap_or(1);
        let mut keys = Vec::with_capacity(rows);
        let mut bytes = 0usize;
        for row in 0..rows {
            let tuple: Vec<Value> = columns.iter().map(|c| if c.len() == 1 { c[0].clone() } else { c[row].clone() }).collect();
            let key = index_key(&tuple);
            bytes += key.len();
            if bytes > MAX_INDEX_KEY_BYTES {
                return Err(DbError::bad(format!("index {} would file more than {MAX_INDEX_KEY_BYTES} bytes of keys for one document", self.name)));
            }
            keys.push((key, tuple));
        }
        Ok(keys)
    }

    /// What `doc` files in this index, by key: the values each key stands for (a key holds
    /// the double nearest each number, so two integers past 2^53 may share one). `None` when
    /// this cannot tell (a document filed before the index's bounds).
    pub(crate) fn values_by_key(&self, doc: &Value) -> Option<HashMap<String, Vec<Vec<Value>>>> {
        let mut by_key: HashMap<String, Vec<Vec<Value>>> = HashMap::new();
        for (key, tuple) in self.keyed_tuples(doc).ok()? {
            let held = by_key.entry(key).or_default();
            if !held.iter().any(|t| same_tuple(t, &tuple)) {
                held.push(tuple);
            }
        }
        Some(by_key)
    }
}

/// Whether two documents' values under one index key (see [`IndexDef::values_by_key`]) are
/// the same values, exactly: a unique index holds two documents whose key is one and whose
/// values are not. Values that cannot be told are taken for the same.
fn same_values(mine: Option<&Vec<Vec<Value>>>, theirs: Option<&Vec<Vec<Value>>>) -> bool {
    match (mine, theirs) {
        (Some(x), Some(y)) if !x.is_empty() && !y.is_empty() => x.iter().any(|t| y.iter().any(|u| same_tuple(t, u))),
        _ => true,
    }
}

/// A unique index's check of one document against the other holders of its keys: the
/// document's values and each holder's are made once, however many keys they share.
pub(crate) struct Holders<'a> {
    def: &'a IndexDef,
    doc: &'a Value,
    mine: Option<Option<HashMap<String, Vec<Vec<Value>>>>>,
    theirs: HashMap<String, Option<HashMap<String, Vec<Vec<Value>>>>>,
}

impl<'a> Holders<'a> {
    pub(crate) fn new(def: &'a IndexDef, doc: &'a Value) -> Holders<'a> {
        Holders { def, doc, mine: None, theirs: HashMap::new() }
    }

    /// Whether holder `other` (read with `read` the first time it is asked about) holds the
    /// document's very values under `key`: a duplicate.
    pub(crate) fn duplicate<E>(&mut self, key: &str, other: &str, read: impl FnOnce() -> Result<Option<Value>, E>) -> Result<bool, E> {
        if !self.theirs.contains_key(other) {
            let held = read()?;
            self.theirs.insert(other.to_string(), held.and_then(|h| self.def.values_by_key(&h)));
        }
        let mine = self.mine.get_or_insert_with(|| self.def.values_by_key(self.doc));
        Ok(same_values(mine.as_ref().and_then(|m| m.get(key)), self.theirs[other].as_ref().and_then(|t| t.get(key))))
    }
}

/// Two index tuples of exactly equal values.
pub(crate) fn same_tuple(a: &[Value], b: &[Value]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| filter::json_eq(x, y))
}

impl IndexDef {

    /// The values of each of the index's fields in `doc`: an array's elements, `null` when
    /// the field is missing.
    fn columns<'d>(&self, doc: &'d Value) -> Vec<Vec<&'d Value>> {
        self.keys
            .iter()
            .map(|(field, _)| {
                let mut values: Vec<&Value> = Vec::new();
                for v in filter::resolve(doc, field) {
                    match v {
                        Value::Array(a) if !a.is_empty() => values.extend(a.iter()),
                        other => values.push(other),
                    }
                }
                if values.is_empty() {
                    values.push(&Value::Null);
                }
                values
            })
            .collect()
    }
}

/// The most keys one document files in one index (the elements of its one array field).
pub const MAX_INDEX_KEYS: usize = 10_000;
/// The most bytes of keys one document files in one index: the largest document's size.
pub const MAX_INDEX_KEY_BYTES: usize = update::MAX_DOCUMENT;

/// The keys `doc` was filed under in `def`, to take it out again. A document whose keys are
/// refused now was filed before these bounds, under every combination of its arrays' values:
/// those are its keys, however many (it was stored with them all).
pub(crate) fn filed_keys(def: &IndexDef, doc: &Value) -> Vec<String> {
    def.keys_of(doc).unwrap_or_else(|_| {
        let mut combos: Vec<Vec<Value>> = vec![Vec::new()];
        for values in def.columns(doc) {
            combos = combos.into_iter().flat_map(|c| values.iter().map(move |v| [c.clone(), vec![(*v).clone()]].concat())).collect();
        }
        let mut keys: Vec<String> = combos.iter().map(|c| index_key(c)).collect();
        keys.sort();
        keys.dedup();
        keys
    })
}

/// What one index entry counts against its database's bytes (`CollStats::bytes`, the quota),
/// as both engines count it: what it stores (its collection's and index's names, its key and
/// the id it names) and [`ENTRY_OVERHEAD`] for the store's own bookkeeping of it.
pub fn entry_bytes(coll: &str, index: &str, key: &str, id: &str) -> u64 {
    (coll.len() + index.len() + key.len() + id.len() + ENTRY_OVERHEAD) as u64
}

/// What an index entry costs a store beyond its fields (a row's or a B-tree item's header).
pub const ENTRY_OVERHEAD: usize = 32;

/// What `doc`, stored under `id`, counts against its database's bytes in `indexes`: the
/// entries it files (an error when an index refuses it).
pub fn filing_bytes(indexes: &[IndexDef], coll: &str, id: &str, doc: &Value) -> Result<u64, DbError> {
    let mut n = 0;
    for def in indexes {
        n += def.keys_of(doc)?.iter().map(|k| entry_bytes(coll, &def.name, k, id)).sum::<u64>();
    }
    Ok(n)
}

/// What `doc` counts in `indexes` as it was filed (see [`filed_keys`]).
pub(crate) fn filed_bytes(indexes: &[IndexDef], coll: &str, id: &str, doc: &Value) -> u64 {
    indexes.iter().map(|def| filed_keys(def, doc).iter().map(|k| entry_bytes(coll, &def.name, k, id)).sum::<u64>()).sum()
}

/// The key of a tuple of values in an index: numbers in one form, so `1` and `1.0` are one key.
/// That form is the double nearest the number, so integers past 2^53 that round alike share a
/// key: a lookup only leads to the documents, which are then matched exactly, and a unique
/// index compares the values of a key's holders (`IndexDef::same_values`).
pub fn index_key(values: &[Value]) -> String {
    let norm: Vec<Value> = values
        .iter()
        .map(|v| match v {
            Value::Number(n) => n.as_f64().and_then(serde_json::Number::from_f64).map(Value::Number).unwrap_or(Value::Null),
            other => other.clone(),
        })
        .collect();
    Value::Array(norm).to_string()
}

/// A change a [`Backend`] applies, all of a batch or none.
#[derive(Debug, Clone)]
pub enum Write {
    /// Store `doc` under `id` (its `_id` key); `expect` is what must be there now (`None`:
    /// nothing), when the writer read it.
    Put { coll: String, id: String, doc: Value, expect: Option<Option<Value>> },
    Delete { coll: String, id: String, expect: Option<Value> },
    CreateIndex { coll: String, def: IndexDef },
    DropIndex { coll: String, name: String },
    DropCollection { coll: String },
}

impl Write {
    /// The collection the write changes.
    pub fn coll(&self) -> &str {
        match self {
            Write::Put { coll, .. } | Write::Delete { coll, .. } | Write::CreateIndex { coll, .. } | Write::DropIndex { coll, .. } | Write::DropCollection { coll } => coll,
        }
    }
}

/// Counts of one collection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CollStats {
    pub documents: u64,
    pub bytes: u64,
    pub indexes: Vec<IndexDef>,
}

/// Where documents live: stores and finds, and never reads a filter.
pub trait Backend: Send + Sync {
    /// Every collection, with its counts and indexes.
    fn collections(&self) -> Result<BTreeMap<String, CollStats>, DbError>;
    fn get(&self, coll: &str, id: &str) -> Result<Option<Value>, DbError>;
    /// Every document of `coll` in `_id` key order, until `visit` answers `false`.
    fn scan(&self, coll: &str, visit: &mut dyn FnMut(Value) -> Result<bool, DbError>) -> Result<(), DbError>;
    /// The indexes of `coll`.
    fn indexes(&self, coll: &str) -> Result<Vec<IndexDef>, DbError>;
    /// The ids filed under `key` in index `index` of `coll`.
    fn lookup(&self, coll: &str, index: &str, key: &str) -> Result<Vec<String>, DbError>;
    /// Hands `visit` the documents filed under `key` in index `index` of `coll`, with their ids,
    /// one at a time, until it answers `false` (or fails): a key that files many documents is
    /// never read whole before the caller may stop.
    fn lookup_each(&self, coll: &str, index: &str, key: &str, visit: &mut dyn FnMut(String, Value) -> Result<bool, DbError>) -> Result<(), DbError> {
        for id in self.lookup(coll, index, key)? {
            if let Some(d) = self.get(coll, &id)?
                && !visit(id, d)?
            {
                break;
            }
        }
        Ok(())
    }
    /// Whether this process is the database's only writer, so what it read of the indexes
    /// stays true until it changes them itself.
    fn single_writer(&self) -> bool {
        false
    }
    /// Lets go of what the backend holds for nothing but speed (idle connections) unused for
    /// `idle_for`.
    fn rest(&self, _idle_for: std::time::Duration) {}
    /// Applies the writes in one transaction: a failed `expect` is a `Conflict`, a unique
    /// index holding a value twice a `Duplicate`, and then nothing is written.
    fn apply(&self, writes: &[Write]) -> Result<(), DbError>;
    /// Removes the database with everything in it.
    fn destroy(&self) -> Result<(), DbError>;
}

/// Limits of one gateway's database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Quota {
    pub documents: u64,
    pub bytes: u64,
    pub query_ms: u64,
}

impl Default for Quota {
    fn default() -> Self {
        Quota { documents: 1_000_000, bytes: 1 << 30, query_ms: 5_000 }
    }
}

/// Opens the backend of a database by name.
pub type Opener = Arc<dyn Fn(&str) -> Result<Arc<dyn Backend>, DbError> + Send + Sync>;

/// A collection name: 1 to 120 of `[A-Za-z0-9_.-]`, starting with a letter, digit or `_`,
/// and not `__` (reserved).
pub fn check_collection(name: &str) -> Result<(), DbError> {
    let ok = !name.is_empty()
        && name.len() <= 120
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.starts_with(['.', '-'])
        && !name.contains("..");
    if !ok {
        return Err(DbError::bad(format!("collection name {name:?}: 1 to 120 of A-Z a-z 0-9 _ - ., starting with a letter, digit or _")));
    }
    if name.starts_with("__") {
        return Err(DbError::bad(format!("collection name {name:?}: names starting with __ are reserved")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn collection_names_are_checked() {
        for ok in ["users", "a", "Orders_2024", "log.v1", "x-y"] {
            assert!(check_collection(ok).is_ok(), "{ok}");
        }
        for bad in ["", "__secret", "../x", "a/b", "usérs", "u\u{0455}ers", ".hidden", "a..b", &"x".repeat(121), "a b", "-x"] {
            assert!(check_collection(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn index_keys_are_one_per_element_and_numbers_agree() {
        let def = IndexDef { name: "t_1".into(), keys: vec![("t".into(), 1)], unique: false };
        assert_eq!(def.keys_of(&json!({"t": ["a", "b", "a"]})).unwrap(), vec![index_key(&[json!("a")]), index_key(&[json!("b")])]);
        assert_eq!(def.keys_of(&json!({})).unwrap(), vec![index_key(&[json!(null)])]);
        assert_eq!(index_key(&[json!(1)]), index_key(&[json!(1.0)]));
        let two = IndexDef { name: "a_1_b_1".into(), keys: vec![("a".into(), 1), ("b".into(), 1)], unique: true };
        assert_eq!(two.keys_of(&json!({"a": 1, "b": "x"})).unwrap().len(), 1);
        // One array beside single values: one key per element, the single values in each.
        assert_eq!(two.keys_of(&json!({"a": [1, 2], "b": ["x"]})).unwrap(), vec![index_key(&[json!(1), json!("x")]), index_key(&[json!(2), json!("x")])]);
    }

    #[test]
    fn a_document_filed_before_the_bounds_is_taken_out_under_all_its_keys() {
        let two = IndexDef { name: "a_1_b_1".into(), keys: vec![("a".into(), 1), ("b".into(), 1)], unique: true };
        let doc = json!({"a": [1, 2], "b": ["x", "y"]});
        assert!(two.keys_of(&doc).is_err());
        let all = filed_keys(&two, &doc);
        assert_eq!(all.len(), 4);
        assert!(all.contains(&index_key(&[json!(2), json!("x")])));
        let fine = json!({"a": [1, 2], "b": "x"});
        assert_eq!(filed_keys(&two, &fine), two.keys_of(&fine).unwrap());
    }

    #[test]
    fn index_keys_stay_in_proportion_to_the_document() {
        let two = IndexDef { name: "a_1_b_1".into(), keys: vec![("a".into(), 1), ("b".into(), 1)], unique: false };
        // Two arrays would file the product of their lengths: refused, as MongoDB does.
        let parallel = two.keys_of(&json!({"a": [1, 2], "b": [3, 4]})).unwrap_err();
        assert_eq!(parallel.kind, DbErrorKind::BadInput);
        assert!(parallel.message.contains("parallel arrays"), "{}", parallel.message);
        let nested = IndexDef { name: "x.y_1_b_1".into(), keys: vec![("x.y".into(), 1), ("b".into(), 1)], unique: false };
        assert!(nested.keys_of(&json!({"x": [{"y": 1}, {"y": 2}], "b": [3, 4]})).unwrap_err().message.contains("parallel arrays"));
        // Too many elements in the one array.
        let one = IndexDef { name: "t_1".into(), keys: vec![("t".into(), 1)], unique: false };
        let many: Vec<u32> = (0..=MAX_INDEX_KEYS as u32).collect();
        let over = one.keys_of(&json!({ "t": many })).unwrap_err();
        assert!(over.message.contains("at most 10000"), "{}", over.message);
        assert_eq!(one.keys_of(&json!({ "t": many[..MAX_INDEX_KEYS] })).unwrap().len(), MAX_INDEX_KEYS);
        // A large value repeated beside each element of an array.
        let big = "x".repeat(1 << 20);
        let heavy = two.keys_of(&json!({"a": big, "b": [1, 2, 3, 4, 5]})).unwrap_err();
        assert!(heavy.message.contains("bytes of keys"), "{}", heavy.message);
        assert_eq!(two.keys_of(&json!({"a": big, "b": [1, 2, 3]})).unwrap().len(), 3);
    }
}
