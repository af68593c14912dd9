//! `consumers`: who a request is, named by `username`, with their auth plugins' credentials.

use std::sync::OnceLock;

use serde_json::{Value, json};

use crate::defs::{id_schema, object_schema, plugins_def};
use crate::{Kind, PluginSlot, Reference};

use super::read_plugin_holder;

pub struct Consumers;

const REFERENCES: &[Reference] = &[Reference {
    path: &["group_id"],
    kind: "consumer_groups",
    what: "consumer group info by consumer group",
    accept: None,
    holds: Some("can not delete this consumer group, consumer"),
}];

impl Kind for Consumers {
    fn name(&self) -> &'static str {
        "consumers"
    }

    fn noun(&self) -> &'static str {
        "consumer"
    }

    fn schema(&self) -> &Value {
        static SCHEMA: OnceLock<Value> = OnceLock::new();
        SCHEMA.get_or_init(|| {
            let mut s = object_schema(
                json!({
                    "username": {"type": "string", "minLength": 1, "maxLength": 256,
                        "pattern": "^[a-zA-Z0-9_\\-]+$"},
                    "group_id": id_schema(),
                    "plugins": plugins_def()
                }),
                false,
                &["username"],
            );
            s["properties"].as_object_mut().expect("object").remove("id");
            s
        })
    }

    fn id_field(&self) -> Option<&'static str> {
        Some("username")
    }

    fn allows_patch(&self) -> bool {
        false
    }

    fn plugins(&self) -> PluginSlot {
        PluginSlot::Consumer
    }

    fn references(&self) -> &'static [Reference] {
        REFERENCES
    }

    fn read(&self, value: &Value) -> Result<(), String> {
        read_plugin_holder(value)
    }
}
