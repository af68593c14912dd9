//! Applications and grants end to end on two nodes sharing etcd: API keys that work where they
//! were granted and nowhere else, rotate with and without an overlap, expire, carry a quota,
//! go with their application, and are never stored, logged or shown after their creation.

mod common;

use std::time::{Duration, Instant};

use common::platform::{platform_weir, until_gateway, v1};
use common::{KEY, Upstream, Weir, send};
use serde_json::{Value, json};

/// `path` on environment `env` of gateway `api` with `headers`: status and body.
async fn hit(w: &Weir, env: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let host = format!("api.{env}.localhost");
    let mut all = vec![("host", host.as_str())];
    all.extend_from_slice(headers);
    let r = send(w.proxy, "GET", path, &all, None).await;
    (r.status, r.text())
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test]
async fn grants_let_applications_in_where_granted_rotate_expire_and_leave_no_key_behind() {
    let etcd = common::Etcd::start().await;
    let store = format!("  type: etcd\n  etcd:\n    endpoints: [\"{}\"]\n    timeout: 2\n", etcd.endpoint());
    let a = platform_weir(&store, "  lease_timeout: 2\n  denied_networks: []\n", &[]);
    let b = platform_weir(&store, "  lease_timeout: 2\n  denied_networks: []\n", &[]);
    let up = Upstream::start("backend").await;
    assert_eq!(v1(&a, "POST", "api-gateways", Some(json!({"name": "Api", "gatewayId": "api"}))).await.0, 201);
    until_gateway(&a, "api", |_, b| b["phase"] == "Started").await;
    for env in ["dev", "staging"] {
        let (s, body) = v1(&a, "PATCH", &format!("api-gateways/api/environments/{env}"), Some(json!({"authType": "key-auth", "upstream": {"nodes": {up.node(): 1}, "type": "roundrobin"}}))).await;
        assert_eq!(s, 200, "{body}");
    }
    let me = "export default (ctx) => ({ user: ctx.user ?? null })";
    assert_eq!(v1(&a, "POST", "api-gateways/api/functions", Some(json!({"name": "me", "source": {"code": me}}))).await.0, 201);

    // An application with a grant on dev, one on staging with a quota.
    let (s, app) = v1(&a, "POST", "applications", Some(json!({"name": "Mobile", "organization": "Acme", "tags": ["ios"]}))).await;
    assert_eq!(s, 201, "{app}");
    let app_id = app["appId"].as_str().unwrap().to_string();
    let (s, dev) = v1(&a, "POST", &format!("applications/{app_id}/grants"), Some(json!({"gatewayId": "api", "environment": "dev"}))).await;
    assert_eq!(s, 201, "{dev}");
    let dev_key = dev["apiKey"].as_str().unwrap().to_string();
    assert!(dev_key.starts_with("sk-") && dev_key.len() == 67);
    assert_eq!(dev["credentialId"], json!(format!("api-dev-{app_id}")));
    let (s, again) = v1(&a, "POST", &format!("applications/{app_id}/grants"), Some(json!({"gatewayId": "api", "environment": "dev"}))).await;
    assert_eq!(s, 409, "one grant per application and environment: {again}");
    let (_, staging) = v1(&a, "POST", &format!("applications/{app_id}/grants"), Some(json!({"gatewayId": "api", "environment": "staging", "quota": {"count": 3, "time_window": 60}}))).await;
    let staging_key = staging["apiKey"].as_str().unwrap().to_string();
    let mut keys = vec![dev_key.clone(), staging_key.clone()];

    // The key works on dev, in the apikey header and as a bearer token, on both nodes.
    let ok = |w: &Weir, key: String| {
        let (proxy, key) = (w.proxy, key);
        async move {
            for _ in 0..300 {
                let r = send(proxy, "GET", "/me", &[("host", "api.dev.localhost"), ("apikey", &key)], None).await;
                if r.status == 200 {
                    return r.json();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the key never worked");
        }
    };
    // The function may go live before the environment's auth does: wait for the auth.
    a.until("/me", &[("host", "api.dev.localhost")], |r| r.status == 401).await;
    let seen = ok(&a, dev_key.clone()).await;
    assert_eq!(seen["user"], json!({"name": format!("api-dev-{app_id}"), "appId": app_id, "grantId": dev["grantId"]}), "{seen}");
    ok(&b, dev_key.clone()).await;
    assert_eq!(hit(&b, "dev", "/me", &[("authorization", &bearer(&dev_key))]).await.0, 200);
    let (s, echoed) = hit(&a, "dev", "/upstream", &[("apikey", &dev_key)]).await;
    assert_eq!(s, 200);
    let echoed: Value = serde_json::from_str(&echoed).unwrap();
    assert_eq!(echoed["headers"]["x-consumer-username"], json!(format!("api-dev-{app_id}")));
    assert!(echoed["headers"].get("apikey").is_none(), "the upstream never gets the client's key: {echoed}");
    let (s, echoed) = hit(&a, "dev", "/upstream", &[("authorization", &bearer(&dev_key))]).await;
    assert_eq!(s, 200);
    assert!(serde_json::from_str::<Value>(&echoed).unwrap()["headers"].get("authorization").is_none(), "nor its bearer token: {echoed}");

    // No key, a wrong key, another environment's key: 401, and the refused keys alike.
    assert_eq!(hit(&a, "dev", "/me", &[]).await.0, 401);
    let wrong = hit(&a, "dev", "/me", &[("apikey", &format!("sk-{}", "0".repeat(64)))]).await;
    assert_eq!(wrong.0, 401);
    assert_eq!(hit(&a, "dev", "/me", &[("apikey", &staging_key)]).await, wrong, "staging's key is refused on dev exactly as an unknown one");
    assert_eq!(hit(&a, "dev", "/me", &[("authorization", &bearer("sk-nope"))]).await, wrong);

    // Staging's quota: 3 a minute, then 429.
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(hit(&a, "staging", "/me", &[("apikey", &staging_key)]).await.0);
    }
    assert_eq!(codes, [200, 200, 200, 429]);

    // Regenerated: the old key stops on the other node at once, the new one works.
    let grant_id = dev["grantId"].as_str().unwrap().to_string();
    let (s, rotated) = v1(&a, "POST", &format!("applications/{app_id}/grants/{grant_id}/regenerate"), None).await;
    assert_eq!(s, 200, "{rotated}");
    let started = Instant::now();
    while hit(&b, "dev", "/me", &[("apikey", &dev_key)]).await.0 != 401 {
        assert!(started.elapsed() < Duration::from_secs(5), "the old key still works");
    }
    let took = started.elapsed();
    eprintln!("old key refused on the second node {} ms after the regenerate answered", took.as_millis());
    assert_eq!(hit(&b, "dev", "/me", &[("apikey", &dev_key)]).await, wrong);
    let new_key = rotated["apiKey"].as_str().unwrap().to_string();
    ok(&b, new_key.clone()).await;
    keys.push(new_key.clone());

    // With an overlap both work for its length, then only the new one.
    let (_, overlapped) = v1(&a, "POST", &format!("applications/{app_id}/grants/{grant_id}/regenerate"), Some(json!({"overlapSeconds": 2}))).await;
    let newest = overlapped["apiKey"].as_str().unwrap().to_string();
    keys.push(newest.clone());
    ok(&b, newest.clone()).await;
    assert_eq!(hit(&b, "dev", "/me", &[("apikey", &new_key)]).await.0, 200, "the old key works during the overlap");
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(hit(&b, "dev", "/me", &[("apikey", &new_key)]).await, wrong, "and not after it");
    assert_eq!(hit(&b, "dev", "/me", &[("apikey", &newest)]).await.0, 200);

    // A grant that expires.
    let (_, app2) = v1(&a, "POST", "applications", Some(json!({"name": "Short"}))).await;
    let app2_id = app2["appId"].as_str().unwrap().to_string();
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let expires = expires.format(&time::format_description::well_known::Rfc3339).unwrap();
    let (s, short) = v1(&a, "POST", &format!("applications/{app2_id}/grants"), Some(json!({"gatewayId": "api", "environment": "dev", "expiresAt": expires}))).await;
    assert_eq!(s, 201, "{short}");
    let short_key = short["apiKey"].as_str().unwrap().to_string();
    keys.push(short_key.clone());
    ok(&a, short_key.clone()).await;
    // Expiry has a resolution of one second: the key works through the second it expires in.
    tokio::time::sleep(Duration::from_millis(4200)).await;
    assert_eq!(hit(&a, "dev", "/me", &[("apikey", &short_key)]).await, wrong, "an expired key is refused as an unknown one");

    // Lists: the application with its grants, the gateway's grants.
    let (_, shown) = v1(&a, "GET", &format!("applications/{app_id}"), None).await;
    assert_eq!(shown["grants"].as_array().unwrap().len(), 2, "{shown}");
    assert_eq!(v1(&a, "GET", "api-gateways/api/grants", None).await.1["total"], 3);
    assert_eq!(v1(&a, "GET", "api-gateways/api/environments/staging/grants", None).await.1["total"], 1);
    assert_eq!(v1(&a, "GET", &format!("applications/{app_id}/grants?environment=dev"), None).await.1["total"], 1);

    // No key is anywhere: the store, the logs, the dump, any answer but its creation's.
    let mut everything = String::new();
    for path in ["/apisix/admin/backup", "/apisix/admin/consumers", "/v1/applications", "/v1/api-gateways/api/grants", &format!("/v1/applications/{app_id}"), &format!("/v1/applications/{app_id}/grants")] {
        everything.push_str(&send(a.admin, "GET", path, &[("x-api-key", KEY)], None).await.text());
    }
    let dump = common::run_weir(&["dump".as_ref(), "--config".as_ref(), a.data_dir().parent().unwrap().join("weir.yaml").as_os_str(), "--admin".as_ref(), a.admin.to_string().as_ref()], Duration::from_secs(30));
    everything.push_str(&dump.1);
    everything.push_str(&a.log());
    everything.push_str(&b.log());
    for key in &keys {
        assert!(!everything.contains(key.as_str()) && !everything.contains(&key[3..]), "a key was found outside its creation's answer");
    }
    assert!(everything.contains(&app_id), "the check reads what it should");

    // Deleting the application: its keys stop, and nothing of it is left.
    let (s, _) = v1(&a, "DELETE", &format!("applications/{app_id}"), None).await;
    assert_eq!(s, 200);
    // Each node drops the consumers as its watch delivers the deletion.
    for (node, env, key) in [(&b, "dev", &newest), (&a, "staging", &staging_key)] {
        let started = Instant::now();
        while hit(node, env, "/me", &[("apikey", key)]).await.0 != 401 {
            assert!(started.elapsed() < Duration::from_secs(5), "a deleted application's key still works in {env}");
        }
    }
    let backup = send(a.admin, "GET", "/apisix/admin/backup", &[("x-api-key", KEY)], None).await.text();
    assert!(!backup.contains(&app_id), "nothing of the application is left in the store");
    assert_eq!(v1(&a, "GET", &format!("applications/{app_id}"), None).await.0, 404);
    drop((a, b, etcd));
}

#[tokio::test]
async fn only_owners_grant_and_tokens_see_only_their_applications() {
    let w = common::platform::on_loopback("");
    assert_eq!(v1(&w, "POST", "api-gateways", Some(json!({"name": "Mine", "gatewayId": "mine"}))).await.0, 201);
    assert_eq!(v1(&w, "POST", "api-gateways", Some(json!({"name": "Theirs", "gatewayId": "theirs"}))).await.0, 201);
    until_gateway(&w, "mine", |_, b| b["phase"] == "Started").await;
    let token = |role: &'static str, gid: &'static str| {
        let w = &w;
        async move { v1(w, "POST", "tokens", Some(json!({"name": role, "role": role, "gateways": [gid]}))).await.1["token"].as_str().unwrap().to_string() }
    };
    let owner = token("owner", "mine").await;
    let developer = token("developer", "mine").await;
    let as_ = |t: &str, m: &'static str, p: String, body: Option<Value>| {
        let (w, t) = (&w, t.to_string());
        async move { common::platform::v1_as(w, &t, m, &p, body).await }
    };
    assert_eq!(as_(&developer, "POST", "applications".into(), Some(json!({"name": "x"}))).await.0, 403);
    let (s, app) = as_(&owner, "POST", "applications".into(), Some(json!({"name": "Owned"}))).await;
    assert_eq!(s, 201, "{app}");
    let id = app["appId"].as_str().unwrap().to_string();
    assert_eq!(as_(&owner, "GET", "applications".into(), None).await.1["total"], 1);
    // An admin's application is not the owner's to see.
    let (_, admins) = v1(&w, "POST", "applications", Some(json!({"name": "Admin's"}))).await;
    assert_eq!(as_(&owner, "GET", format!("applications/{}", admins["appId"].as_str().unwrap()), None).await.0, 404);
    assert_eq!(as_(&owner, "GET", format!("applications/{}/usage", admins["appId"].as_str().unwrap()), None).await.0, 404, "nor its usage");
    // A grant on a gateway the token does not hold names no such gateway.
    let (s, b) = as_(&owner, "POST", format!("applications/{id}/grants"), Some(json!({"gatewayId": "theirs", "environment": "dev"}))).await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = as_(&owner, "POST", format!("applications/{id}/grants"), Some(json!({"gatewayId": "mine", "environment": "qa"}))).await;
    assert_eq!(s, 400, "{b}");
    let (s, g) = as_(&owner, "POST", format!("applications/{id}/grants"), Some(json!({"gatewayId": "mine", "environment": "prod", "expiresAt": "2001-01-01T00:00:00Z"}))).await;
    assert_eq!(s, 400, "{g}");
    let (s, g) = as_(&owner, "POST", format!("applications/{id}/grants"), Some(json!({"gatewayId": "mine", "environment": "prod"}))).await;
    assert_eq!(s, 201, "{g}");
    assert_eq!(as_(&owner, "PATCH", format!("applications/{id}"), Some(json!({"description": "the app"}))).await.1["description"], "the app");
    assert_eq!(as_(&owner, "DELETE", format!("applications/{id}/grants/{}", g["grantId"].as_str().unwrap()), None).await.0, 200);
    assert_eq!(as_(&owner, "GET", format!("applications/{id}/grants"), None).await.1["total"], 0);
}

/// The metrics page of `w`, once `check` holds for it.
async fn metrics_until(w: &Weir, check: impl Fn(&str) -> bool) -> String {
    let addr = w.metrics.expect("the exporter listens");
    let mut last = String::new();
    for _ in 0..250 {
        last = send(addr, "GET", "/apisix/prometheus/metrics", &[], None).await.text();
        if check(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the metrics page never showed what was expected:\n{last}");
}

#[tokio::test]
async fn usage_counts_each_grants_requests_errors_and_latency() {
    let w = common::platform::on_loopback("");
    assert_eq!(v1(&w, "POST", "api-gateways", Some(json!({"name": "Api", "gatewayId": "api"}))).await.0, 201);
    until_gateway(&w, "api", |_, b| b["phase"] == "Started").await;
    for (name, code) in [("me", "export default (ctx) => ({ user: ctx.user ?? null })"), ("fail", "export default () => { throw new Error('no') }")] {
        let (s, b) = v1(&w, "POST", "api-gateways/api/functions", Some(json!({"name": name, "source": {"code": code}}))).await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, staged) = v1(&w, "POST", "api-gateways/api/functions/dev%2Fme/deploy-to-stage", Some(json!({"targetStage": "staging"}))).await;
    assert_eq!(s, 200, "{staged}");
    // Every function live before any grant: no call below fails for a reason but its own.
    for (env, path) in [("dev", "/me"), ("dev", "/fail"), ("staging", "/me")] {
        let started = Instant::now();
        while !matches!(hit(&w, env, path, &[]).await.0, 200 | 500) {
            assert!(started.elapsed() < Duration::from_secs(5), "{env}{path} never went live");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for env in ["dev", "staging"] {
        let (s, body) = v1(&w, "PATCH", &format!("api-gateways/api/environments/{env}"), Some(json!({"authType": "key-auth"}))).await;
        assert_eq!(s, 200, "{body}");
    }
    let (_, app) = v1(&w, "POST", "applications", Some(json!({"name": "Counted"}))).await;
    let app_id = app["appId"].as_str().unwrap().to_string();
    let (_, dev) = v1(&w, "POST", &format!("applications/{app_id}/grants"), Some(json!({"gatewayId": "api", "environment": "dev"}))).await;
    let (_, staging) = v1(&w, "POST", &format!("applications/{app_id}/grants"), Some(json!({"gatewayId": "api", "environment": "staging", "quota": {"count": 2, "time_window": 60}}))).await;
    let (dev_key, staging_key) = (dev["apiKey"].as_str().unwrap().to_string(), staging["apiKey"].as_str().unwrap().to_string());
    // Until the key names its grant (a 200 without a user is the environment before its auth
    // applied, a 401 before the grant did: neither is the grant's).
    let started = Instant::now();
    loop {
        let (s, body) = hit(&w, "staging", "/me", &[("apikey", &staging_key)]).await;
        if s == 200 && serde_json::from_str::<Value>(&body).unwrap()["user"]["grantId"] == staging["grantId"] {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "the staging key never worked: {s} {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Dev: 4 answered, 2 failing in the function. Staging: 1 more answered (2 in all), then
    // the quota's 429. Unknown keys are nobody's usage.
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(hit(&w, "dev", "/me", &[("apikey", &dev_key)]).await.0);
    }
    for _ in 0..2 {
        codes.push(hit(&w, "dev", "/fail", &[("authorization", &bearer(&dev_key))]).await.0);
    }
    for _ in 0..2 {
        codes.push(hit(&w, "staging", "/me", &[("apikey", &staging_key)]).await.0);
    }
    codes.push(hit(&w, "dev", "/me", &[("apikey", "sk-unknown")]).await.0);
    assert_eq!(codes, [200, 200, 200, 200, 500, 500, 200, 429, 401]);

    let (dev_cid, staging_cid) = (format!("api-dev-{app_id}"), format!("api-staging-{app_id}"));
    let page = metrics_until(&w, |p| p.contains(&format!("weir_grant_requests_total{{consumer=\"{staging_cid}\"}} 3"))).await;
    assert!(page.contains(&format!("weir_grant_requests_total{{consumer=\"{dev_cid}\"}} 6")), "{page}");
    assert!(page.contains(&format!("weir_grant_errors_total{{consumer=\"{dev_cid}\"}} 2")), "{page}");
    assert!(page.contains(&format!("weir_grant_errors_total{{consumer=\"{staging_cid}\"}} 1")), "the quota's 429 is an error: {page}");
    assert!(page.contains(&format!("weir_grant_duration_seconds_count{{consumer=\"{dev_cid}\"}} 6")), "{page}");
    assert_eq!(page.matches("weir_grant_requests_total{").count(), 2, "a series per grant, none for unknown keys: {page}");

    let (s, usage) = v1(&w, "GET", &format!("applications/{app_id}/usage"), None).await;
    assert_eq!(s, 200, "{usage}");
    assert_eq!(usage["totals"], json!({"requests": 9, "errors": 3}), "{usage}");
    assert_eq!(usage["step"], 60);
    let per: Vec<(String, u64, u64)> = usage["grants"].as_array().unwrap().iter().map(|g| (g["environment"].as_str().unwrap().to_string(), g["requests"].as_u64().unwrap(), g["errors"].as_u64().unwrap())).collect();
    let mut per = per;
    per.sort();
    assert_eq!(per, [("dev".to_string(), 6, 2), ("staging".to_string(), 3, 1)]);
    let series = usage["series"].as_array().unwrap();
    assert!((60..=62).contains(&series.len()), "a point a minute over the last hour: {}", series.len());
    let counted: Vec<&Value> = series.iter().filter(|p| p["requests"].as_u64().unwrap() > 0).collect();
    assert_eq!(counted.iter().map(|p| p["requests"].as_u64().unwrap()).sum::<u64>(), 9, "{usage}");
    for p in &counted {
        let (p50, p99) = (p["p50Ms"].as_f64().unwrap(), p["p99Ms"].as_f64().unwrap());
        assert!(p50 > 0.0 && p50 <= p99 && p99 < 30_000.0, "{p}");
    }
    assert!(series.iter().filter(|p| p["requests"] == 0).all(|p| p["p50Ms"].is_null()), "no latency without requests");
    // The answer is what the OpenAPI document says it is.
    let (_, doc) = v1(&w, "GET", "openapi.json", None).await;
    assert!(doc["paths"]["/v1/applications/{appId}/usage"]["get"].is_object());
    let described = jsonschema::validator_for(&json!({"$ref": "#/components/schemas/Usage", "components": doc["components"]})).unwrap();
    let errors: Vec<String> = described.iter_errors(&usage).map(|e| format!("{}: {e}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert!(!described.is_valid(&json!({"totals": {"requests": "many"}})), "the check can fail");

    // A window that holds none of it, a coarser step, bad queries.
    let (_, before) = v1(&w, "GET", &format!("applications/{app_id}/usage?from=2020-01-01T00:00:00Z&to=2020-01-01T01:00:00Z&step=3600"), None).await;
    assert_eq!((before["totals"].clone(), before["series"].as_array().unwrap().len()), (json!({"requests": 0, "errors": 0}), 1), "{before}");
    let now = time::OffsetDateTime::now_utc();
    let fmt = |t: time::OffsetDateTime| t.format(&time::format_description::well_known::Rfc3339).unwrap().replace(':', "%3A").replace('+', "%2B");
    let (_, hour) = v1(&w, "GET", &format!("applications/{app_id}/usage?from={}&to={}&step=3600", fmt(now - time::Duration::minutes(30)), fmt(now + time::Duration::minutes(1))), None).await;
    assert_eq!(hour["totals"]["requests"], 9, "{hour}");
    assert_eq!(hour["series"][0]["requests"], 9, "one step holds it all: {hour}");
    for bad in ["step=59", "step=90", "from=yesterday", "from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z"] {
        let (s, b) = v1(&w, "GET", &format!("applications/{app_id}/usage?{bad}"), None).await;
        assert_eq!(s, 400, "{bad}: {b}");
    }
    assert_eq!(v1(&w, "GET", "applications/app-0000000000000000/usage", None).await.0, 404);

    // A revoked grant's series goes with its consumer.
    let (s, _) = v1(&w, "DELETE", &format!("applications/{app_id}/grants/{}", staging["grantId"].as_str().unwrap()), None).await;
    assert_eq!(s, 200);
    metrics_until(&w, |p| !p.contains(&staging_cid) && p.contains(&dev_cid)).await;
}
