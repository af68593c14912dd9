//! Large answers (a gateway's function list, a database export) held while their clients read
//! them. Each such answer is made in memory whole, and a client that reads slowly keeps it
//! there: without a bound, one tenant asking for its 64 MiB list on many connections at once
//! would hold the node's memory. So an answer of `LARGE` bytes or more is counted against its
//! gateway's share and the node's until the last of its bytes is sent or the connection ends,
//! and one that does not fit is refused with 503 and `Retry-After`, changing nothing (with 507,
//! and no `Retry-After`, when it could never fit). Smaller answers are never counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;

use crate::api::Reply;

/// Answers of this many bytes or more are counted.
pub const LARGE: usize = 1 << 20;

/// `platform.large_answers`: the bytes of large answers held at once.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnswerLimits {
    /// By one gateway's calls: twice the largest function list a gateway may have by default.
    pub per_gateway_bytes: usize,
    /// By every gateway's calls together.
    pub node_bytes: usize,
}

impl Default for AnswerLimits {
    fn default() -> Self {
        AnswerLimits { per_gateway_bytes: 128 << 20, node_bytes: 1 << 30 }
    }
}

/// The large answers in flight on this node, by gateway.
pub struct Answers {
    limits: AnswerLimits,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    node: usize,
    gateways: HashMap<String, usize>,
}

impl Answers {
    pub fn new(limits: AnswerLimits) -> Arc<Answers> {
        Arc::new(Answers { limits, held: Mutex::default() })
    }

    /// `body` as an answer's bytes, counted against `gid`'s share while they are held; `None`
    /// when they do not fit.
    pub fn hold(self: &Arc<Self>, gid: &str, body: Vec<u8>) -> Option<Bytes> {
        let len = body.len();
        if len < LARGE {
            return Some(Bytes::from(body));
        }
        {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            let own = held.gateways.get(gid).copied().unwrap_or(0);
            if own + len > self.limits.per_gateway_bytes || held.node + len > self.limits.node_bytes {
                return None;
            }
            held.node += len;
            *held.gateways.entry(gid.to_string()).or_default() += len;
        }
        Some(Bytes::from_owner(Counted { body, gid: gid.to_string(), answers: self.clone() }))
    }

    /// The bytes `gid`'s large answers hold now.
    #[cfg(test)]
    fn held_by(&self, gid: &str) -> usize {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).gateways.get(gid).copied().unwrap_or(0)
    }

    /// A JSON answer of `value` for gateway `gid`, or the refusal when it does not fit.
    pub fn json(self: &Arc<Self>, gid: &str, status: StatusCode, value: &serde_json::Value) -> Reply {
        let body = serde_json::to_vec(value).expect("JSON values serialize");
        self.answer(gid, status, "application/json", body)
    }

    /// An answer of `body` for gateway `gid`, or the refusal when it does not fit.
    pub fn answer(self: &Arc<Self>, gid: &str, status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Reply {
        let len = body.len();
        match self.hold(gid, body) {
            Some(bytes) => {
                let mut resp = http::Response::new(http_body_util::Full::new(bytes));
                *resp.status_mut() = status;
                resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
                resp
            }
            None if len > self.limits.per_gateway_bytes.min(self.limits.node_bytes) => {
                // It would never fit: no use trying again.
                let message = format!("this answer ({} MiB) is larger than platform.large_answers lets one gateway's answers hold at once", len.div_ceil(1 << 20));
                let mut resp = crate::api::json(StatusCode::INSUFFICIENT_STORAGE, &serde_json::json!({"error": {"kind": "too_large", "message": message, "problems": []}}));
                resp.headers_mut().remove(http::header::RETRY_AFTER);
                resp
            }
            None => {
                let mut resp = crate::api::failure(
                    weir_core::error::ErrorKind::Unavailable,
                    format!("this answer ({} MiB) does not fit beside the large answers this node is sending now (platform.large_answers); try again once they are read", len.div_ceil(1 << 20)),
                    Vec::new(),
                );
                resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                resp
            }
        }
    }
}

/// An answer's bytes and what they count against, given back when the last of them goes.
struct Counted {
    body: Vec<u8>,
    gid: String,
    answers: Arc<Answers>,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let len = self.body.len();
        let mut held = self.answers.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.node -= len;
        if let Some(own) = held.gateways.get_mut(&self.gid) {
            *own -= len;
            if *own == 0 {
                held.gateways.remove(&self.gid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_that_could_never_fit_is_no_reason_to_try_again() {
        let answers = Answers::new(AnswerLimits { per_gateway_bytes: 3 * LARGE, node_bytes: 5 * LARGE });
        let held = answers.hold("a", vec![0; 2 * LARGE]).unwrap();
        let busy = answers.answer("a", StatusCode::OK, "application/json", vec![b' '; 2 * LARGE]);
        assert_eq!((busy.status(), busy.headers().get(http::header::RETRY_AFTER).is_some()), (StatusCode::SERVICE_UNAVAILABLE, true));
        let never = answers.answer("b", StatusCode::OK, "application/json", vec![b' '; 4 * LARGE]);
        assert_eq!((never.status(), never.headers().get(http::header::RETRY_AFTER).is_some()), (StatusCode::INSUFFICIENT_STORAGE, false));
        drop(held);
    }

    #[test]
    fn large_answers_count_while_held_and_small_ones_never() {
        let answers = Answers::new(AnswerLimits { per_gateway_bytes: 3 * LARGE, node_bytes: 5 * LARGE });
        let small = answers.hold("a", vec![0; LARGE - 1]).unwrap();
        assert_eq!((answers.held_by("a"), small.len()), (0, LARGE - 1));
        let a1 = answers.hold("a", vec![1; 2 * LARGE]).unwrap();
        assert_eq!(answers.held_by("a"), 2 * LARGE);
        assert!(answers.hold("a", vec![1; 2 * LARGE]).is_none(), "past the gateway's share");
        let b1 = answers.hold("b", vec![2; 3 * LARGE]).unwrap();
        assert!(answers.hold("c", vec![3; LARGE]).is_none(), "past the node's");
        // A clone (as a sender keeps) holds the share until the last one goes.
        let sent = a1.slice(10..20);
        drop(a1);
        assert_eq!(answers.held_by("a"), 2 * LARGE);
        drop(sent);
        assert_eq!(answers.held_by("a"), 0);
        assert_eq!(answers.hold("c", vec![3; LARGE]).unwrap()[0], 3);
        drop(b1);
        assert_eq!(answers.held.lock().unwrap().node, 0);
    }
}
