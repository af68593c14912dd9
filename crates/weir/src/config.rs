//! `weir serve --config FILE`: the process configuration. Unknown keys are errors.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use weir_admin::AdminKey;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub data_encryption: DataEncryption,
    pub plugin_attr: PluginAttr,
    pub deployment: Deployment,
    pub status: StatusConfig,
    /// Seconds that requests in flight get to finish after SIGTERM or SIGINT.
    pub shutdown_timeout: u64,
    pub log: LogConfig,
    pub access_log: AccessLogConfig,
    pub platform: weir_platform::PlatformConfig,
    pub database: DatabaseConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            proxy: ProxyConfig::default(),
            admin: AdminConfig::default(),
            store: StoreConfig::default(),
            data_encryption: DataEncryption::default(),
            plugin_attr: PluginAttr::default(),
            deployment: Deployment::default(),
            status: StatusConfig::default(),
            shutdown_timeout: 30,
            log: LogConfig::default(),
            access_log: AccessLogConfig::default(),
            platform: weir_platform::PlatformConfig::default(),
            database: DatabaseConfig::default(),
        }
    }
}

/// The process log, on stderr.
#[derive(Debug, Deserialize, Default, PartialEq, Eq, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter: `info`, `debug`, `weir_proxy=debug,info`. `RUST_LOG` overrides it.
    pub level: Option<String>,
}

#[derive(Debug, Deserialize, Default, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// One line per proxied request (APISIX's access log fields), as JSON; off by default.
#[derive(Debug, Deserialize, Default, PartialEq, Eq, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    pub enabled: bool,
    /// A file to append to; without it, stdout.
    pub path: Option<PathBuf>,
}

/// What this process does, as APISIX's `deployment.role`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Deployment {
    pub role: DeployRole,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeployRole {
    /// Admin API and proxy in one process.
    #[default]
    Traditional,
    /// The Admin API only: writes to the store, serves no traffic.
    ControlPlane,
    /// The proxy only, reading the store; no Admin API listens.
    DataPlane,
}

impl DeployRole {
    pub fn name(self) -> &'static str {
        match self {
            DeployRole::Traditional => "traditional",
            DeployRole::ControlPlane => "control_plane",
            DeployRole::DataPlane => "data_plane",
        }
    }
}

/// `/status` and `/status/ready` (APISIX's status API); off unless `listen` is set.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    pub listen: Option<SocketAddr>,
}

/// Plugin-wide settings of the process, as APISIX's `plugin_attr`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PluginAttr {
    pub prometheus: PrometheusAttr,
    pub opentelemetry: OtelAttr,
}

/// Where the `opentelemetry` plugin exports spans, and what resource they describe.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelAttr {
    /// Resource attributes; `service.name` defaults to `APISIX`.
    pub resource: std::collections::BTreeMap<String, serde_json::Value>,
    pub collector: OtelCollector,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelCollector {
    /// `host:port` of an OTLP/HTTP collector; spans go to `/v1/traces` as OTLP JSON.
    pub address: String,
    /// Seconds.
    pub request_timeout: u64,
}

impl Default for OtelCollector {
    fn default() -> Self {
        OtelCollector { address: "127.0.0.1:4318".into(), request_timeout: 3 }
    }
}

/// Where the metrics of the `prometheus` plugin are served.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusAttr {
    pub export_uri: String,
    /// With `false`, no metrics listener is opened.
    pub enable_export_server: bool,
    pub export_addr: ExportAddr,
}

impl Default for PrometheusAttr {
    fn default() -> Self {
        PrometheusAttr { export_uri: "/apisix/prometheus/metrics".into(), enable_export_server: true, export_addr: ExportAddr::default() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportAddr {
    pub ip: std::net::IpAddr,
    pub port: u16,
}

impl Default for ExportAddr {
    fn default() -> Self {
        ExportAddr { ip: std::net::Ipv4Addr::LOCALHOST.into(), port: 9091 }
    }
}

/// Secrets that seal private keys in the store. The first seals; all are tried when opening,
/// so a secret is rotated by putting the new one first. With none, a secret is generated on
/// first start and kept with the data. Nodes sharing one store need the same keyring.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DataEncryption {
    pub keyring: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Plain listen addresses: HTTP/1.1, and HTTP/2 with prior knowledge.
    pub listen: Vec<SocketAddr>,
    /// TLS listen addresses; certificates come from `ssls` objects, chosen by SNI.
    pub tls_listen: Vec<SocketAddr>,
    /// The server name assumed when a TLS client sends none (clients connecting by IP address).
    pub tls_fallback_sni: Option<String>,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Seconds a client may take to send a request head, from its first byte (nginx's
    /// `client_header_timeout`).
    pub client_header_timeout: f64,
    /// Seconds an open connection may wait for its next request.
    pub keepalive_timeout: f64,
    /// Seconds a client may pause while sending a request body.
    pub client_body_timeout: f64,
    /// Seconds a response may wait for a client that does not read it.
    pub send_timeout: f64,
    /// Client connections open at once, over all workers; past it new connections are closed
    /// (and a warning logged). Keep it under the process's open-file limit, which upstream
    /// connections share.
    pub max_connections: usize,
    /// Addresses or CIDRs of proxies in front of Weir whose `X-Forwarded-*` fields are kept
    /// (`X-Forwarded-For` appended to); every other client's are replaced (APISIX's
    /// `trusted_addresses`).
    pub trusted_addresses: Vec<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        let limits = weir_http::front::Limits::default();
        ProxyConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 9080))],
            tls_listen: Vec::new(),
            tls_fallback_sni: None,
            workers: 0,
            client_header_timeout: limits.header_timeout.as_secs_f64(),
            keepalive_timeout: limits.keepalive_timeout.as_secs_f64(),
            client_body_timeout: limits.body_timeout.as_secs_f64(),
            send_timeout: limits.send_timeout.as_secs_f64(),
            max_connections: limits.max_connections,
            trusted_addresses: Vec::new(),
        }
    }
}

impl ProxyConfig {
    /// The client-side limits, once `check` has passed.
    pub fn limits(&self) -> weir_http::front::Limits {
        let secs = |s: f64| std::time::Duration::try_from_secs_f64(s).unwrap_or(std::time::Duration::from_secs(60));
        weir_http::front::Limits {
            header_timeout: secs(self.client_header_timeout),
            keepalive_timeout: secs(self.keepalive_timeout),
            body_timeout: secs(self.client_body_timeout),
            send_timeout: secs(self.send_timeout),
            max_connections: self.max_connections,
            trusted: self.trusted_addresses.iter().filter_map(|a| weir_core::model::parse_ip_net(a)).collect(),
        }
    }

    fn check(&self, errors: &mut Vec<String>) {
        let timeouts = [
            ("client_header_timeout", self.client_header_timeout),
            ("keepalive_timeout", self.keepalive_timeout),
            ("client_body_timeout", self.client_body_timeout),
            ("send_timeout", self.send_timeout),
        ];
        for (name, t) in timeouts {
            if !(t > 0.0 && t <= 86_400.0) {
                errors.push(format!("proxy.{name}: {t} must be more than 0 and at most 86400 seconds"));
            }
        }
        if self.max_connections == 0 {
            errors.push("proxy.max_connections: at least 1".to_string());
        }
        for (i, a) in self.trusted_addresses.iter().enumerate() {
            if weir_core::model::parse_ip_net(a).is_none() {
                errors.push(format!("proxy.trusted_addresses[{i}]: \"{a}\" is not an IP address or CIDR"));
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// APISIX-style admin keys. With none, a key is generated on first start and kept with the
    /// data.
    pub keys: Vec<AdminKey>,
    /// Seconds a client may take to send a request head, or to start the next one on an open
    /// connection.
    pub client_header_timeout: f64,
    /// Seconds between two reads of a request body.
    pub client_body_timeout: f64,
    /// Seconds a response write may wait for the client to read.
    pub send_timeout: f64,
    /// Admin connections open at once.
    pub max_connections: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        let limits = weir_admin::Limits::default();
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9180)),
            keys: Vec::new(),
            client_header_timeout: limits.header_timeout.as_secs_f64(),
            client_body_timeout: limits.body_timeout.as_secs_f64(),
            send_timeout: limits.send_timeout.as_secs_f64(),
            max_connections: limits.max_connections,
        }
    }
}

impl AdminConfig {
    pub fn limits(&self) -> weir_admin::Limits {
        let secs = |s: f64| std::time::Duration::try_from_secs_f64(s).unwrap_or(std::time::Duration::from_secs(60));
        weir_admin::Limits {
            header_timeout: secs(self.client_header_timeout),
            body_timeout: secs(self.client_body_timeout),
            send_timeout: secs(self.send_timeout),
            max_connections: self.max_connections,
        }
    }

    fn check(&self, errors: &mut Vec<String>) {
        for (name, t) in [
            ("client_header_timeout", self.client_header_timeout),
            ("client_body_timeout", self.client_body_timeout),
            ("send_timeout", self.send_timeout),
        ] {
            if !(t > 0.0 && t <= 86_400.0) {
                errors.push(format!("admin.{name}: {t} must be more than 0 and at most 86400 seconds"));
            }
        }
        if self.max_connections == 0 {
            errors.push("admin.max_connections: at least 1".to_string());
        }
    }
}

/// `database`: where tenants' gateways keep their documents (`imp.db()`).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    #[serde(rename = "type")]
    pub kind: DatabaseType,
    /// The embedded engine's directory; by default `databases` in the store's directory.
    pub path: Option<PathBuf>,
    /// `postgres://user:password@host:5432/db`, for `type: postgres`.
    pub url: Option<String>,
    /// Connections per gateway's database, for `type: postgres`.
    pub pool: Option<usize>,
    /// Each gateway's quota unless its `limits` set a lower one.
    pub quota: weir_database::Quota,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy, Default)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseType {
    #[default]
    Embedded,
    Postgres,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreType {
    #[default]
    Embedded,
    Etcd,
    /// A declarative file (`path`), as APISIX's standalone mode.
    File,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    #[serde(rename = "type")]
    pub kind: StoreType,
    /// Directory of the embedded store; with `type: file`, the declarative file.
    pub path: PathBuf,
    /// Key prefix of every object, as in APISIX's etcd layout.
    pub prefix: String,
    /// The cluster, for `type: etcd`.
    pub etcd: EtcdConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { kind: StoreType::Embedded, path: PathBuf::from("./weir-data"), prefix: "/apisix".into(), etcd: EtcdConfig::default() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// `http://host:port` of the cluster's members.
    pub endpoints: Vec<String>,
    /// Overrides `store.prefix` (as APISIX's `etcd.prefix`).
    pub prefix: Option<String>,
    /// Seconds, per request.
    pub timeout: u64,
    pub user: Option<String>,
    pub password: Option<String>,
    pub tls: Option<serde_json::Value>,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig { endpoints: vec!["http://127.0.0.1:2379".into()], prefix: None, timeout: 30, user: None, password: None, tls: None }
    }
}

impl StoreConfig {
    /// The key prefix in force: `etcd.prefix` for an etcd store when given, else `prefix`.
    pub fn key_prefix(&self) -> &str {
        match (&self.kind, &self.etcd.prefix) {
            (StoreType::Etcd, Some(p)) => p,
            _ => &self.prefix,
        }
    }
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let cfg: Config = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        if self.proxy.listen.is_empty() {
            errors.push("proxy.listen: at least one address is needed".to_string());
        }
        self.proxy.check(&mut errors);
        self.admin.check(&mut errors);
        let prefix = self.store.key_prefix();
        if !prefix.starts_with('/') || prefix.ends_with('/') {
            errors.push(format!("store.prefix: \"{prefix}\" must start with / and not end with /"));
        }
        if self.store.kind == StoreType::Etcd {
            let e = &self.store.etcd;
            if e.endpoints.is_empty() {
                errors.push("store.etcd.endpoints: at least one endpoint is needed".to_string());
            }
            if e.user.is_some() != e.password.is_some() {
                errors.push("store.etcd: user and password go together".to_string());
            }
            if e.tls.is_some() {
                errors.push("store.etcd.tls: TLS to etcd is not supported by this version".to_string());
            }
        }
        for (i, k) in self.data_encryption.keyring.iter().enumerate() {
            if k.len() < 16 {
                errors.push(format!("data_encryption.keyring[{i}]: a secret needs at least 16 characters"));
            }
        }
        for (i, k) in self.admin.keys.iter().enumerate() {
            if k.key.len() < 8 {
                errors.push(format!("admin.keys[{i}] ({}): a key needs at least 8 characters", k.name));
            }
        }
        if let Some(level) = &self.log.level
            && let Err(e) = crate::logging::check_level(level)
        {
            errors.push(format!("log.level: {e}"));
        }
        if self.access_log.path.is_some() && !self.access_log.enabled {
            errors.push("access_log.path: set, but access_log.enabled is false".to_string());
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("\n")) }
    }
}

/// The keys whose value differs between `old` and `new` among those a running process cannot
/// change (everything but `log.level` and `shutdown_timeout`).
pub fn restart_keys(old: &Config, new: &Config) -> Vec<&'static str> {
    // Compared through `Debug`, which every section has; nothing here is printed.
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let mut keys = Vec::new();
    let mut check = |key, changed| {
        if changed {
            keys.push(key);
        }
    };
    check("proxy.listen", old.proxy.listen != new.proxy.listen);
    check("proxy.tls_listen", old.proxy.tls_listen != new.proxy.tls_listen);
    check("proxy.tls_fallback_sni", old.proxy.tls_fallback_sni != new.proxy.tls_fallback_sni);
    check("proxy.workers", old.proxy.workers != new.proxy.workers);
    check("proxy.client_header_timeout", old.proxy.client_header_timeout != new.proxy.client_header_timeout);
    check("proxy.keepalive_timeout", old.proxy.keepalive_timeout != new.proxy.keepalive_timeout);
    check("proxy.client_body_timeout", old.proxy.client_body_timeout != new.proxy.client_body_timeout);
    check("proxy.send_timeout", old.proxy.send_timeout != new.proxy.send_timeout);
    check("proxy.max_connections", old.proxy.max_connections != new.proxy.max_connections);
    check("proxy.trusted_addresses", old.proxy.trusted_addresses != new.proxy.trusted_addresses);
    check("admin.listen", old.admin.listen != new.admin.listen);
    check("admin.client_header_timeout", old.admin.client_header_timeout != new.admin.client_header_timeout);
    check("admin.client_body_timeout", old.admin.client_body_timeout != new.admin.client_body_timeout);
    check("admin.send_timeout", old.admin.send_timeout != new.admin.send_timeout);
    check("admin.max_connections", old.admin.max_connections != new.admin.max_connections);
    check("admin.keys", differs(&old.admin.keys, &new.admin.keys));
    check("store", differs(&old.store, &new.store));
    check("platform", old.platform != new.platform);
    check("data_encryption", differs(&old.data_encryption, &new.data_encryption));
    check("plugin_attr.prometheus", differs(&old.plugin_attr.prometheus, &new.plugin_attr.prometheus));
    check("plugin_attr.opentelemetry", differs(&old.plugin_attr.opentelemetry, &new.plugin_attr.opentelemetry));
    check("deployment.role", old.deployment.role != new.deployment.role);
    check("status.listen", old.status.listen != new.status.listen);
    check("log.format", old.log.format != new.log.format);
    check("access_log", old.access_log != new.access_log);
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_that_needs_a_restart_is_named() {
        let old: Config = serde_saphyr::from_str("{}").unwrap();
        for (yaml, key) in [
            ("proxy: {trusted_addresses: [\"10.0.0.0/8\"]}", "proxy.trusted_addresses"),
            ("proxy: {max_connections: 5}", "proxy.max_connections"),
            ("proxy: {client_header_timeout: 5}", "proxy.client_header_timeout"),
            ("proxy: {send_timeout: 5}", "proxy.send_timeout"),
            ("admin: {client_header_timeout: 5}", "admin.client_header_timeout"),
            ("admin: {client_body_timeout: 5}", "admin.client_body_timeout"),
            ("admin: {send_timeout: 5}", "admin.send_timeout"),
            ("admin: {max_connections: 5}", "admin.max_connections"),
        ] {
            let new: Config = serde_saphyr::from_str(yaml).unwrap();
            assert_eq!(restart_keys(&old, &new), vec![key], "{yaml}");
        }
    }

    #[test]
    fn etcd_store_settings() {
        let c = Config::parse("store:\n  type: etcd\n  etcd:\n    endpoints: [\"http://127.0.0.1:2379\"]\n    prefix: /gw\n    timeout: 5\n").unwrap();
        assert_eq!((c.store.key_prefix(), c.store.etcd.timeout), ("/gw", 5));
        let e = Config::parse("store:\n  type: etcd\n  etcd:\n    endpoints: []\n    user: root\n").unwrap_err();
        assert!(e.contains("at least one endpoint") && e.contains("user and password go together"), "{e}");
        assert!(Config::parse("store:\n  etcd:\n    hosts: []\n").unwrap_err().contains("hosts"), "unknown keys are named");
    }

    #[test]
    fn client_limits() {
        let c = Config::parse("").unwrap();
        let l = c.proxy.limits();
        assert_eq!((l.header_timeout.as_secs(), l.keepalive_timeout.as_secs(), l.max_connections), (60, 60, 10_000));
        assert!(l.trusted.is_empty(), "no peer is trusted by default");
        let c = Config::parse("proxy:\n  client_header_timeout: 0.5\n  trusted_addresses: [\"10.0.0.0/8\", \"::1\"]\n").unwrap();
        let l = c.proxy.limits();
        assert_eq!(l.header_timeout.as_millis(), 500);
        assert!(l.trusts("10.1.2.3".parse().unwrap()) && l.trusts("::1".parse().unwrap()) && !l.trusts("11.0.0.1".parse().unwrap()));
        let e = Config::parse("proxy:\n  send_timeout: 0\n  max_connections: 0\n  trusted_addresses: [\"10.0.0.0/33\"]\n").unwrap_err();
        assert!(e.contains("proxy.send_timeout") && e.contains("proxy.max_connections") && e.contains("trusted_addresses[0]"), "{e}");
        let a = Config::parse("").unwrap().admin.limits();
        assert_eq!((a.header_timeout.as_secs(), a.body_timeout.as_secs(), a.send_timeout.as_secs(), a.max_connections), (60, 60, 60, 1024));
        let a = Config::parse("admin:\n  client_body_timeout: 0.25\n  max_connections: 3\n").unwrap().admin.limits();
        assert_eq!((a.body_timeout.as_millis(), a.max_connections), (250, 3));
        let e = Config::parse("admin:\n  send_timeout: -1\n  max_connections: 0\n").unwrap_err();
        assert!(e.contains("admin.send_timeout") && e.contains("admin.max_connections"), "{e}");
    }

    #[test]
    fn defaults_and_full_file() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.proxy.listen, vec!["127.0.0.1:9080".parse().unwrap()]);
        assert_eq!(c.admin.listen, "127.0.0.1:9180".parse().unwrap());
        let c = Config::parse(
            "proxy:\n  listen: [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n  workers: 2\nadmin:\n  listen: \"127.0.0.1:3\"\n  keys:\n    - {name: a, key: \"0123456789\", role: viewer}\nstore:\n  type: embedded\n  path: /tmp/x\n",
        )
        .unwrap();
        assert_eq!(c.proxy.workers, 2);
        assert_eq!(c.admin.keys[0].role, weir_admin::Role::Viewer);
        let c = Config::parse("proxy:\n  tls_listen: [\"127.0.0.1:9443\"]\ndata_encryption:\n  keyring: [\"0123456789abcdef\"]\n").unwrap();
        assert_eq!(c.proxy.tls_listen, vec!["127.0.0.1:9443".parse().unwrap()]);
        assert_eq!(c.data_encryption.keyring.len(), 1);
        let e = Config::parse("data_encryption:\n  keyring: [\"short\"]\n").unwrap_err();
        assert!(e.contains("keyring[0]"), "{e}");
    }

    #[test]
    fn the_sample_config_is_accepted_and_says_the_defaults() {
        let c = Config::parse(include_str!("../../../dist/weir.example.yaml")).unwrap();
        let d = Config::default();
        assert!(restart_keys(&d, &c).is_empty(), "{:?}", restart_keys(&d, &c));
        assert_eq!((c.shutdown_timeout, &c.log), (d.shutdown_timeout, &d.log));
        Config::parse(include_str!("../../../dist/docker.yaml")).unwrap();
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::parse("proxy:\n  lisen: []\n").unwrap_err();
        assert!(e.contains("lisen"), "{e}");
        let e = Config::parse("stroe: {}\n").unwrap_err();
        assert!(e.contains("stroe"), "{e}");
        let e = Config::parse("admin:\n  keys:\n    - {name: a, key: \"0123456789\", role: root}\n").unwrap_err();
        assert!(e.contains("root"), "{e}");
    }
}
