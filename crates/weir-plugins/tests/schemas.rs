//! A misspelt field is refused where APISIX's schema refuses it, and passes where APISIX's
//! lets it pass.

use serde_json::{Value, json};
use weir_core::schema::PluginCatalog as _;

fn refused(plugin: &str, conf: Value) -> bool {
    let registry = weir_plugins::registry();
    let schema = registry.config_schema(plugin).unwrap_or_else(|| panic!("{plugin} is registered"));
    !jsonschema::validator_for(schema).unwrap().is_valid(&conf)
}

#[test]
fn misspelt_fields_are_refused_where_apisix_refuses_them() {
    // proxy-rewrite's `add`/`set`/`remove` form takes nothing else; plain headers still pass.
    assert!(!refused("proxy-rewrite", json!({"headers": {"add": {"X-A": "1"}, "remove": ["X-B"]}})));
    assert!(!refused("proxy-rewrite", json!({"headers": {"X-A": "1"}})));
    assert!(refused("proxy-rewrite", json!({"headers": {"ad": {"X-A": "1"}}})));
    // traffic-split's inline upstream is an upstream: a misspelt field is refused.
    let split = |upstream: Value| json!({"rules": [{"weighted_upstreams": [{"upstream": upstream, "weight": 1}]}]});
    assert!(!refused("traffic-split", split(json!({"nodes": {"127.0.0.1:1980": 1}, "type": "roundrobin"}))));
    assert!(refused("traffic-split", split(json!({"nodes": {"127.0.0.1:1980": 1}, "tpye": "roundrobin"}))));
    // Where APISIX's schema lets unknown fields through, so does ours.
    assert!(!refused("key-auth", json!({"header": "apikey", "hide_credentials": false, "unknown": 1})));
}
