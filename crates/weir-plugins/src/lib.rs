//! APISIX's plugins under their names, with their configuration schemas, priorities and
//! phases, one file each; [`registry`] is all of them. What a plugin is, and how pipelines run,
//! is `weir-plugin-api`, re-exported here.

mod api_breaker;
mod basic_auth;
mod client;
mod compress;
mod consumer_restriction;
pub mod cookie_scope;
mod cors;
mod csrf;
mod fault_injection;
pub mod grant_usage;
mod hmac_auth;
mod ip_restriction;
mod jwt_auth;
mod key_auth;
mod keyed;
mod limit_conn;
mod limit_count;
mod limit_req;
mod limits;
mod loggers;
mod mocking;
mod opentelemetry;
pub mod prometheus;
mod proxy_mirror;
mod proxy_rewrite;
mod real_ip;
mod redirect;
mod referer_restriction;
mod request_id;
mod request_validation;
mod response_rewrite;
mod traffic_split;
mod ua_restriction;
mod uri_blocker;

pub use basic_auth::{attr as basic_auth_attr, credential_hash as basic_auth_hash};
pub use jwt_auth::{attr as jwt_auth_attr, secret as jwt_auth_secret};
pub use key_auth::{attr as key_auth_attr, key_hash as key_auth_hash};
pub use weir_plugin_api::*;

/// Every APISIX plugin Weir has, in a registry other crates may add theirs to.
pub fn registry() -> Registry {
    Registry::new(vec![
        api_breaker::factory(),
        basic_auth::factory(),
        compress::brotli_factory(),
        compress::gzip_factory(),
        consumer_restriction::factory(),
        cookie_scope::factory(),
        cors::factory(),
        csrf::factory(),
        fault_injection::factory(),
        grant_usage::factory(),
        hmac_auth::factory(),
        ip_restriction::factory(),
        jwt_auth::factory(),
        key_auth::factory(),
        limit_conn::factory(),
        limit_count::factory(),
        limit_req::factory(),
        loggers::file_factory(),
        loggers::http_factory(),
        mocking::factory(),
        opentelemetry::factory(),
        prometheus::factory(),
        proxy_mirror::factory(),
        proxy_rewrite::factory(),
        real_ip::factory(),
        redirect::factory(),
        referer_restriction::factory(),
        request_id::factory(),
        request_validation::factory(),
        response_rewrite::factory(),
        traffic_split::factory(),
        ua_restriction::factory(),
        uri_blocker::factory(),
    ])
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn pipelines_follow_priority_and_skip_disabled_plugins() {
        let registry = registry();
        let mut cache = InstanceCache::default();
        let plugins = json!({
            "limit-count": {"count": 1, "time_window": 1},
            "key-auth": {"_meta": {"priority": 1}},
        });
        let p = registry.pipeline(plugins.as_object().unwrap(), "route:r", &Default::default(), &mut cache).unwrap();
        assert_eq!(p.instances.iter().map(|i| (i.name, i.priority)).collect::<Vec<_>>(), vec![("limit-count", 1002), ("key-auth", 1)]);
        let disabled = json!({"key-auth": {"_meta": {"disable": true}}});
        assert!(registry.pipeline(disabled.as_object().unwrap(), "route:r", &Default::default(), &mut cache).unwrap().is_empty());
        let unknown = json!({"nope": {}});
        assert_eq!(registry.pipeline(unknown.as_object().unwrap(), "route:r", &Default::default(), &mut cache).err().unwrap(), "unknown plugin [nope]");
    }

    #[test]
    fn a_filter_on_many_routes_is_compiled_once_a_build_and_kept_for_the_next() {
        let registry = registry();
        let mut cache = InstanceCache::default();
        let plugins = json!({"cors": {"_meta": {"filter": [["uri", "~~", "^/a+$"], ["arg_x", "==", "1"]]}}});
        let filter_of = |cache: &mut InstanceCache, route: &str| registry.pipeline(plugins.as_object().unwrap(), route, &Default::default(), cache).unwrap().instances[0].filter.clone().unwrap();
        let (r1, r2) = (filter_of(&mut cache, "route:1"), filter_of(&mut cache, "route:2"));
        assert!(std::sync::Arc::ptr_eq(&r1, &r2), "one compile for both routes");
        cache.finish();
        assert!(std::sync::Arc::ptr_eq(&r1, &filter_of(&mut cache, "route:3")), "and kept for the next build");
        cache.finish();
        cache.finish();
        assert!(!std::sync::Arc::ptr_eq(&r1, &filter_of(&mut cache, "route:1")), "dropped by a build that did not use it");
    }
}
