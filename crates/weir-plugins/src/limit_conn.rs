//! `limit-conn`: at most `conn` requests in flight per key, and `burst` more delayed by
//! `default_conn_delay`; the rest refused. A request counts until its response has been sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::{LegacyFactory, Factory, LogRecord, Notes, Pending, Phases, Plugin, Reply, RequestCtx, limit_key};

pub(crate) fn factory() -> Factory {
    LegacyFactory {
        name: "limit-conn",
        priority: 1003,
        schema: json!({"type": "object", "properties": {
            "conn": {"type": "integer", "exclusiveMinimum": 0},
            "burst": {"type": "integer", "minimum": 0},
            "default_conn_delay": {"type": "number", "exclusiveMinimum": 0},
            "only_use_default_delay": {"type": "boolean", "default": false},
            "key": {"type": "string"},
            "key_type": {"type": "string", "enum": ["var", "var_combination"], "default": "var"},
            "rejected_code": {"type": "integer", "minimum": 200, "maximum": 599, "default": 503},
            "rejected_msg": {"type": "string", "minLength": 1},
            "allow_degradation": {"type": "boolean", "default": false},
            "policy": {"type": "string", "enum": ["local"], "default": "local"}
        }, "required": ["conn", "burst", "default_conn_delay", "key"]}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| {
            let c: Config = serde_json::from_value(conf.clone()).map_err(|e| e.to_string())?;
            Ok(Arc::new(LimitConn { config: c, counts: Arc::new(Mutex::new(HashMap::new())) }))
        },
    }
    .into()
}

#[derive(Deserialize)]
struct Config {
    conn: u64,
    burst: u64,
    default_conn_delay: f64,
    key: String,
    #[serde(default)]
    key_type: Option<String>,
    #[serde(default = "code_503")]
    rejected_code: u16,
    rejected_msg: Option<String>,
}

fn code_503() -> u16 {
    503
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
        let key = limit_key(ctx, &c.key, c.key_type.as_deref());
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
