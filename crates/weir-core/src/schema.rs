//! What checking an object needs to know of plugins ([`PluginCatalog`]) and how deeply an
//! object may nest. The resource kinds and their schemas live in `weir-catalog`.

use serde_json::{Value, json};

/// The plugins the gateway knows, as the validator sees them: a name and a config schema.
pub trait PluginCatalog: Send + Sync {
    /// The JSON schema of the plugin's configuration, or `None` for an unknown plugin.
    fn config_schema(&self, name: &str) -> Option<&Value>;

    /// Every plugin name, sorted.
    fn names(&self) -> Vec<&str>;

    /// The schema of the plugin's config on a consumer or credential (an auth plugin's
    /// secret), when it differs from the route config.
    fn consumer_schema(&self, _name: &str) -> Option<&Value> {
        None
    }

    /// Checks a config the schema accepted for what a schema cannot say (a regex that does not
    /// compile, options that exclude each other).
    fn check_config(&self, _name: &str, _conf: &Value) -> Result<(), String> {
        Ok(())
    }

    /// Checks a consumer's (or credential's) config of an auth plugin beyond its schema: a
    /// public key that does not parse, say.
    fn check_consumer_config(&self, _name: &str, _conf: &Value) -> Result<(), String> {
        Ok(())
    }

    /// The schema of `_meta`, which every plugin config may carry.
    fn meta_schema(&self) -> Value {
        json!({"type": "object"})
    }
}

/// A catalog with no plugins: every plugin name is unknown.
pub struct NoPlugins;

impl PluginCatalog for NoPlugins {
    fn config_schema(&self, _name: &str) -> Option<&Value> {
        None
    }

    fn names(&self) -> Vec<&str> {
        Vec::new()
    }
}

/// How deeply an object's arrays and objects may nest. Real configs stay far below it; the
/// data plane's JSON reader and every recursive walk over a config stay far within their
/// stacks.
pub const MAX_DEPTH: usize = 64;

/// How deeply `value` nests (a scalar is 0), counted without recursion.
pub fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, d)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        deepest = deepest.max(d + 1);
        stack.extend(children.map(|c| (c, d + 1)));
    }
    deepest
}

