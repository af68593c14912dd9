//! What the platform stores: a gateway, with its environments inside it, as one document per
//! gateway (`{prefix}/platform/gateways/{gid}`), and the bodies the API accepts.
//!
//! A gateway's `state` is what its owner wants (`Running`, `Stopped`); its `phase` is how far
//! the reconciler got. The API writes the first, the reconciler the second and the lease
//! (`lockedAt`, `lockedBy`); both write through compare-and-set, so neither loses the other's
//! change.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// A gateway's environments, in promotion order.
pub const ENVIRONMENTS: [&str; 3] = ["dev", "staging", "prod"];

/// A gateway id is a DNS label, so it can lead a host name.
pub const GATEWAY_ID: &str = "^[a-z0-9][a-z0-9-]{1,38}[a-z0-9]$";

/// A host name (for custom domains): labels of letters, digits and `-`, dot-separated.
pub const HOST: &str = r"^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$";

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    Running,
    Stopped,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Creating,
    Created,
    Starting,
    Started,
    Stopping,
    Stopped,
    Deleting,
    Deleted,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum EnvState {
    Active,
    Inactive,
}

/// The auth plugin an environment puts in front of everything it serves.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
pub enum AuthType {
    None,
    KeyAuth,
    JwtAuth,
    BasicAuth,
}

impl AuthType {
    /// The plugin, if any.
    pub fn plugin(self) -> Option<&'static str> {
        match self {
            AuthType::None => None,
            AuthType::KeyAuth => Some("key-auth"),
            AuthType::JwtAuth => Some("jwt-auth"),
            AuthType::BasicAuth => Some("basic-auth"),
        }
    }
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Promotion {
    pub enabled: bool,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    pub gateway_id: String,
    pub name: String,
    pub plugins: Map<String, Value>,
    pub custom_domains: Vec<String>,
    pub promotion_pipeline: Promotion,
    pub state: State,
    pub phase: Phase,
    pub environments: Vec<Environment>,
    /// Why the gateway is where it is, when a step failed or timed out.
    pub reason: Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
    /// Milliseconds since the epoch at which a node claimed the gateway's work.
    pub locked_at: Option<u64>,
    pub locked_by: Option<String>,
    /// Counts the owner's changes; the reconciler renders until it has rendered the latest.
    pub generation: u64,
    pub rendered_generation: u64,
    /// The newest store revision a render of the gateway wrote (0: none yet): what a node must
    /// serve before it answers an owner's change as served.
    #[serde(default)]
    pub rendered_revision: i64,
    /// The platform settings the last render read (`Platform`'s render inputs).
    #[serde(default)]
    pub rendered_with: String,
    /// Made once when the gateway is created (empty for gateways made before it existed): what
    /// tells this gateway apart from an earlier one of the same id, so that nothing the earlier
    /// one left running (its function runtime, logs, a call still writing to its database) is
    /// ever handed to it.
    #[serde(default)]
    pub incarnation: String,
    /// When the phase last changed (ms).
    pub phase_since: u64,
    /// Failed attempts at the current step, and when the next may run (ms).
    pub attempts: u32,
    pub retry_at: u64,
    /// Limits of the gateway's function calls (capped by the node's maxima).
    #[serde(default)]
    pub limits: weir_functions::LimitsDoc,
    /// `host:port` entries the gateway's functions may `fetch`.
    #[serde(default)]
    pub fetch_allow_list: Vec<String>,
    /// Variables the gateway's functions read as `imp.env`; secret values are sealed in the
    /// store and never shown.
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// Whether the environments share the gateway's database or each has its own; set when
    /// the gateway is made.
    #[serde(default)]
    pub database_isolation: Isolation,
    /// The gateway's database quotas where it set them (the node's `database.quota`, which
    /// they may not exceed, otherwise).
    #[serde(default)]
    pub db_limits: weir_functions::DbLimits,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    #[default]
    Gateway,
    Environment,
}

impl Gateway {
    /// The name of the database environment `env`'s functions reach.
    pub fn database_name(&self, env: &str) -> String {
        match self.database_isolation {
            Isolation::Gateway => self.database_base(),
            Isolation::Environment => format!("{}.{env}", self.database_base()),
        }
    }

    /// Every name a database of the gateway can have, whatever its isolation.
    pub fn database_names(&self) -> Vec<String> {
        let base = self.database_base();
        std::iter::once(base.clone()).chain(ENVIRONMENTS.iter().map(|e| format!("{base}.{e}"))).collect()
    }

    /// The gateway's id, and its incarnation when it has one: a gateway made again under a
    /// deleted one's id never opens the earlier one's databases.
    fn database_base(&self) -> String {
        match self.incarnation.as_str() {
            "" => self.gateway_id.clone(),
            i => format!("{}.{i}", self.gateway_id),
        }
    }
}

/// One of a gateway's variables.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    #[schemars(regex(pattern = "^[A-Za-z_][A-Za-z0-9_]{0,127}$"))]
    pub name: String,
    #[schemars(length(max = 32768))]
    pub value: String,
    #[serde(default)]
    pub secret: bool,
    /// The environments whose functions read the variable; every one when not given. A
    /// variable kept to `prod` is not in the `imp.env` of a function a developer can write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 3))]
    pub environments: Option<Vec<String>>,
}

impl EnvVar {
    /// Whether functions of environment `env` read the variable.
    pub fn reaches(&self, env: &str) -> bool {
        self.environments.as_ref().is_none_or(|envs| envs.iter().any(|e| e == env))
    }
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Environment {
    pub name: String,
    pub plugins: Map<String, Value>,
    pub auth_type: AuthType,
    pub custom_domain: Option<String>,
    pub state: EnvState,
    /// An APISIX upstream object: where requests that name nothing else go.
    pub upstream: Option<Value>,
    pub phase: Phase,
}

impl Environment {
    pub fn new(name: &str) -> Environment {
        Environment {
            name: name.to_string(),
            plugins: Map::new(),
            auth_type: AuthType::None,
            custom_domain: None,
            state: EnvState::Active,
            upstream: None,
            phase: Phase::Created,
        }
    }
}

impl Gateway {
    pub fn environment(&self, name: &str) -> Option<&Environment> {
        self.environments.iter().find(|e| e.name == name)
    }

    /// The gateway as the API shows it: without the reconciler's bookkeeping, but with its
    /// lease (which node works on it, since when).
    pub fn shown(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("a gateway serializes");
        if let Some(o) = v.as_object_mut() {
            for k in Gateway::HIDDEN {
                o.remove(k);
            }
        }
        // A secret variable's value is never shown.
        if let Some(vars) = v.get_mut("env").and_then(Value::as_array_mut) {
            for var in vars.iter_mut().filter(|v| v["secret"] == true) {
                if let Some(o) = var.as_object_mut() {
                    o.remove("value");
                }
            }
        }
        v
    }

    /// The reconciler's bookkeeping, which the API does not show.
    pub const HIDDEN: [&str; 8] = ["generation", "renderedGeneration", "renderedRevision", "renderedWith", "incarnation", "phaseSince", "attempts", "retryAt"];
}

/// `POST /v1/api-gateways`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateGateway {
    #[schemars(length(min = 1, max = 100))]
    pub name: String,
    #[schemars(regex(pattern = GATEWAY_ID))]
    pub gateway_id: Option<String>,
    pub plugins: Option<Map<String, Value>>,
    #[schemars(length(max = 16), inner(length(max = 253), regex(pattern = HOST)))]
    pub custom_domains: Option<Vec<String>>,
    pub promotion_pipeline: Option<Promotion>,
    pub limits: Option<LimitsInput>,
    #[schemars(length(max = 64), inner(length(min = 1, max = 260)))]
    pub fetch_allow_list: Option<Vec<String>>,
    #[schemars(length(max = 100))]
    pub env: Option<Vec<EnvVar>>,
    /// `gateway` (default): one database for the gateway's environments; `environment`: one
    /// each. Fixed once the gateway is made.
    pub database_isolation: Option<Isolation>,
}

/// A gateway's function limits, each within the node's maxima.
#[derive(Deserialize, JsonSchema, Clone, Copy)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsInput {
    #[schemars(range(min = 1))]
    pub timeout_ms: Option<u64>,
    #[schemars(range(min = 1))]
    pub wall_ms: Option<u64>,
    #[serde(rename = "memoryMiB")]
    #[schemars(range(min = 4))]
    pub memory_mib: Option<u64>,
    #[schemars(range(min = 1))]
    pub concurrency: Option<usize>,
    /// Documents the gateway's database may hold.
    #[schemars(range(min = 1))]
    pub db_documents: Option<u64>,
    /// Bytes of documents it may hold.
    #[schemars(range(min = 1))]
    pub db_bytes: Option<u64>,
    /// Milliseconds one query may run.
    #[schemars(range(min = 1))]
    pub db_query_ms: Option<u64>,
}

/// `PATCH /v1/api-gateways/{gid}`: what is given replaces what was.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PatchGateway {
    #[schemars(length(min = 1, max = 100))]
    pub name: Option<String>,
    pub plugins: Option<Map<String, Value>>,
    #[schemars(length(max = 16), inner(length(max = 253), regex(pattern = HOST)))]
    pub custom_domains: Option<Vec<String>>,
    pub promotion_pipeline: Option<Promotion>,
    pub state: Option<State>,
    pub limits: Option<LimitsInput>,
    #[schemars(length(max = 64), inner(length(min = 1, max = 260)))]
    pub fetch_allow_list: Option<Vec<String>>,
    #[schemars(length(max = 100))]
    pub env: Option<Vec<EnvVar>>,
}

/// `PATCH /v1/api-gateways/{gid}/environments/{env}`: what is given replaces what was; `null`
/// clears `customDomain` and `upstream`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PatchEnvironment {
    pub plugins: Option<Map<String, Value>>,
    pub auth_type: Option<AuthType>,
    #[serde(default, deserialize_with = "given")]
    #[schemars(length(max = 253), regex(pattern = HOST))]
    pub custom_domain: Option<Option<String>>,
    pub state: Option<EnvState>,
    #[serde(default, deserialize_with = "given")]
    #[schemars(schema_with = "upstream_or_null")]
    pub upstream: Option<Option<Map<String, Value>>>,
}

/// An APISIX upstream, as the catalog's schema has it, or `null`.
fn upstream_or_null(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = weir_catalog::upstream_schema();
    schema["type"] = serde_json::json!(["object", "null"]);
    schema.try_into().expect("an upstream schema is an object")
}

/// A field that is present, even as `null`, is `Some`.
fn given<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Each merged plugin and the layer it came from.
pub type Effective = BTreeMap<String, (Value, &'static str)>;
