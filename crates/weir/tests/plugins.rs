//! Plugins end to end: configured through the Admin API as for APISIX, exercised with real
//! requests through a real `weir` to a real upstream.

mod common;

use common::{Upstream, Weir};
use serde_json::{Value, json};

async fn put(w: &Weir, path: &str, body: Value) {
    let (s, b) = w.admin("PUT", path, Some(body)).await;
    assert!(s == 200 || s == 201, "{path}: {s} {b}");
}

#[tokio::test]
async fn key_auth_with_consumers_and_credentials() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    put(&w, "/consumers", json!({"username": "jack", "plugins": {"key-auth": {"key": "jack-key"}}})).await;
    put(&w, "/consumers", json!({"username": "rose"})).await;
    put(&w, "/consumers/rose/credentials/phone", json!({"plugins": {"key-auth": {"key": "rose-phone-key"}}})).await;
    put(&w, "/routes/r", json!({"uri": "/k", "plugins": {"key-auth": {}}, "upstream": {"nodes": {up.node(): 1}}})).await;
    put(&w, "/routes/hide", json!({"uri": "/hide", "plugins": {"key-auth": {"hide_credentials": true}}, "upstream": {"nodes": {up.node(): 1}}})).await;
    w.until("/hide", &[], |r| r.status == 401).await;

    let r = w.get("/k", &[]).await;
    assert_eq!((r.status, r.json()), (401, json!({"message": "Missing API key in request"})));
    assert_eq!(r.headers["www-authenticate"], "apikey realm=\"key\"");
    let r = w.get("/k", &[("apikey", "wrong")]).await;
    assert_eq!((r.status, r.json()), (401, json!({"message": "Invalid API key in request"})));

    let r = w.get("/k", &[("apikey", "jack-key"), ("x-credential-identifier", "forged")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["headers"]["x-consumer-username"], "jack");
    assert!(seen["headers"].get("x-credential-identifier").is_none(), "a client cannot claim a credential: {seen}");
    assert_eq!(seen["headers"]["apikey"], "jack-key", "kept without hide_credentials");

    let r = w.get("/k?apikey=rose-phone-key", &[]).await;
    assert_eq!(r.status, 200, "the key in the query string: {}", r.text());
    assert_eq!(r.json()["headers"]["x-consumer-username"], "rose");
    assert_eq!(r.json()["headers"]["x-credential-identifier"], "phone");

    let r = w.get("/hide?apikey=jack-key&x=1", &[]).await;
    assert_eq!((r.status, r.json()["uri"].clone()), (200, json!("/hide?x=1")), "hide_credentials strips the query key");
    let r = w.get("/hide", &[("apikey", "jack-key")]).await;
    assert!(r.json()["headers"].get("apikey").is_none(), "and the header");

    // Deleting the consumer revokes its key.
    assert_eq!(w.admin("DELETE", "/consumers/jack", None).await.0, 200);
    w.until("/k", &[("apikey", "jack-key")], |r| r.status == 401).await;

    // Bad configuration is refused at write time.
    let (s, b) = w.admin("PUT", "/consumers", Some(json!({"username": "x", "plugins": {"key-auth": {}}}))).await;
    assert_eq!(s, 400, "a consumer's key-auth needs its key: {b}");
    let (s, b) = w.admin("PUT", "/routes/bad", Some(json!({"uri": "/b", "plugins": {"key-auth": {"hide_credentials": "yes"}}, "upstream": {"nodes": {up.node(): 1}}}))).await;
    assert_eq!(s, 400, "{b}");
    assert!(b["error_msg"].as_str().unwrap().contains("key-auth"), "{b}");
}

#[tokio::test]
async fn limit_count_local_counts_groups_and_meta() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    let route = |uri: &str, plugins: Value| json!({"uri": uri, "plugins": plugins, "upstream": {"nodes": {up.node(): 1}}});
    put(&w, "/routes/l", route("/l", json!({"limit-count": {"count": 2, "time_window": 60}}))).await;
    put(&w, "/routes/msg", route("/msg", json!({"limit-count": {"count": 1, "time_window": 60, "rejected_code": 429,
        "rejected_msg": "slow down", "key_type": "var", "key": "http_x_user"}}))).await;
    let group = json!({"limit-count": {"count": 3, "time_window": 60, "group": "shared"}});
    put(&w, "/routes/g1", route("/g1", group.clone())).await;
    put(&w, "/routes/g2", route("/g2", group)).await;
    put(&w, "/routes/off", route("/off", json!({"limit-count": {"count": 1, "time_window": 60, "_meta": {"disable": true}}}))).await;
    put(&w, "/routes/filtered", route("/filtered", json!({"limit-count": {"count": 1, "time_window": 60,
        "_meta": {"filter": [["arg_limited", "==", "yes"]]}}}))).await;
    w.until("/filtered", &[], |r| r.status == 200).await;

    let r = w.get("/l", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!((&r.headers["x-ratelimit-limit"], &r.headers["x-ratelimit-remaining"]), (&"2".parse().unwrap(), &"1".parse().unwrap()));
    let reset: u64 = r.headers["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
    assert!((59..=60).contains(&reset), "{reset}");
    assert_eq!(w.get("/l", &[]).await.headers["x-ratelimit-remaining"], "0");
    let r = w.get("/l", &[]).await;
    assert_eq!(r.status, 503, "the third in the window is refused");
    assert_eq!(r.headers["x-ratelimit-remaining"], "0");

    // Keyed by a header: each user has their own count; rejected_code and rejected_msg apply.
    assert_eq!(w.get("/msg", &[("x-user", "a")]).await.status, 200);
    assert_eq!(w.get("/msg", &[("x-user", "b")]).await.status, 200);
    let r = w.get("/msg", &[("x-user", "a")]).await;
    assert_eq!((r.status, r.json()), (429, json!({"error_msg": "slow down"})));

    // One group, one count across its routes.
    let mut statuses = Vec::new();
    for p in ["/g1", "/g2", "/g1", "/g2"] {
        statuses.push(w.get(p, &[]).await.status);
    }
    assert_eq!(statuses.last(), Some(&503), "the fourth across the group is refused");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3, "{statuses:?}");

    // _meta.disable turns the plugin off; _meta.filter limits it to matching requests.
    for _ in 0..3 {
        assert_eq!(w.get("/off", &[]).await.status, 200);
        assert_eq!(w.get("/filtered", &[]).await.status, 200);
    }
    assert_eq!(w.get("/filtered?limited=yes", &[]).await.status, 200);
    assert_eq!(w.get("/filtered?limited=yes", &[]).await.status, 503);

    // An unrelated change keeps the counters.
    put(&w, "/routes/other", route("/other", json!({}))).await;
    w.until("/other", &[], |r| r.status == 200).await;
    assert_eq!(w.get("/l", &[]).await.status, 503, "still refused after a config change");
}

#[tokio::test]
async fn plugin_precedence_route_over_plugin_config_over_service() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    put(&w, "/services/s", json!({"plugins": {"limit-count": {"count": 1, "time_window": 60, "rejected_code": 401}},
        "upstream": {"nodes": {up.node(): 1}}})).await;
    put(&w, "/plugin_configs/pc", json!({"plugins": {"limit-count": {"count": 1, "time_window": 60, "rejected_code": 402}}})).await;
    put(&w, "/routes/svc", json!({"uri": "/svc", "service_id": "s"})).await;
    put(&w, "/routes/pc", json!({"uri": "/pc", "service_id": "s", "plugin_config_id": "pc"})).await;
    put(&w, "/routes/own", json!({"uri": "/own", "service_id": "s", "plugin_config_id": "pc",
        "plugins": {"limit-count": {"count": 1, "time_window": 60, "rejected_code": 403}}})).await;
    put(&w, "/global_rules/g", json!({"plugins": {"limit-count": {"count": 100, "time_window": 60, "key_type": "constant", "key": "all"}}})).await;
    w.until("/own", &[], |r| r.status == 200).await;
    for (path, code) in [("/svc", 401), ("/pc", 402), ("/own", 403)] {
        w.until(path, &[], |r| r.status != 200).await;
        assert_eq!(w.get(path, &[]).await.status, code, "{path}");
    }
    // The route's plugin ran after the global rule's, so its quota headers are the ones seen;
    // a route with no plugins of its own shows the global rule's.
    assert_eq!(w.get("/svc", &[]).await.headers["x-ratelimit-limit"], "1");
    put(&w, "/routes/plain", json!({"uri": "/plain", "upstream": {"nodes": {up.node(): 1}}})).await;
    let r = w.until("/plain", &[], |r| r.status == 200).await;
    assert_eq!(r.headers["x-ratelimit-limit"], "100", "global rules run on every route");
}

#[tokio::test]
async fn rewrite_restriction_cors_and_request_id() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    let route = |uri: &str, plugins: Value| json!({"uri": uri, "plugins": plugins, "upstream": {"nodes": {up.node(): 1}}});
    put(&w, "/routes/pr", route("/pr", json!({"proxy-rewrite": {"uri": "/rewritten", "host": "backend.test", "method": "POST",
        "headers": {"add": {"x-add": "1"}, "set": {"x-set": "$remote_addr"}, "remove": ["x-drop"]}}}))).await;
    put(&w, "/routes/re", route("/re/*", json!({"proxy-rewrite": {"regex_uri": ["^/re/(.*)", "/v2/$1"]}}))).await;
    put(&w, "/routes/deny", route("/deny", json!({"ip-restriction": {"blacklist": ["127.0.0.0/8"]}}))).await;
    put(&w, "/routes/allow", route("/allow", json!({"ip-restriction": {"whitelist": ["127.0.0.1", "10.0.0.0/8"]}}))).await;
    put(&w, "/routes/cors", route("/cors", json!({"cors": {"allow_origins": "http://a.test,http://b.test", "allow_methods": "GET,POST",
        "allow_headers": "**", "max_age": 100, "allow_credential": true, "expose_headers": "x-id"}}))).await;
    put(&w, "/routes/cors-re", route("/cors-re", json!({"cors": {"allow_origins_by_regex": ["^https://.*\\.example\\.com$"]}}))).await;
    put(&w, "/routes/rid", route("/rid", json!({"request-id": {}}))).await;
    w.until("/rid", &[], |r| r.status == 200).await;

    let r = w.get("/pr?q=1", &[("x-drop", "1")]).await;
    let seen = r.json();
    assert_eq!((r.status, &seen["uri"], &seen["method"]), (200, &json!("/rewritten?q=1"), &json!("POST")), "{seen}");
    assert_eq!(seen["headers"]["host"], "backend.test");
    assert_eq!(seen["headers"]["x-add"], "1");
    assert_eq!(seen["headers"]["x-set"], "127.0.0.1");
    assert!(seen["headers"].get("x-drop").is_none(), "{seen}");
    assert_eq!(w.get("/re/items/7?x=1", &[]).await.json()["uri"], "/v2/items/7?x=1");

    let r = w.get("/deny", &[]).await;
    assert_eq!((r.status, r.json()), (403, json!({"message": "Your IP address is not allowed"})));
    assert_eq!(w.get("/allow", &[]).await.status, 200);

    let r = w.get("/cors", &[("origin", "http://a.test")]).await;
    assert_eq!(r.status, 200);
    let h = |name: &str| r.headers.get(name).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(h("access-control-allow-origin").as_deref(), Some("http://a.test"));
    assert_eq!(h("access-control-allow-credentials").as_deref(), Some("true"));
    assert_eq!(h("access-control-allow-methods").as_deref(), Some("GET,POST"));
    assert_eq!(h("access-control-expose-headers").as_deref(), Some("x-id"));
    assert_eq!(h("access-control-max-age").as_deref(), Some("100"));
    assert_eq!(h("vary").as_deref(), Some("Origin"));
    let r = w.get("/cors", &[("origin", "http://c.test")]).await;
    assert!(r.headers.get("access-control-allow-origin").is_none(), "an origin not listed gets none");
    let hits = up.hits.load(std::sync::atomic::Ordering::SeqCst);
    let pre = common::send(w.proxy, "OPTIONS", "/cors", &[("origin", "http://b.test"), ("access-control-request-headers", "x-foo")], None).await;
    assert_eq!(pre.status, 200, "preflight answered by the gateway");
    assert_eq!(pre.headers["access-control-allow-origin"], "http://b.test");
    assert_eq!(pre.headers["access-control-allow-headers"], "x-foo", "** echoes the requested headers");
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), hits, "a preflight does not reach the upstream");
    let r = w.get("/cors-re", &[("origin", "https://app.example.com")]).await;
    assert_eq!(r.headers["access-control-allow-origin"], "https://app.example.com");
    assert!(w.get("/cors-re", &[("origin", "https://example.org")]).await.headers.get("access-control-allow-origin").is_none());

    let r = w.get("/rid", &[]).await;
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36);
    assert_eq!(r.json()["headers"]["x-request-id"], json!(id), "the upstream got the same id");
    assert_eq!(w.get("/rid", &[("x-request-id", "mine")]).await.headers["x-request-id"], "mine", "a client's id is kept");

    // What a schema cannot say is still checked at write time.
    let (s, b) = w.admin("PUT", "/routes/bad", Some(route("/bad", json!({"cors": {"allow_credential": true}})))).await;
    assert_eq!(s, 400, "{b}");
    assert!(b["error_msg"].as_str().unwrap().contains("allow_credential"), "{b}");
    let (s, b) = w.admin("PUT", "/routes/bad", Some(route("/bad", json!({"proxy-rewrite": {"regex_uri": ["(", "/x"]}})))).await;
    assert_eq!(s, 400, "{b}");
    assert!(b["error_msg"].as_str().unwrap().contains("invalid regex_uri"), "{b}");
}

/// Polls the metrics page until `check` holds for it.
async fn metrics_until(w: &Weir, check: impl Fn(&str) -> bool) -> String {
    let addr = w.metrics.expect("the exporter listens");
    let mut last = String::new();
    for _ in 0..100 {
        let r = common::send(addr, "GET", "/apisix/prometheus/metrics", &[], None).await;
        assert_eq!(r.status, 200);
        last = r.text();
        if check(&last) {
            return last;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("metrics never got there:\n{last}");
}

#[tokio::test]
async fn prometheus_metrics_with_apisix_names_parse_with_promtool() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    let node = up.node();
    put(&w, "/services/s1", json!({"upstream": {"nodes": {node.clone(): 1}}})).await;
    put(&w, "/routes/p", json!({"uri": "/p*", "host": "p.test", "service_id": "s1", "plugins": {"prometheus": {}}})).await;
    put(&w, "/routes/named", json!({"uri": "/named", "name": "the-named-route", "plugins": {"prometheus": {"prefer_name": true}, "key-auth": {}}, "upstream": {"nodes": {node.clone(): 1}}})).await;
    w.until("/p/1", &[("host", "p.test")], |r| r.status == 200).await;
    for _ in 0..2 {
        assert_eq!(w.get("/p/2", &[("host", "p.test")]).await.status, 200);
    }
    // A plugin's own reply is counted too, under the route's name with `prefer_name`.
    // (Once the route is live: until then the answer is a 404 no route counts.)
    let r = w.until("/named", &[], |r| r.status != 404).await;
    assert_eq!(r.status, 401);

    let ok = format!("apisix_http_status{{code=\"200\",route=\"p\",matched_uri=\"/p*\",matched_host=\"p.test\",service=\"s1\",consumer=\"\",node=\"{node}\"}} 3");
    let refused = "apisix_http_status{code=\"401\",route=\"the-named-route\",matched_uri=\"/named\",matched_host=\"\",service=\"\",consumer=\"\",node=\"\"} 1";
    let text = metrics_until(&w, |t| t.contains(&ok) && t.contains(refused)).await;
    let latency = format!("apisix_http_latency_count{{type=\"upstream\",route=\"p\",service=\"s1\",consumer=\"\",node=\"{node}\"}} 3");
    assert!(text.contains(&latency), "{text}");
    let inf = format!("apisix_http_latency_bucket{{type=\"request\",route=\"p\",service=\"s1\",consumer=\"\",node=\"{node}\",le=\"+Inf\"}} 3");
    assert!(text.contains(&inf), "{text}");
    let egress = format!("apisix_bandwidth{{type=\"egress\",route=\"p\",service=\"s1\",consumer=\"\",node=\"{node}\"}} ");
    let bytes: u64 = text.lines().find_map(|l| l.strip_prefix(&egress)).expect("egress counted").parse().unwrap();
    assert!(bytes > 3 * 100, "three responses with their heads: {bytes}");
    assert!(text.contains("apisix_nginx_http_current_connections{state=\"accepted\"}"), "{text}");
    let requests: u64 = text.lines().find_map(|l| l.strip_prefix("apisix_http_requests_total ")).unwrap().parse().unwrap();
    assert!(requests >= 4, "{requests}");

    // promtool parses the page. Its only complaints are lints about APISIX's own metric names
    // and types, which are kept as they are for dashboards written against APISIX.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus)");
    use std::io::Write as _;
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_ne!(out.status.code(), Some(1), "promtool could not parse the page: {said}\n{text}");
    let complaints: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
    let expected = [
        "apisix_http_status counter metrics should have \"_total\" suffix",
        "apisix_bandwidth counter metrics should have \"_total\" suffix",
        "apisix_http_requests_total non-counter metrics should not have \"_total\" suffix",
    ];
    for c in &complaints {
        assert!(expected.contains(&c.trim()), "unexpected promtool finding: {c}\n{text}");
    }

    let r = common::send(w.metrics.unwrap(), "GET", "/other", &[], None).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn basic_auth_and_consumer_restriction() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    put(&w, "/consumers", json!({"username": "ann", "plugins": {"basic-auth": {"username": "ann", "password": "ann-pass"}}})).await;
    put(&w, "/consumers", json!({"username": "bob"})).await;
    put(&w, "/consumers/bob/credentials/laptop", json!({"plugins": {"basic-auth": {"username": "bob-laptop", "password": "bob-pass"}}})).await;
    put(&w, "/routes/b", json!({"uri": "/b", "plugins": {"basic-auth": {"hide_credentials": true},
        "consumer-restriction": {"whitelist": ["ann", "bob"], "allowed_by_methods": [{"user": "bob", "methods": ["POST"]}]}},
        "upstream": {"nodes": {up.node(): 1}}})).await;
    put(&w, "/routes/deny", json!({"uri": "/deny", "plugins": {"basic-auth": {},
        "consumer-restriction": {"blacklist": ["ann"], "rejected_code": 418, "rejected_msg": "not you"}},
        "upstream": {"nodes": {up.node(): 1}}})).await;
    put(&w, "/routes/noauth", json!({"uri": "/noauth", "plugins": {"consumer-restriction": {"whitelist": ["ann"]}},
        "upstream": {"nodes": {up.node(): 1}}})).await;
    w.until("/noauth", &[], |r| r.status == 401).await;

    let basic = |user: &str, pass: &str| {
        use base64::Engine as _;
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
    };
    let r = w.get("/b", &[]).await;
    assert_eq!((r.status, r.json()), (401, json!({"message": "Missing authorization in request"})));
    assert_eq!(r.headers["www-authenticate"], "Basic realm='.'");
    let r = w.get("/b", &[("authorization", "Basic %%%")]).await;
    assert_eq!((r.status, r.json()), (401, json!({"message": "Invalid authorization in request"})));
    let r = w.get("/b", &[("authorization", &basic("ann", "wrong"))]).await;
    assert_eq!((r.status, r.json()), (401, json!({"message": "Invalid user authorization"})));
    let r = w.get("/b", &[("authorization", &basic("nobody", "x"))]).await;
    assert_eq!((r.status, r.json()), (401, json!({"message": "Invalid user authorization"})));

    let r = w.get("/b", &[("authorization", &basic("ann", "ann-pass"))]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["headers"]["x-consumer-username"], "ann");
    assert!(seen["headers"].get("authorization").is_none(), "hide_credentials: {seen}");
    // Whitespace in what the client sends is dropped, as APISIX does.
    let r = w.get("/b", &[("authorization", &basic("bob-laptop", " bob-pass "))]).await;
    assert_eq!((r.status, r.json()), (403, json!({"message": "The consumer_name is forbidden."})), "bob may only POST");
    let r = common::send(w.proxy, "POST", "/b", &[("authorization", &basic("bob-laptop", "bob-pass"))], Some("x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-credential-identifier"], "laptop");

    let r = w.get("/deny", &[("authorization", &basic("ann", "ann-pass"))]).await;
    assert_eq!((r.status, r.json()), (418, json!({"message": "not you"})));
    assert_eq!(w.get("/deny", &[("authorization", &basic("bob-laptop", "bob-pass"))]).await.status, 200);
    let r = w.get("/noauth", &[]).await;
    assert_eq!((r.status, r.json()), (401, json!({"message": "Missing authentication or identity verification."})));

    let (s, b) = w.admin("PUT", "/consumers", Some(json!({"username": "x", "plugins": {"basic-auth": {"username": "x"}}}))).await;
    assert_eq!(s, 400, "a password is required: {b}");
    let (s, b) = w.admin("PUT", "/routes/bad", Some(json!({"uri": "/bad", "plugins": {"consumer-restriction": {}}}))).await;
    assert_eq!(s, 400, "a list is required: {b}");
}

#[tokio::test]
async fn jwt_auth_verifies_tokens_minted_by_pyjwt() {
    let minted = common::jwt_tokens();
    let key = |name: &str| minted["keys"][name].as_str().unwrap().to_string();
    let token = |name: &str| minted["tokens"][name].as_str().unwrap().to_string();

    let w = Weir::start();
    let up = Upstream::start("backend").await;
    let creds = [
        ("hs256", json!({"secret": "hs256-secret"})),
        ("hs384", json!({"secret": "hs384-secret", "algorithm": "HS384"})),
        ("hs512", json!({"secret": "aHM1MTItc2VjcmV0LWJ5dGVz", "base64_secret": true, "algorithm": "HS512"})),
        ("rs256", json!({"public_key": key("rsa"), "algorithm": "RS256"})),
        ("rs384", json!({"public_key": key("rsa"), "algorithm": "RS384"})),
        ("rs512", json!({"public_key": key("rsa"), "algorithm": "RS512"})),
        ("es256", json!({"public_key": key("p256"), "algorithm": "ES256"})),
        ("es384", json!({"public_key": key("p384"), "algorithm": "ES384"})),
        ("eddsa", json!({"public_key": key("ed25519"), "algorithm": "EdDSA"})),
        ("graced", json!({"secret": "graced-secret", "lifetime_grace_period": 60})),
    ];
    put(&w, "/consumers", json!({"username": "jo"})).await;
    for (k, conf) in &creds {
        let mut conf = conf.clone();
        conf["key"] = json!(k);
        put(&w, &format!("/consumers/jo/credentials/{k}"), json!({"plugins": {"jwt-auth": conf}})).await;
    }
    put(&w, "/routes/j", json!({"uri": "/j", "plugins": {"jwt-auth": {}}, "upstream": {"nodes": {up.node(): 1}}})).await;
    put(&w, "/routes/hide", json!({"uri": "/hide", "plugins": {"jwt-auth": {"hide_credentials": true}}, "upstream": {"nodes": {up.node(): 1}}})).await;
    put(&w, "/routes/uid", json!({"uri": "/uid", "plugins": {"jwt-auth": {"key_claim_name": "uid", "header": "x-token"}}, "upstream": {"nodes": {up.node(): 1}}})).await;
    w.until("/uid", &[], |r| r.status == 401).await;

    for alg in ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"] {
        let r = w.get("/j", &[("authorization", &format!("Bearer {}", token(alg)))]).await;
        assert_eq!(r.status, 200, "{alg}: {}", r.text());
        assert_eq!(r.json()["headers"]["x-consumer-username"], "jo", "{alg}");
        assert_eq!(r.json()["headers"]["x-credential-identifier"], json!(alg.to_lowercase()), "{alg}");
    }
    // The three places a token may come from.
    let hs = token("HS256");
    assert_eq!(w.get("/j", &[("authorization", &hs)]).await.status, 200, "without Bearer");
    assert_eq!(w.get(&format!("/j?jwt={hs}"), &[]).await.status, 200, "?jwt=");
    assert_eq!(w.get("/j", &[("cookie", &format!("a=1; jwt={hs}"))]).await.status, 200, "cookie");
    assert_eq!(w.get("/uid", &[("x-token", &token("by_uid"))]).await.status, 200, "key_claim_name and header");
    assert_eq!(w.get("/j", &[("authorization", &token("in_grace"))]).await.status, 200, "within lifetime_grace_period");

    let refused = [
        ("expired", "failed to verify jwt"),
        ("not_yet", "failed to verify jwt"),
        ("wrong_secret", "failed to verify jwt"),
        ("wrong_alg", "failed to verify jwt"),
        ("no_key", "missing user key in JWT token"),
        ("unknown_key", "Invalid user key in JWT token"),
    ];
    for (name, message) in refused {
        let r = w.get("/j", &[("authorization", &token(name))]).await;
        assert_eq!((r.status, r.json()), (401, json!({ "message": message })), "{name}");
    }
    let r = w.get("/j", &[]).await;
    assert_eq!((r.status, r.json()), (401, json!({"message": "Missing JWT token in request"})));
    let r = w.get("/j", &[("authorization", "Bearer garbage")]).await;
    assert_eq!((r.status, r.json()), (401, json!({"message": "JWT token invalid"})));

    let r = w.get(&format!("/hide?jwt={hs}&x=1"), &[]).await;
    assert_eq!(r.json()["uri"], "/hide?x=1");
    let r = w.get("/hide", &[("cookie", &format!("a=1; jwt={hs}"))]).await;
    assert_eq!(r.json()["headers"]["cookie"], "a=1");

    // Key material that cannot verify anything is refused at write time.
    let (s, b) = w.admin("PUT", "/consumers/jo/credentials/bad", Some(json!({"plugins": {"jwt-auth": {"key": "bad", "algorithm": "RS256", "public_key": "not a key"}}}))).await;
    assert_eq!(s, 400, "{b}");
    assert!(b["error_msg"].as_str().unwrap().contains("invalid public_key"), "{b}");
    let (s, b) = w.admin("PUT", "/consumers/jo/credentials/bad", Some(json!({"plugins": {"jwt-auth": {"key": "bad"}}}))).await;
    assert_eq!(s, 400, "an HS256 credential needs its secret: {b}");
}

#[tokio::test]
async fn limit_count_in_redis_is_one_limit_for_two_gateways() {
    let mut redis = common::Redis::start().await;
    let (a, b) = (Weir::start(), Weir::start());
    let up = Upstream::start("backend").await;
    let limit = |extra: Value| {
        let mut conf = json!({"count": 5, "time_window": 60, "policy": "redis", "redis_host": "127.0.0.1",
            "redis_port": redis.port, "redis_timeout": 500, "key_type": "constant", "key": "everyone"});
        conf.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        conf
    };
    for w in [&a, &b] {
        put(w, "/routes/shared", json!({"uri": "/shared", "plugins": {"limit-count": limit(json!({}))}, "upstream": {"nodes": {up.node(): 1}}})).await;
        put(w, "/routes/soft", json!({"uri": "/soft", "plugins": {"limit-count": limit(json!({"allow_degradation": true, "key": "soft"}))},
            "upstream": {"nodes": {up.node(): 1}}})).await;
    }
    // Waiting for the routes spends some of each limit: count what was spent.
    let mut spent = 0;
    for w in [&a, &b] {
        w.until("/soft", &[], |r| r.status != 404).await;
        w.until("/shared", &[], |r| r.status != 404).await;
        spent += 1;
    }
    let mut statuses = Vec::new();
    for i in 0..6 {
        let w = if i % 2 == 0 { &a } else { &b };
        let r = w.get("/shared", &[]).await;
        if r.status == 200 {
            let left: i64 = r.headers["x-ratelimit-remaining"].to_str().unwrap().parse().unwrap();
            assert_eq!(left, 5 - spent - statuses.iter().filter(|s| **s == 200).count() as i64 - 1, "one count across both");
        }
        statuses.push(r.status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count() as i64, 5 - spent, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 503), "{statuses:?}");
    let r = b.get("/shared", &[]).await;
    assert_eq!((r.status, r.headers["x-ratelimit-remaining"].to_str().unwrap()), (503, "0"));
    let reset: u64 = r.headers["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&reset), "{reset}");

    // Redis gone: with allow_degradation requests pass, without they fail with a 500.
    redis.stop();
    for w in [&a, &b] {
        let r = w.get("/soft", &[]).await;
        assert_eq!(r.status, 200, "degraded: {}", r.text());
        assert!(r.headers.get("x-ratelimit-remaining").is_none());
        let r = w.get("/shared", &[]).await;
        assert_eq!((r.status, r.json()), (500, json!({"error_msg": "failed to limit count"})));
    }

    let (s, body) = a.admin("PUT", "/routes/bad", Some(json!({"uri": "/bad", "plugins": {"limit-count": {"count": 1, "time_window": 1, "policy": "redis"}}}))).await;
    assert_eq!(s, 400, "{body}");
    assert!(body["error_msg"].as_str().unwrap().contains("redis_host is required"), "{body}");
}

/// One row of a data-driven plugin test: a route's plugins, a request, and what must come back.
struct Case {
    name: &'static str,
    plugins: Value,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    status: u16,
    /// Response headers that must be present with these values.
    resp_headers: &'static [(&'static str, &'static str)],
    /// The response body: exact text, or (for an upstream's echo) a field that must match.
    body: Body,
}

enum Body {
    Any,
    Text(&'static str),
    Json(Value),
    /// A field of the upstream's echo of the request.
    Upstream(&'static str, Value),
}

async fn run_cases(cases: Vec<Case>) {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    for (i, c) in cases.iter().enumerate() {
        let uri = format!("/case{i}/*");
        put(&w, &format!("/routes/case{i}"), json!({"uri": uri, "plugins": c.plugins, "upstream": {"nodes": {up.node(): 1}}})).await;
    }
    let last = format!("/case{}/", cases.len() - 1);
    w.until(&last, &[], |r| r.status != 404 || r.text() != r#"{"error_msg":"404 Route Not Found"}"#).await;
    for (i, c) in cases.iter().enumerate() {
        let path = format!("/case{i}{}", c.path);
        let r = w.get(&path, c.headers).await;
        assert_eq!(r.status, c.status, "{}: {}", c.name, r.text());
        for (k, v) in c.resp_headers {
            let got = r.headers.get(*k).map(|h| h.to_str().unwrap());
            assert_eq!(got, Some(*v), "{}: header {k}", c.name);
        }
        match &c.body {
            Body::Any => {}
            Body::Text(t) => assert_eq!(r.text(), *t, "{}", c.name),
            Body::Json(v) => assert_eq!(&r.json(), v, "{}", c.name),
            Body::Upstream(field, v) => assert_eq!(&r.json()[*field], v, "{}: {}", c.name, r.text()),
        }
    }
}

#[tokio::test]
async fn traffic_security_and_transformation_plugins() {
    let c = |name, plugins, path, headers, status, resp_headers, body| Case { name, plugins, path, headers, status, resp_headers, body };
    run_cases(vec![
        c("fault-injection abort", json!({"fault-injection": {"abort": {"http_status": 418, "body": "teapot for $arg_who", "headers": {"x-fault": "yes"}}}}),
            "/x?who=ann", &[], 418, &[("x-fault", "yes")], Body::Text("teapot for ann")),
        c("fault-injection vars miss", json!({"fault-injection": {"abort": {"http_status": 418, "vars": [[["arg_name", "==", "jack"]]]}}}),
            "/x?name=jill", &[], 200, &[], Body::Any),
        c("fault-injection vars hit", json!({"fault-injection": {"abort": {"http_status": 418, "vars": [[["arg_name", "==", "jack"]]]}}}),
            "/x?name=jack", &[], 418, &[], Body::Any),
        c("fault-injection 0%", json!({"fault-injection": {"abort": {"http_status": 500, "percentage": 0}}}),
            "/x", &[], 200, &[], Body::Any),
        c("fault-injection delay then abort", json!({"fault-injection": {"delay": {"duration": 0.05}, "abort": {"http_status": 503}}}),
            "/x", &[], 503, &[], Body::Any),
        c("mocking example", json!({"mocking": {"response_status": 201, "response_example": "{\"a\":1}", "response_headers": {"x-mock": "1"}}}),
            "/m", &[], 201, &[("x-mock", "1"), ("content-type", "application/json;charset=utf8")], Body::Json(json!({"a": 1}))),
        c("mocking schema", json!({"mocking": {"content_type": "application/json", "with_mock_header": false,
            "response_schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 7, "maximum": 7}}}}}),
            "/m", &[], 200, &[], Body::Json(json!({"n": 7}))),
        c("redirect uri", json!({"redirect": {"uri": "/new/$arg_id", "ret_code": 301}}),
            "/old?id=9", &[], 301, &[("location", "/new/9")], Body::Any),
        c("redirect regex_uri + query", json!({"redirect": {"regex_uri": ["^/case\\d+/a/(.*)$", "/b/$1"], "append_query_string": true}}),
            "/a/x?q=1", &[], 302, &[("location", "/b/x?q=1")], Body::Any),
        c("redirect http_to_https", json!({"redirect": {"http_to_https": true}}),
            "/s?x=1", &[("host", "shop.test")], 301, &[], Body::Any),
        c("response-rewrite", json!({"response-rewrite": {"status_code": 202, "body": "rewritten",
            "headers": {"add": ["x-added: 1"], "set": {"x-upstream": "hidden"}, "remove": ["content-type"]}}}),
            "/r", &[], 202, &[("x-added", "1"), ("x-upstream", "hidden")], Body::Text("rewritten")),
        c("response-rewrite vars miss", json!({"response-rewrite": {"body": "only on 500", "vars": [["status", "==", 500]]}}),
            "/r", &[], 200, &[], Body::Upstream("server", json!("backend"))),
        c("response-rewrite vars hit", json!({"response-rewrite": {"body": "was 503", "vars": [["status", "==", 503]]},
            "proxy-rewrite": {"regex_uri": ["^/case\\d+(/.*)$", "$1"]}}),
            "/status/503", &[], 503, &[], Body::Text("was 503")),
        c("uri-blocker", json!({"uri-blocker": {"block_rules": ["root\\.exe", "^/case\\d+/admin"], "rejected_msg": "blocked"}}),
            "/x?f=ROOT.exe", &[], 200, &[], Body::Any),
        c("uri-blocker case-insensitive", json!({"uri-blocker": {"block_rules": ["root\\.exe"], "case_insensitive": true, "rejected_msg": "blocked"}}),
            "/x?f=ROOT.exe", &[], 403, &[], Body::Json(json!({"error_msg": "blocked"}))),
        c("ua-restriction deny", json!({"ua-restriction": {"denylist": ["^curl/"]}}),
            "/u", &[("user-agent", "curl/8.0")], 403, &[], Body::Json(json!({"message": "Not allowed"}))),
        c("ua-restriction allow", json!({"ua-restriction": {"allowlist": ["^Mozilla"], "message": "browsers only"}}),
            "/u", &[("user-agent", "curl/8.0")], 403, &[], Body::Json(json!({"message": "browsers only"}))),
        c("ua-restriction missing", json!({"ua-restriction": {"denylist": ["^curl/"], "bypass_missing": true}}),
            "/u", &[], 200, &[], Body::Any),
        c("referer whitelist", json!({"referer-restriction": {"whitelist": ["*.example.com"]}}),
            "/f", &[("referer", "https://www.example.com/page")], 200, &[], Body::Any),
        c("referer whitelist miss", json!({"referer-restriction": {"whitelist": ["*.example.com"]}}),
            "/f", &[("referer", "https://evil.test/")], 403, &[], Body::Json(json!({"message": "Your referer host is not allowed"}))),
        c("referer missing", json!({"referer-restriction": {"blacklist": ["evil.test"]}}),
            "/f", &[], 403, &[], Body::Any),
        c("real-ip", json!({"real-ip": {"source": "http_x_client", "trusted_addresses": ["127.0.0.0/8"]},
            "ip-restriction": {"whitelist": ["10.1.2.3"]}}),
            "/ip", &[("x-client", "10.1.2.3")], 200, &[], Body::Any),
        c("real-ip untrusted source", json!({"real-ip": {"source": "http_x_client", "trusted_addresses": ["10.0.0.0/8"]},
            "ip-restriction": {"whitelist": ["10.1.2.3"]}}),
            "/ip", &[("x-client", "10.1.2.3")], 403, &[], Body::Any),
        c("limit-conn under", json!({"limit-conn": {"conn": 1, "burst": 0, "default_conn_delay": 0.1, "key": "remote_addr"}}),
            "/c", &[], 200, &[], Body::Any),
    ])
    .await;
}

#[tokio::test]
async fn limit_req_and_limit_conn_count_what_is_in_flight() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    put(&w, "/routes/req", json!({"uri": "/req", "plugins": {"limit-req": {"rate": 1, "burst": 1, "key": "remote_addr", "rejected_code": 429}},
        "upstream": {"nodes": {up.node(): 1}}})).await;
    put(&w, "/routes/conn", json!({"uri": "/sleep/*", "plugins": {"limit-conn": {"conn": 1, "burst": 1, "default_conn_delay": 0.2,
        "key_type": "var", "key": "remote_addr", "rejected_code": 429, "rejected_msg": "busy"}}, "upstream": {"nodes": {up.node(): 1}}})).await;
    w.until("/req", &[], |r| r.status == 200).await;

    // limit-req: the first passed; of two more at once, one waits 1/rate and one is refused.
    let started = std::time::Instant::now();
    let (a, b) = tokio::join!(w.get("/req", &[]), w.get("/req", &[]));
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [200, 429], "one within the burst, one beyond it");
    assert!(started.elapsed() >= std::time::Duration::from_millis(800), "the one within the burst waited: {:?}", started.elapsed());

    // limit-conn: three at once, each held 400 ms upstream: one goes, one is delayed, one refused.
    let (a, b, c) = tokio::join!(w.get("/sleep/400", &[]), w.get("/sleep/400", &[]), w.get("/sleep/400", &[]));
    let mut statuses = [a.status, b.status, c.status];
    statuses.sort();
    assert_eq!(statuses, [200, 200, 429], "{} {} {}", a.text(), b.text(), c.text());
    let refused = [a, b, c].into_iter().find(|r| r.status == 429).unwrap();
    assert_eq!(refused.json(), json!({"error_msg": "busy"}));
    // Once they are done, the count is back to zero.
    assert_eq!(w.get("/sleep/1", &[]).await.status, 200);
    let (a, b) = tokio::join!(w.get("/sleep/100", &[]), w.get("/sleep/100", &[]));
    assert_eq!((a.status, b.status), (200, 200));
}

/// Every request a capturing server receives, in order: method, URI, body.
type Captured = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>;

/// A server that captures every request (a log server, a mirror target) and answers 200.
async fn log_server() -> (std::net::SocketAddr, Captured) {
    use http_body_util::BodyExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let (method, uri) = (req.method().to_string(), req.uri().to_string());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        seen.lock().unwrap().push((method, uri, String::from_utf8_lossy(&body).into_owned()));
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, got)
}

#[tokio::test]
async fn file_and_http_loggers_write_apisix_entries_in_the_background() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    let (log_addr, batches) = log_server().await;
    let file = w.dir.path().join("access.log");
    put(&w, "/consumers", json!({"username": "ann", "plugins": {"key-auth": {"key": "ann-key"}}})).await;
    put(&w, "/routes/logged", json!({"uri": "/logged", "plugins": {
        "key-auth": {},
        "file-logger": {"path": file.to_str().unwrap()},
        "http-logger": {"uri": format!("http://{log_addr}/logs"), "batch_max_size": 2, "inactive_timeout": 1}
    }, "upstream": {"nodes": {up.node(): 1}}})).await;
    w.until("/logged", &[("apikey", "ann-key")], |r| r.status == 200).await;
    assert_eq!(w.get("/logged", &[("apikey", "ann-key")]).await.status, 200);
    assert_eq!(w.get("/logged", &[]).await.status, 401);

    // Two entries fill a batch; the third goes once a second has passed without another.
    let mut sent = Vec::new();
    for _ in 0..100 {
        sent = batches.lock().unwrap().iter().map(|(_, _, body)| body.clone()).collect();
        if sent.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(sent.len(), 2, "{sent:?}");
    let first: Value = serde_json::from_str(&sent[0]).unwrap();
    assert_eq!(first.as_array().unwrap().len(), 2, "a full batch: {first}");
    let e = &first[0];
    assert_eq!((e["route_id"].as_str(), e["response"]["status"].as_u64()), (Some("logged"), Some(200)));
    assert_eq!(e["consumer"]["username"], "ann");
    assert_eq!(e["upstream"], json!(up.node()));
    assert_eq!(e["request"]["method"], "GET");
    assert!(e["latency"].as_f64().unwrap() >= e["upstream_latency"].as_f64().unwrap());
    let second: Value = serde_json::from_str(&sent[1]).unwrap();
    assert_eq!(second[0]["response"]["status"], 401, "refused requests are logged too");

    let mut lines: Vec<Value> = Vec::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(&file).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        if lines.len() >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(lines.iter().map(|l| l["response"]["status"].as_u64().unwrap()).collect::<Vec<_>>(), [200, 200, 401]);

    let (s, b) = w.admin("PUT", "/routes/bad", Some(json!({"uri": "/bad", "plugins": {"http-logger": {"uri": "ftp://x"}}}))).await;
    assert_eq!(s, 400, "{b}");
}

#[tokio::test]
async fn consumer_and_group_plugins_take_precedence_over_the_route() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    put(&w, "/consumer_groups/gold", json!({"plugins": {
        "proxy-rewrite": {"headers": {"set": {"x-group": "gold"}}},
        "limit-count": {"count": 50, "time_window": 60}
    }})).await;
    put(&w, "/consumers", json!({"username": "jack", "group_id": "gold", "plugins": {
        "key-auth": {"key": "jack-key"},
        "limit-count": {"count": 2, "time_window": 60, "rejected_code": 429}
    }})).await;
    put(&w, "/consumers", json!({"username": "rose", "plugins": {"key-auth": {"key": "rose-key"}}})).await;
    put(&w, "/routes/r", json!({"uri": "/r", "plugins": {"key-auth": {}, "limit-count": {"count": 100, "time_window": 60}},
        "upstream": {"nodes": {up.node(): 1}}})).await;
    w.until("/r", &[("apikey", "rose-key")], |r| r.status == 200).await;

    let r = w.get("/r", &[("apikey", "rose-key")]).await;
    assert_eq!(r.headers["x-ratelimit-limit"], "100", "a consumer without plugins gets the route's");
    assert!(r.json()["headers"].get("x-group").is_none());

    let r = w.get("/r", &[("apikey", "jack-key")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["x-ratelimit-limit"], "2", "the consumer's config wins over its group's and the route's");
    assert_eq!(r.json()["headers"]["x-group"], "gold", "the group's plugins run too");
    assert_eq!(w.get("/r", &[("apikey", "jack-key")]).await.status, 200);
    assert_eq!(w.get("/r", &[("apikey", "jack-key")]).await.status, 429);
    assert_eq!(w.get("/r", &[("apikey", "rose-key")]).await.status, 200, "rose's quota is the route's, apart from jack's");
}

#[tokio::test]
async fn traffic_split_by_vars_and_weights() {
    let w = Weir::start();
    let (own, canary, inline) = (Upstream::start("own").await, Upstream::start("canary").await, Upstream::start("inline").await);
    put(&w, "/upstreams/canary", json!({"nodes": {canary.node(): 1}})).await;
    put(&w, "/routes/split", json!({"uri": "/split", "upstream": {"nodes": {own.node(): 1}}, "plugins": {"traffic-split": {"rules": [
        {"match": [{"vars": [["http_x_canary", "==", "1"]]}], "weighted_upstreams": [{"upstream_id": "canary", "weight": 1}]},
        {"weighted_upstreams": [{"upstream": {"nodes": {inline.node(): 1}}, "weight": 1}, {"weight": 3}]}
    ]}}})).await;
    w.until("/split", &[], |r| r.status == 200).await;

    for _ in 0..4 {
        assert_eq!(w.get("/split", &[("x-canary", "1")]).await.json()["server"], "canary");
    }
    let mut seen = std::collections::HashMap::new();
    for _ in 0..8 {
        let r = w.get("/split", &[]).await;
        *seen.entry(r.json()["server"].as_str().unwrap().to_string()).or_insert(0) += 1;
    }
    // The warm-up request took one turn of the weighted rule: 9 turns, at 1:3.
    let inline_n = seen.get("inline").copied().unwrap_or(0);
    let own_n = seen.get("own").copied().unwrap_or(0);
    assert_eq!(inline_n + own_n, 8, "{seen:?}");
    assert!((1..=3).contains(&inline_n), "about a quarter to the inline upstream: {seen:?}");
}

#[tokio::test]
async fn api_breaker_opens_after_failures_and_closes_after_its_time() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    put(&w, "/routes/b", json!({"uri": "/status/*", "upstream": {"nodes": {up.node(): 1}}, "plugins": {"api-breaker": {
        "break_response_code": 502, "break_response_body": "broken", "break_response_headers": [{"key": "x-breaker", "value": "open"}],
        "unhealthy": {"http_statuses": [500], "failures": 2}, "healthy": {"successes": 1}
    }}})).await;
    w.until("/status/200", &[], |r| r.status == 200).await;
    assert_eq!(w.get("/status/500", &[]).await.status, 500);
    assert_eq!(w.get("/status/500", &[]).await.status, 500);
    let r = w.get("/status/200", &[]).await;
    assert_eq!((r.status, r.text().as_str(), r.headers.get("x-breaker").map(|v| v.to_str().unwrap())), (502, "broken", Some("open")));
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_eq!(w.get("/status/200", &[]).await.status, 200, "open for 2^1 seconds only");
}

#[tokio::test]
async fn request_validation_checks_headers_and_bodies() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    put(&w, "/routes/v", json!({"uri": "/v", "upstream": {"nodes": {up.node(): 1}}, "plugins": {"request-validation": {
        "header_schema": {"type": "object", "required": ["x-id"]},
        "body_schema": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 2}, "n": {"type": "string"}}}
    }}})).await;
    put(&w, "/routes/msg", json!({"uri": "/msg", "upstream": {"nodes": {up.node(): 1}}, "plugins": {"request-validation": {
        "body_schema": {"type": "object", "required": ["name"]}, "rejected_code": 422, "rejected_msg": "bad body"
    }}})).await;
    w.until("/msg", &[], |r| r.status == 422).await;
    let post = |path: &'static str, headers: &'static [(&'static str, &'static str)], body: &'static str| {
        common::send(w.proxy, "POST", path, headers, Some(body))
    };
    let r = post("/v", &[("x-id", "1"), ("content-type", "application/json")], r#"{"name":"ann"}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body"], r#"{"name":"ann"}"#, "the upstream gets the body that was checked");
    let r = post("/v", &[("content-type", "application/json")], r#"{"name":"ann"}"#).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("x-id"), "the failed header is named: {}", r.text());
    let r = post("/v", &[("x-id", "1")], r#"{"name":"a"}"#).await;
    assert_eq!(r.status, 400, "too short: {}", r.text());
    let r = post("/v", &[("x-id", "1")], "not json").await;
    assert_eq!(r.status, 400);
    let r = post("/v", &[("x-id", "1"), ("content-type", "application/x-www-form-urlencoded")], "name=bob&n=2").await;
    assert_eq!(r.status, 200, "a form is checked as an object: {}", r.text());
    let r = post("/msg", &[], "{}").await;
    assert_eq!((r.status, r.text().as_str()), (422, "bad body"));
}

#[tokio::test]
async fn csrf_double_submit() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    put(&w, "/routes/c", json!({"uri": "/c", "upstream": {"nodes": {up.node(): 1}}, "plugins": {"csrf": {"key": "s3cret", "name": "x-csrf"}}})).await;
    let r = w.until("/c", &[], |r| r.status == 200).await;
    let cookie = r.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with("x-csrf=") && cookie.contains("Max-Age=7200"), "{cookie}");
    let token = cookie.trim_start_matches("x-csrf=").split(';').next().unwrap().to_string();
    let post = |headers: Vec<(&'static str, String)>| {
        let headers: Vec<(&str, String)> = headers;
        let w = &w;
        async move {
            let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            common::send(w.proxy, "POST", "/c", &hs, Some("x")).await
        }
    };
    let r = post(vec![]).await;
    assert_eq!((r.status, r.json()), (401, json!({"error_msg": "no csrf token in headers"})));
    let r = post(vec![("x-csrf", token.clone())]).await;
    assert_eq!((r.status, r.json()), (401, json!({"error_msg": "no csrf cookie"})));
    let r = post(vec![("x-csrf", token.clone()), ("cookie", "x-csrf=other".into())]).await;
    assert_eq!((r.status, r.json()), (401, json!({"error_msg": "csrf token mismatch"})));
    let forged = "eyJyYW5kb20iOiJ4IiwiaXNzdWVkIjoxLCJleHBpcmVzIjo3MjAwLCJzaWduIjoiQUFBQSJ9";
    let r = post(vec![("x-csrf", forged.into()), ("cookie", format!("x-csrf={forged}"))]).await;
    assert_eq!((r.status, r.json()), (401, json!({"error_msg": "Failed to verify the csrf token signature"})));
    let r = post(vec![("x-csrf", token.clone()), ("cookie", format!("x-csrf={token}"))]).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn gzip_and_brotli_compress_for_clients_that_accept_them() {
    use std::io::Read as _;
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    let route = |uri: &str, plugins: Value| json!({"uri": uri, "plugins": plugins, "upstream": {"nodes": {up.node(): 1}}});
    put(&w, "/routes/gz", route("/gz", json!({"gzip": {"types": ["application/json"], "min_length": 10, "vary": true}}))).await;
    put(&w, "/routes/br", route("/br", json!({"brotli": {"types": "*"}}))).await;
    put(&w, "/routes/big", route("/big", json!({"gzip": {"types": "*", "min_length": 100000}}))).await;
    put(&w, "/routes/html", route("/html", json!({"gzip": {}}))).await;
    w.until("/html", &[], |r| r.status == 200).await;

    let r = w.get("/gz", &[("accept-encoding", "gzip, br")]).await;
    assert_eq!(r.headers["content-encoding"], "gzip");
    assert_eq!(r.headers["vary"], "Accept-Encoding");
    let mut text = String::new();
    flate2::read::GzDecoder::new(&r.body[..]).read_to_string(&mut text).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["server"], "backend");

    let r = w.get("/br", &[("accept-encoding", "br")]).await;
    assert_eq!(r.headers["content-encoding"], "br");
    let mut text = String::new();
    brotli::Decompressor::new(&r.body[..], 4096).read_to_string(&mut text).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["server"], "backend");

    let plain = |r: &common::Resp| r.headers.get("content-encoding").is_none() && r.json()["server"] == "backend";
    assert!(plain(&w.get("/gz", &[]).await), "a client that does not accept gzip");
    assert!(plain(&w.get("/gz", &[("accept-encoding", "gzip;q=0")]).await), "q=0 refuses it");
    assert!(plain(&w.get("/big", &[("accept-encoding", "gzip")]).await), "below min_length");
    assert!(plain(&w.get("/html", &[("accept-encoding", "gzip")]).await), "a type not listed");
}

#[tokio::test]
async fn proxy_mirror_sends_copies_with_their_bodies() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    let (mirror, seen) = log_server().await;
    put(&w, "/routes/m", json!({"uri": "/m/*", "upstream": {"nodes": {up.node(): 1}},
        "plugins": {"proxy-mirror": {"host": format!("http://{mirror}"), "path": "/copy", "path_concat_mode": "prefix"}}})).await;
    w.until("/m/warm", &[], |r| r.status == 200).await;
    let r = common::send(w.proxy, "POST", "/m/x?a=1", &[], Some("payload")).await;
    assert_eq!((r.status, r.json()["body"].as_str()), (200, Some("payload")), "the upstream still gets the body");
    let mut copies = Vec::new();
    for _ in 0..100 {
        copies = seen.lock().unwrap().clone();
        if copies.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(copies.contains(&("POST".into(), "/copy/m/x?a=1".into(), "payload".into())), "{copies:?}");
}

#[tokio::test]
async fn plugin_metadata_sets_the_log_format() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    let file = w.dir.path().join("formatted.log");
    put(&w, "/plugin_metadata/file-logger", json!({"log_format": {"host": "$host", "client": "$remote_addr", "route": "$route_id", "code": "$status", "tag": "weir"}})).await;
    put(&w, "/routes/f", json!({"uri": "/f", "plugins": {"file-logger": {"path": file.to_str().unwrap()}}, "upstream": {"nodes": {up.node(): 1}}})).await;
    w.until("/f", &[("host", "logs.test")], |r| r.status == 200).await;
    let mut line = String::new();
    for _ in 0..100 {
        line = std::fs::read_to_string(&file).unwrap_or_default().lines().next().unwrap_or("").to_string();
        if !line.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let entry: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry, json!({"host": "logs.test", "client": "127.0.0.1", "route": "f", "code": 200, "tag": "weir"}));
}

#[tokio::test]
async fn opentelemetry_continues_traces_and_exports_spans() {
    let (collector, exported) = log_server().await;
    let attr = format!("  opentelemetry:\n    resource: {{service.name: weir-test}}\n    collector: {{address: \"{collector}\"}}\n");
    let w = Weir::start_full(tempfile::tempdir().unwrap(), "", "", &attr);
    let up = Upstream::start("backend").await;
    put(&w, "/routes/t", json!({"uri": "/t", "name": "traced", "upstream": {"nodes": {up.node(): 1}}, "plugins": {"opentelemetry": {
        "sampler": {"name": "parent_base", "options": {"root": {"name": "always_on"}}}, "additional_attributes": ["arg_user"]
    }}})).await;
    put(&w, "/routes/off", json!({"uri": "/off", "upstream": {"nodes": {up.node(): 1}}, "plugins": {"opentelemetry": {"sampler": {"name": "always_off"}}}})).await;
    w.until("/off", &[], |r| r.status == 200).await;

    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = w.get("/t?user=ann", &[("traceparent", parent)]).await;
    let sent = r.json()["headers"]["traceparent"].as_str().unwrap().to_string();
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!((parts[1], parts[3]), ("4bf92f3577b34da6a3ce929d0e0e4736", "01"), "the trace goes on upstream: {sent}");
    assert_ne!(parts[2], "00f067aa0ba902b7", "with the gateway's own span");
    // A caller that did not sample is followed by parent_base.
    let r = w.get("/t", &[("traceparent", "00-11111111111111111111111111111111-2222222222222222-00")]).await;
    assert!(r.json()["headers"]["traceparent"].as_str().unwrap().ends_with("-00"));
    let r = w.get("/off", &[]).await;
    assert!(r.json()["headers"]["traceparent"].as_str().unwrap().ends_with("-00"), "always_off still propagates, unsampled");

    let mut spans = Vec::new();
    for _ in 0..150 {
        spans = exported
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, u, _)| m == "POST" && u == "/v1/traces")
            .flat_map(|(_, _, body)| {
                let doc: Value = serde_json::from_str(body).unwrap();
                assert_eq!(doc["resourceSpans"][0]["resource"]["attributes"][0], json!({"key": "service.name", "value": {"stringValue": "weir-test"}}));
                doc["resourceSpans"][0]["scopeSpans"][0]["spans"].as_array().unwrap().clone()
            })
            .collect::<Vec<Value>>();
        if !spans.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(spans.len(), 1, "only the sampled request is exported: {spans:?}");
    let s = &spans[0];
    assert_eq!((s["traceId"].as_str(), s["spanId"].as_str(), s["parentSpanId"].as_str()), (Some("4bf92f3577b34da6a3ce929d0e0e4736"), Some(parts[2]), Some("00f067aa0ba902b7")));
    let attrs = s["attributes"].as_array().unwrap();
    assert!(attrs.contains(&json!({"key": "http.status_code", "value": {"intValue": "200"}})), "{attrs:?}");
    assert!(attrs.contains(&json!({"key": "apisix.route_name", "value": {"stringValue": "traced"}})), "{attrs:?}");
    assert!(attrs.contains(&json!({"key": "arg_user", "value": {"stringValue": "ann"}})), "{attrs:?}");
}

/// Headers signing a request for hmac-auth, made by an independent Python signer.
fn hmac_headers(key: &str, secret: &str, alg: &str, method: &str, target: &str, age: i64, body: Option<&str>) -> Vec<(String, String)> {
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/hmac_sign.py")).args([key, secret, alg, method, target, &age.to_string()]);
    if let Some(b) = body {
        cmd.arg(b);
    }
    let out = cmd.output().expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut h: Vec<(String, String)> = v.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
    h.push(("x-custom".into(), "signed".into()));
    h
}

#[tokio::test]
async fn hmac_auth_checks_signatures_made_elsewhere() {
    let w = Weir::start();
    let up = Upstream::start("backend").await;
    put(&w, "/consumers", json!({"username": "ann"})).await;
    put(&w, "/consumers/ann/credentials/signer", json!({"plugins": {"hmac-auth": {"key_id": "ann-key", "secret_key": "ann-secret"}}})).await;
    put(&w, "/routes/h", json!({"uri": "/h", "upstream": {"nodes": {up.node(): 1}}, "plugins": {"hmac-auth": {
        "allowed_algorithms": ["hmac-sha256", "hmac-sha512"], "clock_skew": 60, "signed_headers": ["x-custom"], "hide_credentials": true}}})).await;
    put(&w, "/routes/body", json!({"uri": "/body", "upstream": {"nodes": {up.node(): 1}}, "plugins": {"hmac-auth": {"validate_request_body": true}}})).await;
    w.until("/body", &[], |r| r.status == 401).await;
    let send = |method: &'static str, path: &'static str, headers: Vec<(String, String)>, body: Option<&'static str>| {
        let w = &w;
        async move {
            let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            common::send(w.proxy, method, path, &hs, body).await
        }
    };
    let refused = json!({"message": "client request can't be validated"});

    let r = send("GET", "/h?x=1", hmac_headers("ann-key", "ann-secret", "hmac-sha256", "GET", "/h?x=1", 0, None), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-consumer-username"], "ann");
    assert_eq!(r.json()["headers"]["x-credential-identifier"], "signer");
    assert!(r.json()["headers"].get("authorization").is_none(), "hide_credentials");
    let r = send("GET", "/h", hmac_headers("ann-key", "ann-secret", "hmac-sha512", "GET", "/h", 0, None), None).await;
    assert_eq!(r.status, 200, "sha512: {}", r.text());

    let cases = [
        ("wrong secret", hmac_headers("ann-key", "nope", "hmac-sha256", "GET", "/h", 0, None)),
        ("unknown key", hmac_headers("bob-key", "ann-secret", "hmac-sha256", "GET", "/h", 0, None)),
        ("algorithm not allowed", hmac_headers("ann-key", "ann-secret", "hmac-sha1", "GET", "/h", 0, None)),
        ("too old", hmac_headers("ann-key", "ann-secret", "hmac-sha256", "GET", "/h", 600, None)),
        ("another target", hmac_headers("ann-key", "ann-secret", "hmac-sha256", "GET", "/other", 0, None)),
        ("no header", vec![]),
    ];
    for (name, headers) in cases {
        let r = send("GET", "/h", headers, None).await;
        assert_eq!((r.status, r.json()), (401, refused.clone()), "{name}");
    }

    let r = send("POST", "/body", hmac_headers("ann-key", "ann-secret", "hmac-sha256", "POST", "/body", 0, Some("{\"a\":1}")), Some("{\"a\":1}")).await;
    assert_eq!(r.status, 200, "a body matching its digest: {}", r.text());
    let r = send("POST", "/body", hmac_headers("ann-key", "ann-secret", "hmac-sha256", "POST", "/body", 0, Some("{\"a\":1}")), Some("{\"a\":2}")).await;
    assert_eq!((r.status, r.json()), (401, refused), "a changed body");
}
