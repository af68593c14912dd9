//! A store whose writes return once this node serves them.
//!
//! On a node that runs the Admin API and the data plane together, a client that writes a route
//! and sends traffic at once expects the route to be there. The data plane follows the store by
//! watching it, a few milliseconds behind; [`Settled`] closes that gap by holding each write's
//! answer until the node's data plane reports the write's revision applied, or until a bound
//! passes (the write is committed either way; only the answer waits).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use crate::{KeyValue, Op, Result, SharedStore, Store, Txn, TxnOutcome, WatchMessage};

pub struct Settled {
    inner: SharedStore,
    /// The directory the data plane follows: writes elsewhere never show up in its revision.
    dir: String,
    /// The newest revision the data plane serves.
    applied: watch::Receiver<i64>,
    bound: Duration,
}

impl Settled {
    pub fn new(inner: SharedStore, dir: String, applied: watch::Receiver<i64>, bound: Duration) -> Arc<Self> {
        Arc::new(Settled { inner, dir, applied, bound })
    }

    /// Whether op `i`, as committed, changed a key under the followed directory, so that a
    /// watch message for its revision is on its way.
    fn follows(&self, op: &Op, prev: Option<&Option<KeyValue>>, deleted: usize) -> bool {
        match op {
            Op::Put { key, .. } => key.starts_with(&self.dir),
            Op::Delete { key } => key.starts_with(&self.dir) && prev.is_some_and(Option::is_some),
            Op::DeletePrefix { prefix } => deleted > 0 && (prefix.starts_with(&self.dir) || self.dir.starts_with(prefix.as_str())),
        }
    }

    async fn until_applied(&self, revision: i64) {
        let mut applied = self.applied.clone();
        let reached = tokio::time::timeout(self.bound, applied.wait_for(|r| *r >= revision)).await;
        if reached.is_err() {
            tracing::debug!(revision, bound = ?self.bound, "a write is answered before this node serves it");
        }
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
        // What each op was, for after the commit; the values go to the store as they are.
        let ops: Vec<Op> = txn.ops.iter().map(|op| match op {
            Op::Put { key, .. } => Op::Put { key: key.clone(), value: bytes::Bytes::new() },
            other => other.clone(),
        }).collect();
        let outcome = self.inner.txn(txn).await?;
        if let TxnOutcome::Committed { revision, prev, deleted } = &outcome
            && ops.iter().enumerate().any(|(i, op)| self.follows(op, prev.get(i), *deleted))
        {
            self.until_applied(*revision).await;
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

    #[tokio::test(start_paused = true)]
    async fn a_write_is_answered_once_applied_or_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let inner: SharedStore = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let (tx, rx) = watch::channel(0);
        let store = Settled::new(inner, "/apisix/".into(), rx, Duration::from_secs(1));

        // Nothing applies it: the answer comes at the bound, and the write is kept.
        let started = tokio::time::Instant::now();
        let TxnOutcome::Committed { revision, .. } = store.txn(put("/apisix/routes/1")).await.unwrap() else { panic!("committed") };
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert!(store.get("/apisix/routes/1").await.unwrap().is_some());

        // Applied a moment later: answered then.
        let started = tokio::time::Instant::now();
        let applier = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            tx.send_replace(revision + 1);
            tx
        });
        store.txn(put("/apisix/routes/2")).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(30));
        let tx = applier.await.unwrap();

        // Writes the data plane does not follow, and deletes of nothing, are answered at once.
        let started = tokio::time::Instant::now();
        store.txn(put("/elsewhere/x")).await.unwrap();
        store.txn(Txn { compares: Vec::new(), ops: vec![Op::Delete { key: "/apisix/routes/none".into() }] }).await.unwrap();
        store.txn(Txn { compares: Vec::new(), ops: vec![Op::DeletePrefix { prefix: "/apisix/none/".into() }] }).await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        drop(tx);
    }
}
