//! The declarative store: one YAML (or JSON) file in APISIX's standalone layout
//! (`routes: [...]`, `upstreams: [...]`, …), read whole, checked whole, and followed for
//! changes. An edit that does not parse or check is refused with every error listed, and the
//! last good config stays. Writes are refused: the file is the source of truth.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use weir_catalog::Catalog;
use weir_core::schema::PluginCatalog;

use crate::{Batch, Event, EventKind, KeyValue, Result, Store, StoreError, Txn, TxnOutcome, WatchMessage};

/// How often the file is looked at for changes.
const POLL: Duration = Duration::from_millis(200);

/// A declarative file checked and laid out as store keys.
pub type Objects = BTreeMap<String, Bytes>;

/// Reads and checks a declarative file: every object through the catalog's door, as the Admin
/// API checks it. The sections are the catalog's declarative kinds, in APISIX's top-level
/// names. Errors name the section, the object's position and id (and, for syntax, the line).
pub fn load(text: &str, is_json: bool, prefix: &str, catalog: &Catalog, plugins: &dyn PluginCatalog) -> std::result::Result<Objects, Vec<String>> {
    // APISIX's files end with a `#END` line; it is a comment to YAML.
    let doc: Value = if is_json {
        serde_json::from_str(text).map_err(|e| vec![format!("line {}: {e}", e.line())])?
    } else {
        serde_saphyr::from_str(text).map_err(|e| vec![e.to_string()])?
    };
    let Some(top) = doc.as_object() else {
        return Err(vec!["the file must be a mapping of resources (routes, upstreams, …)".into()]);
    };
    let mut errors = Vec::new();
    let mut out = Objects::new();
    for (name, items) in top {
        // Where each item of the section starts, to name its line in errors (YAML only).
        let lines = if is_json { Vec::new() } else { item_lines(text, name) };
        let at = |i: usize| lines.get(i).map_or(String::new(), |l| format!(" (line {l})"));
        let Some(kind) = catalog.kinds().find(|k| k.declarative() && k.parent().is_none() && k.name() == name) else {
            errors.push(format!("{name}: unknown section"));
            continue;
        };
        let Some(items) = items.as_array() else {
            errors.push(format!("{name}: a list is expected"));
            continue;
        };
        for (i, item) in items.iter().enumerate() {
            // A kind named by its path alone (plugin metadata) is named by `id` in a file.
            let field = kind.id_field().unwrap_or("id");
            let id = item.get(field).and_then(|v| v.as_str().map(str::to_string).or_else(|| v.as_i64().map(|n| n.to_string())));
            let Some(id) = id else {
                errors.push(format!("{name}[{i}]{}: {field} is required", at(i)));
                continue;
            };
            let mut value = item.clone();
            if kind.id_field().is_none() {
                if let Some(o) = value.as_object_mut() {
                    o.remove("id");
                }
                if let Err(e) = kind.check_id(&id, plugins) {
                    errors.push(format!("{name}[{i}] ({id}){}: {e}", at(i)));
                    continue;
                }
            }
            if let Err(errs) = catalog.check(kind, &value, plugins) {
                errors.extend(errs.into_iter().map(|e| format!("{name}[{i}] ({id}){}: {e}", at(i))));
                continue;
            }
            let key = kind.key(prefix, None, &id);
            if out.insert(key, Bytes::from(value.to_string())).is_some() {
                errors.push(format!("{name}[{i}]: id {id} is used twice"));
            }
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

/// The 1-based line on which each item of the top-level list `section` starts: lines opening
/// with `- ` at the list's indentation, between `section:` and the next top-level key.
fn item_lines(text: &str, section: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut inside = false;
    let mut indent = None;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let depth = line.len() - trimmed.len();
        if depth == 0 && !trimmed.starts_with('-') {
            inside = trimmed.strip_suffix(':').or_else(|| trimmed.split_once(':').map(|(k, _)| k)) == Some(section);
            indent = None;
            continue;
        }
        if inside && (trimmed == "-" || trimmed.starts_with("- ")) && *indent.get_or_insert(depth) == depth {
            out.push(n + 1);
        }
    }
    out
}

struct Current {
    objects: Objects,
    revision: i64,
}

/// The store behind `store.type: file`.
pub struct FileStore {
    current: Arc<Mutex<Current>>,
    changes: broadcast::Sender<Batch>,
}

fn is_json(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

impl FileStore {
    /// Reads the file (it must check), then follows it.
    pub fn open(path: &Path, prefix: &str, catalog: Arc<Catalog>, plugins: Arc<dyn PluginCatalog>) -> std::result::Result<FileStore, Vec<String>> {
        let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        let objects = load(&text, is_json(path), prefix, &catalog, plugins.as_ref())?;
        let current = Arc::new(Mutex::new(Current { objects, revision: 1 }));
        let (changes, _) = broadcast::channel(64);
        let store = FileStore { current: current.clone(), changes: changes.clone() };
        let (path, prefix) = (path.to_path_buf(), prefix.to_string());
        std::thread::Builder::new()
            .name("weir-file-store".into())
            .spawn(move || follow(path, prefix, catalog, plugins, text, current, changes))
            .map_err(|e| vec![e.to_string()])?;
        Ok(store)
    }
}

/// Looks at the file every `POLL`; a changed file that checks becomes the next revision, one
/// that does not is logged with its errors and left alone.
fn follow(path: PathBuf, prefix: String, catalog: Arc<Catalog>, plugins: Arc<dyn PluginCatalog>, mut last: String, current: Arc<Mutex<Current>>, changes: broadcast::Sender<Batch>) {
    loop {
        std::thread::sleep(POLL);
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        if text == last {
            continue;
        }
        last = text;
        let objects = match load(&last, is_json(&path), &prefix, &catalog, plugins.as_ref()) {
            Ok(o) => o,
            Err(errors) => {
                for e in &errors {
                    tracing::error!(file = %path.display(), error = %e, "config file refused; the last good config keeps serving");
                }
                continue;
            }
        };
        let mut cur = current.lock().unwrap_or_else(|p| p.into_inner());
        let revision = cur.revision + 1;
        let kv = |key: &str, value: Bytes| KeyValue { key: key.to_string(), value, create_revision: revision, mod_revision: revision };
        let mut events = Vec::new();
        for (key, value) in &objects {
            if cur.objects.get(key) != Some(value) {
                events.push(Event { kind: EventKind::Put, kv: kv(key, value.clone()) });
            }
        }
        for key in cur.objects.keys() {
            if !objects.contains_key(key) {
                events.push(Event { kind: EventKind::Delete, kv: kv(key, Bytes::new()) });
            }
        }
        if events.is_empty() {
            continue;
        }
        *cur = Current { objects, revision };
        drop(cur);
        tracing::info!(file = %path.display(), revision, changed = events.len(), "config file reloaded");
        let _ = changes.send(Arc::new((revision, events)));
    }
}

#[async_trait]
impl Store for FileStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        Ok(cur.objects.get(key).map(|v| KeyValue { key: key.to_string(), value: v.clone(), create_revision: cur.revision, mod_revision: cur.revision }))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        let cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let kvs = cur
            .objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| KeyValue { key: k.clone(), value: v.clone(), create_revision: cur.revision, mod_revision: cur.revision })
            .collect();
        Ok((kvs, cur.revision))
    }

    async fn txn(&self, _txn: Txn) -> Result<TxnOutcome> {
        Err(StoreError::Unavailable("the config comes from a file: edit the file to change it".into()))
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<mpsc::Receiver<WatchMessage>> {
        let live = self.changes.subscribe();
        let now = self.current.lock().unwrap_or_else(|p| p.into_inner()).revision;
        let (out, rx) = mpsc::channel(16);
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            // Only the current file is kept: a watcher from before it lists again.
            if from_revision <= now {
                let _ = out.send(WatchMessage::Compacted).await;
                return;
            }
            crate::forward(live, out, prefix, from_revision).await;
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_found_by_line() {
        let text = "upstreams:\n  - id: u\n    nodes: {}\nroutes:\n  # first\n  - id: a\n    uri: /a\n    methods:\n      - GET\n  - id: b\n#END\n";
        assert_eq!(item_lines(text, "routes"), vec![6, 10]);
        assert_eq!(item_lines(text, "upstreams"), vec![2]);
        assert!(item_lines(text, "ssls").is_empty());
    }

    /// A kind the core does not know becomes a section of the file once registered, and its
    /// objects go through the same door as the Admin API's.
    #[test]
    fn sections_are_the_catalogs_kinds() {
        struct Gauges;
        impl weir_catalog::Kind for Gauges {
            fn name(&self) -> &'static str {
                "gauges"
            }
            fn noun(&self) -> &'static str {
                "gauge"
            }
            fn schema(&self) -> &Value {
                static S: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
                S.get_or_init(|| weir_catalog::object_schema(serde_json::json!({"max": {"type": "integer"}}), false, &["max"]))
            }
            fn check(&self, value: &Value) -> Vec<String> {
                if value["max"].as_i64() > Some(10) { vec!["max is above 10".into()] } else { Vec::new() }
            }
        }
        let plugins = weir_core::schema::NoPlugins;
        let text = "gauges:\n  - id: g1\n    max: 3\n";
        assert_eq!(load(text, false, "/apisix", &Catalog::apisix(), &plugins), Err(vec!["gauges: unknown section".to_string()]));
        let mut catalog = Catalog::apisix();
        catalog.register(Arc::new(Gauges));
        let objects = load(text, false, "/apisix", &catalog, &plugins).unwrap();
        assert_eq!(objects.keys().collect::<Vec<_>>(), ["/apisix/gauges/g1"]);
        let errors = load("gauges:\n  - id: g1\n    max: 30\n", false, "/apisix", &catalog, &plugins).unwrap_err();
        assert_eq!(errors, ["gauges[0] (g1) (line 2): max is above 10"]);
        // Credentials have no place in the file, as in APISIX's standalone layout.
        assert_eq!(load("credentials: []\n", false, "/apisix", &catalog, &plugins), Err(vec!["credentials: unknown section".to_string()]));
    }
}
