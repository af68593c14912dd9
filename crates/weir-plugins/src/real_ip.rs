//! `real-ip`: takes the client address from a header (or another variable) set by a trusted
//! proxy in front, so later plugins and the upstream see the real client.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::Deserialize;

use crate::{Factory, JsonSchema, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("real-ip", 23000, |c: Config, _| {
        let trusted = c
            .trusted_addresses
            .map(|a| {
                a.iter()
                    .map(|t| weir_core::model::parse_ip_net(t).ok_or(format!("trusted_addresses: invalid address {t}")))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        Ok(Arc::new(RealIp { source: c.source, trusted, recursive: c.recursive }))
    })
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// The variable holding the client address, such as `http_x_forwarded_for`.
    #[schemars(length(min = 1))]
    source: String,
    /// Only connections from these addresses or CIDRs may set the client address.
    #[schemars(length(min = 1))]
    trusted_addresses: Option<Vec<String>>,
    /// Take the rightmost address not itself trusted, rather than the last one given.
    #[serde(default)]
    recursive: bool,
}

struct RealIp {
    source: String,
    /// Only connections from these may set the address; `None` trusts everyone.
    trusted: Option<Vec<IpNet>>,
    recursive: bool,
}

impl RealIp {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.as_ref().is_none_or(|t| t.iter().any(|n| n.contains(&ip)))
    }
}

impl Plugin for RealIp {
    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        if !self.trusts(ctx.remote.ip()) {
            return Ok(());
        }
        let Some(value) = ctx.var(&self.source) else { return Ok(()) };
        let parse = |s: &str| -> Option<SocketAddr> {
            let s = s.trim();
            s.parse::<SocketAddr>().ok().or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0)))
        };
        let hops: Vec<&str> = value.split(',').collect();
        // With `recursive`, the rightmost address not itself trusted is the client (nginx's
        // real_ip_recursive); without, the last one given.
        let chosen = if self.recursive {
            hops.iter().rev().filter_map(|h| parse(h)).find(|a| !self.trusts(a.ip())).or_else(|| hops.first().and_then(|h| parse(h)))
        } else {
            hops.last().and_then(|h| parse(h))
        };
        if let Some(addr) = chosen {
            ctx.remote = if addr.port() == 0 { SocketAddr::new(addr.ip(), ctx.remote.port()) } else { addr };
        }
        Ok(())
    }
}
