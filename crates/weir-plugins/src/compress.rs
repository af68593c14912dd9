//! `gzip` and `brotli`: compress responses whose type and length qualify, for clients that
//! accept the encoding, as the body streams.

use std::io::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{BodyTransform, Factory, JsonSchema, Phases, Plugin, Reply, RequestCtx, ResponseCtx};

pub(crate) fn gzip_factory() -> Factory {
    Factory::new("gzip", 995, |c: GzipConfig, _| Ok(Arc::new(Compress::new(c.common, Codec::Gzip, c.comp_level))))
}

pub(crate) fn brotli_factory() -> Factory {
    Factory::new("brotli", 996, |c: BrotliConfig, _| Ok(Arc::new(Compress::new(c.common, Codec::Brotli, c.comp_level))))
}

#[derive(Deserialize, JsonSchema)]
struct GzipConfig {
    #[serde(flatten)]
    common: Common,
    /// The gzip compression level.
    #[serde(default = "level_1")]
    #[schemars(range(min = 1, max = 9))]
    comp_level: u32,
}

#[derive(Deserialize, JsonSchema)]
struct BrotliConfig {
    #[serde(flatten)]
    common: Common,
    /// The brotli compression quality.
    #[serde(default = "level_6")]
    #[schemars(range(min = 0, max = 11))]
    comp_level: u32,
}

// What gzip and brotli share. The fields only APISIX's nginx reads are accepted and ignored.
#[derive(Deserialize, JsonSchema)]
struct Common {
    /// The response content types compressed, or `*` for all.
    #[serde(default = "text_html")]
    types: Types,
    /// Responses shorter than this many bytes are sent as they are.
    #[serde(default = "bytes_20")]
    #[schemars(range(min = 1))]
    min_length: u64,
    #[serde(default = "http_1_1")]
    #[schemars(extend("enum" = [1.1, 1.0]))]
    #[allow(dead_code)]
    http_version: f64,
    #[allow(dead_code)]
    buffers: Option<Map<String, Value>>,
    #[allow(dead_code)]
    lgwin: Option<i64>,
    #[allow(dead_code)]
    lgblock: Option<i64>,
    #[allow(dead_code)]
    mode: Option<i64>,
    /// Add `Vary: Accept-Encoding` to compressed responses.
    vary: Option<bool>,
}

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
enum Types {
    List(#[schemars(length(min = 1), inner(length(min = 1)))] Vec<String>),
    All(All),
}

#[derive(Deserialize, Serialize, JsonSchema)]
enum All {
    #[serde(rename = "*")]
    All,
}

fn text_html() -> Types {
    Types::List(vec!["text/html".into()])
}

fn bytes_20() -> u64 {
    20
}

fn http_1_1() -> f64 {
    1.1
}

fn level_1() -> u32 {
    1
}

fn level_6() -> u32 {
    6
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
    fn new(c: Common, codec: Codec, level: u32) -> Compress {
        let types = match c.types {
            Types::All(All::All) => None,
            Types::List(list) => Some(list.iter().map(|t| t.to_ascii_lowercase()).collect()),
        };
        Compress { codec, types, min_length: c.min_length, level, vary: c.vary.unwrap_or(false) }
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
    fn configs_parse() {
        let c: BrotliConfig = crate::parse(&serde_json::json!({"types": "*", "min_length": 5, "comp_level": 11, "http_version": 1})).unwrap();
        let c = Compress::new(c.common, Codec::Brotli, c.comp_level);
        assert!(c.types.is_none());
        assert_eq!((c.min_length, c.level), (5, 11));
        let c: GzipConfig = crate::parse(&serde_json::json!({"types": ["Text/Plain"]})).unwrap();
        assert_eq!(c.comp_level, 1);
        assert_eq!(Compress::new(c.common, Codec::Gzip, 1).types, Some(vec!["text/plain".to_string()]));
    }

    #[test]
    fn gzip_streams_round_trip() {
        use std::io::Read as _;
        let c: GzipConfig = crate::parse(&serde_json::json!({})).unwrap();
        let c = Compress::new(c.common, Codec::Gzip, c.comp_level);
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
