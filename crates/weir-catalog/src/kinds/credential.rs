//! `credentials`: one auth plugin's secret for a consumer, held under it
//! (`/consumers/{username}/credentials/{id}`).

use std::sync::OnceLock;

use serde_json::{Value, json};

use crate::defs::object_schema;
use crate::{Kind, PluginSlot};

use super::read_plugin_holder;

pub struct Credentials;

impl Kind for Credentials {
    fn name(&self) -> &'static str {
        "credentials"
    }

    fn noun(&self) -> &'static str {
        "credential"
    }

    fn schema(&self) -> &Value {
        static SCHEMA: OnceLock<Value> = OnceLock::new();
        SCHEMA.get_or_init(|| object_schema(json!({"plugins": {"type": "object", "maxProperties": 1}}), true, &[]))
    }

    fn parent(&self) -> Option<&'static str> {
        Some("consumers")
    }

    fn allows_patch(&self) -> bool {
        false
    }

    /// The declarative file holds no credentials.
    fn declarative(&self) -> bool {
        false
    }

    fn plugins(&self) -> PluginSlot {
        PluginSlot::Consumer
    }

    fn read(&self, value: &Value) -> Result<(), String> {
        read_plugin_holder(value)
    }
}
