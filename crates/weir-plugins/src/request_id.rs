//! `request-id`: gives every request an id (a random UUID) in `header_name`, upstream and, with
//! `include_in_response`, back to the client. An id the client sent is kept.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::{Factory, JsonSchema, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("request-id", 12015, |c: Config, _| {
        Ok(Arc::new(RequestId {
            header: HeaderName::from_bytes(c.header_name.as_bytes()).map_err(|e| format!("header_name: {e}"))?,
            in_response: c.include_in_response,
        }))
    })
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// The header the id is in.
    #[serde(default = "x_request_id")]
    header_name: String,
    /// Send the id back to the client too.
    #[serde(default = "yes")]
    include_in_response: bool,
    /// How ids are made.
    #[serde(default)]
    #[allow(dead_code)]
    algorithm: Algorithm,
}

#[derive(Deserialize, Serialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
enum Algorithm {
    #[default]
    Uuid,
}

fn x_request_id() -> String {
    "X-Request-Id".into()
}

fn yes() -> bool {
    true
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
