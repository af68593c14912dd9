//! `limit-count`: at most `count` requests per `time_window` seconds per key, in fixed
//! windows (the `local` policy: one count for the whole process).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::json;

use crate::{Factory, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory {
        name: "limit-count",
        priority: 1002,
        schema: json!({"type": "object", "properties": {
            "count": {"type": "integer", "exclusiveMinimum": 0},
            "time_window": {"type": "integer", "exclusiveMinimum": 0},
            "group": {"type": "string"},
            "key": {"type": "string", "default": "remote_addr"},
            "key_type": {"type": "string", "enum": ["var", "var_combination", "constant"], "default": "var"},
            "rejected_code": {"type": "integer", "minimum": 200, "maximum": 599, "default": 503},
            "rejected_msg": {"type": "string", "minLength": 1},
            "policy": {"type": "string", "enum": ["local"], "default": "local"},
            "allow_degradation": {"type": "boolean", "default": false},
            "show_limit_quota_header": {"type": "boolean", "default": true}
        }, "required": ["count", "time_window"]}),
        consumer_schema: None,
        credential: None,
        // Routes naming one `group` get one instance, so they share its counters (the
        // registry scopes instances by group).
        build: |conf, _| {
            let c: Config = serde_json::from_value(conf.clone()).map_err(|e| e.to_string())?;
            Ok(Arc::new(LimitCount::new(c)))
        },
    }
}

#[derive(Deserialize)]
struct Config {
    count: u64,
    time_window: u64,
    #[serde(default = "remote_addr")]
    key: String,
    #[serde(default = "var")]
    key_type: String,
    #[serde(default = "code_503")]
    rejected_code: u16,
    rejected_msg: Option<String>,
    #[serde(default = "yes")]
    show_limit_quota_header: bool,
}

fn remote_addr() -> String {
    "remote_addr".into()
}
fn var() -> String {
    "var".into()
}
fn code_503() -> u16 {
    503
}
fn yes() -> bool {
    true
}

struct LimitCount {
    config: Config,
    window: Duration,
    /// Per key: when its window started and how many requests it has had.
    counts: Mutex<HashMap<String, (Instant, u64)>>,
}

const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

impl LimitCount {
    fn new(config: Config) -> LimitCount {
        let window = Duration::from_secs(config.time_window);
        LimitCount { config, window, counts: Mutex::new(HashMap::new()) }
    }

    fn key(&self, ctx: &RequestCtx<'_>) -> String {
        let c = &self.config;
        let key = match c.key_type.as_str() {
            "constant" => Some(c.key.clone()),
            "var_combination" => weir_core::text::interpolate(&c.key, |name| ctx.var(name)),
            _ => ctx.var(&c.key),
        };
        // APISIX falls back to the client address when the key has no value.
        key.unwrap_or_else(|| ctx.remote_ip().to_string())
    }

    /// Counts one request for `key` at `now`: (allowed, remaining, seconds until reset).
    fn take(&self, key: String, now: Instant) -> (bool, u64, u64) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.len() > 100_000 {
            counts.retain(|_, (start, _)| now.duration_since(*start) < self.window);
        }
        let entry = counts.entry(key).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        let reset = self.window.saturating_sub(now.duration_since(entry.0)).as_secs_f64().ceil() as u64;
        if entry.1 >= self.config.count {
            return (false, 0, reset);
        }
        entry.1 += 1;
        (true, self.config.count - entry.1, reset)
    }
}

impl Plugin for LimitCount {
    fn access(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let key = self.key(ctx);
        let (allowed, remaining, reset) = self.take(key, Instant::now());
        let headers = self.config.show_limit_quota_header.then(|| {
            [
                (LIMIT, HeaderValue::from(self.config.count)),
                (REMAINING, HeaderValue::from(remaining)),
                (RESET, HeaderValue::from(reset)),
            ]
        });
        if allowed {
            ctx.response_headers.extend(headers.into_iter().flatten());
            return Ok(());
        }
        let body = self.config.rejected_msg.as_ref().map(|m| json!({"error_msg": m}));
        let mut reply = Reply::new(self.config.rejected_code, body);
        reply.headers.extend(headers.into_iter().flatten());
        Err(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(count: u64, window: u64) -> LimitCount {
        LimitCount::new(serde_json::from_value(json!({"count": count, "time_window": window})).unwrap())
    }

    #[test]
    fn fixed_windows() {
        let l = limiter(2, 10);
        let t0 = Instant::now();
        assert_eq!(l.take("a".into(), t0), (true, 1, 10));
        assert_eq!(l.take("a".into(), t0 + Duration::from_secs(3)), (true, 0, 7));
        assert_eq!(l.take("a".into(), t0 + Duration::from_secs(4)), (false, 0, 6));
        assert_eq!(l.take("b".into(), t0 + Duration::from_secs(4)), (true, 1, 10), "keys count apart");
        assert_eq!(l.take("a".into(), t0 + Duration::from_secs(10)), (true, 1, 10), "a new window");
    }
}
