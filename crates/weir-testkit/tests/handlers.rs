//! Routes that end in handlers, lowered by a contributor from objects of its own: the route's
//! plugins run first, the handler reads a bounded body and sees the route and the consumer,
//! its answer may stream, and work that may block runs off the proxy's thread.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use weir_http::body::RespBody;
use weir_proxy::handler::{Answer, Call, Handler, Offload};
use weir_testkit::{Apps, Gateway};

fn json_response(status: StatusCode, body: Value) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::full(body.to_string()));
    *resp.status_mut() = status;
    resp
}

/// Answers with what it was given; reads at most 16 bytes of body.
struct Echo;

impl Handler for Echo {
    fn max_body(&self) -> usize {
        16
    }

    fn call(&self, call: Call<'_>) -> Answer {
        let seen = json!({
            "route": call.route_id,
            "consumer": call.consumer,
            "method": call.parts.method.as_str(),
            "path": call.parts.uri.path(),
            "body": String::from_utf8_lossy(&call.body),
        });
        Box::pin(async move { json_response(StatusCode::OK, seen) })
    }
}

fn get(host: &str, path: &str) -> http::request::Builder {
    Request::get(path).header("host", host)
}

#[tokio::test]
async fn a_handler_runs_after_the_routes_plugins_and_sees_the_route_the_consumer_and_a_bounded_body() {
    let mut gw = Gateway::with_contributors(vec![Arc::new(Apps { handlers: vec![("echo", Arc::new(Echo))] })]);
    gw.put("consumers/jack", json!({"username": "jack", "plugins": {"key-auth": {"key": "jack-key"}}}));
    gw.put("apps/shop/open", json!({"uri": "/open", "handler": "echo"}));
    gw.put("apps/shop/closed", json!({"uri": "/closed", "plugins": {"key-auth": {}}, "handler": "echo"}));

    let open = gw.send(Request::post("/open").header("host", "shop.example").body(Bytes::from("hello")).unwrap()).await;
    assert_eq!(open.status, StatusCode::OK, "{}", open.body);
    assert_eq!(open.json(), json!({"route": "/apisix/apps/shop/open", "consumer": null, "method": "POST", "path": "/open", "body": "hello"}));

    // The route's auth plugin answers before the handler is reached.
    let refused = gw.send(get("shop.example", "/closed").body(Bytes::new()).unwrap()).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let allowed = gw.send(get("shop.example", "/closed").header("apikey", "jack-key").body(Bytes::new()).unwrap()).await;
    assert_eq!((allowed.status, &allowed.json()["consumer"]), (StatusCode::OK, &json!("jack")));

    // A body past the handler's bound is refused and the handler is not called.
    let big = gw.send(Request::post("/open").header("host", "shop.example").body(Bytes::from("seventeen bytes!!")).unwrap()).await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);

    // Another host is not the app's: its partition's routes are not there.
    assert_eq!(gw.get("/open", &[("host", "other.example")]).await.status, StatusCode::NOT_FOUND);
}

/// Sends `data: one`, then waits to be told to go on, then sends `data: two` and ends.
struct Events {
    go_on: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

impl Handler for Events {
    fn call(&self, _call: Call<'_>) -> Answer {
        let go_on = self.go_on.lock().unwrap().take();
        Box::pin(async move {
            let frames = futures_util::stream::unfold((0, go_on), |(n, go_on)| async move {
                match n {
                    0 => Some((Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from("data: one\n\n"))), (1, go_on))),
                    1 => {
                        if let Some(rx) = go_on {
                            let _ = rx.await;
                        }
                        Some((Ok(http_body::Frame::data(Bytes::from("data: two\n\n"))), (2, None)))
                    }
                    _ => None,
                }
            });
            let mut resp = Response::new(RespBody::stream(http_body_util::StreamBody::new(frames)));
            resp.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            resp
        })
    }
}

#[tokio::test]
async fn a_handler_streams_its_answer_frame_by_frame() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let events = Arc::new(Events { go_on: Mutex::new(Some(rx)) });
    let mut gw = Gateway::with_contributors(vec![Arc::new(Apps { handlers: vec![("events", events)] })]);
    gw.put("apps/feed/sse", json!({"uri": "/events", "handler": "events"}));

    let resp = gw.respond(get("feed.example", "/events").body(Bytes::new()).unwrap()).await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The first event arrives while the handler is still waiting to send the second: nothing
    // between the handler and the client holds the stream back.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame()).await.expect("the first event arrives on its own");
    assert_eq!(first.unwrap().unwrap().into_data().unwrap(), "data: one\n\n");
    tx.send(()).unwrap();
    let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(second, "data: two\n\n");
    assert!(body.frame().await.is_none());
}

/// Blocks a thread for a while (as a JavaScript engine would), on the offload pool, and says
/// which thread it ran on.
struct Blocking {
    pool: Offload,
}

impl Handler for Blocking {
    fn call(&self, _call: Call<'_>) -> Answer {
        let pool = self.pool.clone();
        Box::pin(async move {
            let ran_on = pool
                .run(|| {
                    std::thread::sleep(Duration::from_millis(300));
                    std::thread::current().name().unwrap_or_default().to_string()
                })
                .await;
            match ran_on {
                Ok(name) => json_response(StatusCode::OK, json!({"thread": name})),
                Err(e) => json_response(StatusCode::SERVICE_UNAVAILABLE, json!({"error": e.to_string()})),
            }
        })
    }
}

/// The test runs on one thread, as a proxy worker does: while the blocking call waits for its
/// answer, a request that needs no blocking work is served and finishes first.
#[tokio::test(flavor = "current_thread")]
async fn blocking_work_runs_off_the_proxy_thread_which_keeps_serving() {
    let pool = Offload::new("weir-offload", 1, 8).unwrap();
    let mut gw = Gateway::with_contributors(vec![Arc::new(Apps { handlers: vec![("blocking", Arc::new(Blocking { pool })), ("echo", Arc::new(Echo))] })]);
    gw.put("apps/calc/slow", json!({"uri": "/slow", "handler": "blocking"}));
    gw.put("apps/calc/fast", json!({"uri": "/fast", "handler": "echo"}));

    let done = Mutex::new(Vec::new());
    let slow = async {
        let a = gw.get("/slow", &[("host", "calc.example")]).await;
        done.lock().unwrap().push("slow");
        a
    };
    let fast = async {
        // Starts once the slow call has been handed to the pool.
        tokio::task::yield_now().await;
        let a = gw.get("/fast", &[("host", "calc.example")]).await;
        done.lock().unwrap().push("fast");
        a
    };
    let (slow, fast) = tokio::join!(slow, fast);
    assert_eq!((slow.status, fast.status), (StatusCode::OK, StatusCode::OK), "{} {}", slow.body, fast.body);
    assert_eq!(*done.lock().unwrap(), ["fast", "slow"]);
    let thread = slow.json()["thread"].as_str().unwrap().to_string();
    assert_eq!(thread, "weir-offload-0");
    assert_ne!(Some(thread.as_str()), std::thread::current().name());
}

/// Never answers.
struct Stuck;

impl Handler for Stuck {
    fn timeout(&self) -> Duration {
        Duration::from_secs(5)
    }

    fn call(&self, _call: Call<'_>) -> Answer {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(start_paused = true)]
async fn a_handler_that_does_not_answer_in_time_is_answered_504() {
    let mut gw = Gateway::with_contributors(vec![Arc::new(Apps { handlers: vec![("stuck", Arc::new(Stuck))] })]);
    gw.put("apps/slow/x", json!({"uri": "/x", "handler": "stuck"}));
    let started = tokio::time::Instant::now();
    let a = gw.get("/x", &[("host", "slow.example")]).await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT, "{}", a.body);
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}
