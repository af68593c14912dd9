#![recursion_limit = "256"]
//! The API platform: tenants' gateways, each with dev, staging and prod environments, served
//! through APISIX objects the platform generates and keeps in step.
//!
//! - [`model`]: the gateway document and the bodies the API takes;
//! - `api`: the `/v1/` endpoints, mounted on the admin listener as a `weir_admin::Extension`;
//! - [`render`]: a gateway as routes and plugin configs (pure);
//! - `reconcile`: moves each gateway's phase toward its state under a lease, writing what
//!   `render` says through the catalog's checks.
//!
//! The platform depends on the gateway's crates and never the reverse: the data plane sees
//! only ordinary APISIX objects.

mod answers;
mod api;
pub mod database;
mod docs;
pub mod functions;
pub mod grants;
mod guard;
pub mod lifecycle;
pub mod model;
pub mod openapi;
pub mod pacing;
mod quota;
mod reconcile;
pub mod render;
pub mod tokens;
pub mod triggers;
mod usage;

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use weir_catalog::Catalog;
use weir_core::schema::PluginCatalog;
use weir_store::SharedStore;

/// `platform` in the process config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PlatformConfig {
    /// Without it, nothing of the platform runs or answers. Default: on with the embedded and
    /// etcd stores, off with a file store.
    pub enabled: Option<bool>,
    /// Gateways answer on `{gid}.{base_domain}` and `{gid}.{env}.{base_domain}`.
    pub base_domain: String,
    /// The layer every environment inherits, below the gateway's and the environment's.
    pub base_plugins: Map<String, Value>,
    /// Seconds after which another node may take over a gateway a node claimed.
    pub lease_timeout: u64,
    /// Seconds a gateway may stay in Starting before it is set Stopped.
    pub start_timeout: u64,
    /// Plugins tenants may not put in their layers (the base layer may): by default those that
    /// write to this node's disk or send to addresses of the tenant's choosing beyond its
    /// upstream's checks (`file-logger`, `http-logger`, `proxy-mirror`, `traffic-split`), and
    /// `prometheus`, whose series (never dropped) and lock are shared by the whole node.
    pub denied_plugins: Vec<String>,
    /// Gateways one owner token may hold; admin keys are not bound.
    pub max_gateways_per_owner: usize,
    /// Applications one owner token may make; admin keys are not bound.
    pub max_applications_per_owner: usize,
    /// Networks tenants' upstreams may not name (CIDRs): by default this node's loopback and
    /// link-local addresses (its admin listener, its store, cloud metadata).
    pub denied_networks: Vec<String>,
    /// Domains no tenant may claim as a custom domain, nor any name under them: the operator's
    /// own (whether or not a route of the operator's names them yet).
    pub reserved_domains: Vec<String>,
    /// Whether every environment's routes carry `cookie-scope`, so that a cookie a tenant's
    /// answer sets for the base domain, an environment's domain or another gateway's host is
    /// kept to the answering host. Nodes of an earlier version cannot build that plugin: while
    /// some still follow the same store, set it off on the new ones.
    pub scope_cookies: bool,
    pub functions: FunctionsConfig,
    /// Versions kept in each function's history, per environment.
    pub history_limit: usize,
    /// Records of promotions and rollbacks kept per gateway; the oldest go first.
    pub deployments_limit: usize,
    /// Bytes of large answers (function lists, database exports) held at once while their
    /// clients read them, per gateway and on the node.
    pub large_answers: answers::AnswerLimits,
}

/// `platform.functions`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionsConfig {
    /// The most a gateway's `limits` may ask for.
    pub max_limits: weir_functions::LimitsDoc,
    /// Networks `fetch` may reach although they are loopback, private or link-local.
    pub fetch_allow_networks: Vec<String>,
    /// Functions one gateway may hold, counting each environment's copy.
    pub max_per_gateway: u64,
    /// Bytes one gateway's functions and their histories may take in the store.
    pub max_bytes_per_gateway: u64,
    /// Bytes of function documents and history entries one gateway may publish a minute on a
    /// node (saves, promotions, rollbacks), after a burst of a minute's bytes up to
    /// [`pacing::BURST_BYTES`]; 0: no
    /// bound. The store writes every gateway's publications one after another.
    pub publish_bytes_per_minute: u64,
}

impl Default for FunctionsConfig {
    fn default() -> Self {
        FunctionsConfig {
            max_limits: weir_functions::LimitsDoc { timeout_ms: 30_000, wall_ms: 300_000, memory_mib: 1024, concurrency: 1024 },
            fetch_allow_networks: Vec::new(),
            max_per_gateway: 20_000,
            max_bytes_per_gateway: 64 << 20,
            publish_bytes_per_minute: 16 << 20,
        }
    }
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            enabled: None,
            base_domain: "localhost".into(),
            base_plugins: default_base_plugins(),
            lease_timeout: 15,
            start_timeout: 300,
            denied_plugins: ["file-logger", "http-logger", "proxy-mirror", "traffic-split", "prometheus"].map(String::from).to_vec(),
            max_gateways_per_owner: 100,
            max_applications_per_owner: 1000,
            denied_networks: ["127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "0.0.0.0/8", "::/128"].map(String::from).to_vec(),
            reserved_domains: Vec::new(),
            scope_cookies: true,
            functions: FunctionsConfig::default(),
            history_limit: 30,
            deployments_limit: 1000,
            large_answers: answers::AnswerLimits::default(),
        }
    }
}

/// Permissive CORS, as APISIX's cors schema accepts it (no credentials with `*`).
fn default_base_plugins() -> Map<String, Value> {
    let cors = json!({"cors": {"allow_origins": "*", "allow_methods": "*", "allow_headers": "*", "expose_headers": "*", "max_age": 5, "allow_credential": false}});
    cors.as_object().cloned().unwrap_or_default()
}

pub struct Platform {
    cfg: PlatformConfig,
    docs: docs::Docs,
    /// The store's key prefix (`/apisix`).
    prefix: String,
    catalog: Arc<Catalog>,
    plugins: Arc<dyn PluginCatalog>,
    /// This node, as it signs the leases it takes.
    node: String,
    /// Rung by the API after a change, so the reconciler does not wait for its tick.
    wake: tokio::sync::Notify,
    /// A pause between taking a gateway's lease and doing its step, from
    /// `WEIR_PLATFORM_PAUSE_AFTER_CLAIM_MS`: how a test kills a node in the middle of a step.
    pause_after_claim: Option<std::time::Duration>,
    /// Reconcile passes made, for whoever wants to see the reconciler is not spinning.
    passes: std::sync::atomic::AtomicU64,
    /// The settings a render reads, as one string: a gateway rendered with others is
    /// rendered again.
    inputs: String,
    /// This node's function runtimes, for `invoke` and logs; unset where functions do not run.
    functions: std::sync::OnceLock<Arc<weir_functions::live::Functions>>,
    /// The node's databases and their default quota; unset where there are none.
    databases: std::sync::OnceLock<(Arc<weir_database::Databases>, weir_database::Quota)>,
    /// The revision this node's data plane serves, where it has one: a gateway rendered here
    /// is marked started once it is served here.
    applied: std::sync::OnceLock<tokio::sync::watch::Receiver<weir_store::settled::Applied>>,
    /// Whether the last render this node waited for was not served within the bound.
    behind: std::sync::atomic::AtomicBool,
    /// Large answers held while their clients read them.
    answers: Arc<answers::Answers>,
    /// One function list made at a time per gateway: each holds the gateway's functions
    /// several times over while it is made.
    listing: weir_functions::lanes::Lanes,
    /// How fast each gateway may publish functions on this node.
    publishing: pacing::Pacer,
}

/// Function lists made at once on the node.
const LISTS_ON_NODE: usize = 4;

impl Platform {
    /// `keyring` seals the secret fields of plugin layers in gateway documents and in the
    /// objects the platform writes, as the Admin API seals its objects'.
    pub fn new(
        cfg: PlatformConfig,
        store: SharedStore,
        prefix: &str,
        catalog: Arc<Catalog>,
        plugins: Arc<dyn PluginCatalog>,
        keyring: Arc<weir_tls::Keyring>,
    ) -> Arc<Platform> {
        let node = format!("{}-{:08x}", std::process::id(), fastrand::u32(..));
        // What a gateway is rendered with; off, `scope_cookies` renders as earlier versions did
        // and is left out, so nodes of both versions agree on what is rendered.
        let mut inputs = json!({"base_domain": cfg.base_domain, "base_plugins": cfg.base_plugins});
        if cfg.scope_cookies {
            inputs["scope_cookies"] = json!(true);
        }
        let inputs = inputs.to_string();
        let answers = answers::Answers::new(cfg.large_answers);
        let publishing = pacing::Pacer::new(cfg.functions.publish_bytes_per_minute);
        Arc::new(Platform {
            cfg,
            publishing,
            answers,
            listing: weir_functions::lanes::Lanes::new(LISTS_ON_NODE, 1),
            docs: docs::Docs { store, dir: format!("{prefix}/platform/gateways/"), keyring, plugins: plugins.clone() },
            prefix: prefix.to_string(),
            catalog,
            plugins,
            node,
            wake: tokio::sync::Notify::new(),
            passes: std::sync::atomic::AtomicU64::new(0),
            inputs,
            functions: std::sync::OnceLock::new(),
            databases: std::sync::OnceLock::new(),
            applied: std::sync::OnceLock::new(),
            behind: std::sync::atomic::AtomicBool::new(false),
            pause_after_claim: std::env::var("WEIR_PLATFORM_PAUSE_AFTER_CLAIM_MS").ok().and_then(|v| v.parse().ok()).map(std::time::Duration::from_millis),
        })
    }

    /// The function runtimes of this node's data plane, which `invoke` runs on and whose logs
    /// the API reads.
    pub fn with_functions(&self, functions: Arc<weir_functions::live::Functions>) {
        let _ = self.functions.set(functions);
    }

    /// Follows the revision this node's data plane serves (see [`weir_store::settled`]).
    pub fn with_applied(&self, applied: tokio::sync::watch::Receiver<weir_store::settled::Applied>) {
        let _ = self.applied.set(applied);
    }

    /// Reconcile passes made so far.
    pub fn passes(&self) -> u64 {
        self.passes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The name this node signs its leases with.
    pub fn node(&self) -> &str {
        &self.node
    }
}

impl weir_admin::Extension for Platform {
    fn serves(&self, path: &str) -> bool {
        ["/v1/api-gateways", "/v1/applications", "/v1/tokens", "/v1/whoami", "/v1/openapi.json"].iter().any(|p| path == *p || path.strip_prefix(p).is_some_and(|rest| rest.starts_with('/')))
    }

    fn has_credential(&self, parts: &http::request::Parts) -> bool {
        tokens::bearer(parts).is_some()
    }

    fn unauthorized(&self) -> Option<http::Response<http_body_util::Full<Bytes>>> {
        Some(api::unauthorized())
    }

    fn refused(&self, status: http::StatusCode, message: &str) -> Option<http::Response<http_body_util::Full<Bytes>>> {
        Some(api::refuse(status, message))
    }

    fn handle<'a>(
        &'a self,
        parts: http::request::Parts,
        body: Bytes,
        role: Option<weir_admin::Role>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = http::Response<http_body_util::Full<Bytes>>> + Send + 'a>> {
        Box::pin(self.answer(parts, body, role))
    }
}
