//! The catalog of resource kinds: for each kind of object the Admin API manages, its key, its
//! schema, the checks a schema cannot say, the objects it refers to, and what happens to it on
//! the way into the store (secrets sealed) and out of it (private keys hidden).
//!
//! Each kind is one file under `kinds/` implementing [`Kind`], and one line of
//! [`Catalog::apisix`]. A kind from another crate joins with [`Catalog::register`]. The Admin
//! API, the declarative file store and `weir validate` all check objects through
//! [`Catalog::check`], so they cannot disagree about what is valid.

mod defs;
pub mod kinds;
mod plugins;
pub mod sealing;

use std::sync::Arc;

use serde_json::{Map, Value};
use weir_core::schema::{MAX_DEPTH, PluginCatalog, depth};
use weir_tls::Keyring;

pub use defs::{describe, id_schema, message, object_schema, read_as, upstream_schema};

/// The label that marks an object the platform generated: `labels.{MANAGED_LABEL}` names the
/// gateway it belongs to. The Admin API refuses to write such objects.
pub const MANAGED_LABEL: &str = weir_core::model::MANAGED_LABEL;

/// The id prefix of every object the platform generates (`wp.{gid}.…`); the Admin API leaves
/// such ids to the platform.
pub const MANAGED_ID_PREFIX: &str = "wp.";

/// The gateway an object was generated for, if the platform generated it.
pub fn managed_by(value: &Value) -> Option<&str> {
    value.get("labels")?.get(MANAGED_LABEL)?.as_str()
}

/// Which plugin configs an object holds, and so which of a plugin's schemas checks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginSlot {
    /// The kind holds no `plugins`.
    None,
    /// `plugins` as on a route: each checked against the plugin's `schema`.
    Route,
    /// `plugins` as on a consumer or credential: an auth plugin's `consumer_schema` applies.
    Consumer,
}

/// A field of an object that names another object, which must exist when the object is written
/// and which cannot be deleted while the field names it.
#[derive(Clone, Copy, Debug)]
pub struct Reference {
    /// Where the id is, field by field (`["upstream", "tls", "client_cert_id"]`).
    pub path: &'static [&'static str],
    /// The [`Kind::name`] of the object it names, a kind held by no other.
    pub kind: &'static str,
    /// How a failed lookup is worded: "failed to fetch {what} id [{id}], …".
    pub what: &'static str,
    /// A property the named object must have, and how its absence is worded.
    pub accept: Option<(fn(&Value) -> bool, &'static str)>,
    /// How a refused delete of the named object is worded ("can not delete this upstream,
    /// route"), or `None` when this reference does not hold deletes back.
    pub holds: Option<&'static str>,
}

impl Reference {
    /// The id this reference names in `obj`, if any.
    pub fn id_in(&self, obj: &Map<String, Value>) -> Option<String> {
        let (first, rest) = self.path.split_first()?;
        let mut at = obj.get(*first)?;
        for field in rest {
            at = at.get(*field)?;
        }
        weir_core::model::id_text(at)
    }
}

/// One kind of object. Only [`Kind::name`], [`Kind::noun`] and [`Kind::schema`] are required;
/// every other method says what most kinds do.
pub trait Kind: Send + Sync + 'static {
    /// The path segment in the Admin API and in store keys (`routes`).
    fn name(&self) -> &'static str;

    /// The singular used in messages ("route", "consumer group").
    fn noun(&self) -> &'static str;

    /// The name under `/apisix/admin/schema/{name}` (`route`, `consumer_group`).
    fn schema_name(&self) -> &'static str {
        self.noun()
    }

    /// Other path segments that address this kind (APISIX still routes `ssl`).
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }

    /// The JSON schema of an object, as `GET /apisix/admin/schema/{name}` serves it.
    fn schema(&self) -> &Value;

    /// The body field holding the object's id (`username` for consumers), or `None` when only
    /// the path names it (plugin metadata, named by its plugin).
    fn id_field(&self) -> Option<&'static str> {
        Some("id")
    }

    /// Checks an id given by the path alone (for a kind without an [`Kind::id_field`]).
    fn check_id(&self, _id: &str, _plugins: &dyn PluginCatalog) -> Result<(), String> {
        Ok(())
    }

    /// What a write without an id is told.
    fn missing_id(&self) -> String {
        format!("missing {} id", self.noun())
    }

    /// The kind whose objects hold these ones, by [`Kind::name`]: a credential lives under
    /// its consumer, at `{prefix}/consumers/{username}/credentials/{id}`, and goes with it.
    fn parent(&self) -> Option<&'static str> {
        None
    }

    /// Whether `POST` creates an object with a generated id.
    fn allows_post(&self) -> bool {
        false
    }

    fn allows_patch(&self) -> bool {
        true
    }

    /// Whether the kind is a section of the declarative file.
    fn declarative(&self) -> bool {
        true
    }

    fn plugins(&self) -> PluginSlot {
        PluginSlot::None
    }

    fn references(&self) -> &'static [Reference] {
        &[]
    }

    /// The fields a list may be filtered on exactly (`?filter=service_id%3D1`).
    fn list_filters(&self) -> &'static [&'static str] {
        &[]
    }

    /// Every problem a schema cannot say, for an object the schema accepted (fields that
    /// exclude each other, addresses that do not parse).
    fn check(&self, _value: &Value) -> Vec<String> {
        Vec::new()
    }

    /// Last, once every other check holds: the data plane's own typed read of the object, so
    /// nothing is stored that it would not apply exactly ([`read_as`]).
    fn read(&self, _value: &Value) -> Result<(), String> {
        Ok(())
    }

    /// Before the checks of a write: opens what [`Kind::seal`] sealed, since a PATCH merges
    /// onto the stored object and the checks must see the clear text.
    fn open(&self, _obj: &mut Map<String, Value>, _keyring: &Keyring) -> Result<(), String> {
        Ok(())
    }

    /// After the checks of a write: seals secrets for storing. An error refuses the write.
    fn seal(&self, _obj: &mut Map<String, Value>, _keyring: &Keyring) -> Result<(), String> {
        Ok(())
    }

    /// Removes what the API never shows of a stored object (private keys).
    fn hide(&self, _value: &mut Value) {}
}

/// The resource kinds a node serves, in a fixed order (the order lists and reference checks
/// follow).
#[derive(Clone)]
pub struct Catalog {
    kinds: Vec<Registered>,
}

/// A kind with its schema compiled.
#[derive(Clone)]
pub struct Registered {
    kind: Arc<dyn Kind>,
    validator: Arc<jsonschema::Validator>,
}

impl std::ops::Deref for Registered {
    type Target = dyn Kind;

    fn deref(&self) -> &(dyn Kind + 'static) {
        &*self.kind
    }
}

impl Registered {
    /// The store key of one object; `parent` is the id of the object that holds it, for a
    /// kind with a [`Kind::parent`].
    pub fn key(&self, prefix: &str, parent: Option<&str>, id: &str) -> String {
        format!("{}{id}", self.dir(prefix, parent))
    }

    /// The key prefix under which every object of the kind lives (ends with `/`).
    pub fn dir(&self, prefix: &str, parent: Option<&str>) -> String {
        match (self.parent(), parent) {
            (Some(p), Some(owner)) => format!("{prefix}/{p}/{owner}/{}/", self.name()),
            _ => format!("{prefix}/{}/", self.name()),
        }
    }

    /// Whether `name` addresses this kind in a path.
    pub fn answers_to(&self, name: &str) -> bool {
        self.name() == name || self.aliases().contains(&name)
    }
}

impl Catalog {
    /// No kinds at all.
    pub fn empty() -> Catalog {
        Catalog { kinds: Vec::new() }
    }

    /// APISIX's resource kinds.
    pub fn apisix() -> Catalog {
        let mut c = Catalog::empty();
        for kind in kinds::apisix() {
            c.register(kind);
        }
        c
    }

    /// Adds a kind. Its name must be new and its schema must compile: both are the kind's
    /// author's to get right, so a mistake stops the node at start.
    pub fn register(&mut self, kind: Arc<dyn Kind>) {
        assert!(self.get(kind.name()).is_none(), "resource kind {} is registered twice", kind.name());
        let validator = jsonschema::validator_for(kind.schema())
            .unwrap_or_else(|e| panic!("the schema of resource kind {} does not compile: {e}", kind.name()));
        self.kinds.push(Registered { kind, validator: Arc::new(validator) });
    }

    pub fn kinds(&self) -> impl Iterator<Item = &Registered> {
        self.kinds.iter()
    }

    /// A kind by [`Kind::name`] or one of its aliases.
    pub fn get(&self, name: &str) -> Option<&Registered> {
        self.kinds.iter().find(|k| k.answers_to(name))
    }

    /// A kind by the name its schema is served under (`route`), or by its path name.
    pub fn by_schema_name(&self, name: &str) -> Option<&Registered> {
        self.kinds.iter().find(|k| k.schema_name() == name).or_else(|| self.get(name))
    }

    /// The kind held by `parent` under the path segment `name` (`credentials` of `consumers`).
    pub fn child(&self, parent: &str, name: &str) -> Option<&Registered> {
        self.kinds.iter().find(|k| k.parent() == Some(parent) && k.name() == name)
    }

    /// The kinds held by objects of `parent`.
    pub fn children<'a>(&'a self, parent: &'a str) -> impl Iterator<Item = &'a Registered> + 'a {
        self.kinds.iter().filter(move |k| k.parent() == Some(parent))
    }

    /// The references, from any kind, that hold back a delete of a `target` object: the
    /// referring kind with each.
    pub fn holders<'a>(&'a self, target: &'a str) -> impl Iterator<Item = (&'a Registered, &'a Reference)> + 'a {
        self.kinds
            .iter()
            .flat_map(|k| k.references().iter().map(move |r| (k, r)))
            .filter(move |(_, r)| r.kind == target && r.holds.is_some())
    }

    /// Which kind a store key belongs to, with the object's id and, for a kind held by
    /// another, the holder's id.
    pub fn from_key<'k>(&self, prefix: &str, key: &'k str) -> Option<(&Registered, Option<&'k str>, &'k str)> {
        let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
        let (name, tail) = rest.split_once('/')?;
        let top = self.kinds.iter().find(|k| k.parent().is_none() && k.name() == name)?;
        let mut parts = tail.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(id), None, _, _) if !id.is_empty() => Some((top, None, id)),
            (Some(owner), Some(child), Some(id), None) if !owner.is_empty() && !id.is_empty() => {
                self.child(top.name(), child).map(|c| (c, Some(owner), id))
            }
            _ => None,
        }
    }

    /// Every problem with `value` as an object of `kind`, checked without the store: depth,
    /// schema, the kind's own checks, its plugins' configs, and last the data plane's typed
    /// read. References are the caller's to look up ([`Kind::references`]). This is the one
    /// door every surface checks objects through.
    pub fn check(&self, kind: &Registered, value: &Value, plugins: &dyn PluginCatalog) -> Result<(), Vec<String>> {
        if depth(value) > MAX_DEPTH {
            return Err(vec![format!("the configuration nests deeper than {MAX_DEPTH} levels")]);
        }
        if !value.is_object() {
            return Err(vec!["the configuration must be a JSON object".into()]);
        }
        let mut errors: Vec<String> = kind.validator.iter_errors(value).map(|e| describe(&e)).collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        errors.extend(kind.check(value));
        plugins::check(kind.plugins(), value, plugins, &mut errors);
        if errors.is_empty()
            && let Err(e) = kind.read(value)
        {
            errors.push(e);
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
}

#[cfg(test)]
mod tests {
    use weir_core::Resource;

    use super::*;

    #[test]
    fn apisix_kinds_keep_the_data_planes_key_layout() {
        let c = Catalog::apisix();
        for r in Resource::ALL {
            let kind = c.kinds().find(|k| k.name() == r.name()).unwrap_or_else(|| panic!("{} has no kind", r.name()));
            let parent = kind.parent().map(|_| "jack");
            assert_eq!(kind.key("/apisix", parent, "7"), r.key("/apisix", parent, "7"));
            assert_eq!(kind.dir("/apisix", parent), r.dir("/apisix", parent));
            let key = r.key("/apisix", parent, "7");
            let (found, owner, id) = c.from_key("/apisix", &key).unwrap();
            assert_eq!((found.name(), owner, id), (r.name(), parent, "7"));
        }
        assert_eq!(c.kinds().count(), Resource::ALL.len());
        assert_eq!(c.get("ssl").map(|k| k.name()), Some("ssls"));
        assert!(c.from_key("/apisix", "/apisix/routes/").is_none());
        assert!(c.from_key("/apisix", "/apisix/routes/a/b").is_none());
        assert!(c.from_key("/apisix", "/apisix/consumers/jack/credentials/").is_none());
    }

    #[test]
    fn deletes_are_held_back_by_the_references_of_every_kind() {
        let c = Catalog::apisix();
        let holders = |t| c.holders(t).map(|(k, r)| format!("{}.{}", k.name(), r.path.join("."))).collect::<Vec<_>>();
        assert_eq!(holders("upstreams"), ["routes.upstream_id", "services.upstream_id"]);
        assert_eq!(holders("services"), ["routes.service_id"]);
        assert_eq!(holders("plugin_configs"), ["routes.plugin_config_id"]);
        assert_eq!(holders("consumer_groups"), ["consumers.group_id"]);
        assert!(holders("ssls").is_empty());
    }
}
