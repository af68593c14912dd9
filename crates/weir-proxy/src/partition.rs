//! Partitions: objects the data plane does not compile itself, grouped by key prefix and
//! lowered by a [`Contributor`] (the platform's tenancy, say: one partition per tenant
//! environment) into routes of their own, reached by host.

use std::sync::Arc;

use weir_core::model;

use crate::handler::Handler;

/// A source of routes kept apart from APISIX's: the objects under one key prefix (a
/// partition) are lowered into routes that answer the partition's hosts. A change to a
/// partition's objects compiles that partition alone.
///
/// A partition is self-contained: its routes hold their upstream and plugins inline and
/// cannot name APISIX objects (a route with `upstream_id`, `service_id` or `plugin_config_id`
/// finds nothing and answers 503), so no partition reaches the operator's objects or another
/// partition's, and a change to APISIX's objects never recompiles a partition (only a change
/// to `plugin_metadata`, which every plugin instance is built with, does). Which hosts a
/// partition may claim is the contributor's to check: a partition's routes are matched before
/// APISIX's for its hosts.
pub trait Contributor: Send + Sync {
    /// The partition `key` belongs to, as the key prefix every object of the partition shares;
    /// `None` when the key is not this contributor's.
    fn partition<'k>(&self, key: &'k str) -> Option<&'k str>;

    /// Lowers one partition's objects (key and stored value, in key order, never empty) into
    /// the hosts it answers and its routes, as APISIX routes with ids unique in the partition.
    /// A panic keeps the partition as it was last compiled.
    fn lower(&self, partition: &str, objects: &[(&str, &[u8])]) -> Lowered;

    /// Receives, once, the way to have a partition lowered again though none of its objects
    /// changed: a contributor that does slow work for a lowering off the watch path (compiling
    /// what changed) lowers the partition with what it has, then asks again when the work is
    /// done. Without it, every lowering is done in place.
    fn attach(&self, _relower: Relower) {}

    /// The partition has no objects left (and is not lowered any more): what the contributor
    /// keeps for it can go. Said again for a partition already gone.
    fn gone(&self, _partition: &str) {}
}

/// Asks the watch loop to lower a partition again: [`Relower::send`] takes a key of the
/// partition, and the loop lowers it as if that key had changed.
#[derive(Clone)]
pub struct Relower(tokio::sync::mpsc::UnboundedSender<String>);

impl Relower {
    pub fn channel() -> (Relower, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Relower(tx), rx)
    }

    /// False when the loop is gone.
    pub fn send(&self, key: &str) -> bool {
        self.0.send(key.to_string()).is_ok()
    }
}

/// What a [`Contributor`] makes of one partition.
#[derive(Default)]
pub struct Lowered {
    pub hosts: Vec<String>,
    pub routes: Vec<LoweredRoute>,
}

/// One route of a partition: an APISIX route, ending in `handler` when it has one (then it
/// needs no upstream).
pub struct LoweredRoute {
    /// Unique in the partition.
    pub id: String,
    pub route: model::Route,
    pub handler: Option<Arc<dyn Handler>>,
}

/// The contributors, as the config state asks them which keys to keep.
#[derive(Clone, Default)]
pub struct Claims(Arc<[Arc<dyn Contributor>]>);

impl Claims {
    pub fn new(contributors: Vec<Arc<dyn Contributor>>) -> Claims {
        Claims(contributors.into())
    }

    /// The partition `key` belongs to and the contributor that claims it.
    pub fn partition<'k>(&self, key: &'k str) -> Option<(&'k str, &Arc<dyn Contributor>)> {
        self.0.iter().find_map(|c| c.partition(key).map(|p| (p, c)))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
