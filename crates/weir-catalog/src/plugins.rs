//! The plugin configs an object holds, checked against each plugin's schema and its own checks.

use serde_json::Value;
use weir_core::expr::Expr;
use weir_core::schema::PluginCatalog;

use crate::{PluginSlot, describe};

/// Adds to `errors` every problem with the `plugins` of `value`.
pub(crate) fn check(slot: PluginSlot, value: &Value, plugins: &dyn PluginCatalog, errors: &mut Vec<String>) {
    if slot == PluginSlot::None {
        return;
    }
    let Some(Value::Object(configs)) = value.get("plugins") else { return };
    let on_consumer = slot == PluginSlot::Consumer;
    let meta_schema = plugins.meta_schema();
    for (name, conf) in configs {
        let schema = if on_consumer {
            plugins.consumer_schema(name).or_else(|| plugins.config_schema(name))
        } else {
            plugins.config_schema(name)
        };
        let Some(schema) = schema else {
            errors.push(format!("unknown plugin [{name}]"));
            continue;
        };
        let mut plain = conf.clone();
        let meta = plain.as_object_mut().and_then(|o| o.remove("_meta"));
        let against = |schema: &Value, v: &Value, what: &str, errors: &mut Vec<String>| match jsonschema::validator_for(schema) {
            Ok(validator) => {
                for e in validator.iter_errors(v) {
                    errors.push(format!("failed to check the configuration of plugin {name}{what}: {}", describe(&e)));
                }
            }
            Err(e) => errors.push(format!("plugin {name} has an invalid schema: {e}")),
        };
        let before = errors.len();
        against(schema, &plain, "", errors);
        if errors.len() == before {
            let checked = if on_consumer { plugins.check_consumer_config(name, &plain) } else { plugins.check_config(name, &plain) };
            if let Err(e) = checked {
                errors.push(format!("failed to check the configuration of plugin {name}: {e}"));
            }
        }
        if let Some(meta) = &meta {
            against(&meta_schema, meta, " (_meta)", errors);
            if let Some(filter) = meta.get("filter")
                && let Err(e) = Expr::compile(filter)
            {
                errors.push(format!("failed to check the configuration of plugin {name} (_meta): filter: {e}"));
            }
        }
    }
}
