//! Writes answered once this node serves them.
//!
//! On a node that runs the Admin API and the data plane together, a client that writes a route
//! and sends traffic at once expects the route to be there. The data plane follows the store by
//! watching it, a few milliseconds behind. A request handled within [`settle`] that writes
//! through a [`Settled`] store has its answer held until the node's data plane serves the
//! newest revision it wrote, or until a bound passes (the writes are committed either way; only
//! the answer waits). The wait comes after the handler is done, so no lock it took is held
//! meanwhile; writes outside a request (background work) never wait.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use crate::{KeyValue, Op, Result, SharedStore, Store, Txn, TxnOutcome, WatchMessage};

/// How long an answer waits for this node to serve its writes.
pub const BOUND: Duration = Duration::from_secs(1);

tokio::task_local! {
    /// What the request being handled wrote through a `Settled` store.
    static WRITTEN: RefCell<Written>;
}

/// The keys of one request's writes a wait names at most; past them, the wait is for the
/// whole config.
const KEYS_NAMED: usize = 64;

/// What a request wrote through a [`Settled`] store.
#[derive(Default)]
struct Written {
    /// The newest revision (0: none).
    revision: i64,
    /// The keys written under the followed directory; `None` once unknown (a prefix
    /// deleted, too many).
    keys: Option<Vec<String>>,
}

/// What this node's data plane serves, as writes wait for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Every change up to this revision is served.
    pub revision: i64,
    /// Every change up to this revision is served but those under `pending`.
    pub seen: i64,
    /// Key prefixes (partitions compiled off the watch path) whose changes from the revision
    /// given on are not served yet.
    pub pending: Arc<Vec<(String, i64)>>,
}

impl Applied {
    /// Whether the changes of a write at `revision` are served: every change up to it, or,
    /// where the keys it wrote are known, those keys' (none of them under a prefix whose
    /// changes up to `revision` are pending).
    pub fn serves(&self, revision: i64, keys: Option<&[String]>) -> bool {
        if self.revision >= revision {
            return true;
        }
        let Some(keys) = keys.filter(|_| self.seen >= revision) else { return false };
        !keys.iter().any(|k| self.pending.iter().any(|(prefix, since)| *since <= revision && k.starts_with(prefix.as_str())))
    }
}

/// Runs `work` (the handling of one request), then waits until `applied`, the revision this
/// node's data plane serves, reaches the newest revision `work` wrote through a [`Settled`]
/// store, or until `bound` passes.
pub async fn settle<T>(applied: &watch::Receiver<Applied>, bound: Duration, work: impl Future<Output = T>) -> T {
    settle_within(applied, bound, work).await.0
}

/// Runs `work` and answers, beside its output, the newest revision it wrote through a
/// [`Settled`] store (0: none), waiting for nothing.
pub async fn noting<T>(work: impl Future<Output = T>) -> (T, i64) {
    let (out, written) = noting_keys(work).await;
    (out, written.revision)
}

async fn noting_keys<T>(work: impl Future<Output = T>) -> (T, Written) {
    WRITTEN
        .scope(RefCell::new(Written { revision: 0, keys: Some(Vec::new()) }), async {
            let out = work.await;
            (out, WRITTEN.with(|w| std::mem::take(&mut *w.borrow_mut())))
        })
        .await
}

/// What [`settle_within`] saw of a piece of work's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    /// The newest revision it wrote through a [`Settled`] store (0: none).
    pub written: i64,
    /// Whether that revision was served within the bound (true where nothing was written).
    pub served: bool,
}

/// As [`settle`], with what `work` wrote and whether it was served within `bound`.
pub async fn settle_within<T>(applied: &watch::Receiver<Applied>, bound: Duration, work: impl Future<Output = T>) -> (T, Settlement) {
    let (out, Written { revision: written, keys }) = noting_keys(work).await;
    if written == 0 {
        return (out, Settlement { written, served: true });
    }
    let mut applied = applied.clone();
    let served = tokio::time::timeout(bound, applied.wait_for(|a| a.serves(written, keys.as_deref()))).await.is_ok_and(|r| r.is_ok());
    if !served {
        tracing::debug!(revision = written, ?bound, "a write is answered before this node serves it");
    }
    (out, Settlement { written, served })
}

/// A store that notes, for [`settle`], the revisions of the writes it commits under the
/// directory the data plane follows.
pub struct Settled {
    inner: SharedStore,
    /// The directory the data plane follows: writes elsewhere never show up in its revision.
    dir: String,
}

impl Settled {
    pub fn new(inner: SharedStore, dir: String) -> Arc<Self> {
        Arc::new(Settled { inner, dir })
    }

    /// Whether the committed transaction changed a key under the followed directory, so that a
    /// watch message for its revision is on its way. `prev` holds, per op, the value before.
    /// Prefix deletes are told apart only in sum (the transaction's count of deleted keys):
    /// one may be taken to have changed a followed key when it did not, which costs the
    /// answer the wait's bound, never a wait skipped.
    fn follows(&self, ops: &[Op], prev: &[Option<KeyValue>], deleted: usize) -> bool {
        // The keys the prefix deletes removed: all those deleted less those single deletes did.
        let singles = ops.iter().zip(prev).filter(|(op, p)| matches!(op, Op::Delete { .. }) && p.is_some()).count();
        let by_prefixes = deleted.saturating_sub(singles);
        ops.iter().zip(prev.iter().map(Option::is_some).chain(std::iter::repeat(false))).any(|(op, existed)| match op {
            Op::Put { key, .. } => key.starts_with(&self.dir),
            Op::Delete { key } => key.starts_with(&self.dir) && existed,
            Op::DeletePrefix { prefix } => by_prefixes > 0 && (prefix.starts_with(&self.dir) || self.dir.starts_with(prefix.as_str())),
        })
    }
}

#[async_trait]
impl Store for Settled {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        self.inner.list(prefix).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        // Only within a request's handling is there an answer to hold.
        if WRITTEN.try_with(|_| ()).is_err() {
            return self.inner.txn(txn).await;
        }
        // What each op was, for after the commit; the values go to the store as they are.
        let ops: Vec<Op> = txn.ops.iter().map(|op| match op {
            Op::Put { key, .. } => Op::Put { key: key.clone(), value: bytes::Bytes::new() },
            other => other.clone(),
        }).collect();
        let outcome = self.inner.txn(txn).await?;
        if let TxnOutcome::Committed { revision, prev, deleted } = &outcome
            && self.follows(&ops, prev, *deleted)
        {
            let _ = WRITTEN.try_with(|w| {
                let mut w = w.borrow_mut();
                w.revision = w.revision.max(*revision);
                for op in &ops {
                    match (op, &mut w.keys) {
                        // Plugin-wide settings reach every partition: the whole config waits.
                        (Op::Put { key, .. } | Op::Delete { key }, keys) if key.strip_prefix(&self.dir).is_some_and(|k| k.starts_with("plugin_metadata/")) => *keys = None,
                        (Op::Put { key, .. } | Op::Delete { key }, Some(keys)) if key.starts_with(&self.dir) => keys.push(key.clone()),
                        (Op::DeletePrefix { .. }, keys) => *keys = None,
                        _ => {}
                    }
                }
                if w.keys.as_ref().is_some_and(|k| k.len() > KEYS_NAMED) {
                    w.keys = None;
                }
            });
        }
        Ok(outcome)
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<mpsc::Receiver<WatchMessage>> {
        self.inner.watch(prefix, from_revision).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmbeddedStore;

    fn put(key: &str) -> Txn {
        Txn { compares: Vec::new(), ops: vec![Op::Put { key: key.into(), value: bytes::Bytes::from_static(b"{}") }] }
    }

    /// A `Settled` store over a fresh embedded one following `/apisix/`, and the applied
    /// state its waits read.
    fn settled_store() -> (tempfile::TempDir, Arc<Settled>, watch::Sender<Applied>, watch::Receiver<Applied>) {
        let dir = tempfile::tempdir().unwrap();
        let inner: SharedStore = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let store = Settled::new(inner, "/apisix/".into());
        let (tx, applied) = watch::channel(Applied::default());
        (dir, store, tx, applied)
    }

    #[test]
    fn a_write_is_served_once_every_change_to_it_is_or_its_keys_changes_are() {
        let a = Applied { revision: 10, seen: 20, pending: Arc::new(vec![("/x/p/".into(), 15)]) };
        let keys = |k: &str| Some(vec![k.to_string()]);
        assert!(a.serves(10, None));
        assert!(!a.serves(12, None), "keys unknown: every change up to it");
        assert!(a.serves(12, keys("/x/q/1").as_deref()));
        assert!(a.serves(16, keys("/x/q/1").as_deref()), "another prefix pending holds it not");
        assert!(!a.serves(16, keys("/x/p/1").as_deref()), "under a prefix pending since 15");
        assert!(a.serves(14, keys("/x/p/1").as_deref()), "written before the change pending there");
        assert!(!a.serves(21, keys("/x/q/1").as_deref()), "not seen yet");
    }

    /// The keys a request wrote are what its answer waits for, while the data plane has
    /// seen its revision: a prefix pending elsewhere holds it not.
    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_the_prefixes_it_wrote_under_only() {
        let (_dir, store, tx, applied) = settled_store();
        let bound = Duration::from_secs(1);
        let pending = |seen: i64| Applied { revision: 0, seen, pending: Arc::new(vec![("/apisix/slow/".into(), 1)]) };
        // Seen, with another prefix pending from the start: answered at once.
        tx.send_replace(pending(100));
        let started = tokio::time::Instant::now();
        let ((), settled) = settle_within(&applied, bound, async {
            store.txn(put("/apisix/fast/1")).await.unwrap();
        })
        .await;
        assert!(settled.served);
        assert_eq!(started.elapsed(), Duration::ZERO);
        // Under the pending prefix: answered once every change is served.
        let started = tokio::time::Instant::now();
        let applier = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(40)).await;
            tx.send_replace(Applied { revision: 100, seen: 100, pending: Arc::default() });
            tx
        });
        let ((), settled) = settle_within(&applied, bound, async {
            store.txn(put("/apisix/slow/1")).await.unwrap();
        })
        .await;
        assert!(settled.served);
        assert_eq!(started.elapsed(), Duration::from_millis(40));
        let tx = applier.await.unwrap();
        // Plugin-wide settings, which reach every partition, and a prefix deleted name no
        // keys: every change up to them.
        tx.send_replace(pending(200));
        let started = tokio::time::Instant::now();
        let ((), settled) = settle_within(&applied, bound, async {
            store.txn(put("/apisix/plugin_metadata/http-logger")).await.unwrap();
        })
        .await;
        assert!(!settled.served);
        assert_eq!(started.elapsed(), bound);
        let started = tokio::time::Instant::now();
        let ((), settled) = settle_within(&applied, bound, async {
            store.txn(put("/apisix/fast/2")).await.unwrap();
            store.txn(Txn { compares: Vec::new(), ops: vec![Op::DeletePrefix { prefix: "/apisix/fast/".into() }] }).await.unwrap();
        })
        .await;
        assert!(!settled.served);
        assert_eq!(started.elapsed(), bound);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_is_answered_once_its_writes_are_applied_or_at_the_bound() {
        let (_dir, store, tx, applied) = settled_store();
        let bound = Duration::from_secs(1);

        // Nothing applies it: the answer comes at the bound, and the write is kept.
        let started = tokio::time::Instant::now();
        let (revision, settled) = settle_within(&applied, bound, async {
            let TxnOutcome::Committed { revision, .. } = store.txn(put("/apisix/routes/1")).await.unwrap() else { panic!("committed") };
            revision
        })
        .await;
        assert_eq!((started.elapsed(), settled), (bound, Settlement { written: revision, served: false }));
        assert!(store.get("/apisix/routes/1").await.unwrap().is_some());

        // Two writes, the second applied a moment later: answered then, not at the first's.
        let started = tokio::time::Instant::now();
        let applier = tokio::spawn(async move {
            tx.send_replace(Applied { revision: revision + 1, ..Applied::default() });
            tokio::time::sleep(Duration::from_millis(30)).await;
            tx.send_replace(Applied { revision: revision + 2, ..Applied::default() });
            tx
        });
        let ((), settled) = settle_within(&applied, bound, async {
            store.txn(put("/apisix/routes/2")).await.unwrap();
            store.txn(put("/apisix/routes/3")).await.unwrap();
        })
        .await;
        assert_eq!((started.elapsed(), settled), (Duration::from_millis(30), Settlement { written: revision + 2, served: true }));
        let _tx = applier.await.unwrap();

        // Writes the data plane does not follow, deletes of nothing (beside a delete of
        // something elsewhere), and writes outside a request are answered at once.
        let started = tokio::time::Instant::now();
        store.txn(put("/elsewhere/x")).await.unwrap();
        settle(&applied, bound, async {
            store.txn(put("/elsewhere/y")).await.unwrap();
            store.txn(Txn { compares: Vec::new(), ops: vec![Op::Delete { key: "/apisix/routes/none".into() }] }).await.unwrap();
            let ops = vec![Op::Delete { key: "/elsewhere/x".into() }, Op::DeletePrefix { prefix: "/apisix/none/".into() }];
            let TxnOutcome::Committed { deleted: 1, .. } = store.txn(Txn { compares: Vec::new(), ops }).await.unwrap() else { panic!("one deleted") };
        })
        .await;
        store.txn(put("/apisix/routes/4")).await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
