//! `/v1/api-gateways/{gid}/functions`: a gateway's cloud functions. Saving a function stores
//! it where the data plane's function routes read it (`weir_functions::live`), so it is live
//! on every node as soon as the store's watch delivers it; it is compiled before it is stored,
//! and a source that does not compile changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use weir_core::error::ErrorKind;
use weir_functions::lanes::Lanes;
use weir_functions::live::{EnvDoc, FunctionDoc, Functions, env_key, function_key, partition_prefix};
use weir_functions::{CompileError, Request};
use weir_store::{Compare, Op, Txn, TxnOutcome};

use crate::Platform;
use crate::api::{Reply, bad_input, body, failure, json, not_found, store_down};
use crate::lifecycle::Kind;
use crate::model::Phase;
use crate::tokens::{Caller, now_rfc3339};

/// A function's name: 1 to 8 segments of `[A-Za-z0-9_-]`.
pub const FUNCTION_NAME: &str = "^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,7}$";

#[derive(Deserialize, JsonSchema, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "UPPERCASE")]
pub enum FnMethod {
    Get,
    Post,
    Put,
    Patch,
    Delete,
    Head,
    Options,
}

/// `source`: one file (`code`, taken as TypeScript, of which JavaScript is a part) or several.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceInput {
    #[schemars(length(max = 524288))]
    pub code: Option<String>,
    #[schemars(length(max = 64))]
    pub files: Option<BTreeMap<String, String>>,
    #[schemars(length(min = 1, max = 256))]
    pub entrypoint: Option<String>,
}

/// `POST /v1/api-gateways/{gid}/functions`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFunction {
    #[schemars(regex(pattern = FUNCTION_NAME), length(max = 256))]
    pub name: String,
    pub source: SourceInput,
    /// Each method once (the proxy reads the list on each request it refuses).
    #[schemars(length(max = 7), extend("uniqueItems" = true))]
    pub methods: Option<Vec<FnMethod>>,
    #[schemars(length(max = 1000))]
    pub description: Option<String>,
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    pub tags: Option<Vec<String>>,
    pub plugins: Option<Map<String, Value>>,
    #[schemars(length(max = 64))]
    pub semver: Option<String>,
    #[schemars(length(max = 4000))]
    pub changelog: Option<String>,
}

/// `PATCH .../functions/{fn}`: what is given replaces what was; a new source is a new version.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchFunction {
    pub source: Option<SourceInput>,
    /// Each method once (the proxy reads the list on each request it refuses).
    #[schemars(length(max = 7), extend("uniqueItems" = true))]
    pub methods: Option<Vec<FnMethod>>,
    #[schemars(length(max = 1000))]
    pub description: Option<String>,
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    pub tags: Option<Vec<String>>,
    pub plugins: Option<Map<String, Value>>,
    #[schemars(length(max = 64))]
    pub semver: Option<String>,
    #[schemars(length(max = 4000))]
    pub changelog: Option<String>,
}

/// The most headers, and query parameters, an invocation gives: a request's headers are
/// bounded alike by the proxy.
const INVOKE_FIELDS: usize = 100;

/// `POST .../functions/{fn}/invoke`: a request to run the function on.
#[derive(Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct InvokeInput {
    pub method: Option<FnMethod>,
    #[schemars(length(max = 2048))]
    pub path: Option<String>,
    pub query: Option<BTreeMap<String, String>>,
    pub headers: Option<BTreeMap<String, String>>,
    /// A string is sent as it is; anything else as JSON.
    pub body: Option<Value>,
}

fn method_names(m: &[FnMethod]) -> Vec<String> {
    m.iter().map(|m| format!("{m:?}").to_ascii_uppercase()).collect()
}

/// The files and entry point of `source`, or why not.
fn files_of(source: SourceInput) -> Result<(BTreeMap<String, String>, String), Reply> {
    match (source.code, source.files, source.entrypoint) {
        (Some(code), None, None) => Ok((BTreeMap::from([("index.ts".to_string(), code)]), "index.ts".to_string())),
        (None, Some(files), Some(entry)) => Ok((files, entry)),
        (None, Some(files), None) if files.len() == 1 => {
            let entry = files.keys().next().cloned().unwrap_or_default();
            Ok((files, entry))
        }
        _ => Err(bad_input(vec!["source: give either code, or files with their entrypoint".into()])),
    }
}

/// Compilations running at once on the node, and for one gateway: a large file takes the
/// compiler a while, on a blocking thread rather than one of the API's.
fn compile_lanes() -> &'static Lanes {
    static LANES: std::sync::OnceLock<Lanes> = std::sync::OnceLock::new();
    LANES.get_or_init(|| Lanes::new(2, 1))
}

/// Checks a function's source as saved: `Err` is the answer to give. What it compiles to is
/// offered to this node's runtimes (`functions`), whose lowering of the stored function then
/// does not compile it again.
pub(crate) async fn compile(functions: Option<&Arc<Functions>>, gid: &str, files: &BTreeMap<String, String>, entry: &str) -> Result<(), Reply> {
    let (files, entry, functions, gateway) = (files.clone(), entry.to_string(), functions.cloned(), gid.to_string());
    let work = move || {
        weir_functions::source::compile_in_background(&files, &entry).map(|compiled| {
            if let Some(f) = functions {
                f.offer(&gateway, &files, &entry, compiled);
            }
        })
    };
    match compile_lanes().run(&tokio::runtime::Handle::current(), gid, work).await {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(compile_failure(&e)),
        None => Err(failure(ErrorKind::Internal, "the compiler failed", vec![])),
    }
}

fn compile_failure(e: &CompileError) -> Reply {
    let mut reply = json!({"error": {"kind": ErrorKind::BadInput.name(), "message": e.to_string(), "problems": [e.to_string()], "file": e.file, "line": e.line, "column": e.column}});
    if e.line == 0
        && let Some(o) = reply["error"].as_object_mut()
    {
        o.retain(|k, _| k != "line" && k != "column");
    }
    json(StatusCode::BAD_REQUEST, &reply)
}

/// A function as the API shows it.
#[derive(serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Shown {
    /// The full name: `{environment}/{functionName}`.
    pub name: String,
    pub function_name: String,
    pub environment: String,
    pub source: ShownSource,
    pub methods: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub tags: Vec<String>,
    pub plugins: Map<String, Value>,
    pub version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub semver: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changelog: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub updated_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promoted_from: Option<weir_functions::live::Origin>,
}

#[derive(serde::Serialize, Deserialize, JsonSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct ShownSource {
    pub files: BTreeMap<String, String>,
    pub entrypoint: String,
}

/// What `invoke` answers.
#[derive(serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Invocation {
    pub status: u16,
    /// Each name's value, or its values in order where it was sent more than once (cookies).
    pub headers: Map<String, Value>,
    /// JSON when the function answered JSON, else the text.
    pub body: Value,
    pub logs: Vec<Value>,
    pub duration_ms: f64,
}

/// [`Invocation`] as it is written.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct InvocationOut<'a> {
    status: u16,
    headers: &'a Map<String, Value>,
    body: &'a RawValue,
    logs: &'a [weir_functions::LogLine],
    duration_ms: f64,
}

pub(crate) fn shown(doc: &FunctionDoc) -> Value {
    serde_json::to_value(shown_of(doc)).expect("a function serializes")
}

pub(crate) fn shown_of(doc: &FunctionDoc) -> Shown {
    let d = doc.clone();
    Shown {
        name: format!("{}/{}", d.environment, d.name),
        function_name: d.name,
        environment: d.environment,
        source: ShownSource { files: d.files, entrypoint: d.entrypoint },
        methods: d.methods,
        description: d.description,
        tags: d.tags,
        plugins: d.plugins,
        version: d.version,
        semver: d.semver,
        changelog: d.changelog,
        created_at: d.created_at,
        updated_at: d.updated_at,
        updated_by: d.updated_by,
        promoted_from: d.promoted_from,
    }
}

impl Platform {
    /// Routes `/v1/api-gateways/{gid}/functions...`; `rest` is what follows `functions`.
    pub(crate) async fn functions_api(&self, caller: &Caller, m: &http::Method, gid: &str, rest: &[&str], query: Option<&str>, raw: &Bytes) -> Reply {
        use http::Method;
        if let (&Method::GET, ["compare"]) = (m, rest) {
            return self.compare(gid, query).await;
        }
        let full = rest.first().map(|f| weir_core::text::percent_decode(f).into_owned());
        let split = full.as_deref().and_then(|f| f.split_once('/')).map(|(e, n)| (e.to_string(), n.to_string()));
        if full.is_some() && split.as_ref().is_none_or(|(e, n)| !crate::model::ENVIRONMENTS.contains(&e.as_str()) || !weir_functions::valid_name(n)) {
            return not_found("function");
        }
        let forbidden = |env: &str| crate::api::refuse(StatusCode::FORBIDDEN, &format!("this token may not change the {env} environment"));
        match (m, split, rest.get(1..).unwrap_or_default()) {
            (&Method::POST, None, []) if !caller.writes_env("dev") => forbidden("dev"),
            (&Method::POST, None, []) => self.create_function(caller, gid, raw).await,
            (&Method::GET, None, []) => self.list_functions(gid, query).await,
            (&Method::GET, Some((env, name)), []) => match self.read_function(gid, &env, &name).await {
                Ok((doc, ..)) => json(StatusCode::OK, &shown(&doc)),
                Err(r) => r,
            },
            (&Method::PATCH | &Method::DELETE, Some((env, _)), []) | (&Method::POST, Some((env, _)), ["invoke" | "rollback"]) if !caller.writes_env(&env) => forbidden(&env),
            (&Method::PATCH, Some((env, name)), []) => self.patch_function(caller, gid, &env, &name, raw).await,
            (&Method::DELETE, Some((env, name)), []) => self.delete_function(gid, &env, &name).await,
            (&Method::POST, Some((env, name)), ["invoke"]) => self.invoke(gid, &env, &name, raw).await,
            (&Method::GET, Some((env, name)), ["logs"]) => self.function_logs(gid, &env, &name, query).await,
            (&Method::GET, Some((env, name)), ["history"]) => self.history(gid, &env, &name, None).await,
            (&Method::GET, Some((env, name)), ["history", v]) => self.history(gid, &env, &name, Some(v)).await,
            (&Method::POST, Some((env, name)), ["deploy-to-stage"]) => self.deploy_to_stage(caller, gid, &env, &name, raw).await,
            (&Method::POST, Some((env, name)), ["rollback"]) => self.rollback(caller, gid, &env, &name, raw).await,
            _ => crate::api::refuse(StatusCode::METHOD_NOT_ALLOWED, &format!("{m} is not allowed here")),
        }
    }

    /// The gateway's document revision, when it may take functions.
    pub(crate) async fn gateway_rev(&self, gid: &str) -> Result<i64, Reply> {
        match self.docs.get(gid).await.map_err(store_down)? {
            Some((gw, _)) if gw.phase == Phase::Deleting => Err(failure(ErrorKind::Conflict, "the gateway is being deleted", Vec::new())),
            Some((_, rev)) => Ok(rev),
            None => Err(not_found("gateway")),
        }
    }

    /// Checks a function's plugin layer the way the gateway's layers are checked: today's
    /// checks, run on every version published (saved, promoted or rolled back to), so none
    /// publishes a plugin the operator denied since.
    pub(crate) fn check_function_plugins(&self, plugins: &Map<String, Value>) -> Result<(), Reply> {
        let mut problems = Vec::new();
        crate::guard::layer(&self.cfg, "plugins (function layer)", plugins, &mut problems);
        let holder = self.catalog.get("plugin_configs").expect("the catalog has plugin_configs");
        if let Err(errors) = self.catalog.check(holder, &json!({"id": "check", "plugins": plugins}), self.plugins.as_ref()) {
            problems.extend(errors.into_iter().map(|e| format!("plugins (function layer): {e}")));
        }
        if problems.is_empty() { Ok(()) } else { Err(bad_input(problems)) }
    }

    async fn create_function(&self, caller: &Caller, gid: &str, raw: &Bytes) -> Reply {
        let input: CreateFunction = match body(raw) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let (files, entrypoint) = match files_of(input.source) {
            Ok(f) => f,
            Err(r) => return r,
        };
        // The version and its history entry each hold the source: a pace without room for
        // its files once is refused before the compile.
        if let Err(r) = self.paced(gid, files.values().map(|f| f.len() as u64).sum()) {
            return r;
        }
        if let Err(r) = compile(self.functions.get(), gid, &files, &entrypoint).await {
            return r;
        }
        let plugins = input.plugins.unwrap_or_default();
        if let Err(r) = self.check_function_plugins(&plugins) {
            return r;
        }
        let now = now_rfc3339();
        let doc = FunctionDoc {
            name: input.name,
            environment: "dev".into(),
            files,
            entrypoint,
            methods: input.methods.as_deref().map(method_names).unwrap_or_default(),
            description: input.description,
            tags: input.tags.unwrap_or_default(),
            plugins,
            version: 1,
            semver: input.semver,
            changelog: input.changelog,
            created_at: now.clone(),
            updated_at: now,
            updated_by: caller.name(),
            promoted_from: None,
        };
        let key = function_key(&self.prefix, gid, "dev", &doc.name);
        // The gateway's document is compared only so that a deleted gateway takes no function;
        // when it changes meanwhile (its owner, the reconciler), the save is tried again.
        for _ in 0..32 {
            let gw_rev = match self.gateway_rev(gid).await {
                Ok(r) => r,
                Err(r) => return r,
            };
            // A name taken is a conflict whatever the quota says.
            match self.docs.store.get(&key).await {
                Ok(Some(_)) => return failure(ErrorKind::Conflict, format!("function dev/{} already exists", doc.name), Vec::new()),
                Ok(None) => {}
                Err(e) => return store_down(e),
            }
            let (quota, ops, bytes) = match self.publication(gid, &doc, Kind::Save, None, None).await {
                Ok(p) => p,
                Err(r) => return r,
            };
            let txn = Txn { compares: vec![Compare { key: self.docs.key(gid), mod_revision: gw_rev }, Compare { key: key.clone(), mod_revision: 0 }, quota], ops };
            match self.docs.store.txn(txn).await {
                Ok(TxnOutcome::Committed { .. }) => {
                    self.publishing.spend(gid, bytes);
                    return json(StatusCode::CREATED, &shown(&doc));
                }
                Ok(TxnOutcome::Conflict) => match self.docs.store.get(&key).await {
                    Ok(Some(_)) => return failure(ErrorKind::Conflict, format!("function dev/{} already exists", doc.name), Vec::new()),
                    Ok(None) => continue,
                    Err(e) => return store_down(e),
                },
                Err(e) => return store_down(e),
            }
        }
        failure(ErrorKind::Conflict, "the gateway kept changing meanwhile; try again", Vec::new())
    }

    async fn list_functions(&self, gid: &str, query: Option<&str>) -> Reply {
        if let Err(r) = self.gateway_rev(gid).await {
            return r;
        }
        let env = query.and_then(|q| weir_core::text::query_param(q, "environment")).map(|v| weir_core::text::percent_decode(v).into_owned());
        if let Some(e) = &env
            && !crate::model::ENVIRONMENTS.contains(&e.as_str())
        {
            return bad_input(vec![format!("environment: {e:?} is not one of {}", crate::model::ENVIRONMENTS.join(", "))]);
        }
        let dir = format!("{}fn/{}", partition_prefix(&self.prefix, gid), env.map(|e| format!("{e}/")).unwrap_or_default());
        // A list holds the gateway's functions several times over while it is made, and its
        // answer until it is read: one made at a time per gateway, and the answer counted.
        let Some(_pass) = self.listing.enter(gid).await else { return failure(ErrorKind::Internal, "the list's place was closed", Vec::new()) };
        match self.docs.store.list(&dir).await {
            Ok((kvs, _)) => {
                let list: Vec<Value> = kvs.iter().filter_map(|kv| self.function_of(&kv.value).ok()).map(|d| shown(&d)).collect();
                drop(kvs);
                self.answers.json(gid, StatusCode::OK, &json!({"list": list, "total": list.len()}))
            }
            Err(e) => store_down(e),
        }
    }

    /// The function, its revision and the bytes it takes in the store.
    pub(crate) async fn read_function(&self, gid: &str, env: &str, name: &str) -> Result<(FunctionDoc, i64, u64), Reply> {
        self.read_optional(gid, env, name).await?.ok_or_else(|| not_found("function"))
    }

    /// The function with its revision and stored size, if there is one.
    pub(crate) async fn read_optional(&self, gid: &str, env: &str, name: &str) -> Result<Option<(FunctionDoc, i64, u64)>, Reply> {
        let key = function_key(&self.prefix, gid, env, name);
        match self.docs.store.get(&key).await.map_err(store_down)? {
            Some(kv) => self.function_of(&kv.value).map(|d| Some((d, kv.mod_revision, kv.value.len() as u64))).map_err(|e| failure(ErrorKind::Internal, format!("stored function: {e}"), Vec::new())),
            None => Ok(None),
        }
    }

    /// A stored function, its plugin layer's secret fields opened.
    fn function_of(&self, stored: &[u8]) -> Result<FunctionDoc, String> {
        let mut doc: FunctionDoc = serde_json::from_slice(stored).map_err(|e| e.to_string())?;
        self.docs.open_layer(&mut doc.plugins)?;
        Ok(doc)
    }

    /// `doc` as stored: its plugin layer's secret fields sealed, as a gateway's layers are.
    pub(crate) fn sealed(&self, doc: &FunctionDoc) -> FunctionDoc {
        FunctionDoc { plugins: self.docs.seal_layer(&doc.plugins), ..doc.clone() }
    }

    async fn patch_function(&self, caller: &Caller, gid: &str, env: &str, name: &str, raw: &Bytes) -> Reply {
        let input: PatchFunction = match body(raw) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let source = match input.source.map(files_of).transpose() {
            Ok(s) => s,
            Err(r) => return r,
        };
        if let Some((files, _)) = &source
            && let Err(r) = self.paced(gid, files.values().map(|f| f.len() as u64).sum())
        {
            return r;
        }
        if let Some((files, entry)) = &source
            && let Err(r) = compile(self.functions.get(), gid, files, entry).await
        {
            return r;
        }
        for _ in 0..32 {
            let (mut doc, rev, before) = match self.read_function(gid, env, name).await {
                Ok(d) => d,
                Err(r) => return r,
            };
            // Every save is a version, whatever it changes.
            doc.version += 1;
            if let Some((files, entry)) = &source {
                doc.files = files.clone();
                doc.entrypoint = entry.clone();
            }
            if let Some(m) = &input.methods {
                doc.methods = method_names(m);
            }
            if let Some(d) = &input.description {
                doc.description = Some(d.clone());
            }
            if let Some(t) = &input.tags {
                doc.tags = t.clone();
            }
            if let Some(p) = &input.plugins {
                doc.plugins = p.clone();
            }
            if let Some(s) = &input.semver {
                doc.semver = Some(s.clone());
            }
            if let Some(c) = &input.changelog {
                doc.changelog = Some(c.clone());
            }
            doc.updated_at = now_rfc3339();
            doc.updated_by = caller.name();
            if let Err(r) = self.check_function_plugins(&doc.plugins) {
                return r;
            }
            let (quota, ops, bytes) = match self.publication(gid, &doc, Kind::Save, None, Some(before)).await {
                Ok(p) => p,
                Err(r) => return r,
            };
            let key = function_key(&self.prefix, gid, env, name);
            let txn = Txn { compares: vec![Compare { key, mod_revision: rev }, quota], ops };
            match self.docs.store.txn(txn).await {
                Ok(TxnOutcome::Committed { .. }) => {
                    self.publishing.spend(gid, bytes);
                    return json(StatusCode::OK, &shown(&doc));
                }
                // Changed meanwhile: applied again on what is there now.
                Ok(TxnOutcome::Conflict) => continue,
                Err(e) => return store_down(e),
            }
        }
        failure(ErrorKind::Conflict, "the function kept changing meanwhile; try again", Vec::new())
    }

    async fn delete_function(&self, gid: &str, env: &str, name: &str) -> Reply {
        let (doc, rev, size) = match self.read_function(gid, env, name).await {
            Ok(d) => d,
            Err(r) => return r,
        };
        let key = function_key(&self.prefix, gid, env, name);
        // Its history goes with it: a function made later under the name starts afresh.
        let (mut ops, history) = match self.history_removal(gid, env, name).await {
            Ok(removal) => removal,
            Err(r) => return r,
        };
        ops.push(Op::Delete { key: key.clone() });
        let delta = crate::quota::Delta { functions: -1, added: 0, removed: size + history };
        // The gateway's quota record may change meanwhile with another function: then it is
        // read again, as long as this function stays as it was.
        for _ in 0..32 {
            let (quota, counted) = match self.counted(gid, delta).await {
                Ok(q) => q,
                Err(r) => return r,
            };
            let txn = Txn { compares: vec![Compare { key: key.clone(), mod_revision: rev }, quota], ops: ops.iter().cloned().chain([counted]).collect() };
            match self.docs.store.txn(txn).await {
                Ok(TxnOutcome::Committed { .. }) => return json(StatusCode::OK, &json!({"deleted": format!("{env}/{}", doc.name)})),
                Ok(TxnOutcome::Conflict) => match self.docs.store.get(&key).await {
                    Ok(Some(kv)) if kv.mod_revision == rev => continue,
                    Ok(Some(_)) => break,
                    Ok(None) => return not_found("function"),
                    Err(e) => return store_down(e),
                },
                Err(e) => return store_down(e),
            }
        }
        failure(ErrorKind::Conflict, "the function changed meanwhile; try again", Vec::new())
    }

    /// Runs the stored function as a request would, without the route's plugins, and answers
    /// with what it answered and logged.
    async fn invoke(&self, gid: &str, env: &str, name: &str, raw: &Bytes) -> Reply {
        let input: InvokeInput = if raw.is_empty() {
            InvokeInput::default()
        } else {
            match body(raw) {
                Ok(b) => b,
                Err(r) => return r,
            }
        };
        // As many as a request through the proxy may carry.
        for (field, n) in [("headers", input.headers.as_ref().map_or(0, BTreeMap::len)), ("query", input.query.as_ref().map_or(0, BTreeMap::len))] {
            if n > INVOKE_FIELDS {
                return bad_input(vec![format!("{field}: {n} entries, more than the {INVOKE_FIELDS} an invocation may give")]);
            }
        }
        let mut headers: Vec<(String, String)> = input.headers.unwrap_or_default().into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
        let body = match input.body {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(v) => {
                if !headers.iter().any(|(k, _)| k == "content-type") {
                    headers.push(("content-type".into(), "application/json".into()));
                }
                Some(v.to_string())
            }
        };
        // As a request would: the id a client sent, or one made for it.
        let request_id = headers.iter().find(|(k, _)| k == "x-request-id").map_or_else(|| format!("invoke-{}", fastrand::u64(..)), |(_, v)| v.clone());
        let request = Request {
            method: input.method.map(|m| method_names(&[m]).remove(0)).unwrap_or_else(|| "POST".into()),
            path: input.path.unwrap_or_else(|| format!("/{env}/{name}")),
            query: input.query.unwrap_or_default().into_iter().collect(),
            headers,
            body,
            request_id,
            user: None,
        };
        let started = std::time::Instant::now();
        match self.run_function(gid, env, name, request).await {
            Ok((mut outcome, env_doc)) => {
                let took = started.elapsed().as_secs_f64() * 1000.0;
                // The body stays counted against the gateway's memory limit while its answer
                // is made of it, and the answer until it is sent, as a request's is.
                let held = std::mem::take(&mut outcome.hold);
                let logs = std::mem::take(&mut outcome.logs);
                let (status, fields, bytes) = weir_functions::live::answer(outcome, env_doc.debug, &env_doc.limits.limits());
                // A name sent more than once (cookies) lists its values.
                let mut headers: Map<String, Value> = Map::new();
                for (k, v) in fields {
                    match headers.get_mut(&k) {
                        Some(Value::Array(values)) => values.push(json!(v)),
                        Some(one) => *one = json!([one.take(), v]),
                        None => {
                            headers.insert(k, json!(v));
                        }
                    }
                }
                let text = String::from_utf8_lossy(&bytes);
                let is_json = headers.get("content-type").and_then(Value::as_str).is_some_and(|t| t.contains("json"));
                // JSON is checked and copied as it is, never made into a tree: a function's
                // small heap can answer a text whose tree would be many times its size.
                let as_text;
                let body: &RawValue = match is_json.then(|| serde_json::from_str::<&RawValue>(&text).ok()).flatten() {
                    Some(raw) => raw,
                    None => {
                        as_text = serde_json::value::to_raw_value(&*text).expect("a string serializes");
                        &as_text
                    }
                };
                let answer = InvocationOut { status, headers: &headers, body, logs: &logs, duration_ms: took };
                let body = weir_functions::live::held_bytes(serde_json::to_vec(&answer).expect("an invocation serializes"), held);
                let mut resp = http::Response::new(http_body_util::Full::new(body));
                resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                resp
            }
            Err(r) => r,
        }
    }

    /// Runs the stored function `{env}/{name}` on `request` with its environment's settings.
    pub(crate) async fn run_function(&self, gid: &str, env: &str, name: &str, request: Request) -> Result<(weir_functions::Outcome, EnvDoc), Reply> {
        let Some(functions) = self.functions.get() else { return Err(failure(ErrorKind::Unavailable, "functions do not run on this node", Vec::new())) };
        let key = function_key(&self.prefix, gid, env, name);
        let stored = self.docs.store.get(&key).await.map_err(store_down)?.ok_or_else(|| not_found("function"))?.value;
        let env_doc: EnvDoc = match self.docs.store.get(&env_key(&self.prefix, gid, env)).await.map_err(store_down)? {
            Some(kv) => serde_json::from_slice(&kv.value).unwrap_or_default(),
            None => return Err(failure(ErrorKind::Unavailable, "the gateway is not started yet", Vec::new())),
        };
        match functions.invoke(gid, &env_doc, &key, &stored, request).await {
            Ok(outcome) => Ok((outcome, env_doc)),
            Err(e) => {
                let mut reply = failure(ErrorKind::Unavailable, e.to_string(), Vec::new());
                if e == weir_functions::live::NotRun::Busy {
                    reply.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                }
                Err(reply)
            }
        }
    }

    async fn function_logs(&self, gid: &str, env: &str, name: &str, query: Option<&str>) -> Reply {
        if let Err(r) = self.read_function(gid, env, name).await {
            return r;
        }
        let since = match query.and_then(|q| weir_core::text::query_param(q, "since")) {
            None => 0,
            Some(s) => match time::OffsetDateTime::parse(&weir_core::text::percent_decode(s), &time::format_description::well_known::Rfc3339) {
                Ok(t) => t.unix_timestamp_nanos() / 1_000_000,
                Err(_) => return bad_input(vec![format!("since: {s:?} is not an RFC 3339 time")]),
            },
        };
        let limit = match query.and_then(|q| weir_core::text::query_param(q, "limit")).map(str::parse::<usize>) {
            None => 100,
            Some(Ok(n)) if (1..=weir_functions::LOG_LINES).contains(&n) => n,
            Some(_) => return bad_input(vec![format!("limit: a number from 1 to {}", weir_functions::LOG_LINES)]),
        };
        let lines = self.functions.get().and_then(|f| f.logs(gid, env, name)).map(|l| l.since(since, limit)).unwrap_or_default();
        json(StatusCode::OK, &json!({"list": lines, "total": lines.len()}))
    }
}
