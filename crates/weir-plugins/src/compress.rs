//! `gzip` and `brotli`: compress responses whose type and length qualify, for clients that
//! accept the encoding, as the body streams.

use std::io::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use serde_json::{Value, json};

use crate::{LegacyFactory, BodyTransform, Factory, Phases, Plugin, Reply, RequestCtx, ResponseCtx};

fn schema(level: Value) -> Value {
    json!({"type": "object", "properties": {
        "types": {"anyOf": [
            {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            {"enum": ["*"]}
        ], "default": ["text/html"]},
        "min_length": {"type": "integer", "minimum": 1, "default": 20},
        "comp_level": level,
        "http_version": {"enum": [1.1, 1.0], "default": 1.1},
        "buffers": {"type": "object"},
        "lgwin": {"type": "integer"},
        "lgblock": {"type": "integer"},
        "mode": {"type": "integer"},
        "vary": {"type": "boolean"}
    }})
}

pub(crate) fn gzip_factory() -> Factory {
    LegacyFactory {
        name: "gzip",
        priority: 995,
        schema: schema(json!({"type": "integer", "minimum": 1, "maximum": 9, "default": 1})),
        consumer_schema: None,
        credential: None,
        build: |conf, _| Ok(Arc::new(Compress::new(conf, Codec::Gzip, 1))),
    }
    .into()
}

pub(crate) fn brotli_factory() -> Factory {
    LegacyFactory {
        name: "brotli",
        priority: 996,
        schema: schema(json!({"type": "integer", "minimum": 0, "maximum": 11, "default": 6})),
        consumer_schema: None,
        credential: None,
        build: |conf, _| Ok(Arc::new(Compress::new(conf, Codec::Brotli, 6))),
    }
    .into()
}

#[derive(Clone, Copy, PartialEq)]
enum Codec {
    Gzip,
    Brotli,
}

impl Codec {
    fn token(self) -> &'static str {
        match self {
            Codec::Gzip => "gzip",
            Codec::Brotli => "br",
        }
    }

    fn note(self) -> &'static str {
        match self {
            Codec::Gzip => "gzip",
            Codec::Brotli => "brotli",
        }
    }
}

struct Compress {
    codec: Codec,
    /// `None`: every type.
    types: Option<Vec<String>>,
    min_length: u64,
    level: u32,
    vary: bool,
}

/// Set in `access` when the client accepts the encoding.
struct Accepted;

impl Compress {
    fn new(conf: &Value, codec: Codec, default_level: u32) -> Compress {
        let types = match conf.get("types") {
            Some(Value::String(s)) if s == "*" => None,
            Some(Value::Array(a)) => Some(a.iter().filter_map(Value::as_str).map(str::to_ascii_lowercase).collect()),
            _ => Some(vec!["text/html".to_string()]),
        };
        Compress {
            codec,
            types,
            min_length: conf.get("min_length").and_then(Value::as_u64).unwrap_or(20),
            level: conf.get("comp_level").and_then(Value::as_u64).map_or(default_level, |l| l as u32),
            vary: conf.get("vary").and_then(Value::as_bool).unwrap_or(false),
        }
    }

    fn transform(&self) -> BodyTransform {
        match self.codec {
            Codec::Gzip => {
                let mut enc = Some(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(self.level)));
                Box::new(move |chunk, last| {
                    let Some(e) = enc.as_mut() else { return Bytes::new() };
                    let _ = e.write_all(chunk);
                    if last {
                        return enc.take().and_then(|e| e.finish().ok()).map(Bytes::from).unwrap_or_default();
                    }
                    Bytes::from(std::mem::take(e.get_mut()))
                })
            }
            Codec::Brotli => {
                let mut enc = Some(brotli::CompressorWriter::new(Vec::new(), 4096, self.level, 22));
                Box::new(move |chunk, last| {
                    let Some(e) = enc.as_mut() else { return Bytes::new() };
                    let _ = e.write_all(chunk);
                    if last {
                        return enc.take().map(|e| Bytes::from(e.into_inner())).unwrap_or_default();
                    }
                    Bytes::from(std::mem::take(e.get_mut()))
                })
            }
        }
    }
}

/// Whether an `Accept-Encoding` value accepts `token` (with a non-zero quality).
fn accepts(value: &str, token: &str) -> bool {
    value.split(',').any(|part| {
        let mut it = part.split(';');
        let name = it.next().unwrap_or("").trim();
        let zero = it.any(|p| p.trim().strip_prefix("q=").is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q == 0.0)));
        (name.eq_ignore_ascii_case(token) || name == "*") && !zero
    })
}

impl Plugin for Compress {
    fn phases(&self) -> Phases {
        Phases { response: true, log: false, body: false }
    }

    fn access(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let ok = ctx.parts.headers.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).any(|v| accepts(v, self.codec.token()));
        if ok && ctx.parts.method != http::Method::HEAD {
            ctx.notes.put(self.codec.note(), Accepted);
        }
        Ok(())
    }

    fn header_filter(&self, ctx: &mut ResponseCtx<'_>) {
        if ctx.notes.get::<Accepted>(self.codec.note()).is_none() || ctx.transform.is_some() {
            return;
        }
        let h = &ctx.parts.headers;
        if h.contains_key(header::CONTENT_ENCODING) || matches!(ctx.parts.status.as_u16(), 100..=199 | 204 | 304) {
            return;
        }
        let length = ctx.body.as_ref().map(|b| b.len() as u64).or_else(|| h.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()));
        if length.is_some_and(|n| n < self.min_length) {
            return;
        }
        if let Some(types) = &self.types {
            let ct = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            if !types.contains(&mime) {
                return;
            }
        }
        let h = &mut ctx.parts.headers;
        h.remove(header::CONTENT_LENGTH);
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(self.codec.token()));
        if self.vary {
            h.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        }
        *ctx.transform = Some(self.transform());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_encoding_values() {
        assert!(accepts("gzip, deflate, br", "br"));
        assert!(accepts("deflate, gzip;q=0.5", "gzip"));
        assert!(!accepts("gzip;q=0", "gzip"));
        assert!(!accepts("deflate", "gzip"));
        assert!(accepts("*", "gzip"));
    }

    #[test]
    fn gzip_streams_round_trip() {
        use std::io::Read as _;
        let c = Compress::new(&json!({}), Codec::Gzip, 1);
        let mut t = c.transform();
        let mut out = Vec::new();
        for chunk in [&b"hello "[..], b"streaming ", b"world"] {
            out.extend_from_slice(&t(chunk, false));
        }
        out.extend_from_slice(&t(b"", true));
        let mut text = String::new();
        flate2::read::GzDecoder::new(&out[..]).read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello streaming world");
    }
}
