//! The Admin API through real sockets against a real `weir` process: every resource, method,
//! envelope and error the APISIX v3 API has.

mod common;

use common::{KEY, Weir, send};
use serde_json::{Value, json};

fn upstream_body() -> Value {
    json!({"type": "roundrobin", "nodes": {"127.0.0.1:1980": 1}})
}

#[tokio::test]
async fn authentication() {
    let w = Weir::start_in(
        tempfile::tempdir().unwrap(),
        "    - {name: ro, key: \"viewer-key-0123\", role: viewer}\n",
    );
    let r = send(w.admin, "GET", "/apisix/admin/routes", &[], None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json(), json!({"error_msg": "failed to check token", "description": "missing apikey"}));
    let r = send(w.admin, "GET", "/apisix/admin/routes", &[("x-api-key", "nope-nope")], None).await;
    assert_eq!(r.json()["description"], "wrong apikey");
    let r = send(w.admin, "GET", &format!("/apisix/admin/routes?api_key={KEY}"), &[], None).await;
    assert_eq!(r.status, 200);
    let cookie = format!("X-API-KEY={KEY}");
    let r = send(w.admin, "GET", "/apisix/admin/routes", &[("cookie", &cookie)], None).await;
    assert_eq!(r.status, 200);
    // A viewer reads but cannot write.
    let r = send(w.admin, "GET", "/apisix/admin/routes", &[("x-api-key", "viewer-key-0123")], None).await;
    assert_eq!(r.status, 200);
    let body = upstream_body().to_string();
    let r = send(w.admin, "PUT", "/apisix/admin/upstreams/1", &[("x-api-key", "viewer-key-0123")], Some(&body)).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["description"], "invalid method for role viewer");
    let (s, _) = w.admin("GET", "/upstreams/1", None).await;
    assert_eq!(s, 404, "the refused write changed nothing");
}

#[tokio::test]
async fn route_lifecycle_and_envelopes() {
    let w = Weir::start();
    assert_eq!(w.admin("PUT", "/upstreams/u1", Some(upstream_body())).await.0, 201);

    // PUT creates (201), then replaces (200); both answer {key, value}.
    let (s, b) = w.admin("PUT", "/routes/1", Some(json!({"uri": "/a", "upstream_id": "u1", "name": "first"}))).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["key"], "/apisix/routes/1");
    assert_eq!(b["value"]["id"], "1");
    let created = b["value"]["create_time"].as_i64().expect("create_time");
    assert!(b["value"]["update_time"].as_i64().is_some());
    let (s, b) = w.admin("PUT", "/routes/1", Some(json!({"uri": "/b", "upstream_id": "u1"}))).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["value"]["create_time"].as_i64(), Some(created), "create_time survives a replace");

    // GET one: {key, value, createdIndex, modifiedIndex}.
    let (s, b) = w.admin("GET", "/routes/1", None).await;
    assert_eq!(s, 200);
    assert_eq!(b["key"], "/apisix/routes/1");
    assert_eq!(b["value"]["uri"], "/b");
    let ci = b["createdIndex"].as_i64().unwrap();
    let mi = b["modifiedIndex"].as_i64().unwrap();
    assert!(mi > ci, "{b}");

    // The id may come from the body; a mismatch is refused.
    let (s, _) = w.admin("PUT", "/routes", Some(json!({"id": "2", "uri": "/c", "upstream_id": "u1"}))).await;
    assert_eq!(s, 201);
    let (s, b) = w.admin("PUT", "/routes/3", Some(json!({"id": "4", "uri": "/c", "upstream_id": "u1"}))).await;
    assert_eq!((s, b), (400, json!({"error_msg": "wrong route id"})));
    let (s, b) = w.admin("PUT", "/routes", Some(json!({"uri": "/c", "upstream_id": "u1"}))).await;
    assert_eq!((s, b), (400, json!({"error_msg": "missing route id"})));
    let (s, b) = w.admin("PUT", "/routes/5", Some(json!({"uri": "/c", "upstream_id": "u1", "create_time": 1}))).await;
    assert_eq!(s, 400);
    assert!(b["error_msg"].as_str().unwrap().contains("forbidden"), "{b}");

    // POST generates a 20-digit id.
    let (s, b) = w.admin("POST", "/routes", Some(json!({"uri": "/p", "upstream_id": "u1"}))).await;
    assert_eq!(s, 201, "{b}");
    let id = b["value"]["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 20);
    assert!(id.bytes().all(|c| c.is_ascii_digit()));
    assert_eq!(b["key"], format!("/apisix/routes/{id}"));
    let (s, b) = w.admin("POST", "/routes", Some(json!({"id": "9", "uri": "/p", "upstream_id": "u1"}))).await;
    assert_eq!((s, b), (400, json!({"error_msg": "wrong route id, do not need it"})));

    // List.
    let (s, b) = w.admin("GET", "/routes", None).await;
    assert_eq!(s, 200);
    assert_eq!(b["total"], 3);
    assert_eq!(b["list"].as_array().unwrap().len(), 3);
    assert!(b["list"][0]["createdIndex"].is_i64());

    // PATCH merges; a sub-path replaces one field; both keep the rest.
    let (s, b) = w.admin("PATCH", "/routes/1", Some(json!({"desc": "patched", "methods": ["GET"]}))).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["value"]["uri"], "/b");
    assert_eq!(b["value"]["desc"], "patched");
    let (s, b) = w.admin("PATCH", "/routes/1/methods", Some(json!(["POST", "PUT"]))).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["value"]["methods"], json!(["POST", "PUT"]));
    assert_eq!(b["value"]["desc"], "patched");
    let (s, b) = w.admin("PATCH", "/routes/1/uri", Some(json!(7))).await;
    assert_eq!(s, 400, "a patch that breaks the schema is refused: {b}");
    assert_eq!(w.admin("GET", "/routes/1", None).await.1["value"]["uri"], "/b");
    let (s, b) = w.admin("PATCH", "/routes/nope", Some(json!({"desc": "x"}))).await;
    assert_eq!((s, b), (404, json!({"message": "Key not found"})));
    let (s, b) = w.admin("PATCH", "/routes/1", None).await;
    assert_eq!((s, b), (400, json!({"error_msg": "missing new configuration"})));

    // DELETE.
    let (s, b) = w.admin("DELETE", "/routes/2", None).await;
    assert_eq!((s, b), (200, json!({"deleted": "1", "key": "/apisix/routes/2"})));
    let (s, b) = w.admin("DELETE", "/routes/2", None).await;
    assert_eq!((s, b), (404, json!({"message": "Key not found"})));
    let (s, b) = w.admin("GET", "/routes/2", None).await;
    assert_eq!((s, b), (404, json!({"message": "Key not found"})));
}

#[tokio::test]
async fn validation_names_every_problem_and_changes_nothing() {
    let w = Weir::start();
    let (s, b) = w
        .admin(
            "PUT",
            "/routes/1",
            Some(json!({"uri": 5, "hosts": "x", "methods": ["FETCH"], "upstream_id": "u", "bogus": true})),
        )
        .await;
    assert_eq!(s, 400);
    let msg = b["error_msg"].as_str().unwrap();
    assert!(msg.starts_with("invalid configuration: "), "{msg}");
    for needle in ["uri", "hosts", "FETCH", "bogus"] {
        assert!(msg.contains(needle), "{needle} missing from {msg}");
    }
    // Semantic checks report together too.
    let (s, b) = w
        .admin("PUT", "/routes/1", Some(json!({"uri": "/", "host": "a.com", "hosts": ["b.com"], "remote_addr": "10.0.0.0/99", "vars": [["arg_a", "??", 1]], "upstream": upstream_body()})))
        .await;
    assert_eq!(s, 400);
    let msg = b["error_msg"].as_str().unwrap();
    for needle in ["host or hosts", "10.0.0.0/99", "vars"] {
        assert!(msg.contains(needle), "{needle} missing from {msg}");
    }
    // Dangling references.
    let (s, b) = w.admin("PUT", "/routes/1", Some(json!({"uri": "/", "upstream_id": "nope"}))).await;
    assert_eq!(s, 400);
    assert_eq!(b["error_msg"], "failed to fetch upstream info by upstream id [nope], response code: 404");
    let (s, b) = w.admin("PUT", "/routes/1", Some(json!({"uri": "/", "service_id": "s", "plugin_config_id": "p"}))).await;
    assert_eq!(s, 400);
    let msg = b["error_msg"].as_str().unwrap();
    assert!(msg.contains("service id [s]") && msg.contains("plugin config id [p]"), "{msg}");
    // Unknown plugins are refused.
    let (s, b) = w.admin("PUT", "/routes/1", Some(json!({"uri": "/", "plugins": {"no-such-plugin": {}}}))).await;
    assert_eq!(s, 400);
    assert!(b["error_msg"].as_str().unwrap().contains("unknown plugin [no-such-plugin]"));
    // Not JSON.
    let r = send(w.admin, "PUT", "/apisix/admin/routes/1", &[("x-api-key", KEY)], Some("{nope")).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error_msg"].as_str().unwrap().starts_with("invalid request body"));
    // Too large.
    let big = format!("{{\"uri\":\"/\",\"desc\":\"{}\"}}", "x".repeat(1024 * 1024 * 3 / 2));
    let r = send(w.admin, "PUT", "/apisix/admin/routes/1", &[("x-api-key", KEY)], Some(&big)).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error_msg"].as_str().unwrap().contains("greater than the maximum size"), "{}", r.text());
    // None of it was stored.
    let (_, b) = w.admin("GET", "/routes", None).await;
    assert_eq!(b, json!({"list": [], "total": 0}));
    // Unknown resource, unsupported method.
    let (s, b) = w.admin("GET", "/widgets", None).await;
    assert_eq!((s, b), (404, json!({"error_msg": "Unsupported resource type: widgets"})));
    let (s, b) = w.admin("POST", "/consumers", Some(json!({"username": "x"}))).await;
    assert_eq!((s, b), (405, json!({"error_msg": "not supported `POST` method for consumer"})));
}

#[tokio::test]
async fn list_filters_and_pages() {
    let w = Weir::start();
    w.admin("PUT", "/upstreams/u", Some(upstream_body())).await;
    for i in 0..25 {
        let mut r = json!({"uri": format!("/item/{i}"), "upstream_id": "u", "name": format!("route-{i}")});
        if i % 5 == 0 {
            r["labels"] = json!({"team": "a"});
        }
        if i == 7 {
            r = json!({"uris": ["/special", "/other"], "upstream_id": "u", "name": "seven"});
        }
        assert_eq!(w.admin("PUT", &format!("/routes/{i}"), Some(r)).await.0, 201);
    }
    let (_, b) = w.admin("GET", "/routes?name=route-1", None).await;
    assert_eq!(b["total"], 11, "route-1 and route-10..19: {b}");
    let (_, b) = w.admin("GET", "/routes?label=team", None).await;
    assert_eq!(b["total"], 5);
    let (_, b) = w.admin("GET", "/routes?uri=special", None).await;
    assert_eq!(b["total"], 1);
    assert_eq!(b["list"][0]["value"]["name"], "seven");
    let (_, b) = w.admin("GET", "/routes?page=3&page_size=10", None).await;
    assert_eq!(b["total"], 25);
    let page: Vec<&str> = b["list"].as_array().unwrap().iter().map(|n| n["value"]["id"].as_str().unwrap()).collect();
    assert_eq!(page, ["20", "21", "22", "23", "24"], "pages follow creation order");
    let (s, b) = w.admin("GET", "/routes?page=1&page_size=5", None).await;
    assert_eq!((s, b), (400, json!({"error_msg": "page_size must be between 10 and 500"})));
    let (_, b) = w.admin("GET", "/routes?filter=upstream_id%3Du", None).await;
    assert_eq!(b["total"], 25);
}

#[tokio::test]
async fn services_upstreams_and_references() {
    let w = Weir::start();
    let (s, b) = w.admin("POST", "/upstreams", Some(upstream_body())).await;
    assert_eq!(s, 201, "{b}");
    let uid = b["value"]["id"].as_str().unwrap().to_string();
    let (s, b) = w.admin("PUT", "/services/s1", Some(json!({"upstream_id": uid, "hosts": ["a.com"]}))).await;
    assert_eq!(s, 201, "{b}");
    let (s, _) = w.admin("PUT", "/routes/r1", Some(json!({"uri": "/", "service_id": "s1"}))).await;
    assert_eq!(s, 201);

    let (s, b) = w.admin("DELETE", &format!("/upstreams/{uid}"), None).await;
    assert_eq!((s, b), (400, json!({"error_msg": "can not delete this upstream, service [s1] is still using it now"})));
    let (s, b) = w.admin("DELETE", "/services/s1", None).await;
    assert_eq!((s, b), (400, json!({"error_msg": "can not delete this service directly, route [r1] is still using it now"})));
    w.admin("PUT", "/routes/r2", Some(json!({"uri": "/x", "upstream_id": uid}))).await;
    w.admin("DELETE", "/routes/r1", None).await;
    let (s, b) = w.admin("DELETE", &format!("/upstreams/{uid}"), None).await;
    assert_eq!((s, b), (400, json!({"error_msg": "can not delete this upstream, route [r2] is still using it now"})));
    let (s, b) = w.admin("POST", "/services", Some(json!({"upstream_id": uid}))).await;
    assert_eq!(s, 201, "{b}");
    let generated = b["value"]["id"].as_str().unwrap().to_string();
    assert_eq!(w.admin("DELETE", &format!("/services/{generated}"), None).await.0, 200);
    let (s, b) = w.admin("PATCH", "/services/s1", Some(json!({"desc": "d"}))).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["value"]["hosts"], json!(["a.com"]));
    let (s, _) = w.admin("DELETE", &format!("/upstreams/{uid}?force=true"), None).await;
    assert_eq!(s, 200, "force skips the reference check");
    // A write that keeps a dangling reference is refused.
    let (s, _) = w.admin("PATCH", "/services/s1", Some(json!({"desc": "e"}))).await;
    assert_eq!(s, 400);
    let (s, _) = w.admin("DELETE", "/services/s1", None).await;
    assert_eq!(s, 200);
    let (s, b) = w.admin("PUT", "/upstreams/bad", Some(json!({"nodes": {"127.0.0.1:0": 1}, "type": "chash"}))).await;
    assert_eq!(s, 400);
    let msg = b["error_msg"].as_str().unwrap();
    assert!(msg.contains("127.0.0.1:0") && msg.contains("key is required"), "{msg}");
    let (s, b) = w.admin("PUT", "/upstreams/arr", Some(json!({"nodes": [{"host": "127.0.0.1", "port": 80, "weight": 1}]}))).await;
    assert_eq!(s, 201, "{b}");
}

#[tokio::test]
async fn consumers_credentials_and_groups() {
    let w = Weir::start();
    // Consumers are keyed by username: PUT on the collection, or on the name.
    let (s, b) = w.admin("PUT", "/consumers", Some(json!({"username": "jack", "desc": "d"}))).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["key"], "/apisix/consumers/jack");
    let (s, _) = w.admin("PUT", "/consumers/jack", Some(json!({"username": "jack"}))).await;
    assert_eq!(s, 200);
    let (s, b) = w.admin("PUT", "/consumers/jill", Some(json!({"username": "jack"}))).await;
    assert_eq!((s, b), (400, json!({"error_msg": "wrong username"})));
    let (s, _) = w.admin("PATCH", "/consumers/jack", Some(json!({"desc": "x"}))).await;
    assert_eq!(s, 405);

    // Credentials live under their consumer and are not listed as consumers.
    let (s, b) = w.admin("PUT", "/consumers/jack/credentials/c1", Some(json!({"plugins": {}, "desc": "cred"}))).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["key"], "/apisix/consumers/jack/credentials/c1");
    let (s, b) = w.admin("PUT", "/consumers/nobody/credentials/c1", Some(json!({"plugins": {}}))).await;
    assert_eq!((s, b), (404, json!({"error_msg": "consumer not found"})));
    let (s, b) = w.admin("GET", "/consumers/jack/credentials", None).await;
    assert_eq!(s, 200);
    assert_eq!(b["total"], 1);
    let (_, b) = w.admin("GET", "/consumers", None).await;
    assert_eq!(b["total"], 1, "credentials are not consumers: {b}");
    let (s, b) = w.admin("GET", "/consumers/jack/credentials/c1", None).await;
    assert_eq!(s, 200);
    assert_eq!(b["value"]["desc"], "cred");

    // Groups: PUT only, and not deletable while a consumer is in them.
    let (s, b) = w.admin("PUT", "/consumer_groups/g1", Some(json!({"plugins": {}}))).await;
    assert_eq!(s, 201, "{b}");
    let (s, _) = w.admin("POST", "/consumer_groups", Some(json!({"plugins": {}}))).await;
    assert_eq!(s, 405);
    let (s, b) = w.admin("PUT", "/consumers", Some(json!({"username": "ann", "group_id": "g2"}))).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(w.admin("PUT", "/consumers", Some(json!({"username": "ann", "group_id": "g1"}))).await.0, 201);
    let (s, b) = w.admin("DELETE", "/consumer_groups/g1", None).await;
    assert_eq!((s, b), (400, json!({"error_msg": "can not delete this consumer group, consumer [ann] is still using it now"})));

    // Deleting a consumer deletes its credentials.
    let (s, _) = w.admin("DELETE", "/consumers/jack", None).await;
    assert_eq!(s, 200);
    let (s, _) = w.admin("GET", "/consumers/jack/credentials/c1", None).await;
    assert_eq!(s, 404);
    let (s, _) = w.admin("DELETE", "/consumers/jack/credentials/c1", None).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn plugin_configs_global_rules_ssls_metadata() {
    let w = Weir::start();
    let (s, b) = w.admin("PUT", "/plugin_configs/pc", Some(json!({"plugins": {}, "desc": "d"}))).await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = w.admin("PUT", "/plugin_configs/pc2", Some(json!({"desc": "no plugins"}))).await;
    assert_eq!(s, 400, "plugins is required: {b}");
    w.admin("PUT", "/routes/r", Some(json!({"uri": "/", "plugin_config_id": "pc", "upstream": upstream_body()}))).await;
    let (s, b) = w.admin("DELETE", "/plugin_configs/pc", None).await;
    assert_eq!((s, b), (400, json!({"error_msg": "can not delete this plugin config, route [r] is still using it now"})));
    let (s, _) = w.admin("PATCH", "/plugin_configs/pc", Some(json!({"desc": "e"}))).await;
    assert_eq!(s, 200);

    let (s, b) = w.admin("PUT", "/global_rules/g", Some(json!({"plugins": {}}))).await;
    assert_eq!(s, 201, "{b}");
    let (s, _) = w.admin("POST", "/global_rules", Some(json!({"plugins": {}}))).await;
    assert_eq!(s, 405);
    let (s, _) = w.admin("DELETE", "/global_rules/g", None).await;
    assert_eq!(s, 200);

    // SSL objects: POST allowed; the private key is never returned.
    let pair = rcgen::generate_simple_self_signed(vec!["a.com".to_string()]).unwrap();
    let (cert, key) = (pair.cert.pem(), pair.signing_key.serialize_pem());
    let (s, b) = w.admin("POST", "/ssls", Some(json!({"cert": cert, "key": key, "snis": ["a.com"]}))).await;
    assert_eq!(s, 201, "{b}");
    assert!(b["value"].get("key").is_none());
    let id = b["value"]["id"].as_str().unwrap().to_string();
    let (_, b) = w.admin("GET", &format!("/ssls/{id}"), None).await;
    assert_eq!(b["value"]["snis"], json!(["a.com"]));
    assert!(b["value"].get("key").is_none(), "{b}");
    let (_, b) = w.admin("GET", "/ssls", None).await;
    assert!(b["list"][0]["value"].get("key").is_none());
    let (s, _) = w.admin("PUT", "/ssls/x", Some(json!({"cert": cert, "key": key}))).await;
    assert_eq!(s, 400, "a server certificate needs snis");

    let (s, b) = w.admin("PUT", "/plugin_metadata/no-such-plugin", Some(json!({}))).await;
    assert_eq!((s, b), (400, json!({"error_msg": "invalid plugin name"})));
    let (s, _) = w.admin("GET", "/plugin_metadata/no-such-plugin", None).await;
    assert_eq!(s, 404);

    let (s, b) = w.admin("GET", "/plugins/list", None).await;
    assert_eq!(s, 200);
    let names: Vec<&str> = b.as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert!(names.is_sorted(), "{names:?}");
    for expected in ["cors", "jwt-auth", "key-auth", "limit-count", "prometheus", "traffic-split"] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    // Every listed plugin serves its schema.
    for name in &names {
        let (s, schema) = w.admin("GET", &format!("/plugins/{name}"), None).await;
        assert_eq!((s, &schema["type"]), (200, &json!("object")), "{name}");
    }
    let (s, b) = w.admin("GET", "/plugins/key-auth", None).await;
    assert_eq!((s, &b["properties"]["header"]["default"]), (200, &json!("apikey")), "{b}");
    let (s, b) = w.admin("GET", "/plugins/key-auth?schema_type=consumer", None).await;
    // APISIX's `key`, or Weir's keyed hash of it (`key_hash`): exactly one.
    assert_eq!((s, &b["oneOf"][0]["required"], &b["encrypt_fields"]), (200, &json!(["key"]), &json!(["key"])), "the consumer schema: {b}");
    let (s, _) = w.admin("GET", "/plugins/no-such-plugin", None).await;
    assert_eq!(s, 404);

    let (s, b) = w.admin("GET", "/schema/route", None).await;
    assert_eq!(s, 200);
    assert!(b["properties"]["uri"].is_object(), "{b}");
    let (s, _) = w.admin("POST", "/schema/validate/routes", Some(json!({"uri": "/", "upstream_id": 1}))).await;
    assert_eq!(s, 200);
    let (s, b) = w.admin("POST", "/schema/validate/routes", Some(json!({"uri": 1}))).await;
    assert_eq!(s, 400);
    assert!(b["error_msg"].as_str().unwrap().contains("uri"));
    let r = send(w.admin, "HEAD", "/apisix/admin", &[("x-api-key", KEY)], None).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn concurrent_patches_lose_nothing() {
    let w = std::sync::Arc::new(Weir::start());
    w.admin("PUT", "/routes/1", Some(json!({"uri": "/", "upstream": upstream_body(), "labels": {}}))).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            w.admin("PATCH", "/routes/1", Some(json!({"labels": {format!("k{i}"): "v"}}))).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let (_, b) = w.admin("GET", "/routes/1", None).await;
    assert_eq!(b["value"]["labels"].as_object().unwrap().len(), 20, "{b}");
}
