//! `fault-injection`: delays requests, or answers them with a chosen status, for a percentage
//! of the traffic (and only where `vars` hold), to test how clients cope with failures.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use weir_core::expr::Expr;

use crate::{LegacyFactory, Factory, Pending, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    let vars = json!({"type": "array", "items": {"type": "array"}});
    LegacyFactory {
        name: "fault-injection",
        priority: 11000,
        schema: json!({"type": "object", "properties": {
            "abort": {"type": "object", "properties": {
                "http_status": {"type": "integer", "minimum": 200},
                "body": {"type": "string", "minLength": 0},
                "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                "percentage": {"type": "integer", "minimum": 0, "maximum": 100},
                "vars": vars
            }, "required": ["http_status"]},
            "delay": {"type": "object", "properties": {
                "duration": {"type": "number", "minimum": 0},
                "percentage": {"type": "integer", "minimum": 0, "maximum": 100},
                "vars": vars
            }, "required": ["duration"]}
        }, "minProperties": 1}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| Ok(Arc::new(build(conf)?)),
    }
    .into()
}

struct When {
    percentage: Option<u32>,
    /// Any of these holding (each an expression list) lets the fault happen.
    vars: Vec<Expr>,
}

impl When {
    fn parse(v: &Value) -> Result<When, String> {
        let vars = match v.get("vars").and_then(Value::as_array) {
            Some(list) => list.iter().map(Expr::compile).collect::<Result<_, _>>().map_err(|e| format!("vars: {e}"))?,
            None => Vec::new(),
        };
        Ok(When { percentage: v.get("percentage").and_then(Value::as_u64).map(|p| p as u32), vars })
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

fn build(conf: &Value) -> Result<FaultInjection, String> {
    let abort = match conf.get("abort") {
        Some(a) => Some(Abort {
            status: a.get("http_status").and_then(Value::as_u64).ok_or("abort.http_status is required")? as u16,
            body: a.get("body").and_then(Value::as_str).map(str::to_string),
            headers: a
                .get("headers")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    let name = http::HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("abort.headers: {e}"))?;
                    Ok((name, v.as_str().unwrap_or("").to_string()))
                })
                .collect::<Result<_, String>>()?,
            when: When::parse(a)?,
        }),
        None => None,
    };
    let delay = match conf.get("delay") {
        Some(d) => {
            let secs = d.get("duration").and_then(Value::as_f64).ok_or("delay.duration is required")?;
            Some((Duration::from_secs_f64(secs), When::parse(d)?))
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
