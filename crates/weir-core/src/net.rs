//! Addresses as the node's checks see them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

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

/// Whether `addr` is one of `listeners` (this node's), as far as the address alone tells: a
/// listener's own address, or loopback (and the unspecified address, which lands there) for
/// one bound to every address. One of this host's other addresses takes [`reached_listener`].
pub fn is_listener(listeners: &[SocketAddr], addr: SocketAddr) -> bool {
    let ip = canonical(addr.ip());
    listeners.iter().any(|l| l.port() == addr.port() && (canonical(l.ip()) == ip || (l.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified()))))
}

/// Whether a connection made (to `peer`, from `local`) reached one of `listeners`: a
/// listener's own address (an address dialled may land elsewhere, `0.0.0.0` on loopback), or,
/// for one bound to every address, its port on this host itself, which is where a
/// connection's local address is the one it reached.
pub fn reached_listener(listeners: &[SocketAddr], peer: SocketAddr, local: SocketAddr) -> bool {
    let (ip, here) = (canonical(peer.ip()), canonical(local.ip()));
    listeners.iter().any(|l| l.port() == peer.port() && (canonical(l.ip()) == ip || (l.ip().is_unspecified() && (ip == here || ip.is_loopback()))))
}
