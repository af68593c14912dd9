//! `ua-restriction`: lets through, or refuses, requests by their `User-Agent` (regexes).

use std::sync::Arc;

use regex::RegexSet;
use serde::Deserialize;
use serde_json::json;

use crate::{Factory, JsonSchema, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("ua-restriction", 2999, |c: Config, _| {
        let set = |k: &str, list: Option<Vec<String>>| list.map(|l| RegexSet::new(l).map_err(|e| format!("{k}: {e}"))).transpose();
        Ok(Arc::new(UaRestriction {
            allow: set("allowlist", c.allowlist)?,
            deny: set("denylist", c.denylist)?,
            bypass_missing: c.bypass_missing,
            message: c.message,
        }))
    })
}

#[derive(Deserialize, JsonSchema)]
#[schemars(extend("oneOf" = [{"required": ["allowlist"]}, {"required": ["denylist"]}]))]
struct Config {
    /// Let through requests without a `User-Agent`.
    #[serde(default)]
    bypass_missing: bool,
    /// Regexes: only user agents matching one of them are let through.
    #[schemars(length(min = 1), inner(length(min = 1)))]
    allowlist: Option<Vec<String>>,
    /// Regexes: user agents matching any of them are refused.
    #[schemars(length(min = 1), inner(length(min = 1)))]
    denylist: Option<Vec<String>>,
    /// The message a refused request gets.
    #[serde(default = "not_allowed")]
    #[schemars(length(min = 1, max = 1024))]
    message: String,
}

fn not_allowed() -> String {
    "Not allowed".into()
}

struct UaRestriction {
    allow: Option<RegexSet>,
    deny: Option<RegexSet>,
    bypass_missing: bool,
    message: String,
}

impl Plugin for UaRestriction {
    fn access(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let refuse = || Err(Reply::new(403, Some(json!({"message": self.message}))));
        // Every User-Agent header counts: a client cannot hide a denied one behind another.
        let agents: Vec<&str> = ctx.parts.headers.get_all(http::header::USER_AGENT).iter().filter_map(|v| v.to_str().ok()).collect();
        if agents.is_empty() {
            return if self.bypass_missing { Ok(()) } else { refuse() };
        }
        if let Some(allow) = &self.allow {
            return if agents.iter().all(|a| allow.is_match(a)) { Ok(()) } else { refuse() };
        }
        if let Some(deny) = &self.deny
            && agents.iter().any(|a| deny.is_match(a))
        {
            return refuse();
        }
        Ok(())
    }
}
