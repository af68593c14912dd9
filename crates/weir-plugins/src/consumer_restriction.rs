//! `consumer-restriction`: lets through only the consumers a whitelist names, or all but those
//! a blacklist names, optionally per method. Runs after the auth plugins.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{Factory, JsonSchema, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("consumer-restriction", 2400, |c: Config, _| Ok(Arc::new(c)))
}

#[derive(Deserialize, JsonSchema)]
#[schemars(extend("anyOf" = [{"required": ["blacklist"]}, {"required": ["whitelist"]}, {"required": ["allowed_by_methods"]}]))]
struct Config {
    /// What the lists name.
    #[serde(default, rename = "type")]
    #[allow(dead_code)]
    kind: Kind,
    /// Consumers refused.
    #[schemars(length(min = 1))]
    blacklist: Option<Vec<String>>,
    /// The only consumers let through.
    #[schemars(length(min = 1))]
    whitelist: Option<Vec<String>>,
    /// The methods a consumer may use.
    allowed_by_methods: Option<Vec<ByMethod>>,
    /// The status a refused consumer is answered with.
    #[serde(default = "code_403")]
    #[schemars(range(min = 200))]
    rejected_code: u16,
    /// The message a refused consumer is answered with.
    rejected_msg: Option<String>,
}

#[derive(Deserialize, Serialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
enum Kind {
    #[default]
    ConsumerName,
}

#[derive(Deserialize, JsonSchema)]
struct ByMethod {
    user: Option<String>,
    #[schemars(length(min = 1))]
    methods: Option<Vec<Method>>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
enum Method {
    Get,
    Post,
    Put,
    Delete,
    Patch,
    Head,
    Options,
    Connect,
    Trace,
    Purge,
}

impl Method {
    fn as_str(&self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
            Method::Connect => "CONNECT",
            Method::Trace => "TRACE",
            Method::Purge => "PURGE",
        }
    }
}

fn code_403() -> u16 {
    403
}

impl Config {
    fn reject(&self) -> Reply {
        let msg = self.rejected_msg.as_deref().unwrap_or("The consumer_name is forbidden.");
        Reply::new(self.rejected_code, Some(json!({ "message": msg })))
    }
}

impl Plugin for Config {
    fn access(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let Some(name) = ctx.consumer.as_ref().map(|c| c.username.clone()) else {
            return Err(Reply::new(401, Some(json!({"message": "Missing authentication or identity verification."}))));
        };
        if let Some(white) = &self.whitelist
            && !white.contains(&name)
        {
            return Err(self.reject());
        }
        if self.blacklist.as_ref().is_some_and(|black| black.contains(&name)) {
            return Err(self.reject());
        }
        let method = ctx.parts.method.as_str();
        let listed = self.allowed_by_methods.iter().flatten().find(|m| m.user.as_deref() == Some(name.as_str()));
        if let Some(rule) = listed
            && !rule.methods.iter().flatten().any(|m| m.as_str() == method)
        {
            return Err(self.reject());
        }
        Ok(())
    }
}
