//! Where a function's `fetch` may go: to a `host:port` on its gateway's `fetchAllowList`,
//! and then only to addresses outside the networks a tenant must never reach (this node's
//! loopback, private networks, link-local and cloud metadata, unique-local IPv6), unless the
//! operator allows a network in the node's config. Names are resolved once and the checked
//! address is the one connected to, so a name cannot resolve to one address for the check and
//! another for the connection.

use std::net::SocketAddr;

use ipnet::IpNet;

/// The networks refused unless the operator allows them. An IPv6 address that carries an
/// IPv4 one (mapped, compatible, translated, NAT64's well-known prefix, 6to4) is checked as
/// that IPv4 address; the forms whose IPv4 address cannot be read off (NAT64's local-use
/// prefix, Teredo) are refused whole.
pub const DENIED: [&str; 19] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "64:ff9b:1::/48",
    "2001::/32",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// The rules one node applies to every gateway's fetches.
#[derive(Debug, Clone)]
pub struct Policy {
    /// [`DENIED`] and the operator's own (`platform.denied_networks`).
    denied: Vec<IpNet>,
    /// Networks the operator allows despite `denied` (tests: a loopback upstream).
    allowed: Vec<IpNet>,
    /// This node's own listeners, refused whatever the networks say.
    own: Vec<SocketAddr>,
}

/// Why an address may not be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// It is one of this node's listeners.
    Own,
    /// It is in a network functions may not reach.
    Denied(IpNet),
}

impl Refusal {
    /// The reason a function is given for its fetch of `host` refused at `addr`. The address
    /// is named only where the function wrote it: one a name resolved to stays the node's, as
    /// does which of its ports listen.
    pub fn why(&self, host: &str, addr: SocketAddr) -> String {
        let literal = host.parse::<std::net::IpAddr>().is_ok();
        match (self, literal) {
            (Refusal::Own, true) => format!("{addr} is one of this gateway node's own listeners"),
            (Refusal::Own, false) => format!("{host} resolves to one of this gateway node's own listeners"),
            (Refusal::Denied(n), true) => format!("{} is in {n}, which functions may not reach", canonical(addr.ip())),
            (Refusal::Denied(n), false) => format!("{host} resolves to an address in {n}, which functions may not reach"),
        }
    }
}

impl Policy {
    /// `denied`: networks the operator refuses beyond [`DENIED`]; `allowed`: networks it
    /// allows despite both.
    pub fn new(allowed: &[IpNet], denied: &[IpNet], own: Vec<SocketAddr>) -> Policy {
        let mut all: Vec<IpNet> = DENIED.iter().filter_map(|n| n.parse().ok()).collect();
        all.extend(denied.iter().filter(|n| !all.contains(n)).copied().collect::<Vec<_>>());
        Policy { denied: all, allowed: allowed.to_vec(), own }
    }

    /// Why `addr` may not be fetched, or `None` when it may. A listener bound to every
    /// address is known by address only on loopback; elsewhere [`Policy::connected`] tells.
    pub fn refuse(&self, addr: SocketAddr) -> Option<Refusal> {
        let ip = canonical(addr.ip());
        if weir_core::net::is_listener(&self.own, addr) {
            return Some(Refusal::Own);
        }
        if self.allowed.iter().any(|n| n.contains(&ip)) {
            return None;
        }
        self.denied.iter().find(|n| n.contains(&ip)).map(|n| Refusal::Denied(*n))
    }

    /// Whether a connection made (to `peer`, from `local`) reached one of this node's
    /// listeners ([`weir_core::net::reached_listener`]).
    pub fn connected(&self, peer: SocketAddr, local: SocketAddr) -> Option<Refusal> {
        weir_core::net::reached_listener(&self.own, peer, local).then_some(Refusal::Own)
    }
}

pub use weir_core::net::canonical;

/// `host:port` of a URL's authority as the allow list writes it (the port made explicit).
pub fn authority(url: &http::Uri) -> Option<(String, u16)> {
    let host = url.host()?.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let port = url.port_u16().unwrap_or(if url.scheme_str() == Some("https") { 443 } else { 80 });
    Some((host, port))
}

/// Whether `allow` (entries `host:port`, or `host` for ports 80 and 443) lets `host:port` in.
pub fn allowed(allow: &[String], host: &str, port: u16) -> bool {
    allow.iter().any(|entry| {
        let entry = entry.to_ascii_lowercase();
        match entry.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()) {
            Some((h, p)) => h.trim_start_matches('[').trim_end_matches(']') == host && p.parse() == Ok(port),
            None => entry == host && (port == 80 || port == 443),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Every private, loopback and link-local target is refused by the address check alone:
    /// no packet is sent.
    #[test]
    fn private_loopback_and_link_local_addresses_are_refused() {
        let p = Policy::new(&[], &[], vec![sa("127.0.0.1:9180"), sa("0.0.0.0:9080")]);
        for bad in [
            "127.0.0.1:80",
            "127.8.9.10:443",
            "[::1]:80",
            "10.1.2.3:80",
            "172.16.0.1:80",
            "172.31.255.255:80",
            "192.168.1.1:443",
            "169.254.169.254:80",
            "[fc00::1]:80",
            "[fd12:3456::1]:80",
            "[fe80::1]:80",
            "0.0.0.0:80",
            "[::ffff:127.0.0.1]:80",
            "[::ffff:10.0.0.1]:80",
            "100.64.0.1:80",
            // IPv6 forms that carry a refused IPv4 address, or an IPv4 address that cannot be read.
            "[::127.0.0.1]:80",
            "[::a00:1]:80",
            "[::ffff:0:a00:1]:80",
            "[64:ff9b::a00:1]:80",
            "[64:ff9b::7f00:1]:80",
            "[64:ff9b:1::a00:1]:80",
            "[2002:c0a8:101::1]:80",
            "[2002:7f00:1::]:80",
            "[2001:0:4136:e378:8000:63bf:3fff:fdd2]:80",
            "[fec0::1]:80",
            "198.18.0.1:80",
            "240.0.0.1:80",
            "255.255.255.255:80",
        ] {
            assert!(p.refuse(sa(bad)).is_some(), "{bad} must be refused");
        }
        for good in ["93.184.215.14:443", "[2606:2800:21f:cb07:6820:80da:af6b:8b2c]:443", "172.32.0.1:80", "192.169.0.1:80", "[64:ff9b::5db8:d70e]:443", "[2002:5db8:d70e::1]:443"] {
            assert_eq!(p.refuse(sa(good)), None, "{good}");
        }
        // The node's own listeners are refused even where the operator allows the network.
        let p = Policy::new(&["127.0.0.0/8".parse().unwrap()], &[], vec![sa("127.0.0.1:9180"), sa("0.0.0.0:9080")]);
        assert_eq!(p.refuse(sa("127.0.0.1:9180")), Some(Refusal::Own));
        assert_eq!(p.refuse(sa("127.0.0.1:9080")), Some(Refusal::Own));
        assert_eq!(p.refuse(sa("127.0.0.1:8080")), None);
        assert!(p.refuse(sa("10.0.0.1:80")).is_some());
        // A listener on every address is known by address on loopback only; a host elsewhere
        // on its port is not this node, unless the connection says it is.
        assert_eq!(p.refuse(sa("93.184.215.14:9080")), None);
        assert_eq!(p.connected(sa("93.184.215.14:9080"), sa("10.9.9.9:40000")), None);
        assert_eq!(p.connected(sa("10.9.9.9:9080"), sa("10.9.9.9:40000")), Some(Refusal::Own));
        assert_eq!(p.connected(sa("10.9.9.9:9081"), sa("10.9.9.9:40000")), None);
        // `0.0.0.0` dialled lands on loopback: a listener there is known once connected.
        assert_eq!(p.connected(sa("127.0.0.1:9180"), sa("127.0.0.1:40000")), Some(Refusal::Own));
    }

    /// The operator's own denied networks are refused too, unless it allows them for fetch.
    #[test]
    fn the_operators_denied_networks_are_refused_as_the_built_in_ones() {
        let mgmt: IpNet = "203.0.113.0/24".parse().unwrap();
        let p = Policy::new(&[], &[mgmt, "10.0.0.0/8".parse().unwrap()], Vec::new());
        assert_eq!(p.refuse(sa("203.0.113.7:443")), Some(Refusal::Denied(mgmt)));
        assert_eq!(p.refuse(sa("[::ffff:203.0.113.7]:443")), Some(Refusal::Denied(mgmt)));
        assert_eq!(p.refuse(sa("203.0.114.7:443")), None);
        assert_eq!(p.refuse(sa("10.0.0.1:80")), Some(Refusal::Denied("10.0.0.0/8".parse().unwrap())));
        let p = Policy::new(&[mgmt], &[mgmt], Vec::new());
        assert_eq!(p.refuse(sa("203.0.113.7:443")), None);
    }

    /// A name's refusal says which network, never the address it resolved to.
    #[test]
    fn a_refusal_names_an_address_only_where_the_function_wrote_it() {
        let private = Refusal::Denied("10.0.0.0/8".parse().unwrap());
        let at = sa("10.43.7.12:5432");
        assert_eq!(private.why("10.43.7.12", at), "10.43.7.12 is in 10.0.0.0/8, which functions may not reach");
        let named = private.why("db.internal", at);
        assert_eq!(named, "db.internal resolves to an address in 10.0.0.0/8, which functions may not reach");
        assert!(!Refusal::Own.why("me.internal", sa("10.0.0.5:9180")).contains("10.0.0.5"));
        assert!(Refusal::Own.why("::1", sa("[::1]:9180")).contains("[::1]:9180"));
    }

    #[test]
    fn the_allow_list_names_host_and_port() {
        let allow = vec!["api.example.com:443".to_string(), "plain.test".to_string(), "[::1]:8080".to_string()];
        assert!(allowed(&allow, "api.example.com", 443));
        assert!(!allowed(&allow, "api.example.com", 80));
        assert!(allowed(&allow, "plain.test", 80));
        assert!(!allowed(&allow, "plain.test", 8080));
        assert!(allowed(&allow, "::1", 8080));
        assert!(!allowed(&allow, "other.test", 443));
        let uri: http::Uri = "https://API.example.com/x".parse().unwrap();
        assert_eq!(authority(&uri), Some(("api.example.com".into(), 443)));
    }
}
