//! `uri-blocker`: refuses requests whose URI (path and query) matches any of its regexes.

use std::sync::Arc;

use regex::RegexSet;
use serde::Deserialize;
use serde_json::json;

use crate::{Factory, JsonSchema, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("uri-blocker", 2900, |c: Config, _| {
        let rules = c.block_rules.iter().map(|r| if c.case_insensitive { format!("(?i){r}") } else { r.clone() });
        let rules = RegexSet::new(rules).map_err(|e| format!("block_rules: {e}"))?;
        Ok(Arc::new(UriBlocker { rules, code: c.rejected_code as u16, msg: c.rejected_msg }))
    })
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// Regexes over the request's path and query: a request matching any is refused.
    #[schemars(length(min = 1), inner(length(min = 1, max = 4096)), extend("uniqueItems" = true))]
    block_rules: Vec<String>,
    /// The status a refused request gets.
    #[serde(default = "forbidden")]
    #[schemars(range(min = 200))]
    rejected_code: u64,
    /// The message a refused request gets.
    #[schemars(length(min = 1))]
    rejected_msg: Option<String>,
    /// Match the regexes without regard to case.
    #[serde(default)]
    case_insensitive: bool,
}

fn forbidden() -> u64 {
    403
}

struct UriBlocker {
    rules: RegexSet,
    code: u16,
    msg: Option<String>,
}

impl Plugin for UriBlocker {
    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let uri = ctx.parts.uri.path_and_query().map_or("/", |p| p.as_str());
        if self.rules.is_match(uri) {
            return Err(Reply::new(self.code, self.msg.as_ref().map(|m| json!({"error_msg": m}))));
        }
        Ok(())
    }
}
