//! The route matcher, with APISIX's semantics (lua-resty-radixtree, host-then-uri):
//!
//! 1. Routes bound to the request's host are tried before wildcard-host routes (longest
//!    wildcard first), and those before routes with no host.
//! 2. Within one host group, routes whose path equals the request path exactly come first;
//!    then prefix routes (`/foo*`, and parameter paths such as `/user/:id`, which count as a
//!    prefix up to their first parameter), longest prefix first. Prefixes are bytes, not
//!    segments: `/foo*` matches `/foobar`.
//! 3. Among routes at the same path, higher `priority` first, then older routes first.
//! 4. The first candidate whose method, remote address and `vars` predicates all hold wins; a
//!    candidate that fails one does not stop the search.
//!
//! The router is built once per config snapshot; matching allocates nothing in the common case.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use weir_core::expr::{Expr, Vars};

/// What the router needs to know about a request.
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// Lower-case, without port.
    pub host: Option<&'a str>,
    /// The path, without the query string.
    pub path: &'a str,
    pub remote: Option<IpAddr>,
    pub vars: &'a dyn Vars,
}

/// One route as the router sees it.
pub struct RouteSpec<T> {
    pub paths: Vec<String>,
    pub hosts: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub remote_addrs: Option<Vec<IpNet>>,
    pub vars: Option<Expr>,
    pub priority: i64,
    pub value: T,
}

const METHODS: [&str; 10] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE"];

fn method_bit(m: &str) -> u16 {
    METHODS.iter().position(|x| *x == m).map_or(0, |i| 1 << i)
}

/// A path pattern split into what the index keys on and what is checked after.
#[derive(Clone, Debug, PartialEq)]
enum PathPattern {
    Exact(String),
    /// Matches any path starting with the prefix.
    Prefix(String),
    /// `/a/:x/b/*rest`: the static part before the first parameter is the prefix, then segments.
    Params { prefix: String, segments: Vec<Segment> },
}

#[derive(Clone, Debug, PartialEq)]
enum Segment {
    Literal(String),
    /// `:name`: one non-empty segment.
    One,
    /// `*name`: the rest of the path, slashes included.
    Rest,
}

impl PathPattern {
    fn parse(p: &str) -> PathPattern {
        let has_param = p.split('/').any(|s| s.starts_with(':') || (s.starts_with('*') && s.len() > 1));
        if has_param {
            let cut = p
                .split('/')
                .scan(0usize, |pos, seg| {
                    let start = *pos;
                    *pos += seg.len() + 1;
                    Some((start, seg))
                })
                .find(|(_, s)| s.starts_with(':') || (s.starts_with('*') && s.len() > 1))
                .map(|(start, _)| start)
                .expect("has a parameter");
            let prefix = p[..cut].to_string();
            let segments = p[cut..]
                .split('/')
                .map(|s| {
                    if s.starts_with(':') {
                        Segment::One
                    } else if s.starts_with('*') && s.len() > 1 {
                        Segment::Rest
                    } else {
                        Segment::Literal(s.to_string())
                    }
                })
                .collect();
            return PathPattern::Params { prefix, segments };
        }
        match p.strip_suffix('*') {
            Some(prefix) => PathPattern::Prefix(prefix.to_string()),
            None => PathPattern::Exact(p.to_string()),
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => p == path,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
            PathPattern::Params { prefix, segments } => {
                path.strip_prefix(prefix.as_str()).is_some_and(|rest| segments_match(segments, rest))
            }
        }
    }
}

fn segments_match(segments: &[Segment], rest: &str) -> bool {
    let mut parts = rest.split('/');
    for (i, seg) in segments.iter().enumerate() {
        match seg {
            // Whatever is left, including nothing, belongs to `*name`; it must be last.
            Segment::Rest => return i + 1 == segments.len(),
            Segment::One => match parts.next() {
                Some(p) if !p.is_empty() => {}
                _ => return false,
            },
            Segment::Literal(l) => match parts.next() {
                Some(p) if p == l => {}
                _ => return false,
            },
        }
    }
    parts.next().is_none()
}

struct Entry<T> {
    methods: u16,
    remote_addrs: Option<Vec<IpNet>>,
    vars: Option<Expr>,
    priority: i64,
    order: u32,
    value: T,
}

/// Candidates under one key, best first.
type Slot = Vec<(u32, Option<Box<PathPattern>>)>;

/// Path index of one host group.
#[derive(Default)]
struct PathIndex {
    exact: HashMap<Box<str>, Slot>,
    trie: Trie,
}

/// A radix tree of prefixes (edges carry byte strings, so a walk visits one node per branching
/// point rather than one per byte); each node holds the routes whose prefix ends there.
#[derive(Default)]
struct Trie {
    nodes: Vec<TrieNode>,
}

#[derive(Default)]
struct TrieNode {
    /// The bytes on the edge into this node.
    label: Box<[u8]>,
    /// First byte of each child's label, sorted; `children` is parallel to it.
    first: Vec<u8>,
    children: Vec<u32>,
    slot: Slot,
}

impl Trie {
    fn insert(&mut self, prefix: &str) -> &mut Slot {
        if self.nodes.is_empty() {
            self.nodes.push(TrieNode::default());
        }
        let key = prefix.as_bytes();
        let (mut at, mut pos) = (0usize, 0usize);
        while pos < key.len() {
            let b = key[pos];
            match self.nodes[at].first.binary_search(&b) {
                Err(i) => {
                    let leaf = self.nodes.len() as u32;
                    self.nodes.push(TrieNode { label: key[pos..].into(), ..TrieNode::default() });
                    self.nodes[at].first.insert(i, b);
                    self.nodes[at].children.insert(i, leaf);
                    return &mut self.nodes[leaf as usize].slot;
                }
                Ok(i) => {
                    let child = self.nodes[at].children[i] as usize;
                    let label = &self.nodes[child].label;
                    let common = label.iter().zip(&key[pos..]).take_while(|(a, b)| a == b).count();
                    if common < label.len() {
                        // Split the edge: a new node takes the shared part.
                        let (head, tail): (Box<[u8]>, Box<[u8]>) = (label[..common].into(), label[common..].into());
                        let mid = self.nodes.len() as u32;
                        self.nodes.push(TrieNode {
                            label: head,
                            first: vec![tail[0]],
                            children: vec![child as u32],
                            slot: Vec::new(),
                        });
                        self.nodes[child].label = tail;
                        self.nodes[at].children[i] = mid;
                        at = mid as usize;
                    } else {
                        at = child;
                    }
                    pos += common;
                }
            }
        }
        &mut self.nodes[at].slot
    }

    /// Calls `f` on the slot of every prefix of `path` (with the prefix's length), longest
    /// first, until it returns `Some`.
    fn walk_longest_first<'t, R>(&'t self, path: &str, mut f: impl FnMut(&'t Slot, usize) -> Option<R>) -> Option<R> {
        if self.nodes.is_empty() {
            return None;
        }
        let path = path.as_bytes();
        let mut hits: [(u32, u32); 24] = [(0, 0); 24];
        let mut n = 0;
        let mut overflow: Vec<(u32, u32)> = Vec::new();
        let (mut at, mut pos) = (0usize, 0usize);
        loop {
            let node = &self.nodes[at];
            if !node.slot.is_empty() {
                if n < hits.len() {
                    hits[n] = (at as u32, pos as u32);
                    n += 1;
                } else {
                    overflow.push((at as u32, pos as u32));
                }
            }
            let Some(&b) = path.get(pos) else { break };
            let Some(i) = node.first.iter().position(|x| *x == b) else { break };
            let child = node.children[i] as usize;
            let label = &self.nodes[child].label;
            if !path[pos..].starts_with(label) {
                break;
            }
            at = child;
            pos += label.len();
        }
        // Recorded shortest first; `overflow` holds the longest.
        for &(i, len) in overflow.iter().rev().chain(hits[..n].iter().rev()) {
            if let Some(r) = f(&self.nodes[i as usize].slot, len as usize) {
                return Some(r);
            }
        }
        None
    }
}

impl PathIndex {
    fn insert(&mut self, pattern: PathPattern, entry: u32) {
        match pattern {
            PathPattern::Exact(p) => self.exact.entry(p.into_boxed_str()).or_default().push((entry, None)),
            PathPattern::Prefix(p) => self.trie.insert(&p).push((entry, None)),
            PathPattern::Params { ref prefix, .. } => {
                let prefix = prefix.clone();
                self.trie.insert(&prefix).push((entry, Some(Box::new(pattern))));
            }
        }
    }

    fn sort<T>(&mut self, entries: &[Entry<T>]) {
        let key = |e: &(u32, Option<Box<PathPattern>>)| {
            let en = &entries[e.0 as usize];
            (std::cmp::Reverse(en.priority), en.order)
        };
        for slot in self.exact.values_mut() {
            slot.sort_by_key(key);
            slot.dedup_by_key(|e| e.0);
        }
        for node in &mut self.trie.nodes {
            node.slot.sort_by_key(key);
        }
    }
}

pub struct Router<T> {
    entries: Vec<Entry<T>>,
    exact_hosts: HashMap<Box<str>, PathIndex>,
    /// Keyed by the suffix after `*`, e.g. `.example.com`; `*` alone is the empty suffix.
    wild_hosts: HashMap<Box<str>, PathIndex>,
    no_host: PathIndex,
}

impl<T> Router<T> {
    /// Builds the router. Routes are numbered in the order given, which breaks priority ties.
    pub fn new(specs: Vec<RouteSpec<T>>) -> Router<T> {
        let mut router = Router {
            entries: Vec::with_capacity(specs.len()),
            exact_hosts: HashMap::new(),
            wild_hosts: HashMap::new(),
            no_host: PathIndex::default(),
        };
        for (order, spec) in specs.into_iter().enumerate() {
            let idx = order as u32;
            let methods = spec.methods.as_ref().map_or(u16::MAX, |ms| ms.iter().fold(0, |acc, m| acc | method_bit(m)));
            let patterns: Vec<PathPattern> = spec.paths.iter().map(|p| PathPattern::parse(p)).collect();
            match &spec.hosts {
                None => patterns.iter().for_each(|p| router.no_host.insert(p.clone(), idx)),
                Some(hosts) => {
                    for h in hosts {
                        let h = h.to_ascii_lowercase();
                        let index = match h.strip_prefix('*') {
                            Some(suffix) => router.wild_hosts.entry(suffix.into()).or_default(),
                            None => router.exact_hosts.entry(h.into()).or_default(),
                        };
                        patterns.iter().for_each(|p| index.insert(p.clone(), idx));
                    }
                }
            }
            router.entries.push(Entry {
                methods,
                remote_addrs: spec.remote_addrs,
                vars: spec.vars,
                priority: spec.priority,
                order: idx,
                value: spec.value,
            });
        }
        let entries = &router.entries;
        router.no_host.sort(entries);
        router.exact_hosts.values_mut().for_each(|i| i.sort(entries));
        router.wild_hosts.values_mut().for_each(|i| i.sort(entries));
        router
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn find(&self, req: &RequestFacts<'_>) -> Option<&T> {
        self.find_ranked(req, |_| false).map(|(_, v)| v)
    }

    /// The first route that matches, with where it sits in the search order, passing over the
    /// routes `skip` names.
    pub fn find_ranked(&self, req: &RequestFacts<'_>, skip: impl Fn(&T) -> bool) -> Option<(Rank, &T)> {
        if let Some(host) = req.host {
            if let Some(index) = self.exact_hosts.get(host)
                && let Some(found) = self.find_in(index, req, 0, &skip)
            {
                return Some(found);
            }
            if !self.wild_hosts.is_empty() {
                // `a.b.example.com` tries `.b.example.com`, `.example.com`, `.com`, then `*`.
                let mut from = 0;
                while let Some(dot) = host[from..].find('.') {
                    let suffix = &host[from + dot..];
                    if suffix.len() < host.len()
                        && let Some(index) = self.wild_hosts.get(suffix)
                        && let Some(found) = self.find_in(index, req, WILD_HOST - suffix.len() as u64, &skip)
                    {
                        return Some(found);
                    }
                    from += dot + 1;
                }
                if let Some(index) = self.wild_hosts.get("")
                    && let Some(found) = self.find_in(index, req, WILD_HOST, &skip)
                {
                    return Some(found);
                }
            }
        }
        self.find_in(&self.no_host, req, NO_HOST, &skip)
    }

    fn find_in<'s>(
        &'s self,
        index: &'s PathIndex,
        req: &RequestFacts<'_>,
        host: u64,
        skip: &impl Fn(&T) -> bool,
    ) -> Option<(Rank, &'s T)> {
        let ranked = |e: &'s Entry<T>, path| (Rank { host, path, priority: std::cmp::Reverse(e.priority) }, &e.value);
        if let Some(slot) = index.exact.get(req.path)
            && let Some(e) = self.first_passing(slot, req, skip)
        {
            return Some(ranked(e, EXACT_PATH));
        }
        index.trie.walk_longest_first(req.path, |slot, len| {
            self.first_passing(slot, req, skip).map(|e| ranked(e, PREFIX_PATH - len as u64))
        })
    }

    fn first_passing<'s>(&'s self, slot: &'s Slot, req: &RequestFacts<'_>, skip: &impl Fn(&T) -> bool) -> Option<&'s Entry<T>> {
        let bit = method_bit(req.method);
        slot.iter().find_map(|(i, pattern)| {
            let e = &self.entries[*i as usize];
            if let Some(p) = pattern
                && !p.matches(req.path)
            {
                return None;
            }
            let ok = (e.methods == u16::MAX || e.methods & bit != 0)
                && e.remote_addrs.as_ref().is_none_or(|nets| req.remote.is_some_and(|ip| nets.iter().any(|n| n.contains(&ip))))
                && e.vars.as_ref().is_none_or(|v| v.eval(req.vars))
                && !skip(&e.value);
            ok.then_some(e)
        })
    }
}

/// Where a match sits in the search order; smaller is tried first. Comparing the matches of two
/// routers by rank, then by the routes' age, gives what one router holding both would.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    host: u64,
    path: u64,
    priority: std::cmp::Reverse<i64>,
}

/// Host ranks: exact 0; `*.suffix` is `WILD_HOST - len(suffix)`, so longer suffixes first and
/// `*` (an empty suffix) after them; no host last.
const WILD_HOST: u64 = 1 << 20;
const NO_HOST: u64 = u64::MAX;
/// Path ranks: exact first, then prefixes longest first.
const EXACT_PATH: u64 = 0;
const PREFIX_PATH: u64 = 1 << 32;

/// Matching on a router with changes laid over it: `base` without the routes `superseded`
/// names, plus `delta`. `older(a, b)` breaks ties as a single router's ordering would.
pub fn find_layered<'a, T>(
    base: &'a Router<T>,
    delta: &'a Router<T>,
    superseded: impl Fn(&T) -> bool,
    older: impl Fn(&T, &T) -> bool,
    req: &RequestFacts<'_>,
) -> Option<&'a T> {
    match (base.find_ranked(req, superseded), delta.find_ranked(req, |_| false)) {
        (Some((rb, b)), Some((rd, d))) => Some(if rb < rd || (rb == rd && older(b, d)) { b } else { d }),
        (b, d) => b.or(d).map(|(_, v)| v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::borrow::Cow;

    struct NoVars;
    impl Vars for NoVars {
        fn get(&self, name: &str) -> Option<Cow<'_, str>> {
            (name == "arg_v").then_some(Cow::Borrowed("1"))
        }
    }

    fn spec(id: &'static str, paths: &[&str]) -> RouteSpec<&'static str> {
        RouteSpec {
            paths: paths.iter().map(|s| s.to_string()).collect(),
            hosts: None,
            methods: None,
            remote_addrs: None,
            vars: None,
            priority: 0,
            value: id,
        }
    }

    fn find(r: &Router<&'static str>, method: &str, host: Option<&str>, path: &str) -> Option<&'static str> {
        let facts = RequestFacts { method, host, path, remote: Some("10.0.0.1".parse().unwrap()), vars: &NoVars };
        r.find(&facts).copied()
    }

    #[test]
    fn rules() {
        let mut with_host = spec("host", &["/h*"]);
        with_host.hosts = Some(vec!["a.com".into()]);
        let mut wild = spec("wild", &["/h*"]);
        wild.hosts = Some(vec!["*.a.com".into()]);
        let mut post_only = spec("post", &["/m"]);
        post_only.methods = Some(vec!["POST".into()]);
        let mut prio = spec("prio", &["/p*"]);
        prio.priority = 10;
        let mut remote = spec("remote", &["/ip"]);
        remote.remote_addrs = Some(vec!["192.168.0.0/16".parse().unwrap()]);
        let mut vars = spec("vars", &["/v"]);
        vars.vars = Some(Expr::compile(&serde_json::json!([["arg_v", "==", "2"]])).unwrap());
        let r = Router::new(vec![
            spec("exact", &["/a"]),
            spec("prefix", &["/a*"]),
            spec("longer", &["/ab*"]),
            spec("param", &["/user/:id"]),
            spec("rest", &["/files/*path"]),
            spec("mixed", &["/u/:id/profile"]),
            spec("fallback", &["/*"]),
            with_host,
            wild,
            spec("nohost", &["/h*"]),
            post_only,
            spec("m-any", &["/m*"]),
            spec("p-low", &["/p*"]),
            prio,
            remote,
            vars,
        ]);
        let cases = [
            ("GET", None, "/a", Some("exact")),
            ("GET", None, "/ax", Some("prefix")),
            ("GET", None, "/abc", Some("longer")),
            ("GET", None, "/user/42", Some("param")),
            ("GET", None, "/user/42/x", Some("fallback")),
            ("GET", None, "/user/", Some("fallback")),
            ("GET", None, "/files/a/b/c", Some("rest")),
            ("GET", None, "/u/7/profile", Some("mixed")),
            ("GET", None, "/u/7/other", Some("fallback")),
            ("GET", Some("a.com"), "/hello", Some("host")),
            ("GET", Some("x.a.com"), "/hello", Some("wild")),
            ("GET", Some("y.x.a.com"), "/hello", Some("wild")),
            ("GET", Some("a.com"), "/zzz", Some("fallback")),
            ("GET", Some("b.com"), "/hello", Some("nohost")),
            ("POST", None, "/m", Some("post")),
            ("GET", None, "/m", Some("m-any")),
            ("GET", None, "/p", Some("prio")),
            ("GET", None, "/ip", Some("fallback")),
            ("GET", None, "/v", Some("fallback")),
            ("GET", None, "nothing", None),
        ];
        for (m, h, p, want) in cases {
            assert_eq!(find(&r, m, h, p), want, "{m} {h:?} {p}");
        }
    }

    #[test]
    fn no_routes_no_match() {
        let r: Router<&str> = Router::new(vec![]);
        assert_eq!(find(&r, "GET", None, "/"), None);
    }

    // The oracle: every (route, path pattern, host pattern) is a candidate with a sort key that
    // spells out the ordering rules; the winner is the best-keyed candidate whose predicates hold.
    fn oracle(specs: &[RouteSpec<&'static str>], req: &RequestFacts<'_>) -> Option<&'static str> {
        let mut best: Option<((u8, usize, u8, usize, i64, usize), &'static str)> = None;
        for (order, s) in specs.iter().enumerate() {
            let host_keys: Vec<(u8, usize)> = match &s.hosts {
                None => vec![(2, 0)],
                Some(hs) => hs
                    .iter()
                    .filter_map(|h| {
                        let rh = req.host?;
                        match h.strip_prefix('*') {
                            Some(suf) if rh.ends_with(suf) && rh.len() > suf.len() => Some((1, usize::MAX - suf.len())),
                            Some(_) => None,
                            None if h == rh => Some((0, 0)),
                            None => None,
                        }
                    })
                    .collect(),
            };
            for p in &s.paths {
                let pat = PathPattern::parse(p);
                if !pat.matches(req.path) {
                    continue;
                }
                let path_key = match &pat {
                    PathPattern::Exact(_) => (0, 0),
                    PathPattern::Prefix(x) | PathPattern::Params { prefix: x, .. } => (1, usize::MAX - x.len()),
                };
                let methods_ok = s.methods.as_ref().is_none_or(|m| m.iter().any(|m| m == req.method));
                let remote_ok = s.remote_addrs.as_ref().is_none_or(|n| n.iter().any(|n| n.contains(&req.remote.unwrap())));
                if !(methods_ok && remote_ok) {
                    continue;
                }
                for hk in &host_keys {
                    let key = (hk.0, hk.1, path_key.0, path_key.1, -s.priority, order);
                    if best.as_ref().is_none_or(|(b, _)| key < *b) {
                        best = Some((key, s.value));
                    }
                }
            }
        }
        best.map(|(_, v)| v)
    }

    const IDS: [&str; 40] = [
        "r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "r16",
        "r17", "r18", "r19", "r20", "r21", "r22", "r23", "r24", "r25", "r26", "r27", "r28", "r29", "r30", "r31",
        "r32", "r33", "r34", "r35", "r36", "r37", "r38", "r39",
    ];

    fn path_strategy() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "/", "/a", "/a*", "/ab", "/ab*", "/a/b", "/a/*", "/a/:x", "/a/:x/c", "/a/*rest", "/b", "/b*", "/*", "/ab/c",
            "/abc*", "/abd*", "/abcd*", "/ab/c*", "/b/ab*", "/abcde",
        ])
        .prop_map(String::from)
    }

    fn host_strategy() -> impl Strategy<Value = Option<Vec<String>>> {
        prop::option::of(prop::collection::vec(
            prop::sample::select(vec!["x.com", "a.x.com", "*.x.com", "*.a.x.com", "y.com", "*"]).prop_map(String::from),
            1..3,
        ))
    }

    fn spec_strategy() -> impl Strategy<Value = RawSpec> {
        (
            prop::collection::vec(path_strategy(), 1..3),
            host_strategy(),
            prop::option::of(prop::collection::vec(prop::sample::select(vec!["GET", "POST"]).prop_map(String::from), 1..2)),
            -2i64..3,
            any::<bool>(),
        )
    }

    type RawSpec = (Vec<String>, Option<Vec<String>>, Option<Vec<String>>, i64, bool);

    /// Route `i` from generated parts; `remote` limits it to 10.0.0.0/8.
    fn spec_of(i: usize, (paths, hosts, methods, priority, remote): &RawSpec) -> RouteSpec<&'static str> {
        RouteSpec {
            paths: paths.clone(),
            hosts: hosts.clone(),
            methods: methods.clone(),
            remote_addrs: remote.then(|| vec!["10.0.0.0/8".parse().unwrap()]),
            vars: None,
            priority: *priority,
            value: IDS[i],
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]
        #[test]
        fn matches_linear_oracle(
            raw in prop::collection::vec(spec_strategy(), 0..40),
            reqs in prop::collection::vec((
                prop::sample::select(vec!["/", "/a", "/ab", "/abc", "/a/b", "/a/b/c", "/a/q/c", "/b", "/ab/c", "/zz", "/a/",
                    "/abcd", "/abcde", "/abdx", "/ab/cd", "/b/abc", "/abce"]),
                prop::option::of(prop::sample::select(vec!["x.com", "a.x.com", "b.a.x.com", "y.com", "z.com"])),
                prop::sample::select(vec!["GET", "POST", "PUT"]),
                any::<bool>(),
            ), 1..20),
        ) {
            let make = || raw.iter().enumerate().map(|(i, r)| spec_of(i, r)).collect::<Vec<_>>();
            let specs = make();
            let router = Router::new(make());
            for (path, host, method, inside) in &reqs {
                let remote: IpAddr = if *inside { "10.1.1.1".parse().unwrap() } else { "11.1.1.1".parse().unwrap() };
                let facts = RequestFacts { method, host: *host, path, remote: Some(remote), vars: &NoVars };
                prop_assert_eq!(router.find(&facts).copied(), oracle(&specs, &facts), "{} {:?} {}", method, host, path);
            }
        }

        /// A base router with changed and deleted routes laid over it answers as a router
        /// rebuilt from the resulting routes.
        #[test]
        fn layered_matches_rebuilt(
            raw in prop::collection::vec(spec_strategy(), 1..40),
            changes in prop::collection::vec((0usize..40, prop::option::of(spec_strategy())), 0..10),
            reqs in prop::collection::vec((
                prop::sample::select(vec!["/", "/a", "/ab", "/abc", "/a/b", "/a/b/c", "/b", "/ab/c", "/abcd", "/b/abc"]),
                prop::option::of(prop::sample::select(vec!["x.com", "a.x.com", "b.a.x.com", "y.com"])),
                prop::sample::select(vec!["GET", "POST"]),
            ), 1..20),
        ) {
            let to_spec = spec_of;
            // The last change to a route wins; a change to a route past the end adds it.
            let mut changed: std::collections::BTreeMap<usize, Option<_>> = std::collections::BTreeMap::new();
            for (i, c) in &changes {
                changed.insert(*i, c.clone());
            }
            let n = raw.len().max(changed.keys().max().map_or(0, |m| m + 1));
            let merged: Vec<_> = (0..n)
                .filter_map(|i| match changed.get(&i) {
                    Some(c) => c.as_ref().map(|c| to_spec(i, c)),
                    None => raw.get(i).map(|r| to_spec(i, r)),
                })
                .collect();
            let rebuilt = Router::new(merged);
            let base = Router::new(raw.iter().enumerate().map(|(i, r)| to_spec(i, r)).collect());
            let delta = Router::new(changed.iter().filter_map(|(i, c)| c.as_ref().map(|c| to_spec(*i, c))).collect());
            let index = |v: &&str| IDS.iter().position(|x| x == v).unwrap();
            for (path, host, method) in &reqs {
                let facts = RequestFacts { method, host: *host, path, remote: Some("10.1.1.1".parse().unwrap()), vars: &NoVars };
                let layered = find_layered(&base, &delta, |v| changed.contains_key(&index(v)), |a, b| index(a) < index(b), &facts);
                prop_assert_eq!(layered.copied(), rebuilt.find(&facts).copied(), "{} {:?} {}", method, host, path);
            }
        }
    }
}
