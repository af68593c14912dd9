//! The consumers of a snapshot, by the credentials that identify them.
//!
//! Each table is split into shards behind their own `Arc`s, so that a copy of the whole shares
//! every shard and a change to the copy copies only the shards it touches: a change to one
//! consumer among many costs in proportion to the consumer, not to the table.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;

use http::header::HeaderValue;
use serde_json::Value;

use crate::{Pipeline, Registry};

/// A consumer as the data plane knows it, found by an auth plugin.
#[derive(Debug, PartialEq)]
pub struct Consumer {
    pub username: String,
    /// The credential (`consumers/{username}/credentials/{id}`) that matched, if any.
    pub credential_id: Option<String>,
    /// `username` and `credential_id` as header values, made once per snapshot; none when
    /// one cannot be a header value.
    pub(crate) username_header: Option<HeaderValue>,
    pub(crate) credential_header: Option<HeaderValue>,
}

impl Consumer {
    pub fn new(username: &str, credential_id: Option<&str>) -> Consumer {
        Consumer {
            username: username.to_string(),
            credential_id: credential_id.map(str::to_string),
            username_header: HeaderValue::from_str(username).ok(),
            credential_header: credential_id.and_then(|c| HeaderValue::from_str(c).ok()),
        }
    }
}

/// A credential a consumer holds for one auth plugin, as that plugin prepared it when the
/// snapshot was built.
#[derive(Clone)]
pub struct Credential {
    pub consumer: Arc<Consumer>,
    /// What the plugin made of the consumer's config: a password, a verifying key.
    pub data: Arc<dyn Any + Send + Sync>,
}

/// The hasher of the consumer tables, looked up on every authenticated request: fast, and
/// seeded at random per table so that no caller can choose keys that collide.
type Seeded = foldhash::quality::RandomState;

/// Shards a table is split into.
const SHARDS: u64 = 64;

/// A table by string keys in [`SHARDS`] shards; none until the first key comes.
struct Sharded<V> {
    seed: Seeded,
    shards: Vec<Arc<HashMap<String, V, Seeded>>>,
}

impl<V> Default for Sharded<V> {
    fn default() -> Self {
        Sharded { seed: Seeded::default(), shards: Vec::new() }
    }
}

impl<V> Clone for Sharded<V> {
    fn clone(&self) -> Self {
        Sharded { seed: self.seed.clone(), shards: self.shards.clone() }
    }
}

impl<V: Clone> Sharded<V> {
    fn at(&self, key: &str) -> usize {
        (self.seed.hash_one(key) % SHARDS) as usize
    }

    fn get(&self, key: &str) -> Option<&V> {
        self.shards.get(self.at(key))?.get(key)
    }

    /// The shard of `key`, copied first where another table shares it.
    fn shard_mut(&mut self, key: &str) -> &mut HashMap<String, V, Seeded> {
        if self.shards.is_empty() {
            self.shards = (0..SHARDS).map(|_| Arc::default()).collect();
        }
        let at = self.at(key);
        Arc::make_mut(&mut self.shards[at])
    }

    fn insert(&mut self, key: String, value: V) -> Option<V> {
        self.shard_mut(&key).insert(key, value)
    }

    fn remove(&mut self, key: &str) -> Option<V> {
        self.get(key)?;
        self.shard_mut(key).remove(key)
    }
}

/// Consumers by credential: plugin → the id the plugin looks callers up by (an API key, a
/// username, a JWT `key`) → credential. Built with the snapshot; a copy is cheap, and a
/// consumer can be taken back from it and added again.
#[derive(Default, Clone)]
pub struct Consumers {
    by_plugin: HashMap<&'static str, Sharded<Credential>, Seeded>,
    /// The plugins a consumer brings (its group's and its own), by username.
    plugins: Sharded<Arc<Pipeline>>,
    /// What each consumer filed in `by_plugin`, by username.
    filed: Sharded<Vec<(&'static str, String)>>,
    /// Credentials more than one consumer filed: the last one added holds each.
    contested: Arc<HashSet<(&'static str, String)>>,
    /// How many times a consumer filed a credential another consumer held.
    overwritten: u64,
    /// Consumers whose plugins hold what they may share beyond the consumer: an instance of a
    /// plugin's `group`, a compiled `_meta.filter`.
    sharing: Arc<HashSet<String>>,
}

impl Consumers {
    /// Adds the credentials a consumer (or one of its credential objects) carries in `plugins`.
    /// A credential its plugin cannot use is logged and left out.
    pub fn add(&mut self, registry: &Registry, username: &str, credential_id: Option<&str>, plugins: &serde_json::Map<String, Value>) {
        let consumer = Arc::new(Consumer::new(username, credential_id));
        for (name, conf) in plugins {
            let Some(f) = registry.factory(name) else { continue };
            let Some(prepare) = &f.credential else { continue };
            // A sealed key that cannot be opened leaves the credential out: its sealed text
            // must never work as the key.
            let conf = match registry.opened(conf) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(consumer = username, plugin = f.name, error = %e, "credential cannot be opened; skipped");
                    continue;
                }
            };
            match prepare(&conf) {
                Ok((id, data)) => self.file(f.name, id, Credential { consumer: consumer.clone(), data }),
                Err(e) => tracing::warn!(consumer = username, plugin = f.name, error = %e, "credential cannot be used; skipped"),
            }
        }
    }

    /// Files `cred` as `plugin`'s credential `id`, in place of any before it.
    fn file(&mut self, plugin: &'static str, id: String, cred: Credential) {
        let username = cred.consumer.username.clone();
        let before = self.by_plugin.entry(plugin).or_default().insert(id.clone(), cred);
        if before.is_some_and(|b| b.consumer.username != username) {
            Arc::make_mut(&mut self.contested).insert((plugin, id.clone()));
            self.overwritten += 1;
        }
        self.filed.shard_mut(&username).entry(username).or_default().push((plugin, id));
    }

    pub fn find(&self, plugin: &'static str, id: &str) -> Option<&Credential> {
        self.by_plugin.get(plugin)?.get(id)
    }

    /// Sets the plugins `username` brings; `sharing`: whether they hold what they may share
    /// beyond the consumer (an instance of a plugin's `group`, a compiled `_meta.filter`).
    pub fn set_plugins(&mut self, username: &str, pipeline: Pipeline, sharing: bool) {
        self.plugins.insert(username.to_string(), Arc::new(pipeline));
        if sharing {
            Arc::make_mut(&mut self.sharing).insert(username.to_string());
        }
    }

    /// The plugins `username` brings to every route it calls, if any.
    pub fn plugins_of(&self, username: &str) -> Option<&Arc<Pipeline>> {
        self.plugins.get(username)
    }

    /// Takes back what consumer `username` filed (its credentials and its plugins), for it to
    /// be added afresh. False, with nothing taken back, when another consumer filed one of the
    /// same credentials (which of them holds it is the order of a full build's to say), or when
    /// its plugins share what only a full build knows whether others still use.
    pub fn take_back(&mut self, username: &str) -> bool {
        if self.sharing.contains(username) {
            return false;
        }
        let Some(filed) = self.filed.get(username).cloned() else {
            self.plugins.remove(username);
            return true;
        };
        if filed.iter().any(|(plugin, id)| self.contested.contains(&(*plugin, id.clone()))) {
            return false;
        }
        for (plugin, id) in &filed {
            if let Some(table) = self.by_plugin.get_mut(plugin) {
                table.remove(id);
            }
        }
        self.filed.remove(username);
        self.plugins.remove(username);
        true
    }

    /// How many times a consumer filed a credential another consumer held: a count that
    /// grows across an update means the update filed one another consumer holds too.
    pub fn overwritten(&self) -> u64 {
        self.overwritten
    }

    /// Whether any of `usernames` brings plugins that share what they hold beyond it.
    pub fn any_sharing<'n>(&self, mut usernames: impl Iterator<Item = &'n str>) -> bool {
        usernames.any(|u| self.sharing.contains(u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(c: &Consumers) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = c
            .by_plugin
            .values()
            .flat_map(|t| t.shards.iter().flat_map(|s| s.iter().map(|(id, cred)| (id.clone(), cred.consumer.username.clone()))))
            .collect();
        all.sort();
        all
    }

    fn file(c: &mut Consumers, user: &str, id: &str) {
        c.file("key-auth", id.to_string(), Credential { consumer: Arc::new(Consumer::new(user, None)), data: Arc::new(()) });
    }

    #[test]
    fn a_copy_changed_leaves_the_original_and_shares_the_shards_it_did_not_touch() {
        let mut c = Consumers::default();
        for i in 0..1000 {
            file(&mut c, &format!("u{i}"), &format!("k{i}"));
        }
        let mut copy = c.clone();
        assert!(copy.take_back("u7"));
        file(&mut copy, "u7", "k7-new");
        assert!(c.find("key-auth", "k7").is_some());
        assert!(c.find("key-auth", "k7-new").is_none());
        assert!(copy.find("key-auth", "k7").is_none());
        assert_eq!(copy.find("key-auth", "k7-new").map(|c| c.consumer.username.as_str()), Some("u7"));
        let table = |c: &Consumers| c.by_plugin["key-auth"].shards.clone();
        let shared = table(&c).iter().zip(table(&copy).iter()).filter(|(a, b)| Arc::ptr_eq(a, b)).count();
        assert!(shared >= SHARDS as usize - 2, "{shared} shards shared");
        assert_eq!(keys(&copy).len(), 1000);
    }

    #[test]
    fn a_credential_two_consumers_filed_is_not_taken_back_alone() {
        let mut c = Consumers::default();
        file(&mut c, "a", "same");
        file(&mut c, "b", "same");
        file(&mut c, "b", "own");
        assert_eq!(c.overwritten(), 1);
        let before = keys(&c);
        assert!(!c.take_back("a"));
        assert!(!c.take_back("b"));
        assert_eq!(keys(&c), before, "nothing taken back");
        // One consumer filing a credential twice (itself and a credential object) is no contest.
        file(&mut c, "d", "twice");
        file(&mut c, "d", "twice");
        assert_eq!(c.overwritten(), 1);
        // A third consumer filing a credential already contested overwrites all the same.
        file(&mut c, "e", "same");
        assert_eq!(c.overwritten(), 2);
        assert!(c.take_back("d"));
        assert!(c.find("key-auth", "twice").is_none());
        assert!(c.take_back("nobody"), "a consumer that filed nothing has nothing to take back");
    }
}
