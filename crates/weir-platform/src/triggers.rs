//! Cron triggers: a function of an environment run on a schedule (5 or 6 cron fields, UTC).
//!
//! Every node that runs functions keeps the schedule of every trigger. At each tick the nodes
//! race to claim it with one compare-and-set on the trigger's state (`last tick` moves to the
//! tick, and the run is marked as running): one node wins and runs the function; the others see
//! the tick taken and do nothing. A tick that comes while the trigger's last run is still
//! running is skipped, so a slow run never overlaps the next; a run whose node died is given
//! up once its lease (the environment's wall-clock limit and a margin) is over.
//!
//! Keys:
//! - `{prefix}/platform/triggers/{gid}/{triggerId}`: the trigger;
//! - `{prefix}/platform/trigger-state/{gid}/{triggerId}`: its last tick and the run under way;
//! - `{prefix}/platform/trigger-runs/{gid}/{triggerId}/{slot:03}`: the last runs, in a ring.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use weir_core::error::ErrorKind;
use weir_functions::Request;
use weir_store::{Compare, Op, Txn, TxnOutcome};

use crate::Platform;
use crate::api::{Reply, bad_input, body, failure, json, not_found, store_down};
use crate::functions::FUNCTION_NAME;
use crate::tokens::Caller;

/// Runs kept per trigger.
pub const RUNS_KEPT: u64 = 100;
/// Triggers one gateway may have.
pub const TRIGGERS_PER_GATEWAY: usize = 100;
/// Ticks a gateway's triggers may have in one minute, all together (each counted in its
/// busiest minute), checked as a trigger is made: every tick is a claim and a run record
/// written to the store, so a gateway's schedule bounds its share of the store's writes
/// whatever its crons say.
pub const TICKS_PER_MINUTE: u32 = 120;
/// Attempts at creating a trigger while the gateway's other creations win the race.
const ATTEMPTS: usize = 32;
/// How often a node reads the triggers again.
const REFRESH: Duration = Duration::from_secs(1);

/// The largest body a trigger sends, as JSON: every node reads every trigger each `REFRESH`.
const MAX_BODY: usize = 16 * 1024;
/// How long past its wall-clock limit a run's claim holds.
const LEASE_MARGIN_MS: i64 = 5_000;
/// The most of a failed run's error a run record keeps (characters): a function's error or
/// answer may be megabytes, and every run of every trigger is written to the store.
const RUN_ERROR_CHARS: usize = 1024;

/// `POST /v1/api-gateways/{gid}/triggers`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTrigger {
    /// The function's bare name (`jobs/cleanup`).
    #[schemars(regex(pattern = FUNCTION_NAME), length(max = 256))]
    pub function: String,
    #[schemars(regex(pattern = "^(dev|staging|prod)$"))]
    pub environment: String,
    /// 5 fields (minute granularity) or 6 (seconds first), UTC.
    #[schemars(length(min = 1, max = 128))]
    pub cron: String,
    /// The body of every call (JSON).
    pub body: Option<Value>,
}

/// A trigger as stored and shown.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Trigger {
    pub trigger_id: String,
    pub function: String,
    pub environment: String,
    pub cron: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    pub created_at: String,
    pub created_by: String,
}

/// What the cluster knows of a trigger's runs.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
struct State {
    /// The last tick claimed (ms since the epoch).
    last_tick: i64,
    /// The run under way: its node and until when its claim holds (ms).
    running: Option<(String, i64)>,
    /// Runs finished so far (their ring slot).
    runs: u64,
}

/// One run of a trigger.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Run {
    /// The tick it ran for, its start and end (RFC 3339, milliseconds).
    pub tick: String,
    pub start: String,
    pub end: String,
    /// `ok`, or `error`.
    pub outcome: String,
    /// The status the function answered with, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// What went wrong, when something did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub node: String,
    pub duration_ms: f64,
}

/// Parses a 5- or 6-field cron expression.
pub fn parse_cron(text: &str) -> Result<croner::Cron, String> {
    let fields = text.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(format!("cron: {text:?} has {fields} fields; give 5 (minute first) or 6 (second first)"));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(text)
        .map_err(|e| format!("cron: {text:?}: {e}"))
}

/// The first tick of `cron` strictly after `after_ms` (ms since the epoch, UTC).
pub fn next_tick(cron: &croner::Cron, after_ms: i64) -> Option<i64> {
    let after = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(after_ms)?;
    cron.find_next_occurrence(&after, false).ok().map(|t| t.timestamp_millis())
}

/// The most ticks `cron` has in one minute. The seconds field is the same in every minute the
/// other fields match, so the first such minute after `now_ms` tells.
pub fn ticks_per_minute(cron: &croner::Cron, now_ms: i64) -> u32 {
    let Some(first) = next_tick(cron, now_ms) else { return 0 };
    let minute = first - first.rem_euclid(60_000);
    let mut n = 0;
    let mut at = minute - 1;
    while let Some(t) = next_tick(cron, at).filter(|t| *t < minute + 60_000) {
        n += 1;
        at = t;
    }
    n
}

/// `tr-` and 16 hex digits: what `create` makes.
fn is_trigger_id(id: &str) -> bool {
    id.strip_prefix("tr-").is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn rfc3339_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

fn encode<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("trigger documents serialize"))
}

impl Platform {
    fn triggers_dir(&self) -> String {
        format!("{}/platform/triggers/", self.prefix)
    }

    /// The key prefixes of everything kept of gateway `gid`'s triggers.
    pub(crate) fn trigger_prefixes(&self, gid: &str) -> [String; 3] {
        ["triggers", "trigger-state", "trigger-runs"].map(|d| format!("{}/platform/{d}/{gid}/", self.prefix))
    }

    /// Routes `/v1/api-gateways/{gid}/triggers...`.
    pub(crate) async fn triggers_api(&self, caller: &Caller, m: &http::Method, gid: &str, rest: &[&str], raw: &Bytes) -> Reply {
        use http::Method;
        if let Err(r) = self.gateway_rev(gid).await {
            return r;
        }
        let [defs, state, runs] = self.trigger_prefixes(gid);
        match (m, rest) {
            (&Method::POST, []) => self.create_trigger(caller, gid, raw).await,
            (&Method::GET, []) => match self.docs.store.list(&defs).await {
                Ok((kvs, _)) => {
                    let list: Vec<Trigger> = kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect();
                    json(StatusCode::OK, &json!({"list": list, "total": list.len()}))
                }
                Err(e) => store_down(e),
            },
            (_, [tid, ..]) if !is_trigger_id(tid) => not_found("trigger"),
            (&Method::GET, [tid]) => match self.trigger(gid, tid).await {
                Ok((t, _)) => json(StatusCode::OK, &serde_json::to_value(t).expect("a trigger serializes")),
                Err(r) => r,
            },
            (&Method::DELETE, [tid]) => {
                let (t, rev) = match self.trigger(gid, tid).await {
                    Ok(t) => t,
                    Err(r) => return r,
                };
                if !caller.writes_env(&t.environment) {
                    return crate::api::refuse(StatusCode::FORBIDDEN, &format!("this token may not change the {} environment", t.environment));
                }
                let txn = Txn {
                    compares: vec![Compare { key: format!("{defs}{tid}"), mod_revision: rev }],
                    ops: vec![Op::Delete { key: format!("{defs}{tid}") }, Op::Delete { key: format!("{state}{tid}") }, Op::DeletePrefix { prefix: format!("{runs}{tid}/") }],
                };
                match self.docs.store.txn(txn).await {
                    Ok(TxnOutcome::Committed { .. }) => json(StatusCode::OK, &json!({"deleted": tid})),
                    Ok(TxnOutcome::Conflict) => failure(ErrorKind::Conflict, "the trigger changed meanwhile; try again", Vec::new()),
                    Err(e) => store_down(e),
                }
            }
            (&Method::GET, [tid, "runs"]) => {
                if let Err(r) = self.trigger(gid, tid).await {
                    return r;
                }
                match self.docs.store.list(&format!("{runs}{tid}/")).await {
                    Ok((kvs, _)) => {
                        let mut list: Vec<Run> = kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect();
                        list.sort_by(|a, b| b.tick.cmp(&a.tick));
                        json(StatusCode::OK, &json!({"list": list, "total": list.len()}))
                    }
                    Err(e) => store_down(e),
                }
            }
            _ => crate::api::refuse(StatusCode::METHOD_NOT_ALLOWED, &format!("{m} is not allowed here")),
        }
    }

    async fn trigger(&self, gid: &str, tid: &str) -> Result<(Trigger, i64), Reply> {
        let key = format!("{}{tid}", self.trigger_prefixes(gid)[0]);
        match self.docs.store.get(&key).await.map_err(store_down)? {
            Some(kv) => serde_json::from_slice(&kv.value).map(|t| (t, kv.mod_revision)).map_err(|e| failure(ErrorKind::Internal, format!("stored trigger: {e}"), Vec::new())),
            None => Err(not_found("trigger")),
        }
    }

    async fn create_trigger(&self, caller: &Caller, gid: &str, raw: &Bytes) -> Reply {
        let input: CreateTrigger = match body(raw) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let ticks = match parse_cron(&input.cron) {
            Ok(cron) if next_tick(&cron, now_ms()).is_none() => return bad_input(vec![format!("cron: {:?} never fires", input.cron)]),
            Ok(cron) => ticks_per_minute(&cron, now_ms()),
            Err(e) => return bad_input(vec![e]),
        };
        let size = input.body.as_ref().map_or(0, |b| b.to_string().len());
        if size > MAX_BODY {
            return bad_input(vec![format!("body: {size} bytes, more than the {MAX_BODY} a trigger's body may hold")]);
        }
        if !caller.writes_env(&input.environment) {
            return crate::api::refuse(StatusCode::FORBIDDEN, &format!("this token may not change the {} environment", input.environment));
        }
        match self.read_optional(gid, &input.environment, &input.function).await {
            Ok(Some(_)) => {}
            Ok(None) => return bad_input(vec![format!("function: there is no function {}/{}", input.environment, input.function)]),
            Err(r) => return r,
        }
        let trigger = Trigger {
            trigger_id: format!("tr-{:016x}", fastrand::u64(..)),
            function: input.function,
            environment: input.environment,
            cron: input.cron,
            body: input.body,
            created_at: rfc3339_ms(now_ms()),
            created_by: caller.name(),
        };
        let dir = self.trigger_prefixes(gid)[0].clone();
        let key = format!("{dir}{}", trigger.trigger_id);
        // Creations of one gateway's triggers serialize on its quota record (rewritten as it
        // is), so that none passes the bound however many come at once.
        let mut counted: HashMap<String, u32> = HashMap::new();
        for _ in 0..ATTEMPTS {
            // Compared, so that a gateway deleted meanwhile takes no trigger (nor its id's
            // next owner).
            let gw_rev = match self.gateway_rev(gid).await {
                Ok(r) => r,
                Err(r) => return r,
            };
            let (guard, rewrite) = match self.counted(gid, crate::quota::Delta { functions: 0, added: 0, removed: 0 }).await {
                Ok(c) => c,
                Err(r) => return r,
            };
            let held: Vec<weir_store::KeyValue> = match self.docs.store.list(&dir).await {
                Ok((kvs, _)) => kvs.into_iter().filter(|kv| !kv.key[dir.len()..].contains('/')).collect(),
                Err(e) => return store_down(e),
            };
            if held.len() >= TRIGGERS_PER_GATEWAY {
                return failure(ErrorKind::Quota, format!("this gateway has {TRIGGERS_PER_GATEWAY} triggers, the most one may; delete one first"), Vec::new());
            }
            // Each trigger's ticks counted once, however many attempts this takes.
            let now = now_ms();
            let mut busy = 0;
            for kv in &held {
                let ticks = *counted.entry(kv.key.clone()).or_insert_with(|| {
                    serde_json::from_slice::<Trigger>(&kv.value).ok().and_then(|t| parse_cron(&t.cron).ok()).map_or(0, |c| ticks_per_minute(&c, now))
                });
                busy += ticks;
            }
            if busy + ticks > TICKS_PER_MINUTE {
                let why = format!("this trigger ticks up to {ticks} times a minute and the gateway's others {busy}: a gateway's triggers tick at most {TICKS_PER_MINUTE} times a minute in all");
                return failure(ErrorKind::Quota, why, Vec::new());
            }
            let txn = Txn { compares: vec![Compare { key: self.docs.key(gid), mod_revision: gw_rev }, Compare { key: key.clone(), mod_revision: 0 }, guard], ops: vec![Op::Put { key: key.clone(), value: encode(&trigger) }, rewrite] };
            match self.docs.store.txn(txn).await {
                Ok(TxnOutcome::Committed { .. }) => return json(StatusCode::CREATED, &serde_json::to_value(&trigger).expect("a trigger serializes")),
                Ok(TxnOutcome::Conflict) => continue,
                Err(e) => return store_down(e),
            }
        }
        failure(ErrorKind::Conflict, "the gateway's triggers kept changing meanwhile; try again", Vec::new())
    }

    /// Runs every trigger of every gateway on schedule, with the other nodes, for as long as
    /// the process lives. Nodes without function runtimes take no part. The triggers are
    /// listed once, then followed by the store's watch (listed again only when the watch is
    /// lost, at most once a second), so a node reads a trigger when it changes, not each tick.
    pub async fn schedule(self: Arc<Self>) {
        // Per trigger key: its cron, parsed, and the next tick this node will race for.
        let mut plan: HashMap<String, (croner::Cron, i64)> = HashMap::new();
        let mut watch: Option<tokio::sync::mpsc::Receiver<weir_store::WatchMessage>> = None;
        let mut relist_at = tokio::time::Instant::now();
        let dir = self.triggers_dir();
        let planned = |plan: &mut HashMap<String, (croner::Cron, i64)>, key: String, value: &[u8], now: i64| {
            // One that never fires stays planned for never, not searched again.
            match serde_json::from_slice::<Trigger>(value).ok().and_then(|t| parse_cron(&t.cron).ok()) {
                Some(cron) => {
                    let next = next_tick(&cron, now).unwrap_or(i64::MAX);
                    plan.insert(key, (cron, next));
                }
                None => {
                    plan.remove(&key);
                }
            }
        };
        loop {
            if self.functions.get().is_none() {
                tokio::time::sleep(REFRESH).await;
                continue;
            }
            if watch.is_none() && tokio::time::Instant::now() >= relist_at {
                relist_at = tokio::time::Instant::now() + REFRESH;
                match self.docs.store.list(&dir).await {
                    Ok((kvs, revision)) => {
                        let now = now_ms();
                        plan.clear();
                        for kv in kvs {
                            planned(&mut plan, kv.key, &kv.value, now);
                        }
                        // From just after what the list read: nothing between is missed.
                        watch = self.docs.store.watch(&dir, revision + 1).await.ok();
                    }
                    Err(e) => tracing::warn!(error = %e, "triggers: cannot read the schedule; kept the last one"),
                }
            }
            let now = now_ms();
            for (key, (cron, next)) in plan.iter_mut() {
                if *next <= now {
                    let tick = *next;
                    // Ticks missed while this node was busy or away are not made up for.
                    *next = next_tick(cron, now.max(tick)).unwrap_or(i64::MAX);
                    tokio::spawn(self.clone().fire(key.clone(), tick));
                }
            }
            let earliest = plan.values().map(|(_, n)| *n).min().unwrap_or(i64::MAX);
            let wait = Duration::from_millis(earliest.saturating_sub(now_ms()).clamp(0, REFRESH.as_millis() as i64) as u64);
            let wake = tokio::time::Instant::now() + wait;
            tokio::select! {
                _ = tokio::time::sleep_until(if watch.is_none() { wake.min(relist_at) } else { wake }) => {}
                got = async { match &mut watch { Some(w) => w.recv().await, None => std::future::pending().await } } => match got {
                    Some(weir_store::WatchMessage::Events { events, .. }) => {
                        let now = now_ms();
                        for e in events {
                            match e.kind {
                                weir_store::EventKind::Put => planned(&mut plan, e.kv.key, &e.kv.value, now),
                                weir_store::EventKind::Delete => {
                                    plan.remove(&e.kv.key);
                                }
                            }
                        }
                    }
                    // Lost (compacted, the store gone): listed afresh.
                    _ => watch = None,
                },
            }
        }
    }

    /// Races the other nodes for `tick` of the trigger at `key`; the winner runs it.
    async fn fire(self: Arc<Self>, key: String, tick: i64) {
        if let Err(e) = self.try_fire(&key, tick).await {
            tracing::warn!(trigger = %key, error = %e, "triggers: a tick failed");
        }
    }

    async fn try_fire(&self, key: &str, tick: i64) -> Result<(), weir_store::StoreError> {
        let Some(kv) = self.docs.store.get(key).await? else { return Ok(()) };
        let Ok(trigger) = serde_json::from_slice::<Trigger>(&kv.value) else { return Ok(()) };
        let Some(gid) = key.strip_prefix(&self.triggers_dir()).and_then(|r| r.split_once('/')).map(|(g, _)| g.to_string()) else { return Ok(()) };
        let [_, state_dir, runs_dir] = self.trigger_prefixes(&gid);
        let state_key = format!("{state_dir}{}", trigger.trigger_id);
        let (state, rev) = match self.docs.store.get(&state_key).await? {
            Some(kv) => (serde_json::from_slice::<State>(&kv.value).unwrap_or_default(), kv.mod_revision),
            None => (State::default(), 0),
        };
        let now = now_ms();
        if state.last_tick >= tick || state.running.as_ref().is_some_and(|(_, until)| *until > now) {
            // Taken by another node, or the last run is still under way: not this tick.
            return Ok(());
        }
        // A stopped gateway or environment serves none of its functions: its triggers wait.
        let wall = match self.docs.store.get(&weir_functions::live::env_key(&self.prefix, &gid, &trigger.environment)).await? {
            Some(kv) => match serde_json::from_slice::<weir_functions::live::EnvDoc>(&kv.value) {
                Ok(env) if !env.serving => return Ok(()),
                Ok(env) => env.limits.limits().wall.as_millis() as i64,
                Err(_) => 30_000,
            },
            None => return Ok(()),
        };
        let claimed = State { last_tick: tick, running: Some((self.node.clone(), now + wall + LEASE_MARGIN_MS)), runs: state.runs };
        let txn = Txn { compares: vec![Compare { key: key.to_string(), mod_revision: kv.mod_revision }, Compare { key: state_key.clone(), mod_revision: rev }], ops: vec![Op::Put { key: state_key.clone(), value: encode(&claimed) }] };
        if !matches!(self.docs.store.txn(txn).await?, TxnOutcome::Committed { .. }) {
            return Ok(());
        }
        let started = now_ms();
        let request = Request {
            method: "POST".into(),
            path: format!("/{}/{}", trigger.environment, trigger.function),
            query: Vec::new(),
            headers: vec![("content-type".into(), "application/json".into()), ("x-weir-trigger".into(), trigger.trigger_id.clone())],
            body: trigger.body.as_ref().map(Value::to_string),
            request_id: format!("{}-{tick}", trigger.trigger_id),
            user: None,
        };
        let (status, error) = match self.run_function(&gid, &trigger.environment, &trigger.function, request).await {
            Ok((mut outcome, env_doc)) => {
                let _held = std::mem::take(&mut outcome.hold);
                let (status, _, body) = weir_functions::live::answer(outcome, false, &env_doc.limits.limits());
                // Only the error's message is read of the body, never a tree of all of it.
                #[derive(serde::Deserialize)]
                struct Refusal {
                    error_msg: Option<String>,
                }
                let error = (status >= 500).then(|| serde_json::from_slice::<Refusal>(&body).ok().and_then(|r| r.error_msg).unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned()));
                (Some(status), error)
            }
            Err(reply) => (None, Some(format!("the function did not run ({})", reply.status()))),
        };
        let error = error.map(|e| match e.char_indices().nth(RUN_ERROR_CHARS) {
            Some((cut, _)) => format!("{}… ({} bytes in all)", &e[..cut], e.len()),
            None => e,
        });
        let ended = now_ms();
        let run = Run {
            tick: rfc3339_ms(tick),
            start: rfc3339_ms(started),
            end: rfc3339_ms(ended),
            outcome: if error.is_none() { "ok".into() } else { "error".into() },
            status,
            error,
            node: self.node.clone(),
            duration_ms: (ended - started) as f64,
        };
        // Release the claim and record the run; the state may only have changed by another
        // node taking over an expired claim, whose own record then stands beside this one.
        loop {
            let (state, rev) = match self.docs.store.get(&state_key).await? {
                Some(kv) => (serde_json::from_slice::<State>(&kv.value).unwrap_or_default(), kv.mod_revision),
                None => return Ok(()), // deleted meanwhile
            };
            let mine = state.running.as_ref().is_some_and(|(node, _)| *node == self.node) && state.last_tick == tick;
            let next = State { running: if mine { None } else { state.running.clone() }, runs: state.runs + 1, ..state.clone() };
            let slot = format!("{runs_dir}{}/{:03}", trigger.trigger_id, state.runs % RUNS_KEPT);
            let txn = Txn { compares: vec![Compare { key: state_key.clone(), mod_revision: rev }], ops: vec![Op::Put { key: state_key.clone(), value: encode(&next) }, Op::Put { key: slot, value: encode(&run) }] };
            if let TxnOutcome::Committed { .. } = self.docs.store.txn(txn).await? {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_and_six_fields_are_taken_and_others_refused() {
        assert!(parse_cron("*/5 * * * *").is_ok());
        assert!(parse_cron("* * * * * *").is_ok());
        assert!(parse_cron("* * * *").unwrap_err().contains("4 fields"));
        assert!(parse_cron("* * * * * * *").unwrap_err().contains("7 fields"));
        assert!(parse_cron("61 * * * *").is_err());
    }

    #[test]
    fn ticks_follow_the_expression_in_utc() {
        // 2030-01-01T00:00:00Z
        let t0 = 1_893_456_000_000;
        let every_second = parse_cron("* * * * * *").unwrap();
        assert_eq!(next_tick(&every_second, t0), Some(t0 + 1000));
        assert_eq!(next_tick(&every_second, t0 + 400), Some(t0 + 1000));
        let hourly = parse_cron("0 * * * *").unwrap();
        assert_eq!(next_tick(&hourly, t0), Some(t0 + 3_600_000));
        let at_noon = parse_cron("30 0 12 * * *").unwrap();
        assert_eq!(next_tick(&at_noon, t0), Some(t0 + 12 * 3_600_000 + 30_000));
    }

    #[test]
    fn a_cron_ticks_as_often_as_its_busiest_minute() {
        // 2030-01-01T00:00:30.5Z: half the minute gone, which changes no count.
        let now = 1_893_456_030_500;
        for (cron, n) in [
            ("* * * * * *", 60),
            ("*/2 * * * * *", 30),
            ("0,15,59 * * * * *", 3),
            ("10-20 0 12 * * *", 11),
            ("* * * * *", 1),
            ("0 0 1 1 *", 1),
            ("*/5 * * * *", 1),
        ] {
            assert_eq!(ticks_per_minute(&parse_cron(cron).unwrap(), now), n, "{cron}");
        }
    }
}
