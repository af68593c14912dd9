//! Plugin configs typed once. A plugin's config is a Rust type: its JSON schema (served by the
//! Admin API as `/plugins/{name}`, checked at write time) is derived from the type, and its
//! parser is serde's for the same type, so the two cannot drift. A field APISIX's schema
//! closes (`additionalProperties: false`) is closed here with `#[serde(deny_unknown_fields)]`,
//! which the derived schema carries; where APISIX accepts unknown fields, so does Weir.
//!
//! Constraints serde cannot express (a pattern, a range, `oneOf` over required fields) are
//! `#[schemars(...)]` attributes on the type: they live beside the field they constrain.

use std::any::Any;
use std::sync::Arc;

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::Plugin;

/// The JSON schema of `C`, shaped as APISIX writes its schemas: no `$schema` or `title`, no
/// Rust number formats, optional fields without `null`, subschemas inline.
pub fn schema_of<C: JsonSchema>() -> Value {
    let mut settings = SchemaSettings::draft07();
    settings.inline_subschemas = true;
    let mut schema = settings.into_generator().into_root_schema_for::<C>().to_value();
    if let Some(o) = schema.as_object_mut() {
        o.remove("$schema");
        o.remove("title");
    }
    tidy(&mut schema);
    schema
}

/// Rust's integer widths are not JSON's; `Option` means "may be absent", never "may be null".
fn tidy(v: &mut Value) {
    const NUMBER_FORMATS: [&str; 12] = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "int", "uint", "float", "double"];
    let Value::Object(o) = v else {
        if let Value::Array(a) = v {
            a.iter_mut().for_each(tidy);
        }
        return;
    };
    if o.get("format").and_then(Value::as_str).is_some_and(|f| NUMBER_FORMATS.contains(&f)) {
        o.remove("format");
    }
    if let Some(Value::Array(types)) = o.get_mut("type") {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            let only = types.remove(0);
            o.insert("type".into(), only);
        }
    }
    if let Some(Value::Array(any)) = o.get_mut("anyOf") {
        let before = any.len();
        any.retain(|s| s.get("type").is_none_or(|t| t != "null") || s.as_object().is_some_and(|s| s.len() > 1));
        if any.len() == 1 && before == 2 {
            // `Option<T>` of a type with its own schema: T's schema, in place.
            if let Some(Value::Object(inner)) = o.remove("anyOf").and_then(|mut a| a.as_array_mut().map(|a| a.remove(0))) {
                for (k, val) in inner {
                    o.entry(k).or_insert(val);
                }
            }
        }
    }
    // `Option` of an enum lists `null` among its values.
    if let Some(Value::Array(values)) = o.get_mut("enum") {
        values.retain(|v| !v.is_null());
    }
    // Only into subschemas: `default`, `enum`, `const` and `uniqueItems` hold values, not
    // schemas, and are left as they are.
    for (key, val) in o.iter_mut() {
        match key.as_str() {
            "properties" | "patternProperties" | "definitions" | "$defs" | "dependencies" => {
                if let Value::Object(m) = val {
                    m.values_mut().for_each(subschema);
                }
            }
            "items" | "additionalItems" | "additionalProperties" | "propertyNames" | "contains" | "not" | "if" | "then" | "else" | "anyOf" | "oneOf" | "allOf" => {
                subschema(val)
            }
            _ => {}
        }
    }
}

/// `Option<Value>` is the schema `true` (anything); APISIX writes no constraint as `{}`.
fn subschema(v: &mut Value) {
    match v {
        Value::Bool(true) => *v = Value::Object(Map::new()),
        Value::Array(a) => a.iter_mut().for_each(subschema),
        _ => tidy(v),
    }
}

/// Parses `value` as `C`; an error names the field it is in.
pub fn parse<C: DeserializeOwned>(value: &Value) -> Result<C, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." { e.into_inner().to_string() } else { format!("property \"{path}\": {}", e.into_inner()) }
    })
}

/// What a builder is given besides its config.
pub struct Build<'a> {
    /// What the instance's state belongs to: the route, a `group`, or `"check"` when the
    /// config is only being checked (a builder then opens no connection).
    pub scope: &'a str,
    /// The plugin's `plugin_metadata`, if any.
    pub metadata: Option<&'a Value>,
    /// The process's `plugin_attr` settings for the plugin, if any.
    pub attr: Option<&'a Value>,
}

impl Build<'_> {
    /// Only checking the config: build nothing that outlives the call.
    pub fn is_check(&self) -> bool {
        self.scope == CHECK
    }
}

/// The scope a config is built in when it is only checked.
pub(crate) const CHECK: &str = "check";

pub(crate) type Builder = Box<dyn Fn(&Value, &Build<'_>) -> Result<Arc<dyn Plugin>, String> + Send + Sync>;
/// An auth plugin's credential preparation: the id callers are looked up by, and what checking
/// them needs.
pub(crate) type Preparer = Box<dyn Fn(&Value) -> Result<(String, Arc<dyn Any + Send + Sync>), String> + Send + Sync>;

/// How a plugin is known to a [`Registry`](crate::Registry): its name, default priority, its
/// config type (which gives the schema and the parser) and its builder.
pub struct Factory {
    pub(crate) name: &'static str,
    pub(crate) priority: i64,
    pub(crate) schema: Value,
    pub(crate) consumer_schema: Option<Value>,
    pub(crate) build: Builder,
    pub(crate) credential: Option<Preparer>,
}

impl Factory {
    /// A plugin configured by `C`. `build` runs when a snapshot is compiled (never per request)
    /// and at write time (with [`Build::is_check`]), so a config it refuses is refused there.
    pub fn new<C: DeserializeOwned + JsonSchema + 'static>(
        name: &'static str,
        priority: i64,
        build: fn(C, &Build<'_>) -> Result<Arc<dyn Plugin>, String>,
    ) -> Factory {
        Factory {
            name,
            priority,
            schema: schema_of::<C>(),
            consumer_schema: None,
            build: Box::new(move |value, b| build(parse(value)?, b)),
            credential: None,
        }
    }

    /// Makes this an auth plugin: a consumer's config of it is a `K`, which `prepare` turns into
    /// the id callers are looked up by and what checking them needs. Also run at write time, so
    /// a bad key is refused there.
    pub fn with_credential<K: DeserializeOwned + JsonSchema + 'static>(
        mut self,
        prepare: fn(K) -> Result<(String, Arc<dyn Any + Send + Sync>), String>,
    ) -> Factory {
        self.consumer_schema = Some(schema_of::<K>());
        self.credential = Some(Box::new(move |value| prepare(parse(value)?)));
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The config schema, as the Admin API serves it.
    pub fn schema(&self) -> &Value {
        &self.schema
    }
}

/// `_meta`, which every plugin config may carry. APISIX's schema closes it, so the schema here
/// does too (an unknown key is refused at write time); the data plane reads what it knows and
/// leaves the rest, so a store another APISIX version wrote still loads.
#[derive(Deserialize, JsonSchema, Default)]
#[schemars(extend("additionalProperties" = false))]
pub(crate) struct Meta {
    /// The plugin is configured but does not run.
    pub disable: Option<bool>,
    /// Replaces the plugin's default priority in this pipeline.
    pub priority: Option<i64>,
    /// A condition (APISIX's `vars` expression) on the request: the plugin runs only when it holds.
    pub filter: Option<Vec<Value>>,
    /// Replaces the body of any reply the plugin gives.
    pub error_response: Option<ErrorResponse>,
}

#[derive(Deserialize, JsonSchema, Clone)]
#[serde(untagged)]
pub(crate) enum ErrorResponse {
    Text(String),
    Object(Map<String, Value>),
}

impl ErrorResponse {
    pub(crate) fn into_value(self) -> Value {
        match self {
            ErrorResponse::Text(t) => Value::String(t),
            ErrorResponse::Object(o) => Value::Object(o),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, JsonSchema)]
    #[allow(dead_code)]
    struct Sample {
        #[schemars(range(min = 1))]
        count: u64,
        #[serde(default = "five")]
        max_age: i64,
        name: Option<String>,
        inner: Option<Inner>,
        any: Option<Value>,
    }

    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        a: String,
    }

    fn five() -> i64 {
        5
    }

    #[test]
    fn schemas_read_as_apisix_writes_them() {
        let s = schema_of::<Sample>();
        assert_eq!(
            s,
            serde_json::json!({
                "type": "object",
                "properties": {
                    "count": {"type": "integer", "minimum": 1},
                    "max_age": {"type": "integer", "default": 5},
                    "name": {"type": "string"},
                    "inner": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": false},
                    "any": {}
                },
                "required": ["count"]
            })
        );
    }

    #[test]
    fn a_parse_error_names_the_field() {
        let e = parse::<Sample>(&serde_json::json!({"count": 1, "inner": {"a": 3}})).err().unwrap();
        assert!(e.starts_with("property \"inner.a\""), "{e}");
        let e = parse::<Sample>(&serde_json::json!({"count": 1, "inner": {"a": "x", "b": 1}})).err().unwrap();
        assert!(e.contains("unknown field `b`"), "{e}");
    }

    #[test]
    fn meta_is_closed() {
        let s = schema_of::<Meta>();
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["error_response"]["anyOf"][0], serde_json::json!({"type": "string"}));
        let misspelt = serde_json::json!({"disabled": true});
        assert!(!jsonschema::validator_for(&s).unwrap().is_valid(&misspelt), "refused at write time");
        assert!(parse::<Meta>(&misspelt).is_ok(), "read by the data plane, which leaves what it does not know");
    }

    #[derive(Deserialize, JsonSchema)]
    #[allow(dead_code)]
    struct Flags {
        #[schemars(extend("uniqueItems" = true))]
        names: Vec<String>,
        free: Option<Value>,
        list: Option<Vec<Value>>,
    }

    #[test]
    fn only_schemas_become_objects() {
        let s = schema_of::<Flags>();
        assert_eq!(s["properties"]["names"]["uniqueItems"], true);
        assert_eq!(s["properties"]["free"], serde_json::json!({}));
        assert_eq!(s["properties"]["list"]["items"], serde_json::json!({}));
        assert!(jsonschema::validator_for(&s).is_ok());
    }
}
