//! `limit-req`: a leaky bucket per key, as nginx's `limit_req`: `rate` requests a second, up
//! to `burst` more delayed (or, with `nodelay`, let through at once), the rest refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use serde::Deserialize;
use serde_json::json;

use crate::{Factory, JsonSchema, Pending, Plugin, Reply, RequestCtx, limit_key};

pub(crate) fn factory() -> Factory {
    Factory::new("limit-req", 1001, |c: Config, _| Ok(Arc::new(LimitReq { config: c, buckets: Mutex::new(HashMap::new()) })))
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// Requests a second allowed per key.
    #[schemars(extend("exclusiveMinimum" = 0))]
    rate: f64,
    /// Requests beyond the rate that are delayed rather than refused.
    #[schemars(range(min = 0))]
    burst: f64,
    /// What requests are counted by: a variable, or a combination of them.
    key: String,
    #[serde(default)]
    key_type: crate::limits::KeyType,
    /// The status of a refused request.
    #[serde(default = "crate::limits::code_503")]
    #[schemars(range(min = 200, max = 599))]
    rejected_code: u16,
    /// The body of a refused request, as `{"error_msg": …}`.
    #[schemars(length(min = 1))]
    rejected_msg: Option<String>,
    /// Let requests within the burst through at once instead of delaying them.
    #[serde(default)]
    nodelay: bool,
    #[serde(default)]
    #[allow(dead_code)]
    allow_degradation: bool,
    #[serde(default)]
    #[allow(dead_code)]
    policy: crate::limits::LocalPolicy,
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
        let verdict = self.take(limit_key(ctx, &self.config.key, Some(self.config.key_type.as_str())), Instant::now());
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
