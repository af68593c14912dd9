//! `proxy-mirror`: sends a copy of (a sample of) the requests to another server, whose answers
//! are ignored. The copy carries the body, so the body is read before proxying.

use std::sync::Arc;

use http_body_util::Full;
use serde_json::{Value, json};

use crate::{LegacyFactory, Factory, Phases, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    LegacyFactory {
        name: "proxy-mirror",
        priority: 1010,
        schema: json!({"type": "object", "properties": {
            "host": {"type": "string", "pattern": "^http(s)?://[a-zA-Z0-9][-a-zA-Z0-9]{0,62}(\\.[a-zA-Z0-9][-a-zA-Z0-9]{0,62})*(:[0-9]{1,5})?$"},
            "path": {"type": "string", "pattern": "^/[^?&]+$"},
            "path_concat_mode": {"type": "string", "enum": ["replace", "prefix"], "default": "replace"},
            "sample_ratio": {"type": "number", "minimum": 0.00001, "maximum": 1, "default": 1}
        }, "required": ["host"]}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| {
            let host = conf.get("host").and_then(Value::as_str).unwrap_or("");
            let uri: http::Uri = host.parse().map_err(|e| format!("host: {e}"))?;
            Ok(Arc::new(Mirror {
                authority: crate::client::authority(&uri).map_err(|e| format!("host: {e}"))?,
                path: conf.get("path").and_then(Value::as_str).map(str::to_string),
                prefix: conf.get("path_concat_mode").and_then(Value::as_str) == Some("prefix"),
                ratio: conf.get("sample_ratio").and_then(Value::as_f64).unwrap_or(1.0),
            }))
        },
    }
    .into()
}

struct Mirror {
    authority: String,
    path: Option<String>,
    /// `path` goes before the request's path rather than replacing it.
    prefix: bool,
    ratio: f64,
}

impl Plugin for Mirror {
    fn phases(&self) -> Phases {
        Phases { response: false, log: false, body: true }
    }

    fn access(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        if self.ratio < 1.0 && fastrand::f64() >= self.ratio {
            return Ok(());
        }
        let uri = &ctx.parts.uri;
        let path = match (&self.path, self.prefix) {
            (Some(p), true) => format!("{p}{}", uri.path()),
            (Some(p), false) => p.clone(),
            (None, _) => uri.path().to_string(),
        };
        let target = match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut req = http::Request::new(Full::new(ctx.body.clone().unwrap_or_default()));
        *req.method_mut() = ctx.parts.method.clone();
        *req.headers_mut() = ctx.parts.headers.clone();
        match target.parse() {
            Ok(u) => *req.uri_mut() = u,
            Err(_) => return Ok(()),
        }
        let authority = self.authority.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::client::send(&authority, req).await {
                tracing::debug!(mirror = %authority, error = %e, "mirrored request failed");
            }
        });
        Ok(())
    }
}
