//! Addresses as the node's checks see them.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::IpNet;

/// An IPv6 address that carries an IPv4 address as that IPv4 address: mapped
/// (`::ffff:a.b.c.d`), translated (`::ffff:0:a.b.c.d`), compatible (`::a.b.c.d`, but `::` and
/// `::1`), NAT64's well-known prefix (`64:ff9b::a.b.c.d`) and 6to4 (`2002:aabb:ccdd::`).
pub fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    let s = v6.segments();
    let last = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    let v4 = match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0xffff, 0, _, _] | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => last,
        [0, 0, 0, 0, 0, 0, _, _] if !(s[6] == 0 && s[7] <= 1) => last,
        [0x2002, hi, lo, ..] => Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8),
        _ => return ip,
    };
    IpAddr::V4(v4)
}

/// Where connections for tenants may go: every address a name resolves to is checked against
/// `denied` before one is dialled, so a name cannot lead past the check that refused the same
/// address written out.
#[derive(Debug, Default)]
pub struct Reach {
    pub denied: Vec<IpNet>,
    /// Names with fixed addresses, resolved without asking the system (tests).
    pub fixed: HashMap<String, Vec<IpAddr>>,
}

impl Reach {
    /// Why `addr` may not be dialled, or `None` when it may.
    pub fn refuse(&self, addr: SocketAddr) -> Option<String> {
        let ip = canonical(addr.ip());
        self.denied.iter().find(|n| n.contains(&ip)).map(|n| format!("{ip} is in {n}, which tenants may not reach"))
    }

    /// The addresses of `host:port` (a name or an address), each checked.
    pub async fn resolve(&self, authority: &str) -> std::io::Result<Vec<SocketAddr>> {
        let refused = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
        let (host, port) = authority.rsplit_once(':').and_then(|(h, p)| Some((h.trim_start_matches('[').trim_end_matches(']'), p.parse::<u16>().ok()?))).ok_or_else(|| refused(format!("{authority} is not host:port")))?;
        let addrs: Vec<SocketAddr> = match self.fixed.get(&host.to_ascii_lowercase()) {
            Some(ips) => ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect(),
            None => tokio::net::lookup_host((host, port)).await?.collect(),
        };
        match addrs.iter().find_map(|a| self.refuse(*a)) {
            Some(why) => Err(refused(format!("{host} resolves to {why}"))),
            None if addrs.is_empty() => Err(refused(format!("{host} resolves to no address"))),
            None => Ok(addrs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_that_resolves_into_a_denied_network_is_refused_without_dialling() {
        let reach = Reach {
            denied: vec!["127.0.0.0/8".parse().unwrap(), "10.0.0.0/8".parse().unwrap()],
            fixed: HashMap::from([("inside.test".to_string(), vec!["10.1.2.3".parse().unwrap()]), ("mixed.test".to_string(), vec!["93.184.215.14".parse().unwrap(), "::ffff:127.0.0.1".parse().unwrap()]), ("out.test".to_string(), vec!["93.184.215.14".parse().unwrap()])]),
        };
        let e = reach.resolve("inside.test:80").await.unwrap_err();
        assert_eq!((e.kind(), e.to_string()), (std::io::ErrorKind::PermissionDenied, "inside.test resolves to 10.1.2.3 is in 10.0.0.0/8, which tenants may not reach".to_string()));
        assert!(reach.resolve("MIXED.test:80").await.unwrap_err().to_string().contains("127.0.0.1 is in 127.0.0.0/8"), "one bad address refuses the name");
        assert_eq!(reach.resolve("out.test:8080").await.unwrap(), vec!["93.184.215.14:8080".parse::<SocketAddr>().unwrap()]);
        assert!(reach.resolve("[::ffff:10.0.0.1]:80").await.is_err());
        assert!(reach.refuse("[64:ff9b::7f00:1]:80".parse().unwrap()).is_some());
    }
}
