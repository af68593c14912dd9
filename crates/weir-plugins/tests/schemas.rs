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

/// Every schema is derived from its plugin's config type; whatever the derivation gives must
/// be a schema that compiles, in APISIX's shape: no Rust number formats, no `null` for an
/// optional field, no references to resolve.
#[test]
fn every_derived_schema_compiles_in_apisix_shape() {
    let registry = weir_plugins::registry();
    fn walk(v: &Value, path: &str, plugin: &str) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(f)) = o.get("format") {
                    assert!(!f.starts_with("int") && !f.starts_with("uint") && f != "double" && f != "float", "{plugin}{path}: format {f}");
                }
                assert!(o.get("type").is_none_or(|t| !t.to_string().contains("null")), "{plugin}{path}: null type");
                assert!(!o.contains_key("$ref") && !o.contains_key("$defs") && !o.contains_key("$schema"), "{plugin}{path}: not inline");
                for (k, child) in o {
                    walk(child, &format!("{path}/{k}"), plugin);
                }
            }
            Value::Array(a) => a.iter().enumerate().for_each(|(i, c)| walk(c, &format!("{path}/{i}"), plugin)),
            _ => {}
        }
    }
    for name in registry.names() {
        for schema in [registry.config_schema(name), registry.consumer_schema(name)].into_iter().flatten() {
            assert!(jsonschema::validator_for(schema).is_ok(), "{name}: {schema}");
            assert_eq!(schema["type"], "object", "{name}");
            walk(schema, "", name);
        }
    }
}

/// What `/plugins/key-auth` serves, exactly: the shape APISIX serves, with the descriptions the
/// config type's docs give, and Weir's additions (`bearer`, `scope`; hashed credentials).
#[test]
fn a_served_schema_has_apisix_shape() {
    let registry = weir_plugins::registry();
    let strip = |v: &Value| {
        let mut v = v.clone();
        fn drop_descriptions(v: &mut Value) {
            if let Value::Object(o) = v {
                o.remove("description");
                o.values_mut().for_each(drop_descriptions);
            }
        }
        drop_descriptions(&mut v);
        v
    };
    assert_eq!(
        strip(registry.config_schema("key-auth").unwrap()),
        json!({"type": "object", "properties": {
            "header": {"type": "string", "default": "apikey"},
            "query": {"type": "string", "default": "apikey"},
            "realm": {"type": "string", "default": "key"},
            "hide_credentials": {"type": "boolean", "default": false},
            "anonymous_consumer": {"type": "string", "minLength": 1},
            "bearer": {"type": "boolean", "default": false},
            "scope": {"type": "string", "minLength": 1, "maxLength": 128}
        }})
    );
    assert_eq!(
        strip(registry.consumer_schema("key-auth").unwrap()),
        json!({"type": "object", "properties": {
            "key": {"type": "string"},
            "key_hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "scope": {"type": "string", "minLength": 1, "maxLength": 128},
            "not_after": {"type": "integer"}
        },
        "oneOf": [{"required": ["key"]}, {"required": ["key_hash"]}],
        "dependencies": {"scope": ["key_hash"], "not_after": ["key_hash"]},
        "encrypt_fields": ["key"]})
    );
    // Defaults true stay true; flags stay flags.
    let mocking = registry.config_schema("mocking").unwrap();
    assert_eq!(mocking["properties"]["with_mock_header"]["default"], true);
    let cors = registry.config_schema("cors").unwrap();
    assert_eq!(cors["properties"]["allow_origins_by_regex"]["uniqueItems"], true);
}
