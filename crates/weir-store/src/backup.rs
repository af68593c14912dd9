//! Backups: every object under a key prefix, values exactly as stored (private keys and other
//! sealed fields stay sealed, so a backup is only as secret as the keyring kept apart from it).
//!
//! ```json
//! {"weir_backup": 1, "prefix": "/apisix", "revision": 42,
//!  "objects": {"routes/1": {...}, "consumers/ann/credentials/c1": {...}}}
//! ```
//!
//! Keys are relative to the prefix, so a backup restores under another prefix too.

use serde_json::{Map, Value};

use crate::{Op, Store, StoreError, Txn, TxnOutcome};

pub const FORMAT: u64 = 1;

/// Reads every object under `prefix` at one revision (a single `list`, so the backup is a
/// consistent snapshot).
pub async fn export(store: &dyn Store, prefix: &str) -> crate::Result<Value> {
    let (kvs, revision) = store.list(&format!("{prefix}/")).await?;
    let mut objects = Map::new();
    for kv in kvs {
        let value: Value = serde_json::from_slice(&kv.value)
            .map_err(|e| StoreError::Corrupt(format!("{}: not JSON: {e}", kv.key)))?;
        let key = kv.key.strip_prefix(prefix).and_then(|k| k.strip_prefix('/')).unwrap_or(&kv.key);
        objects.insert(key.to_string(), value);
    }
    Ok(serde_json::json!({"weir_backup": FORMAT, "prefix": prefix, "revision": revision, "objects": objects}))
}

/// Replaces everything under `prefix` with the objects of `backup`, in one transaction.
/// Returns how many objects were written.
pub async fn restore(store: &dyn Store, prefix: &str, backup: &Value) -> Result<usize, String> {
    let ops = restore_ops(prefix, backup)?;
    let count = ops.len() - 1;
    match store.txn(Txn { compares: Vec::new(), ops }).await.map_err(|e| e.to_string())? {
        TxnOutcome::Committed { .. } => Ok(count),
        TxnOutcome::Conflict => Err("the store refused the transaction".into()),
    }
}

/// The operations of a restore: delete the prefix, then put every object. Checks the whole
/// document first; a bad one yields no operation.
pub fn restore_ops(prefix: &str, backup: &Value) -> Result<Vec<Op>, String> {
    match backup.get("weir_backup").and_then(Value::as_u64) {
        Some(FORMAT) => {}
        Some(v) => return Err(format!("backup format {v} is not one this version reads ({FORMAT})")),
        None => return Err("not a Weir backup (no \"weir_backup\" field); `weir dump` writes one".into()),
    }
    let objects = backup.get("objects").and_then(Value::as_object).ok_or("backup: \"objects\" must be an object")?;
    let mut ops = vec![Op::DeletePrefix { prefix: format!("{prefix}/") }];
    for (key, value) in objects {
        if key.is_empty() || key.starts_with('/') || key.split('/').any(|s| s.is_empty() || s == "..") {
            return Err(format!("backup: bad key {key:?}"));
        }
        if !value.is_object() {
            return Err(format!("backup: {key}: an object is expected"));
        }
        ops.push(Op::Put { key: format!("{prefix}/{key}"), value: serde_json::to_vec(value).expect("JSON serializes").into() });
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmbeddedStore;

    #[tokio::test]
    async fn round_trip_under_another_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.put("/apisix/routes/1", br#"{"id":"1","uri":"/a"}"#.as_slice().into()).await.unwrap();
        s.put("/apisix/consumers/ann/credentials/c", br#"{"id":"c","plugins":{}}"#.as_slice().into()).await.unwrap();
        s.put("/other/routes/9", br#"{"id":"9"}"#.as_slice().into()).await.unwrap();
        let doc = export(&s, "/apisix").await.unwrap();
        assert_eq!(doc["objects"].as_object().unwrap().len(), 2);
        assert_eq!(doc["objects"]["consumers/ann/credentials/c"]["id"], "c");

        s.put("/gw/routes/stale", br#"{"id":"stale"}"#.as_slice().into()).await.unwrap();
        assert_eq!(restore(&s, "/gw", &doc).await.unwrap(), 2);
        let (kvs, _) = s.list("/gw/").await.unwrap();
        let keys: Vec<&str> = kvs.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(keys, ["/gw/consumers/ann/credentials/c", "/gw/routes/1"], "what was there before is gone");

        let bad = serde_json::json!({"weir_backup": 1, "objects": {"../x": {}}});
        assert!(restore(&s, "/gw", &bad).await.unwrap_err().contains("bad key"));
        assert!(restore(&s, "/gw", &serde_json::json!({"routes": []})).await.unwrap_err().contains("not a Weir backup"));
        assert_eq!(s.list("/gw/").await.unwrap().0.len(), 2, "a refused backup changes nothing");
    }
}
