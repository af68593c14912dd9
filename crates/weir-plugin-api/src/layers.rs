//! Plugin layers as data: the scopes a route's plugins come from, in one order, and one merge.
//! A plugin configured at a higher scope replaces the same plugin from every lower one, whole
//! (configs are not merged field by field, as in APISIX). The platform's gateway, environment
//! and function layers are scopes of the same list, so adding one touches no request path.

use serde_json::{Map, Value};

/// Where a plugin config comes from, lowest precedence first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// What every environment of the platform inherits.
    Base,
    /// A tenant's gateway.
    Gateway,
    /// One environment of a gateway (dev, staging, prod).
    Environment,
    /// An APISIX service the route belongs to.
    Service,
    /// An APISIX plugin config the route names.
    PluginConfig,
    /// The route itself.
    Route,
    /// A function the route ends in.
    Function,
    /// The consumer group of the consumer an auth plugin named.
    ConsumerGroup,
    /// That consumer.
    Consumer,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Base => "base",
            Scope::Gateway => "gateway",
            Scope::Environment => "environment",
            Scope::Service => "service",
            Scope::PluginConfig => "plugin_config",
            Scope::Route => "route",
            Scope::Function => "function",
            Scope::ConsumerGroup => "consumer_group",
            Scope::Consumer => "consumer",
        }
    }
}

/// Plugin configs from several scopes, in any order of adding.
#[derive(Default)]
pub struct Layers<'a> {
    layers: Vec<(Scope, &'a Map<String, Value>)>,
}

impl<'a> Layers<'a> {
    pub fn new() -> Layers<'a> {
        Layers::default()
    }

    /// Adds the configs of one scope; `None` (a scope with no plugins) adds nothing.
    pub fn with(mut self, scope: Scope, plugins: Option<&'a Map<String, Value>>) -> Layers<'a> {
        if let Some(p) = plugins {
            self.layers.push((scope, p));
        }
        self
    }

    /// Each plugin's config from the highest scope that sets it, with that scope.
    pub fn effective(&self) -> Vec<(&'a str, &'a Value, Scope)> {
        let mut ordered = self.layers.clone();
        // Stable: two layers of one scope keep the order they were added in.
        ordered.sort_by_key(|(scope, _)| *scope);
        let mut out: Vec<(&'a str, &'a Value, Scope)> = Vec::new();
        for (scope, plugins) in ordered {
            for (name, conf) in plugins {
                match out.iter_mut().find(|(n, _, _)| *n == name.as_str()) {
                    Some(slot) => *slot = (name.as_str(), conf, scope),
                    None => out.push((name.as_str(), conf, scope)),
                }
            }
        }
        out
    }

    /// The merged `plugins` object.
    pub fn merge(&self) -> Map<String, Value> {
        self.effective().into_iter().map(|(name, conf, _)| (name.to_string(), conf.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn higher_scopes_replace_lower_ones_whole_whatever_the_order_of_adding() {
        let base = map(json!({"cors": {"allow_origins": "*"}, "limit-count": {"count": 100, "time_window": 60}}));
        let env = map(json!({"limit-count": {"count": 5, "time_window": 1}}));
        let route = map(json!({"key-auth": {}}));
        let function = map(json!({"cors": {"allow_origins": "https://a.example"}}));
        let layers = Layers::new()
            .with(Scope::Function, Some(&function))
            .with(Scope::Route, Some(&route))
            .with(Scope::Base, Some(&base))
            .with(Scope::Environment, Some(&env))
            .with(Scope::Gateway, None);
        let effective: Vec<_> = layers.effective().into_iter().map(|(n, c, s)| (n, c.clone(), s)).collect();
        assert_eq!(
            effective,
            vec![
                ("cors", json!({"allow_origins": "https://a.example"}), Scope::Function),
                ("limit-count", json!({"count": 5, "time_window": 1}), Scope::Environment),
                ("key-auth", json!({}), Scope::Route),
            ]
        );
        assert_eq!(layers.merge()["limit-count"], json!({"count": 5, "time_window": 1}));
    }
}
