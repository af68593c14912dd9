//! A plugin and a resource kind from outside the core crates: each defined here, registered
//! with one call, and then served and checked by the Admin API like APISIX's own, with no
//! other file changed. The Admin API is driven in process, without a socket.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};
use weir_admin::{Admin, AdminKey, Role};
use weir_catalog::{Catalog, Kind, Reference};
use weir_plugins::{Factory, JsonSchema, Plugin, Reply, RequestCtx};

const KEY: &str = "extension-test-key";

/// Answers every request with a greeting of its config's choosing.
struct Greeter(String);

impl Plugin for Greeter {
    fn access(&self, _ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        Err(Reply::new(200, Some(json!({"greeting": self.0}))))
    }
}

/// A plugin of this test's own, configured by its own type.
#[derive(serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct GreeterConfig {
    #[schemars(length(min = 1))]
    greeting: String,
}

fn greeter() -> Factory {
    Factory::new("x-greeter", 500, |c: GreeterConfig, _| {
        if c.greeting.contains('<') {
            return Err("a greeting is plain text".into());
        }
        Ok(Arc::new(Greeter(c.greeting)))
    })
}

async fn call(admin: &Admin, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let req = Request::builder().method(method).uri(format!("/apisix/admin{path}")).header("x-api-key", KEY).body(Full::new(body)).unwrap();
    let resp = admin.handle(req, Duration::from_secs(5)).await;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_plugin_registered_from_another_crate_is_served_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(weir_store::EmbeddedStore::open(dir.path()).unwrap());
    let mut plugins = weir_plugins::registry();
    plugins.register(greeter());
    let keyring = Arc::new(weir_tls::Keyring::new(&["a secret for this test".to_string()]));
    let keys = vec![AdminKey { name: "admin".into(), key: KEY.into(), role: Role::Admin }];
    let admin = Admin::new(store, "/apisix".into(), keys, Arc::new(plugins), keyring);

    let (status, list) = call(&admin, "GET", "/plugins/list", None).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = list.as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(names.contains(&"x-greeter") && names.contains(&"key-auth"), "{names:?}");
    let (status, schema) = call(&admin, "GET", "/plugins/x-greeter", None).await;
    assert_eq!((status, &schema["required"]), (StatusCode::OK, &json!(["greeting"])));

    let route = |conf: Value| json!({"uri": "/hello", "plugins": {"x-greeter": conf}, "upstream": {"nodes": {"127.0.0.1:1980": 1}}});
    // Its schema: a missing, mistyped or misspelt field is refused, and nothing is stored.
    for bad in [json!({}), json!({"greeting": 5}), json!({"greeting": "hi", "greting": "hi"})] {
        let (status, body) = call(&admin, "PUT", "/routes/1", Some(route(bad.clone()))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body["error_msg"].as_str().unwrap().contains("x-greeter"), "{body}");
    }
    // Its builder: what the schema lets through and the plugin cannot run is refused too.
    let (status, body) = call(&admin, "PUT", "/routes/1", Some(route(json!({"greeting": "<b>hi</b>"})))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error_msg"].as_str().unwrap().contains("plain text"), "{body}");
    assert_eq!(call(&admin, "GET", "/routes/1", None).await.0, StatusCode::NOT_FOUND);

    let (status, body) = call(&admin, "PUT", "/routes/1", Some(route(json!({"greeting": "hello"})))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = call(&admin, "GET", "/routes/1", None).await;
    assert_eq!((status, &body["value"]["plugins"]["x-greeter"]["greeting"]), (StatusCode::OK, &json!("hello")));
}

/// A kind of object the core has never heard of: a widget, which names the upstream it
/// measures and carries a token that is sealed at rest and never shown.
struct Widgets;

impl Kind for Widgets {
    fn name(&self) -> &'static str {
        "widgets"
    }

    fn noun(&self) -> &'static str {
        "widget"
    }

    fn schema(&self) -> &Value {
        static SCHEMA: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
        SCHEMA.get_or_init(|| {
            weir_catalog::object_schema(
                json!({
                    "size": {"type": "integer", "minimum": 1},
                    "upstream_id": weir_catalog::id_schema(),
                    "token": {"type": "string", "minLength": 1}
                }),
                true,
                &["size"],
            )
        })
    }

    fn allows_post(&self) -> bool {
        true
    }

    fn references(&self) -> &'static [Reference] {
        &[Reference { path: &["upstream_id"], kind: "upstreams", what: "upstream info by upstream", accept: None, holds: Some("can not delete this upstream, widget") }]
    }

    fn check(&self, value: &Value) -> Vec<String> {
        match value["size"].as_i64() {
            Some(n) if n % 2 == 1 => vec![format!("size {n} is odd; widgets come in pairs")],
            _ => Vec::new(),
        }
    }

    fn open(&self, obj: &mut serde_json::Map<String, Value>, keyring: &weir_tls::Keyring) -> Result<(), String> {
        if let Some(Value::String(t)) = obj.get_mut("token") {
            *t = keyring.open_field(t).map_err(|e| e.to_string())?.into_owned();
        }
        Ok(())
    }

    fn seal(&self, obj: &mut serde_json::Map<String, Value>, keyring: &weir_tls::Keyring) -> Result<(), String> {
        if let Some(Value::String(t)) = obj.get_mut("token") {
            *t = keyring.seal_field(t);
        }
        Ok(())
    }

    fn hide(&self, value: &mut Value) {
        if let Some(o) = value.as_object_mut() {
            o.remove("token");
        }
    }
}

#[tokio::test]
async fn a_resource_kind_registered_from_another_crate_is_served_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(weir_store::EmbeddedStore::open(dir.path()).unwrap());
    let mut kinds = Catalog::apisix();
    kinds.register(Arc::new(Widgets));
    let keyring = Arc::new(weir_tls::Keyring::new(&["a secret for this test".to_string()]));
    let keys = vec![AdminKey { name: "admin".into(), key: KEY.into(), role: Role::Admin }];
    let admin = Admin::new(store.clone(), "/apisix".into(), keys, Arc::new(weir_plugins::registry()), keyring).with_catalog(Arc::new(kinds));
    use weir_store::Store as _;

    // Its schema is served under its singular name, and the validate endpoint uses its checks.
    let (status, schema) = call(&admin, "GET", "/schema/widget", None).await;
    assert_eq!((status, &schema["required"]), (StatusCode::OK, &json!(["size"])));
    let (status, _) = call(&admin, "POST", "/schema/validate/widgets", Some(json!({"size": 2}))).await;
    assert_eq!(status, StatusCode::OK);

    // Schema, own checks and references: each refusal is named, and nothing is stored.
    for (bad, says) in [
        (json!({}), "size"),
        (json!({"size": 2, "colour": "red"}), "colour"),
        (json!({"size": 3}), "odd"),
        (json!({"size": 2, "upstream_id": "u1"}), "failed to fetch upstream info by upstream id [u1], response code: 404"),
    ] {
        let (status, body) = call(&admin, "PUT", "/widgets/w1", Some(bad.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body["error_msg"].as_str().unwrap().contains(says), "{bad}: {body}");
    }
    assert_eq!(call(&admin, "GET", "/widgets/w1", None).await.0, StatusCode::NOT_FOUND);

    let (status, _) = call(&admin, "PUT", "/upstreams/u1", Some(json!({"nodes": {"127.0.0.1:1980": 1}}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = call(&admin, "PUT", "/widgets/w1", Some(json!({"size": 2, "upstream_id": "u1", "token": "s3cret"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["key"], "/apisix/widgets/w1");
    assert!(body["value"].get("token").is_none(), "{body}");
    // At rest the token is sealed; it is never shown.
    let stored = store.get("/apisix/widgets/w1").await.unwrap().unwrap();
    let stored: Value = serde_json::from_slice(&stored.value).unwrap();
    assert!(stored["token"].as_str().is_some_and(|t| !t.contains("s3cret")), "{stored}");
    let (status, body) = call(&admin, "GET", "/widgets/w1", None).await;
    assert_eq!((status, &body["value"]["size"]), (StatusCode::OK, &json!(2)));
    assert!(body["value"].get("token").is_none(), "{body}");

    // A PATCH merges onto the stored object (its token opened for the checks, then sealed again).
    let (status, body) = call(&admin, "PATCH", "/widgets/w1", Some(json!({"size": 5}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = call(&admin, "PATCH", "/widgets/w1", Some(json!({"size": 4}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let stored: Value = serde_json::from_slice(&store.get("/apisix/widgets/w1").await.unwrap().unwrap().value).unwrap();
    assert_eq!(stored["size"], 4);
    assert!(stored["token"].as_str().is_some_and(|t| !t.contains("s3cret")), "{stored}");

    let (status, body) = call(&admin, "POST", "/widgets", Some(json!({"size": 6}))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, list) = call(&admin, "GET", "/widgets", None).await;
    assert_eq!((status, &list["total"]), (StatusCode::OK, &json!(2)));

    // Its reference holds the upstream back, as a route's would.
    let (status, body) = call(&admin, "DELETE", "/upstreams/u1", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error_msg"], "can not delete this upstream, widget [w1] is still using it now");
    assert_eq!(call(&admin, "DELETE", "/widgets/w1", None).await.0, StatusCode::OK);
    assert_eq!(call(&admin, "DELETE", "/upstreams/u1", None).await.0, StatusCode::OK);
}
