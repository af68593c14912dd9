//! One caller, one consumer: the attribute an auth plugin finds its consumer by (a key-auth
//! `key`, a basic-auth `username`, a jwt-auth `key`, an hmac-auth `key_id`) may be held by only
//! one consumer or credential. A write that would give it to a second one is refused, with
//! APISIX's message (`check_duplicate_key` in `apisix/consumer.lua`); without this, whichever
//! the data plane loaded last would silently take the key over.
//!
//! The check reads every consumer and credential in the store. Writes from one node take turns,
//! so on one node it is exact; between nodes sharing a store it is best-effort, as APISIX's is.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::{Map, Value};
use weir_core::Resource;
use weir_tls::Keyring;

use crate::Admin;
use crate::reply::{self, Reply};

/// Auth plugin → the attribute callers are looked up by.
const UNIQUE: [(&str, &str); 4] = [("key-auth", "key"), ("basic-auth", "username"), ("jwt-auth", "key"), ("hmac-auth", "key_id")];

/// A lookup attribute an object holds: plugin, attribute, value in the clear.
type Held = Vec<(&'static str, &'static str, String)>;

/// What each consumer and credential holds, by store key, as of the `mod_revision` it was read
/// at: a write reads the store's list, but parses and opens only what changed since the last.
#[derive(Default)]
pub(crate) struct Index(Mutex<HashMap<String, (i64, Held)>>);

/// The values `plugins` holds for [`UNIQUE`] attributes, opened if sealed.
fn unique_values(keyring: &Keyring, plugins: &Map<String, Value>) -> Held {
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
    let mut index = admin.auth_keys.0.lock().unwrap_or_else(|e| e.into_inner());
    if index.len() > kvs.len() {
        let listed: std::collections::HashSet<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
        index.retain(|k, _| listed.contains(k.as_str()));
    }
    for kv in &kvs {
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
        let held = match index.get(&kv.key) {
            Some((revision, held)) if *revision == kv.mod_revision => held,
            _ => {
                let held = match serde_json::from_slice::<Value>(&kv.value) {
                    Ok(value) => match value.get("plugins") {
                        Some(Value::Object(theirs)) => unique_values(&admin.keyring, theirs),
                        _ => Vec::new(),
                    },
                    Err(_) => Vec::new(),
                };
                &index.entry(kv.key.clone()).insert_entry((kv.mod_revision, held)).into_mut().1
            }
        };
        for (plugin, attr, held) in held {
            if wanted.iter().any(|(p, _, v)| p == plugin && v == held) {
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
