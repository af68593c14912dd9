//! Gateway documents in the store, read and changed by compare-and-set, so the API's writes and
//! the reconciler's never overwrite each other.

use bytes::Bytes;
use weir_store::{Compare, KeyValue, Op, SharedStore, StoreError, Txn, TxnOutcome};

use crate::model::Gateway;

pub struct Docs {
    pub store: SharedStore,
    /// `{prefix}/platform/gateways/`.
    pub dir: String,
}

/// Why a change was not made.
#[derive(Debug)]
pub enum Refused<E> {
    /// The change itself said no.
    By(E),
    /// The store failed.
    Store(StoreError),
    /// The gateway is not there.
    Missing,
}

impl<E> From<StoreError> for Refused<E> {
    fn from(e: StoreError) -> Self {
        Refused::Store(e)
    }
}

impl Docs {
    pub fn key(&self, gid: &str) -> String {
        format!("{}{gid}", self.dir)
    }

    fn decode(kv: &KeyValue) -> Result<Gateway, StoreError> {
        serde_json::from_slice(&kv.value).map_err(|e| StoreError::Corrupt(format!("{}: {e}", kv.key)))
    }

    pub async fn get(&self, gid: &str) -> Result<Option<(Gateway, i64)>, StoreError> {
        match self.store.get(&self.key(gid)).await? {
            Some(kv) => Ok(Some((Self::decode(&kv)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Every gateway, by id. One that cannot be read is logged and left out.
    pub async fn list(&self) -> Result<Vec<(Gateway, i64)>, StoreError> {
        let (kvs, _) = self.store.list(&self.dir).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| match Self::decode(kv) {
                Ok(g) => Some((g, kv.mod_revision)),
                Err(e) => {
                    tracing::warn!(error = %e, "a gateway document cannot be read; skipped");
                    None
                }
            })
            .collect())
    }

    /// Writes a new gateway; `false` when its id is taken.
    pub async fn create(&self, gw: &Gateway) -> Result<bool, StoreError> {
        let key = self.key(&gw.gateway_id);
        let txn = Txn { compares: vec![Compare { key: key.clone(), mod_revision: 0 }], ops: vec![Op::Put { key, value: encode(gw) }] };
        Ok(matches!(self.store.txn(txn).await?, TxnOutcome::Committed { .. }))
    }

    /// Applies `change` to the stored gateway until it commits on the version it read; the
    /// gateway as written, and the revision it was written at.
    pub async fn update<E>(&self, gid: &str, mut change: impl FnMut(&mut Gateway) -> Result<(), E>) -> Result<(Gateway, i64), Refused<E>> {
        loop {
            let Some((mut gw, rev)) = self.get(gid).await? else { return Err(Refused::Missing) };
            change(&mut gw).map_err(Refused::By)?;
            let key = self.key(gid);
            let txn = Txn { compares: vec![Compare { key: key.clone(), mod_revision: rev }], ops: vec![Op::Put { key, value: encode(&gw) }] };
            if let TxnOutcome::Committed { revision, .. } = self.store.txn(txn).await? {
                return Ok((gw, revision));
            }
        }
    }

    /// Removes the gateway's document if it is still at `rev`.
    pub async fn remove(&self, gid: &str, rev: i64) -> Result<bool, StoreError> {
        let key = self.key(gid);
        let txn = Txn { compares: vec![Compare { key: key.clone(), mod_revision: rev }], ops: vec![Op::Delete { key }] };
        Ok(matches!(self.store.txn(txn).await?, TxnOutcome::Committed { .. }))
    }
}

pub fn encode(gw: &Gateway) -> Bytes {
    Bytes::from(serde_json::to_vec(gw).expect("a gateway serializes"))
}
