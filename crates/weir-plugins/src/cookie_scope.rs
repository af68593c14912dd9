//! `cookie-scope`: Weir's plugin that keeps a response's cookies to the hosts it was served
//! for, where many owners share parent domains (the platform's gateways, on
//! `{gid}.{base_domain}` and `{gid}.{env}.{base_domain}`). A `Set-Cookie` whose `Domain`
//! attribute names a shared domain, a parent of one, or a host under one that is not within
//! the route's own, would reach other owners' hosts too (a session set for all of them, or
//! read by all of them): its `Domain` attributes are removed, which leaves a cookie for the
//! answering host alone. A `Domain` within the route's own hosts (and no shared domain's
//! parent), or outside the shared domains altogether (which a browser keeps only for hosts it
//! matches), is left as it is.
//!
//! It runs last of a route's plugins (the lowest priority), so it sees the cookies every other
//! plugin's `header_filter` added.

use std::sync::Arc;

use http::header::{HeaderValue, SET_COOKIE};
use serde::Deserialize;

use crate::{Factory, JsonSchema, Phases, Plugin, ResponseCtx};

pub const NAME: &str = "cookie-scope";

/// Below every other plugin's; a route's other plugins that should run after it cannot.
pub const PRIORITY: i64 = -100_000;

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, |c: Config, _| Ok(Arc::new(Scope::new(&c.shared, &c.own))))
}

/// Moves a plugin config's `_meta.priority` above [`PRIORITY`] where it is at or below it (or
/// no integer), for a plugin that must run before `cookie-scope`: a tenant's config stored
/// before its priorities were checked, say.
pub fn keep_before(conf: &mut serde_json::Value) {
    if let Some(p) = conf.pointer_mut("/_meta/priority")
        && p.as_i64().is_none_or(|p| p <= PRIORITY)
    {
        *p = serde_json::Value::from(PRIORITY + 1);
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The domains whose hosts have many owners.
    #[schemars(length(min = 1, max = 16))]
    shared: Vec<String>,
    /// The hosts under it that are the route's own (their subdomains too).
    #[serde(default)]
    #[schemars(length(max = 64))]
    own: Vec<String>,
}

/// A domain as cookies compare it: lowercase, without a leading or trailing dot.
fn lower(d: &str) -> String {
    d.trim().trim_start_matches('.').trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `d` is `parent` or under it.
fn within(d: &str, parent: &str) -> bool {
    d == parent || (d.len() > parent.len() && d.ends_with(parent) && d.as_bytes()[d.len() - parent.len() - 1] == b'.')
}

pub struct Scope {
    shared: Vec<String>,
    own: Vec<String>,
}

impl Scope {
    pub fn new(shared: &[String], own: &[String]) -> Scope {
        Scope { shared: shared.iter().map(|s| lower(s)).collect(), own: own.iter().map(|o| lower(o)).collect() }
    }

    /// Whether a cookie for domain `d` would reach hosts that are not the route's own. One
    /// that is not plain letters, digits, `-` and `.` may be read otherwise by a browser (an
    /// international name mapped to ASCII), so it counts as reaching others.
    fn reaches_others(&self, d: &str) -> bool {
        let d = lower(d);
        if d.is_empty() {
            return false;
        }
        if !d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
            return true;
        }
        // A shared domain or a parent of one; or a host under one, not within the own ones.
        self.shared.iter().any(|s| within(s, &d) || (within(&d, s) && !self.own.iter().any(|o| within(&d, o))))
    }

    /// `cookie` (a `Set-Cookie` value) with its `Domain` attributes removed when any of them
    /// reaches others; `None` when it stays as it is.
    pub fn scoped(&self, cookie: &[u8]) -> Option<Vec<u8>> {
        let mut parts = cookie.split(|&b| b == b';');
        let first = parts.next()?;
        let attrs: Vec<&[u8]> = parts.collect();
        let domain_of = |a: &[u8]| -> Option<String> {
            let (name, value) = a.split_at(a.iter().position(|&b| b == b'=')?);
            name.trim_ascii().eq_ignore_ascii_case(b"domain").then(|| String::from_utf8_lossy(&value[1..]).into_owned())
        };
        if !attrs.iter().filter_map(|a| domain_of(a)).any(|d| self.reaches_others(&d)) {
            return None;
        }
        let mut out = first.to_vec();
        for a in attrs.iter().filter(|a| domain_of(a).is_none()) {
            out.push(b';');
            out.extend_from_slice(a);
        }
        Some(out)
    }
}

impl Plugin for Scope {
    fn phases(&self) -> Phases {
        Phases { response: true, log: false, body: false }
    }

    fn header_filter(&self, ctx: &mut ResponseCtx<'_>) {
        let headers = &mut ctx.parts.headers;
        if !headers.contains_key(SET_COOKIE) {
            return;
        }
        let cookies: Vec<(HeaderValue, Option<Vec<u8>>)> = headers.get_all(SET_COOKIE).iter().map(|c| (c.clone(), self.scoped(c.as_bytes()))).collect();
        if cookies.iter().all(|(_, scoped)| scoped.is_none()) {
            return;
        }
        headers.remove(SET_COOKIE);
        for (c, scoped) in cookies {
            let kept = match scoped {
                Some(v) => HeaderValue::from_bytes(&v).ok(),
                None => Some(c),
            };
            if let Some(v) = kept {
                headers.append(SET_COOKIE, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_priority_at_or_below_it_is_moved_above() {
        for (conf, want) in [
            (serde_json::json!({"_meta": {"priority": -100_000}}), Some(-99_999)),
            (serde_json::json!({"_meta": {"priority": -200_000.5}}), Some(-99_999)),
            (serde_json::json!({"_meta": {"priority": -5}}), Some(-5)),
            (serde_json::json!({"_meta": {"filter": []}}), None),
            (serde_json::json!({}), None),
        ] {
            let mut c = conf.clone();
            keep_before(&mut c);
            assert_eq!(c.pointer("/_meta/priority").and_then(serde_json::Value::as_i64), want, "{conf}");
        }
    }

    #[test]
    fn a_cookie_for_the_shared_domain_or_another_owners_host_is_kept_to_the_answering_host() {
        let s = Scope::new(&["Apps.Example.com".into(), "dev.apps.example.com".into()], &["shop.apps.example.com".into(), "shop.dev.apps.example.com".into()]);
        let scoped = |c: &str| s.scoped(c.as_bytes()).map(|v| String::from_utf8(v).unwrap());
        for (cookie, want) in [
            ("sid=1; Domain=apps.example.com; Path=/", Some("sid=1; Path=/")),
            ("sid=1; domain=.APPS.example.com.; Secure", Some("sid=1; Secure")),
            ("sid=1; Path=/; Domain=example.com", Some("sid=1; Path=/")),
            ("sid=1; Domain=dev.apps.example.com", Some("sid=1")),
            ("sid=1; Domain=other.apps.example.com; HttpOnly", Some("sid=1; HttpOnly")),
            // The last Domain is the one a browser takes; any reaching others goes, all go.
            ("sid=1; Domain=shop.apps.example.com; Domain=apps.example.com", Some("sid=1")),
            ("sid=1; Domain=shop.apps.example.com", None),
            ("sid=1; Domain=a.shop.apps.example.com", None),
            ("sid=1; Domain=shop.dev.apps.example.com", None),
            ("sid=1; Domain=elsewhere.org", None),
            ("sid=1; Domain=", None),
            ("sid=1; Path=/", None),
            ("domain=apps.example.com", None),
            ("sid=1; Domain=xapps.example.com", None),
            ("sid=1; Domain=\u{ff41}pps.example.com", Some("sid=1")),
            ("sid=1; Domain=\"apps.example.com\"", Some("sid=1")),
        ] {
            assert_eq!(scoped(cookie).as_deref(), want, "{cookie}");
        }
        // A gateway whose own host is a shared domain (`dev` on `dev.{base}`) keeps no cookie
        // there, but may on its hosts below it.
        let dev = Scope::new(&["apps.example.com".into(), "dev.apps.example.com".into()], &["dev.apps.example.com".into(), "dev.dev.apps.example.com".into()]);
        assert_eq!(dev.scoped(b"a=1; Domain=dev.apps.example.com"), Some(b"a=1".to_vec()));
        assert_eq!(dev.scoped(b"a=1; Domain=dev.dev.apps.example.com"), None);
    }
}
