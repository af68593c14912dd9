//! Plugin secrets at rest, as APISIX's `data_encryption`: the fields a plugin's schema lists as
//! `encrypt_fields` (a key-auth `key`, a basic-auth `password`, ...) are sealed with the keyring
//! before an object is stored. GET shows them opened, as APISIX decrypts on GET; a write's answer
//! shows the object as stored, as APISIX's does. A consumer's or credential's plugin uses its
//! `consumer_schema`'s list (or, for a plugin without one, its `schema`'s); every other object
//! uses the plugin's `schema`.
//!
//! A sealed field carries [`weir_tls::FIELD_MARK`]; a value without it is plain (a store APISIX
//! wrote, a file) and is used as it is.

use serde_json::{Map, Value};
use weir_core::schema::PluginCatalog;
use weir_tls::Keyring;

use crate::PluginSlot;

/// The `encrypt_fields` of plugin `name` in a `slot`.
fn fields<'a>(catalog: &'a dyn PluginCatalog, slot: PluginSlot, name: &str) -> Vec<&'a str> {
    let schema = if slot == PluginSlot::Consumer {
        catalog.consumer_schema(name).or_else(|| catalog.config_schema(name))
    } else {
        catalog.config_schema(name)
    };
    schema
        .and_then(|s| s.get("encrypt_fields"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Before an object is checked: opens every sealed value in its plugins (a PATCH merges onto
/// what is stored), so the checks see what the data plane will. A sealed value this keyring
/// cannot open is refused.
pub fn open(keyring: &Keyring, slot: PluginSlot, obj: &mut Map<String, Value>) -> Result<(), String> {
    if slot == PluginSlot::None {
        return Ok(());
    }
    let Some(Value::Object(plugins)) = obj.get_mut("plugins") else { return Ok(()) };
    for (name, conf) in plugins.iter_mut() {
        keyring
            .open_fields(conf)
            .map_err(|e| format!("plugin {name}: a sealed value cannot be opened with this node's keyring: {e}"))?;
    }
    Ok(())
}

/// After an object passed every check: seals its plugins' `encrypt_fields` for storing.
pub fn seal(keyring: &Keyring, catalog: &dyn PluginCatalog, slot: PluginSlot, obj: &mut Map<String, Value>) {
    if slot == PluginSlot::None {
        return;
    }
    let Some(Value::Object(plugins)) = obj.get_mut("plugins") else { return };
    for (name, conf) in plugins.iter_mut() {
        for path in fields(catalog, slot, name) {
            seal_path(conf, path, &|plain| keyring.seal_field(plain));
        }
    }
}

/// An object as GET shows it: sealed plugin fields opened. One that will not open (sealed with
/// a secret since dropped from the keyring) is shown as stored, as APISIX does.
pub fn show(keyring: &Keyring, slot: PluginSlot, value: &mut Value) {
    if slot == PluginSlot::None {
        return;
    }
    let Some(Value::Object(plugins)) = value.get_mut("plugins") else { return };
    for conf in plugins.values_mut() {
        if !Keyring::has_sealed_fields(conf) {
            continue;
        }
        let mut opened = conf.clone();
        if keyring.open_fields(&mut opened).is_ok() {
            *conf = opened;
        } else {
            open_each(keyring, conf);
        }
    }
}

/// Opens what opens, leaving the rest.
fn open_each(keyring: &Keyring, value: &mut Value) {
    let mut todo = vec![value];
    while let Some(v) = todo.pop() {
        match v {
            Value::String(s) => {
                if let Ok(std::borrow::Cow::Owned(plain)) = keyring.open_field(s) {
                    *s = plain;
                }
            }
            Value::Array(a) => todo.extend(a.iter_mut()),
            Value::Object(o) => todo.extend(o.values_mut()),
            _ => {}
        }
    }
}

/// Applies `f` to the strings at a dotted `path`, as APISIX's `process_encrypt_field`: an array
/// met on the way is walked item by item, and the leaf may be a string, an array of strings or
/// an object of strings.
fn seal_path(conf: &mut Value, path: &str, f: &dyn Fn(&str) -> String) {
    let apply = |v: &mut Value| {
        if let Value::String(s) = v {
            *s = f(s);
        }
    };
    match path.split_once('.') {
        None => match conf.get_mut(path) {
            Some(v @ Value::String(_)) => apply(v),
            Some(Value::Array(items)) => items.iter_mut().for_each(apply),
            Some(Value::Object(map)) => map.values_mut().for_each(apply),
            _ => {}
        },
        Some((head, rest)) => match conf.get_mut(head) {
            Some(Value::Array(items)) => {
                for item in items.iter_mut().filter(|i| i.is_object()) {
                    seal_path(item, rest, f);
                }
            }
            Some(inner @ Value::Object(_)) => seal_path(inner, rest, f),
            _ => {}
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_follow_apisix() {
        let f = |s: &str| format!("<{s}>");
        let mut v = json!({"a": "x", "b": ["y", 1], "c": {"k": "z"}, "d": [{"e": "w"}, 2], "g": {"h": {"i": "v"}}});
        for p in ["a", "b", "c", "d.e", "g.h.i", "missing.x", "a.b"] {
            seal_path(&mut v, p, &f);
        }
        assert_eq!(v, json!({"a": "<x>", "b": ["<y>", 1], "c": {"k": "<z>"}, "d": [{"e": "<w>"}, 2], "g": {"h": {"i": "<v>"}}}));
    }

    #[test]
    fn show_opens_what_it_can() {
        let ring = Keyring::new(&["one".to_string()]);
        let other = Keyring::new(&["two".to_string()]);
        let mut v = json!({"plugins": {"key-auth": {"key": ring.seal_field("k1")}, "x": {"a": other.seal_field("s"), "b": ring.seal_field("t")}}});
        let foreign = v["plugins"]["x"]["a"].clone();
        show(&ring, PluginSlot::Consumer, &mut v);
        assert_eq!(v["plugins"]["key-auth"]["key"], "k1");
        assert_eq!(v["plugins"]["x"]["a"], foreign);
        assert_eq!(v["plugins"]["x"]["b"], "t");
    }
}
