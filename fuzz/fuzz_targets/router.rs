//! The router: routes built from input lines, matched against a path and host from input.
//! Building and matching never panic, and a match is a route whose path could match.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use weir_core::expr::Vars;
use weir_proxy::router::{RequestFacts, RouteSpec, Router};

struct NoVars;

impl Vars for NoVars {
    fn get(&self, _: &str) -> Option<Cow<'_, str>> {
        None
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.lines();
    let (Some(path), Some(host)) = (lines.next(), lines.next()) else { return };
    let specs: Vec<RouteSpec<usize>> = lines
        .take(64)
        .enumerate()
        .map(|(i, line)| {
            let mut fields = line.split(' ');
            let uri = fields.next().unwrap_or("/").to_string();
            let hosts = fields.next().filter(|h| !h.is_empty()).map(|h| vec![h.to_string()]);
            let priority = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            RouteSpec { paths: vec![uri], hosts, methods: None, remote_addrs: None, vars: None, priority, value: i }
        })
        .collect();
    let patterns: Vec<String> = specs.iter().map(|s| s.paths[0].clone()).collect();
    let router = Router::new(specs);
    let facts = RequestFacts { method: "GET", host: (!host.is_empty()).then_some(host), path, remote: None, vars: &NoVars };
    if let Some(&i) = router.find(&facts) {
        let p = &patterns[i];
        // Whatever matched is either the path itself, a prefix with `*`, or has parameters.
        assert!(p == path || p.contains('*') || p.contains(':') || p.contains('{'), "{p} matched {path}");
    }
});
