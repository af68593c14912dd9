//! The configuration store: keys with revisions, compare-and-set transactions and a watch
//! stream, shaped after etcd's v3 API so that etcd can stand behind the same trait.
//!
//! Every successful write bumps one global revision. Each key remembers the revision that
//! created it and the one that last modified it. A watcher asks for every change from a
//! revision on; if the store no longer remembers that far back it says [`WatchMessage::Compacted`]
//! and the watcher lists again.

pub mod backup;
mod embedded;
mod etcd;
mod file;
pub mod settled;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdOptions, EtcdStore};
pub use file::{FileStore, Objects, load as load_file};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    pub create_revision: i64,
    pub mod_revision: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// A change to one key. For a delete, `kv.value` is empty and `kv.mod_revision` is the revision
/// of the delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchMessage {
    /// The changes one transaction made, in commit order.
    Events { revision: i64, events: Vec<Event> },
    /// Changes were lost between the watcher and the store: list again and watch from there.
    Compacted,
}

/// A condition a transaction checks before it writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    /// The key's expected `mod_revision`; `0` means the key must not exist.
    pub mod_revision: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Bytes },
    Delete { key: String },
    DeletePrefix { prefix: String },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// The compares held and every op was applied at `revision`. `prev` holds, per op, the
    /// value the key had before (`None` for a prefix delete or an absent key).
    Committed { revision: i64, prev: Vec<Option<KeyValue>>, deleted: usize },
    /// A compare failed; nothing was written.
    Conflict,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// A write the store refuses for its size alone; nothing was written.
    #[error("the write is larger than the store takes in one request: {0}")]
    TooLarge(String),
}

impl weir_core::error::Kinded for StoreError {
    fn kind(&self) -> weir_core::error::ErrorKind {
        match self {
            StoreError::Unavailable(_) => weir_core::error::ErrorKind::Unavailable,
            StoreError::Corrupt(_) => weir_core::error::ErrorKind::Internal,
            StoreError::TooLarge(_) => weir_core::error::ErrorKind::BadInput,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A config store. Implementations: [`EmbeddedStore`] (redb, one file) and [`EtcdStore`]. The data plane only ever
/// calls `list` and `watch`; the Admin API writes with `txn`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Every key under `prefix`, sorted by key, and the store revision they were read at.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)>;

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome>;

    /// Changes under `prefix` from `from_revision` on (inclusive).
    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<mpsc::Receiver<WatchMessage>>;

    /// Unconditional put; returns the revision and the previous value.
    async fn put(&self, key: &str, value: Bytes) -> Result<(i64, Option<KeyValue>)> {
        let op = Op::Put { key: key.to_string(), value };
        match self.txn(Txn { compares: Vec::new(), ops: vec![op] }).await? {
            TxnOutcome::Committed { revision, mut prev, .. } => Ok((revision, prev.pop().flatten())),
            TxnOutcome::Conflict => unreachable!("a transaction with no compares cannot conflict"),
        }
    }

    /// Unconditional delete; returns the deleted value, if there was one.
    async fn delete(&self, key: &str) -> Result<Option<KeyValue>> {
        let op = Op::Delete { key: key.to_string() };
        match self.txn(Txn { compares: Vec::new(), ops: vec![op] }).await? {
            TxnOutcome::Committed { mut prev, .. } => Ok(prev.pop().flatten()),
            TxnOutcome::Conflict => unreachable!("a transaction with no compares cannot conflict"),
        }
    }
}

pub type SharedStore = Arc<dyn Store>;

/// One committed transaction as a store broadcasts it to its watchers.
pub(crate) type Batch = Arc<(i64, Vec<Event>)>;

/// Forwards broadcast transactions to one watcher: those from revision `next` on, with their
/// events under `prefix`. A watcher that falls behind the broadcast is told `Compacted`; one
/// that goes away ends the forwarding at once, whether or not anything was due to it.
pub(crate) async fn forward(mut live: tokio::sync::broadcast::Receiver<Batch>, out: mpsc::Sender<WatchMessage>, prefix: String, mut next: i64) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let got = tokio::select! {
            got = live.recv() => got,
            () = out.closed() => return,
        };
        match got {
            Ok(batch) if batch.0 < next => continue,
            Ok(batch) => {
                next = batch.0 + 1;
                let events: Vec<Event> = batch.1.iter().filter(|e| e.kv.key.starts_with(&prefix)).cloned().collect();
                if !events.is_empty() && out.send(WatchMessage::Events { revision: batch.0, events }).await.is_err() {
                    return;
                }
            }
            Err(RecvError::Lagged(_)) => {
                let _ = out.send(WatchMessage::Compacted).await;
                return;
            }
            Err(RecvError::Closed) => return,
        }
    }
}
