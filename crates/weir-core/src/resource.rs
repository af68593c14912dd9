//! The resources of the Admin API and where they live in the store.

/// A kind of object the Admin API manages. The store keeps each object under
/// `{prefix}/{name}/{id}`, the layout APISIX uses in etcd; a consumer credential lives under its
/// consumer: `{prefix}/consumers/{username}/credentials/{id}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Routes,
    Services,
    Upstreams,
    Consumers,
    Credentials,
    ConsumerGroups,
    PluginConfigs,
    GlobalRules,
    Ssls,
    PluginMetadata,
}

impl Resource {
    pub const ALL: [Resource; 10] = [
        Resource::Routes,
        Resource::Services,
        Resource::Upstreams,
        Resource::Consumers,
        Resource::Credentials,
        Resource::ConsumerGroups,
        Resource::PluginConfigs,
        Resource::GlobalRules,
        Resource::Ssls,
        Resource::PluginMetadata,
    ];

    /// The path segment in the Admin API and in store keys.
    pub fn name(self) -> &'static str {
        match self {
            Resource::Routes => "routes",
            Resource::Services => "services",
            Resource::Upstreams => "upstreams",
            Resource::Consumers => "consumers",
            Resource::Credentials => "credentials",
            Resource::ConsumerGroups => "consumer_groups",
            Resource::PluginConfigs => "plugin_configs",
            Resource::GlobalRules => "global_rules",
            Resource::Ssls => "ssls",
            Resource::PluginMetadata => "plugin_metadata",
        }
    }

    /// The singular noun used in error messages ("missing route id").
    pub fn kind(self) -> &'static str {
        match self {
            Resource::Routes => "route",
            Resource::Services => "service",
            Resource::Upstreams => "upstream",
            Resource::Consumers => "consumer",
            Resource::Credentials => "credential",
            Resource::ConsumerGroups => "consumer group",
            Resource::PluginConfigs => "plugin config",
            Resource::GlobalRules => "global rule",
            Resource::Ssls => "ssl",
            Resource::PluginMetadata => "plugin_metadata",
        }
    }

    /// Accepts the Admin API segment; `ssl` is the older spelling APISIX still routes.
    pub fn from_name(name: &str) -> Option<Resource> {
        if name == "ssl" {
            return Some(Resource::Ssls);
        }
        Resource::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Whether `POST` creates an object with a generated id.
    pub fn allows_post(self) -> bool {
        matches!(
            self,
            Resource::Routes | Resource::Services | Resource::Upstreams | Resource::Ssls
        )
    }

    pub fn allows_patch(self) -> bool {
        !matches!(
            self,
            Resource::Consumers | Resource::Credentials | Resource::PluginMetadata
        )
    }

    /// Objects named by something other than an `id` field (consumers by `username`, plugin
    /// metadata by the plugin's name) carry no `id` in their body.
    pub fn has_id_field(self) -> bool {
        !matches!(self, Resource::Consumers | Resource::PluginMetadata)
    }

    /// The store key of one object. `parent` is the consumer's username for credentials.
    pub fn key(self, prefix: &str, parent: Option<&str>, id: &str) -> String {
        match (self, parent) {
            (Resource::Credentials, Some(user)) => {
                format!("{prefix}/consumers/{user}/credentials/{id}")
            }
            _ => format!("{prefix}/{}/{id}", self.name()),
        }
    }

    /// The key prefix under which every object of this resource lives (ends with `/`).
    pub fn dir(self, prefix: &str, parent: Option<&str>) -> String {
        match (self, parent) {
            (Resource::Credentials, Some(user)) => format!("{prefix}/consumers/{user}/credentials/"),
            _ => format!("{prefix}/{}/", self.name()),
        }
    }

    /// Finds which resource a store key belongs to, with the object's id (for credentials, the
    /// id is `{username}/credentials/{id}`, as APISIX reports it).
    pub fn from_key<'k>(prefix: &str, key: &'k str) -> Option<(Resource, &'k str)> {
        let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
        let (name, id) = rest.split_once('/')?;
        if id.is_empty() {
            return None;
        }
        let res = Resource::ALL
            .into_iter()
            .find(|r| *r != Resource::Credentials && r.name() == name)?;
        if res == Resource::Consumers {
            if let Some((_, cred)) = id.split_once("/credentials/") {
                if cred.is_empty() || cred.contains('/') {
                    return None;
                }
                return Some((Resource::Credentials, id));
            }
            if id.contains('/') {
                return None;
            }
        } else if id.contains('/') {
            return None;
        }
        Some((res, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for r in Resource::ALL {
            if r == Resource::Credentials {
                let k = r.key("/apisix", Some("jack"), "c1");
                assert_eq!(k, "/apisix/consumers/jack/credentials/c1");
                assert_eq!(Resource::from_key("/apisix", &k), Some((r, "jack/credentials/c1")));
            } else {
                let k = r.key("/apisix", None, "7");
                assert_eq!(Resource::from_key("/apisix", &k), Some((r, "7")));
                assert_eq!(Resource::from_name(r.name()), Some(r));
            }
        }
        assert_eq!(Resource::from_key("/apisix", "/apisix/routes/"), None);
        assert_eq!(Resource::from_key("/apisix", "/other/routes/1"), None);
        assert_eq!(Resource::from_key("/apisix", "/apisix/nope/1"), None);
    }
}
