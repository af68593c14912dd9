//! The store on etcd v3: keys and values as APISIX lays them out, revisions and transactions
//! as etcd keeps them, so an APISIX etcd and Weir can read each other's objects.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client as etcd;
use tokio::sync::mpsc;

use crate::{Compare, Event, EventKind, KeyValue, Op, Result, Store, StoreError, Txn, TxnOutcome, WatchMessage};

/// How to reach the cluster.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Per request (and per connection attempt).
    pub timeout: Duration,
    pub user: Option<(String, String)>,
}

/// The largest answer taken from etcd (a list of a whole prefix, a watch's batch, the values a
/// transaction replaced): etcd's own bound on what it sends, where the client's default
/// (4 MiB) would fail every list of a prefix that grew past it.
const MAX_ANSWER: usize = i32::MAX as usize;

pub struct EtcdStore {
    client: etcd::Client,
}

fn unavailable(e: etcd::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A failed write: one etcd refuses for its size (past its `--max-request-bytes`, or its gRPC
/// limit) says so, anything else is the store being unavailable.
fn write_failed(e: etcd::Error) -> StoreError {
    match &e {
        etcd::Error::GRpcStatus(s) if s.message().contains("request is too large") || s.message().contains("larger than max") => {
            StoreError::TooLarge(format!("{} (etcd takes at most its --max-request-bytes, 1.5 MiB unless configured, in one write)", s.message()))
        }
        _ => unavailable(e),
    }
}

fn kv(k: &etcd::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: Bytes::copy_from_slice(k.value()),
        create_revision: k.create_revision(),
        mod_revision: k.mod_revision(),
    }
}

impl EtcdStore {
    /// Connects (lazily: a cluster that is down now is retried on each call).
    pub async fn connect(opts: &EtcdOptions) -> Result<EtcdStore> {
        let mut o = etcd::ConnectOptions::new().with_timeout(opts.timeout).with_connect_timeout(opts.timeout);
        if let Some((u, p)) = &opts.user {
            o = o.with_user(u.clone(), p.clone());
        }
        let client = etcd::Client::connect(&opts.endpoints, Some(o)).await.map_err(unavailable)?;
        Ok(EtcdStore { client })
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self.client.kv_client().max_decoding_message_size(MAX_ANSWER).get(key, None).await.map_err(unavailable)?;
        Ok(resp.kvs().first().map(kv))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        let resp = self.client.kv_client().max_decoding_message_size(MAX_ANSWER).get(prefix, Some(etcd::GetOptions::new().with_prefix())).await.map_err(unavailable)?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok((resp.kvs().iter().map(kv).collect(), revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        let compares: Vec<etcd::Compare> = txn
            .compares
            .iter()
            .map(|Compare { key, mod_revision }| etcd::Compare::mod_revision(key.as_str(), etcd::CompareOp::Equal, *mod_revision))
            .collect();
        let ops: Vec<etcd::TxnOp> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => etcd::TxnOp::put(key.as_str(), value.to_vec(), Some(etcd::PutOptions::new().with_prev_key())),
                Op::Delete { key } => etcd::TxnOp::delete(key.as_str(), Some(etcd::DeleteOptions::new().with_prev_key())),
                Op::DeletePrefix { prefix } => etcd::TxnOp::delete(prefix.as_str(), Some(etcd::DeleteOptions::new().with_prefix())),
            })
            .collect();
        let resp = self.client.kv_client().max_decoding_message_size(MAX_ANSWER).txn(etcd::Txn::new().when(compares).and_then(ops)).await.map_err(write_failed)?;
        if !resp.succeeded() {
            return Ok(TxnOutcome::Conflict);
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut prev = Vec::new();
        let mut deleted = 0;
        for (op, r) in txn.ops.iter().zip(resp.op_responses()) {
            match r {
                etcd::TxnOpResponse::Put(p) => prev.push(p.prev_key().map(kv)),
                etcd::TxnOpResponse::Delete(d) => {
                    deleted += d.deleted() as usize;
                    let one = matches!(op, Op::Delete { .. });
                    prev.push(if one { d.prev_kvs().first().map(kv) } else { None });
                }
                _ => prev.push(None),
            }
        }
        Ok(TxnOutcome::Committed { revision, prev, deleted })
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<mpsc::Receiver<WatchMessage>> {
        let opts = etcd::WatchOptions::new().with_prefix().with_start_revision(from_revision);
        // The stream owns the watch: dropping it (when the follower goes away) cancels it.
        let mut stream = self.client.watch_client().max_decoding_message_size(MAX_ANSWER).watch(prefix, Some(opts)).await.map_err(unavailable)?;
        let (out, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                // A watcher that goes away cancels the watch at once, not at its next event.
                let message = tokio::select! {
                    m = stream.message() => m,
                    () = out.closed() => return,
                };
                let resp = match message {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        // A lost connection ends the watch; the follower lists again.
                        tracing::warn!(error = %e, "etcd watch ended");
                        return;
                    }
                };
                if resp.compact_revision() > 0 || resp.canceled() {
                    let _ = out.send(WatchMessage::Compacted).await;
                    return;
                }
                // One response may carry several transactions: one message per revision.
                let mut batch: Vec<Event> = Vec::new();
                let mut at = 0;
                for e in resp.events() {
                    let Some(k) = e.kv() else { continue };
                    let kind = match e.event_type() {
                        etcd::EventType::Put => EventKind::Put,
                        etcd::EventType::Delete => EventKind::Delete,
                    };
                    if k.mod_revision() != at && !batch.is_empty() {
                        let events = std::mem::take(&mut batch);
                        if out.send(WatchMessage::Events { revision: at, events }).await.is_err() {
                            return;
                        }
                    }
                    at = k.mod_revision();
                    batch.push(Event { kind, kv: kv(k) });
                }
                if !batch.is_empty() && out.send(WatchMessage::Events { revision: at, events: batch }).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}
