//! Cloud functions: tenants' JavaScript and TypeScript, run in-process on QuickJS.
//!
//! - [`source`]: a function's files checked and stripped of types (oxc), with errors that
//!   name file, line and column;
//! - `engine`: one QuickJS runtime per gateway on a thread of its own, with CPU, wall-clock,
//!   memory and concurrency limits per call;
//! - [`live`]: the data plane's side: a `Contributor` that lowers a gateway's published
//!   functions (one partition per gateway, keyed by its hosts) into routes ending in a
//!   `Handler` that calls the runtime;
//! - [`guard`]: where a function's `fetch` may go.

pub mod engine;
pub mod fetch;
pub mod guard;
pub use weir_upstream::lanes;
pub mod live;
pub mod metrics;
pub mod source;
mod watchdog;
mod deadline;
mod priority;

mod mailbox;
mod reply;
mod sdk;

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use engine::{DbRequest, DbRunner, Engine, Failure, Outcome, Reach, Reply, Request, Services, User};
pub use source::{CompileError, Compiled};

/// `m` locked; one a panicking holder poisoned is taken as it is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A function as loaded: compiled, with where it lives.
#[derive(Debug)]
pub struct Function {
    pub env: String,
    /// Its name inside the environment (`user/me`).
    pub name: String,
    /// Unique for its content: `{version}-{hash}`.
    pub version: String,
    /// The versions of the functions its modules import by name, followed through theirs, as
    /// one hash (0: it imports none). Part of its modules' names, so that a new version of any
    /// of them loads its modules afresh, bound to the new one.
    pub links: u64,
    /// Shared by the gateway's functions of the same source.
    pub compiled: std::sync::Arc<Compiled>,
    /// Methods it answers; empty: all.
    pub methods: Vec<String>,
    /// Its recent log lines.
    pub logs: std::sync::Arc<Logs>,
}

/// A function's name: 1 to 8 segments of `[A-Za-z0-9_-]`, joined by `/`.
pub fn valid_name(name: &str) -> bool {
    let segments: Vec<&str> = name.split('/').collect();
    name.len() <= 256
        && (1..=8).contains(&segments.len())
        && segments.iter().all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
}

/// The database an environment's functions reach, and the quotas the gateway set (the node's
/// defaults where it set none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct DbScope {
    /// `{gid}`, or `{gid}.{env}` when each environment has its own.
    pub name: String,
    #[serde(flatten)]
    pub limits: DbLimits,
}

/// A gateway's database quotas, where it set them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct DbLimits {
    /// Documents the database may hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub documents: Option<u64>,
    /// Bytes of documents it may hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Milliseconds one query may run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_ms: Option<u64>,
}

/// Limits of a gateway's calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct LimitsDoc {
    /// CPU time spent running JavaScript per call, in milliseconds.
    pub timeout_ms: u64,
    /// Wall-clock time per call, waits included, in milliseconds.
    pub wall_ms: u64,
    /// Memory of the gateway's runtime, in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Calls in flight per node.
    pub concurrency: usize,
}

impl Default for LimitsDoc {
    fn default() -> Self {
        LimitsDoc { timeout_ms: 1_000, wall_ms: 30_000, memory_mib: 64, concurrency: 64 }
    }
}

impl LimitsDoc {
    pub fn limits(&self) -> Limits {
        Limits {
            cpu: Duration::from_millis(self.timeout_ms.max(1)),
            wall: Duration::from_millis(self.wall_ms.max(1)),
            memory: (self.memory_mib.max(1) as usize) << 20,
            concurrency: self.concurrency.max(1),
        }
    }
}

/// [`LimitsDoc`] as the runtime uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub cpu: Duration,
    pub wall: Duration,
    pub memory: usize,
    pub concurrency: usize,
}

/// One line a function logged.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LogLine {
    /// RFC 3339, UTC.
    pub time: String,
    /// Milliseconds since the epoch, for `since` filters.
    #[serde(skip)]
    pub at_ms: i128,
    pub level: String,
    pub request_id: String,
    pub message: String,
}

impl LogLine {
    pub fn now(level: &str, request_id: String, message: String) -> LogLine {
        let now = time::OffsetDateTime::now_utc();
        let time = now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        // A line is bounded: a function cannot fill the buffer with one huge message.
        let message = bounded(message);
        LogLine { time, at_ms: now.unix_timestamp_nanos() / 1_000_000, level: level.to_string(), request_id, message }
    }
}

/// The most of a log line's or an error's text kept, in bytes.
pub const TEXT_KEPT: usize = 8192;

/// Bytes counted for each value of a JSON text parsed into a `serde_json::Value` (each comma,
/// colon and opening bracket): twice the value's own size, as a vector or map that grows by
/// doubling may hold up to twice what it holds, and the place of a member in its map.
const PARSED_VALUE_BYTES: usize = 2 * std::mem::size_of::<serde_json::Value>() + 32;

/// What JSON `text` may take in memory once parsed into a `serde_json::Value`: its bytes (the
/// strings' contents at most), and [`PARSED_VALUE_BYTES`] for each value, counted from the
/// commas, colons and brackets outside its strings. `[0,0,0]` weighs far more than its text.
pub fn parsed_size(text: &str) -> usize {
    let (mut values, mut in_string, mut escaped) = (1usize, false, false);
    for &b in text.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b',' | b':' | b'[' | b'{' => values += 1,
            _ => {}
        }
    }
    text.len().saturating_add(values.saturating_mul(PARSED_VALUE_BYTES))
}

/// `text` cut to `TEXT_KEPT` bytes (at a character boundary, marked `…`) when it is longer.
pub(crate) fn bounded(text: String) -> String {
    if text.len() > TEXT_KEPT { format!("{}…", &text[..text.floor_char_boundary(TEXT_KEPT)]) } else { text }
}

/// The last lines of one function, bounded in number, and in bytes by its gateway's
/// `budget`, which all the gateway's functions on the node share.
#[derive(Debug)]
pub struct Logs {
    lines: Mutex<VecDeque<LogLine>>,
    budget: std::sync::Arc<engine::Budget>,
}

/// Lines kept per function.
pub const LOG_LINES: usize = 1_000;
/// Bytes of lines (messages, request ids and what holds them) one call keeps to answer with
/// (`invoke`'s `logs`).
pub const CALL_LOG_BYTES: usize = 256 << 10;
/// Bytes the kept lines of one gateway's functions may hold on a node.
pub const LOG_BYTES: usize = 16 << 20;

impl Default for Logs {
    fn default() -> Logs {
        Logs::new(std::sync::Arc::new(engine::Budget::new(LOG_BYTES)))
    }
}

/// What a kept line holds, as its gateway's budget and its call's bound count it.
fn cost(line: &LogLine) -> usize {
    line.message.len() + line.request_id.len() + line.time.len() + line.level.len() + std::mem::size_of::<LogLine>()
}

impl Logs {
    pub fn new(budget: std::sync::Arc<engine::Budget>) -> Logs {
        Logs { lines: Mutex::default(), budget }
    }

    /// Keeps `line`, the oldest going first past `LOG_LINES`, or when the gateway's budget
    /// has no room for it; a line that finds none even then is not kept.
    pub fn push(&self, line: LogLine) {
        let Ok(mut q) = self.lines.lock() else { return };
        if q.len() == LOG_LINES
            && let Some(old) = q.pop_front()
        {
            self.budget.give(cost(&old));
        }
        let n = cost(&line);
        while !self.budget.take(n) {
            match q.pop_front() {
                Some(old) => self.budget.give(cost(&old)),
                None => return,
            }
        }
        q.push_back(line);
    }

    /// Lines at or after `since_ms`, the last `limit`, oldest first.
    pub fn since(&self, since_ms: i128, limit: usize) -> Vec<LogLine> {
        let Ok(q) = self.lines.lock() else { return Vec::new() };
        let picked: Vec<LogLine> = q.iter().filter(|l| l.at_ms >= since_ms).cloned().collect();
        picked[picked.len().saturating_sub(limit)..].to_vec()
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        if let Ok(q) = self.lines.get_mut() {
            self.budget.give(q.iter().map(cost).sum());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_paths_of_safe_segments() {
        for ok in ["hello", "user/me", "a-b/c_d/1", "a/b/c/d/e/f/g/h"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "/x", "x/", "a//b", "a/b/c/d/e/f/g/h/i", "a.b", "ü", "a b", "../x"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_json_text_weighs_its_bytes_and_its_values() {
        let weight = |t: &str| parsed_size(t);
        assert_eq!(weight("1"), 1 + PARSED_VALUE_BYTES);
        // Separators inside strings (escaped quotes too) are no values.
        assert_eq!(weight(r#"{"a,b:[{":"x\",y"}"#), 18 + 3 * PARSED_VALUE_BYTES);
        // It is never under what parsing takes: the tree of a wide array of small values, just
        // past a doubling of its vector, and of an object of many members.
        let zeros = format!("[{}0]", "0,".repeat(1024));
        assert_eq!(weight(&zeros), zeros.len() + 1026 * PARSED_VALUE_BYTES);
        let tree = serde_json::from_str::<serde_json::Value>(&zeros).unwrap();
        assert!(weight(&zeros) > tree.as_array().unwrap().capacity() * std::mem::size_of::<serde_json::Value>());
        let members = format!("{{{}\"z\":0}}", (0..1024).map(|i| format!("\"{i}\":0,")).collect::<String>());
        let tree = serde_json::from_str::<serde_json::Value>(&members).unwrap();
        let entry = std::mem::size_of::<(u64, String, serde_json::Value)>() + std::mem::size_of::<usize>();
        assert!(weight(&members) > 2048 * entry + tree.as_object().unwrap().keys().map(String::len).sum::<usize>(), "{}", weight(&members));
    }

    #[test]
    fn logs_keep_the_last_lines() {
        let logs = Logs::default();
        for i in 0..LOG_LINES + 5 {
            logs.push(LogLine { at_ms: i as i128, ..LogLine::now("info", String::new(), format!("{i}")) });
        }
        let all = logs.since(0, usize::MAX);
        assert_eq!(all.len(), LOG_LINES);
        assert_eq!(all[0].message, "5");
        assert_eq!(logs.since(0, 2).iter().map(|l| l.message.as_str()).collect::<Vec<_>>(), [format!("{}", LOG_LINES + 3), format!("{}", LOG_LINES + 4)]);
        assert_eq!(logs.since(LOG_LINES as i128 + 4, 10).len(), 1);
    }

    #[test]
    fn a_gateways_functions_keep_lines_within_its_budget() {
        let line = |i: usize| LogLine { at_ms: i as i128, time: "2026-12-04T00:00:00Z".into(), ..LogLine::now("info", "r".into(), format!("{i:0>100}")) };
        let each = cost(&line(0));
        let budget = std::sync::Arc::new(engine::Budget::new(each * 10));
        let (a, b) = (Logs::new(budget.clone()), Logs::new(budget.clone()));
        for i in 0..25 {
            a.push(line(i));
        }
        // The budget holds ten: a function past it gives up its own oldest lines.
        let kept = a.since(0, usize::MAX);
        assert_eq!(kept.iter().map(|l| l.at_ms).collect::<Vec<_>>(), (15..25).collect::<Vec<i128>>());
        // Another function of the gateway finds no room and has nothing of its own to give.
        b.push(line(100));
        assert!(b.since(0, usize::MAX).is_empty());
        assert!(!budget.take(1));
        // A buffer that goes gives its bytes back.
        drop(a);
        b.push(line(101));
        assert_eq!(b.since(0, usize::MAX).len(), 1);
        assert!(budget.take(each * 9));
        assert!(!budget.take(1));
    }
}
