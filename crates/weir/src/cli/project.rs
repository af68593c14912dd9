//! A project's functions on disk: `functions/<name>/` holds a function's files and its
//! `function.yaml`; a function's name is its directory's path under `functions/`. A directory
//! with a `function.yaml` of its own is another function, never part of the one around it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

pub const MANIFEST: &str = "function.yaml";
const DEFAULT_ENTRYPOINT: &str = "index.ts";

/// `function.yaml`: what a function is besides its files.
#[derive(Serialize, Deserialize, Default, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct Manifest {
    /// Absent: whatever the server holds is left as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    /// The methods it answers; none means every method.
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    /// Its own plugin layer, as the API takes it.
    #[serde(default)]
    plugins: Map<String, Value>,
    /// The file that default-exports the handler, when not `index.ts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entrypoint: Option<String>,
}

/// What a function is, as far as a deploy is concerned: two equal specs need no call.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub files: BTreeMap<String, String>,
    pub entrypoint: String,
    pub methods: Vec<String>,
    pub description: Option<String>,
    pub tags: Vec<String>,
    pub plugins: Map<String, Value>,
}

impl Spec {
    /// A function as the API shows it (`source: {files, entrypoint}`, `methods`, ...).
    pub fn from_api(f: &Value) -> anyhow::Result<Spec> {
        let strings = |v: &Value| -> Vec<String> { v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default() };
        let files = serde_json::from_value(f["source"]["files"].clone()).context("a function from the server has no source files")?;
        Ok(Spec {
            files,
            entrypoint: f["source"]["entrypoint"].as_str().unwrap_or(DEFAULT_ENTRYPOINT).to_string(),
            methods: strings(&f["methods"]),
            description: f["description"].as_str().map(str::to_string),
            tags: strings(&f["tags"]),
            plugins: f["plugins"].as_object().cloned().unwrap_or_default(),
        })
    }

    /// The fields of a create or update call (`name` is added for a create).
    pub fn body(&self) -> Value {
        let mut body = json!({
            "source": {"files": self.files, "entrypoint": self.entrypoint},
            "methods": self.methods,
            "tags": self.tags,
            "plugins": self.plugins,
        });
        if let Some(d) = &self.description {
            body["description"] = json!(d);
        }
        body
    }

    /// The canonical JSON of the spec, compared in place of a hash of it: object keys sorted
    /// at every depth, methods in one order. A description the project leaves out is not
    /// compared (a deploy would not change it).
    pub fn fingerprint(&self, description_managed: bool) -> String {
        let mut methods = self.methods.clone();
        methods.sort();
        methods.dedup();
        let description = if description_managed { self.description.clone() } else { None };
        let doc = json!({
            "files": self.files, "entrypoint": self.entrypoint, "methods": methods,
            "description": description, "tags": self.tags, "plugins": self.plugins,
        });
        sorted(&doc).to_string()
    }

    /// Whether the server's copy `other` already is what this spec asks for.
    pub fn matches(&self, other: &Spec) -> bool {
        let managed = self.description.is_some();
        self.fingerprint(managed) == other.fingerprint(managed)
    }
}

/// `v` with every object's keys in sorted order (serde_json keeps insertion order here).
fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&o[k]))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// `rel` as a path inside a directory, or `None` for an absolute path, an empty segment, `.`
/// or `..`.
fn inside(rel: &str) -> Option<PathBuf> {
    let ok = !rel.is_empty() && !rel.starts_with('/') && rel.split('/').all(|s| !matches!(s, "" | "." | "..") && !s.contains(['\\', '\0']));
    ok.then(|| rel.split('/').collect())
}

/// Writes one function (as the API shows it) to `root/functions/<functionName>/`; the
/// directory it wrote.
pub fn write(root: &Path, f: &Value) -> anyhow::Result<PathBuf> {
    let name = f["functionName"].as_str().context("a function from the server has no functionName")?;
    let dir = inside(name).map(|rel| root.join("functions").join(rel)).with_context(|| format!("{name:?} is not a name to write under functions/"))?;
    let spec = Spec::from_api(f).with_context(|| name.to_string())?;
    let mut paths = Vec::new();
    for rel in spec.files.keys() {
        let path = inside(rel).filter(|p| p != Path::new(MANIFEST)).with_context(|| format!("{name}: refusing to write the file {rel:?}"))?;
        paths.push(path);
    }
    for (path, code) in paths.iter().zip(spec.files.values()) {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap_or(&dir)).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(&path, code).with_context(|| format!("writing {}", path.display()))?;
    }
    let manifest = Manifest {
        description: spec.description,
        methods: spec.methods,
        tags: spec.tags,
        plugins: spec.plugins,
        entrypoint: (spec.entrypoint != DEFAULT_ENTRYPOINT).then_some(spec.entrypoint),
    };
    let yaml = serde_saphyr::to_string(&manifest).with_context(|| format!("{name}: writing {MANIFEST}"))?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(MANIFEST);
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    Ok(dir)
}

/// Every function under `root/functions/`, by name.
pub fn read(root: &Path) -> anyhow::Result<BTreeMap<String, Spec>> {
    let base = root.join("functions");
    anyhow::ensure!(base.is_dir(), "{}: no such directory (weir fn pull writes one)", base.display());
    let mut found = BTreeMap::new();
    let mut dirs = vec![base.clone()];
    while let Some(dir) = dirs.pop() {
        if dir.join(MANIFEST).is_file() {
            let name = name_of(&base, &dir)?;
            let spec = read_one(&dir).with_context(|| name.clone())?;
            found.insert(name, spec);
        }
        for entry in entries(&dir)? {
            if entry.is_dir() {
                dirs.push(entry);
            }
        }
    }
    Ok(found)
}

/// A function's name: its directory's path below `functions/`, with `/` between segments.
fn name_of(base: &Path, dir: &Path) -> anyhow::Result<String> {
    let rel = dir.strip_prefix(base).unwrap_or(dir);
    let segments: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
    match segments {
        Some(s) if !s.is_empty() => Ok(s.join("/")),
        _ => anyhow::bail!("{}: a function's directory needs a name of text below functions/", dir.display()),
    }
}

/// The directory's entries, sorted, without hidden ones (editors' and systems' files).
fn entries(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

fn read_one(dir: &Path) -> anyhow::Result<Spec> {
    let manifest_path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest: Manifest = if text.trim().is_empty() {
        Manifest::default()
    } else {
        serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", manifest_path.display(), e.to_string().replace('\n', " ")))?
    };
    let mut files = BTreeMap::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for path in entries(&d)? {
            if path.is_dir() {
                // Another function's directory is its own.
                if !path.join(MANIFEST).is_file() {
                    dirs.push(path);
                }
                continue;
            }
            let rel = name_of(dir, &path)?;
            if rel == MANIFEST {
                continue;
            }
            let code = std::fs::read_to_string(&path).with_context(|| format!("reading {} (a function's files are text)", path.display()))?;
            files.insert(rel, code);
        }
    }
    let entrypoint = manifest.entrypoint.unwrap_or_else(|| DEFAULT_ENTRYPOINT.to_string());
    anyhow::ensure!(files.contains_key(&entrypoint), "{}: no entrypoint {entrypoint} among its files", dir.display());
    Ok(Spec {
        files,
        entrypoint,
        methods: manifest.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
        description: manifest.description,
        tags: manifest.tags,
        plugins: manifest.plugins,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(name: &str, files: Value, extra: Value) -> Value {
        let mut f = json!({"name": format!("dev/{name}"), "functionName": name, "environment": "dev",
            "source": {"files": files, "entrypoint": "index.ts"}, "methods": ["GET"], "tags": ["t"], "plugins": {}, "version": 3});
        for (k, v) in extra.as_object().unwrap() {
            f[k] = v.clone();
        }
        f
    }

    #[test]
    fn written_functions_read_back_as_the_same_specs_and_nested_ones_stay_apart() {
        let root = tempfile::tempdir().unwrap();
        let user = shown("user", json!({"index.ts": "export default () => 1", "lib/a.ts": "export const a = 1"}),
            json!({"description": "who", "plugins": {"limit-count": {"count": 1, "time_window": 60}}}));
        let me = shown("user/me", json!({"main.ts": "export default () => 2"}), json!({"source": {"files": {"main.ts": "export default () => 2"}, "entrypoint": "main.ts"}}));
        assert_eq!(write(root.path(), &user).unwrap(), root.path().join("functions/user"));
        write(root.path(), &me).unwrap();
        let yaml = std::fs::read_to_string(root.path().join("functions/user/me/function.yaml")).unwrap();
        assert!(yaml.contains("entrypoint: main.ts"), "{yaml}");
        let read = read(root.path()).unwrap();
        assert_eq!(read.keys().collect::<Vec<_>>(), ["user", "user/me"]);
        for (name, f) in [("user", &user), ("user/me", &me)] {
            let server = Spec::from_api(f).unwrap();
            assert_eq!(read[name], server, "{name}");
            assert!(read[name].matches(&server));
        }
    }

    #[test]
    fn a_spec_differs_by_content_not_by_order_and_an_absent_description_is_not_compared() {
        let f = shown("a", json!({"index.ts": "x"}), json!({"description": "d", "methods": ["GET", "POST"], "plugins": {"p": {"a": 1, "b": 2}}}));
        let server = Spec::from_api(&f).unwrap();
        let mut local = server.clone();
        local.methods.reverse();
        local.plugins = serde_json::from_str(r#"{"p": {"b": 2, "a": 1}}"#).unwrap();
        assert!(local.matches(&server));
        local.description = None;
        assert!(local.matches(&server), "left out, the server's stays");
        local.description = Some("other".into());
        assert!(!local.matches(&server));
        let mut edited = server.clone();
        edited.files.insert("index.ts".into(), "y".into());
        assert!(!edited.matches(&server));
        assert!(edited.body().get("name").is_none() && edited.body()["description"] == "d");
        edited.description = None;
        assert!(edited.body().get("description").is_none());
    }

    #[test]
    fn paths_that_leave_the_directory_are_refused() {
        let root = tempfile::tempdir().unwrap();
        for files in [json!({"../x.ts": "x"}), json!({"/etc/x": "x"}), json!({"a//b": "x"}), json!({"function.yaml": "x"}), json!({"./a": "x"})] {
            assert!(write(root.path(), &shown("a", files.clone(), json!({}))).is_err(), "{files}");
        }
        assert!(write(root.path(), &shown("../up", json!({"index.ts": "x"}), json!({}))).is_err());
        assert!(!root.path().join("up").exists() && !root.path().join("x.ts").exists());
    }

    #[test]
    fn a_manifest_with_an_unknown_key_or_no_entrypoint_file_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("functions/a");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("function.yaml"), "methods: [get]\nmethod: [POST]\n").unwrap();
        std::fs::write(dir.join("index.ts"), "x").unwrap();
        let e = format!("{:#}", read(root.path()).unwrap_err());
        assert!(e.contains("method"), "{e}");
        std::fs::write(dir.join("function.yaml"), "methods: [get]\nentrypoint: main.ts\n").unwrap();
        assert!(format!("{:#}", read(root.path()).unwrap_err()).contains("main.ts"));
        std::fs::write(dir.join("function.yaml"), "").unwrap();
        std::fs::write(dir.join(".index.ts.swp"), "junk").unwrap();
        assert_eq!(read(root.path()).unwrap()["a"].files.keys().collect::<Vec<_>>(), ["index.ts"]);
    }
}
