//! `weir`: the gateway binary.

mod cli;
mod config;
mod logging;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use clap::{Parser, Subcommand};
use http::StatusCode;
use weir_admin::{Admin, AdminKey, Control, Role};
use weir_proxy::proxy::Proxy;
use weir_proxy::snapshot::{Builder, Snapshot};
use weir_tls::Keyring;
use weir_store::{EmbeddedStore, EtcdOptions, EtcdStore, FileStore, SharedStore};

use crate::config::{Config, DeployRole, LogConfig, StoreType};
use weir_proxy::watch::SyncStatus;

// The proxy allocates small, short-lived buffers per request; mimalloc keeps them thread-local
// and avoids glibc's trimming and refaulting under steady load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "weir", version, about = "An API gateway compatible with Apache APISIX's Admin API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway.
    Serve {
        /// YAML config file; without it, the defaults (loopback only, ./weir-data).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check a declarative config file (APISIX's standalone layout, YAML or JSON) and list
    /// every error; exits non-zero when there is one.
    Validate {
        file: PathBuf,
    },
    /// Print a backup of the configured store (every object, credentials included, values as
    /// stored) as JSON. A running node is asked through its Admin API; a stopped node's store
    /// is read directly.
    Dump {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the declarative layout instead (as JSON, which the file store reads back;
        /// credentials have no place there and are left out).
        #[arg(long)]
        declarative: bool,
        /// The running node's Admin API, when it is not `admin.listen` (e.g. that is port 0).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
    /// Replace everything in the configured store with a backup written by `weir dump`. The
    /// embedded store must not be in use: stop the node first.
    Restore {
        #[arg(long, short)]
        config: Option<PathBuf>,
        file: PathBuf,
    },
    /// Save a server and platform token for `weir fn` (in the user's config directory).
    Login(cli::LoginArgs),
    /// A gateway's cloud functions: pull, deploy, invoke, logs, promote.
    Fn(cli::FnArgs),
}

/// Fixed answers for names functions fetch and tenants' upstreams name, from `WEIR_FUNCTIONS_TEST_HOSTS`
/// (`name=ip,name=ip`): how a test makes a name resolve to a private address without DNS.
fn test_hosts() -> std::collections::HashMap<String, Vec<std::net::IpAddr>> {
    let mut fixed: std::collections::HashMap<String, Vec<std::net::IpAddr>> = std::collections::HashMap::new();
    for pair in std::env::var("WEIR_FUNCTIONS_TEST_HOSTS").unwrap_or_default().split(',') {
        if let Some((name, ip)) = pair.split_once('=')
            && let Ok(ip) = ip.trim().parse()
        {
            fixed.entry(name.trim().to_ascii_lowercase()).or_default().push(ip);
        }
    }
    fixed
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weir: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<std::process::ExitCode> {
    let done = |r: anyhow::Result<()>| r.map(|()| std::process::ExitCode::SUCCESS);
    match command {
        Command::Serve { config } => done(read_config(config.as_deref()).and_then(|cfg| {
            let log = logging::init(&cfg.log);
            serve(cfg, config.as_deref(), log)
        })),
        Command::Validate { file } => {
            logging::init(&LogConfig::default());
            done(validate(&file))
        }
        Command::Dump { config, declarative, admin } => {
            logging::init(&LogConfig::default());
            done(if declarative { dump(config.as_deref()) } else { backup(config.as_deref(), admin) })
        }
        Command::Restore { config, file } => {
            logging::init(&LogConfig::default());
            done(restore(config.as_deref(), &file))
        }
        Command::Login(args) => cli::login(&args),
        Command::Fn(args) => cli::functions(args),
    }
}

/// The admin keys in force: configured ones, plus `WEIR_ADMIN_KEY`; with neither, the key
/// generated on first start and kept in the data directory.
fn admin_keys(cfg: &Config) -> anyhow::Result<Vec<AdminKey>> {
    let mut keys = cfg.admin.keys.clone();
    if let Ok(k) = std::env::var("WEIR_ADMIN_KEY") {
        anyhow::ensure!(k.len() >= 8, "WEIR_ADMIN_KEY needs at least 8 characters");
        keys.retain(|x| x.role != Role::Admin);
        keys.push(AdminKey { name: "admin".into(), key: k, role: Role::Admin });
        return Ok(keys);
    }
    if !keys.is_empty() {
        return Ok(keys);
    }
    let path = cfg.store.path.join("admin_key");
    let key = match std::fs::read_to_string(&path) {
        Ok(k) => k.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => generate_key(&path)?,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(vec![AdminKey { name: "admin".into(), key, role: Role::Admin }])
}

/// Writes one start-up line to stdout for whoever launched Weir. The reader may have gone away
/// (a closed pipe); that must not stop a running gateway, so write errors are ignored.
fn announce(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(line).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush());
}

fn generate_key(path: &Path) -> anyhow::Result<String> {
    let key = Keyring::generate_secret()[..32].to_string();
    write_secret(path, &key)?;
    announce(format_args!("weir: generated admin key {key} (kept in {}; shown only once)", path.display()));
    Ok(key)
}

/// The keyring sealing private keys: configured, or generated on first start and kept with the
/// data (never printed).
fn keyring(cfg: &Config) -> anyhow::Result<Keyring> {
    if !cfg.data_encryption.keyring.is_empty() {
        return Ok(Keyring::new(&cfg.data_encryption.keyring));
    }
    let path = cfg.store.path.join("data_encryption_key");
    let secret = match std::fs::read_to_string(&path) {
        Ok(k) => k.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = Keyring::generate_secret();
            write_secret(&path, &secret)?;
            secret
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(Keyring::new(&[secret]))
}

/// Writes a new secret file readable by its owner only; an existing file is never replaced.
fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// How the data plane opens plugin fields the Admin API sealed (see `weir_tls::FIELD_MARK`).
fn secret_opener(keyring: Arc<Keyring>) -> weir_plugins::SecretOpener {
    Arc::new(move |conf: &serde_json::Value| {
        if !Keyring::has_sealed_fields(conf) {
            return Ok(None);
        }
        let mut plain = conf.clone();
        keyring.open_fields(&mut plain).map_err(|e| format!("a sealed value cannot be opened: {e}"))?;
        Ok(Some(plain))
    })
}

/// The data plane's live state on the admin listener, under `/v1/` as APISIX's control API.
struct ControlApi {
    snapshot: Arc<ArcSwap<Snapshot>>,
    prefix: String,
}

impl Control for ControlApi {
    fn get(&self, path: &str) -> Option<(StatusCode, serde_json::Value)> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if segs.first() != Some(&"healthcheck") {
            return None;
        }
        let snapshot = self.snapshot.load();
        let error = |status, msg: String| Some((status, serde_json::json!({ "error_msg": msg })));
        match segs[1..] {
            [] => Some((StatusCode::OK, snapshot.health_report())),
            [kind @ ("routes" | "services" | "upstreams")] => {
                error(StatusCode::NOT_FOUND, format!("missing src id for src type {kind}"))
            }
            [kind @ ("routes" | "services" | "upstreams"), id] => {
                match snapshot.health_of(&format!("{}/{kind}/{id}", self.prefix)) {
                    Some(v) => Some((StatusCode::OK, v)),
                    None => error(StatusCode::NOT_FOUND, format!("no checker for {kind}[{id}]")),
                }
            }
            [kind, ..] => error(StatusCode::BAD_REQUEST, format!("invalid src type {kind}")),
        }
    }
}

fn read_config(config: Option<&Path>) -> anyhow::Result<Config> {
    match config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Config::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        }
        None => Ok(Config::default()),
    }
}

fn validate(file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let json = file.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    match weir_store::load_file(&text, json, "/apisix", &weir_catalog::Catalog::apisix(), &weir_plugins::registry()) {
        Ok(objects) => {
            println!("{}: ok ({} objects)", file.display(), objects.len());
            Ok(())
        }
        Err(errors) => {
            for e in &errors {
                println!("{}: {e}", file.display());
            }
            anyhow::bail!("{} error(s) in {}", errors.len(), file.display())
        }
    }
}

/// Prints every object of the configured store, by section, in the declarative layout.
/// Sealed plugin fields are printed opened, as a declarative file holds them (file mode reads
/// plain values without any keyring); one this node's keyring cannot open stays sealed.
fn dump(config: Option<&Path>) -> anyhow::Result<()> {
    let cfg = read_config(config)?;
    let keyring = keyring(&cfg)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let doc = rt.block_on(async {
        let store = open_store(&cfg).await?;
        let prefix = cfg.store.key_prefix();
        let (kvs, _) = store.list(&format!("{prefix}/")).await?;
        let mut doc = serde_json::Map::new();
        for kv in kvs {
            let Some((resource, id)) = weir_core::Resource::from_key(prefix, &kv.key) else { continue };
            if resource == weir_core::Resource::Credentials {
                tracing::warn!(key = %kv.key, "credentials have no place in the declarative layout; left out");
                continue;
            }
            let mut value: serde_json::Value = serde_json::from_slice(&kv.value).with_context(|| format!("reading {}", kv.key))?;
            if let Some(plugins) = value.get_mut("plugins")
                && let Err(e) = keyring.open_fields(plugins)
            {
                tracing::warn!(key = %kv.key, error = %e, "a sealed plugin field cannot be opened; dumped sealed");
                value = serde_json::from_slice(&kv.value).with_context(|| format!("reading {}", kv.key))?;
            }
            if resource == weir_core::Resource::PluginMetadata
                && let Some(o) = value.as_object_mut()
            {
                o.insert("id".into(), id.into());
            }
            let section = doc.entry(resource.name()).or_insert_with(|| serde_json::Value::Array(Vec::new()));
            if let Some(list) = section.as_array_mut() {
                list.push(value);
            }
        }
        anyhow::Ok(serde_json::Value::Object(doc))
    })?;
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

/// Prints a backup of the configured store. An embedded store held by a running node cannot
/// be opened by a second process; that node is asked through its Admin API instead.
fn backup(config: Option<&Path>, admin: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let cfg = read_config(config)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let prefix = cfg.store.key_prefix();
    let doc = match rt.block_on(async { anyhow::Ok(weir_store::backup::export(open_store(&cfg).await?.as_ref(), prefix).await?) }) {
        Ok(doc) => doc,
        Err(direct) if cfg.store.kind == StoreType::Embedded => {
            let body = admin_get(&cfg, admin.unwrap_or(cfg.admin.listen), weir_admin::BACKUP_PATH)
                .with_context(|| format!("the store cannot be opened ({direct:#}), and no running node answered"))?;
            serde_json::from_slice(&body).context("reading the backup the node sent")?
        }
        Err(e) => return Err(e),
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &doc)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

fn restore(config: Option<&Path>, file: &Path) -> anyhow::Result<()> {
    let cfg = read_config(config)?;
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let doc: serde_json::Value = serde_json::from_slice(&text).with_context(|| format!("{}: not JSON", file.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let count = rt.block_on(async {
        let store = open_store(&cfg).await.context("opening the store (a running node holds an embedded store: stop it first)")?;
        weir_store::backup::restore(store.as_ref(), cfg.store.key_prefix(), &doc).await.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
    })?;
    eprintln!("weir: restored {count} objects from {}", file.display());
    Ok(())
}

/// `GET path` on the running node's Admin API with an admin key from the config, the
/// environment or the data directory; the body of a 200.
fn admin_get(cfg: &Config, mut addr: std::net::SocketAddr, path: &str) -> anyhow::Result<Vec<u8>> {
    let key = std::env::var("WEIR_ADMIN_KEY")
        .ok()
        .or_else(|| cfg.admin.keys.iter().find(|k| k.role == Role::Admin).map(|k| k.key.clone()))
        .or_else(|| std::fs::read_to_string(cfg.store.path.join("admin_key")).ok().map(|k| k.trim().to_string()))
        .context("no admin key (admin.keys, WEIR_ADMIN_KEY or the data directory's admin_key)")?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { std::net::Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let r = cli::send(&cli::Endpoint::from_addr(addr), "GET", path, &[("x-api-key", &key)], None).with_context(|| format!("asking the Admin API at {addr}"))?;
    anyhow::ensure!(r.status == 200, "the Admin API at {addr} answered {}: {}", r.status, String::from_utf8_lossy(&r.body));
    Ok(r.body)
}

/// The configured store: the embedded one in `store.path`, an etcd cluster, or a declarative
/// file.
async fn open_store(cfg: &Config) -> anyhow::Result<SharedStore> {
    Ok(match cfg.store.kind {
        StoreType::File => {
            let plugins: Arc<dyn weir_core::schema::PluginCatalog> = Arc::new(weir_plugins::registry());
            let store = FileStore::open(&cfg.store.path, cfg.store.key_prefix(), Arc::new(weir_catalog::Catalog::apisix()), plugins)
                .map_err(|errors| anyhow::anyhow!("{}:\n{}", cfg.store.path.display(), errors.join("\n")))?;
            Arc::new(store)
        }
        StoreType::Embedded => Arc::new(EmbeddedStore::open(&cfg.store.path).context("opening the store")?),
        StoreType::Etcd => {
            let e = &cfg.store.etcd;
            let opts = EtcdOptions {
                endpoints: e.endpoints.clone(),
                timeout: std::time::Duration::from_secs(e.timeout.max(1)),
                user: e.user.clone().zip(e.password.clone()),
            };
            Arc::new(EtcdStore::connect(&opts).await.with_context(|| format!("connecting to etcd at {}", e.endpoints.join(", ")))?)
        }
    })
}

fn serve(cfg: Config, config: Option<&Path>, log: logging::LogHandle) -> anyhow::Result<()> {
    // Before any thread runs nicer than the process: the threads serving tenants start here.
    weir_core::threads::prepare();
    // With a declarative file there is nothing to write to: no Admin API, as APISIX's
    // standalone mode.
    let from_file = cfg.store.kind == StoreType::File;
    let role = if from_file { DeployRole::DataPlane } else { cfg.deployment.role };
    // A data plane serves no Admin API, so it has no admin key to make.
    let keys = if role == DeployRole::DataPlane { Vec::new() } else { admin_keys(&cfg)? };
    let keyring = if from_file && cfg.data_encryption.keyring.is_empty() {
        // Keys in a declarative file are in the clear; nothing sealed needs a kept secret.
        Arc::new(Keyring::new(&[Keyring::generate_secret()]))
    } else {
        Arc::new(keyring(&cfg)?)
    };
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::empty()));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("weir-control")
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Handled from the start, so a signal during start-up does not take its default action.
        let mut signals = Signals::new()?;
        if cfg.access_log.enabled && role != DeployRole::ControlPlane {
            weir_proxy::access::init(cfg.access_log.path.as_deref())?;
        }
        let mut listeners = Vec::new();
        let store = open_store(&cfg).await?;
        let prefix = cfg.store.key_prefix().to_string();
        let (loaded_tx, mut loaded) = tokio::sync::watch::channel(false);
        let otel = serde_json::to_value(&cfg.plugin_attr.opentelemetry)?;
        // `key-auth`'s and `basic-auth`'s hashed credentials and `jwt-auth`'s derived secrets
        // are keyed by subkeys of the keyring, the same on every node that shares it.
        let key_auth = weir_plugins::key_auth_attr(&keyring.derive("key-auth"));
        let basic_auth = weir_plugins::basic_auth_attr(&keyring.derive("basic-auth"));
        let jwt_auth = weir_plugins::jwt_auth_attr(&keyring.derive("jwt-auth"));
        let plugins = Arc::new(
            weir_plugins::registry()
                .with_attr("opentelemetry", otel)
                .with_attr("key-auth", key_auth)
                .with_attr("basic-auth", basic_auth)
                .with_attr("jwt-auth", jwt_auth)
                .with_secrets(secret_opener(keyring.clone())),
        );
        let sync = Arc::new(SyncStatus::default());
        let mut bound = Vec::new();
        // Tenants' functions run where the data plane does; the platform's `invoke` uses the
        // same runtimes.
        let fetch_allowed: Vec<ipnet::IpNet> = cfg.platform.functions.fetch_allow_networks.iter().map(|n| n.parse().with_context(|| format!("platform.functions.fetch_allow_networks: {n:?} is not a CIDR"))).collect::<anyhow::Result<_>>()?;
        // What the operator refuses tenants' upstreams, a function's fetch is refused too; read
        // only where tenants' traffic runs.
        let tenants_denied: Vec<ipnet::IpNet> = match role != DeployRole::ControlPlane && cfg.platform.enabled.unwrap_or(true) {
            true => cfg.platform.denied_networks.iter().map(|n| n.parse().with_context(|| format!("platform.denied_networks: {n:?} is not a CIDR"))).collect::<anyhow::Result<_>>()?,
            false => Vec::new(),
        };
        // Until every listener is bound (and its port known), the configured ones are refused.
        let prom_addr = std::net::SocketAddr::new(cfg.plugin_attr.prometheus.export_addr.ip, cfg.plugin_attr.prometheus.export_addr.port);
        let configured: Vec<std::net::SocketAddr> = cfg.proxy.listen.iter().chain(&cfg.proxy.tls_listen).copied().chain([cfg.admin.listen, prom_addr]).chain(cfg.status.listen).filter(|a| a.port() != 0).collect();
        let outbound = weir_functions::fetch::Outbound::new(weir_functions::guard::Policy::new(&fetch_allowed, &tenants_denied, configured.clone()), test_hosts(), tokio::runtime::Handle::current()).map_err(anyhow::Error::msg)?;
        let databases = databases(&cfg)?;
        let db_runner = databases.clone().map(|d| weir_platform::database::runner(d, cfg.database.quota, tokio::runtime::Handle::current()));
        let settings = weir_functions::live::Settings { fetcher: Some(outbound.fetcher()), keyring: Some(keyring.clone()), database: db_runner };
        let functions = (role != DeployRole::ControlPlane && cfg.platform.enabled.unwrap_or(true)).then(|| weir_functions::live::Functions::new(&prefix, settings));
        let mut own_addrs: Vec<std::net::SocketAddr> = Vec::new();
        let mut tenant_reach: Option<Arc<weir_upstream::reach::Reach>> = None;
        if role != DeployRole::ControlPlane {
            let mut builder = Builder::new(&prefix, keyring.clone(), plugins.clone());
            if let Some(f) = &functions {
                builder = builder.with_contributor(f.clone());
            }
            // Tenants' upstreams connect only outside the networks the platform refuses them,
            // whatever their nodes' names resolve to.
            if cfg.platform.enabled.unwrap_or(true) {
                let reach = Arc::new(weir_upstream::reach::Reach::new(tenants_denied.clone(), test_hosts()));
                reach.set_own(configured.clone());
                tenant_reach = Some(reach.clone());
                builder = builder.with_tenant_reach(reach);
            }
            tokio::spawn(weir_proxy::watch::follow(store.clone(), prefix.clone(), builder, snapshot.clone(), loaded_tx, sync.clone()));
            // Serve nothing until the stored config is live, so a restart never answers 404 for
            // routes that exist.
            loaded.wait_for(|l| *l).await.context("config loader stopped")?;
            let proxy = Arc::new(Proxy::new(snapshot.clone())
                .with_fallback_sni(cfg.proxy.tls_fallback_sni.clone())
                .with_limits(cfg.proxy.limits()));
            bound = weir_proxy::server::start(&cfg.proxy.listen, &cfg.proxy.tls_listen, cfg.proxy.workers, proxy)?;
        }
        own_addrs.extend(bound.iter().map(|(a, _)| *a));
        if let Some(addr) = cfg.status.listen {
            let l = listen(addr).await?;
            own_addrs.push(l.local_addr()?);
            announce(format_args!("weir: status listening on http://{}", l.local_addr()?));
            let serves_traffic = role != DeployRole::ControlPlane;
            listeners.push(tokio::spawn(weir_proxy::status::serve(l, role.name(), serves_traffic.then(|| sync.clone()))));
        }
        let prom = &cfg.plugin_attr.prometheus;
        if prom.enable_export_server && role != DeployRole::ControlPlane {
            let addr = std::net::SocketAddr::new(prom.export_addr.ip, prom.export_addr.port);
            let l = listen(addr).await?;
            own_addrs.push(l.local_addr()?);
            announce(format_args!("weir: prometheus metrics on http://{}{}", l.local_addr()?, prom.export_uri));
            listeners.push(tokio::spawn(weir_proxy::exporter::serve(l, prom.export_uri.clone())));
        }
        for (addr, tls) in &bound {
            let scheme = if *tls { "https" } else { "http" };
            announce(format_args!("weir: proxy listening on {scheme}://{addr}"));
        }
        if role != DeployRole::DataPlane {
            let admin_listener = listen(cfg.admin.listen).await?;
            let admin_addr = admin_listener.local_addr()?;
            own_addrs.push(admin_addr);
            // Where this node also serves traffic, a request's writes are answered once traffic
            // meets them here (or after a second, committed all the same).
            let store: weir_store::SharedStore = if role == DeployRole::ControlPlane {
                store
            } else {
                weir_store::settled::Settled::new(store, format!("{prefix}/"))
            };
            let control = Arc::new(ControlApi { snapshot: snapshot.clone(), prefix: prefix.clone() });
            let mut admin = Admin::new(store.clone(), prefix.clone(), keys, plugins.clone(), keyring.clone()).with_control(control);
            if role != DeployRole::ControlPlane {
                admin = admin.with_applied(sync.applied());
            }
            // The platform runs where the Admin API does; with a file store there is neither.
            if cfg.platform.enabled.unwrap_or(true) {
                let catalog = Arc::new(weir_catalog::Catalog::apisix());
                let platform = weir_platform::Platform::new(cfg.platform.clone(), store, &prefix, catalog, plugins, keyring);
                if let Some(f) = &functions {
                    platform.with_functions(f.clone());
                }
                if let Some(d) = &databases {
                    platform.with_databases(d.clone(), cfg.database.quota);
                }
                if role != DeployRole::ControlPlane {
                    platform.with_applied(sync.applied());
                }
                admin = admin.with_extension(platform.clone());
                tokio::spawn(platform.clone().schedule());
                tokio::spawn(platform.reconcile());
            }
            let admin = Arc::new(admin);
            listeners.push(tokio::spawn(weir_admin::serve(admin_listener, admin, cfg.admin.limits())));
            announce(format_args!("weir: admin listening on http://{admin_addr}"));
        }
        // Neither a function's fetch nor a tenant's upstream reaches this node's own listeners.
        if let Some(reach) = &tenant_reach {
            reach.set_own(own_addrs.clone());
        }
        outbound.set_policy(weir_functions::guard::Policy::new(&fetch_allowed, &tenants_denied, own_addrs));
        announce(format_args!("weir: ready ({})", role.name()));

        let mut live = cfg;
        let signal = loop {
            tokio::select! {
                _ = signals.term.recv() => break "SIGTERM",
                _ = signals.int.recv() => break "SIGINT",
                _ = signals.quit.recv() => quit(),
                _ = signals.hup.recv() => reload(config, &mut live, &log),
            }
        };
        // Stop taking connections everywhere, then give requests in flight their time.
        for l in &listeners {
            l.abort();
        }
        weir_http::drain::start();
        let timeout = std::time::Duration::from_secs(live.shutdown_timeout);
        tracing::info!(signal, connections = weir_http::drain::open(), timeout_s = live.shutdown_timeout, "stopping: listeners closed, waiting for requests in flight");
        let deadline = tokio::time::Instant::now() + timeout;
        while weir_http::drain::open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                _ = signals.quit.recv() => quit(),
            }
        }
        match weir_http::drain::open() {
            0 => tracing::info!("stopped"),
            n => tracing::warn!(connections = n, "stopped: shutdown_timeout reached, connections cut"),
        }
        Ok(())
    })
}

/// Binds a listener of the control runtime (admin, status, metrics); the error names the
/// address. No `SO_REUSEPORT` here, so an address another process listens on is refused.
/// Tenants' databases, where the platform runs: embedded files beside the store, or PostgreSQL.
fn databases(cfg: &Config) -> anyhow::Result<Option<Arc<weir_database::Databases>>> {
    if !cfg.platform.enabled.unwrap_or(true) || cfg.store.kind == StoreType::File {
        return Ok(None);
    }
    let opener = match cfg.database.kind {
        config::DatabaseType::Embedded => weir_database::embedded::opener(cfg.database.path.clone().unwrap_or_else(|| cfg.store.path.join("databases"))),
        config::DatabaseType::Postgres => {
            let url = cfg.database.url.clone().context("database.url: give the PostgreSQL server's URL for type: postgres")?;
            weir_database::postgres::opener(url, cfg.database.pool.unwrap_or(4).max(1))
        }
    };
    let dbs = weir_database::Databases::new(opener);
    dbs.rest_every(weir_database::REST_EVERY, weir_database::IDLE_KEPT).context("starting the databases' idle sweep")?;
    Ok(Some(dbs))
}

async fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| weir_proxy::server::listen_error(addr, e))
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// SIGQUIT: exit now, cutting whatever is in flight. Acknowledged writes are already on disk.
fn quit() -> ! {
    tracing::warn!(connections = weir_http::drain::open(), "SIGQUIT: exiting at once");
    std::process::exit(0)
}

/// SIGHUP: reads the config file again. What can change while running is applied; every other
/// changed key is named in a log line and waits for a restart. A file that does not parse or
/// check changes nothing.
fn reload(path: Option<&Path>, live: &mut Config, log: &logging::LogHandle) {
    let Some(path) = path else {
        tracing::info!("SIGHUP: started without --config, nothing to re-read");
        return;
    };
    let new = match read_config(Some(path)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("SIGHUP: {e:#}; the running config stays");
            return;
        }
    };
    let mut applied = Vec::new();
    if new.log.level != live.log.level {
        match log.set_level(new.log.level.as_deref()) {
            Ok(()) => {
                live.log.level = new.log.level.clone();
                applied.push("log.level");
            }
            Err(e) => tracing::error!("SIGHUP: log.level: {e}"),
        }
    }
    if new.shutdown_timeout != live.shutdown_timeout {
        live.shutdown_timeout = new.shutdown_timeout;
        applied.push("shutdown_timeout");
    }
    for key in config::restart_keys(live, &new) {
        tracing::warn!(key, "SIGHUP: changed in {}, takes effect only after a restart", path.display());
    }
    tracing::info!(applied = ?applied, "SIGHUP: {} re-read", path.display());
}
