//! A function's source as saved: one or more files of JavaScript or TypeScript (ES modules),
//! checked and stripped of types by oxc when saved and again on every node that loads it.
//!
//! What QuickJS later loads is the stripped JavaScript of each file; imports are resolved at
//! load time (`engine.rs`): a relative import to a file of the same function, with or
//! without its `.ts`/`.js` extension, and `@/name` to another function of the same
//! environment.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use oxc::allocator::Allocator;
use oxc::codegen::{Codegen, CodegenOptions};
use oxc::parser::Parser;
use oxc::semantic::SemanticBuilder;
use oxc::span::SourceType;
use oxc::transformer::{TransformOptions, Transformer};
use serde::Serialize;

/// The most files one function may have, and the largest file.
pub const MAX_FILES: usize = 64;
pub const MAX_FILE_BYTES: usize = 512 * 1024;

/// How many times its own size a file's JavaScript may be (beyond 64 KiB): stripping types
/// only shrinks a file, and the transforms that add code (enums, namespaces, parameter
/// properties) add at most a few dozen bytes per declaration. A file past it is refused, so
/// no save holds a node's memory out of proportion to what the tenant stored.
pub const MAX_OUTPUT_FACTOR: usize = 16;

/// The deepest a file's brackets (`(`, `[`, `{`, template `${`, and in TypeScript a type's
/// `<`) may nest. oxc walks the syntax tree by recursion, about a kilobyte of stack a level,
/// and has no limit of its own: a few kilobytes of `((((` would overflow any thread's stack
/// and abort the process.
pub const MAX_NESTING: usize = 1000;

/// The stack of the thread a compilation runs on: enough for the deepest file there can be,
/// whatever the scan above missed. Past [`MAX_NESTING`], what can still nest is a chain of
/// operators (`!!!!x`, `a=a=a`, `1+1+1`), a few hundred bytes a level; and brackets behind
/// something the scan reads otherwise than the parser (a regular expression it takes for a
/// division), up to a kilobyte or two a level, one level a byte. The deepest full-size file
/// of those needs 256 to 512 MiB in a debug build (`deep_nesting_is_an_error_not_a_crash`).
/// It is address space until used, and given back when the compilation ends.
const COMPILE_STACK: usize = 1 << 30;

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
    /// The functions its files import by name (`@/name`) in import or export statements: bound
    /// when its modules load, unlike an `import()` at run time.
    pub links: BTreeSet<String>,
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
    compile_at(files, entry, false)
}

/// As [`compile`], for work nothing urgent waits on (a save, a change compiled off the watch
/// loop): at the lowest priority, so it takes only what the node's own work leaves of a core.
pub fn compile_in_background(files: &BTreeMap<String, String>, entry: &str) -> Result<Compiled, CompileError> {
    compile_at(files, entry, true)
}

fn compile_at(files: &BTreeMap<String, String>, entry: &str, background: bool) -> Result<Compiled, CompileError> {
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
    for (path, text) in &normalized {
        check_nesting(path, text)?;
    }
    let failed = |why: &str| err(&entry, format!("the compiler failed: {why}"));
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new().name("weir-compile".into()).stack_size(COMPILE_STACK);
        let compile = || {
            if background {
                yield_to_others();
            }
            strip_all(&normalized, &entry)
        };
        match thread.spawn_scoped(scope, compile) {
            Ok(running) => running.join().unwrap_or_else(|_| Err(failed("it stopped"))),
            Err(e) => Err(failed(&e.to_string())),
        }
    })
}

/// Puts the calling compile thread at the lowest priority Linux's batch policy has (niceness
/// 19, `priority.rs`): a tenant's large sources compile on what the node's own work leaves of a
/// core, so its saves never slow the proxy, the watch loop or another tenant's API calls beyond
/// a sliver of the core, and still always make progress. Not for a compile the watch loop
/// waits on (a gateway's first lowering), which would hold up every change behind the node's
/// load.
fn yield_to_others() {
    if let Err(e) = crate::priority::batch_at(crate::priority::COMPILE_STEPS) {
        tracing::debug!(error = %e, "a compile keeps the default scheduling priority");
    }
}

/// Strips every file, and checks each import and the entry point's default export.
fn strip_all(normalized: &BTreeMap<String, &str>, entry: &str) -> Result<Compiled, CompileError> {
    let err = |file: &str, message: String| CompileError { file: file.to_string(), line: 0, column: 0, message };
    let entry = entry.to_string();
    let mut modules = BTreeMap::new();
    let mut links = BTreeSet::new();
    for (path, text) in normalized {
        let (js, imports, has_default) = strip(path, text)?;
        for (spec, offset) in imports {
            if spec.starts_with("./") || spec.starts_with("../") {
                if resolve_relative(|p| normalized.contains_key(p), path, &spec).is_none() {
                    return Err(at(path, text, offset, format!("cannot find module '{spec}' among the function's files")));
                }
            } else if let Some(other) = spec.strip_prefix("@/").filter(|n| crate::valid_name(n)) {
                links.insert(other.to_string());
            } else {
                return Err(at(path, text, offset, format!("cannot import '{spec}': import a file of this function ('./file') or another function ('@/name'); packages are not available")));
            }
        }
        if *path == entry && !has_default {
            return Err(err(path, "the entrypoint has no default export (export default async function (ctx) { ... })".into()));
        }
        modules.insert(path.clone(), js);
    }
    Ok(Compiled { modules, entry, links })
}

/// Refuses a file whose brackets nest deeper than [`MAX_NESTING`]. A light scan, not a
/// parser: it skips comments, strings, regular expressions and the text of template literals,
/// and leaves a mismatched bracket to the parser (where it reads a `/` otherwise than the
/// parser, the compiler's stack still holds what it missed). In TypeScript a `<` counts as a
/// level until its `>`, a `;`, `)`, `{` or `}` (where a comparison's `<` ends), so generics
/// nest under the same limit.
/// So does a control statement whose body is another without braces (`if (a) if (b) ...`):
/// the compiler takes time in the square of that depth.
fn check_nesting(path: &str, text: &str) -> Result<(), CompileError> {
    let ts = path.ends_with(".ts") || path.ends_with(".mts");
    let b = text.as_bytes();
    // What is open: a bracket, a template's text (`), or a template's `${`.
    let mut open: Vec<u8> = Vec::new();
    let mut angles = 0usize;
    // Statements whose body is a statement without braces, open since the last `;` or brace.
    let mut bodies = 0usize;
    // Whether a `/` here starts a regular expression rather than divides: after an operator,
    // an opening bracket or a keyword, not after a name, a number or a closing bracket.
    let mut regex_here = true;
    // Where the line ends on which a `/` read as a regular expression found no closing one:
    // every later `/` before it is a division, so no line is scanned more than twice.
    let mut unclosed_until = 0;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if open.last() == Some(&b'`') {
            match c {
                b'\\' => i += 1,
                b'`' => {
                    open.pop();
                    regex_here = false;
                }
                b'$' if b.get(i + 1) == Some(&b'{') => {
                    open.push(b'$');
                    regex_here = true;
                    i += 1;
                }
                _ => {}
            }
            i += 1;
            continue;
        }
        match c {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                i = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |n| i + n);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = text[i + 2..].find("*/").map_or(b.len(), |n| i + 2 + n + 1);
            }
            // A regular expression: to its closing `/` (not one escaped or in a class), on
            // its line.
            b'/' if regex_here && i >= unclosed_until => {
                let (start, mut class) = (i, false);
                i += 1;
                while i < b.len() && b[i] != b'\n' && (class || b[i] != b'/') {
                    match b[i] {
                        b'\\' => i += 1,
                        b'[' => class = true,
                        b']' => class = false,
                        _ => {}
                    }
                    i += 1;
                }
                // No closing `/` on the line: it was a division after all.
                if b.get(i) != Some(&b'/') {
                    unclosed_until = i;
                    i = start;
                }
                regex_here = i == start;
            }
            b'\'' | b'"' => {
                i += 1;
                while i < b.len() && b[i] != c && b[i] != b'\n' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                regex_here = false;
            }
            b'`' | b'(' | b'[' => {
                open.push(c);
                regex_here = true;
            }
            b'{' => {
                open.push(c);
                (angles, bodies, regex_here) = (0, 0, true);
            }
            b')' | b']' => {
                open.pop();
                angles = if c == b']' { angles } else { 0 };
                regex_here = false;
            }
            b'}' => {
                open.pop();
                (angles, bodies, regex_here) = (0, 0, true);
            }
            b'<' if ts => {
                angles += 1;
                regex_here = true;
            }
            b'>' if ts => {
                angles = angles.saturating_sub(1);
                regex_here = true;
            }
            b';' => (angles, bodies, regex_here) = (0, 0, true),
            // A name, a number or a keyword (a name of non-ASCII letters too); after a `.`, a
            // property's name whatever it spells.
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c == b'\\' || c >= 0x80 => {
                let end = b[i..].iter().position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80)).map_or(b.len(), |n| i + n).max(i + 1);
                let word = &b[i..end];
                let property = b[..i].iter().rev().find(|c| !c.is_ascii_whitespace()) == Some(&b'.');
                if !property && matches!(word, b"if" | b"else" | b"for" | b"while" | b"do" | b"with") {
                    bodies += 1;
                }
                regex_here = !property && matches!(word, b"return" | b"typeof" | b"case" | b"do" | b"else" | b"in" | b"of" | b"instanceof" | b"new" | b"delete" | b"void" | b"throw" | b"yield" | b"await");
                i = end - 1;
            }
            c if c.is_ascii_whitespace() => {}
            // `++`, `--`, `!` and `.` keep what came before: prefix before an operand, postfix
            // (`i++ / 2`, TypeScript's `x! / 2`) after one, and `.` only ever before a name.
            b'+' | b'-' if b.get(i + 1) == Some(&c) => i += 1,
            b'!' | b'.' if b.get(i + 1) != Some(&b'=') => {}
            _ => regex_here = true,
        }
        if open.len() + angles + bodies > MAX_NESTING {
            return Err(at(path, text, i as u32, format!("the code nests deeper than {MAX_NESTING} levels here")));
        }
        i += 1;
    }
    Ok(())
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
    // Unindented: indentation would grow with nesting times lines, and a small file of many
    // statements deep inside blocks would print to gigabytes.
    let options = CodegenOptions { indent_width: 0, ..CodegenOptions::default() };
    let js = Codegen::new().with_options(options).build(&program).code;
    if js.len() > MAX_OUTPUT_FACTOR * text.len() + 64 * 1024 {
        return Err(at(path, text, 0, format!("the file compiles to {} bytes, more than {MAX_OUTPUT_FACTOR} times its own", js.len())));
    }
    Ok((js, imports, has_default))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> BTreeMap<String, String> {
        list.iter().map(|(p, s)| (p.to_string(), s.to_string())).collect()
    }

    #[test]
    fn a_compile_runs_at_the_lowest_priority_and_leaves_its_caller_as_it_was() {
        let nice = || crate::priority::niceness(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
        let before = nice();
        let seen = std::thread::spawn(move || {
            yield_to_others();
            nice()
        })
        .join()
        .unwrap();
        assert_eq!(seen, Some(19));
        assert!(compile_in_background(&files(&[("index.ts", "export default () => 1;")]), "index.ts").is_ok());
        assert_eq!(nice(), before, "the caller's own priority is unchanged");
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
    fn functions_imported_by_name_are_listed_as_links_and_an_import_at_run_time_is_not() {
        let src = files(&[
            ("index.ts", "import b from '@/b';\nimport type { T } from '@/t';\nexport { c } from '@/c/d';\nexport default async (x: T) => b(await import('@/e'));"),
            ("lib.ts", "import b from '@/b'; export const f = b;"),
        ]);
        let out = compile(&src, "index.ts").unwrap();
        assert_eq!(out.links, BTreeSet::from(["b".to_string(), "c/d".to_string()]));
        assert!(compile(&files(&[("index.ts", "export default () => 1;")]), "index.ts").unwrap().links.is_empty());
    }

    /// Source shaped to nest as deep as a file's size allows.
    fn hostile(shape: &str) -> (&'static str, String) {
        let n = MAX_FILE_BYTES;
        let chain = |unit: &str, end: &str| format!("{}{end}", unit.repeat((n - 64) / unit.len()));
        let body = match shape {
            "paren" => format!("{}1", "(".repeat(n - 64)),
            "bracket" => format!("{}1", "[".repeat(n - 64)),
            "block" => "{".repeat(n - 64),
            "template" => "`${".repeat((n - 64) / 3),
            "generic" => return ("index.ts", format!("export default 0;\nlet q: {}number;", "A<".repeat((n - 64) / 2))),
            "not" => chain("!", "x"),
            "negate" => chain("- ", "x"),
            "assign" => chain("a=", "1"),
            "plus" => chain("1+", "1"),
            "conditional" => chain("x?1:", "1"),
            "member" => format!("x{}", ".a".repeat((n - 64) / 2)),
            "call" => format!("x{}", "()".repeat((n - 64) / 2)),
            "arrow" => chain("()=>", "1"),
            "if" => chain("if(1)", "1"),
            "while" => chain("while(0)", "1"),
            "label" => (0..).map(|n| format!("l{n}:")).scan(0, |len, l| { *len += l.len(); (*len < n - 64).then_some(l) }).collect::<String>() + "1",
            "else-if" => chain("if(x)1;else ", "1"),
            "typeof" => chain("typeof ", "x"),
            "power" => chain("1**", "1"),
            // Brackets a scan that misreads a regular expression would not see: the compiler's
            // stack is what stands between them and the process.
            "hidden-paren" => format!("if (1) /'`/.test('');{}1", "(".repeat(n - 128)),
            "hidden-generic" => return ("index.ts", format!("export default 0;\nif (1) /'`/.test('');let q: {}number;", "A<".repeat((n - 128) / 2))),
            _ => unreachable!(),
        };
        ("index.js", format!("export default 0;\nlet a, x;\n{body}\n"))
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        // Each shape overflowed an 8 MiB stack in oxc and aborted the process. Brackets past
        // MAX_NESTING are refused where they go too deep; chains of operators compile on the
        // compiler's own large stack.
        for shape in ["paren", "bracket", "block", "template", "generic", "if", "while"] {
            let (path, text) = hostile(shape);
            let e = compile(&files(&[(path, &text)]), path).unwrap_err();
            assert!(e.message.contains("nests deeper than 1000 levels"), "{shape}: {e:?}");
            assert_eq!(e.line, if shape == "generic" { 2 } else { 3 }, "{shape}: {e:?}");
        }
        for shape in ["not", "negate", "assign", "plus", "conditional", "member", "call", "arrow", "typeof", "power", "label", "else-if", "hidden-paren", "hidden-generic"] {
            let (path, text) = hostile(shape);
            assert!(text.len() <= MAX_FILE_BYTES && text.len() > MAX_FILE_BYTES - 100, "{shape}: {}", text.len());
            // Compiling is the point: whichever the answer, the process is still here.
            let answer = compile(&files(&[(path, &text)]), path);
            assert!(answer.is_ok() || answer.as_ref().is_err_and(|e| !e.message.contains("compiler failed")), "{shape}: {answer:?}");
        }
    }

    /// Files whose JavaScript once printed hundreds of times their size (every statement
    /// indented by its depth): many statements deep in blocks, and statements whose bodies the
    /// printer braces, a level each. Their JavaScript stays in proportion to them.
    #[test]
    fn javascript_stays_in_proportion_to_its_source() {
        let blocks = format!("export default 0;\n{}{}{}\n", "{".repeat(999), ";".repeat(200_000), "}".repeat(999));
        let loops = format!("export default 0;\n{}1;\n", "if(1)for(;;)".repeat(20_000));
        for (shape, text) in [("blocks", blocks), ("loops", loops)] {
            let out = compile(&files(&[("index.js", &text)]), "index.js").unwrap();
            let js = out.modules.values().map(String::len).sum::<usize>();
            assert!(js <= 4 * text.len(), "{shape}: {} bytes of JavaScript from {}", js, text.len());
        }
    }

    /// A dotted namespace becomes a function a segment, some thirty times its text: past
    /// [`MAX_OUTPUT_FACTOR`] the file is refused, saying so; a short one compiles.
    #[test]
    fn a_file_whose_javascript_outgrows_it_is_refused() {
        let dotted = |n: usize| format!("namespace {} {{ export const x = 1 }}\nexport default 0;\n", vec!["a"; n].join("."));
        assert!(compile(&files(&[("index.ts", &dotted(100))]), "index.ts").is_ok());
        let e = compile(&files(&[("index.ts", &dotted(100_000))]), "index.ts").unwrap_err();
        assert!(e.message.contains("compiles to") && e.message.contains("more than 16 times its own"), "{e:?}");
    }

    /// A line of divisions by strings that hold a `[`, each of which the scan first tries as a
    /// regular expression: one failed try per line, not one per `/`, so the scan reads the
    /// line a bounded number of times.
    #[test]
    fn a_line_of_slashes_is_scanned_in_one_pass() {
        let text = format!("let of = 1;\nexport default () => of{};\n", "/'['+of".repeat(70_000));
        assert!(text.len() <= MAX_FILE_BYTES);
        assert!(check_nesting("index.js", &text).is_ok());
        compile(&files(&[("index.js", &text)]), "index.js").unwrap();
    }

    #[test]
    fn nesting_counts_code_not_text() {
        let deep = |open: &str, close: &str, n: usize| format!("export default () => {}1{};\n", open.repeat(n), close.repeat(n));
        assert!(compile(&files(&[("index.js", &deep("(", ")", 999))]), "index.js").is_ok());
        assert!(compile(&files(&[("index.js", &deep("(", ")", 1001))]), "index.js").unwrap_err().message.contains("nests deeper"));
        // Brackets in strings, comments, template text and regular expressions are not code.
        let many = "(".repeat(3000);
        let text = format!(
            "// {many}\n/* {many} */\nlet x; const s = '{many}', d = \"{many}\", t = `{many}${{1}}{many}`;\n{}export default () => [s, d, t];\n",
            "x = /\\(/;\n".repeat(1500)
        );
        compile(&files(&[("index.js", &text)]), "index.js").unwrap();
        // A quote or backquote in a regular expression opens nothing; a division is not one.
        let after = |head: &str| format!("let x, a = 1, b = 2;\n{head}\nexport default () => {}1{};\n", "(".repeat(1001), ")".repeat(1001));
        for head in ["x = /'`\"/g;", "x = a / b / 2;", "x = (a) / b; x = [1][0] / 2;", "x = /[/'`]/.test('a') ? 1 : 2;", "x = !/a/.test('b');", "x = +/1/.source;"] {
            let e = compile(&files(&[("index.js", &after(head))]), "index.js").unwrap_err();
            assert!(e.message.contains("nests deeper") && e.line == 3, "{head}: {e:?}");
        }
        // Divisions the scan once took for regular expressions, a thousand times over: after a
        // postfix `++`, a TypeScript `!`, a number's `.`, a property named as a keyword, and a
        // name of non-ASCII letters.
        let lines = ["a = (a++ / 2);", "a = (1. / 3);", "a = (o.new / o.total);", "a = (o?.return / 2, o.yield / 3);", "a = Math.sin(θ / 2);", "a = [数量 / 2];"];
        let text = format!("let a = 1, θ = 1, 数量 = 1, o = {{}};\n{}export default () => a;\n", lines.iter().map(|l| format!("{l}\n")).collect::<String>().repeat(400));
        compile(&files(&[("index.js", &text)]), "index.js").unwrap();
        let text = format!("let w: number | undefined = 4, m = 0;\n{}export default () => m;\n", "m = Math.floor(w! / 2);\n".repeat(1001));
        compile(&files(&[("index.ts", &text)]), "index.ts").unwrap();
        // TypeScript: comparisons do not add up as generics do.
        let text = format!("{}export default (a: number, b: number): Array<Array<number>> => [[a < b ? 1 : 0]];\n", "if (1 < 2) {}\n".repeat(3000));
        compile(&files(&[("index.ts", &text)]), "index.ts").unwrap();
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

