//! What a gateway's functions take in the store, bounded per gateway so that no tenant fills
//! the store (an etcd past its space quota refuses every tenant's writes) or the memory of the
//! nodes that hold every function parsed.
//!
//! One record per gateway, `{prefix}/platform/quota/{gid}`: how many functions it holds across
//! its environments and the bytes of their stored documents. Every transaction that publishes
//! or deletes a function rewrites the record, guarded by its revision, so the record is exact:
//! two saves racing in one gateway serialize on it, and a crash leaves both or neither. A
//! gateway without a record (made before records were kept) has one made from its stored
//! functions the first time one changes. A change that grows past a bound is refused (429)
//! and changes nothing; one that shrinks is always taken, so lowering a bound never locks a
//! gateway's functions. History keeps up to `platform.history_limit` earlier versions of each
//! function beside these.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use weir_core::error::ErrorKind;
use weir_functions::live::{FunctionDoc, partition_prefix};
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

/// The bytes `doc` takes in the store.
pub(crate) fn stored_size(doc: &FunctionDoc) -> u64 {
    serde_json::to_vec(doc).map_or(0, |v| v.len() as u64)
}

/// `usage` with the function of `old` bytes (none: a new one) replaced by one of `new` bytes
/// (none: deleted), or why not: the bound it would pass.
pub(crate) fn change(usage: Usage, old: Option<u64>, new: Option<u64>, max_functions: u64, max_bytes: u64) -> Result<Usage, String> {
    let next = Usage {
        functions: (usage.functions + u64::from(new.is_some())).saturating_sub(u64::from(old.is_some())),
        bytes: (usage.bytes + new.unwrap_or(0)).saturating_sub(old.unwrap_or(0)),
    };
    if next.functions > max_functions && next.functions > usage.functions {
        return Err(format!("this gateway holds {} functions, the most one may (platform.functions.max_per_gateway)", usage.functions));
    }
    if next.bytes > max_bytes && next.bytes > usage.bytes {
        return Err(format!(
            "this gateway's functions would take {} bytes, past the {max_bytes} one gateway may (platform.functions.max_bytes_per_gateway)",
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

    /// Gateway `gid`'s record; made from its stored functions when it has none.
    pub(crate) async fn held(&self, gid: &str) -> Result<Held, Reply> {
        let kv = self.docs.store.get(&self.quota_key(gid)).await.map_err(store_down)?;
        if let Some(kv) = &kv
            && let Ok(usage) = serde_json::from_slice::<Usage>(&kv.value)
        {
            return Ok(Held { usage, rev: kv.mod_revision });
        }
        let dir = format!("{}fn/", partition_prefix(&self.prefix, gid));
        let (kvs, _) = self.docs.store.list(&dir).await.map_err(store_down)?;
        let mut usage = Usage::default();
        for doc in kvs.iter().filter_map(|kv| serde_json::from_slice::<FunctionDoc>(&kv.value).ok()) {
            usage.functions += 1;
            usage.bytes += stored_size(&doc);
        }
        Ok(Held { usage, rev: kv.map_or(0, |kv| kv.mod_revision) })
    }

    /// The compare and the write that carry a change of `held` into a transaction, or the
    /// refusal when the change would pass a bound.
    pub(crate) fn quota_change(&self, gid: &str, held: Held, old: Option<&FunctionDoc>, new: Option<&FunctionDoc>) -> Result<(Compare, Op), Reply> {
        let f = &self.cfg.functions;
        let usage = change(held.usage, old.map(stored_size), new.map(stored_size), f.max_per_gateway, f.max_bytes_per_gateway)
            .map_err(|message| failure(ErrorKind::Quota, message, Vec::new()))?;
        let key = self.quota_key(gid);
        let value = Bytes::from(serde_json::to_vec(&usage).expect("a usage record serializes"));
        Ok((Compare { key: key.clone(), mod_revision: held.rev }, Op::Put { key, value }))
    }
}

#[cfg(test)]
mod tests {
    use super::{Usage, change};

    #[test]
    fn a_change_past_a_bound_is_refused_and_one_that_shrinks_is_always_taken() {
        let u = Usage { functions: 2, bytes: 100 };
        assert_eq!(change(u, None, Some(50), 3, 150), Ok(Usage { functions: 3, bytes: 150 }));
        assert_eq!(change(u, Some(10), Some(60), 2, 150), Ok(Usage { functions: 2, bytes: 150 }));
        let many = change(u, None, Some(1), 2, 1000).unwrap_err();
        assert!(many.contains("holds 2 functions") && many.contains("max_per_gateway"), "{many}");
        let big = change(u, Some(10), Some(61), 5, 150).unwrap_err();
        assert!(big.contains("151 bytes") && big.contains("max_bytes_per_gateway"), "{big}");
        // Over both bounds already (they were lowered): shrinking and deleting still go through.
        let over = Usage { functions: 10, bytes: 10_000 };
        assert_eq!(change(over, Some(500), Some(400), 2, 100), Ok(Usage { functions: 10, bytes: 9_900 }));
        assert_eq!(change(over, Some(500), None, 2, 100), Ok(Usage { functions: 9, bytes: 9_500 }));
        // Growing while over is refused even by a byte.
        assert!(change(over, Some(500), Some(501), 2, 100).is_err());
    }
}
