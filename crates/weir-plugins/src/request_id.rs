//! `request-id`: gives every request an id (a random UUID) in `header_name`, upstream and, with
//! `include_in_response`, back to the client. An id the client sent is kept.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use serde_json::{Value, json};

use crate::{LegacyFactory, Factory, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    LegacyFactory {
        name: "request-id",
        priority: 12015,
        schema: json!({"type": "object", "properties": {
            "header_name": {"type": "string", "default": "X-Request-Id"},
            "include_in_response": {"type": "boolean", "default": true},
            "algorithm": {"type": "string", "enum": ["uuid"], "default": "uuid"}
        }}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| {
            let name = conf.get("header_name").and_then(Value::as_str).unwrap_or("X-Request-Id");
            Ok(Arc::new(RequestId {
                header: HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header_name: {e}"))?,
                in_response: conf.get("include_in_response").and_then(Value::as_bool).unwrap_or(true),
            }))
        },
    }
    .into()
}

struct RequestId {
    header: HeaderName,
    in_response: bool,
}

/// A version 4 UUID.
fn uuid4() -> String {
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

impl Plugin for RequestId {
    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let id = match ctx.parts.headers.get(&self.header) {
            Some(v) => v.clone(),
            None => {
                let v = HeaderValue::from_str(&uuid4()).expect("a UUID is a valid header value");
                ctx.parts.headers.insert(self.header.clone(), v.clone());
                v
            }
        };
        if self.in_response {
            ctx.response_headers.push((self.header.clone(), id));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn uuids_are_version_4() {
        let u = super::uuid4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
        assert_ne!(u, super::uuid4());
    }
}
