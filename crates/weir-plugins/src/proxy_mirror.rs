//! `proxy-mirror`: sends a copy of (a sample of) the requests to another server, whose answers
//! are ignored. The copy carries the body, so the body is read before proxying.

use std::sync::Arc;

use http_body_util::Full;
use serde::{Deserialize, Serialize};

use crate::{Factory, JsonSchema, Phases, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("proxy-mirror", 1010, |c: Config, _| {
        let uri: http::Uri = c.host.parse().map_err(|e| format!("host: {e}"))?;
        Ok(Arc::new(Mirror {
            authority: crate::client::authority(&uri).map_err(|e| format!("host: {e}"))?,
            path: c.path,
            prefix: c.path_concat_mode == ConcatMode::Prefix,
            ratio: c.sample_ratio,
        }))
    })
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// The server the copies go to: `http(s)://host[:port]`.
    #[schemars(regex(pattern = r"^http(s)?://[a-zA-Z0-9][-a-zA-Z0-9]{0,62}(\.[a-zA-Z0-9][-a-zA-Z0-9]{0,62})*(:[0-9]{1,5})?$"))]
    host: String,
    /// The path the copies are sent to, instead of the request's.
    #[schemars(regex(pattern = r"^/[^?&]+$"))]
    path: Option<String>,
    /// Whether `path` replaces the request's path or goes before it.
    #[serde(default)]
    path_concat_mode: ConcatMode,
    /// The share of requests copied.
    #[serde(default = "one")]
    #[schemars(range(min = 0.00001, max = 1))]
    sample_ratio: f64,
}

#[derive(Deserialize, Serialize, JsonSchema, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum ConcatMode {
    #[default]
    Replace,
    Prefix,
}

fn one() -> f64 {
    1.0
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
