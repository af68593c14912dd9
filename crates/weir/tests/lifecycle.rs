//! A function's life end to end against real `weir` processes: versions and their history,
//! promotion through the pipeline, rollback, comparison, deployment records, a node killed
//! during promotions, and cron triggers on a two-node cluster.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::platform::{fn_path, on_loopback, platform_weir, started_gateway, until_gateway, v1, v1_as};
use common::{Upstream, Weir};
use serde_json::{Value, json};

fn greet(marker: &str) -> Value {
    json!({"code": format!("export default () => {{\n  const v = '{marker}'\n  return v\n}}\n")})
}

/// Waits until `{env}` of gateway `gid` answers `/{path}` with `text`.
async fn serves(w: &Weir, gid: &str, env: &str, path: &str, text: &str) {
    let host = format!("{gid}.{env}.localhost");
    let r = w.until(&format!("/{path}"), &[("host", &host)], |r| r.text() == text).await;
    assert_eq!(r.text(), text);
}

async fn token(w: &Weir, role: &str, gid: &str) -> String {
    let (s, b) = v1(w, "POST", "tokens", Some(json!({"name": role, "role": role, "gateways": [gid]}))).await;
    assert_eq!(s, 201, "{b}");
    b["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn functions_go_through_the_pipeline_with_history_rollback_compare_and_records() {
    let w = on_loopback("  history_limit: 4\n");
    let (s, b) = v1(&w, "POST", "api-gateways", Some(json!({"name": "Life", "gatewayId": "life", "promotionPipeline": {"enabled": true}}))).await;
    assert_eq!(s, 201, "{b}");
    until_gateway(&w, "life", |_, b| b["phase"] == "Started").await;
    let dev = fn_path("life", "dev/greet");

    // Three versions in dev, each live at once.
    let (s, b) = v1(&w, "POST", "api-gateways/life/functions", Some(json!({"name": "greet", "source": greet("v1"), "semver": "0.1.0", "changelog": "first"}))).await;
    assert_eq!((s, &b["version"]), (201, &json!(1)), "{b}");
    for n in 2..=3 {
        let (s, b) = v1(&w, "PATCH", &dev, Some(json!({"source": greet(&format!("v{n}")), "changelog": format!("change {n}")}))).await;
        assert_eq!((s, &b["version"]), (200, &json!(n)), "{b}");
    }
    serves(&w, "life", "dev", "greet", "v3").await;

    // The pipeline: no skipping a stage, with the exact message; roles as the platform's.
    let (s, b) = v1(&w, "POST", &format!("{dev}/deploy-to-stage"), Some(json!({"targetStage": "prod"}))).await;
    assert_eq!((s, &b["error"]["message"]), (400, &json!("Cannot deploy from dev to prod. Must follow: dev → staging → prod")), "{b}");
    let developer = token(&w, "developer", "life").await;
    let qa = token(&w, "qa", "life").await;
    let (s, b) = v1_as(&w, &developer, "POST", &format!("{dev}/deploy-to-stage"), Some(json!({"targetStage": "staging"}))).await;
    assert_eq!(s, 403, "a developer does not deploy to staging: {b}");
    let (s, b) = v1_as(&w, &qa, "POST", &format!("{dev}/deploy-to-stage"), Some(json!({"targetStage": "staging", "semver": "1.0.0", "changelog": "to staging"}))).await;
    assert_eq!(s, 200, "qa deploys dev → staging: {b}");
    assert_eq!((&b["function"]["name"], &b["function"]["version"], &b["function"]["semver"]), (&json!("staging/greet"), &json!(1), &json!("1.0.0")));
    assert_eq!(b["function"]["promotedFrom"], json!({"environment": "dev", "version": 3}));
    assert_eq!((&b["deployment"]["from"], &b["deployment"]["to"], &b["deployment"]["sourceVersion"], &b["deployment"]["targetVersion"]), (&json!("dev"), &json!("staging"), &json!(3), &json!(1)));
    serves(&w, "life", "staging", "greet", "v3").await;
    let staging = fn_path("life", "staging/greet");
    let (s, _) = v1_as(&w, &qa, "POST", &format!("{staging}/deploy-to-stage"), Some(json!({"targetStage": "prod"}))).await;
    assert_eq!(s, 403, "qa does not deploy to prod");
    let (s, b) = v1(&w, "POST", &format!("{staging}/deploy-to-stage"), Some(json!({"targetStage": "prod", "changelog": "release 1"}))).await;
    assert_eq!((s, &b["function"]["version"]), (200, &json!(1)), "{b}");
    serves(&w, "life", "prod", "greet", "v3").await;

    // A fourth version goes all the way; then prod rolls back to its version 1.
    let (s, _) = v1(&w, "PATCH", &dev, Some(json!({"source": greet("v4")}))).await;
    assert_eq!(s, 200);
    assert_eq!(v1(&w, "POST", &format!("{dev}/deploy-to-stage"), Some(json!({"targetStage": "staging"}))).await.0, 200);
    let (s, b) = v1(&w, "POST", &format!("{staging}/deploy-to-stage"), Some(json!({"targetStage": "prod", "changelog": "release 2"}))).await;
    assert_eq!((s, &b["function"]["version"], &b["function"]["promotedFrom"]), (200, &json!(2), &json!({"environment": "staging", "version": 2})), "{b}");
    serves(&w, "life", "prod", "greet", "v4").await;
    let prod = fn_path("life", "prod/greet");
    let (s, b) = v1(&w, "POST", &format!("{prod}/rollback"), Some(json!({"version": 1}))).await;
    assert_eq!((s, &b["function"]["version"], &b["deployment"]["kind"]), (200, &json!(3), &json!("rollback")), "{b}");
    serves(&w, "life", "prod", "greet", "v3").await;
    // Dev and staging kept theirs.
    serves(&w, "life", "dev", "greet", "v4").await;
    serves(&w, "life", "staging", "greet", "v4").await;

    // Prod's history moved forward; nothing was rewritten.
    let (s, b) = v1(&w, "GET", &format!("{prod}/history"), None).await;
    assert_eq!(s, 200, "{b}");
    let kinds: Vec<(u64, &str)> = b["list"].as_array().unwrap().iter().map(|e| (e["version"].as_u64().unwrap(), e["kind"].as_str().unwrap())).collect();
    assert_eq!(kinds, [(3, "rollback"), (2, "promotion"), (1, "promotion")]);
    assert!(b["list"][0].get("source").is_none(), "the list leaves sources out: {b}");
    assert_eq!((&b["list"][0]["rolledBackTo"], &b["list"][2]["savedBy"]), (&json!(1), &json!("admin:admin")));
    let (s, one) = v1(&w, "GET", &format!("{prod}/history/2"), None).await;
    assert_eq!(s, 200);
    assert!(one["source"]["files"]["index.ts"].as_str().unwrap().contains("'v4'"), "{one}");
    assert_eq!((&one["changelog"], &one["savedAt"].as_str().map(|t| t.ends_with('Z'))), (&json!("release 2"), &Some(true)));

    // Dev's history is capped at 4: after 6 versions, 3 to 6 remain; 1 is gone for good.
    for n in 5..=6 {
        assert_eq!(v1(&w, "PATCH", &dev, Some(json!({"source": greet(&format!("v{n}"))}))).await.0, 200);
    }
    let (_, b) = v1(&w, "GET", &format!("{dev}/history"), None).await;
    let versions: Vec<u64> = b["list"].as_array().unwrap().iter().map(|e| e["version"].as_u64().unwrap()).collect();
    assert_eq!((versions, &b["total"]), (vec![6, 5, 4, 3], &json!(4)));
    assert_eq!(v1(&w, "GET", &format!("{dev}/history/1"), None).await.0, 404);
    assert_eq!(v1(&w, "POST", &format!("{dev}/rollback"), Some(json!({"version": 1}))).await.0, 404);
    assert_eq!(v1_as(&w, &qa, "POST", &format!("{dev}/rollback"), Some(json!({"version": 3}))).await.0, 403);

    // Compare dev (v6) with prod (v3 again): the one changed line, numbered on both sides.
    let (s, b) = v1(&w, "GET", "api-gateways/life/functions/compare?source=dev/greet&target=prod/greet", None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!((&b["source"]["version"], &b["target"]["version"], &b["identical"]), (&json!(6), &json!(3), &json!(false)));
    let file = &b["files"][0];
    assert_eq!((&file["file"], &file["status"]), (&json!("index.ts"), &json!("changed")));
    let lines: Vec<(String, Option<u64>, Option<u64>, String)> = file["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["op"].as_str().unwrap().to_string(), l["sourceLine"].as_u64(), l["targetLine"].as_u64(), l["text"].as_str().unwrap().to_string()))
        .collect();
    let want = [("equal", Some(1), Some(1), "export default () => {"), ("delete", Some(2), None, "  const v = 'v6'"), ("insert", None, Some(2), "  const v = 'v3'"), ("equal", Some(3), Some(3), "  return v"), ("equal", Some(4), Some(4), "}")];
    assert_eq!(lines, want.map(|(o, a, b, t)| (o.to_string(), a, b, t.to_string())));
    let (_, same) = v1(&w, "GET", "api-gateways/life/functions/compare?source=dev/greet&target=dev/greet", None).await;
    assert_eq!(same["identical"], true);
    assert_eq!(v1(&w, "GET", "api-gateways/life/functions/compare?source=dev/greet&target=prod/nope", None).await.0, 404);

    // Every promotion and rollback is recorded, newest first; ordinary saves are not.
    let (_, b) = v1(&w, "GET", "api-gateways/life/deployments", None).await;
    let records: Vec<(String, String, String, u64, u64)> = b["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["kind"].as_str().unwrap().into(), d["from"].as_str().unwrap().into(), d["to"].as_str().unwrap().into(), d["sourceVersion"].as_u64().unwrap(), d["targetVersion"].as_u64().unwrap()))
        .collect();
    let want = [("rollback", "prod", "prod", 1, 3), ("promotion", "staging", "prod", 2, 2), ("promotion", "dev", "staging", 4, 2), ("promotion", "staging", "prod", 1, 1), ("promotion", "dev", "staging", 3, 1)];
    assert_eq!(records, want.map(|(k, f, t, s, v)| (k.to_string(), f.to_string(), t.to_string(), s, v)));
    for d in b["list"].as_array().unwrap() {
        assert_eq!(d["function"], "greet");
        assert!(d["at"].as_str().unwrap().ends_with('Z') && d["by"].as_str().unwrap().contains(':') && d["deploymentId"].is_string(), "{d}");
    }
    assert_eq!(b["list"][1]["note"], "release 2");
    assert!(b["list"][4]["by"].as_str().unwrap().starts_with("token:"), "qa's promotion is qa's: {}", b["list"][4]);
    let (_, prod_only) = v1(&w, "GET", "api-gateways/life/deployments?environment=prod&function=greet", None).await;
    assert_eq!(prod_only["total"], 3);
    let (_, other) = v1(&w, "GET", "api-gateways/life/deployments?function=other", None).await;
    assert_eq!(other["total"], 0);

    // Deleting a function takes its history: a new one of that name starts at version 1.
    assert_eq!(v1(&w, "DELETE", &prod, None).await.0, 200);
    assert_eq!(v1(&w, "GET", &format!("{prod}/history"), None).await.0, 404);
    let (s, b) = v1(&w, "POST", &format!("{staging}/deploy-to-stage"), Some(json!({"targetStage": "prod"}))).await;
    assert_eq!((s, &b["function"]["version"]), (200, &json!(1)), "{b}");
    let (_, b) = v1(&w, "GET", &format!("{prod}/history"), None).await;
    assert_eq!(b["total"], 1);
}

#[tokio::test]
async fn without_the_pipeline_any_stage_may_be_deployed_to_and_promotions_of_one_function_serialize() {
    let w = on_loopback("");
    started_gateway(&w, "free").await;
    assert_eq!(v1(&w, "POST", "api-gateways/free/functions", Some(json!({"name": "f", "source": greet("one")}))).await.0, 201);
    let dev = fn_path("free", "dev/f");
    let (s, b) = v1(&w, "POST", &format!("{dev}/deploy-to-stage"), Some(json!({"targetStage": "prod"}))).await;
    assert_eq!(s, 200, "{b}");
    serves(&w, "free", "prod", "f", "one").await;
    assert_eq!(v1(&w, "POST", &format!("{dev}/deploy-to-stage"), Some(json!({"targetStage": "dev"}))).await.0, 400);

    // A thrown error shows its stack in dev only.
    let boom = json!({"name": "boom", "source": {"code": "export default () => { throw new Error('bad input here') }"}});
    assert_eq!(v1(&w, "POST", "api-gateways/free/functions", Some(boom)).await.0, 201);
    let r = w.until("/boom", &[("host", "free.dev.localhost")], |r| r.status == 500).await;
    assert!(r.json()["error_msg"].as_str().unwrap().contains("bad input here") && r.json()["stack"].is_string(), "{}", r.text());
    assert_eq!(v1(&w, "POST", &format!("{}/deploy-to-stage", fn_path("free", "dev/boom")), Some(json!({"targetStage": "prod"}))).await.0, 200);
    let r = w.until("/boom", &[("host", "free.prod.localhost")], |r| r.status == 500).await;
    assert!(r.json()["error_msg"].as_str().unwrap().contains("bad input here"), "{}", r.text());
    assert!(r.json().get("stack").is_none(), "no stack outside dev: {}", r.text());

    // Twenty promotions at once: each gets its own version, none is lost.
    let mut calls = Vec::new();
    for _ in 0..20 {
        let (admin, path) = (w.admin, format!("/v1/{dev}/deploy-to-stage"));
        calls.push(tokio::spawn(async move { common::send(admin, "POST", &path, &[("x-api-key", common::KEY)], Some(r#"{"targetStage": "staging"}"#)).await }));
    }
    let mut versions = Vec::new();
    for c in calls {
        let r = c.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        versions.push(r.json()["function"]["version"].as_u64().unwrap());
    }
    versions.sort();
    assert_eq!(versions, (1..=20).collect::<Vec<u64>>());
    let (_, b) = v1(&w, "GET", "api-gateways/free/deployments?environment=staging", None).await;
    assert_eq!(b["total"], 20);
}

#[tokio::test]
async fn a_gateway_keeps_only_its_latest_deployment_records() {
    let w = on_loopback("  deployments_limit: 3\n");
    started_gateway(&w, "kept").await;
    let targets = |b: &Value| b["list"].as_array().unwrap().iter().map(|d| (d["function"].as_str().unwrap().to_string(), d["targetVersion"].as_u64().unwrap())).collect::<Vec<_>>();
    assert_eq!(v1(&w, "POST", "api-gateways/kept/functions", Some(json!({"name": "f", "source": greet("one")}))).await.0, 201);
    let dev = fn_path("kept", "dev/f");
    for n in 1..=5u64 {
        let (s, b) = v1(&w, "POST", &format!("{dev}/deploy-to-stage"), Some(json!({"targetStage": "staging"}))).await;
        assert_eq!((s, &b["function"]["version"]), (200, &json!(n)), "{b}");
    }
    let (_, b) = v1(&w, "GET", "api-gateways/kept/deployments", None).await;
    assert_eq!(targets(&b), [("f", 5), ("f", 4), ("f", 3)].map(|(f, v)| (f.to_string(), v)), "the two oldest records are gone from the store: {b}");
    assert_eq!(b["total"], 3);

    // Promotions of different functions at once do not serialize on the records: the window
    // may be passed by those, and the next promotion brings it back.
    let names: Vec<String> = (0..6).map(|i| format!("g{i}")).collect();
    for n in &names {
        assert_eq!(v1(&w, "POST", "api-gateways/kept/functions", Some(json!({"name": n, "source": greet(n)}))).await.0, 201);
    }
    let mut calls = Vec::new();
    for n in &names {
        let (admin, path) = (w.admin, format!("/v1/{}/deploy-to-stage", fn_path("kept", &format!("dev/{n}"))));
        calls.push(tokio::spawn(async move { common::send(admin, "POST", &path, &[("x-api-key", common::KEY)], Some(r#"{"targetStage": "prod"}"#)).await }));
    }
    for c in calls {
        let r = c.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let (_, b) = v1(&w, "GET", "api-gateways/kept/deployments", None).await;
    let total = b["total"].as_u64().unwrap();
    assert!((3..=8).contains(&total), "{b}");
    assert_eq!(v1(&w, "POST", &format!("{dev}/deploy-to-stage"), Some(json!({"targetStage": "staging"}))).await.0, 200);
    let (_, b) = v1(&w, "GET", "api-gateways/kept/deployments", None).await;
    assert_eq!(b["total"], 3, "{b}");
    assert_eq!(targets(&b)[0], ("f".to_string(), 6));
}

#[tokio::test]
async fn a_gateway_holds_at_most_its_bound_of_triggers_however_many_are_made_at_once() {
    let w = on_loopback("");
    started_gateway(&w, "many").await;
    assert_eq!(v1(&w, "POST", "api-gateways/many/functions", Some(json!({"name": "f", "source": greet("f")}))).await.0, 201);
    // Once a year: none runs during the test.
    let trigger = json!({"function": "f", "environment": "dev", "cron": "0 0 1 1 *"});
    for _ in 0..95 {
        assert_eq!(v1(&w, "POST", "api-gateways/many/triggers", Some(trigger.clone())).await.0, 201);
    }
    let mut calls = Vec::new();
    for _ in 0..10 {
        let (admin, body) = (w.admin, trigger.to_string());
        calls.push(tokio::spawn(async move { common::send(admin, "POST", "/v1/api-gateways/many/triggers", &[("x-api-key", common::KEY)], Some(&body)).await }));
    }
    let mut statuses = Vec::new();
    for c in calls {
        let r = c.await.unwrap();
        if r.status == 429 {
            assert!(r.text().contains("100 triggers"), "{}", r.text());
        }
        statuses.push(r.status);
    }
    statuses.sort();
    assert_eq!(statuses, [201, 201, 201, 201, 201, 429, 429, 429, 429, 429]);
    let (_, b) = v1(&w, "GET", "api-gateways/many/triggers", None).await;
    assert_eq!(b["total"], 100, "{}", b["total"]);
}

#[tokio::test]
async fn a_node_killed_during_promotions_serves_acknowledged_versions_and_its_records_agree() {
    let w = platform_weir("  type: embedded\n  path: \"{data}\"\n", "  denied_networks: []\n", &[]);
    started_gateway(&w, "crash").await;
    let names = ["a", "b", "c", "d"];
    for n in names {
        assert_eq!(v1(&w, "POST", "api-gateways/crash/functions", Some(json!({"name": n, "source": greet(&format!("{n}-1"))}))).await.0, 201);
    }

    // Per function, a loop of: save the next version in dev, promote it to staging. Every
    // acknowledged promotion is remembered with the version it published.
    let acked: std::sync::Arc<std::sync::Mutex<BTreeMap<String, u64>>> = Default::default();
    let admin = w.admin;
    let mut loops = Vec::new();
    for n in names {
        let acked = acked.clone();
        loops.push(tokio::spawn(async move {
            for i in 2.. {
                let dev = fn_path("crash", &format!("dev/{n}"));
                let body = json!({"source": greet(&format!("{n}-{i}"))}).to_string();
                let r = common::send(admin, "PATCH", &format!("/v1/{dev}"), &[("x-api-key", common::KEY)], Some(&body)).await;
                if r.status != 200 {
                    return;
                }
                let body = json!({"targetStage": "staging"}).to_string();
                let r = common::send(admin, "POST", &format!("/v1/{dev}/deploy-to-stage"), &[("x-api-key", common::KEY)], Some(&body)).await;
                if r.status != 200 {
                    return;
                }
                acked.lock().unwrap().insert(n.to_string(), r.json()["function"]["version"].as_u64().unwrap());
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cfg = w.data_dir().parent().unwrap().join("weir.yaml");
    let dir = w.kill9();
    for l in loops {
        let _ = l.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), names.len(), "every loop promoted before the kill: {acked:?}");

    let w = Weir::spawn(dir, &cfg, &[]);
    for n in names {
        let staging = fn_path("crash", &format!("staging/{n}"));
        let (s, live) = v1(&w, "GET", &staging, None).await;
        assert_eq!(s, 200, "{live}");
        let version = live["version"].as_u64().unwrap();
        // At least what was acknowledged; one more if the last one was written but its answer lost.
        assert!(version == acked[n] || version == acked[n] + 1, "{n}: live {version}, acknowledged {}", acked[n]);
        let code = live["source"]["files"]["index.ts"].as_str().unwrap().to_string();
        let marker = code.split('\'').nth(1).unwrap().to_string();
        serves(&w, "crash", "staging", n, &marker).await;
        // The history's newest entry is what is live, and the newest deployment published it.
        let (_, h) = v1(&w, "GET", &format!("{staging}/history/{version}"), None).await;
        assert_eq!((&h["version"], &h["source"]["files"]["index.ts"]), (&json!(version), &json!(code)), "{n}");
        let (_, hist) = v1(&w, "GET", &format!("{staging}/history"), None).await;
        assert_eq!(hist["list"][0]["version"], json!(version), "{n}");
        let (_, d) = v1(&w, "GET", &format!("api-gateways/crash/deployments?environment=staging&function={n}"), None).await;
        assert_eq!((&d["list"][0]["targetVersion"], &d["total"]), (&json!(version), &json!(version)), "{n}: one record per version published");
        // The promoted source is the dev version it names.
        let from = d["list"][0]["sourceVersion"].as_u64().unwrap();
        let (s, dev_h) = v1(&w, "GET", &format!("{}/history/{from}", fn_path("crash", &format!("dev/{n}"))), None).await;
        assert_eq!((s, &dev_h["source"]["files"]["index.ts"]), (200, &json!(code)), "{n}");
    }
}

/// A plugin the operator denies after a function was saved with it is published by no later
/// version: a save that keeps it, a promotion of it and a rollback to it are refused, and
/// nothing changes; a save that drops it goes through.
#[tokio::test]
async fn a_plugin_denied_since_is_published_by_no_save_promotion_or_rollback() {
    let w = platform_weir("  type: embedded\n  path: \"{data}\"\n", "  denied_networks: []\n  denied_plugins: []\n", &[]);
    started_gateway(&w, "deny").await;
    let cors = json!({"cors": {"allow_origins": "https://app.example"}});
    for name in ["a", "b"] {
        let (s, b) = v1(&w, "POST", "api-gateways/deny/functions", Some(json!({"name": name, "source": greet(name), "plugins": cors}))).await;
        assert_eq!(s, 201, "{b}");
    }
    // `a` drops the plugin in its version 2; version 1 keeps it in the history.
    let a = fn_path("deny", "dev/a");
    let (s, b) = v1(&w, "PATCH", &a, Some(json!({"plugins": {}}))).await;
    assert_eq!((s, &b["version"]), (200, &json!(2)), "{b}");

    let cfg = w.data_dir().parent().unwrap().join("weir.yaml");
    let dir = w.kill9();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("denied_plugins: []", "denied_plugins: [cors]")).unwrap();
    let w = Weir::spawn(dir, &cfg, &[]);
    let b_dev = fn_path("deny", "dev/b");
    let refused = |s: u16, b: &Value| s == 400 && b["error"]["problems"].to_string().contains("cors");
    let (s, b) = v1(&w, "POST", &format!("{a}/rollback"), Some(json!({"version": 1}))).await;
    assert!(refused(s, &b), "a rollback to a version with the plugin: {s} {b}");
    let (s, b) = v1(&w, "POST", &format!("{b_dev}/deploy-to-stage"), Some(json!({"targetStage": "staging"}))).await;
    assert!(refused(s, &b), "a promotion of a version with the plugin: {s} {b}");
    let (s, b) = v1(&w, "PATCH", &b_dev, Some(json!({"source": greet("b2")}))).await;
    assert!(refused(s, &b), "a save that keeps the plugin: {s} {b}");
    // Nothing changed.
    assert_eq!(v1(&w, "GET", &a, None).await.1["version"], json!(2));
    assert_eq!(v1(&w, "GET", &b_dev, None).await.1["version"], json!(1));
    assert_eq!(v1(&w, "GET", &fn_path("deny", "staging/b"), None).await.0, 404);
    // Dropping it is a save like any other.
    let (s, b) = v1(&w, "PATCH", &b_dev, Some(json!({"source": greet("b2"), "plugins": {}}))).await;
    assert_eq!((s, &b["version"]), (200, &json!(2)), "{b}");
    let (s, b) = v1(&w, "POST", &format!("{b_dev}/deploy-to-stage"), Some(json!({"targetStage": "staging"}))).await;
    assert_eq!(s, 200, "{b}");
}

/// Small answers of the functions API: an environment filter names an environment, a name
/// taken is a 409 even at the quota, and of two deletes of one function one finds it gone.
#[tokio::test]
async fn the_functions_api_answers_filters_duplicates_and_racing_deletes_as_such() {
    let w = on_loopback("  functions:\n    max_per_gateway: 12\n");
    started_gateway(&w, "small").await;
    for n in 0..12 {
        let (s, b) = v1(&w, "POST", "api-gateways/small/functions", Some(json!({"name": format!("f{n}"), "source": greet("x")}))).await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, b) = v1(&w, "POST", "api-gateways/small/functions", Some(json!({"name": "f0", "source": greet("y")}))).await;
    assert_eq!(s, 409, "a name taken, at the quota: {b}");
    let (s, b) = v1(&w, "POST", "api-gateways/small/functions", Some(json!({"name": "f12", "source": greet("y")}))).await;
    assert_eq!(s, 429, "a new name past the quota: {b}");
    for bad in ["qa", "dev%2Ff0", "dev/f0"] {
        let (s, b) = v1(&w, "GET", &format!("api-gateways/small/functions?environment={bad}"), None).await;
        assert_eq!(s, 400, "{bad}: {b}");
    }
    let (s, b) = v1(&w, "GET", "api-gateways/small/functions?environment=dev", None).await;
    assert_eq!((s, &b["total"]), (200, &json!(12)), "{b}");
    for n in 0..12 {
        let path = format!("/v1/{}", fn_path("small", &format!("dev/f{n}")));
        let del = || common::send(w.admin, "DELETE", &path, &[("x-api-key", common::KEY)], None);
        let (one, two) = tokio::join!(del(), del());
        let mut got = [one.status, two.status];
        got.sort();
        assert_eq!(got, [200, 404], "f{n}: {} / {}", one.text(), two.text());
    }
}

/// A failed run keeps a bounded part of its error, and a trigger of an environment that
/// serves nothing (stopped, inactive) does not run.
#[tokio::test]
async fn a_trigger_keeps_little_of_an_error_and_waits_while_its_environment_is_stopped() {
    let w = on_loopback("");
    started_gateway(&w, "halt").await;
    let boom = "export default () => { throw new Error('x'.repeat(100000)) }";
    assert_eq!(v1(&w, "POST", "api-gateways/halt/functions", Some(json!({"name": "boom", "source": {"code": boom}}))).await.0, 201);
    let (s, t) = v1(&w, "POST", "api-gateways/halt/triggers", Some(json!({"function": "boom", "environment": "dev", "cron": "* * * * * *"}))).await;
    assert_eq!(s, 201, "{t}");
    let runs_path = format!("api-gateways/halt/triggers/{}/runs", t["triggerId"].as_str().unwrap());
    let runs = async || v1(&w, "GET", &runs_path, None).await.1["list"].as_array().unwrap().clone();
    let started = std::time::Instant::now();
    while runs().await.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(10), "no run");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run = runs().await[0].clone();
    let error = run["error"].as_str().unwrap();
    assert_eq!(run["outcome"], "error");
    assert!(error.chars().count() < 1100 && error.contains("bytes in all"), "{}", error.len());

    let (s, b) = v1(&w, "PATCH", "api-gateways/halt/environments/dev", Some(json!({"state": "inactive"}))).await;
    assert_eq!(s, 200, "{b}");
    // A run under way as the environment stopped may still finish.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = runs().await.len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(runs().await.len(), before, "runs while stopped");
}

/// A function on a two-node cluster that tells a loopback counter each time it runs.
#[tokio::test]
async fn a_cron_trigger_runs_once_per_tick_across_two_nodes_and_a_slow_run_never_overlaps_itself() {
    let etcd = common::Etcd::start().await;
    let store = format!("  type: etcd\n  etcd:\n    endpoints: [\"{}\"]\n    timeout: 2\n", etcd.endpoint());
    let platform = "  lease_timeout: 2\n  denied_networks: []\n  functions:\n    fetch_allow_networks: [\"127.0.0.3/32\"]\n";
    let a = platform_weir(&store, platform, &[]);
    let b = platform_weir(&store, platform, &[]);
    let counter = Upstream::start_at("counter", "127.0.0.3:0".parse().unwrap()).await;
    let (s, body) = v1(&a, "POST", "api-gateways", Some(json!({"name": "Cron", "gatewayId": "cron", "fetchAllowList": [counter.node()]}))).await;
    assert_eq!(s, 201, "{body}");
    until_gateway(&a, "cron", |_, b| b["phase"] == "Started").await;
    let tick = format!("export default async (ctx) => {{ console.log('tick', ctx.requestId); await fetch('http://{}/hit', {{ method: 'POST', body: JSON.stringify(ctx.body) }}); return 'ok' }}", counter.node());
    assert_eq!(v1(&a, "POST", "api-gateways/cron/functions", Some(json!({"name": "tick", "source": {"code": tick}}))).await.0, 201);
    let slow = "export default async () => { await new Promise((r) => setTimeout(r, 2500)); return 'slow' }";
    assert_eq!(v1(&a, "POST", "api-gateways/cron/functions", Some(json!({"name": "slow", "source": {"code": slow}}))).await.0, 201);

    // Bad input first: nothing is made.
    let (s, e) = v1(&a, "POST", "api-gateways/cron/triggers", Some(json!({"function": "tick", "environment": "dev", "cron": "* * * *"}))).await;
    assert_eq!(s, 400, "{e}");
    assert!(e.to_string().contains("4 fields"), "{e}");
    assert_eq!(v1(&a, "POST", "api-gateways/cron/triggers", Some(json!({"function": "nope", "environment": "dev", "cron": "* * * * * *"}))).await.0, 400);
    // A schedule that never comes (the 31st of February) is refused rather than searched for.
    let (s, e) = v1(&a, "POST", "api-gateways/cron/triggers", Some(json!({"function": "tick", "environment": "dev", "cron": "0 0 31 2 *"}))).await;
    assert_eq!(s, 400, "{e}");
    assert!(e.to_string().contains("never fires"), "{e}");
    let (s, e) = v1(&a, "POST", "api-gateways/cron/triggers", Some(json!({"function": "tick", "environment": "dev", "cron": "* * * * *", "body": {"x": "y".repeat(16 * 1024)}}))).await;
    assert_eq!(s, 400, "{e}");
    assert!(e.to_string().contains("more than the 16384 a trigger's body may hold"), "{e}");

    let (s, t) = v1(&a, "POST", "api-gateways/cron/triggers", Some(json!({"function": "tick", "environment": "dev", "cron": "* * * * * *", "body": {"from": "cron"}}))).await;
    assert_eq!(s, 201, "{t}");
    let fast = t["triggerId"].as_str().unwrap().to_string();
    let (s, t) = v1(&b, "POST", "api-gateways/cron/triggers", Some(json!({"function": "slow", "environment": "dev", "cron": "* * * * * *"}))).await;
    assert_eq!(s, 201, "{t}");
    let slow_id = t["triggerId"].as_str().unwrap().to_string();
    assert_eq!(v1(&b, "GET", "api-gateways/cron/triggers", None).await.1["total"], 2);
    // Those two tick 120 times a minute, all a gateway's triggers may: one more is refused,
    // however rarely it ticks, and nothing is made.
    let (s, e) = v1(&a, "POST", "api-gateways/cron/triggers", Some(json!({"function": "tick", "environment": "dev", "cron": "0 0 1 1 *"}))).await;
    assert_eq!(s, 429, "{e}");
    assert!(e.to_string().contains("ticks up to 1 times a minute and the gateway's others 120"), "{e}");
    assert_eq!(v1(&b, "GET", "api-gateways/cron/triggers", None).await.1["total"], 2);

    // 30 ticks and a little more.
    tokio::time::sleep(Duration::from_millis(32_500)).await;
    let (_, runs) = v1(&b, "GET", &format!("api-gateways/cron/triggers/{fast}/runs"), None).await;
    let hits = counter.hits.load(Ordering::SeqCst);
    let runs = runs["list"].as_array().unwrap().clone();
    let mut ticks: Vec<i128> = runs.iter().map(|r| ms(&r["tick"])).collect();
    ticks.sort();
    assert!(ticks.len() >= 30, "{} runs in 32.5 s: {runs:?}", ticks.len());
    assert!(ticks.windows(2).all(|w| w[1] - w[0] == 1000), "one run per tick, none missed, none twice: {ticks:?}");
    // Each run called the counter once; one more may be under way as the runs were read.
    assert!(hits == runs.len() || hits == runs.len() + 1, "{hits} calls for {} runs", runs.len());
    let nodes: BTreeSet<&str> = runs.iter().map(|r| r["node"].as_str().unwrap()).collect();
    for r in &runs {
        assert_eq!((&r["outcome"], &r["status"]), (&json!("ok"), &json!(200)), "{r}");
    }
    // The function's own lines are in its logs, on the nodes that ran it.
    let mut logged = 0;
    for w in [&a, &b] {
        let (_, l) = v1(w, "GET", &format!("{}/logs?limit=1000", fn_path("cron", "dev/tick")), None).await;
        logged += l["list"].as_array().unwrap().iter().filter(|l| l["message"].as_str().unwrap().starts_with(&format!("tick {fast}-"))).count();
    }
    assert!(logged >= runs.len(), "{logged} lines logged for {} runs on nodes {nodes:?}", runs.len());

    // The slow one: 2.5 s on a 1 s schedule, never two at once.
    let (_, slow_runs) = v1(&a, "GET", &format!("api-gateways/cron/triggers/{slow_id}/runs"), None).await;
    let mut spans: Vec<(i128, i128)> = slow_runs["list"].as_array().unwrap().iter().map(|r| (ms(&r["start"]), ms(&r["end"]))).collect();
    spans.sort();
    assert!((8..=13).contains(&spans.len()), "{} slow runs in 32.5 s: {slow_runs}", spans.len());
    assert!(spans.iter().all(|(s, e)| e - s >= 2400), "{spans:?}");
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "runs overlapped: {spans:?}");

    // Deleting a trigger stops it and takes its runs.
    assert_eq!(v1(&a, "DELETE", &format!("api-gateways/cron/triggers/{fast}"), None).await.0, 200);
    assert_eq!(v1(&a, "DELETE", &format!("api-gateways/cron/triggers/{slow_id}"), None).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = counter.hits.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(counter.hits.load(Ordering::SeqCst), after, "no run after the delete");
    assert_eq!(v1(&b, "GET", &format!("api-gateways/cron/triggers/{fast}/runs"), None).await.0, 404);
    drop((a, b, etcd));
}

/// Milliseconds since the epoch of an RFC 3339 time.
fn ms(t: &Value) -> i128 {
    let t = time::OffsetDateTime::parse(t.as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap();
    t.unix_timestamp_nanos() / 1_000_000
}
