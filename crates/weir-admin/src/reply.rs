//! Response shapes of the Admin API.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::{Value, json};
use weir_core::error::{ErrorKind, Kinded};

pub type Reply = Response<Full<Bytes>>;

pub fn json(status: StatusCode, body: &Value) -> Reply {
    let bytes = serde_json::to_vec(body).expect("JSON values serialize");
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert("x-api-version", HeaderValue::from_static("v3"));
    resp
}

pub fn empty(status: StatusCode) -> Reply {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

pub fn error(status: StatusCode, msg: impl Into<String>) -> Reply {
    json(status, &json!({ "error_msg": msg.into() }))
}

pub fn not_found() -> Reply {
    json(StatusCode::NOT_FOUND, &json!({"message": "Key not found"}))
}

pub fn too_large_message(len: usize) -> String {
    format!("invalid request body: request size {len} is greater than the maximum size {} allowed", crate::MAX_BODY)
}

/// The Admin API's answer to a failure: the one place a kind becomes a status, in APISIX's
/// `error_msg` envelope.
pub fn failure(kind: ErrorKind, msg: impl Into<String>) -> Reply {
    let status = StatusCode::from_u16(kind.api_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(status, msg)
}

/// A store that failed under a call: unavailable (503), or holding what cannot be read (500).
pub fn store_down(e: impl Kinded + std::fmt::Display) -> Reply {
    failure(e.kind(), e.to_string())
}
