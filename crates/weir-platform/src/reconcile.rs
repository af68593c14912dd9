//! The reconciler: moves each gateway's `phase` toward its `state`, one idempotent step at a
//! time, and keeps its generated objects in the store equal to what [`render`] says.
//!
//! A node works on a gateway only while it holds the gateway's lease (`lockedBy`, `lockedAt`,
//! taken and given back by compare-and-set on the gateway's document). A lease older than
//! `platform.lease_timeout` is free for any node to take, so the work of a node that died
//! mid-step is finished by another; since every step only makes the store hold what the
//! document says, repeating one does no harm.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Value, json};
use weir_store::{Compare, KeyValue, Op, StoreError, Txn, TxnOutcome};

use crate::Platform;
use crate::docs::Refused;
use crate::model::{ENVIRONMENTS, Environment, Gateway, Phase, State};
use crate::render::{self, KINDS, Object};

/// How long a render waits for this node's data plane while it is behind.
const BEHIND_BOUND: Duration = Duration::from_millis(50);

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What a step needs, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Give the gateway its environments.
    Create,
    /// Move to a phase with nothing to write.
    Enter(Phase),
    /// Make the store hold the rendered objects, then enter the phase.
    Render(Phase),
    /// Remove every object of the gateway, then the gateway.
    Delete,
}

/// What the reconciler reads of a gateway to know whether a step is due and who holds its
/// lease: a pass over every gateway reads this much of each document, neither decoding the rest
/// (variables, plugin layers) nor opening its secrets.
#[derive(serde::Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
struct Due {
    gateway_id: String,
    phase: Phase,
    state: State,
    generation: u64,
    rendered_generation: u64,
    #[serde(default)]
    rendered_with: String,
    retry_at: u64,
    locked_at: Option<u64>,
    locked_by: Option<String>,
}

impl Due {
    fn of(gw: &Gateway) -> Due {
        Due {
            gateway_id: gw.gateway_id.clone(),
            phase: gw.phase,
            state: gw.state,
            generation: gw.generation,
            rendered_generation: gw.rendered_generation,
            rendered_with: gw.rendered_with.clone(),
            retry_at: gw.retry_at,
            locked_at: gw.locked_at,
            locked_by: gw.locked_by.clone(),
        }
    }

    fn read(kv: &KeyValue) -> Option<Due> {
        serde_json::from_slice(&kv.value).map_err(|e| tracing::warn!(key = %kv.key, error = %e, "a gateway document cannot be read; skipped")).ok()
    }
}

/// `inputs` names the platform settings a render reads (`Platform::inputs`): a gateway
/// rendered with others (the operator changed `base_plugins`, say) is rendered again.
fn step_for(gw: &Due, inputs: &str) -> Option<Step> {
    let behind = gw.rendered_generation < gw.generation || gw.rendered_with != inputs;
    use Phase::*;
    match (gw.phase, gw.state) {
        (Deleting, _) => Some(Step::Delete),
        (Deleted, _) => None,
        (Creating, _) => Some(Step::Create),
        (Created | Stopped | Stopping, State::Running) => Some(Step::Enter(Starting)),
        (Starting, State::Running) => Some(Step::Render(Started)),
        (Started, State::Running) => behind.then_some(Step::Render(Started)),
        (Created | Starting | Started, State::Stopped) => Some(Step::Enter(Stopping)),
        (Stopping, State::Stopped) => Some(Step::Render(Stopped)),
        (Stopped, State::Stopped) => behind.then_some(Step::Render(Stopped)),
    }
}

/// The wait before retrying a step that failed `attempts` times: doubling from 200 ms, at most
/// 30 s.
fn backoff(attempts: u32) -> u64 {
    (200u64 << attempts.min(8)).min(30_000)
}

impl Platform {
    fn lease_ms(&self) -> u64 {
        self.cfg.lease_timeout * 1000
    }

    fn lease_free(&self, gw: &Due, now: u64) -> bool {
        match (&gw.locked_by, gw.locked_at) {
            (Some(by), Some(at)) => *by == self.node || now.saturating_sub(at) > self.lease_ms(),
            _ => true,
        }
    }

    /// Runs until the process ends. A gateway whose document changes (the store's watch says
    /// which) gets its due step at once; a full pass over every gateway runs at start, every
    /// second (for retries and leases that expire) and whenever the watch was lost, so a
    /// change costs in proportion to one gateway, not to all of them.
    pub async fn reconcile(self: Arc<Self>) {
        let mut watch: Option<tokio::sync::mpsc::Receiver<weir_store::WatchMessage>> = None;
        // A watch that ended is opened again after this, never in a tight loop.
        let mut rewatch_at = tokio::time::Instant::now();
        let mut next_full = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_full {
                match self.pass().await {
                    Ok(revision) if watch.is_none() && tokio::time::Instant::now() >= rewatch_at => {
                        // From just after what the pass read: nothing between is missed.
                        watch = self.docs.store.watch(&self.docs.dir, revision + 1).await.ok();
                        rewatch_at = tokio::time::Instant::now() + Duration::from_secs(1);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "platform: a reconcile pass failed; retried"),
                }
                next_full = tokio::time::Instant::now() + Duration::from_secs(1);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next_full) => {}
                // Without a watch, the API's own changes bring the next pass forward.
                _ = self.wake.notified(), if watch.is_none() => next_full = tokio::time::Instant::now(),
                got = async { match &mut watch { Some(w) => w.recv().await, None => std::future::pending().await } } => match got {
                    Some(weir_store::WatchMessage::Events { events, .. }) => {
                        for e in events.iter().filter(|e| e.kind == weir_store::EventKind::Put) {
                            if let Some(due) = Due::read(&e.kv) {
                                self.consider(&due).await;
                            }
                        }
                    }
                    _ => {
                        watch = None;
                        next_full = tokio::time::Instant::now();
                    }
                },
            }
        }
    }

    /// Runs the gateway's due step, if it has one, its retry pause is over and its lease is
    /// free. One gateway's trouble is recorded on it; the others go on.
    async fn consider(&self, gw: &Due) {
        let now = now_ms();
        if step_for(gw, &self.inputs).is_none() || gw.retry_at > now || !self.lease_free(gw, now) {
            return;
        }
        if let Err(e) = self.work(&gw.gateway_id).await {
            tracing::warn!(gateway = %gw.gateway_id, error = %e, "platform: a step failed");
        }
    }

    /// One pass: every gateway with a step due gets it, if its lease is free. Answers the
    /// store revision the gateways were read at.
    pub async fn pass(&self) -> Result<i64, StoreError> {
        self.passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (kvs, revision) = self.docs.store.list(&self.docs.dir).await?;
        for due in kvs.iter().filter_map(Due::read) {
            self.consider(&due).await;
        }
        Ok(revision)
    }

    /// Claims the gateway, runs its due step and records the outcome.
    async fn work(&self, gid: &str) -> Result<(), StoreError> {
        let now = now_ms();
        let claimed = self
            .docs
            .update(gid, |gw| {
                // Read afresh: a stale event must not cut a retry's pause short.
                let due = Due::of(gw);
                if !self.lease_free(&due, now) || step_for(&due, &self.inputs).is_none() || gw.retry_at > now {
                    return Err(());
                }
                gw.locked_by = Some(self.node.clone());
                gw.locked_at = Some(now);
                Ok(())
            })
            .await;
        let (mut gw, mut rev) = match claimed {
            Ok(claimed) => claimed,
            Err(Refused::Store(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        if let Some(pause) = self.pause_after_claim {
            tokio::time::sleep(pause).await;
        }
        // The step's writes commit only if the document is still as claimed: an owner's change
        // meanwhile means the step is run again on it; a lease lost to another node (this one
        // stalled past its lease) means this node stops.
        let (step, outcome) = loop {
            let Some(step) = step_for(&Due::of(&gw), &self.inputs) else { return self.release(gid, |_| {}).await };
            tracing::debug!(gateway = gid, ?step, node = %self.node, "platform: step");
            match self.run(step, &gw, rev).await {
                Err(Failed::Moved) => match self.docs.get(gid).await? {
                    Some((now, now_rev)) if now.locked_by.as_deref() == Some(self.node.as_str()) => (gw, rev) = (now, now_rev),
                    _ => return Ok(()),
                },
                Err(Failed::Step(e)) => break (step, Err(e)),
                Ok(written) => break (step, Ok(written)),
            }
        };
        if step == Step::Delete && outcome.is_ok() {
            return self.forget(gid).await;
        }
        let generation = gw.generation;
        let start_timeout = self.cfg.start_timeout * 1000;
        self.release(gid, |gw| {
            let now = now_ms();
            match &outcome {
                Ok(written) => {
                    gw.attempts = 0;
                    gw.retry_at = 0;
                    gw.reason = None;
                    let phase = match step {
                        Step::Create => {
                            for name in ENVIRONMENTS {
                                if gw.environment(name).is_none() {
                                    gw.environments.push(Environment::new(name));
                                }
                            }
                            Phase::Created
                        }
                        Step::Enter(p) => p,
                        Step::Render(p) => {
                            gw.rendered_generation = gw.rendered_generation.max(generation);
                            // A render that wrote nothing new leaves what the last one wrote.
                            gw.rendered_revision = gw.rendered_revision.max(*written);
                            gw.rendered_with = self.inputs.clone();
                            p
                        }
                        Step::Delete => Phase::Deleting,
                    };
                    if phase != gw.phase && gw.phase != Phase::Deleting {
                        gw.phase = phase;
                        gw.phase_since = now;
                        for env in &mut gw.environments {
                            env.phase = phase;
                        }
                    }
                }
                Err(e) => {
                    gw.attempts += 1;
                    gw.retry_at = now + backoff(gw.attempts);
                    gw.reason = Some(e.clone());
                    if gw.phase == Phase::Starting && now.saturating_sub(gw.phase_since) > start_timeout {
                        gw.state = State::Stopped;
                        gw.phase = Phase::Stopped;
                        gw.phase_since = now;
                        gw.reason = Some(format!("did not start within {} s: {e}", start_timeout / 1000));
                    }
                }
            }
        })
        .await
    }

    /// Gives the lease back, recording what `outcome` says, if this node still holds it.
    async fn release(&self, gid: &str, outcome: impl Fn(&mut Gateway)) -> Result<(), StoreError> {
        let released = self
            .docs
            .update(gid, |gw| {
                if gw.locked_by.as_deref() != Some(self.node.as_str()) {
                    return Err(());
                }
                gw.locked_by = None;
                gw.locked_at = None;
                outcome(gw);
                Ok(())
            })
            .await;
        match released {
            Err(Refused::Store(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Runs `step`; the newest revision it wrote of what the data plane serves (0: none).
    async fn run(&self, step: Step, gw: &Gateway, rev: i64) -> Result<i64, Failed> {
        match step {
            Step::Create | Step::Enter(_) => Ok(0),
            // What the render wrote is served here before the gateway is marked as started
            // (or a second passes), as a request's writes are answered. While this node's data
            // plane is behind (a render it did not serve within the bound), the renders wait
            // only briefly, so a pass over many gateways is not held a second for each.
            Step::Render(_) => {
                let (objects, live) = (render::render(&self.cfg, gw), render::live(&self.cfg, gw));
                let sync = self.sync(gw, rev, &objects, &live);
                let Some(applied) = self.applied.get() else {
                    let (out, written) = weir_store::settled::noting(sync).await;
                    return out.map(|()| written);
                };
                let behind = self.behind.load(std::sync::atomic::Ordering::Relaxed);
                let bound = if behind { BEHIND_BOUND } else { weir_store::settled::BOUND };
                let (out, settled) = weir_store::settled::settle_within(applied, bound, sync).await;
                self.behind.store(!settled.served, std::sync::atomic::Ordering::Relaxed);
                out.map(|()| settled.written)
            }
            Step::Delete => self.sync(gw, rev, &[], &[]).await.map(|()| 0),
        }
    }

    /// Removes the gateway's document once its objects are gone, if this node still holds it.
    /// Every token first loses the gateway, so a gateway made later under the same id is not
    /// seen by the tokens of the one deleted.
    async fn forget(&self, gid: &str) -> Result<(), StoreError> {
        let Some((gw, _)) = self.docs.get(gid).await? else { return Ok(()) };
        if gw.locked_by.as_deref() != Some(self.node.as_str()) {
            return Ok(());
        }
        self.revoke_gateway(gid).await?;
        if let Some((gw, rev)) = self.docs.get(gid).await?
            && gw.locked_by.as_deref() == Some(self.node.as_str())
        {
            let mut claims: Vec<Op> = crate::api::domains(&gw).iter().map(|host| Op::Delete { key: format!("{}/platform/domains/{host}", self.prefix) }).collect();
            // Its functions go with it.
            claims.push(Op::DeletePrefix { prefix: weir_functions::live::partition_prefix(&self.prefix, gid) });
            claims.push(Op::Delete { key: self.quota_key(gid) });
            claims.extend(self.gateway_grant_removal(gid).await?);
            claims.extend(self.lifecycle_prefixes(gid).into_iter().chain(self.trigger_prefixes(gid)).map(|prefix| Op::DeletePrefix { prefix }));
            // Its databases go before its document: a gateway made later under the same id
            // must find none of them, and a failure here leaves the deletion to be retried.
            self.drop_databases(&gw).await.map_err(|e| StoreError::Unavailable(format!("gateway {gid}'s databases could not be removed: {e}")))?;
            self.docs.remove(gid, rev, claims).await?;
            tracing::info!(gateway = gid, "platform: gateway deleted");
        }
        Ok(())
    }

    /// Takes gateway `gid` out of every token's gateways.
    async fn revoke_gateway(&self, gid: &str) -> Result<(), StoreError> {
        let dir = format!("{}/platform/tokens/", self.prefix);
        let (kvs, _) = self.docs.store.list(&dir).await?;
        for mut kv in kvs {
            while let Ok(mut token) = serde_json::from_slice::<crate::tokens::Token>(&kv.value) {
                if !token.gateways.iter().any(|g| g == gid) {
                    break;
                }
                token.gateways.retain(|g| g != gid);
                let value = Bytes::from(serde_json::to_vec(&token).expect("a token serializes"));
                let txn = Txn { compares: vec![Compare { key: kv.key.clone(), mod_revision: kv.mod_revision }], ops: vec![Op::Put { key: kv.key.clone(), value }] };
                if let TxnOutcome::Committed { .. } = self.docs.store.txn(txn).await? {
                    break;
                }
                // Changed meanwhile (or revoked): read it again.
                match self.docs.store.get(&kv.key).await? {
                    Some(now) => kv = now,
                    None => break,
                }
            }
        }
        Ok(())
    }

    /// Makes the store hold exactly `objects` among gateway `gw`'s: each checked through the
    /// catalog, and all written (and every other object of the gateway removed) in one
    /// transaction that commits only while the gateway's document is at `rev`. The data plane
    /// never sees half a gateway.
    pub(crate) async fn sync(&self, gw: &Gateway, rev: i64, objects: &[Object], live: &[weir_functions::live::EnvDoc]) -> Result<(), Failed> {
        let gid = &gw.gateway_id;
        let store = &self.docs.store;
        let failed = |e: String| Failed::Step(e);
        let mut existing: HashMap<String, KeyValue> = HashMap::new();
        for kind in KINDS {
            let dir = format!("{}/{kind}/{}", self.prefix, render::id_prefix(gid));
            let (kvs, _) = store.list(&dir).await.map_err(|e| failed(e.to_string()))?;
            existing.extend(kvs.into_iter().map(|kv| (kv.key.clone(), kv)));
        }
        let now = (now_ms() / 1000) as i64;
        let mut wanted = Vec::new();
        let mut ops = Vec::new();
        for kind in KINDS {
            let Some(registered) = self.catalog.get(kind) else { return Err(failed(format!("no kind {kind} in the catalog"))) };
            for obj in objects.iter().filter(|o| o.kind == kind) {
                let key = registered.key(&self.prefix, None, &obj.id);
                let mut value = obj.value.clone();
                value["id"] = json!(obj.id);
                self.catalog.check(registered, &value, self.plugins.as_ref()).map_err(|errors| failed(format!("{kind}/{}: {}", obj.id, errors.join("; "))))?;
                let old = existing.get(&key).and_then(|kv| serde_json::from_slice::<Value>(&kv.value).ok()).map(|mut old| {
                    if let Value::Object(obj) = &mut old {
                        // Compared in the clear: a sealed value is sealed afresh each time.
                        let _ = registered.open(obj, &self.docs.keyring);
                        let _ = weir_catalog::sealing::open(&self.docs.keyring, registered.plugins(), obj);
                    }
                    old
                });
                let unchanged = old.as_ref().is_some_and(|old| without_times(old) == value);
                wanted.push(key.clone());
                if unchanged {
                    continue;
                }
                // Stored as the Admin API stores it: the kind's and the plugins' secrets sealed.
                // What is compared above is the plain object; the stored one opens to it.
                if let Value::Object(obj) = &mut value {
                    registered.seal(obj, &self.docs.keyring).map_err(failed)?;
                    weir_catalog::sealing::seal(&self.docs.keyring, self.plugins.as_ref(), registered.plugins(), obj);
                }
                let created = old.as_ref().and_then(|o| o.get("create_time")).and_then(Value::as_i64).unwrap_or(now);
                value["create_time"] = json!(created);
                value["update_time"] = json!(now);
                ops.push(Op::Put { key, value: Bytes::from(value.to_string()) });
            }
        }
        // What the function routes read of each environment, its plugins sealed as a plugin
        // config's are.
        let holder = self.catalog.get("plugin_configs").ok_or_else(|| failed("no kind plugin_configs in the catalog".into()))?;
        let env_dir = format!("{}env/", weir_functions::live::partition_prefix(&self.prefix, gid));
        let (stored_envs, _) = store.list(&env_dir).await.map_err(|e| failed(e.to_string()))?;
        for doc in live {
            let key = weir_functions::live::env_key(&self.prefix, gid, &doc.environment);
            let old = stored_envs.iter().find(|kv| kv.key == key).and_then(|kv| serde_json::from_slice::<weir_functions::live::EnvDoc>(&kv.value).ok()).map(|mut old| {
                let mut holder_obj = json!({"plugins": old.plugins}).as_object().cloned().unwrap_or_default();
                let _ = weir_catalog::sealing::open(&self.docs.keyring, holder.plugins(), &mut holder_obj);
                old.plugins = holder_obj.remove("plugins").and_then(|p| p.as_object().cloned()).unwrap_or_default();
                let mut vars = Value::Object(std::mem::take(&mut old.vars));
                let _ = self.docs.keyring.open_fields(&mut vars);
                old.vars = vars.as_object().cloned().unwrap_or_default();
                old
            });
            if old.as_ref() == Some(doc) {
                continue;
            }
            let mut sealed = doc.clone();
            let mut holder_obj = json!({"plugins": doc.plugins}).as_object().cloned().unwrap_or_default();
            weir_catalog::sealing::seal(&self.docs.keyring, self.plugins.as_ref(), holder.plugins(), &mut holder_obj);
            sealed.plugins = holder_obj.remove("plugins").and_then(|p| p.as_object().cloned()).unwrap_or_default();
            // The gateway's secret variables, sealed as in its document.
            for var in gw.env.iter().filter(|v| v.secret) {
                if let Some(v) = sealed.vars.get_mut(&var.name) {
                    *v = Value::String(self.docs.keyring.seal_field(&var.value));
                }
            }
            ops.push(Op::Put { key, value: Bytes::from(serde_json::to_vec(&sealed).expect("an environment serializes")) });
        }
        for kv in &stored_envs {
            if !live.iter().any(|d| weir_functions::live::env_key(&self.prefix, gid, &d.environment) == kv.key) {
                ops.push(Op::Delete { key: kv.key.clone() });
            }
        }
        // Deletes after puts, routes before the plugin configs they name.
        for kind in KINDS.iter().rev() {
            let dir = format!("{}/{kind}/", self.prefix);
            let mut gone: Vec<&String> = existing.keys().filter(|k| k.starts_with(&dir) && !wanted.contains(k)).collect();
            gone.sort();
            ops.extend(gone.into_iter().map(|key| Op::Delete { key: key.clone() }));
        }
        if ops.is_empty() {
            return Ok(());
        }
        let txn = Txn { compares: vec![Compare { key: self.docs.key(gid), mod_revision: rev }], ops };
        match store.txn(txn).await.map_err(|e| failed(e.to_string()))? {
            TxnOutcome::Committed { .. } => Ok(()),
            TxnOutcome::Conflict => Err(Failed::Moved),
        }
    }
}

/// Why a step did not finish.
#[derive(Debug)]
pub(crate) enum Failed {
    /// The gateway's document changed since it was claimed: look again.
    Moved,
    /// The step failed; it is retried after a pause.
    Step(String),
}

fn without_times(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("create_time");
        o.remove("update_time");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PlatformConfig;

    fn platform(dir: &std::path::Path, cfg: PlatformConfig) -> Arc<Platform> {
        let store = Arc::new(weir_store::EmbeddedStore::open(dir).unwrap());
        let keyring = Arc::new(weir_tls::Keyring::new(&["a secret for this test".to_string()]));
        let plugins = Arc::new(weir_plugins::registry());
        Platform::new(cfg, store, "/apisix", Arc::new(weir_catalog::Catalog::apisix()), plugins, keyring)
    }

    /// A gateway document as a step left it, written straight to the store.
    async fn put(p: &Platform, gw: &Gateway) {
        p.docs.store.put(&p.docs.key(&gw.gateway_id), p.docs.encode(gw)).await.unwrap();
    }

    fn starting(gid: &str) -> Gateway {
        let mut gw: Gateway = serde_json::from_value(json!({
            "gatewayId": gid, "name": gid, "plugins": {}, "customDomains": [], "promotionPipeline": {"enabled": false},
            "state": "Running", "phase": "Starting", "environments": [], "reason": null, "createdAt": 0, "updatedAt": 0,
            "lockedAt": null, "lockedBy": null, "generation": 1, "renderedGeneration": 0, "phaseSince": 0, "attempts": 0, "retryAt": 0
        }))
        .unwrap();
        gw.environments = ENVIRONMENTS.iter().map(|e| Environment::new(e)).collect();
        gw.phase_since = now_ms();
        gw
    }

    #[tokio::test]
    async fn a_failing_step_is_retried_with_its_reason_and_starting_too_long_stops_the_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let p = platform(dir.path(), PlatformConfig { start_timeout: 1, ..PlatformConfig::default() });
        // A layer no plugin check accepts, as if written before the checks that refuse it.
        let mut gw = starting("broken");
        gw.plugins.insert("limit-count".into(), json!({"count": "many"}));
        put(&p, &gw).await;
        p.pass().await.unwrap();
        let (after, _) = p.docs.get("broken").await.unwrap().unwrap();
        assert_eq!((after.phase, after.attempts, after.locked_by.clone()), (Phase::Starting, 1, None));
        assert!(after.reason.as_deref().is_some_and(|r| r.contains("limit-count")), "{:?}", after.reason);
        assert!(after.retry_at > now_ms(), "the next try waits");
        // Past start_timeout, the next failure sets it Stopped, saying why.
        let mut old = after.clone();
        old.phase_since = now_ms() - 5_000;
        old.retry_at = 0;
        put(&p, &old).await;
        p.pass().await.unwrap();
        let (stopped, _) = p.docs.get("broken").await.unwrap().unwrap();
        assert_eq!((stopped.state, stopped.phase), (State::Stopped, Phase::Stopped));
        assert!(stopped.reason.as_deref().is_some_and(|r| r.starts_with("did not start within 1 s")), "{:?}", stopped.reason);
    }

    #[tokio::test]
    async fn the_reconciler_follows_the_store_without_spinning() {
        let dir = tempfile::tempdir().unwrap();
        let p = platform(dir.path(), PlatformConfig::default());
        tokio::spawn(p.clone().reconcile());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let idle = p.passes();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(p.passes() - idle <= 1, "idle, it passes once a second at most: {} passes in 500 ms", p.passes() - idle);
        // A gateway written by another node (no call to this one) is picked up from the
        // watch, well before the next tick.
        let mut gw = starting("watched");
        gw.phase = Phase::Creating;
        gw.environments.clear();
        let started = std::time::Instant::now();
        put(&p, &gw).await;
        loop {
            let (now, _) = p.docs.get("watched").await.unwrap().unwrap();
            if now.phase != Phase::Creating {
                break;
            }
            assert!(started.elapsed() < Duration::from_millis(900), "the watch wakes the reconciler before its tick");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn new_platform_settings_reach_gateways_already_started() {
        let dir = tempfile::tempdir().unwrap();
        let pc = |p: &Arc<Platform>| {
            let p = p.clone();
            async move {
                let kv = p.docs.store.get("/apisix/plugin_configs/wp.kept.dev").await.unwrap().unwrap();
                serde_json::from_slice::<Value>(&kv.value).unwrap()["plugins"].clone()
            }
        };
        {
            let p = platform(dir.path(), PlatformConfig::default());
            put(&p, &starting("kept")).await;
            p.pass().await.unwrap();
            assert_eq!(p.docs.get("kept").await.unwrap().unwrap().0.phase, Phase::Started);
            assert!(pc(&p).await.get("cors").is_some());
        }
        // Restarted with another base layer: the next pass renders the gateway again.
        let base = json!({"request-id": {}}).as_object().unwrap().clone();
        let p = platform(dir.path(), PlatformConfig { base_plugins: base, ..PlatformConfig::default() });
        p.pass().await.unwrap();
        let plugins = pc(&p).await;
        assert!(plugins.get("request-id").is_some() && plugins.get("cors").is_none(), "{plugins}");
    }

    #[tokio::test]
    async fn a_lease_held_by_another_node_is_left_alone_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let p = platform(dir.path(), PlatformConfig { lease_timeout: 2, ..PlatformConfig::default() });
        let mut gw = starting("leased");
        gw.locked_by = Some("another-node".into());
        gw.locked_at = Some(now_ms());
        put(&p, &gw).await;
        p.pass().await.unwrap();
        let (held, _) = p.docs.get("leased").await.unwrap().unwrap();
        assert_eq!((held.phase, held.locked_by.as_deref()), (Phase::Starting, Some("another-node")));
        let (routes, _) = p.docs.store.list("/apisix/routes/").await.unwrap();
        assert!(routes.is_empty(), "nothing was written under another node's lease");
        // Expired: taken over and finished.
        gw.locked_at = Some(now_ms() - 3_000);
        put(&p, &gw).await;
        p.pass().await.unwrap();
        let (done, _) = p.docs.get("leased").await.unwrap().unwrap();
        assert_eq!((done.phase, done.locked_by), (Phase::Started, None));
        let (routes, _) = p.docs.store.list("/apisix/routes/wp.leased.").await.unwrap();
        assert_eq!(routes.len(), 7, "the base route and two per environment");
    }

    #[test]
    fn every_phase_moves_toward_the_state() {
        let mut gw: Gateway = serde_json::from_value(json!({
            "gatewayId": "g1", "name": "g", "plugins": {}, "customDomains": [], "promotionPipeline": {"enabled": false},
            "state": "Running", "phase": "Creating", "environments": [], "reason": null, "createdAt": 0, "updatedAt": 0,
            "lockedAt": null, "lockedBy": null, "generation": 1, "renderedGeneration": 0, "phaseSince": 0, "attempts": 0, "retryAt": 0
        }))
        .unwrap();
        let path = |gw: &mut Gateway| {
            let mut seen = vec![gw.phase];
            while let Some(step) = step_for(&Due::of(gw), "") {
                gw.phase = match step {
                    Step::Create => Phase::Created,
                    Step::Enter(p) | Step::Render(p) => p,
                    Step::Delete => Phase::Deleted,
                };
                gw.rendered_generation = gw.generation;
                seen.push(gw.phase);
            }
            seen
        };
        use Phase::*;
        assert_eq!(path(&mut gw), [Creating, Created, Starting, Started]);
        gw.state = State::Stopped;
        assert_eq!(path(&mut gw), [Started, Stopping, Stopped]);
        gw.state = State::Running;
        assert_eq!(path(&mut gw), [Stopped, Starting, Started]);
        gw.generation += 1;
        assert_eq!(step_for(&Due::of(&gw), ""), Some(Step::Render(Started)));
        gw.rendered_generation = gw.generation;
        assert_eq!(step_for(&Due::of(&gw), ""), None);
        assert_eq!(step_for(&Due::of(&gw), "other settings"), Some(Step::Render(Started)), "new platform settings render again");
        gw.phase = Deleting;
        assert_eq!(path(&mut gw), [Deleting, Deleted]);
        assert_eq!(backoff(0), 200);
        assert_eq!(backoff(20), 30_000);
    }
}
