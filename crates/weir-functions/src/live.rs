//! Functions on the data plane: a gateway's published functions and its environments as
//! the platform writes them (one partition per gateway, `{prefix}/platform/live/{gid}/`),
//! lowered into routes that end in a [`FunctionHandler`].
//!
//! Under the partition:
//! - `env/{env}`: an [`EnvDoc`], written by the platform's reconciler with the environment's
//!   routes: its hosts, merged plugins, whether it serves, its gateway's limits and variables;
//! - `fn/{env}/{name}`: a [`FunctionDoc`], written by the platform API when a function is
//!   saved (or promoted), and live as soon as the store's watch delivers it.
//!
//! Each function answers at `/{env}/{name}` on the gateway's hosts and `/{name}` on the
//! environment's own, as exact paths: anything else falls through to the routes the platform
//! renders (the environment's upstream, or 404). A function's `plugins` replace the
//! environment's of the same name for that function's routes only.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use weir_http::body::RespBody;
use weir_proxy::handler::{Answer, Call, Handler};
use weir_proxy::partition::{Contributor, Lowered, LoweredRoute, Relower};

use crate::engine::{DbRunner, Engine, Fetcher, Job, Reach, Request, Services, Table, User};
use crate::{Failure, Function, LimitsDoc, Logs, Outcome};

/// An environment as the data plane needs it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EnvDoc {
    pub environment: String,
    /// Hosts where the environment is the path prefix `/{env}`.
    pub gateway_hosts: Vec<String>,
    /// Hosts that are the environment's own (`{gid}.{env}.{base_domain}`, its custom domain).
    pub env_hosts: Vec<String>,
    /// Merged plugins of the environment, as stored (secret fields sealed).
    pub plugins: Map<String, Value>,
    /// False when the gateway is stopped or the environment inactive: its functions are not
    /// served (the platform's routes answer 503).
    pub serving: bool,
    pub limits: LimitsDoc,
    /// The gateway's variables (`imp.env`).
    pub vars: Map<String, Value>,
    /// `host:port` entries a function's `fetch` may reach.
    pub fetch_allow_list: Vec<String>,
    /// The database the environment's functions reach as `imp.db()`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<crate::DbScope>,
    /// Errors carry their stack (dev).
    pub debug: bool,
}

/// A function as saved.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FunctionDoc {
    /// Its name in the environment (`user/me`).
    pub name: String,
    pub environment: String,
    pub files: BTreeMap<String, String>,
    pub entrypoint: String,
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
    /// Where this version came from when it was promoted from another environment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promoted_from: Option<Origin>,
}

/// The environment and version a promoted function was copied from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    pub environment: String,
    pub version: u64,
}

/// The key prefix of gateway `gid`'s partition.
pub fn partition_prefix(prefix: &str, gid: &str) -> String {
    format!("{prefix}/platform/live/{gid}/")
}

pub fn env_key(prefix: &str, gid: &str, env: &str) -> String {
    format!("{}env/{env}", partition_prefix(prefix, gid))
}

pub fn function_key(prefix: &str, gid: &str, env: &str, name: &str) -> String {
    format!("{}fn/{env}/{name}", partition_prefix(prefix, gid))
}

/// Node-wide settings of the function runtime.
#[derive(Clone, Default)]
pub struct Settings {
    /// Carries out functions' fetches; `None`: fetch fails with a clear error.
    pub fetcher: Option<Fetcher>,
    /// Opens the gateway's secret variables.
    pub keyring: Option<Arc<weir_tls::Keyring>>,
    /// Runs `imp.db()` operations; `None`: they fail with a clear error.
    pub database: Option<DbRunner>,
}

impl EnvDoc {
    /// What the environment's calls may reach.
    pub fn reach(&self) -> Reach {
        Reach { allow: Arc::new(self.fetch_allow_list.clone()), database: self.database.clone() }
    }
}

/// Lowers gateways' functions into routes, and keeps one runtime per gateway and what each
/// function logged across lowerings.
pub struct Functions {
    dir: String,
    settings: Settings,
    engines: Mutex<HashMap<String, Weak<Engine>>>,
    /// Compiled functions by key.
    compiled: Mutex<HashMap<String, Compiled>>,
    /// Compiles of changed functions waiting or under way off the watch path: the newest
    /// stored value of each key, which its one compile task takes when it finishes the last.
    pending: Mutex<HashMap<String, Bytes>>,
    lanes: weir_upstream::lanes::Lanes,
    /// Gateways lowered before on this node: a function of theirs that changes compiles off
    /// the watch path, the partition serving what it had meanwhile.
    lowered: Mutex<std::collections::HashSet<String>>,
    relower: std::sync::OnceLock<Relower>,
    /// What the platform's saves on this node compiled, by the digest of their source, for the
    /// lowering that follows to take rather than compile again.
    offered: Mutex<std::collections::VecDeque<([u8; 32], crate::source::Compiled)>>,
    me: Weak<Functions>,
    logs: Mutex<HashMap<String, Weak<Logs>>>,
    /// Each gateway's budget for the lines its functions' buffers keep, by gateway id.
    log_budgets: Mutex<HashMap<String, Weak<crate::engine::Budget>>>,
    /// The last lowered table of each environment (`{gid}/{env}`), for `invoke`'s imports.
    tables: Mutex<HashMap<String, Table>>,
}

impl Functions {
    pub fn new(prefix: &str, settings: Settings) -> Arc<Functions> {
        Arc::new_cyclic(|me| Functions {
            dir: format!("{prefix}/platform/live/"),
            settings,
            engines: Mutex::default(),
            compiled: Mutex::default(),
            pending: Mutex::default(),
            lanes: weir_upstream::lanes::Lanes::new(COMPILES_AT_ONCE, 1),
            lowered: Mutex::default(),
            relower: std::sync::OnceLock::new(),
            offered: Mutex::default(),
            me: me.clone(),
            logs: Mutex::default(),
            log_budgets: Mutex::default(),
            tables: Mutex::default(),
        })
    }

    /// The runtime of gateway `gid` with `memory` bytes, started when there is none.
    fn engine(&self, gid: &str, memory: usize) -> Option<Arc<Engine>> {
        let mut engines = self.engines.lock().ok()?;
        engines.retain(|_, e| e.strong_count() > 0);
        let key = format!("{gid}/{memory}");
        if let Some(e) = engines.get(&key).and_then(Weak::upgrade) {
            return Some(e);
        }
        match Engine::start(gid, memory, Services { fetcher: self.settings.fetcher.clone(), database: self.settings.database.clone() }) {
            Ok(e) => {
                engines.insert(key, Arc::downgrade(&e));
                Some(e)
            }
            Err(e) => {
                tracing::error!(gateway = %gid, error = %e, "could not start a function runtime");
                None
            }
        }
    }

    /// Runs the function stored at `key` as `value` on gateway `gid`'s runtime, with the
    /// limits of `env`, outside any route (the platform's `invoke`).
    pub async fn invoke(&self, gid: &str, env: &EnvDoc, key: &str, value: &[u8], request: Request) -> Result<Outcome, String> {
        // The version stored now, which the lowering may not have reached yet: compiled for
        // this call alone when it has not, so that the cache only ever moves forward.
        let lowered = self.compiled.lock().unwrap_or_else(|e| e.into_inner()).get(key).filter(|c| c.bytes[..] == *value).map(|c| c.built.clone());
        let built = match (lowered, self.me.upgrade()) {
            (Some(built), _) => built,
            // On a blocking thread, in the gateway's turn with the compiles of its changes.
            (None, Some(me)) => {
                let (g, k, v) = (gid.to_string(), key.to_string(), value.to_vec());
                self.lanes.run(&tokio::runtime::Handle::current(), gid, move || me.build(&g, &k, &v)).await.flatten()
            }
            (None, None) => None,
        };
        let (_, func) = built.ok_or("the stored function does not compile")?;
        let limits = env.limits.limits();
        let engine = self.engine(gid, limits.memory).ok_or("the gateway's runtime could not start")?;
        let table = self.tables.lock().ok().and_then(|t| t.get(&format!("{gid}/{}", func.env)).cloned());
        let table = table.unwrap_or_else(|| Arc::new(HashMap::from([(func.name.clone(), func.clone())])));
        let run = FunctionHandler::run(engine, func, table, Arc::new(self.open_vars(&env.vars)), limits, Arc::new(env.reach()), request);
        // The runtime ends the call by its wall limit; this bounds the wait should it stop
        // answering altogether.
        match tokio::time::timeout(limits.wall + Duration::from_secs(2), run).await {
            Ok(Some(outcome)) => Ok(outcome),
            Ok(None) => Err("too many calls of this gateway's functions are in flight".to_string()),
            Err(_) => Ok(crate::engine::failed(Failure::Timeout("the call ran past its wall-clock limit"))),
        }
    }

    /// The variables with their secret values opened; one that does not open is left out.
    fn open_vars(&self, vars: &Map<String, Value>) -> Map<String, Value> {
        let Some(keyring) = &self.settings.keyring else { return vars.clone() };
        vars.iter()
            .filter_map(|(k, v)| match v.as_str().map(|s| keyring.open_field(s).map(|o| o.into_owned())) {
                Some(Ok(plain)) => Some((k.clone(), Value::String(plain))),
                Some(Err(_)) => None,
                None => Some((k.clone(), v.clone())),
            })
            .collect()
    }

    /// The log buffer of function `{gid}/{env}/{name}`, kept while the function is loaded.
    pub fn logs(&self, gid: &str, env: &str, name: &str) -> Option<Arc<Logs>> {
        self.logs.lock().ok()?.get(&format!("{gid}/{env}/{name}")).and_then(Weak::upgrade)
    }

    fn logs_for(&self, gid: &str, env: &str, name: &str) -> Arc<Logs> {
        let mut all = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        let key = format!("{gid}/{env}/{name}");
        if let Some(l) = all.get(&key).and_then(Weak::upgrade) {
            return l;
        }
        let budget = {
            let mut budgets = self.log_budgets.lock().unwrap_or_else(|e| e.into_inner());
            match budgets.get(gid).and_then(Weak::upgrade) {
                Some(b) => b,
                None => {
                    let b = Arc::new(crate::engine::Budget::new(crate::LOG_BYTES));
                    budgets.retain(|_, b| b.strong_count() > 0);
                    budgets.insert(gid.to_string(), Arc::downgrade(&b));
                    b
                }
            }
        };
        let l = Arc::new(Logs::new(budget));
        all.insert(key, Arc::downgrade(&l));
        // Buffers of functions gone are forgotten now and then (amortized over insertions).
        if all.len().is_power_of_two() {
            all.retain(|_, l| l.strong_count() > 0);
        }
        l
    }

    /// The function stored at `key` as `value`, parsed and compiled once per stored value;
    /// `true` when it has not been lowered before. With `defer`, one not compiled yet is
    /// compiled off the caller's thread ([`Functions::defer`]) and this answers what the key
    /// had before: its last compiled version, or nothing.
    fn function(&self, gid: &str, key: &str, value: &[u8], defer: bool) -> Option<(Arc<FunctionDoc>, Arc<Function>, bool)> {
        let mut cache = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        let had = cache.get_mut(key);
        if let Some(c) = had.as_ref().filter(|c| c.bytes[..] == *value) {
            let fresh = c.fresh;
            let built = c.built.clone().map(|(doc, f)| (doc, f, fresh));
            if let Some(c) = had {
                c.fresh = false;
            }
            return built;
        }
        let before = had.and_then(|c| c.built.clone()).map(|(doc, f)| (doc, f, false));
        drop(cache);
        // What a save on this node compiled is ready: taken now, with nothing to defer.
        if defer && !self.offered(value) && self.defer(gid, key, value) {
            return before;
        }
        let built = self.build(gid, key, value);
        // The value lowered is the newest: a compile still under way for the key is of an
        // older one, and keeps what it makes to itself.
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.remove(key);
        self.compiled.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_string(), Compiled { bytes: Bytes::copy_from_slice(value), built: built.clone(), fresh: false });
        drop(pending);
        built.map(|(doc, f)| (doc, f, true))
    }

    /// Has the function stored at `key` as `value` compiled on a blocking thread (at most
    /// [`COMPILES_AT_ONCE`] on the node, one per gateway, gateways taking turns), then its
    /// partition lowered again. A key changed again before its compile started is compiled
    /// once, as last stored, and a compile overtaken by a newer value keeps its result to
    /// itself.
    ///
    /// False (nothing done) without a watch loop to lower the partition again, or a runtime
    /// to compile on.
    fn defer(&self, gid: &str, key: &str, value: &[u8]) -> bool {
        let (Some(relower), Ok(handle), Some(me)) = (self.relower.get().cloned(), tokio::runtime::Handle::try_current(), self.me.upgrade()) else {
            return false;
        };
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.insert(key.to_string(), Bytes::copy_from_slice(value)).is_some() {
            // Its compile task takes the newest value when it is done with the one before.
            return true;
        }
        drop(pending);
        let (gid, key) = (gid.to_string(), key.to_string());
        let blocking = handle.clone();
        let asked = std::time::Instant::now();
        handle.spawn(async move {
            let (functions, lane) = (me.clone(), gid.clone());
            let work = move || {
                let started = std::time::Instant::now();
                loop {
                    let Some(value) = me.pending.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned() else { break };
                    let built = me.build(&gid, &key, &value);
                    let mut pending = me.pending.lock().unwrap_or_else(|e| e.into_inner());
                    if pending.get(&key) == Some(&value) {
                        me.compiled.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), Compiled { bytes: value, built, fresh: true });
                        pending.remove(&key);
                        break;
                    }
                }
                tracing::debug!(function = %key, waited = ?started.duration_since(asked), compiled = ?started.elapsed(), "a changed function compiled off the watch loop");
                relower.send(&key);
            };
            if functions.lanes.run(&blocking, &lane, work).await.is_none() {
                tracing::error!("compiling a changed function panicked");
            }
        });
        true
    }

    /// Keeps what a save on this node compiled `files` to, for the lowering of the stored
    /// function to take (the last [`OFFERS_KEPT`] are kept).
    pub fn offer(&self, files: &BTreeMap<String, String>, entry: &str, compiled: crate::source::Compiled) {
        let mut offered = self.offered.lock().unwrap_or_else(|e| e.into_inner());
        if offered.len() >= OFFERS_KEPT {
            offered.pop_front();
        }
        offered.push_back((source_digest(files, entry), compiled));
    }

    /// Whether a save on this node offered what the function stored as `value` compiles to.
    fn offered(&self, value: &[u8]) -> bool {
        let lock = || self.offered.lock().unwrap_or_else(|e| e.into_inner());
        if lock().is_empty() {
            return false;
        }
        let Ok(doc) = serde_json::from_slice::<FunctionDoc>(value) else { return false };
        let digest = source_digest(&doc.files, &doc.entrypoint);
        lock().iter().any(|(d, _)| *d == digest)
    }

    /// Parses and compiles the function stored at `key` as `value`; `None` (logged) when it
    /// does not read or compile.
    fn build(&self, gid: &str, key: &str, value: &[u8]) -> Option<(Arc<FunctionDoc>, Arc<Function>)> {
        let doc: FunctionDoc = serde_json::from_slice(value).ok()?;
        let digest = source_digest(&doc.files, &doc.entrypoint);
        let offered = {
            let mut offered = self.offered.lock().unwrap_or_else(|e| e.into_inner());
            offered.iter().position(|(d, _)| *d == digest).and_then(|i| offered.remove(i)).map(|(_, c)| c)
        };
        let compiled = match offered.map_or_else(|| crate::source::compile(&doc.files, &doc.entrypoint), Ok) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(function = %key, error = %e, "a stored function does not compile; not served");
                return None;
            }
        };
        let hash = ring::digest::digest(&ring::digest::SHA256, value);
        let version = format!("{}-{}", doc.version, hash.as_ref()[..6].iter().map(|b| format!("{b:02x}")).collect::<String>());
        let f = Arc::new(Function {
            env: doc.environment.clone(),
            name: doc.name.clone(),
            version,
            compiled,
            methods: doc.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
            logs: self.logs_for(gid, &doc.environment, &doc.name),
        });
        Some((Arc::new(doc), f))
    }
}

/// Compiles of changed functions under way at once on a node, off the watch path.
pub const COMPILES_AT_ONCE: usize = 2;

/// Compiles offered by saves kept on a node, waiting for their lowering.
pub const OFFERS_KEPT: usize = 8;

/// A function's source as one digest: its entry point and each file's path and text.
fn source_digest(files: &BTreeMap<String, String>, entry: &str) -> [u8; 32] {
    let mut d = ring::digest::Context::new(&ring::digest::SHA256);
    for part in std::iter::once(entry).chain(files.iter().flat_map(|(p, t)| [p.as_str(), t.as_str()])) {
        d.update(&(part.len() as u64).to_le_bytes());
        d.update(part.as_bytes());
    }
    d.finish().as_ref().try_into().unwrap_or([0; 32])
}

/// Gateways remembered as lowered before on a node.
const LOWERED_KEPT: usize = 16_384;

/// A stored value of a function and what it compiled to (`None`: it does not).
struct Compiled {
    bytes: Bytes,
    built: Option<(Arc<FunctionDoc>, Arc<Function>)>,
    /// Compiled off the watch path and not lowered yet: the lowering that takes it loads it.
    fresh: bool,
}

impl Contributor for Functions {
    fn partition<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(&self.dir)?;
        Some(&key[..self.dir.len() + rest.find('/')? + 1])
    }

    fn attach(&self, relower: Relower) {
        let _ = self.relower.set(relower);
    }

    fn lower(&self, partition: &str, objects: &[(&str, &[u8])]) -> Lowered {
        let gid = partition[self.dir.len()..].trim_end_matches('/');
        // A gateway's first lowering on this node (the node starting, the gateway created)
        // compiles in place; after that the watch path compiles nothing, so no gateway's
        // saves hold up another's changes.
        let defer = {
            let mut lowered = self.lowered.lock().unwrap_or_else(|e| e.into_inner());
            // Gateways come and go: past a bound the set starts again, costing each gateway
            // at most one more lowering compiled in place.
            if lowered.len() >= LOWERED_KEPT {
                lowered.clear();
            }
            !lowered.insert(gid.to_string())
        };
        let mut envs: BTreeMap<String, EnvDoc> = BTreeMap::new();
        let mut funcs: BTreeMap<String, Vec<(Arc<FunctionDoc>, Arc<Function>, bool)>> = BTreeMap::new();
        let mut present = std::collections::HashSet::new();
        for (key, value) in objects {
            let rest = &key[partition.len()..];
            if let Some(env) = rest.strip_prefix("env/") {
                if let Ok(doc) = serde_json::from_slice::<EnvDoc>(value) {
                    envs.insert(env.to_string(), doc);
                }
            } else if let Some(path) = rest.strip_prefix("fn/")
                && let Some((env, _)) = path.split_once('/')
            {
                present.insert(*key);
                if let Some(f) = self.function(gid, key, value, defer) {
                    funcs.entry(env.to_string()).or_default().push(f);
                }
            }
        }
        if let Ok(mut cache) = self.compiled.lock() {
            cache.retain(|k, _| !k.starts_with(partition) || present.contains(k.as_str()));
        }
        let own = format!("{gid}/");
        if let Ok(mut t) = self.tables.lock() {
            t.retain(|k, _| !k.starts_with(&own));
        }
        let mut out = Lowered::default();
        for (env_name, env) in &envs {
            if !env.serving {
                continue;
            }
            for h in env.gateway_hosts.iter().chain(&env.env_hosts) {
                if !out.hosts.contains(h) {
                    out.hosts.push(h.clone());
                }
            }
            let Some(list) = funcs.get(env_name).filter(|l| !l.is_empty()) else { continue };
            let limits = env.limits.limits();
            let Some(engine) = self.engine(gid, limits.memory) else { continue };
            let table: Table = Arc::new(list.iter().map(|(d, f, _)| (d.name.clone(), f.clone())).collect());
            if let Ok(mut t) = self.tables.lock() {
                t.insert(format!("{gid}/{env_name}"), table.clone());
            }
            let vars = Arc::new(self.open_vars(&env.vars));
            let reach = Arc::new(env.reach());
            // Functions without plugins of their own share one route per form, which finds the
            // function by its exact path; those with plugins get routes of their own.
            let mut shared: HashMap<String, Arc<FunctionHandler>> = HashMap::new();
            for (doc, func, fresh) in list {
                // A function is loaded before it takes traffic; one already loaded is not.
                if *fresh {
                    engine.warm(func.clone(), table.clone());
                }
                let handler = Arc::new(FunctionHandler {
                    engine: engine.clone(),
                    func: func.clone(),
                    table: table.clone(),
                    vars: vars.clone(),
                    limits,
                    reach: reach.clone(),
                    debug: env.debug,
                    series: crate::metrics::series(gid, env_name, &doc.name),
                });
                if doc.plugins.is_empty() {
                    shared.insert(doc.name.clone(), handler);
                    continue;
                }
                let mut plugins = env.plugins.clone();
                for (name, conf) in &doc.plugins {
                    // A function's own auth config takes its environment's scope: it accepts
                    // the environment's grants and no other credentials.
                    let mut conf = conf.clone();
                    if SCOPED_AUTH.contains(&name.as_str())
                        && let Some(own) = conf.as_object_mut()
                    {
                        own.insert("scope".into(), Value::String(grant_scope(gid, env_name)));
                    }
                    plugins.insert(name.clone(), conf);
                }
                let handler: Arc<dyn Handler> = handler;
                for (form, uri, hosts) in [("p", format!("/{env_name}/{}", doc.name), &env.gateway_hosts), ("h", format!("/{}", doc.name), &env.env_hosts)] {
                    push_route(&mut out, gid, format!("{form}/{env_name}/{}", doc.name), vec![uri], hosts, &plugins, handler.clone());
                }
            }
            if shared.is_empty() {
                continue;
            }
            let shared = Arc::new(shared);
            let mut names: Vec<&String> = shared.keys().collect();
            names.sort();
            for (form, prefix, hosts) in [("p", format!("/{env_name}/"), &env.gateway_hosts), ("h", "/".to_string(), &env.env_hosts)] {
                let uris = names.iter().map(|n| format!("{prefix}{n}")).collect();
                let handler: Arc<dyn Handler> = Arc::new(Dispatch { prefix: prefix.clone(), functions: shared.clone(), timeout: limits.wall + Duration::from_secs(3) });
                push_route(&mut out, gid, format!("{form}/{env_name}"), uris, hosts, &env.plugins, handler);
            }
        }
        out
    }
}

/// Adds a route of exact `uris` on `hosts` ending in `handler`.
fn push_route(out: &mut Lowered, gid: &str, id: String, uris: Vec<String>, hosts: &[String], plugins: &Map<String, Value>, handler: Arc<dyn Handler>) {
    if hosts.is_empty() || uris.is_empty() {
        return;
    }
    let route = json!({"uris": uris, "hosts": hosts, "priority": 20, "name": format!("{gid} {id}"), "plugins": plugins});
    match serde_json::from_value(route) {
        Ok(route) => out.routes.push(LoweredRoute { id, route, handler: Some(handler) }),
        Err(e) => tracing::warn!(gateway = %gid, route = %id, error = %e, "a function route does not read; not served"),
    }
}

/// The shared route of an environment's functions: the function is the one the exact path
/// names (after `prefix`).
struct Dispatch {
    prefix: String,
    functions: Arc<HashMap<String, Arc<FunctionHandler>>>,
    timeout: Duration,
}

impl Handler for Dispatch {
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn call(&self, call: Call<'_>) -> Answer {
        match call.parts.uri.path().strip_prefix(&self.prefix).and_then(|name| self.functions.get(name)) {
            Some(f) => f.call(call),
            // A plugin of the route rewrote the path to one no function has.
            None => Box::pin(async { error_response(StatusCode::NOT_FOUND, "no function at this path", None) }),
        }
    }
}

/// A route's end: one function, called on its gateway's runtime.
pub struct FunctionHandler {
    engine: Arc<Engine>,
    func: Arc<Function>,
    table: Table,
    vars: Arc<Map<String, Value>>,
    limits: crate::Limits,
    reach: Arc<Reach>,
    debug: bool,
    series: Arc<crate::metrics::Series>,
}

/// A JSON error answer, as the gateway's own refusals are written.
pub fn error_response(status: StatusCode, message: &str, extra: Option<(&str, &str)>) -> Response<RespBody> {
    let mut body = json!({"error_msg": message});
    if let Some((k, v)) = extra {
        body[k] = json!(v);
    }
    let mut resp = Response::new(RespBody::full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

/// What a call's outcome answers: status, headers and body.
pub fn answer(outcome: Outcome, debug: bool, limits: &crate::Limits) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let json_error = |status: u16, message: &str, stack: Option<&str>| {
        let mut body = json!({"error_msg": message});
        if let Some(stack) = stack {
            body["stack"] = json!(stack);
        }
        (status, vec![("content-type".to_string(), "application/json".to_string())], body.to_string().into_bytes())
    };
    match outcome.result {
        Ok(reply) => (reply.status, reply.headers, reply.body),
        Err(Failure::Threw { message, stack, status, .. }) => json_error(status.unwrap_or(500), &message, (debug && !stack.is_empty()).then_some(stack.as_str())),
        Err(Failure::Timeout(why)) => json_error(504, why, None),
        Err(Failure::Memory) => json_error(500, &format!("the function ran out of memory (the gateway's limit is {} MiB)", limits.memory >> 20), None),
        Err(Failure::Internal(why)) => json_error(500, &why, None),
    }
}

/// What a call's outcome answers, as a response.
pub fn respond(mut outcome: Outcome, debug: bool, limits: &crate::Limits) -> Response<RespBody> {
    let hold = std::mem::take(&mut outcome.hold);
    let (status, headers, body) = answer(outcome, debug, limits);
    let body = match hold.is_empty() {
        true => bytes::Bytes::from(body),
        false => bytes::Bytes::from_owner(Held { body, _hold: hold }),
    };
    let mut resp = Response::new(RespBody::full(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), http::HeaderValue::from_str(&v)) {
            // The gateway frames the body itself.
            if k != http::header::CONTENT_LENGTH && k != http::header::TRANSFER_ENCODING && k != http::header::CONNECTION {
                resp.headers_mut().append(k, v);
            }
        }
    }
    resp
}

/// A reply body with the bytes it holds of its gateway's limit, given back when it goes.
struct Held {
    body: Vec<u8>,
    _hold: crate::engine::Hold,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

impl FunctionHandler {
    /// Runs the function on `request`, as a route's call or the platform's invoke does.
    pub async fn run(engine: Arc<Engine>, func: Arc<Function>, table: Table, vars: Arc<Map<String, Value>>, limits: crate::Limits, reach: Arc<Reach>, request: Request) -> Option<Outcome> {
        engine.call(move |reply| Job { func, table, vars, limits, reach, request, reply, place: None }).await
    }
}

fn decode(s: &str) -> String {
    weir_core::text::percent_decode(&s.replace('+', " ")).into_owned()
}

/// Who a call came from, as a function sees it in `ctx.user`: the consumer an auth plugin
/// named and, when that consumer is an application's grant, the application and the grant.
pub fn user_of(consumer: Option<&str>, notes: &weir_plugins::Notes) -> Option<User> {
    Some(User { name: consumer?.to_string(), grant: weir_plugins::grant_usage::grantee(notes).cloned() })
}

/// Auth plugins whose credentials carry a scope: in a tenant's layer, its environment's.
pub const SCOPED_AUTH: [&str; 3] = ["key-auth", "basic-auth", "jwt-auth"];

/// The scope of an environment's grants, as its routes' auth plugins name it.
pub fn grant_scope(gid: &str, env: &str) -> String {
    format!("wp.{gid}.{env}")
}

/// The request a function sees of a call.
pub fn request_of(parts: &http::request::Parts, body: &[u8], user: Option<User>) -> Request {
    let query = parts.uri.query().map(|q| weir_core::text::query_pairs(q).map(|(k, v)| (decode(k), decode(v))).collect()).unwrap_or_default();
    let text = |v: &http::HeaderValue| v.to_str().map_or_else(|_| String::from_utf8_lossy(v.as_bytes()).into_owned(), str::to_string);
    let headers = parts.headers.iter().map(|(k, v)| (k.as_str().to_string(), text(v))).collect();
    let request_id = parts.headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string).unwrap_or_else(crate::sdk::request_id);
    Request {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query,
        headers,
        body: (!body.is_empty()).then(|| String::from_utf8_lossy(body).into_owned()),
        request_id,
        user,
    }
}

impl Handler for FunctionHandler {
    fn timeout(&self) -> Duration {
        self.limits.wall + Duration::from_secs(3)
    }

    fn call(&self, call: Call<'_>) -> Answer {
        if !self.func.methods.is_empty() && !self.func.methods.iter().any(|m| m == call.parts.method.as_str()) {
            let mut resp = error_response(StatusCode::METHOD_NOT_ALLOWED, &format!("{} is not one of this function's methods", call.parts.method), None);
            if let Ok(v) = http::HeaderValue::from_str(&self.func.methods.join(", ")) {
                resp.headers_mut().insert(http::header::ALLOW, v);
            }
            return Box::pin(async move { resp });
        }
        let request = request_of(&call.parts, &call.body, user_of(call.consumer, call.notes));
        let (engine, func, table, vars, limits, reach, debug) = (self.engine.clone(), self.func.clone(), self.table.clone(), self.vars.clone(), self.limits, self.reach.clone(), self.debug);
        let series = self.series.clone();
        Box::pin(async move {
            let started = std::time::Instant::now();
            let resp = match FunctionHandler::run(engine, func, table, vars, limits, reach, request).await {
                Some(outcome) => respond(outcome, debug, &limits),
                None => {
                    let mut resp = error_response(StatusCode::SERVICE_UNAVAILABLE, "too many calls of this gateway's functions are in flight", None);
                    resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                    resp
                }
            };
            series.observe(started.elapsed(), resp.status().is_server_error());
            resp
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(v: u32) -> Vec<u8> {
        let doc = FunctionDoc { name: "f".into(), environment: "dev".into(), files: BTreeMap::from([("index.ts".to_string(), format!("export default () => ({{ v: {v} }});"))]), entrypoint: "index.ts".into(), version: u64::from(v), ..FunctionDoc::default() };
        serde_json::to_vec(&doc).unwrap()
    }

    fn cached_version(f: &Functions, key: &str) -> Option<u64> {
        f.compiled.lock().unwrap().get(key).and_then(|c| c.built.as_ref()).map(|(doc, _)| doc.version)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_function_compiles_off_the_lowering_and_an_overtaken_compile_keeps_its_result() {
        let f = Functions::new("/weir", Settings::default());
        let (relower, mut relowers) = Relower::channel();
        f.attach(relower);
        let key = "/weir/platform/live/g/fn/dev/f";

        // A gateway's first lowering compiles in place.
        let (doc, _, fresh) = f.function("g", key, &stored(1), false).unwrap();
        assert_eq!((doc.version, fresh), (1, true));

        // The gateway's compile lane is held, so the compile of version 2 waits for it; the
        // lowering answers version 1 meanwhile.
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let (taken, took) = tokio::sync::oneshot::channel();
        let lane = {
            let f = f.clone();
            tokio::spawn(async move {
                f.lanes
                    .run(&tokio::runtime::Handle::current(), "g", move || {
                        let _ = taken.send(());
                        held.recv()
                    })
                    .await
            })
        };
        took.await.unwrap();
        f.compiled.lock().unwrap().get_mut(key).unwrap().fresh = false;
        let (doc, _, fresh) = f.function("g", key, &stored(2), true).unwrap();
        assert_eq!((doc.version, fresh), (1, false));
        assert_eq!(f.pending.lock().unwrap().get(key).map(|b| b.to_vec()), Some(stored(2)));

        // Version 3 compiled in place (a lowering that may not defer) overtakes it: once the
        // lane is free, the compile of version 2 ends without replacing version 3.
        let (doc, _, _) = f.function("g", key, &stored(3), false).unwrap();
        assert_eq!(doc.version, 3);
        hold.send(()).unwrap();
        lane.await.unwrap();
        let asked = tokio::time::timeout(Duration::from_secs(30), relowers.recv()).await.unwrap();
        assert_eq!(asked.as_deref(), Some(key));
        assert_eq!(cached_version(&f, key), Some(3));

        // A change the lowering defers is compiled, asked to be lowered again, and then taken
        // as fresh (to be loaded before it takes traffic).
        assert_eq!(f.function("g", key, &stored(4), true).unwrap().0.version, 3);
        let asked = tokio::time::timeout(Duration::from_secs(30), relowers.recv()).await.unwrap();
        assert_eq!(asked.as_deref(), Some(key));
        let (doc, _, fresh) = f.function("g", key, &stored(4), true).unwrap();
        assert_eq!((doc.version, fresh), (4, true));
        assert!(!f.function("g", key, &stored(4), true).unwrap().2, "fresh once");
    }
}
