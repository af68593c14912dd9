//! `limit-conn`: at most `conn` requests in flight per key, and `burst` more delayed by
//! `default_conn_delay`; the rest refused. A request counts until its response has been sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::{Factory, JsonSchema, LogRecord, Notes, Pending, Phases, Plugin, Reply, RequestCtx, limit_key};

pub(crate) fn factory() -> Factory {
    Factory::new("limit-conn", 1003, |c: Config, _| Ok(Arc::new(LimitConn { config: c, counts: Arc::new(Mutex::new(HashMap::new())) })))
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// Requests in flight allowed per key.
    #[schemars(extend("exclusiveMinimum" = 0))]
    conn: u64,
    /// Requests beyond `conn` that are delayed rather than refused.
    burst: u64,
    /// Seconds a request within the burst is delayed.
    #[schemars(extend("exclusiveMinimum" = 0))]
    default_conn_delay: f64,
    #[serde(default)]
    #[allow(dead_code)]
    only_use_default_delay: bool,
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
    #[serde(default)]
    #[allow(dead_code)]
    allow_degradation: bool,
    #[serde(default)]
    #[allow(dead_code)]
    policy: crate::limits::LocalPolicy,
}

type Counts = Arc<Mutex<HashMap<String, u64>>>;

struct LimitConn {
    config: Config,
    counts: Counts,
}

/// One request counted against its key; dropping it (when the request is done) uncounts it.
struct InFlight {
    counts: Counts,
    key: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

impl Plugin for LimitConn {
    fn phases(&self) -> Phases {
        // The log phase keeps the request's notes, and so its count, until the response is sent.
        Phases { response: false, log: true, body: false }
    }

    fn access_io(&self, ctx: &mut RequestCtx<'_>) -> Option<Pending> {
        let c = &self.config;
        let key = limit_key(ctx, &c.key, Some(c.key_type.as_str()));
        let now = {
            let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            let n = counts.entry(key.clone()).or_insert(0);
            if *n >= c.conn + c.burst {
                let reply = Reply::new(c.rejected_code, c.rejected_msg.as_ref().map(|m| json!({"error_msg": m})));
                return Some(Box::pin(async move { Err(reply) }));
            }
            *n += 1;
            *n
        };
        ctx.notes.hold(InFlight { counts: self.counts.clone(), key });
        if now <= c.conn {
            return None;
        }
        // Over `conn` but within the burst: wait before going on, as nginx's delayed requests.
        let delay = Duration::from_secs_f64(c.default_conn_delay);
        Some(Box::pin(async move {
            tokio::time::sleep(delay).await;
            Ok(Vec::new())
        }))
    }

    fn log(&self, _record: &LogRecord, _notes: &Notes) {}
}
