//! The kinds that hold only plugins: `consumer_groups` (shared by the consumers of a group),
//! `plugin_configs` (shared by routes by id) and `global_rules` (run for every matched
//! request). They differ in name alone.

use serde_json::{Value, json};

use crate::defs::{object_schema, plugins_def};
use crate::{Kind, PluginSlot, read_as};

pub struct PluginHolder {
    name: &'static str,
    noun: &'static str,
    schema_name: &'static str,
    schema: Value,
}

impl PluginHolder {
    /// `named`: whether objects carry a `name`.
    fn new(name: &'static str, noun: &'static str, schema_name: &'static str, named: bool) -> PluginHolder {
        PluginHolder { name, noun, schema_name, schema: object_schema(json!({"plugins": plugins_def()}), named, &["plugins"]) }
    }

    pub fn consumer_groups() -> PluginHolder {
        PluginHolder::new("consumer_groups", "consumer group", "consumer_group", true)
    }

    pub fn plugin_configs() -> PluginHolder {
        PluginHolder::new("plugin_configs", "plugin config", "plugin_config", true)
    }

    pub fn global_rules() -> PluginHolder {
        PluginHolder::new("global_rules", "global rule", "global_rule", false)
    }
}

impl Kind for PluginHolder {
    fn name(&self) -> &'static str {
        self.name
    }

    fn noun(&self) -> &'static str {
        self.noun
    }

    fn schema_name(&self) -> &'static str {
        self.schema_name
    }

    fn schema(&self) -> &Value {
        &self.schema
    }

    fn plugins(&self) -> PluginSlot {
        PluginSlot::Route
    }

    fn read(&self, value: &Value) -> Result<(), String> {
        read_as::<weir_core::model::PluginHolder>(value)
    }
}
