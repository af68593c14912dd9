//! A plugin from outside the core crates: defined here, registered with one call, and then
//! listed, described and checked by the Admin API like APISIX's own, with no other file
//! changed. The Admin API is driven in process, without a socket.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};
use weir_admin::{Admin, AdminKey, Role};
use weir_plugins::{Factory, Plugin, Reply, RequestCtx};

const KEY: &str = "extension-test-key";

/// Answers every request with a greeting of its config's choosing.
struct Greeter(String);

impl Plugin for Greeter {
    fn access(&self, _ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        Err(Reply::new(200, Some(json!({"greeting": self.0}))))
    }
}

fn greeter() -> Factory {
    Factory {
        name: "x-greeter",
        priority: 500,
        schema: json!({"type": "object", "properties": {"greeting": {"type": "string", "minLength": 1}},
            "required": ["greeting"], "additionalProperties": false}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| {
            let greeting = conf.get("greeting").and_then(Value::as_str).ok_or("greeting is required")?;
            if greeting.contains('<') {
                return Err("a greeting is plain text".into());
            }
            Ok(Arc::new(Greeter(greeting.to_string())))
        },
    }
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
