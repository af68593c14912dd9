//! A gateway as ordinary APISIX objects: what the reconciler writes to the store, checked
//! through the same catalog as the Admin API's writes.
//!
//! Per gateway:
//! - `wp.{gid}.base`: `/*` on `{gid}.{base_domain}` and the custom domains, priority 1, 404 JSON;
//! - per environment, `plugin_configs/wp.{gid}.{env}` holds its merged plugins, and two routes
//!   use it at priority 10: `wp.{gid}.{env}` (`/{env}` and `/{env}/*` on the gateway's hosts,
//!   the prefix removed before the upstream) and `wp.{gid}.{env}.host` (`/*` on
//!   `{gid}.{env}.{base_domain}` and the environment's custom domain).
//!
//! Ids use `.`, which a gateway id never holds, so one gateway's objects are exactly the keys
//! under `{kind}/wp.{gid}.`.

use serde_json::{Map, Value, json};
use weir_catalog::MANAGED_LABEL;

use crate::PlatformConfig;
use crate::model::{ENVIRONMENTS, EnvState, Environment, Gateway, State};

/// One object to hold in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// The catalog kind: `routes` or `plugin_configs`.
    pub kind: &'static str,
    pub id: String,
    pub value: Value,
}

/// The kinds the platform writes, in the order they are written (a route names its plugin
/// config, so the config comes first; deletes go the other way).
pub const KINDS: [&str; 2] = ["plugin_configs", "routes"];

/// The id prefix of every object of gateway `gid`.
pub fn id_prefix(gid: &str) -> String {
    format!("{}{gid}.", weir_catalog::MANAGED_ID_PREFIX)
}

/// The layers an environment's plugins merge from, lowest first.
pub fn layers<'a>(cfg: &'a PlatformConfig, gw: &'a Gateway, env: &'a Environment) -> [(&'static str, &'a Map<String, Value>); 3] {
    [("base", &cfg.base_plugins), ("gateway", &gw.plugins), ("environment", &env.plugins)]
}

/// The merged plugins of an environment, each with the layer it came from: a later layer's
/// plugin replaces an earlier one's of the same name. The auth plugin of `authType` is added
/// unless a layer configures it.
pub fn effective(cfg: &PlatformConfig, gw: &Gateway, env: &Environment) -> Vec<(String, Value, &'static str)> {
    let mut out: Vec<(String, Value, &'static str)> = Vec::new();
    for (layer, plugins) in layers(cfg, gw, env) {
        for (name, conf) in plugins {
            match out.iter_mut().find(|(n, _, _)| n == name) {
                Some(slot) => *slot = (name.clone(), conf.clone(), layer),
                None => out.push((name.clone(), conf.clone(), layer)),
            }
        }
    }
    let scope = crate::grants::scope(&gw.gateway_id, &env.name);
    // An auth plugin a tenant's layer configures accepts the environment's grants only.
    for (name, conf, layer) in &mut out {
        if *layer != "base"
            && weir_functions::live::SCOPED_AUTH.contains(&name.as_str())
            && let Some(c) = conf.as_object_mut()
        {
            c.insert("scope".into(), json!(scope));
        }
    }
    if let Some(auth) = env.auth_type.plugin()
        && !out.iter().any(|(n, _, _)| n == auth)
    {
        // Credentials of the environment's grants, and only those granted for this
        // environment (keys in `apikey` or as a bearer token), taken off the request once
        // checked, so no function or upstream of the tenant ever holds a client's secret.
        let conf = if auth == "key-auth" { json!({"bearer": true, "hide_credentials": true, "scope": scope}) } else { json!({"hide_credentials": true, "scope": scope}) };
        out.push((auth.to_string(), conf, "environment"));
    }
    out
}

fn merged(cfg: &PlatformConfig, gw: &Gateway, env: &Environment) -> Map<String, Value> {
    let mut plugins: Map<String, Value> = effective(cfg, gw, env)
        .into_iter()
        .map(|(n, mut v, layer)| {
            // A tenant's plugin runs before `cookie-scope`, whatever a layer stored before its
            // priorities were checked.
            if cfg.scope_cookies && layer != "base" {
                weir_plugins::cookie_scope::keep_before(&mut v);
            }
            (n, v)
        })
        .collect();
    // Over every layer: a cookie an answer sets for the base domain, an environment's domain
    // or another gateway's host is kept to the answering host (tenants cannot name the plugin,
    // nor order one of theirs after it).
    if cfg.scope_cookies {
        plugins.insert(weir_plugins::cookie_scope::NAME.into(), cookie_scope(cfg, &gw.gateway_id));
    }
    plugins
}

/// `cookie-scope`'s config for gateway `gid`: the domains every gateway has hosts under, and
/// this one's hosts there.
fn cookie_scope(cfg: &PlatformConfig, gid: &str) -> Value {
    let base = &cfg.base_domain;
    let shared: Vec<String> = std::iter::once(base.clone()).chain(ENVIRONMENTS.iter().map(|e| format!("{e}.{base}"))).collect();
    let own: Vec<String> = std::iter::once(format!("{gid}.{base}")).chain(ENVIRONMENTS.iter().map(|e| format!("{gid}.{e}.{base}"))).collect();
    json!({"shared": shared, "own": own})
}

fn labels(gid: &str, env: Option<&str>) -> Value {
    let mut l = json!({ MANAGED_LABEL: gid });
    if let Some(env) = env {
        l["weir-environment"] = json!(env);
    }
    l
}

/// A plugin that answers every request itself with `status` and a JSON error.
fn answer(status: u16, message: &str) -> Value {
    json!({"mocking": {
        "response_status": status,
        "response_example": json!({"error_msg": message}).to_string(),
        "content_type": "application/json",
        "with_mock_header": false
    }})
}

/// The gateway's own hosts: `{gid}.{base_domain}` and its custom domains.
pub fn gateway_hosts(cfg: &PlatformConfig, gw: &Gateway) -> Vec<String> {
    let mut hosts = vec![format!("{}.{}", gw.gateway_id, cfg.base_domain)];
    hosts.extend(gw.custom_domains.iter().cloned());
    hosts
}

/// Every object gateway `gw` needs, as it stands.
pub fn render(cfg: &PlatformConfig, gw: &Gateway) -> Vec<Object> {
    let gid = &gw.gateway_id;
    let running = gw.state == State::Running;
    let hosts = gateway_hosts(cfg, gw);
    let mut out = vec![Object {
        kind: "routes",
        id: format!("wp.{gid}.base"),
        value: json!({
            "uris": ["/*"],
            "hosts": hosts,
            "priority": 1,
            "name": format!("{gid} (outside every environment)"),
            "plugins": if running { answer(404, "no environment at this path: use /dev, /staging or /prod") } else { answer(503, "this gateway is stopped") },
            "labels": labels(gid, None),
        }),
    }];
    for env in &gw.environments {
        let name = &env.name;
        let id = format!("wp.{gid}.{name}");
        out.push(Object {
            kind: "plugin_configs",
            id: id.clone(),
            // A stopped gateway answers 503 before any plugin would run; its plugin configs are
            // emptied, so a layer that no longer passes the checks cannot keep it from stopping.
            value: json!({"plugins": if running { merged(cfg, gw, env) } else { Map::new() }, "labels": labels(gid, Some(name)), "desc": format!("{gid} {name}: merged plugins")}),
        });
        let mut env_hosts = vec![format!("{gid}.{name}.{}", cfg.base_domain)];
        env_hosts.extend(env.custom_domain.iter().cloned());
        // Under the gateway's hosts the environment is a path prefix, removed before the
        // upstream sees the request; under its own hosts it is the whole host.
        let routes = [
            (id.clone(), json!([format!("/{name}"), format!("/{name}/*")]), hosts.clone(), Some(format!("^/{name}/?(.*)$"))),
            (format!("{id}.host"), json!(["/*"]), env_hosts, None),
        ];
        for (route_id, uris, hosts, strip) in routes {
            let mut route = json!({
                "uris": uris,
                "hosts": hosts,
                "priority": 10,
                "name": format!("{gid} {name}"),
                "plugin_config_id": id,
                "labels": labels(gid, Some(name)),
            });
            let refusal = if !running {
                Some(answer(503, "this gateway is stopped"))
            } else if env.state == EnvState::Inactive {
                Some(answer(503, "this environment is inactive"))
            } else if env.upstream.is_none() {
                Some(answer(404, "nothing is published at this path"))
            } else {
                None
            };
            match (refusal, &env.upstream) {
                (Some(plugins), _) => route["plugins"] = plugins,
                (None, Some(upstream)) => {
                    route["upstream"] = upstream.clone();
                    if let Some(pattern) = strip {
                        route["plugins"] = json!({"proxy-rewrite": {"regex_uri": [pattern, "/$1"]}});
                    }
                }
                (None, None) => {}
            }
            out.push(Object { kind: "routes", id: route_id, value: route });
        }
    }
    out
}

/// What the data plane's function routes need of each environment (`weir_functions::live`):
/// its hosts, merged plugins, whether it serves, and the gateway's limits.
pub fn live(cfg: &PlatformConfig, gw: &Gateway) -> Vec<weir_functions::live::EnvDoc> {
    let gid = &gw.gateway_id;
    let running = gw.state == State::Running;
    gw.environments
        .iter()
        .map(|env| {
            let mut env_hosts = vec![format!("{gid}.{}.{}", env.name, cfg.base_domain)];
            env_hosts.extend(env.custom_domain.iter().cloned());
            weir_functions::live::EnvDoc {
                environment: env.name.clone(),
                gateway_hosts: gateway_hosts(cfg, gw),
                env_hosts,
                plugins: if running { merged(cfg, gw, env) } else { Map::new() },
                serving: running && env.state == EnvState::Active,
                limits: gw.limits,
                vars: gw.env.iter().filter(|v| v.reaches(&env.name)).map(|v| (v.name.clone(), Value::String(v.value.clone()))).collect(),
                fetch_allow_list: gw.fetch_allow_list.clone(),
                debug: env.name == "dev",
                incarnation: gw.incarnation.clone(),
                database: Some(weir_functions::DbScope { name: gw.database_name(&env.name), limits: gw.db_limits }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AuthType, Phase, Promotion};

    fn gateway() -> Gateway {
        let mut envs: Vec<Environment> = crate::model::ENVIRONMENTS.iter().map(|e| Environment::new(e)).collect();
        envs[0].plugins.insert("limit-count".into(), json!({"count": 5, "time_window": 60}));
        envs[0].upstream = Some(json!({"nodes": {"127.0.0.1:1980": 1}, "type": "roundrobin"}));
        envs[1].auth_type = AuthType::KeyAuth;
        Gateway {
            gateway_id: "shop".into(),
            name: "Shop".into(),
            plugins: json!({"limit-count": {"count": 100, "time_window": 60}, "cors": {"max_age": 10}}).as_object().unwrap().clone(),
            custom_domains: vec!["api.shop.test".into()],
            promotion_pipeline: Promotion::default(),
            state: State::Running,
            phase: Phase::Starting,
            environments: envs,
            reason: None,
            created_at: 0,
            updated_at: 0,
            locked_at: None,
            locked_by: None,
            generation: 1,
            rendered_generation: 0,
            rendered_revision: 0,
            rendered_with: String::new(),
            incarnation: String::new(),
            phase_since: 0,
            attempts: 0,
            retry_at: 0,
            limits: Default::default(),
            fetch_allow_list: Vec::new(),
            env: Vec::new(),
            database_isolation: crate::model::Isolation::Gateway,
            db_limits: weir_functions::DbLimits::default(),
        }
    }

    #[test]
    fn layers_merge_base_then_gateway_then_environment() {
        let cfg = PlatformConfig::default();
        let gw = gateway();
        let dev = effective(&cfg, &gw, &gw.environments[0]);
        let layer = |n: &str| dev.iter().find(|(name, _, _)| name == n).map(|(_, v, l)| (v.clone(), *l));
        assert_eq!(layer("limit-count"), Some((json!({"count": 5, "time_window": 60}), "environment")));
        assert_eq!(layer("cors"), Some((json!({"max_age": 10}), "gateway")));
        let staging = effective(&cfg, &gw, &gw.environments[1]);
        assert!(staging.iter().any(|(n, _, l)| n == "key-auth" && *l == "environment"));
        assert!(staging.iter().any(|(n, v, l)| n == "limit-count" && v["count"] == 100 && *l == "gateway"));
        // An auth plugin a tenant's layer configures accepts its environment's grants only;
        // the operator's base layer keeps its own.
        let mut gw = gw;
        gw.plugins.insert("basic-auth".into(), json!({"hide_credentials": false}));
        let mut cfg = cfg;
        cfg.base_plugins.insert("key-auth".into(), json!({"header": "x-op"}));
        let dev = effective(&cfg, &gw, &gw.environments[0]);
        let conf = |n: &str| dev.iter().find(|(name, _, _)| name == n).map(|(_, v, _)| v.clone()).unwrap();
        assert_eq!(conf("basic-auth"), json!({"hide_credentials": false, "scope": "wp.shop.dev"}));
        assert_eq!(conf("key-auth"), json!({"header": "x-op"}));
    }

    #[test]
    fn a_gateway_renders_to_routes_and_plugin_configs_under_its_prefix() {
        let cfg = PlatformConfig::default();
        let gw = gateway();
        let objects = render(&cfg, &gw);
        assert_eq!(objects.len(), 1 + 3 * 3);
        assert!(objects.iter().all(|o| o.id.starts_with(&id_prefix("shop"))));
        let dev = objects.iter().find(|o| o.id == "wp.shop.dev" && o.kind == "routes").unwrap();
        assert_eq!(dev.value["hosts"], json!(["shop.localhost", "api.shop.test"]));
        assert_eq!(dev.value["plugins"]["proxy-rewrite"]["regex_uri"][0], "^/dev/?(.*)$");
        let staging = objects.iter().find(|o| o.id == "wp.shop.staging.host").unwrap();
        assert_eq!(staging.value["hosts"], json!(["shop.staging.localhost"]));
        assert_eq!(staging.value["plugins"]["mocking"]["response_status"], 404);
        let mut stopped = gw.clone();
        stopped.state = State::Stopped;
        assert!(render(&cfg, &stopped).iter().filter(|o| o.kind == "routes").all(|o| o.value["plugins"]["mocking"]["response_status"] == 503));
    }

    #[test]
    fn every_environments_plugins_end_with_cookie_scope_unless_it_is_off() {
        let gw = gateway();
        let mut cfg = PlatformConfig::default();
        let pc = |cfg: &PlatformConfig| render(cfg, &gw).into_iter().find(|o| o.id == "wp.shop.dev" && o.kind == "plugin_configs").unwrap().value;
        let scope = &pc(&cfg)["plugins"]["cookie-scope"];
        assert_eq!(scope["shared"], json!(["localhost", "dev.localhost", "staging.localhost", "prod.localhost"]));
        assert_eq!(scope["own"], json!(["shop.localhost", "shop.dev.localhost", "shop.staging.localhost", "shop.prod.localhost"]));
        assert!(live(&cfg, &gw).iter().all(|e| e.plugins.contains_key("cookie-scope")), "function routes carry it too");
        // A tenant's priority stored below it (before the check) is moved above it.
        let mut late = gw.clone();
        late.plugins.insert("response-rewrite".into(), json!({"_meta": {"priority": -200_000}, "headers": {"set": {"x-a": "1"}}}));
        let plugins = render(&cfg, &late).into_iter().find(|o| o.id == "wp.shop.dev" && o.kind == "plugin_configs").unwrap().value["plugins"].clone();
        assert_eq!(plugins["response-rewrite"]["_meta"]["priority"], -99_999);
        cfg.scope_cookies = false;
        assert!(pc(&cfg)["plugins"].get("cookie-scope").is_none());
        assert!(live(&cfg, &gw).iter().all(|e| !e.plugins.contains_key("cookie-scope")));
    }

    #[test]
    fn a_variable_kept_to_some_environments_reaches_their_functions_only() {
        let mut gw = gateway();
        let var = |name: &str, envs: Option<&[&str]>| crate::model::EnvVar { name: name.into(), value: format!("{name}-value"), secret: true, environments: envs.map(|e| e.iter().map(|s| s.to_string()).collect()) };
        gw.env = vec![var("ALL", None), var("PROD_ONLY", Some(&["prod"])), var("NOT_DEV", Some(&["staging", "prod"]))];
        let docs = live(&PlatformConfig::default(), &gw);
        let names = |env: &str| -> Vec<String> { docs.iter().find(|d| d.environment == env).unwrap().vars.keys().cloned().collect() };
        assert_eq!(names("dev"), ["ALL"]);
        assert_eq!(names("staging"), ["ALL", "NOT_DEV"]);
        assert_eq!(names("prod"), ["ALL", "PROD_ONLY", "NOT_DEV"]);
        assert_eq!(docs.iter().find(|d| d.environment == "prod").unwrap().vars["PROD_ONLY"], json!("PROD_ONLY-value"));
    }
}
