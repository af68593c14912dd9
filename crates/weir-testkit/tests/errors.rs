//! The gateway's own errors: each kind becomes its answer in one place and is counted by kind.

use http::StatusCode;
use serde_json::json;
use weir_core::error::ErrorKind;
use weir_telemetry::COUNTERS;
use weir_testkit::Gateway;

#[tokio::test]
async fn failures_are_answered_and_counted_by_kind() {
    let mut gw = Gateway::new();
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    gw.put("routes/down", json!({"uri": "/down", "upstream": {"nodes": {"127.0.0.1:1": 1}, "retries": 0}}));
    gw.put("routes/broken", json!({"uri": "/broken", "service_id": "missing"}));

    let (not_found, upstream, unavailable) = (COUNTERS.errors(ErrorKind::NotFound), COUNTERS.errors(ErrorKind::Upstream), COUNTERS.errors(ErrorKind::Unavailable));
    let a = gw.get("/nowhere", &[]).await;
    assert_eq!((a.status, a.json()), (StatusCode::NOT_FOUND, json!({"error_msg": "404 Route Not Found"})));
    let a = gw.get("/down", &[]).await;
    assert_eq!((a.status, a.json()), (StatusCode::BAD_GATEWAY, json!({"error_msg": "502 Bad Gateway"})));
    let a = gw.get("/broken", &[]).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    // Other tests of this binary may count too: at least these answers were counted.
    assert!(COUNTERS.errors(ErrorKind::NotFound) > not_found);
    assert!(COUNTERS.errors(ErrorKind::Upstream) > upstream);
    assert!(COUNTERS.errors(ErrorKind::Unavailable) > unavailable);
}

#[tokio::test]
async fn a_body_past_a_handlers_bound_is_a_client_quota_answered_413() {
    use std::sync::Arc;
    let mut gw = Gateway::with_contributors(vec![Arc::new(weir_testkit::Apps { handlers: vec![("ok", Arc::new(weir_testkit::Ok200))] })]);
    gw.put("apps/up/load", json!({"uri": "/load", "handler": "ok"}));
    let quota = COUNTERS.errors(ErrorKind::Quota);
    let body = bytes::Bytes::from(vec![b'x'; weir_proxy::handler::DEFAULT_MAX_BODY + 1]);
    let a = gw.send(http::Request::post("/load").header("host", "up.example").body(body).unwrap()).await;
    assert_eq!((a.status, a.json()), (StatusCode::PAYLOAD_TOO_LARGE, json!({"error_msg": "413 Request Entity Too Large"})));
    assert!(COUNTERS.errors(ErrorKind::Quota) > quota);
}
