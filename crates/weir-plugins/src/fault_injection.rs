//! `fault-injection`: delays requests, or answers them with a chosen status, for a percentage
//! of the traffic (and only where `vars` hold), to test how clients cope with failures.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use weir_core::expr::Expr;

use crate::{Factory, JsonSchema, Pending, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("fault-injection", 11000, |c: Config, _| Ok(Arc::new(build(c)?)))
}

#[derive(Deserialize, JsonSchema)]
#[schemars(extend("minProperties" = 1))]
struct Config {
    /// Answer the request here instead of proxying it.
    abort: Option<AbortConfig>,
    /// Pause before the request goes on.
    delay: Option<DelayConfig>,
}

#[derive(Deserialize, JsonSchema)]
struct AbortConfig {
    /// The status answered.
    #[schemars(range(min = 200))]
    http_status: u16,
    /// The body answered; may name variables (`$remote_addr`).
    #[schemars(length(min = 0))]
    body: Option<String>,
    /// Headers added to the answer; their values may name variables.
    headers: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    when: WhenConfig,
}

#[derive(Deserialize, JsonSchema)]
struct DelayConfig {
    /// The pause, in seconds.
    #[schemars(range(min = 0))]
    duration: f64,
    #[serde(flatten)]
    when: WhenConfig,
}

#[derive(Deserialize, JsonSchema)]
struct WhenConfig {
    /// The percentage of requests the fault happens to.
    #[schemars(range(min = 0, max = 100))]
    percentage: Option<u32>,
    /// Conditions (APISIX's `vars` expressions): the fault happens when any holds.
    vars: Option<Vec<Vec<Value>>>,
}

struct When {
    percentage: Option<u32>,
    /// Any of these holding (each an expression list) lets the fault happen.
    vars: Vec<Expr>,
}

impl When {
    fn new(c: WhenConfig) -> Result<When, String> {
        let vars = c.vars.into_iter().flatten().map(|v| Expr::compile(&Value::Array(v))).collect::<Result<_, _>>().map_err(|e| format!("vars: {e}"))?;
        Ok(When { percentage: c.percentage, vars })
    }

    fn holds(&self, ctx: &RequestCtx<'_>) -> bool {
        if !self.vars.is_empty() && !self.vars.iter().any(|e| e.eval(&crate::FilterVars(ctx))) {
            return false;
        }
        self.percentage.is_none_or(|p| fastrand::u32(1..=100) <= p)
    }
}

struct Abort {
    status: u16,
    body: Option<String>,
    headers: Vec<(http::HeaderName, String)>,
    when: When,
}

struct FaultInjection {
    abort: Option<Abort>,
    delay: Option<(Duration, When)>,
}

fn build(c: Config) -> Result<FaultInjection, String> {
    let abort = match c.abort {
        Some(a) => Some(Abort {
            status: a.http_status,
            body: a.body,
            headers: a
                .headers
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    let name = http::HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("abort.headers: {e}"))?;
                    Ok((name, v))
                })
                .collect::<Result<_, String>>()?,
            when: When::new(a.when)?,
        }),
        None => None,
    };
    let delay = match c.delay {
        Some(d) => {
            let pause = Duration::try_from_secs_f64(d.duration).map_err(|e| format!("delay.duration: {e}"))?;
            Some((pause, When::new(d.when)?))
        }
        None => None,
    };
    Ok(FaultInjection { abort, delay })
}

impl FaultInjection {
    fn abort(&self, ctx: &RequestCtx<'_>) -> Result<(), Reply> {
        let Some(a) = self.abort.as_ref().filter(|a| a.when.holds(ctx)) else { return Ok(()) };
        let body = a.body.as_ref().map(|b| Value::String(weir_core::text::substitute(b, |n| ctx.var(n))));
        let mut reply = Reply::new(a.status, body);
        for (name, value) in &a.headers {
            let value = weir_core::text::substitute(value, |n| ctx.var(n));
            if let Ok(v) = http::HeaderValue::from_str(&value) {
                reply.headers.push((name.clone(), v));
            }
        }
        Err(reply)
    }
}

impl Plugin for FaultInjection {
    fn rewrite_io(&self, ctx: &mut RequestCtx<'_>) -> Option<Pending> {
        let (pause, _) = self.delay.as_ref().filter(|(_, when)| when.holds(ctx))?;
        let pause = *pause;
        // Decided now, applied after the pause, as a delayed failure would be.
        let after = self.abort(ctx);
        Some(Box::pin(async move {
            tokio::time::sleep(pause).await;
            after.map(|()| Vec::new())
        }))
    }

    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        self.abort(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_build() {
        let conf = serde_json::json!({
            "abort": {"http_status": 403, "headers": {"x-a": "1"}, "percentage": 50, "vars": [[["arg_name", "==", "jack"]]]},
            "delay": {"duration": 0.5}
        });
        let f = build(crate::parse(&conf).unwrap()).unwrap();
        let a = f.abort.unwrap();
        assert_eq!((a.status, a.when.percentage, a.when.vars.len(), a.headers.len()), (403, Some(50), 1, 1));
        assert_eq!(f.delay.unwrap().0, Duration::from_millis(500));
        assert!(crate::parse::<Config>(&serde_json::json!({"abort": {}})).is_err());
    }
}
