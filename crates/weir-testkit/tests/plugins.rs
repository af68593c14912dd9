//! Plugin behaviour as tables: each case is the objects put, the request sent and what must
//! come back, run in process (no listener, no upstream: these plugins answer by themselves).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use weir_testkit::{Apps, Gateway, Ok200};

struct Case {
    name: &'static str,
    /// Objects put in order, by path under the prefix.
    objects: Vec<(&'static str, Value)>,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    status: u16,
    /// A header the answer must carry, with its value.
    header: Option<(&'static str, &'static str)>,
    /// Text the body must contain.
    body: &'static str,
}

fn route(uri: &str, plugins: Value) -> Value {
    json!({"uri": uri, "plugins": plugins, "upstream": {"nodes": {"127.0.0.1:1": 1}}})
}

fn cases() -> Vec<Case> {
    let jack = ("consumers/jack", json!({"username": "jack", "plugins": {"key-auth": {"key": "jack-key"}}}));
    let mock = |body: &str| json!({"mocking": {"response_example": body}});
    vec![
        Case { name: "no route", objects: vec![], path: "/nothing", headers: vec![], status: 404, header: None, body: "404 Route Not Found" },
        Case {
            name: "mocking answers",
            objects: vec![("routes/1", route("/m", mock("hello")))],
            path: "/m",
            headers: vec![],
            status: 200,
            header: None,
            body: "hello",
        },
        Case {
            name: "key-auth without a key",
            objects: vec![jack.clone(), ("routes/1", route("/k", json!({"key-auth": {}, "mocking": {"response_example": "in"}})))],
            path: "/k",
            headers: vec![],
            status: 401,
            header: None,
            body: "Missing API key",
        },
        Case {
            name: "key-auth with a wrong key",
            objects: vec![jack.clone(), ("routes/1", route("/k", json!({"key-auth": {}, "mocking": {"response_example": "in"}})))],
            path: "/k",
            headers: vec![("apikey", "nope")],
            status: 401,
            header: None,
            body: "Invalid API key",
        },
        Case {
            name: "key-auth with the key",
            objects: vec![jack.clone(), ("routes/1", route("/k", json!({"key-auth": {}, "mocking": {"response_example": "in"}})))],
            path: "/k",
            headers: vec![("apikey", "jack-key")],
            status: 200,
            header: None,
            body: "in",
        },
        Case {
            name: "key-auth takes a bearer token when asked to",
            objects: vec![jack.clone(), ("routes/1", route("/k", json!({"key-auth": {"bearer": true}, "mocking": {"response_example": "in"}})))],
            path: "/k",
            headers: vec![("authorization", "Bearer jack-key")],
            status: 200,
            header: None,
            body: "in",
        },
        Case {
            name: "key-auth with a scope refuses plain keys",
            objects: vec![jack, ("routes/1", route("/k", json!({"key-auth": {"scope": "prod"}, "mocking": {"response_example": "in"}})))],
            path: "/k",
            headers: vec![("apikey", "jack-key")],
            status: 401,
            header: Some(("www-authenticate", "apikey realm=\"key\"")),
            body: "Invalid API key",
        },
        Case {
            name: "key-auth without a node hash key refuses hashed credentials",
            objects: vec![
                ("consumers/kim", json!({"username": "kim", "plugins": {"key-auth": {"key_hash": weir_plugins::key_auth_hash(&[7; 32], "kim-key")}}})),
                ("routes/1", route("/k", json!({"key-auth": {}, "mocking": {"response_example": "in"}}))),
            ],
            path: "/k",
            headers: vec![("apikey", "kim-key")],
            status: 401,
            header: None,
            body: "Invalid API key",
        },
        Case {
            name: "uri-blocker",
            objects: vec![("routes/1", route("/*", json!({"uri-blocker": {"block_rules": ["^/secret"]}})))],
            path: "/secret/x",
            headers: vec![],
            status: 403,
            header: None,
            body: "",
        },
        Case {
            name: "redirect to https",
            objects: vec![("routes/1", route("/r", json!({"redirect": {"http_to_https": true}})))],
            path: "http://example.test/r",
            headers: vec![],
            status: 301,
            header: Some(("location", "https://example.test/r")),
            body: "",
        },
        Case {
            name: "ip-restriction",
            objects: vec![("routes/1", route("/ip", json!({"ip-restriction": {"blacklist": ["127.0.0.0/8"]}})))],
            path: "/ip",
            headers: vec![],
            status: 403,
            header: None,
            body: "Your IP address is not allowed",
        },
        Case {
            name: "a global rule runs before the route",
            objects: vec![("global_rules/1", json!({"plugins": {"uri-blocker": {"block_rules": ["blocked"]}}})), ("routes/1", route("/*", mock("ok")))],
            path: "/blocked",
            headers: vec![],
            status: 403,
            header: None,
            body: "",
        },
        Case {
            name: "a service's plugins reach its routes",
            objects: vec![
                ("services/s", json!({"plugins": {"mocking": {"response_example": "from the service"}}})),
                ("routes/1", json!({"uri": "/svc", "service_id": "s", "upstream": {"nodes": {"127.0.0.1:1": 1}}})),
            ],
            path: "/svc",
            headers: vec![],
            status: 200,
            header: None,
            body: "from the service",
        },
        Case {
            name: "a route whose service is missing fails closed",
            objects: vec![("routes/1", json!({"uri": "/gone", "service_id": "missing", "plugins": {"key-auth": {}}}))],
            path: "/gone",
            headers: vec![],
            status: 503,
            header: None,
            body: "cannot be applied",
        },
    ]
}

#[tokio::test]
async fn plugin_cases() {
    for case in cases() {
        let mut gw = Gateway::new();
        for (path, value) in &case.objects {
            gw.put(path, value.clone());
        }
        let answer = gw.get(case.path, &case.headers).await;
        assert_eq!(answer.status.as_u16(), case.status, "{}: {answer:?}", case.name);
        if let Some((name, value)) = case.header {
            assert_eq!(answer.header(name), Some(value), "{}: {answer:?}", case.name);
        }
        assert!(answer.body.contains(case.body), "{}: {answer:?}", case.name);
    }
}

#[tokio::test]
async fn limit_count_refuses_past_its_count_and_a_change_applies_at_once() {
    // limit-count runs in the access phase, after every plugin that could answer instead, so
    // what it lets through goes to the node: a closed port on loopback, 502.
    let mut gw = Gateway::new();
    gw.put("routes/1", route("/l", json!({"limit-count": {"count": 2, "time_window": 60, "rejected_code": 429}})));
    let statuses = [gw.get("/l", &[]).await, gw.get("/l", &[]).await, gw.get("/l", &[]).await].map(|a| a.status.as_u16());
    assert_eq!(statuses, [502, 502, 429]);
    // Deleted, the route stops matching; put back with another count, it counts anew.
    gw.delete("routes/1");
    assert_eq!(gw.get("/l", &[]).await.status.as_u16(), 404);
    gw.put("routes/1", route("/l", json!({"limit-count": {"count": 1, "time_window": 60}})));
    assert_eq!([gw.get("/l", &[]).await.status.as_u16(), gw.get("/l", &[]).await.status.as_u16()], [502, 503]);
}

/// A gateway whose `apps/{app}/...` routes end in a handler answering 200, so what a limit lets
/// through is answered in process, and time can be paused.
fn answering() -> Gateway {
    Gateway::with_contributors(vec![Arc::new(Apps { handlers: vec![("ok", Arc::new(Ok200))] })])
}

async fn statuses(gw: &Gateway, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(gw.get("/l", &[("host", "a.example")]).await.status.as_u16());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn limit_count_windows_follow_the_clock() {
    let mut gw = answering();
    gw.put("apps/a/1", json!({"uri": "/l", "plugins": {"limit-count": {"count": 2, "time_window": 60, "rejected_code": 429}}, "handler": "ok"}));
    assert_eq!(statuses(&gw, 3).await, [200, 200, 429]);
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(statuses(&gw, 1).await, [429], "the window is not over");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(statuses(&gw, 3).await, [200, 200, 429], "a new window");
}

#[tokio::test(start_paused = true)]
async fn limit_req_refills_at_its_rate() {
    let mut gw = answering();
    gw.put("apps/a/1", json!({"uri": "/l", "plugins": {"limit-req": {"rate": 1, "burst": 0, "key": "remote_addr", "rejected_code": 429}}, "handler": "ok"}));
    assert_eq!(statuses(&gw, 2).await, [200, 429]);
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(statuses(&gw, 1).await, [429], "half a request has leaked away");
    tokio::time::advance(Duration::from_millis(600)).await;
    assert_eq!(statuses(&gw, 2).await, [200, 429]);
}
