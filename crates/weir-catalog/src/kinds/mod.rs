//! APISIX's resource kinds, one file each.

mod consumer;
mod credential;
mod plugin_holder;
mod plugin_metadata;
mod route;
mod service;
mod ssl;
mod upstream;

use std::sync::Arc;

use serde_json::{Map, Value};
use weir_tls::Keyring;

use crate::{Kind, Reference};

pub use consumer::Consumers;
pub use credential::Credentials;
pub use plugin_holder::PluginHolder;
pub use plugin_metadata::PluginMetadata;
pub use route::Routes;
pub use service::Services;
pub use ssl::Ssls;
pub use upstream::Upstreams;

/// APISIX's kinds, in the order the Admin API has always checked them.
pub fn apisix() -> Vec<Arc<dyn Kind>> {
    vec![
        Arc::new(Routes),
        Arc::new(Services),
        Arc::new(Upstreams),
        Arc::new(Consumers),
        Arc::new(Credentials),
        Arc::new(PluginHolder::consumer_groups()),
        Arc::new(PluginHolder::plugin_configs()),
        Arc::new(PluginHolder::global_rules()),
        Arc::new(Ssls),
        Arc::new(PluginMetadata),
    ]
}

/// An upstream's `tls.client_cert_id` names a client certificate (an `ssls` object of type
/// `client`); certificates are deleted without asking who uses them, as in APISIX.
const CLIENT_CERT: Reference = Reference {
    path: &["tls", "client_cert_id"],
    kind: "ssls",
    what: "ssl info by ssl",
    accept: Some((|ssl| ssl.get("type").and_then(Value::as_str) == Some("client"), "wrong ssl type")),
    holds: None,
};

/// An inline upstream's client certificate key is checked and sealed like a certificate's.
fn inline_upstream_seal(obj: &mut Map<String, Value>, keyring: &Keyring) -> Result<(), String> {
    match obj.get_mut("upstream") {
        Some(up) => weir_tls::seal_upstream_key(keyring, up, "upstream."),
        None => Ok(()),
    }
}

/// Consumers and credentials read as the data plane reads every plugin holder.
fn read_plugin_holder(value: &Value) -> Result<(), String> {
    crate::read_as::<weir_core::model::PluginHolder>(value)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use weir_core::schema::NoPlugins;

    use crate::Catalog;

    fn errs(name: &str, v: Value) -> Vec<String> {
        let c = Catalog::apisix();
        c.check(c.get(name).unwrap(), &v, &NoPlugins).err().unwrap_or_default()
    }

    #[test]
    fn valid_route_passes() {
        let v = json!({"uri": "/a", "upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:80": 1}}});
        assert_eq!(errs("routes", v), Vec::<String>::new());
    }

    #[test]
    fn route_reports_every_problem() {
        let v = json!({"uri": "/a", "uris": ["/b"], "host": "a.com", "hosts": ["b.com"],
            "remote_addr": "1.2.3.999", "vars": [["arg_a", "@@", "1"]], "upstream_id": 1});
        let e = errs("routes", v);
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e.iter().any(|m| m.contains("uri or uris")));
        assert!(e.iter().any(|m| m.contains("host or hosts")));
        assert!(e.iter().any(|m| m.contains("1.2.3.999")));
        assert!(e.iter().any(|m| m.contains("vars")));
    }

    #[test]
    fn unknown_fields_and_types_are_named() {
        let e = errs("routes", json!({"uri": 5, "upstream_id": "1", "bogus": true}));
        assert!(e.iter().any(|m| m.contains("bogus")), "{e:?}");
        assert!(e.iter().any(|m| m.contains("\"uri\"")), "{e:?}");
    }

    #[test]
    fn unknown_plugin_is_refused() {
        let e = errs("routes", json!({"uri": "/", "plugins": {"nope": {}}}));
        assert_eq!(e, vec!["unknown plugin [nope]".to_string()]);
    }

    #[test]
    fn upstream_nodes_are_checked() {
        let e = errs("upstreams", json!({"nodes": {"127.0.0.1:99999": 1}}));
        assert_eq!(e.len(), 1, "{e:?}");
        let e = errs("upstreams", json!({"nodes": [{"host": "a", "port": 1}]}));
        assert!(e.iter().any(|m| m.contains("weight")), "{e:?}");
        assert!(errs("upstreams", json!({"type": "chash", "nodes": {"a:1": 1}}))[0].contains("key"));
    }

    #[test]
    fn numbers_the_data_plane_cannot_hold_exactly_are_refused() {
        let route = |extra: &str| -> Value {
            serde_json::from_str(&format!(r#"{{"uri": "/a", "upstream_id": "1", {extra}}}"#)).unwrap()
        };
        for (extra, field) in [
            (r#""priority": 1.0"#, "priority"),
            (r#""priority": 1e2"#, "priority"),
            (r#""priority": 9223372036854775808"#, "priority"),
            (r#""status": 1.0"#, "status"),
        ] {
            let e = errs("routes", route(extra));
            assert_eq!(e.len(), 1, "{extra}: {e:?}");
            assert!(e[0].contains(&format!("\"{field}\"")), "{extra}: {e:?}");
        }
        assert!(errs("routes", route(r#""priority": -9223372036854775808"#)).is_empty());
        let e = errs("upstreams", serde_json::from_str(r#"{"nodes": {"127.0.0.1:80": 1.0}}"#).unwrap());
        assert_eq!(e.len(), 1, "{e:?}");
        let e = errs("upstreams", serde_json::from_str(r#"{"nodes": [{"host": "a", "port": 80, "weight": 1.0}]}"#).unwrap());
        assert_eq!(e.len(), 1, "{e:?}");
        let e = errs("routes", serde_json::from_str(r#"{"uri": "/", "upstream": {"nodes": {"a:1": 1}, "retries": 2.0}}"#).unwrap());
        assert!(e[0].contains("upstream.retries"), "{e:?}");
    }

    #[test]
    fn consumer_needs_username() {
        assert!(!errs("consumers", json!({})).is_empty());
        assert!(errs("consumers", json!({"username": "jack"})).is_empty());
        assert!(!errs("consumers", json!({"username": "ja ck"})).is_empty());
    }
}
