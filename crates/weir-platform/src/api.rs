//! The platform API under `/v1/` on the admin listener: gateways and their environments.
//!
//! Every answer is JSON. Every failure has one envelope, made in one place ([`failure`]):
//! `{"error": {"kind", "message", "problems": [...]}}`, with every problem found listed. A body
//! is checked in full before anything is stored: against the schema derived from its type (all
//! problems at once), then each plugin layer and the merged result through the catalog, the
//! same door as the Admin API's.

use std::collections::BTreeSet;

use bytes::Bytes;
use http::request::Parts;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use weir_admin::Role;
use weir_core::error::ErrorKind;
use weir_store::{Compare, Op, Txn, TxnOutcome};

use crate::Platform;
use crate::model::{CreateGateway, ENVIRONMENTS, GATEWAY_ID, Gateway, PatchEnvironment, PatchGateway, Phase, State};
use crate::reconcile::now_ms;
use crate::render;
use crate::tokens::{self, Caller, CreateToken, Token, TokenRole};

pub type Reply = Response<Full<Bytes>>;

/// The most tokens one token may make.
const MAX_TOKENS_MADE: usize = 1000;

/// The one place a failure becomes a response.
pub fn failure(kind: ErrorKind, message: impl Into<String>, problems: Vec<String>) -> Reply {
    let status = StatusCode::from_u16(kind.api_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(status, &json!({"error": {"kind": kind.name(), "message": message.into(), "problems": problems}}))
}

/// A call without a valid admin key or token.
pub(crate) fn unauthorized() -> Reply {
    refuse(StatusCode::UNAUTHORIZED, "a valid admin key or platform token is required")
}

/// The refusals that are not about input, which carry their own status.
pub(crate) fn refuse(status: StatusCode, message: &str) -> Reply {
    let kind = match status {
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        StatusCode::BAD_REQUEST => "bad_input",
        StatusCode::NOT_FOUND => "not_found",
        _ => "refused",
    };
    json(status, &json!({"error": {"kind": kind, "message": message, "problems": []}}))
}

pub fn json(status: StatusCode, body: &Value) -> Reply {
    let mut resp = Response::new(Full::new(Bytes::from(serde_json::to_vec(body).expect("JSON values serialize"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

pub(crate) fn not_found(what: &str) -> Reply {
    failure(ErrorKind::NotFound, format!("{what} not found"), Vec::new())
}

pub(crate) fn bad_input(problems: Vec<String>) -> Reply {
    failure(ErrorKind::BadInput, "invalid request", problems)
}

pub(crate) fn store_down(e: impl std::fmt::Display + weir_core::error::Kinded) -> Reply {
    failure(e.kind(), e.to_string(), Vec::new())
}

/// A body checked against `T`'s derived schema, every problem listed, then parsed.
pub(crate) fn body<T: DeserializeOwned + JsonSchema>(raw: &Bytes) -> Result<T, Reply> {
    let value: Value = serde_json::from_slice(raw).map_err(|e| bad_input(vec![format!("body: not JSON: {e}")]))?;
    let mut settings = SchemaSettings::draft07();
    settings.inline_subschemas = true;
    let schema = settings.into_generator().into_root_schema_for::<T>().to_value();
    let validator = jsonschema::validator_for(&schema).map_err(|e| failure(ErrorKind::Internal, format!("schema: {e}"), Vec::new()))?;
    let problems: Vec<String> = validator.iter_errors(&value).map(|e| problem(&e)).collect();
    if !problems.is_empty() {
        return Err(bad_input(problems));
    }
    serde_json::from_value(value).map_err(|e| bad_input(vec![e.to_string()]))
}

fn problem(e: &jsonschema::ValidationError<'_>) -> String {
    let path = e.instance_path().to_string();
    let at = if path.is_empty() { "body".to_string() } else { path.trim_start_matches('/').replace('/', ".") };
    format!("{at}: {}", weir_catalog::message(e))
}

impl Platform {
    /// Answers a `/v1/` call the admin listener passed on.
    pub(crate) async fn answer(&self, parts: Parts, raw: Bytes, role: Option<Role>) -> Reply {
        let caller = match self.authenticate(&parts, role).await {
            Ok(c) => c,
            Err(r) => return r,
        };
        let reads = parts.method == Method::GET;
        if !reads && (matches!(caller, Caller::AdminViewer) || caller.role() == Some(TokenRole::Viewer)) {
            return refuse(StatusCode::FORBIDDEN, "this key may only read");
        }
        let path = parts.uri.path().trim_end_matches('/');
        let segs: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
        let m = &parts.method;
        // A gateway the caller may not see does not exist, whatever is asked of it.
        if let ["api-gateways", gid, ..] = segs.as_slice()
            && !caller.sees(gid)
        {
            return not_found("gateway");
        }
        match (m, segs.as_slice()) {
            (&Method::POST, ["api-gateways"]) if !caller.owns() => refuse(StatusCode::FORBIDDEN, "only an owner may create gateways"),
            (&Method::POST, ["api-gateways"]) => self.create(&caller, &raw).await,
            (&Method::GET, ["api-gateways"]) => self.list(&caller).await,
            (&Method::GET, ["api-gateways", gid]) => self.show(gid).await,
            (&Method::PATCH | &Method::DELETE, ["api-gateways", _]) if !caller.owns() => refuse(StatusCode::FORBIDDEN, "only an owner may change a gateway"),
            (&Method::PATCH, ["api-gateways", gid]) => self.patch(gid, &raw).await,
            (&Method::DELETE, ["api-gateways", gid]) => self.delete(gid).await,
            (&Method::GET, ["api-gateways", gid, "environments"]) => self.environments(gid).await,
            (&Method::GET, ["api-gateways", gid, "environments", env]) => self.environment(gid, env).await,
            (&Method::PATCH, ["api-gateways", _, "environments", env]) if !caller.writes_env(env) => {
                refuse(StatusCode::FORBIDDEN, &format!("this token may not change the {env} environment"))
            }
            (&Method::PATCH, ["api-gateways", gid, "environments", env]) => self.patch_environment(gid, env, &raw).await,
            (&Method::GET, ["api-gateways", gid, "environments", env, "effective-plugins"]) => self.effective(&caller, gid, env).await,
            (&Method::POST, ["tokens"]) => self.create_token(&caller, &raw).await,
            (&Method::GET, ["tokens"]) => self.list_tokens(&caller).await,
            (&Method::GET, ["whoami"]) => json(StatusCode::OK, &caller.describe()),
            (&Method::GET, ["openapi.json"]) => json(StatusCode::OK, &crate::openapi::document()),
            (&Method::DELETE, ["tokens", id]) => self.delete_token(&caller, id).await,
            (&Method::GET, ["api-gateways", gid, "deployments"]) => self.deployments(gid, parts.uri.query()).await,
            (&Method::GET, ["api-gateways", gid, "grants"]) => self.gateway_grants(gid, None).await,
            (&Method::GET, ["api-gateways", gid, "environments", env, "grants"]) => self.gateway_grants(gid, Some(env)).await,
            (m, ["applications", rest @ ..]) => self.applications_api(&caller, m, rest, parts.uri.query(), &raw).await,
            (m, ["api-gateways", gid, "database", rest @ ..]) => self.database_api(&caller, m, gid, rest, parts.uri.query(), &raw).await,
            (m, ["api-gateways", gid, "triggers", rest @ ..]) => self.triggers_api(&caller, m, gid, rest, &raw).await,
            (m, ["api-gateways", gid, "functions", rest @ ..]) => self.functions_api(&caller, m, gid, rest, parts.uri.query(), &raw).await,
            (_, ["api-gateways" | "tokens", ..]) => refuse(StatusCode::METHOD_NOT_ALLOWED, &format!("{m} is not allowed here")),
            _ => refuse(StatusCode::NOT_FOUND, "not found"),
        }
    }

    /// The caller: an admin key the listener checked, or a platform token looked up by its
    /// hash. An unknown, expired or malformed token gets the same answer as none.
    async fn authenticate(&self, parts: &Parts, role: Option<Role>) -> Result<Caller, Reply> {
        let refused = || refuse(StatusCode::UNAUTHORIZED, "a valid admin key or platform token is required");
        match role {
            Some(Role::Admin) => return Ok(Caller::Admin("admin".into())),
            Some(Role::Viewer) => return Ok(Caller::AdminViewer),
            None => {}
        }
        let Some(presented) = tokens::bearer(parts) else { return Err(refused()) };
        let key = self.token_key(&tokens::hash(presented));
        let kv = match self.docs.store.get(&key).await {
            Ok(Some(kv)) => kv,
            Ok(None) => return Err(refused()),
            Err(e) => return Err(store_down(e)),
        };
        let Ok(token) = serde_json::from_slice::<Token>(&kv.value) else { return Err(refused()) };
        if token.expires.is_some_and(|at| at <= (now_ms() / 1000) as i64) {
            return Err(refused());
        }
        Ok(Caller::Token { token, key })
    }

    fn token_key(&self, hash: &str) -> String {
        format!("{}/platform/tokens/{hash}", self.prefix)
    }

    async fn create(&self, caller: &Caller, raw: &Bytes) -> Reply {
        let input: CreateGateway = match body(raw) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let now = now_ms();
        let mut gw = Gateway {
            gateway_id: input.gateway_id.clone().unwrap_or_else(generated_id),
            name: input.name,
            plugins: input.plugins.unwrap_or_default(),
            custom_domains: input.custom_domains.unwrap_or_default(),
            promotion_pipeline: input.promotion_pipeline.unwrap_or_default(),
            state: State::Running,
            phase: Phase::Creating,
            environments: Vec::new(),
            reason: None,
            created_at: now / 1000,
            updated_at: now / 1000,
            locked_at: None,
            locked_by: None,
            generation: 1,
            rendered_generation: 0,
            rendered_revision: 0,
            rendered_with: String::new(),
            incarnation: format!("{:016x}", fastrand::u64(..)),
            phase_since: now,
            attempts: 0,
            retry_at: 0,
            limits: weir_functions::LimitsDoc::default(),
            fetch_allow_list: input.fetch_allow_list.unwrap_or_default(),
            env: input.env.unwrap_or_default(),
            database_isolation: input.database_isolation.unwrap_or_default(),
            db_limits: weir_functions::DbLimits::default(),
        };
        if let Some(l) = input.limits {
            apply_limits(&mut gw, l);
        }
        if let Err(problems) = self.check(&gw) {
            return bad_input(problems);
        }
        // A generated id that is taken is drawn again; a chosen one is a conflict.
        for _ in 0..8 {
            // The hosts the platform gives it must not be ones the operator serves.
            let base = &self.cfg.base_domain;
            let own: Vec<String> = std::iter::once(format!("{}.{base}", gw.gateway_id)).chain(ENVIRONMENTS.iter().map(|e| format!("{}.{e}.{base}", gw.gateway_id))).collect();
            match self.operators_host(&own.iter().collect::<Vec<_>>(), false).await {
                Ok(None) => {}
                Ok(Some(_)) if input.gateway_id.is_none() => {
                    gw.gateway_id = generated_id();
                    continue;
                }
                Ok(Some(host)) => return failure(ErrorKind::Conflict, format!("gateway id {}: the host {host} is the operator's", gw.gateway_id), vec![format!("gatewayId: {host} is the operator's")]),
                Err(r) => return r,
            }
            match self.create_owned(caller, &gw).await {
                Ok(true) => {
                    self.wake.notify_one();
                    return json(StatusCode::CREATED, &gw.shown());
                }
                Ok(false) if input.gateway_id.is_none() => gw.gateway_id = generated_id(),
                Ok(false) => return failure(ErrorKind::Conflict, format!("gateway {} already exists", gw.gateway_id), Vec::new()),
                Err(r) => return r,
            }
        }
        failure(ErrorKind::Conflict, "no free gateway id was found", Vec::new())
    }

    /// Stores a new gateway with its custom domains' claims and, when an owner token makes
    /// it, its place in the token's gateways, all in one transaction. `Ok(false)` when its id
    /// is taken.
    async fn create_owned(&self, caller: &Caller, gw: &Gateway) -> Result<bool, Reply> {
        let gw_key = self.docs.key(&gw.gateway_id);
        loop {
            let mut compares = vec![Compare { key: gw_key.clone(), mod_revision: 0 }];
            let mut ops = vec![Op::Put { key: gw_key.clone(), value: self.docs.encode(gw) }];
            if let Caller::Token { key, .. } = caller {
                let Some(kv) = self.docs.store.get(key).await.map_err(store_down)? else { return Err(refuse(StatusCode::UNAUTHORIZED, "the token was revoked")) };
                let mut token: Token = serde_json::from_slice(&kv.value).map_err(|e| failure(ErrorKind::Internal, e.to_string(), Vec::new()))?;
                if token.gateways.len() >= self.cfg.max_gateways_per_owner {
                    let limit = self.cfg.max_gateways_per_owner;
                    return Err(failure(ErrorKind::Quota, format!("this token holds {limit} gateways, the most one owner may (platform.max_gateways_per_owner)"), Vec::new()));
                }
                token.gateways.push(gw.gateway_id.clone());
                compares.push(Compare { key: key.clone(), mod_revision: kv.mod_revision });
                ops.push(Op::Put { key: key.clone(), value: Bytes::from(serde_json::to_vec(&token).expect("a token serializes")) });
            }
            self.claim_domains(&gw.gateway_id, &BTreeSet::new(), &domains(gw), &mut compares, &mut ops).await?;
            match self.docs.store.txn(Txn { compares, ops }).await.map_err(store_down)? {
                TxnOutcome::Committed { .. } => return Ok(true),
                // The id is taken, or the token or a domain changed meanwhile: look again.
                TxnOutcome::Conflict if self.docs.store.get(&gw_key).await.map_err(store_down)?.is_some() => return Ok(false),
                TxnOutcome::Conflict => {}
            }
        }
    }

    fn domain_key(&self, host: &str) -> String {
        format!("{}/platform/domains/{host}", self.prefix)
    }

    /// The first of `hosts` the operator's own objects serve: a route's host, or with
    /// `certificates` a certificate's SNI. Such a host is not a tenant's to take. (The hosts
    /// the platform names under its base domain are checked against routes only: a wildcard
    /// certificate there is how the operator serves every gateway over TLS.)
    async fn operators_host<'h>(&self, hosts: &[&'h String], certificates: bool) -> Result<Option<&'h String>, Reply> {
        if hosts.is_empty() {
            return Ok(None);
        }
        let kinds: &[(&str, [&str; 2])] = if certificates { &[("routes", ["hosts", "host"]), ("ssls", ["snis", "sni"])] } else { &[("routes", ["hosts", "host"])] };
        for (dir, fields) in kinds {
            let (objects, _) = self.docs.store.list(&format!("{}/{dir}/", self.prefix)).await.map_err(store_down)?;
            for kv in objects {
                let Ok(object) = serde_json::from_slice::<Value>(&kv.value) else { continue };
                if weir_catalog::managed_by(&object).is_some() {
                    continue;
                }
                let patterns = object.get(fields[0]).and_then(Value::as_array).cloned().unwrap_or_default().into_iter().chain(object.get(fields[1]).cloned());
                for pattern in patterns.filter_map(|p| p.as_str().map(str::to_string)) {
                    if let Some(host) = hosts.iter().find(|h| crate::guard::host_matches(&pattern, h)) {
                        return Ok(Some(host));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Adds to a transaction the claims on the custom domains `after` has and `before` had
    /// not, and gives back those it no longer has. A domain another gateway holds is a
    /// conflict: two tenants never share a host.
    async fn claim_domains(&self, gid: &str, before: &BTreeSet<String>, after: &BTreeSet<String>, compares: &mut Vec<Compare>, ops: &mut Vec<Op>) -> Result<(), Reply> {
        let added: Vec<&String> = after.difference(before).collect();
        let reserved = added.iter().find(|h| {
            let h = h.to_ascii_lowercase();
            // As an operator may write it: any case, a trailing dot, a leading `*.` or `.`.
            self.cfg.reserved_domains.iter().map(|d| d.trim_end_matches('.').trim_start_matches("*.").trim_start_matches('.').to_ascii_lowercase()).any(|d| !d.is_empty() && (h == d || h.ends_with(&format!(".{d}"))))
        });
        if let Some(host) = reserved {
            return Err(failure(ErrorKind::Conflict, format!("the domain {host} is the operator's (platform.reserved_domains)"), vec![format!("customDomains: {host} is reserved")]));
        }
        if let Some(host) = self.operators_host(&added, true).await? {
            return Err(failure(ErrorKind::Conflict, format!("the domain {host} is the operator's"), vec![format!("customDomains: {host} is taken")]));
        }
        for host in added {
            let key = self.domain_key(host);
            match self.docs.store.get(&key).await.map_err(store_down)? {
                Some(kv) if serde_json::from_slice::<Value>(&kv.value).ok().and_then(|v| v["gatewayId"].as_str().map(str::to_string)).as_deref() != Some(gid) => {
                    return Err(failure(ErrorKind::Conflict, format!("the domain {host} is used by another gateway"), vec![format!("customDomains: {host} is taken")]));
                }
                Some(kv) => compares.push(Compare { key, mod_revision: kv.mod_revision }),
                None => {
                    compares.push(Compare { key: key.clone(), mod_revision: 0 });
                    ops.push(Op::Put { key, value: Bytes::from(json!({"gatewayId": gid}).to_string()) });
                }
            }
        }
        for host in before.difference(after) {
            ops.push(Op::Delete { key: self.domain_key(host) });
        }
        Ok(())
    }

    async fn list(&self, caller: &Caller) -> Reply {
        match self.docs.list(|gid| caller.sees(gid)).await {
            Ok((all, _)) => {
                let list: Vec<Value> = all.iter().map(|(g, _)| g.shown()).collect();
                json(StatusCode::OK, &json!({"list": list, "total": list.len()}))
            }
            Err(e) => store_down(e),
        }
    }

    async fn find(&self, gid: &str) -> Result<Gateway, Reply> {
        if !valid_id(gid) {
            return Err(not_found("gateway"));
        }
        match self.docs.get(gid).await {
            Ok(Some((gw, _))) => Ok(gw),
            Ok(None) => Err(not_found("gateway")),
            Err(e) => Err(store_down(e)),
        }
    }

    async fn show(&self, gid: &str) -> Reply {
        match self.find(gid).await {
            Ok(gw) => json(StatusCode::OK, &gw.shown()),
            Err(r) => r,
        }
    }

    /// Applies an owner's change to a gateway: checked in full on the changed gateway, stored
    /// by compare-and-set, then the reconciler is woken.
    /// `checked`: whether the changed gateway must pass today's checks. Stopping and deleting
    /// are never refused for a gateway that no longer would (the operator denied a plugin it
    /// uses, say).
    async fn change(&self, gid: &str, checked: bool, edit: impl Fn(&mut Gateway) -> Result<(), Reply>) -> Result<Gateway, Reply> {
        if !valid_id(gid) {
            return Err(not_found("gateway"));
        }
        loop {
            let Some((mut gw, rev)) = self.docs.get(gid).await.map_err(store_down)? else { return Err(not_found("gateway")) };
            if gw.phase == Phase::Deleting {
                return Err(failure(ErrorKind::Conflict, "the gateway is being deleted", Vec::new()));
            }
            let before = domains(&gw);
            edit(&mut gw)?;
            if checked {
                self.check(&gw).map_err(bad_input)?;
            }
            gw.generation += 1;
            gw.updated_at = now_ms() / 1000;
            let key = self.docs.key(gid);
            let mut compares = vec![Compare { key: key.clone(), mod_revision: rev }];
            let mut ops = vec![Op::Put { key, value: self.docs.encode(&gw) }];
            self.claim_domains(gid, &before, &domains(&gw), &mut compares, &mut ops).await?;
            if let TxnOutcome::Committed { revision, .. } = self.docs.store.txn(Txn { compares, ops }).await.map_err(store_down)? {
                self.wake.notify_one();
                // Hosts taken or given up move between gateways' partitions: the answer then
                // waits for every change up to it, others' included.
                self.rendered(&gw, revision, before != domains(&gw)).await;
                return Ok(gw);
            }
        }
    }

    /// Waits until the reconciler has rendered the change `gw` holds (committed at `revision`),
    /// or a step on the gateway failed, or it is gone, for at most the bound an Admin API write
    /// waits for ([`weir_store::settled::BOUND`]). As that write's answer, an owner's change is
    /// answered once this node serves it: the render itself waits for this node's data plane.
    /// Only where this node has a data plane to serve it; a gateway waiting out a failed step's
    /// pause is answered at once.
    async fn rendered(&self, gw: &Gateway, revision: i64, whole: bool) {
        let Some(applied) = self.applied.get() else { return };
        // A deletion is answered as accepted (202), not once done.
        if gw.retry_at > now_ms() || gw.phase == Phase::Deleting {
            return;
        }
        let key = self.docs.key(&gw.gateway_id);
        let wait = async {
            let Ok(mut watch) = self.docs.store.watch(&key, revision + 1).await else { return };
            while let Some(weir_store::WatchMessage::Events { events, .. }) = watch.recv().await {
                for e in events.iter().filter(|e| e.kv.key == key) {
                    let Ok(now) = self.docs.decode(&e.kv) else { return };
                    if now.rendered_generation >= gw.generation {
                        // Rendered, by this node or another: then served here.
                        // What it rendered lies in its partition, or is served with the
                        // revision it was seen at.
                        let mut applied = applied.clone();
                        let partition = [weir_functions::live::partition_prefix(&self.prefix, &gw.gateway_id)];
                        let keys = (!whole).then_some(&partition[..]);
                        let _ = applied.wait_for(|a| a.serves(now.rendered_revision, keys)).await;
                        return;
                    }
                    if now.attempts > gw.attempts {
                        return;
                    }
                }
            }
        };
        if tokio::time::timeout(weir_store::settled::BOUND, wait).await.is_err() {
            tracing::debug!(gateway = %gw.gateway_id, generation = gw.generation, "a gateway's change is answered before it is rendered");
        }
    }

    async fn patch(&self, gid: &str, raw: &Bytes) -> Reply {
        let input: PatchGateway = match body(raw) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let only_stops = input.name.is_none() && input.plugins.is_none() && input.custom_domains.is_none() && input.promotion_pipeline.is_none() && input.limits.is_none() && input.fetch_allow_list.is_none() && input.env.is_none() && input.state != Some(State::Running);
        let changed = self
            .change(gid, !only_stops, |gw| {
                if let Some(n) = &input.name {
                    gw.name = n.clone();
                }
                if let Some(p) = &input.plugins {
                    gw.plugins = p.clone();
                }
                if let Some(d) = &input.custom_domains {
                    gw.custom_domains = d.clone();
                }
                if let Some(p) = input.promotion_pipeline {
                    gw.promotion_pipeline = p;
                }
                if let Some(s) = input.state {
                    gw.state = s;
                }
                if let Some(l) = input.limits {
                    apply_limits(gw, l);
                }
                if let Some(a) = &input.fetch_allow_list {
                    gw.fetch_allow_list = a.clone();
                }
                if let Some(e) = &input.env {
                    gw.env = e.clone();
                }
                Ok(())
            })
            .await;
        match changed {
            Ok(gw) => json(StatusCode::OK, &gw.shown()),
            Err(r) => r,
        }
    }

    async fn delete(&self, gid: &str) -> Reply {
        let changed = self
            .change(gid, false, |gw| {
                gw.phase = Phase::Deleting;
                gw.phase_since = now_ms();
                gw.attempts = 0;
                gw.retry_at = 0;
                Ok(())
            })
            .await;
        match changed {
            Ok(gw) => json(StatusCode::ACCEPTED, &gw.shown()),
            Err(r) => r,
        }
    }

    async fn environments(&self, gid: &str) -> Reply {
        match self.find(gid).await {
            Ok(gw) => {
                let list: Vec<Value> = gw.environments.iter().map(|e| serde_json::to_value(e).expect("serializes")).collect();
                json(StatusCode::OK, &json!({"list": list, "total": list.len()}))
            }
            Err(r) => r,
        }
    }

    async fn environment(&self, gid: &str, env: &str) -> Reply {
        match self.find(gid).await {
            Ok(gw) => match gw.environment(env) {
                Some(e) => json(StatusCode::OK, &serde_json::to_value(e).expect("serializes")),
                None => not_found("environment"),
            },
            Err(r) => r,
        }
    }

    async fn patch_environment(&self, gid: &str, env: &str, raw: &Bytes) -> Reply {
        let input: PatchEnvironment = match body(raw) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let changed = self
            .change(gid, true, |gw| {
                let Some(e) = gw.environments.iter_mut().find(|e| e.name == env) else { return Err(not_found("environment")) };
                if let Some(p) = &input.plugins {
                    e.plugins = p.clone();
                }
                if let Some(a) = input.auth_type {
                    e.auth_type = a;
                }
                if let Some(d) = &input.custom_domain {
                    e.custom_domain = d.clone();
                }
                if let Some(s) = input.state {
                    e.state = s;
                }
                if let Some(u) = &input.upstream {
                    e.upstream = u.clone().map(Value::Object);
                }
                Ok(())
            })
            .await;
        match changed {
            Ok(gw) => json(StatusCode::OK, &serde_json::to_value(gw.environment(env).expect("just changed")).expect("serializes")),
            Err(r) => r,
        }
    }

    async fn effective(&self, caller: &Caller, gid: &str, env: &str) -> Reply {
        let gw = match self.find(gid).await {
            Ok(gw) => gw,
            Err(r) => return r,
        };
        let Some(e) = gw.environment(env) else { return not_found("environment") };
        let plugins: Vec<Value> = render::effective(&self.cfg, &gw, e)
            .into_iter()
            .map(|(name, mut config, layer)| {
                // The base layer is the operator's: its secrets are shown to admin keys alone.
                if layer == "base" && !matches!(caller, Caller::Admin(_)) {
                    self.redact(&name, &mut config);
                }
                json!({"name": name, "layer": layer, "config": config})
            })
            .collect();
        json(StatusCode::OK, &json!({"environment": env, "plugins": plugins}))
    }

    async fn create_token(&self, caller: &Caller, raw: &Bytes) -> Reply {
        let input: CreateToken = match body(raw) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let mut problems = Vec::new();
        let expires = match input.expires_at.as_deref().map(tokens::parse_time).transpose() {
            Ok(e) => e,
            Err(p) => {
                problems.push(p);
                None
            }
        };
        if expires.is_some_and(|at| at <= (now_ms() / 1000) as i64) {
            problems.push("expiresAt: already past".into());
        }
        // An owner hands out lesser roles on its own gateways; an admin key anything.
        let gateways = match caller {
            Caller::Admin(_) => input.gateways.clone().unwrap_or_default(),
            Caller::Token { token, .. } if token.role == TokenRole::Owner => {
                if input.role == TokenRole::Owner {
                    return refuse(StatusCode::FORBIDDEN, "an owner token may not make owner tokens");
                }
                let asked = input.gateways.clone().unwrap_or_else(|| token.gateways.clone());
                if let Some(g) = asked.iter().find(|g| !token.gateways.contains(g)) {
                    // Not the caller's: it does not exist, as far as the caller may know.
                    problems.push(format!("gateways: no gateway {g}"));
                }
                asked
            }
            _ => return refuse(StatusCode::FORBIDDEN, "only an admin key or an owner token may make tokens"),
        };
        // A token made by a token lives no longer than its maker, and no maker makes more than
        // MAX_TOKENS_MADE.
        let mut expires = expires;
        let mut expires_at = input.expires_at.clone();
        if let Caller::Token { token: maker, .. } = caller
            && let Some(limit) = maker.expires
            && expires.is_none_or(|e| e > limit)
        {
            // Shown as it is: the maker's end.
            expires = Some(limit);
            expires_at = Some(tokens::rfc3339(limit));
        }
        // Each gateway must exist and not be on its way out, and stay so until the token is
        // stored (the transaction compares their documents, and the maker's): a token never
        // outlives a deletion to see a gateway made later under the same id. A document the
        // reconciler moved meanwhile is read again.
        for _ in 0..64 {
            let mut compares = Vec::new();
            for g in gateways.iter().filter(|g| valid_id(g)) {
                match self.docs.store.get(&self.docs.key(g)).await {
                    Ok(Some(kv)) if self.docs.decode(&kv).is_ok_and(|gw| gw.phase != Phase::Deleting) => {
                        compares.push(Compare { key: kv.key, mod_revision: kv.mod_revision });
                    }
                    Ok(_) => problems.push(format!("gateways: no gateway {g}")),
                    Err(e) => return store_down(e),
                }
            }
            // The maker is rewritten as it is: its makings serialize, so none passes
            // MAX_TOKENS_MADE however many come at once, and its deletion takes every one.
            let mut rewrite = None;
            if let Caller::Token { key: maker_key, .. } = caller {
                match self.docs.store.get(maker_key).await {
                    Ok(Some(kv)) => {
                        compares.push(Compare { key: kv.key.clone(), mod_revision: kv.mod_revision });
                        rewrite = Some(Op::Put { key: kv.key, value: kv.value });
                    }
                    Ok(None) => return unauthorized(),
                    Err(e) => return store_down(e),
                }
                match self.manageable(caller).await {
                    Ok(made) if made.len() >= MAX_TOKENS_MADE => {
                        return failure(ErrorKind::Quota, format!("this token has made {MAX_TOKENS_MADE} tokens, the most one may"), Vec::new());
                    }
                    Ok(_) => {}
                    Err(r) => return r,
                }
            }
            if !problems.is_empty() {
                return bad_input(problems);
            }
            let (secret, hash) = tokens::mint();
            let token = Token {
                id: hash[..16].to_string(),
                name: input.name.clone(),
                role: input.role,
                gateways: gateways.clone(),
                expires_at: expires_at.clone(),
                expires,
                created_at: now_ms() / 1000,
                created_by: caller.name(),
            };
            let key = self.token_key(&hash);
            compares.push(Compare { key: key.clone(), mod_revision: 0 });
            let mut ops = vec![Op::Put { key, value: Bytes::from(serde_json::to_vec(&token).expect("a token serializes")) }];
            ops.extend(rewrite);
            match self.docs.store.txn(Txn { compares, ops }).await {
                Ok(TxnOutcome::Committed { .. }) => {
                    let mut shown = token.shown();
                    shown["token"] = json!(secret);
                    return json(StatusCode::CREATED, &shown);
                }
                Ok(TxnOutcome::Conflict) => {}
                Err(e) => return store_down(e),
            }
        }
        failure(ErrorKind::Conflict, "the gateways or the maker kept changing while the token was made; try again", Vec::new())
    }

    /// The tokens a caller may manage: all of them for an admin key, those it made for an
    /// owner token.
    async fn manageable(&self, caller: &Caller) -> Result<Vec<(String, Token)>, Reply> {
        let mine = match caller {
            Caller::Admin(_) | Caller::AdminViewer => None,
            Caller::Token { token, .. } if token.role == TokenRole::Owner => Some(caller.name()),
            _ => return Err(refuse(StatusCode::FORBIDDEN, "only an admin key or an owner token may see tokens")),
        };
        let dir = format!("{}/platform/tokens/", self.prefix);
        let (kvs, _) = self.docs.store.list(&dir).await.map_err(store_down)?;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| Some((kv.key.clone(), serde_json::from_slice::<Token>(&kv.value).ok()?)))
            .filter(|(_, t)| mine.as_ref().is_none_or(|m| t.created_by == *m))
            .collect())
    }

    async fn list_tokens(&self, caller: &Caller) -> Reply {
        match self.manageable(caller).await {
            Ok(all) => {
                let list: Vec<Value> = all.iter().map(|(_, t)| t.shown()).collect();
                json(StatusCode::OK, &json!({"list": list, "total": list.len()}))
            }
            Err(r) => r,
        }
    }

    async fn delete_token(&self, caller: &Caller, id: &str) -> Reply {
        let all = match self.manageable(caller).await {
            Ok(all) => all,
            Err(r) => return r,
        };
        let Some((key, token)) = all.into_iter().find(|(_, t)| t.id == id) else { return not_found("token") };
        // The tokens it made go with it: every one, since a token's making rewrites its maker
        // (compared here), so none is made between the list and the deletion.
        let maker = format!("token:{}", token.id);
        for _ in 0..64 {
            let rev = match self.docs.store.get(&key).await {
                Ok(Some(kv)) => kv.mod_revision,
                Ok(None) => return not_found("token"),
                Err(e) => return store_down(e),
            };
            let made = match self.manageable(&Caller::Admin("admin".into())).await {
                Ok(all) => all.into_iter().filter(|(_, t)| t.created_by == maker).map(|(k, _)| Op::Delete { key: k }),
                Err(r) => return r,
            };
            let mut ops = vec![Op::Delete { key: key.clone() }];
            ops.extend(made);
            match self.docs.store.txn(Txn { compares: vec![Compare { key: key.clone(), mod_revision: rev }], ops }).await {
                Ok(TxnOutcome::Committed { .. }) => return json(StatusCode::OK, &token.shown()),
                Ok(TxnOutcome::Conflict) => continue,
                Err(e) => return store_down(e),
            }
        }
        failure(ErrorKind::Conflict, "the token kept making tokens meanwhile; try again", Vec::new())
    }

    /// Hides the plugin's secret fields (`encrypt_fields`, dotted paths) in `config`.
    fn redact(&self, plugin: &str, config: &mut Value) {
        let fields = self.plugins.config_schema(plugin).and_then(|s| s.get("encrypt_fields")).and_then(Value::as_array).cloned().unwrap_or_default();
        for path in fields.iter().filter_map(Value::as_str) {
            let mut at = &mut *config;
            let mut parts = path.split('.').peekable();
            while let Some(part) = parts.next() {
                if parts.peek().is_none() {
                    if let Some(v) = at.get_mut(part) {
                        *v = json!("******");
                    }
                    break;
                }
                match at.get_mut(part) {
                    Some(next) => at = next,
                    None => break,
                }
            }
        }
    }

    /// Every problem with a gateway as it would be stored: each plugin layer on its own, each
    /// environment's upstream, then every object it renders to, all through the catalog.
    pub(crate) fn check(&self, gw: &Gateway) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let holder = self.catalog.get("plugin_configs").expect("the catalog has plugin_configs");
        let mut layer = |what: String, plugins: &Map<String, Value>| {
            crate::guard::layer(&self.cfg, &what, plugins, &mut problems);
            let candidate = json!({"id": "check", "plugins": plugins});
            if let Err(errors) = self.catalog.check(holder, &candidate, self.plugins.as_ref()) {
                problems.extend(errors.into_iter().map(|e| format!("{what}: {e}")));
            }
        };
        layer("plugins (gateway layer)".into(), &gw.plugins);
        for env in &gw.environments {
            layer(format!("environments.{}.plugins (environment layer)", env.name), &env.plugins);
        }
        // The base domain's names are the platform's to give; a custom domain is one gateway's.
        let base = self.cfg.base_domain.to_ascii_lowercase();
        let mut seen = BTreeSet::new();
        let named = gw.custom_domains.iter().map(|d| ("customDomains".to_string(), d)).chain(gw.environments.iter().filter_map(|e| e.custom_domain.as_ref().map(|d| (format!("environments.{}.customDomain", e.name), d))));
        for (field, host) in named {
            let host = host.to_ascii_lowercase();
            if host == base || host.ends_with(&format!(".{base}")) {
                problems.push(format!("{field}: {host} is under the platform's base domain {base}"));
            }
            if !seen.insert(host.clone()) {
                problems.push(format!("{field}: {host} is given twice"));
            }
            crate::guard::domain(&field, &host, &mut problems);
        }
        let max = &self.cfg.functions.max_limits;
        let l = &gw.limits;
        for (field, asked, most) in [("timeoutMs", l.timeout_ms, max.timeout_ms), ("wallMs", l.wall_ms, max.wall_ms), ("memoryMiB", l.memory_mib, max.memory_mib), ("concurrency", l.concurrency as u64, max.concurrency as u64)] {
            if asked > most {
                problems.push(format!("limits.{field}: {asked} is over this node's maximum of {most}"));
            }
        }
        // Each environment's document holds the variables and the upstream it reads, and one
        // transaction writes every environment's: bounded in all, so that transaction always
        // fits the store (etcd takes 1.5 MiB at most).
        // Counted as stored, as JSON: a control character is six bytes there.
        let vars: usize = gw.env.iter().map(|v| v.name.len() + serde_json::to_vec(&v.value).map_or(0, |b| b.len() - 2)).sum();
        if vars > crate::guard::MAX_VARS_BYTES {
            problems.push(format!("env: {vars} bytes of names and values as JSON, more than the {} a gateway's variables may hold", crate::guard::MAX_VARS_BYTES));
        }
        let mut names = BTreeSet::new();
        for (i, var) in gw.env.iter().enumerate() {
            if !names.insert(var.name.as_str()) {
                problems.push(format!("env.{i}.name: {} is given twice", var.name));
            }
            crate::guard::sealed_mark(&format!("env.{i}.value"), &Value::String(var.value.clone()), &mut problems);
            if let Some(envs) = &var.environments {
                if envs.is_empty() {
                    problems.push(format!("env.{i}.environments: name at least one environment, or leave it out for all"));
                }
                for (j, e) in envs.iter().enumerate() {
                    if !crate::model::ENVIRONMENTS.contains(&e.as_str()) {
                        problems.push(format!("env.{i}.environments.{j}: {e:?} is not one of {}", crate::model::ENVIRONMENTS.join(", ")));
                    } else if envs[..j].contains(e) {
                        problems.push(format!("env.{i}.environments.{j}: {e} is given twice"));
                    }
                }
            }
        }
        for (i, entry) in gw.fetch_allow_list.iter().enumerate() {
            let ok = entry.rsplit_once(':').map(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)).unwrap_or(false) && !entry.contains('/') && !entry.contains('@');
            if !ok {
                problems.push(format!("fetchAllowList.{i}: {entry:?} is not host:port"));
            }
        }
        let upstreams = self.catalog.get("upstreams").expect("the catalog has upstreams");
        for env in &gw.environments {
            if let Some(up) = &env.upstream {
                let size = serde_json::to_vec(up).map_or(0, |v| v.len());
                if size > crate::guard::MAX_LAYER_BYTES {
                    problems.push(format!("environments.{}.upstream: {size} bytes, more than the {} an upstream may hold", env.name, crate::guard::MAX_LAYER_BYTES));
                }
                crate::guard::upstream(&self.cfg, &format!("environments.{}.upstream", env.name), up, &mut problems);
                let mut candidate = up.clone();
                candidate["id"] = json!("check");
                if let Err(errors) = self.catalog.check(upstreams, &candidate, self.plugins.as_ref()) {
                    problems.extend(errors.into_iter().map(|e| format!("environments.{}.upstream: {e}", env.name)));
                }
            }
        }
        if problems.is_empty() {
            for obj in render::render(&self.cfg, gw) {
                let Some(kind) = self.catalog.get(obj.kind) else { continue };
                let mut value = obj.value;
                value["id"] = json!(obj.id);
                if let Err(errors) = self.catalog.check(kind, &value, self.plugins.as_ref()) {
                    problems.extend(errors.into_iter().map(|e| format!("merged {} {}: {e}", obj.kind, obj.id)));
                }
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }
}

fn apply_limits(gw: &mut Gateway, l: crate::model::LimitsInput) {
    let to = &mut gw.limits;
    if let Some(v) = l.timeout_ms {
        to.timeout_ms = v;
    }
    if let Some(v) = l.wall_ms {
        to.wall_ms = v;
    }
    if let Some(v) = l.memory_mib {
        to.memory_mib = v;
    }
    if let Some(v) = l.concurrency {
        to.concurrency = v;
    }
    let db = &mut gw.db_limits;
    for (field, given) in [(&mut db.documents, l.db_documents), (&mut db.bytes, l.db_bytes), (&mut db.query_ms, l.db_query_ms)] {
        if given.is_some() {
            *field = given;
        }
    }
}

/// Every custom domain of a gateway and its environments, as hosts are compared: lower case.
pub(crate) fn domains(gw: &Gateway) -> BTreeSet<String> {
    gw.custom_domains.iter().chain(gw.environments.iter().filter_map(|e| e.custom_domain.as_ref())).map(|d| d.to_ascii_lowercase()).collect()
}

fn valid_id(gid: &str) -> bool {
    gid.len() <= 40 && regex_lite_match(gid)
}

/// `GATEWAY_ID` by hand: one letter or digit, then letters, digits or `-`, ending in a letter
/// or digit, 3 to 40 long.
fn regex_lite_match(gid: &str) -> bool {
    let b = gid.as_bytes();
    let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    b.len() >= 3 && edge(b[0]) && edge(b[b.len() - 1]) && b.iter().all(|&c| edge(c) || c == b'-')
}

fn generated_id() -> String {
    let id = format!("gw-{:08x}", fastrand::u32(..));
    debug_assert!(regex_lite_match(&id), "{id} matches {GATEWAY_ID}");
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_ids_are_dns_labels() {
        let re = regex_lite_match;
        assert!(re("shop") && re("a-1") && re(&generated_id()));
        assert!(!re("ab") && !re("-ab") && !re("ab-") && !re("Shop") && !re("a.b") && !re("a_b"));
    }

    #[test]
    fn a_body_lists_every_problem() {
        let raw = Bytes::from(json!({"name": "", "gatewayId": "Bad_Id", "customDomains": ["ok.test", "no spaces"], "extra": 1}).to_string());
        let reply = body::<CreateGateway>(&raw).err().unwrap();
        assert_eq!(reply.status(), StatusCode::BAD_REQUEST);
        let bytes = futures_body(reply);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let problems: Vec<String> = v["error"]["problems"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems.iter().any(|p| p.starts_with("name:")));
        assert!(problems.iter().any(|p| p.starts_with("gatewayId:")));
        assert!(problems.iter().any(|p| p.starts_with("customDomains.1:")));
        assert!(problems.iter().any(|p| p.contains("extra")));
        assert_eq!(v["error"]["kind"], "bad_input");
    }

    fn futures_body(reply: Reply) -> Bytes {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async { reply.into_body().collect().await.unwrap().to_bytes() })
    }
}
