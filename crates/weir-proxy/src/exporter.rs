//! The Prometheus exporter listener (APISIX's `plugin_attr.prometheus.export_addr`): one path,
//! the metrics page; everything else is a 404.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Response, StatusCode, header};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use weir_http::body::RespBody;
use weir_http::error_response;

pub async fn serve(listener: TcpListener, uri: String) {
    let uri: Arc<str> = uri.into();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let uri = uri.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let found = req.uri().path() == &*uri && matches!(*req.method(), Method::GET | Method::HEAD);
                async move {
                    if !found {
                        return Ok::<_, Infallible>(error_response(StatusCode::NOT_FOUND, r#"{"error_msg":"404 Not Found"}"#));
                    }
                    let mut resp = Response::new(RespBody::full(weir_plugins::prometheus::render()));
                    resp.headers_mut()
                        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
                    Ok(resp)
                }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}
