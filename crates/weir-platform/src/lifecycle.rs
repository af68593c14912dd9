//! A function's versions after its first save: the history of each function in each
//! environment, promotion from one environment to the next, rollback to a version of the
//! history, comparison of two functions, and the record of every promotion and rollback.
//!
//! Keys, beside the live partition (which the data plane watches) so that none of this
//! recompiles a gateway's functions:
//! - `{prefix}/platform/history/{gid}/{env}/{name}/{version:010}`: one version, as saved;
//! - `{prefix}/platform/deployments/{gid}/{ms:013}-{random}`: one promotion or rollback, the
//!   last `platform.deployments_limit` kept.
//!
//! Every publication (save, promotion, rollback) is one transaction holding the function's new
//! document, its history entry, the history entry that falls out of the window and, for a
//! promotion or rollback, its deployment record, and the gateway's quota record (`quota.rs`);
//! it is guarded by the revisions of the function it replaces and of that record, so
//! concurrent publications of one function serialize and a crash leaves either all of it or
//! none.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use weir_core::error::ErrorKind;
use weir_functions::live::{FunctionDoc, Origin, function_key};
use weir_store::{Compare, Op, Txn, TxnOutcome};

use crate::Platform;
use crate::api::{Reply, bad_input, body, failure, json, not_found, store_down};
use crate::functions::{ShownSource, shown};
use crate::model::ENVIRONMENTS;
use crate::quota::Delta;
use crate::tokens::{Caller, now_rfc3339};

/// Attempts at a publication whose function changes meanwhile before giving up.
const ATTEMPTS: usize = 32;

/// What a history entry records a version was made by.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Save,
    Promotion,
    Rollback,
}

/// One version of a function, as stored in its history and shown by `history/{version}`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HistoryEntry {
    pub version: u64,
    pub kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub semver: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changelog: Option<String>,
    pub source: ShownSource,
    pub methods: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub tags: Vec<String>,
    pub plugins: Map<String, Value>,
    /// Who saved it: `token:{id}` or `admin:{key name}`.
    pub saved_by: String,
    /// When (RFC 3339).
    pub saved_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promoted_from: Option<Origin>,
    /// For a rollback: the version whose source it restored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<u64>,
}

impl HistoryEntry {
    fn of(doc: &FunctionDoc, kind: Kind, rolled_back_to: Option<u64>) -> HistoryEntry {
        HistoryEntry {
            version: doc.version,
            kind,
            semver: doc.semver.clone(),
            changelog: doc.changelog.clone(),
            source: ShownSource { files: doc.files.clone(), entrypoint: doc.entrypoint.clone() },
            methods: doc.methods.clone(),
            description: doc.description.clone(),
            tags: doc.tags.clone(),
            plugins: doc.plugins.clone(),
            saved_by: doc.updated_by.clone(),
            saved_at: doc.updated_at.clone(),
            promoted_from: doc.promoted_from.clone(),
            rolled_back_to,
        }
    }

    /// The entry as `history` lists it: without its source.
    fn listed(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("a history entry serializes");
        v.as_object_mut().map(|o| o.remove("source"));
        v
    }
}

/// A promotion or a rollback.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Deployment {
    pub deployment_id: String,
    pub kind: Kind,
    /// The bare name (`user/me`).
    pub function: String,
    pub from: String,
    pub to: String,
    pub source_version: u64,
    pub target_version: u64,
    pub by: String,
    pub at: String,
    /// The changelog given with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Deployment {
    /// The record of publishing `doc` from version `source_version` of environment `from`.
    fn of(kind: Kind, from: &str, source_version: u64, doc: &FunctionDoc) -> Deployment {
        Deployment {
            deployment_id: format!("{:013}-{:08x}", time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000, fastrand::u32(..)),
            kind,
            function: doc.name.clone(),
            from: from.to_string(),
            to: doc.environment.clone(),
            source_version,
            target_version: doc.version,
            by: doc.updated_by.clone(),
            at: doc.updated_at.clone(),
            note: doc.changelog.clone(),
        }
    }
}

/// `POST .../functions/{fn}/deploy-to-stage`.
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeployInput {
    #[schemars(regex(pattern = "^(dev|staging|prod)$"))]
    pub target_stage: String,
    #[schemars(length(max = 64))]
    pub semver: Option<String>,
    #[schemars(length(max = 4000))]
    pub changelog: Option<String>,
}

/// `POST .../functions/{fn}/rollback`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackInput {
    #[schemars(range(min = 1))]
    pub version: u64,
    #[schemars(length(max = 4000))]
    pub changelog: Option<String>,
}

/// What a promotion or rollback answers.
#[derive(Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Deployed {
    pub function: crate::functions::Shown,
    pub deployment: Deployment,
}

/// One line of a file's diff.
#[derive(Serialize, JsonSchema, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiffLine {
    /// `equal`, `delete` (only in the source) or `insert` (only in the target).
    pub op: &'static str,
    /// Its number in the source (for `equal` and `delete`) and in the target (`equal`, `insert`), from 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_line: Option<usize>,
    pub text: String,
}

/// A file of the two functions compared.
#[derive(Serialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct FileDiff {
    pub file: String,
    /// `same`, `changed`, `added` (only in the target) or `removed` (only in the source).
    pub status: &'static str,
    pub lines: Vec<DiffLine>,
    /// The file's lines were left out: the comparison already holds `DIFF_LINES` lines.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub omitted: bool,
}

/// The most lines one comparison answers with, over all its files; and the longest it looks
/// for the shortest diff of one file before it answers with a coarser one.
const DIFF_LINES: usize = 20_000;
const DIFF_TIME: std::time::Duration = std::time::Duration::from_millis(200);

/// The line diff of `a` (source) against `b` (target).
pub fn diff_lines(a: &str, b: &str) -> Vec<DiffLine> {
    let diff = similar::TextDiff::configure().deadline(std::time::Instant::now() + DIFF_TIME).diff_lines(a, b);
    diff.iter_all_changes()
        .map(|c| DiffLine {
            op: match c.tag() {
                similar::ChangeTag::Equal => "equal",
                similar::ChangeTag::Delete => "delete",
                similar::ChangeTag::Insert => "insert",
            },
            source_line: c.old_index().map(|i| i + 1),
            target_line: c.new_index().map(|i| i + 1),
            text: c.value().strip_suffix('\n').unwrap_or(c.value()).to_string(),
        })
        .collect()
}

/// Every file of either side with its diff, in name order; past `DIFF_LINES` lines in all, the
/// files left have their status only.
pub fn diff_files(source: &BTreeMap<String, String>, target: &BTreeMap<String, String>) -> Vec<FileDiff> {
    let mut names: Vec<&String> = source.keys().chain(target.keys()).collect();
    names.sort();
    names.dedup();
    let mut room = DIFF_LINES;
    names
        .into_iter()
        .map(|name| {
            let (a, b) = (source.get(name), target.get(name));
            let status = match (a, b) {
                (Some(a), Some(b)) if a == b => "same",
                (Some(_), Some(_)) => "changed",
                (None, _) => "added",
                (_, None) => "removed",
            };
            let (a, b) = (a.map_or("", String::as_str), b.map_or("", String::as_str));
            // A diff has at most the lines of both sides (as the diff splits them: at a line
            // feed or a lone carriage return; a CR LF counted twice here is an upper bound).
            let most = a.split(['\n', '\r']).count() + b.split(['\n', '\r']).count();
            if most > room {
                room = 0;
                return FileDiff { file: name.clone(), status, lines: Vec::new(), omitted: true };
            }
            let lines = diff_lines(a, b);
            room = room.saturating_sub(lines.len());
            FileDiff { file: name.clone(), status, lines, omitted: false }
        })
        .collect()
}

fn stage(env: &str) -> usize {
    ENVIRONMENTS.iter().position(|e| *e == env).unwrap_or(usize::MAX)
}

impl Platform {
    fn history_dir(&self, gid: &str, env: &str, name: &str) -> String {
        format!("{}/platform/history/{gid}/{env}/{name}/", self.prefix)
    }

    fn history_key(&self, gid: &str, env: &str, name: &str, version: u64) -> String {
        format!("{}{version:010}", self.history_dir(gid, env, name))
    }

    /// The key prefixes of everything this module keeps of gateway `gid`.
    pub(crate) fn lifecycle_prefixes(&self, gid: &str) -> [String; 2] {
        [format!("{}/platform/history/{gid}/", self.prefix), format!("{}/platform/deployments/{gid}/", self.prefix)]
    }

    /// Refuses a publication of `bytes` that gateway `gid`'s pace on this node has no room
    /// for now (`pacing`), with when to come back.
    pub(crate) fn paced(&self, gid: &str, bytes: u64) -> Result<(), Reply> {
        let Err(wait) = self.publishing.check(gid, bytes) else { return Ok(()) };
        let secs = wait.as_secs() + 1;
        let why = format!("this gateway publishes functions faster than the {} bytes a minute a node takes (platform.functions.publish_bytes_per_minute); try again in {secs} s", self.cfg.functions.publish_bytes_per_minute);
        let mut reply = failure(ErrorKind::Quota, why, Vec::new());
        reply.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        Err(reply)
    }

    /// What publishes `doc` as its environment's current version in place of a document of
    /// `old` bytes (none: a new function): the function's document, its history entry, the
    /// deletion of the entry that leaves the window and the gateway's quota record, with the
    /// compare that guards the record, and the bytes it writes (for the gateway's pace, once
    /// written); refused when the gateway's quota would be passed, or its pace.
    pub(crate) async fn publication(&self, gid: &str, doc: &FunctionDoc, kind: Kind, rolled_back_to: Option<u64>, old: Option<u64>) -> Result<(Compare, Vec<Op>, u64), Reply> {
        let sealed = self.sealed(doc);
        let value = Bytes::from(serde_json::to_vec(&sealed).expect("a function serializes"));
        let entry = Bytes::from(serde_json::to_vec(&HistoryEntry::of(&sealed, kind, rolled_back_to)).expect("a history entry serializes"));
        let bytes = (value.len() + entry.len()) as u64;
        self.paced(gid, bytes)?;
        let mut delta = Delta { functions: i64::from(old.is_none()), added: (value.len() + entry.len()) as u64, removed: old.unwrap_or(0) };
        let mut ops = vec![
            Op::Put { key: function_key(&self.prefix, gid, &doc.environment, &doc.name), value },
            Op::Put { key: self.history_key(gid, &doc.environment, &doc.name, doc.version), value: entry },
        ];
        let limit = self.cfg.history_limit.max(1) as u64;
        if doc.version > limit {
            let key = self.history_key(gid, &doc.environment, &doc.name, doc.version - limit);
            // Only publications of this function write or delete its history, and each is
            // guarded by the function's revision: the entry read here is the one deleted.
            if let Some(kv) = self.docs.store.get(&key).await.map_err(store_down)? {
                delta.removed += kv.value.len() as u64;
            }
            ops.push(Op::Delete { key });
        }
        let (compare, counted) = self.counted(gid, delta).await?;
        ops.push(counted);
        Ok((compare, ops, bytes))
    }

    /// The history entries of one function (not of functions whose names extend its own),
    /// oldest first, at most the configured window.
    async fn history_entries(&self, gid: &str, env: &str, name: &str) -> Result<Vec<(String, HistoryEntry)>, Reply> {
        let dir = self.history_dir(gid, env, name);
        let (kvs, _) = self.docs.store.list(&dir).await.map_err(store_down)?;
        let mut entries: Vec<(String, HistoryEntry)> = kvs
            .into_iter()
            .filter(|kv| kv.key[dir.len()..].len() == 10 && kv.key[dir.len()..].bytes().all(|b| b.is_ascii_digit()))
            .filter_map(|kv| {
                let mut entry: HistoryEntry = serde_json::from_slice(&kv.value).ok()?;
                self.docs.open_layer(&mut entry.plugins).ok()?;
                Some((kv.key, entry))
            })
            .collect();
        entries.sort_by_key(|(_, e)| e.version);
        let limit = self.cfg.history_limit.max(1);
        if entries.len() > limit {
            entries.drain(..entries.len() - limit);
        }
        Ok(entries)
    }

    /// The operations that remove a function's history (with the function), and the bytes
    /// they free.
    pub(crate) async fn history_removal(&self, gid: &str, env: &str, name: &str) -> Result<(Vec<Op>, u64), Reply> {
        let dir = self.history_dir(gid, env, name);
        let (kvs, _) = self.docs.store.list(&dir).await.map_err(store_down)?;
        let entries: Vec<_> = kvs.into_iter().filter(|kv| kv.key[dir.len()..].len() == 10 && kv.key[dir.len()..].bytes().all(|b| b.is_ascii_digit())).collect();
        let bytes = entries.iter().map(|kv| kv.value.len() as u64).sum();
        Ok((entries.into_iter().map(|kv| Op::Delete { key: kv.key }).collect(), bytes))
    }

    pub(crate) async fn history(&self, gid: &str, env: &str, name: &str, version: Option<&str>) -> Reply {
        if let Err(r) = self.read_function(gid, env, name).await {
            return r;
        }
        let entries = match self.history_entries(gid, env, name).await {
            Ok(e) => e,
            Err(r) => return r,
        };
        match version {
            None => {
                let list: Vec<Value> = entries.iter().rev().map(|(_, e)| e.listed()).collect();
                json(StatusCode::OK, &json!({"list": list, "total": list.len()}))
            }
            Some(v) => match entries.iter().find(|(_, e)| v.parse::<u64>().is_ok_and(|v| v == e.version)) {
                Some((_, e)) => json(StatusCode::OK, &serde_json::to_value(e).expect("a history entry serializes")),
                None => not_found("version"),
            },
        }
    }

    /// Copies `{env}/{name}` to the target environment as its next version.
    pub(crate) async fn deploy_to_stage(&self, caller: &Caller, gid: &str, env: &str, name: &str, raw: &Bytes) -> Reply {
        let input: DeployInput = match body(raw) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let target = input.target_stage.as_str();
        if target == env {
            return bad_input(vec![format!("targetStage: the function is already in {env}")]);
        }
        if !caller.writes_env(target) {
            return crate::api::refuse(StatusCode::FORBIDDEN, &format!("this token may not deploy to the {target} environment"));
        }
        let gw = match self.docs.get(gid).await {
            Ok(Some((gw, _))) if gw.phase == crate::model::Phase::Deleting => return failure(ErrorKind::Conflict, "the gateway is being deleted", Vec::new()),
            Ok(Some((gw, _))) => gw,
            Ok(None) => return not_found("gateway"),
            Err(e) => return store_down(e),
        };
        if gw.promotion_pipeline.enabled && stage(target) != stage(env) + 1 {
            let message = format!("Cannot deploy from {env} to {target}. Must follow: {}", ENVIRONMENTS.join(" → "));
            return failure(ErrorKind::BadInput, message.clone(), vec![message]);
        }
        for _ in 0..ATTEMPTS {
            let (src, src_rev, _) = match self.read_function(gid, env, name).await {
                Ok(d) => d,
                Err(r) => return r,
            };
            let target_key = function_key(&self.prefix, gid, target, name);
            let (old, old_rev, old_size) = match self.read_optional(gid, target, name).await {
                Ok(Some((d, rev, size))) => (Some(d), rev, Some(size)),
                Ok(None) => (None, 0, None),
                Err(r) => return r,
            };
            let now = now_rfc3339();
            let doc = FunctionDoc {
                environment: target.to_string(),
                version: old.as_ref().map_or(1, |o| o.version + 1),
                semver: input.semver.clone().or_else(|| src.semver.clone()),
                changelog: input.changelog.clone().or_else(|| src.changelog.clone()),
                created_at: old.as_ref().map_or_else(|| now.clone(), |o| o.created_at.clone()),
                updated_at: now,
                updated_by: caller.name(),
                promoted_from: Some(Origin { environment: env.to_string(), version: src.version }),
                ..src.clone()
            };
            if let Err(r) = self.check_function_plugins(&doc.plugins) {
                return r;
            }
            // A pace without room for the source once is refused before the compile.
            if let Err(r) = self.paced(gid, doc.files.values().map(|f| f.len() as u64).sum()) {
                return r;
            }
            // Today's compiler, as a save has: a version stored under older rules that no
            // longer compiles is refused here rather than dropped by every node.
            if let Err(r) = crate::functions::compile(self.functions.get(), gid, &doc.files, &doc.entrypoint).await {
                return r;
            }
            let deployment = Deployment::of(Kind::Promotion, env, src.version, &doc);
            let compares = vec![Compare { key: function_key(&self.prefix, gid, env, name), mod_revision: src_rev }, Compare { key: target_key, mod_revision: old_rev }];
            match self.commit_deployment(gid, compares, &doc, &deployment, None, old_size).await {
                Ok(true) => return deployed(&doc, deployment),
                Ok(false) => continue,
                Err(r) => return r,
            }
        }
        failure(ErrorKind::Conflict, "the function kept changing meanwhile; try again", Vec::new())
    }

    /// Publishes the source of a version of the history as the function's next version.
    pub(crate) async fn rollback(&self, caller: &Caller, gid: &str, env: &str, name: &str, raw: &Bytes) -> Reply {
        let input: RollbackInput = match body(raw) {
            Ok(b) => b,
            Err(r) => return r,
        };
        for _ in 0..ATTEMPTS {
            let (current, rev, current_size) = match self.read_function(gid, env, name).await {
                Ok(d) => d,
                Err(r) => return r,
            };
            let entries = match self.history_entries(gid, env, name).await {
                Ok(e) => e,
                Err(r) => return r,
            };
            let Some((_, old)) = entries.into_iter().find(|(_, e)| e.version == input.version) else {
                return failure(ErrorKind::NotFound, format!("version {} of {env}/{name} is not in its history", input.version), Vec::new());
            };
            let now = now_rfc3339();
            let doc = FunctionDoc {
                files: old.source.files,
                entrypoint: old.source.entrypoint,
                methods: old.methods,
                description: old.description,
                tags: old.tags,
                plugins: old.plugins,
                semver: old.semver,
                changelog: input.changelog.clone().or_else(|| Some(format!("rollback to version {}", input.version))),
                version: current.version + 1,
                updated_at: now,
                updated_by: caller.name(),
                promoted_from: old.promoted_from,
                ..current.clone()
            };
            if let Err(r) = self.check_function_plugins(&doc.plugins) {
                return r;
            }
            // A pace without room for the source once is refused before the compile.
            if let Err(r) = self.paced(gid, doc.files.values().map(|f| f.len() as u64).sum()) {
                return r;
            }
            if let Err(r) = crate::functions::compile(self.functions.get(), gid, &doc.files, &doc.entrypoint).await {
                return r;
            }
            let deployment = Deployment::of(Kind::Rollback, env, input.version, &doc);
            let compares = vec![Compare { key: function_key(&self.prefix, gid, env, name), mod_revision: rev }];
            match self.commit_deployment(gid, compares, &doc, &deployment, Some(input.version), Some(current_size)).await {
                Ok(true) => return deployed(&doc, deployment),
                Ok(false) => continue,
                Err(r) => return r,
            }
        }
        failure(ErrorKind::Conflict, "the function kept changing meanwhile; try again", Vec::new())
    }

    /// Writes a promotion or rollback of `doc` in place of a document of `old` bytes in one
    /// transaction; `false` when a compare failed.
    async fn commit_deployment(&self, gid: &str, mut compares: Vec<Compare>, doc: &FunctionDoc, deployment: &Deployment, rolled_back_to: Option<u64>, old: Option<u64>) -> Result<bool, Reply> {
        let (quota, mut ops, bytes) = self.publication(gid, doc, deployment.kind, rolled_back_to, old).await?;
        compares.push(quota);
        let dir = self.lifecycle_prefixes(gid)[1].clone();
        // The window: the oldest records go in the same transaction. Publications of
        // different functions do not serialize on these keys, so two at once may each drop
        // the same one and leave one record too many, which the next drops.
        let (kept, _) = self.docs.store.list(&dir).await.map_err(store_down)?;
        let over = (kept.len() + 1).saturating_sub(self.cfg.deployments_limit.max(1));
        ops.extend(kept.into_iter().take(over).map(|kv| Op::Delete { key: kv.key }));
        ops.push(Op::Put { key: format!("{dir}{}", deployment.deployment_id), value: Bytes::from(serde_json::to_vec(deployment).expect("a deployment serializes")) });
        match self.docs.store.txn(Txn { compares, ops }).await {
            Ok(TxnOutcome::Committed { .. }) => {
                self.publishing.spend(gid, bytes);
                Ok(true)
            }
            Ok(TxnOutcome::Conflict) => Ok(false),
            Err(e) => Err(store_down(e)),
        }
    }

    /// `GET .../functions/compare?source=dev/x&target=staging/x`.
    pub(crate) async fn compare(&self, gid: &str, query: Option<&str>) -> Reply {
        let side = |which: &str| -> Result<(String, String), String> {
            let raw = query.and_then(|q| weir_core::text::query_param(q, which)).ok_or_else(|| format!("{which}: required, as {{environment}}/{{name}}"))?;
            let full = weir_core::text::percent_decode(raw).into_owned();
            match full.split_once('/') {
                Some((e, n)) if ENVIRONMENTS.contains(&e) && weir_functions::valid_name(n) => Ok((e.to_string(), n.to_string())),
                _ => Err(format!("{which}: {full:?} is not {{dev|staging|prod}}/{{function name}}")),
            }
        };
        let (source, target) = match (side("source"), side("target")) {
            (Ok(s), Ok(t)) => (s, t),
            (s, t) => return bad_input([s.err(), t.err()].into_iter().flatten().collect()),
        };
        // A function that is not there is named; a store that is down or a stored function
        // that cannot be read answers as it does everywhere else.
        let read = |(env, name): (String, String)| async move {
            match self.read_optional(gid, &env, &name).await {
                Ok(Some((d, ..))) => Ok(d),
                Ok(None) => Err(failure(ErrorKind::NotFound, format!("function {env}/{name} not found"), Vec::new())),
                Err(r) => Err(r),
            }
        };
        let a = match read(source).await {
            Ok(d) => d,
            Err(r) => return r,
        };
        let b = match read(target).await {
            Ok(d) => d,
            Err(r) => return r,
        };
        let files = diff_files(&a.files, &b.files);
        let identical = files.iter().all(|f| f.status == "same") && a.entrypoint == b.entrypoint;
        json(StatusCode::OK, &json!({"source": shown(&a), "target": shown(&b), "identical": identical, "files": files}))
    }

    /// `GET /v1/api-gateways/{gid}/deployments?environment=&function=`, newest first.
    pub(crate) async fn deployments(&self, gid: &str, query: Option<&str>) -> Reply {
        if let Err(r) = self.gateway_rev(gid).await {
            return r;
        }
        let param = |k| query.and_then(|q| weir_core::text::query_param(q, k)).map(|v| weir_core::text::percent_decode(v).into_owned());
        let (environment, function) = (param("environment"), param("function"));
        if let Some(e) = &environment
            && !ENVIRONMENTS.contains(&e.as_str())
        {
            return bad_input(vec![format!("environment: {e:?} is not one of {}", ENVIRONMENTS.join(", "))]);
        }
        let dir = self.lifecycle_prefixes(gid)[1].clone();
        match self.docs.store.list(&dir).await {
            Ok((kvs, _)) => {
                let list: Vec<Value> = kvs
                    .iter()
                    .rev()
                    .filter_map(|kv| serde_json::from_slice::<Deployment>(&kv.value).ok())
                    .filter(|d| environment.as_ref().is_none_or(|e| *e == d.to) && function.as_ref().is_none_or(|f| *f == d.function))
                    .map(|d| serde_json::to_value(d).expect("a deployment serializes"))
                    .collect();
                json(StatusCode::OK, &json!({"list": list, "total": list.len()}))
            }
            Err(e) => store_down(e),
        }
    }
}

fn deployed(doc: &FunctionDoc, deployment: Deployment) -> Reply {
    let function = crate::functions::shown_of(doc);
    json(StatusCode::OK, &serde_json::to_value(Deployed { function, deployment }).expect("a deployment serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A platform on an embedded store, with gateway `g` and, written straight to the store as
    /// if saved under older rules, `dev/a` at version 2 whose history holds version 1 of
    /// `old_code`, and whose own source is `code`.
    async fn stored(dir: &std::path::Path, code: &str, old_code: &str) -> std::sync::Arc<crate::Platform> {
        let store = std::sync::Arc::new(weir_store::EmbeddedStore::open(dir).unwrap());
        let keyring = std::sync::Arc::new(weir_tls::Keyring::new(&["a secret for this test".to_string()]));
        let p = crate::Platform::new(crate::PlatformConfig::default(), store, "/apisix", std::sync::Arc::new(weir_catalog::Catalog::apisix()), std::sync::Arc::new(weir_plugins::registry()), keyring);
        let mut gw: crate::model::Gateway = serde_json::from_value(json!({
            "gatewayId": "g", "name": "g", "plugins": {}, "customDomains": [], "promotionPipeline": {"enabled": false},
            "state": "Running", "phase": "Started", "environments": [], "reason": null, "createdAt": 0, "updatedAt": 0,
            "lockedAt": null, "lockedBy": null, "generation": 1, "renderedGeneration": 1, "phaseSince": 0, "attempts": 0, "retryAt": 0
        }))
        .unwrap();
        gw.environments = ENVIRONMENTS.iter().map(|e| crate::model::Environment::new(e)).collect();
        p.docs.store.put(&p.docs.key("g"), p.docs.encode(&gw)).await.unwrap();
        let doc = |version: u64, code: &str| FunctionDoc {
            name: "a".into(),
            environment: "dev".into(),
            files: BTreeMap::from([("index.ts".to_string(), code.to_string())]),
            entrypoint: "index.ts".into(),
            methods: Vec::new(),
            description: None,
            tags: Vec::new(),
            plugins: Map::new(),
            version,
            semver: None,
            changelog: None,
            created_at: now_rfc3339(),
            updated_at: now_rfc3339(),
            updated_by: "admin:test".into(),
            promoted_from: None,
        };
        let entry = HistoryEntry::of(&doc(1, old_code), Kind::Save, None);
        p.docs.store.put(&format!("{}{:010}", p.history_dir("g", "dev", "a"), 1), Bytes::from(serde_json::to_vec(&entry).unwrap())).await.unwrap();
        p.docs.store.put(&function_key("/apisix", "g", "dev", "a"), Bytes::from(serde_json::to_vec(&doc(2, code)).unwrap())).await.unwrap();
        p
    }

    #[tokio::test]
    async fn a_version_that_no_longer_compiles_is_neither_promoted_nor_rolled_back_to() {
        // Nested deeper than today's compiler takes.
        let deep = format!("export default () => {}1{};", "(".repeat(1001), ")".repeat(1001));
        let good = "export default () => 'ok';";
        let admin = Caller::Admin("test".into());
        let dir = tempfile::tempdir().unwrap();
        let p = stored(dir.path(), good, &deep).await;
        let before = p.docs.store.get(&function_key("/apisix", "g", "dev", "a")).await.unwrap().unwrap();
        let r = p.rollback(&admin, "g", "dev", "a", &Bytes::from_static(br#"{"version": 1}"#)).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let after = p.docs.store.get(&function_key("/apisix", "g", "dev", "a")).await.unwrap().unwrap();
        assert_eq!((after.value, after.mod_revision), (before.value, before.mod_revision), "nothing changed");

        let dir = tempfile::tempdir().unwrap();
        let p = stored(dir.path(), &deep, good).await;
        let r = p.deploy_to_stage(&admin, "g", "dev", "a", &Bytes::from_static(br#"{"targetStage": "staging"}"#)).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(p.docs.store.get(&function_key("/apisix", "g", "staging", "a")).await.unwrap().is_none(), "nothing promoted");
        // What compiles goes through both ways.
        let r = p.rollback(&admin, "g", "dev", "a", &Bytes::from_static(br#"{"version": 1}"#)).await;
        assert_eq!(r.status(), StatusCode::OK);
        let r = p.deploy_to_stage(&admin, "g", "dev", "a", &Bytes::from_static(br#"{"targetStage": "staging"}"#)).await;
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[test]
    fn a_line_diff_numbers_both_sides() {
        let d = diff_lines("a\nb\nc\n", "a\nB\nc\nd\n");
        let ops: Vec<(&str, Option<usize>, Option<usize>, &str)> = d.iter().map(|l| (l.op, l.source_line, l.target_line, l.text.as_str())).collect();
        assert_eq!(ops, [("equal", Some(1), Some(1), "a"), ("delete", Some(2), None, "b"), ("insert", None, Some(2), "B"), ("equal", Some(3), Some(3), "c"), ("insert", None, Some(4), "d")]);
    }

    #[test]
    fn files_on_one_side_only_are_added_or_removed() {
        let a = BTreeMap::from([("index.ts".to_string(), "x\n".to_string()), ("old.ts".to_string(), "o\n".to_string())]);
        let b = BTreeMap::from([("index.ts".to_string(), "x\n".to_string()), ("new.ts".to_string(), "n\n".to_string())]);
        let status: Vec<(String, &str)> = diff_files(&a, &b).into_iter().map(|f| (f.file, f.status)).collect();
        assert_eq!(status, [("index.ts".to_string(), "same"), ("new.ts".to_string(), "added"), ("old.ts".to_string(), "removed")]);
    }

    #[test]
    fn a_comparison_answers_a_bounded_number_of_lines() {
        // Two large files: the first fits, the second is left out, the small third too (the
        // room is gone once a file did not fit, so the files shown are a prefix by name).
        let lines = |n: usize, tag: &str| (0..n).map(|i| format!("{tag}{i}\n")).collect::<String>();
        let a = BTreeMap::from([("a.ts".to_string(), lines(6000, "x")), ("b.ts".to_string(), lines(9000, "y")), ("c.ts".to_string(), "c\n".to_string())]);
        let b = BTreeMap::from([("a.ts".to_string(), lines(6000, "z")), ("b.ts".to_string(), lines(9000, "w")), ("c.ts".to_string(), "d\n".to_string())]);
        let files = diff_files(&a, &b);
        let shown: Vec<(&str, usize, bool)> = files.iter().map(|f| (f.file.as_str(), f.lines.len(), f.omitted)).collect();
        assert_eq!(shown, [("a.ts", 12_000, false), ("b.ts", 0, true), ("c.ts", 0, true)]);
        // Lines ended by a lone carriage return are lines to the diff too.
        let cr = |tag: &str| format!("{tag}\r").repeat(15_000);
        let a = BTreeMap::from([("a.ts".to_string(), cr("a")), ("b.ts".to_string(), cr("c"))]);
        let b = BTreeMap::from([("a.ts".to_string(), cr("b")), ("b.ts".to_string(), cr("d"))]);
        let shown: Vec<(usize, bool)> = diff_files(&a, &b).iter().map(|f| (f.lines.len(), f.omitted)).collect();
        assert_eq!(shown, [(0, true), (0, true)]);
        // Long and wholly different: the shortest diff is not searched for past its time, and
        // what comes back still turns one side into the other.
        // (Without the deadline this diff runs for hours.)
        let (x, y) = (lines(200_000, "p"), lines(200_000, "q"));
        let d = diff_lines(&x, &y);
        assert_eq!(d.iter().filter(|l| l.op != "insert").count(), 200_000);
        assert_eq!(d.iter().filter(|l| l.op != "delete").count(), 200_000);
    }

    #[test]
    fn stages_follow_the_pipeline() {
        assert_eq!((stage("dev"), stage("staging"), stage("prod")), (0, 1, 2));
        assert_eq!(stage("qa"), usize::MAX);
    }
}
