//! `limit-count`: at most `count` requests per `time_window` seconds per key, in fixed
//! windows. The `local` policy counts in this process; `redis` counts in a Redis server, so
//! every gateway sharing it enforces one combined limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use http::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{Factory, JsonSchema, Pending, Plugin, Reply, RequestCtx, limit_key};

pub(crate) fn factory() -> Factory {
    // Routes naming one `group` get one instance, so they share its counters (the registry
    // scopes instances by group).
    Factory::new("limit-count", 1002, |c: Config, b| {
        let redis = match c.policy {
            Policy::Redis => Some(RedisCounter::new(&c, b.scope)?),
            Policy::Local => None,
        };
        Ok(Arc::new(LimitCount::new(c, redis)))
    })
}

#[derive(Deserialize, JsonSchema)]
#[schemars(extend("encrypt_fields" = ["redis_password"]))]
struct Config {
    /// Requests allowed per key in each window.
    #[schemars(extend("exclusiveMinimum" = 0))]
    count: u64,
    /// The window, in seconds.
    #[schemars(extend("exclusiveMinimum" = 0))]
    time_window: u64,
    /// Routes naming the same group share one counter.
    #[allow(dead_code)]
    group: Option<String>,
    /// What requests are counted by: a variable, a combination of them, or a constant.
    #[serde(default = "remote_addr")]
    key: String,
    #[serde(default)]
    key_type: KeyType,
    /// The status of a refused request.
    #[serde(default = "code_503")]
    #[schemars(range(min = 200, max = 599))]
    rejected_code: u16,
    /// The body of a refused request, as `{"error_msg": …}`.
    #[schemars(length(min = 1))]
    rejected_msg: Option<String>,
    /// Where requests are counted: in this process, or in a Redis server.
    #[serde(default)]
    policy: Policy,
    #[schemars(length(min = 2))]
    redis_host: Option<String>,
    #[serde(default = "port_6379")]
    #[schemars(range(min = 1, max = 65535))]
    redis_port: u16,
    #[schemars(length(min = 1))]
    redis_username: Option<String>,
    #[schemars(length(min = 0))]
    redis_password: Option<String>,
    #[serde(default)]
    #[schemars(range(min = 0))]
    redis_database: i64,
    /// Milliseconds to wait for Redis.
    #[serde(default = "ms_1000")]
    #[schemars(range(min = 1))]
    redis_timeout: u64,
    #[serde(default)]
    redis_ssl: bool,
    #[serde(default)]
    #[allow(dead_code)]
    redis_ssl_verify: bool,
    /// Let requests through when Redis cannot be reached.
    #[serde(default)]
    allow_degradation: bool,
    /// Send the `X-RateLimit-*` headers.
    #[serde(default = "yes")]
    show_limit_quota_header: bool,
}

#[derive(Deserialize, Serialize, JsonSchema, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum KeyType {
    #[default]
    Var,
    VarCombination,
    Constant,
}

impl KeyType {
    fn as_str(self) -> &'static str {
        match self {
            KeyType::Var => "var",
            KeyType::VarCombination => "var_combination",
            KeyType::Constant => "constant",
        }
    }
}

#[derive(Deserialize, Serialize, JsonSchema, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Policy {
    #[default]
    Local,
    Redis,
}

fn port_6379() -> u16 {
    6379
}
fn ms_1000() -> u64 {
    1000
}
fn remote_addr() -> String {
    "remote_addr".into()
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
    /// Per key: when its window started and how many requests it has had (`local` policy).
    counts: Mutex<HashMap<String, (Instant, u64)>>,
    redis: Option<Arc<RedisCounter>>,
}

const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

impl LimitCount {
    fn new(config: Config, redis: Option<RedisCounter>) -> LimitCount {
        let window = Duration::from_secs(config.time_window);
        LimitCount { config, window, counts: Mutex::new(HashMap::new()), redis: redis.map(Arc::new) }
    }

    fn quota_headers(&self, remaining: u64, reset: u64) -> Vec<(HeaderName, HeaderValue)> {
        if !self.config.show_limit_quota_header {
            return Vec::new();
        }
        vec![
            (LIMIT, HeaderValue::from(self.config.count)),
            (REMAINING, HeaderValue::from(remaining)),
            (RESET, HeaderValue::from(reset)),
        ]
    }

    fn rejected(&self, headers: Vec<(HeaderName, HeaderValue)>) -> Reply {
        let body = self.config.rejected_msg.as_ref().map(|m| json!({"error_msg": m}));
        let mut reply = Reply::new(self.config.rejected_code, body);
        reply.headers.extend(headers);
        reply
    }

    fn key(&self, ctx: &RequestCtx<'_>) -> String {
        limit_key(ctx, &self.config.key, Some(self.config.key_type.as_str()))
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
        let headers = self.quota_headers(remaining, reset);
        if allowed {
            ctx.response_headers.extend(headers);
            return Ok(());
        }
        Err(self.rejected(headers))
    }

    fn access_io(&self, ctx: &mut RequestCtx<'_>) -> Option<Pending> {
        let redis = self.redis.clone()?;
        let key = self.key(ctx);
        let (count, window) = (self.config.count, self.config.time_window);
        let degrade = self.config.allow_degradation;
        // The wait owns copies of what it needs: it outlives this borrow of the plugin.
        let (show, code, msg) = (self.config.show_limit_quota_header, self.config.rejected_code, self.config.rejected_msg.clone());
        Some(Box::pin(async move {
            let quota = |remaining: u64, reset: u64| {
                if !show {
                    return Vec::new();
                }
                vec![(LIMIT, HeaderValue::from(count)), (REMAINING, HeaderValue::from(remaining)), (RESET, HeaderValue::from(reset))]
            };
            match redis.take(&key, count, window).await {
                Ok((remaining, reset)) if remaining >= 0 => Ok(quota(remaining as u64, reset)),
                Ok((_, reset)) => {
                    let mut reply = Reply::new(code, msg.map(|m| json!({"error_msg": m})));
                    reply.headers.extend(quota(0, reset));
                    Err(reply)
                }
                Err(e) => {
                    tracing::error!(error = %e, "limit-count: redis unavailable");
                    if degrade {
                        Ok(Vec::new())
                    } else {
                        Err(Reply::new(500, Some(json!({"error_msg": "failed to limit count"}))))
                    }
                }
            }
        }))
    }
}

/// Counts in Redis: one key per (scope, limit key) that lives for one window.
struct RedisCounter {
    client: redis::Client,
    /// Connections are per worker thread, keyed by this (the server and database).
    target: String,
    prefix: String,
    timeout: Duration,
}

/// Starts a window with `count - 1` left, or takes one from the running window; answers what is
/// left (negative once the window is spent) and the seconds until it resets.
const TAKE_ONE: &str = r"
if redis.call('set', KEYS[1], ARGV[1] - 1, 'EX', ARGV[2], 'NX') then
  return {ARGV[1] - 1, tonumber(ARGV[2])}
end
return {redis.call('decr', KEYS[1]), redis.call('ttl', KEYS[1])}
";

thread_local! {
    static CONNECTIONS: std::cell::RefCell<HashMap<String, redis::aio::MultiplexedConnection>> = Default::default();
}

impl RedisCounter {
    fn new(c: &Config, scope: &str) -> Result<RedisCounter, String> {
        let host = c.redis_host.as_deref().ok_or("redis_host is required when policy is redis")?;
        if c.redis_ssl {
            return Err("redis_ssl is not supported".into());
        }
        use redis::IntoConnectionInfo as _;
        let mut settings = redis::RedisConnectionInfo::default().set_db(c.redis_database);
        if let Some(u) = &c.redis_username {
            settings = settings.set_username(u);
        }
        if let Some(p) = c.redis_password.as_deref().filter(|p| !p.is_empty()) {
            settings = settings.set_password(p);
        }
        let info = redis::ConnectionAddr::Tcp(host.to_string(), c.redis_port)
            .into_connection_info()
            .map_err(|e| format!("redis: {e}"))?
            .set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(|e| format!("redis: {e}"))?;
        Ok(RedisCounter {
            client,
            target: format!("{host}:{}/{}/{}", c.redis_port, c.redis_database, c.redis_username.as_deref().unwrap_or("")),
            prefix: format!("plugin-limit-count:{scope}:"),
            timeout: Duration::from_millis(c.redis_timeout),
        })
    }

    async fn take(&self, key: &str, count: u64, window: u64) -> Result<(i64, u64), String> {
        let run = async {
            let cached = CONNECTIONS.with(|c| c.borrow().get(&self.target).cloned());
            let mut conn = match cached {
                Some(c) => c,
                None => {
                    let c = self.client.get_multiplexed_async_connection().await?;
                    CONNECTIONS.with(|m| m.borrow_mut().insert(self.target.clone(), c.clone()));
                    c
                }
            };
            let (left, ttl): (i64, i64) = redis::Script::new(TAKE_ONE)
                .key(format!("{}{key}", self.prefix))
                .arg(count)
                .arg(window)
                .invoke_async(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>((left, ttl.max(0) as u64))
        };
        let result = match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        };
        if result.is_err() {
            // The next request connects afresh.
            CONNECTIONS.with(|m| m.borrow_mut().remove(&self.target));
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(count: u64, window: u64) -> LimitCount {
        LimitCount::new(serde_json::from_value(json!({"count": count, "time_window": window})).unwrap(), None)
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

    #[test]
    fn configs_are_checked() {
        use weir_core::schema::PluginCatalog as _;
        let r = crate::Registry::new(vec![factory()]);
        assert!(r.check_config("limit-count", &json!({"count": 1, "time_window": 1, "key_type": "constant", "redis_sentinels": []})).is_ok());
        let e = r.check_config("limit-count", &json!({"count": 1, "time_window": 1, "policy": "redis"})).unwrap_err();
        assert_eq!(e, "redis_host is required when policy is redis");
        let e = r.check_config("limit-count", &json!({"count": 1, "time_window": 1, "policy": "redis", "redis_host": "r.test", "redis_ssl": true})).unwrap_err();
        assert_eq!(e, "redis_ssl is not supported");
        let e = r.check_config("limit-count", &json!({"count": 1, "time_window": 1, "policy": "cluster"})).unwrap_err();
        assert!(e.contains("policy"), "{e}");
    }
}
