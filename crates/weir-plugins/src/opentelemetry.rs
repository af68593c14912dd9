//! `opentelemetry`: a server span per request, W3C `traceparent` continued from the client (or
//! started) and passed upstream, sampled as configured, and exported in batches to an OTLP/HTTP
//! collector (`plugin_attr.opentelemetry.collector`), as OTLP JSON.

use std::sync::atomic::AtomicU64;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use http::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::keyed::hex;
use crate::loggers::{HttpTarget, Queue, send_batches};
use crate::{Factory, JsonSchema, LogRecord, Notes, Phases, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("opentelemetry", 12009, |c: Config, b| {
        let sampler = c.sampler.map_or(Sampler::AlwaysOff, Sampler::of);
        let exporter = if b.is_check() { None } else { Some(exporter(b.attr)?) };
        Ok(Arc::new(Otel {
            sampler,
            exporter,
            attributes: c.additional_attributes.unwrap_or_default(),
            header_prefixes: c.additional_header_prefix_attributes.into_iter().flatten().map(|p| p.to_ascii_lowercase()).collect(),
        }))
    })
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// Which requests are traced.
    sampler: Option<SamplerConfig>,
    /// Request variables added to the span as attributes.
    #[schemars(inner(length(min = 1)))]
    additional_attributes: Option<Vec<String>>,
    /// Request headers, by name prefix, added to the span as attributes.
    #[schemars(inner(length(min = 1)))]
    additional_header_prefix_attributes: Option<Vec<String>>,
}

#[derive(Deserialize, JsonSchema)]
struct SamplerConfig {
    #[serde(default)]
    name: SamplerName,
    options: Option<SamplerOptions>,
}

#[derive(Deserialize, Serialize, JsonSchema, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum SamplerName {
    AlwaysOn,
    #[default]
    AlwaysOff,
    TraceIdRatio,
    ParentBase,
}

#[derive(Deserialize, JsonSchema)]
struct SamplerOptions {
    /// The share of traces sampled, for `trace_id_ratio`.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1))]
    fraction: f64,
    /// The sampler deciding, for `parent_base`, when the caller sent no trace.
    root: Option<RootSampler>,
}

#[derive(Deserialize, JsonSchema)]
struct RootSampler {
    #[serde(default)]
    name: RootName,
    options: Option<RootOptions>,
}

#[derive(Deserialize, JsonSchema, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum RootName {
    AlwaysOn,
    #[default]
    AlwaysOff,
    TraceIdRatio,
}

#[derive(Deserialize, JsonSchema)]
struct RootOptions {
    #[schemars(range(min = 0, max = 1))]
    fraction: Option<f64>,
}

/// What the exporter reads of `plugin_attr.opentelemetry`.
#[derive(Deserialize, Default)]
struct Attr {
    collector: Option<Collector>,
    resource: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
struct Collector {
    address: Option<String>,
    request_timeout: Option<u64>,
}

/// The process's one span exporter, made by the first instance from `plugin_attr`.
fn exporter(attr: Option<&Value>) -> Result<&'static Queue, String> {
    static EXPORTER: OnceLock<Queue> = OnceLock::new();
    if let Some(q) = EXPORTER.get() {
        return Ok(q);
    }
    let attr = attr.map_or_else(Attr::default, |a| {
        Attr::deserialize(a).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "plugin_attr.opentelemetry ignored");
            Attr::default()
        })
    });
    let collector = attr.collector.as_ref();
    let address = collector.and_then(|c| c.address.as_deref()).unwrap_or("127.0.0.1:4318");
    let timeout = collector.and_then(|c| c.request_timeout).unwrap_or(3);
    let mut resource: Vec<Value> = attr
        .resource
        .iter()
        .flatten()
        .map(|(k, v)| attribute(k, v.as_str().map_or_else(|| v.to_string(), str::to_string)))
        .collect();
    if !resource.iter().any(|a| a["key"] == "service.name") {
        resource.push(attribute("service.name", "APISIX".to_string()));
    }
    let target = HttpTarget::otlp(address, Duration::from_secs(timeout), json!({ "attributes": resource }))?;
    let (tx, rx) = sync_channel(crate::loggers::QUEUE);
    weir_core::threads::spawn(std::thread::Builder::new().name("weir-otlp".into()), move || send_batches(target, rx)).map_err(|e| e.to_string())?;
    Ok(EXPORTER.get_or_init(|| Queue { tx, dropped: AtomicU64::new(0), what: format!("otlp {address}") }))
}

fn attribute(key: &str, value: String) -> Value {
    json!({"key": key, "value": {"stringValue": value}})
}

#[derive(Debug, Clone, PartialEq)]
enum Sampler {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
    /// Follow the caller's sampled flag; without a caller, the root sampler decides.
    ParentBased(Box<Sampler>),
}

impl Sampler {
    fn of(c: SamplerConfig) -> Sampler {
        let fraction = c.options.as_ref().map_or(0.0, |o| o.fraction);
        match c.name {
            SamplerName::AlwaysOn => Sampler::AlwaysOn,
            SamplerName::AlwaysOff => Sampler::AlwaysOff,
            SamplerName::TraceIdRatio => Sampler::Ratio(fraction),
            SamplerName::ParentBase => {
                let root = match c.options.and_then(|o| o.root) {
                    Some(r) => match r.name {
                        RootName::AlwaysOn => Sampler::AlwaysOn,
                        RootName::AlwaysOff => Sampler::AlwaysOff,
                        RootName::TraceIdRatio => Sampler::Ratio(r.options.and_then(|o| o.fraction).unwrap_or(0.0)),
                    },
                    None => Sampler::AlwaysOff,
                };
                Sampler::ParentBased(Box::new(root))
            }
        }
    }

    fn sample(&self, trace: &[u8; 16], parent: Option<bool>) -> bool {
        match self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            // The low 8 bytes of the trace id against the fraction, as OpenTelemetry's
            // TraceIdRatioBased does, so every hop decides alike.
            Sampler::Ratio(f) => {
                let low = u64::from_be_bytes(trace[8..].try_into().expect("8 bytes"));
                (low >> 1) < (f * (1u64 << 63) as f64) as u64
            }
            Sampler::ParentBased(root) => parent.unwrap_or_else(|| root.sample(trace, None)),
        }
    }
}

/// A `traceparent` value: version 00, trace id, parent span id, flags.
fn parse_traceparent(v: &str) -> Option<([u8; 16], [u8; 8], bool)> {
    let mut parts = v.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let mut t = [0u8; 16];
    let mut s = [0u8; 8];
    hex_into(trace, &mut t)?;
    hex_into(span, &mut s)?;
    if t == [0; 16] || s == [0; 8] {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((t, s, flags & 1 == 1))
}

fn hex_into(text: &str, out: &mut [u8]) -> Option<()> {
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(())
}


/// The span a request is in, kept for the log phase.
struct Span {
    trace: [u8; 16],
    id: [u8; 8],
    parent: Option<[u8; 8]>,
    attributes: Vec<Value>,
}

struct Otel {
    sampler: Sampler,
    exporter: Option<&'static Queue>,
    attributes: Vec<String>,
    header_prefixes: Vec<String>,
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

impl Plugin for Otel {
    fn phases(&self) -> Phases {
        Phases { response: false, log: true, body: false }
    }

    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let caller = ctx.parts.headers.get(&TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(parse_traceparent);
        let trace = caller.map_or_else(|| fastrand::u128(1..).to_be_bytes(), |(t, _, _)| t);
        let id = fastrand::u64(1..).to_be_bytes();
        let sampled = self.sampler.sample(&trace, caller.map(|(_, _, s)| s));
        let value = format!("00-{}-{}-{}", hex(&trace), hex(&id), if sampled { "01" } else { "00" });
        if let Ok(v) = HeaderValue::from_str(&value) {
            ctx.parts.headers.insert(TRACEPARENT, v);
        }
        if !sampled {
            return Ok(());
        }
        let mut attributes = Vec::new();
        for name in &self.attributes {
            if let Some(v) = ctx.var(name) {
                attributes.push(attribute(name, v));
            }
        }
        for (k, v) in &ctx.parts.headers {
            if self.header_prefixes.iter().any(|p| k.as_str().starts_with(p.as_str())) {
                attributes.push(attribute(k.as_str(), v.to_str().unwrap_or("").to_string()));
            }
        }
        ctx.notes.put("opentelemetry", Span { trace, id, parent: caller.map(|(_, s, _)| s), attributes });
        Ok(())
    }

    fn log(&self, r: &LogRecord, notes: &Notes) {
        let (Some(span), Some(exporter)) = (notes.get::<Span>("opentelemetry"), self.exporter) else { return };
        let start = r.started.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
        let end = start + r.request_time;
        let mut attributes = vec![
            attribute("http.method", r.method.clone()),
            attribute("http.target", r.uri.clone()),
            attribute("http.host", r.host.clone()),
            attribute("net.peer.ip", r.client_ip.clone()),
            attribute("apisix.route_id", r.route_id.to_string()),
            attribute("apisix.route_name", r.route_name.to_string()),
            attribute("apisix.service_id", r.service_id.to_string()),
            json!({"key": "http.status_code", "value": {"intValue": r.status.to_string()}}),
        ];
        attributes.extend(span.attributes.iter().cloned());
        let mut s = json!({
            "traceId": hex(&span.trace),
            "spanId": hex(&span.id),
            "name": format!("http.{}", r.method.to_ascii_lowercase()),
            "kind": 2,
            "startTimeUnixNano": start.as_nanos().to_string(),
            "endTimeUnixNano": end.as_nanos().to_string(),
            "attributes": attributes,
            // OTLP status codes: 1 ok, 2 error (server errors only, as the HTTP conventions say).
            "status": {"code": if r.status >= 500 { 2 } else { 1 }},
        });
        if let Some(p) = span.parent {
            s["parentSpanId"] = json!(hex(&p));
        }
        exporter.push(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_and_samplers() {
        let (t, s, sampled) = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!((hex(&t).as_str(), hex(&s).as_str(), sampled), ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", true));
        assert!(parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none(), "an all-zero trace id");
        assert!(parse_traceparent("garbage").is_none());
        let conf: SamplerConfig = serde_json::from_value(json!({"name": "parent_base", "options": {"root": {"name": "always_on"}}})).unwrap();
        let parent = Sampler::of(conf);
        assert_eq!(parent, Sampler::ParentBased(Box::new(Sampler::AlwaysOn)));
        assert!(!parent.sample(&t, Some(false)), "the caller's decision is kept");
        assert!(parent.sample(&t, None), "the root decides without a caller");
        let none = Sampler::Ratio(0.0);
        let all = Sampler::Ratio(1.0);
        assert!(!none.sample(&t, None) && all.sample(&t, None));
    }

    #[test]
    fn sampler_configs() {
        let of = |v: Value| Sampler::of(serde_json::from_value(v).unwrap());
        assert_eq!(of(json!({})), Sampler::AlwaysOff);
        assert_eq!(of(json!({"name": "trace_id_ratio", "options": {"fraction": 0.5}})), Sampler::Ratio(0.5));
        assert_eq!(of(json!({"name": "parent_base"})), Sampler::ParentBased(Box::new(Sampler::AlwaysOff)));
        assert!(serde_json::from_value::<SamplerConfig>(json!({"name": "sometimes"})).is_err());
    }
}
