//! The API platform end to end, against a real `weir` process: a gateway is created, its three
//! environments are provisioned as APISIX objects, requests reach each environment with its
//! merged plugins, and stop and delete take everything down.

mod common;

use std::time::Duration;

use common::platform::{fn_path, on_loopback, platform_node, platform_weir, problems, started_gateway, until_gateway, v1, v1_as};
use common::{KEY, Upstream, Weir, send};
use serde_json::{Value, json};





#[tokio::test]
async fn a_gateway_is_provisioned_serves_its_environments_and_is_taken_down() {
    let w = on_loopback("");
    let up = Upstream::start("backend").await;

    let (s, b) = v1(&w, "POST", "api-gateways", Some(json!({"name": "Shop", "gatewayId": "shop",
        "plugins": {"limit-count": {"count": 100, "time_window": 60, "rejected_code": 429}}}))).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!((&b["gatewayId"], &b["state"], &b["phase"], &b["environments"]), (&json!("shop"), &json!("Running"), &json!("Creating"), &json!([])));
    let (s, b) = v1(&w, "POST", "api-gateways", Some(json!({"name": "Again", "gatewayId": "shop"}))).await;
    assert_eq!((s, &b["error"]["kind"]), (409, &json!("conflict")), "{b}");

    let gw = until_gateway(&w, "shop", |_, b| b["phase"] == "Started").await;
    let envs: Vec<(&str, &str)> = gw["environments"].as_array().unwrap().iter().map(|e| (e["name"].as_str().unwrap(), e["phase"].as_str().unwrap())).collect();
    assert_eq!(envs, [("dev", "Started"), ("staging", "Started"), ("prod", "Started")]);

    // Outside every environment, and in an environment with nothing behind it: 404 JSON. A
    // gateway this node marked started is served here already: no polling.
    let shop = [("host", "shop.localhost")];
    let outside = "no environment at this path: use /dev, /staging or /prod";
    let r = w.get("/elsewhere", &shop).await;
    assert_eq!((r.status, r.headers["content-type"].to_str().unwrap(), r.json()["error_msg"].as_str()), (404, "application/json", Some(outside)), "{}", r.text());
    let r = w.get("/staging/x", &shop).await;
    assert_eq!((r.status, r.json()["error_msg"].as_str()), (404, Some("nothing is published at this path")));

    // The environment gets an upstream and a plugin of its own that overrides the gateway's.
    let index = |b: Value| b["modifiedIndex"].as_i64().unwrap();
    let staging_before = index(w.admin("GET", "/plugin_configs/wp.shop.staging", None).await.1);
    let upstream = json!({"type": "roundrobin", "nodes": {up.node(): 1}});
    let (s, b) = v1(&w, "PATCH", "api-gateways/shop/environments/dev", Some(json!({"upstream": upstream,
        "plugins": {"limit-count": {"count": 50, "time_window": 60, "rejected_code": 429}}}))).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["plugins"]["limit-count"]["count"], 50);
    let r = w.until("/dev/hello?x=1", &shop, |r| r.status == 200).await;
    let staging_after = index(w.admin("GET", "/plugin_configs/wp.shop.staging", None).await.1);
    assert_eq!(staging_before, staging_after, "a change to dev rewrites nothing of staging");
    assert_eq!(r.json()["uri"], "/hello?x=1", "the /dev prefix is removed before the upstream");
    assert_eq!(r.headers["x-ratelimit-limit"], "50", "the environment's limit-count wins");
    assert!(r.headers.contains_key("access-control-allow-origin"), "the base layer's cors applies");
    let r = w.get("/there", &[("host", "shop.dev.localhost")]).await;
    assert_eq!((r.status, r.json()["uri"].clone()), (200, json!("/there")), "the environment's own host");
    let r = w.get("/dev", &shop).await;
    assert_eq!((r.status, r.json()["uri"].clone()), (200, json!("/")));

    // Custom domains: the gateway's carry the environments as paths, an environment's is
    // the environment whole.
    assert_eq!(v1(&w, "PATCH", "api-gateways/shop", Some(json!({"customDomains": ["api.shop.test"]}))).await.0, 200);
    assert_eq!(v1(&w, "PATCH", "api-gateways/shop/environments/dev", Some(json!({"customDomain": "dev.shop.test"}))).await.0, 200);
    let r = w.until("/dev/on-custom", &[("host", "api.shop.test")], |r| r.status == 200).await;
    assert_eq!(r.json()["uri"], "/on-custom");
    let r = w.until("/whole", &[("host", "dev.shop.test")], |r| r.status == 200).await;
    assert_eq!(r.json()["uri"], "/whole");
    assert_eq!(v1(&w, "PATCH", "api-gateways/shop/environments/dev", Some(json!({"customDomain": null}))).await.0, 200);
    w.until("/whole", &[("host", "dev.shop.test")], |r| r.status == 404).await;

    // Auth on: with no keys handed out yet, every request is refused.
    let (s, _) = v1(&w, "PATCH", "api-gateways/shop/environments/staging", Some(json!({"authType": "key-auth", "upstream": upstream}))).await;
    assert_eq!(s, 200);
    let r = w.until("/staging/x", &shop, |r| r.status == 401).await;
    assert_eq!(r.json()["message"], "Missing API key in request");
    let hits = up.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(w.get("/x", &[("host", "shop.staging.localhost"), ("apikey", "guess")]).await.status, 401);
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), hits, "nothing reached the upstream");

    // Where each plugin came from.
    let (s, b) = v1(&w, "GET", "api-gateways/shop/environments/dev/effective-plugins", None).await;
    assert_eq!(s, 200);
    let layer = |name: &str| b["plugins"].as_array().unwrap().iter().find(|p| p["name"] == name).map(|p| p["layer"].clone());
    assert_eq!((layer("limit-count"), layer("cors")), (Some(json!("environment")), Some(json!("base"))));

    // The generated objects are APISIX's own, and the Admin API will not change them.
    let (s, b) = w.admin("GET", "/routes/wp.shop.dev", None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["value"]["labels"]["weir-managed-gateway"], "shop");
    let (s, b) = w.admin("PUT", "/routes/wp.shop.dev", Some(json!({"uri": "/x", "upstream": upstream}))).await;
    assert_eq!(s, 400, "{b}");
    assert!(b["error_msg"].as_str().unwrap().contains("/v1/api-gateways/shop"), "{b}");
    assert_eq!(w.admin("DELETE", "/plugin_configs/wp.shop.dev", None).await.0, 400);
    let by_body = json!({"id": "wp.shop.dev", "uri": "/x", "upstream": upstream});
    assert_eq!(w.admin("PUT", "/routes", Some(by_body)).await.0, 400, "the id in the body counts too");
    assert_eq!(w.admin("PUT", "/routes/wp.other.x", Some(json!({"uri": "/x", "upstream": upstream}))).await.0, 400, "the platform's ids are its own");
    let forged = json!({"uri": "/y", "upstream": upstream, "labels": {"weir-managed-gateway": "shop"}});
    assert_eq!(w.admin("PUT", "/routes/forged", Some(forged)).await.0, 400);

    // An inactive environment answers 503; a stopped gateway answers 503 everywhere.
    let (s, _) = v1(&w, "PATCH", "api-gateways/shop/environments/prod", Some(json!({"state": "inactive", "upstream": upstream}))).await;
    assert_eq!(s, 200);
    w.until("/prod/x", &shop, |r| r.status == 503).await;
    let (s, _) = v1(&w, "PATCH", "api-gateways/shop", Some(json!({"state": "Stopped"}))).await;
    assert_eq!(s, 200);
    let r = w.until("/dev/hello", &shop, |r| r.status == 503).await;
    assert_eq!(r.json()["error_msg"], "this gateway is stopped");
    until_gateway(&w, "shop", |_, b| b["phase"] == "Stopped").await;
    let (s, _) = v1(&w, "PATCH", "api-gateways/shop", Some(json!({"state": "Running"}))).await;
    assert_eq!(s, 200);
    w.until("/dev/hello", &shop, |r| r.status == 200).await;

    // Deleted: the gateway and every object it owned are gone.
    let (s, b) = v1(&w, "DELETE", "api-gateways/shop", None).await;
    assert_eq!((s, &b["phase"]), (202, &json!("Deleting")), "{b}");
    until_gateway(&w, "shop", |s, _| s == 404).await;
    let backup = send(w.admin, "GET", "/apisix/admin/backup", &[("x-api-key", KEY)], None).await.json();
    assert!(!backup.to_string().contains("shop"), "nothing of the gateway is left (objects, document, domains): {backup}");
    assert_eq!(w.admin("GET", "/routes", None).await.1["total"], 0);
    assert_eq!(w.admin("GET", "/plugin_configs", None).await.1["total"], 0);
    w.until("/dev/hello", &shop, |r| r.status == 404).await;
}

#[tokio::test]
async fn bad_input_is_refused_in_full_and_nothing_is_stored() {
    let w = Weir::start_in(tempfile::tempdir().unwrap(), "    - {name: ro, key: \"viewer-key-0123\", role: viewer}\n");
    // Wrong types, an unknown field, an oversize value, a bad id: every problem listed.
    let (s, b) = v1(&w, "POST", "api-gateways", Some(json!({"name": "x".repeat(101), "gatewayId": "Not_A_Label",
        "customDomains": "api.example.test", "promotionPipeline": {"enabled": "yes"}, "owner": "me"}))).await;
    assert_eq!((s, &b["error"]["kind"]), (400, &json!("bad_input")), "{b}");
    let p = problems(&b);
    for field in ["name", "gatewayId", "customDomains", "promotionPipeline.enabled", "owner"] {
        assert!(p.iter().any(|p| p.starts_with(field) || p.contains(&format!("'{field}'")) || p.contains(&format!("\"{field}\""))), "{field} in {p:?}");
    }
    let (s, b) = v1(&w, "POST", "api-gateways", Some(json!({"name": 7}))).await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = v1(&w, "POST", "api-gateways", None).await;
    assert_eq!(s, 400, "{b}");

    // A plugin layer APISIX's schema or checks refuse: the layer and field are named.
    let (s, b) = v1(&w, "POST", "api-gateways", Some(json!({"name": "c", "gatewayId": "cors1",
        "plugins": {"cors": {"allow_credential": true}, "limit-count": {"count": "many"}}}))).await;
    assert_eq!(s, 400, "{b}");
    let p = problems(&b);
    assert!(p.iter().any(|p| p.starts_with("plugins (gateway layer)") && p.contains("cors")), "{p:?}");
    assert!(p.iter().any(|p| p.starts_with("plugins (gateway layer)") && p.contains("limit-count")), "{p:?}");
    // A plugin that would write to the node's disk is not a tenant's to use.
    let (s, b) = v1(&w, "POST", "api-gateways", Some(json!({"name": "f", "plugins": {"file-logger": {"path": "/tmp/weir-tenant.log"}}}))).await;
    assert_eq!(s, 400, "{b}");
    assert!(problems(&b)[0].contains("file-logger is not available"), "{b}");
    // Nor is one whose series and lock are the whole node's.
    let (s, b) = v1(&w, "POST", "api-gateways", Some(json!({"name": "m", "plugins": {"prometheus": {}}}))).await;
    assert!(s == 400 && problems(&b)[0].contains("prometheus is not available"), "{b}");
    // A value that looks sealed is not a tenant's to send: the node would open it as its own.
    let (s, b) = v1(&w, "POST", "api-gateways", Some(json!({"name": "s", "env": [{"name": "X", "value": "$weir-sealed$AAAA"}]}))).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(problems(&b), ["env.0.value: a value may not start with $weir-sealed$"], "{b}");
    let (_, list) = v1(&w, "GET", "api-gateways", None).await;
    assert_eq!(list["total"], 0, "nothing was stored");

    // A stored gateway: a bad change to it changes nothing.
    assert_eq!(v1(&w, "POST", "api-gateways", Some(json!({"name": "ok", "gatewayId": "okay"}))).await.0, 201);
    until_gateway(&w, "okay", |_, b| b["phase"] == "Started").await;
    let (s, b) = v1(&w, "PATCH", "api-gateways/okay/environments/dev", Some(json!({"authType": "oauth", "upstream": {"nodes": "x"}, "colour": 1}))).await;
    assert_eq!(s, 400, "{b}");
    assert!(problems(&b).len() >= 3, "{b}");
    // The node itself and the operator's objects are out of a tenant's reach.
    let (s, b) = v1(&w, "PATCH", "api-gateways/okay/environments/dev", Some(json!({"upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:2379": 1, "169.254.169.254:80": 1}, "tls": {"client_cert_id": "1"}}}))).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(problems(&b).len(), 3, "{b}");
    let (s, b) = v1(&w, "PATCH", "api-gateways/okay", Some(json!({"plugins": {"limit-count": {"count": 1, "time_window": 1, "group": "shared"}}, "customDomains": ["10.0.0.5"]}))).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(problems(&b).len(), 2, "{b}");
    // What every environment's document copies is bounded in all: the variables, an upstream.
    let vars: Vec<Value> = (0..3).map(|i| json!({"name": format!("V{i}"), "value": "v".repeat(30_000)})).collect();
    let (s, b) = v1(&w, "PATCH", "api-gateways/okay", Some(json!({"env": vars}))).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(problems(&b), ["env: 90006 bytes of names and values as JSON, more than the 65536 a gateway's variables may hold"], "{b}");
    // Counted as JSON writes them: 12,000 control characters are 72,000 bytes there.
    let (s, b) = v1(&w, "PATCH", "api-gateways/okay", Some(json!({"env": [{"name": "C", "value": "\u{1}".repeat(12_000)}]}))).await;
    assert_eq!((s, problems(&b)), (400, vec!["env: 72001 bytes of names and values as JSON, more than the 65536 a gateway's variables may hold".to_string()]), "{b}");
    let nodes: serde_json::Map<String, Value> = (0..3000).map(|i| (format!("n{i}.example.test:80"), json!(1))).collect();
    let (s, b) = v1(&w, "PATCH", "api-gateways/okay/environments/dev", Some(json!({"upstream": {"type": "roundrobin", "nodes": nodes}}))).await;
    assert_eq!(s, 400, "{b}");
    assert!(problems(&b)[0].contains("more than the 65536 an upstream may hold"), "{b}");
    let (_, b) = v1(&w, "GET", "api-gateways/okay", None).await;
    assert_eq!((&b["env"], &b["environments"][0]["upstream"]), (&json!([]), &Value::Null), "nothing was changed: {b}");
    let (s, b) = v1(&w, "PATCH", "api-gateways/okay/environments/dev", Some(json!({"upstream": {"type": "roundrobin"}}))).await;
    assert_eq!(s, 400, "an upstream without nodes: {b}");
    assert!(problems(&b)[0].starts_with("upstream"), "{b}");
    let (_, dev) = v1(&w, "GET", "api-gateways/okay/environments/dev", None).await;
    assert_eq!((&dev["authType"], &dev["upstream"]), (&json!("none"), &Value::Null));
    assert_eq!(v1(&w, "GET", "api-gateways/okay/environments/qa", None).await.0, 404);
    assert_eq!(v1(&w, "GET", "api-gateways/nope", None).await.0, 404);

    // A viewer key reads and may not write; no key gets 401.
    let viewer = [("x-api-key", "viewer-key-0123")];
    assert_eq!(send(w.admin, "GET", "/v1/api-gateways", &viewer, None).await.status, 200);
    let r = send(w.admin, "POST", "/v1/api-gateways", &viewer, Some("{\"name\":\"v\"}")).await;
    assert_eq!((r.status, r.json()["error"]["kind"].clone()), (403, json!("forbidden")));
    let r = send(w.admin, "GET", "/v1/api-gateways", &[], None).await;
    assert_eq!((r.status, r.json()["error"]["kind"].clone()), (401, json!("unauthorized")), "the platform's own envelope");
    // A body past the listener's bound: 413 in the platform's envelope, APISIX's 400 on its paths.
    let before = v1(&w, "GET", "api-gateways", None).await.1["total"].clone();
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(2 << 20));
    let r = send(w.admin, "POST", "/v1/api-gateways", &[("x-api-key", KEY)], Some(&big)).await;
    assert_eq!((r.status, r.json()["error"]["kind"].clone()), (413, json!("too_large")), "{}", r.text());
    let r = send(w.admin, "PUT", "/apisix/admin/routes/big", &[("x-api-key", KEY)], Some(&big)).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error_msg"].as_str().unwrap().contains("greater than the maximum size"), "{}", r.text());
    assert_eq!(v1(&w, "GET", "api-gateways", None).await.1["total"], before, "nothing stored");
    // The control API still answers beside it.
    assert_eq!(w.control("healthcheck").await.0, 200);
}


#[tokio::test]
async fn tokens_see_only_their_gateways_and_write_only_where_their_role_may() {
    let w = Weir::start();
    // An admin key makes an owner token; it is shown once, and stored only as a hash.
    let (s, b) = v1(&w, "POST", "tokens", Some(json!({"name": "alice", "role": "owner"}))).await;
    assert_eq!(s, 201, "{b}");
    let alice = b["token"].as_str().unwrap().to_string();
    let (_, list) = v1(&w, "GET", "tokens", None).await;
    assert!(!list.to_string().contains(&alice[4..]), "a listed token never shows its secret");
    let backup = send(w.admin, "GET", "/apisix/admin/backup", &[("x-api-key", KEY)], None).await.text();
    assert!(!backup.contains(&alice[4..]), "the store never holds a token");
    let (s, b) = v1(&w, "POST", "tokens", Some(json!({"name": "bob", "role": "owner"}))).await;
    assert_eq!(s, 201, "{b}");
    let bob = b["token"].as_str().unwrap().to_string();

    // Each owner creates a gateway, which joins its token's gateways.
    assert_eq!(v1_as(&w, &alice, "POST", "api-gateways", Some(json!({"name": "A", "gatewayId": "gw-a"}))).await.0, 201);
    assert_eq!(v1_as(&w, &bob, "POST", "api-gateways", Some(json!({"name": "B", "gatewayId": "gw-b"}))).await.0, 201);
    until_gateway(&w, "gw-a", |_, b| b["phase"] == "Started").await;
    until_gateway(&w, "gw-b", |_, b| b["phase"] == "Started").await;

    // Alice sees her gateway and nothing of Bob's: every path under it is "not found".
    let (s, b) = v1_as(&w, &alice, "GET", "api-gateways", None).await;
    assert_eq!((s, b["total"].clone()), (200, json!(1)), "{b}");
    assert_eq!(b["list"][0]["gatewayId"], "gw-a");
    for (method, path, body) in [
        ("GET", "api-gateways/gw-b", None),
        ("PATCH", "api-gateways/gw-b", Some(json!({"name": "mine"}))),
        ("DELETE", "api-gateways/gw-b", None),
        ("GET", "api-gateways/gw-b/environments", None),
        ("GET", "api-gateways/gw-b/environments/dev", None),
        ("PATCH", "api-gateways/gw-b/environments/dev", Some(json!({"state": "inactive"}))),
        ("GET", "api-gateways/gw-b/environments/dev/effective-plugins", None),
    ] {
        let (s, b) = v1_as(&w, &alice, method, path, body).await;
        assert_eq!(s, 404, "{method} {path}: {b}");
        assert_eq!(b, json!({"error": {"kind": "not_found", "message": "gateway not found", "problems": []}}), "the same answer as a gateway that does not exist");
    }
    let (_, nowhere) = v1_as(&w, &alice, "GET", "api-gateways/no-such-gw", None).await;
    assert_eq!(nowhere, v1_as(&w, &alice, "GET", "api-gateways/gw-b", None).await.1);
    let (_, b) = v1(&w, "GET", "api-gateways/gw-b", None).await;
    assert_eq!(b["name"], "B", "Bob's gateway is untouched");

    // Alice hands out a developer and a qa token on her gateway; not an owner one, and not on Bob's.
    let (s, b) = v1_as(&w, &alice, "POST", "tokens", Some(json!({"name": "dev", "role": "developer"}))).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["gateways"], json!(["gw-a"]));
    let dev = b["token"].as_str().unwrap().to_string();
    let qa = v1_as(&w, &alice, "POST", "tokens", Some(json!({"name": "qa", "role": "qa", "gateways": ["gw-a"]}))).await.1["token"].as_str().unwrap().to_string();
    assert_eq!(v1_as(&w, &alice, "POST", "tokens", Some(json!({"name": "o", "role": "owner"}))).await.0, 403);
    let (s, b) = v1_as(&w, &alice, "POST", "tokens", Some(json!({"name": "x", "role": "viewer", "gateways": ["gw-b"]}))).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(v1_as(&w, &dev, "POST", "tokens", Some(json!({"name": "y", "role": "viewer"}))).await.0, 403);

    // A developer writes in dev only; qa in staging only; neither changes the gateway.
    let plugins = json!({"plugins": {"limit-count": {"count": 9, "time_window": 60}}});
    assert_eq!(v1_as(&w, &dev, "PATCH", "api-gateways/gw-a/environments/dev", Some(plugins.clone())).await.0, 200);
    for env in ["staging", "prod"] {
        let (s, b) = v1_as(&w, &dev, "PATCH", &format!("api-gateways/gw-a/environments/{env}"), Some(plugins.clone())).await;
        assert_eq!((s, b["error"]["kind"].clone()), (403, json!("forbidden")), "developer on {env}");
    }
    assert_eq!(v1_as(&w, &dev, "GET", "api-gateways/gw-a/environments/prod", None).await.0, 200, "a developer reads prod");
    assert_eq!(v1_as(&w, &qa, "PATCH", "api-gateways/gw-a/environments/staging", Some(plugins.clone())).await.0, 200);
    assert_eq!(v1_as(&w, &qa, "PATCH", "api-gateways/gw-a/environments/prod", Some(plugins.clone())).await.0, 403);
    assert_eq!(v1_as(&w, &qa, "PATCH", "api-gateways/gw-a/environments/dev", Some(plugins.clone())).await.0, 403);
    assert_eq!(v1_as(&w, &dev, "PATCH", "api-gateways/gw-a", Some(json!({"name": "x"}))).await.0, 403);
    assert_eq!(v1_as(&w, &dev, "POST", "api-gateways", Some(json!({"name": "x"}))).await.0, 403);
    assert_eq!(v1_as(&w, &dev, "GET", "api-gateways/gw-b", None).await.0, 404);

    // Tokens never reach the APISIX Admin API; unknown, revoked and expired tokens are refused alike.
    let auth = format!("Bearer {alice}");
    assert_eq!(send(w.admin, "GET", "/apisix/admin/routes", &[("authorization", &auth)], None).await.status, 401);
    assert_eq!(v1_as(&w, "wpt_0000", "GET", "api-gateways", None).await.0, 401);
    let dev_id = v1_as(&w, &alice, "GET", "tokens", None).await.1["list"].as_array().unwrap().iter().find(|t| t["name"] == "dev").unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(v1_as(&w, &bob, "DELETE", &format!("tokens/{dev_id}"), None).await.0, 404, "Bob cannot revoke Alice's tokens");
    assert_eq!(v1_as(&w, &alice, "DELETE", &format!("tokens/{dev_id}"), None).await.0, 200);
    assert_eq!(v1_as(&w, &dev, "GET", "api-gateways", None).await.0, 401, "revoked at once");
    let (s, b) = v1(&w, "POST", "tokens", Some(json!({"name": "old", "role": "viewer", "expiresAt": "2001-01-01T00:00:00Z"}))).await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = v1(&w, "POST", "tokens", Some(json!({"name": "v", "role": "viewer", "gateways": ["gw-a"], "expiresAt": "2099-01-01T00:00:00Z"}))).await;
    assert_eq!(s, 201, "{b}");
    let viewer = b["token"].as_str().unwrap().to_string();
    assert_eq!(v1_as(&w, &viewer, "GET", "api-gateways/gw-a", None).await.0, 200);
    assert_eq!(v1_as(&w, &viewer, "PATCH", "api-gateways/gw-a/environments/dev", Some(plugins)).await.0, 403);

    // A host is one tenant's: a custom domain another gateway holds is a conflict, and the
    // platform's own names are nobody's to take.
    assert_eq!(v1_as(&w, &alice, "PATCH", "api-gateways/gw-a", Some(json!({"customDomains": ["shared.example.test"]}))).await.0, 200);
    let (s, b) = v1_as(&w, &bob, "PATCH", "api-gateways/gw-b", Some(json!({"customDomains": ["shared.example.test"]}))).await;
    assert_eq!((s, b["error"]["kind"].clone()), (409, json!("conflict")), "{b}");
    assert!(!b.to_string().contains("gw-a"), "the holder is not named: {b}");
    assert_eq!(v1_as(&w, &bob, "PATCH", "api-gateways/gw-b/environments/dev", Some(json!({"customDomain": "SHARED.example.test"}))).await.0, 409);
    let (s, b) = v1_as(&w, &bob, "PATCH", "api-gateways/gw-b/environments/dev", Some(json!({"customDomain": "gw-a.dev.localhost"}))).await;
    assert_eq!(s, 400, "{b}");
    assert!(problems(&b)[0].contains("base domain"), "{b}");
    let (s, b) = v1_as(&w, &bob, "POST", "api-gateways", Some(json!({"name": "Grab", "gatewayId": "grab", "customDomains": ["shared.example.test"]}))).await;
    assert_eq!(s, 409, "{b}");
    assert_eq!(v1(&w, "GET", "api-gateways/grab", None).await.0, 404, "nothing was stored");
    // Nor is a host the operator serves, by a route or a certificate, though the platform
    // would name it after the gateway's id.
    assert_eq!(w.admin("PUT", "/routes/console", Some(json!({"uri": "/*", "host": "console.localhost", "upstream": {"nodes": {"127.0.0.1:1980": 1}}}))).await.0, 201);
    let (s, b) = v1_as(&w, &bob, "POST", "api-gateways", Some(json!({"name": "Console", "gatewayId": "console"}))).await;
    assert_eq!((s, problems(&b)), (409, vec!["gatewayId: console.localhost is the operator's".to_string()]), "{b}");
    // A custom domain the operator's certificate names is the operator's too; a wildcard
    // certificate under the base domain (how the operator serves every gateway over TLS)
    // leaves the gateways' own hosts alone.
    for (id, sni) in [("secure", "secure.example.test"), ("wild", "*.localhost")] {
        let pair = rcgen::generate_simple_self_signed(vec![sni.to_string()]).unwrap();
        let (cert, key) = (pair.cert.pem(), pair.signing_key.serialize_pem());
        assert_eq!(w.admin("PUT", &format!("/ssls/{id}"), Some(json!({"cert": cert, "key": key, "snis": [sni]}))).await.0, 201);
    }
    let (s, b) = v1_as(&w, &bob, "POST", "api-gateways", Some(json!({"name": "Secure", "customDomains": ["secure.example.test"]}))).await;
    assert_eq!((s, problems(&b)), (409, vec!["customDomains: secure.example.test is taken".to_string()]), "{b}");
    assert_eq!(v1_as(&w, &bob, "POST", "api-gateways", Some(json!({"name": "Drawn"}))).await.0, 201);

    // A deleted gateway leaves its tokens and its domains; another tenant's gateway made
    // later under the same id is not theirs.
    assert_eq!(v1_as(&w, &alice, "DELETE", "api-gateways/gw-a", None).await.0, 202);
    until_gateway(&w, "gw-a", |s, _| s == 404).await;
    assert_eq!(v1_as(&w, &bob, "PATCH", "api-gateways/gw-b", Some(json!({"customDomains": ["shared.example.test"]}))).await.0, 200);
    assert_eq!(v1_as(&w, &bob, "POST", "api-gateways", Some(json!({"name": "Again", "gatewayId": "gw-a"}))).await.0, 201);
    assert_eq!(v1_as(&w, &alice, "GET", "api-gateways/gw-a", None).await.0, 404);
    assert_eq!(v1_as(&w, &qa, "GET", "api-gateways/gw-a", None).await.0, 404);
    assert_eq!(v1_as(&w, &bob, "GET", "api-gateways/gw-a", None).await.0, 200);
}



/// Tokens a token makes: shown with the end they really have (their maker's, where it comes
/// first), and never more than a maker may make, however many are asked for at once.
#[tokio::test]
async fn a_tokens_makings_end_with_it_and_stay_within_its_bound() {
    let w = on_loopback("");
    let (s, b) = v1(&w, "POST", "tokens", Some(json!({"name": "carol", "role": "owner", "expiresAt": "2090-01-01T00:00:00Z"}))).await;
    assert_eq!(s, 201, "{b}");
    let carol = b["token"].as_str().unwrap().to_string();
    for asked in [json!("2099-01-01T00:00:00Z"), Value::Null] {
        let (s, b) = v1_as(&w, &carol, "POST", "tokens", Some(json!({"name": "child", "role": "viewer", "expiresAt": asked}))).await;
        assert_eq!((s, &b["expiresAt"]), (201, &json!("2090-01-01T00:00:00Z")), "{b}");
    }
    let (s, b) = v1_as(&w, &carol, "POST", "tokens", Some(json!({"name": "sooner", "role": "viewer", "expiresAt": "2080-01-01T00:00:00Z"}))).await;
    assert_eq!((s, &b["expiresAt"]), (201, &json!("2080-01-01T00:00:00Z")), "{b}");
    // Up to five short of the bound, then ten at once: five are made.
    for i in 3..995 {
        assert_eq!(v1_as(&w, &carol, "POST", "tokens", Some(json!({"name": format!("t{i}"), "role": "viewer"}))).await.0, 201);
    }
    let at_once: Vec<_> = (0..10).map(|i| v1_as(&w, &carol, "POST", "tokens", Some(json!({"name": format!("late{i}"), "role": "viewer"})))).collect();
    let mut statuses: Vec<u16> = futures_util::future::join_all(at_once).await.into_iter().map(|(s, _)| s).collect();
    statuses.sort();
    assert_eq!(statuses, [201, 201, 201, 201, 201, 429, 429, 429, 429, 429]);
    assert_eq!(v1_as(&w, &carol, "GET", "tokens", None).await.1["total"], 1000);
}

#[tokio::test]
async fn a_node_killed_mid_step_is_taken_over_after_its_lease_and_every_node_serves_every_gateway() {
    let etcd = common::Etcd::start().await;
    // Node A pauses after taking a gateway's lease, so it can be killed in the middle of a step.
    let a = platform_node(&etcd, &[("WEIR_PLATFORM_PAUSE_AFTER_CLAIM_MS", "60000")]);
    let (s, b) = v1(&a, "POST", "api-gateways", Some(json!({"name": "Held", "gatewayId": "held"}))).await;
    assert_eq!(s, 201, "{b}");
    let a_node = format!("{}-", a.pid());
    let held = until_gateway(&a, "held", |_, b| b["lockedBy"].as_str().is_some_and(|n| n.starts_with(&a_node))).await;
    assert_eq!(held["phase"], "Creating");
    a.kill9();

    // Node B finds the gateway claimed and leaves it alone until the lease expires, then
    // finishes what A began.
    let b_node = platform_node(&etcd, &[]);
    let started = std::time::Instant::now();
    let mut seen_held = false;
    let done = loop {
        let (_, g) = v1(&b_node, "GET", "api-gateways/held", None).await;
        if g["phase"] == "Started" {
            break g;
        }
        if g["lockedBy"].as_str().is_some_and(|n| n.starts_with(&a_node)) {
            assert_eq!(g["phase"], "Creating", "nothing moves while A's lease holds: {g}");
            seen_held = true;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "B never finished the gateway: {g}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(seen_held, "B saw A's lease before taking over");
    let claimed_at = held["lockedAt"].as_u64().expect("A's lease has a time");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(now >= claimed_at + 2000, "B waited for A's 2 s lease to expire: finished {} ms after A's claim", now - claimed_at);
    assert_eq!(done["lockedBy"], Value::Null);
    assert_eq!(done["environments"].as_array().unwrap().len(), 3);
    // Started is recorded once the objects are stored; the data plane follows in a moment.
    b_node.until("/dev/x", &[("host", "held.localhost")], |r| r.status == 404 && r.json()["error_msg"] == "nothing is published at this path").await;

    // With two live nodes, a gateway created and changed on one serves on the other.
    let c = platform_node(&etcd, &[]);
    let up = Upstream::start("backend").await;
    assert_eq!(v1(&c, "POST", "api-gateways", Some(json!({"name": "Both", "gatewayId": "both"}))).await.0, 201);
    until_gateway(&b_node, "both", |_, b| b["phase"] == "Started").await;
    let upstream = json!({"type": "roundrobin", "nodes": {up.node(): 1}});
    assert_eq!(v1(&c, "PATCH", "api-gateways/both/environments/prod", Some(json!({"upstream": upstream}))).await.0, 200);
    let r = b_node.until("/prod/hi", &[("host", "both.localhost")], |r| r.status == 200).await;
    assert_eq!(r.json()["uri"], "/hi");
    let r = c.until("/hi", &[("host", "both.prod.localhost")], |r| r.status == 200).await;
    assert_eq!(r.json()["server"], "backend");

    // A function saved on C is live on B, and so is its next version.
    let (s, b) = v1(&c, "POST", "api-gateways/both/functions", Some(json!({"name": "where", "source": {"code": "export default () => ({ v: 1 })"}}))).await;
    assert_eq!(s, 201, "{b}");
    b_node.until("/dev/where", &[("host", "both.localhost")], |r| r.status == 200 && r.json() == json!({"v": 1})).await;
    assert_eq!(v1(&c, "PATCH", &fn_path("both", "dev/where"), Some(json!({"source": {"code": "export default () => ({ v: 2 })"}}))).await.0, 200);
    b_node.until("/where", &[("host", "both.dev.localhost")], |r| r.json() == json!({"v": 2})).await;
}

/// Checks `body`, answered with `status` by `method` on `template`, against the OpenAPI
/// document's schema for that answer.
fn conforms(doc: &Value, method: &str, template: &str, status: u16, body: &Value) {
    let op = &doc["paths"][template][method.to_lowercase()];
    assert!(op.is_object(), "{method} {template} is in the document");
    let schema = &op["responses"][status.to_string()]["content"]["application/json"]["schema"];
    assert!(schema.is_object(), "{method} {template} {status} is in the document");
    let root = json!({"$ref": schema["$ref"], "components": doc["components"]});
    let validator = jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("{method} {template}: {e}"));
    let errors: Vec<String> = validator.iter_errors(body).map(|e| format!("{}: {e}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{method} {template} {status} answered {body}, which the document does not allow: {errors:?}");
}

#[tokio::test]
async fn the_openapi_document_describes_real_answers_and_every_field_is_checked() {
    let w = on_loopback("");
    let (s, doc) = v1(&w, "GET", "openapi.json", None).await;
    assert_eq!((s, &doc["openapi"]), (200, &json!("3.1.0")));
    let off = std::panic::catch_unwind(|| conforms(&doc, "GET", "/v1/api-gateways/{gid}", 200, &json!({"gatewayId": 5, "phase": "Dancing"})));
    assert!(off.is_err(), "the check can fail");

    // Real answers, each checked against the document.
    let calls: Vec<(&str, &str, String, Option<Value>, u16)> = vec![
        ("POST", "/v1/api-gateways", "api-gateways".into(), Some(json!({"name": "Doc", "gatewayId": "doc", "customDomains": ["doc.example.test"]})), 201),
        ("POST", "/v1/api-gateways", "api-gateways".into(), Some(json!({"name": "Doc", "gatewayId": "doc"})), 409),
        ("POST", "/v1/api-gateways", "api-gateways".into(), Some(json!({"name": 1})), 400),
        ("GET", "/v1/api-gateways", "api-gateways".into(), None, 200),
        ("GET", "/v1/api-gateways/{gid}", "api-gateways/nope".into(), None, 404),
    ];
    for (method, template, path, body, want) in calls {
        let (s, b) = v1(&w, method, &path, body).await;
        assert_eq!(s, want, "{method} {path}: {b}");
        conforms(&doc, method, template, s, &b);
    }
    until_gateway(&w, "doc", |_, b| b["phase"] == "Started").await;
    let calls: Vec<(&str, &str, String, Option<Value>, u16)> = vec![
        ("GET", "/v1/api-gateways/{gid}", "api-gateways/doc".into(), None, 200),
        ("PATCH", "/v1/api-gateways/{gid}", "api-gateways/doc".into(), Some(json!({"name": "Docs", "plugins": {"cors": {}}})), 200),
        ("GET", "/v1/api-gateways/{gid}/environments", "api-gateways/doc/environments".into(), None, 200),
        ("GET", "/v1/api-gateways/{gid}/environments/{env}", "api-gateways/doc/environments/dev".into(), None, 200),
        ("PATCH", "/v1/api-gateways/{gid}/environments/{env}", "api-gateways/doc/environments/dev".into(),
            Some(json!({"authType": "key-auth", "customDomain": "dev.doc.example.test", "upstream": {"nodes": {"127.0.0.1:1980": 1}, "type": "roundrobin"}})), 200),
        ("GET", "/v1/api-gateways/{gid}/environments/{env}/effective-plugins", "api-gateways/doc/environments/dev/effective-plugins".into(), None, 200),
        ("POST", "/v1/tokens", "tokens".into(), Some(json!({"name": "t", "role": "developer", "gateways": ["doc"], "expiresAt": "2099-12-31T23:59:59Z"})), 201),
        ("GET", "/v1/tokens", "tokens".into(), None, 200),
        ("GET", "/v1/whoami", "whoami".into(), None, 200),
        ("POST", "/v1/api-gateways/{gid}/functions", "api-gateways/doc/functions".into(), Some(json!({"name": "a/b", "methods": ["GET"], "tags": ["t"], "source": {"code": "export default (ctx) => { console.log('hi'); return { ok: 1 } }"}})), 201),
        ("POST", "/v1/api-gateways/{gid}/functions", "api-gateways/doc/functions".into(), Some(json!({"name": "a/b", "source": {"code": "export default () => 1"}})), 409),
        ("POST", "/v1/api-gateways/{gid}/functions", "api-gateways/doc/functions".into(), Some(json!({"name": "c", "source": {"code": "export default (("}})), 400),
        ("GET", "/v1/api-gateways/{gid}/functions", "api-gateways/doc/functions".into(), None, 200),
        ("GET", "/v1/api-gateways/{gid}/functions/{fn}", "api-gateways/doc/functions/dev%2Fa%2Fb".into(), None, 200),
        ("PATCH", "/v1/api-gateways/{gid}/functions/{fn}", "api-gateways/doc/functions/dev%2Fa%2Fb".into(), Some(json!({"semver": "1.0.1", "changelog": "c"})), 200),
        ("POST", "/v1/api-gateways/{gid}/functions/{fn}/invoke", "api-gateways/doc/functions/dev%2Fa%2Fb/invoke".into(), Some(json!({"method": "GET"})), 200),
        ("GET", "/v1/api-gateways/{gid}/functions/{fn}/logs", "api-gateways/doc/functions/dev%2Fa%2Fb/logs".into(), None, 200),
        ("GET", "/v1/api-gateways/{gid}/functions/{fn}/history", "api-gateways/doc/functions/dev%2Fa%2Fb/history".into(), None, 200),
        ("GET", "/v1/api-gateways/{gid}/functions/{fn}/history/{version}", "api-gateways/doc/functions/dev%2Fa%2Fb/history/1".into(), None, 200),
        ("GET", "/v1/api-gateways/{gid}/functions/{fn}/history/{version}", "api-gateways/doc/functions/dev%2Fa%2Fb/history/9".into(), None, 404),
        ("POST", "/v1/api-gateways/{gid}/functions/{fn}/deploy-to-stage", "api-gateways/doc/functions/dev%2Fa%2Fb/deploy-to-stage".into(), Some(json!({"targetStage": "staging", "semver": "1.0.1", "changelog": "first"})), 200),
        ("POST", "/v1/api-gateways/{gid}/functions/{fn}/deploy-to-stage", "api-gateways/doc/functions/dev%2Fa%2Fb/deploy-to-stage".into(), Some(json!({"targetStage": "dev"})), 400),
        ("POST", "/v1/api-gateways/{gid}/functions/{fn}/rollback", "api-gateways/doc/functions/dev%2Fa%2Fb/rollback".into(), Some(json!({"version": 1})), 200),
        ("POST", "/v1/api-gateways/{gid}/functions/{fn}/rollback", "api-gateways/doc/functions/dev%2Fa%2Fb/rollback".into(), Some(json!({"version": 99})), 404),
        ("GET", "/v1/api-gateways/{gid}/functions/compare", "api-gateways/doc/functions/compare?source=dev/a/b&target=staging/a/b".into(), None, 200),
        ("GET", "/v1/api-gateways/{gid}/functions/compare", "api-gateways/doc/functions/compare?source=dev/a/b".into(), None, 400),
        ("GET", "/v1/api-gateways/{gid}/deployments", "api-gateways/doc/deployments?environment=staging".into(), None, 200),
        ("GET", "/v1/api-gateways/{gid}/deployments", "api-gateways/doc/deployments?environment=qa".into(), None, 400),
        ("POST", "/v1/api-gateways/{gid}/triggers", "api-gateways/doc/triggers".into(), Some(json!({"function": "a/b", "environment": "dev", "cron": "0 0 1 1 *", "body": {"k": 1}})), 201),
        ("POST", "/v1/api-gateways/{gid}/triggers", "api-gateways/doc/triggers".into(), Some(json!({"function": "a/b", "environment": "dev", "cron": "99 * * * *"})), 400),
        ("GET", "/v1/api-gateways/{gid}/triggers", "api-gateways/doc/triggers".into(), None, 200),
        ("DELETE", "/v1/api-gateways/{gid}/functions/{fn}", "api-gateways/doc/functions/dev%2Fa%2Fb".into(), None, 200),
        ("GET", "/v1/api-gateways/{gid}/functions/{fn}", "api-gateways/doc/functions/dev%2Fa%2Fb".into(), None, 404),
    ];
    for (method, template, path, body, want) in calls {
        let (s, b) = v1(&w, method, &path, body).await;
        assert_eq!(s, want, "{method} {path}: {b}");
        conforms(&doc, method, template, s, &b);
    }
    let (_, b) = v1(&w, "GET", "api-gateways/doc/triggers", None).await;
    let tid = b["list"][0]["triggerId"].as_str().unwrap().to_string();
    let calls: Vec<(&str, &str, String, Option<Value>, u16)> = vec![
        ("GET", "/v1/api-gateways/{gid}/triggers/{triggerId}", format!("api-gateways/doc/triggers/{tid}"), None, 200),
        ("GET", "/v1/api-gateways/{gid}/triggers/{triggerId}/runs", format!("api-gateways/doc/triggers/{tid}/runs"), None, 200),
        ("DELETE", "/v1/api-gateways/{gid}/triggers/{triggerId}", format!("api-gateways/doc/triggers/{tid}"), None, 200),
        ("GET", "/v1/api-gateways/{gid}/triggers/{triggerId}", format!("api-gateways/doc/triggers/{tid}"), None, 404),
        ("DELETE", "/v1/api-gateways/{gid}", "api-gateways/doc".into(), None, 202),
    ];
    for (method, template, path, body, want) in calls {
        let (s, b) = v1(&w, method, &path, body).await;
        assert_eq!(s, want, "{method} {path}: {b}");
        conforms(&doc, method, template, s, &b);
    }

    // Every field of every body, given a value of the wrong type, and every string too long:
    // 400 naming the field, and nothing stored. The fields come from the document itself.
    assert_eq!(v1(&w, "POST", "api-gateways", Some(json!({"name": "Kept", "gatewayId": "kept"}))).await.0, 201);
    until_gateway(&w, "kept", |_, b| b["phase"] == "Started").await;
    assert_eq!(v1(&w, "POST", "api-gateways/kept/functions", Some(json!({"name": "kept", "source": {"code": "export default () => 1"}}))).await.0, 201);
    let state = || async {
        let mut all = Vec::new();
        for path in ["api-gateways", "tokens", "api-gateways/kept/functions", "api-gateways/kept/triggers", "api-gateways/kept/deployments", "api-gateways/kept/functions/dev%2Fkept/history"] {
            all.push(v1(&w, "GET", path, None).await.1);
        }
        all
    };
    let before = state().await;
    let targets = [
        ("CreateGateway", "POST", "api-gateways"),
        ("PatchGateway", "PATCH", "api-gateways/kept"),
        ("PatchEnvironment", "PATCH", "api-gateways/kept/environments/dev"),
        ("CreateToken", "POST", "tokens"),
        ("CreateFunction", "POST", "api-gateways/kept/functions"),
        ("PatchFunction", "PATCH", "api-gateways/kept/functions/dev%2Fkept"),
        ("InvokeInput", "POST", "api-gateways/kept/functions/dev%2Fkept/invoke"),
        ("DeployInput", "POST", "api-gateways/kept/functions/dev%2Fkept/deploy-to-stage"),
        ("RollbackInput", "POST", "api-gateways/kept/functions/dev%2Fkept/rollback"),
        ("CreateTrigger", "POST", "api-gateways/kept/triggers"),
    ];
    let wrongs = [json!(12345), json!("text"), json!([1]), json!({"x": {}}), json!(true)];
    let mut tried = 0;
    for (schema_name, method, path) in targets {
        let schema = &doc["components"]["schemas"][schema_name];
        for (field, field_schema) in schema["properties"].as_object().unwrap() {
            // The body an invoke sends to the function is any JSON by design.
            if [("InvokeInput", "body"), ("CreateTrigger", "body")].contains(&(schema_name, field.as_str())) {
                continue;
            }
            let field_root = json!({"$ref": format!("#/components/schemas/{schema_name}/properties/{field}"), "components": doc["components"]});
            let check = jsonschema::validator_for(&field_root).unwrap();
            let mut bad: Vec<Value> = wrongs.iter().filter(|v| !check.is_valid(v)).take(1).cloned().collect();
            if let Some(max) = field_schema["maxLength"].as_u64() {
                bad.push(json!("x".repeat(max as usize + 1)));
            }
            assert!(!bad.is_empty(), "{schema_name}.{field} takes anything");
            for value in bad {
                let (s, b) = v1(&w, method, path, Some(json!({ field.as_str(): value }))).await;
                assert_eq!(s, 400, "{method} {path} with {field} = {value}: {b}");
                let template = match path {
                    "api-gateways/kept" => "api-gateways/{gid}",
                    "api-gateways/kept/environments/dev" => "api-gateways/{gid}/environments/{env}",
                    "api-gateways/kept/functions" => "api-gateways/{gid}/functions",
                    "api-gateways/kept/functions/dev%2Fkept" => "api-gateways/{gid}/functions/{fn}",
                    "api-gateways/kept/functions/dev%2Fkept/invoke" => "api-gateways/{gid}/functions/{fn}/invoke",
                    "api-gateways/kept/functions/dev%2Fkept/deploy-to-stage" => "api-gateways/{gid}/functions/{fn}/deploy-to-stage",
                    "api-gateways/kept/functions/dev%2Fkept/rollback" => "api-gateways/{gid}/functions/{fn}/rollback",
                    "api-gateways/kept/triggers" => "api-gateways/{gid}/triggers",
                    p => p,
                };
                conforms(&doc, method, &format!("/v1/{template}"), s, &b);
                assert!(problems(&b).iter().any(|p| p.starts_with(field.as_str())), "{method} {path}: {field} is named in {b}");
                tried += 1;
            }
        }
        let (s, b) = v1(&w, method, path, Some(json!({"surplus": 1}))).await;
        assert_eq!(s, 400, "{schema_name} refuses unknown fields: {b}");
    }
    assert!(tried >= 20, "{tried} fields tried");
    let after = state().await;
    assert_eq!(before, after, "nothing refused was stored");
}

#[tokio::test]
async fn secret_fields_of_plugin_layers_are_never_stored_in_the_clear() {
    let w = on_loopback("  denied_plugins: []\n");
    let logger = json!({"http-logger": {"uri": "http://127.0.0.1:9/log", "auth_header": "Bearer s3cret-layer-value"}});
    let (s, b) = v1(&w, "POST", "api-gateways", Some(json!({"name": "Sealed", "gatewayId": "sealed", "plugins": logger}))).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["plugins"]["http-logger"]["auth_header"], "Bearer s3cret-layer-value", "the owner sees it plain");
    until_gateway(&w, "sealed", |_, b| b["phase"] == "Started").await;
    let (_, b) = v1(&w, "GET", "api-gateways/sealed", None).await;
    assert_eq!(b["plugins"]["http-logger"]["auth_header"], "Bearer s3cret-layer-value");
    let (_, b) = w.admin("GET", "/plugin_configs/wp.sealed.dev", None).await;
    assert_eq!(b["value"]["plugins"]["http-logger"]["auth_header"], "Bearer s3cret-layer-value", "shown opened, as the Admin API shows its own");
    // A function's own layer, its versions and their promotions are sealed alike, shown
    // opened, and served opened.
    let csrf = json!({"csrf": {"key": "s3cret-function-key"}});
    let (s, b) = v1(&w, "POST", "api-gateways/sealed/functions", Some(json!({"name": "guarded", "source": {"code": "export default () => 'in'"}, "plugins": csrf}))).await;
    assert_eq!((s, &b["plugins"]), (201, &csrf), "{b}");
    let dev = fn_path("sealed", "dev/guarded");
    assert_eq!(v1(&w, "PATCH", &dev, Some(json!({"description": "two"}))).await.0, 200);
    let (s, b) = v1(&w, "POST", &format!("{dev}/deploy-to-stage"), Some(json!({"targetStage": "staging"}))).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(v1(&w, "GET", &dev, None).await.1["plugins"], csrf);
    assert_eq!(v1(&w, "GET", "api-gateways/sealed/functions?environment=dev", None).await.1["list"][0]["plugins"], csrf);
    assert_eq!(v1(&w, "GET", &format!("{dev}/history/1"), None).await.1["plugins"], csrf);
    assert_eq!(v1(&w, "GET", &fn_path("sealed", "staging/guarded"), None).await.1["plugins"], csrf);
    let r = w.until("/dev/guarded", &[("host", "sealed.localhost")], |r| r.status == 200).await;
    assert_eq!(r.text(), "in");
    assert_eq!(send(w.proxy, "POST", "/dev/guarded", &[("host", "sealed.localhost")], None).await.status, 401, "the csrf layer is served");

    let backup = send(w.admin, "GET", "/apisix/admin/backup", &[("x-api-key", KEY)], None).await.text();
    assert!(backup.contains("wp.sealed.dev"), "the backup holds the gateway's objects");
    assert!(backup.contains("guarded"), "and its functions");
    assert!(!backup.contains("s3cret-layer-value"), "but never the secret in the clear");
    assert!(!backup.contains("s3cret-function-key"), "nor a function's");
    // A change elsewhere leaves the sealed objects as they are (compared in the clear).
    let before = w.admin("GET", "/plugin_configs/wp.sealed.staging", None).await.1["modifiedIndex"].clone();
    assert_eq!(v1(&w, "PATCH", "api-gateways/sealed/environments/dev", Some(json!({"state": "inactive"}))).await.0, 200);
    w.until("/dev/x", &[("host", "sealed.localhost")], |r| r.status == 503).await;
    assert_eq!(w.admin("GET", "/plugin_configs/wp.sealed.staging", None).await.1["modifiedIndex"], before);
}

#[tokio::test]
async fn an_owner_holds_at_most_its_quota_of_gateways() {
    let w = platform_weir("  type: embedded\n  path: \"{data}\"\n", "  max_gateways_per_owner: 1\n  max_applications_per_owner: 3\n", &[]);
    let owner = v1(&w, "POST", "tokens", Some(json!({"name": "o", "role": "owner"}))).await.1["token"].as_str().unwrap().to_string();
    assert_eq!(v1_as(&w, &owner, "POST", "api-gateways", Some(json!({"name": "one", "gatewayId": "one"}))).await.0, 201);
    let (s, b) = v1_as(&w, &owner, "POST", "api-gateways", Some(json!({"name": "two", "gatewayId": "two"}))).await;
    assert_eq!((s, b["error"]["kind"].clone()), (429, json!("quota")), "{b}");
    assert_eq!(v1(&w, "GET", "api-gateways/two", None).await.0, 404, "nothing was stored");
    assert_eq!(v1(&w, "POST", "api-gateways", Some(json!({"name": "two", "gatewayId": "two"}))).await.0, 201, "an admin key is not bound");

    // Applications too, however many are asked for at once.
    let mut calls = Vec::new();
    for i in 0..6 {
        let (admin, owner) = (w.admin, owner.clone());
        calls.push(tokio::spawn(async move { common::send(admin, "POST", "/v1/applications", &[("authorization", &format!("Bearer {owner}"))], Some(&json!({"name": format!("a{i}")}).to_string())).await.status }));
    }
    let mut statuses = Vec::new();
    for c in calls {
        statuses.push(c.await.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, [201, 201, 201, 429, 429, 429]);
    assert_eq!(v1_as(&w, &owner, "GET", "applications", None).await.1["total"], 3);
    assert_eq!(v1(&w, "POST", "applications", Some(json!({"name": "by-admin"}))).await.0, 201, "an admin key is not bound");
}

/// A gateway publishing faster than its node's pace is refused with when to come back, and
/// nothing is stored; another gateway publishes meanwhile at its own pace.
#[tokio::test]
async fn a_gateway_publishing_past_its_pace_waits_and_another_does_not() {
    // 1,000 bytes a second, after a burst of 60,000.
    let w = on_loopback("  functions:\n    publish_bytes_per_minute: 60000\n");
    for gid in ["fast", "calm"] {
        started_gateway(&w, gid).await;
    }
    // About 50 KB a save with its history entry: the burst holds one, and leaves about 10 KB,
    // 15 s short of a second.
    let sized = |name: &str| json!({"name": name, "source": {"code": format!("// {}\nexport default () => ({{ fn: '{name}' }})", "x".repeat(25_000))}});
    let (s, b) = v1(&w, "POST", "api-gateways/fast/functions", Some(sized("a"))).await;
    assert_eq!(s, 201, "{b}");
    let body = sized("b").to_string();
    let r = send(w.admin, "POST", "/v1/api-gateways/fast/functions", &[("x-api-key", KEY)], Some(&body)).await;
    assert_eq!((r.status, &r.json()["error"]["kind"]), (429, &json!("quota")), "{}", r.text());
    assert!(r.text().contains("publish_bytes_per_minute"), "{}", r.text());
    let wait: u64 = r.headers.get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
    assert!((10..=20).contains(&wait), "Retry-After {wait}");
    assert!(r.text().contains(&format!("try again in {wait} s")), "{}", r.text());
    assert_eq!(v1(&w, "GET", &fn_path("fast", "dev/b"), None).await.0, 404, "a refused save stores nothing");
    // A promotion publishes too, and waits the same.
    let (s, b) = v1(&w, "POST", &format!("{}/deploy-to-stage", fn_path("fast", "dev/a")), Some(json!({"targetStage": "staging"}))).await;
    assert_eq!((s, &b["error"]["kind"]), (429, &json!("quota")), "{b}");
    assert_eq!(v1(&w, "GET", &fn_path("fast", "staging/a"), None).await.0, 404);
    // Refusals take nothing: a small save still fits what is left.
    let (s, b) = v1(&w, "POST", "api-gateways/fast/functions", Some(json!({"name": "small", "source": {"code": "export default () => 1"}}))).await;
    assert_eq!(s, 201, "{b}");
    // The other gateway has its own pace.
    let (s, b) = v1(&w, "POST", "api-gateways/calm/functions", Some(sized("a"))).await;
    assert_eq!(s, 201, "{b}");
}

#[tokio::test]
async fn a_gateways_functions_stay_within_its_quota_and_another_gateway_is_not_bound_by_it() {
    let w = on_loopback("  functions:\n    max_per_gateway: 3\n    max_bytes_per_gateway: 20000\n");
    for gid in ["tight", "roomy"] {
        assert_eq!(v1(&w, "POST", "api-gateways", Some(json!({"name": gid, "gatewayId": gid}))).await.0, 201);
    }
    let small = |name: &str| json!({"name": name, "source": {"code": format!("export default () => ({{ fn: '{name}' }})")}});
    let sized = |name: &str, n: usize| json!({"name": name, "source": {"code": format!("// {}\nexport default () => ({{ fn: '{name}' }})", "x".repeat(n))}});
    let quota = |s: u16, b: &Value, what: &str| {
        assert_eq!((s, b["error"]["kind"].clone()), (429, json!("quota")), "{b}");
        let message = b["error"]["message"].as_str().unwrap();
        assert!(message.contains(what), "{message}");
    };
    let count = async |gid: &str| v1(&w, "GET", &format!("api-gateways/{gid}/functions"), None).await.1["total"].clone();

    // Three functions, one of them a promoted copy: the most the gateway may hold.
    assert_eq!(v1(&w, "POST", "api-gateways/tight/functions", Some(small("a"))).await.0, 201);
    assert_eq!(v1(&w, "POST", "api-gateways/tight/functions", Some(small("b"))).await.0, 201);
    let (s, b) = v1(&w, "POST", &format!("{}/deploy-to-stage", fn_path("tight", "dev/a")), Some(json!({"targetStage": "staging"}))).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = v1(&w, "POST", "api-gateways/tight/functions", Some(small("c"))).await;
    quota(s, &b, "max_per_gateway");
    let (s, b) = v1(&w, "POST", &format!("{}/deploy-to-stage", fn_path("tight", "dev/b")), Some(json!({"targetStage": "prod"}))).await;
    quota(s, &b, "max_per_gateway");
    assert_eq!(v1(&w, "GET", &fn_path("tight", "dev/c"), None).await.0, 404, "nothing of a refused save is stored");
    assert_eq!(v1(&w, "GET", &fn_path("tight", "prod/b"), None).await.0, 404);
    assert_eq!(count("tight").await, json!(3));
    // Publishing a new version of a function it holds is no new function.
    let (s, b) = v1(&w, "POST", &format!("{}/deploy-to-stage", fn_path("tight", "dev/a")), Some(json!({"targetStage": "staging"}))).await;
    assert_eq!((s, &b["function"]["version"]), (200, &json!(2)), "{b}");
    // Another gateway is not bound by this one's quota.
    for name in ["a", "b", "c"] {
        assert_eq!(v1(&w, "POST", "api-gateways/roomy/functions", Some(small(name))).await.0, 201);
    }

    // A deletion makes room; the bytes are bounded too, on creation and on change.
    assert_eq!(v1(&w, "DELETE", &fn_path("tight", "dev/b"), None).await.0, 200);
    let (s, b) = v1(&w, "POST", "api-gateways/tight/functions", Some(sized("c", 19_000))).await;
    quota(s, &b, "max_bytes_per_gateway");
    assert_eq!(v1(&w, "GET", &fn_path("tight", "dev/c"), None).await.0, 404);
    assert_eq!(v1(&w, "POST", "api-gateways/tight/functions", Some(sized("c", 3_000))).await.0, 201);
    let grow = json!({"source": {"code": format!("// {}\nexport default () => 'grown'", "y".repeat(19_000))}});
    let (s, b) = v1(&w, "PATCH", &fn_path("tight", "dev/c"), Some(grow)).await;
    quota(s, &b, "max_bytes_per_gateway");
    let (s, b) = v1(&w, "GET", &fn_path("tight", "dev/c"), None).await;
    assert_eq!((s, &b["version"]), (200, &json!(1)), "a refused change changes nothing: {b}");
    let r = w.until("/dev/c", &[("host", "tight.localhost")], |r| r.status == 200).await;
    assert_eq!(r.json(), json!({"fn": "c"}));
    let shrink = json!({"source": {"code": "export default () => 'small'"}});
    let (s, b) = v1(&w, "PATCH", &fn_path("tight", "dev/c"), Some(shrink)).await;
    assert_eq!((s, &b["version"]), (200, &json!(2)), "{b}");
    // The roll back to the larger version fits now, and its own size counts.
    let (s, b) = v1(&w, "POST", &format!("{}/rollback", fn_path("tight", "dev/c")), Some(json!({"version": 1}))).await;
    assert_eq!(s, 200, "{b}");
    w.until("/dev/c", &[("host", "tight.localhost")], |r| r.status == 200 && r.text().contains("\"fn\"")).await;
    // Its history counts: saving the same source again and again fills the gateway's bytes.
    let again = sized("c", 3_000)["source"].clone();
    let mut saves = 0;
    loop {
        let (s, b) = v1(&w, "PATCH", &fn_path("tight", "dev/c"), Some(json!({"source": again}))).await;
        if s == 429 {
            quota(s, &b, "max_bytes_per_gateway");
            break;
        }
        assert_eq!(s, 200, "{b}");
        saves += 1;
        assert!(saves < 10, "each save keeps a version in the history, and those bytes count");
    }
    assert!(saves >= 1, "{saves}");
    let (s, b) = v1(&w, "POST", "api-gateways/tight/functions", Some(sized("d", 8_000))).await;
    quota(s, &b, "max_per_gateway");
    assert_eq!(v1(&w, "DELETE", &fn_path("tight", "staging/a"), None).await.0, 200);
    let (s, b) = v1(&w, "POST", "api-gateways/tight/functions", Some(sized("d", 8_000))).await;
    quota(s, &b, "max_bytes_per_gateway");

    // The record goes with its gateway: one made again under the id starts from nothing.
    assert_eq!(v1(&w, "DELETE", "api-gateways/tight", None).await.0, 202);
    until_gateway(&w, "tight", |s, _| s == 404).await;
    let backup = send(w.admin, "GET", "/apisix/admin/backup", &[("x-api-key", KEY)], None).await.text();
    assert!(!backup.contains("platform/quota/tight") && backup.contains("platform/quota/roomy"), "{backup}");
    assert_eq!(v1(&w, "POST", "api-gateways", Some(json!({"name": "tight", "gatewayId": "tight"}))).await.0, 201);
    for name in ["a", "b", "c"] {
        assert_eq!(v1(&w, "POST", "api-gateways/tight/functions", Some(small(name))).await.0, 201);
    }
}

#[tokio::test]
async fn the_operators_base_layer_keeps_its_secrets_from_tenants() {
    let w = on_loopback("  base_plugins:\n    http-logger: {uri: \"http://127.0.0.1:9/base\", auth_header: \"Bearer base-layer-secret\"}\n");
    assert_eq!(v1(&w, "POST", "api-gateways", Some(json!({"name": "B", "gatewayId": "based"}))).await.0, 201);
    until_gateway(&w, "based", |_, b| b["phase"] == "Started").await;
    let owner = v1(&w, "POST", "tokens", Some(json!({"name": "o", "role": "owner", "gateways": ["based"]}))).await.1["token"].as_str().unwrap().to_string();
    let logger = |b: &Value| b["plugins"].as_array().unwrap().iter().find(|p| p["name"] == "http-logger").map(|p| (p["layer"].clone(), p["config"]["auth_header"].clone()));
    let (s, b) = v1_as(&w, &owner, "GET", "api-gateways/based/environments/dev/effective-plugins", None).await;
    assert_eq!(s, 200);
    assert_eq!(logger(&b), Some((json!("base"), json!("******"))), "{b}");
    let (_, b) = v1(&w, "GET", "api-gateways/based/environments/dev/effective-plugins", None).await;
    assert_eq!(logger(&b), Some((json!("base"), json!("Bearer base-layer-secret"))), "an admin key sees it");
}


/// The operator's reserved domains, and every name under them, are no tenant's to claim.
#[tokio::test]
async fn reserved_domains_are_no_tenants_to_claim() {
    let w = on_loopback("  reserved_domains: [\"*.Corp.example.test.\"]\n");
    for domain in ["corp.example.test", "api.corp.example.test", "API.Corp.Example.Test"] {
        let (s, b) = v1(&w, "POST", "api-gateways", Some(json!({"name": "Grab", "customDomains": [domain]}))).await;
        assert_eq!(s, 409, "{domain}: {b}");
        assert!(problems(&b)[0].ends_with("is reserved"), "{b}");
    }
    started_gateway(&w, "near").await;
    assert_eq!(v1(&w, "PATCH", "api-gateways/near/environments/dev", Some(json!({"customDomain": "dev.corp.example.test"}))).await.0, 409);
    let (s, b) = v1(&w, "PATCH", "api-gateways/near", Some(json!({"customDomains": ["notcorp.example.test"]}))).await;
    assert_eq!(s, 200, "a name beside the reserved one is free: {b}");
}

/// A function's JSON answer of small values, whose text is small beside a tree of it, is
/// passed on by `invoke` as the text it is: the node's memory grows by a few copies of it.
#[tokio::test]
async fn an_invoked_functions_json_answer_is_passed_on_as_text() {
    let w = on_loopback("");
    started_gateway(&w, "wide").await;
    // The CPU budget is the deadline on the runtime's clock: roomy, as this debug build beside
    // other tests may take over a second to make the answer.
    assert_eq!(v1(&w, "PATCH", "api-gateways/wide", Some(json!({"limits": {"memoryMiB": 64, "timeoutMs": 20000}}))).await.0, 200);
    // About 12.5 MB of JSON: 6.25 million zeros, each a value of a tree.
    let code = "export default () => { const row = new Array(2500).fill(0); return new Array(2500).fill(row); }";
    assert_eq!(v1(&w, "POST", "api-gateways/wide/functions", Some(json!({"name": "zeros", "source": {"code": code}}))).await.0, 201);
    let invoke = format!("/v1/{}/invoke", fn_path("wide", "dev/zeros"));
    let before = common::status_kib(w.pid(), "VmHWM");
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let (admin, invoke) = (w.admin, invoke.clone());
            tokio::spawn(async move { send(admin, "POST", &invoke, &[("x-api-key", common::KEY)], Some("{}")).await })
        })
        .collect();
    for call in calls {
        let r = call.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let answer = r.json();
        let body = &answer["body"];
        let sizes = body.as_array().map(|rows| (rows.len(), body[2499].as_array().map_or(0, Vec::len)));
        assert_eq!(sizes, Some((2500, 2500)), "{}", answer.to_string().chars().take(300).collect::<String>());
    }
    let grew = common::status_kib(w.pid(), "VmHWM").saturating_sub(before);
    // A tree would take some 500 MB a call; the text, a few of its 12.5 MB copies.
    assert!(grew < 300 << 10, "the node's peak memory grew by {} MiB", grew >> 10);
    // A name sent more than once lists its values.
    let code = "export default (req, res) => res.set('Set-Cookie', ['a=1', 'b=2']).set('x-one', 'v').end('ok')";
    assert_eq!(v1(&w, "POST", "api-gateways/wide/functions", Some(json!({"name": "cookies", "source": {"code": code}}))).await.0, 201);
    let (s, b) = v1(&w, "POST", &format!("{}/invoke", fn_path("wide", "dev/cookies")), Some(json!({}))).await;
    assert_eq!((s, &b["headers"]["set-cookie"], &b["headers"]["x-one"], &b["body"]), (200, &json!(["a=1", "b=2"]), &json!("v"), &json!("ok")), "{b}");
}

/// A function's request body declared past the limit is refused before any of it is sent, and
/// one sent a byte at a time is joined whole.
#[tokio::test]
async fn a_request_body_is_refused_by_its_declared_length_and_joined_from_its_pieces() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = on_loopback("");
    started_gateway(&w, "slow").await;
    assert_eq!(v1(&w, "POST", "api-gateways/slow/functions", Some(json!({"name": "echo", "source": {"code": "export default (ctx) => String(ctx.body).length"}}))).await.0, 201);
    w.until("/dev/echo", &[("host", "slow.localhost")], |r| r.status == 200).await;
    let head = |len: usize| format!("POST /dev/echo HTTP/1.1\r\nhost: slow.localhost\r\ncontent-type: text/plain\r\ncontent-length: {len}\r\n\r\n");
    // Declared past the 1 MiB a function takes: refused at once.
    let mut s = tokio::net::TcpStream::connect(w.proxy).await.unwrap();
    s.write_all(head(2 << 20).as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("refused before the body").unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 413"), "{}", String::from_utf8_lossy(&buf[..n]));
    // 4,000 bytes, each its own segment.
    let bytes = 4000;
    let mut s = tokio::net::TcpStream::connect(w.proxy).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(head(bytes).as_bytes()).await.unwrap();
    for i in 0..bytes - 1 {
        s.write_all(b"x").await.unwrap();
        if i % 4 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    s.write_all(b"x").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("4000"), "{answer}");
}

/// A client that sends a plain GET (the lean HTTP/1.1 path) and closes its connection while the
/// call waits gives the gateway's place back: the next caller is answered, not refused.
#[tokio::test]
async fn a_client_that_leaves_a_waiting_call_gives_back_its_place() {
    use tokio::io::AsyncWriteExt;
    let w = on_loopback("");
    started_gateway(&w, "leave").await;
    assert_eq!(v1(&w, "PATCH", "api-gateways/leave", Some(json!({"limits": {"concurrency": 1, "wallMs": 60000}}))).await.0, 200);
    let code = "export default (ctx) => ctx.query.wait ? new Promise((r) => setTimeout(() => r('waited'), 30000)) : 'at once'";
    assert_eq!(v1(&w, "POST", "api-gateways/leave/functions", Some(json!({"name": "f", "source": {"code": code}}))).await.0, 201);
    w.until("/dev/f", &[("host", "leave.localhost")], |r| r.status == 200).await;
    let mut s = tokio::net::TcpStream::connect(w.proxy).await.unwrap();
    s.write_all(b"GET /dev/f?wait=1 HTTP/1.1\r\nhost: leave.localhost\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(w.get("/dev/f", &[("host", "leave.localhost")]).await.status, 503, "the waiting call holds the one place");
    drop(s);
    let t = std::time::Instant::now();
    while w.get("/dev/f", &[("host", "leave.localhost")]).await.status != 200 {
        assert!(t.elapsed() < Duration::from_secs(5), "the place did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A gateway's runtime stuck in a string search QuickJS runs in C (no interrupt stops it): its
/// thread goes to idle CPU, the gateway's other functions answer again on a fresh runtime, and
/// another gateway's latency is what it was.
#[tokio::test]
async fn a_runtime_stuck_in_a_built_in_is_replaced_and_costs_others_nothing() {
    let _alone = timing_alone();
    let w = on_loopback("");
    started_gateway(&w, "stuck").await;
    started_gateway(&w, "calm").await;
    assert_eq!(v1(&w, "PATCH", "api-gateways/stuck", Some(json!({"limits": {"timeoutMs": 200, "wallMs": 3000}}))).await.0, 200);
    for (gid, name, code) in [
        ("stuck", "search", "export default () => 'a'.repeat(1 << 21).indexOf('a'.repeat(1 << 20) + 'b')"),
        ("stuck", "ok", "export default () => ({ ok: true })"),
        ("calm", "ping", "export default () => ({ pong: true })"),
    ] {
        assert_eq!(v1(&w, "POST", &format!("api-gateways/{gid}/functions"), Some(json!({"name": name, "source": {"code": code}}))).await.0, 201);
    }
    w.until("/dev/ok", &[("host", "stuck.localhost")], |r| r.status == 200).await;
    w.until("/dev/ping", &[("host", "calm.localhost")], |r| r.status == 200).await;
    let quiet = p99(&w, "/dev/ping", "calm.localhost", 100).await;
    let search = tokio::spawn({
        let proxy = w.proxy;
        async move { send(proxy, "GET", "/dev/search", &[("host", "stuck.localhost")], None).await }
    });
    // The gateway's own calls answer again once its runtime is given up.
    let t = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    loop {
        let r = send(w.proxy, "GET", "/dev/ok", &[("host", "stuck.localhost")], None).await;
        if r.status == 200 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the gateway never answered again: {} {}", r.status, r.text());
    }
    let r = search.await.unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    // Its stuck thread runs under the idle policy, and costs the other gateway nothing.
    let policies: Vec<u32> = std::fs::read_dir(format!("/proc/{}/task", w.pid()))
        .unwrap()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == "fn-stuck"))
        .filter_map(|t| weir_core::threads::stat_field(&std::fs::read_to_string(t.path().join("stat")).ok()?, 41))
        .collect();
    assert!(policies.contains(&5), "one runtime thread of the gateway is idle: {policies:?}");
    let noisy = p99(&w, "/dev/ping", "calm.localhost", 100).await;
    assert!(noisy < quiet + Duration::from_millis(20), "p99 {quiet:?} alone, {noisy:?} beside a stuck runtime");
}

/// The CPU time run and the time spent waiting for a core, so far, of the one thread of
/// process `pid` named `name` (Linux's `schedstat`, in nanoseconds).
fn sched_of(pid: u32, name: &str) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(thread_of(pid, name).join("schedstat")).unwrap();
    let mut fields = stat.split_whitespace().map(|f| Duration::from_nanos(f.parse().unwrap()));
    (fields.next().unwrap(), fields.next().unwrap())
}

/// Busy loops pinned to one core, stopped when this goes (and after a minute whatever
/// happens, should the test's process be killed first).
struct Hogs(Vec<std::process::Child>);

impl Hogs {
    /// `n` loops on `core`, at niceness `nice`.
    fn on(core: &str, n: usize, nice: u8) -> Hogs {
        let spin = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass";
        let run = |_| std::process::Command::new("taskset").args(["-c", core, "nice", "-n", &nice.to_string(), "python3", "-c", spin]).spawn().unwrap();
        Hogs((0..n).map(run).collect())
    }
}

/// The last core this process may run on (`Cpus_allowed_list`, as `0-1` or `2,4-5`).
fn last_allowed_core() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim();
    list.rsplit([',', '-']).next().unwrap().to_string()
}

/// Held by the tests that time latency and by the one that loads a core on purpose, so that
/// none of them runs beside another, in this process or another (a lock on a file).
fn timing_alone() -> std::fs::File {
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(std::env::temp_dir().join("weir-platform-timing.lock")).unwrap();
    f.lock().unwrap();
    f
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A call's CPU budget counts the CPU its runtime spends on it, not the time other threads
/// hold the core (another tenant's runtime among them): on a core shared with three busy
/// loops, a call that needs less than half its budget answers though it takes longer than its
/// budget to, and a loop still stops once it has had its budget. The loops run at the nicest
/// niceness, where a runtime that keeps its core busy goes too (the watchdog's), so that the
/// runtime has a quarter of the core whatever its niceness.
#[tokio::test]
async fn a_calls_budget_is_its_own_cpu_and_not_the_time_others_hold_the_core() {
    let _alone = timing_alone();
    let w = on_loopback("");
    started_gateway(&w, "busy").await;
    let budget = Duration::from_millis(600);
    assert_eq!(v1(&w, "PATCH", "api-gateways/busy", Some(json!({"limits": {"timeoutMs": 600, "wallMs": 30000}}))).await.0, 200);
    for (name, code) in [
        ("work", "export default (ctx) => { const n = Number(ctx.query.n); let x = 0; for (let i = 0; i < n; i++) x = (x * 31 + i) | 0; return { x } }"),
        ("spin", "export default () => { for (;;) {} }"),
    ] {
        assert_eq!(v1(&w, "POST", "api-gateways/busy/functions", Some(json!({"name": name, "source": {"code": code}}))).await.0, 201);
    }
    let busy = [("host", "busy.localhost")];
    w.until("/dev/work?n=1", &busy, |r| r.status == 200).await;
    w.until("/dev/spin", &busy, |r| r.status != 404).await;
    // A call's answer, how long it took and the CPU its runtime's thread ran meanwhile.
    async fn call(w: &Weir, path: &str) -> (common::Resp, Duration, Duration) {
        let (t, before) = (std::time::Instant::now(), sched_of(w.pid(), "fn-busy"));
        let r = w.get(path, &[("host", "busy.localhost")]).await;
        let after = sched_of(w.pid(), "fn-busy");
        (r, t.elapsed(), after.0 - before.0)
    }
    // How much work takes about 250 ms of the runtime's CPU, by its thread's clock.
    let mut n = 100_000u64;
    let n = loop {
        let (r, _, ran) = call(&w, &format!("/dev/work?n={n}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        if ran >= Duration::from_millis(50) {
            break (n as f64 * 250.0 / ran.as_millis() as f64) as u64;
        }
        n *= 4;
    };
    // Weir's threads and three busy loops on one core.
    let core = last_allowed_core();
    assert!(std::process::Command::new("taskset").args(["-a", "-p", "-c", &core, &w.pid().to_string()]).output().unwrap().status.success());
    let _hogs = Hogs::on(&core, 3, 19);
    // Loops to their budget, one after another, until the runtime is as nice as the hogs.
    let mut spins = 0;
    while niceness_of(w.pid(), "fn-busy") != 19 {
        let (r, _, _) = call(&w, "/dev/spin").await;
        assert_eq!(r.status, 504, "{}", r.text());
        spins += 1;
        assert!(spins < 20, "the runtime never went nice");
    }
    let (r, took, ran) = call(&w, &format!("/dev/work?n={n}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(took > budget, "the call had the core to itself: {took:?}, CPU {ran:?}");
    assert!(ran < budget, "CPU {ran:?}");
    let (r, took, ran) = call(&w, "/dev/spin").await;
    assert_eq!(r.status, 504, "{}", r.text());
    // The runtime is nice, so its deadline reads the CPU clock from the arming on.
    assert!(ran >= budget * 9 / 10 && ran < budget * 11 / 10, "CPU {ran:?}");
    assert!(took > budget * 2, "the loop had the core to itself: {took:?}");
}

/// The niceness of the one thread of process `pid` named `name`.
fn niceness_of(pid: u32, name: &str) -> i32 {
    weir_core::threads::niceness(&std::fs::read_to_string(thread_of(pid, name).join("stat")).unwrap()).unwrap()
}

/// The `/proc` directory of the one thread of process `pid` named `name`.
fn thread_of(pid: u32, name: &str) -> std::path::PathBuf {
    let named = threads_named(pid, name);
    assert_eq!(named.len(), 1, "threads named {name}");
    named.into_iter().next().unwrap()
}


/// Whether a process started by this one (the node) may lower its niceness from 19 to `to`
/// (`CAP_SYS_NICE`, or room under `RLIMIT_NICE`): tried by a process of its own.
fn may_lower_niceness(to: i32) -> bool {
    let script = format!("import os\nos.setpriority(os.PRIO_PROCESS, 0, 19)\nos.setpriority(os.PRIO_PROCESS, 0, {to})");
    std::process::Command::new("python3").args(["-c", &script]).stderr(std::process::Stdio::null()).status().unwrap().success()
}

/// A runtime that keeps its core busy (a tenant's calls spinning to their budget, one after
/// another) runs at the nicest niceness, where the proxy and the other tenants' runtimes come
/// first; a light function's runtime beside it keeps the process's, and the next runtime the
/// busy gateway starts (a new memory limit) starts nice. Quiet for a few seconds, it gets its
/// niceness back where the node may lower one, and keeps the nicest where it may not.
#[tokio::test]
async fn a_runtime_that_keeps_its_core_busy_runs_nicest_until_it_is_quiet() {
    let _alone = timing_alone();
    let w = on_loopback("");
    started_gateway(&w, "hot").await;
    started_gateway(&w, "cool").await;
    for (gid, name, code) in [("hot", "spin", "export default () => { for (;;) {} }"), ("hot", "ok", "export default () => 'ok'"), ("cool", "ping", "export default () => ({ pong: true })")] {
        assert_eq!(v1(&w, "POST", &format!("api-gateways/{gid}/functions"), Some(json!({"name": name, "source": {"code": code}}))).await.0, 201);
    }
    assert_eq!(v1(&w, "PATCH", "api-gateways/hot", Some(json!({"limits": {"timeoutMs": 300}}))).await.0, 200);
    w.until("/dev/ping", &[("host", "cool.localhost")], |r| r.status == 200).await;
    w.until("/dev/spin", &[("host", "hot.localhost")], |r| r.status == 504).await;
    let own = niceness_of(w.pid(), "fn-cool");
    assert_eq!(niceness_of(w.pid(), "fn-hot"), own);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinner = tokio::spawn({
        let (proxy, stop) = (w.proxy, stop.clone());
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = send(proxy, "GET", "/dev/spin", &[("host", "hot.localhost")], None).await;
                assert_eq!(r.status, 504, "{}", r.text());
            }
        }
    });
    let t = std::time::Instant::now();
    while niceness_of(w.pid(), "fn-hot") != 19 {
        let r = w.get("/dev/ping", &[("host", "cool.localhost")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(t.elapsed() < Duration::from_secs(20), "the spinning runtime kept its niceness");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(niceness_of(w.pid(), "fn-cool"), own, "the light function's runtime");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    spinner.await.unwrap();
    let first = threads_named(w.pid(), "fn-hot");
    assert_eq!(v1(&w, "PATCH", "api-gateways/hot", Some(json!({"limits": {"timeoutMs": 300, "memoryMiB": 48}}))).await.0, 200);
    let t = std::time::Instant::now();
    loop {
        let r = w.get("/dev/ok", &[("host", "hot.localhost")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let now = threads_named(w.pid(), "fn-hot");
        if now.len() == 1 && now != first {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the gateway never moved to a new runtime: {first:?} {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(niceness_of(w.pid(), "fn-hot"), 19, "the gateway's next runtime starts nice");
    // Quiet: five windows of a second in a row.
    let t = std::time::Instant::now();
    if may_lower_niceness(own) {
        while niceness_of(w.pid(), "fn-hot") != own {
            assert!(t.elapsed() < Duration::from_secs(20), "the quiet runtime never got its niceness back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Five windows from the new runtime's first look, which came at most a few moments
        // before the test saw it.
        assert!(t.elapsed() >= Duration::from_secs(3), "back after {:?}", t.elapsed());
    } else {
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert_eq!(niceness_of(w.pid(), "fn-hot"), 19, "a node that may not lower a niceness keeps the runtime nice");
    }
    // And it answers as before.
    w.until("/dev/spin", &[("host", "hot.localhost")], |r| r.status == 504).await;
}

/// p99 (the largest of 100 is its own p99 for our purposes: the second largest) of `n` GETs.
async fn p99(w: &Weir, path: &str, host: &str, n: usize) -> Duration {
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        let r = w.get(path, &[("host", host)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        took.push(t.elapsed());
    }
    took.sort();
    took[(n * 99 / 100).min(n - 1)]
}

/// A cookie a tenant's answer sets for the base domain, an environment's domain or another
/// gateway's host would reach other tenants' hosts: it is kept to the answering host, whatever
/// set it (the function, or a plugin of the tenant's answering early). A tenant can neither
/// name the plugin that does it nor order one of its own after it.
#[tokio::test]
async fn a_tenants_cookies_never_reach_another_tenants_hosts() {
    let w = on_loopback("");
    started_gateway(&w, "cks").await;
    let code = r#"export default () => {
  const h = new Headers();
  for (const c of ['a=1; Domain=localhost; Path=/', 'b=2; Domain=cks.localhost', 'c=3; domain=.DEV.localhost', 'd=4; Domain=other.localhost; HttpOnly', 'e=5; Domain=x.cks.dev.localhost', 'f=6']) h.append('set-cookie', c);
  return new Response('ok', { headers: h });
}"#;
    assert_eq!(v1(&w, "POST", "api-gateways/cks/functions", Some(json!({"name": "cookie", "source": {"code": code}}))).await.0, 201);
    let want = ["a=1; Path=/", "b=2; Domain=cks.localhost", "c=3", "d=4; HttpOnly", "e=5; Domain=x.cks.dev.localhost", "f=6"];
    for (host, path) in [("cks.localhost", "/dev/cookie"), ("cks.dev.localhost", "/cookie")] {
        let r = w.until(path, &[("host", host)], |r| r.status != 404).await;
        let cookies: Vec<&str> = r.headers.get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!((r.status, cookies), (200, want.to_vec()), "{host}{path}");
    }
    // The environments' upstream routes carry the plugin too (the same plugin config).
    let (_, pc) = w.admin("GET", "/plugin_configs/wp.cks.dev", None).await;
    assert_eq!(pc["value"]["plugins"]["cookie-scope"]["own"], json!(["cks.localhost", "cks.dev.localhost", "cks.staging.localhost", "cks.prod.localhost"]), "{pc}");
    // Layers cannot name it, nor order a plugin after it; nothing changes.
    let late = json!({"response-rewrite": {"_meta": {"priority": -100000}, "headers": {"set": {"Set-Cookie": "s=1; Domain=localhost"}}}});
    let float = json!({"response-rewrite": {"_meta": {"priority": -1.5}, "headers": {"set": {"x-a": "1"}}}});
    for (layer, says) in [
        (json!({"cookie-scope": {"shared": ["x"]}}), "cookie-scope is the platform's own"),
        (late, "response-rewrite._meta.priority must be above -100000"),
        (float, "response-rewrite._meta.priority must be an integer"),
    ] {
        let (s, b) = v1(&w, "PATCH", "api-gateways/cks", Some(json!({"plugins": layer}))).await;
        assert!(s == 400 && b.to_string().contains(says), "{s} {b}");
        let (s, b) = v1(&w, "PATCH", &fn_path("cks", "dev/cookie"), Some(json!({"plugins": layer}))).await;
        assert!(s == 400 && b.to_string().contains(says), "function layer: {s} {b}");
    }
    // A cookie a tenant's plugin sets, on an answer it gives before the function runs, is kept
    // to the host too; one for the gateway's own host stays as it is.
    let early = json!({"mocking": {"response_example": "hi", "response_headers": {"Set-Cookie": "s=1; Domain=localhost; Path=/"}}});
    let (s, b) = v1(&w, "PATCH", "api-gateways/cks", Some(json!({"plugins": early}))).await;
    assert_eq!(s, 200, "{b}");
    let r = w.until("/dev/cookie", &[("host", "cks.localhost")], |r| r.text() == "hi").await;
    assert_eq!(r.headers.get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect::<Vec<_>>(), ["s=1; Path=/"]);
    let own = json!({"mocking": {"response_example": "own", "response_headers": {"Set-Cookie": "s=2; Domain=cks.localhost"}}});
    assert_eq!(v1(&w, "PATCH", "api-gateways/cks", Some(json!({"plugins": own}))).await.0, 200);
    let r = w.until("/dev/cookie", &[("host", "cks.localhost")], |r| r.text() == "own").await;
    assert_eq!(r.headers.get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect::<Vec<_>>(), ["s=2; Domain=cks.localhost"]);
}

/// An environment's plugin that rewrites the path changes the path its functions see, not which
/// function answers.
#[tokio::test]
async fn an_environments_path_rewrite_leaves_which_function_answers_alone() {
    let w = on_loopback("");
    started_gateway(&w, "rewrite").await;
    for name in ["a", "b"] {
        let code = format!("export default (ctx) => ({{ me: '{name}', path: ctx.path }})");
        let (s, b) = v1(&w, "POST", "api-gateways/rewrite/functions", Some(json!({"name": name, "source": {"code": code}}))).await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, b) = v1(&w, "PATCH", "api-gateways/rewrite/environments/dev", Some(json!({"plugins": {"proxy-rewrite": {"uri": "/rewritten"}}}))).await;
    assert_eq!(s, 200, "{b}");
    let rw = [("host", "rewrite.localhost")];
    let r = w.until("/dev/a", &rw, |r| r.json()["path"] == "/rewritten").await;
    assert_eq!((r.status, r.json()), (200, json!({"me": "a", "path": "/rewritten"})), "{}", r.text());
    assert_eq!(w.get("/dev/b", &rw).await.json(), json!({"me": "b", "path": "/rewritten"}));
    assert_eq!(w.get("/b", &[("host", "rewrite.dev.localhost")]).await.json(), json!({"me": "b", "path": "/rewritten"}));
}

/// An owner's change to a gateway is answered once this node serves it, as an Admin API write
/// is: with the reconciler pausing before each render, a request sent the moment the answer
/// comes still meets the changed environment.
#[tokio::test]
async fn a_gateways_change_is_answered_once_it_is_served() {
    let w = platform_weir("  type: embedded\n  path: \"{data}\"\n", "  denied_networks: []\n", &[("WEIR_PLATFORM_PAUSE_AFTER_CLAIM_MS", "300")]);
    started_gateway(&w, "ryw").await;
    let (s, b) = v1(&w, "POST", "api-gateways/ryw/functions", Some(json!({"name": "me", "source": {"code": "export default () => 'open'"}}))).await;
    assert_eq!(s, 201, "{b}");
    let host = [("host", "ryw.dev.localhost")];
    assert_eq!(w.until("/me", &host, |r| r.status == 200).await.text(), "open");
    for (auth, status) in [("key-auth", 401), ("none", 200), ("basic-auth", 401)] {
        let (s, b) = v1(&w, "PATCH", "api-gateways/ryw/environments/dev", Some(json!({"authType": auth}))).await;
        assert_eq!(s, 200, "{b}");
        let r = w.get("/me", &host).await;
        assert_eq!(r.status, status, "{auth}: {}", r.text());
    }
}

/// The function series count calls and failures as their help says: a thrown error is a
/// failure whatever status it names, a refused method is no call, and a path no function
/// serves makes no series.
#[tokio::test]
async fn function_series_count_calls_and_failures_of_published_functions_only() {
    let w = on_loopback("");
    started_gateway(&w, "met").await;
    let thrown = "export default () => { const e = new Error('taken'); e.name = 'DatabaseError'; e.status = 409; throw e }";
    for (name, code, methods) in [("ok", "export default () => ({ ok: true })", json!(null)), ("taken", thrown, json!(null)), ("getonly", "export default () => 'got'", json!(["GET"]))] {
        let mut body = json!({"name": name, "source": {"code": code}});
        if !methods.is_null() {
            body["methods"] = methods;
        }
        let (s, b) = v1(&w, "POST", "api-gateways/met/functions", Some(body)).await;
        assert_eq!(s, 201, "{b}");
    }
    let host = [("host", "met.localhost")];
    w.until("/dev/getonly", &host, |r| r.status == 200).await;
    for _ in 0..2 {
        assert_eq!(w.until("/dev/ok", &host, |r| r.status == 200).await.status, 200);
    }
    let r = w.get("/dev/taken", &host).await;
    assert_eq!((r.status, r.json()["error_msg"].clone()), (409, json!("taken")), "{}", r.text());
    assert_eq!(send(w.proxy, "POST", "/dev/getonly", &host, Some("{}")).await.status, 405);
    assert_eq!(w.get("/dev/nobody", &host).await.status, 404);

    let labels = |f: &str| format!("gateway=\"met\",environment=\"dev\",function=\"{f}\"");
    let page = send(w.metrics.expect("the exporter listens"), "GET", "/apisix/prometheus/metrics", &[], None).await.text();
    for (f, calls, errors) in [("ok", 2, 0), ("taken", 1, 1), ("getonly", 1, 0)] {
        assert!(page.contains(&format!("weir_function_calls_total{{{}}} {calls}", labels(f))), "{f}: {page}");
        assert!(page.contains(&format!("weir_function_errors_total{{{}}} {errors}", labels(f))), "{f}: {page}");
    }
    assert!(!page.contains("nobody"), "{page}");
}

#[tokio::test]
async fn functions_are_live_when_saved_and_answer_in_both_shapes_with_their_plugins_and_limits() {
    let _alone = timing_alone();
    let w = on_loopback("");
    let (s, b) = v1(&w, "POST", "api-gateways", Some(json!({"name": "Fns", "gatewayId": "fns", "limits": {"timeoutMs": 200, "memoryMiB": 16}}))).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(v1(&w, "POST", "api-gateways", Some(json!({"name": "Other", "gatewayId": "other"}))).await.0, 201);
    until_gateway(&w, "fns", |_, b| b["phase"] == "Started").await;
    until_gateway(&w, "other", |_, b| b["phase"] == "Started").await;
    let (s, b) = v1(&w, "PATCH", "api-gateways/fns", Some(json!({"limits": {"timeoutMs": 999999999}}))).await;
    assert_eq!(s, 400, "{b}");
    assert!(problems(&b)[0].contains("maximum"), "{b}");

    // TypeScript, with an import of its own file; GET only.
    let hello = json!({"name": "user/me", "methods": ["GET"], "source": {"files": {
        "index.ts": "import { shout } from './lib/text';\nexport default async function (ctx: { query: Record<string, string>, path: string, user?: unknown }) {\n  console.log('hello called');\n  return { hello: shout(ctx.query.name ?? 'world'), path: ctx.path };\n}",
        "lib/text.ts": "export const shout = (s: string): string => s.toUpperCase();"}, "entrypoint": "index.ts"}});
    let (s, b) = v1(&w, "POST", "api-gateways/fns/functions", Some(hello.clone())).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!((&b["name"], &b["environment"], &b["version"]), (&json!("dev/user/me"), &json!("dev"), &json!(1)));
    let r = w.until("/dev/user/me?name=ada", &[("host", "fns.localhost")], |r| r.status == 200).await;
    assert_eq!(r.json(), json!({"hello": "ADA", "path": "/dev/user/me"}));
    assert!(r.headers.contains_key("access-control-allow-origin"), "the environment's plugins run around the function");
    let r = w.get("/user/me", &[("host", "fns.dev.localhost")]).await;
    assert_eq!(r.json(), json!({"hello": "WORLD", "path": "/user/me"}));
    let r = send(w.proxy, "POST", "/dev/user/me", &[("host", "fns.localhost")], Some("{}")).await;
    assert_eq!((r.status, r.json()["error_msg"].as_str().is_some()), (405, true), "{}", r.text());
    assert_eq!(w.get("/dev/user/other", &[("host", "fns.localhost")]).await.json()["error_msg"], "nothing is published at this path");
    let (s, b) = v1(&w, "POST", "api-gateways/fns/functions", Some(hello)).await;
    assert_eq!((s, &b["error"]["kind"]), (409, &json!("conflict")), "{b}");
    // Each method once: a list that repeats one is refused and changes nothing.
    let (s, b) = v1(&w, "PATCH", "api-gateways/fns/functions/dev%2Fuser%2Fme", Some(json!({"methods": ["GET", "GET"]}))).await;
    assert_eq!(s, 400, "{b}");
    assert!(problems(&b)[0].contains("unique"), "{b}");
    assert_eq!(v1(&w, "GET", "api-gateways/fns/functions/dev%2Fuser%2Fme", None).await.1["methods"], json!(["GET"]));

    // A source that does not compile: 400 with where, and nothing is stored.
    let (s, b) = v1(&w, "POST", "api-gateways/fns/functions", Some(json!({"name": "broken", "source": {"code": "export default () => {\n  return 1 +;\n}"}}))).await;
    assert_eq!((s, &b["error"]["file"], &b["error"]["line"]), (400, &json!("index.ts"), &json!(2)), "{b}");
    assert!(b["error"]["column"].as_u64().unwrap() > 1, "{b}");
    assert_eq!(v1(&w, "GET", &fn_path("fns", "dev/broken"), None).await.0, 404);
    // A file past its bound is refused in a few words, without the file echoed back.
    let (s, b) = v1(&w, "POST", "api-gateways/fns/functions", Some(json!({"name": "huge", "source": {"code": "x".repeat(600_000)}}))).await;
    assert_eq!((s, problems(&b)), (400, vec!["source.code: value is longer than 524288 characters".to_string()]), "{}", b.to_string().chars().take(300).collect::<String>());
    // Nesting deep enough to overflow the compiler's stack is refused where it goes too deep,
    // and the node goes on (the next request below is served).
    let deep = format!("export default () =>\n{}1{};", "(".repeat(200_000), ")".repeat(200_000));
    let (s, b) = v1(&w, "POST", "api-gateways/fns/functions", Some(json!({"name": "deep", "source": {"code": deep}}))).await;
    assert_eq!((s, &b["error"]["line"], &b["error"]["column"]), (400, &json!(2), &json!(1001)), "{b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("nests deeper than 1000 levels"), "{b}");

    // Express shape, `@/name` imports, SDK in a function, and a function's own plugin.
    let (s, b) = v1(&w, "POST", "api-gateways/fns/functions", Some(json!({"name": "orders", "source": {"code":
        "import me from '@/user/me';\nexport default async (req, res) => { const id = crypto.randomUUID(); res.status(201).set('x-order', id).json({ got: req.body, other: typeof me, via: await imp.invoke('user/me', {}) }) }"},
        "plugins": {"limit-count": {"count": 1, "time_window": 60, "rejected_code": 429}}}))).await;
    assert_eq!(s, 201, "{b}");
    let post = |body: &'static str| send(w.proxy, "POST", "/dev/orders", &[("host", "fns.localhost"), ("content-type", "application/json")], Some(body));
    let mut r = post("{\"n\":1}").await;
    for _ in 0..200 {
        if r.status != 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        r = post("{\"n\":1}").await;
    }
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json(), json!({"got": {"n": 1}, "other": "function", "via": {"hello": "WORLD", "path": "/user/me"}}));
    assert_eq!(r.headers["x-order"].len(), 36);
    assert_eq!(post("{}").await.status, 429, "the function's own limit-count applies to it");
    assert_eq!(w.get("/dev/user/me", &[("host", "fns.localhost")]).await.status, 200, "and to no other function");
    // A function that imports another by name and answers what that one answers.
    assert_eq!(v1(&w, "POST", "api-gateways/fns/functions", Some(json!({"name": "importer", "source": {"code": "import me from '@/user/me';\nexport default (ctx) => me(ctx);"}}))).await.0, 201);
    let r = w.until("/dev/importer", &[("host", "fns.localhost")], |r| r.status != 404).await;
    assert_eq!(r.json(), json!({"hello": "WORLD", "path": "/dev/importer"}));

    // Every SDK call, over HTTP.
    let sdk = r#"
export default async (ctx) => {
  console.info('sdk', ctx.requestId);
  const waited = await new Promise((r) => setTimeout(() => r('late'), 5));
  const t = setTimeout(() => { throw new Error('cancelled timers never fire') }, 1);
  clearTimeout(t);
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', new TextEncoder().encode('abc')));
  const u = new URL('https://api.example.com/a?x=1');
  u.searchParams.set('y', '2');
  imp.shared.set('n', (imp.shared.get('n') || 0) + 1);
  const random = crypto.getRandomValues(new Uint8Array(8));
  return {
    waited, uuid: crypto.randomUUID().length, random: random.length,
    sha: Array.from(digest.slice(0, 4)).map((b) => b.toString(16).padStart(2, '0')).join(''),
    url: u.href, params: new URLSearchParams({ q: 'a b' }).toString(),
    b64: atob(btoa('hi')), utf8: new TextDecoder().decode(new TextEncoder().encode('ü')),
    shared: imp.shared.get('n'), invoked: await cloud.invoke('user/me', {}),
    headers: new Headers({ 'X-A': '1' }).get('x-a'), body: ctx.body, query: ctx.query,
  };
}"#;
    assert_eq!(v1(&w, "POST", "api-gateways/fns/functions", Some(json!({"name": "sdk", "source": {"code": sdk}}))).await.0, 201);
    let r = w.until("/dev/sdk?a=1&a=2", &[("host", "fns.localhost")], |r| r.status != 404).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({
        "waited": "late", "uuid": 36, "random": 8, "sha": "ba7816bf", "url": "https://api.example.com/a?x=1&y=2",
        "params": "q=a+b", "b64": "hi", "utf8": "ü", "shared": 1, "invoked": {"hello": "WORLD", "path": "/user/me"},
        "headers": "1", "query": {"a": ["1", "2"]}
    }));
    let r = send(w.proxy, "POST", "/dev/sdk", &[("host", "fns.localhost"), ("content-type", "application/x-www-form-urlencoded")], Some("k=v&k=w&z=1")).await;
    assert_eq!((r.json()["body"].clone(), r.json()["shared"].clone()), (json!({"k": ["v", "w"], "z": "1"}), json!(2)), "{}", r.text());

    // A new source is a new version, live at once; in-process invoke and the logs.
    let (s, b) = v1(&w, "PATCH", &fn_path("fns", "dev/user/me"), Some(json!({"source": {"code": "export default (ctx) => { console.warn('v2', ctx.method); return 'v2' }"}}))).await;
    assert_eq!((s, &b["version"]), (200, &json!(2)), "{b}");
    let r = w.until("/dev/user/me", &[("host", "fns.localhost")], |r| r.text() == "v2").await;
    assert_eq!(r.headers["content-type"], "text/plain; charset=utf-8");
    // What imports it by name follows: its modules load again, bound to the new version.
    let r = w.get("/dev/importer", &[("host", "fns.localhost")]).await;
    assert_eq!(r.text(), "v2");
    let (s, b) = v1(&w, "POST", &format!("{}/invoke", fn_path("fns", "dev/user/me")), Some(json!({"method": "GET", "query": {"a": "1"}}))).await;
    assert_eq!((s, &b["status"], &b["body"]), (200, &json!(200), &json!("v2")), "{b}");
    assert_eq!(b["logs"][0]["message"], "v2 GET", "{b}");
    assert!(b["durationMs"].as_f64().is_some());
    // A method it does not answer is refused as a request's is, without running it.
    let (s, b) = v1(&w, "POST", &format!("{}/invoke", fn_path("fns", "dev/user/me")), Some(json!({"method": "DELETE"}))).await;
    assert_eq!((s, &b["status"], &b["headers"]["allow"], &b["logs"]), (200, &json!(405), &json!("GET"), &json!([])), "{b}");
    assert_eq!(b["body"]["error_msg"], "DELETE is not one of this function's methods", "{b}");
    // An invocation gives at most 100 headers and 100 query parameters, as a request would.
    let many: serde_json::Map<String, Value> = (0..101).map(|i| (format!("x-h{i}"), json!("v"))).collect();
    let (s, b) = v1(&w, "POST", &format!("{}/invoke", fn_path("fns", "dev/user/me")), Some(json!({"headers": many}))).await;
    assert_eq!((s, &b["error"]["problems"][0]), (400, &json!("headers: 101 entries, more than the 100 an invocation may give")), "{b}");
    let (s, b) = v1(&w, "POST", &format!("{}/invoke", fn_path("fns", "dev/user/me")), Some(json!({"query": many}))).await;
    assert_eq!(s, 400, "{b}");
    // The lines a call answers with are bounded in bytes, the request id each repeats counted.
    assert_eq!(v1(&w, "POST", "api-gateways/fns/functions", Some(json!({"name": "chatty", "source": {"code": "export default () => { for (let i = 0; i < 50; i++) console.log('line', i); return 'ok' }"}}))).await.0, 201);
    let chatty = format!("{}/invoke", fn_path("fns", "dev/chatty"));
    let (s, b) = v1(&w, "POST", &chatty, Some(json!({"headers": {"x-request-id": "short-id"}}))).await;
    assert_eq!((s, b["logs"].as_array().map(Vec::len), &b["logs"][49]["requestId"]), (200, Some(50), &json!("short-id")), "{b}");
    let (s, b) = v1(&w, "POST", &chatty, Some(json!({"headers": {"x-request-id": "r".repeat(60_000)}}))).await;
    let logs = b["logs"].as_array().unwrap();
    assert!(s == 200 && logs.len() <= 5 && logs.last().unwrap()["message"].as_str().unwrap().contains("not kept"), "{s} {}", logs.len());
    let (s, b) = v1(&w, "GET", &format!("{}/logs?limit=5", fn_path("fns", "dev/user/me")), None).await;
    assert_eq!(s, 200, "{b}");
    let messages: Vec<&str> = b["list"].as_array().unwrap().iter().map(|l| l["message"].as_str().unwrap()).collect();
    assert!(messages.contains(&"hello called") && messages.contains(&"v2 GET"), "{b}");
    assert_eq!(v1(&w, "GET", &format!("{}/logs?since=yesterday", fn_path("fns", "dev/user/me")), None).await.0, 400);

    // The gateway's variables: a secret one is readable by functions, never shown or stored plain.
    let vars = json!({"env": [{"name": "GREETING", "value": "hi"}, {"name": "TOKEN", "value": "s3cret-value", "secret": true}]});
    let (s, b) = v1(&w, "PATCH", "api-gateways/fns", Some(vars)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["env"], json!([{"name": "GREETING", "value": "hi", "secret": false}, {"name": "TOKEN", "secret": true}]));
    assert_eq!(v1(&w, "POST", "api-gateways/fns/functions", Some(json!({"name": "vars", "source": {"code": "export default () => ({ g: imp.env.GREETING, t: imp.env.TOKEN })"}}))).await.0, 201);
    w.until("/dev/vars", &[("host", "fns.localhost")], |r| r.json() == json!({"g": "hi", "t": "s3cret-value"})).await;
    assert!(!v1(&w, "GET", "api-gateways/fns", None).await.1.to_string().contains("s3cret"));
    let (_, backup) = w.admin("GET", "/backup", None).await;
    assert!(backup.to_string().contains("GREETING") && !backup.to_string().contains("s3cret"), "secret variables are sealed in the store");
    // A variable kept to prod is not in dev's `imp.env`; a bad environment list changes nothing.
    let kept = json!({"env": [{"name": "GREETING", "value": "hi"}, {"name": "TOKEN", "value": "prod-only-value", "secret": true, "environments": ["prod"]}]});
    for (bad, says) in [(json!([]), "at least one"), (json!(["qa"]), "is not one of dev, staging, prod"), (json!(["prod", "prod"]), "given twice"), (json!(["dev", "staging", "prod", "dev"]), "env.1.environments")] {
        let mut body = kept.clone();
        body["env"][1]["environments"] = bad;
        let (s, b) = v1(&w, "PATCH", "api-gateways/fns", Some(body)).await;
        assert!(s == 400 && b.to_string().contains(says), "{s} {b}");
    }
    assert_eq!(w.get("/dev/vars", &[("host", "fns.localhost")]).await.json(), json!({"g": "hi", "t": "s3cret-value"}));
    let (s, b) = v1(&w, "PATCH", "api-gateways/fns", Some(kept)).await;
    assert_eq!((s, &b["env"][1]), (200, &json!({"name": "TOKEN", "secret": true, "environments": ["prod"]})), "{b}");
    w.until("/dev/vars", &[("host", "fns.localhost")], |r| r.json() == json!({"g": "hi"})).await;

    // Runtime errors: a throw is 500 with its message (and stack in dev), an infinite loop 504
    // within its 200 ms budget, a memory bomb 500; the runtime answers the next call.
    let save = |name: &'static str, code: &'static str| v1(&w, "POST", "api-gateways/fns/functions", Some(json!({"name": name, "source": {"code": code}})));
    assert_eq!(save("throws", "export default () => { throw new Error('no luck') }").await.0, 201);
    assert_eq!(save("spin", "export default () => { for (;;) {} }").await.0, 201);
    assert_eq!(save("bomb", "export default () => { const a = []; for (;;) a.push(new ArrayBuffer(1 << 20)) }").await.0, 201);
    let r = w.until("/dev/throws", &[("host", "fns.localhost")], |r| r.status != 404).await;
    assert_eq!((r.status, r.json()["error_msg"].clone()), (500, json!("no luck")));
    assert!(r.json()["stack"].as_str().is_some_and(|s| s.contains("index.ts")), "{}", r.text());
    w.until("/dev/bomb", &[("host", "fns.localhost")], |r| r.status != 404).await;
    w.until("/dev/spin", &[("host", "fns.localhost")], |r| r.status != 404).await;
    // The budget is CPU: the loop stops once its runtime spent 200 ms (± 10%) on it, and
    // answers within that and whatever time the runtime waited for a core (other tests share
    // these two).
    let (t, before) = (std::time::Instant::now(), sched_of(w.pid(), "fn-fns"));
    let r = w.get("/dev/spin", &[("host", "fns.localhost")]).await;
    let (took, after) = (t.elapsed(), sched_of(w.pid(), "fn-fns"));
    assert_eq!(r.status, 504, "{}", r.text());
    let (ran, waited) = (after.0 - before.0, after.1 - before.1);
    assert!(ran >= Duration::from_millis(180) && ran < Duration::from_millis(220), "CPU {ran:?}");
    assert!(took < Duration::from_millis(220 + 50) + waited, "{took:?}, waited {waited:?}");
    let r = w.get("/dev/bomb", &[("host", "fns.localhost")]).await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.json()["error_msg"].as_str().unwrap().contains("memory"), "{}", r.text());
    assert_eq!(w.get("/dev/user/me", &[("host", "fns.localhost")]).await.text(), "v2");

    // Another tenant's latency while this one spins and bombs.
    assert_eq!(v1(&w, "POST", "api-gateways/other/functions", Some(json!({"name": "ping", "source": {"code": "export default () => ({ pong: true })"}}))).await.0, 201);
    w.until("/dev/ping", &[("host", "other.localhost")], |r| r.status == 200).await;
    // Other tests share these two cores, so one pass can be slowed by them alone: the bound
    // must hold in one of three passes, each against the quietest p99 measured so far (a
    // quiet one measured just after the noise cannot excuse a slow one). A runtime that let
    // the spinning tenant in would miss it in all three.
    let mut passes = Vec::new();
    let mut quietest = Duration::MAX;
    for _ in 0..3 {
        let quiet = p99(&w, "/dev/ping", "other.localhost", 100).await.min(quietest);
        quietest = quiet;
        let noise = tokio::spawn({
            let proxy = w.proxy;
            async move {
                for i in 0..20 {
                    let path = if i % 2 == 0 { "/dev/spin" } else { "/dev/bomb" };
                    send(proxy, "GET", path, &[("host", "fns.localhost")], None).await;
                }
            }
        });
        let noisy = p99(&w, "/dev/ping", "other.localhost", 100).await;
        noise.await.unwrap();
        passes.push((quiet, noisy));
        if noisy < quiet + Duration::from_millis(10) {
            break;
        }
    }
    assert!(passes.iter().any(|(quiet, noisy)| *noisy < *quiet + Duration::from_millis(10)), "p99 alone and beside a spinning tenant, each pass: {passes:?}");

    // Past the gateway's concurrent calls: 503 with when to come back, from a route and from
    // an invocation alike.
    assert_eq!(v1(&w, "PATCH", "api-gateways/fns", Some(json!({"limits": {"concurrency": 1}}))).await.0, 200);
    assert_eq!(save("slow", "export default () => new Promise((r) => setTimeout(() => r('slow'), 3000))").await.0, 201);
    w.until("/dev/slow", &[("host", "fns.localhost")], |r| r.status != 404).await;
    let held = tokio::spawn({
        let proxy = w.proxy;
        async move { send(proxy, "GET", "/dev/slow", &[("host", "fns.localhost")], None).await }
    });
    // Nothing else calls meanwhile: the slow call takes the one place, and keeps it 3 s.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = w.get("/dev/user/me", &[("host", "fns.localhost")]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!((r.headers["retry-after"].to_str().unwrap(), r.json()["error_msg"].as_str()), ("1", Some("too many calls of this gateway's functions are in flight")), "{}", r.text());
    let r = send(w.admin, "POST", &format!("/v1/{}/invoke", fn_path("fns", "dev/user/me")), &[("x-api-key", KEY)], Some("{\"method\": \"GET\"}")).await;
    assert_eq!((r.status, r.headers["retry-after"].to_str().unwrap()), (503, "1"), "{}", r.text());
    let r = held.await.unwrap();
    assert_eq!((r.status, r.text()), (200, "slow".to_string()));
    w.until("/dev/user/me", &[("host", "fns.localhost")], |r| r.status == 200).await;

    // Deleted: the path falls back to the environment's routes.
    assert_eq!(v1(&w, "DELETE", &fn_path("fns", "dev/user/me"), None).await.0, 200);
    w.until("/dev/user/me", &[("host", "fns.localhost")], |r| r.status == 404).await;
    // An inactive environment serves no function.
    assert_eq!(v1(&w, "PATCH", "api-gateways/fns/environments/dev", Some(json!({"state": "inactive"}))).await.0, 200);
    let r = w.until("/dev/orders", &[("host", "fns.localhost")], |r| r.status == 503).await;
    assert_eq!(r.json()["error_msg"], "this environment is inactive");
    // A deleted gateway takes its functions along.
    assert_eq!(v1(&w, "DELETE", "api-gateways/fns", None).await.0, 202);
    until_gateway(&w, "fns", |s, _| s == 404).await;
    let (s, b) = w.admin("GET", "/backup", None).await;
    assert_eq!(s, 200);
    assert!(!b.to_string().contains("platform/live/fns/"), "{b}");
}

/// A tenant's upstream named by a name connects only where the platform lets tenants reach: the
/// name is resolved when a connection is made and every address checked (here in the test's
/// resolver: `far.test` is a private address, refused without a packet sent).
#[tokio::test]
async fn a_tenants_upstream_name_connects_only_outside_the_denied_networks() {
    let w = platform_weir(
        "  type: embedded\n  path: \"{data}\"\n",
        "  denied_networks: [\"10.0.0.0/8\", \"169.254.0.0/16\"]\n",
        &[("WEIR_FUNCTIONS_TEST_HOSTS", "near.test=127.0.0.1,far.test=10.1.2.3,meta.test=169.254.169.254")],
    );
    let up = Upstream::start("named").await;
    assert_eq!(v1(&w, "POST", "api-gateways", Some(json!({"name": "Named", "gatewayId": "named"}))).await.0, 201);
    until_gateway(&w, "named", |_, b| b["phase"] == "Started").await;
    let port = up.addr.port();
    for (env, node) in [("dev", format!("near.test:{port}")), ("staging", "far.test:80".to_string()), ("prod", "meta.test:80".to_string())] {
        let (s, b) = v1(&w, "PATCH", &format!("api-gateways/named/environments/{env}"), Some(json!({"upstream": {"type": "roundrobin", "nodes": {node: 1}}}))).await;
        assert_eq!(s, 200, "{env}: {b}");
    }
    let host = [("host", "named.localhost")];
    let r = w.until("/dev/hello", &host, |r| r.status == 200).await;
    assert_eq!(r.json()["server"], "named", "a name that resolves outside the denied networks connects");
    let hits = up.hits.load(std::sync::atomic::Ordering::SeqCst);
    for (path, why) in [("/staging/x", "far.test resolves to 10.1.2.3 is in 10.0.0.0/8"), ("/prod/x", "meta.test resolves to 169.254.169.254 is in 169.254.0.0/16")] {
        let r = w.until(path, &host, |r| r.status >= 500).await;
        assert_eq!(r.status, 502, "{path}: {}", r.text());
        let log = w.log();
        assert!(log.contains(why), "{why} in {log}");
    }
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), hits);
}

/// Where the operator lets tenants reach loopback, this node's own listeners stay out of their
/// upstreams' reach, by address and by a name that resolves to one.
#[tokio::test]
async fn a_tenants_upstream_never_reaches_this_nodes_own_listeners() {
    let w = platform_weir("  type: embedded\n  path: \"{data}\"\n", "  denied_networks: []\n", &[("WEIR_FUNCTIONS_TEST_HOSTS", "me.test=127.0.0.1")]);
    started_gateway(&w, "selfish").await;
    let up = Upstream::start("allowed").await;
    let (admin, proxy) = (w.admin.port(), w.proxy.port());
    for (env, node) in [("dev", format!("127.0.0.1:{admin}")), ("staging", format!("me.test:{proxy}")), ("prod", up.node())] {
        let (s, b) = v1(&w, "PATCH", &format!("api-gateways/selfish/environments/{env}"), Some(json!({"upstream": {"type": "roundrobin", "nodes": {node: 1}}}))).await;
        assert_eq!(s, 200, "{env}: {b}");
    }
    let host = [("host", "selfish.localhost")];
    assert_eq!(w.until("/prod/hello", &host, |r| r.status == 200).await.json()["server"], "allowed", "loopback is the tenant's here");
    for path in ["/dev/apisix/admin/routes", "/staging/x"] {
        let r = w.until(path, &host, |r| r.status != 404).await;
        assert_eq!(r.status, 502, "{path}: {}", r.text());
    }
    assert!(w.log().contains("is one of this node's own listeners"), "{}", w.log());
}

/// An auth plugin a tenant's function configures takes its environment's grants only: the
/// operator's consumers, whose keys the operator's own routes accept, are refused there.
#[tokio::test]
async fn a_functions_own_key_auth_takes_no_operator_consumer() {
    let w = on_loopback("");
    let up = Upstream::start("operator").await;
    assert_eq!(w.admin("PUT", "/consumers", Some(json!({"username": "op", "plugins": {"key-auth": {"key": "plain-operator-key"}}}))).await.0, 201);
    assert_eq!(w.admin("PUT", "/routes/op", Some(json!({"uri": "/op", "host": "operator.test", "plugins": {"key-auth": {}}, "upstream": {"nodes": {up.node(): 1}}}))).await.0, 201);
    let r = w.until("/op", &[("host", "operator.test"), ("apikey", "plain-operator-key")], |r| r.status == 200).await;
    assert_eq!(r.status, 200, "the operator's key works on the operator's route");
    assert_eq!(v1(&w, "POST", "api-gateways", Some(json!({"name": "Own", "gatewayId": "own"}))).await.0, 201);
    until_gateway(&w, "own", |_, b| b["phase"] == "Started").await;
    let f = json!({"name": "guarded", "source": {"code": "export default (ctx) => ({ user: ctx.user ?? null })"}, "plugins": {"key-auth": {}}});
    assert_eq!(v1(&w, "POST", "api-gateways/own/functions", Some(f)).await.0, 201);
    let host = [("host", "own.localhost")];
    w.until("/dev/guarded", &host, |r| r.status == 401).await;
    let r = w.get("/dev/guarded", &[("host", "own.localhost"), ("apikey", "plain-operator-key")]).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let (s, b) = v1(&w, "POST", "api-gateways/own/functions", Some(json!({"name": "scoped", "source": {"code": "export default () => 1"}, "plugins": {"key-auth": {"scope": "wp.other.dev"}}}))).await;
    assert_eq!(s, 400, "a tenant names no scope: {b}");
}

/// A function's `fetch` reaches hosts on its gateway's allow list and nothing of this node or
/// of private networks: loopback (the admin and proxy listeners among it), `localhost`, `[::1]`,
/// and names that resolve to private or link-local addresses (in a resolver of the test's: no
/// packet leaves loopback).
#[tokio::test]
async fn fetch_reaches_allowed_hosts_and_never_this_node_or_private_networks() {
    let w = platform_weir(
        "  type: embedded\n  path: \"{data}\"\n",
        "  denied_networks: [\"203.0.113.0/24\"]\n  functions:\n    fetch_allow_networks: [\"127.0.0.2/32\"]\n",
        &[("WEIR_FUNCTIONS_TEST_HOSTS", "evil.test=10.1.2.3,metadata.test=169.254.169.254,inside.test=fd00::1,mgmt.test=203.0.113.9")],
    );
    let up = Upstream::start_at("allowed", "127.0.0.2:0".parse().unwrap()).await;
    let admin = w.admin.port();
    let proxy = w.proxy.port();
    let allow = json!([up.node(), format!("127.0.0.1:{admin}"), format!("127.0.0.1:{proxy}"), format!("127.0.0.1:{}", up.addr.port()), format!("localhost:{proxy}"), format!("[::1]:{proxy}"), "evil.test:80", "metadata.test:80", "inside.test:443", "mgmt.test:443"]);
    let (s, b) = v1(&w, "POST", "api-gateways", Some(json!({"name": "Fetcher", "gatewayId": "fetcher", "fetchAllowList": allow}))).await;
    assert_eq!(s, 201, "{b}");
    until_gateway(&w, "fetcher", |_, b| b["phase"] == "Started").await;
    let code = "export default async (ctx) => { try { const r = await fetch(ctx.query.url, { method: ctx.query.method || 'GET', headers: { 'x-from': 'fn' } }); return { ok: true, status: r.status, body: await r.json() } } catch (e) { return { ok: false, error: e.message } } }";
    assert_eq!(v1(&w, "POST", "api-gateways/fetcher/functions", Some(json!({"name": "get", "source": {"code": code}}))).await.0, 201);
    let w = &w;
    let fetch = |url: String| {
        let path = format!("/dev/get?url={}", url.replace(':', "%3A").replace('/', "%2F").replace('[', "%5B").replace(']', "%5D"));
        async move { w.until(&path, &[("host", "fetcher.localhost")], |r| r.status != 404).await.json() }
    };
    let ok = fetch(format!("http://{}/hello?x=1", up.node())).await;
    assert_eq!((&ok["ok"], &ok["status"], &ok["body"]["uri"]), (&json!(true), &json!(200), &json!("/hello?x=1")), "{ok}");
    assert_eq!(ok["body"]["headers"]["x-from"], "fn", "{ok}");
    let refused = [
        (format!("http://127.0.0.1:{admin}/apisix/admin/routes"), "own listeners"),
        (format!("http://127.0.0.1:{proxy}/"), "own listeners"),
        (format!("http://127.0.0.1:{}/", up.addr.port()), "127.0.0.0/8"),
        (format!("http://localhost:{proxy}/"), "refused"),
        (format!("http://[::1]:{proxy}/"), "::1/128"),
        ("http://evil.test/".to_string(), "10.0.0.0/8"),
        ("http://metadata.test/latest/meta-data".to_string(), "169.254.0.0/16"),
        ("https://inside.test/".to_string(), "fc00::/7"),
        // The operator's own denied networks, as for tenants' upstreams.
        ("https://mgmt.test/".to_string(), "203.0.113.0/24"),
        ("http://not-listed.test/".to_string(), "fetchAllowList"),
        ("file:///etc/passwd".to_string(), "only http and https"),
    ];
    let hits = up.hits.load(std::sync::atomic::Ordering::SeqCst);
    for (url, why) in refused {
        let r = fetch(url.clone()).await;
        assert_eq!(r["ok"], false, "{url}: {r}");
        let error = r["error"].as_str().unwrap();
        assert!(error.contains(why) && (error.contains("refused") || error.contains("only http")), "{url}: {error}");
        // What a name resolved to stays the node's.
        for resolved in ["10.1.2.3", "169.254.169.254", "fd00::1", "203.0.113.9"] {
            assert!(!error.contains(resolved), "{url}: {error}");
        }
    }
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), hits);

    // Fetched bodies are the gateway's memory while the runtime holds them: a function that
    // keeps a hundred 1 MiB answers passes its 64 MiB and fails as out of memory, and the
    // runtime answers the next call.
    let code = format!("const kept = []; export default async () => {{ const big = 'x'.repeat(1 << 20); for (let i = 0; i < 100; i++) kept.push(await fetch('http://{}/echo', {{ method: 'POST', body: big }})); return {{ kept: kept.length }} }}", up.node());
    assert_eq!(v1(w, "POST", "api-gateways/fetcher/functions", Some(json!({"name": "hoard", "source": {"code": code}}))).await.0, 201);
    let r = w.until("/dev/hoard", &[("host", "fetcher.localhost")], |r| r.status != 404).await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.json()["error_msg"].as_str().unwrap().contains("memory"), "{}", r.text());
    let ok = fetch(format!("http://{}/again", up.node())).await;
    assert_eq!((&ok["ok"], &ok["body"]["uri"]), (&json!(true), &json!("/again")), "{ok}");
    // A request's headers are bounded (256 KiB) before they leave the runtime; nothing is
    // sent for one past the bound.
    let hits = up.hits.load(std::sync::atomic::Ordering::SeqCst);
    let code = format!("export default async () => {{ const h = 'x'.repeat(36 << 20); try {{ await fetch('http://{0}/b', {{ headers: {{ 'x-b': h }} }}); return {{ sent: true }} }} catch (e) {{ return {{ sent: false, why: e.message }} }} }}", up.node());
    assert_eq!(v1(w, "POST", "api-gateways/fetcher/functions", Some(json!({"name": "headers", "source": {"code": code}}))).await.0, 201);
    let r = w.until("/dev/headers", &[("host", "fetcher.localhost")], |r| r.status != 404).await;
    assert_eq!(r.json(), json!({"sent": false, "why": "header fields of more than 256 KiB; at most that may be sent"}), "{}", r.text());
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), hits);
    let log = w.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// What gateway `gid`'s function at `path` answers: its `v`, or null (nothing published).
async fn version_at(w: &Weir, gid: &str, path: &str) -> Value {
    w.get(path, &[("host", &format!("{gid}.localhost"))]).await.json()["v"].clone()
}

/// Polls until gateway `gid`'s function at `path` answers version `want` (up to 60 s: a large
/// function compiles for a while in a test build).
async fn answers_version(w: &Weir, gid: &str, path: &str, want: u32) {
    for _ in 0..3000 {
        if version_at(w, gid, path).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{gid}'s {path} never answered version {want}");
}

#[tokio::test]
async fn a_gateway_saving_large_functions_holds_up_no_other_gateways_saves() {
    // Saved on A, compiled on B: B has no compile of A's saves at hand. Unpaced: four large
    // saves in a row are past a gateway's default pace, and the compiles are what is tested.
    let etcd = common::Etcd::start().await;
    let node = || {
        let store = format!("  type: etcd\n  etcd:\n    endpoints: [\"{}\"]\n    timeout: 2\n", etcd.endpoint());
        platform_weir(&store, "  lease_timeout: 2\n  denied_networks: []\n  functions:\n    publish_bytes_per_minute: 0\n", &[])
    };
    let (a, b) = (node(), node());
    started_gateway(&a, "big").await;
    started_gateway(&a, "small").await;
    // 600 KB of TypeScript in two files (a save and its history entry, twice that, fit in
    // one etcd request): it keeps the compiler busy for a while.
    let lib = |seed: u32| {
        let mut code = String::new();
        for i in 0.. {
            if code.len() > 300_000 {
                break;
            }
            code += &format!("export function f{i}(a: number, b: string): string {{ const x = {{ k: a + {i}, s: b.repeat(2) }}; return JSON.stringify(x) + '{seed}'; }}\n");
        }
        code
    };
    let large = |v: u32| {
        let files = json!({"a.ts": lib(v), "b.ts": lib(v + 1000),
            "index.ts": format!("import {{ f1 }} from './a';\nimport {{ f2 }} from './b';\nexport default () => ({{ v: {v}, a: typeof f1, b: typeof f2 }});\n")});
        json!({"files": files, "entrypoint": "index.ts"})
    };
    let small = |v: u32| json!({"code": format!("export default () => ({{ v: {v} }});")});
    let short = |b: &Value| b.to_string().chars().take(300).collect::<String>();
    let save = async |method: &str, path: String, body: Value| {
        let (s, r) = v1(&a, method, &path, Some(body)).await;
        assert!((200..300).contains(&s), "{method} {path}: {s} {}", short(&r));
    };
    save("POST", "api-gateways/big/functions".into(), json!({"name": "f", "source": large(1)})).await;
    save("POST", "api-gateways/small/functions".into(), json!({"name": "f", "source": small(1)})).await;
    answers_version(&b, "big", "/dev/f", 1).await;
    answers_version(&b, "small", "/dev/f", 1).await;

    // A large save, then a small one: on B the small one goes live while the large one still
    // compiles, the large function answering with its previous version meanwhile. Where the
    // large compile happens to be done first, the next round tries again.
    let mut overtaken = 0;
    for v in 2..=4 {
        save("PATCH", fn_path("big", "dev/f"), json!({"source": large(v)})).await;
        save("PATCH", fn_path("small", "dev/f"), json!({"source": small(v)})).await;
        answers_version(&b, "small", "/dev/f", v).await;
        let big = version_at(&b, "big", "/dev/f").await;
        assert!(big == v - 1 || big == v, "{big}");
        overtaken += u32::from(big == v - 1);
        answers_version(&b, "big", "/dev/f", v).await;
    }
    assert!(overtaken > 0, "the small saves waited for the large compiles");
}

/// The `/proc` directories of the threads of process `pid` named `name`.
fn threads_named(pid: u32, name: &str) -> Vec<std::path::PathBuf> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks.filter_map(Result::ok).filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)).map(|t| t.path()).collect()
}

/// Polls until `pid` has `want` threads named `name` (up to 10 s), and says how many it has.
async fn settle_threads(pid: u32, name: &str, want: usize) -> usize {
    for _ in 0..500 {
        if threads_named(pid, name).len() == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    threads_named(pid, name).len()
}

#[tokio::test]
async fn a_gateways_runtime_ends_with_a_change_of_its_memory_limit_and_with_the_gateway() {
    let w = on_loopback("");
    started_gateway(&w, "rtm").await;
    let (s, b) = v1(&w, "POST", "api-gateways/rtm/functions", Some(json!({"name": "big", "source": {"code": "export default () => ({ n: new Uint8Array(40 << 20).length })"}}))).await;
    assert_eq!(s, 201, "{b}");
    let host = [("host", "rtm.localhost")];
    w.until("/dev/big", &host, |r| r.status == 200).await;
    // Started again, the node compiles the gateway in its first full build.
    let cfg = w.dir.path().join("weir.yaml");
    let dir = w.kill9();
    let w = Weir::spawn(dir, &cfg, &[]);
    w.until("/dev/big", &host, |r| r.status == 200).await;
    assert_eq!(threads_named(w.pid(), "fn-rtm").len(), 1);

    // A new memory limit is a new runtime (the call no longer fits), and the old one ends.
    let (s, b) = v1(&w, "PATCH", "api-gateways/rtm", Some(json!({"limits": {"memoryMiB": 32}}))).await;
    assert_eq!(s, 200, "{b}");
    w.until("/dev/big", &host, |r| r.status == 500).await;
    assert_eq!(settle_threads(w.pid(), "fn-rtm", 1).await, 1, "the runtime of the old limit ends");

    let (s, b) = v1(&w, "DELETE", "api-gateways/rtm", None).await;
    assert!((200..300).contains(&s), "{s} {b}");
    assert_eq!(settle_threads(w.pid(), "fn-rtm", 0).await, 0, "the deleted gateway's runtime ends");
}

#[tokio::test]
async fn a_function_larger_than_etcd_takes_in_one_write_is_refused_as_such_and_nothing_is_stored() {
    let etcd = common::Etcd::start().await;
    let a = platform_node(&etcd, &[]);
    started_gateway(&a, "wide").await;
    // Two files of 480 KB: the function and its history entry go in one write of about 2 MB.
    let file = format!("export const x = '{}';\n", "y".repeat(480_000));
    let body = json!({"name": "f", "source": {"files": {"index.ts": format!("{file}export default () => 1;\n"), "b.ts": file}, "entrypoint": "index.ts"}});
    let (s, b) = v1(&a, "POST", "api-gateways/wide/functions", Some(body)).await;
    let message = b["error"]["message"].as_str().unwrap_or_default().to_string();
    assert_eq!((s, b["error"]["kind"].as_str()), (400, Some("bad_input")), "{}", b.to_string().chars().take(400).collect::<String>());
    assert!(message.contains("larger than the store takes") && message.contains("--max-request-bytes"), "{message}");
    assert_eq!(v1(&a, "GET", &fn_path("wide", "dev/f"), None).await.0, 404, "nothing was stored");
    // A function that fits is saved as ever.
    let (s, b) = v1(&a, "POST", "api-gateways/wide/functions", Some(json!({"name": "f", "source": {"code": "export default () => 1;"}}))).await;
    assert_eq!(s, 201, "{b}");
}

/// A function's 426 keeps the `Upgrade` field that says what to switch to (RFC 9110 requires
/// it); other connection-scoped fields of a function's answer stay behind, as ever.
#[tokio::test]
async fn a_functions_426_keeps_its_upgrade_field() {
    let w = on_loopback("");
    started_gateway(&w, "upg").await;
    let code = "export default () => new Response('', { status: 426, headers: { upgrade: 'TLS/1.3', 'keep-alive': 'timeout=5', 'x-kept': '1' } })";
    let (s, b) = v1(&w, "POST", "api-gateways/upg/functions", Some(json!({"name": "tls", "source": {"code": code}}))).await;
    assert_eq!(s, 201, "{b}");
    let r = w.until("/dev/tls", &[("host", "upg.localhost")], |r| r.status != 404).await;
    assert_eq!(r.status, 426, "{}", r.text());
    assert_eq!(r.headers.get("upgrade").and_then(|v| v.to_str().ok()), Some("TLS/1.3"), "{:?}", r.headers);
    // Named in `Connection`, as whoever sends `Upgrade` must.
    assert!(r.headers.get("connection").and_then(|v| v.to_str().ok()).is_some_and(|c| c.contains("upgrade")), "{:?}", r.headers);
    assert!(!r.headers.contains_key("keep-alive") && r.headers.contains_key("x-kept"), "{:?}", r.headers);
    // The same through hyper's side of the front (a request with a body).
    let r = send(w.proxy, "POST", "/dev/tls", &[("host", "upg.localhost")], Some("x")).await;
    assert_eq!(r.status, 426, "{}", r.text());
    let field = |n: &str| r.headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(field("upgrade") == "TLS/1.3" && field("connection").contains("upgrade"), "{:?}", r.headers);
    assert!(!r.headers.contains_key("keep-alive") && r.headers.contains_key("x-kept"), "{:?}", r.headers);
}
