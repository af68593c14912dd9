//! Gateway documents in the store, read and changed by compare-and-set, so the API's writes and
//! the reconciler's never overwrite each other.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value};
use weir_catalog::PluginSlot;
use weir_core::schema::PluginCatalog;
use weir_store::{Compare, KeyValue, Op, SharedStore, StoreError, Txn, TxnOutcome};
use weir_tls::Keyring;

use crate::model::Gateway;

/// Gateway documents in the store. Their plugin layers' secret fields (`encrypt_fields`) are
/// sealed with the keyring as they are written and opened as they are read, as the Admin API
/// does for its objects: callers see them plain, the store never does.
pub struct Docs {
    pub store: SharedStore,
    /// `{prefix}/platform/gateways/`.
    pub dir: String,
    pub keyring: Arc<Keyring>,
    pub plugins: Arc<dyn PluginCatalog>,
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

    /// A plugin layer as stored: its secret fields sealed.
    pub fn seal_layer(&self, layer: &Map<String, Value>) -> Map<String, Value> {
        let mut holder = holder(&mut layer.clone());
        weir_catalog::sealing::seal(&self.keyring, self.plugins.as_ref(), PluginSlot::Route, &mut holder);
        unhold(holder)
    }

    /// Opens a stored plugin layer's sealed fields, in place.
    pub fn open_layer(&self, layer: &mut Map<String, Value>) -> Result<(), String> {
        let mut holder = holder(layer);
        let opened = weir_catalog::sealing::open(&self.keyring, PluginSlot::Route, &mut holder);
        *layer = unhold(holder);
        opened
    }

    pub fn decode(&self, kv: &KeyValue) -> Result<Gateway, StoreError> {
        let mut gw: Gateway = serde_json::from_slice(&kv.value).map_err(|e| StoreError::Corrupt(format!("{}: {e}", kv.key)))?;
        for layer in layers(&mut gw) {
            self.open_layer(layer).map_err(|e| StoreError::Corrupt(format!("{}: {e}", kv.key)))?;
        }
        for var in gw.env.iter_mut().filter(|v| v.secret) {
            var.value = self.keyring.open_field(&var.value).map_err(|e| StoreError::Corrupt(format!("{}: env {}: {e}", kv.key, var.name)))?.into_owned();
        }
        Ok(gw)
    }

    /// The gateway as stored: its layers' secret fields sealed.
    pub fn encode(&self, gw: &Gateway) -> Bytes {
        let mut gw = gw.clone();
        for layer in layers(&mut gw) {
            *layer = self.seal_layer(layer);
        }
        for var in gw.env.iter_mut().filter(|v| v.secret) {
            var.value = self.keyring.seal_field(&var.value);
        }
        Bytes::from(serde_json::to_vec(&gw).expect("a gateway serializes"))
    }

    pub async fn get(&self, gid: &str) -> Result<Option<(Gateway, i64)>, StoreError> {
        match self.store.get(&self.key(gid)).await? {
            Some(kv) => Ok(Some((self.decode(&kv)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// The gateways whose ids `keep` takes, and the store revision they were read at. One that
    /// cannot be read is logged and left out.
    pub async fn list(&self, keep: impl Fn(&str) -> bool) -> Result<(Vec<(Gateway, i64)>, i64), StoreError> {
        let (kvs, revision) = self.store.list(&self.dir).await?;
        let gateways = kvs
            .iter()
            // Only the gateways asked for are decoded (and their secrets opened).
            .filter(|kv| keep(kv.key.strip_prefix(&self.dir).unwrap_or_default()))
            .filter_map(|kv| match self.decode(kv) {
                Ok(g) => Some((g, kv.mod_revision)),
                Err(e) => {
                    tracing::warn!(error = %e, "a gateway document cannot be read; skipped");
                    None
                }
            })
            .collect();
        Ok((gateways, revision))
    }

    /// Applies `change` to the stored gateway until it commits on the version it read; the
    /// gateway as written, and the revision it was written at.
    pub async fn update<E>(&self, gid: &str, mut change: impl FnMut(&mut Gateway) -> Result<(), E>) -> Result<(Gateway, i64), Refused<E>> {
        loop {
            let Some((mut gw, rev)) = self.get(gid).await? else { return Err(Refused::Missing) };
            change(&mut gw).map_err(Refused::By)?;
            let key = self.key(gid);
            let txn = Txn { compares: vec![Compare { key: key.clone(), mod_revision: rev }], ops: vec![Op::Put { key, value: self.encode(&gw) }] };
            if let TxnOutcome::Committed { revision, .. } = self.store.txn(txn).await? {
                return Ok((gw, revision));
            }
        }
    }

    /// Removes the gateway's document if it is still at `rev`, with `also` (its domain claims).
    pub async fn remove(&self, gid: &str, rev: i64, also: Vec<Op>) -> Result<bool, StoreError> {
        let key = self.key(gid);
        let mut ops = vec![Op::Delete { key: key.clone() }];
        ops.extend(also);
        let txn = Txn { compares: vec![Compare { key, mod_revision: rev }], ops };
        Ok(matches!(self.store.txn(txn).await?, TxnOutcome::Committed { .. }))
    }
}

/// Every plugin layer of a gateway.
fn layers(gw: &mut Gateway) -> Vec<&mut Map<String, Value>> {
    let mut out = vec![&mut gw.plugins];
    out.extend(gw.environments.iter_mut().map(|e| &mut e.plugins));
    out
}

/// A layer as the sealing functions take it: an object holding `plugins`.
fn holder(layer: &mut Map<String, Value>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("plugins".into(), Value::Object(std::mem::take(layer)));
    m
}

fn unhold(mut holder: Map<String, Value>) -> Map<String, Value> {
    match holder.remove("plugins") {
        Some(Value::Object(p)) => p,
        _ => Map::new(),
    }
}
