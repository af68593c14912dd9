//! `plugin_metadata`: settings a plugin shares across all its instances, named by the plugin.

use serde_json::{Value, json};
use weir_core::schema::PluginCatalog;

use crate::Kind;

pub struct PluginMetadata;

impl Kind for PluginMetadata {
    fn name(&self) -> &'static str {
        "plugin_metadata"
    }

    fn noun(&self) -> &'static str {
        "plugin_metadata"
    }

    fn schema(&self) -> &Value {
        static SCHEMA: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
        SCHEMA.get_or_init(|| json!({"type": "object"}))
    }

    fn id_field(&self) -> Option<&'static str> {
        None
    }

    fn check_id(&self, id: &str, plugins: &dyn PluginCatalog) -> Result<(), String> {
        match plugins.config_schema(id) {
            Some(_) => Ok(()),
            None => Err("invalid plugin name".into()),
        }
    }

    fn missing_id(&self) -> String {
        "missing plugin name".into()
    }

    fn allows_patch(&self) -> bool {
        false
    }
}
