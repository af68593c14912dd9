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
    /// `allow_headers` as configured: `**` echoes the requested headers.
    headers: String,
    /// The header values that do not depend on the request, made once; none where the
    /// config's text cannot be a header value (that header is then left out).
    values: Values,
    credential: bool,
}

struct Values {
    methods: Option<HeaderValue>,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
}

fn build(conf: Config) -> Result<Cors, String> {
    let value = |v: &str| HeaderValue::from_str(v).ok();
    let methods = if conf.allow_methods == "**" { "GET,POST,PUT,DELETE,PATCH,HEAD,OPTIONS,CONNECT,TRACE" } else { conf.allow_methods.as_str() };
    let values = Values {
        methods: value(methods),
        headers: value(&conf.allow_headers).filter(|v| !v.is_empty()),
        expose: conf.expose_headers.as_deref().filter(|e| !e.is_empty()).and_then(value),
        max_age: value(&conf.max_age.to_string()),
    };
    let c = Cors {
        origins: conf.allow_origins,
        by_regex: conf
            .allow_origins_by_regex
            .map(|a| a.iter().map(|r| Regex::new(r)).collect::<Result<Vec<_>, _>>())
            .transpose()
            .map_err(|e| format!("allow_origins_by_regex: {e}"))?,
        headers: conf.allow_headers,
        values,
        credential: conf.allow_credential,
    };
    // With credentials a browser refuses `*`, so APISIX refuses the config.
    if c.credential && [&c.origins, &conf.allow_methods, &c.headers].iter().any(|v| *v == "*") && c.by_regex.is_none() {
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
    fn allowed_origin(&self, origin: Option<&str>) -> Option<HeaderValue> {
        let echo = |o: &str| HeaderValue::from_str(o).ok();
        if let Some(res) = &self.by_regex {
            let o = origin?;
            return res.iter().any(|r| r.is_match(o)).then(|| echo(o)).flatten();
        }
        match self.origins.as_str() {
            "*" => Some(HeaderValue::from_static("*")),
            "**" => origin.and_then(echo),
            list => {
                let o = origin?;
                list.split(',').any(|allowed| allowed.trim() == o).then(|| echo(o)).flatten()
            }
        }
    }
}

impl Plugin for Cors {
    fn has_access(&self) -> bool {
        false
    }

    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let header = |name| ctx.parts.headers.get(name).filter(|v: &&HeaderValue| v.to_str().is_ok());
        let origin = header(http::header::ORIGIN).and_then(|v| v.to_str().ok());
        let allowed = self.allowed_origin(origin);
        let requested = match self.headers.as_str() {
            "**" => header(http::header::ACCESS_CONTROL_REQUEST_HEADERS).filter(|v| !v.is_empty()).cloned(),
            _ => self.values.headers.clone(),
        };
        let out = &mut ctx.response_headers;
        // Room for every field below at once, rather than growing field by field.
        out.reserve(7);
        if self.origins != "*" || self.by_regex.is_some() {
            out.push((http::header::VARY, HeaderValue::from_static("Origin")));
        }
        if let Some(allow) = allowed {
            let v = &self.values;
            out.push((ALLOW_ORIGIN, allow));
            let rest = [(ALLOW_METHODS, v.methods.clone()), (MAX_AGE, v.max_age.clone()), (EXPOSE_HEADERS, v.expose.clone()), (ALLOW_HEADERS, requested)];
            out.extend(rest.into_iter().filter_map(|(k, v)| Some((k, v?))));
            if self.credential {
                out.push((ALLOW_CREDENTIALS, HeaderValue::from_static("true")));
            }
        }
        // A preflight is answered here, with the headers above.
        if ctx.parts.method == http::Method::OPTIONS {
            return Err(Reply::new(200, Some(Value::String(String::new()))));
        }
        Ok(())
    }
}
