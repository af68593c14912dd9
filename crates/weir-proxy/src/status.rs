//! The status API (`/status`, `/status/ready`), as APISIX's: is the process up, and has it the
//! config to serve (with the revision it serves, and how it stands with its store).

use std::convert::Infallible;
use std::sync::Arc;

use http::{Response, StatusCode, header};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use weir_http::body::RespBody;
use crate::watch::SyncStatus;

/// Serves the status API. `sync` is the data plane's view of its store (`None` on a control
/// plane, which is ready as soon as it listens).
pub async fn serve(listener: TcpListener, role: &'static str, sync: Option<Arc<SyncStatus>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let sync = sync.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let sync = sync.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/status" => (StatusCode::OK, json!({"status": "ok", "role": role})),
                        "/status/ready" => {
                            let report = sync.as_ref().map(|s| s.report());
                            let ready = sync.as_ref().is_none_or(|s| s.is_ready());
                            let mut body = json!({"status": if ready { "ok" } else { "error" }, "role": role});
                            if let Some(r) = report {
                                body["config"] = r;
                            }
                            if !ready {
                                body["error"] = json!("the configuration has not been loaded yet");
                            }
                            (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body)
                        }
                        _ => (StatusCode::NOT_FOUND, json!({"error_msg": "404 Not Found"})),
                    };
                    let mut resp = Response::new(RespBody::full(body.to_string()));
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
