//! `ip-restriction`: lets in only the client addresses on `whitelist`, or keeps out those on
//! `blacklist` (addresses or CIDRs).

use std::sync::Arc;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::json;

use crate::{Factory, JsonSchema, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("ip-restriction", 3000, |c: Config, _| {
        let nets = |k: &str, list: Option<Vec<String>>| -> Result<Option<Vec<IpNet>>, String> {
            list.map(|a| {
                a.iter().map(|s| weir_core::model::parse_ip_net(s).ok_or_else(|| format!("{k}: invalid IP or CIDR {s}"))).collect()
            })
            .transpose()
        };
        Ok(Arc::new(IpRestriction {
            allow: nets("whitelist", c.whitelist)?,
            deny: nets("blacklist", c.blacklist)?,
            message: c.message,
            code: c.response_code,
        }))
    })
}

#[derive(Deserialize, JsonSchema)]
#[schemars(extend("oneOf" = [{"required": ["whitelist"]}, {"required": ["blacklist"]}]))]
struct Config {
    /// The message a refused client is answered with.
    #[serde(default = "not_allowed")]
    #[schemars(length(min = 1, max = 1024))]
    message: String,
    /// The status a refused client is answered with.
    #[serde(default = "code_403")]
    #[schemars(range(min = 403, max = 404))]
    response_code: u16,
    /// The only addresses or CIDRs let in.
    #[schemars(length(min = 1))]
    whitelist: Option<Vec<String>>,
    /// Addresses or CIDRs kept out.
    #[schemars(length(min = 1))]
    blacklist: Option<Vec<String>>,
}

fn not_allowed() -> String {
    "Your IP address is not allowed".into()
}

fn code_403() -> u16 {
    403
}

struct IpRestriction {
    allow: Option<Vec<IpNet>>,
    deny: Option<Vec<IpNet>>,
    message: String,
    code: u16,
}

impl Plugin for IpRestriction {
    fn access(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let ip = ctx.remote_ip();
        let listed = |nets: &Vec<IpNet>| nets.iter().any(|n| n.contains(&ip));
        let refused = self.deny.as_ref().is_some_and(listed) || self.allow.as_ref().is_some_and(|a| !listed(a));
        if refused {
            return Err(Reply::new(self.code, Some(json!({"message": self.message}))));
        }
        Ok(())
    }
}
