//! `ip-restriction`: lets in only the client addresses on `whitelist`, or keeps out those on
//! `blacklist` (addresses or CIDRs).

use std::sync::Arc;

use ipnet::IpNet;
use serde_json::{Value, json};

use crate::{LegacyFactory, Factory, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    let list = json!({"type": "array", "minItems": 1, "items": {"type": "string"}});
    LegacyFactory {
        name: "ip-restriction",
        priority: 3000,
        schema: json!({"type": "object", "properties": {
            "message": {"type": "string", "minLength": 1, "maxLength": 1024, "default": "Your IP address is not allowed"},
            "response_code": {"type": "integer", "minimum": 403, "maximum": 404, "default": 403},
            "whitelist": list, "blacklist": list
        }, "oneOf": [{"required": ["whitelist"]}, {"required": ["blacklist"]}]}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| {
            let nets = |k: &str| -> Result<Option<Vec<IpNet>>, String> {
                conf.get(k)
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|v| {
                                let s = v.as_str().unwrap_or("");
                                weir_core::model::parse_ip_net(s).ok_or_else(|| format!("{k}: invalid IP or CIDR {s}"))
                            })
                            .collect()
                    })
                    .transpose()
            };
            Ok(Arc::new(IpRestriction {
                allow: nets("whitelist")?,
                deny: nets("blacklist")?,
                message: conf.get("message").and_then(Value::as_str).unwrap_or("Your IP address is not allowed").to_string(),
                code: conf.get("response_code").and_then(Value::as_u64).unwrap_or(403) as u16,
            }))
        },
    }
    .into()
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
