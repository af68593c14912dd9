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

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
use crate::{Failure, Function, LimitsDoc, Logs, Outcome, lock};

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
    /// The gateway's incarnation: a gateway made again with an earlier one's id has another,
    /// and gets nothing the earlier one left on a node.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub incarnation: String,
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
    /// Compiled functions, one cache per gateway (by id): a big gateway's lowering, thousands
    /// of lookups on a thread that may run nice, holds no lock another gateway's takes.
    compiled: Mutex<HashMap<String, Arc<Cache>>>,
    /// Each gateway's compiled sources by digest, while a function (or an offer) holds them.
    sources: Mutex<HashMap<(String, [u8; 32]), Weak<crate::source::Compiled>>>,
    /// Compiles of changed functions waiting or under way off the watch path: the newest
    /// stored value of each key, which its one compile task takes when it finishes the last.
    pending: Mutex<HashMap<String, Bytes>>,
    lanes: weir_upstream::lanes::Lanes,
    /// Gateways lowered before on this node (until their partition is gone): a function of
    /// theirs that changes compiles off the watch path, the partition serving what it had
    /// meanwhile.
    lowered: Mutex<std::collections::HashSet<String>>,
    relower: std::sync::OnceLock<Relower>,
    /// What the platform's saves on this node compiled, by gateway, oldest first: held (and
    /// found through `sources`) until the lowering that follows takes it rather than compile
    /// again.
    offered: Mutex<std::collections::VecDeque<(String, [u8; 32], Arc<crate::source::Compiled>)>>,
    me: Weak<Functions>,
    #[cfg(test)]
    gate: Gate,
    logs: Mutex<HashMap<String, Weak<Logs>>>,
    /// Each gateway's budget for the lines its functions' buffers keep, by gateway id.
    log_budgets: Mutex<HashMap<String, Weak<crate::engine::Budget>>>,
    /// The last lowered table of each environment (`{gid}/{env}`), for `invoke`'s imports.
    tables: Mutex<HashMap<String, Table>>,
    /// The incarnation each gateway was last lowered or invoked as on this node: another one
    /// means the id was deleted and made again, and the node forgets the earlier gateway.
    incarnations: Mutex<HashMap<String, Incarnations>>,
    /// Compiles under way for `invoke` of stored values the lowering has not reached, by key.
    invoking: Mutex<HashMap<String, (Bytes, tokio::sync::watch::Receiver<Option<Built>>)>>,
}

/// A stored function compiled, or `None` when it does not compile.
type Built = Option<(Arc<FunctionDoc>, Arc<Function>)>;

/// One gateway's compiled functions by key.
type Cache = Mutex<HashMap<String, Entry>>;

/// What a stored value built to, or, where it built to nothing (it does not read or compile
/// here), the version the node served before it: a node keeps serving its last good version
/// of a function rather than none.
fn kept_if_none(key: &str, bytes: Bytes, built: Built, before: Built) -> Entry {
    match (built, before) {
        (Some(b), _) => Entry { bytes, built: Some(b), fresh: true, series: None },
        (None, Some(before)) => {
            tracing::warn!(function = %key, version = before.0.version, "keeps serving its last version that compiled");
            Entry { bytes, built: Some(before), fresh: false, series: None }
        }
        (None, None) => Entry { bytes, built: None, fresh: true, series: None },
    }
}

impl Functions {
    pub fn new(prefix: &str, settings: Settings) -> Arc<Functions> {
        Arc::new_cyclic(|me| Functions {
            dir: format!("{prefix}/platform/live/"),
            settings,
            engines: Mutex::default(),
            compiled: Mutex::default(),
            sources: Mutex::default(),
            pending: Mutex::default(),
            lanes: weir_upstream::lanes::Lanes::new(COMPILES_AT_ONCE, 1),
            lowered: Mutex::default(),
            relower: std::sync::OnceLock::new(),
            offered: Mutex::default(),
            me: me.clone(),
            #[cfg(test)]
            gate: Gate::default(),
            logs: Mutex::default(),
            log_budgets: Mutex::default(),
            invoking: Mutex::default(),
            tables: Mutex::default(),
            incarnations: Mutex::default(),
        })
    }

    /// The runtime of gateway `gid` (as `env` names its incarnation) with `memory` bytes,
    /// started when there is none.
    fn engine(&self, gid: &str, env: &EnvDoc, memory: usize) -> Option<Arc<Engine>> {
        let mut engines = self.engines.lock().ok()?;
        engines.retain(|_, e| e.strong_count() > 0);
        let key = format!("{gid}/{}/{memory}", env.incarnation);
        // A runtime the watchdog found stuck is replaced: the gateway is lowered again (by
        // the watchdog's hook) onto a fresh one.
        if let Some(e) = engines.get(&key).and_then(Weak::upgrade).filter(|e| !e.stuck()) {
            return Some(e);
        }
        // A gateway whose runtime went nice for keeping its core busy does not shed that by
        // moving to another (a new memory limit, or a stuck one's replacement).
        let incarnation = format!("{gid}/{}/", env.incarnation);
        let nice = engines.iter().any(|(k, e)| k.starts_with(&incarnation) && e.upgrade().is_some_and(|e| e.nice()));
        match Engine::start_with(gid, memory, Services { fetcher: self.settings.fetcher.clone(), database: self.settings.database.clone() }, nice) {
            Ok(e) => {
                engines.insert(key, Arc::downgrade(&e));
                let (me, partition) = (self.me.clone(), format!("{}{gid}/", self.dir));
                e.when_stuck(move || {
                    if let Some(relower) = me.upgrade().and_then(|me| me.relower.get().cloned()) {
                        relower.send(&format!("{partition}env/dev"));
                    }
                });
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
    pub async fn invoke(&self, gid: &str, env: &EnvDoc, key: &str, value: &[u8], request: Request) -> Result<Outcome, NotRun> {
        if !self.meet(&format!("{}{gid}/", self.dir), gid, &env.incarnation) {
            return Err(NotRun::Unable("the gateway was deleted"));
        }
        // The version stored now, which the lowering may not have reached yet: compiled for
        // this call alone when it has not, so that the cache only ever moves forward.
        let lowered = self.cached(gid).and_then(|c| lock(&c).get(key).filter(|c| c.bytes[..] == *value).map(|c| if c.fresh { c.built.clone() } else { None }));
        let built = match (lowered, self.me.upgrade()) {
            (Some(built), _) => built,
            (None, Some(me)) => me.compile_for_invoke(gid, key, value).await,
            (None, None) => None,
        };
        let (_, func) = built.ok_or(NotRun::Unable("the stored function does not compile"))?;
        // A method it does not answer is refused as a request's is.
        if let Some((message, allow)) = not_allowed(&func, &request.method) {
            let headers = vec![crate::engine::JSON_TYPE, ("allow".into(), allow.into())];
            let body = json!({"error_msg": message}).to_string().into_bytes();
            return Ok(Outcome { result: Ok(crate::Reply { status: 405, headers, body }), logs: Vec::new(), cpu: Duration::ZERO, hold: Default::default() });
        }
        let limits = env.limits.limits();
        let engine = self.engine(gid, env, limits.memory).ok_or(NotRun::Unable("the gateway's runtime could not start"))?;
        let table = self.tables.lock().ok().and_then(|t| t.get(&format!("{gid}/{}", func.env)).cloned());
        let (func, table) = match table {
            Some(table) => (func, table),
            None => self.unserved(gid, func),
        };
        // A version compiled for this call alone is bound to what it imports now, as a
        // lowering would bind it.
        let func = match func.links {
            0 if !func.compiled.links.is_empty() => {
                let mut named: Vec<(&str, &Function)> = table.iter().filter(|(n, _)| **n != func.name).map(|(n, f)| (n.as_str(), &**f)).collect();
                named.push((func.name.as_str(), &func));
                let links = link_hashes(&named).pop().unwrap_or(0);
                bound(&func, links)
            }
            _ => func,
        };
        let run = FunctionHandler::run(engine, func, table, Arc::new(self.open_vars(&env.vars)), limits, Arc::new(env.reach()), request);
        // The runtime ends the call by its wall limit; this bounds the wait should it stop
        // answering altogether.
        match tokio::time::timeout(limits.wall + Duration::from_secs(2), run).await {
            Ok(Some(outcome)) => Ok(outcome),
            Ok(None) => Err(NotRun::Busy),
            Err(_) => Ok(crate::engine::failed(Failure::Timeout("the call ran past its wall-clock limit"))),
        }
    }

    /// The table of `func`'s environment where no lowering serves it (its gateway stopped, say):
    /// the functions the node has compiled for the environment, bound to each other as a
    /// lowering would bind them, with `func` among them.
    fn unserved(&self, gid: &str, func: Arc<Function>) -> (Arc<Function>, Table) {
        let prefix = format!("{}{gid}/fn/{}/", self.dir, func.env);
        let cache = self.cached(gid).unwrap_or_default();
        let kept: Vec<(String, Arc<FunctionDoc>, Arc<Function>)> =
            lock(&cache).iter().filter(|(k, _)| k.starts_with(&prefix)).filter_map(|(k, e)| e.built.clone().map(|(d, f)| (k.clone(), d, f))).collect();
        let mut list: Vec<(&str, Arc<FunctionDoc>, Arc<Function>)> = kept.iter().map(|(k, d, f)| (k.as_str(), d.clone(), f.clone())).collect();
        Self::link(&cache, &mut list);
        let mut table: HashMap<String, Arc<Function>> = list.into_iter().map(|(_, d, f)| (d.name.clone(), f)).collect();
        // The version asked for, though the lowering has another (or none) of it.
        let func = match table.get(&func.name) {
            Some(bound) if bound.version == func.version => bound.clone(),
            _ => {
                table.insert(func.name.clone(), func.clone());
                func
            }
        };
        (func, Arc::new(table))
    }

    /// Compiles `value`, stored at `key`, for `invoke` alone: on a blocking thread, in the
    /// gateway's turn with the compiles of its changes. Calls of the same value that come while
    /// it compiles wait for the one compile, which ends whether or not anyone still waits.
    async fn compile_for_invoke(self: Arc<Self>, gid: &str, key: &str, value: &[u8]) -> Built {
        let mut waiting = {
            let mut all = self.invoking.lock().unwrap_or_else(|e| e.into_inner());
            match all.get(key).filter(|(v, _)| v[..] == *value) {
                Some((_, rx)) => rx.clone(),
                None => {
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    let value = Bytes::copy_from_slice(value);
                    all.insert(key.to_string(), (value.clone(), rx.clone()));
                    let (me, gid, key, ours) = (self.clone(), gid.to_string(), key.to_string(), rx.clone());
                    tokio::spawn(async move {
                        let (f, g, k) = (me.clone(), gid.clone(), key.clone());
                        let built = me
                            .lanes
                            .run(&tokio::runtime::Handle::current(), &gid, move || {
                                #[cfg(test)]
                                f.gate.pass();
                                f.build(&g, &k, &value)
                            })
                            .await
                            .flatten();
                        tx.send_replace(Some(built));
                        let mut all = me.invoking.lock().unwrap_or_else(|e| e.into_inner());
                        if all.get(&key).is_some_and(|(_, rx)| rx.same_channel(&ours)) {
                            all.remove(&key);
                        }
                    });
                    rx
                }
            }
        };
        waiting.wait_for(Option::is_some).await.ok().and_then(|built| built.clone()).flatten()
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

    /// [`Functions::function_in`] with gateway `gid`'s cache.
    #[cfg(test)]
    fn function(&self, gid: &str, key: &str, value: &[u8], defer: bool) -> Built {
        self.function_in(&self.cache_of(gid), gid, key, value, defer)
    }

    /// Gateway `gid`'s compiled functions, where it has any.
    fn cached(&self, gid: &str) -> Option<Arc<Cache>> {
        lock(&self.compiled).get(gid).cloned()
    }

    /// Gateway `gid`'s compiled functions, an empty cache where it has none yet.
    fn cache_of(&self, gid: &str) -> Arc<Cache> {
        let mut all = lock(&self.compiled);
        match all.get(gid) {
            Some(c) => c.clone(),
            None => all.entry(gid.to_string()).or_default().clone(),
        }
    }

    /// The function stored at `key` as `value` (gateway `gid`'s, whose cache is `cache`),
    /// parsed and compiled once per stored value. A source the gateway already has compiled
    /// (a save on this node offered it, or a loaded function has it) is taken as it is; with
    /// `defer`, any other is compiled off the caller's thread ([`Functions::defer`]) and this
    /// answers what the key had before: its last compiled version, or nothing.
    fn function_in(&self, cache: &Cache, gid: &str, key: &str, value: &[u8], defer: bool) -> Built {
        let before = {
            let cache = lock(cache);
            let had = cache.get(key);
            let before = had.and_then(|c| c.built.clone());
            if had.is_some_and(|c| c.bytes[..] == *value) {
                return before;
            }
            before
        };
        let doc: Option<FunctionDoc> = serde_json::from_slice(value).ok();
        let digest = doc.as_ref().map(|d| source_digest(&d.files, &d.entrypoint));
        let ready = digest.and_then(|d| self.compiled_source(gid, &d));
        if ready.is_none() && doc.is_some() && defer && self.defer(gid, key, value) {
            return before;
        }
        // The watch loop (or a first lowering) waits on this one: compiled at its priority.
        if let (Some(_), Some(digest)) = (&ready, &digest) {
            self.taken(gid, digest);
        }
        let built = doc.zip(digest).and_then(|(doc, digest)| {
            let code = ready.or_else(|| self.compile(key, &doc, false))?;
            Some(self.assemble(gid, value, doc, digest, code))
        });
        let entry = kept_if_none(key, Bytes::copy_from_slice(value), built, before);
        let built = entry.built.clone();
        // The value lowered is the newest: a compile still under way for the key is of an
        // older one, and keeps what it makes to itself.
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.remove(key);
        lock(cache).insert(key.to_string(), entry);
        drop(pending);
        built
    }

    /// Has the function stored at `key` as `value` compiled on a blocking thread (at most
    /// [`COMPILES_AT_ONCE`] on the node, one per gateway, one compile per turn, gateways
    /// taking turns), then its partition lowered again. A key changed again before its compile
    /// started is compiled once, as last stored, and a compile overtaken by a newer value
    /// keeps its result to itself.
    ///
    /// False (nothing done) without a watch loop to lower the partition again, or a runtime
    /// to compile on.
    fn defer(&self, gid: &str, key: &str, value: &[u8]) -> bool {
        let (Some(relower), Ok(handle), Some(me)) = (self.relower.get().cloned(), tokio::runtime::Handle::try_current(), self.me.upgrade()) else {
            return false;
        };
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.insert(key.to_string(), Bytes::copy_from_slice(value)).is_some() {
            // Its compile task takes the newest value when its turn comes.
            return true;
        }
        drop(pending);
        let (gid, key) = (gid.to_string(), key.to_string());
        let asked = std::time::Instant::now();
        let blocking = handle.clone();
        handle.spawn(async move {
            loop {
                let (f, g, k) = (me.clone(), gid.clone(), key.clone());
                let turn = move || {
                    let Some(value) = f.pending.lock().unwrap_or_else(|e| e.into_inner()).get(&k).cloned() else { return Turn::Done };
                    #[cfg(test)]
                    f.gate.pass();
                    let started = std::time::Instant::now();
                    let built = f.build(&g, &k, &value);
                    tracing::debug!(function = %k, since_asked = ?started.duration_since(asked), compiled = ?started.elapsed(), "a changed function compiled off the watch loop");
                    let mut pending = f.pending.lock().unwrap_or_else(|e| e.into_inner());
                    match pending.get(&k) {
                        Some(newest) if *newest == value => {
                            let cache = f.cache_of(&g);
                            let mut compiled = lock(&cache);
                            let before = compiled.get(&k).and_then(|c| c.built.clone());
                            compiled.insert(k.clone(), kept_if_none(&k, value, built, before));
                            pending.remove(&k);
                            Turn::Done
                        }
                        // Changed meanwhile: compiled again, in a turn of its own.
                        Some(_) => Turn::Again,
                        // Lowered in place meanwhile, or its gateway is gone.
                        None => Turn::Done,
                    }
                };
                match me.lanes.run(&blocking, &gid, turn).await {
                    Some(Turn::Again) => continue,
                    Some(Turn::Done) => {}
                    None => {
                        tracing::error!(function = %key, "compiling a changed function panicked");
                        me.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                    }
                }
                relower.send(&key);
                break;
            }
        });
        true
    }

    /// Keeps what a save to gateway `gid` on this node compiled `files` to, until the
    /// lowering of the stored function takes it ([`Functions::taken`]). At most
    /// [`OFFERS_KEPT`] wait on the node: past that, the oldest of the gateway that has the
    /// most waiting goes, so a gateway saving in a loop drops its own, not another's.
    pub fn offer(&self, gid: &str, files: &BTreeMap<String, String>, entry: &str, compiled: crate::source::Compiled) {
        let compiled = Arc::new(compiled);
        let digest = source_digest(files, entry);
        self.keep_source(gid, digest, &compiled);
        let mut offered = lock(&self.offered);
        // The same source offered again replaces the one waiting, which nothing finds any more.
        offered.retain(|(g, d, _)| g != gid || *d != digest);
        if offered.len() >= OFFERS_KEPT {
            let mut counts: HashMap<&str, usize> = HashMap::new();
            for (g, _, _) in offered.iter() {
                *counts.entry(g.as_str()).or_default() += 1;
            }
            // Ties go to the gateway whose offer is oldest.
            let most = counts.values().copied().max().unwrap_or(0);
            let at = offered.iter().position(|(g, _, _)| counts.get(g.as_str()) == Some(&most));
            if let Some(at) = at {
                offered.remove(at);
            }
        }
        offered.push_back((gid.to_string(), digest, compiled));
    }

    /// Notes that a lowering of gateway `gid` took its compiled source of `digest`: an offer
    /// of it has done its work.
    fn taken(&self, gid: &str, digest: &[u8; 32]) {
        lock(&self.offered).retain(|(g, d, _)| g != gid || d != digest);
    }

    /// What gateway `gid` has compiled a source of `digest` to: offered by a save, or held by a
    /// function of its loaded. Gateways share nothing here, so no tenant learns by its saves'
    /// speed what another's sources are.
    fn compiled_source(&self, gid: &str, digest: &[u8; 32]) -> Option<Arc<crate::source::Compiled>> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner()).get(&(gid.to_string(), *digest)).and_then(Weak::upgrade)
    }

    /// Notes that gateway `gid` has `compiled` for the source of `digest`, while something
    /// holds it.
    fn keep_source(&self, gid: &str, digest: [u8; 32], compiled: &Arc<crate::source::Compiled>) {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        // Sources nothing holds any more are forgotten now and then.
        if sources.len().is_power_of_two() {
            sources.retain(|_, c| c.strong_count() > 0);
        }
        sources.insert((gid.to_string(), digest), Arc::downgrade(compiled));
    }

    /// Binds each function of one environment's `list` (key, document, function) that imports
    /// others by name to the versions of those it reaches now: one whose imports changed since
    /// is a new function, whose modules load afresh, kept for its key in its gateway's `cache`.
    fn link(cache: &Cache, list: &mut [(&str, Arc<FunctionDoc>, Arc<Function>)]) {
        if list.iter().all(|(_, _, f)| f.compiled.links.is_empty()) {
            return;
        }
        let changed: Vec<(usize, u64)> = {
            let named: Vec<(&str, &Function)> = list.iter().map(|(_, d, f)| (d.name.as_str(), &**f)).collect();
            link_hashes(&named).into_iter().enumerate().filter(|&(i, links)| links != 0 && list[i].2.links != links).collect()
        };
        if changed.is_empty() {
            return;
        }
        let mut cache = lock(cache);
        for (i, links) in changed {
            let (key, _, old) = &list[i];
            let new = bound(old, links);
            if let Some((_, kept)) = cache.get_mut(*key).and_then(|c| c.built.as_mut())
                && Arc::ptr_eq(kept, old)
            {
                *kept = new.clone();
            }
            list[i].2 = new;
        }
    }

    /// Parses and compiles the function stored at `key` as `value` (or takes the gateway's
    /// compiled source); `None` (logged) when it does not read or compile.
    fn build(&self, gid: &str, key: &str, value: &[u8]) -> Built {
        let doc: FunctionDoc = serde_json::from_slice(value).ok()?;
        let digest = source_digest(&doc.files, &doc.entrypoint);
        let code = self.compiled_source(gid, &digest).or_else(|| self.compile(key, &doc, true))?;
        Some(self.assemble(gid, value, doc, digest, code))
    }

    /// Compiles the source of `doc`, stored at `key`, in the `background` when nothing urgent
    /// waits on it; `None` (logged) when it does not compile.
    fn compile(&self, key: &str, doc: &FunctionDoc, background: bool) -> Option<Arc<crate::source::Compiled>> {
        let compile = if background { crate::source::compile_in_background } else { crate::source::compile };
        match compile(&doc.files, &doc.entrypoint) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::warn!(function = %key, error = %e, "a stored function does not compile; not served");
                None
            }
        }
    }

    /// The function of `doc` (its source's `digest`, compiled to `compiled`), stored as
    /// `value`.
    fn assemble(&self, gid: &str, value: &[u8], doc: FunctionDoc, digest: [u8; 32], compiled: Arc<crate::source::Compiled>) -> (Arc<FunctionDoc>, Arc<Function>) {
        self.keep_source(gid, digest, &compiled);
        let hash = ring::digest::digest(&ring::digest::SHA256, value);
        let version = format!("{}-{}", doc.version, hash.as_ref()[..6].iter().map(|b| format!("{b:02x}")).collect::<String>());
        let f = Arc::new(Function {
            env: doc.environment.clone(),
            name: doc.name.clone(),
            version,
            links: 0,
            compiled,
            methods: doc.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
            logs: self.logs_for(gid, &doc.environment, &doc.name),
        });
        (Arc::new(doc), f)
    }

    /// Notes that gateway `gid` is now `incarnation`, and answers whether it is the gateway's
    /// current one: when it was another, the id was deleted and made again, and everything
    /// the node kept for the earlier gateway is forgotten first (under the lock, so two that
    /// meet the new one at once forget once); an incarnation since replaced is refused.
    fn meet(&self, partition: &str, gid: &str, incarnation: &str) -> bool {
        let mut known = self.incarnations.lock().unwrap_or_else(|e| e.into_inner());
        let k = known.entry(gid.to_string()).or_default();
        if k.before.iter().any(|b| b == incarnation) {
            return false;
        }
        match k.current.as_deref() {
            Some(c) if c == incarnation => return true,
            Some(c) => {
                k.retire(c.to_string());
                self.forget_gateway(partition, gid);
            }
            None => {}
        }
        k.current = Some(incarnation.to_string());
        true
    }

    /// Forgets what the node kept for gateway `gid`'s partition, which has no objects left:
    /// its incarnation is one no later call may run as.
    fn gone_gateway(&self, partition: &str, gid: &str) {
        let mut known = self.incarnations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = known.get_mut(gid)
            && let Some(c) = k.current.take()
        {
            k.retire(c);
        }
        // Gone gateways' are kept only so long: what a node remembers of ids stays bounded.
        if known.len() > INCARNATIONS_KEPT {
            known.retain(|_, k| k.current.is_some());
        }
        self.forget_gateway(partition, gid);
    }

    /// Forgets what the node kept for gateway `gid` (called with `incarnations` held).
    fn forget_gateway(&self, partition: &str, gid: &str) {
        // What calls still running hold stays theirs, and no later lookup finds it.
        let own = format!("{gid}/");
        self.engines.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| !k.starts_with(&own));
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| !k.starts_with(&own));
        self.log_budgets.lock().unwrap_or_else(|e| e.into_inner()).remove(gid);
        self.invoking.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| !k.starts_with(partition));
        self.lowered.lock().unwrap_or_else(|e| e.into_inner()).remove(gid);
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| !k.starts_with(partition));
        lock(&self.compiled).remove(gid);
        self.tables.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| !k.starts_with(&own));
        self.sources.lock().unwrap_or_else(|e| e.into_inner()).retain(|(g, _), _| g != gid);
        lock(&self.offered).retain(|(g, _, _)| g != gid);
    }
}

/// Gateway ids whose incarnations a node remembers before it forgets those of gone gateways.
const INCARNATIONS_KEPT: usize = 65_536;

/// A gateway id's incarnation on this node, and those it replaced (the newest few).
#[derive(Default)]
struct Incarnations {
    current: Option<String>,
    before: Vec<String>,
}

impl Incarnations {
    fn retire(&mut self, incarnation: String) {
        if self.before.len() >= 8 {
            self.before.remove(0);
        }
        self.before.push(incarnation);
    }
}

/// What a compile task's turn ended with.
enum Turn {
    Done,
    /// The key changed while it compiled: it compiles again, in a turn of its own.
    Again,
}

/// Compiles of changed functions under way at once on a node, off the watch path.
pub const COMPILES_AT_ONCE: usize = 2;

/// Compiles offered by saves that wait on a node for their lowering, at most.
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

/// A stored value of a function and what it compiled to (`None`: it does not), bound to the
/// functions it imports by name as last lowered.
struct Entry {
    bytes: Bytes,
    built: Built,
    /// Whether `built` is of `bytes`; not when they did not compile here and the version
    /// served before is kept.
    fresh: bool,
    /// The series the function's handlers count in, as the last lowering that served it
    /// found it, held weakly (the handlers hold it), and when, where it was its
    /// environment's overflow series.
    series: Option<(Weak<crate::metrics::Series>, Option<std::time::Instant>)>,
}

/// The series of the function stored at `key` (`name` of `env` of gateway `gid`): the one its
/// handlers count in, found through its entry in `cache` while they hold it, so that lowering
/// a gateway again does not take the node's registry once per function; otherwise the
/// registry's. The overflow series is asked for again once a second has passed, in case room
/// was made.
fn series_of(cache: &Cache, key: &str, gid: &str, env: &str, name: &str) -> Arc<crate::metrics::Series> {
    let known = lock(cache).get(key).and_then(|e| e.series.as_ref()).filter(|(_, overflow)| overflow.is_none_or(|t| t.elapsed() < OVERFLOW_ASKED_AGAIN)).and_then(|(s, _)| s.upgrade());
    if let Some(s) = known {
        return s;
    }
    let s = crate::metrics::series(gid, env, name);
    if let Some(e) = lock(cache).get_mut(key) {
        e.series = Some((Arc::downgrade(&s), s.is_overflow().then(std::time::Instant::now)));
    }
    s
}

/// How long a function counting in its environment's overflow series keeps it before a
/// lowering asks the registry again.
const OVERFLOW_ASKED_AGAIN: Duration = Duration::from_secs(1);

/// Holds compile tasks at the start of their compile while a test says so.
#[cfg(test)]
#[derive(Default)]
struct Gate(Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>, std::sync::atomic::AtomicUsize);

#[cfg(test)]
impl Gate {
    /// Counts the compile and says it started, then waits to be let through.
    fn pass(&self) {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some((started, open)) = self.0.lock().unwrap().take() {
            let _ = started.send(());
            let _ = open.recv();
        }
    }
}

impl Contributor for Functions {
    fn partition<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(&self.dir)?;
        Some(&key[..self.dir.len() + rest.find('/')? + 1])
    }

    fn attach(&self, relower: Relower) {
        let _ = self.relower.set(relower);
    }

    fn gone(&self, partition: &str) {
        let gid = partition[self.dir.len()..].trim_end_matches('/');
        self.gone_gateway(partition, gid);
    }

    fn lower(&self, partition: &str, objects: &[(&str, &[u8])]) -> Lowered {
        let gid = partition[self.dir.len()..].trim_end_matches('/');
        // A gateway's first lowering on this node (the node starting, the gateway created)
        // compiles in place; after that the watch path compiles nothing, so no gateway's
        // saves hold up another's changes.
        let envs: BTreeMap<String, EnvDoc> = objects
            .iter()
            .filter_map(|(key, value)| Some((key[partition.len()..].strip_prefix("env/")?, serde_json::from_slice::<EnvDoc>(value).ok()?)))
            .map(|(env, doc)| (env.to_string(), doc))
            .collect();
        if let Some(env) = envs.values().next()
            && !self.meet(partition, gid, &env.incarnation)
        {
            return Lowered::default();
        }
        let defer = !self.lowered.lock().unwrap_or_else(|e| e.into_inner()).insert(gid.to_string());
        let cache = self.cache_of(gid);
        let mut funcs: BTreeMap<String, Vec<(&str, Arc<FunctionDoc>, Arc<Function>)>> = BTreeMap::new();
        let mut present = std::collections::HashSet::new();
        for (key, value) in objects {
            let rest = &key[partition.len()..];
            if let Some(path) = rest.strip_prefix("fn/")
                && let Some((env, _)) = path.split_once('/')
            {
                present.insert(*key);
                if let Some((doc, func)) = self.function_in(&cache, gid, key, value, defer) {
                    funcs.entry(env.to_string()).or_default().push((key, doc, func));
                }
            }
        }
        lock(&cache).retain(|k, _| present.contains(k.as_str()));
        let own = format!("{gid}/");
        if let Ok(mut t) = self.tables.lock() {
            t.retain(|k, _| !k.starts_with(&own));
        }
        let mut out = Lowered::default();
        // What each runtime is to have loaded: every function served.
        let mut loads: Vec<(Arc<Engine>, Vec<crate::engine::Load>)> = Vec::new();
        for (env_name, env) in &envs {
            if !env.serving {
                continue;
            }
            for h in env.gateway_hosts.iter().chain(&env.env_hosts) {
                if !out.hosts.contains(h) {
                    out.hosts.push(h.clone());
                }
            }
            let Some(list) = funcs.get_mut(env_name).filter(|l| !l.is_empty()) else { continue };
            let limits = env.limits.limits();
            let Some(engine) = self.engine(gid, env, limits.memory) else { continue };
            Self::link(&cache, list);
            let list = &*list;
            let table: Table = Arc::new(list.iter().map(|(_, d, f)| (d.name.clone(), f.clone())).collect());
            if let Ok(mut t) = self.tables.lock() {
                t.insert(format!("{gid}/{env_name}"), table.clone());
            }
            let vars = Arc::new(self.open_vars(&env.vars));
            let reach = Arc::new(env.reach());
            // Functions without plugins of their own share one route per form, which finds the
            // function by its exact path; those with plugins get routes of their own.
            let mut shared: HashMap<String, Arc<FunctionHandler>> = HashMap::new();
            // A function is loaded before it takes traffic; one already loaded is not.
            let served = list.iter().map(|(_, _, f)| crate::engine::Load { func: f.clone(), table: table.clone(), vars: vars.clone(), cpu: limits.cpu });
            match loads.iter_mut().find(|(e, _)| Arc::ptr_eq(e, &engine)) {
                Some((_, all)) => all.extend(served),
                None => loads.push((engine.clone(), served.collect())),
            }
            for (key, doc, func) in list {
                let handler = Arc::new(FunctionHandler {
                    engine: engine.clone(),
                    func: func.clone(),
                    table: table.clone(),
                    vars: vars.clone(),
                    limits,
                    reach: reach.clone(),
                    debug: env.debug,
                    series: series_of(&cache, key, gid, env_name, &doc.name),
                });
                if doc.plugins.is_empty() {
                    shared.insert(doc.name.clone(), handler);
                    continue;
                }
                let mut plugins = env.plugins.clone();
                let scoped = plugins.contains_key(weir_plugins::cookie_scope::NAME);
                for (name, conf) in &doc.plugins {
                    // A function's own auth config takes its environment's scope: it accepts
                    // the environment's grants and no other credentials.
                    let mut conf = conf.clone();
                    // And its plugins run before the environment's `cookie-scope`, whatever
                    // was stored before their priorities were checked.
                    if scoped {
                        weir_plugins::cookie_scope::keep_before(&mut conf);
                    }
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
        for (engine, served) in loads {
            engine.load(served);
        }
        out
    }
}

/// `f` bound to the functions it imports as `links` says ([`link_hashes`]).
fn bound(f: &Function, links: u64) -> Arc<Function> {
    Arc::new(Function { env: f.env.clone(), name: f.name.clone(), version: f.version.clone(), links, compiled: f.compiled.clone(), methods: f.methods.clone(), logs: f.logs.clone() })
}

/// For each of an environment's functions (`named`, by name), a hash that changes whenever a
/// function it reaches through imports by name (directly or through theirs; a name with no
/// function counts as such) changes version or comes or goes; 0 for one that imports none.
///
/// Made over the strongly connected parts of the import graph, each hashed once from its
/// members and the parts it reaches, so a ring or a hub of imports costs time linear in the
/// functions and imports (where walking what each reaches would cost their product), and with no
/// recursion however deep the imports chain.
fn link_hashes(named: &[(&str, &Function)]) -> Vec<u64> {
    use std::hash::{Hash, Hasher};
    // Nodes: the functions, then the names imported that no function has.
    let mut ids: HashMap<&str, usize> = named.iter().enumerate().map(|(i, (n, _))| (*n, i)).collect();
    let mut names: Vec<(&str, Option<&str>)> = named.iter().map(|(n, f)| (*n, Some(f.version.as_str()))).collect();
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); named.len()];
    for (i, (_, f)) in named.iter().enumerate() {
        for link in &f.compiled.links {
            let id = *ids.entry(link.as_str()).or_insert_with(|| {
                names.push((link.as_str(), None));
                names.len() - 1
            });
            edges[i].push(id);
        }
    }
    edges.resize(names.len(), Vec::new());
    // Tarjan's algorithm with its own stack: parts come out sinks first.
    let n = names.len();
    let (mut index, mut low, mut part) = (vec![usize::MAX; n], vec![0; n], vec![usize::MAX; n]);
    let (mut on_stack, mut stack, mut parts): (Vec<bool>, Vec<usize>, Vec<Vec<usize>>) = (vec![false; n], Vec::new(), Vec::new());
    let mut next = 0;
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        // Each entry: a node being visited and how many of its edges it has followed.
        let mut calls: Vec<(usize, usize)> = Vec::new();
        let mut enter = Some(root);
        loop {
            if let Some(v) = enter.take() {
                (index[v], low[v], on_stack[v]) = (next, next, true);
                next += 1;
                stack.push(v);
                calls.push((v, 0));
            }
            let Some(&(v, at)) = calls.last() else { break };
            if let Some(&w) = edges[v].get(at) {
                calls.last_mut().expect("a call").1 += 1;
                if index[w] == usize::MAX {
                    enter = Some(w);
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            calls.pop();
            if let Some(&(u, _)) = calls.last() {
                low[u] = low[u].min(low[v]);
            }
            if low[v] == index[v] {
                let mut members = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    part[w] = parts.len();
                    members.push(w);
                    if w == v {
                        break;
                    }
                }
                parts.push(members);
            }
        }
    }
    // A part's hash: its members' names and versions, and the hashes of the parts it reaches.
    let mut hashes: Vec<u64> = Vec::with_capacity(parts.len());
    for (p, members) in parts.iter().enumerate() {
        let mut own: Vec<(&str, Option<&str>)> = members.iter().map(|&m| names[m]).collect();
        own.sort_unstable();
        let reached: BTreeSet<u64> = members.iter().flat_map(|&m| &edges[m]).map(|&w| part[w]).filter(|&q| q != p).map(|q| hashes[q]).collect();
        let mut h = std::hash::DefaultHasher::new();
        (own, reached).hash(&mut h);
        hashes.push(h.finish());
    }
    (0..named.len())
        .map(|i| match edges[i].is_empty() {
            true => 0,
            false => {
                let reached: BTreeSet<u64> = edges[i].iter().map(|&w| hashes[part[w]]).collect();
                let mut h = std::hash::DefaultHasher::new();
                reached.hash(&mut h);
                h.finish().max(1)
            }
        })
        .collect()
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
/// the route matched names (after `prefix`).
struct Dispatch {
    prefix: String,
    functions: Arc<HashMap<String, Arc<FunctionHandler>>>,
    timeout: Duration,
}

impl Drop for Dispatch {
    /// A gateway of many functions lets its handlers go with each lowering: freed off the
    /// thread that held the route last, often a proxy worker (`weir_proxy::background`).
    fn drop(&mut self) {
        weir_proxy::background::reclaim(std::mem::take(&mut self.functions));
    }
}

impl Handler for Dispatch {
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn reads_matched_path(&self) -> bool {
        true
    }

    fn call(&self, call: Call<'_>) -> Answer {
        // By the path the route matched: a plugin that rewrites the path (an environment's
        // `proxy-rewrite`) changes what the function sees, not which function runs.
        match call.matched_path().strip_prefix(&self.prefix).and_then(|name| self.functions.get(name)) {
            Some(f) => f.call(call),
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
    let (status, fields, body) = answer_fields(outcome.result, debug, limits);
    (status, fields.into_iter().map(|(k, v)| (k.into_owned(), v.into_owned())).collect(), body)
}

/// What a call's result answers: status, header fields and body.
fn answer_fields(result: Result<crate::Reply, Failure>, debug: bool, limits: &crate::Limits) -> (u16, Vec<crate::engine::Field>, Vec<u8>) {
    let json_error = |status: u16, message: &str, stack: Option<&str>| {
        let mut body = json!({"error_msg": message});
        if let Some(stack) = stack {
            body["stack"] = json!(stack);
        }
        (status, vec![crate::engine::JSON_TYPE], body.to_string().into_bytes())
    };
    match result {
        Ok(reply) => (reply.status, reply.headers, reply.body),
        Err(Failure::Threw { message, stack, status, .. }) => json_error(status.unwrap_or(500), &message, (debug && !stack.is_empty()).then_some(stack.as_str())),
        Err(Failure::Timeout(why)) => json_error(504, why, None),
        Err(Failure::Memory) => json_error(500, &format!("the function ran out of memory (the gateway's limit is {} MiB)", limits.memory >> 20), None),
        Err(Failure::Internal(why)) => json_error(500, &why, None),
    }
}

/// What a call's outcome answers, as a response.
pub fn respond(outcome: Outcome, debug: bool, limits: &crate::Limits) -> Response<RespBody> {
    let (status, headers, body) = answer_fields(outcome.result, debug, limits);
    let mut resp = Response::new(RespBody::full(held_bytes(body, outcome.hold)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in headers {
        // The common field, JSON's type, is known good and needs no copy.
        if k == "content-type" && v == "application/json" {
            resp.headers_mut().append(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            continue;
        }
        if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), http::HeaderValue::from_str(&v)) {
            // The gateway frames the body itself, and the connection is its own: no length
            // and no connection-scoped field (`keep-alive`, ...) of the function's, but a 426's
            // `upgrade`, which says what to switch to.
            if k != http::header::CONTENT_LENGTH && weir_http::hop::passes_in_answer(status, &k) {
                resp.headers_mut().append(k, v);
            }
        }
    }
    resp
}

/// `body` as bytes that keep `hold` on the gateway's memory limit until the last of them goes
/// (sent, or dropped).
pub fn held_bytes(body: Vec<u8>, hold: crate::engine::Hold) -> bytes::Bytes {
    match hold.is_empty() {
        true => bytes::Bytes::from(body),
        false => bytes::Bytes::from_owner(Held { body, _hold: hold }),
    }
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

/// Why `func` does not answer `method`, and the methods it does (for `Allow`); `None` when it
/// answers it.
fn not_allowed(func: &Function, method: &str) -> Option<(String, String)> {
    (!func.methods.is_empty() && !func.methods.iter().any(|m| m == method)).then(|| (format!("{method} is not one of this function's methods"), func.methods.join(", ")))
}

/// Why [`Functions::invoke`] did not run a function.
#[derive(Debug, Clone, PartialEq)]
pub enum NotRun {
    /// Its gateway has as many calls in flight on this node as its limits allow.
    Busy,
    /// It cannot run: why.
    Unable(&'static str),
}

impl std::fmt::Display for NotRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotRun::Busy => f.write_str(BUSY),
            NotRun::Unable(why) => f.write_str(why),
        }
    }
}

const BUSY: &str = "too many calls of this gateway's functions are in flight";

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
        if let Some((message, allow)) = not_allowed(&self.func, call.parts.method.as_str()) {
            let mut resp = error_response(StatusCode::METHOD_NOT_ALLOWED, &message, None);
            if let Ok(v) = http::HeaderValue::from_str(&allow) {
                resp.headers_mut().insert(http::header::ALLOW, v);
            }
            return Box::pin(async move { resp });
        }
        let request = request_of(&call.parts, &call.body, user_of(call.consumer, call.notes));
        // Handed to the runtime now: the future keeps only the wait, not the request.
        let started = std::time::Instant::now();
        let submitted = self.engine.submit(|reply| Job { func: self.func.clone(), table: self.table.clone(), vars: self.vars.clone(), limits: self.limits, reach: self.reach.clone(), request, reply, place: None });
        let (debug, limits, series) = (self.debug, self.limits, self.series.clone());
        Box::pin(async move {
            // A call failed where it threw (whatever status its error names), ran out of time
            // or memory, or was refused for want of a place; or where it answered 5xx.
            let (resp, failed) = match submitted {
                Some(submitted) => {
                    let outcome = submitted.outcome().await;
                    let failed = outcome.result.is_err();
                    (respond(outcome, debug, &limits), failed)
                }
                None => {
                    let mut resp = error_response(StatusCode::SERVICE_UNAVAILABLE, BUSY, None);
                    resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                    (resp, true)
                }
            };
            series.observe(started.elapsed(), failed || resp.status().is_server_error());
            resp
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function named `name` at `version` that imports `links` by name.
    fn linked(name: &str, version: &str, links: &[&str]) -> Function {
        let compiled = crate::source::Compiled { modules: BTreeMap::new(), entry: "index.ts".into(), links: links.iter().map(|l| l.to_string()).collect() };
        Function { env: "dev".into(), name: name.into(), version: version.into(), links: 0, compiled: Arc::new(compiled), methods: Vec::new(), logs: Arc::new(Logs::new(Arc::new(crate::engine::Budget::new(1 << 20)))) }
    }

    fn hashes(funcs: &[Function]) -> Vec<u64> {
        link_hashes(&funcs.iter().map(|f| (f.name.as_str(), f)).collect::<Vec<_>>())
    }

    /// The reference [`link_hashes`] is held to: one hash of the name and version of every
    /// function `f` reaches through imports by name, walked one function at a time.
    fn links_of(f: &Function, by_name: &HashMap<&str, &Function>) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut reached: BTreeMap<&str, Option<&str>> = BTreeMap::new();
        let mut todo: Vec<&str> = f.compiled.links.iter().map(String::as_str).collect();
        while let Some(name) = todo.pop() {
            if reached.contains_key(name) {
                continue;
            }
            match by_name.get(name) {
                Some(other) => {
                    reached.insert(name, Some(&other.version));
                    todo.extend(other.compiled.links.iter().map(String::as_str));
                }
                None => {
                    reached.insert(name, None);
                }
            }
        }
        let mut h = std::hash::DefaultHasher::new();
        reached.hash(&mut h);
        h.finish().max(1)
    }

    /// The hash of each function changes exactly where the set of names and versions it
    /// reaches does ([`links_of`], followed one function at a time), over random graphs with
    /// cycles, missing names and functions that import nothing.
    #[test]
    fn link_hashes_change_exactly_where_what_a_function_reaches_changes() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..300 {
            let n = rng.usize(1..9);
            let names: Vec<String> = (0..n + 2).map(|i| format!("f{i}")).collect();
            // Two names no function has.
            let mut funcs: Vec<Function> = (0..n)
                .map(|i| {
                    let links: Vec<&str> = (0..rng.usize(0..3)).map(|_| names[rng.usize(0..n + 2)].as_str()).collect();
                    linked(&names[i], "1", &links)
                })
                .collect();
            let reach = |funcs: &[Function]| -> Vec<u64> {
                let by_name: HashMap<&str, &Function> = funcs.iter().map(|f| (f.name.as_str(), f)).collect();
                funcs.iter().map(|f| if f.compiled.links.is_empty() { 0 } else { links_of(f, &by_name) }).collect()
            };
            let (before, reached_before) = (hashes(&funcs), reach(&funcs));
            assert_eq!(before, hashes(&funcs), "the same graph hashes the same");
            let changed = rng.usize(0..n);
            funcs[changed] = linked(&names[changed], "2", &funcs[changed].compiled.links.iter().map(String::as_str).collect::<Vec<_>>());
            let (after, reached_after) = (hashes(&funcs), reach(&funcs));
            for i in 0..n {
                assert_eq!(before[i] == 0, funcs[i].compiled.links.is_empty());
                assert_eq!(before[i] != after[i], reached_before[i] != reached_after[i], "f{i} after f{changed} changed: {:?}", funcs.iter().map(|f| (&f.name, &f.compiled.links)).collect::<Vec<_>>());
            }
        }
    }

    /// A ring of many functions, each importing the next, and a chain as deep, hash without
    /// recursion: every one of the ring reaches all, so a change anywhere changes them all.
    #[test]
    fn a_long_ring_of_imports_hashes_without_recursion() {
        let n = 50_000;
        let names: Vec<String> = (0..n).map(|i| format!("f{i}")).collect();
        let mut ring: Vec<Function> = (0..n).map(|i| linked(&names[i], "1", &[names[(i + 1) % n].as_str()])).collect();
        let before = hashes(&ring);
        assert!(before.iter().all(|&h| h != 0 && h == before[0]), "all reach the same");
        ring[n / 2] = linked(&names[n / 2], "2", &[names[n / 2 + 1].as_str()]);
        let after = hashes(&ring);
        assert!(after.iter().zip(&before).all(|(a, b)| a != b));
        let chain: Vec<Function> = (0..n).map(|i| linked(&names[i], "1", &[names.get(i + 1).map_or("missing", String::as_str)])).collect();
        let chained = hashes(&chain);
        assert_eq!(chained.iter().collect::<BTreeSet<_>>().len(), n, "each reaches a different set");
    }

    fn stored(v: u32) -> Vec<u8> {
        let doc = FunctionDoc { name: "f".into(), environment: "dev".into(), files: BTreeMap::from([("index.ts".to_string(), format!("export default () => ({{ v: {v} }});"))]), entrypoint: "index.ts".into(), version: u64::from(v), ..FunctionDoc::default() };
        serde_json::to_vec(&doc).unwrap()
    }

    /// The gateway of a function's key under `/weir`.
    fn gid_of(key: &str) -> &str {
        key.strip_prefix("/weir/platform/live/").and_then(|rest| rest.split('/').next()).unwrap()
    }

    fn cached_version(f: &Functions, key: &str) -> Option<u64> {
        lock(&f.cache_of(gid_of(key))).get(key).and_then(|c| c.built.as_ref()).map(|(doc, _)| doc.version)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_function_compiles_off_the_lowering_and_an_overtaken_compile_keeps_its_result() {
        let f = Functions::new("/weir", Settings::default());
        let (relower, mut relowers) = Relower::channel();
        f.attach(relower);
        let key = "/weir/platform/live/g/fn/dev/f";
        let asked = async |relowers: &mut tokio::sync::mpsc::UnboundedReceiver<String>| tokio::time::timeout(Duration::from_secs(30), relowers.recv()).await.unwrap();

        // A gateway's first lowering compiles in place.
        assert_eq!(f.function("g", key, &stored(1), false).unwrap().0.version, 1);

        // Version 2 is compiled off the lowering, which answers version 1 meanwhile; the
        // compile is held once it has started.
        let (started, compiling) = std::sync::mpsc::channel();
        let (open, held) = std::sync::mpsc::channel();
        *f.gate.0.lock().unwrap() = Some((started, held));
        assert_eq!(f.function("g", key, &stored(2), true).unwrap().0.version, 1);
        tokio::task::spawn_blocking(move || compiling.recv()).await.unwrap().unwrap();

        // Version 3, lowered in place (the node's first lowering of the gateway again, say),
        // overtakes it: the compile of version 2 ends without replacing version 3.
        assert_eq!(f.function("g", key, &stored(3), false).unwrap().0.version, 3);
        open.send(()).unwrap();
        assert_eq!(asked(&mut relowers).await.as_deref(), Some(key));
        assert_eq!(cached_version(&f, key), Some(3));
        assert!(f.pending.lock().unwrap().is_empty());

        // A change the lowering defers is compiled, asked to be lowered again, and then taken.
        assert_eq!(f.function("g", key, &stored(4), true).unwrap().0.version, 3);
        assert_eq!(asked(&mut relowers).await.as_deref(), Some(key));
        assert_eq!(f.function("g", key, &stored(4), true).unwrap().0.version, 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invokes_of_a_version_not_lowered_yet_share_one_compile() {
        let f = Functions::new("/weir", Settings::default());
        let key = "/weir/platform/live/g/fn/dev/f";
        let env = EnvDoc { environment: "dev".into(), serving: true, ..EnvDoc::default() };
        let (started, compiling) = std::sync::mpsc::channel();
        let (open, held) = std::sync::mpsc::channel();
        *f.gate.0.lock().unwrap() = Some((started, held));
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let (f, env) = (f.clone(), env.clone());
                tokio::spawn(async move { f.invoke("g", &env, key, &stored(1), Request::default()).await })
            })
            .collect();
        tokio::task::spawn_blocking(move || compiling.recv()).await.unwrap().unwrap();
        // Every call has come while the first compile is held.
        tokio::time::sleep(Duration::from_millis(300)).await;
        open.send(()).unwrap();
        for call in calls {
            let outcome = call.await.unwrap().unwrap();
            assert_eq!(outcome.result.unwrap().body, br#"{"v":1}"#);
        }
        assert_eq!(f.gate.1.load(std::sync::atomic::Ordering::SeqCst), 1, "one compile for the four calls");
        assert!(f.invoking.lock().unwrap().is_empty(), "nothing kept once it compiled");
        assert_eq!(cached_version(&f, key), None, "an invoke does not lower");

        // Once compiled, a later call compiles again: invoke keeps nothing of its own.
        let outcome = f.invoke("g", &env, key, &stored(1), Request::default()).await.unwrap();
        assert_eq!(outcome.result.unwrap().body, br#"{"v":1}"#);
        assert_eq!(f.gate.1.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    fn stored_code(name: &str, v: u64, code: &str) -> Vec<u8> {
        let doc = FunctionDoc { name: name.into(), environment: "dev".into(), files: BTreeMap::from([("index.ts".to_string(), code.to_string())]), entrypoint: "index.ts".into(), version: v, ..FunctionDoc::default() };
        serde_json::to_vec(&doc).unwrap()
    }

    const PARTITION: &str = "/weir/platform/live/g/";
    const ENV_KEY: &str = "/weir/platform/live/g/env/dev";

    fn env_doc(serving: bool) -> EnvDoc {
        EnvDoc { environment: "dev".into(), gateway_hosts: vec!["g.localhost".into()], serving, ..EnvDoc::default() }
    }

    /// Invokes the function stored at `key` as `value` on gateway `g` and answers its body.
    async fn body_of(f: &Functions, key: &str, value: &[u8]) -> String {
        let outcome = f.invoke("g", &env_doc(true), key, value, Request::default()).await.unwrap();
        String::from_utf8(outcome.result.unwrap().body).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_function_is_loaded_before_traffic_by_every_runtime_that_serves_it() {
        let f = Functions::new("/weir", Settings::default());
        let (relower, _relowers) = Relower::channel();
        f.attach(relower);
        let key = "/weir/platform/live/g/fn/dev/f";
        // How long ago its module was loaded, when it is called.
        let function = stored_code("f", 1, "const at = Date.now(); export default () => String(Date.now() - at);");
        let (stopped, serving) = (serde_json::to_vec(&env_doc(false)).unwrap(), serde_json::to_vec(&env_doc(true)).unwrap());
        let loaded_long_ago = async || {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let ago: u64 = body_of(&f, key, &function).await.parse().unwrap();
            assert!(ago >= 300, "loaded {ago} ms before its first call: not ahead of it");
        };

        // The gateway is stopped: nothing is served, and no runtime starts.
        let out = f.lower(PARTITION, &[(ENV_KEY, &stopped), (key, &function)]);
        assert!(out.routes.is_empty());
        assert!(f.engines.lock().unwrap().keys().all(|k| !k.starts_with("g/")), "no runtime for a gateway that serves nothing");

        // Started: the lowering that serves it first loads it.
        let out = f.lower(PARTITION, &[(ENV_KEY, &serving), (key, &function)]);
        assert!(!out.routes.is_empty());
        loaded_long_ago().await;

        // Stopped and started again: its routes (and with them its runtime) went, and the new
        // runtime loads it ahead of traffic too.
        drop(out);
        drop(f.lower(PARTITION, &[(ENV_KEY, &stopped), (key, &function)]));
        // Its handlers are freed off this thread (`weir_proxy::background`): the runtime goes
        // with them shortly.
        let asked = std::time::Instant::now();
        while f.engines.lock().unwrap().values().any(|e| e.strong_count() > 0) {
            assert!(asked.elapsed() < Duration::from_secs(10), "the runtime outlived its routes");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let out = f.lower(PARTITION, &[(ENV_KEY, &serving), (key, &function)]);
        assert!(!out.routes.is_empty());
        loaded_long_ago().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_functions_own_plugins_run_before_its_environments_cookie_scope() {
        let f = Functions::new("/weir", Settings::default());
        let (relower, mut relowers) = Relower::channel();
        f.attach(relower);
        let mut env = env_doc(true);
        env.plugins.insert("cookie-scope".into(), json!({"shared": ["localhost"], "own": ["g.localhost"]}));
        let env = serde_json::to_vec(&env).unwrap();
        let key = "/weir/platform/live/g/fn/dev/f";
        let mut doc: FunctionDoc = serde_json::from_slice(&stored(1)).unwrap();
        // Stored before tenants' priorities were checked: below cookie-scope's.
        doc.plugins.insert("response-rewrite".into(), json!({"_meta": {"priority": -200_000}, "headers": {"set": {"x-a": "1"}}}));
        let value = serde_json::to_vec(&doc).unwrap();
        let objects: [(&str, &[u8]); 2] = [(ENV_KEY, &env), (key, &value)];
        let mut out = f.lower(PARTITION, &objects);
        while out.routes.is_empty() {
            tokio::time::timeout(Duration::from_secs(30), relowers.recv()).await.unwrap();
            out = f.lower(PARTITION, &objects);
        }
        for r in &out.routes {
            let plugins = r.route.plugins.as_ref().unwrap();
            assert!(plugins.contains_key("cookie-scope"), "{}", r.id);
            assert_eq!(plugins["response-rewrite"]["_meta"]["priority"], json!(-99_999), "{}", r.id);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_function_importing_another_by_name_follows_its_changes() {
        let f = Functions::new("/weir", Settings::default());
        let (relower, mut relowers) = Relower::channel();
        f.attach(relower);
        let serving = serde_json::to_vec(&env_doc(true)).unwrap();
        // Lowers, and again as each change compiled off the lowering asks, until all are in.
        let mut lower = async |objects: &[(&str, &[u8])]| {
            f.lower(PARTITION, objects);
            while !f.pending.lock().unwrap().is_empty() {
                tokio::time::timeout(Duration::from_secs(30), relowers.recv()).await.unwrap();
                f.lower(PARTITION, objects);
            }
            // A compile ends (its result kept) before it asks for the lowering again: one that
            // ended before the first lowering looked is taken in by this one.
            f.lower(PARTITION, objects)
        };
        let (a, b, c, d) = ("/weir/platform/live/g/fn/dev/a", "/weir/platform/live/g/fn/dev/b", "/weir/platform/live/g/fn/dev/c", "/weir/platform/live/g/fn/dev/d");
        // a imports b, which imports c; d imports nothing.
        let a1 = stored_code("a", 1, "import b from '@/b'; export default () => 'a' + b();");
        let b1 = stored_code("b", 1, "import c from '@/c'; export default () => 'b' + c();");
        let (c1, c2) = (stored_code("c", 1, "export default () => 'c1';"), stored_code("c", 2, "export default () => 'c2';"));
        let (d1, d2) = (stored_code("d", 1, "export default () => 'd1';"), stored_code("d", 2, "export default () => 'd2';"));
        let held = |key: &str| lock(&f.cache_of("g"))[key].built.clone().unwrap().1;

        let _out = lower(&[(ENV_KEY, &serving), (a, &a1), (b, &b1), (c, &c1), (d, &d1)]).await;
        assert_eq!(body_of(&f, a, &a1).await, "abc1");
        let before = held(a);

        // A change where a does not reach leaves it as it was: its modules stay loaded.
        let _out = lower(&[(ENV_KEY, &serving), (a, &a1), (b, &b1), (c, &c1), (d, &d2)]).await;
        assert_eq!(body_of(&f, d, &d2).await, "d2");
        assert!(Arc::ptr_eq(&before, &held(a)));
        // A new version of b, though of the same source (its methods changed, say), loads
        // modules of its own, and a is bound to them.
        let b2 = stored_code("b", 2, "import c from '@/c'; export default () => 'b' + c();");
        let _out = lower(&[(ENV_KEY, &serving), (a, &a1), (b, &b2), (c, &c1), (d, &d2)]).await;
        assert!(!Arc::ptr_eq(&before, &held(a)));
        let before = held(a);

        // A change to what it reaches through b binds it to the new version.
        let _out = lower(&[(ENV_KEY, &serving), (a, &a1), (b, &b2), (c, &c2), (d, &d2)]).await;
        assert_eq!(body_of(&f, a, &a1).await, "abc2");
        assert_eq!(body_of(&f, b, &b2).await, "bc2");
        assert!(!Arc::ptr_eq(&before, &held(a)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_invocation_while_the_gateway_serves_nothing_finds_the_functions_it_imports() {
        let f = Functions::new("/weir", Settings::default());
        let (relower, mut relowers) = Relower::channel();
        f.attach(relower);
        let stopped = serde_json::to_vec(&env_doc(false)).unwrap();
        let (a, b) = ("/weir/platform/live/g/fn/dev/a", "/weir/platform/live/g/fn/dev/b");
        let a1 = stored_code("a", 1, "import b from '@/b'; export default () => 'a' + b();");
        let (b1, b2) = (stored_code("b", 1, "export default () => 'b1';"), stored_code("b", 2, "export default () => 'b2';"));
        assert!(f.lower(PARTITION, &[(ENV_KEY, &stopped), (a, &a1), (b, &b1)]).routes.is_empty());
        assert_eq!(body_of(&f, a, &a1).await, "ab1");
        // b changes while the gateway is stopped: a, invoked, is bound to the new b.
        f.lower(PARTITION, &[(ENV_KEY, &stopped), (a, &a1), (b, &b2)]);
        tokio::time::timeout(Duration::from_secs(30), relowers.recv()).await.unwrap();
        f.lower(PARTITION, &[(ENV_KEY, &stopped), (a, &a1), (b, &b2)]);
        assert_eq!(body_of(&f, a, &a1).await, "ab2");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_source_the_gateway_has_compiled_is_taken_in_place_and_a_gone_gateway_is_forgotten() {
        let f = Functions::new("/weir", Settings::default());
        let (relower, mut relowers) = Relower::channel();
        f.attach(relower);
        let (dev, staging) = ("/weir/platform/live/g/fn/dev/f", "/weir/platform/live/g/fn/staging/f");
        f.function("g", dev, &stored(1), false).unwrap();

        // Only methods and plugins change: no compile to wait for.
        let mut doc: FunctionDoc = serde_json::from_slice(&stored(1)).unwrap();
        doc.version = 2;
        doc.methods = vec!["get".into()];
        doc.plugins.insert("key-auth".into(), json!({}));
        let (got, func) = f.function("g", dev, &serde_json::to_vec(&doc).unwrap(), true).unwrap();
        assert_eq!((got.version, func.methods.clone()), (2, vec!["GET".to_string()]));
        // Promoted, the same source: the staging copy shares its compiled code.
        doc.environment = "staging".into();
        let (_, promoted) = f.function("g", staging, &serde_json::to_vec(&doc).unwrap(), true).unwrap();
        assert!(Arc::ptr_eq(&func.compiled, &promoted.compiled));
        // Another gateway with the same source compiles its own.
        let other = "/weir/platform/live/h/fn/dev/f";
        let (_, theirs) = f.function("h", other, &stored(1), false).unwrap();
        assert!(!Arc::ptr_eq(&func.compiled, &theirs.compiled));

        // A save on this node offers its compile to the lowering that follows.
        let code: BTreeMap<String, String> = BTreeMap::from([("index.ts".to_string(), "export default () => 5;".to_string())]);
        f.offer("g", &code, "index.ts", crate::source::compile(&code, "index.ts").unwrap());
        let saved = FunctionDoc { name: "f".into(), environment: "dev".into(), files: code, entrypoint: "index.ts".into(), version: 3, ..FunctionDoc::default() };
        assert_eq!(f.function("g", dev, &serde_json::to_vec(&saved).unwrap(), true).unwrap().0.version, 3);

        // A version that does not compile here leaves the last one that did served, in place
        // and off the lowering alike; a new function that does not compile is not served.
        let broken = FunctionDoc { files: BTreeMap::from([("index.ts".to_string(), "export default (".to_string())]), version: 4, ..saved.clone() };
        assert_eq!(f.function("g", dev, &serde_json::to_vec(&broken).unwrap(), false).unwrap().0.version, 3);
        assert_eq!(cached_version(&f, dev), Some(3));
        // An invocation of the stored version says it does not compile, rather than run another.
        let invoked = f.invoke("g", &env_doc(true), dev, &serde_json::to_vec(&broken).unwrap(), Request::default()).await;
        assert!(matches!(invoked, Err(NotRun::Unable("the stored function does not compile"))), "{:?}", invoked.map(|o| o.result));
        let broken = FunctionDoc { version: 5, ..broken };
        assert_eq!(f.function("g", dev, &serde_json::to_vec(&broken).unwrap(), true).unwrap().0.version, 3);
        tokio::time::timeout(Duration::from_secs(30), relowers.recv()).await.unwrap();
        assert!(f.pending.lock().unwrap().is_empty());
        assert_eq!(cached_version(&f, dev), Some(3));
        assert!(f.function("g", "/weir/platform/live/g/fn/dev/new", &serde_json::to_vec(&FunctionDoc { name: "new".into(), ..broken }).unwrap(), false).is_none());

        f.lowered.lock().unwrap().insert("g".into());
        f.gone("/weir/platform/live/g/");
        assert_eq!(cached_version(&f, dev), None);
        assert!(!f.lowered.lock().unwrap().contains("g"));
        assert!(f.sources.lock().unwrap().keys().all(|(g, _)| g != "g"));
        assert_eq!(cached_version(&f, other), Some(1), "another gateway keeps its own");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gateway_saving_in_a_loop_drops_its_own_offers_and_a_lowering_takes_anothers_in_place() {
        let f = Functions::new("/weir", Settings::default());
        let (relower, mut relowers) = Relower::channel();
        f.attach(relower);
        let (quiet, noisy) = ("/weir/platform/live/q/fn/dev/f", "/weir/platform/live/n/fn/dev/f");
        f.function("q", quiet, &stored(1), false).unwrap();
        f.function("n", noisy, &stored(1), false).unwrap();
        let source = |code: String| BTreeMap::from([("index.ts".to_string(), code)]);
        let saved = |files: BTreeMap<String, String>, version: u64| serde_json::to_vec(&FunctionDoc { name: "f".into(), environment: "dev".into(), files, entrypoint: "index.ts".into(), version, ..FunctionDoc::default() }).unwrap();

        // The quiet gateway saves once; the noisy one saves over and over before the quiet
        // one's lowering comes.
        let mine = source("export default () => 'quiet';".into());
        f.offer("q", &mine, "index.ts", crate::source::compile(&mine, "index.ts").unwrap());
        let theirs: Vec<_> = (0..3 * OFFERS_KEPT).map(|i| source(format!("export default () => {i};"))).collect();
        for code in &theirs {
            f.offer("n", code, "index.ts", crate::source::compile(code, "index.ts").unwrap());
        }
        assert_eq!(f.offered.lock().unwrap().len(), OFFERS_KEPT, "offers stay bounded");
        assert_eq!(f.offered.lock().unwrap().iter().filter(|(g, _, _)| g == "q").count(), 1, "the noisy gateway dropped its own");

        // The quiet gateway's lowering takes its offer in place: its save is live with it.
        assert_eq!(f.function("q", quiet, &saved(mine, 2), true).unwrap().0.version, 2);
        assert!(f.pending.lock().unwrap().is_empty(), "nothing left to compile");
        // Taken, the offer has done its work and holds no room.
        assert!(f.offered.lock().unwrap().iter().all(|(g, _, _)| g != "q"));
        // The noisy gateway's newest offer is taken in place too; its dropped ones compile off
        // the lowering, which serves what it had meanwhile.
        let newest = theirs.last().unwrap().clone();
        assert_eq!(f.function("n", noisy, &saved(newest, 2), true).unwrap().0.version, 2);
        assert_eq!(f.function("n", noisy, &saved(theirs[0].clone(), 3), true).unwrap().0.version, 2);
        tokio::time::timeout(Duration::from_secs(30), relowers.recv()).await.expect("the dropped offer's source compiled");
        assert_eq!(cached_version(&f, noisy), Some(3));

        // The same source offered again replaces the offer waiting; a gone gateway's go.
        let again = source("export default () => 'again';".into());
        for _ in 0..2 {
            f.offer("q", &again, "index.ts", crate::source::compile(&again, "index.ts").unwrap());
        }
        assert_eq!(f.offered.lock().unwrap().iter().filter(|(g, _, _)| g == "q").count(), 1);
        f.gone("/weir/platform/live/q/");
        assert!(f.offered.lock().unwrap().iter().all(|(g, _, _)| g != "q"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gateways_lowering_and_invoke_take_no_lock_another_gateways_lowering_holds() {
        let f = Functions::new("/weir", Settings::default());
        let (relower, _relowers) = Relower::channel();
        f.attach(relower);
        let (quiet, noisy) = ("/weir/platform/live/q/fn/dev/f", "/weir/platform/live/n/fn/dev/f");
        f.function("n", noisy, &stored(1), false).unwrap();
        // The noisy gateway's lowering is inside its cache, as a thread that runs nice may be
        // for a while when it is preempted there.
        let (locked, release) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let holder = {
            let cache = f.cache_of("n");
            std::thread::spawn(move || {
                let _held = lock(&cache);
                locked.0.send(()).unwrap();
                let _ = release.1.recv();
            })
        };
        locked.1.recv().unwrap();
        let serving = serde_json::to_vec(&env_doc(true)).unwrap();
        let lower_quiet = |v: u32| {
            let (f, serving) = (f.clone(), serving.clone());
            move || f.lower("/weir/platform/live/q/", &[("/weir/platform/live/q/env/dev", &serving), (quiet, &stored(v))])
        };
        let out = tokio::time::timeout(Duration::from_secs(20), tokio::task::spawn_blocking(lower_quiet(2))).await.expect("the quiet gateway's lowering waited on the noisy one's").unwrap();
        assert_eq!(out.routes.len(), 1, "served at its path on the gateway's host");
        let invoked = tokio::time::timeout(Duration::from_secs(20), f.invoke("q", &env_doc(true), quiet, &stored(2), Request::default())).await.expect("its invoke waited on the noisy gateway's lowering");
        assert_eq!(String::from_utf8(invoked.unwrap().result.unwrap().body).unwrap(), r#"{"v":2}"#);
        release.0.send(()).unwrap();
        holder.join().unwrap();
        assert_eq!(cached_version(&f, noisy), Some(1));

        // Lowered again (a save of the gateway's, say), it takes its function's series from
        // its own cache: not from the node's registry, which another lowering or a render of
        // the metrics page may hold.
        let again = crate::metrics::while_held(|| {
            let (done, got) = std::sync::mpsc::channel();
            let lower = lower_quiet(2);
            std::thread::spawn(move || done.send(lower()).unwrap());
            got.recv_timeout(Duration::from_secs(20))
        });
        let again = again.expect("the lowering waited on the node's registry of series");
        assert_eq!(again.routes.len(), 1);
        // The cache does not keep the series: it goes with the handlers that count in it.
        let counted = Arc::downgrade(&series_of(&f.cache_of("q"), quiet, "q", "dev", "f"));
        assert!(counted.upgrade().is_some());
        drop((out, again));
        let t = std::time::Instant::now();
        while counted.upgrade().is_some() {
            assert!(t.elapsed() < Duration::from_secs(20), "the series outlived its handlers");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
