//! One JavaScript runtime per gateway, on a thread of its own.
//!
//! No heap is shared between gateways: each has its QuickJS runtime (its memory limit
//! counts everything its functions allocate, ArrayBuffers included), on one thread that no
//! proxy worker and no other gateway uses, so a tenant's infinite loop costs the others only
//! the CPU the kernel gives that thread. Calls of one gateway interleave on it: a call runs
//! until it waits (a timer, a `fetch`), and the thread runs other calls meanwhile.
//!
//! Each call has a CPU budget (the runtime thread's CPU spent running JavaScript on its
//! behalf: its first run and every timer or fetch completion it is woken by, with the promise
//! jobs that follow; see `deadline.rs`) and a wall-clock limit. Past the budget the interrupt handler stops the JavaScript (504); past
//! the wall limit the call is dropped (504). Running out of memory fails the call (500) and
//! the runtime is made afresh, failing the gateway's other calls in flight.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::cmp::Reverse;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rquickjs::loader::{Loader, Resolver};
use rquickjs::module::Declared;
use rquickjs::promise::PromiseState;
use rquickjs::{Array, Atom, Context, Ctx, Function as JsFn, Module, Object, Persistent, Promise, Runtime, TypedArray, Value};

use crate::deadline::Deadline;
use crate::mailbox::Mailbox;
use crate::{Function, Limits, LogLine, Logs, lock};

const PRELUDE: &str = include_str!("prelude.js");

/// A request as a function sees it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    /// `None` when the request has no body.
    pub body: Option<String>,
    pub request_id: String,
    pub user: Option<User>,
}

/// Who a call came from, as a function sees it in `ctx.user`.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    /// The consumer an auth plugin named.
    pub name: String,
    /// The application and grant the consumer is, when it is one (`appId`, `grantId`).
    pub grant: Option<Arc<weir_plugins::grant_usage::Grantee>>,
}

/// What a call answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<Field>,
    pub body: Vec<u8>,
}

/// A header field of a reply; the engine's own are static text.
pub type Field = (Cow<'static, str>, Cow<'static, str>);

/// The field of a JSON answer.
pub const JSON_TYPE: Field = (Cow::Borrowed("content-type"), Cow::Borrowed("application/json"));

/// How a call ended when it did not answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The function threw: its message, and its stack. `bare` when what it threw was `null`, an
    /// error without a message, or one whose text could not be cut for want of memory, as
    /// happens when QuickJS has no memory left to say more.
    Threw { message: String, stack: String, status: Option<u16>, bare: bool },
    /// The CPU budget or the wall-clock limit ran out.
    Timeout(&'static str),
    /// The gateway's memory limit was reached.
    Memory,
    /// The runtime could not run it (a module that does not load, a runtime made afresh).
    Internal(String),
}

/// The outcome of a call, with the log lines it wrote.
#[derive(Debug)]
pub struct Outcome {
    pub result: Result<Reply, Failure>,
    pub logs: Vec<LogLine>,
    pub cpu: Duration,
    /// The bytes of a large reply body, held against the gateway's memory limit until the
    /// body goes (sent, or dropped).
    pub hold: Hold,
}

/// Bytes held against a gateway's memory limit while outside its runtime; given back when
/// this goes.
#[derive(Default)]
pub struct Hold(Option<Taken>);

impl Hold {
    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hold({})", self.0.as_ref().map_or(0, |t| t.1))
    }
}

/// Reply bodies from this size on count against the gateway's memory limit until sent:
/// slow clients could otherwise hold any number of them. Smaller ones are not worth the count.
pub const HELD_REPLY_BYTES: usize = 16 << 10;

/// The functions one environment has now, by name, for `@/name` imports.
pub type Table = Arc<HashMap<String, Arc<Function>>>;

/// Something a fetch sends back to the runtime.
pub struct Fetched {
    pub call: u64,
    pub id: u32,
    pub result: Result<(u16, Vec<(String, String)>, Vec<u8>), String>,
    /// The body's bytes taken from the gateway's budget, given back once the runtime has the
    /// body, or when it never does (its runtime ended first).
    held: Taken,
}

/// A `fetch` a function started, for the node's outbound client to carry out.
pub struct FetchRequest {
    pub gateway: String,
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    /// The gateway's `fetchAllowList`.
    pub allow: Arc<Vec<String>>,
    /// Bytes of the gateway's fetch responses held outside its runtime: the body read takes
    /// from it as it arrives, and the engine gives back once the body is in the runtime. A
    /// read that fails or is dropped (its time is up) gives back what it took.
    pub budget: Arc<Budget>,
    /// Where the answer goes.
    pub reply: Box<dyn FnOnce(Result<(u16, Vec<(String, String)>, Vec<u8>), String>) + Send>,
}

/// Bytes one gateway's fetches may hold on the node outside its runtime, where its memory
/// limit counts them: as many as that limit.
#[derive(Debug, Default)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget { used: AtomicUsize::new(0), limit }
    }

    /// Takes `n` bytes; false, taking nothing, when they are not left.
    pub fn take(&self, n: usize) -> bool {
        self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(n).filter(|t| *t <= self.limit)).is_ok()
    }

    /// Gives back `n` bytes taken.
    pub fn give(&self, n: usize) {
        let _ = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| Some(u.saturating_sub(n)));
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// Carries out fetches off the runtime's thread.
pub type Fetcher = Arc<dyn Fn(FetchRequest) + Send + Sync>;

/// A database operation a function started (`imp.db()`), for the node's databases to run.
pub struct DbRequest {
    pub gateway: String,
    pub scope: crate::DbScope,
    /// The operation, as JSON text.
    pub op: String,
    /// Where the answer goes: the result as JSON text, or the error as JSON text
    /// `{"message", "code", "status"}`.
    pub reply: Box<dyn FnOnce(Result<String, String>) + Send>,
}

/// Runs database operations off the runtime's thread.
pub type DbRunner = Arc<dyn Fn(DbRequest) + Send + Sync>;

/// What a runtime reaches beyond itself, when the node provides it.
#[derive(Clone, Default)]
pub struct Services {
    pub fetcher: Option<Fetcher>,
    pub database: Option<DbRunner>,
}

/// What one call may reach: the hosts its fetches may name, and its database.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    pub allow: Arc<Vec<String>>,
    pub database: Option<crate::DbScope>,
}

pub(crate) struct Job {
    pub func: Arc<Function>,
    pub table: Table,
    pub vars: Arc<serde_json::Map<String, serde_json::Value>>,
    pub limits: Limits,
    pub reach: Arc<Reach>,
    pub request: Request,
    pub reply: crate::reply::Sender,
    /// The call's place among the gateway's calls in flight, held until the runtime is done
    /// with it, whether or not its caller still waits.
    pub place: Option<Place>,
}

/// One of a gateway's calls in flight on this node; given back when dropped.
pub(crate) struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Msg {
    Call(Box<Job>),
    Fetched(Fetched),
    /// A database operation's answer: the call, the operation's id, the result, and the
    /// result's bytes taken from the gateway's budget, if it has any (as `Fetched::held`).
    DbDone(u64, u32, Result<String, String>, Option<Taken>),
    /// Load a function's modules ahead of its first call: the one served at this address (the
    /// last lowering's `Load` of it is read from `served` when its turn comes).
    Warm(usize),
    /// Functions (`{env}/{name}`) no lowering serves any more (deleted, renamed, or their
    /// environment stopped): their modules count as superseded.
    Gone(Vec<String>),
}

/// A function for a runtime to load ahead of its first call, with what its module's top level
/// sees and may spend, as a call of it would.
#[derive(Clone)]
pub struct Load {
    pub func: Arc<Function>,
    pub table: Table,
    pub vars: Arc<serde_json::Map<String, serde_json::Value>>,
    pub cpu: Duration,
}

/// A gateway's runtime, as its handlers hold it; the thread ends when the last is dropped.
pub struct Engine {
    gateway: String,
    mailbox: Arc<Mailbox<Msg>>,
    inflight: Arc<AtomicUsize>,
    /// The functions the last lowering had this runtime load, by address (held, so that no
    /// other takes the address meanwhile); the runtime loads them again when it is made afresh.
    loaded: Arc<std::sync::Mutex<HashMap<usize, Load>>>,
    watch: Arc<crate::watchdog::Watch>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        // No call waits on the runtime any more (each holds the engine while it waits).
        self.mailbox.close();
    }
}

impl Engine {
    pub fn start(gateway: &str, memory: usize, services: Services) -> std::io::Result<Arc<Engine>> {
        Engine::start_with(gateway, memory, services, false)
    }

    /// As [`Engine::start`]; `nice`: at the nicest niceness from the start, as a runtime the
    /// watchdog found busy is (`watchdog.rs`), for a gateway whose runtime before is.
    pub fn start_with(gateway: &str, memory: usize, services: Services, nice: bool) -> std::io::Result<Arc<Engine>> {
        let mailbox = Arc::new(Mailbox::new());
        let inbox = mailbox.clone();
        let gw = gateway.to_string();
        let loaded: Arc<std::sync::Mutex<HashMap<usize, Load>>> = Arc::default();
        let reload = loaded.clone();
        let watch = crate::watchdog::Watch::new(gateway, Deadline::new(), nice);
        let watched = watch.clone();
        // At the process's niceness, whatever thread asks (a slow partition's compile runs nicer).
        let thread = weir_core::threads::spawn(std::thread::Builder::new().name(format!("fn-{gateway}")).stack_size(16 << 20), move || {
                // Marked ended however the thread ends, a panic outside the loop's included.
                let _ends = crate::watchdog::Watch::on_thread(&watched);
                run_as_batch(&gw);
                inbox.attach();
                // A panic in the runtime's loop fails the calls in flight (their answers are
                // dropped) and the loop starts again on a fresh runtime.
                // Call numbers go on across restarts: an answer still on its way for a call
                // before the panic never names a call after it.
                let next_call = std::cell::Cell::new(1);
                // And so does the last reload's time: a runtime that panics is not loaded afresh
                // more often for it.
                let reloaded = std::cell::Cell::new(None);
                // And so do the places and bytes of the gateway's fetches and database
                // operations: those of the runtime before a panic are still under way.
                let slots = Slots::new(memory);
                while std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&gw, memory, &inbox, &services, &reload, &next_call, &reloaded, &slots, &watched.deadline))).is_err() {
                    tracing::error!(gateway = %gw, "the function runtime panicked; it starts afresh");
                }
        })?;
        watch.watch(thread);
        Ok(Arc::new(Engine { gateway: gateway.to_string(), mailbox, inflight: Arc::new(AtomicUsize::new(0)), loaded, watch }))
    }

    /// Whether the node's watchdog found the runtime stuck in a loop it cannot be stopped in
    /// (`watchdog`): its gateway is to start another.
    pub fn stuck(&self) -> bool {
        self.watch.stuck()
    }

    /// Whether the runtime runs at the nicest niceness for having kept its core busy.
    pub fn nice(&self) -> bool {
        self.watch.nice()
    }

    /// Has `f` run (once, on the watchdog's thread) when the runtime is found stuck.
    pub fn when_stuck(&self, f: impl Fn() + Send + Sync + 'static) {
        self.watch.when_stuck(Box::new(f));
    }

    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// Calls in flight on this node.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Loads each of `funcs` (every function a lowering serves on this runtime) that it was not
    /// given to load before, ahead of its first call; those not among them are forgotten, so one
    /// served again later is loaded again. Answers how many it loads.
    pub fn load(&self, funcs: Vec<Load>) -> usize {
        let mut loaded = lock(&self.loaded);
        let mut now = HashMap::with_capacity(funcs.len());
        let mut sent = 0;
        for load in funcs {
            let at = Arc::as_ptr(&load.func) as usize;
            if !loaded.contains_key(&at) {
                let _ = self.mailbox.send(Msg::Warm(at));
                sent += 1;
            }
            now.insert(at, load);
        }
        // Those served before whose name no version now served has.
        let names: HashSet<(&str, &str)> = now.values().map(|l| (l.func.env.as_str(), l.func.name.as_str())).collect();
        let gone: Vec<String> = loaded.values().filter(|l| !names.contains(&(l.func.env.as_str(), l.func.name.as_str()))).map(|l| function_key(&l.func)).collect();
        if !gone.is_empty() {
            let _ = self.mailbox.send(Msg::Gone(gone));
        }
        *loaded = now;
        sent
    }

    /// Runs one call; `None` when more than `limits.concurrency` calls are in flight.
    pub(crate) async fn call(&self, job: impl FnOnce(crate::reply::Sender) -> Job) -> Option<Outcome> {
        Some(self.submit(job)?.outcome().await)
    }

    /// Hands one call to the runtime at once, before anything is awaited; what to wait on for
    /// its outcome, or `None` when more than `limits.concurrency` calls are in flight. The
    /// job is moved once, into its box: a route's future carries only the wait.
    pub(crate) fn submit(&self, job: impl FnOnce(crate::reply::Sender) -> Job) -> Option<Submitted> {
        let (tx, rx) = crate::reply::channel();
        let mut job = Box::new(job(tx));
        let cap = job.limits.concurrency;
        if self.inflight.fetch_add(1, Ordering::AcqRel) >= cap {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        // The place goes with the job: a caller that stops waiting does not free it while the
        // runtime still has the call queued or running.
        job.place = Some(Place(self.inflight.clone()));
        // A stopped runtime hands the job back; dropped here, its reply ends the wait as
        // closed, which `outcome` answers as stopped.
        let _ = self.mailbox.send(Msg::Call(job));
        Some(Submitted(rx))
    }
}

/// A call handed to its runtime: its outcome, once the runtime has it.
pub(crate) struct Submitted(crate::reply::Receiver);

impl Submitted {
    pub(crate) async fn outcome(self) -> Outcome {
        // The runtime ends every call by its wall limit. Against a runtime that stopped
        // answering altogether the caller bounds the wait: a route by its handler's timeout,
        // `Functions::invoke` by its own.
        self.0.await.unwrap_or_else(|_| failed(Failure::Internal("the runtime has stopped".into())))
    }
}

pub(crate) fn failed(f: Failure) -> Outcome {
    Outcome { result: Err(f), logs: Vec::new(), cpu: Duration::ZERO, hold: Hold::default() }
}

/// What the natives share with the loop: which call runs, its timers, logs and fetches.
#[derive(Default)]
struct Host {
    call: u64,
    env: String,
    timers: BinaryHeap<Reverse<(Instant, u64, u32)>>,
    /// Timers cleared while pending, skipped when they come due.
    cancelled: HashSet<(u64, u32)>,
    /// Each call's lines so far, the bytes of their messages, and whether some were not kept.
    /// The bytes are taken from the gateway's budget outside the runtime (`outbound.bytes`).
    logs: HashMap<u64, (Vec<LogLine>, Taken, bool)>,
    /// Fetches and database operations queued this turn, each with its place among the
    /// gateway's in flight (and a fetch with its body's bytes), held until it is answered.
    fetches: Vec<(u64, u32, String, String, Vec<(String, String)>, Option<Vec<u8>>, Taken, Taken)>,
    db_ops: Vec<(u64, u32, String, Taken, Taken)>,
    /// Module name prefix `fn:{env}/{name}@{version}/` → the function.
    functions: HashMap<String, Arc<Function>>,
    /// Each function's (`{env}/{name}`) prefix loaded last.
    newest: HashMap<String, String>,
    /// Versions loaded here and since followed by another of the same function (QuickJS
    /// never unloads a module, and this keeps their sources), and the bytes of their sources.
    superseded: usize,
    superseded_bytes: usize,
    /// Environment → its current table.
    tables: HashMap<String, Table>,
    /// The table of the call running (none while a function loads ahead of its calls): an
    /// `import()` or `imp.invoke` of a call finds what its call was routed with, though another
    /// call made since came by a newer table, or an older one.
    table: Option<Table>,
    /// Where each call's log lines also go (the function's buffer), with its request id.
    sinks: HashMap<u64, (Arc<Logs>, String)>,
    /// The gateway's fetches and database operations in flight, and its bytes of them.
    outbound: Slots,
    /// Each call's fetches and database operations not yet answered, by the ids the SDK gave
    /// them: a call that ends without waiting for them leaves no entry for them in its realm.
    unanswered: HashMap<u64, Unanswered>,
    /// The most timers kept at once ([`timers_at_most`]).
    timers_at_most: usize,
    /// Each realm's context (its address) and environment, for the module loader.
    realms: Vec<(usize, String)>,
}

/// A call's fetch and database operation ids not yet answered.
#[derive(Default)]
struct Unanswered {
    fetches: Vec<u32>,
    db: Vec<u32>,
}

impl Host {
    /// Marks outbound `id` of `call` answered (fetch or database).
    fn answered(&mut self, call: u64, id: u32, fetch: bool) {
        if let Some(u) = self.unanswered.get_mut(&call) {
            let ids = if fetch { &mut u.fetches } else { &mut u.db };
            if let Some(i) = ids.iter().position(|x| *x == id) {
                ids.swap_remove(i);
            }
        }
    }
}

/// A function's key among its gateway's: `{env}/{name}`, whatever its version.
fn function_key(func: &Function) -> String {
    format!("{}/{}", func.env, func.name)
}

impl Host {
    /// Notes `func` loaded under module name `prefix`; a version it follows counts as
    /// superseded.
    fn add(&mut self, prefix: String, func: Arc<Function>) {
        if let Some(old) = self.newest.insert(function_key(&func), prefix.clone())
            && old != prefix
        {
            self.supersede(&old);
        }
        self.functions.insert(prefix, func);
    }

    /// Notes function `key` (`{env}/{name}`) served no more: its version loaded last counts as
    /// superseded, as a version followed by another does.
    fn gone(&mut self, key: &str) {
        if let Some(prefix) = self.newest.remove(key) {
            self.supersede(&prefix);
        }
    }

    /// Counts the version loaded under module name `prefix` as superseded, with its sources.
    fn supersede(&mut self, prefix: &str) {
        if let Some(version) = self.functions.get(prefix) {
            self.superseded += 1;
            self.superseded_bytes += version.compiled.modules.values().map(String::len).sum::<usize>();
        }
    }

    /// The call whose work a native of `env`'s realm does: the call running, or `STRAY` when
    /// the running call is of another environment (a promise job another environment's call
    /// left behind runs meanwhile), whose work is refused.
    fn call_of(&self, env: &str) -> u64 {
        if self.env == env { self.call } else { STRAY }
    }

    /// The environment whose realm `ctx` is.
    fn env_of(&self, ctx: &Ctx<'_>) -> Option<&str> {
        let at = ctx.as_raw().as_ptr() as usize;
        self.realms.iter().find(|(c, _)| *c == at).map(|(_, env)| env.as_str())
    }
}

/// The call of work refused because it came from another environment's realm.
const STRAY: u64 = u64::MAX;
const STRAY_REFUSAL: &str = "refused: the call this belongs to has ended";

type Shared = Rc<RefCell<Host>>;

fn module_prefix(f: &Function) -> String {
    match f.links {
        0 => format!("fn:{}/{}@{}/", f.env, f.name, f.version),
        links => format!("fn:{}/{}@{}.{links:016x}/", f.env, f.name, f.version),
    }
}

struct Names(Shared);

impl Resolver for Names {
    fn resolve<'js>(&mut self, ctx: &Ctx<'js>, base: &str, name: &str, _attrs: Option<rquickjs::loader::ImportAttributes<'js>>) -> rquickjs::Result<String> {
        let host = self.0.borrow();
        let missing = || rquickjs::Error::new_resolving(base, name);
        // A realm loads its own environment's functions only.
        let env = host.env_of(ctx).ok_or_else(missing)?;
        if let Some(rest) = name.strip_prefix("fn:") {
            return match rest.split_once('/') {
                Some((e, _)) if e == env => Ok(name.to_string()),
                _ => Err(missing()),
            };
        }
        // Another function of the realm's environment (`imp.invoke` imports from the SDK,
        // outside any function's module).
        if let Some(other) = name.strip_prefix("@/") {
            let table = host.table.as_ref().filter(|_| host.env == env).or_else(|| host.tables.get(env)).ok_or_else(missing)?;
            let target = table.get(other).ok_or_else(missing)?;
            return Ok(format!("{}{}", module_prefix(target), target.compiled.entry));
        }
        // A file of the function the importing module belongs to.
        let (prefix, file) = base.find('@').and_then(|at| base[at..].find('/').map(|s| at + s + 1)).map(|end| (&base[..end], &base[end..])).ok_or_else(missing)?;
        let func = host.functions.get(prefix).ok_or_else(missing)?;
        let found = crate::source::resolve_relative(|p| func.compiled.modules.contains_key(p), file, name).ok_or_else(missing)?;
        Ok(format!("{prefix}{found}"))
    }
}

struct Sources(Shared);

impl Loader for Sources {
    fn load<'js>(&mut self, ctx: &Ctx<'js>, name: &str, _attrs: Option<rquickjs::loader::ImportAttributes<'js>>) -> rquickjs::Result<Module<'js, Declared>> {
        let source = {
            let mut host = self.0.borrow_mut();
            let missing = || rquickjs::Error::new_loading(name);
            let env = host.env_of(ctx).ok_or_else(missing)?.to_string();
            if name.strip_prefix("fn:").and_then(|rest| rest.split_once('/')).is_none_or(|(e, _)| e != env) {
                return Err(missing());
            }
            let end = name.find('@').and_then(|at| name[at..].find('/').map(|s| at + s + 1)).ok_or_else(missing)?;
            // A function named by `@/name` is known from its environment's table.
            if !host.functions.contains_key(&name[..end]) {
                let named = |t: &Table| t.values().find(|f| module_prefix(f) == name[..end]).cloned();
                let found = host.table.as_ref().filter(|_| host.env == env).and_then(named).or_else(|| host.tables.get(&env).and_then(named));
                if let Some(f) = found {
                    host.add(name[..end].to_string(), f);
                }
            }
            let func = host.functions.get(&name[..end]).ok_or_else(missing)?;
            func.compiled.modules.get(&name[end..]).cloned().ok_or_else(missing)?
        };
        Module::declare(ctx.clone(), name, source)
    }
}

/// A call in flight.
struct Live {
    job: Job,
    promise: Persistent<Promise<'static>>,
    started: Instant,
    cpu: Duration,
}

/// One environment's realm in its gateway's runtime: a context of its own (globals,
/// intrinsics, the SDK and its state, modules), so that no environment's code changes what
/// another's sees or reaches another's functions, while the runtime's memory limit still counts
/// the whole gateway. Fields drop in order: the values held in the context go before it.
struct Realm {
    /// Each loaded function's default export, by the function (kept alive with it).
    exports: RefCell<HashMap<usize, (Arc<Function>, Persistent<Value<'static>>)>>,
    /// Each function's entry in `exports`, by name: one per function.
    exported: RefCell<HashMap<String, usize>>,
    /// `ctx.user` as frozen objects, by consumer name, with the grant each was made for: a
    /// gateway's calls come from few callers, and each call so gets its caller ready-made.
    users: Users,
    /// The gateway's variables as a frozen object, for the variables they were made from.
    vars: RefCell<Option<(Arc<serde_json::Map<String, serde_json::Value>>, Persistent<Value<'static>>)>>,
    /// The prelude's `__weir.run`.
    run: Persistent<JsFn<'static>>,
    /// The names of a call's context, made once.
    keys: Keys,
    /// The prelude's `__weir`: how the engine fires timers and hands back fetches and
    /// database results.
    sdk: Persistent<Object<'static>>,
    ctx: Context,
    /// The runtime's interrupt deadline (`Js::deadline`), for loops of its own that run
    /// JavaScript.
    deadline: Deadline,
}

/// The property names a call's context can have, as the runtime's atoms: a name given as text
/// is looked up in the runtime's table of atoms each time it is used.
struct Keys {
    method: Persistent<Atom<'static>>,
    path: Persistent<Atom<'static>>,
    query: Persistent<Atom<'static>>,
    headers: Persistent<Atom<'static>>,
    body: Persistent<Atom<'static>>,
    request_id: Persistent<Atom<'static>>,
    user: Persistent<Atom<'static>>,
}

impl Keys {
    fn new(ctx: &Ctx<'_>) -> rquickjs::Result<Keys> {
        let atom = |name: &str| Atom::from_str(ctx.clone(), name).map(|a| Persistent::save(ctx, a));
        Ok(Keys {
            method: atom("method")?,
            path: atom("path")?,
            query: atom("query")?,
            headers: atom("headers")?,
            body: atom("body")?,
            request_id: atom("requestId")?,
            user: atom("user")?,
        })
    }
}

/// `key` in the runtime of `ctx`.
fn key<'js>(ctx: &Ctx<'js>, key: &Persistent<Atom<'static>>) -> rquickjs::Result<Atom<'js>> {
    key.clone().restore(ctx)
}

impl Realm {
    /// The SDK's entry point `name`.
    fn sdk<'js>(&self, ctx: &Ctx<'js>, name: &str) -> rquickjs::Result<JsFn<'js>> {
        self.sdk.clone().restore(ctx)?.get(name)
    }
}

/// A gateway's runtime and what the loop keeps of it. Fields drop in order: the realms go
/// before the runtime that owns them.
struct Js {
    /// The environments' realms, each made when its environment first runs.
    realms: RefCell<Vec<(String, Rc<Realm>)>>,
    rt: Runtime,
    host: Shared,
    /// When the running JavaScript must stop; never only before the first call. Between
    /// calls' segments it is a short while after the last arming ([`Js::housekeeping`]): what
    /// the loop does in JavaScript itself (reading an answer or an error, dropping a call's
    /// timers) may run a function's getters or replaced built-ins, and is stopped as a call
    /// would be.
    deadline: Deadline,
    /// A call failed as a runtime out of memory fails and the runtime is still all but full:
    /// the loop makes it afresh.
    full: std::cell::Cell<bool>,
    /// How many segments in a row ended at their budget with promise jobs still queued. One
    /// may be a call that ran out of time amid its own work; a second means the jobs go on
    /// from call to call (a chain of jobs that queues itself again never ends), on later calls'
    /// budgets, so the loop makes the runtime afresh once the calls in flight are done.
    leftover: std::cell::Cell<u8>,
}

/// How long what the loop runs of JavaScript outside a call's segment may take.
const HOUSEKEEPING: Duration = Duration::from_millis(20);

impl Realm {
    /// The default export of `func`, loaded once.
    fn export<'js>(&self, ctx: &Ctx<'js>, func: &Arc<Function>, vars: &Arc<serde_json::Map<String, serde_json::Value>>) -> Result<Value<'js>, Failure> {
        let key = Arc::as_ptr(func) as usize;
        if let Some((_, v)) = self.exports.borrow().get(&key) {
            return v.clone().restore(ctx).map_err(|e| caught(self, ctx, e));
        }
        // A module's top level sees the gateway's variables (`imp.env`) as its calls do.
        let vars = self.vars(ctx, vars)?;
        self.sdk(ctx, "setVars").and_then(|f| f.call::<_, ()>((vars,))).map_err(|e| caught(self, ctx, e))?;
        let caught = |e: rquickjs::Error| caught(self, ctx, e);
        let name = format!("{}{}", module_prefix(func), func.compiled.entry);
        let loading = Module::import(ctx, name).map_err(caught)?;
        // Loading runs as promise jobs; a module's top level that waits on a timer or a
        // fetch is not supported. An interrupted job still counts as run, so the deadline is
        // read here too: jobs that queue each other again would run for ever.
        while loading.state() == PromiseState::Pending && !self.deadline.past() && ctx.execute_pending_job() {}
        if loading.state() == PromiseState::Pending && self.deadline.past() {
            return Err(Failure::Timeout("the call ran past its CPU budget"));
        }
        let ns: Object<'_> = match loading.state() {
            PromiseState::Resolved => loading.result::<Object<'_>>().unwrap_or_else(|| Err(rquickjs::Error::Unknown)).map_err(caught)?,
            PromiseState::Rejected => return Err(caught(loading.result::<Value<'_>>().and_then(|r| r.err()).unwrap_or(rquickjs::Error::Unknown))),
            PromiseState::Pending => return Err(Failure::Internal("the module's top level waits; export a function instead".into())),
        };
        let handler: Value<'js> = ns.get("default").map_err(caught)?;
        let mut exports = self.exports.borrow_mut();
        // One entry per function: an earlier version's goes (a call that still runs it loads
        // it again from its module, still in the runtime), so saves do not pile entries up.
        if let Some(before) = self.exported.borrow_mut().insert(func.name.clone(), key)
            && before != key
        {
            exports.remove(&before);
        }
        exports.insert(key, (func.clone(), Persistent::save(ctx, handler.clone())));
        Ok(handler)
    }

    /// The gateway's variables as a frozen object, made once per set of variables.
    fn vars<'js>(&self, ctx: &Ctx<'js>, vars: &Arc<serde_json::Map<String, serde_json::Value>>) -> Result<Value<'js>, Failure> {
        if let Some((held, v)) = &*self.vars.borrow()
            && Arc::ptr_eq(held, vars)
        {
            return v.clone().restore(ctx).map_err(|e| caught(self, ctx, e));
        }
        let v = rquickjs_serde_value(ctx, &serde_json::Value::Object((**vars).clone())).and_then(|v| frozen(self, ctx, v)).map_err(|e| caught(self, ctx, e))?;
        *self.vars.borrow_mut() = Some((vars.clone(), Persistent::save(ctx, v.clone())));
        Ok(v)
    }
}

impl Js {
    fn new(memory: usize, slots: &Slots, deadline: Deadline) -> rquickjs::Result<Js> {
        let rt = Runtime::new()?;
        rt.set_memory_limit(memory);
        rt.set_max_stack_size(1 << 20);
        rt.set_gc_threshold(memory / 4);
        let host: Shared = Rc::new(RefCell::new(Host { outbound: slots.clone(), timers_at_most: timers_at_most(memory), ..Host::default() }));
        rt.set_loader(Names(host.clone()), Sources(host.clone()));
        {
            let deadline = deadline.clone();
            rt.set_interrupt_handler(Some(Box::new(move || deadline.interrupt())));
        }
        Ok(Js { realms: RefCell::default(), rt, host, deadline, full: Default::default(), leftover: Default::default() })
    }

    /// Gives what the loop runs next of JavaScript outside a call's segment [`HOUSEKEEPING`].
    /// What it runs is no call's: timers, fetches, database operations and log lines it asks
    /// for are refused, as those of another environment's realm are.
    /// Its time counts as the runtime's running while what this returns is held (inside a
    /// segment, as the segment's).
    fn housekeeping(&self) -> Counted<'_> {
        let now = Instant::now();
        self.deadline.arm(now, HOUSEKEEPING);
        self.host.borrow_mut().call = STRAY;
        Counted(self.deadline.enter(now).then_some(&self.deadline))
    }

    /// `env`'s realm, made (its natives and the SDK) the first time.
    fn realm(&self, env: &str) -> rquickjs::Result<Rc<Realm>> {
        if let Some((_, r)) = self.realms.borrow().iter().find(|(e, _)| e == env) {
            return Ok(r.clone());
        }
        let host = &self.host;
        let ctx = Context::full(&self.rt)?;
        ctx.with(|ctx| -> rquickjs::Result<()> {
            let natives = Object::new(ctx.clone())?;
            let (h, e) = (host.clone(), env.to_string());
            natives.set("timer", JsFn::new(ctx.clone(), move |id: u32, ms: f64| -> Option<String> {
                let mut host = h.borrow_mut();
                if host.timers.len() >= host.timers_at_most {
                    return Some(format!("this gateway has {} timers pending; no more may be set until some fire or are cleared", host.timers_at_most));
                }
                let call = host.call_of(&e);
                if call == STRAY {
                    return Some(STRAY_REFUSAL.into());
                }
                // A delay that is no number (NaN) is none, as WHATWG's timers take it.
                let secs = if ms.is_finite() { (ms / 1000.0).clamp(0.0, 86_400.0) } else { 0.0 };
                let due = Instant::now() + Duration::from_secs_f64(secs);
                host.timers.push(Reverse((due, call, id)));
                None
            })?)?;
            let (h, e) = (host.clone(), env.to_string());
            natives.set("clearTimer", JsFn::new(ctx.clone(), move |id: u32| {
                let mut host = h.borrow_mut();
                let call = host.call_of(&e);
                // Only pending timers are worth cancelling: there are never more cancellations
                // than timers (a function that replaced the prelude's bookkeeping may ask for any).
                if call != STRAY && host.cancelled.len() < host.timers.len() {
                    host.cancelled.insert((call, id));
                }
            })?)?;
            let (h, e) = (host.clone(), env.to_string());
            natives.set("log", JsFn::new(ctx.clone(), move |level: String, message: String| {
                let mut guard = h.borrow_mut();
                let call = guard.call_of(&e);
                if call == STRAY {
                    return;
                }
                let host = &mut *guard;
                let request = host.sinks.get(&call).map(|(_, r)| r.clone()).unwrap_or_default();
                let line = LogLine::now(&level, request, message);
                if let Some((sink, _)) = host.sinks.get(&call) {
                    sink.push(line.clone());
                }
                // What the call answers with is bounded: its first lines, then one that says
                // the rest were not kept.
                // They are held outside the runtime until the call answers, so they count against
                // the gateway's memory limit there, as fetched bodies do.
                let (kept, bytes, full) = host.logs.entry(call).or_insert_with(|| (Vec::new(), Taken(host.outbound.bytes.clone(), 0), false));
                if !*full {
                    // Each line counts whole: a client's request id, which every line repeats, too.
                    let cost = crate::cost(&line);
                    let within = kept.len() < crate::LOG_LINES && bytes.1 + cost <= crate::CALL_LOG_BYTES;
                    if within && bytes.grow(cost) {
                        kept.push(line);
                    } else {
                        *full = true;
                        let message = match within {
                            true => "later lines of this call are not kept here (the gateway's memory limit)".to_string(),
                            false => format!("later lines of this call are not kept here (past {} lines or {} KiB)", crate::LOG_LINES, crate::CALL_LOG_BYTES >> 10),
                        };
                        kept.push(LogLine { message, level: "warn".into(), ..line });
                    }
                }
            })?)?;
            let e = env.to_string();
            natives.set("environment", JsFn::new(ctx.clone(), move || e.clone())?)?;
            natives.set("uuid", JsFn::new(ctx.clone(), crate::sdk::uuid)?)?;
            natives.set("random", JsFn::new(ctx.clone(), random_native)?)?;
            // What hashing and encoding copy outside the runtime counts against the gateway's
            // memory limit there, taken before it is copied.
            natives.set("digest", JsFn::new(ctx.clone(), digester(host.clone()))?)?;
            natives.set("encode", JsFn::new(ctx.clone(), encoder(host.clone()))?)?;
            // What decoding copies outside the runtime counts against the gateway's memory
            // limit there while it is made (the text itself is the runtime's once made).
            let h = host.clone();
            natives.set("decode", JsFn::new(ctx.clone(), move |ctx: Ctx<'_>, bytes: rquickjs::String<'_>, n: usize, fatal: bool, ignore_bom: bool| -> rquickjs::Result<Option<String>> {
                let budget = h.borrow().outbound.bytes.clone();
                // For a text of `n` chars (a byte each, unless a function reshaped the typed
                // arrays): their UTF-8 (two bytes a char at most; three past U+07FF) and the
                // bytes, then the bytes and the text made of them (three for one at most),
                // taken before any is copied.
                let Some(_held) = Taken::of(&budget, n.saturating_mul(4)) else {
                    return Err(rquickjs::Exception::throw_range(&ctx, "TextDecoder: the data is too large for this gateway's memory limit"));
                };
                // A checked conversion: whatever a function did to the SDK's bytes, no string
                // that is not well formed reaches Rust.
                let Ok(text) = bytes.to_string() else {
                    return Err(rquickjs::Exception::throw_type(&ctx, "TextDecoder: the data is not bytes"));
                };
                let bytes = latin1(&text);
                drop(text);
                Ok(decode_native(&bytes, fatal, ignore_bom))
            })?)?;
            let (h, e) = (host.clone(), env.to_string());
            // Each answers why the operation may not start, or nothing when it is queued.
            natives.set("fetch", JsFn::new(ctx.clone(), move |id: u32, method: String, url: String, headers: Array<'_>, body: Option<Array<'_>>| -> rquickjs::Result<Option<String>> {
                if h.borrow().call_of(&e) == STRAY {
                    return Ok(Some(STRAY_REFUSAL.into()));
                }
                let slots = h.borrow().outbound.clone();
                let Some(place) = slots.place() else {
                    return Ok(Some(format!("fetch to {} refused: {}", crate::fetch::without_userinfo(&url), Slots::refusal("fetch"))));
                };
                let headers = header_list(&headers)?;
                let body = match body.map(|b| from_wire_within(&b, &slots.bytes)).transpose()? {
                    Some(None) => return Ok(Some(format!("fetch to {} refused: the request and the fetches in flight would pass this gateway's memory limit", crate::fetch::without_userinfo(&url).chars().take(200).collect::<String>()))),
                    Some(Some(b)) => Some(b),
                    None => None,
                };
                // The request leaves the runtime's memory: until it is sent it counts against
                // the gateway's limit here, its URL and headers with its body.
                let size = body.as_ref().map_or(0, Vec::len) + method.len() + url.len() + headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
                let Some(bytes) = Taken::of(&slots.bytes, size) else {
                    let url = crate::fetch::without_userinfo(&url).chars().take(200).collect::<String>();
                    return Ok(Some(format!("fetch to {url} refused: the request and the fetches in flight would pass this gateway's memory limit")));
                };
                let mut host = h.borrow_mut();
                let call = host.call_of(&e);
                host.unanswered.entry(call).or_default().fetches.push(id);
                host.fetches.push((call, id, method, url, headers, body, place, bytes));
                Ok(None)
            })?)?;
            let (h, e) = (host.clone(), env.to_string());
            natives.set("db", JsFn::new(ctx.clone(), move |id: u32, op: rquickjs::String<'_>, n: usize| -> rquickjs::Result<Option<String>> {
                if h.borrow().call_of(&e) == STRAY {
                    return Ok(Some(STRAY_REFUSAL.into()));
                }
                // The text is copied out only once the least its copy takes (a byte a char)
                // is taken.
                let too_much = "this database operation and the fetches and database results outside this gateway's runtime would pass its memory limit";
                let op = {
                    let budget = h.borrow().outbound.bytes.clone();
                    let Some(_copying) = Taken::of(&budget, n) else {
                        return Ok(Some(too_much.into()));
                    };
                    op.to_string()?
                };
                let mut host = h.borrow_mut();
                let Some(place) = host.outbound.place() else {
                    return Ok(Some(Slots::refusal("database operation")));
                };
                // The operation counts against the gateway's limit until it has run, as its
                // text and the tree the node parses it into.
                let Some(bytes) = Taken::of(&host.outbound.bytes, crate::parsed_size(&op)) else {
                    return Ok(Some(too_much.into()));
                };
                let call = host.call_of(&e);
                host.unanswered.entry(call).or_default().db.push(id);
                host.db_ops.push((call, id, op, place, bytes));
                Ok(None)
            })?)?;
            ctx.globals().set("__host", natives)?;
            ctx.eval::<(), _>(PRELUDE)?;
            Ok(())
        })?;
        // The SDK's entry points, held here and taken off the globals: a function reaches
        // neither them nor the engine's side of its calls.
        let (sdk, run, keys) = ctx.with(|ctx| -> rquickjs::Result<(Persistent<Object<'static>>, Persistent<JsFn<'static>>, Keys)> {
            let weir: Object<'_> = ctx.globals().get("__weir")?;
            ctx.globals().remove("__weir")?;
            Ok((Persistent::save(&ctx, weir.clone()), Persistent::save(&ctx, weir.get::<_, JsFn<'_>>("run")?), Keys::new(&ctx)?))
        })?;
        host.borrow_mut().realms.push((ctx.as_raw().as_ptr() as usize, env.to_string()));
        let realm = Rc::new(Realm { exports: RefCell::default(), exported: RefCell::default(), users: RefCell::default(), vars: RefCell::default(), run, keys, sdk, ctx, deadline: self.deadline.clone() });
        self.realms.borrow_mut().push((env.to_string(), realm.clone()));
        Ok(realm)
    }

    fn register(&mut self, func: &Arc<Function>, table: &Table) {
        let exported = self.realms.borrow().iter().any(|(e, r)| *e == func.env && r.exports.borrow().contains_key(&(Arc::as_ptr(func) as usize)));
        let mut host = self.host.borrow_mut();
        if !exported {
            let prefix = module_prefix(func);
            if !host.functions.contains_key(&prefix) {
                host.add(prefix, func.clone());
            }
        }
        if host.tables.get(&func.env).is_none_or(|t| !Arc::ptr_eq(t, table)) {
            host.tables.insert(func.env.clone(), table.clone());
        }
    }

    /// Runs `f` as part of call `call` from `start` (now) with `budget` of CPU, then the promise
    /// jobs it queued; returns how long that took, whether the budget ran out and whether
    /// memory did.
    fn segment<T>(&self, call: u64, env: &str, start: Instant, budget: Duration, f: impl FnOnce(&Realm, &Ctx<'_>) -> Result<T, Failure>) -> (Result<T, Failure>, Duration, bool, bool) {
        {
            let mut host = self.host.borrow_mut();
            host.call = call;
            if host.env != env {
                host.env = env.to_string();
            }
        }
        self.deadline.arm(start, budget);
        self.deadline.enter(start);
        let out = match self.realm(env) {
            Ok(realm) => realm.ctx.with(|ctx| f(&realm, &ctx)),
            Err(rquickjs::Error::Allocation) => Err(Failure::Memory),
            Err(e) => Err(Failure::Internal(format!("the environment's runtime could not start: {e}"))),
        };
        let mut oom = false;
        while self.rt.is_job_pending() {
            if let Err(e) = self.rt.execute_pending_job() {
                // What ends a job with an exception: an interrupt, running out of memory, or
                // a function's own error where nothing in JavaScript could catch it (a
                // microtask's). It is taken off the context here, or the next call would see
                // it; its text is read through its realm's `cut`.
                let realm = self.realms.borrow().iter().find(|(_, r)| r.ctx.as_raw() == e.0.as_raw()).map(|(_, r)| r.clone());
                let failure = e.0.with(|ctx| thrown(realm.as_deref(), &ctx.catch()));
                oom |= failure == Failure::Memory || (matches!(failure, Failure::Threw { bare: true, .. }) && nearly_full(&self.rt));
                if oom || self.deadline.past() {
                    break;
                }
            }
        }
        self.leftover.set(if self.rt.is_job_pending() { self.leftover.get().saturating_add(1) } else { 0 });
        let after = Instant::now();
        let spent = self.deadline.spent(after);
        let _counted = self.housekeeping();
        // A job that ran out of memory inside QuickJS's promise machinery, where not even the
        // rejection could be made, leaves its exception on the context and its call waiting
        // for good: the exception is taken off (or the next call would meet it) and counts as
        // running out of memory.
        for (_, realm) in self.realms.borrow().iter() {
            if let Some(left) = realm.ctx.with(|ctx| ctx.has_exception().then(|| thrown(Some(realm), &ctx.catch()))) {
                oom |= !matches!(left, Failure::Timeout(_));
            }
        }
        let end = Instant::now();
        // Under a precise deadline, the tail's CPU (the housekeeping arming's), as the
        // segment's; otherwise its time passed.
        let tail = if self.deadline.is_precise() { self.deadline.spent(end) } else { end.saturating_duration_since(after) };
        self.deadline.leave(end);
        let took = spent + tail;
        (out, took, took >= budget, oom)
    }
}

/// Housekeeping's time as the runtime's running, until this goes (`None`: counted already).
struct Counted<'a>(Option<&'a Deadline>);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if let Some(d) = self.0 {
            d.leave(Instant::now());
        }
    }
}

fn random_native<'js>(ctx: Ctx<'js>, n: usize) -> rquickjs::Result<Value<'js>> {
    let a = TypedArray::<u8>::new_copy(ctx, crate::sdk::random(n.min(65_536)))?;
    Ok(a.arraybuffer()?.into_value())
}

/// `crypto.subtle.digest`'s native: the data copied out once its copies fit the budget.
fn digester(host: Shared) -> impl for<'js> Fn(Ctx<'js>, u32, Array<'js>) -> rquickjs::Result<Value<'js>> {
    move |ctx, bits, data| {
        let budget = host.borrow().outbound.bytes.clone();
        let Some(bytes) = from_wire_within(&data, &budget)? else {
            return Err(rquickjs::Exception::throw_range(&ctx, "crypto.subtle.digest: the data is too large for this gateway's memory limit"));
        };
        // The copy counts while it is hashed.
        let Some(_hashing) = Taken::of(&budget, bytes.len()) else {
            return Err(rquickjs::Exception::throw_range(&ctx, "crypto.subtle.digest: the data is too large for this gateway's memory limit"));
        };
        let Some(out) = crate::sdk::digest(bits, &bytes) else { return Err(rquickjs::Exception::throw_type(&ctx, "unsupported digest")) };
        Ok(TypedArray::<u8>::new_copy(ctx, out)?.arraybuffer()?.into_value())
    }
}

/// `TextEncoder`'s native: a text of `n` UTF-16 units copied out once the least its UTF-8
/// takes (a byte a unit) fits the budget.
fn encoder(host: Shared) -> impl for<'js> Fn(Ctx<'js>, rquickjs::String<'js>, usize) -> rquickjs::Result<Value<'js>> {
    move |ctx, s, n| {
        let budget = host.borrow().outbound.bytes.clone();
        let Some(_copying) = Taken::of(&budget, n) else {
            return Err(rquickjs::Exception::throw_range(&ctx, "TextEncoder: the text is too large for this gateway's memory limit"));
        };
        encode_native(ctx, s.to_string()?)
    }
}

/// The UTF-8 of a well-formed string (the prelude replaces lone surrogates before), as a
/// `Uint8Array` copied into the runtime's heap, so that it counts against its memory limit (a
/// buffer handed over from Rust would not).
fn encode_native<'js>(ctx: Ctx<'js>, s: String) -> rquickjs::Result<Value<'js>> {
    Ok(TypedArray::<u8>::new_copy(ctx, s.as_bytes())?.into_value())
}

/// Decodes bytes as WHATWG's UTF-8 decoder does: a leading byte order mark
/// is dropped unless `ignore_bom`, and each maximal ill-formed subpart is one U+FFFD, or,
/// when `fatal`, the answer is `None`.
fn decode_native(bytes: &[u8], fatal: bool, ignore_bom: bool) -> Option<String> {
    let bytes = match bytes.strip_prefix(b"\xEF\xBB\xBF") {
        Some(rest) if !ignore_bom => rest,
        _ => bytes,
    };
    match std::str::from_utf8(bytes) {
        Ok(s) => Some(s.to_string()),
        Err(_) if fatal => None,
        Err(_) => Some(String::from_utf8_lossy(bytes).into_owned()),
    }
}

/// The bytes of a string whose chars are all below 256, one byte per char.
fn latin1(s: &str) -> Vec<u8> {
    s.chars().map(|c| c as u32 as u8).collect()
}

/// The most header fields one list carries between a function and the node, and the most
/// bytes of their names and values.
const MAX_HEADERS: usize = 1000;
const MAX_HEADER_BYTES: usize = 256 << 10;

/// The `[name, value]` pairs of a list the prelude made (others are skipped), refused past
/// [`MAX_HEADERS`] or [`MAX_HEADER_BYTES`]. Each string is counted as it is copied, so a list
/// that names one large string many times is refused before it is copied many times.
fn header_list(list: &Array<'_>) -> rquickjs::Result<Vec<(String, String)>> {
    let too_many = |what: String| Err(rquickjs::Exception::throw_range(list.ctx(), &what));
    let len = length(list)?;
    if len > MAX_HEADERS {
        return too_many(format!("{len} header fields; at most {MAX_HEADERS} may be sent"));
    }
    let mut out = Vec::with_capacity(len);
    let mut bytes = 0;
    for i in 0..len {
        let Some(pair) = list.get::<Value<'_>>(i)?.into_array() else { continue };
        if length(&pair)? != 2 {
            continue;
        }
        let name: String = pair.get(0)?;
        bytes += name.len();
        if bytes <= MAX_HEADER_BYTES {
            let value: String = pair.get(1)?;
            bytes += value.len();
            out.push((name, value));
        }
        if bytes > MAX_HEADER_BYTES {
            return too_many(format!("header fields of more than {} KiB; at most that may be sent", MAX_HEADER_BYTES >> 10));
        }
    }
    Ok(out)
}

/// An array's length, read as JavaScript sees it (a length past 2^31 is no small integer, which
/// `Array::len` asserts it is).
fn length(a: &Array<'_>) -> rquickjs::Result<usize> {
    let n: f64 = a.as_object().get("length")?;
    Ok(if n.is_finite() && n >= 0.0 { n as usize } else { 0 })
}

/// Bytes from the prelude's `[binary, string, length]`.
fn from_wire(v: &Array<'_>) -> rquickjs::Result<Vec<u8>> {
    let binary: bool = v.get(0)?;
    let s: String = v.get(1)?;
    Ok(if binary { latin1(&s) } else { s.into_bytes() })
}

/// As [`from_wire`], copied only once the least its copies take is taken from `budget` (a byte
/// a char of text; for bytes, their UTF-8 then the bytes, two a char at least), and given back
/// when they are made; `None` when it is not there. So a copy past the budget is never made,
/// and one made is at most a few times what was taken.
fn from_wire_within(v: &Array<'_>, budget: &Arc<Budget>) -> rquickjs::Result<Option<Vec<u8>>> {
    let binary: bool = v.get(0)?;
    let n: f64 = v.get(2)?;
    let n = if n.is_finite() && n >= 0.0 { n as usize } else { usize::MAX };
    let Some(_copying) = Taken::of(budget, n.saturating_mul(if binary { 2 } else { 1 })) else { return Ok(None) };
    from_wire(v).map(Some)
}

/// Puts the calling runtime thread under Linux's batch policy at the process's niceness
/// (`priority.rs`): a proxy worker that queues a call keeps its core until it waits, and the
/// runtime then takes every call queued meanwhile in one turn, rather than the two trading the
/// core once per call.
fn run_as_batch(gateway: &str) {
    if let Err(e) = crate::priority::batch_at(crate::priority::RUNTIME_STEPS) {
        tracing::debug!(%gateway, error = %e, "the function runtime keeps the default scheduling policy");
    }
}

pub(crate) use weir_core::threads::stat_field;

/// Queues, after what `batch` holds, the loading of every function the last lowering served:
/// a runtime made afresh has none of them. At most once per [`RELOAD_EVERY`] (`last`): a
/// runtime renewed again and again (a call or a module that runs out of memory each time) loads
/// its functions as they are called, rather than all of them each time.
fn reload(served: &std::sync::Mutex<HashMap<usize, Load>>, batch: &mut VecDeque<Msg>, last: &std::cell::Cell<Option<Instant>>, warms: &mut Warms) {
    let served = lock(served);
    if served.is_empty() || last.get().is_some_and(|at| at.elapsed() < RELOAD_EVERY) {
        return;
    }
    last.set(Some(Instant::now()));
    // Everything served is queued afresh: what was queued before, or is on its way to the
    // queue, is among it.
    warms.clear();
    batch.retain(|m| !matches!(m, Msg::Warm(_)));
    batch.extend(served.keys().map(|at| Msg::Warm(*at)));
}

const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// How long a turn loads functions ahead of their calls before it looks for calls again (one
/// load whose top level runs longer finishes first).
const WARM_SLICE: Duration = Duration::from_millis(2);

/// How often the calls in flight are looked at for callers that went away.
const ABANDONED_CHECK: Duration = Duration::from_millis(500);

#[allow(clippy::too_many_arguments)]
fn run(gateway: &str, memory: usize, mailbox: &Arc<Mailbox<Msg>>, services: &Services, served: &std::sync::Mutex<HashMap<usize, Load>>, next_call: &std::cell::Cell<u64>, reloaded: &std::cell::Cell<Option<Instant>>, slots: &Slots, deadline: &Deadline) {
    // A segment a panic cut short ends here.
    deadline.leave(Instant::now());
    let mut js = match Js::new(memory, slots, deadline.clone()) {
        Ok(js) => js,
        Err(e) => {
            tracing::error!(%gateway, error = %e, "the function runtime could not start");
            return;
        }
    };
    let mut calls: BTreeMap<u64, Live> = BTreeMap::new();
    // Calls held back while the runtime drains before it is made afresh, and since when.
    let mut held: VecDeque<Box<Job>> = VecDeque::new();
    let mut draining: Option<Instant> = None;
    // Messages to handle this turn: the held calls first once the runtime is fresh, then
    // everything queued since the last turn, in the order it came. A runtime started again
    // after a panic does not load what was served ahead (a load that panics would do so again
    // and again): its calls load what they run.
    let mut batch: VecDeque<Msg> = VecDeque::new();
    // Functions to load ahead of their calls. Loading gives way to calls: a slice of it per
    // turn, after the turn's calls, answers and timers.
    let mut warms = Warms::default();
    // When calls are next looked at for callers gone.
    let mut abandoned_at = Instant::now();
    loop {
        let now = (!warms.is_empty() && draining.is_none()).then(Instant::now);
        let abandoned = (!calls.is_empty()).then_some(abandoned_at);
        let wake = [next_wake(&js, &calls), draining.map(|d| d + DRAIN), now, abandoned].into_iter().flatten().min();
        js.deadline.rest(true);
        // The runtime is dropped at the end still resting: it runs no JavaScript then.
        if !mailbox.take(&mut batch, wake) {
            break;
        }
        js.deadline.rest(false);
        while let Some(msg) = batch.pop_front() {
            let broken = match msg {
                Msg::Call(job) if draining.is_some() => {
                    held.push_back(job);
                    false
                }
                // Nobody waits for its answer any more: it is not started.
                Msg::Call(job) if job.reply.gone() => false,
                Msg::Call(job) => {
                    // A function still waiting to be loaded ahead is loaded before its call, as
                    // it would have been: its top level is not the call's to pay for.
                    let at = Arc::as_ptr(&job.func) as usize;
                    let ahead = warms.take(at).then(|| lock(served).get(&at).cloned()).flatten();
                    if ahead.is_some_and(|load| warm(&mut js, load) || js.full.take()) {
                        // Out of memory: the call starts on the fresh runtime.
                        batch.push_front(Msg::Call(job));
                        true
                    } else {
                        let id = next_call.get();
                        next_call.set(id + 1);
                        start_call(&mut js, &mut calls, id, *job)
                    }
                }
                Msg::Fetched(f) => resume_fetch(&mut js, &mut calls, f),
                Msg::DbDone(call, id, result, held) => {
                    drop(held);
                    resume_db(&mut js, &mut calls, call, id, result)
                }
                Msg::Warm(at) => {
                    warms.push(at);
                    false
                }
                Msg::Gone(names) => {
                    let mut host = js.host.borrow_mut();
                    for name in names {
                        host.gone(&name);
                    }
                    false
                }
            } || js.full.take();
            if broken {
                // Out of memory: a fresh runtime at once; the calls in flight cannot continue.
                js = match renew(js, &mut calls, || Failure::Memory, memory, slots, gateway) {
                    Some(js) => js,
                    None => return,
                };
                release_held(&mut draining, &mut held, &mut batch);
                reload(served, &mut batch, reloaded, &mut warms);
            }
        }
        let broken = fire_timers(&mut js, &mut calls);
        // Calls past their wall-clock limit.
        let now = Instant::now();
        let late: Vec<u64> = calls.iter().filter(|(_, l)| now >= l.started + l.job.limits.wall).map(|(id, _)| *id).collect();
        for id in late {
            if let Some(live) = calls.remove(&id) {
                finish(&js, id, live, Err(Failure::Timeout("the call ran past its wall-clock limit")));
            }
        }
        // Calls whose callers went away (a client that closed its connection) end, and give
        // back their places: a client cannot hold a gateway's places past its own wait.
        if now >= abandoned_at {
            abandoned_at = now + ABANDONED_CHECK;
            let left: Vec<u64> = calls.iter().filter(|(_, l)| l.job.reply.gone()).map(|(id, _)| *id).collect();
            for id in left {
                if let Some(live) = calls.remove(&id) {
                    finish(&js, id, live, Err(Failure::Internal("the caller went away before the answer".into())));
                }
            }
        }
        let broken = broken || js.full.take();
        start_outbound(&js, &calls, gateway, mailbox, services, slots);
        // Every save loads a new version and QuickJS keeps old modules (and this their sources),
        // so once many versions since followed by others, or many bytes of them, have piled up
        // the runtime is made afresh: new calls wait while the calls in flight finish (at most
        // `DRAIN`; those still running then fail), then start on the fresh runtime. However
        // many functions a gateway serves, their current versions alone never renew it.
        let piled = {
            let host = js.host.borrow();
            host.superseded > RECYCLE_AFTER || host.superseded_bytes > RECYCLE_BYTES || js.leftover.get() >= 2
        };
        // Once draining has begun it ends in a renewal, though what piled up cleared meanwhile
        // (leftover jobs that finished): the calls held meanwhile start on the fresh runtime.
        let recycle = !broken && (piled || draining.is_some()) && {
            let since = *draining.get_or_insert_with(Instant::now);
            calls.is_empty() || since.elapsed() >= DRAIN
        };
        // Loading ahead, for a slice of the turn; a runtime about to be renewed loads nothing.
        let mut broken = broken;
        if !broken && !recycle && draining.is_none() {
            let slice = Instant::now();
            while let Some(at) = warms.pop() {
                // Loaded as the last lowering serves it (its table and variables then); one it
                // no longer serves (a version saved over since) is skipped.
                let Some(load) = lock(served).get(&at).cloned() else { continue };
                broken = warm(&mut js, load) || js.full.take();
                if broken || slice.elapsed() >= WARM_SLICE {
                    break;
                }
            }
        }
        if broken || recycle {
            let why = move || match broken {
                true => Failure::Memory,
                false => Failure::Internal("the gateway's runtime was renewed while this call waited".into()),
            };
            js = match renew(js, &mut calls, why, memory, slots, gateway) {
                Some(js) => js,
                None => return,
            };
            release_held(&mut draining, &mut held, &mut batch);
            reload(served, &mut batch, reloaded, &mut warms);
        }
    }
}

/// Functions to load ahead of their calls (by their address among those served), in the
/// order they came, each once.
#[derive(Default)]
struct Warms {
    queue: VecDeque<usize>,
    queued: HashSet<usize>,
}

impl Warms {
    fn push(&mut self, at: usize) {
        if self.queued.insert(at) {
            self.queue.push_back(at);
        }
    }

    fn pop(&mut self) -> Option<usize> {
        let at = self.queue.pop_front()?;
        self.queued.remove(&at);
        Some(at)
    }

    /// Takes the function at `at` out of the queue; whether it was there.
    fn take(&mut self, at: usize) -> bool {
        if self.queue.is_empty() || !self.queued.remove(&at) {
            return false;
        }
        self.queue.retain(|q| *q != at);
        true
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn clear(&mut self) {
        self.queue.clear();
        self.queued.clear();
    }
}

/// Loads a function ahead of its first call, as a call of it would: its top level sees the
/// gateway's variables and has a call's CPU budget. True when that ran the runtime out of memory.
fn warm(js: &mut Js, load: Load) -> bool {
    let Load { func, table, vars, cpu } = load;
    js.register(&func, &table);
    {
        let mut host = js.host.borrow_mut();
        host.table = None;
        // What its top level logs goes to its buffer, as a call's lines do.
        host.sinks.insert(0, (func.logs.clone(), String::new()));
    }
    // Its top level runs under the budget a call of it has: interrupted, its module would stay
    // failed.
    let (out, _, _, oom) = js.segment(0, &func.env, Instant::now(), cpu, |realm, ctx| realm.export(ctx, &func, &vars).map(|_| ()));
    // Loading is no call: what its top level left (timers, lines) goes now.
    forget(js, 0, &func.env);
    oom || out == Err(Failure::Memory)
}

/// Ends a drain once the runtime is fresh: the calls it held go first in the next turn.
fn release_held(draining: &mut Option<Instant>, held: &mut VecDeque<Box<Job>>, batch: &mut VecDeque<Msg>) {
    *draining = None;
    while let Some(job) = held.pop_back() {
        batch.push_front(Msg::Call(job));
    }
}

fn renew(js: Js, calls: &mut BTreeMap<u64, Live>, why: impl Fn() -> Failure, memory: usize, slots: &Slots, gateway: &str) -> Option<Js> {
    for (id, live) in std::mem::take(calls) {
        finish(&js, id, live, Err(why()));
    }
    let deadline = js.deadline.clone();
    deadline.rest(true);
    drop(js);
    deadline.rest(false);
    match Js::new(memory, slots, deadline) {
        Ok(js) => Some(js),
        Err(e) => {
            tracing::error!(%gateway, error = %e, "the function runtime could not restart");
            None
        }
    }
}

/// Superseded versions loaded in a runtime before it is made afresh, and bytes of their sources.
const RECYCLE_AFTER: usize = 512;
const RECYCLE_BYTES: usize = 64 << 20;
/// The longest a renewal waits for the calls in flight.
const DRAIN: Duration = Duration::from_secs(1);

fn next_wake(js: &Js, calls: &BTreeMap<u64, Live>) -> Option<Instant> {
    let timer = js.host.borrow().timers.peek().map(|Reverse((at, _, _))| *at);
    let wall = calls.values().map(|l| l.started + l.job.limits.wall).min();
    match (timer, wall) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// How a call's first run ended.
enum Started {
    /// It answered without waiting.
    Answered(Result<Reply, Failure>),
    /// It waits: its answer is this promise's.
    Waiting(Persistent<Promise<'static>>),
}

/// Starts a call; true when the runtime ran out of memory.
fn start_call(js: &mut Js, calls: &mut BTreeMap<u64, Live>, id: u64, job: Job) -> bool {
    js.register(&job.func, &job.table);
    {
        let mut host = js.host.borrow_mut();
        host.sinks.insert(id, (job.func.logs.clone(), job.request.request_id.clone()));
        host.table = Some(job.table.clone());
    }
    let started = Instant::now();
    let (out, took, spent, oom_job) = js.segment(id, &job.func.env, started, job.limits.cpu, |realm, ctx| -> Result<Started, Failure> {
        let handler = realm.export(ctx, &job.func, &job.vars)?;
        let caught = |e: rquickjs::Error| caught(realm, ctx, e);
        let request = to_js(ctx, &job.request, realm).map_err(caught)?;
        let vars = realm.vars(ctx, &job.vars)?;
        let run = realm.run.clone().restore(ctx).map_err(caught)?;
        let out: Value<'_> = run.call((handler, request, vars)).map_err(caught)?;
        match out.as_promise() {
            Some(promise) => Ok(Started::Waiting(Persistent::save(ctx, promise.clone()))),
            None => Ok(Started::Answered(reply(js, out).map_err(caught))),
        }
    });
    let live = match out {
        _ if oom_job => {
            answer(js, id, job, took, Err(Failure::Memory));
            return true;
        }
        // Other calls may have settled in the promise jobs this run ran.
        _ if spent => {
            answer(js, id, job, took, Err(Failure::Timeout("the call ran past its CPU budget")));
            return settle(js, calls);
        }
        Ok(Started::Answered(result)) => {
            answer(js, id, job, took, result);
            return settle(js, calls);
        }
        Ok(Started::Waiting(promise)) => Live { job, promise, started, cpu: took },
        Err(f) => {
            let oom = f == Failure::Memory;
            answer(js, id, job, took, Err(f));
            return settle(js, calls) || oom;
        }
    };
    calls.insert(id, live);
    settle(js, calls)
}

fn caught(realm: &Realm, ctx: &Ctx<'_>, e: rquickjs::Error) -> Failure {
    match e {
        rquickjs::Error::Exception => {
            let v = ctx.catch();
            thrown(Some(realm), &v)
        }
        rquickjs::Error::Allocation => Failure::Memory,
        other => Failure::Internal(other.to_string()),
    }
}

/// What an error keeps of JavaScript string `s` (`crate::bounded`): cut in the runtime first
/// (the prelude's `cut`, lone surrogates made U+FFFD), so that a message of any length is
/// never copied whole. The cut runs under a deadline of its own ([`HOUSEKEEPING`]): a call
/// past its CPU budget still has its error read. `None` where it cannot run for want of
/// memory (or of a realm): the error is then bare, and taken for running out of memory when
/// the runtime is nearly full (see [`starved`]); a placeholder where anything else stops it.
fn kept_text(realm: Option<&Realm>, s: &rquickjs::String<'_>) -> Option<String> {
    let realm = realm?;
    let armed = realm.deadline.save();
    realm.deadline.arm(Instant::now(), HOUSEKEEPING);
    realm.deadline.fired();
    let short = realm.sdk(s.ctx(), "cut").and_then(|cut| cut.call::<_, rquickjs::String<'_>>((s.clone(), crate::TEXT_KEPT + 1)));
    let interrupted = realm.deadline.fired();
    realm.deadline.restore(armed);
    match short {
        Ok(short) => short.to_string().ok().map(crate::bounded),
        // The cut runs no function's code: what stops it is its deadline (the text could not
        // be read in time) or running out of memory (the error is left bare). Nothing of what
        // it threw is read.
        Err(_) => {
            let _ = s.ctx().catch();
            interrupted.then(|| "(the error's text could not be read)".to_string())
        }
    }
}

fn thrown(realm: Option<&Realm>, v: &Value<'_>) -> Failure {
    if let Some(obj) = v.as_object() {
        // A getter of the error may throw (or be interrupted): what it threw is taken off.
        // An error's text is bounded as a log line is, and only what is kept is copied out of
        // the runtime: a function cannot make its answer (or its log) hold a message of any
        // size outside its gateway's memory.
        let read = |key: &str| -> String {
            match obj.get::<_, rquickjs::String<'_>>(key) {
                Ok(s) => kept_text(realm, &s).unwrap_or_default(),
                Err(_) => {
                    let _ = v.ctx().catch();
                    String::new()
                }
            }
        };
        let message = read("message");
        let stack = read("stack");
        if message == "out of memory" {
            return Failure::Memory;
        }
        if message == "interrupted" {
            return Failure::Timeout("the call ran past its CPU budget");
        }
        let bare = message.is_empty();
        let message = if bare { "the function threw".into() } else { message };
        // The SDK's database errors carry the status an uncaught one answers with.
        let name = read("name");
        let status = (name == "DatabaseError").then(|| obj.get::<_, u16>("status").map_err(|_| v.ctx().catch()).ok()).flatten().filter(|s| (400..600).contains(s));
        return Failure::Threw { message, stack, status, bare };
    }
    // Bare: nothing said what went wrong, which may be a runtime out of memory (`starved`).
    let (message, bare) = match v.as_string() {
        Some(s) => kept_text(realm, s).map_or_else(|| ("the function threw a string".into(), true), |m| (m, false)),
        // What QuickJS throws when it has no memory left to make the error that says so.
        None if v.is_null() => ("the function threw null (as one does that runs out of its gateway's memory)".into(), true),
        None => (format!("the function threw a {}", v.type_name()), false),
    };
    if message == "out of memory" {
        return Failure::Memory;
    }
    Failure::Threw { message, stack: String::new(), status: None, bare }
}

/// Whether a call failed because its runtime is out of memory, though no error said so.
///
/// Where QuickJS has too little memory left to make the error that says so it throws a bare
/// null, or an error without its message. A function may throw those too, so only when the
/// runtime is still at least three quarters full is the call's failure taken for the runtime's:
/// what a function holds past its calls (module state, a promise chain) would otherwise fail
/// every call of the gateway from then on. Counting the heap walks it, so only such failures pay.
fn starved(js: &Js, result: &Result<Reply, Failure>) -> bool {
    matches!(result, Err(Failure::Threw { bare: true, .. })) && nearly_full(&js.rt)
}

/// Whether the runtime holds three quarters of its memory limit or more.
fn nearly_full(rt: &Runtime) -> bool {
    let usage = rt.memory_usage();
    usage.malloc_limit > 0 && usage.malloc_size >= usage.malloc_limit / 4 * 3
}

/// Answers every call whose promise has settled; true when one ran out of memory.
fn settle(js: &Js, calls: &mut BTreeMap<u64, Live>) -> bool {
    if calls.is_empty() {
        return false;
    }
    let mut done = Vec::new();
    let mut oom = false;
    let realms = js.realms.borrow();
    for (id, live) in calls.iter() {
        let Some((_, realm)) = realms.iter().find(|(e, _)| *e == live.job.func.env) else { continue };
        realm.ctx.with(|ctx| {
            let Ok(promise) = live.promise.clone().restore(&ctx) else { return };
            let state = promise.state();
            // Reading a settled call's answer or error may run the function's getters.
            let _counted = (state != PromiseState::Pending).then(|| js.housekeeping());
            match state {
                PromiseState::Pending => {}
                PromiseState::Resolved => done.push((*id, promise.result::<Value<'_>>().unwrap_or(Err(rquickjs::Error::Unknown)).and_then(|out| reply(js, out)).map_err(|e| caught(realm, &ctx, e)))),
                PromiseState::Rejected => {
                    let f = match promise.result::<Value<'_>>() {
                        Some(Err(rquickjs::Error::Exception)) => thrown(Some(realm), &ctx.catch()),
                        Some(Err(e)) => caught(realm, &ctx, e),
                        _ => Failure::Internal("the call failed".into()),
                    };
                    oom |= f == Failure::Memory;
                    done.push((*id, Err(f)));
                }
            }
        });
    }
    drop(realms);
    for (id, result) in done {
        if let Some(live) = calls.remove(&id) {
            finish(js, id, live, result);
        }
    }
    oom
}

/// The answer the prelude's `toResponse` made: `[status, headers, body]`, or the JSON text of
/// a value answered as JSON (the common case, which so crosses as one string; the prelude
/// sends a long one as a body). The body is copied once its copies are taken from the
/// gateway's budget; a body past it fails as out of memory.
fn reply(js: &Js, out: Value<'_>) -> rquickjs::Result<Reply> {
    if let Some(json) = out.as_string() {
        return Ok(Reply { status: 200, headers: vec![JSON_TYPE], body: json.to_string()?.into_bytes() });
    }
    let a = out.into_array().ok_or(rquickjs::Error::Unknown)?;
    let status: i32 = a.get(0)?;
    let headers: Array<'_> = a.get(1)?;
    let body: Array<'_> = a.get(2)?;
    let budget = js.host.borrow().outbound.bytes.clone();
    Ok(Reply {
        // As `Response` itself allows, though a function may have set the field after it was
        // made: an informational status is never a final answer.
        status: u16::try_from(status).ok().filter(|s| (200..=599).contains(s)).unwrap_or(500),
        headers: header_list(&headers)?.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        body: from_wire_within(&body, &budget)?.ok_or(rquickjs::Error::Allocation)?,
    })
}

fn finish(js: &Js, id: u64, live: Live, result: Result<Reply, Failure>) {
    answer(js, id, live.job, live.cpu, result);
}

/// Forgets what the runtime kept for call `id` of `env`: its log sink, its timers (and their
/// callbacks in its realm) and the lines it logged, which are returned.
fn forget(js: &Js, id: u64, env: &str) -> Vec<LogLine> {
    let mut unfired = Vec::new();
    let logs = {
        let mut host = js.host.borrow_mut();
        host.sinks.remove(&id);
        host.timers.retain(|Reverse((_, call, timer))| {
            let other = *call != id;
            if !other {
                unfired.push(*timer);
            }
            other
        });
        host.cancelled.retain(|(call, _)| *call != id);
        host.logs.remove(&id).map(|(lines, _, _)| lines).unwrap_or_default()
    };
    let unanswered = js.host.borrow_mut().unanswered.remove(&id).unwrap_or_default();
    // The callbacks of the timers the call left behind go too, and the SDK's entries for its
    // fetches and database operations no one waited for, or the runtime would keep them.
    let realm = js.realms.borrow().iter().find(|(e, _)| e == env).map(|(_, r)| r.clone());
    if let Some(realm) = realm.filter(|_| !unfired.is_empty() || !unanswered.fetches.is_empty() || !unanswered.db.is_empty()) {
        let _counted = js.housekeeping();
        realm.ctx.with(|ctx| {
            let dropped = realm.sdk(&ctx, "dropTimers").and_then(|f| f.call::<_, ()>((unfired,))).and_then(|()| realm.sdk(&ctx, "dropOutbound")).and_then(|f| f.call::<_, ()>((unanswered.fetches, unanswered.db)));
            if let Err(e) = dropped {
                // Taken off the context, or the next call would see it.
                let _ = ctx.catch();
                tracing::debug!(error = %e, "a call's timers or outbound calls could not be dropped");
            }
        });
    }
    logs
}

/// Answers call `id` and forgets what the runtime kept for it.
fn answer(js: &Js, id: u64, job: Job, cpu: Duration, result: Result<Reply, Failure>) {
    let result = match starved(js, &result) {
        true => {
            js.full.set(true);
            Err(Failure::Memory)
        }
        false => result,
    };
    let logs = forget(js, id, &job.func.env);
    // A large body leaves the runtime with the answer: it counts against the gateway's limit
    // until it has been sent, and one that would pass it fails as running out of memory.
    let (result, hold) = match result {
        Ok(r) if r.body.len() >= HELD_REPLY_BYTES => match Taken::of(&js.host.borrow().outbound.bytes, r.body.len()) {
            Some(t) => (Ok(r), Hold(Some(t))),
            None => (Err(Failure::Memory), Hold::default()),
        },
        other => (other, Hold::default()),
    };
    // The place first: a caller woken by the answer may call again at once.
    drop(job.place);
    job.reply.send(Outcome { result, logs, cpu, hold });
}

fn fire_timers(js: &mut Js, calls: &mut BTreeMap<u64, Live>) -> bool {
    let mut oom = false;
    loop {
        let due = {
            let mut host = js.host.borrow_mut();
            match host.timers.peek() {
                Some(Reverse((at, _, _))) if *at <= Instant::now() => {
                    let Reverse((_, call, id)) = host.timers.pop().expect("peeked");
                    if host.cancelled.remove(&(call, id)) {
                        continue;
                    }
                    Some((call, id))
                }
                _ => {
                    // Emptied, the collections give back the room they grew to.
                    if host.timers.is_empty() && host.timers.capacity() > 1024 {
                        host.timers.shrink_to_fit();
                        host.cancelled.shrink_to_fit();
                    }
                    None
                }
            }
        };
        let Some((call, id)) = due else { break };
        oom |= wake(js, calls, call, |realm, ctx| realm.sdk(ctx, "fireTimer")?.call::<_, ()>((id,)));
        if oom {
            break;
        }
    }
    oom
}

/// Runs `f` for call `call` within what is left of its budget, then answers what settled.
fn wake(js: &mut Js, calls: &mut BTreeMap<u64, Live>, call: u64, f: impl FnOnce(&Realm, &Ctx<'_>) -> rquickjs::Result<()>) -> bool {
    let Some(live) = calls.get(&call) else { return false };
    let budget = live.job.limits.cpu.saturating_sub(live.cpu);
    let env = live.job.func.env.clone();
    js.host.borrow_mut().table = Some(live.job.table.clone());
    let (out, took, spent, oom_job) = js.segment(call, &env, Instant::now(), budget, |realm, ctx| f(realm, ctx).map_err(|e| caught(realm, ctx, e)));
    if let Some(live) = calls.get_mut(&call) {
        live.cpu += took;
    }
    let mut oom = matches!(out, Err(Failure::Memory)) || oom_job;
    let out = if oom_job { Err(Failure::Memory) } else { out };
    if spent || matches!(out, Err(Failure::Timeout(_))) {
        if let Some(live) = calls.remove(&call) {
            finish(js, call, live, Err(Failure::Timeout("the call ran past its CPU budget")));
        }
    } else if let Err(f) = out
        && let Some(live) = calls.remove(&call)
    {
        finish(js, call, live, Err(f));
    }
    oom |= settle(js, calls);
    oom
}

fn resume_fetch(js: &mut Js, calls: &mut BTreeMap<u64, Live>, f: Fetched) -> bool {
    let Fetched { call, id, result, held } = f;
    // The body is the runtime's memory from here on, where its limit counts it.
    drop(held);
    js.host.borrow_mut().answered(call, id, true);
    wake(js, calls, call, move |realm, ctx| {
        let fetched = realm.sdk(ctx, "fetched")?;
        match result {
            Ok((status, headers, body)) => {
                let hs: Vec<Vec<String>> = headers.into_iter().map(|(k, v)| vec![k, v]).collect();
                let body = TypedArray::<u8>::new_copy(ctx.clone(), body)?;
                fetched.call::<_, ()>((id, Value::new_null(ctx.clone()), status, hs, body))
            }
            Err(message) => fetched.call::<_, ()>((id, message, 0, Vec::<Vec<String>>::new(), Value::new_null(ctx.clone()))),
        }
    })
}

fn resume_db(js: &mut Js, calls: &mut BTreeMap<u64, Live>, call: u64, id: u32, result: Result<String, String>) -> bool {
    js.host.borrow_mut().answered(call, id, false);
    wake(js, calls, call, move |realm, ctx| {
        let done = realm.sdk(ctx, "dbDone")?;
        match result {
            Ok(out) => done.call::<_, ()>((id, Value::new_null(ctx.clone()), out)),
            Err(e) => done.call::<_, ()>((id, e, Value::new_null(ctx.clone()))),
        }
    })
}

/// Hands the fetches and database operations the last step started to the node.
fn start_outbound(js: &Js, calls: &BTreeMap<u64, Live>, gateway: &str, back: &Arc<Mailbox<Msg>>, services: &Services, slots: &Slots) {
    start_fetches(js, calls, gateway, back, services.fetcher.as_ref(), slots);
    let started = std::mem::take(&mut js.host.borrow_mut().db_ops);
    for (call, id, op, place, held) in started {
        let Some(scope) = calls.get(&call).map(|l| l.job.reach.database.clone()) else { continue };
        let back = back.clone();
        let answer = move |result, taken: Option<Taken>| {
            let _ = back.send(Msg::DbDone(call, id, result, taken));
        };
        match (&services.database, scope) {
            (Some(run), Some(scope)) => {
                let bytes = slots.bytes.clone();
                run(DbRequest {
                    gateway: gateway.to_string(),
                    scope,
                    op,
                    reply: Box::new(move |result: Result<String, String>| {
                        drop((place, held));
                        // The result waits outside the runtime until it takes it: it counts
                        // against the gateway's limit until then.
                        match result {
                            Ok(text) => match Taken::of(&bytes, text.len()) {
                                Some(taken) => answer(Ok(text), Some(taken)),
                                None => answer(Err(unavailable("the result and the fetches and database results outside this gateway's runtime would pass its memory limit")), None),
                            },
                            Err(e) => answer(Err(e), None),
                        }
                    }),
                })
            }
            _ => answer(Err(unavailable("no database is available to this function on this node")), None),
        }
    }
}

/// A database failure as the prelude reads one: unavailable, 503.
fn unavailable(why: &str) -> String {
    serde_json::json!({"message": why, "code": "unavailable", "status": 503}).to_string()
}

fn start_fetches(js: &Js, calls: &BTreeMap<u64, Live>, gateway: &str, back: &Arc<Mailbox<Msg>>, fetcher: Option<&Fetcher>, slots: &Slots) {
    let started = std::mem::take(&mut js.host.borrow_mut().fetches);
    for (call, id, method, url, headers, body, place, bytes) in started {
        // A fetch of a call that ended meanwhile is not made.
        let Some(allow) = calls.get(&call).map(|l| l.job.reach.allow.clone()) else { continue };
        let back = back.clone();
        let budget = slots.bytes.clone();
        // A body read stays taken from the gateway's budget (`FetchRequest::budget`) until the
        // runtime has it.
        let answer = move |result: Result<(u16, Vec<(String, String)>, Vec<u8>), String>| {
            let n = result.as_ref().map_or(0, |(_, _, body)| body.len());
            let _ = back.send(Msg::Fetched(Fetched { call, id, result, held: Taken(budget, n) }));
        };
        let Some(fetcher) = fetcher else {
            answer(Err("fetch is not available on this node".into()));
            continue;
        };
        fetcher(FetchRequest {
            gateway: gateway.to_string(),
            method,
            url,
            headers,
            body,
            allow,
            budget: slots.bytes.clone(),
            reply: Box::new(move |result| {
                drop((place, bytes));
                answer(result)
            }),
        });
    }
}

/// Timers one gateway's runtime keeps at once (cleared ones count until they would have
/// fired): the engine holds them outside the runtime's memory limit.
pub const TIMERS_PENDING: usize = 100_000;

/// Bytes of the runtime's memory limit a timer kept outside it stands for: a gateway with
/// little memory keeps fewer timers ([`TIMERS_PENDING`] at most).
const TIMER_WEIGHT: usize = 256;

/// The timers a runtime of `memory` bytes keeps at once.
pub fn timers_at_most(memory: usize) -> usize {
    (memory / TIMER_WEIGHT).clamp(1024, TIMERS_PENDING)
}

/// Fetches and database operations one gateway may have in flight on a node at once: past
/// this, more are refused at once, so that no tenant holds the node's connections or its
/// database threads.
pub const OUTBOUND_IN_FLIGHT: usize = 64;

/// The gateway's outbound operations in flight (`places`, one each, from when a function
/// asks until the answer is made or dropped unanswered), and the bytes they hold outside the
/// runtime (request bodies until sent, response bodies and database results until the
/// runtime has them).
#[derive(Clone, Default)]
struct Slots {
    places: Arc<Budget>,
    bytes: Arc<Budget>,
}

impl Slots {
    fn new(memory: usize) -> Slots {
        Slots { places: Arc::new(Budget::new(OUTBOUND_IN_FLIGHT)), bytes: Arc::new(Budget::new(memory)) }
    }

    /// A place for one more operation, or none when all are taken.
    fn place(&self) -> Option<Taken> {
        Taken::of(&self.places, 1)
    }

    fn refusal(what: &str) -> String {
        format!("this {what} would make more than {OUTBOUND_IN_FLIGHT} fetches and database operations of this gateway in flight at once; wait for some to finish")
    }
}

/// Bytes taken from a gateway's budget, given back when this goes.
pub(crate) struct Taken(pub(crate) Arc<Budget>, pub(crate) usize);

impl Taken {
    fn of(budget: &Arc<Budget>, n: usize) -> Option<Taken> {
        budget.take(n).then(|| Taken(budget.clone(), n))
    }

    /// Takes `n` more, if the budget has them.
    pub(crate) fn grow(&mut self, n: usize) -> bool {
        let took = self.0.take(n);
        if took {
            self.1 += n;
        }
        took
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.0.give(self.1);
    }
}

/// `v` frozen all the way down, by the prelude's `freeze`: what a call is given to read, and no
/// call may change for the next. The realm took it before any function ran, so a function that
/// replaces the global `Object.freeze` changes nothing here.
fn frozen<'js, T: rquickjs::FromJs<'js> + rquickjs::IntoJs<'js>>(realm: &Realm, ctx: &Ctx<'js>, v: T) -> rquickjs::Result<T> {
    realm.sdk(ctx, "freeze")?.call((v,))
}

/// `ctx.user` objects kept per runtime; past this many, the kept ones go and are made again.
const USERS_KEPT: usize = 4096;

type Users = RefCell<HashMap<String, (Option<Arc<weir_plugins::grant_usage::Grantee>>, Persistent<Object<'static>>)>>;

/// `ctx.user` for `user`: the frozen object kept for it, or a new one, then kept.
fn user_object<'js>(ctx: &Ctx<'js>, realm: &Realm, user: &User) -> rquickjs::Result<Object<'js>> {
    let users = &realm.users;
    if let Some((grant, o)) = users.borrow().get(&user.name)
        && *grant == user.grant
    {
        return o.clone().restore(ctx);
    }
    let u = Object::new(ctx.clone())?;
    define(&u, "name", user.name.as_str())?;
    if let Some(g) = &user.grant {
        define(&u, "appId", g.application.as_str())?;
        define(&u, "grantId", g.grant.as_str())?;
    }
    let u = frozen(realm, ctx, u)?;
    let mut users = users.borrow_mut();
    if users.len() >= USERS_KEPT {
        users.clear();
    }
    users.insert(user.name.clone(), (user.grant.clone(), Persistent::save(ctx, u.clone())));
    Ok(u)
}

/// Makes `key` an own data property of `obj` (writable, enumerable, configurable), as an object
/// literal does: no setter a function put on a prototype runs, and `__proto__` is a key like
/// any other.
fn define<'js, K: rquickjs::IntoAtom<'js>, V: rquickjs::IntoJs<'js>>(obj: &Object<'js>, key: K, v: V) -> rquickjs::Result<()> {
    obj.prop(key, rquickjs::object::Property::from(v).writable().enumerable().configurable())
}

fn to_js<'js>(ctx: &Ctx<'js>, r: &Request, realm: &Realm) -> rquickjs::Result<Object<'js>> {
    let keys = &realm.keys;
    let o = Object::new(ctx.clone())?;
    define(&o, key(ctx, &keys.method)?, r.method.as_str())?;
    define(&o, key(ctx, &keys.path)?, r.path.as_str())?;
    // A parameter given more than once is an array of its values, in order; grouped here, so
    // nothing is read back from the object (or its prototype).
    let mut grouped: Vec<(&str, Vec<&str>)> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for (k, v) in &r.query {
        match at.get(k.as_str()) {
            Some(&i) => grouped[i].1.push(v),
            None => {
                at.insert(k, grouped.len());
                grouped.push((k, vec![v]));
            }
        }
    }
    let query = Object::new(ctx.clone())?;
    for (k, values) in grouped {
        match values[..] {
            [one] => define(&query, k, one)?,
            _ => {
                let a = Array::new(ctx.clone())?;
                for (i, v) in values.into_iter().enumerate() {
                    define(&a, i as u32, v)?;
                }
                define(&query, k, a)?;
            }
        }
    }
    define(&o, key(ctx, &keys.query)?, query)?;
    // A header sent more than once is one property, its values joined as HTTP joins them;
    // joined here, so each name costs the runtime one property and no lookup.
    let mut joined: Vec<(&str, std::borrow::Cow<'_, str>)> = Vec::with_capacity(r.headers.len());
    for (k, v) in &r.headers {
        match joined.iter_mut().find(|(name, _)| *name == k.as_str()) {
            Some((_, prev)) => {
                let prev = prev.to_mut();
                prev.push_str(", ");
                prev.push_str(v);
            }
            None => joined.push((k.as_str(), std::borrow::Cow::Borrowed(v.as_str()))),
        }
    }
    let headers = Object::new(ctx.clone())?;
    for (k, v) in joined {
        define(&headers, k, v.as_ref())?;
    }
    define(&o, key(ctx, &keys.headers)?, headers)?;
    if let Some(body) = &r.body {
        define(&o, key(ctx, &keys.body)?, body.as_str())?;
    }
    define(&o, key(ctx, &keys.request_id)?, r.request_id.as_str())?;
    if let Some(user) = &r.user {
        define(&o, key(ctx, &keys.user)?, user_object(ctx, realm, user)?)?;
    }
    Ok(o)
}

/// A JSON value in the runtime: an object of strings (the gateway's variables) made directly,
/// anything else through the runtime's JSON parser.
fn rquickjs_serde_value<'js>(ctx: &Ctx<'js>, v: &serde_json::Value) -> rquickjs::Result<Value<'js>> {
    match v.as_object() {
        // `__proto__` set on an object is its prototype, where the parser makes a property.
        Some(map) if map.values().all(serde_json::Value::is_string) && !map.contains_key("__proto__") => {
            let o = Object::new(ctx.clone())?;
            for (k, v) in map {
                define(&o, k.as_str(), v.as_str().unwrap_or_default())?;
            }
            Ok(o.into_value())
        }
        _ => ctx.json_parse(v.to_string()),
    }
}

