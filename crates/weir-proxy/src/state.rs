//! The config as the data plane last read it from the store: typed objects by resource and id.
//! It changes only by applying store events; a snapshot is compiled from it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use weir_core::Resource;
use weir_core::model::{PluginHolder, Route, Service, Ssl, Upstream};
use weir_store::{Event, EventKind, KeyValue};

use crate::partition::Claims;


#[derive(Default, Clone)]
pub struct ConfigState {
    pub revision: i64,
    pub routes: BTreeMap<String, Entry<Route>>,
    pub services: BTreeMap<String, Service>,
    pub upstreams: BTreeMap<String, Upstream>,
    pub ssls: BTreeMap<String, Ssl>,
    pub plugin_configs: BTreeMap<String, PluginHolder>,
    pub global_rules: BTreeMap<String, PluginHolder>,
    /// Global rules in the store that cannot be read: while there are any, no request is
    /// served without the plugins they may hold (fail closed).
    pub broken_global_rules: BTreeSet<String>,
    /// By username.
    pub consumers: BTreeMap<String, PluginHolder>,
    /// By `{username}/credentials/{id}`.
    pub credentials: BTreeMap<String, PluginHolder>,
    pub consumer_groups: BTreeMap<String, PluginHolder>,
    /// By plugin name.
    pub plugin_metadata: BTreeMap<String, serde_json::Value>,
    /// Objects some contributor claims, by store key, as stored: the snapshot builder lowers
    /// them into partitions. Keys nobody claims are not kept.
    pub extra: BTreeMap<String, KeyValue>,
    pub(crate) claims: Claims,
}

/// A route and the store revision that created it (older routes win priority ties).
#[derive(Clone)]
pub struct Entry<T> {
    pub created: i64,
    pub value: T,
    /// Why the stored object could not be read whole, when it could not: the route is then
    /// matched by what could be read of it and answers 503 (fail closed).
    pub broken: Option<Arc<str>>,
}

fn parse<T: DeserializeOwned>(kv: &KeyValue) -> Option<T> {
    match serde_json::from_slice(&kv.value) {
        Ok(v) => Some(v),
        Err(e) => {
            // Validated objects always parse; this is a store written by something else.
            tracing::warn!(key = %kv.key, error = %e, "skipping an object the data plane cannot read");
            None
        }
    }
}

/// A stored route; one that cannot be read whole is kept by what can be matched of it,
/// marked broken, so that it answers 503 rather than letting its requests reach another route.
fn read_route(kv: &KeyValue) -> Option<Entry<Route>> {
    let created = kv.create_revision;
    let value = match serde_json::from_slice::<serde_json::Value>(&kv.value) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(key = %kv.key, error = %e, "route is not JSON; it cannot be matched and is left out");
            return None;
        }
    };
    let error = match serde_json::from_value::<Route>(value.clone()) {
        Ok(value) => return Some(Entry { created, value, broken: None }),
        Err(e) => e,
    };
    match Route::salvage(&value) {
        Some(route) => {
            tracing::error!(key = %kv.key, error = %error, "route cannot be applied; it answers 503 until it is fixed");
            Some(Entry { created, value: route, broken: Some(error.to_string().into()) })
        }
        None => {
            tracing::error!(key = %kv.key, error = %error, "route cannot be read, not even its paths; it is left out");
            None
        }
    }
}

/// Stores `value` under `id`; an unreadable object (`None`) removes the old one.
fn upsert<T>(map: &mut BTreeMap<String, T>, id: String, value: Option<T>) {
    match value {
        Some(v) => {
            map.insert(id, v);
        }
        None => {
            map.remove(&id);
        }
    }
}

impl ConfigState {
    pub fn from_list(prefix: &str, kvs: &[KeyValue], revision: i64) -> ConfigState {
        ConfigState::claiming(prefix, kvs, revision, Claims::default())
    }

    /// A state that also keeps the objects `claims` claims, for the partitions.
    pub fn claiming(prefix: &str, kvs: &[KeyValue], revision: i64, claims: Claims) -> ConfigState {
        let mut state = ConfigState { revision, claims, ..ConfigState::default() };
        for kv in kvs {
            state.put(prefix, kv);
        }
        state
    }

    /// Applies a batch of events, adding what the data plane uses that changed to `changes`.
    pub fn apply(&mut self, prefix: &str, revision: i64, events: &[Event], changes: &mut Changes) {
        self.revision = revision;
        for e in events {
            let changed = match e.kind {
                EventKind::Put => self.put(prefix, &e.kv),
                EventKind::Delete => self.delete(prefix, &e.kv.key),
            };
            if !changed {
                continue;
            }
            match Resource::from_key(prefix, &e.kv.key) {
                Some((Resource::Routes, id)) => changes.routes.push(id.to_string()),
                Some((Resource::PluginConfigs, id)) => changes.plugin_configs.push(id.to_string()),
                Some((Resource::Consumers, id)) => changes.consumers.push(id.to_string()),
                Some((Resource::Credentials, id)) => changes.consumers.push(id.split_once("/credentials/").map_or(id, |(username, _)| username).to_string()),
                Some(_) => changes.other = true,
                None => {
                    changes.extra.push(e.kv.key.clone());
                    changes.extra_since = Some(changes.extra_since.map_or(revision, |r| r.min(revision)));
                }
            }
        }
    }

    fn put(&mut self, prefix: &str, kv: &KeyValue) -> bool {
        let Some((resource, id)) = Resource::from_key(prefix, &kv.key) else {
            if self.claims.partition(&kv.key).is_none() {
                return false;
            }
            self.extra.insert(kv.key.clone(), kv.clone());
            return true;
        };
        let id = id.to_string();
        match resource {
            Resource::Routes => {
                let entry = read_route(kv);
                upsert(&mut self.routes, id, entry);
            }
            Resource::Services => upsert(&mut self.services, id, parse(kv)),
            Resource::Upstreams => upsert(&mut self.upstreams, id, parse(kv)),
            Resource::Ssls => upsert(&mut self.ssls, id, parse(kv)),
            Resource::PluginConfigs => upsert(&mut self.plugin_configs, id, parse(kv)),
            Resource::GlobalRules => {
                let rule = parse(kv);
                if rule.is_some() {
                    self.broken_global_rules.remove(&id);
                } else {
                    self.broken_global_rules.insert(id.clone());
                }
                upsert(&mut self.global_rules, id, rule)
            }
            Resource::Consumers => upsert(&mut self.consumers, id, parse(kv)),
            Resource::Credentials => upsert(&mut self.credentials, id, parse(kv)),
            Resource::ConsumerGroups => upsert(&mut self.consumer_groups, id, parse(kv)),
            Resource::PluginMetadata => upsert(&mut self.plugin_metadata, id, parse(kv)),
        }
        true
    }

    fn delete(&mut self, prefix: &str, key: &str) -> bool {
        let Some((resource, id)) = Resource::from_key(prefix, key) else {
            return self.extra.remove(key).is_some();
        };
        match resource {
            Resource::Routes => self.routes.remove(id).is_some(),
            Resource::Services => self.services.remove(id).is_some(),
            Resource::Upstreams => self.upstreams.remove(id).is_some(),
            Resource::Ssls => self.ssls.remove(id).is_some(),
            Resource::PluginConfigs => self.plugin_configs.remove(id).is_some(),
            Resource::GlobalRules => {
                let broken = self.broken_global_rules.remove(id);
                self.global_rules.remove(id).is_some() || broken
            }
            Resource::Consumers => {
                // A consumer's credentials go with it (those of one that could not be read too).
                let prefix = format!("{id}/credentials/");
                let credentials = self.credentials.len();
                self.credentials.retain(|k, _| !k.starts_with(&prefix));
                self.consumers.remove(id).is_some() || self.credentials.len() != credentials
            }
            Resource::Credentials => self.credentials.remove(id).is_some(),
            Resource::ConsumerGroups => self.consumer_groups.remove(id).is_some(),
            Resource::PluginMetadata => self.plugin_metadata.remove(id).is_some(),
        }
    }
}

/// What a batch of store events changed, for [`crate::snapshot::Builder::update`].
#[derive(Default, Debug)]
pub struct Changes {
    /// Ids of routes put or deleted.
    pub routes: Vec<String>,
    /// Ids of plugin configs put or deleted: the routes naming them are compiled again.
    pub plugin_configs: Vec<String>,
    /// Usernames of consumers put or deleted, or whose credential objects were.
    pub consumers: Vec<String>,
    /// Whether any other APISIX object changed (services, upstreams, ssls, consumer groups).
    pub other: bool,
    /// Keys of claimed objects ([`ConfigState::extra`]) put or deleted.
    pub extra: Vec<String>,
    /// The first revision that changed one of them; none when no store change did (a
    /// partition lowered again at its contributor's asking).
    pub extra_since: Option<i64>,
}

impl Changes {
    pub fn any(&self) -> bool {
        self.other || !self.routes.is_empty() || !self.plugin_configs.is_empty() || !self.consumers.is_empty() || !self.extra.is_empty()
    }
}
