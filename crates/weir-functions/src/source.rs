//! A function's source as saved: one or more files of JavaScript or TypeScript (ES modules),
//! checked and stripped of types by oxc when saved and again on every node that loads it.
//!
//! What QuickJS later loads is the stripped JavaScript of each file; imports are resolved at
//! load time (`engine.rs`): a relative import to a file of the same function, with or
//! without its `.ts`/`.js` extension, and `@/name` to another function of the same
//! environment.

use std::collections::BTreeMap;
use std::path::Path;

use oxc::allocator::Allocator;
use oxc::codegen::Codegen;
use oxc::parser::Parser;
use oxc::semantic::SemanticBuilder;
use oxc::span::SourceType;
use oxc::transformer::{TransformOptions, Transformer};
use serde::Serialize;

/// The most files one function may have, and the largest file.
pub const MAX_FILES: usize = 64;
pub const MAX_FILE_BYTES: usize = 512 * 1024;

/// Why a source does not compile: where, and what.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompileError {
    pub file: String,
    /// 1-based; 0 when the problem is not at a place in a file.
    pub line: u32,
    pub column: u32,
    pub message: String,
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}:{}: {}", self.file, self.line, self.column, self.message)
        } else {
            write!(f, "{}: {}", self.file, self.message)
        }
    }
}

/// A function's files as JavaScript, ready to load.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    /// Relative path → stripped JavaScript.
    pub modules: BTreeMap<String, String>,
    pub entry: String,
}

/// The path of a file, normalized: relative, `/`-separated, no `.` or `..` segments.
pub fn normalize_path(path: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            s => out.push(s),
        }
    }
    (!out.is_empty()).then(|| out.join("/"))
}

/// The file a relative import from `from` names, among `files`: as written, then with `.ts`,
/// `.js`, `/index.ts`, `/index.js` added.
pub fn resolve_relative(files: impl Fn(&str) -> bool, from: &str, spec: &str) -> Option<String> {
    let dir = from.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    let joined = normalize_path(&format!("{dir}/{spec}"))?;
    ["", ".ts", ".js", "/index.ts", "/index.js"].iter().map(|ext| format!("{joined}{ext}")).find(|p| files(p))
}

/// Checks and strips every file. A relative import must name a file of the function; the
/// entry point must have a default export.
pub fn compile(files: &BTreeMap<String, String>, entry: &str) -> Result<Compiled, CompileError> {
    let err = |file: &str, message: String| CompileError { file: file.to_string(), line: 0, column: 0, message };
    if files.is_empty() {
        return Err(err(entry, "a function needs at least one file".into()));
    }
    if files.len() > MAX_FILES {
        return Err(err(entry, format!("a function has at most {MAX_FILES} files")));
    }
    let mut normalized: BTreeMap<String, &str> = BTreeMap::new();
    for (path, text) in files {
        let Some(norm) = normalize_path(path).filter(|p| p.ends_with(".ts") || p.ends_with(".js") || p.ends_with(".mjs") || p.ends_with(".mts")) else {
            return Err(err(path, "a file path is relative, stays inside the function and ends in .ts or .js".into()));
        };
        if text.len() > MAX_FILE_BYTES {
            return Err(err(path, format!("a file has at most {MAX_FILE_BYTES} bytes")));
        }
        normalized.insert(norm, text);
    }
    let Some(entry) = normalize_path(entry).filter(|e| normalized.contains_key(e)) else {
        return Err(err(entry, "the entrypoint is not one of the files".into()));
    };
    let mut modules = BTreeMap::new();
    for (path, text) in &normalized {
        let (js, imports, has_default) = strip(path, text)?;
        for (spec, offset) in imports {
            if spec.starts_with("./") || spec.starts_with("../") {
                if resolve_relative(|p| normalized.contains_key(p), path, &spec).is_none() {
                    return Err(at(path, text, offset, format!("cannot find module '{spec}' among the function's files")));
                }
            } else if !spec.strip_prefix("@/").is_some_and(crate::valid_name) {
                return Err(at(path, text, offset, format!("cannot import '{spec}': import a file of this function ('./file') or another function ('@/name'); packages are not available")));
            }
        }
        if *path == entry && !has_default {
            return Err(err(path, "the entrypoint has no default export (export default async function (ctx) { ... })".into()));
        }
        modules.insert(path.clone(), js);
    }
    Ok(Compiled { modules, entry })
}

fn at(file: &str, text: &str, offset: u32, message: String) -> CompileError {
    let (line, column) = line_col(text, offset as usize);
    CompileError { file: file.to_string(), line, column, message }
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_col(text: &str, offset: usize) -> (u32, u32) {
    let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
    let line = before.matches('\n').count() as u32 + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) as u32 + 1;
    (line, column)
}

/// One file: its JavaScript, the modules it imports (with where), and whether it has a
/// default export.
fn strip(path: &str, text: &str) -> Result<(String, Vec<(String, u32)>, bool), CompileError> {
    let allocator = Allocator::default();
    let ts = path.ends_with(".ts") || path.ends_with(".mts");
    let source_type = SourceType::from_path(Path::new(if ts { "m.ts" } else { "m.mjs" })).unwrap_or_default();
    let parsed = Parser::new(&allocator, text, source_type).parse();
    let first = |diags: &[oxc::diagnostics::OxcDiagnostic]| {
        diags.iter().find(|d| d.severity == oxc::diagnostics::Severity::Error).or(diags.first()).map(|d| {
            let offset = d.labels.first().map(|l| l.offset()).unwrap_or(0);
            at(path, text, offset, d.message.to_string())
        })
    };
    if parsed.panicked || !parsed.diagnostics.is_empty() {
        return Err(first(&parsed.diagnostics).unwrap_or_else(|| at(path, text, 0, "the file does not parse".into())));
    }
    let record = &parsed.module_record;
    let mut imports: Vec<(String, u32)> = record
        .requested_modules
        .iter()
        .filter_map(|(spec, uses)| uses.iter().find(|u| !u.is_type).map(|u| (spec.to_string(), u.span.start)))
        .collect();
    imports.sort_by_key(|(_, at)| *at);
    let has_default = record.local_export_entries.iter().chain(record.indirect_export_entries.iter()).any(|e| e.export_name.is_default());
    let mut program = parsed.program;
    let semantic = SemanticBuilder::new().build(&program);
    if let Some(e) = first(&semantic.diagnostics) {
        return Err(e);
    }
    let scoping = semantic.semantic.into_scoping();
    let options = TransformOptions::default();
    let transformed = Transformer::new(&allocator, Path::new(path), &options).build_with_scoping(scoping, &mut program);
    if let Some(e) = first(&transformed.diagnostics) {
        return Err(e);
    }
    let js = Codegen::new().build(&program).code;
    Ok((js, imports, has_default))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> BTreeMap<String, String> {
        list.iter().map(|(p, s)| (p.to_string(), s.to_string())).collect()
    }

    #[test]
    fn typescript_is_stripped_and_imports_are_checked() {
        let src = files(&[
            ("index.ts", "import { twice } from './lib/math';\ninterface In { n: number }\nexport default async function (ctx: { body: In }): Promise<number> { return twice(ctx.body.n as number) }"),
            ("lib/math.ts", "export const twice = (n: number): number => n * 2;"),
        ]);
        let out = compile(&src, "index.ts").unwrap();
        assert!(!out.modules["index.ts"].contains("interface"), "{}", out.modules["index.ts"]);
        assert!(out.modules["lib/math.ts"].contains("n * 2"));
        assert_eq!(out.entry, "index.ts");
    }

    #[test]
    fn errors_name_the_file_line_and_column() {
        let e = compile(&files(&[("index.ts", "export default function () {\n  return 1 +;\n}")]), "index.ts").unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("index.ts", 2), "{e:?}");
        assert!(e.column > 1, "{e:?}");
        let e = compile(&files(&[("index.js", "import x from './nope';\nexport default () => x")]), "index.js").unwrap_err();
        assert_eq!((e.line, e.column), (1, 15), "{e:?}");
        assert!(e.message.contains("./nope"));
        let e = compile(&files(&[("index.js", "import x from 'lodash';\nexport default () => x")]), "index.js").unwrap_err();
        assert!(e.message.contains("packages are not available"), "{e:?}");
        let e = compile(&files(&[("index.js", "export const a = 1")]), "index.js").unwrap_err();
        assert!(e.message.contains("default export"), "{e:?}");
        let e = compile(&files(&[("../up.js", "export default 1")]), "../up.js").unwrap_err();
        assert!(e.message.contains("relative"), "{e:?}");
    }

    #[test]
    fn relative_imports_resolve_with_or_without_extensions() {
        let have = |p: &str| ["a/b.ts", "a/c/index.js", "top.js"].contains(&p);
        assert_eq!(resolve_relative(have, "a/x.ts", "./b").as_deref(), Some("a/b.ts"));
        assert_eq!(resolve_relative(have, "a/x.ts", "./b.ts").as_deref(), Some("a/b.ts"));
        assert_eq!(resolve_relative(have, "a/x.ts", "./c").as_deref(), Some("a/c/index.js"));
        assert_eq!(resolve_relative(have, "a/x.ts", "../top").as_deref(), Some("top.js"));
        assert_eq!(resolve_relative(have, "x.ts", "../../etc/passwd"), None);
    }
}
