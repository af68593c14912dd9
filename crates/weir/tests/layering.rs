//! The layout's rules, read from the source: the mechanism crates (`weir-http`,
//! `weir-upstream`) and the plugin API (`weir-plugin-api`, usable without compiling a single
//! plugin) depend on no policy crate, and no crate of the data plane has files that import each
//! other in a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("crates/").to_path_buf()
}

/// The modules of one crate (file stems under `src/`) and, for each, the sibling modules its
/// code names as `crate::module` (comments left out).
fn imports(krate: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = crates_dir().join(krate).join("src");
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            modules.insert(stem, std::fs::read_to_string(&path).unwrap());
        }
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(name, text)| {
            let mut uses = BTreeSet::new();
            for line in text.lines().map(|l| l.split("//").next().unwrap_or("")) {
                for (i, _) in line.match_indices("crate::") {
                    let rest = &line[i + "crate::".len()..];
                    // `crate::{a, b}` names several.
                    let group = match rest.strip_prefix('{') {
                        Some(g) => g.split('}').next().unwrap_or(""),
                        None => rest,
                    };
                    for part in group.split(',') {
                        let module: String = part.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                        if names.contains(&module) && module != *name && module != "lib" {
                            uses.insert(module);
                        }
                    }
                }
            }
            (name.clone(), uses)
        })
        .collect()
}

/// A circle of imports, if there is one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(node: &str, graph: &BTreeMap<String, BTreeSet<String>>, done: &mut BTreeSet<String>, path: &mut Vec<String>) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, done, path) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut done, &mut Vec::new()))
}

#[test]
fn the_data_plane_has_no_import_circle() {
    for krate in ["weir-http", "weir-upstream", "weir-plugin-api", "weir-proxy"] {
        let graph = imports(krate);
        assert!(graph.len() > 1, "{krate}: no modules read");
        assert_eq!(circle(&graph), None, "{krate}: files import each other in a circle");
    }
}

#[test]
fn the_circle_finder_finds_circles() {
    let graph: BTreeMap<String, BTreeSet<String>> = [("a", &["b"][..]), ("b", &["c"]), ("c", &["a"]), ("d", &[])]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
        .collect();
    assert_eq!(circle(&graph), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
}

/// The workspace crates `krate` depends on (its `[dependencies]` table, not dev ones).
fn weir_deps(krate: &str) -> Vec<String> {
    let manifest = std::fs::read_to_string(crates_dir().join(krate).join("Cargo.toml")).unwrap();
    let deps = manifest.split("[dependencies]").nth(1).expect("a [dependencies] table");
    deps.lines()
        .take_while(|l| !l.starts_with('['))
        .map(|l| l.split(['.', '=', ' ']).next().unwrap_or("").to_string())
        .filter(|name| name == "weir" || name.starts_with("weir-"))
        .collect()
}

#[test]
fn mechanism_depends_on_no_policy() {
    let policy = ["weir-proxy", "weir-plugins", "weir-admin", "weir-store", "weir"];
    for krate in ["weir-http", "weir-upstream", "weir-plugin-api"] {
        for name in weir_deps(krate) {
            assert!(!policy.contains(&name.as_str()), "{krate} depends on {name}");
        }
    }
}

/// The floors of ARCHITECTURE.md's crate drawing: each crate depends only on lower floors.
#[test]
fn crates_depend_only_on_lower_floors() {
    let floors = [
        ("weir-core", 0),
        ("weir-telemetry", 1),
        ("weir-database", 1),
        ("weir-tls", 1),
        ("weir-catalog", 2),
        ("weir-store", 3),
        ("weir-plugin-api", 1),
        ("weir-upstream", 2),
        ("weir-plugins", 3),
        ("weir-admin", 4),
        ("weir-functions", 5),
        ("weir-platform", 6),
        ("weir-http", 3),
        ("weir-proxy", 4),
        ("weir", 7),
        ("weir-testkit", 7),
    ];
    let floor = |name: &str| floors.iter().find(|(n, _)| *n == name).map(|(_, f)| *f);
    let mut seen = 0;
    for entry in std::fs::read_dir(crates_dir()).unwrap() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let own = floor(&name).unwrap_or_else(|| panic!("{name} has no floor in ARCHITECTURE.md's drawing"));
        for dep in weir_deps(&name) {
            let theirs = floor(&dep).unwrap_or_else(|| panic!("{name} depends on {dep}, which has no floor"));
            assert!(theirs < own, "{name} (floor {own}) depends on {dep} (floor {theirs})");
        }
        seen += 1;
    }
    assert_eq!(seen, floors.len(), "every crate is on a floor");
}
