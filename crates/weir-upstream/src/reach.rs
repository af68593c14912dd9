//! Where a tenant's upstream may connect: its nodes' names are resolved here and every address
//! checked before one is dialled.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use weir_core::net::canonical;

use crate::lanes::Lanes;

/// Where connections for tenants may go: every address a name resolves to is checked against
/// `denied` before one is dialled, so a name cannot lead past the check that refused the same
/// address written out. Lookups take places (`LOOKUPS` on the node, `LOOKUPS_PER_GATEWAY`
/// each): one cannot be cancelled, and a name whose servers never answer holds a blocking
/// thread until the system's resolver gives up.
pub struct Reach {
    pub denied: Vec<IpNet>,
    names: Names,
    /// This node's own listeners, refused whatever `denied` says (set once they are bound).
    own: std::sync::RwLock<Vec<SocketAddr>>,
}

/// How names are resolved for tenants: fixed answers first (tests make a name resolve to a
/// private address without any DNS), then the system's resolver within the lookups' places.
pub struct Names {
    pub fixed: HashMap<String, Vec<IpAddr>>,
    lookups: Lanes,
}

impl Names {
    pub fn new(fixed: HashMap<String, Vec<IpAddr>>) -> Names {
        Names { fixed, lookups: Lanes::new(LOOKUPS, LOOKUPS_PER_GATEWAY) }
    }

    /// The addresses of `host` (a name or an address) at `port`, looked up for `gateway`.
    pub async fn addresses(&self, gateway: &str, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Some(ips) = self.fixed.get(&host.to_ascii_lowercase()) {
            return Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        let name = host.to_string();
        let handle = tokio::runtime::Handle::current();
        let found = self.lookups.run(&handle, gateway, move || std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), port)).map(Iterator::collect::<Vec<SocketAddr>>)).await;
        match found {
            Some(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
            Some(Ok(_)) => Err(std::io::Error::other(format!("{host} resolves to no address"))),
            Some(Err(e)) => Err(std::io::Error::new(e.kind(), format!("cannot resolve {host}: {e}"))),
            None => Err(std::io::Error::other(format!("cannot resolve {host}"))),
        }
    }
}

const LOOKUPS: usize = 32;
const LOOKUPS_PER_GATEWAY: usize = 4;

impl std::fmt::Debug for Reach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reach").field("denied", &self.denied).field("fixed", &self.names.fixed).finish()
    }
}

/// A tenant's connections: where they may go, and whose lookups they are.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub reach: Arc<Reach>,
    pub gateway: Arc<str>,
}

impl Tenant {
    pub async fn resolve(&self, authority: &str) -> std::io::Result<Vec<SocketAddr>> {
        self.reach.resolve(&self.gateway, authority).await
    }

    pub fn refuse(&self, addr: SocketAddr) -> Option<String> {
        self.reach.refuse(addr)
    }

    /// Refuses a connection made that turns out to be to this node's own listener.
    pub fn connected(&self, stream: &tokio::net::TcpStream) -> std::io::Result<()> {
        self.reach.connected(stream)
    }
}

impl Reach {
    pub fn new(denied: Vec<IpNet>, fixed: HashMap<String, Vec<IpAddr>>) -> Reach {
        Reach { denied, names: Names::new(fixed), own: Default::default() }
    }

    /// This node's listeners: refused to tenants whatever the networks say (the operator may
    /// let tenants reach loopback, never its admin API there).
    pub fn set_own(&self, own: Vec<SocketAddr>) {
        if let Ok(mut o) = self.own.write() {
            *o = own;
        }
    }

    /// Why `addr` may not be dialled, or `None` when it may.
    pub fn refuse(&self, addr: SocketAddr) -> Option<String> {
        let ip = canonical(addr.ip());
        if self.own.read().map_or(true, |o| weir_core::net::is_listener(&o, addr)) {
            return Some(format!("{addr} is one of this node's own listeners"));
        }
        self.denied.iter().find(|n| n.contains(&ip)).map(|n| format!("{ip} is in {n}, which tenants may not reach"))
    }

    /// Refuses a connection that reached this node itself on one of its listeners' ports: to
    /// this host (its local address is the one it reached) where a listener is bound to every
    /// address, or to the listener's own. What an address cannot tell (one of this host's own
    /// public addresses) the connection does, before anything is sent on it.
    pub fn connected(&self, stream: &tokio::net::TcpStream) -> std::io::Result<()> {
        let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else { return Ok(()) };
        match self.own.read().map_or(true, |o| weir_core::net::reached_listener(&o, peer, local)) {
            true => Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("{peer} is one of this node's own listeners"))),
            false => Ok(()),
        }
    }

    /// The addresses of `host:port` (a name or an address) for `gateway`, each checked.
    pub async fn resolve(&self, gateway: &str, authority: &str) -> std::io::Result<Vec<SocketAddr>> {
        let refused = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
        let (host, port) = authority.rsplit_once(':').and_then(|(h, p)| Some((h.trim_start_matches('[').trim_end_matches(']'), p.parse::<u16>().ok()?))).ok_or_else(|| refused(format!("{authority} is not host:port")))?;
        let addrs = self.names.addresses(gateway, host, port).await?;
        match addrs.iter().find_map(|a| self.refuse(*a)) {
            Some(why) => Err(refused(format!("{host} resolves to {why}"))),
            None => Ok(addrs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node's own listeners are refused even where the operator lets tenants reach their
    /// network: by address where it tells, else once connected, before anything is sent.
    #[tokio::test]
    async fn this_nodes_own_listeners_are_refused_whatever_the_networks_say() {
        let reach = Reach::new(Vec::new(), HashMap::new());
        let wildcard = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = wildcard.local_addr().unwrap().port();
        reach.set_own(vec!["127.0.0.1:9180".parse().unwrap(), wildcard.local_addr().unwrap()]);
        for own in ["127.0.0.1:9180".to_string(), format!("127.0.0.1:{port}"), format!("127.0.0.9:{port}"), format!("[::ffff:127.0.0.1]:{port}")] {
            assert!(reach.refuse(own.parse().unwrap()).is_some_and(|w| w.contains("own listeners")), "{own}");
        }
        assert_eq!(reach.refuse("127.0.0.1:9181".parse().unwrap()), None);
        assert_eq!(reach.refuse(format!("93.184.215.14:{port}").parse().unwrap()), None, "an address elsewhere is not known to be this node's");
        // Reached anyway (here by its loopback address, as by one of this host's own): refused.
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        assert!(reach.connected(&stream).is_err());
        // Another listener on this host is not the node's.
        let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(other.local_addr().unwrap()).await.unwrap();
        assert!(reach.connected(&stream).is_ok());
    }

    #[tokio::test]
    async fn a_name_that_resolves_into_a_denied_network_is_refused_without_dialling() {
        let reach = Reach::new(
            vec!["127.0.0.0/8".parse().unwrap(), "10.0.0.0/8".parse().unwrap()],
            HashMap::from([("inside.test".to_string(), vec!["10.1.2.3".parse().unwrap()]), ("mixed.test".to_string(), vec!["93.184.215.14".parse().unwrap(), "::ffff:127.0.0.1".parse().unwrap()]), ("out.test".to_string(), vec!["93.184.215.14".parse().unwrap()])]),
        );
        let reach = Tenant { reach: Arc::new(reach), gateway: "g".into() };
        let e = reach.resolve("inside.test:80").await.unwrap_err();
        assert_eq!((e.kind(), e.to_string()), (std::io::ErrorKind::PermissionDenied, "inside.test resolves to 10.1.2.3 is in 10.0.0.0/8, which tenants may not reach".to_string()));
        assert!(reach.resolve("MIXED.test:80").await.unwrap_err().to_string().contains("127.0.0.1 is in 127.0.0.0/8"), "one bad address refuses the name");
        assert_eq!(reach.resolve("out.test:8080").await.unwrap(), vec!["93.184.215.14:8080".parse::<SocketAddr>().unwrap()]);
        assert!(reach.resolve("[::ffff:10.0.0.1]:80").await.is_err());
        assert!(reach.refuse("[64:ff9b::7f00:1]:80".parse().unwrap()).is_some());
    }
}
