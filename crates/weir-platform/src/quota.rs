//! What a gateway's functions take in the store, bounded per gateway so that no tenant fills
//! the store (an etcd past its space quota refuses every tenant's writes) or the memory of the
//! nodes that hold every function parsed.
//!
//! One record per gateway, `{prefix}/platform/quota/{gid}`: how many functions it holds across
//! its environments, and the bytes of their stored documents with their histories. Every
//! transaction that publishes or deletes a function rewrites the record, guarded by its
//! revision, so the record is exact: two saves racing in one gateway serialize on it, and a
//! crash leaves both or neither. A gateway without a record (made before records were kept)
//! has one made from what it stores the first time a function changes. A change that grows
//! past a bound is refused (429) and changes nothing; one that shrinks is always taken, so
//! lowering a bound never locks a gateway's functions.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use weir_core::error::ErrorKind;
use weir_functions::live::partition_prefix;
use weir_store::{Compare, Op};

use crate::Platform;
use crate::api::{Reply, failure, store_down};

/// A gateway's functions, as its record counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Usage {
    pub functions: u64,
    pub bytes: u64,
}

/// A gateway's record as read: what it says, and the revision a write must find (0: none).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Held {
    usage: Usage,
    rev: i64,
}


/// What one write does to a gateway's record: functions it adds (1) or removes (-1), and the
/// bytes it writes and deletes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Delta {
    pub functions: i64,
    pub added: u64,
    pub removed: u64,
}

/// `usage` after `delta`, or why not: the bound it would pass.
pub(crate) fn change(usage: Usage, delta: Delta, max_functions: u64, max_bytes: u64) -> Result<Usage, String> {
    let next = Usage {
        functions: usage.functions.saturating_add_signed(delta.functions),
        bytes: (usage.bytes + delta.added).saturating_sub(delta.removed),
    };
    if next.functions > max_functions && next.functions > usage.functions {
        return Err(format!("this gateway holds {} functions and may hold at most {max_functions} (platform.functions.max_per_gateway)", usage.functions));
    }
    if next.bytes > max_bytes && next.bytes > usage.bytes {
        return Err(format!(
            "this gateway's functions and their histories would take {} bytes, past the {max_bytes} one gateway may (platform.functions.max_bytes_per_gateway)",
            next.bytes
        ));
    }
    Ok(next)
}

impl Platform {
    /// Gateway `gid`'s record, deleted with the gateway.
    pub(crate) fn quota_key(&self, gid: &str) -> String {
        format!("{}/platform/quota/{gid}", self.prefix)
    }

    /// Gateway `gid`'s record; made from what it stores when it has none.
    pub(crate) async fn held(&self, gid: &str) -> Result<Held, Reply> {
        let kv = self.docs.store.get(&self.quota_key(gid)).await.map_err(store_down)?;
        if let Some(kv) = &kv
            && let Ok(usage) = serde_json::from_slice::<Usage>(&kv.value)
        {
            return Ok(Held { usage, rev: kv.mod_revision });
        }
        let dir = format!("{}fn/", partition_prefix(&self.prefix, gid));
        let (docs, _) = self.docs.store.list(&dir).await.map_err(store_down)?;
        let (history, _) = self.docs.store.list(&self.lifecycle_prefixes(gid)[0]).await.map_err(store_down)?;
        let usage = Usage {
            functions: docs.len() as u64,
            bytes: docs.iter().chain(&history).map(|kv| kv.value.len() as u64).sum(),
        };
        Ok(Held { usage, rev: kv.map_or(0, |kv| kv.mod_revision) })
    }

    /// Reads gateway `gid`'s record and returns the compare and the write that carry `delta`
    /// into a transaction, or the refusal when it would pass a bound.
    pub(crate) async fn counted(&self, gid: &str, delta: Delta) -> Result<(Compare, Op), Reply> {
        let held = self.held(gid).await?;
        let f = &self.cfg.functions;
        let usage = change(held.usage, delta, f.max_per_gateway, f.max_bytes_per_gateway).map_err(|message| failure(ErrorKind::Quota, message, Vec::new()))?;
        let key = self.quota_key(gid);
        let value = Bytes::from(serde_json::to_vec(&usage).expect("a usage record serializes"));
        Ok((Compare { key: key.clone(), mod_revision: held.rev }, Op::Put { key, value }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use weir_functions::live::function_key;
    use weir_store::{Op, Txn, TxnOutcome};

    use super::{Delta, Usage, change};
    use crate::{Platform, PlatformConfig};

    #[tokio::test]
    async fn a_gateway_without_a_record_is_counted_from_what_it_stores_then_by_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = PlatformConfig::default();
        cfg.functions.max_per_gateway = 3;
        let store = Arc::new(weir_store::EmbeddedStore::open(dir.path()).unwrap());
        let keyring = Arc::new(weir_tls::Keyring::new(&["a secret for this test".to_string()]));
        let p = Platform::new(cfg, store, "/apisix", Arc::new(weir_catalog::Catalog::apisix()), Arc::new(weir_plugins::registry()), keyring);
        // Two functions, one with two versions in its history, and another gateway's function.
        let put = async |key: String, len: usize| p.docs.store.put(&key, Bytes::from(vec![b'x'; len])).await.unwrap();
        put(function_key("/apisix", "g", "dev", "a"), 100).await;
        put(function_key("/apisix", "g", "staging", "a"), 200).await;
        put(format!("/apisix/platform/history/g/dev/a/{:010}", 1), 30).await;
        put(format!("/apisix/platform/history/g/dev/a/{:010}", 2), 40).await;
        put(function_key("/apisix", "other", "dev", "a"), 5000).await;
        let held = p.held("g").await.unwrap();
        assert_eq!((held.usage, held.rev), (Usage { functions: 2, bytes: 370 }, 0));

        // The record is written with the change, and read from then on.
        let (compare, write) = p.counted("g", Delta { functions: 1, added: 10, removed: 0 }).await.unwrap();
        assert_eq!(compare.mod_revision, 0, "made only where no record is");
        assert!(matches!(p.docs.store.txn(Txn { compares: vec![compare.clone()], ops: vec![write.clone()] }).await, Ok(TxnOutcome::Committed { .. })));
        put(function_key("/apisix", "g", "dev", "uncounted"), 1).await;
        let held = p.held("g").await.unwrap();
        assert_eq!(held.usage, Usage { functions: 3, bytes: 380 }, "the record, not a count of the store");
        assert!(held.rev > 0);
        // The same change again would pass the bound: refused, as a quota.
        let refused = p.counted("g", Delta { functions: 1, added: 10, removed: 0 }).await.unwrap_err();
        assert_eq!(refused.status(), http::StatusCode::TOO_MANY_REQUESTS);
        // A transaction made against the old record loses to the one that wrote it.
        assert!(matches!(p.docs.store.txn(Txn { compares: vec![compare], ops: vec![write] }).await, Ok(TxnOutcome::Conflict)));
        let Op::Put { .. } = p.counted("g", Delta { functions: -1, added: 0, removed: 110 }).await.unwrap().1 else { panic!("a record is written") };
    }

    #[test]
    fn a_change_past_a_bound_is_refused_and_one_that_shrinks_is_always_taken() {
        let u = Usage { functions: 2, bytes: 100 };
        let d = |functions, added, removed| Delta { functions, added, removed };
        assert_eq!(change(u, d(1, 50, 0), 3, 150), Ok(Usage { functions: 3, bytes: 150 }));
        assert_eq!(change(u, d(0, 60, 10), 2, 150), Ok(Usage { functions: 2, bytes: 150 }));
        let many = change(u, d(1, 1, 0), 2, 1000).unwrap_err();
        assert!(many.contains("holds 2 functions and may hold at most 2") && many.contains("max_per_gateway"), "{many}");
        let big = change(u, d(0, 61, 10), 5, 150).unwrap_err();
        assert!(big.contains("151 bytes") && big.contains("max_bytes_per_gateway"), "{big}");
        // Over both bounds already (they were lowered): shrinking and deleting still go through.
        let over = Usage { functions: 10, bytes: 10_000 };
        assert_eq!(change(over, d(0, 400, 500), 2, 100), Ok(Usage { functions: 10, bytes: 9_900 }));
        assert_eq!(change(over, d(-1, 0, 500), 2, 100), Ok(Usage { functions: 9, bytes: 9_500 }));
        // Growing while over is refused even by a byte.
        assert!(change(over, d(0, 501, 500), 2, 100).is_err());
        // A record that says less than is deleted (made by an older release) stops at nothing.
        assert_eq!(change(Usage { functions: 0, bytes: 10 }, d(-1, 0, 50), 2, 100), Ok(Usage::default()));
    }
}
