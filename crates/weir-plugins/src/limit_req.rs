//! `limit-req`: a leaky bucket per key, as nginx's `limit_req`: `rate` requests a second, up
//! to `burst` more delayed (or, with `nodelay`, let through at once), the rest refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use serde::Deserialize;
use serde_json::json;

use crate::{LegacyFactory, Factory, Pending, Plugin, Reply, RequestCtx, limit_key};

pub(crate) fn factory() -> Factory {
    LegacyFactory {
        name: "limit-req",
        priority: 1001,
        schema: json!({"type": "object", "properties": {
            "rate": {"type": "number", "exclusiveMinimum": 0},
            "burst": {"type": "number", "minimum": 0},
            "key": {"type": "string"},
            "key_type": {"type": "string", "enum": ["var", "var_combination"], "default": "var"},
            "rejected_code": {"type": "integer", "minimum": 200, "maximum": 599, "default": 503},
            "rejected_msg": {"type": "string", "minLength": 1},
            "nodelay": {"type": "boolean", "default": false},
            "allow_degradation": {"type": "boolean", "default": false},
            "policy": {"type": "string", "enum": ["local"], "default": "local"}
        }, "required": ["rate", "burst", "key"]}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| {
            let c: Config = serde_json::from_value(conf.clone()).map_err(|e| e.to_string())?;
            Ok(Arc::new(LimitReq { config: c, buckets: Mutex::new(HashMap::new()) }))
        },
    }
    .into()
}

#[derive(Deserialize)]
struct Config {
    rate: f64,
    burst: f64,
    key: String,
    #[serde(default)]
    key_type: Option<String>,
    #[serde(default = "code_503")]
    rejected_code: u16,
    rejected_msg: Option<String>,
    #[serde(default)]
    nodelay: bool,
}

fn code_503() -> u16 {
    503
}

struct LimitReq {
    config: Config,
    /// Per key: requests in the bucket beyond the rate, and when that was last worked out.
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

/// What the bucket says of one more request.
#[derive(Debug, PartialEq)]
enum Verdict {
    Pass,
    Delay(Duration),
    Reject,
}

impl LimitReq {
    fn take(&self, key: String, now: Instant) -> Verdict {
        let c = &self.config;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 100_000 {
            buckets.retain(|_, (excess, at)| *excess - c.rate * now.duration_since(*at).as_secs_f64() > 0.0);
        }
        let (excess, at) = buckets.get(&key).copied().unwrap_or((0.0, now));
        // The bucket drains at `rate`; this request adds one.
        let drained = (excess - c.rate * now.duration_since(at).as_secs_f64()).max(0.0);
        let next = drained + 1.0;
        if next > c.burst + 1.0 {
            return Verdict::Reject;
        }
        buckets.insert(key, (next, now));
        let over = next - 1.0;
        if over <= 0.0 || c.nodelay { Verdict::Pass } else { Verdict::Delay(Duration::from_secs_f64(over / c.rate)) }
    }

    fn reject(&self) -> Reply {
        Reply::new(self.config.rejected_code, self.config.rejected_msg.as_ref().map(|m| json!({"error_msg": m})))
    }
}

impl Plugin for LimitReq {
    fn access_io(&self, ctx: &mut RequestCtx<'_>) -> Option<Pending> {
        let verdict = self.take(limit_key(ctx, &self.config.key, self.config.key_type.as_deref()), Instant::now());
        let reject = self.reject();
        Some(Box::pin(async move {
            match verdict {
                Verdict::Pass => Ok(Vec::new()),
                Verdict::Delay(d) => {
                    tokio::time::sleep(d).await;
                    Ok(Vec::new())
                }
                Verdict::Reject => Err(reject),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(conf: serde_json::Value) -> LimitReq {
        LimitReq { config: serde_json::from_value(conf).unwrap(), buckets: Mutex::new(HashMap::new()) }
    }

    #[test]
    fn a_leaky_bucket() {
        let l = limiter(json!({"rate": 2, "burst": 1, "key": "remote_addr"}));
        let t = Instant::now();
        assert_eq!(l.take("a".into(), t), Verdict::Pass);
        assert_eq!(l.take("a".into(), t), Verdict::Delay(Duration::from_millis(500)), "one over the rate waits 1/rate");
        assert_eq!(l.take("a".into(), t), Verdict::Reject, "beyond the burst");
        assert_eq!(l.take("a".into(), t + Duration::from_millis(500)), Verdict::Delay(Duration::from_millis(500)), "half a second drains one");
        assert_eq!(l.take("b".into(), t), Verdict::Pass, "keys are apart");
        let quick = limiter(json!({"rate": 1, "burst": 2, "key": "remote_addr", "nodelay": true}));
        assert_eq!([quick.take("a".into(), t), quick.take("a".into(), t), quick.take("a".into(), t), quick.take("a".into(), t)],
            [Verdict::Pass, Verdict::Pass, Verdict::Pass, Verdict::Reject]);
    }
}
