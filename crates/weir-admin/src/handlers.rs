//! Resource handlers: GET (one or list), PUT, POST, PATCH, DELETE, with APISIX's checks,
//! messages and envelopes.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::request::Parts;
use http::{Method, StatusCode};
use serde_json::{Map, Value, json};
use weir_catalog::{PluginSlot, Registered, sealing};
use weir_core::error::ErrorKind;
use weir_core::model::id_text;
use weir_core::schema;
use weir_core::text::{percent_decode, query_param};
use weir_store::{Compare, KeyValue, Op, Txn, TxnOutcome};

use crate::Admin;
use crate::auth;
use crate::auth_keys;
use crate::reply::{self, Reply};

/// How often a write whose inputs changed underneath it is re-run before giving up.
const CAS_ATTEMPTS: usize = 16;

/// The object a request addresses.
struct Target<'a> {
    kind: &'a Registered,
    /// The id of the object holding this one, for a kind held by another (a credential's
    /// consumer), with the holder's kind.
    parent: Option<(&'a Registered, &'a str)>,
    id: Option<&'a str>,
    /// For `PATCH /routes/1/plugins/x`: `plugins/x`.
    sub_path: Vec<&'a str>,
}

/// The answer to a call without a valid key for what it asks, on a path the API serves;
/// `None` when the call may go on. Checked before a body is read.
pub fn refuse_unauthorized(admin: &Admin, parts: &Parts) -> Option<Reply> {
    let path = parts.uri.path();
    if !(path.starts_with("/apisix/admin") || path.starts_with("/v1/")) {
        return None;
    }
    let description = auth::check(&admin.keys, parts).err()?;
    Some(unauthorized(description))
}

pub fn unauthorized(description: &str) -> Reply {
    tracing::debug!(%description, "admin request refused");
    reply::json(StatusCode::UNAUTHORIZED, &json!({"error_msg": "failed to check token", "description": description}))
}

/// Answers a call whose key `Admin::handle` has already checked (`refuse_unauthorized`).
pub async fn dispatch(admin: &Admin, parts: Parts, body: Bytes) -> Reply {
    let path = parts.uri.path().to_string();
    let control = path.strip_prefix("/v1/");
    let Some(rest) = path.strip_prefix("/apisix/admin").or(control) else {
        return reply::error(StatusCode::NOT_FOUND, "not found");
    };
    if control.is_some() {
        if parts.method != Method::GET {
            return reply::error(StatusCode::METHOD_NOT_ALLOWED, format!("not supported `{}` method", parts.method));
        }
        return match admin.control.as_ref().and_then(|c| c.get(rest)) {
            Some((status, value)) => reply::json(status, &value),
            None => reply::error(StatusCode::NOT_FOUND, "not found"),
        };
    }
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    // Deeper than any object may nest: refused before anything is built from it.
    if segs.len() > schema::MAX_DEPTH {
        return reply::error(StatusCode::BAD_REQUEST, format!("the path is deeper than {} segments", schema::MAX_DEPTH));
    }
    if segs.is_empty() {
        return if parts.method == Method::HEAD {
            reply::empty(StatusCode::OK)
        } else {
            reply::error(StatusCode::NOT_FOUND, "not found")
        };
    }
    let body = match parse_body(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    match segs[0] {
        "plugins" => return plugins(admin, &parts.method, &segs[1..], parts.uri.query().unwrap_or("")),
        "schema" => return schema_endpoints(admin, &parts.method, &segs[1..], body.as_ref()),
        _ => {}
    }
    let Some(kind) = admin.kinds.get(segs[0]).filter(|k| k.parent().is_none()) else {
        return reply::error(StatusCode::NOT_FOUND, format!("Unsupported resource type: {}", segs[0]));
    };
    let child = segs.get(2).and_then(|name| admin.kinds.child(kind.name(), name));
    let target = match child {
        Some(child) => Target { kind: child, parent: Some((kind, segs[1])), id: segs.get(3).copied(), sub_path: segs.get(4..).map(|s| s.to_vec()).unwrap_or_default() },
        None => Target { kind, parent: None, id: segs.get(1).copied(), sub_path: segs.get(2..).map(|s| s.to_vec()).unwrap_or_default() },
    };
    let query = parts.uri.query().unwrap_or("");
    let method = parts.method.clone();
    let unsupported = |m: &str| {
        reply::error(StatusCode::METHOD_NOT_ALLOWED, format!("not supported `{m}` method for {}", target.kind.noun()))
    };
    let _turn = match method {
        Method::PUT | Method::POST | Method::PATCH | Method::DELETE => Some(admin.writes.lock().await),
        _ => None,
    };
    if method != Method::GET
        && let Some(refusal) = refuse_managed(admin, &target, body.as_ref()).await
    {
        return refusal;
    }
    match method {
        Method::GET => get(admin, &target, query).await,
        Method::PUT => put(admin, &target, body).await,
        Method::POST if target.kind.allows_post() => post(admin, &target, body).await,
        Method::POST => unsupported("POST"),
        Method::PATCH if target.kind.allows_patch() => patch(admin, &target, body).await,
        Method::PATCH => unsupported("PATCH"),
        Method::DELETE => delete(admin, &target, query).await,
        _ => reply::error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Objects the platform generates carry its label; the Admin API neither changes them nor
/// makes new ones that claim to be its.
async fn refuse_managed(admin: &Admin, t: &Target<'_>, body: Option<&Value>) -> Option<Reply> {
    // The id a PUT to the collection gives in its body counts as well as the path's.
    let id = t.id.or_else(|| body.and_then(|b| b.get("id")).and_then(Value::as_str));
    if id.is_some_and(|id| id.starts_with(weir_catalog::MANAGED_ID_PREFIX)) && t.parent.is_none() {
        let id = id.unwrap_or_default();
        let owner = id.trim_start_matches(weir_catalog::MANAGED_ID_PREFIX).split('.').next().unwrap_or_default();
        return Some(reply::failure(
            ErrorKind::BadInput,
            format!("ids starting with {} are the platform's: change {} {id} through /v1/api-gateways/{owner}", weir_catalog::MANAGED_ID_PREFIX, t.kind.noun()),
        ));
    }
    let stored = match id {
        Some(id) => match admin.store.get(&t.key(&admin.prefix, id)).await {
            Ok(Some(kv)) => serde_json::from_slice::<Value>(&kv.value).ok().as_ref().and_then(weir_catalog::managed_by).map(str::to_string),
            Ok(None) => None,
            Err(e) => return Some(reply::store_down(e)),
        },
        None => None,
    };
    let owner = stored.or_else(|| body.and_then(weir_catalog::managed_by).map(str::to_string))?;
    Some(reply::failure(
        ErrorKind::BadInput,
        format!("this {} is managed by the platform: change it through /v1/api-gateways/{owner}", t.kind.noun()),
    ))
}

fn parse_body(body: &Bytes) -> Result<Option<Value>, Reply> {
    if body.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| reply::error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}")))
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn decode(s: &str) -> String {
    percent_decode(s).into_owned()
}

/// `?schema_type=consumer` asks for an auth plugin's consumer schema, as APISIX's does.
fn plugins(admin: &Admin, method: &Method, segs: &[&str], query: &str) -> Reply {
    if *method != Method::GET {
        return reply::error(StatusCode::NOT_FOUND, "not found");
    }
    let consumer = query_param(query, "schema_type") == Some("consumer");
    match segs {
        ["list"] => reply::json(StatusCode::OK, &json!(admin.plugins.names())),
        [name] if consumer => match admin.plugins.consumer_schema(name).or_else(|| admin.plugins.config_schema(name)) {
            Some(s) => reply::json(StatusCode::OK, s),
            None => reply::error(StatusCode::NOT_FOUND, "plugin not found in subsystem http"),
        },
        [name] => match admin.plugins.config_schema(name) {
            Some(s) => reply::json(StatusCode::OK, s),
            None => reply::error(StatusCode::NOT_FOUND, "plugin not found in subsystem http"),
        },
        _ => reply::error(StatusCode::NOT_FOUND, "not found"),
    }
}

fn schema_endpoints(admin: &Admin, method: &Method, segs: &[&str], body: Option<&Value>) -> Reply {
    match (method, segs) {
        (&Method::POST, ["validate", name]) => {
            let Some(kind) = admin.kinds.get(name) else {
                return reply::error(StatusCode::NOT_FOUND, format!("Unsupported resource type: {name}"));
            };
            let Some(body) = body else {
                return reply::error(StatusCode::BAD_REQUEST, "missing configurations");
            };
            match admin.kinds.check(kind, body, admin.plugins.as_ref()) {
                Ok(()) => reply::empty(StatusCode::OK),
                Err(errors) => reply::error(StatusCode::BAD_REQUEST, format!("invalid configuration: {}", errors.join("; "))),
            }
        }
        (&Method::GET, ["plugins", name]) => plugins(admin, method, &[name], ""),
        (&Method::GET, [name]) => {
            match admin.kinds.by_schema_name(name) {
                Some(kind) => reply::json(StatusCode::OK, kind.schema()),
                None => reply::error(StatusCode::BAD_REQUEST, format!("not found schema: {name}")),
            }
        }
        _ => reply::error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// The JSON an object is shown as; private keys never leave the store, sealed plugin fields
/// are shown opened.
fn shown_value(admin: &Admin, kind: &Registered, kv: &KeyValue) -> Value {
    let mut v: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
    sealing::show(&admin.keyring, kind.plugins(), &mut v);
    kind.hide(&mut v);
    v
}

fn node(admin: &Admin, kind: &Registered, kv: &KeyValue) -> Value {
    node_of(shown_value(admin, kind, kv), kv)
}

/// An object as the Admin API shows it, around the value already shown.
fn node_of(value: Value, kv: &KeyValue) -> Value {
    json!({
        "key": kv.key,
        "value": value,
        "createdIndex": kv.create_revision,
        "modifiedIndex": kv.mod_revision,
    })
}

/// The longest filter pattern a list takes: a regex's compile cost grows with it.
const MAX_FILTER_PATTERN: usize = 256;

/// A list's `name`, `label`, `uri` and `filter` query parameters, each compiled once per
/// request. Patterns are bounded in length and in compiled size, and the regex engine runs in
/// time linear in the text, so no filter can stall the control plane.
struct Filters {
    name: Option<regex::Regex>,
    label: Option<String>,
    uri: Option<regex::Regex>,
    /// `filter=service_id%3D1&...`: exact matches on the fields a resource allows.
    exact: Vec<(String, String)>,
}

impl Filters {
    fn parse(kind: &Registered, query: &str) -> Result<Filters, String> {
        let pattern = |raw: &str| -> Result<regex::Regex, String> {
            let p = decode(raw);
            if p.len() > MAX_FILTER_PATTERN {
                return Err(format!("invalid filter pattern: longer than {MAX_FILTER_PATTERN} bytes"));
            }
            regex::RegexBuilder::new(&p)
                .size_limit(1 << 20)
                .dfa_size_limit(1 << 20)
                .nest_limit(32)
                .build()
                .map_err(|e| format!("invalid filter pattern: {e}"))
        };
        let allowed = kind.list_filters();
        let exact = query_param(query, "filter")
            .map(|f| {
                decode(f)
                    .split('&')
                    .filter_map(|pair| pair.split_once('='))
                    .filter(|(k, _)| allowed.contains(k))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Filters {
            name: query_param(query, "name").map(pattern).transpose()?,
            label: query_param(query, "label").map(decode),
            uri: query_param(query, "uri").map(pattern).transpose()?,
            exact,
        })
    }

    fn matches(&self, value: &Value) -> bool {
        let text = |v: &Value, re: &regex::Regex| v.as_str().is_some_and(|s| re.is_match(s));
        if let Some(re) = &self.name
            && !text(&value["name"], re)
        {
            return false;
        }
        if let Some(label) = &self.label
            && !value["labels"].as_object().is_some_and(|l| l.contains_key(label))
        {
            return false;
        }
        if let Some(re) = &self.uri {
            let uris = value["uris"].as_array().into_iter().flatten();
            if !text(&value["uri"], re) && !uris.into_iter().any(|u| text(u, re)) {
                return false;
            }
        }
        self.exact.iter().all(|(k, want)| value.get(k).and_then(id_text).as_deref() == Some(want))
    }
}

async fn get(admin: &Admin, t: &Target<'_>, query: &str) -> Reply {
    if let Some((holder, owner)) = t.parent {
        match admin.store.get(&holder.key(&admin.prefix, None, owner)).await {
            Ok(Some(_)) => {}
            Ok(None) => return holder_not_found(holder),
            Err(e) => return reply::store_down(e),
        }
    }
    if let Some(id) = t.id {
        let key = t.key(&admin.prefix, id);
        return match admin.store.get(&key).await {
            Ok(Some(kv)) => reply::json(StatusCode::OK, &node(admin, t.kind, &kv)),
            Ok(None) => reply::not_found(),
            Err(e) => reply::store_down(e),
        };
    }
    let dir = t.kind.dir(&admin.prefix, t.owner());
    let (kvs, _) = match admin.store.list(&dir).await {
        Ok(r) => r,
        Err(e) => return reply::store_down(e),
    };
    let filters = match Filters::parse(t.kind, query) {
        Ok(f) => f,
        Err(e) => return reply::error(StatusCode::BAD_REQUEST, e),
    };
    let mut list = Vec::new();
    for kv in kvs {
        // A consumer's credentials live under its key; they are not consumers.
        if kv.key[dir.len()..].contains('/') {
            continue;
        }
        let value = shown_value(admin, t.kind, &kv);
        if filters.matches(&value) {
            list.push((kv.create_revision, node_of(value, &kv)));
        }
    }
    let total = list.len();
    let page = query_param(query, "page").and_then(|p| p.parse::<usize>().ok());
    let page_size = query_param(query, "page_size").and_then(|p| p.parse::<usize>().ok());
    if let (Some(page), Some(size)) = (page, page_size) {
        if !(10..=500).contains(&size) {
            return reply::error(StatusCode::BAD_REQUEST, "page_size must be between 10 and 500");
        }
        list.sort_by_key(|(created, _)| *created);
        let page = page.max(1);
        list = list.into_iter().skip((page - 1) * size).take(size).collect();
    }
    let list: Vec<Value> = list.into_iter().map(|(_, v)| v).collect();
    reply::json(StatusCode::OK, &json!({"list": list, "total": total}))
}

fn invalid(errors: Vec<String>) -> Reply {
    reply::failure(ErrorKind::BadInput, format!("invalid configuration: {}", errors.join("; ")))
}

/// Checks an object for a write and returns the key it will live at, plus the referenced keys
/// (with the revision they were seen at) that the write must find unchanged.
struct Checked {
    key: String,
    value: Map<String, Value>,
    references: Vec<Compare>,
}

enum IdRule<'a> {
    /// PUT and PATCH: the id comes from the path (or, for PUT, the body).
    Required(Option<&'a str>),
    /// POST: the id is generated; the body must not carry one.
    Generated,
}

async fn check_object(
    admin: &Admin,
    t: &Target<'_>,
    body: Option<Value>,
    id_rule: IdRule<'_>,
    allow_times: bool,
) -> Result<Checked, Reply> {
    let bad = |msg: String| reply::error(StatusCode::BAD_REQUEST, msg);
    let Some(body) = body else { return Err(bad("missing configurations".into())) };
    let Value::Object(mut obj) = body else {
        return Err(invalid(vec!["the configuration must be a JSON object".into()]));
    };
    let kind = t.kind;
    let noun = kind.noun();
    let id: String = match kind.id_field() {
        // Named by the path alone (plugin metadata, by its plugin).
        None => match t.id {
            Some(name) => {
                if let Err(e) = kind.check_id(name, admin.plugins.as_ref()) {
                    return Err(bad(e));
                }
                name.to_string()
            }
            None => return Err(bad(kind.missing_id())),
        },
        Some("id") => match id_rule {
            IdRule::Generated => {
                if obj.contains_key("id") {
                    return Err(bad(format!("wrong {noun} id, do not need it")));
                }
                String::new() // filled in by the caller
            }
            IdRule::Required(path_id) => {
                let body_id = obj.get("id").and_then(id_text);
                let id = match (path_id, &body_id) {
                    (Some(p), _) => p.to_string(),
                    (None, Some(b)) => b.clone(),
                    (None, None) => return Err(bad(kind.missing_id())),
                };
                if body_id.as_ref().is_some_and(|b| *b != id) {
                    return Err(bad(format!("wrong {noun} id")));
                }
                obj.insert("id".into(), Value::String(id.clone()));
                id
            }
        },
        // Named by a field of its own (a consumer by `username`): the path must agree.
        Some(field) => {
            let named = obj.get(field).and_then(Value::as_str).map(str::to_string);
            match (t.id, named) {
                (Some(path), Some(n)) if path != n => return Err(bad(format!("wrong {field}"))),
                (_, Some(n)) => n,
                // The schema check below reports the missing field.
                (_, None) => String::new(),
            }
        }
    };
    if !allow_times {
        for f in ["create_time", "update_time"] {
            if obj.contains_key(f) {
                return Err(bad(format!("the property is forbidden: {f}")));
            }
        }
    }
    // Sealed values are checked in the clear (a PATCH merges onto sealed ones).
    if let Err(e) = kind.open(&mut obj, &admin.keyring) {
        return Err(invalid(vec![e]));
    }
    if let Err(e) = sealing::open(&admin.keyring, kind.plugins(), &mut obj) {
        return Err(invalid(vec![e]));
    }
    let candidate = Value::Object(obj);
    let mut errors = match admin.kinds.check(kind, &candidate, admin.plugins.as_ref()) {
        Ok(()) => Vec::new(),
        Err(e) => e,
    };
    let Value::Object(mut obj) = candidate else { unreachable!("checked above") };
    if errors.is_empty()
        && let Err(e) = kind.seal(&mut obj, &admin.keyring)
    {
        errors.push(e);
    }
    // References: every missing one is reported with the others.
    let mut references = Vec::new();
    if errors.is_empty() {
        for r in kind.references() {
            let Some(ref_id) = r.id_in(&obj) else { continue };
            let Some(target) = admin.kinds.get(r.kind).filter(|k| k.parent().is_none()) else { continue };
            let key = target.key(&admin.prefix, None, &ref_id);
            let what = r.what;
            match admin.store.get(&key).await {
                Ok(Some(kv)) => match r.accept {
                    Some((accept, refusal)) if !serde_json::from_slice::<Value>(&kv.value).is_ok_and(|v| accept(&v)) => {
                        errors.push(format!("failed to fetch {what} id [{ref_id}], {refusal}"));
                    }
                    _ => references.push(Compare { key, mod_revision: kv.mod_revision }),
                },
                Ok(None) => errors.push(format!("failed to fetch {what} id [{ref_id}], response code: 404")),
                Err(e) => return Err(reply::store_down(e)),
            }
        }
        if let Some((holder, owner)) = t.parent {
            let key = holder.key(&admin.prefix, None, owner);
            match admin.store.get(&key).await {
                Ok(Some(kv)) => references.push(Compare { key, mod_revision: kv.mod_revision }),
                Ok(None) => return Err(holder_not_found(holder)),
                Err(e) => return Err(reply::store_down(e)),
            }
        }
    }
    if !errors.is_empty() {
        // Reference errors read as APISIX's, without the "invalid configuration" lead.
        if errors.iter().all(|e| e.starts_with("failed to fetch")) {
            return Err(bad(errors.join("; ")));
        }
        return Err(invalid(errors));
    }
    // An auth key names one consumer: no other consumer or credential may hold it.
    if kind.plugins() == PluginSlot::Consumer {
        match t.parent {
            Some((_, owner)) => auth_keys::check(admin, owner, Some(&id), &obj).await?,
            None => auth_keys::check(admin, &id, None, &obj).await?,
        }
    }
    sealing::seal(&admin.keyring, admin.plugins.as_ref(), kind.plugins(), &mut obj);
    let key = t.key(&admin.prefix, &id);
    Ok(Checked { key, value: obj, references })
}

/// What a call about an object held by a missing one is told ("consumer not found").
fn holder_not_found(holder: &Registered) -> Reply {
    reply::error(StatusCode::NOT_FOUND, format!("{} not found", holder.noun()))
}

impl Target<'_> {
    fn owner(&self) -> Option<&str> {
        self.parent.map(|(_, owner)| owner)
    }

    fn key(&self, prefix: &str, id: &str) -> String {
        self.kind.key(prefix, self.owner(), id)
    }
}

/// Waits before the next compare-and-set after another node's write won: a random pause that
/// grows with each lost attempt (up to 64 ms), so writers contending on one key spread out.
async fn lost_race(attempt: usize) {
    let ceiling_ms = 1u64 << attempt.min(6);
    tokio::time::sleep(std::time::Duration::from_micros(fastrand::u64(0..ceiling_ms * 1000))).await;
}

fn encode(value: &Map<String, Value>) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("JSON values serialize"))
}

fn written(key: &str, kind: &Registered, value: &Map<String, Value>) -> Value {
    let mut shown = Value::Object(value.clone());
    kind.hide(&mut shown);
    json!({"key": key, "value": shown})
}

async fn put(admin: &Admin, t: &Target<'_>, body: Option<Value>) -> Reply {
    for attempt in 0..CAS_ATTEMPTS {
        let Checked { key, mut value, references } =
            match check_object(admin, t, body.clone(), IdRule::Required(t.id), false).await {
                Ok(c) => c,
                Err(r) => return r,
            };
        let prev = match admin.store.get(&key).await {
            Ok(p) => p,
            Err(e) => return reply::store_down(e),
        };
        let now = now();
        let created = prev
            .as_ref()
            .and_then(|p| serde_json::from_slice::<Value>(&p.value).ok())
            .and_then(|v| v.get("create_time").and_then(Value::as_i64))
            .unwrap_or(now);
        value.insert("create_time".into(), json!(created));
        value.insert("update_time".into(), json!(now));
        let mut compares = references;
        compares.push(Compare { key: key.clone(), mod_revision: prev.as_ref().map_or(0, |p| p.mod_revision) });
        let txn = Txn { compares, ops: vec![Op::Put { key: key.clone(), value: encode(&value) }] };
        match admin.store.txn(txn).await {
            Ok(TxnOutcome::Committed { .. }) => {
                let status = if prev.is_some() { StatusCode::OK } else { StatusCode::CREATED };
                return reply::json(status, &written(&key, t.kind, &value));
            }
            Ok(TxnOutcome::Conflict) => lost_race(attempt).await,
            Err(e) => return reply::store_down(e),
        }
    }
    reply::failure(ErrorKind::Conflict, "the object changed while it was being written; try again")
}

async fn post(admin: &Admin, t: &Target<'_>, body: Option<Value>) -> Reply {
    if t.id.is_some() {
        return reply::error(StatusCode::BAD_REQUEST, format!("wrong {} id, do not need it", t.kind.noun()));
    }
    for attempt in 0..CAS_ATTEMPTS {
        let Checked { mut value, references, .. } =
            match check_object(admin, t, body.clone(), IdRule::Generated, false).await {
                Ok(c) => c,
                Err(r) => return r,
            };
        // As APISIX does: the id is a store revision, so ids are unique across every admin
        // node sharing the store.
        let id = match admin.store.put(&format!("{}/gen_id", admin.prefix), Bytes::from_static(b"1")).await {
            Ok((revision, _)) => format!("{revision:020}"),
            Err(e) => return reply::store_down(e),
        };
        let key = t.key(&admin.prefix, &id);
        let now = now();
        value.insert("id".into(), Value::String(id));
        value.insert("create_time".into(), json!(now));
        value.insert("update_time".into(), json!(now));
        let mut compares = references;
        compares.push(Compare { key: key.clone(), mod_revision: 0 });
        let txn = Txn { compares, ops: vec![Op::Put { key: key.clone(), value: encode(&value) }] };
        match admin.store.txn(txn).await {
            Ok(TxnOutcome::Committed { .. }) => return reply::json(StatusCode::CREATED, &written(&key, t.kind, &value)),
            Ok(TxnOutcome::Conflict) => lost_race(attempt).await,
            Err(e) => return reply::store_down(e),
        }
    }
    reply::failure(ErrorKind::Conflict, "the object changed while it was being written; try again")
}

/// JSON merge patch (RFC 7396): objects merge recursively, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p,
    }
}

/// Replaces the value at `path` (object keys, or array indexes), creating objects on the way.
fn set_sub_path(target: &mut Value, path: &[&str], value: Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else { return Err("empty sub path".into()) };
    let mut at = target;
    for seg in parents {
        at = match at {
            Value::Object(o) => o.entry(seg.to_string()).or_insert_with(|| Value::Object(Map::new())),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)).ok_or_else(|| format!("invalid sub path: {seg}"))?,
            _ => return Err(format!("invalid sub path: {seg}")),
        };
    }
    match at {
        Value::Object(o) => {
            o.insert(last.to_string(), value);
        }
        Value::Array(a) => {
            let slot = last.parse::<usize>().ok().and_then(|i| a.get_mut(i)).ok_or_else(|| format!("invalid sub path: {last}"))?;
            *slot = value;
        }
        _ => return Err(format!("invalid sub path: {last}")),
    }
    Ok(())
}

async fn patch(admin: &Admin, t: &Target<'_>, body: Option<Value>) -> Reply {
    let Some(id) = t.id else {
        return reply::error(StatusCode::BAD_REQUEST, format!("missing {} id", t.kind.noun()));
    };
    let Some(body) = body else {
        return reply::error(StatusCode::BAD_REQUEST, "missing new configuration");
    };
    if t.sub_path.is_empty() && !body.is_object() {
        return reply::error(StatusCode::BAD_REQUEST, "invalid configuration");
    }
    let key = t.key(&admin.prefix, id);
    // Read, merge, check, compare-and-set; if someone else wrote in between, merge onto theirs.
    for attempt in 0..CAS_ATTEMPTS {
        let old = match admin.store.get(&key).await {
            Ok(Some(kv)) => kv,
            Ok(None) => return reply::not_found(),
            Err(e) => return reply::store_down(e),
        };
        let mut value: Value = match serde_json::from_slice(&old.value) {
            Ok(v) => v,
            Err(e) => return reply::failure(ErrorKind::Internal, format!("stored object is unreadable: {e}")),
        };
        let sets_update_time = t.sub_path.is_empty() && body.get("update_time").is_some();
        if t.sub_path.is_empty() {
            merge(&mut value, body.clone());
        } else if let Err(e) = set_sub_path(&mut value, &t.sub_path, body.clone()) {
            return reply::error(StatusCode::BAD_REQUEST, e);
        }
        if !sets_update_time {
            value["update_time"] = json!(now());
        }
        let Checked { key: checked_key, value, mut references } =
            match check_object(admin, t, Some(value), IdRule::Required(Some(id)), true).await {
                Ok(c) => c,
                Err(r) => return r,
            };
        debug_assert_eq!(checked_key, key);
        references.push(Compare { key: key.clone(), mod_revision: old.mod_revision });
        let txn = Txn { compares: references, ops: vec![Op::Put { key: key.clone(), value: encode(&value) }] };
        match admin.store.txn(txn).await {
            Ok(TxnOutcome::Committed { .. }) => return reply::json(StatusCode::OK, &written(&key, t.kind, &value)),
            Ok(TxnOutcome::Conflict) => lost_race(attempt).await,
            Err(e) => return reply::store_down(e),
        }
    }
    reply::failure(ErrorKind::Conflict, "the object changed while it was being written; try again")
}

/// Who still uses the object about to be deleted, as APISIX words it: any object of any kind
/// whose reference holds deletes back ([`weir_catalog::Reference::holds`]).
async fn still_referenced(admin: &Admin, kind: &Registered, id: &str) -> Result<Option<String>, Reply> {
    for (user, r) in admin.kinds.holders(kind.name()) {
        // A kind held by another lives under its holders: all of them are listed.
        let dir = match user.parent() {
            Some(holder) => format!("{}/{holder}/", admin.prefix),
            None => user.dir(&admin.prefix, None),
        };
        let (kvs, _) = admin.store.list(&dir).await.map_err(reply::store_down)?;
        for kv in kvs {
            if admin.kinds.from_key(&admin.prefix, &kv.key).is_none_or(|(k, _, _)| k.name() != user.name()) {
                continue;
            }
            let Ok(v) = serde_json::from_slice::<Value>(&kv.value) else { continue };
            if v.as_object().and_then(|o| r.id_in(o)).as_deref() == Some(id) {
                let user_id = &kv.key[dir.len()..];
                let lead = r.holds.unwrap_or_default();
                return Ok(Some(format!("{lead} [{user_id}] is still using it now")));
            }
        }
    }
    Ok(None)
}

async fn delete(admin: &Admin, t: &Target<'_>, query: &str) -> Reply {
    let Some(id) = t.id else {
        return reply::error(StatusCode::BAD_REQUEST, format!("missing {} id", t.kind.noun()));
    };
    if query_param(query, "force") != Some("true") {
        match still_referenced(admin, t.kind, id).await {
            Ok(Some(msg)) => return reply::error(StatusCode::BAD_REQUEST, msg),
            Ok(None) => {}
            Err(r) => return r,
        }
    }
    let key = t.key(&admin.prefix, id);
    let mut ops = vec![Op::Delete { key: key.clone() }];
    // What the object holds goes with it (a consumer's credentials).
    if t.parent.is_none() {
        for child in admin.kinds.children(t.kind.name()) {
            ops.push(Op::DeletePrefix { prefix: child.dir(&admin.prefix, Some(id)) });
        }
    }
    match admin.store.txn(Txn { compares: Vec::new(), ops }).await {
        Ok(TxnOutcome::Committed { prev, .. }) if prev.first().is_some_and(Option::is_some) => {
            reply::json(StatusCode::OK, &json!({"deleted": "1", "key": key}))
        }
        Ok(_) => reply::not_found(),
        Err(e) => reply::store_down(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "l": [1, 2], "x": 1});
        merge(&mut v, json!({"a": {"b": 9}, "l": [3], "x": null, "n": true}));
        assert_eq!(v, json!({"a": {"b": 9, "c": 2}, "l": [3], "n": true}));
    }

    #[test]
    fn sub_path() {
        let mut v = json!({"upstream": {"nodes": {"a:1": 1}}, "methods": ["GET"]});
        set_sub_path(&mut v, &["upstream", "nodes"], json!({"b:2": 2})).unwrap();
        set_sub_path(&mut v, &["methods", "0"], json!("POST")).unwrap();
        assert_eq!(v, json!({"upstream": {"nodes": {"b:2": 2}}, "methods": ["POST"]}));
        assert!(set_sub_path(&mut v, &["methods", "5"], json!(1)).is_err());
    }
}
