//! `cors`: answers preflight requests and adds the CORS headers to responses, with APISIX's
//! conventions: `*` is sent as `*`, `**` allows (and echoes) anything, a list allows its
//! members; `allow_origins_by_regex` replaces `allow_origins` when given.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use crate::{Factory, JsonSchema, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("cors", 4000, |c: Config, _| build(c).map(|c| Arc::new(c) as Arc<dyn Plugin>))
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// `*`, `**` (any origin, echoed), `null`, or a comma-separated list of `scheme://host[:port]`.
    #[serde(default = "star")]
    #[schemars(regex(pattern = r"^(\*|\*\*|null|\w+://[^,]+(,\w+://[^,]+)*)$"))]
    allow_origins: String,
    /// `*`, `**`, or a comma-separated list of methods.
    #[serde(default = "star")]
    allow_methods: String,
    /// `*`, `**` (the requested headers, echoed), or a comma-separated list of headers.
    #[serde(default = "star")]
    allow_headers: String,
    /// The headers a browser may expose to scripts, comma-separated.
    expose_headers: Option<String>,
    /// How long, in seconds, a browser may cache a preflight answer.
    #[serde(default = "five")]
    max_age: i64,
    /// Allow requests with credentials (cookies, authorization).
    #[serde(default)]
    allow_credential: bool,
    /// Regular expressions for the allowed origins; used instead of `allow_origins` when given.
    #[schemars(length(min = 1), inner(length(min = 1)), extend("uniqueItems" = true))]
    allow_origins_by_regex: Option<Vec<String>>,
}

fn star() -> String {
    "*".into()
}

fn five() -> i64 {
    5
}

struct Cors {
    origins: String,
    by_regex: Option<Vec<Regex>>,
    methods: String,
    headers: String,
    expose: Option<String>,
    max_age: i64,
    credential: bool,
}

fn build(conf: Config) -> Result<Cors, String> {
    let c = Cors {
        origins: conf.allow_origins,
        by_regex: conf
            .allow_origins_by_regex
            .map(|a| a.iter().map(|r| Regex::new(r)).collect::<Result<Vec<_>, _>>())
            .transpose()
            .map_err(|e| format!("allow_origins_by_regex: {e}"))?,
        methods: conf.allow_methods,
        headers: conf.allow_headers,
        expose: conf.expose_headers,
        max_age: conf.max_age,
        credential: conf.allow_credential,
    };
    // With credentials a browser refuses `*`, so APISIX refuses the config.
    if c.credential && [&c.origins, &c.methods, &c.headers].iter().any(|v| *v == "*") && c.by_regex.is_none() {
        return Err("you can not set '*' for other option when 'allow_credential' is true".into());
    }
    Ok(c)
}

const ALLOW_ORIGIN: HeaderName = HeaderName::from_static("access-control-allow-origin");
const ALLOW_METHODS: HeaderName = HeaderName::from_static("access-control-allow-methods");
const ALLOW_HEADERS: HeaderName = HeaderName::from_static("access-control-allow-headers");
const EXPOSE_HEADERS: HeaderName = HeaderName::from_static("access-control-expose-headers");
const MAX_AGE: HeaderName = HeaderName::from_static("access-control-max-age");
const ALLOW_CREDENTIALS: HeaderName = HeaderName::from_static("access-control-allow-credentials");

impl Cors {
    /// The Access-Control-Allow-Origin value for a request from `origin`, if it is allowed.
    fn allowed_origin(&self, origin: Option<&str>) -> Option<String> {
        if let Some(res) = &self.by_regex {
            let o = origin?;
            return res.iter().any(|r| r.is_match(o)).then(|| o.to_string());
        }
        match self.origins.as_str() {
            "*" => Some("*".into()),
            "**" => origin.map(str::to_string),
            list => {
                let o = origin?;
                list.split(',').any(|allowed| allowed.trim() == o).then(|| o.to_string())
            }
        }
    }
}

impl Plugin for Cors {
    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let header = |name| ctx.parts.headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_string);
        let origin = header(http::header::ORIGIN);
        let mut out: Vec<(HeaderName, String)> = Vec::new();
        if self.origins != "*" || self.by_regex.is_some() {
            out.push((http::header::VARY, "Origin".into()));
        }
        if let Some(allow) = self.allowed_origin(origin.as_deref()) {
            let methods = if self.methods == "**" { "GET,POST,PUT,DELETE,PATCH,HEAD,OPTIONS,CONNECT,TRACE".to_string() } else { self.methods.clone() };
            let headers = if self.headers == "**" {
                header(http::header::ACCESS_CONTROL_REQUEST_HEADERS).unwrap_or_default()
            } else {
                self.headers.clone()
            };
            out.push((ALLOW_ORIGIN, allow));
            out.push((ALLOW_METHODS, methods));
            out.push((MAX_AGE, self.max_age.to_string()));
            if let Some(e) = self.expose.as_ref().filter(|e| !e.is_empty()) {
                out.push((EXPOSE_HEADERS, e.clone()));
            }
            if !headers.is_empty() {
                out.push((ALLOW_HEADERS, headers));
            }
            if self.credential {
                out.push((ALLOW_CREDENTIALS, "true".into()));
            }
        }
        ctx.response_headers.extend(out.into_iter().filter_map(|(k, v)| HeaderValue::from_str(&v).ok().map(|v| (k, v))));
        // A preflight is answered here, with the headers above.
        if ctx.parts.method == http::Method::OPTIONS {
            return Err(Reply::new(200, Some(Value::String(String::new()))));
        }
        Ok(())
    }
}
