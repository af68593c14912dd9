//! `api-breaker`: a circuit breaker on the route. After `unhealthy.failures` upstream answers
//! with an unhealthy status, requests are answered with `break_response_code` for 2^n seconds
//! (n grows with each further run of failures, capped at `max_breaker_sec`); `healthy.successes`
//! healthy answers in a row close it again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use http::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::Value;

use crate::{Factory, JsonSchema, LogRecord, Notes, Phases, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("api-breaker", 1005, |c: Config, _| {
        let headers = c
            .break_response_headers
            .iter()
            .map(|h| {
                let n = HeaderName::from_bytes(h.key.as_bytes()).map_err(|e| format!("break_response_headers: {e}"))?;
                let v = HeaderValue::from_str(&h.value).map_err(|e| format!("break_response_headers: {e}"))?;
                Ok((n, v))
            })
            .collect::<Result<_, String>>()?;
        Ok(Arc::new(ApiBreaker { config: c, headers, state: Mutex::new(State::default()) }))
    })
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// The status answered while the breaker is open.
    #[schemars(range(min = 200, max = 599))]
    break_response_code: u16,
    /// The body answered while the breaker is open.
    break_response_body: Option<String>,
    /// Headers added to the answer while the breaker is open.
    #[serde(default)]
    break_response_headers: Vec<KeyValue>,
    /// The longest the breaker stays open, in seconds.
    #[serde(default = "secs_300")]
    #[schemars(range(min = 3))]
    max_breaker_sec: u64,
    #[serde(default)]
    unhealthy: Unhealthy,
    #[serde(default)]
    healthy: Healthy,
}

#[derive(Deserialize, JsonSchema)]
struct KeyValue {
    #[schemars(length(min = 1))]
    key: String,
    #[schemars(length(min = 1))]
    value: String,
}

#[derive(Deserialize, JsonSchema)]
#[serde(default)]
struct Unhealthy {
    /// Upstream statuses that count as failures.
    #[schemars(length(min = 1), inner(range(min = 200, max = 599)))]
    http_statuses: Vec<u16>,
    /// Failures in a row that open the breaker.
    #[schemars(range(min = 1))]
    failures: u64,
}

impl Default for Unhealthy {
    fn default() -> Self {
        Unhealthy { http_statuses: vec![500], failures: 3 }
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(default)]
struct Healthy {
    /// Upstream statuses that count as successes.
    #[schemars(length(min = 1), inner(range(min = 200, max = 599)))]
    http_statuses: Vec<u16>,
    /// Successes in a row that close the breaker.
    #[schemars(range(min = 1))]
    successes: u64,
}

impl Default for Healthy {
    fn default() -> Self {
        Healthy { http_statuses: vec![200], successes: 3 }
    }
}

fn secs_300() -> u64 {
    300
}

#[derive(Default)]
struct State {
    unhealthy: u64,
    healthy: u64,
    /// When the last run of `failures` unhealthy answers completed.
    tripped: Option<Instant>,
}

struct ApiBreaker {
    config: Config,
    headers: Vec<(HeaderName, HeaderValue)>,
    state: Mutex<State>,
}

impl ApiBreaker {
    /// How long the breaker stays open after `unhealthy` failures: 2^⌈unhealthy/failures⌉
    /// seconds, at most `max_breaker_sec`.
    fn open_for(&self, unhealthy: u64) -> Duration {
        let runs = unhealthy.div_ceil(self.config.unhealthy.failures).clamp(1, 63);
        Duration::from_secs((1u64 << runs).min(self.config.max_breaker_sec))
    }

    fn observe(&self, status: u16, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.config.unhealthy.http_statuses.contains(&status) {
            s.unhealthy += 1;
            s.healthy = 0;
            if s.unhealthy.is_multiple_of(self.config.unhealthy.failures) {
                s.tripped = Some(now);
            }
        } else if self.config.healthy.http_statuses.contains(&status) && s.unhealthy > 0 {
            s.healthy += 1;
            if s.healthy >= self.config.healthy.successes {
                *s = State::default();
            }
        }
    }

    fn is_open(&self, now: Instant) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.unhealthy < self.config.unhealthy.failures {
            return false;
        }
        s.tripped.is_some_and(|t| now.duration_since(t) < self.open_for(s.unhealthy))
    }
}

impl Plugin for ApiBreaker {
    fn phases(&self) -> Phases {
        Phases { response: false, log: true, body: false }
    }

    fn access(&self, _ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        if !self.is_open(Instant::now()) {
            return Ok(());
        }
        let body = self.config.break_response_body.clone().map(Value::String);
        let mut reply = Reply::new(self.config.break_response_code, body);
        reply.headers.extend(self.headers.iter().cloned());
        Err(reply)
    }

    fn log(&self, record: &LogRecord, _notes: &Notes) {
        // Only what the upstream answered counts, not the breaker's own replies.
        if let Some(status) = record.upstream_status {
            self.observe(status, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> ApiBreaker {
        let conf = serde_json::json!({"break_response_code": 502, "unhealthy": {"failures": 2}, "healthy": {"successes": 2}, "max_breaker_sec": 10});
        let c: Config = serde_json::from_value(conf).unwrap();
        ApiBreaker { config: c, headers: Vec::new(), state: Mutex::new(State::default()) }
    }

    #[test]
    fn opens_for_growing_times_and_closes_on_health() {
        let b = breaker();
        let t = Instant::now();
        b.observe(500, t);
        assert!(!b.is_open(t), "one failure is not enough");
        b.observe(500, t);
        assert!(b.is_open(t + Duration::from_millis(1900)), "2 failures: open for 2^1 s");
        assert!(!b.is_open(t + Duration::from_secs(2)));
        b.observe(500, t + Duration::from_secs(3));
        b.observe(500, t + Duration::from_secs(3));
        assert!(b.is_open(t + Duration::from_secs(6)), "4 failures: 2^2 s");
        assert_eq!(b.open_for(40), Duration::from_secs(10), "capped at max_breaker_sec");
        b.observe(200, t + Duration::from_secs(8));
        b.observe(200, t + Duration::from_secs(8));
        assert!(!b.is_open(t + Duration::from_secs(8)), "healthy answers reset it");
        assert_eq!(b.state.lock().unwrap().unhealthy, 0);
    }
}
