//! The embedded store: one redb file. Commits are durable (fsync) before a write returns, so an
//! acknowledged Admin API write survives `kill -9`.
//!
//! After an I/O error (a full disk, say) redb refuses every later operation until the database
//! is closed and opened again; the store does that on the next operation, so it recovers by
//! itself once the disk has space again.
//!
//! Watch history is kept in memory only: after a restart the store remembers no change before
//! its current revision, and a watcher asking for older ones gets `Compacted`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc};

use crate::{
    Compare, Event, EventKind, KeyValue, Op, Result, Store, StoreError, Txn, TxnOutcome, WatchMessage,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

/// How many past transactions a late watcher can catch up on.
const HISTORY: usize = 4096;

use crate::Batch;

struct Shared {
    path: PathBuf,
    /// `None` after an I/O error closed it, until the next operation opens it again.
    db: RwLock<Option<Database>>,
    /// Serialises commits with their broadcast, so watchers see transactions in revision order.
    log: Mutex<Log>,
    tx: broadcast::Sender<Batch>,
}

struct Log {
    revision: i64,
    /// The oldest revision a watcher may start from and still miss nothing.
    horizon: i64,
    recent: VecDeque<Batch>,
}

#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A redb error: the storage failing (the database must then be reopened) or the data being
/// wrong.
fn failed(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        e @ (redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed) => unavailable(e),
        e => corrupt(e),
    }
}

/// Opens the file and reads the revision it is at.
fn open_db(path: &Path) -> Result<(Database, i64)> {
    let db = Database::create(path).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
    let wtx = db.begin_write().map_err(unavailable)?;
    let revision = {
        wtx.open_table(KV).map_err(failed)?;
        let meta = wtx.open_table(META).map_err(failed)?;
        meta.get(REVISION).map_err(failed)?.map(|g| g.value()).unwrap_or(0)
    };
    wtx.commit().map_err(unavailable)?;
    Ok((db, revision))
}

/// Stored value layout: create revision, mod revision (both little-endian i64), then the bytes.
fn encode(create: i64, modified: i64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&create.to_le_bytes());
    out.extend_from_slice(&modified.to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn decode(key: &str, raw: &[u8]) -> Result<KeyValue> {
    if raw.len() < 16 {
        return Err(corrupt(format!("value of {key} is truncated")));
    }
    let (head, value) = raw.split_at(16);
    let create = i64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    let modified = i64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
    Ok(KeyValue {
        key: key.to_string(),
        value: Bytes::copy_from_slice(value),
        create_revision: create,
        mod_revision: modified,
    })
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, as `dir/weir.redb`.
    pub fn open(dir: &Path) -> Result<EmbeddedStore> {
        std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        let path = dir.join("weir.redb");
        let (db, revision) = open_db(&path)?;
        let (tx, _) = broadcast::channel(1024);
        let log = Log { revision, horizon: revision + 1, recent: VecDeque::new() };
        Ok(EmbeddedStore { shared: Arc::new(Shared { path, db: RwLock::new(Some(db)), log: Mutex::new(log), tx }) })
    }

    /// Runs `f` on the database, opening it again first if an I/O error closed it. An I/O
    /// error from `f` closes it, so the next operation starts from a fresh open (redb answers
    /// nothing but `PreviousIo` after one).
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        let mut guard = self.shared.db.read().expect("store db lock");
        if guard.is_none() {
            drop(guard);
            {
                let mut slot = self.shared.db.write().expect("store db lock");
                if slot.is_none() {
                    let (db, _) = open_db(&self.shared.path)?;
                    tracing::info!(path = %self.shared.path.display(), "store reopened after an I/O error");
                    *slot = Some(db);
                }
            }
            guard = self.shared.db.read().expect("store db lock");
        }
        let db = guard.as_ref().ok_or_else(|| unavailable("store closed"))?;
        let out = f(db);
        drop(guard);
        if let Err(StoreError::Unavailable(e)) = &out {
            tracing::warn!(error = %e, "store I/O failed; it is reopened on the next operation");
            *self.shared.db.write().expect("store db lock") = None;
        }
        out
    }

    pub fn revision(&self) -> i64 {
        self.shared.log.lock().expect("store log lock").revision
    }

    fn get_blocking(&self, key: &str) -> Result<Option<KeyValue>> {
        self.with_db(|db| {
            let rtx = db.begin_read().map_err(failed)?;
            let table = rtx.open_table(KV).map_err(failed)?;
            match table.get(key).map_err(failed)? {
                Some(raw) => Ok(Some(decode(key, raw.value())?)),
                None => Ok(None),
            }
        })
    }

    fn list_blocking(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        self.with_db(|db| {
            let rtx = db.begin_read().map_err(failed)?;
            let table = rtx.open_table(KV).map_err(failed)?;
            let meta = rtx.open_table(META).map_err(failed)?;
            let revision = meta.get(REVISION).map_err(failed)?.map(|g| g.value()).unwrap_or(0);
            let mut out = Vec::new();
            for entry in table.range(prefix..).map_err(failed)? {
                let (k, v) = entry.map_err(failed)?;
                let key = k.value();
                if !key.starts_with(prefix) {
                    break;
                }
                out.push(decode(key, v.value())?);
            }
            Ok((out, revision))
        })
    }

    fn txn_blocking(&self, txn: Txn) -> Result<TxnOutcome> {
        let mut log = self.shared.log.lock().expect("store log lock");
        self.with_db(|db| Self::commit(db, &mut log, &self.shared.tx, txn))
    }

    fn commit(db: &Database, log: &mut Log, tx: &broadcast::Sender<Batch>, txn: Txn) -> Result<TxnOutcome> {
        let wtx = db.begin_write().map_err(failed)?;
        // A commit that reported an I/O error may still have landed; its revision is not
        // reused.
        let stored = wtx.open_table(META).map_err(failed)?.get(REVISION).map_err(failed)?.map(|g| g.value()).unwrap_or(0);
        if stored > log.revision {
            tracing::warn!(stored, known = log.revision, "a commit that reported an error was stored; watchers start over");
            log.revision = stored;
            log.horizon = stored + 1;
        }
        let revision = log.revision + 1;
        let mut events = Vec::new();
        let mut prevs = Vec::new();
        let mut deleted = 0;
        {
            let mut table = wtx.open_table(KV).map_err(failed)?;
            for Compare { key, mod_revision } in &txn.compares {
                let current = match table.get(key.as_str()).map_err(failed)? {
                    Some(raw) => decode(key, raw.value())?.mod_revision,
                    None => 0,
                };
                if current != *mod_revision {
                    // Dropping the write transaction aborts it.
                    return Ok(TxnOutcome::Conflict);
                }
            }
            for op in &txn.ops {
                match op {
                    Op::Put { key, value } => {
                        let prev = match table.get(key.as_str()).map_err(failed)? {
                            Some(raw) => Some(decode(key, raw.value())?),
                            None => None,
                        };
                        let create = prev.as_ref().map_or(revision, |p| p.create_revision);
                        table
                            .insert(key.as_str(), encode(create, revision, value).as_slice())
                            .map_err(failed)?;
                        events.push(Event {
                            kind: EventKind::Put,
                            kv: KeyValue {
                                key: key.clone(),
                                value: value.clone(),
                                create_revision: create,
                                mod_revision: revision,
                            },
                        });
                        prevs.push(prev);
                    }
                    Op::Delete { key } => {
                        let prev = match table.remove(key.as_str()).map_err(failed)? {
                            Some(raw) => Some(decode(key, raw.value())?),
                            None => None,
                        };
                        if let Some(p) = &prev {
                            deleted += 1;
                            events.push(delete_event(p, revision));
                        }
                        prevs.push(prev);
                    }
                    Op::DeletePrefix { prefix } => {
                        let mut keys = Vec::new();
                        for entry in table.range(prefix.as_str()..).map_err(failed)? {
                            let (k, v) = entry.map_err(failed)?;
                            if !k.value().starts_with(prefix.as_str()) {
                                break;
                            }
                            keys.push(decode(k.value(), v.value())?);
                        }
                        for p in keys {
                            table.remove(p.key.as_str()).map_err(failed)?;
                            deleted += 1;
                            events.push(delete_event(&p, revision));
                        }
                        prevs.push(None);
                    }
                }
            }
            if events.is_empty() {
                // Nothing changed (e.g. deleting an absent key): no new revision, like etcd.
                return Ok(TxnOutcome::Committed { revision: log.revision, prev: prevs, deleted });
            }
            let mut meta = wtx.open_table(META).map_err(failed)?;
            meta.insert(REVISION, revision).map_err(failed)?;
        }
        wtx.commit().map_err(failed)?;
        log.revision = revision;
        let batch: Batch = Arc::new((revision, events));
        log.recent.push_back(batch.clone());
        if log.recent.len() > HISTORY
            && let Some(old) = log.recent.pop_front() {
                log.horizon = old.0 + 1;
            }
        // No receivers is fine: nobody is watching yet.
        let _ = tx.send(batch);
        Ok(TxnOutcome::Committed { revision, prev: prevs, deleted })
    }
}

fn delete_event(prev: &KeyValue, revision: i64) -> Event {
    Event {
        kind: EventKind::Delete,
        kv: KeyValue {
            key: prev.key.clone(),
            value: Bytes::new(),
            create_revision: prev.create_revision,
            mod_revision: revision,
        },
    }
}

fn filtered(batch: &Batch, prefix: &str) -> Option<WatchMessage> {
    let events: Vec<Event> = batch.1.iter().filter(|e| e.kv.key.starts_with(prefix)).cloned().collect();
    (!events.is_empty()).then(|| WatchMessage::Events { revision: batch.0, events })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| unavailable(format!("store task failed: {e}")))?
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.get_blocking(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        let (this, prefix) = (self.clone(), prefix.to_string());
        blocking(move || this.list_blocking(&prefix)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        let this = self.clone();
        blocking(move || this.txn_blocking(txn)).await
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<mpsc::Receiver<WatchMessage>> {
        let (out, rx) = mpsc::channel(256);
        let prefix = prefix.to_string();
        // Under the log lock: take the backlog and subscribe at the same instant, so no
        // transaction falls between them.
        let (backlog, live, compacted) = {
            let log = self.shared.log.lock().expect("store log lock");
            let compacted = from_revision < log.horizon && from_revision <= log.revision;
            let backlog: Vec<Batch> = log.recent.iter().filter(|b| b.0 >= from_revision).cloned().collect();
            (backlog, self.shared.tx.subscribe(), compacted)
        };
        tokio::spawn(async move {
            if compacted {
                let _ = out.send(WatchMessage::Compacted).await;
                return;
            }
            let mut next = from_revision;
            for batch in backlog {
                next = batch.0 + 1;
                if let Some(msg) = filtered(&batch, &prefix)
                    && out.send(msg).await.is_err() {
                        return;
                    }
            }
            crate::forward(live, out, prefix, next).await;
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[tokio::test]
    async fn revisions_and_cas() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let (r1, prev) = s.put("/a/1", b("x")).await.unwrap();
        assert_eq!((r1, prev), (1, None));
        let (r2, prev) = s.put("/a/1", b("y")).await.unwrap();
        assert_eq!(r2, 2);
        assert_eq!(prev.unwrap().value, b("x"));
        let kv = s.get("/a/1").await.unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.value), (1, 2, b("y")));

        let stale = Txn {
            compares: vec![Compare { key: "/a/1".into(), mod_revision: 1 }],
            ops: vec![Op::Put { key: "/a/1".into(), value: b("z") }],
        };
        assert_eq!(s.txn(stale).await.unwrap(), TxnOutcome::Conflict);
        let create_only = Txn {
            compares: vec![Compare { key: "/a/2".into(), mod_revision: 0 }],
            ops: vec![Op::Put { key: "/a/2".into(), value: b("n") }],
        };
        assert!(matches!(s.txn(create_only.clone()).await.unwrap(), TxnOutcome::Committed { revision: 3, .. }));
        assert_eq!(s.txn(create_only).await.unwrap(), TxnOutcome::Conflict);

        s.put("/b/1", b("other")).await.unwrap();
        let (list, rev) = s.list("/a/").await.unwrap();
        assert_eq!(rev, 4);
        assert_eq!(list.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(), ["/a/1", "/a/2"]);

        assert!(s.delete("/a/missing").await.unwrap().is_none());
        assert_eq!(s.revision(), 4, "deleting nothing is not a revision");
        let out = s.txn(Txn { compares: vec![], ops: vec![Op::DeletePrefix { prefix: "/a/".into() }] }).await;
        assert!(matches!(out.unwrap(), TxnOutcome::Committed { revision: 5, deleted: 2, .. }));
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            s.put("/k", b("v")).await.unwrap();
            s.put("/k", b("w")).await.unwrap();
        }
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.revision(), 2);
        assert_eq!(s.get("/k").await.unwrap().unwrap().value, b("w"));
        // History is not kept across restarts: watching the past is compacted.
        let mut w = s.watch("/", 1).await.unwrap();
        assert_eq!(w.recv().await, Some(WatchMessage::Compacted));
    }

    /// A tmpfs of 4 MiB, unmounted when dropped.
    struct SmallDisk {
        dir: tempfile::TempDir,
    }

    impl SmallDisk {
        fn mount() -> SmallDisk {
            let dir = tempfile::tempdir().unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "mounting a tmpfs needs root (the tests run as root in CI)");
            SmallDisk { dir }
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
        }
    }

    #[tokio::test]
    async fn recovers_once_a_full_disk_has_room_again() {
        let disk = SmallDisk::mount();
        let s = EmbeddedStore::open(&disk.dir.path().join("store")).unwrap();
        s.put("/k/before", b("kept")).await.unwrap();

        // Fill the disk, then write until the store fails.
        let filler = disk.dir.path().join("filler");
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&filler).unwrap();
            let chunk = vec![0u8; 64 * 1024];
            while f.write_all(&chunk).is_ok() {}
            let _ = f.sync_all();
        }
        let big = Bytes::from(vec![b'x'; 256 * 1024]);
        let mut failed = false;
        for i in 0..64 {
            if s.put(&format!("/k/big{i}"), big.clone()).await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "a full disk fails a write");

        // Room again: the next writes succeed without a restart, and nothing acknowledged is lost.
        std::fs::remove_file(&filler).unwrap();
        let (rev, _) = s.put("/k/after", b("back")).await.expect("the store recovers by itself");
        assert_eq!(s.get("/k/after").await.unwrap().unwrap().value, b("back"));
        assert_eq!(s.get("/k/before").await.unwrap().unwrap().value, b("kept"));
        let (_, listed_at) = s.list("/k/").await.unwrap();
        assert_eq!(listed_at, rev);
        assert_eq!(s.revision(), rev);
    }

    /// A watch whose receiver goes away stops following the store at once, even where nothing
    /// more is ever written under its prefix.
    #[tokio::test]
    async fn a_dropped_watch_stops_following_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let before = s.shared.tx.receiver_count();
        let w = s.watch("/quiet/", 1).await.unwrap();
        assert_eq!(s.shared.tx.receiver_count(), before + 1);
        drop(w);
        s.put("/elsewhere", b("x")).await.unwrap();
        for _ in 0..200 {
            if s.shared.tx.receiver_count() == before {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("the watch still follows the store");
    }

    #[tokio::test]
    async fn watch_replays_then_follows() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.put("/r/1", b("a")).await.unwrap();
        s.put("/x/1", b("ignored")).await.unwrap();
        let mut w = s.watch("/r/", 1).await.unwrap();
        s.delete("/r/1").await.unwrap();
        let Some(WatchMessage::Events { revision: 1, events }) = w.recv().await else { panic!("replay") };
        assert_eq!(events[0].kind, EventKind::Put);
        let Some(WatchMessage::Events { revision: 3, events }) = w.recv().await else { panic!("live") };
        assert_eq!(events[0].kind, EventKind::Delete);
        assert_eq!(events[0].kv.key, "/r/1");
        // A watch from the next revision sees only what comes after.
        let mut w2 = s.watch("/r/", 4).await.unwrap();
        s.put("/r/2", b("b")).await.unwrap();
        let Some(WatchMessage::Events { revision: 4, .. }) = w2.recv().await else { panic!("next") };
    }
}
