//! Applications (the clients of a tenant's API) and their grants: each grant lets one
//! application into one environment of one gateway with credentials of its own.
//!
//! A grant is an APISIX consumer named `{gid}-{env}-{appId}` (the grant's `credentialId`)
//! with a credential of the environment's auth plugin (`authType`; `key-auth` when it has
//! none) that never holds the secret in a form that reads back, scoped to the environment so
//! it works nowhere else; the create and regenerate answers are the only places the secret
//! exists (`apiKey`, or `credentials`):
//!
//! - `key-auth`: the keyed hash of the key (HMAC-SHA256 under a key the keyring derives);
//! - `basic-auth`: the keyed hash of `credentialId:password` (`credential_hash`);
//! - `jwt-auth` (HS256, `key` = `credentialId`): a random `secret_seed`; the secret is
//!   HMAC-SHA256 of it under a key the keyring derives, so only nodes holding the keyring
//!   can compute it.
//!
//! Its `quota` is a `limit-count` on the consumer (429). A regenerated secret replaces the
//! old one at once; with `overlapSeconds` the old hash stays as a second credential until
//! then (for `jwt-auth`, whose tokens name the one credential of their key, the old seed stays
//! as the credential's `previous_seed`). Every change is one store transaction with the
//! grant's document.
//!
//! Keys: `{prefix}/platform/applications/{appId}`, `{prefix}/platform/grants/{grantId}`, and
//! the consumer `{prefix}/consumers/{credentialId}` with its credentials `current` and
//! `previous`.

use bytes::Bytes;
use http::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use weir_core::error::ErrorKind;
use weir_store::{Compare, Op, Txn, TxnOutcome};

use crate::Platform;
use crate::api::{Reply, bad_input, body, failure, json, not_found, refuse, store_down};
use crate::model::{AuthType, ENVIRONMENTS, GATEWAY_ID, Phase};
use crate::tokens::{Caller, now_rfc3339};

/// `POST /v1/applications`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApplication {
    #[schemars(length(min = 1, max = 100))]
    pub name: String,
    #[schemars(length(max = 1000))]
    pub description: Option<String>,
    #[schemars(length(max = 100))]
    pub organization: Option<String>,
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    pub tags: Option<Vec<String>>,
}

/// `PATCH /v1/applications/{appId}`: what is given replaces what was.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchApplication {
    #[schemars(length(min = 1, max = 100))]
    pub name: Option<String>,
    #[schemars(length(max = 1000))]
    pub description: Option<String>,
    #[schemars(length(max = 100))]
    pub organization: Option<String>,
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    pub tags: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Application {
    pub app_id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    pub tags: Vec<String>,
    pub created_by: String,
    pub created_at: String,
    pub updated_at: String,
}

/// A grant's request quota: `count` requests per `time_window` seconds.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrantQuota {
    #[schemars(range(min = 1))]
    pub count: u64,
    #[schemars(range(min = 1))]
    pub time_window: u64,
}

/// `POST /v1/applications/{appId}/grants`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateGrant {
    #[schemars(regex(pattern = GATEWAY_ID))]
    pub gateway_id: String,
    #[schemars(regex(pattern = "^(dev|staging|prod)$"))]
    pub environment: String,
    /// RFC 3339.
    #[schemars(length(max = 64))]
    pub expires_at: Option<String>,
    pub quota: Option<GrantQuota>,
    #[schemars(length(max = 256), inner(length(min = 1, max = 256)))]
    pub tools: Option<Vec<String>>,
}

/// `POST .../grants/{grantId}/regenerate`.
#[derive(Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Regenerate {
    /// Seconds the old key keeps working beside the new one (at most a week).
    #[schemars(range(max = 604800))]
    pub overlap_seconds: Option<u64>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    pub grant_id: String,
    pub app_id: String,
    pub gateway_id: String,
    pub environment: String,
    pub credential_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<GrantQuota>,
    pub tools: Vec<String>,
    pub created_by: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotated_at: Option<String>,
}

fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// 32 bytes from the system's CSPRNG, as 64 hex digits.
fn random_hex() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).expect("the system's random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new API key (or password): `sk-` and 64 hex digits from the system's CSPRNG.
fn mint_key() -> String {
    format!("sk-{}", random_hex())
}

/// The auth plugin of the grants of an environment of `auth` type.
fn grant_plugin(auth: AuthType) -> &'static str {
    match auth {
        AuthType::BasicAuth => "basic-auth",
        AuthType::JwtAuth => "jwt-auth",
        AuthType::KeyAuth | AuthType::None => "key-auth",
    }
}

/// A grant's new secret: what its credential holds of it (the auth plugin's config, before its
/// scope and expiry) and what the answer shows of it, once.
struct Minted {
    plugin: &'static str,
    stored: Value,
    /// The answer's field and its value.
    shown: (&'static str, Value),
}

fn encode<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("documents serialize"))
}

/// The scope of an environment's keys, as its routes' `key-auth` names it.
pub fn scope(gid: &str, env: &str) -> String {
    weir_functions::live::grant_scope(gid, env)
}

impl Platform {
    fn app_key(&self, app: &str) -> String {
        format!("{}/platform/applications/{app}", self.prefix)
    }

    fn grant_key(&self, grant: &str) -> String {
        format!("{}/platform/grants/{grant}", self.prefix)
    }

    fn consumer_key(&self, cid: &str) -> String {
        format!("{}/consumers/{cid}", self.prefix)
    }

    fn credential_key(&self, cid: &str, id: &str) -> String {
        format!("{}/consumers/{cid}/credentials/{id}", self.prefix)
    }

    /// The keyed hash a credential holds of `key`.
    fn key_hash(&self, key: &str) -> String {
        weir_plugins::key_auth_hash(&self.docs.keyring.derive("key-auth"), key)
    }

    /// A new secret for the credential `cid` of auth plugin `plugin`.
    fn mint(&self, plugin: &'static str, cid: &str) -> Minted {
        match plugin {
            "basic-auth" => {
                let password = mint_key();
                let hash = weir_plugins::basic_auth_hash(&self.docs.keyring.derive("basic-auth"), cid, &password);
                Minted { plugin, stored: json!({"credential_hash": hash}), shown: ("credentials", json!({"username": cid, "password": password})) }
            }
            "jwt-auth" => {
                let seed = random_hex();
                let secret = weir_plugins::jwt_auth_secret(&self.docs.keyring.derive("jwt-auth"), &seed);
                Minted { plugin, stored: json!({"key": cid, "secret_seed": seed, "algorithm": "HS256"}), shown: ("credentials", json!({"key": cid, "secret": secret})) }
            }
            _ => {
                let key = mint_key();
                Minted { plugin: "key-auth", stored: json!({"key_hash": self.key_hash(&key)}), shown: ("apiKey", json!(key)) }
            }
        }
    }

    /// The revision of gateway `gid`'s document and the auth type of its environment `env`.
    async fn grant_gateway(&self, gid: &str, env: &str) -> Result<(i64, AuthType), Reply> {
        match self.docs.get(gid).await.map_err(store_down)? {
            Some((gw, _)) if gw.phase == Phase::Deleting => Err(failure(ErrorKind::Conflict, "the gateway is being deleted", Vec::new())),
            Some((gw, rev)) => Ok((rev, gw.environment(env).map_or(AuthType::None, |e| e.auth_type))),
            None => Err(not_found("gateway")),
        }
    }

    /// Routes `/v1/applications...`.
    pub(crate) async fn applications_api(&self, caller: &Caller, m: &http::Method, rest: &[&str], query: Option<&str>, raw: &Bytes) -> Reply {
        use http::Method;
        match (m, rest) {
            (&Method::POST, []) if !caller.owns() => refuse(StatusCode::FORBIDDEN, "only an admin key or an owner token may make applications"),
            (&Method::POST, []) => self.create_application(caller, raw).await,
            (&Method::GET, []) => {
                let apps = match self.applications(caller).await {
                    Ok(a) => a,
                    Err(r) => return r,
                };
                json(StatusCode::OK, &json!({"total": apps.len(), "list": apps}))
            }
            (_, [app, ..]) => {
                let (application, rev) = match self.application(caller, app).await {
                    Ok(a) => a,
                    Err(r) => return r,
                };
                match (m, &rest[1..]) {
                    (&Method::GET, []) => match self.grants_where(|g| g.app_id == application.app_id).await {
                        Ok(grants) => {
                            let mut shown = serde_json::to_value(&application).expect("an application serializes");
                            shown["grants"] = json!(grants);
                            json(StatusCode::OK, &shown)
                        }
                        Err(r) => r,
                    },
                    (&Method::PATCH, []) => self.patch_application(application, rev, raw).await,
                    (&Method::DELETE, []) => self.delete_application(application, rev).await,
                    (&Method::POST, ["grants"]) => self.create_grant(caller, &application, raw).await,
                    (&Method::GET, ["usage"]) => self.usage(&application, query).await,
                    (&Method::GET, ["grants"]) => {
                        let param = |k| query.and_then(|q| weir_core::text::query_param(q, k)).map(|v| weir_core::text::percent_decode(v).into_owned());
                        let (gid, env) = (param("gatewayId"), param("environment"));
                        match self.grants_where(|g| g.app_id == application.app_id && gid.as_ref().is_none_or(|x| *x == g.gateway_id) && env.as_ref().is_none_or(|x| *x == g.environment)).await {
                            Ok(list) => json(StatusCode::OK, &json!({"total": list.len(), "list": list})),
                            Err(r) => r,
                        }
                    }
                    (_, ["grants", grant, tail @ ..]) => {
                        let (g, grev) = match self.grant(grant).await {
                            Ok(Some(g)) if g.0.app_id == application.app_id => g,
                            Ok(_) => return not_found("grant"),
                            Err(r) => return r,
                        };
                        match (m, tail) {
                            (&Method::GET, []) => json(StatusCode::OK, &serde_json::to_value(&g).expect("a grant serializes")),
                            (&Method::DELETE, []) | (&Method::POST, ["regenerate"]) if !(caller.owns() && caller.sees(&g.gateway_id)) => {
                                refuse(StatusCode::FORBIDDEN, "only the gateway's owner may change its grants")
                            }
                            (&Method::DELETE, []) => match self.store_txn(vec![Compare { key: self.grant_key(&g.grant_id), mod_revision: grev }], self.grant_removal(&g)).await {
                                Ok(true) => json(StatusCode::OK, &json!({"deleted": g.grant_id})),
                                Ok(false) => failure(ErrorKind::Conflict, "the grant changed meanwhile; try again", Vec::new()),
                                Err(r) => r,
                            },
                            (&Method::POST, ["regenerate"]) => self.regenerate(g, grev, raw).await,
                            _ => refuse(StatusCode::METHOD_NOT_ALLOWED, &format!("{m} is not allowed here")),
                        }
                    }
                    _ => refuse(StatusCode::METHOD_NOT_ALLOWED, &format!("{m} is not allowed here")),
                }
            }
            _ => refuse(StatusCode::METHOD_NOT_ALLOWED, &format!("{m} is not allowed here")),
        }
    }

    /// `GET /v1/api-gateways/{gid}/grants` and `.../environments/{env}/grants`.
    pub(crate) async fn gateway_grants(&self, gid: &str, env: Option<&str>) -> Reply {
        if let Err(r) = self.gateway_rev(gid).await {
            return r;
        }
        match self.grants_where(|g| g.gateway_id == gid && env.is_none_or(|e| e == g.environment)).await {
            Ok(list) => json(StatusCode::OK, &json!({"total": list.len(), "list": list})),
            Err(r) => r,
        }
    }

    async fn store_txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, Reply> {
        match self.docs.store.txn(Txn { compares, ops }).await {
            Ok(TxnOutcome::Committed { .. }) => Ok(true),
            Ok(TxnOutcome::Conflict) => Ok(false),
            Err(e) => Err(store_down(e)),
        }
    }

    async fn applications(&self, caller: &Caller) -> Result<Vec<Application>, Reply> {
        let (kvs, _) = self.docs.store.list(&format!("{}/platform/applications/", self.prefix)).await.map_err(store_down)?;
        let all = kvs.iter().filter_map(|kv| serde_json::from_slice::<Application>(&kv.value).ok());
        Ok(all.filter(|a| self.may_see_app(caller, a)).collect())
    }

    /// Admin keys see every application, a token those it made.
    fn may_see_app(&self, caller: &Caller, app: &Application) -> bool {
        matches!(caller, Caller::Admin(_) | Caller::AdminViewer) || app.created_by == caller.name()
    }

    async fn application(&self, caller: &Caller, id: &str) -> Result<(Application, i64), Reply> {
        if !id.starts_with("app-") || id.len() != 20 || !id[4..].bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(not_found("application"));
        }
        match self.docs.store.get(&self.app_key(id)).await.map_err(store_down)? {
            Some(kv) => match serde_json::from_slice::<Application>(&kv.value) {
                Ok(a) if self.may_see_app(caller, &a) => Ok((a, kv.mod_revision)),
                Ok(_) => Err(not_found("application")),
                Err(e) => Err(failure(ErrorKind::Internal, format!("stored application: {e}"), Vec::new())),
            },
            None => Err(not_found("application")),
        }
    }

    async fn grant(&self, id: &str) -> Result<Option<(Grant, i64)>, Reply> {
        if !id.starts_with("gr-") || id.len() != 19 || !id[3..].bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        Ok(self.docs.store.get(&self.grant_key(id)).await.map_err(store_down)?.and_then(|kv| serde_json::from_slice(&kv.value).ok().map(|g| (g, kv.mod_revision))))
    }

    pub(crate) async fn grants_where(&self, keep: impl Fn(&Grant) -> bool) -> Result<Vec<Grant>, Reply> {
        self.stored_grants(keep).await.map_err(store_down)
    }

    async fn stored_grants(&self, keep: impl Fn(&Grant) -> bool) -> Result<Vec<Grant>, weir_store::StoreError> {
        let (kvs, _) = self.docs.store.list(&format!("{}/platform/grants/", self.prefix)).await?;
        Ok(kvs.iter().filter_map(|kv| serde_json::from_slice::<Grant>(&kv.value).ok()).filter(|g| keep(g)).collect())
    }

    async fn create_application(&self, caller: &Caller, raw: &Bytes) -> Reply {
        let input: CreateApplication = match body(raw) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let now = now_rfc3339();
        let app = Application {
            app_id: format!("app-{:016x}", fastrand::u64(..)),
            name: input.name,
            description: input.description,
            organization: input.organization,
            tags: input.tags.unwrap_or_default(),
            created_by: caller.name(),
            created_at: now.clone(),
            updated_at: now,
        };
        let key = self.app_key(&app.app_id);
        let Caller::Token { key: token_key, .. } = caller else {
            return match self.store_txn(vec![Compare { key: key.clone(), mod_revision: 0 }], vec![Op::Put { key, value: encode(&app) }]).await {
                Ok(true) => json(StatusCode::CREATED, &serde_json::to_value(&app).expect("an application serializes")),
                Ok(false) => failure(ErrorKind::Conflict, "an application of this id exists; try again", Vec::new()),
                Err(r) => r,
            };
        };
        // A token's creations serialize on its record (rewritten as it is), so that none
        // passes the bound however many come at once.
        for _ in 0..32 {
            let token = match self.docs.store.get(token_key).await {
                Ok(Some(kv)) => kv,
                Ok(None) => return refuse(StatusCode::UNAUTHORIZED, "the token was revoked"),
                Err(e) => return store_down(e),
            };
            let held = match self.applications(caller).await {
                Ok(a) => a.len(),
                Err(r) => return r,
            };
            let most = self.cfg.max_applications_per_owner;
            if held >= most {
                return failure(ErrorKind::Quota, format!("this token has made {most} applications, the most one owner may (platform.max_applications_per_owner); delete one first"), Vec::new());
            }
            let compares = vec![Compare { key: key.clone(), mod_revision: 0 }, Compare { key: token_key.clone(), mod_revision: token.mod_revision }];
            let ops = vec![Op::Put { key: key.clone(), value: encode(&app) }, Op::Put { key: token_key.clone(), value: token.value }];
            match self.store_txn(compares, ops).await {
                Ok(true) => return json(StatusCode::CREATED, &serde_json::to_value(&app).expect("an application serializes")),
                Ok(false) => continue,
                Err(r) => return r,
            }
        }
        failure(ErrorKind::Conflict, "the token's applications kept changing meanwhile; try again", Vec::new())
    }

    async fn patch_application(&self, app: Application, rev: i64, raw: &Bytes) -> Reply {
        let input: PatchApplication = match body(raw) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let key = self.app_key(&app.app_id);
        // Applied again on what is there when the application changed meanwhile (a grant's
        // making rewrites it).
        let (mut app, mut rev) = (app, rev);
        for _ in 0..32 {
            if let Some(n) = &input.name {
                app.name = n.clone();
            }
            if input.description.is_some() {
                app.description = input.description.clone();
            }
            if input.organization.is_some() {
                app.organization = input.organization.clone();
            }
            if let Some(t) = &input.tags {
                app.tags = t.clone();
            }
            app.updated_at = now_rfc3339();
            match self.store_txn(vec![Compare { key: key.clone(), mod_revision: rev }], vec![Op::Put { key: key.clone(), value: encode(&app) }]).await {
                Ok(true) => return json(StatusCode::OK, &serde_json::to_value(&app).expect("an application serializes")),
                Ok(false) => match self.docs.store.get(&key).await {
                    Ok(Some(kv)) => match serde_json::from_slice::<Application>(&kv.value) {
                        Ok(now) => (app, rev) = (now, kv.mod_revision),
                        Err(e) => return failure(ErrorKind::Internal, format!("stored application: {e}"), Vec::new()),
                    },
                    Ok(None) => return not_found("application"),
                    Err(e) => return store_down(e),
                },
                Err(r) => return r,
            }
        }
        failure(ErrorKind::Conflict, "the application kept changing meanwhile; try again", Vec::new())
    }

    /// The operations that remove a grant and the consumer it is.
    fn grant_removal(&self, g: &Grant) -> Vec<Op> {
        vec![
            Op::Delete { key: self.grant_key(&g.grant_id) },
            Op::Delete { key: self.credential_key(&g.credential_id, "current") },
            Op::Delete { key: self.credential_key(&g.credential_id, "previous") },
            Op::Delete { key: self.consumer_key(&g.credential_id) },
        ]
    }

    /// The operations that remove every grant of gateway `gid` (with the gateway). A store
    /// that cannot list them fails the removal: a grant left behind would let its keys into a
    /// gateway made later under the same id.
    pub(crate) async fn gateway_grant_removal(&self, gid: &str) -> Result<Vec<Op>, weir_store::StoreError> {
        Ok(self.stored_grants(|g| g.gateway_id == gid).await?.iter().flat_map(|g| self.grant_removal(g)).collect())
    }

    async fn delete_application(&self, app: Application, rev: i64) -> Reply {
        let grants = match self.grants_where(|g| g.app_id == app.app_id).await {
            Ok(g) => g,
            Err(r) => return r,
        };
        let mut ops: Vec<Op> = grants.iter().flat_map(|g| self.grant_removal(g)).collect();
        ops.push(Op::Delete { key: self.app_key(&app.app_id) });
        match self.store_txn(vec![Compare { key: self.app_key(&app.app_id), mod_revision: rev }], ops).await {
            Ok(true) => json(StatusCode::OK, &json!({"deleted": app.app_id, "grants": grants.len()})),
            Ok(false) => failure(ErrorKind::Conflict, "the application changed meanwhile; try again", Vec::new()),
            Err(r) => r,
        }
    }

    /// The consumer object of a grant, checked as the Admin API checks one and stored as it
    /// stores one.
    fn checked(&self, kind: &str, parent: Option<&str>, id: &str, mut value: Value) -> Result<Op, Reply> {
        let registered = self.catalog.get(kind).expect("the catalog has consumers and credentials");
        if let Err(errors) = self.catalog.check(registered, &value, self.plugins.as_ref()) {
            return Err(failure(ErrorKind::Internal, format!("the {kind} of a grant does not check: {}", errors.join("; ")), Vec::new()));
        }
        let now = now_secs();
        value["create_time"] = json!(now);
        value["update_time"] = json!(now);
        Ok(Op::Put { key: registered.key(&self.prefix, parent, id), value: Bytes::from(value.to_string()) })
    }

    /// The consumer and `current` credential of grant `g`: auth plugin `plugin` configured
    /// `conf`.
    fn grant_objects(&self, g: &Grant, plugin: &str, conf: Value) -> Result<Vec<Op>, Reply> {
        let mut plugins = serde_json::Map::new();
        // Names the grant to functions and counts its usage.
        plugins.insert(weir_plugins::grant_usage::NAME.into(), json!({"application": g.app_id, "grant": g.grant_id}));
        if let Some(q) = g.quota {
            plugins.insert("limit-count".into(), json!({"count": q.count, "time_window": q.time_window, "rejected_code": 429, "key_type": "var", "key": "consumer_name", "policy": "local"}));
        }
        let consumer = json!({
            "username": g.credential_id,
            "desc": format!("grant {} of application {}", g.grant_id, g.app_id),
            "labels": {(weir_catalog::MANAGED_LABEL): g.gateway_id, "weir-application": g.app_id, "weir-grant": g.grant_id},
            "plugins": plugins,
        });
        let credential = json!({"id": "current", "plugins": {plugin: conf}});
        Ok(vec![self.checked("consumers", None, &g.credential_id, consumer)?, self.checked("credentials", Some(&g.credential_id), "current", credential)?])
    }

    /// An auth plugin's credential of `stored` (a key's hash, a seed), scoped to the grant's
    /// environment, until the grant expires (or `until`, if sooner).
    fn credential_conf(&self, g: &Grant, stored: &Value, until: Option<i64>) -> Value {
        let mut conf = stored.clone();
        conf["scope"] = json!(scope(&g.gateway_id, &g.environment));
        let expires = g.expires_at.as_deref().and_then(|t| crate::tokens::parse_time(t).ok());
        if let Some(at) = [expires, until].into_iter().flatten().min() {
            conf["not_after"] = json!(at);
        }
        conf
    }

    async fn create_grant(&self, caller: &Caller, app: &Application, raw: &Bytes) -> Reply {
        let input: CreateGrant = match body(raw) {
            Ok(b) => b,
            Err(r) => return r,
        };
        if !caller.sees(&input.gateway_id) {
            return bad_input(vec![format!("gatewayId: no gateway {}", input.gateway_id)]);
        }
        if !caller.owns() {
            return refuse(StatusCode::FORBIDDEN, "only the gateway's owner may grant access to it");
        }
        if let Some(t) = &input.expires_at {
            match crate::tokens::parse_time(t) {
                Ok(at) if at <= now_secs() => return bad_input(vec!["expiresAt: already past".into()]),
                Ok(_) => {}
                Err(e) => return bad_input(vec![e]),
            }
        }
        debug_assert!(ENVIRONMENTS.contains(&input.environment.as_str()));
        let grant = Grant {
            grant_id: format!("gr-{:016x}", fastrand::u64(..)),
            app_id: app.app_id.clone(),
            credential_id: format!("{}-{}-{}", input.gateway_id, input.environment, app.app_id),
            gateway_id: input.gateway_id,
            environment: input.environment,
            expires_at: input.expires_at,
            quota: input.quota,
            tools: input.tools.unwrap_or_default(),
            created_by: caller.name(),
            created_at: now_rfc3339(),
            rotated_at: None,
        };
        // The consumer's key is compared as absent (one grant per application and
        // environment), the application and the gateway as read, so neither is deleted under
        // the grant, and the credential is of the environment's auth type as read; when they
        // change meanwhile (the reconciler writes the gateway's document), the grant is tried
        // again.
        for _ in 0..32 {
            let (gw_rev, auth) = match self.grant_gateway(&grant.gateway_id, &grant.environment).await {
                Ok(r) => r,
                Err(r) => return r,
            };
            let minted = self.mint(grant_plugin(auth), &grant.credential_id);
            let mut ops = match self.grant_objects(&grant, minted.plugin, self.credential_conf(&grant, &minted.stored, None)) {
                Ok(o) => o,
                Err(r) => return r,
            };
            ops.push(Op::Put { key: self.grant_key(&grant.grant_id), value: encode(&grant) });
            // The application is rewritten as it is: a deletion that listed its grants before
            // this one then finds it changed, and no grant outlives its application.
            let app_rev = match self.docs.store.get(&self.app_key(&app.app_id)).await {
                Ok(Some(kv)) => {
                    ops.push(Op::Put { key: kv.key, value: kv.value });
                    kv.mod_revision
                }
                Ok(None) => return not_found("application"),
                Err(e) => return store_down(e),
            };
            let compares = vec![
                Compare { key: self.consumer_key(&grant.credential_id), mod_revision: 0 },
                Compare { key: self.app_key(&app.app_id), mod_revision: app_rev },
                Compare { key: self.docs.key(&grant.gateway_id), mod_revision: gw_rev },
            ];
            match self.store_txn(compares, ops).await {
                Ok(true) => {
                    let mut shown = serde_json::to_value(&grant).expect("a grant serializes");
                    shown[minted.shown.0] = minted.shown.1;
                    return json(StatusCode::CREATED, &shown);
                }
                Ok(false) => match self.docs.store.get(&self.consumer_key(&grant.credential_id)).await {
                    Ok(Some(_)) => return failure(ErrorKind::Conflict, format!("application {} already has a grant for {}/{}", app.app_id, grant.gateway_id, grant.environment), Vec::new()),
                    Ok(None) => continue,
                    Err(e) => return store_down(e),
                },
                Err(r) => return r,
            }
        }
        failure(ErrorKind::Conflict, "the application or gateway kept changing meanwhile; try again", Vec::new())
    }

    async fn regenerate(&self, mut g: Grant, rev: i64, raw: &Bytes) -> Reply {
        let input: Regenerate = if raw.is_empty() {
            Regenerate::default()
        } else {
            match body(raw) {
                Ok(b) => b,
                Err(r) => return r,
            }
        };
        let current = match self.docs.store.get(&self.credential_key(&g.credential_id, "current")).await {
            Ok(Some(kv)) => serde_json::from_slice::<Value>(&kv.value).unwrap_or_default(),
            Ok(None) => return failure(ErrorKind::Internal, "the grant's credential is missing", Vec::new()),
            Err(e) => return store_down(e),
        };
        // A new secret of the environment's auth plugin, as it is now; when that is the current
        // credential's, what the old secret was held as (its hash, its seed) stays for the
        // overlap. A grant made before its environment changed auth type thus moves to the new
        // type when it is regenerated.
        let auth = match self.grant_gateway(&g.gateway_id, &g.environment).await {
            Ok((_, auth)) => auth,
            Err(r) => return r,
        };
        let plugin = grant_plugin(auth);
        let held = match plugin {
            "basic-auth" => "credential_hash",
            "jwt-auth" => "secret_seed",
            _ => "key_hash",
        };
        let old = current["plugins"].get(plugin).and_then(|c| c[held].as_str()).unwrap_or_default().to_string();
        let minted = self.mint(plugin, &g.credential_id);
        g.rotated_at = Some(now_rfc3339());
        let overlap = input.overlap_seconds.filter(|s| *s > 0 && !old.is_empty()).map(|s| now_secs() + s as i64);
        let mut conf = self.credential_conf(&g, &minted.stored, None);
        if let (Some(until), "jwt-auth") = (overlap, plugin) {
            conf["previous_seed"] = json!(old);
            conf["previous_not_after"] = json!(until);
        }
        let mut ops = match self.grant_objects(&g, plugin, conf) {
            Ok(o) => o,
            Err(r) => return r,
        };
        ops.push(Op::Put { key: self.grant_key(&g.grant_id), value: encode(&g) });
        match overlap {
            Some(until) if plugin != "jwt-auth" => {
                let previous = json!({"id": "previous", "plugins": {plugin: self.credential_conf(&g, &json!({held: old}), Some(until))}});
                match self.checked("credentials", Some(&g.credential_id), "previous", previous) {
                    Ok(op) => ops.push(op),
                    Err(r) => return r,
                }
            }
            _ => ops.push(Op::Delete { key: self.credential_key(&g.credential_id, "previous") }),
        }
        match self.store_txn(vec![Compare { key: self.grant_key(&g.grant_id), mod_revision: rev }], ops).await {
            Ok(true) => {
                let mut shown = serde_json::to_value(&g).expect("a grant serializes");
                shown[minted.shown.0] = minted.shown.1;
                json(StatusCode::OK, &shown)
            }
            Ok(false) => failure(ErrorKind::Conflict, "the grant changed meanwhile; try again", Vec::new()),
            Err(r) => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_shaped() {
        let (a, b) = (mint_key(), mint_key());
        assert_ne!(a, b);
        assert!(a.starts_with("sk-") && a.len() == 67 && a[3..].bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
