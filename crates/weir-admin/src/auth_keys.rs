//! One caller, one consumer: the attribute an auth plugin finds its consumer by (a key-auth
//! `key`, a basic-auth `username`, a jwt-auth `key`, an hmac-auth `key_id`) may be held by only
//! one consumer or credential. A write that would give it to a second one is refused, with
//! APISIX's message (`check_duplicate_key` in `apisix/consumer.lua`); without this, whichever
//! the data plane loaded last would silently take the key over.
//!
//! The check reads every consumer and credential in the store. Writes from one node take turns,
//! so on one node it is exact; between nodes sharing a store it is best-effort, as APISIX's is.

use serde_json::{Map, Value};
use weir_core::Resource;
use weir_tls::Keyring;

use crate::Admin;
use crate::reply::{self, Reply};

/// Auth plugin → the attribute callers are looked up by.
const UNIQUE: [(&str, &str); 4] = [("key-auth", "key"), ("basic-auth", "username"), ("jwt-auth", "key"), ("hmac-auth", "key_id")];

/// The values `plugins` holds for [`UNIQUE`] attributes, opened if sealed.
fn unique_values(keyring: &Keyring, plugins: &Map<String, Value>) -> Vec<(&'static str, &'static str, String)> {
    let mut out = Vec::new();
    for (plugin, attr) in UNIQUE {
        let Some(Value::String(v)) = plugins.get(plugin).and_then(|c| c.get(attr)) else { continue };
        // A value that does not open (a secret dropped from the keyring) is compared as stored.
        let v = keyring.open_field(v).map(|c| c.into_owned()).unwrap_or_else(|_| v.clone());
        out.push((plugin, attr, v));
    }
    out
}

/// For a consumer (`credential` is `None`) or one of its credentials about to be written with
/// `obj`: the error to answer when another consumer or credential already holds one of its
/// lookup attributes. A consumer never conflicts with itself or its own credentials; a
/// credential only not with itself.
pub(crate) async fn check(
    admin: &Admin,
    username: &str,
    credential: Option<&str>,
    obj: &Map<String, Value>,
) -> Result<(), Reply> {
    let Some(Value::Object(plugins)) = obj.get("plugins") else { return Ok(()) };
    let wanted = unique_values(&admin.keyring, plugins);
    if wanted.is_empty() {
        return Ok(());
    }
    let dir = Resource::Consumers.dir(&admin.prefix, None);
    let (kvs, _) = admin.store.list(&dir).await.map_err(reply::store_down)?;
    for kv in kvs {
        let rest = &kv.key[dir.len()..];
        let (owner, owner_credential) = match rest.split_once("/credentials/") {
            Some((u, c)) => (u, Some(c)),
            None => (rest, None),
        };
        let is_self = match credential {
            Some(c) => owner == username && owner_credential == Some(c),
            None => owner == username,
        };
        if is_self {
            continue;
        }
        let Ok(value) = serde_json::from_slice::<Value>(&kv.value) else { continue };
        let Some(Value::Object(theirs)) = value.get("plugins") else { continue };
        for (plugin, attr, held) in unique_values(&admin.keyring, theirs) {
            if wanted.iter().any(|(p, _, v)| *p == plugin && *v == held) {
                let owner_desc = match owner_credential {
                    Some(c) => format!("credential: {c} of consumer: {owner}"),
                    None => format!("consumer: {owner}"),
                };
                let msg = format!("duplicate {attr} of plugin {plugin} found with {owner_desc}");
                return Err(reply::error(http::StatusCode::BAD_REQUEST, msg));
            }
        }
    }
    Ok(())
}
